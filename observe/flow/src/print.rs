//! Flow API responses as text: Hubble's `compact` line and a table (JSON is
//! in [`crate::json`]). `weft observe` prints with these; the OTLP exporter
//! uses the compact line as the log body.

use crate::{
    names,
    proto::{
        flow::{self, Flow, Verdict, layer4, layer7},
        observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
    },
    time,
};

/// How to print.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    /// ANSI colours (on a terminal only, unless forced).
    pub color: bool,
    /// Show the node name after the time.
    pub node_name: bool,
    /// Show addresses, not pod and service names.
    pub numeric: bool,
}

fn paint(on: bool, code: &str, s: &str) -> String {
    if on { format!("\x1b[{code}m{s}\x1b[0m") } else { s.to_owned() }
}

/// Hubble's escaping of terminal control characters in printed strings.
fn clean(s: &str) -> String {
    s.replace('\x1b', "^[").replace('\r', "\\r")
}

fn port_of(l4: Option<&flow::Layer4>, source: bool) -> u32 {
    match l4.and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(t)) => {
            if source {
                t.source_port
            } else {
                t.destination_port
            }
        }
        Some(layer4::Protocol::Udp(u)) => {
            if source {
                u.source_port
            } else {
                u.destination_port
            }
        }
        Some(layer4::Protocol::Sctp(s)) => {
            if source {
                s.source_port
            } else {
                s.destination_port
            }
        }
        _ => 0,
    }
}

fn host(f: &Flow, source: bool, o: &Options) -> String {
    let ip =
        f.ip.as_ref().map(|ip| if source { ip.source.clone() } else { ip.destination.clone() }).unwrap_or_default();
    let ep = if source { f.source.as_ref() } else { f.destination.as_ref() };
    let svc = if source { f.source_service.as_ref() } else { f.destination_service.as_ref() };
    let names = if source { &f.source_names } else { &f.destination_names };
    let mut h = ip;
    if !o.numeric {
        if let Some(e) = ep.filter(|e| !e.pod_name.is_empty()) {
            h = paint(o.color, "36", &format!("{}/{}", e.namespace, e.pod_name));
        } else if let Some(s) = svc.filter(|s| !s.name.is_empty()) {
            h = paint(o.color, "36", &format!("{}/{}", s.namespace, s.name));
        } else if !names.is_empty() {
            h = names.join(",");
        }
    }
    let port = port_of(f.l4.as_ref(), source);
    if port != 0 { format!("{h}:{port}") } else { h }
}

fn identity(f: &Flow, source: bool) -> String {
    let id = if source { f.source.as_ref() } else { f.destination.as_ref() }.map(|e| e.identity).unwrap_or(0);
    match names::reserved_identity(id) {
        Some(n) => format!("({n})"),
        None => format!("(ID:{id})"),
    }
}

/// The TYPE column.
pub fn type_text(f: &Flow) -> String {
    if let Some(l7) = &f.l7 {
        let proto = match l7.record {
            Some(layer7::Record::Http(_)) => "http",
            Some(layer7::Record::Dns(_)) => "dns",
            #[allow(deprecated)]
            Some(layer7::Record::Kafka(_)) => "kafka",
            None => "l7",
        };
        let t = flow::L7FlowType::try_from(l7.r#type).unwrap_or(flow::L7FlowType::UnknownL7Type);
        let t = match t {
            flow::L7FlowType::Request => "request",
            flow::L7FlowType::Response => "response",
            flow::L7FlowType::Sample => "sample",
            flow::L7FlowType::UnknownL7Type => "unknown_l7_type",
        };
        return format!("{proto}-{t}");
    }
    let et = f.event_type.unwrap_or_default();
    match et.r#type {
        1 => names::drop_reason_text(et.sub_type as u32),
        4 => names::observation_point(if et.sub_type == 0 { 101 } else { et.sub_type as u32 }).to_owned(),
        5 => format!(
            "policy-verdict:{} {}",
            names::policy_match(f.policy_match_type),
            flow::TrafficDirection::try_from(f.traffic_direction)
                .unwrap_or(flow::TrafficDirection::Unknown)
                .as_str_name()
        ),
        7 => match f.sock_xlate_point {
            1 => "pre-xlate-fwd".into(),
            2 => "post-xlate-fwd".into(),
            3 => "pre-xlate-rev".into(),
            4 => "post-xlate-rev".into(),
            p => flow::SocketTranslationPoint::try_from(p).map(|p| p.as_str_name().to_owned()).unwrap_or_default(),
        },
        _ => "UNKNOWN".into(),
    }
}

/// The VERDICT column.
pub fn verdict_text(f: &Flow, color: bool) -> String {
    let v = Verdict::try_from(f.verdict).unwrap_or(Verdict::Unknown);
    let policy = f.event_type.is_some_and(|e| e.r#type == 5);
    let text = match (policy, v) {
        (true, Verdict::Forwarded | Verdict::Redirected) => "ALLOWED",
        (true, Verdict::Dropped | Verdict::Error) => "DENIED",
        (true, Verdict::Audit) => "AUDITED",
        (_, v) => v.as_str_name(),
    };
    let code = match v {
        Verdict::Dropped | Verdict::Error => "31",
        Verdict::Redirected | Verdict::Translated => "33",
        Verdict::Audit => "35",
        _ => "32",
    };
    paint(color, code, text)
}

/// Hubble's compact line of a flow.
#[allow(deprecated)]
pub fn compact_flow(f: &Flow, o: &Options) -> String {
    let time = f.time.as_ref().map(|t| time::stamp_milli(time::ns_of(t)));
    let mut line = time.unwrap_or_else(|| "N/A".into());
    if o.node_name {
        line.push_str(&format!(" [{}]", f.node_name));
    }
    let (mut a, mut ai, mut b, mut bi) = (host(f, true, o), identity(f, true), host(f, false, o), identity(f, false));
    let arrow = match f.is_reply {
        None => "<>",
        Some(false) => "->",
        Some(true) => {
            std::mem::swap(&mut a, &mut b);
            std::mem::swap(&mut ai, &mut bi);
            "<-"
        }
    };
    let mut summary = String::new();
    if let Some(t) = f.ip_trace_id.as_ref().filter(|t| t.trace_id > 0) {
        summary.push_str(&format!("IP Trace ID: {}; ", t.trace_id));
    }
    summary.push_str(&f.summary);
    line.push_str(&format!(": {a} {ai} {arrow} {b} {bi} {} {} ({})", type_text(f), verdict_text(f, o.color), summary));
    clean(&line)
}

/// A compact line of any response (flows and loss notices).
pub fn compact(r: &GetFlowsResponse, o: &Options) -> Option<String> {
    match r.response_types.as_ref()? {
        ResponseTypes::Flow(f) => Some(compact_flow(f, o)),
        ResponseTypes::LostEvents(l) => {
            let t = r.time.as_ref().map(|t| time::stamp_milli(time::ns_of(t)));
            let source = flow::LostEventSource::try_from(l.source)
                .map(|s| s.as_str_name().to_owned())
                .unwrap_or_else(|_| l.source.to_string());
            Some(paint(
                o.color,
                "31",
                &format!(
                    "{} EVENTS LOST: {source} CPU({}) {}",
                    t.unwrap_or_default(),
                    l.cpu.unwrap_or(0),
                    l.num_events_lost
                ),
            ))
        }
        ResponseTypes::NodeStatus(n) => Some(format!("node status: {} {}", n.node_names.join(","), n.message)),
    }
}

/// The header of table output.
pub const TABLE_HEADER: &str = "TIMESTAMP            SOURCE                                 DESTINATION                            TYPE                 VERDICT      SUMMARY";

/// A table row of a flow.
pub fn table_row(f: &Flow, o: &Options) -> String {
    let time = f.time.as_ref().map(|t| time::stamp_milli(time::ns_of(t))).unwrap_or_else(|| "N/A".into());
    let plain = Options { color: false, ..*o };
    let verdict = verdict_text(f, false);
    #[allow(deprecated)]
    let summary = &f.summary;
    clean(&format!(
        "{time:<20} {:<38} {:<38} {:<20} {:<12} {summary}",
        host(f, true, &plain),
        host(f, false, &plain),
        type_text(f),
        if o.color { verdict_text(f, true) + &" ".repeat(12usize.saturating_sub(verdict.len())) } else { verdict },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(deprecated)]
    fn example() -> Flow {
        // The wire-contract sheet's composed example.
        Flow {
            time: Some(prost_types::Timestamp { seconds: 1_741_944_413, nanos: 589_000_000 }),
            verdict: Verdict::Forwarded as i32,
            ip: Some(flow::Ip {
                source: "10.0.1.23".into(),
                destination: "10.0.2.41".into(),
                ip_version: 1,
                ..Default::default()
            }),
            l4: Some(flow::Layer4 {
                protocol: Some(layer4::Protocol::Tcp(flow::Tcp {
                    source_port: 51234,
                    destination_port: 8080,
                    flags: Some(flow::TcpFlags { syn: true, ..Default::default() }),
                })),
            }),
            source: Some(flow::Endpoint {
                namespace: "shop".into(),
                pod_name: "frontend-7d9f8".into(),
                identity: 24016,
                ..Default::default()
            }),
            destination: Some(flow::Endpoint {
                namespace: "shop".into(),
                pod_name: "cart-5c6b7".into(),
                identity: 31822,
                ..Default::default()
            }),
            event_type: Some(flow::CiliumEventType { r#type: 4, sub_type: 0 }),
            is_reply: Some(false),
            summary: "TCP Flags: SYN".into(),
            ..Default::default()
        }
    }

    #[test]
    fn compact_lines_read_like_hubbles() {
        let o = Options::default();
        assert_eq!(
            compact_flow(&example(), &o),
            "Mar 14 09:26:53.589: shop/frontend-7d9f8:51234 (ID:24016) -> shop/cart-5c6b7:8080 (ID:31822) to-endpoint FORWARDED (TCP Flags: SYN)"
        );
        let numeric = Options { numeric: true, ..o };
        assert!(compact_flow(&example(), &numeric).contains("10.0.1.23:51234 (ID:24016) -> 10.0.2.41:8080 (ID:31822)"));
        let mut drop = example();
        drop.event_type = Some(flow::CiliumEventType { r#type: 1, sub_type: 133 });
        drop.verdict = Verdict::Dropped as i32;
        drop.is_reply = None;
        drop.source = Some(flow::Endpoint { identity: 2, ..Default::default() });
        drop.ip.as_mut().unwrap().source = "203.0.113.9".into();
        assert!(
            compact_flow(&drop, &o)
                .contains("203.0.113.9:51234 (world) <> shop/cart-5c6b7:8080 (ID:31822) Policy denied DROPPED")
        );
        let mut resp = example();
        resp.is_reply = Some(true);
        resp.l7 = Some(flow::Layer7 {
            r#type: flow::L7FlowType::Response as i32,
            record: Some(layer7::Record::Http(flow::Http::default())),
            ..Default::default()
        });
        assert!(compact_flow(&resp, &o).contains(
            "shop/cart-5c6b7:8080 (ID:31822) <- shop/frontend-7d9f8:51234 (ID:24016) http-response FORWARDED"
        ));
        let mut pv = example();
        pv.event_type = Some(flow::CiliumEventType { r#type: 5, sub_type: 0 });
        pv.policy_match_type = 2;
        pv.traffic_direction = flow::TrafficDirection::Ingress as i32;
        assert!(compact_flow(&pv, &o).contains("policy-verdict:L3-L4 INGRESS ALLOWED"));
    }

    #[test]
    fn json_uses_hubbles_field_names() {
        let r = GetFlowsResponse {
            response_types: Some(ResponseTypes::Flow(example())),
            node_name: "n1".into(),
            time: example().time,
        };
        let v: serde_json::Value = serde_json::from_str(&crate::json::response(&r)).unwrap();
        assert_eq!(v["flow"]["IP"]["source"], "10.0.1.23");
        assert_eq!(v["flow"]["source"]["pod_name"], "frontend-7d9f8");
        assert_eq!(v["flow"]["verdict"], "FORWARDED");
        assert_eq!(v["flow"]["is_reply"], false);
        assert_eq!(v["flow"]["Summary"], "TCP Flags: SYN");
        assert_eq!(v["node_name"], "n1");
        assert_eq!(v["time"], "2025-03-14T09:26:53.589Z");
    }
}
