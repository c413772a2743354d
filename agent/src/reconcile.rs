//! Makes the datapath match a snapshot: node devices attached, every known
//! address in the ipcache, local pods as endpoints on their devices, every
//! Service frontend written; what the snapshot no longer has is removed.
//! Applying the same snapshot twice changes nothing.
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
    datapath::{Datapath, DatapathError, EndpointEntry, Frontend, IpcacheEntry, PolicyEntry, Result, ServiceEntry},
    state::{Snapshot, policy::EndpointPolicy},
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
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
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

    fn apply_services(&mut self, dp: &mut Datapath, snap: &Snapshot, out: &mut Applied) -> Result<()> {
        let want: BTreeMap<Frontend, ServiceEntry> =
            snap.services.iter().flat_map(|s| s.entries.iter().map(|e| (e.frontend, e.clone()))).collect();
        let wanted: BTreeSet<_> = want.keys().map(|w| (w.addr, w.port, w.proto)).collect();
        // Everything written but not wanted: on the first pass, what the
        // map holds (also what an earlier run left); then what this
        // reconciler wrote, so a pass does not read the whole map.
        let present = if self.frontends_read { self.services.keys().copied().collect() } else { dp.frontends()? };
        self.frontends_read = true;
        for f in present {
            if !wanted.contains(&(f.addr, f.port, f.proto)) {
                dp.delete_service(&f)?;
                self.services.remove(&f);
                out.services_removed += 1;
            }
        }
        let ready = dp.proxy_ports_registered();
        let mut written = BTreeMap::new();
        for (f, mut e) in want {
            if let Some(port) = e.proxy_port
                && !ready.contains(&port)
            {
                e.proxy_port = self.services.get(&f).map_or_else(|| dp.written_proxy_port(&f), |w| w.proxy_port);
                out.awaiting_proxy.push(AwaitingProxy {
                    frontend: f.to_string(),
                    proxy_port: port,
                    kept_proxy_port: e.proxy_port,
                });
            }
            if self.services.get(&f) != Some(&e) {
                match dp.upsert_service(&e) {
                    Ok(()) => out.services_written += 1,
                    Err(err @ DatapathError::MapFull { .. }) => {
                        // The frontend keeps what it had, if anything.
                        out.left_out(err, || format!("frontend {f}"))?;
                        if let Some(old) = self.services.remove(&f) {
                            written.insert(f, old);
                        }
                        continue;
                    }
                    Err(err) => out.problems.push(format!("frontend {f}: {err}")),
                }
            }
            written.insert(f, e);
        }
        self.services = written;
        Ok(())
    }
}
