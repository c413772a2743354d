//! The agent as a process on the lab (issue: datapath): it loads the objects
//! directory, programs the datapath, and can be killed and restarted without
//! breaking connections.

use std::time::Duration;

use weft_tests::{
    flows::{agent_get, metric_sum},
    http::{Client, HttpServer, ServerOpts, get_once},
    lab::Lab,
    objects::{LabService, agent_files, lab_objects, start_agent, wait_ready, wait_status, write_atomic},
    require_root,
    scenario::{T, VIP, sa},
};

/// Also the agent without weft-cni (no `cni-socket`): it finds the pods'
/// veths (ptp's) by the routes to their addresses.
#[test]
fn connections_survive_an_agent_restart() {
    require_root!();
    let lab = Lab::new().unwrap();
    let backend = lab.pod("n2-p1");
    let _server = HttpServer::start(
        &backend.netns,
        sa(backend.ip, 8080),
        ServerOpts { name: "n2-p1".into(), ..Default::default() },
    )
    .unwrap();
    let files: Vec<_> = (0..2).map(|i| agent_files(&lab, i, "").unwrap().without_cni_socket().unwrap()).collect();
    write_atomic(
        &files[0].objects_dir.join("lab.yaml"),
        &lab_objects(&lab, &[LabService::new("web", VIP, 80, &["n2-p1"])]),
    )
    .unwrap();
    let logs: Vec<_> = (0..2).map(|i| lab.run_dir.join(format!("agent{i}.log"))).collect();
    let mut pids: Vec<u32> = (0..2).map(|i| start_agent(&lab, i, &files[i], &logs[i]).unwrap()).collect();
    for (i, f) in files.iter().enumerate() {
        wait_ready(f, Duration::from_secs(20), || lab.running(pids[i]))
            .unwrap_or_else(|e| panic!("{e}: {}", std::fs::read_to_string(&logs[i]).unwrap_or_default()));
    }

    let client = lab.pod("n1-p1");
    let mut long_lived = Client::connect(&client.netns, sa(VIP, 80), None, T).unwrap();
    assert_eq!(long_lived.get("web", "/", &[]).unwrap().field("name"), Some("n2-p1"));

    for pid in &pids {
        lab.kill(*pid);
    }
    // No agent: the pinned programs and maps keep working.
    for _ in 0..5 {
        assert_eq!(long_lived.get("web", "/", &[]).unwrap().status, 200, "open connection while the agent is down");
    }
    let (resp, _, _) = get_once(&client.netns, sa(VIP, 80), "/", T).expect("new connection while the agent is down");
    assert_eq!(resp.status, 200);

    pids = (0..2).map(|i| start_agent(&lab, i, &files[i], &logs[i]).unwrap()).collect();
    for (i, f) in files.iter().enumerate() {
        wait_ready(f, Duration::from_secs(20), || lab.running(pids[i])).unwrap();
    }
    for _ in 0..5 {
        assert_eq!(long_lived.get("web", "/", &[]).unwrap().status, 200, "open connection after the restart");
    }
    let (resp, _, peer) = get_once(&client.netns, sa(VIP, 80), "/", T).expect("new connection after the restart");
    assert_eq!(resp.field("name"), Some("n2-p1"));
    assert_eq!(peer, sa(VIP, 80));
    assert!(pids.iter().all(|p| lab.running(*p)), "agents still running");
}

#[test]
fn edits_to_the_objects_directory_take_effect() {
    require_root!();
    let lab = Lab::new().unwrap();
    let backend = lab.pod("n1-p2");
    let _server = HttpServer::start(
        &backend.netns,
        sa(backend.ip, 8080),
        ServerOpts { name: "n1-p2".into(), ..Default::default() },
    )
    .unwrap();
    let files = agent_files(&lab, 0, "").unwrap();
    let objects = files.objects_dir.join("lab.yaml");
    let web = LabService::new("web", VIP, 80, &["n1-p2"]);
    write_atomic(&objects, &lab_objects(&lab, std::slice::from_ref(&web))).unwrap();
    let log = lab.run_dir.join("agent.log");
    let pid = start_agent(&lab, 0, &files, &log).unwrap();
    wait_ready(&files, Duration::from_secs(20), || lab.running(pid))
        .unwrap_or_else(|e| panic!("{e}: {}", std::fs::read_to_string(&log).unwrap_or_default()));
    let client = lab.pod("n1-p1");
    let reachable = || get_once(&client.netns, sa(VIP, 80), "/", Duration::from_millis(300)).is_ok();
    let eventually = |want: bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while reachable() != want {
            assert!(std::time::Instant::now() < deadline, "Service reachable should become {want}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    eventually(true);
    write_atomic(&objects, &lab_objects(&lab, &[])).unwrap();
    eventually(false);
    write_atomic(&objects, &lab_objects(&lab, &[web])).unwrap();
    eventually(true);
}

/// A component that panics is not left dead inside a running agent: the
/// agent ends with exit status 1, naming the component and the panic, so the
/// kubelet restarts it (the panic comes from `WEFT_TEST_PANIC`, a hook that
/// only debug builds contain). A component that is not vital to forwarding
/// (the flow names and counters task) is enough.
#[test]
fn a_component_that_panics_ends_the_agent_with_an_error() {
    require_root!();
    let lab = Lab::new().unwrap();
    let files = agent_files(&lab, 0, "").unwrap();
    write_atomic(&files.objects_dir.join("lab.yaml"), &lab_objects(&lab, &[])).unwrap();
    let node = lab.node(0);
    let mut cmd = weft_tests::objects::agent_command();
    cmd.args(["run", "--config"]).arg(&files.config).env("WEFT_TEST_PANIC", "flow-sync");
    let out = lab.run(&node.netns, Some(&node.cgroup), &mut cmd, Duration::from_secs(60)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("weft-agent: the flow names and counters panicked: WEFT_TEST_PANIC=flow-sync"), "{stderr}");
}

/// A full BPF map does not end the agent: with room for two Services'
/// entries (`map-sizes.services: 4`, a frontend and one backend slot each),
/// the agent serves the two that fit, reports the third (`/status`
/// `full-maps`, the `weft_datapath_map_not_written` metric and a log line
/// naming the map and the `map-sizes` key), and writes it as soon as a
/// Service it holds is deleted.
#[test]
fn a_full_map_serves_what_fits_and_the_rest_once_there_is_room() {
    require_root!();
    let lab = Lab::new().unwrap();
    let backend = lab.pod("n1-p2");
    let _server = HttpServer::start(
        &backend.netns,
        sa(backend.ip, 8080),
        ServerOpts { name: "n1-p2".into(), ..Default::default() },
    )
    .unwrap();
    let files = agent_files(&lab, 0, "map-sizes: {services: 4}\n").unwrap();
    let vip = |last: u8| std::net::Ipv4Addr::new(10, 96, 0, last);
    let svc = |name: &str, last: u8| LabService::new(name, vip(last), 80, &["n1-p2"]);
    let objects = files.objects_dir.join("lab.yaml");
    write_atomic(&objects, &lab_objects(&lab, &[svc("web1", 10), svc("web2", 11), svc("web3", 12)])).unwrap();
    let log = lab.run_dir.join("agent.log");
    let pid = start_agent(&lab, 0, &files, &log).unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_ready(&files, Duration::from_secs(20), || lab.running(pid)).unwrap_or_else(|e| panic!("{e}: {}", log_text()));

    let full_services = |s: &serde_json::Value| -> Option<serde_json::Value> {
        let maps = s["datapath"]["full-maps"].as_array()?;
        maps.iter().find(|m| m["map"] == "weft_services").cloned()
    };
    let status =
        wait_status(&lab, 0, Duration::from_secs(10), "weft_services reported full", |s| full_services(s).is_some())
            .unwrap_or_else(|e| panic!("{e}: {}", log_text()));
    let full = full_services(&status).unwrap();
    assert_eq!(full["key"], "services", "{full}");
    assert_eq!(full["capacity"], 4, "{full}");
    assert_eq!(full["not-written"], 1, "{full}");
    assert!(full["examples"][0].as_str().unwrap_or_default().contains("10.96.0.12:80"), "{full}");
    let metrics = agent_get(&lab, 0, "/metrics").unwrap();
    let not_written =
        metric_sum(&metrics, "weft_datapath_map_not_written", &[("map", "weft_services"), ("key", "services")]);
    assert_eq!(not_written, 1.0, "{metrics}");
    assert!(
        log_text().contains(
            "map weft_services is full (4 entries): 1 objects not written until there is room; raise map-sizes.services"
        ),
        "{}",
        log_text()
    );

    let client = lab.pod("n1-p1");
    let reachable = |last: u8| get_once(&client.netns, sa(vip(last), 80), "/", Duration::from_millis(500)).is_ok();
    assert!(reachable(10) && reachable(11), "the Services that fit are served");
    assert!(!reachable(12), "the Service that did not fit is not");
    assert!(lab.running(pid), "the agent keeps running");

    // Deleting web2 makes room: web3 is written in the same pass.
    write_atomic(&objects, &lab_objects(&lab, &[svc("web1", 10), svc("web3", 12)])).unwrap();
    wait_status(&lab, 0, Duration::from_secs(10), "no full map", |s| full_services(s).is_none())
        .unwrap_or_else(|e| panic!("{e}: {}", log_text()));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !reachable(12) {
        assert!(std::time::Instant::now() < deadline, "web3 reachable once there is room");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(reachable(10) && !reachable(11));
    let metrics = agent_get(&lab, 0, "/metrics").unwrap();
    assert_eq!(metric_sum(&metrics, "weft_datapath_map_not_written", &[]), 0.0, "{metrics}");
    assert!(log_text().contains("map weft_services had room for everything left out before"), "{}", log_text());
    assert!(lab.running(pid), "the agent keeps running");
}

/// Only root can connect to the agent's xDS (it carries TLS keys) and flow
/// API sockets: they are 0600 in a state directory only root may enter
/// (0700), which also holds Envoy's access-log spool (whose lines become
/// flows). An unprivileged user (`nobody`) is refused by each socket and
/// cannot open the spool, and can connect to a socket next to the state
/// directory that is open to all (so the refusal is the agent's modes,
/// nothing else on the path).
#[test]
fn an_unprivileged_user_cannot_connect_to_the_agents_sockets() {
    use std::os::unix::{fs::PermissionsExt, process::CommandExt};
    require_root!();
    let lab = Lab::new().unwrap();
    // A base every user may enter, holding the state directory.
    struct Base(std::path::PathBuf);
    impl Drop for Base {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let base = Base(std::env::temp_dir().join(format!("weft-sockets-{}", std::process::id())));
    std::fs::create_dir_all(&base.0).unwrap();
    std::fs::set_permissions(&base.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut files = agent_files(&lab, 0, "").unwrap();
    let state_dir = base.0.join("state");
    let config = std::fs::read_to_string(&files.config)
        .unwrap()
        .replace(&format!("state-dir: {}", files.state_dir.display()), &format!("state-dir: {}", state_dir.display()));
    std::fs::write(&files.config, config).unwrap();
    files.state_dir = state_dir.clone();
    write_atomic(&files.objects_dir.join("lab.yaml"), &lab_objects(&lab, &[])).unwrap();
    let log = lab.run_dir.join("agent.log");
    let pid = start_agent(&lab, 0, &files, &log).unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_ready(&files, Duration::from_secs(20), || lab.running(pid)).unwrap_or_else(|e| panic!("{e}: {}", log_text()));
    let sockets: Vec<_> = ["xds.sock", "observer.sock"].iter().map(|s| state_dir.join(s)).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !sockets.iter().all(|s| s.exists()) {
        assert!(std::time::Instant::now() < deadline, "the agent's sockets exist: {}", log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&state_dir), 0o700);
    for s in &sockets {
        assert_eq!(mode(s), 0o600, "{}", s.display());
    }
    let open = base.0.join("open.sock");
    let _open = std::os::unix::net::UnixListener::bind(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    // The helper, where nobody may run it.
    let helper = base.0.join("weft-lab");
    std::fs::copy(weft_tests::objects::workspace_binary("weft-lab"), &helper).unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let connect = |uid: Option<u32>| -> Vec<String> {
        let mut cmd = std::process::Command::new(&helper);
        cmd.arg("connect-unix").arg(&open).args(&sockets);
        if let Some(id) = uid {
            cmd.uid(id).gid(id);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().map(|l| l.rsplit(' ').next().unwrap_or("").to_owned()).collect()
    };
    assert_eq!(connect(None), ["ok", "ok", "ok"], "root connects to every socket");
    assert_eq!(connect(Some(65534)), ["ok", "denied", "denied"], "nobody to none of the agent's");
    let spool = state_dir.join("access-log");
    assert!(spool.is_dir(), "the access-log spool is in the state directory");
    let mut cmd = std::process::Command::new(&helper);
    cmd.arg("append").arg(spool.join("current.log")).uid(65534).gid(65534);
    let out = cmd.output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "denied", "nobody cannot write access-log lines");
    assert!(lab.running(pid));
}

/// Envoy is found when the agent starts, not where the build machine had
/// it: with no `envoy.binary`, no `$WEFT_ENVOY` and no `envoy` on PATH or
/// next to weft-agent, the agent ends with exit status 1 and says where it
/// looked and what to set.
#[test]
fn an_agent_that_finds_no_envoy_says_where_it_looked() {
    require_root!();
    let lab = Lab::new().unwrap();
    let files = agent_files(&lab, 0, "").unwrap();
    write_atomic(&files.objects_dir.join("lab.yaml"), &lab_objects(&lab, &[])).unwrap();
    let node = lab.node(0);
    let agent = weft_tests::objects::agent_binary();
    let agent_dir = agent.parent().unwrap().to_owned();
    assert!(!agent_dir.join("envoy").exists(), "an envoy next to {}", agent.display());
    let path = "/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin";
    assert!(std::env::split_paths(path).all(|d| !d.join("envoy").exists()), "an envoy on {path}");
    let mut cmd = std::process::Command::new(&agent);
    cmd.args(["run", "--config"]).arg(&files.config).env_remove("WEFT_ENVOY").env("PATH", path);
    let out = lab.run(&node.netns, Some(&node.cgroup), &mut cmd, Duration::from_secs(60)).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let said = format!(
        "weft-agent: the Envoy supervisor failed: no Envoy binary: set envoy.binary in the agent's config (or \
         $WEFT_ENVOY), or put `envoy` on PATH or next to weft-agent ({})",
        agent_dir.display()
    );
    assert!(stderr.contains(&said), "{stderr}");
}
