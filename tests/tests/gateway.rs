//! The Gateway API against a real Kubernetes API server (etcd,
//! kube-apiserver and kube-controller-manager, once for this test binary;
//! the v1.6.1 standard CRDs with their CEL validation installed as a user
//! would): weft's operator gives every object the status the spec asks for
//! and keeps the generated Service, Endpoints and ClusterwideEnvoyConfig of
//! each Gateway, and removes them with it.
//!
//! Then real packets (root, the lab): conformance cases, their objects
//! applied unchanged, answered through node1's Envoy, with both nodes'
//! agents reading the same API server through a relay in their network
//! namespace and lab pods playing the suite's echo backends (made through
//! the CNI chain ptp + weft-cni, as a runtime runs it, under the names of
//! the echo Deployments' Pods).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use weft_agent::netns;
use weft_tests::{
    cni,
    flows::flow_socket,
    h2::{GrpcClient, H2Echo, H2Server},
    http::{Client, EchoPod, HttpServer, Response, ServerOpts},
    k8s::{
        ControlPlane, deploy,
        relay::{ApiRelay, NODE_API_PORT},
    },
    lab::{Lab, PodNetwork},
    objects::{agent_files, start_agent, wait_ready, workspace_binary},
    require_control_plane, require_root,
    scenario::{T, sa as sa_of},
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

/// The lab pods that play the conformance suite's echo backends: (lab pod,
/// namespace, Deployment). One replica of each Deployment is "scheduled" on
/// the lab pod's node; the others stay Pending (no address, no endpoint).
/// Pods after the standard lab's two per node are added to it. The echo
/// server on :3000 speaks HTTP/1.1 or, for the gRPC backends, gRPC.
const BACKENDS: [(&str, &str, &str, Serves); 8] = [
    ("n1-p1", "gateway-conformance-infra", "infra-backend-v1", Serves::Http),
    ("n1-p2", "gateway-conformance-infra", "infra-backend-v2", Serves::Http),
    ("n2-p1", "gateway-conformance-infra", "infra-backend-v3", Serves::Http),
    ("n2-p2", "gateway-conformance-web-backend", "web-backend", Serves::Http),
    ("n1-p3", APP, "app-backend-v1", Serves::Http),
    ("n2-p3", "gateway-conformance-infra", "grpc-infra-backend-v1", Serves::Grpc),
    ("n1-p4", "gateway-conformance-infra", "grpc-infra-backend-v2", Serves::Grpc),
    ("n2-p4", "gateway-conformance-infra", "grpc-infra-backend-v3", Serves::Grpc),
];

/// What a backend pod's echo server speaks on :3000.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Serves {
    Http,
    Grpc,
}

/// infra-backend-v1's `appProtocol: kubernetes.io/h2c` port (Service port
/// 8081): its pod's echo server there speaks HTTP/2 only.
const H2C_PORT: u16 = 3001;

/// The Secret the HTTPS listeners of base-manifests.yaml name (the suite
/// makes it in code too): a self-signed certificate for the hosts the
/// cases ask for.
const CERT_SECRET: &str = "tls-validity-checks-certificate";
const CERT_HOSTS: [&str; 4] = ["example.org", "second-example.org", "unknown-example.org", "*.wildcard.org"];

/// The Gateways of gateway-conformance-infra the cases use: the address
/// this test, as the lab's load balancer, gives each one's Service (the
/// lab's client routes 172.20.0.0/16 to node1), once the Gateway exists.
const GATEWAYS: [&str; 8] = [
    "same-namespace",
    "backend-namespaces",
    "httproute-listener-hostname-matching",
    "httproute-hostname-intersection",
    "httproute-hostname-intersection-all",
    "same-namespace-with-https-listener",
    "listener-conflicts",
    "gateway-secret-reference-grant-specific",
];

/// A Gateway (not from the suite, which has no packet test of it) whose
/// listeners `tls` and `plain` share port 8443 with two protocols
/// (ProtocolConflict, both), beside two listeners on port 80 that do not
/// conflict. A route on `first` and one on `plain`. (A HostnameConflict
/// needs two listeners with the same port, protocol and hostname, which the
/// CRD's validation refuses: agent/tests/gateway.rs translates one.)
const CONFLICTS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: listener-conflicts, namespace: gateway-conformance-infra}
spec:
  gatewayClassName: weft
  listeners:
  - {name: first, port: 80, protocol: HTTP, hostname: conflicted.example}
  - {name: other, port: 80, protocol: HTTP, hostname: other.example}
  - name: tls
    port: 8443
    protocol: HTTPS
    tls: {certificateRefs: [{name: tls-validity-checks-certificate}]}
  - {name: plain, port: 8443, protocol: HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: on-first, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: listener-conflicts, sectionName: first}]
  rules: [{backendRefs: [{name: infra-backend-v1, port: 8080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: on-plain, namespace: gateway-conformance-infra}
spec:
  parentRefs: [{name: listener-conflicts, sectionName: plain}]
  rules: [{backendRefs: [{name: infra-backend-v2, port: 8080}]}]
"#;

/// The address of a Gateway of [`GATEWAYS`].
fn gateway_address(gateway: &str) -> Ipv4Addr {
    let i = GATEWAYS.iter().position(|g| *g == gateway).expect("a Gateway of GATEWAYS");
    Ipv4Addr::new(172, 20, 0, 20 + i as u8)
}

/// Gives the Gateway's Service its address and waits until the Gateway is Programmed.
fn assign_address(cp: &ControlPlane, gateway: &str) {
    let service = format!("weft-gateway-{gateway}");
    wait_for(&format!("Service {service}"), 60, || get(cp, "service", Some(INFRA), &service));
    let patch = json!({"status": {"loadBalancer": {"ingress": [{"ip": gateway_address(gateway).to_string()}]}}});
    let patch = patch.to_string();
    cp.kubectl_ok(&["patch", "service", &service, "-n", INFRA, "--subresource=status", "--type=merge", "-p", &patch]);
    wait_for(&format!("Gateway {gateway} Programmed"), 60, || {
        get(cp, "gateway", Some(INFRA), gateway)
            .filter(|g| condition(&g["status"]["conditions"], "Programmed").is_some_and(|c| c.0 == "True"))
    });
}

/// A conformance file with the suite's placeholders filled in as for weft.
fn conformance_text(relative: &str) -> String {
    let path = weft_tests::objects::gateway_api_dir().join(relative);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .replace("{GATEWAY_CLASS_NAME}", "weft")
        .replace("{GATEWAY_CONTROLLER_NAME}", weft_agent::operator::gateway::CONTROLLER)
}

/// Blocking [`until`], for the lab test (which runs no runtime on its own thread).
fn wait_for<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What one conformance request expects (the facts of the suite's
/// ExpectedResponse): the status, the echo backend and namespace that
/// answer, the path and headers that backend saw, the redirect's target.
#[derive(Clone, Debug)]
struct Expect {
    /// None: the Gateway's address.
    host: Option<&'static str>,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    status: u16,
    backend: Option<(&'static str, &'static str)>,
    seen_path: Option<&'static str>,
    seen_headers: Vec<(&'static str, &'static str)>,
    absent: Vec<&'static str>,
    /// Response headers the echo backend is asked for.
    backend_answers: Vec<(&'static str, &'static str)>,
    /// Response headers (joined values) the client must see, and must not.
    response_headers: Vec<(&'static str, &'static str)>,
    response_absent: Vec<&'static str>,
    /// The echo backend (lab pod) that must also get the request, a copy.
    mirrored_to: Option<&'static str>,
    /// Where the answer redirects to.
    redirect: Option<Redirect>,
    /// HTTPS to port 443, the host as SNI, the certificate verified against [`CERT_SECRET`]'s.
    tls: bool,
    /// HTTP/2 with prior knowledge (h2c) to port 80.
    h2c: bool,
}

/// The Location a redirect must name: scheme, host (None: the request's),
/// port (None: none, the scheme's), path.
#[derive(Clone, Debug)]
struct Redirect {
    scheme: &'static str,
    host: Option<&'static str>,
    port: Option<&'static str>,
    path: &'static str,
}

const INFRA: &str = "gateway-conformance-infra";
const APP: &str = "gateway-conformance-app-backend";

fn req(path: &'static str) -> Expect {
    Expect {
        host: None,
        method: "GET",
        path,
        headers: Vec::new(),
        status: 200,
        backend: None,
        seen_path: None,
        seen_headers: Vec::new(),
        absent: Vec::new(),
        backend_answers: Vec::new(),
        response_headers: Vec::new(),
        response_absent: Vec::new(),
        mirrored_to: None,
        redirect: None,
        tls: false,
        h2c: false,
    }
}

impl Expect {
    fn host(mut self, h: &'static str) -> Self {
        self.host = Some(h);
        self
    }
    /// A header the echo backend answers with (the suite asks it with `X-Echo-Set-Header`).
    fn backend_answers(mut self, k: &'static str, v: &'static str) -> Self {
        self.backend_answers.push((k, v));
        self
    }
    fn responds_with(mut self, k: &'static str, v: &'static str) -> Self {
        self.response_headers.push((k, v));
        self
    }
    fn responds_without(mut self, k: &'static str) -> Self {
        self.response_absent.push(k);
        self
    }
    fn mirrored_to(mut self, lab_pod: &'static str) -> Self {
        self.mirrored_to = Some(lab_pod);
        self
    }
    fn over_tls(mut self) -> Self {
        self.tls = true;
        self
    }
    fn h2c(mut self) -> Self {
        self.h2c = true;
        self
    }
    fn method(mut self, m: &'static str) -> Self {
        self.method = m;
        self
    }
    fn header(mut self, k: &'static str, v: &'static str) -> Self {
        self.headers.push((k, v));
        self
    }
    /// Answered 200 by this Deployment's pod in gateway-conformance-infra.
    fn by(self, backend: &'static str) -> Self {
        self.by_in(INFRA, backend)
    }
    fn by_in(mut self, ns: &'static str, backend: &'static str) -> Self {
        self.backend = Some((ns, backend));
        self
    }
    fn status(mut self, s: u16) -> Self {
        self.status = s;
        self
    }
    fn seen(mut self, path: &'static str) -> Self {
        self.seen_path = Some(path);
        self
    }
    fn seen_header(mut self, k: &'static str, v: &'static str) -> Self {
        self.seen_headers.push((k, v));
        self
    }
    fn absent(mut self, k: &'static str) -> Self {
        self.absent.push(k);
        self
    }
    fn redirect(mut self, status: u16, host: Option<&'static str>, path: &'static str) -> Self {
        self.status = status;
        self.redirect = Some(Redirect { scheme: "http", host, port: None, path });
        self
    }
    /// The redirect's Location has this scheme (after [`Expect::redirect`]).
    fn redirect_scheme(mut self, scheme: &'static str) -> Self {
        self.redirect.as_mut().expect("a redirect").scheme = scheme;
        self
    }
    /// The redirect's Location has this port (after [`Expect::redirect`]).
    fn redirect_port(mut self, port: &'static str) -> Self {
        self.redirect.as_mut().expect("a redirect").port = Some(port);
        self
    }

    /// Whether `r` (to a request with Host `host`) is what the suite expects; why not.
    fn check(&self, host: &str, r: &Response) -> Result<(), String> {
        if r.status != self.status {
            return Err(format!("status {} (expected {})", r.status, self.status));
        }
        let echo = r.json();
        if let Some((ns, backend)) = self.backend {
            let pod = echo["pod"].as_str().unwrap_or_default();
            if !pod.starts_with(&format!("{backend}-")) || echo["namespace"] != ns {
                return Err(format!("answered by {ns:?}/{pod:?}, expected {ns}/{backend}"));
            }
        }
        let seen_path = self.seen_path.or(self.backend.map(|_| self.path));
        if let Some(p) = seen_path.filter(|p| self.backend.is_some() && echo["path"] != *p) {
            return Err(format!("the backend saw path {}, expected {p}", echo["path"]));
        }
        let seen = |k: &str| -> Option<String> {
            let v = echo["headers"][k.to_ascii_lowercase()].as_array()?;
            Some(v.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(","))
        };
        for (k, v) in &self.seen_headers {
            if seen(k).as_deref() != Some(v) {
                return Err(format!("the backend saw {k}: {:?}, expected {v:?}", seen(k)));
            }
        }
        for k in &self.absent {
            if let Some(v) = seen(k) {
                return Err(format!("the backend saw {k}: {v:?}, expected none"));
            }
        }
        for (k, v) in &self.response_headers {
            if r.header_values(k).as_deref() != Some(v) {
                return Err(format!("the response had {k}: {:?}, expected {v:?}", r.header_values(k)));
            }
        }
        for k in &self.response_absent {
            if let Some(v) = r.header_values(k) {
                return Err(format!("the response had {k}: {v:?}, expected none"));
            }
        }
        if let Some(want) = &self.redirect {
            let location = r.header("location").unwrap_or_default();
            let (scheme, rest) = location.split_once("://").ok_or(format!("location {location:?}"))?;
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let (got_host, got_port) = match authority.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            if scheme != want.scheme
                || got_host != want.host.unwrap_or(host)
                || got_port != want.port
                || path != want.path
            {
                return Err(format!("location {location:?}, expected {want:?}"));
            }
        }
        Ok(())
    }
}

/// A conformance test sent through the node's Envoy: its name, its file
/// (tests/<file>.yaml), the Gateway and the route (namespace, name) it
/// waits for (Accepted, and ResolvedRefs True or False with `unresolved`
/// as the reason), the requests (each sent until answered as expected),
/// then, if any, the share of requests each backend must serve.
struct Case {
    test: &'static str,
    file: &'static str,
    gateway: &'static str,
    route: (&'static str, &'static str),
    unresolved: Option<&'static str>,
    expects: Vec<Expect>,
    /// (Deployment of gateway-conformance-infra, weight in percent).
    distribution: Vec<(&'static str, u32)>,
}

fn case(
    test: &'static str,
    file: &'static str,
    gateway: &'static str,
    route: (&'static str, &'static str),
    expects: Vec<Expect>,
) -> Case {
    Case { test, file, gateway, route, unresolved: None, expects, distribution: Vec::new() }
}

impl Case {
    /// The route's ResolvedRefs is False with this reason.
    fn unresolved(mut self, reason: &'static str) -> Self {
        self.unresolved = Some(reason);
        self
    }
    /// Then [`SAMPLES`] requests of the first expectation must split
    /// between backends as these weights say.
    fn distribution(mut self, weights: &[(&'static str, u32)]) -> Self {
        self.distribution = weights.to_vec();
        self
    }
}

/// Requests sent to measure a weighted split (the suite sends 500).
const SAMPLES: u32 = 500;

/// Whether `counts` (backend -> requests served, of [`SAMPLES`]) fits the
/// weights (percent): a backend of weight 0 serves none, no other backend
/// serves any, and each other count is within five standard deviations of
/// its binomial mean (a correct split fails with probability under 1e-6;
/// a split off by a tenth of the requests does not pass).
fn check_distribution(counts: &BTreeMap<String, u32>, weights: &[(&str, u32)]) -> Result<(), String> {
    let total: u32 = weights.iter().map(|w| w.1).sum();
    for (backend, n) in counts {
        if !weights.iter().any(|(b, _)| b == backend) {
            return Err(format!("{backend} served {n} requests, it is not a backend of the rule"));
        }
    }
    for (backend, w) in weights {
        let got = f64::from(counts.get(*backend).copied().unwrap_or(0));
        let p = f64::from(*w) / f64::from(total);
        let n = f64::from(SAMPLES);
        let (mean, bound) = (n * p, 5.0 * (n * p * (1.0 - p)).sqrt());
        if (got - mean).abs() > bound {
            return Err(format!("{backend} served {got} of {n} requests, expected {mean} +/- {bound:.1}"));
        }
    }
    Ok(())
}

fn cases() -> Vec<Case> {
    let web = "gateway-conformance-web-backend";
    vec![
        case(
            "HTTPRouteSimpleSameNamespace",
            "httproute-simple-same-namespace",
            "same-namespace",
            (INFRA, "gateway-conformance-infra-test"),
            vec![req("/").by("infra-backend-v1")],
        ),
        case(
            "HTTPRouteCrossNamespace",
            "httproute-cross-namespace",
            "backend-namespaces",
            (web, "cross-namespace"),
            vec![req("/").by_in(web, "web-backend")],
        ),
        case(
            "HTTPRouteExactPathMatching",
            "httproute-exact-path-matching",
            "same-namespace",
            (INFRA, "exact-matching"),
            vec![
                req("/one").by("infra-backend-v1"),
                req("/two").by("infra-backend-v2"),
                req("/").status(404),
                req("/one/example").status(404),
                req("/two/").status(404),
                req("/Two").status(404),
            ],
        ),
        case(
            "HTTPRouteMatching",
            "httproute-matching",
            "same-namespace",
            (INFRA, "matching"),
            vec![
                req("/").by("infra-backend-v1"),
                req("/example").by("infra-backend-v1"),
                req("/").header("Version", "one").by("infra-backend-v1"),
                req("/v2").by("infra-backend-v2"),
                req("/v2/example").by("infra-backend-v2"),
                req("/").header("Version", "two").by("infra-backend-v2"),
            ],
        ),
        case(
            "HTTPRouteMethodMatching",
            "httproute-method-matching",
            "same-namespace",
            (INFRA, "method-matching"),
            vec![
                req("/").method("POST").by("infra-backend-v1"),
                req("/").by("infra-backend-v2"),
                req("/").method("HEAD").status(404),
                req("/path1").by("infra-backend-v1"),
                req("/").method("PUT").header("version", "one").by("infra-backend-v2"),
                req("/path2").method("POST").header("version", "two").by("infra-backend-v3"),
                req("/path3").method("PATCH").by("infra-backend-v1"),
                req("/path4").method("DELETE").header("version", "three").by("infra-backend-v1"),
                req("/").method("PUT").status(404),
                req("/path4").method("DELETE").status(404),
                req("/path5").method("PATCH").by("infra-backend-v1"),
                req("/").method("PATCH").header("version", "four").by("infra-backend-v2"),
            ],
        ),
        case(
            "HTTPRouteRequestHeaderModifier",
            "httproute-request-header-modifier",
            "same-namespace",
            (INFRA, "request-header-modifier"),
            vec![
                req("/set")
                    .header("Some-Other-Header", "val")
                    .by("infra-backend-v1")
                    .seen_header("Some-Other-Header", "val")
                    .seen_header("X-Header-Set", "set-overwrites-values"),
                req("/set")
                    .header("Some-Other-Header", "val")
                    .header("X-Header-Set", "some-other-value")
                    .by("infra-backend-v1")
                    .seen_header("X-Header-Set", "set-overwrites-values"),
                req("/add")
                    .header("Some-Other-Header", "val")
                    .by("infra-backend-v1")
                    .seen_header("X-Header-Add", "add-appends-values"),
                req("/add")
                    .header("Some-Other-Header", "val")
                    .header("X-Header-Add", "some-other-value")
                    .by("infra-backend-v1")
                    .seen_header("X-Header-Add", "some-other-value,add-appends-values"),
                req("/remove").header("X-Header-Remove", "val").by("infra-backend-v1").absent("X-Header-Remove"),
                req("/multiple")
                    .header("X-Header-Set-2", "set-val-2")
                    .header("X-Header-Add-2", "add-val-2")
                    .header("X-Header-Remove-2", "remove-val-2")
                    .header("Another-Header", "another-header-val")
                    .by("infra-backend-v1")
                    .seen_header("X-Header-Set-1", "header-set-1")
                    .seen_header("X-Header-Set-2", "header-set-2")
                    .seen_header("X-Header-Add-1", "header-add-1")
                    .seen_header("X-Header-Add-2", "add-val-2,header-add-2")
                    .seen_header("X-Header-Add-3", "header-add-3")
                    .seen_header("Another-Header", "another-header-val")
                    .absent("X-Header-Remove-1")
                    .absent("X-Header-Remove-2"),
                req("/case-insensitivity")
                    .header("x-header-set", "original-val-set")
                    .header("x-header-add", "original-val-add")
                    .header("x-header-remove", "original-val-remove")
                    .header("Another-Header", "another-header-val")
                    .by("infra-backend-v1")
                    .seen_header("X-Header-Set", "header-set")
                    .seen_header("X-Header-Add", "original-val-add,header-add")
                    .seen_header("Another-Header", "another-header-val")
                    .absent("X-Header-Remove"),
            ],
        ),
        case(
            "HTTPRouteHeaderMatching",
            "httproute-header-matching",
            "same-namespace",
            (INFRA, "header-matching"),
            vec![
                req("/").header("Version", "one").by("infra-backend-v1"),
                req("/").header("Version", "two").by("infra-backend-v2"),
                req("/").header("Version", "two").header("Color", "orange").by("infra-backend-v1"),
                req("/").header("Version", "two").header("Color", "blue").by("infra-backend-v2"),
                req("/").header("Color", "orange").status(404),
                req("/").header("Some-Other-Header", "one").status(404),
                req("/").header("Color", "blue").by("infra-backend-v1"),
                req("/").header("Color", "green").by("infra-backend-v1"),
                req("/").header("Color", "red").by("infra-backend-v2"),
                req("/").header("Color", "yellow").by("infra-backend-v2"),
                req("/").header("Color", "purple").status(404),
            ],
        ),
        case(
            "HTTPRouteQueryParamMatching",
            "httproute-query-param-matching",
            "same-namespace",
            (INFRA, "query-param-matching"),
            vec![
                req("/?animal=whale").by("infra-backend-v1"),
                req("/?animal=dolphin").by("infra-backend-v2"),
                req("/?animal=dolphin&color=blue").by("infra-backend-v3"),
                req("/?ANIMAL=Whale").by("infra-backend-v3"),
                req("/?animal=whale&otherparam=irrelevant").by("infra-backend-v1"),
                req("/?animal=dolphin&color=yellow").by("infra-backend-v2"),
                req("/?color=blue").status(404),
                req("/?animal=dog").status(404),
                req("/?animal=whaledolphin").status(404),
                req("/").status(404),
                req("/path1?animal=whale").by("infra-backend-v1"),
                req("/?animal=whale").header("version", "one").by("infra-backend-v2"),
                req("/path2?animal=whale").header("version", "two").by("infra-backend-v3"),
                req("/path3?animal=shark").by("infra-backend-v1"),
                req("/path4?animal=kraken").header("version", "three").by("infra-backend-v1"),
                req("/?animal=shark").status(404),
                req("/path4?animal=kraken").status(404),
                req("/path5?animal=hydra").by("infra-backend-v1"),
                req("/?animal=hydra").header("version", "four").by("infra-backend-v3"),
            ],
        ),
        case(
            "HTTPRouteMatchingAcrossRoutes",
            "httproute-matching-across-routes",
            "same-namespace",
            (INFRA, "matching-part2"),
            vec![
                req("/").host("example.com").by("infra-backend-v1"),
                req("/example").host("example.com").by("infra-backend-v1"),
                req("/example").host("example.net").by("infra-backend-v1"),
                req("/example").host("example.com").header("Version", "one").by("infra-backend-v1"),
                req("/v2").host("example.com").by("infra-backend-v2"),
                req("/v2").host("example.net").by("infra-backend-v1"),
                req("/v2/example").host("example.com").by("infra-backend-v2"),
                req("/").host("example.com").header("Version", "two").by("infra-backend-v2"),
            ],
        ),
        case(
            "HTTPRouteReferenceGrant",
            "httproute-reference-grant",
            "same-namespace",
            (INFRA, "reference-grant"),
            vec![req("/").by_in(web, "web-backend")],
        ),
        case(
            "HTTPRouteResponseHeaderModifier",
            "httproute-response-header-modifier",
            "same-namespace",
            (INFRA, "response-header-modifier"),
            vec![
                req("/set")
                    .backend_answers("Some-Other-Header", "val")
                    .by("infra-backend-v1")
                    .responds_with("Some-Other-Header", "val")
                    .responds_with("X-Header-Set", "set-overwrites-values"),
                req("/set")
                    .backend_answers("Some-Other-Header", "val")
                    .backend_answers("X-Header-Set", "some-other-value")
                    .by("infra-backend-v1")
                    .responds_with("X-Header-Set", "set-overwrites-values"),
                req("/add")
                    .backend_answers("Some-Other-Header", "val")
                    .by("infra-backend-v1")
                    .responds_with("X-Header-Add", "add-appends-values"),
                req("/add")
                    .backend_answers("X-Header-Add", "some-other-value")
                    .by("infra-backend-v1")
                    .responds_with("X-Header-Add", "some-other-value,add-appends-values"),
                req("/remove")
                    .backend_answers("X-Header-Remove", "val")
                    .by("infra-backend-v1")
                    .responds_without("X-Header-Remove"),
                req("/multiple")
                    .backend_answers("X-Header-Set-2", "set-val-2")
                    .backend_answers("X-Header-Add-2", "add-val-2")
                    .backend_answers("X-Header-Remove-2", "remove-val-2")
                    .backend_answers("Another-Header", "another-header-val")
                    .by("infra-backend-v1")
                    .responds_with("X-Header-Set-1", "header-set-1")
                    .responds_with("X-Header-Set-2", "header-set-2")
                    .responds_with("X-Header-Add-1", "header-add-1")
                    .responds_with("X-Header-Add-2", "add-val-2,header-add-2")
                    .responds_with("X-Header-Add-3", "header-add-3")
                    .responds_with("Another-Header", "another-header-val")
                    .responds_without("X-Header-Remove-1")
                    .responds_without("X-Header-Remove-2"),
                req("/case-insensitivity")
                    .backend_answers("x-header-set", "original-val-set")
                    .backend_answers("x-header-add", "original-val-add")
                    .backend_answers("x-header-remove", "original-val-remove")
                    .backend_answers("Another-Header", "another-header-val")
                    .by("infra-backend-v1")
                    .responds_with("X-Header-Set", "header-set")
                    .responds_with("X-Header-Add", "original-val-add,header-add")
                    .responds_with("Another-Header", "another-header-val")
                    .responds_without("X-Header-Remove"),
            ],
        ),
        case(
            "HTTPRouteRedirectHostAndStatus",
            "httproute-redirect-host-and-status",
            "same-namespace",
            (INFRA, "redirect-host-and-status"),
            vec![
                req("/hostname-redirect").redirect(302, Some("example.org"), "/hostname-redirect"),
                req("/host-and-status").redirect(301, Some("example.org"), "/host-and-status"),
            ],
        ),
        case(
            "HTTPRouteRequestMirror",
            "httproute-request-mirror",
            "same-namespace",
            (INFRA, "request-mirror"),
            vec![
                req("/mirror").by("infra-backend-v1").mirrored_to("n1-p2"),
                req("/mirror-and-modify-headers")
                    .header("X-Header-Remove", "remove-val")
                    .header("X-Header-Add-Append", "append-val-1")
                    .by("infra-backend-v1")
                    .seen_header("X-Header-Set", "set-overwrites-values")
                    .seen_header("X-Header-Add", "header-val-1")
                    .seen_header("X-Header-Add-Append", "append-val-1,header-val-2")
                    .absent("X-Header-Remove")
                    .mirrored_to("n1-p2"),
            ],
        ),
        case(
            "HTTPRouteListenerHostnameMatching",
            "httproute-listener-hostname-matching",
            "httproute-listener-hostname-matching",
            (INFRA, "backend-v3"),
            vec![
                req("/").host("bar.com").by("infra-backend-v1"),
                req("/").host("foo.bar.com").by("infra-backend-v2"),
                req("/").host("baz.bar.com").by("infra-backend-v3"),
                req("/").host("boo.bar.com").by("infra-backend-v3"),
                req("/").host("multiple.prefixes.bar.com").by("infra-backend-v3"),
                req("/").host("multiple.prefixes.foo.com").by("infra-backend-v3"),
                req("/").host("foo.com").status(404),
                req("/").host("no.matching.host").status(404),
            ],
        ),
        case(
            "HTTPRouteHostnameIntersection",
            "httproute-hostname-intersection",
            "httproute-hostname-intersection",
            (INFRA, "wildcard-host-matches-listener-wildcard-host"),
            vec![
                req("/s1").host("very.specific.com").by("infra-backend-v1"),
                req("/s1").host("very.specific.com:1234").by("infra-backend-v1"),
                req("/s1").host("non.matching.com").status(404),
                req("/s1").host("foo.nonmatchingwildcard.io").status(404),
                req("/s1").host("foo.wildcard.io").status(404),
                req("/non-matching-prefix").host("very.specific.com").status(404),
                req("/s2").host("foo.wildcard.io").by("infra-backend-v2"),
                req("/s2").host("bar.wildcard.io").by("infra-backend-v2"),
                req("/s2").host("foo.bar.wildcard.io").by("infra-backend-v2"),
                req("/s2").host("non.matching.com").status(404),
                req("/s2").host("wildcard.io").status(404),
                req("/s2").host("very.specific.com").status(404),
                req("/non-matching-prefix").host("foo.wildcard.io").status(404),
                req("/s3").host("very.specific.com").by("infra-backend-v3"),
                req("/s3").host("non.matching.com").status(404),
                req("/s3").host("foo.specific.com").status(404),
                req("/s3").host("foo.wildcard.io").status(404),
                req("/s4").host("foo.anotherwildcard.io").by("infra-backend-v1"),
                req("/s4").host("bar.anotherwildcard.io").by("infra-backend-v1"),
                req("/s4").host("foo.bar.anotherwildcard.io").by("infra-backend-v1"),
                req("/s4").host("anotherwildcard.io").status(404),
                req("/s4").host("foo.wildcard.io").status(404),
                req("/s4").host("very.specific.com").status(404),
                req("/non-matching-prefix").host("foo.anotherwildcard.io").status(404),
                req("/s5").host("specific.but.wrong.com").status(404),
                req("/s5").host("wildcard.io").status(404),
            ],
        ),
        case(
            "HTTPRouteHostnameIntersection (a listener without hostname)",
            "httproute-hostname-intersection",
            "httproute-hostname-intersection-all",
            (INFRA, "httproute-hostname-intersection-all"),
            vec![
                req("/").host("first.com").by("infra-backend-v2"),
                req("/").host("sub.first.com").by("infra-backend-v2"),
                req("/").host("second.com").by("infra-backend-v2"),
                req("/").host("sub.second.com").by("infra-backend-v2"),
                req("/").host("third.com").status(404),
                req("/").host("sub.third.com").status(404),
            ],
        ),
        case(
            "HTTPRouteRedirectPath",
            "httproute-redirect-path",
            "same-namespace",
            (INFRA, "redirect-path"),
            vec![
                req("/original-prefix/lemon").redirect(302, None, "/replacement-prefix/lemon"),
                req("/full/path/original").redirect(302, None, "/full-path-replacement"),
                req("/path-and-host").redirect(302, Some("example.org"), "/replacement-prefix"),
                req("/path-and-status").redirect(301, None, "/replacement-prefix"),
                req("/full-path-and-host").redirect(302, Some("example.org"), "/replacement-full"),
                req("/full-path-and-status").redirect(301, None, "/replacement-full"),
            ],
        ),
        case(
            "HTTPRouteRewritePath",
            "httproute-rewrite-path",
            "same-namespace",
            (INFRA, "rewrite-path"),
            vec![
                req("/prefix/one/two").by("infra-backend-v1").seen("/one/two"),
                req("/full/one/two").by("infra-backend-v1").seen("/one"),
                req("/full/rewrite-path-and-modify-headers/test")
                    .header("X-Header-Remove", "remove-val")
                    .header("X-Header-Add-Append", "append-val-1")
                    .header("X-Header-Set", "set-val")
                    .by("infra-backend-v1")
                    .seen("/test")
                    .seen_header("X-Header-Add", "header-val-1")
                    .seen_header("X-Header-Add-Append", "append-val-1,header-val-2")
                    .seen_header("X-Header-Set", "set-overwrites-values")
                    .absent("X-Header-Remove"),
                req("/prefix/rewrite-path-and-modify-headers/one")
                    .header("X-Header-Remove", "remove-val")
                    .header("X-Header-Add-Append", "append-val-1")
                    .header("X-Header-Set", "set-val")
                    .by("infra-backend-v1")
                    .seen("/prefix/one")
                    .seen_header("X-Header-Add", "header-val-1")
                    .seen_header("X-Header-Add-Append", "append-val-1,header-val-2")
                    .seen_header("X-Header-Set", "set-overwrites-values")
                    .absent("X-Header-Remove"),
            ],
        ),
        case(
            "HTTPRoutePathMatchOrder",
            "httproute-path-match-order",
            "same-namespace",
            (INFRA, "path-matching-order"),
            vec![
                req("/match/exact/one").by("infra-backend-v3"),
                req("/match/exact").by("infra-backend-v2"),
                req("/match").by("infra-backend-v1"),
                req("/match/prefix/one/any").by("infra-backend-v2"),
                req("/match/prefix/any").by("infra-backend-v1"),
                req("/match/any").by("infra-backend-v3"),
            ],
        ),
        case(
            "HTTPRouteInvalidCrossNamespaceBackendRef",
            "httproute-invalid-cross-namespace-backend-ref",
            "same-namespace",
            (INFRA, "invalid-cross-namespace-backend-ref"),
            vec![req("/").status(500)],
        )
        .unresolved("RefNotPermitted"),
        case(
            "HTTPRouteInvalidNonExistentBackendRef",
            "httproute-invalid-nonexistent-backendref",
            "same-namespace",
            (INFRA, "invalid-nonexistent-backend-ref"),
            vec![req("/").status(500)],
        )
        .unresolved("BackendNotFound"),
        case(
            "HTTPRouteInvalidBackendRefUnknownKind",
            "httproute-invalid-backendref-unknown-kind",
            "same-namespace",
            (INFRA, "invalid-backend-ref-unknown-kind"),
            vec![req("/").status(500)],
        )
        .unresolved("InvalidKind"),
        case(
            "HTTPRoutePartiallyInvalidViaInvalidReferenceGrant",
            "httproute-partially-invalid-via-invalid-reference-grant",
            "same-namespace",
            (INFRA, "invalid-reference-grant"),
            vec![req("/v2").status(500), req("/").by_in(APP, "app-backend-v1")],
        )
        .unresolved("RefNotPermitted"),
        case(
            "HTTPRouteRedirectScheme",
            "httproute-redirect-scheme",
            "same-namespace",
            (INFRA, "redirect-scheme"),
            vec![
                req("/scheme").redirect(302, None, "/scheme").redirect_scheme("https"),
                req("/scheme-and-host").redirect(302, Some("example.org"), "/scheme-and-host").redirect_scheme("https"),
                req("/scheme-and-status").redirect(301, None, "/scheme-and-status").redirect_scheme("https"),
                req("/scheme-and-host-and-status")
                    .redirect(302, Some("example.org"), "/scheme-and-host-and-status")
                    .redirect_scheme("https"),
            ],
        ),
        case(
            "HTTPRouteRedirectPort",
            "httproute-redirect-port",
            "same-namespace",
            (INFRA, "redirect-port"),
            vec![
                req("/port").redirect(302, None, "/port").redirect_port("8083"),
                req("/port-and-host").redirect(302, Some("example.org"), "/port-and-host").redirect_port("8083"),
                req("/port-and-status").redirect(301, None, "/port-and-status").redirect_port("8083"),
                req("/port-and-host-and-status")
                    .redirect(302, Some("example.org"), "/port-and-host-and-status")
                    .redirect_port("8083"),
            ],
        ),
        case(
            "HTTPRouteTimeoutRequest",
            "httproute-timeout-request",
            "same-namespace",
            (INFRA, "request-timeout"),
            vec![
                req("/request-timeout").by("infra-backend-v1"),
                req("/request-timeout?delay=1s").status(504),
                req("/disable-request-timeout?delay=1s").by("infra-backend-v1"),
            ],
        ),
        // Both backends answer (their endpoints have reached Envoy) before the count.
        case(
            "HTTPRouteWeight",
            "httproute-weight",
            "same-namespace",
            (INFRA, "weighted-backends"),
            vec![req("/").by("infra-backend-v1"), req("/").by("infra-backend-v2")],
        )
        .distribution(&[("infra-backend-v1", 70), ("infra-backend-v2", 30), ("infra-backend-v3", 0)]),
        case(
            "HTTPRouteHTTPSListener",
            "httproute-https-listener",
            "same-namespace-with-https-listener",
            (INFRA, "httproute-https-test"),
            vec![
                req("/").host("example.org").over_tls().by("infra-backend-v1"),
                req("/").host("unknown-example.org").over_tls().status(404),
                req("/").host("second-example.org").over_tls().by("infra-backend-v2"),
            ],
        ),
        case(
            "HTTPRouteBackendProtocolH2C",
            "httproute-backend-protocol-h2c",
            "same-namespace",
            (INFRA, "backend-protocol-h2c"),
            vec![req("/").h2c().by("infra-backend-v1")],
        ),
    ]
}

/// One gRPC call of a GRPCRoute case: the method of the echo service, the
/// metadata sent, the Deployment that must answer (None: the call must end
/// UNIMPLEMENTED, no rule matching it).
struct Call {
    method: &'static str,
    metadata: Vec<(&'static str, &'static str)>,
    backend: Option<&'static str>,
}

fn call(method: &'static str) -> Call {
    Call { method, metadata: Vec::new(), backend: None }
}

impl Call {
    fn meta(mut self, k: &'static str, v: &'static str) -> Self {
        self.metadata.push((k, v));
        self
    }
    fn by(mut self, backend: &'static str) -> Self {
        self.backend = Some(backend);
        self
    }
    /// Whether `answer` is what the suite expects; why not.
    fn check(&self, answer: &Result<weft_tests::h2::EchoResponse, tonic::Status>) -> Result<(), String> {
        match (self.backend, answer) {
            (Some(b), Ok(r)) if r.pod().starts_with(&format!("{b}-")) && r.namespace() == INFRA => Ok(()),
            (None, Err(s)) if s.code() == tonic::Code::Unimplemented => Ok(()),
            (want, got) => Err(format!("expected {want:?} (None: UNIMPLEMENTED), got {got:?}")),
        }
    }
}

/// A GRPCRoute conformance test: name, file, route name (the Gateway is
/// same-namespace), calls, the weights of a split to measure.
type GrpcCase = (&'static str, &'static str, &'static str, Vec<Call>, Vec<(&'static str, u32)>);

fn grpc_cases() -> Vec<GrpcCase> {
    let (v1, v2) = ("grpc-infra-backend-v1", "grpc-infra-backend-v2");
    vec![
        (
            "GRPCExactMethodMatching",
            "grpcroute-exact-method-matching",
            "exact-matching",
            vec![call("Echo").by(v1), call("EchoTwo").by(v2), call("EchoThree")],
            vec![],
        ),
        (
            "GRPCRouteHeaderMatching",
            "grpcroute-header-matching",
            "grpc-header-matching",
            vec![
                call("Echo").meta("Version", "one").by(v1),
                call("Echo").meta("Version", "two").by(v2),
                call("Echo").meta("Version", "two").meta("Color", "orange").by(v1),
                call("Echo").meta("Version", "two").meta("Color", "blue").by(v2),
                call("Echo").meta("Color", "orange"),
                call("Echo").meta("Some-Other-Header", "one"),
                call("Echo").meta("Color", "blue").by(v1),
                call("Echo").meta("Color", "green").by(v1),
                call("Echo").meta("Color", "red").by(v2),
                call("Echo").meta("Color", "yellow").by(v2),
                call("Echo").meta("Color", "purple"),
            ],
            vec![],
        ),
        // Both backends answer (their endpoints have reached Envoy) before the count.
        (
            "GRPCRouteWeight",
            "grpcroute-weight",
            "weighted-backends",
            vec![call("Echo").by(v1), call("Echo").by(v2)],
            vec![(v1, 70), (v2, 30), ("grpc-infra-backend-v3", 0)],
        ),
    ]
}

/// Applies a case's file, gives its Gateway an address if it is not one
/// of the shared ones, and waits until weft accepts the route for its
/// generation; returns the text applied.
fn apply_case(
    cp: &ControlPlane,
    test: &str,
    file: &str,
    gateway: &str,
    (kind, route): (&str, (&str, &str)),
    unresolved: Option<&str>,
) -> String {
    let yaml = conformance_text(&format!("tests/{file}.yaml"));
    cp.apply(&yaml);
    if !["same-namespace", "backend-namespaces"].contains(&gateway) {
        assign_address(cp, gateway);
    }
    wait_for(&format!("{test}: the route accepted"), 60, || route_ready(cp, kind, route, gateway, unresolved));
    yaml
}

/// Deletes what [`apply_case`] applied.
fn delete_case(cp: &ControlPlane, test: &str, yaml: &str) {
    let out = cp.kubectl_as(&cp.admin_kubeconfig(), &["delete", "-f", "-"], Some(yaml));
    assert!(out.status.success(), "{test}: delete: {}", String::from_utf8_lossy(&out.stderr));
}

/// The backend (of `weights`) a pod name belongs to, or the pod name.
fn backend_of(pod: &str, weights: &[(&str, u32)]) -> String {
    weights.iter().map(|w| w.0).find(|b| pod.starts_with(&format!("{b}-"))).unwrap_or(pod).to_owned()
}

/// A self-signed certificate (EC P-256) for [`CERT_HOSTS`] in `dir`, as
/// [`CERT_SECRET`] in gateway-conformance-infra; returns the certificate's path.
fn make_cert_secret(cp: &ControlPlane, dir: &std::path::Path) -> std::path::PathBuf {
    let (crt, key) = weft_tests::objects::self_signed_cert(dir, "gateway-tls", &CERT_HOSTS);
    let (c, k) = (format!("--cert={}", crt.display()), format!("--key={}", key.display()));
    cp.kubectl_ok(&["create", "secret", "tls", CERT_SECRET, "-n", INFRA, &c, &k]);
    crt
}

/// Whether every condition of `conditions` is for `obj`'s generation.
fn latest(obj: &Value, conditions: &Value) -> bool {
    conditions
        .as_array()
        .is_some_and(|c| !c.is_empty() && c.iter().all(|c| c["observedGeneration"] == obj["metadata"]["generation"]))
}

/// A Gateway whose conditions, and its listeners', are for its generation.
fn gateway_latest(g: &Value) -> bool {
    latest(g, &g["status"]["conditions"])
        && g["status"]["listeners"].as_array().is_some_and(|l| l.iter().all(|l| latest(g, &l["conditions"])))
}

/// A listener's status in one line: `<name> Accepted=True ResolvedRefs=False:<reason>
/// Programmed=... attached=<n> kinds=<kind,...>`.
fn listener_line(l: &Value) -> String {
    let c = |t| {
        condition(&l["conditions"], t)
            .map(|c| if c.0 == "True" { c.0 } else { format!("{}:{}", c.0, c.1) })
            .unwrap_or_default()
    };
    let kinds: Vec<&str> = l["supportedKinds"]
        .as_array()
        .map(|k| k.iter().filter_map(|k| k["kind"].as_str()).collect())
        .unwrap_or_default();
    format!(
        "{} Accepted={} ResolvedRefs={} Programmed={} attached={} kinds={}",
        l["name"].as_str().unwrap_or_default(),
        c("Accepted"),
        c("ResolvedRefs"),
        c("Programmed"),
        l["attachedRoutes"],
        kinds.join(",")
    )
}

/// Whether a [`listener_line`] has `part`: a field of it, but `kinds=A,B`
/// asks only that those kinds be among the supported ones (as the suite
/// does; weft's HTTP listeners take GRPCRoutes too) and `kinds=` that there
/// be none.
fn has_part(line: &str, part: &str) -> bool {
    let Some(want) = part.strip_prefix("kinds=") else {
        return line.split(' ').any(|f| f == part);
    };
    let have = line.split(' ').find_map(|f| f.strip_prefix("kinds=")).unwrap_or_default();
    if want.is_empty() {
        return have.is_empty();
    }
    want.split(',').all(|k| have.split(',').any(|h| h == k))
}

/// Waits until Gateway `name`'s status is for its generation (`newer_than`:
/// a generation after that one) and its listeners, in order, each have every
/// part of `want` (parts of [`listener_line`]); returns the Gateway.
fn listeners_become(cp: &ControlPlane, test: &str, name: &str, newer_than: Option<&Value>, want: &[&[&str]]) -> Value {
    let mut seen = Vec::new();
    let found = (0..600).find_map(|_| {
        let g = get(cp, "gateway", Some(INFRA), name).filter(|g| {
            gateway_latest(g)
                && newer_than.is_none_or(|old| g["metadata"]["generation"] != old["metadata"]["generation"])
        });
        if let Some(g) = g {
            seen =
                g["status"]["listeners"].as_array().map(|l| l.iter().map(listener_line).collect()).unwrap_or_default();
            let fits = seen.len() == want.len()
                && seen.iter().zip(want).all(|(line, parts)| parts.iter().all(|p| has_part(line, p)));
            if fits {
                return Some(g);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        None
    });
    found.unwrap_or_else(|| panic!("{test}: Gateway {name}'s listeners {seen:#?}, expected {want:?}"))
}

/// One request of `e` to the Gateway at `ip` on a new connection from the
/// lab's external client: HTTP/1.1 from this process; HTTPS (the
/// certificate `cert` verified, the host as SNI) and h2c by curl.
fn send(lab: &Lab, ip: Ipv4Addr, host: &str, e: &Expect, cert: &std::path::Path) -> Result<Response, String> {
    let set: Vec<String> = e.backend_answers.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    let set = set.join(",");
    let mut headers: Vec<(&str, &str)> = e.headers.to_vec();
    if !set.is_empty() {
        headers.push(("X-Echo-Set-Header", &set));
    }
    if !e.tls && !e.h2c {
        headers.push(("connection", "close"));
        return Client::connect(&lab.ext_netns, sa_of(ip, 80), None, T)
            .and_then(|mut c| c.request(e.method, host, e.path, &headers))
            .map_err(|err| err.to_string());
    }
    let mut curl = Command::new("curl");
    curl.args(["-s", "--max-time", "5", "-X", e.method, "-w", "\n%{http_code} %{http_version}"]);
    for (k, v) in &headers {
        curl.arg("-H").arg(format!("{k}: {v}"));
    }
    if e.tls {
        curl.arg("--cacert").arg(cert).arg("--resolve").arg(format!("{host}:443:{ip}"));
        curl.arg(format!("https://{host}{}", e.path));
    } else {
        curl.args(["--http2-prior-knowledge", "-H", &format!("host: {host}")]).arg(format!("http://{ip}{}", e.path));
    }
    let out = lab.run(&lab.ext_netns, None, &mut curl, Duration::from_secs(10)).map_err(|err| err.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, last) =
        text.rsplit_once('\n').ok_or_else(|| format!("curl: {}", String::from_utf8_lossy(&out.stderr)))?;
    let (status, version) = last.split_once(' ').unwrap_or((last, ""));
    if e.h2c && version != "2" {
        return Err(format!("HTTP version {version:?}, not 2"));
    }
    let status = status.parse().map_err(|_| format!("curl: {last:?} {}", String::from_utf8_lossy(&out.stderr)))?;
    Ok(Response { status, headers: Vec::new(), body: body.to_owned() })
}

/// The route's parent entry from weft for `gateway`, for the route's
/// generation: Accepted True, and ResolvedRefs True or, with `unresolved`,
/// False for that reason.
fn route_ready(
    cp: &ControlPlane,
    kind: &str,
    (ns, name): (&str, &str),
    gateway: &str,
    unresolved: Option<&str>,
) -> Option<()> {
    let r = get(cp, kind, Some(ns), name)?;
    let p = r["status"]["parents"].as_array()?.iter().find(|p| {
        p["controllerName"] == weft_agent::operator::gateway::CONTROLLER && p["parentRef"]["name"] == gateway
    })?;
    let is = |t, status: &str, reason: Option<&str>| {
        condition(&p["conditions"], t)
            .is_some_and(|c| c.0 == status && reason.is_none_or(|r| c.1 == r) && c.3 == r["metadata"]["generation"])
    };
    let refs = match unresolved {
        None => is("ResolvedRefs", "True", None),
        Some(reason) => is("ResolvedRefs", "False", Some(reason)),
    };
    (is("Accepted", "True", None) && refs).then_some(())
}

#[test]
fn conformance_requests_pass_through_the_nodes_envoy_with_agents_reading_the_api_server() {
    require_root!();
    let cp = require_control_plane!(exclusive);
    deploy::rbac(&cp);
    let out = deploy::gateway_api_crds(&cp);
    assert!(!out.to_lowercase().contains("error"), "{out}");
    if let Some(reason) = cni::skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let mut lab = Lab::with_pods(PodNetwork::Cni).unwrap();
    for (pod, _, _, _) in BACKENDS {
        if !lab.pods.iter().any(|p| p.name == pod) {
            let node = if pod.starts_with("n1-") { 0 } else { 1 };
            let added = lab.add_extra_pod(node).unwrap();
            assert_eq!(added.name, pod, "pods are added in order");
        }
    }
    let lab = lab;

    // The API server at 127.0.0.1:6443 inside each node, for the agents (as
    // their DaemonSet's ServiceAccount).
    let upstream: std::net::SocketAddr =
        cp.server_url().trim_start_matches("https://").parse().expect("the server URL is an address");
    let _relays: Vec<ApiRelay> = lab
        .nodes
        .iter()
        .map(|n| ApiRelay::start(Some(&netns::named(&n.netns)), NODE_API_PORT, upstream).unwrap())
        .collect();
    let sa = cp.service_account_kubeconfig("weft-system", "weft-agent", None).unwrap();
    let kubeconfig = lab.run_dir.join("agent.kubeconfig");
    let text =
        std::fs::read_to_string(&sa).unwrap().replace(&cp.server_url(), &format!("https://127.0.0.1:{NODE_API_PORT}"));
    std::fs::write(&kubeconfig, text).unwrap();

    // The nodes; the suite's class, base objects (namespaces, Gateways,
    // echo Deployments and Services) unchanged.
    for n in &lab.nodes {
        cp.apply(&format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {}, labels: {{kubernetes.io/hostname: {}}}}}\n",
            n.name, n.name
        ));
        let patch = json!({"status": {"addresses": [{"type": "InternalIP", "address": n.ip.to_string()}]}}).to_string();
        cp.kubectl_ok(&["patch", "node", &n.name, "--subresource=status", "--type=merge", "-p", &patch]);
    }
    cp.apply("apiVersion: gateway.networking.k8s.io/v1\nkind: GatewayClass\nmetadata: {name: weft}\nspec: {controllerName: weft.io/gateway-controller}\n");
    cp.apply(&conformance_text("base-manifests.yaml"));
    let cert = make_cert_secret(&cp, &lab.run_dir);

    // This test is the scheduler and kubelet: one replica of each echo
    // Deployment is bound to the lab pod's node; once the agents run, the
    // pod comes up there through the CNI chain (an echo server in the lab
    // pod) and is reported Running and Ready with the chain's address.
    let mut bound = Vec::new();
    for (lab_pod, ns, deployment, _) in BACKENDS {
        let pod = lab.pod(lab_pod);
        let name = wait_for(&format!("a pod of {ns}/{deployment}"), 60, || {
            let out = cp.kubectl(&["get", "pods", "-n", ns, "-l", &format!("app={deployment}"), "-o", "json"]);
            let list: Value = serde_json::from_slice(&out.stdout).ok()?;
            let mut names: Vec<String> = list["items"]
                .as_array()?
                .iter()
                .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
                .collect();
            names.sort();
            names.into_iter().next()
        });
        let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "namespace": ns},
                             "target": {"apiVersion": "v1", "kind": "Node", "name": lab.node(pod.node).name}});
        let out = cp.kubectl_as(&cp.admin_kubeconfig(), &["create", "-f", "-"], Some(&binding.to_string()));
        assert!(out.status.success(), "binding {name}: {}", String::from_utf8_lossy(&out.stderr));
        bound.push(name);
    }

    // The operator (in this process) and an agent with its Envoy on each node.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let client = rt.block_on(cp.client());
    let opts = weft_agent::operator::OperatorOptions {
        namespace: "weft-system".into(),
        identity: "gateway-lab-operator".into(),
        lease_duration: Duration::from_secs(1),
        ..Default::default()
    };
    let operator = rt.spawn(async move {
        if let Err(e) = weft_agent::operator::run(client, opts).await {
            eprintln!("operator stopped: {e:#}");
        }
    });
    let socket = |i: usize| lab.run_dir.join(format!("cni{i}.sock"));
    let extra = |i: usize| {
        format!(
            "kubernetes:\n  enabled: true\n  kubeconfig: {}\nenvoy:\n  enabled: true\ncni-socket: {}\n",
            kubeconfig.display(),
            socket(i).display()
        )
    };
    let files: Vec<_> = (0..2).map(|i| agent_files(&lab, i, &extra(i)).unwrap()).collect();
    let pids: Vec<u32> = files
        .iter()
        .enumerate()
        .map(|(i, f)| start_agent(&lab, i, f, &lab.run_dir.join(format!("agent{i}.log"))).unwrap())
        .collect();
    let logs = || {
        let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let tail =
            |s: String| s.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
        let status = weft_tests::objects::agent_status(&lab, 0).map(|s| s["control"].clone()).unwrap_or_default();
        let admin = |path: &str| {
            Client::connect(&lab.node(0).netns, "127.0.0.1:9901".parse().unwrap(), None, T)
                .and_then(|mut c| c.get("admin", path, &[("connection", "close")]))
                .map(|r| r.body)
                .unwrap_or_default()
        };
        eprintln!("--- envoy0 stats\n{}", admin("/stats?filter=(listener|http\\.gateway|cluster\\.gateway)"));
        eprintln!("--- envoy0 config\n{}", admin("/config_dump?resource=dynamic_listeners"));
        eprintln!("--- envoy0 routes\n{}", admin("/config_dump?resource=dynamic_route_configs"));
        format!(
            "--- agent0 control status\n{status:#}\n--- agent0 log\n{}\n--- envoy0 log\n{}",
            tail(read(lab.run_dir.join("agent0.log"))),
            tail(read(files[0].state_dir.join("envoy.log")))
        )
    };
    for (i, f) in files.iter().enumerate() {
        wait_ready(f, Duration::from_secs(60), || lab.running(pids[i])).unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    }

    let (mut servers, mut h2_servers) = (Vec::new(), Vec::new());
    for ((lab_pod, ns, deployment, serves), name) in BACKENDS.into_iter().zip(bound) {
        let pod = lab.pod(lab_pod);
        let node = lab.node(pod.node);
        let ptp = weft_tests::lab::lab_ptp_conf(&lab, pod.node, &lab.run_dir);
        let added = weft_tests::lab::add_lab_pod(pod, &node.netns, ns, &name, &ptp, &socket(pod.node))
            .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
        let ip = added.ip.to_string();
        let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}]}});
        cp.kubectl_ok(&[
            "patch",
            "pod",
            &name,
            "-n",
            ns,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ]);
        let echo = EchoPod { namespace: ns.into(), pod: name.clone() };
        match serves {
            Serves::Http => {
                let opts = ServerOpts { name: name.clone(), echo: Some(echo.clone()), ..Default::default() };
                servers.push((lab_pod, HttpServer::start(&pod.netns, sa_of(pod.ip, 3000), opts).unwrap()));
            }
            Serves::Grpc => {
                h2_servers.push(H2Server::start(&pod.netns, sa_of(pod.ip, 3000), H2Echo::Grpc(echo.clone())).unwrap());
            }
        }
        if deployment == "infra-backend-v1" {
            h2_servers.push(H2Server::start(&pod.netns, sa_of(pod.ip, H2C_PORT), H2Echo::Http(echo)).unwrap());
        }
    }

    // The lab's load balancer: an address for each Gateway's Service.
    assign_address(&cp, "same-namespace");
    assign_address(&cp, "backend-namespaces");

    let ext = lab.ext_netns.clone();
    for Case { test, file, gateway, route, unresolved, expects, distribution } in cases() {
        let yaml = apply_case(&cp, test, file, gateway, ("httproute", route), unresolved);
        let ip = gateway_address(gateway);
        let address = ip.to_string();
        for e in &expects {
            let host = e.host.unwrap_or(&address);
            let mirror = e.mirrored_to.map(|p| &servers.iter().find(|s| s.0 == p).expect("an HTTP backend pod").1);
            let mirrored_before = mirror.map(|m| m.served.load(std::sync::atomic::Ordering::SeqCst));
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let answer = send(&lab, ip, host, e, &cert)
                    .and_then(|r| e.check(host, &r).map_err(|why| format!("{why}; {r:?}")));
                match answer {
                    Ok(()) => {
                        if let (Some(m), Some(before)) = (mirror, mirrored_before) {
                            wait_for(&format!("{test}: {} mirrored", e.path), 10, || {
                                (m.served.load(std::sync::atomic::Ordering::SeqCst) > before).then_some(())
                            });
                        }
                        break;
                    }
                    Err(why) if Instant::now() > deadline => {
                        panic!("{test}: {} {} {:?}: {why}\n{}", e.method, e.path, e.headers, logs())
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        }
        if !distribution.is_empty() {
            let e = &expects[0];
            let host = e.host.unwrap_or(&address);
            let mut counts = BTreeMap::new();
            let mut client = None;
            for i in 0..SAMPLES {
                // Keep-alive connections (Envoy picks a backend per request), a new one every 50 requests.
                let c = match &mut client {
                    Some(c) if i % 50 != 0 => c,
                    _ => client.insert(
                        Client::connect(&ext, sa_of(ip, 80), None, T).unwrap_or_else(|err| panic!("{test}: {err}")),
                    ),
                };
                let r =
                    c.request(e.method, host, e.path, &[]).unwrap_or_else(|err| panic!("{test}: request {i}: {err}"));
                assert_eq!(r.status, 200, "{test}: request {i}: {r:?}");
                let backend = backend_of(r.json()["pod"].as_str().unwrap_or_default(), &distribution);
                *counts.entry(backend).or_insert(0) += 1;
            }
            check_distribution(&counts, &distribution).unwrap_or_else(|why| panic!("{test}: {why}; {counts:?}"));
            eprintln!("{test}: {counts:?} of {SAMPLES} requests");
        }
        delete_case(&cp, test, &yaml);
    }

    // GRPCRoutes: gRPC from the external client (tonic) through the Envoy
    // listener on port 80, to the gRPC echo pods over h2c.
    let gateway = sa_of(gateway_address("same-namespace"), 80);
    for (test, file, route, calls, distribution) in grpc_cases() {
        let yaml = apply_case(&cp, test, file, "same-namespace", ("grpcroute", (INFRA, route)), None);
        for c in &calls {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let answer = rt.block_on(async {
                    let mut client = GrpcClient::connect(&ext, gateway, T).await?;
                    client.echo(c.method, &c.metadata).await
                });
                match c.check(&answer) {
                    Ok(()) => break,
                    Err(why) if Instant::now() > deadline => {
                        panic!("{test}: {} {:?}: {why}\n{}", c.method, c.metadata, logs())
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        }
        if !distribution.is_empty() {
            // One HTTP/2 connection per 50 calls (Envoy picks a backend per call).
            let counts = rt.block_on(async {
                let mut counts = BTreeMap::new();
                for batch in 0..SAMPLES / 50 {
                    let mut client = GrpcClient::connect(&ext, gateway, T)
                        .await
                        .unwrap_or_else(|s| panic!("{test}: connection {batch}: {s:?}"));
                    for i in 0..50 {
                        let r = client
                            .echo(calls[0].method, &[])
                            .await
                            .unwrap_or_else(|s| panic!("{test}: call {i}: {s:?}"));
                        *counts.entry(backend_of(r.pod(), &distribution)).or_insert(0) += 1;
                    }
                }
                counts
            });
            check_distribution(&counts, &distribution).unwrap_or_else(|why| panic!("{test}: {why}; {counts:?}"));
            eprintln!("{test}: {counts:?} of {SAMPLES} calls");
        }
        delete_case(&cp, test, &yaml);
    }

    // The conformance tests of status alone (they send no requests): their
    // objects applied unchanged, the status weft writes read back as the
    // suite checks it.
    let test = "GatewayClassObservedGenerationBump";
    let yaml = conformance_text("tests/gatewayclass-observed-generation-bump.yaml");
    cp.apply(&yaml);
    let class = "gatewayclass-observed-generation-bump";
    let accepted = |c: &Value| {
        condition(&c["status"]["conditions"], "Accepted")
            .is_some_and(|a| a.0 == "True" && a.3 == c["metadata"]["generation"])
    };
    let before = wait_for(test, 60, || get(&cp, "gatewayclass", None, class).filter(|c| accepted(c)));
    cp.kubectl_ok(&["patch", "gatewayclass", class, "--type=merge", "-p", r#"{"spec":{"description":"new"}}"#]);
    wait_for(&format!("{test}: the new generation accepted"), 60, || {
        get(&cp, "gatewayclass", None, class)
            .filter(|c| c["metadata"]["generation"] != before["metadata"]["generation"] && accepted(c))
    });
    delete_case(&cp, test, &yaml);

    let test = "GatewayObservedGenerationBump";
    let yaml = conformance_text("tests/gateway-observed-generation-bump.yaml");
    cp.apply(&yaml);
    let name = "gateway-observed-generation-bump";
    let http = ["Accepted=True", "ResolvedRefs=True", "kinds=HTTPRoute"];
    let before = listeners_become(&cp, test, name, None, &[&http]);
    let add = r#"[{"op":"add","path":"/spec/listeners/-","value":{"name":"alternate","port":8080,"protocol":"HTTP"}}]"#;
    cp.kubectl_ok(&["patch", "gateway", name, "-n", INFRA, "--type=json", "-p", add]);
    listeners_become(&cp, test, name, Some(&before), &[&http, &http]);
    delete_case(&cp, test, &yaml);

    let test = "GatewayModifyListeners";
    let yaml = conformance_text("tests/gateway-modify-listeners.yaml");
    cp.apply(&yaml);
    let routed = ["Accepted=True", "ResolvedRefs=True", "attached=1", "kinds=HTTPRoute"];
    let before = listeners_become(&cp, test, "gateway-add-listener", None, &[&routed]);
    let add = r#"[{"op":"add","path":"/spec/listeners/-","value":{"name":"http","port":80,"protocol":"HTTP","hostname":"data.test.com","allowedRoutes":{"namespaces":{"from":"All"}}}}]"#;
    cp.kubectl_ok(&["patch", "gateway", "gateway-add-listener", "-n", INFRA, "--type=json", "-p", add]);
    let https: Vec<&str> = ["https"].into_iter().chain(routed).collect();
    let http: Vec<&str> = ["http"].into_iter().chain(routed).collect();
    listeners_become(&cp, test, "gateway-add-listener", Some(&before), &[&https, &http]);
    let before = listeners_become(&cp, test, "gateway-remove-listener", None, &[&routed, &routed]);
    let remove =
        r#"[{"op":"test","path":"/spec/listeners/0/name","value":"https"},{"op":"remove","path":"/spec/listeners/0"}]"#;
    cp.kubectl_ok(&["patch", "gateway", "gateway-remove-listener", "-n", INFRA, "--type=json", "-p", remove]);
    let after = listeners_become(&cp, test, "gateway-remove-listener", Some(&before), &[&routed]);
    assert_eq!(after["status"]["listeners"][0]["name"], "http", "{test}");
    delete_case(&cp, test, &yaml);

    let test = "GatewayWithAttachedRoutes";
    let yaml = conformance_text("tests/gateway-with-attached-routes.yaml");
    cp.apply(&yaml);
    listeners_become(&cp, test, "gateway-with-one-attached-route", None, &[&routed]);
    let two = ["Accepted=True", "ResolvedRefs=True", "attached=2", "kinds=HTTPRoute"];
    listeners_become(&cp, test, "gateway-with-two-attached-routes", None, &[&two]);
    let unresolved = ["ResolvedRefs=False:InvalidCertificateRef", "Programmed=False:Invalid", "attached=1"];
    listeners_become(&cp, test, "unresolved-gateway-with-one-attached-unresolved-route", None, &[&unresolved]);
    wait_for(&format!("{test}: http-route-not-accepted"), 60, || {
        let r = get(&cp, "httproute", Some(INFRA), "http-route-not-accepted")?;
        let p = r["status"]["parents"].as_array()?.first()?.clone();
        condition(&p["conditions"], "Accepted").filter(|c| c.0 == "False" && c.1 == "NoMatchingListenerHostname")
    });
    delete_case(&cp, test, &yaml);

    let test = "GatewayInvalidRouteKind";
    let yaml = conformance_text("tests/gateway-invalid-route-kind.yaml");
    cp.apply(&yaml);
    let none = ["ResolvedRefs=False:InvalidRouteKinds", "attached=0", "kinds="];
    listeners_become(&cp, test, "gateway-only-invalid-route-kind", None, &[&none]);
    let some = ["ResolvedRefs=False:InvalidRouteKinds", "kinds=HTTPRoute"];
    listeners_become(&cp, test, "gateway-supported-and-invalid-route-kind", None, &[&some]);
    delete_case(&cp, test, &yaml);

    // The suite makes this Secret in code, in the Secret's namespace.
    let test = "GatewaySecretReferenceGrantSpecific";
    let (c, k) = (format!("--cert={}", cert.display()), format!("--key={}", cert.with_extension("key").display()));
    cp.kubectl_ok(&["create", "secret", "tls", "certificate", "-n", "gateway-conformance-web-backend", &c, &k]);
    let yaml = conformance_text("tests/gateway-secret-reference-grant-specific.yaml");
    cp.apply(&yaml);
    assign_address(&cp, "gateway-secret-reference-grant-specific");
    let served = ["Accepted=True", "ResolvedRefs=True", "Programmed=True", "attached=0"];
    listeners_become(&cp, test, "gateway-secret-reference-grant-specific", None, &[&served]);
    delete_case(&cp, test, &yaml);

    let test = "HTTPRouteObservedGenerationBump";
    let yaml = apply_case(
        &cp,
        test,
        "httproute-observed-generation-bump",
        "same-namespace",
        ("httproute", (INFRA, "observed-generation-bump")),
        None,
    );
    let before = get(&cp, "httproute", Some(INFRA), "observed-generation-bump").unwrap();
    let bump = r#"{"spec":{"rules":[{"matches":[{"path":{"type":"PathPrefix","value":"/bump"}}],"backendRefs":[{"name":"infra-backend-v1","port":8080}]}]}}"#;
    cp.kubectl_ok(&["patch", "httproute", "observed-generation-bump", "-n", INFRA, "--type=merge", "-p", bump]);
    wait_for(&format!("{test}: the new generation"), 60, || {
        let r = get(&cp, "httproute", Some(INFRA), "observed-generation-bump")?;
        (r["metadata"]["generation"] != before["metadata"]["generation"]).then_some(())?;
        route_ready(&cp, "httproute", (INFRA, "observed-generation-bump"), "same-namespace", None)
    });
    delete_case(&cp, test, &yaml);

    // Conflicted listeners: reported, not served; the others keep serving.
    cp.apply(CONFLICTS);
    assign_address(&cp, "listener-conflicts");
    let gw = wait_for("listener-conflicts: its listeners' status", 60, || {
        get(&cp, "gateway", Some(INFRA), "listener-conflicts").filter(|g| {
            g["status"]["listeners"].as_array().is_some_and(|l| l.len() == 4)
                && condition(&g["status"]["conditions"], "Accepted").is_some_and(|c| c.3 == g["metadata"]["generation"])
        })
    });
    let listeners = gw["status"]["listeners"].as_array().unwrap();
    let conflicted: Vec<(String, String, String)> = listeners
        .iter()
        .map(|l| {
            let c = condition(&l["conditions"], "Conflicted").unwrap_or_default();
            (l["name"].as_str().unwrap_or_default().to_owned(), c.0, c.1)
        })
        .collect();
    let want = [
        ("first", "False", "NoConflicts"),
        ("other", "False", "NoConflicts"),
        ("tls", "True", "ProtocolConflict"),
        ("plain", "True", "ProtocolConflict"),
    ];
    let want: Vec<(String, String, String)> =
        want.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect();
    assert_eq!(conflicted, want, "{gw:#}");
    wait_for("on-first accepted", 60, || {
        route_ready(&cp, "httproute", (INFRA, "on-first"), "listener-conflicts", None)
    });
    let ip = gateway_address("listener-conflicts");
    for e in [req("/").host("conflicted.example").by("infra-backend-v1"), req("/").host("other.example").status(404)] {
        let host = e.host.unwrap_or_default();
        wait_for(&format!("listener-conflicts: {host}{}", e.path), 60, || {
            send(&lab, ip, host, &e, &cert).ok().filter(|r| e.check(host, r).is_ok())
        });
    }
    assert!(
        Client::connect(&ext, sa_of(ip, 8443), None, T).is_err(),
        "port 8443, where both listeners conflict, is not served"
    );
    let out = cp.kubectl_as(&cp.admin_kubeconfig(), &["delete", "-f", "-"], Some(CONFLICTS));
    assert!(out.status.success(), "listener-conflicts: delete: {}", String::from_utf8_lossy(&out.stderr));

    // `weft observe` on node1 shows those requests as HTTP flows naming the
    // route that served them, qualified by the Gateway's config: the last
    // ones (the node keeps a bounded number of flows) are listener-conflicts'.
    let route = format!("; route /weft-gateway.{INFRA}.listener-conflicts/httproute/{INFRA}/on-first/rule/");
    let deadline = Instant::now() + Duration::from_secs(30);
    let line = loop {
        let out = std::process::Command::new(workspace_binary("weft"))
            .args(["observe", "--server", &flow_socket(&files[0]), "--all", "--protocol", "http", "--color", "never"])
            .output()
            .unwrap();
        let seen = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(l) = seen.lines().find(|l| l.contains(&route) && l.contains("; conn ")) {
            break l.to_owned();
        }
        assert!(Instant::now() < deadline, "no joined flow naming {route:?} in weft observe:\n{seen}");
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(line.contains("infra-backend-v"), "{line}");
    eprintln!("weft observe: {line}");
    operator.abort();
}
