//! Flow records in the wire format of Hubble's flow API (`flow.Flow`), built
//! per reader: the store keeps compact records, and only what a client asks
//! for is converted.

use std::{
    cell::{Ref, RefCell},
    collections::HashMap,
    fmt::{self, Display},
    sync::Arc,
};

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
    enrich::{Names, PolicyName},
    record::{ConnLink, EndpointInfo, FlowRecord, Http, L7_REQUEST, L7_RESPONSE, Lost, LostSource, ServiceInfo, Url},
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

    /// The name of interface `index` (empty for 0 or an interface that is
    /// gone), looked up once per reader.
    pub(super) fn ifname(&self, index: u32) -> Ref<'_, str> {
        if !self.ifnames.borrow().contains_key(&index) {
            let name = if index == 0 {
                String::new()
            } else {
                let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
                // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
                let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
                if p.is_null() {
                    String::new()
                } else {
                    // SAFETY: on success buf holds a NUL-terminated name.
                    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
                }
            };
            self.ifnames.borrow_mut().insert(index, name);
        }
        Ref::map(self.ifnames.borrow(), |names| names.get(&index).map_or("", String::as_str))
    }
}

/// The UUID of flow `seq` of the agent started with `boot_id`.
pub fn uuid(boot_id: u64, seq: u64) -> String {
    Uuid::new(boot_id, seq).as_str().to_owned()
}

/// A flow's UUID as text, made without allocating: the boot id's top 48
/// bits, a version 4 and variant digit each followed by 12 bits (the boot
/// id's lowest, the sequence number's bits 48-59), then the sequence
/// number's low 48 bits.
pub struct Uuid([u8; 36]);

impl Uuid {
    pub fn new(boot_id: u64, seq: u64) -> Uuid {
        fn hex(out: &mut [u8], v: u64) {
            for (i, b) in out.iter_mut().rev().enumerate() {
                *b = b"0123456789abcdef"[(v >> (4 * i)) as usize & 0xf];
            }
        }
        let mut out = [b'-'; 36];
        hex(&mut out[0..8], boot_id >> 32);
        hex(&mut out[9..13], boot_id >> 16);
        out[14] = b'4';
        hex(&mut out[15..18], boot_id);
        out[19] = b'8';
        hex(&mut out[20..23], seq >> 48);
        hex(&mut out[24..36], seq);
        Uuid(out)
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits and dashes are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

/// The sequence number in a UUID [`uuid`] made, if it was made with `boot_id`.
pub fn seq_of_uuid(boot_id: u64, text: &str) -> Option<u64> {
    let prefix = Uuid::new(boot_id, 0);
    let prefix = prefix.as_str();
    let (head, tail) = (text.get(..20)?, text.get(24..)?);
    if head != &prefix[..20] || text.get(23..24)? != "-" || tail.len() != 12 {
        return None;
    }
    let high = u64::from_str_radix(text.get(20..23)?, 16).ok()?;
    Some(high << 48 | u64::from_str_radix(tail, 16).ok()?)
}

/// An endpoint's identity and cluster name in `flow.Endpoint`: the
/// datapath's identity, else the endpoint's; the cluster for pods only.
pub(super) fn endpoint_ids<'a>(e: Option<&EndpointInfo>, identity: u32, cluster: &'a str) -> (u32, &'a str) {
    match e {
        Some(e) => (if identity == 0 { e.identity } else { identity }, if e.pod.is_empty() { "" } else { cluster }),
        None => (identity, ""),
    }
}

fn endpoint(e: Option<&Arc<EndpointInfo>>, id: u16, identity: u32, cluster: &str) -> flow::Endpoint {
    let (identity, cluster) = endpoint_ids(e.map(|e| &**e), identity, cluster);
    let mut out = flow::Endpoint { id: id as u32, identity, cluster_name: cluster.to_owned(), ..Default::default() };
    if let Some(e) = e {
        out.namespace = e.namespace.clone();
        out.pod_name = e.pod.clone();
        out.labels = e.labels.clone();
        out.workloads =
            e.workloads.iter().map(|(kind, name)| flow::Workload { name: name.clone(), kind: kind.clone() }).collect();
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

/// `flow.Layer4` (it holds no text, so building it allocates nothing).
pub(super) fn layer4(f: &FlowRecord) -> Option<flow::Layer4> {
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
    Summary(f).to_string()
}

/// [`summary`] written where it is needed (the flow API writes it straight
/// into every flow it sends).
pub struct Summary<'a>(pub &'a FlowRecord);

impl Display for Summary<'_> {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let f = self.0;
        if let Some(h) = &f.http {
            if f.ev.subtype == L7_RESPONSE {
                write!(out, "{} {} {}ms ({} {})", h.protocol, h.code, h.duration_ns / 1_000_000, h.method, Url(h))?;
            } else {
                write!(out, "{} {} {}", h.protocol, h.method, Url(h))?;
            }
            if !h.route.is_empty() {
                write!(out, "; route {}", h.route)?;
            }
            if let Some(l) = &h.downstream_link {
                write!(out, "; conn {}", LinkText(l))?;
            }
            return Ok(());
        }
        match f.ev.proto {
            6 => write!(out, "TCP Flags: {}", names::TcpFlagNames(f.ev.tcp_flags)),
            17 => out.write_str("UDP"),
            1 => out.write_str("ICMPv4"),
            p => write!(out, "IP protocol {p}"),
        }
    }
}

/// `from-endpoint > to-proxy:15001 REDIRECTED` and the like.
pub fn link_text(l: &ConnLink) -> String {
    LinkText(l).to_string()
}

/// [`link_text`] written where it is needed.
pub struct LinkText<'a>(pub &'a ConnLink);

impl Display for LinkText<'_> {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = self.0;
        let point = |o: &u8| names::observation_point(*o as u32);
        // The proxy's port follows the last point that handed to it.
        let port_after = if l.proxy_port != 0 { l.path.iter().rposition(|o| point(o) == "to-proxy") } else { None };
        for (i, o) in l.path.iter().enumerate() {
            if i > 0 {
                out.write_str(" > ")?;
            }
            out.write_str(point(o))?;
            if port_after == Some(i) {
                write!(out, ":{}", l.proxy_port)?;
            }
        }
        write!(out, " {}", l.verdict.as_str_name())?;
        if let Some((allowed, m)) = l.policy {
            let verdict = if allowed { "allowed" } else { "denied" };
            write!(out, ", policy {verdict} {}", names::policy_match(m as u32))?;
        }
        if l.verdict == Verdict::Dropped {
            write!(out, " ({})", names::drop_reason(l.drop_reason as u32))?;
        }
        Ok(())
    }
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

/// The links of an L7 flow, for `extensions` (to weft's own clients), if
/// it has any.
pub(super) fn flow_link(h: &Http) -> Option<wproto::FlowLink> {
    (h.downstream_link.is_some() || h.upstream_link.is_some()).then(|| wproto::FlowLink {
        downstream: h.downstream_link.as_ref().map(conn_link),
        upstream: h.upstream_link.as_ref().map(conn_link),
    })
}

/// What `flow.Layer7` says of an HTTP flow besides its text:
/// (type, latency, status code); a request has neither of the last two.
pub(super) fn l7_numbers(f: &FlowRecord, h: &Http) -> (flow::L7FlowType, u64, u32) {
    if f.ev.subtype == L7_RESPONSE {
        (flow::L7FlowType::Response, h.duration_ns, h.code)
    } else {
        (flow::L7FlowType::Request, 0, 0)
    }
}

/// The headers an HTTP flow shows, by name, those Envoy logged.
pub(super) fn http_headers(h: &Http) -> impl Iterator<Item = (&'static str, &str)> {
    [
        ("x-request-id", h.request_id.as_str()),
        ("traceparent", h.traceparent.as_str()),
        ("tracestate", h.tracestate.as_str()),
        ("user-agent", h.user_agent.as_str()),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
}

fn http_layer7(f: &FlowRecord, h: &Http) -> flow::Layer7 {
    let (r#type, latency_ns, code) = l7_numbers(f, h);
    let headers = http_headers(h).map(|(k, v)| flow::HttpHeader { key: k.into(), value: v.into() }).collect();
    flow::Layer7 {
        r#type: r#type as i32,
        latency_ns,
        record: Some(layer7::Record::Http(flow::Http {
            code,
            method: h.method.clone(),
            url: h.url(),
            protocol: h.protocol.into(),
            headers,
        })),
    }
}

/// Which of `flow.Flow`'s policy lists a flow's policy goes in (the field
/// numbers), by its verdict and direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PolicyField {
    EgressAllowed = 21001,
    IngressAllowed = 21002,
    EgressDenied = 21004,
    IngressDenied = 21005,
}

/// The policy a flow names and the list it goes in: a policy verdict's,
/// and that of a request the node's policy listener judged.
pub(super) fn named_policy<'a>(
    names: &'a Names,
    f: &FlowRecord,
    verdict: Verdict,
) -> Option<(PolicyField, &'a PolicyName)> {
    let ev = &f.ev;
    let judged =
        ev.r#type as u32 == abi::EV_POLICY || (f.http.is_some() && ev.rule_id != 0 && ev.subtype == L7_REQUEST);
    let policy = names.policy(ev.rule_id).filter(|_| judged)?;
    let field = match (verdict, f.direction()) {
        (Verdict::Dropped, flow::TrafficDirection::Egress) => PolicyField::EgressDenied,
        (Verdict::Dropped, _) => PolicyField::IngressDenied,
        (_, flow::TrafficDirection::Egress) => PolicyField::EgressAllowed,
        _ => PolicyField::IngressAllowed,
    };
    Some((field, policy))
}

/// `flow.Flow`'s fields that depend on the record's event type.
#[derive(Debug, Default)]
pub(super) struct TypeFields {
    pub drop_reason: u32,
    pub drop_reason_desc: i32,
    pub policy_match_type: u32,
    pub trace_observation_point: i32,
    pub trace_reason: i32,
    pub sock_xlate_point: i32,
}

pub(super) fn type_fields(f: &FlowRecord) -> TypeFields {
    let ev = &f.ev;
    match ev.r#type as u32 {
        abi::EV_DROP => {
            TypeFields { drop_reason: ev.subtype as u32, drop_reason_desc: ev.subtype as i32, ..Default::default() }
        }
        abi::EV_POLICY => TypeFields { policy_match_type: ev.policy_match as u32, ..Default::default() },
        abi::EV_TRACE => TypeFields {
            trace_observation_point: ev.subtype as i32,
            trace_reason: ev.reason as i32,
            ..Default::default()
        },
        abi::EV_SOCK => TypeFields {
            trace_observation_point: ev.subtype as i32,
            sock_xlate_point: flow::SocketTranslationPoint::SockXlatePointPostDirectionFwd as i32,
            ..Default::default()
        },
        _ => TypeFields::default(),
    }
}

/// `flow.FlowType`.
pub(super) fn flow_type(f: &FlowRecord) -> flow::FlowType {
    match f.ev.r#type as u32 {
        abi::EV_SOCK => flow::FlowType::Sock,
        _ if f.is_l7() => flow::FlowType::L7,
        _ => flow::FlowType::L3L4,
    }
}

/// The emitter every flow names.
pub(super) const EMITTER: (&str, &str) = ("weft", env!("CARGO_PKG_VERSION"));

/// A flow record as `flow.Flow`; `seq` is its number in the flow store.
/// Hubble's deprecated fields (`reply`, `drop_reason`, `Summary`) are filled
/// too: clients still read them. The flow API does not build this: it
/// writes the same message's bytes straight from the record (`wire`, which
/// shares the helpers above and is tested against this).
#[allow(deprecated)]
pub fn to_flow(ctx: &Context, seq: u64, f: &FlowRecord) -> flow::Flow {
    let ev = &f.ev;
    let names = &ctx.names;
    let verdict = f.verdict();
    let (etype, esub) = f.event_type();
    let t = type_fields(f);
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
        r#type: flow_type(f) as i32,
        node_name: names.node_name.clone(),
        node_labels: names.node_labels.clone(),
        event_type: Some(flow::CiliumEventType { r#type: etype, sub_type: esub }),
        source_service: service(f.src_svc.as_ref()),
        destination_service: service(f.dst_svc.as_ref()),
        traffic_direction: f.direction() as i32,
        is_reply: f.is_reply(),
        reply: f.is_reply().unwrap_or(false),
        interface: (ev.ifindex != 0)
            .then(|| flow::NetworkInterface { index: ev.ifindex, name: ctx.ifname(ev.ifindex).to_string() }),
        proxy_port: ev.proxy_port as u32,
        uuid: uuid(ctx.boot_id, seq),
        emitter: Some(flow::Emitter { name: EMITTER.0.into(), version: EMITTER.1.into() }),
        summary: summary(f),
        drop_reason: t.drop_reason,
        drop_reason_desc: t.drop_reason_desc,
        policy_match_type: t.policy_match_type,
        trace_observation_point: t.trace_observation_point,
        trace_reason: t.trace_reason,
        sock_xlate_point: t.sock_xlate_point,
        ..Default::default()
    };
    if let Some((field, p)) = named_policy(names, f, verdict) {
        let p = vec![flow::Policy {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            kind: p.kind.clone(),
            ..Default::default()
        }];
        match field {
            PolicyField::EgressAllowed => out.egress_allowed_by = p,
            PolicyField::IngressAllowed => out.ingress_allowed_by = p,
            PolicyField::EgressDenied => out.egress_denied_by = p,
            PolicyField::IngressDenied => out.ingress_denied_by = p,
        }
    }
    if let Some(h) = &f.http {
        out.l7 = Some(http_layer7(f, h));
        if let Some(id) = h.trace_id() {
            out.trace_context = Some(flow::TraceContext { parent: Some(flow::TraceParent { trace_id: id.into() }) });
        }
        if ctx.with_link {
            out.extensions = flow_link(h)
                .map(|link| prost_types::Any { type_url: LINK_TYPE_URL.into(), value: link.encode_to_vec() });
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
