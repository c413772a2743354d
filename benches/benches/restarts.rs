//! The restart probe of issue 18 (root; builds its own two-node lab with
//! agents and Envoys): new-connection requests from n1-p1 at a fixed rate,
//! alternating a plain Service (web, eBPF DNAT) and an L7 Service (hello,
//! through node1's Envoy), while
//!
//! - `agent`: node1's agent is killed (SIGKILL) a third of the way in and
//!   started again at once;
//! - `envoy`: node1's Envoy is killed (SIGKILL) a third of the way in (the
//!   agent restarts it).
//!
//! Reported per scenario: failed requests by Service and kind (refused,
//! timed out, bad status), the longest time the L7 Service answered
//! nothing, when the agent was ready again (`agent`) or noticed Envoy's
//! death and had a ready Envoy again (`envoy`), and for the HTTP requests
//! of the window the agent was away, how many Envoy answered, how many of
//! their HTTP flows a follower (`weft observe -f`, started before the kill)
//! received and how many the store still holds at the end, and how many
//! were counted lost; and for the whole run, the requests Envoy completed
//! against the access-log entries the agent's spool reader committed.
//!
//! `sudo ./benches/run.sh restarts`; WEFT_PROBE_N (default 3000) and
//! WEFT_PROBE_RATE (default 150/s) set the load; WEFT_BIN_DIR measures the
//! agent and CLI of another build (e.g. a copy of main's `target/debug`)
//! for the before figures.

use std::{
    collections::BTreeSet,
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use weft_benches::{machine, save};
use weft_tests::{
    envoylab::EnvoyLab,
    flows::{HELLO, flow_lab, flows_of, follow_http, observe_json},
    lab::skip_reason,
    load::{self, Load, Request},
    objects::{agent_status, envoy_requests, start_agent, wait_ready},
    scenario::{VIP, sa},
};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// What happened around the kill, as the probe saw it.
#[derive(Default)]
struct Events {
    killed: Option<Instant>,
    /// The agent ready again (`agent`), or a restarted Envoy ready (`envoy`).
    back: Option<Instant>,
    /// When the agent saw Envoy's exit, after the kill (`envoy`).
    noticed_ms: Option<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Waits for node1's Envoy to be restarted and ready; when the agent saw
/// the exit, from its status (`None` from an agent that does not say).
fn envoy_back(env: &EnvoyLab, old_pid: u64, killed_ns: u64) -> Option<f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(s) = agent_status(&env.lab, 0) {
            let new = s["envoy"]["pid"].as_u64().is_some_and(|p| p != old_pid);
            if new && s["envoy"]["ready"] == true {
                return s["envoy"]["last-exit-at"].as_u64().map(|t| t.saturating_sub(killed_ns) as f64 / 1e6);
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    None
}

fn run(scenario: &str, count: usize, rate: f64) -> serde_json::Value {
    let lab = flow_lab("");
    let env = &lab;
    let load = Load {
        ns: env.lab.pod("n1-p1").netns.clone(),
        targets: vec![sa(VIP, 80), sa(HELLO, 80)],
        count,
        rate,
        timeout: Duration::from_secs(3),
    };
    let envoy_pid = agent_status(&env.lab, 0).ok().and_then(|s| s["envoy"]["pid"].as_u64()).unwrap_or(0);
    // A follower started before the kill counts what the flow API streams,
    // whatever the store keeps at the end.
    let (follower, lines, follower_err) = follow_http(env);
    let committed_before = agent_status(&env.lab, 0).ok().and_then(|s| s["flows"]["access-log-committed"].as_u64());
    let envoy_before = envoy_requests(&env.lab, 0).unwrap_or(0);
    let events_cell = Mutex::new(Events::default());
    let events = &events_cell;
    let result = thread::scope(|s| {
        let kill: Box<dyn FnOnce() + '_> = Box::new(|| {
            let killed_ns = now_ns();
            events.lock().unwrap().killed = Some(Instant::now());
            if scenario == "agent" {
                env.lab.kill(env.pids[0]);
                let log = env.lab.run_dir.join("agent0.log");
                let pid = start_agent(&env.lab, 0, &env.files[0], &log).unwrap_or_else(|e| env.fail(e));
                s.spawn(move || {
                    let _ = wait_ready(&env.files[0], Duration::from_secs(30), || env.lab.running(pid));
                    events.lock().unwrap().back = Some(Instant::now());
                });
            } else {
                // SAFETY: killing the lab's Envoy.
                unsafe { libc::kill(envoy_pid as i32, libc::SIGKILL) };
                s.spawn(move || {
                    let noticed = envoy_back(env, envoy_pid, killed_ns);
                    let mut e = events.lock().unwrap();
                    e.back = Some(Instant::now());
                    e.noticed_ms = noticed;
                });
            }
        });
        load.run(vec![(count / 3, kill)])
    });
    let ev = events_cell.into_inner().unwrap();
    let killed = ev.killed.map(|k| k.duration_since(result.t0)).unwrap_or_default();
    let back = ev.back.map(|b| b.duration_since(result.t0));

    // The HTTP requests of the window the agent was away (or Envoy was
    // restarting): Envoy answered them, did their flows arrive?
    let window = |r: &&Request| r.target == 1 && r.at >= killed && back.is_none_or(|b| r.at <= b);
    let answered: BTreeSet<String> =
        result.requests.iter().filter(window).filter(|r| r.ok()).map(|r| load::path(r.n)).collect();
    thread::sleep(Duration::from_secs(3)); // the access log's flush, the spool's poll
    let window_responses = |flows: &[&serde_json::Value]| -> BTreeSet<String> {
        let urls =
            flows.iter().filter(|f| f["l7"]["type"] == "RESPONSE").filter_map(|f| f["l7"]["http"]["url"].as_str());
        urls.filter_map(|u| u.rfind("/load/").map(|p| u[p..].to_owned())).filter(|p| answered.contains(p)).collect()
    };
    let stored = observe_json(&env.files[0], &["--all", "--protocol", "http"]).unwrap_or_default();
    let in_store = window_responses(&flows_of(&stored)).len();
    let followed: Vec<serde_json::Value> =
        lines.try_iter().filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok()).collect();
    drop(follower);
    let followed: Vec<&serde_json::Value> = followed.iter().map(|v| &v["flow"]).collect();
    let delivered = window_responses(&followed).len();
    let notices = std::fs::read_to_string(&follower_err).unwrap_or_default();
    let status = agent_status(&env.lab, 0).unwrap_or_default();
    let lost_proxy = status["flows"]["lost"]["proxy"].as_u64();
    let envoy_count = envoy_requests(&env.lab, 0).unwrap_or(0);
    // What the spool committed against what Envoy completed, in the run.
    let committed =
        status["flows"]["access-log-committed"].as_u64().zip(committed_before).map(|(a, b)| a.saturating_sub(b));
    let completed = envoy_count.saturating_sub(envoy_before);

    let (plain, l7) = (load::tally(&result.requests, 0), load::tally(&result.requests, 1));
    let failed = |t: &load::Tally| t.sent - t.ok;
    eprintln!(
        "{scenario}: plain {plain:?}\n{scenario}: L7 {l7:?}\n{scenario}: killed at {:.0} ms, back after {:?} ms, death noticed after {:?} ms; window: Envoy answered {} L7 requests, the follower got {} of their response flows ({} still in the store at the end), {:?} counted lost; in the run Envoy completed {} requests and the spool committed {:?} entries\n{scenario}: follower notices: {}",
        ms(killed),
        back.map(|b| ms(b.saturating_sub(killed)).round()),
        ev.noticed_ms.map(|m| m.round()),
        answered.len(),
        delivered,
        in_store,
        lost_proxy,
        completed,
        committed,
        notices.trim(),
    );
    serde_json::json!({
        "requests": count, "rate": rate,
        "plain": {"sent": plain.sent, "failed": failed(&plain), "refused": plain.refused, "timed_out": plain.timed_out, "longest_gap_ms": ms(plain.longest_gap)},
        "l7": {"sent": l7.sent, "failed": failed(&l7), "refused": l7.refused, "timed_out": l7.timed_out, "bad_status": l7.bad_status, "longest_gap_ms": ms(l7.longest_gap)},
        "back_after_ms": back.map(|b| ms(b.saturating_sub(killed))),
        "death_noticed_ms": ev.noticed_ms,
        "window": {"envoy_answered": answered.len(), "flows_delivered": delivered, "flows_in_store_at_end": in_store, "lost_proxy": lost_proxy},
        "run": {"envoy_completed": completed, "spool_committed": committed},
    })
}

fn main() {
    if let Some(r) = skip_reason() {
        eprintln!("restarts: skipped ({r})");
        return;
    }
    let (count, rate) = (env_or("WEFT_PROBE_N", 3000usize), env_or("WEFT_PROBE_RATE", 150.0f64));
    let agent = std::env::var("WEFT_BIN_DIR").unwrap_or_else(|_| "this build".into());
    eprintln!("restart probe: {count} requests at {rate}/s, agent of {agent}; {}", machine());
    let figures = serde_json::json!({
        "agent_build": agent,
        "agent": run("agent", count, rate),
        "envoy": run("envoy", count, rate),
    });
    println!("{}", serde_json::to_string_pretty(&figures).unwrap_or_default());
    save("restarts", figures);
}
