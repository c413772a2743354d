//! Proxy ports: one per listener that has no address of its own, picked at
//! random from 10000-20000 on this node, skipping ports in use and ports
//! released in the last five minutes, and kept across agent restarts (a
//! listener gets the port it had).

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    path::PathBuf,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// The range of allocated proxy ports.
pub const RANGE: std::ops::RangeInclusive<u16> = 10000..=20000;
/// How long a released port rests before it is handed out again.
pub const REUSE_DELAY: Duration = Duration::from_secs(300);

#[derive(Default, Serialize, Deserialize)]
struct Saved {
    /// listener name -> port
    allocated: BTreeMap<String, u16>,
    /// port -> released at (seconds since the epoch)
    released: BTreeMap<u16, u64>,
}

/// The allocator; persisted to `path` (if set) by [`ProxyPorts::flush`],
/// which every model build calls through [`ProxyPorts::release_others`].
pub struct ProxyPorts {
    saved: Saved,
    /// The ports in `saved.allocated`.
    used: std::collections::BTreeSet<u16>,
    /// Changed since the last save.
    dirty: bool,
    path: Option<PathBuf>,
    /// Checks whether a port is free on the node (tests replace it).
    free: Box<dyn Fn(u16) -> bool + Send>,
    /// Randomness for picks (tests replace it).
    seed: u64,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Whether nothing listens on the port on this node (in this namespace).
pub fn port_free(port: u16) -> bool {
    TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)).is_ok()
        && TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).is_ok()
}

impl ProxyPorts {
    /// Loads saved allocations from `path` (if it exists).
    pub fn load(path: Option<PathBuf>) -> Self {
        let saved = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1;
        Self::new(saved, path, Box::new(port_free), seed)
    }

    /// An allocator that treats every port as free and saves nothing (offline validation).
    pub fn ephemeral() -> Self {
        Self::new(Saved::default(), None, Box::new(|_| true), 0x9e37_79b9_7f4a_7c15)
    }

    fn new(saved: Saved, path: Option<PathBuf>, free: Box<dyn Fn(u16) -> bool + Send>, seed: u64) -> Self {
        let used = saved.allocated.values().copied().collect();
        Self { saved, used, dirty: false, path, free, seed }
    }

    #[cfg(test)]
    fn with_free(mut self, f: impl Fn(u16) -> bool + Send + 'static) -> Self {
        self.free = Box::new(f);
        self
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        self.seed ^= self.seed >> 12;
        self.seed ^= self.seed << 25;
        self.seed ^= self.seed >> 27;
        self.seed.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// The port of a listener: the one it had, else a fresh pick. Ports in
    /// `avoid` (pinned by other listeners) are never handed out; a listener
    /// whose port got pinned by another moves.
    pub fn allocate(&mut self, listener: &str, avoid: &std::collections::BTreeSet<u16>) -> Option<u16> {
        if let Some(p) = self.saved.allocated.get(listener) {
            if !avoid.contains(p) {
                return Some(*p);
            }
            if let Some(p) = self.saved.allocated.remove(listener) {
                self.used.remove(&p);
            }
            self.dirty = true;
        }
        let t = now();
        self.saved.released.retain(|_, at| t.saturating_sub(*at) < REUSE_DELAY.as_secs());
        let span = (*RANGE.end() - *RANGE.start()) as u64 + 1;
        let start = self.next_random() % span;
        for i in 0..span {
            let port = *RANGE.start() + ((start + i) % span) as u16;
            if self.used.contains(&port)
                || avoid.contains(&port)
                || self.saved.released.contains_key(&port)
                || !(self.free)(port)
            {
                continue;
            }
            self.saved.allocated.insert(listener.to_owned(), port);
            self.used.insert(port);
            self.dirty = true;
            return Some(port);
        }
        None
    }

    /// Gives back the ports of listeners not in `keep`, and saves.
    pub fn release_others(&mut self, keep: &std::collections::BTreeSet<String>) {
        let gone = self.saved.allocated.keys().filter(|k| !keep.contains(*k)).cloned().collect();
        self.release(&gone);
        self.flush();
    }

    /// Gives back the ports of these listeners (those that have one); saved
    /// by the next [`ProxyPorts::flush`].
    pub fn release(&mut self, listeners: &std::collections::BTreeSet<String>) {
        let t = now();
        for name in listeners {
            if let Some(p) = self.saved.allocated.remove(name) {
                self.used.remove(&p);
                self.saved.released.insert(p, t);
                self.dirty = true;
            }
        }
    }

    /// Saves the allocations if they changed.
    pub fn flush(&mut self) {
        if std::mem::take(&mut self.dirty) {
            self.save();
        }
    }

    /// Current allocations: listener -> port.
    pub fn allocations(&self) -> &BTreeMap<String, u16> {
        &self.saved.allocated
    }

    fn save(&self) {
        let Some(path) = &self.path else { return };
        let tmp = path.with_extension("tmp");
        let ok = serde_json::to_vec_pretty(&self.saved)
            .ok()
            .and_then(|b| std::fs::write(&tmp, b).ok())
            .and_then(|_| std::fs::rename(&tmp, path).ok());
        if ok.is_none() {
            tracing::warn!(path = %path.display(), "could not save proxy port allocations");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_skips_busy_and_delays_reuse() {
        let dir = std::env::temp_dir().join(format!("weft-ports-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ports.json");
        let mut a = ProxyPorts::load(Some(path.clone())).with_free(|p| p % 2 == 0);
        let none = Default::default();
        let p1 = a.allocate("ns/c/l1", &none).unwrap();
        assert!(RANGE.contains(&p1) && p1.is_multiple_of(2), "busy (odd) ports are skipped");
        assert_eq!(a.allocate("ns/c/l1", &none), Some(p1), "same listener, same port");
        let p2 = a.allocate("ns/c/l2", &none).unwrap();
        assert_ne!(p1, p2);
        a.flush();

        // A restarted agent finds the same ports.
        let mut b = ProxyPorts::load(Some(path.clone()));
        assert_eq!(b.allocate("ns/c/l1", &none), Some(p1));
        // Released ports rest before reuse.
        b.release_others(&["ns/c/l2".to_string()].into_iter().collect());
        let mut c = ProxyPorts::load(Some(path)).with_free(move |p| p == p1 || p == p1 + 2);
        let p3 = c.allocate("ns/c/l3", &none).unwrap();
        assert_ne!(p3, p1, "a just-released port is not handed out");
        // A listener whose port someone pinned moves.
        let pinned = [p3].into_iter().collect();
        assert_ne!(c.allocate("ns/c/l3", &pinned), Some(p3));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
