//! The datapath on real packets in the lab (issue: datapath). Each test builds
//! its own lab; the lab tears itself down, also when a test fails.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddr},
};

use weft_agent::datapath::{Frontend, FrontendKind, Proto};
use weft_tests::{
    http::{Client, get_once},
    lab::Lab,
    require_root,
    scenario::*,
};

#[test]
fn pod_to_cluster_ip_reaches_local_and_remote_backends() {
    require_root!();
    let lab = Lab::new().unwrap();
    let mut nodes = nodes(&lab);
    let backends = ["n1-p2", "n2-p1", "n2-p2"];
    let _servers = servers(&lab, &backends);
    let svc = service(cluster_ip(80), &backends.map(|p| lab.pod(p).ip), 8080);
    for n in &mut nodes {
        n.dp.upsert_service(&svc).unwrap();
    }
    let client = lab.pod("n1-p1");

    // New connections spread over the backends; the client only ever sees the VIP.
    let mut served = BTreeMap::<String, u32>::new();
    for _ in 0..30 {
        let (resp, local, peer) = get_once(&client.netns, sa(VIP, 80), "/", T).expect("request through the ClusterIP");
        assert_eq!(resp.status, 200);
        assert_eq!(peer, sa(VIP, 80), "the client's peer is the Service address");
        let seen_peer: SocketAddr = resp.field("peer").unwrap().parse().unwrap();
        assert_eq!(seen_peer, local, "the backend sees the client's own address");
        *served.entry(resp.field("name").unwrap().to_owned()).or_default() += 1;
    }
    let names: BTreeSet<&str> = served.keys().map(String::as_str).collect();
    assert_eq!(names, backends.into_iter().collect(), "every backend served some of 30 connections: {served:?}");

    // One connection stays on its backend.
    let mut c = Client::connect(&client.netns, sa(VIP, 80), None, T).unwrap();
    let first = c.get("svc", "/", &[]).unwrap().field("name").unwrap().to_owned();
    for _ in 0..20 {
        assert_eq!(c.get("svc", "/", &[]).unwrap().field("name").unwrap(), first);
    }
}

#[test]
fn pod_to_l7_cluster_ip_lands_on_the_proxy_with_the_vip_as_local_address() {
    require_root!();
    let lab = Lab::new().unwrap();
    let mut nodes = nodes(&lab);
    let proxy = proxy_listener(&lab, &mut nodes[0], 15001);
    let mut svc = service(cluster_ip(80), &[lab.pod("n2-p1").ip], 8080);
    svc.proxy_port = Some(15001);
    nodes[0].dp.upsert_service(&svc).unwrap();
    let client = lab.pod("n1-p1");

    let (resp, local, peer) = get_once(&client.netns, sa(VIP, 80), "/", T).unwrap();
    assert_eq!(resp.field("name"), Some("proxy-1"));
    assert_eq!(peer, sa(VIP, 80));
    assert_eq!(resp.field("local").unwrap(), "10.96.0.10:80", "the proxy's local address is the Service address");
    assert_eq!(resp.field("peer").unwrap().parse::<SocketAddr>().unwrap(), local);

    // The proxy closes first, so each of its sockets lingers in TIME_WAIT; a
    // client reusing its source ports must still get through every time.
    let ports: Vec<u16> = (41000..41020).collect();
    let mut failures = Vec::new();
    for i in 0..2000 {
        let from = sa(client.ip, ports[i % ports.len()]);
        // Waiting for the proxy's close keeps its side the one in TIME_WAIT.
        let res = Client::connect(&client.netns, sa(VIP, 80), Some(from), T).and_then(|mut c| {
            let r = c.get("svc", "/", &[])?;
            c.wait_closed()?;
            Ok(r)
        });
        match res {
            Ok(r) if r.status == 200 => {}
            other => failures.push((i, format!("{other:?}"))),
        }
    }
    assert!(failures.is_empty(), "{} of 2000 connections failed, first: {:?}", failures.len(), failures.first());
    // The last connections' closes may still be in flight (FIN_WAIT): give
    // them a moment to reach TIME_WAIT before counting.
    let count_time_wait = || {
        lab.in_ns(&lab.node(0).netns, || {
            std::fs::read_to_string("/proc/thread-self/net/tcp")
                .unwrap()
                .lines()
                .filter(|l| l.contains("0A00600A:0050") && l.split_whitespace().nth(3) == Some("06"))
                .count()
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut in_time_wait = count_time_wait();
    while in_time_wait < ports.len() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        in_time_wait = count_time_wait();
    }
    assert!(in_time_wait >= ports.len(), "the proxy's side went through TIME_WAIT ({in_time_wait} sockets)");
    assert!(proxy.served.load(std::sync::atomic::Ordering::Relaxed) >= 2001);
}

#[test]
fn external_client_reaches_node_port_and_load_balancer_frontends() {
    require_root!();
    let lab = Lab::new().unwrap();
    let mut nodes = nodes(&lab);
    let _servers = servers(&lab, &["n1-p2", "n2-p1"]);
    let node1 = lab.node(0).ip;
    let frontend = |addr, port, kind| Frontend { addr, port, proto: Proto::Tcp, kind };
    let remote_np = service(frontend(node1, 30080, FrontendKind::NodePort), &[lab.pod("n2-p1").ip], 8080);
    let local_np = service(frontend(node1, 30090, FrontendKind::NodePort), &[lab.pod("n1-p2").ip], 8080);
    let lb = service(frontend(Ipv4Addr::new(172, 20, 0, 10), 80, FrontendKind::External), &[lab.pod("n2-p1").ip], 8080);
    let mut l7_np = service(frontend(node1, 30081, FrontendKind::NodePort), &[lab.pod("n2-p1").ip], 8080);
    l7_np.proxy_port = Some(15001);
    let _proxy = proxy_listener(&lab, &mut nodes[0], 15001);
    for svc in [&remote_np, &local_np, &lb, &l7_np] {
        nodes[0].dp.upsert_service(svc).unwrap();
    }

    // Remote backend: DNAT + SNAT on node1, the reply comes back through it.
    for _ in 0..5 {
        let (resp, _, peer) =
            get_once(&lab.ext_netns, sa(node1, 30080), "/", T).expect("NodePort via a remote backend");
        assert_eq!(resp.field("name"), Some("n2-p1"));
        assert_eq!(peer, sa(node1, 30080));
        let backend_saw: SocketAddr = resp.field("peer").unwrap().parse().unwrap();
        assert_eq!(backend_saw.ip(), std::net::IpAddr::V4(node1), "SNAT to the node for a remote backend");
    }
    // Local backend: DNAT only; the backend sees the real client.
    let (resp, local, _) = get_once(&lab.ext_netns, sa(node1, 30090), "/", T).expect("NodePort via a local backend");
    assert_eq!(resp.field("name"), Some("n1-p2"));
    assert_eq!(resp.field("peer").unwrap().parse::<SocketAddr>().unwrap(), local);
    // LoadBalancer address routed to node1.
    let (resp, _, peer) =
        get_once(&lab.ext_netns, sa(Ipv4Addr::new(172, 20, 0, 10), 80), "/", T).expect("LoadBalancer IP");
    assert_eq!(resp.field("name"), Some("n2-p1"));
    assert_eq!(peer, sa(Ipv4Addr::new(172, 20, 0, 10), 80));
    // L7 NodePort: the proxy answers, seeing the node address and NodePort as its local address.
    let (resp, _, _) = get_once(&lab.ext_netns, sa(node1, 30081), "/", T).expect("L7 NodePort");
    assert_eq!(resp.field("name"), Some("proxy-1"));
    assert_eq!(resp.field("local").unwrap(), "192.168.50.1:30081");
}

#[test]
fn node_process_reaches_plain_and_l7_cluster_ips() {
    require_root!();
    let lab = Lab::new().unwrap();
    let mut nodes = nodes(&lab);
    let backends = ["n1-p2", "n2-p1"];
    let _servers = servers(&lab, &backends);
    nodes[0].dp.upsert_service(&service(cluster_ip(80), &backends.map(|p| lab.pod(p).ip), 8080)).unwrap();
    let _proxy = proxy_listener(&lab, &mut nodes[0], 15002);
    let mut l7 = service(cluster_ip(81), &[lab.pod("n2-p1").ip], 8080);
    l7.proxy_port = Some(15002);
    nodes[0].dp.upsert_service(&l7).unwrap();

    let lines = node_process_get(&lab, 0, sa(VIP, 80), 20);
    let names: BTreeSet<&str> = lines.iter().map(|l| field(l, "name")).collect();
    assert_eq!(names, backends.into_iter().collect(), "{lines:?}");
    for l in &lines {
        assert_eq!(field(l, "status"), "200");
        assert_eq!(field(l, "peer"), "10.96.0.10:80", "getpeername shows the Service address: {l}");
    }

    let lines = node_process_get(&lab, 0, sa(VIP, 81), 5);
    for l in &lines {
        assert_eq!(field(l, "name"), "proxy-1", "{l}");
        assert_eq!(field(l, "peer"), "10.96.0.10:81", "{l}");
        // The body's own local= is the proxy's view: the Service address.
        assert!(l.contains("local=10.96.0.10:81 peer=192.168.50.1:"), "proxy sees VIP locally, the node as peer: {l}");
    }
}

#[test]
fn pod_process_uses_socket_load_balancing_without_packet_nat() {
    require_root!();
    let lab = Lab::new().unwrap();
    let mut nodes = nodes(&lab);
    let _servers = servers(&lab, &["n2-p1"]);
    nodes[0].dp.upsert_service(&service(cluster_ip(80), &[lab.pod("n2-p1").ip], 8080)).unwrap();
    let _ = nodes[0].drain_events();
    // A process of pod n1-p1, under node1's cgroup like a pod under the root cgroup.
    let pod = lab.pod("n1-p1");
    let mut cmd = std::process::Command::new(lab_helper());
    cmd.args(["get", "10.96.0.10:80", "/", "3"]);
    let out = lab.run(&pod.netns, Some(&lab.node(0).cgroup), &mut cmd, std::time::Duration::from_secs(20)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for l in text.lines() {
        assert_eq!(field(l, "status"), "200");
        assert_eq!(field(l, "peer"), "10.96.0.10:80", "getpeername shows the Service: {l}");
    }
    let events = nodes[0].drain_events();
    let sock: Vec<_> = events.iter().filter(|e| e.r#type as u32 == weft_ebpf::abi::EV_SOCK).collect();
    assert_eq!(sock.len(), 3, "one translation per connect");
    assert_eq!(sock[0].subtype as u32, weft_ebpf::abi::OBS_FROM_ENDPOINT);
    let translated_packets = events
        .iter()
        .filter(|e| e.r#type as u32 == weft_ebpf::abi::EV_TRACE && e.flags as u32 & weft_ebpf::abi::EVF_XLATED_DST != 0)
        .count();
    assert_eq!(translated_packets, 0, "packets go straight to the backend: nothing to translate");
}

#[test]
fn a_full_map_is_an_error_that_names_it() {
    require_root!();
    let lab = Lab::new().unwrap();
    let mut node = weft_tests::node::LabNode::open(&lab, 0, |c| c.map_sizes.services = 4).unwrap();
    let b = [lab.pod("n1-p2").ip];
    node.dp.upsert_service(&service(cluster_ip(80), &b, 8080)).unwrap();
    node.dp.upsert_service(&service(cluster_ip(81), &b, 8080)).unwrap();
    let err = node.dp.upsert_service(&service(cluster_ip(82), &b, 8080)).unwrap_err().to_string();
    assert_eq!(err, "map weft_services is full (4 entries): raise map-sizes.services");
    // What was written before still works.
    assert_eq!(node.dp.frontends().unwrap().len(), 2);
    // A frontend is written whole or not at all: one that would grow past
    // the map keeps what it had, and no backend is taken for it.
    let two = [lab.pod("n1-p2").ip, lab.pod("n2-p1").ip];
    let err = node.dp.upsert_service(&service(cluster_ip(81), &two, 8080)).unwrap_err().to_string();
    assert_eq!(err, "map weft_services is full (4 entries): raise map-sizes.services");
    assert_eq!(node.dp.map_usage().iter().find(|u| u.0 == "backends").map(|u| u.1), Some(1));
    // Room freed is room used.
    node.dp.delete_service(&cluster_ip(80)).unwrap();
    node.dp.upsert_service(&service(cluster_ip(81), &two, 8080)).unwrap();
    assert_eq!(node.dp.frontends().unwrap().len(), 1);
    assert_eq!(node.dp.map_usage().iter().find(|u| u.0 == "services").map(|u| u.1), Some(3));
}

/// A full `weft_policy` keeps denies before allows: the entries that fit are
/// written denies first (an enforcing pod then refuses more than its policy
/// says, not less), the call says the map is full, and the stale entries of
/// the endpoint make room for the next policy.
#[test]
fn a_full_policy_map_keeps_the_denies() {
    use weft_agent::datapath::{Direction, PolicyAction, PolicyEntry};
    require_root!();
    let lab = Lab::new().unwrap();
    let mut node = weft_tests::node::LabNode::open(&lab, 0, |c| c.map_sizes.policy = 2).unwrap();
    let entry = |identity, port, action| PolicyEntry {
        direction: Direction::Ingress,
        identity,
        proto: Some(Proto::Tcp),
        ports: Some((port, port)),
        action,
        rule_id: identity,
        proxy_port: None,
    };
    let held = || -> Vec<(u32, u8)> {
        let pin = lab.node(0).bpffs_dir.join("maps/weft_policy");
        let data = aya::maps::MapData::from_pin(&pin).unwrap();
        let trie: aya::maps::LpmTrie<_, weft_ebpf::abi::PolicyMatch, weft_ebpf::abi::PolicyVal> =
            aya::maps::LpmTrie::try_from(aya::maps::Map::LpmTrie(data)).unwrap();
        let mut out: Vec<(u32, u8)> =
            trie.iter().map(|e| e.unwrap()).map(|(k, v)| (k.data().identity, v.action)).collect();
        out.sort();
        out
    };
    let (allow, deny) = (weft_ebpf::abi::POLICY_ALLOW as u8, weft_ebpf::abi::POLICY_DENY as u8);
    let err = node
        .dp
        .set_policy(
            1,
            &[entry(7, 80, PolicyAction::Allow), entry(8, 80, PolicyAction::Allow), entry(9, 80, PolicyAction::Deny)],
        )
        .unwrap_err()
        .to_string();
    assert_eq!(err, "map weft_policy is full (2 entries): raise map-sizes.policy");
    assert_eq!(held(), vec![(7, allow), (9, deny)], "the deny and the first allow");
    // A policy that fits once the stale entries are out replaces it whole.
    node.dp.set_policy(1, &[entry(10, 80, PolicyAction::Allow), entry(11, 80, PolicyAction::Allow)]).unwrap();
    assert_eq!(held(), vec![(10, allow), (11, allow)]);
    node.dp.set_policy(1, &[]).unwrap();
    assert_eq!(held(), vec![]);
}

/// A host policy stays in force across a restart of the agent: the entries
/// of the node (endpoint 0) stay pinned in `weft_policy`, and a datapath
/// opened again keeps the directions the pinned `weft_config` enforces
/// until the reconciler says otherwise. Before, opening wrote the config
/// afresh, and the node took anything from the restart until the first
/// snapshot was applied (pods kept theirs: their endpoints keep their flags).
#[test]
fn a_reopened_datapath_keeps_the_host_policy_in_force() {
    require_root!();
    let lab = Lab::new().unwrap();
    let config = || {
        let pin = lab.node(0).bpffs_dir.join("maps/weft_config");
        let data = aya::maps::MapData::from_pin(&pin).unwrap();
        let array: aya::maps::Array<_, weft_ebpf::abi::Config> =
            aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap();
        array.get(&0, 0).unwrap().host_policy
    };
    let mut node = weft_tests::node::LabNode::open(&lab, 0, |_| {}).unwrap();
    assert_eq!(node.dp.config().host_policy, (false, false));
    node.dp.reconfigure(|c| c.host_policy = (true, false)).unwrap();
    drop(node);
    let mut node = weft_tests::node::LabNode::open(&lab, 0, |_| {}).unwrap();
    assert_eq!(node.dp.config().host_policy, (true, false), "kept by the new run");
    assert_eq!(u32::from(config()), weft_ebpf::abi::EP_POLICY_INGRESS, "and in the map the programs read");
    // The reconciler lifts it when no host policy selects the node any more.
    node.dp.reconfigure(|c| c.host_policy = (false, false)).unwrap();
    drop(node);
    let node = weft_tests::node::LabNode::open(&lab, 0, |_| {}).unwrap();
    assert_eq!((node.dp.config().host_policy, config()), ((false, false), 0));
}

/// Issue 18: the reconciler hands a frontend to its proxy port only once
/// the datapath holds a listening socket for that port; until then the
/// frontend keeps what the map holds for it (here: new, so its backends).
/// Once handed over it stays with the proxy port even when the socket goes
/// (refused, never sent around the proxy). The maps are checked (the
/// reconciler, given only this Service, takes the lab's pods out); the lab
/// test in tests/tests/envoy.rs sends the traffic.
#[test]
fn a_frontend_goes_to_its_proxy_port_only_once_the_datapath_holds_the_socket() {
    use weft_agent::{
        k8s::ObjKey,
        netns,
        reconcile::{AwaitingProxy, Reconciler},
        state::{ServiceState, Snapshot},
    };
    require_root!();
    let lab = Lab::new().unwrap();
    let mut nodes = nodes(&lab);
    let f = cluster_ip(80);
    let mut svc = service(f, &[lab.pod("n2-p1").ip], 8080);
    svc.proxy_port = Some(15003);
    let snap = Snapshot {
        version: 1,
        services: vec![std::sync::Arc::new(ServiceState { key: ObjKey::new("default", "web"), entries: vec![svc] })]
            .into(),
        ..Default::default()
    };
    let ns = netns::named(&nodes[0].netns);
    let mut rec = Reconciler::new(Vec::new());
    let mut apply = |node: &mut weft_tests::node::LabNode| {
        netns::run_in(Some(&ns), || rec.apply(&mut node.dp, &snap, &BTreeMap::new())).unwrap().unwrap()
    };
    let awaiting = |kept| vec![AwaitingProxy { frontend: f.to_string(), proxy_port: 15003, kept_proxy_port: kept }];

    let a = apply(&mut nodes[0]);
    assert_eq!(a.awaiting_proxy, awaiting(None));
    assert_eq!(nodes[0].dp.written_proxy_port(&f), None, "its backends until the socket is there");

    let proxy = proxy_listener(&lab, &mut nodes[0], 15003);
    let a = apply(&mut nodes[0]);
    assert!(a.awaiting_proxy.is_empty(), "{:?}", a.awaiting_proxy);
    assert_eq!(nodes[0].dp.written_proxy_port(&f), Some(15003));

    // The proxy's socket closes: its map entry goes with it.
    drop(proxy);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while nodes[0].dp.proxy_ports_registered().contains(&15003) {
        assert!(std::time::Instant::now() < deadline, "the closed socket stays in the map");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let a = apply(&mut nodes[0]);
    assert_eq!(a.awaiting_proxy, awaiting(Some(15003)));
    assert_eq!(nodes[0].dp.written_proxy_port(&f), Some(15003), "still handed to the proxy port");
}
