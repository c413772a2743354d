//! The datapath's vocabulary: frontends, backends, endpoints, identities and
//! policy entries, in host types (the maps hold network byte order).

use std::{fmt, net::Ipv4Addr};

use serde::{Deserialize, Serialize};
use weft_ebpf::abi;

/// Transport protocol of a Service port or policy entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
            Proto::Icmp => 1,
        }
    }

    /// The protocol of an IP protocol number, if it is one weft handles.
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Proto::Tcp),
            17 => Some(Proto::Udp),
            1 => Some(Proto::Icmp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Icmp => "ICMP",
        })
    }
}

/// How a frontend is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FrontendKind {
    /// A ClusterIP: reachable from pods and node processes.
    ClusterIp,
    /// A node address and NodePort: also reachable from outside the cluster.
    NodePort,
    /// A LoadBalancer or external IP: also reachable from outside the cluster.
    External,
}

/// An address, port and protocol a Service answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Proto,
    pub kind: FrontendKind,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
    }
}

/// Where a Service sends a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
}

/// One frontend with its backends, or its proxy port when an L7 proxy handles it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceEntry {
    pub frontend: Frontend,
    pub backends: Vec<BackendAddr>,
    /// Set: connections go to the node proxy's listener on this port, not to a backend.
    pub proxy_port: Option<u16>,
}

/// A pod on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointEntry {
    pub addr: Ipv4Addr,
    /// Host-side device of the pod.
    pub ifindex: u32,
    pub identity: u32,
    /// Node-local endpoint id (policy entries are keyed by it).
    pub ep_id: u16,
    /// A policy selects the pod for ingress: ingress is default-deny.
    pub policy_ingress: bool,
    /// A policy selects the pod for egress: egress is default-deny.
    pub policy_egress: bool,
}

/// What the datapath knows about an address or prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcacheEntry {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub identity: u32,
    /// For pods: the node that hosts them.
    pub node_addr: Option<Ipv4Addr>,
    /// A pod on this node.
    pub local: bool,
    /// A node's own address.
    pub node: bool,
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    Allow,
    Deny,
}

/// Which traffic of a local endpoint a policy entry is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Connections the endpoint accepts.
    Ingress,
    /// Connections the endpoint opens.
    Egress,
}

impl Direction {
    /// The value of `WEFT_DIR_*`.
    pub fn raw(self) -> u8 {
        match self {
            Direction::Ingress => abi::DIR_INGRESS as u8,
            Direction::Egress => abi::DIR_EGRESS as u8,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// One policy entry of a local endpoint: a peer, a protocol and ports, and
/// what to do. `identity` 0 means any peer; `proto` None any protocol (and
/// then every port); `ports` None every port of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyEntry {
    pub direction: Direction,
    pub identity: u32,
    pub proto: Option<Proto>,
    /// An inclusive port range.
    pub ports: Option<(u16, u16)>,
    pub action: PolicyAction,
    /// Opaque id naming the rule this entry came from, reported with verdicts.
    pub rule_id: u32,
    /// Allowed only through the node's proxy, on this port (L7 rules).
    pub proxy_port: Option<u16>,
}
