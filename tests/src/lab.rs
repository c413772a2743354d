//! A two-node lab in network namespaces: each node has two pods behind veths,
//! the nodes and an external client share an L2 segment (a bridge in its own
//! namespace), pod CIDRs are routed natively between nodes. Everything the lab
//! creates (namespaces, a private bpffs mount, cgroups, processes) is removed
//! when it drops, also on panic; labs left by a killed test are removed by the
//! next lab that starts.
//!
//! Nothing is created in, attached to or routed through the machine's own
//! network namespace.

use std::{
    collections::BTreeSet,
    fs,
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
};

use weft_agent::netns::{self, NetnsGuard};

use crate::cni;

const RUN_DIR: &str = "/run/weft-lab";

/// A pod of the lab.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Kubernetes-style name, unique in the lab (e.g. `n1-p1`).
    pub name: String,
    /// Kubernetes namespace the pod pretends to be in.
    pub namespace: String,
    /// Labels (app=..., etc.).
    pub labels: Vec<(String, String)>,
    /// Network namespace name.
    pub netns: String,
    pub ip: Ipv4Addr,
    /// Host-side device name in the node's namespace: the one ptp made
    /// ([`PodNetwork::Chain`]); empty in a [`PodNetwork::Cni`] lab (whoever
    /// runs the chain learns it).
    pub host_if: String,
    /// Index (0 or 1) of the node hosting the pod.
    pub node: usize,
    /// ptp's result for the pod ([`PodNetwork::Chain`]): what the runtime
    /// hands weft-cni as `prevResult`.
    pub ptp_result: Option<serde_json::Value>,
}

/// A node of the lab.
#[derive(Clone, Debug)]
pub struct Node {
    /// Kubernetes-style node name (`node1`).
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    /// External device name.
    pub dev: String,
    pub pod_cidr: (Ipv4Addr, u8),
    /// This node's bpffs directory inside the lab's private bpffs.
    pub bpffs_dir: PathBuf,
    /// cgroup v2 directory for the node's processes (socket hooks attach here).
    pub cgroup: PathBuf,
}

/// The lab. Drop it to tear everything down.
pub struct Lab {
    pub id: String,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    /// The external client's namespace.
    pub ext_netns: String,
    pub ext_ip: Ipv4Addr,
    /// The namespace holding the bridge between nodes and client.
    pub switch_netns: String,
    pub run_dir: PathBuf,
    pub bpffs: PathBuf,
    pub cgroup_root: PathBuf,
    pub pod_network: PodNetwork,
    children: Mutex<Vec<Child>>,
    /// Pods whose weft-cni ADD returned ([`PodNetwork::Chain`]).
    cni_wired: Arc<Mutex<BTreeSet<String>>>,
}

/// How the lab's pods get their network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodNetwork {
    /// The chain a runtime runs, [ptp (host-local IPAM), weft-cni], in two
    /// steps: ptp's ADD when the lab builds the pod (its veth, the node's
    /// next address from `.11`, routes), weft-cni's ADD once the node's
    /// agent answers on its CNI socket ([`cni::add_weft_cni`]):
    /// `objects::start_agent` (tests/src/objects.rs) runs it for the node's pods not yet
    /// wired, `node::LabNode::install_lab` (tests/src/node.rs) answers it itself in
    /// tests that drive the datapath without an agent. A runtime runs both
    /// at once, before the pod's containers start; the lab's servers start
    /// before the agents, so the pods have their address first.
    Chain,
    /// The lab makes only each pod's network namespace (IPv6 off, `lo` up);
    /// a CNI chain run as a runtime runs it (tests/src/cni.rs) makes the veth
    /// and gives the address. [`Pod::ip`] is then the address host-local
    /// hands out to the node's pods in order from `.11` (checked by whoever
    /// runs the chain).
    Cni,
}

/// Pod network: 10.1.<node>.0/24; node network 192.168.50.0/24.
pub const SERVICE_CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 96, 0, 0), 12);
/// The CNI network's name in the lab's ptp configuration.
pub const CNI_NETWORK: &str = "lab";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Runs a command, failing with its stderr.
pub fn sh(cmd: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output()?;
    if !out.status.success() {
        anyhow::bail!("{}: {}", cmd.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_n(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut v = vec!["ip", "-n", ns];
    v.extend_from_slice(args);
    sh(&v)
}

/// Writes a sysctl inside a namespace.
pub fn sysctl_in(ns: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let _g = NetnsGuard::enter(&netns::named(ns))?;
    fs::write(Path::new("/proc/sys").join(key), value).map_err(|e| anyhow::anyhow!("sysctl {key} in {ns}: {e}"))
}

fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
        })
        .ok_or_else(|| anyhow::anyhow!("no cgroup2 mount found in /proc/mounts"))
}

/// Whether the process can build labs (root, with the tools present).
pub fn skip_reason() -> Option<String> {
    // SAFETY: trivial syscall.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, BPF)".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs iproute2 (`ip`)".into());
    }
    cni::skip_reason()
}

/// Skips a test (returning from it) with a printed reason when labs can't be built.
#[macro_export]
macro_rules! require_root {
    () => {
        if let Some(reason) = $crate::lab::skip_reason() {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
}

impl Lab {
    /// Builds the standard lab: node1 (pods n1-p1, n1-p2) and node2 (n2-p1,
    /// n2-p2), an external client, all with addresses and routes; the pods
    /// through the CNI chain ([`PodNetwork::Chain`]).
    pub fn new() -> anyhow::Result<Self> {
        Self::with_pods(PodNetwork::Chain)
    }

    /// The standard lab with pods wired as `pod_network` says.
    pub fn with_pods(pod_network: PodNetwork) -> anyhow::Result<Self> {
        if pod_network == PodNetwork::Chain
            && let Some(reason) = cni::skip_reason()
        {
            anyhow::bail!("{reason} (tests/setup.sh installs it)");
        }
        reap_stale_labs();
        let id = format!("{:x}{:x}", std::process::id() & 0xfffff, COUNTER.fetch_add(1, Ordering::SeqCst));
        let run_dir = Path::new(RUN_DIR).join(&id);
        fs::create_dir_all(&run_dir)?;
        fs::write(run_dir.join("pid"), std::process::id().to_string())?;
        let cgroup_root = cgroup2_mount()?.join(format!("weft-lab-{id}"));
        let mut lab = Lab {
            nodes: Vec::new(),
            pods: Vec::new(),
            ext_netns: format!("weft-{id}-ext"),
            ext_ip: Ipv4Addr::new(192, 168, 50, 100),
            switch_netns: format!("weft-{id}-sw"),
            bpffs: run_dir.join("bpffs"),
            cgroup_root,
            run_dir,
            id,
            pod_network,
            children: Mutex::new(Vec::new()),
            cni_wired: Arc::default(),
        };
        lab.build()?; // on error, Drop cleans up what was built
        Ok(lab)
    }

    fn build(&mut self) -> anyhow::Result<()> {
        let id = self.id.clone();
        fs::create_dir_all(&self.bpffs)?;
        sh(&["mount", "-t", "bpf", "bpf", self.bpffs.to_str().unwrap()])?;
        fs::create_dir_all(&self.cgroup_root)?;

        sh(&["ip", "netns", "add", &self.switch_netns])?;
        ip_n(&self.switch_netns, &["link", "add", "br0", "type", "bridge"])?;
        ip_n(&self.switch_netns, &["link", "set", "br0", "up"])?;

        // The external client.
        self.plug(&self.ext_netns.clone(), "vext", "eth0", self.ext_ip)?;
        ip_n(&self.ext_netns, &["route", "add", "10.0.0.0/8", "via", "192.168.50.1"])?;
        ip_n(&self.ext_netns, &["route", "add", "172.20.0.0/16", "via", "192.168.50.1"])?;

        for n in 0..2u8 {
            let node = Node {
                name: format!("node{}", n + 1),
                netns: format!("weft-{id}-n{}", n + 1),
                ip: Ipv4Addr::new(192, 168, 50, n + 1),
                dev: "eth0".into(),
                pod_cidr: (Ipv4Addr::new(10, 1, n + 1, 0), 24),
                bpffs_dir: self.bpffs.join(format!("node{}", n + 1)),
                cgroup: self.cgroup_root.join(format!("node{}", n + 1)),
            };
            self.plug(&node.netns, &format!("vn{}", n + 1), "eth0", node.ip)?;
            fs::create_dir_all(&node.cgroup)?;
            let peer = format!("10.1.{}.0/24", 2 - n);
            let peer_gw = format!("192.168.50.{}", 2 - n);
            ip_n(&node.netns, &["route", "add", &peer, "via", &peer_gw])?;
            {
                let key = "net/ipv4/ip_forward";
                sysctl_in(&node.netns, key, "1")?;
            }
            for p in 0..2u8 {
                let pod = Pod {
                    name: format!("n{}-p{}", n + 1, p + 1),
                    namespace: "default".into(),
                    labels: vec![("app".into(), format!("app{}", p + 1))],
                    netns: format!("weft-{id}-n{}-p{}", n + 1, p + 1),
                    ip: Ipv4Addr::new(10, 1, n + 1, 11 + p),
                    host_if: String::new(),
                    node: n as usize,
                    ptp_result: None,
                };
                // Pushed first so that Drop removes a half-built pod too.
                self.pods.push(pod);
                self.add_pod(&node, self.pods.len() - 1)?;
            }
            self.nodes.push(node);
        }
        Ok(())
    }

    /// Adds one more pod to node `node` (index), after the standard two:
    /// `n<node>-p3`, then `-p4`, ... with the next address of the node's pod
    /// network. For tests that need more backends than the standard lab has;
    /// add it before the agents start. Torn down with the lab.
    pub fn add_extra_pod(&mut self, node: usize) -> anyhow::Result<Pod> {
        let n = self.nodes.get(node).cloned().ok_or_else(|| anyhow::anyhow!("no node {node}"))?;
        let p = u8::try_from(self.pods_of(node).count())
            .ok()
            .filter(|p| *p < 50)
            .ok_or_else(|| anyhow::anyhow!("too many pods"))?;
        let (id, node_no) = (self.id.clone(), node + 1);
        let pod = Pod {
            name: format!("n{node_no}-p{}", p + 1),
            namespace: "default".into(),
            labels: vec![("app".into(), format!("app{}", p + 1))],
            netns: format!("weft-{id}-n{node_no}-p{}", p + 1),
            ip: Ipv4Addr::new(10, 1, n.pod_cidr.0.octets()[2], 11 + p),
            host_if: String::new(),
            node,
            ptp_result: None,
        };
        // Pushed first so that Drop removes a half-built pod too.
        self.pods.push(pod);
        self.add_pod(&n, self.pods.len() - 1)?;
        Ok(self.pods[self.pods.len() - 1].clone())
    }

    /// Creates a namespace attached to the switch with `addr/24` on `inner`.
    fn plug(&self, ns: &str, outer: &str, inner: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
        sh(&["ip", "netns", "add", ns])?;
        disable_ipv6(ns)?;
        ip_n(&self.switch_netns, &["link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns])?;
        ip_n(&self.switch_netns, &["link", "set", outer, "master", "br0", "up"])?;
        ip_n(ns, &["addr", "add", &format!("{addr}/24"), "dev", inner])?;
        ip_n(ns, &["link", "set", inner, "up"])?;
        ip_n(ns, &["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Makes the network of `self.pods[i]` on `node`, as `pod_network` says.
    fn add_pod(&mut self, node: &Node, i: usize) -> anyhow::Result<()> {
        let pod = &self.pods[i];
        sh(&["ip", "netns", "add", &pod.netns])?;
        disable_ipv6(&pod.netns)?;
        match self.pod_network {
            PodNetwork::Cni => ip_n(&pod.netns, &["link", "set", "lo", "up"]).map(drop),
            PodNetwork::Chain => {
                ip_n(&pod.netns, &["link", "set", "lo", "up"])?;
                let conf = ptp_conf(node, &self.run_dir);
                let added = cni::add_ptp(&node.netns, &sandbox(pod, &pod.namespace, &pod.name), &conf)
                    .map_err(anyhow::Error::msg)?;
                anyhow::ensure!(
                    added.ip == pod.ip,
                    "host-local gave pod {} the address {}, the lab expects {}",
                    pod.name,
                    added.ip,
                    pod.ip
                );
                let pod = &mut self.pods[i];
                pod.host_if = added.host_if;
                pod.ptp_result = Some(added.prev);
                Ok(())
            }
        }
    }

    /// Whether weft-cni's ADD returned for pod `name` ([`PodNetwork::Chain`]).
    pub fn cni_wired(&self, name: &str) -> bool {
        self.cni_wired.lock().unwrap_or_else(|e| e.into_inner()).contains(name)
    }

    /// The set of pods wired by weft-cni, for whoever runs its ADDs.
    pub fn cni_wired_set(&self) -> Arc<Mutex<BTreeSet<String>>> {
        self.cni_wired.clone()
    }

    /// Node `idx`'s own addresses: on its external device, and the
    /// gateways ptp put on its pods' host veths, from which the node's
    /// connections to its own pods leave.
    pub fn node_addresses(&self, idx: usize) -> BTreeSet<Ipv4Addr> {
        let gateway = |p: &Pod| p.ptp_result.as_ref()?["ips"][0]["gateway"].as_str()?.parse().ok();
        let gateways = self.pods_of(idx).filter_map(gateway);
        std::iter::once(self.node(idx).ip).chain(gateways).collect()
    }

    /// The node with this index.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// A pod by name (`n1-p1`).
    pub fn pod(&self, name: &str) -> &Pod {
        self.pods.iter().find(|p| p.name == name).unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Pods of a node.
    pub fn pods_of(&self, node: usize) -> impl Iterator<Item = &Pod> {
        self.pods.iter().filter(move |p| p.node == node)
    }

    /// Runs `f` with the current thread in a namespace of the lab.
    pub fn in_ns<T>(&self, ns: &str, f: impl FnOnce() -> T) -> T {
        let _g = NetnsGuard::enter(&netns::named(ns)).expect("lab namespace exists");
        f()
    }

    /// Starts a process in a namespace (and cgroup, if given); killed when the lab drops.
    pub fn spawn(&self, ns: &str, cgroup: Option<&Path>, cmd: &mut Command) -> anyhow::Result<u32> {
        let ns_file = fs::File::open(netns::named(ns))?;
        let procs = match cgroup {
            Some(c) => Some(fs::OpenOptions::new().write(true).open(c.join("cgroup.procs"))?),
            None => None,
        };
        use std::os::fd::AsRawFd;
        let (ns_fd, procs_fd) = (ns_file.as_raw_fd(), procs.as_ref().map(|f| f.as_raw_fd()));
        // SAFETY: only async-signal-safe syscalls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // "0" moves the writing process itself into the cgroup.
                if let Some(fd) = procs_fd
                    && libc::write(fd, b"0".as_ptr().cast(), 1) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        Ok(pid)
    }

    /// Runs a process in a namespace (and cgroup) to completion, killing it
    /// after `timeout`; returns its output.
    pub fn run(
        &self,
        ns: &str,
        cgroup: Option<&Path>,
        cmd: &mut Command,
        timeout: std::time::Duration,
    ) -> anyhow::Result<std::process::Output> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let pid = self.spawn(ns, cgroup, cmd)?;
        let mut child = {
            let mut children = self.children.lock().unwrap();
            let pos = children.iter().position(|c| c.id() == pid).expect("just spawned");
            children.remove(pos)
        };
        let deadline = std::time::Instant::now() + timeout;
        while child.try_wait()?.is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output()?;
                anyhow::bail!("{cmd:?} timed out after {timeout:?}; stderr: {}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Ok(child.wait_with_output()?)
    }

    /// Takes the piped stdout of a process the lab started.
    pub fn take_stdout(&self, pid: u32) -> Option<std::process::ChildStdout> {
        self.children.lock().unwrap().iter_mut().find(|c| c.id() == pid)?.stdout.take()
    }

    /// Kills a process the lab started (SIGKILL) and reaps it.
    pub fn kill(&self, pid: u32) {
        let mut children = self.children.lock().unwrap();
        if let Some(pos) = children.iter().position(|c| c.id() == pid) {
            let mut c = children.remove(pos);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether a process the lab started is still running.
    pub fn running(&self, pid: u32) -> bool {
        let mut children = self.children.lock().unwrap();
        children.iter_mut().find(|c| c.id() == pid).is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Every namespace of the lab.
    fn namespaces(&self) -> Vec<String> {
        let mut v = vec![self.switch_netns.clone(), self.ext_netns.clone()];
        v.extend(self.nodes.iter().map(|n| n.netns.clone()));
        v.extend(self.pods.iter().map(|p| p.netns.clone()));
        v
    }
}

/// ptp's configuration for lab node `node`'s pods: its pod network, from
/// `.11` on (so the node's pods, added in the lab's order, get the
/// addresses [`Pod::ip`] says), host-local's state in `run_dir`.
pub fn lab_ptp_conf(lab: &Lab, node: usize, run_dir: &Path) -> serde_json::Value {
    ptp_conf(lab.node(node), run_dir)
}

fn ptp_conf(n: &Node, run_dir: &Path) -> serde_json::Value {
    let (net, bits) = n.pod_cidr;
    let [a, b, c, _] = net.octets();
    cni::ptp_conf(
        CNI_NETWORK,
        &format!("{net}/{bits}"),
        Some(Ipv4Addr::new(a, b, c, 11)),
        &run_dir.join(format!("ipam-{}", n.name)),
    )
}

/// Lab pod `pod` as the runtime's sandbox of the Kubernetes pod `namespace`/`name`.
pub fn sandbox(pod: &Pod, namespace: &str, name: &str) -> cni::Sandbox {
    cni::Sandbox {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        netns: pod.netns.clone(),
        container_id: format!("{}-{}", pod.netns, name),
    }
}

/// ADD of the whole chain [ptp, weft-cni] for lab pod `pod` (of a
/// [`PodNetwork::Cni`] lab: its network namespace only), under the
/// Kubernetes names `namespace`/`name`, on its node with `ptp` and the
/// node's agent at `socket`; fails unless host-local gave the address the
/// lab expects.
pub fn add_lab_pod(
    pod: &Pod,
    node_ns: &str,
    namespace: &str,
    name: &str,
    ptp: &serde_json::Value,
    socket: &Path,
) -> Result<cni::Added, String> {
    let added = cni::add_chain(node_ns, &sandbox(pod, namespace, name), ptp, socket)?;
    if added.ip != pod.ip {
        return Err(format!("host-local gave {namespace}/{name} the address {}, the lab expects {}", added.ip, pod.ip));
    }
    Ok(added)
}

fn disable_ipv6(ns: &str) -> anyhow::Result<()> {
    // Keeps router solicitations and the like off the pod devices, where the
    // IPv4-only datapath would count them as drops.
    sysctl_in(ns, "net/ipv6/conf/all/disable_ipv6", "1")?;
    sysctl_in(ns, "net/ipv6/conf/default/disable_ipv6", "1")
}

impl Drop for Lab {
    fn drop(&mut self) {
        for mut c in self.children.lock().unwrap().drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        teardown(&self.id, &self.run_dir, &self.bpffs, &self.cgroup_root, &self.namespaces());
    }
}

/// Removes everything a lab created; tolerant of parts that never existed.
fn teardown(id: &str, run_dir: &Path, bpffs: &Path, cgroup_root: &Path, namespaces: &[String]) {
    // Namespaces named after the lab, including ones a failed build left behind.
    let prefix = format!("weft-{id}-");
    let mut all: Vec<String> = namespaces.to_vec();
    if let Ok(entries) = fs::read_dir(netns::NETNS_RUN_DIR) {
        all.extend(
            entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&prefix)),
        );
    }
    all.sort();
    all.dedup();
    kill_cgroup(cgroup_root);
    for ns in &all {
        let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
    }
    let _ = Command::new("umount").arg(bpffs).stderr(Stdio::null()).status();
    remove_cgroup_tree(cgroup_root);
    let _ = fs::remove_dir_all(run_dir);
}

fn kill_cgroup(root: &Path) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        if e.path().is_dir() {
            let _ = fs::write(e.path().join("cgroup.kill"), "1");
        }
    }
    let _ = fs::write(root.join("cgroup.kill"), "1");
}

fn remove_cgroup_tree(root: &Path) {
    if let Ok(entries) = fs::read_dir(root) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                for _ in 0..50 {
                    if fs::remove_dir(e.path()).is_ok() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
        }
    }
    let _ = fs::remove_dir(root);
}

/// Labs whose owning process is gone (a test killed mid-run) are torn down.
fn reap_stale_labs() {
    let Ok(entries) = fs::read_dir(RUN_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        let Ok(pid) = fs::read_to_string(e.path().join("pid")) else {
            continue;
        };
        let alive = Path::new(&format!("/proc/{}", pid.trim())).exists();
        if !alive {
            let cg = cgroup2_mount().map(|m| m.join(format!("weft-lab-{id}"))).unwrap_or_default();
            teardown(&id, &e.path(), &e.path().join("bpffs"), &cg, &[]);
        }
    }
}
