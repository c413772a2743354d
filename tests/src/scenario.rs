//! Building blocks the integration tests, benches and demo share: both nodes
//! loaded, servers in pods, Services, a stand-in proxy, node processes.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use weft_agent::datapath::{BackendAddr, Frontend, FrontendKind, Proto, ServiceEntry};

use crate::{
    http::{HttpServer, ServerOpts},
    lab::Lab,
    node::LabNode,
};

/// Timeout for a single lab request.
pub const T: Duration = Duration::from_secs(3);
/// The ClusterIP tests use.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// An IPv4 socket address.
pub fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// Both nodes loaded, the lab registered on each.
pub fn nodes(lab: &Lab) -> Vec<LabNode> {
    (0..2)
        .map(|i| {
            let mut n = LabNode::open(lab, i, |_| {}).expect("datapath loads");
            n.install_lab(lab).expect("lab registers");
            n
        })
        .collect()
}

/// HTTP servers on port 8080 of the named pods.
pub fn servers(lab: &Lab, pods: &[&str]) -> Vec<HttpServer> {
    pods.iter()
        .map(|p| {
            let pod = lab.pod(p);
            HttpServer::start(&pod.netns, sa(pod.ip, 8080), ServerOpts { name: p.to_string(), ..Default::default() })
                .expect("server starts")
        })
        .collect()
}

/// A Service entry with backends on `port`.
pub fn service(frontend: Frontend, backends: &[Ipv4Addr], port: u16) -> ServiceEntry {
    ServiceEntry {
        frontend,
        backends: backends.iter().map(|a| BackendAddr { addr: *a, port }).collect(),
        proxy_port: None,
    }
}

/// The test ClusterIP frontend on `port`.
pub fn cluster_ip(port: u16) -> Frontend {
    Frontend { addr: VIP, port, proto: Proto::Tcp, kind: FrontendKind::ClusterIp }
}

/// A stand-in for Envoy: a transparent listener on 127.0.0.1:port in the node.
pub fn proxy_listener(lab: &Lab, node: &mut LabNode, port: u16) -> HttpServer {
    let ns = lab.node(node.idx).netns.clone();
    let opts = ServerOpts {
        name: format!("proxy-{}", node.idx + 1),
        close_after_response: true,
        transparent: true,
        echo: None,
    };
    let server = HttpServer::start(&ns, sa(Ipv4Addr::LOCALHOST, port), opts).expect("proxy listener starts");
    node.dp.register_proxy_socket(port, server.listener()).expect("listener registered");
    server
}

/// Runs `weft-lab get` as a process of node `idx` (its namespace and cgroup).
pub fn node_process_get(lab: &Lab, idx: usize, to: SocketAddr, count: u32) -> Vec<String> {
    let node = lab.node(idx);
    let mut cmd = std::process::Command::new(lab_helper());
    cmd.args(["get", &to.to_string(), "/", &count.to_string()]);
    let out = lab.run(&node.netns, Some(&node.cgroup), &mut cmd, Duration::from_secs(20)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "node process failed: {text} {}", String::from_utf8_lossy(&out.stderr));
    text.lines().map(str::to_owned).collect()
}

/// A `key=value` field of a `weft-lab get` line.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')).unwrap_or("")
}

/// The `weft-lab` helper binary: $WEFT_LAB_BIN, or next to the running
/// test or bench binary.
pub fn lab_helper() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("WEFT_LAB_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    // Integration tests run from target/<profile>/deps; binaries sit one level up.
    let up = if dir.ends_with("deps") { dir.parent().unwrap() } else { dir };
    up.join("weft-lab")
}
