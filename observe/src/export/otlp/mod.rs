//! OTLP export: flows as OpenTelemetry log records, and HTTP flows that carry
//! trace context also as spans ([`convert`]), to any collector over OTLP/gRPC
//! or OTLP/HTTP with protobuf bodies ([`transport`]), configured as every
//! OpenTelemetry exporter is ([`settings`]: the agent's config, then the
//! `OTEL_EXPORTER_OTLP_*` variables).
//!
//! Why not the OpenTelemetry SDK's batch processors: they keep a queue of
//! their own and report what they drop in their own diagnostics, while weft
//! counts every lost flow by where it was lost, in the one counter the
//! pipeline's other losses are in (`weft_lost_events_total{source=
//! "otlp_exporter"}`), and retries a failed batch with backoff as a unit, logs
//! before spans. So the queue is weft's (bounded, filled without ever blocking
//! the pipeline), and the pieces under the SDK do the rest: the OTLP protobuf
//! types and tonic clients of `opentelemetry-proto`, tonic and reqwest as the
//! transports.
//!
//! Measured by `benches/benches/otlp_queue.rs` (same pipeline, transport and
//! receiver; the SDK's `BatchLogProcessor` with the same queue, batch and
//! retries): across a collector outage both lose about as many flows, but the
//! SDK's losses are counted nowhere the agent can read, and its per-record
//! emit on the flows thread made that thread lose records before any exporter
//! saw them.

mod convert;
pub mod settings;
pub mod transport;

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

pub use convert::{attributes, requests};
use serde::Serialize;
pub use settings::{OtlpOptions, PairError, ProcessEnv, enabled_by_env};
use tokio::sync::mpsc;
use transport::{Accepted, Client, Failure};
use weft_flow::proto::flow::FlowFilter;

use crate::{
    api::{
        convert::Context,
        filter::{Env, FilterListError, FilterSet},
    },
    pipeline::{
        Pipeline, Sink,
        enrich::Names,
        record::{Entry, FlowRecord},
    },
};

/// OTLP over gRPC or over HTTP with protobuf bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Protocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

impl Protocol {
    pub fn parse(s: &str) -> Result<Protocol, UnknownProtocol> {
        match s {
            "grpc" => Ok(Protocol::Grpc),
            "http/protobuf" | "http" => Ok(Protocol::HttpProtobuf),
            "http/json" => Err(UnknownProtocol::HttpJson),
            other => Err(UnknownProtocol::Other(other.to_owned())),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http/protobuf",
        }
    }
}

/// What is exported: flows as log records, HTTP flows with trace context as spans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Logs,
    Traces,
}

impl Signal {
    pub fn label(self) -> &'static str {
        match self {
            Signal::Logs => "logs",
            Signal::Traces => "traces",
        }
    }

    /// The OTLP/HTTP path of the signal.
    fn path(self) -> &'static str {
        match self {
            Signal::Logs => "v1/logs",
            Signal::Traces => "v1/traces",
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

/// How one signal's requests leave.
#[derive(Clone)]
pub struct Transport {
    pub signal: Signal,
    pub protocol: Protocol,
    /// grpc: the collector (`http://` or `https://`); http/protobuf: the
    /// whole URL requests are POSTed to.
    pub endpoint: String,
    /// Sent with every request; values are secrets (API keys): never printed.
    pub headers: Vec<(String, String)>,
    /// CA certificates (PEM) trusted for `https://`, besides the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and key (PEM) for mutual TLS.
    pub client_identity: Option<(Vec<u8>, Vec<u8>)>,
    pub compression: Compression,
    pub timeout: Duration,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Transport")
            .field("signal", &self.signal)
            .field("protocol", &self.protocol)
            .field("endpoint", &self.endpoint)
            .field("header_names", &names)
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.client_identity.is_some())
            .field("compression", &self.compression)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Exporter settings (see [`settings`] for where each comes from).
#[derive(Clone, Debug)]
pub struct OtlpConfig {
    pub logs: Transport,
    pub traces: Transport,
    /// Resource attributes besides weft's own.
    pub resource: Vec<(String, String)>,
    /// Flows waiting to be sent; what does not fit is dropped and counted.
    pub queue: usize,
    /// Flows per export request.
    pub batch: usize,
    /// Longest wait before a partial batch is sent.
    pub interval: Duration,
    /// How long one batch is retried before it is dropped (and counted).
    pub retry_for: Duration,
    /// Only flows these filters keep (Hubble's FlowFilter allow/deny lists);
    /// empty: every flow.
    pub allow: Vec<FlowFilter>,
    pub deny: Vec<FlowFilter>,
}

impl OtlpConfig {
    /// Both signals to `endpoint` over `protocol` (a base URL for
    /// http/protobuf), everything else as the defaults have it.
    pub fn to(endpoint: &str, protocol: Protocol) -> Result<OtlpConfig, OtlpError> {
        OtlpOptions { endpoint: Some(endpoint.into()), protocol: Some(protocol.label().into()), ..Default::default() }
            .resolve(&std::collections::BTreeMap::new())
    }
}

/// Why the exporter cannot start.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// A setting (config key or environment variable) is not usable.
    #[error("{key} = {value}: {reason}")]
    Setting { key: &'static str, value: String, reason: String },
    /// A client could not be built from usable settings.
    #[error("OTLP {signal} exporter: {reason}")]
    Client { signal: Signal, reason: String },
    #[error("flows.otlp.allow/deny: {0}")]
    Filters(#[from] FilterListError),
}

/// An OTLP protocol name weft does not speak.
#[derive(Debug, thiserror::Error)]
pub enum UnknownProtocol {
    #[error("http/json is not supported: use grpc or http/protobuf")]
    HttpJson,
    #[error("expected grpc or http/protobuf, not {0:?}")]
    Other(String),
}

/// One signal's counts.
#[derive(Debug)]
pub struct SignalStats {
    pub protocol: Protocol,
    /// Log records or spans the collector accepted.
    pub exported: AtomicU64,
    /// Log records or spans the collector refused in a partial success
    /// (not retried, as OTLP asks; refused log records are lost flows).
    pub rejected: AtomicU64,
    /// Requests that failed (each try).
    pub failed: AtomicU64,
    /// Failed requests that were tried again.
    pub retried: AtomicU64,
}

impl SignalStats {
    fn new(protocol: Protocol) -> Self {
        SignalStats {
            protocol,
            exported: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
        }
    }
}

/// What the exporter has done, for metrics and status.
#[derive(Debug)]
pub struct ExportStats {
    pub logs: SignalStats,
    pub traces: SignalStats,
    /// Flows dropped: the queue was full, or a batch was given up.
    pub dropped: AtomicU64,
    /// Flows waiting in the queue (as of the last batch in or out).
    pub queued: AtomicU64,
    pub queue_capacity: u64,
}

/// [`ExportStats`] as `/status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExportStatus {
    pub logs: SignalStatus,
    pub traces: SignalStatus,
    pub dropped: u64,
    pub queued: u64,
    pub queue_capacity: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SignalStatus {
    pub protocol: &'static str,
    pub exported: u64,
    pub rejected: u64,
    pub failed: u64,
    pub retried: u64,
}

impl ExportStats {
    pub fn status(&self) -> ExportStatus {
        let r = Ordering::Relaxed;
        let sig = |s: &SignalStats| SignalStatus {
            protocol: s.protocol.label(),
            exported: s.exported.load(r),
            rejected: s.rejected.load(r),
            failed: s.failed.load(r),
            retried: s.retried.load(r),
        };
        ExportStatus {
            logs: sig(&self.logs),
            traces: sig(&self.traces),
            dropped: self.dropped.load(r),
            queued: self.queued.load(r),
            queue_capacity: self.queue_capacity,
        }
    }
}

/// The sink side: filters and queues.
pub struct OtlpSink {
    tx: mpsc::Sender<(u64, FlowRecord)>,
    filters: FilterSet,
    pipeline: Arc<Pipeline>,
    stats: Arc<ExportStats>,
}

impl Sink for OtlpSink {
    fn batch(&mut self, first_seq: u64, entries: &[Entry], names: &Arc<Names>) {
        let env = Env { boot_id: self.pipeline.boot_id, names };
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
        self.stats.queued.store((self.tx.max_capacity() - self.tx.capacity()) as u64, Ordering::Relaxed);
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
    let stats = Arc::new(ExportStats {
        logs: SignalStats::new(cfg.logs.protocol),
        traces: SignalStats::new(cfg.traces.protocol),
        dropped: AtomicU64::new(0),
        queued: AtomicU64::new(0),
        queue_capacity: cfg.queue.max(1) as u64,
    });
    let clients = (Client::new(&cfg.logs)?, Client::new(&cfg.traces)?);
    tokio::spawn(export_loop(cfg, clients, rx, pipeline.clone(), stats.clone()));
    pipeline.add_sink(Box::new(OtlpSink { tx, filters, pipeline: pipeline.clone(), stats: stats.clone() }));
    Ok(stats)
}

async fn export_loop(
    cfg: OtlpConfig,
    (mut logs_client, mut traces_client): (Client, Client),
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
        stats.queued.store(rx.len() as u64, Ordering::Relaxed);
        let names = pipeline.names();
        let ctx = Context::new(names.clone(), pipeline.boot_id, true);
        let (logs, spans) = requests(&ctx, &names, &cfg.resource, &batch);
        let n_spans = spans.resource_spans.first().map_or(0, |r| r.scope_spans.first().map_or(0, |s| s.spans.len()));
        let start = Instant::now();
        let mut backoff = Duration::from_millis(100);
        let mut logs_done = false;
        let mut spans_done = n_spans == 0;
        loop {
            let mut failure = None;
            if !logs_done {
                match logs_client.send_logs(logs.clone()).await {
                    Ok(accepted) => {
                        logs_done = true;
                        let rejected = took(&stats.logs, batch.len(), &accepted, &cfg.logs, &mut last_warning);
                        if rejected > 0 {
                            pipeline.exporter_lost(rejected);
                        }
                    }
                    Err(e) => failure = Some((&stats.logs, &cfg.logs, e)),
                }
            }
            if failure.is_none() && !spans_done {
                match traces_client.send_spans(spans.clone()).await {
                    Ok(accepted) => {
                        spans_done = true;
                        took(&stats.traces, n_spans, &accepted, &cfg.traces, &mut last_warning);
                    }
                    Err(e) => failure = Some((&stats.traces, &cfg.traces, e)),
                }
            }
            let Some((signal_stats, transport, Failure { retry, message })) = failure else { break };
            signal_stats.failed.fetch_add(1, Ordering::Relaxed);
            if now_and_then(&mut last_warning) {
                tracing::warn!(signal = %transport.signal, endpoint = %transport.endpoint, "OTLP export failed: {message}");
            }
            if !retry || start.elapsed() + backoff > cfg.retry_for {
                if !logs_done {
                    stats.dropped.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    pipeline.exporter_lost(batch.len() as u64);
                }
                break;
            }
            signal_stats.retried.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Counts what the collector took of `sent` items and what it refused
/// (logged, at most every 30 s with the other export warnings); gives the
/// refused count.
fn took(
    stats: &SignalStats,
    sent: usize,
    accepted: &Accepted,
    transport: &Transport,
    last_warning: &mut Option<Instant>,
) -> u64 {
    let rejected = accepted.rejected.min(sent as u64);
    stats.exported.fetch_add(sent as u64 - rejected, Ordering::Relaxed);
    if rejected > 0 {
        stats.rejected.fetch_add(rejected, Ordering::Relaxed);
        if now_and_then(last_warning) {
            let why = accepted.message.as_deref().unwrap_or("no reason given");
            tracing::warn!(signal = %transport.signal, endpoint = %transport.endpoint,
                "the OTLP collector refused {rejected} of {sent} items: {why}");
        }
    }
    rejected
}

/// Whether a warning may be logged now: at most one every 30 s.
fn now_and_then(last: &mut Option<Instant>) -> bool {
    if last.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
        *last = Some(Instant::now());
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A partial success counts what the collector took as exported and the
    /// rest as rejected; a full success counts everything exported.
    #[test]
    fn a_partial_success_splits_exported_and_rejected() {
        let cfg = OtlpConfig::to("http://127.0.0.1:4317", Protocol::Grpc).unwrap();
        let stats = SignalStats::new(Protocol::Grpc);
        let mut last = None;
        let partial = Accepted { rejected: 3, message: Some("quota".into()) };
        assert_eq!(took(&stats, 10, &partial, &cfg.logs, &mut last), 3);
        assert_eq!(took(&stats, 5, &Accepted::default(), &cfg.logs, &mut last), 0);
        // More rejected than sent (not built by the transport, but held here too).
        assert_eq!(took(&stats, 2, &Accepted { rejected: 9, message: None }, &cfg.logs, &mut last), 2);
        assert_eq!(stats.exported.load(Ordering::Relaxed), 7 + 5);
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 5);
        assert!(last.is_some(), "the refusal was logged");
    }
}
