//! Where the agent's memory goes with many EnvoyConfigs written at once (not
//! a test: `WEFT_PROFILE_CONFIGS=10000 cargo test -p weft-agent --lib
//! profile_memory -- --ignored --nocapture`). The control-plane bench's
//! objects (a Service, its EndpointSlice and an EnvoyConfig each) go through
//! the path the agent takes with an objects directory: the directory source
//! reads and parses the file, the controller loads and builds, the status is
//! made and written as `/status` writes it, and every resource is encoded
//! into the delta responses the ADS server sends a new stream. Each phase
//! prints the heap the process holds after it, the most it held during it
//! (the test allocator's counts, every thread), and the process's RSS and
//! peak RSS (VmHWM), which also count the allocator's free lists.

use std::net::Ipv4Addr;

use prost::Message;

use crate::{
    controller::Controller,
    k8s::yaml::DirSource,
    test_alloc,
    xds::{
        envoyconfig,
        ports::ProxyPorts,
        server::{self, PUSH_ORDER},
    },
};

/// `field` of /proc/self/status in KiB.
fn proc_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// Prints one phase's figures (MiB) and starts the next phase's peak.
/// With `WEFT_PROFILE_TRIM=1`, the allocator gives its free pages back to
/// the system first (what of the RSS is free memory the allocator keeps).
fn phase(name: &str, n: usize) {
    if std::env::var_os("WEFT_PROFILE_TRIM").is_some_and(|v| v == "1") {
        // SAFETY: glibc's malloc_trim only returns free memory to the system.
        unsafe { libc::malloc_trim(0) };
    }
    let mib = |b: isize| b as f64 / (1 << 20) as f64;
    let (live, peak) = (test_alloc::process_live(), test_alloc::take_peak());
    let per = |x: isize| if n == 0 { 0 } else { x / n as isize };
    println!(
        "| {name} | {:.1} | {:.1} | {} | {} | {:.1} | {:.1} |",
        mib(live),
        mib(peak),
        per(live),
        per(test_alloc::process_blocks()),
        proc_kib("VmRSS:") as f64 / 1024.0,
        proc_kib("VmHWM:") as f64 / 1024.0,
    );
}

/// How many configs a profile loads: `WEFT_PROFILE_CONFIGS`, else 1,000.
pub(crate) fn configs_wanted() -> usize {
    std::env::var("WEFT_PROFILE_CONFIGS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000)
}

/// An empty directory of this process for a profile's files.
pub(crate) fn empty_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-profile-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
#[ignore]
fn memory_with_many_configs_written_at_once() {
    let n = configs_wanted();
    let dir = empty_dir("memory");
    std::fs::write(dir.join("objects.yaml"), envoyconfig::bench_objects(0..n)).unwrap();
    println!("{n} configs (with a Service and an EndpointSlice each)\n");
    println!(
        "| phase | heap MiB | heap peak MiB | heap bytes / config | allocations / config | RSS MiB | peak RSS MiB |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    phase("start", 0);

    let mut source = DirSource::new(dir.clone());
    let loaded = source.poll().expect("the file");
    assert!(loaded.problems.is_empty(), "{:?}", loaded.problems);
    phase("source: read and parsed", n);

    let mut c = Controller::new("node1".into(), Some(Ipv4Addr::new(10, 0, 0, 1)), ProxyPorts::ephemeral());
    c.load(loaded);
    phase("controller: loaded", n);

    let (snap, published) = c.build();
    phase("controller: built", n);

    let status = c.status(&[]);
    let json = serde_json::to_vec(&status).unwrap();
    let valid = status.objects.iter().filter(|o| o.config.problems.is_empty()).count();
    assert_eq!(valid, n);
    phase(&format!("status: made and written ({} KiB)", json.len() / 1024), n);
    drop((status, json));
    phase("status: dropped", n);

    let (mut bytes, mut responses) = (0, 0);
    for t in PUSH_ORDER {
        server::first_delta_push(&published, t, |response| {
            bytes += response.encode_to_vec().len();
            responses += 1;
        });
    }
    phase(&format!("xDS: every type sent as to a new delta stream ({responses} responses, {} KiB)", bytes / 1024), n);

    drop((snap, published));
    phase("build's snapshots dropped (the controller keeps its own)", n);
    drop(c);
    phase("controller dropped", n);
    drop(source);
    phase("source dropped", n);
    std::fs::remove_dir_all(&dir).unwrap();
}
