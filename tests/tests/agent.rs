//! The agent as a process on the lab (issue: datapath): it loads the objects
//! directory, programs the datapath, and can be killed and restarted without
//! breaking connections.

use std::time::Duration;

use weft_tests::{
    http::{Client, HttpServer, ServerOpts, get_once},
    lab::Lab,
    objects::{LabService, agent_files, lab_objects, start_agent, wait_ready, write_atomic},
    require_root,
    scenario::{T, VIP, sa},
};

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
    let files: Vec<_> = (0..2).map(|i| agent_files(&lab, i, "").unwrap()).collect();
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
