//! Hubble's flow filters (`flow.FlowFilter`), compiled once per request and
//! evaluated on flow records as the store holds them, without building the
//! wire format. Inside one filter every populated field must match; inside
//! one field any value may; a request keeps a flow that matches some
//! allow-list filter (or there are none) and no deny-list filter.
//!
//! A request is bounded before anything is compiled ([`check_bounds`]: [`MAX_FILTERS`],
//! [`MAX_REGEXES`], [`MAX_REGEX_BYTES`]) and each regular expression is
//! compiled within [`REGEX_SIZE_LIMIT`] (its program) and
//! [`REGEX_DFA_SIZE_LIMIT`] (its lazy DFA's cache): what a client may ask
//! costs the agent a known amount of memory per stream, and matching stays
//! linear in the text (the `regex` crate has no backtracking).

use std::{net::Ipv4Addr, sync::Arc};

use regex::{Regex, RegexBuilder};

use weft_flow::proto::flow::{self, FlowFilter, Verdict};

use super::{
    cel::{CelError, CelFilter},
    convert,
};
use crate::pipeline::{
    enrich::Names,
    record::{EV_L7, FlowRecord, L7_RESPONSE},
};

/// Filters per list (allow list, deny list) of one request.
pub const MAX_FILTERS: usize = 64;
/// Regular expressions (`http_path`, `http_url`) in one request, all filters together.
pub const MAX_REGEXES: usize = 64;
/// Length of one regular expression's source.
pub const MAX_REGEX_BYTES: usize = 1024;
/// Size of one compiled regular expression.
pub const REGEX_SIZE_LIMIT: usize = 256 << 10;
/// Size of one regular expression's lazy DFA cache.
pub const REGEX_DFA_SIZE_LIMIT: usize = 256 << 10;

/// Compiles a client's regular expression within the limits above; the
/// error names the field and the value.
fn regex(field: &'static str, s: &str) -> Result<Regex, FilterError> {
    if s.len() > MAX_REGEX_BYTES {
        return Err(FilterError::RegexTooLong { field, bytes: s.len() });
    }
    RegexBuilder::new(s).size_limit(REGEX_SIZE_LIMIT).dfa_size_limit(REGEX_DFA_SIZE_LIMIT).build().map_err(|error| {
        match error {
            regex::Error::CompiledTooBig(limit) => FilterError::RegexTooBig { field, value: s.to_owned(), limit },
            error => FilterError::Regex { field, value: s.to_owned(), error },
        }
    })
}

/// A request that asks more than any request may, whatever its filters say.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestTooLarge {
    #[error("{list}: {count} filters, at most {MAX_FILTERS} are allowed")]
    Filters { list: &'static str, count: usize },
    #[error(
        "{count} regular or CEL expressions (http_path, http_url, experimental.cel_expression) in one request, at most {MAX_REGEXES} are allowed"
    )]
    Regexes { count: usize },
}

/// Checks a request's allow- and deny-lists against [`MAX_FILTERS`] and
/// [`MAX_REGEXES`], before anything is compiled.
pub fn check_bounds(allow: &[FlowFilter], deny: &[FlowFilter]) -> Result<(), RequestTooLarge> {
    for (list, l) in [("whitelist", allow), ("blacklist", deny)] {
        if l.len() > MAX_FILTERS {
            return Err(RequestTooLarge::Filters { list, count: l.len() });
        }
    }
    let count: usize =
        allow.iter().chain(deny).map(|f| f.http_path.len() + f.http_url.len() + cel_expressions(f).len()).sum();
    if count > MAX_REGEXES {
        return Err(RequestTooLarge::Regexes { count });
    }
    Ok(())
}

/// Facts about the server a filter may ask about: its start, and its names
/// (node, labels, cluster; and everything a CEL filter's `_flow` shows).
pub struct Env<'a> {
    pub boot_id: u64,
    pub names: &'a Arc<Names>,
}

fn cel_expressions(f: &FlowFilter) -> &[String] {
    f.experimental.as_ref().map_or(&[], |e| e.cel_expression.as_slice())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Src,
    Dst,
}

#[derive(Debug, Clone)]
struct Cidr {
    net: u32,
    mask: u32,
}

impl Cidr {
    fn parse(s: &str) -> Option<Cidr> {
        let (a, len) = match s.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().ok().filter(|l| *l <= 32)?),
            None => (s, 32),
        };
        let addr: Ipv4Addr = a.parse().ok()?;
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Some(Cidr { net: u32::from(addr) & mask, mask })
    }
    fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask == self.net
    }
}

/// `ns/prefix` pod or service names.
#[derive(Debug, Clone)]
struct NamePrefix {
    namespace: Option<String>,
    prefix: String,
}

impl NamePrefix {
    fn parse(s: &str) -> Option<NamePrefix> {
        if s.is_empty() {
            return None;
        }
        Some(match s.split_once('/') {
            Some(("", name)) => NamePrefix { namespace: None, prefix: name.into() },
            Some((ns, name)) => NamePrefix { namespace: Some(ns.into()), prefix: name.into() },
            None => NamePrefix { namespace: Some("default".into()), prefix: s.into() },
        })
    }
    fn matches(&self, ns: &str, name: &str) -> bool {
        !name.is_empty() && self.namespace.as_deref().is_none_or(|n| n == ns) && name.starts_with(&self.prefix)
    }
}

/// One requirement of a label selector.
#[derive(Debug, Clone)]
enum Req {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A Kubernetes label selector over `source:key=value` labels; a key without
/// a source (`app`) matches that key from any source.
#[derive(Debug, Clone)]
pub struct Selector(Vec<Req>);

fn split_top(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn set_values(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}

/// A label selector (`a=b,c in (x,y)`) that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("empty requirement in label selector {0:?}")]
    EmptyRequirement(String),
    #[error("bad value set in {0:?}")]
    ValueSet(String),
    #[error("cannot read requirement {requirement:?} of label selector {selector:?}")]
    Requirement { requirement: String, selector: String },
}

impl Selector {
    /// Parses `a=b,c!=d,e in (x,y),f notin (z),g,!h`.
    pub fn parse(s: &str) -> Result<Selector, SelectorError> {
        let mut reqs = Vec::new();
        for part in split_top(s) {
            let p = part.trim();
            if p.is_empty() {
                return Err(SelectorError::EmptyRequirement(s.into()));
            }
            let req = if let Some(k) = p.strip_prefix('!') {
                Req::NotExists(k.trim().into())
            } else if let Some((k, v)) = p.split_once("!=") {
                Req::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                Req::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = p.split_once(" notin ") {
                Req::NotIn(k.trim().into(), set_values(v).ok_or_else(|| SelectorError::ValueSet(p.into()))?)
            } else if let Some((k, v)) = p.split_once(" in ") {
                Req::In(k.trim().into(), set_values(v).ok_or_else(|| SelectorError::ValueSet(p.into()))?)
            } else if p.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c)) {
                Req::Exists(p.into())
            } else {
                return Err(SelectorError::Requirement { requirement: p.into(), selector: s.into() });
            };
            reqs.push(req);
        }
        Ok(Selector(reqs))
    }

    fn value<'a>(labels: &'a [String], key: &str) -> Option<&'a str> {
        let with_source = key.contains(':');
        labels.iter().find_map(|l| {
            let (k, v) = l.split_once('=').unwrap_or((l, ""));
            let k = if with_source { k } else { k.split_once(':').map_or(k, |(_, k)| k) };
            (k == key).then_some(v)
        })
    }

    pub fn matches(&self, labels: &[String]) -> bool {
        self.matches_by(|k| Self::value(labels, k))
    }

    /// Whether labels, given as a lookup of a key's value, satisfy it
    /// (a Kubernetes object's `metadata.labels`, say).
    pub fn matches_by<'a>(&self, value: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => value(k) == Some(v.as_str()),
            Req::NotEq(k, v) => value(k) != Some(v.as_str()),
            Req::In(k, vs) => value(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::NotIn(k, vs) => !value(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Req::Exists(k) => value(k).is_some(),
            Req::NotExists(k) => value(k).is_none(),
        })
    }
}

/// `*` globs, whole-string.
fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let mut rest = s;
    for (i, p) in parts.iter().enumerate() {
        if i == 0 {
            let Some(r) = rest.strip_prefix(p) else { return false };
            rest = r;
        } else if i == parts.len() - 1 {
            return rest.ends_with(p);
        } else {
            let Some(at) = rest.find(p) else { return false };
            rest = &rest[at + p.len()..];
        }
    }
    true
}

#[derive(Debug, Clone)]
enum Check {
    Ip(Side, Vec<Cidr>),
    XlatedIp(Vec<Cidr>),
    Pod(Side, Vec<NamePrefix>),
    Service(Side, Vec<NamePrefix>),
    Label(Side, Vec<Selector>),
    Identity(Side, Vec<u32>),
    Workload(Side, Vec<(String, String)>),
    Port(Side, Vec<u16>),
    Cluster(Side, Vec<String>),
    Verdict(Vec<i32>),
    EventType(Vec<flow::EventTypeFilter>),
    Protocol(Vec<String>),
    Reply(Vec<bool>),
    Direction(Vec<i32>),
    DropReason(Vec<i32>),
    HttpStatus(Vec<(u32, u32)>),
    HttpMethod(Vec<String>),
    HttpPath(Vec<Regex>),
    HttpUrl(Vec<Regex>),
    HttpHeader(Vec<(String, String)>),
    TraceId(Vec<String>),
    Uuid(Vec<String>),
    TcpFlags(Vec<u8>),
    NodeName(Vec<String>),
    NodeLabels(Vec<Selector>),
    IpVersion(Vec<i32>),
    Interface(Vec<(u32, String)>),
    Encrypted(Vec<bool>),
    /// CEL expressions over the flow as the API sends it.
    Cel(Arc<CelFilter>),
    /// Asks about data weft never has (DNS names, IP trace ids): matches nothing.
    Never,
}

/// One compiled FlowFilter.
#[derive(Debug, Clone, Default)]
pub struct Filter(Vec<Check>);

/// A FlowFilter that cannot be compiled: the field, and what is wrong with it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FilterError {
    #[error("{field}: {value:?} is not {expected}")]
    Value { field: &'static str, value: String, expected: &'static str },
    #[error("{field}: {value:?} is not a regular expression: {error}")]
    Regex { field: &'static str, value: String, error: regex::Error },
    #[error("{field}: a regular expression of {bytes} bytes is longer than {MAX_REGEX_BYTES}")]
    RegexTooLong { field: &'static str, bytes: usize },
    #[error("{field}: {value:?} compiles to more than the {limit} bytes a regular expression may take")]
    RegexTooBig { field: &'static str, value: String, limit: usize },
    #[error("{field}: {error}")]
    Selector { field: &'static str, error: SelectorError },
    #[error("node_name: an empty pattern")]
    EmptyNodeName,
    #[error("experimental.cel_expression: {0}")]
    Cel(CelError),
    #[error("http_* filters need event type l7 (129) among event_type")]
    HttpNeedsL7,
}

impl FilterError {
    /// Whether the filter is refused for its size rather than its meaning.
    pub fn over_limit(&self) -> bool {
        matches!(self, FilterError::RegexTooLong { .. } | FilterError::RegexTooBig { .. })
    }
}

/// A FlowFilter of a request's allow- or deny-list that cannot be compiled:
/// `whitelist[1].source_ip: ...`.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{list}[{index}].{error}")]
pub struct FilterListError {
    /// `whitelist` or `blacklist` (the request's field names).
    pub list: &'static str,
    pub index: usize,
    pub error: FilterError,
}

fn each<T>(
    field: &'static str,
    vals: &[String],
    parse: impl Fn(&str) -> Option<T>,
    expected: &'static str,
) -> Result<Vec<T>, FilterError> {
    vals.iter().map(|v| parse(v).ok_or_else(|| FilterError::Value { field, value: v.clone(), expected })).collect()
}

fn ifindex(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else { return 0 };
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

impl Filter {
    /// Compiles a FlowFilter; errors name the field and the value.
    pub fn compile(f: &FlowFilter) -> Result<Filter, FilterError> {
        let mut c = Vec::new();
        let mut push = |check: Check, present: bool| {
            if present {
                c.push(check)
            }
        };
        let ips = |field, v: &[String]| each(field, v, Cidr::parse, "an IPv4 address or CIDR");
        let names = |field, v: &[String]| each(field, v, NamePrefix::parse, "a [namespace/]name");
        let sels = |field, v: &[String]| {
            v.iter()
                .map(|s| Selector::parse(s).map_err(|error| FilterError::Selector { field, error }))
                .collect::<Result<Vec<_>, _>>()
        };
        let ports = |field, v: &[String]| each(field, v, |s| s.parse::<u16>().ok(), "a port number");
        let regexes = |field, v: &[String]| v.iter().map(|s| regex(field, s)).collect::<Result<Vec<_>, _>>();
        let workloads = |v: &[flow::Workload]| v.iter().map(|w| (w.kind.clone(), w.name.clone())).collect::<Vec<_>>();

        push(Check::Ip(Side::Src, ips("source_ip", &f.source_ip)?), !f.source_ip.is_empty());
        push(Check::Ip(Side::Dst, ips("destination_ip", &f.destination_ip)?), !f.destination_ip.is_empty());
        push(Check::XlatedIp(ips("source_ip_xlated", &f.source_ip_xlated)?), !f.source_ip_xlated.is_empty());
        push(Check::Pod(Side::Src, names("source_pod", &f.source_pod)?), !f.source_pod.is_empty());
        push(Check::Pod(Side::Dst, names("destination_pod", &f.destination_pod)?), !f.destination_pod.is_empty());
        push(Check::Service(Side::Src, names("source_service", &f.source_service)?), !f.source_service.is_empty());
        push(
            Check::Service(Side::Dst, names("destination_service", &f.destination_service)?),
            !f.destination_service.is_empty(),
        );
        push(Check::Label(Side::Src, sels("source_label", &f.source_label)?), !f.source_label.is_empty());
        push(
            Check::Label(Side::Dst, sels("destination_label", &f.destination_label)?),
            !f.destination_label.is_empty(),
        );
        push(Check::Identity(Side::Src, f.source_identity.clone()), !f.source_identity.is_empty());
        push(Check::Identity(Side::Dst, f.destination_identity.clone()), !f.destination_identity.is_empty());
        push(Check::Workload(Side::Src, workloads(&f.source_workload)), !f.source_workload.is_empty());
        push(Check::Workload(Side::Dst, workloads(&f.destination_workload)), !f.destination_workload.is_empty());
        push(Check::Port(Side::Src, ports("source_port", &f.source_port)?), !f.source_port.is_empty());
        push(Check::Port(Side::Dst, ports("destination_port", &f.destination_port)?), !f.destination_port.is_empty());
        push(Check::Cluster(Side::Src, f.source_cluster_name.clone()), !f.source_cluster_name.is_empty());
        push(Check::Cluster(Side::Dst, f.destination_cluster_name.clone()), !f.destination_cluster_name.is_empty());
        push(Check::Verdict(f.verdict.clone()), !f.verdict.is_empty());
        push(Check::EventType(f.event_type.clone()), !f.event_type.is_empty());
        let protocols = f.protocol.iter().map(|p| p.to_ascii_lowercase()).collect::<Vec<_>>();
        for p in &protocols {
            if !["tcp", "udp", "sctp", "icmp", "icmpv4", "icmpv6", "vrrp", "igmp", "dns", "http", "kafka"]
                .contains(&p.as_str())
            {
                return Err(FilterError::Value {
                    field: "protocol",
                    value: p.clone(),
                    expected: "a protocol (tcp, udp, sctp, icmp, icmpv4, icmpv6, http, dns, kafka)",
                });
            }
        }
        push(Check::Protocol(protocols), !f.protocol.is_empty());
        push(Check::Reply(f.reply.clone()), !f.reply.is_empty());
        push(Check::Direction(f.traffic_direction.clone()), !f.traffic_direction.is_empty());
        push(Check::DropReason(f.drop_reason_desc.clone()), !f.drop_reason_desc.is_empty());
        let statuses = each(
            "http_status_code",
            &f.http_status_code,
            |s| {
                // "404" exactly, or "4+" / "40+": every code with that prefix.
                if let Some(prefix) = s.strip_suffix('+') {
                    let p: u32 = prefix.parse().ok().filter(|_| (1..=2).contains(&prefix.len()))?;
                    let scale = 10u32.pow(3 - prefix.len() as u32);
                    Some((p * scale, p * scale + scale - 1))
                } else {
                    let code: u32 = s.parse().ok().filter(|c| (100..=599).contains(c))?;
                    Some((code, code))
                }
            },
            "a status code (404) or class (4+, 40+)",
        )?;
        push(Check::HttpStatus(statuses), !f.http_status_code.is_empty());
        push(
            Check::HttpMethod(f.http_method.iter().map(|m| m.to_ascii_uppercase()).collect()),
            !f.http_method.is_empty(),
        );
        push(Check::HttpPath(regexes("http_path", &f.http_path)?), !f.http_path.is_empty());
        push(Check::HttpUrl(regexes("http_url", &f.http_url)?), !f.http_url.is_empty());
        push(
            Check::HttpHeader(f.http_header.iter().map(|h| (h.key.to_ascii_lowercase(), h.value.clone())).collect()),
            !f.http_header.is_empty(),
        );
        push(Check::TraceId(f.trace_id.clone()), !f.trace_id.is_empty());
        push(Check::Uuid(f.uuid.clone()), !f.uuid.is_empty());
        push(
            Check::TcpFlags(
                f.tcp_flags
                    .iter()
                    .map(|t| {
                        [t.fin, t.syn, t.rst, t.psh, t.ack, t.urg, t.ece, t.cwr]
                            .iter()
                            .enumerate()
                            .fold(0u8, |acc, (i, on)| if *on { acc | 1 << i } else { acc })
                    })
                    .collect(),
            ),
            !f.tcp_flags.is_empty(),
        );
        for n in &f.node_name {
            if n.is_empty() {
                return Err(FilterError::EmptyNodeName);
            }
        }
        push(Check::NodeName(f.node_name.clone()), !f.node_name.is_empty());
        push(Check::NodeLabels(sels("node_labels", &f.node_labels)?), !f.node_labels.is_empty());
        push(Check::IpVersion(f.ip_version.clone()), !f.ip_version.is_empty());
        push(
            Check::Interface(
                f.interface
                    .iter()
                    .map(|i| (if i.index == 0 { ifindex(&i.name) } else { i.index }, i.name.clone()))
                    .collect(),
            ),
            !f.interface.is_empty(),
        );
        push(Check::Encrypted(f.encrypted.clone()), !f.encrypted.is_empty());
        let never = !f.source_fqdn.is_empty()
            || !f.destination_fqdn.is_empty()
            || !f.dns_query.is_empty()
            || !f.ip_trace_id.is_empty();
        push(Check::Never, never);
        let cel = cel_expressions(f);
        if !cel.is_empty() {
            c.push(Check::Cel(Arc::new(CelFilter::compile(cel).map_err(FilterError::Cel)?)));
        }
        let http = !f.http_status_code.is_empty()
            || !f.http_method.is_empty()
            || !f.http_path.is_empty()
            || !f.http_url.is_empty()
            || !f.http_header.is_empty();
        if http && !f.event_type.is_empty() && !f.event_type.iter().any(|t| t.r#type == EV_L7 as i32) {
            return Err(FilterError::HttpNeedsL7);
        }
        Ok(Filter(c))
    }

    /// Does flow `seq` match every check?
    pub fn matches(&self, env: &Env<'_>, seq: u64, f: &FlowRecord) -> bool {
        self.0.iter().all(|c| check(c, env, seq, f))
    }
}

fn side_ip(f: &FlowRecord, s: Side) -> Ipv4Addr {
    *match s {
        Side::Src => f.ev.src(),
        Side::Dst => f.ev.dst(),
    }
    .ip()
}

fn check(c: &Check, env: &Env<'_>, seq: u64, f: &FlowRecord) -> bool {
    let ep = |s: Side| match s {
        Side::Src => f.src.as_deref(),
        Side::Dst => f.dst.as_deref(),
    };
    let svc = |s: Side| match s {
        Side::Src => f.src_svc.as_deref(),
        Side::Dst => f.dst_svc.as_deref(),
    };
    let identity = |s: Side| {
        let raw = match s {
            Side::Src => f.ev.src_identity,
            Side::Dst => f.ev.dst_identity,
        };
        if raw != 0 { raw } else { ep(s).map(|e| e.identity).unwrap_or(0) }
    };
    let http = f.http.as_deref();
    match c {
        Check::Ip(s, cidrs) => cidrs.iter().any(|c| c.contains(side_ip(f, *s))),
        Check::XlatedIp(cidrs) => f.translated_source().is_some_and(|a| cidrs.iter().any(|c| c.contains(*a.ip()))),
        Check::Pod(s, ps) => ep(*s).is_some_and(|e| ps.iter().any(|p| p.matches(&e.namespace, &e.pod))),
        Check::Service(s, ps) => svc(*s).is_some_and(|v| ps.iter().any(|p| p.matches(&v.namespace, &v.name))),
        Check::Label(s, sels) => ep(*s).is_some_and(|e| sels.iter().any(|sel| sel.matches(&e.labels))),
        Check::Identity(s, ids) => ids.contains(&identity(*s)),
        Check::Workload(s, ws) => ep(*s).is_some_and(|e| {
            ws.iter().any(|(kind, name)| {
                e.workloads.iter().any(|(k, n)| (kind.is_empty() || kind == k) && (name.is_empty() || name == n))
            })
        }),
        Check::Port(s, ports) => {
            f.has_ports() && {
                let p = match s {
                    Side::Src => f.ev.src().port(),
                    Side::Dst => f.ev.dst().port(),
                };
                ports.contains(&p)
            }
        }
        Check::Cluster(s, names) => {
            ep(*s).is_some_and(|e| !e.pod.is_empty() && names.iter().any(|n| *n == env.names.cluster))
        }
        Check::Verdict(vs) => vs.contains(&(f.verdict() as i32)),
        Check::EventType(ts) => {
            let (t, sub) = f.event_type();
            ts.iter().any(|e| (e.r#type == 0 || e.r#type == t) && (!e.match_sub_type || e.sub_type == sub))
        }
        Check::Protocol(ps) => ps.iter().any(|p| match p.as_str() {
            "http" => http.is_some(),
            "dns" | "kafka" | "icmpv6" | "vrrp" | "igmp" => false,
            "tcp" => f.ev.proto == 6 && !f.is_l7(),
            "udp" => f.ev.proto == 17,
            "sctp" => f.ev.proto == 132,
            _ => f.ev.proto == 1,
        }),
        Check::Reply(rs) => {
            let r = match f.is_reply() {
                Some(r) => r,
                None if f.verdict() == Verdict::Dropped => false,
                None => return false,
            };
            rs.contains(&r)
        }
        Check::Direction(ds) => ds.contains(&(f.direction() as i32)),
        Check::DropReason(rs) => f.verdict() == Verdict::Dropped && rs.contains(&(f.drop_reason() as i32)),
        Check::HttpStatus(ranges) => http.is_some_and(|h| {
            f.ev.subtype == L7_RESPONSE && h.code != 0 && ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&h.code))
        }),
        Check::HttpMethod(ms) => http.is_some_and(|h| ms.iter().any(|m| m.eq_ignore_ascii_case(&h.method))),
        Check::HttpPath(res) => http.is_some_and(|h| {
            let path = h.path.split(['?', '#']).next().unwrap_or("");
            res.iter().any(|r| r.is_match(path))
        }),
        Check::HttpUrl(res) => http.is_some_and(|h| {
            let url = h.url();
            res.iter().any(|r| r.is_match(&url))
        }),
        Check::HttpHeader(hs) => http.is_some_and(|h| {
            hs.iter().any(|(k, v)| match k.as_str() {
                "x-request-id" => &h.request_id == v,
                "traceparent" => &h.traceparent == v,
                "tracestate" => &h.tracestate == v,
                "user-agent" => &h.user_agent == v,
                _ => false,
            })
        }),
        Check::TraceId(ids) => http.and_then(|h| h.trace_id()).is_some_and(|t| ids.iter().any(|i| i == t)),
        Check::Uuid(us) => us.iter().any(|u| convert::seq_of_uuid(env.boot_id, u) == Some(seq)),
        Check::TcpFlags(fs) => f.ev.proto == 6 && !f.is_l7() && fs.iter().any(|want| f.ev.tcp_flags & want == *want),
        Check::NodeName(pats) => {
            let full = format!("{}/{}", env.names.cluster, env.names.node_name);
            pats.iter().any(|p| if p.contains('/') { glob(p, &full) } else { glob(p, &env.names.node_name) })
        }
        Check::NodeLabels(sels) => sels.iter().any(|s| s.matches(&env.names.node_labels)),
        Check::IpVersion(vs) => vs.contains(&(flow::IpVersion::IPv4 as i32)),
        Check::Interface(is) => {
            f.ev.ifindex != 0 && is.iter().any(|(idx, name)| *idx == f.ev.ifindex || (*idx == 0 && name.is_empty()))
        }
        Check::Encrypted(es) => es.contains(&false),
        Check::Cel(cel) => {
            let ctx = convert::Context::new(env.names.clone(), env.boot_id, false);
            cel.matches(&convert::to_flow(&ctx, seq, f))
        }
        Check::Never => false,
    }
}

/// A request's allow- and deny-lists.
#[derive(Debug, Clone, Default)]
pub struct FilterSet {
    allow: Vec<Filter>,
    deny: Vec<Filter>,
}

impl FilterSet {
    /// Compiles both lists; the error names the list, the entry and the field.
    pub fn compile(allow: &[FlowFilter], deny: &[FlowFilter]) -> Result<FilterSet, FilterListError> {
        let list = |list, l: &[FlowFilter]| {
            l.iter()
                .enumerate()
                .map(|(index, f)| Filter::compile(f).map_err(|error| FilterListError { list, index, error }))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(FilterSet { allow: list("whitelist", allow)?, deny: list("blacklist", deny)? })
    }

    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    pub fn matches(&self, env: &Env<'_>, seq: u64, f: &FlowRecord) -> bool {
        (self.allow.is_empty() || self.allow.iter().any(|a| a.matches(env, seq, f)))
            && !self.deny.iter().any(|d| d.matches(env, seq, f))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use weft_ebpf::abi;

    use super::*;
    use crate::pipeline::record::{EndpointInfo, ServiceInfo};

    fn env() -> Env<'static> {
        static NAMES: std::sync::LazyLock<Arc<Names>> = std::sync::LazyLock::new(|| Arc::new(Names::new("node-a")));
        Env { boot_id: 7, names: &NAMES }
    }

    fn rec(src: &str, dst: &str, sport: u16, dport: u16) -> FlowRecord {
        let raw = |s: &str| u32::from_ne_bytes(s.parse::<Ipv4Addr>().unwrap().octets());
        FlowRecord {
            ev: weft_ebpf::abi::Event {
                r#type: abi::EV_TRACE as u8,
                subtype: abi::OBS_TO_ENDPOINT as u8,
                saddr: raw(src),
                daddr: raw(dst),
                sport: sport.to_be(),
                dport: dport.to_be(),
                proto: 6,
                tcp_flags: 0x02,
                ..Default::default()
            },
            src: Some(Arc::new(EndpointInfo {
                namespace: "shop".into(),
                pod: "frontend-7d9f8".into(),
                labels: vec!["k8s:app=frontend".into(), "k8s:tier=web".into()],
                workloads: vec![("Deployment".into(), "frontend".into())],
                identity: 70000,
                ..Default::default()
            })),
            dst: Some(Arc::new(EndpointInfo { namespace: "shop".into(), pod: "cart-1".into(), ..Default::default() })),
            dst_svc: Some(Arc::new(ServiceInfo { namespace: "shop".into(), name: "cart".into() })),
            ..Default::default()
        }
    }

    fn set(allow: Vec<FlowFilter>, deny: Vec<FlowFilter>) -> FilterSet {
        FilterSet::compile(&allow, &deny).unwrap()
    }

    #[test]
    fn fields_and_lists_combine_as_hubble_does() {
        let f = rec("10.1.1.5", "10.1.2.6", 40000, 8080);
        let e = env();
        let m = |s: FilterSet| s.matches(&e, 1, &f);
        assert!(m(set(vec![], vec![])));
        assert!(m(set(vec![FlowFilter { source_pod: vec!["shop/front".into()], ..Default::default() }], vec![])));
        assert!(
            !m(set(vec![FlowFilter { source_pod: vec!["front".into()], ..Default::default() }], vec![])),
            "bare name: default ns"
        );
        assert!(m(set(vec![FlowFilter { source_pod: vec!["shop/".into()], ..Default::default() }], vec![])));
        assert!(m(set(vec![FlowFilter { destination_pod: vec!["/cart".into()], ..Default::default() }], vec![])));
        // AND inside a filter, OR across filters, deny wins.
        let both = FlowFilter {
            source_ip: vec!["10.1.1.0/24".into()],
            destination_port: vec!["8080".into()],
            ..Default::default()
        };
        assert!(m(set(vec![both.clone()], vec![])));
        let wrong_port = FlowFilter { destination_port: vec!["80".into()], ..both.clone() };
        assert!(!m(set(vec![wrong_port.clone()], vec![])));
        assert!(m(set(vec![wrong_port, both.clone()], vec![])));
        assert!(!m(set(
            vec![both],
            vec![FlowFilter { verdict: vec![Verdict::Forwarded as i32], ..Default::default() }]
        )));
        assert!(m(set(
            vec![FlowFilter { source_label: vec!["app=frontend,tier in (web,api)".into()], ..Default::default() }],
            vec![]
        )));
        assert!(!m(set(
            vec![FlowFilter { source_label: vec!["k8s:app!=frontend".into()], ..Default::default() }],
            vec![]
        )));
        assert!(m(set(
            vec![FlowFilter { destination_service: vec!["shop/cart".into()], ..Default::default() }],
            vec![]
        )));
        assert!(m(set(
            vec![FlowFilter {
                source_workload: vec![flow::Workload { name: "frontend".into(), kind: "".into() }],
                ..Default::default()
            }],
            vec![]
        )));
        assert!(m(set(vec![FlowFilter { source_identity: vec![70000], ..Default::default() }], vec![])));
        assert!(m(set(vec![FlowFilter { node_name: vec!["default/node-*".into()], ..Default::default() }], vec![])));
        assert!(!m(set(vec![FlowFilter { node_name: vec!["other".into()], ..Default::default() }], vec![])));
        let trace_to_ep = flow::EventTypeFilter { r#type: 4, match_sub_type: true, sub_type: 0 };
        assert!(m(set(vec![FlowFilter { event_type: vec![trace_to_ep], ..Default::default() }], vec![])));
        let syn = flow::TcpFlags { syn: true, ..Default::default() };
        assert!(m(set(vec![FlowFilter { tcp_flags: vec![syn], ..Default::default() }], vec![])));
        assert!(m(set(vec![FlowFilter { protocol: vec!["TCP".into()], ..Default::default() }], vec![])));
        assert!(!m(set(vec![FlowFilter { protocol: vec!["http".into()], ..Default::default() }], vec![])));
        assert!(!m(set(vec![FlowFilter { source_fqdn: vec!["*.example.com".into()], ..Default::default() }], vec![])));
        assert!(m(set(vec![FlowFilter { uuid: vec![convert::uuid(7, 1)], ..Default::default() }], vec![])));
        assert!(!m(set(vec![FlowFilter { uuid: vec![convert::uuid(7, 2)], ..Default::default() }], vec![])));
    }

    #[test]
    fn event_type_filters_tell_drops_from_policy_verdicts() {
        let mut f = rec("10.1.1.5", "10.1.2.6", 40000, 8080);
        let e = env();
        let drop_only = || {
            set(
                vec![FlowFilter {
                    event_type: vec![flow::EventTypeFilter { r#type: 1, ..Default::default() }],
                    ..Default::default()
                }],
                vec![],
            )
        };
        f.ev.r#type = abi::EV_POLICY as u8;
        f.ev.subtype = abi::POLICY_DENY as u8;
        assert!(!drop_only().matches(&e, 1, &f), "a policy verdict is not a drop");
        f.ev.r#type = abi::EV_DROP as u8;
        f.ev.subtype = abi::DROP_POLICY_DENIED as u8;
        assert!(drop_only().matches(&e, 1, &f));
    }

    #[test]
    fn http_filters_read_the_l7_record() {
        let mut f = rec("10.1.1.5", "10.96.0.10", 40000, 80);
        f.ev.r#type = EV_L7;
        f.ev.subtype = L7_RESPONSE;
        f.http = Some(Arc::new(crate::pipeline::record::Http {
            method: "GET".into(),
            path: "/api/v1/items?x=1".into(),
            authority: "shop".into(),
            code: 503,
            ..Default::default()
        }));
        let e = env();
        let m = |ff: FlowFilter| set(vec![ff], vec![]).matches(&e, 1, &f);
        assert!(m(FlowFilter { http_status_code: vec!["5+".into()], ..Default::default() }));
        assert!(m(FlowFilter { http_status_code: vec!["503".into()], ..Default::default() }));
        assert!(m(FlowFilter { http_status_code: vec!["404".into(), "50+".into()], ..Default::default() }));
        assert!(!m(FlowFilter { http_status_code: vec!["4+".into()], ..Default::default() }));
        assert!(m(FlowFilter { http_method: vec!["get".into()], ..Default::default() }));
        assert!(m(FlowFilter { http_path: vec!["^/api/v[0-9]+/items$".into()], ..Default::default() }));
        assert!(m(FlowFilter { protocol: vec!["http".into()], ..Default::default() }));
        assert!(!m(FlowFilter { protocol: vec!["tcp".into()], ..Default::default() }));
    }

    #[test]
    fn filter_errors_say_the_list_entry_field_and_kind() {
        let bad = FlowFilter { destination_port: vec!["80".into(), "http".into()], ..Default::default() };
        let e = FilterSet::compile(&[FlowFilter::default()], &[FlowFilter::default(), bad]).unwrap_err();
        assert_eq!(
            e,
            FilterListError {
                list: "blacklist",
                index: 1,
                error: FilterError::Value {
                    field: "destination_port",
                    value: "http".into(),
                    expected: "a port number"
                },
            }
        );
        let sel = FlowFilter { source_label: vec!["app in shop".into()], ..Default::default() };
        assert_eq!(
            Filter::compile(&sel).unwrap_err(),
            FilterError::Selector { field: "source_label", error: SelectorError::ValueSet("app in shop".into()) }
        );
    }

    #[test]
    fn malformed_filters_are_refused_with_the_field_named() {
        let err = |ff: FlowFilter| FilterSet::compile(&[ff], &[]).unwrap_err().to_string();
        assert_eq!(
            err(FlowFilter { source_ip: vec!["10.0.0.0/33".into()], ..Default::default() }),
            "whitelist[0].source_ip: \"10.0.0.0/33\" is not an IPv4 address or CIDR"
        );
        assert!(
            err(FlowFilter { http_path: vec!["(".into()], ..Default::default() })
                .starts_with("whitelist[0].http_path: \"(\" is not a regular expression")
        );
        assert!(
            err(FlowFilter { http_status_code: vec!["4xx".into()], ..Default::default() }).contains("http_status_code")
        );
        assert!(err(FlowFilter { source_pod: vec!["".into()], ..Default::default() }).contains("source_pod"));
        let l4_only = flow::EventTypeFilter { r#type: 4, ..Default::default() };
        assert!(
            err(FlowFilter { http_method: vec!["GET".into()], event_type: vec![l4_only], ..Default::default() })
                .contains("need event type l7")
        );
    }

    /// What one request may ask is bounded: filters per list, regular
    /// expressions per request, their length and compiled size.
    #[test]
    fn requests_are_bounded() {
        let many = vec![FlowFilter::default(); MAX_FILTERS + 1];
        assert_eq!(
            check_bounds(&[], &many).unwrap_err().to_string(),
            format!("blacklist: {} filters, at most {MAX_FILTERS} are allowed", MAX_FILTERS + 1)
        );
        assert!(check_bounds(&many[..MAX_FILTERS], &[]).is_ok());
        let paths = |n: usize| FlowFilter { http_path: vec!["^/a$".into(); n], ..Default::default() };
        assert!(check_bounds(&[paths(MAX_REGEXES / 2)], &[paths(MAX_REGEXES / 2)]).is_ok());
        assert_eq!(
            check_bounds(&[paths(MAX_REGEXES / 2)], &[paths(MAX_REGEXES / 2 + 1)]),
            Err(RequestTooLarge::Regexes { count: MAX_REGEXES + 1 })
        );
        let one = |re: String| FilterSet::compile(&[FlowFilter { http_url: vec![re], ..Default::default() }], &[]);
        assert_eq!(
            one("a".repeat(MAX_REGEX_BYTES + 1)).unwrap_err().to_string(),
            format!("whitelist[0].http_url: a regular expression of {} bytes is longer than 1024", MAX_REGEX_BYTES + 1)
        );
        // Short to write, huge compiled: refused, not built.
        let err = one(r"\w{1000}\w{1000}".into()).unwrap_err().to_string();
        assert!(err.starts_with(r#"whitelist[0].http_url: "\\w{1000}\\w{1000}" compiles to more than the"#), "{err}");
        assert!(one(r"^/api/v[0-9]+/items/[a-z0-9-]{1,64}$".into()).is_ok());
    }
}
