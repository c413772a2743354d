//! Runs the C unit tests (ebpf/tests/*.c) through BPF_PROG_TEST_RUN: for each
//! test, pktgen builds the packet, setup fills the maps and runs the datapath
//! logic on it, check inspects the packet, the maps and the records written.
//! See ebpf/tests/unit.h for how a test is written.
//!
//! Runs as root, inside a private network namespace (the FIB lookups of
//! north-south forwarding see only the routes made here).

use std::process::Command;

use aya::{
    EbpfLoader,
    maps::Array,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};

/// An Ethernet header with the IPv4 ethertype: what pktgen programs grow from.
const ETH_IPV4: [u8; 14] = [0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1, 0x08, 0x00];
/// sizeof(struct __sk_buff) in the UAPI this is built against.
const SKB_CTX: usize = 192;

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().expect("run ip");
    assert!(st.success(), "{args:?} failed");
}

/// Moves this thread into a new network namespace with a device and routes
/// the north-south tests forward through.
fn private_netns() {
    // SAFETY: plain syscall; affects only this thread.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
    sh(&["ip", "link", "set", "lo", "up"]);
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable forwarding in the test namespace");
    sh(&["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
    sh(&["ip", "addr", "add", "192.168.50.1/24", "dev", "d0"]);
    sh(&["ip", "link", "set", "d0", "up"]);
    sh(&["ip", "link", "set", "d1", "up"]);
    sh(&["ip", "route", "add", "10.1.2.0/24", "via", "192.168.50.2"]);
}

fn run(prog: &SchedClassifier, data: &[u8], ctx_in: Option<&[u8]>) -> (u32, Vec<u8>, Vec<u8>) {
    let mut out = vec![0u8; 1024];
    let mut ctx_out = vec![0u8; SKB_CTX];
    let res = prog
        .test_run(TestRunOptions {
            data_in: Some(data),
            data_out: Some(&mut out),
            ctx_in,
            ctx_out: Some(&mut ctx_out),
            ..Default::default()
        })
        .unwrap_or_else(|e| {
            panic!("BPF_PROG_TEST_RUN (data {} B, ctx_in {:?}): {e:?}", data.len(), ctx_in.map(|c| c.len()))
        });
    out.truncate(res.data_size_out as usize);
    (res.return_value, out, ctx_out)
}

fn prog<'a>(ebpf: &'a aya::Ebpf, test: &str, part: &str) -> &'a SchedClassifier {
    ebpf.program(&format!("{test}__{part}")).unwrap().try_into().unwrap()
}

/// Runs one test of an object; Err(message) on failure.
fn run_test(object: &'static [u8], file: &str, test: &str) -> Result<(), String> {
    let mut ebpf = EbpfLoader::new().load(object).map_err(|e| format!("{file}: loading: {e}"))?;
    for part in ["pktgen", "setup", "check"] {
        let name = format!("{test}__{part}");
        let p: &mut SchedClassifier = ebpf
            .program_mut(&name)
            .ok_or_else(|| format!("{file}: {name} is missing"))?
            .try_into()
            .map_err(|e| format!("{name}: {e}"))?;
        p.load().map_err(|e| format!("{file}: {name} rejected by the verifier: {e}"))?;
    }
    let mut seed = ETH_IPV4.to_vec();
    seed.resize(64, 0);
    let (rc, packet, _) = run(prog(&ebpf, test, "pktgen"), &seed, None);
    if rc != 0 {
        return Err(format!("{file}: {test}: pktgen returned {rc}"));
    }
    let (verdict, packet, ctx) = run(prog(&ebpf, test, "setup"), &packet, None);
    let mut v: Array<_, u32> =
        Array::try_from(ebpf.map_mut("unit_verdict").expect("unit_verdict map")).map_err(|e| e.to_string())?;
    v.set(0, verdict, 0).map_err(|e| e.to_string())?;
    let (line, _, _) = run(prog(&ebpf, test, "check"), &packet, Some(&ctx));
    if line != 0 {
        return Err(format!("{file}: {test}: failed at {file}.c:{line} (setup returned {verdict})"));
    }
    Ok(())
}

#[test]
fn c_unit_tests() {
    // SAFETY: trivial syscall.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the C unit tests need root (BPF_PROG_TEST_RUN)");
        return;
    }
    let failures = std::thread::spawn(|| {
        private_netns();
        let mut failures = Vec::new();
        let mut passed = 0;
        for (file, object) in weft_ebpf::unit::TEST_OBJECTS {
            let names: Vec<String> = EbpfLoader::new()
                .load(object)
                .expect("test object parses")
                .programs()
                .filter_map(|(n, _)| n.strip_suffix("__pktgen").map(str::to_owned))
                .collect();
            assert!(!names.is_empty(), "{file} has no tests");
            for test in names {
                match run_test(object, file, &test) {
                    Ok(()) => {
                        passed += 1;
                        eprintln!("ok   {file}::{test}");
                    }
                    Err(e) => {
                        eprintln!("FAIL {e}");
                        failures.push(e);
                    }
                }
            }
        }
        eprintln!("{passed} C unit tests passed, {} failed", failures.len());
        failures
    })
    .join()
    .expect("runner thread");
    assert!(failures.is_empty(), "C unit tests failed:\n{}", failures.join("\n"));
}
