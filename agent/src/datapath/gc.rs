//! Expiring connection-tracking state. LRU maps bound the memory; this keeps
//! closed and idle connections from crowding out live ones.

use aya::maps::MapError;
use weft_ebpf::abi;

use super::{Datapath, DatapathError, Result};

const SEC: u64 = 1_000_000_000;
/// A TCP connection that saw FIN or RST.
const TCP_CLOSING: u64 = 10 * SEC;
/// A TCP connection that never got an answer.
const TCP_SYN: u64 = 60 * SEC;
/// An idle established TCP connection.
const TCP_ESTABLISHED: u64 = 6 * 3600 * SEC;
/// UDP and ICMP flows.
const DATAGRAM: u64 = 60 * SEC;

/// What one collection pass removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub scanned: usize,
    pub conntrack_removed: usize,
    pub lb_removed: usize,
}

/// CLOCK_MONOTONIC in ns, the clock of bpf_ktime_get_ns().
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * SEC + ts.tv_nsec as u64
}

fn expired(e: &abi::CtEntry, key: &abi::CtKey, now: u64) -> bool {
    let idle = now.saturating_sub(e.last_seen_ns);
    if key.proto != 6 {
        return idle > DATAGRAM;
    }
    if e.flags as u32 & abi::CT_CLOSING != 0 {
        return idle > TCP_CLOSING;
    }
    if e.seen_reply == 0 {
        return idle > TCP_SYN;
    }
    idle > TCP_ESTABLISHED
}

fn ignore_missing(map: &'static str, r: Result<(), MapError>) -> Result<()> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(DatapathError::Map { map, source: Box::new(e) }),
    }
}

impl Datapath {
    /// Removes expired connections, then service translations whose
    /// connection is gone.
    pub fn gc(&mut self) -> Result<GcStats> {
        let now = monotonic_ns();
        let mut stats = GcStats::default();
        let mut dead = Vec::new();
        for item in self.maps.ct.iter() {
            let Ok((k, e)) = item else { continue }; // entries can vanish under us
            stats.scanned += 1;
            if expired(&e, &k, now) {
                dead.push(k);
            }
        }
        for k in &dead {
            ignore_missing("weft_ct", self.maps.ct.remove(k))?;
        }
        stats.conntrack_removed = dead.len();

        let mut stale = Vec::new();
        for item in self.maps.lb.iter() {
            let Ok((k, lb)) = item else { continue };
            if now.saturating_sub(lb.last_seen_ns) < DATAGRAM {
                continue;
            }
            let conn = abi::CtKey {
                saddr: if lb.nat_addr != 0 { lb.nat_addr } else { k.saddr },
                daddr: lb.backend_addr,
                sport: if lb.nat_addr != 0 { lb.nat_port } else { k.sport },
                dport: lb.backend_port,
                proto: k.proto,
                scope: abi::CT_SCOPE_CONN as u8,
                _pad: 0,
            };
            if self.maps.ct.get(&conn, 0).is_err() {
                stale.push(k);
            }
        }
        for k in &stale {
            ignore_missing("weft_lb", self.maps.lb.remove(k))?;
        }
        stats.lb_removed = stale.len();
        Ok(stats)
    }
}
