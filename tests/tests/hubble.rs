//! The real `hubble` CLI (cilium/hubble with Cilium 1.19, from ../shared/bin:
//! tests/env.sh unpacks it onto PATH) against lab agents, over the agent's
//! unix socket and over TCP with mutual TLS: `status`, `observe` in every
//! output format with the time and count flags and the filters (CEL
//! included), `list nodes`, `list namespaces`. What hubble selects is
//! compared with what `weft observe` selects for the same flags, flow by
//! flow (by UUID), over a fixed time window so both read the same flows.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    process::{Command, Output},
    time::Duration,
};

use serde_json::Value;
use weft_tests::{
    envoylab::EnvoyLab,
    flows::{Prometheus, flow_lab, flow_socket, flows_of, observe_json, traffic, wait_for, wait_http_flows},
    http::{Client, get_once},
    objects::{LabService, http_envoy_config, lab_objects, wait_status},
    pki::Pki,
    require_root,
    scenario::{T, VIP, sa},
};

/// A binary on PATH (tests/env.sh puts ../shared/bin's there).
fn on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

fn hubble_binary() -> Option<PathBuf> {
    on_path("hubble")
}

const NO_HUBBLE: &str = "SKIPPED: needs hubble on PATH (tests/env.sh unpacks ../shared/bin) and openssl";

/// The hubble CLI pointed at one lab agent.
struct Hubble<'a> {
    env: &'a EnvoyLab,
    bin: PathBuf,
    pki: &'a Pki,
}

/// How hubble reaches the agent.
#[derive(Clone, Copy, Debug)]
enum Via {
    /// node1's flow API socket.
    Unix,
    /// node1's TCP port 4244 with mutual TLS, from inside node1.
    Tls,
    /// TLS without a client certificate (the agent must refuse).
    TlsNoClientCert,
}

impl Hubble<'_> {
    fn run(&self, via: Via, args: &[&str]) -> Output {
        // Inside node1 for TCP (through `ip netns exec`, reading the output
        // as it comes: a long answer would fill a pipe nobody reads);
        // bounded in time either way.
        let mut cmd = Command::new("timeout");
        cmd.arg("60");
        if !matches!(via, Via::Unix) {
            cmd.args(["ip", "netns", "exec", &self.env.lab.node(0).netns]);
        }
        cmd.arg(&self.bin).args(args);
        let p = |f: &str| self.pki.path(f).display().to_string();
        match via {
            Via::Unix => {
                cmd.args(["--server", &flow_socket(&self.env.files[0])]);
                cmd.output().expect("hubble runs")
            }
            Via::Tls | Via::TlsNoClientCert => {
                cmd.args(["--server", "tls://127.0.0.1:4244", "--tls-server-name", "localhost"]);
                cmd.args(["--tls-ca-cert-files", &p("flows-ca.pem")]);
                if let Via::Tls = via {
                    cmd.args(["--tls-client-cert-file", &p("client.pem"), "--tls-client-key-file", &p("client.key")]);
                }
                cmd.output().expect("hubble runs")
            }
        }
    }

    /// Runs hubble; fails the test with its stderr if it fails.
    fn ok(&self, via: Via, args: &[&str]) -> String {
        let out = self.run(via, args);
        if !out.status.success() {
            self.env.fail(format!("hubble {args:?} over {via:?}: {}", String::from_utf8_lossy(&out.stderr)));
        }
        String::from_utf8(out.stdout).expect("UTF-8")
    }

    /// `hubble observe -o json ARGS`: one response per line.
    fn json(&self, via: Via, args: &[&str]) -> Vec<Value> {
        let out = self.ok(via, &[&["observe", "-o", "json"][..], args].concat());
        out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    }
}

/// What every flow a filter selects must satisfy.
type FlowCheck<'a> = dyn Fn(&Value) -> bool + 'a;

fn uuids(flows: &[&Value]) -> BTreeSet<String> {
    flows.iter().map(|f| f["uuid"].as_str().unwrap_or_default().to_owned()).collect()
}

fn pod(f: &Value, side: &str) -> String {
    format!("{}/{}", f[side]["namespace"].as_str().unwrap_or(""), f[side]["pod_name"].as_str().unwrap_or(""))
}

#[test]
fn the_hubble_cli_reads_lab_agents_over_the_socket_and_mutual_tls_like_weft_observe() {
    require_root!();
    let (Some(bin), Some(pki)) = (hubble_binary(), Pki::new("hubble")) else {
        eprintln!("{NO_HUBBLE}");
        return;
    };
    pki.ca("flows").leaf("flows", "server", true).ca("clients").leaf("clients", "client", false);
    let tls = format!(
        "flows:\n  tls:\n    cert: {}\n    key: {}\n    client-ca: {}\n",
        pki.path("server.pem").display(),
        pki.path("server.key").display(),
        pki.path("clients-ca.pem").display()
    );
    let env = flow_lab(&tls);
    traffic(&env, 3);
    wait_http_flows(&env, 6);
    let h = Hubble { env: &env, bin, pki: &pki };
    // A window that closed before any query: both CLIs see the same flows.
    std::thread::sleep(Duration::from_millis(300));
    let until = weft_flow::time::rfc3339(weft_flow::time::now_ns());
    let window = ["--until", until.as_str()];

    // status and the node and namespace lists, both ways.
    for via in [Via::Unix, Via::Tls] {
        let s = h.ok(via, &["status"]);
        assert!(s.contains("Healthcheck (via ") && s.contains("): Ok"), "{via:?}: {s}");
        assert!(s.contains("Current/Max Flows: ") && s.contains("/4,095 ("), "{via:?}: {s}");
        assert!(s.contains("Flows/s: "), "{via:?}: {s}");
        let nodes = h.ok(via, &["list", "nodes"]);
        let row = nodes.lines().find(|l| l.starts_with("node1 ")).unwrap_or_else(|| panic!("{via:?}: {nodes}"));
        assert!(row.contains("Connected"), "{row}");
        let ns = h.ok(via, &["list", "namespaces"]);
        assert!(ns.lines().any(|l| l.trim() == "default"), "{via:?}: {ns}");
    }
    // Mutual TLS: no client certificate, no answer.
    let refused = h.run(Via::TlsNoClientCert, &["status"]);
    assert!(!refused.status.success(), "the agent answered a client without a certificate");

    // Every filter flag hubble sends, compared with weft observe's answer.
    let hello = env.lab.pod("n2-p1");
    let (client_ip, backend_ip) = (env.lab.pod("n1-p1").ip.to_string(), hello.ip.to_string());
    let client_id = {
        let all = observe_json(&env.files[0], &["--all", "--from-pod", "default/n1-p1", "--until", &until]).unwrap();
        flows_of(&all)[0]["source"]["identity"].as_u64().expect("an identity").to_string()
    };
    let from_client_id = |f: &Value| f["source"]["identity"].as_u64().map(|i| i.to_string()) == Some(client_id.clone());
    let client_ip_either = |f: &Value| f["IP"]["source"] == client_ip || f["IP"]["destination"] == client_ip;
    let cases: Vec<(Vec<&str>, &FlowCheck)> = vec![
        (vec!["--verdict", "DROPPED"], &|f| f["verdict"] == "DROPPED"),
        (vec!["--drop-reason-desc", "POLICY_DENIED"], &|f| f["drop_reason_desc"] == "POLICY_DENIED"),
        (vec!["--pod", "default/n1-p2"], &|f| {
            pod(f, "source") == "default/n1-p2" || pod(f, "destination") == "default/n1-p2"
        }),
        (vec!["--from-pod", "default/n1-p1", "--to-namespace", "default"], &|f| pod(f, "source") == "default/n1-p1"),
        (vec!["--namespace", "default", "--protocol", "http"], &|f| !f["l7"]["http"].is_null()),
        (vec!["--label", "app=app2"], &|_| true),
        (vec!["--from-identity", &client_id], &from_client_id),
        (vec!["--ip", &client_ip], &client_ip_either),
        (vec!["--to-ip", "10.1.0.0/16"], &|f| f["IP"]["destination"].as_str().is_some_and(|d| d.starts_with("10.1."))),
        (vec!["--to-ip", &backend_ip, "--to-port", "8080", "--protocol", "tcp"], &|f| {
            f["l4"]["TCP"]["destination_port"] == 8080
        }),
        (vec!["--type", "trace:to-proxy"], &|f| f["trace_observation_point"] == "TO_PROXY"),
        (vec!["--type", "l7"], &|f| !f["l7"].is_null()),
        (vec!["--http-status", "200", "--http-method", "GET"], &|f| f["l7"]["http"]["code"] == 200),
        (vec!["--http-path", "^/api/items/[0-2]$"], &|f| {
            f["l7"]["http"]["url"].as_str().is_some_and(|u| u.contains("/api/items/"))
        }),
        (vec!["--http-url", "hello\\.default"], &|f| {
            f["l7"]["http"]["url"].as_str().is_some_and(|u| u.contains("hello.default"))
        }),
        (vec!["--node-name", "node1"], &|f| f["node_name"] == "node1"),
        (vec!["--node-name", "default/node*"], &|f| f["node_name"] == "node1"),
        (vec!["--not", "--verdict", "FORWARDED", "--not", "--verdict", "REDIRECTED"], &|f| {
            f["verdict"] != "FORWARDED" && f["verdict"] != "REDIRECTED"
        }),
    ];
    for (args, each) in &cases {
        let args: Vec<&str> = [&["--all"][..], &window[..], args].concat();
        let mut seen = None;
        for via in [Via::Unix, Via::Tls] {
            let responses = h.json(via, &args);
            let flows = flows_of(&responses);
            assert!(!flows.is_empty(), "hubble {args:?} over {via:?}: no flow");
            for f in &flows {
                assert!(each(f), "hubble {args:?} over {via:?} printed a flow the filter excludes: {f}");
            }
            let weft = observe_json(&env.files[0], &args).unwrap();
            assert_eq!(uuids(&flows), uuids(&flows_of(&weft)), "hubble and weft observe {args:?} over {via:?}");
            let ids = uuids(&flows);
            assert!(seen.as_ref().is_none_or(|s| *s == ids), "{args:?}: the socket and TLS answers differ");
            seen = Some(ids);
        }
    }

    // CEL, as Hubble evaluates it: the same flows as the equivalent flags.
    let cel =
        |expr: &str| uuids(&flows_of(&h.json(Via::Unix, &["--all", "--until", &until, "--cel-expression", expr])));
    let flags =
        |args: &[&str]| uuids(&flows_of(&h.json(Via::Unix, &[&["--all", "--until", &until][..], args].concat())));
    let http200 = cel("has(_flow.l7.http) && _flow.l7.http.code == 200 && _flow.l7.type == L7FlowType.RESPONSE");
    assert_eq!(http200.len(), 3);
    assert_eq!(
        http200,
        flags(&["--http-status", "200", "--type", "l7"])
            .intersection(&flags(&["--to-pod", "default/n1-p1"]))
            .cloned()
            .collect()
    );
    assert_eq!(cel("_flow.verdict == Verdict.DROPPED"), flags(&["--verdict", "DROPPED"]));
    assert_eq!(
        cel(r#"_flow.source.pod_name == "n1-p1" || _flow.destination.pod_name == "n1-p1""#),
        flags(&["--pod", "default/n1-p1"])
    );
    assert_eq!(cel("_flow.l4.TCP.destination_port == 8080u"), flags(&["--to-port", "8080"]));
    // Two expressions: either may match.
    let two = uuids(&flows_of(&h.json(
        Via::Unix,
        &["--all", "--until", &until, "--cel-expression", "_flow.verdict == 2", "--cel-expression", "has(_flow.l7)"],
    )));
    assert_eq!(two, &flags(&["--verdict", "DROPPED"]) | &flags(&["--type", "l7"]));
    // A bad expression is InvalidArgument naming it.
    let bad = h.run(Via::Unix, &["observe", "--cel-expression", "_flow.sorce.namespace == \"x\""]);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("InvalidArgument") && err.contains("sorce"), "{err}");

    // Counts and times.
    let http = ["--all", "--protocol", "http", "--until", until.as_str()];
    let all_http = flows_of(&h.json(Via::Unix, &http)).iter().map(|f| f["uuid"].clone()).collect::<Vec<_>>();
    assert_eq!(all_http.len(), 6, "three requests and three responses");
    let last = h.json(Via::Unix, &["--last", "2", "--protocol", "http", "--until", &until]);
    assert_eq!(flows_of(&last).iter().map(|f| f["uuid"].clone()).collect::<Vec<_>>(), all_http[4..]);
    let first = h.json(Via::Tls, &["--first", "2", "--protocol", "http"]);
    assert_eq!(flows_of(&first).iter().map(|f| f["uuid"].clone()).collect::<Vec<_>>(), all_http[..2]);
    let since = flows_of(&h.json(Via::Unix, &http))[3]["time"].as_str().unwrap().to_owned();
    let later = h.json(Via::Unix, &["--all", "--protocol", "http", "--since", &since, "--until", &until]);
    assert_eq!(flows_of(&later).len(), 3, "since the fourth HTTP flow");

    // Output formats: each prints the HTTP flows.
    let compact = h.ok(Via::Unix, &["observe", "--protocol", "http", "--until", &until, "--all"]);
    assert_eq!(compact.lines().filter(|l| l.contains(" http-response FORWARDED ")).count(), 3, "{compact}");
    assert!(compact.lines().all(|l| l.contains("default/n1-p1:")), "{compact}");
    let weft_compact = Command::new(weft_tests::objects::workspace_binary("weft"))
        .args(["observe", "--server", &flow_socket(&env.files[0]), "--protocol", "http", "--until", &until, "--all"])
        .output()
        .unwrap();
    assert_eq!(compact, String::from_utf8_lossy(&weft_compact.stdout), "hubble's and weft's compact lines");
    let jsonpb = h.ok(Via::Unix, &["observe", "-o", "jsonpb", "--protocol", "http", "--until", &until, "--all"]);
    assert_eq!(jsonpb.lines().filter(|l| l.contains("\"RESPONSE\"")).count(), 3, "{jsonpb}");
    let dict = h.ok(Via::Unix, &["observe", "-o", "dict", "--protocol", "http", "--until", &until, "--all"]);
    assert_eq!(dict.matches("http-response").count(), 3, "{dict}");
    let table = h.ok(Via::Unix, &["observe", "-o", "table", "--protocol", "http", "--until", &until, "--all"]);
    assert!(table.lines().next().is_some_and(|l| l.contains("SOURCE") && l.contains("DESTINATION")), "{table}");
    assert_eq!(table.matches("http-response").count(), 3, "{table}");

    // --follow: new matching flows arrive on an open stream (over TLS).
    let mut cmd = Command::new(&h.bin);
    let p = |f: &str| pki.path(f).display().to_string();
    cmd.args(["observe", "--follow", "-o", "json", "--protocol", "http", "--server", "tls://127.0.0.1:4244"])
        .args(["--tls-server-name", "localhost", "--tls-ca-cert-files", &p("flows-ca.pem")])
        .args(["--tls-client-cert-file", &p("client.pem"), "--tls-client-key-file", &p("client.key")])
        .stdout(std::process::Stdio::piped());
    let pid = env.lab.spawn(&env.lab.node(0).netns, None, &mut cmd).unwrap();
    let stdout = env.lab.take_stdout(pid).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    traffic(&env, 1);
    let line = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|e| env.fail(format!("hubble --follow: {e}")));
    let v: Value = serde_json::from_str(&line).unwrap();
    assert!(!all_http.contains(&v["flow"]["uuid"]), "a new flow: {line}");
    assert!(!v["flow"]["l7"]["http"].is_null(), "{line}");
    env.lab.kill(pid);
}

/// A Node object for the lab's objects file.
fn node_object(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nstatus:\n  addresses: [{{type: InternalIP, address: {ip}}}]\n---\n"
    )
}

#[test]
fn hubble_watch_peers_follows_the_lab_nodes() {
    require_root!();
    let Some(bin) = hubble_binary() else {
        eprintln!("{NO_HUBBLE}");
        return;
    };
    let services = |lab: &weft_tests::lab::Lab| {
        weft_tests::objects::lab_objects(lab, &[weft_tests::objects::LabService::new("web", VIP, 80, &["n2-p1"])])
    };
    let env = EnvoyLab::with_config(services, "envoy:\n  enabled: false\n");
    let base = services(&env.lab);
    let (ip1, ip2) = (env.lab.node(0).ip.to_string(), env.lab.node(1).ip.to_string());

    // `hubble watch peers` on node1's socket: both nodes at once...
    let mut cmd = Command::new(&bin);
    cmd.args(["watch", "peers", "--server", &flow_socket(&env.files[0])]).stdout(std::process::Stdio::piped());
    let pid = env.lab.spawn(&env.lab.node(0).netns, None, &mut cmd).unwrap();
    let stdout = env.lab.take_stdout(pid).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let next = |what: &str| -> String {
        rx.recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|e| env.fail(format!("hubble watch peers, {what}: {e}")))
    };
    let mut first = [next("the first node"), next("the second node")];
    first.sort();
    let expect = |line: &str, kind: &str, addr: &str, name: &str| {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert!(words.len() >= 3 && words[0] == kind && words[1] == addr && words[2] == name, "{line}");
    };
    expect(&first[0], "PEER_ADDED", &format!("{ip1}:4244"), "node1");
    expect(&first[1], "PEER_ADDED", &format!("{ip2}:4244"), "node2");
    // ...then each change of the Nodes.
    env.apply(&format!("{base}{}", node_object("node3", "192.168.50.99")));
    expect(&next("node3 added"), "PEER_ADDED", "192.168.50.99:4244", "node3");
    env.apply(&format!("{base}{}", node_object("node3", "192.168.50.98")));
    expect(&next("node3 moved"), "PEER_UPDATED", "192.168.50.98:4244", "node3");
    env.apply(&base);
    expect(&next("node3 removed"), "PEER_DELETED", "192.168.50.98:4244", "node3");
    env.lab.kill(pid);
}

/// Runs `hubble ARGS` inside a lab node, bounded in time.
fn hubble_in(env: &EnvoyLab, node: usize, bin: &std::path::Path, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["30", "ip", "netns", "exec", &env.lab.node(node).netns])
        .arg(bin)
        .args(args)
        .output()
        .expect("hubble runs")
}

#[test]
fn hubble_relay_shows_the_flows_of_both_lab_nodes() {
    require_root!();
    let (Some(bin), Some(relay)) = (hubble_binary(), on_path("hubble-relay")) else {
        eprintln!("SKIPPED: needs hubble and hubble-relay on PATH (tests/env.sh unpacks ../shared/bin)");
        return;
    };
    let services = |lab: &weft_tests::lab::Lab| {
        weft_tests::objects::lab_objects(lab, &[weft_tests::objects::LabService::new("web", VIP, 80, &["n2-p1"])])
    };
    let env = EnvoyLab::with_config(services, "envoy:\n  enabled: false\nflows:\n  address: 0.0.0.0:4244\n");
    // n1-p1 to web, whose backend is on node2: each node sees its side.
    let client = env.lab.pod("n1-p1");
    for _ in 0..3 {
        let (r, _, _) = get_once(&client.netns, sa(VIP, 80), "/", T).unwrap_or_else(|e| env.fail(e));
        assert_eq!(r.status, 200);
    }

    // The relay in node1 finds the nodes through node1's Peer service. This
    // old relay dials it only over a unix socket and names the socket as the
    // HTTP/2 authority (weft_observe::api::authority).
    let log_path = env.files[0].state_dir.join("hubble-relay.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(&relay);
    cmd.args(["serve", "--peer-service", &flow_socket(&env.files[0]), "--listen-address", "127.0.0.1:4245"])
        .args(["--disable-server-tls", "--disable-client-tls", "--gops=false", "--dial-timeout", "3s"])
        .args(["--retry-timeout", "2s"])
        .stdout(std::process::Stdio::null())
        .stderr(log);
    let pid = env.lab.spawn(&env.lab.node(0).netns, None, &mut cmd).unwrap();
    let relay_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let server = ["--server", "127.0.0.1:4245"];

    let node_names = |out: &Output| -> BTreeSet<String> {
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["flow"]["node_name"].as_str().map(str::to_owned))
            .collect()
    };
    let all = weft_tests::flows::wait_for(Duration::from_secs(30), "flows of both nodes through the relay", || {
        let out = hubble_in(&env, 0, &bin, &[&["observe", "-o", "json", "--all"][..], &server].concat());
        let names = node_names(&out);
        (names.contains("node1") && names.contains("node2")).then_some(out)
    })
    .unwrap_or_else(|e| env.fail(format!("{e}; relay log:\n{}", relay_log())));
    let flows: Vec<Value> = String::from_utf8_lossy(&all.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| !v["flow"].is_null())
        .collect();
    // Node2's flows are the requests arriving at the backend.
    assert!(
        flows.iter().any(|v| v["flow"]["node_name"] == "node2" && pod(&v["flow"], "destination") == "default/n2-p1"),
        "no flow of node2 to n2-p1"
    );
    // The relay merges both nodes' streams ordered by time.
    let times: Vec<&str> = flows.iter().filter_map(|v| v["flow"]["time"].as_str()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "not in time order: {times:?}");
    // A filter goes through to both nodes: node2's flows only.
    let node2 =
        hubble_in(&env, 0, &bin, &[&["observe", "-o", "json", "--all", "--node-name", "node2"][..], &server].concat());
    assert_eq!(node_names(&node2), BTreeSet::from(["node2".to_owned()]), "{}", relay_log());
    // status through the relay counts both nodes.
    let status = hubble_in(&env, 0, &bin, &[&["status"][..], &server].concat());
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("Connected Nodes: 2/2"), "{status}\nrelay log:\n{}", relay_log());
    // This relay (Cilium 1.9) has no GetNodes (its Observer service knows
    // GetFlows and ServerStatus only); a newer one must list both nodes.
    let nodes = hubble_in(&env, 0, &bin, &[&["list", "nodes"][..], &server].concat());
    let (out, err) = (String::from_utf8_lossy(&nodes.stdout), String::from_utf8_lossy(&nodes.stderr));
    println!("hubble list nodes through the relay: {}{}", out.trim(), err.trim());
    if nodes.status.success() {
        assert!(["node1", "node2"].iter().all(|n| out.lines().any(|l| l.starts_with(n))), "{out}");
    } else {
        assert!(err.contains("Unimplemented"), "hubble list nodes through the relay: {err}");
    }
    env.lab.kill(pid);
}

/// A folder removed when the test ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a Secret's keys as files into `dir`, as a Secret volume mounts them.
fn mount_secret(cp: &weft_tests::k8s::ControlPlane, name: &str, dir: &std::path::Path) {
    let json = cp.kubectl_ok(&["-n", "weft-system", "get", "secret", name, "-o", "json"]);
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_str(&json).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    for (key, value) in secret.data.unwrap_or_default() {
        std::fs::write(dir.join(key), value.0).unwrap();
    }
}

/// The certificates the operator issues (its own code, writing its Secrets to
/// the real API server as its ServiceAccount), mounted as deploy/ mounts them:
/// each agent serves its node's pair from `weft-flows-server`, and Hubble
/// Relay and the CLI present `weft-flows-client`. Over them: `hubble watch
/// peers` across nodes with the server name the Peer service announces, and
/// the relay dialling every node with mutual TLS.
#[test]
fn hubble_relay_and_watch_peers_use_the_operators_certificates() {
    use weft_agent::operator::flowcerts::{CLIENT_SECRET, FlowCerts, Lifetimes, SERVER_SECRET};
    use weft_flow::names::flow_server_name;
    require_root!();
    let (Some(bin), Some(relay)) = (hubble_binary(), on_path("hubble-relay")) else {
        eprintln!("SKIPPED: needs hubble and hubble-relay on PATH (tests/env.sh unpacks ../shared/bin)");
        return;
    };
    let cp = weft_tests::require_control_plane!();
    weft_tests::k8s::deploy::rbac(&cp);
    let kc = cp.service_account_kubeconfig("weft-system", "weft-operator", None).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let certs =
            FlowCerts::new(cp.client_for(&kc).await, "weft-system", "default", "weft-operator", Lifetimes::default());
        let nodes = ["node1", "node2"].map(String::from).into_iter().collect();
        certs.reconcile(&nodes, weft_flow::time::now_ns() / 1_000_000_000).await.unwrap();
    });
    let scratch = Scratch(std::env::temp_dir().join(format!("weft-hubble-certs-{}", std::process::id())));
    let (server_dir, client_dir) = (scratch.0.join("flows-tls"), scratch.0.join("relay-tls"));
    mount_secret(&cp, SERVER_SECRET, &server_dir);
    mount_secret(&cp, CLIENT_SECRET, &client_dir);
    let sd = server_dir.display();
    // deploy/agent.yaml's flows.tls, with this folder for /etc/weft-flows-tls.
    let config = format!(
        "envoy:\n  enabled: false\nflows:\n  tls:\n    cert: {sd}/{{node}}.crt\n    key: {sd}/{{node}}.key\n    client-ca: {sd}/ca.crt\n"
    );
    let services = |lab: &weft_tests::lab::Lab| {
        weft_tests::objects::lab_objects(lab, &[weft_tests::objects::LabService::new("web", VIP, 80, &["n2-p1"])])
    };
    let env = EnvoyLab::with_config(services, &config);
    let client = env.lab.pod("n1-p1");
    for _ in 0..3 {
        let (r, _, _) = get_once(&client.netns, sa(VIP, 80), "/", T).unwrap_or_else(|e| env.fail(e));
        assert_eq!(r.status, 200);
    }
    let file = |f: &str| client_dir.join(f).display().to_string();
    let tls = [
        "--tls",
        "--tls-ca-cert-files",
        &file("ca.crt"),
        "--tls-client-cert-file",
        &file("tls.crt"),
        "--tls-client-key-file",
        &file("tls.key"),
    ];
    let (ip1, ip2) = (env.lab.node(0).ip.to_string(), env.lab.node(1).ip.to_string());
    let (name1, name2) = (flow_server_name("node1", "default"), flow_server_name("node2", "default"));

    // From node1, node2's Peer service over mutual TLS, checked against the
    // name Hubble's convention gives node2: both nodes, each with its name.
    let mut cmd = Command::new(&bin);
    cmd.args(["watch", "peers", "--server", &format!("{ip2}:4244"), "--tls-server-name", &name2])
        .args(tls)
        .stdout(std::process::Stdio::piped());
    let pid = env.lab.spawn(&env.lab.node(0).netns, None, &mut cmd).unwrap();
    let stdout = env.lab.take_stdout(pid).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut peers: Vec<String> = (0..2)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(15)).unwrap_or_else(|e| env.fail(format!("watch peers over TLS: {e}")))
        })
        .collect();
    peers.sort();
    for (line, (ip, node, name)) in peers.iter().zip([(&ip1, "node1", &name1), (&ip2, "node2", &name2)]) {
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[..3], ["PEER_ADDED", &format!("{ip}:4244"), node], "{line}");
        assert!(line.contains(name.as_str()), "the TLS server name of {node}: {line}");
    }
    env.lab.kill(pid);
    // The wrong name for node2's certificate: refused.
    let wrong = hubble_in(
        &env,
        0,
        &bin,
        &[&["status", "--server", &format!("{ip2}:4244"), "--tls-server-name", &name1][..], &tls].concat(),
    );
    assert!(!wrong.status.success(), "node2 answered as {name1}");
    // The name newer relays check on the Peer service (deploy/'s relay reaches
    // it through the hubble-peer Service): every node's certificate has it.
    let peer_name = weft_flow::names::peer_service_server_name("default");
    let as_peer = hubble_in(
        &env,
        0,
        &bin,
        &[&["status", "--server", &format!("{ip2}:4244"), "--tls-server-name", &peer_name][..], &tls].concat(),
    );
    assert!(as_peer.status.success(), "as {peer_name}: {}", String::from_utf8_lossy(&as_peer.stderr));

    // The relay in node1: the Peer service over node1's socket, each node's
    // flow API over mutual TLS with the client certificate, verifying each
    // node by the server name the Peer service announces.
    let log_path = env.files[0].state_dir.join("hubble-relay.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = Command::new(&relay);
    cmd.args(["serve", "--peer-service", &flow_socket(&env.files[0]), "--listen-address", "127.0.0.1:4245"])
        .args(["--disable-server-tls", "--tls-hubble-server-ca-files", &file("ca.crt")])
        .args(["--tls-client-cert-file", &file("tls.crt"), "--tls-client-key-file", &file("tls.key")])
        .args(["--gops=false", "--dial-timeout", "3s", "--retry-timeout", "2s"])
        .stdout(std::process::Stdio::null())
        .stderr(log);
    let pid = env.lab.spawn(&env.lab.node(0).netns, None, &mut cmd).unwrap();
    let relay_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let server = ["--server", "127.0.0.1:4245"];
    weft_tests::flows::wait_for(Duration::from_secs(30), "both nodes through the relay over TLS", || {
        let out = hubble_in(&env, 0, &bin, &[&["observe", "-o", "json", "--all"][..], &server].concat());
        let text = String::from_utf8_lossy(&out.stdout);
        let nodes: BTreeSet<String> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|v| v["flow"]["node_name"].as_str().map(str::to_owned))
            .collect();
        (nodes.contains("node1") && nodes.contains("node2")).then_some(())
    })
    .unwrap_or_else(|e| env.fail(format!("{e}; relay log:\n{}", relay_log())));
    let status = hubble_in(&env, 0, &bin, &[&["status"][..], &server].concat());
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("Connected Nodes: 2/2"), "{status}\nrelay log:\n{}", relay_log());
    env.lab.kill(pid);
}

/// Issue 13, item 4: the annotation `weft.io/l7-visibility: http` on a
/// Service, and no EnvoyConfig written: the agent generates the Service's
/// Envoy config (listed in `/status`), requests are answered through Envoy
/// by both backends, and they show as joined HTTP flows in `weft observe`
/// and in the real `hubble observe` (the same flows) and in Prometheus'
/// HTTP metrics. A user's EnvoyConfig naming the Service then wins (its
/// listener answers; `/status` says `user-config-wins` with the config), and
/// deleting it brings the generated config back. Then the annotation goes: a
/// keep-alive connection opened
/// through Envoy keeps being answered (every request 200, until Envoy
/// closes it gracefully with `connection: close`, or to the end of the
/// bounded loop), and new connections are plain eBPF forwarding again.
#[test]
fn an_annotated_service_is_observed_with_no_envoyconfig_and_goes_plain_when_the_annotation_goes() {
    require_root!();
    let (Some(bin), Some(pki)) = (hubble_binary(), Pki::new("hubble-l7")) else {
        eprintln!("{NO_HUBBLE}");
        return;
    };
    const SEEN: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 40);
    const N: usize = 20;
    let service = |annotated: bool| {
        let mut s = LabService::new("seen", SEEN, 80, &["n2-p1", "n2-p2"]);
        if annotated {
            s.annotations.push(("weft.io/l7-visibility".into(), "http".into()));
        }
        s
    };
    let env = EnvoyLab::new(|lab| lab_objects(lab, &[service(true)]));
    let generated = "EnvoyConfig default/weft:l7:seen";
    let status = env.acked(generated);
    let control = &status["control"];
    let objects: Vec<&str> =
        control["objects"].as_array().unwrap().iter().filter_map(|o| o["object"].as_str()).collect();
    assert_eq!(objects, [generated], "no EnvoyConfig but the generated one: {control:#}");
    assert_eq!(
        control["l7-visibility"]["services"],
        serde_json::json!([{"service": "default/seen", "set-by": "service-annotation", "state": "generated",
                            "config": generated, "ports": [80]}]),
        "{control:#}"
    );
    let prom = Prometheus::start(&env.lab, 0, &env.lab.run_dir.join("prometheus")).unwrap_or_else(|e| env.fail(e));

    // N requests on one keep-alive connection, through Envoy, to both backends.
    let client = env.lab.pod("n1-p1");
    let through_envoy = |r: &weft_tests::http::Response| r.header("x-envoy-upstream-service-time").is_some();
    let mut kept = Client::connect(&client.netns, sa(SEEN, 80), None, T).unwrap_or_else(|e| env.fail(e));
    let mut answered_by = BTreeSet::new();
    for i in 0..N {
        let r = kept.get("seen.default", &format!("/seen/{i}"), &[]).unwrap_or_else(|e| env.fail(e));
        assert_eq!(r.status, 200, "{r:?}");
        assert!(through_envoy(&r), "answered through Envoy: {r:?}");
        answered_by.insert(r.field("name").unwrap_or("?").to_owned());
    }
    assert_eq!(answered_by, BTreeSet::from(["n2-p1".to_owned(), "n2-p2".to_owned()]), "both backends answer");

    // Joined HTTP flows: a request and a response per request, n1-p1 to a backend pod.
    let filter = ["--all", "--protocol", "http", "--http-path", "^/seen/"];
    let weft = wait_for(Duration::from_secs(15), "the HTTP flows", || {
        let r = observe_json(&env.files[0], &filter).ok()?;
        (flows_of(&r).len() >= 2 * N).then_some(r)
    })
    .unwrap_or_else(|e| env.fail(e));
    let flows = flows_of(&weft);
    assert_eq!(flows.len(), 2 * N, "{flows:#?}");
    for f in &flows {
        // Requests go from the client to a backend, responses back (as in Hubble).
        let (client, backend) = match f["l7"]["type"].as_str() {
            Some("REQUEST") => (pod(f, "source"), pod(f, "destination")),
            _ => (pod(f, "destination"), pod(f, "source")),
        };
        assert_eq!(client, "default/n1-p1", "{f:#}");
        assert!(["default/n2-p1", "default/n2-p2"].contains(&backend.as_str()), "{f:#}");
        assert_eq!(f["l7"]["http"]["method"], "GET", "{f:#}");
    }
    let responses = flows.iter().filter(|f| f["l7"]["type"] == "RESPONSE" && f["l7"]["http"]["code"] == 200).count();
    assert_eq!(responses, N, "{flows:#?}");
    let h = Hubble { env: &env, bin, pki: &pki };
    let hubble = h.json(Via::Unix, &filter);
    let hubble: Vec<&Value> = hubble.iter().filter_map(|r| r.get("flow")).collect();
    assert_eq!(uuids(&hubble), uuids(&flows), "hubble observe shows the same flows");
    // Prometheus scraped the same requests.
    for query in [
        "sum(weft_http_requests_total{method=\"GET\",destination_namespace=\"default\"})",
        "sum(weft_http_responses_total{status=\"200\"})",
        "sum(weft_http_request_duration_seconds_count)",
    ] {
        wait_for(Duration::from_secs(15), query, || (prom.value(query).ok().flatten() == Some(N as f64)).then_some(()))
            .unwrap_or_else(|e| env.fail(format!("{e}: {:?}", prom.value(query))));
    }

    drop(kept);

    // A user's EnvoyConfig naming the Service wins: its listener answers
    // (a direct response, no backend), the status says which config serves
    // the Service, and the generated config retires.
    let mine = http_envoy_config("mine", "seen", None)
        .replace("route: {cluster: default/seen}", "direct_response: {status: 200, body: {inline_string: mine}}");
    assert!(mine.contains("direct_response"), "{mine}");
    env.apply(&format!("{}{mine}", lab_objects(&env.lab, &[service(true)])));
    env.acked("EnvoyConfig default/mine");
    let status = wait_status(&env.lab, 0, Duration::from_secs(30), "the user's config winning", |s| {
        s["control"]["l7-visibility"]["services"][0]["state"] == "user-config-wins"
    })
    .unwrap_or_else(|e| env.fail(e));
    assert_eq!(
        status["control"]["l7-visibility"]["services"],
        serde_json::json!([{"service": "default/seen", "set-by": "service-annotation", "state": "user-config-wins",
                            "config": "EnvoyConfig default/mine"}]),
        "{status:#}"
    );
    let (r, _, _) = get_once(&client.netns, sa(SEEN, 80), "/mine", T).unwrap_or_else(|e| env.fail(e));
    assert_eq!((r.status, r.body.as_str()), (200, "mine"), "the user's listener answers: {r:?}");
    // The user's config goes: the generated one is back, and answers from
    // the backends again.
    env.apply(&lab_objects(&env.lab, &[service(true)]));
    env.acked(generated);
    let status = wait_status(&env.lab, 0, Duration::from_secs(30), "the generated config back", |s| {
        s["control"]["l7-visibility"]["services"][0]["state"] == "generated"
    })
    .unwrap_or_else(|e| env.fail(e));
    assert_eq!(status["control"]["l7-visibility"]["services"][0]["config"], generated, "{status:#}");
    let mut kept = Client::connect(&client.netns, sa(SEEN, 80), None, T).unwrap_or_else(|e| env.fail(e));
    let r = kept.get("seen.default", "/back", &[]).unwrap_or_else(|e| env.fail(e));
    assert_eq!(r.status, 200, "{r:?}");
    assert!(through_envoy(&r), "answered through Envoy: {r:?}");
    assert!(["n2-p1", "n2-p2"].contains(&r.field("name").unwrap_or("?")), "a backend answers: {r:?}");

    // The annotation goes: the generated config with it.
    env.apply(&lab_objects(&env.lab, &[service(false)]));
    // Retired: its listener goes, its routes and clusters stay while Envoy
    // drains the listener's connections.
    wait_status(&env.lab, 0, Duration::from_secs(30), "the generated config retiring", |s| {
        let v = &s["control"]["l7-visibility"];
        v["services"].as_array().is_some_and(|v| v.is_empty()) && v["retiring"] == serde_json::json!([generated])
    })
    .unwrap_or_else(|e| env.fail(e));
    // The established connection keeps being answered.
    let (mut on_kept, mut closed) = (0, false);
    for i in 0..30 {
        let r = kept.get("seen.default", &format!("/kept/{i}"), &[]).unwrap_or_else(|e| {
            env.fail(format!("request {i} on the established connection failed after {on_kept} answers: {e}"))
        });
        assert_eq!(r.status, 200, "request {i} on the established connection: {r:?}");
        on_kept += 1;
        if r.header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "after the annotation went: {on_kept} requests answered on the established connection, then closed: {closed}"
    );
    drop(kept);
    // New connections are plain: the backend sees the client itself.
    let (r, _, _) = get_once(&client.netns, sa(SEEN, 80), "/", T).unwrap_or_else(|e| env.fail(e));
    assert_eq!(r.status, 200);
    assert!(!through_envoy(&r), "a new connection still goes through Envoy: {r:?}");
    assert_eq!(r.field("peer").and_then(|p| p.rsplit_once(':')).map(|p| p.0), Some(client.ip.to_string().as_str()));
    // Then the retired config goes for good.
    wait_status(&env.lab, 0, Duration::from_secs(30), "the generated config gone", |s| {
        let c = &s["control"];
        c["objects"].as_array().is_some_and(|o| o.is_empty())
            && c["l7-visibility"]["retiring"].as_array().is_some_and(|v| v.is_empty())
    })
    .unwrap_or_else(|e| env.fail(e));
}
