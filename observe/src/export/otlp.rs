//! OTLP export: flows as OpenTelemetry log records (with semantic-convention
//! attributes, plus `weft.*` ones for what only weft knows), and HTTP flows
//! that carry trace context also as spans, to any collector over OTLP/gRPC or
//! OTLP/HTTP (protobuf).
//!
//! The sink only clones matching flows into a bounded queue; a task batches
//! them and sends with retries and backoff. A collector that is down or slow
//! fills the queue, and what does not fit is dropped and counted
//! (`weft_lost_events_total{source="otlp_exporter"}`): the agent's memory
//! stays bounded and the datapath never waits.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::{
    collector::{
        logs::v1::{ExportLogsServiceRequest, logs_service_client::LogsServiceClient},
        trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
    },
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status as SpanStatus, span::SpanKind, status::StatusCode},
};
use prost::Message;
use tokio::sync::mpsc;

use weft_flow::{
    client::{error_chain, http_client},
    names, print,
    proto::{
        flow::{self, Flow, FlowFilter, Verdict, layer4, layer7},
        weft::FlowLink,
    },
    time::now_ns,
};

use crate::{
    api::{
        convert::{self, Context},
        filter::{Env, FilterListError, FilterSet},
    },
    pipeline::{
        Pipeline, Sink,
        enrich::Names,
        record::{Entry, FlowRecord, L7_RESPONSE},
    },
};

/// OTLP over gRPC or over HTTP with protobuf bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

impl Protocol {
    pub fn parse(s: &str) -> Result<Protocol, OtlpError> {
        match s {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" | "http" => Ok(Protocol::HttpProtobuf),
            other => Err(OtlpError::Protocol(other.to_owned())),
        }
    }
}

/// Exporter settings it cannot start with; each names the setting and value.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    #[error("OTLP protocol {0:?}: expected grpc or http/protobuf")]
    Protocol(String),
    #[error("otlp filters: {0}")]
    Filters(#[from] FilterListError),
    #[error("otlp endpoint {endpoint:?}: {error}")]
    Endpoint { endpoint: String, error: tonic::transport::Error },
    #[error("otlp endpoint {0:?}: OTLP/HTTP needs an http:// or https:// address")]
    NotHttp(String),
    #[error("otlp header {name:?}: not a header name: {error}")]
    HeaderName { name: String, error: reqwest::header::InvalidHeaderName },
    #[error("otlp header {name:?}: not a header value: {error}")]
    HeaderValue { name: String, error: reqwest::header::InvalidHeaderValue },
    #[error("otlp CA certificates: {0}")]
    CaCertificates(reqwest::Error),
    #[error("otlp HTTP client: {}", error_chain(.0))]
    HttpClient(reqwest::Error),
}

/// Exporter settings.
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    /// `http://host:4317` (gRPC) or `http://host:4318` (HTTP; `/v1/logs` and
    /// `/v1/traces` are appended; `https://` for TLS).
    pub endpoint: String,
    pub protocol: Protocol,
    /// OTLP/HTTP: headers sent with every request (an API key, a tenant).
    pub headers: Vec<(String, String)>,
    /// OTLP/HTTP: CA certificates (PEM) trusted for an `https://` endpoint,
    /// besides the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// Flows waiting to be sent; what does not fit is dropped and counted.
    pub queue: usize,
    /// Flows per export request.
    pub batch: usize,
    /// Longest wait before a partial batch is sent.
    pub interval: Duration,
    /// Per request.
    pub timeout: Duration,
    /// How long one batch is retried before it is dropped (and counted).
    pub retry_for: Duration,
    /// Only flows these filters keep (Hubble's FlowFilter allow/deny lists);
    /// empty: every flow.
    pub allow: Vec<FlowFilter>,
    pub deny: Vec<FlowFilter>,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            endpoint: "http://127.0.0.1:4317".into(),
            protocol: Protocol::Grpc,
            headers: Vec::new(),
            ca_pem: None,
            queue: 8192,
            batch: 512,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(30),
            allow: Vec::new(),
            deny: Vec::new(),
        }
    }
}

/// What the exporter has done, for metrics and status.
#[derive(Debug, Default)]
pub struct ExportStats {
    pub logs_exported: AtomicU64,
    pub spans_exported: AtomicU64,
    pub failed_requests: AtomicU64,
    pub dropped: AtomicU64,
}

/// The sink side: filters and queues.
pub struct OtlpSink {
    tx: mpsc::Sender<(u64, FlowRecord)>,
    filters: FilterSet,
    pipeline: Arc<Pipeline>,
    stats: Arc<ExportStats>,
}

impl Sink for OtlpSink {
    fn batch(&mut self, first_seq: u64, entries: &[Entry], names: &Names) {
        let env = Env {
            boot_id: self.pipeline.boot_id,
            node_name: &names.node_name,
            node_labels: &names.node_labels,
            cluster: &names.cluster,
        };
        let mut dropped = 0;
        for (i, e) in entries.iter().enumerate() {
            let Entry::Flow(f) = e else { continue };
            let seq = first_seq + i as u64;
            if !self.filters.is_empty() && !self.filters.matches(&env, seq, f) {
                continue;
            }
            if self.tx.try_send((seq, f.clone())).is_err() {
                dropped += 1;
            }
        }
        if dropped > 0 {
            self.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
            self.pipeline.exporter_lost(dropped);
        }
    }
}

/// Starts the exporter task on the current runtime and adds its sink to the
/// pipeline.
pub fn start(cfg: OtlpConfig, pipeline: Arc<Pipeline>) -> Result<Arc<ExportStats>, OtlpError> {
    let filters = FilterSet::compile(&cfg.allow, &cfg.deny)?;
    let (tx, rx) = mpsc::channel(cfg.queue.max(1));
    let stats = Arc::new(ExportStats::default());
    let client = Client::new(&cfg)?;
    tokio::spawn(export_loop(cfg, client, rx, pipeline.clone(), stats.clone()));
    pipeline.add_sink(Box::new(OtlpSink { tx, filters, pipeline: pipeline.clone(), stats: stats.clone() }));
    Ok(stats)
}

/// One per exporter, owned by its loop: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Client {
    Grpc { logs: LogsServiceClient<tonic::transport::Channel>, traces: TraceServiceClient<tonic::transport::Channel> },
    Http { http: reqwest::Client, base: String },
}

impl Client {
    fn new(cfg: &OtlpConfig) -> Result<Client, OtlpError> {
        match cfg.protocol {
            Protocol::Grpc => {
                let ch = tonic::transport::Endpoint::from_shared(cfg.endpoint.clone())
                    .map_err(|error| OtlpError::Endpoint { endpoint: cfg.endpoint.clone(), error })?
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(cfg.timeout)
                    .connect_lazy();
                Ok(Client::Grpc { logs: LogsServiceClient::new(ch.clone()), traces: TraceServiceClient::new(ch) })
            }
            Protocol::HttpProtobuf => {
                let base = cfg.endpoint.trim_end_matches('/').to_owned();
                if !base.starts_with("http://") && !base.starts_with("https://") {
                    return Err(OtlpError::NotHttp(cfg.endpoint.clone()));
                }
                Ok(Client::Http { http: http_exporter(cfg)?, base })
            }
        }
    }

    /// Sends one request; Err(true) when retrying may help.
    async fn send_logs(&mut self, req: ExportLogsServiceRequest) -> Result<(), (bool, String)> {
        match self {
            Client::Grpc { logs, .. } => logs.export(req).await.map(|_| ()).map_err(grpc_err),
            Client::Http { http, base } => http_post(http, &format!("{base}/v1/logs"), req.encode_to_vec()).await,
        }
    }

    async fn send_spans(&mut self, req: ExportTraceServiceRequest) -> Result<(), (bool, String)> {
        match self {
            Client::Grpc { traces, .. } => traces.export(req).await.map(|_| ()).map_err(grpc_err),
            Client::Http { http, base } => http_post(http, &format!("{base}/v1/traces"), req.encode_to_vec()).await,
        }
    }
}

fn grpc_err(s: tonic::Status) -> (bool, String) {
    use tonic::Code::*;
    let retry = matches!(
        s.code(),
        Unavailable | DeadlineExceeded | ResourceExhausted | Aborted | Cancelled | Unknown | Internal
    );
    (retry, format!("{}: {}", s.code(), s.message()))
}

/// The OTLP/HTTP client: pooled keep-alive connections, TLS for `https://`
/// (the system's roots plus `ca_pem`), the configured headers on every request.
fn http_exporter(cfg: &OtlpConfig) -> Result<reqwest::Client, OtlpError> {
    let mut headers = reqwest::header::HeaderMap::new();
    for (k, v) in &cfg.headers {
        let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
            .map_err(|error| OtlpError::HeaderName { name: k.clone(), error })?;
        let mut value = reqwest::header::HeaderValue::from_str(v)
            .map_err(|error| OtlpError::HeaderValue { name: k.clone(), error })?;
        // Credentials, often: kept out of debug output.
        value.set_sensitive(true);
        headers.append(name, value);
    }
    let mut b = http_client().timeout(cfg.timeout).connect_timeout(Duration::from_secs(2)).default_headers(headers);
    if let Some(pem) = &cfg.ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(OtlpError::CaCertificates)?;
        b = b.tls_certs_merge(certs);
    }
    b.build().map_err(OtlpError::HttpClient)
}

/// POSTs one protobuf request; Err(true) when retrying may help.
async fn http_post(http: &reqwest::Client, url: &str, body: Vec<u8>) -> Result<(), (bool, String)> {
    let resp = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
        .body(body)
        .send()
        .await
        .map_err(|e| (!e.is_builder(), error_chain(&e)))?;
    let status = resp.status();
    // Read to the end, so the connection goes back to the pool.
    let _ = resp.bytes().await;
    if status.is_success() {
        Ok(())
    } else {
        Err((status.as_u16() == 429 || status.is_server_error(), format!("HTTP {status}")))
    }
}

async fn export_loop(
    cfg: OtlpConfig,
    mut client: Client,
    mut rx: mpsc::Receiver<(u64, FlowRecord)>,
    pipeline: Arc<Pipeline>,
    stats: Arc<ExportStats>,
) {
    let mut batch = Vec::with_capacity(cfg.batch);
    let mut last_warning: Option<Instant> = None;
    loop {
        batch.clear();
        match rx.recv().await {
            Some(x) => batch.push(x),
            None => return,
        }
        let deadline = tokio::time::Instant::now() + cfg.interval;
        while batch.len() < cfg.batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(x)) => batch.push(x),
                Ok(None) | Err(_) => break,
            }
        }
        let names = pipeline.names();
        let ctx = Context::new(names.clone(), pipeline.boot_id, true);
        let (logs, spans) = requests(&ctx, &names, &batch);
        let n_spans = spans.resource_spans.first().map_or(0, |r| r.scope_spans.first().map_or(0, |s| s.spans.len()));
        let start = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut logs_done = false;
        let mut spans_done = n_spans == 0;
        loop {
            let mut failure = None;
            if !logs_done {
                match client.send_logs(logs.clone()).await {
                    Ok(()) => {
                        logs_done = true;
                        stats.logs_exported.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    }
                    Err(e) => failure = Some(e),
                }
            }
            if failure.is_none() && !spans_done {
                match client.send_spans(spans.clone()).await {
                    Ok(()) => {
                        spans_done = true;
                        stats.spans_exported.fetch_add(n_spans as u64, Ordering::Relaxed);
                    }
                    Err(e) => failure = Some(e),
                }
            }
            let Some((retry, msg)) = failure else { break };
            stats.failed_requests.fetch_add(1, Ordering::Relaxed);
            if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                tracing::warn!(endpoint = %cfg.endpoint, "OTLP export failed: {msg}");
                last_warning = Some(Instant::now());
            }
            if !retry || start.elapsed() + backoff > cfg.retry_for {
                if !logs_done {
                    stats.dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    pipeline.exporter_lost(batch.len() as u64);
                }
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

fn kv(key: &str, v: Value) -> KeyValue {
    KeyValue { key: key.into(), value: Some(AnyValue { value: Some(v) }), ..Default::default() }
}

fn s(key: &str, v: impl Into<String>) -> KeyValue {
    kv(key, Value::StringValue(v.into()))
}

fn i(key: &str, v: i64) -> KeyValue {
    kv(key, Value::IntValue(v))
}

fn hex_bytes(h: &str) -> Vec<u8> {
    (0..h.len() / 2).filter_map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok()).collect()
}

/// The attributes of a flow (OpenTelemetry semantic conventions where they
/// exist, `weft.*` for the rest).
#[allow(deprecated)]
pub fn attributes(f: &Flow) -> Vec<KeyValue> {
    let mut a = Vec::new();
    if let Some(ip) = &f.ip {
        a.push(s("source.address", &ip.source));
        a.push(s("destination.address", &ip.destination));
        a.push(s("network.type", "ipv4"));
    }
    let (transport, sp, dp) = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(t)) => ("tcp", t.source_port, t.destination_port),
        Some(layer4::Protocol::Udp(u)) => ("udp", u.source_port, u.destination_port),
        Some(layer4::Protocol::Sctp(x)) => ("sctp", x.source_port, x.destination_port),
        Some(layer4::Protocol::IcmPv4(_)) => ("icmp", 0, 0),
        _ => ("", 0, 0),
    };
    if !transport.is_empty() {
        a.push(s("network.transport", transport));
    }
    if sp != 0 {
        a.push(i("source.port", sp as i64));
    }
    if dp != 0 {
        a.push(i("destination.port", dp as i64));
    }
    for (side, ep, svc) in
        [("source", &f.source, &f.source_service), ("destination", &f.destination, &f.destination_service)]
    {
        if let Some(e) = ep {
            if !e.pod_name.is_empty() {
                a.push(s(&format!("{side}.k8s.pod.name"), &e.pod_name));
            }
            if !e.namespace.is_empty() {
                a.push(s(&format!("{side}.k8s.namespace.name"), &e.namespace));
            }
            for w in &e.workloads {
                a.push(s(&format!("{side}.k8s.{}.name", w.kind.to_ascii_lowercase()), &w.name));
            }
            a.push(i(&format!("weft.{side}.identity"), e.identity as i64));
        }
        if let Some(v) = svc {
            a.push(s(&format!("weft.{side}.service"), format!("{}/{}", v.namespace, v.name)));
        }
    }
    a.push(s("k8s.node.name", &f.node_name));
    let verdict = Verdict::try_from(f.verdict).unwrap_or(Verdict::Unknown);
    a.push(s("weft.verdict", verdict.as_str_name()));
    a.push(s("weft.event_type", print::type_text(f)));
    if verdict == Verdict::Dropped && f.drop_reason_desc != 0 {
        a.push(s("weft.drop_reason", names::drop_reason(f.drop_reason_desc as u32)));
    }
    if f.trace_observation_point != 0 {
        a.push(s("weft.observation_point", names::observation_point(f.trace_observation_point as u32)));
    }
    a.push(s(
        "weft.traffic_direction",
        flow::TrafficDirection::try_from(f.traffic_direction).unwrap_or(flow::TrafficDirection::Unknown).as_str_name(),
    ));
    if let Some(r) = f.is_reply {
        a.push(kv("weft.is_reply", Value::BoolValue(r)));
    }
    if let Some(layer4::Protocol::Tcp(t)) = f.l4.as_ref().and_then(|l| l.protocol.as_ref())
        && let Some(fl) = &t.flags
    {
        let bits = [(fl.syn, "SYN"), (fl.ack, "ACK"), (fl.fin, "FIN"), (fl.rst, "RST"), (fl.psh, "PSH")];
        let on: Vec<&str> = bits.iter().filter(|(b, _)| *b).map(|(_, n)| *n).collect();
        if !on.is_empty() {
            a.push(s("weft.tcp_flags", on.join(",")));
        }
    }
    if f.proxy_port != 0 {
        a.push(i("weft.proxy_port", f.proxy_port as i64));
    }
    a.push(s("weft.flow.uuid", &f.uuid));
    if let Some(l7) = &f.l7 {
        if let Some(layer7::Record::Http(h)) = &l7.record {
            a.push(s("http.request.method", &h.method));
            if h.code != 0 {
                a.push(i("http.response.status_code", h.code as i64));
            }
            a.push(s("url.full", &h.url));
            let (scheme, rest) = h.url.split_once("://").unwrap_or(("http", &h.url));
            a.push(s("url.scheme", scheme));
            let (authority, path) = rest.find('/').map_or((rest, "/"), |p| (&rest[..p], &rest[p..]));
            a.push(s("server.address", authority));
            a.push(s("url.path", path.split('?').next().unwrap_or(path)));
            a.push(s("network.protocol.name", "http"));
            if let Some(v) = h.protocol.strip_prefix("HTTP/") {
                a.push(s("network.protocol.version", v));
            }
            for hd in &h.headers {
                if hd.key == "user-agent" {
                    a.push(s("user_agent.original", &hd.value));
                }
            }
            if l7.latency_ns != 0 {
                a.push(i("weft.http.duration_ns", l7.latency_ns as i64));
            }
        }
        a.push(s("weft.l7.type", if l7.r#type == flow::L7FlowType::Response as i32 { "response" } else { "request" }));
    }
    if let Some(ext) = &f.extensions
        && let Ok(link) = FlowLink::decode(ext.value.as_slice())
        && let Some(d) = link.downstream
    {
        a.push(s("weft.link.verdict", Verdict::try_from(d.verdict).unwrap_or(Verdict::Unknown).as_str_name()));
        let path: Vec<&str> = d.path.iter().map(|p| names::observation_point(*p as u32)).collect();
        a.push(s("weft.link.path", path.join(",")));
    }
    a
}

fn resource(names: &Names) -> Resource {
    Resource {
        attributes: vec![
            s("service.name", "weft-agent"),
            s("service.version", env!("CARGO_PKG_VERSION")),
            s("k8s.node.name", &names.node_name),
            s("k8s.cluster.name", &names.cluster),
        ],
        ..Default::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope { name: "weft.flows".into(), version: env!("CARGO_PKG_VERSION").into(), ..Default::default() }
}

/// A span id for a flow: 8 bytes from the flow's UUID (unique per flow).
fn span_id(boot_id: u64, seq: u64) -> Vec<u8> {
    (boot_id.rotate_left(17) ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1).to_be_bytes().to_vec()
}

/// The export requests of a batch: a log record per flow, a span per HTTP
/// response that carries trace context.
pub fn requests(
    ctx: &Context,
    names: &Names,
    batch: &[(u64, FlowRecord)],
) -> (ExportLogsServiceRequest, ExportTraceServiceRequest) {
    let observed = now_ns();
    let mut records = Vec::with_capacity(batch.len());
    let mut spans = Vec::new();
    for (seq, rec) in batch {
        let f = convert::to_flow(ctx, *seq, rec);
        let attributes = attributes(&f);
        let dropped = f.verdict == Verdict::Dropped as i32;
        let trace = rec.http.as_ref().and_then(|h| Some((h.trace_id()?, h.parent_span_id())));
        let body = print::compact_flow(&f, &print::Options::default());
        records.push(LogRecord {
            time_unix_nano: rec.time_ns,
            observed_time_unix_nano: observed,
            severity_number: if dropped { SeverityNumber::Warn } else { SeverityNumber::Info } as i32,
            severity_text: if dropped { "WARN" } else { "INFO" }.into(),
            body: Some(AnyValue { value: Some(Value::StringValue(body)) }),
            attributes: attributes.clone(),
            trace_id: trace.map(|(t, _)| hex_bytes(t)).unwrap_or_default(),
            span_id: if trace.is_some() { span_id(ctx.boot_id, *seq) } else { Vec::new() },
            event_name: "weft.flow".into(),
            ..Default::default()
        });
        if let (Some(h), Some((trace_id, parent))) = (&rec.http, trace)
            && rec.ev.subtype == L7_RESPONSE
        {
            let name = if h.route.is_empty() { h.method.clone() } else { format!("{} {}", h.method, h.route) };
            spans.push(Span {
                trace_id: hex_bytes(trace_id),
                span_id: span_id(ctx.boot_id, *seq),
                parent_span_id: parent.map(hex_bytes).unwrap_or_default(),
                trace_state: h.tracestate.clone(),
                name,
                kind: SpanKind::Server as i32,
                start_time_unix_nano: h.start_ns,
                end_time_unix_nano: h.start_ns + h.duration_ns,
                attributes,
                status: Some(SpanStatus {
                    code: if h.code >= 500 || h.code == 0 { StatusCode::Error } else { StatusCode::Unset } as i32,
                    message: h.response_flags.clone(),
                }),
                ..Default::default()
            });
        }
    }
    let logs = ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(resource(names)),
            scope_logs: vec![ScopeLogs { scope: Some(scope()), log_records: records, ..Default::default() }],
            ..Default::default()
        }],
    };
    let traces = ExportTraceServiceRequest {
        resource_spans: if spans.is_empty() {
            Vec::new()
        } else {
            vec![ResourceSpans {
                resource: Some(resource(names)),
                scope_spans: vec![ScopeSpans { scope: Some(scope()), spans, ..Default::default() }],
                ..Default::default()
            }]
        },
    };
    (logs, traces)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead, BufReader},
        path::{Path, PathBuf},
        process::{Command, Stdio},
    };

    use super::*;

    /// The tests' OTLP receiver (tests/otlp_receiver.py), stopped on drop.
    struct Receiver(std::process::Child, PathBuf);

    impl Drop for Receiver {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }

    fn one_log() -> ExportLogsServiceRequest {
        let record =
            LogRecord { body: Some(AnyValue { value: Some(Value::StringValue("hi".into())) }), ..Default::default() };
        ExportLogsServiceRequest {
            resource_logs: vec![ResourceLogs {
                scope_logs: vec![ScopeLogs { log_records: vec![record], ..Default::default() }],
                ..Default::default()
            }],
        }
    }

    #[tokio::test]
    async fn otlp_http_goes_over_tls_with_the_configured_headers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let python = root.join(".venv/bin/python3");
        if !python.exists() || Command::new("openssl").arg("version").output().is_err() {
            println!("SKIPPED: needs the project's venv (tests/setup.sh) and openssl");
            return;
        }
        let dir = std::env::temp_dir().join(format!("weft-otlp-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A CA, and a server certificate for localhost signed by it.
        let (ca, cert, key) = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for args in [
            &[
                &["req", "-x509"][..],
                &ec,
                &["-days", "1", "-subj", "/CN=weft test CA", "-keyout", "ca.key", "-out", "ca.pem"],
            ]
            .concat(),
            &[&["req"][..], &ec, &["-subj", "/CN=localhost", "-keyout", "key.pem", "-out", "leaf.csr"]].concat(),
            &["x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"]
                .into_iter()
                .chain(["-days", "1", "-extfile", "ext.cnf", "-out", "cert.pem"])
                .collect::<Vec<_>>(),
        ] {
            let made = Command::new("openssl").args(args).current_dir(&dir).stderr(Stdio::null()).status().unwrap();
            assert!(made.success(), "openssl {args:?} failed");
        }
        let out = dir.join("out.jsonl");
        let mut child = Command::new(&python)
            .arg(root.join("tests/otlp_receiver.py"))
            .args(["--grpc-port", "0", "--http-port", "0", "--tls-cert"])
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .args(["--record-header", "x-tenant", "--record-header", "authorization", "--out"])
            .arg(&out)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let rx = Receiver(child, dir.clone());
        let mut ready = String::new();
        BufReader::new(stdout).read_line(&mut ready).unwrap();
        let port: u16 = ready.trim().rsplit("http=").next().and_then(|p| p.parse().ok()).expect(&ready);

        let cfg = OtlpConfig {
            endpoint: format!("https://localhost:{port}/"),
            protocol: Protocol::HttpProtobuf,
            headers: vec![("x-tenant".into(), "blue".into()), ("authorization".into(), "Bearer t0ken".into())],
            ca_pem: Some(std::fs::read(&ca).unwrap()),
            ..Default::default()
        };
        let mut client = Client::new(&cfg).unwrap();
        client.send_logs(one_log()).await.unwrap();
        client.send_logs(one_log()).await.unwrap();
        let got: Vec<serde_json::Value> =
            std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0]["headers"], serde_json::json!({"x-tenant": "blue", "authorization": "Bearer t0ken"}));

        // The server's certificate is checked: without its CA the request fails.
        let mut untrusting = Client::new(&OtlpConfig { ca_pem: None, ..cfg.clone() }).unwrap();
        let (retry, msg) = untrusting.send_logs(one_log()).await.unwrap_err();
        assert!(msg.contains("certificate") || msg.contains("Certificate"), "{msg} (retry: {retry})");
        // A header that is no header is refused when the exporter starts.
        let bad = OtlpConfig { headers: vec![("bad header".into(), "x".into())], ..cfg };
        assert!(Client::new(&bad).err().unwrap().to_string().contains("\"bad header\""));
        drop(rx);
    }
}
