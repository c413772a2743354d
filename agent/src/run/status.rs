//! What the agent's components publish about themselves, and the one place
//! that reads it all back. Each status has one writer, the component it
//! describes, which publishes it on a `tokio::sync::watch` channel; readers
//! (the HTTP API, the agent's metrics, the control loop, the flow pipeline's
//! inputs) hold receivers. No component writes into another's state.
//!
//! [`Readers`] assembles `/status`, `/readyz` and the agent's own metrics
//! from the receivers.

use std::{collections::BTreeMap, fmt, sync::Arc};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};
use serde::Serialize;
use tokio::sync::watch;
use weft_observe::{
    export::otlp::{ExportStats, ExportStatus},
    pipeline::{Pipeline, Refusal, record::LostSource},
};

use crate::{
    controller::{ControlStatus, EnvoyAck},
    datapath::EventStats,
    envoy::EnvoyState,
};

/// The datapath worker's report.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DatapathStatus {
    /// The version of the last snapshot applied (0: none yet).
    pub applied_version: u64,
    pub services: usize,
    pub endpoints: usize,
    /// The node's own endpoint: the host policies that select it.
    pub host_policy: HostPolicyStatus,
    pub problems: Vec<String>,
    pub proxy_ports_without_listener: Vec<u16>,
    /// Frontends not handed to their proxy port yet (no listening socket
    /// for it in the datapath): they keep their forwarding until it is.
    pub frontends_awaiting_proxy: Vec<crate::reconcile::AwaitingProxy>,
    /// Proxy ports policies send connections through that have no listening
    /// socket: those connections are refused (they have no plain way).
    pub policy_proxy_ports_refusing: Vec<u16>,
    /// Whether the datapath holds its own copy of the listening socket of
    /// every proxy port it hands connections to (false until it looked):
    /// a replaced Envoy is stopped only then.
    #[serde(skip)]
    pub proxy_sockets_held: bool,
    /// Proxy ports whose Envoy is gone: their connections wait in the
    /// sockets the agent keeps, for the next Envoy.
    pub proxy_ports_waiting: Vec<u16>,
    /// Whether connections waiting for a restarting Envoy move to the new
    /// one (`net.ipv4.tcp_migrate_req`); else they are reset.
    pub proxy_migration: bool,
    /// Local pods' addresses and the index of the device their datapath is
    /// attached to (what weft-cni's ADD and DEL wait for).
    pub attached: std::collections::BTreeMap<std::net::Ipv4Addr, u32>,
    pub events_emitted: u64,
    pub events_lost: u64,
    pub maps: Vec<MapUsage>,
    /// Maps that had no room for everything the last snapshot holds, with
    /// what was left out (written once there is room).
    pub full_maps: Vec<crate::reconcile::FullMap>,
    /// The ring buffer's counters as last read (None until the first
    /// reading), for the flow pipeline's loss accounting.
    #[serde(skip)]
    pub event_stats: Option<EventStats>,
}

/// What host policies do on this node, and what of the node's traffic they
/// never judge (said whether or not one selects the node).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HostPolicyStatus {
    /// `Kind name` of each host policy whose nodeSelector matches this node's labels.
    pub selected_by: Vec<String>,
    /// Default-deny in each direction for the node's own connections.
    pub ingress: bool,
    pub egress: bool,
    /// Datapath entries of the node's endpoint.
    pub entries: usize,
    pub not_enforced: &'static [&'static str],
    /// The node's connections host policies leave to others to judge.
    pub exempt: &'static [&'static str],
}

/// The node's traffic host policies do not judge.
pub const HOST_POLICY_NOT_ENFORCED: &[&str] = &[
    "IPv6 (the datapath is IPv4-only; the node's device passes IPv6)",
    "the node talking to itself over lo",
    "connections to Service frontends on the node (NodePort, LoadBalancer, external IPs): their backends' policies judge them",
    "connections established before the policy",
    "HTTP rules and listeners (refused by name)",
];

/// The node's connections a host policy's egress does not judge, and who does.
pub const HOST_POLICY_EXEMPT: &[&str] =
    &["the node's Envoy's upstream connections (its sockets carry mark 0xc00): the client's egress policy judged \
     them where they entered Envoy, a policy's HTTP rules in Envoy, and the destination pod's ingress policy \
     still judges them"];

impl Default for HostPolicyStatus {
    fn default() -> Self {
        Self {
            selected_by: Vec::new(),
            ingress: false,
            egress: false,
            entries: 0,
            not_enforced: HOST_POLICY_NOT_ENFORCED,
            exempt: HOST_POLICY_EXEMPT,
        }
    }
}

/// Occupancy of one datapath map.
#[derive(Clone, Debug, Default, Serialize)]
pub struct MapUsage {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// Counts the control loop keeps of its exchange with Envoy.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct XdsCounts {
    /// Snapshots published to the xDS server.
    pub pushes: u64,
    pub acks: u64,
    pub nacks: u64,
}

impl XdsCounts {
    /// Counts one of Envoy's answers.
    pub fn count(&mut self, ev: &crate::xds::server::AdsEvent) {
        use crate::xds::server::AdsEvent;
        match ev {
            AdsEvent::Ack { .. } => self.acks += 1,
            AdsEvent::Nack { .. } => self.nacks += 1,
            _ => {}
        }
    }
}

/// The control loop's report.
#[derive(Clone, Debug, Default)]
pub struct ControlReport {
    pub control: ControlStatus,
    pub xds: XdsCounts,
}

/// The flow pipeline, read from its counters.
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
    /// Lines of Envoy's access-log spool committed on this node, by this
    /// agent and the ones before it (entries stored as flows, or lost).
    pub access_log_committed: u64,
    /// Lost events by where they were lost.
    pub lost: BTreeMap<&'static str, u64>,
    /// Ring-buffer records too short to decode (also in `lost`, at the ring).
    pub malformed_records: u64,
    /// Flow API requests refused, by why.
    pub requests_refused: BTreeMap<&'static str, u64>,
    /// The OTLP exporter, when it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp: Option<ExportStatus>,
}

impl FlowStatus {
    fn of(p: &Pipeline, exporter: Option<&ExportStats>) -> Self {
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
            access_log_committed: c.spool_committed.load(Relaxed),
            lost: LostSource::ALL.iter().map(|s| (s.label(), c.lost(*s))).collect(),
            malformed_records: c.malformed_records.load(Relaxed),
            requests_refused: Refusal::ALL.iter().map(|r| (r.label(), c.refused(*r))).collect(),
            otlp: exporter.map(ExportStats::status),
        }
    }
}

/// The parts of the agent process the supervisor runs and watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Component {
    /// Sources -> desired state -> snapshots for the datapath and Envoy.
    Control,
    /// Applies snapshots to the eBPF maps; GC; proxy listeners; counters.
    Datapath,
    /// Runs the node's Envoy.
    Envoy,
    /// Serves Envoy over ADS.
    Xds,
    /// The agent's HTTP API (/status, /healthz, /readyz, /metrics).
    Api,
    /// Drains the datapath's ring buffer into the flow pipeline.
    FlowEvents,
    /// The flow pipeline's thread: enrichment, join, store, sinks.
    FlowPipeline,
    /// Keeps the pipeline's names and kernel counters in step with the
    /// control loop's snapshots and the datapath's counters.
    FlowSync,
    /// Reads Envoy's access-log spool.
    AccessLog,
    /// The Hubble-compatible flow API.
    FlowApi,
    /// weft-cni's socket: which device is which pod's.
    Cni,
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Component::Control => "control loop",
            Component::Datapath => "datapath worker",
            Component::Envoy => "Envoy supervisor",
            Component::Xds => "ADS server",
            Component::Api => "HTTP API",
            Component::FlowEvents => "ring-buffer reader",
            Component::FlowPipeline => "flow pipeline",
            Component::FlowSync => "flow names and counters",
            Component::AccessLog => "access-log reader",
            Component::FlowApi => "flow API",
            Component::Cni => "CNI endpoint",
        })
    }
}

/// How a component is doing, as the supervisor saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "state")]
pub enum ComponentState {
    Running,
    /// It returned without an error (a server whose listener closed, say).
    Stopped,
    /// It returned an error.
    Failed {
        error: String,
    },
    /// It panicked.
    Panicked {
        message: String,
    },
}

/// The error of a component that ended because another stopped publishing
/// what it reads: the supervisor then reports that other component's end,
/// which is the cause.
#[derive(Debug, thiserror::Error)]
#[error("what it reads from the {0} stopped coming")]
pub struct InputGone(pub Component);

/// Every component's state; the supervisor is its one writer.
pub type Health = BTreeMap<Component, ComponentState>;

/// Whether every component the supervisor started is running (the agent is
/// not ready while one is down, even for the moment before it exits).
pub fn all_running(h: &Health) -> bool {
    h.values().all(|s| *s == ComponentState::Running)
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
    pub components: Health,
}

/// Receivers of every component's status.
#[derive(Clone)]
pub struct Readers {
    pub node: String,
    /// Whether readiness waits for Envoy (it runs one).
    pub envoy_needed: bool,
    pub datapath: watch::Receiver<DatapathStatus>,
    pub control: watch::Receiver<ControlReport>,
    pub envoy: watch::Receiver<EnvoyState>,
    pub health: watch::Receiver<Health>,
    pub pipeline: Arc<Pipeline>,
    /// The OTLP exporter's counts, when it runs.
    pub exporter: Option<Arc<ExportStats>>,
}

impl Readers {
    /// Ready: every component runs, the datapath applied a snapshot, and
    /// Envoy (if the agent runs one) is ready.
    pub fn ready(&self) -> bool {
        all_running(&self.health.borrow())
            && self.datapath.borrow().applied_version > 0
            && (!self.envoy_needed || self.envoy.borrow().ready)
    }

    /// The agent's status as of now.
    pub fn status(&self) -> AgentStatus {
        let report = self.control.borrow().clone();
        AgentStatus {
            node: self.node.clone(),
            ready: self.ready(),
            datapath: self.datapath.borrow().clone(),
            envoy: self.envoy.borrow().clone(),
            control: report.control,
            xds: report.xds,
            flows: FlowStatus::of(&self.pipeline, self.exporter.as_deref()),
            components: self.health.borrow().clone(),
        }
    }
}

/// The agent's health as metrics, read from [`Readers`] at scrape time.
pub struct AgentCollector(pub Readers);

impl fmt::Debug for AgentCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentCollector")
    }
}

fn one(enc: &mut DescriptorEncoder, name: &str, help: &str, ty: MetricType, v: u64) -> fmt::Result {
    let e = enc.encode_descriptor(name, help, None, ty)?;
    match ty {
        MetricType::Counter => ConstCounter::new(v).encode(e),
        _ => ConstGauge::new(v as i64).encode(e),
    }
}

/// Resident memory (bytes) and CPU time (seconds) of this process.
fn process_usage() -> (u64, f64) {
    let page = 4096u64;
    let rss = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * page;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some((f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?) as f64 / hz)
        })
        .unwrap_or(0.0);
    (rss, cpu)
}

impl Collector for AgentCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let st = self.0.status();
        {
            let mut e = enc.encode_descriptor("agent_info", "The agent's node and version", None, MetricType::Gauge)?;
            ConstGauge::new(1i64)
                .encode(e.encode_family(&[("node", st.node.as_str()), ("version", env!("CARGO_PKG_VERSION"))])?)?;
        }
        one(
            &mut enc,
            "agent_ready",
            "1 when the datapath is loaded and Envoy is ready",
            MetricType::Gauge,
            st.ready as u64,
        )?;
        let (rss, cpu) = process_usage();
        one(&mut enc, "agent_resident_memory_bytes", "Resident memory of the agent process", MetricType::Gauge, rss)?;
        {
            let c = ConstCounter::new(cpu);
            c.encode(enc.encode_descriptor(
                "agent_cpu_seconds",
                "CPU time of the agent process",
                None,
                MetricType::Counter,
            )?)?;
        }
        {
            let mut e =
                enc.encode_descriptor("datapath_map_entries", "Entries in a datapath map", None, MetricType::Gauge)?;
            for m in &st.datapath.maps {
                ConstGauge::new(m.entries as i64).encode(e.encode_family(&[("map", m.map)])?)?;
            }
        }
        {
            let mut e =
                enc.encode_descriptor("datapath_map_capacity", "Capacity of a datapath map", None, MetricType::Gauge)?;
            for m in &st.datapath.maps {
                ConstGauge::new(m.capacity as i64).encode(e.encode_family(&[("map", m.map)])?)?;
            }
        }
        {
            let mut e = enc.encode_descriptor(
                "datapath_map_not_written",
                "Objects (frontends, pods, addresses, policies) of the desired state left out because a map \
                 (and its map-sizes key) is full",
                None,
                MetricType::Gauge,
            )?;
            for f in &st.datapath.full_maps {
                ConstGauge::new(f.not_written as i64).encode(e.encode_family(&[("map", f.map), ("key", f.key)])?)?;
            }
        }
        one(&mut enc, "xds_pushes", "Configuration snapshots published to Envoy", MetricType::Counter, st.xds.pushes)?;
        one(&mut enc, "xds_acks", "xDS responses Envoy acknowledged", MetricType::Counter, st.xds.acks)?;
        one(&mut enc, "xds_nacks", "xDS responses Envoy refused", MetricType::Counter, st.xds.nacks)?;
        one(&mut enc, "envoy_restarts", "Times the agent restarted Envoy", MetricType::Counter, st.envoy.restarts)?;
        one(
            &mut enc,
            "envoy_ready",
            "1 when Envoy runs and took its configuration",
            MetricType::Gauge,
            st.envoy.ready as u64,
        )?;
        {
            let mut e = enc.encode_descriptor(
                "config_objects",
                "EnvoyConfig objects by state (valid, rejected, acknowledged, nacked, pending, not_applied)",
                None,
                MetricType::Gauge,
            )?;
            let mut counts = std::collections::BTreeMap::<&str, i64>::new();
            for s in ["valid", "rejected", "acknowledged", "nacked", "pending", "not_applied"] {
                counts.insert(s, 0);
            }
            for o in st.control.objects.iter() {
                *counts.entry(if o.config.problems.is_empty() { "valid" } else { "rejected" }).or_default() += 1;
                let envoy = match &o.envoy {
                    EnvoyAck::Pending => "pending",
                    EnvoyAck::Acknowledged { .. } => "acknowledged",
                    EnvoyAck::Nacked { .. } => "nacked",
                    EnvoyAck::NotApplied => "not_applied",
                };
                *counts.entry(envoy).or_default() += 1;
            }
            for (state, n) in counts {
                ConstGauge::new(n).encode(e.encode_family(&[("state", state)])?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use weft_observe::pipeline::{PipelineConfig, enrich::Names};

    use super::*;

    /// What `/status` says is exempt names the mark Envoy's upstream
    /// sockets really carry.
    #[test]
    fn the_exempt_connections_name_the_proxy_mark() {
        let mark = format!("{:#x}", crate::xds::translate::UPSTREAM_MARK);
        assert!(HOST_POLICY_EXEMPT[0].contains(&format!("mark {mark})")), "{mark}: {HOST_POLICY_EXEMPT:?}");
    }

    /// `/readyz` answers from `ready()`: it fails as soon as the supervisor
    /// records a component that is not running, whatever else is ready.
    #[test]
    fn not_ready_while_a_component_is_down() {
        let (datapath, datapath_rx) = watch::channel(DatapathStatus::default());
        let (_control, control_rx) = watch::channel(ControlReport::default());
        let (_envoy, envoy_rx) = watch::channel(EnvoyState::default());
        let (health, health_rx) = watch::channel(Health::new());
        let (pipeline, _feed) = Pipeline::start(PipelineConfig::default(), Names::default());
        let readers = Readers {
            node: "n".into(),
            envoy_needed: false,
            datapath: datapath_rx,
            control: control_rx,
            envoy: envoy_rx,
            health: health_rx,
            pipeline,
            exporter: None,
        };
        health.send_modify(|h| {
            h.insert(Component::Datapath, ComponentState::Running);
            h.insert(Component::FlowApi, ComponentState::Running);
        });
        assert!(!readers.ready(), "no snapshot applied yet");
        datapath.send_modify(|d| d.applied_version = 1);
        assert!(readers.ready());
        for down in [
            ComponentState::Stopped,
            ComponentState::Failed { error: "bind: address in use".into() },
            ComponentState::Panicked { message: "boom".into() },
        ] {
            health.send_modify(|h| {
                h.insert(Component::FlowApi, down.clone());
            });
            assert!(!readers.ready(), "{down:?}");
            assert!(!readers.status().ready);
        }
    }
}
