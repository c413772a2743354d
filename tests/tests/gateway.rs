//! The Gateway API against a real Kubernetes API server (etcd,
//! kube-apiserver and kube-controller-manager, once for this test binary;
//! the v1.6.1 standard CRDs with their CEL validation installed as a user
//! would): weft's operator gives every object the status the spec asks for
//! and keeps the generated Service, Endpoints and ClusterwideEnvoyConfig of
//! each Gateway, and removes them with it. Nothing here needs root.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_tests::{
    k8s::{ControlPlane, deploy},
    require_control_plane,
};

/// Waits (generously: no timing is asserted) until `f` returns Some.
async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An object as JSON, if it exists.
fn get(cp: &ControlPlane, kind: &str, ns: Option<&str>, name: &str) -> Option<Value> {
    let mut args = vec!["get", kind, name, "-o", "json"];
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    let out = cp.kubectl(&args);
    out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("kubectl prints JSON"))
}

/// The condition `type_` among `conditions`: (status, reason, message, observedGeneration).
fn condition(conditions: &Value, type_: &str) -> Option<(String, String, String, i64)> {
    let c = conditions.as_array()?.iter().find(|c| c["type"] == type_)?;
    Some((
        c["status"].as_str()?.to_owned(),
        c["reason"].as_str()?.to_owned(),
        c["message"].as_str()?.to_owned(),
        c["observedGeneration"].as_i64()?,
    ))
}

/// Runs weft's operator in this process (admin credentials), its Lease in `ns`.
async fn operator(cp: &ControlPlane, ns: &str) -> tokio::task::JoinHandle<()> {
    let opts = weft_agent::operator::OperatorOptions {
        namespace: ns.into(),
        identity: format!("{ns}-operator"),
        lease_duration: Duration::from_secs(1),
        ..Default::default()
    };
    let client = cp.client().await;
    tokio::spawn(async move {
        weft_agent::operator::run(client, opts).await.unwrap();
    })
}

fn objects(ns: &str) -> String {
    format!(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GatewayClass
metadata: {{name: {ns}}}
spec: {{controllerName: weft.io/gateway-controller}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: web, namespace: {ns}}}
spec:
  gatewayClassName: {ns}
  listeners:
  - {{name: http, port: 80, protocol: HTTP}}
  - {{name: tcp, port: 9000, protocol: TCP}}
---
apiVersion: v1
kind: Service
metadata: {{name: shop, namespace: {ns}}}
spec: {{ports: [{{name: http, port: 8080}}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: shop, namespace: {ns}}}
spec:
  parentRefs: [{{name: web}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /shop}}}}]
    backendRefs: [{{name: shop, port: 8080}}]
  - filters: [{{type: CORS, cors: {{allowOrigins: ["https://example.com"]}}}}]
    backendRefs: [{{name: shop, port: 8080}}]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_get_their_objects_and_every_gateway_api_object_its_status() {
    let cp = require_control_plane!();
    deploy::crds(&cp);
    let out = deploy::gateway_api_crds(&cp);
    assert!(!out.to_lowercase().contains("error"), "{out}");
    let ns = cp.namespace("gateway");
    let n = ns.name.clone();
    cp.apply(&objects(&n));
    let _op = operator(&cp, &n).await;

    let class = until("the class accepted", || {
        get(&cp, "gatewayclass", None, &n)
            .filter(|c| condition(&c["status"]["conditions"], "Accepted").is_some_and(|a| a.0 == "True"))
    })
    .await;
    assert_eq!(condition(&class["status"]["conditions"], "Accepted").unwrap().1, "Accepted");
    assert!(class["status"]["supportedFeatures"].as_array().unwrap().iter().any(|f| f["name"] == "HTTPRoute"));

    let svc = until("the Service", || get(&cp, "service", Some(&n), "weft-gateway-web")).await;
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    let ports: Vec<&Value> = svc["spec"]["ports"].as_array().unwrap().iter().map(|p| &p["port"]).collect();
    assert_eq!(ports, [&json!(80)], "the TCP listener is not served");
    let gw = get(&cp, "gateway", Some(&n), "web").unwrap();
    assert_eq!(svc["metadata"]["ownerReferences"][0]["uid"], gw["metadata"]["uid"]);
    until("the Endpoints", || get(&cp, "endpoints", Some(&n), "weft-gateway-web")).await;
    let config_name = format!("weft-gateway.{n}.web");
    let cfg = until("the config", || get(&cp, "clusterwideenvoyconfig", None, &config_name)).await;
    assert_eq!(cfg["metadata"]["labels"]["weft.io/gateway-namespace"], n.as_str());
    let valid = until("the config's status", || {
        condition(&get(&cp, "clusterwideenvoyconfig", None, &config_name)?["status"]["conditions"], "Valid")
    })
    .await;
    assert_eq!(valid.0, "True", "weft's validation: {}", valid.2);

    // The route: accepted, its CORS rule dropped and named, the other served.
    let route = until("the route's status", || {
        get(&cp, "httproute", Some(&n), "shop")
            .filter(|r| r["status"]["parents"].as_array().is_some_and(|p| !p.is_empty()))
    })
    .await;
    let parent = &route["status"]["parents"][0];
    assert_eq!(parent["controllerName"], "weft.io/gateway-controller");
    assert_eq!(parent["parentRef"]["name"], "web");
    assert_eq!(condition(&parent["conditions"], "Accepted").unwrap().0, "True");
    assert_eq!(condition(&parent["conditions"], "ResolvedRefs").unwrap().0, "True");
    let partial = condition(&parent["conditions"], "PartiallyInvalid").unwrap();
    assert!(partial.2.starts_with("Dropped Rule") && partial.2.contains("CORS"), "{}", partial.2);

    // The Gateway: the TCP listener refused; not Programmed until the Service has an address.
    let gw = until("the Gateway's status", || {
        get(&cp, "gateway", Some(&n), "web").filter(|g| condition(&g["status"]["conditions"], "Programmed").is_some())
    })
    .await;
    assert_eq!(condition(&gw["status"]["conditions"], "Accepted").unwrap().1, "ListenersNotValid");
    assert_eq!(condition(&gw["status"]["conditions"], "Programmed").unwrap().1, "AddressNotAssigned");
    let listeners = gw["status"]["listeners"].as_array().unwrap();
    assert_eq!(condition(&listeners[1]["conditions"], "Accepted").unwrap().1, "UnsupportedProtocol");
    assert_eq!(listeners[0]["attachedRoutes"], 1);
    let patch = json!({"status": {"loadBalancer": {"ingress": [{"ip": "172.20.0.11"}]}}}).to_string();
    cp.kubectl_ok(&[
        "patch",
        "service",
        "weft-gateway-web",
        "-n",
        &n,
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch,
    ]);
    let gw = until("Programmed", || {
        get(&cp, "gateway", Some(&n), "web")
            .filter(|g| condition(&g["status"]["conditions"], "Programmed").is_some_and(|c| c.0 == "True"))
    })
    .await;
    assert_eq!(gw["status"]["addresses"], json!([{"type": "IPAddress", "value": "172.20.0.11"}]));

    // Another controller's parent entry survives weft's writes of a new generation.
    let mut r = get(&cp, "httproute", Some(&n), "shop").unwrap();
    let mut parents = r["status"]["parents"].as_array().unwrap().clone();
    parents.push(json!({
        "parentRef": {"name": "other"},
        "controllerName": "example.com/other",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]
    }));
    let patch = json!({"status": {"parents": parents}}).to_string();
    cp.kubectl_ok(&["patch", "httproute", "shop", "-n", &n, "--subresource=status", "--type=merge", "-p", &patch]);
    r["spec"]["rules"][0]["matches"][0]["path"]["value"] = json!("/store");
    let patch = json!({"spec": {"rules": r["spec"]["rules"]}}).to_string();
    cp.kubectl_ok(&["patch", "httproute", "shop", "-n", &n, "--type=merge", "-p", &patch]);
    until("the new generation's status, the foreign entry kept", || {
        let r = get(&cp, "httproute", Some(&n), "shop")?;
        let p = r["status"]["parents"].as_array()?;
        let ours = p.iter().find(|p| p["controllerName"] == "weft.io/gateway-controller")?;
        (p.iter().any(|p| p["controllerName"] == "example.com/other")
            && ours["conditions"][0]["observedGeneration"] == r["metadata"]["generation"])
            .then_some(())
    })
    .await;

    // The Gateway goes: the garbage collector takes the Service, the operator the config.
    cp.kubectl_ok(&["delete", "gateway", "web", "-n", &n]);
    until("the generated objects removed", || {
        (get(&cp, "clusterwideenvoyconfig", None, &config_name).is_none()
            && get(&cp, "service", Some(&n), "weft-gateway-web").is_none())
        .then_some(())
    })
    .await;
    cp.kubectl_ok(&["delete", "gatewayclass", &n]);
}
