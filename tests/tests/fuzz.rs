//! Fuzz targets (the engine and how to add one: `weft_tests::fuzz`). Each runs
//! its regressions, its seed corpus and then mutations for
//! `WEFT_FUZZ_SECONDS` (CI's budget when unset); `tests/fuzz.sh TARGET
//! SECONDS` runs one for as long as asked.

use std::{
    collections::BTreeSet,
    hash::{Hash, Hasher},
    path::Path,
    time::Duration,
};

use weft_agent::{
    k8s::yaml,
    validate,
    xds::{model::Model, ports::ProxyPorts},
};
use weft_tests::fuzz;

/// Objects the fuzzed configs can refer to (Services, Pods, a TLS Secret).
const OBJECTS: &str = include_str!("../fuzz/envoyconfig/corpus/objects.yaml");

/// A signature of a list of problems: their wording without names and numbers.
fn signature(problems: impl Iterator<Item = String>) -> u64 {
    let shapes: BTreeSet<String> = problems
        .map(|p| {
            let mut out = String::new();
            let mut quoted = false;
            for c in p.chars() {
                match c {
                    '"' => quoted = !quoted,
                    c if quoted || c.is_ascii_digit() => {}
                    c => out.push(c),
                }
            }
            out
        })
        .collect();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    shapes.hash(&mut h);
    h.finish()
}

/// The EnvoyConfig path as the agent and `weft-agent validate` run it: YAML
/// (one file, many documents) -> objects and EnvoyConfig documents -> parse ->
/// proto-JSON decode -> translate -> field rules and tenancy -> the
/// cross-object model (built twice, as the agent does on the next change).
fn envoyconfig(input: &[u8]) -> u64 {
    let Ok(text) = std::str::from_utf8(input) else { return 0 };
    let mut loaded = yaml::Loaded::default();
    yaml::load_text(Path::new("objects.yaml"), OBJECTS, &mut loaded);
    yaml::load_text(Path::new("fuzz.yaml"), text, &mut loaded);
    let mut model = Model::new(ProxyPorts::ephemeral());
    let verdicts = validate::verdicts(&loaded, &mut model);
    let again = validate::verdicts(&loaded, &mut model);
    assert_eq!(verdicts.len(), again.len(), "the same objects judged twice give as many verdicts");
    signature(
        verdicts
            .iter()
            .flat_map(|v| v.problems.iter().cloned())
            .chain(loaded.problems.iter().map(|p| p.message.clone())),
    )
}

#[test]
fn fuzz_envoyconfig() {
    let budget = fuzz::budget(Duration::from_secs(20));
    fuzz::run("envoyconfig", &envoyconfig, budget, Duration::from_secs(30));
}

// --- Runtime inputs: what Envoy, flow API clients and the kernel send. ---

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use prost::Message;
use weft_ebpf::abi::Event;
use weft_flow::proto::observer::GetFlowsRequest;
use weft_observe::{
    api::{
        convert::{self, Context},
        filter::{Env, FilterSet},
        server::Query,
    },
    pipeline::{
        accesslog,
        enrich::{Names, PolicyName},
        join::ConnTable,
        l7_flows,
        record::{EndpointInfo, Entry, FlowRecord, L7Entry, ServiceInfo},
        ringbuf::event_line,
    },
};

/// Names the runtime targets enrich with: two pods and a Service, in the
/// addresses the seeds use.
fn names() -> Names {
    let mut n = Names::new("node1");
    for (ip, pod, identity) in [([10, 0, 1, 5], "client", 1001), ([10, 0, 2, 7], "server", 1002)] {
        n.add_endpoint(
            Ipv4Addr::from(ip),
            EndpointInfo {
                namespace: "default".into(),
                pod: pod.into(),
                labels: vec![format!("k8s:app={pod}")],
                workloads: vec![("Deployment".into(), pod.into())],
                identity,
                node: "node1".into(),
                local: true,
            },
        );
    }
    n.add_service(
        Ipv4Addr::new(10, 96, 0, 10),
        80,
        6,
        Arc::new(ServiceInfo { namespace: "default".into(), name: "web".into() }),
    );
    n.add_policy(7, PolicyName { kind: "NetworkPolicy".into(), namespace: "default".into(), name: "allow-web".into() });
    n
}

/// Every flow of `entries` as the flow API sends it, and a signature of them.
fn flows_signature(names: Names, records: &[FlowRecord]) -> u64 {
    let ctx = Context::new(Arc::new(names), 42, true);
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (seq, f) in records.iter().enumerate() {
        let flow = convert::to_flow(&ctx, seq as u64, f);
        (flow.verdict, flow.r#type, flow.l7.is_some(), flow.event_type.map(|e| e.r#type)).hash(&mut h);
        convert::summary(f).len().hash(&mut h);
    }
    h.finish()
}

/// A message `name` of `pool` from proto-JSON (for the structure-aware
/// mutations), else from protobuf bytes (what gRPC carries).
fn decode<T: Message + Default>(pool: &prost_reflect::DescriptorPool, name: &str, input: &[u8]) -> Option<T> {
    match serde_json::from_slice::<serde_json::Value>(input) {
        Ok(v) => {
            let Some(desc) = pool.get_message_by_name(name) else { panic!("{name} is not in the descriptors") };
            prost_reflect::DynamicMessage::deserialize(desc, v).ok().and_then(|m| m.transcode_to::<T>().ok())
        }
        Err(_) => T::decode(input).ok(),
    }
}

/// Ring-buffer records (the datapath's `weft_event`, any bytes): decoded,
/// enriched, joined into connections, converted to flows and printed, as the
/// pipeline's threads and the flow API do.
fn ringbuf(input: &[u8]) -> u64 {
    let size = std::mem::size_of::<Event>();
    let names = names();
    let mut conns = ConnTable::new(64);
    let mut records = Vec::new();
    for chunk in input.chunks(size) {
        let Some(ev) = Event::from_bytes(chunk) else { continue };
        let _ = event_line(&ev);
        let f = names.enrich(&ev, ev.ts_ns);
        conns.observe(&f);
        records.push(f);
    }
    flows_signature(names, &records)
}

/// Envoy's access log as the agent reads it from the spool (JSON lines of
/// `weft_observe::pipeline::accesslog::FORMAT`; a seed is one line, so the
/// structure-aware mutations apply): each line that is an entry becomes
/// request and response flows joined with the datapath's connections, as
/// the pipeline does.
fn accesslog(input: &[u8]) -> u64 {
    let entries: Vec<L7Entry> = input.split(|b| *b == b'\n').filter_map(|l| accesslog::parse(l).ok()).collect();
    if entries.is_empty() {
        return 0;
    }
    let names = names();
    let mut conns = ConnTable::new(64);
    // The connections the seeds' entries ride on, as the datapath saw them.
    for (client, server, backend) in [([10, 0, 1, 5], 40000, [10, 96, 0, 10]), ([10, 0, 1, 5], 40001, [10, 0, 2, 7])] {
        let ev = Event {
            saddr: u32::from_ne_bytes(client),
            sport: u16::to_be(server),
            daddr: u32::from_ne_bytes(backend),
            dport: u16::to_be(80),
            proto: 6,
            ..Default::default()
        };
        conns.observe(&names.enrich(&ev, 1));
    }
    let mut out = Vec::new();
    for e in entries {
        l7_flows(e, &names, &conns, &mut out);
    }
    let records: Vec<FlowRecord> = out
        .into_iter()
        .filter_map(|e| match e {
            Entry::Flow(f) => Some(f),
            _ => None,
        })
        .collect();
    flows_signature(names, &records)
}

/// A flow API request (`GetFlowsRequest`: proto-JSON, else protobuf bytes):
/// checked as the server checks it (filters compiled, regexes, CIDRs, label
/// selectors, times), then its filters run over flows of every kind.
fn flowrequest(input: &[u8]) -> u64 {
    let request: Option<GetFlowsRequest> = decode(weft_flow::json::pool(), "observer.GetFlowsRequest", input);
    let Some(request) = request else { return 0 };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match Query::new(&request) {
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            signature(std::iter::once(status.message().to_owned())).hash(&mut h);
        }
        Ok(_) => {
            let filters = FilterSet::compile(&request.whitelist, &request.blacklist)
                .expect("a request the server accepts has filters that compile");
            let mut names = Names::new("node1");
            names.node_labels = vec!["k8s:zone=a".to_owned()];
            let env = Env { boot_id: 42, names: &Arc::new(names) };
            let records = sample_records();
            let kept: Vec<bool> =
                records.iter().enumerate().map(|(seq, f)| filters.matches(&env, seq as u64, f)).collect();
            kept.hash(&mut h);
        }
    }
    h.finish()
}

/// Flows of every kind for the filters to look at: forwarded, dropped,
/// policy verdicts, translated, and an HTTP request and response.
fn sample_records() -> Vec<FlowRecord> {
    let names = names();
    let client = u32::from_ne_bytes([10, 0, 1, 5]);
    let server = u32::from_ne_bytes([10, 0, 2, 7]);
    let mut records: Vec<FlowRecord> = (0u8..6)
        .map(|t| {
            let ev = Event {
                ts_ns: 1_700_000_000_000_000_000 + u64::from(t),
                r#type: t,
                subtype: t,
                flags: t,
                saddr: client,
                sport: u16::to_be(40000),
                daddr: server,
                dport: u16::to_be(80),
                proto: if t % 2 == 0 { 6 } else { 17 },
                tcp_flags: 0x12,
                rule_id: 7,
                ..Default::default()
            };
            names.enrich(&ev, ev.ts_ns)
        })
        .collect();
    let line = br#"{"method": "GET", "authority": "web", "path": "/api/v1/items?x=1", "code": 503}"#;
    let mut l7 = accesslog::parse(line).expect("an access-log line");
    l7.client = Some(SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, 5), 40000));
    l7.server = Some(SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80));
    let mut out = Vec::new();
    l7_flows(l7, &names, &ConnTable::new(4), &mut out);
    records.extend(out.into_iter().filter_map(|e| match e {
        Entry::Flow(f) => Some(f),
        _ => None,
    }));
    records
}

#[test]
fn fuzz_ringbuf() {
    fuzz::run("ringbuf", &ringbuf, fuzz::budget(Duration::from_secs(10)), Duration::from_secs(30));
}

#[test]
fn fuzz_accesslog() {
    fuzz::run("accesslog", &accesslog, fuzz::budget(Duration::from_secs(10)), Duration::from_secs(30));
}

#[test]
fn fuzz_flowrequest() {
    fuzz::run("flowrequest", &flowrequest, fuzz::budget(Duration::from_secs(10)), Duration::from_secs(30));
}
