//! The demo: a two-node lab with weft agents (each running the node's Envoy),
//! Services, an EnvoyConfig and a NetworkPolicy written as Kubernetes YAML,
//! traffic through them, and a live `weft observe` stream of what happened:
//! plain Service traffic, HTTP through Envoy, and policy drops.
//!
//! With `KUBEBUILDER_ASSETS` set (tests/env.sh sets it when ../shared/k8s
//! is there), the cluster is a real Kubernetes control plane: the objects
//! are written with `kubectl apply`, the pods come up through the CNI chain
//! ptp + weft-cni ([`KubeLab`]), an operator writes the EnvoyConfig's
//! status and `kubectl get envoyconfigs` shows it. Without it, the agents
//! read the same objects from a directory.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::{
    flows::{DENY_APP2, flow_socket},
    http::{HttpServer, Response, ServerOpts, get_once},
    k8s::{
        ControlPlane, control_plane, deploy,
        lab::{Hold, KubeLab},
    },
    lab::{Lab, PodNetwork},
    objects::{
        LabService, agent_files, envoy_serves, lab_objects, start_agent, wait_ready, wait_status, workspace_binary,
        write_atomic,
    },
    scenario::{T, VIP, sa},
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn say(s: &str) {
    println!("\x1b[1m==> {s}\x1b[0m");
}

const HELLO: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);

/// The EnvoyConfig of the demo: `hello` is handled by each node's Envoy,
/// which sends 90 % of requests to hello-v1 and 10 % to hello-v2, retrying 5xx.
const ENVOY_CONFIG: &str = r#"apiVersion: weft.io/v1alpha1
kind: EnvoyConfig
metadata: {name: hello-split, namespace: default}
spec:
  services: [{name: hello}]
  backendServices: [{name: hello-v1}, {name: hello-v2}]
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: hello
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hello
          rds: {route_config_name: hello}
          http_filters: [{name: envoy.filters.http.router}]
  - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
    name: hello
    virtual_hosts:
    - name: hello
      domains: ["*"]
      routes:
      - match: {prefix: /}
        route:
          weighted_clusters: {clusters: [{name: default/hello-v1, weight: 90}, {name: default/hello-v2, weight: 10}]}
          retry_policy: {retry_on: 5xx, num_retries: 3}
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: default/hello-v1
    type: EDS
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: default/hello-v2
    type: EDS
"#;

fn show(what: &str, r: std::io::Result<(Response, SocketAddr, SocketAddr)>) {
    match r {
        Ok((resp, _, peer)) => {
            let via = if resp.header("x-envoy-upstream-service-time").is_some() { " through Envoy" } else { "" };
            println!(
                "    {what}: {} from {}{via} (client's peer {peer})",
                resp.status,
                resp.field("name").unwrap_or("?")
            )
        }
        Err(e) => println!("    {what}: failed: {e}"),
    }
}

/// A Service of the demo as the API server gets it: its backends chosen by
/// a label the demo gives them (`demo.weft.io/<service>`), the ClusterIP
/// (and NodePort) asked for, so the printed addresses hold on both paths.
fn api_service(s: &LabService) -> String {
    let (type_, node_port) = match s.node_port {
        Some(p) => ("NodePort", format!(", nodePort: {p}")),
        None => ("ClusterIP", String::new()),
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {}}}\nspec:\n  type: {type_}\n  clusterIP: {}\n  selector: {{demo.weft.io/{}: backend}}\n  ports: [{{name: http, port: {}, targetPort: http{node_port}}}]\n---\n",
        s.name, s.namespace, s.cluster_ip, s.name, s.port
    )
}

/// Prints a command's output, indented.
fn print_indented(text: &str) {
    for l in text.lines() {
        println!("    {l}");
    }
}

/// Runs the demo for `duration` (or until Ctrl-C), then tears the lab down.
/// With `KUBEBUILDER_ASSETS` set, the agents read a real Kubernetes control
/// plane (objects written with `kubectl apply`, pods made through the CNI
/// chain ptp + weft-cni); otherwise they read an objects directory.
pub fn run(duration: Duration) -> anyhow::Result<()> {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let on_api = std::env::var_os("KUBEBUILDER_ASSETS").is_some_and(|v| !v.is_empty());
    say("building the lab: node1 (pods n1-p1, n1-p2), node2 (n2-p1, n2-p2), an external client");
    let mut lab = Lab::with_pods(if on_api { PodNetwork::Cni } else { PodNetwork::Chain })?;
    let mut web = LabService::new("web", VIP, 80, &["n2-p1"]);
    web.node_port = Some(30080);
    let services = [
        web,
        LabService::new("hello", HELLO, 80, &["n2-p1", "n2-p2"]),
        LabService::new("hello-v1", Ipv4Addr::new(10, 96, 0, 21), 80, &["n2-p1"]),
        LabService::new("hello-v2", Ipv4Addr::new(10, 96, 0, 22), 80, &["n2-p2"]),
    ];
    for s in &services {
        for b in &s.backends {
            if let Some(p) = lab.pods.iter_mut().find(|p| p.name == *b) {
                p.labels.push((format!("demo.weft.io/{}", s.name), "backend".into()));
            }
        }
    }
    let lab = lab;
    let describe = || {
        println!("    Services: web 10.96.0.10 (NodePort 30080), hello 10.96.0.20, hello-v1, hello-v2");
        println!("    EnvoyConfig default/hello-split: hello -> Envoy -> 90 % hello-v1 (n2-p1), 10 % hello-v2 (n2-p2)");
        println!(
            "    NetworkPolicy default/app2-from-nodes-only: the app2 pods (n1-p2, n2-p2) accept only the node network"
        );
    };

    let kube = if on_api {
        say(
            "starting a Kubernetes control plane from $KUBEBUILDER_ASSETS (etcd, kube-apiserver, kube-controller-manager)",
        );
        let cp = ControlPlane::shared().ok_or_else(|| {
            anyhow::anyhow!("KUBEBUILDER_ASSETS is set but holds no control plane: {}", control_plane::SKIP_LINE)
        })?;
        deploy::crds(&cp);
        let kube = KubeLab::new(&lab, Hold::Shared(cp))?;
        println!("    weft's CRDs and RBAC (deploy/) applied; Nodes node1, node2 and the four Pods (Pending) created");
        let yaml: String = services.iter().map(api_service).collect::<String>() + ENVOY_CONFIG + "---\n" + DENY_APP2;
        let path = lab.run_dir.join("demo.yaml");
        write_atomic(&path, &yaml)?;
        say(&format!("kubectl apply -f {}", path.display()));
        print_indented(&kube.cp.kubectl_ok(&["apply", "-f", &path.to_string_lossy()]));
        describe();
        Some(kube)
    } else {
        None
    };
    let extra = |i: usize| kube.as_ref().map(|k| k.agent_config(i)).unwrap_or_default();
    let files: Vec<_> = (0..2).map(|i| agent_files(&lab, i, &extra(i))).collect::<Result<_, _>>()?;
    if kube.is_none() {
        let objects_path = files[0].objects_dir.join("lab.yaml");
        write_atomic(&objects_path, &format!("{}{ENVOY_CONFIG}---\n{DENY_APP2}", lab_objects(&lab, &services)))?;
        say(&format!("Kubernetes objects for the agents: {}", objects_path.display()));
        describe();
    }

    say("starting weft-agent on node1 and node2 (datapath loaded, maps pinned, Envoy started, flow API up)");
    let mut pids = Vec::new();
    for (i, f) in files.iter().enumerate() {
        pids.push(start_agent(&lab, i, f, &lab.run_dir.join(format!("agent{i}.log")))?);
    }
    for (i, f) in files.iter().enumerate() {
        if let Err(e) = wait_ready(f, Duration::from_secs(30), || lab.running(pids[i])) {
            let log = std::fs::read_to_string(lab.run_dir.join(format!("agent{i}.log"))).unwrap_or_default();
            anyhow::bail!("{e}\nagent log:\n{log}");
        }
    }
    if let Some(kube) = &kube {
        say(
            "the pods, made as a runtime makes them: ptp (host-local) then weft-cni, which returns once the agent has wired the veth",
        );
        for (p, a) in lab.pods.iter().zip(kube.start_pods(&lab)?) {
            println!("    pod {:<6} {:<12} on {} (host side {})", p.name, a.ip, lab.node(p.node).name, a.host_if);
        }
        say(
            "an operator (weft-operator, as its ServiceAccount) writes the EnvoyConfig's status from the agents' reports",
        );
        kube.start_operator(&lab, 0, "weft-operator-0")?;
    } else {
        say(
            "the pods, made as a runtime makes them: ptp (host-local) then weft-cni (ptp's ADD when the lab was built, weft-cni's once the node's agent answered)",
        );
        for p in &lab.pods {
            println!("    pod {:<6} {:<12} on {} (host side {})", p.name, p.ip, lab.node(p.node).name, p.host_if);
        }
    }
    let mut servers = Vec::new();
    for name in ["n1-p2", "n2-p1", "n2-p2"] {
        let pod = lab.pod(name);
        servers.push(HttpServer::start(
            &pod.netns,
            sa(pod.ip, 8080),
            ServerOpts { name: name.into(), ..Default::default() },
        )?);
    }
    let status = wait_status(&lab, 0, Duration::from_secs(60), "Envoy to acknowledge hello-split", |s| {
        envoy_serves(s, "EnvoyConfig default/hello-split")
    })?;
    let obj = status["control"]["objects"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["object"] == "EnvoyConfig default/hello-split"))
        .cloned()
        .unwrap_or_default();
    println!(
        "    node1's agent: {} is {}, listener {} on proxy port {}",
        obj["object"].as_str().unwrap_or("?"),
        obj["envoy"]["state"].as_str().unwrap_or("?"),
        obj["listeners"][0][0].as_str().unwrap_or("?"),
        obj["listeners"][0][1]
    );
    if let Some(kube) = &kube {
        for (svc, pods) in [("web", &["n2-p1"][..]), ("hello-v1", &["n2-p1"]), ("hello-v2", &["n2-p2"])] {
            kube.wait_endpoints(svc, pods);
        }
        let applied = Instant::now() + Duration::from_secs(60);
        while Instant::now() < applied
            && kube.get("envoyconfig", Some("default"), "hello-split").is_none_or(|o| {
                !o["status"]["conditions"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["type"] == "Applied" && c["status"] == "True"))
            })
        {
            std::thread::sleep(Duration::from_millis(300));
        }
        let get = ["get", "envoyconfigs,services,pods", "-n", "default", "-o", "wide"];
        say(&format!("kubectl {}", get.join(" ")));
        print_indented(&kube.cp.kubectl_ok(&get));
    }

    let client = lab.pod("n1-p1");
    say("n1-p1 -> web (ClusterIP 10.96.0.10:80, eBPF DNAT to n2-p1 on node2)");
    for _ in 0..3 {
        show("GET http://10.96.0.10/", get_once(&client.netns, sa(VIP, 80), "/", T));
        std::thread::sleep(Duration::from_millis(300));
    }
    say("n1-p1 -> hello (L7: handed to node1's Envoy by sk_lookup, split 90/10 by the EnvoyConfig)");
    for _ in 0..5 {
        show("GET http://10.96.0.20/", get_once(&client.netns, sa(HELLO, 80), "/", T));
        std::thread::sleep(Duration::from_millis(200));
    }
    say("external client -> NodePort 192.168.50.1:30080");
    show("GET http://192.168.50.1:30080/", get_once(&lab.ext_netns, sa(lab.node(0).ip, 30080), "/", T));
    std::thread::sleep(Duration::from_millis(300));
    say("n1-p1 -> n1-p2:8080 directly (denied by the NetworkPolicy: dropped, POLICY_DENIED)");
    show(
        "GET http://10.1.1.12:8080/",
        get_once(&client.netns, sa(lab.pod("n1-p2").ip, 8080), "/", Duration::from_millis(300)),
    );

    let server = flow_socket(&files[0]);
    say(&format!(
        "live: `weft observe --follow --server {server}` while n1-p1 calls web, hello and n1-p2 every second; Ctrl-C or {}s to stop",
        duration.as_secs()
    ));
    // The stream goes straight to the terminal (in colour, when it is one).
    let mut observe =
        Command::new(workspace_binary("weft")).args(["observe", "--follow", "--server", &server]).spawn()?;
    let start = Instant::now();
    while !STOP.load(Ordering::SeqCst) && start.elapsed() < duration {
        let _ = get_once(&client.netns, sa(VIP, 80), "/", T);
        let _ = get_once(&client.netns, sa(HELLO, 80), "/", T);
        let _ = get_once(&client.netns, sa(lab.pod("n1-p2").ip, 8080), "/", Duration::from_millis(200));
        for _ in 0..10 {
            if STOP.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // SIGINT, as Ctrl-C would: the stream ends cleanly.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(observe.id() as i32, libc::SIGINT) };
    let status = observe.wait()?;
    if !status.success() {
        println!("    weft observe ended with {status}");
    }
    say("stopping: agents, Envoys, servers, namespaces, pins and cgroups are removed");
    drop(servers);
    drop(kube);
    drop(lab);
    Ok(())
}
