//! weft against a real Kubernetes API server (etcd, kube-apiserver and
//! kube-controller-manager from KUBEBUILDER_ASSETS, started once for this
//! test binary; see weft_tests::k8s): the CRDs, schema refusals and round
//! trips, the watch source, Events, leader election and the operator.
//! Nothing here needs root; each test works in a namespace of its own.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_agent::{
    controller::{ControlStatus, EnvoyAck, ObjectState},
    k8s::{
        ObjKey,
        watch::{Kinds, KubeSource},
        yaml::Loaded,
    },
    operator::lease::Elector,
    xds::model::{ConfigStatus, Serving},
};
use weft_tests::{
    k8s::{ControlPlane, deploy},
    objects::conformance_dir,
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
        tokio::time::sleep(Duration::from_millis(50)).await;
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

fn apply_all(cp: &ControlPlane, docs: &[Value]) -> String {
    cp.apply(&docs.iter().map(|d| serde_json::to_string(d).unwrap()).collect::<Vec<_>>().join("\n---\n"))
}

#[test]
fn crds_are_accepted_without_warnings_and_kubectl_shows_their_columns() {
    let cp = require_control_plane!();
    let out = deploy::crds(&cp);
    assert!(!out.to_lowercase().contains("warning"), "the API server warned about deploy/crds.yaml:\n{out}");

    let ns = cp.namespace("crd-columns");
    let out = cp.apply(&format!(
        "apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {{name: lb, namespace: {}}}\nspec: {{services: [{{name: web, ports: [80]}}]}}\n",
        ns.name
    ));
    assert!(!out.to_lowercase().contains("warning"), "{out}");
    let table = cp.kubectl_ok(&["get", "ec", "-n", &ns.name]);
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "VALID", "APPLIED", "AGE"], "{table}");
}

/// Every EnvoyConfig in Cilium's examples, as weft's kind, named for this test.
fn example_configs(ns: &str, prefix: &str) -> Vec<Value> {
    let dir = conformance_dir();
    let mut files: Vec<_> = ["envoy", "other"]
        .iter()
        .flat_map(|d| std::fs::read_dir(dir.join(d)).unwrap().map(|e| e.unwrap().path()))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let text = std::fs::read_to_string(f).unwrap();
        if text.contains("{{") {
            continue; // an unrendered template
        }
        for mut d in deploy::documents(&text) {
            let kind = match d["kind"].as_str() {
                Some("CiliumEnvoyConfig") => "EnvoyConfig",
                Some("CiliumClusterwideEnvoyConfig") => "ClusterwideEnvoyConfig",
                _ => continue,
            };
            d["apiVersion"] = json!("weft.io/v1alpha1");
            d["kind"] = json!(kind);
            // Examples reuse names: one per file.
            let name = format!("{prefix}-{i}-{}", d["metadata"]["name"].as_str().unwrap());
            d["metadata"]["name"] = json!(name);
            if kind == "EnvoyConfig" {
                d["metadata"]["namespace"] = json!(ns);
            }
            docs.push(d);
        }
    }
    docs
}

#[test]
fn envoy_configs_round_trip_unchanged() {
    let cp = require_control_plane!();
    deploy::crds(&cp);
    let ns = cp.namespace("round-trip");
    let prefix = ns.name.clone();
    let mut docs = example_configs(&ns.name, &prefix);
    assert!(docs.len() >= 10, "Cilium's examples hold a dozen EnvoyConfigs ({})", docs.len());
    // And weft's own test configs, with every field of the spec.
    for d in deploy::documents(&weft_tests::objects::http_envoy_config("http", "web", None)) {
        let mut d = d;
        d["metadata"]["namespace"] = json!(ns.name);
        d["spec"]["services"][0]["ports"] = json!([80, 8080]);
        d["spec"]["services"][0]["listener"] = json!("http-listener");
        d["spec"]["backendServices"] = json!([{"name": "web", "namespace": ns.name, "number": [80, "http"]}]);
        d["spec"]["nodeSelector"] = json!({"matchLabels": {"role": "edge"},
            "matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]});
        docs.push(d);
    }
    let out = apply_all(&cp, &docs);
    assert!(!out.to_lowercase().contains("warning"), "{out}");
    for d in &docs {
        let (kind, name) = (d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap());
        let ns = d["metadata"]["namespace"].as_str();
        let back = get(&cp, &format!("{}.weft.io", kind.to_lowercase()), ns, name).expect("stored");
        assert_eq!(back["spec"], d["spec"], "{kind} {name} came back changed");
    }
    for d in docs.iter().filter(|d| d["kind"] == "ClusterwideEnvoyConfig") {
        cp.kubectl_ok(&["delete", "clusterwideenvoyconfig", d["metadata"]["name"].as_str().unwrap()]);
    }
}

#[test]
fn configs_the_schema_refuses_are_refused_by_kubectl_apply_with_the_servers_message() {
    let cp = require_control_plane!();
    deploy::crds(&cp);
    let ns = cp.namespace("refusals");
    // (spec, what the server's message names)
    let cases = [
        ("{services: [{ports: [80]}]}", &["spec.services[0].name", "Required value"][..]),
        ("{services: [{name: web, ports: [0]}]}", &["spec.services[0].ports[0]", "greater than or equal to 1"]),
        ("{services: [{name: web, ports: [70000]}]}", &["spec.services[0].ports[0]", "less than or equal to 65535"]),
        ("{services: [{name: web, ports: [http]}]}", &["spec.services[0].ports[0]", "integer"]),
        ("{resources: {listener: x}}", &["spec.resources"]),
        ("{resources: [1]}", &["spec.resources[0]", "object"]),
        ("{servics: [{name: web}]}", &["unknown field", "spec.servics"]),
        ("{nodeSelector: {matchLabels: {role: [a]}}}", &["spec.nodeSelector.matchLabels.role", "string"]),
        ("{backendServices: [{name: web, number: [true]}]}", &["spec.backendServices[0].number[0]"]),
    ];
    for (i, (spec, says)) in cases.iter().enumerate() {
        let name = format!("bad-{i}");
        let yaml = format!(
            "apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {{name: {name}, namespace: {}}}\nspec: {spec}\n",
            ns.name
        );
        let out = cp.kubectl_as(&cp.admin_kubeconfig(), &["apply", "-f", "-"], Some(&yaml));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "spec {spec} was accepted");
        for s in *says {
            assert!(stderr.contains(s), "spec {spec}: the refusal should name {s:?}: {stderr}");
        }
        assert!(get(&cp, "ec", Some(&ns.name), &name).is_none(), "{name} was not stored");
    }
}

/// Everything a KubeSource holds that belongs to this test: namespaced
/// objects of `ns`, and cluster-scoped ones named with `ns` as a prefix.
fn mine(l: &Loaded, ns: &str) -> Vec<(&'static str, usize)> {
    let o = &l.objects;
    let ours = |k: &ObjKey| k.namespace == ns || (k.namespace.is_empty() && k.name.starts_with(ns));
    let n = |keys: Vec<&ObjKey>| keys.into_iter().filter(|k| ours(k)).count();
    vec![
        ("Service", n(o.services.keys().collect())),
        ("EndpointSlice", n(o.endpoint_slices.keys().collect())),
        ("Pod", n(o.pods.keys().collect())),
        ("Node", n(o.nodes.keys().collect())),
        ("Secret", n(o.secrets.keys().collect())),
        ("NetworkPolicy", n(o.network_policies.keys().collect())),
        ("Ingress", n(o.ingresses.keys().collect())),
        ("IngressClass", n(o.ingress_classes.keys().collect())),
        ("CiliumNetworkPolicy", n(o.cilium_network_policies.keys().collect())),
        ("CiliumClusterwideNetworkPolicy", n(o.cilium_clusterwide_network_policies.keys().collect())),
        (
            "configs",
            l.configs
                .iter()
                .filter(|d| {
                    let (dns, name) = (d.namespace.as_deref(), d.name.as_deref());
                    dns == Some(ns) || (dns.is_none() && name.is_some_and(|n| n.starts_with(ns)))
                })
                .count(),
        ),
    ]
}

fn every_kind_objects(ns: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec: {{ports: [{{name: http, port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, namespace: {ns}, labels: {{kubernetes.io/service-name: web, app: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints: [{{addresses: [10.1.1.11]}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1, namespace: {ns}, labels: {{app: web}}, annotations: {{noise: "1"}}}}
spec: {{containers: [{{name: app, image: x, ports: [{{name: http, containerPort: 8080}}]}}]}}
---
apiVersion: v1
kind: Node
metadata: {{name: {ns}-node, labels: {{role: infra}}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: cert, namespace: {ns}}}
type: kubernetes.io/tls
data: {{tls.crt: Y2VydA==, tls.key: a2V5}}
---
apiVersion: v1
kind: Secret
metadata: {{name: password, namespace: {ns}}}
type: Opaque
data: {{password: cGFzcw==}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: deny, namespace: {ns}}}
spec: {{podSelector: {{}}, policyTypes: [Ingress]}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: web, namespace: {ns}}}
spec: {{ingressClassName: {ns}-class, defaultBackend: {{service: {{name: web, port: {{number: 80}}}}}}}}
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {{name: {ns}-class}}
spec: {{controller: example.com/none}}
---
apiVersion: weft.io/v1alpha1
kind: EnvoyConfig
metadata: {{name: lb, namespace: {ns}}}
spec: {{services: [{{name: web}}]}}
---
apiVersion: weft.io/v1alpha1
kind: ClusterwideEnvoyConfig
metadata: {{name: {ns}-cw}}
spec: {{}}
---
apiVersion: weft.io/v1alpha1
kind: CiliumNetworkPolicy
metadata: {{name: db-in, namespace: {ns}}}
spec:
  endpointSelector: {{matchLabels: {{app: db}}}}
  ingress: [{{fromEndpoints: [{{matchLabels: {{app: web}}}}], toPorts: [{{ports: [{{port: "5432"}}]}}]}}]
---
apiVersion: weft.io/v1alpha1
kind: CiliumClusterwideNetworkPolicy
metadata: {{name: {ns}-lockdown}}
specs:
- endpointSelector: {{}}
  ingress: [{{fromEntities: [cluster]}}]
"#
    )
}

/// Waits until the source's state, as `of` sees it, satisfies `ok`.
async fn settles<T: std::fmt::Debug>(
    src: &mut KubeSource,
    what: &str,
    of: impl Fn(&Loaded) -> T,
    ok: impl Fn(&T) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut l = src.snapshot();
    while !ok(&of(&l)) {
        assert!(Instant::now() < deadline, "gave up waiting for {what}: {:?}", of(&l));
        if let Ok(Some(next)) = tokio::time::timeout(Duration::from_secs(1), async {
            src.changed().await;
            src.poll()
        })
        .await
        {
            l = next;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_updates_and_deletes_of_every_kind_reach_the_state() {
    let cp = require_control_plane!();
    deploy::crds(&cp);
    let ns = cp.namespace("every-kind");
    let n = ns.name.clone();
    let objects = every_kind_objects(&n);
    cp.apply(&objects);
    let kinds = Kinds { ingresses: true, ingress_classes: true, ..Kinds::agent() };
    let mut src = KubeSource::start(cp.client().await, kinds, "node1").await;
    src.wait_synced(Duration::from_secs(5)).await;
    let l = src.poll().expect("the first lists are a change");
    let counts = mine(&l, &n);
    assert!(counts.iter().all(|(_, c)| *c >= 1), "{counts:?}");
    assert_eq!(counts.iter().find(|(k, _)| *k == "Secret").unwrap().1, 1, "only TLS Secrets are watched");
    assert_eq!(counts.last().unwrap().1, 2, "both EnvoyConfig kinds");
    let pod = &l.objects.pods[&ObjKey::new(&n, "web-1")].object;
    assert!(pod.metadata.annotations.is_none(), "pruned: {:?}", pod.metadata);
    let ports = &pod.spec.as_ref().unwrap().containers[0].ports;
    assert_eq!(ports.as_ref().unwrap()[0].name.as_deref(), Some("http"), "named ports are kept");
    // The API server named the pod's service account: its identity's label.
    assert_eq!(pod.spec.as_ref().unwrap().service_account_name.as_deref(), Some("default"), "kept");
    // A slice keeps only its Service's label, a Service only the operator's:
    // their updates are told by their versions.
    let versions = |l: &Loaded| -> Vec<(String, Option<String>)> {
        let metas = l.objects.endpoint_slices.values().map(|x| &x.object.metadata);
        metas
            .chain(l.objects.services.values().map(|x| &x.object.metadata))
            .filter(|m| m.namespace.as_deref() == Some(n.as_str()))
            .map(|m| (m.name.clone().unwrap_or_default(), m.resource_version.clone()))
            .collect()
    };
    let versions_before = versions(&l);
    let slice =
        &l.objects.endpoint_slices.values().find(|x| x.object.metadata.namespace.as_deref() == Some(n.as_str()));
    let labels = slice.map(|x| x.object.metadata.labels.clone().unwrap_or_default().into_keys().collect::<Vec<_>>());
    assert_eq!(labels, Some(vec!["kubernetes.io/service-name".to_string()]), "pruned");

    // Updates of every kind.
    for mut doc in deploy::documents(&objects) {
        doc["metadata"]["labels"]["touched"] = json!("yes");
        cp.apply(&serde_json::to_string(&doc).unwrap());
    }
    let touched = |l: &Loaded| -> usize {
        let o = &l.objects;
        let t = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            let ours =
                m.namespace.as_deref() == Some(n.as_str()) || m.name.as_deref().is_some_and(|x| x.starts_with(&n));
            ours && m.labels.as_ref().and_then(|l| l.get("touched")).is_some()
        };
        let versions_touched = versions(l).iter().filter(|v| !versions_before.contains(v)).count();
        versions_touched
            + o.pods.values().filter(|x| t(&x.object.metadata)).count()
            + o.nodes.values().filter(|x| t(&x.object.metadata)).count()
            + o.secrets.values().filter(|x| t(&x.object.metadata)).count()
            + o.network_policies.values().filter(|x| t(&x.object.metadata)).count()
            + o.ingresses.values().filter(|x| t(&x.object.metadata)).count()
            + o.ingress_classes.values().filter(|x| t(&x.object.metadata)).count()
            + l.configs.iter().filter(|d| d.labels.get("touched").is_some_and(|v| v == "yes")).count()
    };
    // Every object but the Opaque Secret.
    settles(&mut src, "every update", touched, |t| *t == 10).await;

    // Deletes of every kind (the Pod as its kubelet would finish it: at once).
    cp.kubectl_ok(&["delete", "pod", "web-1", "-n", &n, "--grace-period=0", "--force"]);
    for doc in deploy::documents(&objects).iter().filter(|d| d["kind"] != "Pod") {
        let kind = format!(
            "{}.{}",
            doc["kind"].as_str().unwrap(),
            doc["apiVersion"].as_str().unwrap().split('/').next().unwrap()
        );
        let kind = kind.trim_end_matches(".v1").to_owned();
        let mut args = vec!["delete", kind.as_str(), doc["metadata"]["name"].as_str().unwrap()];
        if let Some(dns) = doc["metadata"]["namespace"].as_str() {
            args.extend(["-n", dns]);
        }
        cp.kubectl_ok(&args);
    }
    settles(&mut src, "every delete", |l| mine(l, &n), |c| c.iter().all(|(_, c)| *c == 0)).await;
    // Cilium's kinds are left out: another test of this binary installs their
    // CRDs while this one runs, and the source starts watching them then.
    let stats = src.stats();
    let ours = stats.iter().filter(|(kind, _)| !kind.starts_with("Cilium"));
    assert!(ours.clone().all(|(_, s)| s.replays == 0 && s.lists == 1), "{stats:?}");
}

fn nacked(object: &str, message: &str) -> ControlStatus {
    let key = weft_agent::xds::envoyconfig::ConfigKey {
        clusterwide: false,
        key: weft_agent::k8s::ObjKey::new("default", object),
    };
    ControlStatus {
        objects: [(
            key,
            ObjectState {
                config: std::sync::Arc::new(ConfigStatus {
                    object: object.into(),
                    origin: "API server".into(),
                    generation: 1,
                    for_this_node: true,
                    problems: vec![message.into()],
                    serving: Serving::Nothing,
                    listeners: vec![],
                }),
                envoy: EnvoyAck::Nacked { message: message.into() },
            },
        )]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_refusals_become_one_event_on_the_object_that_kubectl_describe_shows() {
    let cp = require_control_plane!();
    deploy::crds(&cp);
    let ns = cp.namespace("events");
    cp.apply(&format!(
        "apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {{name: lb, namespace: {}}}\nspec: {{}}\n",
        ns.name
    ));
    let uid = cp.kubectl_ok(&["get", "ec", "lb", "-n", &ns.name, "-o", "jsonpath={.metadata.uid}"]);
    let kinds = Kinds { envoy_configs: true, ..Kinds::none() };
    let mut src = KubeSource::start(cp.client().await, kinds, "node1").await;
    src.wait_synced(Duration::from_secs(5)).await;
    let status = nacked(&format!("EnvoyConfig {}/lb", ns.name), "Listener \"lb/l\": invalid address");
    src.report(&status);
    src.report(&status); // the same refusal again: no second Event
    let events = |cp: &ControlPlane| -> Vec<Value> {
        let out = cp.kubectl_ok(&["get", "events.events.k8s.io", "-n", &ns.name, "-o", "json"]);
        serde_json::from_str::<Value>(&out).unwrap()["items"].as_array().cloned().unwrap_or_default()
    };
    until("the Event", || Some(()).filter(|_| !events(&cp).is_empty())).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let evs = events(&cp);
    assert_eq!(evs.len(), 1, "{evs:#?}");
    let ev = &evs[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["reason"], "RejectedByEnvoy");
    assert_eq!(ev["regarding"]["kind"], "EnvoyConfig");
    assert_eq!(ev["regarding"]["uid"], uid.as_str());
    assert_eq!(ev["reportingInstance"], "node1");
    assert!(ev["note"].as_str().unwrap().starts_with("node node1: Envoy refused it: Listener"), "{ev:#}");
    let described = cp.kubectl_ok(&["describe", "ec", "lb", "-n", &ns.name]);
    assert!(
        described
            .lines()
            .any(|l| l.contains("Warning") && l.contains("RejectedByEnvoy") && l.contains("Envoy refused it")),
        "{described}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_a_takeover_when_it_stops_renewing() {
    let cp = require_control_plane!();
    let ns = cp.namespace("lease");
    let d = Duration::from_secs(1);
    let client = cp.client().await;
    let mut a = Elector::new(client.clone(), &ns.name, "weft-operator", "a", d);
    let mut b = Elector::new(client.clone(), &ns.name, "weft-operator", "b", d);
    assert!(a.round().await.unwrap());
    for _ in 0..3 {
        assert!(!b.round().await.unwrap(), "held by a");
        assert!(a.round().await.unwrap(), "a renews");
    }
    let lease = |cp: &ControlPlane| get(cp, "lease", Some(&ns.name), "weft-operator").unwrap();
    assert_eq!(lease(&cp)["spec"]["holderIdentity"], "a");
    assert_eq!(lease(&cp)["spec"]["leaseTransitions"], 0);
    // a stops renewing: b takes over once b has seen the record unchanged for the lease duration.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !b.round().await.unwrap() {
        assert!(Instant::now() < deadline, "b never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!a.round().await.unwrap(), "a sees b holding it");
    assert_eq!(lease(&cp)["spec"]["holderIdentity"], "b");
    assert_eq!(lease(&cp)["spec"]["leaseTransitions"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cilium_kinds_are_watched_once_their_crds_are_applied_and_cilium_yaml_applies_unchanged() {
    let cp = require_control_plane!();
    deploy::crds(&cp);
    let ns = cp.namespace("cilium");
    let kinds = Kinds { envoy_configs: true, ..Kinds::none() };
    let mut src = KubeSource::start(cp.client().await, kinds, "n").await;
    src.wait_synced(Duration::from_secs(5)).await;
    // This test alone installs Cilium's CRDs in this binary: not served yet.
    let before = src.stats();
    assert!(!before.contains_key("CiliumEnvoyConfig"), "{before:?}");
    // deploy/cilium-crds.yaml: a running source starts watching Cilium's kinds.
    let out = deploy::cilium_crds(&cp);
    assert!(!out.to_lowercase().contains("warning"), "the API server warned about deploy/cilium-crds.yaml:\n{out}");
    // Short names do not clash with weft's kinds.
    for short in ["ec", "cwec", "cec", "ccec", "cnp", "ccnp"] {
        cp.kubectl_ok(&["get", short, "-A"]);
    }
    let dir = conformance_dir();
    let mut docs = Vec::new();
    for (f, name) in [
        ("envoy/envoy-helloworld-v1-90-v2-10.yaml", "helloworld"),
        ("other/pkg__ciliumenvoyconfig__testdata__experimental__ciliumenvoyconfig.yaml", "experimental"),
    ] {
        for mut d in deploy::documents(&std::fs::read_to_string(dir.join(f)).unwrap()) {
            d["metadata"]["namespace"] = json!(ns.name);
            d["metadata"]["name"] = json!(name);
            docs.push(d);
        }
    }
    let mut cw = deploy::documents(&std::fs::read_to_string(dir.join("envoy/envoy-circuit-breaker.yaml")).unwrap());
    let cw_name = format!("{}-circuit-breaker", ns.name);
    cw[0]["metadata"]["name"] = json!(cw_name);
    docs.extend(cw);
    // Cilium's YAML, unchanged but for where it goes: accepted, and stored as written.
    let out = apply_all(&cp, &docs);
    assert!(!out.to_lowercase().contains("warning"), "{out}");
    for d in &docs {
        let kind = format!("{}.cilium.io", d["kind"].as_str().unwrap().to_lowercase());
        let back =
            get(&cp, &kind, d["metadata"]["namespace"].as_str(), d["metadata"]["name"].as_str().unwrap()).unwrap();
        assert_eq!(back["spec"], d["spec"]);
    }
    let ours = |l: &Loaded| {
        l.configs
            .iter()
            .filter(|d| d.namespace.as_deref() == Some(ns.name.as_str()) || d.name.as_deref() == Some(cw_name.as_str()))
            .filter_map(|d| d.parsed.as_ref().ok().map(|c| c.key.to_string()))
            .collect::<Vec<_>>()
    };
    settles(&mut src, "Cilium's configs", ours, |v| v.len() == 3).await;
    let l = src.snapshot();
    let keys = ours(&l);
    assert!(keys.contains(&format!("EnvoyConfig {}/helloworld", ns.name)), "{keys:?}");
    assert!(keys.contains(&format!("ClusterwideEnvoyConfig {cw_name}")), "{keys:?}");
    let stats = src.stats();
    for k in ["CiliumEnvoyConfig", "CiliumClusterwideEnvoyConfig"] {
        assert!(stats[k].synced, "{k} is watched: {stats:?}");
    }
    cp.kubectl_ok(&["delete", "ciliumclusterwideenvoyconfig", &cw_name]);

    // Cilium's policy examples, unchanged but for where they go: stored as
    // written (the rules are not pruned), watched, and read as policies.
    let mut policies = Vec::new();
    for (f, name) in [("cnp-with-mutual-auth.yaml", "mutual-auth"), ("policy/external-lockdown.yaml", "lockdown")] {
        for mut d in deploy::documents(&std::fs::read_to_string(dir.join(f)).unwrap()) {
            if d["kind"] == "CiliumNetworkPolicy" {
                d["metadata"]["namespace"] = json!(ns.name);
                d["metadata"]["name"] = json!(name);
            } else {
                d["metadata"]["name"] = json!(format!("{}-{name}", ns.name));
            }
            policies.push(d);
        }
    }
    let out = apply_all(&cp, &policies);
    assert!(!out.to_lowercase().contains("warning"), "{out}");
    for d in &policies {
        let kind = format!("{}.cilium.io", d["kind"].as_str().unwrap().to_lowercase());
        let back =
            get(&cp, &kind, d["metadata"]["namespace"].as_str(), d["metadata"]["name"].as_str().unwrap()).unwrap();
        assert_eq!(back["spec"], d["spec"], "stored as written");
    }
    let lockdown = ObjKey::new("", format!("{}-lockdown", ns.name));
    let mutual = ObjKey::new(ns.name.clone(), "mutual-auth");
    let held = |l: &Loaded| {
        let o = &l.objects;
        (o.cilium_network_policies.contains_key(&mutual), o.cilium_clusterwide_network_policies.contains_key(&lockdown))
    };
    let kinds = Kinds { network_policies: true, ..Kinds::none() };
    let mut policy_src = KubeSource::start(cp.client().await, kinds, "n").await;
    policy_src.wait_synced(Duration::from_secs(5)).await;
    settles(&mut policy_src, "Cilium's policies", held, |h| *h == (true, true)).await;
    let stats = policy_src.stats();
    for k in ["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "CiliumNetworkPolicy.weft.io"] {
        assert!(stats[k].synced, "{k} is watched: {stats:?}");
    }
    let l = policy_src.snapshot();
    let spec = l.objects.cilium_network_policies[&mutual].object.spec.clone().unwrap();
    assert_eq!(spec["ingress"][0]["authentication"]["mode"], "required", "unknown fields reach the agent: {spec}");

    // The operator says in each policy's status what weft refuses of it, by field.
    let _one = OPERATORS.lock().await;
    let op = operator(&cp, &ns.name, &format!("{}-op", ns.name)).await;
    let cnp = |name: &str| get(&cp, "ciliumnetworkpolicies.cilium.io", Some(&ns.name), name).unwrap();
    let ccnp = |name: &str| get(&cp, "ciliumclusterwidenetworkpolicies.cilium.io", None, name).unwrap();
    let (st, reason, msg, generation) =
        until("the refused policy's status", || condition(&cnp("mutual-auth"), "Valid")).await;
    assert_eq!((st.as_str(), reason.as_str(), generation), ("False", "Refused", 1), "{msg}");
    assert_eq!(
        msg,
        "spec.ingress[0].authentication: mutual authentication is not supported\n\
         spec.ingress[0]: the rule allows nothing (see the problems above)"
    );
    let (st, reason, msg, _) =
        until("the accepted policy's status", || condition(&ccnp(&lockdown.name), "Valid")).await;
    assert_eq!((st.as_str(), reason.as_str()), ("True", "Valid"), "{msg}");
    // kubectl shows it (the CRD's Valid column).
    let table = cp.kubectl_ok(&["get", "cnp", "mutual-auth", "-n", &ns.name]);
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "VALID", "AGE"], "{table}");
    assert_eq!(table.lines().nth(1).unwrap_or_default().split_whitespace().nth(1), Some("False"), "{table}");
    // The fixed policy (without its mutual authentication) is valid at its new generation.
    let fix = r#"[{"op": "remove", "path": "/spec/ingress/0/authentication"}]"#;
    cp.kubectl_ok(&["patch", "cnp", "mutual-auth", "-n", &ns.name, "--type=json", "-p", fix]);
    let (st, _, msg, _) =
        until("the fixed policy's status", || condition(&cnp("mutual-auth"), "Valid").filter(|c| c.3 == 2)).await;
    assert_eq!(st, "True", "{msg}");
    op.abort();
    cp.kubectl_ok(&["delete", "ciliumclusterwidenetworkpolicy", &lockdown.name]);
}

/// Operators act on every object of the cluster: one test with operators at a time.
static OPERATORS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs weft's operator in this process (admin credentials), its Lease and
/// shared objects in `ns`.
async fn operator(cp: &ControlPlane, ns: &str, identity: &str) -> tokio::task::JoinHandle<()> {
    let opts = weft_agent::operator::OperatorOptions {
        namespace: ns.into(),
        identity: identity.into(),
        lease_duration: Duration::from_secs(1),
        ..Default::default()
    };
    let client = cp.client().await;
    tokio::spawn(async move {
        weft_agent::operator::run(client, opts).await.unwrap();
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

fn services(ns: &str) -> String {
    ["web", "good", "bad"]
        .iter()
        .map(|s| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {s}, namespace: {ns}}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n"))
        .collect::<Vec<_>>()
        .join("---\n")
}

fn config(ns: &str, name: &str, cluster: &str) -> String {
    format!(
        r#"apiVersion: weft.io/v1alpha1
kind: EnvoyConfig
metadata: {{name: {name}, namespace: {ns}}}
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
    eds_cluster_config: {{service_name: {ns}/web}}
  backendServices: [{{name: web}}]
  nodeSelector: {{matchLabels: {{weft.io/test: {ns}}}}}
"#
    )
}

/// A Node of this test (labelled `weft.io/test: <ns>` and `labels`), as its kubelet registers it.
fn node(cp: &ControlPlane, ns: &str, name: &str, labels: &str) {
    let kubeconfig = cp.node_kubeconfig(name).expect("node credentials");
    let yaml =
        format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{weft.io/test: {ns}, {labels}}}}}\n");
    let out = cp.kubectl_as(&kubeconfig, &["create", "-f", "-"], Some(&yaml));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Writes node `node`'s WeftNode report in `ns` as its agent would:
/// `configs` is (name, generation, served generation, state) of EnvoyConfigs of `ns`.
fn write_report(cp: &ControlPlane, ns: &str, node: &str, configs: &[(&str, i64, Option<i64>, &str)]) {
    cp.apply(&format!(
        "apiVersion: weft.io/v1alpha1\nkind: WeftNode\nmetadata: {{name: {node}, namespace: {ns}}}\nspec: {{}}\n"
    ));
    let configs: Vec<Value> = configs
        .iter()
        .map(|(name, generation, served, state)| {
            json!({"kind": "EnvoyConfig", "namespace": ns, "name": name, "generation": generation,
                   "servedGeneration": served, "state": state, "message": (*state == "Rejected").then_some("Envoy refused it")})
        })
        .collect();
    let status = json!({"apiVersion": "weft.io/v1alpha1", "kind": "WeftNode", "metadata": {"name": node, "namespace": ns},
                        "status": {"envoy": "Connected", "summary": "", "configs": configs}});
    let args = ["apply", "--server-side", "--force-conflicts", "--subresource=status", "-f", "-"];
    let out = cp.kubectl_as(&cp.admin_kubeconfig(), &args, Some(&status.to_string()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The fieldManagers of the status writes to EnvoyConfigs of `ns` so far.
fn status_writers(cp: &ControlPlane, ns: &str) -> std::collections::BTreeSet<String> {
    cp.audit()
        .iter()
        .filter(|e| {
            e.verb == "patch"
                && e.path().contains(&format!("/namespaces/{ns}/envoyconfigs/"))
                && e.path().ends_with("/status")
        })
        .map(|e| e.param("fieldManager").unwrap_or_default().replace("%2F", "/"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_alone_writes_status_with_the_messages_of_validate() {
    let cp = require_control_plane!();
    let _one = OPERATORS.lock().await;
    deploy::crds(&cp);
    let ns = cp.namespace("status");
    let n = ns.name.clone();
    let (good, bad) = (config(&n, "good", "web"), config(&n, "bad", &format!("{n}/nowhere")));
    let all = format!("{}---\n{good}---\n{bad}", services(&n));

    // What `weft-agent validate` says of the same objects in files.
    let dir = std::env::temp_dir().join(format!("weft-status-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("objects.yaml");
    std::fs::write(&file, &all).unwrap();
    let report = weft_agent::validate::validate(std::slice::from_ref(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!((report.configs, report.valid), (2, 1), "{:#?}", report.problems);
    let expected: Vec<String> = report
        .problems
        .iter()
        .map(|p| {
            p.strip_prefix(&format!("{} (document 5): ", file.display())).expect("the bad config's line").to_owned()
        })
        .collect();
    assert!(!expected.is_empty() && expected[0].contains("/nowhere"), "{expected:?}");

    cp.apply(&all);
    let (ida, idb) = (format!("{n}-a"), format!("{n}-b"));
    let a = operator(&cp, &n, &ida).await;
    let b = operator(&cp, &n, &idb).await;
    let get = |name: &str| get(&cp, "ec", Some(&n), name).unwrap();
    let (st, reason, msg, gen_) = until("the good config's status", || condition(&get("good"), "Valid")).await;
    assert_eq!((st.as_str(), reason.as_str(), gen_), ("True", "Valid", 1), "{msg}");
    let (st, reason, msg, _) = until("the bad config's status", || condition(&get("bad"), "Valid")).await;
    assert_eq!((st.as_str(), reason.as_str()), ("False", "Invalid"));
    assert_eq!(msg.lines().collect::<Vec<_>>(), expected, "the same message as weft-agent validate");
    assert_eq!(get("bad")["status"]["observedGeneration"], 1);
    let applied = until("Applied", || condition(&get("bad"), "Applied")).await;
    assert_eq!((applied.0.as_str(), applied.1.as_str()), ("False", "NotServed"));
    // Valid, but no node selected by the configs reports serving it.
    let applied = until("Applied", || condition(&get("good"), "Applied")).await;
    assert_eq!((applied.0.as_str(), applied.1.as_str()), ("False", "NoNodeSelected"), "{}", applied.2);
    let node_name = format!("{n}-node");
    node(&cp, &n, &node_name, "role: any");
    let applied = until("NoAgent", || condition(&get("good"), "Applied").filter(|c| c.1 == "NoAgent")).await;
    assert_eq!(applied.0, "Unknown");
    assert!(applied.2.contains(&node_name), "{}", applied.2);
    write_report(&cp, &n, &node_name, &[("good", 1, Some(1), "Serving")]);
    let applied = until("Serving", || condition(&get("good"), "Applied").filter(|c| c.1 == "Serving")).await;
    assert_eq!(applied.0, "True");
    // kubectl shows it.
    let table = cp.kubectl_ok(&["get", "ec", "-n", &n]);
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>())
    };
    assert_eq!(row("bad"), Some(vec!["bad", "False", "False"]), "{table}");
    assert_eq!(row("good"), Some(vec!["good", "True", "True"]), "{table}");
    let described = cp.kubectl_ok(&["describe", "ec", "bad", "-n", &n]);
    assert!(described.contains("Invalid") && described.contains("/nowhere"), "{described}");

    // Fix the bad one; break the good one: its generation 1 stays in effect.
    cp.apply(&config(&n, "bad", "web"));
    cp.apply(&config(&n, "good", &format!("{n}/elsewhere")));
    until("the fix", || condition(&get("bad"), "Valid").filter(|c| c.0 == "True" && c.3 == 2)).await;
    let (st, _, msg, _) = until("the breakage", || condition(&get("good"), "Valid").filter(|c| c.3 == 2)).await;
    assert_eq!(st, "False");
    assert!(msg.contains("/elsewhere"), "{msg}");
    write_report(&cp, &n, &node_name, &[("good", 2, Some(1), "Rejected")]);
    let applied =
        until("the fallback", || condition(&get("good"), "Applied").filter(|c| c.3 == 2 && c.1 == "LastGoodVersion"))
            .await;
    assert!(applied.2.contains("generation 1 stays in effect"), "{}", applied.2);

    // One writer: every status write came from the one leader.
    let w = status_writers(&cp, &n);
    assert_eq!(w.len(), 1, "{w:?}");
    let leader = w.into_iter().next().unwrap();
    let lease = get_lease(&cp, &n);
    assert_eq!(format!("weft-operator/{}", lease["spec"]["holderIdentity"].as_str().unwrap()), leader);

    // The leader goes away: the other one takes over and writes.
    let (gone, other) = if leader.ends_with(&ida) { (a, idb) } else { (b, ida) };
    gone.abort();
    cp.apply(&config(&n, "good", "web"));
    until("the new leader's write", || condition(&get("good"), "Valid").filter(|c| c.0 == "True" && c.3 == 3)).await;
    let w = status_writers(&cp, &n);
    assert!(w.contains(&format!("weft-operator/{other}")) && w.len() == 2, "{w:?}");
    assert_eq!(get_lease(&cp, &n)["spec"]["holderIdentity"], other.as_str());
    cp.kubectl_ok(&["delete", "node", &node_name]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applied_is_true_only_when_every_selected_node_reports_the_generation_served() {
    let cp = require_control_plane!();
    let _one = OPERATORS.lock().await;
    deploy::crds(&cp);
    let ns = cp.namespace("applied");
    let n = ns.name.clone();
    let (a, b) = (format!("{n}-a"), format!("{n}-b"));
    node(&cp, &n, &a, "role: edge");
    node(&cp, &n, &b, "role: core");
    let with_selector = |name: &str, labels: &str| {
        format!(
            "{}---\n{}",
            services(&n),
            config(&n, name, "web").replace(
                &format!("matchLabels: {{weft.io/test: {n}}}"),
                &format!("matchLabels: {{weft.io/test: {n}, {labels}}}")
            )
        )
    };
    cp.apply(&with_selector("web", "role: none"));
    cp.apply(&with_selector("good", "role: edge"));
    cp.apply(&config(&n, "bad", "web")); // both nodes
    let _op = operator(&cp, &n, &format!("{n}-a")).await;
    let get = |name: &str| get(&cp, "ec", Some(&n), name).unwrap();
    let applied = |name: &'static str, reason: &'static str| {
        let get = &get;
        async move {
            until(&format!("{name}: {reason}"), || condition(&get(name), "Applied").filter(|c| c.1 == reason)).await
        }
    };
    let (st, _, msg, _) = applied("web", "NoNodeSelected").await;
    assert_eq!(st, "False");
    assert!(msg.contains("selects none of the"), "{msg}");
    let (st, _, msg, _) = applied("good", "NoAgent").await;
    assert_eq!(st, "Unknown");
    assert!(msg.contains(&a) && !msg.contains(&b), "only the selected node: {msg}");

    // Node a's agent serves both: "good" is applied, "bad" (also for b) is not yet.
    write_report(&cp, &n, &a, &[("good", 1, Some(1), "Serving"), ("bad", 1, Some(1), "Serving")]);
    let (st, _, msg, _) = applied("good", "Serving").await;
    assert_eq!((st.as_str(), msg.as_str()), ("True", format!("generation 1 is served on node {a}").as_str()));
    let (_, _, msg, _) = applied("bad", "Pending").await;
    assert_eq!(msg, format!("generation 1 is served on 1 of 2 selected nodes; not yet on {b} (no weft agent report)"));
    // Node b's Envoy refuses it.
    write_report(&cp, &n, &b, &[("bad", 1, None, "Rejected")]);
    let (_, _, msg, _) = applied("bad", "RejectedByEnvoy").await;
    assert!(msg.contains(&format!("Envoy refused generation 1 on {b}")), "{msg}");
    write_report(&cp, &n, &b, &[("bad", 1, Some(1), "Serving")]);
    let (st, _, msg, _) = applied("bad", "Serving").await;
    assert_eq!((st.as_str(), msg.as_str()), ("True", "generation 1 is served on the 2 selected nodes"));
    // An edit: both nodes still serve the old generation until their agents say otherwise.
    cp.apply(&config(&n, "bad", "web").replace("stat_prefix: bad", "stat_prefix: bad2"));
    let (_, _, msg, gen_) = applied("bad", "Pending").await;
    assert_eq!(gen_, 2);
    assert!(
        msg.contains(&format!("{a} (serves generation 1)")) && msg.contains(&format!("{b} (serves generation 1)")),
        "{msg}"
    );
    // kubectl shows the reports.
    let table = cp.kubectl_ok(&["get", "weftnodes", "-n", &n]);
    let header: Vec<&str> = table.lines().next().unwrap_or_default().split_whitespace().collect();
    assert_eq!(header, ["NAME", "ENVOY", "SERVED", "AGE"], "{table}");
    for node in [&a, &b] {
        cp.kubectl_ok(&["delete", "node", node]);
    }
}

fn get_lease(cp: &ControlPlane, ns: &str) -> Value {
    get(cp, "lease", Some(ns), "weft-operator").expect("the operators' Lease")
}

fn ingress_objects(ns: &str, class: &str, annotations: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: details, namespace: {ns}}}
spec: {{ports: [{{name: http, port: 9080}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: productpage, namespace: {ns}}}
spec: {{ports: [{{name: http, port: 9080}}]}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: basic-ingress, namespace: {ns}, annotations: {{{annotations}}}}}
spec:
  ingressClassName: {class}
  rules:
  - http:
      paths:
      - {{path: /details, pathType: Prefix, backend: {{service: {{name: details, port: {{number: 9080}}}}}}}}
      - {{path: /, pathType: Prefix, backend: {{service: {{name: productpage, port: {{number: 9080}}}}}}}}
"#
    )
}

/// Sets a LoadBalancer Service's address, as a cloud's load balancer would.
fn give_address(cp: &ControlPlane, ns: &str, svc: &str, ip: &str) {
    let patch = json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}}).to_string();
    cp.kubectl_ok(&["patch", "service", svc, "-n", ns, "--subresource=status", "--type=merge", "-p", &patch]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingresses_get_their_objects_an_address_and_lose_them_to_the_garbage_collector() {
    let cp = require_control_plane!();
    let _one = OPERATORS.lock().await;
    deploy::crds(&cp);
    cp.apply(&deploy::file("ingressclass.yaml"));
    let ns = cp.namespace("ingress");
    let n = ns.name.clone();
    cp.apply(&ingress_objects(&n, "weft", ""));
    let _op = operator(&cp, &n, &format!("{n}-a")).await;
    let name = "weft-ingress-basic-ingress";
    let svc = until("the Service", || get(&cp, "service", Some(&n), name)).await;
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    // The real allocators gave it a ClusterIP and NodePorts.
    assert!(svc["spec"]["clusterIP"].as_str().is_some_and(|ip| ip.starts_with("10.96.")), "{svc:#}");
    for p in svc["spec"]["ports"].as_array().unwrap() {
        assert!(p["nodePort"].as_u64().is_some_and(|np| (30000..32768).contains(&np)), "{p}");
    }
    until("the Endpoints", || get(&cp, "endpoints", Some(&n), name)).await;
    // kube-controller-manager mirrors the placeholder Endpoints into an EndpointSlice.
    let slice = until("the mirrored EndpointSlice", || {
        let out = cp.kubectl_ok(&[
            "get",
            "endpointslices",
            "-n",
            &n,
            "-l",
            &format!("kubernetes.io/service-name={name}"),
            "-o",
            "json",
        ]);
        serde_json::from_str::<Value>(&out).unwrap()["items"].as_array().and_then(|i| i.first().cloned())
    })
    .await;
    assert_eq!(
        slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
        "endpointslicemirroring-controller.k8s.io"
    );
    assert_eq!(slice["endpoints"][0]["addresses"][0], weft_agent::operator::ingress::PLACEHOLDER.0);
    let cfg = until("the EnvoyConfig", || get(&cp, "ec", Some(&n), name)).await;
    let ingress = get(&cp, "ingress", Some(&n), "basic-ingress").unwrap();
    for obj in [&svc, &cfg] {
        assert_eq!(obj["metadata"]["ownerReferences"][0]["uid"], ingress["metadata"]["uid"]);
    }
    let valid = until("its status", || condition(&get(&cp, "ec", Some(&n), name).unwrap(), "Valid")).await;
    assert_eq!(valid.0, "True", "{}", valid.2);

    // The load balancer (the test, here) gives the Service an address: the Ingress shows it.
    give_address(&cp, &n, name, "172.20.0.10");
    until("the Ingress address", || {
        get(&cp, "ingress", Some(&n), "basic-ingress")
            .filter(|i| i["status"]["loadBalancer"]["ingress"][0]["ip"] == "172.20.0.10")
    })
    .await;
    let table = cp.kubectl_ok(&["get", "ingress", "basic-ingress", "-n", &n]);
    assert!(table.contains("172.20.0.10"), "{table}");

    // Edits reach the EnvoyConfig.
    cp.apply(&ingress_objects(&n, "weft", "").replace("path: /details,", "path: /reviews,"));
    until("the edit", || get(&cp, "ec", Some(&n), name).filter(|c| c.to_string().contains("/reviews"))).await;

    // Deleting the Ingress: the garbage collector deletes what it owns.
    cp.kubectl_ok(&["delete", "ingress", "basic-ingress", "-n", &n]);
    until("the owned objects to go", || {
        (get(&cp, "service", Some(&n), name).is_none()
            && get(&cp, "endpoints", Some(&n), name).is_none()
            && get(&cp, "ec", Some(&n), name).is_none())
        .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_ingresses_share_one_config_and_address() {
    let cp = require_control_plane!();
    let _one = OPERATORS.lock().await;
    deploy::crds(&cp);
    let ns = cp.namespace("shared");
    let n = ns.name.clone();
    // A class of this test's own, shared mode by default.
    let class = format!("{n}-shared");
    cp.apply(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {{name: {class}, annotations: {{ingress.weft.io/loadbalancer-mode: shared}}}}\nspec: {{controller: weft.io/ingress-controller}}\n"
    ));
    cp.apply(&ingress_objects(&n, &class, ""));
    cp.apply(&format!(
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {{name: second, namespace: {n}}}\nspec:\n  ingressClassName: {class}\n  rules:\n  - host: second.example.com\n    http: {{paths: [{{path: /, pathType: Prefix, backend: {{service: {{name: details, port: {{number: 9080}}}}}}}}]}}\n"
    ));
    let _op = operator(&cp, &n, &format!("{n}-a")).await;
    let cfg = until("the shared config", || {
        get(&cp, "cwec", None, "weft-ingress")
            .filter(|c| c.to_string().contains("second.example.com") && c.to_string().contains("/details"))
    })
    .await;
    assert!(cfg["metadata"]["ownerReferences"].is_null());
    assert!(get(&cp, "service", Some(&n), "weft-ingress").is_some(), "in the operator's namespace");
    assert!(get(&cp, "service", Some(&n), "weft-ingress-basic-ingress").is_none(), "no dedicated objects");
    give_address(&cp, &n, "weft-ingress", "172.20.0.20");
    for name in ["basic-ingress", "second"] {
        until(&format!("{name}'s address"), || {
            get(&cp, "ingress", Some(&n), name)
                .filter(|i| i["status"]["loadBalancer"]["ingress"][0]["ip"] == "172.20.0.20")
        })
        .await;
    }
    // With no shared Ingress left, the shared objects go.
    cp.kubectl_ok(&["delete", "ingress", "basic-ingress", "second", "-n", &n]);
    until("the shared objects to go", || {
        (get(&cp, "cwec", None, "weft-ingress").is_none()
            && get(&cp, "service", Some(&n), "weft-ingress").is_none()
            && get(&cp, "endpoints", Some(&n), "weft-ingress").is_none())
        .then_some(())
    })
    .await;
    cp.kubectl_ok(&["delete", "ingressclass", &class]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_ingress_backend_is_an_event_on_the_ingress_and_the_rest_is_served() {
    let cp = require_control_plane!();
    let _one = OPERATORS.lock().await;
    deploy::crds(&cp);
    cp.apply(&deploy::file("ingressclass.yaml"));
    let ns = cp.namespace("bad-path");
    let n = ns.name.clone();
    // Kubernetes itself refuses malformed paths (a path without its leading
    // '/', say); a port name the Service does not have is for the controller to find.
    let objects = ingress_objects(&n, "weft", "").replace(
        "backend: {service: {name: details, port: {number: 9080}}}",
        "backend: {service: {name: details, port: {name: nope}}}",
    );
    cp.apply(&objects);
    let _op = operator(&cp, &n, &format!("{n}-a")).await;
    let name = "weft-ingress-basic-ingress";
    let cfg = until("the EnvoyConfig", || get(&cp, "ec", Some(&n), name)).await;
    assert!(cfg.to_string().contains(&format!("{n}/productpage:9080")), "the good path is served");
    assert!(!cfg.to_string().contains(&format!("{n}/details:9080")), "the bad one is not");
    let ev = until("the Event", || {
        let out = cp.kubectl_ok(&["get", "events.events.k8s.io", "-n", &n, "-o", "json"]);
        serde_json::from_str::<Value>(&out).unwrap()["items"]
            .as_array()
            .and_then(|i| i.iter().find(|e| e["reason"] == "InvalidIngress").cloned())
    })
    .await;
    assert_eq!(ev["regarding"]["name"], "basic-ingress");
    assert_eq!(
        ev["note"].as_str().unwrap(),
        format!(
            "Ingress {n}/basic-ingress: spec.rules[0].http.paths[0].backend: Service {n}/details has no port named \"nope\""
        ),
    );
    let described = cp.kubectl_ok(&["describe", "ingress", "basic-ingress", "-n", &n]);
    assert!(described.contains("InvalidIngress"), "{described}");
}

/// A Pod of weft's running on `node` as ServiceAccount `sa`, as its
/// DaemonSet or Deployment would make it (no kubelet runs it here).
fn weft_pod(cp: &ControlPlane, name: &str, sa: &str, node: &str) {
    cp.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: weft-system}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  hostNetwork: true\n  containers: [{{name: main, image: weft:0.1.0}}]\n"
    ));
}

/// Asserts kubectl with `kubeconfig` is refused, saying `says`.
fn refused(cp: &ControlPlane, kubeconfig: &std::path::Path, args: &[&str], stdin: Option<&str>, says: &str) {
    let out = cp.kubectl_as(kubeconfig, args, stdin);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "kubectl {args:?} was allowed: {}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr.to_lowercase().contains(&says.to_lowercase()), "kubectl {args:?}: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_the_operator_can_do_their_work_with_deploys_rbac_and_nothing_more() {
    let cp = require_control_plane!();
    let _one = OPERATORS.lock().await;
    deploy::rbac(&cp);
    let ns = cp.namespace("rbac");
    let n = ns.name.clone();
    let (n1, n2) = (format!("{n}-n1"), format!("{n}-n2"));
    node(&cp, &n, &n1, "role: a");
    node(&cp, &n, &n2, "role: b");
    let (agent1, operator_pod) = (format!("{n}-agent-1"), format!("{n}-operator"));
    weft_pod(&cp, &agent1, "weft-agent", &n1);
    weft_pod(&cp, &operator_pod, "weft-operator", &n2);
    // Tokens from the TokenRequest API, bound to the Pods (as a kubelet gets them).
    let agent = cp.service_account_kubeconfig("weft-system", "weft-agent", Some(&agent1)).unwrap();
    let operator_kc = cp.service_account_kubeconfig("weft-system", "weft-operator", Some(&operator_pod)).unwrap();
    cp.apply(&format!("{}---\n{}", services(&n), config(&n, "lb", "web")));

    // The agent lists and watches every kind it reads, and writes its node's report.
    let mut src =
        KubeSource::start(cp.client_for(&agent).await, Kinds::agent(), &n1).await.with_node_report("weft-system");
    tokio::time::timeout(Duration::from_secs(60), src.wait_synced(Duration::from_secs(5)))
        .await
        .expect("every kind listed");
    assert!(src.stats().values().all(|s| s.errors == 0), "{:?}", src.stats());
    src.report(&ControlStatus { envoy_connected: true, ..Default::default() });
    let report = until("the agent's report", || get(&cp, "weftnode", Some("weft-system"), &n1)).await;
    let pod_uid = cp.kubectl_ok(&["get", "pod", &agent1, "-n", "weft-system", "-o", "jsonpath={.metadata.uid}"]);
    assert_eq!(
        report["metadata"]["ownerReferences"][0]["uid"],
        pod_uid.as_str(),
        "owned by the agent's Pod: {report:#}"
    );
    until("its status", || {
        get(&cp, "weftnode", Some("weft-system"), &n1).filter(|r| r["status"]["envoy"] == "Connected")
    })
    .await;

    // ...and nothing more: no config specs or status, no Secrets, no other node's objects.
    let forbidden = "Forbidden";
    let ec = format!(
        "apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {{name: mine, namespace: {n}}}\nspec: {{}}\n"
    );
    refused(&cp, &agent, &["create", "-f", "-"], Some(&ec), forbidden);
    refused(
        &cp,
        &agent,
        &["patch", "ec", "lb", "-n", &n, "--type=merge", "-p", r#"{"spec":{"services":[]}}"#],
        None,
        forbidden,
    );
    let status = r#"{"status":{"observedGeneration":9}}"#;
    refused(
        &cp,
        &agent,
        &["patch", "ec", "lb", "-n", &n, "--subresource=status", "--type=merge", "-p", status],
        None,
        forbidden,
    );
    refused(&cp, &agent, &["create", "secret", "generic", "stolen", "-n", &n, "--from-literal=a=b"], None, forbidden);
    refused(&cp, &agent, &["get", "secret", "anything", "-n", &n], None, forbidden);
    refused(&cp, &agent, &["label", "node", &n2, "hacked=yes"], None, forbidden);
    refused(&cp, &agent, &["delete", "pod", &operator_pod, "-n", "weft-system"], None, forbidden);
    let other = format!(
        "apiVersion: weft.io/v1alpha1\nkind: WeftNode\nmetadata: {{name: {n2}, namespace: weft-system}}\nspec: {{}}\n"
    );
    refused(
        &cp,
        &agent,
        &["apply", "--server-side", "-f", "-"],
        Some(&other),
        &format!("weft-agent may write only the WeftNode of its own node; its credentials name node {n1}, not {n2}"),
    );
    // An agent whose token names no node (not bound to its Pod) writes no report at all.
    let unbound = cp.service_account_kubeconfig("weft-system", "weft-agent", None).unwrap();
    let own = format!(
        "apiVersion: weft.io/v1alpha1\nkind: WeftNode\nmetadata: {{name: {n1}, namespace: weft-system}}\nspec: {{}}\n"
    );
    refused(&cp, &unbound, &["apply", "--server-side", "-f", "-"], Some(&own), "its credentials name no node");
    // Policies: the agent reads them; their status is the operator's.
    let cnp = format!(
        "apiVersion: weft.io/v1alpha1\nkind: CiliumNetworkPolicy\nmetadata: {{name: dns, namespace: {n}}}\n\
         spec: {{endpointSelector: {{}}, egress: [{{toFQDNs: [{{matchName: a.example}}]}}]}}\n"
    );
    cp.apply(&cnp);
    refused(
        &cp,
        &agent,
        &[
            "patch",
            "ciliumnetworkpolicies.weft.io",
            "dns",
            "-n",
            &n,
            "--subresource=status",
            "--type=merge",
            "-p",
            status,
        ],
        None,
        forbidden,
    );

    // The operator writes status with its token...
    let opts = weft_agent::operator::OperatorOptions {
        identity: operator_pod.clone(),
        lease_duration: Duration::from_secs(2),
        ..Default::default()
    };
    let client = cp.client_for(&operator_kc).await;
    let op = tokio::spawn(async move { weft_agent::operator::run(client, opts).await.unwrap() });
    until("the operator's status write", || condition(&get(&cp, "ec", Some(&n), "lb").unwrap(), "Valid")).await;
    let policy = || get(&cp, "ciliumnetworkpolicies.weft.io", Some(&n), "dns").unwrap();
    let (st, _, msg, _) = until("the operator's policy status", || condition(&policy(), "Valid")).await;
    assert_eq!(st, "False", "{msg}");
    assert!(msg.starts_with("spec.egress[0].toFQDNs: FQDN rules are not supported"), "{msg}");
    assert_eq!(
        get(&cp, "lease", Some("weft-system"), "weft-operator").unwrap()["spec"]["holderIdentity"],
        operator_pod.as_str()
    );
    // ...and nothing more.
    refused(
        &cp,
        &operator_kc,
        &["create", "secret", "generic", "stolen", "-n", &n, "--from-literal=a=b"],
        None,
        forbidden,
    );
    refused(&cp, &operator_kc, &["apply", "--server-side", "-f", "-"], Some(&own), forbidden);
    refused(&cp, &operator_kc, &["label", "node", &n2, "hacked=yes"], None, forbidden);
    let lease = format!("apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {{name: other, namespace: {n}}}\n");
    refused(&cp, &operator_kc, &["create", "-f", "-"], Some(&lease), forbidden);
    op.abort();
    drop(src);

    cp.kubectl_ok(&["delete", "pod", &agent1, &operator_pod, "-n", "weft-system", "--grace-period=0", "--force"]);
    cp.kubectl_ok(&["delete", "lease", "weft-operator", "-n", "weft-system"]);
    for node in [&n1, &n2] {
        cp.kubectl_ok(&["delete", "node", node]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_applies_nothing_until_every_kind_is_listed() {
    let cp = require_control_plane!();
    deploy::rbac(&cp);
    let ns = cp.namespace("partial");
    let n = ns.name.clone();
    // A ServiceAccount with the agent's ClusterRole but for Namespaces.
    let role = deploy::documents(&deploy::file("agent.yaml")).into_iter().find(|d| d["kind"] == "ClusterRole").unwrap();
    let mut partial = role.clone();
    partial["metadata"] = json!({"name": format!("{n}-partial")});
    let rules: Vec<Value> =
        role["rules"].as_array().unwrap().iter().filter(|r| r["resources"] != json!(["namespaces"])).cloned().collect();
    assert_eq!(rules.len() + 1, role["rules"].as_array().unwrap().len());
    partial["rules"] = json!(rules);
    cp.apply(&serde_json::to_string(&partial).unwrap());
    cp.kubectl_ok(&["create", "serviceaccount", "agent", "-n", &n]);
    let binding = format!("{n}-partial");
    cp.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        &binding,
        "--clusterrole",
        &binding,
        "--serviceaccount",
        &format!("{n}:agent"),
    ]);
    let kubeconfig = cp.service_account_kubeconfig(&n, "agent", None).unwrap();

    let cfg = weft_agent::config::AgentConfig {
        node_name: format!("{n}-node"),
        kubernetes: weft_agent::config::KubernetesOptions {
            enabled: true,
            kubeconfig: Some(kubeconfig),
            namespace: n.clone(),
        },
        ..Default::default()
    };
    // What `weft-agent run` does before it applies anything: it waits for
    // the first list of every kind, and one is forbidden.
    let start = tokio::spawn(async move { weft_agent::k8s::source::Source::start(&cfg).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(!start.is_finished(), "the agent went on with Namespaces unlisted");
    // Once it may list them, it goes on.
    partial["rules"] = role["rules"].clone();
    cp.apply(&serde_json::to_string(&partial).unwrap());
    tokio::time::timeout(Duration::from_secs(90), start)
        .await
        .expect("started once every kind is listed")
        .unwrap()
        .unwrap();
    cp.kubectl_ok(&["delete", "clusterrolebinding,clusterrole", &binding]);
}

/// The flow API's certificates (issue 10, secure by default), written with
/// the operator's own credentials and deploy/'s RBAC: a CA, a server
/// certificate per node named Hubble's way (`<node>.<cluster>.hubble-grpc.
/// weft.io`) and a client certificate, in Secrets of weft-system. A real
/// mutual-TLS handshake with them works, and only for the node's name.
/// Nothing is rewritten while nothing is due; leaves are renewed in the last
/// third of their life, a node that is gone loses its certificate, and a new
/// CA is trusted alongside the old one until the old one expires.
/// Certificates whose names are not the names wanted (unrecorded, another
/// cluster name, a renamed node) are issued again at once. (Later times are
/// passed in: a renewal is not waited for.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_api_certificates_are_issued_renewed_and_trusted() {
    use std::collections::{BTreeMap, BTreeSet};

    use k8s_openapi::api::core::v1::Secret;
    use weft_agent::operator::flowcerts::{CA_SECRET, CLIENT_SECRET, FlowCerts, Lifetimes, Renewed, SERVER_SECRET};
    use weft_flow::names::{flow_server_name, peer_service_server_name};

    let cp = require_control_plane!();
    deploy::rbac(&cp);
    let kc = cp.service_account_kubeconfig("weft-system", "weft-operator", None).unwrap();
    let day = 86400;
    let life = Lifetimes { ca: Duration::from_secs(3000 * day), leaf: Duration::from_secs(90 * day) };
    let certs = FlowCerts::new(cp.client_for(&kc).await, "weft-system", "lab", "weft-operator/test", life);
    let admin: kube::Api<Secret> = kube::Api::namespaced(cp.client().await, "weft-system");
    let read = |name: &'static str| {
        let admin = admin.clone();
        async move {
            let s = admin.get(name).await.unwrap();
            let data: BTreeMap<String, String> =
                s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, String::from_utf8(v.0).unwrap())).collect();
            (s.metadata.resource_version.unwrap(), data)
        }
    };
    let nodes = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    let t0 = weft_flow::time::now_ns() / 1_000_000_000;

    let r = certs.reconcile(&nodes(&["n1", "n2.example"]), t0).await.unwrap();
    let want = Renewed { ca: true, servers: vec!["n1".into(), "n2.example".into()], removed: vec![], client: true };
    assert_eq!(r, want);
    let (ca_rv, ca) = read(CA_SECRET).await;
    let (server_rv, server) = read(SERVER_SECRET).await;
    let (client_rv, client) = read(CLIENT_SECRET).await;
    let keys: Vec<&str> = server.keys().map(String::as_str).collect();
    assert_eq!(keys, ["ca.crt", "n1.crt", "n1.key", "n2.example.crt", "n2.example.key"]);
    assert_eq!(server["ca.crt"], ca["tls.crt"]);
    assert_eq!(client["ca.crt"], ca["tls.crt"]);
    let n1 = flow_server_name("n1", "lab");
    assert_eq!(n1, "n1.lab.hubble-grpc.weft.io");
    let serves = |node: &str, name: String| {
        mutual_tls_works(
            &server[&format!("{node}.crt")],
            &server[&format!("{node}.key")],
            &server["ca.crt"],
            &client,
            name,
        )
    };
    assert!(serves("n1", n1.clone()).await, "n1's certificate, its client and CA");
    assert!(serves("n2.example", flow_server_name("n2.example", "lab")).await);
    assert!(!serves("n1", flow_server_name("n2.example", "lab")).await, "n1's certificate is not n2's");
    let mut stranger = client.clone();
    stranger.insert("tls.crt".into(), server["n1.crt"].clone()); // a server certificate is no client's
    stranger.insert("tls.key".into(), server["n1.key"].clone());
    assert!(!mutual_tls_works(&server["n1.crt"], &server["n1.key"], &server["ca.crt"], &stranger, n1.clone()).await);

    // Nothing due: nothing written.
    assert_eq!(certs.reconcile(&nodes(&["n1", "n2.example"]), t0 + day).await.unwrap(), Renewed::default());
    assert_eq!(read(CA_SECRET).await.0, ca_rv);
    assert_eq!(read(SERVER_SECRET).await.0, server_rv);
    assert_eq!(read(CLIENT_SECRET).await.0, client_rv);

    // 61 days on, 29 of 90 left: the leaves are renewed, the CA stays; n2 is gone.
    let t1 = t0 + 61 * day;
    let r = certs.reconcile(&nodes(&["n1"]), t1).await.unwrap();
    assert_eq!(r, Renewed { ca: false, servers: vec!["n1".into()], removed: vec!["n2.example".into()], client: true });
    let (_, server1) = read(SERVER_SECRET).await;
    assert_eq!(server1.keys().map(String::as_str).collect::<Vec<_>>(), ["ca.crt", "n1.crt", "n1.key"]);
    assert_ne!(server1["n1.crt"], server["n1.crt"]);
    assert_ne!(read(CLIENT_SECRET).await.1["tls.crt"], client["tls.crt"]);
    assert_eq!(read(CA_SECRET).await.1, ca);

    // 2001 days on, 999 of 3000 left: a new CA, trusted with the old one;
    // every leaf is issued again by it.
    let t2 = t0 + 2001 * day;
    let r = certs.reconcile(&nodes(&["n1"]), t2).await.unwrap();
    assert_eq!(r, Renewed { ca: true, servers: vec!["n1".into()], removed: vec![], client: true });
    let (_, ca2) = read(CA_SECRET).await;
    assert_ne!(ca2["tls.crt"], ca["tls.crt"]);
    assert_eq!(ca2["ca.crt"], format!("{}{}", ca2["tls.crt"], ca["tls.crt"]), "new and old CA trusted");
    assert_eq!(read(SERVER_SECRET).await.1["ca.crt"], ca2["ca.crt"]);
    assert_eq!(read(CLIENT_SECRET).await.1["ca.crt"], ca2["ca.crt"]);

    // Once the old CA has expired, only the new one is trusted.
    let t3 = t0 + 3001 * day;
    let r = certs.reconcile(&nodes(&["n1"]), t3).await.unwrap();
    assert!(!r.ca, "{r:?}");
    let (_, ca3) = read(CA_SECRET).await;
    assert_eq!(ca3["ca.crt"], ca2["tls.crt"]);
    assert_eq!(read(SERVER_SECRET).await.1["ca.crt"], ca2["tls.crt"]);

    // Each certificate's names are recorded. Certificates whose names were
    // not (issued before they were, or for names an upgrade changed) are
    // issued again at once, in the same Secrets; the CA stays.
    let names = |s: Secret| -> BTreeMap<String, Vec<String>> {
        serde_json::from_str(&s.metadata.annotations.unwrap_or_default()["weft.io/names"]).unwrap()
    };
    let want = vec![flow_server_name("n1", "lab"), peer_service_server_name("lab")];
    assert_eq!(names(admin.get(SERVER_SECRET).await.unwrap()), BTreeMap::from([("n1.crt".to_owned(), want)]));
    let forget = serde_json::json!({"metadata": {"annotations": {"weft.io/names": null}}});
    for name in [SERVER_SECRET, CLIENT_SECRET] {
        admin.patch(name, &Default::default(), &kube::api::Patch::Merge(&forget)).await.unwrap();
    }
    let (_, server3) = read(SERVER_SECRET).await;
    let r = certs.reconcile(&nodes(&["n1"]), t3).await.unwrap();
    assert_eq!(r, Renewed { ca: false, servers: vec!["n1".into()], removed: vec![], client: true });
    assert_ne!(read(SERVER_SECRET).await.1["n1.crt"], server3["n1.crt"]);
    assert_eq!(certs.reconcile(&nodes(&["n1"]), t3).await.unwrap(), Renewed::default(), "recorded again");

    // Another cluster name: the CA (named after the cluster) is replaced,
    // the old one trusted beside it until it expires, and
    // every leaf is issued again for the new names, in the same Secrets.
    // (At today's time again: the handshakes below need certificates valid now.)
    let now = weft_flow::time::now_ns() / 1_000_000_000;
    let renamed = FlowCerts::new(cp.client_for(&kc).await, "weft-system", "lab-b", "weft-operator/test", life);
    let r = renamed.reconcile(&nodes(&["n1"]), now).await.unwrap();
    assert_eq!(r, Renewed { ca: true, servers: vec!["n1".into()], removed: vec![], client: true });
    let (_, ca4) = read(CA_SECRET).await;
    assert_ne!(ca4["tls.crt"], ca2["tls.crt"]);
    assert_eq!(ca4["ca.crt"], format!("{}{}", ca4["tls.crt"], ca2["tls.crt"]), "new and old CA trusted");
    let (_, server4) = read(SERVER_SECRET).await;
    let (_, client4) = read(CLIENT_SECRET).await;
    assert_eq!((&server4["ca.crt"], &client4["ca.crt"]), (&ca4["ca.crt"], &ca4["ca.crt"]));
    let serves4 =
        |name: String| mutual_tls_works(&server4["n1.crt"], &server4["n1.key"], &ca4["ca.crt"], &client4, name);
    assert!(serves4(flow_server_name("n1", "lab-b")).await, "n1's certificate for the new cluster name");
    assert!(serves4(peer_service_server_name("lab-b")).await);
    assert!(!serves4(flow_server_name("n1", "lab")).await, "not for the old one");
    assert_eq!(renamed.reconcile(&nodes(&["n1"]), now).await.unwrap(), Renewed::default());
    // A renamed node is a new node: its certificate is issued, the old
    // name's goes.
    let r = renamed.reconcile(&nodes(&["n1-b"]), now).await.unwrap();
    assert_eq!(r, Renewed { ca: false, servers: vec!["n1-b".into()], removed: vec!["n1".into()], client: false });
    let (_, server5) = read(SERVER_SECRET).await;
    assert_eq!(server5.keys().map(String::as_str).collect::<Vec<_>>(), ["ca.crt", "n1-b.crt", "n1-b.key"]);
    for name in [CA_SECRET, SERVER_SECRET, CLIENT_SECRET] {
        admin.delete(name, &Default::default()).await.unwrap();
    }
}

/// Whether a flow API serving `cert`/`key` and asking for client
/// certificates of `ca` answers a client with the client Secret's
/// certificate, verifying the server as `name`.
async fn mutual_tls_works(
    cert: &str,
    key: &str,
    ca: &str,
    client: &std::collections::BTreeMap<String, String>,
    name: String,
) -> bool {
    use weft_flow::client::{self, Address, TlsClient};
    use weft_observe::{
        api::server::{self, Listen, Tls, TlsSource},
        pipeline::{Pipeline, PipelineConfig, enrich::Names},
    };
    let (pipeline, _feed) = Pipeline::start(PipelineConfig::default(), Names::default());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tls = Tls { cert_pem: cert.into(), key_pem: key.into(), client_ca_pem: Some(ca.into()) };
    let listen =
        Listen { tcp: Some(([127, 0, 0, 1], port).into()), tls: Some(TlsSource::fixed(tls)), ..Default::default() };
    let served = tokio::spawn(server::serve(pipeline.clone(), listen));
    let tls = TlsClient {
        ca_pem: Some(client["ca.crt"].clone().into_bytes()),
        server_name: Some(name),
        identity: Some((client["tls.crt"].clone().into_bytes(), client["tls.key"].clone().into_bytes())),
    };
    let addr = Address::parse(&format!("tls://127.0.0.1:{port}")).unwrap();
    let mut ok = false;
    for _ in 0..20 {
        match client::observer_tls(&addr, &tls).await {
            Ok(mut c) => {
                ok = c.server_status(weft_flow::proto::observer::ServerStatusRequest {}).await.is_ok();
                break;
            }
            // Not listening yet, or refused: try again a few times.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    served.abort();
    pipeline.stop();
    ok
}

/// The operator with `--flow-certs` issues a server certificate for a Node
/// as it appears and drops it once the Node is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_issues_flow_certificates_as_nodes_come_and_go() {
    use k8s_openapi::api::core::v1::Secret;

    let cp = require_control_plane!();
    let _one = OPERATORS.lock().await;
    // The operator starts once every kind it watches is listed, weft's
    // own among them (run alone, no other test had installed them).
    deploy::crds(&cp);
    let ns = cp.namespace("flowcerts");
    let node = format!("{}-node", ns.name);
    let opts = weft_agent::operator::OperatorOptions {
        namespace: ns.name.clone(),
        identity: format!("{}-operator", ns.name),
        lease_duration: Duration::from_secs(1),
        flow_certs: Some(Default::default()),
        ..Default::default()
    };
    let client = cp.client().await;
    let op = tokio::spawn(async move { weft_agent::operator::run(client, opts).await.unwrap() });
    let secrets: kube::Api<Secret> = kube::Api::namespaced(cp.client().await, &ns.name);
    let has = |secrets: kube::Api<Secret>, key: String| async move {
        let s = secrets.get_opt("weft-flows-server").await.ok().flatten()?;
        Some(s.data.unwrap_or_default().contains_key(&key))
    };
    cp.apply(&format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\n"));
    let deadline = Instant::now() + Duration::from_secs(60);
    while has(secrets.clone(), format!("{node}.crt")).await != Some(true) {
        assert!(Instant::now() < deadline, "no certificate for the new Node");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for s in ["weft-flows-ca", "weft-flows-client"] {
        assert!(secrets.get_opt(s).await.unwrap().is_some(), "{s}");
    }
    cp.kubectl_ok(&["delete", "node", &node]);
    while has(secrets.clone(), format!("{node}.crt")).await != Some(false) {
        assert!(Instant::now() < deadline, "the deleted Node's certificate stays");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    op.abort();
}
