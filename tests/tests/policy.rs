//! Network policy on real packets (issue: policy): agents on both lab nodes
//! read policies from their objects directory; pods connect (or fail to)
//! over the lab's veths, and every decision is read back as a flow through
//! `weft observe` and counted in the metrics.

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use serde_json::{Value, json};
use weft_tests::{
    envoylab::EnvoyLab,
    flows::{agent_get, flows_of, metric_sum, observe_json, wait_for},
    http::{Client, EchoPod, HttpServer, ServerOpts, get_once},
    lab::Lab,
    objects::{LabService, PodLook, agent_status, http_envoy_config, lab_objects_with},
    require_root,
    scenario::sa,
};

/// A short timeout for connections policy is expected to drop.
const DENIED: Duration = Duration::from_millis(400);
const DB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);

fn look(ns: &str, app: &str) -> PodLook {
    PodLook { namespace: ns.into(), labels: vec![("app".into(), app.into())], ports: vec![("http".into(), 8080)] }
}

/// n1-p1 is the client (default/client); n1-p2 default/db, n2-p1
/// default/web, n2-p2 shop/db, each serving HTTP on 8080 (port name
/// `http`); Services db (-> n2-p2) and web (-> n2-p1). Then `policies`.
fn objects(lab: &Lab, policies: &str) -> String {
    let looks = BTreeMap::from([
        ("n1-p1", look("default", "client")),
        ("n1-p2", look("default", "db")),
        ("n2-p1", look("default", "web")),
        ("n2-p2", look("shop", "db")),
    ]);
    let services = [LabService::new("db", DB_VIP, 80, &["n2-p2"]), LabService::new("web", WEB_VIP, 80, &["n2-p1"])];
    format!("{}{policies}", lab_objects_with(lab, &services, &looks))
}

/// Whether n1-p1 gets an answer from `to`.
fn reaches(env: &EnvoyLab, to: std::net::SocketAddr) -> bool {
    match get_once(&env.lab.pod("n1-p1").netns, to, "/", DENIED) {
        Ok((r, _, _)) => r.status == 200,
        Err(_) => false,
    }
}

/// Flows of node1 matching `weft observe` filter arguments.
fn observed(env: &EnvoyLab, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--all"];
    all.extend_from_slice(args);
    let r = observe_json(&env.files[0], &all).unwrap_or_else(|e| env.fail(e));
    flows_of(&r).into_iter().cloned().collect()
}

fn pod<'a>(f: &'a Value, side: &str) -> &'a str {
    f[side]["pod_name"].as_str().unwrap_or("")
}

const CLIENT_EGRESS: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-out, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: db}}}]
    ports: [{port: http}]
  - to: [{ipBlock: {cidr: 192.168.50.0/24, except: [192.168.50.100/32]}}]
    ports: [{port: 8000, endPort: 8100}]
";

const CLIENT_EGRESS_WORLD: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-out, namespace: default}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 192.168.50.96/28}}]
    ports: [{port: 8000, endPort: 8100, protocol: TCP}]
";

#[test]
fn egress_network_policy_judges_the_real_destination_and_lets_replies_back() {
    require_root!();
    let env = EnvoyLab::new(|lab| objects(lab, ""));
    let lab = &env.lab;
    let ext = HttpServer::start(&lab.ext_netns, sa(lab.ext_ip, 8080), ServerOpts::default()).unwrap();
    let ip = |p: &str| lab.pod(p).ip;
    // No policy: everything is reachable.
    for to in [sa(ip("n1-p2"), 8080), sa(ip("n2-p1"), 8080), sa(WEB_VIP, 80), sa(lab.ext_ip, 8080)] {
        assert!(reaches(&env, to), "{to} before any policy");
    }

    env.apply(&objects(lab, CLIENT_EGRESS));
    // Pods labelled db in any namespace, on their port named http: local and remote.
    assert!(reaches(&env, sa(ip("n1-p2"), 8080)), "local db");
    assert!(reaches(&env, sa(ip("n2-p2"), 8080)), "remote db in another namespace");
    // A Service is judged on the backend it was translated to.
    assert!(reaches(&env, sa(DB_VIP, 80)), "Service db (backend n2-p2)");
    assert!(!reaches(&env, sa(WEB_VIP, 80)), "Service web (backend n2-p1, not a db)");
    assert!(!reaches(&env, sa(ip("n2-p1"), 8080)), "web directly");
    // The block's exception is not allowed.
    assert!(!reaches(&env, sa(lab.ext_ip, 8080)), "the excepted address");
    // Others still reach the client's neighbours: the policy is the client's egress only.
    assert!(get_once(&lab.pod("n2-p1").netns, sa(ip("n1-p2"), 8080), "/", DENIED).is_ok());

    // Every decision is a flow: allowed and denied verdicts, egress, with the
    // backend (not the frontend) as destination, and the drops' reason.
    wait_for(Duration::from_secs(10), "egress verdicts", || {
        let v = observed(&env, &["--type", "policy-verdict", "--traffic-direction", "egress"]);
        (v.iter().any(|f| f["verdict"] == "DROPPED") && v.iter().any(|f| f["verdict"] == "FORWARDED")).then_some(())
    })
    .unwrap_or_else(|e| env.fail(e));
    let denied = observed(&env, &["--type", "policy-verdict", "--verdict", "DROPPED", "--traffic-direction", "egress"]);
    assert!(denied.iter().all(|f| pod(f, "source") == "n1-p1" && f["traffic_direction"] == "EGRESS"), "{denied:?}");
    let to_web: Vec<&Value> = denied.iter().filter(|f| pod(f, "destination") == "n2-p1").collect();
    assert!(!to_web.is_empty(), "the denied connections to web: {denied:?}");
    assert!(
        to_web
            .iter()
            .all(|f| f["l4"]["TCP"]["destination_port"] == 8080 && f["policy_match_type"].as_u64().unwrap_or(0) == 0),
        "{to_web:?}"
    );
    assert!(denied.iter().any(|f| f["IP"]["destination"] == lab.ext_ip.to_string()), "{denied:?}");
    let drops = observed(&env, &["--type", "drop", "--from-pod", "default/n1-p1"]);
    assert!(!drops.is_empty());
    for d in &drops {
        assert_eq!(d["drop_reason_desc"], "POLICY_DENIED", "{d}");
        assert_eq!(d["traffic_direction"], "EGRESS", "{d}");
    }
    let allowed =
        observed(&env, &["--type", "policy-verdict", "--verdict", "FORWARDED", "--from-pod", "default/n1-p1"]);
    let to_db = allowed.iter().find(|f| pod(f, "destination") == "n2-p2").expect("an allowed verdict for shop/db");
    assert_eq!(to_db["destination"]["namespace"], "shop");
    assert_eq!(to_db["policy_match_type"], 2, "L3-L4: the peer and its port");
    assert_eq!(to_db["egress_allowed_by"][0]["name"], "client-out");
    assert_eq!(to_db["egress_allowed_by"][0]["kind"], "NetworkPolicy");
    // Ingress filters leave the egress verdicts out.
    let ingress = observed(&env, &["--type", "policy-verdict", "--traffic-direction", "ingress"]);
    assert!(ingress.is_empty(), "{ingress:?}");
    // Metrics by direction, match and action.
    let m = agent_get(lab, 0, "/metrics").unwrap();
    let count = |labels: &[(&str, &str)]| metric_sum(&m, "weft_policy_verdicts_total", labels);
    assert!(count(&[("direction", "egress"), ("action", "dropped"), ("match", "none")]) >= 3.0, "{m}");
    assert!(count(&[("direction", "egress"), ("action", "forwarded"), ("match", "l3-l4")]) >= 3.0, "{m}");

    // A block around the outside address, on a port range: reachable, and
    // its replies come back though nothing allows them as connections.
    env.apply(&objects(lab, CLIENT_EGRESS_WORLD));
    assert!(reaches(&env, sa(lab.ext_ip, 8080)), "the outside address in the block");
    assert!(!reaches(&env, sa(ip("n1-p2"), 8080)), "pods are not in an address block");
    drop(ext);
}

/// db (default) takes its port `http` from the client only; shop/db is in
/// another namespace, so the namespaced policy leaves it alone.
const DB_IN: &str = "---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-in, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {k8s:app: client}}]
    toPorts: [{ports: [{port: http, protocol: TCP}]}]
";

/// The client's egress (weft.io's kind): `rules`, then a deny rule for web
/// that wins over any allow.
fn client_out(rules: &str) -> String {
    format!(
        "---
apiVersion: weft.io/v1alpha1
kind: CiliumClusterwideNetworkPolicy
metadata: {{name: client-out}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
{rules}  egressDeny:
  - toEndpoints: [{{matchLabels: {{app: web}}}}]
"
    )
}

/// The cluster entity on port 8080.
const TO_CLUSTER: &str = "  - toEntities: [cluster]\n    toPorts: [{ports: [{port: \"8080\"}]}]\n";

#[test]
fn cilium_policies_allow_by_endpoint_entity_and_cidr_and_deny_wins() {
    require_root!();
    let env = EnvoyLab::new(|lab| objects(lab, ""));
    let lab = &env.lab;
    let ext = HttpServer::start(&lab.ext_netns, sa(lab.ext_ip, 8080), ServerOpts::default()).unwrap();
    let ext2 = HttpServer::start(&lab.ext_netns, sa(lab.ext_ip, 8081), ServerOpts::default()).unwrap();
    let node_servers: Vec<HttpServer> = lab
        .nodes
        .iter()
        .map(|n| HttpServer::start(&n.netns, sa(n.ip, 18080), ServerOpts::default()).unwrap())
        .collect();
    let ip = |p: &str| lab.pod(p).ip;
    let from = |pod: &str, to| get_once(&lab.pod(pod).netns, to, "/", DENIED).is_ok_and(|(r, _, _)| r.status == 200);
    let from_node2 = |to| get_once(&lab.nodes[1].netns, to, "/", DENIED).is_ok_and(|(r, _, _)| r.status == 200);

    env.apply(&objects(lab, &format!("{DB_IN}{}", client_out(TO_CLUSTER))));
    // Ingress: the client's connections to db pass, web's are dropped; the
    // other namespace's db is not selected.
    assert!(reaches(&env, sa(ip("n1-p2"), 8080)), "client -> db");
    assert!(!from("n2-p1", sa(ip("n1-p2"), 8080)), "web -> db");
    assert!(from("n2-p1", sa(ip("n2-p2"), 8080)), "web -> shop/db");
    // Egress: the cluster entity admits shop/db (another node, another
    // namespace) and its Service; the deny rule wins for web; the outside is
    // not the cluster.
    assert!(reaches(&env, sa(ip("n2-p2"), 8080)), "client -> shop/db");
    assert!(reaches(&env, sa(DB_VIP, 80)), "client -> Service db");
    assert!(!reaches(&env, sa(ip("n2-p1"), 8080)), "client -> web (denied)");
    assert!(!reaches(&env, sa(WEB_VIP, 80)), "client -> Service web (denied)");
    assert!(!reaches(&env, sa(lab.ext_ip, 8080)), "client -> outside");
    // toPorts: the cluster on another port is not allowed.
    assert!(!reaches(&env, sa(lab.nodes[0].ip, 18080)), "client -> its node on 18080");

    // Verdicts name the Cilium kinds and the direction.
    let db_in = ["--type", "policy-verdict", "--traffic-direction", "ingress", "--to-pod", "default/n1-p2"];
    wait_for(Duration::from_secs(10), "ingress verdicts for db", || {
        let v = observed(&env, &db_in);
        (v.iter().any(|f| f["verdict"] == "DROPPED") && v.iter().any(|f| f["verdict"] == "FORWARDED")).then_some(())
    })
    .unwrap_or_else(|e| env.fail(e));
    let ingress = observed(&env, &db_in);
    let allowed =
        ingress.iter().find(|f| f["verdict"] == "FORWARDED").unwrap_or_else(|| env.fail("no allowed verdict"));
    assert_eq!(pod(allowed, "source"), "n1-p1", "{allowed}");
    assert_eq!(allowed["ingress_allowed_by"][0]["kind"], "CiliumNetworkPolicy", "{allowed}");
    assert_eq!(allowed["ingress_allowed_by"][0]["name"], "db-in", "{allowed}");
    assert_eq!(allowed["policy_match_type"], 2, "L3-L4: the peer and its port: {allowed}");
    assert!(ingress.iter().filter(|f| f["verdict"] == "DROPPED").all(|f| pod(f, "source") == "n2-p1"), "{ingress:?}");
    let egress =
        observed(&env, &["--type", "policy-verdict", "--traffic-direction", "egress", "--from-pod", "default/n1-p1"]);
    let to_shop = egress.iter().find(|f| pod(f, "destination") == "n2-p2" && f["verdict"] == "FORWARDED");
    let to_shop = to_shop.unwrap_or_else(|| env.fail(format!("no allowed verdict for shop/db: {egress:?}")));
    assert_eq!(to_shop["egress_allowed_by"][0]["kind"], "CiliumClusterwideNetworkPolicy", "{to_shop}");
    assert_eq!(to_shop["egress_allowed_by"][0]["name"], "client-out", "{to_shop}");
    let to_web = egress.iter().find(|f| pod(f, "destination") == "n2-p1" && f["verdict"] == "DROPPED");
    let to_web = to_web.unwrap_or_else(|| env.fail(format!("no denied verdict for web: {egress:?}")));
    assert_eq!(to_web["egress_denied_by"][0]["name"], "client-out", "{to_web}");
    let drops = observed(&env, &["--type", "drop", "--from-pod", "default/n1-p1"]);
    assert!(!drops.is_empty());
    for d in &drops {
        // A deny rule's drop says so (Hubble's POLICY_DENY); default-deny's is POLICY_DENIED.
        let reason = if pod(d, "destination") == "n2-p1" { "POLICY_DENY" } else { "POLICY_DENIED" };
        assert_eq!((&d["drop_reason_desc"], &d["traffic_direction"]), (&json!(reason), &json!("EGRESS")), "{d}");
    }

    // world on 8080, host on any port, and the node network on any port
    // but for the other node; fromCIDR admits the other node to db (a block
    // covers the nodes whose address it contains).
    let rules = format!(
        "  - toEntities: [world]\n    toPorts: [{{ports: [{{port: \"8080\", protocol: TCP}}]}}]\n\
         \x20 - toEntities: [host]\n\
         \x20 - toCIDRSet: [{{cidr: 192.168.50.0/24, except: [{}/32]}}]\n",
        lab.nodes[1].ip
    );
    assert!(!from_node2(sa(ip("n1-p2"), 8080)), "the other node -> db before fromCIDR");
    let db_from_node2 = format!("  - fromCIDR: [{}/32]\n", lab.nodes[1].ip);
    env.apply(&objects(lab, &format!("{DB_IN}{db_from_node2}{}", client_out(&rules))));
    assert!(reaches(&env, sa(lab.ext_ip, 8080)), "client -> world on 8080");
    assert!(reaches(&env, sa(lab.ext_ip, 8081)), "client -> the outside address on 8081: the CIDR set");
    assert!(reaches(&env, sa(lab.nodes[0].ip, 18080)), "client -> its node (host)");
    assert!(!reaches(&env, sa(lab.nodes[1].ip, 18080)), "client -> the other node: the set's exception, not host");
    assert!(!reaches(&env, sa(ip("n1-p2"), 8080)), "client -> db: a pod is neither world nor in a CIDR rule");
    assert!(!reaches(&env, sa(ip("n2-p1"), 8080)), "client -> web");
    assert!(from_node2(sa(ip("n1-p2"), 8080)), "the other node -> db by fromCIDR");
    assert!(!from("n2-p1", sa(ip("n1-p2"), 8080)), "web -> db still dropped");

    // A refused rule (an FQDN rule) allows nothing and says so in /status;
    // the readable rules still apply.
    let fqdn = format!("{TO_CLUSTER}  - toFQDNs: [{{matchName: example.com}}]\n");
    env.apply(&objects(lab, &format!("{DB_IN}{}", client_out(&fqdn))));
    assert!(reaches(&env, sa(ip("n2-p2"), 8080)), "the readable rule still applies");
    let status = agent_get(lab, 0, "/status").unwrap();
    assert!(
        status.contains(
            "CiliumClusterwideNetworkPolicy client-out: spec.egress[1].toFQDNs: FQDN rules are not supported"
        ),
        "{status}"
    );
    drop((ext, ext2, node_servers));
}

/// Two of Cilium's own examples, applied verbatim: `external-lockdown`
/// (every pod takes ingress from the cluster only) and
/// `allow-ingress-cluster` (pods labelled `ingress` may only reach the
/// cluster). The lab's outside client reaches pods only through NodePorts,
/// so the lockdown shows as the verdicts of what the cluster may still do.
#[test]
fn cilium_example_policies_are_enforced_verbatim() {
    require_root!();
    let example = |f: &str| std::fs::read_to_string(weft_tests::objects::conformance_dir().join(f)).unwrap();
    let mut looks = BTreeMap::from([("n1-p1", look("default", "client")), ("n2-p1", look("default", "web"))]);
    if let Some(l) = looks.get_mut("n1-p1") {
        l.labels.push(("ingress".into(), "envoy".into()));
    }
    let with = |lab: &Lab, extra: &str| format!("{}{extra}", lab_objects_with(lab, &[], &looks));
    let env = EnvoyLab::new(|lab| with(lab, ""));
    let lab = &env.lab;
    let ext = HttpServer::start(&lab.ext_netns, sa(lab.ext_ip, 8080), ServerOpts::default()).unwrap();
    let ip = |p: &str| lab.pod(p).ip;
    assert!(reaches(&env, sa(lab.ext_ip, 8080)), "client -> outside before any policy");

    let policies: String = ["policy/external-lockdown.yaml", "policy/allow-ingress-cluster.yaml"]
        .iter()
        .map(|f| format!("---\n{}\n", example(f).trim_start_matches("---").trim_start()))
        .collect();
    env.apply(&with(lab, &policies));
    assert!(get_once(&lab.pod("n2-p1").netns, sa(ip("n1-p2"), 8080), "/", DENIED).is_ok(), "web -> a pod: the cluster");
    let node2 = get_once(&lab.nodes[1].netns, sa(ip("n1-p2"), 8080), "/", DENIED);
    assert!(node2.is_ok(), "the other node -> a pod: the cluster");
    assert!(reaches(&env, sa(ip("n2-p1"), 8080)), "client (ingress) -> web: the cluster");
    assert!(!reaches(&env, sa(lab.ext_ip, 8080)), "client (ingress) -> outside");
    // Every pod of node1 is under the lockdown: its allowed connections name it.
    let allowed = ["--type", "policy-verdict", "--traffic-direction", "ingress", "--to-pod", "default/n1-p2"];
    wait_for(Duration::from_secs(10), "lockdown verdicts", || {
        let v = observed(&env, &allowed);
        v.iter()
            .any(|f| f["ingress_allowed_by"][0]["name"] == "external-lockdown" && f["verdict"] == "FORWARDED")
            .then_some(())
    })
    .unwrap_or_else(|e| env.fail(e));
    let out = observed(&env, &["--type", "policy-verdict", "--verdict", "DROPPED", "--from-pod", "default/n1-p1"]);
    assert!(
        out.iter().any(|f| f["egress_denied_by"].is_null() && f["IP"]["destination"] == lab.ext_ip.to_string()),
        "{out:?}"
    );
    let status = agent_get(lab, 0, "/status").unwrap();
    assert!(!status.contains("CiliumClusterwideNetworkPolicy"), "no problem with the examples: {status}");
    drop(ext);
}

/// One request from `from` on a fresh connection: (status, body), or None
/// when the connection is refused or dropped.
fn request(env: &EnvoyLab, from: &str, to: std::net::SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    // Through the proxy: its first upstream connection takes a moment.
    let stream = weft_tests::http::connect_in(&env.lab.pod(from).netns, to, DENIED).ok()?;
    let mut c = Client::from_stream(stream, Duration::from_secs(3)).ok()?;
    let r = c.request(method, "echo", path, &[("connection", "close")]).ok()?;
    Some((r.status, r.body))
}

/// Cilium's L7 examples, applied unchanged: `cnp-without-mutual-auth`
/// (ingress: pod-worker may `GET /headers` on echo's port 3000) and
/// `client-egress-l7-http` (egress: the client may `GET /` on echo pods'
/// 8080; its toFQDNs rule is refused by name, the rest applies). Requests go
/// through node1's Envoy: allowed ones reach the pod, others get 403
/// `Access denied`, and both show as L7 flows naming the policy. A policy
/// change applies to the next request of an open connection.
#[test]
fn cilium_http_rules_are_enforced_in_the_nodes_envoy() {
    require_root!();
    let example = |f: &str| std::fs::read_to_string(weft_tests::objects::conformance_dir().join(f)).unwrap();
    let labels = |l: &[(&str, &str)]| PodLook {
        namespace: "default".into(),
        labels: l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ports: vec![("http".into(), 8080)],
    };
    let looks = BTreeMap::from([
        ("n1-p1", labels(&[("other", "client")])),
        ("n1-p2", labels(&[("app", "echo")])),
        ("n2-p1", labels(&[("kind", "echo")])),
        ("n2-p2", labels(&[("app", "pod-worker")])),
    ]);
    let with = |lab: &Lab, extra: &str| format!("{}{extra}", lab_objects_with(lab, &[], &looks));
    let env = EnvoyLab::new(|lab| with(lab, ""));
    let lab = &env.lab;
    let ip = |p: &str| lab.pod(p).ip;
    let echo = sa(ip("n1-p2"), 3000);
    let _echo3000 =
        HttpServer::start(&lab.pod("n1-p2").netns, echo, ServerOpts { name: "echo".into(), ..Default::default() })
            .unwrap();
    assert_eq!(request(&env, "n2-p2", echo, "GET", "/anything").map(|r| r.0), Some(200), "before any policy");

    let policies: String = ["cnp-without-mutual-auth.yaml", "envoy/client-egress-l7-http.yaml"]
        .iter()
        .map(|f| format!("---\n{}\n", example(f).trim_start_matches("---").trim_start()))
        .collect();
    env.apply(&with(lab, &policies));
    env.acked("ClusterwideEnvoyConfig weft:policy");
    let status = agent_get(lab, 0, "/status").unwrap();
    assert!(status.contains("client-egress-l7-http: spec.egress[1].toFQDNs: FQDN rules are not supported"), "{status}");

    // Ingress (n1-p2, port 3000): pod-worker (on the other node) may GET
    // /headers, nothing else.
    let ok = request(&env, "n2-p2", echo, "GET", "/headers");
    if ok.as_ref().map(|r| r.0) != Some(200) {
        let flows: Vec<String> = observed(&env, &[])
            .iter()
            .map(|f| format!("{} {} {}", f["Summary"], f["verdict"], f["drop_reason_desc"]))
            .collect();
        env.fail(format!("GET /headers: {ok:?}; node1's flows:\n{}", flows.join("\n")));
    }
    for (method, path) in [("GET", "/private"), ("POST", "/headers")] {
        let r = request(&env, "n2-p2", echo, method, path);
        assert_eq!(r, Some((403, "Access denied".into())), "{method} {path}");
    }
    // Others are not let in at all (the L3 part of the rule).
    assert_eq!(request(&env, "n2-p1", echo, "GET", "/headers"), None, "n2-p1 is not pod-worker");

    // Egress (the client to kind=echo on 8080, on the other node): GET / only.
    // The flows of node1 show both: the ingress requests came to its Envoy.
    let web = sa(ip("n2-p1"), 8080);
    assert_eq!(request(&env, "n1-p1", web, "GET", "/").map(|r| r.0), Some(200), "GET / to echo");
    assert_eq!(request(&env, "n1-p1", web, "GET", "/x"), Some((403, "Access denied".into())), "GET /x to echo");
    assert_eq!(request(&env, "n1-p1", sa(ip("n2-p2"), 8080), "GET", "/"), None, "not an echo pod");
    assert_eq!(request(&env, "n1-p1", echo, "GET", "/headers"), None, "the client's egress allows echo pods only");

    // Every request is an L7 flow: the refused ones DROPPED, naming the policy.
    let dropped = |v: &[Value], path: &str| {
        v.iter()
            .find(|f| {
                f["l7"]["type"] == "REQUEST" && f["l7"]["http"]["url"].as_str().is_some_and(|u| u.ends_with(path))
            })
            .cloned()
    };
    let (ingress, egress) = wait_for(Duration::from_secs(15), "the refused requests' flows", || {
        let v = observed(&env, &["--type", "l7", "--verdict", "DROPPED"]);
        Some((dropped(&v, "/private")?, dropped(&v, "/x")?))
    })
    .unwrap_or_else(|e| env.fail(e));
    assert_eq!(ingress["ingress_denied_by"][0]["name"], "no-mutual-auth-echo", "{ingress}");
    assert_eq!(ingress["ingress_denied_by"][0]["kind"], "CiliumNetworkPolicy", "{ingress}");
    assert_eq!(ingress["traffic_direction"], "INGRESS", "{ingress}");
    assert_eq!(pod(&ingress, "destination"), "n1-p2");
    assert_eq!(egress["egress_denied_by"][0]["name"], "client-egress-l7-http", "{egress}");
    assert_eq!(egress["traffic_direction"], "EGRESS", "{egress}");
    // The 403 follows as a response flow; the allowed request passed, named.
    let all = observed(&env, &["--type", "l7"]);
    assert!(
        all.iter().any(|f| f["l7"]["type"] == "RESPONSE"
            && f["l7"]["http"]["code"] == 403
            && f["l7"]["http"]["url"].as_str().is_some_and(|u| u.ends_with("/private"))),
        "{all:?}"
    );
    let allowed = all
        .iter()
        .find(|f| {
            f["l7"]["type"] == "REQUEST"
                && f["verdict"] == "FORWARDED"
                && f["l7"]["http"]["url"].as_str().is_some_and(|u| u.ends_with("/headers"))
        })
        .unwrap_or_else(|| panic!("the allowed request: {all:?}"));
    assert_eq!(allowed["ingress_allowed_by"][0]["name"], "no-mutual-auth-echo", "{allowed}");
    // Each request the policy listener decided is a policy verdict too.
    let m = agent_get(lab, 0, "/metrics").unwrap();
    let l7 = |direction: &str, action: &str| {
        let labels = [("direction", direction), ("match", "l7/http"), ("action", action)];
        metric_sum(&m, "weft_policy_verdicts_total", &labels)
    };
    assert!(l7("ingress", "dropped") >= 2.0, "GET /private, POST /headers: {m}");
    assert!(l7("egress", "dropped") >= 1.0, "GET /x: {m}");
    assert!(l7("ingress", "forwarded") >= 1.0 && l7("egress", "forwarded") >= 1.0, "{m}");

    // A policy change applies to the next request of an open connection.
    let stream = weft_tests::http::connect_in(&lab.pod("n2-p2").netns, echo, DENIED).unwrap();
    let mut open = Client::from_stream(stream, Duration::from_secs(3)).unwrap();
    assert_eq!(open.get("echo", "/private", &[]).unwrap().status, 403);
    let wider = policies.replace("path: \"/headers\"", "path: \"/(headers|private)\"");
    assert_ne!(wider, policies);
    env.apply(&with(lab, &wider));
    wait_for(Duration::from_secs(10), "the wider rule on the open connection", || {
        let r = open.get("echo", "/private", &[]).ok()?;
        (r.status == 200).then_some(())
    })
    .unwrap_or_else(|e| env.fail(e));
}

/// Cilium's `envoy_listener_redirect` example: its CiliumClusterwideEnvoyConfig
/// applied unchanged (a listener that adds `X-Request-Source: cilium` and
/// forwards to the original destination), its policy unchanged (refused:
/// toFQDNs) and the same listener block in a policy towards an echo pod:
/// the client's requests to that port pass through the listener.
#[test]
fn a_policy_hands_a_port_to_an_envoy_config_listener() {
    require_root!();
    let example = |f: &str| std::fs::read_to_string(weft_tests::objects::conformance_dir().join(f)).unwrap();
    let looks = BTreeMap::from([("n1-p1", look("default", "myService")), ("n2-p1", look("default", "echo"))]);
    let with = |lab: &Lab, extra: &str| format!("{}{extra}", lab_objects_with(lab, &[], &looks));
    let env = EnvoyLab::new(|lab| with(lab, ""));
    let lab = &env.lab;
    let echo = sa(lab.pod("n2-p1").ip, 8081);
    let pod = EchoPod { namespace: "default".into(), pod: "n2-p1".into() };
    let _echo =
        HttpServer::start(&lab.pod("n2-p1").netns, echo, ServerOpts { echo: Some(pod), ..Default::default() }).unwrap();
    let source_header = |env: &EnvoyLab| {
        let mut c = Client::connect(&env.lab.pod("n1-p1").netns, echo, None, DENIED).ok()?;
        let r = c.get("echo", "/", &[("connection", "close")]).ok()?;
        let v: Value = serde_json::from_str(&r.body).ok()?;
        let headers = v["headers"].as_object()?;
        Some(headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("x-request-source")).map(|(_, v)| v.clone()))
    };
    assert_eq!(source_header(&env), Some(None), "before any policy: straight to the pod");

    let redirect = example("other/examples__policies__l4__envoy_listener_redirect.yaml");
    let listener = &redirect[redirect.find("          listener:").unwrap()..];
    let to_echo = format!(
        "---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: echo-via-listener, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: myService}}}}
  egress:
    - toEndpoints: [{{matchLabels: {{app: echo}}}}]
      toPorts:
        - ports:
            - port: \"8081\"
              protocol: TCP
{listener}"
    );
    let objects = format!(
        "---\n{}\n---\n{}\n{to_echo}",
        example("other/examples__policies__l4__envoy_listener_redirect_cec.yaml"),
        redirect.trim_start_matches("---")
    );
    env.apply(&with(lab, &objects));
    env.acked("ClusterwideEnvoyConfig add-header-config");
    let status = agent_get(lab, 0, "/status").unwrap();
    assert!(
        status.contains("redirect-http-to-envoy: spec.egress[0].toFQDNs: FQDN rules are not supported"),
        "{status}"
    );
    assert!(!status.contains("echo-via-listener"), "the policy with the listener applies: {status}");
    let through = wait_for(Duration::from_secs(10), "the request through the listener", || source_header(&env)?)
        .unwrap_or_else(|e| env.fail(e));
    assert_eq!(through, json!(["cilium"]));
    // Other ports of the pod stay closed to the client (egress default-deny).
    assert!(!reaches(&env, sa(lab.pod("n2-p1").ip, 8080)));

    // The same listener also serving a Service (`services`): it binds a
    // port of its own, so the policy's connections, made to the pod and not
    // to a Service address, still reach it (the Services' dispatcher finds
    // listeners by Service address only).
    let service =
        LabService { target_port: 8081, ..LabService::new("echo-svc", Ipv4Addr::new(10, 96, 0, 81), 80, &["n2-p1"]) };
    let cec = example("other/examples__policies__l4__envoy_listener_redirect_cec.yaml")
        .replace("spec:\n  resources:", "spec:\n  services: [{name: echo-svc, namespace: default}]\n  resources:");
    assert!(cec.contains("echo-svc"));
    let objects = format!(
        "{}---\n{cec}\n---\n{}\n{to_echo}",
        lab_objects_with(lab, &[service], &looks),
        redirect.trim_start_matches("---")
    );
    env.apply(&objects);
    env.acked("ClusterwideEnvoyConfig add-header-config");
    let status = agent_get(lab, 0, "/status").unwrap();
    assert!(!status.contains("echo-via-listener"), "the policy with the listener applies: {status}");
    let through =
        wait_for(Duration::from_secs(10), "the request through the listener with services", || source_header(&env)?)
            .unwrap_or_else(|e| env.fail(e));
    assert_eq!(through, json!(["cilium"]));
}

/// node1's host policy: pods labelled client may reach the node on 18080,
/// the other nodes on 18081; nothing else reaches it (default-deny).
const NODE1_IN: &str = "---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: node1-in}
spec:
  nodeSelector: {matchLabels: {kubernetes.io/hostname: node1}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: \"18080\", protocol: TCP}]}]
  - fromEntities: [remote-node]
    toPorts: [{ports: [{port: \"18081\"}]}]
";

/// node1's host policy for what it opens: pods labelled db on 8080 (one is
/// local, one on node2), and the outside on 8080.
const NODE1_OUT: &str = "---
apiVersion: weft.io/v1alpha1
kind: CiliumClusterwideNetworkPolicy
metadata: {name: node1-out}
spec:
  nodeSelector: {matchLabels: {kubernetes.io/hostname: node1}}
  egress:
  - toEndpoints: [{matchLabels: {app: db}}]
    toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]
  - toCIDR: [192.168.50.100/32]
    toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]
";

/// Host policies (a clusterwide policy with a nodeSelector) judge the
/// node's own connections on real packets: a pod reaching its node (its
/// veth), another node's pod and the other node itself (the uplink), and,
/// for egress, the node opening connections to a local pod, a remote pod
/// and the outside. Replies pass; every decision is a verdict naming the
/// policy and the direction, the host as the node's side.
#[test]
fn host_policies_judge_the_nodes_own_connections() {
    require_root!();
    let env = EnvoyLab::new(|lab| objects(lab, ""));
    let lab = &env.lab;
    let ext = HttpServer::start(&lab.ext_netns, sa(lab.ext_ip, 8080), ServerOpts::default()).unwrap();
    let node1 = lab.nodes[0].ip;
    let servers: Vec<HttpServer> = [(0, 18080), (0, 18081), (1, 18080)]
        .iter()
        .map(|(n, port)| HttpServer::start(&lab.nodes[*n].netns, sa(lab.nodes[*n].ip, *port), ServerOpts::default()))
        .collect::<Result<_, _>>()
        .unwrap();
    let ip = |p: &str| lab.pod(p).ip;
    let ok = |r: std::io::Result<(weft_tests::http::Response, _, _)>| r.is_ok_and(|(r, _, _)| r.status == 200);
    // Allowed connections get a longer time than DENIED (a loaded machine
    // can be slow to answer the first one); denied ones are waited for DENIED.
    let allowed_time = Duration::from_secs(3);
    let from = |pod: &str, to| ok(get_once(&lab.pod(pod).netns, to, "/", allowed_time));
    let from_node = |n: usize, to| ok(get_once(&lab.nodes[n].netns, to, "/", allowed_time));
    let quick = |pod: &str, to| ok(get_once(&lab.pod(pod).netns, to, "/", DENIED));
    let quick_node = |n: usize, to| ok(get_once(&lab.nodes[n].netns, to, "/", DENIED));
    for (who, to) in [("n1-p1", 18080), ("n1-p1", 18081), ("n2-p1", 18080)] {
        assert!(from(who, sa(node1, to)), "{who} -> node1:{to} before any host policy");
    }
    assert!(from_node(0, sa(ip("n2-p1"), 8080)), "node1 -> web on node2 before any host policy");

    env.apply(&objects(lab, NODE1_IN));
    // apply() returns once node1's datapath holds the policy (entries and
    // the config byte are written before the status says so).
    let host = &agent_status(lab, 0).unwrap()["datapath"]["host-policy"];
    assert_eq!(
        (&host["selected-by"], &host["ingress"]),
        (&json!(["CiliumClusterwideNetworkPolicy node1-in"]), &json!(true))
    );
    // A local pod, through its veth: the allowed port only.
    assert!(from("n1-p1", sa(node1, 18080)), "client -> node1:18080 (allowed)");
    assert!(!quick("n1-p1", sa(node1, 18081)), "client -> node1:18081 (not allowed for pods)");
    assert!(!quick("n1-p2", sa(node1, 18080)), "db -> node1:18080 (not a client)");
    // Through the uplink: the other node on its port, not a pod of it.
    assert!(from_node(1, sa(node1, 18081)), "node2 -> node1:18081 (remote-node)");
    assert!(!quick_node(1, sa(node1, 18080)), "node2 -> node1:18080");
    assert!(!quick("n2-p1", sa(node1, 18080)), "web on node2 -> node1:18080");
    // node2 is not selected; node1's egress and its pods are not under it.
    assert!(from("n1-p2", sa(lab.nodes[1].ip, 18080)), "db -> node2:18080");
    assert!(from_node(0, sa(ip("n1-p2"), 8080)), "node1 -> its pod db");
    if !from_node(0, sa(ip("n2-p1"), 8080)) {
        let all = observed(&env, &["--ip", &ip("n2-p1").to_string()]);
        let n2 = observe_json(&env.files[1], &["--all", "--ip", &ip("n2-p1").to_string()]);
        env.fail(format!("node1 -> web on node2\nnode1: {all:#?}\nnode2: {n2:#?}"));
    }

    let host_in = ["--type", "policy-verdict", "--traffic-direction", "ingress"];
    let host_side = |f: &Value, side: &str| f[side]["identity"] == 1;
    wait_for(Duration::from_secs(10), "host ingress verdicts", || {
        let v = observed(&env, &host_in);
        let host = |verdict: &str| v.iter().any(|f| host_side(f, "destination") && f["verdict"] == verdict);
        (host("DROPPED") && host("FORWARDED")).then_some(())
    })
    .unwrap_or_else(|e| env.fail(e));
    let verdicts: Vec<Value> = observed(&env, &host_in).into_iter().filter(|f| host_side(f, "destination")).collect();
    let allowed = verdicts.iter().find(|f| f["verdict"] == "FORWARDED" && pod(f, "source") == "n1-p1");
    let allowed = allowed.unwrap_or_else(|| env.fail(format!("no allowed host verdict for the client: {verdicts:?}")));
    assert_eq!(allowed["ingress_allowed_by"][0]["kind"], "CiliumClusterwideNetworkPolicy", "{allowed}");
    assert_eq!(allowed["ingress_allowed_by"][0]["name"], "node1-in", "{allowed}");
    assert_eq!(allowed["policy_match_type"], 2, "L3-L4: {allowed}");
    assert_eq!(allowed["l4"]["TCP"]["destination_port"], 18080, "{allowed}");
    let denied: Vec<&Value> = verdicts.iter().filter(|f| f["verdict"] == "DROPPED").collect();
    for (who, port) in [("n1-p1", 18081), ("n1-p2", 18080), ("n2-p1", 18080)] {
        assert!(
            denied.iter().any(|f| pod(f, "source") == who && f["l4"]["TCP"]["destination_port"] == port),
            "a denied host verdict for {who} -> node1:{port}: {denied:?}"
        );
    }
    assert!(
        denied.iter().any(|f| f["IP"]["source"] == lab.nodes[1].ip.to_string() && f["source"]["identity"] == 6),
        "node2 (remote-node) -> node1:18080 denied: {denied:?}"
    );
    let drops = observed(&env, &["--type", "drop", "--from-pod", "default/n1-p2"]);
    let to_node = drops.iter().find(|d| d["IP"]["destination"] == node1.to_string());
    let to_node = to_node.unwrap_or_else(|| env.fail(format!("no drop for db -> node1: {drops:?}")));
    assert_eq!(
        (&to_node["drop_reason_desc"], &to_node["traffic_direction"]),
        (&json!("POLICY_DENIED"), &json!("INGRESS"))
    );
    let status: Value = serde_json::from_str(&agent_get(lab, 0, "/status").unwrap()).unwrap();
    let host = &status["datapath"]["host-policy"];
    assert_eq!(host["selected-by"], json!(["CiliumClusterwideNetworkPolicy node1-in"]), "{host}");
    assert_eq!((&host["ingress"], &host["egress"]), (&json!(true), &json!(false)), "{host}");
    assert!(host["not-enforced"].as_array().is_some_and(|a| !a.is_empty()), "{host}");
    let node2: Value = serde_json::from_str(&agent_get(lab, 1, "/status").unwrap()).unwrap();
    assert_eq!(node2["datapath"]["host-policy"]["selected-by"], json!([]), "node2 is not selected");

    // Egress: what node1 opens, to a local pod (its veth), a remote one and
    // the outside (the uplink); replies of allowed connections come back.
    env.apply(&objects(lab, &format!("{NODE1_IN}{NODE1_OUT}")));
    assert!(from_node(0, sa(ip("n1-p2"), 8080)), "node1 -> local db");
    assert!(from_node(0, sa(ip("n2-p2"), 8080)), "node1 -> shop/db on node2");
    assert!(from_node(0, sa(lab.ext_ip, 8080)), "node1 -> the outside address");
    assert!(!quick_node(0, sa(ip("n2-p1"), 8080)), "node1 -> web on node2");
    assert!(!quick_node(0, sa(ip("n1-p1"), 8080)), "node1 -> the local client");
    assert!(!quick_node(0, sa(lab.nodes[1].ip, 18080)), "node1 -> node2");
    assert!(from("n1-p1", sa(node1, 18080)), "ingress still as before");
    let host_out = ["--type", "policy-verdict", "--traffic-direction", "egress"];
    wait_for(Duration::from_secs(10), "host egress verdicts", || {
        let v = observed(&env, &host_out);
        let host = |verdict: &str| v.iter().any(|f| host_side(f, "source") && f["verdict"] == verdict);
        (host("DROPPED") && host("FORWARDED")).then_some(())
    })
    .unwrap_or_else(|e| env.fail(e));
    let out: Vec<Value> = observed(&env, &host_out).into_iter().filter(|f| host_side(f, "source")).collect();
    let to_db = out.iter().find(|f| f["verdict"] == "FORWARDED" && pod(f, "destination") == "n2-p2");
    let to_db = to_db.unwrap_or_else(|| env.fail(format!("no allowed host verdict to shop/db: {out:?}")));
    assert_eq!(to_db["egress_allowed_by"][0]["name"], "node1-out", "{to_db}");
    for who in ["n2-p1", "n1-p1"] {
        assert!(
            out.iter().any(|f| f["verdict"] == "DROPPED" && pod(f, "destination") == who),
            "a denied host egress verdict to {who}: {out:?}"
        );
    }
    drop((ext, servers));
}

/// node1's host policy that lets the node open nothing (egress
/// default-deny, no rule).
const NODE1_NO_EGRESS: &str = "---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: node1-no-egress}
spec:
  nodeSelector: {matchLabels: {kubernetes.io/hostname: node1}}
  enableDefaultDeny: {egress: true}
";

/// A host policy that denies all of the node's egress leaves the node
/// Envoy's upstream connections alone (its sockets carry weft's mark, as
/// Cilium exempts its proxy's upstreams): L7 Services through node1's Envoy
/// still answer, from a backend on node1 (Envoy -> the pod's veth) and on
/// node2 (Envoy -> the uplink), while node1's plain connections to the same
/// pods are dropped with their verdicts. No request goes through Envoy
/// before the policy, so every upstream connection is opened under it.
#[test]
fn host_policies_leave_the_nodes_envoy_upstreams_to_the_pods() {
    require_root!();
    const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
    const REMOTE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 41);
    let with = |lab: &Lab, policies: &str| {
        let looks = BTreeMap::from([
            ("n1-p1", look("default", "client")),
            ("n1-p2", look("default", "near")),
            ("n2-p1", look("default", "far")),
            ("n2-p2", look("default", "other")),
        ]);
        let services =
            [LabService::new("near", LOCAL_VIP, 80, &["n1-p2"]), LabService::new("far", REMOTE_VIP, 80, &["n2-p1"])];
        let configs = [http_envoy_config("l7-near", "near", None), http_envoy_config("l7-far", "far", None)];
        format!("{}---\n{}---\n{}{policies}", lab_objects_with(lab, &services, &looks), configs[0], configs[1])
    };
    let env = EnvoyLab::new(|lab| with(lab, ""));
    let lab = &env.lab;
    env.acked("EnvoyConfig default/l7-near");
    env.acked("EnvoyConfig default/l7-far");
    let ip = |p: &str| lab.pod(p).ip;
    let status = agent_status(lab, 0).unwrap();
    let exempt = &status["datapath"]["host-policy"]["exempt"];
    assert!(exempt.to_string().contains("Envoy's upstream connections"), "/status says what is exempt: {exempt}");

    env.apply(&with(lab, NODE1_NO_EGRESS));
    let host = &agent_status(lab, 0).unwrap()["datapath"]["host-policy"];
    assert_eq!(
        (&host["egress"], &host["selected-by"]),
        (&json!(true), &json!(["CiliumClusterwideNetworkPolicy node1-no-egress"]))
    );
    // Through node1's Envoy (each request a fresh connection, and Envoy had
    // none to the backends before): answered by the pods.
    for (vip, pod) in [(LOCAL_VIP, "n1-p2"), (REMOTE_VIP, "n2-p1")] {
        let r = get_once(&lab.pod("n1-p1").netns, sa(vip, 80), "/", Duration::from_secs(5));
        let (r, _, _) = r.unwrap_or_else(|e| env.fail(format!("client -> {vip} through Envoy: {e}")));
        assert_eq!(r.status, 200, "client -> {vip}: {r:?}");
        assert!(r.headers.iter().any(|(k, _)| k == "x-envoy-upstream-service-time"), "through Envoy: {r:?}");
        assert!(r.body.contains(pod), "answered by {pod}: {r:?}");
    }
    // node1's own connections to the same pods: dropped, as verdicts.
    for pod in ["n1-p2", "n2-p1"] {
        let r = get_once(&lab.nodes[0].netns, sa(ip(pod), 8080), "/", DENIED);
        assert!(r.is_err(), "node1 -> {pod} under the host policy: {r:?}");
    }
    let out = ["--type", "policy-verdict", "--traffic-direction", "egress", "--verdict", "DROPPED"];
    wait_for(Duration::from_secs(10), "node1's dropped egress verdicts", || {
        let v = observed(&env, &out);
        let to = |p: &str| v.iter().any(|f| f["source"]["identity"] == 1 && pod(f, "destination") == p);
        (to("n1-p2") && to("n2-p1")).then_some(())
    })
    .unwrap_or_else(|e| env.fail(e));
    let drops = observed(&env, &["--type", "drop", "--to-pod", "default/n1-p2"]);
    assert!(
        drops.iter().any(|d| d["drop_reason_desc"] == "POLICY_DENIED" && d["traffic_direction"] == "EGRESS"),
        "node1 -> near dropped: {drops:?}"
    );
    // Envoy's upstream connections made no host verdict at all.
    let all = observed(&env, &["--type", "policy-verdict", "--traffic-direction", "egress"]);
    let host_verdicts = all.iter().filter(|f| f["source"]["identity"] == 1).count();
    assert_eq!(host_verdicts, 2, "only node1's two plain connections were judged: {all:?}");
}
