//! The filter flags of `weft observe` (`--pod`, `--from-label`, `--not
//! --verdict DROPPED`...) turned into Hubble's allow- and deny-lists of
//! `flow.FlowFilter`, as Hubble's CLI builds them, so the same command line
//! selects the same flows from weft's flow API and from any Hubble server.

use weft_flow::{
    json, names,
    proto::flow::{self, FlowFilter, TrafficDirection, Verdict},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Either,
    From,
    To,
}

/// What a filter flag sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Ip,
    Pod,
    Namespace,
    Port,
    Label,
    Service,
    Identity,
    Workload,
    Verdict,
    Protocol,
    Type,
    HttpStatus,
    HttpMethod,
    HttpPath,
    HttpUrl,
    NodeName,
    DropReason,
    Direction,
    TcpFlags,
    Uuid,
    TraceId,
}

/// Filter flags by their long name (and short letter).
fn flag(name: &str) -> Option<(Field, Side)> {
    use Field::*;
    let sided = |n: &str| -> Option<Field> {
        Some(match n {
            "ip" => Ip,
            "pod" => Pod,
            "namespace" => Namespace,
            "port" => Port,
            "label" => Label,
            "service" => Service,
            "identity" => Identity,
            "workload" => Workload,
            _ => return None,
        })
    };
    if let Some(n) = name.strip_prefix("from-") {
        return sided(n).map(|f| (f, Side::From));
    }
    if let Some(n) = name.strip_prefix("to-") {
        return sided(n).map(|f| (f, Side::To));
    }
    let plain = match name {
        "verdict" => Verdict,
        "protocol" => Protocol,
        "type" | "t" => Type,
        "http-status" => HttpStatus,
        "http-method" => HttpMethod,
        "http-path" => HttpPath,
        "http-url" => HttpUrl,
        "node-name" => NodeName,
        "drop-reason-desc" => DropReason,
        "traffic-direction" => Direction,
        "tcp-flags" => TcpFlags,
        "uuid" => Uuid,
        "trace-id" => TraceId,
        "n" => return Some((Namespace, Side::Either)),
        "l" => return Some((Label, Side::Either)),
        n => return sided(n).map(|f| (f, Side::Either)),
    };
    Some((plain, Side::Either))
}

/// The filter flags of a command line in order, each with whether a `--not`
/// came before it.
pub fn ordered_filter_flags(argv: &[String]) -> Vec<(bool, String, String)> {
    let mut out = Vec::new();
    let mut negate = false;
    let mut i = 0;
    while i < argv.len() {
        let a = &argv[i];
        i += 1;
        if a == "--not" {
            negate = true;
            continue;
        }
        let (name, inline) = if let Some(l) = a.strip_prefix("--") {
            match l.split_once('=') {
                Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
                None => (l.to_owned(), None),
            }
        } else if a.len() >= 2 && a.starts_with('-') && !a.starts_with("--") {
            let (n, rest) = a[1..].split_at(1);
            (n.to_owned(), (!rest.is_empty()).then(|| rest.trim_start_matches('=').to_owned()))
        } else {
            continue;
        };
        if flag(&name).is_none() {
            continue;
        }
        let value = match inline {
            Some(v) => v,
            None if i < argv.len() => {
                i += 1;
                argv[i - 1].clone()
            }
            None => continue,
        };
        out.push((negate, name, value));
        negate = false;
    }
    out
}

/// A filter flag or filter JSON of `weft observe` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FilterArgError {
    /// The flag as it was given (`--from-identity`, `-t`), its value, what is wrong.
    #[error("{flag} {value:?}: {problem}")]
    Flag { flag: String, value: String, problem: Problem },
    #[error("filter JSON {json:?}: {error}")]
    NotJson { json: String, error: serde_json::Error },
    #[error("filter JSON {json:?}: {error}")]
    NotAFlowFilter { json: String, error: json::FlowFilterError },
}

/// What is wrong with a filter flag's value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("expected {0}")]
    Expected(&'static str),
    #[error("unknown event type {0:?}")]
    EventType(String),
    #[error("unknown trace point {0:?}")]
    TracePoint(String),
    #[error("unknown drop reason {0:?}")]
    DropReason(String),
    #[error("subtype {0:?} is not a number")]
    Subtype(String),
    #[error("unknown flag {0:?}")]
    TcpFlag(String),
}

fn verdict(v: &str) -> Result<i32, Problem> {
    Verdict::from_str_name(&v.to_ascii_uppercase())
        .map(|v| v as i32)
        .ok_or(Problem::Expected("FORWARDED, DROPPED, ERROR, AUDIT, REDIRECTED, TRACED or TRANSLATED"))
}

fn event_type(v: &str) -> Result<flow::EventTypeFilter, Problem> {
    let (t, sub) = match v.split_once(':') {
        Some((t, s)) => (t, Some(s)),
        None => (v, None),
    };
    let code = names::event_type_code(t).ok_or_else(|| Problem::EventType(t.into()))?;
    let sub_type = match sub {
        None => None,
        Some(s) if code == 4 => {
            Some(names::trace_subtype(s).or_else(|| s.parse().ok()).ok_or_else(|| Problem::TracePoint(s.into()))?)
        }
        Some(s) if code == 1 => Some(
            names::drop_reason_code(s)
                .map(|c| c as i32)
                .or_else(|| s.parse().ok())
                .ok_or_else(|| Problem::DropReason(s.into()))?,
        ),
        Some(s) => Some(s.parse().map_err(|_| Problem::Subtype(s.into()))?),
    };
    Ok(flow::EventTypeFilter { r#type: code, match_sub_type: sub_type.is_some(), sub_type: sub_type.unwrap_or(0) })
}

fn identity(v: &str) -> Result<u32, Problem> {
    (0..=10)
        .find(|n| names::reserved_identity(*n) == Some(v))
        .or_else(|| v.parse().ok())
        .ok_or(Problem::Expected("a number or a reserved name (host, world, remote-node, ...)"))
}

fn workload(v: &str) -> flow::Workload {
    match v.split_once('/') {
        Some((kind, name)) => flow::Workload { kind: kind.into(), name: name.into() },
        None => flow::Workload { kind: String::new(), name: v.into() },
    }
}

fn tcp_flags(v: &str) -> Result<flow::TcpFlags, Problem> {
    let mut f = flow::TcpFlags::default();
    for part in v.split(',') {
        match part.trim().to_ascii_uppercase().as_str() {
            "SYN" => f.syn = true,
            "ACK" => f.ack = true,
            "FIN" => f.fin = true,
            "RST" => f.rst = true,
            "PSH" => f.psh = true,
            "URG" => f.urg = true,
            "ECE" => f.ece = true,
            "CWR" => f.cwr = true,
            "NS" => f.ns = true,
            other => return Err(Problem::TcpFlag(other.into())),
        }
    }
    Ok(f)
}

/// Two FlowFilters built as Hubble's CLI builds them (section 5.2 of the
/// wire contract): "either end" flags put the source field in the first and
/// the destination field in the second; everything else goes in both.
#[derive(Default)]
struct Pair {
    a: FlowFilter,
    b: FlowFilter,
    ns: [Vec<String>; 3],
}

impl Pair {
    fn set(&mut self, field: Field, side: Side, v: &str) -> Result<(), Problem> {
        use Field::*;
        macro_rules! sided {
            ($src:ident, $dst:ident, $val:expr) => {{
                let val = $val;
                match side {
                    Side::Either => {
                        self.a.$src.push(val.clone());
                        self.b.$dst.push(val);
                    }
                    Side::From => {
                        self.a.$src.push(val.clone());
                        self.b.$src.push(val);
                    }
                    Side::To => {
                        self.a.$dst.push(val.clone());
                        self.b.$dst.push(val);
                    }
                }
            }};
        }
        macro_rules! both {
            ($f:ident, $val:expr) => {{
                let val = $val;
                self.a.$f.push(val.clone());
                self.b.$f.push(val);
            }};
        }
        match field {
            Ip => sided!(source_ip, destination_ip, v.to_owned()),
            Pod => sided!(source_pod, destination_pod, v.to_owned()),
            Port => sided!(source_port, destination_port, v.to_owned()),
            Label => sided!(source_label, destination_label, v.to_owned()),
            Service => sided!(source_service, destination_service, v.to_owned()),
            Identity => sided!(source_identity, destination_identity, identity(v)?),
            Workload => sided!(source_workload, destination_workload, workload(v)),
            Namespace => self.ns[side as usize].push(v.to_owned()),
            Verdict => both!(verdict, verdict(v)?),
            Protocol => both!(protocol, v.to_owned()),
            Type => both!(event_type, event_type(v)?),
            HttpStatus => both!(http_status_code, v.to_owned()),
            HttpMethod => both!(http_method, v.to_owned()),
            HttpPath => both!(http_path, v.to_owned()),
            HttpUrl => both!(http_url, v.to_owned()),
            NodeName => both!(node_name, v.to_owned()),
            DropReason => {
                both!(drop_reason_desc, names::drop_reason_code(v).ok_or_else(|| Problem::DropReason(v.into()))? as i32)
            }
            Direction => both!(
                traffic_direction,
                names::direction_by_name(v)
                    .filter(|d| *d != TrafficDirection::Unknown)
                    .ok_or(Problem::Expected("ingress or egress"))? as i32
            ),
            TcpFlags => both!(tcp_flags, tcp_flags(v)?),
            Uuid => both!(uuid, v.to_owned()),
            TraceId => both!(trace_id, v.to_owned()),
        }
        Ok(())
    }

    /// Namespaces qualify pod and service names that have none; with no pod
    /// or service flag at all, they select the whole namespace.
    fn apply_namespaces(&mut self) {
        fn lists(f: &mut FlowFilter, source: bool) -> [&mut Vec<String>; 2] {
            if source {
                [&mut f.source_pod, &mut f.source_service]
            } else {
                [&mut f.destination_pod, &mut f.destination_service]
            }
        }
        fn qualify(list: &mut Vec<String>, namespaces: &[String]) {
            for v in std::mem::take(list) {
                if v.contains('/') {
                    list.push(v);
                } else {
                    list.extend(namespaces.iter().map(|n| format!("{n}/{v}")));
                }
            }
        }
        let [either, from, to] = std::mem::take(&mut self.ns);
        let named = |f: &FlowFilter, source: bool| {
            if source {
                !f.source_pod.is_empty() || !f.source_service.is_empty()
            } else {
                !f.destination_pod.is_empty() || !f.destination_service.is_empty()
            }
        };
        if !either.is_empty() {
            let any = [true, false].iter().any(|s| named(&self.a, *s) || named(&self.b, *s));
            if any {
                for f in [&mut self.a, &mut self.b] {
                    for side in [true, false] {
                        for l in lists(f, side) {
                            qualify(l, &either);
                        }
                    }
                }
            } else {
                self.a.source_pod.extend(either.iter().map(|n| format!("{n}/")));
                self.b.destination_pod.extend(either.iter().map(|n| format!("{n}/")));
            }
        }
        for (list, source) in [(from, true), (to, false)] {
            if list.is_empty() {
                continue;
            }
            let any = named(&self.a, source) || named(&self.b, source);
            for f in [&mut self.a, &mut self.b] {
                if any {
                    for l in lists(f, source) {
                        qualify(l, &list);
                    }
                } else {
                    lists(f, source)[0].extend(list.iter().map(|n| format!("{n}/")));
                }
            }
        }
    }

    fn finish(mut self) -> Vec<FlowFilter> {
        self.apply_namespaces();
        if self.a == FlowFilter::default() && self.b == FlowFilter::default() {
            return Vec::new();
        }
        if self.a == self.b { vec![self.a] } else { vec![self.a, self.b] }
    }
}

/// The allow- and deny-lists of a command line.
pub fn build_filters(
    argv: &[String],
    allow_json: &[String],
    deny_json: &[String],
) -> Result<(Vec<FlowFilter>, Vec<FlowFilter>), FilterArgError> {
    let (mut allow, mut deny) = (Pair::default(), Pair::default());
    for (negate, name, value) in ordered_filter_flags(argv) {
        let (field, side) = flag(&name).expect("only known flags are returned");
        let pair = if negate { &mut deny } else { &mut allow };
        pair.set(field, side, &value).map_err(|problem| FilterArgError::Flag {
            flag: if name.len() == 1 { format!("-{name}") } else { format!("--{name}") },
            value,
            problem,
        })?;
    }
    let (mut allow, mut deny) = (allow.finish(), deny.finish());
    let json = |s: &String| {
        let v: serde_json::Value =
            serde_json::from_str(s).map_err(|error| FilterArgError::NotJson { json: s.clone(), error })?;
        json::flow_filter(&v).map_err(|error| FilterArgError::NotAFlowFilter { json: s.clone(), error })
    };
    for s in allow_json {
        allow.push(json(s)?);
    }
    for s in deny_json {
        deny.push(json(s)?);
    }
    Ok((allow, deny))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn filters_follow_hubbles_rules() {
        // The sheet's example: --pod shop/frontend --protocol http --not --verdict DROPPED
        let a = argv("weft observe --pod shop/frontend --protocol http --not --verdict DROPPED");
        let (allow, deny) = build_filters(&a, &[], &[]).unwrap();
        assert_eq!(allow.len(), 2);
        assert_eq!(allow[0].source_pod, ["shop/frontend"]);
        assert_eq!(allow[0].protocol, ["http"]);
        assert_eq!(allow[1].destination_pod, ["shop/frontend"]);
        assert_eq!(allow[1].protocol, ["http"]);
        assert_eq!(deny, [FlowFilter { verdict: vec![Verdict::Dropped as i32], ..Default::default() }]);

        // Directional and plain flags go into one filter.
        let (allow, _) = build_filters(&argv("--from-pod a --to-port=80 -t trace:to-endpoint"), &[], &[]).unwrap();
        assert_eq!(allow.len(), 1);
        assert_eq!(allow[0].source_pod, ["a"]);
        assert_eq!(allow[0].destination_port, ["80"]);
        assert_eq!(allow[0].event_type, [flow::EventTypeFilter { r#type: 4, match_sub_type: true, sub_type: 0 }]);

        // A namespace alone selects it on either end; with a pod, qualifies it.
        let (allow, _) = build_filters(&argv("-n shop"), &[], &[]).unwrap();
        assert_eq!(
            (allow[0].source_pod.clone(), allow[1].destination_pod.clone()),
            (vec!["shop/".to_string()], vec!["shop/".to_string()])
        );
        let (allow, _) = build_filters(&argv("--namespace shop --from-pod web"), &[], &[]).unwrap();
        assert!(allow.iter().all(|f| f.source_pod == ["shop/web"]), "{allow:?}");

        assert!(build_filters(&argv("--verdict SOMETIMES"), &[], &[]).unwrap_err().to_string().contains("--verdict"));
        let (allow, deny) =
            build_filters(&[], &[r#"{"http_method":["GET"]}"#.into()], &[r#"{"verdict":["DROPPED"]}"#.into()]).unwrap();
        assert_eq!((allow[0].http_method.clone(), deny[0].verdict.clone()), (vec!["GET".to_string()], vec![2]));
    }

    /// Errors name the flag as it was given, its value and what is wrong.
    #[test]
    fn errors_name_the_flag_as_given() {
        let err = |s: &str| build_filters(&argv(s), &[], &[]).unwrap_err();
        let e = err("--not --from-identity nobody");
        assert!(
            matches!(&e, FilterArgError::Flag { flag, value, problem: Problem::Expected(_) }
                if flag == "--from-identity" && value == "nobody"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            r#"--from-identity "nobody": expected a number or a reserved name (host, world, remote-node, ...)"#
        );
        assert_eq!(err("-t trace:nowhere").to_string(), r#"-t "trace:nowhere": unknown trace point "nowhere""#);
        assert_eq!(err("--tcp-flags SYN,BOGUS").to_string(), r#"--tcp-flags "SYN,BOGUS": unknown flag "BOGUS""#);
        let e = build_filters(&[], &[r#"{"verdikt":[]}"#.into()], &[]).unwrap_err();
        assert!(matches!(e, FilterArgError::NotAFlowFilter { .. }), "{e:?}");
        assert!(e.to_string().starts_with(r#"filter JSON "{\"verdikt\":[]}": not a FlowFilter: "#), "{e}");
        let e = build_filters(&[], &[], &["{".into()]).unwrap_err();
        assert!(matches!(e, FilterArgError::NotJson { .. }), "{e:?}");
    }
}
