//! `weft status`: the flow API's health and counters, and the agent's own
//! report (`GET /status` of its HTTP API), as text or JSON.

use clap::Args;
use weft_flow::{
    client,
    proto::{
        HEALTH_SERVICE,
        observer::{ServerStatusRequest, observer_client::ObserverClient},
    },
};

use weft_flow::time::{now_ns, rfc3339};

use crate::args::{Output, ServerArgs};

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

/// `1h2m3s`, `4m5s`, `6s`.
fn uptime(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match (s / 3600, s / 60 % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec}s"),
        (h, m, sec) => format!("{h}h{m}m{sec}s"),
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `weft status`.
pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let (addr, tls) = args.server.target()?;
    let channel = client::channel_tls(&addr, &tls).await?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let healthy = health
        .check(tonic_health::pb::HealthCheckRequest { service: HEALTH_SERVICE.into() })
        .await
        .map(|r| r.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
        .unwrap_or(false);
    let mut obs = ObserverClient::new(channel);
    let st = match obs.server_status(ServerStatusRequest {}).await {
        Ok(r) => r.into_inner(),
        Err(s) => anyhow::bail!("{addr}: {}", s.message()),
    };
    let agent = client::http_get(&format!("{}/status", args.agent.trim_end_matches('/'))).await;
    let agent: Option<serde_json::Value> =
        agent.ok().and_then(|(code, body)| (code == 200).then(|| serde_json::from_str(&body).ok()).flatten());
    // The flow API's counters start with the agent; the datapath's (kernel)
    // counters with the datapath, which outlives agent restarts.
    let started_ns = now_ns().saturating_sub(st.uptime_ns);
    if matches!(args.output, Output::Json | Output::Jsonpb) {
        let v = serde_json::json!({
            "healthy": healthy,
            "server": addr.to_string(),
            "agent_started": rfc3339(started_ns),
            "flows": {"current": st.num_flows, "max": st.max_flows, "seen": st.seen_flows, "rate": st.flows_rate, "uptime_ns": st.uptime_ns, "version": st.version},
            "agent": agent,
        });
        println!("{v}");
        return Ok(());
    }
    println!("Healthcheck (via {addr}): {}", if healthy { "Ok" } else { "NOT SERVING" });
    println!("Agent started: {} (up {})   Version: {}", rfc3339(started_ns), uptime(st.uptime_ns), st.version);
    let pct = if st.max_flows > 0 {
        format!(" ({:.2}%)", st.num_flows as f64 * 100.0 / st.max_flows as f64)
    } else {
        String::new()
    };
    println!("Current/Max Flows: {}/{}{pct}", thousands(st.num_flows), thousands(st.max_flows));
    let rate =
        if st.flows_rate > 0.0 { st.flows_rate } else { st.seen_flows as f64 / (st.uptime_ns as f64 / 1e9).max(1.0) };
    println!("Flows/s: {rate:.2}");
    println!("Seen flows: {} (since the agent started)", thousands(st.seen_flows));
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
    println!(
        "Events read: {}   Access-log entries: {}   (since the agent started)",
        f["events-read"], f["access-log-entries"]
    );
    if let Some(lost) = f["lost"].as_object() {
        let parts: Vec<String> = lost.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("Lost events: {}   (since the agent started)", parts.join(" "));
    }
    let o = &f["otlp"];
    if o.is_object() {
        let signal = |s: &serde_json::Value| {
            format!(
                "{} exported {} rejected {} failed {} retried {}",
                s["protocol"].as_str().unwrap_or("?"),
                s["exported"],
                s["rejected"],
                s["failed"],
                s["retried"]
            )
        };
        println!(
            "OTLP: logs {}; traces {}; queue {}/{}, dropped {}",
            signal(&o["logs"]),
            signal(&o["traces"]),
            o["queued"],
            o["queue-capacity"],
            o["dropped"]
        );
    }
    let d = &a["datapath"];
    println!(
        "Datapath: {} services, {} endpoints, records written {} lost {}   (kernel counters, since the datapath was loaded)",
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
    let v = &c["l7-visibility"];
    let services = v["services"].as_array().filter(|s| !s.is_empty());
    let problems = v["problems"].as_array().filter(|p| !p.is_empty());
    if services.is_some() || problems.is_some() {
        println!("L7 visibility (default {}):", v["default"].as_str().unwrap_or("?"));
        for s in services.into_iter().flatten() {
            let text = |k: &str| s[k].as_str().unwrap_or("").to_owned();
            let how = match text("state").as_str() {
                "generated" => format!("generated {} (ports {})", text("config"), s["ports"]),
                "user-config-wins" => format!("not generated: {} serves it", text("config")),
                other => other.to_owned(),
            };
            println!("  {:<40} {:<20} {how}", text("service"), text("set-by"));
        }
        for p in problems.into_iter().flatten() {
            println!("  problem: {}", p.as_str().unwrap_or(""));
        }
    }
    Ok(())
}
