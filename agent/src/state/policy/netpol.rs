//! Kubernetes NetworkPolicy (networking.k8s.io/v1) in the common rule shape.
//! A pod a policy selects is default-deny in each direction its
//! `policyTypes` name (Ingress by default, Egress too when the policy has
//! egress rules); peers are pods by namespace and labels, or ipBlocks with
//! exceptions (which also cover the nodes they contain, as Cilium does with
//! `policy-cidr-match-mode: nodes`, so a policy can admit the node's proxy);
//! ports are numbers, ranges (`endPort`) or container port names. A rule
//! without peers admits anyone; without ports, every port. Egress is judged
//! on the connection's real destination: for a Service, the backend.

use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{
    Translated,
    rule::{Net, Peer, PodSelector, Policy, PortSel, PortSpec, Rule},
};
use crate::{
    datapath::{Direction, PolicyAction, Proto},
    k8s::{
        ObjKey,
        selector::{self, SelectorError},
    },
};

/// The kind name rule ids and verdicts carry.
pub const KIND: &str = "NetworkPolicy";

/// Adds one NetworkPolicy. Problems name the policy and the field; what
/// cannot be read allows nothing (the pods it selects stay selected).
pub fn translate(key: &ObjKey, np: &NetworkPolicy, out: &mut Translated) {
    let Some(spec) = np.spec.as_ref() else { return };
    let rule_id = out.object(KIND, key);
    let mut problems = Vec::new();
    let mut problem = |field: &str, msg: String| problems.push(format!("{field}: {msg}"));

    let types = spec.policy_types.clone().unwrap_or_else(|| {
        let mut t = vec!["Ingress".to_string()];
        if spec.egress.is_some() {
            t.push("Egress".into());
        }
        t
    });
    for t in &types {
        if t != "Ingress" && t != "Egress" {
            problem("spec.policyTypes", format!("{t:?} is not a policy type (Ingress or Egress)"));
        }
    }
    let ingress = types.iter().any(|t| t == "Ingress");
    let egress = types.iter().any(|t| t == "Egress");
    let mut rules = Vec::new();
    if ingress {
        for (ri, r) in spec.ingress.iter().flatten().enumerate() {
            let at = format!("spec.ingress[{ri}]");
            let from = (format!("{at}.from"), r.from.as_deref());
            rules.push(rule(Direction::Ingress, &at, from, r.ports.as_deref(), &key.namespace, &mut problem));
        }
    }
    if egress {
        for (ri, r) in spec.egress.iter().flatten().enumerate() {
            let at = format!("spec.egress[{ri}]");
            let to = (format!("{at}.to"), r.to.as_deref());
            rules.push(rule(Direction::Egress, &at, to, r.ports.as_deref(), &key.namespace, &mut problem));
        }
    }
    out.policies.push(Policy {
        rule_id,
        subjects: PodSelector {
            namespace: Some(key.namespace.clone()),
            namespace_labels: None,
            labels: spec.pod_selector.clone(),
        },
        ingress,
        egress,
        rules,
    });
    out.report(KIND, key, problems);
}

/// One ingress or egress rule: its peers (field path, list) and ports.
fn rule(
    direction: Direction,
    at: &str,
    (peers_at, list): (String, Option<&[NetworkPolicyPeer]>),
    port_list: Option<&[NetworkPolicyPort]>,
    ns: &str,
    problem: &mut impl FnMut(&str, String),
) -> Rule {
    let peers = peers(list, ns, &peers_at, problem);
    let (peers, ports) = match ports(port_list, at, problem) {
        Some(ports) => (peers, ports),
        None => (Vec::new(), Vec::new()),
    };
    Rule { direction, action: PolicyAction::Allow, peers, ports, proxy: None }
}

fn peers(list: Option<&[NetworkPolicyPeer]>, ns: &str, at: &str, problem: &mut impl FnMut(&str, String)) -> Vec<Peer> {
    let Some(list) = list.filter(|l| !l.is_empty()) else { return vec![Peer::Any] };
    let mut out = Vec::new();
    for (i, p) in list.iter().enumerate() {
        match peer(p, ns) {
            Ok(peer) => out.push(peer),
            Err(e) => problem(&format!("{at}[{i}]"), e.to_string()),
        }
    }
    out
}

/// A peer or port entry of a NetworkPolicy rule that cannot be enforced;
/// the message starts with the field under the entry.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum EntryError {
    #[error("ipBlock.cidr {0:?} is not an IPv4 CIDR")]
    Cidr(String),
    #[error("ipBlock.except {0:?} is not an IPv4 CIDR")]
    ExceptCidr(String),
    #[error("ipBlock.except {except:?} is not inside {cidr}")]
    ExceptOutside { except: String, cidr: String },
    #[error("{selector}: {}: {error}", .error.field())]
    Selector { selector: &'static str, error: SelectorError },
    #[error("protocol {0:?} is not supported (TCP and UDP are)")]
    Protocol(String),
    #[error("port {0} is not a port number")]
    Port(i32),
    #[error("endPort {end} is below port {port} or not a port number")]
    EndPort { port: u16, end: i32 },
    #[error("endPort with the named port {0:?}")]
    EndPortOfNamed(String),
}

fn peer(p: &NetworkPolicyPeer, ns: &str) -> Result<Peer, EntryError> {
    if let Some(block) = &p.ip_block {
        let net = Net::parse(&block.cidr).ok_or_else(|| EntryError::Cidr(block.cidr.clone()))?;
        let mut except = Vec::new();
        for ex in block.except.iter().flatten() {
            let e = Net::parse(ex).ok_or_else(|| EntryError::ExceptCidr(ex.clone()))?;
            if !net.covers(&e) {
                return Err(EntryError::ExceptOutside { except: ex.clone(), cidr: block.cidr.clone() });
            }
            except.push(e);
        }
        return Ok(Peer::Cidr { net, except });
    }
    for (what, sel) in [("namespaceSelector", &p.namespace_selector), ("podSelector", &p.pod_selector)] {
        if let Some(sel) = sel {
            selector::check(sel).map_err(|error| EntryError::Selector { selector: what, error })?;
        }
    }
    Ok(Peer::Pods(PodSelector {
        namespace: p.namespace_selector.is_none().then(|| ns.to_owned()),
        namespace_labels: p.namespace_selector.clone(),
        labels: p.pod_selector.clone(),
    }))
}

/// The rule's ports; None when it named some and none could be read.
fn ports(
    list: Option<&[NetworkPolicyPort]>,
    at: &str,
    problem: &mut impl FnMut(&str, String),
) -> Option<Vec<PortSpec>> {
    let mut out = Vec::new();
    for (i, p) in list.unwrap_or_default().iter().enumerate() {
        match port(p) {
            Ok(spec) => out.push(spec),
            Err(e) => problem(&format!("{at}.ports[{i}]"), e.to_string()),
        }
    }
    // Every port entry unreadable: the rule allows nothing (not every port).
    if out.is_empty() && list.is_some_and(|l| !l.is_empty()) { None } else { Some(out) }
}

fn port(p: &NetworkPolicyPort) -> Result<PortSpec, EntryError> {
    let proto = match p.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Proto::Tcp,
        "UDP" => Proto::Udp,
        other => return Err(EntryError::Protocol(other.into())),
    };
    let ports = match &p.port {
        None => PortSel::All,
        Some(IntOrString::Int(n)) => {
            let first = u16::try_from(*n).ok().filter(|n| *n > 0).ok_or(EntryError::Port(*n))?;
            match p.end_port {
                None => PortSel::Range(first, first),
                Some(end) => {
                    let end = u16::try_from(end)
                        .ok()
                        .filter(|e| *e >= first)
                        .ok_or(EntryError::EndPort { port: first, end })?;
                    PortSel::Range(first, end)
                }
            }
        }
        Some(IntOrString::String(name)) => {
            if p.end_port.is_some() {
                return Err(EntryError::EndPortOfNamed(name.clone()));
            }
            PortSel::Named(name.clone())
        }
    };
    Ok(PortSpec { proto: Some(proto), ports })
}
#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, net::Ipv4Addr};

    use weft_ebpf::abi;

    use super::*;
    use crate::{
        datapath::PolicyEntry,
        k8s::yaml::{Loaded, load_text},
        state::{Redirects, Snapshot, policy::rule_id},
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
spec: {nodeName: n2, containers: [{name: c, ports: [{name: sql, containerPort: 6432}]}]}
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
        Snapshot::derive(&l.objects, "n1", None, &Redirects::new(), None)
    }

    fn id_of(s: &Snapshot, name: &str) -> u32 {
        s.pods.iter().find(|p| p.key.name == name).unwrap().identity
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn cidr_id(s: &Snapshot, net: &str) -> u32 {
        let n = Net::parse(net).unwrap();
        s.policy.cidrs.iter().find(|c| c.addr == n.addr && c.prefix_len == n.len).unwrap().identity
    }

    /// (direction, identity, first port, last port) of each entry.
    fn allowed(entries: &[PolicyEntry], dir: Direction) -> BTreeSet<(u32, u16, u16)> {
        entries
            .iter()
            .filter(|e| e.direction == dir)
            .map(|e| (e.identity, e.ports.map_or(0, |p| p.0), e.ports.map_or(0, |p| p.1)))
            .collect()
    }

    #[test]
    fn selected_pods_accept_only_their_peers_and_ports() {
        let s = snapshot("");
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        let db = &s.policy.endpoints[&ip("10.1.1.10")];
        assert!(db.ingress && !db.egress);
        let allowed = allowed(&db.entries, Direction::Ingress);
        let cidr = cidr_id(&s, "192.168.50.0/24");
        // The block also covers both nodes: this one (host) and the other (remote-node).
        let mut want = BTreeSet::new();
        for id in [id_of(&s, "web"), id_of(&s, "probe"), cidr, abi::ID_HOST, abi::ID_REMOTE_NODE] {
            want.insert((id, 5432, 5432));
            want.insert((id, 9000, 9002));
        }
        assert_eq!(allowed, want);
        assert!(db.entries.iter().all(|e| e.rule_id == rule_id(KIND, &ObjKey::new("shop", "db-from-web"))));
        // The excepted address has an identity of its own that no entry allows.
        let except = cidr_id(&s, "192.168.50.100/32");
        assert!(!allowed.iter().any(|(id, _, _)| *id == except));
    }

    #[test]
    fn namespace_selectors_match_any_label_of_the_namespace() {
        let policy = |sel: &str| {
            format!(
                "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: other-from-ns, namespace: shop}}\nspec:\n  podSelector: {{matchLabels: {{app: other}}}}\n  ingress: [{{from: [{{namespaceSelector: {sel}}}]}}]\n"
            )
        };
        let allowed = |s: &Snapshot| {
            s.policy.endpoints[&ip("10.1.1.13")].entries.iter().map(|e| e.identity).collect::<BTreeSet<u32>>()
        };
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
        let web = &s.policy.endpoints[&ip("10.1.1.11")];
        assert!(web.ingress && !web.egress && web.entries.is_empty(), "web: default deny {web:?}");
        assert!(!s.policy.endpoints.contains_key(&ip("10.1.1.13")), "other: no policy");
        assert!(!s.policy.endpoints.contains_key(&ip("10.1.2.12")), "remote pods are not ours");
    }

    #[test]
    fn egress_rules_name_destinations_ports_and_the_ports_of_peer_pods() {
        let s = snapshot(
            r#"
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-out, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{port: sql}]
  - to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: probe}}}]
    ports: [{port: sql}, {protocol: UDP}]
  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.9.0.0/16]}}, {ipBlock: {cidr: 10.9.1.0/24}}]
    ports: [{port: 443, endPort: 450}]
"#,
        );
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        let web = &s.policy.endpoints[&ip("10.1.1.11")];
        assert!(web.ingress && web.egress, "deny-web selects it for ingress, web-out for egress");
        let got = allowed(&web.entries, Direction::Egress);
        let (db, probe) = (id_of(&s, "db"), id_of(&s, "probe"));
        let (wide, narrow, except) =
            (cidr_id(&s, "10.0.0.0/8"), cidr_id(&s, "10.9.1.0/24"), cidr_id(&s, "10.9.0.0/16"));
        let want = BTreeSet::from([
            // Each destination's own port of that name.
            (db, 5432, 5432),
            (probe, 6432, 6432),
            // Every UDP port of the probe.
            (probe, 0, 0),
            // The block, and the block another rule names inside it, but not its exception.
            (wide, 443, 450),
            (narrow, 443, 450),
        ]);
        assert_eq!(got, want);
        assert!(!got.iter().any(|(id, _, _)| *id == except));
        let udp = web.entries.iter().find(|e| e.identity == probe && e.ports.is_none()).unwrap();
        assert_eq!(udp.proto, Some(Proto::Udp));
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
  policyTypes: [Ingress, Egress]
  ingress:
  - from: [{namespaceSelector: {matchExpressions: [{key: team, operator: Near}]}}, {ipBlock: {cidr: 10.0.0.0/40}}]
    ports: [{port: 80, protocol: SCTP}]
  egress:
  - to: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]
"#,
        );
        let p = s.problems.join("\n");
        assert!(
            p.contains(
                "NetworkPolicy shop/bad: spec.ingress[0].from[0]: namespaceSelector: matchExpressions[0].operator: unknown operator \"Near\""
            ),
            "{p}"
        );
        assert!(p.contains("NetworkPolicy shop/bad: spec.ingress[0].from[1]: ipBlock.cidr \"10.0.0.0/40\""), "{p}");
        assert!(p.contains("NetworkPolicy shop/bad: spec.ingress[0].ports[0]: protocol \"SCTP\""), "{p}");
        assert!(
            p.contains("NetworkPolicy shop/bad: spec.egress[0].to[0]: ipBlock.except \"10.1.0.0/24\" is not inside"),
            "{p}"
        );
        // What could not be read allows nothing: the pod is selected, with no entries.
        let other = &s.policy.endpoints[&ip("10.1.1.13")];
        assert!(other.ingress && other.egress && other.entries.is_empty(), "{other:?}");
    }
}
