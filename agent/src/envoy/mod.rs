//! The node's Envoy: its bootstrap (ADS over the agent's unix socket, admin
//! on 127.0.0.1 inside the node), its command line, and [`supervise`],
//! which runs it:
//!
//! - exactly: Envoy is watched through a pidfd ([`process`]), which says
//!   when it exits whether or not anything reaped it, so a dead Envoy is
//!   never taken for a live one; it is restarted at once (with backoff only
//!   when it keeps dying young), reconnects to ADS and is sent everything
//!   again. Meanwhile its connections wait in the listening sockets the
//!   datapath keeps (`datapath::proxy`);
//! - across agent restarts: a running Envoy started by an earlier agent
//!   with the same bootstrap is adopted, so L7 connections survive; one
//!   with another bootstrap (new settings) is drained before it is stopped
//!   ([`drain_then_stop`]), so its requests finish and new connections wait
//!   for the next Envoy instead of failing;
//! - with its access log in a spool the agent reads
//!   (`weft_observe::pipeline::spool`): Envoy writes `access-log/current.log`
//!   in the state directory (its working directory), the supervisor moves
//!   the file aside when it grows and has Envoy reopen it (SIGUSR1), and
//!   seals what no Envoy writes any more. An Envoy that is started (not
//!   adopted) writes a fresh file, so a line the last one cut short stays
//!   alone. Each Envoy is started with an id ([`accesslog::WRITER_ENV`])
//!   its lines carry, and entries it served but could not write (a full
//!   spool, a killed Envoy's unflushed buffer) are counted lost
//!   ([`ledger`]);
//! - bounded: no file Envoy writes grows past `envoy.spool-limit`
//!   (RLIMIT_FSIZE, with SIGXFSZ ignored so a full file fails the write
//!   instead of killing Envoy): the spool while the agent is away, and
//!   Envoy's own log.

pub mod ledger;
pub mod process;

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;
use weft_observe::pipeline::{Pipeline, accesslog, spool::SpoolDir};

use self::{
    ledger::{Ledger, Reading},
    process::Process,
};
use crate::xds::translate::{ACCESS_LOG_PATH, UPSTREAM_MARK, UPSTREAM_MARK_DESCRIPTION};

/// How the agent runs Envoy.
#[derive(Clone, Debug)]
pub struct EnvoySettings {
    /// The Envoy binary.
    pub binary: PathBuf,
    /// Envoy's working directory: its bootstrap, log and access-log spool.
    pub state_dir: PathBuf,
    /// ADS socket (the agent serves it).
    pub xds_socket: PathBuf,
    /// Envoy's admin port on 127.0.0.1.
    pub admin_port: u16,
    /// Envoy's node id (this node's name).
    pub node_id: String,
    /// Delta xDS instead of state of the world.
    pub delta: bool,
    /// Worker threads (Envoy's --concurrency).
    pub concurrency: u32,
    /// The most Envoy writes to one file, in bytes.
    pub file_limit: u64,
    /// How often Envoy writes its access-log buffer (ms).
    pub file_flush_ms: u32,
    /// Which of its stats Envoy keeps.
    pub stats: EnvoyStats,
}

/// Which stats the node's Envoy keeps (`envoy.stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnvoyStats {
    /// Envoy's own (server, managers, xDS, access logs) and, of each
    /// connection manager, listener and cluster, the request and connection
    /// counters in [`TRAFFIC_STAT_SUFFIXES`]: every stat the agent reads.
    /// Envoy makes about 150 stats per config otherwise; making them was
    /// two thirds of its main thread's time taking 10,000 configs at once.
    #[default]
    Traffic,
    /// Every stat Envoy makes (its default).
    All,
}

/// Stats kept whole under [`EnvoyStats::Traffic`], by prefix: Envoy's own.
pub const TRAFFIC_STAT_PREFIXES: &[&str] = &[
    "server.",
    "cluster_manager.",
    "listener_manager.",
    "runtime.",
    "control_plane.",
    "access_logs.",
    "overload.",
    "workers.",
    "main_thread.",
    "filesystem.",
    "http.admin.",
    "listener.admin.",
    "cluster.weft-xds.",
];

/// Stats kept of each connection manager (`http.<prefix>.`), listener and
/// cluster under [`EnvoyStats::Traffic`], by suffix: what a request and a
/// connection did, not how the configuration got there.
pub const TRAFFIC_STAT_SUFFIXES: &[&str] = &[
    ".downstream_rq_total",
    ".downstream_rq_completed",
    ".downstream_rq_active",
    ".downstream_rq_1xx",
    ".downstream_rq_2xx",
    ".downstream_rq_3xx",
    ".downstream_rq_4xx",
    ".downstream_rq_5xx",
    ".downstream_rq_time",
    ".downstream_cx_total",
    ".downstream_cx_active",
    ".upstream_rq_total",
    ".upstream_rq_completed",
    ".upstream_rq_active",
    ".upstream_rq_retry",
    ".upstream_rq_timeout",
    ".upstream_rq_1xx",
    ".upstream_rq_2xx",
    ".upstream_rq_3xx",
    ".upstream_rq_4xx",
    ".upstream_rq_5xx",
    ".upstream_rq_time",
    ".upstream_cx_total",
    ".upstream_cx_active",
    ".upstream_cx_connect_fail",
    ".membership_healthy",
    ".membership_total",
];

/// The bootstrap's `stats_config` for a choice (None: Envoy's default).
fn stats_config(stats: EnvoyStats) -> Option<serde_json::Value> {
    match stats {
        EnvoyStats::All => None,
        EnvoyStats::Traffic => {
            let prefixes = TRAFFIC_STAT_PREFIXES.iter().map(|p| json!({"prefix": p}));
            let suffixes = TRAFFIC_STAT_SUFFIXES.iter().map(|s| json!({"suffix": s}));
            let patterns: Vec<_> = prefixes.chain(suffixes).collect();
            Some(json!({"stats_matcher": {"inclusion_list": {"patterns": patterns}}}))
        }
    }
}

/// Envoy's state, for status and the datapath (which needs its pid to find
/// the proxy listeners).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EnvoyState {
    pub pid: Option<u32>,
    pub ready: bool,
    /// Whether the running Envoy was started by an earlier agent.
    pub adopted: bool,
    pub restarts: u64,
    pub last_exit: Option<String>,
    /// When the supervisor saw the last exit (unix ns).
    pub last_exit_at: Option<u64>,
    /// HTTP requests the running Envoy served (its connection managers'
    /// `downstream_rq_completed`, kept rising across removed listeners), as
    /// last read; each is an access-log line.
    pub requests_served: Option<u64>,
    /// Of those, entries it could not write to the spool, counted lost.
    pub entries_unwritten: u64,
}

/// Envoy writes its access-log buffer this often (ms) by default
/// (`envoy.access-log-flush-ms`): the latency of HTTP flows, and what a
/// killed Envoy loses at most.
pub const FILE_FLUSH_MS: u32 = 100;
/// The spool's `current.log` is moved aside past this size, or half the
/// file-size limit if that is less (so it never reaches the limit while
/// the agent runs).
const ROTATE_AT: u64 = 8 << 20;
/// How often the supervisor looks at the spool.
const SPOOL_EVERY: Duration = Duration::from_millis(500);
/// Exits after less than this count as dying young (for backoff).
const YOUNG: Duration = Duration::from_secs(10);
/// How long a stopped Envoy gets to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Envoy's `--drain-time-s`: how long a replaced Envoy discourages requests
/// while it still accepts connections, and the longest each phase of
/// [`drain_then_stop`] waits for its connections to finish.
pub const DRAIN_TIME: Duration = Duration::from_secs(5);
/// The least a replaced Envoy keeps accepting while it drains.
const DRAIN_MIN: Duration = Duration::from_secs(1);
/// The longest a drained Envoy is kept running for the datapath to take
/// copies of its listening sockets (a restarted agent's datapath may still
/// be loading).
const HELD_WAIT: Duration = Duration::from_secs(20);

/// Whether the datapath holds its own copy of the listening socket of every
/// proxy port it hands connections to (so a connection that arrives while
/// no Envoy accepts waits in it).
pub type SocketsHeld = Box<dyn Fn() -> bool + Send + Sync>;

fn pipe_cluster(name: &str, path: &Path) -> serde_json::Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}}
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": path}}}}]}]
        }
    })
}

/// Envoy's command line after the binary. Its bootstrap names it (node
/// metadata), so an Envoy runs with the same options when the agent adopts
/// it: adoption compares bootstraps.
pub fn command_args(s: &EnvoySettings, bootstrap_path: &Path) -> Vec<String> {
    let mut a: Vec<String> = vec!["--config-path".into(), bootstrap_path.display().to_string()];
    a.extend(
        [
            "--disable-hot-restart",
            "--log-level",
            "warn",
            "--file-flush-interval-msec",
            &s.file_flush_ms.to_string(),
            "--concurrency",
            &s.concurrency.to_string(),
            // A drain (a replaced Envoy, a listener LDS changed or removed)
            // asks every connection to close at once, for DRAIN_TIME.
            "--drain-time-s",
            &DRAIN_TIME.as_secs().to_string(),
            "--drain-strategy",
            "immediate",
        ]
        .map(String::from),
    );
    a
}

/// The bootstrap: ADS for listeners and clusters (everything else follows
/// them), the agent's ADS socket as a cluster, and `envoy-admin` for configs
/// that expose the admin interface.
pub fn bootstrap(s: &EnvoySettings) -> serde_json::Value {
    let args = command_args(s, &s.state_dir.join(BOOTSTRAP));
    let mut b = json!({
        "node": {"id": s.node_id, "cluster": "weft", "metadata": {
            "weft-command-line": args.join(" "),
            "weft-file-limit": s.file_limit.to_string(),
            BINARY_KEY: binary_identity(&s.binary),
        }},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": s.admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": if s.delta { "DELTA_GRPC" } else { "GRPC" },
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{"envoy_grpc": {"cluster_name": "weft-xds"}}]
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"}
        },
        "static_resources": {
            "clusters": [
                pipe_cluster("weft-xds", &s.xds_socket),
                {
                    "name": "envoy-admin",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "envoy-admin",
                        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": s.admin_port}}}}]}]
                    }
                }
            ]
        },
        // Every upstream socket carries weft's mark: host policies do not
        // judge the proxy's upstream connections (the pods they reach do).
        // A cluster listing socket options of its own gets the mark added
        // there (`xds::translate`): Envoy would take its list instead.
        "cluster_manager": {"upstream_bind_config": {"socket_options": [{
            "description": UPSTREAM_MARK_DESCRIPTION,
            "level": libc::SOL_SOCKET,
            "name": libc::SO_MARK,
            "int_value": UPSTREAM_MARK,
            "state": "STATE_PREBIND"
        }]}},
        "layered_runtime": {
            "layers": [{"name": "static", "static_layer": {"overload": {"global_downstream_max_connections": 50000}}}]
        },
        // A cluster's traffic stats (upstream_rq_*, upstream_cx_*, ...) are
        // made when it first carries traffic: with thousands of configs'
        // clusters this halved Envoy's main-thread time per cluster added
        // (~0.5 to ~0.3 ms) and saved ~20 KiB of its memory per cluster
        // (`benches/envoy-listener-shapes.py ads+clustersonly+deferred`).
        "deferred_stat_options": {"enable_deferred_creation_stats": true}
    });
    if let Some(stats) = stats_config(s.stats) {
        b["stats_config"] = stats;
    }
    b
}

/// The bootstrap's node metadata key for [`binary_identity`].
const BINARY_KEY: &str = "weft-binary";

/// What identifies the Envoy binary, in the bootstrap: an upgraded binary
/// (a new file at the configured path, or another path) makes another
/// bootstrap, so the running Envoy is replaced (drained), not adopted. It
/// is the file's resolved path, size, modification time and inode: cheap
/// to read at every agent start, and changed by any upgrade that writes a
/// new file (hashing ~100 MB at every start was not worth it). Envoy
/// started through a wrapper script is identified by the script; the binary
/// it runs being replaced under it is caught by [`runs_a_replaced_binary`].
fn binary_identity(binary: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let resolved = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_path_buf());
    match std::fs::metadata(&resolved) {
        Ok(m) => {
            let mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            let mtime = mtime.map_or(0, |d| d.as_nanos());
            format!("{} size={} mtime-ns={mtime} inode={}", resolved.display(), m.len(), m.ino())
        }
        Err(e) => format!("{} ({e})", resolved.display()),
    }
}

/// Whether the binary a running process executes was replaced or removed
/// on disk since it started (the kernel then marks its exe link deleted).
fn runs_a_replaced_binary(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p.to_string_lossy().ends_with(" (deleted)"))
}

/// A node metadata value of a bootstrap file's bytes.
fn node_metadata(bootstrap: &[u8], key: &str) -> Option<String> {
    let b: serde_json::Value = serde_json::from_slice(bootstrap).ok()?;
    b["node"]["metadata"][key].as_str().map(str::to_owned)
}

/// Where the supervisor keeps its files, under the state directory.
const BOOTSTRAP: &str = "envoy-bootstrap.json";
const PID_FILE: &str = "envoy.pid";
const LOG: &str = "envoy.log";

/// The access-log spool, as Envoy's writer side sees it.
struct Spool {
    dir: SpoolDir,
    rotate_at: u64,
    /// A segment moved aside that waits for Envoy to reopen the path
    /// (and when it was last asked to).
    pending: Option<(u64, Instant)>,
}

impl Spool {
    fn open(state_dir: &Path, file_limit: u64) -> anyhow::Result<Spool> {
        let dir = state_dir.join(ACCESS_LOG_PATH);
        let dir = dir.parent().unwrap_or(state_dir);
        Ok(Spool { dir: SpoolDir::create(dir)?, rotate_at: ROTATE_AT.min(file_limit / 2), pending: None })
    }

    /// No Envoy writes the spool (before one starts): every segment is
    /// sealed, and the next Envoy starts a file of its own.
    fn writer_gone(&mut self) {
        self.pending = None;
        let r = self.dir.seal(None).and_then(|_| self.dir.rotate(true));
        if let Err(e) = r {
            tracing::error!("access-log spool {}: {e}", self.dir.dir().display());
        }
    }

    /// An adopted Envoy may have been asked to reopen by the last agent.
    fn adopted(&mut self, envoy: &Process) {
        let filling = self.dir.files().map(|f| f.iter().filter(|f| !f.sealed).filter_map(|f| f.segment).max());
        if let Ok(Some(n)) = filling {
            let _ = envoy.signal(libc::SIGUSR1);
            self.pending = Some((n, Instant::now()));
        }
    }

    /// Moves `current.log` aside when it is large (Envoy reopens the path on
    /// SIGUSR1), and seals the moved file once Envoy writes the new one.
    fn tend(&mut self, envoy: &Process) {
        let r = (|| -> std::io::Result<()> {
            if let Some((n, asked)) = self.pending {
                if self.dir.current().exists() || envoy.has_exited() {
                    self.dir.seal(Some(n))?;
                    self.pending = None;
                } else if asked.elapsed() > Duration::from_secs(5) {
                    envoy.signal(libc::SIGUSR1)?;
                    self.pending = Some((n, Instant::now()));
                }
                return Ok(());
            }
            let len = std::fs::metadata(self.dir.current()).map(|m| m.len()).unwrap_or(0);
            if len >= self.rotate_at
                && let Some(n) = self.dir.rotate(false)?
            {
                envoy.signal(libc::SIGUSR1)?;
                self.pending = Some((n, Instant::now()));
            }
            Ok(())
        })();
        if let Err(e) = r {
            tracing::warn!("access-log spool {}: {e}", self.dir.dir().display());
        }
    }
}

/// The running Envoy of an earlier agent, if it runs with this bootstrap
/// (which names its binary, [`binary_identity`]) and its binary was not
/// replaced under it: it is adopted, so L7 connections survive the agent's
/// restart. Any other is drained and stopped ([`drain_then_stop`]).
async fn adopt(s: &EnvoySettings, bootstrap: &[u8], sockets_held: &SocketsHeld) -> Option<Process> {
    let pid: u32 = std::fs::read_to_string(s.state_dir.join(PID_FILE)).ok()?.trim().parse().ok()?;
    let bootstrap_path = s.state_dir.join(BOOTSTRAP);
    let mut envoy = Process::adopt(pid, &bootstrap_path)?;
    let running = std::fs::read(&bootstrap_path).ok();
    let replaced = runs_a_replaced_binary(pid);
    if running.as_deref() == Some(bootstrap) && !replaced {
        return Some(envoy);
    }
    let binary = |b: &[u8]| node_metadata(b, BINARY_KEY);
    let why = if replaced {
        "the binary it runs was replaced on disk"
    } else if running.as_deref().and_then(binary) != binary(bootstrap) {
        "its binary differs"
    } else {
        "its bootstrap differs"
    };
    // Its admin port is the one its own bootstrap names.
    let admin_port = running
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|b| b["admin"]["address"]["socket_address"]["port_value"].as_u64())
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(s.admin_port);
    tracing::info!(pid, "replacing the Envoy of an earlier agent ({why}): draining it first");
    drain_then_stop(&mut envoy, admin_port, sockets_held).await;
    None
}

/// Stops a running Envoy without cutting its connections. It goes on
/// serving until the datapath holds its own copies of Envoy's listening
/// sockets (`sockets_held`, at most [`HELD_WAIT`]; a restarted agent
/// replaces Envoy while its datapath may still be loading): from then on a
/// connection that arrives while no Envoy accepts waits in those sockets
/// for the next Envoy instead of being refused or left hanging. Then it
/// drains (`/drain_listeners?graceful`: HTTP/1 responses say `connection:
/// close`, HTTP/2 connections get a GOAWAY, and new connections are still
/// accepted) for at least [`DRAIN_MIN`] and until its connections are gone
/// or [`DRAIN_TIME`] has passed. Then it stops accepting
/// (`/drain_listeners`), and once its last connections are done (at most
/// [`DRAIN_TIME`] more), [`stop`]. Only a request still unanswered after
/// that fails.
/// An Envoy whose admin interface does not answer is stopped at once.
async fn drain_then_stop(envoy: &mut Process, admin_port: u16, sockets_held: &SocketsHeld) {
    let client = match weft_flow::client::http_client().timeout(Duration::from_secs(2)).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("an HTTP client for Envoy's admin interface: {e}; stopping Envoy without a drain");
            return stop(envoy).await;
        }
    };
    let url = |path: &str| format!("http://127.0.0.1:{admin_port}{path}");
    let post = |path: &'static str| {
        let req = client.post(url(path));
        async move { req.send().await.is_ok_and(|r| r.status().is_success()) }
    };
    let connections = || {
        let req = client.get(url("/stats?filter=downstream_cx_active$"));
        async move { active_connections(&req.send().await.ok()?.text().await.ok()?) }
    };
    let wait = |least: Duration| async move {
        let start = Instant::now();
        while start.elapsed() < DRAIN_TIME {
            // An Envoy that no longer answers has nothing left to drain.
            let active = connections().await.unwrap_or(0);
            if active == 0 && start.elapsed() >= least {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // Envoy serves as before until the datapath holds its sockets: its
    // graceful drain ends by closing its listeners (after DRAIN_TIME), and
    // from then on only the datapath's copies hold what arrives.
    let start = Instant::now();
    while !sockets_held() {
        if start.elapsed() >= HELD_WAIT {
            tracing::warn!(
                pid = envoy.pid(),
                "the datapath holds no copy of Envoy's listening sockets after {HELD_WAIT:?}: replacing Envoy anyway; connections that arrive until the next Envoy listens are refused"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !post("/drain_listeners?graceful").await {
        tracing::warn!(pid = envoy.pid(), "Envoy's admin interface refused the drain; stopping it at once");
        return stop(envoy).await;
    }
    tracing::info!(pid = envoy.pid(), held_after_ms = start.elapsed().as_millis() as u64, "Envoy is draining");
    wait(DRAIN_MIN).await;
    // Then it stops accepting: what arrives from now on waits in the
    // datapath's copies for the next Envoy, and the SIGTERM cuts no
    // connection the old one accepted after its last look.
    if post("/drain_listeners").await {
        tracing::info!(pid = envoy.pid(), "Envoy stopped accepting; stopping it once its connections are done");
        wait(Duration::ZERO).await;
    }
    stop(envoy).await;
}

/// Downstream connections open on Envoy's listeners (the admin listener
/// left out), from `/stats` text lines.
fn active_connections(stats: &str) -> Option<u64> {
    let mut total = 0u64;
    for line in stats.lines() {
        let Some((name, value)) = line.split_once(": ") else { continue };
        let listener = name.strip_prefix("listener.").filter(|n| !n.starts_with("admin.") && !n.contains(".worker_"));
        if listener.is_some_and(|n| n.ends_with(".downstream_cx_active")) {
            total = total.saturating_add(value.trim().parse().ok()?);
        }
    }
    Some(total)
}

/// Stops Envoy: SIGTERM, then SIGKILL after [`STOP_GRACE`].
async fn stop(envoy: &mut Process) {
    let _ = envoy.signal(libc::SIGTERM);
    if tokio::time::timeout(STOP_GRACE, envoy.exited()).await.is_err() {
        let _ = envoy.signal(libc::SIGKILL);
        envoy.exited().await;
    }
}

/// Starts Envoy in the state directory with the file-size limit, and an id
/// its access-log lines carry (returned).
fn start(s: &EnvoySettings) -> anyhow::Result<(Process, u64)> {
    // Larger for each later Envoy on the node.
    let id = weft_flow::time::now_ns();
    let log = std::fs::OpenOptions::new().create(true).append(true).open(s.state_dir.join(LOG))?;
    let mut cmd = tokio::process::Command::new(&s.binary);
    cmd.args(command_args(s, &s.state_dir.join(BOOTSTRAP)))
        .current_dir(&s.state_dir)
        .stdin(Stdio::null())
        .env(accesslog::WRITER_ENV, id.to_string())
        .stdout(log.try_clone()?)
        .stderr(log);
    let limit = s.file_limit as libc::rlim_t;
    // SAFETY: between fork and exec only async-signal-safe calls, on values
    // computed before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A write past the limit fails instead of killing Envoy.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let envoy =
        Process::spawn(&mut cmd).map_err(|e| anyhow::anyhow!("starting Envoy ({}): {e}", s.binary.display()))?;
    std::fs::write(s.state_dir.join(PID_FILE), envoy.pid().to_string())?;
    tracing::info!(pid = envoy.pid(), binary = %s.binary.display(), "Envoy started");
    Ok((envoy, id))
}

/// Runs Envoy for as long as the returned future runs (see the module doc).
/// `sockets_held` says when an Envoy of an earlier agent that must be
/// replaced can stop (see [`drain_then_stop`]); entries Envoy could not
/// write are counted lost in `pipeline` ([`ledger`]).
pub async fn supervise(
    s: EnvoySettings,
    state: watch::Sender<EnvoyState>,
    sockets_held: SocketsHeld,
    pipeline: Arc<Pipeline>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&s.state_dir)?;
    let bootstrap_bytes = serde_json::to_vec_pretty(&bootstrap(&s))?;
    let mut spool = Spool::open(&s.state_dir, s.file_limit)?;
    let mut ledger = Ledger::new(pipeline, &s.state_dir);
    let stats = weft_flow::client::http_client().timeout(ledger::POLL_MAX).build().map_err(|e| {
        tracing::warn!("an HTTP client for Envoy's admin interface: {e}; entries Envoy cannot write are not counted")
    });
    let stats_urls = ledger::STATS_PATHS.map(|p| format!("http://127.0.0.1:{}{p}", s.admin_port));
    let mut envoy = match adopt(&s, &bootstrap_bytes, &sockets_held).await {
        Some(envoy) => {
            tracing::info!(pid = envoy.pid(), "adopting the running Envoy");
            spool.adopted(&envoy);
            ledger.envoy(ledger::writer_of(envoy.pid()));
            envoy
        }
        None => {
            std::fs::write(s.state_dir.join(BOOTSTRAP), &bootstrap_bytes)?;
            spool.writer_gone();
            let (envoy, id) = start(&s)?;
            ledger.envoy(Some(id));
            envoy
        }
    };
    let mut young_exits = 0u32;
    loop {
        let adopted = envoy.started.is_none();
        state.send_modify(|st| {
            st.pid = Some(envoy.pid());
            st.ready = false;
            st.adopted = adopted;
        });
        let readiness = readiness(state.clone(), s.admin_port);
        let mut tick = tokio::time::interval(SPOOL_EVERY);
        let mut next_reading = tokio::time::Instant::now();
        let why = loop {
            tokio::select! {
                why = envoy.exited() => break why,
                _ = tick.tick() => spool.tend(&envoy),
                _ = tokio::time::sleep_until(next_reading) => {
                    let began = tokio::time::Instant::now();
                    let fetch = async {
                        let mut text = String::new();
                        for url in &stats_urls {
                            let r = stats.as_ref().ok()?.get(url).send().await.ok()?;
                            if !r.status().is_success() {
                                return None;
                            }
                            text.push_str(&r.text().await.ok()?);
                            text.push('\n');
                        }
                        Some(Reading::parse(&text))
                    };
                    // Envoy's death is seen at once, also during a reading.
                    let reading = tokio::select! {
                        why = envoy.exited() => break why,
                        r = fetch => r,
                    };
                    next_reading = tokio::time::Instant::now() + ledger::next_poll(began.elapsed());
                    ledger.tick(reading);
                    let (served, lost) = ledger.served_and_lost().map_or((None, 0), |(s, l)| (Some(s), l));
                    state.send_if_modified(|st| {
                        let changed = (st.requests_served, st.entries_unwritten) != (served, lost);
                        (st.requests_served, st.entries_unwritten) = (served, lost);
                        changed
                    });
                }
            }
        };
        readiness.abort();
        let now = weft_flow::time::now_ns();
        let ran = envoy.started.map(|t| t.elapsed());
        state.send_modify(|st| {
            st.pid = None;
            st.ready = false;
            st.restarts += 1;
            st.last_exit = Some(why.clone());
            st.last_exit_at = Some(now);
        });
        spool.writer_gone();
        ledger.exited();
        // Restart at once; only an Envoy that keeps dying young waits,
        // 250 ms doubling to 30 s.
        young_exits = if ran.is_some_and(|r| r < YOUNG) { young_exits.saturating_add(1) } else { 0 };
        let wait = match young_exits {
            0 | 1 => Duration::ZERO,
            n => Duration::from_millis(250).saturating_mul(1 << (n - 2).min(7)).min(Duration::from_secs(30)),
        };
        tracing::warn!(pid = envoy.pid(), %why, "Envoy exited; restarting in {wait:?}");
        tokio::time::sleep(wait).await;
        let (next, id) = start(&s)?;
        envoy = next;
        ledger.envoy(Some(id));
    }
}

/// Polls Envoy's /ready and keeps `state.ready` up to date.
fn readiness(state: watch::Sender<EnvoyState>, port: u16) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let url = format!("http://127.0.0.1:{port}/ready");
        // Without a client there is no readiness to report: Envoy stays not ready.
        let client = match weft_flow::client::http_client().timeout(Duration::from_secs(2)).build() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("an HTTP client for Envoy's admin interface: {e}");
                return;
            }
        };
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let ready = client.get(&url).send().await.is_ok_and(|r| r.status().as_u16() == 200);
            state.send_if_modified(|st| {
                let changed = st.ready != ready;
                st.ready = ready;
                changed
            });
        }
    })
}

/// Envoy was not found where the agent looks.
#[derive(Debug, thiserror::Error)]
#[error(
    "no Envoy binary: set envoy.binary in the agent's config (or $WEFT_ENVOY), or put `envoy` on PATH or next to weft-agent ({next_to})"
)]
pub struct EnvoyNotFound {
    /// The agent's own directory, as looked in.
    pub next_to: String,
}

/// Finds the Envoy binary when the agent starts: the configured one, else
/// `$WEFT_ENVOY`, else `envoy` on PATH, else `envoy` next to the agent's own
/// binary (an image that ships both side by side).
pub fn find_binary(configured: Option<&Path>) -> Result<PathBuf, EnvoyNotFound> {
    if let Some(p) = configured {
        return Ok(p.to_owned());
    }
    if let Some(p) = std::env::var_os("WEFT_ENVOY").filter(|p| !p.is_empty()) {
        return Ok(p.into());
    }
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    let own_dir = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_owned));
    on_path.chain(own_dir.clone()).map(|dir| dir.join("envoy")).find(|p| is_executable(p)).ok_or_else(|| {
        EnvoyNotFound { next_to: own_dir.map(|d| d.display().to_string()).unwrap_or_else(|| "unknown".into()) }
    })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draining_envoys_connections_are_its_listeners_not_its_admin() {
        let stats = "listener.127.0.0.1_15001.downstream_cx_active: 2\n\
                     listener.127.0.0.1_15001.worker_0.downstream_cx_active: 2\n\
                     listener.admin.downstream_cx_active: 1\n\
                     listener.0.0.0.0_8080.downstream_cx_active: 3\n\
                     http.admin.downstream_cx_active: 1\n";
        assert_eq!(active_connections(stats), Some(5));
        assert_eq!(active_connections(""), Some(0));
        assert_eq!(active_connections("listener.x.downstream_cx_active: many"), None);
    }

    /// Settings of a test Envoy whose files are in `dir`.
    fn settings(dir: &Path, binary: &Path) -> EnvoySettings {
        EnvoySettings {
            binary: binary.to_path_buf(),
            state_dir: dir.to_path_buf(),
            xds_socket: dir.join("xds.sock"),
            admin_port: 9901,
            node_id: "node1".into(),
            delta: false,
            concurrency: 2,
            file_limit: 1 << 20,
            file_flush_ms: FILE_FLUSH_MS,
            stats: EnvoyStats::Traffic,
        }
    }

    /// Whether the bootstrap's stats matcher keeps a stat (Envoy's
    /// inclusion list: any prefix or suffix pattern).
    fn kept(b: &serde_json::Value, stat: &str) -> bool {
        let Some(patterns) = b["stats_config"]["stats_matcher"]["inclusion_list"]["patterns"].as_array() else {
            return true;
        };
        patterns.iter().any(|p| {
            p["prefix"].as_str().is_some_and(|x| stat.starts_with(x))
                || p["suffix"].as_str().is_some_and(|x| stat.ends_with(x))
        })
    }

    /// `envoy.stats: traffic` keeps every stat the agent reads (the access-log
    /// ledger's, the drain's) and the request counters, and drops the
    /// per-config plumbing; `all` leaves Envoy's default.
    #[test]
    fn the_traffic_stats_keep_what_the_agent_reads() {
        let dir = std::env::temp_dir();
        let mut s = settings(&dir, &dir.join("envoy"));
        let b = bootstrap(&s);
        for stat in [
            "http.c0.downstream_rq_completed",
            "filesystem.write_total_buffered",
            "filesystem.write_completed",
            "filesystem.write_failed",
            "http.c0.downstream_cx_active",
            "listener.10.97.0.1_80.downstream_cx_active",
            "cluster.default/s0.upstream_rq_retry",
            "listener_manager.lds.update_rejected",
            "cluster_manager.cds.update_success",
        ] {
            assert!(kept(&b, stat), "{stat} dropped: {b}");
        }
        for stat in [
            "http.c0.rds.c0-route.config_reload",
            "cluster.default/s0.lb_healthy_panic",
            "http.c0.downstream_cx_http1_total",
        ] {
            assert!(!kept(&b, stat), "{stat} kept");
        }
        s.stats = EnvoyStats::All;
        assert!(bootstrap(&s).get("stats_config").is_none());
    }

    /// Every upstream socket of the node's Envoy carries the mark the
    /// datapath exempts from host egress policy (`WEFT_MARK_FROM_PROXY`).
    #[test]
    fn the_bootstrap_marks_every_upstream_socket() {
        let dir = std::env::temp_dir();
        let b = bootstrap(&settings(&dir, &dir.join("envoy")));
        let opts = &b["cluster_manager"]["upstream_bind_config"]["socket_options"];
        assert_eq!(opts[0]["level"], libc::SOL_SOCKET, "{b}");
        assert_eq!(opts[0]["name"], libc::SO_MARK, "{b}");
        assert_eq!(opts[0]["int_value"], weft_ebpf::abi::MARK_FROM_PROXY, "{b}");
        assert_eq!(opts[0]["state"], "STATE_PREBIND", "{b}");
    }

    #[test]
    fn an_upgraded_binary_makes_another_bootstrap() {
        let dir = std::env::temp_dir().join(format!("weft-envoy-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let binary = dir.join("envoy");
        std::fs::write(&binary, "#!/bin/sh\n# 1.40.0\n").unwrap();
        let s = |binary: &Path| settings(&dir, binary);
        let before = bootstrap(&s(&binary));
        assert_eq!(before, bootstrap(&s(&binary)), "the same binary: the same bootstrap");
        // A new file of the same size at the same path (an upgrade moves it
        // into place).
        let new = dir.join("envoy.new");
        std::fs::write(&new, "#!/bin/sh\n# 1.40.1\n").unwrap();
        std::fs::rename(&new, &binary).unwrap();
        let after = bootstrap(&s(&binary));
        assert_ne!(before, after, "an upgraded binary: another bootstrap");
        let key = |b: &serde_json::Value| b["node"]["metadata"][BINARY_KEY].as_str().unwrap().to_owned();
        assert!(key(&after).starts_with(&binary.canonicalize().unwrap().display().to_string()), "{}", key(&after));
        assert_eq!(node_metadata(&serde_json::to_vec(&after).unwrap(), BINARY_KEY), Some(key(&after)));
        // Another path to the same file is the same binary.
        let link = dir.join("envoy-link");
        std::os::unix::fs::symlink(&binary, &link).unwrap();
        assert_eq!(key(&bootstrap(&s(&link))), key(&after));
        std::fs::remove_dir_all(&dir).unwrap();
        // This process runs a binary that is still there.
        assert!(!runs_a_replaced_binary(std::process::id()));
    }

    #[test]
    fn envoy_is_found_at_run_time() {
        assert_eq!(find_binary(Some(Path::new("/opt/envoy"))).unwrap(), Path::new("/opt/envoy"));
        // Nothing of the build machine is baked in: the lookup is PATH and
        // the agent's own directory (here, the test binary's).
        let err = EnvoyNotFound { next_to: "/usr/local/bin".into() }.to_string();
        assert!(err.contains("envoy.binary") && err.contains("/usr/local/bin"), "{err}");
        assert!(is_executable(Path::new("/bin/sh")));
        assert!(!is_executable(&Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")));
        assert!(!is_executable(Path::new("/bin")), "a directory is not a binary");
    }
}
