//! deploy/: every manifest passes kubernetes-validate (strict, a current
//! Kubernetes), and the DaemonSet grants the agent what it needs at start —
//! the capabilities and host paths of agent/src/requirements.rs for the
//! configuration its ConfigMap holds — and nothing else.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ConfigMap};
use serde_json::Value;
use weft_agent::{
    config::{AgentConfig, DEFAULT_FLOW_ADDRESS},
    operator::flowcerts,
    requirements::{CAPABILITIES, PathKind, host_paths},
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn manifests() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(repo().join("deploy"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    v
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_multiple::<Value>(&text).unwrap().into_iter().filter(|d| !d.is_null()).collect()
}

/// The Kubernetes version manifests are validated for.
const KUBERNETES: &str = "1.37.0";

#[test]
fn every_manifest_passes_kubernetes_validate_strict() {
    let tool = std::env::var_os("WEFT_KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/kubernetes-validate"));
    assert!(
        tool.exists(),
        "{} is missing: run tests/setup.sh (it installs kubernetes-validate into .venv)",
        tool.display()
    );
    let files = manifests();
    let expected: usize = files.iter().map(|f| documents(f).len()).sum();
    assert!(
        expected >= 15,
        "deploy/ holds the CRDs, agent, operator, namespace and IngressClass ({expected} documents)"
    );
    let out = Command::new(&tool).args(["--strict", "--kubernetes-version", KUBERNETES]).args(&files).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kubernetes-validate --strict failed:\n{text}");
    let passed = text.lines().filter(|l| l.contains(" passed for resource ")).count();
    assert_eq!(passed, expected, "every document is checked and passes:\n{text}");
    assert!(!text.contains("WARN") && !text.contains("ERROR"), "{text}");
}

fn agent_manifest() -> (DaemonSet, AgentConfig) {
    let docs = documents(&repo().join("deploy/agent.yaml"));
    let ds: DaemonSet =
        serde_json::from_value(docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap().clone()).unwrap();
    let cm: ConfigMap =
        serde_json::from_value(docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap().clone()).unwrap();
    let text = &cm.data.unwrap()["agent.yaml"];
    // As the agent reads it: unknown keys and bad values are refused.
    let mut cfg: AgentConfig = serde_saphyr::from_str(text).expect("the ConfigMap's agent.yaml parses");
    cfg.node_name = "node1".into(); // from --node-name
    cfg.validate().expect("the ConfigMap's agent.yaml is valid");
    (ds, cfg)
}

#[test]
fn daemonset_grants_exactly_what_the_agent_needs() {
    let (ds, cfg) = agent_manifest();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true), "the datapath is the node's network namespace");
    let c = pod.containers.iter().find(|c| c.name == "agent").unwrap();

    // Capabilities: exactly the agent's list, everything else dropped, not privileged.
    let sc = c.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    let needed: BTreeSet<&str> = CAPABILITIES.iter().map(|c| c.name).collect();
    assert_eq!(added, needed, "the DaemonSet adds what agent/src/requirements.rs lists");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));

    // The config the agent is started with is the ConfigMap's.
    let args = c.args.clone().unwrap_or_default();
    let config_at = &args[args.iter().position(|a| a == "--config").unwrap() + 1];
    assert!(cfg.kubernetes.enabled, "the agent reads the API server");
    let volumes = pod.volumes.unwrap_or_default();
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    let mount_of = |path: &Path| {
        mounts
            .iter()
            .filter(|m| path.starts_with(&m.mount_path))
            .max_by_key(|m| m.mount_path.len())
            .unwrap_or_else(|| panic!("nothing is mounted at {}", path.display()))
    };
    let volume = |name: &str| volumes.iter().find(|v| v.name == name).unwrap();
    let cfg_mount = mount_of(Path::new(config_at));
    assert_eq!(volume(&cfg_mount.name).config_map.as_ref().unwrap().name, "weft-agent");

    // Every host path the config names is the node's, mounted as its kind needs.
    let mut used = BTreeSet::from([cfg_mount.name.clone()]);
    for need in host_paths(&cfg) {
        let m = mount_of(&need.path);
        let host =
            volume(&m.name).host_path.as_ref().unwrap_or_else(|| panic!("{} ({}) is not a hostPath", need.key, m.name));
        let (path, propagation, writable) = match need.kind {
            // The node's bpffs (pins outlive the pod); mounts the node makes show through.
            PathKind::Bpffs => ("/sys/fs/bpf", Some("HostToContainer"), true),
            PathKind::Cgroup2 => ("/sys/fs/cgroup", None, false),
            PathKind::State => (need.path.to_str().unwrap(), None, true),
            PathKind::Sysctl => ("/proc/sys/net", None, true),
        };
        assert_eq!(host.path, path, "{} = {}", need.key, need.path.display());
        assert_eq!(m.mount_propagation.as_deref(), propagation, "{}", need.key);
        if writable {
            assert_ne!(m.read_only, Some(true), "{} is written", need.key);
        }
        used.insert(m.name.clone());
    }
    // The flow API's mutual TLS: this node's certificate from the Secret
    // the operator keeps, read-only; TCP only with TLS.
    let tls = cfg.flows.tls.as_ref().expect("the flow API serves mutual TLS").for_node("node1");
    assert!(tls.client_ca.is_some(), "clients must show a certificate");
    assert_eq!(cfg.flows.tcp_address(), Some(DEFAULT_FLOW_ADDRESS));
    for p in [Some(&tls.cert), Some(&tls.key), tls.client_ca.as_ref()].into_iter().flatten() {
        let m = mount_of(p);
        let secret = volume(&m.name).secret.as_ref().unwrap_or_else(|| panic!("{} is not a Secret", p.display()));
        assert_eq!(secret.secret_name.as_deref(), Some(flowcerts::SERVER_SECRET), "{}", p.display());
        assert_eq!(m.read_only, Some(true), "{}", p.display());
        used.insert(m.name.clone());
    }
    assert!(tls.cert.ends_with("node1.crt"), "each agent serves its own node's: {}", tls.cert.display());

    // And nothing else of the node is mounted.
    let mounted: BTreeSet<String> = mounts.iter().map(|m| m.name.clone()).collect();
    assert_eq!(mounted, used, "every mount is one the agent needs");

    // The init container chains weft-cni onto the node's CNI, pointing it
    // at the socket the agent listens on, with no capability at all.
    let socket = cfg.cni_socket.as_ref().expect("the agent listens for weft-cni").to_str().unwrap();
    let init = pod.init_containers.iter().flatten().find(|c| c.name == "install-cni").expect("install-cni");
    let cmd = init.command.clone().unwrap_or_default();
    let opt = |k: &str| cmd.iter().position(|a| a == k).map(|i| cmd[i + 1].as_str());
    assert_eq!(cmd[..2], ["weft-cni", "install"]);
    assert_eq!(opt("--agent-socket"), Some(socket));
    assert_eq!(init.image, c.image, "the plugin comes from the agent's image");
    let sc = init.security_context.as_ref().unwrap();
    assert_eq!(sc.capabilities.as_ref().unwrap().add, None);
    assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
    for (flag, node_dir) in [("--bin-dir", "/opt/cni/bin"), ("--conf-dir", "/etc/cni/net.d")] {
        let dir = opt(flag).unwrap();
        let m = init.volume_mounts.iter().flatten().find(|m| m.mount_path == dir).unwrap_or_else(|| panic!("{dir}"));
        assert_eq!(volume(&m.name).host_path.as_ref().unwrap().path, node_dir, "{flag}");
        assert_ne!(m.read_only, Some(true), "{flag} is written");
    }
}
