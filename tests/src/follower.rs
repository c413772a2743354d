//! A follower of the flow API for benches and measurements, decoding either
//! every flow into a `flow.Flow` (as a Hubble client does) or only what
//! counting needs: a response's kind, its time and a loss notice's count.
//!
//! The counting one exists because the flows bench's follower is a thread of
//! the bench process, on the same two cores as the agent's pipeline and the
//! record generator: decoding every field of every flow into strings took
//! that thread about as many flows a second as the target rate, so the bench
//! measured its own client. Counting measures what the agent sends.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Duration,
};

use weft_flow::{
    client::{self, Address},
    proto::{
        flow::LostEvent,
        observer::{GetFlowsRequest, get_flows_response::ResponseTypes},
    },
};

/// A `GetFlowsResponse` read for counting: the flow's bytes are kept as
/// they came, not parsed.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Counted {
    #[prost(bytes = "bytes", optional, tag = "1")]
    pub flow: Option<bytes::Bytes>,
    #[prost(message, optional, tag = "3")]
    pub lost_events: Option<LostEvent>,
    /// The flow's time (a server sets the response's time to its flow's).
    #[prost(message, optional, tag = "1001")]
    pub time: Option<prost_types::Timestamp>,
}

/// How a follower decodes what it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decode {
    /// Each response's kind, time and loss count only ([`Counted`]).
    Count,
    /// Each response into `GetFlowsResponse`, flows into `flow.Flow`.
    Typed,
}

/// What a follower received.
#[derive(Debug, Default)]
pub struct Tally {
    pub flows: AtomicU64,
    /// Flows the server said were lost (loss notices).
    pub lost: AtomicU64,
}

const GET_FLOWS: &str = "/observer.Observer/GetFlows";

fn ns(t: &prost_types::Timestamp) -> u64 {
    t.seconds as u64 * 1_000_000_000 + t.nanos as u64
}

/// Follows `req` on `addr`, counting into `tally` and calling `on_flow` with
/// each flow's time (unix ns), until `done` is set and nothing came for half
/// a second (or the stream ends).
pub async fn follow(
    addr: &Address,
    req: GetFlowsRequest,
    decode: Decode,
    tally: &Tally,
    done: &AtomicBool,
    mut on_flow: impl FnMut(u64),
) -> anyhow::Result<()> {
    let idle = Duration::from_millis(500);
    let lost = |l: &LostEvent| tally.lost.fetch_add(l.num_events_lost, Ordering::Relaxed);
    let mut flow = |t: Option<&prost_types::Timestamp>| {
        tally.flows.fetch_add(1, Ordering::Relaxed);
        on_flow(t.map_or(0, ns));
    };
    match decode {
        Decode::Count => {
            let mut grpc = tonic::client::Grpc::new(client::channel(addr).await?);
            grpc.ready().await?;
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(GET_FLOWS);
            let codec = tonic_prost::ProstCodec::<GetFlowsRequest, Counted>::default();
            let mut s = grpc.server_streaming(tonic::Request::new(req), path, codec).await?.into_inner();
            loop {
                match tokio::time::timeout(idle, s.message()).await {
                    Ok(Ok(Some(r))) => {
                        if r.flow.is_some() {
                            flow(r.time.as_ref());
                        }
                        if let Some(l) = &r.lost_events {
                            lost(l);
                        }
                    }
                    Ok(Ok(None)) => return Ok(()),
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) if done.load(Ordering::Relaxed) => return Ok(()),
                    Err(_) => {}
                }
            }
        }
        Decode::Typed => {
            let mut c = client::observer(addr).await?;
            let mut s = c.get_flows(req).await?.into_inner();
            loop {
                match tokio::time::timeout(idle, s.message()).await {
                    Ok(Ok(Some(r))) => match &r.response_types {
                        Some(ResponseTypes::Flow(f)) => flow(f.time.as_ref()),
                        Some(ResponseTypes::LostEvents(l)) => {
                            lost(l);
                        }
                        _ => {}
                    },
                    Ok(Ok(None)) => return Ok(()),
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) if done.load(Ordering::Relaxed) => return Ok(()),
                    Err(_) => {}
                }
            }
        }
    }
}

/// CPU seconds (user + system) of this process's threads, by name.
pub fn thread_cpu() -> HashMap<String, f64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut out = HashMap::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else { continue };
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        let name = head.split_once('(').map(|(_, n)| n.to_owned()).unwrap_or_default();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let cpu = (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / hz;
        *out.entry(name).or_default() += cpu;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Instant};

    use prost::Message;
    use weft_ebpf::abi::{self, Event};
    use weft_flow::proto::{
        flow::{Flow, LostEventSource},
        observer::GetFlowsResponse,
    };
    use weft_observe::{
        api::server::{self, Listen},
        pipeline::{
            Pipeline, PipelineConfig,
            enrich::Names,
            record::{EndpointInfo, LostSource, ServiceInfo},
        },
    };

    use super::*;

    #[test]
    fn counting_reads_the_kind_time_and_loss_of_a_response() {
        let time = Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 5 });
        let flow = GetFlowsResponse {
            response_types: Some(ResponseTypes::Flow(Flow { time, node_name: "node-a".into(), ..Default::default() })),
            node_name: "node-a".into(),
            time,
        };
        let c = Counted::decode(flow.encode_to_vec().as_slice()).unwrap();
        assert!(c.flow.is_some() && c.lost_events.is_none());
        assert_eq!(c.time.as_ref().map(ns), Some(1_700_000_000_000_000_005));
        let lost = GetFlowsResponse {
            response_types: Some(ResponseTypes::LostEvents(LostEvent {
                source: LostEventSource::HubbleRingBuffer as i32,
                num_events_lost: 42,
                ..Default::default()
            })),
            ..Default::default()
        };
        let c = Counted::decode(lost.encode_to_vec().as_slice()).unwrap();
        assert!(c.flow.is_none());
        assert_eq!(c.lost_events.map(|l| l.num_events_lost), Some(42));
    }

    const POD_A: [u8; 4] = [10, 1, 1, 10];
    const POD_B: [u8; 4] = [10, 1, 2, 20];
    const VIP: [u8; 4] = [10, 96, 0, 10];

    /// Names as the flows bench has them: two named pods (a label, a
    /// Deployment) and a Service in front of the second, so each record
    /// carries both endpoints and a translation, as the bench's do.
    fn bench_names() -> Names {
        let mut n = Names::new("node-a");
        for (ip, pod, node) in [(POD_A, "n1-p1", "node-a"), (POD_B, "n1-p2", "node-a")] {
            n.add_endpoint(
                ip.into(),
                EndpointInfo {
                    namespace: "default".into(),
                    pod: pod.into(),
                    labels: vec![format!("k8s:app=app-{pod}")],
                    workloads: vec![("Deployment".into(), format!("app-{pod}"))],
                    identity: 70_000 + u32::from(ip[3]),
                    node: node.into(),
                    local: true,
                },
            );
        }
        n.add_service(VIP.into(), 80, 6, Arc::new(ServiceInfo { namespace: "default".into(), name: "web".into() }));
        n
    }

    /// One follower against records fed to a pipeline at a fixed rate, laid
    /// out as the flows bench lays it out (a producer thread, the flows
    /// thread, the flow API on a thread of its own, the follower on
    /// another) but in one process with synthetic records: what the
    /// follower received, what the store overwrote before it was read, and
    /// the CPU each thread spent per flow. A measurement, run by hand:
    /// `WEFT_RATE=20000 WEFT_SECS=3 WEFT_DECODE=count cargo test -p
    /// weft-tests --lib follower:: -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement: set WEFT_RATE, WEFT_SECS, WEFT_DECODE=count|typed; run with --ignored --nocapture"]
    fn one_follower_at_a_rate() {
        let env = |k: &str, d: u64| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
        let (rate, secs) = (env("WEFT_RATE", 20_000), env("WEFT_SECS", 3));
        let decode =
            if std::env::var("WEFT_DECODE").is_ok_and(|d| d == "typed") { Decode::Typed } else { Decode::Count };
        let dir = std::env::temp_dir().join(format!("weft-follower-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("observer.sock");
        let (pipeline, mut feed) = Pipeline::start(PipelineConfig::default(), bench_names());
        {
            let (p, sock) = (pipeline.clone(), sock.clone());
            let listen = Listen { tcp: None, unix: Some(sock), ..Default::default() };
            std::thread::Builder::new()
                .name("server".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    let _ = rt.block_on(server::serve(p, listen));
                })
                .unwrap();
        }
        while !sock.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (tally, done) = (Arc::new(Tally::default()), Arc::new(AtomicBool::new(false)));
        let follower = {
            let (tally, done, addr) = (tally.clone(), done.clone(), Address::Unix(sock));
            std::thread::Builder::new()
                .name("client".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    let req = GetFlowsRequest { follow: true, ..Default::default() };
                    rt.block_on(follow(&addr, req, decode, &tally, &done, |_| {})).unwrap();
                })
                .unwrap()
        };
        std::thread::sleep(Duration::from_millis(300));
        let cpu0 = thread_cpu();
        // Every half millisecond, the records due by then.
        let t0 = Instant::now();
        let mut sent = 0u64;
        while t0.elapsed() < Duration::from_secs(secs) {
            let due = (t0.elapsed().as_secs_f64() * rate as f64) as u64;
            while sent < due {
                feed.push(&Event {
                    r#type: abi::EV_TRACE as u8,
                    subtype: abi::OBS_TO_ENDPOINT as u8,
                    proto: 6,
                    flags: abi::EVF_XLATED_DST as u8,
                    tcp_flags: 0x18,
                    saddr: u32::from_ne_bytes(POD_A),
                    daddr: u32::from_ne_bytes(POD_B),
                    sport: (sent as u16).to_be(),
                    dport: 8080u16.to_be(),
                    orig_addr: u32::from_ne_bytes(VIP),
                    orig_port: 80u16.to_be(),
                    ..Default::default()
                });
                sent += 1;
            }
            feed.flush();
            std::thread::sleep(Duration::from_micros(500));
        }
        let took = t0.elapsed().as_secs_f64();
        let counted = || tally.flows.load(Ordering::Relaxed) + tally.lost.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(60);
        while counted() < sent && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let cpu1 = thread_cpu();
        done.store(true, Ordering::Relaxed);
        follower.join().unwrap();
        pipeline.stop();
        let _ = std::fs::remove_dir_all(&dir);
        let got = tally.flows.load(Ordering::Relaxed);
        println!(
            "{rate}/s for {took:.1} s, {decode:?}: sent {sent}, received {got}, lost in the store {} (told {})",
            pipeline.counters.lost(LostSource::FlowStore),
            tally.lost.load(Ordering::Relaxed),
        );
        for t in ["flows", "server", "client"] {
            let c = cpu1.get(t).copied().unwrap_or(0.0) - cpu0.get(t).copied().unwrap_or(0.0);
            println!(
                "  {t}: {:.0} % of a core, {:.2} µs per flow received",
                c / took * 100.0,
                c * 1e6 / got.max(1) as f64
            );
        }
    }
}
