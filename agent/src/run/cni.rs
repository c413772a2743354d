//! The CNI endpoint: weft-cni's requests on a unix socket. It owns the
//! registry of attachments (which host-side device is which pod's), kept in
//! the state directory across restarts, and publishes it to the control
//! loop, which puts the devices into the snapshot; it answers an ADD once the
//! datapath worker reports the pod's datapath attached to that device, and a
//! DEL once it no longer is. It writes nothing into another component's
//! state: it waits on the datapath's published status.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::watch,
};
use weft_cni::proto::{self, Answer, Attachment, Request};

use super::status::DatapathStatus;
use crate::state::Attachments;

/// How long an ADD or DEL waits for the datapath (weft-cni waits 30 s).
const WAIT: Duration = Duration::from_secs(20);
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The endpoint and what it reads and publishes.
pub struct CniServer {
    pub socket: PathBuf,
    /// The registry's file in the state directory.
    pub store: PathBuf,
    pub attachments: watch::Sender<Arc<Attachments>>,
    pub datapath: watch::Receiver<DatapathStatus>,
    /// Serializes changes to the registry and its file.
    lock: Mutex<()>,
}

/// The registry file in `state_dir`.
pub fn store_path(state_dir: &Path) -> PathBuf {
    state_dir.join("cni-attachments.json")
}

/// The registry as the last run left it, without attachments whose device
/// is gone or is another one now (a pod that went while the agent was down).
pub fn load(store: &Path) -> Attachments {
    let list: Vec<Attachment> = match std::fs::read(store) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!("{}: {e}; starting with no CNI attachments", store.display());
            Vec::new()
        }),
        Err(_) => Vec::new(),
    };
    list.into_iter()
        .filter(|a| crate::datapath::ifindex(&a.host_ifname).ok() == Some(a.host_ifindex))
        .map(|a| ((a.container_id.clone(), a.ifname.clone()), a))
        .collect()
}

fn save(store: &Path, attachments: &Attachments) -> io::Result<()> {
    let list: Vec<&Attachment> = attachments.values().collect();
    let tmp = store.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&list).map_err(io::Error::other)?)?;
    std::fs::rename(&tmp, store)
}

/// Why a CNI request failed. The plugin tells the runtime whether trying
/// again may help ([`CniError::retryable`]).
#[derive(Debug, thiserror::Error)]
enum CniError {
    #[error("{what} {value:?} is not valid")]
    Invalid { what: &'static str, value: String },
    #[error("saving {}: {error}", .store.display())]
    Save { store: PathBuf, error: io::Error },
    #[error("pod {pod}: the datapath worker has stopped")]
    DatapathStopped { pod: String },
    #[error("pod {pod}: not done after {WAIT:?}: {problems}")]
    NotDone {
        pod: String,
        /// The datapath's problems that name the pod.
        problems: String,
    },
    #[error("container {container_id} interface {ifname}: not registered as given")]
    NotRegistered { container_id: String, ifname: String },
    #[error("{ip}: datapath attached to {found:?}, not {wanted}")]
    AttachedElsewhere { ip: std::net::Ipv4Addr, found: Option<u32>, wanted: u32 },
    #[error("the datapath has applied no state yet")]
    NothingApplied,
}

impl CniError {
    /// Whether the same request may succeed later (the agent is busy or
    /// starting), rather than being wrong as given.
    fn retryable(&self) -> bool {
        !matches!(self, CniError::Invalid { .. } | CniError::NotRegistered { .. } | CniError::AttachedElsewhere { .. })
    }
}

/// A request's fields the agent relies on, checked.
fn check_attachment(a: &Attachment) -> Result<(), CniError> {
    let bad = |what, v: &str| Err(CniError::Invalid { what, value: v.to_owned() });
    if a.container_id.is_empty() || a.container_id.len() > 256 {
        return bad("container id", &a.container_id);
    }
    if a.host_ifname.is_empty() || a.host_ifname.len() > 15 || a.host_ifname.contains(['/', '\0']) {
        return bad("host interface name", &a.host_ifname);
    }
    if a.pod.namespace.is_empty() || a.pod.name.is_empty() || a.pod.namespace.len() > 253 || a.pod.name.len() > 253 {
        return bad("pod", &format!("{}/{}", a.pod.namespace, a.pod.name));
    }
    Ok(())
}

impl CniServer {
    pub fn new(
        socket: PathBuf,
        store: PathBuf,
        attachments: watch::Sender<Arc<Attachments>>,
        datapath: watch::Receiver<DatapathStatus>,
    ) -> Self {
        Self { socket, store, attachments, datapath, lock: Mutex::new(()) }
    }

    /// Listens until the agent stops.
    pub async fn run(self) -> anyhow::Result<()> {
        if let Some(dir) = self.socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(&self.socket);
        let listener = UnixListener::bind(&self.socket)?;
        // Only root (the runtime running the plugin) may register devices.
        std::fs::set_permissions(&self.socket, std::fs::Permissions::from_mode(0o600))?;
        tracing::info!(socket = %self.socket.display(), "CNI endpoint listening");
        let me = Arc::new(self);
        loop {
            let (conn, _) = listener.accept().await?;
            let me = me.clone();
            tokio::spawn(async move {
                if let Err(e) = me.serve(conn).await {
                    tracing::warn!("CNI request: {e}");
                }
            });
        }
    }

    async fn serve(&self, mut conn: UnixStream) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut limited = (&mut conn).take(proto::MAX_MESSAGE);
        tokio::time::timeout(READ_TIMEOUT, limited.read_to_end(&mut buf))
            .await
            .map_err(|_| io::Error::other("request timed out"))??;
        let answer = match proto::read_message::<Request>(&buf[..]) {
            Ok(req) => self.handle(req).await,
            Err(e) => Answer::failed(format!("cannot decode the request: {e}"), false),
        };
        let mut out = Vec::new();
        proto::write_message(&mut out, &answer)?;
        conn.write_all(&out).await
    }

    /// Changes the registry, saves it and publishes it.
    fn change(&self, f: impl FnOnce(&mut Attachments) -> bool) -> Result<(), CniError> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = (**self.attachments.borrow()).clone();
        if !f(&mut next) {
            return Ok(());
        }
        save(&self.store, &next).map_err(|error| CniError::Save { store: self.store.clone(), error })?;
        self.attachments.send_replace(Arc::new(next));
        Ok(())
    }

    /// Waits until the datapath's status satisfies `done`; on timeout, the
    /// datapath's problems that name `pod` (`namespace/name`).
    async fn wait(&self, pod: &str, done: impl FnMut(&DatapathStatus) -> bool) -> Result<(), CniError> {
        let mut rx = self.datapath.clone();
        match tokio::time::timeout(WAIT, rx.wait_for(done)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(CniError::DatapathStopped { pod: pod.to_owned() }),
            Err(_) => {
                let st = self.datapath.borrow();
                let problems: Vec<&str> = st.problems.iter().filter(|p| p.contains(pod)).map(String::as_str).collect();
                Err(CniError::NotDone {
                    pod: pod.to_owned(),
                    problems: if problems.is_empty() { "no problem reported".into() } else { problems.join("; ") },
                })
            }
        }
    }

    async fn handle(&self, req: Request) -> Answer {
        let result = match req {
            Request::Add(a) => self.add(a).await,
            Request::Del { network: _, container_id, ifname } => self.del(container_id, ifname).await,
            Request::Check(a) => self.check(&a),
            Request::Status => match self.datapath.borrow().applied_version {
                0 => Err(CniError::NothingApplied),
                _ => Ok(()),
            },
            Request::Gc { network, valid } => self.change(|m| {
                let before = m.len();
                m.retain(|(c, i), a| a.network != network || valid.iter().any(|(vc, vi)| vc == c && vi == i));
                m.len() != before
            }),
        };
        match result {
            Ok(()) => Answer::ok(),
            Err(e) => Answer::failed(e.to_string(), e.retryable()),
        }
    }

    async fn add(&self, a: Attachment) -> Result<(), CniError> {
        check_attachment(&a)?;
        let about = format!("{}/{}", a.pod.namespace, a.pod.name);
        let (ip, index) = (a.ip, a.host_ifindex);
        tracing::info!(pod = %about, %ip, device = %a.host_ifname, "CNI ADD");
        self.change(|m| m.insert((a.container_id.clone(), a.ifname.clone()), a.clone()).as_ref() != Some(&a))?;
        self.wait(&about, |st| st.attached.get(&ip) == Some(&index)).await
    }

    async fn del(&self, container_id: String, ifname: String) -> Result<(), CniError> {
        let mut removed = None;
        self.change(|m| {
            removed = m.remove(&(container_id.clone(), ifname.clone()));
            removed.is_some()
        })?;
        let Some(a) = removed else {
            return Ok(()); // not known: nothing to detach (DEL is idempotent)
        };
        let about = format!("{}/{}", a.pod.namespace, a.pod.name);
        tracing::info!(pod = %about, ip = %a.ip, device = %a.host_ifname, "CNI DEL");
        self.wait(&about, |st| st.attached.get(&a.ip) != Some(&a.host_ifindex)).await
    }

    fn check(&self, a: &Attachment) -> Result<(), CniError> {
        let key = (a.container_id.clone(), a.ifname.clone());
        let known = self.attachments.borrow().get(&key).cloned();
        if known.as_ref() != Some(a) {
            return Err(CniError::NotRegistered { container_id: a.container_id.clone(), ifname: a.ifname.clone() });
        }
        match self.datapath.borrow().attached.get(&a.ip) {
            Some(i) if *i == a.host_ifindex => Ok(()),
            other => Err(CniError::AttachedElsewhere { ip: a.ip, found: other.copied(), wanted: a.host_ifindex }),
        }
    }
}
