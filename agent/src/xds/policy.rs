//! The node's policy listener: the HTTP rules of network policies
//! ([`HttpGrant`]s) as one generated ClusterwideEnvoyConfig, which enters the
//! model like any other config (translated, checked, given a proxy port).
//!
//! The datapath hands it the connections an L7 rule allows at L3/L4. The
//! listener restores each connection's original destination (its socket is
//! transparent, so the local address is the pod the client dialled), checks
//! every request with an RBAC filter, and forwards what is allowed to that
//! destination. A request is allowed when some grant's peer addresses,
//! destination and port and one of its HTTP rules match it; a refused one
//! gets 403 `Access denied`. Policy ids name the grant's policy
//! (`<rule id>/<direction>/<n>`): Envoy writes the matching one to the access
//! log (`enforced_effective_policy_id`), and a shadow rule set without the
//! HTTP parts names the policy that governed a refused request
//! (`shadow_effective_policy_id`), so flows can name the policy either way.

use serde_json::{Value, json};
use weft_observe::pipeline::accesslog;

use super::envoyconfig::{ConfigKey, EnvoyConfig};
use crate::{
    datapath::Direction,
    k8s::{ObjKey, Origin, crd::EnvoyConfigSpec},
    state::policy::{
        l7::{AddrSet, HttpGrant, HttpRule},
        rule::Net,
    },
};

/// The generated config's name: not a valid object name, so no object of
/// the cluster can take it.
pub const CONFIG_NAME: &str = "weft:policy";
/// Its listener, as written (Envoy sees it qualified: `/weft:policy/http`).
pub const LISTENER: &str = "http";
/// The body of a refused request (Cilium's).
pub const DENIED_BODY: &str = "Access denied";

/// The key of the generated config.
pub fn config_key() -> ConfigKey {
    ConfigKey { clusterwide: true, key: ObjKey::new("", CONFIG_NAME) }
}

/// The RBAC policy id of a grant, as the flow pipeline reads it back.
fn policy_id(g: &HttpGrant, n: usize) -> String {
    accesslog::policy_id(g.rule_id, g.direction == Direction::Ingress, n)
}

fn cidr(n: &Net) -> Value {
    json!({"address_prefix": n.addr.to_string(), "prefix_len": n.len})
}

/// Addresses as an RBAC principal (`field` = `direct_remote_ip`) or
/// permission (`destination_ip`) tree: any of the sets, each its prefix
/// but none of its exceptions.
fn addresses(sets: &[AddrSet], field: &str, any: &str, all: &str, not: &str) -> Value {
    let one = |s: &AddrSet| {
        let ip = json!({ field: cidr(&s.net) });
        if s.except.is_empty() {
            return ip;
        }
        let except: Vec<Value> = s.except.iter().map(|e| json!({ field: cidr(e) })).collect();
        json!({ all: {"ids_or_rules": [ip, {not: {any: {"ids_or_rules": except}}}]} })
    };
    let list: Vec<Value> = sets.iter().map(one).collect();
    json!({ any: {"ids_or_rules": list} })
}

/// RBAC's principal and permission messages name their lists differently.
fn principal(sets: &[AddrSet]) -> Value {
    rename(addresses(sets, "direct_remote_ip", "or_ids", "and_ids", "not_id"), "ids")
}

fn destination(sets: &[AddrSet]) -> Value {
    rename(addresses(sets, "destination_ip", "or_rules", "and_rules", "not_rule"), "rules")
}

fn rename(v: Value, list: &str) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(
                    |(k, v)| {
                        if k == "ids_or_rules" { (list.to_owned(), rename(v, list)) } else { (k, rename(v, list)) }
                    },
                )
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(|v| rename(v, list)).collect()),
        other => other,
    }
}

fn regex_header(name: &str, regex: &str) -> Value {
    json!({"header": {"name": name, "string_match": {"safe_regex": {"regex": regex}}}})
}

/// The request parts of one HTTP rule, as permissions to AND.
fn http_parts(r: &HttpRule) -> Vec<Value> {
    let mut out = Vec::new();
    for (name, regex) in [(":method", &r.method), (":path", &r.path), (":authority", &r.host)] {
        if let Some(re) = regex {
            out.push(regex_header(name, re));
        }
    }
    for h in &r.headers {
        out.push(match &h.value {
            None => json!({"header": {"name": h.name, "present_match": true}}),
            Some(v) => json!({"header": {"name": h.name, "string_match": {"exact": v}}}),
        });
    }
    out
}

/// One grant as (enforced policy, shadow policy without the HTTP parts).
fn policies(g: &HttpGrant) -> (Value, Value) {
    let subject = [AddrSet { net: Net { addr: g.subject, len: 32 }, except: Vec::new() }];
    let ports = json!({"destination_port_range": {"start": g.ports.0, "end": u32::from(g.ports.1) + 1}});
    let (who, to) = match g.direction {
        Direction::Ingress => (principal(&g.peers), destination(&subject)),
        Direction::Egress => (principal(&subject), destination(&g.peers)),
    };
    let base = vec![to, ports];
    let permission = |extra: Vec<Value>| {
        let mut rules = base.clone();
        rules.extend(extra);
        json!({"and_rules": {"rules": rules}})
    };
    let permissions: Vec<Value> = match &g.http {
        None => vec![permission(Vec::new())],
        Some(rules) => rules.iter().map(|r| permission(http_parts(r))).collect(),
    };
    (
        json!({"permissions": permissions, "principals": [who.clone()]}),
        json!({"permissions": [permission(Vec::new())], "principals": [who]}),
    )
}

/// The generated config for these grants (None: no HTTP rule needs it).
pub fn config(grants: &[HttpGrant]) -> Option<EnvoyConfig> {
    let mut enforced = serde_json::Map::new();
    let mut shadow = serde_json::Map::new();
    for (n, g) in grants.iter().enumerate().filter(|(_, g)| !g.peers.is_empty()) {
        let (e, s) = policies(g);
        enforced.insert(policy_id(g, n), e);
        shadow.insert(policy_id(g, n), s);
    }
    if enforced.is_empty() {
        return None;
    }
    // The rules live in the route configuration (RDS): a policy change
    // updates it alone, and connections on the listener carry on, their next
    // request judged by the new rules.
    let rbac = json!({"action": "ALLOW", "policies": enforced});
    let shadow = json!({"action": "ALLOW", "policies": shadow});
    let routes = json!({
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": LISTENER,
        "virtual_hosts": [{
            "name": "any",
            "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "original-destination", "timeout": "0s"}}],
            "typed_per_filter_config": {
                "envoy.filters.http.rbac": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
                    "rbac": {"rules": rbac, "shadow_rules": shadow}
                }
            }
        }]
    });
    // The filter itself denies everything: only the route's rules allow.
    let deny_all = json!({"action": "ALLOW", "policies": {}});
    let hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "weft_policy",
        "rds": {"route_config_name": LISTENER},
        "http_filters": [
            {
                "name": "envoy.filters.http.rbac",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                    "rules": deny_all
                }
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
            }
        ],
        "local_reply_config": {
            "mappers": [{
                // Only the RBAC filter answers 403 itself on this listener
                // (a backend's own 403 is not a local reply).
                "filter": {"status_code_filter": {"comparison": {
                    "op": "EQ",
                    "value": {"default_value": 403, "runtime_key": "weft.policy.denied_status"}
                }}},
                "body": {"inline_string": DENIED_BODY}
            }]
        }
    });
    let listener = json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": LISTENER,
        "listener_filters": [{
            "name": "envoy.filters.listener.original_dst",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}
        }],
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]
    });
    let cluster = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": "original-destination",
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s"
    });
    Some(EnvoyConfig {
        key: config_key(),
        origin: Origin::Generated { what: "network policies' HTTP rules" },
        generation: 0,
        annotations: Default::default(),
        spec: std::sync::Arc::new(EnvoyConfigSpec {
            resources: vec![listener.into(), routes.into(), cluster.into()],
            ..Default::default()
        }),
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        state::policy::l7::HeaderMatch,
        xds::{model::NodeInfo, translate},
    };

    fn grant(direction: Direction, http: Option<Vec<HttpRule>>) -> HttpGrant {
        let net = Net::parse("10.1.2.0/24").unwrap();
        HttpGrant {
            rule_id: 77,
            subject: Ipv4Addr::new(10, 1, 1, 10),
            direction,
            ports: (8080, 8080),
            peers: vec![AddrSet { net, except: vec![Net::parse("10.1.2.9/32").unwrap()] }],
            http,
        }
    }

    #[test]
    fn grants_become_a_config_that_translates_with_rbac_per_policy() {
        let rule = HttpRule {
            method: Some("GET".into()),
            path: Some("/headers".into()),
            host: None,
            headers: vec![HeaderMatch { name: "x-team".into(), value: Some("blue".into()) }],
        };
        let cfg = config(&[grant(Direction::Ingress, Some(vec![rule])), grant(Direction::Egress, None)]).unwrap();
        let t = translate::translate(&cfg).unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(t.listeners.len(), 1);
        assert_eq!(t.listeners[0].name, "/weft:policy/http");
        assert_eq!(t.clusters[0].name, "/weft:policy/original-destination");
        assert_eq!(t.routes[0].name, "/weft:policy/http");
        let text = serde_json::to_string(&cfg.spec.resources).unwrap();
        for want in ["77/ingress/0", "77/egress/1", "\"/headers\"", "x-team", "Access denied", "10.1.2.9"] {
            assert!(text.contains(want), "{want} in {text}");
        }
        let dir = u8::try_from(weft_ebpf::abi::DIR_EGRESS).unwrap();
        assert_eq!(accesslog::parse_policy_id("77/egress/1"), Some((77, dir)));
        assert_eq!(accesslog::parse_policy_id("x"), None);
        // It enters the model like any config: one listener, a proxy port.
        let mut model = crate::xds::model::Model::new(crate::xds::ports::ProxyPorts::ephemeral());
        let node = NodeInfo { any: true, ..Default::default() };
        let built = model.build(&[cfg], &[], &Default::default(), &node);
        let status = &built.statuses[&config_key()];
        assert!(status.problems.is_empty(), "{:?}", status.problems);
        assert_eq!(status.listeners.len(), 1);
        // Nothing to enforce: no config.
        assert!(config(&[]).is_none());
    }
}
