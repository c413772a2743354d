//! The README's demo (`weft-lab demo SECONDS`): it ends in a live `weft
//! observe` stream of the lab's traffic (plain, through Envoy with HTTP
//! details, and dropped by policy), and stops cleanly after the duration or
//! on Ctrl-C, leaving no namespaces behind. Both of its paths: the objects
//! directory (no `KUBEBUILDER_ASSETS`) and the real control plane (objects
//! applied with kubectl, pods through ptp + weft-cni, `kubectl get
//! envoyconfigs` showing the status the operator wrote).

use std::{
    path::Path,
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use weft_tests::{
    flows::spawn_lines,
    k8s::control_plane::{SKIP_LINE, find_assets},
    objects::workspace_binary,
    require_root,
};

/// The two demos run one after the other: each checks the namespaces it leaves.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The network namespaces of the lab the demo process `pid` made (its one
/// lab's id is the pid in hex then 0, tests/src/lab.rs): namespaces of
/// other tests running meanwhile do not count.
fn lab_namespaces(pid: u32) -> Vec<String> {
    let prefix = format!("weft-{:x}0-", pid & 0xfffff);
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// Starts the demo, on the control plane in `assets` or (None) on an
/// objects directory; its output lines arrive on the returned channel.
fn start(seconds: u32, assets: Option<&Path>) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut cmd = Command::new(workspace_binary("weft-lab"));
    cmd.args(["demo", &seconds.to_string()]);
    match assets {
        Some(dir) => cmd.env("KUBEBUILDER_ASSETS", dir),
        None => cmd.env_remove("KUBEBUILDER_ASSETS"),
    };
    spawn_lines(&mut cmd)
}

/// Runs the demo for a few seconds; its output lines, after checking that
/// it ended well, with the live stream of every kind of flow, and left no
/// namespaces behind.
fn run_briefly(assets: Option<&Path>) -> Vec<String> {
    let (mut child, rx) = start(6, assets);
    let status = wait(&mut child, Duration::from_secs(180));
    let lines: Vec<String> = rx.try_iter().collect();
    let text = lines.join("\n");
    assert!(status.success(), "{status}\n{text}");
    let live = lines.iter().position(|l| l.contains("live: `weft observe --follow")).expect(&text);
    let stream = &lines[live..];
    let has = |pred: &dyn Fn(&str) -> bool| stream.iter().any(|l| pred(l));
    assert!(has(&|l| l.contains("-> default/n2-p1:8080") && l.contains("from-endpoint FORWARDED")), "plain:\n{text}");
    assert!(has(&|l| l.contains("<- default/web:80") && l.contains("to-endpoint FORWARDED")), "plain reply:\n{text}");
    assert!(has(&|l| l.contains("to-proxy REDIRECTED")), "redirect:\n{text}");
    assert!(
        has(&|l| l
            .contains("http-request FORWARDED (HTTP/1.1 GET http://10.96.0.20:80/; conn from-endpoint > to-proxy:")),
        "HTTP through Envoy:\n{text}"
    );
    assert!(has(&|l| l.contains("http-response FORWARDED (HTTP/1.1 200 ")), "HTTP response:\n{text}");
    assert!(
        has(&|l| l.contains("-> default/n1-p2:8080") && l.contains("policy-verdict:none INGRESS DENIED")),
        "{text}"
    );
    assert!(has(&|l| l.contains("<> default/n1-p2:8080") && l.contains("Policy denied DROPPED")), "{text}");
    assert!(lines.last().unwrap().contains("stopping"), "{text}");
    let left = lab_namespaces(child.id());
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
    lines
}

fn wait(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not stop within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Each pod's address came from host-local through the chain, on a veth ptp made.
fn made_through_the_chain(lines: &[String]) {
    let text = lines.join("\n");
    let i = lines.iter().position(|l| l.contains("ptp (host-local) then weft-cni")).unwrap_or_else(|| panic!("{text}"));
    for (pod, ip, node) in [
        ("n1-p1", "10.1.1.11", "node1"),
        ("n1-p2", "10.1.1.12", "node1"),
        ("n2-p1", "10.1.2.11", "node2"),
        ("n2-p2", "10.1.2.12", "node2"),
    ] {
        let line = lines[i + 1..]
            .iter()
            .take(4)
            .find(|l| l.split_whitespace().nth(1) == Some(pod))
            .unwrap_or_else(|| panic!("{pod}:\n{text}"));
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!((f[2], f[4]), (ip, node), "{line}");
        assert!(f[7].starts_with("veth"), "ptp's host side: {line}");
    }
}

#[test]
fn the_demo_ends_in_a_live_stream_and_stops_after_its_duration() {
    require_root!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lines = run_briefly(None);
    assert!(lines.iter().any(|l| l.contains("Kubernetes objects for the agents: ")), "{}", lines.join("\n"));
    made_through_the_chain(&lines);
}

#[test]
fn on_a_real_control_plane_the_demo_applies_with_kubectl_and_makes_its_pods_through_the_cni_chain() {
    require_root!();
    if let Some(reason) = weft_tests::cni::skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let Some(assets) = find_assets() else {
        eprintln!("{SKIP_LINE}");
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let lines = run_briefly(Some(&assets));
    let text = lines.join("\n");
    let after = |marker: &str| -> &[String] {
        let i = lines.iter().position(|l| l.contains(marker)).unwrap_or_else(|| panic!("no {marker:?} in:\n{text}"));
        &lines[i + 1..]
    };
    let applied = after("==> kubectl apply -f ");
    for created in [
        "service/web created",
        "service/hello created",
        "service/hello-v1 created",
        "service/hello-v2 created",
        "envoyconfig.weft.io/hello-split created",
        "networkpolicy.networking.k8s.io/app2-from-nodes-only created",
    ] {
        assert!(applied.iter().take(8).any(|l| l.trim() == created), "{created}:\n{text}");
    }
    made_through_the_chain(&lines);
    // kubectl's view: the EnvoyConfig Valid and Applied (by the operator,
    // from both agents' reports), the Pods Running at the chain's addresses.
    let got = after("==> kubectl get envoyconfigs,services,pods -n default -o wide");
    let config = got
        .iter()
        .find(|l| l.trim_start().starts_with("envoyconfig.weft.io/hello-split "))
        .unwrap_or_else(|| panic!("{text}"));
    assert_eq!(
        config.split_whitespace().skip(1).take(2).collect::<Vec<_>>(),
        ["True", "True"],
        "Valid, Applied: {config}"
    );
    for (pod, ip) in [("n1-p1", "10.1.1.11"), ("n2-p2", "10.1.2.12")] {
        assert!(
            got.iter().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.first() == Some(&format!("pod/{pod}").as_str()) && f.contains(&"Running") && f.contains(&ip)
            }),
            "{pod} Running at {ip}:\n{text}"
        );
    }
    assert!(
        got.iter().any(|l| l.trim_start().starts_with("service/web ")
            && l.contains("10.96.0.10")
            && l.contains("80:30080/TCP")),
        "{text}"
    );
}

#[test]
fn ctrl_c_stops_the_demo_cleanly() {
    require_root!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (mut child, rx) = start(600, None);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut lines = Vec::new();
    // Wait for the live stream to show a flow, then press Ctrl-C.
    loop {
        let l = rx.recv_timeout(Duration::from_secs(1)).unwrap_or_default();
        let streaming = lines.iter().any(|x: &String| x.contains("live: `weft observe")) && l.contains("FORWARDED");
        lines.push(l);
        if streaming {
            break;
        }
        assert!(Instant::now() < deadline && child.try_wait().unwrap().is_none(), "{}", lines.join("\n"));
    }
    // SAFETY: signalling our own child, as a terminal's Ctrl-C would.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = wait(&mut child, Duration::from_secs(60));
    lines.extend(rx.try_iter());
    assert!(status.success(), "{status}\n{}", lines.join("\n"));
    assert!(lines.iter().any(|l| l.contains("stopping")), "{}", lines.join("\n"));
    let left = lab_namespaces(child.id());
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}
