//! Network namespaces: run work inside one on the current thread, and come back.
//!
//! The datapath resolves interface names, creates TCX links and runs `ip` in
//! the namespace of the calling thread, so a node's work is wrapped in a
//! [`NetnsGuard`]. In production the agent runs in the node's namespace and
//! never needs one; tests and the lab drive several nodes from one process.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

/// Where `ip netns add NAME` puts its namespaces.
pub const NETNS_RUN_DIR: &str = "/var/run/netns";

/// The path of a named namespace (as created by `ip netns add`).
pub fn named(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

/// While alive, the current thread is in another network namespace; dropping it
/// returns the thread to the namespace it was in.
#[must_use = "the thread returns to its old namespace when the guard drops"]
pub struct NetnsGuard {
    previous: File,
}

impl NetnsGuard {
    /// Moves the current thread into the namespace at `path`.
    pub fn enter(path: &Path) -> io::Result<Self> {
        let previous = File::open("/proc/thread-self/ns/net")?;
        let target = File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("opening network namespace {}: {e}", path.display())))?;
        setns(&target)?;
        Ok(Self { previous })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.previous) {
            // A thread stuck in the wrong namespace would misdirect all later
            // work; there is no safe way to continue.
            panic!("cannot return to the previous network namespace: {e}");
        }
    }
}

fn setns(ns: &File) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` with the current thread inside the namespace at `path` (or where it
/// is, for `None`).
pub fn run_in<T>(path: Option<&Path>, f: impl FnOnce() -> T) -> io::Result<T> {
    let _guard = path.map(NetnsGuard::enter).transpose()?;
    Ok(f())
}

/// An fd for the current thread's network namespace.
pub fn current() -> io::Result<OwnedFd> {
    Ok(File::open("/proc/thread-self/ns/net")?.into())
}

/// The kernel's cookie for the current thread's network namespace, as
/// `bpf_get_netns_cookie()` reports it to socket programs.
pub fn current_cookie() -> io::Result<u64> {
    // SO_NETNS_COOKIE (Linux 5.14) on any socket of the namespace.
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: creating and closing a socket; getsockopt into a u64.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
        Ok(cookie)
    }
}
