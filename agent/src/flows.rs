//! The agent's side of the flow pipeline: names for flows from each state
//! snapshot, the pipeline's settings from the agent's config, and the
//! Prometheus registry (flow metrics, the pipeline's and the agent's health).

use std::{
    fmt,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use weft_ebpf::abi;
use weft_observe::{
    export::metrics::{self as fm, FlowMetrics, PipelineCollector},
    pipeline::{
        Pipeline, Sink,
        enrich::{Names, PolicyName, workload},
        record::{EndpointInfo, Entry, ServiceInfo},
    },
};

use crate::{run::AgentStatus, state::Snapshot};

/// Names for flows from a snapshot: pods, nodes, Service frontends, policies.
pub fn names(snap: &Snapshot) -> Names {
    let mut n = Names::new(snap.node_name.clone());
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
    for s in &snap.services {
        let info = Arc::new(ServiceInfo { namespace: s.key.namespace.clone(), name: s.key.name.clone() });
        for e in &s.entries {
            n.add_service(e.frontend.addr, e.frontend.port, e.frontend.proto.number(), info.clone());
        }
    }
    for (id, p) in &snap.policy.rules {
        n.add_policy(
            *id,
            PolicyName { kind: p.kind.clone(), namespace: p.key.namespace.clone(), name: p.key.name.clone() },
        );
    }
    n
}

/// Prints every datapath record (`print-events`), for the demo and debugging.
pub struct PrintSink {
    pub node: String,
}

impl Sink for PrintSink {
    fn batch(&mut self, _first: u64, entries: &[Entry], _names: &Names) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        for e in entries {
            if let Entry::Flow(f) = e {
                if !f.is_l7() {
                    let _ = writeln!(out, "{}: {}", self.node, weft_observe::pipeline::ringbuf::event_line(&f.ev));
                }
            }
        }
    }
}

/// Counts the main loop keeps for metrics.
#[derive(Clone, Debug, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct XdsCounts {
    /// Snapshots published to the xDS server.
    pub pushes: u64,
    pub acks: u64,
    pub nacks: u64,
}

/// Occupancy of one datapath map.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MapUsage {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// The agent's health, read from its status at scrape time.
pub struct AgentCollector {
    pub status: Arc<Mutex<AgentStatus>>,
}

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
        let st = self.status.lock().unwrap().clone();
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
            let c = prometheus_client::metrics::counter::ConstCounter::new(cpu);
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
            for o in &st.control.objects {
                *counts.get_mut(if o.config.problems.is_empty() { "valid" } else { "rejected" }).unwrap() += 1;
                let envoy = match &o.envoy {
                    crate::controller::EnvoyAck::Pending => "pending",
                    crate::controller::EnvoyAck::Acknowledged { .. } => "acknowledged",
                    crate::controller::EnvoyAck::Nacked { .. } => "nacked",
                    crate::controller::EnvoyAck::NotApplied => "not_applied",
                };
                *counts.get_mut(envoy).unwrap() += 1;
            }
            for (state, n) in counts {
                ConstGauge::new(n).encode(e.encode_family(&[("state", state)])?)?;
            }
        }
        Ok(())
    }
}

/// The registry behind `/metrics`: names get the `weft_` prefix.
pub fn registry(
    pipeline: &Arc<Pipeline>,
    status: Arc<Mutex<AgentStatus>>,
    context: fm::Context,
) -> (Registry, FlowMetrics) {
    let mut r = Registry::with_prefix("weft");
    let flows = FlowMetrics::register(&mut r, context);
    r.register_collector(Box::new(PipelineCollector(pipeline.clone())));
    r.register_collector(Box::new(AgentCollector { status }));
    (r, flows)
}

/// The registry as Prometheus text.
pub fn encode(r: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, r).expect("writing to a String");
    out
}
