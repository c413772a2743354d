//! The operator against the in-process API server: status written once by
//! the leader with the same messages as `weft-agent validate`, a takeover,
//! and Ingress objects created, kept and garbage-collected.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::*;
use crate::k8s::apiserver::ApiServer;

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn operator(server: &ApiServer, identity: &str) -> tokio::task::JoinHandle<()> {
    let opts =
        OperatorOptions { identity: identity.into(), lease_duration: Duration::from_millis(900), ..Default::default() };
    let client = server.client();
    tokio::spawn(async move {
        run(client, opts).await.unwrap();
    })
}

/// The condition `type_` of an object's status: (status, reason, message, observedGeneration).
fn condition(obj: &Value, type_: &str) -> Option<(String, String, String, i64)> {
    let c = obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?;
    Some((
        c["status"].as_str()?.to_owned(),
        c["reason"].as_str()?.to_owned(),
        c["message"].as_str()?.to_owned(),
        c["observedGeneration"].as_i64()?,
    ))
}

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: good, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: bad, namespace: shop}\nspec: {ports: [{name: http, port: 80}]}\n";

fn config(name: &str, cluster: &str) -> String {
    format!(
        r#"apiVersion: weft.io/v1alpha1
kind: EnvoyConfig
metadata: {{name: {name}, namespace: shop}}
spec:
  services: [{{name: {name}}}]
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: {name}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: web
    type: EDS
    eds_cluster_config: {{service_name: shop/web}}
  backendServices: [{{name: web}}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_alone_writes_status_with_the_messages_of_validate() {
    let server = ApiServer::start().await.unwrap();
    let good = config("good", "web");
    let bad = config("bad", "shop/nowhere");
    server.put_yaml(&format!("{SERVICE}---\n{good}---\n{bad}"));

    // What `weft-agent validate` says of the same objects in files.
    let dir = std::env::temp_dir().join(format!("weft-operator-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("objects.yaml");
    std::fs::write(&file, format!("{SERVICE}---\n{good}---\n{bad}")).unwrap();
    let report = crate::validate::validate(std::slice::from_ref(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!((report.configs, report.valid), (2, 1), "{:#?}", report.problems);
    let expected: Vec<String> = report
        .problems
        .iter()
        .map(|p| {
            p.strip_prefix(&format!("{} (document 5): ", file.display())).expect("the bad config's line").to_owned()
        })
        .collect();
    assert!(!expected.is_empty() && expected[0].contains("shop/nowhere"), "{expected:?}");

    let a = operator(&server, "a");
    let b = operator(&server, "b");
    let get = |name: &str| server.get("weft.io/v1alpha1", "EnvoyConfig", "shop", name).unwrap();
    let (st, reason, msg, gen_) = until("the good config's status", || condition(&get("good"), "Valid")).await;
    assert_eq!((st.as_str(), reason.as_str(), gen_), ("True", "Valid", 1), "{msg}");
    let applied = until("Applied", || condition(&get("good"), "Applied")).await;
    assert_eq!((applied.0.as_str(), applied.1.as_str()), ("True", "Serving"));
    let (st, reason, msg, _) = until("the bad config's status", || condition(&get("bad"), "Valid")).await;
    assert_eq!((st.as_str(), reason.as_str()), ("False", "Invalid"));
    assert_eq!(msg.lines().collect::<Vec<_>>(), expected, "the same message as weft-agent validate");
    assert_eq!(get("bad")["status"]["observedGeneration"], 1);
    let applied = condition(&get("bad"), "Applied").unwrap();
    assert_eq!((applied.0.as_str(), applied.1.as_str()), ("False", "NotServed"));

    // Fix the bad one; break the good one: its generation 1 stays in effect.
    server.put_yaml(&config("bad", "web"));
    server.put_yaml(&config("good", "shop/elsewhere"));
    until("the fix", || condition(&get("bad"), "Valid").filter(|c| c.0 == "True" && c.3 == 2)).await;
    let (st, _, msg, _) = until("the breakage", || condition(&get("good"), "Valid").filter(|c| c.3 == 2)).await;
    assert_eq!(st, "False");
    assert!(msg.contains("shop/elsewhere"), "{msg}");
    let applied = until("the fallback", || condition(&get("good"), "Applied").filter(|c| c.3 == 2)).await;
    assert_eq!(applied.1, "LastGoodVersion");
    assert!(applied.2.contains("generation 1 stays in effect"), "{}", applied.2);

    // One writer: every status write came from the one leader.
    let writers = |server: &ApiServer| -> std::collections::BTreeSet<String> {
        server
            .requests()
            .iter()
            .filter(|r| r.method == "PATCH" && r.path.ends_with("/status"))
            .map(|r| r.query.get("fieldManager").cloned().unwrap_or_default())
            .collect()
    };
    let w = writers(&server);
    assert_eq!(w.len(), 1, "{w:?}");
    let leader = w.into_iter().next().unwrap();

    // The leader goes away: the other one takes over and writes.
    let (gone, other) = if leader == "weft-operator/a" { (a, "weft-operator/b") } else { (b, "weft-operator/a") };
    gone.abort();
    server.clear_requests();
    server.put_yaml(&config("good", "web"));
    until("the new leader's write", || condition(&get("good"), "Valid").filter(|c| c.0 == "True" && c.3 == 3)).await;
    assert_eq!(writers(&server).into_iter().collect::<Vec<_>>(), [other.to_string()]);
}

const INGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: weft}
spec: {controller: weft.io/ingress-controller}
---
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
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: basic-ingress, namespace: default}
spec:
  ingressClassName: weft
  rules:
  - http:
      paths:
      - {path: /details, pathType: Prefix, backend: {service: {name: details, port: {number: 9080}}}}
      - {path: /, pathType: Prefix, backend: {service: {name: productpage, port: {number: 9080}}}}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingresses_get_their_objects_an_address_and_lose_them_with_the_ingress() {
    let server = ApiServer::start().await.unwrap();
    server.put_yaml(INGRESS);
    let _op = operator(&server, "a");
    let name = "weft-ingress-basic-ingress";
    let svc = until("the Service", || server.get("v1", "Service", "default", name)).await;
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    until("the Endpoints", || server.get("v1", "Endpoints", "default", name)).await;
    let cfg = until("the EnvoyConfig", || server.get("weft.io/v1alpha1", "EnvoyConfig", "default", name)).await;
    let ingress = server.get("networking.k8s.io/v1", "Ingress", "default", "basic-ingress").unwrap();
    for obj in [&svc, &cfg] {
        assert_eq!(obj["metadata"]["ownerReferences"][0]["uid"], ingress["metadata"]["uid"]);
    }
    // The generated config is valid for the operator too.
    let get = || server.get("weft.io/v1alpha1", "EnvoyConfig", "default", name).unwrap();
    let valid = until("its status", || condition(&get(), "Valid")).await;
    assert_eq!(valid.0, "True", "{}", valid.2);

    // The load balancer (the test, here) gives the Service an address: the Ingress shows it.
    server.put_status("v1", "Service", "default", name, json!({"loadBalancer": {"ingress": [{"ip": "172.20.0.10"}]}}));
    let ing = until("the Ingress address", || {
        server
            .get("networking.k8s.io/v1", "Ingress", "default", "basic-ingress")
            .filter(|i| i["status"]["loadBalancer"]["ingress"][0]["ip"] == "172.20.0.10")
    })
    .await;
    assert_eq!(ing["status"]["loadBalancer"]["ingress"].as_array().unwrap().len(), 1);

    // Edits reach the EnvoyConfig.
    let edited = INGRESS.replace("path: /details,", "path: /reviews,");
    server.put_yaml(&edited);
    until("the edit", || Some(get()).filter(|c| c.to_string().contains("/reviews"))).await;

    // Deleting the Ingress deletes what it owns.
    server.remove("networking.k8s.io/v1", "Ingress", "default", "basic-ingress");
    until("the owned objects to go", || {
        (server.get("v1", "Service", "default", name).is_none()
            && server.get("v1", "Endpoints", "default", name).is_none()
            && server.get("weft.io/v1alpha1", "EnvoyConfig", "default", name).is_none())
        .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_ingresses_share_one_config_and_address() {
    let server = ApiServer::start().await.unwrap();
    let shared = INGRESS.replace(
        "metadata: {name: basic-ingress, namespace: default}",
        "metadata: {name: basic-ingress, namespace: default, annotations: {ingress.weft.io/loadbalancer-mode: shared}}",
    );
    let second = "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: second, namespace: default}\nspec:\n  ingressClassName: weft\n  rules:\n  - host: second.example.com\n    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: details, port: {number: 9080}}}}]}\n";
    // The class makes shared mode the default for the second one.
    let class = "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: weft, annotations: {ingress.weft.io/loadbalancer-mode: shared}}\nspec: {controller: weft.io/ingress-controller}\n";
    server.put_yaml(&shared);
    server.put_yaml(second);
    server.put_yaml(class);
    let _op = operator(&server, "a");
    let cfg = until("the shared config", || {
        server
            .get("weft.io/v1alpha1", "ClusterwideEnvoyConfig", "", "weft-ingress")
            .filter(|c| c.to_string().contains("second.example.com") && c.to_string().contains("/details"))
    })
    .await;
    assert!(cfg["metadata"]["ownerReferences"].is_null());
    assert!(server.get("v1", "Service", "weft-system", "weft-ingress").is_some());
    assert!(server.get("v1", "Service", "default", "weft-ingress-basic-ingress").is_none(), "no dedicated objects");
    server.put_status(
        "v1",
        "Service",
        "weft-system",
        "weft-ingress",
        json!({"loadBalancer": {"ingress": [{"ip": "172.20.0.20"}]}}),
    );
    for name in ["basic-ingress", "second"] {
        until(&format!("{name}'s address"), || {
            server
                .get("networking.k8s.io/v1", "Ingress", "default", name)
                .filter(|i| i["status"]["loadBalancer"]["ingress"][0]["ip"] == "172.20.0.20")
        })
        .await;
    }
    // With no shared Ingress left, the shared config goes.
    server.remove("networking.k8s.io/v1", "Ingress", "default", "basic-ingress");
    server.remove("networking.k8s.io/v1", "Ingress", "default", "second");
    until("the shared objects to go", || {
        (server.get("weft.io/v1alpha1", "ClusterwideEnvoyConfig", "", "weft-ingress").is_none()
            && server.get("v1", "Service", "weft-system", "weft-ingress").is_none()
            && server.get("v1", "Endpoints", "weft-system", "weft-ingress").is_none())
        .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_path_is_an_event_on_the_ingress_and_the_rest_is_served() {
    let server = ApiServer::start().await.unwrap();
    server.put_yaml(&INGRESS.replace("path: /details, pathType: Prefix", "path: details, pathType: Exact"));
    let _op = operator(&server, "a");
    let name = "weft-ingress-basic-ingress";
    let cfg = until("the EnvoyConfig", || server.get("weft.io/v1alpha1", "EnvoyConfig", "default", name)).await;
    assert!(cfg.to_string().contains("default/productpage:9080"), "the good path is served");
    assert!(!cfg.to_string().contains("default/details:9080"), "the bad one is not");
    let ev = until("the Event", || server.list("events.k8s.io/v1", "Event").into_iter().next()).await;
    assert_eq!(ev["reason"], "InvalidIngress");
    assert_eq!(ev["regarding"]["name"], "basic-ingress");
    assert_eq!(
        ev["note"],
        "Ingress default/basic-ingress: spec.rules[0].http.paths[0].path: path \"details\" must start with '/'"
    );
}

const GATEWAY: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: edge, labels: {team: edge}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {name: weft}
spec: {controllerName: weft.io/gateway-controller}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: edge}
spec:
  gatewayClassName: weft
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - {name: tcp, port: 9000, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: shop, namespace: edge}
spec: {ports: [{name: http, port: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop, namespace: edge}
spec:
  parentRefs: [{name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /shop}}]
    backendRefs: [{name: shop, port: 8080}]
  - filters: [{type: CORS, cors: {allowOrigins: ["*"]}}]
    backendRefs: [{name: shop, port: 8080}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_get_their_objects_and_every_gateway_api_object_its_status() {
    let server = ApiServer::start().await.unwrap();
    for k in crate::k8s::apiserver::gateway_api_kinds() {
        server.register(k);
    }
    server.put_yaml(GATEWAY);
    let _op = operator(&server, "a");
    let g = "gateway.networking.k8s.io/v1";

    let class = until("the class accepted", || {
        server.get(g, "GatewayClass", "", "weft").filter(|c| condition(c, "Accepted").is_some())
    })
    .await;
    assert_eq!(condition(&class, "Accepted").unwrap().1, "Accepted");
    assert!(class["status"]["supportedFeatures"].as_array().unwrap().iter().any(|f| f["name"] == "HTTPRoute"));

    let svc = until("the Service", || server.get("v1", "Service", "edge", "weft-gateway-web")).await;
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "port-80", "port": 80, "protocol": "TCP"}]),
        "the TCP listener is not served"
    );
    assert_eq!(svc["metadata"]["ownerReferences"][0]["kind"], "Gateway");
    until("the Endpoints", || server.get("v1", "Endpoints", "edge", "weft-gateway-web")).await;
    let config_name = "weft-gateway.edge.web";
    until("the config", || server.get("weft.io/v1alpha1", "ClusterwideEnvoyConfig", "", config_name)).await;

    // The route: accepted, its CORS rule dropped and reported, the other served.
    let route = until("the route's status", || {
        server
            .get(g, "HTTPRoute", "edge", "shop")
            .filter(|r| r["status"]["parents"].as_array().is_some_and(|p| !p.is_empty()))
    })
    .await;
    let parent = &route["status"]["parents"][0];
    assert_eq!(parent["controllerName"], "weft.io/gateway-controller");
    assert_eq!(parent["parentRef"], json!({"name": "web"}));
    let conds = json!({"status": {"conditions": parent["conditions"]}});
    assert_eq!(condition(&conds, "Accepted").unwrap().0, "True");
    let partial = condition(&conds, "PartiallyInvalid").unwrap();
    assert!(partial.2.starts_with("Dropped Rule"), "{}", partial.2);

    // The Gateway: a listener refused, not Programmed until the Service has an address.
    let gw = until("the Gateway's status", || {
        server.get(g, "Gateway", "edge", "web").filter(|g| condition(g, "Programmed").is_some())
    })
    .await;
    assert_eq!(condition(&gw, "Accepted").unwrap().1, "ListenersNotValid");
    assert_eq!(condition(&gw, "Programmed").unwrap().1, "AddressNotAssigned");
    let tcp = &gw["status"]["listeners"][1];
    let tcp_conds = json!({"status": {"conditions": tcp["conditions"]}});
    assert_eq!(condition(&tcp_conds, "Accepted").unwrap().1, "UnsupportedProtocol");
    assert_eq!(gw["status"]["listeners"][0]["attachedRoutes"], 1);
    server.put_status(
        "v1",
        "Service",
        "edge",
        "weft-gateway-web",
        json!({"loadBalancer": {"ingress": [{"ip": "172.20.0.11"}]}}),
    );
    let gw = until("Programmed", || {
        server.get(g, "Gateway", "edge", "web").filter(|g| condition(g, "Programmed").is_some_and(|c| c.0 == "True"))
    })
    .await;
    assert_eq!(gw["status"]["addresses"], json!([{"type": "IPAddress", "value": "172.20.0.11"}]));

    // Another controller's parent entry survives weft's writes.
    let mut r = server.get(g, "HTTPRoute", "edge", "shop").unwrap();
    let mut parents = r["status"]["parents"].as_array().unwrap().clone();
    parents.push(json!({"parentRef": {"name": "other"}, "controllerName": "example.com/other", "conditions": []}));
    r["status"]["parents"] = json!(parents);
    r["spec"]["rules"][0]["matches"][0]["path"]["value"] = json!("/store");
    server.put(r);
    until("the new generation's status, the foreign entry kept", || {
        let r = server.get(g, "HTTPRoute", "edge", "shop")?;
        let p = r["status"]["parents"].as_array()?;
        let ours = p.iter().find(|p| p["controllerName"] == "weft.io/gateway-controller")?;
        (p.iter().any(|p| p["controllerName"] == "example.com/other")
            && ours["conditions"][0]["observedGeneration"] == r["metadata"]["generation"])
            .then_some(())
    })
    .await;

    // The Gateway goes: so do its objects.
    server.remove(g, "Gateway", "edge", "web");
    until("the generated objects removed", || {
        (server.get("weft.io/v1alpha1", "ClusterwideEnvoyConfig", "", config_name).is_none()
            && server.get("v1", "Service", "edge", "weft-gateway-web").is_none())
        .then_some(())
    })
    .await;
}
