//! Applies a [`Translation`]: the generated Services, Endpoints and
//! ClusterwideEnvoyConfigs (and removes those of Gateways that went), then
//! the status of GatewayClasses, Gateways and routes.
//!
//! Status is compared with what the object holds (the watch cache) and
//! written only when it differs, transition times aside. A route's
//! `status.parents` is shared with other controllers: their entries are
//! kept, and the write carries the resourceVersion it was computed from, so
//! a concurrent writer makes it fail (and retry) rather than lose an entry.

use std::collections::BTreeSet;

use k8s_openapi::{
    api::core::v1::{Endpoints, Service},
    apimachinery::pkg::apis::meta::v1::Condition,
    jiff::Timestamp,
};
use kube::{
    Api, Resource,
    api::{ApiResource, Patch, PatchParams},
};
use serde_json::{Value, json};
use weft_gateway_api::{gatewayclasses::GatewayClass, gateways::Gateway, grpcroutes::GrpcRoute, httproutes::HttpRoute};

use super::{
    CONTROLLER, GATEWAY_LABEL, GATEWAY_NAMESPACE_LABEL, SUPPORTED_FEATURES, Translation, conditions,
    listeners::RouteKind,
};
use crate::{
    k8s::{Objects, yaml::Loaded},
    operator::Applier,
};

/// A route's parent entry as held: (parentRef, controllerName, conditions).
type HeldParent = (Value, String, Vec<Condition>);

/// Condition types weft writes on each kind (others' are kept).
const GATEWAY_TYPES: &[&str] = &["Accepted", "Programmed"];
const ROUTE_TYPES: &[&str] = &["Accepted", "ResolvedRefs", "PartiallyInvalid"];

/// Keeps the objects generated for Gateways, and the status of Gateway API objects, as they should be.
pub struct GatewayReconciler {
    applier: Applier,
}

fn merge_patch_params(applier: &Applier) -> PatchParams {
    PatchParams { field_manager: Some(applier.field_manager().to_owned()), ..Default::default() }
}

impl GatewayReconciler {
    pub fn new(client: kube::Client, field_manager: &str) -> Self {
        Self { applier: Applier::new(client, field_manager) }
    }

    /// Applies `t` (translated from `loaded`); returns how many statuses were written.
    pub async fn reconcile(&mut self, t: &Translation, loaded: &Loaded) -> Result<usize, kube::Error> {
        let objects = &loaded.objects;
        let config_ar = ApiResource::erase::<crate::k8s::crd::ClusterwideEnvoyConfigResource>(&());
        let svc_ar = ApiResource::erase::<Service>(&());
        let ep_ar = ApiResource::erase::<Endpoints>(&());
        let mut wanted_services = BTreeSet::new();
        let mut wanted_configs = BTreeSet::new();
        for g in &t.gateways {
            if let Some((svc, ep)) = &g.service {
                self.applier.apply(&svc_ar, serde_json::to_value(svc).unwrap_or(Value::Null)).await?;
                self.applier.apply(&ep_ar, serde_json::to_value(ep).unwrap_or(Value::Null)).await?;
                wanted_services.insert((g.key.namespace.clone(), super::service_name(&g.key.name)));
            }
            if let Some(c) = &g.envoy_config {
                self.applier.apply(&config_ar, c.clone()).await?;
                wanted_configs.insert(super::config_name(&g.key));
            }
        }
        // What was generated for Gateways that went (or stopped being weft's, or stopped being served).
        let stale_services: Vec<(String, String)> = objects
            .services
            .values()
            .map(|s| &s.object.metadata)
            .filter(|m| {
                m.labels
                    .as_ref()
                    .is_some_and(|l| l.contains_key(GATEWAY_LABEL) && l.contains_key(GATEWAY_NAMESPACE_LABEL))
            })
            .filter(|m| m.owner_references.iter().flatten().any(|o| o.kind == "Gateway"))
            .map(|m| (m.namespace.clone().unwrap_or_default(), m.name.clone().unwrap_or_default()))
            .filter(|k| !wanted_services.contains(k))
            .collect();
        for (ns, name) in stale_services {
            tracing::info!("removing {ns}/{name}: its Gateway is gone or no longer weft's");
            self.applier.remove(&ep_ar, Some(&ns), &name).await?;
            self.applier.remove(&svc_ar, Some(&ns), &name).await?;
        }
        let stale_configs: Vec<String> = loaded
            .configs
            .iter()
            .filter(|d| d.kind == "ClusterwideEnvoyConfig" && d.labels.contains_key(GATEWAY_LABEL))
            .filter_map(|d| d.name.clone())
            .filter(|n| !wanted_configs.contains(n))
            .collect();
        for name in stale_configs {
            tracing::info!("removing ClusterwideEnvoyConfig {name}: its Gateway is gone or serves nothing");
            self.applier.remove(&config_ar, None, &name).await?;
        }
        self.write_status(t, objects).await
    }

    async fn write_status(&mut self, t: &Translation, objects: &Objects) -> Result<usize, kube::Error> {
        let now = Timestamp::now();
        let pp = merge_patch_params(&self.applier);
        let client = self.applier.client().clone();
        let mut written = 0;
        for c in &t.classes {
            let Some(held) = objects.gateway_classes.get(&crate::k8s::ObjKey::new("", c.name.clone())) else {
                continue;
            };
            let held_status = held.object.status.clone().unwrap_or_default();
            let held_conds = held_status.conditions.clone().unwrap_or_default();
            let next = conditions::merge(&c.conditions, &held_conds, &["Accepted"], now);
            let features: Vec<Value> = SUPPORTED_FEATURES.iter().map(|f| json!({ "name": f })).collect();
            let held_features: Vec<Value> =
                held_status.supported_features.iter().flatten().map(|f| json!({ "name": f.name })).collect();
            if conditions::same(&next, &held_conds) && features == held_features {
                continue;
            }
            let api: Api<GatewayClass> = Api::all(client.clone());
            let patch = json!({ "status": { "conditions": next, "supportedFeatures": features } });
            match api.patch_status(&c.name, &pp, &Patch::Merge(&patch)).await {
                Ok(_) => written += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        for g in &t.gateways {
            let Some(held) = objects.gateways.get(&g.key) else { continue };
            let held_status = held.object.status.clone().unwrap_or_default();
            let held_conds = held_status.conditions.clone().unwrap_or_default();
            let next = conditions::merge(&g.conditions, &held_conds, GATEWAY_TYPES, now);
            let held_listeners = held_status.listeners.clone().unwrap_or_default();
            let listeners: Vec<_> = g
                .listeners
                .iter()
                .map(|l| {
                    let before: &[Condition] = held_listeners
                        .iter()
                        .find(|h| h.name == l.name)
                        .map(|h| h.conditions.as_slice())
                        .unwrap_or(&[]);
                    let mut l = l.clone();
                    l.conditions = conditions::merge(&l.conditions, before, &[], now);
                    l
                })
                .collect();
            let same_listeners = listeners.len() == held_listeners.len()
                && listeners.iter().zip(&held_listeners).all(|(a, b)| {
                    a.name == b.name
                        && a.attached_routes == b.attached_routes
                        && a.supported_kinds == b.supported_kinds
                        && conditions::same(&a.conditions, &b.conditions)
                });
            let held_addresses = held_status.addresses.clone().unwrap_or_default();
            if conditions::same(&next, &held_conds) && same_listeners && held_addresses == g.addresses {
                continue;
            }
            let api: Api<Gateway> = Api::namespaced(client.clone(), &g.key.namespace);
            let patch = json!({ "status": { "conditions": next, "listeners": listeners, "addresses": g.addresses } });
            match api.patch_status(&g.key.name, &pp, &Patch::Merge(&patch)).await {
                Ok(_) => written += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        for r in &t.routes {
            // The parents as held, and the version they were read at (either route type: same field names).
            macro_rules! held {
                ($coll:expr) => {
                    match $coll.get(&r.key) {
                        Some(h) => (
                            h.object
                                .status
                                .iter()
                                .flat_map(|s| s.parents.iter())
                                .map(|p| {
                                    let parent = serde_json::to_value(&p.parent_ref).unwrap_or(Value::Null);
                                    (parent, p.controller_name.clone(), p.conditions.clone())
                                })
                                .collect::<Vec<HeldParent>>(),
                            h.object.meta().resource_version.clone(),
                        ),
                        None => continue,
                    }
                };
            }
            let (held, rv) = match r.kind {
                RouteKind::Http => held!(objects.http_routes),
                RouteKind::Grpc => held!(objects.grpc_routes),
            };
            let ours_held: Vec<&HeldParent> = held.iter().filter(|h| h.1 == CONTROLLER).collect();
            let ours: Vec<(Value, Vec<Condition>)> = r
                .parents
                .iter()
                .map(|(p, conds)| {
                    let before: &[Condition] =
                        ours_held.iter().find(|h| &h.0 == p).map(|h| h.2.as_slice()).unwrap_or(&[]);
                    (p.clone(), conditions::merge(conds, before, ROUTE_TYPES, now))
                })
                .collect();
            let same = ours.len() == ours_held.len()
                && ours.iter().zip(&ours_held).all(|(a, b)| a.0 == b.0 && conditions::same(&a.1, &b.2));
            if same {
                continue;
            }
            let mut parents: Vec<Value> = held
                .iter()
                .filter(|h| h.1 != CONTROLLER)
                .map(|(p, c, conds)| json!({ "parentRef": p, "controllerName": c, "conditions": conds }))
                .collect();
            parents.extend(
                ours.iter()
                    .map(|(p, conds)| json!({ "parentRef": p, "controllerName": CONTROLLER, "conditions": conds })),
            );
            let patch = json!({ "metadata": { "resourceVersion": rv }, "status": { "parents": parents } });
            let result = match r.kind {
                RouteKind::Http => Api::<HttpRoute>::namespaced(client.clone(), &r.key.namespace)
                    .patch_status(&r.key.name, &pp, &Patch::Merge(&patch))
                    .await
                    .map(|_| ()),
                RouteKind::Grpc => Api::<GrpcRoute>::namespaced(client.clone(), &r.key.namespace)
                    .patch_status(&r.key.name, &pp, &Patch::Merge(&patch))
                    .await
                    .map(|_| ()),
            };
            match result {
                Ok(()) => written += 1,
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }
}
