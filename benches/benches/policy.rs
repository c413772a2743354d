//! Policy benchmark (root; builds its own lab): the per-packet cost of the
//! L3/L4 policy lookup as the endpoint's policy grows from 1 to 100 to
//! 10,000 entries, through BPF_PROG_TEST_RUN of `to_container` on the live
//! maps. Every figure is a ratio to the 1-entry case measured in the same
//! run; the cases alternate in rounds so drift on the machine affects all
//! alike.
//!
//! Each timed packet is the SYN of a new connection to the policy-enforcing
//! pod (the only packets that are judged: later ones follow conntrack), from
//! a peer an entry allows (lookups + a conntrack entry) and to a port no entry
//! allows (lookups + the drop). The other entries are other peers' identities
//! on other ports, as many policies' rules become. Events are off, so only
//! the program's own work is timed.
//!
//! `cargo bench -p weft-benches --bench policy` (WEFT_BENCH_N: SYNs per case, default 20000).

use std::net::SocketAddrV4;

use weft_agent::datapath::{Direction, EmitLevel, EndpointEntry, PolicyAction, PolicyEntry, Proto};
use weft_benches::{Samples, machine, ratio, save};
use weft_tests::{
    lab::{Lab, skip_reason},
    node::{LabNode, pod_identities},
    packet::{SYN, tcp_frame},
};

/// Policy sizes, in datapath entries of the endpoint.
const SIZES: [usize; 3] = [1, 100, 10_000];
/// Rounds the SYNs of each case are split into.
const ROUNDS: usize = 10;

/// `n` entries for an endpoint: the client's allow on 8080, and n - 1 others
/// (other identities, each on its own port).
fn entries(client: u32, n: usize) -> Vec<PolicyEntry> {
    let allow = |identity, port| PolicyEntry {
        direction: Direction::Ingress,
        identity,
        proto: Some(Proto::Tcp),
        ports: Some((port, port)),
        action: PolicyAction::Allow,
        rule_id: 1,
        proxy_port: None,
    };
    let mut out = vec![allow(client, 8080)];
    for i in 1..n {
        let i = u32::try_from(i).expect("few entries");
        let port = u16::try_from(10_000 + i % 50_000).expect("a port");
        out.push(allow(0x0100_0000 + i, port));
    }
    out
}

fn main() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let n: usize = std::env::var("WEFT_BENCH_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let per_round = (n / ROUNDS).max(1);
    println!("# weft policy benchmark\n\nMachine: {}", machine());
    let lab = Lab::new().expect("lab");
    let mut node = LabNode::open(&lab, 0, |c| c.emit_level = EmitLevel::Off).unwrap();
    node.install_lab(&lab).unwrap();
    let (client, server) = (lab.pod("n1-p1"), lab.pod("n1-p2"));
    let ids = pod_identities(&lab);
    let ep = node.dp.endpoints().into_iter().find(|e| e.addr == server.ip).unwrap();
    node.dp.upsert_endpoint(&EndpointEntry { policy_ingress: true, ..ep }).unwrap();

    // (allowed, denied) samples per size.
    let mut samples: Vec<(Vec<_>, Vec<_>)> = vec![(Vec::new(), Vec::new()); SIZES.len()];
    // Every SYN has a source port of its own: a new connection each time.
    let mut ports = (1024u16..=u16::MAX).cycle();
    for _ in 0..ROUNDS {
        for (i, size) in SIZES.iter().enumerate() {
            node.dp.set_policy(ep.ep_id, &entries(ids(client), *size)).unwrap();
            for _ in 0..per_round {
                let src = SocketAddrV4::new(client.ip, ports.next().unwrap_or(1024));
                let (allowed, denied) = &mut samples[i];
                for (to, out) in [(8080, allowed), (8081, denied)] {
                    let r = node.dp.test_run("to_container", &tcp_frame(src, SocketAddrV4::new(server.ip, to), SYN));
                    out.push(r.unwrap().duration);
                }
            }
        }
    }
    // The verdicts are what the case says (else the figures time something else).
    node.dp.set_policy(ep.ep_id, &entries(ids(client), SIZES[2])).unwrap();
    let src = SocketAddrV4::new(client.ip, 1000);
    let allowed = node.dp.test_run("to_container", &tcp_frame(src, SocketAddrV4::new(server.ip, 8080), SYN)).unwrap();
    let denied = node.dp.test_run("to_container", &tcp_frame(src, SocketAddrV4::new(server.ip, 8081), SYN)).unwrap();
    assert_eq!((allowed.verdict, denied.verdict), (0, 2), "TC_ACT_OK for the allowed SYN, TC_ACT_SHOT for the other");

    let stats: Vec<(Samples, Samples)> = samples.into_iter().map(|(a, d)| (Samples::new(a), Samples::new(d))).collect();
    let (base_a, base_d) = (stats[0].0.pct(50.0), stats[0].1.pct(50.0));
    println!(
        "\n## Ingress policy per new connection, BPF_PROG_TEST_RUN of to_container ({} SYNs per case)\n",
        per_round * ROUNDS
    );
    println!(
        "| entries | allowed p50 ns | allowed p99 ns | allowed p50 / 1 entry | denied p50 ns | denied p99 ns | denied p50 / 1 entry |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for (size, (a, d)) in SIZES.iter().zip(&stats) {
        println!(
            "| {size} | {} | {} | {} | {} | {} | {} |",
            a.pct(50.0).as_nanos(),
            a.pct(99.0).as_nanos(),
            ratio(a.pct(50.0), base_a),
            d.pct(50.0).as_nanos(),
            d.pct(99.0).as_nanos(),
            ratio(d.pct(50.0), base_d)
        );
        rows.push(serde_json::json!({
            "entries": size,
            "allowed_p50_ns": a.pct(50.0).as_nanos() as u64,
            "allowed_p99_ns": a.pct(99.0).as_nanos() as u64,
            "denied_p50_ns": d.pct(50.0).as_nanos() as u64,
            "denied_p99_ns": d.pct(99.0).as_nanos() as u64,
        }));
    }
    save("policy", serde_json::json!({"lookup": rows}));
}
