//! The node's Envoy: its bootstrap (ADS and the access-log service over the
//! agent's unix sockets, admin on 127.0.0.1 inside the node), and a
//! supervisor that starts it, restarts it with backoff when it dies, and
//! reports whether it is ready. A restarted Envoy reconnects to ADS and is
//! sent the current state again.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

/// How the agent runs Envoy.
#[derive(Clone, Debug)]
pub struct EnvoySettings {
    /// The Envoy binary.
    pub binary: PathBuf,
    /// Where the bootstrap and the log go.
    pub state_dir: PathBuf,
    /// ADS socket (the agent serves it).
    pub xds_socket: PathBuf,
    /// Access-log service socket (the agent serves it).
    pub als_socket: PathBuf,
    /// Envoy's admin port on 127.0.0.1.
    pub admin_port: u16,
    /// Envoy's node id (this node's name).
    pub node_id: String,
    /// Delta xDS instead of state of the world.
    pub delta: bool,
    /// Worker threads (Envoy's --concurrency).
    pub concurrency: u32,
}

/// Envoy's state, for status and the datapath (which needs its pid to find
/// the proxy listeners).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct EnvoyState {
    pub pid: Option<u32>,
    pub ready: bool,
    pub restarts: u64,
    pub last_exit: Option<String>,
}

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

/// The bootstrap: ADS for listeners and clusters (everything else follows
/// them), the agent's sockets as clusters, and `envoy-admin` for configs that
/// expose the admin interface.
pub fn bootstrap(s: &EnvoySettings) -> serde_json::Value {
    json!({
        "node": {"id": s.node_id, "cluster": "weft"},
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
                pipe_cluster("weft-als", &s.als_socket),
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
        "layered_runtime": {
            "layers": [{"name": "static", "static_layer": {"overload": {"global_downstream_max_connections": 50000}}}]
        }
    })
}

/// An Envoy a previous agent started with the same bootstrap, still running:
/// the agent adopts it instead of starting another, so L7 connections
/// survive an agent restart. One with another bootstrap is stopped.
fn adoptable(pid_file: &Path, bootstrap_path: &Path, bootstrap: &[u8]) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let ours = String::from_utf8_lossy(&cmdline).contains(&*bootstrap_path.to_string_lossy());
    if !ours {
        return None;
    }
    if std::fs::read(bootstrap_path).ok().as_deref() == Some(bootstrap) {
        return Some(pid);
    }
    tracing::info!(pid, "stopping the Envoy of an earlier agent: its bootstrap differs");
    // SAFETY: signalling a process we identified by its command line.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    None
}

/// Runs Envoy for as long as the returned future runs: restarts it with
/// exponential backoff (1 s doubling to 30 s, reset after a minute of uptime).
pub async fn supervise(s: EnvoySettings, state: watch::Sender<EnvoyState>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&s.state_dir)?;
    let bootstrap_path = s.state_dir.join("envoy-bootstrap.json");
    let pid_file = s.state_dir.join("envoy.pid");
    let bootstrap_bytes = serde_json::to_vec_pretty(&bootstrap(&s))?;
    if let Some(pid) = adoptable(&pid_file, &bootstrap_path, &bootstrap_bytes) {
        tracing::info!(pid, "adopting the running Envoy");
        state.send_modify(|st| st.pid = Some(pid));
        let readiness = readiness(state.clone(), s.admin_port);
        while Path::new(&format!("/proc/{pid}")).exists() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        readiness.abort();
        tracing::warn!(pid, "the adopted Envoy exited");
        state.send_modify(|st| {
            st.pid = None;
            st.ready = false;
            st.restarts += 1;
            st.last_exit = Some("adopted Envoy exited".into());
        });
    }
    std::fs::write(&bootstrap_path, &bootstrap_bytes)?;
    let log_path = s.state_dir.join("envoy.log");
    let mut backoff = Duration::from_secs(1);
    loop {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut child = tokio::process::Command::new(&s.binary)
            .arg("--config-path")
            .arg(&bootstrap_path)
            .args(["--disable-hot-restart", "--log-level", "warn", "--concurrency"])
            .arg(s.concurrency.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting Envoy ({}): {e}", s.binary.display()))?;
        let pid = child.id();
        if let Some(p) = pid {
            std::fs::write(&pid_file, p.to_string())?;
        }
        let started = Instant::now();
        state.send_modify(|st| {
            st.pid = pid;
            st.ready = false;
        });
        tracing::info!(?pid, binary = %s.binary.display(), "Envoy started");
        let readiness = readiness(state.clone(), s.admin_port);
        let status = child.wait().await;
        readiness.abort();
        let why = match status {
            Ok(st) => st.to_string(),
            Err(e) => e.to_string(),
        };
        tracing::warn!(%why, "Envoy exited; restarting in {backoff:?}");
        state.send_modify(|st| {
            st.pid = None;
            st.ready = false;
            st.restarts += 1;
            st.last_exit = Some(why);
        });
        if started.elapsed() > Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
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
