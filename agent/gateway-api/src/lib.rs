//! The Kubernetes Gateway API's standard-channel kinds that weft serves
//! (v1.6.1: GatewayClass, Gateway, HTTPRoute, GRPCRoute, ReferenceGrant),
//! as kube-derived types generated from the CRDs by `generate.sh` (kopium).
//! No maintained crate builds with kube 5 and k8s-openapi 0.29; regenerate
//! rather than edit. Every enum has an `Unknown` variant, so a value from a
//! newer version or another channel is readable (and refused by weft with a
//! reason) instead of making the whole object fail to parse.

// Generated code: names and shapes follow the CRDs.
#![allow(clippy::all, non_camel_case_types)]

pub mod gatewayclasses;
pub mod gateways;
pub mod grpcroutes;
pub mod httproutes;
pub mod referencegrants;

#[cfg(test)]
mod tests {
    use super::httproutes::{HttpRoute, HttpRouteRulesFiltersType};

    #[test]
    fn a_value_these_types_do_not_know_still_reads() {
        let route: HttpRoute = serde_json::from_value(serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": { "name": "r", "namespace": "n" },
            "spec": { "rules": [{ "filters": [{ "type": "ExternalAuth" }, { "type": "URLRewrite" }] }] }
        }))
        .unwrap();
        let filters = &route.spec.rules.unwrap()[0].filters.clone().unwrap();
        assert_eq!(filters[0].r#type, HttpRouteRulesFiltersType::Unknown);
        assert_eq!(filters[1].r#type, HttpRouteRulesFiltersType::UrlRewrite);
    }
}
