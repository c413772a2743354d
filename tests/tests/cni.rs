//! Pods made the way a container runtime makes them: Debian's `ptp` with
//! `host-local` IPAM, then `weft-cni`, each run with the CNI environment,
//! stdin and stdout, in node1's namespace, against node1's agent (with
//! `cni-socket`). ADD returns only once the agent has attached the datapath
//! to the veth ptp made, DEL only once it has detached it; in between, real
//! packets: pod to pod (on the node and across nodes), through a Service the
//! datapath translates, and a NetworkPolicy's drop, seen as a flow.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use serde_json::{Value, json};
use weft_tests::{
    cni::{Sandbox, host_side, invoke as plugin, ptp_conf, weft_cni_conf},
    flows::{agent_get, flows_of, metric_sum, observe_json, wait_for},
    http::{HttpServer, ServerOpts, get_once},
    lab::{Lab, sysctl_in},
    objects::{AgentFiles, agent_files, lab_objects, start_agent, wait_ready, workspace_binary, write_atomic},
    require_root,
    scenario::sa,
};

const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
/// Connections expected to fail wait this long.
const DENIED: Duration = Duration::from_millis(500);
const T: Duration = Duration::from_secs(3);

fn device_pins(links: &Path, dev: &str) -> usize {
    std::fs::read_dir(links)
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().starts_with(&format!("dev:{dev}@"))).count())
        .unwrap_or(0)
}

/// Fails the test with the agent's log.
fn die(log: &Path, what: &dyn std::fmt::Display) -> ! {
    panic!("{what}\nagent log:\n{}", std::fs::read_to_string(log).unwrap_or_default())
}

/// Whether a GET from `ns` to `to` is answered by the server named `by`.
fn reaches(ns: &str, to: SocketAddr, by: &str) -> bool {
    match get_once(ns, to, "/", DENIED) {
        Ok((r, _, _)) => r.status == 200 && r.header("x-served-by") == Some(by),
        Err(_) => false,
    }
}

/// The lab, the two CNI pods as Pod objects without addresses (weft-cni
/// gives them), the Service web -> cni-web:8080 (when its address is known)
/// and `extra` objects.
fn objects(lab: &Lab, web_ip: Option<Ipv4Addr>, extra: &str) -> String {
    let mut y = lab_objects(lab, &[]);
    for (name, app) in [("cni-client", "cni-client"), ("cni-web", "cni-web")] {
        y += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}\nspec:\n  nodeName: node1\n  containers: [{{name: app, image: lab, ports: [{{name: http, containerPort: 8080}}]}}]\n---\n"
        );
    }
    if let Some(ip) = web_ip {
        y += &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: default}}\nspec:\n  clusterIP: {WEB_VIP}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n\
             apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: web}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n- addresses: [{ip}]\n  conditions: {{ready: true}}\n  nodeName: node1\n  targetRef: {{kind: Pod, name: cni-web, namespace: default}}\n---\n"
        );
    }
    y + extra
}

/// cni-web accepts only cni-client, and only on its port named http.
const WEB_INGRESS: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-in, namespace: default}
spec:
  podSelector: {matchLabels: {app: cni-web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: cni-client}}}]
    ports: [{port: http}]
";

#[test]
fn pods_made_by_ptp_then_weft_cni_are_wired_before_add_returns_carry_traffic_and_are_unwired_by_del() {
    require_root!();
    if let Some(reason) = weft_tests::cni::skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    let lab = Lab::new().unwrap();
    let node = lab.node(0).clone();
    let pods: Vec<Sandbox> = ["cni-client", "cni-web"]
        .into_iter()
        .enumerate()
        .map(|(i, name)| Sandbox {
            namespace: "default".into(),
            name: name.into(),
            netns: format!("weft-{}-n1-cni{i}", lab.id),
            container_id: format!("cafe0{i}"),
        })
        .collect();
    for p in &pods {
        Command::new("ip").args(["netns", "add", &p.netns]).status().unwrap();
        sysctl_in(&p.netns, "net/ipv6/conf/all/disable_ipv6", "1").unwrap();
    }

    // The Pod objects exist (the scheduler bound them); their addresses do not yet.
    let files: AgentFiles = agent_files(
        &lab,
        0,
        &format!("cni-socket: {}\nenvoy: {{enabled: false}}\n", lab.run_dir.join("cni.sock").display()),
    )
    .unwrap();
    write_atomic(&files.objects_dir.join("lab.yaml"), &objects(&lab, None, "")).unwrap();
    let log = lab.run_dir.join("agent.log");
    let pid = start_agent(&lab, 0, &files, &log).unwrap();
    let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_ready(&files, Duration::from_secs(30), || lab.running(pid)).unwrap_or_else(|e| die(&log, &e));

    // The primary plugin: a veth per pod, the pod's address from host-local,
    // the gateway (the node's side) as the pod's default route.
    let ptp = ptp_conf("lab", "10.1.1.128/25", None, &lab.run_dir.join("ipam"));
    let ptp_bin = weft_tests::cni::plugin("ptp");
    let prev: Vec<Value> = pods
        .iter()
        .map(|p| {
            let (ok, prev) = plugin(&node.netns, &ptp_bin, "ADD", p, &ptp);
            assert!(ok, "ptp ADD {}: {prev}", p.name);
            prev
        })
        .collect();
    let (client_if, _) = host_side(&prev[0]).unwrap();
    let (web_if, web_ip) = host_side(&prev[1]).unwrap();
    let (client, web) = (&pods[0].netns, &pods[1].netns);
    let _web = [8080, 9090].map(|port| {
        HttpServer::start(web, sa(web_ip, port), ServerOpts { name: format!("cni-web:{port}"), ..Default::default() })
            .unwrap()
    });
    let n2p1 = lab.pod("n2-p1");
    let _remote =
        HttpServer::start(&n2p1.netns, sa(n2p1.ip, 8080), ServerOpts { name: "n2-p1".into(), ..Default::default() })
            .unwrap();
    // ptp's pods carry packets before weft is involved at all.
    assert!(reaches(client, sa(web_ip, 8080), "cni-web:8080"), "pod to pod through ptp alone");
    write_atomic(&files.objects_dir.join("lab.yaml"), &objects(&lab, Some(web_ip), "")).unwrap();

    let weft_cni: PathBuf = workspace_binary("weft-cni");
    let socket = lab.run_dir.join("cni.sock");
    let conf = |prev: Option<&Value>| weft_cni_conf("lab", &socket, prev);
    let links = node.bpffs_dir.join("links");
    for (p, (prev, dev)) in pods.iter().zip(prev.iter().zip([&client_if, &web_if])) {
        assert_eq!(device_pins(&links, dev), 0, "nothing attached to {dev} before ADD");
        let (ok, out) = plugin(&node.netns, &weft_cni, "ADD", p, &conf(Some(prev)));
        if !ok {
            die(&log, &format!("weft-cni ADD {}: {out}", p.name));
        }
        let mut passed_on = prev.clone();
        passed_on["cniVersion"] = json!("1.1.0");
        assert_eq!(out, passed_on, "weft-cni passes the primary plugin's result on, in its config's version");
        assert_eq!(device_pins(&links, dev), 2, "ADD returned with both programs attached to {dev}");
        assert!(plugin(&node.netns, &weft_cni, "CHECK", p, &conf(Some(prev))).0, "CHECK {}", p.name);
    }

    // Packets: pod to pod on the node, through the Service (translated by
    // the datapath on the client's veth), across nodes both ways.
    wait_for(Duration::from_secs(10), "the Service web through the datapath", || {
        reaches(client, sa(WEB_VIP, 80), "cni-web:8080").then_some(())
    })
    .unwrap_or_else(|e| die(&log, &e));
    for _ in 0..3 {
        let (r, _, peer) = get_once(client, sa(WEB_VIP, 80), "/", T).unwrap_or_else(|e| die(&log, &e));
        assert_eq!((r.status, r.header("x-served-by")), (200, Some("cni-web:8080")));
        assert_eq!(peer, sa(WEB_VIP, 80), "the client sees the Service address (reverse translation)");
    }
    assert!(reaches(client, sa(web_ip, 8080), "cni-web:8080"), "pod to pod");
    assert!(reaches(client, sa(web_ip, 9090), "cni-web:9090"), "pod to pod, another port");
    assert!(reaches(client, sa(n2p1.ip, 8080), "n2-p1"), "to a pod of node2");
    assert!(reaches(&n2p1.netns, sa(web_ip, 8080), "cni-web:8080"), "from a pod of node2");

    // A NetworkPolicy on cni-web: the client on port http only.
    write_atomic(&files.objects_dir.join("lab.yaml"), &objects(&lab, Some(web_ip), &format!("---\n{WEB_INGRESS}")))
        .unwrap();
    wait_for(Duration::from_secs(10), "the policy in the datapath", || {
        (!reaches(client, sa(web_ip, 9090), "cni-web:9090")).then_some(())
    })
    .unwrap_or_else(|e| die(&log, &e));
    assert!(reaches(client, sa(web_ip, 8080), "cni-web:8080"), "the allowed port");
    assert!(reaches(client, sa(WEB_VIP, 80), "cni-web:8080"), "the allowed port through the Service");
    assert!(!reaches(&n2p1.netns, sa(web_ip, 8080), "cni-web:8080"), "a pod the policy does not name");
    let drops = wait_for(Duration::from_secs(10), "policy drops to cni-web", || {
        let r = observe_json(&files, &["--all", "--type", "drop", "--to-pod", "default/cni-web"]).ok()?;
        let f: Vec<Value> = flows_of(&r).into_iter().cloned().collect();
        (f.len() >= 2).then_some(f)
    })
    .unwrap_or_else(|e| die(&log, &e));
    for d in &drops {
        assert_eq!(d["drop_reason_desc"], "POLICY_DENIED", "{d}");
        assert_eq!(d["destination"]["pod_name"], "cni-web", "the pod named from its CNI registration: {d}");
    }
    assert!(drops.iter().any(|d| d["source"]["pod_name"] == "cni-client"), "{drops:?}");
    assert!(drops.iter().any(|d| d["source"]["pod_name"] == "n2-p1"), "{drops:?}");
    let m = agent_get(&lab, 0, "/metrics").unwrap();
    assert!(
        metric_sum(&m, "weft_policy_verdicts_total", &[("direction", "ingress"), ("action", "dropped")]) >= 2.0,
        "{m}"
    );

    for (p, (prev, dev)) in pods.iter().zip(prev.iter().zip([&client_if, &web_if])) {
        let (ok, out) = plugin(&node.netns, &weft_cni, "DEL", p, &conf(Some(prev)));
        assert!(ok, "weft-cni DEL {}: {out}", p.name);
        assert_eq!(device_pins(&links, dev), 0, "DEL returned with the programs detached from {dev}");
        assert!(plugin(&node.netns, &weft_cni, "DEL", p, &conf(None)).0, "a second DEL of {} succeeds", p.name);
    }
    // Without the datapath on the client's veth nothing translates the Service.
    assert!(!reaches(client, sa(WEB_VIP, 80), "cni-web:8080"), "the Service after DEL");
    for p in &pods {
        let (ok, out) = plugin(&node.netns, &ptp_bin, "DEL", p, &ptp);
        assert!(ok, "ptp DEL {}: {out}", p.name);
    }
    assert!(lab.running(pid), "the agent kept running: {}", agent_log());
}
