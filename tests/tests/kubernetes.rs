//! weft on a real Kubernetes control plane, in the lab, on real packets
//! (weft_tests::k8s): the lab's nodes and pods are API objects (the pods
//! made through the CNI chain ptp + weft-cni, run as a runtime runs it, their
//! status written with the chain's address), Services get
//! their addresses from the API server's allocators and their EndpointSlices
//! from kube-controller-manager, agents and operators run as their
//! ServiceAccounts with exactly deploy/'s RBAC (agents also with exactly the
//! capabilities the DaemonSet grants). What the API says reaches the
//! datapath across cut connections, an API server restart and etcd
//! compaction; Ingresses route by host and path through the node's Envoy
//! with two operator replicas electing a leader; NetworkPolicies with named
//! ports and namespace selectors are enforced.

use std::{
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use weft_tests::{
    http::{Client, HttpServer, get_once},
    k8s::{
        AuditEvent, Component, ControlPlane,
        lab::{Hold, KubeLab, POD_LABEL, start_agent_with_daemonset_caps},
    },
    lab::{Lab, PodNetwork},
    objects::{AgentFiles, agent_files, conformance_dir, envoy_serves, http_envoy_config, wait_ready, wait_status},
    require_root,
    scenario::{T, sa, servers},
};

/// Waits (generously; no timing is asserted) until `f` returns Some.
fn until<R>(what: &str, mut f: impl FnMut() -> Option<R>) -> R {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(r) = f() {
            return r;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The lab on the control plane, HTTP servers in three pods, agents on both nodes.
struct Env {
    kube: KubeLab,
    files: Vec<AgentFiles>,
    pids: Vec<u32>,
    _servers: Vec<HttpServer>,
    lab: Lab,
}

impl Env {
    /// None (after one printed line) where there is no control plane or no
    /// CNI plugins.
    fn new(exclusive: bool, envoy: bool) -> Option<Self> {
        if let Some(reason) = weft_tests::cni::skip_reason() {
            eprintln!("SKIPPED: {reason}");
            return None;
        }
        let cp = if exclusive {
            ControlPlane::exclusive().map(Hold::Exclusive)
        } else {
            ControlPlane::shared().map(Hold::Shared)
        };
        let Some(cp) = cp else {
            eprintln!("{}", weft_tests::k8s::control_plane::SKIP_LINE);
            return None;
        };
        let lab = Lab::with_pods(PodNetwork::Cni).unwrap();
        let kube = KubeLab::new(&lab, cp).unwrap();
        let files: Vec<_> = (0..2)
            .map(|i| agent_files(&lab, i, &format!("{}envoy:\n  enabled: {envoy}\n", kube.agent_config(i))).unwrap())
            .collect();
        Some(Self { kube, files, pids: Vec::new(), _servers: Vec::new(), lab })
    }

    fn cp(&self) -> &ControlPlane {
        &self.kube.cp
    }

    /// Starts the agents, then the pods (through ptp and weft-cni, which
    /// needs the agents), then HTTP servers in three of them.
    fn start_agents(&mut self) {
        for (i, f) in self.files.iter().enumerate() {
            let log = self.lab.run_dir.join(format!("agent{i}.log"));
            self.pids.push(start_agent_with_daemonset_caps(&self.lab, i, f, &log).unwrap());
        }
        for i in 0..2 {
            wait_ready(&self.files[i], Duration::from_secs(90), || self.lab.running(self.pids[i]))
                .unwrap_or_else(|e| self.fail(e));
        }
        self.kube.start_pods(&self.lab).unwrap_or_else(|e| self.fail(e));
        self._servers = servers(&self.lab, &["n1-p2", "n2-p1", "n2-p2"]);
    }

    fn fail(&self, e: impl std::fmt::Display) -> ! {
        let log = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        panic!(
            "{e}\n--- agent log\n{}\n--- envoy log\n{}",
            log(self.lab.run_dir.join("agent0.log")),
            log(self.files[0].state_dir.join("envoy.log"))
        );
    }

    /// Which pod answers `addr` from n1-p1 (None: nothing does).
    fn answer(&self, addr: std::net::SocketAddr) -> Option<String> {
        let (r, _, _) = get_once(&self.lab.pod("n1-p1").netns, addr, "/", T).ok()?;
        r.field("name").map(str::to_owned)
    }

    /// Waits until five requests in a row to `vip:80` are answered by `pod`.
    fn settles_on(&self, vip: Ipv4Addr, pod: &str) {
        until(&format!("{vip} answered by {pod}"), || {
            (0..5).all(|_| self.answer(sa(vip, 80)).as_deref() == Some(pod)).then_some(())
        });
    }

    /// Points Service `name` at the one pod `pod`.
    fn select(&self, name: &str, pod: &str) {
        self.kube.apply(&weft_tests::k8s::lab::service_yaml(name, "ClusterIP", 80, &format!("{POD_LABEL}: {pod}")));
        self.kube.wait_endpoints(name, &[pod]);
    }
}

const AGENT: &str = "system:serviceaccount:weft-system:weft-agent";

/// The agents' requests of `verb` on the collection `plural` since `from` (an index in the audit log).
fn agent_requests(audit: &[AuditEvent], from: usize, verb: &str, plural: &str) -> Vec<AuditEvent> {
    audit[from.min(audit.len())..]
        .iter()
        .filter(|e| e.user == AGENT && e.verb == verb && e.path().ends_with(&format!("/{plural}")))
        .filter(|e| verb != "watch" || e.stage == "ResponseStarted")
        .cloned()
        .collect()
}

/// The API server sends a watch a bookmark about a minute after it starts.
const BOOKMARK_WAIT: Duration = Duration::from_secs(65);

fn resource_version(v: &Value) -> u64 {
    v["metadata"]["resourceVersion"].as_str().and_then(|r| r.parse().ok()).expect("a resourceVersion")
}

#[test]
fn services_from_the_api_reach_the_datapath_across_cut_connections_a_restart_and_compaction() {
    require_root!();
    let Some(mut env) = Env::new(true, false) else {
        return;
    };
    // A ClusterIP and a NodePort from the API server's allocators; endpoints
    // from kube-controller-manager, from the pods' labels and readiness.
    let vip = env.kube.service("web", "ClusterIP", 80, &format!("{POD_LABEL}: n2-p1"));
    assert!(vip.octets()[..2] == [10, 96], "{vip}");
    env.kube.service("web-np", "NodePort", 80, "app: app2");
    let np = env.kube.get("service", Some("default"), "web-np").unwrap();
    let node_port = np["spec"]["ports"][0]["nodePort"].as_u64().expect("a NodePort") as u16;
    env.start_agents();
    env.kube.wait_endpoints("web", &["n2-p1"]);
    env.kube.wait_endpoints("web-np", &["n1-p2", "n2-p2"]);
    let cp = env.cp();
    env.settles_on(vip, "n2-p1");
    let from_outside = |node: usize| {
        let to = sa(env.lab.node(node).ip, node_port);
        let mut c = Client::connect(&env.lab.ext_netns, to, None, T).ok()?;
        c.get("np", "/", &[("connection", "close")]).ok()?.field("name").map(str::to_owned)
    };
    let np_answer = until("the NodePort from outside", || from_outside(0));
    assert!(["n1-p2", "n2-p2"].contains(&np_answer.as_str()), "{np_answer}");

    // Updated: the Service selects another pod.
    env.select("web", "n2-p2");
    env.settles_on(vip, "n2-p2");

    // Connections cut (a network blip): the agents resume their watches from
    // the last resourceVersion, served from the API server's watch cache.
    let mark = cp.audit().len();
    for r in &env.kube.relays {
        r.cut();
    }
    env.select("web", "n1-p2");
    env.settles_on(vip, "n1-p2");
    let resumed = until("both agents to watch Services again", || {
        let w = agent_requests(&cp.audit(), mark, "watch", "services");
        (w.len() >= 2).then_some(w)
    });
    for w in &resumed {
        assert!(w.param("resourceVersion").is_some_and(|rv| rv != "0" && !rv.is_empty()), "{w:?}");
    }
    assert!(agent_requests(&cp.audit(), mark, "list", "services").is_empty(), "resumed, not relisted");

    // etcd compaction: a watch resuming from before it gets a real 410 and
    // relists. NetworkPolicies are served by etcd itself (no watch cache, see
    // weft_tests::k8s::control_plane), Services from the cache.
    let mark = cp.audit().len();
    for r in &env.kube.relays {
        r.set_blocked(true);
    }
    env.kube.apply(weft_tests::flows::DENY_APP2);
    let compacted = cp.compact_etcd().unwrap();
    for r in &env.kube.relays {
        r.set_blocked(false);
    }
    let client = env.lab.pod("n1-p1").netns.clone();
    let reaches = |pod: &str| get_once(&client, sa(env.lab.pod(pod).ip, 8080), "/", Duration::from_millis(300)).is_ok();
    until("the policy, after a relist, to deny n1-p1", || (!reaches("n1-p2")).then_some(()));
    let relists = until("both agents to relist NetworkPolicies", || {
        let l = agent_requests(&cp.audit(), mark, "list", "networkpolicies");
        (l.len() >= 2).then_some(l)
    });
    assert!(relists.len() >= 2, "compacted at revision {compacted}: {relists:?}");
    for i in 0..2 {
        let log = std::fs::read_to_string(env.lab.run_dir.join(format!("agent{i}.log"))).unwrap_or_default();
        assert!(
            log.lines().any(|l| l.contains("NetworkPolicy") && l.contains("too old") && l.contains("Expired")),
            "agent {i} saw the 410:\n{log}"
        );
    }
    assert!(agent_requests(&cp.audit(), mark, "list", "services").is_empty(), "Services resumed from the cache");
    env.kube.delete("networkpolicy", Some("default"), "app2-from-nodes-only");
    until("the policy to be gone", || reaches("n1-p2").then_some(()));

    // The API server restarts: the datapath keeps serving meanwhile; the
    // agents reconnect (the restarted server's watch cache starts at the
    // current revision: their older resourceVersions get 410 and they relist).
    let mark = cp.audit().len();
    cp.stop_component(Component::ApiServer);
    assert_eq!(env.answer(sa(vip, 80)).as_deref(), Some("n1-p2"), "served while the API server is down");
    cp.start_component(Component::ApiServer).unwrap();
    env.select("web", "n2-p1");
    env.settles_on(vip, "n2-p1");
    until("both agents to list Services again", || {
        (agent_requests(&cp.audit(), mark, "list", "services").len() >= 2).then_some(())
    });

    // Bookmarks: with nothing new for Services, the server still moves each
    // watch's resourceVersion on (about a minute after the watch started);
    // a watch cut after that resumes from there, past writes of other kinds.
    // The Service watch cache learns of other kinds' revisions only from
    // etcd's progress notices: every ten minutes, or when a consistent read
    // is served from the cache (the list below asks etcd for one), so the
    // test lists Services once instead of waiting ten minutes.
    cp.kubectl_ok(&["annotate", "service", "web", "-n", "default", "lab.weft.io/touched=yes"]);
    let last_service = resource_version(&env.kube.get("service", Some("default"), "web").unwrap());
    cp.kubectl_ok(&["create", "configmap", "moves-the-revision", "-n", "default"]);
    cp.kubectl_ok(&["get", "services", "--all-namespaces", "-o", "name"]);
    let quiet = cp.audit().len();
    std::thread::sleep(BOOKMARK_WAIT);
    assert!(agent_requests(&cp.audit(), quiet, "watch", "services").is_empty(), "no Service watch ended meanwhile");
    // On a loaded machine the bookmark can come late: a cut that resumes
    // from the last Service event is tried again, each after another full
    // bookmark period (a cut restarts the watch, and its bookmark clock).
    for cut in 1.. {
        let mark = cp.audit().len();
        for r in &env.kube.relays {
            r.cut();
        }
        let resumed = until("both agents to watch Services again", || {
            let w = agent_requests(&cp.audit(), mark, "watch", "services");
            (w.len() >= 2).then_some(w)
        });
        let rvs: Vec<u64> =
            resumed.iter().map(|w| w.param("resourceVersion").and_then(|r| r.parse().ok()).unwrap_or(0)).collect();
        if rvs.iter().all(|rv| *rv > last_service) {
            break;
        }
        assert!(cut < 3, "after {cut} cuts, resumed from {rvs:?}, not past the last Service event ({last_service})");
        cp.kubectl_ok(&["get", "services", "--all-namespaces", "-o", "name"]);
        std::thread::sleep(BOOKMARK_WAIT);
    }
    cp.kubectl_ok(&["delete", "configmap", "moves-the-revision", "-n", "default"]);

    // Deleted: the ClusterIP goes from the datapath.
    env.kube.delete("service", Some("default"), "web");
    until("the Service to be gone", || env.answer(sa(vip, 80)).is_none().then_some(()));
    for i in 0..2 {
        assert!(env.lab.running(env.pids[i]), "agent {i} is running");
    }
}

/// A self-signed certificate for `host`, as a kubernetes.io/tls Secret.
fn tls_secret(dir: &std::path::Path, name: &str, host: &str) -> String {
    let (crt, key) = weft_tests::objects::self_signed_cert(dir, "tls", &[host]);
    let b64 = |p: &std::path::Path| {
        let o = Command::new("base64").arg("-w0").arg(p).output().unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: default}}\ntype: kubernetes.io/tls\ndata: {{tls.crt: {}, tls.key: {}}}\n",
        b64(&crt),
        b64(&key)
    )
}

/// Two hosts on one address; b.example.com over TLS too.
const HOSTS_INGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: hosts, namespace: default}
spec:
  ingressClassName: weft
  tls: [{hosts: [b.example.com], secretName: b-cert}]
  rules:
  - host: a.example.com
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: site-a, port: {number: 80}}}}]}
  - host: b.example.com
    http: {paths: [{path: /, pathType: Prefix, backend: {service: {name: site-b, port: {name: http}}}}]}
"#;

/// The condition `type_` of an object: (status, reason, message, observedGeneration).
fn condition(obj: &Value, type_: &str) -> Option<(String, String, String, i64)> {
    let c = obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)?;
    Some((
        c["status"].as_str()?.to_owned(),
        c["reason"].as_str()?.to_owned(),
        c["message"].as_str()?.to_owned(),
        c["observedGeneration"].as_i64()?,
    ))
}

#[test]
fn ingresses_route_by_host_and_path_with_two_operator_replicas_electing_a_leader() {
    require_root!();
    let Some(mut env) = Env::new(false, true) else {
        return;
    };
    let k = &env.kube;
    for (name, pod) in [
        ("exactpath", "n2-p1"),
        ("prefixpath", "n1-p2"),
        ("prefixpath2", "n2-p2"),
        ("implpath", "n2-p1"),
        ("implpath2", "n2-p2"),
        ("site-a", "n1-p2"),
        ("site-b", "n2-p2"),
    ] {
        k.service(name, "ClusterIP", 80, &format!("{POD_LABEL}: {pod}"));
    }
    k.apply(&weft_tests::k8s::deploy::file("ingressclass.yaml"));
    k.apply(&tls_secret(&env.lab.run_dir, "b-cert", "b.example.com"));
    // Cilium's example, with weft's class instead of Cilium's.
    let example = std::fs::read_to_string(conformance_dir().join("ingress-path-types-ingress.yaml")).unwrap();
    k.apply(&example.replace("ingressClassName: cilium", "ingressClassName: weft"));
    k.apply(HOSTS_INGRESS);
    // Two replicas of the operator, as the Deployment runs them.
    let operators: Vec<(String, u32)> = (0..2)
        .map(|i| {
            let name = format!("weft-operator-{i}");
            let pid = k.start_operator(&env.lab, i, &name).unwrap();
            (name, pid)
        })
        .collect();
    env.start_agents();
    let k = &env.kube;
    let leader = until("a leader", || {
        k.get("lease", Some("weft-system"), "weft-operator")?["spec"]["holderIdentity"].as_str().map(str::to_owned)
    });
    assert!(operators.iter().any(|(n, _)| *n == leader), "{leader}");

    // The operator makes a LoadBalancer Service per Ingress; the lab's load
    // balancer (this test) gives each an address the lab routes to node1.
    let addrs = [("multiple-path-types", Ipv4Addr::new(172, 20, 0, 10)), ("hosts", Ipv4Addr::new(172, 20, 0, 11))];
    for (ing, ip) in addrs {
        let name = format!("weft-ingress-{ing}");
        until(&format!("Service {name}"), || k.get("service", Some("default"), &name));
        let patch = json!({"status": {"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}}}).to_string();
        k.cp.kubectl_ok(&["patch", "service", &name, "--subresource=status", "--type=merge", "-p", &patch]);
        until(&format!("Ingress {ing}'s address"), || {
            let i = k.get("ingress", Some("default"), ing)?;
            (i["status"]["loadBalancer"]["ingress"][0]["ip"] == ip.to_string()).then_some(())
        });
        let object = format!("EnvoyConfig default/{name}");
        wait_status(&env.lab, 0, Duration::from_secs(90), &format!("{object} acknowledged and served"), |s| {
            envoy_serves(s, &object)
        })
        .unwrap_or_else(|e| env.fail(e));
        // Valid, and Applied: both nodes' agents report serving this generation.
        let cfg = until("Applied", || {
            k.get("ec", Some("default"), &name).filter(|c| condition(c, "Applied").is_some_and(|a| a.0 == "True"))
        });
        let (st, reason, _, _) = condition(&cfg, "Valid").unwrap();
        assert_eq!((st.as_str(), reason.as_str()), ("True", "Valid"), "{cfg:#}");
        let (_, reason, msg, _) = condition(&cfg, "Applied").unwrap();
        assert_eq!((reason.as_str(), msg.as_str()), ("Serving", "generation 1 is served on the 2 selected nodes"));
    }
    let table = k.cp.kubectl_ok(&["get", "ec", "-n", "default"]);
    assert!(
        table
            .lines()
            .any(|l| l.split_whitespace().take(3).collect::<Vec<_>>() == ["weft-ingress-hosts", "True", "True"]),
        "{table}"
    );
    let nodes = k.cp.kubectl_ok(&["get", "weftnodes", "-n", "weft-system"]);
    assert!(nodes.lines().filter(|l| l.contains("Connected")).count() == 2, "{nodes}");

    let ext = env.lab.ext_netns.clone();
    let get = |ip: Ipv4Addr, host: &str, path: &str| {
        until(&format!("http://{host}{path} via {ip}"), || {
            let mut c = Client::connect(&ext, sa(ip, 80), None, T).ok()?;
            c.get(host, path, &[("connection", "close")]).ok()
        })
    };
    let answered_by = |ip, host, path| get(ip, host, path).field("name").map(str::to_owned);

    // Cilium's path-types example: Exact, Prefix (whole segments), regular expressions.
    let lb = addrs[0].1;
    let host = "pathtypes.example.com";
    for (path, pod) in [
        ("/exact", "n2-p1"),      // Exact /exact -> exactpath
        ("/exact/more", "n1-p2"), // not Exact: Prefix / -> prefixpath
        ("/prefix", "n2-p2"),     // Prefix /prefix -> prefixpath2
        ("/prefix/deeper", "n2-p2"),
        ("/prefixes", "n1-p2"),       // not the segment /prefix: Prefix /
        ("/impl", "n2-p1"),           // ImplementationSpecific /impl -> implpath
        ("/implementation", "n2-p2"), // ImplementationSpecific /impl.+ -> implpath2
        ("/", "n1-p2"),
    ] {
        assert_eq!(answered_by(lb, host, path).as_deref(), Some(pod), "{host}{path}");
    }
    assert_eq!(get(lb, "other.example.com", "/").status, 404, "an unknown host");

    // Hosts on one address; TLS for b.example.com: plain HTTP is redirected.
    let lb = addrs[1].1;
    assert_eq!(answered_by(lb, "a.example.com", "/x").as_deref(), Some("n1-p2"));
    let r = get(lb, "b.example.com", "/y");
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(r.header("location"), Some("https://b.example.com/y"));
    let out = env
        .lab
        .run(
            &ext,
            None,
            Command::new("curl")
                .args(["-sk", "--max-time", "3", "--resolve", &format!("b.example.com:443:{lb}")])
                .arg("https://b.example.com/y"),
            Duration::from_secs(10),
        )
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        body.split_whitespace().any(|f| f == "name=n2-p2"),
        "HTTPS to b.example.com: {body:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Envoy refuses a config: each node's agent writes an Event on it, and
    // its status says so.
    k.service("web", "ClusterIP", 80, &format!("{POD_LABEL}: n2-p1"));
    let refused =
        http_envoy_config("web-l7", "web", None).replace("match: {prefix: /}", "match: {safe_regex: {regex: \"(\"}}");
    k.apply(&refused);
    // The nodes report one after the other: the condition names each that refused.
    until("RejectedByEnvoy on both nodes", || {
        k.get("ec", Some("default"), "web-l7").filter(|c| {
            condition(c, "Applied")
                .is_some_and(|a| a.1 == "RejectedByEnvoy" && a.2.contains("node1") && a.2.contains("node2"))
        })
    });
    let described = until("the Events", || {
        let d = k.cp.kubectl_ok(&["describe", "ec", "web-l7", "-n", "default"]);
        (d.matches("RejectedByEnvoy").count() >= 2).then_some(d)
    });
    assert!(
        described.contains("node node1: Envoy refused it") && described.contains("node node2: Envoy refused it"),
        "{described}"
    );
    k.delete("ec", Some("default"), "web-l7");

    // The leader goes away: the other replica takes the Lease over and
    // carries on (an edit reaches the generated config, with its status).
    let (gone, pid) = operators.iter().find(|(n, _)| *n == leader).unwrap();
    env.lab.kill(*pid);
    let other = until("a new leader", || {
        let holder =
            k.get("lease", Some("weft-system"), "weft-operator")?["spec"]["holderIdentity"].as_str()?.to_owned();
        (holder != *gone).then_some(holder)
    });
    assert!(operators.iter().any(|(n, _)| *n == other));
    k.apply(&HOSTS_INGRESS.replace(
        "path: /, pathType: Prefix, backend: {service: {name: site-a",
        "path: /a, pathType: Prefix, backend: {service: {name: site-a",
    ));
    let cfg = until("the edit, from the new leader", || {
        k.get("ec", Some("default"), "weft-ingress-hosts")
            .filter(|c| c.to_string().contains("\"/a\"") && condition(c, "Valid").is_some_and(|v| v.3 == 2))
    });
    assert_eq!(cfg["status"]["observedGeneration"], 2);

    // Deleting an Ingress: the garbage collector takes its objects, and its address stops answering.
    k.delete("ingress", Some("default"), "hosts");
    until("the owned objects to go", || {
        (k.get("service", Some("default"), "weft-ingress-hosts").is_none()
            && k.get("ec", Some("default"), "weft-ingress-hosts").is_none())
        .then_some(())
    });
    until("the address to stop answering", || {
        Client::connect(&ext, sa(lb, 80), None, Duration::from_secs(1))
            .and_then(|mut c| c.get("a.example.com", "/a", &[("connection", "close")]))
            .is_err()
            .then_some(())
    });
}

#[test]
fn network_policies_with_named_ports_and_namespace_labels_are_enforced() {
    require_root!();
    let Some(mut env) = Env::new(false, false) else {
        return;
    };
    env.start_agents();
    let client = env.lab.pod("n1-p1").netns.clone();
    let reaches = |pod: &str| get_once(&client, sa(env.lab.pod(pod).ip, 8080), "/", Duration::from_millis(300)).is_ok();
    until("n1-p1 to reach n1-p2 before any policy", || reaches("n1-p2").then_some(()));

    // The app2 pods accept only the node network: n1-p1 is denied, n2-p1
    // (no policy selects it) is not.
    env.kube.apply(weft_tests::flows::DENY_APP2);
    until("the policy to deny n1-p1", || (!reaches("n1-p2")).then_some(()));
    assert!(reaches("n2-p1"), "a pod no policy selects stays open");
    let drops = weft_tests::flows::observe_json(&env.files[0], &["--all", "-t", "drop", "--to-pod", "default/n1-p2"])
        .unwrap_or_else(|e| env.fail(e));
    let drops = weft_tests::flows::flows_of(&drops);
    assert!(!drops.is_empty(), "the drops are flows");
    assert!(
        drops.iter().all(|f| f["drop_reason_desc"] == "POLICY_DENIED" && f["source"]["pod_name"] == "n1-p1"),
        "{drops:?}"
    );

    // And app1 pods of namespaces labelled zone=trusted, on the pods' port
    // named http (8080; the Pods from the API server name it).
    env.kube.apply(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: app2-from-trusted, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: app2}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {lab.weft.io/zone: trusted}}, podSelector: {matchLabels: {app: app1}}}]\n    ports: [{port: http}]\n",
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(!reaches("n1-p2"), "default is not labelled trusted yet");
    env.cp().kubectl_ok(&["label", "namespace", "default", "lab.weft.io/zone=trusted"]);
    until("the namespace label to let n1-p1 in", || reaches("n1-p2").then_some(()));
    env.cp().kubectl_ok(&["label", "namespace", "default", "lab.weft.io/zone-"]);
    until("the label's removal to shut it out again", || (!reaches("n1-p2")).then_some(()));

    // Deleted through the API: open again.
    env.kube.delete("networkpolicy", Some("default"), "app2-from-nodes-only");
    env.kube.delete("networkpolicy", Some("default"), "app2-from-trusted");
    until("the policies to be gone", || reaches("n1-p2").then_some(()));
}
