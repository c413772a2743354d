//! Handing connections to the proxy: the sk_lookup program gives each L7
//! connection to the listening socket in the SOCKHASH under its proxy port.
//! Envoy opens its listeners itself; the agent takes a duplicate of each
//! (pidfd_getfd) to put it in the map, and keeps that duplicate.
//!
//! Keeping it is what makes an Envoy restart cost no connection: when
//! Envoy dies, its listening sockets live on through the agent's copies,
//! still in the map, so a SYN that arrives meanwhile completes into their
//! accept queues and waits. The next Envoy binds the same ports (the
//! listeners carry SO_REUSEPORT: the sockets form one reuseport group); as
//! its sockets appear the agent puts them in the map and closes its old
//! copies, and with `net.ipv4.tcp_migrate_req` the kernel moves the waiting
//! connections to the new sockets, where Envoy accepts them. Without it
//! they are reset (refused, not left hanging).
//!
//! A new socket on a port is noticed by its inode appearing among the
//! port's listeners (a sock_diag dump of LISTEN sockets); only then are Envoy's descriptors
//! searched, once for all such ports, so the cost does not grow with the
//! number of listeners while nothing changes. If no Envoy takes over a
//! port within [`ORPHAN_GRACE`], the agent lets its copy go, so clients are
//! refused instead of waiting for a proxy that does not come back.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use super::{Datapath, DatapathError, Result};
use crate::pidfd;

/// How long the agent keeps listening sockets no process but itself holds.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(10);

const MIGRATE_SYSCTL: &str = "net/ipv4/tcp_migrate_req";

/// The TCP listeners on `ports` in the current thread's network namespace:
/// port -> socket inodes.
fn listeners(ports: &BTreeSet<u16>) -> Result<BTreeMap<u16, BTreeSet<u64>>> {
    if ports.is_empty() {
        return Ok(BTreeMap::new());
    }
    let all = super::netlink::tcp_listeners().map_err(|e| DatapathError::io("listing TCP listeners (sock_diag)", e))?;
    let mut out: BTreeMap<u16, BTreeSet<u64>> = BTreeMap::new();
    for (port, inode) in all {
        if ports.contains(&port) {
            out.entry(port).or_default().insert(inode);
        }
    }
    Ok(out)
}

/// A socket found in a process, and that process (a pidfd, shared by the
/// sockets found in it).
struct Found {
    port: u16,
    inode: u64,
    fd: OwnedFd,
    owner: Arc<OwnedFd>,
}

/// Duplicates of the sockets with the given inodes, searched in the given
/// processes (or all of them) in one pass over their descriptors.
fn find_sockets(mut wanted: HashMap<u64, u16>, pids: Option<&[i32]>) -> Result<Vec<Found>> {
    let mut found = Vec::new();
    if wanted.is_empty() {
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
    let own = std::process::id() as i32;
    for pid in pids.iter().copied().filter(|p| *p != own) {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let mut owner: Option<Arc<OwnedFd>> = None;
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
            let Some(port) = wanted.remove(&inode) else {
                continue;
            };
            let Ok(num) = fd.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let pidfd = match &owner {
                Some(o) => o.clone(),
                None => {
                    let o = Arc::new(pidfd::open(pid).map_err(|e| DatapathError::io(format!("opening pid {pid}"), e))?);
                    owner = Some(o.clone());
                    o
                }
            };
            let sock = pidfd::get_fd(&pidfd, num)
                .map_err(|e| DatapathError::io(format!("taking fd {num} of pid {pid}"), e))?;
            found.push(Found { port, inode, fd: sock, owner: pidfd });
            if wanted.is_empty() {
                return Ok(found);
            }
        }
    }
    Ok(found)
}

/// The agent's copy of the socket registered for one proxy port, and the
/// process it came from.
struct Held {
    fd: OwnedFd,
    inode: u64,
    owner: Arc<OwnedFd>,
}

/// The proxy's listening sockets as the agent holds them.
#[derive(Default)]
pub struct Handoff {
    held: BTreeMap<u16, Held>,
    /// Each port's listeners at the last look, to notice new ones.
    seen: BTreeMap<u16, BTreeSet<u64>>,
    /// Since when some held sockets have had no live owner.
    orphaned_since: Option<Instant>,
}

/// What a pass of [`Datapath::sync_proxy_listeners`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxySync {
    /// Ports of the snapshot with no listening socket registered.
    pub missing: Vec<u16>,
    /// Ports whose socket's process is gone: their connections wait in the
    /// socket the agent holds for the next proxy.
    pub orphaned: Vec<u16>,
    /// Ports that moved to a new socket in this pass.
    pub moved: Vec<u16>,
}

/// Makes the kernel move connections waiting in a closed listener's queue
/// to another socket of its reuseport group (Linux 5.14), in the current
/// network namespace, through the sysctls below `sysctl_dir`. Returns whether it is on.
pub fn migrate_waiting_connections(sysctl_dir: &Path) -> bool {
    let path = sysctl_dir.join(MIGRATE_SYSCTL);
    if fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
        return true;
    }
    match fs::write(&path, "1") {
        Ok(()) => {
            tracing::info!(
                "net.ipv4.tcp_migrate_req=1: connections waiting for a restarting Envoy move to the new one"
            );
            true
        }
        Err(e) => {
            tracing::warn!(
                "cannot set net.ipv4.tcp_migrate_req=1 ({e}): connections that arrive while Envoy restarts will be reset; set it on the node"
            );
            false
        }
    }
}

impl Datapath {
    /// Keeps the map in step with the proxy's listeners for `ports`: a new
    /// socket on a port (a proxy that started, or reopened its listener)
    /// replaces the registered one, whose copy the agent then closes; ports
    /// no longer wanted are let go. `pids`: where to look for the proxy's
    /// sockets (every process when `None`).
    pub fn sync_proxy_listeners(&mut self, ports: &[u16], pids: Option<&[i32]>) -> Result<ProxySync> {
        let wanted: BTreeSet<u16> = ports.iter().copied().collect();
        let mut out = ProxySync::default();
        for port in self.proxy.held.keys().copied().filter(|p| !wanted.contains(p)).collect::<Vec<_>>() {
            self.release_proxy_port(port)?;
        }
        self.proxy.seen.retain(|p, _| wanted.contains(p));
        let now = listeners(&wanted)?;
        let registered: BTreeSet<u16> = self.proxy_ports_registered().into_iter().collect();
        let mut look_for = HashMap::new();
        for port in &wanted {
            let on_port = now.get(port).cloned().unwrap_or_default();
            let held = self.proxy.held.get(port).map(|h| h.inode);
            if self.proxy.seen.get(port) != Some(&on_port) || held.is_none() {
                for inode in on_port.iter().filter(|i| Some(**i) != held) {
                    look_for.insert(*inode, *port);
                }
            }
            self.proxy.seen.insert(*port, on_port);
        }
        let mut taken = BTreeSet::new();
        for f in find_sockets(look_for, pids)? {
            if !taken.insert(f.port) {
                continue; // one socket per port: the group shares its connections
            }
            self.register_proxy_socket(f.port, &f.fd)?;
            // Dropping the old copy closes it: the kernel moves its waiting
            // connections to the new socket.
            if self.proxy.held.insert(f.port, Held { fd: f.fd, inode: f.inode, owner: f.owner }).is_some() {
                out.moved.push(f.port);
            }
        }
        for port in &wanted {
            let Some(h) = self.proxy.held.get(port) else {
                out.missing.push(*port);
                continue;
            };
            let (fd, orphaned) = (h.fd.as_raw_fd(), pidfd::exited(&h.owner));
            if !registered.contains(port) && !taken.contains(port) {
                // Its entry went (the map was recreated, say): put it back.
                self.register_proxy_socket(*port, &fd)?;
            }
            if orphaned {
                out.orphaned.push(*port);
            }
        }
        if out.orphaned.is_empty() {
            self.proxy.orphaned_since = None;
        } else if self.proxy.orphaned_since.get_or_insert_with(Instant::now).elapsed() >= ORPHAN_GRACE {
            tracing::warn!(ports = ?out.orphaned, "no proxy took these ports over in {ORPHAN_GRACE:?}: refusing their connections");
            for port in std::mem::take(&mut out.orphaned) {
                self.release_proxy_port(port)?;
                out.missing.push(port);
            }
            self.proxy.orphaned_since = None;
        }
        out.missing.sort();
        Ok(out)
    }

    /// Whether the agent holds some proxy's listening socket (a port it
    /// must let go once no snapshot hands connections to it).
    pub fn holds_proxy_sockets(&self) -> bool {
        !self.proxy.held.is_empty()
    }

    /// Closes the agent's copy of a port's socket and forgets the port.
    fn release_proxy_port(&mut self, port: u16) -> Result<()> {
        if self.proxy.held.remove(&port).is_some() {
            // The entry goes with the socket; when another process still
            // holds the socket, it goes here.
            let _ = self.remove_proxy_socket(port);
        }
        self.proxy.seen.remove(&port);
        Ok(())
    }
}
