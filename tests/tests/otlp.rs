//! OTLP export against real receivers (issue: OTLP that works with the
//! collectors people run): the OpenTelemetry Collector over mutual TLS with
//! gzip, over both protocols, from the exporter's transports and from lab
//! agents configured by the standard environment variables; the tests' own
//! receiver for a private CA and for an API key it requires.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::TcpListener,
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::{logs::v1::ExportLogsServiceRequest, trace::v1::ExportTraceServiceRequest},
    common::v1::{AnyValue, any_value::Value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs},
    trace::v1::{ResourceSpans, ScopeSpans, Span},
};
use serde_json::Value as Json;
use weft_observe::export::otlp::{
    Compression, OtlpConfig, OtlpOptions, Protocol, Signal, Transport,
    transport::{Accepted, Client},
};
use weft_tests::{
    envoylab::EnvoyLab,
    flows::{TRACEPARENT, agent_get, flow_objects_with, metric_sum, traffic, venv_python, wait_for},
    http,
    objects::LabService,
    pki::{self, Pki},
    require_root,
    scenario::{T, sa},
};

/// A child process, killed and reaped on drop (also when a test fails).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn one_log(body: &str) -> ExportLogsServiceRequest {
    let record =
        LogRecord { body: Some(AnyValue { value: Some(Value::StringValue(body.into())) }), ..Default::default() };
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            scope_logs: vec![ScopeLogs { log_records: vec![record], ..Default::default() }],
            ..Default::default()
        }],
    }
}

fn one_span(name: &str) -> ExportTraceServiceRequest {
    let span = Span { trace_id: vec![7; 16], span_id: vec![9; 8], name: name.into(), ..Default::default() };
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans { spans: vec![span], ..Default::default() }],
            ..Default::default()
        }],
    }
}

/// `n` log records (bodies `tag-0`, `tag-1`, ...) in one request.
fn logs_of(n: usize, tag: &str) -> ExportLogsServiceRequest {
    let mut req = one_log("");
    req.resource_logs[0].scope_logs[0].log_records = (0..n)
        .map(|i| LogRecord {
            body: Some(AnyValue { value: Some(Value::StringValue(format!("{tag}-{i}"))) }),
            ..Default::default()
        })
        .collect();
    req
}

/// `n` spans (names `tag-0`, ...) in one request.
fn spans_of(n: usize, tag: &str) -> ExportTraceServiceRequest {
    let mut req = one_span("");
    let span = req.resource_spans[0].scope_spans[0].spans[0].clone();
    req.resource_spans[0].scope_spans[0].spans =
        (0..n).map(|i| Span { name: format!("{tag}-{i}"), ..span.clone() }).collect();
    req
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One signal's transport to `endpoint` (a base URL for http/protobuf).
fn transport(signal: Signal, protocol: Protocol, endpoint: &str) -> Transport {
    let c = OtlpConfig::to(endpoint, protocol).unwrap();
    match signal {
        Signal::Logs => c.logs,
        Signal::Traces => c.traces,
    }
}

#[tokio::test]
async fn the_real_collector_takes_both_protocols_over_mutual_tls_with_gzip() {
    let Some(pki) = Pki::new("otelcol") else {
        println!("SKIPPED: needs openssl");
        return;
    };
    pki.ca("main").leaf("main", "server", true).leaf("main", "client", false);
    pki.ca("other").leaf("other", "stranger", false);
    let (grpc, http) = (free_port(), free_port());
    let Some(mut cmd) = pki::collector_command(&pki, "main", &pki.dir, grpc, http) else {
        println!("{}", pki::NO_COLLECTOR);
        return;
    };
    let log = std::fs::File::create(pki.path("otelcol.log")).unwrap();
    let collector = Running(cmd.stdout(log.try_clone().unwrap()).stderr(log).spawn().unwrap());
    for port in [grpc, http] {
        wait_for(Duration::from_secs(30), "the collector to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .unwrap();
    }
    let secured = |mut t: Transport, ca: &str, client: Option<&str>| {
        t.ca_pem = Some(pki.read(&format!("{ca}-ca.pem")));
        t.client_identity = client.map(|c| (pki.read(&format!("{c}.pem")), pki.read(&format!("{c}.key"))));
        t.compression = Compression::Gzip;
        t
    };
    for (protocol, endpoint) in [
        (Protocol::Grpc, format!("https://localhost:{grpc}")),
        (Protocol::HttpProtobuf, format!("https://localhost:{http}")),
    ] {
        let name = protocol.label();
        let logs = secured(transport(Signal::Logs, protocol, &endpoint), "main", Some("client"));
        let traces = secured(transport(Signal::Traces, protocol, &endpoint), "main", Some("client"));
        Client::new(&logs).unwrap().send_logs(one_log(&format!("mtls-gzip-{name}"))).await.unwrap();
        Client::new(&traces).unwrap().send_spans(one_span(&format!("span-{name}"))).await.unwrap();
        // The collector's certificate is checked: another CA is not trusted.
        let untrusting = secured(transport(Signal::Logs, protocol, &endpoint), "other", Some("client"));
        let err = Client::new(&untrusting).unwrap().send_logs(one_log("never")).await.unwrap_err();
        assert!(err.message.to_lowercase().contains("certificate"), "{name}: {err:?}");
        // The collector checks ours: without one, or with a stranger's, it refuses.
        for client in [None, Some("stranger")] {
            let t = secured(transport(Signal::Logs, protocol, &endpoint), "main", client);
            let refused = Client::new(&t).unwrap().send_logs(one_log("never")).await;
            assert!(refused.is_err(), "{name} {client:?}: accepted");
        }
    }
    let out = pki.path("out.json");
    wait_for(Duration::from_secs(20), "both protocols' records in the collector's file", || {
        let text = std::fs::read_to_string(&out).ok()?;
        ["mtls-gzip-grpc", "mtls-gzip-http/protobuf", "span-grpc", "span-http/protobuf"]
            .iter()
            .all(|s| text.contains(s))
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", std::fs::read_to_string(pki.path("otelcol.log")).unwrap_or_default()));
    assert!(!std::fs::read_to_string(&out).unwrap().contains("never"), "a refused client's record arrived");
    drop(collector);
}

/// The tests' receiver (tests/otlp_receiver.py) on free ports, writing to
/// `dir/out.jsonl`; its gRPC and HTTP ports.
fn receiver(dir: &Path, extra: &[&str]) -> Option<(Running, u16, u16)> {
    let python = venv_python();
    if !python.exists() {
        return None;
    }
    let mut child = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("otlp_receiver.py"))
        .args(["--grpc-port", "0", "--http-port", "0", "--out"])
        .arg(dir.join("out.jsonl"))
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let running = Running(child);
    let mut ready = String::new();
    BufReader::new(stdout).read_line(&mut ready).unwrap();
    let port = |key: &str| -> u16 {
        ready.split_whitespace().find_map(|w| w.strip_prefix(key)?.parse().ok()).unwrap_or_else(|| panic!("{ready:?}"))
    };
    let (grpc, http) = (port("grpc="), port("http="));
    Some((running, grpc, http))
}

fn received(dir: &Path) -> Vec<Json> {
    std::fs::read_to_string(dir.join("out.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn otlp_http_goes_over_tls_to_a_private_ca_with_the_configured_headers() {
    let Some(pki) = Pki::new("otlp-private-ca") else {
        println!("SKIPPED: needs openssl");
        return;
    };
    pki.ca("private").leaf("private", "server", true);
    let (cert, key) = (pki.path("server.pem"), pki.path("server.key"));
    let tls = ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let record = ["--record-header", "x-tenant", "--record-header", "authorization"];
    let Some((rx, _, port)) = receiver(&pki.dir, &[&tls[..], &record].concat()) else {
        println!("SKIPPED: needs the project's venv (tests/setup.sh)");
        return;
    };
    let mut t = transport(Signal::Logs, Protocol::HttpProtobuf, &format!("https://localhost:{port}/"));
    t.headers = vec![("x-tenant".into(), "blue".into()), ("authorization".into(), "Bearer t0ken".into())];
    t.ca_pem = Some(pki.read("private-ca.pem"));
    let mut client = Client::new(&t).unwrap();
    client.send_logs(one_log("a")).await.unwrap();
    client.send_logs(one_log("b")).await.unwrap();
    let got = received(&pki.dir);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0]["headers"], serde_json::json!({"x-tenant": "blue", "authorization": "Bearer t0ken"}));
    // The server's certificate is checked: without its CA the request fails.
    let untrusting = Transport { ca_pem: None, ..t };
    let err = Client::new(&untrusting).unwrap().send_logs(one_log("c")).await.unwrap_err();
    assert!(err.message.to_lowercase().contains("certificate"), "{err:?}");
    drop(rx);
}

#[tokio::test]
async fn an_api_key_header_is_sent_over_both_protocols_and_its_absence_is_refused() {
    let dir = std::env::temp_dir().join(format!("weft-otlp-apikey-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let Some((rx, grpc, http)) =
        receiver(&dir, &["--require-header", "authorization=Bearer s3cret", "--record-header", "authorization"])
    else {
        println!("SKIPPED: needs the project's venv (tests/setup.sh)");
        return;
    };
    // The header from the environment, as a vendor's setup instructions have it.
    let key = BTreeMap::from([("OTEL_EXPORTER_OTLP_HEADERS".to_string(), "Authorization=Bearer%20s3cret".to_string())]);
    for (protocol, endpoint) in [
        (Protocol::Grpc, format!("http://127.0.0.1:{grpc}")),
        (Protocol::HttpProtobuf, format!("http://127.0.0.1:{http}")),
    ] {
        let name = protocol.label();
        let options = OtlpOptions { endpoint: Some(endpoint), protocol: Some(name.into()), ..Default::default() };
        let with_key = options.resolve(&key).unwrap();
        Client::new(&with_key.logs).unwrap().send_logs(one_log(&format!("keyed-{name}"))).await.unwrap();
        Client::new(&with_key.traces).unwrap().send_spans(one_span(&format!("keyed-{name}"))).await.unwrap();
        let without = options.resolve(&BTreeMap::new()).unwrap();
        let err = Client::new(&without.logs).unwrap().send_logs(one_log("unkeyed")).await.unwrap_err();
        assert!(!err.retry, "{name}: a refusal is not retried: {err:?}");
        assert!(err.message.contains("401") || err.message.contains("Unauthenticated"), "{name}: {err:?}");
    }
    let got = received(&dir);
    let kept: Vec<_> = got.iter().filter(|r| r["kind"] != "refused").collect();
    assert_eq!(kept.len(), 4, "{got:?}");
    assert!(kept.iter().all(|r| r["headers"]["authorization"] == "Bearer s3cret"), "{kept:?}");
    assert_eq!(got.iter().filter(|r| r["kind"] == "refused").count(), 2, "{got:?}");
    drop(rx);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A collector's partial success is read over both protocols: the refused
/// count is the collector's, held to what the request held (a collector
/// claiming more, or a negative count, is not believed), with its message.
#[tokio::test]
async fn a_partial_success_is_read_over_both_protocols_and_held_to_what_was_sent() {
    let dir = std::env::temp_dir().join(format!("weft-otlp-partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Every call's claim, cycling: 2 rejected, then 1000, then -5.
    let Some((rx, grpc, http)) = receiver(&dir, &["--reject=2,1000,-5"]) else {
        println!("SKIPPED: needs the project's venv (tests/setup.sh)");
        return;
    };
    let told = |rejected| Accepted { rejected, message: Some("otlp_receiver: --reject".into()) };
    for (protocol, endpoint) in [
        (Protocol::Grpc, format!("http://127.0.0.1:{grpc}")),
        (Protocol::HttpProtobuf, format!("http://127.0.0.1:{http}")),
    ] {
        let name = protocol.label();
        let mut logs = Client::new(&transport(Signal::Logs, protocol, &endpoint)).unwrap();
        let mut traces = Client::new(&transport(Signal::Traces, protocol, &endpoint)).unwrap();
        let mut got = vec![];
        for call in 0..3 {
            got.push(logs.send_logs(logs_of(3, &format!("{name}-log{call}"))).await.unwrap());
        }
        for call in 0..3 {
            got.push(traces.send_spans(spans_of(3, &format!("{name}-span{call}"))).await.unwrap());
        }
        assert_eq!(got, [told(2), told(3), told(0), told(2), told(3), told(0)], "{name}");
    }
    // What the receiver kept: the third of the first call, none of the
    // second, all of the third, for each signal and protocol.
    let got = received(&dir);
    assert_eq!(got.len(), 16, "{got:?}");
    for name in ["grpc", "http/protobuf"] {
        let text = |v: &Json| v["body"].as_str().or(v["name"].as_str()).unwrap_or_default().to_string();
        let kept: Vec<String> = got.iter().map(text).filter(|t| t.starts_with(&format!("{name}-"))).collect();
        let want: Vec<String> = ["log", "span"]
            .iter()
            .flat_map(|k| {
                [format!("{name}-{k}0-2"), format!("{name}-{k}2-0"), format!("{name}-{k}2-1"), format!("{name}-{k}2-2")]
            })
            .collect();
        assert_eq!(kept, want, "{name}");
    }
    drop(rx);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Lab agents configured for OTLP by the environment alone, each exporting
/// to a Collector in its node's namespace that requires client certificates:
/// node1's over gRPC with gzip (records and spans arrive), node2's over
/// OTLP/HTTP with a certificate from a CA the Collector does not trust (every
/// request refused, counted as failed and retried, the flows counted lost).
#[test]
fn lab_agents_configured_by_otel_variables_export_over_mutual_tls_and_count_refusals() {
    require_root!();
    let Some(pki) = Pki::new("otlp-lab") else {
        println!("SKIPPED: needs openssl");
        return;
    };
    if pki::otelcol().is_none() || pki::collector_tls_config().is_none() {
        println!("{}", pki::NO_COLLECTOR);
        return;
    }
    pki.ca("main").leaf("main", "server", true).leaf("main", "client", false);
    pki.ca("other").leaf("other", "stranger", false);
    let p = |f: &str| pki.path(f).display().to_string();
    let env = |endpoint: &str, protocol: &str, client: &str| -> Vec<(String, String)> {
        [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.to_string()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.into()),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", p("main-ca.pem")),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", p(&format!("{client}.pem"))),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", p(&format!("{client}.key"))),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip".into()),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2000".into()),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=lab,k8s.cluster.name=from-env".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    // No flows.otlp in the config: the variables alone turn export on.
    // Beside the flow lab's Services, one annotated for L7 visibility (issue
    // 13): no EnvoyConfig names it, the agent generates one.
    let mut seen = LabService::new("seen", SEEN, 80, &["n2-p1"]);
    seen.annotations.push(("weft.io/l7-visibility".into(), "http".into()));
    let lab = EnvoyLab::with_agent_env(
        |l| flow_objects_with(l, std::slice::from_ref(&seen)),
        "",
        [env("https://127.0.0.1:14317", "grpc", "client"), env("https://127.0.0.1:14318", "http/protobuf", "stranger")],
    );
    lab.acked("EnvoyConfig default/hello-l7");
    lab.acked("EnvoyConfig default/weft:l7:seen");
    let mut collectors = Vec::new();
    for i in 0..2 {
        let out = lab.lab.run_dir.join(format!("otelcol-{i}"));
        std::fs::create_dir_all(&out).unwrap();
        let mut cmd = pki::collector_command(&pki, "main", &out, 14317, 14318).unwrap();
        let log = std::fs::File::create(out.join("otelcol.log")).unwrap();
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        collectors.push((lab.lab.spawn(&lab.lab.node(i).netns, None, &mut cmd).unwrap(), out));
    }
    traffic(&lab, 3);
    let out = collectors[0].1.join("out.json");
    let text = wait_for(Duration::from_secs(30), "node1's records and spans at its Collector", || {
        let t = std::fs::read_to_string(&out).ok()?;
        (t.contains("\"http.request.method\"") && t.contains("resourceSpans")).then_some(t)
    })
    .unwrap_or_else(|e| lab.fail(e));
    assert!(text.contains("deployment.environment") && text.contains("\"lab\""), "resource from the environment");
    assert!(text.contains("\"server.port\""), "server.port apart from server.address");
    annotated_service_requests_are_spans(&lab, &out);
    let metrics = agent_get(&lab.lab, 0, "/metrics").unwrap();
    let exported = |m: &str, signal: &str, protocol: &str| {
        metric_sum(m, "weft_otlp_exported_total", &[("signal", signal), ("protocol", protocol)])
    };
    assert!(exported(&metrics, "logs", "grpc") > 0.0 && exported(&metrics, "traces", "grpc") > 0.0, "{metrics}");

    // Node2's Collector refuses its certificate: counted, retried, then lost.
    let counted = wait_for(Duration::from_secs(60), "node2's refusals counted and its flows lost", || {
        let m = agent_get(&lab.lab, 1, "/metrics").ok()?;
        let failed =
            metric_sum(&m, "weft_otlp_requests_failed_total", &[("signal", "logs"), ("protocol", "http/protobuf")]);
        let lost = metric_sum(&m, "weft_lost_events_total", &[("source", "otlp_exporter")]);
        (failed > 0.0 && lost > 0.0).then_some(m)
    })
    .unwrap_or_else(|e| lab.fail(e));
    assert!(metric_sum(&counted, "weft_otlp_requests_retried_total", &[("signal", "logs")]) > 0.0, "{counted}");
    assert_eq!(exported(&counted, "logs", "http/protobuf"), 0.0, "{counted}");
    let status: Json = serde_json::from_str(&agent_get(&lab.lab, 1, "/status").unwrap()).unwrap();
    assert_eq!(status["flows"]["otlp"]["logs"]["protocol"], "http/protobuf", "{status}");
    assert!(status["flows"]["otlp"]["logs"]["failed"].as_u64() > Some(0), "{status}");
    let refused_dir = &collectors[1].1;
    assert!(
        std::fs::read_to_string(refused_dir.join("out.json")).unwrap_or_default().is_empty(),
        "node2's records reached a Collector that refuses its certificate"
    );
    for (pid, _) in collectors {
        lab.lab.kill(pid);
    }
}

/// The annotated Service's ClusterIP in the lab above.
const SEEN: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 96, 0, 40);

/// A span attribute's value as text (OTLP JSON writes integers as strings).
fn span_attr<'a>(span: &'a Json, key: &str) -> Option<&'a str> {
    let a = span["attributes"].as_array()?.iter().find(|a| a["key"] == key)?;
    a["value"]["stringValue"].as_str().or(a["value"]["intValue"].as_str())
}

/// Requests through the annotated Service's generated config (issue 13:
/// L7 visibility without writing Envoy config) reach node1's Collector as
/// server spans named after the generated route, in the client's trace,
/// with the HTTP and Kubernetes attributes of any L7 flow.
fn annotated_service_requests_are_spans(lab: &EnvoyLab, out: &Path) {
    const N: usize = 3;
    let client = lab.lab.pod("n1-p1");
    let mut c = http::Client::connect(&client.netns, sa(SEEN, 80), None, T).unwrap_or_else(|e| lab.fail(e));
    for i in 0..N {
        let r = c.get("seen.default", &format!("/seen/{i}"), &[("traceparent", TRACEPARENT)]).unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert!(r.header("x-envoy-upstream-service-time").is_some(), "answered through Envoy: {r:?}");
    }
    drop(c);
    let name = "GET default/weft:l7:seen/http-80";
    let spans = wait_for(Duration::from_secs(30), "the annotated Service's spans at node1's Collector", || {
        let text = std::fs::read_to_string(out).ok()?;
        let spans: Vec<Json> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Json>(l).ok())
            .flat_map(|r| r["resourceSpans"].as_array().cloned().unwrap_or_default())
            .flat_map(|r| r["scopeSpans"].as_array().cloned().unwrap_or_default())
            .flat_map(|s| s["spans"].as_array().cloned().unwrap_or_default())
            .filter(|s| s["name"] == name)
            .collect();
        (spans.len() >= N).then_some(spans)
    })
    .unwrap_or_else(|e| lab.fail(e));
    assert_eq!(spans.len(), N, "one span per response: {spans:#?}");
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut paths = BTreeMap::new();
    for s in &spans {
        assert_eq!((s["traceId"].as_str(), s["parentSpanId"].as_str()), (Some(trace), Some(parent)), "{s:#}");
        assert_eq!(s["kind"], 2, "a server span: {s:#}");
        for (key, want) in [
            ("http.request.method", "GET"),
            ("http.response.status_code", "200"),
            ("server.address", "seen.default"),
            ("weft.event_type", "http-response"),
            // The response goes from the backend to the client.
            ("source.k8s.pod.name", "n2-p1"),
            ("destination.k8s.pod.name", "n1-p1"),
        ] {
            assert_eq!(span_attr(s, key), Some(want), "{key}: {s:#}");
        }
        assert!(span_attr(s, "k8s.node.name").is_some_and(|n| n.ends_with("node1")), "{s:#}");
        *paths.entry(span_attr(s, "url.path").unwrap_or_default().to_owned()).or_insert(0) += 1;
    }
    let want: BTreeMap<String, i32> = (0..N).map(|i| (format!("/seen/{i}"), 1)).collect();
    assert_eq!(paths, want, "{spans:#?}");
}
