//! The `weft` command: `weft observe` streams flows from a node's flow API
//! (or any Hubble-compatible server) with Hubble's flags and filter rules;
//! `weft status` shows the flow API's and the agent's state.

use std::{io::Write, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use tonic::Code;

use crate::{
    client::{self, Address},
    names,
    pipeline::now_ns,
    print::{self, Options},
    proto::{
        flow::{self, FlowFilter, TrafficDirection, Verdict},
        observer::{GetFlowsRequest, ServerStatusRequest, get_flows_response::ResponseTypes},
    },
    timefmt,
};

/// Observe what traffic is doing on weft's nodes.
#[derive(Debug, Parser)]
#[command(name = "weft", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show flows: forwarded, redirected and dropped packets, and HTTP requests through Envoy.
    Observe(ObserveArgs),
    /// Show the flow API's and the agent's state.
    Status(StatusArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One line per flow, like `hubble observe`.
    Compact,
    /// One JSON object per line, with Hubble's field names.
    Json,
    /// Same as json.
    Jsonpb,
    /// Aligned columns.
    Table,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

/// Flags shared by the commands that talk to a flow API.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The flow API: host:port, tls://host:port or unix:///path.
    #[arg(long, env = "WEFT_SERVER", default_value = "localhost:4244")]
    pub server: String,
    /// CA certificate (PEM) the server's certificate must chain to (tls://).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Name to check the server's certificate against (default: the host).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Client certificate and key (PEM) for servers that require one.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl ServerArgs {
    /// The address and TLS settings; errors name the flag and the file.
    pub fn target(&self) -> Result<(Address, client::TlsClient), String> {
        let read =
            |flag: &str, p: &std::path::Path| std::fs::read(p).map_err(|e| format!("--{flag} {}: {e}", p.display()));
        let tls = client::TlsClient {
            ca_pem: self.tls_ca.as_deref().map(|p| read("tls-ca", p)).transpose()?,
            server_name: self.tls_server_name.clone(),
            identity: match (&self.tls_cert, &self.tls_key) {
                (Some(c), Some(k)) => Some((read("tls-cert", c)?, read("tls-key", k)?)),
                _ => None,
            },
        };
        Ok((Address::parse(&self.server)?, tls))
    }
}

#[derive(Debug, Args)]
pub struct ObserveArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Keep streaming new flows.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// The last N flows (default 20, unless --follow or --since).
    #[arg(long, value_name = "N", conflicts_with_all = ["first", "all"])]
    pub last: Option<u64>,
    /// The first N flows still buffered.
    #[arg(long, value_name = "N", conflicts_with_all = ["follow", "all"])]
    pub first: Option<u64>,
    /// Every flow still buffered.
    #[arg(long)]
    pub all: bool,
    /// Flows since this time: a duration ago (5m) or RFC 3339.
    #[arg(long, value_name = "TIME")]
    pub since: Option<String>,
    /// Flows until this time: a duration ago (1m) or RFC 3339.
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Stop after this long (e.g. 30s); Ctrl-C stops too.
    #[arg(long, value_name = "DURATION")]
    pub duration: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "compact")]
    pub output: Output,
    /// Colours: auto (on a terminal), always, never.
    #[arg(long, value_enum, default_value = "auto")]
    pub color: Color,
    /// Print the node that saw each flow.
    #[arg(long)]
    pub print_node_name: bool,
    /// Addresses instead of pod and service names.
    #[arg(long)]
    pub numeric: bool,
    /// Print the filters this command sends, and exit.
    #[arg(long)]
    pub print_raw_filters: bool,

    /// Negate the filter flag that follows.
    #[arg(long, action = clap::ArgAction::Count)]
    pub not: u8,
    #[arg(long, value_name = "VERDICT", help = "FORWARDED, DROPPED, REDIRECTED, TRANSLATED, ...")]
    pub verdict: Vec<String>,
    #[arg(long, value_name = "[NS/]POD", help = "Either end is this pod (prefix)")]
    pub pod: Vec<String>,
    #[arg(long, value_name = "[NS/]POD")]
    pub from_pod: Vec<String>,
    #[arg(long, value_name = "[NS/]POD")]
    pub to_pod: Vec<String>,
    #[arg(short = 'n', long, value_name = "NS", help = "Either end is in this namespace")]
    pub namespace: Vec<String>,
    #[arg(long, value_name = "NS")]
    pub from_namespace: Vec<String>,
    #[arg(long, value_name = "NS")]
    pub to_namespace: Vec<String>,
    #[arg(long, value_name = "IP/CIDR")]
    pub ip: Vec<String>,
    #[arg(long, value_name = "IP/CIDR")]
    pub from_ip: Vec<String>,
    #[arg(long, value_name = "IP/CIDR")]
    pub to_ip: Vec<String>,
    #[arg(long, value_name = "PORT")]
    pub port: Vec<String>,
    #[arg(long, value_name = "PORT")]
    pub from_port: Vec<String>,
    #[arg(long, value_name = "PORT")]
    pub to_port: Vec<String>,
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    pub label: Vec<String>,
    #[arg(long, value_name = "SELECTOR")]
    pub from_label: Vec<String>,
    #[arg(long, value_name = "SELECTOR")]
    pub to_label: Vec<String>,
    #[arg(long, value_name = "[NS/]SVC")]
    pub service: Vec<String>,
    #[arg(long, value_name = "[NS/]SVC")]
    pub from_service: Vec<String>,
    #[arg(long, value_name = "[NS/]SVC")]
    pub to_service: Vec<String>,
    #[arg(long, value_name = "ID")]
    pub identity: Vec<String>,
    #[arg(long, value_name = "ID")]
    pub from_identity: Vec<String>,
    #[arg(long, value_name = "ID")]
    pub to_identity: Vec<String>,
    #[arg(long, value_name = "[KIND/]NAME")]
    pub workload: Vec<String>,
    #[arg(long, value_name = "[KIND/]NAME")]
    pub from_workload: Vec<String>,
    #[arg(long, value_name = "[KIND/]NAME")]
    pub to_workload: Vec<String>,
    #[arg(long, value_name = "PROTO", help = "tcp, udp, icmp, http")]
    pub protocol: Vec<String>,
    #[arg(
        short = 't',
        long = "type",
        value_name = "TYPE[:SUBTYPE]",
        help = "trace, drop, policy-verdict, trace-sock, l7; trace:to-endpoint"
    )]
    pub type_: Vec<String>,
    #[arg(long, value_name = "CODE", help = "404, or 4+ / 40+ for a class")]
    pub http_status: Vec<String>,
    #[arg(long, value_name = "METHOD")]
    pub http_method: Vec<String>,
    #[arg(long, value_name = "REGEX")]
    pub http_path: Vec<String>,
    #[arg(long, value_name = "REGEX")]
    pub http_url: Vec<String>,
    #[arg(long, value_name = "PATTERN")]
    pub node_name: Vec<String>,
    #[arg(long, value_name = "REASON", help = "POLICY_DENIED, ...")]
    pub drop_reason_desc: Vec<String>,
    #[arg(long, value_name = "DIR", help = "ingress or egress")]
    pub traffic_direction: Vec<String>,
    #[arg(long, value_name = "FLAGS", help = "syn,ack")]
    pub tcp_flags: Vec<String>,
    #[arg(long, value_name = "UUID")]
    pub uuid: Vec<String>,
    #[arg(long, value_name = "ID")]
    pub trace_id: Vec<String>,
    /// Raw FlowFilter JSON for the allow-list (Hubble's field names).
    #[arg(long, value_name = "JSON")]
    pub allowlist: Vec<String>,
    /// Raw FlowFilter JSON for the deny-list.
    #[arg(long, value_name = "JSON")]
    pub denylist: Vec<String>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The agent's HTTP API.
    #[arg(long, env = "WEFT_AGENT", default_value = "http://127.0.0.1:9962")]
    pub agent: String,
    /// Output format: compact or json.
    #[arg(short = 'o', long, value_enum, default_value = "compact")]
    pub output: Output,
}

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

fn verdict(v: &str) -> Result<i32, String> {
    Verdict::from_str_name(&v.to_ascii_uppercase()).map(|v| v as i32).ok_or_else(|| {
        format!("--verdict {v:?}: expected FORWARDED, DROPPED, ERROR, AUDIT, REDIRECTED, TRACED or TRANSLATED")
    })
}

fn event_type(v: &str) -> Result<flow::EventTypeFilter, String> {
    let (t, sub) = match v.split_once(':') {
        Some((t, s)) => (t, Some(s)),
        None => (v, None),
    };
    let code = names::event_type_code(t).ok_or_else(|| format!("--type {v:?}: unknown event type {t:?}"))?;
    let sub_type = match sub {
        None => None,
        Some(s) if code == 4 => Some(
            names::trace_subtype(s)
                .or_else(|| s.parse().ok())
                .ok_or_else(|| format!("--type {v:?}: unknown trace point {s:?}"))?,
        ),
        Some(s) if code == 1 => Some(
            names::drop_reason_code(s)
                .map(|c| c as i32)
                .or_else(|| s.parse().ok())
                .ok_or_else(|| format!("--type {v:?}: unknown drop reason {s:?}"))?,
        ),
        Some(s) => Some(s.parse().map_err(|_| format!("--type {v:?}: subtype {s:?} is not a number"))?),
    };
    Ok(flow::EventTypeFilter { r#type: code, match_sub_type: sub_type.is_some(), sub_type: sub_type.unwrap_or(0) })
}

fn identity(v: &str) -> Result<u32, String> {
    (0..=10)
        .find(|n| names::reserved_identity(*n) == Some(v))
        .or_else(|| v.parse().ok())
        .ok_or_else(|| format!("identity {v:?}: expected a number or a reserved name (host, world, remote-node, ...)"))
}

fn workload(v: &str) -> flow::Workload {
    match v.split_once('/') {
        Some((kind, name)) => flow::Workload { kind: kind.into(), name: name.into() },
        None => flow::Workload { kind: String::new(), name: v.into() },
    }
}

fn tcp_flags(v: &str) -> Result<flow::TcpFlags, String> {
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
            other => return Err(format!("--tcp-flags {v:?}: unknown flag {other:?}")),
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
    fn set(&mut self, field: Field, side: Side, v: &str) -> Result<(), String> {
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
            DropReason => both!(
                drop_reason_desc,
                names::drop_reason_code(v).ok_or_else(|| format!("--drop-reason-desc {v:?}: unknown drop reason"))?
                    as i32
            ),
            Direction => both!(
                traffic_direction,
                crate::filter::direction_by_name(v)
                    .filter(|d| *d != TrafficDirection::Unknown)
                    .ok_or_else(|| format!("--traffic-direction {v:?}: expected ingress or egress"))?
                    as i32
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
) -> Result<(Vec<FlowFilter>, Vec<FlowFilter>), String> {
    let (mut allow, mut deny) = (Pair::default(), Pair::default());
    for (negate, name, value) in ordered_filter_flags(argv) {
        let (field, side) = flag(&name).expect("only known flags are returned");
        if negate { deny.set(field, side, &value)? } else { allow.set(field, side, &value)? }
    }
    let (mut allow, mut deny) = (allow.finish(), deny.finish());
    let json = |s: &String| -> Result<FlowFilter, String> {
        let v: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("filter JSON {s:?}: {e}"))?;
        crate::filter::from_json(&v).map_err(|e| format!("filter JSON {s:?}: {e}"))
    };
    for s in allow_json {
        allow.push(json(s)?);
    }
    for s in deny_json {
        deny.push(json(s)?);
    }
    Ok((allow, deny))
}

/// The GetFlowsRequest of `weft observe`, as Hubble's CLI fills it.
pub fn request(args: &ObserveArgs, argv: &[String], now: u64) -> Result<GetFlowsRequest, String> {
    let (whitelist, blacklist) = build_filters(argv, &args.allowlist, &args.denylist)?;
    let since =
        args.since.as_deref().map(|s| timefmt::parse_time(s, now)).transpose().map_err(|e| format!("--since {e}"))?;
    let until =
        args.until.as_deref().map(|s| timefmt::parse_time(s, now)).transpose().map_err(|e| format!("--until {e}"))?;
    let number = if args.all {
        u64::MAX
    } else if let Some(n) = args.last.or(args.first) {
        n
    } else if args.follow || since.is_some() || until.is_some() {
        0
    } else {
        20
    };
    Ok(GetFlowsRequest {
        number,
        follow: args.follow,
        first: args.first.is_some(),
        whitelist,
        blacklist,
        since: since.map(crate::convert::timestamp),
        until: if args.follow { None } else { until.map(crate::convert::timestamp) },
        extensions: Some(prost_types::Any {
            type_url: "type.googleapis.com/weft.WeftClient".into(),
            value: Vec::new(),
        }),
        ..Default::default()
    })
}

fn is_terminal() -> bool {
    // SAFETY: isatty on a file descriptor number has no preconditions.
    unsafe { libc::isatty(1) == 1 }
}

/// `weft observe`; `argv` is the whole command line (for `--not` order).
pub async fn observe(args: ObserveArgs, argv: &[String]) -> Result<(), String> {
    let req = request(&args, argv, now_ns())?;
    if args.print_raw_filters {
        for (name, list) in [("allowlist", &req.whitelist), ("denylist", &req.blacklist)] {
            println!("{name}:");
            for f in list {
                println!("  {}", print::json("flow.FlowFilter", f));
            }
        }
        return Ok(());
    }
    let (addr, tls) = args.server.target()?;
    let mut client = client::observer_tls(&addr, &tls).await?;
    let mut stream = match client.get_flows(req).await {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(format!("{addr}: {}", s.message())),
    };
    let opts = Options {
        color: match args.color {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => is_terminal(),
        },
        node_name: args.print_node_name,
        numeric: args.numeric,
    };
    let deadline = match &args.duration {
        Some(d) => Some(
            timefmt::parse_duration(d)
                .or_else(|| d.parse::<u64>().ok().map(|s| s * 1_000_000_000))
                .ok_or_else(|| format!("--duration {d:?}: expected a duration like 30s"))?,
        ),
        None => None,
    };
    let stop = async move {
        match deadline {
            Some(ns) => tokio::time::sleep(Duration::from_nanos(ns)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut out = std::io::stdout().lock();
    if args.output == Output::Table {
        let _ = writeln!(out, "{}", print::TABLE_HEADER);
    }
    loop {
        let msg = tokio::select! {
            m = stream.message() => m,
            _ = &mut stop => break,
            _ = &mut ctrl_c => break,
        };
        let r = match msg {
            Ok(Some(r)) => r,
            Ok(None) => break,
            Err(s) if s.code() == Code::Cancelled => break,
            Err(s) => return Err(format!("{addr}: {}", s.message())),
        };
        let line = match args.output {
            Output::Json | Output::Jsonpb => Some(print::json_response(&r)),
            Output::Compact => print::compact(&r, &opts),
            Output::Table => match &r.response_types {
                Some(ResponseTypes::Flow(f)) => Some(print::table_row(f, &opts)),
                _ => print::compact(&r, &opts),
            },
        };
        if let Some(l) = line {
            if writeln!(out, "{l}").is_err() {
                break; // the reader went away (a closed pipe)
            }
            let _ = out.flush();
        }
    }
    Ok(())
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `weft status`.
pub async fn status(args: StatusArgs) -> Result<(), String> {
    let (addr, tls) = args.server.target()?;
    let channel = client::channel_tls(&addr, &tls).await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let healthy = health
        .check(tonic_health::pb::HealthCheckRequest { service: crate::server::HEALTH_SERVICE.into() })
        .await
        .map(|r| r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
        .unwrap_or(false);
    let mut obs = crate::proto::observer::observer_client::ObserverClient::new(channel);
    let st =
        obs.server_status(ServerStatusRequest {}).await.map_err(|s| format!("{addr}: {}", s.message()))?.into_inner();
    let agent = client::http_get(&format!("{}/status", args.agent.trim_end_matches('/'))).await;
    let agent: Option<serde_json::Value> =
        agent.ok().and_then(|(code, body)| (code == 200).then(|| serde_json::from_str(&body).ok()).flatten());
    if matches!(args.output, Output::Json | Output::Jsonpb) {
        let v = serde_json::json!({
            "healthy": healthy,
            "server": addr.to_string(),
            "flows": {"current": st.num_flows, "max": st.max_flows, "seen": st.seen_flows, "rate": st.flows_rate, "uptime_ns": st.uptime_ns, "version": st.version},
            "agent": agent,
        });
        println!("{v}");
        return Ok(());
    }
    println!("Healthcheck (via {addr}): {}", if healthy { "Ok" } else { "NOT SERVING" });
    let pct = if st.max_flows > 0 {
        format!(" ({:.2}%)", st.num_flows as f64 * 100.0 / st.max_flows as f64)
    } else {
        String::new()
    };
    println!("Current/Max Flows: {}/{}{pct}", thousands(st.num_flows), thousands(st.max_flows));
    let rate =
        if st.flows_rate > 0.0 { st.flows_rate } else { st.seen_flows as f64 / (st.uptime_ns as f64 / 1e9).max(1.0) };
    println!("Flows/s: {rate:.2}");
    println!(
        "Seen flows: {}   Uptime: {}s   Version: {}",
        thousands(st.seen_flows),
        st.uptime_ns / 1_000_000_000,
        st.version
    );
    let Some(a) = agent else {
        println!("Agent: no answer from {} (use --agent)", args.agent);
        return Ok(());
    };
    println!(
        "Agent: node {}, {}",
        a["node"].as_str().unwrap_or("?"),
        if a["ready"].as_bool() == Some(true) { "ready" } else { "NOT READY" }
    );
    let f = &a["flows"];
    println!("Events read: {}   Access-log entries: {}", f["events-read"], f["access-log-entries"]);
    if let Some(lost) = f["lost"].as_object() {
        let parts: Vec<String> = lost.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("Lost events: {}", parts.join(" "));
    }
    let d = &a["datapath"];
    println!(
        "Datapath: {} services, {} endpoints, records written {} lost {}",
        d["services"], d["endpoints"], d["events-emitted"], d["events-lost"]
    );
    let e = &a["envoy"];
    println!("Envoy: pid {}, ready {}, restarts {}", e["pid"], e["ready"], e["restarts"]);
    let c = &a["control"];
    println!(
        "xDS: connected {}, mode {}, pushes {}, NACKs {}",
        c["envoy-connected"], c["xds-mode"], a["xds"]["pushes"], a["xds"]["nacks"]
    );
    if let Some(objs) = c["objects"].as_array() {
        println!("Objects:");
        for o in objs {
            let problems = o["problems"].as_array().map(|p| p.len()).unwrap_or(0);
            let valid = if problems == 0 { "valid".to_string() } else { format!("REJECTED ({problems} problems)") };
            let envoy = o["envoy"]["state"].as_str().unwrap_or("?");
            println!("  {:<50} {:<24} envoy: {envoy}", o["object"].as_str().unwrap_or("?"), valid);
            for p in o["problems"].as_array().into_iter().flatten() {
                println!("      {}", p.as_str().unwrap_or(""));
            }
            if let Some(m) = o["envoy"]["message"].as_str() {
                println!("      NACK: {m}");
            }
        }
    }
    Ok(())
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

        assert!(build_filters(&argv("--verdict SOMETIMES"), &[], &[]).unwrap_err().contains("--verdict"));
        let (allow, deny) =
            build_filters(&[], &[r#"{"http_method":["GET"]}"#.into()], &[r#"{"verdict":["DROPPED"]}"#.into()]).unwrap();
        assert_eq!((allow[0].http_method.clone(), deny[0].verdict.clone()), (vec!["GET".to_string()], vec![2]));
    }

    #[test]
    fn requests_follow_hubbles_table() {
        let parse = |s: &str| {
            let a = argv(&format!("weft observe {s}"));
            let cli = Cli::try_parse_from(&a).unwrap();
            let Command::Observe(o) = cli.command else { panic!() };
            request(&o, &a, 1_000_000_000_000).unwrap()
        };
        assert_eq!((parse("").number, parse("").follow), (20, false));
        assert_eq!((parse("--last 5").number, parse("--last 5").first), (5, false));
        assert_eq!((parse("--first 5").number, parse("--first 5").first), (5, true));
        assert_eq!(parse("--all").number, u64::MAX);
        assert_eq!((parse("-f").number, parse("-f").follow), (0, true));
        let r = parse("--since 10s --until 5s");
        assert_eq!((r.number, r.since.unwrap().seconds, r.until.unwrap().seconds), (0, 990, 995));
        assert!(parse("-f --since 10s --until 5s").until.is_none());
        assert!(Cli::try_parse_from(argv("weft observe --first 3 --follow")).is_err());
        assert!(Cli::try_parse_from(argv("weft observe --bogus")).is_err());
    }
}
