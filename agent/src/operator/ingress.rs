//! Ingress: Ingresses of class `weft` become EnvoyConfigs for the node-local
//! Envoys, fronted by a LoadBalancer Service.
//!
//! - Which Ingresses: `spec.ingressClassName` naming an IngressClass whose
//!   controller is [`CONTROLLER`] (or naming `weft` itself), the legacy
//!   `kubernetes.io/ingress.class: weft` annotation, or no class at all when
//!   weft's IngressClass is the cluster default.
//! - Dedicated mode (the default): per Ingress, an EnvoyConfig, a Service of
//!   type LoadBalancer (ports 80 and 443) and an Endpoints object with a
//!   placeholder address (a Service without endpoints is not a Service to the
//!   datapath), all named `weft-ingress-<name>` in the Ingress's namespace and
//!   owned by the Ingress, so deleting it deletes them.
//! - Shared mode ([`MODE_ANNOTATION`]: `shared` on the Ingress or its
//!   IngressClass): one ClusterwideEnvoyConfig and one Service for all shared
//!   Ingresses, in the operator's namespace.
//! - The config: one listener; a virtual host per host (no host: `*`);
//!   routes ordered as Kubernetes ranks them (Exact, then regular expressions
//!   for ImplementationSpecific, then Prefix, longer paths first); Prefix
//!   matches whole path segments; backends are the EDS clusters
//!   `<ns>/<service>:<port>`; TLS hosts get a filter chain chosen by SNI with
//!   the Secret's certificate over SDS, and their plain-HTTP requests are
//!   redirected to HTTPS unless [`FORCE_HTTPS_ANNOTATION`] is `false`.
//! - The Ingress's `status.loadBalancer` is copied from the Service's.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Service},
        networking::v1::{Ingress, IngressClass, IngressLoadBalancerIngress, IngressLoadBalancerStatus},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde_json::{Value, json};

use super::envoy;
use crate::k8s::{ObjKey, Objects};

/// The controller name weft's IngressClass carries.
pub const CONTROLLER: &str = "weft.io/ingress-controller";
/// The IngressClass name weft answers to even without an IngressClass object.
pub const CLASS: &str = "weft";
/// `dedicated` (default) or `shared`, on an Ingress or an IngressClass.
pub const MODE_ANNOTATION: &str = "ingress.weft.io/loadbalancer-mode";
/// `false` keeps plain HTTP for TLS hosts (default: redirect to HTTPS).
pub const FORCE_HTTPS_ANNOTATION: &str = "ingress.weft.io/force-https";
/// Label on everything generated for an Ingress: its name.
pub const INGRESS_LABEL: &str = "weft.io/ingress";
pub use super::envoy::PLACEHOLDER;
/// Name of the listener and prefix of generated objects.
const PREFIX: &str = "weft-ingress";

/// How an Ingress is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Dedicated,
    Shared,
}

/// A problem in an Ingress: which field, what is wrong. The rest of the
/// Ingress is still served.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Ingress {ingress}: {field}: {message}")]
pub struct IngressProblem {
    pub ingress: ObjKey,
    pub field: String,
    pub message: String,
}

/// Everything generated for one dedicated Ingress (or the shared set).
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    /// The EnvoyConfig (weft.io/v1alpha1; namespaced for dedicated, clusterwide for shared), as a document.
    pub envoy_config: Value,
    pub service: Service,
    pub endpoints: Endpoints,
    pub problems: Vec<IngressProblem>,
}

fn key_of(ing: &Ingress) -> ObjKey {
    ObjKey::new(
        ing.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        ing.metadata.name.clone().unwrap_or_default(),
    )
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

/// Whether weft serves this Ingress, given the cluster's IngressClasses.
pub fn is_ours(ing: &Ingress, classes: &Objects) -> bool {
    let ours = |c: &IngressClass| c.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(CONTROLLER);
    match ing.spec.as_ref().and_then(|s| s.ingress_class_name.as_deref()) {
        Some(name) => {
            name == CLASS || classes.ingress_classes.get(&ObjKey::new("", name)).is_some_and(|c| ours(&c.object))
        }
        None => match annotation(&ing.metadata, "kubernetes.io/ingress.class") {
            Some(legacy) => legacy == CLASS,
            None => classes.ingress_classes.values().any(|c| {
                ours(&c.object)
                    && annotation(&c.object.metadata, "ingressclass.kubernetes.io/is-default-class") == Some("true")
            }),
        },
    }
}

/// Dedicated or shared: the Ingress's annotation, else its class's, else dedicated.
pub fn mode_of(ing: &Ingress, objects: &Objects) -> Mode {
    let class = ing
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.as_deref())
        .and_then(|n| objects.ingress_classes.get(&ObjKey::new("", n)));
    let value = annotation(&ing.metadata, MODE_ANNOTATION)
        .or_else(|| class.and_then(|c| annotation(&c.object.metadata, MODE_ANNOTATION)));
    if value == Some("shared") { Mode::Shared } else { Mode::Dedicated }
}

/// A name for a generated object: `weft-ingress-<name>`, shortened with a
/// hash to fit a Service name (63 characters).
pub fn generated_name(ingress: &str) -> String {
    envoy::generated_name(PREFIX, ingress)
}

/// One route, before ordering.
struct Route {
    rank: u8,
    path: String,
    matcher: Value,
    cluster: String,
}

/// The routes of one host, and whether it is served over TLS.
#[derive(Default)]
struct Host {
    routes: Vec<Route>,
    /// A TLS entry covers it: it is in the secure route configuration.
    tls: bool,
    /// Plain HTTP to it is redirected to HTTPS.
    force_https: bool,
}

/// Why an Ingress path or backend cannot be served (the field it is about
/// goes with it into the Ingress's problems).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum IngressError {
    #[error("path {0:?} must start with '/'")]
    RelativePath(String),
    #[error("pathType {0:?} is not Exact, Prefix or ImplementationSpecific")]
    PathType(String),
    #[error("only Service backends are supported (resource backends are not)")]
    NotAService,
    #[error("a backend Service needs a port (number or name)")]
    NoPort,
    #[error("port {port:?} is named, but Service {service} does not exist (yet) to say which number it is")]
    NoService { service: ObjKey, port: String },
    #[error("Service {service} has no port named {port:?}")]
    NoPortNamed { service: ObjKey, port: String },
}

fn path_match(path_type: &str, path: &str) -> Result<(u8, Value), IngressError> {
    let path = if path.is_empty() { "/" } else { path };
    match path_type {
        "Exact" | "Prefix" if !path.starts_with('/') => Err(IngressError::RelativePath(path.into())),
        "Exact" => Ok((0, json!({ "path": path }))),
        "Prefix" if path.trim_end_matches('/').is_empty() => Ok((2, json!({ "prefix": "/" }))),
        // Kubernetes Prefix matches whole segments (/foo matches /foo and /foo/bar, not /foobar).
        "Prefix" => Ok((2, json!({ "path_separated_prefix": path.trim_end_matches('/') }))),
        // As Cilium does: a regular expression over the whole path.
        "ImplementationSpecific" if path == "/" => Ok((2, json!({ "prefix": "/" }))),
        "ImplementationSpecific" => Ok((1, json!({ "safe_regex": { "regex": path } }))),
        other => Err(IngressError::PathType(other.into())),
    }
}

/// The EDS cluster of an Ingress backend, and the backend Service it needs.
fn backend_cluster(
    ns: &str,
    backend: &k8s_openapi::api::networking::v1::IngressBackend,
    objects: &Objects,
) -> Result<(ObjKey, i32), IngressError> {
    let Some(svc) = &backend.service else {
        return Err(IngressError::NotAService);
    };
    let key = ObjKey::new(ns, svc.name.clone());
    let port = svc.port.as_ref().ok_or(IngressError::NoPort)?;
    if let Some(n) = port.number {
        return Ok((key, n));
    }
    let name = port.name.as_deref().unwrap_or_default();
    let service = objects
        .services
        .get(&key)
        .ok_or_else(|| IngressError::NoService { service: key.clone(), port: name.into() })?;
    service
        .object
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| (key.clone(), p.port))
        .ok_or_else(|| IngressError::NoPortNamed { service: key.clone(), port: name.into() })
}

/// Adds one Ingress's hosts and routes to `hosts` and its TLS entries to
/// `tls_chains` (server names, `<ns>/<secret>`); returns the backends it uses.
fn collect(
    ing: &Ingress,
    objects: &Objects,
    hosts: &mut BTreeMap<String, Host>,
    tls_chains: &mut Vec<(Vec<String>, String)>,
    problems: &mut Vec<IngressProblem>,
) -> BTreeMap<ObjKey, BTreeSet<i32>> {
    let key = key_of(ing);
    let ns = key.namespace.clone();
    let mut backends: BTreeMap<ObjKey, BTreeSet<i32>> = BTreeMap::new();
    let mut bad = Vec::new();
    let Some(spec) = &ing.spec else { return backends };
    let force_https = annotation(&ing.metadata, FORCE_HTTPS_ANNOTATION) != Some("false");
    let mut tls_hosts = BTreeSet::new();
    let mut tls_for_all = false;
    for (i, tls) in spec.tls.iter().flatten().enumerate() {
        let Some(secret) = tls.secret_name.as_deref().filter(|s| !s.is_empty()) else {
            bad.push((format!("spec.tls[{i}].secretName"), "a TLS entry needs a Secret".to_owned()));
            continue;
        };
        let names: Vec<String> = tls.hosts.iter().flatten().cloned().collect();
        tls_for_all |= names.is_empty();
        tls_hosts.extend(names.iter().cloned());
        tls_chains.push((names, format!("{ns}/{secret}")));
    }
    let mut cluster_of =
        |field: String, b: &k8s_openapi::api::networking::v1::IngressBackend, bad: &mut Vec<(String, String)>| {
            match backend_cluster(&ns, b, objects) {
                Ok((svc, port)) => {
                    backends.entry(svc.clone()).or_default().insert(port);
                    Some(format!("{svc}:{port}"))
                }
                Err(e) => {
                    bad.push((field, e.to_string()));
                    None
                }
            }
        };
    let mut routes = Vec::new();
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        let host = rule.host.clone().filter(|h| !h.is_empty()).unwrap_or_else(|| "*".into());
        for (j, p) in rule.http.iter().flat_map(|h| h.paths.iter()).enumerate() {
            let at = format!("spec.rules[{i}].http.paths[{j}]");
            let path = p.path.clone().unwrap_or_default();
            let matched = match path_match(&p.path_type, &path) {
                Ok(m) => m,
                Err(e) => {
                    bad.push((format!("{at}.path"), e.to_string()));
                    continue;
                }
            };
            if let Some(cluster) = cluster_of(format!("{at}.backend"), &p.backend, &mut bad) {
                routes.push((host.clone(), matched.0, path, matched.1, cluster));
            }
        }
    }
    if let Some(b) = &spec.default_backend
        && let Some(cluster) = cluster_of("spec.defaultBackend".into(), b, &mut bad)
    {
        // Last in every host of this Ingress, and in the catch-all host.
        let mut all: BTreeSet<String> = routes.iter().map(|r| r.0.clone()).collect();
        all.insert("*".into());
        for h in all {
            routes.push((h, 3, String::new(), json!({ "prefix": "/" }), cluster.clone()));
        }
    }
    for (host, rank, path, matcher, cluster) in routes {
        let h = hosts.entry(host.clone()).or_default();
        let tls = tls_for_all || tls_hosts.contains(&host);
        h.tls |= tls;
        h.force_https |= tls && force_https;
        // The first Ingress to claim a host and path keeps it.
        if !h.routes.iter().any(|r| r.matcher == matcher) {
            h.routes.push(Route { rank, path, matcher, cluster });
        }
    }
    problems.extend(bad.into_iter().map(|(field, message)| IngressProblem { ingress: key.clone(), field, message }));
    backends
}

fn route_config(name: &str, hosts: &BTreeMap<String, Host>, secure: bool) -> Value {
    let vhosts: Vec<Value> = hosts
        .iter()
        .filter(|(_, h)| !secure || h.tls)
        .map(|(host, h)| {
            let mut routes: Vec<&Route> = h.routes.iter().collect();
            routes.sort_by_key(|a| (a.rank, std::cmp::Reverse(a.path.len())));
            let mut vh = json!({
                "name": host,
                "domains": [host],
                "routes": routes.iter().map(|r| json!({ "match": r.matcher, "route": { "cluster": r.cluster } })).collect::<Vec<_>>(),
            });
            if !secure && h.force_https {
                vh["require_tls"] = json!("ALL");
            }
            vh
        })
        .collect();
    json!({
        "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        "name": name,
        "virtual_hosts": vhosts,
    })
}

/// The EnvoyConfig spec for a set of Ingresses (one, or all shared ones).
fn spec_for(ings: &[&Ingress], objects: &Objects, service: &ObjKey, problems: &mut Vec<IngressProblem>) -> Value {
    let mut hosts = BTreeMap::new();
    let mut tls_chains = Vec::new();
    let mut backends: BTreeMap<ObjKey, BTreeSet<i32>> = BTreeMap::new();
    for ing in ings {
        for (svc, ports) in collect(ing, objects, &mut hosts, &mut tls_chains, problems) {
            backends.entry(svc).or_default().extend(ports);
        }
    }
    let mut chains = Vec::new();
    let tls = !tls_chains.is_empty();
    let mut plain = json!({ "filters": [envoy::hcm("ingress", "insecure")] });
    if tls {
        plain["filter_chain_match"] = json!({ "transport_protocol": "raw_buffer" });
    }
    chains.push(plain);
    for (names, secret) in &tls_chains {
        let mut m = json!({ "transport_protocol": "tls" });
        if !names.is_empty() {
            m["server_names"] = json!(names);
        }
        chains.push(json!({
            "filter_chain_match": m,
            "filters": [envoy::hcm("ingress-tls", "secure")],
            "transport_socket": envoy::tls_transport_socket(std::slice::from_ref(secret)),
        }));
    }
    let listener = envoy::listener("listener", chains, tls);
    let mut resources = vec![listener, route_config("insecure", &hosts, false)];
    if tls {
        resources.push(route_config("secure", &hosts, true));
    }
    for (svc, ports) in &backends {
        for port in ports {
            resources.push(envoy::eds_cluster(&format!("{svc}:{port}"), None, envoy::Upstream::AsDownstream));
        }
    }
    json!({
        "services": [{ "name": service.name, "namespace": service.namespace, "listener": "listener" }],
        "backendServices": envoy::backend_services(&backends),
        "resources": resources,
    })
}

fn meta(name: &str, ns: &str, ingress: Option<&Ingress>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(ns.to_owned()),
        labels: Some(BTreeMap::from([(
            INGRESS_LABEL.to_owned(),
            ingress.and_then(|i| i.metadata.name.clone()).unwrap_or_else(|| "shared".into()),
        )])),
        owner_references: ingress.map(|i| vec![envoy::owner("networking.k8s.io/v1", "Ingress", &i.metadata)]),
        ..Default::default()
    }
}

/// The objects for `ings`, served by the Service `service` (whose metadata
/// `m` the generated objects share); the config is clusterwide when shared.
fn generate(ings: &[&Ingress], objects: &Objects, m: ObjectMeta, clusterwide: bool) -> Generated {
    let mut problems = Vec::new();
    let service = ObjKey::new(m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default());
    let spec = spec_for(ings, objects, &service, &mut problems);
    let mut config_meta = m.clone();
    if clusterwide {
        config_meta.namespace = None;
    }
    Generated {
        envoy_config: json!({
            "apiVersion": crate::xds::envoyconfig::API_VERSION,
            "kind": if clusterwide { "ClusterwideEnvoyConfig" } else { "EnvoyConfig" },
            "metadata": serde_json::to_value(&config_meta).expect("metadata serializes"),
            "spec": spec,
        }),
        service: envoy::lb_service(m.clone(), &[("http".into(), 80), ("https".into(), 443)]),
        endpoints: envoy::placeholder_endpoints(m, &["http".into(), "https".into()]),
        problems,
    }
}

/// What a dedicated Ingress becomes.
pub fn dedicated(ing: &Ingress, objects: &Objects) -> Generated {
    let key = key_of(ing);
    generate(&[ing], objects, meta(&generated_name(&key.name), &key.namespace, Some(ing)), false)
}

/// What the shared Ingresses become together (in `namespace`).
pub fn shared(ings: &[&Ingress], objects: &Objects, namespace: &str) -> Generated {
    generate(ings, objects, meta(PREFIX, namespace, None), true)
}

/// The Ingress status for a Service's load-balancer status.
pub fn ingress_status(svc: &Service) -> IngressLoadBalancerStatus {
    let ingress: Vec<IngressLoadBalancerIngress> = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .map(|i| IngressLoadBalancerIngress { ip: i.ip.clone(), hostname: i.hostname.clone(), ports: None })
        .collect();
    IngressLoadBalancerStatus { ingress: (!ingress.is_empty()).then_some(ingress) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::yaml::{Loaded, load_text};

    fn load(yaml: &str) -> Objects {
        let mut l = Loaded::default();
        load_text(std::path::Path::new("t.yaml"), yaml, &mut l);
        assert!(l.problems.is_empty(), "{:?}", l.problems);
        l.objects
    }

    fn ing(spec: &str, annotations: &str) -> Ingress {
        let o = load(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: i, namespace: d, annotations: {{{annotations}}}}}\nspec: {spec}\n"
        ));
        o.ingresses.values().next().unwrap().object.clone()
    }

    #[test]
    fn which_ingresses_are_weft_s() {
        let none = Objects::default();
        let custom = load(
            "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: edge}\nspec: {controller: weft.io/ingress-controller}\n",
        );
        let default = load(
            "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: edge, annotations: {ingressclass.kubernetes.io/is-default-class: \"true\"}}\nspec: {controller: weft.io/ingress-controller}\n",
        );
        assert!(is_ours(&ing("{ingressClassName: weft}", ""), &none), "the class name alone");
        assert!(!is_ours(&ing("{ingressClassName: cilium}", ""), &none));
        assert!(!is_ours(&ing("{ingressClassName: edge}", ""), &none), "an unknown class");
        assert!(is_ours(&ing("{ingressClassName: edge}", ""), &custom), "a class with weft's controller");
        assert!(!is_ours(&ing("{}", ""), &custom), "no class, and weft's is not the default");
        assert!(is_ours(&ing("{}", ""), &default), "no class: the default class is weft's");
        assert!(is_ours(&ing("{}", "kubernetes.io/ingress.class: weft"), &none), "the legacy annotation");
        assert!(!is_ours(&ing("{}", "kubernetes.io/ingress.class: nginx"), &default), "the legacy annotation wins");
    }
}
