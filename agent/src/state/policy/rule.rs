//! Policies in one shape, whatever kind they were written as: which pods a
//! policy is about, and rules naming peers (pods by selector, address blocks,
//! reserved identities), protocols and ports. Resolving them against the
//! cluster's pods gives each local pod its datapath entries.
//!
//! Peers become identities. A pod selector becomes the identities of the pods
//! it matches (all pods of the cluster, so a peer on another node counts). An
//! address block becomes the identity of its own prefix and of every other
//! prefix some policy names inside it (the datapath looks addresses up by
//! longest prefix, so an address in a nested prefix carries that prefix's
//! identity), minus its exceptions, plus the nodes whose address it covers.
//! Address blocks never match pods, as in Cilium. A named port means the
//! port of that name on the destination: the selected pod for ingress, each
//! peer pod for egress.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use weft_ebpf::abi;

use crate::{
    datapath::{Direction, PolicyAction, PolicyEntry, Proto},
    k8s::selector::{self, SelectorError},
    state::PodState,
};

/// The widest port range a rule may name.
pub const MAX_PORT_RANGE: u32 = 65536;

/// An IPv4 prefix, its address masked to its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Net {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Net {
    /// Parses `a.b.c.d/len` (a bare address is a /32).
    pub fn parse(s: &str) -> Option<Net> {
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().ok().filter(|l| *l <= 32)?),
            None => (s, 32),
        };
        let addr: Ipv4Addr = a.parse().ok()?;
        Some(Net { addr: Ipv4Addr::from(u32::from(addr) & mask(l)), len: l })
    }

    /// Whether the address is in the prefix.
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & mask(self.len) == u32::from(self.addr)
    }

    /// Whether `other` lies wholly inside this prefix.
    pub fn covers(&self, other: &Net) -> bool {
        other.len >= self.len && self.contains(other.addr)
    }
}

impl std::fmt::Display for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn mask(len: u8) -> u32 {
    if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) }
}

/// Pods a rule or a policy selects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodSelector {
    /// Only pods of this namespace (None: any namespace).
    pub namespace: Option<String>,
    /// Only pods whose namespace's labels match (None: any).
    pub namespace_labels: Option<LabelSelector>,
    /// Only pods whose labels match (None: any). The pod's labels include
    /// `io.kubernetes.pod.namespace` with its namespace, as Cilium's do.
    pub labels: Option<LabelSelector>,
}

/// What a rule says about the other side of a connection.
#[derive(Clone, Debug, PartialEq)]
pub enum Peer {
    /// Anyone.
    Any,
    /// Pods, by selector.
    Pods(PodSelector),
    /// An address block minus exceptions.
    Cidr { net: Net, except: Vec<Net> },
    /// A reserved identity (host, remote-node).
    Identity(u32),
    /// Every identity inside the cluster: pods, this node, the other nodes.
    Cluster,
    /// Everything outside the cluster.
    World,
}

/// The ports of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSel {
    All,
    Range(u16, u16),
    /// A container port name, looked up on the destination pod.
    Named(String),
}

/// One HTTP rule: every given part must match. Method, path and host are
/// regular expressions matched against the whole value (Cilium's meaning);
/// headers must be present, or have exactly the value given.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct HttpRule {
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    pub headers: Vec<HeaderMatch>,
}

/// A request header a rule asks for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HeaderMatch {
    /// Lower-case, as HTTP/2 and Envoy see names.
    pub name: String,
    /// None: present with any value.
    pub value: Option<String>,
}

/// A listener of an EnvoyConfig that a policy hands a port to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ListenerRef {
    pub clusterwide: bool,
    /// The config's namespace ("" when clusterwide).
    pub namespace: String,
    pub config: String,
    pub listener: String,
}

impl std::fmt::Display for ListenerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.clusterwide {
            write!(f, "listener {} of ClusterwideEnvoyConfig {}", self.listener, self.config)
        } else {
            write!(f, "listener {} of EnvoyConfig {}/{}", self.listener, self.namespace, self.config)
        }
    }
}

/// Where a rule sends the connections it allows.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Proxy {
    /// The node's policy listener, which allows a request if one of these
    /// rules (of this or another policy for the same pod and port) does.
    Http(Vec<HttpRule>),
    /// A listener of an EnvoyConfig, which does what it is configured to.
    Listener(ListenerRef),
}

/// A protocol (None: any) and ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    pub proto: Option<Proto>,
    pub ports: PortSel,
}

/// One rule: peers and ports in a direction, allowed or denied. No peers
/// allows nothing; no ports means every port of every protocol.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub direction: Direction,
    pub action: PolicyAction,
    pub peers: Vec<Peer>,
    pub ports: Vec<PortSpec>,
    /// Allowed connections go through the node's proxy (L7 rules, listener
    /// redirects) instead of straight on.
    pub proxy: Option<Proxy>,
}

/// A policy in the common shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// The id verdicts name it by.
    pub rule_id: u32,
    /// The pods it is about.
    pub subjects: PodSelector,
    /// Directions it puts under default-deny for its subjects.
    pub ingress: bool,
    pub egress: bool,
    pub rules: Vec<Rule>,
}

/// What policies are resolved against.
pub struct Cluster<'a> {
    /// Every pod with an address, on any node.
    pub pods: &'a [PodState],
    /// Every node's address and identity (host for this one, remote-node for others).
    pub nodes: &'a [(Ipv4Addr, u32)],
    /// Named container ports of each pod, by address.
    pub named_ports: &'a BTreeMap<Ipv4Addr, BTreeMap<String, (u16, Proto)>>,
    /// Labels of each namespace with a Namespace object (a namespace without
    /// one has only `kubernetes.io/metadata.name`, which every namespace has).
    pub namespace_labels: &'a BTreeMap<String, BTreeMap<String, String>>,
}

/// The label every namespace carries with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The label Cilium gives every pod with its namespace.
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";

impl Cluster<'_> {
    fn namespace_labels(&self, ns: &str) -> BTreeMap<String, String> {
        let mut l = self.namespace_labels.get(ns).cloned().unwrap_or_default();
        l.insert(NAMESPACE_NAME_LABEL.to_owned(), ns.to_owned());
        l
    }
}

/// Does `labels` satisfy the selector? An empty selector selects everything.
/// (The matcher is `k8s::selector`'s; [`SelectorError::field`] names the
/// field at fault.)
pub fn selects(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<bool, SelectorError> {
    selector::matches(sel, labels)
}

/// A selector that cannot be evaluated, as a policy problem says it
/// (`matchExpressions[0].operator: unknown operator "Gt" ...`).
fn unreadable(e: &SelectorError) -> String {
    format!("{}: {e}", e.field())
}

/// The datapath's room for address prefixes is smaller than what the
/// policies name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("policies name {prefixes} distinct address prefixes; the datapath has room for {room}")]
pub struct TooManyPrefixes {
    pub prefixes: usize,
    pub room: usize,
}

impl PodSelector {
    /// Whether the pod is selected.
    pub fn matches(&self, pod: &PodState, cluster: &Cluster) -> Result<bool, SelectorError> {
        if self.namespace.as_ref().is_some_and(|ns| *ns != pod.key.namespace) {
            return Ok(false);
        }
        if let Some(sel) = &self.namespace_labels
            && !selects(sel, &cluster.namespace_labels(&pod.key.namespace))?
        {
            return Ok(false);
        }
        match &self.labels {
            None => Ok(true),
            Some(sel) => {
                let mut labels = pod.labels.clone();
                labels.entry(POD_NAMESPACE_LABEL.to_owned()).or_insert_with(|| pod.key.namespace.clone());
                selects(sel, &labels)
            }
        }
    }

    /// The pods selected, in the cluster's order.
    pub fn select<'c>(&self, cluster: &Cluster<'c>) -> Result<Vec<&'c PodState>, SelectorError> {
        let mut out = Vec::new();
        for p in cluster.pods {
            if self.matches(p, cluster)? {
                out.push(p);
            }
        }
        Ok(out)
    }
}

/// Identities of the prefixes policies name: allocated in address order
/// (stable while the set of prefixes is), from `IDENTITY_MIN_CIDR`.
#[derive(Clone, Debug, Default)]
pub struct CidrIds(BTreeMap<Net, u32>);

impl CidrIds {
    /// Identities for every prefix the policies name (blocks and exceptions).
    pub fn of<'p>(policies: impl IntoIterator<Item = &'p Policy>) -> Result<Self, TooManyPrefixes> {
        let mut nets = BTreeSet::new();
        for p in policies {
            for r in &p.rules {
                for peer in &r.peers {
                    if let Peer::Cidr { net, except } = peer {
                        nets.insert(*net);
                        nets.extend(except.iter().copied());
                    }
                }
            }
        }
        let room = (abi::IDENTITY_MIN_POD - abi::IDENTITY_MIN_CIDR) as usize;
        if nets.len() > room {
            return Err(TooManyPrefixes { prefixes: nets.len(), room });
        }
        Ok(CidrIds(nets.into_iter().zip(abi::IDENTITY_MIN_CIDR..).collect()))
    }

    /// Every prefix and its identity.
    pub fn iter(&self) -> impl Iterator<Item = (&Net, &u32)> {
        self.0.iter()
    }
}

/// A rule's peers as identities, and the pods among them (for named ports).
struct Peers<'c> {
    ids: BTreeSet<u32>,
    pods: Vec<&'c PodState>,
}

fn resolve_peers<'c>(peers: &[Peer], cluster: &Cluster<'c>, cidrs: &CidrIds) -> Result<Peers<'c>, SelectorError> {
    let mut out = Peers { ids: BTreeSet::new(), pods: Vec::new() };
    for peer in peers {
        match peer {
            Peer::Any => {
                out.ids.insert(0);
                out.pods.extend(cluster.pods.iter());
            }
            Peer::Pods(sel) => {
                let pods = sel.select(cluster)?;
                out.ids.extend(pods.iter().map(|p| p.identity));
                out.pods.extend(pods);
            }
            Peer::Cidr { net, except } => {
                let excepted = |n: &Net| except.iter().any(|e| e.covers(n));
                out.ids.extend(cidrs.0.iter().filter(|(n, _)| net.covers(n) && !excepted(n)).map(|(_, id)| *id));
                out.ids.extend(
                    cluster
                        .nodes
                        .iter()
                        .filter(|(ip, _)| net.contains(*ip) && !except.iter().any(|e| e.contains(*ip)))
                        .map(|(_, id)| *id),
                );
                if net.len == 0 {
                    // Addresses no prefix covers read as world.
                    out.ids.insert(abi::ID_WORLD);
                }
            }
            Peer::Identity(id) => {
                out.ids.insert(*id);
            }
            Peer::Cluster => {
                out.ids.extend(cluster.pods.iter().map(|p| p.identity));
                out.ids.extend([abi::ID_HOST, abi::ID_REMOTE_NODE]);
                out.pods.extend(cluster.pods.iter());
            }
            Peer::World => {
                out.ids.insert(abi::ID_WORLD);
                out.ids.extend(cidrs.0.values().copied());
            }
        }
    }
    Ok(out)
}

/// The entries one rule gives one subject: a pod, or the node (None).
fn entries_for(
    rule: &Rule,
    rule_id: u32,
    subject: Option<&PodState>,
    peers: &Peers,
    cluster: &Cluster,
    out: &mut BTreeSet<PolicyEntry>,
) {
    // Entries that wait for their proxy's port carry None until then.
    let entry = |identity: u32, proto: Option<Proto>, ports: Option<(u16, u16)>| PolicyEntry {
        direction: rule.direction,
        identity,
        proto,
        ports,
        action: rule.action,
        rule_id,
        proxy_port: None,
    };
    let all = [PortSpec { proto: None, ports: PortSel::All }];
    let specs = if rule.ports.is_empty() { &all[..] } else { &rule.ports[..] };
    for spec in specs {
        match &spec.ports {
            PortSel::All => out.extend(peers.ids.iter().map(|id| entry(*id, spec.proto, None))),
            // Ports without a protocol: those ports of TCP and of UDP (the
            // datapath's "any protocol" is every port of every protocol).
            PortSel::Range(a, b) => {
                let protos = match spec.proto {
                    Some(p) => vec![p],
                    None => vec![Proto::Tcp, Proto::Udp],
                };
                for proto in protos {
                    out.extend(peers.ids.iter().map(|id| entry(*id, Some(proto), Some((*a, *b)))));
                }
            }
            PortSel::Named(name) => {
                let on = |pod: &PodState| {
                    cluster
                        .named_ports
                        .get(&pod.ip)
                        .and_then(|m| m.get(name))
                        .filter(|(_, proto)| spec.proto.is_none_or(|want| want == *proto))
                        .copied()
                };
                match rule.direction {
                    // The subject's own port of that name, from every peer.
                    // The node has no named ports.
                    Direction::Ingress => {
                        if let Some((port, proto)) = subject.and_then(on) {
                            out.extend(peers.ids.iter().map(|id| entry(*id, Some(proto), Some((port, port)))));
                        }
                    }
                    // Each peer pod's port of that name; other peers have no names.
                    Direction::Egress => {
                        for pod in &peers.pods {
                            if let Some((port, proto)) = on(pod) {
                                out.insert(entry(pod.identity, Some(proto), Some((port, port))));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What the policies mean for one local pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// A policy puts its ingress under default-deny.
    pub ingress: bool,
    /// A policy puts its egress under default-deny.
    pub egress: bool,
    pub entries: Vec<PolicyEntry>,
    /// Entries allowed through a proxy, waiting for its port
    /// ([`super::PolicyState::connect`] moves them to `entries`).
    pub waiting: Vec<(PolicyEntry, Proxy)>,
}

/// What the policies give one endpoint, as they are added up.
#[derive(Default)]
struct Slot {
    ingress: bool,
    egress: bool,
    entries: BTreeSet<PolicyEntry>,
    waiting: BTreeSet<(PolicyEntry, Proxy)>,
}

impl Slot {
    /// Adds what one rule of policy `rule_id` gives this endpoint. A rule
    /// about a direction its policy does not enforce still applies: another
    /// policy may enforce it.
    fn add(&mut self, rule: &Rule, rule_id: u32, subject: Option<&PodState>, peers: &Peers, cluster: &Cluster) {
        match &rule.proxy {
            None => entries_for(rule, rule_id, subject, peers, cluster, &mut self.entries),
            Some(proxy) => {
                let mut via = BTreeSet::new();
                entries_for(rule, rule_id, subject, peers, cluster, &mut via);
                self.waiting.extend(via.into_iter().map(|e| (e, proxy.clone())));
            }
        }
    }

    /// The endpoint's policy; None when no policy enforces a direction.
    /// Entries of a direction nothing enforces would never be read.
    fn finish(self) -> Option<EndpointPolicy> {
        if !self.ingress && !self.egress {
            return None;
        }
        let keep = |e: &PolicyEntry| match e.direction {
            Direction::Ingress => self.ingress,
            Direction::Egress => self.egress,
        };
        let entries = self.entries.iter().filter(|e| keep(e)).cloned().collect();
        let waiting = self.waiting.iter().filter(|(e, _)| keep(e)).cloned().collect();
        Some(EndpointPolicy { ingress: self.ingress, egress: self.egress, entries, waiting })
    }
}

/// Resolves host policies for this node, whose Node labels are
/// `node_labels`: the node's own endpoint policy (None when no host policy
/// selects it), and the rule ids of those that do. Problems as in [`resolve`].
pub fn resolve_host(
    policies: &[Policy],
    node_labels: &BTreeMap<String, String>,
    cluster: &Cluster,
    cidrs: &CidrIds,
    mut problem: impl FnMut(u32, String),
) -> (Option<EndpointPolicy>, Vec<u32>) {
    let mut slot = Slot::default();
    let mut by = Vec::new();
    for policy in policies {
        let sel = policy.subjects.labels.clone().unwrap_or_default();
        match selects(&sel, node_labels) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                problem(policy.rule_id, format!("nodeSelector: {}", unreadable(&e)));
                continue;
            }
        }
        by.push(policy.rule_id);
        slot.ingress |= policy.ingress;
        slot.egress |= policy.egress;
        for rule in &policy.rules {
            match resolve_peers(&rule.peers, cluster, cidrs) {
                Ok(peers) => slot.add(rule, policy.rule_id, None, &peers, cluster),
                Err(e) => problem(policy.rule_id, format!("peer selector: {}", unreadable(&e))),
            }
        }
    }
    by.dedup();
    (slot.finish(), by)
}

/// Resolves policies for this node's pods. `problem(rule_id, message)` hears
/// of selectors that cannot be evaluated; such a policy still selects its
/// pods when it can (a policy that cannot be read must not open them up)
/// but the rule allows nothing.
pub fn resolve(
    policies: &[Policy],
    cluster: &Cluster,
    cidrs: &CidrIds,
    mut problem: impl FnMut(u32, String),
) -> BTreeMap<Ipv4Addr, EndpointPolicy> {
    let mut out: BTreeMap<Ipv4Addr, Slot> = BTreeMap::new();
    for policy in policies {
        let subjects: Vec<&PodState> = match policy.subjects.select(cluster) {
            Ok(s) => s.into_iter().filter(|p| p.local).collect(),
            Err(e) => {
                problem(policy.rule_id, format!("selector: {}", unreadable(&e)));
                continue;
            }
        };
        if subjects.is_empty() {
            continue;
        }
        for s in &subjects {
            let slot = out.entry(s.ip).or_default();
            slot.ingress |= policy.ingress;
            slot.egress |= policy.egress;
        }
        for rule in &policy.rules {
            let peers = match resolve_peers(&rule.peers, cluster, cidrs) {
                Ok(p) => p,
                Err(e) => {
                    problem(policy.rule_id, format!("peer selector: {}", unreadable(&e)));
                    continue;
                }
            };
            for s in &subjects {
                out.entry(s.ip).or_default().add(rule, policy.rule_id, Some(s), &peers, cluster);
            }
        }
    }
    out.into_iter().filter_map(|(ip, s)| Some((ip, s.finish()?))).collect()
}
