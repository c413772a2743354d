//! weft-cni chained after Debian's `ptp` with `host-local` IPAM, both run
//! exactly as a container runtime runs plugins (environment, stdin, stdout),
//! in network namespaces the test creates. The agent's socket is answered
//! by the test, which records what the plugin asked: this checks the
//! plugin's half of the protocol (the veth it finds, the result it passes
//! on, the spec's error codes), not the agent's.

use std::{
    io::Write,
    net::Ipv4Addr,
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};
use weft_cni::proto::{self, Answer, Request};

const PLUGINS: &str = "/usr/lib/cni";

fn skip_reason() -> Option<String> {
    // SAFETY: trivial syscall.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces)".into());
    }
    if !Path::new(PLUGINS).join("ptp").exists() {
        return Some(format!("needs Debian's containernetworking-plugins ({PLUGINS}/ptp)"));
    }
    None
}

/// Two namespaces (node and pod) and a folder, removed on drop.
struct Env {
    node: String,
    pod: String,
    dir: PathBuf,
}

impl Env {
    fn new() -> Self {
        let id = std::process::id();
        let env = Env {
            node: format!("weft-cni-{id}-node"),
            pod: format!("weft-cni-{id}-pod"),
            dir: std::env::temp_dir().join(format!("weft-cni-{id}")),
        };
        std::fs::create_dir_all(&env.dir).unwrap();
        for ns in [&env.node, &env.pod] {
            run(&["ip", "netns", "add", ns]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        env
    }

    fn netns(&self) -> String {
        format!("/var/run/netns/{}", self.pod)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    /// Runs a plugin in the node's namespace as a runtime does; (exit ok, stdout JSON).
    fn plugin(&self, plugin: &str, command: &str, ifname: &str, conf: &Value) -> (bool, Value) {
        let bin = if plugin == "weft-cni" {
            PathBuf::from(env!("CARGO_BIN_EXE_weft-cni"))
        } else {
            Path::new(PLUGINS).join(plugin)
        };
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node])
            .arg(bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", "c0ffee")
            .env("CNI_NETNS", self.netns())
            .env("CNI_IFNAME", ifname)
            .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=u1")
            .env("CNI_PATH", PLUGINS)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(conf.to_string().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let v = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.success(), v)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for ns in [&self.pod, &self.node] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(cmd: &[&str]) -> String {
    let out = Command::new(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Answers the plugin's requests with `answer`, recording them.
fn agent(socket: &Path, answer: Answer) -> Arc<Mutex<Vec<Request>>> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            if let Ok(req) = proto::read_message::<Request>(&conn) {
                log.lock().unwrap().push(req);
                let _ = proto::write_message(&conn, &answer);
            }
        }
    });
    seen
}

fn conf(env: &Env, version: &str, prev: Option<&Value>) -> Value {
    let mut c = json!({"cniVersion": version, "name": "lab", "type": "weft-cni",
        "agentSocket": env.socket()});
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c
}

#[test]
fn chained_after_ptp_it_finds_the_pods_veth_passes_the_result_on_and_answers_with_the_specs_codes() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let env = Env::new();
    let ptp = json!({"cniVersion": "1.0.0", "name": "lab", "type": "ptp",
        "ipam": {"type": "host-local", "subnet": "10.77.0.0/24", "dataDir": env.dir.join("ipam")}});

    // ptp makes the veth and addresses, as the first plugin of the list.
    let (ok, prev) = env.plugin("ptp", "ADD", "eth0", &ptp);
    assert!(ok, "ptp ADD: {prev}");
    let host_if = prev["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i.get("sandbox").is_none())
        .and_then(|i| i["name"].as_str())
        .unwrap()
        .to_owned();
    let pod_ip: Ipv4Addr = prev["ips"][0]["address"].as_str().unwrap().split('/').next().unwrap().parse().unwrap();
    let links: Value =
        serde_json::from_str(&run(&["ip", "-n", &env.node, "-j", "link", "show", "dev", &host_if])).unwrap();
    let host_index = links[0]["ifindex"].as_u64().unwrap() as u32;

    // No agent listening: ADD is "try again later", STATUS "not available"; DEL and GC succeed.
    let (ok, err) = env.plugin("weft-cni", "ADD", "eth0", &conf(&env, "1.1.0", Some(&prev)));
    assert!(!ok);
    assert_eq!((err["code"].as_u64(), err["cniVersion"].as_str()), (Some(11), Some("1.1.0")), "{err}");
    let (ok, err) = env.plugin("weft-cni", "STATUS", "eth0", &conf(&env, "1.1.0", None));
    assert!(!ok);
    assert_eq!(err["code"].as_u64(), Some(50), "{err}");
    assert!(env.plugin("weft-cni", "DEL", "eth0", &conf(&env, "1.1.0", None)).0);

    // The agent answers: ADD tells it the pod, its address and the veth's host side.
    let seen = agent(&env.socket(), Answer::ok());
    let (ok, out) = env.plugin("weft-cni", "ADD", "eth0", &conf(&env, "1.1.0", Some(&prev)));
    assert!(ok, "ADD: {out}");
    let mut passed = prev.clone();
    passed["cniVersion"] = json!("1.1.0");
    assert_eq!(out, passed, "the previous result goes on unchanged");
    let Request::Add(a) = seen.lock().unwrap()[0].clone() else { panic!("{:?}", seen.lock().unwrap()) };
    assert_eq!(
        (a.pod.namespace.as_str(), a.pod.name.as_str(), a.ip, a.host_ifname.as_str(), a.host_ifindex),
        ("shop", "web-1", pod_ip, host_if.as_str(), host_index)
    );
    assert_eq!((a.network.as_str(), a.container_id.as_str(), a.ifname.as_str()), ("lab", "c0ffee", "eth0"));
    assert!(env.plugin("weft-cni", "CHECK", "eth0", &conf(&env, "1.1.0", Some(&prev))).0);
    assert!(env.plugin("weft-cni", "STATUS", "eth0", &conf(&env, "1.1.0", None)).0);
    let mut gc = conf(&env, "1.1.0", None);
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "c0ffee", "ifname": "eth0"}]);
    assert!(env.plugin("weft-cni", "GC", "eth0", &gc).0);
    // DEL is idempotent: twice is fine.
    assert!(env.plugin("weft-cni", "DEL", "eth0", &conf(&env, "1.1.0", Some(&prev))).0);
    assert!(env.plugin("weft-cni", "DEL", "eth0", &conf(&env, "1.1.0", None)).0);
    let ops: Vec<&str> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| match r {
            Request::Add(_) => "add",
            Request::Check(_) => "check",
            Request::Status => "status",
            Request::Gc { valid, .. } if valid == &[("c0ffee".to_owned(), "eth0".to_owned())] => "gc",
            Request::Gc { .. } => "gc with the wrong list",
            Request::Del { .. } => "del",
        })
        .collect();
    assert_eq!(ops, ["add", "check", "status", "gc", "del", "del"]);
    // A chain whose list says 0.4.0 (as many primary plugins' configurations
    // do): ADD passes the result on in that version.
    let (ok, out) = env.plugin("weft-cni", "ADD", "eth0", &conf(&env, "0.4.0", Some(&prev)));
    assert!(ok, "ADD in 0.4.0: {out}");
    assert_eq!((out["cniVersion"].as_str(), &out["ips"]), (Some("0.4.0"), &prev["ips"]));
    assert!(matches!(seen.lock().unwrap().last(), Some(Request::Add(_))));

    // Errors, as the spec codes them.
    let code = |command: &str, ifname: &str, c: &Value| {
        let (ok, err) = env.plugin("weft-cni", command, ifname, c);
        assert!(!ok, "{command} should fail: {err}");
        err["code"].as_u64()
    };
    assert_eq!(code("ADD", "eth0", &conf(&env, "1.1.0", None)), Some(7), "no prevResult");
    assert_eq!(code("ADD", "eth0", &conf(&env, "0.2.0", Some(&prev))), Some(1), "old version");
    assert_eq!(code("CHECK", "eth0", &conf(&env, "0.3.1", Some(&prev))), Some(1), "CHECK before 0.4.0");
    assert_eq!(code("GC", "eth0", &conf(&env, "1.0.0", None)), Some(1), "GC before 1.1.0");
    assert_eq!(code("ADD", "eth0", &json!("not a config")), Some(6), "undecodable");
    assert_eq!(code("FROB", "eth0", &conf(&env, "1.1.0", None)), Some(4), "unknown command");
    let lo = json!({"interfaces": [{"name": "lo", "sandbox": env.netns()}], "ips": [{"address": "127.0.0.1/8", "interface": 0}]});
    assert_eq!(code("ADD", "lo", &conf(&env, "1.1.0", Some(&lo))), Some(101), "not a veth");
    let refused = env.dir.join("refusing.sock");
    let _refusing = agent(&refused, Answer::failed("pod shop/web-1 is not on this node", false));
    let mut c = conf(&env, "1.1.0", Some(&prev));
    c["agentSocket"] = json!(refused);
    assert_eq!(code("ADD", "eth0", &c), Some(100), "the agent refused");
    let (ok, v) = env.plugin("weft-cni", "VERSION", "eth0", &json!({"cniVersion": "1.1.0"}));
    assert!(ok);
    assert_eq!(v["supportedVersions"], json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]));

    let (ok, out) = env.plugin("ptp", "DEL", "eth0", &ptp);
    assert!(ok, "ptp DEL: {out}");
}
