//! Backend references: Services only (core group, kind Service), in the
//! route's namespace or, with a ReferenceGrant, another; each becomes the
//! EDS cluster of that Service port. Weights split traffic; the share of
//! backends that do not resolve is answered with 500, as the spec asks.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use super::grants::{self, Reference};
use crate::{
    k8s::{ObjKey, Objects},
    operator::envoy::Upstream,
};

/// Why a backend does not resolve: the route's ResolvedRefs reason and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unresolved {
    pub reason: &'static str,
    pub message: String,
}

/// The clusters and Service ports a Gateway's routes use.
#[derive(Clone, Debug, Default)]
pub struct Used {
    /// Cluster name to (EDS service name, protocol).
    pub clusters: BTreeMap<String, (String, Upstream)>,
    pub services: BTreeMap<ObjKey, BTreeSet<i32>>,
}

/// One backend reference, whichever route type it came from.
#[derive(Clone, Copy, Debug)]
pub struct BackendRef<'a> {
    pub group: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub name: &'a str,
    pub namespace: Option<&'a str>,
    pub port: Option<i32>,
}

/// Resolves a reference made by a `route_kind` in `route_ns` to its cluster name
/// (`<ns>.<service>:<port>`).
pub fn resolve(
    r: &BackendRef,
    route_kind: &str,
    route_ns: &str,
    objects: &Objects,
    used: &mut Used,
) -> Result<String, Unresolved> {
    let (group, kind) = (r.group.unwrap_or(""), r.kind.unwrap_or("Service"));
    let ns = r.namespace.unwrap_or(route_ns);
    if !group.is_empty() || kind != "Service" {
        return Err(Unresolved {
            reason: "InvalidKind",
            message: format!("backendRef {}: {group}/{kind} is not a Service (the only kind weft routes to)", r.name),
        });
    }
    let reference = Reference {
        from_kind: route_kind,
        from_namespace: route_ns,
        to_group: "",
        to_kind: "Service",
        to_namespace: ns,
        to_name: r.name,
    };
    if !grants::permitted(&reference, objects) {
        return Err(Unresolved {
            reason: "RefNotPermitted",
            message: format!(
                "backendRef Service {ns}/{}: another namespace, and no ReferenceGrant there allows {route_kind}s from {route_ns}",
                r.name
            ),
        });
    }
    let key = ObjKey::new(ns, r.name);
    let Some(svc) = objects.services.get(&key) else {
        return Err(Unresolved {
            reason: "BackendNotFound",
            message: format!("backendRef Service {key} does not exist"),
        });
    };
    let Some(port) = r.port else {
        return Err(Unresolved {
            reason: "UnsupportedValue",
            message: format!("backendRef Service {key}: a port is required"),
        });
    };
    let Some(sp) = svc.object.spec.iter().flat_map(|s| s.ports.iter().flatten()).find(|p| p.port == port) else {
        return Err(Unresolved {
            reason: "BackendNotFound",
            message: format!("backendRef Service {key} has no port {port}"),
        });
    };
    let upstream =
        if sp.app_protocol.as_deref() == Some("kubernetes.io/h2c") { Upstream::H2c } else { Upstream::AsDownstream };
    // Without a `/`, the name is qualified by the config: each Gateway's config has its own clusters.
    let cluster = format!("{}.{}:{port}", key.namespace, key.name);
    used.clusters.insert(cluster.clone(), (format!("{key}:{port}"), upstream));
    used.services.entry(key).or_default().insert(port);
    Ok(cluster)
}

/// A backend of a rule, resolved or not, with its weight and per-backend
/// header changes (Envoy `weighted_clusters` entry fields).
#[derive(Clone, Debug)]
pub struct Weighted {
    pub cluster: Result<String, Unresolved>,
    pub weight: u32,
    pub headers: serde_json::Map<String, Value>,
}

/// The route action for `backends`, as (share answered 500 in millionths,
/// the action for the rest). `None` action: every request gets 500.
pub fn action(backends: &[Weighted]) -> (u32, Option<Value>) {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    let good: Vec<&Weighted> = backends.iter().filter(|b| b.weight > 0 && b.cluster.is_ok()).collect();
    let good_total: u64 = good.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 || good_total == 0 {
        return (1_000_000, None);
    }
    let bad_share = ((total - good_total) * 1_000_000 / total) as u32;
    let action = match good.as_slice() {
        [one] if one.headers.is_empty() => json!({ "cluster": one.cluster.as_ref().ok() }),
        _ => json!({
            "weighted_clusters": {
                "clusters": good.iter().map(|b| {
                    let mut c = json!({ "name": b.cluster.as_ref().ok(), "weight": b.weight });
                    if let Some(o) = c.as_object_mut() {
                        o.extend(b.headers.clone());
                    }
                    c
                }).collect::<Vec<_>>()
            }
        }),
    };
    (bad_share, Some(action))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(cluster: Result<&str, &str>, weight: u32) -> Weighted {
        Weighted {
            cluster: cluster
                .map(str::to_owned)
                .map_err(|m| Unresolved { reason: "BackendNotFound", message: m.into() }),
            weight,
            headers: Default::default(),
        }
    }

    #[test]
    fn weights_split_and_the_share_of_unresolved_backends_is_answered_with_500() {
        assert_eq!(action(&[w(Ok("a"), 1)]), (0, Some(json!({ "cluster": "a" }))));
        let (bad, act) = action(&[w(Ok("a"), 70), w(Ok("b"), 30), w(Ok("c"), 0)]);
        assert_eq!(bad, 0);
        assert_eq!(
            act.unwrap()["weighted_clusters"]["clusters"],
            json!([{ "name": "a", "weight": 70 }, { "name": "b", "weight": 30 }])
        );
        assert_eq!(action(&[w(Ok("a"), 1), w(Err("gone"), 3)]).0, 750_000);
        assert_eq!(action(&[w(Err("gone"), 1)]), (1_000_000, None));
        assert_eq!(action(&[w(Ok("a"), 0)]), (1_000_000, None), "all weights zero: 500");
        assert_eq!(action(&[]), (1_000_000, None), "no backends: 500");
    }
}
