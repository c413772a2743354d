//! Running CNI plugins the way a container runtime does: the plugin binary
//! in the node's network namespace, the CNI environment (command, container
//! id, the sandbox's netns path, interface name, `CNI_ARGS` with the pod's
//! Kubernetes names, plugin path), the network configuration on stdin and
//! the result (or the CNI error) on stdout. The primary plugin is Debian's
//! `ptp` with `host-local` IPAM (containernetworking-plugins), chained with
//! `weft-cni`; tests/tests/cni.rs and the Kubernetes lab make their pods so.

use std::{
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{Value, json};

/// Where Debian installs the reference plugins.
pub const PLUGINS: &str = "/usr/lib/cni";

/// Why CNI tests cannot run here, if they cannot (the plugins are missing).
pub fn skip_reason() -> Option<String> {
    (!Path::new(PLUGINS).join("ptp").exists())
        .then(|| format!("needs Debian's containernetworking-plugins ({PLUGINS}/ptp)"))
}

/// A pod sandbox as the runtime knows it: its network namespace and the
/// Kubernetes names it passes in `CNI_ARGS`.
#[derive(Clone, Debug)]
pub struct Sandbox {
    pub namespace: String,
    pub name: String,
    /// Network namespace name (under /var/run/netns).
    pub netns: String,
    pub container_id: String,
}

/// Runs plugin `bin` with `command` for `pod` in `node_ns`, as a runtime
/// does; (exit ok, stdout as JSON, Null when it is not JSON).
pub fn invoke(node_ns: &str, bin: &Path, command: &str, pod: &Sandbox, conf: &Value) -> (bool, Value) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(bin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", format!("/var/run/netns/{}", pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={}", pod.namespace, pod.name))
        .env("CNI_PATH", PLUGINS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(conf.to_string().as_bytes()).unwrap_or_else(|e| panic!("{} stdin: {e}", bin.display()));
    }
    let out = child.wait_with_output().unwrap_or_else(|e| panic!("waiting for {}: {e}", bin.display()));
    (out.status.success(), serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
}

/// The path of the reference plugin `name`.
pub fn plugin(name: &str) -> PathBuf {
    Path::new(PLUGINS).join(name)
}

/// ptp's configuration: addresses from `subnet` (from `range_start` on, in
/// order: host-local hands them out sequentially) kept in `data_dir`, the
/// gateway (ptp's host side) as the pod's default route.
pub fn ptp_conf(network: &str, subnet: &str, range_start: Option<Ipv4Addr>, data_dir: &Path) -> Value {
    let mut range = json!({"subnet": subnet});
    if let Some(start) = range_start {
        range["rangeStart"] = json!(start.to_string());
    }
    json!({"cniVersion": "1.0.0", "name": network, "type": "ptp",
        "ipam": {"type": "host-local", "ranges": [[range]], "routes": [{"dst": "0.0.0.0/0"}], "dataDir": data_dir}})
}

/// weft-cni's configuration (spec 1.1) against the agent at `socket`, with
/// the previous plugin's result when there is one.
pub fn weft_cni_conf(network: &str, socket: &Path, prev: Option<&Value>) -> Value {
    let mut c = json!({"cniVersion": "1.1.0", "name": network, "type": "weft-cni", "agentSocket": socket});
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c
}

/// The host-side device and the pod's address in a ptp result.
pub fn host_side(result: &Value) -> Option<(String, Ipv4Addr)> {
    let host_if = result["interfaces"].as_array()?.iter().find(|i| i.get("sandbox").is_none())?["name"].as_str()?;
    let ip = result["ips"][0]["address"].as_str()?.split('/').next()?.parse().ok()?;
    Some((host_if.to_owned(), ip))
}

/// What ADD of the chain [ptp, weft-cni] made of a pod.
#[derive(Clone, Debug)]
pub struct Added {
    /// ptp's result (weft-cni's prevResult).
    pub prev: Value,
    /// The host side of the pod's veth.
    pub host_if: String,
    /// The pod's address, from host-local.
    pub ip: Ipv4Addr,
}

/// ADD of ptp alone for `pod` (the first plugin of the chain): its veth,
/// address and routes. An error holds ptp's CNI error.
pub fn add_ptp(node_ns: &str, pod: &Sandbox, ptp: &Value) -> Result<Added, String> {
    let (ok, prev) = invoke(node_ns, &plugin("ptp"), "ADD", pod, ptp);
    if !ok {
        return Err(format!("ptp ADD {}/{}: {prev}", pod.namespace, pod.name));
    }
    let (host_if, ip) = host_side(&prev).ok_or_else(|| format!("ptp's result for {}: {prev}", pod.name))?;
    Ok(Added { prev, host_if, ip })
}

/// ADD of weft-cni for `pod`, after ptp (whose result is `prev`) in the
/// CNI network `network`; returns once the agent at `socket` has wired the
/// veth. weft-cni must pass `prev` on unchanged. An error holds its CNI error.
pub fn add_weft_cni(node_ns: &str, pod: &Sandbox, network: &str, prev: &Value, socket: &Path) -> Result<(), String> {
    let weft_cni = crate::bins::workspace_binary("weft-cni");
    let (ok, out) = invoke(node_ns, &weft_cni, "ADD", pod, &weft_cni_conf(network, socket, Some(prev)));
    if !ok {
        return Err(format!("weft-cni ADD {}/{}: {out}", pod.namespace, pod.name));
    }
    let mut expected = prev.clone();
    expected["cniVersion"] = json!("1.1.0");
    if out != expected {
        return Err(format!("weft-cni ADD {}/{} answered {out}, not ptp's result {prev}", pod.namespace, pod.name));
    }
    Ok(())
}

/// ADD of the chain [ptp, weft-cni] for `pod`, as a runtime runs a
/// conflist: ptp, then weft-cni with ptp's result as prevResult; weft-cni
/// returns once the agent at `socket` has wired the veth. An error names the
/// plugin and holds its CNI error.
pub fn add_chain(node_ns: &str, pod: &Sandbox, ptp: &Value, socket: &Path) -> Result<Added, String> {
    let added = add_ptp(node_ns, pod, ptp)?;
    add_weft_cni(node_ns, pod, ptp["name"].as_str().unwrap_or_default(), &added.prev, socket)?;
    Ok(added)
}
