//! A small Kubernetes API server, in process, for tests: the kube-rs source,
//! the operator and lab agents run against it where there is no cluster.
//!
//! It speaks the parts of the real API they use, with the real semantics:
//! one resourceVersion counter for every write; lists (label and field
//! selectors, `limit`/`continue` pages that are consistent snapshots, HTTP
//! 410 for a continue token older than the compaction point); watches as
//! chunked streams of JSON `WatchEvent`s from a resourceVersion (ADDED /
//! MODIFIED / DELETED as objects enter or leave the selector, BOOKMARKs when
//! asked for, an `ERROR` event with a 410 Status when the version is
//! compacted away); get, create, update (with optimistic concurrency: 409 on
//! a stale resourceVersion), merge and apply patches, delete with
//! garbage collection of dependents by owner reference, and the status
//! subresource (writes to the object leave status alone and the other way
//! round; generation moves when anything but metadata and status changes).
//!
//! Tests drive failures through [`ApiServer`]: end every open watch,
//! compact history (watches resuming from before it get 410), and read the
//! request log to see whether a client relisted or resumed.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, Method, StatusCode, header},
    response::Response,
};
use serde_json::{Value, json};
use tokio::sync::watch;
use weft_observe::api::filter::Selector;

/// A kind the server stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KindInfo {
    /// "" for the core group.
    pub group: String,
    pub version: String,
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
}

impl KindInfo {
    fn new(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        Self { group: group.into(), version: version.into(), plural: plural.into(), kind: kind.into(), namespaced }
    }

    /// `apiVersion` of its objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() { self.version.clone() } else { format!("{}/{}", self.group, self.version) }
    }

    fn id(&self) -> String {
        format!("{}/{}/{}", self.group, self.version, self.plural)
    }
}

/// The kinds every server has: what weft's agent and operator read and write.
pub fn standard_kinds() -> Vec<KindInfo> {
    vec![
        KindInfo::new("", "v1", "services", "Service", true),
        KindInfo::new("", "v1", "endpoints", "Endpoints", true),
        KindInfo::new("", "v1", "pods", "Pod", true),
        KindInfo::new("", "v1", "nodes", "Node", false),
        KindInfo::new("", "v1", "namespaces", "Namespace", false),
        KindInfo::new("", "v1", "secrets", "Secret", true),
        KindInfo::new("", "v1", "configmaps", "ConfigMap", true),
        KindInfo::new("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", true),
        KindInfo::new("networking.k8s.io", "v1", "ingresses", "Ingress", true),
        KindInfo::new("networking.k8s.io", "v1", "ingressclasses", "IngressClass", false),
        KindInfo::new("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", true),
        KindInfo::new("coordination.k8s.io", "v1", "leases", "Lease", true),
        KindInfo::new("events.k8s.io", "v1", "events", "Event", true),
        KindInfo::new("weft.io", "v1alpha1", "envoyconfigs", "EnvoyConfig", true),
        KindInfo::new("weft.io", "v1alpha1", "clusterwideenvoyconfigs", "ClusterwideEnvoyConfig", false),
    ]
}

/// Cilium's EnvoyConfig kinds, for tests where "Cilium's CRDs are installed".
pub fn cilium_kinds() -> Vec<KindInfo> {
    vec![
        KindInfo::new("cilium.io", "v2", "ciliumenvoyconfigs", "CiliumEnvoyConfig", true),
        KindInfo::new("cilium.io", "v2", "ciliumclusterwideenvoyconfigs", "CiliumClusterwideEnvoyConfig", false),
    ]
}

/// The Gateway API's kinds that weft reads, for tests where "its CRDs are installed".
pub fn gateway_api_kinds() -> Vec<KindInfo> {
    let g = "gateway.networking.k8s.io";
    vec![
        KindInfo::new(g, "v1", "gatewayclasses", "GatewayClass", false),
        KindInfo::new(g, "v1", "gateways", "Gateway", true),
        KindInfo::new(g, "v1", "httproutes", "HTTPRoute", true),
        KindInfo::new(g, "v1", "grpcroutes", "GRPCRoute", true),
        KindInfo::new(g, "v1", "referencegrants", "ReferenceGrant", true),
    ]
}

/// One request, as the log keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
}

impl Logged {
    /// A watch request (`?watch=true`).
    pub fn is_watch(&self) -> bool {
        matches!(self.query.get("watch").map(String::as_str), Some("true" | "1"))
    }

    /// A list request (GET of a collection, not a watch).
    pub fn is_list_of(&self, plural: &str) -> bool {
        self.method == "GET" && !self.is_watch() && self.path.ends_with(&format!("/{plural}"))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    Added,
    Modified,
    Deleted,
}

/// One write, kept for watches and snapshot reads.
#[derive(Clone, Debug)]
struct HistoryEntry {
    rv: u64,
    kind: String,
    key: (String, String),
    change: Change,
    /// The object before (Modified, Deleted) and after (Added, Modified; for
    /// Deleted the object as it was, with the deletion's resourceVersion).
    before: Option<Value>,
    after: Value,
}

#[derive(Default)]
struct Store {
    rv: u64,
    kinds: BTreeMap<String, KindInfo>,
    /// kind id -> (namespace, name) -> object.
    objects: BTreeMap<String, BTreeMap<(String, String), Value>>,
    history: VecDeque<HistoryEntry>,
    /// Versions at or below this are gone from history.
    compacted: u64,
    log: Vec<Logged>,
    uid: u64,
}

struct Shared {
    store: Mutex<Store>,
    /// The resourceVersion after each write (wakes watches).
    written: watch::Sender<u64>,
    /// Bumped to end every open watch (`drop_watches`).
    drops: watch::Sender<u64>,
    /// Bumped to send every open watch an ERROR 410 and end it.
    expiries: watch::Sender<u64>,
    bookmark_every: Duration,
    bookmarks_sent: std::sync::atomic::AtomicU64,
}

/// An API error, as a `Status` object.
#[derive(Debug)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into() }
    }

    fn status(&self) -> Value {
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        })
    }
}

/// The server: cheap to clone, every clone the same store.
#[derive(Clone)]
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

impl ApiServer {
    /// Starts a server on 127.0.0.1 (a free port) in the calling thread's
    /// network namespace, on the current tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(Duration::from_millis(500)).await
    }

    /// Like [`ApiServer::start`], sending watches that allow bookmarks one every `bookmark_every`.
    pub async fn start_with(bookmark_every: Duration) -> std::io::Result<Self> {
        let mut store = Store::default();
        for k in standard_kinds() {
            store.objects.insert(k.id(), BTreeMap::new());
            store.kinds.insert(k.id(), k);
        }
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            written: watch::channel(0).0,
            drops: watch::channel(0).0,
            expiries: watch::channel(0).0,
            bookmark_every,
            bookmarks_sent: Default::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let me = Self { shared, addr };
        me.serve(listener);
        Ok(me)
    }

    /// Serves the same store on another listener (one bound in another
    /// network namespace, for agents in the lab's nodes).
    pub fn serve(&self, listener: tokio::net::TcpListener) {
        let app = axum::Router::new().fallback(handle).with_state(self.shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }

    /// Binds `127.0.0.1:port` inside the network namespace at `netns` and serves there.
    pub fn serve_in_netns(&self, netns: &Path, port: u16) -> std::io::Result<()> {
        let std_listener = {
            let _guard = weft_agent::netns::NetnsGuard::enter(netns).map_err(std::io::Error::other)?;
            std::net::TcpListener::bind(("127.0.0.1", port))?
        };
        std_listener.set_nonblocking(true)?;
        self.serve(tokio::net::TcpListener::from_std(std_listener)?);
        Ok(())
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        client_for(&self.url())
    }

    /// Adds a kind (a CRD being installed).
    pub fn register(&self, kind: KindInfo) {
        let mut s = self.shared.store.lock().unwrap();
        s.objects.entry(kind.id()).or_default();
        s.kinds.insert(kind.id(), kind);
    }

    /// Creates or replaces an object directly (test setup), as a client's
    /// create or update would; returns it as stored.
    pub fn put(&self, obj: Value) -> Value {
        let (kind, ns, name) = self.locate(&obj);
        let mut s = self.shared.store.lock().unwrap();
        let exists = s.objects[&kind].contains_key(&(ns.clone(), name.clone()));
        let mut obj = obj;
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        let r = if exists { s.update(&kind, &ns, &name, obj, Part::Whole) } else { s.create(&kind, &ns, obj) };
        drop(s);
        let v = r.unwrap_or_else(|e| panic!("put: {}", e.message));
        self.wake();
        v
    }

    /// Parses YAML documents and [`ApiServer::put`]s each.
    pub fn put_yaml(&self, yaml: &str) -> Vec<Value> {
        let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("test YAML parses");
        docs.into_iter().filter(|d| !d.is_null()).map(|d| self.put(d)).collect()
    }

    /// Replaces an object's status (as a controller writing /status would).
    pub fn put_status(&self, api_version: &str, kind: &str, ns: &str, name: &str, status: Value) -> Value {
        let id = self.kind_id(api_version, kind);
        let mut s = self.shared.store.lock().unwrap();
        let mut obj = s.objects[&id].get(&(ns.to_owned(), name.to_owned())).cloned().expect("object exists");
        obj["status"] = status;
        let v = s.update(&id, ns, name, obj, Part::Status).expect("status update");
        drop(s);
        self.wake();
        v
    }

    /// Deletes an object (and, like the garbage collector, what it owns).
    pub fn remove(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> bool {
        let id = self.kind_id(api_version, kind);
        let r = self.shared.store.lock().unwrap().delete(&id, ns, name);
        self.wake();
        r.is_ok()
    }

    /// An object, if stored.
    pub fn get(&self, api_version: &str, kind: &str, ns: &str, name: &str) -> Option<Value> {
        let id = self.kind_id(api_version, kind);
        self.shared.store.lock().unwrap().objects[&id].get(&(ns.to_owned(), name.to_owned())).cloned()
    }

    /// Every stored object of a kind.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let id = self.kind_id(api_version, kind);
        self.shared.store.lock().unwrap().objects[&id].values().cloned().collect()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.store.lock().unwrap().rv
    }

    /// Ends every open watch stream (the connection closes cleanly, as when
    /// the server restarts or a load balancer cuts idle streams).
    pub fn drop_watches(&self) {
        self.shared.drops.send_modify(|n| *n += 1);
    }

    /// Forgets history up to now: a watch or a page resuming from an older
    /// resourceVersion gets 410 Gone and must relist.
    pub fn compact(&self) {
        let mut s = self.shared.store.lock().unwrap();
        s.compacted = s.rv;
        s.history.clear();
    }

    /// Compacts and sends every open watch an `ERROR` event with a 410
    /// Status, then ends it (what etcd compaction does to a lagging watch).
    pub fn expire_watches(&self) {
        self.compact();
        self.shared.expiries.send_modify(|n| *n += 1);
    }

    /// The requests served so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.shared.store.lock().unwrap().log.clone()
    }

    /// BOOKMARK events sent so far.
    pub fn bookmarks_sent(&self) -> u64 {
        self.shared.bookmarks_sent.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Forgets the request log.
    pub fn clear_requests(&self) {
        self.shared.store.lock().unwrap().log.clear();
    }

    fn wake(&self) {
        let rv = self.shared.store.lock().unwrap().rv;
        self.shared.written.send_replace(rv);
    }

    fn kind_id(&self, api_version: &str, kind: &str) -> String {
        let s = self.shared.store.lock().unwrap();
        s.kinds
            .values()
            .find(|k| k.api_version() == api_version && k.kind == kind)
            .unwrap_or_else(|| panic!("kind {api_version}/{kind} is not registered"))
            .id()
    }

    fn locate(&self, obj: &Value) -> (String, String, String) {
        let api = obj["apiVersion"].as_str().unwrap_or_default();
        let kind = obj["kind"].as_str().unwrap_or_default();
        let id = self.kind_id(api, kind);
        let namespaced = self.shared.store.lock().unwrap().kinds[&id].namespaced;
        let ns = if namespaced {
            obj["metadata"]["namespace"].as_str().unwrap_or("default").to_owned()
        } else {
            String::new()
        };
        (id, ns, obj["metadata"]["name"].as_str().unwrap_or_default().to_owned())
    }
}

/// A kube client for a server URL (plain HTTP).
pub fn client_for(url: &str) -> kube::Client {
    let config = kube::Config::new(url.parse().expect("server URL"));
    kube::Client::try_from(config).expect("client for the test API server")
}

/// A kubeconfig file pointing at `url` (for agent processes).
pub fn write_kubeconfig(path: &Path, url: &str) -> std::io::Result<()> {
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: \"{url}\"}}\nusers:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n"
        ),
    )
}

/// Which part of an object a write may change.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Everything but status (for kinds with a status subresource, which all are here).
    Spec,
    /// Only status.
    Status,
    /// Everything (test setup).
    Whole,
}

fn without(v: &Value, keys: &[&str]) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        for k in keys {
            o.remove(*k);
        }
    }
    v
}

fn set_status(obj: &mut Value, status: Option<Value>) {
    match status {
        Some(st) => obj["status"] = st,
        None => {
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
        }
    }
}

fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Default::default());
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl Store {
    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn record(&mut self, kind: &str, key: (String, String), change: Change, before: Option<Value>, after: Value) {
        let rv = self.rv;
        self.history.push_back(HistoryEntry { rv, kind: kind.to_owned(), key, change, before, after });
    }

    fn create(&mut self, kind: &str, ns: &str, mut obj: Value) -> Result<Value, ApiError> {
        let info = self.kinds[kind].clone();
        let meta = obj
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| ApiError::new(400, "BadRequest", "metadata is required"))?;
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) => format!("{prefix}{:05x}", self.uid + 1),
                None => return Err(ApiError::new(422, "Invalid", "metadata.name: Required value")),
            },
        };
        let key = (ns.to_owned(), name.clone());
        if self.objects[kind].contains_key(&key) {
            return Err(ApiError::new(409, "AlreadyExists", format!("{} \"{name}\" already exists", info.plural)));
        }
        self.uid += 1;
        let uid = format!("00000000-0000-4000-8000-{:012x}", self.uid);
        let rv = self.next_rv();
        meta.insert("name".into(), json!(name));
        if info.namespaced {
            meta.insert("namespace".into(), json!(ns));
        } else {
            meta.remove("namespace");
        }
        meta.insert("uid".into(), json!(uid));
        meta.insert("resourceVersion".into(), json!(rv.to_string()));
        meta.insert("generation".into(), json!(1));
        meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        obj["apiVersion"] = json!(info.api_version());
        obj["kind"] = json!(info.kind);
        self.objects.get_mut(kind).expect("kind").insert(key.clone(), obj.clone());
        self.record(kind, key, Change::Added, None, obj.clone());
        self.collect_if_orphaned(kind, ns, &name, &obj);
        Ok(obj)
    }

    fn update(&mut self, kind: &str, ns: &str, name: &str, mut obj: Value, part: Part) -> Result<Value, ApiError> {
        let info = self.kinds[kind].clone();
        let key = (ns.to_owned(), name.to_owned());
        let Some(old) = self.objects[kind].get(&key).cloned() else {
            return Err(ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", info.plural)));
        };
        if let Some(want) = obj["metadata"]["resourceVersion"].as_str()
            && want != old["metadata"]["resourceVersion"].as_str().unwrap_or_default()
        {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                    info.plural
                ),
            ));
        }
        match part {
            Part::Spec => set_status(&mut obj, old.get("status").cloned()),
            Part::Status => {
                let status = obj.get("status").cloned();
                obj = old.clone();
                set_status(&mut obj, status);
            }
            Part::Whole => {}
        }
        // Server-owned metadata stays; the client's labels, annotations,
        // owner references and finalizers are taken.
        let mut meta = old["metadata"].clone();
        if part != Part::Status {
            for f in ["labels", "annotations", "ownerReferences", "finalizers"] {
                match obj["metadata"].get(f) {
                    Some(v) => meta[f] = v.clone(),
                    None => {
                        if let Some(m) = meta.as_object_mut() {
                            m.remove(f);
                        }
                    }
                }
            }
        }
        obj["metadata"] = meta;
        obj["apiVersion"] = json!(info.api_version());
        obj["kind"] = json!(info.kind);
        if obj == old {
            return Ok(old); // a no-op write does not move the resourceVersion
        }
        let content_changed = without(&obj, &["metadata", "status"]) != without(&old, &["metadata", "status"]);
        if content_changed {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
            obj["metadata"]["generation"] = json!(g + 1);
        }
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.objects.get_mut(kind).expect("kind").insert(key.clone(), obj.clone());
        self.record(kind, key, Change::Modified, Some(old), obj.clone());
        self.collect_if_orphaned(kind, ns, name, &obj);
        Ok(obj)
    }

    fn delete(&mut self, kind: &str, ns: &str, name: &str) -> Result<Value, ApiError> {
        let info = self.kinds[kind].clone();
        let key = (ns.to_owned(), name.to_owned());
        let Some(mut old) = self.objects.get_mut(kind).expect("kind").remove(&key) else {
            return Err(ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", info.plural)));
        };
        let rv = self.next_rv();
        let before = old.clone();
        old["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(kind, key, Change::Deleted, Some(before), old.clone());
        // The garbage collector: dependents go with their owner.
        let uid = old["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
        let owned: Vec<(String, String, String)> = self
            .objects
            .iter()
            .flat_map(|(k, objs)| {
                objs.iter()
                    .filter(|(_, o)| owned_by(o, &uid))
                    .map(move |((ns, n), _)| (k.clone(), ns.clone(), n.clone()))
            })
            .collect();
        for (k, ns, n) in owned {
            let _ = self.delete(&k, &ns, &n);
        }
        Ok(old)
    }

    /// The garbage collector: an object whose owner does not exist goes.
    fn collect_if_orphaned(&mut self, kind: &str, ns: &str, name: &str, obj: &Value) {
        let refs = obj["metadata"]["ownerReferences"].as_array().cloned().unwrap_or_default();
        let exists = |uid: &Value| self.objects.values().flat_map(|m| m.values()).any(|o| o["metadata"]["uid"] == *uid);
        if !refs.is_empty() && refs.iter().all(|r| !exists(&r["uid"])) {
            let _ = self.delete(kind, ns, name);
        }
    }

    /// The objects of a kind as they were at `rv` (undoing later writes).
    fn state_at(&self, kind: &str, rv: u64) -> Result<BTreeMap<(String, String), Value>, ApiError> {
        if rv < self.compacted {
            return Err(expired());
        }
        let mut state = self.objects[kind].clone();
        for e in self.history.iter().rev().take_while(|e| e.rv > rv).filter(|e| e.kind == kind) {
            match &e.before {
                Some(b) => {
                    state.insert(e.key.clone(), b.clone());
                }
                None => {
                    state.remove(&e.key);
                }
            }
        }
        Ok(state)
    }
}

fn owned_by(obj: &Value, uid: &str) -> bool {
    obj["metadata"]["ownerReferences"].as_array().is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid))
}

fn expired() -> ApiError {
    ApiError::new(
        410,
        "Expired",
        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
    )
}

/// A request path, taken apart.
struct Target {
    kind: String,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(store: &Store, path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name, status) = match rest {
        [p] => (*p, None, false),
        [p, n] => (*p, Some(n.to_string()), false),
        [p, n, "status"] => (*p, Some(n.to_string()), true),
        _ => return None,
    };
    let kind = store.kinds.values().find(|k| k.group == group && k.version == version && k.plural == plural)?;
    if namespace.is_some() && !kind.namespaced {
        return None;
    }
    Some(Target { kind: kind.id(), namespace, name, status })
}

fn reply(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("response")
}

fn error(e: ApiError) -> Response {
    reply(StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &e.status())
}

fn query_map(q: Option<&str>) -> BTreeMap<String, String> {
    q.map(url_decode_pairs).unwrap_or_default()
}

fn url_decode_pairs(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%').then(|| s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())).flatten();
        match (b[i], hex) {
            (_, Some(x)) => {
                out.push(x);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (c, None) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = query_map(req.uri().query());
    let headers = req.headers().clone();
    let body = match axum::body::to_bytes(req.into_body(), 64 << 20).await {
        Ok(b) => b,
        Err(e) => return error(ApiError::new(400, "BadRequest", e.to_string())),
    };
    let target = {
        let mut s = shared.store.lock().unwrap();
        s.log.push(Logged { method: method.to_string(), path: path.clone(), query: query.clone() });
        parse_path(&s, &path)
    };
    let Some(t) = target else {
        return error(ApiError::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        ));
    };
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let r = match (&method, &t.name) {
        (&Method::GET, None) if watching => return watch_stream(shared, t, &query),
        (&Method::GET, None) => list(&shared, &t, &query),
        (&Method::GET, Some(n)) => {
            let s = shared.store.lock().unwrap();
            s.objects[&t.kind]
                .get(&(t.namespace.clone().unwrap_or_default(), n.clone()))
                .map(|v| (StatusCode::OK, v.clone()))
                .ok_or_else(|| ApiError::new(404, "NotFound", format!("{} \"{n}\" not found", s.kinds[&t.kind].plural)))
        }
        (&Method::POST, None) => write(&shared, |s| {
            let obj: Value =
                serde_json::from_slice(&body).map_err(|e| ApiError::new(400, "BadRequest", e.to_string()))?;
            s.create(&t.kind, &t.namespace.clone().unwrap_or_default(), obj)
        })
        .map(|v| (StatusCode::CREATED, v)),
        (&Method::PUT, Some(n)) => write(&shared, |s| {
            let obj: Value =
                serde_json::from_slice(&body).map_err(|e| ApiError::new(400, "BadRequest", e.to_string()))?;
            let part = if t.status { Part::Status } else { Part::Spec };
            s.update(&t.kind, &t.namespace.clone().unwrap_or_default(), n, obj, part)
        })
        .map(|v| (StatusCode::OK, v)),
        (&Method::PATCH, Some(n)) => write(&shared, |s| patch(s, &t, n, &headers, &body)),
        (&Method::DELETE, Some(n)) => {
            write(&shared, |s| s.delete(&t.kind, &t.namespace.clone().unwrap_or_default(), n))
                .map(|v| (StatusCode::OK, v))
        }
        _ => Err(ApiError::new(405, "MethodNotAllowed", format!("{method} is not supported on {path}"))),
    };
    match r {
        Ok((code, v)) => reply(code, &v),
        Err(e) => error(e),
    }
}

/// Runs a write and wakes the watches.
fn write<T>(shared: &Shared, f: impl FnOnce(&mut Store) -> Result<T, ApiError>) -> Result<T, ApiError> {
    let (r, rv) = {
        let mut s = shared.store.lock().unwrap();
        let r = f(&mut s);
        (r, s.rv)
    };
    shared.written.send_replace(rv);
    r
}

fn patch(
    s: &mut Store,
    t: &Target,
    name: &str,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(StatusCode, Value), ApiError> {
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let patch: Value = serde_json::from_slice(body).map_err(|e| ApiError::new(400, "BadRequest", e.to_string()))?;
    let ns = t.namespace.clone().unwrap_or_default();
    let part = if t.status { Part::Status } else { Part::Spec };
    let existing = s.objects[&t.kind].get(&(ns.clone(), name.to_owned())).cloned();
    match ct.split(';').next().unwrap_or_default() {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            let Some(mut obj) = existing else {
                return Err(ApiError::new(
                    404,
                    "NotFound",
                    format!("{} \"{name}\" not found", s.kinds[&t.kind].plural),
                ));
            };
            merge_patch(&mut obj, &patch);
            if patch["metadata"].get("resourceVersion").is_none()
                && let Some(m) = obj["metadata"].as_object_mut()
            {
                m.remove("resourceVersion");
            }
            s.update(&t.kind, &ns, name, obj, part).map(|v| (StatusCode::OK, v))
        }
        // Server-side apply, simplified for a single manager: create, or replace what it sends.
        "application/apply-patch+yaml" => match existing {
            None if !t.status => s.create(&t.kind, &ns, patch).map(|v| (StatusCode::CREATED, v)),
            None => Err(ApiError::new(404, "NotFound", format!("{} \"{name}\" not found", s.kinds[&t.kind].plural))),
            // One manager owning every field it sends: each top-level
            // section it sends replaces the stored one.
            Some(mut obj) => {
                for (k, v) in patch.as_object().into_iter().flatten() {
                    if k == "metadata" {
                        merge_patch(&mut obj["metadata"], v);
                    } else {
                        obj[k] = v.clone();
                    }
                }
                if let Some(m) = obj["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                s.update(&t.kind, &ns, name, obj, part).map(|v| (StatusCode::OK, v))
            }
        },
        other => Err(ApiError::new(415, "UnsupportedMediaType", format!("patch type {other:?} is not supported here"))),
    }
}

/// A list or watch filter.
struct Filter {
    namespace: Option<String>,
    labels: Option<Selector>,
    /// (dotted path, value, equal?).
    fields: Vec<(String, String, bool)>,
}

impl Filter {
    fn new(t: &Target, q: &BTreeMap<String, String>) -> Result<Self, ApiError> {
        let fields = q
            .get("fieldSelector")
            .map(|f| {
                f.split(',')
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .filter_map(|p| match p.split_once("!=") {
                        Some((k, v)) => Some((k.into(), v.into(), false)),
                        None => {
                            p.split_once("==").or_else(|| p.split_once('=')).map(|(k, v)| (k.into(), v.into(), true))
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let labels = q
            .get("labelSelector")
            .map(|s| Selector::parse(s))
            .transpose()
            .map_err(|e| ApiError::new(400, "BadRequest", e))?;
        Ok(Self { namespace: t.namespace.clone(), labels, fields })
    }

    fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && obj["metadata"]["namespace"].as_str() != Some(ns)
        {
            return false;
        }
        let labels_ok = self
            .labels
            .as_ref()
            .is_none_or(|sel| sel.matches_by(|k| obj["metadata"]["labels"].get(k).and_then(Value::as_str)));
        let fields_ok = self.fields.iter().all(|(path, want, eq)| {
            let got = path.split('.').try_fold(obj, |v, seg| v.get(seg)).map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            });
            (got.as_deref().unwrap_or("") == want) == *eq
        });
        labels_ok && fields_ok
    }
}

fn list(shared: &Shared, t: &Target, q: &BTreeMap<String, String>) -> Result<(StatusCode, Value), ApiError> {
    let s = shared.store.lock().unwrap();
    let info = &s.kinds[&t.kind];
    let filter = Filter::new(t, q)?;
    // A continue token is "<snapshot rv>:<namespace>/<name>" of the last item sent.
    let (snapshot_rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let (rv, key) =
                c.split_once(':').ok_or_else(|| ApiError::new(400, "BadRequest", "invalid continue token"))?;
            let rv: u64 = rv.parse().map_err(|_| ApiError::new(400, "BadRequest", "invalid continue token"))?;
            let (ns, name) = key.split_once('/').unwrap_or(("", key));
            (rv, Some((ns.to_owned(), name.to_owned())))
        }
        None => (s.rv, None),
    };
    let state = s.state_at(&t.kind, snapshot_rv)?;
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    let mut items = Vec::new();
    let mut next = None;
    let mut last: Option<&(String, String)> = None;
    for (key, obj) in state.iter().filter(|(k, _)| after.as_ref().is_none_or(|a| *k > a)) {
        if !filter.matches(obj) {
            continue;
        }
        if items.len() == limit {
            let (ns, name) = last.expect("a page holds at least one item");
            next = Some(format!("{snapshot_rv}:{ns}/{name}"));
            break;
        }
        items.push(obj.clone());
        last = Some(key);
    }
    let mut meta = json!({"resourceVersion": snapshot_rv.to_string()});
    if let Some(c) = next {
        meta["continue"] = json!(c);
    }
    Ok((
        StatusCode::OK,
        json!({"kind": format!("{}List", info.kind), "apiVersion": info.api_version(), "metadata": meta, "items": items}),
    ))
}

fn watch_event(kind: &str, obj: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": obj}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch_stream(shared: Arc<Shared>, t: Target, q: &BTreeMap<String, String>) -> Response {
    let filter = match Filter::new(&t, q) {
        Ok(f) => f,
        Err(e) => return error(e),
    };
    let bookmarks = matches!(q.get("allowWatchBookmarks").map(String::as_str), Some("true" | "1"));
    let timeout = q.get("timeoutSeconds").and_then(|s| s.parse::<u64>().ok()).map(Duration::from_secs);
    let from: Option<u64> = q.get("resourceVersion").and_then(|s| s.parse().ok()).filter(|rv| *rv > 0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    let (info, start) = {
        let s = shared.store.lock().unwrap();
        (s.kinds[&t.kind].clone(), s.rv)
    };
    tokio::spawn(async move {
        let mut written = shared.written.subscribe();
        let mut drops = shared.drops.subscribe();
        let mut expiries = shared.expiries.subscribe();
        drops.mark_unchanged();
        expiries.mark_unchanged();
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        // Without a version, the current objects come first as ADDED.
        let mut cursor = match from {
            Some(rv) => rv,
            None => {
                let objs: Vec<Value> = {
                    let s = shared.store.lock().unwrap();
                    s.objects[&t.kind].values().filter(|o| filter.matches(o)).cloned().collect()
                };
                for o in objs {
                    if tx.send(Ok(watch_event("ADDED", &o))).await.is_err() {
                        return;
                    }
                }
                start
            }
        };
        let mut bookmark_tick = tokio::time::interval(shared.bookmark_every);
        loop {
            // Everything after the cursor, or 410 if it is compacted away.
            let batch: Result<(Vec<Bytes>, u64), ()> = {
                let s = shared.store.lock().unwrap();
                if cursor < s.compacted {
                    Err(())
                } else {
                    let evs = s
                        .history
                        .iter()
                        .filter(|e| e.rv > cursor && e.kind == t.kind)
                        .filter_map(|e| {
                            let was = e.before.as_ref().is_some_and(|b| filter.matches(b));
                            let is = e.change != Change::Deleted && filter.matches(&e.after);
                            let kind = match (was, is) {
                                (false, true) => "ADDED",
                                (true, true) => "MODIFIED",
                                (true, false) => "DELETED",
                                (false, false) => return None,
                            };
                            Some(watch_event(kind, &e.after))
                        })
                        .collect();
                    Ok((evs, s.rv))
                }
            };
            match batch {
                Err(()) => {
                    let gone = ApiError::new(410, "Expired", format!("too old resource version: {cursor} (compacted)"));
                    let _ = tx.send(Ok(watch_event("ERROR", &gone.status()))).await;
                    return;
                }
                Ok((evs, rv)) => {
                    for e in evs {
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    cursor = rv;
                }
            }
            tokio::select! {
                r = written.changed() => if r.is_err() { return },
                _ = drops.changed() => return,
                _ = expiries.changed() => {
                    let gone = ApiError::new(410, "Expired", "The resourceVersion for the provided watch is too old.");
                    let _ = tx.send(Ok(watch_event("ERROR", &gone.status()))).await;
                    return;
                }
                _ = bookmark_tick.tick(), if bookmarks => {
                    let bm = json!({"kind": info.kind, "apiVersion": info.api_version(), "metadata": {"resourceVersion": cursor.to_string()}});
                    if tx.send(Ok(watch_event("BOOKMARK", &bm))).await.is_err() {
                        return;
                    }
                    shared.bookmarks_sent.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => return,
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .expect("response")
}
