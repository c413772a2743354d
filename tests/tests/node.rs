//! weft deployed the way users deploy it: `deploy/` applied to the one-node
//! Kubernetes of `../shared/k8s/node` (kubelet, containerd, runc and the CNI
//! bridge plugin, all inside one network namespace), running the image
//! `deploy/build-image.sh` makes. The agent's DaemonSet must become Ready
//! under containerd with exactly the capabilities it declares, read the API
//! as its ServiceAccount, chain weft-cni onto the node's bridge list and wire
//! the pods the kubelet then makes; a Service between them works although
//! the node has no kube-proxy (only weft's datapath translates its address);
//! `weft observe` in the agent's container shows the flows; the operator
//! elects a leader; and `kubectl rollout restart` of the agent under a
//! bounded load loses no request through the plain Service (what it costs
//! the L7 Service, whose Envoy restarts with the container, is reported, and
//! so are the flows lost: see [`LostFlows`]).
//!
//! What differs from a user's cluster, and why (the rest of `deploy/` is
//! applied as it is):
//! - the node's mount namespace gets what a systemd node has and this
//!   machine has not: a shared bpffs at /sys/fs/bpf;
//! - the hostPaths of the agent's state (/var/run/weft) and of the CNI
//!   folders (/opt/cni/bin, /etc/cni/net.d), and the socket path the init
//!   container writes into the CNI configuration, are folders of this node's
//!   own (under its NODE_WORK): the CNI configuration folder is the node's
//!   containerd's, and its plugin folder is mounted, in the node's mount
//!   namespace only, over containerd's (/usr/lib/cni here). So nothing of
//!   the test lands in the machine's shared folders, and two nodes on one
//!   machine (two test runs) cannot see each other's agent socket, plugins
//!   or configuration;
//! - the cgroup hostPath is the node's cgroup in the cgroup v2 hierarchy
//!   (this machine is a cgroup v1 hybrid: v2 is at /sys/fs/cgroup/unified, and
//!   its root would put every process of the machine under weft's hooks);
//! - no kube-proxy: the agent and the operator are given the API server's
//!   own address (KUBERNETES_SERVICE_HOST/PORT, commented out in deploy/),
//!   and the operator runs in the node's network namespace (hostNetwork),
//!   since the API server listens only on the node's loopback.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize().unwrap()
}

fn node_dir() -> PathBuf {
    repo().join("../shared/k8s/node")
}

fn skip_reason() -> Option<String> {
    // SAFETY: trivial syscall.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (the node's namespaces, mounts and cgroups)".into());
    }
    if !node_dir().join("up.sh").is_file() {
        return Some(format!("needs the kubelet node harness at {}", node_dir().display()));
    }
    if Command::new("umoci").arg("--version").output().is_err() {
        return Some("needs umoci (Debian package umoci) to build the image".into());
    }
    None
}

/// A program on PATH.
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// Runs `cmd`, returning stdout; panics with both outputs on failure.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?}: {o}{e}");
    o.into_owned()
}

/// The node, brought down (every process, mount, cgroup and the netns) when
/// dropped, also when the test fails.
struct Node {
    work: PathBuf,
    env: BTreeMap<String, String>,
    scratch: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What a reader needs to see why: the agent's and the kubelet's view.
            for args in [
                &["get", "pods", "-A", "-o", "wide"][..],
                &["-n", "weft-system", "logs", "ds/weft-agent", "-c", "agent", "--tail", "40"],
                &["-n", "weft-system", "describe", "pods", "-l", "app.kubernetes.io/name=weft-agent"],
            ] {
                if let Ok(out) = self.kubectl_try(args) {
                    eprintln!("--- kubectl {}\n{out}", args.join(" "));
                }
            }
        }
        let down = Command::new(node_dir().join("down.sh")).arg(&self.work).output();
        match down {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("down.sh: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)),
            Err(e) => eprintln!("down.sh: {e}"),
        }
        let _ = fs::remove_dir_all(&self.scratch);
    }
}

impl Node {
    /// The node's folder standing for the node path `path` of deploy/.
    fn host_path(&self, path: &str) -> PathBuf {
        match path {
            "/var/run/weft" => self.work.join("run-weft"),
            "/opt/cni/bin" => self.work.join("cni-bin"),
            // containerd's conf_dir on this node.
            "/etc/cni/net.d" => self.work.join("cni/net.d"),
            _ => panic!("no node folder for {path}"),
        }
    }

    fn var(&self, name: &str) -> &str {
        self.env.get(name).map(String::as_str).unwrap_or_else(|| panic!("{name} missing from the node's env"))
    }

    fn kubectl_try(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(self.var("KUBECTL")).args(args).output().map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() { Ok(text) } else { Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr))) }
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_try(args).unwrap_or_else(|e| panic!("kubectl {}: {e}", args.join(" ")))
    }

    fn apply(&self, yaml: &str) {
        let path = self.scratch.join("apply.yaml");
        fs::write(&path, yaml).unwrap();
        self.kubectl(&["apply", "-f", path.to_str().unwrap()]);
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&a)).unwrap()
    }

    /// Runs a shell script in the node's mount namespace (containerd's).
    fn in_mounts(&self, script: &str) {
        let pid = fs::read_to_string(self.work.join("run/containerd.pid")).unwrap();
        run(Command::new("nsenter").arg(format!("--mount=/proc/{}/ns/mnt", pid.trim())).args(["sh", "-ec", script]));
    }

    /// Polls `f` until it gives a value, for at most `limit`.
    fn wait<T>(&self, what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Brings the node up with the image imported.
fn node_up(scratch: PathBuf, image: &Path) -> Node {
    let ns = format!("wt-node-{}", std::process::id() % 100_000);
    let out = Command::new(node_dir().join("up.sh"))
        .env("NODE_NS", &ns)
        .env("NODE_NAME", &ns)
        .env("NODE_IMAGES", image)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let work = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().trim());
    assert!(out.status.success() && work.is_dir(), "up.sh failed (its log is above)");
    let env = fs::read_to_string(work.join("env"))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').trim_matches('"').to_owned()))
        .collect();
    Node { work, env, scratch }
}

/// deploy/agent.yaml and deploy/operator.yaml with this node's differences
/// (see the module doc).
fn manifests(node: &Node) -> (String, String) {
    let api = format!(
        "- name: KUBERNETES_SERVICE_HOST\n{i}  value: \"{}\"\n{i}- name: KUBERNETES_SERVICE_PORT\n{i}  value: \"{}\"",
        node.var("NODE_APISERVER_HOST"),
        node.var("NODE_APISERVER_PORT"),
        i = "        "
    );
    let uncomment = |text: &str| {
        let commented = "# - name: KUBERNETES_SERVICE_HOST\n        #   value: \"10.0.0.10\"\n        \
                         # - name: KUBERNETES_SERVICE_PORT\n        #   value: \"6443\"";
        assert!(text.contains(commented), "deploy/ has the API server's address commented out");
        text.replace(commented, &api)
    };
    let agent = fs::read_to_string(repo().join("deploy/agent.yaml")).unwrap();
    let cgroup = format!("path: /sys/fs/cgroup/unified/{}", node.var("NODE_CGROUP_ROOT"));
    assert!(agent.contains("path: /sys/fs/cgroup\n"));
    let mut agent = uncomment(&agent).replace("path: /sys/fs/cgroup\n", &format!("{cgroup}\n"));
    for path in ["/var/run/weft", "/opt/cni/bin", "/etc/cni/net.d"] {
        let hostpath = format!("        hostPath:\n          path: {path}\n");
        assert!(agent.contains(&hostpath), "deploy/agent.yaml mounts the node's {path}");
        agent = agent
            .replace(&hostpath, &format!("        hostPath:\n          path: {}\n", node.host_path(path).display()));
    }
    // The socket as weft-cni, run by containerd on the node, finds it.
    let socket = "--agent-socket, /var/run/weft/cni.sock]";
    assert!(agent.contains(socket), "the init container's --agent-socket");
    let node_socket = format!("--agent-socket, {}]", node.host_path("/var/run/weft").join("cni.sock").display());
    let agent = agent.replace(socket, &node_socket);
    let operator = fs::read_to_string(repo().join("deploy/operator.yaml")).unwrap();
    let operator = uncomment(&operator).replace(
        "      serviceAccountName: weft-operator\n",
        "      serviceAccountName: weft-operator\n      hostNetwork: true\n",
    );
    (agent, operator)
}

const WORKLOADS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default, labels: {app: web}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: web
    image: registry.local/busybox:1.35
    imagePullPolicy: Never
    command: [sh, -c, "mkdir -p /www && echo served-by-web > /www/index.html && exec httpd -f -p 8080 -h /www"]
    ports: [{name: http, containerPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: registry.local/busybox:1.35
    imagePullPolicy: Never
    command: [sleep, "3600"]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: web-l7, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

#[test]
fn deploy_runs_on_a_kubelet_node_wires_its_pods_and_survives_a_rollout_restart() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let started = Instant::now();
    let scratch = std::env::temp_dir().join(format!("weft-node-test-{}", std::process::id()));
    fs::create_dir_all(&scratch).unwrap();
    // The image from the binaries the tests run (debug, already built).
    let image = scratch.join("weft.tar");
    let exe = std::env::current_exe().unwrap();
    let target = exe.parent().unwrap().parent().unwrap().parent().unwrap();
    run(Command::new(repo().join("deploy/build-image.sh"))
        .arg(&image)
        .env("CARGO_TARGET_DIR", target)
        .env("WEFT_IMAGE_PROFILE", "dev")
        .env("WEFT_IMAGE_NO_BUILD", "1")
        .env_remove("WEFT_ENVOY"));
    let node = node_up(scratch.clone(), &image);
    eprintln!("node {} up after {:?}", node.var("NODE_NAME"), started.elapsed());

    // The node's mounts and folders (module doc), all in the node's own
    // mount namespace or NODE_WORK: nothing on the machine's shared paths.
    let (bin, conf) = (node.host_path("/opt/cni/bin"), node.host_path("/etc/cni/net.d"));
    fs::create_dir_all(&bin).unwrap();
    node.in_mounts(&format!(
        "mount -t bpf bpf /sys/fs/bpf && mount --make-shared /sys/fs/bpf
         cp -a /usr/lib/cni/. {bin}/
         mount --bind {bin} /usr/lib/cni",
        bin = bin.display(),
    ));

    let (agent, operator) = manifests(&node);
    for f in ["namespace.yaml", "crds.yaml"] {
        node.kubectl(&["apply", "-f", repo().join("deploy").join(f).to_str().unwrap()]);
    }
    node.apply(&agent);
    node.apply(&operator);

    // The DaemonSet Ready, under containerd, with exactly its capabilities.
    node.kubectl(&["-n", "weft-system", "rollout", "status", "ds/weft-agent", "--timeout=240s"]);
    eprintln!("agent Ready after {:?}", started.elapsed());
    let pods = node.json(&["-n", "weft-system", "get", "pods", "-l", "app.kubernetes.io/name=weft-agent"]);
    let pod = &pods["items"][0];
    let agent_pod = pod["metadata"]["name"].as_str().unwrap().to_owned();
    let id = pod["status"]["containerStatuses"][0]["containerID"].as_str().unwrap();
    let id = id.strip_prefix("containerd://").unwrap();
    let info: Value =
        serde_json::from_str(&run(Command::new(node.var("CTR")).args(["containers", "info", id]))).unwrap();
    let process = &info["Spec"]["process"];
    for set in ["effective", "permitted", "bounding"] {
        let caps: std::collections::BTreeSet<&str> =
            process["capabilities"][set].as_array().unwrap().iter().filter_map(Value::as_str).collect();
        assert_eq!(
            caps,
            ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"].into(),
            "{set} capabilities of the agent's container"
        );
    }
    assert_eq!(process["user"]["uid"], 0);
    assert!(process["noNewPrivileges"].as_bool().unwrap_or(false), "allowPrivilegeEscalation: false");

    // The agent read the API as its ServiceAccount: its node's report exists.
    let nodename = node.var("NODE_NAME").to_owned();
    node.wait("the agent's WeftNode report", Duration::from_secs(60), || {
        node.kubectl_try(&["-n", "weft-system", "get", "weftnodes", &nodename]).ok()
    });
    let log = node.kubectl(&["-n", "weft-system", "logs", &agent_pod, "-c", "agent"]);
    assert!(log.contains("objects listed from the Kubernetes API"), "{log}");
    assert!(log.contains("Envoy started"), "Envoy runs in the agent's container: {log}");
    // weft-cni is chained onto the node's bridge list by the init container.
    let list = fs::read_to_string(fs::read_dir(&conf).unwrap().next().unwrap().unwrap().path()).unwrap();
    let list: Value = serde_json::from_str(&list).unwrap();
    let types: Vec<&str> = list["plugins"].as_array().unwrap().iter().filter_map(|p| p["type"].as_str()).collect();
    assert_eq!(types, ["bridge", "weft-cni"], "{list}");

    // The operator elects a leader.
    node.kubectl(&["-n", "weft-system", "rollout", "status", "deploy/weft-operator", "--timeout=120s"]);
    let holder = node.wait("a leader in Lease weft-operator", Duration::from_secs(60), || {
        let lease = node.kubectl_try(&["-n", "weft-system", "get", "lease", "weft-operator", "-o", "json"]).ok()?;
        let lease: Value = serde_json::from_str(&lease).ok()?;
        lease["spec"]["holderIdentity"].as_str().filter(|h| !h.is_empty()).map(str::to_owned)
    });
    let operators =
        node.kubectl(&["-n", "weft-system", "get", "pods", "-l", "app.kubernetes.io/name=weft-operator", "-o", "name"]);
    assert!(operators.lines().any(|p| p.trim_start_matches("pod/") == holder), "leader {holder} is one of {operators}");

    // Pods through the CNI chain; a Service that only weft's datapath can translate.
    node.apply(WORKLOADS);
    node.kubectl(&["wait", "--for=condition=Ready", "pod/web", "pod/client", "--timeout=120s"]);
    let svc = node.json(&["get", "service", "web"]);
    let vip = svc["spec"]["clusterIP"].as_str().unwrap().to_owned();
    // busybox-static's wget crashes (static glibc): nc sends the request, in HTTP/1.1 (Envoy refuses
    // 1.0 by default), keeping its side open a moment: Envoy resets a request whose client half-closed.
    let get = format!(
        "(printf 'GET / HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n'; sleep 0.2) | nc -w 3 {vip} 80"
    );
    let fetch = |node: &Node| {
        let out = node.kubectl_try(&["exec", "client", "--", "sh", "-c", &get])?;
        out.ends_with("served-by-web\n").then_some(out).ok_or_else(|| "not served".to_owned())
    };
    let body = node.wait("the Service through weft's datapath", Duration::from_secs(60), || fetch(&node).ok());
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");

    // An L7 Service: an EnvoyConfig applied with kubectl sends web-l7 through the node's Envoy.
    node.apply(&weft_tests::objects::http_envoy_config("web-l7", "web-l7", None));
    let vip_l7 = node.json(&["get", "service", "web-l7"])["spec"]["clusterIP"].as_str().unwrap().to_owned();
    let get_l7 = format!(
        "(printf 'GET / HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n'; sleep 0.2) | nc -w 3 {vip_l7} 80"
    );
    let via_envoy = node.wait("web-l7 through the node's Envoy", Duration::from_secs(60), || {
        let out = node.kubectl_try(&["exec", "client", "--", "sh", "-c", &get_l7]).ok()?;
        (out.ends_with("served-by-web\n") && out.to_ascii_lowercase().contains("x-envoy-upstream-service-time"))
            .then_some(out)
    });
    assert!(via_envoy.starts_with("HTTP/1.1 200"), "{via_envoy}");
    let web_ip = node.json(&["get", "pod", "web"])["status"]["podIP"].as_str().unwrap().to_owned();

    // The flows, from inside the agent's container.
    let flows = node.wait("flows to default/web in weft observe", Duration::from_secs(30), || {
        let out = node
            .kubectl_try(&[
                "-n",
                "weft-system",
                "exec",
                &agent_pod,
                "-c",
                "agent",
                "--",
                "weft",
                "observe",
                "--to-pod",
                "default/web",
                "--last",
                "50",
                "--color",
                "never",
            ])
            .ok()?;
        out.contains("default/client").then_some(out)
    });
    assert!(flows.contains("default/web"), "{flows}");
    eprintln!(
        "flows seen in the agent's container after {:?}:\n{}",
        started.elapsed(),
        flows.lines().take(4).collect::<Vec<_>>().join("\n")
    );

    let l7 = node.wait("an HTTP flow of web-l7 in weft observe", Duration::from_secs(30), || {
        let out = node
            .kubectl_try(&[
                "-n",
                "weft-system",
                "exec",
                &agent_pod,
                "-c",
                "agent",
                "--",
                "weft",
                "observe",
                "--protocol",
                "http",
                "--last",
                "20",
                "--color",
                "never",
            ])
            .ok()?;
        out.contains("GET").then_some(out)
    });
    eprintln!("HTTP flows:\n{}", l7.lines().take(2).collect::<Vec<_>>().join("\n"));

    // The real hubble CLI reads them through the agent's flow port (in the
    // node's network namespace), over the mutual TLS deploy/ turns on: the
    // client certificate the operator issued (Secret weft-flows-client), and
    // the node's server name by Hubble's convention. The agent serves TLS
    // once the kubelet has written the operator's Secret into its pod.
    match on_path("hubble") {
        Some(hubble) => {
            let secret: k8s_openapi::api::core::v1::Secret =
                node.wait("the flow API's client certificate", Duration::from_secs(120), || {
                    let text =
                        node.kubectl_try(&["-n", "weft-system", "get", "secret", "weft-flows-client", "-o", "json"]);
                    serde_json::from_str(&text.ok()?).ok()
                });
            let data = secret.data.unwrap_or_default();
            for key in ["tls.crt", "tls.key", "ca.crt"] {
                fs::write(node.scratch.join(key), &data.get(key).unwrap_or_else(|| panic!("{key}")).0).unwrap();
            }
            let file = |key: &str| node.scratch.join(key).to_string_lossy().into_owned();
            let server_name = weft_flow::names::flow_server_name(&nodename, "default");
            let out = node.wait("hubble observe over mutual TLS", Duration::from_secs(180), || {
                let out = Command::new(node.var("IN_NODE"))
                    .arg(&hubble)
                    .args(["observe", "--server", "localhost:4244", "--last", "50", "--to-pod", "default/web"])
                    .args(["--tls", "--tls-server-name", &server_name, "--tls-ca-cert-files", &file("ca.crt")])
                    .args(["--tls-client-cert-file", &file("tls.crt"), "--tls-client-key-file", &file("tls.key")])
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                (out.status.success() && text.contains("default/client")).then_some(text)
            });
            assert!(out.contains("default/client") && out.contains("default/web:8080"), "hubble observe: {out}");
            // Without a client certificate the flow port answers nothing.
            let plain = Command::new(node.var("IN_NODE"))
                .arg(&hubble)
                .args(["observe", "--server", "localhost:4244", "--last", "1", "--tls"])
                .args(["--tls-server-name", &server_name, "--tls-ca-cert-files", &file("ca.crt")])
                .output()
                .unwrap();
            assert!(!plain.status.success(), "a client without a certificate is refused");
        }
        None => eprintln!("hubble is not on PATH (tests/env.sh puts ../shared/bin's there): its check is skipped"),
    }

    // A rolling restart of the agent under a bounded load, watched by a
    // flow follower outside the agent's pod (see LostFlows).
    let client_ip = node.json(&["get", "pod", "client"])["status"]["podIP"].as_str().unwrap().to_owned();
    let plain = PlainLoad { client: &client_ip, web: &web_ip, vip: &vip, vip_l7: &vip_l7 };
    let mut follower = LostFlows::follow(&node);
    follower.connected(&node, &plain, || fetch(&node).is_ok());
    let load = |get: &str| -> Child {
        Command::new(node.var("KUBECTL"))
            .args(["exec", "client", "--", "sh", "-c"])
            .arg(format!(
                "ok=0; bad=0; i=0; while [ $i -lt 300 ]; do \
                 if {get} 2>/dev/null | grep -q served-by-web; then ok=$((ok+1)); else bad=$((bad+1)); fi; \
                 i=$((i+1)); done; echo ok=$ok failed=$bad"
            ))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (load, load_l7) = (load(&get), load(&get_l7));
    std::thread::sleep(Duration::from_secs(3));
    node.kubectl(&["-n", "weft-system", "rollout", "restart", "ds/weft-agent"]);
    node.kubectl(&["-n", "weft-system", "rollout", "status", "ds/weft-agent", "--timeout=240s"]);
    let new_pod =
        node.kubectl(&["-n", "weft-system", "get", "pods", "-l", "app.kubernetes.io/name=weft-agent", "-o", "name"]);
    assert!(!new_pod.contains(&agent_pod), "the restart made a new agent pod: {new_pod}");
    let out = load.wait_with_output().unwrap();
    let counts = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let out_l7 = load_l7.wait_with_output().unwrap();
    let counts_l7 = String::from_utf8_lossy(&out_l7.stdout).trim().to_owned();
    let lost = follower.stop(&plain, requests_made(&counts));
    eprintln!("flows across the rollout restart: {lost}");
    // Envoy lives in the agent's container: what its restart costs L7 requests is reported, not asserted.
    eprintln!("load across the rollout restart: plain Service {counts}; L7 Service (Envoy restarts) {counts_l7}");
    assert!(counts_l7.starts_with("ok="), "the L7 load ran: {counts_l7}");
    assert!(counts.starts_with("ok=") && counts.ends_with("failed=0"), "requests failed across the restart: {counts}");
    lost.check();
    // The new agent serves both Services and sees the traffic.
    fetch(&node).unwrap();
    node.wait("web-l7 through the new agent's Envoy", Duration::from_secs(60), || {
        node.kubectl_try(&["exec", "client", "--", "sh", "-c", &get_l7])
            .ok()?
            .ends_with("served-by-web\n")
            .then_some(())
    });
    let new_pod = new_pod.lines().next().unwrap().trim_start_matches("pod/").to_owned();
    node.wait("flows in the new agent", Duration::from_secs(30), || {
        fetch(&node).ok()?;
        let out = node
            .kubectl_try(&[
                "-n",
                "weft-system",
                "exec",
                &new_pod,
                "-c",
                "agent",
                "--",
                "weft",
                "observe",
                "--to-ip",
                &web_ip,
                "--last",
                "20",
                "--color",
                "never",
            ])
            .ok()?;
        out.contains("default/client").then_some(())
    });
    eprintln!("done after {:?}", started.elapsed());
    drop(node);
}

/// `ok=N failed=M` of the load: N + M.
fn requests_made(counts: &str) -> usize {
    counts.split_whitespace().filter_map(|kv| kv.split_once('=')?.1.parse::<usize>().ok()).sum()
}

/// The plain load's connections: the client to web's Service address or,
/// translated, to web itself. The L7 load's connections go to another
/// Service address (`vip_l7`), handed to Envoy, whose HTTP flows name the
/// client's connection and web too: a connection with any such flow is not
/// the plain load's.
struct PlainLoad<'a> {
    client: &'a str,
    web: &'a str,
    vip: &'a str,
    vip_l7: &'a str,
}

impl PlainLoad<'_> {
    /// The client's port and whether the flow is the L7 load's, if `flow`
    /// is one of the client's connections to web.
    fn connection(&self, flow: &Value) -> Option<(u64, bool)> {
        let (src, dst) = (flow["IP"]["source"].as_str()?, flow["IP"]["destination"].as_str()?);
        let tcp = &flow["l4"]["TCP"];
        let (sport, dport) = (tcp["source_port"].as_u64()?, tcp["destination_port"].as_u64()?);
        let server = |ip: &str, port: u64| {
            (ip == self.web && port == 8080) || ((ip == self.vip || ip == self.vip_l7) && port == 80)
        };
        let l7 =
            src == self.vip_l7 || dst == self.vip_l7 || flow.get("l7").is_some() || flow["verdict"] == "REDIRECTED";
        if src == self.client && server(dst, dport) {
            Some((sport, l7))
        } else if dst == self.client && server(src, sport) {
            Some((dport, l7))
        } else {
            None
        }
    }
}

/// The flows lost across the rollout restart. The old agent's flow store
/// goes with its pod, so asking each agent afterwards cannot see what the
/// old one had; instead a `weft observe --follow` runs outside the agent's
/// pod, on the node's copy of the agent's flow socket (the state hostPath,
/// a folder of this node: the same path for the old and the new agent), and
/// reconnects to the new agent by itself (it says so on stderr). Each
/// request of the plain load is one TCP connection (the client's port tells
/// them apart), so the flows expected are the requests made times the flows
/// a connection usually has (the median of those seen); what the follower
/// did not get is what was lost. The load starts only once the follower has
/// shown a request of the client's (those warm-up connections not counted).
struct LostFlows {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    /// The client's ports of the warm-up requests.
    warm_up: std::collections::BTreeSet<u64>,
    // Filled by `stop`.
    made: usize,
    per_connection: usize,
    seen: BTreeMap<u64, usize>,
    restart_line: Option<String>,
}

impl LostFlows {
    fn follow(node: &Node) -> Self {
        let socket = node.host_path("/var/run/weft").join("observer.sock");
        let (out, err) = (node.scratch.join("follower.json"), node.scratch.join("follower.err"));
        let child = Command::new(weft_tests::objects::workspace_binary("weft"))
            .args(["observe", "--follow", "--output", "json", "--color", "never", "--server"])
            .arg(format!("unix://{}", socket.display()))
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        LostFlows {
            child,
            out,
            err,
            warm_up: Default::default(),
            made: 0,
            per_connection: 0,
            seen: BTreeMap::new(),
            restart_line: None,
        }
    }

    /// The load's connections the follower has shown so far.
    fn connections(&self, load: &PlainLoad) -> Vec<(u64, bool)> {
        let text = fs::read_to_string(&self.out).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| load.connection(&v["flow"]))
            .collect()
    }

    /// Makes requests (`request`) until the follower shows one, so that it
    /// is known to be streaming before the load starts.
    fn connected(&mut self, node: &Node, load: &PlainLoad, request: impl Fn() -> bool) {
        node.wait("the follower to stream the client's flows", Duration::from_secs(60), || {
            request();
            (!self.connections(load).is_empty()).then_some(())
        });
        // The warm-up connections' last flows arrive within moments.
        std::thread::sleep(Duration::from_secs(1));
        self.warm_up = self.connections(load).into_iter().map(|(port, _)| port).collect();
    }

    /// Stops the follower (once the last flows had time to arrive) and counts.
    fn stop(mut self, load: &PlainLoad, made: usize) -> Self {
        std::thread::sleep(Duration::from_secs(3));
        // SAFETY: signalling our own child, as Ctrl-C would: it ends cleanly.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let _ = self.child.wait();
        let mut l7 = std::collections::BTreeSet::new();
        for (port, is_l7) in self.connections(load) {
            *self.seen.entry(port).or_default() += 1;
            if is_l7 {
                l7.insert(port);
            }
        }
        self.seen.retain(|port, _| !l7.contains(port) && !self.warm_up.contains(port));
        let mut counts: Vec<usize> = self.seen.values().copied().collect();
        counts.sort_unstable();
        self.per_connection = counts.get(counts.len() / 2).copied().unwrap_or(0);
        self.made = made;
        self.restart_line = fs::read_to_string(&self.err)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("the agent restarted"))
            .map(str::to_owned);
        self
    }

    fn unseen(&self) -> usize {
        self.made.saturating_sub(self.seen.len())
    }

    fn lost(&self) -> usize {
        let short: usize = self.seen.values().map(|c| self.per_connection.saturating_sub(*c)).sum();
        short + self.unseen() * self.per_connection
    }

    /// The follower saw both agents and only the load's connections.
    fn check(&self) {
        assert!(self.restart_line.is_some(), "the follower reconnected to the new agent: {self}");
        assert!(self.per_connection > 0 && self.seen.len() <= self.made, "{self}");
    }
}

impl std::fmt::Display for LostFlows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} plain requests (one connection each, usually {} flows): {} connections seen by a follower outside the \
             agent's pod ({}), {} not seen at all; about {} of {} flows lost",
            self.made,
            self.per_connection,
            self.seen.len(),
            self.restart_line
                .as_deref()
                .map_or("it did not see the agent restart", |_| "it reconnected to the new agent"),
            self.unseen(),
            self.lost(),
            self.made * self.per_connection,
        )
    }
}
