//! weft's eBPF datapath: the BPF objects clang built from `bpf/`, and the Rust
//! mirrors of every struct and constant shared with them.

pub mod abi;

/// Pod-side programs: `from_container`, `to_container`.
pub const BPF_LXC: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_lxc.o"));
/// Node-device programs: `from_netdev`, `to_netdev`.
pub const BPF_NETDEV: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_netdev.o"));
/// Socket programs: cgroup connect/sendmsg/recvmsg/getpeername hooks and `proxy_sk_lookup`.
pub const BPF_SOCK: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bpf_sock.o"));

/// A tc program that returns at once: the baseline of program benchmarks.
pub const BENCH_NOOP: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench_noop.o"));

/// The datapath objects by name, in load order.
pub const OBJECTS: &[(&str, &[u8])] = &[("bpf_lxc", BPF_LXC), ("bpf_netdev", BPF_NETDEV), ("bpf_sock", BPF_SOCK)];

/// Every map the datapath objects declare, pinned by these names.
pub const MAP_NAMES: &[&str] = &[
    "weft_config",
    "weft_services",
    "weft_backends",
    "weft_endpoints",
    "weft_ipcache",
    "weft_policy",
    "weft_ct",
    "weft_lb",
    "weft_sock_rev",
    "weft_proxy_socks",
    "weft_events",
    "weft_event_stats",
];

/// C unit-test objects built from `tests/*.c`.
pub mod unit {
    include!(concat!(env!("OUT_DIR"), "/test_objects.rs"));
}
