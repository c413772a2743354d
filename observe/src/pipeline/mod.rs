//! The flow pipeline: the ring-buffer reader thread copies datapath records
//! into a lock-free queue; the flows thread decodes and enriches them, joins
//! Envoy's access-log entries to their connections, hands each batch to the
//! sinks (metrics, exporters) and stores it. Every place a record can be lost
//! is counted by source, and shows up in the flow stream as a loss notice.
//!
//! The parts, in the order a record meets them: [`ringbuf`] drains the
//! kernel's ring buffer, [`spool`] reads Envoy's access log ([`accesslog`]
//! is its format), [`enrich`] names addresses, [`join`] links HTTP
//! exchanges to the datapath's view of their connections, [`store`] keeps
//! the recent flows for readers. [`record`] holds the types they pass along.

pub mod accesslog;
pub mod enrich;
pub mod join;
pub mod record;
pub mod ringbuf;
pub mod spool;
pub mod store;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc, Mutex, OnceLock, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{Receiver, SyncSender, TrySendError, sync_channel},
    },
    thread::{self, JoinHandle, Thread},
    time::Duration,
};

use ::ringbuf::{
    HeapCons, HeapProd, HeapRb,
    traits::{Consumer, Producer, Split},
};
use weft_ebpf::abi::Event;

use weft_flow::time::now_ns;

use self::{
    enrich::Names,
    join::{ConnTable, Held},
    record::{EV_L7, Entry, FlowRecord, L7_REQUEST, L7_RESPONSE, L7Entry, Lost, LostSource},
    ringbuf::Records,
    store::FlowStore,
};

/// Sizes of the pipeline's buffers.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Flows the store keeps for readers (Hubble's default: 4095).
    pub store_capacity: usize,
    /// Records between the ring-buffer reader and the flows thread.
    pub queue_capacity: usize,
    /// Access-log entries waiting to be joined.
    pub l7_queue_capacity: usize,
    /// Connections remembered for joining access-log entries.
    pub connections: usize,
    /// Stack of the pipeline's threads (the agent gives every thread the
    /// same, `weft_agent::limits::THREAD_STACK_BYTES`).
    pub thread_stack_bytes: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            store_capacity: 4095,
            queue_capacity: 16384,
            l7_queue_capacity: 4096,
            connections: 65536,
            thread_stack_bytes: 8 << 20,
        }
    }
}

/// Something that sees every batch before it is stored (metrics, exporters).
pub trait Sink: Send {
    fn batch(&mut self, first_seq: u64, entries: &[Entry], names: &Arc<Names>);

    /// Called about once a second while no batch comes (to expire state
    /// of what is gone even when nothing flows).
    fn idle(&mut self, _names: &Names) {}
}

/// How often sinks are told the pipeline is idle.
const IDLE_EVERY: Duration = Duration::from_secs(1);

/// The pipeline's own counts.
#[derive(Debug, Default)]
pub struct Counters {
    /// Records read from the kernel ring buffer.
    pub events_read: AtomicU64,
    /// Access-log entries received from Envoy.
    pub l7_received: AtomicU64,
    /// Access-log entries the flows thread has stored as flows.
    pub l7_stored: AtomicU64,
    /// Lines of Envoy's access-log spool committed (stored as flows, or
    /// counted lost) by this agent and the ones before it on this node.
    pub spool_committed: AtomicU64,
    /// Flows (datapath and L7) stored.
    pub flows: AtomicU64,
    /// Records the datapath wrote / failed to write (since this agent started).
    pub kernel_written: AtomicU64,
    pub kernel_lost: AtomicU64,
    /// Ring-buffer records too short to be a record (counted lost at the
    /// kernel ring buffer too: the datapath wrote them, no flow came of them).
    pub malformed_records: AtomicU64,
    /// Flow API requests refused, by why ([`Refusal`]).
    refused: [AtomicU64; Refusal::ALL.len()],
    lost: [AtomicU64; LostSource::ALL.len()],
}

/// Why the flow API refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not a request the API can run (bad filter, regex, combination).
    Invalid,
    /// Over a bound: too many filters or regexes, too many streams open, a
    /// request too large.
    OverLimit,
}

impl Refusal {
    pub const ALL: [Refusal; 2] = [Refusal::Invalid, Refusal::OverLimit];

    /// The `reason` label of `weft_flow_requests_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Invalid => "invalid",
            Refusal::OverLimit => "over_limit",
        }
    }
}

impl Counters {
    pub fn lost(&self, s: LostSource) -> u64 {
        self.lost[s as usize].load(Ordering::Relaxed)
    }
    pub fn add_lost(&self, s: LostSource, n: u64) {
        self.lost[s as usize].fetch_add(n, Ordering::Relaxed);
    }
    pub fn refused(&self, r: Refusal) -> u64 {
        self.refused[r as usize].load(Ordering::Relaxed)
    }
    pub fn add_refused(&self, r: Refusal) {
        self.refused[r as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// The shared handle: the store, the counters, the current names.
pub struct Pipeline {
    pub store: FlowStore,
    pub counters: Counters,
    /// Random per start: flow UUIDs derive from it.
    pub boot_id: u64,
    names: RwLock<Arc<Names>>,
    /// Boxed: a bounded channel makes its slots up front, and an entry is
    /// about 600 bytes (4,096 slots took 2.5 MB of every agent, idle too).
    l7_tx: SyncSender<Box<L7Entry>>,
    pending: Mutex<Vec<Lost>>,
    kernel_seen: Mutex<Option<(u64, Vec<u64>)>>,
    worker: OnceLock<Thread>,
    /// The flows thread, until someone takes it to watch it.
    worker_handle: Mutex<Option<JoinHandle<()>>>,
    stop: AtomicBool,
    /// The ring-buffer reader has handed over what the ring held when it
    /// started: access-log entries can be joined to those records now.
    ring_drained: AtomicBool,
    thread_stack_bytes: usize,
    sinks: Mutex<Vec<Box<dyn Sink>>>,
    /// What the access-log reader had committed when it last had read
    /// everything in the spool (`None` until then).
    pub spool_progress: Mutex<Option<spool::Progress>>,
}

/// The producer side of the record queue, for the ring-buffer reader.
pub struct EventFeed {
    prod: HeapProd<Event>,
    pipeline: Arc<Pipeline>,
    read: u64,
    lost: u64,
    malformed: u64,
}

impl EventFeed {
    /// Queues one record; a full queue loses it (counted).
    pub fn push(&mut self, ev: &Event) {
        self.read += 1;
        if self.prod.try_push(*ev).is_err() {
            self.lost += 1;
        }
    }

    /// Counts `n` records that were too short to decode: lost at the ring
    /// buffer (a record the datapath wrote that never became a flow).
    pub fn malformed(&mut self, n: u64) {
        self.malformed = self.malformed.saturating_add(n);
    }

    /// Publishes the counts and wakes the flows thread.
    pub fn flush(&mut self) {
        let c = &self.pipeline.counters;
        c.events_read.fetch_add(std::mem::take(&mut self.read), Ordering::Relaxed);
        self.pipeline.lose(LostSource::AgentQueue, std::mem::take(&mut self.lost));
        let malformed = std::mem::take(&mut self.malformed);
        c.malformed_records.fetch_add(malformed, Ordering::Relaxed);
        self.pipeline.lose(LostSource::KernelRing, malformed);
        self.pipeline.ring_drained.store(true, Ordering::Release);
        self.pipeline.wake();
    }

    pub fn stopped(&self) -> bool {
        self.pipeline.stopped()
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What to add to the datapath's timestamps (CLOCK_MONOTONIC) to get unix time.
fn monotonic_offset() -> u64 {
    clock_ns(libc::CLOCK_REALTIME).wrapping_sub(clock_ns(libc::CLOCK_MONOTONIC))
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: valid buffer of that length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n == 8 { u64::from_ne_bytes(b) } else { now_ns() ^ std::process::id() as u64 }
}

impl Pipeline {
    /// Starts the flows thread. The returned feed is for the ring-buffer reader.
    pub fn start(cfg: PipelineConfig, names: Names) -> (Arc<Pipeline>, EventFeed) {
        let (prod, cons) = HeapRb::<Event>::new(cfg.queue_capacity.max(1)).split();
        let (l7_tx, l7_rx) = sync_channel(cfg.l7_queue_capacity.max(1));
        let p = Arc::new(Pipeline {
            store: FlowStore::new(cfg.store_capacity),
            counters: Counters::default(),
            boot_id: random_u64(),
            names: RwLock::new(Arc::new(names)),
            l7_tx,
            pending: Mutex::new(Vec::new()),
            kernel_seen: Mutex::new(None),
            worker: OnceLock::new(),
            worker_handle: Mutex::new(None),
            stop: AtomicBool::new(false),
            ring_drained: AtomicBool::new(false),
            thread_stack_bytes: cfg.thread_stack_bytes,
            sinks: Mutex::new(Vec::new()),
            spool_progress: Mutex::new(None),
        });
        let worker = {
            let p = p.clone();
            let conns = ConnTable::new(cfg.connections);
            thread::Builder::new()
                .name("flows".into())
                .stack_size(cfg.thread_stack_bytes)
                .spawn(move || flows_thread(p, cons, l7_rx, conns))
                .expect("spawning the flows thread")
        };
        let _ = p.worker.set(worker.thread().clone());
        *p.worker_handle.lock().unwrap() = Some(worker);
        let feed = EventFeed { prod, pipeline: p.clone(), read: 0, lost: 0, malformed: 0 };
        (p, feed)
    }

    /// The flows thread's handle (once), for a supervisor to notice it ending.
    pub fn take_worker(&self) -> Option<JoinHandle<()>> {
        self.worker_handle.lock().unwrap().take()
    }

    /// Adds a sink; it sees every batch from the next one on.
    pub fn add_sink(&self, sink: Box<dyn Sink>) {
        self.sinks.lock().unwrap().push(sink);
    }

    fn wake(&self) {
        if let Some(t) = self.worker.get() {
            t.unpark();
        }
    }

    /// Whether [`Pipeline::stop`] was called.
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Whether the ring-buffer reader has handed over what the ring held
    /// when it started.
    pub fn ring_drained(&self) -> bool {
        self.ring_drained.load(Ordering::Acquire)
    }

    /// Stops the pipeline's threads (they finish their current batch).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake();
    }

    /// Replaces the names flows are enriched with.
    pub fn set_names(&self, names: Names) {
        *self.names.write().unwrap() = Arc::new(names);
    }

    pub fn names(&self) -> Arc<Names> {
        self.names.read().unwrap().clone()
    }

    /// Queues an access-log entry; a full queue loses it (counted, and
    /// false).
    pub fn submit_l7(&self, e: L7Entry) -> bool {
        self.counters.l7_received.fetch_add(1, Ordering::Relaxed);
        match self.l7_tx.try_send(Box::new(e)) {
            Ok(()) => {
                self.wake();
                true
            }
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.lose(LostSource::AgentQueue, 1);
                false
            }
        }
    }

    /// Counts `n` events lost at `source` and puts a notice in the stream.
    pub fn lose(&self, source: LostSource, n: u64) {
        if n == 0 {
            return;
        }
        self.counters.add_lost(source, n);
        self.pending.lock().unwrap().push(Lost { source, count: n, cpu: None, time_ns: now_ns() });
        self.wake();
    }

    /// How many access-log entries queued so far the flows thread has stored.
    pub fn l7_stored(&self) -> u64 {
        self.counters.l7_stored.load(Ordering::Acquire)
    }

    /// The datapath's counters (records written in total, records lost per
    /// CPU), read periodically by the agent. The first reading is the
    /// baseline; later losses become loss notices, one per CPU.
    pub fn kernel_counters(&self, written: u64, lost_per_cpu: &[u64]) {
        let mut seen = self.kernel_seen.lock().unwrap();
        let Some((w0, l0)) = seen.as_mut() else {
            *seen = Some((written, lost_per_cpu.to_vec()));
            return;
        };
        let c = &self.counters;
        c.kernel_written.fetch_add(written.saturating_sub(*w0), Ordering::Relaxed);
        *w0 = written;
        l0.resize(lost_per_cpu.len(), 0);
        let mut notices = Vec::new();
        for (cpu, (now, before)) in lost_per_cpu.iter().zip(l0.iter_mut()).enumerate() {
            let d = now.saturating_sub(*before);
            *before = *now;
            if d > 0 {
                c.kernel_lost.fetch_add(d, Ordering::Relaxed);
                c.add_lost(LostSource::KernelRing, d);
                notices.push(Lost {
                    source: LostSource::KernelRing,
                    count: d,
                    cpu: Some(cpu as i32),
                    time_ns: now_ns(),
                });
            }
        }
        drop(seen);
        if !notices.is_empty() {
            self.pending.lock().unwrap().extend(notices);
            self.wake();
        }
    }

    /// Losses the exporter reports (they do not enter the stream: the flows
    /// themselves were stored).
    pub fn exporter_lost(&self, n: u64) {
        self.counters.add_lost(LostSource::Exporter, n);
    }
}

/// Reads the kernel ring buffer (or any [`Records`]) into the feed until
/// the pipeline stops; records too short to decode are counted lost.
pub fn spawn_reader(mut reader: impl Records + Send + 'static, mut feed: EventFeed) -> JoinHandle<()> {
    thread::Builder::new()
        .name("events".into())
        .stack_size(feed.pipeline.thread_stack_bytes)
        .spawn(move || {
            let mut first = true;
            // Records read since `read_at`, for the gathering's length.
            let (mut read_at, mut records) = (std::time::Instant::now(), 0u64);
            let room = (feed.pipeline.store.capacity() as u64 / 16).max(1);
            while !feed.stopped() {
                let ready = reader.wait(Duration::from_millis(200));
                if ready {
                    let (read, malformed) = reader.drain(|ev| feed.push(ev));
                    feed.malformed(malformed);
                    records += read + malformed;
                }
                if ready || first {
                    feed.flush();
                    first = false;
                }
                if ready {
                    // Records arriving meanwhile are read together.
                    let now = std::time::Instant::now();
                    let gather = gather_for(records, now - read_at, room, READ_GATHER);
                    (read_at, records) = (now, 0);
                    thread::sleep(gather);
                }
            }
        })
        .expect("spawning the ring-buffer reader")
}

/// After reading, the ring-buffer reader waits up to this long before it
/// looks again: at a steady rate each wake-up (of it, of the flows thread and
/// of the followers) then carries every record of the interval rather than
/// one or two (at 10,000 records/s wake-ups were most of the pipeline's CPU:
/// 1,000 a second with 1 ms, 200 with 5 ms). It waits less when records
/// arrive fast enough to fill a sixteenth of the flow store meanwhile, so a
/// batch never lands in the store in one piece large enough to overwrite what
/// a follower has not read yet. The 8 MiB ring holds about 100,000 records:
/// 5 ms of them is a rate of 20 M/s.
const READ_GATHER: Duration = Duration::from_millis(5);

/// How long to gather before the next read: `max`, or less when entries
/// arrive fast enough (`entries` over `elapsed`, since the read before) to
/// make `room` of them in that time.
pub fn gather_for(entries: u64, elapsed: Duration, room: u64, max: Duration) -> Duration {
    if entries == 0 || elapsed.is_zero() {
        return max;
    }
    // The time `room` entries take at this rate.
    elapsed.mul_f64(room.max(1) as f64 / entries as f64).min(max)
}

/// Records per queue read; bounds the batch and the time the store is locked.
const CHUNK: usize = 512;

fn flows_thread(p: Arc<Pipeline>, mut cons: HeapCons<Event>, l7: Receiver<Box<L7Entry>>, mut conns: ConnTable) {
    let mut buf = vec![Event::default(); CHUNK];
    let mut batch: Vec<Entry> = Vec::with_capacity(CHUNK * 2);
    let mut offset = monotonic_offset();
    let mut batches = 0u32;
    let mut idle_at = std::time::Instant::now();
    let mut held = Held::new(JOIN_WAIT, CHUNK * 8);
    while !p.stop.load(Ordering::Relaxed) {
        let names = p.names();
        batch.extend(p.pending.lock().unwrap().drain(..).map(Entry::Lost));
        let n = cons.pop_slice(&mut buf);
        for ev in &buf[..n] {
            let f = names.enrich(ev, ev.ts_ns.wrapping_add(offset));
            conns.observe(&f);
            batch.push(Entry::Flow(f));
        }
        let now = std::time::Instant::now();
        for e in l7.try_iter().take(CHUNK) {
            held.push(now, *e);
        }
        let mut l7_entries = 0;
        held.ready(
            now,
            |e| joinable(e, &conns),
            |e| {
                l7_flows(e, &names, &conns, &mut batch);
                l7_entries += 1;
            },
        );
        if batch.is_empty() {
            if idle_at.elapsed() >= IDLE_EVERY {
                idle_at = std::time::Instant::now();
                for s in p.sinks.lock().unwrap().iter_mut() {
                    s.idle(&names);
                }
            }
            // Held entries are looked at again soon.
            thread::park_timeout(if held.is_empty() { Duration::from_millis(100) } else { HELD_LOOK });
            continue;
        }
        store_batch(&p, &mut batch, &names, l7_entries);
        batches = batches.wrapping_add(1);
        if batches.is_multiple_of(1024) {
            // The wall clock may have been stepped.
            offset = monotonic_offset();
        }
    }
    // What is held when the pipeline stops is stored unjoined, not dropped.
    if !held.is_empty() {
        let (names, mut n) = (p.names(), 0);
        held.drain(|e| {
            l7_flows(e, &names, &conns, &mut batch);
            n += 1;
        });
        store_batch(&p, &mut batch, &names, n);
    }
}

/// Hands a batch to the sinks and the store (which empties it); `l7_entries`
/// access-log entries made it.
fn store_batch(p: &Pipeline, batch: &mut Vec<Entry>, names: &Arc<Names>, l7_entries: u64) {
    let first = p.store.end();
    for s in p.sinks.lock().unwrap().iter_mut() {
        s.batch(first, batch, names);
    }
    let flows = batch.iter().filter(|e| matches!(e, Entry::Flow(_))).count() as u64;
    p.counters.flows.fetch_add(flows, Ordering::Relaxed);
    p.store.push_batch(batch, now_ns() / 1_000_000_000);
    p.counters.l7_stored.fetch_add(l7_entries, Ordering::Release);
}

/// How long an access-log entry waits for the datapath's records of its
/// connection (see [`Held`]), and how often held entries are looked at.
const JOIN_WAIT: Duration = Duration::from_millis(100);
const HELD_LOOK: Duration = Duration::from_millis(5);

/// Whether an entry's connection is known, or it names none (see [`Held`]).
fn joinable(e: &L7Entry, conns: &ConnTable) -> bool {
    match (e.client, e.server) {
        (Some(c), Some(s)) => conns.downstream(c, s).is_some(),
        _ => true,
    }
}

fn raw(a: SocketAddrV4) -> (u32, u16) {
    (u32::from_ne_bytes(a.ip().octets()), a.port().to_be())
}

/// An access-log entry as a request flow and (when Envoy answered) a
/// response flow, with the datapath's view of both connections.
pub fn l7_flows(e: L7Entry, names: &Names, conns: &ConnTable, out: &mut Vec<Entry>) {
    let mut http = e.http;
    if let (Some(c), Some(s)) = (e.client, e.server) {
        http.downstream_link = conns.downstream(c, s).cloned();
    }
    // The address the client asked for (the Service), as the datapath saw it.
    let server = http.downstream_link.as_ref().and_then(|l| l.server).or(e.server);
    if let (Some(c), Some(s)) = (http.upstream_local, http.upstream) {
        http.upstream_link = conns.link(c, s).cloned();
    }
    let unknown = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0);
    let client = e.client.unwrap_or(unknown);
    // The destination is the backend that served the request when Envoy
    // reached one, else the address the client asked for.
    let backend = http.upstream.or(server).unwrap_or(unknown);
    let service = server.and_then(|s| names.service(*s.ip(), s.port(), 6)).cloned();
    let client_ep = names.endpoint(*client.ip()).cloned();
    let backend_ep = names.endpoint(*backend.ip()).cloned();
    let link = http.downstream_link.as_ref();
    let client_id = link.map(|l| l.src_identity).filter(|i| *i != 0).or(client_ep.as_ref().map(|e| e.identity));
    let backend_id = backend_ep.as_ref().map(|e| e.identity).or(link.map(|l| l.dst_identity));
    let (cs, cp) = raw(client);
    let (bs, bp) = raw(backend);
    let start = if http.start_ns == 0 { now_ns() } else { http.start_ns };
    // The node's policy listener names the policy that allowed the request,
    // or that governed the one it refused.
    let named = if http.denied() { &http.governing_policy } else { &http.policy };
    let (rule_id, direction) = accesslog::parse_policy_id(named).unwrap_or((0, 0));
    let request = Event {
        r#type: EV_L7,
        subtype: L7_REQUEST,
        saddr: cs,
        sport: cp,
        daddr: bs,
        dport: bp,
        proto: 6,
        src_identity: client_id.unwrap_or(0),
        dst_identity: backend_id.unwrap_or(0),
        proxy_port: link.map(|l| l.proxy_port).unwrap_or(0),
        rule_id,
        direction,
        ..Default::default()
    };
    let answered = http.code != 0;
    let end = start.saturating_add(http.duration_ns);
    let http = Arc::new(http);
    out.push(Entry::Flow(FlowRecord {
        time_ns: start,
        ev: request,
        src: client_ep.clone(),
        dst: backend_ep.clone(),
        src_svc: None,
        dst_svc: service.clone(),
        http: Some(http.clone()),
    }));
    if answered {
        let response = Event {
            subtype: L7_RESPONSE,
            saddr: bs,
            sport: bp,
            daddr: cs,
            dport: cp,
            src_identity: request.dst_identity,
            dst_identity: request.src_identity,
            ..request
        };
        out.push(Entry::Flow(FlowRecord {
            time_ns: end,
            ev: response,
            src: backend_ep,
            dst: client_ep,
            src_svc: service,
            dst_svc: None,
            http: Some(http),
        }));
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, time::Instant};

    use super::*;

    /// Records a test hands the reader, as raw bytes.
    struct Written(VecDeque<Vec<u8>>);

    impl Records for Written {
        fn wait(&self, timeout: Duration) -> bool {
            if self.0.is_empty() {
                thread::sleep(timeout.min(Duration::from_millis(10)));
            }
            !self.0.is_empty()
        }

        fn drain(&mut self, mut f: impl FnMut(&Event)) -> (u64, u64) {
            let (mut ok, mut bad) = (0, 0);
            while let Some(raw) = self.0.pop_front() {
                if ringbuf::decode(&raw, &mut f) { ok += 1 } else { bad += 1 }
            }
            (ok, bad)
        }
    }

    fn raw(ev: &Event) -> Vec<u8> {
        // SAFETY: Event is plain old data; the slice covers exactly it.
        unsafe { std::slice::from_raw_parts((ev as *const Event).cast::<u8>(), std::mem::size_of::<Event>()) }.to_vec()
    }

    /// A record shorter than the ABI's is not a flow, and not silently
    /// skipped either: it is counted lost at the ring buffer, and readers
    /// get a loss notice.
    #[test]
    fn the_reader_gathers_less_when_records_would_fill_a_sixteenth_of_the_store_meanwhile() {
        let ms = Duration::from_millis;
        let room = 4095 / 16;
        // 10,000 records/s (50 in 5 ms): 255 take 25.5 ms, so the full 5 ms.
        assert_eq!(gather_for(50, ms(5), room, READ_GATHER), READ_GATHER);
        // 400,000 records/s: 255 take 0.64 ms.
        let g = gather_for(2000, ms(5), room, READ_GATHER);
        assert!(g.abs_diff(Duration::from_micros(637)) < Duration::from_micros(1), "{g:?}");
        // After an idle spell: the rate is low, the full gathering.
        assert_eq!(gather_for(3, Duration::from_secs(2), room, READ_GATHER), READ_GATHER);
        assert_eq!(gather_for(0, ms(5), room, READ_GATHER), READ_GATHER);
    }

    /// An access-log entry that reaches the flows thread before the
    /// datapath's record of its connection (the ring buffer's reader was
    /// late) is still joined to it.
    #[test]
    fn an_exchange_is_joined_to_its_connection_whose_record_comes_after_it() {
        let (p, mut feed) = Pipeline::start(PipelineConfig::default(), Names::default());
        let (client, server) = ("10.1.1.11:40000".parse().unwrap(), "10.96.0.20:80".parse().unwrap());
        p.submit_l7(L7Entry { http: record::Http::default(), client: Some(client), server: Some(server) });
        thread::sleep(Duration::from_millis(30));
        let ip = |a: SocketAddrV4| u32::from_ne_bytes(a.ip().octets());
        feed.push(&Event {
            r#type: 4, // a trace (WEFT_EV_TRACE)
            proto: 6,
            saddr: ip(client),
            daddr: ip(server),
            sport: client.port().to_be(),
            dport: server.port().to_be(),
            ..Default::default()
        });
        feed.flush();
        let t0 = Instant::now();
        let joined = loop {
            let mut l7 = Vec::new();
            p.store.for_each(|e| {
                if let Entry::Flow(f) = e
                    && let Some(h) = &f.http
                {
                    l7.push(h.downstream_link.is_some());
                }
            });
            if !l7.is_empty() {
                break l7;
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no HTTP flow stored");
            thread::sleep(Duration::from_millis(5));
        };
        assert!(joined.iter().all(|j| *j), "{joined:?}");
        p.stop();
    }

    #[test]
    fn short_ring_records_are_counted_lost() {
        let (p, feed) = Pipeline::start(PipelineConfig::default(), Names::default());
        let good = raw(&Event { proto: 6, ..Default::default() });
        let records = Written(VecDeque::from([good.clone(), good[..good.len() - 1].to_vec(), Vec::new(), good]));
        let reader = spawn_reader(records, feed);
        let t0 = Instant::now();
        while p.counters.flows.load(Ordering::Relaxed) < 2 || p.store.end() < 3 {
            assert!(t0.elapsed() < Duration::from_secs(10), "the pipeline stored nothing");
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(p.counters.events_read.load(Ordering::Relaxed), 2);
        assert_eq!(p.counters.malformed_records.load(Ordering::Relaxed), 2);
        assert_eq!(p.counters.lost(LostSource::KernelRing), 2);
        let mut lost = Vec::new();
        p.store.for_each(|e| {
            if let Entry::Lost(l) = e {
                lost.push((l.source, l.count));
            }
        });
        assert_eq!(lost, vec![(LostSource::KernelRing, 2)]);
        p.stop();
        reader.join().unwrap();
    }
}
