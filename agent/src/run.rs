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
use weft_observe::pipeline::{EventFeed, Pipeline, PipelineConfig, ringbuf::EventReader};

use crate::{
    config::AgentConfig,
    controller::{ControlStatus, Controller},
    datapath::{Datapath, EventStats},
    envoy::{self, EnvoySettings, EnvoyState},
    flows::{self, MapUsage, XdsCounts},
    k8s::yaml,
    netns::NetnsGuard,
    reconcile::Reconciler,
    state::Snapshot,
    xds::{model::ListenerBudget, ports::ProxyPorts, server::Ads},
};

/// How often the objects directory is checked for changes.
const SOURCE_POLL: Duration = Duration::from_millis(200);
/// How often expired connections are collected.
const GC_EVERY: Duration = Duration::from_secs(30);
/// How often missing proxy listeners are looked for (and the datapath's
/// event counters read).
const PROXY_SYNC_EVERY: Duration = Duration::from_millis(500);
/// How often map occupancy is counted.
const MAP_USAGE_EVERY: Duration = Duration::from_secs(10);

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
    pub maps: Vec<MapUsage>,
}

/// The flow pipeline, for status.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FlowStatus {
    pub flows_stored: u64,
    pub flows_seen: u64,
    pub store_capacity: u64,
    /// Flows per second over the last minute.
    pub rate: f64,
    pub events_read: u64,
    pub access_log_entries: u64,
    /// Lost events by where they were lost.
    pub lost: BTreeMap<&'static str, u64>,
}

impl FlowStatus {
    fn of(p: &Pipeline) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let st = p.store.stats(weft_flow::time::now_ns() / 1_000_000_000);
        let c = &p.counters;
        FlowStatus {
            flows_stored: st.num_flows,
            flows_seen: st.seen_flows,
            store_capacity: st.max_flows,
            rate: st.rate,
            events_read: c.events_read.load(Relaxed),
            access_log_entries: c.l7_received.load(Relaxed),
            lost: weft_observe::pipeline::record::LostSource::ALL.iter().map(|s| (s.label(), c.lost(*s))).collect(),
        }
    }
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
    pub xds: XdsCounts,
    pub flows: FlowStatus,
}

/// Runs the agent until the process is stopped.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let open_files = raise_fd_limit();
    tracing::info!(open_files, "open-file limit (Envoy inherits it)");
    // In a namespace of its own (the lab), the whole agent runs there: every
    // thread, and Envoy, starts from this one.
    let _netns = cfg.netns.as_deref().map(NetnsGuard::enter).transpose().context("entering netns")?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(agent(cfg, open_files))
}

async fn agent(cfg: AgentConfig, open_files: u64) -> anyhow::Result<()> {
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
    if cfg.envoy.enabled {
        // Envoy's --concurrency 0 means a worker per CPU.
        let workers = match cfg.envoy.concurrency {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            n => n,
        };
        controller.set_listener_budget(ListenerBudget { open_files, workers });
    }
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
    let (pipeline, feed) = Pipeline::start(
        PipelineConfig {
            store_capacity: cfg.flows.store_size,
            queue_capacity: cfg.flows.queue_size,
            ..Default::default()
        },
        flows::names(&first),
    );
    let metrics_context = weft_observe::export::metrics::Context::parse(&cfg.flows.metrics_context).expect("validated");
    let (registry, flow_metrics) = flows::registry(&pipeline, status.clone(), metrics_context);
    pipeline.add_sink(Box::new(flow_metrics));
    if cfg.print_events {
        pipeline.add_sink(Box::new(flows::PrintSink { node: cfg.node_name.clone() }));
    }
    if let Some(o) = &cfg.flows.otlp {
        weft_observe::export::otlp::start(o.exporter()?, pipeline.clone()).map_err(anyhow::Error::msg)?;
    }
    {
        let p = pipeline.clone();
        let path = cfg.state_dir.join("als.sock");
        tokio::spawn(async move {
            if let Err(e) = weft_observe::pipeline::als::serve_unix(p, &path).await {
                tracing::error!("access-log server stopped: {e:#}");
            }
        });
    }
    {
        let listen = weft_observe::api::server::Listen {
            tcp: (!cfg.flows.address.is_empty()).then(|| cfg.flows.address.parse().expect("validated")),
            unix: Some(cfg.flows.socket.clone().unwrap_or_else(|| cfg.state_dir.join("observer.sock"))),
            tls: cfg.flows.tls.as_ref().map(|t| t.load()).transpose()?,
        };
        let p = pipeline.clone();
        tokio::spawn(async move {
            if let Err(e) = weft_observe::api::server::serve(p, listen).await {
                tracing::error!("flow API stopped: {e:#}");
            }
        });
    }
    let (envoy_tx, envoy_rx) = watch::channel(EnvoyState::default());
    let (dp_tx, dp_rx) = std_mpsc::channel::<Snapshot>();
    dp_tx.send(first).expect("receiver alive");
    let dp_thread = spawn_datapath(&cfg, node_ip, dp_rx, envoy_rx.clone(), status.clone(), feed, pipeline.clone())?;

    let (xds_tx, xds_rx) = watch::channel(published);
    status.lock().unwrap().xds.pushes = 1;
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
        let api =
            Api { status, envoy: envoy_rx, envoy_needed, registry: Arc::new(registry), pipeline: pipeline.clone() };
        tokio::spawn(async move {
            if let Err(e) = serve_api(addr, api).await {
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
                {
                    let mut st = status.lock().unwrap();
                    match &ev {
                        crate::xds::server::AdsEvent::Ack { .. } => st.xds.acks += 1,
                        crate::xds::server::AdsEvent::Nack { .. } => st.xds.nacks += 1,
                        _ => {}
                    }
                }
                controller.on_event(ev)
            }
        };
        if rebuild {
            let (snap, published) = controller.build();
            if !Arc::ptr_eq(&published, &xds_tx.borrow()) {
                status.lock().unwrap().xds.pushes += 1;
            }
            let _ = xds_tx.send(published);
            pipeline.set_names(flows::names(&snap));
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
    feed: EventFeed,
    pipeline: Arc<Pipeline>,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let cfg = cfg.clone();
    Ok(std::thread::Builder::new().name("datapath".into()).spawn(move || -> anyhow::Result<()> {
        let mut dp = Datapath::open(cfg.datapath(node_ip)).context("loading the datapath")?;
        if let Some(ring) = dp.take_events() {
            weft_observe::pipeline::spawn_reader(EventReader::new(ring), feed);
        }
        let mut rec = Reconciler::new(cfg.devices.clone());
        let mut current: Option<Snapshot> = None;
        let mut last_maps = Instant::now() - MAP_USAGE_EVERY;
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
                let applied = rec.apply(&mut dp, &snap, &snap.policy.endpoints).context("applying desired state")?;
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
                if let Ok(EventStats { emitted, lost, lost_per_cpu }) = dp.event_stats() {
                    pipeline.kernel_counters(emitted, &lost_per_cpu);
                    let mut st = status.lock().unwrap();
                    st.datapath.events_emitted = emitted;
                    st.datapath.events_lost = lost;
                }
            }
            if last_maps.elapsed() >= MAP_USAGE_EVERY {
                last_maps = Instant::now();
                let usage =
                    dp.map_usage().into_iter().map(|(map, entries, capacity)| MapUsage { map, entries, capacity });
                status.lock().unwrap().datapath.maps = usage.collect();
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

/// What the agent's HTTP API serves from.
struct Api {
    status: Arc<Mutex<AgentStatus>>,
    envoy: watch::Receiver<EnvoyState>,
    envoy_needed: bool,
    registry: Arc<prometheus_client::registry::Registry>,
    pipeline: Arc<Pipeline>,
}

impl Api {
    fn status(&self) -> AgentStatus {
        let mut s = self.status.lock().unwrap().clone();
        s.envoy = self.envoy.borrow().clone();
        s.ready = s.datapath.applied_version > 0 && (!self.envoy_needed || s.envoy.ready);
        s.flows = FlowStatus::of(&self.pipeline);
        s
    }
}

/// The agent's HTTP API: /status, /healthz, /readyz, /metrics.
async fn serve_api(addr: SocketAddr, api: Api) -> anyhow::Result<()> {
    use axum::{
        Json, Router,
        http::{StatusCode, header},
        routing::get,
    };
    let api = Arc::new(api);
    let (a1, a2, a3) = (api.clone(), api.clone(), api.clone());
    let app = Router::new()
        .route("/status", get(move || std::future::ready(Json(a1.status()))))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = a2.status.lock().unwrap().ready;
                async move {
                    if ready { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = flows::encode(&a3.registry);
                std::future::ready((
                    [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
                    body,
                ))
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await?;
    Ok(())
}

/// Envoy holds a socket per listener and worker, the agent a few per
/// connection: raise the open-file limit (Envoy inherits it) to the kernel's
/// ceiling (fs.nr_open, at most 2^20) where the agent may (CAP_SYS_RESOURCE),
/// else to the hard limit. Returns the limit in effect.
pub fn raise_fd_limit() -> u64 {
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20)
        .min(1 << 20);
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointers; setrlimit with values the kernel gave us or
    // below its ceiling; a refusal leaves the limit as it was.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_max < ceiling {
            let up = libc::rlimit { rlim_cur: ceiling, rlim_max: ceiling };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &up) == 0 {
                return ceiling;
            }
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            }
        }
    }
    lim.rlim_cur
}

fn log_problems(l: yaml::Loaded) -> yaml::Loaded {
    for p in &l.problems {
        tracing::warn!("{p}");
    }
    l
}
