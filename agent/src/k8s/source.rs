//! The agent's source of objects: the objects directory, or the Kubernetes
//! API when the config enables it. Both yield the same [`Loaded`].

use std::time::Duration;

use anyhow::Context;

use super::{
    watch::{Kinds, KubeSource},
    yaml::{DirSource, Loaded},
};
use crate::{config::AgentConfig, controller::ControlStatus};

/// See the module doc.
pub enum Source {
    Dir(DirSource),
    Kube(Box<KubeSource>),
}

/// A kube client from a kubeconfig file, or inferred (in-cluster, then
/// $KUBECONFIG, then ~/.kube/config).
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context("finding the Kubernetes API (in-cluster or kubeconfig)")?,
    };
    kube::Client::try_from(config).context("creating the Kubernetes client")
}

impl Source {
    /// The source `cfg` names. For the API, returns once every watched kind
    /// has been listed, so the first state is complete (an agent restarting
    /// must not apply a partial state over the pinned datapath).
    pub async fn start(cfg: &AgentConfig) -> anyhow::Result<Self> {
        if !cfg.kubernetes.enabled {
            return Ok(Source::Dir(DirSource::new(cfg.objects_dir.clone())));
        }
        let client = client(cfg.kubernetes.kubeconfig.as_deref()).await?;
        let mut src =
            KubeSource::start(client, Kinds::agent(), &cfg.node_name).await.with_node_report(&cfg.kubernetes.namespace);
        src.wait_synced(Duration::from_secs(10)).await;
        tracing::info!(kinds = ?src.stats().keys().collect::<Vec<_>>(), "objects listed from the Kubernetes API");
        Ok(Source::Kube(Box::new(src)))
    }

    /// Everything the source holds, if anything changed since the last call.
    pub fn poll(&mut self) -> Option<Loaded> {
        match self {
            Source::Dir(d) => d.poll(),
            Source::Kube(k) => k.poll(),
        }
    }

    /// Tells the source what became of its objects (the API source turns
    /// Envoy's refusals into Events).
    pub fn observe(&mut self, status: &ControlStatus) {
        if let Source::Kube(k) = self {
            k.report(status);
        }
    }
}
