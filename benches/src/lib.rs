//! Shared pieces of weft's benchmarks: percentiles and report tables.

use std::time::Duration;

/// Sorted samples with percentile lookup.
pub struct Samples(Vec<Duration>);

impl Samples {
    pub fn new(mut v: Vec<Duration>) -> Self {
        v.sort();
        Self(v)
    }

    /// The p-th percentile (0..=100), nearest rank.
    pub fn pct(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let idx = ((p / 100.0) * (self.0.len() as f64 - 1.0)).round() as usize;
        self.0[idx.min(self.0.len() - 1)]
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Microseconds with two decimals.
pub fn us(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e6)
}

/// a / b with two decimals.
pub fn ratio(a: Duration, b: Duration) -> String {
    if b.is_zero() { "n/a".into() } else { format!("{:.2}", a.as_secs_f64() / b.as_secs_f64()) }
}

/// One line describing the machine the figures come from.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpu}, {cores} cores, Linux {}", kernel.trim())
}

/// Saves a benchmark's figures as JSON in `$WEFT_BENCH_OUT/<name>.json`
/// (for `benches/report.sh`); does nothing when the variable is unset.
pub fn save(name: &str, figures: serde_json::Value) {
    let Some(dir) = std::env::var_os("WEFT_BENCH_OUT") else { return };
    let dir = std::path::PathBuf::from(dir);
    let mut figures = figures;
    figures["machine"] = machine().into();
    std::fs::create_dir_all(&dir).expect("creating WEFT_BENCH_OUT");
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&figures).unwrap()).expect("writing figures");
    eprintln!("figures saved to {}", path.display());
}

/// A percentile row as JSON: p50 and p99 in microseconds.
pub fn pct_json(s: &Samples) -> serde_json::Value {
    serde_json::json!({"p50_us": s.pct(50.0).as_secs_f64() * 1e6, "p99_us": s.pct(99.0).as_secs_f64() * 1e6, "n": s.len()})
}
