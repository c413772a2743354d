//! The demo: a two-node lab with weft agents, Services written as Kubernetes
//! YAML, traffic through them, and what the datapath reported, live.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use crate::{
    http::{HttpServer, ServerOpts, get_once},
    lab::Lab,
    objects::{LabService, agent_binary, agent_files, lab_objects, wait_ready, write_atomic},
    scenario::{T, VIP, sa},
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn say(s: &str) {
    println!("\x1b[1m==> {s}\x1b[0m");
}

/// Runs the demo for `duration` (or until Ctrl-C), then tears the lab down.
pub fn run(duration: Duration) -> anyhow::Result<()> {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    say("building the lab: node1 (pods n1-p1, n1-p2), node2 (n2-p1, n2-p2), an external client");
    let lab = Lab::new()?;
    for p in &lab.pods {
        println!("    pod {:<6} {:<12} on {}", p.name, p.ip, lab.node(p.node).name);
    }

    let mut servers = Vec::new();
    for name in ["n1-p2", "n2-p1", "n2-p2"] {
        let pod = lab.pod(name);
        servers.push(HttpServer::start(
            &pod.netns,
            sa(pod.ip, 8080),
            ServerOpts { name: name.into(), ..Default::default() },
        )?);
    }
    let node1 = lab.node(0);
    // Until the control plane runs Envoy, a transparent listener stands in for it.
    servers.push(HttpServer::start(
        &node1.netns,
        sa(std::net::Ipv4Addr::LOCALHOST, 15001),
        ServerOpts { name: "proxy-on-node1".into(), transparent: true, ..Default::default() },
    )?);

    let mut web = LabService::new("web", VIP, 80, &["n1-p2", "n2-p1", "n2-p2"]);
    web.node_port = Some(30080);
    let mut l7 = LabService::new("echo-l7", std::net::Ipv4Addr::new(10, 96, 0, 11), 80, &["n2-p2"]);
    l7.annotations.push(("weft.io/l7-proxy-port".into(), "15001".into()));
    let empty = LabService::new("nobody-home", std::net::Ipv4Addr::new(10, 96, 0, 12), 80, &[]);
    let files: Vec<_> = (0..2).map(|i| agent_files(&lab, i, "print-events: true\n")).collect::<Result<_, _>>()?;
    let objects = lab_objects(&lab, &[web, l7, empty]);
    write_atomic(&files[0].objects_dir.join("lab.yaml"), &objects)?;
    say(&format!("Kubernetes objects for the agents: {}", files[0].objects_dir.join("lab.yaml").display()));
    for line in objects
        .lines()
        .filter(|l| l.starts_with("kind: Service") || l.contains("clusterIP") || l.contains("annotations: {weft"))
    {
        println!("    {}", line.trim());
    }

    say("starting weft-agent on node1 and node2 (datapath loaded, maps pinned, events printed)");
    let mut pids = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let mut cmd = Command::new(agent_binary());
        let log = std::fs::File::create(lab.run_dir.join(format!("agent{i}.log")))?;
        cmd.args(["run", "--config"]).arg(&f.config).stdout(Stdio::piped()).stderr(log);
        let pid = lab.spawn(&lab.node(i).netns, None, &mut cmd)?;
        pids.push(pid);
        let stdout = lab.take_stdout(pid).expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                println!("    {line}");
            }
        });
    }
    for (i, f) in files.iter().enumerate() {
        if let Err(e) = wait_ready(f, Duration::from_secs(30), || lab.running(pids[i])) {
            let log = std::fs::read_to_string(lab.run_dir.join(format!("agent{i}.log"))).unwrap_or_default();
            anyhow::bail!("{e}\nagent log:\n{log}");
        }
    }

    let client = lab.pod("n1-p1");
    let show =
        |what: &str, r: std::io::Result<(crate::http::Response, std::net::SocketAddr, std::net::SocketAddr)>| match r {
            Ok((resp, _, peer)) => println!(
                "    {what}: {} from {} (client's peer {peer})",
                resp.status,
                resp.field("name").unwrap_or("?")
            ),
            Err(e) => println!("    {what}: failed: {e}"),
        };
    say("n1-p1 -> web (ClusterIP 10.96.0.10:80, eBPF DNAT to backends on both nodes)");
    for _ in 0..3 {
        show("GET http://10.96.0.10/", get_once(&client.netns, sa(VIP, 80), "/", T));
        std::thread::sleep(Duration::from_millis(300));
    }
    say("n1-p1 -> echo-l7 (L7: handed to the node's proxy listener, no DNAT)");
    show("GET http://10.96.0.11/", get_once(&client.netns, sa(std::net::Ipv4Addr::new(10, 96, 0, 11), 80), "/", T));
    std::thread::sleep(Duration::from_millis(300));
    say("external client -> NodePort 192.168.50.1:30080");
    show("GET http://192.168.50.1:30080/", get_once(&lab.ext_netns, sa(node1.ip, 30080), "/", T));
    std::thread::sleep(Duration::from_millis(300));
    say("n1-p1 -> nobody-home (a Service without backends: dropped, NO_SERVICE)");
    show(
        "GET http://10.96.0.12/",
        get_once(&client.netns, sa(std::net::Ipv4Addr::new(10, 96, 0, 12), 80), "/", Duration::from_millis(500)),
    );

    say(&format!("live: n1-p1 calls web every second; Ctrl-C or {}s to stop", duration.as_secs()));
    let start = Instant::now();
    while !STOP.load(Ordering::SeqCst) && start.elapsed() < duration {
        let _ = get_once(&client.netns, sa(VIP, 80), "/", T);
        for _ in 0..10 {
            if STOP.load(Ordering::SeqCst) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    say("stopping: agents, servers, namespaces, pins and cgroups are removed");
    drop(servers);
    drop(lab);
    Ok(())
}
