//! A pod made the way a container runtime makes it: Debian's `ptp` with
//! `host-local` IPAM, then `weft-cni`, run with the CNI environment, stdin
//! and stdout, in node1's namespace, against node1's agent (with
//! `cni-socket`). ADD returns only once the agent has attached the datapath
//! to the veth ptp made; DEL only once it has detached it.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use weft_tests::{
    lab::{Lab, sysctl_in},
    objects::{agent_files, lab_objects, start_agent, wait_ready, workspace_binary, write_atomic},
    require_root,
};

const PLUGINS: &str = "/usr/lib/cni";

/// Runs a plugin as a runtime does, in `node_ns`; (exit ok, stdout JSON).
fn plugin(node_ns: &str, bin: &Path, command: &str, pod_netns: &str, conf: &Value) -> (bool, Value) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", node_ns])
        .arg(bin)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "cafe01")
        .env("CNI_NETNS", format!("/var/run/netns/{pod_netns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=cni-1")
        .env("CNI_PATH", PLUGINS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
}

fn device_pins(links: &Path, dev: &str) -> usize {
    std::fs::read_dir(links)
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&format!("dev:{dev}@"))).count())
        .unwrap_or(0)
}

#[test]
fn a_pod_made_by_ptp_then_weft_cni_is_wired_before_add_returns_and_unwired_by_del() {
    require_root!();
    if !Path::new(PLUGINS).join("ptp").exists() {
        eprintln!("SKIPPED: needs Debian's containernetworking-plugins ({PLUGINS}/ptp)");
        return;
    }
    let lab = Lab::new().unwrap();
    let node = lab.node(0).clone();
    let pod_ns = format!("weft-{}-n1-cni", lab.id);
    Command::new("ip").args(["netns", "add", &pod_ns]).status().unwrap();
    sysctl_in(&pod_ns, "net/ipv6/conf/all/disable_ipv6", "1").unwrap();

    // The Pod object exists (the scheduler bound it); its address does not yet.
    let files = agent_files(
        &lab,
        0,
        &format!("cni-socket: {}\nenvoy: {{enabled: false}}\n", lab.run_dir.join("cni.sock").display()),
    )
    .unwrap();
    let objects = format!(
        "{}apiVersion: v1\nkind: Pod\nmetadata: {{name: cni-1, namespace: default, labels: {{app: cni}}}}\nspec:\n  nodeName: node1\n  containers: [{{name: app, image: lab}}]\n",
        lab_objects(&lab, &[])
    );
    write_atomic(&files.objects_dir.join("lab.yaml"), &objects).unwrap();
    let log = lab.run_dir.join("agent.log");
    let pid = start_agent(&lab, 0, &files, &log).unwrap();
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_ready(&files, Duration::from_secs(30), || lab.running(pid)).unwrap_or_else(|e| panic!("{e}: {}", agent_log()));

    let ptp = json!({"cniVersion": "1.0.0", "name": "lab", "type": "ptp",
        "ipam": {"type": "host-local", "subnet": "10.1.1.128/25", "dataDir": lab.run_dir.join("ipam")}});
    let (ok, prev) = plugin(&node.netns, &Path::new(PLUGINS).join("ptp"), "ADD", &pod_ns, &ptp);
    assert!(ok, "ptp ADD: {prev}");
    let host_if = prev["interfaces"].as_array().unwrap().iter().find(|i| i.get("sandbox").is_none()).unwrap()["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let weft_cni: PathBuf = workspace_binary("weft-cni");
    let conf = |prev: Option<&Value>| {
        let mut c = json!({"cniVersion": "1.1.0", "name": "lab", "type": "weft-cni", "agentSocket": lab.run_dir.join("cni.sock")});
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    };
    let links = node.bpffs_dir.join("links");
    assert_eq!(device_pins(&links, &host_if), 0, "nothing attached before ADD");
    let (ok, out) = plugin(&node.netns, &weft_cni, "ADD", &pod_ns, &conf(Some(&prev)));
    assert!(ok, "weft-cni ADD: {out}\n{}", agent_log());
    assert_eq!(device_pins(&links, &host_if), 2, "ADD returned with both programs attached to {host_if}");
    assert!(plugin(&node.netns, &weft_cni, "CHECK", &pod_ns, &conf(Some(&prev))).0, "CHECK");

    // Not checked yet: packets. In this lab a pod made by ptp does not
    // reach its gateway even before weft attaches anything (to be found out;
    // see /work/notes/issue-11.md).

    let (ok, out) = plugin(&node.netns, &weft_cni, "DEL", &pod_ns, &conf(Some(&prev)));
    assert!(ok, "weft-cni DEL: {out}");
    assert_eq!(device_pins(&links, &host_if), 0, "DEL returned with the programs detached");
    assert!(plugin(&node.netns, &weft_cni, "DEL", &pod_ns, &conf(None)).0, "a second DEL succeeds");
    let (ok, out) = plugin(&node.netns, &Path::new(PLUGINS).join("ptp"), "DEL", &pod_ns, &ptp);
    assert!(ok, "ptp DEL: {out}");
    assert!(lab.running(pid), "the agent kept running: {}", agent_log());
}
