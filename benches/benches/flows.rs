//! Flow pipeline benchmarks (root; builds its own lab). Records come from
//! the real datapath: a hot-path program run through BPF_PROG_TEST_RUN on
//! the live maps, each run writing its verdict record to the real ring buffer.
//!
//! 1. Throughput, one core: draining the ring buffer (baseline) against
//!    draining plus decode, enrich, connection join, filter and metrics.
//! 2. Kernel record -> gRPC client latency p50/p99 at fixed rates, with every
//!    loss counted by source; the highest rate with no loss at default sizes.
//!    The follower (a thread of this process, on the same cores) counts what
//!    it gets without parsing each flow (`weft_tests::follower`), so the
//!    agent's sending is measured; one more row at 400,000/s decodes every
//!    flow, as a Hubble client does, with the follower's own CPU beside it.
//! 3. CPU of the pipeline (reader, flows thread, flow API serving one
//!    follower) at 10,000 flows/s; and a real agent's CPU and memory at
//!    about 10,000 flows/s of real packets (one `weft observe -f` following),
//!    against the same agent idle.
//! 4. What sending a flow costs the flow API: building `flow.Flow` and
//!    encoding it with prost (baseline, the way it was sent until
//!    2026-12-02) against writing its bytes straight from the record (the
//!    way it is sent), on the same records.
//!
//! `cargo bench -p weft-benches --bench flows`; with
//! `WEFT_BENCH_RATES=400000,800000` only those rate rows are run (a
//! counting follower each), several times with `WEFT_BENCH_REPEAT=3`, and
//! nothing after them (for A/B runs of the flow path).

use std::{
    collections::HashMap,
    net::SocketAddrV4,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use weft_agent::datapath::{Datapath, EmitLevel};
use weft_benches::{machine, save};
use weft_flow::{
    client::Address,
    proto::{
        flow::{FlowFilter, Verdict},
        observer::{GetFlowsRequest, GetFlowsResponse, get_flows_response::ResponseTypes},
    },
};
use weft_observe::{
    api::{
        convert,
        filter::{Env, FilterSet},
        server::{self, Listen},
        wire,
    },
    export::metrics::{Context, FlowMetrics},
    pipeline::{
        Pipeline, PipelineConfig, Sink,
        enrich::Names,
        join::ConnTable,
        record::{EndpointInfo, Entry, LostSource, ServiceInfo},
        ringbuf::{EventReader, Records},
        spawn_reader,
    },
};
use weft_tests::{
    flows::{agent_get, flow_socket, metric_sum},
    follower::{self, Decode, Tally, thread_cpu},
    lab::{Lab, skip_reason},
    node::{LabNode, pod_identities},
    objects::{agent_files, lab_objects, start_agent, wait_ready, workspace_binary, write_atomic},
    packet::{ACK, PSH, SYN, tcp_frame},
    scenario::{VIP, cluster_ip, service},
};

/// Records per ring-buffer fill (the 8 MiB ring holds about 100,000).
const FILL: u32 = 80_000;

fn names(lab: &Lab) -> Names {
    let ids = pod_identities(lab);
    let mut n = Names::new(lab.node(0).name.clone());
    for p in &lab.pods {
        n.add_endpoint(
            p.ip,
            EndpointInfo {
                namespace: p.namespace.clone(),
                pod: p.name.clone(),
                labels: p.labels.iter().map(|(k, v)| format!("k8s:{k}={v}")).collect(),
                workloads: vec![("Deployment".into(), format!("app-{}", p.name))],
                identity: ids(p),
                node: lab.node(p.node).name.clone(),
                local: p.node == 0,
            },
        );
    }
    n.add_service(VIP, 80, 6, Arc::new(ServiceInfo { namespace: "default".into(), name: "web".into() }));
    n
}

/// The frame every run sends: an established pod -> ClusterIP connection
/// (DNAT), so each record carries a translation and a Service.
fn frame(lab: &Lab, dp: &Datapath) -> Vec<u8> {
    let src = SocketAddrV4::new(lab.pod("n1-p1").ip, 40001);
    let dst = SocketAddrV4::new(VIP, 80);
    let _ = dp.test_run("from_container", &tcp_frame(src, dst, SYN));
    tcp_frame(src, dst, ACK | PSH)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn throughput(lab: &Lab, dp: &Datapath, reader: &mut EventReader) -> serde_json::Value {
    let pkt = frame(lab, dp);
    let names = Arc::new(names(lab));
    let filter = FlowFilter {
        source_pod: vec!["default/n1-".into()],
        verdict: vec![Verdict::Forwarded as i32, Verdict::Dropped as i32],
        ..Default::default()
    };
    let filters = FilterSet::compile(&[filter], &[]).unwrap();
    let env = Env { boot_id: 1, names: &names };
    let mut registry = prometheus_client::registry::Registry::default();
    let mut metrics = FlowMetrics::register(&mut registry, Context::default());
    let mut conns = ConnTable::new(65536);
    let (mut drain, mut full) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        dp.test_run_repeat("from_container", &pkt, FILL).unwrap();
        let t = Instant::now();
        let (n, _) = reader.drain(|ev| {
            std::hint::black_box(ev);
        });
        drain.push(n as f64 / t.elapsed().as_secs_f64());

        dp.test_run_repeat("from_container", &pkt, FILL).unwrap();
        let mut batch: Vec<Entry> = Vec::with_capacity(512);
        let mut matched = 0u64;
        let mut seq = 0u64;
        let t = Instant::now();
        let (n, _) = reader.drain(|ev| {
            let f = names.enrich(ev, ev.ts_ns);
            conns.observe(&f);
            if filters.matches(&env, seq, &f) {
                matched += 1;
            }
            seq += 1;
            batch.push(Entry::Flow(f));
            if batch.len() == 512 {
                metrics.batch(seq, &batch, &names);
                batch.clear();
            }
        });
        metrics.batch(seq, &batch, &names);
        full.push(n as f64 / t.elapsed().as_secs_f64());
        // Every record of the bench's matches; a few others may be in the
        // ring beside them (seen once, in the first round after the lab
        // started), so a handful may not.
        assert!(n - matched <= 100, "{} of {n} records did not match the filter", n - matched);
    }
    let (d, f) = (median(drain), median(full));
    println!("\n## Flow pipeline throughput, one core ({FILL} records per run, median of 5)\n");
    println!("| stage | records/s | / drain only |");
    println!("|---|---:|---:|");
    println!("| drain the ring buffer only (baseline) | {:.0} | 1.00 |", d);
    println!("| drain + decode + enrich + join + filter + metrics | {:.0} | {:.2} |", f, f / d);
    serde_json::json!({"drain_per_s": d, "pipeline_per_s": f})
}

/// Nanoseconds per flow to turn real records into `GetFlowsResponse` bytes:
/// the typed message encoded by prost, each response copied into a buffer
/// of its own (the flow API until 2026-12-02), against the bytes written
/// from the record into one buffer per chunk of 256 (the flow API now).
/// Both give the same bytes (checked here too).
fn conversion(lab: &Lab, dp: &Datapath, reader: &mut EventReader) -> serde_json::Value {
    let pkt = frame(lab, dp);
    let names = Arc::new(names(lab));
    dp.test_run_repeat("from_container", &pkt, FILL).unwrap();
    let mut flows = Vec::new();
    reader.drain(|ev| flows.push(names.enrich(ev, ev.ts_ns)));
    let ctx = convert::Context::new(names.clone(), 0x5eed, false);
    let typed = |seq: usize, f| -> Arc<[u8]> {
        let flow = convert::to_flow(&ctx, seq as u64, f);
        let r = GetFlowsResponse {
            response_types: Some(ResponseTypes::Flow(flow)),
            node_name: names.node_name.clone(),
            time: Some(weft_flow::time::timestamp(f.time_ns)),
        };
        prost::Message::encode_to_vec(&r).into()
    };
    let mut out = Vec::new();
    let mut writer = wire::FlowWriter::new(convert::Context::new(names.clone(), 0x5eed, false));
    for (seq, f) in flows.iter().enumerate().take(1000) {
        out.clear();
        writer.write_flow_response(seq as u64, f, &mut out);
        assert_eq!(out[..], typed(seq, f)[..], "flow {seq} is written as prost encodes it");
    }
    let (mut before, mut now) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        for (seq, f) in flows.iter().enumerate() {
            std::hint::black_box(typed(seq, f));
        }
        before.push(t.elapsed().as_nanos() as f64 / flows.len() as f64);
        // As a stream writes: one writer, keeping what repeats.
        let mut writer = wire::FlowWriter::new(convert::Context::new(names.clone(), 0x5eed, false));
        let t = Instant::now();
        for (c, chunk) in flows.chunks(256).enumerate() {
            let mut buf = Vec::with_capacity(chunk.len() * 512);
            let mut ends = Vec::with_capacity(chunk.len());
            for (i, f) in chunk.iter().enumerate() {
                writer.write_flow_response((c * 256 + i) as u64, f, &mut buf);
                ends.push(buf.len());
            }
            let buf = prost::bytes::Bytes::from(buf);
            let mut start = 0;
            for end in ends {
                std::hint::black_box(buf.slice(start..end));
                start = end;
            }
        }
        now.push(t.elapsed().as_nanos() as f64 / flows.len() as f64);
    }
    let (b, n) = (median(before), median(now));
    println!("\n## Sending a flow: its GetFlowsResponse bytes ({} real records, median of 5)\n", flows.len());
    println!("| how | ns per flow | / typed message |");
    println!("|---|---:|---:|");
    println!("| flow.Flow built, encoded by prost, own buffer (baseline) | {b:.0} | 1.00 |");
    println!(
        "| written from the record by one writer (repeated parts kept), one buffer per 256 flows | {n:.0} | {:.2} |",
        n / b
    );
    serde_json::json!({"typed_ns_per_flow": b, "written_ns_per_flow": n})
}

struct RateResult {
    emitted: u64,
    received: u64,
    received_each: Vec<u64>,
    lost: HashMap<LostSource, u64>,
    p50: Duration,
    p99: Duration,
    pipeline_cpu: f64,
    /// (thread, CPU seconds) of the pipeline's threads.
    by_thread: Vec<(&'static str, f64)>,
    /// CPU seconds of the followers' threads (the bench's, not the agent's).
    client_cpu: f64,
    secs: f64,
}

/// The follow request of one follower in the multi-follower run: different
/// filters, each matching every record the bench sends (so each follower
/// receives every flow, the most work a follower can ask for).
fn follower_request(i: usize) -> GetFlowsRequest {
    let filter = match i % 4 {
        0 => FlowFilter::default(),
        1 => FlowFilter { source_pod: vec!["default/n1-p1".into()], ..Default::default() },
        2 => FlowFilter { verdict: vec![Verdict::Forwarded as i32], ..Default::default() },
        _ => FlowFilter { protocol: vec!["tcp".into()], ..Default::default() },
    };
    GetFlowsRequest { follow: true, whitelist: vec![filter], ..Default::default() }
}

/// One follower of every flow, decoding as `decode` says.
fn one_follower(decode: Decode) -> [(GetFlowsRequest, Decode); 1] {
    [(GetFlowsRequest { follow: true, ..Default::default() }, decode)]
}

/// Records at `rate` for `secs` while `followers` follow, each with its
/// request and way of decoding (latencies and `received` are the first
/// follower's; `received_each` all of them).
fn rate_run_followers(
    lab: &Lab,
    dp: &Datapath,
    pipeline: &Arc<Pipeline>,
    addr: &Address,
    rate: u64,
    secs: u64,
    followers: &[(GetFlowsRequest, Decode)],
) -> RateResult {
    let pkt = frame(lab, dp);
    let lost_before: HashMap<LostSource, u64> =
        LostSource::ALL.iter().map(|s| (*s, pipeline.counters.lost(*s))).collect();
    let kernel_before = dp.event_stats().unwrap();
    // The followers: each its own thread and runtime, threads named "client".
    let done = Arc::new(AtomicBool::new(false));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let tallies: Vec<Arc<Tally>> = followers.iter().map(|_| Arc::default()).collect();
    let mut clients = Vec::new();
    for (i, (req, decode)) in followers.iter().enumerate() {
        let (tally, done, latencies, addr, req, decode) =
            (tallies[i].clone(), done.clone(), latencies.clone(), addr.clone(), req.clone(), *decode);
        let client = std::thread::Builder::new()
            .name("client".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                // Room for every latency up front: doubling a vector of a
                // million of them stalls the follower mid-run.
                let mut lat = Vec::with_capacity(if i == 0 { (rate * (secs + 2)) as usize } else { 0 });
                rt.block_on(follower::follow(&addr, req, decode, &tally, &done, |ts| {
                    if i == 0 {
                        lat.push(weft_flow::time::now_ns().saturating_sub(ts));
                    }
                }))
                .unwrap();
                if i == 0 {
                    *latencies.lock().unwrap() = lat;
                }
            })
            .unwrap();
        clients.push(client);
    }
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = thread_cpu();
    let t0 = Instant::now();
    // Generate: every millisecond, the records due by then.
    let per_ms = rate as f64 / 1000.0;
    let mut sent = 0u64;
    while t0.elapsed() < Duration::from_secs(secs) {
        let due = (t0.elapsed().as_secs_f64() * 1000.0 * per_ms) as u64;
        if due > sent {
            let n = (due - sent).min(u32::MAX as u64) as u32;
            dp.test_run_repeat("from_container", &pkt, n).unwrap();
            sent += n as u64;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    let secs_run = t0.elapsed().as_secs_f64();
    // Let the pipeline drain, then stop the follower.
    std::thread::sleep(Duration::from_millis(1500));
    let cpu1 = thread_cpu();
    done.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let kernel_after = dp.event_stats().unwrap();
    let emitted = (kernel_after.emitted - kernel_before.emitted) + (kernel_after.lost - kernel_before.lost);
    let mut lost: HashMap<LostSource, u64> =
        LostSource::ALL.iter().map(|s| (*s, pipeline.counters.lost(*s) - lost_before[s])).collect();
    lost.insert(LostSource::KernelRing, kernel_after.lost - kernel_before.lost);
    let by_thread: Vec<(&'static str, f64)> = ["events", "flows", "server"]
        .iter()
        .map(|n| (*n, cpu1.get(*n).copied().unwrap_or(0.0) - cpu0.get(*n).copied().unwrap_or(0.0)))
        .collect();
    let pipeline_cpu = by_thread.iter().map(|(_, c)| c).sum();
    let client_cpu = cpu1.get("client").copied().unwrap_or(0.0) - cpu0.get("client").copied().unwrap_or(0.0);
    let mut lat = std::mem::take(&mut *latencies.lock().unwrap());
    lat.sort_unstable();
    let pct = |p: f64| Duration::from_nanos(lat.get(((lat.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(0));
    RateResult {
        emitted,
        received: tallies.first().map_or(0, |t| t.flows.load(Ordering::Relaxed)),
        received_each: tallies.iter().map(|t| t.flows.load(Ordering::Relaxed)).collect(),
        lost,
        p50: pct(0.5),
        p99: pct(0.99),
        pipeline_cpu,
        by_thread,
        client_cpu,
        secs: secs_run,
    }
}

fn main() {
    if let Some(reason) = skip_reason() {
        eprintln!("SKIPPED: {reason}");
        return;
    }
    println!("# weft flow pipeline benchmarks\n\nMachine: {}", machine());
    let lab = Lab::new().unwrap();
    let mut node = LabNode::open(&lab, 0, |c| c.emit_level = EmitLevel::Packet).unwrap();
    node.install_lab(&lab).unwrap();
    node.dp.upsert_service(&service(cluster_ip(80), &[lab.pod("n1-p2").ip], 8080)).unwrap();
    let LabNode { dp, events, .. } = node;
    let mut reader = EventReader::new(events);
    let tp = throughput(&lab, &dp, &mut reader);
    let sending = conversion(&lab, &dp, &mut reader);

    // The whole pipeline at default sizes, serving one follower.
    let (pipeline, feed) = Pipeline::start(PipelineConfig::default(), names(&lab));
    let mut registry = prometheus_client::registry::Registry::default();
    pipeline.add_sink(Box::new(FlowMetrics::register(&mut registry, Context::default())));
    let _reader = spawn_reader(reader, feed);
    let dir = std::env::temp_dir().join(format!("weft-bench-flows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("observer.sock");
    {
        let (p, sock) = (pipeline.clone(), sock.clone());
        std::thread::Builder::new()
            .name("server".into())
            .spawn(move || {
                let rt =
                    tokio::runtime::Builder::new_current_thread().enable_all().thread_name("server").build().unwrap();
                rt.block_on(server::serve(
                    p,
                    Listen {
                        tcp: None,
                        unix: Some(sock),
                        tls: None,
                        limits: Default::default(),
                        access: Default::default(),
                        peers: None,
                    },
                ))
                .unwrap();
            })
            .unwrap();
    }
    while !sock.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let addr = Address::Unix(sock);
    println!(
        "\n## Kernel record -> gRPC client (one follower), default sizes (ring 8 MiB, queue 16,384, store 4,095)\n"
    );
    println!(
        "| rate (records/s) | follower decodes | seconds | emitted | received | lost (kernel / queue / store) | p50 latency | p99 latency | pipeline CPU | follower CPU |"
    );
    println!("|---:|---|---:|---:|---:|---|---:|---:|---:|---:|");
    let mut highest_clean = 0;
    let mut rates = Vec::new();
    // The follower counts (what the agent sends is measured); the last row
    // decodes every flow into `flow.Flow`, as a Hubble client does, in one
    // bench thread on the same two cores.
    let chosen = std::env::var("WEFT_BENCH_RATES").ok().map(|v| {
        let rates: Vec<u64> =
            v.split(',').map(|r| r.trim().parse().expect("WEFT_BENCH_RATES: records/s, comma-separated")).collect();
        let repeat: usize =
            std::env::var("WEFT_BENCH_REPEAT").map_or(1, |n| n.parse().expect("WEFT_BENCH_REPEAT: a count"));
        rates.repeat(repeat)
    });
    let runs: Vec<(u64, Decode)> = match &chosen {
        Some(rates) => rates.iter().map(|r| (*r, Decode::Count)).collect(),
        None => [10_000u64, 100_000, 200_000, 400_000, 800_000]
            .map(|r| (r, Decode::Count))
            .into_iter()
            .chain([(400_000, Decode::Typed)])
            .collect(),
    };
    for (rate, decode) in runs {
        let r = rate_run_followers(&lab, &dp, &pipeline, &addr, rate, 3, &one_follower(decode));
        let how = match decode {
            Decode::Count => "kind and time",
            Decode::Typed => "every field",
        };
        rates.push(serde_json::json!({
            "rate": rate, "decode": how, "emitted": r.emitted, "received": r.received,
            "lost_kernel": r.lost[&LostSource::KernelRing], "lost_queue": r.lost[&LostSource::AgentQueue],
            "lost_store": r.lost[&LostSource::FlowStore],
            "p50_ms": r.p50.as_secs_f64() * 1e3, "p99_ms": r.p99.as_secs_f64() * 1e3,
            "pipeline_cpu_pct": r.pipeline_cpu / r.secs * 100.0, "follower_cpu_pct": r.client_cpu / r.secs * 100.0,
        }));
        let (k, q, s) =
            (r.lost[&LostSource::KernelRing], r.lost[&LostSource::AgentQueue], r.lost[&LostSource::FlowStore]);
        println!(
            "| {rate} | {how} | {:.1} | {} | {} | {k} / {q} / {s} | {:.2} ms | {:.2} ms | {:.0} % of a core | {:.0} % of a core |",
            r.secs,
            r.emitted,
            r.received,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            r.pipeline_cpu / r.secs * 100.0,
            r.client_cpu / r.secs * 100.0
        );
        if decode == Decode::Count && k + q + s == 0 && r.received == r.emitted {
            highest_clean = rate;
        }
    }
    println!("\nHighest rate tried with zero loss (a counting follower): {highest_clean} records/s.");
    if chosen.is_some() {
        pipeline.stop();
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let r = rate_run_followers(&lab, &dp, &pipeline, &addr, 10_000, 10, &one_follower(Decode::Count));
    println!(
        "\n## CPU at 10,000 flows/s for {:.0} s: pipeline (reader + flows + flow API serving one follower) used {:.1} % of one core ({} received of {} emitted)\n",
        r.secs,
        r.pipeline_cpu / r.secs * 100.0,
        r.received,
        r.emitted
    );
    println!("| thread | role | % of one core |");
    println!("|---|---|---:|");
    for (t, c) in &r.by_thread {
        let role = match *t {
            "events" => "ring-buffer reader",
            "flows" => "decode, enrich, join, metrics, store",
            _ => "flow API: filter, convert, send to the follower",
        };
        println!("| {t} | {role} | {:.1} |", c / r.secs * 100.0);
    }
    let cpu10k = r.pipeline_cpu / r.secs * 100.0;
    let followers = followers_cost(&lab, &dp, &pipeline, &addr);
    pipeline.stop();
    let _ = std::fs::remove_dir_all(&dir);
    drop(dp);
    drop(lab);
    let agent = agent_load();
    save(
        "flows",
        serde_json::json!({
            "throughput": tp, "conversion": sending, "rates": rates, "zero_loss_max": highest_clean,
            "pipeline_cpu_10k_pct": cpu10k, "followers": followers, "agent": agent,
        }),
    );
}

/// The pipeline's CPU at 10,000 records/s with 0, 1 and 4 followers (the
/// four with different filters, each matching every record): what each
/// follower adds.
fn followers_cost(lab: &Lab, dp: &Datapath, pipeline: &Arc<Pipeline>, addr: &Address) -> serde_json::Value {
    println!("\n## Followers at 10,000 records/s: pipeline CPU (reader + flows + flow API) by number of followers\n");
    println!(
        "| followers | % of one core | flow API thread, % | added per follower, % | received by each (of emitted) |"
    );
    println!("|---:|---:|---:|---:|---|");
    let mut rows = Vec::new();
    let mut none = 0.0;
    for n in [0usize, 1, 4] {
        let reqs: Vec<(GetFlowsRequest, Decode)> = (0..n).map(|i| (follower_request(i), Decode::Count)).collect();
        let r = rate_run_followers(lab, dp, pipeline, addr, 10_000, 10, &reqs);
        let pct = r.pipeline_cpu / r.secs * 100.0;
        let server = r.by_thread.iter().find(|(t, _)| *t == "server").map_or(0.0, |(_, c)| c / r.secs * 100.0);
        if n == 0 {
            none = pct;
        }
        let each = if n == 0 { 0.0 } else { (pct - none) / n as f64 };
        let got: Vec<String> = r.received_each.iter().map(|c| c.to_string()).collect();
        println!("| {n} | {pct:.1} | {server:.1} | {each:.1} | {} (of {}) |", got.join(", "), r.emitted);
        rows.push(serde_json::json!({
            "followers": n, "cpu_pct": pct, "server_pct": server, "per_follower_pct": each,
            "received_each": r.received_each, "emitted": r.emitted,
        }));
    }
    serde_json::Value::Array(rows)
}

/// A real agent (no Envoy) on node1, records for every packet, one
/// `weft observe -f` following: CPU and memory idle, then under about
/// 10,000 flows/s (5,000 UDP datagrams/s from n1-p1 to n2-p1; each gives a
/// from-endpoint and a to-network record).
fn agent_load() -> serde_json::Value {
    let lab = Lab::new().unwrap();
    let files = agent_files(&lab, 0, "emit-level: packet\nenvoy: {enabled: false}\n").unwrap();
    write_atomic(&files.objects_dir.join("lab.yaml"), &lab_objects(&lab, &[])).unwrap();
    let pid = start_agent(&lab, 0, &files, &lab.run_dir.join("agent.log")).unwrap();
    wait_ready(&files, Duration::from_secs(30), || lab.running(pid)).unwrap();
    let mut follower = std::process::Command::new(workspace_binary("weft"))
        .args(["observe", "-f", "-o", "json", "--server", &flow_socket(&files)])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let sample = || {
        let m = agent_get(&lab, 0, "/metrics").unwrap();
        (
            metric_sum(&m, "weft_agent_cpu_seconds_total", &[]),
            metric_sum(&m, "weft_agent_resident_memory_bytes", &[]),
            metric_sum(&m, "weft_flows_stored_total", &[]),
            metric_sum(&m, "weft_lost_events_total", &[]),
        )
    };
    let secs = 10.0;
    std::thread::sleep(Duration::from_secs(2));
    let (c0, _, _, _) = sample();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let (c1, idle_rss, _, _) = sample();
    let (c2, _, f2, l2) = sample();
    let target: std::net::SocketAddr = (lab.pod("n2-p1").ip, 9999).into();
    let t0 = Instant::now();
    lab.in_ns(&lab.pod("n1-p1").netns, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let mut sent = 0u64;
        while t0.elapsed().as_secs_f64() < secs {
            let due = (t0.elapsed().as_secs_f64() * 5000.0) as u64;
            while sent < due {
                let _ = s.send_to(&[0u8; 32], target);
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let took = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let (c3, load_rss, f3, l3) = sample();
    let _ = follower.kill();
    let _ = follower.wait();
    let idle = (c1 - c0) / secs * 100.0;
    let load = (c3 - c2) / took * 100.0;
    let rate = (f3 - f2) / took;
    println!("\n## A real agent at about 10,000 flows/s (records for every packet, one `weft observe -f` following)\n");
    println!("| state | flows/s | agent CPU, % of one core | agent RSS | lost |");
    println!("|---|---:|---:|---:|---:|");
    println!("| idle (baseline) | 0 | {idle:.1} | {:.0} MiB | 0 |", idle_rss / 1048576.0);
    println!("| loaded | {rate:.0} | {load:.1} | {:.0} MiB | {} |", load_rss / 1048576.0, l3 - l2);
    serde_json::json!({
        "idle_cpu_pct": idle, "load_cpu_pct": load, "flows_per_s": rate,
        "idle_rss_mib": idle_rss / 1048576.0, "load_rss_mib": load_rss / 1048576.0, "lost": l3 - l2,
    })
}
