//! What the datapath reports (issue: datapath): policy verdicts and drops with
//! their reasons, tuples and identities, and for each path the observation
//! points a connection's first packet passes, in order.

use std::net::SocketAddrV4;

use weft_agent::datapath::{Direction, EndpointEntry, Frontend, FrontendKind, PolicyAction, PolicyEntry, Proto};
use weft_ebpf::abi::{self, Event};
use weft_tests::{
    http::{Client, get_once},
    lab::Lab,
    node::{LabNode, pod_identities},
    require_root,
    scenario::*,
};

/// (type, subtype) of each record, the shape tests compare.
fn kinds(events: &[Event]) -> Vec<(u32, u32)> {
    events.iter().map(|e| (e.r#type as u32, e.subtype as u32)).collect()
}

/// Records of a connection's opening SYN (not the SYN-ACK), matched by a predicate.
fn syn_of(events: &[Event], f: impl Fn(&Event) -> bool) -> Vec<Event> {
    events.iter().filter(|e| e.proto == 6 && e.tcp_flags & 0x12 == 0x02 && f(e)).copied().collect()
}

const TRACE: u32 = abi::EV_TRACE;

#[test]
fn policy_denies_with_a_drop_record_and_allows_the_selected_peer() {
    require_root!();
    let lab = Lab::new().unwrap();
    let mut nodes = nodes(&lab);
    let _servers = servers(&lab, &["n2-p1"]);
    let ids = pod_identities(&lab);
    let (allowed, denied, server) = (lab.pod("n1-p1"), lab.pod("n1-p2"), lab.pod("n2-p1"));
    assert_ne!(ids(allowed), ids(denied));

    // n2-p1 is selected by a policy allowing only n1-p1's identity on 8080/TCP.
    let ep_id = nodes[1].dp.endpoint_id_for(server.ip);
    let ep = nodes[1].dp.endpoints().into_iter().find(|e| e.ep_id == ep_id).unwrap();
    nodes[1].dp.upsert_endpoint(&EndpointEntry { policy_ingress: true, ..ep }).unwrap();
    nodes[1]
        .dp
        .set_policy(
            ep_id,
            &[PolicyEntry {
                direction: Direction::Ingress,
                identity: ids(allowed),
                proto: Some(Proto::Tcp),
                ports: Some((8080, 8080)),
                action: PolicyAction::Allow,
                rule_id: 7,
                proxy_port: None,
            }],
        )
        .unwrap();
    let _ = nodes[1].drain_events();

    let (resp, _, _) = get_once(&allowed.netns, sa(server.ip, 8080), "/", T).expect("the allowed peer connects");
    assert_eq!(resp.status, 200);
    let from = sa(denied.ip, 42001);
    let refused =
        Client::connect(&denied.netns, sa(server.ip, 8080), Some(from), std::time::Duration::from_millis(700));
    assert!(refused.is_err(), "the denied peer must not connect");

    let events = nodes[1].drain_events();
    let drop = events
        .iter()
        .find(|e| e.r#type as u32 == abi::EV_DROP && e.src() == SocketAddrV4::new(denied.ip, 42001))
        .expect("a drop record for the denied connection");
    assert_eq!(drop.subtype as u32, abi::DROP_POLICY_DENIED);
    assert_eq!(drop.dst(), SocketAddrV4::new(server.ip, 8080));
    assert_eq!(drop.proto, 6);
    assert_eq!(drop.src_identity, ids(denied));
    assert_eq!(drop.dst_identity, ids(server));
    assert_eq!(drop.dst_ep, ep_id);
    let verdict = events
        .iter()
        .find(|e| e.r#type as u32 == abi::EV_POLICY && e.src() == SocketAddrV4::new(denied.ip, 42001))
        .expect("a policy-verdict record");
    assert_eq!(verdict.subtype as u32, abi::POLICY_DENY);
    assert_eq!(verdict.direction as u32, abi::DIR_INGRESS);
    let allowed_verdict = events
        .iter()
        .find(|e| e.r#type as u32 == abi::EV_POLICY && e.saddr == u32::from_ne_bytes(allowed.ip.octets()))
        .expect("a policy-verdict record for the allowed peer");
    assert_eq!(allowed_verdict.subtype as u32, abi::POLICY_ALLOW);
    assert_eq!(allowed_verdict.policy_match as u32, abi::MATCH_L3_L4);
}

#[test]
fn a_service_without_backends_drops_with_no_service() {
    require_root!();
    let lab = Lab::new().unwrap();
    let mut nodes = nodes(&lab);
    nodes[0].dp.upsert_service(&service(cluster_ip(80), &[], 8080)).unwrap();
    let client = lab.pod("n1-p1");
    let res = Client::connect(&client.netns, sa(VIP, 80), None, std::time::Duration::from_millis(500));
    assert!(res.is_err());
    let events = nodes[0].drain_events();
    let drop = events.iter().find(|e| e.r#type as u32 == abi::EV_DROP).expect("a drop record");
    assert_eq!(drop.subtype as u32, abi::DROP_NO_SERVICE);
    assert_eq!(drop.dst(), SocketAddrV4::new(VIP, 80));
    assert_eq!(*drop.src().ip(), client.ip);
}

#[test]
fn each_path_reports_its_observation_points_in_order() {
    require_root!();
    let lab = Lab::new().unwrap();
    let mut nodes = nodes(&lab);
    let _servers = servers(&lab, &["n1-p2", "n2-p1"]);
    let client = lab.pod("n1-p1");
    let local = lab.pod("n1-p2").ip;
    let remote = lab.pod("n2-p1").ip;
    let node1 = lab.node(0).ip;
    let fe = |addr, port, kind| Frontend { addr, port, proto: Proto::Tcp, kind };
    let mut l7 = service(cluster_ip(82), &[remote], 8080);
    l7.proxy_port = Some(15003);
    let _proxy = proxy_listener(&lab, &mut nodes[0], 15003);
    for svc in [
        service(cluster_ip(80), &[local], 8080),
        service(cluster_ip(81), &[remote], 8080),
        service(fe(node1, 30080, FrontendKind::NodePort), &[remote], 8080),
        l7,
    ] {
        nodes[0].dp.upsert_service(&svc).unwrap();
    }
    let from = |port| Some(sa(client.ip, port));
    let from_client = |port: u16| move |e: &Event| e.src() == SocketAddrV4::new(client.ip, port);
    let to_remote = |e: &Event| *e.dst().ip() == remote;
    let (fe_, te, tp, fnw, tnw) = (
        (TRACE, abi::OBS_FROM_ENDPOINT),
        (TRACE, abi::OBS_TO_ENDPOINT),
        (TRACE, abi::OBS_TO_PROXY),
        (TRACE, abi::OBS_FROM_NETWORK),
        (TRACE, abi::OBS_TO_NETWORK),
    );
    for n in nodes.iter_mut() {
        let _ = n.drain_events();
    }

    // pod -> ClusterIP, local backend: DNAT at from-endpoint, then delivery.
    Client::connect(&client.netns, sa(VIP, 80), from(43001), T).unwrap().get("s", "/", &[]).unwrap();
    let n1 = nodes[0].drain_events();
    let syn = syn_of(&n1, from_client(43001));
    assert_eq!(kinds(&syn), vec![fe_, te], "{syn:?}");
    assert_eq!(syn[0].orig(), SocketAddrV4::new(VIP, 80), "translated packet carries the original address");
    assert_eq!(*syn[0].dst().ip(), local);
    assert!(syn.iter().all(|e| e.reason as u32 == abi::REASON_NEW), "a SYN opens its connection at each hook");
    // The reply is reverse-translated on delivery to the client.
    let synack: Vec<Event> =
        n1.iter().filter(|e| e.tcp_flags & 0x12 == 0x12 && e.dport == 43001u16.to_be()).copied().collect();
    assert_eq!(kinds(&synack), vec![fe_, te], "{synack:?}");
    assert!(synack.iter().all(|e| e.reason as u32 == abi::REASON_REPLY));
    assert_eq!(synack[1].src(), SocketAddrV4::new(VIP, 80));
    let ids = pod_identities(&lab);
    assert_eq!(synack[1].src_identity, ids(lab.pod("n1-p2")), "the reply's identity is the backend's");

    // pod -> ClusterIP, remote backend: out through the node device, in on node2.
    Client::connect(&client.netns, sa(VIP, 81), from(43002), T).unwrap().get("s", "/", &[]).unwrap();
    assert_eq!(kinds(&syn_of(&nodes[0].drain_events(), from_client(43002))), vec![fe_, tnw]);
    assert_eq!(kinds(&syn_of(&nodes[1].drain_events(), from_client(43002))), vec![fnw, te]);

    // pod -> L7 ClusterIP: to the proxy.
    Client::connect(&client.netns, sa(VIP, 82), from(43003), T).unwrap().get("s", "/", &[]).unwrap();
    let n1 = syn_of(&nodes[0].drain_events(), from_client(43003));
    assert_eq!(kinds(&n1), vec![fe_, tp]);
    assert_eq!(n1[1].proxy_port, 15003);

    // external client -> NodePort -> remote backend.
    get_once(&lab.ext_netns, sa(node1, 30080), "/", T).unwrap();
    let n1 = syn_of(&nodes[0].drain_events(), |e| *e.src().ip() == lab.ext_ip || *e.dst().ip() == remote);
    assert_eq!(kinds(&n1), vec![fnw, tnw], "{n1:?}");
    assert_ne!(n1[0].flags as u32 & abi::EVF_XLATED_SRC, 0, "SNAT is reported");
    assert_eq!(n1[0].orig(), SocketAddrV4::new(node1, 30080));
    assert_eq!(kinds(&syn_of(&nodes[1].drain_events(), to_remote)), vec![fnw, te]);

    // node process -> ClusterIP: translated at connect(), then out to node2.
    node_process_get(&lab, 0, sa(VIP, 81), 1);
    let n1 = nodes[0].drain_events();
    let sock: Vec<Event> = n1.iter().filter(|e| e.r#type as u32 == abi::EV_SOCK).copied().collect();
    assert_eq!(kinds(&sock), vec![(abi::EV_SOCK, abi::OBS_FROM_HOST)]);
    assert_eq!(sock[0].orig(), SocketAddrV4::new(VIP, 81));
    assert_eq!(kinds(&syn_of(&n1, |e| e.r#type as u32 == TRACE && *e.src().ip() == node1)), vec![tnw]);
    assert_eq!(kinds(&syn_of(&nodes[1].drain_events(), |e| *e.src().ip() == node1)), vec![fnw, te]);
}

#[test]
fn emission_level_is_changed_at_run_time() {
    require_root!();
    let lab = Lab::new().unwrap();
    let mut nodes = nodes(&lab);
    let _servers = servers(&lab, &["n1-p2"]);
    let client = lab.pod("n1-p1");
    let server = sa(lab.pod("n1-p2").ip, 8080);
    let requests = |n: &mut LabNode| {
        let _ = n.drain_events();
        let mut c = Client::connect(&client.netns, server, None, T).unwrap();
        for _ in 0..20 {
            c.get("s", "/", &[]).unwrap();
        }
        drop(c);
        std::thread::sleep(std::time::Duration::from_millis(50));
        n.drain_events().len()
    };
    use weft_agent::datapath::EmitLevel;
    let per_connection = requests(&mut nodes[0]);
    nodes[0].dp.set_emit_level(EmitLevel::Packet).unwrap();
    let per_packet = requests(&mut nodes[0]);
    nodes[0].dp.set_emit_level(EmitLevel::Off).unwrap();
    let off = requests(&mut nodes[0]);
    assert!(per_packet > per_connection * 2, "every packet ({per_packet}) vs connection level ({per_connection})");
    assert!(per_connection > 0);
    assert_eq!(off, 0);
}

#[test]
fn a_full_ring_buffer_counts_lost_records_and_blocks_nothing() {
    require_root!();
    let lab = Lab::new().unwrap();
    let mut node = LabNode::open(&lab, 0, |c| {
        c.map_sizes.events_bytes = 4096;
        c.emit_level = weft_agent::datapath::EmitLevel::Packet;
    })
    .unwrap();
    node.install_lab(&lab).unwrap();
    let _servers = servers(&lab, &["n1-p2"]);
    let client = lab.pod("n1-p1");
    let before = node.dp.event_stats().unwrap();

    // Far more records than 4 KiB hold, and nobody reading.
    let mut c = Client::connect(&client.netns, sa(lab.pod("n1-p2").ip, 8080), None, T).unwrap();
    for _ in 0..300 {
        assert_eq!(c.get("s", "/", &[]).unwrap().status, 200, "traffic keeps flowing");
    }
    // A late packet (the client's delayed ACK) may still take the last free
    // slot, so the count is compared once a drain saw no record written.
    let mut stats = node.dp.event_stats().unwrap();
    let held = node.drain_events().len() as u64;
    let mut read = held;
    for _ in 0..50 {
        let after = node.dp.event_stats().unwrap();
        if (after.emitted, after.lost) == (stats.emitted, stats.lost) {
            break;
        }
        stats = after;
        std::thread::sleep(std::time::Duration::from_millis(20));
        read += node.drain_events().len() as u64;
    }
    let emitted = stats.emitted - before.emitted;
    let lost = stats.lost - before.lost;
    assert!(lost > 0, "records beyond the buffer are counted as lost");
    assert_eq!(read, emitted, "every record written is read back");
    assert!(held < 4096 / 72, "the buffer held what it could ({held} records)");
    // Once drained, the buffer takes records again.
    let _ = c.get("s", "/", &[]).unwrap();
    assert!(!node.drain_events().is_empty());
}
