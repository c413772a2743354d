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

use std::fmt::{self, Display, Write as _};

use prost::encoding::{self, WireType, encode_key, encode_varint};
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
/// by prost, with the node name of `ctx`'s names.
pub fn write_flow_response(ctx: &Context, seq: u64, f: &FlowRecord, out: &mut Vec<u8>) {
    message(out, 1, |out| write_flow(ctx, seq, f, out));
    string(out, 1000, &ctx.names.node_name);
    encoding::message::encode(1001, &timestamp(f.time_ns), out);
}

/// `flow.Flow`'s fields, in field-number order.
fn write_flow(ctx: &Context, seq: u64, f: &FlowRecord, out: &mut Vec<u8>) {
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
        display(out, 1, ev.src().ip());
        display(out, 2, ev.dst().ip());
        int32(out, 3, IpVersion::IPv4 as i32);
        if let Some(a) = f.translated_source() {
            display(out, 5, a.ip());
        }
    });
    if let Some(l4) = convert::layer4(f) {
        encoding::message::encode(6, &l4, out);
    }
    message(out, 8, |out| endpoint(out, f.src.as_deref(), ev.src_ep, ev.src_identity, &names.cluster));
    message(out, 9, |out| endpoint(out, f.dst.as_deref(), ev.dst_ep, ev.dst_identity, &names.cluster));
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
        message(out, 28, |out| {
            uint(out, 1, ev.ifindex.into());
            string(out, 2, &ctx.ifname(ev.ifindex));
        });
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
    for label in &names.node_labels {
        text(out, 37, label);
    }
    message(out, 41, |out| {
        string(out, 1, EMITTER.0);
        string(out, 2, EMITTER.1);
    });
    if let Some((field, p)) = named_policy(names, f, verdict) {
        message(out, field as u32, |out| policy(out, p));
    }
    display(out, 100_000, Summary(f));
    if ctx.with_link
        && let Some(link) = http.and_then(flow_link)
    {
        message(out, 150_000, |out| {
            string(out, 1, LINK_TYPE_URL);
            encoding::message::encode(2, &link, out);
        });
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
        encode_key(tag, WireType::Varint, out);
        encode_varint(v, out);
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
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(s.len() as u64, out);
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

/// A length-delimited field whose contents `body` appends; returns their
/// length. One byte is kept for the length (most are shorter than 128), and
/// the contents move up when it needs more.
fn message(out: &mut Vec<u8>, tag: u32, body: impl FnOnce(&mut Vec<u8>)) -> usize {
    encode_key(tag, WireType::LengthDelimited, out);
    let at = out.len();
    out.push(0);
    body(out);
    let len = out.len() - at - 1;
    if len < 0x80 {
        out[at] = len as u8;
    } else {
        let mut bytes = [0u8; 10];
        encode_varint(len as u64, &mut &mut bytes[..]);
        let n = encoding::encoded_len_varint(len as u64);
        out.splice(at..at + 1, bytes[..n].iter().copied());
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

    /// A field's length takes as many bytes as it needs, and the field's
    /// contents move up past it.
    #[test]
    fn lengths_take_the_bytes_they_need() {
        for len in [0usize, 1, 127, 128, 300, 16_383, 16_384, 100_000] {
            let mut out = vec![0xaa];
            let s = "z".repeat(len);
            let written = message(&mut out, 3, |out| out.extend_from_slice(s.as_bytes()));
            let mut want = vec![0xaa];
            encoding::string::encode(3, &s, &mut want);
            assert_eq!((written, out), (len, want), "{len}");
        }
        let mut out = Vec::new();
        display(&mut out, 2, "");
        string(&mut out, 2, "");
        assert!(out.is_empty(), "empty strings are left out");
    }
}
