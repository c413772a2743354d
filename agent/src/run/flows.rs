//! The flow pipeline as a component of the agent: started from the agent's
//! config (store and queue sizes, metrics labels, OTLP, `print-events`), with
//! its metrics in the agent's registry; [`access_log`] reads Envoy's
//! access-log spool into it, [`serve`] runs the Hubble-compatible flow API, and
//! [`sync`] keeps the pipeline's inputs in step with the other components:
//! names for flows from each snapshot of the control loop, and the
//! datapath's ring-buffer counters for loss accounting, and the nodes the
//! flow API's Peer service announces ([`PeerFeed`]). The flow API's TLS
//! files are read again every [`TLS_RELOAD`], so renewed certificates are
//! served without a restart.

use std::{collections::BTreeMap, future::Future, sync::Arc};

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use weft_ebpf::abi;
use weft_observe::{
    api::{
        peer::{self, PeerInfo, PeerList},
        server::{self, Listen, TlsSource},
    },
    export::{
        metrics::{self as fm, FlowMetrics, PipelineCollector},
        otlp,
    },
    pipeline::{
        EventFeed, Pipeline, PipelineConfig, Sink,
        enrich::{Names, PolicyName, workload},
        record::{EndpointInfo, Entry, ServiceInfo},
        spool::{self, SpoolDir, SpoolReader},
    },
};

use super::status::{Component, DatapathStatus, InputGone};
use crate::{
    config::AgentConfig,
    state::{FrontendOwners, ServiceState, Snapshot},
};

/// How often the flow API's TLS files are read again (a renewed Secret
/// reaches the pod's files within about a minute).
const TLS_RELOAD: std::time::Duration = std::time::Duration::from_secs(10);

/// Starts the pipeline's thread with names from the first snapshot, adds its
/// sinks (metrics, OTLP, `print-events`) and registers its metrics. The feed
/// is for the ring-buffer reader; the OTLP exporter's counts are for status.
pub fn start(
    cfg: &AgentConfig,
    first: &Snapshot,
    registry: &mut Registry,
) -> anyhow::Result<(Arc<Pipeline>, EventFeed, Option<Arc<otlp::ExportStats>>)> {
    let (pipeline, feed) = Pipeline::start(
        PipelineConfig {
            store_capacity: cfg.flows.store_size,
            queue_capacity: cfg.flows.queue_size,
            thread_stack_bytes: crate::limits::THREAD_STACK_BYTES,
            ..Default::default()
        },
        names(first),
    );
    let context =
        fm::Context::parse(&cfg.flows.metrics_context).map_err(anyhow::Error::msg).context("flows.metrics-context")?;
    let flow_metrics = FlowMetrics::register(registry, context);
    registry.register_collector(Box::new(PipelineCollector(pipeline.clone())));
    pipeline.add_sink(Box::new(flow_metrics));
    if cfg.print_events {
        pipeline.add_sink(Box::new(PrintSink { node: cfg.node_name.clone() }));
    }
    let exporter = match cfg.otlp(&otlp::ProcessEnv)? {
        Some(o) => {
            let stats = otlp::start(o, pipeline.clone())?;
            registry.register_collector(Box::new(fm::OtlpCollector(stats.clone())));
            Some(stats)
        }
        None => None,
    };
    Ok((pipeline, feed, exporter))
}

/// The spool Envoy writes its access log to, under the state directory
/// (Envoy's working directory).
pub fn spool_dir(cfg: &AgentConfig) -> std::path::PathBuf {
    let log = cfg.state_dir.join(crate::xds::translate::ACCESS_LOG_PATH);
    log.parent().map_or_else(|| cfg.state_dir.clone(), |d| d.to_owned())
}

/// Starts the thread that reads Envoy's access-log spool into the pipeline,
/// from where the last agent stopped.
pub fn access_log(cfg: &AgentConfig, pipeline: &Arc<Pipeline>) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let dir = spool_dir(cfg);
    let reader = SpoolDir::create(&dir)
        .and_then(SpoolReader::open)
        .with_context(|| format!("opening the access-log spool {}", dir.display()))?;
    spool::spawn_reader(pipeline.clone(), reader).context("starting the access-log reader")
}

/// The nodes the Peer service announces, kept in step with the snapshots:
/// every node with an address (this one too, with its configured address),
/// at the flow API's port, with the TLS server name of weft's convention
/// when the flow API speaks TLS.
pub struct PeerFeed {
    port: u16,
    tls: bool,
    tx: watch::Sender<PeerList>,
}

impl PeerFeed {
    /// The feed and what the flow API reads, from the first snapshot.
    pub fn new(cfg: &AgentConfig, snap: &Snapshot) -> (PeerFeed, watch::Receiver<PeerList>) {
        let port =
            cfg.flows.tcp_address().and_then(|a| a.parse::<std::net::SocketAddr>().ok()).map_or(4244, |a| a.port());
        let (tx, rx) = watch::channel(PeerList::default());
        let feed = PeerFeed { port, tls: cfg.flows.tls.is_some(), tx };
        feed.update(snap);
        (feed, rx)
    }

    /// Publishes the snapshot's nodes if they changed.
    pub fn update(&self, snap: &Snapshot) {
        let cluster = &Names::new(snap.node_name.clone()).cluster;
        let mut nodes: BTreeMap<&str, std::net::Ipv4Addr> =
            snap.nodes.iter().map(|n| (n.name.as_str(), n.ip)).collect();
        if let Some(ip) = snap.node_ip {
            nodes.insert(&snap.node_name, ip);
        }
        let list: BTreeMap<String, PeerInfo> = nodes
            .into_iter()
            .map(|(node, ip)| {
                let p = PeerInfo {
                    name: peer::peer_name(node, cluster),
                    address: std::net::SocketAddr::from((ip, self.port)).to_string(),
                    tls_server_name: self.tls.then(|| weft_flow::names::flow_server_name(node, cluster)),
                };
                (p.name.clone(), p)
            })
            .collect();
        self.tx.send_if_modified(|now| {
            let changed = **now != list;
            if changed {
                *now = Arc::new(list);
            }
            changed
        });
    }
}

/// The flow API, to run as a component.
pub fn serve(
    cfg: &AgentConfig,
    pipeline: &Arc<Pipeline>,
    peers: watch::Receiver<PeerList>,
) -> anyhow::Result<impl Future<Output = anyhow::Result<()>> + use<>> {
    let access = cfg.socket_access()?;
    let listen = Listen {
        tcp: match cfg.flows.tcp_address() {
            None => None,
            Some(a) => Some(a.parse().with_context(|| format!("flows.address {a:?}"))?),
        },
        unix: Some(cfg.flows.socket.clone().unwrap_or_else(|| cfg.state_dir.join("observer.sock"))),
        tls: match &cfg.flows.tls {
            Some(files) => {
                // Checked now (a bad file stops the start; files not there
                // yet are waited for), read again as renewed.
                let files = files.for_node(&cfg.node_name);
                if !files.absent() {
                    files.load()?;
                }
                Some(TlsSource { load: Arc::new(move || files.load().map_err(|e| e.into())), every: TLS_RELOAD })
            }
            None => None,
        },
        limits: cfg.flows.stream_limits(),
        access,
        peers: Some(peers),
    };
    let p = pipeline.clone();
    Ok(async move { server::serve(p, listen).await })
}

/// Follows the control loop's snapshots (names for flows, the Peer
/// service's nodes) and the datapath's ring-buffer counters (loss notices);
/// fails with [`InputGone`] naming the publisher that is gone.
pub async fn sync(
    pipeline: Arc<Pipeline>,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    mut datapath: watch::Receiver<DatapathStatus>,
    peers: PeerFeed,
) -> anyhow::Result<()> {
    let mut feed = NameFeed::default();
    loop {
        tokio::select! {
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return Err(InputGone(Component::Control).into());
                }
                let snap = snapshots.borrow_and_update().clone();
                pipeline.set_names(feed.update(&snap).clone());
                peers.update(&snap);
            }
            changed = datapath.changed() => {
                if changed.is_err() {
                    return Err(InputGone(Component::Datapath).into());
                }
                let stats = datapath.borrow_and_update().event_stats.clone();
                if let Some(s) = stats {
                    pipeline.kernel_counters(s.emitted, &s.lost_per_cpu);
                }
            }
        }
    }
}

/// Names for flows from a snapshot: pods, nodes, Service frontends, policies.
/// The oracle of [`NameFeed`], and the pipeline's first names.
pub fn names(snap: &Snapshot) -> Names {
    let mut n = Names::new(snap.node_name.clone());
    name_endpoints(snap, &mut n);
    for s in &snap.services {
        let info = service_info(s);
        for f in s.entries.iter().map(|e| &e.frontend) {
            n.add_service(f.addr, f.port, f.proto.number(), info.clone());
        }
    }
    n
}

/// Names the snapshot's pods, nodes and policies (everything but Services).
fn name_endpoints(snap: &Snapshot, n: &mut Names) {
    if let Some(me) = snap.nodes.iter().find(|x| x.name == snap.node_name) {
        n.node_labels = me.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    }
    for p in &snap.pods {
        let labels =
            snap.identities.get(&p.identity).map(|s| s.labels().map(str::to_owned).collect()).unwrap_or_default();
        let owner = p.owner.as_ref().map(|(k, n)| (k.as_str(), n.as_str()));
        let hash = p.labels.get("pod-template-hash").map(String::as_str);
        n.add_endpoint(
            p.ip,
            EndpointInfo {
                namespace: p.key.namespace.clone(),
                pod: p.key.name.clone(),
                labels,
                workloads: workload(owner, hash).into_iter().collect(),
                identity: p.identity,
                node: p.node.clone(),
                local: p.local,
            },
        );
    }
    let mut node_ips: Vec<_> = snap.nodes.iter().map(|x| (x.ip, x.name.clone())).collect();
    if let Some(ip) = snap.node_ip {
        node_ips.push((ip, snap.node_name.clone()));
    }
    for (ip, name) in node_ips {
        let own = name == snap.node_name;
        n.add_endpoint(
            ip,
            EndpointInfo {
                labels: vec![if own { "reserved:host" } else { "reserved:remote-node" }.into()],
                identity: if own { abi::ID_HOST } else { abi::ID_REMOTE_NODE },
                node: name,
                ..Default::default()
            },
        );
    }
    for (id, p) in &snap.policy.rules {
        n.add_policy(
            *id,
            PolicyName { kind: p.kind.clone(), namespace: p.key.namespace.clone(), name: p.key.name.clone() },
        );
    }
}

fn service_info(s: &ServiceState) -> Arc<ServiceInfo> {
    Arc::new(ServiceInfo { namespace: s.key.namespace.clone(), name: s.key.name.clone() })
}

/// Names for flows kept in step with the snapshots: the Services' table
/// follows the Services that changed since the last snapshot (those it
/// does not share with it), so an endpoint change or an edit costs what
/// changed, not every Service; pods, nodes and policies are named again
/// only when they changed. Equals [`names`] of the same snapshot.
pub struct NameFeed {
    last: Option<Arc<Snapshot>>,
    names: Names,
    /// The Services that have each frontend: two Services with one
    /// frontend name it as [`names`] does, by the last in key order.
    owners: FrontendOwners,
}

impl Default for NameFeed {
    fn default() -> Self {
        // Named as `names` names them (the cluster's name too).
        Self { last: None, names: Names::new(String::new()), owners: FrontendOwners::default() }
    }
}

impl NameFeed {
    /// The names of `snap`.
    pub fn update(&mut self, snap: &Arc<Snapshot>) -> &Names {
        let same_endpoints = self.last.as_deref().is_some_and(|last| {
            last.node_name == snap.node_name
                && last.node_ip == snap.node_ip
                && last.pods == snap.pods
                && last.nodes == snap.nodes
                && last.identities == snap.identities
                && last.policy.rules == snap.policy.rules
        });
        if !same_endpoints {
            self.names.clear_all_but_services();
            self.names.node_name.clone_from(&snap.node_name);
            name_endpoints(snap, &mut self.names);
        }
        for t in self.owners.follow(&snap.services) {
            let (addr, port, proto) = (t.0, t.1, t.2.number());
            match self.owners.owners(&t).next_back() {
                Some(s) => self.names.add_service(addr, port, proto, service_info(s)),
                None => self.names.remove_service(addr, port, proto),
            }
        }
        self.last = Some(snap.clone());
        &self.names
    }
}

/// Prints every datapath record (`print-events`), for the demo and debugging.
pub struct PrintSink {
    pub node: String,
}

impl Sink for PrintSink {
    fn batch(&mut self, _first: u64, entries: &[Entry], _names: &Arc<Names>) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for e in entries {
            if let Entry::Flow(f) = e
                && !f.is_l7()
            {
                let _ = writeln!(out, "{}: {}", self.node, weft_observe::pipeline::ringbuf::event_line(&f.ev));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use crate::{k8s::ObjKey, reconcile::tests::service, state::PodState, xds::acks::tests::Rng};

    /// After random adds, edits and removals of Services (sharing the
    /// Services that did not change, as the control loop's snapshots do)
    /// and of pods, the names the feed keeps equal those named from
    /// scratch.
    #[test]
    fn followed_names_equal_names_from_scratch_after_every_random_step() {
        for seed in 1..=8u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut feed = NameFeed::default();
            let mut snap = Snapshot { node_name: "node1".into(), ..Default::default() };
            for step in 0..200 {
                let i = rng.below(12);
                let key = ObjKey::new("default", format!("s{i}"));
                let at = snap.services.binary_search_by(|s| s.key.cmp(&key));
                match (rng.below(5), at) {
                    (0, Ok(at)) => drop(snap.services.remove(at)),
                    (1, _) => {
                        let ip = Ipv4Addr::new(10, 1, 0, rng.below(4) as u8);
                        snap.pods.retain(|p| p.ip != ip);
                        if rng.below(2) == 0 {
                            snap.pods.push(PodState {
                                key: ObjKey::new("default", format!("p{ip}")),
                                ip,
                                node: "node1".into(),
                                labels: Default::default(),
                                identity: 0,
                                local: true,
                                owner: None,
                                device: None,
                            });
                        }
                    }
                    (2, _) => {} // a snapshot of nothing changed
                    (_, Ok(at)) => drop(snap.services.set(at, service(i, &mut rng))),
                    (_, Err(at)) => snap.services.insert(at, service(i, &mut rng)),
                }
                snap.version += 1;
                let shared = Arc::new(snap.clone());
                assert_eq!(feed.update(&shared), &names(&shared), "seed {seed} step {step}");
            }
        }
    }
}
