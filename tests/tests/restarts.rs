//! Restarts without loss (issue 18), in the two-node lab with the real
//! Envoy: an Envoy killed under load costs no new connection and its death
//! is seen at once, even when it is an adopted Envoy nobody reaps; HTTP
//! flows Envoy logs while the agent is away reach the flow API after it
//! returns (every entry delivered or counted lost), and `weft observe -f`
//! carries on across the agent's restart without printing a flow twice,
//! also one the next agent reads again; entries a killed Envoy had not
//! written, or could not write at the spool's limit, are counted lost; an
//! Envoy replaced for new settings drains before it stops.
//!
//! The figures under the full load (3,000 requests at 150/s) come
//! from the probe in benches/benches/restarts.rs; these tests assert the
//! properties with a smaller load.

use std::{
    collections::BTreeMap,
    process::Command,
    time::{Duration, Instant},
};

use weft_tests::{
    flows::{HELLO, flow_lab, flow_socket, follow_http, wait_for},
    http::get_once,
    load::{self, Load},
    objects::{agent_status, envoy_requests, start_agent, wait_ready, wait_status, workspace_binary},
    require_root,
    scenario::{T, VIP, sa},
};

/// The tests here measure connections across restarts under load, with
/// clients that give up after T: one at a time, so one test's agent and
/// Envoy starting (seconds of CPU on 2 cores) does not slow another's
/// restarted Envoy past T.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

/// The wall-clock time of an instant (now, or shortly before).
fn now_ns_at(t: Instant) -> u64 {
    now_ns().saturating_sub(t.elapsed().as_nanos() as u64)
}

/// When the process `pidfd` names has exited (unix ns): its pidfd becomes
/// readable once every thread of it is gone, which is what the agent
/// watches for too. Waits up to 10 s.
fn exited_at(pidfd: std::os::fd::OwnedFd) -> u64 {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, 10_000) };
    assert_eq!(n, 1, "the process did not exit");
    now_ns()
}

/// Restarts node1's agent (SIGKILL, then a new one) and waits until it is
/// ready and serves the L7 config again.
fn restart_agent(env: &weft_tests::envoylab::EnvoyLab) -> serde_json::Value {
    env.lab.kill(env.pids[0]);
    start_again(env)
}

fn start_again(env: &weft_tests::envoylab::EnvoyLab) -> serde_json::Value {
    let log = env.lab.run_dir.join("agent0.log");
    let pid = start_agent(&env.lab, 0, &env.files[0], &log).unwrap_or_else(|e| env.fail(e));
    wait_ready(&env.files[0], Duration::from_secs(30), || env.lab.running(pid)).unwrap_or_else(|e| env.fail(e));
    env.acked("EnvoyConfig default/hello-l7")
}

#[test]
fn an_adopted_envoy_killed_under_load_is_restarted_at_once_and_costs_no_new_connection() {
    require_root!();
    let _serial = one_at_a_time();
    // Processes orphaned below this one become its children and stay
    // unreaped until it waits for them: the adopted Envoy, once killed, is
    // a zombie, which a look at /proc/PID would take for a live process.
    // SAFETY: a prctl on this process with integer arguments.
    assert_eq!(unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) }, 0);
    let env = flow_lab("");
    let status = restart_agent(&env);
    assert_eq!(status["envoy"]["adopted"], true, "the running Envoy was adopted: {status:#}");
    assert_eq!(status["datapath"]["proxy-migration"], true, "net.ipv4.tcp_migrate_req set in the node");
    let envoy = status["envoy"]["pid"].as_u64().unwrap() as i32;

    // 400 new connections at 100/s, alternating the plain and the L7
    // Service; Envoy is killed a third of the way in.
    let load = Load {
        ns: env.lab.pod("n1-p1").netns.clone(),
        targets: vec![sa(VIP, 80), sa(HELLO, 80)],
        count: 400,
        rate: 100.0,
        timeout: T,
    };
    let killed = std::cell::Cell::new(None);
    let died = std::cell::RefCell::new(None);
    let at: Vec<(usize, Box<dyn FnOnce()>)> = vec![(
        133,
        Box::new(|| {
            let pidfd = weft_agent::pidfd::open(envoy).unwrap();
            weft_agent::pidfd::signal(&pidfd, libc::SIGKILL).unwrap();
            killed.set(Some(Instant::now()));
            *died.borrow_mut() = Some(std::thread::spawn(move || exited_at(pidfd)));
        }),
    )];
    let run = load.run(at);
    let killed_at = killed.get().unwrap();
    // Envoy is gone once the kernel has ended all its threads, which takes
    // a while after the signal for a process of its size.
    let died_ns = died.take().unwrap().join().unwrap();

    let status = wait_status(&env.lab, 0, Duration::from_secs(10), "the restarted Envoy", |s| {
        s["envoy"]["restarts"].as_u64() >= Some(1) && s["envoy"]["ready"] == true
    })
    .unwrap_or_else(|e| env.fail(e));
    // The zombie was there all along: only now is it reaped.
    assert!(std::path::Path::new(&format!("/proc/{envoy}")).exists(), "the killed Envoy is unreaped");
    // SAFETY: reaping our (adopted) child.
    unsafe { libc::waitpid(envoy, std::ptr::null_mut(), 0) };
    let seen_ns = status["envoy"]["last-exit-at"].as_u64().unwrap();
    let seen = Duration::from_nanos(seen_ns.saturating_sub(died_ns));
    let teardown = Duration::from_nanos(died_ns.saturating_sub(now_ns_at(killed_at)));
    if seen >= Duration::from_millis(100) {
        env.fail(format!("the death was seen {seen:?} after it (the teardown took {teardown:?})"));
    }
    assert_ne!(status["envoy"]["pid"].as_u64().unwrap() as i32, envoy);

    let plain = load::tally(&run.requests, 0);
    assert_eq!(plain.ok, plain.sent, "the plain Service never stops: {plain:?}");
    // Requests Envoy may have held (those that started before all its
    // threads were gone) may fail: counted. None that started after.
    let gone = Duration::from_nanos(died_ns.saturating_sub(now_ns_at(run.t0)));
    let (before, after): (Vec<_>, Vec<_>) = run.requests.iter().filter(|r| r.target == 1).partition(|r| r.at < gone);
    let failed_after: Vec<_> = after.iter().filter(|r| !r.ok()).collect();
    let in_flight = before.iter().filter(|r| !r.ok()).count();
    let l7 = load::tally(&run.requests, 1);
    eprintln!(
        "L7: {l7:?}; {in_flight} failed in flight at the kill; teardown {teardown:?}, death seen {seen:?} after (killed at {:?})",
        killed_at.duration_since(run.t0)
    );
    assert!(failed_after.is_empty(), "new L7 connections failed after Envoy was gone: {failed_after:?}");
}

#[test]
fn an_envoy_replaced_for_new_settings_drains_before_it_stops() {
    require_root!();
    let _serial = one_at_a_time();
    let env = flow_lab("");
    let client = env.lab.pod("n1-p1");
    let status = weft_tests::objects::agent_status(&env.lab, 0).unwrap_or_else(|e| env.fail(e));
    let old = status["envoy"]["pid"].as_u64().unwrap();
    // A kept-alive connection through the old Envoy.
    let mut kept =
        weft_tests::http::Client::connect(&client.netns, sa(HELLO, 80), None, T).unwrap_or_else(|e| env.fail(e));
    let r = kept.get("hello.default", "/before", &[]).unwrap_or_else(|e| env.fail(e));
    assert_eq!((r.status, r.header("connection")), (200, None), "{r:?}");

    // The agent comes back with another Envoy setting: its bootstrap differs,
    // so the running Envoy is replaced, draining first.
    env.lab.kill(env.pids[0]);
    let mut cfg = std::fs::read_to_string(&env.files[0].config).unwrap();
    cfg.push_str("envoy:\n  concurrency: 1\n");
    std::fs::write(&env.files[0].config, cfg).unwrap();
    let log = env.lab.run_dir.join("agent0.log");
    let pid = start_agent(&env.lab, 0, &env.files[0], &log).unwrap_or_else(|e| env.fail(e));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("Envoy is draining") {
        assert!(Instant::now() < deadline, "the agent never drained the old Envoy");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The drain goes on while the kept connection is open (up to 5 s):
    // a request on it meanwhile is answered by the old Envoy, with the
    // connection closed after it (not reset).
    let state = std::fs::read_to_string(format!("/proc/{old}/stat")).unwrap_or_default();
    let state = state.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
    assert!(matches!(state, Some('R' | 'S' | 'D')), "the old Envoy drains, it is not stopped yet ({state:?})");
    let r = kept.get("hello.default", "/draining", &[]).unwrap_or_else(|e| env.fail(e));
    assert_eq!((r.status, r.header("connection")), (200, Some("close")), "{r:?}");
    // The client closes as told, and so does Envoy: an end, not a reset.
    kept.close_write()
        .and_then(|()| kept.wait_closed())
        .unwrap_or_else(|e| env.fail(format!("the drained connection ended with {e}, not a close")));
    drop(kept);

    // New connections while the old Envoy drains and exits and the new one
    // starts. Those that arrive after the old one stopped accepting wait in
    // the datapath's copies until the new one listens, which takes seconds
    // on a loaded machine (Envoy's start, ADS, its listeners): the clients
    // wait longer than T for that.
    let load = Load {
        ns: client.netns.clone(),
        targets: vec![sa(VIP, 80), sa(HELLO, 80)],
        count: 300,
        rate: 100.0,
        timeout: Duration::from_secs(15),
    };
    eprintln!("load from {:?}", std::time::SystemTime::now());
    let run = load.run(Vec::new());
    wait_ready(&env.files[0], Duration::from_secs(30), || env.lab.running(pid)).unwrap_or_else(|e| env.fail(e));
    let status = env.acked("EnvoyConfig default/hello-l7");
    assert_ne!(status["envoy"]["pid"].as_u64().unwrap(), old, "a new Envoy: {status:#}");
    assert_eq!(status["envoy"]["adopted"], false);
    let agent_log = std::fs::read_to_string(&log).unwrap_or_default();
    for l in agent_log.lines().filter(|l| l.contains("Envoy") || l.contains("proxy")) {
        eprintln!("{l}");
    }
    // It was drained only once the datapath held its sockets.
    assert!(!agent_log.contains("holds no copy"), "the drain did not wait for the datapath's copies");
    for r in run.requests.iter().filter(|r| !r.ok()) {
        eprintln!("failed: {r:?}");
    }
    let (plain, l7) = (load::tally(&run.requests, 0), load::tally(&run.requests, 1));
    let longest = run.requests.iter().filter(|r| r.target == 1).map(|r| r.took).max().unwrap_or_default();
    eprintln!("plain {plain:?}; L7 {l7:?}; the longest L7 request took {longest:?}");
    assert_eq!(plain.ok, plain.sent, "{plain:?}");
    // The old Envoy stops accepting before its SIGTERM and finishes what it
    // accepted; what arrives meanwhile waits for the new one: nothing fails.
    assert_eq!(l7.ok, l7.sent, "every L7 request across the replacement is answered: {l7:?}");
}

#[test]
fn an_upgraded_envoy_binary_is_replaced_not_adopted_and_the_same_one_is_adopted() {
    require_root!();
    let _serial = one_at_a_time();
    let env = flow_lab("");
    let client = env.lab.pod("n1-p1");
    // The binary the agent is told to run: a script that runs the lab's
    // Envoy binary through a link of it in the run directory, so
    // "upgrading" it is writing a new script in its place, and replacing
    // the binary it runs is making that link again.
    let pid_of = |s: &serde_json::Value| s["envoy"]["pid"].as_u64().unwrap();
    let first = pid_of(&agent_status(&env.lab, 0).unwrap_or_else(|e| env.fail(e)));
    let real = std::fs::read_link(format!("/proc/{first}/exe")).unwrap();
    let inner = env.lab.run_dir.join("envoy-inner");
    let link_inner = || {
        let _ = std::fs::remove_file(&inner);
        if std::fs::hard_link(&real, &inner).is_err() {
            std::fs::copy(&real, &inner).unwrap();
        }
    };
    link_inner();
    let binary = env.lab.run_dir.join("envoy-upgraded");
    let install = |build: u32| {
        let next = env.lab.run_dir.join("envoy-upgraded.new");
        std::fs::write(&next, format!("#!/bin/sh\n# build {build}\nexec '{}' \"$@\"\n", inner.display())).unwrap();
        std::fs::set_permissions(&next, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        std::fs::rename(&next, &binary).unwrap();
    };
    let log = env.lab.run_dir.join("agent0.log");
    let replacements = || std::fs::read_to_string(&log).unwrap_or_default().matches("(its binary differs)").count();
    let served = |what: &str| {
        let (r, _, _) = get_once(&client.netns, sa(HELLO, 80), "/after", T).unwrap_or_else(|e| env.fail(e));
        assert_eq!(r.status, 200, "{what}: {r:?}");
        assert!(r.header("x-envoy-upstream-service-time").is_some(), "{what}: answered through Envoy: {r:?}");
    };
    let agent = std::cell::Cell::new(env.pids[0]);
    let restart_agent = |env: &weft_tests::envoylab::EnvoyLab| {
        env.lab.kill(agent.get());
        let pid = start_agent(&env.lab, 0, &env.files[0], &log).unwrap_or_else(|e| env.fail(e));
        agent.set(pid);
        wait_ready(&env.files[0], Duration::from_secs(30), || env.lab.running(pid)).unwrap_or_else(|e| env.fail(e));
        env.acked("EnvoyConfig default/hello-l7")
    };

    // Another binary (another path): the running Envoy is replaced.
    install(1);
    let mut cfg = std::fs::read_to_string(&env.files[0].config).unwrap();
    cfg.push_str(&format!("envoy:\n  binary: {}\n", binary.display()));
    std::fs::write(&env.files[0].config, cfg).unwrap();
    let before = replacements();
    let status = restart_agent(&env);
    assert_eq!(replacements(), before + 1, "replaced for its binary");
    assert_eq!(status["envoy"]["adopted"], false, "{status:#}");
    let second = pid_of(&status);
    assert_ne!(second, first);
    served("the new binary's Envoy");

    // The same binary again: adopted.
    let status = restart_agent(&env);
    assert_eq!(status["envoy"]["adopted"], true, "the same binary is adopted: {status:#}");
    assert_eq!(pid_of(&status), second);
    assert_eq!(replacements(), before + 1);

    // An upgrade in place (a new file at the same path, the same size):
    // replaced again, drained first.
    install(2);
    let status = restart_agent(&env);
    assert_eq!(replacements(), before + 2, "replaced for its upgraded binary");
    assert_eq!(status["envoy"]["adopted"], false, "{status:#}");
    assert_ne!(pid_of(&status), second);
    assert!(std::fs::read_to_string(&log).unwrap_or_default().contains("Envoy is draining"), "drained, not cut");
    served("the upgraded Envoy");

    // The binary the script runs replaced under the running Envoy (the
    // script, which the bootstrap names, unchanged): its exe is "(deleted)",
    // so it is replaced too.
    let third = pid_of(&status);
    link_inner();
    let status = restart_agent(&env);
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log_text.contains("(the binary it runs was replaced on disk)"), "replaced for its replaced binary");
    assert_eq!(replacements(), before + 2, "not for the script");
    assert_eq!(status["envoy"]["adopted"], false, "{status:#}");
    assert_ne!(pid_of(&status), third);
    served("the Envoy of the replaced binary");
}

#[test]
fn http_flows_logged_while_the_agent_is_away_reach_a_follower_that_carries_on() {
    require_root!();
    let _serial = one_at_a_time();
    let env = flow_lab("");
    let (follower, lines, follower_err) = follow_http(&env);
    // One request the follower must print first: then it is streaming.
    follower_streams(&env, &lines);
    let sent_before = envoy_requests(&env.lab, 0).unwrap_or_else(|e| env.fail(e));

    // 150 new L7 connections at 50/s; the agent is killed after 40 and
    // started again after 100, so Envoy logs 60 while it is away.
    let load = Load {
        ns: env.lab.pod("n1-p1").netns.clone(),
        targets: vec![sa(HELLO, 80)],
        count: 150,
        rate: 50.0,
        timeout: T,
    };
    let at: Vec<(usize, Box<dyn FnOnce()>)> = vec![
        (40, Box::new(|| env.lab.kill(env.pids[0]))),
        (
            100,
            Box::new(|| {
                start_agent(&env.lab, 0, &env.files[0], &env.lab.run_dir.join("agent0.log")).unwrap();
            }),
        ),
    ];
    let run = load.run(at);
    let l7 = load::tally(&run.requests, 0);
    assert_eq!(l7.ok, l7.sent, "the agent's restart costs no L7 request: {l7:?}");
    wait_ready(&env.files[0], Duration::from_secs(30), || true).unwrap_or_else(|e| env.fail(e));

    // The follower prints each request's flows (request and response) once,
    // across the restart.
    let mut printed: BTreeMap<(String, String), usize> = BTreeMap::new();
    let got = wait_for(Duration::from_secs(20), "every request's HTTP flow at the follower", || {
        take_printed(&lines, &mut printed);
        (printed.len() >= 2 * l7.sent).then_some(())
    });
    drop(follower);
    let err = std::fs::read_to_string(&follower_err).unwrap_or_default();
    if let Err(e) = got {
        let missing: Vec<_> =
            (0..l7.sent).map(load::path).filter(|p| printed.keys().filter(|(q, _)| q == p).count() < 2).collect();
        env.fail(format!("{e}: missing {missing:?}; follower stderr:\n{err}"));
    }
    let twice: Vec<_> = printed.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "printed more than once: {twice:?}");
    assert!(err.contains("reconnecting") && err.contains("the agent restarted"), "a notice of the gap: {err}");

    // Every entry Envoy logged was delivered or counted lost; here none is lost.
    let sent = envoy_requests(&env.lab, 0).unwrap_or_else(|e| env.fail(e)) - sent_before;
    assert_eq!(sent, l7.sent as u64, "Envoy logged an entry per request");
    // The spool's count, across both agents (the reader commits a second
    // after the flows are stored).
    let status = wait_status(&env.lab, 0, Duration::from_secs(20), "every entry committed", |s| {
        s["flows"]["access-log-committed"].as_u64() == Some(sent_before + sent)
    })
    .unwrap_or_else(|e| env.fail(e));
    let lost = status["flows"]["lost"]["proxy"].as_u64().unwrap();
    let received = printed.keys().filter(|(_, kind)| kind == "RESPONSE").count() as u64;
    assert_eq!(received + lost, sent, "received + lost = what Envoy sent: {:#}", status["flows"]);
    assert_eq!(lost, 0);
    // The kernel's counters are the datapath's (older than this agent);
    // `weft status` says which count since when.
    let mut cmd = Command::new(workspace_binary("weft"));
    cmd.args(["status", "--server", &flow_socket(&env.files[0])]);
    let out = env.lab.run(&env.lab.node(0).netns, None, &mut cmd, Duration::from_secs(10)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Agent started:") && text.contains("since the datapath was loaded"), "{text}");
}

/// Takes the follower's lines so far into `printed`: how often each
/// request (its path from `/load/`, without the query) was printed, per
/// flow type (REQUEST, RESPONSE).
fn take_printed(lines: &std::sync::mpsc::Receiver<String>, printed: &mut BTreeMap<(String, String), usize>) {
    while let Ok(l) = lines.try_recv() {
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        let l7 = &v["flow"]["l7"];
        if let Some(url) = l7["http"]["url"].as_str()
            && let Some(p) = url.rfind("/load/")
        {
            let path = url[p..].split('?').next().unwrap_or_default().to_owned();
            let kind = l7["type"].as_str().unwrap_or("?").to_owned();
            *printed.entry((path, kind)).or_default() += 1;
        }
    }
}

/// Waits until `weft observe -f` prints its first flow: then it streams.
fn follower_streams(env: &weft_tests::envoylab::EnvoyLab, lines: &std::sync::mpsc::Receiver<String>) {
    follower_streams_flushing(env, lines, || {});
}

/// [`follower_streams`], calling `flush` after each request (for an Envoy
/// that does not write its access log by itself soon).
fn follower_streams_flushing(
    env: &weft_tests::envoylab::EnvoyLab,
    lines: &std::sync::mpsc::Receiver<String>,
    flush: impl Fn(),
) {
    let client = env.lab.pod("n1-p1");
    wait_for(Duration::from_secs(20), "the follower's first flow", || {
        get_once(&client.netns, sa(HELLO, 80), "/warm-up", T).unwrap_or_else(|e| env.fail(e));
        flush();
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if lines.recv_timeout(left).is_ok_and(|l| l.contains("/warm-up")) {
                return Some(());
            }
        }
        None
    })
    .unwrap_or_else(|e| env.fail(e));
}

#[test]
fn entries_envoy_cannot_write_at_the_spool_limit_are_counted_lost_and_the_spool_stays_bounded() {
    require_root!();
    let _serial = one_at_a_time();
    // The smallest limit: 1 MiB. The agent moves the file aside at half of
    // it while it runs; while it is away, Envoy's file stops at the limit.
    const LIMIT: u64 = 1 << 20;
    let env = flow_lab(&format!("envoy:\n  spool-limit: {LIMIT}\n"));
    let (follower, lines, follower_err) = follow_http(&env);
    follower_streams(&env, &lines);
    let sent_before = envoy_requests(&env.lab, 0).unwrap_or_else(|e| env.fail(e));
    let client = env.lab.pod("n1-p1");
    // Requests with a 4 KiB query: each entry is ~4.5 KiB, so ~230 fill
    // the file.
    let pad = "x".repeat(4096);
    let send = |range: std::ops::Range<usize>| {
        for i in range {
            let path = format!("{}?{pad}", load::path(i));
            let (r, _, _) = get_once(&client.netns, sa(HELLO, 80), &path, T).unwrap_or_else(|e| env.fail(e));
            assert_eq!(r.status, 200, "{r:?}");
        }
    };
    let mut printed = BTreeMap::new();
    let received = |printed: &BTreeMap<(String, String), usize>| {
        printed.keys().filter(|(_, kind)| kind == "RESPONSE").count() as u64
    };
    // 60 while the agent runs, all printed before it is killed (a flow the
    // agent stored but had not streamed when it died is the follower's
    // gap, which it reports: not what this test counts).
    send(0..60);
    wait_for(Duration::from_secs(20), "the first 60 at the follower", || {
        take_printed(&lines, &mut printed);
        (received(&printed) == 60).then_some(())
    })
    .unwrap_or_else(|e| env.fail(e));
    env.lab.kill(env.pids[0]);
    send(60..460);
    // Envoy flushes every 100 ms: let it try to write the last ones.
    std::thread::sleep(Duration::from_millis(300));
    let current = env.files[0].state_dir.join("access-log/current.log");
    let size = std::fs::metadata(&current).map(|m| m.len()).unwrap_or(0);
    let spool_bytes: u64 = std::fs::read_dir(current.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(size <= LIMIT, "the file Envoy writes stays within the limit: {size}");
    assert!(spool_bytes <= 2 * LIMIT, "the spool stays within twice the limit: {spool_bytes}");
    eprintln!("while the agent was away: current.log {size} bytes, the spool {spool_bytes} bytes");
    start_again(&env);

    let sent = envoy_requests(&env.lab, 0).unwrap_or_else(|e| env.fail(e)) - sent_before;
    assert_eq!(sent, 460, "Envoy served each request");
    let settled = wait_for(Duration::from_secs(30), "received + lost = what Envoy served", || {
        take_printed(&lines, &mut printed);
        let (received, lost) = (received(&printed), lost_now(&env));
        (received + lost == sent && lost > 0).then_some(())
    });
    let (got, lost) = (received(&printed), lost_now(&env));
    let err = std::fs::read_to_string(&follower_err).unwrap_or_default();
    let missing: Vec<_> = (0..460)
        .map(load::path)
        .filter(|p| !printed.contains_key(&(p.clone(), "RESPONSE".to_owned())))
        .collect::<Vec<_>>();
    eprintln!(
        "Envoy served {sent}: {got} received, {lost} counted lost (missing {missing:?}); follower stderr:\n{err}"
    );
    settled.unwrap_or_else(|e| env.fail(e));
    assert!(got > 60 && lost > 60, "some entries were written and some were not: {got} received, {lost} lost");
    let twice: Vec<_> = printed.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "printed more than once: {twice:?}");
    let status = agent_status(&env.lab, 0).unwrap_or_else(|e| env.fail(e));
    // The entry Envoy wrote only part of at the limit is a line the reader
    // counts lost (cut short); the others it never wrote, which the
    // supervisor counts.
    assert_eq!(status["envoy"]["entries-unwritten"].as_u64(), Some(lost - 1), "{:#}", status["envoy"]);

    // The agent moved the full file aside: Envoy writes again, every entry
    // arrives, and nothing more is counted lost.
    send(1000..1020);
    wait_for(Duration::from_secs(20), "the entries after the full file", || {
        take_printed(&lines, &mut printed);
        (received(&printed) == got + 20).then_some(())
    })
    .unwrap_or_else(|e| env.fail(e));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lost_now(&env), lost, "nothing more lost");
    drop(follower);
}

/// Entries node1's agent counted lost with source `proxy` since it started.
fn lost_now(env: &weft_tests::envoylab::EnvoyLab) -> u64 {
    agent_status(&env.lab, 0).unwrap_or_else(|e| env.fail(e))["flows"]["lost"]["proxy"].as_u64().unwrap()
}

/// The running Envoy of node1, as its agent reports it: pid and restarts.
fn running_envoy(env: &weft_tests::envoylab::EnvoyLab) -> (i32, u64) {
    let status = agent_status(&env.lab, 0).unwrap_or_else(|e| env.fail(e));
    let pid = status["envoy"]["pid"].as_u64().and_then(|p| i32::try_from(p).ok());
    let pid = pid.unwrap_or_else(|| env.fail(format!("no Envoy pid: {:#}", status["envoy"])));
    (pid, status["envoy"]["restarts"].as_u64().unwrap_or(0))
}

fn signal(pid: i32, sig: libc::c_int) {
    let pidfd = weft_agent::pidfd::open(pid).unwrap();
    weft_agent::pidfd::signal(&pidfd, sig).unwrap();
}

/// The complete lines in node1's access-log spool (every segment) whose
/// path is one of `paths`.
fn spooled(env: &weft_tests::envoylab::EnvoyLab, paths: &[String]) -> usize {
    let dir = env.files[0].state_dir.join("access-log");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap().filter_map(Result::ok) {
        let text = String::from_utf8_lossy(&std::fs::read(e.path()).unwrap_or_default()).into_owned();
        // The last piece is a line not finished yet (or nothing).
        let complete = text.rsplit_once('\n').map_or("", |(done, _)| done);
        n += complete
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["path"].as_str().is_some_and(|p| paths.iter().any(|q| q == p)))
            .count();
    }
    n
}

#[test]
fn entries_a_killed_envoy_had_not_written_are_counted_lost() {
    require_root!();
    let _serial = one_at_a_time();
    // Envoy writes its access-log buffer every ten minutes here, or once
    // 64 KiB wait, or when told to reopen its log (SIGUSR1): the entries of
    // the few small requests below wait in its memory until the test has it
    // write them, or kills it.
    let env = flow_lab(&format!("envoy:\n  access-log-flush-ms: {}\n", weft_agent::config::MAX_ACCESS_LOG_FLUSH_MS));
    let (follower, lines, follower_err) = follow_http(&env);
    follower_streams_flushing(&env, &lines, || signal(running_envoy(&env).0, libc::SIGUSR1));
    let client = env.lab.pod("n1-p1");
    let lost_before = lost_now(&env);
    let mut printed = BTreeMap::new();
    let received =
        |printed: &BTreeMap<(String, String), usize>| printed.keys().filter(|(_, kind)| kind == "RESPONSE").count();
    // HTTP traffic through the node's Envoy: 10 requests on a kept-alive
    // connection (left open: the kill cuts it) and 10 new connections.
    let traffic = |from: usize| -> (Vec<String>, weft_tests::http::Client) {
        let mut kept =
            weft_tests::http::Client::connect(&client.netns, sa(HELLO, 80), None, T).unwrap_or_else(|e| env.fail(e));
        let paths: Vec<String> = (from..from + 20).map(load::path).collect();
        for p in &paths[..10] {
            let r = kept.get("hello.default", p, &[]).unwrap_or_else(|e| env.fail(e));
            assert_eq!(r.status, 200, "{r:?}");
        }
        for p in &paths[10..] {
            let (r, _, _) = get_once(&client.netns, sa(HELLO, 80), p, T).unwrap_or_else(|e| env.fail(e));
            assert_eq!(r.status, 200, "{r:?}");
        }
        (paths, kept)
    };

    // A kill counts what the agent last read Envoy had served minus what
    // it wrote. Here the agent has read every request before the kill
    // (nothing is served after that reading), so the count is exact. A round
    // where Envoy's ten-minute timer wrote everything before the kill
    // counts nothing and proves nothing: another round then (at most 3).
    let mut sent = 0;
    let mut unwritten_total = 0;
    for round in 1..=3u64 {
        let (envoy, restarts) = running_envoy(&env);
        let served_before = envoy_requests(&env.lab, 0).unwrap_or_else(|e| env.fail(e));
        let (paths, kept) = traffic(round as usize * 100);
        sent += paths.len();
        let served = envoy_requests(&env.lab, 0).unwrap_or_else(|e| env.fail(e));
        assert_eq!(served - served_before, paths.len() as u64, "Envoy served each request");
        wait_status(&env.lab, 0, Duration::from_secs(20), "the agent's reading of Envoy's count", |s| {
            s["envoy"]["requests-served"].as_u64() == Some(served)
        })
        .unwrap_or_else(|e| env.fail(e));
        // Stopped, Envoy writes nothing more: what the spool holds of this
        // round is all it will ever hold.
        signal(envoy, libc::SIGSTOP);
        let written = spooled(&env, &paths);
        signal(envoy, libc::SIGKILL);
        drop(kept);
        let unwritten = paths.len() - written;
        unwritten_total += unwritten;
        wait_status(&env.lab, 0, Duration::from_secs(30), "the restarted Envoy", |s| {
            s["envoy"]["restarts"].as_u64() > Some(restarts) && s["envoy"]["ready"] == true
        })
        .unwrap_or_else(|e| env.fail(e));
        env.acked("EnvoyConfig default/hello-l7");

        let settled = wait_for(Duration::from_secs(30), "received + lost = what Envoy served", || {
            take_printed(&lines, &mut printed);
            let lost = (lost_now(&env) - lost_before) as usize;
            (received(&printed) + lost == sent && lost == unwritten_total).then_some(())
        });
        let (got, lost) = (received(&printed), lost_now(&env) - lost_before);
        eprintln!(
            "round {round}: Envoy served {sent} in all, {unwritten} of this round's {} unwritten at the kill: {got} received, {lost} counted lost",
            paths.len()
        );
        if let Err(e) = settled {
            let err = std::fs::read_to_string(&follower_err).unwrap_or_default();
            env.fail(format!(
                "{e}: {got} received + {lost} lost, want {sent} with {unwritten_total} lost; follower stderr:\n{err}"
            ));
        }
        if unwritten > 0 {
            break;
        }
    }
    assert!(unwritten_total > 0, "Envoy wrote every entry before each kill: nothing was tested");

    // The next Envoy's entries arrive, and nothing more is counted lost.
    let (paths, kept) = traffic(1000);
    drop(kept);
    sent += paths.len();
    signal(running_envoy(&env).0, libc::SIGUSR1);
    wait_for(Duration::from_secs(20), "the next Envoy's entries", || {
        take_printed(&lines, &mut printed);
        (received(&printed) + unwritten_total == sent).then_some(())
    })
    .unwrap_or_else(|e| env.fail(e));
    assert_eq!((lost_now(&env) - lost_before) as usize, unwritten_total, "nothing more lost");
    drop(follower);
    let twice: Vec<_> = printed.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "printed more than once: {twice:?}");
}

/// Moves node1's spool position back over the last `n` lines of
/// `current.log`, as an agent killed after it stored and sent their flows
/// but before it saved its place leaves it (the reader commits a batch once
/// the pipeline has stored it: a short window, which this makes certain).
fn rewind_spool(env: &weft_tests::envoylab::EnvoyLab, n: u64) {
    let dir = env.files[0].state_dir.join("access-log");
    let text = std::fs::read(dir.join("current.log")).unwrap();
    let position = std::fs::read_to_string(dir.join("position")).unwrap();
    let mut p: Vec<u64> = position.split_whitespace().map(|f| f.parse().unwrap()).collect();
    assert_eq!((p.len(), p[1]), (7, text.len() as u64), "the agent had read all of current.log: {position}");
    // The start of the n-th line from the end.
    let ends: Vec<usize> = text.iter().enumerate().filter(|(_, b)| **b == b'\n').map(|(i, _)| i + 1).collect();
    let n_usize = n as usize;
    assert!(ends.len() > n_usize, "current.log has more than {n} lines");
    p[1] = ends[ends.len() - n_usize - 1] as u64;
    // In all, and the current Envoy's.
    p[2] -= n;
    p[4] -= n;
    let s: Vec<String> = p.iter().map(|v| format!("{v:020}")).collect();
    std::fs::write(dir.join("position"), format!("{}\n", s.join(" "))).unwrap();
}

#[test]
fn http_flows_a_restarted_agent_reads_again_are_printed_once() {
    require_root!();
    let _serial = one_at_a_time();
    let env = flow_lab("");
    let (follower, lines, follower_err) = follow_http(&env);
    follower_streams(&env, &lines);
    let client = env.lab.pod("n1-p1");
    let send = |range: std::ops::Range<usize>| {
        for i in range {
            let (r, _, _) = get_once(&client.netns, sa(HELLO, 80), &load::path(i), T).unwrap_or_else(|e| env.fail(e));
            assert_eq!(r.status, 200, "{r:?}");
        }
    };
    let mut printed = BTreeMap::new();
    let all_printed = |printed: &mut BTreeMap<(String, String), usize>, n: usize, what: &str| {
        wait_for(Duration::from_secs(20), what, || {
            take_printed(&lines, printed);
            (printed.len() >= 2 * n).then_some(())
        })
        .unwrap_or_else(|e| env.fail(e));
    };
    send(0..10);
    all_printed(&mut printed, 10, "the first 10 requests' flows at the follower");
    // The reader commits a second after the flows are stored: wait for it.
    let served = envoy_requests(&env.lab, 0).unwrap_or_else(|e| env.fail(e));
    let committed = wait_status(&env.lab, 0, Duration::from_secs(20), "every entry committed", |s| {
        s["flows"]["access-log-committed"].as_u64() == Some(served)
    })
    .unwrap_or_else(|e| env.fail(e))["flows"]["access-log-committed"]
        .as_u64()
        .unwrap();

    // The agent is killed after it sent the last 5 requests' flows but
    // before it saved its place past them: the next agent reads them again,
    // and the kernel's records of their connections went to the first.
    env.lab.kill(env.pids[0]);
    rewind_spool(&env, 5);
    start_again(&env);
    send(10..20);
    all_printed(&mut printed, 20, "every request's flows at the follower");
    let status = wait_status(&env.lab, 0, Duration::from_secs(20), "the spool read again and on", |s| {
        s["flows"]["access-log-committed"].as_u64() == Some(committed + 10)
    })
    .unwrap_or_else(|e| env.fail(e));
    assert_eq!(status["flows"]["lost"]["proxy"].as_u64(), Some(0), "{:#}", status["flows"]);
    // The new agent holds the 5 it read again (so the follower was sent them
    // again), among the flows it sent the follower after its restart.
    let again: Vec<String> = weft_tests::flows::observe_json(&env.files[0], &["--all", "--protocol", "http"])
        .unwrap_or_else(|e| env.fail(e))
        .iter()
        .filter_map(|r| r["flow"]["l7"]["http"]["url"].as_str().map(str::to_owned))
        .filter(|u| (5..10).any(|i| u.ends_with(&load::path(i))))
        .collect();
    assert_eq!(again.len(), 10, "the restarted agent read the last 5 entries again: {again:?}");
    take_printed(&lines, &mut printed);
    drop(follower);
    let err = std::fs::read_to_string(&follower_err).unwrap_or_default();
    assert!(err.contains("the agent restarted"), "the follower reconnected to the new agent: {err}");
    let twice: Vec<_> = printed.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "printed more than once: {twice:?}; follower stderr:\n{err}");
}
