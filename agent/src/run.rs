//! `weft-agent run`: sources -> state -> datapath, with the datapath's
//! records printed or handed to the flow pipeline.
//!
//! Threads: the source watches the objects directory; the state loop is the
//! one writer of snapshots; the datapath thread (inside the node's network
//! namespace) applies them, collects garbage and keeps proxy listeners
//! registered; the events thread drains the ring buffer.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::Context;
use weft_observe::ringbuf::EventReader;

use crate::{
    config::AgentConfig,
    datapath::Datapath,
    k8s::yaml,
    netns::NetnsGuard,
    reconcile::Reconciler,
    state::{Redirects, Snapshot},
};

/// How often the objects directory is checked for changes.
const SOURCE_POLL: Duration = Duration::from_millis(200);
/// How often expired connections are collected.
const GC_EVERY: Duration = Duration::from_secs(30);
/// How often missing proxy listeners are looked for.
const PROXY_SYNC_EVERY: Duration = Duration::from_secs(1);

/// Runs the agent until the process is stopped.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    tracing::info!(config = ?cfg, "starting weft-agent");
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating state-dir {}", cfg.state_dir.display()))?;
    let ready = cfg.state_dir.join("ready");
    let _ = std::fs::remove_file(&ready);

    let (snap_tx, snap_rx) = mpsc::channel::<Snapshot>();
    let first = load_snapshot(&cfg, 1);
    let node_ip = first.node_ip.with_context(|| {
        format!(
            "no address for node {}: set node-ip, or add its Node object (status.addresses InternalIP) to {}",
            cfg.node_name,
            cfg.objects_dir.display()
        )
    })?;
    snap_tx.send(first).expect("receiver alive");

    // The source: reload the directory when any file changes.
    {
        let cfg = cfg.clone();
        std::thread::Builder::new().name("source".into()).spawn(move || {
            let mut seen = yaml::fingerprint(&cfg.objects_dir);
            let mut version = 1;
            loop {
                std::thread::sleep(SOURCE_POLL);
                let now = yaml::fingerprint(&cfg.objects_dir);
                if now == seen {
                    continue;
                }
                seen = now;
                version += 1;
                if snap_tx.send(load_snapshot(&cfg, version)).is_err() {
                    return;
                }
            }
        })?;
    }

    let netns = cfg.netns.clone();
    let dp_thread = std::thread::Builder::new().name("datapath".into()).spawn(move || -> anyhow::Result<()> {
        let _guard = netns.as_deref().map(NetnsGuard::enter).transpose().context("entering netns")?;
        let mut dp = Datapath::open(cfg.datapath(node_ip)).context("loading the datapath")?;
        if let Some(ring) = dp.take_events() {
            let node = cfg.node_name.clone();
            let print = cfg.print_events;
            std::thread::Builder::new()
                .name("events".into())
                .spawn(move || events(EventReader::new(ring), &node, print))?;
        }
        let mut rec = Reconciler::new(cfg.devices.clone());
        let mut current: Option<Snapshot> = None;
        let mut last_gc = Instant::now();
        let mut last_proxy = Instant::now() - PROXY_SYNC_EVERY;
        loop {
            // Take the newest snapshot; older ones queued behind it are moot.
            let mut next = None;
            match snap_rx.recv_timeout(Duration::from_millis(250)) {
                Ok(s) => next = Some(s),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
            while let Ok(s) = snap_rx.try_recv() {
                next = Some(s);
            }
            if let Some(snap) = next {
                let applied = rec.apply(&mut dp, &snap, &BTreeMap::new()).context("applying desired state")?;
                for p in snap.problems.iter().chain(&applied.problems) {
                    tracing::warn!(version = snap.version, "{p}");
                }
                tracing::info!(
                    version = snap.version,
                    services_written = applied.services_written,
                    services_removed = applied.services_removed,
                    endpoints_written = applied.endpoints_written,
                    endpoints_removed = applied.endpoints_removed,
                    "desired state applied"
                );
                if current.is_none() {
                    std::fs::write(&ready, snap.version.to_string()).context("writing the ready file")?;
                }
                current = Some(snap);
                last_proxy = Instant::now() - PROXY_SYNC_EVERY;
            }
            if last_proxy.elapsed() >= PROXY_SYNC_EVERY {
                last_proxy = Instant::now();
                if let Some(snap) = &current {
                    let mut ports: Vec<u16> =
                        snap.services.iter().flat_map(|s| s.entries.iter().filter_map(|e| e.proxy_port)).collect();
                    ports.sort();
                    ports.dedup();
                    match dp.sync_proxy_listeners(&ports, None) {
                        Ok(missing) if !missing.is_empty() => {
                            tracing::debug!(?missing, "proxy ports without a listener")
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!("registering proxy listeners: {e}"),
                    }
                }
            }
            if last_gc.elapsed() >= GC_EVERY {
                last_gc = Instant::now();
                match dp.gc() {
                    Ok(s) => tracing::debug!(?s, "conntrack gc"),
                    Err(e) => tracing::warn!("conntrack gc: {e}"),
                }
            }
        }
    })?;
    match dp_thread.join() {
        Ok(r) => r,
        Err(_) => anyhow::bail!("the datapath thread panicked"),
    }
}

/// Reads the objects directory and derives a snapshot; parse problems are logged.
fn load_snapshot(cfg: &AgentConfig, version: u64) -> Snapshot {
    let loaded = load_objects(&cfg.objects_dir);
    let mut snap = Snapshot::derive(&loaded.objects, &cfg.node_name, cfg.node_ip, &Redirects::new());
    snap.version = version;
    snap
}

fn load_objects(dir: &Path) -> yaml::Loaded {
    match yaml::load_path(dir) {
        Ok(l) => {
            for p in &l.problems {
                tracing::warn!("{p}");
            }
            l
        }
        Err(e) => {
            tracing::warn!("reading objects from {}: {e}", dir.display());
            yaml::Loaded::default()
        }
    }
}

fn events(mut reader: EventReader, node: &str, print: bool) {
    use std::io::Write;
    let stdout = std::io::stdout();
    loop {
        if !reader.wait(Duration::from_millis(500)) {
            continue;
        }
        let mut out = stdout.lock();
        reader.drain(|ev| {
            if print {
                let _ = writeln!(out, "{node}: {}", weft_observe::names::event_line(ev));
            }
        });
        let _ = out.flush();
    }
}
