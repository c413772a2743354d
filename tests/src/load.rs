//! A paced, bounded load of new-connection requests from one pod, for the
//! restart tests and the restart probe (benches/benches/restarts.rs): each
//! request opens its own connection at its scheduled time (a thread per
//! request, so a request that hangs does not slow the ones after it), and
//! every outcome is kept so that failures, their kind and the gaps they
//! leave can be counted afterwards.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use crate::http::Client;

/// How one request ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered with this status.
    Status(u16),
    /// The connection was refused or reset before an answer.
    Refused(String),
    /// No answer within the timeout (a hung connection).
    TimedOut,
}

/// One request of a run.
#[derive(Clone, Debug)]
pub struct Request {
    /// Its number in the run (the path is `/load/<n>`).
    pub n: usize,
    /// Which of the targets it went to.
    pub target: usize,
    /// When it started, from the start of the run.
    pub at: Duration,
    /// How long it took to end.
    pub took: Duration,
    pub outcome: Outcome,
}

impl Request {
    pub fn ok(&self) -> bool {
        self.outcome == Outcome::Status(200)
    }
}

/// A finished run: when it started, and every request in order.
pub struct Run {
    pub t0: Instant,
    pub requests: Vec<Request>,
}

/// The load: `count` requests at `rate` per second from `ns`, going round
/// the `targets`; each waits at most `timeout`.
pub struct Load {
    pub ns: String,
    pub targets: Vec<SocketAddr>,
    pub count: usize,
    pub rate: f64,
    pub timeout: Duration,
}

/// The path of request `n`.
pub fn path(n: usize) -> String {
    format!("/load/{n}")
}

fn one(ns: &str, to: SocketAddr, n: usize, timeout: Duration) -> Outcome {
    let r =
        Client::connect(ns, to, None, timeout).and_then(|mut c| c.get("probe", &path(n), &[("connection", "close")]));
    match r {
        Ok(r) => Outcome::Status(r.status),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => {
            Outcome::TimedOut
        }
        Err(e) => Outcome::Refused(e.kind().to_string()),
    }
}

impl Load {
    /// Runs the load; `at` is called on the driving thread at each request
    /// number in it (in order) before that request starts, e.g. to kill a
    /// process in the middle.
    pub fn run(&self, mut at: Vec<(usize, Box<dyn FnOnce() + '_>)>) -> Run {
        at.sort_by_key(|(n, _)| *n);
        let mut at = at.into_iter().peekable();
        let out = Arc::new(Mutex::new(Vec::with_capacity(self.count)));
        let t0 = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / self.rate.max(0.001));
        let mut threads = Vec::with_capacity(self.count);
        for n in 0..self.count {
            while let Some((_, f)) = at.next_if(|(k, _)| *k <= n) {
                f();
            }
            let due = interval.saturating_mul(n as u32);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                thread::sleep(wait);
            }
            let target = n % self.targets.len().max(1);
            let (ns, to, timeout, out) = (self.ns.clone(), self.targets[target], self.timeout, out.clone());
            threads.push(thread::spawn(move || {
                let at = t0.elapsed();
                let outcome = one(&ns, to, n, timeout);
                let took = t0.elapsed().saturating_sub(at);
                out.lock().unwrap().push(Request { n, target, at, took, outcome });
            }));
        }
        for f in at {
            f.1();
        }
        for t in threads {
            let _ = t.join();
        }
        let mut requests = std::mem::take(&mut *out.lock().unwrap());
        requests.sort_by_key(|r| r.n);
        Run { t0, requests }
    }
}

/// Counts of a run, for one target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub sent: usize,
    pub ok: usize,
    pub refused: usize,
    pub timed_out: usize,
    /// Answered, but not with 200.
    pub bad_status: usize,
    /// The longest time between the starts of two successive successful
    /// requests (how long the target was unavailable, at this rate).
    pub longest_gap: Duration,
}

/// The tally of the requests that went to `target`.
pub fn tally(reqs: &[Request], target: usize) -> Tally {
    let mut t = Tally::default();
    let mut last_ok: Option<Duration> = None;
    for r in reqs.iter().filter(|r| r.target == target) {
        t.sent += 1;
        match &r.outcome {
            Outcome::Status(200) => {
                t.ok += 1;
                if let Some(l) = last_ok {
                    t.longest_gap = t.longest_gap.max(r.at.saturating_sub(l));
                }
                last_ok = Some(r.at);
            }
            Outcome::Status(_) => t.bad_status += 1,
            Outcome::Refused(_) => t.refused += 1,
            Outcome::TimedOut => t.timed_out += 1,
        }
    }
    t
}
