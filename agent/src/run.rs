//! `weft-agent run`: sources -> controller -> (datapath, xDS -> Envoy), and
//! the agent's HTTP API.
//!
//! The controller task is the one writer of desired state; the datapath
//! thread applies snapshots (and collects garbage, and keeps the proxy's
//! listeners registered); the ADS server feeds Envoy, which the supervisor
//! keeps running; the events thread drains the ring buffer.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, mpsc as std_mpsc},
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use weft_observe::ringbuf::EventReader;

use crate::{
    config::AgentConfig,
    controller::{ControlStatus, Controller},
    datapath::{Datapath, EventStats},
    envoy::{self, EnvoySettings, EnvoyState},
    k8s::yaml,
    netns::NetnsGuard,
    reconcile::Reconciler,
    state::Snapshot,
    xds::{ports::ProxyPorts, server::Ads},
};

/// How often the objects directory is checked for changes.
const SOURCE_POLL: Duration = Duration::from_millis(200);
/// How often expired connections are collected.
const GC_EVERY: Duration = Duration::from_secs(30);
/// How often missing proxy listeners are looked for.
const PROXY_SYNC_EVERY: Duration = Duration::from_millis(500);

/// The datapath thread's report, for status.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DatapathStatus {
    pub applied_version: u64,
    pub services: usize,
    pub endpoints: usize,
    pub problems: Vec<String>,
    pub proxy_ports_without_listener: Vec<u16>,
    pub events_emitted: u64,
    pub events_lost: u64,
}

/// Everything `/status` reports.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AgentStatus {
    pub node: String,
    pub ready: bool,
    pub datapath: DatapathStatus,
    pub envoy: EnvoyState,
    pub control: ControlStatus,
}

/// Runs the agent until the process is stopped.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    raise_fd_limit();
    // In a namespace of its own (the lab), the whole agent runs there: every
    // thread, and Envoy, starts from this one.
    let _netns = cfg.netns.as_deref().map(NetnsGuard::enter).transpose().context("entering netns")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(agent(cfg))
}

async fn agent(cfg: AgentConfig) -> anyhow::Result<()> {
    tracing::info!(config = ?cfg, "starting weft-agent");
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("creating state-dir {}", cfg.state_dir.display()))?;
    let ready_file = cfg.state_dir.join("ready");
    let _ = std::fs::remove_file(&ready_file);

    let mut controller = Controller::new(
        cfg.node_name.clone(),
        cfg.node_ip,
        ProxyPorts::load(Some(cfg.state_dir.join("proxy-ports.json"))),
    );
    let mut source = crate::k8s::source::Source::start(&cfg).await?;
    controller.load(log_problems(source.poll().unwrap_or_default()));
    let (first, published) = controller.build();
    let node_ip = first.node_ip.with_context(|| {
        format!(
            "no address for node {}: set node-ip, or add its Node object (status.addresses InternalIP) to {}",
            cfg.node_name,
            cfg.objects_dir.display()
        )
    })?;

    let status = Arc::new(Mutex::new(AgentStatus { node: cfg.node_name.clone(), ..Default::default() }));
    let (envoy_tx, envoy_rx) = watch::channel(EnvoyState::default());
    let (dp_tx, dp_rx) = std_mpsc::channel::<Snapshot>();
    dp_tx.send(first).expect("receiver alive");
    let dp_thread = spawn_datapath(&cfg, node_ip, dp_rx, envoy_rx.clone(), status.clone())?;

    let (xds_tx, xds_rx) = watch::channel(published);
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
    let xds_socket = cfg.state_dir.join("xds.sock");
    {
        let ads = Ads::new(xds_rx, ev_tx);
        let path = xds_socket.clone();
        tokio::spawn(async move {
            if let Err(e) = ads.serve_unix(&path).await {
                tracing::error!("ADS server stopped: {e:#}");
            }
        });
    }
    if cfg.envoy.enabled {
        let settings = EnvoySettings {
            binary: envoy::find_binary(cfg.envoy.binary.as_deref()),
            state_dir: cfg.state_dir.clone(),
            xds_socket,
            als_socket: cfg.state_dir.join("als.sock"),
            admin_port: cfg.envoy.admin_port,
            node_id: cfg.node_name.clone(),
            delta: cfg.envoy.delta,
            concurrency: cfg.envoy.concurrency,
        };
        tokio::spawn(async move {
            if let Err(e) = envoy::supervise(settings, envoy_tx).await {
                tracing::error!("Envoy supervisor stopped: {e:#}");
            }
        });
    }
    {
        let addr: SocketAddr = cfg.api_address.parse().expect("validated");
        let status = status.clone();
        let envoy_rx = envoy_rx.clone();
        let envoy_needed = cfg.envoy.enabled;
        tokio::spawn(async move {
            if let Err(e) = serve_api(addr, status, envoy_rx, envoy_needed).await {
                tracing::error!("API server on {addr} stopped: {e:#}");
            }
        });
    }

    let mut tick = tokio::time::interval(SOURCE_POLL);
    let mut ready_written = false;
    let mut touched = true;
    loop {
        let rebuild = tokio::select! {
            _ = tick.tick() => match source.poll() {
                Some(loaded) => {
                    controller.load(log_problems(loaded));
                    true
                }
                None => false,
            },
            Some(ev) = ev_rx.recv() => {
                touched = true;
                controller.on_event(ev)
            }
        };
        if rebuild {
            let (snap, published) = controller.build();
            let _ = xds_tx.send(published);
            if dp_tx.send(snap).is_err() {
                break;
            }
        }
        touched |= rebuild;
        {
            let mut st = status.lock().unwrap();
            if touched {
                st.control = controller.status(&st.datapath.problems);
                source.observe(&st.control);
                touched = false;
            }
            st.envoy = envoy_rx.borrow().clone();
            st.ready = st.datapath.applied_version > 0 && (!cfg.envoy.enabled || st.envoy.ready);
            if !ready_written && st.datapath.applied_version > 0 {
                std::fs::write(&ready_file, st.datapath.applied_version.to_string())
                    .context("writing the ready file")?;
                ready_written = true;
            }
        }
        if dp_thread.is_finished() {
            break;
        }
    }
    match dp_thread.join() {
        Ok(r) => r,
        Err(_) => anyhow::bail!("the datapath thread panicked"),
    }
}

/// The datapath thread: applies snapshots, collects garbage, registers the
/// proxy's listeners.
fn spawn_datapath(
    cfg: &AgentConfig,
    node_ip: std::net::Ipv4Addr,
    snapshots: std_mpsc::Receiver<Snapshot>,
    envoy: watch::Receiver<EnvoyState>,
    status: Arc<Mutex<AgentStatus>>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let cfg = cfg.clone();
    Ok(std::thread::Builder::new().name("datapath".into()).spawn(move || -> anyhow::Result<()> {
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
        let mut last_pid = None;
        loop {
            // Take the newest snapshot; older ones queued behind it are moot.
            let mut next = None;
            match snapshots.recv_timeout(Duration::from_millis(100)) {
                Ok(s) => next = Some(s),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
            while let Ok(s) = snapshots.try_recv() {
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
                let mut st = status.lock().unwrap();
                st.datapath.applied_version = snap.version;
                st.datapath.services = snap.services.len();
                st.datapath.endpoints = snap.pods.iter().filter(|p| p.local).count();
                st.datapath.problems = snap.problems.iter().chain(&applied.problems).cloned().collect();
                drop(st);
                current = Some(snap);
                last_proxy = Instant::now() - PROXY_SYNC_EVERY;
            }
            let pid = envoy.borrow().pid;
            if pid != last_pid {
                last_pid = pid;
                last_proxy = Instant::now() - PROXY_SYNC_EVERY;
            }
            if last_proxy.elapsed() >= PROXY_SYNC_EVERY {
                last_proxy = Instant::now();
                if let Some(snap) = &current {
                    let mut ports: Vec<u16> =
                        snap.services.iter().flat_map(|s| s.entries.iter().filter_map(|e| e.proxy_port)).collect();
                    ports.sort();
                    ports.dedup();
                    let pids = pid.map(|p| vec![p as i32]);
                    match dp.sync_proxy_listeners(&ports, if cfg.envoy.enabled { pids.as_deref() } else { None }) {
                        Ok(missing) => status.lock().unwrap().datapath.proxy_ports_without_listener = missing,
                        Err(e) => tracing::warn!("registering proxy listeners: {e}"),
                    }
                }
                if let Ok(EventStats { emitted, lost }) = dp.event_stats() {
                    let mut st = status.lock().unwrap();
                    st.datapath.events_emitted = emitted;
                    st.datapath.events_lost = lost;
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
    })?)
}

/// The agent's HTTP API.
async fn serve_api(
    addr: SocketAddr,
    status: Arc<Mutex<AgentStatus>>,
    envoy: watch::Receiver<EnvoyState>,
    envoy_needed: bool,
) -> anyhow::Result<()> {
    use axum::{Json, Router, http::StatusCode, routing::get};
    let st = status.clone();
    let ready_st = status.clone();
    let app = Router::new()
        .route(
            "/status",
            get(move || {
                let st = st.clone();
                let envoy = envoy.clone();
                async move {
                    let mut s = st.lock().unwrap().clone();
                    s.envoy = envoy.borrow().clone();
                    s.ready = s.datapath.applied_version > 0 && (!envoy_needed || s.envoy.ready);
                    Json(s)
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready_st.lock().unwrap().ready;
                async move {
                    if ready { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// Envoy holds a socket per listener and worker, the agent a few per
/// connection: take the hard limit on open files (Envoy inherits it).
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid out-pointer; setrlimit with values the kernel gave us.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn log_problems(l: yaml::Loaded) -> yaml::Loaded {
    for p in &l.problems {
        tracing::warn!("{p}");
    }
    l
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
