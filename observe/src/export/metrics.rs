//! Flow metrics for Prometheus, in the spirit of Hubble's (`weft_` instead of
//! `hubble_`), and the pipeline's own health. Flow metrics are counted per
//! batch: the sink first folds a batch into a few keys, then touches each
//! metric once per key. Optional context labels (namespace, workload,
//! direction) say where traffic came from and went, at a cardinality the
//! user chooses.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::Arc,
    time::Duration,
};

use fnv::FnvBuildHasher;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge, histogram::Histogram},
    registry::Registry,
};
use weft_ebpf::abi;

use weft_flow::{
    names,
    proto::flow::{TrafficDirection, Verdict},
    time::now_ns,
};

use super::otlp::{ExportStats, Signal, SignalStats};
use crate::pipeline::{
    Pipeline, Refusal, Sink,
    enrich::Names,
    record::{EV_L7, EndpointInfo, Entry, FlowRecord, L7_REQUEST, L7_RESPONSE, LostSource},
};

/// Label pairs of one series.
pub type Labels = Vec<(&'static str, String)>;

/// Which context labels flow metrics carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub source_namespace: bool,
    pub source_workload: bool,
    pub destination_namespace: bool,
    pub destination_workload: bool,
    pub traffic_direction: bool,
}

impl Default for Context {
    /// Namespaces and workloads of both ends: what the dashboards group by.
    fn default() -> Self {
        Context {
            source_namespace: true,
            source_workload: true,
            destination_namespace: true,
            destination_workload: true,
            traffic_direction: false,
        }
    }
}

/// A metrics context label weft does not have.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown context label {0:?} (known: {known}, or none)", known = Context::NAMES.join(", "))]
pub struct UnknownContextLabel(pub String);

impl Context {
    /// Every context label name, as the config spells them.
    pub const NAMES: [&'static str; 5] =
        ["source_namespace", "source_workload", "destination_namespace", "destination_workload", "traffic_direction"];

    /// Parses a list of label names (`none` for no context labels).
    pub fn parse(list: &[String]) -> Result<Context, UnknownContextLabel> {
        let mut c = Context {
            source_namespace: false,
            source_workload: false,
            destination_namespace: false,
            destination_workload: false,
            traffic_direction: false,
        };
        for name in list {
            match name.as_str() {
                "source_namespace" => c.source_namespace = true,
                "source_workload" => c.source_workload = true,
                "destination_namespace" => c.destination_namespace = true,
                "destination_workload" => c.destination_workload = true,
                "traffic_direction" => c.traffic_direction = true,
                "none" => {}
                other => return Err(UnknownContextLabel(other.to_owned())),
            }
        }
        Ok(c)
    }

    fn labels(&self, src: Option<&EndpointInfo>, dst: Option<&EndpointInfo>, dir: TrafficDirection, out: &mut Labels) {
        let ns = |e: Option<&EndpointInfo>| e.map(|e| e.namespace.clone()).unwrap_or_default();
        let wl = |e: Option<&EndpointInfo>| e.map(|e| e.workload_name().to_owned()).unwrap_or_default();
        if self.source_namespace {
            out.push(("source_namespace", ns(src)));
        }
        if self.source_workload {
            out.push(("source_workload", wl(src)));
        }
        if self.destination_namespace {
            out.push(("destination_namespace", ns(dst)));
        }
        if self.destination_workload {
            out.push(("destination_workload", wl(dst)));
        }
        if self.traffic_direction {
            out.push(("traffic_direction", dir.as_str_name().to_ascii_lowercase()));
        }
    }
}

/// Bucket bounds (seconds) of the HTTP duration histogram, as Hubble's.
pub const HTTP_BUCKETS: [f64; 11] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

fn http_histogram() -> Histogram {
    Histogram::new(HTTP_BUCKETS)
}

/// How long a series naming a pod's workload or namespace that is gone
/// stays after its last update (a few scrapes see its final value).
pub const SERIES_GRACE: Duration = Duration::from_secs(300);
/// How often series are checked for expiry.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);

/// The families whose series carry context labels, for expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Fam {
    Flows,
    Drops,
    Policy,
    HttpRequests,
    HttpResponses,
    HttpDuration,
}

/// The flow metric families.
#[derive(Clone)]
pub struct FlowMetrics {
    ctx: Context,
    flows: Family<Labels, Counter>,
    drops: Family<Labels, Counter>,
    policy: Family<Labels, Counter>,
    tcp_flags: Family<Labels, Counter>,
    http_requests: Family<Labels, Counter>,
    http_responses: Family<Labels, Counter>,
    http_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// Series with context labels naming a namespace or workload, and when
    /// each was last updated (unix seconds): the ones whose pods are all
    /// gone expire after [`FlowMetrics::grace`].
    touched: HashMap<(Fam, Labels), u64, FnvBuildHasher>,
    grace: Duration,
    /// When expiry last ran (unix seconds).
    expired_at: u64,
}

impl FlowMetrics {
    /// Creates the families and registers them (names without the `weft_`
    /// prefix, which the registry adds).
    pub fn register(registry: &mut Registry, ctx: Context) -> FlowMetrics {
        let m = FlowMetrics {
            ctx,
            flows: Family::default(),
            drops: Family::default(),
            policy: Family::default(),
            tcp_flags: Family::default(),
            http_requests: Family::default(),
            http_responses: Family::default(),
            http_duration: Family::new_with_constructor(http_histogram),
            touched: HashMap::default(),
            grace: SERIES_GRACE,
            expired_at: 0,
        };
        registry.register(
            "flows_processed",
            "Flows processed, by type, subtype, verdict and protocol",
            m.flows.clone(),
        );
        registry.register("drop", "Dropped packets, by drop reason and protocol", m.drops.clone());
        registry.register("policy_verdicts", "Policy verdicts, by direction, match type and action", m.policy.clone());
        registry.register("tcp_flags", "TCP packets by flag combination (SYN, SYN-ACK, FIN, RST)", m.tcp_flags.clone());
        registry.register("http_requests", "HTTP requests through the node's proxy", m.http_requests.clone());
        registry.register(
            "http_responses",
            "HTTP responses through the node's proxy, by status",
            m.http_responses.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time from the start of an HTTP request to the last byte of its response",
            m.http_duration.clone(),
        );
        m
    }
}

impl FlowMetrics {
    /// How long a series of a gone workload or namespace stays ([`SERIES_GRACE`]).
    pub fn set_grace(&mut self, grace: Duration) {
        self.grace = grace;
    }

    /// Series with context labels naming a namespace or workload.
    pub fn context_series(&self) -> usize {
        self.touched.len()
    }

    /// Notes that the series `(fam, labels)` was updated at `now`, when its
    /// context labels name something that can go away.
    fn touch(&mut self, fam: Fam, labels: &Labels, now: u64) {
        let names_something = labels.iter().any(|(k, v)| !v.is_empty() && CONTEXT_NAMES.contains(k));
        if names_something {
            match self.touched.get_mut(&(fam, labels.clone())) {
                Some(t) => *t = now,
                None => {
                    self.touched.insert((fam, labels.clone()), now);
                }
            }
        }
    }

    fn remove(&self, fam: Fam, labels: &Labels) {
        match fam {
            Fam::Flows => self.flows.remove(labels),
            Fam::Drops => self.drops.remove(labels),
            Fam::Policy => self.policy.remove(labels),
            Fam::HttpRequests => self.http_requests.remove(labels),
            Fam::HttpResponses => self.http_responses.remove(labels),
            Fam::HttpDuration => self.http_duration.remove(labels),
        };
    }

    /// Removes the series not updated for [`FlowMetrics::grace`] whose
    /// namespace or workload no pod of `names` has any more. Runs at most
    /// every [`EXPIRE_EVERY`] unless the grace is shorter.
    pub fn expire(&mut self, names: &Names, now: u64) {
        let every = EXPIRE_EVERY.min(self.grace).as_secs();
        if self.touched.is_empty() || now.saturating_sub(self.expired_at) < every {
            return;
        }
        self.expired_at = now;
        let mut namespaces = HashSet::new();
        let mut workloads = HashSet::new();
        for e in names.endpoints() {
            namespaces.insert(e.namespace.as_str());
            workloads.insert((e.namespace.as_str(), e.workload_name()));
        }
        let grace = self.grace.as_secs();
        let live = |labels: &Labels| {
            let get = |k: &str| labels.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str()).filter(|v| !v.is_empty());
            [("source_namespace", "source_workload"), ("destination_namespace", "destination_workload")]
                .into_iter()
                .all(|(n, w)| match (get(n), get(w)) {
                    (Some(ns), Some(wl)) => workloads.contains(&(ns, wl)),
                    (Some(ns), None) => namespaces.contains(ns),
                    (None, Some(wl)) => workloads.iter().any(|(_, w)| *w == wl),
                    (None, None) => true,
                })
        };
        let gone: Vec<(Fam, Labels)> = self
            .touched
            .iter()
            .filter(|(k, t)| now.saturating_sub(**t) >= grace && !live(&k.1))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.remove(k.0, &k.1);
            self.touched.remove(&k);
        }
    }
}

/// Context label names whose values can go away with their pods.
const CONTEXT_NAMES: [&str; 4] =
    ["source_namespace", "source_workload", "destination_namespace", "destination_workload"];

/// What one flow counts towards, without its labels: flows of a batch
/// that share a key are counted together, and labels are built per key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    /// 0: flows_processed, 1: drop, 2: policy_verdicts.
    metric: u8,
    a: u16,
    b: u16,
    c: u16,
    /// Context endpoints by identity of their shared record (0 when the
    /// context labels do not need them).
    src: usize,
    dst: usize,
    dir: i32,
}

type Ctx = (Option<Arc<EndpointInfo>>, Option<Arc<EndpointInfo>>);

/// The `match` of a policy verdict made in the node's Envoy (`l7/http`, as
/// Hubble names it); the datapath's match types are small numbers.
const L7_HTTP_MATCH: u16 = u16::MAX;

fn flow_type(t: u8, sub: u8) -> (&'static str, String) {
    match t as u32 {
        abi::EV_DROP => ("Drop", String::new()),
        abi::EV_TRACE => ("Trace", names::observation_point(sub as u32).to_owned()),
        abi::EV_POLICY => ("PolicyVerdict", String::new()),
        abi::EV_SOCK => ("Sock", names::observation_point(sub as u32).to_owned()),
        _ if t == EV_L7 => ("L7", "HTTP".into()),
        _ => ("Unknown", String::new()),
    }
}

fn proto_name(p: u16) -> &'static str {
    if p == EV_L7 as u16 { "HTTP" } else { names::protocol(p as u8) }
}

fn reporter(f: &FlowRecord) -> &'static str {
    match f.direction() {
        TrafficDirection::Egress => "client",
        TrafficDirection::Ingress => "server",
        _ => "unknown",
    }
}

/// The flag combinations Hubble counts.
fn flag_names(flags: u8) -> &'static [&'static str] {
    let (syn, ack, fin, rst) = (flags & 0x02 != 0, flags & 0x10 != 0, flags & 0x01 != 0, flags & 0x04 != 0);
    match (syn, ack, fin, rst) {
        (true, true, _, _) => &["SYN-ACK"],
        (true, false, _, _) => &["SYN"],
        (_, _, true, true) => &["FIN", "RST"],
        (_, _, true, false) => &["FIN"],
        (_, _, false, true) => &["RST"],
        _ => &[],
    }
}

fn ptr(e: &Option<Arc<EndpointInfo>>) -> usize {
    e.as_ref().map(|a| Arc::as_ptr(a) as usize).unwrap_or(0)
}

impl FlowMetrics {
    fn key(&self, metric: u8, a: u16, b: u16, c: u16, f: &FlowRecord, dir: TrafficDirection) -> Key {
        let x = &self.ctx;
        Key {
            metric,
            a,
            b,
            c,
            src: if x.source_namespace || x.source_workload { ptr(&f.src) } else { 0 },
            dst: if x.destination_namespace || x.destination_workload { ptr(&f.dst) } else { 0 },
            dir: if x.traffic_direction { dir as i32 } else { 0 },
        }
    }

    fn labels(&self, k: &Key, ctx: &Ctx) -> (Fam, Family<Labels, Counter>, Labels) {
        let (which, fam, mut l): (_, _, Labels) = match k.metric {
            0 => {
                let (ty, sub) = flow_type((k.a >> 8) as u8, k.a as u8);
                let v = Verdict::try_from(k.b as i32).unwrap_or(Verdict::Unknown);
                let l = vec![
                    ("type", ty.into()),
                    ("subtype", sub),
                    ("verdict", v.as_str_name().into()),
                    ("protocol", proto_name(k.c).into()),
                ];
                (Fam::Flows, self.flows.clone(), l)
            }
            1 => (
                Fam::Drops,
                self.drops.clone(),
                vec![("reason", names::drop_reason(k.a as u32).into()), ("protocol", proto_name(k.c).into())],
            ),
            _ => {
                let dir = TrafficDirection::try_from(k.c as i32).unwrap_or(TrafficDirection::Unknown);
                let l = vec![
                    ("direction", dir.as_str_name().to_ascii_lowercase()),
                    (
                        "match",
                        if k.a == L7_HTTP_MATCH {
                            "l7/http".into()
                        } else {
                            names::policy_match(k.a as u32).to_ascii_lowercase()
                        },
                    ),
                    // Hubble's action: the verdict's name in lower case.
                    (
                        "action",
                        Verdict::try_from(k.b as i32).unwrap_or(Verdict::Unknown).as_str_name().to_ascii_lowercase(),
                    ),
                ];
                (Fam::Policy, self.policy.clone(), l)
            }
        };
        let dir = TrafficDirection::try_from(k.dir).unwrap_or(TrafficDirection::Unknown);
        self.ctx.labels(ctx.0.as_deref(), ctx.1.as_deref(), dir, &mut l);
        (which, fam, l)
    }
}

impl Sink for FlowMetrics {
    fn batch(&mut self, _first_seq: u64, entries: &[Entry], names: &Arc<Names>) {
        let now = now_ns() / 1_000_000_000;
        let mut touched: Vec<(Fam, Labels)> = Vec::new();
        let mut fold: HashMap<Key, (u64, Ctx), FnvBuildHasher> = HashMap::default();
        let mut tcp = [0u64; 4];
        let mut add =
            |k: Key, f: &FlowRecord| fold.entry(k).or_insert_with(|| (0, (f.src.clone(), f.dst.clone()))).0 += 1;
        for e in entries {
            let Entry::Flow(f) = e else { continue };
            let verdict = f.verdict();
            let dir = f.direction();
            let ev = &f.ev;
            let proto = if f.is_l7() { EV_L7 as u16 } else { ev.proto as u16 };
            add(self.key(0, (ev.r#type as u16) << 8 | ev.subtype as u16, verdict as u16, proto, f, dir), f);
            match ev.r#type as u32 {
                abi::EV_DROP => add(self.key(1, ev.subtype as u16, 0, proto, f, dir), f),
                // The node's policy listener decided this request (allowed or
                // refused it by a rule): one L7 verdict per request. Hubble
                // counts each access-log flow, responses too; a response is
                // not a decision, so weft leaves it out.
                _ if f.is_l7() && ev.subtype == L7_REQUEST && ev.rule_id != 0 => {
                    add(self.key(2, L7_HTTP_MATCH, verdict as u16, dir as u16, f, dir), f)
                }
                abi::EV_POLICY => add(self.key(2, ev.policy_match as u16, verdict as u16, dir as u16, f, dir), f),
                abi::EV_TRACE if ev.proto == 6 => {
                    for flag in flag_names(ev.tcp_flags) {
                        let i = ["SYN", "SYN-ACK", "FIN", "RST"].iter().position(|n| n == flag).unwrap_or(0);
                        tcp[i] += 1;
                    }
                }
                _ => {}
            }
            if let Some(h) = &f.http {
                // L7 flows are far fewer than packets: labels per flow.
                let method = if h.method.is_empty() { "UNKNOWN".to_string() } else { h.method.clone() };
                let rep = reporter(f);
                let mut ctx = Labels::new();
                // A response flows from server to client; its labels name the
                // request's ends (as Hubble's do), so one `destination_workload`
                // selects a service's requests, responses and latencies alike.
                let (client, server) = if ev.subtype == L7_RESPONSE { (&f.dst, &f.src) } else { (&f.src, &f.dst) };
                self.ctx.labels(client.as_deref(), server.as_deref(), dir, &mut ctx);
                if ev.subtype == L7_REQUEST {
                    let mut l: Labels =
                        vec![("method", method), ("protocol", h.protocol.into()), ("reporter", rep.into())];
                    l.extend(ctx);
                    self.http_requests.get_or_create(&l).inc();
                    touched.push((Fam::HttpRequests, l));
                } else if ev.subtype == L7_RESPONSE {
                    let mut l: Labels =
                        vec![("method", method.clone()), ("status", h.code.to_string()), ("reporter", rep.into())];
                    l.extend(ctx.iter().cloned());
                    self.http_responses.get_or_create(&l).inc();
                    touched.push((Fam::HttpResponses, l));
                    let mut l: Labels = vec![("method", method), ("reporter", rep.into())];
                    l.extend(ctx);
                    self.http_duration.get_or_create(&l).observe(h.duration_ns as f64 / 1e9);
                    touched.push((Fam::HttpDuration, l));
                }
            }
        }
        for (k, (n, ctx)) in &fold {
            let (which, fam, l) = self.labels(k, ctx);
            fam.get_or_create(&l).inc_by(*n);
            touched.push((which, l));
        }
        for (i, n) in tcp.iter().enumerate().filter(|(_, n)| **n > 0) {
            let flag = ["SYN", "SYN-ACK", "FIN", "RST"][i];
            self.tcp_flags.get_or_create(&vec![("flag", flag.into()), ("family", "IPv4".into())]).inc_by(*n);
        }
        for (fam, l) in &touched {
            self.touch(*fam, l, now);
        }
        self.expire(names, now);
    }

    fn idle(&mut self, names: &Names) {
        self.expire(names, now_ns() / 1_000_000_000);
    }
}

/// The pipeline's own numbers, read at scrape time.
pub struct PipelineCollector(pub Arc<Pipeline>);

impl fmt::Debug for PipelineCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PipelineCollector")
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

impl Collector for PipelineCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let p = &self.0;
        let c = &p.counters;
        counter(&mut enc, "events_read", "Records read from the datapath's ring buffer", c.events_read.load(Relaxed))?;
        {
            let mut m = enc.encode_descriptor(
                "datapath_events",
                "Records the datapath wrote to the ring buffer, or failed to write because it was full",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (outcome, v) in [("written", c.kernel_written.load(Relaxed)), ("lost", c.kernel_lost.load(Relaxed))] {
                ConstCounter::new(v).encode(m.encode_family(&[("outcome", outcome)])?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "lost_events",
                "Events lost on their way to readers, by where they were lost",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for s in LostSource::ALL {
                ConstCounter::new(c.lost(s)).encode(m.encode_family(&[("source", s.label())])?)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "flow_requests_refused",
                "Flow API requests refused: invalid, or over a limit (filters, regular expressions, streams)",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for r in Refusal::ALL {
                ConstCounter::new(c.refused(r)).encode(m.encode_family(&[("reason", r.label())])?)?;
            }
        }
        counter(
            &mut enc,
            "access_log_entries",
            "HTTP access-log entries received from Envoy",
            c.l7_received.load(Relaxed),
        )?;
        counter(&mut enc, "flows_stored", "Flows added to the flow store", c.flows.load(Relaxed))?;
        let st = p.store.stats(now_ns() / 1_000_000_000);
        gauge(&mut enc, "flow_store_flows", "Flows held in the flow store", st.num_flows as i64)?;
        gauge(&mut enc, "flow_store_capacity", "Flows the flow store can hold", st.max_flows as i64)?;
        Ok(())
    }
}

/// The OTLP exporter's counts, read at scrape time.
#[derive(Debug)]
pub struct OtlpCollector(pub Arc<ExportStats>);

impl Collector for OtlpCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        use std::sync::atomic::Ordering::Relaxed;
        let st = &self.0;
        type Read = fn(&SignalStats) -> u64;
        let read: [(&str, &str, Read); 4] = [
            ("otlp_exported", "Log records (logs) and spans (traces) the OTLP collector accepted", |s| {
                s.exported.load(Relaxed)
            }),
            (
                "otlp_rejected",
                "Log records (logs) and spans (traces) the OTLP collector refused in a partial success",
                |s| s.rejected.load(Relaxed),
            ),
            ("otlp_requests_failed", "OTLP export requests that failed, each try", |s| s.failed.load(Relaxed)),
            ("otlp_requests_retried", "Failed OTLP export requests that were tried again", |s| s.retried.load(Relaxed)),
        ];
        for (name, help, value) in read {
            let mut m = enc.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Counter)?;
            for (signal, s) in [(Signal::Logs, &st.logs), (Signal::Traces, &st.traces)] {
                let labels = [("signal", signal.label()), ("protocol", s.protocol.label())];
                ConstCounter::new(value(s)).encode(m.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut enc,
            "otlp_queue_flows",
            "Flows waiting in the OTLP exporter's queue",
            st.queued.load(Relaxed) as i64,
        )?;
        gauge(&mut enc, "otlp_queue_capacity", "Flows the OTLP exporter's queue can hold", st.queue_capacity as i64)
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, time::Instant};

    use prometheus_client::registry::Registry;
    use weft_ebpf::abi::Event;

    use super::*;
    use crate::pipeline::{
        EventFeed, PipelineConfig,
        record::{EndpointInfo, Http},
    };

    fn pod(names: &mut Names, ip: Ipv4Addr, namespace: &str, workload: &str) {
        let info = EndpointInfo {
            namespace: namespace.into(),
            pod: format!("{workload}-0"),
            workloads: vec![("Deployment".into(), workload.into())],
            identity: 1000,
            ..Default::default()
        };
        names.add_endpoint(ip, info);
    }

    fn series(registry: &Registry) -> usize {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text.lines().filter(|l| !l.starts_with('#') && l.contains("context_test")).count()
    }

    /// Requests the node's policy listener decided count as L7 policy
    /// verdicts (`match="l7/http"`), by direction and action; responses and
    /// requests no policy governed do not.
    #[test]
    fn l7_requests_decided_by_a_policy_are_policy_verdicts() {
        let mut registry = Registry::with_prefix("weft");
        let mut metrics = FlowMetrics::register(&mut registry, Context::default());
        let l7 = |subtype: u8, rule_id: u32, direction: u32, http: Http| {
            Entry::Flow(FlowRecord {
                ev: Event {
                    r#type: EV_L7,
                    subtype,
                    proto: 6,
                    rule_id,
                    direction: direction as u8,
                    ..Default::default()
                },
                http: Some(Arc::new(http)),
                ..Default::default()
            })
        };
        let allowed = || Http { code: 200, policy: "7/ingress/0".into(), ..Default::default() };
        let denied = || Http { code: 403, governing_policy: "9/egress/1".into(), ..Default::default() };
        let entries = [
            l7(L7_REQUEST, 7, abi::DIR_INGRESS, allowed()),
            l7(L7_RESPONSE, 7, abi::DIR_INGRESS, allowed()),
            l7(L7_REQUEST, 9, abi::DIR_EGRESS, denied()),
            l7(L7_REQUEST, 9, abi::DIR_EGRESS, denied()),
            l7(L7_RESPONSE, 9, abi::DIR_EGRESS, denied()),
            // An EnvoyConfig's listener: no policy named, no verdict.
            l7(L7_REQUEST, 0, 0, Http { code: 200, ..Default::default() }),
        ];
        metrics.batch(0, &entries, &Arc::new(Names::new("node1")));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        // The default context labels are empty here (no endpoints named).
        let empty = r#",source_namespace="",source_workload="",destination_namespace="",destination_workload="""#;
        let mut verdicts: Vec<String> = text
            .lines()
            .filter(|l| l.starts_with("weft_policy_verdicts_total{"))
            .map(|l| l.replace(empty, ""))
            .collect();
        verdicts.sort();
        assert_eq!(
            verdicts,
            [
                r#"weft_policy_verdicts_total{direction="egress",match="l7/http",action="dropped"} 2"#,
                r#"weft_policy_verdicts_total{direction="ingress",match="l7/http",action="forwarded"} 1"#,
            ],
            "{text}"
        );
    }

    fn churn_ip(i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 2, 0, 0)) + i)
    }

    /// Issue 10's churn test (not timed): 1,000 pods, each its own workload
    /// in one of 20 namespaces, send traffic and are deleted; their series
    /// expire and the series count returns to what it was before them.
    /// Pods that stay keep their series.
    #[test]
    fn series_of_pods_that_are_gone_expire() {
        let stable = Ipv4Addr::new(10, 1, 0, 1);
        let base_names = || {
            let mut n = Names::new("node1");
            pod(&mut n, stable, "context_test", "stable");
            n
        };
        let (p, mut feed) = Pipeline::start(PipelineConfig::default(), base_names());
        let mut registry = Registry::with_prefix("weft");
        let mut metrics = FlowMetrics::register(&mut registry, Context::default());
        metrics.set_grace(Duration::ZERO);
        p.add_sink(Box::new(metrics));
        let send = |feed: &mut EventFeed, from: Ipv4Addr| {
            let ev = Event {
                r#type: abi::EV_TRACE as u8,
                subtype: abi::OBS_TO_ENDPOINT as u8,
                proto: 17,
                saddr: u32::from_ne_bytes(from.octets()),
                daddr: u32::from_ne_bytes(stable.octets()),
                ..Default::default()
            };
            feed.push(&ev);
        };
        let stored = |n: u64| {
            let t0 = Instant::now();
            while p.counters.flows.load(std::sync::atomic::Ordering::Relaxed) < n {
                assert!(t0.elapsed() < Duration::from_secs(30), "flows not stored");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        send(&mut feed, stable);
        feed.flush();
        stored(1);
        let baseline = series(&registry);
        assert_eq!(baseline, 1, "stable -> stable");

        let mut churn = base_names();
        for i in 0..1000 {
            pod(&mut churn, churn_ip(i), &format!("context_test-{}", i % 20), &format!("churn-{i}"));
        }
        p.set_names(churn);
        for i in 0..1000 {
            send(&mut feed, churn_ip(i));
            if i % 200 == 199 {
                feed.flush(); // within the queue
                stored(u64::from(i) + 2);
            }
        }
        assert_eq!(series(&registry), baseline + 1000, "a series per workload");

        // Every churn pod deleted: their series go, the stable one stays,
        // even with no traffic at all (the pipeline's idle tick).
        p.set_names(base_names());
        let t0 = Instant::now();
        while series(&registry) != baseline {
            assert!(t0.elapsed() < Duration::from_secs(30), "{} series left", series(&registry));
            std::thread::sleep(Duration::from_millis(50));
        }
        send(&mut feed, stable);
        feed.flush();
        stored(1002);
        assert_eq!(series(&registry), baseline, "the stable pod's series is still there");
        p.stop();
    }
}
