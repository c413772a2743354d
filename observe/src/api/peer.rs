//! Hubble's Peer service (`peer.Peer/Notify`): which nodes serve a flow API
//! and where, so Hubble Relay (and `hubble watch peers`) can find every node
//! from any one of them. A call gets one PEER_ADDED per node known when it
//! starts, then PEER_ADDED, PEER_UPDATED (address or TLS name changed) and
//! PEER_DELETED as the agent's view of the cluster's Nodes changes.
//!
//! The agent publishes the node list (a `watch`); each call keeps the list
//! it last told its client about and sends the difference, so a slow client
//! sees the net change, never a stale replay. Calls open at once are bounded
//! ([`MAX_NOTIFY_STREAMS`]).

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use weft_flow::proto::peer::{
    ChangeNotification, ChangeNotificationType, NotifyRequest, Tls,
    peer_server::{Peer, PeerServer},
};

/// Notify calls served at once.
pub const MAX_NOTIFY_STREAMS: usize = 64;
/// Notifications buffered per call.
const BUFFER: usize = 64;

/// One node's flow API, as the Peer service announces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// Hubble's peer name: the node, or `cluster/node` outside the cluster named "default".
    pub name: String,
    /// `IP:port` of the node's flow API.
    pub address: String,
    /// The name the node's certificate carries; None when its flow API is plaintext.
    pub tls_server_name: Option<String>,
}

/// The nodes by peer name.
pub type PeerList = Arc<BTreeMap<String, PeerInfo>>;

/// Hubble's peer name of a node.
pub fn peer_name(node: &str, cluster: &str) -> String {
    if cluster.is_empty() || cluster == "default" { node.to_owned() } else { format!("{cluster}/{node}") }
}

fn notification(p: &PeerInfo, kind: ChangeNotificationType) -> ChangeNotification {
    ChangeNotification {
        name: p.name.clone(),
        address: p.address.clone(),
        r#type: kind as i32,
        tls: p.tls_server_name.as_ref().map(|n| Tls { server_name: n.clone() }),
    }
}

/// What a client that knew `old` must be told to know `new`: deletions
/// first, then additions and updates, each in name order.
pub fn changes(old: &BTreeMap<String, PeerInfo>, new: &BTreeMap<String, PeerInfo>) -> Vec<ChangeNotification> {
    let deleted = old.values().filter(|p| !new.contains_key(&p.name));
    let mut out: Vec<_> = deleted.map(|p| notification(p, ChangeNotificationType::PeerDeleted)).collect();
    for p in new.values() {
        match old.get(&p.name) {
            None => out.push(notification(p, ChangeNotificationType::PeerAdded)),
            Some(was) if was != p => out.push(notification(p, ChangeNotificationType::PeerUpdated)),
            Some(_) => {}
        }
    }
    out
}

/// See the module doc.
#[derive(Clone)]
pub struct PeerService {
    peers: watch::Receiver<PeerList>,
    open: Arc<AtomicUsize>,
}

impl PeerService {
    pub fn new(peers: watch::Receiver<PeerList>) -> PeerServer<PeerService> {
        PeerServer::new(PeerService { peers, open: Arc::default() })
    }
}

/// A Notify call's place among [`MAX_NOTIFY_STREAMS`]; given back on drop.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

type NotifyStream = Pin<Box<dyn Stream<Item = Result<ChangeNotification, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for PeerService {
    type NotifyStream = NotifyStream;

    async fn notify(&self, _: Request<NotifyRequest>) -> Result<Response<NotifyStream>, Status> {
        let taken =
            self.open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_NOTIFY_STREAMS).then_some(n + 1));
        if taken.is_err() {
            return Err(Status::resource_exhausted(format!(
                "the peer service serves {MAX_NOTIFY_STREAMS} calls, the most it serves at once (try again later)"
            )));
        }
        let slot = Slot(self.open.clone());
        let mut peers = self.peers.clone();
        let (tx, rx) = mpsc::channel(BUFFER);
        tokio::spawn(async move {
            let _slot = slot;
            let mut told = PeerList::default();
            loop {
                let now = peers.borrow_and_update().clone();
                for n in changes(&told, &now) {
                    if tx.send(Ok(n)).await.is_err() {
                        return;
                    }
                }
                told = now;
                tokio::select! {
                    changed = peers.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(peers: &[(&str, &str, Option<&str>)]) -> BTreeMap<String, PeerInfo> {
        peers
            .iter()
            .map(|(n, a, t)| {
                let p = PeerInfo { name: (*n).into(), address: (*a).into(), tls_server_name: t.map(Into::into) };
                (p.name.clone(), p)
            })
            .collect()
    }

    #[test]
    fn changes_are_deletions_then_additions_and_updates() {
        let old = list(&[("a", "10.0.0.1:4244", None), ("b", "10.0.0.2:4244", None), ("c", "10.0.0.3:4244", None)]);
        let new = list(&[
            ("a", "10.0.0.1:4244", None),
            ("b", "10.0.0.9:4244", Some("b.default.x")),
            ("d", "10.0.0.4:4244", None),
        ]);
        let got: Vec<_> =
            changes(&old, &new).into_iter().map(|n| (n.name, n.r#type, n.tls.map(|t| t.server_name))).collect();
        assert_eq!(
            got,
            [
                ("c".into(), ChangeNotificationType::PeerDeleted as i32, None),
                ("b".into(), ChangeNotificationType::PeerUpdated as i32, Some("b.default.x".into())),
                ("d".into(), ChangeNotificationType::PeerAdded as i32, None),
            ]
        );
        assert!(changes(&new, &new).is_empty());
        assert_eq!(changes(&BTreeMap::new(), &old).len(), 3);
    }

    #[test]
    fn names_as_hubble_uses_them() {
        assert_eq!(peer_name("node1", "default"), "node1");
        assert_eq!(peer_name("node1", ""), "node1");
        assert_eq!(peer_name("node1", "east"), "east/node1");
    }

    #[tokio::test]
    async fn a_call_gets_the_known_nodes_then_each_change() {
        use tokio_stream::StreamExt;
        let (tx, rx) = watch::channel(PeerList::new(list(&[("a", "10.0.0.1:4244", None)])));
        let svc = PeerService { peers: rx, open: Arc::default() };
        let mut s = svc.notify(Request::new(NotifyRequest {})).await.unwrap().into_inner();
        let first = s.next().await.unwrap().unwrap();
        assert_eq!((first.name.as_str(), first.r#type), ("a", ChangeNotificationType::PeerAdded as i32));
        tx.send(PeerList::new(BTreeMap::new())).unwrap();
        let gone = s.next().await.unwrap().unwrap();
        assert_eq!((gone.name.as_str(), gone.r#type), ("a", ChangeNotificationType::PeerDeleted as i32));
        assert_eq!(gone.address, "10.0.0.1:4244");
    }
}
