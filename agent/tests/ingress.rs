//! Cilium's Ingress examples (shared/conformance/cilium-examples), read
//! unchanged, translated by weft's operator: the EnvoyConfig, Service and
//! Endpoints each produces, and that the EnvoyConfig passes weft's own
//! validation.

mod support;

use support::examples;

use k8s_openapi::api::networking::v1::Ingress;
use serde_json::{Value, json};
use weft_agent::{
    k8s::{
        Origin,
        yaml::{Loaded, load_text},
    },
    operator::ingress::{self, Mode},
    validate,
    xds::{envoyconfig::ConfigDoc, model::Model, ports::ProxyPorts},
};

/// The Services the examples' backends are (bookinfo, the microservices
/// demo, the path-types echo servers), a TLS Secret, and the weft class.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: details, namespace: default}
spec: {ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: productpage, namespace: default}
spec: {ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: productcatalogservice, namespace: default}
spec: {ports: [{name: grpc, port: 3550}]}
---
apiVersion: v1
kind: Service
metadata: {name: currencyservice, namespace: default}
spec: {ports: [{name: grpc, port: 7000}]}
---
apiVersion: v1
kind: Secret
metadata: {name: demo-cert, namespace: default}
type: kubernetes.io/tls
data: {tls.crt: Y2VydA==, tls.key: a2V5}
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: weft}
spec: {controller: weft.io/ingress-controller}
"#;

fn cluster() -> Loaded {
    let mut l = Loaded::default();
    load_text(std::path::Path::new("cluster.yaml"), CLUSTER, &mut l);
    // The path-types example's own Services, unchanged.
    let text = std::fs::read_to_string(examples().join("ingress-path-types.yaml")).unwrap();
    load_text(&examples().join("ingress-path-types.yaml"), &text, &mut l);
    assert!(l.problems.is_empty(), "{:?}", l.problems);
    l
}

/// The Ingresses of an example file, as weft's class (the one change: the
/// examples name Cilium's class, which weft does not serve).
fn ingresses(file: &str) -> Vec<Ingress> {
    let mut l = Loaded::default();
    let path = examples().join(file);
    load_text(&path, &std::fs::read_to_string(&path).unwrap(), &mut l);
    let objects = cluster().objects;
    l.objects
        .ingresses
        .values()
        .map(|s| {
            let mut ing = s.object.clone();
            assert!(!ingress::is_ours(&ing, &objects), "class cilium is not weft's");
            ing.spec.as_mut().unwrap().ingress_class_name = Some("weft".into());
            ing.metadata.uid = Some("uid-1".into());
            assert!(ingress::is_ours(&ing, &objects));
            assert_eq!(ingress::mode_of(&ing, &objects), Mode::Dedicated);
            ing
        })
        .collect()
}

/// (domains, [(match, cluster)]) of each virtual host of a route configuration.
fn vhosts(rc: &Value) -> Vec<(String, Vec<(String, String)>)> {
    rc["virtual_hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|vh| {
            let routes = vh["routes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (r["match"].to_string(), r["route"]["cluster"].as_str().unwrap().to_owned()))
                .collect();
            (vh["domains"][0].as_str().unwrap().to_owned(), routes)
        })
        .collect()
}

fn resource<'a>(cfg: &'a Value, type_suffix: &str, name: &str) -> &'a Value {
    cfg["spec"]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["@type"].as_str().unwrap().ends_with(type_suffix) && r["name"] == name)
        .unwrap_or_else(|| panic!("no {type_suffix} {name} in {cfg:#}"))
}

/// Translates, checks the Service and Endpoints, and validates the EnvoyConfig
/// as the agents would; returns the EnvoyConfig.
fn translate(ing: &Ingress) -> Value {
    let mut l = cluster();
    let g = ingress::dedicated(ing, &l.objects);
    assert!(g.problems.is_empty(), "{:?}", g.problems);
    let name = format!("weft-ingress-{}", ing.metadata.name.as_deref().unwrap());

    // Service: LoadBalancer, 80 and 443, owned by the Ingress.
    assert_eq!(g.service.metadata.name.as_deref(), Some(name.as_str()));
    let spec = g.service.spec.as_ref().unwrap();
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    let ports: Vec<i32> = spec.ports.iter().flatten().map(|p| p.port).collect();
    assert_eq!(ports, [80, 443]);
    for meta in [&g.service.metadata, &g.endpoints.metadata] {
        let owner = &meta.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("Ingress", "uid-1", Some(true)));
    }
    // Endpoints: the placeholder, named like the Service's ports.
    let subset = &g.endpoints.subsets.as_ref().unwrap()[0];
    assert_eq!(subset.addresses.as_ref().unwrap()[0].ip, "192.192.192.192");
    let names: Vec<_> = subset.ports.iter().flatten().map(|p| (p.name.clone().unwrap(), p.port)).collect();
    assert_eq!(names, [("http".to_string(), 9999), ("https".to_string(), 9999)]);

    // The EnvoyConfig redirects the Service to its listener and passes validation.
    let cfg = &g.envoy_config;
    assert_eq!(cfg["kind"], "EnvoyConfig");
    assert_eq!(cfg["spec"]["services"], json!([{"name": name, "namespace": "default", "listener": "listener"}]));
    l.objects.services.insert(
        weft_agent::k8s::ObjKey::new("default", &name),
        std::sync::Arc::new(weft_agent::k8s::Sourced { origin: Origin::Api, object: g.service.clone() }),
    );
    l.configs.push_back(std::sync::Arc::new(ConfigDoc::read(Origin::Api, cfg)));
    let verdicts = validate::verdicts(&l, &mut Model::new(ProxyPorts::ephemeral()));
    assert_eq!(verdicts.len(), 1);
    assert!(verdicts[0].problems.is_empty(), "weft's validation: {:#?}", verdicts[0].problems);
    cfg.clone()
}

fn m(kind: &str, path: &str) -> String {
    json!({ kind: path }).to_string()
}

fn regex(path: &str) -> String {
    json!({"safe_regex": {"regex": path}}).to_string()
}

#[test]
fn basic_ingress() {
    let ings = ingresses("basic-ingress.yaml");
    let cfg = translate(&ings[0]);
    let insecure = resource(&cfg, "RouteConfiguration", "insecure");
    assert_eq!(
        vhosts(insecure),
        [(
            "*".to_string(),
            vec![
                (m("path_separated_prefix", "/details"), "default/details:9080".to_string()),
                (m("prefix", "/"), "default/productpage:9080".to_string()),
            ]
        )]
    );
    assert!(cfg["spec"]["resources"].as_array().unwrap().iter().all(|r| r["name"] != "secure"), "no TLS");
    let cluster = resource(&cfg, "Cluster", "default/details:9080");
    assert_eq!(cluster["type"], "EDS");
    assert_eq!(
        cfg["spec"]["backendServices"],
        json!([{"name": "details", "namespace": "default", "number": ["9080"]},
               {"name": "productpage", "namespace": "default", "number": ["9080"]}])
    );
}

#[test]
fn grpc_ingress() {
    let cfg = translate(&ingresses("grpc-ingress.yaml")[0]);
    assert_eq!(
        vhosts(resource(&cfg, "RouteConfiguration", "insecure")),
        [(
            "*".to_string(),
            vec![
                (
                    m("path_separated_prefix", "/hipstershop.ProductCatalogService"),
                    "default/productcatalogservice:3550".into()
                ),
                (m("path_separated_prefix", "/hipstershop.CurrencyService"), "default/currencyservice:7000".into()),
            ]
        )]
    );
    let c = resource(&cfg, "Cluster", "default/currencyservice:7000");
    let opts = &c["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"];
    assert!(
        opts["use_downstream_protocol_config"]["http2_protocol_options"].is_object(),
        "gRPC goes upstream as HTTP/2"
    );
}

#[test]
fn path_types_ingress_orders_routes_as_kubernetes_ranks_them() {
    let cfg = translate(&ingresses("ingress-path-types-ingress.yaml")[0]);
    assert_eq!(
        vhosts(resource(&cfg, "RouteConfiguration", "insecure")),
        [(
            "pathtypes.example.com".to_string(),
            vec![
                (m("path", "/exact"), "default/exactpath:80".into()),
                (regex("/impl.+"), "default/implpath2:80".into()),
                (regex("/impl"), "default/implpath:80".into()),
                (m("path_separated_prefix", "/prefix"), "default/prefixpath2:80".into()),
                (m("prefix", "/"), "default/prefixpath:80".into()),
            ]
        )]
    );
}

#[test]
fn tls_ingress_serves_both_hosts_over_tls_and_redirects_plain_http() {
    let cfg = translate(&ingresses("tls-ingress.yaml")[0]);
    let insecure = resource(&cfg, "RouteConfiguration", "insecure");
    let secure = resource(&cfg, "RouteConfiguration", "secure");
    let hosts: Vec<String> = vhosts(secure).into_iter().map(|v| v.0).collect();
    assert_eq!(hosts, ["bookinfo.cilium.rocks", "hipstershop.cilium.rocks"]);
    assert_eq!(vhosts(secure), vhosts(insecure), "same routes on both");
    for vh in insecure["virtual_hosts"].as_array().unwrap() {
        assert_eq!(vh["require_tls"], "ALL", "plain HTTP is redirected to HTTPS");
    }
    assert_eq!(
        vhosts(secure)[0].1,
        [
            (m("path_separated_prefix", "/details"), "default/details:9080".to_string()),
            (m("prefix", "/"), "default/productpage:9080".to_string()),
        ]
    );
    let listener = resource(&cfg, "Listener", "listener");
    let chains = listener["filter_chains"].as_array().unwrap();
    assert_eq!(chains.len(), 2);
    assert_eq!(chains[0]["filter_chain_match"]["transport_protocol"], "raw_buffer");
    assert_eq!(chains[1]["filter_chain_match"]["transport_protocol"], "tls");
    assert_eq!(
        chains[1]["filter_chain_match"]["server_names"],
        json!(["bookinfo.cilium.rocks", "hipstershop.cilium.rocks"])
    );
    let tls = &chains[1]["transport_socket"]["typed_config"]["common_tls_context"];
    assert_eq!(tls["tls_certificate_sds_secret_configs"][0]["name"], "default/demo-cert");
    assert_eq!(listener["listener_filters"][0]["name"], "envoy.filters.listener.tls_inspector");

    // The annotation turns the redirect off.
    let mut ing = ingresses("tls-ingress.yaml").remove(0);
    ing.metadata.annotations = Some([(ingress::FORCE_HTTPS_ANNOTATION.to_string(), "false".to_string())].into());
    let cfg = translate(&ing);
    let insecure = resource(&cfg, "RouteConfiguration", "insecure");
    assert!(insecure["virtual_hosts"].as_array().unwrap().iter().all(|vh| vh.get("require_tls").is_none()));
}

#[test]
fn bad_paths_are_named_and_the_rest_is_still_served() {
    let mut ing = ingresses("basic-ingress.yaml").remove(0);
    let paths = &mut ing.spec.as_mut().unwrap().rules.as_mut().unwrap()[0].http.as_mut().unwrap().paths;
    paths[0].path_type = "Regex".into();
    paths[1].backend.service.as_mut().unwrap().port =
        Some(k8s_openapi::api::networking::v1::ServiceBackendPort { name: Some("web".into()), number: None });
    paths.push(paths[1].clone());
    paths[2].backend.service.as_mut().unwrap().port =
        Some(k8s_openapi::api::networking::v1::ServiceBackendPort { name: Some("http".into()), number: None });
    paths[2].path = Some("/named".into());
    let g = ingress::dedicated(&ing, &cluster().objects);
    let problems: Vec<String> = g.problems.iter().map(|p| p.to_string()).collect();
    assert_eq!(
        problems,
        [
            "Ingress default/basic-ingress: spec.rules[0].http.paths[0].path: pathType \"Regex\" is not Exact, Prefix or ImplementationSpecific",
            "Ingress default/basic-ingress: spec.rules[0].http.paths[1].backend: Service default/productpage has no port named \"web\"",
        ]
    );
    let insecure = resource(&g.envoy_config, "RouteConfiguration", "insecure");
    assert_eq!(
        vhosts(insecure),
        [("*".to_string(), vec![(m("path_separated_prefix", "/named"), "default/productpage:9080".to_string())])],
        "a port given by name resolves through the Service"
    );
}

#[test]
fn shared_mode_puts_every_shared_ingress_behind_one_service() {
    let mut objects = cluster().objects;
    let mut a = ingresses("basic-ingress.yaml").remove(0);
    let mut b = ingresses("ingress-path-types-ingress.yaml").remove(0);
    for i in [&mut a, &mut b] {
        i.metadata.annotations = Some([(ingress::MODE_ANNOTATION.to_string(), "shared".to_string())].into());
        assert_eq!(ingress::mode_of(i, &objects), Mode::Shared);
    }
    let g = ingress::shared(&[&a, &b], &objects, "weft-system");
    assert!(g.problems.is_empty(), "{:?}", g.problems);
    assert_eq!(g.envoy_config["kind"], "ClusterwideEnvoyConfig");
    assert_eq!(g.service.metadata.namespace.as_deref(), Some("weft-system"));
    assert!(g.service.metadata.owner_references.is_none(), "shared objects belong to no single Ingress");
    let hosts: Vec<String> =
        vhosts(resource(&g.envoy_config, "RouteConfiguration", "insecure")).into_iter().map(|v| v.0).collect();
    assert_eq!(hosts, ["*", "pathtypes.example.com"]);
    // Validates as a clusterwide config with its Service present.
    objects.services.insert(
        weft_agent::k8s::ObjKey::new("weft-system", "weft-ingress"),
        std::sync::Arc::new(weft_agent::k8s::Sourced { origin: Origin::Api, object: g.service.clone() }),
    );
    let l = Loaded {
        objects,
        configs: vec![std::sync::Arc::new(ConfigDoc::read(Origin::Api, &g.envoy_config))].into(),
        ..Default::default()
    };
    let v = validate::verdicts(&l, &mut Model::new(ProxyPorts::ephemeral()));
    assert!(v[0].problems.is_empty(), "{:#?}", v[0].problems);
}
