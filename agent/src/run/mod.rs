//! `weft-agent run`: the agent process as named components, started and
//! watched by a supervisor.
//!
//! | component | owns | publishes (watch) | reads |
//! |---|---|---|---|
//! | [`control`] loop | the source, the [`Controller`](crate::controller::Controller) | snapshots, xDS resources, its report | ADS events, the datapath's problems |
//! | [`datapath`] worker (thread) | the eBPF datapath | [`DatapathStatus`](status::DatapathStatus) | snapshots, Envoy's pid |
//! | Envoy supervisor ([`crate::envoy`]) | the Envoy process | [`EnvoyState`] | |
//! | ADS server ([`crate::xds::server`]) | Envoy's xDS streams | ADS events | xDS resources |
//! | [`flows`]: pipeline, ring-buffer reader, access log, flow API, sync | the flow pipeline | its counters | snapshots (names), the datapath's ring-buffer counters |
//! | HTTP [`api`] | | | every status, through [`status::Readers`] |
//! | [`cni`] endpoint (with `cni-socket`) | weft-cni's attachments | the attachments | the datapath's status |
//!
//! Status flows one way, from the component that owns it to its readers; no
//! component writes into another's state. The supervisor notices every
//! component that ends (returns, fails or panics) and publishes each one's
//! state ([`status::Health`], in `/status`; `/readyz` fails from then on).
//! None of them ends while the agent is healthy (servers serve, loops loop,
//! Envoy's supervisor restarts Envoy), so any that does leaves the node
//! without a part it needs: the agent then ends with an error naming it and
//! exit status 1, and the kubelet restarts it. Restarting the datapath is
//! cheap (its maps and programs are pinned and keep forwarding meanwhile) and
//! a restart rebuilds every component from a clean state, which restarting
//! one in place could not promise (the flow pipeline's threads share its
//! store and queues).
//!
//! In debug builds only (tests; release builds do not contain the code),
//! `WEFT_TEST_PANIC=<component>` (kebab-case, `/status` names) makes that
//! component's task panic as it starts, to test the above.

pub mod api;
pub mod cni;
pub mod control;
pub mod datapath;
pub mod flows;
pub mod status;

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
};
use weft_observe::pipeline::{ringbuf::EventReader, spawn_reader};

use self::{
    control::{Channels, ControlLoop, First},
    status::{AgentCollector, Component, ComponentState, ControlReport, DatapathStatus, Health, Readers},
};
use crate::{
    config::AgentConfig,
    envoy::{self, EnvoySettings, EnvoyState},
    netns::NetnsGuard,
    xds::server::Ads,
};

/// Runs the agent until the process is stopped or a vital component ends.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let open_files = raise_fd_limit();
    tracing::info!(open_files, "open-file limit (Envoy inherits it)");
    // In a namespace of its own (the lab), the whole agent runs there: every
    // thread, and Envoy, starts from this one.
    let _netns = cfg.netns.as_deref().map(NetnsGuard::enter).transpose().context("entering netns")?;
    let rt = crate::limits::runtime(2)?;
    let result = rt.block_on(agent(cfg, open_files));
    // Threads that are still running (a component's, or a watcher blocked on
    // joining one) must not hold the exit.
    rt.shutdown_background();
    result
}

async fn agent(cfg: AgentConfig, open_files: u64) -> anyhow::Result<()> {
    tracing::info!(config = ?cfg, "starting weft-agent");
    // The sockets live here: only root (and socket-group) may enter.
    let access = cfg.socket_access()?;
    access.private_dir(&cfg.state_dir).with_context(|| format!("creating state-dir {}", cfg.state_dir.display()))?;
    let ready_file = cfg.state_dir.join("ready");
    let _ = std::fs::remove_file(&ready_file);

    // weft-cni's attachments as the last run left them, when pods come through it.
    let attachments = cfg.cni_socket.as_ref().map(|_| Arc::new(cni::load(&cni::store_path(&cfg.state_dir))));
    let (control, First { snapshot, published }) = ControlLoop::start(&cfg, open_files, attachments.clone()).await?;
    let node_ip = snapshot.node_ip.with_context(|| {
        format!(
            "no address for node {}: set node-ip, or add its Node object (status.addresses InternalIP) to {}",
            cfg.node_name,
            cfg.objects_dir.display()
        )
    })?;
    let api_addr: SocketAddr = cfg.api_address.parse().with_context(|| format!("api-address {:?}", cfg.api_address))?;

    let mut registry = Registry::with_prefix("weft");
    let (pipeline, feed, exporter) = flows::start(&cfg, &snapshot, &mut registry)?;
    let (peers, peers_rx) = flows::PeerFeed::new(&cfg, &snapshot);
    let flow_api = flows::serve(&cfg, &pipeline, peers_rx)?;

    let (snapshots_tx, snapshots_rx) = watch::channel(Arc::new(snapshot));
    let (xds_tx, xds_rx) = watch::channel(published);
    let (report_tx, report_rx) = watch::channel(ControlReport::default());
    let (datapath_tx, datapath_rx) = watch::channel(DatapathStatus::default());
    let (envoy_tx, envoy_rx) = watch::channel(EnvoyState::default());
    let (health_tx, health_rx) = watch::channel(Health::new());
    let (ads_tx, ads_rx) = mpsc::unbounded_channel();
    let (ring_tx, ring_rx) = oneshot::channel();
    report_tx.send_replace(control.report(&[]));

    let readers = Readers {
        node: cfg.node_name.clone(),
        envoy_needed: cfg.envoy.enabled,
        datapath: datapath_rx.clone(),
        control: report_rx,
        envoy: envoy_rx.clone(),
        health: health_rx,
        pipeline: pipeline.clone(),
        exporter,
    };
    registry.register_collector(Box::new(AgentCollector(readers.clone())));

    let mut sup = Supervisor { set: JoinSet::new(), health: health_tx };
    let worker = datapath::Worker {
        cfg: cfg.clone(),
        node_ip,
        snapshots: snapshots_rx.clone(),
        envoy: envoy_rx,
        status: datapath_tx,
        events: ring_tx,
        runtime: tokio::runtime::Handle::current(),
    };
    sup.thread(Component::Datapath, worker.spawn().context("starting the datapath thread")?);
    if let Some(t) = pipeline.take_worker() {
        sup.thread(Component::FlowPipeline, t);
    }
    sup.task(Component::FlowSync, flows::sync(pipeline.clone(), snapshots_rx, datapath_rx.clone(), peers));
    sup.thread(Component::AccessLog, flows::access_log(&cfg, &pipeline)?);
    sup.task(Component::FlowApi, flow_api);
    let xds_socket = cfg.state_dir.join("xds.sock");
    {
        let (ads, path) = (Ads::new(xds_rx, ads_tx), xds_socket.clone());
        sup.task(Component::Xds, async move { ads.serve_unix(&path, access).await });
    }
    let attachments_rx = match (&cfg.cni_socket, attachments) {
        (Some(socket), Some(initial)) => {
            let (tx, rx) = watch::channel(initial);
            let server = cni::CniServer::new(socket.clone(), cni::store_path(&cfg.state_dir), tx, datapath_rx.clone());
            sup.task(Component::Cni, server.run());
            Some(rx)
        }
        _ => None,
    };
    sup.task(
        Component::Control,
        control.run(Channels {
            attachments: attachments_rx,
            snapshots: snapshots_tx,
            xds: xds_tx,
            report: report_tx,
            ads_events: ads_rx,
            datapath: datapath_rx.clone(),
        }),
    );
    if cfg.envoy.enabled {
        let settings = envoy::find_binary(cfg.envoy.binary.as_deref()).map(|binary| EnvoySettings {
            binary,
            state_dir: cfg.state_dir.clone(),
            xds_socket,
            admin_port: cfg.envoy.admin_port,
            node_id: cfg.node_name.clone(),
            delta: cfg.envoy.delta,
            concurrency: cfg.envoy.concurrency,
            file_limit: cfg.envoy.spool_limit,
        });
        sup.task(Component::Envoy, async move { envoy::supervise(settings?, envoy_tx).await });
    }
    sup.task(Component::Api, api::serve(api_addr, readers, registry));

    // Until a vital component ends: start the ring-buffer reader once the
    // datapath hands over the ring, and write the ready file once the first
    // snapshot is applied.
    let mut ring_rx = Some(ring_rx);
    let mut feed = Some(feed);
    let mut datapath = datapath_rx;
    let mut ready_written = false;
    loop {
        tokio::select! {
            Some((component, state)) = sup.next() => {
                return Err(match state {
                    ComponentState::Running | ComponentState::Stopped => anyhow::anyhow!("the {component} stopped"),
                    ComponentState::Failed { error } => anyhow::anyhow!("the {component} failed: {error}"),
                    ComponentState::Panicked { message } => anyhow::anyhow!("the {component} panicked: {message}"),
                });
            }
            ring = async {
                match ring_rx.as_mut() {
                    Some(rx) => rx.await,
                    None => std::future::pending().await,
                }
            }, if ring_rx.is_some() => {
                ring_rx = None;
                if let (Ok(ring), Some(feed)) = (ring, feed.take()) {
                    sup.thread(Component::FlowEvents, spawn_reader(EventReader::new(ring), feed));
                }
            }
            changed = datapath.changed(), if !ready_written => {
                let applied = datapath.borrow_and_update().applied_version;
                if changed.is_ok() && applied > 0 {
                    std::fs::write(&ready_file, applied.to_string()).context("writing the ready file")?;
                    ready_written = true;
                }
                if changed.is_err() {
                    // The worker ended: its exit reaches the supervisor.
                    ready_written = true;
                }
            }
        }
    }
}

/// Runs components and notices when one ends: each is a task or a thread
/// whose end (return, error or panic) becomes its [`ComponentState`] in the
/// published [`Health`].
struct Supervisor {
    set: JoinSet<(Component, ComponentState)>,
    health: watch::Sender<Health>,
}

/// What a component's thread returns, as a state.
trait Outcome: Send + 'static {
    fn state(self) -> ComponentState;
}

impl Outcome for () {
    fn state(self) -> ComponentState {
        ComponentState::Stopped
    }
}

impl Outcome for anyhow::Result<()> {
    fn state(self) -> ComponentState {
        match self {
            Ok(()) => ComponentState::Stopped,
            Err(e) => ComponentState::Failed { error: format!("{e:#}") },
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

impl Supervisor {
    fn running(&self, c: Component) {
        self.health.send_modify(|h| {
            h.insert(c, ComponentState::Running);
        });
    }

    /// Runs a component as a task.
    fn task(&mut self, c: Component, fut: impl Future<Output = anyhow::Result<()>> + Send + 'static) {
        self.running(c);
        let handle = tokio::spawn(async move {
            test_panic(c);
            fut.await
        });
        self.set.spawn(async move {
            let state = match handle.await {
                Ok(r) => r.state(),
                Err(e) if e.is_panic() => ComponentState::Panicked { message: panic_message(&*e.into_panic()) },
                Err(e) => ComponentState::Failed { error: e.to_string() },
            };
            (c, state)
        });
    }

    /// Watches a component running on a thread of its own.
    fn thread<T: Outcome>(&mut self, c: Component, handle: std::thread::JoinHandle<T>) {
        self.running(c);
        self.set.spawn(async move {
            let state = match tokio::task::spawn_blocking(move || handle.join()).await {
                Ok(Ok(r)) => r.state(),
                Ok(Err(payload)) => ComponentState::Panicked { message: panic_message(&*payload) },
                Err(e) => ComponentState::Failed { error: format!("watching the thread: {e}") },
            };
            (c, state)
        });
    }

    /// The next component to end, once its state is published and logged.
    async fn next(&mut self) -> Option<(Component, ComponentState)> {
        let (c, state) = match self.set.join_next().await? {
            Ok(r) => r,
            // The watcher tasks neither panic nor get cancelled while the set lives.
            Err(e) => {
                tracing::error!("a component watcher failed: {e}");
                return None;
            }
        };
        match &state {
            ComponentState::Running => {}
            ComponentState::Stopped => tracing::warn!("the {c} stopped"),
            ComponentState::Failed { error } => tracing::error!("the {c} stopped: {error}"),
            ComponentState::Panicked { message } => tracing::error!("the {c} panicked: {message}"),
        }
        self.health.send_modify(|h| {
            h.insert(c, state.clone());
        });
        Some((c, state))
    }
}

/// Panics if `WEFT_TEST_PANIC` names `c` (debug builds only: see the module doc).
#[cfg(debug_assertions)]
fn test_panic(c: Component) {
    let name = serde_json::to_value(c).ok().and_then(|v| v.as_str().map(str::to_owned));
    if let (Some(wanted), Some(name)) = (std::env::var_os("WEFT_TEST_PANIC"), name) {
        assert!(wanted != name.as_str(), "WEFT_TEST_PANIC={name}");
    }
}

#[cfg(not(debug_assertions))]
fn test_panic(_: Component) {}

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
