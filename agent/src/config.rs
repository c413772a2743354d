//! The agent's configuration: one typed struct, read from a YAML file, every
//! default documented beside its field, invalid values rejected with the key
//! and the value.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use weft_flow::socket::Access;
use weft_observe::{api::server::StreamLimits, export::otlp};

use crate::datapath::{DatapathConfig, EmitLevel, MapSizes};

/// Configuration of `weft-agent run`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct AgentConfig {
    /// This node's name, as in its Node object. Default: the host name.
    pub node_name: String,
    /// This node's address on its external device. Default: the InternalIP
    /// of this node's Node object.
    pub node_ip: Option<Ipv4Addr>,
    /// External devices of the node (NodePort, LoadBalancer, masquerade).
    /// Default (empty): the device that holds the node's address.
    pub devices: Vec<String>,
    /// Network namespace (a path like /var/run/netns/NAME) the datapath runs
    /// in. Default: the agent's own (the node's, in a DaemonSet).
    pub netns: Option<PathBuf>,
    /// bpffs directory for pins. Default: /sys/fs/bpf/weft.
    pub bpffs_dir: PathBuf,
    /// cgroup v2 directory whose processes get socket-level Service handling.
    /// Default: /sys/fs/cgroup (every process of the node).
    pub cgroup: Option<PathBuf>,
    /// Where the node's sysctls are written (`net/ipv4/ip_forward` below it,
    /// of the agent's network namespace). A container's /proc/sys is
    /// read-only: the DaemonSet mounts the node's /proc/sys/net writable at
    /// /host/proc/sys/net. A sysctl that already has the wanted value is not
    /// written. Default: /proc/sys.
    pub sysctl_dir: PathBuf,
    /// Where the agent keeps state across restarts and its sockets. Default: /var/run/weft.
    pub state_dir: PathBuf,
    /// Kubernetes objects to serve when there is no API server: a directory
    /// of YAML, watched for changes. Default: /etc/weft/objects.
    pub objects_dir: PathBuf,
    /// Pod traffic to destinations outside this CIDR is masqueraded. Default: 10.0.0.0/8.
    pub native_routing_cidr: Option<String>,
    /// Masquerade pod traffic leaving the native-routing CIDR. Default: true.
    pub masquerade: bool,
    /// SNAT source port range. Default: [61000, 65535].
    pub nat_ports: [u16; 2],
    /// Translate Services at connect() for pods' sockets too (no per-packet
    /// NAT for them). Default: true.
    pub socket_lb_pods: bool,
    /// Ring-buffer emission: off, connection, packet. Default: connection.
    pub emit_level: EmitLevel,
    /// Map sizes.
    pub map_sizes: MapSizes,
    /// Rebuild pinned maps whose size differs from map-sizes (losing their
    /// contents) instead of refusing to start. Default: false.
    pub recreate_mismatched_maps: bool,
    /// Print every datapath record to stdout (demo and debugging). Default: false.
    pub print_events: bool,
    /// The node's Envoy, run by the agent.
    pub envoy: EnvoyOptions,
    /// Address of the agent's HTTP API (/status, /healthz, /readyz, /metrics). Default: 0.0.0.0:9962.
    pub api_address: String,
    /// Flows: the store, the flow API, metrics and export.
    pub flows: FlowOptions,
    /// Read objects from the Kubernetes API instead of objects-dir.
    pub kubernetes: KubernetesOptions,
    /// Unix socket weft-cni registers pods' veths on. When set, local pods
    /// get the datapath on the device weft-cni named (and only then);
    /// unset, on the device that routes to their address. Default: none.
    pub cni_socket: Option<PathBuf>,
    /// A group (a name in /etc/group, or a number) whose members may, besides
    /// root, enter state-dir and connect to the agent's xDS, access-log and
    /// flow API sockets (the agent must be a member: the pod's
    /// `supplementalGroups`). Default: none (root only).
    pub socket_group: Option<String>,
    /// HTTP visibility of Services whose own annotation and Namespace's
    /// annotation (`weft.io/l7-visibility`) say nothing: `http` generates an
    /// Envoy listener for every such Service (so each TCP port of every
    /// Service, but those whose appProtocol is not HTTP, must carry HTTP:
    /// annotate the others `none`), `none` leaves them plain. Default: none.
    pub l7_visibility: crate::xds::visibility::Visibility,
}

/// The flow pipeline and its outputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct FlowOptions {
    /// Flows kept for readers of the flow API. Default: 4095 (Hubble's).
    pub store_size: usize,
    /// Datapath records queued between the ring-buffer reader and the pipeline. Default: 16384.
    pub queue_size: usize,
    /// TCP address of the flow API (Hubble's observer.Observer); empty:
    /// none. Default: 0.0.0.0:4244 with `tls`, none without (plaintext only
    /// when asked for; the unix socket is always there).
    pub address: Option<String>,
    /// Unix socket of the flow API. Default: <state-dir>/observer.sock.
    pub socket: Option<PathBuf>,
    /// Context labels of the flow metrics (source_namespace, source_workload,
    /// destination_namespace, destination_workload, traffic_direction, or none).
    /// Default: the namespaces and workloads of both ends.
    pub metrics_context: Vec<String>,
    /// Export flows to an OpenTelemetry collector. Default: none.
    pub otlp: Option<OtlpOptions>,
    /// TLS on the flow API's TCP address. Default: none (and then no TCP
    /// address unless `address` asks for plaintext).
    pub tls: Option<FlowTls>,
    /// GetFlows streams one client (a TCP peer address, a unix peer uid) may
    /// keep open at once. Default: 16.
    pub max_streams_per_client: usize,
    /// GetFlows streams open at once from all clients. Default: 128.
    pub max_streams: usize,
}

/// The flow API's TCP address when `flows.tls` is set and `flows.address` is not.
pub const DEFAULT_FLOW_ADDRESS: &str = "0.0.0.0:4244";

impl FlowOptions {
    /// The TCP address the flow API listens on, if any.
    pub fn tcp_address(&self) -> Option<&str> {
        match self.address.as_deref() {
            Some("") => None,
            Some(a) => Some(a),
            None => self.tls.is_some().then_some(DEFAULT_FLOW_ADDRESS),
        }
    }
}

/// TLS of the flow API. `{node}` in a path is the node's name: deploy/
/// mounts one Secret with every node's certificate (`<node>.crt`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FlowTls {
    /// The server's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// Require client certificates from this CA (PEM). Default: none.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
}

impl FlowTls {
    /// The files of node `node`.
    pub fn for_node(&self, node: &str) -> FlowTls {
        let of = |p: &Path| PathBuf::from(p.to_string_lossy().replace("{node}", node));
        FlowTls { cert: of(&self.cert), key: of(&self.key), client_ca: self.client_ca.as_deref().map(of) }
    }

    /// Whether this node's certificate and key are not there yet (the
    /// operator has not issued them, or the kubelet has not written them:
    /// the CA bundle may well be there already).
    pub fn absent(&self) -> bool {
        !self.cert.exists() && !self.key.exists()
    }

    /// Reads the files; errors name the key and the file.
    pub fn load(&self) -> Result<weft_observe::api::server::Tls, ConfigError> {
        let read = |key: &'static str, p: &Path| {
            std::fs::read(p).map_err(|e| ConfigError::Invalid {
                key,
                value: p.display().to_string(),
                reason: e.to_string(),
            })
        };
        let tls = weft_observe::api::server::Tls {
            cert_pem: read("flows.tls.cert", &self.cert)?,
            key_pem: read("flows.tls.key", &self.key)?,
            client_ca_pem: self.client_ca.as_deref().map(|p| read("flows.tls.client-ca", p)).transpose()?,
        };
        tls.check().map_err(|e| ConfigError::Invalid {
            key: "flows.tls",
            value: self.cert.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(tls)
    }
}

impl Default for FlowOptions {
    fn default() -> Self {
        Self {
            store_size: 4095,
            queue_size: 16384,
            address: None,
            socket: None,
            metrics_context: vec![
                "source_namespace".into(),
                "source_workload".into(),
                "destination_namespace".into(),
                "destination_workload".into(),
            ],
            otlp: None,
            tls: None,
            max_streams_per_client: StreamLimits::default().per_client,
            max_streams: StreamLimits::default().total,
        }
    }
}

impl FlowOptions {
    /// The flow API's stream limits.
    pub fn stream_limits(&self) -> StreamLimits {
        StreamLimits { per_client: self.max_streams_per_client, total: self.max_streams }
    }
}

/// OTLP export of flows (`flows.otlp`): its options and how they combine
/// with the `OTEL_EXPORTER_OTLP_*` environment are the exporter's own.
pub use weft_observe::export::otlp::OtlpOptions;

impl AgentConfig {
    /// The OTLP exporter's settings: `flows.otlp` with the environment's
    /// `OTEL_EXPORTER_OTLP_*` filling in what it leaves unset; without
    /// `flows.otlp`, export is on when the environment names an endpoint.
    pub fn otlp(&self, env: &dyn otlp::settings::Env) -> Result<Option<otlp::OtlpConfig>, ConfigError> {
        let options = match &self.flows.otlp {
            Some(o) => o.clone(),
            None if otlp::enabled_by_env(env) => OtlpOptions::default(),
            None => return Ok(None),
        };
        Ok(Some(options.resolve(env)?))
    }
}

/// Largest flow store, queue or batch (the exporter's limit too).
pub use weft_observe::export::otlp::settings::MAX_QUEUE;

/// The kernel's sysctls, as a process sees them.
pub const PROC_SYS: &str = "/proc/sys";

/// The most flow API streams `flows.max-streams*` may allow (each holds a
/// buffer of responses and its compiled filters).
pub const MAX_STREAMS: usize = 4096;

/// Where the agent finds the Kubernetes API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct KubernetesOptions {
    /// Watch the API server (objects-dir is then not read). Default: false.
    pub enabled: bool,
    /// A kubeconfig file. Default: the in-cluster service account, else
    /// $KUBECONFIG or ~/.kube/config.
    pub kubeconfig: Option<PathBuf>,
    /// weft's namespace, where the agent writes its node's WeftNode report
    /// (the operator's namespace). Default: weft-system.
    pub namespace: String,
}

impl Default for KubernetesOptions {
    fn default() -> Self {
        Self { enabled: false, kubeconfig: None, namespace: "weft-system".into() }
    }
}

/// How the agent runs Envoy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct EnvoyOptions {
    /// Run Envoy at all (off: L7 Services need a proxy listener of their own). Default: true.
    pub enabled: bool,
    /// The Envoy binary. Default: $WEFT_ENVOY, else `envoy` on PATH, else `envoy`
    /// next to weft-agent (looked up when the agent starts).
    pub binary: Option<PathBuf>,
    /// Admin port on 127.0.0.1. Default: 9901.
    pub admin_port: u16,
    /// Delta xDS (a change costs what changed) instead of state of the
    /// world (every response of a type carries all of its resources).
    /// Default: true.
    pub delta: bool,
    /// Envoy worker threads. Default: 2.
    pub concurrency: u32,
    /// How many configs' listeners Envoy gets as one listener at most: the
    /// listeners Services are redirected to are grouped per namespace,
    /// each config keeping its own filter chain (matched by its Service
    /// frontends), because Envoy's cost of updating listeners grows with
    /// the square of their number. 0 or 1: every listener on its own.
    /// Default: 100.
    pub listener_group_size: usize,
    /// The most Envoy writes to one file, in bytes: its access-log spool
    /// while the agent is away (entries past it are lost, and counted), and
    /// its own log. Default: 256 MiB (about 500,000 requests).
    pub spool_limit: u64,
    /// How often Envoy writes its access-log buffer to the spool, in ms
    /// (it also writes once 64 KiB wait): the delay of HTTP flows, and the
    /// most a killed Envoy leaves unwritten (counted lost). Default: 100.
    pub access_log_flush_ms: u32,
    /// Which stats Envoy keeps: `traffic` (its own, and each connection
    /// manager's, listener's and cluster's request and connection counters:
    /// every stat the agent reads; the rest of the ~150 per config cost
    /// Envoy's main thread most of its time taking many configs at once) or
    /// `all` (Envoy's default). Default: traffic.
    pub stats: crate::envoy::EnvoyStats,
}

/// The longest `envoy.access-log-flush-ms`: ten minutes.
pub const MAX_ACCESS_LOG_FLUSH_MS: u32 = 600_000;

/// The smallest `envoy.spool-limit`: room for the longest access-log line.
pub const MIN_SPOOL_LIMIT: u64 = 1 << 20;

impl Default for EnvoyOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            binary: None,
            admin_port: 9901,
            delta: true,
            concurrency: 2,
            listener_group_size: crate::xds::groups::DEFAULT_GROUP_SIZE,
            spool_limit: 256 << 20,
            access_log_flush_ms: crate::envoy::FILE_FLUSH_MS,
            stats: crate::envoy::EnvoyStats::Traffic,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node_name: hostname(),
            node_ip: None,
            devices: Vec::new(),
            netns: None,
            bpffs_dir: PathBuf::from("/sys/fs/bpf/weft"),
            cgroup: Some(PathBuf::from("/sys/fs/cgroup")),
            sysctl_dir: PathBuf::from(PROC_SYS),
            state_dir: PathBuf::from("/var/run/weft"),
            objects_dir: PathBuf::from("/etc/weft/objects"),
            native_routing_cidr: Some("10.0.0.0/8".into()),
            masquerade: true,
            nat_ports: [61000, 65535],
            socket_lb_pods: true,
            emit_level: EmitLevel::Connection,
            map_sizes: MapSizes::default(),
            recreate_mismatched_maps: false,
            print_events: false,
            envoy: EnvoyOptions::default(),
            api_address: "0.0.0.0:9962".into(),
            flows: FlowOptions::default(),
            kubernetes: KubernetesOptions::default(),
            cni_socket: None,
            socket_group: None,
            l7_visibility: Default::default(),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_owned()).unwrap_or_default()
}

/// A configuration problem: which key, which value, why.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key} = {value}: {reason}")]
    Invalid { key: &'static str, value: String, reason: String },
    #[error(transparent)]
    Otlp(#[from] otlp::OtlpError),
}

/// Parses `a.b.c.d/n`.
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, l) = s.split_once('/')?;
    let len: u8 = l.parse().ok()?;
    (len <= 32).then_some(())?;
    Some((a.parse().ok()?, len))
}

impl AgentConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = crate::limits::read_text(path, crate::limits::MAX_CONFIG_FILE_BYTES)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        let cfg: AgentConfig = serde_saphyr::from_str(&text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Who may use the agent's sockets: root, and `socket-group` if set.
    pub fn socket_access(&self) -> Result<Access, ConfigError> {
        let Some(group) = &self.socket_group else {
            return Ok(Access::default());
        };
        let invalid = |reason: String| ConfigError::Invalid { key: "socket-group", value: group.clone(), reason };
        if let Ok(gid) = group.parse::<u32>() {
            return Ok(Access { gid: Some(gid) });
        }
        let groups = std::fs::read_to_string("/etc/group").map_err(|e| invalid(format!("reading /etc/group: {e}")))?;
        let gid = groups
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&group.as_str()))
            .and_then(|f| f.get(2)?.parse::<u32>().ok())
            .ok_or_else(|| invalid("no such group in /etc/group (give its number instead)".into()))?;
        Ok(Access { gid: Some(gid) })
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, value: &dyn std::fmt::Debug, reason: &str| ConfigError::Invalid {
            key,
            value: format!("{value:?}"),
            reason: reason.into(),
        };
        if self.node_name.is_empty() {
            return Err(invalid("node-name", &self.node_name, "set it to this node's name"));
        }
        if self.kubernetes.enabled && self.kubernetes.namespace.is_empty() {
            return Err(invalid("kubernetes.namespace", &self.kubernetes.namespace, "set it to weft's namespace"));
        }
        if let Some(c) = &self.native_routing_cidr
            && parse_cidr(c).is_none()
        {
            return Err(invalid("native-routing-cidr", c, "expected an IPv4 CIDR like 10.0.0.0/8"));
        }
        if self.nat_ports[0] == 0 || self.nat_ports[0] > self.nat_ports[1] {
            return Err(invalid("nat-ports", &self.nat_ports, "expected [low, high] with 0 < low <= high"));
        }
        if self.api_address.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid("api-address", &self.api_address, "expected ip:port, like 0.0.0.0:9962"));
        }
        if let Some(a) = self.flows.tcp_address()
            && a.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid("flows.address", &a, "expected ip:port, like 0.0.0.0:4244, or empty"));
        }
        if !(1..=MAX_QUEUE).contains(&self.flows.store_size) || !(1..=MAX_QUEUE).contains(&self.flows.queue_size) {
            return Err(invalid(
                "flows.store-size/queue-size",
                &(self.flows.store_size, self.flows.queue_size),
                &format!("must be from 1 to {MAX_QUEUE}"),
            ));
        }
        self.socket_access()?;
        let streams = (self.flows.max_streams_per_client, self.flows.max_streams);
        if !(1..=MAX_STREAMS).contains(&streams.0) || !(1..=MAX_STREAMS).contains(&streams.1) {
            return Err(invalid(
                "flows.max-streams-per-client/max-streams",
                &streams,
                &format!("must be from 1 to {MAX_STREAMS}"),
            ));
        }
        if self.envoy.concurrency > 1024 {
            return Err(invalid(
                "envoy.concurrency",
                &self.envoy.concurrency,
                "must be from 0 (a worker per CPU) to 1024",
            ));
        }
        if self.envoy.spool_limit < MIN_SPOOL_LIMIT {
            return Err(invalid(
                "envoy.spool-limit",
                &self.envoy.spool_limit,
                &format!("must be at least {MIN_SPOOL_LIMIT} bytes"),
            ));
        }
        if !(1..=MAX_ACCESS_LOG_FLUSH_MS).contains(&self.envoy.access_log_flush_ms) {
            return Err(invalid(
                "envoy.access-log-flush-ms",
                &self.envoy.access_log_flush_ms,
                &format!("must be from 1 to {MAX_ACCESS_LOG_FLUSH_MS}"),
            ));
        }
        weft_observe::export::metrics::Context::parse(&self.flows.metrics_context).map_err(|r| {
            ConfigError::Invalid {
                key: "flows.metrics-context",
                value: format!("{:?}", self.flows.metrics_context),
                reason: r.to_string(),
            }
        })?;
        self.otlp(&otlp::ProcessEnv)?;
        if let Some(t) = &self.flows.tls {
            // Files not written yet are waited for; files that do not parse are refused.
            let t = t.for_node(&self.node_name);
            if !t.absent() {
                t.load()?;
            }
        }
        self.map_sizes.validate().map_err(|e| ConfigError::Invalid {
            key: "map-sizes",
            value: format!("{:?}", self.map_sizes),
            reason: e.to_string(),
        })
    }

    /// The datapath settings for a node at `node_ip`.
    pub fn datapath(&self, node_ip: Ipv4Addr) -> DatapathConfig {
        let mut dp = DatapathConfig::new(node_ip);
        dp.bpffs_dir = self.bpffs_dir.clone();
        dp.map_sizes = self.map_sizes.clone();
        dp.recreate_mismatched_maps = self.recreate_mismatched_maps;
        dp.cgroup = self.cgroup.clone();
        dp.sysctl_dir = self.sysctl_dir.clone();
        dp.native_cidr = self.native_routing_cidr.as_deref().and_then(parse_cidr);
        dp.masquerade = self.masquerade;
        dp.nat_ports = (self.nat_ports[0], self.nat_ports[1]);
        dp.emit_level = self.emit_level;
        dp.socket_lb_pods = self.socket_lb_pods;
        dp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let err = serde_saphyr::from_str::<AgentConfig>("node-name: a\nbogus: 1\n").unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        let cfg = AgentConfig { native_routing_cidr: Some("10.0.0.0/40".into()), ..Default::default() };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.starts_with("native-routing-cidr = \"10.0.0.0/40\""), "{err}");
        let cfg = AgentConfig { nat_ports: [100, 50], ..Default::default() };
        assert!(cfg.validate().unwrap_err().to_string().starts_with("nat-ports"));
        for ms in [0, MAX_ACCESS_LOG_FLUSH_MS + 1] {
            let envoy = EnvoyOptions { access_log_flush_ms: ms, ..Default::default() };
            let err = AgentConfig { envoy, ..Default::default() }.validate().unwrap_err().to_string();
            assert!(err.starts_with(&format!("envoy.access-log-flush-ms = {ms}")), "{err}");
        }
        let all: AgentConfig = serde_saphyr::from_str("node-name: a\nenvoy: {stats: all}\n").unwrap();
        assert_eq!(all.envoy.stats, crate::envoy::EnvoyStats::All);
        assert_eq!(AgentConfig::default().envoy.stats, crate::envoy::EnvoyStats::Traffic);
        let err =
            serde_saphyr::from_str::<AgentConfig>("node-name: a\nenvoy: {stats: some}\n").unwrap_err().to_string();
        assert!(err.contains("some") && err.contains("traffic"), "{err}");
    }

    #[test]
    fn flow_options_are_checked() {
        let cfg: AgentConfig = serde_saphyr::from_str(
            "node-name: n\nflows:\n  otlp:\n    endpoint: http://127.0.0.1:4318\n    protocol: http/protobuf\n    allow: [{verdict: [DROPPED]}, {event_type: [{type: 129}]}]\n",
        )
        .unwrap();
        cfg.validate().unwrap();
        let none = std::collections::BTreeMap::new();
        let e = cfg.otlp(&none).unwrap().unwrap();
        assert_eq!(e.allow.len(), 2);
        assert_eq!(e.allow[0].verdict, [2]);
        let bad: AgentConfig =
            serde_saphyr::from_str("node-name: n\nflows:\n  otlp:\n    allow: [{verdikt: [DROPPED]}]\n").unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.starts_with("flows.otlp.allow = "), "{err}");
        assert!(err.contains("verdikt"), "{err}");
        let with_headers: AgentConfig = serde_saphyr::from_str(
            "node-name: n\nflows:\n  otlp: {endpoint: 'https://c:4318', protocol: http/protobuf, headers: {x-tenant: blue}}\n",
        )
        .unwrap();
        let e = with_headers.otlp(&none).unwrap().unwrap();
        assert_eq!(e.logs.headers, [("x-tenant".to_string(), "blue".to_string())]);
        // No flows.otlp: the environment alone can turn export on.
        let plain: AgentConfig = serde_saphyr::from_str("node-name: n\n").unwrap();
        assert!(plain.otlp(&none).unwrap().is_none());
        let env: std::collections::BTreeMap<String, String> =
            [("OTEL_EXPORTER_OTLP_ENDPOINT".to_string(), "http://collector:4317".to_string())].into();
        assert_eq!(plain.otlp(&env).unwrap().unwrap().traces.endpoint, "http://collector:4317");
        let no_ca: AgentConfig =
            serde_saphyr::from_str("node-name: n\nflows:\n  otlp: {ca-file: /nonexistent/ca.pem}\n").unwrap();
        let err = no_ca.validate().unwrap_err().to_string();
        assert!(err.starts_with("flows.otlp.ca-file = /nonexistent/ca.pem: "), "{err}");
        let bad: AgentConfig = serde_saphyr::from_str("node-name: n\nflows: {metrics-context: [pod]}\n").unwrap();
        assert!(bad.validate().unwrap_err().to_string().starts_with("flows.metrics-context"));
        let missing: AgentConfig =
            serde_saphyr::from_str("node-name: n\nflows: {tls: {cert: /nonexistent/c.pem, key: /nonexistent/k.pem}}\n")
                .unwrap();
        // Not issued yet: the agent starts, and serves TLS once they are there.
        missing.validate().unwrap();
        assert_eq!(missing.flows.tcp_address(), Some(DEFAULT_FLOW_ADDRESS), "TLS: TCP by default");
        assert_eq!(AgentConfig::default().flows.tcp_address(), None, "no plaintext TCP unless asked");
        // Files that are there but are not PEM certificates are refused at start, not at first connection.
        let dir = std::env::temp_dir().join(format!("weft-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("n.crt"), "not a certificate\n").unwrap();
        let half = FlowTls { cert: dir.join("{node}.crt"), key: dir.join("{node}.key"), client_ca: None };
        assert_eq!(half.for_node("n").cert, dir.join("n.crt"));
        let half = AgentConfig {
            node_name: "n".into(),
            flows: FlowOptions { tls: Some(half), ..Default::default() },
            ..Default::default()
        };
        let err = half.validate().unwrap_err().to_string();
        assert!(err.starts_with(&format!("flows.tls.key = {}: ", dir.join("n.key").display())), "{err}");
        std::fs::rename(dir.join("n.crt"), dir.join("c.pem")).unwrap();
        let junk = AgentConfig {
            flows: FlowOptions {
                tls: Some(FlowTls { cert: dir.join("c.pem"), key: dir.join("c.pem"), client_ca: None }),
                ..Default::default()
            },
            ..Default::default()
        };
        let err = junk.validate().unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.starts_with("flows.tls = "), "{err}");
    }

    #[test]
    fn kebab_case_file_parses() {
        let cfg: AgentConfig = serde_saphyr::from_str(
            "node-name: node1\nnode-ip: 192.168.50.1\ndevices: [eth0]\nemit-level: packet\nmap-sizes:\n  conntrack: 1024\n",
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.node_ip, Some(Ipv4Addr::new(192, 168, 50, 1)));
        assert_eq!(cfg.emit_level, EmitLevel::Packet);
        assert_eq!(cfg.map_sizes.conntrack, 1024);
        assert_eq!(cfg.map_sizes.services, MapSizes::default().services);
    }
}
