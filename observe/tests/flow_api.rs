//! The flow API end to end in one process: a pipeline fed with datapath
//! records and access-log entries, the gRPC server on a unix socket, and a
//! client built from the project's .proto files (the descriptors themselves are
//! checked against the wire contract in observe/flow/tests).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use weft_ebpf::abi::{self, Event};
use weft_flow::{
    client::{self, Address},
    proto::{
        self,
        flow::{self, FlowFilter, LostEventSource, Verdict},
        observer::{GetFlowsRequest, GetFlowsResponse, ServerStatusRequest, get_flows_response::ResponseTypes},
        weft::FlowLink,
    },
};
use weft_observe::{
    api::server::{self, Listen, StreamLimits},
    pipeline::{
        EventFeed, Pipeline, PipelineConfig, Refusal,
        enrich::Names,
        record::{EndpointInfo, Http, L7Entry, LostSource, ServiceInfo},
    },
};

// ------------------------------------------------------------------ the lab

const CLIENT: [u8; 4] = [10, 1, 1, 10];
const SERVER: [u8; 4] = [10, 1, 2, 20];
const VIP: [u8; 4] = [10, 96, 0, 10];

fn raw(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

fn names() -> Names {
    let mut n = Names::new("node-a");
    n.add_endpoint(
        CLIENT.into(),
        EndpointInfo {
            namespace: "shop".into(),
            pod: "frontend-1".into(),
            labels: vec!["k8s:app=frontend".into()],
            workloads: vec![("Deployment".into(), "frontend".into())],
            identity: 70001,
            node: "node-a".into(),
            local: true,
        },
    );
    n.add_endpoint(
        SERVER.into(),
        EndpointInfo {
            namespace: "shop".into(),
            pod: "cart-1".into(),
            labels: vec!["k8s:app=cart".into()],
            identity: 70002,
            node: "node-a".into(),
            local: true,
            ..Default::default()
        },
    );
    n.add_service(VIP.into(), 80, 6, Arc::new(ServiceInfo { namespace: "shop".into(), name: "cart".into() }));
    n
}

fn trace(obs: u32, sport: u16, flags: u8) -> Event {
    Event {
        ts_ns: 1,
        r#type: abi::EV_TRACE as u8,
        subtype: obs as u8,
        reason: abi::REASON_NEW as u8,
        saddr: raw(CLIENT),
        daddr: raw(SERVER),
        sport: sport.to_be(),
        dport: 8080u16.to_be(),
        proto: 6,
        tcp_flags: flags,
        src_identity: 70001,
        dst_identity: 70002,
        ..Default::default()
    }
}

fn drop_ev(sport: u16) -> Event {
    Event {
        r#type: abi::EV_DROP as u8,
        subtype: abi::DROP_POLICY_DENIED as u8,
        ..trace(abi::OBS_TO_ENDPOINT, sport, 0x02)
    }
}

fn redirect(sport: u16) -> Event {
    Event { daddr: raw(VIP), dport: 80u16.to_be(), proxy_port: 15001, ..trace(abi::OBS_TO_PROXY, sport, 0x02) }
}

struct Api {
    pipeline: Arc<Pipeline>,
    feed: EventFeed,
    addr: Address,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start(cfg: PipelineConfig) -> Api {
    start_with(cfg, StreamLimits::default()).await
}

async fn start_with(cfg: PipelineConfig, limits: StreamLimits) -> Api {
    let dir = std::env::temp_dir().join(format!("weft-flow-api-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("observer.sock");
    let (pipeline, feed) = Pipeline::start(cfg, names());
    let listen =
        Listen { tcp: None, unix: Some(sock.clone()), tls: None, limits, access: Default::default(), peers: None };
    tokio::spawn(server::serve(pipeline.clone(), listen));
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Api { pipeline, feed, addr: Address::Unix(sock), _dir: TempDir(dir) }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
}

impl Drop for Api {
    fn drop(&mut self) {
        self.pipeline.stop();
    }
}

/// Waits until the store has seen `n` flows.
async fn stored(p: &Pipeline, n: u64) {
    for _ in 0..200 {
        if p.store.stats(0).seen_flows >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the store saw {} flows, expected {n}", p.store.stats(0).seen_flows);
}

/// How long a query's stream may go without a response before the test
/// calls it stalled. Generous: the first response of a query waits for its
/// scan back through the store, and a query with as many regular
/// expressions as a request may hold takes 0.8 s for 2,700 flows in a debug
/// build on an idle machine (3.3 s under load; the 5 s it had was not
/// enough at load 13): a stall is a stream that stops, not a slow one.
const STALLED: Duration = Duration::from_secs(60);

async fn get(addr: &Address, req: GetFlowsRequest) -> Vec<GetFlowsResponse> {
    let mut c = client::observer(addr).await.unwrap();
    let mut s = c.get_flows(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(r) = tokio::time::timeout(STALLED, s.message()).await.expect("stream stalled").unwrap() {
        out.push(r);
    }
    out
}

fn flows(rs: &[GetFlowsResponse]) -> Vec<&flow::Flow> {
    rs.iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::Flow(f)) => Some(f),
            _ => None,
        })
        .collect()
}

fn sport(f: &flow::Flow) -> u32 {
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(flow::layer4::Protocol::Tcp(t)) => t.source_port,
        _ => 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_flows_number_first_filters_and_status() {
    let mut api = start(PipelineConfig::default()).await;
    for i in 0..10u16 {
        api.feed.push(&trace(abi::OBS_TO_ENDPOINT, 40000 + i, 0x02));
    }
    api.feed.push(&drop_ev(41000));
    api.feed.flush();
    stored(&api.pipeline, 11).await;

    // --last 3: the newest three, oldest first.
    let r = get(&api.addr, GetFlowsRequest { number: 3, ..Default::default() }).await;
    let ports: Vec<u32> = flows(&r).iter().map(|f| sport(f)).collect();
    assert_eq!(ports, [40008, 40009, 41000]);
    // --first 2.
    let r = get(&api.addr, GetFlowsRequest { number: 2, first: true, ..Default::default() }).await;
    assert_eq!(flows(&r).iter().map(|f| sport(f)).collect::<Vec<_>>(), [40000, 40001]);
    // --last 2 of the forwarded ones, and the drop alone.
    let fwd = FlowFilter { verdict: vec![Verdict::Forwarded as i32], ..Default::default() };
    let r = get(&api.addr, GetFlowsRequest { number: 2, whitelist: vec![fwd.clone()], ..Default::default() }).await;
    assert_eq!(flows(&r).iter().map(|f| sport(f)).collect::<Vec<_>>(), [40008, 40009]);
    let r = get(&api.addr, GetFlowsRequest { number: 20, blacklist: vec![fwd], ..Default::default() }).await;
    let f = flows(&r);
    assert_eq!(f.len(), 1);
    let d = f[0];
    assert_eq!(d.verdict, Verdict::Dropped as i32);
    assert_eq!(d.drop_reason_desc, flow::DropReason::PolicyDenied as i32);
    assert_eq!(d.event_type, Some(flow::CiliumEventType { r#type: 1, sub_type: 133 }));
    assert_eq!(d.source.as_ref().unwrap().pod_name, "frontend-1");
    assert_eq!(d.source.as_ref().unwrap().workloads[0].name, "frontend");
    assert_eq!(d.destination.as_ref().unwrap().pod_name, "cart-1");
    assert_eq!(d.node_name, "node-a");
    assert_eq!(r[0].node_name, "node-a");
    // A trace to an endpoint: sub_type 0, observation point TO_ENDPOINT (101).
    let r = get(&api.addr, GetFlowsRequest { number: 1, first: true, ..Default::default() }).await;
    let t = flows(&r)[0];
    assert_eq!(t.event_type, Some(flow::CiliumEventType { r#type: 4, sub_type: 0 }));
    assert_eq!(t.trace_observation_point, flow::TraceObservationPoint::ToEndpoint as i32);
    assert_eq!(t.is_reply, Some(false));
    #[allow(deprecated)]
    let summary = &t.summary;
    assert_eq!(summary, "TCP Flags: SYN");
    assert_eq!(t.uuid.len(), 36);
    // Bad requests are refused with the field named.
    let mut c = client::observer(&api.addr).await.unwrap();
    let bad = FlowFilter { source_ip: vec!["10.0.0.0/99".into()], ..Default::default() };
    let e = c.get_flows(GetFlowsRequest { whitelist: vec![bad], ..Default::default() }).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("source_ip"), "{}", e.message());
    let e = c.get_flows(GetFlowsRequest { first: true, follow: true, ..Default::default() }).await.err().unwrap();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    // ServerStatus.
    let st = c.server_status(ServerStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((st.num_flows, st.max_flows, st.seen_flows), (11, 4095, 11));
    assert!(st.version.starts_with("weft "));
    // Health for `hubble status`.
    let ch = client::channel(&api.addr).await.unwrap();
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    let resp = h.check(tonic_health::pb::HealthCheckRequest { service: proto::HEALTH_SERVICE.into() }).await.unwrap();
    assert_eq!(resp.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_flows_carry_their_connections_verdict() {
    let mut api = start(PipelineConfig::default()).await;
    // The client's connection to the Service was redirected to the proxy;
    // the proxy's connection to the backend was delivered.
    api.feed.push(&Event { subtype: abi::OBS_FROM_ENDPOINT as u8, proxy_port: 0, ..redirect(45000) });
    api.feed.push(&redirect(45000));
    api.feed.push(&Event {
        saddr: raw([192, 168, 50, 1]),
        sport: 50000u16.to_be(),
        src_identity: 1,
        ..trace(abi::OBS_TO_ENDPOINT, 0, 0x02)
    });
    api.feed.flush();
    stored(&api.pipeline, 3).await;
    api.pipeline.submit_l7(L7Entry {
        http: Http {
            method: "GET".into(),
            authority: "cart.shop".into(),
            path: "/items?page=2".into(),
            protocol: "HTTP/1.1",
            code: 503,
            start_ns: 1_700_000_000_000_000_000,
            duration_ns: 12_000_000,
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            upstream: Some(SocketAddrV4::new(SERVER.into(), 8080)),
            upstream_local: Some(SocketAddrV4::new(Ipv4Addr::new(192, 168, 50, 1), 50000)),
            ..Default::default()
        },
        client: Some(SocketAddrV4::new(CLIENT.into(), 45000)),
        // As Envoy reports it: its loopback listener on the proxy port.
        server: Some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001)),
    });
    stored(&api.pipeline, 5).await;
    let ext = prost_types::Any { type_url: "type.googleapis.com/weft.WeftClient".into(), value: vec![] };
    let l7 = FlowFilter { protocol: vec!["http".into()], ..Default::default() };
    let r = get(
        &api.addr,
        GetFlowsRequest { number: 10, whitelist: vec![l7.clone()], extensions: Some(ext), ..Default::default() },
    )
    .await;
    let f = flows(&r);
    assert_eq!(f.len(), 2, "a request and a response");
    let (req, resp) = (f[0], f[1]);
    assert_eq!(req.l7.as_ref().unwrap().r#type, flow::L7FlowType::Request as i32);
    assert_eq!(resp.l7.as_ref().unwrap().r#type, flow::L7FlowType::Response as i32);
    assert_eq!(resp.l7.as_ref().unwrap().latency_ns, 12_000_000);
    let Some(flow::layer7::Record::Http(h)) = &resp.l7.as_ref().unwrap().record else { panic!() };
    assert_eq!((h.code, h.method.as_str(), h.url.as_str()), (503, "GET", "http://cart.shop/items?page=2"));
    assert_eq!(req.source.as_ref().unwrap().pod_name, "frontend-1");
    assert_eq!(req.destination.as_ref().unwrap().pod_name, "cart-1", "the backend that served it");
    assert_eq!(req.destination_service.as_ref().unwrap().name, "cart");
    assert_eq!(resp.is_reply, Some(true));
    assert_eq!(
        resp.trace_context.as_ref().unwrap().parent.as_ref().unwrap().trace_id,
        "4bf92f3577b34da6a3ce929d0e0e4736"
    );
    let link: FlowLink = prost::Message::decode(resp.extensions.as_ref().unwrap().value.as_slice()).unwrap();
    let down = link.downstream.unwrap();
    assert_eq!(down.verdict, Verdict::Redirected as i32);
    assert_eq!(
        down.path,
        [flow::TraceObservationPoint::FromEndpoint as i32, flow::TraceObservationPoint::ToProxy as i32]
    );
    assert_eq!(down.proxy_port, 15001);
    assert_eq!(down.frontend, "10.96.0.10:80");
    let up = link.upstream.unwrap();
    assert_eq!(up.verdict, Verdict::Forwarded as i32);
    assert_eq!(up.path, [flow::TraceObservationPoint::ToEndpoint as i32]);
    #[allow(deprecated)]
    let summary = &resp.summary;
    assert!(summary.contains("conn from-endpoint > to-proxy:15001 REDIRECTED"), "{summary}");
    // Hubble's own clients do not ask for the link and do not get it.
    let r = get(&api.addr, GetFlowsRequest { number: 10, whitelist: vec![l7], ..Default::default() }).await;
    assert!(flows(&r).iter().all(|f| f.extensions.is_none()));
    // HTTP filters.
    let five =
        FlowFilter { http_status_code: vec!["5+".into()], http_path: vec!["^/items$".into()], ..Default::default() };
    let r = get(&api.addr, GetFlowsRequest { number: 10, whitelist: vec![five], ..Default::default() }).await;
    assert_eq!(flows(&r).len(), 1, "only the response has a status");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_streams_new_matching_flows_and_reports_every_loss() {
    let cfg = PipelineConfig { store_capacity: 64, queue_capacity: 8, ..Default::default() };
    let mut api = start(cfg).await;
    let mut c = client::observer(&api.addr).await.unwrap();
    let drops = FlowFilter { verdict: vec![Verdict::Dropped as i32], ..Default::default() };
    let mut s = c
        .get_flows(GetFlowsRequest { follow: true, whitelist: vec![drops], ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    // Kernel losses: the first reading is the baseline.
    api.pipeline.kernel_counters(100, &[5, 0]);
    api.pipeline.kernel_counters(200, &[5, 7]);
    // 200 records into a queue of 8 without draining: most are lost there.
    for i in 0..200u16 {
        api.feed.push(&if i % 2 == 0 { drop_ev(30000 + i) } else { trace(abi::OBS_TO_ENDPOINT, 30000 + i, 0x02) });
    }
    api.feed.flush();
    let counters = &api.pipeline.counters;
    let (mut dropped, mut kernel_lost, mut queue_lost) = (0u64, 0u64, 0u64);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let flows = counters.flows.load(std::sync::atomic::Ordering::Relaxed);
        let lost = counters.lost(LostSource::AgentQueue);
        if kernel_lost == 7 && queue_lost == lost && flows + lost == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "kernel {kernel_lost}, queue {queue_lost}/{lost}, flows {flows}"
        );
        let Ok(r) = tokio::time::timeout(Duration::from_millis(200), s.message()).await else { continue };
        match r.unwrap().unwrap().response_types.unwrap() {
            ResponseTypes::Flow(f) => {
                assert_eq!(f.verdict, Verdict::Dropped as i32, "only matching flows");
                dropped += 1;
            }
            ResponseTypes::LostEvents(l) if l.source == LostEventSource::PerfEventRingBuffer as i32 => {
                assert_eq!(l.cpu, Some(1), "the CPU that lost them");
                kernel_lost += l.num_events_lost;
            }
            ResponseTypes::LostEvents(l) => {
                assert_eq!(l.source, LostEventSource::ObserverEventsQueue as i32);
                queue_lost += l.num_events_lost;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(queue_lost > 0, "a queue of 8 cannot take 200 records at once");
    // Every drop that was received was streamed.
    let drops = FlowFilter { verdict: vec![Verdict::Dropped as i32], ..Default::default() };
    let all = get(&api.addr, GetFlowsRequest { number: 0, whitelist: vec![drops], ..Default::default() }).await;
    let stored_drops = flows(&all).len() as u64;
    assert!(stored_drops > 0);
    while dropped < stored_drops {
        let r =
            tokio::time::timeout(Duration::from_secs(5), s.message()).await.expect("stream stalled").unwrap().unwrap();
        match r.response_types.unwrap() {
            ResponseTypes::Flow(f) if f.verdict == Verdict::Dropped as i32 => dropped += 1,
            other => panic!("only drops match: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_told_what_the_store_overwrote() {
    let cfg = PipelineConfig { store_capacity: 16, ..Default::default() };
    let mut api = start(cfg).await;
    let mut c = client::observer(&api.addr).await.unwrap();
    let mut s = c.get_flows(GetFlowsRequest { follow: true, ..Default::default() }).await.unwrap().into_inner();
    // Far more than the store and the per-client buffer hold, while the
    // client reads nothing.
    let total = 3000u64;
    for round in 0..30u16 {
        for i in 0..100u16 {
            api.feed.push(&trace(abi::OBS_TO_ENDPOINT, 1000 + round * 100 + i, 0x10));
        }
        api.feed.flush();
        stored(&api.pipeline, (round as u64 + 1) * 100).await;
    }
    let (mut got, mut lost) = (0u64, 0u64);
    while got + lost < total {
        let r =
            tokio::time::timeout(Duration::from_secs(5), s.message()).await.expect("stream stalled").unwrap().unwrap();
        match r.response_types.unwrap() {
            ResponseTypes::Flow(_) => got += 1,
            ResponseTypes::LostEvents(l) => {
                assert_eq!(l.source, LostEventSource::HubbleRingBuffer as i32);
                lost += l.num_events_lost;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got + lost, total);
    assert!(lost > 0, "the store holds 16 flows");
    assert_eq!(api.pipeline.counters.lost(LostSource::FlowStore), lost);
}

// ------------------------------------------------------------------- TLS

/// A CA and a server certificate for 127.0.0.1 and flows.weft.test, and a
/// client certificate, made with the openssl command.
fn certificates(dir: &std::path::Path) {
    let sh = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    sh(&[
        &["req", "-x509"][..],
        &ec,
        &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=weft test CA"],
    ]
    .concat());
    // Extensions make both leaf certificates X.509 v3, which rustls requires.
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:flows.weft.test,IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for who in ["server", "client"] {
        sh(&[
            &["req"][..],
            &ec,
            &["-keyout", &format!("{who}.key"), "-out", &format!("{who}.csr"), "-subj", &format!("/CN={who}")],
        ]
        .concat());
        let mut args =
            vec!["x509", "-req", "-in", &*format!("{who}.csr"), "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial"]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>();
        args.extend(["-out".into(), format!("{who}.crt"), "-days".into(), "2".into()]);
        args.extend(["-extfile".into(), format!("{who}.ext")]);
        sh(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flow_api_speaks_tls_and_can_require_client_certificates() {
    let dir = std::env::temp_dir().join(format!("weft-flow-tls-{}-{}", std::process::id(), rand_suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = TempDir(dir.clone());
    certificates(&dir);
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let (pipeline, mut feed) = Pipeline::start(PipelineConfig::default(), names());
    feed.push(&trace(abi::OBS_TO_ENDPOINT, 40000, 0x02));
    feed.flush();
    stored(&pipeline, 1).await;
    // A free port, for the server to bind.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let tls =
        server::Tls { cert_pem: read("server.crt"), key_pem: read("server.key"), client_ca_pem: Some(read("ca.crt")) };
    let listen = Listen {
        tcp: Some(([127, 0, 0, 1], port).into()),
        unix: None,
        tls: Some(server::TlsSource::fixed(tls)),
        limits: Default::default(),
        access: Default::default(),
        peers: None,
    };
    let served = tokio::spawn(server::serve(pipeline.clone(), listen));
    tokio::time::sleep(Duration::from_millis(200)).await;
    if served.is_finished() {
        panic!("the server stopped: {:?}", served.await);
    }
    let addr = Address::parse(&format!("tls://127.0.0.1:{port}")).unwrap();
    let with = |identity: bool| client::TlsClient {
        ca_pem: Some(read("ca.crt")),
        server_name: Some("flows.weft.test".into()),
        identity: identity.then(|| (read("client.crt"), read("client.key"))),
    };
    // With the CA and a client certificate: flows.
    let mut last = client::observer_tls(&addr, &with(true)).await;
    for _ in 0..50 {
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        last = client::observer_tls(&addr, &with(true)).await;
    }
    let mut c = last.expect("a TLS client with a certificate connects");
    let st = c.server_status(ServerStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.num_flows, 1);
    let nodes = c.get_nodes(proto::observer::GetNodesRequest {}).await.unwrap().into_inner();
    assert_eq!(nodes.nodes[0].tls.as_ref().map(|t| t.enabled), Some(true));
    // Without a client certificate: refused.
    let refused = match client::observer_tls(&addr, &with(false)).await {
        Err(_) => true,
        Ok(mut c) => c.server_status(ServerStatusRequest {}).await.is_err(),
    };
    assert!(refused, "mutual TLS requires the client's certificate");
    // Plaintext against the TLS port: refused.
    let plain = Address::parse(&format!("127.0.0.1:{port}")).unwrap();
    let refused = match client::observer(&plain).await {
        Err(_) => true,
        Ok(mut c) => c.server_status(ServerStatusRequest {}).await.is_err(),
    };
    assert!(refused, "a plaintext client gets nothing");
    pipeline.stop();
}

/// Renewed certificates are served without a restart: the server reads its
/// files again (here every 100 ms), new connections get the new server
/// certificate and must show a client certificate of the new CA; files that
/// do not go together (a certificate without its key, mid-renewal) leave the
/// old ones in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_are_served_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("weft-flow-renew-{}-{}", std::process::id(), rand_suffix()));
    let _cleanup = TempDir(dir.clone());
    let (old, new, live) = (dir.join("old"), dir.join("new"), dir.join("live"));
    for d in [&old, &new, &live] {
        std::fs::create_dir_all(d).unwrap();
    }
    certificates(&old);
    certificates(&new);
    let install = |from: &std::path::Path, files: &[&str]| {
        for f in files {
            std::fs::copy(from.join(f), live.join(format!("{f}.tmp"))).unwrap();
            std::fs::rename(live.join(format!("{f}.tmp")), live.join(f)).unwrap();
        }
    };
    let source = {
        let live = live.clone();
        server::TlsSource {
            load: Arc::new(move || {
                let read = |f: &str| std::fs::read(live.join(f)).map_err(|e| format!("{f}: {e}"));
                Ok(server::Tls {
                    cert_pem: read("server.crt")?,
                    key_pem: read("server.key")?,
                    client_ca_pem: Some(read("ca.crt")?),
                })
            }),
            every: Duration::from_millis(100),
        }
    };
    let (pipeline, _feed) = Pipeline::start(PipelineConfig::default(), names());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = Listen {
        tcp: Some(([127, 0, 0, 1], port).into()),
        unix: None,
        tls: Some(source),
        limits: Default::default(),
        access: Default::default(),
        peers: None,
    };
    let served = tokio::spawn(server::serve(pipeline.clone(), listen));
    let addr = Address::parse(&format!("tls://127.0.0.1:{port}")).unwrap();
    let client = |set: &std::path::Path| {
        let read = |f: &str| std::fs::read(set.join(f)).unwrap();
        client::TlsClient {
            ca_pem: Some(read("ca.crt")),
            server_name: Some("flows.weft.test".into()),
            identity: Some((read("client.crt"), read("client.key"))),
        }
    };
    let works = |set: std::path::PathBuf| {
        let addr = addr.clone();
        async move {
            match client::observer_tls(&addr, &client(&set)).await {
                Ok(mut c) => c.server_status(ServerStatusRequest {}).await.is_ok(),
                Err(_) => false,
            }
        }
    };
    let eventually = |set: std::path::PathBuf, want: bool| async move {
        for _ in 0..100 {
            if works(set.clone()).await == want {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    // Nothing issued yet (an agent that started before the operator wrote
    // its certificate): the server runs and TLS waits for the files.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!works(old.clone()).await, "no certificate yet");
    assert!(!served.is_finished(), "the server waits for its certificates");
    install(&old, &["server.crt", "server.key", "ca.crt"]);
    assert!(eventually(old.clone(), true).await, "the first certificates are served");
    assert!(!works(new.clone()).await, "a client of the next CA is not trusted yet");
    // Half a renewal: the new certificate with the old key does not load.
    install(&new, &["server.crt"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(works(old.clone()).await, "the old certificates stay in use");
    install(&new, &["server.key", "ca.crt"]);
    assert!(eventually(new.clone(), true).await, "the renewed certificates are served");
    assert!(!works(old.clone()).await, "the old CA's clients and certificate are gone");
    assert!(!served.is_finished(), "the same server, not restarted");
    pipeline.stop();
}

// ---------------------------------------------------- queries and the writer

/// Waits (without the store's lock) until the store has seen `n` flows;
/// false after `timeout`.
async fn seen_within(p: &Pipeline, n: u64, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while p.store.seen() < n {
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// Queries never stall the writer. A scan whose filter is as slow as it
/// gets (it does not return until the writer has stored 1,600 more flows)
/// walks a store of four scan chunks while the pipeline takes events through
/// a 64-record queue: with the scan holding the writer's lock, the writer
/// would wait and the queue would overflow; here every flow is stored and
/// nothing is lost. Then real GetFlows queries with many regular
/// expressions run over the store while events keep coming: still no loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_with_slow_filters_never_stall_the_writer() {
    use weft_observe::pipeline::store::SCAN_CHUNK;
    let cfg = PipelineConfig { store_capacity: 100_000, queue_capacity: 64, ..Default::default() };
    let mut api = start(cfg).await;
    let filled = 4 * SCAN_CHUNK as u64;
    for i in 0..filled {
        api.feed.push(&trace(abi::OBS_TO_ENDPOINT, 1000 + i as u16, 0x10));
        if i % 32 == 31 {
            api.feed.flush();
            assert!(seen_within(&api.pipeline, i + 1, Duration::from_secs(30)).await);
        }
    }
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let scan = {
        let p = api.pipeline.clone();
        std::thread::spawn(move || {
            let mut visited = 0u64;
            let pos = p.store.find_back(None, |_, _| {
                if visited == 0 {
                    started_tx.send(()).unwrap();
                    // The slow filter: until the writer is done (or gave up).
                    let _ = done_rx.recv_timeout(Duration::from_secs(60));
                }
                visited += 1;
                Some(true)
            });
            (pos, visited)
        })
    };
    started_rx.recv_timeout(Duration::from_secs(10)).expect("the scan started");
    let rounds = 50u64;
    for round in 0..rounds {
        for i in 0..32u16 {
            api.feed.push(&trace(abi::OBS_TO_ENDPOINT, 20000 + round as u16 * 32 + i, 0x10));
        }
        api.feed.flush();
        let want = filled + (round + 1) * 32;
        assert!(
            seen_within(&api.pipeline, want, Duration::from_secs(30)).await,
            "the writer was held up by a scan: {} of {want} flows stored",
            api.pipeline.store.seen()
        );
    }
    done_tx.send(()).unwrap();
    let (pos, visited) = scan.join().unwrap();
    // The scan saw the store as it was when it started (newer flows are
    // for the reader that follows), every entry of it.
    assert_eq!((pos, visited), (0, filled));
    assert_eq!(api.pipeline.counters.lost(LostSource::AgentQueue), 0);

    // Real queries, each with as many regular expressions as a request may
    // hold, against a steady stream of events.
    let heavy = |i: usize| FlowFilter {
        source_pod: vec![format!("shop/frontend-{i}")],
        http_path: (0..4).map(|j| format!("^/(api|v[0-9]+)/(items|carts)/[a-z0-9-]{{1,64}}/{i}{j}$")).collect(),
        ..Default::default()
    };
    let req = GetFlowsRequest {
        blacklist: (0..16).map(heavy).collect(),
        whitelist: vec![FlowFilter { source_pod: vec!["shop/".into()], ..Default::default() }],
        number: 100_000,
        ..Default::default()
    };
    let queries: Vec<_> = (0..4)
        .map(|_| {
            let (addr, req) = (api.addr.clone(), req.clone());
            tokio::spawn(async move { flows(&get(&addr, req).await).len() })
        })
        .collect();
    let before = api.pipeline.store.seen();
    for round in 0..rounds {
        for i in 0..32u16 {
            api.feed.push(&trace(abi::OBS_TO_ENDPOINT, 40000 + round as u16 * 32 + i, 0x10));
        }
        api.feed.flush();
        assert!(seen_within(&api.pipeline, before + (round + 1) * 32, Duration::from_secs(30)).await);
    }
    for q in queries {
        assert!(q.await.unwrap() as u64 >= filled, "each query returned the flows it matched");
    }
    assert_eq!(api.pipeline.counters.lost(LostSource::AgentQueue), 0);
}

// ------------------------------------------------------------------ bounds

/// Opens a follow stream (it stays open until dropped).
async fn follow(addr: &Address) -> Result<tonic::Streaming<GetFlowsResponse>, tonic::Status> {
    let mut c = client::observer(addr).await.unwrap();
    c.get_flows(GetFlowsRequest { follow: true, ..Default::default() }).await.map(|r| r.into_inner())
}

/// Opens a stream, retrying while the server has not yet noticed a stream
/// the test closed.
async fn open_eventually(addr: &Address, req: GetFlowsRequest) -> tonic::Streaming<GetFlowsResponse> {
    for _ in 0..100 {
        let mut c = client::observer(addr).await.unwrap();
        match c.get_flows(req.clone()).await {
            Ok(s) => return s.into_inner(),
            Err(e) => assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no stream slot came back");
}

async fn follow_eventually(addr: &Address) -> tonic::Streaming<GetFlowsResponse> {
    open_eventually(addr, GetFlowsRequest { follow: true, ..Default::default() }).await
}

/// One client may keep `per_client` GetFlows streams open, all clients
/// `total`; more is ResourceExhausted, and closing a stream gives its place
/// back. A request larger than the limit is refused before it is decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_requests_are_bounded() {
    let api = start_with(PipelineConfig::default(), StreamLimits { per_client: 2, total: 10 }).await;
    let a = follow(&api.addr).await.unwrap();
    let _b = follow(&api.addr).await.unwrap();
    let err = follow(&api.addr).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("this client has 2 flow streams open"), "{err}");
    drop(a);
    let _c = follow_eventually(&api.addr).await;
    assert_eq!(follow(&api.addr).await.unwrap_err().code(), tonic::Code::ResourceExhausted);

    let api = start_with(PipelineConfig::default(), StreamLimits { per_client: 10, total: 2 }).await;
    let a = follow(&api.addr).await.unwrap();
    let _b = follow(&api.addr).await.unwrap();
    let err = follow(&api.addr).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("the flow API serves 2 streams"), "{err}");
    drop(a);
    let _c = follow_eventually(&api.addr).await;

    // Refused streams held nothing; a query that is not a follow ends and
    // gives its place back by itself.
    let api = start_with(PipelineConfig::default(), StreamLimits { per_client: 1, total: 1 }).await;
    for _ in 0..3 {
        let mut s = open_eventually(&api.addr, GetFlowsRequest::default()).await;
        while s.message().await.unwrap().is_some() {}
        drop(s);
        drop(follow_eventually(&api.addr).await);
    }

    let huge = FlowFilter { source_pod: vec!["x".repeat(server::MAX_REQUEST_BYTES + 1)], ..Default::default() };
    let mut c = client::observer(&api.addr).await.unwrap();
    let before = api.pipeline.counters.refused(Refusal::OverLimit);
    let err = c.get_flows(GetFlowsRequest { whitelist: vec![huge], ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    // Refused before the handler, and still counted.
    assert_eq!(api.pipeline.counters.refused(Refusal::OverLimit), before + 1);
}

// ------------------------------------------------------------------ output

/// One line of JSON per response, with what differs per run (the agent's
/// random boot id in the uuids, wall-clock times) replaced by placeholders.
fn stable_json(rs: &[GetFlowsResponse]) -> String {
    fn scrub(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m.iter_mut() {
                    match (k.as_str(), &*v) {
                        ("time" | "first" | "last", serde_json::Value::String(_)) => *v = "<time>".into(),
                        ("uuid", serde_json::Value::String(u)) => *v = format!("<boot>{}", &u[24..]).into(),
                        _ => scrub(v),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(scrub),
            _ => {}
        }
    }
    let mut out = String::new();
    for r in rs {
        let mut v: serde_json::Value = serde_json::from_str(&weft_flow::json::response(r)).unwrap();
        scrub(&mut v);
        out.push_str(&v.to_string());
        out.push('\n');
    }
    out
}

/// Feeds the flows of every kind the API converts: new, reply, drop and
/// redirected connections, and an HTTP request/response pair with its
/// connections' link. Returns how many entries the store holds then.
async fn feed_every_kind(api: &mut Api) -> u64 {
    api.feed.push(&Event { subtype: abi::OBS_FROM_ENDPOINT as u8, proxy_port: 0, ..redirect(45000) });
    api.feed.push(&redirect(45000));
    api.feed.push(&Event {
        saddr: raw([192, 168, 50, 1]),
        sport: 50000u16.to_be(),
        src_identity: 1,
        ..trace(abi::OBS_TO_ENDPOINT, 0, 0x02)
    });
    api.feed.push(&trace(abi::OBS_FROM_ENDPOINT, 41000, 0x02));
    api.feed.push(&Event {
        saddr: raw(SERVER),
        daddr: raw(CLIENT),
        sport: 8080u16.to_be(),
        dport: 41000u16.to_be(),
        flags: abi::EVF_REPLY as u8,
        ..trace(abi::OBS_TO_ENDPOINT, 0, 0x12)
    });
    api.feed.push(&drop_ev(42000));
    api.feed.flush();
    stored(&api.pipeline, 6).await;
    api.pipeline.submit_l7(L7Entry {
        http: Http {
            method: "POST".into(),
            authority: "cart.shop".into(),
            path: "/items".into(),
            protocol: "HTTP/1.1",
            code: 201,
            start_ns: 1_700_000_000_000_000_000,
            duration_ns: 3_000_000,
            request_id: "6c1b5b0e-51a3-4f4e-9f7b-1f0c0e6b2a11".into(),
            user_agent: "curl/8.5.0".into(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            upstream: Some(SocketAddrV4::new(SERVER.into(), 8080)),
            upstream_local: Some(SocketAddrV4::new(Ipv4Addr::new(192, 168, 50, 1), 50000)),
            ..Default::default()
        },
        client: Some(SocketAddrV4::new(CLIENT.into(), 45000)),
        server: Some(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15001)),
    });
    stored(&api.pipeline, 8).await;
    8
}

/// Reads `n` responses from a follow stream.
async fn take(s: &mut tonic::Streaming<GetFlowsResponse>, n: usize) -> Vec<GetFlowsResponse> {
    let mut out = Vec::new();
    while out.len() < n {
        let r = tokio::time::timeout(Duration::from_secs(5), s.message()).await.expect("stream stalled").unwrap();
        out.push(r.expect("the stream stays open"));
    }
    out
}

/// What the flow API sends is pinned: the same flows give the same JSON as
/// recorded in `tests/golden/flow_api_stream.jsonl` (from the flow API as it
/// was before encoding was shared across followers), for Hubble's clients and
/// weft's (with the link), whether read back from the store or followed live
/// by several followers at once. `WEFT_BLESS=1` writes the file anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flows_sent_are_the_recorded_json_for_every_reader() {
    let mut api = start(PipelineConfig::default()).await;
    let weft = || Some(prost_types::Any { type_url: "type.googleapis.com/weft.WeftClient".into(), value: vec![] });
    let plain_follow = GetFlowsRequest { follow: true, ..Default::default() };
    let weft_follow = GetFlowsRequest { follow: true, extensions: weft(), ..Default::default() };
    let mut followers = Vec::new();
    for req in [&plain_follow, &weft_follow, &plain_follow, &weft_follow] {
        followers.push(open_eventually(&api.addr, req.clone()).await);
    }
    // A follow starts at the store's end when the server handles it; the
    // first flow waits until every follower is surely there.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = feed_every_kind(&mut api).await;
    let plain = get(&api.addr, GetFlowsRequest { first: true, ..Default::default() }).await;
    let with_link = get(&api.addr, GetFlowsRequest { first: true, extensions: weft(), ..Default::default() }).await;
    assert_eq!((plain.len() as u64, with_link.len() as u64), (n, n));
    let got = format!("# Hubble's clients\n{}# weft's clients\n{}", stable_json(&plain), stable_json(&with_link));
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/flow_api_stream.jsonl");
    if std::env::var_os("WEFT_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).expect("the recorded JSON (WEFT_BLESS=1 records it)");
    assert_eq!(got, want, "the flows sent changed");
    for (i, s) in followers.iter_mut().enumerate() {
        let live = take(s, n as usize).await;
        let expect = if i % 2 == 0 { &plain } else { &with_link };
        assert_eq!(stable_json(&live), stable_json(expect), "follower {i} got what a read of the store gets");
    }
}
