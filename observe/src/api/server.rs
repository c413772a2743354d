//! The flow API: Hubble's `observer.Observer` gRPC service over the flow
//! store, so `weft observe`, the `hubble` CLI, Hubble Relay and Hubble UI can
//! read it; with gRPC health (`hubble.server.Observer`) and reflection.
//!
//! GetFlows follows the reference semantics: the start point is found by
//! walking back from the newest flow (or at the oldest with `first`, or at
//! "now" for a plain follow), then flows are sent oldest first; loss notices
//! ignore filters and the time window. A slow client only falls behind in the
//! ring (and is told what it missed); it never holds the pipeline up.
//!
//! Sending is cheap (see `encoded`): filters run on stored records before
//! anything is converted, a flow is written as protobuf straight from its
//! record (`wire`, whose writer keeps the bytes of what repeats: endpoints,
//! the node's fields), once for every stream that sends it, and a stream
//! hands the server a chunk of responses at a time, which go out in one
//! HTTP/2 frame. GetFlows therefore has its
//! own route ([`FlowApi`]) that sends those bytes as they are.
//!
//! What clients can make the agent hold is bounded: a request's size
//! ([`MAX_REQUEST_BYTES`]) and filters (see `filter`), each stream's buffer
//! ([`CLIENT_BUFFER`] responses) and what its writer keeps
//! ([`wire::KEPT_BYTES`](super::wire::KEPT_BYTES)), the streams one client may keep open
//! (a TCP peer's address, a unix peer's uid) and all clients together
//! ([`StreamLimits`]), and the HTTP/2 streams per connection.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use prost::Message;
use weft_flow::{
    proto::{
        self, HEALTH_SERVICE,
        observer::{
            self as obs, GetFlowsRequest, GetFlowsResponse,
            get_flows_response::ResponseTypes,
            observer_server::{Observer, ObserverServer},
        },
        weft::WeftClient,
    },
    time::{now_ns, timestamp},
};

pub use super::tls::{Tls, TlsError, TlsSource};
use super::{
    convert::{self, Context},
    encoded::{Batches, Encoded, FlowCodec, SharedEncodings},
    filter::{Env, FilterSet, check_bounds},
    peer::PeerService,
    wire::FlowWriter,
};
use crate::pipeline::{
    Pipeline, Refusal,
    record::{Entry, Lost, LostSource},
};

/// The version string the flow API reports.
pub const VERSION: &str = concat!("weft ", env!("CARGO_PKG_VERSION"));

/// Entries copied out of the store per lock.
const READ_CHUNK: usize = 256;
/// Responses buffered per client before the reader waits for it (in
/// chunks of at most [`READ_CHUNK`]).
pub const CLIENT_BUFFER: usize = 2 * READ_CHUNK;
/// The largest request the flow API decodes.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// A follower woken by new flows waits this long before reading them, so
/// that the flows arriving meanwhile go out together (one chunk, one HTTP/2
/// frame, one write) rather than a wake-up, a frame and a write each: at
/// 10,000 flows/s those wake-ups and writes were most of the flow API's
/// CPU. A follower sees a flow at most this much later. It reads sooner
/// when a quarter of the store ([`follow_room`]) has arrived meanwhile.
const FOLLOW_GATHER: Duration = Duration::from_millis(10);

/// The flows a follower lets arrive before it reads, however short its
/// gathering has been: a quarter of the store, so that the store does not
/// overwrite what a follower has not read only because it was waiting (at
/// 400,000 flows/s, 10 ms is 4,000 flows: the default store holds 4,095).
fn follow_room(capacity: usize) -> u64 {
    (capacity as u64 / 4).max(1)
}
/// HTTP/2 streams (calls at once) per connection.
const STREAMS_PER_CONNECTION: u32 = 128;

/// How many GetFlows streams may be open at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    /// From one client (a TCP peer address, a unix peer uid).
    pub per_client: usize,
    /// From all clients together.
    pub total: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits { per_client: 16, total: 128 }
    }
}

/// Who a request comes from, for [`StreamLimits`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ClientKey {
    Ip(IpAddr),
    Uid(u32),
    Unknown,
}

impl ClientKey {
    fn of<T>(req: &Request<T>) -> ClientKey {
        if let Some(addr) = req.remote_addr() {
            return ClientKey::Ip(addr.ip());
        }
        let uds = req.extensions().get::<tonic::transport::server::UdsConnectInfo>();
        match uds.and_then(|u| u.peer_cred) {
            Some(cred) => ClientKey::Uid(cred.uid()),
            None => ClientKey::Unknown,
        }
    }
}

/// The GetFlows streams open now, by client.
#[derive(Default)]
struct OpenStreams {
    limits: StreamLimits,
    open: Mutex<(usize, HashMap<ClientKey, usize>)>,
}

/// One open stream; closing it (dropping) gives its place back.
struct StreamSlot {
    streams: Arc<OpenStreams>,
    client: ClientKey,
}

impl OpenStreams {
    fn open(self: &Arc<Self>, client: ClientKey) -> Result<StreamSlot, Status> {
        let mut g = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, by_client) = &mut *g;
        let mine = by_client.get(&client).copied().unwrap_or(0);
        if mine >= self.limits.per_client {
            return Err(Status::resource_exhausted(format!(
                "this client has {mine} flow streams open, the most one client may (close one first)"
            )));
        }
        if *total >= self.limits.total {
            return Err(Status::resource_exhausted(format!(
                "the flow API serves {total} streams, the most it serves at once (try again later)"
            )));
        }
        *total += 1;
        by_client.insert(client.clone(), mine + 1);
        Ok(StreamSlot { streams: self.clone(), client })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut g = self.streams.open.lock().unwrap_or_else(|e| e.into_inner());
        let (total, by_client) = &mut *g;
        *total = total.saturating_sub(1);
        if let Some(n) = by_client.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                by_client.remove(&self.client);
            }
        }
    }
}

/// See the module doc.
#[derive(Clone)]
pub struct ObserverService {
    pipeline: Arc<Pipeline>,
    started: Instant,
    /// The address clients use, for GetNodes.
    address: String,
    /// Whether the TCP listener speaks TLS, for GetNodes.
    tls: bool,
    streams: Arc<OpenStreams>,
    encodings: Arc<SharedEncodings>,
}

impl ObserverService {
    pub fn new(pipeline: Arc<Pipeline>, address: String) -> Self {
        Self::with_limits(pipeline, address, StreamLimits::default())
    }

    pub fn with_limits(pipeline: Arc<Pipeline>, address: String, limits: StreamLimits) -> Self {
        let streams = Arc::new(OpenStreams { limits, ..Default::default() });
        Self { pipeline, started: Instant::now(), address, tls: false, streams, encodings: Arc::default() }
    }

    /// Checks a GetFlows request and starts its query: the encoded
    /// responses, a chunk at a time.
    fn open_flows(&self, request: Request<GetFlowsRequest>) -> Result<Batches, Status> {
        let counters = &self.pipeline.counters;
        let q = Query::check(request.get_ref()).map_err(|(why, s)| {
            counters.add_refused(why);
            s
        })?;
        let slot =
            self.streams.open(ClientKey::of(&request)).inspect_err(|_| counters.add_refused(Refusal::OverLimit))?;
        let (tx, rx) = mpsc::channel(CLIENT_BUFFER / READ_CHUNK);
        tokio::spawn(run_query(self.pipeline.clone(), self.encodings.clone(), q, tx, slot));
        Ok(Batches::new(rx))
    }
}

fn ns_of(t: &Option<prost_types::Timestamp>) -> Option<u64> {
    t.as_ref().map(weft_flow::time::ns_of)
}

/// What weft's own client asks for in `GetFlowsRequest.extensions`; `None`
/// for other clients (which do not understand weft's additions: the
/// connection link in `Flow.extensions`, its loss source, resuming).
pub fn weft_client(req: &GetFlowsRequest) -> Result<Option<WeftClient>, Status> {
    let Some(a) = req.extensions.as_ref().filter(|a| a.type_url.ends_with("/weft.WeftClient")) else {
        return Ok(None);
    };
    WeftClient::decode(a.value.as_slice())
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("extensions: not a weft.WeftClient: {e}")))
}

/// A GetFlowsRequest, checked and ready to run.
pub struct Query {
    filters: FilterSet,
    since: Option<u64>,
    until: Option<u64>,
    number: u64,
    follow: bool,
    first: bool,
    with_link: bool,
    /// The uuid of the flow to resume after.
    resume_after: Option<String>,
}

impl Query {
    /// Checks a request: what a client may not ask is InvalidArgument.
    pub fn new(req: &GetFlowsRequest) -> Result<Query, Status> {
        Query::check(req).map_err(|(_, s)| s)
    }

    /// [`Query::new`], saying why a refused request was refused.
    fn check(req: &GetFlowsRequest) -> Result<Query, (Refusal, Status)> {
        let invalid = |e: String| (Refusal::Invalid, Status::invalid_argument(e));
        if req.first && req.follow {
            return Err(invalid("first cannot be combined with follow".into()));
        }
        check_bounds(&req.whitelist, &req.blacklist)
            .map_err(|e| (Refusal::OverLimit, Status::invalid_argument(e.to_string())))?;
        let filters = FilterSet::compile(&req.whitelist, &req.blacklist).map_err(|e| {
            let why = if e.error.over_limit() { Refusal::OverLimit } else { Refusal::Invalid };
            (why, Status::invalid_argument(e.to_string()))
        })?;
        let weft = weft_client(req).map_err(|s| (Refusal::Invalid, s))?;
        Ok(Query {
            filters,
            since: ns_of(&req.since),
            until: ns_of(&req.until),
            number: req.number,
            follow: req.follow,
            first: req.first,
            with_link: weft.is_some(),
            resume_after: weft.map(|w| w.resume_after).filter(|u| !u.is_empty()),
        })
    }

    fn start(&self, p: &Pipeline, env: &Env<'_>) -> u64 {
        let store = &p.store;
        if let Some(u) = &self.resume_after {
            // After the flow the client last got; a flow of an earlier agent
            // process: from this one's first. Positions the store no longer
            // holds become a loss notice when read.
            return convert::seq_of_uuid(env.boot_id, u).map_or(0, |seq| seq.saturating_add(1).min(store.end()));
        }
        if self.first && self.since.is_none() {
            return store.start();
        }
        if self.follow && self.number == 0 && self.since.is_none() {
            return store.end();
        }
        let count = (self.number != 0 && self.number != u64::MAX).then_some(self.number);
        store.find_back(count, |seq, e| match e {
            Entry::Lost(_) => Some(false),
            Entry::Flow(f) if self.since.is_some_and(|s| f.time_ns < s) => None,
            Entry::Flow(f) => Some(self.filters.matches(env, seq, f)),
        })
    }
}

fn response(node: &str, time_ns: u64, r: ResponseTypes) -> GetFlowsResponse {
    GetFlowsResponse { response_types: Some(r), node_name: node.to_owned(), time: Some(timestamp(time_ns)) }
}

/// What a chunk of store entries sends, in order.
enum Out {
    Lost(Encoded),
    /// The flow at this index of the chunk's matching flows.
    Flow(usize),
}

/// Runs one GetFlows query, sending responses until it is complete or the
/// client goes away; its stream slot is given back then.
async fn run_query(
    p: Arc<Pipeline>,
    encodings: Arc<SharedEncodings>,
    q: Query,
    tx: mpsc::Sender<Vec<Result<Encoded, Status>>>,
    _slot: StreamSlot,
) {
    let names = p.names();
    let boot_id = p.boot_id;
    let env = Env { boot_id, names: &names };
    let mut writer = FlowWriter::new(Context::new(names.clone(), boot_id, q.with_link));
    let mut pos = q.start(&p, &env);
    // Without follow the query ends at what the store held when it arrived.
    let end = (!q.follow).then(|| p.store.end());
    let mut sent = 0u64;
    let mut buf = Vec::with_capacity(READ_CHUNK);
    let gathered = Arc::new(tokio::sync::Notify::new());
    // Withdraws the follower's wait however the query ends.
    let _forget = Forget(&p, &gathered);
    loop {
        let notified = p.store.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        buf.clear();
        let limit = end.map_or(READ_CHUNK, |e| (e.saturating_sub(pos) as usize).min(READ_CHUNK));
        let read = p.store.read(pos, limit, &mut buf);
        pos = read.next;
        if !Arc::ptr_eq(&writer.ctx.names, &p.names()) {
            writer = FlowWriter::new(Context::new(p.names(), boot_id, q.with_link));
        }
        let names = writer.ctx.names.clone();
        let node = &names.node_name;
        let lost = |l: &Lost| {
            Encoded::of(&response(node, l.time_ns, ResponseTypes::LostEvents(convert::to_lost(l, q.with_link))))
        };
        let mut outs = Vec::with_capacity(buf.len() + 1);
        if read.missed > 0 {
            let l = Lost { source: LostSource::FlowStore, count: read.missed, cpu: None, time_ns: now_ns() };
            p.counters.add_lost(LostSource::FlowStore, read.missed);
            outs.push(Out::Lost(lost(&l)));
        }
        // Filters first: only what this query sends is converted.
        let (mut seqs, mut flows) = (Vec::with_capacity(buf.len()), Vec::with_capacity(buf.len()));
        let mut done = false;
        for (seq, e) in &buf {
            match e {
                Entry::Lost(l) => outs.push(Out::Lost(lost(l))),
                Entry::Flow(f) => {
                    if q.until.is_some_and(|u| f.time_ns > u) {
                        done = true;
                        break;
                    }
                    if q.since.is_some_and(|s| f.time_ns < s) || !q.filters.matches(&env, *seq, f) {
                        continue;
                    }
                    sent += 1;
                    outs.push(Out::Flow(flows.len()));
                    seqs.push(*seq);
                    flows.push(f);
                    if !q.follow && q.number != 0 && sent >= q.number {
                        done = true;
                        break;
                    }
                }
            }
        }
        let encoded = encodings
            .get_or_encode(&names, q.with_link, &seqs, |i, out| writer.write_flow_response(seqs[i], flows[i], out));
        let batch: Vec<Result<Encoded, Status>> = outs
            .into_iter()
            .map(|o| match o {
                Out::Lost(e) => Ok(e),
                Out::Flow(i) => Ok(encoded[i].clone()),
            })
            .collect();
        if !batch.is_empty() && tx.send(batch).await.is_err() {
            return;
        }
        if done || end.is_some_and(|e| pos >= e) {
            return;
        }
        if read.next == p.store.end() {
            if !q.follow {
                return;
            }
            // Caught up: wait for the next flow, then gather.
            tokio::select! {
                _ = &mut notified => {}
                _ = tx.closed() => return,
            }
            p.store.wake_at(pos + follow_room(p.store.capacity()), &gathered);
            tokio::select! {
                _ = gathered.notified() => {}
                _ = tokio::time::sleep(FOLLOW_GATHER) => p.store.forget(&gathered),
                _ = tx.closed() => return,
            }
        }
    }
}

/// Withdraws a follower's [`FlowStore::wake_at`](crate::pipeline::store::FlowStore::wake_at)
/// wait when its query ends.
struct Forget<'a>(&'a Pipeline, &'a Arc<tokio::sync::Notify>);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.store.forget(self.1);
    }
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<GetFlowsResponse, Status>> + Send>>;
type AgentEventStream = Pin<Box<dyn Stream<Item = Result<obs::GetAgentEventsResponse, Status>> + Send>>;
type DebugEventStream = Pin<Box<dyn Stream<Item = Result<obs::GetDebugEventsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Observer for ObserverService {
    type GetFlowsStream = FlowStream;
    type GetAgentEventsStream = AgentEventStream;
    type GetDebugEventsStream = DebugEventStream;

    /// The typed form, for callers of the trait; the server itself sends
    /// the encoded bytes ([`FlowApi`]).
    async fn get_flows(&self, request: Request<GetFlowsRequest>) -> Result<Response<FlowStream>, Status> {
        let decode = |r: Result<Encoded, Status>| {
            r.and_then(|e| {
                GetFlowsResponse::decode(e.bytes())
                    .map_err(|e| Status::internal(format!("re-decoding a response: {e}")))
            })
        };
        Ok(Response::new(Box::pin(self.open_flows(request)?.map(decode))))
    }

    async fn get_agent_events(
        &self,
        _: Request<obs::GetAgentEventsRequest>,
    ) -> Result<Response<AgentEventStream>, Status> {
        Err(Status::unimplemented("weft does not stream agent events; see `weft status` for the agent's state"))
    }

    async fn get_debug_events(
        &self,
        _: Request<obs::GetDebugEventsRequest>,
    ) -> Result<Response<DebugEventStream>, Status> {
        Err(Status::unimplemented("weft's datapath has no debug events"))
    }

    async fn get_nodes(&self, _: Request<obs::GetNodesRequest>) -> Result<Response<obs::GetNodesResponse>, Status> {
        let st = self.pipeline.store.stats(now_ns() / 1_000_000_000);
        let node = obs::Node {
            name: self.pipeline.names().node_name.clone(),
            version: VERSION.into(),
            address: self.address.clone(),
            state: proto::relay::NodeState::NodeConnected as i32,
            tls: Some(obs::Tls { enabled: self.tls, server_name: String::new() }),
            uptime_ns: self.started.elapsed().as_nanos() as u64,
            num_flows: st.num_flows,
            max_flows: st.max_flows,
            seen_flows: st.seen_flows,
        };
        Ok(Response::new(obs::GetNodesResponse { nodes: vec![node] }))
    }

    async fn get_namespaces(
        &self,
        _: Request<obs::GetNamespacesRequest>,
    ) -> Result<Response<obs::GetNamespacesResponse>, Status> {
        let mut seen = std::collections::BTreeSet::new();
        self.pipeline.store.for_each(|e| {
            if let Entry::Flow(f) = e {
                for ep in [&f.src, &f.dst].into_iter().flatten() {
                    if !ep.namespace.is_empty() && !seen.contains(&ep.namespace) {
                        seen.insert(ep.namespace.clone());
                    }
                }
            }
        });
        let cluster = self.pipeline.names().cluster.clone();
        let namespaces =
            seen.into_iter().map(|namespace| obs::Namespace { cluster: cluster.clone(), namespace }).collect();
        Ok(Response::new(obs::GetNamespacesResponse { namespaces }))
    }

    async fn server_status(
        &self,
        _: Request<obs::ServerStatusRequest>,
    ) -> Result<Response<obs::ServerStatusResponse>, Status> {
        let st = self.pipeline.store.stats(now_ns() / 1_000_000_000);
        Ok(Response::new(obs::ServerStatusResponse {
            num_flows: st.num_flows,
            max_flows: st.max_flows,
            seen_flows: st.seen_flows,
            uptime_ns: self.started.elapsed().as_nanos() as u64,
            version: VERSION.into(),
            flows_rate: st.rate,
            ..Default::default()
        }))
    }
}

/// Where the flow API listens.
#[derive(Clone, Debug, Default)]
pub struct Listen {
    pub tcp: Option<SocketAddr>,
    pub unix: Option<PathBuf>,
    /// TLS on the TCP listener, read again as it is renewed (the unix
    /// socket stays plaintext: its file permissions guard it).
    pub tls: Option<TlsSource>,
    /// GetFlows streams open at once.
    pub limits: StreamLimits,
    /// Who may connect to the unix socket.
    pub access: weft_flow::socket::Access,
    /// The nodes the Peer service announces; None: no Peer service.
    pub peers: Option<tokio::sync::watch::Receiver<super::peer::PeerList>>,
}

/// The gRPC path of GetFlows, which [`FlowApi`] serves itself.
const GET_FLOWS_PATH: &str = "/observer.Observer/GetFlows";

/// The Observer service as the server runs it: GetFlows sends responses
/// encoded once ([`FlowCodec`]; the generated service would encode each
/// flow again for every stream), the other methods go to the generated
/// service. Too-large requests are counted: tonic refuses a request over
/// [`MAX_REQUEST_BYTES`] with OUT_OF_RANGE before the handler sees it (the
/// handler itself never answers OUT_OF_RANGE), so the refusal is counted
/// here, from the response's headers.
#[derive(Clone)]
struct FlowApi<S> {
    inner: S,
    service: ObserverService,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for FlowApi<S> {
    const NAME: &'static str = S::NAME;
}

/// GetFlows as a streaming service of encoded responses.
struct SendEncoded(ObserverService);

impl tonic::server::ServerStreamingService<GetFlowsRequest> for SendEncoded {
    type Response = Encoded;
    type ResponseStream = Batches;
    type Future = tonic::codegen::BoxFuture<Response<Batches>, Status>;

    fn call(&mut self, request: Request<GetFlowsRequest>) -> Self::Future {
        let opened = self.0.open_flows(request).map(Response::new);
        Box::pin(std::future::ready(opened))
    }
}

fn count_too_large(pipeline: &Pipeline, resp: &tonic::codegen::http::Response<tonic::body::Body>) {
    // gRPC's OUT_OF_RANGE, as the status header spells it.
    if resp.headers().get("grpc-status").is_some_and(|v| v.as_bytes() == b"11") {
        pipeline.counters.add_refused(Refusal::OverLimit);
    }
}

impl<S, B> tonic::codegen::Service<tonic::codegen::http::Request<B>> for FlowApi<S>
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<B>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
        >,
    S::Future: Send + 'static,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tonic::codegen::BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        let service = self.service.clone();
        if req.uri().path() == GET_FLOWS_PATH {
            return Box::pin(async move {
                let mut grpc =
                    tonic::server::Grpc::new(FlowCodec).apply_max_message_size_config(Some(MAX_REQUEST_BYTES), None);
                let pipeline = service.pipeline.clone();
                let resp = grpc.server_streaming(SendEncoded(service), req).await;
                count_too_large(&pipeline, &resp);
                Ok(resp)
            });
        }
        let answer = self.inner.call(req);
        Box::pin(async move {
            let resp = answer.await?;
            count_too_large(&service.pipeline, &resp);
            Ok(resp)
        })
    }
}

/// Serves the flow API (with health and reflection) until the process ends.
pub async fn serve(pipeline: Arc<Pipeline>, listen: Listen) -> anyhow::Result<()> {
    let address = listen.tcp.map(|a| a.to_string()).unwrap_or_default();
    let mut svc = ObserverService::with_limits(pipeline, address, listen.limits);
    svc.tls = listen.tls.is_some();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<ObserverServer<ObserverService>>().await;
    reporter.set_service_status(HEALTH_SERVICE, tonic_health::ServingStatus::Serving).await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let router = |b: tonic::transport::Server| {
        b.http2_keepalive_interval(Some(Duration::from_secs(30)))
            .max_concurrent_streams(STREAMS_PER_CONNECTION)
            .add_service(FlowApi {
                inner: ObserverServer::new(svc.clone()).max_decoding_message_size(MAX_REQUEST_BYTES),
                service: svc.clone(),
            })
            .add_service(health.clone())
            .add_service(reflection.clone())
            .add_optional_service(listen.peers.clone().map(PeerService::new))
    };
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = listen.tcp {
        let incoming = tokio::net::TcpListener::bind(addr).await?;
        let r = router(tonic::transport::Server::builder());
        match listen.tls {
            Some(source) => {
                let incoming = super::tls::incoming(incoming, source)?;
                tasks.spawn(async move { r.serve_with_incoming(incoming).await });
            }
            None => {
                tasks.spawn(async move {
                    r.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(incoming)).await
                });
            }
        }
    }
    if let Some(path) = listen.unix {
        let incoming = listen.access.bind(&path)?;
        let r = router(tonic::transport::Server::builder());
        // Old clients name the socket as the authority: see `authority`.
        let incoming = tokio_stream::StreamExt::map(tokio_stream::wrappers::UnixListenerStream::new(incoming), |c| {
            c.map(super::authority::AnyAuthority::new)
        });
        tasks.spawn(async move { r.serve_with_incoming(incoming).await });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tonic::server::NamedService;

    use super::*;

    #[test]
    fn get_flows_is_routed_by_its_generated_path() {
        assert_eq!(GET_FLOWS_PATH, format!("/{}/GetFlows", ObserverServer::<ObserverService>::NAME));
    }

    #[test]
    fn a_follower_reads_when_a_quarter_of_the_store_has_arrived() {
        assert_eq!(follow_room(4095), 1023);
        assert_eq!(follow_room(1), 1, "a store of one: one entry");
    }

    /// Flows stored one at a time, a (paused-clock) millisecond apart, reach
    /// a follower a gathering at a time: one batch (so one frame and one
    /// write) per [`FOLLOW_GATHER`], not one per flow. Counts batches, not
    /// time: the clock only moves when the test moves it.
    #[tokio::test(start_paused = true)]
    async fn a_follower_sends_the_flows_stored_while_it_gathers_together() {
        use weft_ebpf::abi::{self, Event};

        use crate::pipeline::{PipelineConfig, enrich::Names};
        let (p, mut feed) = Pipeline::start(PipelineConfig::default(), Names::new("node-a"));
        let q = Query::new(&GetFlowsRequest { follow: true, ..Default::default() }).unwrap();
        let slot = Arc::new(OpenStreams::default()).open(ClientKey::Unknown).unwrap();
        let (tx, mut rx) = mpsc::channel(CLIENT_BUFFER / READ_CHUNK);
        tokio::spawn(run_query(p.clone(), Arc::default(), q, tx, slot));
        tokio::task::yield_now().await;
        let flows = 100u64;
        let (mut batches, mut got) = (0u64, 0u64);
        // The follower sees what the flows thread (a real thread, in real
        // time) stored and notified; then a millisecond passes. Returns the
        // batches and flows the follower sent meanwhile.
        async fn step(rx: &mut mpsc::Receiver<Vec<Result<Encoded, Status>>>) -> (u64, u64) {
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
            tokio::time::advance(Duration::from_millis(1)).await;
            let (mut batches, mut flows) = (0, 0);
            while let Ok(b) = rx.try_recv() {
                batches += 1;
                flows += b.len() as u64;
            }
            (batches, flows)
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        for i in 0..flows {
            let ev = Event {
                r#type: abi::EV_TRACE as u8,
                subtype: abi::OBS_TO_ENDPOINT as u8,
                proto: 6,
                sport: (1000 + i as u16).to_be(),
                ..Default::default()
            };
            feed.push(&ev);
            feed.flush();
            while p.store.seen() <= i {
                assert!(std::time::Instant::now() < deadline, "flow {i} was not stored");
                std::thread::sleep(Duration::from_millis(1));
            }
            let (b, f) = step(&mut rx).await;
            (batches, got) = (batches + b, got + f);
        }
        // The last gathering (its notice may come a little later in real time).
        while got < flows && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            let (b, f) = step(&mut rx).await;
            (batches, got) = (batches + b, got + f);
        }
        p.stop();
        assert_eq!(got, flows);
        // 100 ms of flows in gatherings of 10 ms: about 10 batches (one per
        // flow, 100, without the gathering).
        assert!(batches <= flows / 10 + 2, "{batches} batches for {flows} flows");
    }
}
