//! The Kubernetes API as a source of objects: one kube-rs watcher per kind,
//! each feeding a reflector store, together yielding the same [`Loaded`] the
//! objects directory does.
//!
//! The watchers resume from the last resourceVersion they saw (bookmarks
//! keep it fresh) when a watch ends, and relist when the server says 410
//! Gone; a relist replaces a kind's objects at once when the list is
//! complete, so objects deleted meanwhile go and nothing is applied twice.
//! A change is reported only when an object really differs from what is held:
//! an event that repeats what the store has is counted, not passed on.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, Node, ObjectReference, Pod, Secret, Service},
    discovery::v1::EndpointSlice,
    networking::v1::{Ingress, IngressClass, NetworkPolicy},
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, ListParams},
    runtime::{
        WatchStreamExt,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::store::Writer,
        watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use tokio::{sync::watch as tokio_watch, task::JoinHandle};
use weft_gateway_api::{
    gatewayclasses::GatewayClass, gateways::Gateway, grpcroutes::GrpcRoute, httproutes::HttpRoute,
    referencegrants::ReferenceGrant,
};

use super::{Collection, ObjKey, Objects, Origin, Sourced, yaml::Loaded};
use crate::{
    controller::{ControlStatus, EnvoyAck},
    xds::envoyconfig,
};

/// Which kinds a source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kinds {
    pub services: bool,
    pub endpoint_slices: bool,
    pub pods: bool,
    pub nodes: bool,
    /// TLS Secrets (type kubernetes.io/tls), for SDS.
    pub secrets: bool,
    pub network_policies: bool,
    pub ingresses: bool,
    pub ingress_classes: bool,
    /// weft's EnvoyConfig kinds, and Cilium's when their CRDs are installed.
    pub envoy_configs: bool,
    /// Namespaces (their labels: Gateway listeners select routes' namespaces by them).
    pub namespaces: bool,
    /// GatewayClasses, Gateways, HTTPRoutes, GRPCRoutes and ReferenceGrants,
    /// when the Gateway API's CRDs are installed.
    pub gateway_api: bool,
}

impl Kinds {
    /// What a node's agent needs.
    pub fn agent() -> Self {
        Self {
            services: true,
            endpoint_slices: true,
            pods: true,
            nodes: true,
            secrets: true,
            network_policies: true,
            ingresses: false,
            ingress_classes: false,
            envoy_configs: true,
            namespaces: false,
            gateway_api: false,
        }
    }

    /// What the operator needs: configs and what validating them reads
    /// (Services, Secrets), Ingresses and their classes, the Gateway API.
    pub fn operator() -> Self {
        Self {
            services: true,
            endpoint_slices: false,
            pods: false,
            nodes: false,
            secrets: true,
            network_policies: false,
            ingresses: true,
            ingress_classes: true,
            envoy_configs: true,
            namespaces: true,
            gateway_api: true,
        }
    }
}

/// What one kind's watcher has done, for status and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct KindStats {
    /// Its first list is in.
    pub synced: bool,
    /// Complete lists taken in (the first one, and one after every 410).
    pub lists: u64,
    /// Events that changed an object (added, modified, deleted).
    pub changes: u64,
    /// Events (or relisted objects) identical to what was held: passed over.
    pub unchanged: u64,
    /// Events carrying an older resourceVersion than the one held for that
    /// object: a replay; passed over. Stays 0 against a correct server.
    pub replays: u64,
    /// Watch or list errors (the watcher retries with backoff).
    pub errors: u64,
}

struct Shared {
    objects: Objects,
    /// EnvoyConfig documents by (kind, namespace, name), as parsed later by
    /// [`envoyconfig::parse`] (so messages are the same as from files).
    configs: Configs,
    stats: BTreeMap<&'static str, KindStats>,
}

/// See the module doc.
pub struct KubeSource {
    shared: Arc<Mutex<Shared>>,
    changed: tokio_watch::Receiver<u64>,
    seen: u64,
    tasks: Vec<JoinHandle<()>>,
    client: Client,
    recorder: Recorder,
    node: String,
    /// NACK messages already published as Events, by object.
    reported: BTreeMap<String, String>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A kind the source keeps in [`Objects`].
trait Kind: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + PartialEq + Send + Sync + 'static {
    const NAME: &'static str;
    fn collection(o: &mut Objects) -> &mut Collection<Self>;
    /// Which objects of the kind to watch.
    fn watch_config() -> watcher::Config {
        watcher::Config::default()
    }
    /// Drops what the agent never reads (memory, and changes that matter to no one).
    fn prune(&mut self) {
        self.meta_mut().managed_fields = None;
    }
}

macro_rules! kind {
    ($t:ty, $name:literal, $field:ident) => {
        impl Kind for $t {
            const NAME: &'static str = $name;
            fn collection(o: &mut Objects) -> &mut Collection<Self> {
                &mut o.$field
            }
        }
    };
}
kind!(Service, "Service", services);
kind!(EndpointSlice, "EndpointSlice", endpoint_slices);
kind!(Node, "Node", nodes);
kind!(NetworkPolicy, "NetworkPolicy", network_policies);
kind!(Ingress, "Ingress", ingresses);
kind!(IngressClass, "IngressClass", ingress_classes);
kind!(Namespace, "Namespace", namespaces);
kind!(GatewayClass, "GatewayClass", gateway_classes);
kind!(Gateway, "Gateway", gateways);
kind!(HttpRoute, "HTTPRoute", http_routes);
kind!(GrpcRoute, "GRPCRoute", grpc_routes);
kind!(ReferenceGrant, "ReferenceGrant", reference_grants);

impl Kind for Secret {
    const NAME: &'static str = "Secret";
    fn collection(o: &mut Objects) -> &mut Collection<Self> {
        &mut o.secrets
    }
    /// Only TLS Secrets: the certificates SDS serves.
    fn watch_config() -> watcher::Config {
        watcher::Config::default().fields("type=kubernetes.io/tls")
    }
}

impl Kind for Pod {
    const NAME: &'static str = "Pod";
    fn collection(o: &mut Objects) -> &mut Collection<Self> {
        &mut o.pods
    }
    /// Every pod of the cluster is watched (identities need all pods' labels
    /// and addresses): keep only what state reads.
    fn prune(&mut self) {
        let m = self.meta_mut();
        m.managed_fields = None;
        m.annotations = None;
        if let Some(spec) = self.spec.as_mut() {
            *spec = k8s_openapi::api::core::v1::PodSpec {
                node_name: spec.node_name.take(),
                host_network: spec.host_network,
                ..Default::default()
            };
        }
        if let Some(st) = self.status.as_mut() {
            *st = k8s_openapi::api::core::v1::PodStatus {
                phase: st.phase.take(),
                pod_ip: st.pod_ip.take(),
                pod_ips: st.pod_ips.take(),
                ..Default::default()
            };
        }
    }
}

/// One watcher event, as it reaches a store.
enum Update<K> {
    /// A complete list: the kind's objects are now exactly these.
    Replace(Vec<Arc<K>>),
    Upsert(K),
    Remove(K),
}

fn rv_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<u64> {
    meta.resource_version.as_deref().and_then(|v| v.parse().ok())
}

fn obj_key<K: Resource>(o: &K) -> ObjKey {
    ObjKey::new(o.meta().namespace.clone().unwrap_or_default(), o.meta().name.clone().unwrap_or_default())
}

/// Whether two versions of an object differ in more than their resourceVersion.
fn same_content<K: Resource + Clone + PartialEq>(a: &K, b: &K) -> bool {
    let (mut a, mut b) = (a.clone(), b.clone());
    a.meta_mut().resource_version = None;
    b.meta_mut().resource_version = None;
    a == b
}

/// Applies an update to a typed collection; returns (changes, unchanged, replays).
fn apply_typed<K: Kind>(coll: &mut Collection<K>, up: Update<K>) -> (u64, u64, u64) {
    let sourced = |o: K| Arc::new(Sourced { origin: Origin::Api, object: o });
    match up {
        Update::Replace(all) => {
            let mut next: Collection<K> = BTreeMap::new();
            let (mut changes, mut unchanged) = (0, 0);
            for o in all {
                let k = obj_key(o.as_ref());
                match coll.get(&k) {
                    Some(h) if same_content(&h.object, &o) => unchanged += 1,
                    _ => changes += 1,
                }
                next.insert(k, sourced((*o).clone()));
            }
            changes += coll.keys().filter(|k| !next.contains_key(*k)).count() as u64;
            *coll = next;
            (changes, unchanged, 0)
        }
        Update::Upsert(o) => {
            let k = obj_key(&o);
            let held = coll.get(&k);
            if let (Some(h), Some(new)) = (held, rv_of(o.meta()))
                && rv_of(h.object.meta()).is_some_and(|old| new <= old)
            {
                return (0, 0, 1);
            }
            let same = held.is_some_and(|h| same_content(&h.object, &o));
            coll.insert(k, sourced(o));
            if same { (0, 1, 0) } else { (1, 0, 0) }
        }
        Update::Remove(o) => match coll.remove(&obj_key(&o)) {
            Some(_) => (1, 0, 0),
            None => (0, 1, 0),
        },
    }
}

/// Runs one kind's watcher into its store until the task is aborted;
/// `put` takes each update into the shared state and says what it did.
async fn reflect<K>(
    events: impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send,
    dyntype: K::DynamicType,
    name: &'static str,
    shared: Arc<Mutex<Shared>>,
    tx: Arc<tokio_watch::Sender<u64>>,
    prune: fn(&mut K),
    put: impl Fn(&mut Shared, Update<K>) -> (u64, u64, u64) + Send,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync,
{
    let mut writer: Writer<K> = Writer::new(dyntype);
    let reader = writer.as_reader();
    let mut stream = events.default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev.modify(prune),
            Err(e) => {
                tracing::warn!(kind = name, "watch: {e} (retrying)");
                shared.lock().unwrap().stats.entry(name).or_default().errors += 1;
                continue;
            }
        };
        writer.apply_watcher_event(&ev);
        let up = match ev {
            watcher::Event::Init | watcher::Event::InitApply(_) => continue,
            watcher::Event::InitDone => Update::Replace(reader.state()),
            watcher::Event::Apply(o) => Update::Upsert(o),
            watcher::Event::Delete(o) => Update::Remove(o),
        };
        let relist = matches!(up, Update::Replace(_));
        let mut s = shared.lock().unwrap();
        let (changes, unchanged, replays) = put(&mut s, up);
        let st = s.stats.entry(name).or_default();
        let first = relist && !st.synced;
        st.changes += changes;
        st.unchanged += unchanged;
        st.replays += replays;
        if relist {
            st.lists += 1;
            st.synced = true;
        }
        drop(s);
        if changes > 0 || first {
            tx.send_modify(|v| *v += 1);
        }
    }
}

fn typed<K: Kind>(client: &Client, shared: &Arc<Mutex<Shared>>, tx: &Arc<tokio_watch::Sender<u64>>) -> JoinHandle<()> {
    shared.lock().unwrap().stats.insert(K::NAME, KindStats::default());
    tokio::spawn(reflect(
        watcher(Api::<K>::all(client.clone()), K::watch_config()),
        (),
        K::NAME,
        shared.clone(),
        tx.clone(),
        K::prune,
        |s: &mut Shared, up| apply_typed(K::collection(&mut s.objects), up),
    ))
}

/// The EnvoyConfig kinds: (group, version, kind, plural, optional: only when the CRD exists).
const CONFIG_KINDS: &[(&str, &str, &str, &str, bool)] = &[
    ("weft.io", "v1alpha1", "EnvoyConfig", "envoyconfigs", false),
    ("weft.io", "v1alpha1", "ClusterwideEnvoyConfig", "clusterwideenvoyconfigs", false),
    ("cilium.io", "v2", "CiliumEnvoyConfig", "ciliumenvoyconfigs", true),
    ("cilium.io", "v2", "CiliumClusterwideEnvoyConfig", "ciliumclusterwideenvoyconfigs", true),
];

/// A config document as the parser wants it: without what the server adds
/// that no one reads (status, managed fields).
fn config_doc(o: &DynamicObject, ar: &ApiResource) -> Value {
    let mut v = serde_json::to_value(o).unwrap_or(Value::Null);
    v["apiVersion"] = Value::from(ar.api_version.clone());
    v["kind"] = Value::from(ar.kind.clone());
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
    }
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    v
}

fn doc_rv(doc: &Value) -> Option<u64> {
    doc["metadata"]["resourceVersion"].as_str()?.parse().ok()
}

/// Whether two config documents differ in more than their resourceVersion
/// (a status write moves it without changing the config).
fn same_doc(a: &Value, b: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        v
    };
    strip(a) == strip(b)
}

fn config_key(kind: &str, o: &DynamicObject) -> (String, String, String) {
    (kind.to_owned(), o.namespace().unwrap_or_default(), o.name_any())
}

type Configs = BTreeMap<(String, String, String), Value>;

fn apply_configs(configs: &mut Configs, ar: &ApiResource, up: Update<DynamicObject>) -> (u64, u64, u64) {
    match up {
        Update::Replace(all) => {
            let next: Configs = all.iter().map(|o| (config_key(&ar.kind, o), config_doc(o, ar))).collect();
            let mine = |k: &(String, String, String)| k.0 == ar.kind;
            let unchanged =
                next.iter().filter(|(k, v)| configs.get(*k).is_some_and(|held| same_doc(held, v))).count() as u64;
            let gone = configs.keys().filter(|k| mine(k) && !next.contains_key(*k)).count() as u64;
            let changes = next.len() as u64 - unchanged + gone;
            configs.retain(|k, _| !mine(k));
            configs.extend(next);
            (changes, unchanged, 0)
        }
        Update::Upsert(o) => {
            let (k, doc) = (config_key(&ar.kind, &o), config_doc(&o, ar));
            let held = configs.get(&k);
            if let (Some(h), Some(new)) = (held, doc_rv(&doc))
                && doc_rv(h).is_some_and(|old| new <= old)
            {
                return (0, 0, 1);
            }
            let same = held.is_some_and(|h| same_doc(h, &doc));
            configs.insert(k, doc);
            if same { (0, 1, 0) } else { (1, 0, 0) }
        }
        Update::Remove(o) => match configs.remove(&config_key(&ar.kind, &o)) {
            Some(_) => (1, 0, 0),
            None => (0, 1, 0),
        },
    }
}

/// Whether the server serves a kind (its CRD is installed).
async fn served(client: &Client, ar: &ApiResource) -> bool {
    match Api::<DynamicObject>::all_with(client.clone(), ar).list(&ListParams::default().limit(1)).await {
        Ok(_) => true,
        Err(kube::Error::Api(s)) if s.code == 404 => false,
        Err(e) => {
            tracing::warn!(kind = %ar.kind, "cannot tell whether the kind is served ({e}); not watching it");
            false
        }
    }
}

impl KubeSource {
    /// Starts the watchers for `kinds`. `node` names this agent in the Events it writes.
    pub async fn start(client: Client, kinds: Kinds, node: &str) -> Self {
        let shared = Arc::new(Mutex::new(Shared {
            objects: Objects::default(),
            configs: BTreeMap::new(),
            stats: BTreeMap::new(),
        }));
        let (tx, changed) = tokio_watch::channel(0u64);
        let tx = Arc::new(tx);
        let mut tasks = Vec::new();
        macro_rules! watch {
            ($($flag:ident => $t:ty),*) => { $( if kinds.$flag { tasks.push(typed::<$t>(&client, &shared, &tx)); } )* };
        }
        watch!(
            services => Service,
            endpoint_slices => EndpointSlice,
            pods => Pod,
            nodes => Node,
            secrets => Secret,
            network_policies => NetworkPolicy,
            ingresses => Ingress,
            ingress_classes => IngressClass,
            namespaces => Namespace
        );
        if kinds.gateway_api {
            // Each kind only when its CRD is installed (a cluster may have some of the channel's kinds only).
            macro_rules! gateway_kinds {
                ($($t:ty),*) => { $(
                    if served(&client, &ApiResource::erase::<$t>(&())).await {
                        tasks.push(typed::<$t>(&client, &shared, &tx));
                    } else {
                        tracing::info!("{} (gateway.networking.k8s.io) is not served by this cluster: not watching it", <$t as Kind>::NAME);
                    }
                )* };
            }
            gateway_kinds!(GatewayClass, Gateway, HttpRoute, GrpcRoute, ReferenceGrant);
        }
        if kinds.envoy_configs {
            for (group, version, kind, plural, optional) in CONFIG_KINDS {
                let ar = ApiResource {
                    group: group.to_string(),
                    version: version.to_string(),
                    api_version: format!("{group}/{version}"),
                    kind: kind.to_string(),
                    plural: plural.to_string(),
                };
                if *optional && !served(&client, &ar).await {
                    tracing::info!("{kind} ({group}) is not served by this cluster: not watching it");
                    continue;
                }
                let name: &'static str = kind;
                shared.lock().unwrap().stats.insert(name, KindStats::default());
                let ar2 = ar.clone();
                tasks.push(tokio::spawn(reflect(
                    watcher(Api::<DynamicObject>::all_with(client.clone(), &ar), watcher::Config::default()),
                    ar.clone(),
                    name,
                    shared.clone(),
                    tx.clone(),
                    |o: &mut DynamicObject| o.metadata.managed_fields = None,
                    move |s: &mut Shared, up| apply_configs(&mut s.configs, &ar2, up),
                )));
            }
        }
        let recorder = Recorder::new(
            client.clone(),
            Reporter { controller: "weft-agent".into(), instance: Some(node.to_owned()) },
        );
        Self { shared, changed, seen: 0, tasks, client, recorder, node: node.to_owned(), reported: BTreeMap::new() }
    }

    /// The client the watchers use.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Whether every watched kind has its first list.
    pub fn is_synced(&self) -> bool {
        self.shared.lock().unwrap().stats.values().all(|s| s.synced)
    }

    /// Waits until every watched kind has its first list, logging the ones
    /// still missing every `every` (a kind RBAC forbids never comes).
    pub async fn wait_synced(&mut self, every: Duration) {
        loop {
            if self.is_synced() {
                return;
            }
            match tokio::time::timeout(every, self.changed.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    let missing: Vec<&str> =
                        self.shared.lock().unwrap().stats.iter().filter(|(_, s)| !s.synced).map(|(k, _)| *k).collect();
                    tracing::warn!(?missing, "waiting for the first list of these kinds from the API server");
                }
            }
        }
    }

    /// Waits until something changed since the last [`KubeSource::poll`].
    pub async fn changed(&mut self) {
        let _ = self.changed.wait_for(|v| *v != self.seen).await;
    }

    /// Everything held, if anything changed since the last call.
    pub fn poll(&mut self) -> Option<Loaded> {
        let now = *self.changed.borrow_and_update();
        if now == self.seen {
            return None;
        }
        self.seen = now;
        Some(self.snapshot())
    }

    /// Everything held now.
    pub fn snapshot(&self) -> Loaded {
        let s = self.shared.lock().unwrap();
        Loaded {
            objects: s.objects.clone(),
            raw: s.configs.values().map(|v| (Origin::Api, v.clone())).collect(),
            ..Default::default()
        }
    }

    /// Per-kind watcher statistics.
    pub fn stats(&self) -> BTreeMap<&'static str, KindStats> {
        self.shared.lock().unwrap().stats.clone()
    }

    /// Publishes a Warning Event on each EnvoyConfig this node's Envoy newly
    /// refused (once per refusal message), so `kubectl describe` shows it.
    pub fn report(&mut self, status: &ControlStatus) {
        let mut now = BTreeMap::new();
        for o in &status.objects {
            if let EnvoyAck::Nacked { message } = &o.envoy {
                now.insert(o.config.object.clone(), message.clone());
            }
        }
        for (object, message) in &now {
            if self.reported.get(object) == Some(message) {
                continue;
            }
            let Some(reference) = self.reference(object) else { continue };
            let recorder = self.recorder.clone();
            let mut note = format!("node {}: Envoy refused it: {message}", self.node);
            if note.len() > 1000 {
                let mut end = 1000;
                while !note.is_char_boundary(end) {
                    end -= 1;
                }
                note.truncate(end);
            }
            let object = object.clone();
            tokio::spawn(async move {
                let ev = KubeEvent {
                    type_: EventType::Warning,
                    reason: "RejectedByEnvoy".into(),
                    note: Some(note),
                    action: "Configure".into(),
                    secondary: None,
                };
                if let Err(e) = recorder.publish(&ev, &reference).await {
                    tracing::warn!("publishing an Event for {object}: {e}");
                }
            });
        }
        self.reported = now;
    }

    /// The API object behind "EnvoyConfig ns/name" / "ClusterwideEnvoyConfig name".
    fn reference(&self, object: &str) -> Option<ObjectReference> {
        let s = self.shared.lock().unwrap();
        s.configs.values().find_map(|doc| {
            let api = doc["apiVersion"].as_str()?;
            let kind = doc["kind"].as_str()?;
            let clusterwide = envoyconfig::kind_of(api, kind)?;
            let meta = &doc["metadata"];
            let name = meta["name"].as_str()?;
            let ns = meta["namespace"].as_str().unwrap_or("default");
            let described =
                if clusterwide { format!("ClusterwideEnvoyConfig {name}") } else { format!("EnvoyConfig {ns}/{name}") };
            (described == object).then(|| ObjectReference {
                api_version: Some(api.to_owned()),
                kind: Some(kind.to_owned()),
                name: Some(name.to_owned()),
                namespace: (!clusterwide).then(|| ns.to_owned()),
                uid: meta["uid"].as_str().map(str::to_owned),
                ..Default::default()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::json;

    use super::*;
    use crate::k8s::apiserver::ApiServer;

    /// Waits (up to a generous deadline, not a timing assertion) until `f` holds.
    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(Instant::now() < deadline, "gave up waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn every_kind() -> Kinds {
        Kinds { ingresses: true, ingress_classes: true, ..Kinds::agent() }
    }

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.1.1.11]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}, annotations: {noise: "1"}}
spec: {nodeName: node1, containers: [{name: app, image: x}]}
status: {phase: Running, podIP: 10.1.1.11, conditions: [{type: Ready, status: "True"}]}
---
apiVersion: v1
kind: Node
metadata: {name: node1, labels: {role: infra}}
status: {addresses: [{type: InternalIP, address: 192.168.50.1}]}
---
apiVersion: v1
kind: Secret
metadata: {name: cert, namespace: shop}
type: kubernetes.io/tls
data: {tls.crt: Y2VydA==, tls.key: a2V5}
---
apiVersion: v1
kind: Secret
metadata: {name: password, namespace: shop}
type: Opaque
data: {password: cGFzcw==}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress]}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web, namespace: shop}
spec: {ingressClassName: weft, defaultBackend: {service: {name: web, port: {number: 80}}}}
---
apiVersion: networking.k8s.io/v1
kind: IngressClass
metadata: {name: weft}
spec: {controller: weft.io/ingress-controller}
---
apiVersion: weft.io/v1alpha1
kind: EnvoyConfig
metadata: {name: lb, namespace: shop}
spec: {services: [{name: web}]}
---
apiVersion: weft.io/v1alpha1
kind: ClusterwideEnvoyConfig
metadata: {name: cw}
spec: {}
"#;

    /// (kind, count) of everything a Loaded holds.
    fn counts(l: &Loaded) -> Vec<(&'static str, usize)> {
        let o = &l.objects;
        vec![
            ("Service", o.services.len()),
            ("EndpointSlice", o.endpoint_slices.len()),
            ("Pod", o.pods.len()),
            ("Node", o.nodes.len()),
            ("Secret", o.secrets.len()),
            ("NetworkPolicy", o.network_policies.len()),
            ("Ingress", o.ingresses.len()),
            ("IngressClass", o.ingress_classes.len()),
            ("configs", l.raw.len()),
        ]
    }

    async fn next_loaded(src: &mut KubeSource) -> Loaded {
        tokio::time::timeout(Duration::from_secs(30), src.changed()).await.expect("a change arrives");
        src.poll().expect("changed")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn adds_updates_and_deletes_of_every_kind_reach_the_state() {
        let server = ApiServer::start().await.unwrap();
        server.put_yaml(OBJECTS);
        let mut src = KubeSource::start(server.client(), every_kind(), "node1").await;
        src.wait_synced(Duration::from_secs(5)).await;
        let l = src.poll().expect("the first lists are a change");
        assert!(counts(&l).iter().all(|(_, n)| *n == 1 || *n == 2), "{:?}", counts(&l));
        assert_eq!(l.raw.len(), 2, "both EnvoyConfig kinds");
        assert_eq!(l.objects.secrets.len(), 1, "only TLS secrets are watched");
        let pod = &l.objects.pods[&ObjKey::new("shop", "web-1")].object;
        assert!(pod.metadata.annotations.is_none() && pod.status.as_ref().unwrap().conditions.is_none(), "pruned");
        assert_eq!(pod.status.as_ref().unwrap().pod_ip.as_deref(), Some("10.1.1.11"));
        // The snapshot the agent derives from it.
        let snap = crate::state::Snapshot::derive(&l.objects, "node1", None, &Default::default());
        assert_eq!(snap.services[0].entries[0].backends.len(), 1);
        assert!(snap.pods[0].local);

        // Updates of every kind.
        for doc in serde_saphyr::from_multiple::<Value>(OBJECTS).unwrap() {
            let mut doc = doc;
            doc["metadata"]["labels"]["touched"] = json!("yes");
            server.put(doc);
        }
        let mut l = next_loaded(&mut src).await;
        let touched = |l: &Loaded| {
            let o = &l.objects;
            let lbl = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
                m.labels.as_ref().and_then(|l| l.get("touched")).is_some()
            };
            o.services.values().all(|x| lbl(&x.object.metadata))
                && o.endpoint_slices.values().all(|x| lbl(&x.object.metadata))
                && o.pods.values().all(|x| lbl(&x.object.metadata))
                && o.nodes.values().all(|x| lbl(&x.object.metadata))
                && o.secrets.values().all(|x| lbl(&x.object.metadata))
                && o.network_policies.values().all(|x| lbl(&x.object.metadata))
                && o.ingresses.values().all(|x| lbl(&x.object.metadata))
                && o.ingress_classes.values().all(|x| lbl(&x.object.metadata))
                && l.raw.iter().all(|(_, d)| d["metadata"]["labels"]["touched"] == "yes")
        };
        while !touched(&l) {
            l = next_loaded(&mut src).await;
        }

        // Deletes of every kind.
        for doc in serde_saphyr::from_multiple::<Value>(OBJECTS).unwrap() {
            let ns = doc["metadata"]["namespace"].as_str().unwrap_or("");
            assert!(server.remove(
                doc["apiVersion"].as_str().unwrap(),
                doc["kind"].as_str().unwrap(),
                ns,
                doc["metadata"]["name"].as_str().unwrap()
            ));
        }
        let mut l = next_loaded(&mut src).await;
        while counts(&l).iter().any(|(_, n)| *n > 0) {
            l = next_loaded(&mut src).await;
        }
        assert!(src.stats().values().all(|s| s.replays == 0 && s.lists == 1), "{:?}", src.stats());
    }

    fn svc(name: &str, version: u32) -> Value {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "default", "annotations": {"v": version.to_string()}},
               "spec": {"ports": [{"port": 80}]}})
    }

    fn versions(l: &Loaded) -> BTreeMap<String, String> {
        l.objects
            .services
            .iter()
            .map(|(k, s)| (k.name.clone(), s.object.metadata.annotations.as_ref().unwrap()["v"].clone()))
            .collect()
    }

    fn server_versions(server: &ApiServer) -> BTreeMap<String, String> {
        server
            .list("v1", "Service")
            .iter()
            .map(|s| {
                (
                    s["metadata"]["name"].as_str().unwrap().to_owned(),
                    s["metadata"]["annotations"]["v"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_watches_resume_and_410_relists_without_losing_or_repeating() {
        let server = ApiServer::start_with(Duration::from_millis(20)).await.unwrap();
        for i in 0..3 {
            server.put(svc(&format!("s{i}"), 0));
        }
        let kinds = Kinds { services: true, ..Kinds { envoy_configs: false, ..Kinds::operator() } };
        let kinds = Kinds {
            secrets: false,
            ingresses: false,
            ingress_classes: false,
            namespaces: false,
            gateway_api: false,
            ..kinds
        };
        let mut src = KubeSource::start(server.client(), kinds, "node1").await;
        src.wait_synced(Duration::from_secs(5)).await;
        assert_eq!(versions(&src.poll().unwrap()).len(), 3);
        let changes = |src: &KubeSource| src.stats()["Service"].changes;
        let base = changes(&src);

        // Updates across dropped watches: each is seen once, none lost.
        let mut expected = 0;
        for round in 1..=5u32 {
            server.put(svc("s0", round));
            server.put(svc("s1", round));
            expected += 2;
            let watches_before = server.requests().iter().filter(|r| r.is_watch()).count();
            server.drop_watches();
            until("the watch to be resumed", || {
                server.requests().iter().filter(|r| r.is_watch()).count() > watches_before
            })
            .await;
        }
        until("every update", || changes(&src) == base + expected).await;
        assert_eq!(versions(&src.poll().unwrap()), server_versions(&server));
        let stats = src.stats()["Service"].clone();
        assert_eq!((stats.lists, stats.replays), (1, 0), "resumed, never relisted nor replayed: {stats:?}");
        let relists = server.requests().iter().filter(|r| r.is_list_of("services")).count();
        assert_eq!(relists, 1, "only the first list");
        // Every resumed watch started from a version the client had seen.
        for r in server.requests().iter().filter(|r| r.is_watch()) {
            assert!(r.query.get("resourceVersion").is_some_and(|v| v != "0" && !v.is_empty()), "{r:?}");
        }

        // A drop with nothing new: no change is reported.
        let watches_before = server.requests().iter().filter(|r| r.is_watch()).count();
        server.drop_watches();
        until("the watch to be resumed", || server.requests().iter().filter(|r| r.is_watch()).count() > watches_before)
            .await;
        assert!(src.poll().is_none(), "a resumed watch with nothing new changes nothing");

        // Bookmarks move the resume point past writes of other kinds.
        let last_service_rv = server.resource_version();
        server.put(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other", "namespace": "default"}}),
        );
        let bookmarks = server.bookmarks_sent();
        until("a bookmark", || server.bookmarks_sent() > bookmarks + 1).await;
        server.clear_requests();
        server.drop_watches();
        until("the watch to be resumed", || server.requests().iter().any(|r| r.is_watch())).await;
        let resumed: u64 =
            server.requests().iter().find(|r| r.is_watch()).unwrap().query["resourceVersion"].parse().unwrap();
        assert!(
            resumed > last_service_rv,
            "resumed from the bookmark ({resumed}), not the last Service event ({last_service_rv})"
        );

        // 410: the watch expires; what changed meanwhile comes with the relist.
        server.expire_watches();
        server.put(svc("s0", 100)); // modified
        server.remove("v1", "Service", "default", "s2"); // deleted
        server.put(svc("s9", 100)); // added
        until("the relist", || src.stats()["Service"].lists == 2).await;
        until("the three changes", || changes(&src) == base + expected + 3).await;
        assert_eq!(versions(&src.poll().unwrap()), server_versions(&server));
        let stats = src.stats()["Service"].clone();
        assert_eq!(stats.replays, 0, "{stats:?}");
        assert!(stats.errors >= 1, "the 410 was seen: {stats:?}");
        // And it goes on watching after the relist.
        server.put(svc("s1", 200));
        until("a change after the relist", || changes(&src) == base + expected + 4).await;
        assert_eq!(versions(&src.poll().unwrap()), server_versions(&server));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cilium_kinds_are_watched_only_when_served() {
        let server = ApiServer::start().await.unwrap();
        let kinds = Kinds {
            envoy_configs: true,
            ..Kinds { services: false, secrets: false, ingresses: false, ingress_classes: false, ..Kinds::operator() }
        };
        let src = KubeSource::start(server.client(), kinds, "n").await;
        assert!(!src.stats().contains_key("CiliumEnvoyConfig"));
        drop(src);
        for k in crate::k8s::apiserver::cilium_kinds() {
            server.register(k);
        }
        server.put_yaml(
            "apiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata: {name: c, namespace: default}\nspec: {}\n",
        );
        let mut src = KubeSource::start(server.client(), kinds, "n").await;
        src.wait_synced(Duration::from_secs(5)).await;
        let l = src.poll().unwrap();
        assert_eq!(l.raw.len(), 1);
        let cfg = envoyconfig::parse(Origin::Api, &l.raw[0].1).unwrap();
        assert_eq!(cfg.key.to_string(), "EnvoyConfig default/c");
    }
}

#[cfg(test)]
mod event_tests {
    use super::*;
    use crate::{
        controller::{ControlStatus, EnvoyAck, ObjectState},
        k8s::apiserver::ApiServer,
        xds::model::{ConfigStatus, Serving},
    };

    fn nacked(object: &str, message: &str) -> ControlStatus {
        ControlStatus {
            objects: vec![ObjectState {
                config: ConfigStatus {
                    object: object.into(),
                    origin: "API server".into(),
                    generation: 1,
                    for_this_node: true,
                    problems: vec![message.into()],
                    serving: Serving::Nothing,
                    listeners: vec![],
                },
                envoy: EnvoyAck::Nacked { message: message.into() },
            }],
            ..Default::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn envoy_refusals_become_one_event_on_the_object() {
        let server = ApiServer::start().await.unwrap();
        let cfg = server.put_yaml(
            "apiVersion: weft.io/v1alpha1\nkind: EnvoyConfig\nmetadata: {name: lb, namespace: shop}\nspec: {}\n",
        );
        let kinds =
            Kinds { services: false, secrets: false, ingresses: false, ingress_classes: false, ..Kinds::operator() };
        let mut src = KubeSource::start(server.client(), kinds, "node1").await;
        src.wait_synced(Duration::from_secs(5)).await;
        let status = nacked("EnvoyConfig shop/lb", "Listener \"shop/lb/l\": invalid address");
        src.report(&status);
        src.report(&status); // the same refusal again: no second Event
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while server.list("events.k8s.io/v1", "Event").is_empty() {
            assert!(std::time::Instant::now() < deadline, "no Event");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let events = server.list("events.k8s.io/v1", "Event");
        assert_eq!(events.len(), 1, "{events:#?}");
        let ev = &events[0];
        assert_eq!(ev["metadata"]["namespace"], "shop");
        assert_eq!(ev["type"], "Warning");
        assert_eq!(ev["reason"], "RejectedByEnvoy");
        assert_eq!(ev["regarding"]["kind"], "EnvoyConfig");
        assert_eq!(ev["regarding"]["uid"], cfg[0]["metadata"]["uid"]);
        assert_eq!(ev["reportingInstance"], "node1");
        assert!(ev["note"].as_str().unwrap().starts_with("node node1: Envoy refused it: Listener"), "{ev:#}");
    }
}
