//! EnvoyConfig status: the operator's verdict on each object, written once
//! by the leader, not by every node. `Valid` is the checks of `weft-agent
//! validate`, cluster-wide (node selectors aside). `Applied` is what the
//! selected nodes' agents report in their WeftNodes: True only when every
//! node the config's nodeSelector selects reports the generation as served;
//! otherwise it says why (no node selected, no agent reporting, Envoy
//! refusing it on some node, or nodes still on an older generation).

use std::collections::BTreeMap;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use serde_json::json;

use crate::{
    k8s::{
        Objects,
        crd::{APPLIED, EnvoyConfigStatus, NodeConfig, VALID},
        selector,
    },
    validate::Verdict,
    xds::{envoyconfig::ConfigKey, model::Serving},
};

/// What one selected node says of a config.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeSays {
    /// The node has no report: no agent runs there (or none has written yet).
    NoReport,
    /// Its agent's report does not list the config (yet).
    NotListed,
    Listed(NodeConfig),
}

/// A config's standing on the nodes it is for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rollout {
    /// Nodes in the cluster.
    pub nodes: usize,
    /// The selected ones, by name, and what each says.
    pub selected: BTreeMap<String, NodeSays>,
}

/// The rollout of config `key` (with `selector`) from the Nodes and the
/// WeftNode reports in weft's namespace `ns`.
pub fn rollout(
    key: &ConfigKey,
    selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    objects: &Objects,
    ns: &str,
) -> Rollout {
    let (kind, namespace, name) = if key.clusterwide {
        ("ClusterwideEnvoyConfig", None, key.name())
    } else {
        ("EnvoyConfig", Some(key.namespace()), key.name())
    };
    let selected = objects
        .nodes
        .values()
        .filter(|n| {
            let labels = n.object.metadata.labels.clone().unwrap_or_default();
            // Parsing refused selectors with operators weft does not know.
            selector.is_none_or(|s| selector::matches(s, &labels).unwrap_or(false))
        })
        .filter_map(|n| n.object.metadata.name.clone())
        .map(|node| {
            let report = objects.weft_nodes.get(&crate::k8s::ObjKey::new(ns, &node));
            let says = match report.and_then(|r| r.object.status.as_ref()) {
                None => NodeSays::NoReport,
                Some(st) => st
                    .configs
                    .iter()
                    .find(|c| c.kind == kind && c.namespace.as_deref() == namespace && c.name == name)
                    .map_or(NodeSays::NotListed, |c| NodeSays::Listed(c.clone())),
            };
            (node, says)
        })
        .collect();
    Rollout { nodes: objects.nodes.len(), selected }
}

/// At most five names, then how many more.
pub(crate) fn names<'a>(it: impl Iterator<Item = &'a str>) -> String {
    let all: Vec<&str> = it.collect();
    let mut s = all.iter().take(5).copied().collect::<Vec<_>>().join(", ");
    if all.len() > 5 {
        s.push_str(&format!(" and {} more", all.len() - 5));
    }
    s
}

/// The `Applied` condition: (status, reason, message).
fn applied(v: &Verdict, r: &Rollout) -> (&'static str, &'static str, String) {
    let valid = v.problems.is_empty();
    let want = match (&v.serving, valid) {
        (_, true) => Some(v.generation),
        (Serving::LastGood { generation }, false) => Some(*generation),
        _ => None,
    };
    let Some(want) = want else {
        return ("False", "NotServed", "nothing of it is served until it is fixed".to_owned());
    };
    if r.selected.is_empty() {
        let m = if r.nodes == 0 {
            "there are no Nodes".to_owned()
        } else {
            format!("its nodeSelector selects none of the {} nodes", r.nodes)
        };
        return ("False", "NoNodeSelected", m);
    }
    let n = r.selected.len();
    let all = names(r.selected.keys().map(String::as_str));
    if r.selected.values().all(|s| *s == NodeSays::NoReport) {
        let m = format!("no weft agent reports from the selected nodes ({all}): nothing says they serve it");
        return ("Unknown", "NoAgent", m);
    }
    let serves = |s: &NodeSays| matches!(s, NodeSays::Listed(c) if c.served_generation == Some(want));
    let on = if n == 1 { format!("node {all}") } else { format!("the {n} selected nodes") };
    if r.selected.values().all(serves) {
        return if valid {
            ("True", "Serving", format!("generation {want} is served on {on}"))
        } else {
            (
                "False",
                "LastGoodVersion",
                format!("generation {want} stays in effect on {on} until this generation is fixed"),
            )
        };
    }
    let refused: Vec<&str> = r
        .selected
        .iter()
        .filter(|(_, s)| matches!(s, NodeSays::Listed(c) if c.state == "Rejected" && c.generation == v.generation))
        .map(|(node, _)| node.as_str())
        .collect();
    if valid && !refused.is_empty() {
        let m =
            format!("Envoy refused generation {want} on {} (the object's Events say why)", names(refused.into_iter()));
        return ("False", "RejectedByEnvoy", m);
    }
    let behind: Vec<String> = r
        .selected
        .iter()
        .filter(|(_, s)| !serves(s))
        .map(|(node, s)| match s {
            NodeSays::NoReport => format!("{node} (no weft agent report)"),
            NodeSays::NotListed => format!("{node} (its agent has not seen it yet)"),
            NodeSays::Listed(c) => match c.served_generation {
                Some(g) => format!("{node} (serves generation {g})"),
                None => format!("{node} ({})", c.state),
            },
        })
        .collect();
    let ok = n - behind.len();
    let m = format!(
        "generation {want} is served on {ok} of {n} selected nodes; not yet on {}",
        names(behind.iter().map(String::as_str))
    );
    ("False", "Pending", m)
}

/// The status a verdict calls for, given where the config stands on its
/// nodes. Conditions whose status did not change keep their transition time
/// from `previous`.
pub fn status_for(v: &Verdict, r: &Rollout, previous: Option<&EnvoyConfigStatus>, now: Timestamp) -> EnvoyConfigStatus {
    let valid = v.problems.is_empty();
    let (applied, reason, message) = applied(v, r);
    let cond = |type_: &str, status: &str, reason: &str, message: String| {
        condition(Said { type_, status, reason, message, generation: v.generation }, previous, now)
    };
    EnvoyConfigStatus {
        observed_generation: Some(v.generation),
        conditions: vec![
            if valid {
                cond(VALID, "True", "Valid", "every resource decodes and every reference resolves".into())
            } else {
                cond(VALID, "False", "Invalid", v.problems.join("\n"))
            },
            cond(APPLIED, applied, reason, message),
        ],
    }
}

/// What a condition says.
pub struct Said<'a> {
    pub type_: &'a str,
    pub status: &'a str,
    pub reason: &'a str,
    pub message: String,
    /// The object's generation it is about.
    pub generation: i64,
}

/// A condition saying `said`, keeping its transition time from `previous`
/// when its status has not changed.
pub fn condition(said: Said, previous: Option<&EnvoyConfigStatus>, now: Timestamp) -> Condition {
    let since = previous
        .and_then(|p| p.conditions.iter().find(|c| c.type_ == said.type_))
        .filter(|c| c.status == said.status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    Condition {
        type_: said.type_.into(),
        status: said.status.into(),
        reason: said.reason.into(),
        message: said.message,
        observed_generation: Some(said.generation),
        last_transition_time: since,
    }
}

/// Whether two statuses say the same (transition times aside).
pub fn same(a: &EnvoyConfigStatus, b: &EnvoyConfigStatus) -> bool {
    let strip = |s: &EnvoyConfigStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) == strip(b)
}

/// Writes statuses, remembering what each object holds so that only
/// changes are written.
pub struct StatusWriter {
    client: Client,
    field_manager: String,
    /// What each object's status is (as last read or written).
    known: BTreeMap<ConfigKey, EnvoyConfigStatus>,
}

fn resource(clusterwide: bool) -> ApiResource {
    if clusterwide {
        ApiResource::erase::<crate::k8s::crd::ClusterwideEnvoyConfigResource>(&())
    } else {
        ApiResource::erase::<crate::k8s::crd::EnvoyConfigResource>(&())
    }
}

impl StatusWriter {
    pub fn new(client: Client, field_manager: &str) -> Self {
        Self { client, field_manager: field_manager.to_owned(), known: BTreeMap::new() }
    }

    fn api(&self, key: &ConfigKey) -> Api<DynamicObject> {
        let ar = resource(key.clusterwide);
        if key.clusterwide {
            Api::all_with(self.client.clone(), &ar)
        } else {
            Api::namespaced_with(self.client.clone(), key.namespace(), &ar)
        }
    }

    /// Brings the status of every weft-kind config in `verdicts` up to date
    /// (`rollouts`: where each stands on its nodes); returns how many were
    /// written. Configs of Cilium's kinds have no such status and are left alone.
    pub async fn write(
        &mut self,
        verdicts: &[Verdict],
        rollouts: &BTreeMap<ConfigKey, Rollout>,
    ) -> Result<usize, kube::Error> {
        let none = Rollout::default();
        let mut written = 0;
        for v in verdicts {
            let Some(key) = &v.key else { continue };
            if !v.origin_is_weft_kind() {
                continue;
            }
            if !self.known.contains_key(key) {
                // What the object holds now (written before this process started, perhaps).
                let held = match self.api(key).get_opt(key.name()).await? {
                    Some(o) => o.data.get("status").and_then(|s| serde_json::from_value(s.clone()).ok()),
                    None => continue,
                };
                self.known.insert(key.clone(), held.unwrap_or_default());
            }
            let previous = self.known.get(key);
            let next = status_for(v, rollouts.get(key).unwrap_or(&none), previous, Timestamp::now());
            if previous.is_some_and(|p| same(p, &next)) {
                continue;
            }
            let pp = PatchParams { field_manager: Some(self.field_manager.clone()), ..Default::default() };
            match self.api(key).patch_status(key.name(), &pp, &Patch::Merge(json!({ "status": next }))).await {
                Ok(_) => {
                    written += 1;
                    self.known.insert(key.clone(), next);
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    self.known.remove(key);
                }
                Err(e) => return Err(e),
            }
        }
        // Forget objects that are gone.
        self.known.retain(|k, _| verdicts.iter().any(|v| v.key.as_ref() == Some(k)));
        Ok(written)
    }
}

impl Verdict {
    /// Whether the document is one of weft's own kinds (not Cilium's).
    fn origin_is_weft_kind(&self) -> bool {
        self.api_version == crate::xds::envoyconfig::API_VERSION
    }
}
