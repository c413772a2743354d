//! What the datapath saw of recent TCP connections, by their addresses, so
//! an HTTP exchange from Envoy's access log can carry the L3/L4 verdict and
//! path of the connections it travelled on (Hubble shows the two as
//! unrelated flows). Bounded: the oldest connections are forgotten first.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use fnv::FnvBuildHasher;
use weft_ebpf::abi;
use weft_flow::proto::flow::Verdict;

use super::record::{ConnLink, FlowRecord};

/// Observation points kept per connection.
const MAX_PATH: usize = 8;

type Key = (u32, u16, u32, u16);

fn key(client: SocketAddrV4, server: SocketAddrV4) -> Key {
    (u32::from(*client.ip()), client.port(), u32::from(*server.ip()), server.port())
}

/// How decisive a verdict is: a connection shows its strongest.
fn rank(v: Verdict) -> u8 {
    match v {
        Verdict::Dropped => 4,
        Verdict::Redirected => 3,
        Verdict::Forwarded => 2,
        Verdict::Translated => 1,
        _ => 0,
    }
}

/// See the module doc.
pub struct ConnTable {
    conns: HashMap<Key, ConnLink, FnvBuildHasher>,
    /// Connections handed to the proxy, by (client, proxy port): the proxy
    /// listens on loopback, so its access log names that as the local address.
    proxied: HashMap<(u32, u16, u16), Key, FnvBuildHasher>,
    order: VecDeque<Key>,
    capacity: usize,
}

impl ConnTable {
    pub fn new(capacity: usize) -> Self {
        ConnTable {
            conns: HashMap::default(),
            proxied: HashMap::default(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// Takes note of a datapath flow (TCP, client to server direction only).
    pub fn observe(&mut self, f: &FlowRecord) {
        let ev = &f.ev;
        if ev.proto != 6 || f.is_l7() || ev.flags as u32 & abi::EVF_REPLY != 0 || ev.r#type as u32 == abi::EV_SOCK {
            return;
        }
        let client = ev.src();
        let server = f.original_destination().unwrap_or_else(|| ev.dst());
        let k = key(client, server);
        if !self.conns.contains_key(&k) {
            if self.conns.len() >= self.capacity {
                while let Some(old) = self.order.pop_front() {
                    if let Some(l) = self.conns.remove(&old) {
                        if l.proxy_port != 0 {
                            self.proxied.remove(&(old.0, old.1, l.proxy_port));
                        }
                        break;
                    }
                }
            }
            self.order.push_back(k);
            self.conns.insert(k, ConnLink { client: Some(client), server: Some(server), ..Default::default() });
        }
        let link = self.conns.get_mut(&k).expect("just inserted");
        let verdict = f.verdict();
        match ev.r#type as u32 {
            abi::EV_POLICY => link.policy = Some((verdict != Verdict::Dropped, ev.policy_match)),
            _ => {
                // A drop, then the same connection handed to the proxy, is a
                // retransmission that got through (a SYN sent before the
                // proxy's socket was there, say): the connection shows what
                // it became. A drop after that still wins.
                let got_through = link.verdict == Verdict::Dropped && verdict == Verdict::Redirected;
                if got_through {
                    link.verdict = verdict;
                    link.drop_reason = 0;
                } else if rank(verdict) > rank(link.verdict) {
                    link.verdict = verdict;
                }
                if let Some(obs) = f.observation_point()
                    && link.path.len() < MAX_PATH
                    && !link.path.contains(&(obs as u8))
                {
                    link.path.push(obs as u8);
                }
            }
        }
        if verdict == Verdict::Dropped && ev.r#type as u32 == abi::EV_DROP {
            link.drop_reason = ev.subtype;
        }
        if ev.src_identity != 0 {
            link.src_identity = ev.src_identity;
        }
        if ev.dst_identity != 0 {
            link.dst_identity = ev.dst_identity;
        }
        if ev.proxy_port != 0 && link.proxy_port == 0 {
            link.proxy_port = ev.proxy_port;
            self.proxied.insert((k.0, k.1, ev.proxy_port), k);
        }
        if f.dst_svc.is_some() {
            link.frontend = Some(server);
        }
    }

    /// The datapath's view of the connection from `client` to `server`.
    pub fn link(&self, client: SocketAddrV4, server: SocketAddrV4) -> Option<&ConnLink> {
        self.conns.get(&key(client, server))
    }

    /// The connection from `client` the datapath handed to the proxy
    /// listening on `proxy_port`.
    pub fn proxied(&self, client: SocketAddrV4, proxy_port: u16) -> Option<&ConnLink> {
        let k = self.proxied.get(&(u32::from(*client.ip()), client.port(), proxy_port))?;
        self.conns.get(k)
    }

    /// The datapath's view of the connection an access-log entry came in
    /// on: `server` is the local address Envoy saw; a loopback one is the
    /// proxy's own listener, found by the port the datapath handed it to.
    pub fn downstream(&self, client: SocketAddrV4, server: SocketAddrV4) -> Option<&ConnLink> {
        if server.ip().is_loopback() { self.proxied(client, server.port()) } else { self.link(client, server) }
    }
}

/// Access-log entries held until the datapath's records show the
/// connection each came in on. Envoy writes an exchange to its log after
/// the connection's first packets went through the datapath, but the
/// records of those packets reach the flows thread through the ring
/// buffer's reader, which reads every few milliseconds and may be kept off
/// a busy node's cores for longer: an entry joined at once would then miss
/// its connection (an HTTP flow without the verdict and path). An entry
/// whose connection is known, or that names no connection, goes on at once
/// (unless entries before it wait: the order stays Envoy's); one whose
/// connection is not known waits up to `wait` (then goes on unjoined, as a
/// request the datapath did not see does), and at most `max` wait.
pub struct Held<T> {
    waiting: VecDeque<(Instant, T)>,
    wait: Duration,
    max: usize,
}

impl<T> Held<T> {
    pub fn new(wait: Duration, max: usize) -> Self {
        Held { waiting: VecDeque::new(), wait, max: max.max(1) }
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Takes an entry that arrived at `now`.
    pub fn push(&mut self, now: Instant, entry: T) {
        self.waiting.push_back((now, entry));
    }

    /// Hands on, in order, the entries that may go at `now`: `known` says
    /// whether an entry's connection is known (or it names none).
    pub fn ready(&mut self, now: Instant, known: impl Fn(&T) -> bool, mut out: impl FnMut(T)) {
        while let Some((at, e)) = self.waiting.front() {
            let over = self.waiting.len() > self.max;
            if !(over || known(e) || now.saturating_duration_since(*at) >= self.wait) {
                break;
            }
            if let Some((_, e)) = self.waiting.pop_front() {
                out(e);
            }
        }
    }

    /// Hands on every entry (the pipeline stops).
    pub fn drain(&mut self, out: impl FnMut(T)) {
        self.waiting.drain(..).map(|(_, e)| e).for_each(out);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::pipeline::record::ServiceInfo;

    /// Entries go on in order: at once when their connection is known, after
    /// the wait when not, never past one that still waits; at most `max`
    /// wait, and all go when the pipeline stops.
    #[test]
    fn held_entries_go_on_in_order_once_known_or_after_the_wait() {
        let (t0, wait) = (Instant::now(), Duration::from_millis(100));
        let mut h = Held::new(wait, 3);
        let known = |e: &(u32, bool)| e.1;
        let mut out = Vec::new();
        h.push(t0, (1, true));
        h.ready(t0, known, |e| out.push(e.0));
        assert_eq!(out, [1]);
        h.push(t0, (2, false));
        h.push(t0, (3, true));
        h.ready(t0 + wait / 2, known, |e| out.push(e.0));
        assert_eq!(out, [1], "3 is known but goes after 2");
        h.ready(t0 + wait, known, |e| out.push(e.0));
        assert_eq!(out, [1, 2, 3]);
        for i in 4..=7 {
            h.push(t0 + wait, (i, false));
        }
        h.ready(t0 + wait, known, |e| out.push(e.0));
        assert_eq!(out, [1, 2, 3, 4], "no more than three wait");
        h.drain(|e| out.push(e.0));
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7]);
        assert!(h.is_empty());
    }

    fn ev(t: u32, sub: u32, src: &str, dst: &str) -> FlowRecord {
        let a: SocketAddrV4 = src.parse().unwrap();
        let b: SocketAddrV4 = dst.parse().unwrap();
        FlowRecord {
            ev: abi::Event {
                r#type: t as u8,
                subtype: sub as u8,
                saddr: u32::from_ne_bytes(a.ip().octets()),
                daddr: u32::from_ne_bytes(b.ip().octets()),
                sport: a.port().to_be(),
                dport: b.port().to_be(),
                proto: 6,
                src_identity: 70001,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_redirected_connection_keeps_its_path_and_verdict() {
        let mut t = ConnTable::new(16);
        let mut from = ev(abi::EV_TRACE, abi::OBS_FROM_ENDPOINT, "10.1.1.5:40000", "10.96.0.10:80");
        from.dst_svc = Some(Arc::new(ServiceInfo::default()));
        let mut to_proxy = ev(abi::EV_TRACE, abi::OBS_TO_PROXY, "10.1.1.5:40000", "10.96.0.10:80");
        to_proxy.ev.proxy_port = 15001;
        t.observe(&from);
        t.observe(&to_proxy);
        t.observe(&from);
        let l = t.link("10.1.1.5:40000".parse().unwrap(), "10.96.0.10:80".parse().unwrap()).unwrap();
        assert_eq!(l.verdict, Verdict::Redirected);
        assert_eq!(l.path, [abi::OBS_FROM_ENDPOINT as u8, abi::OBS_TO_PROXY as u8]);
        assert_eq!(l.proxy_port, 15001);
        assert_eq!(l.frontend, Some("10.96.0.10:80".parse().unwrap()));
        assert_eq!(l.src_identity, 70001);
        // Envoy names its loopback listener as the local address.
        let p = t.proxied("10.1.1.5:40000".parse().unwrap(), 15001).unwrap();
        assert_eq!(p.server, Some("10.96.0.10:80".parse().unwrap()));
        assert!(t.proxied("10.1.1.5:40000".parse().unwrap(), 15002).is_none());
    }

    #[test]
    fn a_retransmission_that_reaches_the_proxy_after_a_drop_shows_the_connection_redirected() {
        let mut t = ConnTable::new(16);
        let (c, s) = ("10.1.1.5:40010", "10.96.0.10:80");
        t.observe(&ev(abi::EV_DROP, abi::DROP_PROXY_LOOKUP_FAILED, c, s));
        let link = |t: &ConnTable| {
            let l = t.link(c.parse().unwrap(), s.parse().unwrap()).unwrap();
            (l.verdict, l.drop_reason as u32)
        };
        assert_eq!(link(&t), (Verdict::Dropped, abi::DROP_PROXY_LOOKUP_FAILED));
        let mut to_proxy = ev(abi::EV_TRACE, abi::OBS_TO_PROXY, c, s);
        to_proxy.ev.proxy_port = 15001;
        t.observe(&to_proxy);
        assert_eq!(link(&t), (Verdict::Redirected, 0));
        // Dropped later (a policy change, say): the drop wins again.
        t.observe(&ev(abi::EV_DROP, abi::DROP_POLICY_DENIED, c, s));
        assert_eq!(link(&t), (Verdict::Dropped, abi::DROP_POLICY_DENIED));
    }

    #[test]
    fn translated_connections_are_keyed_by_the_service_address_and_the_oldest_go_first() {
        let mut t = ConnTable::new(2);
        let mut dnat = ev(abi::EV_TRACE, abi::OBS_TO_ENDPOINT, "10.1.1.5:40001", "10.1.2.6:8080");
        dnat.ev.flags = abi::EVF_XLATED_DST as u8;
        dnat.ev.orig_addr = u32::from_ne_bytes([10, 96, 0, 10]);
        dnat.ev.orig_port = 80u16.to_be();
        t.observe(&dnat);
        assert!(t.link("10.1.1.5:40001".parse().unwrap(), "10.96.0.10:80".parse().unwrap()).is_some());
        t.observe(&ev(abi::EV_TRACE, abi::OBS_TO_ENDPOINT, "10.1.1.5:40002", "10.1.2.6:8080"));
        t.observe(&ev(abi::EV_TRACE, abi::OBS_TO_ENDPOINT, "10.1.1.5:40003", "10.1.2.6:8080"));
        assert_eq!(t.len(), 2);
        assert!(t.link("10.1.1.5:40001".parse().unwrap(), "10.96.0.10:80".parse().unwrap()).is_none());
        let mut denied = ev(abi::EV_POLICY, abi::POLICY_DENY, "10.1.1.5:40003", "10.1.2.6:8080");
        denied.ev.policy_match = 0;
        t.observe(&denied);
        t.observe(&ev(abi::EV_DROP, abi::DROP_POLICY_DENIED, "10.1.1.5:40003", "10.1.2.6:8080"));
        let l = t.link("10.1.1.5:40003".parse().unwrap(), "10.1.2.6:8080".parse().unwrap()).unwrap();
        assert_eq!(
            (l.verdict, l.policy, l.drop_reason as u32),
            (Verdict::Dropped, Some((false, 0)), abi::DROP_POLICY_DENIED)
        );
    }
}
