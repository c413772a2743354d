//! Rules enforced in the node's proxy rather than in the datapath: HTTP
//! rules of a policy's port, and ports a policy hands to a listener of an
//! EnvoyConfig.
//!
//! The datapath only knows identities, ports and a proxy port: a connection
//! an L7 rule allows at L3/L4 goes to the proxy port. What the proxy must then
//! check is written here as [`HttpGrant`]s: for one local pod, direction and
//! port, which peers may send which requests. Envoy sees addresses, not
//! identities, so each grant's peers are the address sets of the identities
//! the rule resolved to ([`Addresses`]): a pod identity is its pods'
//! addresses, a prefix identity its prefix minus the longer prefixes named
//! inside it, world everything no other identity claims. The generated
//! listener (`xds::policy`) turns grants into RBAC policies.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use weft_ebpf::abi;

use super::rule::{CidrIds, Cluster, EndpointPolicy, Net};
pub use super::rule::{HeaderMatch, HttpRule, ListenerRef, Proxy};
use crate::datapath::{Direction, PolicyAction, Proto};

/// The proxy ports of what policies send connections to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListenerPorts {
    /// The node's policy listener (HTTP rules), when it has one.
    pub http: Option<u16>,
    /// Listeners of EnvoyConfigs serving on this node, with their ports.
    pub listeners: BTreeMap<ListenerRef, u16>,
}

/// Why connections a rule sends through a proxy cannot go there.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unconnected {
    #[error("the node's policy listener for HTTP rules has no proxy port (see the agent's EnvoyConfig statuses)")]
    Http,
    #[error("{0} is not serving on this node")]
    Listener(ListenerRef),
}

impl ListenerPorts {
    /// The port of a proxy.
    pub fn port_of(&self, proxy: &Proxy) -> Result<u16, Unconnected> {
        match proxy {
            Proxy::Http(_) => self.http.ok_or(Unconnected::Http),
            Proxy::Listener(l) => self.listeners.get(l).copied().ok_or_else(|| Unconnected::Listener(l.clone())),
        }
    }
}

/// Addresses: a prefix minus the prefixes inside it that are not its own.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AddrSet {
    pub net: Net,
    pub except: Vec<Net>,
}

/// What the proxy allows for one local pod: requests matching one of `http`
/// (None: every request) on `ports` from (ingress) or to (egress) `peers`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpGrant {
    /// The policy it comes from.
    pub rule_id: u32,
    pub subject: Ipv4Addr,
    pub direction: Direction,
    /// TCP ports, inclusive.
    pub ports: (u16, u16),
    /// The peers' addresses; empty: nobody.
    pub peers: Vec<AddrSet>,
    pub http: Option<Vec<HttpRule>>,
}

/// The addresses of each identity, as the datapath assigns identities to
/// addresses (pods, nodes, the prefixes policies name, world for the rest).
pub struct Addresses {
    by_id: BTreeMap<u32, Vec<AddrSet>>,
}

fn host(ip: Ipv4Addr) -> Net {
    Net { addr: ip, len: 32 }
}

impl Addresses {
    pub fn of(cluster: &Cluster, cidrs: &CidrIds) -> Self {
        let mut by_id: BTreeMap<u32, Vec<AddrSet>> = BTreeMap::new();
        // Addresses identified exactly: pods and nodes.
        let mut exact: BTreeSet<Ipv4Addr> = BTreeSet::new();
        for p in cluster.pods {
            by_id.entry(p.identity).or_default().push(AddrSet { net: host(p.ip), except: Vec::new() });
            exact.insert(p.ip);
        }
        for (ip, id) in cluster.nodes {
            by_id.entry(*id).or_default().push(AddrSet { net: host(*ip), except: Vec::new() });
            exact.insert(*ip);
        }
        let nets: Vec<(Net, u32)> = cidrs.iter().map(|(n, id)| (*n, *id)).collect();
        for (net, id) in &nets {
            let mut except: Vec<Net> =
                nets.iter().filter(|(n, _)| n.len > net.len && net.covers(n)).map(|(n, _)| *n).collect();
            except.extend(exact.iter().filter(|ip| net.contains(**ip)).map(|ip| host(*ip)));
            by_id.entry(*id).or_default().push(AddrSet { net: *net, except });
        }
        let mut world: Vec<Net> = nets.iter().map(|(n, _)| *n).collect();
        world.extend(exact.iter().map(|ip| host(*ip)));
        let any = Net { addr: Ipv4Addr::UNSPECIFIED, len: 0 };
        by_id.insert(abi::ID_WORLD, vec![AddrSet { net: any, except: world }]);
        by_id.insert(0, vec![AddrSet { net: any, except: Vec::new() }]);
        Addresses { by_id }
    }

    /// The address sets of some identities.
    pub fn of_ids<'a>(&self, ids: impl IntoIterator<Item = &'a u32>) -> Vec<AddrSet> {
        let mut out: BTreeSet<AddrSet> = BTreeSet::new();
        for id in ids {
            out.extend(self.by_id.get(id).into_iter().flatten().cloned());
        }
        out.into_iter().collect()
    }
}

/// What the proxy must allow for one local pod: the entries of its HTTP
/// rules, and the plain allows on the same ports (an L3/L4 allow lets every
/// request by, as in Cilium: another policy's HTTP rule on that port must
/// not take it away, though it sends the connection through the proxy).
pub fn http_grants(subject: Ipv4Addr, p: &EndpointPolicy, addrs: &Addresses) -> Vec<HttpGrant> {
    type Key<'a> = (u32, Direction, (u16, u16), Option<&'a Vec<HttpRule>>);
    let mut groups: BTreeMap<Key, BTreeSet<u32>> = BTreeMap::new();
    let mut http_ports = BTreeSet::new();
    for (e, proxy) in &p.waiting {
        let Proxy::Http(rules) = proxy else { continue };
        let ports = e.ports.unwrap_or((1, u16::MAX));
        http_ports.insert((e.direction, ports));
        groups.entry((e.rule_id, e.direction, ports, Some(rules))).or_default().insert(e.identity);
    }
    for e in p.entries.iter().filter(|e| e.action == PolicyAction::Allow && e.proto.is_none_or(|p| p == Proto::Tcp)) {
        let (lo, hi) = e.ports.unwrap_or((1, u16::MAX));
        for (dir, (a, b)) in http_ports.iter().filter(|(d, _)| *d == e.direction) {
            let (from, to) = (lo.max(*a), hi.min(*b));
            if from <= to {
                groups.entry((e.rule_id, *dir, (from, to), None)).or_default().insert(e.identity);
            }
        }
    }
    groups
        .into_iter()
        .map(|((rule_id, direction, ports, http), ids)| HttpGrant {
            rule_id,
            subject,
            direction,
            ports,
            peers: addrs.of_ids(&ids),
            http: http.cloned(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{k8s::ObjKey, state::PodState};

    #[test]
    fn identities_become_the_addresses_the_datapath_gives_them() {
        let pod = |name: &str, ip: [u8; 4], identity| PodState {
            key: ObjKey::new("ns", name),
            ip: ip.into(),
            node: "n1".into(),
            labels: Default::default(),
            identity,
            local: true,
            owner: None,
            device: None,
        };
        let pods = [pod("a", [10, 1, 1, 1], 300), pod("b", [10, 1, 1, 2], 300), pod("c", [10, 1, 1, 3], 301)];
        let nodes =
            [(Ipv4Addr::new(192, 168, 50, 1), abi::ID_HOST), (Ipv4Addr::new(192, 168, 50, 2), abi::ID_REMOTE_NODE)];
        let (named, ns) = (BTreeMap::new(), BTreeMap::new());
        let cluster = Cluster { pods: &pods, nodes: &nodes, named_ports: &named, namespace_labels: &ns };
        let net = |s: &str| Net::parse(s).unwrap();
        let policies = vec![super::super::rule::Policy {
            rule_id: 1,
            subjects: Default::default(),
            ingress: true,
            egress: false,
            rules: vec![super::super::rule::Rule {
                direction: Direction::Ingress,
                action: crate::datapath::PolicyAction::Allow,
                peers: vec![super::super::rule::Peer::Cidr {
                    net: net("192.168.0.0/16"),
                    except: vec![net("192.168.60.0/24")],
                }],
                ports: Vec::new(),
                proxy: None,
            }],
        }];
        let cidrs = CidrIds::of(&policies).unwrap();
        let a = Addresses::of(&cluster, &cidrs);
        let set = |n: &str, except: &[&str]| AddrSet { net: net(n), except: except.iter().map(|e| net(e)).collect() };
        assert_eq!(a.of_ids(&[300]), vec![set("10.1.1.1/32", &[]), set("10.1.1.2/32", &[])]);
        let block = cidrs.iter().find(|(n, _)| n.len == 16).map(|(_, id)| *id).unwrap();
        // A block minus the prefix inside it and the nodes it covers.
        assert_eq!(
            a.of_ids(&[block]),
            vec![set("192.168.0.0/16", &["192.168.60.0/24", "192.168.50.1/32", "192.168.50.2/32"])]
        );
        assert_eq!(a.of_ids(&[abi::ID_REMOTE_NODE]), vec![set("192.168.50.2/32", &[])]);
        let world = a.of_ids(&[abi::ID_WORLD]);
        assert_eq!(world[0].net, net("0.0.0.0/0"));
        assert_eq!(world[0].except.len(), 2 + 3 + 2, "{world:?}");
        assert_eq!(a.of_ids(&[0]), vec![set("0.0.0.0/0", &[])]);
    }
}
