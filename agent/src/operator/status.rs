//! EnvoyConfig status: the operator's verdict on each object (the checks of
//! `weft-agent validate`, cluster-wide, node selectors aside) as `Valid` and
//! `Applied` conditions, written once by the leader, not by every node.

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
    k8s::crd::{APPLIED, EnvoyConfigStatus, VALID},
    validate::Verdict,
    xds::{envoyconfig::ConfigKey, model::Serving},
};

/// The status a verdict calls for. Conditions whose status did not change
/// keep their transition time from `previous`.
pub fn status_for(v: &Verdict, previous: Option<&EnvoyConfigStatus>, now: Timestamp) -> EnvoyConfigStatus {
    let valid = v.problems.is_empty();
    let (applied, reason, message) = match (&v.serving, valid) {
        (_, true) => ("True", "Serving", format!("generation {} is what the selected nodes serve", v.generation)),
        (Serving::LastGood { generation }, false) => (
            "False",
            "LastGoodVersion",
            format!("generation {generation} stays in effect until this generation is fixed"),
        ),
        _ => ("False", "NotServed", "nothing of it is served until it is fixed".to_owned()),
    };
    let cond = |type_: &str, status: &str, reason: &str, message: String| {
        let since = previous
            .and_then(|p| p.conditions.iter().find(|c| c.type_ == type_))
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message,
            observed_generation: Some(v.generation),
            last_transition_time: since,
        }
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

/// Whether two statuses say the same (transition times aside).
fn same(a: &EnvoyConfigStatus, b: &EnvoyConfigStatus) -> bool {
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

    /// Brings the status of every weft-kind config in `verdicts` up to date;
    /// returns how many were written. Configs of Cilium's kinds have no such
    /// status and are left alone.
    pub async fn write(&mut self, verdicts: &[Verdict]) -> Result<usize, kube::Error> {
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
            let next = status_for(v, previous, Timestamp::now());
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
