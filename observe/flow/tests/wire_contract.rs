//! The compiled descriptors of the flow API checked against the wire-contract
//! sheet (tests/data), number by number: every field and enum value the
//! `hubble` CLI, Relay and UI rely on has the number and type they expect.

use std::collections::BTreeMap;

use prost_reflect::{Cardinality, DescriptorPool, Kind};
use weft_flow::proto;

fn kind_name(k: &Kind) -> String {
    match k {
        Kind::Message(m) => format!("message {}", m.full_name()),
        Kind::Enum(e) => format!("enum {}", e.full_name()),
        Kind::Double => "double".into(),
        Kind::Float => "float".into(),
        Kind::Int32 => "int32".into(),
        Kind::Int64 => "int64".into(),
        Kind::Uint32 => "uint32".into(),
        Kind::Uint64 => "uint64".into(),
        Kind::Sint32 => "sint32".into(),
        Kind::Sint64 => "sint64".into(),
        Kind::Fixed32 => "fixed32".into(),
        Kind::Fixed64 => "fixed64".into(),
        Kind::Sfixed32 => "sfixed32".into(),
        Kind::Sfixed64 => "sfixed64".into(),
        Kind::Bool => "bool".into(),
        Kind::String => "string".into(),
        Kind::Bytes => "bytes".into(),
    }
}

#[test]
fn compiled_descriptors_match_the_wire_contract() {
    let pool = DescriptorPool::decode(proto::DESCRIPTOR_SET).unwrap();
    let sheet = include_str!("data/hubble-wire-contract.tsv");
    let mut checked = 0;
    let mut problems = Vec::new();
    for line in sheet.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let c: Vec<&str> = line.split('\t').collect();
        let (kind, owner, name, number) = (c[0], c[1], c[2], c[3].parse::<u32>().unwrap());
        if kind == "enum" {
            match pool.get_enum_by_name(owner).and_then(|e| e.get_value_by_name(name)) {
                Some(v) if v.number() as u32 == number => checked += 1,
                Some(v) => problems.push(format!("{owner}.{name} = {} (sheet: {number})", v.number())),
                None => problems.push(format!("{owner}.{name} is missing")),
            }
            continue;
        }
        let Some(m) = pool.get_message_by_name(owner) else {
            problems.push(format!("message {owner} is missing"));
            continue;
        };
        let Some(f) = m.get_field_by_name(name) else {
            problems.push(format!("{owner}.{name} is missing"));
            continue;
        };
        if f.number() != number {
            problems.push(format!("{owner}.{name} is #{} (sheet: #{number})", f.number()));
        }
        if kind_name(&f.kind()) != c[4] {
            problems.push(format!("{owner}.{name} is {} (sheet: {})", kind_name(&f.kind()), c[4]));
        }
        let card = match (f.cardinality(), f.containing_oneof()) {
            (Cardinality::Repeated, _) => "repeated".to_string(),
            (_, Some(o)) => format!("oneof `{}`", o.name()),
            _ => "single".into(),
        };
        if card != c[5] {
            problems.push(format!("{owner}.{name} is {card} (sheet: {})", c[5]));
        }
        checked += 1;
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked > 500, "only {checked} rows checked");

    // The Peer service: `/peer.Peer/Notify`, server-streaming.
    let notify = pool.get_service_by_name("peer.Peer").unwrap().methods().find(|m| m.name() == "Notify").unwrap();
    assert_eq!(notify.input().full_name(), "peer.NotifyRequest");
    assert_eq!(notify.output().full_name(), "peer.ChangeNotification");
    assert!(notify.is_server_streaming() && !notify.is_client_streaming());

    // The RPCs: paths, types, streaming.
    let svc = pool.get_service_by_name("observer.Observer").unwrap();
    let methods: BTreeMap<String, (String, String, bool)> = svc
        .methods()
        .map(|m| {
            (
                format!("/{}/{}", svc.full_name(), m.name()),
                (m.input().full_name().to_owned(), m.output().full_name().to_owned(), m.is_server_streaming()),
            )
        })
        .collect();
    for (path, input, output, streaming) in [
        ("/observer.Observer/GetFlows", "observer.GetFlowsRequest", "observer.GetFlowsResponse", true),
        (
            "/observer.Observer/GetAgentEvents",
            "observer.GetAgentEventsRequest",
            "observer.GetAgentEventsResponse",
            true,
        ),
        (
            "/observer.Observer/GetDebugEvents",
            "observer.GetDebugEventsRequest",
            "observer.GetDebugEventsResponse",
            true,
        ),
        ("/observer.Observer/GetNodes", "observer.GetNodesRequest", "observer.GetNodesResponse", false),
        ("/observer.Observer/GetNamespaces", "observer.GetNamespacesRequest", "observer.GetNamespacesResponse", false),
        ("/observer.Observer/ServerStatus", "observer.ServerStatusRequest", "observer.ServerStatusResponse", false),
    ] {
        assert_eq!(methods.get(path), Some(&(input.into(), output.into(), streaming)), "{path}");
    }
    assert!(svc.methods().all(|m| !m.is_client_streaming()));
}
