//! `weft-agent operator`: the cluster-wide half of weft, one leader at a time
//! (a Lease): it writes each EnvoyConfig's status once for the cluster (the
//! checks `weft-agent validate` makes, and whether the selected nodes serve
//! it, from their agents' WeftNode reports), turns Ingresses into
//! EnvoyConfigs and LoadBalancer Services, and does the same for the Gateway
//! API's Gateways and routes, writing their status, and says in each Cilium
//! policy's status which of its fields weft refuses ([`policy`]). Node
//! agents write no status; they write their node's report and their own
//! Envoy's refusals as Events.

pub mod envoy;
pub mod flowcerts;
pub mod gateway;
pub mod ingress;
pub mod lease;
pub mod policy;
pub mod status;

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::{
    core::v1::{Endpoints, ObjectReference, Service},
    networking::v1::Ingress,
};
use kube::{
    Api, Client, Resource,
    api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::{Value, json};

use crate::{
    k8s::{
        ObjKey, Objects,
        watch::{Kinds, KubeSource},
    },
    validate,
    xds::{model::Model, ports::ProxyPorts},
};

/// How often the flow API's certificates are checked for renewal (and
/// whenever the set of Nodes changes).
const CERTS_EVERY: Duration = Duration::from_secs(600);

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct OperatorOptions {
    /// Namespace of the Lease and of shared-mode Ingress objects.
    pub namespace: String,
    /// Name of the Lease.
    pub lease_name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a leader holds the Lease without renewing it.
    pub lease_duration: Duration,
    /// Keep the flow API's CA and certificates in Secrets of `namespace`
    /// ([`flowcerts`]), with these lifetimes. Default: off.
    pub flow_certs: Option<flowcerts::Lifetimes>,
    /// The cluster's name, in the flow API's certificate names.
    pub cluster_name: String,
}

impl Default for OperatorOptions {
    fn default() -> Self {
        Self {
            namespace: "weft-system".into(),
            lease_name: "weft-operator".into(),
            identity: std::env::var("POD_NAME").unwrap_or_else(|_| format!("weft-operator-{}", std::process::id())),
            lease_duration: Duration::from_secs(15),
            flow_certs: None,
            cluster_name: "default".into(),
        }
    }
}

/// Runs the operator until an unrecoverable error (or the task is dropped).
pub async fn run(client: Client, opts: OperatorOptions) -> anyhow::Result<()> {
    let field_manager = format!("weft-operator/{}", opts.identity);
    let mut source = KubeSource::start(client.clone(), Kinds::operator(), &opts.identity).await;
    source.wait_synced(Duration::from_secs(10)).await;
    let mut elector =
        lease::Elector::new(client.clone(), &opts.namespace, &opts.lease_name, &opts.identity, opts.lease_duration);
    let mut statuses = status::StatusWriter::new(client.clone(), &field_manager);
    let mut policies = policy::PolicyStatusWriter::new(client.clone(), &field_manager);
    let mut ingresses = IngressReconciler::new(client.clone(), &opts.namespace, &field_manager, &opts.identity);
    let mut gateways = gateway::reconcile::GatewayReconciler::new(client.clone(), &field_manager);
    // Earlier accepted versions, so a broken edit reports which generation stays in effect.
    let mut model = Model::new(ProxyPorts::ephemeral());
    let certs = opts
        .flow_certs
        .map(|l| flowcerts::FlowCerts::new(client.clone(), &opts.namespace, &opts.cluster_name, &field_manager, l));
    // The nodes the flow certificates were last issued for, and when to look again.
    let mut certs_for: Option<std::collections::BTreeSet<String>> = None;
    let mut certs_next = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(elector.retry_every());
    let mut dirty = true;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let was = elector.is_leader();
                match elector.round().await {
                    Ok(true) if !was => {
                        tracing::info!(identity = %opts.identity, "leading: writing status and Ingress objects");
                        dirty = true;
                    }
                    Ok(false) if was => tracing::info!("no longer leading"),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("leader election: {e}"),
                }
            }
            _ = source.changed() => dirty = true,
        }
        if certs.is_some() && tokio::time::Instant::now() >= certs_next {
            dirty = true;
            certs_for = None;
        }
        let Some(loaded) = source.poll().or_else(|| dirty.then(|| source.snapshot())) else { continue };
        let verdicts = validate::verdicts(&loaded, &mut model);
        if !elector.is_leader() {
            continue;
        }
        dirty = false;
        if let Some(c) = &certs {
            let nodes: std::collections::BTreeSet<String> =
                loaded.objects.nodes.keys().map(|k| k.name.clone()).collect();
            if certs_for.as_ref() != Some(&nodes) {
                match c.reconcile(&nodes, weft_flow::time::now_ns() / 1_000_000_000).await {
                    Ok(r) => {
                        if r.any() {
                            tracing::info!(
                                ca = r.ca, servers = ?r.servers, removed = ?r.removed, client = r.client,
                                "flow API certificates issued"
                            );
                        }
                        certs_for = Some(nodes);
                        certs_next = tokio::time::Instant::now() + CERTS_EVERY;
                    }
                    Err(e) => {
                        tracing::warn!("flow API certificates: {e} (retrying)");
                        dirty = true;
                    }
                }
            }
        }
        if let Err(e) = ingresses.reconcile(&loaded.objects).await {
            tracing::warn!("Ingress objects: {e} (retrying)");
            dirty = true;
        }
        let translation = gateway::translate(&loaded.objects, &gateway_config_problems(&verdicts));
        match gateways.reconcile(&translation, &loaded).await {
            Ok(n) if n > 0 => tracing::info!(written = n, "Gateway API status"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("Gateway API objects: {e} (retrying)");
                dirty = true;
            }
        }
        let rollouts = verdicts
            .iter()
            .filter_map(|v| {
                let key = v.key.clone()?;
                let r = status::rollout(&key, v.node_selector.as_ref(), &loaded.objects, &opts.namespace);
                Some((key, r))
            })
            .collect();
        match statuses.write(&verdicts, &rollouts).await {
            Ok(n) if n > 0 => tracing::info!(written = n, "EnvoyConfig status"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("EnvoyConfig status: {e} (retrying)");
                dirty = true;
            }
        }
        match policies.write(&loaded.objects).await {
            Ok(n) if n > 0 => tracing::info!(written = n, "Cilium policy status"),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("Cilium policy status: {e} (retrying)");
                dirty = true;
            }
        }
    }
}

/// What validation found wrong with the ClusterwideEnvoyConfigs generated
/// for Gateways, by name.
fn gateway_config_problems(verdicts: &[validate::Verdict]) -> BTreeMap<String, String> {
    verdicts
        .iter()
        .filter(|v| !v.problems.is_empty())
        .filter_map(|v| v.key.as_ref().filter(|k| k.clusterwide).map(|k| (k.name().to_owned(), v.problems.join("; "))))
        .collect()
}

fn api_for(client: &Client, ar: &ApiResource, ns: Option<&str>) -> Api<DynamicObject> {
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, ar),
        None => Api::all_with(client.clone(), ar),
    }
}

/// Server-side applies generated objects, remembering what this process
/// last applied so that unchanged objects cost no request.
pub struct Applier {
    client: Client,
    field_manager: String,
    /// What this process last applied, by (kind, namespace, name).
    applied: BTreeMap<(String, String, String), Value>,
}

impl Applier {
    pub fn new(client: Client, field_manager: &str) -> Self {
        Self { client, field_manager: field_manager.to_owned(), applied: BTreeMap::new() }
    }

    /// The client it writes with.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The field manager it writes as.
    pub fn field_manager(&self) -> &str {
        &self.field_manager
    }

    /// Whether this process applied `kind namespace/name`.
    pub fn has_applied(&self, kind: &str, ns: &str, name: &str) -> bool {
        self.applied.contains_key(&(kind.to_owned(), ns.to_owned(), name.to_owned()))
    }

    /// Server-side applies `obj` (unless it is what this process last applied).
    pub async fn apply(&mut self, ar: &ApiResource, obj: Value) -> Result<(), kube::Error> {
        let ns = obj["metadata"]["namespace"].as_str().map(str::to_owned);
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        let key = (ar.kind.clone(), ns.clone().unwrap_or_default(), name.clone());
        if self.applied.get(&key) == Some(&obj) {
            return Ok(());
        }
        let pp = PatchParams::apply(&self.field_manager).force();
        api_for(&self.client, ar, ns.as_deref()).patch(&name, &pp, &Patch::Apply(&obj)).await?;
        self.applied.insert(key, obj);
        Ok(())
    }

    /// Deletes an object (gone already is fine).
    pub async fn remove(&mut self, ar: &ApiResource, ns: Option<&str>, name: &str) -> Result<(), kube::Error> {
        self.applied.remove(&(ar.kind.clone(), ns.unwrap_or_default().to_owned(), name.to_owned()));
        match api_for(&self.client, ar, ns).delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Keeps the objects generated for Ingresses as they should be.
pub struct IngressReconciler {
    applier: Applier,
    namespace: String,
    recorder: Recorder,
    /// Problems already reported as Events, by Ingress.
    reported: BTreeMap<ObjKey, Vec<String>>,
}

impl IngressReconciler {
    pub fn new(client: Client, namespace: &str, field_manager: &str, identity: &str) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter { controller: "weft-operator".into(), instance: Some(identity.into()) },
        );
        Self {
            applier: Applier::new(client, field_manager),
            namespace: namespace.to_owned(),
            recorder,
            reported: BTreeMap::new(),
        }
    }

    async fn apply(&mut self, ar: &ApiResource, obj: Value) -> Result<(), kube::Error> {
        self.applier.apply(ar, obj).await
    }

    async fn remove(&mut self, ar: &ApiResource, ns: Option<&str>, name: &str) -> Result<(), kube::Error> {
        self.applier.remove(ar, ns, name).await
    }

    async fn apply_generated(&mut self, g: &ingress::Generated) -> Result<(), kube::Error> {
        let config_ar = if g.envoy_config["kind"] == "ClusterwideEnvoyConfig" {
            ApiResource::erase::<crate::k8s::crd::ClusterwideEnvoyConfigResource>(&())
        } else {
            ApiResource::erase::<crate::k8s::crd::EnvoyConfigResource>(&())
        };
        self.apply(&ApiResource::erase::<Service>(&()), serde_json::to_value(&g.service).expect("serializes")).await?;
        self.apply(&ApiResource::erase::<Endpoints>(&()), serde_json::to_value(&g.endpoints).expect("serializes"))
            .await?;
        self.apply(&config_ar, g.envoy_config.clone()).await
    }

    /// Copies the Service's load-balancer status to the Ingress, if it differs.
    async fn copy_status(&self, ing: &Ingress, svc: Option<&Service>) -> Result<(), kube::Error> {
        let want = svc.map(ingress::ingress_status).unwrap_or_default();
        let have = ing.status.as_ref().and_then(|s| s.load_balancer.clone()).unwrap_or_default();
        if want == have {
            return Ok(());
        }
        let api: Api<Ingress> =
            Api::namespaced(self.applier.client().clone(), ing.meta().namespace.as_deref().unwrap_or("default"));
        let pp = PatchParams { field_manager: Some(self.applier.field_manager().to_owned()), ..Default::default() };
        api.patch_status(
            ing.meta().name.as_deref().unwrap_or_default(),
            &pp,
            &Patch::Merge(json!({ "status": { "loadBalancer": want } })),
        )
        .await?;
        Ok(())
    }

    /// Reports an Ingress's problems as a Warning Event, once per distinct set.
    fn report(&mut self, ing: &Ingress, problems: Vec<String>) {
        let key =
            ObjKey::new(ing.meta().namespace.clone().unwrap_or_default(), ing.meta().name.clone().unwrap_or_default());
        if self.reported.get(&key) == Some(&problems) {
            return;
        }
        self.reported.insert(key, problems.clone());
        if problems.is_empty() {
            return;
        }
        let reference = ObjectReference {
            api_version: Some("networking.k8s.io/v1".into()),
            kind: Some("Ingress".into()),
            name: ing.meta().name.clone(),
            namespace: ing.meta().namespace.clone(),
            uid: ing.meta().uid.clone(),
            ..Default::default()
        };
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            let ev = Event {
                type_: EventType::Warning,
                reason: "InvalidIngress".into(),
                note: Some(problems.join("\n").chars().take(1000).collect()),
                action: "Translate".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&ev, &reference).await {
                tracing::warn!("publishing an Event: {e}");
            }
        });
    }

    /// Brings every generated object in line with the Ingresses in `objects`.
    pub async fn reconcile(&mut self, objects: &Objects) -> Result<(), kube::Error> {
        let ours: Vec<&Ingress> =
            objects.ingresses.values().map(|s| &s.object).filter(|i| ingress::is_ours(i, objects)).collect();
        let (shared, dedicated): (Vec<&Ingress>, Vec<&Ingress>) =
            ours.iter().partition(|i| ingress::mode_of(i, objects) == ingress::Mode::Shared);
        let svc_of = |ns: &str, name: &str| objects.services.get(&ObjKey::new(ns, name)).map(|s| &s.object);
        let mut problems: BTreeMap<ObjKey, Vec<String>> = BTreeMap::new();
        for ing in &dedicated {
            let g = ingress::dedicated(ing, objects);
            for p in &g.problems {
                problems.entry(p.ingress.clone()).or_default().push(p.to_string());
            }
            self.apply_generated(&g).await?;
            let (ns, name) = (
                g.service.metadata.namespace.clone().unwrap_or_default(),
                g.service.metadata.name.clone().unwrap_or_default(),
            );
            self.copy_status(ing, svc_of(&ns, &name)).await?;
        }
        let shared_name = "weft-ingress";
        let config_ar = ApiResource::erase::<crate::k8s::crd::ClusterwideEnvoyConfigResource>(&());
        if shared.is_empty() {
            // The last shared Ingress went: so do the shared objects.
            if self.applier.has_applied(&config_ar.kind, "", shared_name) {
                let ns = self.namespace.clone();
                self.remove(&config_ar, None, shared_name).await?;
                self.remove(&ApiResource::erase::<Endpoints>(&()), Some(&ns), shared_name).await?;
                self.remove(&ApiResource::erase::<Service>(&()), Some(&ns), shared_name).await?;
            }
        } else {
            let g = ingress::shared(&shared, objects, &self.namespace);
            for p in &g.problems {
                problems.entry(p.ingress.clone()).or_default().push(p.to_string());
            }
            self.apply_generated(&g).await?;
            for ing in &shared {
                self.copy_status(ing, svc_of(&self.namespace, shared_name)).await?;
            }
        }
        for ing in &ours {
            let key = ObjKey::new(
                ing.meta().namespace.clone().unwrap_or_default(),
                ing.meta().name.clone().unwrap_or_default(),
            );
            self.report(ing, problems.remove(&key).unwrap_or_default());
        }
        // Dedicated objects of Ingresses that are no longer ours (class or mode changed).
        let wanted: Vec<(String, String)> = dedicated
            .iter()
            .map(|i| {
                (
                    i.meta().namespace.clone().unwrap_or_default(),
                    ingress::generated_name(i.meta().name.as_deref().unwrap_or_default()),
                )
            })
            .collect();
        let stale: Vec<(String, String)> = objects
            .services
            .values()
            .filter(|s| s.object.metadata.labels.as_ref().is_some_and(|l| l.contains_key(ingress::INGRESS_LABEL)))
            .filter(|s| {
                s.object.metadata.owner_references.as_ref().is_some_and(|o| o.iter().any(|o| o.kind == "Ingress"))
            })
            .map(|s| {
                (
                    s.object.metadata.namespace.clone().unwrap_or_default(),
                    s.object.metadata.name.clone().unwrap_or_default(),
                )
            })
            .filter(|k| !wanted.contains(k))
            .collect();
        for (ns, name) in stale {
            tracing::info!("removing {ns}/{name}: its Ingress is no longer served by weft in dedicated mode");
            self.remove(&ApiResource::erase::<crate::k8s::crd::EnvoyConfigResource>(&()), Some(&ns), &name).await?;
            self.remove(&ApiResource::erase::<Endpoints>(&()), Some(&ns), &name).await?;
            self.remove(&ApiResource::erase::<Service>(&()), Some(&ns), &name).await?;
        }
        Ok(())
    }
}
