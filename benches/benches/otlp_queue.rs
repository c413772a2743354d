//! OTLP export: weft's own bounded queue against the OpenTelemetry SDK's
//! `BatchLogProcessor`, measured side by side (issue 19 asks the choice to be
//! measured). Both arms send the same log records over the same transport
//! (weft's tonic OTLP/gRPC client) to the same receiver in this process, from
//! the same flow pipeline fed with the same datapath records:
//!
//! - **weft**: `weft_observe::export::otlp::start` (queue, batches, retries
//!   with backoff, every loss in `weft_lost_events_total{source="otlp_exporter"}`).
//! - **sdk**: a pipeline sink that emits each flow as an SDK log record into
//!   a `BatchLogProcessor` (same queue size, batch size and delay as weft's
//!   defaults) whose `LogExporter` retries a failed batch with weft's backoff
//!   and counts the records of batches it gives up. That is the most an
//!   exporter under the SDK can count: the processor's own queue-full drops
//!   stay inside it (printed once at shutdown through its internal log).
//!
//! Two runs per arm, in this order, with the receiver started afresh:
//! 1. **throughput**: 100,000 flows offered at 25,000/s, receiver up;
//!    flows delivered per second of wall time and process CPU per 1,000 flows
//!    that reached the exporter.
//! 2. **outage**: 4,000 flows/s for 8 s; the receiver answers UNAVAILABLE from
//!    1 s to 5 s; then up to 40 s to drain. Flows delivered, lost and counted,
//!    lost and not counted (offered − delivered − counted).
//!
//! Figures are ratios of the SDK arm to weft's, from the same run. The SDK
//! arm pays one conversion more than an SDK-based weft would (flow → OTLP
//! record → SDK record; the SDK then encodes its own), so its CPU figure is
//! an upper bound; the loss accounting does not depend on it.
//!
//! `cargo bench -p weft-benches --bench otlp_queue` (no root, no lab).

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use opentelemetry::logs::{AnyValue as SdkValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry_proto::{
    tonic::{
        collector::logs::v1::{
            ExportLogsServiceRequest, ExportLogsServiceResponse,
            logs_service_server::{LogsService, LogsServiceServer},
        },
        common::v1::{AnyValue, any_value::Value},
        logs::v1::LogRecord,
    },
    transform::{common::tonic::ResourceAttributesWithSchema, logs::tonic::group_logs_by_resource_and_scope},
};
use opentelemetry_sdk::{
    Resource,
    error::{OTelSdkError, OTelSdkResult},
    logs::{BatchConfigBuilder, BatchLogProcessor, LogBatch, LogExporter, SdkLogger, SdkLoggerProvider},
};
use weft_benches::{machine, save};
use weft_ebpf::abi::{self, Event};
use weft_observe::{
    api::convert::Context,
    export::otlp::{self, ExportStats, OtlpConfig, Protocol, requests, transport::Client},
    pipeline::{
        EventFeed, Pipeline, PipelineConfig, Sink,
        enrich::Names,
        record::{Entry, LostSource},
    },
};

/// weft's defaults (`flows.otlp`), used by both arms.
const QUEUE: usize = 8192;
const BATCH: usize = 512;
const DELAY: Duration = Duration::from_secs(1);
/// How long a failed batch is retried, both arms (weft's default).
const RETRY_FOR: Duration = Duration::from_secs(30);
/// Flows per second offered in the throughput run (the outage run offers 4,000/s).
const THROUGHPUT_RATE: u64 = 25_000;

// ------------------------------------------------------------------ receiver

/// An OTLP/gRPC logs receiver that counts records, and refuses while `down`.
#[derive(Clone, Default)]
struct Receiver {
    records: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
}

#[tonic::async_trait]
impl LogsService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        if self.down.load(Ordering::Relaxed) {
            return Err(tonic::Status::unavailable("receiver down (bench outage)"));
        }
        let n: usize =
            req.get_ref().resource_logs.iter().flat_map(|r| &r.scope_logs).map(|s| s.log_records.len()).sum();
        self.records.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

async fn start_receiver() -> (Receiver, SocketAddr) {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("binding the receiver");
    let addr = listener.local_addr().expect("receiver address");
    let r = Receiver::default();
    let svc = LogsServiceServer::new(r.clone());
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder().add_service(svc).serve_with_incoming(incoming).await;
    });
    (r, addr)
}

// ------------------------------------------------------------------ sdk arm

/// The SDK arm's exporter: weft's transport, weft's retry policy, and a count
/// of the records in batches it gave up.
struct SdkExporter {
    client: Arc<tokio::sync::Mutex<Client>>,
    runtime: tokio::runtime::Handle,
    resource: ResourceAttributesWithSchema,
    given_up: Arc<AtomicU64>,
}

impl std::fmt::Debug for SdkExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdkExporter").finish_non_exhaustive()
    }
}

impl LogExporter for SdkExporter {
    async fn export(&self, batch: LogBatch<'_>) -> OTelSdkResult {
        let n = batch.iter().count() as u64;
        let req = ExportLogsServiceRequest { resource_logs: group_logs_by_resource_and_scope(&batch, &self.resource) };
        let client = self.client.clone();
        // The processor's thread runs this future with a plain executor;
        // tonic needs the runtime, so the send runs there.
        let sent = self
            .runtime
            .spawn(async move {
                let start = Instant::now();
                let mut backoff = Duration::from_millis(100);
                loop {
                    match client.lock().await.send_logs(req.clone()).await {
                        Ok(_) => return true,
                        Err(f) if !f.retry || start.elapsed() + backoff > RETRY_FOR => return false,
                        Err(_) => {}
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            })
            .await
            .unwrap_or(false);
        if sent {
            Ok(())
        } else {
            self.given_up.fetch_add(n, Ordering::Relaxed);
            Err(OTelSdkError::InternalFailure("batch given up".into()))
        }
    }
}

/// Emits each flow as an SDK log record with the fields weft's exporter
/// gives it (built by weft's own conversion, then copied).
struct SdkSink {
    logger: SdkLogger,
    pipeline: Arc<Pipeline>,
}

impl Sink for SdkSink {
    fn batch(&mut self, first_seq: u64, entries: &[Entry], names: &Arc<Names>) {
        let ctx = Context::new(self.pipeline.names(), self.pipeline.boot_id, true);
        for (i, e) in entries.iter().enumerate() {
            let Entry::Flow(f) = e else { continue };
            let (logs, _) = requests(&ctx, names, &[], &[(first_seq + i as u64, f.clone())]);
            for r in logs.resource_logs.iter().flat_map(|r| &r.scope_logs).flat_map(|s| &s.log_records) {
                self.logger.emit(sdk_record(&self.logger, r));
            }
        }
    }
}

fn sdk_record(logger: &SdkLogger, r: &LogRecord) -> opentelemetry_sdk::logs::SdkLogRecord {
    let mut rec = logger.create_log_record();
    rec.set_timestamp(UNIX_EPOCH + Duration::from_nanos(r.time_unix_nano));
    rec.set_observed_timestamp(SystemTime::now());
    rec.set_severity_number(if r.severity_number == Severity::Warn as i32 { Severity::Warn } else { Severity::Info });
    rec.set_severity_text(if r.severity_number == Severity::Warn as i32 { "WARN" } else { "INFO" });
    rec.set_event_name("weft.flow");
    if let Some(b) = r.body.as_ref().and_then(sdk_value) {
        rec.set_body(b);
    }
    for kv in &r.attributes {
        if let Some(v) = kv.value.as_ref().and_then(sdk_value) {
            rec.add_attribute(kv.key.clone(), v);
        }
    }
    rec
}

fn sdk_value(v: &AnyValue) -> Option<SdkValue> {
    Some(match v.value.as_ref()? {
        Value::StringValue(s) => SdkValue::String(s.clone().into()),
        Value::IntValue(i) => SdkValue::Int(*i),
        Value::BoolValue(b) => SdkValue::Boolean(*b),
        Value::DoubleValue(d) => SdkValue::Double(*d),
        Value::ArrayValue(a) => SdkValue::ListAny(Box::new(a.values.iter().filter_map(sdk_value).collect())),
        Value::KvlistValue(l) => SdkValue::Map(Box::new(
            l.values.iter().filter_map(|kv| Some((kv.key.clone().into(), sdk_value(kv.value.as_ref()?)?))).collect(),
        )),
        Value::BytesValue(b) => SdkValue::Bytes(Box::new(b.clone())),
        _ => return None,
    })
}

// ------------------------------------------------------------------ runs

#[derive(Clone, Copy, PartialEq)]
enum Arm {
    Weft,
    Sdk,
}

impl Arm {
    fn name(self) -> &'static str {
        match self {
            Arm::Weft => "weft",
            Arm::Sdk => "sdk",
        }
    }
}

/// What one arm did in one run.
#[derive(Debug, Default)]
struct Outcome {
    offered: u64,
    /// Lost at the pipeline's input before any exporter saw them (counted
    /// by the pipeline as agent_queue): a consumer too slow upstream.
    before: u64,
    delivered: u64,
    counted: u64,
    wall: Duration,
    cpu: Duration,
}

impl Outcome {
    fn uncounted(&self) -> u64 {
        self.offered.saturating_sub(self.before + self.delivered + self.counted)
    }
}

/// A running arm: the pipeline it is fed through and where its losses show.
struct Running {
    pipeline: Arc<Pipeline>,
    feed: EventFeed,
    receiver: Receiver,
    weft: Option<Arc<ExportStats>>,
    sdk: Option<(SdkLoggerProvider, Arc<AtomicU64>)>,
}

impl Running {
    async fn start(arm: Arm) -> Running {
        let (receiver, addr) = start_receiver().await;
        let (pipeline, feed) = Pipeline::start(PipelineConfig::default(), Names::new("bench-node"));
        let mut cfg = OtlpConfig::to(&format!("http://{addr}"), Protocol::Grpc).expect("OTLP settings");
        (cfg.queue, cfg.batch, cfg.interval, cfg.retry_for) = (QUEUE, BATCH, DELAY, RETRY_FOR);
        let mut r = Running { pipeline: pipeline.clone(), feed, receiver, weft: None, sdk: None };
        match arm {
            Arm::Weft => r.weft = Some(otlp::start(cfg, pipeline).expect("starting weft's exporter")),
            Arm::Sdk => {
                let given_up = Arc::new(AtomicU64::new(0));
                let resource = Resource::builder_empty().with_service_name("weft-agent").build();
                let exporter = SdkExporter {
                    client: Arc::new(tokio::sync::Mutex::new(Client::new(&cfg.logs).expect("OTLP client"))),
                    runtime: tokio::runtime::Handle::current(),
                    resource: (&resource).into(),
                    given_up: given_up.clone(),
                };
                let processor = BatchLogProcessor::builder(exporter)
                    .with_batch_config(
                        BatchConfigBuilder::default()
                            .with_max_queue_size(QUEUE)
                            .with_max_export_batch_size(BATCH)
                            .with_scheduled_delay(DELAY)
                            .build(),
                    )
                    .build();
                let provider =
                    SdkLoggerProvider::builder().with_resource(resource).with_log_processor(processor).build();
                pipeline.add_sink(Box::new(SdkSink { logger: provider.logger("weft"), pipeline: pipeline.clone() }));
                r.sdk = Some((provider, given_up));
            }
        }
        r
    }

    /// Losses the agent could report: weft's exporter counter, or what the
    /// SDK arm's exporter gave up.
    fn counted(&self) -> u64 {
        match (&self.weft, &self.sdk) {
            (Some(s), _) => s.dropped.load(Ordering::Relaxed),
            (_, Some((_, given_up))) => given_up.load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// Offers `n` flows at `rate` per second (in 1,000-flow steps).
    async fn offer(&mut self, first: u64, n: u64, rate: u64) {
        let step = 1000u64;
        let t0 = Instant::now();
        let mut sent = 0;
        while sent < n {
            for i in 0..step.min(n - sent) {
                self.feed.push(&flow_event(first + sent + i));
            }
            self.feed.flush();
            sent += step.min(n - sent);
            let due = t0 + Duration::from_secs_f64(sent as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
    }

    /// Waits until every flow is delivered or counted, or nothing moved
    /// for 2 s, or `limit`.
    async fn settle(&self, offered: u64, limit: Duration) -> Instant {
        let t0 = Instant::now();
        let mut last = (u64::MAX, Instant::now());
        loop {
            let now = self.receiver.records.load(Ordering::Relaxed) + self.counted() + self.pipeline_lost();
            if now >= offered {
                return Instant::now();
            }
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > Duration::from_secs(2) || t0.elapsed() > limit {
                return last.1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stop(self) {
        if let Some((provider, _)) = self.sdk {
            let _ = provider.shutdown();
        }
        self.pipeline.stop();
    }

    /// Flows the pipeline itself lost before any exporter saw them (its
    /// input queue): not the exporters' doing, shown apart.
    fn pipeline_lost(&self) -> u64 {
        self.pipeline.counters.lost(LostSource::AgentQueue)
    }
}

fn flow_event(i: u64) -> Event {
    Event {
        ts_ns: 1,
        r#type: abi::EV_TRACE as u8,
        subtype: abi::OBS_TO_ENDPOINT as u8,
        reason: abi::REASON_NEW as u8,
        saddr: u32::from_ne_bytes([10, 1, (i >> 16) as u8, 10]),
        daddr: u32::from_ne_bytes([10, 1, 2, 20]),
        sport: ((i % 50_000) as u16 + 10_000).to_be(),
        dport: 8080u16.to_be(),
        proto: 6,
        tcp_flags: 0x02,
        ..Default::default()
    }
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

async fn throughput(arm: Arm) -> Outcome {
    const N: u64 = 100_000;
    let mut r = Running::start(arm).await;
    let (t0, c0) = (Instant::now(), cpu_time());
    r.offer(0, N, THROUGHPUT_RATE).await;
    let end = r.settle(N, Duration::from_secs(60)).await;
    let out = Outcome {
        offered: N,
        before: r.pipeline_lost(),
        delivered: r.receiver.records.load(Ordering::Relaxed),
        counted: r.counted(),
        wall: end.saturating_duration_since(t0),
        cpu: cpu_time().saturating_sub(c0),
    };
    r.stop();
    out
}

async fn outage(arm: Arm) -> Outcome {
    const RATE: u64 = 4_000;
    let mut r = Running::start(arm).await;
    let t0 = Instant::now();
    let down = r.receiver.down.clone();
    let switch = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        down.store(true, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(4)).await;
        down.store(false, Ordering::Relaxed);
    });
    r.offer(0, RATE * 8, RATE).await;
    let _ = switch.await;
    let end = r.settle(RATE * 8, Duration::from_secs(40)).await;
    let out = Outcome {
        offered: RATE * 8,
        before: r.pipeline_lost(),
        delivered: r.receiver.records.load(Ordering::Relaxed),
        counted: r.counted(),
        wall: end.saturating_duration_since(t0),
        cpu: Duration::ZERO,
    };
    r.stop();
    out
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime");
    println!("OTLP export queue: weft's own against the SDK's BatchLogProcessor ({})", machine());
    let mut figures = serde_json::Map::new();
    rt.block_on(async {
        let mut tp = Vec::new();
        for arm in [Arm::Weft, Arm::Sdk] {
            let o = throughput(arm).await;
            println!(
                "throughput {:4}: {} offered, {} lost at the pipeline's input, {} delivered ({:.0}/s), {} lost and counted, {} lost uncounted, CPU {:.1} ms per 1,000 flows",
                arm.name(),
                o.offered,
                o.before,
                o.delivered,
                o.delivered as f64 / o.wall.as_secs_f64().max(1e-9),
                o.counted,
                o.uncounted(),
                o.cpu.as_secs_f64() * 1e6 / (o.offered - o.before).max(1) as f64,
            );
            tp.push(o);
        }
        let rate = |o: &Outcome| o.delivered as f64 / o.wall.as_secs_f64().max(1e-9);
        let cpu = |o: &Outcome| o.cpu.as_secs_f64() / (o.offered - o.before).max(1) as f64;
        println!(
            "  sdk / weft: delivered per second {:.2}x, CPU per flow {:.2}x",
            rate(&tp[1]) / rate(&tp[0]).max(1e-9),
            cpu(&tp[1]) / cpu(&tp[0]).max(1e-12)
        );
        let mut out = Vec::new();
        for arm in [Arm::Weft, Arm::Sdk] {
            let o = outage(arm).await;
            println!(
                "outage     {:4}: {} offered, {} lost at the pipeline's input, {} delivered, {} lost and counted, {} lost uncounted (settled after {:.1} s)",
                arm.name(),
                o.offered,
                o.before,
                o.delivered,
                o.counted,
                o.uncounted(),
                o.wall.as_secs_f64()
            );
            out.push(o);
        }
        for (run, os) in [("throughput", &tp), ("outage", &out)] {
            for (arm, o) in [Arm::Weft, Arm::Sdk].iter().zip(os.iter()) {
                figures.insert(
                    format!("{run}_{}", arm.name()),
                    serde_json::json!({
                        "offered": o.offered, "pipeline_lost": o.before, "delivered": o.delivered, "counted": o.counted,
                        "uncounted": o.uncounted(), "wall_s": o.wall.as_secs_f64(), "cpu_s": o.cpu.as_secs_f64(),
                    }),
                );
            }
        }
    });
    save("otlp_queue", serde_json::Value::Object(figures));
}
