//! What a namespaced EnvoyConfig may do in the node's Envoy, which every
//! tenant shares. A ClusterwideEnvoyConfig is written by a cluster admin and
//! may do anything Envoy can; an EnvoyConfig in namespace `ns` is written by
//! that namespace's owners and must not reach another namespace's traffic,
//! keys or endpoints, the node itself, or Envoy's admin interface. This is a
//! deliberate difference from Cilium, whose namespaced CiliumEnvoyConfig may
//! name any cluster or secret of the node's Envoy.
//!
//! The rules, checked on each translated resource (names already qualified)
//! by walking every message in it, `Any` payloads included:
//!
//! - names: every cluster, route configuration, listener, secret and EDS
//!   resource the config defines or references lies in its namespace (its
//!   qualified name starts with `ns/`); the bootstrap's `envoy-admin` cluster
//!   is not reachable; nor is a cluster chosen at run time from a request
//!   header (`cluster_header`) or by a plugin;
//! - the node: no `pipe` (unix socket) or internal-listener addresses, no
//!   loopback, unspecified or link-local socket addresses, no files
//!   (`filename` data sources, file access logs other than stdout/stderr,
//!   tap files), no environment variables, no config sources other than ADS;
//! - listeners get their port from the agent (no `address`, no
//!   `use_original_dst`): a tenant cannot bind a port of the node or take
//!   another listener's connections;
//! - upstreams: clusters are STATIC or EDS (no DNS, ORIGINAL_DST or custom
//!   cluster types, which can reach any address); the endpoint addresses a
//!   config writes must belong to Pods or Services of its namespace (checked
//!   against the objects in the model's cross-object pass);
//!   no Google gRPC services (they connect anywhere);
//! - code: no Lua, Wasm, Go or dynamic-module filters, no dynamic forward
//!   proxy (they can reach any cluster or address by name at run time).

use std::net::IpAddr;

use prost_reflect::{DynamicMessage, ReflectMessage, Value as PValue};

use super::protojson;

/// Clusters the agent's bootstrap defines, which configs may reference by
/// name; only ClusterwideEnvoyConfigs may (see the module doc).
pub const BOOTSTRAP_CLUSTERS: &[&str] = &["envoy-admin"];

/// A refusal: where (field path in the resource) and which rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub path: String,
    pub message: String,
}

/// Message types a namespaced config may not use at all, by full-name prefix.
const FORBIDDEN_TYPES: &[(&str, &str)] = &[
    ("envoy.extensions.filters.http.lua.", "Lua filters can call any cluster of the node's Envoy"),
    ("envoy.extensions.filters.http.wasm.", "Wasm code can call any cluster of the node's Envoy"),
    ("envoy.extensions.filters.network.wasm.", "Wasm code can call any cluster of the node's Envoy"),
    ("envoy.extensions.wasm.", "Wasm code can call any cluster of the node's Envoy"),
    ("envoy.extensions.filters.http.golang.", "Go filters load a library from the node's files"),
    ("envoy.extensions.filters.network.golang.", "Go filters load a library from the node's files"),
    ("envoy.extensions.dynamic_modules.", "dynamic modules load a library from the node's files"),
    ("envoy.extensions.filters.http.dynamic_modules.", "dynamic modules load a library from the node's files"),
    ("envoy.extensions.filters.http.dynamic_forward_proxy.", "a dynamic forward proxy reaches any address"),
    (
        "envoy.extensions.clusters.",
        "custom cluster types (aggregate, dynamic forward proxy...) reach other clusters or any address",
    ),
    ("envoy.config.tap.v3.FilePerTapSink", "tap files are written on the node"),
];

/// Checks the translated resources of a config in namespace `ns`, one
/// message at a time, for a walk of each resource ([`protojson::walk`])
/// that applies other rules too (each walk decodes every `Any` payload
/// again): call [`Checker::visit`] for every message, in the walk's order.
pub struct Checker<'a> {
    prefix: String,
    ours: Option<&'a DynamicMessage>,
    /// The path of our access log while the walk is under it.
    skip_under: Option<String>,
    /// What was refused so far.
    pub refusals: Vec<Refusal>,
}

impl<'a> Checker<'a> {
    /// For a config in namespace `ns`. `ours`: the access log the agent
    /// adds to every HTTP connection manager (allowed where it appears).
    pub fn new(ns: &str, ours: Option<&'a DynamicMessage>) -> Self {
        Self { prefix: format!("{ns}/"), ours, skip_under: None, refusals: Vec::new() }
    }

    /// Checks message `m` at `path` of a resource. `endpoint`: every socket
    /// address of an upstream endpoint found, for the cross-object check
    /// that it belongs to the namespace.
    pub fn visit(&mut self, path: &str, m: &DynamicMessage, endpoint: &mut dyn FnMut(&str, IpAddr)) {
        let Checker { prefix, ours, skip_under, refusals: out } = self;
        let prefix = prefix.as_str();
        if let Some(s) = skip_under.as_deref() {
            if path.starts_with(s) {
                return;
            }
            *skip_under = None;
        }
        let name = m.descriptor().full_name().to_owned();
        // The access log the agent adds to every HTTP connection manager.
        if name == "envoy.config.accesslog.v3.AccessLog" && Some(m) == *ours {
            *skip_under = Some(path.to_owned());
            return;
        }
        let mut refuse = |field: &str, message: String| {
            out.push(Refusal { path: protojson::join(path, field), message });
        };
        for (forbidden, why) in FORBIDDEN_TYPES {
            if name.starts_with(forbidden) {
                refuse("", format!("{name} is for ClusterwideEnvoyConfigs only: {why}"));
            }
        }
        let string = |field: &str| match m.get_field_by_name(field).as_deref() {
            Some(PValue::String(s)) if m.has_field_by_name(field) => Some(s.clone()),
            _ => None,
        };
        let set = |field: &str| m.descriptor().get_field_by_name(field).is_some_and(|f| m.has_field(&f));
        // References by name, wherever they are (routes, TCP proxies, gRPC
        // services, HTTP URIs of ext_authz or JWT providers, ...).
        let names_a_cluster = |f: &str| f == "cluster" || f.ends_with("_cluster") || f.ends_with("cluster_name");
        let cluster_fields: Vec<String> = m
            .descriptor()
            .fields()
            .filter(|f| matches!(f.kind(), prost_reflect::Kind::String) && names_a_cluster(f.name()))
            .map(|f| f.name().to_owned())
            .chain(name.ends_with(".ClusterWeight").then(|| "name".to_owned()))
            .collect();
        for field in &cluster_fields {
            let field = field.as_str();
            if let Some(c) = string(field).filter(|c| !c.is_empty())
                && let Some(why) = outside(prefix, &c)
            {
                refuse(field, format!("cluster {c:?} {why}"));
            }
        }
        if string("cluster_header").is_some_and(|h| !h.is_empty()) {
            refuse(
                "cluster_header",
                "a cluster chosen from a request header can be any cluster of the node's Envoy".into(),
            );
        }
        for field in ["cluster_specifier_plugin", "inline_cluster_specifier_plugin"] {
            if set(field) {
                refuse(field, "a cluster chosen by a plugin can be any cluster of the node's Envoy".into());
            }
        }
        match name.as_str() {
            "envoy.config.cluster.v3.Cluster"
            | "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig"
            | "envoy.extensions.transport_sockets.tls.v3.Secret" => {
                if let Some(n) = string("name").filter(|n| !n.is_empty())
                    && let Some(why) = outside(prefix, &n)
                {
                    let what = if name.ends_with("Cluster") { "cluster" } else { "secret" };
                    refuse("name", format!("{what} {n:?} {why}"));
                }
            }
            "envoy.config.listener.v3.Listener"
            | "envoy.config.route.v3.RouteConfiguration"
            | "envoy.extensions.filters.network.http_connection_manager.v3.Rds" => {
                let field = if name.ends_with("Rds") { "route_config_name" } else { "name" };
                if let Some(n) = string(field).filter(|n| !n.is_empty())
                    && let Some(why) = outside(prefix, &n)
                {
                    refuse(field, format!("{n:?} {why}"));
                }
            }
            _ => {}
        }
        match name.as_str() {
            "envoy.config.listener.v3.Listener" => {
                for field in ["address", "additional_addresses"] {
                    if set(field) {
                        refuse(
                            field,
                            "a namespaced EnvoyConfig's listeners get their port from the agent and receive only \
                             their Services' connections; binding an address of the node is for ClusterwideEnvoyConfigs"
                                .into(),
                        );
                    }
                }
                if matches!(m.get_field_by_name("use_original_dst").as_deref(), Some(PValue::Message(b)) if matches!(b.get_field_by_name("value").as_deref(), Some(PValue::Bool(true))))
                {
                    refuse("use_original_dst", "it hands connections to other listeners of the node's Envoy".into());
                }
            }
            "envoy.config.cluster.v3.Cluster" => {
                if let Some(PValue::EnumNumber(t)) = m.get_field_by_name("type").as_deref() {
                    // 0 STATIC, 3 EDS; 1 STRICT_DNS, 2 LOGICAL_DNS, 4 ORIGINAL_DST.
                    if set("type") && !matches!(t, 0 | 3) {
                        refuse(
                            "type",
                            "a namespaced EnvoyConfig's clusters are STATIC or EDS: DNS and ORIGINAL_DST clusters can \
                             reach any address, including the node's"
                                .into(),
                        );
                    }
                }
                if set("cluster_type") {
                    refuse("cluster_type", "custom cluster types are for ClusterwideEnvoyConfigs".into());
                }
            }
            "envoy.config.cluster.v3.Cluster.EdsClusterConfig" => {
                if let Some(n) = string("service_name").filter(|n| !n.is_empty())
                    && let Some(why) = outside(prefix, &n)
                {
                    refuse("service_name", format!("EDS resource {n:?} {why}"));
                }
            }
            "envoy.config.core.v3.DataSource" => {
                for field in ["filename", "environment_variable", "watched_directory"] {
                    if set(field) {
                        refuse(field, "a namespaced EnvoyConfig may not read the node's files or Envoy's environment: give the data inline or through SDS".into());
                    }
                }
            }
            "envoy.config.core.v3.Address" => {
                if set("pipe") {
                    refuse(
                        "pipe",
                        "unix sockets are the node's (the agent's xDS and access-log sockets among them)".into(),
                    );
                }
                if set("envoy_internal_address") {
                    refuse("envoy_internal_address", "internal listeners may be another tenant's".into());
                }
            }
            // A listener's own address is refused above, whatever it is.
            "envoy.config.core.v3.SocketAddress"
                if !(path.starts_with("address.") || path.starts_with("additional_addresses")) =>
            {
                if let Some(a) = string("address") {
                    match a.parse::<IpAddr>().map(canonical) {
                        Ok(ip) if ip.is_loopback() || ip.is_unspecified() || link_local(ip) => refuse(
                            "address",
                            format!(
                                "{a} is the node itself (loopback, unspecified or link-local): the node's Envoy admin, the agent and other local services are there"
                            ),
                        ),
                        Ok(ip) => endpoint(path, ip),
                        Err(_) if a.is_empty() => {}
                        Err(_) => refuse(
                            "address",
                            format!("{a:?}: a namespaced EnvoyConfig gives addresses as IPs of its Pods or Services"),
                        ),
                    }
                }
            }
            "envoy.config.core.v3.ConfigSource" => {
                for field in ["path", "path_config_source", "api_config_source"] {
                    if set(field) {
                        refuse(
                            field,
                            "a namespaced EnvoyConfig's config sources are the agent's ADS (leave it out)".into(),
                        );
                    }
                }
            }
            "envoy.config.core.v3.GrpcService" if set("google_grpc") => {
                refuse(
                    "google_grpc",
                    "a Google gRPC service connects anywhere: use envoy_grpc with a cluster of this namespace".into(),
                );
            }
            "envoy.extensions.access_loggers.file.v3.FileAccessLog" => {
                let p = string("path").unwrap_or_default();
                if p != "/dev/stdout" && p != "/dev/stderr" {
                    refuse(
                        "path",
                        format!(
                            "{p:?}: a namespaced EnvoyConfig may log to /dev/stdout or /dev/stderr, not to the node's files"
                        ),
                    );
                }
            }
            _ => {}
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Why a qualified name is out of a namespaced config's reach, if it is.
fn outside(prefix: &str, name: &str) -> Option<String> {
    if BOOTSTRAP_CLUSTERS.contains(&name) {
        return Some("is the node Envoy's admin interface: only a ClusterwideEnvoyConfig may route to it".into());
    }
    if name.starts_with(prefix) {
        return None;
    }
    let ns = prefix.trim_end_matches('/');
    Some(match name.split_once('/') {
        Some(("", _)) => format!(
            "belongs to a ClusterwideEnvoyConfig: a namespaced EnvoyConfig may reference only names of its own namespace ({ns})"
        ),
        Some((other, _)) => format!(
            "is in namespace {other:?}: a namespaced EnvoyConfig may reference only names of its own namespace ({ns})"
        ),
        None => format!(
            "is not a name of this namespace: a namespaced EnvoyConfig may reference only names of its own namespace ({ns}/...)"
        ),
    })
}
