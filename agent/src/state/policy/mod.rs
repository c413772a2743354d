//! Network policy for this node: every policy object, whatever its kind,
//! becomes rules in one shape ([`rule`]); resolved against the cluster's
//! pods they give each local pod its default-deny directions and its
//! datapath entries, and every address prefix a policy names its identity.
//!
//! Kinds: Kubernetes NetworkPolicy ([`netpol`]); CiliumNetworkPolicy and
//! CiliumClusterwideNetworkPolicy ([`cilium`]).
//!
//! Host policies (a clusterwide rule set with a `nodeSelector`) are about
//! the node itself: selected by this node's Node labels, they give the node
//! one more endpoint ([`PolicyState::host`]), whose entries the datapath
//! reads under endpoint id `abi::HOST_EP_ID` for the node's own traffic.

pub mod cilium;
pub mod l7;
pub mod netpol;
pub mod rule;

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

pub use rule::{EndpointPolicy, Net, selects};

use crate::k8s::ObjKey;

/// A prefix the datapath must know the identity of, because a policy names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CidrIdentity {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub identity: u32,
}

/// The object a rule id stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PolicyRef {
    /// The kind as users wrote it (`NetworkPolicy`, `CiliumNetworkPolicy`, ...).
    pub kind: String,
    pub key: ObjKey,
}

impl fmt::Display for PolicyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.key)
    }
}

/// What of each policy object is not enforced as written, by the object:
/// each problem starts with the field path it concerns
/// (`spec.egress[0].toFQDNs: FQDN rules are not supported ...`), or says what
/// of the object stays denied. The agent's `/status` and log show them with
/// the object's name; the operator writes the ones every node shares (those
/// of the translation, [`cilium::problems`]) into the object's status.
pub type Problems = BTreeMap<PolicyRef, Vec<String>>;

/// What the policies mean for this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Each local pod some policy selects, by its address.
    pub endpoints: BTreeMap<Ipv4Addr, EndpointPolicy>,
    /// The node itself, when a host policy selects it.
    pub host: Option<EndpointPolicy>,
    /// The host policies that select this node.
    pub host_policies: Vec<PolicyRef>,
    /// Prefixes policies name, and their identities.
    pub cidrs: Vec<CidrIdentity>,
    /// rule id -> the policy its entries came from.
    pub rules: BTreeMap<u32, PolicyRef>,
    /// What the node's policy listener must allow (HTTP rules).
    pub http: Vec<l7::HttpGrant>,
    /// What of each policy is not enforced as written, on this node.
    pub problems: Problems,
}

impl PolicyState {
    /// The EnvoyConfig listeners some rule hands connections to.
    pub fn listeners(&self) -> std::collections::BTreeSet<&l7::ListenerRef> {
        self.endpoints
            .values()
            .flat_map(|e| &e.waiting)
            .filter_map(|(_, p)| match p {
                l7::Proxy::Listener(l) => Some(l),
                l7::Proxy::Http(_) => None,
            })
            .collect()
    }

    /// The problems, each naming its policy (as `/status` lists them).
    pub fn problem_lines(&self) -> impl Iterator<Item = String> + '_ {
        self.problems.iter().flat_map(|(r, ps)| ps.iter().map(move |p| format!("{r}: {p}")))
    }
}

impl PolicyState {
    /// Gives the entries that wait for a proxy that proxy's port; an entry whose proxy has none is left out, so what it
    /// would allow stays denied, and a problem says why.
    pub fn connect(&mut self, ports: &l7::ListenerPorts) {
        let mut said = std::collections::BTreeSet::new();
        for ep in self.endpoints.values_mut() {
            for (mut e, proxy) in std::mem::take(&mut ep.waiting) {
                match ports.port_of(&proxy) {
                    Ok(port) => {
                        e.proxy_port = Some(port);
                        ep.entries.push(e);
                    }
                    Err(why) => {
                        if said.insert((e.rule_id, why.to_string()))
                            && let Some(r) = self.rules.get(&e.rule_id)
                        {
                            let p = format!("{why}; what it allows through the proxy stays denied");
                            self.problems.entry(r.clone()).or_default().push(p);
                        }
                    }
                }
            }
            ep.entries.sort();
        }
    }
}

/// The rule id of a policy: stable on every node (a hash of its kind and
/// key), never 0.
pub fn rule_id(kind: &str, key: &ObjKey) -> u32 {
    crate::hash::fnv1a_32(format!("{kind} {key}").as_bytes()).max(1)
}

/// Policies of every kind, translated, with what could not be.
#[derive(Default)]
pub struct Translated {
    pub policies: Vec<rule::Policy>,
    /// Host policies: their subjects' labels select nodes.
    pub host: Vec<rule::Policy>,
    pub rules: BTreeMap<u32, PolicyRef>,
    /// What of each object the translation could not take as written.
    pub problems: Problems,
}

impl Translated {
    /// Registers a policy object; returns its rule id.
    pub fn object(&mut self, kind: &str, key: &ObjKey) -> u32 {
        let id = rule_id(kind, key);
        self.rules.insert(id, PolicyRef { kind: kind.to_owned(), key: key.clone() });
        id
    }

    /// Records the problems of object `kind key` (none: nothing recorded).
    pub fn report(&mut self, kind: &str, key: &ObjKey, problems: Vec<String>) {
        if !problems.is_empty() {
            let r = PolicyRef { kind: kind.to_owned(), key: key.clone() };
            self.problems.entry(r).or_default().extend(problems);
        }
    }
}

/// Resolves translated policies against the cluster, host policies against
/// this node's labels. Problems of one policy go to
/// [`PolicyState::problems`]; `problems` hears those of none in particular.
pub fn derive(
    t: Translated,
    cluster: &rule::Cluster,
    node_labels: &BTreeMap<String, String>,
    problems: &mut Vec<String>,
) -> PolicyState {
    let all: Vec<&rule::Policy> = t.policies.iter().chain(&t.host).collect();
    let cidrs = match rule::CidrIds::of(all) {
        Ok(c) => c,
        Err(e) => {
            // Without identities for the prefixes no block can be enforced:
            // keep the policies' default-deny, allow nothing by address.
            problems.push(format!("network policies: {e}; address-based rules allow nothing"));
            rule::CidrIds::default()
        }
    };
    let (rules, mut by_policy) = (&t.rules, t.problems);
    let mut problem = |id, msg| match rules.get(&id) {
        Some(r) => by_policy.entry(r.clone()).or_default().push(msg),
        None => problems.push(format!("policy {id}: {msg}")),
    };
    let endpoints = rule::resolve(&t.policies, cluster, &cidrs, &mut problem);
    let (host, host_ids) = rule::resolve_host(&t.host, node_labels, cluster, &cidrs, &mut problem);
    let host_policies = host_ids.iter().filter_map(|id| rules.get(id).cloned()).collect();
    let mut http = Vec::new();
    if endpoints.values().any(|e| e.waiting.iter().any(|(_, p)| matches!(p, l7::Proxy::Http(_)))) {
        let addrs = l7::Addresses::of(cluster, &cidrs);
        for (ip, e) in &endpoints {
            http.extend(l7::http_grants(*ip, e, &addrs));
        }
    }
    PolicyState {
        endpoints,
        host,
        host_policies,
        cidrs: cidrs.iter().map(|(n, id)| CidrIdentity { addr: n.addr, prefix_len: n.len, identity: *id }).collect(),
        rules: t.rules,
        http,
        problems: by_policy,
    }
}
