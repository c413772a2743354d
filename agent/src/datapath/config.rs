//! Datapath settings: where maps are pinned, how big they are, what the
//! programs are told at run time.

use std::{net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};
use weft_ebpf::abi;

/// How much the datapath reports into the ring buffer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EmitLevel {
    /// Nothing (drops are still counted by the kernel, not reported).
    Off,
    /// The first packet of each connection, TCP flag changes, and every drop.
    #[default]
    Connection,
    /// Every packet every hook sees.
    Packet,
}

impl EmitLevel {
    /// The value the programs read from `weft_config.emit_level`.
    pub fn raw(self) -> u32 {
        match self {
            EmitLevel::Off => abi::EMIT_OFF,
            EmitLevel::Connection => abi::EMIT_CONN,
            EmitLevel::Packet => abi::EMIT_ALL,
        }
    }
}

/// `max_entries` of each resizable map. A map that fills up makes the call
/// that would overflow it fail with an error naming the map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct MapSizes {
    /// Service frontends plus their backend slots (`weft_services`). Default 65536.
    pub services: u32,
    /// Distinct backends (`weft_backends`). Default 65536.
    pub backends: u32,
    /// Local pods (`weft_endpoints`). Default 4096.
    pub endpoints: u32,
    /// Known addresses and prefixes with their identity (`weft_ipcache`). Default 65536.
    pub ipcache: u32,
    /// Policy entries of all local pods (`weft_policy`). Default 65536.
    pub policy: u32,
    /// Tracked connections (`weft_ct`, LRU). Default 262144.
    pub conntrack: u32,
    /// Service translations of live connections (`weft_lb`, LRU). Default 131072.
    pub lb: u32,
    /// Node-process connections to Services (`weft_sock_rev`, LRU). Default 65536.
    pub sock_rev: u32,
    /// Proxy listeners (`weft_proxy_socks`). Default 4096.
    pub proxy_sockets: u32,
    /// Ring buffer for verdict records, in bytes; a power of two. Default 8 MiB.
    pub events_bytes: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: 65536,
            backends: 65536,
            endpoints: 4096,
            ipcache: 65536,
            policy: 65536,
            conntrack: 262144,
            lb: 131072,
            sock_rev: 65536,
            proxy_sockets: 4096,
            events_bytes: 8 << 20,
        }
    }
}

/// What each pinned map must look like: (map, config key, key size, value size, max entries).
pub(crate) type MapShape = (&'static str, &'static str, u32, u32, u32);

/// A map size the kernel would refuse, with its `map-sizes` key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapSizeError {
    #[error("map-sizes.{key} = 0: every map needs at least one entry")]
    Empty { key: &'static str },
    #[error("map-sizes.events-bytes = {0}: the ring buffer size must be a power of two of at least 4096 bytes")]
    RingBuffer(u32),
}

impl MapSizes {
    /// Rejects sizes the kernel would refuse, naming the key and value.
    pub fn validate(&self) -> Result<(), MapSizeError> {
        for (_, key, _, _, n) in self.shapes() {
            if n == 0 {
                return Err(MapSizeError::Empty { key });
            }
        }
        let rb = self.events_bytes;
        if !rb.is_power_of_two() || rb < 4096 {
            return Err(MapSizeError::RingBuffer(rb));
        }
        Ok(())
    }

    /// The shape of every pinned map under these sizes.
    pub(crate) fn shapes(&self) -> Vec<MapShape> {
        use std::mem::size_of;
        let s = |t: usize| t as u32;
        vec![
            ("weft_config", "config", 4, s(size_of::<abi::Config>()), 1),
            ("weft_services", "services", s(size_of::<abi::SvcKey>()), s(size_of::<abi::SvcVal>()), self.services),
            ("weft_backends", "backends", 4, s(size_of::<abi::Backend>()), self.backends),
            ("weft_endpoints", "endpoints", 4, s(size_of::<abi::Endpoint>()), self.endpoints),
            ("weft_ipcache", "ipcache", s(size_of::<abi::IpcacheKey>()), s(size_of::<abi::IpcacheVal>()), self.ipcache),
            ("weft_policy", "policy", s(size_of::<abi::PolicyKey>()), s(size_of::<abi::PolicyVal>()), self.policy),
            ("weft_ct", "conntrack", s(size_of::<abi::CtKey>()), s(size_of::<abi::CtEntry>()), self.conntrack),
            ("weft_lb", "lb", s(size_of::<abi::CtKey>()), s(size_of::<abi::LbEntry>()), self.lb),
            ("weft_sock_rev", "sock-rev", 8, s(size_of::<abi::SockRev>()), self.sock_rev),
            ("weft_proxy_socks", "proxy-sockets", 4, 4, self.proxy_sockets),
            ("weft_events", "events-bytes", 0, 0, self.events_bytes),
            ("weft_event_stats", "event-stats", 4, 8, abi::STAT_MAX),
        ]
    }
}

/// Everything the datapath needs to load and run on a node.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    /// bpffs directory for this node's pins (maps, links). Default /sys/fs/bpf/weft.
    pub bpffs_dir: PathBuf,
    /// Map sizes.
    pub map_sizes: MapSizes,
    /// On start, a pinned map whose shape differs from the configured one is an
    /// error unless this is set, in which case it is recreated (and its contents lost).
    pub recreate_mismatched_maps: bool,
    /// cgroup v2 directory whose processes get socket-level Service handling
    /// (the node's processes reaching ClusterIPs). None: not attached.
    pub cgroup: Option<PathBuf>,
    /// Where sysctls are written (`/proc/sys`, or a writable mount of the
    /// node's `/proc/sys/net` where a container's /proc/sys is read-only).
    pub sysctl_dir: PathBuf,
    /// The node's address on its external device: NodePort frontends and SNAT source.
    pub node_ip: Ipv4Addr,
    /// Destinations inside this CIDR are never masqueraded (pods, nodes).
    pub native_cidr: Option<(Ipv4Addr, u8)>,
    /// SNAT pod traffic leaving `native_cidr` to the node's address.
    pub masquerade: bool,
    /// Source ports for SNAT, outside the node's ephemeral range.
    pub nat_ports: (u16, u16),
    /// Ring-buffer emission level; changeable at run time.
    pub emit_level: EmitLevel,
    /// Let the node itself reach local pods whatever their policy (Cilium's default).
    pub allow_host_ingress: bool,
    /// A host policy selects the node: (ingress, egress) under default-deny,
    /// judged by the entries of endpoint `abi::HOST_EP_ID`. Changeable at run time.
    pub host_policy: (bool, bool),
    /// Translate Service addresses at connect() for pods' sockets too (the
    /// cgroup hooks see every process under `cgroup`), so their packets need no
    /// per-packet NAT; per-packet DNAT still handles what the hooks do not see.
    pub socket_lb_pods: bool,
    /// Routing table holding `local 0.0.0.0/0 dev lo` for proxy-bound packets.
    pub proxy_route_table: u32,
    /// Priority of the `fwmark` rule that selects that table.
    pub proxy_rule_priority: u32,
}

impl DatapathConfig {
    /// Defaults for a node at `node_ip`.
    pub fn new(node_ip: Ipv4Addr) -> Self {
        Self {
            bpffs_dir: PathBuf::from("/sys/fs/bpf/weft"),
            map_sizes: MapSizes::default(),
            recreate_mismatched_maps: false,
            cgroup: None,
            sysctl_dir: PathBuf::from("/proc/sys"),
            node_ip,
            native_cidr: None,
            masquerade: false,
            nat_ports: (61000, 65535),
            emit_level: EmitLevel::default(),
            allow_host_ingress: true,
            host_policy: (false, false),
            socket_lb_pods: true,
            proxy_route_table: 2004,
            proxy_rule_priority: 9,
        }
    }

    /// Adds the host-policy directions `pinned` (what an earlier run wrote)
    /// enforces to this config's.
    pub(crate) fn keep_host_policy(&mut self, pinned: &abi::Config) {
        let bits = u32::from(pinned.host_policy);
        self.host_policy.0 |= bits & abi::EP_POLICY_INGRESS != 0;
        self.host_policy.1 |= bits & abi::EP_POLICY_EGRESS != 0;
    }

    pub(crate) fn raw(&self, netns_cookie: u64) -> abi::Config {
        let (native_cidr, native_cidr_len) =
            self.native_cidr.map(|(a, l)| (u32::from_ne_bytes(a.octets()), l)).unwrap_or((0, 0));
        let mut flags = 0;
        if self.allow_host_ingress {
            flags |= abi::CFG_ALLOW_HOST_INGRESS;
        }
        if self.masquerade {
            flags |= abi::CFG_MASQUERADE;
        }
        if self.socket_lb_pods {
            flags |= abi::CFG_SOCK_LB_PODS;
        }
        abi::Config {
            emit_level: self.emit_level.raw(),
            flags,
            netns_cookie,
            node_ip: u32::from_ne_bytes(self.node_ip.octets()),
            native_cidr,
            native_cidr_len,
            host_policy: (if self.host_policy.0 { abi::EP_POLICY_INGRESS as u8 } else { 0 })
                | (if self.host_policy.1 { abi::EP_POLICY_EGRESS as u8 } else { 0 }),
            nat_port_min: self.nat_ports.0,
            nat_port_max: self.nat_ports.1,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_sizes_the_kernel_refuses_are_named_by_key() {
        assert_eq!(MapSizes::default().validate(), Ok(()));
        let e = MapSizes { policy: 0, ..Default::default() }.validate().unwrap_err();
        assert_eq!(e, MapSizeError::Empty { key: "policy" });
        assert_eq!(e.to_string(), "map-sizes.policy = 0: every map needs at least one entry");
        let e = MapSizes { events_bytes: 6000, ..Default::default() }.validate().unwrap_err();
        assert_eq!(e, MapSizeError::RingBuffer(6000));
    }
}
