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
//!   baseline for sidecars);
//! - the same chain with an access log in each sidecar (the fair baseline: a
//!   sidecar mesh with telemetry logs every request in both proxies);
//! - an annotated Service (`weft.io/l7-visibility: http`, no EnvoyConfig:
//!   the agent's generated config), against the eBPF DNAT row (issue 13);
//! - an L7 policy: a CiliumNetworkPolicy with an HTTP rule on the backend
//!   pod's second port, so the pod's own traffic goes through the node's
//!   policy listener, against the direct row (issue 14).
//!
//! Keep-alive requests and new connections (a fifth as many), each path in
//! interleaved rounds, from the project's own client (one request at a time).
//!
//! Hop attribution: standalone Envoys in the server's pod, each one bare
//! Envoy plus ONE of what weft adds to the node's Envoy (its access log and
//! flush interval, the transparent handed-connection listener, EDS instead
//! of static endpoints, one worker instead of two), and all of them at once;
//! each hop is its p50 minus the direct path's, against the bare hop. The
//! node Envoy's own hop is measured in the same rounds, also with the agent
//! stopped (SIGSTOP) during its samples, which separates the agent's side
//! from Envoy's; and the CPU each of those Envoys spends per request at a
//! fixed open-loop rate (less sensitive to a loaded machine than latency).
//!
//! Open loop (issue 15): `oha` (installed by `benches/setup.sh`) at fixed
//! request rates with 64 connections and latency correction, so p90/p99 are
//! free of coordinated omission; with the CPU time per request of the
//! Envoys and the agent on each path.
//!
//! The attribution also measures candidates for making the node Envoy's
//! hop cheaper than a bare Envoy's (issue 15: sidecarless at 0.5x the
//! chain), each alone against the bare Envoy: see [`variants`].
//!
//! `cargo bench -p weft-benches --bench l7_paths` (WEFT_BENCH_N: keep-alive
//! requests per path; WEFT_BENCH_OPEN_SECS: seconds per open-loop rate;
//! WEFT_BENCH_VARIANTS: the attribution's variants to run, by key;
//! WEFT_BENCH_ONLY=attribution: nothing but the attribution).

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::json;

use weft_benches::{Samples, machine, pct_json, ratio, save, us};
use weft_tests::{
    http::{HttpServer, ServerOpts, get_once},
    lab::{Lab, sh, skip_reason},
    objects::{
        LabService, agent_files, envoy_serves, envoy_state, http_envoy_config, lab_objects, start_agent, wait_ready,
        wait_status, write_atomic,
    },
    scenario::{lab_helper, sa},
};

const L7_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// Not a Service: only the TPROXY rule catches it.
const TPROXY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
const TPROXY_PORT: u16 = 15050;
/// The annotated Service (issue 13's row).
const SEEN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 22);
/// The backend pod's second server: the L7 policy's port (issue 14's row).
const POLICY_PORT: u16 = 8081;

/// The L7 policy of issue 14's row: GET on the backend pod's POLICY_PORT
/// goes through the node's Envoy (`toPorts.rules.http`), from any peer. A
/// policy that selects the pod denies its other ingress, so the ports the
/// other rows use are allowed plainly (8080, the Envoys of the pod).
fn l7_policy() -> String {
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: bench-l7, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: app2}}}}
  ingress:
  - toPorts:
    - ports: [{{port: "{POLICY_PORT}", protocol: TCP}}]
      rules:
        http: [{{method: GET, path: "/.*"}}]
  - toPorts:
    - ports: [{{port: "8080", protocol: TCP}}, {{port: "15000", endPort: 15999, protocol: TCP}}]
"#
    )
}

/// What a standalone Envoy adds to the bare one (one listener, one route,
/// one static upstream).
#[derive(Clone, Copy, Default)]
struct Shape<'a> {
    /// weft's access log (its JSON format) into this file.
    access_log: Option<&'a Path>,
    /// weft's handed-connection listener: transparent, SO_REUSEPORT as a
    /// socket option, one socket (not one per worker).
    transparent: bool,
    /// The upstream's endpoints over EDS (from this file) rather than static.
    eds: Option<&'a Path>,
    /// One more change to the finished bootstrap (issue 15's per-request
    /// candidates: see [`variants`]).
    tweak: Option<Tweak>,
}

/// A change to a standalone Envoy's bootstrap.
type Tweak = fn(&mut serde_json::Value);

/// The connection manager of a [`sidecar_bootstrap`].
fn hcm_of(boot: &mut serde_json::Value) -> &mut serde_json::Value {
    &mut boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
}

/// The router filter's config of a [`sidecar_bootstrap`] (the last filter).
fn router_of(boot: &mut serde_json::Value) -> &mut serde_json::Value {
    let filters = hcm_of(boot)["http_filters"].as_array_mut().expect("http_filters");
    &mut filters.last_mut().expect("the router")["typed_config"]
}

/// weft's access logger (the node Envoy's: `xds::translate`'s format).
fn weft_access_log(path: &Path) -> serde_json::Value {
    let format: serde_json::Map<String, serde_json::Value> =
        weft_observe::pipeline::accesslog::FORMAT.iter().map(|(k, op)| (k.to_string(), json!(op))).collect();
    json!([{
        "name": "weft-flows",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": path, "log_format": {"json_format": format}
        }
    }])
}

/// A static Envoy bootstrap: one HTTP listener forwarding to one address,
/// with what `shape` adds.
fn sidecar_bootstrap(listen: (&str, u16), upstream: (Ipv4Addr, u16), admin: u16, shape: Shape) -> String {
    let socket = |a: &str, p: u16| json!({"socket_address": {"address": a, "port_value": p}});
    let endpoints = json!([{"lb_endpoints": [{"endpoint": {"address": socket(&upstream.0.to_string(), upstream.1)}}]}]);
    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "s",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "up"}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]
    });
    if let Some(p) = shape.access_log {
        hcm["access_log"] = weft_access_log(p);
    }
    let mut listener = json!({
        "name": "l", "address": socket(listen.0, listen.1),
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]
    });
    if shape.transparent {
        listener["transparent"] = json!(true);
        listener["enable_reuse_port"] = json!(false);
        listener["socket_options"] = json!([{
            "level": libc::SOL_SOCKET, "name": libc::SO_REUSEPORT, "int_value": 1, "state": "STATE_PREBIND"
        }]);
    }
    let mut cluster = json!({"name": "up", "connect_timeout": "1s"});
    match shape.eds {
        Some(file) => {
            let assignment = json!({"version_info": "1", "resources": [{
                "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                "cluster_name": "up", "endpoints": endpoints
            }]});
            std::fs::write(file, assignment.to_string()).unwrap();
            cluster["type"] = json!("EDS");
            cluster["eds_cluster_config"] =
                json!({"eds_config": {"path_config_source": {"path": file}, "resource_api_version": "V3"}});
        }
        None => {
            cluster["type"] = json!("STATIC");
            cluster["load_assignment"] = json!({"cluster_name": "up", "endpoints": endpoints});
        }
    }
    let mut boot = json!({
        "node": {"id": "bench", "cluster": "bench"},
        "admin": {"address": socket("127.0.0.1", admin)},
        "static_resources": {"listeners": [listener], "clusters": [cluster]}
    });
    if let Some(tweak) = shape.tweak {
        tweak(&mut boot);
    }
    boot.to_string()
}

fn envoy_binary() -> std::path::PathBuf {
    weft_tests::objects::envoy_binary()
}

/// Starts a standalone Envoy with `workers` worker threads and the node
/// Envoy's access-log flush interval.
fn start_sidecar(lab: &Lab, ns: &str, name: &str, bootstrap: &str, workers: u32) -> u32 {
    let path = lab.run_dir.join(format!("{name}.json"));
    std::fs::write(&path, bootstrap).unwrap();
    let log = std::fs::File::create(lab.run_dir.join(format!("{name}.log"))).unwrap();
    let mut cmd = Command::new(envoy_binary());
    cmd.arg("--config-path").arg(&path).args(["--disable-hot-restart", "--log-level", "warn"]);
    let flush = weft_agent::envoy::FILE_FLUSH_MS.to_string();
    cmd.args(["--concurrency", &workers.to_string(), "--file-flush-interval-msec", &flush]);
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
    let _policed = HttpServer::start(
        &backend.netns,
        sa(backend.ip, POLICY_PORT),
        ServerOpts { name: "b".into(), ..Default::default() },
    )
    .unwrap();

    // The agent's Envoy serves the L7 Service, and a pinned listener for TPROXY.
    let tproxy_cfg = http_envoy_config("tproxy", "backend", None)
        .replace("kind: EnvoyConfig\nmetadata: {name: tproxy, namespace: default}", "kind: ClusterwideEnvoyConfig\nmetadata: {name: tproxy}")
        .replace("  services: [{name: backend}]\n", "  backendServices: [{name: backend, namespace: default}]\n")
        .replace(
            "    name: tproxy-listener\n",
            &format!("    name: tproxy-listener\n    transparent: true\n    address: {{socket_address: {{address: 127.0.0.1, port_value: {TPROXY_PORT}}}}}\n"),
        )
        .replace("name: default/backend\n", "name: default/backend-tproxy\n    eds_cluster_config: {service_name: default/backend}\n")
        .replace("{cluster: default/backend}", "{cluster: default/backend-tproxy}");
    let mut seen = LabService::new("seen", SEEN_VIP, 80, &["n1-p2"]);
    seen.annotations.push(("weft.io/l7-visibility".into(), "http".into()));
    let objects = format!(
        "{}{}---\n{}---\n{}",
        lab_objects(
            &lab,
            &[
                LabService::new("l7", L7_VIP, 80, &["n1-p2"]),
                LabService::new("backend", Ipv4Addr::new(10, 96, 0, 21), 80, &["n1-p2"]),
                seen,
            ]
        ),
        http_envoy_config("l7", "l7", None),
        tproxy_cfg,
        l7_policy()
    );
    // Per-packet DNAT for pods (not connect-time translation), to measure it.
    let files = agent_files(&lab, 0, "socket-lb-pods: false\n").unwrap();
    write_atomic(&files.objects_dir.join("lab.yaml"), &objects).unwrap();
    let log = lab.run_dir.join("agent.log");
    let pid = start_agent(&lab, 0, &files, &log).unwrap();
    wait_ready(&files, Duration::from_secs(30), || lab.running(pid)).unwrap();
    wait_status(&lab, 0, Duration::from_secs(30), "every config acknowledged and served", |s| {
        envoy_serves(s, "EnvoyConfig default/l7")
            && envoy_state(s, "ClusterwideEnvoyConfig tproxy") == Some("acknowledged")
            && envoy_state(s, "EnvoyConfig default/weft:l7:seen") == Some("acknowledged")
            && envoy_state(s, "ClusterwideEnvoyConfig weft:policy") == Some("acknowledged")
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
    let bare = Shape::default();
    let server_sc = start_sidecar(
        &lab,
        &server_ns,
        "server-sidecar",
        &sidecar_bootstrap(("0.0.0.0", 15006), (backend.ip, 8080), 15900, bare),
        2,
    );
    let client_sc = start_sidecar(
        &lab,
        &client_ns,
        "client-sidecar",
        &sidecar_bootstrap(("127.0.0.1", 15001), (backend.ip, 15006), 15901, bare),
        2,
    );
    // The fair chain: the same two sidecars, each logging every request.
    let (server_log, client_log) = (lab.run_dir.join("server-fair.access"), lab.run_dir.join("client-fair.access"));
    let logged = |p| Shape { access_log: Some(p), ..Default::default() };
    let server_fair = start_sidecar(
        &lab,
        &server_ns,
        "server-fair",
        &sidecar_bootstrap(("0.0.0.0", 15007), (backend.ip, 8080), 15902, logged(&server_log)),
        2,
    );
    let client_fair = start_sidecar(
        &lab,
        &client_ns,
        "client-fair",
        &sidecar_bootstrap(("127.0.0.1", 15002), (backend.ip, 15007), 15903, logged(&client_log)),
        2,
    );
    // Hop attribution: one Envoy per addition, in the server's pod.
    let mut variants = variants(&lab.run_dir);
    for (i, v) in variants.iter_mut().enumerate() {
        let port = VARIANT_PORT + i as u16;
        let boot = sidecar_bootstrap(("0.0.0.0", port), (backend.ip, 8080), 15910 + i as u16, v.shape());
        v.pid = start_sidecar(&lab, &server_ns, &format!("variant-{i}"), &boot, v.workers);
    }
    wait_port(&lab, &server_ns, 15006);
    wait_port(&lab, &client_ns, 15001);
    wait_port(&lab, &server_ns, 15007);
    wait_port(&lab, &client_ns, 15002);
    for i in 0..variants.len() {
        wait_port(&lab, &server_ns, VARIANT_PORT + i as u16);
    }
    let envoy = node_envoy(pid).expect("the agent's Envoy runs");

    let paths = [
        ("direct pod -> pod", sa(backend.ip, 8080)),
        ("eBPF DNAT: pod -> ClusterIP", sa(Ipv4Addr::new(10, 96, 0, 21), 80)),
        ("sidecarless: datapath -> node Envoy", sa(L7_VIP, 80)),
        ("iptables TPROXY -> node Envoy", sa(TPROXY_VIP, 80)),
        ("sidecar chain: client Envoy -> server Envoy", sa(Ipv4Addr::LOCALHOST, 15001)),
        ("fair sidecar chain: both Envoys log each request", sa(Ipv4Addr::LOCALHOST, 15002)),
        ("annotated Service (generated config): datapath -> node Envoy", sa(SEEN_VIP, 80)),
        ("L7 policy (CNP http rule): pod -> node Envoy -> pod", sa(backend.ip, POLICY_PORT)),
    ];
    let (direct, dnat, sidecarless, tproxy, chain, annotated, policed) = (0, 1, 2, 3, 4, 6, 7);
    // The two new rows really go through the node's Envoy.
    for (name, to) in [&paths[annotated], &paths[policed]] {
        let (r, _, _) = get_once(&lab.pod("n1-p1").netns, *to, "/", Duration::from_secs(5)).unwrap();
        assert!(
            r.status == 200 && r.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("x-envoy-upstream-service-time")),
            "{name}: {} {:?}",
            r.status,
            r.headers
        );
    }
    // Whose CPU each path costs (besides the client and the backend).
    let node = || vec![("node Envoy", envoy), ("agent", pid)];
    let costs: Vec<Vec<(&str, u32)>> = vec![
        vec![],
        vec![],
        node(),
        node(),
        vec![("client Envoy", client_sc), ("server Envoy", server_sc)],
        vec![("client Envoy", client_fair), ("server Envoy", server_fair)],
        node(),
        node(),
    ];
    let rounds = 10;
    println!("# L7 paths: request latency, {rounds} interleaved rounds per mode\n");
    println!("Machine: {}", machine());
    let mut figures = serde_json::Map::new();
    // `WEFT_BENCH_ONLY=attribution`: the hop attribution alone (while
    // trying variants).
    let only_attribution = std::env::var("WEFT_BENCH_ONLY").is_ok_and(|v| v == "attribution");
    let modes: &[(&str, usize)] = if only_attribution { &[] } else { &[("keepalive", n), ("new", n / 5)] };
    for &(mode, count) in modes {
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
        // Issue 13's and 14's rows against their baselines.
        let p50 = |i: usize| s[i].pct(50.0);
        println!("\n| row | p50 / its baseline | added p50 µs | added / sidecarless's added |");
        println!("|---|---:|---:|---:|");
        let added = |i: usize, base: usize| p50(i).saturating_sub(p50(base));
        for (i, base, what) in [(annotated, dnat, "eBPF DNAT"), (policed, direct, "direct")] {
            println!(
                "| {} vs {what} | {} | {} | {} |",
                paths[i].0,
                ratio(p50(i), p50(base)),
                us(added(i, base)),
                ratio(added(i, base), added(sidecarless, direct))
            );
        }
    }
    figures.insert(
        "attribution".into(),
        attribution(&lab, &variants, backend.ip, (paths[sidecarless].1, paths[tproxy].1), (envoy, pid), n, rounds),
    );
    if !only_attribution {
        figures.insert("open_loop".into(), open_loop(&lab, &paths, &costs));
    }
    figures.insert("node_envoy_workers".into(), worker_connections(&lab).into());
    save("l7_paths", figures.into());
}

/// The first port of the attribution Envoys (one per variant).
const VARIANT_PORT: u16 = 15100;

/// One standalone Envoy of the attribution.
struct Variant {
    /// What `WEFT_BENCH_VARIANTS` names it by.
    key: &'static str,
    name: &'static str,
    /// The Envoy's process (set once started).
    pid: u32,
    access_log: Option<PathBuf>,
    transparent: bool,
    eds: Option<PathBuf>,
    workers: u32,
    tweak: Option<Tweak>,
}

impl Variant {
    fn shape(&self) -> Shape<'_> {
        Shape {
            access_log: self.access_log.as_deref(),
            transparent: self.transparent,
            eds: self.eds.as_deref(),
            tweak: self.tweak,
        }
    }
}

/// No `x-request-id` generated for requests without one.
fn no_request_id(boot: &mut serde_json::Value) {
    hcm_of(boot)["generate_request_id"] = json!(false);
}

/// The router keeps no per-response-code and timing stats of the cluster.
fn no_dynamic_stats(boot: &mut serde_json::Value) {
    router_of(boot)["dynamic_stats"] = json!(false);
}

/// The router adds no `x-envoy-*` headers (upstream service time, ...).
fn suppress_envoy_headers(boot: &mut serde_json::Value) {
    router_of(boot)["suppress_envoy_headers"] = json!(true);
}

/// No timer per request: no route timeout, no stream idle timeout.
fn no_timers(boot: &mut serde_json::Value) {
    let hcm = hcm_of(boot);
    hcm["stream_idle_timeout"] = json!("0s");
    hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["timeout"] = json!("0s");
}

/// Envoy keeps no stats at all.
fn no_stats(boot: &mut serde_json::Value) {
    boot["stats_config"] = json!({"stats_matcher": {"reject_all": true}});
}

/// The access log's fields in a text line (tab-separated) instead of JSON.
fn text_log(boot: &mut serde_json::Value) {
    let ops: Vec<&str> = weft_observe::pipeline::accesslog::FORMAT.iter().map(|(_, op)| *op).collect();
    let line = format!("{}\n", ops.join("\t"));
    hcm_of(boot)["access_log"][0]["typed_config"]["log_format"] =
        json!({"text_format_source": {"inline_string": line}});
}

/// The connection-manager candidates together.
fn lean(boot: &mut serde_json::Value) {
    no_request_id(boot);
    no_dynamic_stats(boot);
    suppress_envoy_headers(boot);
    no_timers(boot);
}

/// The bare Envoy, each of weft's additions alone, all of them, and the
/// per-request candidates for the node Envoy (issue 15), each alone and
/// together with all of weft's additions. `WEFT_BENCH_VARIANTS` (keys,
/// comma-separated) keeps only those named, and the bare Envoy.
fn variants(dir: &Path) -> Vec<Variant> {
    let bare = || Variant {
        key: "bare",
        name: "",
        pid: 0,
        access_log: None,
        transparent: false,
        eds: None,
        workers: 2,
        tweak: None,
    };
    let log = |key: &str| Some(dir.join(format!("variant-{key}.access")));
    let weft = |key: &'static str, name: &'static str, tweak: Option<Tweak>| Variant {
        key,
        name,
        access_log: log(key),
        transparent: true,
        eds: Some(dir.join(format!("variant-{key}-eds.json"))),
        tweak,
        ..bare()
    };
    let candidate =
        |key: &'static str, name: &'static str, tweak: Tweak| Variant { key, name, tweak: Some(tweak), ..bare() };
    let all = vec![
        Variant { name: "bare Envoy (static endpoints, 2 workers)", ..bare() },
        Variant {
            key: "log",
            name: "+ weft's access log (JSON to a file, 100 ms flush)",
            access_log: log("log"),
            ..bare()
        },
        Variant { key: "transparent", name: "+ transparent handed-connection listener", transparent: true, ..bare() },
        Variant { key: "eds", name: "+ EDS endpoints", eds: Some(dir.join("variant-eds.json")), ..bare() },
        Variant { key: "1worker", name: "1 worker instead of 2", workers: 1, ..bare() },
        weft("all", "all of weft's additions (log, transparent, EDS)", None),
        candidate("noreqid", "+ no request id generated (generate_request_id: false)", no_request_id),
        candidate("nodynstats", "+ router without dynamic stats (dynamic_stats: false)", no_dynamic_stats),
        candidate("suppress", "+ router adds no x-envoy-* headers (suppress_envoy_headers)", suppress_envoy_headers),
        candidate("notimers", "+ no per-request timers (route timeout, stream idle timeout 0s)", no_timers),
        candidate("nostats", "+ no stats at all (stats_matcher: reject_all)", no_stats),
        Variant {
            key: "textlog",
            name: "+ weft's access log as a text line (same fields, tab-separated)",
            access_log: log("textlog"),
            tweak: Some(text_log),
            ..bare()
        },
        weft("all+lean", "all of weft's additions + noreqid, nodynstats, suppress, notimers", Some(lean)),
    ];
    let keep: Option<Vec<String>> =
        std::env::var("WEFT_BENCH_VARIANTS").ok().map(|v| v.split(',').map(|k| k.trim().to_owned()).collect());
    all.into_iter().filter(|v| v.key == "bare" || keep.as_ref().is_none_or(|k| k.iter().any(|k| k == v.key))).collect()
}

/// Stops a process (SIGSTOP) until dropped (SIGCONT), even on a panic.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        // SAFETY: kill has no memory preconditions; the pid is our child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// One row of the attribution after the direct path.
struct Timed {
    name: String,
    to: std::net::SocketAddr,
    /// The Envoy that serves it.
    envoy: u32,
    /// The node's Envoy (the agent's CPU counts too).
    node: bool,
    /// The agent is stopped while the row is measured.
    agent_stopped: bool,
}

/// CPU µs per request of a row's Envoy and of the agent.
#[derive(Clone, Copy)]
struct CpuPerRequest {
    envoy: f64,
    agent: f64,
}

/// Keep-alive p50 through each attribution Envoy and the node's Envoy
/// (sidecarless, also with the agent stopped; TPROXY), interleaved with the
/// direct path: each hop against the bare Envoy's. Then the CPU each of
/// those Envoys (and the agent) spends per request at a fixed open-loop
/// rate, interleaved the same way.
fn attribution(
    lab: &Lab,
    variants: &[Variant],
    backend: Ipv4Addr,
    node_paths: (std::net::SocketAddr, std::net::SocketAddr),
    (envoy, agent): (u32, u32),
    n: usize,
    rounds: usize,
) -> serde_json::Value {
    let mut rows: Vec<Timed> = variants
        .iter()
        .enumerate()
        .map(|(i, v)| Timed {
            name: v.name.to_string(),
            to: sa(backend, VARIANT_PORT + i as u16),
            envoy: v.pid,
            node: false,
            agent_stopped: false,
        })
        .collect();
    let node = |name: &str, to, agent_stopped| Timed { name: name.into(), to, envoy, node: true, agent_stopped };
    rows.push(node("node Envoy, sidecarless (weft as it runs)", node_paths.0, false));
    rows.push(node("node Envoy, sidecarless, the agent stopped (SIGSTOP)", node_paths.0, true));
    rows.push(node("node Envoy, iptables TPROXY", node_paths.1, false));
    let measure = |row: &Timed, count: usize| {
        let _stopped = row.agent_stopped.then(|| Stopped::new(agent));
        samples(lab, row.to, count, "keepalive")
    };
    let mut all: Vec<Vec<Duration>> = vec![Vec::new(); rows.len() + 1];
    for _ in 0..rounds {
        all[0].extend(samples(lab, sa(backend, 8080), n / rounds, "keepalive"));
        for (i, row) in rows.iter().enumerate() {
            all[i + 1].extend(measure(row, n / rounds));
        }
    }
    let s: Vec<Samples> = all.into_iter().map(Samples::new).collect();
    let direct = s[0].pct(50.0);
    let hop = |i: usize| s[i].pct(50.0).saturating_sub(direct);

    // CPU per request at a fixed rate: the Envoy of the row (variants are
    // each their own process) and, for the node's Envoy, the agent.
    let (rate, secs) = (1000, open_secs().min(5));
    let cpu = cpu_per_request(lab, &rows, agent, rate, secs);

    println!("\n## Hop attribution: one Envoy in the server's pod, {n} keep-alive requests each\n");
    println!("Hop = p50 through the Envoy minus the direct path's p50 ({} µs), interleaved rounds.", us(direct));
    if cpu.is_some() {
        println!("CPU: µs per request at {rate} requests/s (oha, 64 connections, {secs} s per row and round).");
    }
    println!(
        "\n| Envoy | p50 µs | p99 µs | hop µs | hop / bare hop | Envoy CPU µs/request | / bare | agent CPU µs/request |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let nan = CpuPerRequest { envoy: f64::NAN, agent: f64::NAN };
    let mut out = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let (p50, p99) = (s[i + 1].pct(50.0), s[i + 1].pct(99.0));
        let c = cpu.as_ref().map_or(nan, |c| c[i]);
        let bare = cpu.as_ref().map_or(nan, |c| c[0]);
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.2} | {} |",
            row.name,
            us(p50),
            us(p99),
            us(hop(i + 1)),
            ratio(hop(i + 1), hop(1)),
            c.envoy,
            c.envoy / bare.envoy,
            if row.node { format!("{:.1}", c.agent) } else { "-".into() },
        );
        let mut r = pct_json(&s[i + 1]);
        r["variant"] = row.name.clone().into();
        r["hop_us"] = (hop(i + 1).as_secs_f64() * 1e6).into();
        r["envoy_cpu_us_per_request"] = c.envoy.into();
        if row.node {
            r["agent_cpu_us_per_request"] = c.agent.into();
        }
        out.push(r);
    }
    json!({"direct": pct_json(&s[0]), "variants": out, "cpu_rate": cpu.is_some().then_some(rate)})
}

/// Seconds per open-loop run (WEFT_BENCH_OPEN_SECS, 10 by default).
fn open_secs() -> u64 {
    std::env::var("WEFT_BENCH_OPEN_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(10)
}

/// The CPU µs per request of each attribution row's Envoy and of the agent
/// at `rate` with `oha` for `secs`, rows interleaved over 3 rounds; None
/// without oha.
fn cpu_per_request(lab: &Lab, rows: &[Timed], agent: u32, rate: u64, secs: u64) -> Option<Vec<CpuPerRequest>> {
    let bin = oha()?;
    // (Envoy CPU s, agent CPU s, requests) per row.
    let mut spent = vec![(0.0, 0.0, 0u64); rows.len()];
    for _ in 0..3 {
        for (i, row) in rows.iter().enumerate() {
            let stopped = row.agent_stopped.then(|| Stopped::new(agent));
            let before = (cpu_secs(row.envoy), cpu_secs(agent));
            let r = oha_run(lab, &bin, row.to, rate, secs);
            let after = (cpu_secs(row.envoy), cpu_secs(agent));
            drop(stopped);
            spent[i].0 += after.0 - before.0;
            spent[i].1 += after.1 - before.1;
            spent[i].2 += r.ok + r.failed;
        }
    }
    let per_request = |secs: f64, n: u64| secs / n.max(1) as f64 * 1e6;
    Some(
        spent
            .iter()
            .map(|(e, a, n)| CpuPerRequest { envoy: per_request(*e, *n), agent: per_request(*a, *n) })
            .collect(),
    )
}

/// The Envoy the agent started (its child).
fn node_envoy(agent: u32) -> Option<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{agent}/task")).ok()?;
    for t in tasks.flatten() {
        let children = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
        for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
            let exe = std::fs::read_link(format!("/proc/{c}/exe")).unwrap_or_default();
            if exe.file_name().is_some_and(|n| n.to_string_lossy().starts_with("envoy")) {
                return Some(c);
            }
        }
    }
    None
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = stat.rsplit_once(')') else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (field(11) + field(12)) / hz
}

/// CPU seconds of each of an Envoy's worker threads (`wrk:worker_N`), in
/// worker order.
fn worker_cpu_secs(pid: u32) -> Vec<f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut workers: Vec<(String, f64)> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| {
            let comm = std::fs::read_to_string(t.path().join("comm")).ok()?;
            let name = comm.trim().strip_prefix("wrk:")?.to_string();
            let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let field = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            Some((name, (field(11) + field(12)) / hz))
        })
        .collect();
    workers.sort_by(|a, b| a.0.cmp(&b.0));
    workers.into_iter().map(|w| w.1).collect()
}

/// Each worker's share of what the workers spent between two readings, in
/// percent ("71/29").
fn worker_shares(before: &[f64], after: &[f64]) -> String {
    let spent: Vec<f64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let total: f64 = spent.iter().sum::<f64>().max(1e-9);
    spent.iter().map(|s| format!("{:.0}", s / total * 100.0)).collect::<Vec<_>>().join("/")
}

/// The connections each worker of the node's Envoy accepted per listener
/// over the whole run (Envoy's `listener.<address>.worker_<n>.downstream_cx_total`):
/// how evenly the listeners' connections were spread.
fn worker_connections(lab: &Lab) -> Vec<String> {
    const STATS: &str = "/stats?filter=downstream_cx_total$";
    let admin = "127.0.0.1:9901".parse().unwrap();
    let lines: Vec<String> = weft_tests::http::Client::connect(&lab.node(0).netns, admin, None, Duration::from_secs(5))
        .and_then(|mut c| c.get("envoy", STATS, &[]))
        .map(|r| {
            r.body.lines().filter(|l| l.starts_with("listener.") && l.contains(".worker_")).map(str::to_owned).collect()
        })
        .unwrap_or_else(|e| vec![format!("(the node Envoy's stats: {e})")]);
    println!("\n## The node Envoy's connections per worker and listener, whole run\n");
    println!("```\n{}\n```", lines.join("\n"));
    lines
}

/// The `oha` binary: `$WEFT_OHA`, or on PATH, or where `cargo install` puts it.
fn oha() -> Option<PathBuf> {
    let cargo_bin = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/oha"));
    std::env::var_os("WEFT_OHA")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH")
                .and_then(|p| std::env::split_paths(&p).map(|d| d.join("oha")).find(|b| b.is_file()))
        })
        .or(cargo_bin)
        .filter(|b| b.is_file())
}

/// One open-loop run's figures.
struct OpenRun {
    rate: f64,
    ok: u64,
    failed: u64,
    p50: f64,
    p90: f64,
    p99: f64,
}

/// `oha` against `to` from the client pod: `rate` requests/s (0: as fast as
/// 64 connections go) for `secs`, keep-alive, latency corrected.
fn oha_run(lab: &Lab, bin: &Path, to: std::net::SocketAddr, rate: u64, secs: u64) -> OpenRun {
    let pod = lab.pod("n1-p1");
    let mut cmd = Command::new(bin);
    cmd.args(["--no-tui", "--output-format", "json", "-c", "64", "-z", &format!("{secs}s")]);
    if rate > 0 {
        cmd.args(["-q", &rate.to_string(), "--latency-correction"]);
    }
    cmd.arg(format!("http://{to}/"));
    let out = lab.run(&pod.netns, Some(&lab.node(0).cgroup), &mut cmd, Duration::from_secs(secs + 60)).unwrap();
    assert!(out.status.success(), "oha: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("oha's JSON");
    let pct = |k: &str| v["latencyPercentiles"][k].as_f64().unwrap_or(f64::NAN) * 1e6;
    let codes = v["statusCodeDistribution"].as_object().cloned().unwrap_or_default();
    let ok = codes.get("200").and_then(|c| c.as_u64()).unwrap_or(0);
    let all: u64 = codes.values().filter_map(|c| c.as_u64()).sum();
    let errors: u64 = v["errorDistribution"].as_object().map_or(0, |e| e.values().filter_map(|c| c.as_u64()).sum());
    OpenRun {
        rate: v["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        ok,
        failed: all - ok + errors,
        p50: pct("p50"),
        p90: pct("p90"),
        p99: pct("p99"),
    }
}

/// The open-loop runs: for each path, 100 and 1,000 requests/s and the
/// highest rate it sustains (three quarters of what 64 connections reach
/// unthrottled on it), with the CPU per request of the processes it costs.
fn open_loop(lab: &Lab, paths: &[(&str, std::net::SocketAddr)], costs: &[Vec<(&str, u32)>]) -> serde_json::Value {
    let Some(bin) = oha() else {
        println!("\n## Open loop: SKIPPED (no `oha`: run benches/setup.sh, or set WEFT_OHA)");
        return serde_json::Value::Null;
    };
    let secs = open_secs();
    println!("\n## Open loop: oha, 64 connections, keep-alive, latency-corrected, {secs} s per rate\n");
    println!(
        "| path | rate asked /s | rate got /s | ok | failed | p50 µs | p90 µs | p99 µs | CPU µs per request | Envoy workers' CPU shares % |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|---|");
    let mut rows = Vec::new();
    for (i, (name, to)) in paths.iter().enumerate() {
        let top = oha_run(lab, &bin, *to, 0, 3.min(secs)).rate;
        for rate in [100, 1000, (top * 0.75) as u64] {
            let before: Vec<f64> = costs[i].iter().map(|(_, p)| cpu_secs(*p)).collect();
            let workers_before: Vec<Vec<f64>> = costs[i].iter().map(|(_, p)| worker_cpu_secs(*p)).collect();
            let r = oha_run(lab, &bin, *to, rate, secs);
            // How evenly each Envoy's workers shared the work (the agent
            // has none: an empty share).
            let shares: Vec<String> = costs[i]
                .iter()
                .zip(&workers_before)
                .filter(|(_, b)| !b.is_empty())
                .map(|((who, p), b)| format!("{who} {}", worker_shares(b, &worker_cpu_secs(*p))))
                .collect();
            let done = (r.ok + r.failed).max(1) as f64;
            let cpu: Vec<(String, f64)> = costs[i]
                .iter()
                .zip(&before)
                .map(|((who, p), b)| (who.to_string(), (cpu_secs(*p) - b) / done * 1e6))
                .collect();
            let cpu_text: Vec<String> = cpu.iter().map(|(w, c)| format!("{w} {c:.1}")).collect();
            println!(
                "| {name} | {rate} | {:.0} | {} | {} | {:.0} | {:.0} | {:.0} | {} | {} |",
                r.rate,
                r.ok,
                r.failed,
                r.p50,
                r.p90,
                r.p99,
                if cpu_text.is_empty() { "-".into() } else { cpu_text.join(", ") },
                if shares.is_empty() { "-".into() } else { shares.join(", ") }
            );
            rows.push(json!({
                "path": name, "rate": rate, "got": r.rate, "ok": r.ok, "failed": r.failed,
                "p50_us": r.p50, "p90_us": r.p90, "p99_us": r.p99, "top": top, "worker_shares": shares,
                "cpu_us_per_request": cpu.into_iter().map(|(w, c)| (w, json!(c))).collect::<serde_json::Map<_, _>>(),
            }));
        }
    }
    serde_json::Value::Array(rows)
}
