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
    time::{Duration, Instant},
};

use aya::{
    EbpfLoader,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use weft_agent::datapath::{EndpointEntry, PolicyAction, PolicyEntry, Proto};
use weft_benches::{Samples, machine, ratio, us};
use weft_tests::{
    http::{Client, HttpServer, ServerOpts},
    lab::{Lab, skip_reason},
    node::{LabNode, pod_identities},
    packet::{ACK, PSH, SYN, tcp_frame},
    proxy::Forwarder,
    scenario::{T, VIP, cluster_ip, sa, service},
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

fn program_bench(lab: &Lab) {
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
    node.dp.set_policy(ep.ep_id, &[PolicyEntry { identity: ids(lab.pod("n1-p1")), port: 8080, proto: Some(Proto::Tcp), action: PolicyAction::Allow, rule_id: 1 }]).unwrap();
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
    for (name, prog, src, dst) in cases {
        // Open the connection first (a SYN), so the timed runs take the established path.
        let _ = node.dp.test_run(prog, &tcp_frame(src, dst, SYN));
        let frame = tcp_frame(src, dst, ACK | PSH);
        let s = Samples::new((0..RUNS).map(|_| node.dp.test_run(prog, &frame).unwrap().duration).collect());
        println!("| {name} | {} | {} | {} |", s.pct(50.0).as_nanos(), s.pct(99.0).as_nanos(), ratio(s.pct(50.0), baseline.pct(50.0)));
    }
}

/// `n` requests on one connection (after a warm-up), each timed.
fn keepalive(ns: &str, to: std::net::SocketAddr, n: usize) -> Vec<Duration> {
    let mut c = Client::connect(ns, to, None, T).unwrap();
    for _ in 0..200 {
        c.get("b", "/", &[]).unwrap();
    }
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let r = c.get("b", "/", &[]).unwrap();
            let d = t.elapsed();
            assert_eq!(r.status, 200);
            d
        })
        .collect()
}

/// `n` requests, each on a new connection (connect, request, close), each timed.
fn new_connections(ns: &str, to: std::net::SocketAddr, n: usize) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let mut c = Client::connect(ns, to, None, T).unwrap();
            let r = c.get("b", "/", &[("connection", "close")]).unwrap();
            let d = t.elapsed();
            assert_eq!(r.status, 200);
            d
        })
        .collect()
}

fn latency_bench(lab: &Lab, n: usize) {
    let mut node = LabNode::open(lab, 0, |c| c.emit_level = weft_agent::datapath::EmitLevel::Connection).unwrap();
    node.install_lab(lab).unwrap();
    let backend = lab.pod("n1-p2");
    let _server = HttpServer::start(&backend.netns, sa(backend.ip, 8080), ServerOpts { name: "b".into(), ..Default::default() }).unwrap();
    node.dp.upsert_service(&service(cluster_ip(80), &[backend.ip], 8080)).unwrap();
    let proxy = Forwarder::start(&lab.node(0).netns, sa(Ipv4Addr::LOCALHOST, 15001), sa(backend.ip, 8080)).unwrap();
    node.dp.register_proxy_socket(15001, proxy.listener()).unwrap();
    let mut l7 = service(cluster_ip(81), &[backend.ip], 8080);
    l7.proxy_port = Some(15001);
    node.dp.upsert_service(&l7).unwrap();
    let ns = lab.pod("n1-p1").netns.clone();

    let paths = [("direct pod -> pod", sa(backend.ip, 8080)), ("pod -> ClusterIP (eBPF DNAT)", sa(VIP, 80)), ("pod -> L7 Service via stand-in proxy", sa(VIP, 81))];
    type Run = fn(&str, std::net::SocketAddr, usize) -> Vec<Duration>;
    for (mode, f) in [("keep-alive", keepalive as Run), ("new connection", new_connections)] {
        let count = if mode == "keep-alive" { n } else { n / 5 };
        println!("\n## Request latency, {mode} ({count} requests each, interleaved rounds)\n");
        println!("| path | p50 µs | p99 µs | p50 / direct | p99 / direct |");
        println!("|---|---:|---:|---:|---:|");
        // Rounds alternate the paths so drift in the machine affects all alike.
        let rounds = 5;
        let mut all: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
        for _ in 0..rounds {
            for (i, (_, to)) in paths.iter().enumerate() {
                all[i].extend(f(&ns, *to, count / rounds));
                let _ = node.drain_events();
            }
        }
        let samples: Vec<Samples> = all.into_iter().map(Samples::new).collect();
        for (i, (name, _)) in paths.iter().enumerate() {
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
}

fn main() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let n: usize = std::env::var("WEFT_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    println!("# weft datapath benchmarks\n\nMachine: {}", machine());
    let lab = Lab::new().expect("lab");
    program_bench(&lab);
    drop(lab);
    let lab = Lab::new().expect("lab");
    latency_bench(&lab, n);
}
