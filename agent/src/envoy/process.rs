//! One Envoy process, watched through a pidfd: started by this agent (a
//! child, reaped here) or adopted from an earlier one (not a child: only
//! the pidfd tells when it exits). The exit is seen when it happens,
//! reaped or not.

use std::{io, os::fd::OwnedFd, path::Path, time::Instant};

use tokio::io::{Interest, unix::AsyncFd};

use crate::pidfd;

/// Registers a pidfd with the runtime (readable when the process exits).
fn watch(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd is moved in: it stays open, and is the same
    // descriptor, for as long as the AsyncFd lives.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into())
}

/// A running (or just exited) Envoy.
pub struct Process {
    pid: u32,
    pidfd: AsyncFd<OwnedFd>,
    /// The child handle when this agent started it (to reap it).
    child: Option<tokio::process::Child>,
    /// When this agent started it (`None` when adopted).
    pub started: Option<Instant>,
}

impl Process {
    /// Starts `cmd` and watches the new process.
    pub fn spawn(cmd: &mut tokio::process::Command) -> io::Result<Process> {
        let mut child = cmd.spawn()?;
        let Some(pid) = child.id() else {
            return Err(io::Error::other("the new Envoy exited at once"));
        };
        let fd = match pidfd::open(pid as i32) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.start_kill();
                return Err(e);
            }
        };
        Ok(Process { pid, pidfd: watch(fd)?, child: Some(child), started: Some(Instant::now()) })
    }

    /// Watches the process `pid` if it is alive and its command line names
    /// `bootstrap` (checked after the pidfd is open, so a pid reused in
    /// between cannot be taken for it).
    pub fn adopt(pid: u32, bootstrap: &Path) -> Option<Process> {
        let fd = pidfd::open(i32::try_from(pid).ok()?).ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let ours = String::from_utf8_lossy(&cmdline).contains(&*bootstrap.to_string_lossy());
        if !ours || pidfd::exited(&fd) {
            return None;
        }
        Some(Process { pid, pidfd: watch(fd).ok()?, child: None, started: None })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends a signal to this process (and no other).
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        pidfd::signal(self.pidfd.get_ref(), sig)
    }

    pub fn has_exited(&self) -> bool {
        pidfd::exited(self.pidfd.get_ref())
    }

    /// Waits until the process exits; how it ended.
    pub async fn exited(&mut self) -> String {
        loop {
            match self.pidfd.readable().await {
                Ok(mut ready) => {
                    if pidfd::exited(self.pidfd.get_ref()) {
                        break;
                    }
                    ready.clear_ready();
                }
                // Not pollable (it cannot happen with a pidfd): fall back to a slow look.
                Err(_) => {
                    if pidfd::exited(self.pidfd.get_ref()) {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
        match self.child.as_mut() {
            Some(c) => match c.wait().await {
                Ok(st) => st.to_string(),
                Err(e) => e.to_string(),
            },
            None => "exited (adopted: not this agent's child)".into(),
        }
    }
}
