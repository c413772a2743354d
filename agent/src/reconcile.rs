//! Makes the datapath match a snapshot: node devices attached, every known
//! address in the ipcache, local pods as endpoints on their devices, every
//! Service frontend written; what the snapshot no longer has is removed.
//! Applying the same snapshot twice changes nothing. Frontends are
//! followed by Service: a pass writes those of the Services the snapshot
//! does not share with the last one applied (and those a pass left out or
//! handed to a proxy port without a socket), so an endpoint change costs
//! the Services it changed.
//!
//! A full map does not stop a pass: what fits is written, what does not is
//! reported in [`Applied::full`] (by map and `map-sizes` key) and left out of
//! what the reconciler remembers as written, so the next pass (the worker
//! retries while something is left out) writes it once there is room.
//! Frontends and addresses a snapshot drops are removed before additions,
//! so they make room in the same pass; room freed later (a pod removed at
//! the end of its pass) is used by the retry.
//!
//! A frontend is handed to a proxy port only once the datapath holds that
//! port's listening socket (its entry in the proxy socket map). Until then
//! it keeps the forwarding the map holds for it: its backends for a Service
//! that was plain or is new, so the first connections after an L7 config is
//! applied are served instead of meeting no socket (a dropped SYN, a second
//! of retransmission). A frontend already handed to a proxy port stays
//! there even when the socket is gone (Envoy gone for good: refused, never
//! silently sent around the proxy). [`Applied::awaiting_proxy`] lists the
//! frontends held back; the worker applies the snapshot again once their
//! sockets are in the map.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use weft_ebpf::abi;

use crate::{
    datapath::{
        Datapath, DatapathError, EndpointEntry, Frontend, FrontendKind, IpcacheEntry, PolicyEntry, Result, ServiceEntry,
    },
    state::{FrontendOwners, FrontendTuple as Tuple, Snapshot, policy::EndpointPolicy, tuple_of},
};

/// What one pass did, for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub services_written: usize,
    pub services_removed: usize,
    pub endpoints_written: usize,
    pub endpoints_removed: usize,
    /// Problems that did not stop the pass (a pod whose device is not there yet, ...).
    pub problems: Vec<String>,
    /// Maps that had no room for everything, with what was left out.
    pub full: Vec<FullMap>,
    /// Frontends not yet handed to their proxy port: the datapath holds no
    /// socket for it yet.
    pub awaiting_proxy: Vec<AwaitingProxy>,
}

/// A frontend whose proxy port has no listening socket in the datapath yet,
/// and what its connections get meanwhile.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AwaitingProxy {
    /// `addr:port/proto`.
    pub frontend: String,
    /// The proxy port the snapshot hands it to.
    pub proxy_port: u16,
    /// The proxy port it keeps meanwhile; None: its backends.
    pub kept_proxy_port: Option<u16>,
}

/// A map that had no room for some entries of the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FullMap {
    /// The BPF map (`weft_services`, ...).
    pub map: &'static str,
    /// Its key under the agent config's `map-sizes`.
    pub key: &'static str,
    /// Its `max_entries`.
    pub capacity: u32,
    /// How many objects (frontends, pods, addresses) were not written.
    pub not_written: usize,
    /// The first few of them, for people.
    pub examples: Vec<String>,
}

/// How many left-out objects a [`FullMap`] names.
const EXAMPLES: usize = 8;

impl Applied {
    /// Records that `what` was not written when `err` says its map is
    /// full; any other error is the caller's.
    fn left_out(&mut self, err: DatapathError, what: impl FnOnce() -> String) -> Result<()> {
        let DatapathError::MapFull { map, key, max_entries } = err else {
            return Err(err);
        };
        let i = match self.full.iter().position(|f| f.map == map) {
            Some(i) => i,
            None => {
                self.full.push(FullMap { map, key, capacity: max_entries, not_written: 0, examples: Vec::new() });
                self.full.len() - 1
            }
        };
        let f = &mut self.full[i];
        f.not_written += 1;
        if f.examples.len() < EXAMPLES {
            f.examples.push(what());
        }
        Ok(())
    }
}

/// Keeps what was last written, to write only differences.
#[derive(Default)]
pub struct Reconciler {
    devices: Vec<String>,
    devices_attached: bool,
    services: BTreeMap<Frontend, ServiceEntry>,
    /// The services map was read once (leftovers of an earlier run removed).
    frontends_read: bool,
    ipcache: BTreeMap<(Ipv4Addr, u8), IpcacheEntry>,
    endpoints: BTreeMap<Ipv4Addr, EndpointEntry>,
    policies: BTreeMap<u16, Vec<PolicyEntry>>,
    /// Which frontends each pass has to look at.
    frontends: FrontendOwners,
    /// Frontends a full map left out: the next pass tries them again.
    retry: BTreeSet<Tuple>,
    /// Frontends held back from their proxy port, until its socket is in.
    awaiting: BTreeMap<Frontend, AwaitingProxy>,
    /// The frontends wanted at each proxy port, and the other way round:
    /// those of a port without a socket are looked at on every pass.
    proxied: BTreeMap<u16, BTreeSet<Frontend>>,
    proxy_of: BTreeMap<Frontend, u16>,
}

/// The host-side device the node routes a pod address to (rtnetlink).
pub fn route_device(ip: Ipv4Addr) -> Result<Option<String>> {
    crate::datapath::netlink::route_device(ip).map_err(|e| DatapathError::io("asking rtnetlink for a route", e))
}

impl Reconciler {
    /// Local pods' addresses and the index of the device each is attached
    /// to, as last written.
    pub fn attached(&self) -> BTreeMap<Ipv4Addr, u32> {
        self.endpoints.iter().map(|(ip, e)| (*ip, e.ifindex)).collect()
    }

    /// A reconciler for a node whose external devices are `devices`.
    pub fn new(devices: Vec<String>) -> Self {
        Self { devices, ..Default::default() }
    }

    /// Applies `snap`; `policies` holds the policy of each local pod some
    /// policy selects, by address (pods absent from it have none). Runs in
    /// the node's network namespace.
    pub fn apply(
        &mut self,
        dp: &mut Datapath,
        snap: &Snapshot,
        policies: &BTreeMap<Ipv4Addr, EndpointPolicy>,
    ) -> Result<Applied> {
        let mut out = Applied::default();
        if !self.devices_attached {
            dp.sweep_devices()?;
            for d in &self.devices {
                dp.attach_node_device(d)?;
            }
            self.devices_attached = true;
        }
        self.apply_ipcache(dp, snap, &mut out)?;
        self.apply_endpoints(dp, snap, policies, &mut out)?;
        self.apply_host_policy(dp, snap, &mut out)?;
        self.apply_services(dp, snap, &mut out)?;
        Ok(out)
    }

    /// The node's own endpoint (host policies): its entries under
    /// `abi::HOST_EP_ID`, and whether each direction is under default-deny
    /// (`weft_config`). A direction is turned off before its entries go and
    /// turned on after they are in, so no connection sees a half policy.
    fn apply_host_policy(&mut self, dp: &mut Datapath, snap: &Snapshot, out: &mut Applied) -> Result<()> {
        let host = snap.policy.host.as_ref();
        let want = host.map_or((false, false), |h| (h.ingress, h.egress));
        let now = dp.config().host_policy;
        let kept = (now.0 && want.0, now.1 && want.1);
        if kept != now {
            dp.reconfigure(|c| c.host_policy = kept)?;
        }
        let ep_id = abi::HOST_EP_ID as u16;
        let entries = host.map(|h| h.entries.clone()).unwrap_or_default();
        if self.policies.get(&ep_id) != Some(&entries) {
            match dp.set_policy(ep_id, &entries) {
                Ok(()) => {
                    self.policies.insert(ep_id, entries);
                }
                Err(err) => {
                    // What did not fit stays denied once enforcement is on.
                    self.policies.remove(&ep_id);
                    out.left_out(err, || "the node's host policy".to_owned())?;
                }
            }
        }
        if want != kept {
            dp.reconfigure(|c| c.host_policy = want)?;
        }
        Ok(())
    }

    fn apply_ipcache(&mut self, dp: &mut Datapath, snap: &Snapshot, out: &mut Applied) -> Result<()> {
        let mut want = BTreeMap::new();
        let node_of: BTreeMap<&str, Ipv4Addr> = snap.nodes.iter().map(|n| (n.name.as_str(), n.ip)).collect();
        for p in &snap.pods {
            want.insert(
                (p.ip, 32),
                IpcacheEntry {
                    addr: p.ip,
                    prefix_len: 32,
                    identity: p.identity,
                    node_addr: node_of.get(p.node.as_str()).copied(),
                    local: p.local,
                    node: false,
                },
            );
        }
        for n in &snap.nodes {
            let own = n.name == snap.node_name;
            want.insert(
                (n.ip, 32),
                IpcacheEntry {
                    addr: n.ip,
                    prefix_len: 32,
                    identity: if own { abi::ID_HOST } else { abi::ID_REMOTE_NODE },
                    node_addr: Some(n.ip),
                    local: false,
                    node: true,
                },
            );
        }
        for c in &snap.policy.cidrs {
            want.entry((c.addr, c.prefix_len)).or_insert(IpcacheEntry {
                addr: c.addr,
                prefix_len: c.prefix_len,
                identity: c.identity,
                node_addr: None,
                local: false,
                node: false,
            });
        }
        // The node's other addresses are the node too: a primary CNI may give
        // the host side of pods' devices an address (ptp: the pods' gateway
        // on each host veth; bridge: the bridge's), and the node's own
        // connections to its pods (its proxy's upstream ones, probes) then
        // leave from it. Read again with each snapshot: a pod's ADD, which
        // makes one, changes the snapshot.
        let local =
            crate::datapath::local_addresses().map_err(|e| DatapathError::io("listing the node's addresses", e))?;
        for ip in snap.node_ip.into_iter().chain(local) {
            want.entry((ip, 32)).or_insert(IpcacheEntry {
                addr: ip,
                prefix_len: 32,
                identity: abi::ID_HOST,
                node_addr: Some(ip),
                local: false,
                node: true,
            });
        }
        if self.ipcache.is_empty() {
            // First pass (maybe after a restart): also drop what an earlier run left.
            for (addr, len, _) in dp.ipcache_entries()? {
                if !want.contains_key(&(addr, len)) {
                    dp.delete_ipcache(addr, len)?;
                }
            }
        }
        for k in self.ipcache.keys() {
            if !want.contains_key(k) {
                dp.delete_ipcache(k.0, k.1)?;
            }
        }
        let mut written = BTreeMap::new();
        for (k, e) in want {
            if self.ipcache.get(&k) != Some(&e)
                && let Err(err) = dp.upsert_ipcache(&e)
            {
                out.left_out(err, || format!("address {}/{}", e.addr, e.prefix_len))?;
                continue;
            }
            written.insert(k, e);
        }
        self.ipcache = written;
        Ok(())
    }

    fn apply_endpoints(
        &mut self,
        dp: &mut Datapath,
        snap: &Snapshot,
        policies: &BTreeMap<Ipv4Addr, EndpointPolicy>,
        out: &mut Applied,
    ) -> Result<()> {
        let mut want = BTreeMap::new();
        for p in snap.pods.iter().filter(|p| p.local) {
            let dev = match (&p.device, snap.cni) {
                // The device weft-cni named, if it is still the same one.
                (Some((name, index)), _) => match crate::datapath::ifindex(name) {
                    Ok(i) if i == *index => name.clone(),
                    _ => {
                        out.problems.push(format!("pod {}: device {name} (index {index}) is gone", p.key));
                        continue;
                    }
                },
                (None, true) => {
                    out.problems.push(format!("pod {}: not registered by weft-cni yet", p.key));
                    continue;
                }
                (None, false) => match route_device(p.ip)? {
                    Some(d) if !self.devices.contains(&d) && d != "lo" => d,
                    _ => {
                        out.problems.push(format!("pod {}: no device routes to {} yet", p.key, p.ip));
                        continue;
                    }
                },
            };
            let ifindex = match dp.attach_pod_device(&dev) {
                Ok(i) => i,
                Err(e) => {
                    out.problems.push(format!("pod {}: attaching {dev}: {e}", p.key));
                    // A pod attached before keeps its endpoint and programs
                    // (this pass did not change them): taking them out
                    // would let its traffic through unjudged.
                    if let Some(old) = self.endpoints.get(&p.ip) {
                        want.insert(p.ip, *old);
                    }
                    continue;
                }
            };
            let policy = policies.get(&p.ip);
            let ep = EndpointEntry {
                addr: p.ip,
                ifindex,
                identity: p.identity,
                ep_id: dp.endpoint_id_for(p.ip),
                policy_ingress: policy.is_some_and(|p| p.ingress),
                policy_egress: policy.is_some_and(|p| p.egress),
            };
            // Policy entries go in before the endpoint starts enforcing them.
            // Those that do not fit are left out (denies go first, see
            // `Datapath::set_policy`) and written on a later pass.
            let entries = policy.map(|p| p.entries.clone()).unwrap_or_default();
            if self.policies.get(&ep.ep_id) != Some(&entries) {
                match dp.set_policy(ep.ep_id, &entries) {
                    Ok(()) => {
                        self.policies.insert(ep.ep_id, entries);
                    }
                    Err(err) => {
                        self.policies.remove(&ep.ep_id);
                        out.left_out(err, || format!("policy of pod {}", p.key))?;
                    }
                }
            }
            if self.endpoints.get(&p.ip) != Some(&ep) {
                if let Err(err) = dp.upsert_endpoint(&ep) {
                    // No room for the pod: its policy entries are not needed either.
                    out.left_out(err, || format!("pod {}", p.key))?;
                    self.policies.remove(&ep.ep_id);
                    dp.set_policy(ep.ep_id, &[])?;
                    continue;
                }
                out.endpoints_written += 1;
            }
            want.insert(p.ip, ep);
        }
        let attached = dp.attached_devices()?;
        for old in dp.endpoints() {
            if !want.contains_key(&old.addr) {
                self.policies.remove(&old.ep_id);
                dp.delete_endpoint(old.addr)?;
                // The pod is gone; its device, if still there, loses our programs too.
                if !want.values().any(|e| e.ifindex == old.ifindex)
                    && let Some((dev, _)) = attached.iter().find(|(_, idx)| *idx == old.ifindex)
                {
                    dp.detach_device(dev)?;
                }
                out.endpoints_removed += 1;
            }
        }
        dp.sweep_devices()?;
        self.endpoints = want;
        Ok(())
    }

    /// Writes the frontends of the Services that changed since the last
    /// pass (those the snapshot does not share with it), and again those a
    /// pass left out and those handed to a proxy port without a socket: a change costs
    /// the Services it changed, not every frontend. The first pass writes
    /// every frontend and removes what the map held beyond them.
    fn apply_services(&mut self, dp: &mut Datapath, snap: &Snapshot, out: &mut Applied) -> Result<()> {
        let mut touched = self.frontends.follow(&snap.services);
        touched.extend(self.retry.iter().copied());
        // Frontends handed to a port whose socket is not (or no longer) in
        // the map: held back, or reported as kept where they are.
        let ready = dp.proxy_ports_registered();
        let unready = self.proxied.iter().filter(|(port, _)| !ready.contains(port));
        touched.extend(unready.flat_map(|(_, fs)| fs.iter().map(tuple_of)));
        // And those held back whose socket may have come.
        touched.extend(self.awaiting.keys().map(tuple_of));
        // What was written of them: on the first pass, everything the map
        // holds (also what an earlier run left).
        let present: Vec<Frontend> = if self.frontends_read {
            touched.iter().flat_map(|t| self.written_of(*t)).collect()
        } else {
            dp.frontends()?
        };
        self.frontends_read = true;
        let want = want(&self.frontends, &touched);
        let wanted: BTreeSet<Tuple> = want.keys().map(tuple_of).collect();
        for f in present {
            if !wanted.contains(&tuple_of(&f)) {
                dp.delete_service(&f)?;
                self.services.remove(&f);
                out.services_removed += 1;
            } else if !want.contains_key(&f) {
                // Another kind of frontend at that address writes over it.
                self.services.remove(&f);
            }
        }
        for t in &touched {
            self.retry.remove(t);
            for f in Self::kinds_of(*t) {
                self.awaiting.remove(&f);
                if let Some(port) = self.proxy_of.remove(&f)
                    && let Some(fs) = self.proxied.get_mut(&port)
                {
                    fs.remove(&f);
                    if fs.is_empty() {
                        self.proxied.remove(&port);
                    }
                }
            }
        }
        for (f, mut e) in want {
            if let Some(port) = e.proxy_port {
                self.proxy_of.insert(f, port);
                self.proxied.entry(port).or_default().insert(f);
            }
            if let Some(port) = e.proxy_port
                && !ready.contains(&port)
            {
                e.proxy_port = self.services.get(&f).map_or_else(|| dp.written_proxy_port(&f), |w| w.proxy_port);
                let waits = AwaitingProxy { frontend: f.to_string(), proxy_port: port, kept_proxy_port: e.proxy_port };
                self.awaiting.insert(f, waits);
            }
            if self.services.get(&f) != Some(&e) {
                match dp.upsert_service(&e) {
                    Ok(()) => out.services_written += 1,
                    Err(err @ DatapathError::MapFull { .. }) => {
                        // The frontend keeps what it had, if anything.
                        out.left_out(err, || format!("frontend {f}"))?;
                        self.retry.insert(tuple_of(&f));
                        continue;
                    }
                    Err(err) => out.problems.push(format!("frontend {f}: {err}")),
                }
            }
            self.services.insert(f, e);
        }
        out.awaiting_proxy = self.awaiting.values().cloned().collect();
        Ok(())
    }

    /// The frontends of every kind at an address, port and protocol.
    fn kinds_of((addr, port, proto): Tuple) -> impl Iterator<Item = Frontend> {
        [FrontendKind::ClusterIp, FrontendKind::NodePort, FrontendKind::External]
            .into_iter()
            .map(move |kind| Frontend { addr, port, proto, kind })
    }

    /// The frontends written at an address, port and protocol.
    fn written_of(&self, t: Tuple) -> impl Iterator<Item = Frontend> + '_ {
        Self::kinds_of(t).filter(|f| self.services.contains_key(f))
    }
}

/// The entries the Services `owners` followed last want at `tuples`: as
/// [`want_all`] has them there (the last Service in key order with a
/// frontend decides it).
fn want(owners: &FrontendOwners, tuples: &BTreeSet<Tuple>) -> BTreeMap<Frontend, ServiceEntry> {
    let mut want = BTreeMap::new();
    for t in tuples {
        for s in owners.owners(t) {
            for e in s.entries.iter().filter(|e| tuple_of(&e.frontend) == *t) {
                want.insert(e.frontend, e.clone());
            }
        }
    }
    want
}

/// Every entry the Services want (the last in key order with a frontend
/// decides it): the oracle of [`want`].
#[cfg(test)]
fn want_all(services: &imbl::Vector<std::sync::Arc<crate::state::ServiceState>>) -> BTreeMap<Frontend, ServiceEntry> {
    services.iter().flat_map(|s| s.entries.iter().map(|e| (e.frontend, e.clone()))).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{datapath::Proto, k8s::ObjKey, state::ServiceState, xds::acks::tests::Rng};

    /// A Service `i` with frontends from a small pool: Services share
    /// some, and a frontend may be at one address as two kinds (also the
    /// flow names' property test's).
    pub(crate) fn service(i: u64, rng: &mut Rng) -> Arc<ServiceState> {
        let kinds = [FrontendKind::ClusterIp, FrontendKind::NodePort, FrontendKind::External];
        let entries = (0..1 + rng.below(3))
            .map(|_| ServiceEntry {
                frontend: Frontend {
                    addr: Ipv4Addr::new(10, 96, 0, rng.below(5) as u8),
                    port: 80 + rng.below(2) as u16,
                    proto: if rng.below(4) == 0 { Proto::Udp } else { Proto::Tcp },
                    kind: kinds[rng.below(3) as usize],
                },
                backends: Vec::new(),
                proxy_port: (rng.below(3) == 0).then_some(15000),
            })
            .collect();
        Arc::new(ServiceState { key: ObjKey::new("default", format!("s{i}")), entries })
    }

    /// After random adds, edits and removals of Services (the others
    /// shared, as the control loop's snapshots share them), writing what
    /// the followed frontends want where they changed keeps what is
    /// written equal to what every Service wants.
    #[test]
    fn frontends_followed_by_change_equal_every_frontend_after_every_random_step() {
        for seed in 1..=8u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut followed = FrontendOwners::default();
            let mut written: BTreeMap<Frontend, ServiceEntry> = BTreeMap::new();
            let mut services: imbl::Vector<Arc<ServiceState>> = imbl::Vector::new();
            for step in 0..300 {
                let i = rng.below(10);
                let key = ObjKey::new("default", format!("s{i}"));
                match (rng.below(4), services.binary_search_by(|s| s.key.cmp(&key))) {
                    (0, Ok(at)) => drop(services.remove(at)),
                    (1, _) => {} // the same Services again
                    (_, Ok(at)) => drop(services.set(at, service(i, &mut rng))),
                    (_, Err(at)) => services.insert(at, service(i, &mut rng)),
                }
                let touched = followed.follow(&services);
                let want = want(&followed, &touched);
                written.retain(|f, _| !touched.contains(&tuple_of(f)));
                written.extend(want);
                assert_eq!(written, want_all(&services), "seed {seed} step {step}");
            }
        }
    }
}
