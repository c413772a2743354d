//! The unix sockets the agent serves on (xDS, access log, flow API), made so
//! that only root, or the members of one named group, can connect: a
//! connect needs write permission on the socket file, and the directory
//! holding the sockets is closed to everyone else too, so nobody can reach a
//! socket in the moment between `bind` (which makes it as the umask says)
//! and `chmod`. The agent runs as root with its capabilities dropped (no
//! CAP_DAC_OVERRIDE, no CAP_CHOWN): it owns what it creates, and may give a
//! file to a group only if it is a member (the pod's `supplementalGroups`).

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::Path,
};

/// Who may use the agent's sockets besides root.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// A group whose members may connect too (None: root only).
    pub gid: Option<u32>,
}

impl Access {
    /// The mode of a socket: owner (and group) read and write.
    pub fn socket_mode(self) -> u32 {
        if self.gid.is_some() { 0o660 } else { 0o600 }
    }

    /// The mode of a socket directory: owner (and group) may enter.
    pub fn dir_mode(self) -> u32 {
        if self.gid.is_some() { 0o750 } else { 0o700 }
    }

    fn give(self, path: &Path) -> io::Result<()> {
        if let Some(gid) = self.gid {
            std::os::unix::fs::chown(path, None, Some(gid))
                .map_err(|e| io::Error::new(e.kind(), format!("giving {} to group {gid}: {e}", path.display())))?;
        }
        Ok(())
    }

    /// Creates `dir` (and its parents) if missing, and sets its mode and
    /// group: only root (and the group) may enter it.
    pub fn private_dir(self, dir: &Path) -> io::Result<()> {
        fs::DirBuilder::new().recursive(true).mode(self.dir_mode()).create(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(self.dir_mode()))?;
        self.give(dir)
    }

    /// Binds a unix socket at `path` (replacing what a previous run left)
    /// and sets its mode and group. A missing directory is created private;
    /// an existing one is left as it is (the agent makes its state directory
    /// private when it starts).
    pub fn bind(self, path: &Path) -> io::Result<tokio::net::UnixListener> {
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
            && !dir.exists()
        {
            self.private_dir(dir)?;
        }
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = tokio::net::UnixListener::bind(path)?;
        fs::set_permissions(path, fs::Permissions::from_mode(self.socket_mode()))?;
        self.give(path)?;
        Ok(listener)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[tokio::test]
    async fn sockets_and_their_directory_are_closed_to_others() {
        let base = std::env::temp_dir().join(format!("weft-socket-test-{}", std::process::id()));
        let dir = base.join("state");
        let sock = dir.join("x.sock");
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
        let _l = Access::default().bind(&sock).unwrap();
        assert_eq!((mode(&dir), mode(&sock)), (0o700, 0o600));
        // An existing directory keeps its mode; a stale socket is replaced.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        drop(_l);
        let own_gid = fs::metadata(&base).unwrap().gid();
        let access = Access { gid: Some(own_gid) };
        let _l = access.bind(&sock).unwrap();
        assert_eq!((mode(&dir), mode(&sock)), (0o755, 0o660));
        assert_eq!(fs::metadata(&sock).unwrap().gid(), own_gid);
        access.private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o750);
        fs::remove_dir_all(&base).unwrap();
    }
}
