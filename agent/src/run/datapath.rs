//! The datapath worker: a thread that owns the loaded eBPF datapath. It
//! applies the newest snapshot the control loop published (older ones queued
//! behind it are moot), collects expired connections, keeps the proxy's
//! listeners registered for the sk_lookup program (following Envoy's pid),
//! reads the ring buffer's counters and the maps' occupancy, and publishes
//! all of it as its [`DatapathStatus`]. A thread, not a task: map updates
//! are blocking system calls.
//!
//! A frontend goes to its proxy port only once the worker holds that port's
//! listening socket (see [`crate::reconcile`]): when a pass of the proxy's
//! listeners puts in the socket such a frontend waits for, the snapshot is
//! applied again.
//!
//! A full map does not end the worker: the snapshot is applied as far as it
//! fits, the maps that were full are published (`/status` `full-maps`, the
//! `weft_datapath_map_not_written` metric) and logged once per change, and
//! the snapshot is applied again every [`RETRY_FULL`] until everything is in.

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context;
use aya::maps::{MapData, RingBuf};
use tokio::sync::{oneshot, watch};

use super::status::{Component, DatapathStatus, InputGone, MapUsage};
use crate::{
    config::AgentConfig,
    datapath::{Datapath, migrate_waiting_connections},
    envoy::EnvoyState,
    operator::status::names,
    reconcile::{AwaitingProxy, FullMap, Reconciler},
    state::Snapshot,
};

/// How often expired connections are collected.
const GC_EVERY: Duration = Duration::from_secs(30);
/// How often the proxy's listeners are looked at (and the ring buffer's
/// counters read).
const PROXY_SYNC_EVERY: Duration = Duration::from_millis(500);
/// How often while an Envoy starts or ports wait for one: connections that
/// arrive meanwhile wait in the sockets the agent keeps until the new
/// Envoy's are in the map.
const PROXY_SETTLE_EVERY: Duration = Duration::from_millis(20);
/// How long after Envoy's pid changed, or a snapshot added a proxy port, the
/// listeners are looked at that often (a new listener is in the map within
/// [`PROXY_SETTLE_EVERY`] of Envoy opening it).
const PROXY_SETTLE_FOR: Duration = Duration::from_secs(10);
/// How often map occupancy is counted.
const MAP_USAGE_EVERY: Duration = Duration::from_secs(10);
/// How long the worker waits for a snapshot before its periodic work.
const WAIT: Duration = Duration::from_millis(100);
/// How often a snapshot that did not fit is applied again.
const RETRY_FULL: Duration = Duration::from_secs(2);

/// What the worker reads and where it reports.
pub struct Worker {
    pub cfg: AgentConfig,
    pub node_ip: Ipv4Addr,
    pub snapshots: watch::Receiver<Arc<Snapshot>>,
    pub envoy: watch::Receiver<EnvoyState>,
    pub status: watch::Sender<DatapathStatus>,
    /// The ring buffer goes to the flow pipeline's reader once loaded.
    pub events: oneshot::Sender<RingBuf<MapData>>,
    /// The runtime the control loop publishes on (the worker waits for
    /// snapshots through it).
    pub runtime: tokio::runtime::Handle,
}

impl Worker {
    /// Loads the datapath and runs the worker on a thread of its own, until
    /// the control loop stops publishing.
    pub fn spawn(self) -> std::io::Result<JoinHandle<anyhow::Result<()>>> {
        crate::limits::thread("datapath").spawn(move || self.run())
    }

    fn run(self) -> anyhow::Result<()> {
        let Worker { cfg, node_ip, mut snapshots, mut envoy, status, events, runtime } = self;
        let mut dp = Datapath::open(cfg.datapath(node_ip)).context("loading the datapath")?;
        if let Some(ring) = dp.take_events() {
            // The pipeline may be gone (the agent is stopping): nothing to read into then.
            let _ = events.send(ring);
        }
        let mut rec = Reconciler::new(node_devices(&cfg, node_ip)?);
        let mut current: Option<Arc<Snapshot>> = None;
        let due_now = |every: Duration| Instant::now().checked_sub(every).unwrap_or_else(Instant::now);
        let mut last_maps = due_now(MAP_USAGE_EVERY);
        let mut last_gc = Instant::now();
        let mut last_proxy = due_now(PROXY_SYNC_EVERY);
        let mut last_stats = due_now(PROXY_SYNC_EVERY);
        let mut last_pid = None;
        let mut last_apply = Instant::now();
        let mut settle_from = Instant::now();
        let mut waiting = false;
        // Whether the snapshot hands some port to a proxy (or the worker
        // still holds a proxy's socket): only then are listeners looked at.
        let mut proxy_ports = false;
        let mut envoy_published = true;
        let migrating = migrate_waiting_connections(&cfg.sysctl_dir);
        status.send_modify(|st| st.proxy_migration = migrating);
        // The first snapshot is there before the worker starts.
        snapshots.mark_changed();
        loop {
            let look = proxy_look_every(proxy_ports, waiting, settle_from.elapsed());
            let wait = look.map_or(WAIT, |every| every.min(WAIT));
            // The timer is made inside block_on: it needs the runtime's context.
            let woke = runtime.block_on(async {
                tokio::select! {
                    c = snapshots.changed() => Some(c.is_ok()),
                    // A supervisor that stopped publishing is the supervisor's to report.
                    c = envoy.changed(), if envoy_published => {
                        envoy_published = c.is_ok();
                        None
                    }
                    _ = tokio::time::sleep(wait) => None,
                }
            });
            match woke {
                Some(true) => {
                    let snap = snapshots.borrow_and_update().clone();
                    apply(&mut dp, &mut rec, &snap, &status)?;
                    last_apply = Instant::now();
                    // A new proxy port (a Service's or a policy's) is
                    // watched for closely until Envoy listens on it.
                    // (What a snapshot hands that the last did not: what the
                    // last stops handing in it, the other way round; costs
                    // the Services that changed.)
                    let empty = Snapshot::default();
                    let before = current.as_deref().unwrap_or(&empty);
                    if snap.stops_proxying_in(before)
                        || !snap.policy_proxy_ports().is_subset(&before.policy_proxy_ports())
                    {
                        settle_from = Instant::now();
                    }
                    proxy_ports = snap.hands_to_proxy() || dp.holds_proxy_sockets();
                    current = Some(snap);
                    last_proxy = due_now(PROXY_SYNC_EVERY);
                }
                Some(false) => return Err(InputGone(Component::Control).into()),
                None => {} // periodic work
            }
            let left_out = !status.borrow().full_maps.is_empty();
            if left_out
                && last_apply.elapsed() >= RETRY_FULL
                && let Some(snap) = &current
            {
                apply(&mut dp, &mut rec, snap, &status)?;
                last_apply = Instant::now();
            }
            let pid = envoy.borrow_and_update().pid;
            if pid != last_pid {
                last_pid = pid;
                settle_from = Instant::now();
                last_proxy = due_now(PROXY_SYNC_EVERY);
            }
            if let Some(every) = look
                && last_proxy.elapsed() >= every
            {
                last_proxy = Instant::now();
                if let Some(snap) = &current {
                    let pid = if cfg.envoy.enabled { pid } else { None };
                    waiting = sync_proxy(&mut dp, snap, pid, &status);
                    if proxy_sockets_arrived(&dp, &status) {
                        apply(&mut dp, &mut rec, snap, &status)?;
                        last_apply = Instant::now();
                    }
                    // A port no longer handed to a proxy has been let go now.
                    proxy_ports = snap.hands_to_proxy() || dp.holds_proxy_sockets();
                }
            }
            if last_stats.elapsed() >= PROXY_SYNC_EVERY {
                last_stats = Instant::now();
                if let Ok(stats) = dp.event_stats() {
                    status.send_if_modified(|st| {
                        let changed = st.event_stats.as_ref() != Some(&stats);
                        st.events_emitted = stats.emitted;
                        st.events_lost = stats.lost;
                        st.event_stats = Some(stats);
                        changed
                    });
                }
            }
            if last_maps.elapsed() >= MAP_USAGE_EVERY {
                last_maps = Instant::now();
                let usage =
                    dp.map_usage().into_iter().map(|(map, entries, capacity)| MapUsage { map, entries, capacity });
                let usage = usage.collect();
                status.send_modify(|st| st.maps = usage);
            }
            if last_gc.elapsed() >= GC_EVERY {
                last_gc = Instant::now();
                match dp.gc() {
                    Ok(s) => tracing::debug!(?s, "conntrack gc"),
                    Err(e) => tracing::warn!("conntrack gc: {e}"),
                }
            }
        }
    }
}

/// The node's external devices: `devices` as configured, else the device
/// that holds the node's address (a node's device name differs from node to
/// node; its address is known from its Node object).
fn node_devices(cfg: &AgentConfig, node_ip: Ipv4Addr) -> anyhow::Result<Vec<String>> {
    if !cfg.devices.is_empty() {
        return Ok(cfg.devices.clone());
    }
    let found = crate::datapath::devices_with_address(node_ip).context("listing the node's addresses")?;
    if found.is_empty() {
        anyhow::bail!("no device holds the node's address {node_ip}: set devices (the node's external device)");
    }
    tracing::info!(devices = ?found, %node_ip, "the node's devices, found by its address");
    Ok(found)
}

fn apply(
    dp: &mut Datapath,
    rec: &mut Reconciler,
    snap: &Snapshot,
    status: &watch::Sender<DatapathStatus>,
) -> anyhow::Result<()> {
    let applied = rec.apply(dp, snap, &snap.policy.endpoints).context("applying desired state")?;
    let retry = status.borrow().applied_version == snap.version;
    if !retry {
        for p in snap.problems.iter().chain(&applied.problems) {
            tracing::warn!(version = snap.version, "{p}");
        }
    }
    let before = status.borrow().full_maps.clone();
    log_full_maps(&before, &applied.full);
    log_awaiting_proxy(&status.borrow().frontends_awaiting_proxy, &applied.awaiting_proxy);
    tracing::info!(
        version = snap.version,
        services_written = applied.services_written,
        services_removed = applied.services_removed,
        endpoints_written = applied.endpoints_written,
        endpoints_removed = applied.endpoints_removed,
        "desired state applied"
    );
    // Said with the version: a policy that starts handing connections to a
    // proxy port does so from this snapshot on, and until the port's socket
    // is registered they are refused (sk_lookup finds no socket). Before,
    // the list was only filled by the next look at the listeners, so the
    // first moments of a new L7 policy read as served.
    let refusing = policy_ports_without_socket(dp, snap);
    status.send_modify(|st| {
        set_refusing(st, refusing);
        st.applied_version = snap.version;
        st.services = snap.services.len();
        st.endpoints = snap.pods.iter().filter(|p| p.local).count();
        let host = snap.policy.host.as_ref();
        st.host_policy = super::status::HostPolicyStatus {
            selected_by: snap.policy.host_policies.iter().map(ToString::to_string).collect(),
            ingress: host.is_some_and(|h| h.ingress),
            egress: host.is_some_and(|h| h.egress),
            entries: host.map_or(0, |h| h.entries.len()),
            ..Default::default()
        };
        st.problems = snap.problems.iter().chain(&applied.problems).cloned().collect();
        st.attached = rec.attached();
        st.full_maps = applied.full;
        st.frontends_awaiting_proxy = applied.awaiting_proxy;
    });
    Ok(())
}

/// Records the proxy ports policies send connections through that have no
/// socket in the map (and says so when that changes).
fn set_refusing(st: &mut DatapathStatus, refused: Vec<u16>) {
    if st.policy_proxy_ports_refusing != refused {
        if !refused.is_empty() {
            // Fail closed: a connection a policy sends through the
            // proxy has no plain way to fall back to.
            tracing::warn!(
                ports = ?refused,
                "policies send connections through proxy ports with no listening socket: they are refused until the proxy listens"
            );
        }
        st.policy_proxy_ports_refusing = refused;
    }
}

/// The ports a snapshot's policies hand connections to whose socket the
/// datapath does not hold yet (an Envoy that just opened the listener: the
/// next look at its listeners registers it).
fn policy_ports_without_socket(dp: &Datapath, snap: &Snapshot) -> Vec<u16> {
    let held = dp.proxy_ports_registered();
    snap.policy_proxy_ports().into_iter().filter(|p| !held.contains(p)).collect()
}

/// Whether the proxy socket map now holds a socket some frontend waits for.
fn proxy_sockets_arrived(dp: &Datapath, status: &watch::Sender<DatapathStatus>) -> bool {
    let st = status.borrow();
    if st.frontends_awaiting_proxy.is_empty() {
        return false;
    }
    let ready = dp.proxy_ports_registered();
    st.frontends_awaiting_proxy.iter().any(|a| ready.contains(&a.proxy_port))
}

/// Says which frontends wait for their proxy's socket, and which no longer
/// do, when that changes: a line per proxy port (a burst of configs makes
/// thousands of frontends wait on one port at once), found through sets so
/// that the comparison does not grow with the product of both lists.
fn log_awaiting_proxy(before: &[AwaitingProxy], now: &[AwaitingProxy]) {
    let (started, ended) = awaiting_changes(before, now);
    for ((port, kept), frontends) in started {
        let (n, list) = (frontends.len(), names(frontends.into_iter()));
        match kept {
            None => tracing::info!(
                proxy_port = port,
                frontends = n,
                "proxy port {port} has no listening socket yet: {list} {} to {} backends until it has one",
                if n == 1 { "goes" } else { "go" },
                if n == 1 { "its" } else { "their" },
            ),
            Some(kept) => tracing::warn!(
                proxy_port = port,
                frontends = n,
                "proxy port {port} has no listening socket: {list} {} on proxy port {kept} until it has one",
                if n == 1 { "stays" } else { "stay" },
            ),
        }
    }
    if !ended.is_empty() {
        let n = ended.len();
        tracing::info!(
            frontends = n,
            "{} no longer {} for a proxy socket",
            names(ended.into_iter()),
            if n == 1 { "waits" } else { "wait" }
        );
    }
}

/// Frontends that began to wait, by (proxy port, port kept meanwhile), and
/// frontends that no longer wait at all.
type AwaitingChanges<'a> = (BTreeMap<(u16, Option<u16>), Vec<&'a str>>, Vec<&'a str>);

fn awaiting_changes<'a>(before: &'a [AwaitingProxy], now: &'a [AwaitingProxy]) -> AwaitingChanges<'a> {
    let was: HashSet<&AwaitingProxy> = before.iter().collect();
    let mut started: BTreeMap<(u16, Option<u16>), Vec<&str>> = BTreeMap::new();
    for a in now.iter().filter(|a| !was.contains(a)) {
        started.entry((a.proxy_port, a.kept_proxy_port)).or_default().push(&a.frontend);
    }
    let still: HashSet<&str> = now.iter().map(|a| a.frontend.as_str()).collect();
    let ended = before.iter().map(|b| b.frontend.as_str()).filter(|f| !still.contains(f)).collect();
    (started, ended)
}

/// Says which maps filled up or have room again, when that changes.
fn log_full_maps(before: &[FullMap], now: &[FullMap]) {
    for f in now {
        let was = before.iter().find(|b| b.map == f.map);
        if was.map(|b| (b.not_written, &b.examples)) != Some((f.not_written, &f.examples)) {
            tracing::warn!(
                map = f.map,
                capacity = f.capacity,
                not_written = f.not_written,
                examples = ?f.examples,
                "map {} is full ({} entries): {} objects not written until there is room; raise map-sizes.{}",
                f.map,
                f.capacity,
                f.not_written,
                f.key
            );
        }
    }
    for b in before {
        if !now.iter().any(|f| f.map == b.map) {
            tracing::info!(map = b.map, "map {} had room for everything left out before", b.map);
        }
    }
}

/// How often the worker looks at the proxy's listeners, if at all. A look
/// is a sock_diag dump of the namespace's listening TCP sockets (the
/// kernel walks its listening hash only; `/proc/net/tcp`, read before,
/// walked every established connection of the machine: about 4 ms of CPU
/// on the bench machine). Still, never while no port is handed to a proxy and no proxy socket is held
/// (`proxy_ports` false: nothing to register or let go, whatever Envoy
/// does); every [`PROXY_SETTLE_EVERY`] while connections wait for a new
/// Envoy (`waiting`) or within [`PROXY_SETTLE_FOR`] of Envoy's pid or the
/// proxy ports changing (`since_change`); else every [`PROXY_SYNC_EVERY`].
fn proxy_look_every(proxy_ports: bool, waiting: bool, since_change: Duration) -> Option<Duration> {
    if !proxy_ports {
        None
    } else if waiting || since_change < PROXY_SETTLE_FOR {
        Some(PROXY_SETTLE_EVERY)
    } else {
        Some(PROXY_SYNC_EVERY)
    }
}

/// Keeps the map in step with the proxy's listeners for the snapshot's
/// proxy ports (those of Envoy's `pid`, when the agent runs it) and reports
/// the ports without one, and those whose connections wait for the next
/// Envoy. True while some wait.
fn sync_proxy(dp: &mut Datapath, snap: &Snapshot, pid: Option<u32>, status: &watch::Sender<DatapathStatus>) -> bool {
    let ports: Vec<u16> = snap.proxy_ports().into_iter().collect();
    let pids = pid.map(|p| vec![p as i32]);
    match dp.sync_proxy_listeners(&ports, pids.as_deref()) {
        Ok(sync) => {
            if !sync.moved.is_empty() {
                tracing::info!(ports = ?sync.moved, "proxy ports moved to the new Envoy's sockets");
            }
            let waiting = !sync.orphaned.is_empty();
            let by_policy = snap.policy_proxy_ports();
            let refused: Vec<u16> = sync.missing.iter().copied().filter(|p| by_policy.contains(p)).collect();
            status.send_if_modified(|st| {
                set_refusing(st, refused);
                let held = sync.missing.is_empty();
                let changed = st.proxy_ports_without_listener != sync.missing
                    || st.proxy_ports_waiting != sync.orphaned
                    || st.proxy_sockets_held != held;
                st.proxy_sockets_held = held;
                st.proxy_ports_without_listener = sync.missing;
                st.proxy_ports_waiting = sync.orphaned;
                changed
            });
            waiting
        }
        Err(e) => {
            tracing::warn!("registering proxy listeners: {e}");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiting_frontends_are_told_by_port_and_those_that_stopped_once() {
        let w = |f: &str, port, kept| AwaitingProxy { frontend: f.into(), proxy_port: port, kept_proxy_port: kept };
        let before = [w("a", 1, None), w("b", 1, None), w("c", 1, None)];
        // b moved to port 2 (it still waits), c is unchanged, a stopped.
        let now = [w("b", 2, Some(1)), w("c", 1, None), w("d", 1, None), w("e", 2, Some(1))];
        let (started, ended) = awaiting_changes(&before, &now);
        let want: BTreeMap<_, Vec<&str>> = [((1, None), vec!["d"]), ((2, Some(1)), vec!["b", "e"])].into();
        assert_eq!(started, want);
        assert_eq!(ended, ["a"]);
        // Ten thousand waiting on both sides, one changed: found by sets.
        let many =
            |n: usize| (0..n).map(|i| w(&format!("10.97.{}.{}:80/TCP", i / 250, i % 250), 7, None)).collect::<Vec<_>>();
        let (before, mut now) = (many(10_000), many(10_000));
        now.pop();
        let (started, ended) = awaiting_changes(&before, &now);
        assert!(started.is_empty());
        assert_eq!(ended, ["10.97.39.249:80/TCP"]);
    }

    /// The worker's wake-ups and listener looks over its first
    /// `PROXY_SETTLE_FOR` plus a minute, with nothing published: the loop's
    /// schedule, counted without a clock.
    fn first_minute(proxy_ports: bool) -> (u32, u32) {
        let (mut wakes, mut looks) = (0, 0);
        let (mut now, mut last_look) = (Duration::ZERO, None::<Duration>);
        while now < PROXY_SETTLE_FOR + Duration::from_secs(60) {
            let look = proxy_look_every(proxy_ports, false, now);
            now += look.map_or(WAIT, |every| every.min(WAIT));
            wakes += 1;
            if let Some(every) = look
                && last_look.is_none_or(|l| now - l >= every)
            {
                last_look = Some(now);
                looks += 1;
            }
        }
        (wakes, looks)
    }

    #[test]
    fn a_node_that_hands_no_port_to_a_proxy_never_reads_its_listeners() {
        // Not even in the first seconds after the agent (and Envoy) started.
        for since in [Duration::ZERO, PROXY_SETTLE_FOR / 2, PROXY_SETTLE_FOR * 2] {
            assert_eq!(proxy_look_every(false, false, since), None);
            assert_eq!(proxy_look_every(false, true, since), None);
        }
        let (wakes, looks) = first_minute(false);
        assert_eq!(looks, 0);
        // Ten wake-ups a second for the snapshot's periodic work, not fifty.
        assert_eq!(wakes, 700);
    }

    #[test]
    fn proxy_listeners_are_read_closely_only_while_a_proxy_settles() {
        assert_eq!(proxy_look_every(true, false, Duration::ZERO), Some(PROXY_SETTLE_EVERY));
        assert_eq!(proxy_look_every(true, false, PROXY_SETTLE_FOR), Some(PROXY_SYNC_EVERY));
        assert_eq!(proxy_look_every(true, true, PROXY_SETTLE_FOR * 2), Some(PROXY_SETTLE_EVERY));
        // 50 a second for the settling 10 s, then 2 a second.
        let (_, looks) = first_minute(true);
        assert_eq!(looks, 500 + 120);
    }
}
