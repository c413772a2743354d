//! Counting the access-log entries Envoy served but could not write: every
//! request an Envoy completes on an HTTP connection manager is a line in
//! the spool (the agent adds its logger to each one), unless Envoy could not
//! write it: the spool's file was at `envoy.spool-limit` (the write failed
//! and Envoy dropped its buffer), or Envoy was killed before it flushed its
//! buffer (every 100 ms). Envoy's own access-log stats count write calls,
//! not lines, and die with it; so the supervisor reads how many requests
//! each Envoy served (`http.*.downstream_rq_completed`) and compares that
//! with the lines of that Envoy the reader committed (each line names its
//! Envoy, `accesslog::WRITER_ENV`).
//!
//! The count only ever rises to what is certainly lost: a reading of the
//! requests served (A) is compared only once Envoy's buffers were empty
//! after it (B: `filesystem.write_total_buffered` 0, or two of Envoy's file
//! writes since A, written or failed, so every entry of a request served
//! before A was written or dropped: under steady traffic a flush buffer is
//! seldom empty, and each flush of it takes what it held) and the reader had
//! read everything after that (C). Lines written after A only make the
//! difference smaller, so it never counts a line that arrives later. When
//! an Envoy exits, its last reading is compared once the reader has read
//! all it wrote: a request it served after that last reading (at most
//! [`POLL`] before its death, or [`next_poll`]'s longer wait on an Envoy
//! with many stats) whose entry it did not flush is not counted.
//!
//! A reading is not free for Envoy: its admin interface renders the stats
//! on Envoy's main thread, and the time grows with the number of stats
//! (listeners and clusters). So only stats that were ever written are
//! asked for (`usedonly`: a connection manager that completed no request,
//! an access log that never buffered, has nothing to say), and a slow
//! reading makes the next one wait longer. Measured (issue 15, Envoy
//! 1.40): 2,500 stats cost 3.4 ms of Envoy's CPU per reading, 1.0 ms with
//! `usedonly`; 13,000 stats 13.9 ms and 4.1 ms. Every 100 ms, the former
//! was 16 % more Envoy CPU per request at 500 requests/s.
//! The count per Envoy is kept in the state directory, so an agent that
//! adopts a running Envoy does not count its losses again.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use weft_observe::pipeline::{
    Pipeline,
    accesslog::WRITER_ENV,
    record::LostSource,
    spool::{Progress, Writers},
};

/// How often the supervisor reads Envoy's counts (at most).
pub const POLL: Duration = Duration::from_millis(100);
/// A reading takes at most about 1/READING_SHARE of the time between two.
const READING_SHARE: u32 = 20;
/// The longest wait between two readings; also how long one may take.
pub const POLL_MAX: Duration = Duration::from_secs(5);
/// From a reading of the requests served to a reading of empty buffers:
/// more than the time from a request's completion to its entry being
/// logged (the same pass of Envoy's event loop).
const SETTLE: Duration = Duration::from_millis(100);
/// An exited Envoy's count is given up if the reader has not read all it
/// wrote by then.
const CLOSE_WITHIN: Duration = Duration::from_secs(60);
/// The file, in the state directory, with the count of each Envoy.
const FILE: &str = "access-log-unwritten";
/// What Envoy's `/stats` is asked for, one stat type per request: Envoy
/// renders an answer on its main thread, which also applies xDS updates,
/// and walks every stat of the types asked for. At 10,000 configs one
/// request for all types held that thread 288-309 ms, one for counters
/// alone 103-133 ms, one for gauges alone 114-133 ms (benches/results,
/// 2026-12-04): a change that arrives during a reading waits half as long.
pub const STATS_PATHS: [&str; 2] = [
    "/stats?usedonly&type=Counters&filter=(downstream_rq_completed|filesystem.write_(completed|failed))$",
    "/stats?usedonly&type=Gauges&filter=filesystem.write_total_buffered$",
];

/// The wait before the next reading, after one that took `took`: [`POLL`],
/// or longer when readings are slow, so that they keep to a small share of
/// Envoy's main thread (which also applies configuration changes).
pub fn next_poll(took: Duration) -> Duration {
    took.saturating_mul(READING_SHARE).clamp(POLL, POLL_MAX)
}

/// One reading of Envoy's counts (`/stats` text lines).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// Requests completed per HTTP connection manager (`http.<prefix>.`),
    /// the admin interface's left out.
    pub completed: BTreeMap<String, u64>,
    /// Bytes in Envoy's file access-log buffers, not yet written.
    pub buffered: u64,
    /// Envoy's file writes so far, written or failed (each takes what one
    /// file's flush buffer held).
    pub writes: u64,
}

impl Reading {
    pub fn parse(stats: &str) -> Reading {
        let mut r = Reading::default();
        for line in stats.lines() {
            let Some((name, value)) = line.split_once(": ") else { continue };
            let Ok(value) = value.trim().parse::<u64>() else { continue };
            if name == "filesystem.write_total_buffered" {
                r.buffered = value;
            } else if name == "filesystem.write_completed" || name == "filesystem.write_failed" {
                r.writes = r.writes.saturating_add(value);
            } else if let Some(prefix) =
                name.strip_prefix("http.").and_then(|n| n.strip_suffix(".downstream_rq_completed"))
                && prefix != "admin"
            {
                r.completed.insert(prefix.to_owned(), value);
            }
        }
        r
    }
}

/// Requests an Envoy served, kept rising when a connection manager's
/// counter goes away (its listener removed) or starts again from 0.
#[derive(Debug, Default)]
struct Served {
    last: BTreeMap<String, u64>,
    retired: u64,
}

impl Served {
    fn update(&mut self, completed: &BTreeMap<String, u64>) -> u64 {
        for (name, old) in &self.last {
            match completed.get(name) {
                Some(new) if new >= old => {}
                _ => self.retired = self.retired.saturating_add(*old),
            }
        }
        self.last = completed.clone();
        self.total()
    }

    fn total(&self) -> u64 {
        self.last.values().fold(self.retired, |a, b| a.saturating_add(*b))
    }
}

/// Where one comparison stands.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// Requests served as read at this instant, and Envoy's file writes then.
    Served(u64, Instant, u64),
    /// ... and Envoy's buffers were empty at this later instant.
    Flushed(u64, Instant),
}

/// One Envoy process's count.
#[derive(Debug)]
struct Account {
    writer: u64,
    served: Served,
    stage: Option<Stage>,
    /// Entries counted lost so far.
    counted: u64,
}

impl Account {
    /// The Envoy's lines the reader committed, if the progress can tell.
    fn lines(&self, p: &Progress) -> Option<u64> {
        let Writers { current, previous } = p.writers;
        if self.writer == current.writer {
            Some(current.lines.saturating_add(u64::from(p.partial)))
        } else if self.writer == previous.writer {
            Some(previous.lines)
        } else if self.writer > current.writer {
            // The reader has met no line of this Envoy yet; a partial line
            // at the end may be its first.
            Some(u64::from(p.partial))
        } else {
            None
        }
    }

    /// Counts what is certainly lost by `served` (read before `since`) if
    /// the reader has read everything since; true once compared.
    fn compare(&mut self, served: u64, since: Instant, progress: Option<Progress>, pipeline: &Pipeline) -> bool {
        let Some(p) = progress.filter(|p| p.at > since) else { return false };
        let Some(lines) = self.lines(&p) else { return true };
        let lost = served.saturating_sub(lines);
        if lost > self.counted {
            pipeline.lose(LostSource::Proxy, lost - self.counted);
            tracing::warn!(
                envoy = self.writer,
                served,
                lines,
                "{} access-log entries Envoy served but could not write (spool at its limit, or a killed Envoy's buffer): counted lost",
                lost - self.counted
            );
            self.counted = lost;
        }
        true
    }
}

/// The counts of the running Envoy and of one that exited and whose last
/// lines the reader may still be reading.
pub struct Ledger {
    pipeline: Arc<Pipeline>,
    file: PathBuf,
    live: Option<Account>,
    closing: Option<(Account, Instant)>,
}

impl Ledger {
    pub fn new(pipeline: Arc<Pipeline>, state_dir: &Path) -> Ledger {
        Ledger { pipeline, file: state_dir.join(FILE), live: None, closing: None }
    }

    /// Counts for an Envoy from now on: `writer` is its id (`None`: an Envoy
    /// started without one, by an older agent, whose lines cannot be told
    /// apart: not counted). An adopted Envoy goes on from the count kept.
    pub fn envoy(&mut self, writer: Option<u64>) {
        self.live = writer.map(|writer| {
            let counted = self.kept().get(&writer).copied().unwrap_or(0);
            Account { writer, served: Served::default(), stage: None, counted }
        });
        if writer.is_none() {
            tracing::info!("the running Envoy has no {}: entries it cannot write are not counted", WRITER_ENV);
        }
    }

    /// The Envoy exited: what it wrote is all there is (its files sealed).
    /// Its last reading of requests served is compared once the reader has
    /// read it all.
    pub fn exited(&mut self) {
        if let Some(mut a) = self.live.take() {
            let now = Instant::now();
            a.stage = Some(Stage::Flushed(a.served.total(), now));
            self.closing = Some((a, now));
        }
    }

    /// Takes a reading of the running Envoy (`None`: it did not answer) and
    /// compares what can be compared.
    pub fn tick(&mut self, reading: Option<Reading>) {
        let progress = *self.pipeline.spool_progress.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.counts();
        if let Some((a, since)) = &mut self.closing
            && let Some(Stage::Flushed(served, at)) = a.stage
            && (a.compare(served, at, progress, &self.pipeline) || since.elapsed() > CLOSE_WITHIN)
        {
            self.closing = None;
        }
        if let (Some(a), Some(r)) = (&mut self.live, reading) {
            let now = Instant::now();
            let served = a.served.update(&r.completed);
            a.stage = match a.stage {
                None => Some(Stage::Served(served, now, r.writes)),
                // Two writes since: the second began after the reading.
                Some(Stage::Served(s, at, writes))
                    if at.elapsed() >= SETTLE && (r.buffered == 0 || r.writes >= writes.saturating_add(2)) =>
                {
                    Some(Stage::Flushed(s, now))
                }
                Some(Stage::Flushed(s, at)) => {
                    if a.compare(s, at, progress, &self.pipeline) {
                        Some(Stage::Served(served, now, r.writes))
                    } else {
                        Some(Stage::Flushed(s, at))
                    }
                }
                stage => stage,
            };
        }
        if self.counts() != before {
            self.keep();
        }
    }

    /// Requests the running Envoy served, as last read, and the entries of
    /// it counted lost.
    pub fn served_and_lost(&self) -> Option<(u64, u64)> {
        self.live.as_ref().map(|a| (a.served.total(), a.counted))
    }

    fn counts(&self) -> Vec<(u64, u64)> {
        self.live.iter().chain(self.closing.iter().map(|(a, _)| a)).map(|a| (a.writer, a.counted)).collect()
    }

    fn kept(&self) -> BTreeMap<u64, u64> {
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (w, n) = l.split_once(' ')?;
                Some((w.parse().ok()?, n.parse().ok()?))
            })
            .collect()
    }

    fn keep(&self) {
        let text: String = self.counts().iter().map(|(w, n)| format!("{w} {n}\n")).collect();
        let tmp = self.file.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.file)) {
            tracing::warn!("keeping the count of unwritten access-log entries in {}: {e}", self.file.display());
        }
    }
}

/// The id a running Envoy was started with ([`WRITER_ENV`] in its
/// environment).
pub fn writer_of(pid: u32) -> Option<u64> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|kv| {
        let v = kv.strip_prefix(WRITER_ENV.as_bytes())?.strip_prefix(b"=")?;
        std::str::from_utf8(v).ok()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_readings_are_taken_less_often() {
        assert_eq!(next_poll(Duration::from_millis(1)), POLL);
        assert_eq!(next_poll(Duration::from_millis(50)), Duration::from_secs(1));
        assert_eq!(next_poll(Duration::from_secs(3)), POLL_MAX);
    }

    #[test]
    fn a_reading_is_the_connection_managers_requests_and_the_buffered_bytes() {
        let r = Reading::parse(
            "filesystem.write_total_buffered: 120\n\
             filesystem.write_completed: 30\n\
             filesystem.write_failed: 2\n\
             http.admin.downstream_rq_completed: 9\n\
             http.default/hello.downstream_rq_completed: 4\n\
             http.ingress.http.downstream_rq_completed: 2\n\
             listener.127.0.0.1_15001.http.default/hello.downstream_rq_completed: 4\n\
             http.bad.downstream_rq_completed: many\n",
        );
        assert_eq!((r.buffered, r.writes), (120, 32));
        let want: BTreeMap<String, u64> = [("default/hello".into(), 4), ("ingress.http".into(), 2)].into();
        assert_eq!(r.completed, want);
    }

    /// Under steady traffic Envoy's flush buffer is seldom empty when read:
    /// a reading is compared once Envoy wrote twice since it (the second
    /// write began after it, and took every entry buffered before), not
    /// after one write.
    #[test]
    fn a_reading_is_compared_after_two_writes_since_though_the_buffer_never_empties() {
        use weft_observe::pipeline::{PipelineConfig, enrich::Names, spool::WriterLines};
        let (pipeline, _feed) = Pipeline::start(PipelineConfig::default(), Names::default());
        let dir = std::env::temp_dir().join(format!("weft-ledger-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ledger = Ledger::new(pipeline.clone(), &dir);
        ledger.envoy(Some(7));
        let reading = |served: u64, writes: u64| {
            Some(Reading { completed: BTreeMap::from([("c".to_owned(), served)]), buffered: 512, writes })
        };
        let read_all = |lines: u64| {
            let current = WriterLines { writer: 7, lines };
            let p = Progress { at: Instant::now(), writers: Writers { current, ..Default::default() }, partial: false };
            *pipeline.spool_progress.lock().unwrap() = Some(p);
        };
        let lost = || pipeline.counters.lost(LostSource::Proxy);
        ledger.tick(reading(10, 3));
        std::thread::sleep(SETTLE);
        ledger.tick(reading(12, 4));
        read_all(8);
        ledger.tick(reading(12, 4));
        assert_eq!(lost(), 0, "one write since the reading: not compared");
        ledger.tick(reading(14, 5));
        std::thread::sleep(Duration::from_millis(2));
        read_all(8);
        ledger.tick(reading(14, 5));
        assert_eq!(lost(), 2, "10 served before the reading, 8 lines");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn requests_served_keep_rising_when_a_counter_goes_away_or_restarts() {
        let mut s = Served::default();
        let m = |v: &[(&str, u64)]| v.iter().map(|(k, n)| (k.to_string(), *n)).collect::<BTreeMap<_, _>>();
        assert_eq!(s.update(&m(&[("a", 3), ("b", 2)])), 5);
        assert_eq!(s.update(&m(&[("a", 4)])), 6, "b's listener removed: its 2 stay");
        assert_eq!(s.update(&m(&[("a", 4), ("b", 1)])), 7, "b again, from 0");
        assert_eq!(s.update(&m(&[("a", 1), ("b", 1)])), 8, "a restarted from 0");
    }
}
