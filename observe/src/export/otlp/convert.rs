//! Flows as OTLP: a log record per flow and a span per HTTP response that
//! carries trace context, with attributes of the OpenTelemetry semantic
//! conventions (v1.37: `http.*`, `url.*`, `server.*`, `network.*`,
//! `source.*`/`destination.*`, `k8s.*`) and `weft.*` ones only for what the
//! conventions do not cover (verdicts, drop reasons, identities, the
//! datapath's path).

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::{
    collector::{logs::v1::ExportLogsServiceRequest, trace::v1::ExportTraceServiceRequest},
    common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value::Value},
    logs::v1::{LogRecord, ResourceLogs, ScopeLogs, SeverityNumber},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span, Status as SpanStatus, span::SpanKind, status::StatusCode},
};
use prost::Message;
use weft_flow::{
    names, print,
    proto::{
        flow::{self, Flow, Verdict, layer4, layer7},
        weft::FlowLink,
    },
    time::now_ns,
};

use crate::{
    api::convert::{self, Context},
    pipeline::{
        enrich::Names,
        record::{FlowRecord, L7_RESPONSE},
    },
};

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
            let (host, port) = split_authority(authority);
            a.push(s("server.address", host));
            if let Some(port) = port.or(match scheme {
                "http" => Some(80),
                "https" => Some(443),
                _ => None,
            }) {
                a.push(i("server.port", port as i64));
            }
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

/// `host:port`, `[v6]:port` or a bare host -> (host, port).
fn split_authority(authority: &str) -> (&str, Option<u16>) {
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    if let Some(rest) = authority.strip_prefix('[')
        && let Some((host, after)) = rest.split_once(']')
    {
        return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(p) => (host, Some(p)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

/// The resource: weft's own attributes (`service.name` unless the user
/// names the service), then the user's (`extra`), except that what the agent
/// knows about its node and cluster stays as the agent knows it.
fn resource(names: &Names, extra: &[(String, String)]) -> Resource {
    let mut attrs: BTreeMap<&str, String> = BTreeMap::new();
    attrs.insert("service.name", "weft-agent".into());
    attrs.insert("service.version", env!("CARGO_PKG_VERSION").into());
    attrs.insert("host.name", host_name());
    for (k, v) in extra {
        attrs.insert(k, v.clone());
    }
    attrs.insert("k8s.node.name", names.node_name.clone());
    if !names.cluster.is_empty() || !attrs.contains_key("k8s.cluster.name") {
        attrs.insert("k8s.cluster.name", names.cluster.clone());
    }
    Resource { attributes: attrs.into_iter().map(|(k, v)| s(k, v)).collect(), ..Default::default() }
}

/// This machine's host name (the node's, for an agent on the host network).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
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
    extra_resource: &[(String, String)],
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
                // Both come from the access log: a huge duration saturates.
                end_time_unix_nano: h.start_ns.saturating_add(h.duration_ns),
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
            resource: Some(resource(names, extra_resource)),
            scope_logs: vec![ScopeLogs { scope: Some(scope()), log_records: records, ..Default::default() }],
            ..Default::default()
        }],
    };
    let traces = ExportTraceServiceRequest {
        resource_spans: if spans.is_empty() {
            Vec::new()
        } else {
            vec![ResourceSpans {
                resource: Some(resource(names, extra_resource)),
                scope_spans: vec![ScopeSpans { scope: Some(scope()), spans, ..Default::default() }],
                ..Default::default()
            }]
        },
    };
    (logs, traces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_address_and_port_are_apart() {
        assert_eq!(split_authority("web.default:8080"), ("web.default", Some(8080)));
        assert_eq!(split_authority("web"), ("web", None));
        assert_eq!(split_authority("[fd00::1]:443"), ("fd00::1", Some(443)));
        assert_eq!(split_authority("[fd00::1]"), ("fd00::1", None));
        assert_eq!(split_authority("user@host:81"), ("host", Some(81)));
        assert_eq!(split_authority("host:notaport"), ("host:notaport", None));
        assert_eq!(split_authority("fd00::1"), ("fd00::1", None));
    }

    /// Times and durations come from Envoy's access log: at their largest,
    /// the span's end saturates instead of overflowing.
    #[test]
    fn the_largest_times_make_a_span_not_a_panic() {
        use crate::pipeline::{
            l7_flows,
            record::{Entry, Http, L7Entry},
        };
        let http = Http {
            code: 200,
            start_ns: u64::MAX - 5,
            duration_ns: u64::MAX,
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            ..Default::default()
        };
        let names = Names::new("node1");
        let mut out = Vec::new();
        let conns = crate::pipeline::join::ConnTable::new(16);
        l7_flows(L7Entry { http, client: None, server: None }, &names, &conns, &mut out);
        let batch: Vec<(u64, FlowRecord)> = out
            .into_iter()
            .enumerate()
            .filter_map(|(i, e)| if let Entry::Flow(f) = e { Some((i as u64, f)) } else { None })
            .collect();
        let ctx = Context::new(std::sync::Arc::new(names.clone()), 1, false);
        let (_, traces) = requests(&ctx, &names, &[], &batch);
        let spans: Vec<&Span> =
            traces.resource_spans.iter().flat_map(|r| &r.scope_spans).flat_map(|s| &s.spans).collect();
        assert_eq!(spans.len(), 1, "the response's span");
        assert_eq!((spans[0].start_time_unix_nano, spans[0].end_time_unix_nano), (u64::MAX - 5, u64::MAX));
    }
}
