//! Processes by pidfd (Linux 5.3+): a handle that names one process for its
//! whole life, whatever happens to its pid. The agent watches Envoy with
//! one (readable when Envoy exits, reaped or not: a zombie cannot pass for
//! a live process), signals it through one (never another process that got
//! its pid), and takes Envoy's listening sockets through one.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

fn ret_fd(rc: libc::c_long) -> io::Result<OwnedFd> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor, which we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as i32) })
}

/// A pidfd for the process `pid` (pidfd_open(2)).
pub fn open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments.
    ret_fd(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })
}

/// A duplicate of the process's descriptor `fd` (pidfd_getfd(2), Linux 5.6).
pub fn get_fd(pidfd: &OwnedFd, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: a plain syscall on a pidfd we own.
    ret_fd(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })
}

/// Sends `signal` to the process (pidfd_send_signal(2)).
pub fn signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: a plain syscall on a pidfd we own; no siginfo.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), signal, 0usize, 0) };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Whether the process has exited (its pidfd is readable then).
pub fn exited(pidfd: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfd_sees_an_unreaped_exit() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let fd = open(child.id() as i32).unwrap();
        assert!(!exited(&fd));
        signal(&fd, libc::SIGKILL).unwrap();
        let t0 = std::time::Instant::now();
        while !exited(&fd) {
            assert!(t0.elapsed() < std::time::Duration::from_secs(5), "exit not seen");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Not reaped yet: the pid still exists (a zombie), the pidfd knows better.
        assert!(std::path::Path::new(&format!("/proc/{}", child.id())).exists());
        child.wait().unwrap();
        assert!(signal(&fd, 0).is_err(), "no signal reaches a process that is gone");
    }
}
