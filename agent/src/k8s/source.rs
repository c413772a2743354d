//! The agent's source of objects: the objects directory, or the Kubernetes
//! API when the config enables it. Both yield the same [`Loaded`], and both
//! say when they changed ([`Source::changed`]): the API source on every watch
//! event, the directory on every inotify event, so the control loop starts
//! on a change when it happens, not at its next poll tick.

use std::time::Duration;

use anyhow::Context;

use super::{
    dirwatch::DirWatch,
    watch::{Kinds, KubeSource},
    yaml::{DirSource, Loaded},
};
use crate::{config::AgentConfig, controller::ControlStatus};

/// See the module doc.
pub enum Source {
    /// The objects directory, and its inotify watch (None: inotify refused
    /// it; the control loop's tick polls it).
    Dir(Box<DirSource>, Option<DirWatch>),
    Kube(Box<KubeSource>),
}

/// Watches `root` and every directory under it that [`super::yaml::files`]
/// reads (hidden ones are not read).
fn watch_dir(root: &std::path::Path) -> Option<DirWatch> {
    let w = match DirWatch::new() {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!("no inotify for the objects directory ({e}): it is polled every tick");
            return None;
        }
    };
    let mut dirs = vec![root.to_owned()];
    while let Some(d) = dirs.pop() {
        if let Err(e) = w.add(&d) {
            tracing::warn!("cannot watch {} ({e}): changes in it are seen at the next tick", d.display());
            continue;
        }
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = entry.path();
            let hidden = p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
            if !hidden && p.is_dir() {
                dirs.push(p);
            }
        }
    }
    Some(w)
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
            return Ok(Source::Dir(Box::new(DirSource::new(cfg.objects_dir.clone())), watch_dir(&cfg.objects_dir)));
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
            Source::Dir(d, _) => d.poll(),
            Source::Kube(k) => k.poll(),
        }
    }

    /// Waits until the source may have changed (then [`Source::poll`] says
    /// what); never, for a directory without inotify or once the API
    /// source's watches have all ended.
    pub async fn changed(&mut self) {
        match self {
            Source::Kube(k) => {
                if !k.changed().await {
                    std::future::pending::<()>().await;
                }
            }
            Source::Dir(_, Some(w)) => {
                if let Err(e) = w.changed().await {
                    tracing::warn!("the objects directory's inotify watch failed ({e}): it is polled every tick");
                    if let Source::Dir(_, watch) = self {
                        *watch = None;
                    }
                }
            }
            Source::Dir(_, None) => std::future::pending().await,
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
