//! The lab with a Kubernetes API: weft's in-process API server, reachable
//! at 127.0.0.1:6443 inside every node (and on a free port of the test's own
//! loopback), agents that read it with exactly the capabilities the
//! DaemonSet grants, and the operator in-process.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use weft_agent::requirements::CAPABILITIES;

use crate::{
    k8s::fake::{ApiServer, write_kubeconfig},
    lab::Lab,
    objects::AgentFiles,
};

/// Port of the API server inside each node.
pub const API_PORT: u16 = 6443;

/// The API server and the runtime serving it. Drop it to stop both.
pub struct ApiLab {
    pub server: ApiServer,
    /// A kubeconfig for agents in the nodes (127.0.0.1:6443).
    pub node_kubeconfig: PathBuf,
    rt: tokio::runtime::Runtime,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ApiLab {
    /// Starts the server and serves it in every node of `lab`.
    pub fn new(lab: &Lab) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let server = rt.block_on(ApiServer::start())?;
        {
            let _enter = rt.enter();
            for n in &lab.nodes {
                server.serve_in_netns(&weft_agent::netns::named(&n.netns), API_PORT)?;
            }
        }
        let node_kubeconfig = lab.run_dir.join("kubeconfig");
        write_kubeconfig(&node_kubeconfig, &format!("http://127.0.0.1:{API_PORT}"))?;
        Ok(Self { server, node_kubeconfig, rt, tasks: Vec::new() })
    }

    /// Runs weft's operator in this process (identity `identity`).
    pub fn start_operator(&mut self, identity: &str) {
        let client = {
            let _enter = self.rt.enter();
            self.server.client()
        };
        let opts = weft_agent::operator::OperatorOptions {
            identity: identity.into(),
            lease_duration: std::time::Duration::from_secs(2),
            ..Default::default()
        };
        self.tasks.push(self.rt.spawn(async move {
            if let Err(e) = weft_agent::operator::run(client, opts).await {
                eprintln!("operator stopped: {e:#}");
            }
        }));
    }

    /// Agent configuration lines that make it read this API server.
    pub fn agent_config(&self) -> String {
        format!("kubernetes:\n  enabled: true\n  kubeconfig: {}\n", self.node_kubeconfig.display())
    }
}

impl Drop for ApiLab {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts node `idx`'s agent like [`crate::objects::start_agent`], with only
/// the capabilities the DaemonSet grants (agent/src/requirements.rs) in its
/// bounding set: if it needed another, it would fail here.
pub fn start_agent_with_daemonset_caps(lab: &Lab, idx: usize, files: &AgentFiles, log: &Path) -> anyhow::Result<u32> {
    let _ = std::fs::remove_file(files.state_dir.join("ready"));
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let caps: Vec<String> = CAPABILITIES.iter().map(|c| format!("+{}", c.name.to_lowercase())).collect();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set=-all,{}", caps.join(",")))
        .arg("--")
        .arg(crate::objects::agent_binary())
        .args(["run", "--config"])
        .arg(&files.config)
        .stdout(log.try_clone()?)
        .stderr(log);
    lab.spawn(&lab.node(idx).netns, Some(&lab.node(idx).cgroup), &mut cmd)
}
