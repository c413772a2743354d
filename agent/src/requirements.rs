//! What the agent needs from its node to start, in one place: the Linux
//! capabilities (and the code that needs each) and the host paths its config
//! names. deploy/agent.yaml's DaemonSet is checked against this
//! (agent/tests/deploy.rs), and the lab runs agents with exactly these
//! capabilities (tests/tests/kubernetes.rs).

use std::path::PathBuf;

use crate::config::AgentConfig;

/// A capability the agent's process needs (Envoy, its child, inherits it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// The name without `CAP_`, as a Pod's securityContext writes it.
    pub name: &'static str,
    /// The code that needs it.
    pub needed_by: &'static str,
}

/// Every capability the agent needs, and nothing more: not SYS_ADMIN (the
/// node mounts bpffs; pins are opened by path; no namespace is entered in a
/// DaemonSet), not SYS_RESOURCE (BPF memory is charged to the cgroup since
/// Linux 5.11, below the 6.6 TCX needs, and the agent raises no memlock
/// limit), not NET_RAW (no raw sockets; NET_ADMIN allows IP_TRANSPARENT).
/// Not SYS_PTRACE either, within a limit the node decides: taking Envoy's
/// listening sockets with pidfd_getfd (`datapath::proxy`) is a ptrace
/// access check on Envoy. Same user and capabilities suffice for an Envoy
/// the agent started, its child, also under Yama's `ptrace_scope` 1. An
/// Envoy adopted from an earlier agent is not its descendant: with Yama at
/// 1 the agent cannot take its sockets without SYS_PTRACE (they stay in the
/// pinned map while that Envoy runs, but if it dies its connections are
/// refused until the next Envoy listens, instead of waiting for it; the
/// agent logs each failed attempt). With Yama at 2 only SYS_PTRACE allows
/// it, also for the child, and at 3 nothing does: no L7 redirect works
/// there. Without Yama (or at 0) nothing more is needed.
///
/// NET_ADMIN also lets the agent set
/// `net.ipv4.tcp_migrate_req=1` in the node's network namespace (connections
/// waiting for a restarting Envoy move to the new one); where /proc/sys is
/// read-only in the agent's container, the node sets it instead.
pub const CAPABILITIES: &[Capability] = &[
    Capability { name: "BPF", needed_by: "datapath: creating and pinning maps, loading programs (bpf())" },
    Capability {
        name: "NET_ADMIN",
        needed_by: "datapath: tc (TCX), sk_lookup and cgroup socket program types and attachments, SOCKMAP, \
                    the proxy's fwmark rule and local route (`ip`); Envoy: transparent listeners (IP_TRANSPARENT)",
    },
    Capability {
        name: "PERFMON",
        needed_by: "datapath: the verifier accepts the programs' packet-pointer comparisons and \
                    skips Spectre masking only for a process with it",
    },
];

/// What a host path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    /// A directory on the node's bpffs (pins survive the agent).
    Bpffs,
    /// The node's cgroup v2 hierarchy (socket programs attach to it).
    Cgroup2,
    /// A directory the agent writes (state, sockets) that outlives it.
    State,
    /// The node's /proc/sys/net, writable (a container's /proc/sys is not).
    Sysctl,
}

/// A node path the agent uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPath {
    pub path: PathBuf,
    pub kind: PathKind,
    /// The config key that names it.
    pub key: &'static str,
}

/// The node paths `cfg` makes the agent use.
pub fn host_paths(cfg: &AgentConfig) -> Vec<HostPath> {
    let mut v = vec![
        HostPath { path: cfg.bpffs_dir.clone(), kind: PathKind::Bpffs, key: "bpffs-dir" },
        HostPath { path: cfg.state_dir.clone(), kind: PathKind::State, key: "state-dir" },
    ];
    if let Some(c) = &cfg.cgroup {
        v.push(HostPath { path: c.clone(), kind: PathKind::Cgroup2, key: "cgroup" });
    }
    if cfg.sysctl_dir != std::path::Path::new(crate::config::PROC_SYS) {
        v.push(HostPath { path: cfg.sysctl_dir.join("net"), kind: PathKind::Sysctl, key: "sysctl-dir" });
    }
    // weft-cni, run by the container runtime on the node, connects to it.
    if let Some(dir) = cfg.cni_socket.as_deref().and_then(std::path::Path::parent) {
        v.push(HostPath { path: dir.to_owned(), kind: PathKind::State, key: "cni-socket" });
    }
    v
}
