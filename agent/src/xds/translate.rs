//! One EnvoyConfig into Envoy resources, with Cilium's semantics:
//!
//! - accepted types: Listener, RouteConfiguration, Cluster,
//!   ClusterLoadAssignment, Secret; each needs a name, unique in the config;
//! - names without `/` are qualified as `<namespace>/<config>/<name>`
//!   (clusterwide configs have an empty namespace); listener, route
//!   configuration and virtual host names, and RDS references, are qualified
//!   even when they contain `/` unless they already start with the config's
//!   namespace; cluster and secret names and references to them are qualified
//!   only when they have no `/`;
//! - references to the bootstrap's own clusters (`envoy-admin`) stay as they are
//!   (a weft extension: Cilium would qualify them and lose the reference);
//! - missing config sources (RDS, EDS, SDS) point at the agent's ADS;
//! - an HTTP router filter without `typed_config` gets the Router type;
//! - `services[]` map to a listener of the config: the named one, or when none
//!   is named the first listener (as Cilium documents; Cilium's code takes the
//!   last one, so name the listener when a config has several).
//!
//! Problems name the resource (index and name) and the field path.

use std::collections::BTreeSet;

use envoy_types::pb::{
    envoy::{
        config::{
            accesslog::v3::{AccessLog, access_log},
            cluster::v3::{Cluster, cluster},
            core::v3::{
                AggregatedConfigSource, ApiVersion, ConfigSource, TransportSocket, config_source, transport_socket,
            },
            endpoint::v3::ClusterLoadAssignment,
            listener::v3::{Listener, filter},
            route::v3::{RouteConfiguration, route, route_action},
        },
        extensions::{
            filters::{
                http::router::v3::Router,
                network::{
                    http_connection_manager::v3::{HttpConnectionManager, http_connection_manager, http_filter},
                    tcp_proxy::v3::{TcpProxy, tcp_proxy},
                },
            },
            transport_sockets::tls::v3::{
                CommonTlsContext, DownstreamTlsContext, Secret, UpstreamTlsContext, common_tls_context,
            },
        },
    },
    google::protobuf::{Any, BoolValue},
};
use prost::{Message, Name};
use prost_reflect::DynamicMessage;
use serde_json::Value;

use super::{
    envoyconfig::EnvoyConfig,
    protojson::{self, DecodeError},
    rules, tenancy,
};
use crate::{
    k8s::ObjKey,
    limits::{MAX_NAME_BYTES, MAX_RESOURCES},
};

pub use super::tenancy::BOOTSTRAP_CLUSTERS;

/// The access log the agent adds to every HTTP connection manager: Envoy
/// appends a JSON line per request to the agent's spool, which turns them
/// into L7 flows (`weft_observe::pipeline::spool`).
pub const ACCESS_LOG_NAME: &str = "weft-flows";

/// Where Envoy writes the access log: relative to its working directory,
/// which the agent sets to its state directory (so two agents on one
/// machine, as in the lab, do not share it).
pub const ACCESS_LOG_PATH: &str = "access-log/current.log";

/// The agent's access log, encoded the same way every time (in every agent
/// process): `google.protobuf.Struct` is a map, which prost encodes in the
/// order of a `HashMap`, so the `FileAccessLog` is written with the same
/// field numbers from these mirrors, the format's keys in their order. A
/// listener translated again is then the same bytes, and Envoy does not
/// replace (and drain) it after every translation or agent restart.
mod wire {
    use envoy_types::pb::google::protobuf::Value;

    /// A `Struct.fields` map entry.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Field {
        #[prost(string, tag = "1")]
        pub key: String,
        #[prost(message, optional, tag = "2")]
        pub value: Option<Value>,
    }

    /// `google.protobuf.Struct`, fields in a fixed order.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Struct {
        #[prost(message, repeated, tag = "1")]
        pub fields: Vec<Field>,
    }

    /// `envoy.config.core.v3.SubstitutionFormatString` with `json_format`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct JsonFormat {
        #[prost(message, optional, tag = "2")]
        pub json_format: Option<Struct>,
    }

    /// `envoy.extensions.access_loggers.file.v3.FileAccessLog` with `log_format`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FileAccessLog {
        #[prost(string, tag = "1")]
        pub path: String,
        #[prost(message, optional, tag = "5")]
        pub log_format: Option<JsonFormat>,
    }
}

/// The agent's access log for a connection manager (made once each by
/// [`ours`] and [`weft_access_log_entry`]).
fn weft_access_log() -> AccessLog {
    use envoy_types::pb::{
        envoy::extensions::access_loggers::file::v3::FileAccessLog,
        google::protobuf::{Value, value},
    };
    let fields = weft_observe::pipeline::accesslog::FORMAT
        .iter()
        .map(|(k, op)| wire::Field {
            key: k.to_string(),
            value: Some(Value { kind: Some(value::Kind::StringValue(op.to_string())) }),
        })
        .collect();
    let cfg = wire::FileAccessLog {
        path: ACCESS_LOG_PATH.into(),
        log_format: Some(wire::JsonFormat { json_format: Some(wire::Struct { fields }) }),
    };
    AccessLog {
        name: ACCESS_LOG_NAME.into(),
        config_type: Some(access_log::ConfigType::TypedConfig(Any {
            type_url: FileAccessLog::type_url(),
            value: cfg.encode_to_vec(),
        })),
        ..Default::default()
    }
}

/// The agent's access log as a dynamic message (what the tenancy rules
/// allow where they find it), decoded once.
fn ours() -> Option<&'static DynamicMessage> {
    static OURS: std::sync::OnceLock<Option<DynamicMessage>> = std::sync::OnceLock::new();
    OURS.get_or_init(|| {
        protojson::message_for_type_url(&AccessLog::type_url())
            .and_then(|d| DynamicMessage::decode(d, weft_access_log().encode_to_vec().as_slice()).ok())
    })
    .as_ref()
}

/// Gives each HTTP connection manager of the listener the agent's access
/// log, unless it has it already (a config that spells it out exactly).
/// The model does this when it shapes a listener for the node (or, for a
/// listener that joins a group, the group's listener), not
/// [`translate`]: the log is the agent's own, the same bytes every time,
/// so the checks need not walk it (983 of a bench listener's 1,329 bytes,
/// 30 fields each decoded as a dynamic message, were most of what they
/// walked), and the kept translation need not hold it. The log's entry is
/// appended to the connection manager's bytes as they are (a repeated
/// field's entries are read in the order they come): decoded and encoded
/// again, its maps (`typed_per_filter_config`, metadata) could come out in
/// another order each time, and Envoy would take an unchanged listener as
/// changed.
pub(crate) fn add_weft_access_log(l: &mut Listener) {
    for fc in l.filter_chains.iter_mut().chain(l.default_filter_chain.as_mut()) {
        for f in fc.filters.iter_mut() {
            let Some(filter::ConfigType::TypedConfig(any)) = f.config_type.as_mut() else { continue };
            if !any.type_url.ends_with(".HttpConnectionManager") {
                continue;
            }
            let Some(hcm) = unpack::<HttpConnectionManager>(any) else { continue };
            if !has_weft_access_log(&hcm) {
                any.value.extend_from_slice(weft_access_log_entry());
            }
        }
    }
}

/// The agent's access log as one encoded `access_log` entry of a
/// connection manager: a manager with nothing else set is that entry alone.
fn weft_access_log_entry() -> &'static [u8] {
    static ENTRY: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
        HttpConnectionManager { access_log: vec![weft_access_log()], ..Default::default() }.encode_to_vec()
    });
    &ENTRY
}

/// Whether the connection manager already has the agent's access log (one
/// added before, or a config that spells it out).
pub(crate) fn has_weft_access_log(hcm: &HttpConnectionManager) -> bool {
    use envoy_types::pb::envoy::extensions::access_loggers::file::v3::FileAccessLog;
    hcm.access_log.iter().any(|a| match &a.config_type {
        Some(access_log::ConfigType::TypedConfig(any)) => {
            a.name == ACCESS_LOG_NAME && unpack::<FileAccessLog>(any).is_some_and(|f| f.path == ACCESS_LOG_PATH)
        }
        _ => false,
    })
}

/// Whether each HTTP connection manager of the listener logs each request
/// to the agent, once (and it has one at least).
#[cfg(test)]
pub(crate) fn logs_to_the_agent_once(l: &Listener) -> bool {
    let hcms: Vec<HttpConnectionManager> = l
        .filter_chains
        .iter()
        .flat_map(|fc| &fc.filters)
        .filter_map(|f| match &f.config_type {
            Some(filter::ConfigType::TypedConfig(any)) if any.type_url.ends_with(".HttpConnectionManager") => {
                unpack(any)
            }
            _ => None,
        })
        .collect();
    !hcms.is_empty() && hcms.iter().all(|h| has_weft_access_log(h) && h.access_log.len() == 1)
}

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// What is wrong, and where: a resource (its index in `spec.resources` and its
/// name) and a field path, or a spec field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `spec.resources[2] (Listener "l")`, or a spec path like `spec.services[0].listener`.
    pub place: String,
    /// Field path inside the resource, if any.
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.place.is_empty(), self.path.is_empty()) {
            (true, _) => f.write_str(&self.message),
            (false, true) => write!(f, "{}: {}", self.place, self.message),
            (false, false) => write!(f, "{}: {}: {}", self.place, self.path, self.message),
        }
    }
}

/// A resource of the config after translation.
#[derive(Clone, Debug, PartialEq)]
pub struct Item<T> {
    /// Qualified name.
    pub name: String,
    /// The name as the config writes it.
    pub written: String,
    /// Index in `spec.resources`.
    pub index: usize,
    pub resource: T,
}

/// A Service port range redirected to a listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub service: ObjKey,
    /// Service ports; empty: all.
    pub ports: Vec<u16>,
    /// Qualified listener name.
    pub listener: String,
}

/// A Service whose endpoints go to Envoy: port filter (numbers or names; empty: all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdsService {
    pub service: ObjKey,
    pub ports: Vec<String>,
}

/// What a config refers to outside itself, checked when all configs are known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct References {
    /// (place, route configuration name) from listeners' RDS.
    pub routes: Vec<(String, String)>,
    /// (place, cluster name) from routes and TCP proxies.
    pub clusters: Vec<(String, String)>,
    /// (place, EDS resource name) from EDS clusters.
    pub endpoints: Vec<(String, String)>,
    /// (place, secret name) from SDS.
    pub secrets: Vec<(String, String)>,
    /// (place, address) of upstream endpoints a namespaced config writes:
    /// each must be a Pod's or Service's of its namespace (see `super::tenancy`).
    pub addresses: Vec<(String, std::net::IpAddr)>,
}

/// A config translated into Envoy resources. `L` is what of each listener
/// is held: the whole [`Listener`] as translated, or what the model keeps
/// of it between builds (its address: see `model::Translation`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Translated<L = Listener> {
    pub listeners: Vec<Item<L>>,
    pub routes: Vec<Item<RouteConfiguration>>,
    pub clusters: Vec<Item<Cluster>>,
    pub endpoints: Vec<Item<ClusterLoadAssignment>>,
    pub secrets: Vec<Item<Secret>>,
    pub redirects: Vec<Redirect>,
    pub eds_services: Vec<EdsService>,
    pub references: References,
}

/// Qualifies a name the way Cilium does (see the module doc).
pub fn qualify(namespace: &str, config: &str, name: &str, force: bool) -> String {
    let idx = name.find('/');
    let keep = match idx {
        None => false,
        Some(i) => !force || (i == namespace.len() && name.starts_with(namespace)),
    };
    if name.is_empty() || keep { name.to_owned() } else { format!("{namespace}/{config}/{name}") }
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

fn pack<T: Message + Name>(m: &T) -> Any {
    Any { type_url: T::type_url(), value: m.encode_to_vec() }
}

fn unpack<T: Message + Default>(any: &Any) -> Option<T> {
    T::decode(any.value.as_slice()).ok()
}

struct Ctx<'a> {
    ns: &'a str,
    cfg: &'a str,
    refs: References,
}

impl Ctx<'_> {
    fn q(&self, name: &str) -> String {
        qualify(self.ns, self.cfg, name, false)
    }
    fn qf(&self, name: &str) -> String {
        qualify(self.ns, self.cfg, name, true)
    }
    /// A cluster reference: the bootstrap's clusters keep their names.
    fn cluster_ref(&mut self, place: &str, name: &mut String) {
        if !BOOTSTRAP_CLUSTERS.contains(&name.as_str()) {
            *name = self.q(name);
        }
        self.refs.clusters.push((place.to_owned(), name.clone()));
    }
}

fn place(index: usize, kind: &str, name: &str) -> String {
    format!("spec.resources[{index}] ({kind} {name:?})")
}

/// Translates a config. Every problem found is returned, not only the first.
pub fn translate(cfg: &EnvoyConfig) -> Result<Translated, Vec<Problem>> {
    let mut problems = Vec::new();
    let mut out = Translated::default();
    // Listeners that are there but broken: a Service naming one is already explained.
    let mut broken_listeners = BTreeSet::new();
    let mut ctx = Ctx { ns: cfg.key.namespace(), cfg: cfg.key.name(), refs: References::default() };

    if cfg.spec.resources.len() > MAX_RESOURCES {
        return Err(vec![Problem {
            place: "spec.resources".into(),
            path: String::new(),
            message: format!(
                "{} resources; at most {MAX_RESOURCES} are accepted in one object: split it into several",
                cfg.spec.resources.len()
            ),
        }]);
    }
    for (index, written) in cfg.spec.resources.iter().enumerate() {
        let base = format!("spec.resources[{index}]");
        let raw = match written.value() {
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem { place: base, path: String::new(), message: format!("cannot be read: {e}") });
                continue;
            }
        };
        let written_name = raw.get("name").and_then(|n| n.as_str()).unwrap_or("");
        let type_name = raw.get("@type").and_then(|t| t.as_str()).unwrap_or("").rsplit('.').next().unwrap_or("");
        let place = if written_name.is_empty() || written_name.len() > MAX_NAME_BYTES {
            base.clone()
        } else {
            format!("{base} ({type_name} {written_name:?})")
        };
        let r = resource(&mut ctx, index, &raw, &place, &mut out);
        if let Err(p) = r {
            if raw.get("@type").and_then(|t| t.as_str()) == Some(LISTENER) && !written_name.is_empty() {
                broken_listeners.insert(ctx.qf(written_name));
            }
            problems.push(p);
        }
    }
    duplicates(&out, &mut problems);
    check_translated(cfg, &mut ctx, &out, &mut problems);

    // services[]: redirected to a listener of this config.
    for (i, s) in cfg.spec.services.iter().enumerate() {
        let place = format!("spec.services[{i}]");
        let namespace = cfg.key.service_namespace(s.namespace.as_deref());
        let listener = match &s.listener {
            Some(l) => {
                let q = ctx.qf(l);
                if broken_listeners.contains(&q) {
                    continue; // its own problem says why
                }
                if !out.listeners.iter().any(|x| x.name == q) {
                    problems.push(Problem {
                        place: format!("{place}.listener"),
                        path: String::new(),
                        message: format!("no listener named {l:?} in this config"),
                    });
                    continue;
                }
                q
            }
            None => match out.listeners.first() {
                Some(l) => l.name.clone(),
                None if !broken_listeners.is_empty() => continue,
                None => {
                    problems.push(Problem {
                        place,
                        path: String::new(),
                        message: "the config has no listener to redirect this Service to".into(),
                    });
                    continue;
                }
            },
        };
        let service = ObjKey::new(namespace, s.name.clone());
        out.redirects.push(Redirect { service: service.clone(), ports: s.ports.clone(), listener });
        // Services' endpoints go to Envoy too, for the clusters that route to them.
        out.eds_services.push(EdsService { service, ports: s.ports.iter().map(u16::to_string).collect() });
    }
    for s in &cfg.spec.backend_services {
        let namespace = cfg.key.service_namespace(s.namespace.as_deref());
        out.eds_services.push(EdsService { service: ObjKey::new(namespace, s.name.clone()), ports: s.number.clone() });
    }
    out.references = ctx.refs;
    if problems.is_empty() { Ok(out) } else { Err(problems) }
}

/// Decodes one resource of `spec.resources` and translates it into `out`.
fn resource(ctx: &mut Ctx<'_>, index: usize, raw: &Value, place: &str, out: &mut Translated) -> Result<(), Problem> {
    let at = |path: &str, message: String| Problem { place: place.to_owned(), path: path.to_owned(), message };
    let (url, msg) = protojson::decode_resource(raw).map_err(|DecodeError { path, message }| at(&path, message))?;
    if let Some((path, len)) = long_name(&msg) {
        return Err(at(&path, format!("a name of {len} bytes; at most {MAX_NAME_BYTES} are accepted")));
    }
    let decoded = |e: prost::DecodeError| at("", format!("does not decode as {url}: {e}"));
    match url.as_str() {
        LISTENER => listener(ctx, index, msg.transcode_to().map_err(decoded)?, out),
        ROUTE => route_configuration(ctx, index, msg.transcode_to().map_err(decoded)?, out),
        CLUSTER => cluster(ctx, index, msg.transcode_to().map_err(decoded)?, out),
        ENDPOINT => {
            let mut cla: ClusterLoadAssignment = msg.transcode_to().map_err(decoded)?;
            if cla.cluster_name.is_empty() {
                return Err(at("cluster_name", "a ClusterLoadAssignment needs a cluster_name".into()));
            }
            let written = cla.cluster_name.clone();
            cla.cluster_name = ctx.q(&cla.cluster_name);
            out.endpoints.push(Item { name: cla.cluster_name.clone(), written, index, resource: cla });
            Ok(())
        }
        SECRET => {
            let mut s: Secret = msg.transcode_to().map_err(decoded)?;
            if s.name.is_empty() {
                return Err(at("name", "a Secret needs a name".into()));
            }
            let written = s.name.clone();
            s.name = ctx.q(&s.name);
            out.secrets.push(Item { name: s.name.clone(), written, index, resource: s });
            Ok(())
        }
        other => Err(Problem {
            place: format!("spec.resources[{index}]"),
            path: "@type".into(),
            message: format!(
                "{other} is not accepted here: resources are Listener, RouteConfiguration, Cluster, ClusterLoadAssignment or Secret"
            ),
        }),
    }
}

/// The first name field (`name`, `cluster_name`, `route_config_name`...) of a
/// resource longer than [`MAX_NAME_BYTES`]: its path and length.
fn long_name(msg: &DynamicMessage) -> Option<(String, usize)> {
    let mut found = None;
    let _ = protojson::walk(msg, &mut |path, m| {
        if found.is_some() {
            return;
        }
        for (f, v) in m.fields() {
            if let prost_reflect::Value::String(s) = v {
                let name = f.name();
                if (name == "name" || name.ends_with("_name") || name == "cluster") && s.len() > MAX_NAME_BYTES {
                    found = Some((protojson::join(path, name), s.len()));
                    return;
                }
            }
        }
    });
    found
}

/// Checks every translated resource (as it will reach Envoy) against the
/// field rules Envoy declares and, for a namespaced config, the tenancy rules.
fn check_translated(cfg: &EnvoyConfig, ctx: &mut Ctx<'_>, out: &Translated, problems: &mut Vec<Problem>) {
    fn each<T: Message + Name>(
        cfg: &EnvoyConfig,
        ctx: &mut Ctx<'_>,
        kind: &str,
        items: &[Item<T>],
        problems: &mut Vec<Problem>,
    ) {
        let Some(desc) = protojson::message_for_type_url(&T::type_url()) else { return };
        for it in items {
            let at = place(it.index, kind, &it.written);
            let msg = match DynamicMessage::decode(desc.clone(), it.resource.encode_to_vec().as_slice()) {
                Ok(m) => m,
                Err(e) => {
                    problems.push(Problem { place: at, path: String::new(), message: format!("does not decode: {e}") });
                    continue;
                }
            };
            // One walk for both sets of rules: each walk decodes every `Any` payload again.
            let mut broken = Vec::new();
            let mut tenancy = (!cfg.key.clusterwide).then(|| tenancy::Checker::new(cfg.key.namespace(), ours()));
            let mut addresses = Vec::new();
            let walked = protojson::walk(&msg, &mut |path, m| {
                rules::check(path, m, &mut broken);
                if let Some(t) = tenancy.as_mut() {
                    t.visit(path, m, &mut |path, ip| addresses.push((format!("{at}: {path}"), ip)));
                }
            });
            broken.extend(walked.err());
            ctx.refs.addresses.extend(addresses);
            let refused = tenancy.into_iter().flat_map(|t| t.refusals).map(|r| (r.path, r.message));
            for (path, message) in broken.into_iter().map(|e| (e.path, e.message)).chain(refused) {
                problems.push(Problem { place: at.clone(), path, message });
            }
        }
    }
    each(cfg, ctx, "Listener", &out.listeners, problems);
    each(cfg, ctx, "RouteConfiguration", &out.routes, problems);
    each(cfg, ctx, "Cluster", &out.clusters, problems);
    each(cfg, ctx, "ClusterLoadAssignment", &out.endpoints, problems);
    each(cfg, ctx, "Secret", &out.secrets, problems);
}

fn duplicates(out: &Translated, problems: &mut Vec<Problem>) {
    fn check<T>(kind: &str, items: &[Item<T>], problems: &mut Vec<Problem>) {
        let mut seen = BTreeSet::new();
        for it in items {
            if !seen.insert(it.name.as_str()) {
                problems.push(Problem {
                    place: place(it.index, kind, &it.written),
                    path: "name".into(),
                    message: format!("another {kind} of this config has the name {:?}", it.name),
                });
            }
        }
    }
    check("Listener", &out.listeners, problems);
    check("RouteConfiguration", &out.routes, problems);
    check("Cluster", &out.clusters, problems);
    check("ClusterLoadAssignment", &out.endpoints, problems);
    check("Secret", &out.secrets, problems);
}

fn listener(ctx: &mut Ctx<'_>, index: usize, mut l: Listener, out: &mut Translated) -> Result<(), Problem> {
    if l.name.is_empty() {
        return Err(Problem {
            place: format!("spec.resources[{index}]"),
            path: "name".into(),
            message: "a Listener needs a name".into(),
        });
    }
    let original = l.name.clone();
    l.name = ctx.qf(&l.name);
    let at = place(index, "Listener", &original);
    if l.filter_chains.is_empty() && l.default_filter_chain.is_none() && l.listener_filters.is_empty() {
        return Err(Problem {
            place: at,
            path: "filter_chains".into(),
            message: "a listener needs at least one filter chain (Envoy refuses one without)".into(),
        });
    }
    for (ci, fc) in l.filter_chains.iter_mut().chain(l.default_filter_chain.as_mut()).enumerate() {
        if let Some(ts) = fc.transport_socket.as_mut() {
            transport_socket(ctx, &at, ts);
        }
        for (fi, f) in fc.filters.iter_mut().enumerate() {
            let fpath = format!("filter_chains[{ci}].filters[{fi}].typed_config");
            let Some(filter::ConfigType::TypedConfig(any)) = f.config_type.as_mut() else { continue };
            if any.type_url.ends_with(".HttpConnectionManager") {
                let Some(mut hcm) = unpack::<HttpConnectionManager>(any) else { continue };
                match hcm.route_specifier.as_mut() {
                    Some(http_connection_manager::RouteSpecifier::Rds(rds)) => {
                        if !rds.route_config_name.is_empty() {
                            rds.route_config_name = ctx.qf(&rds.route_config_name);
                            ctx.refs.routes.push((format!("{at}: {fpath}.rds"), rds.route_config_name.clone()));
                        }
                        if rds.config_source.is_none() {
                            rds.config_source = Some(ads());
                        }
                    }
                    Some(http_connection_manager::RouteSpecifier::RouteConfig(rc)) => {
                        qualify_route_names(ctx, &format!("{at}: {fpath}.route_config"), rc);
                    }
                    _ => {}
                }
                for hf in hcm.http_filters.iter_mut() {
                    if hf.config_type.is_none() && hf.name == "envoy.filters.http.router" {
                        hf.config_type = Some(http_filter::ConfigType::TypedConfig(pack(&Router::default())));
                    }
                }
                *any = pack(&hcm);
            } else if any.type_url.ends_with(".TcpProxy") {
                let Some(mut tp) = unpack::<TcpProxy>(any) else { continue };
                let p = format!("{at}: {fpath}");
                match tp.cluster_specifier.as_mut() {
                    Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => ctx.cluster_ref(&p, c),
                    Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
                        for c in w.clusters.iter_mut() {
                            ctx.cluster_ref(&p, &mut c.name);
                        }
                    }
                    None => {}
                }
                *any = pack(&tp);
            }
        }
    }
    out.listeners.push(Item { name: l.name.clone(), written: original, index, resource: l });
    Ok(())
}

fn qualify_route_names(ctx: &mut Ctx<'_>, at: &str, rc: &mut RouteConfiguration) {
    rc.name = ctx.qf(&rc.name);
    for (vi, vh) in rc.virtual_hosts.iter_mut().enumerate() {
        vh.name = ctx.qf(&vh.name);
        for (ri, r) in vh.routes.iter_mut().enumerate() {
            // Qualified like the route configuration: Envoy's access log
            // names the route, and flows show it with the config it is in.
            if !r.name.is_empty() {
                r.name = ctx.qf(&r.name);
            }
            let Some(route::Action::Route(action)) = r.action.as_mut() else { continue };
            let p = format!("{at}: virtual_hosts[{vi}].routes[{ri}].route");
            match action.cluster_specifier.as_mut() {
                Some(route_action::ClusterSpecifier::Cluster(c)) => ctx.cluster_ref(&p, c),
                Some(route_action::ClusterSpecifier::WeightedClusters(w)) => {
                    for c in w.clusters.iter_mut() {
                        ctx.cluster_ref(&p, &mut c.name);
                    }
                }
                _ => {}
            }
            for m in action.request_mirror_policies.iter_mut() {
                if !m.cluster.is_empty() {
                    ctx.cluster_ref(&p, &mut m.cluster);
                }
            }
        }
    }
}

fn route_configuration(
    ctx: &mut Ctx<'_>,
    index: usize,
    mut rc: RouteConfiguration,
    out: &mut Translated,
) -> Result<(), Problem> {
    if rc.name.is_empty() {
        return Err(Problem {
            place: format!("spec.resources[{index}]"),
            path: "name".into(),
            message: "a RouteConfiguration needs a name".into(),
        });
    }
    let at = place(index, "RouteConfiguration", &rc.name);
    let written = rc.name.clone();
    qualify_route_names(ctx, &at, &mut rc);
    out.routes.push(Item { name: rc.name.clone(), written, index, resource: rc });
    Ok(())
}

fn cluster(ctx: &mut Ctx<'_>, index: usize, mut c: Cluster, out: &mut Translated) -> Result<(), Problem> {
    if c.name.is_empty() {
        return Err(Problem {
            place: format!("spec.resources[{index}]"),
            path: "name".into(),
            message: "a Cluster needs a name".into(),
        });
    }
    let at = place(index, "Cluster", &c.name);
    let written = c.name.clone();
    c.name = ctx.q(&c.name);
    if let Some(ts) = c.transport_socket.as_mut() {
        transport_socket(ctx, &at, ts);
    }
    if matches!(c.cluster_discovery_type, Some(cluster::ClusterDiscoveryType::Type(t)) if t == cluster::DiscoveryType::Eds as i32)
    {
        let eds = c.eds_cluster_config.get_or_insert_with(Default::default);
        if eds.eds_config.is_none() {
            eds.eds_config = Some(ads());
        }
        let resource = if eds.service_name.is_empty() { c.name.clone() } else { eds.service_name.clone() };
        ctx.refs.endpoints.push((at.clone(), resource));
    }
    if let Some(la) = c.load_assignment.as_mut() {
        la.cluster_name = ctx.q(&la.cluster_name);
    }
    keep_upstream_mark(&mut c);
    out.clusters.push(Item { name: c.name.clone(), written, index, resource: c });
    Ok(())
}

fn tls_sds(ctx: &mut Ctx<'_>, at: &str, common: &mut CommonTlsContext) {
    for s in common.tls_certificate_sds_secret_configs.iter_mut() {
        s.name = ctx.q(&s.name);
        if s.sds_config.is_none() {
            s.sds_config = Some(ads());
        }
        ctx.refs.secrets.push((at.to_owned(), s.name.clone()));
    }
    if let Some(common_tls_context::ValidationContextType::ValidationContextSdsSecretConfig(s)) =
        common.validation_context_type.as_mut()
    {
        s.name = ctx.q(&s.name);
        if s.sds_config.is_none() {
            s.sds_config = Some(ads());
        }
        ctx.refs.secrets.push((at.to_owned(), s.name.clone()));
    }
}

fn transport_socket(ctx: &mut Ctx<'_>, at: &str, ts: &mut TransportSocket) {
    let Some(transport_socket::ConfigType::TypedConfig(any)) = ts.config_type.as_mut() else { return };
    if any.type_url.ends_with(".DownstreamTlsContext") {
        if let Some(mut d) = unpack::<DownstreamTlsContext>(any) {
            if let Some(c) = d.common_tls_context.as_mut() {
                tls_sds(ctx, at, c);
            }
            *any = pack(&d);
        }
    } else if any.type_url.ends_with(".UpstreamTlsContext")
        && let Some(mut u) = unpack::<UpstreamTlsContext>(any)
    {
        if let Some(c) = u.common_tls_context.as_mut() {
            tls_sds(ctx, at, c);
        }
        *any = pack(&u);
    }
}

/// Sets a listener's address to 127.0.0.1:port and makes it transparent, for
/// connections the datapath hands to it.
pub fn bind_proxy_port(l: &mut Listener, port: u16) {
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
    l.address = Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: "127.0.0.1".into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port as u32)),
            ..Default::default()
        })),
    });
    // One socket per listener (not one per worker): the datapath hands
    // connections to it, and 10,000 listeners stay within the fd limit.
    l.enable_reuse_port = Some(BoolValue { value: false });
    handed_connections(l);
}

/// The agent's one listening socket for listeners that Services are
/// redirected to: the datapath hands it their connections, and Envoy passes
/// each on to the listener that has the connection's local address (the
/// Service frontend, kept by the hand-off) among its addresses. Those
/// listeners open no socket of their own ([`virtual_listener`]), so the open
/// files of the node do not grow with the number of L7 listeners. No
/// config's listener has this name: theirs are qualified (contain a `/`).
pub const DISPATCH_LISTENER: &str = "weft-proxy";

/// The dispatching listener on 127.0.0.1:`port`, and the route
/// configuration of its own connection manager. A connection whose address
/// no listener has (a frontend redirected before Envoy has its listener) is
/// answered 503 by that manager. The manager takes its routes over RDS so
/// that the dispatcher warms with the listeners it hands connections to
/// (they take theirs over RDS in the same responses): a new Envoy's
/// dispatcher does not accept connections it could not yet hand to anyone;
/// they wait in its socket's queue.
pub fn dispatcher(port: u16) -> (Listener, RouteConfiguration) {
    use envoy_types::pb::envoy::{
        config::{
            listener::v3::{Filter, FilterChain, ListenerFilter, listener_filter},
            route::v3::{DirectResponseAction, Route, RouteMatch, VirtualHost, route_match},
        },
        extensions::filters::{
            listener::original_dst::v3::OriginalDst,
            network::http_connection_manager::v3::{HttpFilter, Rds},
        },
    };
    let hcm = HttpConnectionManager {
        stat_prefix: "weft_proxy".into(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: DISPATCH_LISTENER.into(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack(&Router::default()))),
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut l = Listener {
        name: DISPATCH_LISTENER.into(),
        use_original_dst: Some(BoolValue { value: true }),
        // Marks the local address as the destination to hand off by
        // (getsockopt(SO_ORIGINAL_DST) answers with the address itself).
        listener_filters: vec![ListenerFilter {
            name: "envoy.filters.listener.original_dst".into(),
            config_type: Some(listener_filter::ConfigType::TypedConfig(pack(&OriginalDst::default()))),
            ..Default::default()
        }],
        default_filter_chain: Some(FilterChain {
            name: "no-listener".into(),
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
            }],
            ..Default::default()
        }),
        ..Default::default()
    };
    bind_proxy_port(&mut l, port);
    let routes = RouteConfiguration {
        name: DISPATCH_LISTENER.into(),
        virtual_hosts: vec![VirtualHost {
            name: "no-listener".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::Action::DirectResponse(DirectResponseAction { status: 503, ..Default::default() })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    (l, routes)
}

/// Makes a listener one the [`dispatcher`] hands connections to: no socket
/// of its own, and the frontends whose connections it takes as its
/// addresses. `placeholder` is its address when it has no frontend (its
/// Service does not exist yet): never bound, never reached.
pub fn virtual_listener(l: &mut Listener, frontends: &[std::net::SocketAddrV4], placeholder: Option<u16>) {
    at_frontends(l, frontends.iter().copied());
    if l.address.is_none() {
        l.address =
            placeholder.map(|p| frontend_address(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, p)));
    }
    l.bind_to_port = Some(BoolValue { value: false });
    balance_connections(l);
}

/// Gives a listener these frontends as its addresses: the first as its
/// `address`, the rest as `additional_addresses` (none: no address).
pub fn at_frontends(l: &mut Listener, frontends: impl IntoIterator<Item = std::net::SocketAddrV4>) {
    use envoy_types::pb::envoy::config::listener::v3::AdditionalAddress;
    let mut all = frontends.into_iter().map(frontend_address);
    l.address = all.next();
    l.additional_addresses = all.map(|a| AdditionalAddress { address: Some(a), ..Default::default() }).collect();
}

/// A frontend as the address of a listener reached through the [`dispatcher`].
pub fn frontend_address(f: std::net::SocketAddrV4) -> envoy_types::pb::envoy::config::core::v3::Address {
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: f.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(f.port()))),
            ..Default::default()
        })),
    }
}

/// Makes Envoy spread a listener's connections evenly over its workers
/// (exact balance), unless its config chose a balancer. The listeners the
/// agent gives no socket of their own, or one socket for all workers, need
/// it: without, whichever worker wakes first accepts the connections that
/// are waiting, so long-lived connections can pile up on one worker while
/// the other idles, and their requests queue there (the kernel spreads
/// those of a pinned listener with a socket per worker instead). Envoy's
/// own advice for a dispatching listener (`use_original_dst`) is to balance
/// in the listeners it hands to, not in the dispatcher, so that a
/// connection is balanced once.
pub fn balance_connections(l: &mut Listener) {
    use envoy_types::pb::envoy::config::listener::v3::listener::{
        ConnectionBalanceConfig,
        connection_balance_config::{BalanceType, ExactBalance},
    };
    if l.connection_balance_config.is_none() {
        l.connection_balance_config =
            Some(ConnectionBalanceConfig { balance_type: Some(BalanceType::ExactBalance(ExactBalance {})) });
    }
}

/// What Envoy's upstream sockets carry so host policies leave them to the
/// pods they reach (`WEFT_MARK_FROM_PROXY` in the datapath): the
/// bootstrap's `cluster_manager.upstream_bind_config` sets it for every
/// cluster (the bootstrap is written in the `envoy` module).
pub const UPSTREAM_MARK: u32 = weft_ebpf::abi::MARK_FROM_PROXY;
pub const UPSTREAM_MARK_DESCRIPTION: &str = "weft: the node proxy's upstream connections (host policies exempt them)";

/// Envoy takes a cluster's own `upstream_bind_config.socket_options`, when
/// it lists any, INSTEAD of the bootstrap's (socket options are not merged;
/// a bind config with only a source address keeps the bootstrap's). Such a
/// cluster gets weft's mark added to its own options, so its upstream
/// connections stay exempt from host egress policy; one that sets SO_MARK
/// itself keeps its mark (and is judged as the node's own traffic).
fn keep_upstream_mark(c: &mut Cluster) {
    use envoy_types::pb::envoy::config::core::v3::{SocketOption, socket_option};
    let Some(bind) = c.upstream_bind_config.as_mut() else { return };
    let (level, name) = (libc::SOL_SOCKET as i64, libc::SO_MARK as i64);
    if bind.socket_options.is_empty() || bind.socket_options.iter().any(|o| o.level == level && o.name == name) {
        return;
    }
    bind.socket_options.push(SocketOption {
        description: UPSTREAM_MARK_DESCRIPTION.into(),
        level,
        name,
        value: Some(socket_option::Value::IntValue(i64::from(UPSTREAM_MARK))),
        state: socket_option::SocketState::StatePrebind as i32,
        ..Default::default()
    });
}

/// Makes a listener fit for connections the datapath hands to it:
/// transparent (the Service address is its local address), and with
/// SO_REUSEPORT, so a restarted Envoy's socket joins the group of the one
/// the agent kept (`datapath::proxy`) and takes over its waiting connections.
pub fn handed_connections(l: &mut Listener) {
    use envoy_types::pb::envoy::config::core::v3::{SocketOption, socket_option};
    l.transparent = Some(BoolValue { value: true });
    let (level, name) = (libc::SOL_SOCKET as i64, libc::SO_REUSEPORT as i64);
    if !l.socket_options.iter().any(|o| o.level == level && o.name == name) {
        l.socket_options.push(SocketOption {
            description: "weft: a restarted Envoy takes over this port's waiting connections".into(),
            level,
            name,
            value: Some(socket_option::Value::IntValue(1)),
            state: socket_option::SocketState::StatePrebind as i32,
            ..Default::default()
        });
    }
}

/// Makes a listener see each handed connection's original destination as
/// its local address (Envoy's original_dst listener filter, which falls back
/// to the transparent socket's own address): what a policy hands it keeps
/// its destination, for ORIGINAL_DST clusters and destination matches.
pub fn original_destination(l: &mut Listener) {
    use envoy_types::pb::envoy::{
        config::listener::v3::{ListenerFilter, listener_filter},
        extensions::filters::listener::original_dst::v3::OriginalDst,
    };
    const NAME: &str = "envoy.filters.listener.original_dst";
    let url = OriginalDst::type_url();
    let has = l.listener_filters.iter().any(|f| {
        f.name == NAME
            || matches!(&f.config_type, Some(listener_filter::ConfigType::TypedConfig(a)) if a.type_url == url)
    });
    if !has {
        l.listener_filters.insert(
            0,
            ListenerFilter {
                name: NAME.into(),
                config_type: Some(listener_filter::ConfigType::TypedConfig(pack(&OriginalDst {}))),
                ..Default::default()
            },
        );
    }
}

/// The port a listener with this explicit address binds (a pinned port).
pub fn pinned_port(address: Option<&envoy_types::pb::envoy::config::core::v3::Address>) -> Option<(String, u16)> {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
    let Some(address::Address::SocketAddress(sa)) = address?.address.as_ref() else { return None };
    match sa.port_specifier {
        // Ports above 65535 are refused by the field rules before this is asked.
        Some(socket_address::PortSpecifier::PortValue(p)) => Some((sa.address.clone(), u16::try_from(p).ok()?)),
        _ => None,
    }
}

#[cfg(test)]
mod access_log_tests {
    use envoy_types::pb::envoy::extensions::access_loggers::file::v3::{FileAccessLog, file_access_log};

    use super::*;

    /// A manager's own bytes are kept as they are, its own logs first and
    /// the agent's appended, so a listener shaped again is the same bytes
    /// (its maps are not encoded again in another order).
    #[test]
    fn the_agents_log_is_appended_to_a_managers_bytes_as_they_are() {
        use envoy_types::pb::envoy::config::{
            listener::v3::{Filter, FilterChain},
            route::v3::{RouteConfiguration, VirtualHost},
        };
        let per_filter: std::collections::HashMap<String, Any> =
            (0..8).map(|i| (format!("f{i}"), pack(&Router::default()))).collect();
        let own = AccessLog { name: "team-log".into(), ..Default::default() };
        let hcm = HttpConnectionManager {
            stat_prefix: "p".into(),
            access_log: vec![own.clone()],
            route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(RouteConfiguration {
                virtual_hosts: vec![VirtualHost { typed_per_filter_config: per_filter, ..Default::default() }],
                ..Default::default()
            })),
            ..Default::default()
        };
        let before = pack(&hcm);
        let mut l = Listener {
            filter_chains: vec![FilterChain {
                filters: vec![Filter {
                    name: "hcm".into(),
                    config_type: Some(filter::ConfigType::TypedConfig(before.clone())),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        add_weft_access_log(&mut l);
        add_weft_access_log(&mut l);
        let Some(filter::ConfigType::TypedConfig(after)) = &l.filter_chains[0].filters[0].config_type else { panic!() };
        assert_eq!(after.value, [before.value.as_slice(), weft_access_log_entry()].concat());
        let got: HttpConnectionManager = unpack(after).unwrap();
        assert_eq!(got.access_log, vec![own, weft_access_log()]);
    }

    #[test]
    fn the_agents_access_log_is_the_same_bytes_every_time_and_decodes_as_envoys_message() {
        let a = weft_access_log().encode_to_vec();
        for _ in 0..20 {
            assert_eq!(weft_access_log().encode_to_vec(), a);
        }
        let Some(access_log::ConfigType::TypedConfig(any)) = weft_access_log().config_type else { panic!() };
        let f: FileAccessLog = unpack(&any).unwrap();
        assert_eq!(f.path, ACCESS_LOG_PATH);
        let Some(file_access_log::AccessLogFormat::LogFormat(fmt)) = f.access_log_format else { panic!("{f:?}") };
        let Some(envoy_types::pb::envoy::config::core::v3::substitution_format_string::Format::JsonFormat(s)) =
            fmt.format
        else {
            panic!()
        };
        assert_eq!(s.fields.len(), weft_observe::pipeline::accesslog::FORMAT.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{k8s::Origin, xds::envoyconfig};

    fn cfg(yaml: &str) -> EnvoyConfig {
        envoyconfig::parse(Origin::Api, &serde_saphyr::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn qualification_follows_cilium() {
        assert_eq!(qualify("ns", "c", "r", false), "ns/c/r");
        assert_eq!(qualify("ns", "c", "ns/x", false), "ns/x");
        assert_eq!(qualify("ns", "c", "other/x", true), "ns/c/other/x");
        assert_eq!(qualify("ns", "c", "ns/x", true), "ns/x");
        assert_eq!(qualify("", "c", "r", true), "/c/r");
        assert_eq!(qualify("ns", "c", "", true), "");
    }

    const HELLO: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata: {name: lb}
spec:
  services: [{name: hello, namespace: elsewhere}]
  backendServices: [{name: hello-v1}]
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: l
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: l
          rds: {route_config_name: r}
          http_filters: [{name: envoy.filters.http.router}]
  - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
    name: r
    virtual_hosts:
    - name: vh
      domains: ["*"]
      routes:
      - match: {prefix: /}
        route: {weighted_clusters: {clusters: [{name: default/hello-v1, weight: 90}, {name: local, weight: 10}]}}
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: default/hello-v1
    type: EDS
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: local
    type: EDS
"#;

    /// Envoy uses a cluster's own socket options instead of the
    /// bootstrap's: those of a user's cluster get weft's upstream mark too,
    /// unless the cluster sets SO_MARK itself; a bind config with only a
    /// source address (the bootstrap's options apply) and no bind config are
    /// left alone.
    #[test]
    fn clusters_with_socket_options_of_their_own_keep_the_upstream_mark() {
        let with = |bind: &str| {
            let doc = format!(
                "apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {{name: m, namespace: default}}\nspec:\n  resources:\n  - \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n    name: c\n    type: STATIC\n{bind}"
            );
            let t = translate(&cfg(&doc)).unwrap();
            t.clusters[0].resource.upstream_bind_config.clone()
        };
        let marks = |b: &Option<envoy_types::pb::envoy::config::core::v3::BindConfig>| -> Vec<(i64, Option<i64>)> {
            let opts = b.iter().flat_map(|b| &b.socket_options);
            let value = |o: &envoy_types::pb::envoy::config::core::v3::SocketOption| match o.value {
                Some(envoy_types::pb::envoy::config::core::v3::socket_option::Value::IntValue(v)) => Some(v),
                _ => None,
            };
            opts.map(|o| (o.name, value(o))).collect()
        };
        let (mark, keepalive) = (libc::SO_MARK as i64, libc::SO_KEEPALIVE as i64);
        assert_eq!(with(""), None);
        let source_only = with("    upstream_bind_config: {source_address: {address: 10.0.0.1, port_value: 0}}\n");
        assert_eq!(marks(&source_only), []);
        let own = with("    upstream_bind_config: {socket_options: [{level: 1, name: 9, int_value: 1}]}\n");
        assert_eq!(marks(&own), [(keepalive, Some(1)), (mark, Some(i64::from(UPSTREAM_MARK)))]);
        let own_mark = with("    upstream_bind_config: {socket_options: [{level: 1, name: 36, int_value: 7}]}\n");
        assert_eq!(marks(&own_mark), [(mark, Some(7))]);
    }

    #[test]
    fn names_references_and_sources_are_filled_in() {
        let t = translate(&cfg(HELLO)).unwrap();
        assert_eq!(t.listeners[0].name, "default/lb/l");
        assert_eq!(t.routes[0].name, "default/lb/r");
        assert_eq!(t.routes[0].resource.virtual_hosts[0].name, "default/lb/vh");
        let clusters: Vec<&str> = t.clusters.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(clusters, ["default/hello-v1", "default/lb/local"]);
        let refs: Vec<&str> = t.references.clusters.iter().map(|(_, c)| c.as_str()).collect();
        assert_eq!(refs, ["default/hello-v1", "default/lb/local"]);
        assert_eq!(t.references.routes[0].1, "default/lb/r");
        assert!(t.clusters.iter().all(|c| c.resource.eds_cluster_config.as_ref().unwrap().eds_config.is_some()));
        // The router filter got its typed config; RDS points at ADS.
        let Some(filter::ConfigType::TypedConfig(any)) =
            &t.listeners[0].resource.filter_chains[0].filters[0].config_type
        else {
            panic!()
        };
        let hcm = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        assert!(hcm.http_filters[0].config_type.is_some());
        let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = &hcm.route_specifier else { panic!() };
        assert_eq!(rds.route_config_name, "default/lb/r");
        assert!(rds.config_source.is_some());
        // The agent's access log is not the translation's: the model adds
        // it when it shapes the listener, once, however often it is asked.
        assert!(hcm.access_log.is_empty());
        let mut shaped = t.listeners[0].resource.clone();
        add_weft_access_log(&mut shaped);
        add_weft_access_log(&mut shaped);
        let Some(filter::ConfigType::TypedConfig(any)) = &shaped.filter_chains[0].filters[0].config_type else {
            panic!()
        };
        let with_log = HttpConnectionManager::decode(any.value.as_slice()).unwrap();
        assert!(has_weft_access_log(&with_log));
        assert_eq!(with_log.access_log.len(), 1);
        // Appended to the bytes as they were: the same manager, the log last.
        let mut expected = hcm.clone();
        expected.access_log.push(weft_access_log());
        assert_eq!(with_log, expected);
        // A namespaced config redirects its own namespace's Service, to its first listener.
        assert_eq!(
            t.redirects,
            vec![Redirect { service: ObjKey::new("default", "hello"), ports: vec![], listener: "default/lb/l".into() }]
        );
        assert_eq!(t.eds_services.len(), 2);
    }

    #[test]
    fn every_problem_is_named() {
        let bad = HELLO
            .replace("stat_prefix: l", "stat_prefx: l")
            .replace("name: local\n    type: EDS", "name: local\n    type: EDS\n  - \"@type\": type.googleapis.com/envoy.config.core.v3.Address\n    pipe: {path: /x}");
        let mut c = cfg(&bad);
        std::sync::Arc::make_mut(&mut c.spec).services[0].listener = Some("nope".into());
        let problems: Vec<String> = translate(&c).unwrap_err().iter().map(|p| p.to_string()).collect();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert_eq!(
            problems[0],
            "spec.resources[0] (Listener \"l\"): filter_chains[0].filters[0].typed_config.stat_prefx: unknown field (not in envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager)"
        );
        assert!(
            problems[1].starts_with(
                "spec.resources[4]: @type: type.googleapis.com/envoy.config.core.v3.Address is not accepted here"
            ),
            "{}",
            problems[1]
        );
        assert_eq!(problems[2], "spec.services[0].listener: no listener named \"nope\" in this config");
    }

    #[test]
    fn duplicate_and_unnamed_resources() {
        let dup = HELLO.replace("name: local\n", "name: default/hello-v1\n");
        let p = translate(&cfg(&dup)).unwrap_err();
        assert_eq!(
            p[0].to_string(),
            "spec.resources[3] (Cluster \"default/hello-v1\"): name: another Cluster of this config has the name \"default/hello-v1\""
        );
        let empty = cfg(
            "apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {name: x}\nspec:\n  resources:\n  - \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n    name: only-a-name\n",
        );
        let p = translate(&empty).unwrap_err();
        assert!(p[0].message.contains("at least one filter chain"), "{}", p[0]);
    }
}

/// The tenancy rules (`super::tenancy`), through translation and the model.
#[cfg(test)]
mod tenancy_tests {
    use crate::{
        k8s::{Origin, yaml},
        xds::{
            envoyconfig,
            model::{Model, NodeInfo},
            ports::ProxyPorts,
            translate::translate,
        },
    };

    /// A config of `kind` in `ns` with one resource (YAML, indented as a list item).
    fn cfg(kind: &str, ns: &str, resource: &str) -> envoyconfig::EnvoyConfig {
        let doc = format!(
            "apiVersion: weft.io/v1alpha1\nkind: {kind}\nmetadata: {{name: c, namespace: {ns}}}\nspec:\n  resources:\n  - {}\n",
            resource.trim().replace('\n', "\n    ")
        );
        envoyconfig::parse(Origin::Api, &serde_saphyr::from_str(&doc).unwrap()).unwrap()
    }

    fn refusals(resource: &str) -> Vec<String> {
        let namespaced = match translate(&cfg("EnvoyConfig", "team", resource)) {
            Ok(_) => Vec::new(),
            Err(ps) => ps.iter().map(|p| p.to_string()).collect(),
        };
        // A cluster admin may write the same.
        let cw = translate(&cfg("ClusterwideEnvoyConfig", "", resource));
        assert!(cw.is_ok(), "clusterwide: {:?}", cw.err());
        namespaced
    }

    const LISTENER: &str = "\"@type\": type.googleapis.com/envoy.config.listener.v3.Listener";
    const CLUSTER: &str = "\"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster";

    fn hcm(extra: &str) -> String {
        format!(
            "{LISTENER}\nname: l\nfilter_chains:\n- filters:\n  - name: hcm\n    typed_config:\n      \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n      stat_prefix: l\n      rds: {{route_config_name: r}}\n      http_filters: [{{name: envoy.filters.http.router}}]\n{extra}"
        )
    }

    #[test]
    fn namespaced_configs_stay_in_their_namespace_and_off_the_node() {
        let cases: &[(String, &str)] = &[
            (hcm("address: {socket_address: {address: 0.0.0.0, port_value: 8080}}"), "address: a namespaced EnvoyConfig's listeners get their port from the agent"),
            (hcm("use_original_dst: true"), "use_original_dst: it hands connections to other listeners"),
            (format!("{CLUSTER}\nname: c\ntype: STRICT_DNS"), "type: a namespaced EnvoyConfig's clusters are STATIC or EDS"),
            (format!("{CLUSTER}\nname: c\ntype: ORIGINAL_DST\nlb_policy: CLUSTER_PROVIDED"), "are STATIC or EDS"),
            (format!("{CLUSTER}\nname: c\ntype: EDS\neds_cluster_config: {{service_name: other/web}}"), "EDS resource \"other/web\" is in namespace \"other\""),
            (format!("{CLUSTER}\nname: c\nload_assignment: {{cluster_name: c, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: \"::ffff:127.0.0.1\", port_value: 9901}}}}}}}}]}}]}}"), "is the node itself"),
            (format!("{CLUSTER}\nname: c\ntype: EDS\ntransport_socket: {{name: tls, typed_config: {{\"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext, common_tls_context: {{tls_certificates: [{{certificate_chain: {{filename: /var/run/weft/key.pem}}}}]}}}}}}"), "certificate_chain.filename: a namespaced EnvoyConfig may not read the node's files"),
            (
                "\"@type\": type.googleapis.com/envoy.config.route.v3.RouteConfiguration\nname: r\nvirtual_hosts: [{name: v, domains: [\"*\"], routes: [{match: {prefix: /}, route: {cluster_header: x-cluster}}]}]".to_string(),
                "cluster_header: a cluster chosen from a request header",
            ),
            (
                hcm("").replace(
                    "http_filters: [{name: envoy.filters.http.router}]",
                    "http_filters: [{name: lua, typed_config: {\"@type\": type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua, default_source_code: {inline_string: x}}}, {name: envoy.filters.http.router}]",
                ),
                "envoy.extensions.filters.http.lua.v3.Lua is for ClusterwideEnvoyConfigs only",
            ),
            (
                hcm("").replace(
                    "stat_prefix: l\n",
                    "stat_prefix: l\n      tracing: {provider: {name: z, typed_config: {\"@type\": type.googleapis.com/envoy.config.trace.v3.ZipkinConfig, collector_cluster: envoy-admin, collector_endpoint: /quitquitquit, collector_endpoint_version: HTTP_JSON}}}\n",
                ),
                "collector_cluster: cluster \"envoy-admin\" is the node Envoy's admin interface",
            ),
        ];
        for (resource, expected) in cases {
            let r = refusals(resource);
            assert!(r.iter().any(|p| p.contains(expected)), "{resource}\nexpected {expected:?} in {r:#?}");
        }
    }

    #[test]
    fn upstream_addresses_must_be_the_namespaces_own() {
        const OBJECTS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: team}\nspec: {containers: [{name: x, image: x}]}\nstatus: {phase: Running, podIP: 10.1.1.11}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: other}\nspec: {containers: [{name: x, image: x}]}\nstatus: {phase: Running, podIP: 10.1.1.12}\n";
        let mut l = yaml::Loaded::default();
        yaml::load_text(std::path::Path::new("o.yaml"), OBJECTS, &mut l);
        let to = |ip: &str| {
            cfg(
                "EnvoyConfig",
                "team",
                &format!(
                    "{CLUSTER}\nname: c\nload_assignment: {{cluster_name: c, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: 80}}}}}}}}]}}]}}"
                ),
            )
        };
        let (own, theirs) = (to("10.1.1.11"), to("10.1.1.12"));
        let node = NodeInfo { any: true, ..Default::default() };
        let b = Model::new(ProxyPorts::ephemeral()).build(std::slice::from_ref(&own), &[], &l.objects, &node);
        assert!(b.statuses[&own.key].problems.is_empty(), "{:?}", b.statuses[&own.key]);
        let b = Model::new(ProxyPorts::ephemeral()).build(std::slice::from_ref(&theirs), &[], &l.objects, &node);
        let p = &b.statuses[&theirs.key].problems;
        assert!(
            p.iter().any(|p| p.contains("10.1.1.12 is not the address of a Pod or Service of namespace team")),
            "{p:?}"
        );
    }
}
