//! Request latency through Envoy, side by side in one run (root; builds its
//! own lab, agent and Envoys):
//!
//! - direct pod -> pod (the baseline);
//! - pod -> ClusterIP, translated per packet by the eBPF datapath (DNAT);
//! - sidecarless: pod -> L7 Service, handed to the node's Envoy by the
//!   datapath (sk_lookup), the agent's Envoy forwards to the backend;
//! - iptables TPROXY to the same Envoy (a pinned listener), as a
//!   netfilter-based mesh would;
//! - the sidecar model: the client's own Envoy, then the server's Envoy,
//!   addressed directly (no iptables redirects, so this is a generous
//!   baseline for sidecars).
//!
//! Keep-alive requests and new connections (a fifth as many), each path in
//! interleaved rounds. `cargo bench -p weft-benches --bench l7_paths`
//! (WEFT_BENCH_N: keep-alive requests per path).

use std::{net::Ipv4Addr, process::Command, time::Duration};

use weft_benches::{Samples, machine, pct_json, ratio, save, us};
use weft_tests::{
    http::{HttpServer, ServerOpts},
    lab::{Lab, sh, skip_reason},
    objects::{
        LabService, agent_files, envoy_state, http_envoy_config, lab_objects, start_agent, wait_ready, wait_status,
        write_atomic,
    },
    scenario::{lab_helper, sa},
};

const L7_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// Not a Service: only the TPROXY rule catches it.
const TPROXY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const TPROXY_PORT: u16 = 15050;

/// A static Envoy bootstrap: one HTTP listener forwarding to one address.
fn sidecar_bootstrap(listen: (&str, u16), upstream: (Ipv4Addr, u16), admin: u16) -> String {
    format!(
        r#"{{
  "admin": {{"address": {{"socket_address": {{"address": "127.0.0.1", "port_value": {admin}}}}}}},
  "static_resources": {{
    "listeners": [{{
      "name": "l", "address": {{"socket_address": {{"address": "{}", "port_value": {}}}}},
      "filter_chains": [{{"filters": [{{
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {{
          "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
          "stat_prefix": "s",
          "route_config": {{"virtual_hosts": [{{"name": "all", "domains": ["*"], "routes": [{{"match": {{"prefix": "/"}}, "route": {{"cluster": "up"}}}}]}}]}},
          "http_filters": [{{"name": "envoy.filters.http.router", "typed_config": {{"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}}}]
        }}
      }}]}}]
    }}],
    "clusters": [{{
      "name": "up", "type": "STATIC", "connect_timeout": "1s",
      "load_assignment": {{"cluster_name": "up", "endpoints": [{{"lb_endpoints": [{{"endpoint": {{"address": {{"socket_address": {{"address": "{}", "port_value": {}}}}}}}}}]}}]}}
    }}]
  }}
}}"#,
        listen.0, listen.1, upstream.0, upstream.1
    )
}

fn envoy_binary() -> std::path::PathBuf {
    weft_tests::objects::envoy_binary()
}

fn start_sidecar(lab: &Lab, ns: &str, name: &str, bootstrap: &str) -> u32 {
    let path = lab.run_dir.join(format!("{name}.json"));
    std::fs::write(&path, bootstrap).unwrap();
    let log = std::fs::File::create(lab.run_dir.join(format!("{name}.log"))).unwrap();
    let mut cmd = Command::new(envoy_binary());
    cmd.arg("--config-path").arg(&path).args(["--disable-hot-restart", "--concurrency", "2", "--log-level", "warn"]);
    cmd.stdout(log.try_clone().unwrap()).stderr(log);
    lab.spawn(ns, None, &mut cmd).unwrap()
}

fn samples(lab: &Lab, to: std::net::SocketAddr, n: usize, mode: &str) -> Vec<Duration> {
    let pod = lab.pod("n1-p1");
    let mut cmd = Command::new(lab_helper());
    cmd.args(["latency", &to.to_string(), &n.to_string(), mode]);
    let out = lab.run(&pod.netns, Some(&lab.node(0).cgroup), &mut cmd, Duration::from_secs(600)).unwrap();
    assert!(out.status.success(), "{} {}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| Duration::from_nanos(l.parse().unwrap())).collect()
}

fn wait_port(lab: &Lab, ns: &str, port: u16) {
    for _ in 0..100 {
        let ok = lab.in_ns(ns, || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("nothing listens on 127.0.0.1:{port} in {ns}");
}

fn main() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let n: usize = std::env::var("WEFT_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let lab = Lab::new().expect("lab");
    let backend = lab.pod("n1-p2");
    let _server =
        HttpServer::start(&backend.netns, sa(backend.ip, 8080), ServerOpts { name: "b".into(), ..Default::default() })
            .unwrap();

    // The agent's Envoy serves the L7 Service, and a pinned listener for TPROXY.
    let tproxy_cfg = http_envoy_config("tproxy", "backend", None)
        .replace("  services: [{name: backend}]\n", "  backendServices: [{name: backend}]\n")
        .replace(
            "    name: tproxy-listener\n",
            &format!("    name: tproxy-listener\n    transparent: true\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {TPROXY_PORT}}}}}\n"),
        )
        .replace("name: default/backend\n", "name: default/backend-tproxy\n    eds_cluster_config: {service_name: default/backend}\n")
        .replace("{cluster: default/backend}", "{cluster: default/backend-tproxy}");
    let objects = format!(
        "{}{}---\n{}",
        lab_objects(
            &lab,
            &[
                LabService::new("l7", L7_VIP, 80, &["n1-p2"]),
                LabService::new("backend", Ipv4Addr::new(10, 96, 0, 21), 80, &["n1-p2"])
            ]
        ),
        http_envoy_config("l7", "l7", None),
        tproxy_cfg
    );
    // Per-packet DNAT for pods (not connect-time translation), to measure it.
    let files = agent_files(&lab, 0, "socket-lb-pods: false\n").unwrap();
    write_atomic(&files.objects_dir.join("lab.yaml"), &objects).unwrap();
    let log = lab.run_dir.join("agent.log");
    let pid = start_agent(&lab, 0, &files, &log).unwrap();
    wait_ready(&files, Duration::from_secs(30), || lab.running(pid)).unwrap();
    wait_status(&lab, 0, Duration::from_secs(30), "both configs acknowledged", |s| {
        envoy_state(s, "EnvoyConfig default/l7") == Some("acknowledged")
            && envoy_state(s, "EnvoyConfig default/tproxy") == Some("acknowledged")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(&log).unwrap_or_default()));

    // TPROXY in node1's namespace (never the machine's own).
    let node_ns = lab.node(0).netns.clone();
    let ipt = |args: &[&str]| {
        let mut v = vec!["ip", "netns", "exec", &node_ns, "iptables-legacy"];
        v.extend_from_slice(args);
        sh(&v).unwrap();
    };
    ipt(&[
        "-t",
        "mangle",
        "-A",
        "PREROUTING",
        "-p",
        "tcp",
        "-d",
        &TPROXY_VIP.to_string(),
        "--dport",
        "80",
        "-j",
        "TPROXY",
        "--on-ip",
        "127.0.0.1",
        "--on-port",
        &TPROXY_PORT.to_string(),
        "--tproxy-mark",
        "0x1/0x1",
    ]);
    sh(&["ip", "-n", &node_ns, "rule", "add", "fwmark", "0x1/0x1", "lookup", "100"]).unwrap();
    sh(&["ip", "-n", &node_ns, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100"]).unwrap();
    wait_port(&lab, &node_ns, TPROXY_PORT);

    // Sidecars: the client's Envoy (in n1-p1) and the server's (in n1-p2).
    let client_ns = lab.pod("n1-p1").netns.clone();
    let server_ns = backend.netns.clone();
    start_sidecar(
        &lab,
        &server_ns,
        "server-sidecar",
        &sidecar_bootstrap(("0.0.0.0", 15006), (backend.ip, 8080), 15900),
    );
    start_sidecar(
        &lab,
        &client_ns,
        "client-sidecar",
        &sidecar_bootstrap(("127.0.0.1", 15001), (backend.ip, 15006), 15901),
    );
    wait_port(&lab, &server_ns, 15006);
    wait_port(&lab, &client_ns, 15001);

    let paths = [
        ("direct pod -> pod", sa(backend.ip, 8080)),
        ("eBPF DNAT: pod -> ClusterIP", sa(Ipv4Addr::new(10, 96, 0, 21), 80)),
        ("sidecarless: datapath -> node Envoy", sa(L7_VIP, 80)),
        ("iptables TPROXY -> node Envoy", sa(TPROXY_VIP, 80)),
        ("sidecar chain: client Envoy -> server Envoy", sa(Ipv4Addr::LOCALHOST, 15001)),
    ];
    let (tproxy, chain) = (3, 4);
    let rounds = 10;
    println!("# L7 paths: request latency, {rounds} interleaved rounds per mode\n");
    println!("Machine: {}", machine());
    let mut figures = serde_json::Map::new();
    for (mode, count) in [("keepalive", n), ("new", n / 5)] {
        let mut all: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
        for _ in 0..rounds {
            for (i, (_, to)) in paths.iter().enumerate() {
                all[i].extend(samples(&lab, *to, count / rounds, mode));
            }
        }
        let s: Vec<Samples> = all.into_iter().map(Samples::new).collect();
        let what = if mode == "keepalive" { "keep-alive requests" } else { "requests, each on a new connection" };
        println!("\n## {count} {what} per path\n");
        println!("| path | p50 µs | p99 µs | p50 / direct | p50 / TPROXY | p50 / sidecar chain |");
        println!("|---|---:|---:|---:|---:|---:|");
        let mut rows = Vec::new();
        for (i, (name, _)) in paths.iter().enumerate() {
            println!(
                "| {name} | {} | {} | {} | {} | {} |",
                us(s[i].pct(50.0)),
                us(s[i].pct(99.0)),
                ratio(s[i].pct(50.0), s[0].pct(50.0)),
                ratio(s[i].pct(50.0), s[tproxy].pct(50.0)),
                ratio(s[i].pct(50.0), s[chain].pct(50.0)),
            );
            let mut row = pct_json(&s[i]);
            row["path"] = (*name).into();
            rows.push(row);
        }
        figures.insert(mode.into(), rows.into());
    }
    save("l7_paths", figures.into());
}
