//! CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy in the common rule
//! shape: `endpointSelector`; `ingress`/`egress` rules with
//! `fromEndpoints`/`toEndpoints`, `fromCIDR`/`toCIDR`, `fromCIDRSet`/
//! `toCIDRSet`, `fromEntities`/`toEntities` and `toPorts` (ports, ranges,
//! named ports, TCP/UDP/ANY, and per port rule HTTP rules or a listener,
//! which send the allowed connections through the node's proxy: see
//! [`super::l7`]); `ingressDeny`/`egressDeny` (deny wins in the datapath);
//! `enableDefaultDeny`. A clusterwide rule set with a `nodeSelector` is a
//! host policy: the same rules, about the nodes whose labels match
//! ([`super::Translated::host`]).
//!
//! The rules are read field by field from the document as written, so that
//! whatever weft does not enforce (FQDN and DNS rules, L7 rules other than
//! HTTP, mutual authentication, L7 rules in host policies, ...) is refused by name
//! rather than skipped: a refused allow rule allows nothing and a refused
//! deny rule denies everything in its direction, so a policy weft cannot
//! read never opens a pod up.
//!
//! Selectors: label keys may carry Cilium's source prefix (`k8s:`, `any:`,
//! or the dotted `k8s.`), which is dropped; a namespaced policy's `endpointSelector` and peer
//! selectors stay in its namespace unless a peer selector names
//! `io.kubernetes.pod.namespace`; a clusterwide policy's span the cluster.
//! A peer selector on `reserved:<entity>` alone means that entity; an
//! `endpointSelector` on a reserved identity (Cilium's ingress proxy, say)
//! selects no pod of weft's and is refused by name.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde_json::{Map, Value};
use weft_ebpf::abi;

use super::{
    Translated,
    l7::{HeaderMatch, HttpRule, ListenerRef, Proxy},
    rule::{Net, POD_NAMESPACE_LABEL, Peer, PodSelector, Policy, PortSel, PortSpec, Rule},
};
use crate::{
    datapath::{Direction, PolicyAction, Proto},
    k8s::{
        CiliumPolicy, ObjKey,
        selector::{self as labels, SelectorError},
    },
};

/// Why a value of a Cilium policy cannot be enforced. The caller says where
/// the value is (`spec.ingress[0].toPorts[1].ports[0]`); the error names the
/// field inside it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("is not {0}")]
    NotA(&'static str),
    #[error("field {0:?} is not a field weft knows")]
    UnknownField(String),
    #[error("{field}: {why}")]
    Refused { field: String, why: &'static str },
    #[error("{0} is missing")]
    Missing(&'static str),
    #[error("protocol {0:?} is not supported (TCP, UDP and ANY are)")]
    Protocol(String),
    #[error("{field} {value} is not a port number")]
    NotAPort { field: &'static str, value: String },
    #[error("port {0:?} is neither a port number nor a container port name")]
    NotAPortName(String),
    #[error("endPort without a port")]
    EndWithoutPort,
    #[error("endPort {end} is below port {port}")]
    EndBelowPort { port: u16, end: u16 },
    #[error("endPort with the named port {0:?}")]
    EndWithNamedPort(String),
    #[error("not a label selector: {0}")]
    NotASelector(String),
    #[error("{field}: {error}", field = .0.field(), error = .0)]
    Selector(SelectorError),
    #[error("reserved:{0} with other labels selects nothing weft can enforce")]
    ReservedWithOtherLabels(String),
    #[error("reserved:{0} selects nothing")]
    ReservedNothing(String),
    #[error("{0:?} is not an IPv4 CIDR")]
    NotACidr(String),
    #[error("except {except:?} is not inside {net}")]
    ExceptOutside { except: String, net: Net },
    #[error("entity {0:?} is not supported (all, world, world-ipv4, cluster, host, remote-node and none are)")]
    Entity(String),
    #[error("{field}: {value:?} is not a regular expression weft can check: {error}")]
    Regex { field: &'static str, value: String, error: String },
    #[error("{field}: {value:?} is not a header name")]
    HeaderName { field: &'static str, value: String },
    #[error("{0}: HTTP rules and listeners apply to TCP ports only")]
    ProxyNeedsTcp(&'static str),
    #[error(
        "kind {0:?} is not an EnvoyConfig kind (CiliumEnvoyConfig, CiliumClusterwideEnvoyConfig, EnvoyConfig, ClusterwideEnvoyConfig)"
    )]
    ConfigKind(String),
    #[error("a clusterwide policy can only name a clusterwide EnvoyConfig")]
    NamespacedConfigFromClusterwide,
}

/// The namespaced kind.
pub const KIND: &str = "CiliumNetworkPolicy";
/// The clusterwide kind.
pub const CLUSTERWIDE_KIND: &str = "CiliumClusterwideNetworkPolicy";

/// Fields of a rule set weft reads.
const SPEC_FIELDS: &[&str] = &[
    "endpointSelector",
    "nodeSelector",
    "ingress",
    "ingressDeny",
    "egress",
    "egressDeny",
    "enableDefaultDeny",
    "description",
    "labels",
];
/// Fields of a port rule weft reads.
const PORT_RULE_FIELDS: &[&str] = &["ports", "rules", "listener"];
/// Fields of an HTTP rule weft reads.
const HTTP_FIELDS: &[&str] = &["method", "path", "host", "headers", "headerMatches"];

/// Why a field weft knows of is not enforced (None: a field weft does not know).
fn refusal(field: &str) -> Option<&'static str> {
    Some(match field {
        "toFQDNs" => "FQDN rules are not supported (weft has no DNS proxy)",
        "dns" => "DNS rules are not supported (weft has no DNS proxy)",
        "kafka" | "l7proto" | "l7" => "L7 rules other than HTTP are not supported",
        "mismatch" => "header mismatch actions (LOG, ADD, DELETE, REPLACE) are not supported",
        "secret" => "header values from Secrets are not supported",
        "authentication" => "mutual authentication is not supported",
        "fromRequires" | "toRequires" => "requirement selectors are not supported",
        "toServices" => "Service selectors are not supported (select the backends' pods)",
        "fromGroups" | "toGroups" | "cidrGroupRef" | "cidrGroupSelector" => "CIDR groups are not supported",
        "fromNodes" | "toNodes" => "node selectors are not supported (use the remote-node or host entity)",
        "icmps" => "ICMP rules are not supported",
        "terminatingTLS" | "originatingTLS" | "serverNames" => "TLS interception is not supported",
        _ => return None,
    })
}

/// Adds one Cilium policy (`clusterwide`: the cluster-scoped kind); its
/// problems (each naming the field) go to `out.problems`.
pub fn translate(key: &ObjKey, p: &CiliumPolicy, clusterwide: bool, out: &mut Translated) {
    let kind = if clusterwide { CLUSTERWIDE_KIND } else { KIND };
    let rule_id = out.object(kind, key);
    let mut problems = Vec::new();
    let mut problem = |field: &str, msg: String| problems.push(format!("{field}: {msg}"));
    let scope = if clusterwide { None } else { Some(key.namespace.as_str()) };
    let mut specs: Vec<(String, &Value)> = Vec::new();
    if let Some(spec) = p.spec.as_ref().filter(|s| !s.is_null()) {
        specs.push(("spec".to_owned(), spec));
    }
    match &p.specs {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => specs.extend(list.iter().enumerate().map(|(i, s)| (format!("specs[{i}]"), s))),
        Some(_) => problem("specs", "is not a list (the policy's other rule sets still apply)".into()),
    }
    if specs.is_empty() {
        problem("spec", "the policy has neither spec nor specs".into());
    }
    for (at, spec) in specs {
        match one_spec(spec, &at, scope, rule_id, &mut problem) {
            Some((policy, Subject::Pods)) => out.policies.push(policy),
            Some((policy, Subject::Node)) => out.host.push(policy),
            None => {}
        }
    }
    out.report(kind, key, problems);
}

/// What of one Cilium policy cannot be enforced as written, whatever the
/// node (each problem names its field): what `weft-agent validate` and the
/// object's status say.
pub fn problems(key: &ObjKey, p: &CiliumPolicy, clusterwide: bool) -> Vec<String> {
    let mut t = Translated::default();
    translate(key, p, clusterwide, &mut t);
    t.problems.into_values().flatten().collect()
}

/// Reports each field of `obj` not in `known`; false if there was one.
fn check_fields(obj: &Map<String, Value>, at: &str, known: &[&str], problem: &mut impl FnMut(&str, String)) -> bool {
    let mut ok = true;
    for k in obj.keys().filter(|k| !known.contains(&k.as_str())) {
        ok = false;
        match refusal(k) {
            Some(why) => problem(&format!("{at}.{k}"), why.to_owned()),
            None => problem(&format!("{at}.{k}"), "is not a field weft knows".to_owned()),
        }
    }
    ok
}

/// A list field: absent and null are empty; anything else must be a list.
fn list<'v>(
    obj: &'v Map<String, Value>,
    field: &str,
    at: &str,
    problem: &mut impl FnMut(&str, String),
) -> Result<&'v [Value], ()> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => {
            problem(&format!("{at}.{field}"), "is not a list".into());
            Err(())
        }
    }
}

/// What a rule set is about: pods (`endpointSelector`) or nodes
/// (`nodeSelector`: a host policy, whose subjects' labels select nodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Subject {
    Pods,
    Node,
}

fn one_spec(
    spec: &Value,
    at: &str,
    scope: Option<&str>,
    rule_id: u32,
    problem: &mut impl FnMut(&str, String),
) -> Option<(Policy, Subject)> {
    let Some(spec) = spec.as_object() else {
        problem(at, "is not an object".into());
        return None;
    };
    if let Some(sel) = spec.get("nodeSelector") {
        return host_spec(spec, sel, at, scope, rule_id, problem).map(|p| (p, Subject::Node));
    }
    let Some(sel) = spec.get("endpointSelector") else {
        problem(&format!("{at}.endpointSelector"), "is missing (it selects the pods the rules are about)".into());
        return None;
    };
    let labels = match selector(sel) {
        Ok(s) => s,
        Err(e) => {
            problem(&format!("{at}.endpointSelector"), e.to_string());
            return None;
        }
    };
    if let Some(reserved) = keys(&labels).find_map(|k| k.strip_prefix("reserved:")) {
        problem(
            &format!("{at}.endpointSelector"),
            format!("selects Cilium's reserved identity {reserved:?}; weft enforces policies on pods only"),
        );
        return None;
    }
    let subjects = PodSelector { namespace: scope.map(str::to_owned), namespace_labels: None, labels: Some(labels) };
    rule_set(spec, at, scope, rule_id, subjects, Subject::Pods, problem).map(|p| (p, Subject::Pods))
}

/// A rule set with a `nodeSelector`: a host policy, about the nodes whose
/// Node labels match (the selector is kept as the subjects' labels). Only
/// a clusterwide policy may have one, and not beside an `endpointSelector`
/// (Cilium refuses both as well).
fn host_spec(
    spec: &Map<String, Value>,
    sel: &Value,
    at: &str,
    scope: Option<&str>,
    rule_id: u32,
    problem: &mut impl FnMut(&str, String),
) -> Option<Policy> {
    let field = format!("{at}.nodeSelector");
    if scope.is_some() {
        problem(&field, "host policies must be CiliumClusterwideNetworkPolicy (a namespaced policy selects no node; Cilium refuses it too)".into());
        return None;
    }
    if spec.contains_key("endpointSelector") {
        problem(&field, "nodeSelector and endpointSelector together: a rule set is about pods or about nodes".into());
        return None;
    }
    let labels = match selector(sel) {
        Ok(s) => s,
        Err(e) => {
            problem(&field, e.to_string());
            return None;
        }
    };
    let subjects = PodSelector { namespace: None, namespace_labels: None, labels: Some(labels) };
    rule_set(spec, at, None, rule_id, subjects, Subject::Node, problem)
}

/// The rules of a rule set about `subjects`.
fn rule_set(
    spec: &Map<String, Value>,
    at: &str,
    scope: Option<&str>,
    rule_id: u32,
    subjects: PodSelector,
    about: Subject,
    problem: &mut impl FnMut(&str, String),
) -> Option<Policy> {
    // An unknown field may be a restriction weft would miss: the subjects
    // stay selected in both directions with nothing allowed.
    if !check_fields(spec, at, SPEC_FIELDS, problem) {
        return Some(Policy { rule_id, subjects, ingress: true, egress: true, rules: Vec::new() });
    }

    let mut rules = Vec::new();
    let mut has = [false, false];
    for (field, direction, action) in [
        ("ingress", Direction::Ingress, PolicyAction::Allow),
        ("ingressDeny", Direction::Ingress, PolicyAction::Deny),
        ("egress", Direction::Egress, PolicyAction::Allow),
        ("egressDeny", Direction::Egress, PolicyAction::Deny),
    ] {
        let i = usize::from(direction == Direction::Egress);
        let Ok(items) = list(spec, field, at, problem) else {
            // Unreadable: the direction is under default-deny, nothing allowed.
            has[i] = true;
            continue;
        };
        has[i] |= !items.is_empty();
        for (ri, r) in items.iter().enumerate() {
            rules.extend(rule(r, &format!("{at}.{field}[{ri}]"), direction, action, scope, about, problem));
        }
    }
    // Default-deny in each direction that has rules, unless the policy says
    // otherwise (a direction without rules may still be put under it).
    let mut default_deny = |dir: &str, has: bool| match spec.get("enableDefaultDeny").and_then(|d| d.get(dir)) {
        None | Some(Value::Null) => has,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            problem(&format!("{at}.enableDefaultDeny.{dir}"), "is not true or false".into());
            true
        }
    };
    let ingress = default_deny("ingress", has[0]);
    let egress = default_deny("egress", has[1]);
    Some(Policy { rule_id, subjects, ingress, egress, rules })
}

/// One rule, as one datapath rule per way its ports go (straight on, or
/// through a proxy). What cannot be read makes an allow rule allow nothing
/// and a deny rule deny every peer on every port.
fn rule(
    r: &Value,
    at: &str,
    direction: Direction,
    action: PolicyAction,
    scope: Option<&str>,
    about: Subject,
    problem: &mut impl FnMut(&str, String),
) -> Vec<Rule> {
    let (endpoints, cidr, cidr_set, entities) = match direction {
        Direction::Ingress => ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities"),
        Direction::Egress => ("toEndpoints", "toCIDR", "toCIDRSet", "toEntities"),
    };
    let refused = |problem: &mut dyn FnMut(&str, String)| {
        let (peers, what) = match action {
            PolicyAction::Allow => (Vec::new(), "the rule allows nothing"),
            PolicyAction::Deny => (vec![Peer::Any], "the rule denies every peer on every port"),
        };
        problem(at, format!("{what} (see the problems above)"));
        vec![Rule { direction, action, peers, ports: Vec::new(), proxy: None }]
    };
    let Some(obj) = r.as_object() else {
        problem(at, FieldError::NotA("an object").to_string());
        return refused(problem);
    };
    let mut ok = check_fields(obj, at, &[endpoints, cidr, cidr_set, entities, "toPorts"], problem);
    let mut peers = Vec::new();
    let mut l3 = false;
    let mut each = |field: &str, read: &mut dyn FnMut(&Value) -> Result<Vec<Peer>, FieldError>| {
        let Ok(items) = list(obj, field, at, problem) else { return false };
        let mut ok = true;
        for (i, v) in items.iter().enumerate() {
            l3 = true;
            match read(v) {
                Ok(p) => peers.extend(p),
                Err(e) => {
                    problem(&format!("{at}.{field}[{i}]"), e.to_string());
                    ok = false;
                }
            }
        }
        ok
    };
    fn text(v: &Value) -> Result<&str, FieldError> {
        v.as_str().ok_or(FieldError::NotA("a string"))
    }
    ok &= each(endpoints, &mut |v| endpoint_peer(v, scope).map(|p| vec![p]));
    ok &= each(cidr, &mut |v| Ok(vec![Peer::Cidr { net: cidr_of(text(v)?)?, except: Vec::new() }]));
    ok &= each(cidr_set, &mut |v| cidr_set_peer(v).map(|p| vec![p]));
    ok &= each(entities, &mut |v| entity(text(v)?));
    // No peer field: the rule is about every peer (an L4-only rule).
    if !l3 {
        peers.push(Peer::Any);
    }
    let port_rules = match to_ports(obj, at, scope, problem) {
        Some(p) => p,
        None => {
            ok = false;
            Vec::new()
        }
    };
    if ok && action == PolicyAction::Deny && port_rules.iter().any(|(_, proxy)| proxy.is_some()) {
        problem(&format!("{at}.toPorts"), "HTTP rules and listeners cannot deny (Cilium refuses them too)".into());
        ok = false;
    }
    if ok && about == Subject::Node {
        // The node's own traffic never passes its proxy, and the node has
        // no container ports to name.
        if port_rules.iter().any(|(_, proxy)| proxy.is_some()) {
            problem(
                &format!("{at}.toPorts"),
                "HTTP rules and listeners are not enforced in host policies (nor by Cilium)".into(),
            );
            ok = false;
        }
        let named = |specs: &[PortSpec]| specs.iter().any(|s| matches!(s.ports, PortSel::Named(_)));
        if direction == Direction::Ingress && port_rules.iter().any(|(specs, _)| named(specs)) {
            problem(
                &format!("{at}.toPorts"),
                "a named port in a host policy's ingress names nothing (the node has no container ports)".into(),
            );
            ok = false;
        }
    }
    if !ok {
        return refused(problem);
    }
    if port_rules.is_empty() {
        return vec![Rule { direction, action, peers, ports: Vec::new(), proxy: None }];
    }
    let mut straight = Vec::new();
    let mut out = Vec::new();
    for (ports, proxy) in port_rules {
        match proxy {
            None => straight.extend(ports),
            Some(proxy) => out.push(Rule { direction, action, peers: peers.clone(), ports, proxy: Some(proxy) }),
        }
    }
    if !straight.is_empty() {
        out.push(Rule { direction, action, peers, ports: straight, proxy: None });
    }
    out
}

/// `toPorts`: each port rule's ports (empty: every port) and where its
/// connections go. None if a port rule could not be read or asks for what
/// weft does not enforce.
fn to_ports(
    obj: &Map<String, Value>,
    at: &str,
    scope: Option<&str>,
    problem: &mut impl FnMut(&str, String),
) -> Option<Vec<(Vec<PortSpec>, Option<Proxy>)>> {
    let items = list(obj, "toPorts", at, problem).ok()?;
    let mut out = Vec::new();
    let mut ok = true;
    for (i, pr) in items.iter().enumerate() {
        let at = format!("{at}.toPorts[{i}]");
        let Some(pr) = pr.as_object() else {
            problem(&at, FieldError::NotA("an object").to_string());
            ok = false;
            continue;
        };
        ok &= check_fields(pr, &at, PORT_RULE_FIELDS, problem);
        let mut proxy = None;
        match pr.get("rules") {
            None | Some(Value::Null) => {}
            Some(Value::Object(rules)) => {
                let rat = format!("{at}.rules");
                ok &= check_fields(rules, &rat, &["http"], problem);
                match http_rules(rules, &rat, problem) {
                    Some(Some(h)) => proxy = Some(Proxy::Http(h)),
                    Some(None) => {}
                    None => ok = false,
                }
            }
            Some(_) => {
                problem(&format!("{at}.rules"), FieldError::NotA("an object").to_string());
                ok = false;
            }
        }
        match pr.get("listener") {
            None | Some(Value::Null) => {}
            Some(l) => match listener(l, scope) {
                Ok(_) if proxy.is_some() => {
                    problem(&format!("{at}.listener"), "a port rule has either HTTP rules or a listener".into());
                    ok = false;
                }
                Ok(l) => proxy = Some(Proxy::Listener(l)),
                Err(e) => {
                    problem(&format!("{at}.listener"), e.to_string());
                    ok = false;
                }
            },
        }
        let Ok(ports) = list(pr, "ports", &at, problem) else {
            ok = false;
            continue;
        };
        let mut specs = Vec::new();
        if ports.is_empty() {
            specs.push(PortSpec { proto: None, ports: PortSel::All });
        }
        for (j, p) in ports.iter().enumerate() {
            match port(p) {
                Ok(spec) => specs.push(spec),
                Err(e) => {
                    problem(&format!("{at}.ports[{j}]"), e.to_string());
                    ok = false;
                }
            }
        }
        if proxy.is_some() {
            // The proxy speaks TCP: ANY means TCP here.
            for (j, s) in specs.iter_mut().enumerate() {
                match s.proto {
                    None | Some(Proto::Tcp) => s.proto = Some(Proto::Tcp),
                    Some(_) => {
                        problem(&format!("{at}.ports[{j}]"), FieldError::ProxyNeedsTcp("protocol").to_string());
                        ok = false;
                    }
                }
            }
        }
        out.push((specs, proxy));
    }
    ok.then_some(out)
}

/// `rules.http`: Some(None) when there is none, None when it cannot be read.
fn http_rules(
    rules: &Map<String, Value>,
    at: &str,
    problem: &mut impl FnMut(&str, String),
) -> Option<Option<Vec<HttpRule>>> {
    let items = list(rules, "http", at, problem).ok()?;
    if rules.get("http").is_none_or(Value::is_null) {
        return Some(None);
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (i, h) in items.iter().enumerate() {
        let at = format!("{at}.http[{i}]");
        match http_rule(h) {
            Ok(r) => out.push(r),
            Err(e) => {
                problem(&at, e.to_string());
                ok = false;
            }
        }
    }
    // An empty list allows every request (Cilium's meaning), through the proxy.
    if out.is_empty() && ok {
        out.push(HttpRule::default());
    }
    ok.then_some(Some(out))
}

/// The most a regular expression of a rule may compile to: Envoy compiles
/// it again for every listener update.
const MAX_REGEX_BYTES: usize = 64 * 1024;

fn regex_field(obj: &Map<String, Value>, field: &'static str) -> Result<Option<String>, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => {
            // Envoy's RE2 and this crate share their syntax; what this one
            // refuses Envoy would refuse, taking every policy rule with it.
            regex::RegexBuilder::new(s).size_limit(MAX_REGEX_BYTES).build().map_err(|e| FieldError::Regex {
                field,
                value: s.chars().take(64).collect(),
                error: e.to_string().lines().last().unwrap_or_default().to_owned(),
            })?;
            Ok(Some(s.clone()))
        }
        Some(_) => Err(FieldError::Refused { field: field.into(), why: "is not a string" }),
    }
}

fn header_name(name: &str, field: &'static str) -> Result<String, FieldError> {
    let name = name.trim();
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || name.len() > 256 || !name.bytes().all(token) {
        return Err(FieldError::HeaderName { field, value: name.chars().take(64).collect() });
    }
    Ok(name.to_ascii_lowercase())
}

/// One `{method, path, host, headers, headerMatches}`.
fn http_rule(h: &Value) -> Result<HttpRule, FieldError> {
    let obj = h.as_object().ok_or(FieldError::NotA("an object"))?;
    if let Some(k) = obj.keys().find(|k| !HTTP_FIELDS.contains(&k.as_str())) {
        return Err(FieldError::UnknownField(k.clone()));
    }
    let mut rule = HttpRule {
        method: regex_field(obj, "method")?,
        path: regex_field(obj, "path")?,
        host: regex_field(obj, "host")?,
        headers: Vec::new(),
    };
    for v in obj.get("headers").and_then(Value::as_array).into_iter().flatten() {
        let s = v.as_str().ok_or(FieldError::Refused { field: "headers".into(), why: "holds a non-string" })?;
        // "Name" (present) or "Name: value" (exactly that value).
        let (name, value) = match s.split_once(':') {
            Some((n, v)) => (n, Some(v.trim().to_owned())),
            None => (s, None),
        };
        rule.headers.push(HeaderMatch { name: header_name(name, "headers")?, value });
    }
    for m in obj.get("headerMatches").and_then(Value::as_array).into_iter().flatten() {
        let m =
            m.as_object().ok_or(FieldError::Refused { field: "headerMatches".into(), why: "holds a non-object" })?;
        if let Some(k) = m.keys().find(|k| !["name", "value"].contains(&k.as_str())) {
            return Err(match refusal(k) {
                Some(why) => FieldError::Refused { field: format!("headerMatches.{k}"), why },
                None => FieldError::UnknownField(format!("headerMatches.{k}")),
            });
        }
        let name = m.get("name").and_then(Value::as_str).ok_or(FieldError::Missing("headerMatches.name"))?;
        let value = m.get("value").and_then(Value::as_str).map(str::to_owned);
        rule.headers.push(HeaderMatch { name: header_name(name, "headerMatches.name")?, value });
    }
    Ok(rule)
}

/// `listener: {envoyConfig: {kind, name}, name}`: a namespaced config is in
/// the policy's namespace.
fn listener(l: &Value, scope: Option<&str>) -> Result<ListenerRef, FieldError> {
    let obj = l.as_object().ok_or(FieldError::NotA("an object"))?;
    if let Some(k) = obj.keys().find(|k| !["envoyConfig", "name"].contains(&k.as_str())) {
        return Err(FieldError::UnknownField(k.clone()));
    }
    let cfg = obj.get("envoyConfig").and_then(Value::as_object).ok_or(FieldError::Missing("envoyConfig"))?;
    if let Some(k) = cfg.keys().find(|k| !["kind", "name"].contains(&k.as_str())) {
        return Err(FieldError::UnknownField(format!("envoyConfig.{k}")));
    }
    let kind = cfg.get("kind").and_then(Value::as_str).unwrap_or("CiliumEnvoyConfig");
    let clusterwide = match kind {
        "CiliumClusterwideEnvoyConfig" | "ClusterwideEnvoyConfig" => true,
        "CiliumEnvoyConfig" | "EnvoyConfig" => false,
        other => return Err(FieldError::ConfigKind(other.to_owned())),
    };
    let config = cfg.get("name").and_then(Value::as_str).ok_or(FieldError::Missing("envoyConfig.name"))?;
    let name = obj.get("name").and_then(Value::as_str).ok_or(FieldError::Missing("name"))?;
    let namespace = match (clusterwide, scope) {
        (true, _) => String::new(),
        (false, Some(ns)) => ns.to_owned(),
        (false, None) => return Err(FieldError::NamespacedConfigFromClusterwide),
    };
    Ok(ListenerRef { clusterwide, namespace, config: config.to_owned(), listener: name.to_owned() })
}

/// One `{port, endPort, protocol}`: "0" or no port is every port; a name is
/// a container port of the destination.
fn port(p: &Value) -> Result<PortSpec, FieldError> {
    let obj = p.as_object().ok_or(FieldError::NotA("an object"))?;
    if let Some(k) = obj.keys().find(|k| !["port", "endPort", "protocol"].contains(&k.as_str())) {
        return Err(FieldError::UnknownField(k.clone()));
    }
    let proto = match obj.get("protocol").and_then(Value::as_str).unwrap_or("ANY") {
        "ANY" | "" => None,
        "TCP" => Some(Proto::Tcp),
        "UDP" => Some(Proto::Udp),
        other => return Err(FieldError::Protocol(other.to_owned())),
    };
    let port = match obj.get("port") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(other) => return Err(FieldError::NotAPort { field: "port", value: other.to_string() }),
    };
    let end = match obj.get("endPort") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|e| u16::try_from(e).ok())
                .ok_or_else(|| FieldError::NotAPort { field: "endPort", value: v.to_string() })?,
        ),
    };
    let ports = if port.is_empty() || port == "0" {
        if end.is_some() {
            return Err(FieldError::EndWithoutPort);
        }
        PortSel::All
    } else if port.bytes().all(|b| b.is_ascii_digit()) {
        let first = port
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| FieldError::NotAPort { field: "port", value: format!("{port:?}") })?;
        match end {
            None => PortSel::Range(first, first),
            Some(e) if e >= first => PortSel::Range(first, e),
            Some(e) => return Err(FieldError::EndBelowPort { port: first, end: e }),
        }
    } else {
        let valid = port.len() <= 15 && port.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(FieldError::NotAPortName(port));
        }
        if end.is_some() {
            return Err(FieldError::EndWithNamedPort(port));
        }
        PortSel::Named(port)
    };
    Ok(PortSpec { proto, ports })
}

/// A label selector, with Cilium's source prefixes dropped from its keys;
/// an operator the matcher does not know is an error naming it.
fn selector(v: &Value) -> Result<LabelSelector, FieldError> {
    let mut sel: LabelSelector =
        serde_json::from_value(v.clone()).map_err(|e| FieldError::NotASelector(e.to_string()))?;
    let strip = |k: &str| {
        if let Some(key) = k.strip_prefix("k8s:").or_else(|| k.strip_prefix("any:")) {
            return key.to_owned();
        }
        // Cilium's dotted form (`k8s.io.kubernetes.pod.namespace`), for keys
        // without a prefix of their own (`k8s.io/name` is a Kubernetes key).
        if !k.contains('/') {
            if let Some(key) = k.strip_prefix("k8s.").or_else(|| k.strip_prefix("any.")) {
                return key.to_owned();
            }
            if let Some(entity) = k.strip_prefix("reserved.") {
                return format!("reserved:{entity}");
            }
        }
        k.to_owned()
    };
    if let Some(m) = sel.match_labels.take() {
        sel.match_labels = Some(m.into_iter().map(|(k, v)| (strip(&k), v)).collect());
    }
    for e in sel.match_expressions.iter_mut().flatten() {
        e.key = strip(&e.key);
    }
    labels::check(&sel).map_err(FieldError::Selector)?;
    Ok(sel)
}

fn keys(sel: &LabelSelector) -> impl Iterator<Item = &String> {
    sel.match_labels.iter().flatten().map(|(k, _)| k).chain(sel.match_expressions.iter().flatten().map(|e| &e.key))
}

/// A peer selector: pods (in the policy's namespace unless it names one), or
/// a reserved identity written as `reserved:<entity>`.
fn endpoint_peer(v: &Value, scope: Option<&str>) -> Result<Peer, FieldError> {
    let sel = selector(v)?;
    let reserved = keys(&sel).find_map(|k| k.strip_prefix("reserved:")).map(str::to_owned);
    if let Some(e) = reserved {
        let only = sel.match_expressions.as_ref().is_none_or(Vec::is_empty)
            && sel.match_labels.as_ref().is_some_and(|m| m.len() == 1);
        if !only {
            return Err(FieldError::ReservedWithOtherLabels(e));
        }
        let mut peers = entity(&e)?;
        return peers.pop().ok_or(FieldError::ReservedNothing(e));
    }
    let names_namespace = keys(&sel).any(|k| k == POD_NAMESPACE_LABEL);
    Ok(Peer::Pods(PodSelector {
        namespace: scope.filter(|_| !names_namespace).map(str::to_owned),
        namespace_labels: None,
        labels: Some(sel),
    }))
}

fn cidr_of(s: &str) -> Result<Net, FieldError> {
    Net::parse(s).ok_or_else(|| FieldError::NotACidr(s.to_owned()))
}

/// `{cidr, except}`.
fn cidr_set_peer(v: &Value) -> Result<Peer, FieldError> {
    let obj = v.as_object().ok_or(FieldError::NotA("an object"))?;
    if let Some(k) = obj.keys().find(|k| !["cidr", "except"].contains(&k.as_str())) {
        return Err(match refusal(k) {
            Some(why) => FieldError::Refused { field: k.clone(), why },
            None => FieldError::UnknownField(k.clone()),
        });
    }
    let net = cidr_of(obj.get("cidr").and_then(Value::as_str).ok_or(FieldError::Missing("cidr"))?)?;
    let mut except = Vec::new();
    for e in obj.get("except").and_then(Value::as_array).into_iter().flatten() {
        let s = e.as_str().ok_or(FieldError::Refused { field: "except".into(), why: "holds a non-string" })?;
        let n = cidr_of(s)?;
        if !net.covers(&n) {
            return Err(FieldError::ExceptOutside { except: s.to_owned(), net });
        }
        except.push(n);
    }
    Ok(Peer::Cidr { net, except })
}

/// An entity as peers (`none` is no peer).
fn entity(name: &str) -> Result<Vec<Peer>, FieldError> {
    Ok(match name {
        "all" => vec![Peer::Any],
        "world" | "world-ipv4" => vec![Peer::World],
        "cluster" => vec![Peer::Cluster],
        "host" => vec![Peer::Identity(abi::ID_HOST)],
        "remote-node" => vec![Peer::Identity(abi::ID_REMOTE_NODE)],
        "none" => Vec::new(),
        other => return Err(FieldError::Entity(other.to_owned())),
    })
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, net::Ipv4Addr};

    use super::*;
    use crate::{
        datapath::PolicyEntry,
        k8s::yaml::{Loaded, load_text},
        state::{Redirects, Snapshot, policy::rule_id},
    };

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Node
metadata: {name: n1, labels: {role: edge}}
status: {addresses: [{type: InternalIP, address: 192.168.50.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
status: {addresses: [{type: InternalIP, address: 192.168.50.2}]}
---
apiVersion: v1
kind: Pod
metadata: {name: echo, namespace: shop, labels: {app: echo}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.1.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: worker, namespace: shop, labels: {app: worker}}
spec: {nodeName: n2, containers: []}
status: {podIP: 10.1.2.11}
---
apiVersion: v1
kind: Pod
metadata: {name: worker, namespace: ops, labels: {app: worker}}
spec: {nodeName: n2, containers: []}
status: {podIP: 10.1.2.12}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: ops, labels: {app: client}}
spec: {nodeName: n1, containers: []}
status: {podIP: 10.1.1.13}
"#;

    fn snapshot(policies: &str) -> Snapshot {
        let mut l = Loaded::default();
        load_text(std::path::Path::new("p.yaml"), &format!("{OBJECTS}{policies}"), &mut l);
        assert!(l.problems.is_empty(), "{:?}", l.problems);
        Snapshot::derive(&l.objects, "n1", None, &Redirects::new(), None)
    }

    fn id_of(s: &Snapshot, ns: &str, name: &str) -> u32 {
        s.pods.iter().find(|p| p.key.namespace == ns && p.key.name == name).unwrap().identity
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn cidr_id(s: &Snapshot, net: &str) -> u32 {
        let n = Net::parse(net).unwrap();
        s.policy.cidrs.iter().find(|c| c.addr == n.addr && c.prefix_len == n.len).unwrap().identity
    }

    /// (identity, proto, first port, last port) of each entry of a direction and action.
    fn entries(e: &[PolicyEntry], dir: Direction, action: PolicyAction) -> BTreeSet<(u32, Option<Proto>, u16, u16)> {
        e.iter()
            .filter(|e| e.direction == dir && e.action == action)
            .map(|e| (e.identity, e.proto, e.ports.map_or(0, |p| p.0), e.ports.map_or(0, |p| p.1)))
            .collect()
    }

    #[test]
    fn a_cilium_policy_allows_its_peers_and_ports_and_its_deny_rules_win() {
        let s = snapshot(
            r#"
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: echo, namespace: shop}
spec:
  endpointSelector: {matchLabels: {"k8s:app": echo}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: worker}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - fromEndpoints: [{matchLabels: {app: worker, k8s:io.kubernetes.pod.namespace: ops}}]
    toPorts: [{ports: [{port: http}]}]
  - fromEntities: [host, remote-node]
  - fromCIDRSet: [{cidr: 172.18.0.0/16, except: [172.18.1.0/24]}]
    fromCIDR: [10.200.0.1/32]
    toPorts: [{ports: [{port: "9000", endPort: 9010, protocol: ANY}]}]
  ingressDeny:
  - fromEntities: [world]
    toPorts: [{ports: [{port: "9005", protocol: UDP}]}]
  egress:
  - toEntities: [cluster]
"#,
        );
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        let echo = &s.policy.endpoints[&ip("10.1.1.10")];
        assert!(echo.ingress && echo.egress);
        let (shop_worker, ops_worker) = (id_of(&s, "shop", "worker"), id_of(&s, "ops", "worker"));
        let (block, except, one) =
            (cidr_id(&s, "172.18.0.0/16"), cidr_id(&s, "172.18.1.0/24"), cidr_id(&s, "10.200.0.1/32"));
        let tcp = Some(Proto::Tcp);
        let want = BTreeSet::from([
            // fromEndpoints stays in the policy's namespace unless it names one.
            (shop_worker, tcp, 8080, 8080),
            (ops_worker, tcp, 8080, 8080),
            (abi::ID_HOST, None, 0, 0),
            (abi::ID_REMOTE_NODE, None, 0, 0),
            // ANY with ports: those ports of TCP and of UDP.
            (block, tcp, 9000, 9010),
            (one, tcp, 9000, 9010),
            (block, Some(Proto::Udp), 9000, 9010),
            (one, Some(Proto::Udp), 9000, 9010),
        ]);
        assert_eq!(entries(&echo.entries, Direction::Ingress, PolicyAction::Allow), want);
        // The datapath reads no ports without a protocol.
        assert!(echo.entries.iter().all(|e| e.proto.is_some() || e.ports.is_none()), "{echo:?}");
        assert!(!echo.entries.iter().any(|e| e.identity == except && e.action == PolicyAction::Allow));
        // world: the reserved identity and every prefix a policy names.
        let denied = entries(&echo.entries, Direction::Ingress, PolicyAction::Deny);
        let udp = Some(Proto::Udp);
        for id in [abi::ID_WORLD, block, except, one] {
            assert!(denied.contains(&(id, udp, 9005, 9005)), "{id}: {denied:?}");
        }
        // cluster: every pod, this node and the others.
        let out = entries(&echo.entries, Direction::Egress, PolicyAction::Allow);
        for id in [shop_worker, ops_worker, id_of(&s, "ops", "client"), abi::ID_HOST, abi::ID_REMOTE_NODE] {
            assert!(out.contains(&(id, None, 0, 0)), "{id}: {out:?}");
        }
        assert!(!out.iter().any(|(id, ..)| *id == abi::ID_WORLD));
        let id = rule_id("CiliumNetworkPolicy", &ObjKey::new("shop", "echo"));
        assert!(echo.entries.iter().all(|e| e.rule_id == id));
        assert_eq!(s.policy.rules[&id].kind, "CiliumNetworkPolicy");
        // Only the selected pod of the policy's namespace.
        assert!(!s.policy.endpoints.contains_key(&ip("10.1.1.13")));
    }

    #[test]
    fn host_policies_select_nodes_by_their_labels_and_give_the_node_its_entries() {
        let policies = r#"
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: edge}
spec:
  nodeSelector: {matchLabels: {role: edge}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: worker}}]
    toPorts: [{ports: [{port: "9100", protocol: TCP}]}]
  - fromEntities: [remote-node]
  ingressDeny:
  - fromCIDR: [10.200.0.1/32]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: elsewhere}
specs:
- nodeSelector: {matchLabels: {role: core}}
  egress: [{toEntities: [world]}]
- endpointSelector: {matchLabels: {app: client}}
  egress: [{toEntities: [cluster]}]
"#;
        let s = snapshot(policies);
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        // Only n1 carries role=edge: it is selected, in the ingress direction only.
        let host = s.policy.host.as_ref().expect("n1 is selected by a host policy");
        assert!(host.ingress && !host.egress, "{host:?}");
        let edge = rule_id("CiliumClusterwideNetworkPolicy", &ObjKey::new("", "edge"));
        assert_eq!(
            s.policy.host_policies.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["CiliumClusterwideNetworkPolicy edge"]
        );
        let tcp = Some(Proto::Tcp);
        let want = BTreeSet::from([
            (id_of(&s, "shop", "worker"), tcp, 9100, 9100),
            (id_of(&s, "ops", "worker"), tcp, 9100, 9100),
            (abi::ID_REMOTE_NODE, None, 0, 0),
        ]);
        assert_eq!(entries(&host.entries, Direction::Ingress, PolicyAction::Allow), want);
        let denied = entries(&host.entries, Direction::Ingress, PolicyAction::Deny);
        assert_eq!(denied, BTreeSet::from([(cidr_id(&s, "10.200.0.1/32"), None, 0, 0)]));
        assert!(host.entries.iter().all(|e| e.rule_id == edge));
        // The rule set for pods of the same object still selects its pod; the
        // host rule set for role=core selects nothing here.
        assert!(s.policy.endpoints[&ip("10.1.1.13")].egress);
        assert!(!s.policy.endpoints.contains_key(&ip("10.1.1.10")), "pods are not the node");
        // n2 has no role label: no host policy there.
        let mut l = Loaded::default();
        load_text(std::path::Path::new("p.yaml"), &format!("{OBJECTS}{policies}"), &mut l);
        let n2 = Snapshot::derive(&l.objects, "n2", None, &Redirects::new(), None);
        assert!(n2.policy.host.is_none() && n2.policy.host_policies.is_empty());
    }

    #[test]
    fn a_clusterwide_policy_spans_namespaces_and_default_deny_follows_the_rules() {
        let s = snapshot(
            r#"
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: lockdown}
spec:
  endpointSelector: {}
  ingress:
  - fromEntities: [cluster]
---
apiVersion: weft.io/v1alpha1
kind: CiliumClusterwideNetworkPolicy
metadata: {name: client-out}
specs:
- endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: worker}}]
- endpointSelector: {matchLabels: {app: client}}
  enableDefaultDeny: {ingress: false}
  ingress:
  - fromEndpoints: [{}]
"#,
        );
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        let echo = &s.policy.endpoints[&ip("10.1.1.10")];
        assert!(echo.ingress && !echo.egress, "ingress rules only: {echo:?}");
        let client = &s.policy.endpoints[&ip("10.1.1.13")];
        assert!(client.ingress && client.egress);
        // A clusterwide peer selector spans namespaces.
        let out = entries(&client.entries, Direction::Egress, PolicyAction::Allow);
        let workers =
            BTreeSet::from([(id_of(&s, "shop", "worker"), None, 0, 0), (id_of(&s, "ops", "worker"), None, 0, 0)]);
        assert_eq!(out, workers);
        let id = rule_id("CiliumClusterwideNetworkPolicy", &ObjKey::new("", "client-out"));
        assert!(client.entries.iter().filter(|e| e.direction == Direction::Egress).all(|e| e.rule_id == id));

        // enableDefaultDeny off, and no other policy for the direction: not enforced.
        let s = snapshot(
            r#"
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: soft, namespace: ops}
spec:
  endpointSelector: {matchLabels: {app: client}}
  enableDefaultDeny: {egress: false}
  egress:
  - toEntities: [world]
"#,
        );
        assert!(!s.policy.endpoints.contains_key(&ip("10.1.1.13")), "{:?}", s.policy.endpoints);
    }

    #[test]
    fn what_weft_does_not_enforce_is_refused_by_name_and_opens_nothing() {
        let s = snapshot(
            r#"
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: refused, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: echo}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: worker}}]
    authentication: {mode: required}
  - toPorts: [{ports: [{port: "8080"}], rules: {http: [{method: GET, path: /headers}]}}]
  - fromEntities: [kube-apiserver]
  - fromEntities: [host]
  egress:
  - toFQDNs: [{matchName: example.com}]
    toPorts: [{ports: [{port: "80"}]}]
  - toEndpoints: [{matchLabels: {app: worker}}]
    toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
  - toCIDR: [0.0.0.0/0]
    toPorts: [{ports: [{port: "80"}], listener: {envoyConfig: {kind: CiliumClusterwideEnvoyConfig, name: x}, name: l}}]
  egressDeny:
  - toEntities: [world]
    icmps: [{fields: [{type: 8}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: hosts, namespace: shop}
spec:
  nodeSelector: {}
  ingress: [{fromEntities: [cluster]}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: host-l7}
spec:
  nodeSelector: {}
  ingress:
  - toPorts: [{ports: [{port: "80"}], rules: {http: [{method: GET}]}}]
  - toPorts: [{ports: [{port: http}]}]
"#,
        );
        let p = s.problems.join("\n");
        for want in [
            "CiliumNetworkPolicy shop/refused: spec.ingress[0].authentication: mutual authentication is not supported",
            "CiliumNetworkPolicy shop/refused: the node's policy listener for HTTP rules has no proxy port",
            "CiliumNetworkPolicy shop/refused: spec.ingress[2].fromEntities[0]: entity \"kube-apiserver\" is not supported",
            "CiliumNetworkPolicy shop/refused: spec.egress[0].toFQDNs: FQDN rules are not supported",
            "CiliumNetworkPolicy shop/refused: spec.egress[1].toPorts[0].rules.dns: DNS rules are not supported",
            "CiliumNetworkPolicy shop/refused: listener l of ClusterwideEnvoyConfig x is not serving on this node",
            "CiliumNetworkPolicy shop/refused: spec.egressDeny[0].icmps: ICMP rules are not supported",
            "CiliumNetworkPolicy shop/refused: spec.egressDeny[0]: the rule denies every peer on every port",
            "CiliumNetworkPolicy shop/refused: spec.ingress[0]: the rule allows nothing",
            "CiliumNetworkPolicy shop/hosts: spec.nodeSelector: host policies must be CiliumClusterwideNetworkPolicy",
            "CiliumClusterwideNetworkPolicy host-l7: spec.ingress[0].toPorts: HTTP rules and listeners are not enforced in host policies",
            "CiliumClusterwideNetworkPolicy host-l7: spec.ingress[1].toPorts: a named port in a host policy's ingress names nothing",
        ] {
            assert!(p.contains(want), "missing {want:?} in\n{p}");
        }
        // Only the readable rule allows anything; the refused deny rule denies all.
        let echo = &s.policy.endpoints[&ip("10.1.1.10")];
        assert!(echo.ingress && echo.egress);
        assert_eq!(
            entries(&echo.entries, Direction::Ingress, PolicyAction::Allow),
            BTreeSet::from([(abi::ID_HOST, None, 0, 0)])
        );
        assert!(entries(&echo.entries, Direction::Egress, PolicyAction::Allow).is_empty());
        assert!(entries(&echo.entries, Direction::Egress, PolicyAction::Deny).contains(&(0, None, 0, 0)));
        // The host policy selects no pod.
        assert!(!s.policy.endpoints.contains_key(&ip("10.1.1.13")));
    }

    #[test]
    fn http_rules_wait_for_the_policy_listener_and_become_its_grants() {
        let policies = r#"
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: l7, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: echo}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: worker}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: /headers}
        - {method: "POST|PUT", host: "api\\.example", headers: ["X-Team: blue", X-Trace], headerMatches: [{name: x-env, value: prod}]}
    - ports: [{port: "9090"}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: host-any, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: echo}}
  ingress:
  - fromEntities: [host]
    toPorts: [{ports: [{port: "8000", endPort: 8100}]}]
"#;
        let mut l = Loaded::default();
        load_text(std::path::Path::new("p.yaml"), &format!("{OBJECTS}{policies}"), &mut l);
        let mut seen = None;
        let s = Snapshot::derive_with(&l.objects, "n1", None, None, |p| {
            seen = Some(p.clone());
            (Redirects::new(), crate::state::policy::l7::ListenerPorts { http: Some(15001), ..Default::default() })
        });
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        let before = seen.unwrap();
        let echo = &s.policy.endpoints[&ip("10.1.1.10")];
        let worker = id_of(&s, "shop", "worker");
        let id = rule_id("CiliumNetworkPolicy", &ObjKey::new("shop", "l7"));
        // The HTTP port goes through the proxy (TCP only); the plain port straight on.
        let proxied: BTreeSet<_> =
            echo.entries.iter().filter(|e| e.proxy_port.is_some()).map(|e| (e.identity, e.proto, e.ports)).collect();
        assert_eq!(proxied, BTreeSet::from([(worker, Some(Proto::Tcp), Some((8080, 8080)))]));
        assert!(echo.entries.iter().all(|e| e.proxy_port.is_none_or(|p| p == 15001)));
        assert!(echo.entries.iter().any(|e| e.ports == Some((9090, 9090)) && e.proxy_port.is_none()));
        assert!(echo.waiting.is_empty(), "connected: {echo:?}");
        assert_eq!(before.endpoints[&ip("10.1.1.10")].waiting.len(), 1, "waited for the port");
        // Grants: the HTTP rules for worker's address, and the host's plain
        // allow on the same port lets every request by.
        let grants = &s.policy.http;
        assert_eq!(grants.len(), 2, "{grants:?}");
        let g = grants.iter().find(|g| g.rule_id == id).unwrap();
        assert_eq!((g.subject, g.direction, g.ports), (ip("10.1.1.10"), Direction::Ingress, (8080, 8080)));
        assert_eq!(g.peers.len(), 1);
        assert_eq!(g.peers[0].net, Net::parse("10.1.2.11/32").unwrap());
        let rules = g.http.as_ref().unwrap();
        assert_eq!(rules[0].method.as_deref(), Some("GET"));
        assert_eq!(rules[0].path.as_deref(), Some("/headers"));
        assert_eq!(rules[1].host.as_deref(), Some("api\\.example"));
        let names: Vec<(&str, Option<&str>)> =
            rules[1].headers.iter().map(|h| (h.name.as_str(), h.value.as_deref())).collect();
        assert_eq!(names, vec![("x-team", Some("blue")), ("x-trace", None), ("x-env", Some("prod"))]);
        let host = grants.iter().find(|g| g.rule_id != id).unwrap();
        assert_eq!((host.ports, host.http.is_none()), ((8080, 8080), true));
        assert_eq!(host.peers[0].net, Net::parse("192.168.50.1/32").unwrap());
    }

    #[test]
    fn http_rules_weft_cannot_check_are_refused_by_field() {
        let s = snapshot(
            r#"
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad-l7, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: echo}}
  ingress:
  - toPorts: [{ports: [{port: "80"}], rules: {http: [{path: "/(unclosed"}]}}]
  - toPorts: [{ports: [{port: "81"}], rules: {http: [{headerMatches: [{name: x, value: y, mismatch: LOG}]}]}}]
  - toPorts: [{ports: [{port: "82", protocol: UDP}], rules: {http: [{}]}}]
  - toPorts: [{ports: [{port: "83"}], rules: {http: [{headers: ["bad name: 1"]}]}}]
  ingressDeny:
  - toPorts: [{ports: [{port: "84"}], rules: {http: [{method: GET}]}}]
"#,
        );
        let p = s.problems.join("\n");
        for want in [
            "spec.ingress[0].toPorts[0].rules.http[0]: path: \"/(unclosed\" is not a regular expression",
            "spec.ingress[1].toPorts[0].rules.http[0]: headerMatches.mismatch: header mismatch actions",
            "spec.ingress[2].toPorts[0].ports[0]: protocol: HTTP rules and listeners apply to TCP ports only",
            "spec.ingress[3].toPorts[0].rules.http[0]: headers: \"bad name\" is not a header name",
            "spec.ingressDeny[0].toPorts: HTTP rules and listeners cannot deny",
            "spec.ingressDeny[0]: the rule denies every peer on every port",
        ] {
            assert!(p.contains(want), "missing {want:?} in\n{p}");
        }
        assert!(s.policy.http.is_empty());
    }

    #[test]
    fn service_accounts_and_dotted_sources_select_as_in_cilium() {
        let s = snapshot(
            r#"
---
apiVersion: v1
kind: Pod
metadata: {name: robot, namespace: shop, labels: {app: worker}}
spec: {nodeName: n2, serviceAccountName: robot, containers: []}
status: {podIP: 10.1.2.14}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: echo, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: echo}}
  ingress:
  - fromEndpoints:
    - matchLabels: {io.cilium.k8s.policy.serviceaccount: robot}
    - matchLabels: {k8s.io.kubernetes.pod.namespace: ops, k8s.app: worker}
"#,
        );
        assert!(s.problems.is_empty(), "{:?}", s.problems);
        let (robot, shop_worker, ops_worker) =
            (id_of(&s, "shop", "robot"), id_of(&s, "shop", "worker"), id_of(&s, "ops", "worker"));
        // Same labels, another ServiceAccount: another identity.
        assert_ne!(robot, shop_worker);
        let echo = &s.policy.endpoints[&ip("10.1.1.10")];
        let peers: BTreeSet<u32> = echo.entries.iter().map(|e| e.identity).collect();
        assert_eq!(peers, BTreeSet::from([robot, ops_worker]));
        let pod = s.pods.iter().find(|p| p.key.name == "echo").unwrap();
        assert_eq!(pod.labels.get("io.cilium.k8s.policy.serviceaccount").map(String::as_str), Some("default"));
    }

    #[test]
    fn an_unknown_field_keeps_the_pods_selected_with_nothing_allowed() {
        let s = snapshot(
            r#"
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: typo, namespace: ops}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egres: [{toEntities: [all]}]
"#,
        );
        let p = s.problems.join("\n");
        assert!(p.contains("CiliumNetworkPolicy ops/typo: spec.egres: is not a field weft knows"), "{p}");
        let client = &s.policy.endpoints[&ip("10.1.1.13")];
        assert!(client.ingress && client.egress && client.entries.is_empty(), "{client:?}");
    }
}
