//! Hostile input (issue 10): files a careless or malicious user could write
//! (`weft_tests::hostile`) are each reported by name, by `weft-agent
//! validate` and by running agents; no agent exits; good objects keep serving.

use std::{process::Command, time::Duration};

use tonic::Code;
use weft_flow::{
    client::{self, Address},
    proto::{
        flow::{EventTypeFilter, FlowFilter},
        observer::GetFlowsRequest,
    },
};
use weft_tests::{
    envoylab::EnvoyLab,
    flows::{agent_get, flow_lab, flow_socket, flows_of, metric_sum, observe_json, traffic, wait_for, wait_http_flows},
    hostile,
    http::get_once,
    objects::{LabService, agent_binary, agent_status, http_envoy_config, lab_objects, wait_status, write_atomic},
    require_root,
    scenario::{T, VIP, sa},
};

const SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: demo-cert, namespace: default}\ntype: kubernetes.io/tls\ndata: {tls.crt: Y2VydA==, tls.key: a2V5}\n";

#[test]
fn validate_names_every_hostile_object_and_keeps_the_good_one() {
    let dir = std::env::temp_dir().join(format!("weft-hostile-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("good.yaml"), format!("{SERVICES}---\n{}", http_envoy_config("good", "web", None)))
        .unwrap();
    let files = hostile::files();
    for h in &files {
        std::fs::write(dir.join(h.file), &h.contents).unwrap();
    }
    let out = Command::new(agent_binary()).arg("validate").arg(&dir).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(1), "problems, not a crash: {stderr}\n{stdout}");
    let mut missing = Vec::new();
    for h in &files {
        let named = stdout.lines().any(|l| l.contains(h.file) && h.expect.iter().all(|e| l.contains(e)));
        if !named {
            missing.push(format!("{}: no line with {:?}", h.file, h.expect));
        }
    }
    assert!(missing.is_empty(), "{}\n--- output:\n{stdout}", missing.join("\n"));
    assert!(!stdout.contains("EnvoyConfig default/good"), "the good config is valid:\n{stdout}");
    assert!(stderr.contains(" valid, "), "{stderr}");
}

#[test]
fn running_agents_report_hostile_objects_and_keep_serving() {
    require_root!();
    let web = LabService::new("web", VIP, 80, &["n1-p2", "n2-p1", "n2-p2"]);
    let env = EnvoyLab::new(|lab| {
        format!("{}{}", lab_objects(lab, std::slice::from_ref(&web)), http_envoy_config("web-l7", "web", None))
    });
    env.acked("EnvoyConfig default/web-l7");
    let client = env.lab.pod("n1-p1");
    let through_envoy = || {
        let (r, _, _) = get_once(&client.netns, sa(VIP, 80), "/", T).unwrap_or_else(|e| env.fail(e));
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.header("x-envoy-upstream-service-time").is_some(), "answered through Envoy: {r:?}");
    };
    through_envoy();

    let files = hostile::files();
    let dir = &env.files[0].objects_dir;
    for h in &files {
        std::fs::write(dir.join(h.file), &h.contents).unwrap();
    }
    // A Kubernetes object with an out-of-range port, and a bad new version of the good config.
    write_atomic(
        &dir.join("bad-service.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: huge-port, namespace: default}\nspec: {clusterIP: 10.96.0.99, ports: [{port: 70000}]}\n",
    )
    .unwrap();
    let lab_yaml = lab_objects(&env.lab, std::slice::from_ref(&web));
    write_atomic(
        &env.objects_file(),
        &format!("{lab_yaml}{}", http_envoy_config("web-l7", "web", Some("{cluster: tenant-b/web}"))),
    )
    .unwrap();

    let all_reported = |s: &serde_json::Value| {
        let text = s.to_string();
        files.iter().all(|h| h.expect.iter().all(|e| text.contains(&e.replace('"', "\\\""))))
            && text.contains("huge-port: port 70000 is not a port number")
            && text.contains("last-good")
    };
    let status = wait_status(&env.lab, 0, Duration::from_secs(60), "every hostile object reported", all_reported)
        .unwrap_or_else(|e| env.fail(e));
    let web_l7 = status["control"]["objects"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["object"] == "EnvoyConfig default/web-l7"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(web_l7["serving"]["state"], "last-good", "{web_l7:#}");
    assert!(web_l7["problems"].to_string().contains("is in namespace \\\"tenant-b\\\""), "{web_l7:#}");
    for (i, pid) in env.pids.iter().enumerate() {
        assert!(env.lab.running(*pid), "agent {i} is still running");
    }
    // The good version keeps serving through Envoy, on both nodes' agents.
    through_envoy();
    wait_status(&env.lab, 1, Duration::from_secs(30), "node2 saw them too", all_reported)
        .unwrap_or_else(|e| env.fail(e));
}

/// The runtime categories of hostile input against a running agent: lines
/// in Envoy's access-log spool that are not entries (huge, not JSON, huge
/// numbers, invalid UTF-8, nested deep) and flow API requests a hostile
/// client sends (oversized, too many filters or regular expressions, too
/// large regular expressions, nonsense, out-of-range times, too many
/// streams). The agent keeps running, keeps serving good flows, counts every
/// line it dropped as lost (`proxy`) and every request it refused.
#[test]
fn running_agents_count_hostile_access_log_lines_and_flow_requests() {
    require_root!();
    let env = flow_lab("");
    let files = &env.files[0];
    traffic(&env, 2);
    wait_http_flows(&env, 4);
    let status = agent_status(&env.lab, 0).unwrap_or_else(|e| env.fail(e));
    let flows = &status["flows"];
    let count = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| env.fail(format!("{flows:#}")));
    let (lost0, committed0) = (count(&flows["lost"]["proxy"]), count(&flows["access-log-committed"]));
    let (invalid0, over0) =
        (count(&flows["requests-refused"]["invalid"]), count(&flows["requests-refused"]["over_limit"]));
    let items0 = flows_of(&observe_json(files, &["--all", "--http-path", "^/api/items/0$"]).unwrap()).len();

    // Lines appended to the spool Envoy writes (as another writer on the
    // node could), a good one among them.
    let spool = files.state_dir.join("access-log/current.log");
    let now = weft_flow::time::now_ns() / 1_000_000_000;
    let good = format!("{{\"code\":200,\"method\":\"GET\",\"path\":\"/after-hostile\",\"start\":\"{now}.5\"}}");
    let mut bad: Vec<Vec<u8>> = vec![
        vec![b'x'; 3 << 20],                                          // three times the longest line
        b"{\"code\":200,\"method\":\"GET\"".to_vec(),                 // cut short
        b"{\"code\":1e999}".to_vec(),                                 // out of range for a float
        b"{\"duration\":184467440737095516160}".to_vec(),             // past u64
        b"{\"start\":\"99999999999999999999.5\"}".to_vec(),           // seconds past u64
        b"{\"path\":\"/\xff\xfe\"}".to_vec(),                         // invalid UTF-8
        format!("{{\"future\":{}", "[".repeat(100_000)).into_bytes(), // nested 100,000 deep, never closed
        format!("{{\"path\":{}1{}}}", "{\"a\":".repeat(200), "}".repeat(200)).into_bytes(), // nested 200 deep
        Vec::new(),
        b"\0\0\0\x1b[2J".to_vec(),
    ];
    let n_bad = bad.len() as u64;
    bad.insert(4, good.into_bytes());
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&spool).unwrap_or_else(|e| env.fail(e));
        for mut line in bad {
            line.push(b'\n');
            f.write_all(&line).unwrap();
        }
    }
    let status = wait_status(&env.lab, 0, Duration::from_secs(20), "the hostile lines read", |s| {
        s["flows"]["access-log-committed"].as_u64().is_some_and(|c| c > committed0 + n_bad)
    })
    .unwrap_or_else(|e| env.fail(e));
    let lost = status["flows"]["lost"]["proxy"].as_u64();
    if lost != Some(lost0 + n_bad) {
        let l7 = observe_json(files, &["--all", "--type", "l7"]).unwrap_or_default();
        let log = std::fs::read_to_string(env.lab.run_dir.join("agent0.log")).unwrap_or_default();
        let spool: Vec<&str> = log.lines().filter(|l| l.contains("access-log")).collect();
        env.fail(format!("lost {lost:?}, want {}: {:#}\nL7 flows: {l7:?}\n{spool:#?}", lost0 + n_bad, status["flows"]));
    }
    let metrics = agent_get(&env.lab, 0, "/metrics").unwrap_or_else(|e| env.fail(e));
    assert_eq!(metric_sum(&metrics, "weft_lost_events_total", &[("source", "proxy")]) as u64, lost0 + n_bad);
    let log = std::fs::read_to_string(env.lab.run_dir.join("agent0.log")).unwrap_or_default();
    assert!(log.contains("access-log spool: a line of 1048576 bytes or more"), "the long line is logged");
    let after = observe_json(files, &["--all", "--http-path", "^/after-hostile$"]).unwrap_or_else(|e| env.fail(e));
    assert_eq!(flows_of(&after).len(), 2, "the good line among them is a request and a response: {after:?}");

    // Hostile flow API requests over the agent's unix socket.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let addr = Address::parse(&flow_socket(files)).unwrap();
    rt.block_on(async {
        let mut c = client::observer(&addr).await.unwrap_or_else(|e| env.fail(e));
        let l7 = || vec![EventTypeFilter { r#type: 129, ..Default::default() }];
        let path = |re: &str| FlowFilter { event_type: l7(), http_path: vec![re.into()], ..Default::default() };
        let refused = [
            // (request, code, refusal counted as, text the refusal holds)
            (
                GetFlowsRequest {
                    whitelist: vec![FlowFilter { source_pod: vec!["x".repeat(2 << 20)], ..Default::default() }],
                    ..Default::default()
                },
                Code::OutOfRange,
                "over_limit",
                "",
            ),
            (
                GetFlowsRequest { whitelist: vec![FlowFilter::default(); 65], ..Default::default() },
                Code::InvalidArgument,
                "over_limit",
                "whitelist: 65 filters",
            ),
            (
                GetFlowsRequest {
                    whitelist: vec![FlowFilter { http_path: vec!["a".into(); 65], ..path("a") }],
                    ..Default::default()
                },
                Code::InvalidArgument,
                "over_limit",
                "65 regular or CEL expressions",
            ),
            (
                GetFlowsRequest { whitelist: vec![path(&"a".repeat(1025))], ..Default::default() },
                Code::InvalidArgument,
                "over_limit",
                "longer than 1024",
            ),
            (
                GetFlowsRequest { blacklist: vec![path(r"(?:\w{100}){100}")], ..Default::default() },
                Code::InvalidArgument,
                "over_limit",
                "compiles to more than",
            ),
            (
                GetFlowsRequest { whitelist: vec![path("(")], ..Default::default() },
                Code::InvalidArgument,
                "invalid",
                "not a regular expression",
            ),
            (GetFlowsRequest { first: true, follow: true, ..Default::default() }, Code::InvalidArgument, "invalid", ""),
            (
                GetFlowsRequest {
                    extensions: Some(prost_types::Any {
                        type_url: "type.googleapis.com/weft.WeftClient".into(),
                        value: vec![0xff; 64],
                    }),
                    ..Default::default()
                },
                Code::InvalidArgument,
                "invalid",
                "not a weft.WeftClient",
            ),
        ];
        let mut want = std::collections::BTreeMap::from([("invalid", invalid0), ("over_limit", over0)]);
        for (req, code, counted, text) in refused {
            let e = c.get_flows(req).await.err().unwrap_or_else(|| env.fail(format!("accepted: {text}")));
            assert_eq!(e.code(), code, "{e}");
            assert!(e.message().contains(text), "{e}");
            if let Some(n) = want.get_mut(counted) {
                *n += 1;
            }
        }
        // Times and numbers out of any range: answered (with nothing), not a panic.
        let far = |seconds| Some(prost_types::Timestamp { seconds, nanos: -1 });
        for (since, until) in [(far(i64::MAX), None), (None, far(i64::MIN)), (far(i64::MIN), far(i64::MAX))] {
            let req = GetFlowsRequest { since, until, number: u64::MAX, ..Default::default() };
            let mut s = c.get_flows(req).await.unwrap_or_else(|e| env.fail(e)).into_inner();
            while s.message().await.unwrap_or_else(|e| env.fail(e)).is_some() {}
        }
        // Streams: one client (uid 0 here) may hold 16; the next is refused.
        let mut open = Vec::new();
        for _ in 0..16 {
            let req = GetFlowsRequest { follow: true, ..Default::default() };
            open.push(c.get_flows(req).await.unwrap_or_else(|e| env.fail(e)));
        }
        let e = c.get_flows(GetFlowsRequest { follow: true, ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        *want.get_mut("over_limit").unwrap() += 1;
        // Closed streams give their places back (the server notices
        // asynchronously; refusals meanwhile are counted too).
        drop(open);
        let t0 = std::time::Instant::now();
        loop {
            match c.get_flows(GetFlowsRequest { number: 1, ..Default::default() }).await {
                Ok(_) => break,
                Err(e) if e.code() == Code::ResourceExhausted && t0.elapsed() < Duration::from_secs(10) => {
                    *want.get_mut("over_limit").unwrap() += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => env.fail(format!("the streams' places are not given back: {e}")),
            }
        }
        let status = agent_status(&env.lab, 0).unwrap_or_else(|e| env.fail(e));
        let counted: std::collections::BTreeMap<&str, u64> =
            want.keys().map(|k| (*k, status["flows"]["requests-refused"][*k].as_u64().unwrap_or(0))).collect();
        assert_eq!(counted, want, "{:#}", status["flows"]);
        let metrics = agent_get(&env.lab, 0, "/metrics").unwrap_or_else(|e| env.fail(e));
        let metric = metric_sum(&metrics, "weft_flow_requests_refused_total", &[("reason", "over_limit")]) as u64;
        assert_eq!(metric, want["over_limit"]);
    });
    drop(rt); // closes the test's connection

    // Still running, still serving: new traffic becomes flows, and the
    // client's streams were given back (the server notices closes
    // asynchronously: a query refused for streams is retried).
    for (i, pid) in env.pids.iter().enumerate() {
        assert!(env.lab.running(*pid), "agent {i} is still running");
    }
    traffic(&env, 1);
    let flows = wait_for(Duration::from_secs(20), "flows after the hostile requests", || {
        let r = observe_json(files, &["--all", "--http-path", "^/api/items/0$"]).ok()?;
        (flows_of(&r).len() >= items0 + 2).then_some(r)
    })
    .unwrap_or_else(|e| env.fail(e));
    assert_eq!(flows_of(&flows).len(), items0 + 2, "a request and its response: {flows:?}");
}
