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
//! exit status 1, and the kubelet restarts it. A component that ends because
//! another stopped publishing what it reads says so ([`status::InputGone`]),
//! and the error names the one that ended on its own, with its error: that is
//! the cause, even when its end is noticed after its readers'. Restarting the datapath is
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

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::{
    sync::{mpsc, oneshot, watch},
    task::JoinSet,
};
use weft_observe::pipeline::{ringbuf::EventReader, spawn_reader};

use self::{
    control::{Channels, ControlLoop, First},
    status::{AgentCollector, Component, ComponentState, ControlReport, DatapathStatus, Health, InputGone, Readers},
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
    let (mut control, First { snapshot, published }) =
        ControlLoop::start(&cfg, open_files, attachments.clone()).await?;
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

    let (snapshots_tx, snapshots_rx) = watch::channel(snapshot);
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
            file_flush_ms: cfg.envoy.access_log_flush_ms,
            stats: cfg.envoy.stats,
        });
        let datapath = datapath_rx.clone();
        let held: envoy::SocketsHeld = Box::new(move || datapath.borrow().proxy_sockets_held);
        let pipeline = pipeline.clone();
        sup.task(Component::Envoy, async move { envoy::supervise(settings?, envoy_tx, held, pipeline).await });
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
            Some(end) = sup.next() => return Err(sup.cause(end).await),
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

/// How long the supervisor waits for the end of a component whose output
/// another one missed (see [`Supervisor::cause`]). Its task or thread
/// returns right after dropping what it published.
const CAUSE_WAIT: Duration = Duration::from_secs(5);

/// Runs components and notices when one ends: each is a task or a thread
/// whose end (return, error or panic) becomes its [`ComponentState`] in the
/// published [`Health`].
struct Supervisor {
    set: JoinSet<End>,
    health: watch::Sender<Health>,
}

/// A component that ended, how, and whether because another one had.
struct End {
    component: Component,
    state: ComponentState,
    /// It failed with [`InputGone`]: this component's output stopped first.
    after: Option<Component>,
}

impl End {
    fn new(component: Component, state: ComponentState) -> Self {
        End { component, state, after: None }
    }

    /// A failure is kept as its error, whose [`InputGone`] names the cause.
    fn of(component: Component, result: anyhow::Result<()>) -> Self {
        match result {
            Ok(()) => End::new(component, ComponentState::Stopped),
            Err(e) => End {
                component,
                after: e.downcast_ref::<InputGone>().map(|g| g.0),
                state: ComponentState::Failed { error: format!("{e:#}") },
            },
        }
    }

    fn describe(&self) -> String {
        let c = self.component;
        match &self.state {
            ComponentState::Running | ComponentState::Stopped => format!("the {c} stopped"),
            ComponentState::Failed { error } => format!("the {c} failed: {error}"),
            ComponentState::Panicked { message } => format!("the {c} panicked: {message}"),
        }
    }
}

/// What a component's thread returns, as its end.
trait Outcome: Send + 'static {
    fn end(self, c: Component) -> End;
}

impl Outcome for () {
    fn end(self, c: Component) -> End {
        End::new(c, ComponentState::Stopped)
    }
}

impl Outcome for anyhow::Result<()> {
    fn end(self, c: Component) -> End {
        End::of(c, self)
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
            match handle.await {
                Ok(r) => End::of(c, r),
                Err(e) if e.is_panic() => {
                    End::new(c, ComponentState::Panicked { message: panic_message(&*e.into_panic()) })
                }
                Err(e) => End::new(c, ComponentState::Failed { error: e.to_string() }),
            }
        });
    }

    /// Watches a component running on a thread of its own.
    fn thread<T: Outcome>(&mut self, c: Component, handle: std::thread::JoinHandle<T>) {
        self.running(c);
        self.set.spawn(async move {
            match tokio::task::spawn_blocking(move || handle.join()).await {
                Ok(Ok(r)) => r.end(c),
                Ok(Err(payload)) => End::new(c, ComponentState::Panicked { message: panic_message(&*payload) }),
                Err(e) => End::new(c, ComponentState::Failed { error: format!("watching the thread: {e}") }),
            }
        });
    }

    /// The next component to end, once its state is published and logged.
    async fn next(&mut self) -> Option<End> {
        let end = match self.set.join_next().await? {
            Ok(r) => r,
            // The watcher tasks neither panic nor get cancelled while the set lives.
            Err(e) => {
                tracing::error!("a component watcher failed: {e}");
                return None;
            }
        };
        let (c, state) = (end.component, &end.state);
        match state {
            ComponentState::Running => {}
            ComponentState::Stopped => tracing::warn!("the {c} stopped"),
            ComponentState::Failed { error } => tracing::error!("the {c} stopped: {error}"),
            ComponentState::Panicked { message } => tracing::error!("the {c} panicked: {message}"),
        }
        self.health.send_modify(|h| {
            h.insert(c, state.clone());
        });
        Some(end)
    }

    /// The error the agent ends with, `first` having ended: a component that
    /// ended because another's output stopped ([`InputGone`]) is rarely the
    /// first to be noticed, so the ends that follow are awaited (up to
    /// [`CAUSE_WAIT`]) until one ended on its own; the error names that one
    /// first, then those that ended because of it.
    async fn cause(&mut self, first: End) -> anyhow::Error {
        let deadline = tokio::time::Instant::now() + CAUSE_WAIT;
        let mut ends = vec![first];
        while !ends.iter().any(|e| e.after.is_none()) {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(Some(end)) => ends.push(end),
                Ok(None) | Err(_) => break,
            }
        }
        let cause = ends.iter().position(|e| e.after.is_none()).unwrap_or(0);
        let cause = ends.remove(cause);
        let mut message = cause.describe();
        if !ends.is_empty() {
            let then: Vec<String> = ends.iter().map(|e| format!("the {}", e.component)).collect();
            message.push_str(&format!("; after it ended: {}", then.join(", ")));
        }
        anyhow::anyhow!(message)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn supervisor() -> Supervisor {
        Supervisor { set: JoinSet::new(), health: watch::channel(Health::new()).0 }
    }

    #[tokio::test]
    async fn the_error_names_the_component_that_ended_on_its_own_not_its_readers() {
        let mut sup = supervisor();
        // The reader notices first; the publisher's thread returns its error later.
        sup.task(Component::FlowSync, async { Err(InputGone(Component::Datapath).into()) });
        let slow = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            Err::<(), _>(anyhow::anyhow!("loading the datapath: attaching to eth0: no such device"))
        });
        sup.thread(Component::Datapath, slow);
        let first = sup.next().await.expect("an end");
        assert_eq!(first.component, Component::FlowSync);
        let err = sup.cause(first).await.to_string();
        assert_eq!(
            err,
            "the datapath worker failed: loading the datapath: attaching to eth0: no such device; \
             after it ended: the flow names and counters"
        );
        let health = sup.health.borrow().clone();
        assert!(matches!(health.get(&Component::Datapath), Some(ComponentState::Failed { .. })), "{health:?}");
    }

    #[tokio::test]
    async fn a_component_that_ended_on_its_own_is_reported_at_once() {
        let mut sup = supervisor();
        sup.task(Component::Api, async { Err(anyhow::anyhow!("binding 0.0.0.0:9962: address in use")) });
        sup.task(Component::FlowApi, std::future::pending());
        let first = sup.next().await.expect("an end");
        let started = std::time::Instant::now();
        let err = sup.cause(first).await.to_string();
        assert_eq!(err, "the HTTP API failed: binding 0.0.0.0:9962: address in use");
        assert!(started.elapsed() < CAUSE_WAIT, "waited for nothing");
    }

    #[tokio::test]
    async fn a_reader_whose_publisher_never_ends_is_reported_after_the_wait() {
        let mut sup = supervisor();
        sup.task(Component::FlowSync, async { Err(InputGone(Component::Control).into()) });
        let first = sup.next().await.expect("an end");
        let err = sup.cause(first).await.to_string();
        assert_eq!(err, "the flow names and counters failed: what it reads from the control loop stopped coming");
    }
}
