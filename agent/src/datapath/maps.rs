//! Typed access to the pinned maps, and the in-memory shadow of what the agent
//! wrote (recovered from the maps on start, so ids stay stable across restarts).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    net::Ipv4Addr,
    os::fd::AsRawFd,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, MapError, PerCpuArray, RingBuf, SockHash, lpm_trie::Key},
};
use weft_ebpf::abi;

use super::{Datapath, DatapathError, EventStats, Result, types::*};

pub(crate) struct Maps {
    pub config: Array<MapData, abi::Config>,
    pub services: HashMap<MapData, abi::SvcKey, abi::SvcVal>,
    pub backends: HashMap<MapData, u32, abi::Backend>,
    pub endpoints: HashMap<MapData, u32, abi::Endpoint>,
    pub ipcache: LpmTrie<MapData, u32, abi::IpcacheVal>,
    pub policy: LpmTrie<MapData, abi::PolicyMatch, abi::PolicyVal>,
    pub ct: HashMap<MapData, abi::CtKey, abi::CtEntry>,
    pub lb: HashMap<MapData, abi::CtKey, abi::LbEntry>,
    pub proxy_socks: SockHash<MapData, u32>,
    pub stats: PerCpuArray<MapData, u64>,
    pub events: Option<RingBuf<MapData>>,
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<T> {
    let map = ebpf.take_map(name).ok_or_else(|| DatapathError::Invalid(format!("BPF object has no map {name}")))?;
    T::try_from(map).map_err(|e| DatapathError::Map { map: name, source: Box::new(e) })
}

impl Maps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self> {
        Ok(Self {
            config: take(ebpf, "weft_config")?,
            services: take(ebpf, "weft_services")?,
            backends: take(ebpf, "weft_backends")?,
            endpoints: take(ebpf, "weft_endpoints")?,
            ipcache: take(ebpf, "weft_ipcache")?,
            policy: take(ebpf, "weft_policy")?,
            ct: take(ebpf, "weft_ct")?,
            lb: take(ebpf, "weft_lb")?,
            proxy_socks: take(ebpf, "weft_proxy_socks")?,
            stats: take(ebpf, "weft_event_stats")?,
            events: Some(take(ebpf, "weft_events")?),
        })
    }

    pub fn event_stats(&self) -> Result<EventStats> {
        let read = |idx: u32| -> Result<u64> {
            let values = self
                .stats
                .get(&idx, 0)
                .map_err(|e| DatapathError::Map { map: "weft_event_stats", source: Box::new(e) })?;
            Ok(values.iter().sum())
        };
        let lost_per_cpu: Vec<u64> = self
            .stats
            .get(&abi::STAT_LOST, 0)
            .map_err(|e| DatapathError::Map { map: "weft_event_stats", source: Box::new(e) })?
            .iter()
            .copied()
            .collect();
        Ok(EventStats { emitted: read(abi::STAT_EMITTED)?, lost: lost_per_cpu.iter().sum(), lost_per_cpu })
    }
}

/// Network-order helpers: the maps hold addresses and ports as on the wire.
pub(crate) fn be_addr(a: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(a.octets())
}
pub(crate) fn host_addr(raw: u32) -> Ipv4Addr {
    Ipv4Addr::from(raw.to_ne_bytes())
}
pub(crate) fn be_port(p: u16) -> u16 {
    p.to_be()
}
pub(crate) fn host_port(raw: u16) -> u16 {
    u16::from_be(raw)
}

/// Maps an insert failure to MapFull when the kernel says the map has no room.
fn insert_err(map: &'static str, key: &'static str, max_entries: u32, e: MapError) -> DatapathError {
    if let MapError::SyscallError(sys) = &e
        && matches!(sys.io_error.raw_os_error(), Some(libc::E2BIG) | Some(libc::ENOSPC))
    {
        return DatapathError::MapFull { map, key, max_entries };
    }
    DatapathError::Map { map, source: Box::new(e) }
}

fn remove_err(map: &'static str, e: MapError) -> Result<()> {
    match e {
        MapError::KeyNotFound => Ok(()),
        MapError::SyscallError(ref s) if s.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        e => Err(DatapathError::Map { map, source: Box::new(e) }),
    }
}

type FeKey = (u32, u16, u8);

fn fe_key(k: &abi::SvcKey) -> FeKey {
    (k.addr, k.port, k.proto)
}

fn master_key(fe: &FeKey) -> abi::SvcKey {
    abi::SvcKey { addr: fe.0, port: fe.1, slot: 0, proto: fe.2, _pad: [0; 3] }
}

/// A service frontend as written: its id and the backend id in each slot.
#[derive(Clone, Debug, Default)]
struct WrittenService {
    id: u32,
    slots: Vec<u32>,
}

/// What the agent has written, mirrored in memory.
#[derive(Default)]
pub(crate) struct Shadow {
    /// Keyed by the frontend: (addr, port, proto) as in the map.
    services: BTreeMap<FeKey, WrittenService>,
    /// Entries of `weft_services` the frontends above hold (one master and
    /// one per slot each), to know before writing whether a frontend fits.
    service_entries: usize,
    next_service_id: u32,
    /// (addr, port, proto) -> (id, references from service slots)
    backends: StdHashMap<(u32, u16, u8), (u32, u32)>,
    next_backend_id: u32,
    endpoints: BTreeMap<u32, abi::Endpoint>,
    /// Trie entries written for each endpoint.
    policy: StdHashMap<u16, super::policy::Held>,
}

impl Shadow {
    /// Rebuilds the shadow from the pinned maps of an earlier run.
    pub fn recover(maps: &Maps) -> Result<Self> {
        let mut s = Shadow { next_service_id: 1, next_backend_id: 1, ..Default::default() };
        let mut backend_by_id = StdHashMap::new();
        for item in maps.backends.iter() {
            let (id, b) = item.map_err(|e| DatapathError::Map { map: "weft_backends", source: Box::new(e) })?;
            backend_by_id.insert(id, (b.addr, b.port, b.proto));
            s.next_backend_id = s.next_backend_id.max(id + 1);
        }
        let mut slots: BTreeMap<FeKey, BTreeMap<u16, u32>> = BTreeMap::new();
        let mut masters = BTreeMap::new();
        for item in maps.services.iter() {
            let (k, v) = item.map_err(|e| DatapathError::Map { map: "weft_services", source: Box::new(e) })?;
            let master = fe_key(&k);
            if k.slot == 0 {
                masters.insert(master, v);
                s.next_service_id = s.next_service_id.max(v.backend_id + 1);
            } else {
                slots.entry(master).or_default().insert(k.slot, v.backend_id);
            }
        }
        for (key, master) in masters {
            let ids: Vec<u32> = slots
                .get(&key)
                .map(|m| (1..=master.count).filter_map(|i| m.get(&i).copied()).collect())
                .unwrap_or_default();
            for id in &ids {
                if let Some(b) = backend_by_id.get(id) {
                    s.backends.entry(*b).or_insert((*id, 0)).1 += 1;
                }
            }
            s.service_entries += 1 + ids.len();
            s.services.insert(key, WrittenService { id: master.backend_id, slots: ids });
        }
        for item in maps.endpoints.iter() {
            let (addr, ep) = item.map_err(|e| DatapathError::Map { map: "weft_endpoints", source: Box::new(e) })?;
            s.endpoints.insert(addr, ep);
        }
        for item in maps.policy.iter() {
            let (k, v) = item.map_err(|e| DatapathError::Map { map: "weft_policy", source: Box::new(e) })?;
            s.policy.entry(k.data().ep_id).or_default().insert((k.prefix_len(), k.data()), v);
        }
        Ok(s)
    }

    pub fn frontend_count(&self) -> usize {
        self.services.len()
    }

    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }
}

fn svc_key(f: &Frontend, slot: u16) -> abi::SvcKey {
    abi::SvcKey { addr: be_addr(f.addr), port: be_port(f.port), slot, proto: f.proto.number(), _pad: [0; 3] }
}

fn frontend_of(k: &abi::SvcKey, flags: u8) -> Frontend {
    let kind = if flags as u32 & abi::SVC_NODEPORT != 0 {
        FrontendKind::NodePort
    } else if flags as u32 & abi::SVC_EXTERNAL != 0 {
        FrontendKind::External
    } else {
        FrontendKind::ClusterIp
    };
    Frontend {
        addr: host_addr(k.addr),
        port: host_port(k.port),
        proto: Proto::from_number(k.proto).unwrap_or(Proto::Tcp),
        kind,
    }
}

impl Datapath {
    /// Entries and capacity of the maps that fill up: (config key, entries, capacity).
    pub fn map_usage(&self) -> Vec<(&'static str, u64, u64)> {
        let m = &self.maps;
        let counts = [
            ("services", m.services.keys().count()),
            ("backends", m.backends.keys().count()),
            ("endpoints", m.endpoints.keys().count()),
            ("ipcache", m.ipcache.keys().count()),
            ("policy", m.policy.keys().count()),
            ("conntrack", m.ct.keys().count()),
            ("lb", m.lb.keys().count()),
        ];
        counts.into_iter().map(|(k, n)| (k, n as u64, self.size(k) as u64)).collect()
    }

    fn size(&self, key: &'static str) -> u32 {
        self.cfg.map_sizes.shapes().iter().find(|s| s.1 == key).map(|s| s.4).unwrap_or(0)
    }

    /// Writes a frontend with its backends (or its proxy port). Backends are
    /// written before the frontend's count grows and removed after it shrinks,
    /// so the datapath never picks an empty slot.
    pub fn upsert_service(&mut self, entry: &ServiceEntry) -> Result<()> {
        let f = &entry.frontend;
        if f.proto == Proto::Icmp {
            return Err(DatapathError::Invalid(format!("service frontend {f}: ICMP has no ports")));
        }
        if entry.backends.len() > u16::MAX as usize - 1 {
            return Err(DatapathError::Invalid(format!("service frontend {f}: too many backends")));
        }
        let key0 = svc_key(f, 0);
        let fe = fe_key(&key0);
        let old = self.state.services.get(&fe).cloned();
        self.check_service_room(entry, old.as_ref())?;
        let id = match &old {
            Some(w) => w.id,
            None => {
                let id = self.state.next_service_id;
                self.state.next_service_id += 1;
                id
            }
        };

        let mut ids = Vec::with_capacity(entry.backends.len());
        for b in &entry.backends {
            match self.acquire_backend(b, f.proto) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    // Nothing refers to what was acquired so far: give it back.
                    for id in ids {
                        self.release_backend(id)?;
                    }
                    return Err(e);
                }
            }
        }
        for (i, bid) in ids.iter().enumerate() {
            let k = svc_key(f, i as u16 + 1);
            let v = abi::SvcVal { backend_id: *bid, ..Default::default() };
            let max = self.size("services");
            self.maps.services.insert(k, v, 0).map_err(|e| insert_err("weft_services", "services", max, e))?;
        }
        let mut flags = match f.kind {
            FrontendKind::ClusterIp => 0,
            FrontendKind::NodePort => abi::SVC_NODEPORT,
            FrontendKind::External => abi::SVC_EXTERNAL,
        } as u8;
        if entry.proxy_port.is_some() {
            flags |= abi::SVC_L7 as u8;
        }
        let master = abi::SvcVal {
            backend_id: id,
            count: ids.len() as u16,
            proxy_port: entry.proxy_port.unwrap_or(0),
            flags,
            _pad: [0; 3],
        };
        let max = self.size("services");
        self.maps.services.insert(key0, master, 0).map_err(|e| insert_err("weft_services", "services", max, e))?;

        if let Some(old) = old {
            self.state.service_entries -= 1 + old.slots.len();
            for slot in ids.len() + 1..=old.slots.len() {
                if let Err(e) = self.maps.services.remove(&svc_key(f, slot as u16)) {
                    remove_err("weft_services", e)?;
                }
            }
            for bid in old.slots {
                self.release_backend(bid)?;
            }
        }
        self.state.service_entries += 1 + ids.len();
        self.state.services.insert(fe, WrittenService { id, slots: ids });
        Ok(())
    }

    /// Whether a frontend fits in `weft_services` and its new backends in
    /// `weft_backends`, checked before anything is written: a frontend is
    /// written whole or not at all (the maps hold only what the agent
    /// wrote, so the shadow's counts are theirs).
    fn check_service_room(&self, entry: &ServiceEntry, old: Option<&WrittenService>) -> Result<()> {
        let full = |map, key| DatapathError::MapFull { map, key, max_entries: self.size(key) };
        let old_entries = old.map_or(0, |w| 1 + w.slots.len());
        let after = self.state.service_entries - old_entries + 1 + entry.backends.len();
        if after > self.size("services") as usize && after > self.state.service_entries {
            return Err(full("weft_services", "services"));
        }
        let proto = entry.frontend.proto.number();
        let new_backends: BTreeSet<_> = entry
            .backends
            .iter()
            .map(|b| (be_addr(b.addr), be_port(b.port), proto))
            .filter(|k| !self.state.backends.contains_key(k))
            .collect();
        if self.state.backends.len() + new_backends.len() > self.size("backends") as usize {
            return Err(full("weft_backends", "backends"));
        }
        Ok(())
    }

    /// Removes a frontend; its connections in flight keep their backend until they end.
    pub fn delete_service(&mut self, f: &Frontend) -> Result<()> {
        let key0 = svc_key(f, 0);
        let Some(old) = self.state.services.remove(&fe_key(&key0)) else {
            return Ok(());
        };
        self.state.service_entries -= 1 + old.slots.len();
        if let Err(e) = self.maps.services.remove(&key0) {
            remove_err("weft_services", e)?;
        }
        for slot in 1..=old.slots.len() {
            if let Err(e) = self.maps.services.remove(&svc_key(f, slot as u16)) {
                remove_err("weft_services", e)?;
            }
        }
        for bid in old.slots {
            self.release_backend(bid)?;
        }
        Ok(())
    }

    /// The proxy port a frontend's connections are handed to as the map
    /// holds it now (None: not written, or forwarded to its backends).
    pub fn written_proxy_port(&self, f: &Frontend) -> Option<u16> {
        let v = self.maps.services.get(&svc_key(f, 0), 0).ok()?;
        (v.flags as u32 & abi::SVC_L7 != 0).then_some(v.proxy_port)
    }

    /// The frontends currently written.
    pub fn frontends(&self) -> Result<Vec<Frontend>> {
        self.state
            .services
            .keys()
            .map(|fe| {
                let k = master_key(fe);
                let v = self
                    .maps
                    .services
                    .get(&k, 0)
                    .map_err(|e| DatapathError::Map { map: "weft_services", source: Box::new(e) })?;
                Ok(frontend_of(&k, v.flags))
            })
            .collect()
    }

    fn acquire_backend(&mut self, b: &BackendAddr, proto: Proto) -> Result<u32> {
        let key = (be_addr(b.addr), be_port(b.port), proto.number());
        if let Some((id, refs)) = self.state.backends.get_mut(&key) {
            *refs += 1;
            return Ok(*id);
        }
        let id = self.state.next_backend_id;
        let v = abi::Backend { addr: key.0, port: key.1, proto: key.2, flags: 0 };
        let max = self.size("backends");
        self.maps.backends.insert(id, v, 0).map_err(|e| insert_err("weft_backends", "backends", max, e))?;
        self.state.next_backend_id += 1;
        self.state.backends.insert(key, (id, 1));
        Ok(id)
    }

    fn release_backend(&mut self, id: u32) -> Result<()> {
        let Some(key) = self.state.backends.iter().find(|(_, (bid, _))| *bid == id).map(|(k, _)| *k) else {
            return Ok(());
        };
        let entry = self.state.backends.get_mut(&key).expect("found above");
        entry.1 -= 1;
        if entry.1 == 0 {
            self.state.backends.remove(&key);
            if let Err(e) = self.maps.backends.remove(&id) {
                remove_err("weft_backends", e)?;
            }
        }
        Ok(())
    }

    /// An endpoint id for a pod address: the one it has, or the lowest free one.
    pub fn endpoint_id_for(&self, addr: Ipv4Addr) -> u16 {
        if let Some(ep) = self.state.endpoints.get(&be_addr(addr)) {
            return ep.ep_id;
        }
        let used: BTreeSet<u16> = self.state.endpoints.values().map(|e| e.ep_id).collect();
        (1..=u16::MAX).find(|i| !used.contains(i)).unwrap_or(u16::MAX)
    }

    /// Writes a local pod.
    pub fn upsert_endpoint(&mut self, ep: &EndpointEntry) -> Result<()> {
        let v = abi::Endpoint {
            ifindex: ep.ifindex,
            identity: ep.identity,
            ep_id: ep.ep_id,
            flags: (if ep.policy_ingress { abi::EP_POLICY_INGRESS as u8 } else { 0 })
                | (if ep.policy_egress { abi::EP_POLICY_EGRESS as u8 } else { 0 }),
            _pad: 0,
        };
        let key = be_addr(ep.addr);
        let max = self.size("endpoints");
        self.maps.endpoints.insert(key, v, 0).map_err(|e| insert_err("weft_endpoints", "endpoints", max, e))?;
        self.state.endpoints.insert(key, v);
        Ok(())
    }

    /// Removes a local pod and its policy entries.
    pub fn delete_endpoint(&mut self, addr: Ipv4Addr) -> Result<()> {
        let key = be_addr(addr);
        if let Some(ep) = self.state.endpoints.remove(&key) {
            self.set_policy(ep.ep_id, &[])?;
        }
        if let Err(e) = self.maps.endpoints.remove(&key) {
            remove_err("weft_endpoints", e)?;
        }
        Ok(())
    }

    /// The local pods currently written.
    pub fn endpoints(&self) -> Vec<EndpointEntry> {
        self.state
            .endpoints
            .iter()
            .map(|(addr, e)| EndpointEntry {
                addr: host_addr(*addr),
                ifindex: e.ifindex,
                identity: e.identity,
                ep_id: e.ep_id,
                policy_ingress: e.flags as u32 & abi::EP_POLICY_INGRESS != 0,
                policy_egress: e.flags as u32 & abi::EP_POLICY_EGRESS != 0,
            })
            .collect()
    }

    /// Writes what the datapath knows about an address or prefix.
    pub fn upsert_ipcache(&mut self, e: &IpcacheEntry) -> Result<()> {
        let mut flags = 0u8;
        if e.local {
            flags |= abi::IPC_LOCAL as u8;
        }
        if e.node {
            flags |= abi::IPC_NODE as u8;
        }
        let v = abi::IpcacheVal {
            identity: e.identity,
            node_addr: e.node_addr.map(be_addr).unwrap_or(0),
            flags,
            _pad: [0; 3],
        };
        let max = self.size("ipcache");
        self.maps
            .ipcache
            .insert(&Key::new(e.prefix_len as u32, be_addr(e.addr)), v, 0)
            .map_err(|err| insert_err("weft_ipcache", "ipcache", max, err))
    }

    /// Forgets an address or prefix.
    pub fn delete_ipcache(&mut self, addr: Ipv4Addr, prefix_len: u8) -> Result<()> {
        match self.maps.ipcache.remove(&Key::new(prefix_len as u32, be_addr(addr))) {
            Ok(()) => Ok(()),
            Err(e) => remove_err("weft_ipcache", e),
        }
    }

    /// Every ipcache entry, as (address, prefix length, identity).
    pub fn ipcache_entries(&self) -> Result<Vec<(Ipv4Addr, u8, u32)>> {
        self.maps
            .ipcache
            .iter()
            .map(|item| {
                let (k, v) = item.map_err(|e| DatapathError::Map { map: "weft_ipcache", source: Box::new(e) })?;
                Ok((host_addr(k.data()), k.prefix_len() as u8, v.identity))
            })
            .collect()
    }

    /// Replaces the policy entries (both directions) of a local endpoint,
    /// in an order that never lets through, between two writes, what both
    /// the old and the new entries refuse (see [`super::policy::replace`]).
    /// If `weft_policy` fills up, what does not fit is left out, allows
    /// before denies (an enforcing endpoint then refuses more than its
    /// policy says rather than less, until room frees up), and the error
    /// says the map is full; what was written stays, and is known.
    pub fn set_policy(&mut self, ep_id: u16, entries: &[PolicyEntry]) -> Result<()> {
        let slots = super::policy::slots(ep_id, entries);
        let mut held = self.state.policy.remove(&ep_id).unwrap_or_default();
        let max_entries = self.size("policy");
        let result =
            super::policy::replace(&mut PolicyMap { map: &mut self.maps.policy, max_entries }, &mut held, &slots);
        if !held.is_empty() {
            self.state.policy.insert(ep_id, held);
        }
        result
    }

    /// Hands the proxy's listening socket for `port` to the sk_lookup program.
    pub fn register_proxy_socket(&mut self, port: u16, socket: &impl AsRawFd) -> Result<()> {
        let max = self.size("proxy-sockets");
        self.maps
            .proxy_socks
            .insert(port as u32, socket.as_raw_fd(), 0)
            .map_err(|e| insert_err("weft_proxy_socks", "proxy-sockets", max, e))
    }

    /// Forgets the listener of a proxy port.
    pub fn remove_proxy_socket(&mut self, port: u16) -> Result<()> {
        match self.maps.proxy_socks.remove(&(port as u32)) {
            Ok(()) => Ok(()),
            Err(e) => remove_err("weft_proxy_socks", e),
        }
    }

    /// Proxy ports whose listener is registered.
    pub fn proxy_ports_registered(&self) -> Vec<u16> {
        self.maps.proxy_socks.keys().filter_map(|k| k.ok()).map(|k| k as u16).collect()
    }

    /// Number of live entries of a map, for occupancy metrics.
    pub fn map_occupancy(&self) -> Vec<(&'static str, usize, u32)> {
        let count = |n: usize| n;
        vec![
            ("weft_services", count(self.maps.services.keys().count()), self.size("services")),
            ("weft_backends", count(self.maps.backends.keys().count()), self.size("backends")),
            ("weft_endpoints", count(self.maps.endpoints.keys().count()), self.size("endpoints")),
            ("weft_policy", count(self.maps.policy.keys().count()), self.size("policy")),
            ("weft_ct", count(self.maps.ct.keys().count()), self.size("conntrack")),
            ("weft_lb", count(self.maps.lb.keys().count()), self.size("lb")),
        ]
    }
}

/// `weft_policy` as [`super::policy::replace`] writes it.
struct PolicyMap<'a> {
    map: &'a mut LpmTrie<MapData, abi::PolicyMatch, abi::PolicyVal>,
    max_entries: u32,
}

impl super::policy::PolicyStore for PolicyMap<'_> {
    fn write(&mut self, (len, key, val): &super::policy::PolicySlot) -> Result<()> {
        self.map
            .insert(&Key::new(*len, *key), *val, 0)
            .map_err(|e| insert_err("weft_policy", "policy", self.max_entries, e))
    }

    fn remove(&mut self, len: u32, key: &abi::PolicyMatch) -> Result<()> {
        match self.map.remove(&Key::new(len, *key)) {
            Ok(()) => Ok(()),
            Err(e) => remove_err("weft_policy", e),
        }
    }
}
