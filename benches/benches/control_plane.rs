//! Control-plane benchmarks (root; builds its own lab, agent and Envoy):
//!
//! 1. N EnvoyConfigs (each a listener, a route configuration and an EDS
//!    cluster for its own Service with an endpoint), written at once into
//!    the objects directory of a running agent: time until Envoy acknowledged
//!    every one, and the agent's peak memory. N = 1 is the baseline.
//! 2. With 100, 1000 and 10000 configs loaded (delta xDS): one EndpointSlice
//!    change until Envoy sends requests to the new backend, and one
//!    EnvoyConfig edit until Envoy's requests follow the edited route; their
//!    cost should not grow with the count. Envoy is asked by traffic (one
//!    request every few milliseconds to `s0`'s Service address, which the
//!    datapath hands to Envoy): Envoy answers it at the same cost whatever it
//!    holds, unlike its admin interface, whose `/clusters` and config dumps
//!    are written on the thread that applies xDS updates from every cluster
//!    there is (at 10,000 clusters an answer takes that thread longer than
//!    the update does: polled, the admin interface timed itself). Each change
//!    is then checked in `/clusters` or the config dump once, untimed, and
//!    what one `/clusters` answer takes is reported beside the rows.
//! 3. One endpoint change with 1000 configs loaded: state of the world
//!    against delta xDS.
//! 4. N EnvoyConfigs with their Services and EndpointSlices created in a
//!    real API server and read by the operator (`weft-agent operator`),
//!    which watches them as an agent's source does and checks every config:
//!    until it is idle, its CPU and its peak and settled memory. Parts 1-3
//!    read objects from a directory; this is what the API source costs.
//!
//! `cargo bench -p weft-benches --bench control_plane` (WEFT_BENCH_CONFIGS:
//! comma-separated config counts for 1, default 1,1000,10000;
//! WEFT_BENCH_GROUP_SIZE: comma-separated `envoy.listener-group-size`s the
//! agent runs 1 with, 0 for no groups, default the agent's own; each count
//! is run with each size in turn, WEFT_BENCH_REPEAT times (default 1), so
//! the sizes share the machine's load; WEFT_BENCH_CHANGE_CONFIGS: for 2,
//! default 100,1000,10000, empty for neither 2 nor 3;
//! WEFT_BENCH_API_CONFIGS: config counts for 4, default 10000, empty for
//! none; WEFT_BENCH_OPERATORS: comma-separated weft-agent binaries 4 runs in
//! turn, default the workspace's).

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use weft_benches::{Samples, machine, save};
use weft_tests::{
    flows::{agent_get, metric_sum},
    http::{Client, HttpServer, ServerOpts, get_once},
    lab::{Lab, skip_reason},
    objects::{agent_files, agent_status, lab_objects, start_agent, wait_ready, wait_status, write_atomic},
    scenario::sa,
};

/// Services `s<i>` at 10.97.<i/250>.<i%250+1>, each with an EndpointSlice
/// holding `backend`, except those in `without_slice`.
fn services(n: usize, backend: Ipv4Addr, without_slice: &[usize]) -> String {
    let mut y = String::new();
    for i in 0..n {
        y.push_str(&service(i, Some(Ipv4Addr::new(10, 97, (i / 250) as u8, (i % 250 + 1) as u8))));
        if !without_slice.contains(&i) {
            y.push_str(&slice(i, &[backend]));
        }
    }
    y
}

/// Service `s<i>` with one port, at `cluster_ip` (None: the API server's to give).
fn service(i: usize, cluster_ip: Option<Ipv4Addr>) -> String {
    let ip = cluster_ip.map(|ip| format!("clusterIP: {ip}, ")).unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec: {{{ip}ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n"
    )
}

/// The EndpointSlice of Service `s<i>`.
fn slice(i: usize, backends: &[Ipv4Addr]) -> String {
    let mut eps = String::new();
    for b in backends {
        let _ = writeln!(eps, "- addresses: [{b}]");
    }
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n{eps}---\n"
    )
}

/// EnvoyConfigs `c<i>` for Services `s<i>`, i in `range`.
fn configs(range: std::ops::Range<usize>) -> String {
    let mut y = String::new();
    for i in range {
        y.push_str(&weft_tests::objects::http_envoy_config(&format!("c{i}"), &format!("s{i}"), None));
        y.push_str("---\n");
    }
    y
}

fn acked_count(s: &serde_json::Value) -> usize {
    s["control"]["objects"]
        .as_array()
        .map(|o| o.iter().filter(|x| x["envoy"]["state"] == "acknowledged").count())
        .unwrap_or(0)
}

/// Objects the agent refused, and the first one's problems.
fn refused(s: &serde_json::Value) -> (usize, Option<String>) {
    let bad: Vec<&serde_json::Value> = s["control"]["objects"]
        .as_array()
        .map(|o| o.iter().filter(|x| x["problems"].as_array().is_some_and(|p| !p.is_empty())).collect())
        .unwrap_or_default();
    (bad.len(), bad.first().map(|o| format!("{}: {}", o["object"], o["problems"])))
}

fn kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

struct Run {
    lab: Lab,
    objects: std::path::PathBuf,
    agent: u32,
    _servers: [HttpServer; 2],
}

fn start(agent_config: &str) -> Run {
    let lab = Lab::new().expect("lab");
    // The backends an endpoint change moves `s0` between, named in their answers.
    let server = |pod: &str, name: &str| {
        let p = lab.pod(pod);
        HttpServer::start(&p.netns, sa(p.ip, 8080), ServerOpts { name: name.into(), ..Default::default() }).unwrap()
    };
    let servers = [server(B1, B1), server(B2, B2)];
    let files = agent_files(&lab, 0, agent_config).unwrap();
    let objects = files.objects_dir.join("lab.yaml");
    write_atomic(&objects, &lab_objects(&lab, &[])).unwrap();
    let agent = start_agent(&lab, 0, &files, &lab.run_dir.join("agent.log")).unwrap();
    wait_ready(&files, Duration::from_secs(60), || lab.running(agent)).unwrap();
    wait_status(&lab, 0, Duration::from_secs(60), "Envoy ready", |s| s["envoy"]["ready"] == true).unwrap();
    Run { lab, objects, agent, _servers: servers }
}

/// CPU time a process has used so far (user + system).
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start at the state, field 3.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

struct Scaled {
    took: Duration,
    acked: usize,
    refused: usize,
    why: Option<String>,
    /// The agent's peak RSS until every config was settled, and (below)
    /// once a full status listing was made after it.
    agent_burst_kib: u64,
    agent_kib: u64,
    agent_cpu: Duration,
    envoy_kib: u64,
    envoy_peak_kib: u64,
    /// The agent's resident memory when all were acknowledged: anonymous
    /// (its heap, stacks), and mapped from files or shared (its binary's
    /// code, the datapath's ring buffer), which its peak RSS also counts.
    agent_anon_kib: u64,
    agent_file_kib: u64,
    envoy_cpu: Duration,
    envoy_fds: usize,
    envoy_restarts: u64,
    /// Envoy's listeners when all were acknowledged.
    listeners: usize,
}

/// The agent config for a listener group size (None: the agent's default).
fn group_config(size: Option<usize>) -> String {
    size.map(|s| format!("envoy: {{listener-group-size: {s}}}\n")).unwrap_or_default()
}

fn scale(n: usize, group_size: Option<usize>) -> Scaled {
    let run = start(&group_config(group_size));
    let backend = run.lab.pod(B1).ip;
    let body = format!("{}{}{}", lab_objects(&run.lab, &[]), services(n, backend, &[]), configs(0..n));
    let ready = wait_status(&run.lab, 0, Duration::from_secs(60), "Envoy's pid", |s| s["envoy"]["pid"].is_u64())
        .unwrap_or_else(|e| panic!("{e:.2000}"));
    let envoy_pid = ready["envoy"]["pid"].as_u64().unwrap_or(0) as u32;
    let (agent_cpu0, envoy_cpu0) = (cpu(run.agent), cpu(envoy_pid));
    let t0 = Instant::now();
    write_atomic(&run.objects, &body).unwrap();
    // Polled on the metrics, a few hundred bytes: a status lists every
    // object, and serializing one every 100 ms at 10,000 was most of the
    // 15 % of the agent's samples in JSON in a profile of this run.
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let settled = agent_get(&run.lab, 0, "/metrics").ok().is_some_and(|m| {
            let count = |state| metric_sum(&m, "weft_config_objects", &[("state", state)]) as usize;
            count("valid") + count("rejected") == n && count("pending") == 0
        });
        if settled {
            break;
        }
        assert!(Instant::now() < deadline, "{n} configs not settled (acknowledged, nacked or refused) in 30 minutes");
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = t0.elapsed();
    let agent_burst_kib = kib(run.agent, "VmHWM:");
    let st = agent_status(&run.lab, 0).unwrap_or_else(|e| panic!("{e:.2000}"));
    let (agent_cpu, envoy_cpu) = (cpu(run.agent) - agent_cpu0, cpu(envoy_pid) - envoy_cpu0);
    let (refused, why) = refused(&st);
    let listeners = admin(&run.lab, "/listeners")
        .lines()
        .filter_map(|l| l.split_once("::"))
        .map(|(n, _)| n)
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    Scaled {
        took,
        acked: acked_count(&st),
        refused,
        why,
        agent_burst_kib,
        agent_kib: kib(run.agent, "VmHWM:"),
        agent_anon_kib: kib(run.agent, "RssAnon:"),
        agent_file_kib: kib(run.agent, "RssFile:") + kib(run.agent, "RssShmem:"),
        agent_cpu,
        envoy_kib: kib(envoy_pid, "VmRSS:"),
        envoy_peak_kib: kib(envoy_pid, "VmHWM:"),
        envoy_cpu,
        envoy_fds: std::fs::read_dir(format!("/proc/{envoy_pid}/fd")).map_or(0, |d| d.count()),
        envoy_restarts: st["envoy"]["restarts"].as_u64().unwrap_or(0),
        listeners,
    }
}

/// The lab's pods `s0`'s endpoints move between (each serves HTTP on 8080
/// and names itself in `x-served-by`), and the one that asks `s0`.
const B1: &str = "n1-p2";
const B2: &str = "n2-p1";
const CLIENT: &str = "n1-p1";
/// `s0`'s Service address (see [`services`]).
const S0: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);

/// Changes with `n` configs loaded: `s0`'s EndpointSlice and EnvoyConfig
/// `c0` live in files of their own, as one object changes alone in a
/// cluster (a change does not re-read the other configs).
struct Loaded {
    run: Run,
    s0: std::path::PathBuf,
    c0: std::path::PathBuf,
}

fn load(n: usize, delta: bool) -> Loaded {
    let run = start(if delta { "envoy: {delta: true}\n" } else { "envoy: {delta: false}\n" });
    let b1 = run.lab.pod(B1).ip;
    let base = lab_objects(&run.lab, &[]);
    let s0 = run.objects.with_file_name("s0.yaml");
    let c0 = run.objects.with_file_name("c0.yaml");
    write_atomic(&s0, &slice(0, &[b1])).unwrap();
    write_atomic(&c0, &config_c0(0)).unwrap();
    write_atomic(&run.objects, &format!("{base}{}{}", services(n, b1, &[0]), configs(1..n))).unwrap();
    wait_status(&run.lab, 0, Duration::from_secs(1800), "configs acknowledged", |s| acked_count(s) == n).unwrap();
    let l = Loaded { run, s0, c0 };
    // Envoy serves s0 (the datapath hands its address to Envoy once Envoy has c0).
    wait_for(&l, "s0 served through Envoy", |r| r.header("x-served-by") == Some(B1));
    l
}

/// Config c0 with its route's timeout set to `round` + 1 seconds and the
/// path rewritten to `/r<round>/`, which the backend's answer shows.
fn config_c0(round: usize) -> String {
    let route = format!("{{cluster: default/s0, timeout: {}s, prefix_rewrite: /r{round}/}}", round + 1);
    weft_tests::objects::http_envoy_config("c0", "s0", Some(&route))
}

/// GET on node1's Envoy admin interface ("" when it does not answer).
fn admin(lab: &Lab, path: &str) -> String {
    let Ok(mut c) =
        Client::connect(&lab.node(0).netns, "127.0.0.1:9901".parse().unwrap(), None, Duration::from_secs(2))
    else {
        return String::new();
    };
    c.get("admin", path, &[("connection", "close")]).map(|r| r.body).unwrap_or_default()
}

/// The time until a request to `s0` (one every 2 ms, each on a connection
/// of its own) is answered through Envoy as `done` wants. Through Envoy:
/// c0's route rewrites the path (the datapath alone would also follow an
/// endpoint change, to the same backends).
fn wait_for(l: &Loaded, what: &str, done: impl Fn(&weft_tests::http::Response) -> bool) -> Duration {
    let (client, t0) = (&l.run.lab.pod(CLIENT).netns, Instant::now());
    loop {
        if let Ok((r, _, _)) = get_once(client, sa(S0, 80), "/", Duration::from_secs(2))
            && r.status == 200
            && r.body.contains("path=/r")
            && done(&r)
        {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "{what}: not within 60 s");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Milliseconds until Envoy sends `s0`'s requests to its new backend, for
/// each of 10 endpoint changes (its one endpoint moves between two pods).
/// Each is then found in Envoy's /clusters, untimed.
fn endpoint_changes(l: &Loaded) -> Samples {
    let lab = &l.run.lab;
    let mut out = Vec::new();
    for round in 0..10 {
        let (to, from) = if round % 2 == 0 { (B2, B1) } else { (B1, B2) };
        let t0 = Instant::now();
        write_atomic(&l.s0, &slice(0, &[lab.pod(to).ip])).unwrap();
        wait_for(l, "endpoint change", |r| r.header("x-served-by") == Some(to));
        out.push(t0.elapsed());
        let clusters = admin(lab, "/clusters");
        let hosts: Vec<&str> = clusters.lines().filter_map(|l| l.strip_prefix("default/s0::")).collect();
        let has = |pod: &str| hosts.iter().any(|h| h.starts_with(&format!("{}:8080::", lab.pod(pod).ip)));
        assert!(has(to) && !has(from), "Envoy's /clusters after the change: {hosts:?}");
    }
    Samples::new(out)
}

/// Milliseconds until Envoy's requests follow each of 10 edits of config
/// c0 (its route's path rewrite, seen in the backend's answer). Each edit
/// is then found in Envoy's config dump (its route's timeout), untimed.
fn config_edits(l: &Loaded) -> Samples {
    // Envoy matches name_regex against the whole name (`default/c0/c0-route`).
    let path = "/config_dump?resource=dynamic_route_configs&name_regex=.*/c0-route";
    let mut out = Vec::new();
    for round in 1..=10 {
        let t0 = Instant::now();
        write_atomic(&l.c0, &config_c0(round)).unwrap();
        let rewritten = format!("path=/r{round}/ ");
        wait_for(l, "config edit", |r| r.body.contains(&rewritten));
        out.push(t0.elapsed());
        let want = format!("\"timeout\": \"{}s\"", round + 1);
        assert!(admin(&l.run.lab, path).contains(&want), "Envoy's config dump after edit {round}");
    }
    Samples::new(out)
}

/// How long one answer of Envoy's `/clusters` takes (what the rows above
/// once waited for on every poll).
fn clusters_answer(l: &Loaded) -> Duration {
    let t0 = Instant::now();
    let body = admin(&l.run.lab, "/clusters");
    assert!(body.contains("default/s0::"), "Envoy's /clusters");
    t0.elapsed()
}

/// The slowest of five rounds of requests for Envoy's counts as the agent's
/// access-log ledger asks for them (`ledger::STATS_PATHS`, one request per
/// stat type): how long one request holds Envoy's main thread, which also
/// applies xDS updates.
fn ledger_reading(l: &Loaded) -> Duration {
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let mut body = String::new();
        for path in weft_agent::envoy::ledger::STATS_PATHS {
            let t0 = Instant::now();
            body.push_str(&admin(&l.run.lab, path));
            slowest = slowest.max(t0.elapsed());
        }
        assert!(body.contains("downstream_rq_completed"), "Envoy's /stats: {body:.500}");
    }
    slowest
}

/// What one operator run against the API server used (part 4).
struct FromApi {
    /// Until its CPU time stopped growing (it had read, checked and
    /// written the status of every object).
    took: Duration,
    cpu: Duration,
    peak_kib: u64,
    settled_kib: u64,
    anon_kib: u64,
}

/// Runs `bin`'s operator against the API server of `cp` (a namespace of its
/// own for its Lease) until it is idle, sampling its memory; stops it.
fn operator_from_api(cp: &weft_tests::k8s::ControlPlane, bin: &std::path::Path, run: usize) -> FromApi {
    let ns = format!("weft-bench-{run}");
    cp.kubectl_ok(&["create", "namespace", &ns]);
    let log = std::fs::File::create(std::env::temp_dir().join(format!("weft-bench-operator-{run}.log"))).unwrap();
    let started = Instant::now();
    let mut child = std::process::Command::new(bin)
        .arg("operator")
        .arg("--kubeconfig")
        .arg(cp.admin_kubeconfig())
        .args(["--namespace", &ns, "--identity", &ns])
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("the operator starts");
    let pid = child.id();
    // Idle: less than 50 ms of CPU in the last 5 s, after 5 s at least.
    let mut samples: std::collections::VecDeque<(Instant, Duration)> = Default::default();
    let took = loop {
        std::thread::sleep(Duration::from_millis(250));
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the operator stopped: {status} (its log: {})", std::env::temp_dir().display());
        }
        let now = (Instant::now(), cpu(pid));
        samples.push_back(now);
        while samples.front().is_some_and(|(t, _)| now.0 - *t > Duration::from_secs(5)) {
            samples.pop_front();
        }
        let first = samples.front().copied().unwrap_or(now);
        if started.elapsed() > Duration::from_secs(10) && now.1 - first.1 < Duration::from_millis(50) {
            break first.0 - started;
        }
        assert!(started.elapsed() < Duration::from_secs(900), "the operator was not idle in 15 minutes");
    };
    let r = FromApi {
        took,
        cpu: cpu(pid),
        peak_kib: kib(pid, "VmHWM"),
        settled_kib: kib(pid, "VmRSS"),
        anon_kib: kib(pid, "RssAnon"),
    };
    let _ = child.kill();
    let _ = child.wait();
    r
}

/// Part 4: `n` Services, their EndpointSlices and `n` EnvoyConfigs created
/// in a real API server (kube-apiserver and etcd from ../shared/k8s), then
/// read by the operator, which watches the Services and configs as an agent
/// does and checks every config: the memory the API source costs, which
/// the directory source of parts 1-3 does not show. Each binary of
/// WEFT_BENCH_OPERATORS (comma-separated; default the workspace's
/// weft-agent) runs in turn, `repeat` times.
fn from_api(n: usize, repeat: usize) {
    println!(
        "\n## {n} EnvoyConfigs with their Services and EndpointSlices read from a real API server by the operator\n"
    );
    let Some(assets) = weft_tests::k8s::control_plane::find_assets() else {
        println!("Skipped: no Kubernetes control plane binaries (KUBEBUILDER_ASSETS or ../shared/k8s).");
        return;
    };
    let bins: Vec<std::path::PathBuf> = match std::env::var("WEFT_BENCH_OPERATORS") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|s| std::path::PathBuf::from(s.trim())).collect(),
        _ => vec![weft_tests::objects::agent_binary()],
    };
    let cp = weft_tests::k8s::ControlPlane::start(&assets).expect("the control plane starts");
    weft_tests::k8s::deploy::crds(&cp);
    let dir = std::env::temp_dir().join(format!("weft-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Four files created at once (kubectl writes one object at a time).
    let parts = 4;
    let created = Instant::now();
    std::thread::scope(|s| {
        for p in 0..parts {
            let range = p * n / parts..(p + 1) * n / parts;
            let mut y = String::new();
            for i in range.clone() {
                y.push_str(&service(i, None));
                y.push_str(&slice(i, &[Ipv4Addr::new(10, 200, 0, 1)]));
            }
            y.push_str(&configs(range));
            let path = dir.join(format!("part{p}.yaml"));
            std::fs::write(&path, y).unwrap();
            let cp = &cp;
            s.spawn(move || cp.kubectl_ok(&["create", "-f", path.to_str().unwrap(), "-o", "name"]));
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    println!("Created {} objects in {:.1} s.\n", 3 * n, created.elapsed().as_secs_f64());
    println!("| operator binary | run | idle after | CPU | peak RSS | settled RSS | settled anonymous |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    let mut run = 0;
    for _ in 0..repeat {
        for bin in &bins {
            run += 1;
            let r = operator_from_api(&cp, bin, run);
            println!(
                "| {} | {run} | {:.1} s | {:.2} s | {} MiB | {} MiB | {} MiB |",
                bin.display(),
                r.took.as_secs_f64(),
                r.cpu.as_secs_f64(),
                r.peak_kib / 1024,
                r.settled_kib / 1024,
                r.anon_kib / 1024
            );
            rows.push(serde_json::json!({
                "configs": n, "binary": bin.display().to_string(), "idle_s": r.took.as_secs_f64(),
                "cpu_s": r.cpu.as_secs_f64(), "peak_rss_kib": r.peak_kib, "rss_kib": r.settled_kib,
                "anon_kib": r.anon_kib,
            }));
        }
    }
    save("control_plane_api", serde_json::json!({ "operator_from_api": rows }));
}

fn main() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let counts: Vec<usize> = std::env::var("WEFT_BENCH_CONFIGS")
        .unwrap_or_else(|_| "1,1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    // Listeners that bind take a socket per Envoy worker and one more (the
    // configs here have Services, so theirs bind nothing since issue 12):
    // raise the open-file limit the agent and Envoy inherit as far as this
    // machine lets us, as a container runtime does (containerd: 2^20); what
    // does not fit is refused, and the table says so.
    let open_files = weft_agent::run::raise_fd_limit();
    println!("# Control plane\n\nMachine: {}\n", machine());
    println!("## EnvoyConfigs written at once, until Envoy acknowledged each (or the agent refused it)\n");
    println!("Open-file limit the agent and Envoy run with: {open_files}.\n");
    // None: the agent's default.
    let group_sizes: Vec<Option<usize>> = match std::env::var("WEFT_BENCH_GROUP_SIZE") {
        Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).map(Some).collect(),
        Err(_) => vec![None],
    };
    let repeat: usize = std::env::var("WEFT_BENCH_REPEAT").ok().and_then(|v| v.parse().ok()).unwrap_or(1).max(1);
    println!(
        "| configs | group size | acknowledged | refused | time | per acknowledged config | / first row | agent CPU | agent peak RSS: the burst / with a status listing | agent RSS settled: anonymous + files | Envoy CPU | Envoy RSS | Envoy peak RSS | Envoy listeners | Envoy open files | Envoy restarts |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut base = None;
    let mut rows = Vec::new();
    let mut reasons = Vec::new();
    for n in counts {
        for _ in 0..repeat {
            for size in &group_sizes {
                let r = scale(n, *size);
                let base_t = *base.get_or_insert(r.took);
                rows.push(serde_json::json!({
                    "configs": n, "group_size": size, "acked": r.acked, "refused": r.refused,
                    "ack_s": r.took.as_secs_f64(), "agent_cpu_s": r.agent_cpu.as_secs_f64(),
                    "agent_burst_rss_kib": r.agent_burst_kib, "agent_rss_kib": r.agent_kib, "agent_anon_kib": r.agent_anon_kib,
                    "agent_file_kib": r.agent_file_kib, "envoy_cpu_s": r.envoy_cpu.as_secs_f64(),
                    "envoy_rss_kib": r.envoy_kib, "envoy_peak_rss_kib": r.envoy_peak_kib,
                    "envoy_listeners": r.listeners, "envoy_fds": r.envoy_fds,
                    "envoy_restarts": r.envoy_restarts,
                    "refused_because": r.why,
                }));
                let size = size.map_or_else(|| "default".to_owned(), |s| s.to_string());
                println!(
                    "| {n} | {size} | {} | {} | {:.2} s | {:.2} ms | {:.1} | {:.2} s | {} / {} MiB | {} + {} MiB | {:.2} s | {} MiB | {} MiB | {} | {} | {} |",
                    r.acked,
                    r.refused,
                    r.took.as_secs_f64(),
                    r.took.as_secs_f64() * 1e3 / r.acked.max(1) as f64,
                    r.took.as_secs_f64() / base_t.as_secs_f64(),
                    r.agent_cpu.as_secs_f64(),
                    r.agent_burst_kib / 1024,
                    r.agent_kib / 1024,
                    r.agent_anon_kib / 1024,
                    r.agent_file_kib / 1024,
                    r.envoy_cpu.as_secs_f64(),
                    r.envoy_kib / 1024,
                    r.envoy_peak_kib / 1024,
                    r.listeners,
                    r.envoy_fds,
                    r.envoy_restarts
                );
                reasons.extend(r.why.map(|w| format!("{n} configs, group size {size}, first refused: {w}")));
            }
        }
    }
    for r in &reasons {
        println!("\n{r}");
    }
    let api_counts: Vec<usize> = std::env::var("WEFT_BENCH_API_CONFIGS")
        .unwrap_or_else(|_| "10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    for n in api_counts {
        from_api(n, repeat);
    }
    let change_counts: Vec<usize> = std::env::var("WEFT_BENCH_CHANGE_CONFIGS")
        .unwrap_or_else(|_| "100,1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!("\n## One change with N configs loaded, until Envoy has it (delta xDS, 10 changes each)\n");
    println!(
        "| configs loaded | EndpointSlice change p50 ms | max ms | EnvoyConfig edit p50 ms | max ms | endpoint p50 / first row |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut changes = Vec::new();
    let mut first = None;
    let mut admin_ms = Vec::new();
    for n in &change_counts {
        let l = load(*n, true);
        let (e, c) = (endpoint_changes(&l), config_edits(&l));
        admin_ms.push((*n, clusters_answer(&l).as_secs_f64() * 1e3, ledger_reading(&l).as_secs_f64() * 1e3));
        let p50 = e.pct(50.0).as_secs_f64() * 1e3;
        let base = *first.get_or_insert(p50);
        println!(
            "| {n} | {p50:.1} | {:.1} | {:.1} | {:.1} | {:.2} |",
            e.pct(100.0).as_secs_f64() * 1e3,
            c.pct(50.0).as_secs_f64() * 1e3,
            c.pct(100.0).as_secs_f64() * 1e3,
            p50 / base
        );
        changes.push(serde_json::json!({
            "configs": n,
            "endpoint_p50_ms": p50, "endpoint_max_ms": e.pct(100.0).as_secs_f64() * 1e3,
            "edit_p50_ms": c.pct(50.0).as_secs_f64() * 1e3, "edit_max_ms": c.pct(100.0).as_secs_f64() * 1e3,
            "clusters_answer_ms": admin_ms.last().map(|(_, ms, _)| *ms),
            "ledger_reading_ms": admin_ms.last().map(|(_, _, ms)| *ms),
        }));
    }
    println!();
    for (n, ms, reading) in &admin_ms {
        println!("One answer of Envoy's /clusters with {n} configs loaded: {ms:.1} ms (not in the rows above).");
        println!(
            "The slowest request of five readings of Envoy's counts as the agent's ledger asks for them: {reading:.1} ms."
        );
    }
    if change_counts.is_empty() {
        save("control_plane", serde_json::json!({ "open_files": open_files, "configs": rows }));
        return;
    }
    println!("\n## One endpoint change with 1000 configs loaded: state of the world against delta\n");
    println!("| xDS | p50 ms | max ms | p50 / state of the world |");
    println!("|---|---:|---:|---:|");
    let sotw = endpoint_changes(&load(1000, false));
    let delta = endpoint_changes(&load(1000, true));
    save(
        "control_plane",
        serde_json::json!({
            "open_files": open_files,
            "configs": rows,
            "changes": changes,
            "endpoint_change_ms": {
                "sotw_p50": sotw.pct(50.0).as_secs_f64() * 1e3,
                "sotw_max": sotw.pct(100.0).as_secs_f64() * 1e3,
                "delta_p50": delta.pct(50.0).as_secs_f64() * 1e3,
                "delta_max": delta.pct(100.0).as_secs_f64() * 1e3,
            },
        }),
    );
    for (name, s) in [("state of the world", &sotw), ("delta", &delta)] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.2} |",
            s.pct(50.0).as_secs_f64() * 1e3,
            s.pct(100.0).as_secs_f64() * 1e3,
            s.pct(50.0).as_secs_f64() / sotw.pct(50.0).as_secs_f64()
        );
    }
}
