//! Agents and the operator against weft's in-process Kubernetes API server,
//! in the lab (issue: Kubernetes): objects created, changed and deleted
//! through the API reach the datapath across dropped watches and 410s, and
//! Ingresses route HTTP from the LoadBalancer address to backends by host
//! and path through the node's Envoy. Agents run with only the capabilities
//! the DaemonSet grants.

use std::{
    net::Ipv4Addr,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::json;
use weft_tests::{
    cluster::{ApiLab, start_agent_with_daemonset_caps},
    http::{Client, HttpServer, get_once},
    lab::Lab,
    objects::{
        AgentFiles, LabService, agent_files, conformance_dir, envoy_state, lab_objects, wait_ready, wait_status,
    },
    require_root,
    scenario::{T, sa, servers},
};

/// Waits (generously; no timing is asserted) until `f` returns Some.
fn until<R>(what: &str, mut f: impl FnMut() -> Option<R>) -> R {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = f() {
            return r;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The lab, the API server, HTTP servers in three pods, agents on both nodes.
struct KubeLab {
    lab: Lab,
    api: ApiLab,
    files: Vec<AgentFiles>,
    pids: Vec<u32>,
    _servers: Vec<HttpServer>,
}

impl KubeLab {
    fn new(envoy: bool) -> Self {
        let lab = Lab::new().unwrap();
        let api = ApiLab::new(&lab).unwrap();
        let servers = servers(&lab, &["n1-p2", "n2-p1", "n2-p2"]);
        let extra = format!("{}envoy:\n  enabled: {envoy}\n", api.agent_config());
        let files: Vec<_> = (0..2).map(|i| agent_files(&lab, i, &extra).unwrap()).collect();
        Self { lab, api, files, pids: Vec::new(), _servers: servers }
    }

    /// Starts both agents (after the objects they need are in the API server).
    fn start_agents(&mut self) {
        for (i, f) in self.files.iter().enumerate() {
            let log = self.lab.run_dir.join(format!("agent{i}.log"));
            self.pids.push(start_agent_with_daemonset_caps(&self.lab, i, f, &log).unwrap());
        }
        for i in 0..2 {
            wait_ready(&self.files[i], Duration::from_secs(60), || self.lab.running(self.pids[i]))
                .unwrap_or_else(|e| self.fail(e));
        }
    }

    fn fail(&self, e: impl std::fmt::Display) -> ! {
        let log = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        panic!(
            "{e}\n--- agent log\n{}\n--- envoy log\n{}",
            log(self.lab.run_dir.join("agent0.log")),
            log(self.files[0].state_dir.join("envoy.log"))
        );
    }

    /// Which pod answers the Service at `vip:80` from n1-p1 (None: nothing does).
    fn answer(&self, vip: Ipv4Addr) -> Option<String> {
        let (r, _, _) = get_once(&self.lab.pod("n1-p1").netns, sa(vip, 80), "/", T).ok()?;
        r.field("name").map(str::to_owned)
    }

    /// Waits until `n` requests in a row are answered by `pod`.
    fn settles_on(&self, vip: Ipv4Addr, pod: &str) {
        until(&format!("{vip} answered by {pod}"), || {
            (0..5).all(|_| self.answer(vip).as_deref() == Some(pod)).then_some(())
        });
    }
}

#[test]
fn api_objects_reach_the_datapath_across_dropped_watches_and_410s() {
    require_root!();
    let mut env = KubeLab::new(false);
    let vip = Ipv4Addr::new(10, 96, 0, 50);
    let web = |backend: &str| LabService::new("web", vip, 80, &[backend]);
    env.api.server.put_yaml(&lab_objects(&env.lab, &[web("n2-p1")]));
    env.start_agents();

    // Added.
    env.settles_on(vip, "n2-p1");
    // Updated (the EndpointSlice moves to another pod).
    env.api.server.put_yaml(&lab_objects(&env.lab, &[web("n2-p2")]));
    env.settles_on(vip, "n2-p2");
    // Updated after every watch was cut: the agents resume and get it.
    let service_watches =
        || env.api.server.requests().iter().filter(|r| r.is_watch() && r.path.ends_with("/services")).count();
    let before_drop = service_watches();
    env.api.server.drop_watches();
    env.api.server.put_yaml(&lab_objects(&env.lab, &[web("n1-p2")]));
    env.settles_on(vip, "n1-p2");
    // Both agents watch again before the 410 (an agent still reconnecting
    // would resume from a version that is still current, and not relist).
    until("both agents to watch Services again", || (service_watches() >= before_drop + 2).then_some(()));
    // Updated after a 410: the agents relist and get it.
    env.api.server.expire_watches();
    env.api.server.put_yaml(&lab_objects(&env.lab, &[web("n2-p1")]));
    env.settles_on(vip, "n2-p1");
    // The agents resumed or relisted; they never stopped serving.
    for i in 0..2 {
        assert!(env.lab.running(env.pids[i]), "agent {i} is running");
    }
    // Deleted: the ClusterIP goes from the datapath.
    assert!(env.api.server.remove("v1", "Service", "default", "web"));
    until("the Service to be gone", || env.answer(vip).is_none().then_some(()));
    let relists = env.api.server.requests().iter().filter(|r| r.is_list_of("services")).count();
    assert!(relists >= 4, "each agent listed at start and after the 410 ({relists} lists)");
}

/// A self-signed certificate for `host`, as a kubernetes.io/tls Secret.
fn tls_secret(dir: &std::path::Path, name: &str, host: &str) -> String {
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={host}"), "-addext", &format!("subjectAltName=DNS:{host}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("openssl (tests/setup.sh installs it)");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
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

#[test]
fn ingress_routes_from_the_load_balancer_address_by_host_and_path() {
    require_root!();
    let mut env = KubeLab::new(true);
    let svc =
        |name: &str, last: u8, backend: &str| LabService::new(name, Ipv4Addr::new(10, 96, 1, last), 80, &[backend]);
    let services = [
        svc("exactpath", 1, "n2-p1"),
        svc("prefixpath", 2, "n1-p2"),
        svc("prefixpath2", 3, "n2-p2"),
        svc("implpath", 4, "n2-p1"),
        svc("implpath2", 5, "n2-p2"),
        svc("site-a", 6, "n1-p2"),
        svc("site-b", 7, "n2-p2"),
    ];
    let server = env.api.server.clone();
    server.put_yaml(&lab_objects(&env.lab, &services));
    server.put_yaml(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/ingressclass.yaml")).unwrap(),
    );
    server.put_yaml(&tls_secret(&env.lab.run_dir, "b-cert", "b.example.com"));
    // Cilium's example, with weft's class instead of Cilium's.
    let example = std::fs::read_to_string(conformance_dir().join("ingress-path-types-ingress.yaml")).unwrap();
    server.put_yaml(&example.replace("ingressClassName: cilium", "ingressClassName: weft"));
    server.put_yaml(HOSTS_INGRESS);
    env.api.start_operator("operator-0");
    env.start_agents();

    // The operator makes a LoadBalancer Service per Ingress; the lab's load
    // balancer (this test) gives each an address the lab routes to node1.
    let addrs = [("multiple-path-types", Ipv4Addr::new(172, 20, 0, 10)), ("hosts", Ipv4Addr::new(172, 20, 0, 11))];
    for (ing, ip) in addrs {
        let name = format!("weft-ingress-{ing}");
        until(&format!("Service {name}"), || server.get("v1", "Service", "default", &name));
        server.put_status(
            "v1",
            "Service",
            "default",
            &name,
            json!({"loadBalancer": {"ingress": [{"ip": ip.to_string()}]}}),
        );
        until(&format!("Ingress {ing}'s address"), || {
            let i = server.get("networking.k8s.io/v1", "Ingress", "default", ing)?;
            (i["status"]["loadBalancer"]["ingress"][0]["ip"] == ip.to_string()).then_some(())
        });
        let object = format!("EnvoyConfig default/{name}");
        wait_status(&env.lab, 0, Duration::from_secs(60), &format!("{object} acknowledged"), |s| {
            s["envoy"]["ready"] == true && envoy_state(s, &object) == Some("acknowledged")
        })
        .unwrap_or_else(|e| env.fail(e));
        let cfg = server.get("weft.io/v1alpha1", "EnvoyConfig", "default", &name).unwrap();
        let valid = &cfg["status"]["conditions"][0];
        assert_eq!((valid["type"].as_str(), valid["status"].as_str()), (Some("Valid"), Some("True")), "{cfg:#}");
    }

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

    // Deleting an Ingress takes its objects, and its address stops answering.
    assert!(server.remove("networking.k8s.io/v1", "Ingress", "default", "hosts"));
    assert!(server.get("v1", "Service", "default", "weft-ingress-hosts").is_none());
    until("the address to stop answering", || {
        Client::connect(&ext, sa(lb, 80), None, Duration::from_secs(1))
            .and_then(|mut c| c.get("a.example.com", "/", &[("connection", "close")]))
            .is_err()
            .then_some(())
    });
}

#[test]
fn a_network_policy_from_the_api_is_enforced_and_its_drops_say_policy_denied() {
    require_root!();
    let mut env = KubeLab::new(false);
    env.api.server.put_yaml(&lab_objects(&env.lab, &[]));
    env.start_agents();
    let client = env.lab.pod("n1-p1").netns.clone();
    let reaches = |pod: &str| get_once(&client, sa(env.lab.pod(pod).ip, 8080), "/", Duration::from_millis(300)).is_ok();
    until("n1-p1 to reach n1-p2 before any policy", || reaches("n1-p2").then_some(()));

    // The app2 pods accept only the node network: n1-p1 is denied, n2-p1
    // (no policy selects it) is not.
    env.api.server.put_yaml(weft_tests::flows::DENY_APP2);
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

    // Deleted through the API: open again.
    assert!(env.api.server.remove("networking.k8s.io/v1", "NetworkPolicy", "default", "app2-from-nodes-only"));
    until("the policy to be gone", || reaches("n1-p2").then_some(()));
}
