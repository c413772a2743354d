//! Datapath benchmarks (root; builds its own lab):
//!
//! 1. Time per packet of each hot-path program, through BPF_PROG_TEST_RUN
//!    on the live maps, against a program that does nothing.
//! 2. Request latency p50/p99, keep-alive and new-connection, for direct
//!    pod -> pod, pod -> ClusterIP (eBPF DNAT) and pod -> L7 Service through
//!    a forwarding stand-in proxy; each as a ratio to direct.
//!
//! `cargo bench -p weft-benches --bench datapath` (WEFT_BENCH_N sets the request count).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use aya::{
    EbpfLoader,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use weft_agent::datapath::{Direction, EndpointEntry, PolicyAction, PolicyEntry, Proto};
use weft_benches::{Samples, machine, pct_json, ratio, save, us};
use weft_tests::{
    http::{HttpServer, ServerOpts},
    lab::{Lab, skip_reason},
    node::{LabNode, pod_identities},
    packet::{ACK, PSH, SYN, tcp_frame},
    proxy::Forwarder,
    scenario::{VIP, cluster_ip, sa, service},
};

const RUNS: usize = 20_000;

fn noop_samples() -> Samples {
    let mut ebpf = EbpfLoader::new().load(weft_ebpf::BENCH_NOOP).expect("noop object");
    let p: &mut SchedClassifier = ebpf.program_mut("noop").unwrap().try_into().unwrap();
    p.load().unwrap();
    let frame = tcp_frame(SocketAddrV4::new(Ipv4Addr::new(10, 1, 1, 11), 1), SocketAddrV4::new(VIP, 80), ACK);
    let mut out = vec![0u8; 256];
    Samples::new(
        (0..RUNS)
            .map(|_| {
                p.test_run(TestRunOptions { data_in: Some(&frame), data_out: Some(&mut out), ..Default::default() })
                    .unwrap()
                    .duration
            })
            .collect(),
    )
}

fn program_bench(lab: &Lab) -> serde_json::Value {
    let mut node = LabNode::open(lab, 0, |_| {}).unwrap();
    node.install_lab(lab).unwrap();
    let (client, local) = (lab.pod("n1-p1").ip, lab.pod("n1-p2").ip);
    node.dp.upsert_service(&service(cluster_ip(80), &[local], 8080)).unwrap();
    let mut l7 = service(cluster_ip(81), &[local], 8080);
    l7.proxy_port = Some(15001);
    node.dp.upsert_service(&l7).unwrap();
    // n1-p2 enforces a policy that admits n1-p1.
    let ids = pod_identities(lab);
    let ep = node.dp.endpoints().into_iter().find(|e| e.addr == local).unwrap();
    node.dp
        .set_policy(
            ep.ep_id,
            &[PolicyEntry {
                direction: Direction::Ingress,
                identity: ids(lab.pod("n1-p1")),
                proto: Some(Proto::Tcp),
                ports: Some((8080, 8080)),
                action: PolicyAction::Allow,
                rule_id: 1,
                proxy_port: None,
            }],
        )
        .unwrap();
    node.dp.upsert_endpoint(&EndpointEntry { policy_ingress: true, ..ep }).unwrap();

    let c = |port| SocketAddrV4::new(client, port);
    let cases = [
        ("from-container, pod -> pod", "from_container", c(40001), SocketAddrV4::new(local, 8080)),
        ("from-container, ClusterIP DNAT", "from_container", c(40002), SocketAddrV4::new(VIP, 80)),
        ("from-container, L7 redirect", "from_container", c(40003), SocketAddrV4::new(VIP, 81)),
        ("to-container, policy enforced", "to_container", c(40004), SocketAddrV4::new(local, 8080)),
        ("to-netdev, pass", "to_netdev", c(40005), SocketAddrV4::new(Ipv4Addr::new(10, 1, 2, 11), 8080)),
    ];
    let baseline = noop_samples();
    println!("\n## Time per packet, BPF_PROG_TEST_RUN ({RUNS} runs each, established connection)\n");
    println!("| program, path | p50 ns | p99 ns | p50 / no-op |");
    println!("|---|---:|---:|---:|");
    println!("| no-op (baseline) | {} | {} | 1.00 |", baseline.pct(50.0).as_nanos(), baseline.pct(99.0).as_nanos());
    let mut rows =
        vec![serde_json::json!({"program": "no-op (baseline)", "p50_ns": baseline.pct(50.0).as_nanos() as u64})];
    for (name, prog, src, dst) in cases {
        // Open the connection first (a SYN), so the timed runs take the established path.
        let _ = node.dp.test_run(prog, &tcp_frame(src, dst, SYN));
        let frame = tcp_frame(src, dst, ACK | PSH);
        let s = Samples::new((0..RUNS).map(|_| node.dp.test_run(prog, &frame).unwrap().duration).collect());
        println!(
            "| {name} | {} | {} | {} |",
            s.pct(50.0).as_nanos(),
            s.pct(99.0).as_nanos(),
            ratio(s.pct(50.0), baseline.pct(50.0))
        );
        rows.push(serde_json::json!({"program": name, "p50_ns": s.pct(50.0).as_nanos() as u64}));
    }
    rows.into()
}

/// Runs `weft-lab latency` as a process of pod n1-p1 inside node1's cgroup;
/// returns its samples.
fn pod_process(lab: &Lab, to: std::net::SocketAddr, n: usize, mode: &str) -> Vec<Duration> {
    let pod = lab.pod("n1-p1");
    let mut cmd = std::process::Command::new(weft_tests::scenario::lab_helper());
    cmd.args(["latency", &to.to_string(), &n.to_string(), mode]);
    let out = lab.run(&pod.netns, Some(&lab.node(0).cgroup), &mut cmd, Duration::from_secs(600)).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| Duration::from_nanos(l.parse().unwrap())).collect()
}

fn latency_bench(lab: &Lab, n: usize) -> serde_json::Value {
    let mut figures = serde_json::Map::new();
    let mut node = LabNode::open(lab, 0, |c| c.emit_level = weft_agent::datapath::EmitLevel::Connection).unwrap();
    node.install_lab(lab).unwrap();
    let backend = lab.pod("n1-p2");
    let _server =
        HttpServer::start(&backend.netns, sa(backend.ip, 8080), ServerOpts { name: "b".into(), ..Default::default() })
            .unwrap();
    node.dp.upsert_service(&service(cluster_ip(80), &[backend.ip], 8080)).unwrap();
    let proxy = Forwarder::start(&lab.node(0).netns, sa(Ipv4Addr::LOCALHOST, 15001), sa(backend.ip, 8080)).unwrap();
    node.dp.register_proxy_socket(15001, proxy.listener()).unwrap();
    let mut l7 = service(cluster_ip(81), &[backend.ip], 8080);
    l7.proxy_port = Some(15001);
    node.dp.upsert_service(&l7).unwrap();

    // (name, target, socket LB for pods on): the client is always a process of
    // pod n1-p1 under node1's cgroup, as pods sit under a node's root cgroup.
    let paths = [
        ("direct pod -> pod", sa(backend.ip, 8080), true),
        ("pod -> ClusterIP, per-packet eBPF DNAT", sa(VIP, 80), false),
        ("pod -> ClusterIP, socket LB (connect-time)", sa(VIP, 80), true),
        ("pod -> L7 Service via stand-in proxy", sa(VIP, 81), true),
    ];
    for mode in ["keepalive", "new"] {
        let count = if mode == "keepalive" { n } else { n / 5 };
        println!(
            "\n## Request latency, {mode} ({count} requests per path, client process in pod n1-p1, backend n1-p2)\n"
        );
        println!("| path | p50 µs | p99 µs | p50 / direct | p99 / direct |");
        println!("|---|---:|---:|---:|---:|");
        // Rounds alternate the paths so drift in the machine affects all alike.
        let rounds = 10;
        let mut all: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
        for _ in 0..rounds {
            for (i, (_, to, socket_lb)) in paths.iter().enumerate() {
                node.dp.reconfigure(|c| c.socket_lb_pods = *socket_lb).unwrap();
                all[i].extend(pod_process(lab, *to, count / rounds, mode));
                let _ = node.drain_events();
            }
        }
        let samples: Vec<Samples> = all.into_iter().map(Samples::new).collect();
        let rows: Vec<serde_json::Value> = paths
            .iter()
            .zip(&samples)
            .map(|((name, _, _), s)| {
                let mut r = pct_json(s);
                r["path"] = (*name).into();
                r
            })
            .collect();
        figures.insert(mode.into(), rows.into());
        for (i, (name, _, _)) in paths.iter().enumerate() {
            let s = &samples[i];
            println!(
                "| {name} | {} | {} | {} | {} |",
                us(s.pct(50.0)),
                us(s.pct(99.0)),
                ratio(s.pct(50.0), samples[0].pct(50.0)),
                ratio(s.pct(99.0), samples[0].pct(99.0))
            );
        }
    }
    figures.into()
}

fn main() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let n: usize = std::env::var("WEFT_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    println!("# weft datapath benchmarks\n\nMachine: {}", machine());
    let lab = Lab::new().expect("lab");
    let programs = program_bench(&lab);
    drop(lab);
    let lab = Lab::new().expect("lab");
    let latency = latency_bench(&lab, n);
    save("datapath", serde_json::json!({"programs": programs, "latency": latency}));
}
