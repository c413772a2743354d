//! The Gateway API conformance suite's objects (shared/conformance/gateway-api,
//! v1.6.1), read unchanged but for the suite's two placeholders (class and
//! controller name), translated by weft's operator: the status each object
//! gets, as the suite's tests assert it, and the Envoy configuration, which
//! must pass weft's own validation. The same cases run against a real API
//! server and real packets in the lab (tests/tests/gateway.rs); these pin the
//! translation without either.

mod support;

use std::{collections::BTreeMap, path::PathBuf, sync::Arc};

use serde_json::{Value, json};
use weft_agent::{
    k8s::{
        ObjKey, Origin, Sourced,
        yaml::{Loaded, load_text},
    },
    operator::gateway::{self, GatewayOut, RouteOut, Translation},
    validate,
    xds::{envoyconfig::ConfigDoc, model::Model, ports::ProxyPorts},
};

/// The Secrets and GatewayClass the suite creates in code, not in its YAML.
const EXTRAS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: weft, generation: 1}
spec: {controllerName: weft.io/gateway-controller}
---
apiVersion: v1
kind: Secret
metadata: {name: tls-validity-checks-certificate, namespace: gateway-conformance-infra}
type: kubernetes.io/tls
data: {tls.crt: Y2VydA==, tls.key: a2V5}
---
apiVersion: v1
kind: Secret
metadata: {name: certificate, namespace: gateway-conformance-web-backend}
type: kubernetes.io/tls
data: {tls.crt: Y2VydA==, tls.key: a2V5}
"#;

fn dir() -> Option<PathBuf> {
    let d = support::gateway_api();
    if d.is_none() {
        println!("skipped: the Gateway API conformance objects (shared/conformance/gateway-api) are not here");
    }
    d
}

/// A conformance YAML file with the suite's placeholders filled in as for weft.
fn text(path: &std::path::Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .replace("{GATEWAY_CLASS_NAME}", "weft")
        .replace("{GATEWAY_CONTROLLER_NAME}", gateway::CONTROLLER)
}

/// The base manifests, the extras and the named test's objects, each given a generation.
fn load(dir: &std::path::Path, test: &str) -> Loaded {
    let mut l = Loaded::default();
    load_text(&dir.join("base-manifests.yaml"), &text(&dir.join("base-manifests.yaml")), &mut l);
    load_text(std::path::Path::new("extras.yaml"), EXTRAS, &mut l);
    let path = dir.join("tests").join(format!("{test}.yaml"));
    load_text(&path, &text(&path), &mut l);
    assert!(l.problems.is_empty(), "{:?}", l.problems);
    macro_rules! generation {
        ($($c:ident),*) => { $(
            l.objects.$c = std::mem::take(&mut l.objects.$c)
                .into_iter()
                .map(|(k, v)| {
                    let mut o = v.object.clone();
                    o.metadata.generation.get_or_insert(1);
                    o.metadata.uid.get_or_insert("uid".into());
                    (k, Arc::new(Sourced { origin: v.origin.clone(), object: o }))
                })
                .collect();
        )* };
    }
    generation!(gateways, http_routes, grpc_routes);
    l
}

fn gw<'a>(t: &'a Translation, name: &str) -> &'a GatewayOut {
    t.gateways
        .iter()
        .find(|g| g.key == ObjKey::new("gateway-conformance-infra", name))
        .unwrap_or_else(|| panic!("no Gateway {name}"))
}

fn route<'a>(t: &'a Translation, ns: &str, name: &str) -> &'a RouteOut {
    t.routes.iter().find(|r| r.key == ObjKey::new(ns, name)).unwrap_or_else(|| panic!("no route {ns}/{name}"))
}

/// (status, reason) of the condition `type_`.
fn cond(conds: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition], type_: &str) -> (String, String) {
    let c = conds.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} in {conds:#?}"));
    (c.status.clone(), c.reason.clone())
}

fn yes(reason: &str) -> (String, String) {
    ("True".into(), reason.into())
}

fn no(reason: &str) -> (String, String) {
    ("False".into(), reason.into())
}

/// The conditions of a route's parent entry for Gateway `gateway`.
fn parent<'a>(r: &'a RouteOut, gateway: &str) -> &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition] {
    &r.parents.iter().find(|(p, _)| p["name"] == gateway).unwrap_or_else(|| panic!("no parent {gateway} in {r:#?}")).1
}

/// Every generated config, validated as the agents would (with its Service present).
fn validated(l: &Loaded, t: &Translation) {
    let mut l = {
        let mut copy = Loaded::default();
        copy.merge(l);
        copy
    };
    for g in &t.gateways {
        if let Some((svc, _)) = &g.service {
            let key = ObjKey::new(g.key.namespace.clone(), svc.metadata.name.clone().unwrap());
            l.objects.services.insert(key, Arc::new(Sourced { origin: Origin::Api, object: svc.clone() }));
        }
        if let Some(c) = &g.envoy_config {
            l.configs.push_back(std::sync::Arc::new(ConfigDoc::read(Origin::Api, c)));
        }
    }
    for v in validate::verdicts(&l, &mut Model::new(ProxyPorts::ephemeral())) {
        assert!(v.problems.is_empty(), "weft's validation of {:?}: {:#?}", v.key, v.problems);
    }
}

fn translate(l: &Loaded) -> Translation {
    let t = gateway::translate(&l.objects, &BTreeMap::new());
    validated(l, &t);
    t
}

/// The route configuration `name` of a Gateway's config, as (domain, [entry names]).
fn vhosts(g: &GatewayOut, name: &str) -> Vec<(String, Vec<String>)> {
    let cfg = g.envoy_config.as_ref().expect("a config");
    let rc = cfg["spec"]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no {name}"));
    rc["virtual_hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_owned(),
                v["routes"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap().to_owned()).collect(),
            )
        })
        .collect()
}

/// The entries of a route configuration, in order, for one domain.
fn entries<'a>(g: &'a GatewayOut, rc: &str, domain: &str) -> Vec<&'a Value> {
    let cfg = g.envoy_config.as_ref().expect("a config");
    let rc = cfg["spec"]["resources"].as_array().unwrap().iter().find(|r| r["name"] == rc).unwrap();
    rc["virtual_hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == domain)
        .unwrap_or_else(|| panic!("no domain {domain}"))["routes"]
        .as_array()
        .unwrap()
        .iter()
        .collect()
}

#[test]
fn gateway_class_is_accepted_with_its_generation() {
    let Some(d) = dir() else { return };
    let mut l = load(&d, "gatewayclass-observed-generation-bump");
    let mut t = translate(&l);
    let c = t.classes.iter().find(|c| c.name == "gatewayclass-observed-generation-bump").unwrap();
    assert_eq!(cond(&c.conditions, "Accepted"), yes("Accepted"));
    let key = ObjKey::new("", "gatewayclass-observed-generation-bump");
    let mut class = l.objects.gateway_classes[&key].object.clone();
    class.metadata.generation = Some(2);
    class.spec.description = Some("new".into());
    l.objects.gateway_classes.insert(key, Arc::new(Sourced { origin: Origin::Api, object: class }));
    t = translate(&l);
    let c = t.classes.iter().find(|c| c.name == "gatewayclass-observed-generation-bump").unwrap();
    assert_eq!(c.conditions[0].observed_generation, Some(2));
}

#[test]
fn invalid_route_kinds_are_reported_and_supported_ones_kept() {
    let Some(d) = dir() else { return };
    let t = translate(&load(&d, "gateway-invalid-route-kind"));
    let only = &gw(&t, "gateway-only-invalid-route-kind").listeners[0];
    assert_eq!(cond(&only.conditions, "ResolvedRefs"), no("InvalidRouteKinds"));
    assert_eq!(only.supported_kinds.as_deref(), Some(&[][..]));
    assert_eq!(only.attached_routes, 0);
    let both = &gw(&t, "gateway-supported-and-invalid-route-kind").listeners[0];
    assert_eq!(cond(&both.conditions, "ResolvedRefs"), no("InvalidRouteKinds"));
    let kinds: Vec<_> =
        both.supported_kinds.iter().flatten().map(|k| (k.group.clone().unwrap(), k.kind.clone())).collect();
    assert_eq!(kinds, [("gateway.networking.k8s.io".to_owned(), "HTTPRoute".to_owned())]);
}

#[test]
fn attached_routes_are_counted_per_listener() {
    let Some(d) = dir() else { return };
    let t = translate(&load(&d, "gateway-with-attached-routes"));
    let one = &gw(&t, "gateway-with-one-attached-route").listeners[0];
    assert_eq!(
        (one.attached_routes, cond(&one.conditions, "Accepted"), cond(&one.conditions, "ResolvedRefs")),
        (1, yes("Accepted"), yes("ResolvedRefs"))
    );
    let two = &gw(&t, "gateway-with-two-attached-routes").listeners[0];
    assert_eq!(two.attached_routes, 2, "http-route-not-accepted's hostname does not intersect");
    let not = route(&t, "gateway-conformance-infra", "http-route-not-accepted");
    assert_eq!(cond(parent(not, "gateway-with-two-attached-routes"), "Accepted"), no("NoMatchingListenerHostname"));
    // A listener whose certificate does not resolve still takes routes.
    let unresolved = &gw(&t, "unresolved-gateway-with-one-attached-unresolved-route").listeners[0];
    assert_eq!(cond(&unresolved.conditions, "ResolvedRefs"), no("InvalidCertificateRef"));
    assert_eq!(cond(&unresolved.conditions, "Programmed"), no("Invalid"));
    assert_eq!(unresolved.attached_routes, 1);
    let r4 = route(&t, "gateway-conformance-infra", "http-route-4");
    assert_eq!(
        cond(parent(r4, "unresolved-gateway-with-one-attached-unresolved-route"), "ResolvedRefs"),
        no("BackendNotFound")
    );
}

#[test]
fn a_secret_in_another_namespace_needs_a_reference_grant() {
    let Some(d) = dir() else { return };
    let mut l = load(&d, "gateway-secret-reference-grant-specific");
    let t = translate(&l);
    let g = gw(&t, "gateway-secret-reference-grant-specific");
    assert_eq!(cond(&g.listeners[0].conditions, "ResolvedRefs"), yes("ResolvedRefs"));
    let cfg = g.envoy_config.as_ref().unwrap();
    assert!(cfg.to_string().contains("gateway-conformance-web-backend/certificate"), "{cfg:#}");
    l.objects.reference_grants.clear();
    let t = translate(&l);
    let g = gw(&t, "gateway-secret-reference-grant-specific");
    assert_eq!(cond(&g.listeners[0].conditions, "ResolvedRefs"), no("RefNotPermitted"));
    assert!(g.envoy_config.is_none(), "nothing to serve");
}

/// A Gateway with two listeners of one port, protocol and hostname (the
/// CRD's validation refuses it, so only a translation test can give one).
const REPEATED_LISTENER: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: repeats, namespace: gateway-conformance-infra, generation: 1, uid: repeats}
spec:
  gatewayClassName: weft
  listeners:
  - {name: a, port: 80, protocol: HTTP, hostname: repeated.example}
  - {name: b, port: 80, protocol: HTTP, hostname: repeated.example}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: on-repeats, namespace: gateway-conformance-infra, generation: 1, uid: on-repeats}
spec:
  parentRefs: [{name: repeats}]
  rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]
"#;

#[test]
fn a_listener_repeating_an_earlier_one_is_a_hostname_conflict_and_takes_no_routes() {
    let Some(d) = dir() else { return };
    let mut l = load(&d, "httproute-simple-same-namespace");
    load_text(std::path::Path::new("repeated.yaml"), REPEATED_LISTENER, &mut l);
    assert!(l.problems.is_empty(), "{:?}", l.problems);
    let t = translate(&l);
    let g = gw(&t, "repeats");
    let seen: Vec<_> = g
        .listeners
        .iter()
        .map(|x| {
            (x.name.as_str(), cond(&x.conditions, "Conflicted"), cond(&x.conditions, "Accepted"), x.attached_routes)
        })
        .collect();
    assert_eq!(seen, [("a", no("NoConflicts"), yes("Accepted"), 1), ("b", yes("HostnameConflict"), no("Pending"), 0)]);
    assert_eq!(
        cond(parent(route(&t, "gateway-conformance-infra", "on-repeats"), "repeats"), "Accepted"),
        yes("Accepted")
    );
}

#[test]
fn gateways_get_a_service_per_listener_port_and_a_clusterwide_config() {
    let Some(d) = dir() else { return };
    let mut l = load(&d, "httproute-simple-same-namespace");
    let t = translate(&l);
    let g = gw(&t, "same-namespace");
    let (svc, ep) = g.service.as_ref().unwrap();
    assert_eq!(svc.metadata.name.as_deref(), Some("weft-gateway-same-namespace"));
    assert_eq!(svc.spec.as_ref().unwrap().type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0].port, 80);
    assert_eq!(svc.metadata.owner_references.as_ref().unwrap()[0].kind, "Gateway");
    assert_eq!(ep.subsets.as_ref().unwrap()[0].addresses.as_ref().unwrap()[0].ip, "192.192.192.192");
    let cfg = g.envoy_config.as_ref().unwrap();
    assert_eq!(cfg["kind"], "ClusterwideEnvoyConfig");
    assert_eq!(cfg["metadata"]["name"], "weft-gateway.gateway-conformance-infra.same-namespace");
    assert_eq!(
        vhosts(g, "http-80"),
        [(
            "*".to_owned(),
            vec!["httproute/gateway-conformance-infra/gateway-conformance-infra-test/rule/0/match/0".to_owned()]
        )]
    );
    // No address yet: not Programmed; with one, Programmed and the address in status.
    assert_eq!(cond(&g.conditions, "Accepted"), yes("Accepted"));
    assert_eq!(cond(&g.conditions, "Programmed"), no("AddressNotAssigned"));
    let mut svc = svc.clone();
    svc.status = serde_json::from_value(json!({ "loadBalancer": { "ingress": [{ "ip": "10.0.0.7" }] } })).unwrap();
    let key = ObjKey::new("gateway-conformance-infra", "weft-gateway-same-namespace");
    l.objects.services.insert(key, Arc::new(Sourced { origin: Origin::Api, object: svc }));
    let t = translate(&l);
    let g = gw(&t, "same-namespace");
    assert_eq!(cond(&g.conditions, "Programmed"), yes("Programmed"));
    assert_eq!(g.addresses[0].value, "10.0.0.7");
    assert_eq!(g.addresses[0].r#type.as_deref(), Some("IPAddress"));
    let r = route(&t, "gateway-conformance-infra", "gateway-conformance-infra-test");
    assert_eq!(cond(parent(r, "same-namespace"), "Accepted"), yes("Accepted"));
    assert_eq!(cond(parent(r, "same-namespace"), "ResolvedRefs"), yes("ResolvedRefs"));
}

#[test]
fn routes_attach_from_namespaces_the_listener_selects() {
    let Some(d) = dir() else { return };
    let t = translate(&load(&d, "httproute-cross-namespace"));
    let r = route(&t, "gateway-conformance-web-backend", "cross-namespace");
    assert_eq!(cond(parent(r, "backend-namespaces"), "Accepted"), yes("Accepted"));
    assert_eq!(gw(&t, "backend-namespaces").listeners[0].attached_routes, 1);
}

#[test]
fn backends_in_other_namespaces_need_a_grant_and_unknown_or_missing_ones_answer_500() {
    let Some(d) = dir() else { return };
    for (test, name, reason) in [
        ("httproute-invalid-cross-namespace-backend-ref", "invalid-cross-namespace-backend-ref", "RefNotPermitted"),
        ("httproute-invalid-nonexistent-backendref", "invalid-nonexistent-backend-ref", "BackendNotFound"),
        ("httproute-invalid-backendref-unknown-kind", "invalid-backend-ref-unknown-kind", "InvalidKind"),
    ] {
        let t = translate(&load(&d, test));
        let p = parent(route(&t, "gateway-conformance-infra", name), "same-namespace");
        assert_eq!(cond(p, "Accepted"), yes("Accepted"), "{test}");
        assert_eq!(cond(p, "ResolvedRefs"), no(reason), "{test}");
        let e = entries(gw(&t, "same-namespace"), "http-80", "*");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0]["direct_response"]["status"], 500, "{test}");
    }
    let t = translate(&load(&d, "httproute-reference-grant"));
    let p = parent(route(&t, "gateway-conformance-infra", "reference-grant"), "same-namespace");
    assert_eq!(cond(p, "ResolvedRefs"), yes("ResolvedRefs"));
    let e = entries(gw(&t, "same-namespace"), "http-80", "*");
    assert_eq!(e[0]["route"]["cluster"], "gateway-conformance-web-backend.web-backend:8080");
}

#[test]
fn a_rule_with_a_backend_the_grant_does_not_cover_answers_500_and_the_other_rule_serves() {
    let Some(d) = dir() else { return };
    let t = translate(&load(&d, "httproute-partially-invalid-via-invalid-reference-grant"));
    let p = parent(route(&t, "gateway-conformance-infra", "invalid-reference-grant"), "same-namespace");
    assert_eq!(cond(p, "Accepted"), yes("Accepted"));
    assert_eq!(cond(p, "ResolvedRefs"), no("RefNotPermitted"));
    let e = entries(gw(&t, "same-namespace"), "http-80", "*");
    assert_eq!(e[0]["match"]["path_separated_prefix"], "/v2");
    assert_eq!(e[0]["direct_response"]["status"], 500);
    assert_eq!(e[1]["route"]["cluster"], "gateway-conformance-app-backend.app-backend-v1:8080");
}

#[test]
fn hostnames_intersect_and_each_host_goes_to_its_most_specific_listener() {
    let Some(d) = dir() else { return };
    let t = translate(&load(&d, "httproute-hostname-intersection"));
    let g = gw(&t, "httproute-hostname-intersection");
    let hosts: Vec<String> = vhosts(g, "http-80").into_iter().map(|(h, _)| h).collect();
    assert_eq!(
        hosts,
        [
            "foo.bar.wildcard.io",
            "very.specific.com",
            "bar.wildcard.io",
            "foo.wildcard.io",
            "*.anotherwildcard.io",
            "*.wildcard.io",
        ]
    );
    let none = route(&t, "gateway-conformance-infra", "no-intersecting-hosts");
    assert_eq!(cond(parent(none, "httproute-hostname-intersection"), "Accepted"), no("NoMatchingListenerHostname"));
}

#[test]
fn observed_generation_follows_the_route() {
    let Some(d) = dir() else { return };
    let mut l = load(&d, "httproute-observed-generation-bump");
    let key = ObjKey::new("gateway-conformance-infra", "observed-generation-bump");
    let mut r = l.objects.http_routes[&key].object.clone();
    r.metadata.generation = Some(7);
    l.objects.http_routes.insert(key, Arc::new(Sourced { origin: Origin::Api, object: r }));
    let t = translate(&l);
    let p = parent(route(&t, "gateway-conformance-infra", "observed-generation-bump"), "same-namespace");
    assert!(p.iter().all(|c| c.observed_generation == Some(7)));
}

/// The entry whose match is the PathPrefix `prefix` in the catch-all host of `same-namespace`.
fn by_prefix<'a>(t: &'a Translation, prefix: &str) -> &'a Value {
    entries(gw(t, "same-namespace"), "http-80", "*")
        .into_iter()
        .find(|e| e["match"]["path_separated_prefix"] == prefix)
        .unwrap_or_else(|| panic!("no entry for {prefix}"))
}

#[test]
fn redirects_replace_the_prefix_or_the_whole_path_with_the_status_asked() {
    let Some(d) = dir() else { return };
    let t = translate(&load(&d, "httproute-redirect-path"));
    let r = &by_prefix(&t, "/original-prefix")["redirect"];
    assert_eq!(
        r["regex_rewrite"],
        json!({ "pattern": { "regex": "^/original-prefix" }, "substitution": "/replacement-prefix" })
    );
    assert_eq!(r["response_code"], "FOUND");
    assert!(r.get("port_redirect").is_none(), "port 80 is http's own: left out");
    assert_eq!(by_prefix(&t, "/full")["redirect"]["path_redirect"], "/full-path-replacement");
    assert_eq!(by_prefix(&t, "/path-and-host")["redirect"]["host_redirect"], "example.org");
    assert_eq!(by_prefix(&t, "/path-and-status")["redirect"]["response_code"], "MOVED_PERMANENTLY");
    let t = translate(&load(&d, "httproute-redirect-host-and-status"));
    let e = entries(gw(&t, "same-namespace"), "http-80", "*");
    assert!(
        e.iter().any(|e| e["redirect"]["host_redirect"] == "example.org"
            && e["redirect"]["response_code"] == "MOVED_PERMANENTLY")
    );
}

#[test]
fn rewrites_replace_the_prefix_element_wise_or_the_whole_path() {
    let Some(d) = dir() else { return };
    let t = translate(&load(&d, "httproute-rewrite-path"));
    assert_eq!(
        by_prefix(&t, "/prefix/one")["route"]["regex_rewrite"],
        json!({ "pattern": { "regex": "^/prefix/one" }, "substitution": "/one" })
    );
    assert_eq!(
        by_prefix(&t, "/strip-prefix")["route"]["regex_rewrite"],
        json!({ "pattern": { "regex": "^/strip-prefix/*" }, "substitution": "/" })
    );
    assert_eq!(by_prefix(&t, "/full/one")["route"]["regex_rewrite"]["substitution"], "/one");
    let e = by_prefix(&t, "/full/rewrite-path-and-modify-headers");
    assert_eq!(
        e["request_headers_to_add"],
        json!([
            { "header": { "key": "X-Header-Set", "value": "set-overwrites-values" }, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD" },
            { "header": { "key": "X-Header-Add", "value": "header-val-1" }, "append_action": "APPEND_IF_EXISTS_OR_ADD" },
            { "header": { "key": "X-Header-Add-Append", "value": "header-val-2" }, "append_action": "APPEND_IF_EXISTS_OR_ADD" },
        ])
    );
    assert_eq!(e["request_headers_to_remove"], json!(["X-Header-Remove"]));
}

#[test]
fn mirrors_timeouts_and_weights() {
    let Some(d) = dir() else { return };
    let t = translate(&load(&d, "httproute-request-mirror"));
    assert_eq!(
        by_prefix(&t, "/mirror")["route"]["request_mirror_policies"],
        json!([{ "cluster": "gateway-conformance-infra.infra-backend-v2:8080" }])
    );
    let t = translate(&load(&d, "httproute-timeout-request"));
    assert_eq!(by_prefix(&t, "/request-timeout")["route"]["timeout"], "0.500s");
    let t = translate(&load(&d, "httproute-weight"));
    let e = entries(gw(&t, "same-namespace"), "http-80", "*");
    let weights: Vec<(String, u64)> = e[0]["route"]["weighted_clusters"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_owned(), c["weight"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        weights,
        [
            ("gateway-conformance-infra.infra-backend-v1:8080".to_owned(), 70),
            ("gateway-conformance-infra.infra-backend-v2:8080".to_owned(), 30)
        ],
        "a backend of weight 0 gets nothing"
    );
}

#[test]
fn matches_are_ordered_by_the_spec_s_precedence_across_routes() {
    let Some(d) = dir() else { return };
    let t = translate(&load(&d, "httproute-matching-across-routes"));
    let g = gw(&t, "same-namespace");
    for (host, names) in vhosts(g, "http-80") {
        // `*` (the listener's own, no route has it) answers 404.
        assert_eq!(names.is_empty(), host == "*", "{host}: {names:?}");
    }
    let t = translate(&load(&d, "httproute-path-match-order"));
    let e = entries(gw(&t, "same-namespace"), "http-80", "*");
    // Exact paths first, then longer prefixes before shorter ones.
    let ranks: Vec<(u8, usize)> = e
        .iter()
        .map(|e| {
            let m = &e["match"];
            match (m.get("path"), m.get("path_separated_prefix"), m.get("prefix")) {
                (Some(p), _, _) => (0, p.as_str().unwrap().len()),
                (_, Some(p), _) => (2, p.as_str().unwrap().len()),
                _ => (2, 1),
            }
        })
        .collect();
    let mut sorted = ranks.clone();
    sorted.sort_by_key(|(rank, len)| (*rank, std::cmp::Reverse(*len)));
    assert_eq!(ranks, sorted);
    for test in [
        "httproute-method-matching",
        "httproute-query-param-matching",
        "httproute-header-matching",
        "httproute-matching",
        "httproute-exact-path-matching",
        "httproute-listener-hostname-matching",
        "httproute-request-header-modifier",
        "httproute-response-header-modifier",
    ] {
        let t = translate(&load(&d, test));
        for r in &t.routes {
            for (p, conds) in &r.parents {
                assert_eq!(cond(conds, "Accepted"), yes("Accepted"), "{test}: {} -> {p}", r.key);
            }
        }
    }
}

#[test]
fn grpc_methods_become_paths_and_headers_stay_matches() {
    let Some(d) = dir() else { return };
    for test in ["grpcroute-exact-method-matching", "grpcroute-header-matching", "grpcroute-weight"] {
        let t = translate(&load(&d, test));
        for r in &t.routes {
            for (_, conds) in &r.parents {
                assert_eq!(cond(conds, "Accepted"), yes("Accepted"), "{test}");
                assert_eq!(cond(conds, "ResolvedRefs"), yes("ResolvedRefs"), "{test}");
            }
        }
    }
    let t = translate(&load(&d, "grpcroute-exact-method-matching"));
    let g = gw(&t, "same-namespace");
    let all: Vec<String> = vhosts(g, "http-80").into_iter().flat_map(|(_, n)| n).collect();
    assert!(!all.is_empty());
    let e = entries(g, "http-80", "*");
    assert!(
        e.iter().any(|e| e["match"]["path"] == "/gateway_api_conformance.echo_basic.grpcecho.GrpcEcho/Echo"),
        "{e:#?}"
    );
}
