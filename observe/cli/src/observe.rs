//! `weft observe`: the GetFlowsRequest a command line asks for (as Hubble's
//! CLI fills it), and the stream of flows printed as compact lines, JSON or
//! a table until it ends, `--duration` passes or Ctrl-C.

use std::{io::Write, time::Duration};

use anyhow::Context;
use clap::Args;
use tonic::Code;
use tonic::transport::Channel;
use weft_flow::{
    client, json,
    print::{self, Options},
    proto::{
        observer::{
            GetFlowsRequest, ServerStatusRequest, get_flows_response::ResponseTypes, observer_client::ObserverClient,
        },
        weft::WeftClient,
    },
    time::{self, now_ns, timestamp},
};

/// The type of `GetFlowsRequest.extensions` by which weft's server knows
/// its own client.
const WEFT_CLIENT: &str = "type.googleapis.com/weft.WeftClient";

use crate::{
    args::{Color, Output, ServerArgs},
    filters::build_filters,
};

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

/// The GetFlowsRequest of `weft observe`, as Hubble's CLI fills it.
pub fn request(args: &ObserveArgs, argv: &[String], now: u64) -> anyhow::Result<GetFlowsRequest> {
    let (whitelist, blacklist) = build_filters(argv, &args.allowlist, &args.denylist)?;
    let since = args.since.as_deref().map(|s| time::parse_time(s, now)).transpose().context("--since")?;
    let until = args.until.as_deref().map(|s| time::parse_time(s, now)).transpose().context("--until")?;
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
        since: since.map(timestamp),
        until: if args.follow { None } else { until.map(timestamp) },
        extensions: Some(prost_types::Any { type_url: WEFT_CLIENT.into(), value: Vec::new() }),
        ..Default::default()
    })
}

fn is_terminal() -> bool {
    // SAFETY: isatty on a file descriptor number has no preconditions.
    unsafe { libc::isatty(1) == 1 }
}

/// How long a follower waits between attempts to reconnect, at most.
const RECONNECT_MAX: Duration = Duration::from_secs(2);
/// Flows a follower remembers to skip ones it already printed.
const RECENT: usize = 8192;

/// What a follower keeps to resume a stream where it left off.
#[derive(Default)]
struct Resume {
    /// The uuid of the last flow printed.
    last_uuid: Option<String>,
    /// When the agent started (unix ns, from ServerStatus), to tell a
    /// restart from a dropped connection.
    boot_ns: Option<u64>,
    /// The flows printed last ([`resume_key`]): one an agent read again
    /// after a restart (an access-log line it had not committed) is not
    /// printed twice.
    recent: std::collections::VecDeque<Vec<u8>>,
    seen: std::collections::HashSet<Vec<u8>>,
}

/// What tells a flow printed before from a new one across agents. An HTTP
/// flow comes from an access-log line, which an agent killed after sending
/// its flow but before saving its place in the spool leaves for the next
/// agent to read again; the next one joins it to less (the kernel's records
/// of its connections went to the agent before: no link, proxy port or
/// connection summary), so it is known by what Envoy wrote: its time and
/// its Layer7 (request, response, latency, headers with Envoy's
/// x-request-id). Any other flow by everything in it but its uuid.
fn resume_key(f: &weft_flow::proto::flow::Flow) -> Vec<u8> {
    use prost::Message;
    match &f.l7 {
        Some(l7) => weft_flow::proto::flow::Flow {
            time: f.time,
            node_name: f.node_name.clone(),
            l7: Some(l7.clone()),
            ..Default::default()
        }
        .encode_to_vec(),
        None => {
            let mut key = f.clone();
            key.uuid.clear();
            key.encode_to_vec()
        }
    }
}

impl Resume {
    /// True if the flow is new (and remembers it).
    fn first_time(&mut self, f: &weft_flow::proto::flow::Flow) -> bool {
        let key = resume_key(f);
        if self.seen.contains(&key) {
            return false;
        }
        if self.recent.len() == RECENT
            && let Some(old) = self.recent.pop_front()
        {
            self.seen.remove(&old);
        }
        self.seen.insert(key.clone());
        self.recent.push_back(key);
        true
    }

    /// The request again, asking to resume after the last flow printed.
    fn request(&self, req: &GetFlowsRequest) -> GetFlowsRequest {
        use prost::Message;
        let mut r = req.clone();
        if let Some(u) = &self.last_uuid {
            let ext = WeftClient { resume_after: u.clone() };
            r.extensions = Some(prost_types::Any { type_url: WEFT_CLIENT.into(), value: ext.encode_to_vec() });
        }
        r
    }
}

/// When the server's agent started (unix ns), from ServerStatus.
async fn boot_ns(client: &mut ObserverClient<Channel>) -> Option<u64> {
    let st = client.server_status(ServerStatusRequest {}).await.ok()?.into_inner();
    Some(now_ns().saturating_sub(st.uptime_ns))
}

/// `weft observe`; `argv` is the whole command line (for `--not` order).
pub async fn observe(args: ObserveArgs, argv: &[String]) -> anyhow::Result<()> {
    let req = request(&args, argv, now_ns())?;
    if args.print_raw_filters {
        for (name, list) in [("allowlist", &req.whitelist), ("denylist", &req.blacklist)] {
            println!("{name}:");
            for f in list {
                println!("  {}", json::message("flow.FlowFilter", f));
            }
        }
        return Ok(());
    }
    let (addr, tls) = args.server.target()?;
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
            time::parse_duration(d)
                .or_else(|| d.parse::<u64>().ok().map(|s| s * 1_000_000_000))
                .with_context(|| format!("--duration {d:?}: expected a duration like 30s"))?,
        ),
        None => None,
    };
    let stop = async move {
        match deadline {
            Some(ns) => tokio::time::sleep(Duration::from_nanos(ns)).await,
            None => std::future::pending().await,
        }
    };
    let stop = async move {
        tokio::select! {
            _ = stop => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    tokio::pin!(stop);
    let mut out = std::io::stdout().lock();
    if args.output == Output::Table {
        let _ = writeln!(out, "{}", print::TABLE_HEADER);
    }
    let mut resume = Resume::default();
    // A follower whose stream ended and that has not reconnected yet.
    let mut reconnecting = false;
    let mut wait = Duration::from_millis(100);
    loop {
        let attempt = async {
            let mut client = client::observer_tls(&addr, &tls).await?;
            let boot = if args.follow { boot_ns(&mut client).await } else { None };
            let stream = match client.get_flows(resume.request(&req)).await {
                Ok(s) => s,
                Err(s) => anyhow::bail!("{addr}: {}", s.message()),
            };
            Ok::<_, anyhow::Error>((stream.into_inner(), boot))
        };
        let connected = tokio::select! {
            r = attempt => r,
            _ = &mut stop => return Ok(()),
        };
        let mut stream = match connected {
            Ok((stream, boot)) => {
                if std::mem::take(&mut reconnecting) {
                    let restarted = match (resume.boot_ns, boot) {
                        (Some(a), Some(b)) => a.abs_diff(b) > 1_000_000_000,
                        _ => false,
                    };
                    if restarted {
                        eprintln!(
                            "weft: reconnected to {addr}: the agent restarted at {} (flows it had not sent before it stopped are lost); resuming with its first flow",
                            boot.map(time::stamp_milli).unwrap_or_default()
                        );
                    } else {
                        eprintln!("weft: reconnected to {addr}; resuming after the last flow printed");
                    }
                }
                if boot.is_some() {
                    resume.boot_ns = boot;
                }
                wait = Duration::from_millis(100);
                stream
            }
            // The agent may not be back yet: try again.
            Err(_) if reconnecting => {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut stop => return Ok(()),
                }
                wait = (wait * 2).min(RECONNECT_MAX);
                continue;
            }
            Err(e) => return Err(e),
        };
        let ended = loop {
            let msg = tokio::select! {
                m = stream.message() => m,
                _ = &mut stop => return Ok(()),
            };
            let r = match msg {
                Ok(Some(r)) => r,
                Ok(None) => break "the server ended it".to_string(),
                Err(s) if s.code() == Code::Cancelled && !args.follow => return Ok(()),
                Err(s) => break s.message().to_string(),
            };
            if let Some(ResponseTypes::Flow(f)) = &r.response_types {
                if !resume.first_time(f) {
                    continue;
                }
                resume.last_uuid = Some(f.uuid.clone()).filter(|u| !u.is_empty());
            }
            let line = match args.output {
                Output::Json | Output::Jsonpb => Some(json::response(&r)),
                Output::Compact => print::compact(&r, &opts),
                Output::Table => match &r.response_types {
                    Some(ResponseTypes::Flow(f)) => Some(print::table_row(f, &opts)),
                    _ => print::compact(&r, &opts),
                },
            };
            if let Some(l) = line {
                if writeln!(out, "{l}").is_err() {
                    return Ok(()); // the reader went away (a closed pipe)
                }
                let _ = out.flush();
            }
        };
        if !args.follow {
            return if ended == "the server ended it" { Ok(()) } else { Err(anyhow::anyhow!("{addr}: {ended}")) };
        }
        // A follower comes back by itself: the agent may be restarting.
        eprintln!("weft: the stream from {addr} ended ({ended}); reconnecting");
        reconnecting = true;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Command};

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
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

    #[test]
    #[allow(deprecated)] // Flow.summary: weft still fills it
    fn an_http_flow_read_again_by_a_restarted_agent_is_not_new() {
        use weft_flow::proto::flow::{Flow, Http, HttpHeader, L7FlowType, Layer7, layer7};
        let http = |id: &str| Layer7 {
            r#type: L7FlowType::Response as i32,
            latency_ns: 7,
            record: Some(layer7::Record::Http(Http {
                code: 200,
                method: "GET".into(),
                url: "http://hello/load/5".into(),
                headers: vec![HttpHeader { key: "x-request-id".into(), value: id.into() }],
                ..Default::default()
            })),
        };
        let time = Some(prost_types::Timestamp { seconds: 5, nanos: 6 });
        let printed = Flow {
            time,
            uuid: "a".into(),
            proxy_port: 13862,
            summary: "HTTP/1.1 200; conn from-endpoint > to-proxy:13862".into(),
            l7: Some(http("r1")),
            ..Default::default()
        };
        // The next agent's flow of the same line: another uuid, and none of
        // what the kernel's records of the connection gave the first.
        let again = Flow { time, uuid: "b".into(), l7: Some(http("r1")), ..Default::default() };
        let other = Flow { l7: Some(http("r2")), ..again.clone() };
        let mut r = Resume::default();
        assert!(r.first_time(&printed));
        assert!(!r.first_time(&again));
        assert!(r.first_time(&other), "another request (another x-request-id)");
        // Other flows: everything but the uuid counts.
        let tcp = Flow { time, uuid: "c".into(), proxy_port: 1, ..Default::default() };
        assert!(r.first_time(&tcp));
        assert!(!r.first_time(&Flow { uuid: "d".into(), ..tcp.clone() }));
        assert!(r.first_time(&Flow { proxy_port: 2, ..tcp }));
    }
}
