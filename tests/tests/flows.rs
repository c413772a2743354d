//! Flows in the lab (issue: flows): the agents' datapath records and Envoy's
//! access log become flows that `weft observe` reads, joined, filtered and
//! followed; Debian's Prometheus scrapes the flow metrics; an OTLP receiver
//! built from the upstream protos gets the flows, through an outage; and an
//! overloaded ring buffer reports its losses, which add up.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use weft_tests::{
    envoylab::EnvoyLab,
    flows::{
        OtlpReceiver, Prometheus, agent_get, flow_lab, flow_objects, flow_socket, flows_of, metric_sum, observe_json,
        spawn_lines, traffic, wait_for, wait_http_flows,
    },
    objects::workspace_binary,
    require_root,
    scenario::sa,
};

fn pod<'a>(f: &'a Value, side: &str) -> &'a str {
    f[side]["pod_name"].as_str().unwrap_or("")
}

#[test]
fn observe_shows_plain_l7_and_denied_traffic_joined() {
    require_root!();
    let env = flow_lab("");
    traffic(&env, 3);
    wait_http_flows(&env, 6);

    let all = observe_json(&env.files[0], &["--all"]).unwrap();
    let flows = flows_of(&all);
    let find = |what: &str, pred: &dyn Fn(&Value) -> bool| -> Vec<&Value> {
        let found: Vec<&Value> = flows.iter().copied().filter(|f| pred(f)).collect();
        assert!(
            !found.is_empty(),
            "no flow for {what} among:\n{}",
            all.iter().map(|v| v.to_string()).collect::<Vec<_>>().join("\n")
        );
        found
    };

    // Plain Service: DNAT at the client's egress, the Service named, the backend as destination.
    let web = find("web", &|f| f["destination_service"]["name"] == "web" && f["l7"].is_null());
    let first = web[0];
    assert_eq!(first["verdict"], "FORWARDED");
    assert_eq!(pod(first, "source"), "n1-p1");
    assert_eq!(first["IP"]["destination"], env.lab.pod("n2-p1").ip.to_string(), "after DNAT");
    assert_eq!(first["trace_observation_point"], "FROM_ENDPOINT");
    assert_eq!(first["event_type"]["type"], 4);
    assert_eq!(first["traffic_direction"], "EGRESS");
    assert_eq!(first["node_name"], "node1");
    assert!(first["Summary"].as_str().unwrap().starts_with("TCP Flags:"));
    // Its replies come back to the client: to-endpoint, is_reply.
    find("web replies", &|f| {
        pod(f, "destination") == "n1-p1" && f["is_reply"] == true && f["trace_observation_point"] == "TO_ENDPOINT"
    });

    // The L7 Service: the connection was redirected to the proxy...
    find("hello redirected", &|f| {
        f["verdict"] == "REDIRECTED"
            && f["trace_observation_point"] == "TO_PROXY"
            && f["destination_service"]["name"] == "hello"
    });
    // ...and each request has an HTTP request and response flow, joined to that verdict.
    let responses = find("hello responses", &|f| f["l7"]["type"] == "RESPONSE");
    assert_eq!(responses.len(), 3);
    for r in &responses {
        let h = &r["l7"]["http"];
        assert_eq!((h["code"].as_u64(), h["method"].as_str()), (Some(200), Some("GET")));
        assert!(h["url"].as_str().unwrap().starts_with("http://hello.default/api/items/"), "{h}");
        assert_eq!(pod(r, "source"), "n2-p1", "the backend that answered");
        assert_eq!(pod(r, "destination"), "n1-p1");
        assert_eq!(r["source_service"]["name"], "hello");
        assert_eq!(r["is_reply"], true);
        // uint64 travels as a string in protobuf's JSON.
        assert!(r["l7"]["latency_ns"].as_str().unwrap().parse::<u64>().unwrap() > 0);
        assert_eq!(r["trace_context"]["parent"]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        let link = &r["extensions"];
        assert_eq!(link["@type"], "type.googleapis.com/weft.FlowLink", "{r}");
        assert_eq!(link["downstream"]["verdict"], "REDIRECTED");
        assert_eq!(link["downstream"]["path"], serde_json::json!(["FROM_ENDPOINT", "TO_PROXY"]));
        assert_eq!(link["downstream"]["frontend"], "10.96.0.20:80");
        assert!(r["Summary"].as_str().unwrap().contains("conn from-endpoint > to-proxy:"), "{}", r["Summary"]);
    }
    let requests = find("hello requests", &|f| f["l7"]["type"] == "REQUEST");
    assert_eq!(requests.len(), 3);
    assert!(requests.iter().all(|f| f["traffic_direction"] == "EGRESS" && pod(f, "source") == "n1-p1"));

    // Denied by policy: a policy verdict and a drop with the reason. These
    // are the only drops: the L7 Service is handed to the proxy only once
    // the datapath holds its socket, so no SYN meets a missing socket
    // (SOCKET_LOOKUP_FAILED).
    let drops = find("policy drops", &|f| f["verdict"] == "DROPPED" && f["event_type"]["type"] == 1);
    for d in &drops {
        assert_eq!(d["drop_reason_desc"], "POLICY_DENIED");
        assert_eq!(d["event_type"]["sub_type"], 133);
        assert_eq!(pod(d, "source"), "n1-p1");
        assert_eq!(pod(d, "destination"), "n1-p2");
    }
    find("policy verdict", &|f| {
        f["event_type"]["type"] == 5
            && f["verdict"] == "DROPPED"
            && f["traffic_direction"] == "INGRESS"
            && pod(f, "destination") == "n1-p2"
    });

    // --last 100: at most 100, the newest ones (the HTTP flows came last).
    let last = observe_json(&env.files[0], &["--last", "100"]).unwrap();
    assert!(flows_of(&last).len() <= 100 && !flows_of(&last).is_empty());
    // Filters: only the drops, only HTTP 200 GETs, only the pod's egress.
    let d = observe_json(&env.files[0], &["--all", "--verdict", "DROPPED", "--to-pod", "default/n1-p2"]).unwrap();
    assert!(!flows_of(&d).is_empty() && flows_of(&d).iter().all(|f| f["verdict"] == "DROPPED"));
    let h = observe_json(
        &env.files[0],
        &["--all", "--http-status", "200", "--http-method", "get", "--http-path", "^/api/items/[0-9]+$"],
    )
    .unwrap();
    assert_eq!(flows_of(&h).len(), 3);
    let t = observe_json(&env.files[0], &["--all", "-t", "trace:to-proxy"]).unwrap();
    assert!(!flows_of(&t).is_empty() && flows_of(&t).iter().all(|f| f["trace_observation_point"] == "TO_PROXY"));
    let n =
        observe_json(&env.files[0], &["--all", "--not", "--verdict", "FORWARDED", "--not", "--verdict", "REDIRECTED"])
            .unwrap();
    assert!(flows_of(&n).iter().all(|f| f["verdict"] != "FORWARDED" && f["verdict"] != "REDIRECTED"));

    // --follow with a filter streams only new matching flows.
    let (mut child, rx) = spawn_lines(Command::new(workspace_binary("weft")).args([
        "observe",
        "--server",
        &flow_socket(&env.files[0]),
        "-o",
        "json",
        "-f",
        "--verdict",
        "DROPPED",
    ]));
    std::thread::sleep(Duration::from_millis(500));
    traffic(&env, 1);
    let mut streamed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            streamed.push(serde_json::from_str::<Value>(&l).unwrap());
        } else if !streamed.is_empty() {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let fl = flows_of(&streamed);
    assert!(!fl.is_empty(), "the new drop was streamed");
    assert!(fl.iter().all(|f| f["verdict"] == "DROPPED"), "{streamed:?}");

    // The compact line reads like Hubble's.
    let out = Command::new(workspace_binary("weft"))
        .args(["observe", "--server", &flow_socket(&env.files[0]), "--all", "--protocol", "http", "--color", "never"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().any(|l| l.contains("default/n1-p1:")
            && l.contains("-> default/n2-p1:8080")
            && l.contains("http-request FORWARDED (HTTP/1.1 GET http://hello.default/api/items/")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("<- default/n2-p1:8080") && l.contains("http-response FORWARDED (HTTP/1.1 200")),
        "{text}"
    );

    // `weft status`: flow counts, losses, and each object's state.
    let out = env
        .lab
        .run(
            &env.lab.node(0).netns,
            None,
            Command::new(workspace_binary("weft")).args(["status", "--server", &flow_socket(&env.files[0])]),
            Duration::from_secs(10),
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("Healthcheck (via unix://") && text.contains("): Ok"), "{text}");
    assert!(text.contains("Current/Max Flows: ") && text.contains("/4,095 ("), "{text}");
    assert!(text.contains("Lost events: agent_queue=0 flow_store=0 kernel_ring_buffer=0 otlp_exporter=0"), "{text}");
    assert!(text.contains("EnvoyConfig default/hello-l7") && text.contains("envoy: acknowledged"), "{text}");
}

#[test]
fn prometheus_scrapes_flow_counters_that_match_the_traffic() {
    require_root!();
    let env = flow_lab("");
    let prom = Prometheus::start(&env.lab, 0, &env.lab.run_dir.join("prometheus")).unwrap_or_else(|e| env.fail(e));
    let n = 7;
    traffic(&env, n);
    wait_http_flows(&env, 2 * n);
    // Let the traffic settle (replies, FINs), then two scrapes.
    std::thread::sleep(Duration::from_secs(3));
    let text = agent_get(&env.lab, 0, "/metrics").unwrap();
    let all = observe_json(&env.files[0], &["--all"]).unwrap();
    let flows = flows_of(&all);
    let count = |pred: &dyn Fn(&Value) -> bool| flows.iter().filter(|f| pred(f)).count() as f64;

    // What Prometheus scraped equals what the test sent and what the flow API holds.
    let q = |query: &str| {
        wait_for(Duration::from_secs(10), query, || prom.value(query).ok().flatten()).unwrap_or_else(|e| env.fail(e))
    };
    assert_eq!(q("sum(weft_http_requests_total{method=\"GET\",reporter=\"client\"})"), n as f64);
    assert_eq!(q("sum(weft_http_responses_total{status=\"200\"})"), n as f64);
    assert_eq!(q("sum(weft_http_request_duration_seconds_count)"), n as f64);
    assert_eq!(
        q("sum(weft_http_requests_total{source_namespace=\"default\",destination_workload=\"n2-p1\"})"),
        n as f64,
        "context labels name both ends"
    );
    let drops = count(&|f| f["verdict"] == "DROPPED" && f["event_type"]["type"] == 1);
    assert!(drops >= 1.0);
    assert_eq!(q("sum(weft_drop_total{reason=\"POLICY_DENIED\"})"), drops);
    assert_eq!(metric_sum(&text, "weft_drop_total", &[("reason", "POLICY_DENIED")]), drops);
    let denied = count(&|f| f["event_type"]["type"] == 5 && f["verdict"] == "DROPPED");
    assert_eq!(q("sum(weft_policy_verdicts_total{action=\"dropped\",direction=\"ingress\"})"), denied);
    let redirected = count(&|f| f["verdict"] == "REDIRECTED");
    assert_eq!(q("sum(weft_flows_processed_total{verdict=\"REDIRECTED\"})"), redirected);
    let total = flows.len() as f64;
    assert_eq!(q("sum(weft_flows_processed_total)"), total, "every stored flow was counted once");
    // The agent's own health is there too.
    for m in [
        "weft_events_read_total",
        "weft_lost_events_total",
        "weft_flow_store_flows",
        "weft_datapath_map_entries",
        "weft_xds_pushes_total",
        "weft_xds_nacks_total",
        "weft_envoy_restarts_total",
        "weft_agent_resident_memory_bytes",
    ] {
        assert!(prom.value(&format!("count({m})")).unwrap().is_some(), "{m} missing from Prometheus");
    }
    assert_eq!(q("sum(weft_lost_events_total)"), 0.0);
    assert!(q("sum(weft_xds_pushes_total)") >= 1.0);
}

#[test]
fn otlp_receiver_gets_flows_and_the_agent_rides_out_an_outage() {
    require_root!();
    // Node1 exports over gRPC, node2 over HTTP; small queues so an outage fills them.
    let env = EnvoyLab::with_config(
        flow_objects,
        "flows:\n  otlp: {endpoint: 'http://127.0.0.1:14317', interval-ms: 200, queue-size: 256, batch-size: 64, retry-ms: 1000, timeout-ms: 1000}\n",
    );
    env.acked("EnvoyConfig default/hello-l7");
    let dir = env.lab.run_dir.join("otlp");
    std::fs::create_dir_all(&dir).unwrap();
    let netns = env.lab.node(0).netns.clone();
    let rx = OtlpReceiver::start(&env.lab, &netns, &dir.join("grpc.jsonl"), 14317, 14318).unwrap();
    traffic(&env, 3);
    // Logs and spans travel in separate exports (and batches): wait for both.
    let got = wait_for(Duration::from_secs(15), "HTTP flows and their spans at the receiver", || {
        let r = rx.received();
        let gets = r.iter().filter(|x| x["kind"] == "log" && x["attributes"]["http.request.method"] == "GET").count();
        let spans = r.iter().filter(|x| x["kind"] == "span").count();
        (gets >= 6 && spans >= 3).then_some(r)
    })
    .unwrap_or_else(|e| env.fail(e));
    let logs: Vec<&Value> = got.iter().filter(|x| x["kind"] == "log").collect();
    let l7 = logs.iter().find(|x| x["attributes"]["http.response.status_code"] == 200).unwrap();
    let a = &l7["attributes"];
    assert_eq!(a["source.k8s.pod.name"], "n2-p1");
    assert_eq!(a["destination.k8s.pod.name"], "n1-p1");
    assert_eq!(a["source.k8s.namespace.name"], "default");
    assert_eq!(a["weft.verdict"], "FORWARDED");
    assert_eq!(a["weft.link.verdict"], "REDIRECTED");
    assert_eq!(a["network.transport"], "tcp");
    assert_eq!(a["url.path"].as_str().map(|p| p.starts_with("/api/items/")), Some(true));
    assert_eq!(a["k8s.node.name"], "node1");
    assert_eq!(l7["resource"]["service.name"], "weft-agent");
    assert_eq!(l7["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    let drop = logs.iter().find(|x| x["attributes"]["weft.drop_reason"] == "POLICY_DENIED").expect("a drop");
    assert_eq!(drop["severity_text"], "WARN");
    assert_eq!(drop["attributes"]["destination.k8s.pod.name"], "n1-p2");
    assert!(drop["attributes"]["destination.port"] == 8080);
    let plain = logs.iter().find(|x| x["attributes"]["weft.destination.service"] == "default/web").expect("plain");
    assert!(plain["body"].as_str().unwrap().contains("default/n1-p1:"), "{plain}");
    let spans: Vec<&Value> = got.iter().filter(|x| x["kind"] == "span").collect();
    assert_eq!(spans.len(), 3, "one span per HTTP exchange with trace context");
    assert_eq!(spans[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(spans[0]["parent_span_id"], "00f067aa0ba902b7");

    // The collector goes away; the agent keeps running, memory bounded, drops counted.
    rx.stop(&env.lab);
    let pid = env.pids[0];
    let rss = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| {
                l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap())
            })
            .unwrap()
    };
    let before = rss();
    for _ in 0..6 {
        traffic(&env, 20);
    }
    let lost = wait_for(Duration::from_secs(15), "exporter drops", || {
        let m = agent_get(&env.lab, 0, "/metrics").ok()?;
        let v = metric_sum(&m, "weft_lost_events_total", &[("source", "otlp_exporter")]);
        (v > 0.0).then_some(v)
    })
    .unwrap_or_else(|e| env.fail(e));
    assert!(env.lab.running(pid), "the agent survived");
    let after = rss();
    assert!(after < before + 64 * 1024, "agent RSS grew from {before} kB to {after} kB during the outage");
    // Plain traffic kept flowing through the datapath.
    traffic(&env, 1);

    // Back: export resumes.
    let rx = OtlpReceiver::start(&env.lab, &netns, &dir.join("grpc-2.jsonl"), 14317, 14318).unwrap();
    traffic(&env, 2);
    wait_for(Duration::from_secs(20), "export to resume", || {
        rx.received().iter().any(|x| x["attributes"]["http.request.method"] == "GET").then_some(())
    })
    .unwrap_or_else(|e| env.fail(e));
    let status: Value = serde_json::from_str(&agent_get(&env.lab, 0, "/status").unwrap()).unwrap();
    assert!(status["flows"]["lost"]["otlp_exporter"].as_f64().unwrap() >= lost);
    rx.stop(&env.lab);
}

#[test]
fn otlp_over_http_too() {
    require_root!();
    let env = EnvoyLab::with_config(
        flow_objects,
        "flows:\n  otlp: {endpoint: 'http://127.0.0.1:14318', protocol: http/protobuf, interval-ms: 200, allow: [{verdict: [DROPPED]}, {protocol: [http]}]}\n",
    );
    env.acked("EnvoyConfig default/hello-l7");
    let dir = env.lab.run_dir.join("otlp");
    std::fs::create_dir_all(&dir).unwrap();
    let rx = OtlpReceiver::start(&env.lab, &env.lab.node(0).netns, &dir.join("http.jsonl"), 14317, 14318).unwrap();
    traffic(&env, 2);
    let got = wait_for(Duration::from_secs(15), "flows over OTLP/HTTP", || {
        let r = rx.received();
        let http = r.iter().filter(|x| x["kind"] == "log" && x["attributes"]["http.request.method"] == "GET").count();
        let drops = r.iter().filter(|x| x["attributes"]["weft.verdict"] == "DROPPED").count();
        (http >= 4 && drops >= 1).then_some(r)
    })
    .unwrap_or_else(|e| env.fail(e));
    assert!(got.iter().all(|x| x["protocol"] == "http"));
    // The filter: only drops and HTTP flows were exported.
    for x in got.iter().filter(|x| x["kind"] == "log") {
        let a = &x["attributes"];
        assert!(a["weft.verdict"] == "DROPPED" || !a["http.request.method"].is_null(), "{x}");
    }
    rx.stop(&env.lab);
}

#[test]
fn an_overloaded_ring_buffer_reports_its_losses_and_the_numbers_add_up() {
    require_root!();
    // A one-page ring buffer and a record for every packet.
    let env = flow_lab("emit-level: packet\nmap-sizes: {events-bytes: 4096}\n");
    let socket = flow_socket(&env.files[0]);
    let (mut follower, lines) = spawn_lines(Command::new(workspace_binary("weft")).args([
        "observe",
        "--server",
        &socket,
        "-o",
        "json",
        "-f",
        "--from-pod",
        "default/nobody",
    ]));
    std::thread::sleep(Duration::from_millis(500));
    // A burst of UDP datagrams from n1-p1 to n2-p1, as fast as the socket takes them.
    let client = env.lab.pod("n1-p1");
    let target: SocketAddr = sa(env.lab.pod("n2-p1").ip, 9999);
    env.lab.in_ns(&client.netns, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let payload = [0u8; 16];
        for _ in 0..20_000 {
            let _ = s.send_to(&payload, target);
        }
    });
    // Everything written is eventually read; the rest was lost, and said so.
    let m = wait_for(Duration::from_secs(15), "the counters to settle", || {
        let m = agent_get(&env.lab, 0, "/metrics").ok()?;
        let written = metric_sum(&m, "weft_datapath_events_total", &[("outcome", "written")]);
        let read = metric_sum(&m, "weft_events_read_total", &[]);
        (written > 0.0 && read == written).then_some(m)
    })
    .unwrap_or_else(|e| env.fail(e));
    let written = metric_sum(&m, "weft_datapath_events_total", &[("outcome", "written")]);
    let lost = metric_sum(&m, "weft_datapath_events_total", &[("outcome", "lost")]);
    let read = metric_sum(&m, "weft_events_read_total", &[]);
    let kernel = metric_sum(&m, "weft_lost_events_total", &[("source", "kernel_ring_buffer")]);
    let queue = metric_sum(&m, "weft_lost_events_total", &[("source", "agent_queue")]);
    assert!(lost > 0.0, "a 4 KiB ring buffer cannot hold a burst of 20,000 datagrams' records");
    assert_eq!(kernel, lost, "the kernel's losses, by source");
    assert_eq!(read, written, "received = written");
    let status: Value = serde_json::from_str(&agent_get(&env.lab, 0, "/status").unwrap()).unwrap();
    assert_eq!(status["datapath"]["events-lost"].as_f64(), Some(lost), "every loss happened during the test");
    // The datapath attempted written + lost records; each was received (a
    // stored flow) or lost (in the kernel or the agent's queue).
    let stored = metric_sum(&m, "weft_flows_stored_total", &[]);
    assert_eq!(stored + queue, read, "{m}");
    assert_eq!(stored + kernel + queue, written + lost, "received + lost = emitted");
    // The follower, whose filter matches no flow, still got the loss notices.
    let mut notified = 0.0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while notified < lost && Instant::now() < deadline {
        if let Ok(l) = lines.recv_timeout(Duration::from_millis(200)) {
            let v: Value = serde_json::from_str(&l).unwrap();
            assert!(v.get("flow").is_none(), "no flow matches the filter: {v}");
            assert_eq!(v["lost_events"]["source"], "PERF_EVENT_RING_BUFFER");
            notified += v["lost_events"]["num_events_lost"].as_str().unwrap().parse::<f64>().unwrap();
        }
    }
    let _ = follower.kill();
    let _ = follower.wait();
    assert_eq!(notified, lost, "every lost record was announced in the stream");
}
