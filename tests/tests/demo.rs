//! The README's demo (`weft-lab demo SECONDS`): it ends in a live `weft
//! observe` stream of the lab's traffic (plain, through Envoy with HTTP
//! details, and dropped by policy), and stops cleanly after the duration or
//! on Ctrl-C, leaving no namespaces behind.

use std::{
    process::Command,
    sync::mpsc,
    time::{Duration, Instant},
};

use weft_tests::{flows::spawn_lines, objects::workspace_binary, require_root};

/// The two demos run one after the other: each checks the namespaces it leaves.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn lab_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().map(|l| l.split_whitespace().next().unwrap_or("").to_owned()).collect()
}

/// Starts the demo; its output lines arrive on the returned channel.
fn start(seconds: u32) -> (std::process::Child, mpsc::Receiver<String>) {
    spawn_lines(Command::new(workspace_binary("weft-lab")).args(["demo", &seconds.to_string()]))
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

#[test]
fn the_demo_ends_in_a_live_stream_and_stops_after_its_duration() {
    require_root!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = lab_namespaces();
    let (mut child, rx) = start(6);
    let status = wait(&mut child, Duration::from_secs(120));
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
    let after = lab_namespaces();
    assert!(after.iter().all(|n| before.contains(n)), "namespaces left behind: {after:?}");
}

#[test]
fn ctrl_c_stops_the_demo_cleanly() {
    require_root!();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let before = lab_namespaces();
    let (mut child, rx) = start(600);
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
    let after = lab_namespaces();
    assert!(after.iter().all(|n| before.contains(n)), "namespaces left behind: {after:?}");
}
