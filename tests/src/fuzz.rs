//! A small fuzzing engine on stable Rust, for parsers and decoders that take
//! input from outside: it runs a target over a committed seed corpus and then
//! over mutations of it for as long as asked, and fails, saving the input,
//! when the target panics or takes too long. Mutations know YAML/JSON
//! structure (replace a value with an extreme one, nest it deeper, splice in
//! a subtree or key seen elsewhere, repeat it, change its type) and also work
//! on the raw bytes (invalid UTF-8, YAML anchors and aliases, duplicated
//! lines, truncation). The target returns a signature of what it did (the
//! kinds of problems it reported, say): an input with a new signature joins
//! the pool that later inputs are mutated from, so the search spreads over
//! the target's outcomes rather than circling one.
//!
//! Layout, for a target named `T` (see `tests/tests/fuzz.rs`, and
//! `tests/fuzz.sh T SECONDS`):
//! - `tests/fuzz/T/corpus/`: seeds (committed);
//! - `tests/fuzz/T/regressions/`: inputs that once failed (committed; run
//!   first, every time);
//! - crashes found go to `$WEFT_FUZZ_OUT/T/` (default: `/tmp/weft-fuzz/T/`),
//!   and the failure message says which files to add to `regressions/`; the
//!   input being run is in `current` there, so one that aborts the process
//!   (a stack overflow) is left behind.
//!
//! Targets run on a thread with the stack every thread of the agent gets
//! (`weft_agent::limits::THREAD_STACK_BYTES`), not the test harness's: an
//! input that overflows it here would overflow the agent too.

use std::{
    collections::HashSet,
    hash::{Hash, Hasher},
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::Value;

/// A fuzz target: input bytes in, a signature of the outcome out.
pub type Target = dyn Fn(&[u8]) -> u64 + Sync;

/// How long a run goes on: `WEFT_FUZZ_SECONDS`, else `default`.
pub fn budget(default: Duration) -> Duration {
    std::env::var("WEFT_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(default, Duration::from_secs_f64)
}

/// What a run did.
#[derive(Debug, Default)]
pub struct Report {
    pub executions: u64,
    pub seeds: usize,
    /// Distinct outcome signatures seen.
    pub signatures: usize,
    /// Inputs that panicked or were too slow: (saved file, why).
    pub failures: Vec<(PathBuf, String)>,
    pub elapsed: Duration,
}

/// The directory of a target's committed files.
pub fn target_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(name)
}

fn read_dir(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_file())
        .filter_map(|e| Some((e.path(), std::fs::read(e.path()).ok()?)))
        .collect();
    out.sort();
    out
}

/// A deterministic generator (splitmix64): a run is repeated by its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 { 0 } else { (self.next_u64() % n as u64) as usize }
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        items.get(self.below(items.len()))
    }
}

/// Runs `target` over the regressions, the corpus, then mutations, for
/// `budget`. Panics (failing the test) with the saved inputs if any input
/// panicked the target or took longer than `slow`.
pub fn run(name: &str, target: &Target, budget: Duration, slow: Duration) -> Report {
    // One target at a time: each quiets the process-wide panic hook while it
    // runs (and restores it), and each measures its inputs' time.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    std::thread::scope(|scope| {
        let fuzzing = std::thread::Builder::new()
            .name(format!("fuzz-{name}"))
            .stack_size(weft_agent::limits::THREAD_STACK_BYTES)
            .spawn_scoped(scope, || run_here(name, target, budget, slow))
            .expect("spawning the fuzzing thread");
        fuzzing.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

fn run_here(name: &str, target: &Target, budget: Duration, slow: Duration) -> Report {
    let seed = std::env::var("WEFT_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("fuzz {name}: seed {seed} (WEFT_FUZZ_SEED={seed} repeats this run), budget {budget:?}");
    let mut rng = Rng::new(seed);
    let dir = target_dir(name);
    let regressions = read_dir(&dir.join("regressions"));
    let corpus = read_dir(&dir.join("corpus"));
    assert!(!corpus.is_empty(), "fuzz {name}: no seeds in {}", dir.join("corpus").display());
    let out_dir = std::env::var_os("WEFT_FUZZ_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("weft-fuzz"))
        .join(name);

    // Quiet panics while fuzzing: each is caught, recorded and reported.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut report = Report { seeds: corpus.len(), ..Default::default() };
    let started = Instant::now();
    let mut seen: HashSet<u64> = HashSet::new();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut dictionary = Dictionary::default();
    for (_, bytes) in regressions.iter().chain(&corpus) {
        dictionary.learn(bytes);
    }
    let _ = std::fs::create_dir_all(&out_dir);
    let current = out_dir.join("current");
    let exec = |input: &[u8], report: &mut Report| -> Option<u64> {
        // A stack overflow aborts the process: the input that did it stays here.
        let _ = std::fs::write(&current, input);
        let t0 = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| target(input)));
        let took = t0.elapsed();
        report.executions += 1;
        let why = match &result {
            Err(p) => Some(format!(
                "panicked: {}",
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
            )),
            Ok(_) if took > slow => Some(format!("took {took:?} (more than {slow:?})")),
            Ok(_) => None,
        };
        if let Some(why) = why {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            input.hash(&mut h);
            let file = out_dir.join(format!("{:016x}", h.finish()));
            let _ = std::fs::create_dir_all(&out_dir);
            let _ = std::fs::write(&file, input);
            report.failures.push((file, why));
        }
        result.ok()
    };
    for (_, input) in &regressions {
        exec(input, &mut report);
    }
    let verbose = std::env::var_os("WEFT_FUZZ_VERBOSE").is_some();
    for (path, input) in &corpus {
        let t0 = Instant::now();
        let outcome = exec(input, &mut report);
        if verbose {
            eprintln!("fuzz {name}: seed {} took {:?}", path.display(), t0.elapsed());
        }
        if let Some(sig) = outcome {
            seen.insert(sig);
        }
        pool.push(input.clone());
    }
    let mut last_note = Instant::now();
    while started.elapsed() < budget && report.failures.len() < 10 {
        let Some(base) = rng.pick(&pool).cloned() else { break };
        let input = mutate(&mut rng, &base, &pool, &dictionary);
        if let Some(sig) = exec(&input, &mut report)
            && seen.insert(sig)
            && input.len() < 1 << 20
        {
            dictionary.learn(&input);
            pool.push(input);
        }
        if last_note.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "fuzz {name}: {} runs, {} outcomes, {} in the pool, {:?}",
                report.executions,
                seen.len(),
                pool.len(),
                started.elapsed()
            );
            last_note = Instant::now();
        }
    }
    std::panic::set_hook(hook);
    report.signatures = seen.len();
    report.elapsed = started.elapsed();
    eprintln!(
        "fuzz {name}: {} runs in {:.1?} ({:.0}/s), {} seeds, {} distinct outcomes, {} failures",
        report.executions,
        report.elapsed,
        report.executions as f64 / report.elapsed.as_secs_f64().max(0.001),
        report.seeds,
        report.signatures,
        report.failures.len()
    );
    if !report.failures.is_empty() {
        let lines: Vec<String> = report.failures.iter().map(|(f, why)| format!("  {}: {why}", f.display())).collect();
        panic!(
            "fuzz {name}: {} inputs failed; add each to {} once fixed:\n{}",
            report.failures.len(),
            dir.join("regressions").display(),
            lines.join("\n")
        );
    }
    report
}

/// Keys and scalars seen in the seeds, to splice into mutations.
#[derive(Default)]
pub struct Dictionary {
    keys: Vec<String>,
    strings: Vec<String>,
    known: HashSet<String>,
}

impl Dictionary {
    fn learn(&mut self, bytes: &[u8]) {
        let Some(v) = parse(bytes) else { return };
        let mut stack = vec![&v];
        while let Some(v) = stack.pop() {
            match v {
                Value::Object(o) => {
                    for (k, x) in o {
                        if self.known.insert(format!("k{k}")) {
                            self.keys.push(k.clone());
                        }
                        stack.push(x);
                    }
                }
                Value::Array(a) => stack.extend(a),
                Value::String(s) if s.len() < 200 && self.known.insert(format!("s{s}")) => {
                    self.strings.push(s.clone());
                }
                _ => {}
            }
        }
    }
}

fn parse(bytes: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(bytes).ok()?;
    serde_saphyr::from_str::<Value>(text).ok().filter(|v| v.is_object() || v.is_array())
}

/// Values that break naive parsers and checks.
fn extreme(rng: &mut Rng, dict: &Dictionary) -> Value {
    match rng.below(24) {
        0 => Value::from(-1),
        1 => Value::from(70000),
        2 => Value::from(u64::MAX),
        3 => Value::from(i64::MIN),
        4 => Value::from(4_294_967_296u64),
        5 => serde_json::json!(1e300),
        6 => Value::from(""),
        7 => Value::from("a".repeat(rng.below(5000) + 250)),
        8 => Value::from("envoy-admin"),
        9 => Value::from("other-namespace/x"),
        10 => Value::from("/clusterwide/x"),
        11 => Value::from("127.0.0.1"),
        12 => Value::from("::ffff:169.254.169.254"),
        13 => Value::from("/var/run/weft/xds.sock"),
        14 => Value::from("\u{0}\r\n\u{202e}é"),
        15 => Value::Null,
        16 => Value::Bool(true),
        17 => serde_json::json!({}),
        18 => serde_json::json!([]),
        19 => Value::from("99999999999999999999999s"),
        20 => Value::from(0),
        _ => dict.strings.get(rng.below(dict.strings.len())).cloned().map_or(Value::from("x"), Value::from),
    }
}

/// Every value's position (as a path of keys/indices), to pick one.
fn positions(v: &Value) -> Vec<Vec<PathStep>> {
    let mut out = Vec::new();
    let mut stack = vec![(v, Vec::new())];
    while let Some((v, path)) = stack.pop() {
        match v {
            Value::Object(o) => {
                for (k, x) in o {
                    let mut p = path.clone();
                    p.push(PathStep::Key(k.clone()));
                    stack.push((x, p));
                }
            }
            Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    let mut p = path.clone();
                    p.push(PathStep::Index(i));
                    stack.push((x, p));
                }
            }
            _ => {}
        }
        out.push(path);
        if out.len() > 50_000 {
            break;
        }
    }
    out
}

#[derive(Clone)]
enum PathStep {
    Key(String),
    Index(usize),
}

fn at<'a>(v: &'a mut Value, path: &[PathStep]) -> Option<&'a mut Value> {
    let mut cur = v;
    for step in path {
        cur = match step {
            PathStep::Key(k) => cur.get_mut(k.as_str())?,
            PathStep::Index(i) => cur.get_mut(*i)?,
        };
    }
    Some(cur)
}

fn structural(rng: &mut Rng, v: &mut Value, pool: &[Vec<u8>], dict: &Dictionary) {
    let spots = positions(v);
    let Some(path) = rng.pick(&spots).cloned() else { return };
    let donor = rng.pick(pool).and_then(|b| parse(b));
    let Some(node) = at(v, &path) else { return };
    match rng.below(10) {
        0 | 1 => *node = extreme(rng, dict),
        2 => {
            // Deeper: wrap in objects or lists.
            for _ in 0..rng.below(80) + 1 {
                let inner = std::mem::take(node);
                *node = if rng.chance(2) { serde_json::json!({ "k": inner }) } else { Value::Array(vec![inner]) };
            }
        }
        3 => {
            // A subtree from another input.
            if let Some(mut d) = donor {
                let spots = positions(&d);
                if let Some(p) = rng.pick(&spots).cloned()
                    && let Some(sub) = at(&mut d, &p)
                {
                    *node = sub.clone();
                }
            }
        }
        4 => {
            if let (Value::Object(o), Some(k)) = (&mut *node, rng.pick(&dict.keys)) {
                let value = extreme(rng, dict);
                o.insert(k.clone(), value);
            }
        }
        5 => match node {
            Value::Object(o) if !o.is_empty() => {
                let key = o.keys().nth(rng.below(o.len())).cloned();
                if let Some(k) = key {
                    o.remove(&k);
                }
            }
            Value::Array(a) if !a.is_empty() => {
                let i = rng.below(a.len());
                a.remove(i);
            }
            _ => *node = Value::Null,
        },
        6 => {
            // Repeat a list's item (many resources, many routes).
            if let Value::Array(a) = node
                && let Some(x) = a.first().cloned()
            {
                let most = if rng.chance(8) { 1200 } else { 8 };
                for _ in 0..rng.below(most) {
                    a.push(x.clone());
                }
            }
        }
        7 => {
            // Change the type.
            *node = match std::mem::take(node) {
                Value::String(s) => {
                    s.parse::<f64>().map_or(Value::Array(vec![Value::String(s)]), |f| serde_json::json!(f))
                }
                Value::Number(n) => Value::String(n.to_string()),
                Value::Object(o) => Value::Array(o.into_values().collect()),
                Value::Array(a) => Value::Object(a.into_iter().enumerate().map(|(i, x)| (i.to_string(), x)).collect()),
                other => Value::String(format!("{other}")),
            }
        }
        8 => {
            // Names into other namespaces and the admin cluster.
            if let Value::String(s) = node {
                *s = match rng.below(4) {
                    0 => format!("other/{s}"),
                    1 => "envoy-admin".into(),
                    2 => format!("{s}/{s}"),
                    _ => s.repeat(rng.below(100) + 2),
                };
            }
        }
        _ => {
            if let Some(k) = rng.pick(&dict.strings) {
                *node = Value::String(k.clone());
            }
        }
    }
}

fn bytewise(rng: &mut Rng, text: &mut Vec<u8>) {
    let pos = rng.below(text.len() + 1);
    match rng.below(8) {
        0 => {
            if pos < text.len() {
                text[pos] = rng.next_u64() as u8;
            }
        }
        1 => text.splice(pos..pos, [0xff, 0xfe, 0xc3]).for_each(drop),
        2 => {
            // Duplicate a line (a duplicate key, often).
            let start = text[..pos].iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            let end = text[pos..].iter().position(|b| *b == b'\n').map_or(text.len(), |i| pos + i + 1);
            let line = text[start..end].to_vec();
            text.splice(end..end, line).for_each(drop);
        }
        3 => {
            // An alias bomb in front.
            let mut bomb = b"a: &a [\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\"]\n".to_vec();
            for i in 0..(rng.below(12) + 2) {
                let prev = (b'a' + i as u8) as char;
                let next = (b'a' + i as u8 + 1) as char;
                bomb.extend(
                    format!(
                        "{next}: &{next} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"
                    )
                    .bytes(),
                );
            }
            text.splice(0..0, bomb).for_each(drop);
        }
        4 => text.truncate(pos),
        5 => text.splice(pos..pos, b"\n---\n".iter().copied()).for_each(drop),
        6 => text.splice(pos..pos, b"&anchor ".iter().copied()).for_each(drop),
        _ => text.splice(pos..pos, b"*anchor".iter().copied()).for_each(drop),
    }
}

/// One to four mutations of `base`.
pub fn mutate(rng: &mut Rng, base: &[u8], pool: &[Vec<u8>], dict: &Dictionary) -> Vec<u8> {
    let rounds = rng.below(4) + 1;
    if let (Some(mut v), false) = (parse(base), rng.chance(5)) {
        for _ in 0..rounds {
            structural(rng, &mut v, pool, dict);
        }
        let mut out = if rng.chance(2) {
            serde_json::to_vec(&v).unwrap_or_default()
        } else {
            serde_saphyr::to_string(&v).map(String::into_bytes).unwrap_or_default()
        };
        if rng.chance(6) {
            bytewise(rng, &mut out);
        }
        return out;
    }
    let mut out = base.to_vec();
    for _ in 0..rounds {
        bytewise(rng, &mut out);
    }
    out
}
