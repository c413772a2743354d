//! The control loop: the one writer of desired state. It reads the source
//! (the objects directory or the Kubernetes API) when the source says it
//! changed (and on a slow tick, the fallback), and follows Envoy's answers
//! over ADS; on every change the [`Controller`] builds new snapshots, which
//! it publishes: the xDS resources to the ADS server, the node's desired
//! state to the datapath worker and the flow pipeline. A snapshot that stops
//! handing a Service's connections to a proxy port reaches the datapath
//! before Envoy hears of it (the worker's applied version is awaited), so no
//! connection is handed to a listener Envoy is closing. It reads the datapath
//! worker's status back for that and for the problems the datapath found,
//! which its report and the source's Events carry. A Service is handed to
//! Envoy once Envoy ACKed the listener that serves it (see
//! [`Controller`]): that snapshot too is awaited before the report says the
//! object is ACKed, so a client that reads the ACK finds the Service handed.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};

use super::status::{ControlReport, DatapathStatus, XdsCounts};
use crate::{
    config::AgentConfig,
    controller::Controller,
    k8s::{source::Source, yaml},
    state::{Attachments, Snapshot},
    xds::{
        model::ListenerBudget,
        ports::ProxyPorts,
        server::{AdsEvent, Published},
    },
};

/// How often the source is checked for changes besides its own signal
/// (the directory without inotify, a directory created later) and
/// retired visibility configs for their time.
const SOURCE_POLL: Duration = Duration::from_millis(200);
/// How long Envoy's update waits for the datapath to stop handing
/// connections to the proxy ports it removes.
const DATAPATH_FIRST_WAIT: Duration = Duration::from_secs(2);

/// The loop and what it owns.
pub struct ControlLoop {
    controller: Controller,
    source: Source,
    xds_counts: XdsCounts,
}

/// What the first build produced, for the components that start from it.
pub struct First {
    pub snapshot: Arc<Snapshot>,
    pub published: Arc<Published>,
}

/// Where the loop publishes, and what it reads.
pub struct Channels {
    pub snapshots: watch::Sender<Arc<Snapshot>>,
    pub xds: watch::Sender<Arc<Published>>,
    pub report: watch::Sender<ControlReport>,
    pub ads_events: mpsc::UnboundedReceiver<AdsEvent>,
    pub datapath: watch::Receiver<DatapathStatus>,
    /// weft-cni's attachments (with `cni-socket`).
    pub attachments: Option<watch::Receiver<Arc<Attachments>>>,
}

impl ControlLoop {
    /// Reads the source and builds the first snapshots. With the Kubernetes
    /// API, returns once every watched kind has been listed, so the first
    /// state is complete.
    pub async fn start(
        cfg: &AgentConfig,
        open_files: u64,
        attachments: Option<Arc<Attachments>>,
    ) -> anyhow::Result<(ControlLoop, First)> {
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
        controller.set_listener_groups(cfg.envoy.listener_group_size);
        controller.set_attachments(attachments);
        controller.set_l7_visibility(cfg.l7_visibility);
        let mut source = Source::start(cfg).await?;
        controller.load(log_problems(source.poll().unwrap_or_default()));
        let (snapshot, published) = controller.build();
        let control = ControlLoop { controller, source, xds_counts: XdsCounts { pushes: 1, ..Default::default() } };
        Ok((control, First { snapshot, published }))
    }

    /// The report as of now.
    pub fn report(&mut self, datapath_problems: &[String]) -> ControlReport {
        ControlReport { control: self.controller.status(datapath_problems), xds: self.xds_counts.clone() }
    }

    /// Loads what changed in the source; true if a build is due (a change,
    /// or a retired visibility config's time is up).
    fn read_source(&mut self) -> bool {
        let t0 = std::time::Instant::now();
        match self.source.poll() {
            Some(loaded) => {
                let read = t0.elapsed();
                self.controller.load(log_problems(loaded));
                tracing::debug!(?read, took = ?t0.elapsed(), "source changes read and loaded");
                true
            }
            None => self.controller.retirement_due(),
        }
    }

    /// Runs until the agent stops (the supervisor watches the readers).
    pub async fn run(mut self, ch: Channels) -> anyhow::Result<()> {
        let Channels { snapshots, xds, report, mut ads_events, mut datapath, mut attachments } = ch;
        let mut tick = tokio::time::interval(SOURCE_POLL);
        let mut datapath_problems = datapath.borrow_and_update().problems.clone();
        let mut touched = true;
        let mut datapath_alive = true;
        loop {
            let mut rebuild = tokio::select! {
                () = self.source.changed() => self.read_source(),
                _ = tick.tick() => self.read_source(),
                Some(ev) = ads_events.recv() => {
                    touched = true;
                    self.xds_counts.count(&ev);
                    self.controller.on_event(ev)
                }
                Some(a) = next_attachments(&mut attachments) => {
                    self.controller.set_attachments(Some(a));
                    true
                }
                changed = datapath.changed(), if datapath_alive => {
                    // A worker that stopped is the supervisor's to handle.
                    datapath_alive = changed.is_ok();
                    let st = datapath.borrow_and_update();
                    if st.problems != datapath_problems {
                        datapath_problems = st.problems.clone();
                        touched = true;
                    }
                    false
                }
            };
            // Envoy's answers already waiting join this build (a burst of
            // NACKs costs one build, and none waits behind another build).
            while let Ok(ev) = ads_events.try_recv() {
                touched = true;
                self.xds_counts.count(&ev);
                rebuild |= self.controller.on_event(ev);
            }
            if rebuild {
                let t0 = std::time::Instant::now();
                let (snap, published) = self.controller.build();
                tracing::debug!(took = ?t0.elapsed(), version = snap.version, "built");
                if !Arc::ptr_eq(&published, &xds.borrow()) {
                    self.xds_counts.pushes += 1;
                }
                let (version, datapath_first) = (snap.version, snapshots.borrow().stops_proxying_in(&snap));
                // send_replace: a reader that is gone is the supervisor's to handle.
                snapshots.send_replace(snap);
                if datapath_first && datapath_alive {
                    // The datapath stops handing connections to a proxy port
                    // before Envoy closes its listener: a connection handed
                    // to a listener Envoy no longer accepts on would be reset.
                    match applied(&mut datapath, version).await {
                        Applied::Now(problems) if problems != datapath_problems => {
                            datapath_problems = problems;
                            touched = true;
                        }
                        Applied::Now(_) => {}
                        Applied::Gone => datapath_alive = false,
                        Applied::Late => tracing::warn!(
                            version,
                            "the datapath did not apply a snapshot within {DATAPATH_FIRST_WAIT:?}; updating Envoy anyway"
                        ),
                    }
                }
                xds.send_replace(published);
            } else if let Some(snap) = self.controller.redirects_settled() {
                // Envoy ACKed listeners of Services the datapath does not hand
                // it yet: hand them, and report once the datapath did.
                let version = snap.version;
                snapshots.send_replace(snap);
                touched = true;
                if datapath_alive {
                    match applied(&mut datapath, version).await {
                        Applied::Now(problems) => datapath_problems = problems,
                        Applied::Gone => datapath_alive = false,
                        Applied::Late => tracing::warn!(
                            version,
                            "the datapath did not apply a snapshot within {DATAPATH_FIRST_WAIT:?}"
                        ),
                    }
                }
            }
            if touched || rebuild {
                let r = self.report(&datapath_problems);
                self.source.observe(&r.control);
                report.send_replace(r);
                touched = false;
            }
        }
    }
}

/// What became of a snapshot sent to the datapath worker.
enum Applied {
    /// Applied; the problems the worker reports now.
    Now(Vec<String>),
    /// The worker is gone (the supervisor's to handle).
    Gone,
    /// Not within [`DATAPATH_FIRST_WAIT`].
    Late,
}

/// Waits until the datapath worker applied snapshot `version` (or a later one).
async fn applied(datapath: &mut watch::Receiver<DatapathStatus>, version: u64) -> Applied {
    let done = datapath.wait_for(|st| st.applied_version >= version);
    match tokio::time::timeout(DATAPATH_FIRST_WAIT, done).await {
        Ok(Ok(st)) => Applied::Now(st.problems.clone()),
        Ok(Err(_)) => Applied::Gone,
        Err(_) => Applied::Late,
    }
}

/// The attachments when they change; never, without weft-cni (or once its
/// endpoint is gone: the supervisor handles that).
async fn next_attachments(rx: &mut Option<watch::Receiver<Arc<Attachments>>>) -> Option<Arc<Attachments>> {
    let Some(r) = rx.as_mut() else { return std::future::pending().await };
    match r.changed().await {
        Ok(()) => Some(r.borrow_and_update().clone()),
        Err(_) => {
            *rx = None;
            std::future::pending().await
        }
    }
}

fn log_problems(l: yaml::Loaded) -> yaml::Loaded {
    for p in &l.problems {
        tracing::warn!("{p}");
    }
    l
}
