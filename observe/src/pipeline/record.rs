//! The pipeline's unit: a flow as the datapath or Envoy reported it, with the
//! names it was enriched with. Cheap to copy (shared parts are `Arc`s); it is
//! turned into the wire format only for a reader that asks (`convert`), and
//! filters, metrics and exporters read it as it is.

use std::{net::SocketAddrV4, sync::Arc};

use weft_ebpf::abi::{self, Event};

use weft_flow::proto::flow::{TrafficDirection, Verdict};

/// Event type of flows made from Envoy's access log (Hubble's `l7`).
pub const EV_L7: u8 = 129;
/// L7 subtypes (Hubble's L7FlowType numbers).
pub const L7_REQUEST: u8 = 1;
pub const L7_RESPONSE: u8 = 2;

/// Where events can be lost on their way to a reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LostSource {
    /// The kernel ring buffer was full when the datapath wrote a record.
    KernelRing,
    /// The queue between the ring-buffer reader and the pipeline was full.
    AgentQueue,
    /// The flow store overwrote flows before a slow reader got them.
    FlowStore,
    /// The OTLP exporter's queue was full or the collector kept failing.
    Exporter,
    /// Envoy's access-log entries that never became flows: lines in the
    /// spool that were not entries, and entries Envoy could not write.
    Proxy,
}

impl LostSource {
    /// Every source, for metrics that should exist from the start.
    pub const ALL: [LostSource; 5] = [
        LostSource::KernelRing,
        LostSource::AgentQueue,
        LostSource::FlowStore,
        LostSource::Exporter,
        LostSource::Proxy,
    ];

    /// The `source` label of `weft_lost_events_total`.
    pub fn label(self) -> &'static str {
        match self {
            LostSource::KernelRing => "kernel_ring_buffer",
            LostSource::AgentQueue => "agent_queue",
            LostSource::FlowStore => "flow_store",
            LostSource::Exporter => "otlp_exporter",
            LostSource::Proxy => "proxy",
        }
    }
}

/// A notice that `count` events were lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lost {
    pub source: LostSource,
    pub count: u64,
    pub cpu: Option<i32>,
    /// When the loss was noticed (unix ns).
    pub time_ns: u64,
}

/// What the datapath saw of one connection an L7 flow travelled on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnLink {
    pub verdict: Verdict,
    /// Observation points of the connection's first packets, in order.
    pub path: Vec<u8>,
    pub drop_reason: u8,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub client: Option<SocketAddrV4>,
    pub server: Option<SocketAddrV4>,
    /// The Service frontend, when the connection was addressed to one.
    pub frontend: Option<SocketAddrV4>,
    pub proxy_port: u16,
    /// Ingress policy verdict on the connection: (allowed, match type).
    pub policy: Option<(bool, u8)>,
}

/// One HTTP exchange through the node's Envoy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Http {
    pub method: String,
    pub scheme: String,
    pub authority: String,
    pub path: String,
    /// `HTTP/1.1`, `HTTP/2`...
    pub protocol: &'static str,
    /// 0 when Envoy sent no response.
    pub code: u32,
    /// Request start (unix ns) and time to the last byte of the response.
    pub start_ns: u64,
    pub duration_ns: u64,
    pub request_id: String,
    pub traceparent: String,
    pub tracestate: String,
    pub user_agent: String,
    pub route: String,
    pub upstream_cluster: String,
    /// The backend Envoy chose, and the address it connected from.
    pub upstream: Option<SocketAddrV4>,
    pub upstream_local: Option<SocketAddrV4>,
    /// Envoy's response flags, e.g. `UF` (upstream connection failure).
    pub response_flags: String,
    /// The node's policy listener: the RBAC policy that allowed the request
    /// (empty if none did), and the one that governed it.
    pub policy: String,
    pub governing_policy: String,
    /// The client's connection (to the proxy) and the proxy's (to the backend).
    pub downstream_link: Option<ConnLink>,
    pub upstream_link: Option<ConnLink>,
}

impl Http {
    /// Whether the node's policy listener refused the request: a policy
    /// governed it, none allowed it, and Envoy answered 403 itself.
    pub fn denied(&self) -> bool {
        self.code == 403 && self.policy.is_empty() && !self.governing_policy.is_empty()
    }

    /// The URL as Hubble shows it.
    pub fn url(&self) -> String {
        Url(self).to_string()
    }

    /// The trace id of the W3C traceparent header, if there is a valid one.
    pub fn trace_id(&self) -> Option<&str> {
        let mut parts = self.traceparent.split('-');
        let (_version, id) = (parts.next()?, parts.next()?);
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) && !id.bytes().all(|b| b == b'0')).then_some(id)
    }

    /// The parent span id of the traceparent header.
    pub fn parent_span_id(&self) -> Option<&str> {
        let id = self.traceparent.split('-').nth(2)?;
        (id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    }
}

/// [`Http::url`] written where it is needed, without a string of its own
/// (the flow API writes it into every HTTP flow it sends).
pub struct Url<'a>(pub &'a Http);

impl std::fmt::Display for Url<'_> {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.0;
        let scheme = if h.scheme.is_empty() { "http" } else { &h.scheme };
        write!(out, "{scheme}://{}{}", h.authority, h.path)
    }
}

/// One HTTP exchange and the addresses of its two connections.
#[derive(Clone, Debug, Default)]
pub struct L7Entry {
    pub http: Http,
    /// The client's connection: its address, and the address it connected to
    /// (the Service address, as the datapath redirected it).
    pub client: Option<SocketAddrV4>,
    pub server: Option<SocketAddrV4>,
}

/// A pod or a node, as flows name it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    pub namespace: String,
    /// Empty for nodes.
    pub pod: String,
    /// `k8s:key=value` (and `reserved:host` and the like for nodes).
    pub labels: Vec<String>,
    /// (kind, name), e.g. (Deployment, web).
    pub workloads: Vec<(String, String)>,
    pub identity: u32,
    /// The node the pod runs on, or the node itself.
    pub node: String,
    /// A pod on this node.
    pub local: bool,
}

impl EndpointInfo {
    /// The first workload's name (for metric labels), else the pod's name.
    pub fn workload_name(&self) -> &str {
        self.workloads.first().map(|(_, n)| n.as_str()).unwrap_or(&self.pod)
    }
}

/// A Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
}

/// A flow: a datapath record, or an HTTP request or response (then `ev`
/// holds its addresses with type [`EV_L7`], and `http` the rest).
#[derive(Clone, Debug, Default)]
pub struct FlowRecord {
    /// Wall-clock time, unix ns.
    pub time_ns: u64,
    pub ev: Event,
    pub src: Option<Arc<EndpointInfo>>,
    pub dst: Option<Arc<EndpointInfo>>,
    pub src_svc: Option<Arc<ServiceInfo>>,
    pub dst_svc: Option<Arc<ServiceInfo>>,
    pub http: Option<Arc<Http>>,
}

fn flag(ev: &Event, f: u32) -> bool {
    ev.flags as u32 & f != 0
}

impl FlowRecord {
    /// The datapath event type, or [`EV_L7`].
    pub fn kind(&self) -> u8 {
        self.ev.r#type
    }

    pub fn is_l7(&self) -> bool {
        self.ev.r#type == EV_L7
    }

    /// Hubble's verdict for this flow.
    pub fn verdict(&self) -> Verdict {
        let ev = &self.ev;
        match ev.r#type as u32 {
            abi::EV_DROP => Verdict::Dropped,
            // Allowed through the proxy (L7 rules): Hubble says REDIRECTED.
            abi::EV_POLICY if ev.subtype as u32 == abi::POLICY_ALLOW && ev.proxy_port != 0 => Verdict::Redirected,
            abi::EV_POLICY if ev.subtype as u32 == abi::POLICY_ALLOW => Verdict::Forwarded,
            abi::EV_POLICY if flag(ev, abi::EVF_AUDIT) => Verdict::Audit,
            abi::EV_POLICY => Verdict::Dropped,
            abi::EV_TRACE if ev.subtype as u32 == abi::OBS_TO_PROXY => Verdict::Redirected,
            abi::EV_TRACE => Verdict::Forwarded,
            abi::EV_SOCK if ev.subtype as u32 == abi::OBS_TO_PROXY => Verdict::Redirected,
            abi::EV_SOCK => Verdict::Translated,
            // A request the proxy refused (the 403 that answers it is forwarded).
            t if t == u32::from(EV_L7)
                && ev.subtype == L7_REQUEST
                && self.http.as_ref().is_some_and(|h| h.denied()) =>
            {
                Verdict::Dropped
            }
            _ => Verdict::Forwarded,
        }
    }

    /// `CiliumEventType` (type, sub_type) as Hubble fills it.
    pub fn event_type(&self) -> (i32, i32) {
        let ev = &self.ev;
        match ev.r#type as u32 {
            abi::EV_DROP => (1, ev.subtype as i32),
            // The monitor's code for to-endpoint is 0 (the flow field uses 101).
            abi::EV_TRACE if ev.subtype as u32 == abi::OBS_TO_ENDPOINT => (4, 0),
            abi::EV_TRACE => (4, ev.subtype as i32),
            t => (t as i32, 0),
        }
    }

    /// The drop reason code (0 unless dropped).
    pub fn drop_reason(&self) -> u32 {
        if self.ev.r#type as u32 == abi::EV_DROP { self.ev.subtype as u32 } else { 0 }
    }

    /// Trace observation point, in Hubble's TraceObservationPoint numbering.
    pub fn observation_point(&self) -> Option<u32> {
        matches!(self.ev.r#type as u32, abi::EV_TRACE | abi::EV_SOCK).then_some(self.ev.subtype as u32)
    }

    /// The reply flag: unset when the datapath could not tell.
    pub fn is_reply(&self) -> Option<bool> {
        let ev = &self.ev;
        match ev.r#type {
            EV_L7 => Some(ev.subtype == L7_RESPONSE),
            t if t as u32 == abi::EV_DROP => flag(ev, abi::EVF_REPLY).then_some(true),
            _ => Some(flag(ev, abi::EVF_REPLY)),
        }
    }

    /// Ingress or egress, from the point of view of the local endpoint that
    /// opened or received the connection (replies count with their connection).
    pub fn direction(&self) -> TrafficDirection {
        let ev = &self.ev;
        let local = |e: &Option<Arc<EndpointInfo>>| e.as_ref().is_some_and(|e| e.local && !e.pod.is_empty());
        let by_policy = ev.r#type as u32 == abi::EV_POLICY || (ev.r#type as u32 == abi::EV_DROP && ev.direction != 0);
        let base = match ev.r#type as u32 {
            _ if by_policy => match ev.direction as u32 {
                abi::DIR_INGRESS => return TrafficDirection::Ingress,
                abi::DIR_EGRESS => return TrafficDirection::Egress,
                _ => return TrafficDirection::Unknown,
            },
            abi::EV_TRACE | abi::EV_DROP | abi::EV_SOCK => match ev.subtype as u32 {
                abi::OBS_TO_ENDPOINT | abi::OBS_FROM_NETWORK => TrafficDirection::Ingress,
                abi::OBS_FROM_ENDPOINT | abi::OBS_TO_PROXY | abi::OBS_TO_NETWORK => TrafficDirection::Egress,
                _ if local(&self.dst) => TrafficDirection::Ingress,
                _ if local(&self.src) => TrafficDirection::Egress,
                _ => TrafficDirection::Unknown,
            },
            _ if ev.direction as u32 == abi::DIR_INGRESS => return TrafficDirection::Ingress,
            _ if ev.direction as u32 == abi::DIR_EGRESS => return TrafficDirection::Egress,
            _ => {
                // L7: the proxy acts for the client when the client is ours.
                let (client, server) =
                    if ev.subtype == L7_RESPONSE { (&self.dst, &self.src) } else { (&self.src, &self.dst) };
                return if local(client) {
                    TrafficDirection::Egress
                } else if local(server) {
                    TrafficDirection::Ingress
                } else {
                    TrafficDirection::Unknown
                };
            }
        };
        match (base, ev.r#type as u32 != abi::EV_DROP && flag(ev, abi::EVF_REPLY)) {
            (TrafficDirection::Ingress, true) => TrafficDirection::Egress,
            (TrafficDirection::Egress, true) => TrafficDirection::Ingress,
            (d, _) => d,
        }
    }

    /// The address before destination translation, when there was one.
    pub fn original_destination(&self) -> Option<SocketAddrV4> {
        flag(&self.ev, abi::EVF_XLATED_DST).then(|| self.ev.orig())
    }

    /// The source after SNAT, when there was one.
    pub fn translated_source(&self) -> Option<SocketAddrV4> {
        flag(&self.ev, abi::EVF_XLATED_SRC).then(|| self.ev.nat())
    }

    /// Transport protocol number.
    pub fn proto(&self) -> u8 {
        self.ev.proto
    }

    /// Has ports (TCP or UDP).
    pub fn has_ports(&self) -> bool {
        matches!(self.ev.proto, 6 | 17 | 132)
    }
}

/// What the flow store holds.
#[derive(Clone, Debug)]
pub enum Entry {
    Flow(FlowRecord),
    Lost(Lost),
}

impl Entry {
    /// Time (unix ns).
    pub fn time_ns(&self) -> u64 {
        match self {
            Entry::Flow(f) => f.time_ns,
            Entry::Lost(l) => l.time_ns,
        }
    }
}
