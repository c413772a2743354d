//! Helpers for flow tests and the demo: the `weft` CLI against a lab agent,
//! the agent's metrics, Debian's Prometheus and the OTLP test receiver, each
//! run inside a lab node's namespace and stopped with the lab.

use std::{
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    envoylab::EnvoyLab,
    http::{Client, get_once},
    lab::Lab,
    objects::{AgentFiles, LabService, http_envoy_config, lab_objects, workspace_binary},
    scenario::{T, VIP, sa},
};

/// Starts a command with its stdout piped; its lines arrive on the channel.
pub fn spawn_lines(cmd: &mut Command) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawning");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    (child, rx)
}

/// `weft observe -f -o json --protocol http` against node1's agent: its
/// stdout lines, and its stderr in a file of the lab's run directory.
pub fn follow_http(env: &EnvoyLab) -> (Follower, std::sync::mpsc::Receiver<String>, PathBuf) {
    let err = env.lab.run_dir.join("follower.err");
    let mut cmd = Command::new(workspace_binary("weft"));
    cmd.args(["observe", "--server", &flow_socket(&env.files[0]), "-f", "-o", "json", "--protocol", "http"])
        .stderr(Stdio::from(std::fs::File::create(&err).expect("the follower's stderr file")));
    let (child, lines) = spawn_lines(&mut cmd);
    (Follower(child), lines, err)
}

/// A follower process, killed when dropped (also when a test fails).
pub struct Follower(std::process::Child);

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The flow API socket of a lab agent.
pub fn flow_socket(files: &AgentFiles) -> String {
    format!("unix://{}", files.state_dir.join("observer.sock").display())
}

/// Runs `weft observe -o json ARGS` against a lab agent; one JSON value per line.
pub fn observe_json(files: &AgentFiles, args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = Command::new(workspace_binary("weft"))
        .args(["observe", "--server", &flow_socket(files), "-o", "json"])
        .args(args)
        .output()?;
    anyhow::ensure!(out.status.success(), "weft observe {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout)?
        .lines()
        .map(|l| serde_json::from_str(l).map_err(|e| anyhow::anyhow!("{e}: {l}")))
        .collect()
}

/// The flows of `weft observe` output (loss notices left out).
pub fn flows_of(responses: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    responses.iter().filter_map(|r| r.get("flow")).collect()
}

/// A NetworkPolicy: pods labelled `app: app2` (n1-p2, n2-p2) accept only
/// the node network (the nodes, so the per-node Envoy, and the external
/// client); other pods are denied.
pub const DENY_APP2: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: app2-from-nodes-only, namespace: default}
spec:
  podSelector: {matchLabels: {app: app2}}
  ingress:
  - from: [{ipBlock: {cidr: 192.168.50.0/24}}]
---
";

/// The L7 Service's ClusterIP in the flow lab.
pub const HELLO: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// The W3C trace context the flow lab's HTTP requests carry.
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The flow lab's objects: web (plain, DNAT to n2-p1), hello (L7 through
/// Envoy, to n2-p1), and a policy that denies every peer of the app2 pods
/// (n1-p2, n2-p2).
pub fn flow_objects(lab: &Lab) -> String {
    flow_objects_with(lab, &[])
}

/// The flow lab's objects with more Services.
pub fn flow_objects_with(lab: &Lab, more: &[LabService]) -> String {
    let mut services =
        vec![LabService::new("web", VIP, 80, &["n2-p1"]), LabService::new("hello", HELLO, 80, &["n2-p1"])];
    services.extend_from_slice(more);
    format!("{}{}---\n{DENY_APP2}", lab_objects(lab, &services), http_envoy_config("hello-l7", "hello", None))
}

/// An EnvoyLab with the flow lab's objects, once node1's Envoy acknowledged
/// the L7 config.
pub fn flow_lab(agent_config: &str) -> EnvoyLab {
    let env = EnvoyLab::with_config(flow_objects, agent_config);
    env.acked("EnvoyConfig default/hello-l7");
    env
}

/// Traffic from n1-p1: `n` requests to web, `n` HTTP requests to hello on
/// one connection (with trace context), and one connection attempt to n1-p2
/// that the policy drops.
pub fn traffic(env: &EnvoyLab, n: usize) {
    let client = env.lab.pod("n1-p1");
    for _ in 0..n {
        let (r, _, _) = get_once(&client.netns, sa(VIP, 80), "/", T).unwrap_or_else(|e| env.fail(e));
        assert_eq!(r.status, 200);
    }
    let mut c = Client::connect(&client.netns, sa(HELLO, 80), None, T).unwrap_or_else(|e| env.fail(e));
    for i in 0..n {
        let r = c.get("hello.default", &format!("/api/items/{i}"), &[("traceparent", TRACEPARENT)]).unwrap();
        assert_eq!(r.status, 200, "{r:?}");
    }
    drop(c);
    let denied = sa(env.lab.pod("n1-p2").ip, 8080);
    assert!(get_once(&client.netns, denied, "/", Duration::from_millis(300)).is_err(), "the policy lets n1-p1 in");
}

/// Waits until node1's flow API holds `n` HTTP flows (the access log is
/// flushed every 200 ms).
pub fn wait_http_flows(env: &EnvoyLab, n: usize) -> Vec<serde_json::Value> {
    wait_for(Duration::from_secs(10), "HTTP flows", || {
        let r = observe_json(&env.files[0], &["--all", "--protocol", "http"]).ok()?;
        (flows_of(&r).len() >= n).then_some(r)
    })
    .unwrap_or_else(|e| env.fail(e))
}

/// GETs a path of node `idx`'s agent API from inside the node.
pub fn agent_get(lab: &Lab, idx: usize, path: &str) -> anyhow::Result<String> {
    let mut c = Client::connect(&lab.node(idx).netns, "127.0.0.1:9962".parse()?, None, Duration::from_secs(2))?;
    let r = c.get("agent", path, &[("connection", "close")])?;
    anyhow::ensure!(r.status == 200, "GET {path}: {}", r.status);
    Ok(r.body)
}

/// Sums the samples of `name` whose labels include every `key="value"` of `want`.
pub fn metric_sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (n == name && want.iter().all(|(k, v)| labels.contains(&format!("{k}=\"{v}\""))))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// Debian's Prometheus, scraping a lab agent from inside its node.
pub struct Prometheus {
    pub netns: String,
    pub port: u16,
    pub pid: u32,
}

impl Prometheus {
    /// Starts Prometheus in node `idx`'s namespace, scraping its agent every
    /// second; waits until it answers.
    pub fn start(lab: &Lab, idx: usize, dir: &Path) -> anyhow::Result<Prometheus> {
        std::fs::create_dir_all(dir)?;
        let port = 19090;
        let cfg = dir.join("prometheus.yml");
        std::fs::write(
            &cfg,
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\nscrape_configs:\n- job_name: weft\n  static_configs: [{targets: ['127.0.0.1:9962']}]\n",
        )?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone()?)
            .stderr(log);
        let netns = lab.node(idx).netns.clone();
        let pid = lab.spawn(&netns, None, &mut cmd)?;
        let p = Prometheus { netns, port, pid };
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.get("/-/ready").map(|(s, _)| s != 200).unwrap_or(true) {
            anyhow::ensure!(
                lab.running(pid),
                "prometheus exited: {}",
                std::fs::read_to_string(dir.join("prometheus.log"))?
            );
            anyhow::ensure!(Instant::now() < deadline, "prometheus not ready after 30 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(p)
    }

    fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let mut c =
            Client::connect(&self.netns, format!("127.0.0.1:{}", self.port).parse()?, None, Duration::from_secs(5))?;
        let r = c.get("prometheus", path, &[("connection", "close")])?;
        Ok((r.status, r.body))
    }

    /// GETs an HTTP API path; its JSON answer, which must say success.
    fn api(&self, path: &str, what: &str) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self.get(path)?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        anyhow::ensure!(status == 200 && v["status"] == "success", "{what}: {body}");
        Ok(v)
    }

    /// Runs an instant query; the raw API answer.
    pub fn query(&self, q: &str) -> anyhow::Result<serde_json::Value> {
        self.api(&format!("/api/v1/query?query={}", url_encode(q)), &format!("query {q}"))
    }

    /// The values `label` takes in the series that match `selector`.
    pub fn label_values(&self, label: &str, selector: &str) -> anyhow::Result<Vec<String>> {
        let path = format!("/api/v1/label/{}/values?match%5B%5D={}", url_encode(label), url_encode(selector));
        let v = self.api(&path, &format!("values of {label} in {selector}"))?;
        Ok(v["data"].as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_owned)).collect())
    }

    /// The single value of a scalar-like query (sum of a vector), None when empty.
    pub fn value(&self, q: &str) -> anyhow::Result<Option<f64>> {
        let v = self.query(q)?;
        let result = &v["data"]["result"];
        Ok(result.as_array().and_then(|r| r.first()).and_then(|s| s["value"][1].as_str()?.parse().ok()))
    }
}

/// Percent-encodes a query parameter.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The project's Python (the venv setup.sh creates).
pub fn venv_python() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    root.join(".venv/bin/python3")
}

/// The OTLP test receiver (tests/otlp_receiver.py) in a lab namespace.
pub struct OtlpReceiver {
    pub pid: u32,
    pub out: PathBuf,
    pub grpc_port: u16,
    pub http_port: u16,
}

impl OtlpReceiver {
    /// Starts the receiver in `netns` on fixed ports; waits for READY.
    pub fn start(lab: &Lab, netns: &str, out: &Path, grpc_port: u16, http_port: u16) -> anyhow::Result<OtlpReceiver> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("otlp_receiver.py");
        let mut cmd = Command::new(venv_python());
        cmd.arg(script)
            .args(["--grpc-port", &grpc_port.to_string(), "--http-port", &http_port.to_string()])
            .arg("--out")
            .arg(out)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let pid = lab.spawn(netns, None, &mut cmd)?;
        let stdout = lab.take_stdout(pid).expect("piped");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        anyhow::ensure!(line.starts_with("READY"), "OTLP receiver did not start: {line:?}");
        Ok(OtlpReceiver { pid, out: out.to_owned(), grpc_port, http_port })
    }

    /// Everything received so far, one JSON value per record or span.
    pub fn received(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Stops it (SIGTERM, then reaped by the lab).
    pub fn stop(self, lab: &Lab) {
        // SAFETY: signalling a child the lab started.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while lab.running(self.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        lab.kill(self.pid);
    }
}

/// Waits until `f` returns Some, up to `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        anyhow::ensure!(Instant::now() < deadline, "waited {timeout:?} for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
