//! Flow records in the wire format of Hubble's flow API (`flow.Flow`), built
//! per reader: the store keeps compact records, and only what a client asks
//! for is converted.

use std::{cell::RefCell, collections::HashMap, sync::Arc};

use prost::Message;
use weft_ebpf::abi;

use weft_flow::{
    names,
    proto::{
        flow::{self, Verdict, layer4, layer7},
        weft as wproto,
    },
    time::timestamp,
};

use crate::pipeline::{
    enrich::Names,
    record::{ConnLink, EndpointInfo, FlowRecord, Http, L7_REQUEST, L7_RESPONSE, Lost, LostSource, ServiceInfo},
};

/// What conversion needs besides the record.
pub struct Context {
    /// The agent's names, for policy names.
    pub names: Arc<Names>,
    /// Random per agent start: flow UUIDs are this and the flow's sequence number.
    pub boot_id: u64,
    /// Put weft's connection link into `extensions` (for weft's own clients).
    pub with_link: bool,
    ifnames: RefCell<HashMap<u32, String>>,
}

impl Context {
    pub fn new(names: Arc<Names>, boot_id: u64, with_link: bool) -> Self {
        Self { names, boot_id, with_link, ifnames: RefCell::default() }
    }

    fn ifname(&self, index: u32) -> String {
        if index == 0 {
            return String::new();
        }
        self.ifnames
            .borrow_mut()
            .entry(index)
            .or_insert_with(|| {
                let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
                // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
                let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
                if p.is_null() {
                    String::new()
                } else {
                    // SAFETY: on success buf holds a NUL-terminated name.
                    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
                }
            })
            .clone()
    }
}

/// The UUID of flow `seq` of the agent started with `boot_id`.
pub fn uuid(boot_id: u64, seq: u64) -> String {
    let hi = boot_id;
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        (hi >> 32) as u32,
        (hi >> 16) as u16,
        (hi & 0xfff) as u16,
        (seq >> 48) & 0xfff,
        seq & 0xffff_ffff_ffff
    )
}

/// The sequence number in a UUID [`uuid`] made, if it was made with `boot_id`.
pub fn seq_of_uuid(boot_id: u64, text: &str) -> Option<u64> {
    let prefix = uuid(boot_id, 0);
    let (head, tail) = (text.get(..20)?, text.get(24..)?);
    if head != &prefix[..20] || text.get(23..24)? != "-" || tail.len() != 12 {
        return None;
    }
    let high = u64::from_str_radix(text.get(20..23)?, 16).ok()?;
    Some(high << 48 | u64::from_str_radix(tail, 16).ok()?)
}

fn endpoint(e: Option<&Arc<EndpointInfo>>, id: u16, identity: u32, cluster: &str) -> flow::Endpoint {
    let mut out = flow::Endpoint { id: id as u32, identity, ..Default::default() };
    if let Some(e) = e {
        out.namespace = e.namespace.clone();
        out.pod_name = e.pod.clone();
        out.labels = e.labels.clone();
        out.workloads =
            e.workloads.iter().map(|(kind, name)| flow::Workload { name: name.clone(), kind: kind.clone() }).collect();
        if identity == 0 {
            out.identity = e.identity;
        }
        if !e.pod.is_empty() {
            out.cluster_name = cluster.to_owned();
        }
    }
    out
}

fn service(s: Option<&Arc<ServiceInfo>>) -> Option<flow::Service> {
    s.map(|s| flow::Service { name: s.name.clone(), namespace: s.namespace.clone() })
}

fn tcp_flags(f: u8) -> flow::TcpFlags {
    flow::TcpFlags {
        fin: f & 0x01 != 0,
        syn: f & 0x02 != 0,
        rst: f & 0x04 != 0,
        psh: f & 0x08 != 0,
        ack: f & 0x10 != 0,
        urg: f & 0x20 != 0,
        ece: f & 0x40 != 0,
        cwr: f & 0x80 != 0,
        ns: false,
    }
}

fn layer4(f: &FlowRecord) -> Option<flow::Layer4> {
    let ev = &f.ev;
    let (sp, dp) = (u16::from_be(ev.sport) as u32, u16::from_be(ev.dport) as u32);
    let p = match ev.proto {
        6 => layer4::Protocol::Tcp(flow::Tcp {
            source_port: sp,
            destination_port: dp,
            flags: (!f.is_l7()).then(|| tcp_flags(ev.tcp_flags)),
        }),
        17 => layer4::Protocol::Udp(flow::Udp { source_port: sp, destination_port: dp }),
        132 => layer4::Protocol::Sctp(flow::Sctp { source_port: sp, destination_port: dp }),
        1 => layer4::Protocol::IcmPv4(flow::IcmPv4::default()),
        _ => return None,
    };
    Some(flow::Layer4 { protocol: Some(p) })
}

/// Hubble's one-line summary of a flow (the text `hubble observe` prints in
/// parentheses), with the Envoy route that served an L7 flow (qualified by
/// its config, e.g. `/weft-gateway.<ns>.<gateway>/httproute/<ns>/<route>/...`)
/// and weft's link.
pub fn summary(f: &FlowRecord) -> String {
    if let Some(h) = &f.http {
        let mut s = if f.ev.subtype == L7_RESPONSE {
            format!("{} {} {}ms ({} {})", h.protocol, h.code, h.duration_ns / 1_000_000, h.method, h.url())
        } else {
            format!("{} {} {}", h.protocol, h.method, h.url())
        };
        if !h.route.is_empty() {
            s.push_str(&format!("; route {}", h.route));
        }
        if let Some(l) = &h.downstream_link {
            s.push_str(&format!("; conn {}", link_text(l)));
        }
        return s;
    }
    match f.ev.proto {
        6 => format!("TCP Flags: {}", names::tcp_flags(f.ev.tcp_flags)),
        17 => "UDP".into(),
        1 => "ICMPv4".into(),
        p => format!("IP protocol {p}"),
    }
}

/// `from-endpoint > to-proxy:15001 REDIRECTED` and the like.
pub fn link_text(l: &ConnLink) -> String {
    let mut path: Vec<String> = l.path.iter().map(|o| names::observation_point(*o as u32).to_string()).collect();
    if l.proxy_port != 0
        && let Some(last) = path.iter_mut().rev().find(|p| p.as_str() == "to-proxy")
    {
        last.push_str(&format!(":{}", l.proxy_port));
    }
    let mut s = format!("{} {}", path.join(" > "), l.verdict.as_str_name());
    if let Some((allowed, m)) = l.policy {
        s.push_str(&format!(
            ", policy {} {}",
            if allowed { "allowed" } else { "denied" },
            names::policy_match(m as u32)
        ));
    }
    if l.verdict == Verdict::Dropped {
        s.push_str(&format!(" ({})", names::drop_reason(l.drop_reason as u32)));
    }
    s
}

fn conn_link(l: &ConnLink) -> wproto::ConnectionLink {
    wproto::ConnectionLink {
        verdict: l.verdict as i32,
        path: l.path.iter().map(|o| *o as i32).collect(),
        drop_reason: l.drop_reason as i32,
        source_identity: l.src_identity,
        destination_identity: l.dst_identity,
        frontend: l.frontend.map(|a| a.to_string()).unwrap_or_default(),
        proxy_port: l.proxy_port as u32,
        client: l.client.map(|a| a.to_string()).unwrap_or_default(),
        server: l.server.map(|a| a.to_string()).unwrap_or_default(),
        policy_verdict: match l.policy {
            Some((true, _)) => Verdict::Forwarded as i32,
            Some((false, _)) => Verdict::Dropped as i32,
            None => 0,
        },
        policy_match_type: l.policy.map(|(_, m)| m as u32).unwrap_or(0),
    }
}

/// Type URL of weft's link in `Flow.extensions`.
pub const LINK_TYPE_URL: &str = "type.googleapis.com/weft.FlowLink";

/// The link of an L7 flow as the `extensions` Any.
pub fn link_any(h: &Http) -> prost_types::Any {
    let link = wproto::FlowLink {
        downstream: h.downstream_link.as_ref().map(conn_link),
        upstream: h.upstream_link.as_ref().map(conn_link),
    };
    prost_types::Any { type_url: LINK_TYPE_URL.into(), value: link.encode_to_vec() }
}

fn http_layer7(f: &FlowRecord, h: &Http) -> flow::Layer7 {
    let response = f.ev.subtype == L7_RESPONSE;
    let mut headers = Vec::new();
    for (k, v) in [
        ("x-request-id", &h.request_id),
        ("traceparent", &h.traceparent),
        ("tracestate", &h.tracestate),
        ("user-agent", &h.user_agent),
    ] {
        if !v.is_empty() {
            headers.push(flow::HttpHeader { key: k.into(), value: v.clone() });
        }
    }
    flow::Layer7 {
        r#type: if response { flow::L7FlowType::Response } else { flow::L7FlowType::Request } as i32,
        latency_ns: if response { h.duration_ns } else { 0 },
        record: Some(layer7::Record::Http(flow::Http {
            code: if response { h.code } else { 0 },
            method: h.method.clone(),
            url: h.url(),
            protocol: h.protocol.into(),
            headers,
        })),
    }
}

fn policies(names: &Names, f: &FlowRecord) -> Vec<flow::Policy> {
    names
        .policy(f.ev.rule_id)
        .map(|p| flow::Policy {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            kind: p.kind.clone(),
            ..Default::default()
        })
        .into_iter()
        .collect()
}

/// The policy of a verdict, in the field of its verdict and direction.
fn name_policies(out: &mut flow::Flow, names: &Names, f: &FlowRecord, verdict: Verdict) {
    let p = policies(names, f);
    match (verdict, f.direction()) {
        (Verdict::Dropped, flow::TrafficDirection::Egress) => out.egress_denied_by = p,
        (Verdict::Dropped, _) => out.ingress_denied_by = p,
        (_, flow::TrafficDirection::Egress) => out.egress_allowed_by = p,
        _ => out.ingress_allowed_by = p,
    }
}

/// A flow record as `flow.Flow`; `seq` is its number in the flow store.
/// Hubble's deprecated fields (`reply`, `drop_reason`, `Summary`) are filled
/// too: clients still read them.
#[allow(deprecated)]
pub fn to_flow(ctx: &Context, seq: u64, f: &FlowRecord) -> flow::Flow {
    let ev = &f.ev;
    let names = &ctx.names;
    let verdict = f.verdict();
    let (etype, esub) = f.event_type();
    let mut out = flow::Flow {
        time: Some(timestamp(f.time_ns)),
        verdict: verdict as i32,
        ip: Some(flow::Ip {
            source: ev.src().ip().to_string(),
            destination: ev.dst().ip().to_string(),
            ip_version: flow::IpVersion::IPv4 as i32,
            encrypted: false,
            source_xlated: f.translated_source().map(|a| a.ip().to_string()).unwrap_or_default(),
        }),
        l4: layer4(f),
        source: Some(endpoint(f.src.as_ref(), ev.src_ep, ev.src_identity, &names.cluster)),
        destination: Some(endpoint(f.dst.as_ref(), ev.dst_ep, ev.dst_identity, &names.cluster)),
        r#type: match ev.r#type as u32 {
            abi::EV_SOCK => flow::FlowType::Sock,
            _ if f.is_l7() => flow::FlowType::L7,
            _ => flow::FlowType::L3L4,
        } as i32,
        node_name: names.node_name.clone(),
        node_labels: names.node_labels.clone(),
        event_type: Some(flow::CiliumEventType { r#type: etype, sub_type: esub }),
        source_service: service(f.src_svc.as_ref()),
        destination_service: service(f.dst_svc.as_ref()),
        traffic_direction: f.direction() as i32,
        is_reply: f.is_reply(),
        reply: f.is_reply().unwrap_or(false),
        interface: (ev.ifindex != 0)
            .then(|| flow::NetworkInterface { index: ev.ifindex, name: ctx.ifname(ev.ifindex) }),
        proxy_port: ev.proxy_port as u32,
        uuid: uuid(ctx.boot_id, seq),
        emitter: Some(flow::Emitter { name: "weft".into(), version: env!("CARGO_PKG_VERSION").into() }),
        summary: summary(f),
        ..Default::default()
    };
    match ev.r#type as u32 {
        abi::EV_DROP => {
            out.drop_reason = ev.subtype as u32;
            out.drop_reason_desc = ev.subtype as i32;
        }
        abi::EV_POLICY => {
            out.policy_match_type = ev.policy_match as u32;
            name_policies(&mut out, names, f, verdict);
        }
        abi::EV_TRACE => {
            out.trace_observation_point = ev.subtype as i32;
            out.trace_reason = ev.reason as i32;
        }
        abi::EV_SOCK => {
            out.trace_observation_point = ev.subtype as i32;
            out.sock_xlate_point = flow::SocketTranslationPoint::SockXlatePointPostDirectionFwd as i32;
        }
        _ => {}
    }
    if let Some(h) = &f.http {
        // A request the node's policy listener judged names its policy.
        if ev.rule_id != 0 && ev.subtype == L7_REQUEST {
            name_policies(&mut out, names, f, verdict);
        }
        out.l7 = Some(http_layer7(f, h));
        if let Some(id) = h.trace_id() {
            out.trace_context = Some(flow::TraceContext { parent: Some(flow::TraceParent { trace_id: id.into() }) });
        }
        if ctx.with_link && (h.downstream_link.is_some() || h.upstream_link.is_some()) {
            out.extensions = Some(link_any(h));
        }
    }
    out
}

/// Hubble's LostEventSource for ours; `weft_client`: the client knows
/// weft's addition to the enum.
pub fn lost_source(s: LostSource, weft_client: bool) -> flow::LostEventSource {
    match s {
        LostSource::KernelRing => flow::LostEventSource::PerfEventRingBuffer,
        LostSource::AgentQueue | LostSource::Exporter => flow::LostEventSource::ObserverEventsQueue,
        LostSource::FlowStore => flow::LostEventSource::HubbleRingBuffer,
        LostSource::Proxy if weft_client => flow::LostEventSource::ProxyAccessLog,
        LostSource::Proxy => flow::LostEventSource::UnknownLostEventSource,
    }
}

/// A loss notice as `flow.LostEvent`.
pub fn to_lost(l: &Lost, weft_client: bool) -> flow::LostEvent {
    flow::LostEvent {
        source: lost_source(l.source, weft_client) as i32,
        num_events_lost: l.count,
        cpu: l.cpu,
        first: Some(timestamp(l.time_ns)),
        last: Some(timestamp(l.time_ns)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_carry_the_sequence_number() {
        let boot = 0x0123_4567_89ab_cdef;
        for seq in [0, 1, 4095, 1 << 40, (1 << 60) - 1] {
            let u = uuid(boot, seq);
            assert_eq!(u.len(), 36, "{u}");
            assert_eq!(seq_of_uuid(boot, &u), Some(seq), "{u}");
        }
        assert_eq!(seq_of_uuid(boot + 1, &uuid(boot, 5)), None);
        assert_eq!(seq_of_uuid(boot, "not-a-uuid"), None);
    }
}
