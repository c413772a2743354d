//! Finding the proxy's listening sockets so sk_lookup can hand connections to
//! them. Envoy opens its listeners itself; the agent takes a duplicate of the
//! fd (pidfd_getfd) of whichever process listens on 127.0.0.1:<proxy port> in
//! this network namespace.

use std::{
    collections::{BTreeSet, HashMap},
    fs,
    os::fd::OwnedFd,
};

use super::{Datapath, DatapathError, Result, sys};

/// The socket inodes of the TCP listeners on `ports` in the current thread's
/// network namespace: inode -> port.
fn listener_inodes(ports: &BTreeSet<u16>) -> Result<HashMap<u64, u16>> {
    let tcp = fs::read_to_string("/proc/thread-self/net/tcp")
        .map_err(|e| DatapathError::io("reading /proc/thread-self/net/tcp", e))?;
    let mut out = HashMap::new();
    for line in tcp.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != "0A" {
            continue; // 0A = LISTEN
        }
        let Some(port) = f[1].split_once(':').and_then(|(_, p)| u16::from_str_radix(p, 16).ok()) else {
            continue;
        };
        if ports.contains(&port)
            && let Ok(inode) = f[9].parse()
        {
            out.insert(inode, port);
        }
    }
    Ok(out)
}

/// Duplicates of the listening sockets on `ports`, searched in the given
/// processes (or all of them) in one pass over their file descriptors: with
/// thousands of listeners, one search per port would read every fd of Envoy
/// once per port.
pub fn find_listeners(ports: &[u16], pids: Option<&[i32]>) -> Result<Vec<(u16, OwnedFd)>> {
    let mut inodes = listener_inodes(&ports.iter().copied().collect())?;
    let mut found = Vec::new();
    if inodes.is_empty() {
        return Ok(found);
    }
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
            let Some(inode) = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:[")?.strip_suffix(']'))
                .and_then(|i| i.parse::<u64>().ok())
            else {
                continue;
            };
            let Some(port) = inodes.remove(&inode) else {
                continue;
            };
            let Ok(num) = fd.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let sock =
                sys::steal_fd(*pid, num).map_err(|e| DatapathError::io(format!("taking fd {num} of pid {pid}"), e))?;
            found.push((port, sock));
            if inodes.is_empty() {
                return Ok(found);
            }
        }
    }
    Ok(found)
}

impl Datapath {
    /// Registers the listener of every proxy port in `ports` that has none yet
    /// (a proxy restart closes its sockets, which leaves the map). Returns the
    /// ports still without a listener.
    pub fn sync_proxy_listeners(&mut self, ports: &[u16], pids: Option<&[i32]>) -> Result<Vec<u16>> {
        let registered: BTreeSet<u16> = self.proxy_ports_registered().into_iter().collect();
        let wanted: Vec<u16> = ports.iter().copied().filter(|p| !registered.contains(p)).collect();
        let mut missing: BTreeSet<u16> = wanted.iter().copied().collect();
        for (port, fd) in find_listeners(&wanted, pids)? {
            self.register_proxy_socket(port, &fd)?;
            missing.remove(&port);
        }
        Ok(missing.into_iter().collect())
    }
}
