//! The Gateway API: GatewayClasses whose controller is [`CONTROLLER`],
//! their Gateways, and the HTTPRoutes, GRPCRoutes and ReferenceGrants that
//! shape them, translated into what the node agents serve, with the status
//! the spec asks of each object.
//!
//! Per Gateway, like a dedicated Ingress: a LoadBalancer Service (one port
//! per listener port) and placeholder Endpoints in the Gateway's namespace,
//! owned by it, and a ClusterwideEnvoyConfig (routes and certificates may
//! live in other namespaces, which a namespaced EnvoyConfig may not reach),
//! removed by the operator when the Gateway goes.
//!
//! [`translate`] is a pure function of the objects: everything it decides is
//! unit-tested without an API server; `reconcile` applies its result.

pub mod attach;
pub mod backends;
pub mod conditions;
pub mod config;
pub mod grants;
pub mod hostnames;
pub mod listeners;
pub mod matching;
pub mod reconcile;
pub mod rules;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::core::v1::{Endpoints, Service},
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta},
};
use serde_json::{Value, json};
use weft_gateway_api::gateways::{
    Gateway, GatewayStatusAddresses, GatewayStatusListeners, GatewayStatusListenersSupportedKinds,
};

use self::{
    backends::Used,
    conditions::condition,
    config::{Attached, Served},
    listeners::{Listener, RouteKind},
    rules::{Translated, Via},
};
use super::envoy;
use crate::k8s::{ObjKey, Objects};

/// The controller name of GatewayClasses weft serves.
pub const CONTROLLER: &str = "weft.io/gateway-controller";
/// The Gateway API's group.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// Label on everything generated for a Gateway: its name (shortened to fit).
pub const GATEWAY_LABEL: &str = "weft.io/gateway";
/// Label on everything generated for a Gateway: its namespace.
pub const GATEWAY_NAMESPACE_LABEL: &str = "weft.io/gateway-namespace";
/// Prefix of generated objects' names.
const PREFIX: &str = "weft-gateway";

/// The features weft's GatewayClasses report (`status.supportedFeatures`),
/// each one covered by a test modelled on the conformance suite's.
pub const SUPPORTED_FEATURES: &[&str] = &[
    "Gateway",
    "GRPCRoute",
    "HTTPRoute",
    "HTTPRouteHostRewrite",
    "HTTPRouteMethodMatching",
    "HTTPRoutePathRedirect",
    "HTTPRoutePathRewrite",
    "HTTPRouteQueryParamMatching",
    "HTTPRouteRequestMirror",
    "HTTPRouteRequestTimeout",
    "HTTPRouteResponseHeaderModification",
    "ReferenceGrant",
];

/// What a GatewayClass of weft's should say.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassOut {
    pub name: String,
    pub conditions: Vec<Condition>,
}

/// What is generated for one Gateway, and its status.
#[derive(Clone, Debug, PartialEq)]
pub struct GatewayOut {
    pub key: ObjKey,
    pub generation: i64,
    pub conditions: Vec<Condition>,
    pub listeners: Vec<GatewayStatusListeners>,
    pub addresses: Vec<GatewayStatusAddresses>,
    /// The Service and Endpoints; none while no listener can take routes.
    pub service: Option<(Service, Endpoints)>,
    /// The ClusterwideEnvoyConfig; none while no listener is served.
    pub envoy_config: Option<Value>,
}

/// The parents weft writes in one route's status.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteOut {
    pub kind: RouteKind,
    pub key: ObjKey,
    /// (parentRef as written in the route, conditions), for parents that are weft's Gateways.
    pub parents: Vec<(Value, Vec<Condition>)>,
}

/// Everything weft has to say about the Gateway API objects.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translation {
    pub classes: Vec<ClassOut>,
    pub gateways: Vec<GatewayOut>,
    pub routes: Vec<RouteOut>,
}

/// The name of a Gateway's Service and Endpoints (in its namespace).
pub fn service_name(gateway: &str) -> String {
    envoy::generated_name(PREFIX, gateway)
}

/// The name of a Gateway's ClusterwideEnvoyConfig: unique across
/// namespaces (`.` cannot occur in a namespace), shortened to fit.
pub fn config_name(key: &ObjKey) -> String {
    envoy::shorten(&format!("{PREFIX}.{}.{}", key.namespace, key.name), 253, &format!("{key}"))
}

/// Whether a GatewayClass is weft's.
fn class_is_ours(objects: &Objects, name: &str) -> bool {
    objects.gateway_classes.get(&ObjKey::new("", name)).is_some_and(|c| c.object.spec.controller_name == CONTROLLER)
}

/// A route's parentRef, defaults filled in.
struct Parent {
    group: String,
    kind: String,
    namespace: String,
    name: String,
    section: Option<String>,
    port: Option<i32>,
    /// As the route writes it (status echoes it back).
    written: Value,
}

/// One route, either kind, as attachment needs it.
struct RouteRef<'a> {
    kind: RouteKind,
    meta: &'a ObjectMeta,
    hostnames: Vec<String>,
    parents: Vec<Parent>,
}

/// Which translation of a route: (kind, route, listener port, HTTPS).
type TranslationKey = (RouteKind, ObjKey, i32, bool);

fn routes(objects: &Objects) -> Vec<RouteRef<'_>> {
    macro_rules! parents {
        ($refs:expr, $ns:expr) => {
            $refs
                .iter()
                .flatten()
                .map(|p| Parent {
                    group: p.group.clone().unwrap_or_else(|| GROUP.into()),
                    kind: p.kind.clone().unwrap_or_else(|| "Gateway".into()),
                    namespace: p.namespace.clone().unwrap_or_else(|| $ns.clone()),
                    name: p.name.clone(),
                    section: p.section_name.clone(),
                    port: p.port,
                    written: serde_json::to_value(p).unwrap_or(Value::Null),
                })
                .collect()
        };
    }
    let mut out = Vec::new();
    for r in objects.http_routes.values() {
        let r = &r.object;
        let ns = r.metadata.namespace.clone().unwrap_or_default();
        out.push(RouteRef {
            kind: RouteKind::Http,
            meta: &r.metadata,
            hostnames: r.spec.hostnames.clone().unwrap_or_default(),
            parents: parents!(r.spec.parent_refs, ns),
        });
    }
    for r in objects.grpc_routes.values() {
        let r = &r.object;
        let ns = r.metadata.namespace.clone().unwrap_or_default();
        out.push(RouteRef {
            kind: RouteKind::Grpc,
            meta: &r.metadata,
            hostnames: r.spec.hostnames.clone().unwrap_or_default(),
            parents: parents!(r.spec.parent_refs, ns),
        });
    }
    out
}

fn key_of(meta: &ObjectMeta) -> ObjKey {
    ObjKey::new(meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

/// A route's rules for one listener, translated once per port and scheme.
fn translated<'c>(
    cache: &'c mut BTreeMap<TranslationKey, Translated>,
    route: &RouteRef,
    via: Via,
    objects: &Objects,
    used: &mut Used,
) -> &'c Translated {
    let key = (route.kind, key_of(route.meta), via.port, via.https);
    cache.entry(key.clone()).or_insert_with(|| match route.kind {
        RouteKind::Http => {
            objects.http_routes.get(&key.1).map(|r| rules::http(&r.object, via, objects, used)).unwrap_or_default()
        }
        RouteKind::Grpc => {
            objects.grpc_routes.get(&key.1).map(|r| rules::grpc(&r.object, objects, used)).unwrap_or_default()
        }
    })
}

/// The Service's load-balancer addresses as Gateway addresses.
fn addresses(svc: Option<&Service>) -> Vec<GatewayStatusAddresses> {
    svc.and_then(|s| s.status.as_ref())
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| match (&i.ip, &i.hostname) {
            (Some(ip), _) => Some(GatewayStatusAddresses { r#type: Some("IPAddress".into()), value: ip.clone() }),
            (None, Some(h)) => Some(GatewayStatusAddresses { r#type: Some("Hostname".into()), value: h.clone() }),
            _ => None,
        })
        .collect()
}

/// Translates every Gateway API object weft serves. `config_problems`
/// says what is wrong with a generated ClusterwideEnvoyConfig (by name), if
/// validation found anything: such a Gateway is not Programmed.
pub fn translate(objects: &Objects, config_problems: &BTreeMap<String, String>) -> Translation {
    let mut out = Translation::default();
    for c in objects.gateway_classes.values().map(|c| &c.object) {
        if c.spec.controller_name != CONTROLLER {
            continue;
        }
        let generation = c.metadata.generation.unwrap_or(0);
        let accepted = match &c.spec.parameters_ref {
            None => condition("Accepted", true, "Accepted", "weft serves this class", generation),
            Some(p) => condition(
                "Accepted",
                false,
                "InvalidParameters",
                format!("parametersRef {}/{} {}: weft takes no parameters", p.group, p.kind, p.name),
                generation,
            ),
        };
        out.classes.push(ClassOut { name: c.metadata.name.clone().unwrap_or_default(), conditions: vec![accepted] });
    }
    let routes = routes(objects);
    // Route parent statuses, filled in per Gateway: (route index, parent index) -> conditions.
    let mut parent_status: BTreeMap<(usize, usize), Vec<Condition>> = BTreeMap::new();
    for gw in objects.gateways.values().map(|g| &g.object) {
        let accepted_class = objects
            .gateway_classes
            .get(&ObjKey::new("", gw.spec.gateway_class_name.clone()))
            .is_some_and(|c| c.object.spec.controller_name == CONTROLLER && c.object.spec.parameters_ref.is_none());
        if !class_is_ours(objects, &gw.spec.gateway_class_name) {
            continue;
        }
        out.gateways.push(gateway(gw, accepted_class, objects, &routes, &mut parent_status, config_problems));
    }
    for (ri, r) in routes.iter().enumerate() {
        let parents = r
            .parents
            .iter()
            .enumerate()
            .filter_map(|(pi, p)| parent_status.remove(&(ri, pi)).map(|c| (p.written.clone(), c)))
            .collect();
        out.routes.push(RouteOut { kind: r.kind, key: key_of(r.meta), parents });
    }
    out
}

/// One Gateway: its listeners, the routes attached, the objects to generate
/// and its status; the parent statuses of routes naming it go to `parent_status`.
fn gateway(
    gw: &Gateway,
    class_accepted: bool,
    objects: &Objects,
    routes: &[RouteRef],
    parent_status: &mut BTreeMap<(usize, usize), Vec<Condition>>,
    config_problems: &BTreeMap<String, String>,
) -> GatewayOut {
    let key = key_of(&gw.metadata);
    let generation = gw.metadata.generation.unwrap_or(0);
    let listeners: Vec<Listener> = if class_accepted { listeners::check(gw, objects) } else { Vec::new() };
    let mut attached_count = vec![0i32; listeners.len()];
    let mut used = Used::default();
    let mut cache = BTreeMap::new();
    // (listener, hostnames, which translation): entries are looked up after.
    let mut attachments: Vec<(usize, Vec<String>, TranslationKey)> = Vec::new();
    for (ri, r) in routes.iter().enumerate() {
        let route_ns = r.meta.namespace.clone().unwrap_or_default();
        let mut counted = BTreeSet::new();
        for (pi, p) in r.parents.iter().enumerate() {
            if p.group != GROUP || p.kind != "Gateway" || p.namespace != key.namespace || p.name != key.name {
                continue;
            }
            let route_generation = r.meta.generation.unwrap_or(0);
            let mut conds = Vec::new();
            let result = if class_accepted {
                let candidate = attach::Candidate {
                    kind: r.kind,
                    namespace: &route_ns,
                    hostnames: &r.hostnames,
                    section: p.section.as_deref(),
                    port: p.port,
                };
                attach::attach(&candidate, &key.namespace, &listeners, objects)
            } else {
                Err(("NoMatchingParent", "the Gateway's class is not accepted".to_owned()))
            };
            let mut unresolved = Vec::new();
            let mut dropped: Vec<(usize, rules::RuleError)> = Vec::new();
            let mut rule_count = 0;
            if let Ok(at) = &result {
                for (li, hosts) in at {
                    let l = &listeners[*li];
                    let via = Via { port: l.port, https: l.https };
                    let t = translated(&mut cache, r, via, objects, &mut used);
                    unresolved.extend(t.unresolved.iter().cloned());
                    for d in &t.dropped {
                        if !dropped.contains(d) {
                            dropped.push(d.clone());
                        }
                    }
                    if counted.insert(*li) {
                        attached_count[*li] = attached_count[*li].saturating_add(1);
                    }
                    attachments.push((*li, hosts.clone(), (r.kind, key_of(r.meta), l.port, l.https)));
                }
                rule_count = match r.kind {
                    RouteKind::Http => objects
                        .http_routes
                        .get(&key_of(r.meta))
                        .map_or(0, |h| h.object.spec.rules.as_ref().map_or(0, Vec::len)),
                    RouteKind::Grpc => objects
                        .grpc_routes
                        .get(&key_of(r.meta))
                        .map_or(0, |h| h.object.spec.rules.as_ref().map_or(0, Vec::len)),
                };
            }
            let all_dropped = rule_count > 0 && dropped.len() >= rule_count;
            let dropped_text =
                || dropped.iter().map(|(i, why)| format!("rule {i}: {why}")).collect::<Vec<_>>().join("; ");
            match &result {
                Ok(_) if all_dropped => conds.push(condition(
                    "Accepted",
                    false,
                    "UnsupportedValue",
                    format!("no rule can be served: {}", dropped_text()),
                    route_generation,
                )),
                Ok(_) => {
                    conds.push(condition("Accepted", true, "Accepted", "attached to the Gateway", route_generation))
                }
                Err((reason, message)) => {
                    conds.push(condition("Accepted", false, reason, message.clone(), route_generation))
                }
            }
            unresolved.dedup();
            match unresolved.first() {
                None => conds.push(condition(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "every backend resolves",
                    route_generation,
                )),
                Some(first) => conds.push(condition(
                    "ResolvedRefs",
                    false,
                    first.reason,
                    unresolved.iter().map(|u| u.message.clone()).collect::<Vec<_>>().join("; "),
                    route_generation,
                )),
            }
            if !dropped.is_empty() && !all_dropped {
                conds.push(condition(
                    "PartiallyInvalid",
                    true,
                    "UnsupportedValue",
                    format!("Dropped Rule(s): {}", dropped_text()),
                    route_generation,
                ));
            }
            parent_status.insert((ri, pi), conds);
        }
    }
    // What Envoy serves.
    let mut served = Vec::new();
    let mut served_index = vec![None; listeners.len()];
    for (i, l) in listeners.iter().enumerate() {
        if l.serving {
            served_index[i] = Some(served.len());
            served.push(Served {
                name: l.name.clone(),
                port: l.port,
                secrets: if l.https { l.secrets.clone() } else { Vec::new() },
                hostname: l.hostname.clone(),
            });
        }
    }
    let attached: Vec<Attached> = attachments
        .iter()
        .filter_map(|(li, hosts, ck)| {
            let si = served_index.get(*li).copied().flatten()?;
            Some(Attached { listener: si, hostnames: hosts.clone(), entries: &cache.get(ck)?.entries })
        })
        .collect();
    let service_key = ObjKey::new(key.namespace.clone(), service_name(&key.name));
    let stat = format!("gateway/{key}");
    let spec = config::spec(&stat, &service_key, &served, &attached, &used.clusters, &used.services);
    let cname = config_name(&key);
    let labels = BTreeMap::from([
        (GATEWAY_LABEL.to_owned(), envoy::shorten(&key.name, 63, &key.name)),
        (GATEWAY_NAMESPACE_LABEL.to_owned(), key.namespace.clone()),
    ]);
    let envoy_config = spec.map(|spec| {
        json!({
            "apiVersion": crate::xds::envoyconfig::API_VERSION,
            "kind": "ClusterwideEnvoyConfig",
            "metadata": { "name": cname, "labels": labels },
            "spec": spec,
        })
    });
    // The Service: a port per port of an attachable listener.
    let ports: BTreeSet<i32> = listeners.iter().filter(|l| l.attachable).map(|l| l.port).collect();
    let port_names: Vec<(String, i32)> = ports.iter().map(|p| (format!("port-{p}"), *p)).collect();
    let service = (!ports.is_empty()).then(|| {
        let meta = ObjectMeta {
            name: Some(service_key.name.clone()),
            namespace: Some(key.namespace.clone()),
            labels: Some(labels.clone()),
            owner_references: Some(vec![envoy::owner(&format!("{GROUP}/v1"), "Gateway", &gw.metadata)]),
            ..Default::default()
        };
        (
            envoy::lb_service(meta.clone(), &port_names),
            envoy::placeholder_endpoints(meta, &port_names.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()),
        )
    });
    let held_service = objects.services.get(&service_key).map(|s| &s.object);
    let addresses = if service.is_some() { addresses(held_service) } else { Vec::new() };
    // Gateway conditions.
    let valid = listeners.iter().filter(|l| l.attachable).count();
    let mut conditions = Vec::new();
    let accepted = if !class_accepted {
        condition("Accepted", false, "Invalid", "the GatewayClass is not accepted", generation)
    } else if gw.spec.addresses.as_ref().is_some_and(|a| !a.is_empty()) {
        condition(
            "Accepted",
            false,
            "UnsupportedAddress",
            "weft takes its addresses from the Service's load balancer; spec.addresses cannot be honoured",
            generation,
        )
    } else if valid == 0 {
        condition("Accepted", false, "ListenersNotValid", "no listener is valid", generation)
    } else if valid < listeners.len() {
        condition(
            "Accepted",
            true,
            "ListenersNotValid",
            "some listeners are not valid; see their conditions",
            generation,
        )
    } else {
        condition("Accepted", true, "Accepted", "the Gateway is valid", generation)
    };
    let is_accepted = accepted.status == "True";
    conditions.push(accepted);
    let problem = config_problems.get(&cname);
    conditions.push(if !is_accepted {
        condition("Programmed", false, "Invalid", "the Gateway is not accepted", generation)
    } else if let Some(p) = problem {
        condition(
            "Programmed",
            false,
            "Invalid",
            format!("its ClusterwideEnvoyConfig {cname} is invalid: {p}"),
            generation,
        )
    } else if addresses.is_empty() {
        condition(
            "Programmed",
            false,
            "AddressNotAssigned",
            format!("Service {service_key} has no load-balancer address yet"),
            generation,
        )
    } else {
        condition("Programmed", true, "Programmed", "served by every node's Envoy", generation)
    });
    let listener_status = listeners
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut conds = l.conditions.clone();
            conds.push(if l.serving && problem.is_none() {
                condition("Programmed", true, "Programmed", "served by every node's Envoy", generation)
            } else {
                condition(
                    "Programmed",
                    false,
                    "Invalid",
                    "the listener is not served; see its other conditions",
                    generation,
                )
            });
            GatewayStatusListeners {
                attached_routes: attached_count[i],
                conditions: conds,
                name: l.name.clone(),
                supported_kinds: Some(
                    l.kinds
                        .iter()
                        .map(|k| GatewayStatusListenersSupportedKinds {
                            group: Some(GROUP.into()),
                            kind: k.name().into(),
                        })
                        .collect(),
                ),
            }
        })
        .collect();
    GatewayOut {
        key,
        generation,
        conditions,
        listeners: listener_status,
        addresses,
        service,
        envoy_config: if is_accepted { envoy_config } else { None },
    }
}
