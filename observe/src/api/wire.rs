//! A flow's `GetFlowsResponse` written straight from its record to protobuf
//! bytes: what the flow API sends. Building the `flow.Flow` message first
//! ([`convert::to_flow`]) copied every name and label into strings of its
//! own and formatted the addresses, the UUID and the summary into new ones,
//! some twenty allocations a flow, and then prost walked the message twice
//! (sizes, then bytes). Here the text goes from the record into the output
//! buffer and nothing is allocated per flow.
//!
//! The bytes are the ones prost writes for [`convert::to_flow`]'s message
//! (fields in field-number order, proto3 defaults left out, lengths as the
//! shortest varint): the values come from the same helpers in `convert`,
//! and the tests compare the two for flows of every kind. Parts that hold
//! no text (`Layer4`, timestamps, `CiliumEventType`) are built as prost
//! messages, which costs nothing, and encoded by prost.
//!
//! A stream writes through a [`FlowWriter`], which keeps what repeats from
//! flow to flow as bytes: each endpoint's `flow.Endpoint` (namespace,
//! labels, pod, workloads: about half of a flow's bytes with named pods on
//! both sides), the node's labels and the emitter, and a TCP flow's summary
//! (it says only the TCP flags). The bytes are the same as without it
//! ([`write_flow_response`]; tested on random flows).

use std::{
    collections::HashMap,
    fmt::{self, Display, Write as _},
    net::Ipv4Addr,
    sync::Arc,
};

use fnv::FnvBuildHasher;

use prost::encoding::{self, WireType};
use weft_flow::{
    proto::flow::{self, IpVersion},
    time::timestamp,
};

use super::convert::{
    self, Context, EMITTER, LINK_TYPE_URL, Summary, Uuid, endpoint_ids, flow_link, flow_type, http_headers, l7_numbers,
    named_policy, type_fields,
};
use crate::pipeline::{
    enrich::PolicyName,
    record::{EndpointInfo, FlowRecord, Http, ServiceInfo, Url},
};

/// Appends the `GetFlowsResponse` carrying flow `seq` (its store position)
/// to `out`: the bytes of `response(node, time, Flow(to_flow(..)))` encoded
/// by prost, with the node name of `ctx`'s names. Keeps nothing: a writer
/// of many flows uses a [`FlowWriter`].
pub fn write_flow_response(ctx: &Context, seq: u64, f: &FlowRecord, out: &mut Vec<u8>) {
    write_response(ctx, &mut Kept::default(), seq, f, out);
}

/// The most bytes of endpoints and interfaces a [`FlowWriter`] keeps (each
/// stream has one); past that it starts over. A node's flows name a few
/// hundred endpoints of 50-200 bytes; one larger than an eighth of this is
/// written every time.
pub const KEPT_BYTES: usize = 64 << 10;

/// Writes flows as [`write_flow_response`] does, with one context, keeping
/// the bytes of what repeats (see the module doc).
pub struct FlowWriter {
    pub ctx: Context,
    kept: Kept,
}

/// A `flow.Endpoint`'s contents depend on the endpoint's names (an
/// `Arc<EndpointInfo>`: the same allocation, the same names), its
/// datapath id and identity, and the cluster (the context's).
type EndpointKey = (usize, u16, u32);
/// The endpoint (held) and its `flow.Endpoint` contents.
type KeptEndpoint = (Arc<EndpointInfo>, Box<[u8]>);

/// What a [`FlowWriter`] keeps; a default one (`on` false) keeps nothing.
#[derive(Default)]
struct Kept {
    on: bool,
    /// Contents of `flow.Endpoint` by [`EndpointKey`]; the `Arc` held keeps
    /// the key's address from being reused by another endpoint.
    endpoints: HashMap<EndpointKey, KeptEndpoint, FnvBuildHasher>,
    /// `flow.Flow`'s fields 37 (node labels) and 41 (emitter), whole.
    node: Option<Box<[u8]>>,
    /// `flow.Flow`'s field 28 (the interface: index and name) by index.
    interfaces: HashMap<u32, Box<[u8]>, FnvBuildHasher>,
    /// The summary field of a TCP flow without HTTP, by its TCP flags (all
    /// such a summary says); empty until the first.
    tcp_summaries: Vec<Option<Box<[u8]>>>,
    /// Bytes in `endpoints` and `interfaces`.
    bytes: usize,
}

impl Kept {
    /// Whether `n` more bytes of endpoints or interfaces are kept: not when
    /// keeping nothing or when they are too many; starting over when the
    /// kept ones and these would be more than [`KEPT_BYTES`].
    fn make_room(&mut self, n: usize) -> bool {
        if !self.on || n > KEPT_BYTES / 8 {
            return false;
        }
        if self.bytes + n > KEPT_BYTES {
            self.endpoints.clear();
            self.interfaces.clear();
            self.bytes = 0;
        }
        self.bytes += n;
        true
    }
}

impl FlowWriter {
    pub fn new(ctx: Context) -> Self {
        FlowWriter { ctx, kept: Kept { on: true, ..Default::default() } }
    }

    /// [`write_flow_response`] with this writer's context.
    pub fn write_flow_response(&mut self, seq: u64, f: &FlowRecord, out: &mut Vec<u8>) {
        write_response(&self.ctx, &mut self.kept, seq, f, out);
    }
}

fn write_response(ctx: &Context, kept: &mut Kept, seq: u64, f: &FlowRecord, out: &mut Vec<u8>) {
    // A flow takes 128 bytes or more (its UUID and time alone take 50), and
    // less than 16 KiB unless its HTTP text is long: two bytes of length.
    message_in(out, 1, 2, |out| write_flow(ctx, kept, seq, f, out));
    string(out, 1000, &ctx.names.node_name);
    encoding::message::encode(1001, &timestamp(f.time_ns), out);
}

/// `flow.Flow`'s fields, in field-number order.
fn write_flow(ctx: &Context, kept: &mut Kept, seq: u64, f: &FlowRecord, out: &mut Vec<u8>) {
    let ev = &f.ev;
    let names = &*ctx.names;
    let verdict = f.verdict();
    let direction = f.direction();
    let is_reply = f.is_reply();
    let t = type_fields(f);
    let http = f.http.as_deref();
    encoding::message::encode(1, &timestamp(f.time_ns), out);
    int32(out, 2, verdict as i32);
    uint(out, 3, t.drop_reason.into());
    message(out, 5, |out| {
        ipv4(out, 1, *ev.src().ip());
        ipv4(out, 2, *ev.dst().ip());
        int32(out, 3, IpVersion::IPv4 as i32);
        if let Some(a) = f.translated_source() {
            ipv4(out, 5, *a.ip());
        }
    });
    if let Some(l4) = convert::layer4(f) {
        encoding::message::encode(6, &l4, out);
    }
    endpoint_field(out, kept, 8, f.src.as_ref(), ev.src_ep, ev.src_identity, &names.cluster);
    endpoint_field(out, kept, 9, f.dst.as_ref(), ev.dst_ep, ev.dst_identity, &names.cluster);
    int32(out, 10, flow_type(f) as i32);
    string(out, 11, &names.node_name);
    if let Some(h) = http {
        message(out, 15, |out| layer7(out, f, h));
    }
    boolean(out, 16, is_reply.unwrap_or(false));
    let (r#type, sub_type) = f.event_type();
    encoding::message::encode(19, &flow::CiliumEventType { r#type, sub_type }, out);
    if let Some(s) = &f.src_svc {
        message(out, 20, |out| service(out, s));
    }
    if let Some(s) = &f.dst_svc {
        message(out, 21, |out| service(out, s));
    }
    int32(out, 22, direction as i32);
    uint(out, 23, t.policy_match_type.into());
    int32(out, 24, t.trace_observation_point);
    int32(out, 25, t.drop_reason_desc);
    if let Some(reply) = is_reply {
        encoding::message::encode(26, &reply, out);
    }
    if ev.ifindex != 0 {
        interface(out, ctx, kept, ev.ifindex);
    }
    uint(out, 29, ev.proxy_port.into());
    if let Some(id) = http.and_then(Http::trace_id) {
        message(out, 30, |out| {
            message(out, 1, |out| string(out, 1, id));
        });
    }
    int32(out, 31, t.sock_xlate_point);
    string(out, 34, Uuid::new(ctx.boot_id, seq).as_str());
    int32(out, 36, t.trace_reason);
    match &kept.node {
        Some(b) => out.extend_from_slice(b),
        None => {
            let start = out.len();
            for label in &names.node_labels {
                text(out, 37, label);
            }
            message(out, 41, |out| {
                string(out, 1, EMITTER.0);
                string(out, 2, EMITTER.1);
            });
            if kept.on {
                kept.node = Some(out[start..].into());
            }
        }
    }
    if let Some((field, p)) = named_policy(names, f, verdict) {
        message(out, field as u32, |out| policy(out, p));
    }
    summary(out, kept, f);
    if ctx.with_link
        && let Some(link) = http.and_then(flow_link)
    {
        message(out, 150_000, |out| {
            string(out, 1, LINK_TYPE_URL);
            encoding::message::encode(2, &link, out);
        });
    }
}

/// The interface field (28), kept per index (the context looks a name up
/// once anyway).
fn interface(out: &mut Vec<u8>, ctx: &Context, kept: &mut Kept, index: u32) {
    if let Some(b) = kept.interfaces.get(&index) {
        out.extend_from_slice(b);
        return;
    }
    let start = out.len();
    message(out, 28, |out| {
        uint(out, 1, index.into());
        string(out, 2, &ctx.ifname(index));
    });
    if kept.make_room(out.len() - start) {
        kept.interfaces.insert(index, out[start..].into());
    }
}

/// The summary field (100,000): kept per TCP flags for TCP flows without
/// HTTP, the most common kind; written for the others.
fn summary(out: &mut Vec<u8>, kept: &mut Kept, f: &FlowRecord) {
    if !kept.on || f.http.is_some() || f.ev.proto != 6 {
        display(out, 100_000, Summary(f));
        return;
    }
    if kept.tcp_summaries.is_empty() {
        kept.tcp_summaries.resize(256, None);
    }
    let flags = usize::from(f.ev.tcp_flags);
    match &kept.tcp_summaries[flags] {
        Some(b) => out.extend_from_slice(b),
        None => {
            let start = out.len();
            display(out, 100_000, Summary(f));
            kept.tcp_summaries[flags] = Some(out[start..].into());
        }
    }
}

/// `flow.Endpoint` as field `tag`: its contents kept per [`EndpointKey`]
/// when `kept` keeps (an endpoint without names is a few bytes: written).
fn endpoint_field(
    out: &mut Vec<u8>,
    kept: &mut Kept,
    tag: u32,
    e: Option<&Arc<EndpointInfo>>,
    id: u16,
    identity: u32,
    cluster: &str,
) {
    let Some(e) = e.filter(|_| kept.on) else {
        message(out, tag, |out| endpoint(out, e.map(|e| &**e), id, identity, cluster));
        return;
    };
    let which = (Arc::as_ptr(e) as usize, id, identity);
    if let Some((_, body)) = kept.endpoints.get(&which) {
        key(out, tag, WireType::LengthDelimited);
        varint(out, body.len() as u64);
        out.extend_from_slice(body);
        return;
    }
    let len = message(out, tag, |out| endpoint(out, Some(e), id, identity, cluster));
    if kept.make_room(len) {
        kept.endpoints.insert(which, (e.clone(), out[out.len() - len..].into()));
    }
}

fn endpoint(out: &mut Vec<u8>, e: Option<&EndpointInfo>, id: u16, identity: u32, cluster: &str) {
    let (identity, cluster) = endpoint_ids(e, identity, cluster);
    uint(out, 1, id.into());
    uint(out, 2, identity.into());
    if let Some(e) = e {
        string(out, 3, &e.namespace);
        for label in &e.labels {
            text(out, 4, label);
        }
        string(out, 5, &e.pod);
        for (kind, name) in &e.workloads {
            message(out, 6, |out| {
                string(out, 1, name);
                string(out, 2, kind);
            });
        }
    }
    string(out, 7, cluster);
}

fn service(out: &mut Vec<u8>, s: &ServiceInfo) {
    string(out, 1, &s.name);
    string(out, 2, &s.namespace);
}

fn layer7(out: &mut Vec<u8>, f: &FlowRecord, h: &Http) {
    let (r#type, latency_ns, code) = l7_numbers(f, h);
    int32(out, 1, r#type as i32);
    uint(out, 2, latency_ns);
    message(out, 101, |out| {
        uint(out, 1, code.into());
        string(out, 2, &h.method);
        display(out, 3, Url(h));
        string(out, 4, h.protocol);
        for (key, value) in http_headers(h) {
            message(out, 5, |out| {
                string(out, 1, key);
                string(out, 2, value);
            });
        }
    });
}

fn policy(out: &mut Vec<u8>, p: &PolicyName) {
    string(out, 1, &p.name);
    string(out, 2, &p.namespace);
    string(out, 5, &p.kind);
}

/// An unsigned varint field (uint32, uint64), left out when 0.
fn uint(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        key(out, tag, WireType::Varint);
        varint(out, v);
    }
}

/// An int32 or enum field, left out when 0 (negative values take ten
/// bytes, sign-extended, as protobuf says).
fn int32(out: &mut Vec<u8>, tag: u32, v: i32) {
    uint(out, tag, v as i64 as u64);
}

fn boolean(out: &mut Vec<u8>, tag: u32, v: bool) {
    uint(out, tag, v.into());
}

/// A string field, left out when empty.
fn string(out: &mut Vec<u8>, tag: u32, s: &str) {
    if !s.is_empty() {
        text(out, tag, s);
    }
}

/// One string of a repeated field (written even when empty).
fn text(out: &mut Vec<u8>, tag: u32, s: &str) {
    key(out, tag, WireType::LengthDelimited);
    varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// A string field holding `d` as it displays, left out when empty.
fn display(out: &mut Vec<u8>, tag: u32, d: impl Display) {
    let start = out.len();
    if message(out, tag, |out| {
        // Writing to a Vec cannot fail; a Display that fails leaves what it wrote.
        let _ = write!(Text(out), "{d}");
    }) == 0
    {
        out.truncate(start);
    }
}

/// A string field holding an IPv4 address as `Ipv4Addr` displays it
/// (dotted decimal; never empty), written without the formatter.
fn ipv4(out: &mut Vec<u8>, tag: u32, a: Ipv4Addr) {
    let mut text = [0u8; 15];
    let mut n = 0;
    for (i, octet) in a.octets().into_iter().enumerate() {
        if i > 0 {
            text[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            text[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            text[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        text[n] = b'0' + octet % 10;
        n += 1;
    }
    key(out, tag, WireType::LengthDelimited);
    varint(out, n as u64);
    out.extend_from_slice(&text[..n]);
}

/// A varint as prost writes it (`encoding::encode_varint`), inline: most
/// take one byte.
#[inline]
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A field's key as prost writes it (`encoding::encode_key`).
#[inline]
fn key(out: &mut Vec<u8>, tag: u32, wire_type: WireType) {
    varint(out, u64::from(tag << 3 | wire_type as u32));
}

/// A length-delimited field whose contents `body` appends; returns their
/// length. One byte is kept for the length (most are shorter than 128).
fn message(out: &mut Vec<u8>, tag: u32, body: impl FnOnce(&mut Vec<u8>)) -> usize {
    message_in(out, tag, 1, body)
}

/// [`message`] keeping `room` bytes (1 or 2) for the length: the contents
/// move down when it needs fewer, up when it needs more.
fn message_in(out: &mut Vec<u8>, tag: u32, room: usize, body: impl FnOnce(&mut Vec<u8>)) -> usize {
    key(out, tag, WireType::LengthDelimited);
    let at = out.len();
    out.extend_from_slice(&[0, 0][..room]);
    body(out);
    let len = out.len() - at - room;
    if room == 1 && len < 0x80 {
        out[at] = len as u8;
        return len;
    }
    let mut length = [0u8; 10];
    let n = {
        let mut rest = &mut length[..];
        encoding::encode_varint(len as u64, &mut rest);
        10 - rest.len()
    };
    match n.cmp(&room) {
        std::cmp::Ordering::Equal => out[at..at + n].copy_from_slice(&length[..n]),
        std::cmp::Ordering::Less => {
            out.copy_within(at + room.., at + n);
            out.truncate(out.len() - (room - n));
            out[at..at + n].copy_from_slice(&length[..n]);
        }
        std::cmp::Ordering::Greater => {
            out.splice(at..at + room, length[..n].iter().copied());
        }
    }
    len
}

/// `fmt::Write` into the output buffer.
struct Text<'a>(&'a mut Vec<u8>);

impl fmt::Write for Text<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, net::SocketAddrV4, sync::Arc};

    use prost::Message;
    use weft_ebpf::abi::{self, Event};
    use weft_flow::proto::{
        flow::Verdict,
        observer::{GetFlowsResponse, get_flows_response::ResponseTypes},
    };

    use super::*;
    use crate::pipeline::{
        enrich::Names,
        record::{ConnLink, EV_L7, L7_REQUEST, L7_RESPONSE},
    };

    /// A small deterministic generator (xorshift64*), so a failure repeats.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn pick<T: Clone>(&mut self, xs: &[T]) -> T {
            xs[self.below(xs.len() as u64) as usize].clone()
        }

        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    fn ip(a: [u8; 4]) -> Ipv4Addr {
        Ipv4Addr::from(a)
    }

    fn raw(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    /// Names with a pod, a node, a pod with labels long enough that its
    /// endpoint needs a two-byte length, Services and policies.
    fn names() -> Names {
        let mut n = Names::new("node-a");
        n.node_labels = vec!["kubernetes.io/hostname=node-a".into(), String::new(), "x".repeat(300)];
        n.add_endpoint(
            ip([10, 0, 0, 1]),
            EndpointInfo {
                namespace: "shop".into(),
                pod: "web-1".into(),
                labels: vec!["k8s:app=web".into(), "k8s:io.kubernetes.pod.namespace=shop".into()],
                workloads: vec![("Deployment".into(), "web".into()), (String::new(), "odd".into())],
                identity: 70001,
                node: "node-a".into(),
                local: true,
            },
        );
        n.add_endpoint(
            ip([10, 0, 0, 2]),
            EndpointInfo {
                namespace: String::new(),
                pod: String::new(),
                labels: vec!["reserved:host".into()],
                identity: 1,
                node: "node-a".into(),
                local: true,
                ..Default::default()
            },
        );
        n.add_endpoint(
            ip([10, 0, 1, 3]),
            EndpointInfo {
                namespace: "default".into(),
                pod: "big".into(),
                labels: (0..40).map(|i| format!("k8s:label-{i}=value-{i}")).collect(),
                workloads: vec![("StatefulSet".into(), "big".into())],
                identity: 0,
                node: "node-b".into(),
                local: false,
            },
        );
        n.add_service(
            ip([10, 96, 0, 10]),
            80,
            6,
            Arc::new(ServiceInfo { namespace: "shop".into(), name: "web".into() }),
        );
        n.add_service(
            ip([10, 0, 0, 2]),
            8080,
            17,
            Arc::new(ServiceInfo { namespace: String::new(), name: "dns".into() }),
        );
        n.add_policy(
            7,
            PolicyName { kind: "NetworkPolicy".into(), namespace: "shop".into(), name: "allow-web".into() },
        );
        n.add_policy(
            8,
            PolicyName { kind: "CiliumClusterwideNetworkPolicy".into(), namespace: String::new(), name: "deny".into() },
        );
        n
    }

    const ADDRS: [[u8; 4]; 6] =
        [[10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 1, 3], [10, 96, 0, 10], [192, 168, 7, 9], [0, 0, 0, 0]];

    fn addr(rng: &mut Rng) -> u32 {
        raw(rng.pick(&ADDRS))
    }

    fn port(rng: &mut Rng) -> u16 {
        rng.pick(&[0u16, 80, 8080, 40000, 65535]).to_be()
    }

    fn text(rng: &mut Rng, long: usize) -> String {
        rng.pick(&[String::new(), "a".into(), "web.shop.svc:8080".into(), "é/ü".into(), "y".repeat(long)])
    }

    fn link(rng: &mut Rng) -> Option<ConnLink> {
        rng.chance(60).then(|| ConnLink {
            verdict: rng.pick(&[Verdict::Forwarded, Verdict::Dropped, Verdict::Redirected, Verdict::Translated]),
            path: (0..rng.below(5))
                .map(|_| rng.pick(&[abi::OBS_FROM_ENDPOINT, abi::OBS_TO_PROXY, abi::OBS_TO_ENDPOINT, 200]) as u8)
                .collect(),
            drop_reason: rng.pick(&[0u8, 133, 181, 250]),
            src_identity: rng.pick(&[0, 1, 70001]),
            dst_identity: rng.pick(&[0, 2, 70002]),
            client: rng.chance(50).then(|| SocketAddrV4::new(ip([10, 0, 0, 1]), 40000)),
            server: rng.chance(50).then(|| SocketAddrV4::new(ip([10, 96, 0, 10]), 80)),
            frontend: rng.chance(50).then(|| SocketAddrV4::new(ip([10, 96, 0, 10]), 80)),
            proxy_port: rng.pick(&[0, 15001]),
            policy: rng.chance(50).then(|| (rng.chance(50), rng.below(7) as u8)),
        })
    }

    fn http(rng: &mut Rng) -> Http {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        Http {
            method: rng.pick(&["GET".into(), String::new(), "POST".into()]),
            scheme: rng.pick(&[String::new(), "https".into()]),
            authority: text(rng, 70),
            path: rng.pick(&["/".into(), "/api/v1/items?x=1".into(), format!("/{}", "p".repeat(20_000))]),
            protocol: rng.pick(&["HTTP/1.1", "HTTP/2", ""]),
            code: rng.pick(&[0, 200, 403, 503]),
            start_ns: rng.next() >> 2,
            duration_ns: rng.pick(&[0, 999_999, 12_345_678, u64::MAX]),
            request_id: text(rng, 200),
            traceparent: rng.pick(&[
                String::new(),
                format!("00-{trace}-00f067aa0ba902b7-01"),
                format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
                "00-short-01".into(),
            ]),
            tracestate: text(rng, 10),
            user_agent: text(rng, 130),
            route: rng.pick(&[String::new(), "/weft-gateway.shop.gw/httproute/shop/web/rule/0".into()]),
            policy: rng.pick(&[String::new(), "weft/7/1".into()]),
            governing_policy: rng.pick(&[String::new(), "weft/8/2".into()]),
            downstream_link: link(rng),
            upstream_link: link(rng),
            ..Default::default()
        }
    }

    /// A record of any kind: every event type (and ones the datapath does
    /// not send), flag bits, protocols, known and unknown addresses,
    /// interfaces, policies; a quarter are HTTP flows.
    fn record(rng: &mut Rng, names: &Names) -> FlowRecord {
        let l7 = rng.chance(25);
        let ev = Event {
            ts_ns: rng.next() >> 1,
            r#type: if l7 {
                EV_L7
            } else {
                rng.pick(&[abi::EV_DROP, abi::EV_POLICY, abi::EV_TRACE, abi::EV_SOCK, 0, 77]) as u8
            },
            subtype: if l7 {
                rng.pick(&[L7_REQUEST, L7_RESPONSE])
            } else {
                rng.pick(&[0, 1, 2, 5, 10, 11, 101, 133, 181, 255])
            },
            reason: rng.below(6) as u8,
            flags: rng.next() as u8 & 0x1f,
            src_ep: rng.pick(&[0, 1, 4321]),
            dst_ep: rng.pick(&[0, 2, 65535]),
            src_identity: rng.pick(&[0, 1, 70001, u32::MAX]),
            dst_identity: rng.pick(&[0, 2, 70002]),
            ifindex: rng.pick(&[0, 1, 999_999]),
            saddr: addr(rng),
            daddr: addr(rng),
            sport: port(rng),
            dport: port(rng),
            proto: if l7 { 6 } else { rng.pick(&[6, 17, 132, 1, 47, 0]) },
            tcp_flags: rng.next() as u8,
            policy_match: rng.below(7) as u8,
            direction: rng.below(4) as u8,
            orig_addr: addr(rng),
            orig_port: port(rng),
            proxy_port: rng.pick(&[0, 15001]),
            nat_addr: addr(rng),
            nat_port: port(rng),
            rule_id: rng.pick(&[0, 7, 8, 9]),
            ..Default::default()
        };
        let mut f = names.enrich(&ev, rng.pick(&[0, 1, 999_999_999, 1_000_000_000, ev.ts_ns]));
        if l7 {
            f.http = Some(Arc::new(http(rng)));
        }
        f
    }

    /// What the flow API sent before it wrote flows itself: the typed
    /// message, encoded by prost.
    fn typed(ctx: &Context, seq: u64, f: &FlowRecord) -> Vec<u8> {
        GetFlowsResponse {
            response_types: Some(ResponseTypes::Flow(convert::to_flow(ctx, seq, f))),
            node_name: ctx.names.node_name.clone(),
            time: Some(timestamp(f.time_ns)),
        }
        .encode_to_vec()
    }

    /// The property: for flows of every kind, for weft's clients and
    /// others, the bytes written equal those of the typed message.
    #[test]
    fn written_flows_are_the_bytes_of_the_typed_message() {
        let names = Arc::new(names());
        let contexts =
            [Context::new(names.clone(), 0x0123_4567_89ab_cdef, false), Context::new(names.clone(), 7, true)];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let (mut kinds, mut long) = (std::collections::HashSet::new(), 0);
        let mut out = Vec::new();
        for i in 0..20_000u64 {
            let f = record(&mut rng, &names);
            let seq = rng.pick(&[0, i, u64::MAX, 1 << 50]);
            for ctx in &contexts {
                out.clear();
                write_flow_response(ctx, seq, &f, &mut out);
                let want = typed(ctx, seq, &f);
                if out != want {
                    let got = GetFlowsResponse::decode(out.as_slice());
                    panic!(
                        "flow {i} ({f:?}) differs:\nwritten {got:?}\ntyped   {:?}",
                        GetFlowsResponse::decode(want.as_slice())
                    );
                }
                kinds.insert((f.ev.r#type, f.verdict() as i32, f.ev.proto));
                long += usize::from(out.len() > 16_384);
            }
        }
        // The generator reached what it is for: many kinds, and lengths
        // that take three bytes.
        assert!(kinds.len() > 60, "{} kinds", kinds.len());
        assert!(long > 100, "{long} flows over 16 KiB");
    }

    /// Names whose endpoints sit at the addresses of [`names`] but hold
    /// other text (the `k`th variant), each in an allocation of its own.
    fn other_names(k: u64) -> Names {
        let mut n = Names::new("node-a");
        for (i, a) in ADDRS.iter().enumerate().take(3) {
            n.add_endpoint(
                ip(*a),
                EndpointInfo {
                    namespace: format!("ns-{k}"),
                    pod: if i == 1 { String::new() } else { format!("pod-{k}-{i}") },
                    // Now and then one too large to keep.
                    labels: (0..k % 4)
                        .map(|j| format!("k8s:l{j}=v{k}"))
                        .chain(k.is_multiple_of(97).then(|| "k".repeat(KEPT_BYTES / 7)))
                        .collect(),
                    identity: (k % 3) as u32 * 1000,
                    ..Default::default()
                },
            );
        }
        n
    }

    /// The property for [`FlowWriter`]: a writer that has kept the bytes of
    /// what it wrote before writes every flow as one that keeps nothing,
    /// for flows of every kind, whose endpoints come from names that are
    /// dropped and made again (so an endpoint's allocation is reused by one
    /// with other names), through more endpoints than it keeps, some too
    /// large to keep.
    #[test]
    fn a_writer_keeping_bytes_writes_what_one_keeping_nothing_does() {
        let names = Arc::new(names());
        let mut writers = [
            FlowWriter::new(Context::new(names.clone(), 99, false)),
            FlowWriter::new(Context::new(names.clone(), 5, true)),
        ];
        let mut rng = Rng(0x0bad_cafe_f00d_d00d);
        let (mut kept, mut fresh) = (Vec::new(), Vec::new());
        let (mut hits, mut starts) = (0usize, 0usize);
        for i in 0..12_000u64 {
            // A record enriched by the usual names, or by names made for it
            // alone (dropped after it: their allocations are reused).
            let other = rng.chance(50).then(|| other_names(rng.below(1000)));
            let f = record(&mut rng, other.as_ref().unwrap_or(&names));
            for w in &mut writers {
                kept.clear();
                fresh.clear();
                let before = w.kept.endpoints.len();
                w.write_flow_response(i, &f, &mut kept);
                write_flow_response(&w.ctx, i, &f, &mut fresh);
                let after = w.kept.endpoints.len();
                hits += usize::from(after == before && (f.src.is_some() || f.dst.is_some()));
                starts += usize::from(after < before);
                if kept != fresh {
                    panic!(
                        "flow {i} ({f:?}) differs:\nkept    {:?}\nnothing {:?}",
                        GetFlowsResponse::decode(kept.as_slice()),
                        GetFlowsResponse::decode(fresh.as_slice())
                    );
                }
            }
        }
        // Bytes were kept and used, and the writers started over at least once.
        assert!(hits > 1000, "{hits} flows wrote only kept endpoints");
        assert!(writers.iter().all(|w| w.kept.node.is_some()));
        assert!(starts >= 2, "the writers started over {starts} times");
        assert!(writers.iter().all(|w| w.kept.bytes <= KEPT_BYTES));
    }

    /// Addresses are written as `Ipv4Addr` displays them.
    #[test]
    fn addresses_are_written_as_they_display() {
        let mut rng = Rng(0x1234_5678);
        let edges = [0u32, 1, 9, 10, 99, 100, 199, 200, 255, 0x0a00_0001, 0x6464_6464, u32::MAX];
        let all = edges.into_iter().chain((0..10_000).map(|_| rng.next() as u32));
        for a in all.chain((0..=255u32).map(|o| o * 0x0101_0101)) {
            let a = Ipv4Addr::from(a);
            let (mut got, mut want) = (Vec::new(), Vec::new());
            ipv4(&mut got, 2, a);
            encoding::string::encode(2, &a.to_string(), &mut want);
            assert_eq!(got, want, "{a}");
        }
    }

    /// A field's length takes as many bytes as it needs, and the field's
    /// contents move up past it (or down, when fewer than kept will do).
    #[test]
    fn lengths_take_the_bytes_they_need() {
        for room in [1, 2] {
            for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, 100_000, 2_097_152] {
                let mut out = vec![0xaa];
                let s = "z".repeat(len);
                let written = message_in(&mut out, 3, room, |out| out.extend_from_slice(s.as_bytes()));
                let mut want = vec![0xaa];
                encoding::string::encode(3, &s, &mut want);
                assert_eq!((written, out), (len, want), "{len} in {room}");
            }
        }
        // Varints and keys as prost writes them.
        for v in [0u64, 1, 127, 128, 300, 16_383, 16_384, u32::MAX.into(), u64::MAX, i64::from(-1i32) as u64] {
            let (mut got, mut want) = (Vec::new(), Vec::new());
            varint(&mut got, v);
            encoding::encode_varint(v, &mut want);
            assert_eq!(got, want, "{v}");
        }
        for tag in [1u32, 15, 16, 2047, 2048, 100_000, 150_000, (1 << 29) - 1] {
            let (mut got, mut want) = (Vec::new(), Vec::new());
            key(&mut got, tag, WireType::LengthDelimited);
            encoding::encode_key(tag, WireType::LengthDelimited, &mut want);
            assert_eq!(got, want, "{tag}");
        }
        let mut out = Vec::new();
        display(&mut out, 2, "");
        string(&mut out, 2, "");
        assert!(out.is_empty(), "empty strings are left out");
    }
}
