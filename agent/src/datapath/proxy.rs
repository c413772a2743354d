//! Finding the proxy's listening sockets so sk_lookup can hand connections to
//! them. Envoy opens its listeners itself; the agent takes a duplicate of the
//! fd (pidfd_getfd) of whichever process listens on 127.0.0.1:<proxy port> in
//! this network namespace.

use std::{fs, os::fd::OwnedFd};

use super::{Datapath, DatapathError, Result, sys};

/// The socket inode of the TCP listener on `port` in the current thread's
/// network namespace, if any.
fn listener_inode(port: u16) -> Result<Option<u64>> {
    let tcp = fs::read_to_string("/proc/thread-self/net/tcp")
        .map_err(|e| DatapathError::io("reading /proc/thread-self/net/tcp", e))?;
    for line in tcp.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "0A" {
            continue; // 0A = LISTEN
        }
        let Some((_, p)) = f[1].split_once(':') else {
            continue;
        };
        if u16::from_str_radix(p, 16).ok() == Some(port) {
            return Ok(f[9].parse().ok());
        }
    }
    Ok(None)
}

/// A duplicate of the listening socket on `port`, searched in the given
/// processes (or all of them).
pub fn find_listener(port: u16, pids: Option<&[i32]>) -> Result<Option<OwnedFd>> {
    let Some(inode) = listener_inode(port)? else {
        return Ok(None);
    };
    let target = format!("socket:[{inode}]");
    let all: Vec<i32>;
    let pids = match pids {
        Some(p) => p,
        None => {
            all = fs::read_dir("/proc")
                .map_err(|e| DatapathError::io("reading /proc", e))?
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            &all
        }
    };
    for pid in pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = fs::read_link(fd.path()) else {
                continue;
            };
            if link.as_os_str() == target.as_str() {
                let Ok(num) = fd.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                return sys::steal_fd(*pid, num)
                    .map(Some)
                    .map_err(|e| DatapathError::io(format!("taking fd {num} of pid {pid}"), e));
            }
        }
    }
    Ok(None)
}

impl Datapath {
    /// Registers the listener of every proxy port in `ports` that has none yet
    /// (a proxy restart closes its sockets, which leaves the map). Returns the
    /// ports still without a listener.
    pub fn sync_proxy_listeners(&mut self, ports: &[u16], pids: Option<&[i32]>) -> Result<Vec<u16>> {
        let registered = self.proxy_ports_registered();
        let mut missing = Vec::new();
        for &port in ports {
            if registered.contains(&port) {
                continue;
            }
            match find_listener(port, pids)? {
                Some(fd) => self.register_proxy_socket(port, &fd)?,
                None => missing.push(port),
            }
        }
        Ok(missing)
    }
}
