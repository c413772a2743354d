//! The ADS server the node's Envoy connects to (a unix socket): state of the
//! world and delta xDS over one stream each, per-type versions and nonces,
//! ACKs and NACKs reported back to the controller, and updates sent in an
//! order that lets Envoy warm clusters before the listeners that use them.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    pin::Pin,
    sync::Arc,
};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource as DeltaResource,
    aggregated_discovery_service_server::{AggregatedDiscoveryService, AggregatedDiscoveryServiceServer},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use imbl::ordmap::DiffItem;

use super::{
    model::{Resource, Resources, XdsSnapshot, parse_version, version_text},
    translate::{CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET},
};

/// Order in which updates go out: secrets and clusters (with their
/// endpoints) before the listeners and routes that use them.
pub const PUSH_ORDER: [&str; 5] = [SECRET, CLUSTER, ENDPOINT, LISTENER, ROUTE];

/// Types whose subscription without names means "all" (wildcard).
fn wildcard_type(t: &str) -> bool {
    t == LISTENER || t == CLUSTER
}

/// A snapshot as published to Envoy.
#[derive(Clone, Debug, Default)]
pub struct Published {
    pub version: u64,
    pub xds: XdsSnapshot,
}

/// What happened on a stream, for the controller and the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdsEvent {
    Connected {
        delta: bool,
    },
    Disconnected,
    /// Envoy took these resources (name -> version) of a type.
    Ack {
        type_url: String,
        version: String,
        resources: BTreeMap<String, u64>,
    },
    /// Envoy refused a response; `resources` were in it.
    Nack {
        type_url: String,
        message: String,
        resources: Vec<String>,
    },
}

/// The gRPC service.
#[derive(Clone)]
pub struct Ads {
    snapshots: watch::Receiver<Arc<Published>>,
    events: mpsc::UnboundedSender<AdsEvent>,
}

impl Ads {
    pub fn new(snapshots: watch::Receiver<Arc<Published>>, events: mpsc::UnboundedSender<AdsEvent>) -> Self {
        Self { snapshots, events }
    }

    /// Serves on a unix socket (only `access` may connect: what it serves
    /// holds TLS keys) until the task is dropped.
    pub async fn serve_unix(self, path: &Path, access: weft_flow::socket::Access) -> anyhow::Result<()> {
        let listener = access.bind(path)?;
        tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(self).max_decoding_message_size(64 << 20))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await?;
        Ok(())
    }
}

type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

fn version_for(xds: &XdsSnapshot, type_url: &str, names: &BTreeSet<String>) -> String {
    if names.is_empty() && wildcard_type(type_url) {
        return xds.type_version(type_url);
    }
    let mut sub = XdsSnapshot::default();
    for n in names {
        if let Some(r) = xds.types.get(type_url).and_then(|m| m.get(n)) {
            sub.types.entry(type_url.to_owned()).or_default().insert(n.clone(), r.clone());
        }
    }
    sub.type_version(type_url)
}

/// Per-type state of a state-of-the-world stream.
#[derive(Default)]
struct SotwSub {
    names: BTreeSet<String>,
    sent_version: Option<String>,
    nonce: String,
    /// Name -> version of what the last response held.
    sent: BTreeMap<String, u64>,
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let mut snapshots = self.snapshots.clone();
        let events = self.events.clone();
        let _ = events.send(AdsEvent::Connected { delta: false });
        tokio::spawn(async move {
            let mut subs: BTreeMap<String, SotwSub> = BTreeMap::new();
            let mut nonce = 0u64;
            'stream: loop {
                tokio::select! {
                    req = inbound.next() => {
                        let Some(Ok(req)) = req else { break };
                        let snap = snapshots.borrow().clone();
                        let sub = subs.entry(req.type_url.clone()).or_default();
                        if !req.response_nonce.is_empty() {
                            if req.response_nonce != sub.nonce {
                                continue; // stale: superseded by a later response
                            }
                            match &req.error_detail {
                                Some(e) => {
                                    let _ = events.send(AdsEvent::Nack {
                                        type_url: req.type_url.clone(),
                                        message: e.message.clone(),
                                        resources: sub.sent.keys().cloned().collect(),
                                    });
                                }
                                None => {
                                    let _ = events.send(AdsEvent::Ack {
                                        type_url: req.type_url.clone(),
                                        version: req.version_info.clone(),
                                        resources: sub.sent.clone(),
                                    });
                                }
                            }
                        }
                        let names: BTreeSet<String> = req.resource_names.iter().filter(|n| *n != "*").cloned().collect();
                        let changed_names = names != sub.names;
                        sub.names = names;
                        let version = version_for(&snap.xds, &req.type_url, &sub.names);
                        // Answer a new subscription, a changed one, or a request
                        // that is behind (a NACK asks again for what we have).
                        if sub.sent_version.is_none() || changed_names || sub.sent_version.as_deref() != Some(&version)
                        {
                            nonce += 1;
                            if tx.send(Ok(sotw_response(&snap, &req.type_url, sub, nonce))).await.is_err() {
                                break;
                            }
                        }
                    }
                    changed = snapshots.changed() => {
                        if changed.is_err() { break; }
                        let snap = snapshots.borrow_and_update().clone();
                        for t in PUSH_ORDER {
                            let Some(sub) = subs.get_mut(t) else { continue };
                            let version = version_for(&snap.xds, t, &sub.names);
                            if sub.sent_version.as_deref() != Some(&version) {
                                nonce += 1;
                                if tx.send(Ok(sotw_response(&snap, t, sub, nonce))).await.is_err() {
                                    break 'stream;
                                }
                            }
                        }
                    }
                }
            }
            let _ = events.send(AdsEvent::Disconnected);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let mut inbound = request.into_inner();
        // Two responses queued at most: a large update goes out in parts
        // of about DELTA_RESPONSE_BYTES (see [`send_delta`]), each made
        // when the one before has been taken to be written, so the bytes
        // copied for sending stay a few parts' worth, not the whole update.
        let (tx, rx) = mpsc::channel(2);
        let mut snapshots = self.snapshots.clone();
        let events = self.events.clone();
        let _ = events.send(AdsEvent::Connected { delta: true });
        tokio::spawn(async move {
            let mut subs: BTreeMap<String, DeltaSub> = BTreeMap::new();
            let mut nonce = 0u64;
            'stream: loop {
                tokio::select! {
                    req = inbound.next() => {
                        let Some(Ok(req)) = req else { break };
                        let snap = snapshots.borrow().clone();
                        let first = !subs.contains_key(&req.type_url);
                        let sub = subs.entry(req.type_url.clone()).or_default();
                        if first {
                            sub.wildcard = wildcard_type(&req.type_url) && req.resource_names_subscribe.is_empty();
                            // After a reconnect Envoy says what it already has.
                            // What it has as built needs no response, so no ACK
                            // would come for it: count it as ACKed (a restarted
                            // agent adopting a running Envoy learns it this way).
                            let has = sub.adopt(&req.initial_resource_versions);
                            if !has.is_empty() {
                                let _ = events.send(AdsEvent::Ack {
                                    type_url: req.type_url.clone(),
                                    version: snap.version.to_string(),
                                    resources: has,
                                });
                            }
                        }
                        if !req.response_nonce.is_empty()
                            && let Some(in_flight) = sub.in_flight.remove(&req.response_nonce) {
                                match &req.error_detail {
                                    Some(e) => {
                                        let _ = events.send(AdsEvent::Nack {
                                            type_url: req.type_url.clone(),
                                            message: e.message.clone(),
                                            resources: in_flight.keys().cloned().collect(),
                                        });
                                    }
                                    None => {
                                        tracing::debug!(type_url = req.type_url, resources = in_flight.len(), "delta ACK");
                                        let _ = events.send(AdsEvent::Ack {
                                            type_url: req.type_url.clone(),
                                            version: snap.version.to_string(),
                                            resources: in_flight,
                                        });
                                    }
                                }
                            }
                        sub.follow(&req.resource_names_subscribe, &req.resource_names_unsubscribe);
                        if !send_delta(&tx, &snap, &req.type_url, sub, &mut nonce).await { break; }
                    }
                    changed = snapshots.changed() => {
                        if changed.is_err() { break; }
                        let snap = snapshots.borrow_and_update().clone();
                        for t in PUSH_ORDER {
                            let Some(sub) = subs.get_mut(t) else { continue };
                            if !send_delta(&tx, &snap, t, sub, &mut nonce).await { break 'stream; }
                        }
                    }
                }
            }
            let _ = events.send(AdsEvent::Disconnected);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn sotw_response(snap: &Published, type_url: &str, sub: &mut SotwSub, nonce: u64) -> DiscoveryResponse {
    let all = wildcard_type(type_url) && sub.names.is_empty();
    let resources: Vec<_> = snap.xds.of(type_url).filter(|r| all || sub.names.contains(&r.name)).cloned().collect();
    let version = version_for(&snap.xds, type_url, &sub.names);
    sub.sent_version = Some(version.clone());
    sub.nonce = nonce.to_string();
    sub.sent = resources.iter().map(|r| (r.name.clone(), r.version)).collect();
    DiscoveryResponse {
        version_info: version,
        resources: resources.iter().map(|r| r.any()).collect(),
        type_url: type_url.to_owned(),
        nonce: sub.nonce.clone(),
        ..Default::default()
    }
}

/// Per-type state of a delta stream: what Envoy has, and responses awaiting an answer.
#[derive(Default)]
struct DeltaSub {
    wildcard: bool,
    names: BTreeSet<String>,
    /// Name -> version Envoy has (or was sent).
    /// (None: a version Envoy named after a reconnect that is not one of
    /// ours, which no resource has.)
    sent: BTreeMap<String, Option<u64>>,
    /// Nonce -> the resources (name -> version) that response carried.
    in_flight: BTreeMap<String, BTreeMap<String, u64>>,
    /// The type's resources as of the last response (or the last check
    /// that found nothing to send): `sent` is what of them Envoy wants.
    /// None: the next response compares every resource (a new stream, a
    /// wildcard subscription that came or went).
    synced: Option<Resources>,
    /// Names subscribed to or unsubscribed from since then: compared too
    /// (one unsubscribed from while the wildcard stands is sent again).
    touched: BTreeSet<String>,
}

impl DeltaSub {
    /// Takes what Envoy says it has after a reconnect (name -> version) as
    /// sent; returns those of our versions, what it holds of ours.
    fn adopt(&mut self, initial: &std::collections::HashMap<String, String>) -> BTreeMap<String, u64> {
        self.sent = initial.iter().map(|(n, v)| (n.clone(), parse_version(v))).collect();
        self.sent.iter().filter_map(|(n, v)| Some((n.clone(), (*v)?))).collect()
    }

    /// Follows a request's subscription changes.
    fn follow(&mut self, subscribe: &[String], unsubscribe: &[String]) {
        for n in subscribe {
            if n == "*" {
                self.synced = self.synced.take().filter(|_| self.wildcard);
                self.wildcard = true;
            } else {
                self.names.insert(n.clone());
                self.touched.insert(n.clone());
            }
        }
        for n in unsubscribe {
            if n == "*" {
                self.synced = self.synced.take().filter(|_| !self.wildcard);
                self.wildcard = false;
            } else {
                self.names.remove(n);
                self.sent.remove(n);
                self.touched.insert(n.clone());
            }
        }
    }
}

/// About how many bytes of resources one delta response carries: an update
/// of 10,000 configs' listeners is some 14 MiB, and a response is copied
/// (into the message, then into gRPC's frame) before it is written, so one
/// response of it all held twice that at the agent's peak. Envoy applies
/// the parts one after the other as it would the one response.
const DELTA_RESPONSE_BYTES: usize = 1 << 20;

/// Sends what changed of a type since the last response, in as many
/// responses as its size takes (see [`DeltaParts`]); false when the stream
/// is gone.
async fn send_delta(
    tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    snap: &Published,
    type_url: &str,
    sub: &mut DeltaSub,
    nonce: &mut u64,
) -> bool {
    let Some(mut parts) = DeltaParts::new(snap, type_url, sub, DELTA_RESPONSE_BYTES) else { return true };
    loop {
        *nonce += 1;
        let Some(resp) = parts.next(snap, type_url, sub, *nonce) else { return true };
        if tx.send(Ok(resp)).await.is_err() {
            return false;
        }
    }
}

/// What a resource costs in a delta response as the agent holds it before
/// it is written: its bytes, its name, and the message around them (the
/// type URL and version as strings of their own, about 200 bytes with the
/// structs: most of a small resource's).
fn sent_size(r: &Resource) -> usize {
    r.value.len() + r.name.len() + 200
}

/// What a delta stream that has just subscribed to everything of a type
/// is sent, one response at a time, as [`send_delta`] makes them (for the
/// memory profile).
#[cfg(test)]
pub(crate) fn first_delta_push(snap: &Published, type_url: &str, mut each: impl FnMut(DeltaDiscoveryResponse)) {
    let mut sub = DeltaSub { wildcard: true, ..Default::default() };
    let Some(mut parts) = DeltaParts::new(snap, type_url, &mut sub, DELTA_RESPONSE_BYTES) else { return };
    let mut nonce = 0;
    while let Some(r) = parts.next(snap, type_url, &mut sub, nonce) {
        nonce += 1;
        each(r);
    }
}

/// What changed of a type since the last response, cut into responses of
/// at most `budget` bytes of resources each (one resource at least), in
/// the order one response would carry them, the removed names in the
/// first. Each response is made when it is asked for ([`DeltaParts::next`]),
/// and is recorded as sent (and in flight under its nonce) then.
struct DeltaParts {
    changed: Vec<Arc<Resource>>,
    removed: Vec<String>,
    /// How many of `changed` went out in the parts so far.
    at: usize,
    budget: usize,
}

impl DeltaParts {
    /// None when nothing changed.
    fn new(snap: &Published, type_url: &str, sub: &mut DeltaSub, budget: usize) -> Option<Self> {
        let (changed, removed) = delta_changes(snap, type_url, sub)?;
        Some(Self { changed, removed, at: 0, budget })
    }

    /// The next response, or None once every part went out.
    fn next(
        &mut self,
        snap: &Published,
        type_url: &str,
        sub: &mut DeltaSub,
        nonce: u64,
    ) -> Option<DeltaDiscoveryResponse> {
        // The first part goes out even without resources (removals alone).
        if self.at == self.changed.len() && self.removed.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let n = self.changed[self.at..]
            .iter()
            .take_while(|r| {
                let size = sent_size(r);
                let fits = bytes == 0 || bytes + size <= self.budget;
                bytes += size;
                fits
            })
            .count();
        let part = &self.changed[self.at..self.at + n];
        self.at += n;
        Some(delta_part(snap, type_url, sub, nonce, part, std::mem::take(&mut self.removed)))
    }
}

/// New or changed resources of a type since the last response (in name
/// order), and the names that went away; None when nothing did. Compares
/// the resources that changed since the last response (what the snapshots
/// do not share) and the names newly subscribed to, not every resource.
fn delta_changes(snap: &Published, type_url: &str, sub: &mut DeltaSub) -> Option<(Vec<Arc<Resource>>, Vec<String>)> {
    let now = snap.xds.types.get(type_url).cloned().unwrap_or_default();
    let wants = |sub: &DeltaSub, n: &String| sub.wildcard || sub.names.contains(n);
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    let mut one = |sub: &DeltaSub, name: &String| match now.get(name).filter(|_| wants(sub, name)) {
        Some(r) if sub.sent.get(name) != Some(&Some(r.version)) => changed.push(r.clone()),
        Some(_) => {}
        None if sub.sent.contains_key(name) => removed.push(name.clone()),
        None => {}
    };
    let touched = std::mem::take(&mut sub.touched);
    match sub.synced.take() {
        Some(before) => {
            let mut names = touched;
            for d in before.diff(&now) {
                let (DiffItem::Add(n, _) | DiffItem::Update { new: (n, _), .. } | DiffItem::Remove(n, _)) = d;
                names.insert(n.clone());
            }
            for n in &names {
                one(sub, n);
            }
        }
        None => {
            let names: BTreeSet<&String> = now.keys().chain(sub.sent.keys()).collect();
            for n in names {
                one(sub, n);
            }
        }
    }
    sub.synced = Some(now);
    (!changed.is_empty() || !removed.is_empty()).then_some((changed, removed))
}

/// One response of `resources` and `removed`, recorded as sent and as in
/// flight under its nonce (its ACK or NACK is of these).
fn delta_part(
    snap: &Published,
    type_url: &str,
    sub: &mut DeltaSub,
    nonce: u64,
    resources: &[Arc<Resource>],
    removed: Vec<String>,
) -> DeltaDiscoveryResponse {
    for n in &removed {
        sub.sent.remove(n);
    }
    let carried: BTreeMap<String, u64> = resources.iter().map(|r| (r.name.clone(), r.version)).collect();
    sub.sent.extend(carried.iter().map(|(n, v)| (n.clone(), Some(*v))));
    let nonce = nonce.to_string();
    tracing::debug!(type_url, changed = carried.len(), removed = removed.len(), "delta response");
    sub.in_flight.insert(nonce.clone(), carried);
    DeltaDiscoveryResponse {
        system_version_info: snap.version.to_string(),
        resources: resources
            .iter()
            .map(|r| DeltaResource {
                name: r.name.clone(),
                version: version_text(r.version),
                resource: Some(r.any()),
                ..Default::default()
            })
            .collect(),
        type_url: type_url.to_owned(),
        removed_resources: removed,
        nonce,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::{
        core::v3::{Address, SocketAddress, address, socket_address::PortSpecifier},
        endpoint::v3::{ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint},
    };

    use super::*;

    /// Only what changed since the last response, in one response whatever
    /// its size ([`delta_changes`]); None when nothing did.
    fn delta_response(
        snap: &Published,
        type_url: &str,
        sub: &mut DeltaSub,
        nonce: u64,
    ) -> Option<DeltaDiscoveryResponse> {
        DeltaParts::new(snap, type_url, sub, usize::MAX)?.next(snap, type_url, sub, nonce)
    }

    fn cla(name: &str, ports: &[u32]) -> Resource {
        let lb_endpoints = ports
            .iter()
            .map(|p| LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: "10.1.1.1".into(),
                            port_specifier: Some(PortSpecifier::PortValue(*p)),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            })
            .collect();
        let m = ClusterLoadAssignment {
            cluster_name: name.into(),
            endpoints: vec![LocalityLbEndpoints { lb_endpoints, ..Default::default() }],
            ..Default::default()
        };
        Resource::new(name.into(), &m, None)
    }

    fn published(version: u64, resources: Vec<Resource>) -> Published {
        let mut xds = XdsSnapshot::default();
        for r in resources {
            xds.put(r);
        }
        Published { version, xds }
    }

    fn names(r: &DeltaDiscoveryResponse) -> (Vec<&str>, Vec<&str>) {
        (
            r.resources.iter().map(|x| x.name.as_str()).collect(),
            r.removed_resources.iter().map(String::as_str).collect(),
        )
    }

    #[test]
    fn delta_sends_only_what_changed_and_what_went_away() {
        let mut sub = DeltaSub { wildcard: true, ..Default::default() };
        let v1 = published(1, vec![cla("a", &[80]), cla("b", &[80])]);
        let first = delta_response(&v1, ENDPOINT, &mut sub, 1).expect("everything at first");
        assert_eq!(names(&first), (vec!["a", "b"], vec![]));
        assert!(delta_response(&v1, ENDPOINT, &mut sub, 2).is_none(), "nothing changed, nothing sent");

        // One endpoint added to a, c new, b untouched: a and c only.
        let v2 = published(2, vec![cla("a", &[80, 81]), cla("b", &[80]), cla("c", &[80])]);
        let second = delta_response(&v2, ENDPOINT, &mut sub, 3).unwrap();
        assert_eq!(names(&second), (vec!["a", "c"], vec![]));

        // b gone: only its name, as removed.
        let v3 = published(3, vec![cla("a", &[80, 81]), cla("c", &[80])]);
        let third = delta_response(&v3, ENDPOINT, &mut sub, 4).unwrap();
        assert_eq!(names(&third), (vec![], vec!["b"]));

        // A subscriber to some names hears of those only.
        let mut named = DeltaSub { names: ["c".to_string()].into_iter().collect(), ..Default::default() };
        assert_eq!(names(&delta_response(&v3, ENDPOINT, &mut named, 5).unwrap()), (vec!["c"], vec![]));
    }

    /// A large update goes out in parts of the budget (one resource at
    /// least, however large), in the order one response would have carried
    /// them, the removed names in the first part; each part's resources are
    /// what its ACK acknowledges; together they are the one response.
    #[test]
    fn a_large_update_goes_out_in_parts_that_together_are_the_one_response() {
        let mut rng = crate::xds::acks::tests::Rng(0x0c4a_11ed);
        for run in 0..50 {
            let mut whole = DeltaSub { wildcard: true, ..Default::default() };
            let mut parts = DeltaSub { wildcard: true, ..Default::default() };
            let mut snap = Published::default();
            for step in 0..6u64 {
                for _ in 0..rng.below(30) {
                    let ports: Vec<u32> = (0..1 + rng.below(40) as u32).map(|p| 8000 + p).collect();
                    snap.xds.put(cla(&format!("r{:02}", rng.below(40)), &ports));
                }
                for _ in 0..rng.below(4) {
                    if let Some(m) = snap.xds.types.get_mut(ENDPOINT) {
                        m.remove(&format!("r{:02}", rng.below(40)));
                    }
                }
                snap.version += 1;
                let budget = 1 + rng.below(6000) as usize;
                let at = format!("run {run} step {step} budget {budget}");
                let one = delta_response(&snap, ENDPOINT, &mut whole, 0);
                let mut got = Vec::new();
                let mut removed = Vec::new();
                let mut nonce = 0;
                let mut cut = DeltaParts::new(&snap, ENDPOINT, &mut parts, budget);
                while let Some(r) = cut.as_mut().and_then(|c| c.next(&snap, ENDPOINT, &mut parts, nonce)) {
                    nonce += 1;
                    assert!(nonce < 200, "{at}: the parts never end");
                    let bytes: usize = r.resources.iter().map(|x| sent_size(&snap.xds.types[ENDPOINT][&x.name])).sum();
                    assert!(r.resources.len() == 1 || bytes <= budget, "{at}: {bytes} bytes in a part");
                    assert!(
                        removed.is_empty() || r.removed_resources.is_empty(),
                        "{at}: removals after the first part"
                    );
                    let carried: Vec<&String> = parts.in_flight[&r.nonce].keys().collect();
                    assert_eq!(carried, r.resources.iter().map(|x| &x.name).collect::<Vec<_>>(), "{at}");
                    removed.extend(r.removed_resources);
                    got.extend(r.resources);
                }
                let one = one.map(|r| (r.resources, r.removed_resources)).unwrap_or_default();
                assert_eq!((got, removed), one, "{at}");
                assert_eq!(parts.sent, whole.sent, "{at}");
            }
        }
    }

    /// After a reconnect Envoy names what it has: what it has as built is
    /// not sent again, a name at a version that is not one of ours is sent
    /// (ours never equals it), and a name the build no longer has is removed.
    #[test]
    fn a_reconnected_envoy_gets_what_it_lacks_and_loses_what_went() {
        let v = published(1, vec![cla("same", &[80]), cla("foreign", &[80]), cla("stale", &[80])]);
        let stale = cla("stale", &[81]);
        let initial = std::collections::HashMap::from([
            ("same".to_owned(), version_text(v.xds.types[ENDPOINT]["same"].version)),
            ("foreign".to_owned(), "not-a-weft-version".to_owned()),
            ("stale".to_owned(), version_text(stale.version)),
            ("gone".to_owned(), version_text(cla("gone", &[80]).version)),
        ]);
        let mut sub = DeltaSub { wildcard: true, ..Default::default() };
        let has = sub.adopt(&initial);
        assert_eq!(has.keys().collect::<Vec<_>>(), ["gone", "same", "stale"], "ours, whatever the build holds");
        let r = delta_response(&v, ENDPOINT, &mut sub, 1).unwrap();
        assert_eq!(names(&r), (vec!["foreign", "stale"], vec!["gone"]));
        assert_eq!(r.resources[1].version, version_text(v.xds.types[ENDPOINT]["stale"].version));
    }

    /// A build rebased on the last one equals the build, and keeps the last
    /// one's entry for every resource that is equal in both (so the ACK
    /// counts and the delta stream skip it).
    #[test]
    fn a_rebased_build_equals_the_build_and_shares_what_did_not_change() {
        let mut base = XdsSnapshot::default();
        for (n, port) in [("same", 80), ("changed", 80), ("gone", 80)] {
            base.put(cla(n, &[port]));
        }
        let mut fresh = XdsSnapshot::default();
        for (n, port) in [("same", 80), ("changed", 81), ("new", 80)] {
            fresh.put(cla(n, &[port]));
        }
        let rebased = fresh.clone().rebased_on(&base);
        assert_eq!(rebased.types, fresh.types);
        let entry = |s: &XdsSnapshot, n: &str| s.types[ENDPOINT].get(n).cloned();
        assert!(Arc::ptr_eq(&entry(&rebased, "same").unwrap(), &entry(&base, "same").unwrap()));
        assert!(Arc::ptr_eq(&entry(&rebased, "changed").unwrap(), &entry(&fresh, "changed").unwrap()));
        assert!(entry(&rebased, "gone").is_none());
    }

    /// A delta stream that compares only what changed since its last
    /// response (and names newly subscribed to) sends what one comparing
    /// every resource sends, after every step of random sequences of
    /// resources added, changed and removed (snapshots sharing structure, as
    /// builds do, or made anew), subscriptions and unsubscriptions (wildcard
    /// too) and responses skipped.
    #[test]
    fn comparing_what_changed_sends_what_comparing_everything_sends() {
        let mut rng = crate::xds::acks::tests::Rng(0x5eed_de17);
        let name = |rng: &mut crate::xds::acks::tests::Rng| format!("r{}", rng.below(12));
        for run in 0..20 {
            let wildcard = run % 2 == 0;
            let mut fast = DeltaSub { wildcard, ..Default::default() };
            let mut whole = DeltaSub { wildcard, ..Default::default() };
            let mut snap = Published::default();
            let mut log = Vec::new();
            for step in 0..200u64 {
                match rng.below(8) {
                    0..=2 => {
                        let n = name(&mut rng);
                        let port = 80 + rng.below(3) as u32;
                        log.push(format!("put {n} {port}"));
                        if rng.below(4) == 0 {
                            // Made anew: nothing shared with the last one.
                            let mut xds = XdsSnapshot::default();
                            for r in snap.xds.of(ENDPOINT) {
                                xds.put(Resource::clone(r));
                            }
                            snap.xds = xds;
                        }
                        snap.xds.put(cla(&n, &[port]));
                    }
                    3 => {
                        let n = name(&mut rng);
                        log.push(format!("remove {n}"));
                        if let Some(m) = snap.xds.types.get_mut(ENDPOINT) {
                            m.remove(&n);
                        }
                    }
                    4 => {
                        let (sub, unsub): (Vec<String>, Vec<String>) = match rng.below(4) {
                            0 => (vec!["*".into()], vec![]),
                            1 => (vec![], vec!["*".into()]),
                            2 => (vec![name(&mut rng), name(&mut rng)], vec![]),
                            _ => (vec![], vec![name(&mut rng)]),
                        };
                        log.push(format!("subscribe {sub:?} unsubscribe {unsub:?}"));
                        fast.follow(&sub, &unsub);
                        whole.follow(&sub, &unsub);
                    }
                    _ => log.push("again".into()),
                }
                if rng.below(3) == 0 {
                    // Coalesced with the next change.
                    continue;
                }
                snap.version += 1;
                whole.synced = None;
                let a = delta_response(&snap, ENDPOINT, &mut fast, step);
                let b = delta_response(&snap, ENDPOINT, &mut whole, step);
                let at = format!("run {run} step {step}: {log:?}");
                assert_eq!(a, b, "{at}");
                assert_eq!(fast.sent, whole.sent, "{at}");
            }
        }
    }
}
