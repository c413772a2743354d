//! The datapath manager: loads weft's BPF objects once, pins their maps and
//! links under bpffs (so a restarted agent picks up where it left off and
//! connections survive), attaches programs to devices as pods come and go, and
//! offers a typed API over the maps.

mod attach;
pub mod config;
mod error;
mod gc;
mod maps;
pub mod netlink;
mod policy;
mod proxy;
mod routing;
mod sys;
pub mod types;

use std::{
    fs,
    path::{Path, PathBuf},
};

pub use attach::{devices_with_address, ifindex, local_addresses};
use aya::{
    Ebpf, EbpfLoader,
    maps::{MapInfo, RingBuf},
    programs::{CgroupSockAddr, Program, SchedClassifier, SkLookup},
};
pub use config::{DatapathConfig, EmitLevel, MapSizes};
pub use error::{DatapathError, Result};
pub use gc::GcStats;
use maps::Maps;
pub use proxy::{ORPHAN_GRACE, ProxySync, migrate_waiting_connections};
pub use types::*;

use crate::netns;

/// The loaded datapath of one node.
pub struct Datapath {
    cfg: DatapathConfig,
    objects: Vec<(&'static str, Ebpf)>,
    maps: Maps,
    netns_cookie: u64,
    state: maps::Shadow,
    proxy: proxy::Handoff,
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

impl Datapath {
    /// Loads the datapath into the current thread's network namespace: reuses
    /// pinned maps, loads the programs, writes the run-time config, attaches
    /// the proxy hand-off (sk_lookup) and, if configured, the cgroup socket
    /// hooks, and installs the proxy routing rule. Devices are attached
    /// separately ([`Datapath::attach_pod_device`], [`Datapath::attach_node_device`]).
    pub fn open(cfg: DatapathConfig) -> Result<Self> {
        cfg.map_sizes.validate()?;
        let maps_dir = cfg.bpffs_dir.join("maps");
        for dir in [&maps_dir, &cfg.bpffs_dir.join("links")] {
            fs::create_dir_all(dir).map_err(|e| DatapathError::io(format!("creating {}", dir.display()), e))?;
        }
        check_bpffs(&cfg.bpffs_dir)?;
        check_pinned_maps(&cfg, &maps_dir)?;

        let mut objects = Vec::new();
        for (name, bytes) in weft_ebpf::OBJECTS {
            let name: &'static str = name;
            let mut loader = EbpfLoader::new();
            loader.default_map_pin_directory(&maps_dir);
            for (map, _, _, _, n) in cfg.map_sizes.shapes() {
                loader.map_max_entries(map, n);
            }
            let mut ebpf = loader.load(bytes).map_err(|e| DatapathError::Load { object: name, source: Box::new(e) })?;
            load_programs(&mut ebpf)?;
            objects.push((name, ebpf));
        }
        // Every object shares the pinned maps; take the typed handles from the first.
        let maps = Maps::take(&mut objects[0].1)?;
        let netns_cookie =
            netns::current_cookie().map_err(|e| DatapathError::io("reading the network namespace cookie", e))?;
        let state = maps::Shadow::recover(&maps)?;
        let mut cfg = cfg;
        // A host policy an earlier run applied stays in force (its entries
        // are still in weft_policy) until the reconciler says otherwise: a
        // restart must not open the node to what the policy refuses, as it
        // does not open the pods (their endpoints keep their flags).
        let pinned =
            maps.config.get(&0, 0).map_err(|e| DatapathError::Map { map: "weft_config", source: Box::new(e) })?;
        cfg.keep_host_policy(&pinned);
        let mut dp = Datapath { cfg, objects, maps, netns_cookie, state, proxy: proxy::Handoff::default() };
        dp.write_config()?;
        dp.attach_sk_lookup()?;
        dp.attach_cgroup()?;
        routing::install(&dp.cfg)?;
        tracing::info!(
            bpffs = %dp.cfg.bpffs_dir.display(),
            services = dp.state.frontend_count(),
            endpoints = dp.state.endpoint_count(),
            "datapath loaded"
        );
        Ok(dp)
    }

    /// The configuration the datapath was opened with.
    pub fn config(&self) -> &DatapathConfig {
        &self.cfg
    }

    /// Changes the ring-buffer emission level at run time.
    pub fn set_emit_level(&mut self, level: EmitLevel) -> Result<()> {
        self.reconfigure(|c| c.emit_level = level)
    }

    /// Changes what the programs read at run time (emission level,
    /// masquerade, socket LB for pods, host ingress, SNAT ports). Maps, pins
    /// and routing are not touched: change those with a restart.
    pub fn reconfigure(&mut self, f: impl FnOnce(&mut DatapathConfig)) -> Result<()> {
        f(&mut self.cfg);
        self.write_config()
    }

    fn write_config(&mut self) -> Result<()> {
        let raw = self.cfg.raw(self.netns_cookie);
        self.maps.config.set(0, raw, 0).map_err(|e| DatapathError::Map { map: "weft_config", source: Box::new(e) })
    }

    /// The verdict ring buffer. It can be taken once; the flow pipeline owns it.
    pub fn take_events(&mut self) -> Option<RingBuf<aya::maps::MapData>> {
        self.maps.events.take()
    }

    /// Records written to and lost from the ring buffer, summed over CPUs.
    pub fn event_stats(&self) -> Result<EventStats> {
        self.maps.event_stats()
    }

    fn object(&mut self, name: &str) -> &mut Ebpf {
        &mut self.objects.iter_mut().find(|(n, _)| *n == name).expect("known object").1
    }

    fn links_dir(&self) -> PathBuf {
        self.cfg.bpffs_dir.join("links")
    }

    /// Removes every pin of this node (maps and links): the datapath stops
    /// once the last user closes it. For tests and `weft-agent datapath reset`.
    pub fn remove_pins(bpffs_dir: &Path) -> Result<()> {
        match fs::remove_dir_all(bpffs_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(DatapathError::io(format!("removing {}", bpffs_dir.display()), e)),
        }
    }
}

fn check_bpffs(dir: &Path) -> Result<()> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(DatapathError::io(format!("statfs {}", dir.display()), std::io::Error::last_os_error()));
    }
    if st.f_type != BPF_FS_MAGIC {
        return Err(DatapathError::NotBpffs { path: dir.to_owned() });
    }
    Ok(())
}

/// A pinned map is reused as it is, so its shape must match what this run
/// expects; otherwise say which map differs and how.
fn check_pinned_maps(cfg: &DatapathConfig, maps_dir: &Path) -> Result<()> {
    for (map, key, key_size, value_size, max_entries) in cfg.map_sizes.shapes() {
        let path = maps_dir.join(map);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|e| DatapathError::Map { map, source: Box::new(e) })?;
        let found = (info.key_size(), info.value_size(), info.max_entries());
        let wanted = (key_size, value_size, max_entries);
        if found == wanted {
            continue;
        }
        let describe = |(k, v, n): (u32, u32, u32)| format!("key {k} B, value {v} B, {n} entries");
        if cfg.recreate_mismatched_maps {
            tracing::warn!(map, found = describe(found), wanted = describe(wanted), "recreating pinned map");
            fs::remove_file(&path).map_err(|e| DatapathError::io(format!("removing {}", path.display()), e))?;
        } else {
            return Err(DatapathError::MapMismatch {
                map,
                key,
                path,
                found: describe(found),
                wanted: describe(wanted),
            });
        }
    }
    Ok(())
}

fn load_programs(ebpf: &mut Ebpf) -> Result<()> {
    for (name, program) in ebpf.programs_mut() {
        let res = retry_interrupted(
            || match &mut *program {
                Program::SchedClassifier(p) => Ok(SchedClassifier::load(p)),
                Program::SkLookup(p) => Ok(SkLookup::load(p)),
                Program::CgroupSockAddr(p) => Ok(CgroupSockAddr::load(p)),
                other => {
                    Err(DatapathError::Invalid(format!("program {name} has unexpected type {:?}", other.prog_type())))
                }
            },
            load_errno,
        )?;
        res.map_err(|e| DatapathError::program(name, e))?;
    }
    Ok(())
}

/// How many times a program load is tried when the kernel says EAGAIN.
const LOAD_ATTEMPTS: usize = 5;

/// The errno of a failed `BPF_PROG_LOAD`.
fn load_errno(e: &aya::programs::ProgramError) -> Option<i32> {
    match e {
        aya::programs::ProgramError::LoadError { io_error, .. } => io_error.raw_os_error(),
        _ => None,
    }
}

/// Runs `load` again while it fails with EAGAIN (`errno` reads that off its
/// error), at most [`LOAD_ATTEMPTS`] times in all. The verifier gives up
/// with EAGAIN when a signal is pending for the loading thread (a child
/// exiting, a timer): nothing is wrong with the program, and libbpf retries
/// the same way. Any other outcome is returned as it is.
fn retry_interrupted<E>(
    mut load: impl FnMut() -> Result<std::result::Result<(), E>>,
    errno: impl Fn(&E) -> Option<i32>,
) -> Result<std::result::Result<(), E>> {
    let mut tried = 1;
    loop {
        let res = load()?;
        let interrupted = res.as_ref().err().and_then(&errno) == Some(libc::EAGAIN);
        if !interrupted || tried >= LOAD_ATTEMPTS {
            return Ok(res);
        }
        tracing::debug!(attempt = tried, "program load interrupted (EAGAIN), trying again");
        tried += 1;
    }
}

/// Sums of the per-CPU ring-buffer counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    /// Records written into the ring buffer.
    pub emitted: u64,
    /// Records lost because the ring buffer was full.
    pub lost: u64,
    /// The same, per CPU.
    pub lost_per_cpu: Vec<u64>,
}

/// What one BPF_PROG_TEST_RUN of a datapath program returned.
#[derive(Clone, Debug)]
pub struct TestRunOutput {
    /// The program's return value (a TC action).
    pub verdict: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// Time the kernel measured for one run.
    pub duration: std::time::Duration,
}

impl Datapath {
    /// Runs a tc program of the loaded datapath on a packet (BPF_PROG_TEST_RUN)
    /// against the live maps: for benchmarks and diagnostics. The packet is an
    /// Ethernet frame.
    pub fn test_run(&self, program: &str, packet: &[u8]) -> Result<TestRunOutput> {
        self.test_run_repeat(program, packet, 1)
    }

    /// Like [`Datapath::test_run`], running the program `repeat` times in
    /// one call (each run writes its verdict records): for load generation.
    /// The duration is the average per run.
    pub fn test_run_repeat(&self, program: &str, packet: &[u8], repeat: u32) -> Result<TestRunOutput> {
        use aya::programs::{TestRun, TestRunOptions};
        let prog: &SchedClassifier = self
            .objects
            .iter()
            .find_map(|(_, o)| o.program(program))
            .ok_or_else(|| DatapathError::Invalid(format!("no program {program}")))?
            .try_into()
            .map_err(|e| DatapathError::program(program, e))?;
        let mut out = vec![0u8; packet.len() + 256];
        let res = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                repeat: repeat.max(1),
                ..Default::default()
            })
            .map_err(|e| DatapathError::program(program, e))?;
        out.truncate(res.data_size_out as usize);
        Ok(TestRunOutput { verdict: res.return_value, packet: out, duration: res.duration })
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    fn failed(errno: i32) -> std::result::Result<(), io::Error> {
        Err(io::Error::from_raw_os_error(errno))
    }

    fn errno(res: &std::result::Result<(), io::Error>) -> Option<i32> {
        res.as_ref().err().and_then(io::Error::raw_os_error)
    }

    /// Runs `retry_interrupted` on loads whose n-th call (from 1) gives
    /// `outcome(n)`: the errno it ended with (None: loaded) and the calls.
    fn tried(outcome: impl Fn(usize) -> std::result::Result<(), io::Error>) -> (Option<i32>, usize) {
        let mut calls = 0;
        let res = retry_interrupted(
            || {
                calls += 1;
                Ok(outcome(calls))
            },
            io::Error::raw_os_error,
        );
        (errno(&res.unwrap()), calls)
    }

    #[test]
    fn a_load_interrupted_by_a_signal_is_tried_again_and_nothing_else_is() {
        // Interrupted twice, then loaded: three calls, loaded.
        assert_eq!(tried(|n| if n < 3 { failed(libc::EAGAIN) } else { Ok(()) }), (None, 3));
        // A refusal by the verifier is returned at once.
        assert_eq!(tried(|_| failed(libc::EACCES)), (Some(libc::EACCES), 1));
        // Interrupted every time: given up after LOAD_ATTEMPTS, with the error.
        assert_eq!(tried(|_| failed(libc::EAGAIN)), (Some(libc::EAGAIN), LOAD_ATTEMPTS));
        // The agent's own error (not a load) is passed on untouched.
        let res = retry_interrupted(|| Err(DatapathError::Invalid("odd program".into())), io::Error::raw_os_error);
        assert!(matches!(res, Err(DatapathError::Invalid(_))));
    }
}
