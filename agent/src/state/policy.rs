//! Kubernetes NetworkPolicy (networking.k8s.io/v1) as the datapath's ingress
//! entries: for every local pod a policy selects, the identities, ports and
//! protocols it accepts. Peers become identities (pods by namespace and
//! labels) or CIDR identities (ipBlocks); a pod no policy selects keeps
//! accepting everything, as in Kubernetes.
//!
//! An ipBlock also selects the cluster's nodes whose address it covers (as
//! Cilium does with `policy-cidr-match-mode: nodes`): the node's identity is
//! allowed, so a policy can admit the per-node proxy by the node network.
//!
//! Egress rules are not enforced by the datapath yet: a policy with them is
//! reported as a problem, and its ingress part still applies.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

use weft_ebpf::abi;

use super::PodState;
use crate::{
    datapath::{PolicyAction, PolicyEntry, Proto},
    k8s::ObjKey,
};

/// The widest port range (`port`..`endPort`) expanded into entries.
const MAX_PORT_RANGE: u32 = 1024;
/// The label every namespace carries with its own name (the API server sets
/// it; a namespace without a Namespace object has this label alone).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The labels of a namespace: its Namespace object's, if there is one, and
/// always its name label.
pub fn namespace_labels(namespaces: &BTreeMap<String, BTreeMap<String, String>>, ns: &str) -> BTreeMap<String, String> {
    let mut labels = namespaces.get(ns).cloned().unwrap_or_default();
    labels.insert(NAMESPACE_NAME_LABEL.into(), ns.into());
    labels
}

/// A prefix the datapath must know the identity of, because a policy names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct CidrIdentity {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub identity: u32,
}

/// What the policies mean for this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyState {
    /// Ingress entries of each local pod some policy selects, by its address.
    pub ingress: BTreeMap<Ipv4Addr, Vec<PolicyEntry>>,
    /// Prefixes from ipBlocks and their identities.
    pub cidrs: Vec<CidrIdentity>,
    /// rule id -> the policy (`namespace/name`) an entry came from.
    pub rules: BTreeMap<u32, ObjKey>,
}

/// The rule id of a policy: stable on every node (a hash of its key), never 0.
pub fn rule_id(key: &ObjKey) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.to_string().bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

/// Does `labels` satisfy the selector? An empty selector selects everything.
pub fn selects(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> Result<bool, String> {
    for (k, v) in sel.match_labels.iter().flatten() {
        if labels.get(k) != Some(v) {
            return Ok(false);
        }
    }
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.as_deref().unwrap_or_default();
        let have = labels.get(&e.key);
        let ok = match e.operator.as_str() {
            "In" => have.is_some_and(|h| values.contains(h)),
            "NotIn" => !have.is_some_and(|h| values.contains(h)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            other => {
                return Err(format!(
                    "matchExpressions operator {other:?} (expected In, NotIn, Exists or DoesNotExist)"
                ));
            }
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, l) = s.split_once('/')?;
    let addr: Ipv4Addr = a.parse().ok()?;
    let len: u8 = l.parse().ok().filter(|l| *l <= 32)?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Some((Ipv4Addr::from(u32::from(addr) & mask), len))
}

/// Builds the node's policy state from every NetworkPolicy and the pods.
/// Problems name the policy and the field.
pub fn derive(
    policies: &BTreeMap<ObjKey, &NetworkPolicy>,
    pods: &[PodState],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    nodes: &[(Ipv4Addr, u32)],
    named_ports: &BTreeMap<Ipv4Addr, BTreeMap<String, (u16, Proto)>>,
    problems: &mut Vec<String>,
) -> PolicyState {
    let mut out = PolicyState::default();
    let mut cidr_ids: BTreeMap<(Ipv4Addr, u8), u32> = BTreeMap::new();
    let mut entries: BTreeMap<Ipv4Addr, BTreeSet<PolicyEntry>> = BTreeMap::new();

    for (key, np) in policies {
        let Some(spec) = np.spec.as_ref() else { continue };
        let id = rule_id(key);
        out.rules.insert(id, key.clone());
        let mut problem = |field: &str, msg: String| problems.push(format!("NetworkPolicy {key}: {field}: {msg}"));

        let types = spec.policy_types.clone().unwrap_or_else(|| {
            let mut t = vec!["Ingress".to_string()];
            if spec.egress.is_some() {
                t.push("Egress".into());
            }
            t
        });
        if types.iter().any(|t| t == "Egress") {
            problem("spec.egress", "egress rules are not enforced by weft's datapath yet (ingress rules are)".into());
        }
        if !types.iter().any(|t| t == "Ingress") {
            continue;
        }
        let selected: Vec<&PodState> = match pods
            .iter()
            .filter(|p| p.local && p.key.namespace == key.namespace)
            .filter_map(|p| match spec.pod_selector.as_ref().map_or(Ok(true), |sel| selects(sel, &p.labels)) {
                Ok(true) => Some(Ok(p)),
                Ok(false) => None,
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<_, _>>()
        {
            Ok(s) => s,
            Err(e) => {
                // A selector we cannot read must not open pods up: skip the
                // whole policy only after reporting it.
                problem("spec.podSelector", e);
                continue;
            }
        };
        for p in &selected {
            entries.entry(p.ip).or_default();
        }

        for (ri, rule) in spec.ingress.iter().flatten().enumerate() {
            let at = format!("spec.ingress[{ri}]");
            // Peers -> identities; None means any peer.
            let peers: Option<BTreeSet<u32>> = match rule.from.as_deref() {
                None | Some([]) => None,
                Some(from) => {
                    let mut ids = BTreeSet::new();
                    for (fi, peer) in from.iter().enumerate() {
                        match peer_identities(peer, &key.namespace, pods, namespaces, nodes, &mut cidr_ids) {
                            Ok(found) => ids.extend(found),
                            Err(e) => problem(&format!("{at}.from[{fi}]"), e),
                        }
                    }
                    Some(ids)
                }
            };
            for (pi, port) in rule.ports.iter().flatten().enumerate() {
                if port.port.is_none() && port.protocol.is_some() {
                    problem(
                        &format!("{at}.ports[{pi}]"),
                        "a protocol without a port allows every port of every protocol in weft's datapath".into(),
                    );
                }
            }
            for p in &selected {
                let ports = match rule.ports.as_deref() {
                    None | Some([]) => vec![(0u16, None)],
                    Some(ports) => {
                        let mut v = Vec::new();
                        for (pi, port) in ports.iter().enumerate() {
                            match port_entries(port, named_ports.get(&p.ip)) {
                                Ok(found) => v.extend(found),
                                Err(e) => problem(&format!("{at}.ports[{pi}]"), e),
                            }
                        }
                        v
                    }
                };
                let set = entries.entry(p.ip).or_default();
                let idents: Vec<u32> = match &peers {
                    None => vec![0],
                    Some(ids) => ids.iter().copied().collect(),
                };
                for identity in idents {
                    for (port, proto) in &ports {
                        set.insert(PolicyEntry {
                            identity,
                            port: *port,
                            proto: *proto,
                            action: PolicyAction::Allow,
                            rule_id: id,
                        });
                    }
                }
            }
        }
    }
    out.ingress = entries.into_iter().map(|(ip, set)| (ip, dedup_rules(set))).collect();
    out.cidrs = cidr_ids
        .into_iter()
        .map(|((addr, prefix_len), identity)| CidrIdentity { addr, prefix_len, identity })
        .collect();
    out
}

/// Two policies allowing the same thing would be two map keys with one slot:
/// keep the first rule id for each (identity, port, proto).
fn dedup_rules(set: BTreeSet<PolicyEntry>) -> Vec<PolicyEntry> {
    let mut seen = BTreeSet::new();
    set.into_iter().filter(|e| seen.insert((e.identity, e.port, e.proto.map(Proto::number)))).collect()
}

fn contains(net: (Ipv4Addr, u8), a: Ipv4Addr) -> bool {
    let mask = if net.1 == 0 { 0 } else { u32::MAX << (32 - net.1) };
    u32::from(a) & mask == u32::from(net.0)
}

fn peer_identities(
    peer: &NetworkPolicyPeer,
    policy_ns: &str,
    pods: &[PodState],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    nodes: &[(Ipv4Addr, u32)],
    cidr_ids: &mut BTreeMap<(Ipv4Addr, u8), u32>,
) -> Result<BTreeSet<u32>, String> {
    let mut ids = BTreeSet::new();
    if let Some(block) = &peer.ip_block {
        let (addr, len) =
            parse_cidr(&block.cidr).ok_or_else(|| format!("ipBlock.cidr {:?} is not an IPv4 CIDR", block.cidr))?;
        ids.insert(cidr_identity(cidr_ids, addr, len)?);
        let mut except = Vec::new();
        for ex in block.except.iter().flatten() {
            // An excepted prefix gets an identity of its own that no rule allows.
            let (ea, el) = parse_cidr(ex).ok_or_else(|| format!("ipBlock.except {ex:?} is not an IPv4 CIDR"))?;
            cidr_identity(cidr_ids, ea, el)?;
            except.push((ea, el));
        }
        for (ip, id) in nodes {
            if contains((addr, len), *ip) && !except.iter().any(|e| contains(*e, *ip)) {
                ids.insert(*id);
            }
        }
        return Ok(ids);
    }
    for p in pods {
        let ns_ok = match &peer.namespace_selector {
            None => p.key.namespace == policy_ns,
            Some(sel) => selects(sel, &namespace_labels(namespaces, &p.key.namespace))
                .map_err(|e| format!("namespaceSelector: {e}"))?,
        };
        if !ns_ok {
            continue;
        }
        let pod_ok = match &peer.pod_selector {
            None => true,
            Some(sel) => selects(sel, &p.labels).map_err(|e| format!("podSelector: {e}"))?,
        };
        if pod_ok {
            ids.insert(p.identity);
        }
    }
    Ok(ids)
}

/// The node-local identity of a prefix, allocated in order of first use.
fn cidr_identity(ids: &mut BTreeMap<(Ipv4Addr, u8), u32>, addr: Ipv4Addr, len: u8) -> Result<u32, String> {
    let next = abi::IDENTITY_MIN_CIDR + ids.len() as u32;
    if !ids.contains_key(&(addr, len)) && next >= abi::IDENTITY_MIN_POD {
        return Err(format!("more than {} distinct ipBlock prefixes", abi::IDENTITY_MIN_POD - abi::IDENTITY_MIN_CIDR));
    }
    Ok(*ids.entry((addr, len)).or_insert(next))
}

fn port_entries(
    port: &NetworkPolicyPort,
    named: Option<&BTreeMap<String, (u16, Proto)>>,
) -> Result<Vec<(u16, Option<Proto>)>, String> {
    let proto = match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Proto::Tcp,
        "UDP" => Proto::Udp,
        other => return Err(format!("protocol {other:?} is not supported (TCP and UDP are)")),
    };
    let first = match &port.port {
        // "Every port of this protocol": the datapath keys by exact port or
        // any port and protocol, so this becomes any port (reported by derive).
        None => return Ok(vec![(0, None)]),
        Some(IntOrString::Int(n)) => {
            u16::try_from(*n).ok().filter(|n| *n > 0).ok_or_else(|| format!("port {n} is not a port number"))?
        }
        Some(IntOrString::String(name)) => match named.and_then(|m| m.get(name)) {
            Some((n, p)) if *p == proto => *n,
            // The pod has no such port: the rule allows nothing on it.
            _ => return Ok(Vec::new()),
        },
    };
    let Some(end) = port.end_port else { return Ok(vec![(first, Some(proto))]) };
    let end = u16::try_from(end)
        .ok()
        .filter(|e| *e >= first)
        .ok_or_else(|| format!("endPort {end} is below port {first}"))?;
    if (end - first) as u32 + 1 > MAX_PORT_RANGE {
        return Err(format!("port range {first}-{end} is wider than {MAX_PORT_RANGE} ports"));
    }
    Ok((first..=end).map(|p| (p, Some(proto))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        k8s::yaml::{Loaded, load_text},
        state::{Redirects, Snapshot},
    };

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status: {addresses: [{type: InternalIP, address: 192.168.50.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 192.168.50.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: sql, containerPort: 5432}]}]}
status: {podIP: 10.1.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, containers: []}
status: {podIP: 10.1.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: probe, namespace: ops, labels: {app: probe}}
spec: {nodeName: n2, containers: []}
status: {podIP: 10.1.2.12}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: shop, labels: {app: other}}
spec: {nodeName: n1, containers: []}
status: {podIP: 10.1.1.13}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: web}}
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}
    - ipBlock: {cidr: 192.168.50.0/24, except: [192.168.50.100/32]}
    ports: [{port: sql}, {port: 9000, endPort: 9002, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-web, namespace: shop}
spec:
  podSelector: {matchExpressions: [{key: app, operator: In, values: [web]}]}
  policyTypes: [Ingress]
---
apiVersion: v1
kind: Namespace
metadata: {name: ops, labels: {team: platform}}
"#;

    fn snapshot(extra: &str) -> Snapshot {
        let mut l = Loaded::default();
        load_text(std::path::Path::new("p.yaml"), &format!("{OBJECTS}{extra}"), &mut l);
        assert!(l.problems.is_empty(), "{:?}", l.problems);
        Snapshot::derive(&l.objects, "n1", None, &Redirects::new())
    }

    fn id_of(s: &Snapshot, name: &str) -> u32 {
        s.pods.iter().find(|p| p.key.name == name).unwrap().identity
    }

    #[test]
    fn selected_pods_accept_only_their_peers_and_ports() {
        let s = snapshot("");
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        let db: Ipv4Addr = "10.1.1.10".parse().unwrap();
        let entries = &s.policy.ingress[&db];
        let allowed: BTreeSet<(u32, u16)> = entries.iter().map(|e| (e.identity, e.port)).collect();
        let cidr = s.policy.cidrs.iter().find(|c| c.prefix_len == 24).unwrap().identity;
        // The block also covers both nodes: this one (host) and the other (remote-node).
        for id in [id_of(&s, "web"), id_of(&s, "probe"), cidr, abi::ID_HOST, abi::ID_REMOTE_NODE] {
            for port in [5432, 9000, 9001, 9002] {
                assert!(allowed.contains(&(id, port)), "identity {id} port {port}: {allowed:?}");
            }
        }
        assert_eq!(allowed.len(), 20, "nothing else: {allowed:?}");
        assert!(!allowed.iter().any(|(id, _)| *id == id_of(&s, "other")));
        assert!(entries.iter().all(|e| e.rule_id == rule_id(&ObjKey::new("shop", "db-from-web"))));
        // The excepted address has an identity of its own that no entry allows.
        let except = s.policy.cidrs.iter().find(|c| c.prefix_len == 32).unwrap();
        assert_eq!(except.addr, Ipv4Addr::new(192, 168, 50, 100));
        assert!(!allowed.iter().any(|(id, _)| *id == except.identity));
    }

    #[test]
    fn namespace_selectors_match_any_label_of_the_namespace() {
        let policy = |sel: &str| {
            format!(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: other-from-ns, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: other}}}}\n  ingress: [{{from: [{{namespaceSelector: {sel}}}]}}]\n"
            )
        };
        let other: Ipv4Addr = "10.1.1.13".parse().unwrap();
        let allowed = |s: &Snapshot| s.policy.ingress[&other].iter().map(|e| e.identity).collect::<BTreeSet<u32>>();
        // ops is labelled team=platform; shop has no Namespace object (its name label alone).
        let s = snapshot(&policy("{matchLabels: {team: platform}}"));
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        assert_eq!(allowed(&s), BTreeSet::from([id_of(&s, "probe")]));
        let s = snapshot(&policy("{matchExpressions: [{key: team, operator: DoesNotExist}]}"));
        let shop: BTreeSet<u32> = ["db", "web", "other"].iter().map(|p| id_of(&s, p)).collect();
        assert_eq!(allowed(&s), shop, "namespaces without the label");
        let s = snapshot(&policy("{matchLabels: {kubernetes.io/metadata.name: ops, team: platform}}"));
        assert_eq!(allowed(&s), BTreeSet::from([id_of(&s, "probe")]), "the name label is always there");
    }

    #[test]
    fn a_policy_without_rules_denies_all_and_unselected_pods_stay_open() {
        let s = snapshot("");
        assert_eq!(s.policy.ingress[&"10.1.1.11".parse::<Ipv4Addr>().unwrap()], vec![], "web: default deny");
        assert!(!s.policy.ingress.contains_key(&"10.1.1.13".parse::<Ipv4Addr>().unwrap()), "other: no policy");
        assert!(!s.policy.ingress.contains_key(&"10.1.2.12".parse::<Ipv4Addr>().unwrap()), "remote pods are not ours");
    }

    #[test]
    fn problems_name_the_policy_and_field() {
        let s = snapshot(
            r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: shop}
spec:
  podSelector: {matchLabels: {app: other}}
  ingress:
  - from: [{namespaceSelector: {matchExpressions: [{key: team, operator: Near}]}}, {ipBlock: {cidr: 10.0.0.0/40}}]
    ports: [{port: 80, protocol: SCTP}]
  egress: [{}]
"#,
        );
        let p = s.problems.join("\n");
        assert!(p.contains("NetworkPolicy shop/bad: spec.ingress[0].from[0]: namespaceSelector: "), "{p}");
        assert!(p.contains("NetworkPolicy shop/bad: spec.ingress[0].from[1]: ipBlock.cidr \"10.0.0.0/40\""), "{p}");
        assert!(p.contains("NetworkPolicy shop/bad: spec.ingress[0].ports[0]: protocol \"SCTP\""), "{p}");
        assert!(p.contains("NetworkPolicy shop/bad: spec.egress: egress rules are not enforced"), "{p}");
        // What could not be read allows nothing: the pod is selected, with no entries.
        assert_eq!(s.policy.ingress[&"10.1.1.13".parse::<Ipv4Addr>().unwrap()], vec![]);
    }
}
