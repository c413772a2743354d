//! The flow API: Hubble's `observer.Observer` gRPC service over the flow
//! store, so `weft observe`, the `hubble` CLI, Hubble Relay and Hubble UI can
//! read it; with gRPC health (`hubble.server.Observer`) and reflection.
//!
//! GetFlows follows the reference semantics: the start point is found by
//! walking back from the newest flow (or at the oldest with `first`, or at
//! "now" for a plain follow), then flows are sent oldest first; loss notices
//! ignore filters and the time window. A slow client only falls behind in the
//! ring (and is told what it missed); it never holds the pipeline up.

use std::{
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};

use prost::Message;
use weft_flow::{
    client::error_chain,
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

use super::{
    convert::{self, Context},
    filter::{Env, FilterSet},
};
use crate::pipeline::{
    Pipeline,
    record::{Entry, Lost, LostSource},
};

/// The version string the flow API reports.
pub const VERSION: &str = concat!("weft ", env!("CARGO_PKG_VERSION"));

/// Entries copied out of the store per lock.
const READ_CHUNK: usize = 256;
/// Responses buffered per client before the reader waits for it.
const CLIENT_BUFFER: usize = 256;

/// See the module doc.
#[derive(Clone)]
pub struct ObserverService {
    pipeline: Arc<Pipeline>,
    started: Instant,
    /// The address clients use, for GetNodes.
    address: String,
    /// Whether the TCP listener speaks TLS, for GetNodes.
    tls: bool,
}

impl ObserverService {
    pub fn new(pipeline: Arc<Pipeline>, address: String) -> Self {
        Self { pipeline, started: Instant::now(), address, tls: false }
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
        if req.first && req.follow {
            return Err(Status::invalid_argument("first cannot be combined with follow"));
        }
        let filters =
            FilterSet::compile(&req.whitelist, &req.blacklist).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let weft = weft_client(req)?;
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

/// Runs one GetFlows query, sending responses until it is complete or the
/// client goes away.
async fn run_query(p: Arc<Pipeline>, q: Query, tx: mpsc::Sender<Result<GetFlowsResponse, Status>>) {
    let names = p.names();
    let (boot_id, node) = (p.boot_id, names.node_name.clone());
    let labels = names.node_labels.clone();
    let cluster = names.cluster.clone();
    let env = Env { boot_id, node_name: &node, node_labels: &labels, cluster: &cluster };
    let mut ctx = Context::new(names.clone(), boot_id, q.with_link);
    let mut pos = q.start(&p, &env);
    // Without follow the query ends at what the store held when it arrived.
    let end = (!q.follow).then(|| p.store.end());
    let mut sent = 0u64;
    let mut buf = Vec::with_capacity(READ_CHUNK);
    loop {
        let notified = p.store.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        buf.clear();
        let limit = end.map_or(READ_CHUNK, |e| (e.saturating_sub(pos) as usize).min(READ_CHUNK));
        let read = p.store.read(pos, limit, &mut buf);
        pos = read.next;
        if read.missed > 0 {
            let lost = Lost { source: LostSource::FlowStore, count: read.missed, cpu: None, time_ns: now_ns() };
            p.counters.add_lost(LostSource::FlowStore, read.missed);
            let r = response(&node, lost.time_ns, ResponseTypes::LostEvents(convert::to_lost(&lost, q.with_link)));
            if tx.send(Ok(r)).await.is_err() {
                return;
            }
        }
        if !Arc::ptr_eq(&ctx.names, &p.names()) {
            ctx = Context::new(p.names(), boot_id, q.with_link);
        }
        for (seq, e) in buf.drain(..) {
            let r = match &e {
                Entry::Lost(l) => {
                    response(&node, l.time_ns, ResponseTypes::LostEvents(convert::to_lost(l, q.with_link)))
                }
                Entry::Flow(f) => {
                    if q.until.is_some_and(|u| f.time_ns > u) {
                        return;
                    }
                    if q.since.is_some_and(|s| f.time_ns < s) || !q.filters.matches(&env, seq, f) {
                        continue;
                    }
                    sent += 1;
                    response(&node, f.time_ns, ResponseTypes::Flow(convert::to_flow(&ctx, seq, f)))
                }
            };
            if tx.send(Ok(r)).await.is_err() {
                return;
            }
            if !q.follow && q.number != 0 && sent >= q.number {
                return;
            }
        }
        if end.is_some_and(|e| pos >= e) {
            return;
        }
        if read.next == p.store.end() {
            if !q.follow {
                return;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tx.closed() => return,
            }
        }
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

    async fn get_flows(&self, request: Request<GetFlowsRequest>) -> Result<Response<FlowStream>, Status> {
        let q = Query::new(request.get_ref())?;
        let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
        tokio::spawn(run_query(self.pipeline.clone(), q, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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
    /// TLS on the TCP listener (the unix socket stays plaintext: its file
    /// permissions guard it).
    pub tls: Option<Tls>,
}

/// The flow API's TLS: its certificate and key (PEM), and when set, the CA
/// client certificates must chain to (mutual TLS).
#[derive(Clone, Debug)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

/// A certificate, key or CA the flow API's TLS cannot use (the message has
/// the TLS library's causes).
#[derive(Debug, thiserror::Error)]
#[error("{}", error_chain(.0))]
pub struct TlsError(pub tonic::transport::Error);

impl Tls {
    /// Parses the certificate, key and CA as the server will; the error says
    /// what is wrong with them.
    pub fn check(&self) -> Result<(), TlsError> {
        tonic::transport::Server::builder().tls_config(self.server_config()).map(|_| ()).map_err(TlsError)
    }

    fn server_config(&self) -> tonic::transport::ServerTlsConfig {
        let mut c = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&self.cert_pem, &self.key_pem));
        if let Some(ca) = &self.client_ca_pem {
            c = c.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        c
    }
}

/// Serves the flow API (with health and reflection) until the process ends.
pub async fn serve(pipeline: Arc<Pipeline>, listen: Listen) -> anyhow::Result<()> {
    let address = listen.tcp.map(|a| a.to_string()).unwrap_or_default();
    let mut svc = ObserverService::new(pipeline, address);
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
            .add_service(ObserverServer::new(svc.clone()).max_decoding_message_size(16 << 20))
            .add_service(health.clone())
            .add_service(reflection.clone())
    };
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(addr) = listen.tcp {
        let incoming = tokio::net::TcpListener::bind(addr).await?;
        let builder = match &listen.tls {
            Some(tls) => tonic::transport::Server::builder().tls_config(tls.server_config())?,
            None => tonic::transport::Server::builder(),
        };
        let r = router(builder);
        tasks.spawn(
            async move { r.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(incoming)).await },
        );
    }
    if let Some(path) = listen.unix {
        let _ = std::fs::remove_file(&path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let incoming = tokio::net::UnixListener::bind(&path)?;
        let r = router(tonic::transport::Server::builder());
        tasks.spawn(
            async move { r.serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(incoming)).await },
        );
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(())
}
