//! The flow store: a bounded ring of recent flows, numbered in order. One
//! writer (the pipeline) appends whole batches; readers copy out what they
//! need under a short lock and never hold the writer up. A reader that falls
//! so far behind that its next flow was overwritten learns how many it missed.
//!
//! Nothing a client controls runs under the lock: scans ([`FlowStore::find_back`],
//! [`FlowStore::for_each`]) copy [`SCAN_CHUNK`] entries at a time (cheap:
//! entries share their parts) and run the client's filters on the copy, so a
//! query with costly regular expressions over a full store delays the writer
//! by one copy at most.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::Notify;

use super::record::Entry;

/// Counting the flow rate over this many seconds.
const RATE_WINDOW_SECS: u64 = 60;
/// Entries a scan copies out per lock.
pub const SCAN_CHUNK: usize = 256;

struct Ring {
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]`.
    first_seq: u64,
    /// Flows stored per second, for the rate: (unix second, count).
    per_second: VecDeque<(u64, u64)>,
}

/// See the module doc.
pub struct FlowStore {
    ring: Mutex<Ring>,
    capacity: usize,
    /// Wakes followers when a batch lands.
    pub notify: Notify,
    seen: AtomicU64,
    /// Followers waiting for the store to reach a position ([`FlowStore::wake_at`]).
    waiting: Mutex<Vec<(u64, Arc<Notify>)>>,
    /// The lowest position in `waiting` (`u64::MAX`: none), so that a push
    /// nobody waits for costs one load.
    next_wake: AtomicU64,
}

/// What a read returned.
#[derive(Debug, Default)]
pub struct Read {
    /// Entries overwritten between the requested position and the oldest
    /// one still held.
    pub missed: u64,
    /// The position after the last entry returned.
    pub next: u64,
}

/// Numbers for ServerStatus.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StoreStats {
    pub num_flows: u64,
    pub max_flows: u64,
    pub seen_flows: u64,
    /// Flows per second over the last minute.
    pub rate: f64,
}

impl FlowStore {
    /// A store holding at most `capacity` entries (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        FlowStore {
            ring: Mutex::new(Ring {
                entries: VecDeque::with_capacity(capacity.min(1 << 16)),
                first_seq: 0,
                per_second: VecDeque::new(),
            }),
            capacity,
            notify: Notify::new(),
            seen: AtomicU64::new(0),
            waiting: Mutex::new(Vec::new()),
            next_wake: AtomicU64::new(u64::MAX),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Appends a batch (oldest first), overwriting the oldest entries when full.
    /// `now_secs` is the wall-clock second, for the rate.
    pub fn push_batch(&self, batch: &mut Vec<Entry>, now_secs: u64) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len() as u64;
        let end = {
            let mut ring = self.ring.lock().unwrap();
            for e in batch.drain(..) {
                if ring.entries.len() == self.capacity {
                    ring.entries.pop_front();
                    ring.first_seq += 1;
                }
                ring.entries.push_back(e);
            }
            match ring.per_second.back_mut() {
                Some((s, c)) if *s == now_secs => *c += n,
                _ => ring.per_second.push_back((now_secs, n)),
            }
            while ring.per_second.front().is_some_and(|(s, _)| s + RATE_WINDOW_SECS < now_secs) {
                ring.per_second.pop_front();
            }
            ring.first_seq + ring.entries.len() as u64
        };
        self.seen.fetch_add(n, Ordering::Relaxed);
        self.notify.notify_waiters();
        if end >= self.next_wake.load(Ordering::SeqCst) {
            let mut waiting = self.waiting.lock().unwrap();
            waiting.retain(|(pos, wake)| {
                if *pos <= end {
                    wake.notify_one();
                }
                *pos > end
            });
            let next = waiting.iter().map(|(pos, _)| *pos).min().unwrap_or(u64::MAX);
            self.next_wake.store(next, Ordering::SeqCst);
        }
    }

    /// Has `wake` notified (once) when the store's end reaches `pos`: at
    /// once if it already has. A follower gathering flows reads when enough
    /// have arrived to matter, whatever the rate, instead of guessing the
    /// rate from its last read (a guess that was wrong whenever flows came
    /// in bursts, and then the store overwrote what it had not read). One
    /// wait per `wake`: a new one replaces the previous.
    pub fn wake_at(&self, pos: u64, wake: &Arc<Notify>) {
        self.forget(wake);
        self.waiting.lock().unwrap().push((pos, wake.clone()));
        // Stored before the end is read below: a push that the read misses
        // sees this position (the ring's lock orders the two).
        self.next_wake.fetch_min(pos, Ordering::SeqCst);
        if self.end() >= pos {
            self.forget(wake);
            wake.notify_one();
        }
    }

    /// Withdraws `wake`'s wait (a follower that goes away).
    pub fn forget(&self, wake: &Arc<Notify>) {
        self.waiting.lock().unwrap().retain(|(_, w)| !Arc::ptr_eq(w, wake));
    }

    /// The position the next entry will get (one past the newest).
    pub fn end(&self) -> u64 {
        let ring = self.ring.lock().unwrap();
        ring.first_seq + ring.entries.len() as u64
    }

    /// The oldest position still held.
    pub fn start(&self) -> u64 {
        self.ring.lock().unwrap().first_seq
    }

    /// Copies up to `max` entries from position `from` into `out` (with their
    /// positions).
    pub fn read(&self, from: u64, max: usize, out: &mut Vec<(u64, Entry)>) -> Read {
        let ring = self.ring.lock().unwrap();
        let end = ring.first_seq + ring.entries.len() as u64;
        // A position past the end (a client's, say) reads nothing, from the end.
        let start = from.max(ring.first_seq).min(end);
        let missed = start.saturating_sub(from);
        let take = ((end - start) as usize).min(max);
        let offset = (start - ring.first_seq) as usize;
        out.extend(ring.entries.range(offset..offset + take).enumerate().map(|(i, e)| (start + i as u64, e.clone())));
        Read { missed, next: start + take as u64 }
    }

    /// Walks back from the newest entry and returns the position of the
    /// oldest of the last `count` entries `pick` accepts (`None` for `count`:
    /// as far back as `pick` keeps accepting). `pick` returns None to stop
    /// the walk (an entry older than the window). `pick` runs without the
    /// lock, on copies; entries overwritten meanwhile end the walk (the
    /// reader is then told it missed them).
    pub fn find_back(&self, count: Option<u64>, mut pick: impl FnMut(u64, &Entry) -> Option<bool>) -> u64 {
        let mut pos = self.end();
        if count == Some(0) {
            return pos;
        }
        let mut found = 0u64;
        let mut next = pos;
        let mut chunk = Vec::with_capacity(SCAN_CHUNK);
        loop {
            chunk.clear();
            let lo = {
                let ring = self.ring.lock().unwrap();
                let first = ring.first_seq;
                if next <= first {
                    return pos;
                }
                let lo = next.saturating_sub(SCAN_CHUNK as u64).max(first);
                chunk.extend(ring.entries.range((lo - first) as usize..(next - first) as usize).cloned());
                lo
            };
            for (i, e) in chunk.iter().enumerate().rev() {
                let seq = lo + i as u64;
                match pick(seq, e) {
                    None => return pos,
                    Some(true) => {
                        found += 1;
                        pos = seq;
                        if count.is_some_and(|c| found >= c) {
                            return pos;
                        }
                    }
                    Some(false) => pos = seq,
                }
            }
            next = lo;
        }
    }

    /// Visits every held entry, oldest first (for listing namespaces), on
    /// copies taken [`SCAN_CHUNK`] at a time.
    pub fn for_each(&self, mut f: impl FnMut(&Entry)) {
        let (mut pos, end) = (self.start(), self.end());
        let mut chunk = Vec::with_capacity(SCAN_CHUNK);
        while pos < end {
            chunk.clear();
            let read = self.read(pos, SCAN_CHUNK.min((end - pos) as usize), &mut chunk);
            if chunk.is_empty() {
                return;
            }
            for (_, e) in &chunk {
                f(e);
            }
            pos = read.next;
        }
    }

    /// Entries stored since the start, read without the lock.
    pub fn seen(&self) -> u64 {
        self.seen.load(Ordering::Relaxed)
    }

    pub fn stats(&self, now_secs: u64) -> StoreStats {
        let ring = self.ring.lock().unwrap();
        let recent: u64 =
            ring.per_second.iter().filter(|(s, _)| s + RATE_WINDOW_SECS >= now_secs).map(|(_, c)| c).sum();
        StoreStats {
            num_flows: ring.entries.len() as u64,
            max_flows: self.capacity as u64,
            seen_flows: self.seen.load(Ordering::Relaxed),
            rate: recent as f64 / RATE_WINDOW_SECS as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::record::{Lost, LostSource};

    fn lost(n: u64) -> Entry {
        Entry::Lost(Lost { source: LostSource::KernelRing, count: n, cpu: None, time_ns: n })
    }

    fn count(e: &Entry) -> u64 {
        match e {
            Entry::Lost(l) => l.count,
            Entry::Flow(_) => unreachable!(),
        }
    }

    #[test]
    fn overwrites_oldest_and_tells_slow_readers_what_they_missed() {
        let s = FlowStore::new(4);
        s.push_batch(&mut (0..3).map(lost).collect(), 100);
        let mut out = Vec::new();
        let r = s.read(0, 10, &mut out);
        assert_eq!((r.missed, r.next, out.len()), (0, 3, 3));
        s.push_batch(&mut (3..10).map(lost).collect(), 100);
        assert_eq!((s.start(), s.end()), (6, 10));
        out.clear();
        let r = s.read(3, 2, &mut out);
        assert_eq!((r.missed, r.next), (3, 8), "3, 4, 5 were overwritten");
        assert_eq!(out.iter().map(|(p, e)| (*p, count(e))).collect::<Vec<_>>(), [(6, 6), (7, 7)]);
        let st = s.stats(100);
        assert_eq!((st.num_flows, st.max_flows, st.seen_flows), (4, 4, 10));
        assert!((st.rate - 10.0 / 60.0).abs() < 1e-9);
        assert_eq!(s.stats(100 + 61).rate, 0.0, "the window moves on");
        out.clear();
        let r = s.read(u64::MAX, 10, &mut out);
        assert_eq!((r.missed, r.next, out.len()), (0, 10, 0), "a position past the end reads nothing");
    }

    #[tokio::test]
    async fn a_waiter_is_woken_once_the_store_reaches_its_position() {
        let s = FlowStore::new(100);
        let wake = Arc::new(Notify::new());
        s.push_batch(&mut (0..3).map(lost).collect(), 1);
        s.wake_at(10, &wake);
        s.push_batch(&mut (3..9).map(lost).collect(), 1);
        let woken =
            || async { tokio::time::timeout(std::time::Duration::from_millis(20), wake.notified()).await.is_ok() };
        assert!(!woken().await, "9 entries: not yet");
        s.push_batch(&mut (9..12).map(lost).collect(), 1);
        assert!(woken().await, "12 entries: past 10");
        assert_eq!(s.next_wake.load(Ordering::SeqCst), u64::MAX, "nobody waits now");
        // A position already reached wakes at once; a new wait replaces the old.
        s.wake_at(5, &wake);
        assert!(woken().await);
        s.wake_at(20, &wake);
        s.wake_at(30, &wake);
        s.push_batch(&mut (12..25).map(lost).collect(), 1);
        assert!(!woken().await, "the wait at 20 was replaced by the one at 30");
        s.forget(&wake);
        s.push_batch(&mut (25..40).map(lost).collect(), 1);
        assert!(!woken().await, "a forgotten wait wakes nobody");
        assert!(s.waiting.lock().unwrap().is_empty());
    }

    #[test]
    fn find_back_counts_only_accepted_entries_and_stops_at_the_window() {
        let s = FlowStore::new(100);
        s.push_batch(&mut (0..20).map(lost).collect(), 1);
        // The last 3 even ones: 14, 16, 18.
        assert_eq!(s.find_back(Some(3), |_, e| Some(count(e).is_multiple_of(2))), 14);
        // Everything newer than 12 (entries at or before 12 stop the walk).
        assert_eq!(s.find_back(None, |_, e| (count(e) > 12).then_some(true)), 13);
        assert_eq!(s.find_back(Some(0), |_, _| Some(true)), 20, "zero flows: start at the end");
    }

    /// Scans run the caller's `pick` (a client's filters) without the lock
    /// the writer needs, across chunks, and still find the right start.
    #[test]
    fn scans_run_their_filters_without_the_lock() {
        let n = 3 * SCAN_CHUNK as u64 + 7;
        let s = FlowStore::new(10_000);
        s.push_batch(&mut (0..n).map(lost).collect(), 1);
        let mut visited = 0u64;
        let pos = s.find_back(None, |_, e| {
            assert!(s.ring.try_lock().is_ok(), "the lock is free while a filter runs");
            visited += 1;
            (count(e) >= 5).then_some(true)
        });
        assert_eq!((pos, visited), (5, n - 4), "walked back across every chunk to the window's start");
        assert_eq!(s.find_back(Some(SCAN_CHUNK as u64 + 2), |_, _| Some(true)), n - SCAN_CHUNK as u64 - 2);
        let mut all = Vec::new();
        s.for_each(|e| {
            assert!(s.ring.try_lock().is_ok());
            all.push(count(e));
        });
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        // Entries overwritten while a scan walks end the walk at the oldest held.
        let small = FlowStore::new(2 * SCAN_CHUNK);
        small.push_batch(&mut (0..2 * SCAN_CHUNK as u64).map(lost).collect(), 1);
        let mut pushed = false;
        let pos = small.find_back(None, |_, _| {
            if !pushed {
                pushed = true;
                small.push_batch(&mut (0..2 * SCAN_CHUNK as u64).map(lost).collect(), 1);
            }
            Some(false)
        });
        assert_eq!(pos, SCAN_CHUNK as u64, "the first chunk's entries, then nothing older is held");
    }
}
