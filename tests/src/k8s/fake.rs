//! An API server in the test process, kept for the one fault the real one
//! ([`super::ControlPlane`]) cannot be made to produce on demand: a list
//! that fails between its pages. A real server answers a stale continue
//! token with 410 only when etcd was compacted between two page requests a
//! client makes back to back, which a test cannot time; here
//! [`FakeApiServer::fail_next_page`] makes the next continued page answer
//! 410, so a test can show that nothing of a partial list is applied.
//!
//! It serves one kind, Services, the way kube-rs' watcher uses them: paged
//! lists (`limit`/`continue`) and watches from a resourceVersion, whose
//! history it keeps so a resumed watch gets what it missed; and it can end
//! every watch with an `ERROR` 410, as etcd compaction does to a lagging one.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    body::{Body, Bytes},
    extract::{Request, State},
    http::{StatusCode, header},
    response::Response,
};
use serde_json::{Value, json};
use tokio::sync::watch;

/// One request: its query parameters (`watch`, `limit`, `continue`,
/// `resourceVersion`), and the status it got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Logged {
    pub query: BTreeMap<String, String>,
    pub status: u16,
}

impl Logged {
    /// A watch request.
    pub fn is_watch(&self) -> bool {
        self.query.get("watch").is_some_and(|w| w == "true" || w == "1")
    }

    /// A list request continuing an earlier page.
    pub fn is_continued(&self) -> bool {
        !self.is_watch() && self.query.get("continue").is_some_and(|c| !c.is_empty())
    }
}

#[derive(Default)]
struct Store {
    rv: u64,
    /// name -> Service.
    objects: BTreeMap<String, Value>,
    /// (resourceVersion, event type, object) of every write.
    history: Vec<(u64, &'static str, Value)>,
    log: Vec<Logged>,
}

struct Shared {
    store: Mutex<Store>,
    /// The resourceVersion after each write (wakes watches).
    written: watch::Sender<u64>,
    /// Bumped to send every open watch an ERROR 410 and end it.
    expiries: watch::Sender<u64>,
    fail_next_page: AtomicBool,
}

/// See the module doc. Cheap to clone; serves until the runtime ends.
#[derive(Clone)]
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

impl FakeApiServer {
    /// Starts on a free port of 127.0.0.1, on the current tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            written: watch::channel(0).0,
            expiries: watch::channel(0).0,
            fail_next_page: AtomicBool::new(false),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { shared, addr })
    }

    /// A kube client for it (plain HTTP), on the current tokio runtime.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().expect("URL"));
        kube::Client::try_from(config).expect("client")
    }

    fn write(&self, kind: &'static str, mut obj: Value) {
        let mut s = self.shared.store.lock().unwrap_or_else(|e| e.into_inner());
        s.rv += 1;
        let rv = s.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        match kind {
            "DELETED" => drop(s.objects.remove(&name)),
            _ => drop(s.objects.insert(name, obj.clone())),
        }
        s.history.push((rv, kind, obj));
        drop(s);
        self.shared.written.send_replace(rv);
    }

    /// Creates or replaces Service `default/name`, with `annotations`.
    pub fn put_service(&self, name: &str, annotations: Value) {
        let exists = self.shared.store.lock().unwrap_or_else(|e| e.into_inner()).objects.contains_key(name);
        let obj = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "annotations": annotations},
            "spec": {"ports": [{"port": 80}]}});
        self.write(if exists { "MODIFIED" } else { "ADDED" }, obj);
    }

    /// Deletes Service `default/name`.
    pub fn delete_service(&self, name: &str) {
        let obj = self.shared.store.lock().unwrap_or_else(|e| e.into_inner()).objects.get(name).cloned();
        if let Some(obj) = obj {
            self.write("DELETED", obj);
        }
    }

    /// Sends every open watch an ERROR event with a 410 Status and ends it:
    /// the clients must relist.
    pub fn expire_watches(&self) {
        self.shared.expiries.send_modify(|n| *n += 1);
    }

    /// The next list page asked for with a continue token answers 410
    /// Expired, as when etcd was compacted since the list's first page.
    pub fn fail_next_page(&self) {
        self.shared.fail_next_page.store(true, Ordering::SeqCst);
    }

    /// The requests served so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.shared.store.lock().unwrap_or_else(|e| e.into_inner()).log.clone()
    }
}

fn query_map(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), v.replace("%3A", ":").replace("%2F", "/"))
        })
        .collect()
}

fn reply(code: u16, body: &Value) -> Response {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("response")
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let query = query_map(req.uri().query());
    if req.uri().path() != "/api/v1/services" {
        return reply(404, &status(404, "NotFound", "this server serves /api/v1/services only"));
    }
    let log = |code: u16| {
        shared.store.lock().unwrap_or_else(|e| e.into_inner()).log.push(Logged { query: query.clone(), status: code });
    };
    let logged = Logged { query: query.clone(), status: 200 };
    if logged.is_watch() {
        // Logged once it listens for expiries: a test that saw the watch can expire it.
        let stream = watch_stream(shared.clone(), &query);
        log(200);
        return stream;
    }
    if logged.is_continued() && shared.fail_next_page.swap(false, Ordering::SeqCst) {
        log(410);
        let m = "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.";
        return reply(410, &status(410, "Expired", m));
    }
    log(200);
    let s = shared.store.lock().unwrap_or_else(|e| e.into_inner());
    // A continue token is "<resourceVersion of the first page>:<last name sent>".
    let (rv, after) = match query.get("continue").filter(|c| !c.is_empty()).and_then(|c| c.split_once(':')) {
        Some((rv, name)) => (rv.parse().unwrap_or(s.rv), Some(name.to_owned())),
        None => (s.rv, None),
    };
    let limit: usize = query.get("limit").and_then(|l| l.parse().ok()).filter(|l| *l > 0).unwrap_or(usize::MAX);
    let rest: Vec<(&String, &Value)> =
        s.objects.iter().filter(|(n, _)| after.as_ref().is_none_or(|a| *n > a)).collect();
    let page: Vec<Value> = rest.iter().take(limit).map(|(_, o)| (*o).clone()).collect();
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if rest.len() > limit {
        meta["continue"] = json!(format!("{rv}:{}", rest[limit - 1].0));
    }
    reply(200, &json!({"kind": "ServiceList", "apiVersion": "v1", "metadata": meta, "items": page}))
}

fn watch_stream(shared: Arc<Shared>, query: &BTreeMap<String, String>) -> Response {
    let mut cursor: u64 = query.get("resourceVersion").and_then(|r| r.parse().ok()).unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    let line = |kind: &str, obj: &Value| Ok(Bytes::from(format!("{}\n", json!({"type": kind, "object": obj}))));
    let mut written = shared.written.subscribe();
    let mut expiries = shared.expiries.subscribe();
    expiries.mark_unchanged();
    tokio::spawn(async move {
        loop {
            let events: Vec<(u64, &'static str, Value)> = {
                let s = shared.store.lock().unwrap_or_else(|e| e.into_inner());
                s.history.iter().filter(|(rv, _, _)| *rv > cursor).cloned().collect()
            };
            for (rv, kind, obj) in events {
                if tx.send(line(kind, &obj)).await.is_err() {
                    return;
                }
                cursor = rv;
            }
            tokio::select! {
                r = written.changed() => if r.is_err() { return },
                _ = expiries.changed() => {
                    let gone = status(410, "Expired", "The resourceVersion for the provided watch is too old.");
                    let _ = tx.send(line("ERROR", &gone)).await;
                    return;
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .expect("response")
}
