//! The lab as a Kubernetes cluster on the real control plane: the lab's
//! nodes are Node objects and its pods Pod objects (containers with named
//! ports; status, with the pod's address and Ready, written with each node's
//! own credentials, as its kubelet would); the API server answers at
//! 127.0.0.1:6443 inside every node (an [`ApiRelay`]); weft's agents and
//! operators run as their ServiceAccounts with exactly deploy/'s RBAC, from
//! tokens of the TokenRequest API bound to Pod objects of their own (so each
//! agent's token names its node). Services get their ClusterIP and NodePort
//! from the API server's allocators and their EndpointSlices from
//! kube-controller-manager.
//!
//! The pods come up as on a node whose runtime chains `weft-cni` after
//! `ptp`: the Pod objects are bound to their nodes without a status; once
//! the agents run (with `cni-socket`), [`KubeLab::start_pods`] runs the chain
//! [ptp with host-local, weft-cni] for each pod as a runtime does
//! ([`crate::cni`]) and then writes the Pod's status with the address
//! host-local gave. The lab must be built with [`PodNetwork::Cni`].
//!
//! One KubeLab at a time per control plane (a lock): Nodes are cluster-wide
//! and every lab's pods have the same addresses. Everything a lab leaves in
//! the cluster is deleted when it drops (and when the next one starts).

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use weft_agent::{netns, requirements::CAPABILITIES};

use super::{ApiRelay, ControlPlane, Exclusive, NODE_API_PORT, Shared, deploy};
use crate::{
    cni,
    lab::{Lab, PodNetwork},
    objects::AgentFiles,
};

/// weft's namespace, as deploy/ makes it.
pub const WEFT_NAMESPACE: &str = "weft-system";
/// A label every lab pod carries with its own name (selects one pod).
pub const POD_LABEL: &str = "lab.weft.io/pod";

static ONE_LAB: Mutex<()> = Mutex::new(());

/// How a lab holds the control plane.
pub enum Hold {
    Shared(Shared),
    Exclusive(Exclusive),
}

impl std::ops::Deref for Hold {
    type Target = ControlPlane;
    fn deref(&self) -> &ControlPlane {
        match self {
            Hold::Shared(s) => s,
            Hold::Exclusive(e) => e,
        }
    }
}

/// See the module doc.
pub struct KubeLab {
    pub cp: Hold,
    /// Per node: the relay to the API server inside the node.
    pub relays: Vec<ApiRelay>,
    /// Per node: its agent's kubeconfig (inside the node: 127.0.0.1:6443).
    pub agent_kubeconfigs: Vec<PathBuf>,
    /// Per node: the unix socket its agent answers weft-cni on.
    pub cni_sockets: Vec<PathBuf>,
    dir: PathBuf,
    /// Runs the nodes' API calls (as their kubelets).
    rt: tokio::runtime::Runtime,
    _one: MutexGuard<'static, ()>,
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

impl KubeLab {
    /// Registers `lab` in the cluster: deploy/'s CRDs and RBAC, the nodes,
    /// the pods (Running and Ready), an agent Pod per node with its token,
    /// and the relays.
    pub fn new(lab: &Lab, cp: Hold) -> anyhow::Result<Self> {
        anyhow::ensure!(
            lab.pod_network == PodNetwork::Cni,
            "KubeLab's pods come through a CNI chain: build the lab with PodNetwork::Cni"
        );
        if let Some(reason) = cni::skip_reason() {
            anyhow::bail!("{reason}");
        }
        let one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
        sweep(&cp);
        deploy::rbac(&cp);
        let dir = lab.run_dir.join("k8s");
        std::fs::create_dir_all(&dir)?;
        let mut relays = Vec::new();
        for n in &lab.nodes {
            relays.push(ApiRelay::start(Some(&netns::named(&n.netns)), NODE_API_PORT, cp.addr())?);
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let cni_sockets = (0..lab.nodes.len()).map(|i| dir.join(format!("cni{i}.sock"))).collect();
        let mut me = Self { cp, relays, agent_kubeconfigs: Vec::new(), cni_sockets, dir: dir.clone(), rt, _one: one };
        for (i, n) in lab.nodes.iter().enumerate() {
            me.register_node(&n.name, n.ip)?;
            let pod = format!("weft-agent-{}", n.name);
            me.weft_pod(&pod, "weft-agent", &n.name, n.ip);
            let token = me.cp.service_account_token(WEFT_NAMESPACE, "weft-agent", Some(&pod))?;
            let path = dir.join(format!("agent{i}.kubeconfig"));
            me.cp.write_kubeconfig_for(
                &path,
                &format!("https://127.0.0.1:{NODE_API_PORT}"),
                "system:serviceaccount:weft-system:weft-agent",
                &format!("token: {token}"),
            )?;
            me.agent_kubeconfigs.push(path);
        }
        for p in &lab.pods {
            let node = lab.node(p.node);
            let mut labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            labels.push(format!("{POD_LABEL}: {}", p.name));
            me.cp.apply(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, labels: {{{}}}}}\nspec:\n  nodeName: {}\n  containers: [{{name: app, image: lab, ports: [{{name: http, containerPort: 8080, protocol: TCP}}]}}]\n",
                p.name,
                p.namespace,
                labels.join(", "),
                node.name,
            ));
        }
        Ok(me)
    }

    /// Brings the lab's pods up as their nodes' runtimes would, once the
    /// agents answer on [`Self::cni_sockets`]: for each pod, ADD of the chain
    /// [ptp (host-local, the node's pod network from `.11`), weft-cni], then
    /// the Pod's status (Running, Ready) with the address from the chain's
    /// result, written with the node's credentials. Fails if host-local gave
    /// a pod another address than the lab's, or a plugin failed.
    pub fn start_pods(&self, lab: &Lab) -> anyhow::Result<Vec<cni::Added>> {
        let mut added = Vec::new();
        for p in &lab.pods {
            let node = lab.node(p.node);
            let ptp = crate::lab::lab_ptp_conf(lab, p.node, &self.dir);
            let a = crate::lab::add_lab_pod(p, &node.netns, &p.namespace, &p.name, &ptp, &self.cni_sockets[p.node])
                .map_err(anyhow::Error::msg)?;
            self.pod_running(&node.name, &p.namespace, &p.name, a.ip, node.ip);
            added.push(a);
        }
        Ok(added)
    }

    /// Runs `f` with a client holding node `node`'s credentials (a kubelet's).
    fn as_node<T>(&self, node: &str, f: impl AsyncFnOnce(kube::Client) -> Result<T, kube::Error>) -> T {
        let kc = self.cp.node_kubeconfig(node).expect("node credentials");
        self.rt
            .block_on(async {
                let client = self.cp.client_for(&kc).await;
                f(client).await
            })
            .unwrap_or_else(|e| panic!("as node {node}: {e}"))
    }

    /// The node registers itself, as its kubelet would: creates its Node
    /// and patches its status (address, Ready) with its own credentials.
    fn register_node(&self, name: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        }))?;
        let status = json!({"status": {
            "addresses": [{"type": "InternalIP", "address": ip.to_string()}, {"type": "Hostname", "address": name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "the lab's node",
                            "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
        }});
        self.as_node(name, async |c| {
            let nodes: Api<Node> = Api::all(c);
            nodes.create(&PostParams::default(), &node).await?;
            nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await
        });
        Ok(())
    }

    /// Writes a pod's status as node `node`'s kubelet would: running, ready, at `ip`.
    pub fn pod_running(&self, node: &str, namespace: &str, name: &str, ip: Ipv4Addr, host_ip: Ipv4Addr) {
        let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now()});
        let status = json!({"status": {
            "phase": "Running",
            "podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
            "hostIP": host_ip.to_string(), "hostIPs": [{"ip": host_ip.to_string()}],
            "startTime": now(),
            "conditions": [cond("PodScheduled"), cond("Initialized"), cond("ContainersReady"), cond("Ready")],
        }});
        self.as_node(node, async |c| {
            Api::<Pod>::namespaced(c, namespace)
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                .await
        });
    }

    /// A host-network Pod of weft's in weft-system on `node`, running as
    /// ServiceAccount `sa` (what the DaemonSet or Deployment would make).
    pub fn weft_pod(&self, name: &str, sa: &str, node: &str, node_ip: Ipv4Addr) {
        self.cp.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {WEFT_NAMESPACE}, labels: {{app.kubernetes.io/name: {sa}}}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {sa}\n  hostNetwork: true\n  containers: [{{name: main, image: weft:0.1.0}}]\n"
        ));
        self.pod_running(node, WEFT_NAMESPACE, name, node_ip, node_ip);
    }

    /// Agent configuration lines that make it read the API server with its
    /// node's ServiceAccount token and answer weft-cni on its socket.
    pub fn agent_config(&self, node: usize) -> String {
        format!(
            "kubernetes:\n  enabled: true\n  kubeconfig: {}\n  namespace: {WEFT_NAMESPACE}\ncni-socket: {}\n",
            self.agent_kubeconfigs[node].display(),
            self.cni_sockets[node].display()
        )
    }

    /// Starts an operator replica as a process of node `node` (identity
    /// `name`, a Pod of that name, its own bound token); returns its pid.
    pub fn start_operator(&self, lab: &Lab, node: usize, name: &str) -> anyhow::Result<u32> {
        let n = lab.node(node);
        self.weft_pod(name, "weft-operator", &n.name, n.ip);
        let token = self.cp.service_account_token(WEFT_NAMESPACE, "weft-operator", Some(name))?;
        let kc = self.dir.join(format!("{name}.kubeconfig"));
        self.cp.write_kubeconfig_for(
            &kc,
            &format!("https://127.0.0.1:{NODE_API_PORT}"),
            "system:serviceaccount:weft-system:weft-operator",
            &format!("token: {token}"),
        )?;
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(lab.run_dir.join(format!("{name}.log")))?;
        let mut cmd = Command::new(crate::objects::agent_binary());
        cmd.args(["operator", "--namespace", WEFT_NAMESPACE, "--identity", name, "--lease-duration", "3"])
            .arg("--kubeconfig")
            .arg(&kc)
            .stdout(log.try_clone()?)
            .stderr(log);
        lab.spawn(&n.netns, None, &mut cmd)
    }

    /// `kubectl apply` of `yaml` as admin; kubectl's output.
    pub fn apply(&self, yaml: &str) -> String {
        self.cp.apply(yaml)
    }

    /// An object as JSON, if it exists.
    pub fn get(&self, kind: &str, ns: Option<&str>, name: &str) -> Option<Value> {
        let mut args = vec!["get", kind, name, "-o", "json"];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        let out = self.cp.kubectl(&args);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("kubectl prints JSON"))
    }

    /// Deletes an object (kubectl delete; the garbage collector takes what it owns).
    pub fn delete(&self, kind: &str, ns: Option<&str>, name: &str) {
        let mut args = vec!["delete", kind, name, "--wait=false"];
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        self.cp.kubectl_ok(&args);
    }

    /// A Service in namespace default with `selector` (`key: value, ...`),
    /// port `port` to the pods' named port `http`: the API server allocates
    /// its ClusterIP (and NodePort, for `type_ = "NodePort"`). Returns the ClusterIP.
    pub fn service(&self, name: &str, type_: &str, port: u16, selector: &str) -> Ipv4Addr {
        self.apply(&service_yaml(name, type_, port, selector));
        let svc = self.get("service", Some("default"), name).expect("the Service");
        svc["spec"]["clusterIP"].as_str().and_then(|ip| ip.parse().ok()).expect("an allocated ClusterIP")
    }

    /// Waits until kube-controller-manager has put exactly `pods` (names) in
    /// Service `name`'s EndpointSlices, as ready endpoints.
    pub fn wait_endpoints(&self, name: &str, pods: &[&str]) {
        let mut want: Vec<String> = pods.iter().map(|p| p.to_string()).collect();
        want.sort();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.cp.kubectl_ok(&[
                "get",
                "endpointslices",
                "-n",
                "default",
                "-l",
                &format!("kubernetes.io/service-name={name}"),
                "-o",
                "json",
            ]);
            let v: Value = serde_json::from_str(&out).unwrap_or_default();
            let mut have: Vec<String> = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
                .filter(|e| e["conditions"]["ready"] == true)
                .filter_map(|e| e["targetRef"]["name"].as_str().map(str::to_owned))
                .collect();
            have.sort();
            if have == want {
                return;
            }
            assert!(Instant::now() < deadline, "EndpointSlices of {name}: {have:?}, not {want:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A Service to the lab pods' named port `http`; see [`KubeLab::service`].
pub fn service_yaml(name: &str, type_: &str, port: u16, selector: &str) -> String {
    let mut y = String::new();
    let _ = write!(
        y,
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  type: {type_}\n  selector: {{{selector}}}\n  ports: [{{name: http, port: {port}, targetPort: http}}]\n"
    );
    y
}

impl Drop for KubeLab {
    fn drop(&mut self) {
        sweep(&self.cp);
    }
}

/// Deletes what labs put in the cluster: their Nodes and pods, weft's Pods
/// and reports, and the objects tests make in namespace default.
fn sweep(cp: &ControlPlane) {
    let quiet = |args: &[&str]| drop(cp.kubectl(args));
    // Pods as their kubelet would finish them: at once.
    quiet(&["delete", "pods", "--all", "-n", "default", "--grace-period=0", "--force"]);
    quiet(&["delete", "pods", "--all", "-n", WEFT_NAMESPACE, "--grace-period=0", "--force"]);
    quiet(&[
        "delete",
        "ingresses,networkpolicies,envoyconfigs.weft.io,secrets,endpoints",
        "--all",
        "-n",
        "default",
        "--wait=false",
    ]);
    quiet(&["delete", "services", "-n", "default", "--field-selector", "metadata.name!=kubernetes", "--wait=false"]);
    quiet(&["delete", "weftnodes,leases,services,endpoints", "--all", "-n", WEFT_NAMESPACE, "--wait=false"]);
    quiet(&["delete", "clusterwideenvoyconfigs.weft.io,nodes", "--all", "--wait=false"]);
    quiet(&["delete", "ciliumenvoyconfigs.cilium.io", "--all", "-n", "default", "--wait=false"]);
    quiet(&["delete", "ciliumclusterwideenvoyconfigs.cilium.io", "--all", "--wait=false"]);
}

/// Starts node `idx`'s agent like [`crate::objects::start_agent`], with only
/// the capabilities the DaemonSet grants (agent/src/requirements.rs) in its
/// bounding set: if it needed another, it would fail here.
pub fn start_agent_with_daemonset_caps(lab: &Lab, idx: usize, files: &AgentFiles, log: &Path) -> anyhow::Result<u32> {
    let _ = std::fs::remove_file(files.state_dir.join("ready"));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let caps: Vec<String> = CAPABILITIES.iter().map(|c| format!("+{}", c.name.to_lowercase())).collect();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set=-all,{}", caps.join(",")))
        .arg("--")
        .arg(crate::objects::agent_binary())
        .env("WEFT_ENVOY", crate::objects::envoy_binary())
        .args(["run", "--config"])
        .arg(&files.config)
        .stdout(log.try_clone()?)
        .stderr(log);
    lab.spawn(&lab.node(idx).netns, Some(&lab.node(idx).cgroup), &mut cmd)
}
