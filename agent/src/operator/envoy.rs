//! What Ingresses and Gateways have in common once translated: the pieces
//! of Envoy configuration both generate (an HTTP connection manager, an
//! EDS cluster per backend Service port, a TLS transport socket over SDS),
//! the LoadBalancer Service that fronts them and its placeholder Endpoints,
//! and how generated objects are named and owned.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset, Endpoints, Service, ServicePort, ServiceSpec},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use serde_json::{Value, json};

/// The address of the placeholder endpoint (never reached: the proxy answers).
pub const PLACEHOLDER: (&str, i32) = ("192.192.192.192", 9999);

/// A name for a generated object: `<prefix>-<name>`, shortened with a hash
/// to fit a Service name (63 characters).
pub fn generated_name(prefix: &str, name: &str) -> String {
    shorten(&format!("{prefix}-{name}"), 63, name)
}

/// `full` if it fits in `max` bytes, else its head and a hash of `seed`
/// (what tells apart the names that share the head).
pub fn shorten(full: &str, max: usize, seed: &str) -> String {
    if full.len() <= max {
        return full.to_owned();
    }
    let h = crate::hash::fnv1a(seed.as_bytes());
    // Names are ASCII (DNS names); `get` keeps a multi-byte character from panicking all the same.
    let head = full.get(..max.saturating_sub(9)).unwrap_or(full);
    format!("{}-{:08x}", head.trim_end_matches(['-', '.']), h as u32)
}

/// The owner reference that makes an object go with `owner`.
pub fn owner(api_version: &str, kind: &str, owner: &ObjectMeta) -> OwnerReference {
    OwnerReference {
        api_version: api_version.into(),
        kind: kind.into(),
        name: owner.name.clone().unwrap_or_default(),
        uid: owner.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// An HTTP connection manager whose routes come over RDS.
pub fn hcm(stat_prefix: &str, route_config: &str) -> Value {
    json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "rds": { "route_config_name": route_config },
            "strip_any_host_port": true,
            "upgrade_configs": [{ "upgrade_type": "websocket" }],
            "http_filters": [{
                "name": "envoy.filters.http.router",
                "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router" }
            }]
        }
    })
}

/// The downstream TLS context of a filter chain: certificates over SDS,
/// by secret name (`<ns>/<secret>`).
pub fn tls_transport_socket(secrets: &[String]) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": secrets.iter().map(|s| json!({ "name": s })).collect::<Vec<_>>()
            }
        }
    })
}

/// A listener of a generated config, with these filter chains; `tls` adds
/// the listener filter that reads SNI, for chains chosen by server name.
pub fn listener(name: &str, chains: Vec<Value>, tls: bool) -> Value {
    let mut listener = json!({
        "@type": "type.googleapis.com/envoy.config.listener.v3.Listener",
        "name": name,
        "filter_chains": chains,
    });
    if tls {
        listener["listener_filters"] = json!([{
            "name": "envoy.filters.listener.tls_inspector",
            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" }
        }]);
    }
    listener
}

/// How a cluster talks to its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Upstream {
    /// HTTP/1.1, or HTTP/2 (gRPC) when the client spoke it.
    AsDownstream,
    /// HTTP/2 without TLS, whatever the client spoke (appProtocol `kubernetes.io/h2c`).
    H2c,
}

/// An EDS cluster fed from a Service port, whose endpoints Envoy asks for
/// as `<ns>/<service>:<port>` (`service`; none: the cluster's own name).
pub fn eds_cluster(name: &str, service: Option<&str>, upstream: Upstream) -> Value {
    let protocol = match upstream {
        Upstream::AsDownstream => json!({ "use_downstream_protocol_config": { "http2_protocol_options": {} } }),
        Upstream::H2c => json!({ "explicit_http_config": { "http2_protocol_options": {} } }),
    };
    let mut options = json!({ "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions" });
    if let (Some(o), Some(p)) = (options.as_object_mut(), protocol.as_object()) {
        o.extend(p.clone());
    }
    let mut c = json!({
        "@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "EDS",
        "connect_timeout": "5s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options
        }
    });
    if let Some(s) = service {
        c["eds_cluster_config"] = json!({ "service_name": s });
    }
    c
}

/// The `backendServices` entries for a set of Service ports.
pub fn backend_services(backends: &BTreeMap<crate::k8s::ObjKey, std::collections::BTreeSet<i32>>) -> Vec<Value> {
    backends
        .iter()
        .map(|(svc, ports)| {
            json!({
                "name": svc.name,
                "namespace": svc.namespace,
                "number": ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// A LoadBalancer Service with these (name, port) TCP ports.
pub fn lb_service(meta: ObjectMeta, ports: &[(String, i32)]) -> Service {
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port)| ServicePort {
                        name: Some(name.clone()),
                        port: *port,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: None,
    }
}

/// Endpoints with one placeholder address for the named ports: a Service
/// without endpoints is not a Service to the datapath, and the proxy answers
/// before any packet could reach the address.
pub fn placeholder_endpoints(meta: ObjectMeta, port_names: &[String]) -> Endpoints {
    Endpoints {
        metadata: meta,
        subsets: Some(vec![EndpointSubset {
            addresses: Some(vec![EndpointAddress { ip: PLACEHOLDER.0.into(), ..Default::default() }]),
            ports: Some(
                port_names
                    .iter()
                    .map(|name| EndpointPort {
                        name: Some(name.clone()),
                        port: PLACEHOLDER.1,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_shortened_to_fit_a_service_name() {
        assert_eq!(generated_name("weft-ingress", "web"), "weft-ingress-web");
        let long = "a".repeat(60);
        let n = generated_name("weft-ingress", &long);
        assert!(n.len() <= 63 && n.starts_with("weft-ingress-aaa"), "{n}");
        assert_ne!(n, generated_name("weft-ingress", &"a".repeat(61)), "different names, different results");
    }
}
