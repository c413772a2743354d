//! `weft-cni`: run by the container runtime after the primary plugin, as the
//! CNI specification says (command and parameters in the environment, the
//! network configuration on stdin, a result or an error on stdout). With
//! `install` or `uninstall` as its argument it puts itself on the node or
//! takes itself off (the DaemonSet's init container; see `install.rs`).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use serde_json::{Value, json};
use weft_cni::{
    install, link,
    proto::{self, Answer, Attachment, PodRef, Request},
    spec::{self, CniError, Code, NetConf},
};

/// Where the agent listens unless the configuration says otherwise
/// (deploy/agent.yaml mounts it from the node).
const DEFAULT_SOCKET: &str = "/run/weft/cni.sock";
/// How long ADD waits for the agent to attach the datapath.
const ADD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the other commands wait for an answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest configuration read from stdin.
const MAX_STDIN: u64 = 1 << 20;

/// How long `install` waits for the primary CNI's configuration by default.
const INSTALL_WAIT: Duration = Duration::from_secs(60);

const USAGE: &str =
    "usage: weft-cni install|uninstall [--bin-dir DIR] [--conf-dir DIR] [--agent-socket PATH] [--wait SECONDS]
  (run by the container runtime otherwise, with CNI_COMMAND set)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.is_empty() && std::env::var_os("CNI_COMMAND").is_none() {
        return match node_setup(&args) {
            Ok(msg) => {
                println!("{msg}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("weft-cni: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let env: BTreeMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with("CNI_")).collect();
    let mut stdin = Vec::new();
    let read = std::io::stdin().take(MAX_STDIN).read_to_end(&mut stdin);
    // Errors are written in the configuration's version when it has one.
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_owned))
        .filter(|v| spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| spec::SUPPORTED_VERSIONS[spec::SUPPORTED_VERSIONS.len() - 1].to_owned());
    let result = match read {
        Ok(_) => run(&env, &stdin),
        Err(e) => Err(CniError::new(Code::Io, "reading stdin", e.to_string())),
    };
    let mut out = std::io::stdout().lock();
    match result {
        Ok(Some(v)) => {
            let _ = writeln!(out, "{v}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

/// Why `weft-cni install|uninstall` did nothing.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("{0}\n{USAGE}")]
    Usage(String),
    #[error("--wait {0:?}: not seconds")]
    Wait(String),
    #[error("finding my own binary: {0}")]
    OwnBinary(std::io::Error),
    #[error(transparent)]
    Install(#[from] install::InstallError),
}

/// `install` / `uninstall` with their options.
fn node_setup(args: &[String]) -> Result<String, SetupError> {
    let mut target = install::Target {
        bin_dir: "/opt/cni/bin".into(),
        conf_dir: "/etc/cni/net.d".into(),
        agent_socket: DEFAULT_SOCKET.into(),
    };
    let mut wait = INSTALL_WAIT;
    let (command, options) = args.split_first().ok_or_else(|| SetupError::Usage("no command".into()))?;
    for pair in options.chunks(2) {
        let [key, value] = pair else { return Err(SetupError::Usage(format!("{} needs a value", pair[0]))) };
        match key.as_str() {
            "--bin-dir" => target.bin_dir = value.into(),
            "--conf-dir" => target.conf_dir = value.into(),
            "--agent-socket" => target.agent_socket = value.clone(),
            "--wait" => wait = Duration::from_secs(value.parse().map_err(|_| SetupError::Wait(value.clone()))?),
            other => return Err(SetupError::Usage(format!("unknown option {other}"))),
        }
    }
    match command.as_str() {
        "install" => {
            let me = std::env::current_exe().map_err(SetupError::OwnBinary)?;
            let conf = install::install(&target, &me, wait)?;
            Ok(format!(
                "installed {} and chained weft-cni onto {}",
                target.bin_dir.join(install::PLUGIN).display(),
                conf.display()
            ))
        }
        "uninstall" => {
            install::uninstall(&target)?;
            Ok(format!("removed weft-cni from {} and {}", target.conf_dir.display(), target.bin_dir.display()))
        }
        other => Err(SetupError::Usage(format!("unknown command {other}"))),
    }
}

fn var<'a>(env: &'a BTreeMap<String, String>, key: &str) -> Result<&'a str, CniError> {
    env.get(key).map(String::as_str).filter(|v| !v.is_empty()).ok_or_else(|| {
        CniError::new(Code::InvalidEnvironment, format!("{key} is not set"), "set by the container runtime")
    })
}

fn run(env: &BTreeMap<String, String>, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let command = var(env, "CNI_COMMAND")?;
    if command == "VERSION" {
        return Ok(Some(version(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    spec::check_command(command, &conf.cni_version)?;
    let socket = PathBuf::from(conf.agent_socket.as_deref().unwrap_or(DEFAULT_SOCKET));
    match command {
        "ADD" => add(env, &conf, &socket).map(Some),
        "DEL" => del(env, &conf, &socket).map(|()| None),
        "CHECK" => check(env, &conf, &socket).map(|()| None),
        "STATUS" => status(&socket).map(|()| None),
        "GC" => gc(&conf, &socket).map(|()| None),
        other => Err(CniError::new(
            Code::InvalidEnvironment,
            format!("unknown CNI_COMMAND {other:?}"),
            "one of ADD, DEL, CHECK, VERSION, STATUS, GC",
        )),
    }
}

fn version(stdin: &[u8]) -> Value {
    let asked = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| "1.1.0".into());
    json!({"cniVersion": asked, "supportedVersions": spec::SUPPORTED_VERSIONS})
}

/// The attachment ADD and CHECK describe: the pod from CNI_ARGS, its address
/// from the previous result, its veth's host side from the kernel.
fn attachment(env: &BTreeMap<String, String>, conf: &NetConf) -> Result<(Attachment, Value), CniError> {
    let container_id = var(env, "CNI_CONTAINERID")?;
    let netns = var(env, "CNI_NETNS")?;
    let ifname = var(env, "CNI_IFNAME")?;
    let args = spec::parse_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or_default())?;
    let arg = |k: &str| {
        args.get(k).filter(|v| !v.is_empty()).cloned().ok_or_else(|| {
            CniError::new(Code::InvalidEnvironment, format!("CNI_ARGS has no {k}"), "weft-cni wires Kubernetes pods")
        })
    };
    let pod = PodRef { namespace: arg("K8S_POD_NAMESPACE")?, name: arg("K8S_POD_NAME")? };
    let prev = conf.prev_result.clone().ok_or_else(|| {
        CniError::new(
            Code::InvalidConfig,
            "no prevResult",
            "weft-cni is chained after a plugin that creates the pod's veth (ptp, bridge, calico...)",
        )
    })?;
    let pod_if = spec::pod_interface(&prev, netns, ifname)?;
    let host = link::host_side(Path::new(netns), ifname).map_err(|e| {
        let code =
            if matches!(e, link::HostSideError::NotVeth { .. }) { Code::NotVeth } else { Code::UnknownContainer };
        CniError::new(code, "cannot find the pod's veth", e.to_string())
    })?;
    let a = Attachment {
        network: conf.name.clone(),
        container_id: container_id.to_owned(),
        ifname: ifname.to_owned(),
        pod,
        ip: pod_if.ip,
        host_ifname: host.name,
        host_ifindex: host.index,
    };
    Ok((a, prev))
}

fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<(), CniError> {
    let answer = proto::call(socket, req, timeout).map_err(|e| {
        CniError::new(Code::TryAgainLater, "the weft agent did not answer", format!("{}: {e}", socket.display()))
    })?;
    match answer {
        Answer { error: None, .. } => Ok(()),
        Answer { error: Some(e), retry: true } => Err(CniError::new(Code::TryAgainLater, "the weft agent", e)),
        Answer { error: Some(e), retry: false } => Err(CniError::new(Code::Agent, "the weft agent refused", e)),
    }
}

fn add(env: &BTreeMap<String, String>, conf: &NetConf, socket: &Path) -> Result<Value, CniError> {
    let (a, mut prev) = attachment(env, conf)?;
    call(socket, &Request::Add(a), ADD_TIMEOUT)?;
    // The previous result goes on unchanged, in this configuration's version.
    if let Some(obj) = prev.as_object_mut() {
        obj.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    }
    Ok(prev)
}

fn del(env: &BTreeMap<String, String>, conf: &NetConf, socket: &Path) -> Result<(), CniError> {
    let req = Request::Del {
        network: conf.name.clone(),
        container_id: var(env, "CNI_CONTAINERID")?.to_owned(),
        ifname: var(env, "CNI_IFNAME")?.to_owned(),
    };
    // No agent listening: nothing is attached that its next start will not
    // sweep (it drops attachments whose device is gone), so DEL succeeds.
    if !socket.exists() {
        return Ok(());
    }
    call(socket, &req, CALL_TIMEOUT)
}

fn check(env: &BTreeMap<String, String>, conf: &NetConf, socket: &Path) -> Result<(), CniError> {
    let (a, _) = attachment(env, conf)?;
    call(socket, &Request::Check(a), CALL_TIMEOUT)
}

fn status(socket: &Path) -> Result<(), CniError> {
    call(socket, &Request::Status, CALL_TIMEOUT)
        .map_err(|e| CniError::new(Code::NotAvailable, "the weft agent is not ready", e.to_string()))
}

fn gc(conf: &NetConf, socket: &Path) -> Result<(), CniError> {
    let valid = conf.valid_attachments.iter().map(|v| (v.container_id.clone(), v.ifname.clone())).collect();
    if !socket.exists() {
        return Ok(());
    }
    call(socket, &Request::Gc { network: conf.name.clone(), valid }, CALL_TIMEOUT)
}
