//! L7 visibility without Envoy config: a Service that asks for it (the
//! annotation `weft.io/l7-visibility: http` on the Service or on its
//! Namespace, or the agent config's `l7-visibility` default) gets an
//! EnvoyConfig the agent writes itself, so its HTTP requests and responses
//! become flows, metrics and spans with nothing written by hand.
//!
//! The generated config changes nothing else: one HTTP listener per TCP port
//! of the Service (reached through the dispatcher like any listener Services
//! are redirected to), whose only route sends every request to a cluster of
//! that port's own endpoints (EDS, the addresses the datapath forwards to)
//! picked at random, as the datapath picks a backend. That route is named
//! like its listener (`<ns>/weft:l7:<service>/http-<port>` once qualified),
//! so flows and OTLP span names say which generated config served a
//! request. There is no policy and
//! no route change; Envoy passes the backend's `server` header through and
//! never times a request out. Each config is an ordinary namespaced
//! EnvoyConfig with a name no object can have (`weft:l7:<service>`), so it is
//! translated, checked and confined to its namespace like a user's, and its
//! spec is a function of the Service alone: a build that does not change the
//! Service costs the model one spec comparison (the scale model's caches).
//!
//! A user's EnvoyConfig that names the Service in its `services` wins: no
//! config is generated for that Service, and the status says which config
//! serves it instead. Removing the annotation takes the Service back to
//! plain forwarding (the control loop has the datapath do it before Envoy
//! hears of it); connections keep the forwarding they began with. Envoy
//! drains the listener's connections (each next response says
//! `connection: close`), and their requests still need the routes and
//! clusters: the controller keeps those ([`retired`]) a while longer.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::envoyconfig::{ConfigKey, EnvoyConfig};
use crate::k8s::{
    ObjKey, Objects, Origin,
    crd::{BackendService, EnvoyConfigSpec, RawResource, ServiceListener},
};

/// The annotation, on a Service or a Namespace.
pub const ANNOTATION: &str = "weft.io/l7-visibility";
/// Generated configs' names: this, then the Service's name. A colon is not
/// allowed in object names, so no user object can take one.
pub const NAME_PREFIX: &str = "weft:l7:";

/// What a Service's HTTP visibility is set to (the annotation's values, and
/// the agent config's default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Visibility {
    /// Plain eBPF forwarding.
    #[default]
    None,
    /// Through a generated HTTP listener of the node's Envoy.
    Http,
}

impl Visibility {
    fn parse(v: &str) -> Option<Self> {
        match v {
            "http" => Some(Self::Http),
            "none" => Some(Self::None),
            _ => None,
        }
    }
}

/// Where a Service's setting came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SetBy {
    ServiceAnnotation,
    NamespaceAnnotation,
    AgentDefault,
}

/// What became of a Service that asked for visibility.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum VisibilityState {
    /// A config was generated: its object name and the ports it covers.
    Generated { config: String, ports: Vec<u16> },
    /// A user's EnvoyConfig names the Service: it wins, nothing is generated.
    UserConfigWins { config: String },
    /// No TCP port with an address to redirect (headless, ExternalName, or
    /// only UDP ports or ports whose appProtocol is not HTTP).
    NothingToRedirect,
}

/// One Service that asked for visibility, for `/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ServiceVisibility {
    pub service: String,
    pub set_by: SetBy,
    #[serde(flatten)]
    pub state: VisibilityState,
}

/// What the annotations and the default asked for, for `/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VisibilityReport {
    /// The agent config's default.
    pub default: Visibility,
    pub services: Vec<ServiceVisibility>,
    /// Annotations with values that are neither `http` nor `none` (ignored:
    /// the next level decides).
    pub problems: Vec<String>,
    /// Generated configs whose Service no longer asks, kept without their
    /// listeners while Envoy drains those (see [`retired`]).
    pub retiring: Vec<String>,
}

/// The generated configs and the report.
#[derive(Debug, Default)]
pub struct Generated {
    pub configs: Vec<EnvoyConfig>,
    pub report: VisibilityReport,
}

/// Whether a config is one of the generated ones.
pub fn is_generated(key: &ConfigKey) -> bool {
    !key.clusterwide && key.name().starts_with(NAME_PREFIX)
}

/// The key of a Service's generated config.
pub fn config_key(service: &ObjKey) -> ConfigKey {
    ConfigKey {
        clusterwide: false,
        key: ObjKey::new(service.namespace.clone(), format!("{NAME_PREFIX}{}", service.name)),
    }
}

/// The generated configs for these objects: `user` are the configs written
/// by users (generated ones in it are skipped), whose Services win.
pub fn configs(objects: &Objects, default: Visibility, user: &[EnvoyConfig]) -> Generated {
    let mut claimed: BTreeMap<ObjKey, &ConfigKey> = BTreeMap::new();
    for cfg in user.iter().filter(|c| !is_generated(&c.key)) {
        for service in claims_of(cfg) {
            claimed.entry(service).or_insert(&cfg.key);
        }
    }
    let mut out = Generated { report: VisibilityReport { default, ..Default::default() }, ..Default::default() };
    let mut problems = BTreeSet::new();
    for (key, svc) in &objects.services {
        let svc = &svc.object;
        let Some((Visibility::Http, set_by)) = setting(key, svc, objects, default, &mut problems) else { continue };
        let state = if let Some(owner) = claimed.get(key) {
            VisibilityState::UserConfigWins { config: owner.to_string() }
        } else {
            let ports = http_ports(svc);
            if ports.is_empty() || crate::state::tcp_frontends(svc, None, &ports).is_empty() {
                VisibilityState::NothingToRedirect
            } else {
                let cfg = config(key, &ports);
                let state = VisibilityState::Generated { config: cfg.key.to_string(), ports };
                out.configs.push(cfg);
                state
            }
        };
        out.report.services.push(ServiceVisibility { service: key.to_string(), set_by, state });
    }
    out.report.problems = problems.into_iter().collect();
    out
}

/// The Services a user's config names in its `services` (it wins them
/// over generated configs).
fn claims_of(cfg: &EnvoyConfig) -> impl Iterator<Item = ObjKey> + '_ {
    cfg.spec.services.iter().map(|s| ObjKey::new(cfg.key.service_namespace(s.namespace.as_deref()), s.name.clone()))
}

/// Which user configs' claims decided what a build generated: the
/// Services that ask for visibility, and the ones each config won. A
/// change of configs that keeps every claim that decided something, and
/// makes none that could, leaves the generated configs and the report as
/// they are (see [`Claims::unchanged_by`]).
#[derive(Debug, Default)]
pub struct Claims {
    asking: std::collections::HashSet<String>,
    /// Config (as the report names it) -> the Services it won.
    won: std::collections::HashMap<String, BTreeSet<String>>,
}

impl Claims {
    pub fn of(report: &VisibilityReport) -> Self {
        let mut out = Self::default();
        for s in &report.services {
            out.asking.insert(s.service.clone());
            if let VisibilityState::UserConfigWins { config } = &s.state {
                out.won.entry(config.clone()).or_default().insert(s.service.clone());
            }
        }
        out
    }

    /// Whether config `key` becoming `now` (None: removed) leaves what
    /// visibility generates as it is: it names the same Services that ask
    /// as it won before (an edit keeps its place among the claims: it
    /// still comes first for those), and a removed one won none. Anything
    /// else (a new claim on a Service that asks, a claim it won given up)
    /// may change which config wins a Service, or whether one is generated.
    pub fn unchanged_by(&self, key: &ConfigKey, now: Option<&EnvoyConfig>) -> bool {
        if self.asking.is_empty() {
            return true;
        }
        let won = self.won.get(&key.to_string());
        let claims: BTreeSet<String> =
            now.into_iter().flat_map(claims_of).map(|s| s.to_string()).filter(|s| self.asking.contains(s)).collect();
        match won {
            Some(won) => now.is_some() && claims == *won,
            None => claims.is_empty(),
        }
    }
}

/// What stays of a generated config while Envoy drains its listeners'
/// connections: its routes and clusters, and the endpoints they need, with
/// no listener and no Service redirected.
pub fn retired(cfg: &EnvoyConfig) -> EnvoyConfig {
    let resources = cfg
        .spec
        .resources
        .iter()
        .filter(|r| {
            !r.value().is_ok_and(|v| v.get("@type").and_then(Value::as_str) == Some(super::translate::LISTENER))
        })
        .cloned()
        .collect();
    let backend_services = cfg
        .spec
        .services
        .iter()
        .map(|s| BackendService {
            name: s.name.clone(),
            namespace: None,
            number: s.ports.iter().map(u16::to_string).collect(),
        })
        .collect();
    let spec = EnvoyConfigSpec { resources, backend_services, ..Default::default() };
    EnvoyConfig { spec: std::sync::Arc::new(spec), ..cfg.clone() }
}

/// A Service's setting: its own annotation, else its Namespace's, else the
/// default. A value that is neither `http` nor `none` is reported and the
/// next level decides.
fn setting(
    key: &ObjKey,
    svc: &Service,
    objects: &Objects,
    default: Visibility,
    problems: &mut BTreeSet<String>,
) -> Option<(Visibility, SetBy)> {
    let mut read = |what: String, annotations: Option<&BTreeMap<String, String>>| {
        let v = annotations?.get(ANNOTATION)?;
        let parsed = Visibility::parse(v.trim());
        if parsed.is_none() {
            problems.insert(format!(
                "{what}: metadata.annotations[{ANNOTATION}]: {:?} is neither \"http\" nor \"none\"",
                super::envoyconfig::truncated(v)
            ));
        }
        parsed
    };
    if let Some(v) = read(format!("Service {key}"), svc.metadata.annotations.as_ref()) {
        return Some((v, SetBy::ServiceAnnotation));
    }
    let ns = objects.namespaces.get(&ObjKey::new("", key.namespace.clone()));
    if let Some(v) =
        read(format!("Namespace {}", key.namespace), ns.and_then(|n| n.object.metadata.annotations.as_ref()))
    {
        return Some((v, SetBy::NamespaceAnnotation));
    }
    Some((default, SetBy::AgentDefault))
}

/// The Service's TCP ports that may carry HTTP: all of them but those whose
/// `appProtocol` names another protocol.
fn http_ports(svc: &Service) -> Vec<u16> {
    let http = |p: &ServicePort| {
        p.app_protocol.as_deref().is_none_or(|a| {
            matches!(a.to_ascii_lowercase().as_str(), "http" | "http2" | "h2c" | "kubernetes.io/h2c" | "grpc")
        })
    };
    let mut ports: Vec<u16> = svc
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP" && http(p))
        .filter_map(|p| u16::try_from(p.port).ok())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The generated config of one Service: per port, a listener, its route and
/// a cluster of that port's endpoints.
fn config(service: &ObjKey, ports: &[u16]) -> EnvoyConfig {
    let mut resources = Vec::new();
    let mut services = Vec::new();
    for port in ports {
        let (listener, cluster) = (format!("http-{port}"), format!("port-{port}"));
        services.push(ServiceListener {
            name: service.name.clone(),
            namespace: None,
            listener: Some(listener.clone()),
            ports: vec![*port],
        });
        resources.push(RawResource::from(json!({
            "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
            "name": listener,
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": hcm(&listener)
            }]}]
        })));
        resources.push(RawResource::from(json!({
            "@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            "name": listener,
            "virtual_hosts": [{
                "name": "any",
                "domains": ["*"],
                // Named like the listener, so flows and spans say which
                // generated config and port served a request.
                "routes": [{"name": listener, "match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}]
            }]
        })));
        resources.push(RawResource::from(json!({
            "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            "name": cluster,
            "type": "EDS",
            "eds_cluster_config": {"service_name": format!("{service}:{port}")},
            "lb_policy": "RANDOM",
            "connect_timeout": "5s"
        })));
    }
    EnvoyConfig {
        key: config_key(service),
        origin: Origin::Generated { what: "the weft.io/l7-visibility annotation or default" },
        generation: 0,
        annotations: Default::default(),
        spec: std::sync::Arc::new(EnvoyConfigSpec { services, resources, ..Default::default() }),
    }
}

/// The HTTP connection manager: HTTP/1 or HTTP/2 as the client speaks,
/// upgrades (WebSocket) passed through, the backend's `server` header kept.
fn hcm(routes: &str) -> Value {
    json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "weft_l7",
        "rds": {"route_config_name": routes},
        "server_header_transformation": "PASS_THROUGH",
        "upgrade_configs": [{"upgrade_type": "websocket"}],
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
        }]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        k8s::yaml,
        xds::{model::NodeInfo, translate},
    };

    fn objects(text: &str) -> (Objects, Vec<EnvoyConfig>) {
        let mut l = yaml::Loaded::default();
        yaml::load_text(std::path::Path::new("o.yaml"), text, &mut l);
        assert!(l.problems.is_empty(), "{:?}", l.problems);
        let user = l.configs.iter().map(|d| d.parsed.clone().unwrap()).collect::<Vec<_>>();
        (l.objects, user)
    }

    fn service(ns: &str, name: &str, annotation: Option<&str>, ports: &str) -> String {
        let ann = annotation.map(|a| format!(", annotations: {{{ANNOTATION}: {a:?}}}")).unwrap_or_default();
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}{ann}}}\nspec: {{clusterIP: \
             10.96.0.{}, ports: {ports}}}\n",
            name.len() + 10 * ns.len()
        )
    }

    fn namespace(name: &str, annotation: Option<&str>) -> String {
        let ann = annotation.map(|a| format!(", annotations: {{{ANNOTATION}: {a:?}}}")).unwrap_or_default();
        format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}{ann}}}\n")
    }

    const WEB_PORTS: &str = "[{name: http, port: 80, targetPort: 8080}, {name: dns, port: 53, protocol: UDP}, {name: \
                             db, port: 5432, appProtocol: postgresql}, {name: alt, port: 8443}]";

    fn generated_names(g: &Generated) -> Vec<String> {
        g.configs.iter().map(|c| c.key.to_string()).collect()
    }

    #[test]
    fn an_annotated_service_gets_a_listener_per_http_port_that_translates_and_builds() {
        let text = service("shop", "web", Some("http"), WEB_PORTS) + &service("shop", "plain", None, "[{port: 80}]");
        let (objs, user) = objects(&text);
        let g = configs(&objs, Visibility::None, &user);
        assert_eq!(generated_names(&g), ["EnvoyConfig shop/weft:l7:web"]);
        assert_eq!(
            g.report.services,
            [ServiceVisibility {
                service: "shop/web".into(),
                set_by: SetBy::ServiceAnnotation,
                state: VisibilityState::Generated {
                    config: "EnvoyConfig shop/weft:l7:web".into(),
                    ports: vec![80, 8443]
                },
            }]
        );
        let cfg = &g.configs[0];
        assert!(is_generated(&cfg.key));
        let t = translate::translate(cfg).unwrap_or_else(|p| panic!("{p:?}"));
        let names = |v: Vec<&String>| v.into_iter().cloned().collect::<Vec<_>>();
        assert_eq!(
            names(t.listeners.iter().map(|l| &l.name).collect()),
            ["shop/weft:l7:web/http-80", "shop/weft:l7:web/http-8443"]
        );
        assert_eq!(
            names(t.clusters.iter().map(|c| &c.name).collect()),
            ["shop/weft:l7:web/port-80", "shop/weft:l7:web/port-8443"]
        );
        // Each route is named (qualified) like its listener: flows and spans
        // say which generated config and port served a request.
        let routes: Vec<&str> = t
            .routes
            .iter()
            .flat_map(|r| r.resource.virtual_hosts.iter().flat_map(|v| v.routes.iter().map(|r| r.name.as_str())))
            .collect();
        assert_eq!(routes, ["shop/weft:l7:web/http-80", "shop/weft:l7:web/http-8443"]);
        // Each port to its own listener; the port's endpoints go to Envoy.
        let redirects: Vec<_> = t.redirects.iter().map(|r| (r.service.to_string(), r.ports.clone())).collect();
        assert_eq!(redirects, [("shop/web".to_owned(), vec![80]), ("shop/web".to_owned(), vec![8443])]);
        // The model serves it like a user's config: both ports redirected.
        let mut model = crate::xds::model::Model::new(crate::xds::ports::ProxyPorts::ephemeral());
        let built = model.build(&g.configs, &[], &objs, &NodeInfo { any: true, ..Default::default() });
        let status = &built.statuses[&cfg.key];
        assert!(status.problems.is_empty(), "{:?}", status.problems);
        assert!(status.origin.starts_with("generated by the agent"), "{}", status.origin);
        let web = ObjKey::new("shop", "web");
        assert!(built.redirects.contains_key(&(web.clone(), Some(80))));
        assert!(built.redirects.contains_key(&(web, Some(8443))));
        assert!(built.xds.contains(translate::ENDPOINT, "shop/web:80"));
        // Its spec depends on the Service only: the same twice.
        assert_eq!(configs(&objs, Visibility::None, &user).configs, g.configs);
    }

    #[test]
    fn a_namespace_annotation_and_the_default_apply_and_a_service_can_opt_out() {
        let text = namespace("shop", Some("http"))
            + &namespace("misc", None)
            + &service("shop", "web", None, "[{port: 80}]")
            + &service("shop", "db", Some("none"), "[{port: 80}]")
            + &service("misc", "api", None, "[{port: 80}]");
        let (objs, user) = objects(&text);
        let g = configs(&objs, Visibility::None, &user);
        assert_eq!(generated_names(&g), ["EnvoyConfig shop/weft:l7:web"]);
        assert_eq!(g.report.services[0].set_by, SetBy::NamespaceAnnotation);
        let g = configs(&objs, Visibility::Http, &user);
        assert_eq!(generated_names(&g), ["EnvoyConfig misc/weft:l7:api", "EnvoyConfig shop/weft:l7:web"]);
        assert_eq!(g.report.services[0].set_by, SetBy::AgentDefault);
        // The default off and no annotation: nothing at all.
        let (objs, user) = objects(&service("misc", "api", None, "[{port: 80}]"));
        let g = configs(&objs, Visibility::None, &user);
        assert!(g.configs.is_empty() && g.report.services.is_empty());
    }

    #[test]
    fn a_bad_value_is_reported_and_the_next_level_decides() {
        let text = namespace("shop", Some("http")) + &service("shop", "web", Some("HTTP/1.1"), "[{port: 80}]");
        let (objs, user) = objects(&text);
        let g = configs(&objs, Visibility::None, &user);
        assert_eq!(generated_names(&g), ["EnvoyConfig shop/weft:l7:web"]);
        assert_eq!(g.report.services[0].set_by, SetBy::NamespaceAnnotation);
        assert_eq!(
            g.report.problems,
            [
                "Service shop/web: metadata.annotations[weft.io/l7-visibility]: \"HTTP/1.1\" is neither \"http\" nor \"none\""
            ]
        );
    }

    #[test]
    fn a_users_config_for_the_service_wins_and_services_without_http_ports_get_nothing() {
        let user_cfg = "---\napiVersion: weft.io/v1alpha1\nkind: ClusterwideEnvoyConfig\nmetadata: {name: mine}\nspec:\n  \
                        services: [{name: web, namespace: shop}]\n";
        let text = service("shop", "web", Some("http"), "[{port: 80}]")
            + &service("shop", "dns", Some("http"), "[{port: 53, protocol: UDP}]")
            + "---\napiVersion: v1\nkind: Service\nmetadata: {name: headless, namespace: shop, annotations: \
               {weft.io/l7-visibility: http}}\nspec: {clusterIP: None, ports: [{port: 80}]}\n"
            + user_cfg;
        let (objs, user) = objects(&text);
        let g = configs(&objs, Visibility::None, &user);
        assert!(g.configs.is_empty(), "{:?}", generated_names(&g));
        let states: Vec<_> = g.report.services.iter().map(|s| (s.service.as_str(), &s.state)).collect();
        assert_eq!(
            states,
            [
                ("shop/dns", &VisibilityState::NothingToRedirect),
                ("shop/headless", &VisibilityState::NothingToRedirect),
                ("shop/web", &VisibilityState::UserConfigWins { config: "ClusterwideEnvoyConfig mine".into() }),
            ]
        );
        // A generated config among the "user" ones does not claim its Service.
        let (objs, _) = objects(&service("shop", "web", Some("http"), "[{port: 80}]"));
        let first = configs(&objs, Visibility::None, &[]).configs;
        assert_eq!(configs(&objs, Visibility::None, &first).configs, first);
    }
}
