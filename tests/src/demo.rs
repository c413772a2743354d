//! The demo: a two-node lab with weft agents (each running the node's Envoy),
//! Services, an EnvoyConfig and a NetworkPolicy written as Kubernetes YAML,
//! traffic through them, and a live `weft observe` stream of what happened:
//! plain Service traffic, HTTP through Envoy, and policy drops.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::{
    flows::{DENY_APP2, flow_socket},
    http::{HttpServer, Response, ServerOpts, get_once},
    lab::Lab,
    objects::{
        LabService, agent_command, agent_files, envoy_serves, lab_objects, wait_ready, wait_status, workspace_binary,
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

/// Runs the demo for `duration` (or until Ctrl-C), then tears the lab down.
pub fn run(duration: Duration) -> anyhow::Result<()> {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    say("building the lab: node1 (pods n1-p1, n1-p2), node2 (n2-p1, n2-p2), an external client");
    let lab = Lab::new()?;
    for p in &lab.pods {
        println!("    pod {:<6} {:<12} on {}", p.name, p.ip, lab.node(p.node).name);
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

    let mut web = LabService::new("web", VIP, 80, &["n2-p1"]);
    web.node_port = Some(30080);
    let services = [
        web,
        LabService::new("hello", HELLO, 80, &["n2-p1", "n2-p2"]),
        LabService::new("hello-v1", Ipv4Addr::new(10, 96, 0, 21), 80, &["n2-p1"]),
        LabService::new("hello-v2", Ipv4Addr::new(10, 96, 0, 22), 80, &["n2-p2"]),
    ];
    let files: Vec<_> = (0..2).map(|i| agent_files(&lab, i, "")).collect::<Result<_, _>>()?;
    let objects_path = files[0].objects_dir.join("lab.yaml");
    write_atomic(&objects_path, &format!("{}{ENVOY_CONFIG}---\n{DENY_APP2}", lab_objects(&lab, &services)))?;
    say(&format!("Kubernetes objects for the agents: {}", objects_path.display()));
    println!("    Services: web 10.96.0.10 (NodePort 30080), hello 10.96.0.20, hello-v1, hello-v2");
    println!("    EnvoyConfig default/hello-split: hello -> Envoy -> 90 % hello-v1 (n2-p1), 10 % hello-v2 (n2-p2)");
    println!(
        "    NetworkPolicy default/app2-from-nodes-only: the app2 pods (n1-p2, n2-p2) accept only the node network"
    );

    say("starting weft-agent on node1 and node2 (datapath loaded, maps pinned, Envoy started, flow API up)");
    let mut pids = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let mut cmd = agent_command();
        let log = std::fs::File::create(lab.run_dir.join(format!("agent{i}.log")))?;
        cmd.args(["run", "--config"]).arg(&f.config).stdout(log.try_clone()?).stderr(log);
        pids.push(lab.spawn(&lab.node(i).netns, Some(&lab.node(i).cgroup), &mut cmd)?);
    }
    for (i, f) in files.iter().enumerate() {
        if let Err(e) = wait_ready(f, Duration::from_secs(30), || lab.running(pids[i])) {
            let log = std::fs::read_to_string(lab.run_dir.join(format!("agent{i}.log"))).unwrap_or_default();
            anyhow::bail!("{e}\nagent log:\n{log}");
        }
    }
    let status = wait_status(&lab, 0, Duration::from_secs(30), "Envoy to acknowledge hello-split", |s| {
        envoy_serves(s, "EnvoyConfig default/hello-split")
    })?;
    let obj = status["control"]["objects"].as_array().and_then(|o| o.first()).cloned().unwrap_or_default();
    println!(
        "    node1's agent: {} is {}, listener {} on proxy port {}",
        obj["object"].as_str().unwrap_or("?"),
        obj["envoy"]["state"].as_str().unwrap_or("?"),
        obj["listeners"][0][0].as_str().unwrap_or("?"),
        obj["listeners"][0][1]
    );

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
    drop(lab);
    Ok(())
}
