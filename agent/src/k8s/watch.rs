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
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Node, ObjectReference, Secret, Service},
        discovery::v1::EndpointSlice,
        networking::v1::{Ingress, IngressClass, NetworkPolicy},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, ListParams},
    runtime::{
        WatchStreamExt,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
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

use super::{
    Collection, ObjKey, Object, Objects, Origin, Pod, Sourced, WeftNode,
    report::NodeReporter,
    yaml::{CONFIG_KINDS, DocError, Loaded, ParseProblem},
};
use crate::{
    controller::{ControlStatus, EnvoyAck},
    xds::envoyconfig::{self, ConfigDoc},
};

/// Which kinds a source watches. Adding a kind: a field here (and in
/// [`Kinds::none`], [`Kinds::agent`], [`Kinds::operator`]), a `kind!` line
/// and a line of `watch!` in [`KubeSource::start`] below, and a line of the
/// object table in `k8s/mod.rs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kinds {
    pub services: bool,
    pub endpoint_slices: bool,
    pub pods: bool,
    pub nodes: bool,
    /// TLS Secrets (type kubernetes.io/tls), for SDS.
    pub secrets: bool,
    /// NetworkPolicies, and the Cilium policy kinds (weft.io's, and
    /// cilium.io's when their CRDs are installed).
    pub network_policies: bool,
    /// Namespaces (their labels: NetworkPolicies' namespace selectors, and
    /// Gateway listeners select routes' namespaces by them).
    pub namespaces: bool,
    /// Every node agent's report (the operator's view of what is served).
    pub weft_nodes: bool,
    pub ingresses: bool,
    pub ingress_classes: bool,
    /// weft's EnvoyConfig kinds, and Cilium's when their CRDs are installed.
    pub envoy_configs: bool,
    /// GatewayClasses, Gateways, HTTPRoutes, GRPCRoutes and ReferenceGrants,
    /// when the Gateway API's CRDs are installed.
    pub gateway_api: bool,
}

impl Kinds {
    /// No kind at all (to build a set from: `Kinds { services: true, ..Kinds::none() }`).
    pub fn none() -> Self {
        Self {
            services: false,
            endpoint_slices: false,
            pods: false,
            nodes: false,
            secrets: false,
            network_policies: false,
            namespaces: false,
            weft_nodes: false,
            ingresses: false,
            ingress_classes: false,
            envoy_configs: false,
            gateway_api: false,
        }
    }

    /// What a node's agent needs.
    pub fn agent() -> Self {
        Self {
            services: true,
            endpoint_slices: true,
            pods: true,
            nodes: true,
            secrets: true,
            network_policies: true,
            namespaces: true,
            weft_nodes: false,
            ingresses: false,
            ingress_classes: false,
            envoy_configs: true,
            gateway_api: false,
        }
    }

    /// What the operator needs: configs and what validating them reads
    /// (Services, Secrets), Ingresses and their classes, the Gateway API,
    /// which nodes serve what (Nodes, for node selectors, and the agents'
    /// reports), and the policies whose status it writes.
    pub fn operator() -> Self {
        Self {
            services: true,
            endpoint_slices: false,
            pods: false,
            nodes: true,
            secrets: true,
            network_policies: true,
            namespaces: true,
            weft_nodes: true,
            ingresses: true,
            ingress_classes: true,
            envoy_configs: true,
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
    /// Documents of the [`DOC_KINDS`] by (apiVersion/kind, namespace, name):
    /// EnvoyConfigs parsed as they come (as a file's are, so messages are
    /// the same), policies as values typed in [`KubeSource::snapshot`].
    configs: Configs,
    /// What [`KubeSource::snapshot`] made of `configs`, until they change.
    documents: Option<Documents>,
    stats: BTreeMap<&'static str, KindStats>,
}

/// The config documents as a [`Loaded`] holds them: the EnvoyConfigs, and
/// the policies typed (the same objects from snapshot to snapshot, so the
/// controller sees that they did not change), or the problems they had.
struct Documents {
    configs: imbl::Vector<Arc<ConfigDoc>>,
    policies: Objects,
    problems: Vec<ParseProblem>,
}

impl Documents {
    fn of(configs: &Configs) -> Self {
        let mut out = Documents { configs: imbl::Vector::new(), policies: Objects::default(), problems: Vec::new() };
        for (key, held) in configs {
            let doc = match &held.doc {
                Held::Config(c) => {
                    out.configs.push_back(c.clone());
                    continue;
                }
                Held::Policy(doc) => doc,
            };
            match Object::from_value(Value::clone(doc)) {
                Ok(Some(o)) => out.policies.insert(Origin::Api, o),
                Ok(None) => {}
                Err(e) => out.problems.push(ParseProblem::new(
                    Origin::Api,
                    Some(format!("{} {}/{}", key.0, key.1, key.2)),
                    DocError::Invalid(e.to_string()),
                )),
            }
        }
        out
    }
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
    /// Writes this node's WeftNode report, for an agent.
    node_report: Option<NodeReporter>,
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
        prune_meta(self.meta_mut());
    }
}

/// What no kind's reader needs of its metadata: the managed fields, and
/// `kubectl apply`'s copy of the whole object as it was last applied (an
/// annotation as large as the object).
fn prune_meta(m: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    m.managed_fields = None;
    if let Some(a) = m.annotations.as_mut() {
        a.remove(LAST_APPLIED);
        if a.is_empty() {
            m.annotations = None;
        }
    }
}

const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

macro_rules! kind {
    ($t:ty, $name:literal, $field:ident) => {
        impl Kind for $t {
            const NAME: &'static str = $name;
            fn collection(o: &mut Objects) -> &mut Collection<Self> {
                &mut o.$field
            }
        }
    };
    ($t:ty, $name:literal, $field:ident, $prune:path) => {
        impl Kind for $t {
            const NAME: &'static str = $name;
            fn collection(o: &mut Objects) -> &mut Collection<Self> {
                &mut o.$field
            }
            fn prune(&mut self) {
                $prune(self)
            }
        }
    };
}

impl Kind for Service {
    const NAME: &'static str = "Service";
    fn collection(o: &mut Objects) -> &mut Collection<Self> {
        &mut o.services
    }
    /// Every Service of the cluster is watched: its spec's lists give back
    /// the room they kept to grow as they were read (a port is 112 bytes;
    /// one read from the API server took the room of four). Its selector is
    /// not read (its backends are its EndpointSlices'), nor its labels but
    /// the one that marks the operator's Ingress Services: each map is a
    /// tree node of eleven entries however few it holds. A LoadBalancer
    /// Service of one port with a label and a selector: 3,129 bytes read,
    /// 1,477 kept (2,577 with them).
    fn prune(&mut self) {
        let m = self.meta_mut();
        prune_meta(m);
        if let Some(labels) = m.labels.as_mut() {
            labels.retain(|k, _| k == crate::operator::ingress::INGRESS_LABEL);
            if labels.is_empty() {
                m.labels = None;
            }
        }
        if let Some(spec) = self.spec.as_mut() {
            spec.selector = None;
            for list in [&mut spec.cluster_ips, &mut spec.external_ips, &mut spec.ip_families].into_iter().flatten() {
                list.shrink_to_fit();
            }
            if let Some(p) = spec.ports.as_mut() {
                p.shrink_to_fit();
            }
        }
    }
}

impl Kind for EndpointSlice {
    const NAME: &'static str = "EndpointSlice";
    fn collection(o: &mut Objects) -> &mut Collection<Self> {
        &mut o.endpoint_slices
    }
    /// Every slice of the cluster is watched, and a Service's backends
    /// read only its Service label, address type, ports and each
    /// endpoint's addresses and conditions ([`crate::state::backends`]):
    /// the controller's labels, annotations and owner, and each endpoint's
    /// pod reference, node, zone and hints are dropped, and the room its
    /// lists kept to grow (a slice of three endpoints as Kubernetes writes
    /// it: 4,881 bytes read, 2,325 pruned).
    fn prune(&mut self) {
        let m = &mut self.metadata;
        prune_meta(m);
        m.annotations = None;
        m.owner_references = None;
        if let Some(labels) = m.labels.as_mut() {
            labels.retain(|k, _| k == crate::state::SERVICE_NAME_LABEL);
        }
        for e in &mut self.endpoints {
            e.target_ref = None;
            e.node_name = None;
            e.zone = None;
            e.hints = None;
            e.deprecated_topology = None;
            e.addresses.shrink_to_fit();
        }
        // Read from lists of unknown length, they kept room to grow (an
        // endpoint is 352 bytes however little it holds, a port 80).
        self.endpoints.shrink_to_fit();
        if let Some(p) = self.ports.as_mut() {
            p.shrink_to_fit();
        }
    }
}

/// Every Node of the cluster is watched, and the agent and operator read
/// its name, labels and addresses alone: its spec, annotations and the rest
/// of its status go (the images it holds, with every tag and digest, its
/// conditions and capacity: 8,072 bytes read of a node with ten images,
/// 2,360 kept), and the kubelet's status updates that change nothing of
/// that are told unchanged (no build follows them).
fn prune_node(n: &mut Node) {
    prune_meta(&mut n.metadata);
    n.metadata.annotations = None;
    n.spec = None;
    if let Some(st) = n.status.as_mut() {
        *st = k8s_openapi::api::core::v1::NodeStatus { addresses: st.addresses.take(), ..Default::default() };
    }
}

kind!(Node, "Node", nodes, prune_node);
kind!(NetworkPolicy, "NetworkPolicy", network_policies);
kind!(WeftNode, "WeftNode", weft_nodes);
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
    /// and addresses): its type holds only what state reads (`k8s::pod`);
    /// of its metadata the annotations go too, and of the containers only
    /// those with named ports stay, with those ports alone (NetworkPolicies
    /// may name them), and their lists take only the room they hold.
    fn prune(&mut self) {
        use k8s_openapi::api::core::v1::ContainerPort;
        let m = self.meta_mut();
        prune_meta(m);
        m.annotations = None;
        if let Some(spec) = self.spec.as_mut() {
            spec.containers.retain_mut(|c| {
                let ports: Vec<ContainerPort> = std::mem::take(&mut c.ports)
                    .into_iter()
                    .flatten()
                    .filter(|p| p.name.is_some())
                    .map(|p| ContainerPort {
                        name: p.name,
                        container_port: p.container_port,
                        protocol: p.protocol,
                        ..Default::default()
                    })
                    .collect();
                c.ports = (!ports.is_empty()).then_some(ports);
                c.ports.is_some()
            });
            spec.containers.shrink_to_fit();
        }
        if let Some(ips) = self.status.as_mut().and_then(|st| st.pod_ips.as_mut()) {
            ips.shrink_to_fit();
        }
    }
}

/// One watcher event, as it reaches a store.
enum Update<K> {
    /// A complete list: the kind's objects are now exactly these.
    Replace(Vec<K>),
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
            let mut next: Collection<K> = Collection::new();
            let (mut changes, mut unchanged) = (0, 0);
            for o in all {
                let k = obj_key(&o);
                match coll.get(&k) {
                    Some(h) if same_content(&h.object, &o) => unchanged += 1,
                    _ => changes += 1,
                }
                next.insert(k, sourced(o));
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
/// A list (the first, or one after the watch broke off) is gathered until
/// it is complete and handed over whole; nothing else is kept here: `put`'s
/// store is the only copy (a reflector's store beside it held every object
/// of the kind a second time, and each EnvoyConfig as a JSON tree).
async fn reflect<K>(
    events: impl futures::Stream<Item = watcher::Result<watcher::Event<K>>> + Send,
    name: &'static str,
    shared: Arc<Mutex<Shared>>,
    tx: Arc<tokio_watch::Sender<u64>>,
    prune: fn(&mut K),
    put: impl Fn(&mut Shared, Update<K>) -> (u64, u64, u64) + Send,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut listed: Vec<K> = Vec::new();
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
        let up = match ev {
            watcher::Event::Init => {
                listed.clear();
                continue;
            }
            watcher::Event::InitApply(o) => {
                listed.push(o);
                continue;
            }
            watcher::Event::InitDone => Update::Replace(std::mem::take(&mut listed)),
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
    tokio::spawn(typed_watch::<K>(client.clone(), shared.clone(), tx.clone()))
}

/// Watches one typed kind into the shared state (its stats entry must exist).
async fn typed_watch<K: Kind>(client: Client, shared: Arc<Mutex<Shared>>, tx: Arc<tokio_watch::Sender<u64>>) {
    reflect(watcher(Api::<K>::all(client), K::watch_config()), K::NAME, shared, tx, K::prune, |s: &mut Shared, up| {
        apply_typed(K::collection(&mut s.objects), up)
    })
    .await
}

/// Watches a kind whose CRD may not be installed: at once if it is served,
/// else from when its CRD is established (the Gateway API's, installed after weft, say).
async fn typed_when_served<K: Kind>(
    client: &Client,
    shared: &Arc<Mutex<Shared>>,
    tx: &Arc<tokio_watch::Sender<u64>>,
) -> JoinHandle<()> {
    let ar = ApiResource::erase::<K>(&());
    if served(client, &ar).await {
        return typed::<K>(client, shared, tx);
    }
    let crd = format!("{}.{}", ar.plural, ar.group);
    tracing::info!("{} ({}) is not served by this cluster (yet): watching for its CRD", K::NAME, ar.group);
    let (client, shared, tx) = (client.clone(), shared.clone(), tx.clone());
    tokio::spawn(async move {
        crd_established(&client, &crd).await;
        tracing::info!("{crd} is installed: watching {}", K::NAME);
        shared.lock().unwrap().stats.insert(K::NAME, KindStats::default());
        typed_watch::<K>(client, shared, tx).await
    })
}

/// Kinds watched as documents: (group, version, kind, plural, optional:
/// only when the CRD exists, name in the statistics, a policy kind (typed in
/// [`KubeSource::snapshot`]) rather than an EnvoyConfig kind). The policy
/// kinds are served by two groups under one kind name.
const DOC_KINDS: &[(&str, &str, &str, &str, bool, &str, bool)] = &[
    ("weft.io", "v1alpha1", "EnvoyConfig", "envoyconfigs", false, "EnvoyConfig", false),
    (
        "weft.io",
        "v1alpha1",
        "ClusterwideEnvoyConfig",
        "clusterwideenvoyconfigs",
        false,
        "ClusterwideEnvoyConfig",
        false,
    ),
    ("cilium.io", "v2", "CiliumEnvoyConfig", "ciliumenvoyconfigs", true, "CiliumEnvoyConfig", false),
    (
        "cilium.io",
        "v2",
        "CiliumClusterwideEnvoyConfig",
        "ciliumclusterwideenvoyconfigs",
        true,
        "CiliumClusterwideEnvoyConfig",
        false,
    ),
    ("weft.io", "v1alpha1", "CiliumNetworkPolicy", "ciliumnetworkpolicies", false, "CiliumNetworkPolicy.weft.io", true),
    (
        "weft.io",
        "v1alpha1",
        "CiliumClusterwideNetworkPolicy",
        "ciliumclusterwidenetworkpolicies",
        false,
        "CiliumClusterwideNetworkPolicy.weft.io",
        true,
    ),
    ("cilium.io", "v2", "CiliumNetworkPolicy", "ciliumnetworkpolicies", true, "CiliumNetworkPolicy", true),
    (
        "cilium.io",
        "v2",
        "CiliumClusterwideNetworkPolicy",
        "ciliumclusterwidenetworkpolicies",
        true,
        "CiliumClusterwideNetworkPolicy",
        true,
    ),
];

/// A config document as the parser wants it: without what the server adds
/// that no one reads (status, managed fields).
pub(crate) fn config_doc(o: &DynamicObject, ar: &ApiResource) -> Value {
    let mut v = serde_json::to_value(o).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), Value::from(ar.api_version.clone()));
        m.insert("kind".into(), Value::from(ar.kind.clone()));
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

/// A hash of a config document without its resourceVersion (a status write
/// moves it without changing the config): two documents with the same
/// digest are taken as the same, so the document itself need not be kept
/// to compare the next version with.
fn digest(doc: &Value) -> u64 {
    let mut v = doc.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    crate::hash::fnv1a(v.to_string().as_bytes())
}

/// A config document as the source holds it.
#[derive(Clone, Debug)]
struct HeldDoc {
    rv: Option<u64>,
    digest: u64,
    /// `metadata.uid`, for the Events about the object.
    uid: Option<String>,
    doc: Held,
}

/// An EnvoyConfig parsed when it came (its value is not kept), or a policy's value.
#[derive(Clone, Debug)]
enum Held {
    Config(Arc<ConfigDoc>),
    Policy(Arc<Value>),
}

impl HeldDoc {
    /// The object `o` as held; `prev`: what was held for it, kept (the same
    /// parse) when `o` says the same.
    fn of(ar: &ApiResource, o: &DynamicObject, prev: Option<&HeldDoc>) -> HeldDoc {
        let doc = config_doc(o, ar);
        let (rv, digest) = (doc_rv(&doc), digest(&doc));
        if let Some(p) = prev.filter(|p| p.digest == digest) {
            return HeldDoc { rv, ..p.clone() };
        }
        let uid = doc["metadata"]["uid"].as_str().map(str::to_owned);
        let doc = if CONFIG_KINDS.contains(&ar.kind.as_str()) {
            Held::Config(Arc::new(ConfigDoc::read(Origin::Api, &doc)))
        } else {
            Held::Policy(Arc::new(doc))
        };
        HeldDoc { rv, digest, uid, doc }
    }
}

fn config_key(ar: &ApiResource, o: &DynamicObject) -> (String, String, String) {
    (type_of(ar), o.namespace().unwrap_or_default(), o.name_any())
}

/// `apiVersion/kind`: the first part of a document's key.
fn type_of(ar: &ApiResource) -> String {
    format!("{}/{}", ar.api_version, ar.kind)
}

/// Config documents, shared (see `Loaded::configs`).
type Configs = BTreeMap<(String, String, String), HeldDoc>;

fn apply_configs(configs: &mut Configs, ar: &ApiResource, up: Update<DynamicObject>) -> (u64, u64, u64) {
    match up {
        Update::Replace(all) => {
            let next: Configs = all
                .iter()
                .map(|o| {
                    // A document listed again as it was stays the one held.
                    let k = config_key(ar, o);
                    let doc = HeldDoc::of(ar, o, configs.get(&k));
                    (k, doc)
                })
                .collect();
            let ty = type_of(ar);
            let mine = |k: &(String, String, String)| k.0 == ty;
            let unchanged =
                next.iter().filter(|(k, v)| configs.get(*k).is_some_and(|held| held.digest == v.digest)).count() as u64;
            let gone = configs.keys().filter(|k| mine(k) && !next.contains_key(*k)).count() as u64;
            let changes = (next.len() as u64).saturating_sub(unchanged).saturating_add(gone);
            configs.retain(|k, _| !mine(k));
            configs.extend(next);
            (changes, unchanged, 0)
        }
        Update::Upsert(o) => {
            let k = config_key(ar, &o);
            let held = configs.get(&k);
            let doc = HeldDoc::of(ar, &o, held);
            if let (Some(h), Some(new)) = (held, doc.rv)
                && h.rv.is_some_and(|old| new <= old)
            {
                return (0, 0, 1);
            }
            let same = held.is_some_and(|h| h.digest == doc.digest);
            configs.insert(k, doc);
            if same { (0, 1, 0) } else { (1, 0, 0) }
        }
        Update::Remove(o) => match configs.remove(&config_key(ar, &o)) {
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

/// Watches one EnvoyConfig kind into the shared state (its stats entry must exist).
async fn config_watch(
    client: Client,
    name: &'static str,
    ar: ApiResource,
    shared: Arc<Mutex<Shared>>,
    tx: Arc<tokio_watch::Sender<u64>>,
) {
    reflect(
        watcher(Api::<DynamicObject>::all_with(client, &ar), watcher::Config::default()),
        name,
        shared,
        tx,
        |o: &mut DynamicObject| o.metadata.managed_fields = None,
        move |s: &mut Shared, up| {
            let counts = apply_configs(&mut s.configs, &ar, up);
            if counts.0 > 0 {
                s.documents = None;
            }
            counts
        },
    )
    .await
}

/// Returns once the CustomResourceDefinition `name` exists and is established.
async fn crd_established(client: &Client, name: &str) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut crds = watcher(api, cfg).default_backoff().applied_objects().boxed();
    while let Some(ev) = crds.next().await {
        match ev {
            Ok(crd) => {
                let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
                if conditions.iter().any(|c| c.type_ == "Established" && c.status == "True") {
                    return;
                }
            }
            Err(e) => tracing::warn!("watching for CRD {name}: {e} (retrying)"),
        }
    }
    std::future::pending::<()>().await
}

impl KubeSource {
    /// Starts the watchers for `kinds`. `node` names this agent in the Events it writes.
    pub async fn start(client: Client, kinds: Kinds, node: &str) -> Self {
        let shared = Arc::new(Mutex::new(Shared {
            objects: Objects::default(),
            configs: BTreeMap::new(),
            documents: None,
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
            namespaces => Namespace,
            weft_nodes => WeftNode,
            ingresses => Ingress,
            ingress_classes => IngressClass
        );
        if kinds.gateway_api {
            tasks.push(typed_when_served::<GatewayClass>(&client, &shared, &tx).await);
            tasks.push(typed_when_served::<Gateway>(&client, &shared, &tx).await);
            tasks.push(typed_when_served::<HttpRoute>(&client, &shared, &tx).await);
            tasks.push(typed_when_served::<GrpcRoute>(&client, &shared, &tx).await);
            tasks.push(typed_when_served::<ReferenceGrant>(&client, &shared, &tx).await);
        }
        for &(group, version, kind, plural, optional, stats, policy) in DOC_KINDS {
            if !(if policy { kinds.network_policies } else { kinds.envoy_configs }) {
                continue;
            }
            let ar = ApiResource {
                group: group.to_string(),
                version: version.to_string(),
                api_version: format!("{group}/{version}"),
                kind: kind.to_string(),
                plural: plural.to_string(),
            };
            let watch = config_watch(client.clone(), stats, ar.clone(), shared.clone(), tx.clone());
            if optional && !served(&client, &ar).await {
                // Watched from when its CRD is installed (Cilium's, say, after weft).
                tracing::info!("{kind} ({group}) is not served by this cluster (yet): watching for its CRD");
                let crd = format!("{plural}.{group}");
                let (client, shared) = (client.clone(), shared.clone());
                tasks.push(tokio::spawn(async move {
                    crd_established(&client, &crd).await;
                    tracing::info!("{crd} is installed: watching {kind}");
                    shared.lock().unwrap().stats.insert(stats, KindStats::default());
                    watch.await
                }));
                continue;
            }
            shared.lock().unwrap().stats.insert(stats, KindStats::default());
            tasks.push(tokio::spawn(watch));
        }
        let recorder = Recorder::new(
            client.clone(),
            Reporter { controller: "weft-agent".into(), instance: Some(node.to_owned()) },
        );
        Self {
            shared,
            changed,
            seen: 0,
            tasks,
            client,
            recorder,
            node: node.to_owned(),
            reported: BTreeMap::new(),
            node_report: None,
        }
    }

    /// Also writes the node's WeftNode report in `namespace` (an agent's source).
    pub fn with_node_report(mut self, namespace: &str) -> Self {
        self.node_report = Some(NodeReporter::start(self.client.clone(), namespace, &self.node));
        self
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

    /// Waits until something changed since the last [`KubeSource::poll`];
    /// false (at once) once every watch has ended.
    pub async fn changed(&mut self) -> bool {
        self.changed.wait_for(|v| *v != self.seen).await.is_ok()
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

    /// Everything held now, as clones of persistent collections: it costs
    /// what changed since the last one. Policy documents become typed
    /// objects here (the same parse as a file's), once per change of the
    /// documents; EnvoyConfigs were parsed as they came.
    pub fn snapshot(&self) -> Loaded {
        let mut guard = self.shared.lock().unwrap();
        let s = &mut *guard;
        let docs = s.documents.get_or_insert_with(|| Documents::of(&s.configs));
        let mut objects = s.objects.clone();
        objects.merge(&docs.policies);
        Loaded { objects, problems: docs.problems.clone(), ignored: Vec::new(), configs: docs.configs.clone() }
    }

    /// Per-kind watcher statistics.
    pub fn stats(&self) -> BTreeMap<&'static str, KindStats> {
        self.shared.lock().unwrap().stats.clone()
    }

    /// Publishes a Warning Event on each EnvoyConfig this node's Envoy newly
    /// refused (once per refusal message), so `kubectl describe` shows it,
    /// and brings the node's report up to date.
    pub fn report(&mut self, status: &ControlStatus) {
        if let Some(r) = &self.node_report {
            r.publish(status);
        }
        let mut now = BTreeMap::new();
        for o in status.objects.iter() {
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
        s.configs.values().find_map(|held| {
            let Held::Config(doc) = &held.doc else { return None };
            let clusterwide = envoyconfig::kind_of(&doc.api_version, &doc.kind)?;
            let name = doc.name.as_deref()?;
            let ns = doc.namespace.as_deref().unwrap_or("default");
            let described =
                if clusterwide { format!("ClusterwideEnvoyConfig {name}") } else { format!("EnvoyConfig {ns}/{name}") };
            (described == object).then(|| ObjectReference {
                api_version: Some(doc.api_version.clone()),
                kind: Some(doc.kind.clone()),
                name: Some(name.to_owned()),
                namespace: (!clusterwide).then(|| ns.to_owned()),
                uid: held.uid.clone(),
                ..Default::default()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;
    use crate::{
        k8s::{Origin, Sourced},
        state::{SliceIndex, backends},
    };

    /// An object as `read` makes it (each read anew: a clone would take
    /// only the room it holds), pruned or not, and the bytes it holds.
    fn held<K: Kind>(read: impl Fn() -> K, prune: bool) -> (Arc<K>, isize) {
        crate::test_alloc::held_after(|| {
            let mut o = read();
            if prune {
                o.prune();
            }
            Arc::new(o)
        })
    }

    /// An EndpointSlice as Kubernetes' controller writes it: its Service's
    /// labels copied, the controller's annotation and owner, and each
    /// endpoint's pod, node and zone.
    fn written_slice() -> EndpointSlice {
        let endpoint = |ip: &str, pod: &str, ready: bool| {
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready, "serving": ready, "terminating": false},
                "nodeName": "worker-1", "zone": "eu-west-1a",
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod, "uid": "0b7f0d0e-7c1e-4a47-9a51-3f4a4b7f2f11"},
                "hints": {"forZones": [{"name": "eu-west-1a"}]},
            })
        };
        // Read from text, as from the API server (a list's length unknown).
        serde_json::from_str(&json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "name": "web-x7k2p", "generateName": "web-", "namespace": "shop",
                "uid": "5a1e2f0c-2b7d-4c8e-9d1f-6e3a7b8c9d0e", "resourceVersion": "48213",
                "labels": {
                    "kubernetes.io/service-name": "web",
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    "app.kubernetes.io/name": "web", "app.kubernetes.io/part-of": "shop",
                },
                "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-04T10:00:00Z"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web",
                    "uid": "9c8b7a6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d", "controller": true, "blockOwnerDeletion": true}],
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [endpoint("10.1.1.12", "web-5d9f7c-abcde", true), endpoint("10.1.2.11", "web-5d9f7c-fghij", true),
                          endpoint("10.1.3.10", "web-5d9f7c-klmno", false)],
        })
        .to_string())
        .unwrap()
    }

    /// A pruned slice gives its Service the same backends, and keeps its
    /// Service label, address type, ports, addresses and conditions alone.
    #[test]
    fn a_pruned_endpoint_slice_keeps_its_backends_and_little_else() {
        let key = ObjKey::new("shop", "web");
        let backends_of = |s: &EndpointSlice| {
            let mut objects = Objects::default();
            let sourced = Arc::new(Sourced { origin: Origin::Api, object: s.clone() });
            objects.endpoint_slices.insert(ObjKey::new("shop", "web-x7k2p"), sourced);
            backends(&key, Some("http"), &objects, &SliceIndex::of(&objects))
        };
        let full = written_slice();
        let mut pruned = full.clone();
        pruned.prune();
        assert_eq!(backends_of(&pruned).len(), 2, "the ready ones");
        assert_eq!(backends_of(&pruned), backends_of(&full));
        let m = &pruned.metadata;
        let label = BTreeMap::from([("kubernetes.io/service-name".to_string(), "web".to_string())]);
        assert_eq!(m.labels.as_ref(), Some(&label));
        assert_eq!((m.annotations.as_ref(), m.owner_references.as_ref()), (None, None));
        assert_eq!(
            (m.name.as_deref(), m.namespace.as_deref(), m.resource_version.as_deref()),
            (Some("web-x7k2p"), Some("shop"), Some("48213"))
        );
        for e in &pruned.endpoints {
            assert!(e.target_ref.is_none() && e.node_name.is_none() && e.zone.is_none() && e.hints.is_none(), "{e:?}");
            assert!(e.conditions.as_ref().and_then(|c| c.ready).is_some());
        }
        let ((_, before), (_, after)) = (held(written_slice, false), held(written_slice, true));
        println!("a slice of three endpoints as written: {before} bytes; pruned: {after}");
        assert!(after * 2 < before, "{after} of {before} bytes");
    }

    /// A pruned pod is the same pod to the agent's state: the same address,
    /// node, owner, labels (its service account's among them) and identity.
    #[test]
    fn a_pruned_pod_is_the_same_pod_to_the_state() {
        let read = |name: &str, account: &str| -> Pod {
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "shop", "labels": {"app": "pay"},
                    "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-12-04T10:00:00Z"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "pay-7d9f",
                        "uid": "5a1e2f0c-2b7d-4c8e-9d1f-6e3a7b8c9d0e", "controller": true}]},
                "spec": {"nodeName": "n1", "serviceAccountName": account, "containers": [{"name": "app", "image": "pay:1",
                    "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9090}],
                    "env": [{"name": "MODE", "value": "live"}]}]},
                "status": {"phase": "Running", "podIP": format!("10.1.1.{}", name.len()),
                    "podIPs": [{"ip": format!("10.1.1.{}", name.len())}], "hostIP": "192.0.2.1"},
            }))
            .unwrap()
        };
        let pods = |prune: bool| {
            let mut objects = Objects::default();
            for (name, account) in [("pay", "payments"), ("pay-b", "default"), ("pay-cc", "")] {
                let mut p = read(name, account);
                if prune {
                    p.prune();
                }
                objects.pods.insert(ObjKey::new("shop", name), Arc::new(Sourced { origin: Origin::Api, object: p }));
            }
            let snap = crate::state::Snapshot::derive(&objects, "n1", None, &Default::default(), None);
            snap.pods
                .iter()
                .map(|p| (p.key.clone(), p.ip, p.node.clone(), p.owner.clone(), p.labels.clone(), p.identity))
                .collect::<Vec<_>>()
        };
        let (full, pruned) = (pods(false), pods(true));
        assert_eq!(pruned, full);
        let accounts: Vec<&str> = full.iter().map(|p| p.4[crate::identity::SERVICE_ACCOUNT_LABEL].as_str()).collect();
        assert_eq!(accounts, ["payments", "default", "default"]);
        assert_ne!(full[0].5, full[1].5, "another service account, another identity");
        let ((_, before), (_, after)) =
            (held(|| read("pay", "payments"), false), held(|| read("pay", "payments"), true));
        println!("a pod as read: {before} bytes; pruned: {after}");
        assert!(after < before, "{after} of {before} bytes");
        // k8s-openapi's Pod, pruned the same way, held 5,546 (a Container
        // alone is 2,144 bytes); `k8s::pod`'s, 1,738.
        assert!(after < 2_500, "{after} bytes");
    }

    /// A Node as a kubelet writes it: labels, annotations, addresses, and a
    /// status of images, conditions and capacity; `heartbeat` is the time
    /// its conditions were last updated.
    fn written_node(heartbeat: &str) -> Node {
        let images: Vec<Value> = (0..10)
            .map(|i| {
                json!({"names": [format!("registry.example.com/team/app{i}@sha256:{:064x}", i),
                                 format!("registry.example.com/team/app{i}:v1.{i}.0")], "sizeBytes": 52_000_000 + i})
            })
            .collect();
        let condition = |t: &str, status: &str| {
            json!({"type": t, "status": status, "lastHeartbeatTime": heartbeat,
                   "lastTransitionTime": "2026-12-01T00:00:00Z", "reason": format!("Kubelet{t}"), "message": "kubelet says so"})
        };
        serde_json::from_str(
            &json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "worker-1", "resourceVersion": "7",
                    "labels": {"kubernetes.io/hostname": "worker-1", "topology.kubernetes.io/zone": "eu-west-1a"},
                    "annotations": {"node.alpha.kubernetes.io/ttl": "0", "volumes.kubernetes.io/controller-managed-attach-detach": "true"}},
                "spec": {"podCIDR": "10.1.1.0/24", "podCIDRs": ["10.1.1.0/24"], "providerID": "aws:///eu-west-1a/i-0abc"},
                "status": {
                    "addresses": [{"type": "InternalIP", "address": "192.0.2.11"}, {"type": "Hostname", "address": "worker-1"}],
                    "capacity": {"cpu": "4", "memory": "16Gi", "pods": "110"},
                    "allocatable": {"cpu": "3900m", "memory": "15Gi", "pods": "110"},
                    "conditions": [condition("Ready", "True"), condition("MemoryPressure", "False"),
                                   condition("DiskPressure", "False"), condition("PIDPressure", "False")],
                    "images": images,
                    "nodeInfo": {"machineID": "m", "systemUUID": "u", "bootID": "b", "kernelVersion": "6.18.0",
                        "osImage": "Debian", "containerRuntimeVersion": "containerd://2.1", "kubeletVersion": "v1.36.0",
                        "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
                },
            })
            .to_string(),
        )
        .unwrap()
    }

    /// A pruned Node keeps its name, labels and addresses (the agent's
    /// state of it is the same), and a kubelet heartbeat is no change.
    #[test]
    fn a_pruned_node_keeps_what_the_state_reads_and_a_heartbeat_changes_nothing() {
        let state = |n: &Node| {
            let mut objects = Objects::default();
            objects
                .nodes
                .insert(ObjKey::new("", "worker-1"), Arc::new(Sourced { origin: Origin::Api, object: n.clone() }));
            let snap = crate::state::Snapshot::derive(&objects, "worker-1", None, &Default::default(), None);
            snap.nodes.iter().map(|n| (n.name.clone(), n.ip, n.labels.clone())).collect::<Vec<_>>()
        };
        let full = written_node("2026-12-04T10:00:00Z");
        let mut pruned = full.clone();
        pruned.prune();
        assert_eq!(state(&pruned), state(&full));
        assert_eq!(state(&full).len(), 1);
        assert_eq!(pruned.metadata.labels, full.metadata.labels);
        let ((_, before), (_, after)) =
            (held(|| written_node("2026-12-04T10:00:00Z"), false), held(|| written_node("2026-12-04T10:00:00Z"), true));
        println!("a node with ten images as written: {before} bytes; pruned: {after}");
        assert!(after * 3 < before, "{after} of {before} bytes");
        // The kubelet's next heartbeat, pruned, is the node held.
        let mut coll = Collection::new();
        apply_typed(&mut coll, Update::Upsert(pruned));
        let mut next = written_node("2026-12-04T10:00:40Z");
        next.metadata.resource_version = Some("8".into());
        next.prune();
        assert_eq!(apply_typed(&mut coll, Update::Upsert(next)), (0, 1, 0), "unchanged");
    }

    /// A pruned Service is the Service read but its selector and labels
    /// (its lists only take the room they hold); the operator's label of
    /// the Services it makes for Ingresses stays.
    #[test]
    fn a_pruned_service_is_the_service_read_in_less_room() {
        let read = || -> Service {
            serde_json::from_str(
                &json!({
                    "apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
                    "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                        "ipFamilies": ["IPv4"], "externalIPs": ["192.0.2.7"], "selector": {"app": "web"},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
                    "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.10"}]}},
                })
                .to_string(),
            )
            .unwrap()
        };
        let ((full, before), (pruned, after)) = (held(read, false), held(read, true));
        let mut expected = (*full).clone();
        expected.metadata.labels = None;
        expected.spec.as_mut().unwrap().selector = None;
        assert_eq!(*pruned, expected);
        println!("a Service as read: {before} bytes; pruned: {after}");
        assert!(after * 3 < before * 2, "{after} of {before} bytes");
        let mut made = (*full).clone();
        let label = (crate::operator::ingress::INGRESS_LABEL.to_owned(), "shop/web".to_owned());
        made.metadata.labels.as_mut().unwrap().insert(label.0.clone(), label.1.clone());
        made.prune();
        assert_eq!(made.metadata.labels, Some(BTreeMap::from([label])));
    }

    /// A list of `n` objects made by `make`, watched into an empty store:
    /// the bytes held just after the list was handed over (the watch still
    /// running), and those the store alone holds once the watch ended.
    fn held_while_watching<K>(
        n: usize,
        make: impl Fn(usize) -> K + Send + 'static,
        prune: fn(&mut K),
        put: impl Fn(&mut Shared, Update<K>) -> (u64, u64, u64) + Send + Sync,
    ) -> (isize, isize)
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        use std::sync::atomic::{AtomicIsize, Ordering};
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let (tx, _rx) = tokio_watch::channel(0u64);
        let (tx, during) = (Arc::new(tx), AtomicIsize::new(0));
        let start = crate::test_alloc::thread_live();
        let shared = Arc::new(Mutex::new(Shared {
            objects: Objects::default(),
            configs: BTreeMap::new(),
            documents: None,
            stats: BTreeMap::new(),
        }));
        // Made as the stream is read (inside the count), as a watch reads them.
        let events = futures::stream::iter(
            std::iter::once(watcher::Event::Init)
                .chain((0..n).map(move |i| watcher::Event::InitApply(make(i))))
                .chain(std::iter::once(watcher::Event::InitDone))
                .map(Ok),
        );
        rt.block_on(reflect(events, "test", shared.clone(), tx, prune, |s: &mut Shared, up| {
            let counts = put(s, up);
            during.store(crate::test_alloc::thread_live() - start, Ordering::Relaxed);
            counts
        }));
        let after = crate::test_alloc::thread_live() - start;
        assert_eq!(Arc::strong_count(&shared), 1, "the watch ended");
        (during.into_inner(), after)
    }

    /// A watch keeps its kind's objects once, in the agent's store: a
    /// reflector's store beside it held each Service a second time.
    #[test]
    fn a_watch_of_services_holds_each_once() {
        let service = |i: usize| -> Service {
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": format!("s{i}"), "namespace": "shop", "resourceVersion": format!("{}", 100 + i),
                    "uid": format!("9c8b7a6d-5e4f-4a3b-2c1d-{i:012}"), "labels": {"app": format!("s{i}")}},
                "spec": {"type": "ClusterIP", "clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
                    "clusterIPs": [format!("10.96.{}.{}", i / 250, i % 250 + 1)], "ipFamilies": ["IPv4"],
                    "selector": {"app": format!("s{i}")},
                    "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
            }))
            .unwrap()
        };
        let n = 500;
        let (during, after) = held_while_watching(n, service, Service::prune, |s: &mut Shared, up| {
            apply_typed(&mut s.objects.services, up)
        });
        println!("{n} Services watched: {during} bytes held while the watch runs, {after} by the store alone");
        assert!(after > 0);
        assert!(during < after + after / 10, "{during} bytes held while watching, {after} in the store");
    }

    /// The same for EnvoyConfigs: the store holds each one parsed, and
    /// nothing holds the object as read (a JSON tree of its whole spec).
    #[test]
    fn a_watch_of_envoy_configs_keeps_no_copy_of_the_objects_read() {
        let ar = ApiResource {
            group: "weft.io".into(),
            version: "v1alpha1".into(),
            api_version: "weft.io/v1alpha1".into(),
            kind: "EnvoyConfig".into(),
            plural: "envoyconfigs".into(),
        };
        let config = |i: usize| -> DynamicObject {
            let hcm =
                "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
            serde_json::from_value(json!({
                "apiVersion": "weft.io/v1alpha1", "kind": "EnvoyConfig",
                "metadata": {"name": format!("c{i}"), "namespace": "shop", "resourceVersion": format!("{}", 100 + i)},
                "spec": {"services": [{"name": format!("s{i}")}], "resources": [
                    {"@type": "type.googleapis.com/envoy.config.listener.v3.Listener", "name": format!("c{i}-listener"),
                     "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {"@type": hcm, "stat_prefix": format!("c{i}"),
                            "rds": {"route_config_name": format!("c{i}-route")},
                            "http_filters": [{"name": "envoy.filters.http.router", "typed_config":
                                {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}]}]},
                    {"@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", "name": format!("c{i}-route"),
                     "virtual_hosts": [{"name": "all", "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": format!("shop/s{i}")}}]}]},
                    {"@type": "type.googleapis.com/envoy.config.cluster.v3.Cluster", "name": format!("shop/s{i}"),
                     "connect_timeout": "1s", "type": "EDS", "eds_cluster_config": {"eds_config": {"ads": {}}}},
                ]},
            }))
            .unwrap()
        };
        let n = 200;
        let prune = |o: &mut DynamicObject| o.metadata.managed_fields = None;
        let (during, after) =
            held_while_watching(n, config, prune, move |s: &mut Shared, up| apply_configs(&mut s.configs, &ar, up));
        println!("{n} EnvoyConfigs watched: {during} bytes held while the watch runs, {after} by the store alone");
        assert!(after > 0);
        assert!(during < after + after / 10, "{during} bytes held while watching, {after} in the store");
    }

    /// `kubectl apply`'s copy of the object goes; other annotations stay
    /// (a Service's are read: HTTP visibility, the L7 port).
    #[test]
    fn kubectls_last_applied_copy_goes_and_other_annotations_stay() {
        let mut svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop", "annotations": {
                LAST_APPLIED: "{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{\"name\":\"web\"}}",
                "weft.io/l7-visibility": "http",
            }},
        }))
        .unwrap();
        svc.prune();
        let kept = BTreeMap::from([("weft.io/l7-visibility".to_string(), "http".to_string())]);
        assert_eq!(svc.metadata.annotations, Some(kept));
        svc.metadata.annotations = Some(BTreeMap::from([(LAST_APPLIED.to_string(), "{}".to_string())]));
        svc.prune();
        assert_eq!(svc.metadata.annotations, None, "no empty map is kept");
    }
}
