//! The lab as Kubernetes objects (Nodes, Pods, Services, EndpointSlices), for
//! agents that read an objects directory, and agent processes to run on it.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::Mutex,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::{
    cni,
    lab::{CNI_NETWORK, Lab, PodNetwork},
};

/// A Service to publish: name, ClusterIP, port, backend pods and their port.
#[derive(Clone, Debug)]
pub struct LabService {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub backends: Vec<String>,
    /// `NodePort` with this port, if set.
    pub node_port: Option<u16>,
    /// Kubernetes namespace (default: "default").
    pub namespace: String,
    /// Extra `metadata.annotations` lines (`key: "value"`).
    pub annotations: Vec<(String, String)>,
}

impl LabService {
    /// A ClusterIP Service with backends on port 8080.
    pub fn new(name: &str, cluster_ip: Ipv4Addr, port: u16, backends: &[&str]) -> Self {
        Self {
            name: name.into(),
            cluster_ip,
            port,
            target_port: 8080,
            backends: backends.iter().map(|s| s.to_string()).collect(),
            node_port: None,
            namespace: "default".into(),
            annotations: Vec::new(),
        }
    }
}

/// How a test wants a lab pod to look to Kubernetes: its namespace, labels
/// and named container ports, in place of the lab's defaults.
#[derive(Clone, Debug, Default)]
pub struct PodLook {
    pub namespace: String,
    pub labels: Vec<(String, String)>,
    /// (name, port) of TCP container ports.
    pub ports: Vec<(String, u16)>,
}

/// The lab's nodes and pods, and the given Services with their EndpointSlices, as YAML.
pub fn lab_objects(lab: &Lab, services: &[LabService]) -> String {
    lab_objects_with(lab, services, &std::collections::BTreeMap::new())
}

/// Like [`lab_objects`], with some pods (by name) looking as `looks` says.
pub fn lab_objects_with(
    lab: &Lab,
    services: &[LabService],
    looks: &std::collections::BTreeMap<&str, PodLook>,
) -> String {
    let mut y = String::new();
    for n in &lab.nodes {
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\n  labels: {{kubernetes.io/hostname: {}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {}}}]\n---\n",
            n.name, n.name, n.ip
        );
    }
    for p in &lab.pods {
        let look = looks.get(p.name.as_str());
        let labels: Vec<String> =
            look.map_or(&p.labels, |l| &l.labels).iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let ports: Vec<String> = look
            .map(|l| l.ports.iter().map(|(n, port)| format!("{{name: {n}, containerPort: {port}}}")).collect())
            .unwrap_or_default();
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {}\n  namespace: {}\n  labels: {{{}}}\nspec:\n  nodeName: {}\n  containers: [{{name: app, image: lab, ports: [{}]}}]\nstatus:\n  phase: Running\n  podIP: {}\n---\n",
            p.name,
            look.map_or(&p.namespace, |l| &l.namespace),
            labels.join(", "),
            lab.node(p.node).name,
            ports.join(", "),
            p.ip
        );
    }
    for s in services {
        let annotations: Vec<String> = s.annotations.iter().map(|(k, v)| format!("{k}: \"{v}\"")).collect();
        let (kind, node_port) = match s.node_port {
            Some(np) => ("NodePort", format!(", nodePort: {np}")),
            None => ("ClusterIP", String::new()),
        };
        let _ = write!(
            y,
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{{ann}}}\nspec:\n  type: {kind}\n  clusterIP: {ip}\n  ports: [{{name: http, port: {port}, targetPort: {tp}{node_port}}}]\n---\n",
            name = s.name,
            ns = s.namespace,
            ann = annotations.join(", "),
            ip = s.cluster_ip,
            port = s.port,
            tp = s.target_port,
        );
        let endpoints: Vec<String> = s
            .backends
            .iter()
            .map(|b| {
                let pod = lab.pod(b);
                format!(
                    "- addresses: [{}]\n  conditions: {{ready: true}}\n  nodeName: {}\n  targetRef: {{kind: Pod, name: {}, namespace: default}}\n",
                    pod.ip,
                    lab.node(pod.node).name,
                    pod.name
                )
            })
            .collect();
        let _ = write!(
            y,
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: {ns}\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: {tp}, protocol: TCP}}]\nendpoints:{eps}---\n",
            name = s.name,
            ns = s.namespace,
            tp = s.target_port,
            eps = if endpoints.is_empty() { " []\n".to_string() } else { format!("\n{}", endpoints.concat()) },
        );
    }
    y
}

/// Writes a file atomically (rename), so a watching agent never reads half of it.
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

/// Where a lab node's agent keeps its files.
pub struct AgentFiles {
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub objects_dir: PathBuf,
    /// The agent's `cni-socket`, if it has one (every agent of a
    /// [`PodNetwork::Chain`] lab has).
    pub cni_socket: Option<PathBuf>,
    /// weft-cni's ADDs [`start_agent`] started for the node's pods, which
    /// [`wait_ready`] waits for.
    cni_adds: Mutex<Option<JoinHandle<Result<(), String>>>>,
}

/// Writes the config of node `idx`'s agent: the lab's bpffs, cgroup and
/// objects directory, and in a [`PodNetwork::Chain`] lab a `cni-socket`
/// (unless `extra` sets one).
pub fn agent_files(lab: &Lab, idx: usize, extra: &str) -> std::io::Result<AgentFiles> {
    let node = lab.node(idx);
    let dir = lab.run_dir.join(&node.name);
    let objects_dir = lab.run_dir.join("objects");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(&objects_dir)?;
    let state_dir = dir.join("state");
    let config = dir.join("agent.yaml");
    let mut cni_socket = extra.lines().find_map(|l| l.strip_prefix("cni-socket:")).map(|p| PathBuf::from(p.trim()));
    let mut cni_line = String::new();
    if cni_socket.is_none() && lab.pod_network == PodNetwork::Chain {
        let path = dir.join("cni.sock");
        cni_line = format!("cni-socket: {}\n", path.display());
        cni_socket = Some(path);
    }
    std::fs::write(
        &config,
        format!(
            "node-name: {}\ndevices: [{}]\nbpffs-dir: {}\ncgroup: {}\nstate-dir: {}\nobjects-dir: {}\n{cni_line}{extra}",
            node.name,
            node.dev,
            node.bpffs_dir.display(),
            node.cgroup.display(),
            state_dir.display(),
            objects_dir.display(),
        ),
    )?;
    Ok(AgentFiles { config, state_dir, objects_dir, cni_socket, cni_adds: Mutex::new(None) })
}

impl AgentFiles {
    /// The agent without a `cni-socket`, as on a node whose runtime does not
    /// run weft-cni: it finds each local pod's device by the route to the
    /// pod's address (ptp's veth here), and [`start_agent`] runs no ADD.
    pub fn without_cni_socket(mut self) -> std::io::Result<Self> {
        let config = std::fs::read_to_string(&self.config)?;
        let kept: String = config.lines().filter(|l| !l.starts_with("cni-socket:")).map(|l| format!("{l}\n")).collect();
        std::fs::write(&self.config, kept)?;
        self.cni_socket = None;
        Ok(self)
    }
}

pub use crate::bins::workspace_binary;

/// The agent binary built alongside the tests.
pub fn agent_binary() -> PathBuf {
    workspace_binary("weft-agent")
}

/// The Envoy the tests run: $WEFT_ENVOY, else the one tests/setup.sh pins in
/// the project's venv.
pub fn envoy_binary() -> PathBuf {
    match std::env::var_os("WEFT_ENVOY").filter(|p| !p.is_empty()) {
        Some(p) => p.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/envoy"),
    }
}

/// A command that runs the agent binary with the tests' Envoy (the agent
/// finds Envoy at run time; the lab's is not on PATH).
pub fn agent_command() -> Command {
    let mut cmd = Command::new(agent_binary());
    cmd.env("WEFT_ENVOY", envoy_binary());
    cmd
}

/// Starts node `idx`'s agent inside the node's namespace and cgroup (as a
/// node process; the lab's teardown then also stops the Envoy it starts);
/// returns its pid.
pub fn start_agent(lab: &Lab, idx: usize, files: &AgentFiles, log: &Path) -> anyhow::Result<u32> {
    start_agent_with_env(lab, idx, files, log, &[])
}

/// [`start_agent`] with extra environment variables for the agent.
pub fn start_agent_with_env(
    lab: &Lab,
    idx: usize,
    files: &AgentFiles,
    log: &Path,
    env: &[(String, String)],
) -> anyhow::Result<u32> {
    let _ = std::fs::remove_file(files.state_dir.join("ready"));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut cmd = agent_command();
    cmd.args(["run", "--config"]).arg(&files.config).envs(env.iter().cloned()).stdout(log.try_clone()?).stderr(log);
    let pid = lab.spawn(&lab.node(idx).netns, Some(&lab.node(idx).cgroup), &mut cmd)?;
    if let Some(socket) = &files.cni_socket
        && lab.pod_network == PodNetwork::Chain
    {
        let adds = weft_cni_adds(lab, idx, socket, &files.objects_dir, pid);
        *files.cni_adds.lock().unwrap_or_else(|e| e.into_inner()) = Some(adds);
    }
    Ok(pid)
}

/// How long weft-cni's ADDs may wait for an agent's CNI socket to appear.
const CNI_SOCKET_WAIT: Duration = Duration::from_secs(30);

/// Runs weft-cni's ADD, as the runtime's chain does after ptp's, for each
/// of node `idx`'s pods not yet wired, once the agent (`pid`) listens on
/// `socket`; a pod counts as wired once its ADD returned. The Kubernetes
/// namespace is the one the pod's object in `objects_dir` says (tests may
/// move lab pods to other namespaces), as the kubelet passes it.
fn weft_cni_adds(lab: &Lab, idx: usize, socket: &Path, objects_dir: &Path, pid: u32) -> JoinHandle<Result<(), String>> {
    let node = lab.node(idx).clone();
    let pods: Vec<_> = lab.pods_of(idx).filter(|p| !lab.cni_wired(&p.name)).cloned().collect();
    let wired = lab.cni_wired_set();
    let (socket, objects_dir) = (socket.to_owned(), objects_dir.to_owned());
    std::thread::spawn(move || {
        if pods.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + CNI_SOCKET_WAIT;
        while !socket.exists() {
            if !Path::new(&format!("/proc/{pid}")).exists() || Instant::now() > deadline {
                return Err(format!("no CNI socket {} from node {}'s agent", socket.display(), node.name));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let pod_objects = weft_agent::k8s::yaml::load_path(&objects_dir).map(|l| l.objects.pods).unwrap_or_default();
        for pod in pods {
            let namespace = pod_objects
                .keys()
                .find(|k| k.name == pod.name)
                .map_or_else(|| pod.namespace.clone(), |k| k.namespace.clone());
            let prev = pod.ptp_result.as_ref().ok_or_else(|| format!("pod {}: no ptp result", pod.name))?;
            let sandbox = crate::lab::sandbox(&pod, &namespace, &pod.name);
            cni::add_weft_cni(&node.netns, &sandbox, CNI_NETWORK, prev, &socket)?;
            wired.lock().unwrap_or_else(|e| e.into_inner()).insert(pod.name.clone());
        }
        Ok(())
    })
}

/// Waits until the agent has applied its first snapshot, or `alive` says it
/// died; then, in a [`PodNetwork::Chain`] lab, until weft-cni's ADDs of the
/// node's pods returned (the agent wired them).
pub fn wait_ready(files: &AgentFiles, timeout: Duration, alive: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !files.state_dir.join("ready").exists() {
        if Instant::now() > deadline {
            anyhow::bail!("agent not ready after {timeout:?} ({})", files.state_dir.display());
        }
        if !alive() {
            anyhow::bail!("agent exited before it was ready ({})", files.state_dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let adds = files.cni_adds.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(adds) = adds {
        adds.join().map_err(|_| anyhow::anyhow!("weft-cni's ADDs panicked"))?.map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// An EnvoyConfig (weft.io/v1alpha1) redirecting `service` to an HTTP
/// listener whose route sends everything to the EDS cluster of that Service.
/// `route` replaces the default route action (`{cluster: default/<service>}`).
pub fn http_envoy_config(name: &str, service: &str, route: Option<&str>) -> String {
    let route = route.map(str::to_owned).unwrap_or_else(|| format!("{{cluster: default/{service}}}"));
    format!(
        r#"apiVersion: weft.io/v1alpha1
kind: EnvoyConfig
metadata: {{name: {name}, namespace: default}}
spec:
  services: [{{name: {service}}}]
  resources:
  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: {name}-listener
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          rds: {{route_config_name: {name}-route}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
    name: {name}-route
    virtual_hosts:
    - name: all
      domains: ["*"]
      routes:
      - match: {{prefix: /}}
        route: {route}
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: default/{service}
    connect_timeout: 2s
    type: EDS
"#
    )
}

/// The agent's `/status`, fetched from inside node `idx`.
pub fn agent_status(lab: &Lab, idx: usize) -> anyhow::Result<serde_json::Value> {
    let mut c =
        crate::http::Client::connect(&lab.node(idx).netns, "127.0.0.1:9962".parse()?, None, Duration::from_secs(2))?;
    let r = c.get("agent", "/status", &[("connection", "close")])?;
    Ok(serde_json::from_str(&r.body)?)
}

/// Waits until `pred` holds for node `idx`'s agent status.
pub fn wait_status(
    lab: &Lab,
    idx: usize,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    let mut last = serde_json::Value::Null;
    loop {
        if let Ok(s) = agent_status(lab, idx) {
            if pred(&s) {
                return Ok(s);
            }
            last = s;
        }
        if Instant::now() > deadline {
            anyhow::bail!("waited {timeout:?} for {what}; last status: {last:#}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The state Envoy reports for an object in a status (`acknowledged`, `pending`, ...).
pub fn envoy_state<'a>(status: &'a serde_json::Value, object: &str) -> Option<&'a str> {
    status["control"]["objects"].as_array()?.iter().find(|o| o["object"] == object)?["envoy"]["state"].as_str()
}

/// Whether a status says Envoy is ready and acknowledged `object`, and the
/// datapath hands every L7 frontend to Envoy (none still waits for the
/// proxy's listening socket, keeping its plain forwarding meanwhile) and
/// every port L7 policies send connections through has Envoy's socket
/// (until then those connections are refused).
pub fn envoy_serves(status: &serde_json::Value, object: &str) -> bool {
    let none = |field: &str| status["datapath"][field].as_array().is_some_and(|a| a.is_empty());
    status["envoy"]["ready"] == true
        && envoy_state(status, object) == Some("acknowledged")
        && none("frontends-awaiting-proxy")
        && none("policy-proxy-ports-refusing")
}

/// The body of a page of Envoy's admin interface in node `idx` (None if
/// Envoy does not answer).
fn envoy_admin(lab: &Lab, idx: usize, path: &str) -> Option<String> {
    let mut c = crate::http::Client::connect(
        &lab.node(idx).netns,
        "127.0.0.1:9901".parse().unwrap(),
        None,
        Duration::from_secs(2),
    )
    .ok()?;
    Some(c.get("admin", path, &[("connection", "close")]).ok()?.body)
}

/// A counter from Envoy's admin /stats in node `idx` (0 if absent).
pub fn envoy_stat(lab: &Lab, idx: usize, name: &str) -> u64 {
    let Some(body) = envoy_admin(lab, idx, "/stats") else { return 0 };
    body.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// The names of the listeners Envoy in node `idx` has (admin /listeners,
/// which has a line per address of each).
pub fn envoy_listeners(lab: &Lab, idx: usize) -> std::collections::BTreeSet<String> {
    let body = envoy_admin(lab, idx, "/listeners").unwrap_or_default();
    body.lines().filter_map(|l| Some(l.split_once("::")?.0.to_owned())).collect()
}

/// HTTP requests node `idx`'s Envoy completed, over every connection
/// manager but the admin interface's (what Envoy logged an access-log
/// entry for).
pub fn envoy_requests(lab: &Lab, idx: usize) -> anyhow::Result<u64> {
    let mut c =
        crate::http::Client::connect(&lab.node(idx).netns, "127.0.0.1:9901".parse()?, None, Duration::from_secs(2))?;
    let r = c.get("admin", "/stats?filter=downstream_rq_completed", &[("connection", "close")])?;
    anyhow::ensure!(r.status == 200, "Envoy /stats: {}", r.status);
    Ok(r.body
        .lines()
        .filter_map(|l| l.strip_prefix("http.")?.split_once(".downstream_rq_completed: "))
        .filter(|(prefix, _)| *prefix != "admin")
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum())
}

/// The Gateway API's CRDs and conformance objects (shared/conformance/gateway-api):
/// from $WEFT_GATEWAY_API, or the `shared` directory beside the repository.
pub fn gateway_api_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("WEFT_GATEWAY_API") {
        return p.into();
    }
    let candidates = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/gateway-api"),
        PathBuf::from("/work/shared/conformance/gateway-api"),
    ];
    candidates.into_iter().find(|p| p.is_dir()).expect(
        "the Gateway API's CRDs and conformance objects (shared/conformance/gateway-api) not found: set WEFT_GATEWAY_API",
    )
}

/// Cilium's public examples (shared/conformance/cilium-examples): from
/// $WEFT_CONFORMANCE, or the `shared` directory beside the repository.
pub fn conformance_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("WEFT_CONFORMANCE") {
        return p.into();
    }
    let candidates = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/cilium-examples"),
        PathBuf::from("/work/shared/conformance/cilium-examples"),
    ];
    candidates.into_iter().find(|p| p.is_dir()).expect(
        "Cilium's examples (shared/conformance/cilium-examples) not found: set WEFT_CONFORMANCE to their directory",
    )
}

/// A self-signed certificate (EC P-256, two days) for `hosts` (the first is
/// also the subject's CN), written as `<stem>.crt` and `<stem>.key` in
/// `dir`: (certificate, key). For TLS Secrets in tests; needs openssl.
pub fn self_signed_cert(dir: &Path, stem: &str, hosts: &[&str]) -> (PathBuf, PathBuf) {
    let (crt, key) = (dir.join(format!("{stem}.crt")), dir.join(format!("{stem}.key")));
    let sans: Vec<String> = hosts.iter().map(|h| format!("DNS:{h}")).collect();
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"])
        .args(["-subj", &format!("/CN={}", hosts.first().copied().unwrap_or("test")), "-addext"])
        .arg(format!("subjectAltName={}", sans.join(",")))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("openssl (tests/setup.sh installs it)");
    assert!(out.status.success(), "openssl: {}", String::from_utf8_lossy(&out.stderr));
    (crt, key)
}
