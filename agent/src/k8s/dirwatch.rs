//! Wakes the control loop when a file of the objects directory is written,
//! renamed, or removed (inotify), so a change is read when it happens
//! instead of at the next poll tick (200 ms, ~100 ms on average, before any
//! work started). The tick stays as the fallback: a directory created after
//! the last read, or a kernel that refuses the watch, is still seen there.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use tokio::io::{Interest, unix::AsyncFd};

/// The events that end a change of a file: written and closed, renamed in
/// or out (editors and atomic writers, ConfigMap mounts swapping `..data`),
/// removed. Not IN_MODIFY: a file being written is read once it is closed,
/// not half-written.
const EVENTS: u32 = libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_MOVED_FROM
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// An inotify instance watching directories.
pub struct DirWatch {
    fd: AsyncFd<OwnedFd>,
}

impl DirWatch {
    pub fn new() -> io::Result<Self> {
        // SAFETY: no pointers; the result is checked.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the OwnedFd is moved in: it stays open, and is the same
        // descriptor, for as long as the AsyncFd lives.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(io::Error::from)?;
        Ok(Self { fd })
    }

    /// Watches `dir` (again: watching a directory twice is one watch).
    pub fn add(&self, dir: &Path) -> io::Result<()> {
        let path = CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
        // SAFETY: `path` is a valid C string that outlives the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), path.as_ptr(), EVENTS) };
        if wd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until something happened in a watched directory; reads (and
    /// drops) every event queued, so a burst of writes wakes once.
    pub async fn changed(&self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut buf = [0u8; 4096];
            let mut got = false;
            loop {
                // SAFETY: `buf` is valid for writes of its length.
                let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n > 0 {
                    got = true;
                    continue;
                }
                let err = io::Error::last_os_error();
                if n < 0 && err.kind() == io::ErrorKind::WouldBlock {
                    ready.clear_ready();
                    break;
                }
                if n < 0 && err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(if n == 0 { io::Error::from(io::ErrorKind::UnexpectedEof) } else { err });
            }
            if got {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A file renamed into, written in, or removed from a watched directory
    /// wakes the watcher; with nothing happening it does not.
    #[tokio::test]
    async fn writes_renames_and_removals_wake_it() {
        let dir = std::env::temp_dir().join(format!("weft-dirwatch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let w = DirWatch::new().unwrap();
        w.add(&dir).unwrap();
        let quiet = tokio::time::timeout(Duration::from_millis(100), w.changed()).await;
        assert!(quiet.is_err(), "woken with nothing written");
        std::fs::write(dir.join(".tmp"), "a: 1\n").unwrap();
        std::fs::rename(dir.join(".tmp"), dir.join("a.yaml")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed()).await.expect("rename seen").unwrap();
        std::fs::write(dir.join("a.yaml"), "a: 2\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed()).await.expect("write seen").unwrap();
        std::fs::remove_file(dir.join("a.yaml")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), w.changed()).await.expect("removal seen").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
