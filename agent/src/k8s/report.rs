//! The agent's report of what its node serves: one WeftNode, named after the
//! node, in weft's namespace, whose status says for each EnvoyConfig meant
//! for the node which generation its Envoy acknowledged. The operator turns
//! every node's report into each config's `Applied` condition.
//!
//! The report is owned by the agent's Pod (found with a SelfSubjectReview:
//! a kubelet's token for the Pod names it), so it goes when the agent does
//! and the operator then says no agent reports, rather than trusting a
//! report no one keeps. One task writes it, with server-side apply, when it
//! changes and once a minute (a no-op for the server when nothing changed;
//! it brings back a report the garbage collector took between two Pods of
//! the agent).

use std::time::Duration;

use k8s_openapi::{api::authentication::v1::SelfSubjectReview, apimachinery::pkg::apis::meta::v1::OwnerReference};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::{sync::watch, task::JoinHandle};

use super::crd::{NodeConfig, WeftNodeStatus};
use crate::{
    controller::{ControlStatus, EnvoyAck},
    xds::model::Serving,
};

/// How often the report is written even if nothing changed.
const RESYNC: Duration = Duration::from_secs(60);
/// Changes closer together than this are written as one.
const COALESCE: Duration = Duration::from_millis(500);
/// The field manager of the agent's writes.
const MANAGER: &str = "weft-agent";

/// What a node's report says, from the controller's status.
pub fn node_status(status: &ControlStatus) -> WeftNodeStatus {
    let mut configs: Vec<NodeConfig> = status
        .objects
        .iter()
        .filter(|o| o.config.for_this_node)
        .filter_map(|o| {
            let (kind, rest) = o.config.object.split_once(' ')?;
            let (namespace, name) = match rest.split_once('/') {
                Some((ns, name)) => (Some(ns.to_owned()), name.to_owned()),
                None => (None, rest.to_owned()),
            };
            let standing = match o.config.serving {
                Serving::Current => Some(o.config.generation),
                Serving::LastGood { generation } => Some(generation),
                Serving::Nothing => None,
            };
            let invalid = (!o.config.problems.is_empty()).then(|| o.config.problems.join("\n"));
            let (state, served, message) = match (&o.envoy, invalid) {
                (EnvoyAck::Nacked { message }, _) => ("Rejected", standing, Some(message.clone())),
                (EnvoyAck::Acknowledged { .. }, None) => ("Serving", standing, None),
                // Nothing of it goes to Envoy (no resources): nothing to wait for.
                (EnvoyAck::NotApplied, None) => ("Serving", standing, None),
                (EnvoyAck::Acknowledged { .. }, Some(why)) => ("Rejected", standing, Some(why)),
                (EnvoyAck::NotApplied | EnvoyAck::Pending, Some(why)) => ("NotServed", None, Some(why)),
                (EnvoyAck::Pending, None) => ("Pending", None, None),
            };
            Some(NodeConfig {
                kind: kind.to_owned(),
                namespace,
                name,
                generation: o.config.generation,
                served_generation: served,
                state: state.to_owned(),
                message,
            })
        })
        .collect();
    configs.sort_by(|a, b| (&a.kind, &a.namespace, &a.name).cmp(&(&b.kind, &b.namespace, &b.name)));
    let serving = configs.iter().filter(|c| c.state == "Serving").count();
    WeftNodeStatus {
        envoy: if status.envoy_connected { "Connected" } else { "NotConnected" }.to_owned(),
        summary: format!("{serving} of {}", configs.len()),
        configs,
    }
}

/// Writes this node's report; see the module doc.
pub struct NodeReporter {
    tx: watch::Sender<Option<WeftNodeStatus>>,
    task: JoinHandle<()>,
}

impl Drop for NodeReporter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl NodeReporter {
    /// Starts the writer of node `node`'s report in `namespace`.
    pub fn start(client: Client, namespace: &str, node: &str) -> Self {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(write_reports(client, namespace.to_owned(), node.to_owned(), rx));
        Self { tx, task }
    }

    /// Takes the controller's latest status (written if the report changes).
    pub fn publish(&self, status: &ControlStatus) {
        let next = node_status(status);
        self.tx.send_if_modified(|held| {
            let changed = held.as_ref() != Some(&next);
            *held = Some(next);
            changed
        });
    }
}

/// The agent's own Pod, if its credentials name one (a token the kubelet
/// made for the Pod does) in `namespace`.
async fn own_pod(client: &Client, namespace: &str) -> Option<OwnerReference> {
    let review = match Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
    {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("asking the API server who this agent is: {e}; the node's report has no owner");
            return None;
        }
    };
    let user = review.status.and_then(|s| s.user_info).unwrap_or_default();
    let extra = user.extra.unwrap_or_default();
    let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
    let in_namespace = user
        .username
        .as_deref()
        .and_then(|u| u.strip_prefix("system:serviceaccount:"))
        .is_some_and(|u| u.split(':').next() == Some(namespace));
    match (first("authentication.kubernetes.io/pod-name"), first("authentication.kubernetes.io/pod-uid")) {
        (Some(name), Some(uid)) if in_namespace => {
            Some(OwnerReference { api_version: "v1".into(), kind: "Pod".into(), name, uid, ..Default::default() })
        }
        _ => {
            tracing::info!(
                user = user.username.as_deref().unwrap_or_default(),
                "these credentials name no Pod of the agent in {namespace}: the node's report has no owner"
            );
            None
        }
    }
}

async fn write_reports(client: Client, ns: String, node: String, mut rx: watch::Receiver<Option<WeftNodeStatus>>) {
    let owner = own_pod(&client, &ns).await;
    let api: Api<super::WeftNode> = Api::namespaced(client, &ns);
    let pp = PatchParams::apply(MANAGER).force();
    let object = json!({
        "apiVersion": "weft.io/v1alpha1",
        "kind": "WeftNode",
        "metadata": {"name": node, "namespace": ns, "ownerReferences": owner.into_iter().collect::<Vec<_>>()},
        "spec": {},
    });
    let mut failures = 0u32;
    loop {
        if failures == 0 {
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(RESYNC) => {}
            }
            tokio::time::sleep(COALESCE).await;
        }
        let Some(status) = rx.borrow_and_update().clone() else { continue };
        let status = json!({"apiVersion": "weft.io/v1alpha1", "kind": "WeftNode", "status": status});
        let written = match api.patch(&node, &pp, &Patch::Apply(&object)).await {
            Ok(_) => api.patch_status(&node, &pp, &Patch::Apply(&status)).await.map(drop),
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = Duration::from_secs(1 << failures.min(6));
                tracing::warn!("writing WeftNode {ns}/{node}: {e} (retrying in {wait:?})");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        controller::ObjectState,
        k8s::ObjKey,
        xds::{envoyconfig::ConfigKey, model::ConfigStatus},
    };

    fn object(name: &str, generation: i64, serving: Serving, problems: &[&str], envoy: EnvoyAck) -> ObjectState {
        ObjectState {
            config: std::sync::Arc::new(ConfigStatus {
                object: name.into(),
                origin: "API server".into(),
                generation,
                for_this_node: true,
                problems: problems.iter().map(|p| p.to_string()).collect(),
                serving,
                listeners: vec![],
            }),
            envoy,
        }
    }

    #[test]
    fn the_report_says_which_generation_envoy_serves() {
        let acked = EnvoyAck::Acknowledged { version: 3 };
        let mut not_here = object("EnvoyConfig shop/elsewhere", 1, Serving::Current, &[], acked.clone());
        std::sync::Arc::make_mut(&mut not_here.config).for_this_node = false;
        let status = ControlStatus {
            envoy_connected: true,
            objects: vec![
                object("EnvoyConfig shop/ok", 4, Serving::Current, &[], acked.clone()),
                object("ClusterwideEnvoyConfig cw", 2, Serving::Current, &[], EnvoyAck::Pending),
                object("EnvoyConfig shop/broken", 3, Serving::LastGood { generation: 2 }, &["bad"], acked),
                object(
                    "EnvoyConfig shop/refused",
                    5,
                    Serving::LastGood { generation: 4 },
                    &["Envoy refused it"],
                    EnvoyAck::Nacked { message: "no regex".into() },
                ),
                object("EnvoyConfig shop/never", 1, Serving::Nothing, &["bad"], EnvoyAck::NotApplied),
                not_here,
            ]
            .into_iter()
            .enumerate()
            // Keyed in the order written.
            .map(|(i, o)| (ConfigKey { clusterwide: true, key: ObjKey::new("", format!("{i}")) }, o))
            .collect(),
            ..Default::default()
        };
        let r = node_status(&status);
        assert_eq!((r.envoy.as_str(), r.summary.as_str()), ("Connected", "1 of 5"));
        type Row<'a> = (&'a str, Option<&'a str>, &'a str, i64, Option<i64>, &'a str);
        let got: Vec<Row> = r
            .configs
            .iter()
            .map(|c| {
                (
                    c.kind.as_str(),
                    c.namespace.as_deref(),
                    c.name.as_str(),
                    c.generation,
                    c.served_generation,
                    c.state.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("ClusterwideEnvoyConfig", None, "cw", 2, None, "Pending"),
                ("EnvoyConfig", Some("shop"), "broken", 3, Some(2), "Rejected"),
                ("EnvoyConfig", Some("shop"), "never", 1, None, "NotServed"),
                ("EnvoyConfig", Some("shop"), "ok", 4, Some(4), "Serving"),
                ("EnvoyConfig", Some("shop"), "refused", 5, Some(4), "Rejected"),
            ]
        );
        assert_eq!(r.configs[4].message.as_deref(), Some("no regex"));
    }
}
