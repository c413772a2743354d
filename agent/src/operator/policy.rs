//! Cilium policy status: the `Valid` condition of every
//! CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy (`cilium.io/v2`
//! and weft.io's), written once for the cluster by the leader. What weft
//! refuses of a policy does not depend on the node (each node translates it
//! the same way, `state::policy::cilium::problems`), so one writer says it,
//! as `weft-agent validate` does; what only one node could not do (a proxy
//! port it lacks) stays in that node's `/status` and log.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
};
use serde_json::json;

use super::status::{Said, condition, same};
use crate::{
    k8s::{CiliumPolicy, ObjKey, Objects, crd::EnvoyConfigStatus},
    state::policy::cilium,
};

/// At most this many problems are listed in the condition's message.
const MAX_LISTED: usize = 20;
/// A listed problem is cut at this many bytes (field names come from users).
const MAX_PROBLEM: usize = 400;

/// One policy object: its group and version, its kind's scope, its key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Target {
    api_version: String,
    clusterwide: bool,
    key: ObjKey,
}

impl Target {
    fn resource(&self) -> Option<ApiResource> {
        let (group, version) = self.api_version.split_once('/')?;
        let (kind, plural) = if self.clusterwide {
            (cilium::CLUSTERWIDE_KIND, "ciliumclusterwidenetworkpolicies")
        } else {
            (cilium::KIND, "ciliumnetworkpolicies")
        };
        Some(ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: self.api_version.clone(),
            kind: kind.into(),
            plural: plural.into(),
        })
    }
}

/// The message of a `Valid` condition that is False: the problems, one a
/// line, bounded.
fn listed(problems: &[String]) -> String {
    let mut lines: Vec<String> = problems
        .iter()
        .take(MAX_LISTED)
        .map(|p| match p.char_indices().nth(MAX_PROBLEM) {
            Some((cut, _)) => format!("{}...", &p[..cut]),
            None => p.clone(),
        })
        .collect();
    if problems.len() > MAX_LISTED {
        lines.push(format!("and {} more (weft-agent validate lists them all)", problems.len() - MAX_LISTED));
    }
    lines.join("\n")
}

/// The status policy `p` calls for (`previous`: what it holds).
pub fn status_for(
    p: &CiliumPolicy,
    key: &ObjKey,
    clusterwide: bool,
    previous: Option<&EnvoyConfigStatus>,
    now: Timestamp,
) -> EnvoyConfigStatus {
    let problems = cilium::problems(key, p, clusterwide);
    let generation = p.metadata.generation.unwrap_or_default();
    let said = if problems.is_empty() {
        Said {
            type_: crate::k8s::crd::VALID,
            status: "True",
            reason: "Valid",
            message: "weft reads every field of it and enforces its rules".into(),
            generation,
        }
    } else {
        Said {
            type_: crate::k8s::crd::VALID,
            status: "False",
            reason: "Refused",
            message: listed(&problems),
            generation,
        }
    };
    EnvoyConfigStatus { observed_generation: Some(generation), conditions: vec![condition(said, previous, now)] }
}

/// Writes policies' statuses, remembering what each holds so that only
/// changes are written.
pub struct PolicyStatusWriter {
    client: Client,
    field_manager: String,
    known: BTreeMap<Target, EnvoyConfigStatus>,
}

impl PolicyStatusWriter {
    pub fn new(client: Client, field_manager: &str) -> Self {
        Self { client, field_manager: field_manager.to_owned(), known: BTreeMap::new() }
    }

    /// Brings the status of every Cilium policy in `objects` up to date;
    /// returns how many were written.
    pub async fn write(&mut self, objects: &Objects) -> Result<usize, kube::Error> {
        let namespaced = objects.cilium_network_policies.iter().map(|(k, p)| (k, p, false));
        let clusterwide = objects.cilium_clusterwide_network_policies.iter().map(|(k, p)| (k, p, true));
        let mut present = Vec::new();
        let mut written = 0;
        for (key, p, clusterwide) in namespaced.chain(clusterwide) {
            let target = Target { api_version: p.object.api_version.clone(), clusterwide, key: key.clone() };
            let Some(ar) = target.resource() else { continue };
            let api: Api<DynamicObject> = if clusterwide {
                Api::all_with(self.client.clone(), &ar)
            } else {
                Api::namespaced_with(self.client.clone(), &key.namespace, &ar)
            };
            present.push(target.clone());
            if !self.known.contains_key(&target) {
                // What the object holds now (written before this process started, perhaps).
                let held = match api.get_opt(&key.name).await? {
                    Some(o) => o.data.get("status").and_then(|s| serde_json::from_value(s.clone()).ok()),
                    None => continue,
                };
                self.known.insert(target.clone(), held.unwrap_or_default());
            }
            let previous = self.known.get(&target);
            let next = status_for(&p.object, key, clusterwide, previous, Timestamp::now());
            if previous.is_some_and(|p| same(p, &next)) {
                continue;
            }
            let pp = PatchParams { field_manager: Some(self.field_manager.clone()), ..Default::default() };
            match api.patch_status(&key.name, &pp, &Patch::Merge(json!({ "status": next }))).await {
                Ok(_) => {
                    written += 1;
                    self.known.insert(target, next);
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    self.known.remove(&target);
                }
                Err(e) => return Err(e),
            }
        }
        // Forget objects that are gone.
        self.known.retain(|t, _| present.contains(t));
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> CiliumPolicy {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn valid_says_which_fields_are_refused_and_keeps_its_transition_time() {
        let key = ObjKey::new("shop", "p");
        let t0 = Timestamp::UNIX_EPOCH;
        let t1 = Timestamp::from_second(100).unwrap();
        let bad = policy(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: shop, generation: 3}\n\
             spec:\n  endpointSelector: {}\n  egress: [{toFQDNs: [{matchName: a.example}]}]\n",
        );
        let s = status_for(&bad, &key, false, None, t0);
        let c = &s.conditions[0];
        assert_eq!((c.type_.as_str(), c.status.as_str(), c.reason.as_str()), ("Valid", "False", "Refused"));
        assert_eq!((s.observed_generation, c.observed_generation), (Some(3), Some(3)));
        assert!(c.message.starts_with("spec.egress[0].toFQDNs: FQDN rules are not supported"), "{}", c.message);
        // The same verdict later keeps the time it became so.
        let again = status_for(&bad, &key, false, Some(&s), t1);
        assert!(same(&s, &again) && again.conditions[0].last_transition_time.0 == t0);

        let good = policy(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p, namespace: shop, generation: 4}\n\
             spec:\n  endpointSelector: {}\n  egress: [{toEntities: [cluster]}]\n",
        );
        let fixed = status_for(&good, &key, false, Some(&s), t1);
        let c = &fixed.conditions[0];
        assert_eq!((c.status.as_str(), c.observed_generation, c.last_transition_time.0), ("True", Some(4), t1));
        assert!(!same(&s, &fixed));
    }

    #[test]
    fn a_policy_with_countless_problems_gets_a_bounded_message() {
        let fields: String = (0..500).map(|i| format!("  {}{i}: 1\n", "x".repeat(1000))).collect();
        let p = policy(&format!("metadata: {{name: p}}\nspec:\n  endpointSelector: {{}}\n{fields}"));
        let s = status_for(&p, &ObjKey::new("", "p"), true, None, Timestamp::UNIX_EPOCH);
        let m = &s.conditions[0].message;
        assert_eq!(m.lines().count(), MAX_LISTED + 1, "{m}");
        assert!(m.len() < (MAX_PROBLEM + 10) * (MAX_LISTED + 1), "{}", m.len());
        assert!(m.ends_with("and 480 more (weft-agent validate lists them all)"), "{m}");
    }
}
