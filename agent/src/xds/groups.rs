//! Listener groups: the listeners Services are redirected to, many configs'
//! to one listener of Envoy.
//!
//! Why: Envoy's main thread spends time quadratic in the number of its
//! listeners (its listener manager walks its lists for every listener it
//! adds or updates), whatever the listeners hold: 61 s of CPU at 10,000
//! listeners on the bench machine, and a state-of-the-world LDS update
//! costs 8-13 s at 8,000 (benches/results/REPORT.md, "Envoy's own cost of
//! three listener shapes"). A hundred configs per listener took that term
//! away there. The model keeps building one listener per config (what the
//! ACK counts, statuses and NACK blame are of); this pass, between the
//! build and what is published to Envoy, replaces the listeners that can
//! share one by grouped listeners:
//!
//! - A member is a config's listener the model made virtual (no socket of
//!   its own, `bind_to_port: false`, the dispatcher hands it connections by
//!   their Service address), with exactly one filter chain that matches
//!   everything and no default chain or chain matcher. A group's listener
//!   has the union of its members' frontends as its addresses, and each
//!   member's chain once per frontend port, matched by that port and the
//!   member's frontend addresses there: a connection reaches exactly the
//!   chain of the config that serves its Service frontend. Connection
//!   managers keep their stat prefixes, routes and clusters stay each
//!   config's own. Every other listener (bound, pinned to an address of its
//!   own, with chains that match on something, a placeholder without
//!   frontends) stays a listener of its own, as built.
//! - Members share listener-level fields: only listeners whose fields other
//!   than name, addresses and filter chains are the same bytes share a
//!   group (the group's name carries a hash of those fields).
//! - Tenancy: a group holds the listeners of one namespace (cluster-wide
//!   configs have a group space of their own), so one tenant's objects
//!   never share a listener with another's.
//! - Stable membership: a member's group is a hash of its name into a
//!   power-of-two number of buckets per namespace, as many as make groups
//!   of `size` members or fewer on average. Adding or removing configs moves no other
//!   member, except when the namespace's count crosses a power of two
//!   (halving waits until a quarter, so a count going up and down across
//!   one does not reshuffle each time). An edit of a member's chain
//!   changes its group's filter chains alone, which Envoy updates in place
//!   (draining that chain's connections only); a member that comes, goes,
//!   or changes its frontends changes the group's addresses, which Envoy
//!   applies as a new listener (the group's connections drain gracefully).
//! - ACKs and NACKs stay per config: an ACK of a group's version is an ACK
//!   of each member's listener as built ([`Groups::acked`]). A NACK of a
//!   group blames its one member that changed since the group's last ACK
//!   ([`Groups::nacked`]). If several changed, none is blamed yet: each is
//!   tried on its own, in a probe: its listener as built, at an address no
//!   connection reaches (so it takes no frontend from its group), named as
//!   the member's listener, so that Envoy's answer names the one at fault
//!   as without groups. Meanwhile the group is published with each tried
//!   member as Envoy last ACKed it there (a new one left out): Envoy keeps
//!   serving every frontend of the group, the tried members' at their last
//!   ACKed chains, and nothing is ever moved from one listener to another
//!   (Envoy refuses a listener with an address another listener has, so a
//!   move needs the frontend unmatched for a while: the dispatcher's 503).
//!   A probe Envoy takes (ACKed, or left unnamed by a refusal naming other
//!   listeners) goes, and its member is in its group as built again; a
//!   probe Envoy refuses is the config's NACK, and the config's next build
//!   (its last good version, or none) replaces it. If a group is refused
//!   again with only members Envoy took alone changed, they are blamed
//!   together (Envoy refuses them side by side).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
};

use envoy_types::pb::{
    envoy::config::{
        core::v3::{Address, CidrRange, address, socket_address},
        listener::v3::{FilterChain, FilterChainMatch, Listener},
    },
    google::protobuf::UInt32Value,
};
use imbl::ordmap::DiffItem;
use prost::Message;

use super::{
    envoyconfig::ConfigKey,
    model::{Resource, Resources, XdsSnapshot},
    translate::{self, LISTENER},
};
use crate::hash::fnv1a_32;

/// How many members a group holds on average at most, unless the agent
/// config says otherwise (`envoy.listener-group-size`): about the group size measured
/// in benches/results/REPORT.md.
pub const DEFAULT_GROUP_SIZE: usize = 100;

/// The start of every group listener's name. A config's listener names
/// are qualified by a namespace (`ns/config/listener`), and a namespace
/// name has no `:`.
pub const GROUP_PREFIX: &str = "weft-group:";

/// Where probes are (see [`Probe`]): loopback addresses no Service has and
/// nothing connects to, one per probe.
const PROBE_NET: Ipv4Addr = Ipv4Addr::new(127, 128, 0, 0);
const PROBE_HOSTS: u32 = 0x007f_ffff;

/// A namespace's share of listeners: (cluster-wide, namespace).
type Tenant = (bool, String);

/// A listener's name, shared by the maps that hold it.
type Name = Arc<str>;

/// A member's listener, as far as grouping reads it.
struct Member {
    resource: Arc<Resource>,
    /// A hash of its listener-level fields.
    class: u32,
    /// Its group (None until placed).
    group: Option<Name>,
}

struct Group {
    name: Name,
    /// Member name -> its listener as built.
    members: BTreeMap<Name, Arc<Resource>>,
    /// The members as in the group's listener as published: as built, or a
    /// tried member as Envoy last ACKed it here (see [`Probe`]).
    content: BTreeMap<Name, Arc<Resource>>,
    /// The group's listener as published (None while it has no members).
    resource: Option<Arc<Resource>>,
    /// Its members in the version of it Envoy last ACKed (empty if none).
    acked: BTreeMap<Name, Arc<Resource>>,
}

#[derive(Default)]
struct TenantGroups {
    buckets: u32,
    members: BTreeSet<Name>,
}

/// A member tried on its own after its group was refused with other
/// changed members (see the module doc).
struct Probe {
    /// The member's version (as built) tried.
    built: u64,
    /// The probe's version (the member's listener at an unreached address).
    version: u64,
    /// What its group holds of it meanwhile: the member as Envoy last ACKed
    /// it there (None: it was not there; it is left out).
    stand_in: Option<Arc<Resource>>,
}

/// What a NACK of listeners comes to once groups are resolved.
#[derive(Debug, Default, PartialEq)]
pub struct Nacked {
    /// The names in the refused response that are not groups.
    pub names: Vec<String>,
    /// Members blamed: each the one member of a refused group that changed
    /// since the group's last ACK.
    pub blamed: Vec<String>,
    /// Members tried on their own (probes): the next push must be built.
    pub pulled: bool,
}

/// See the module doc.
pub struct Groups {
    /// Members per group on average at most; 0: no groups (every listener
    /// as built).
    size: usize,
    /// The built listeners last published.
    last: Resources,
    /// The listeners as published: groups and the listeners of their own.
    published: Resources,
    members: HashMap<Name, Member>,
    groups: BTreeMap<Name, Group>,
    tenants: BTreeMap<Tenant, TenantGroups>,
    /// Members tried on their own, by name.
    probes: HashMap<Name, Probe>,
    /// Members Envoy took on their own, at that version as built: if their
    /// group is refused with only such members changed, they are blamed.
    cleared: HashMap<Name, u64>,
    /// Probes numbered, for their unreached addresses.
    probe_seq: u32,
}

impl Groups {
    /// Groups of `size` members or fewer on average (0 or 1: none).
    pub fn new(size: usize) -> Self {
        Self {
            size: if size > 1 { size } else { 0 },
            last: Resources::new(),
            published: Resources::new(),
            members: HashMap::new(),
            groups: BTreeMap::new(),
            tenants: BTreeMap::new(),
            probes: HashMap::new(),
            cleared: HashMap::new(),
            probe_seq: 0,
        }
    }

    /// Whether listeners are grouped (else each is published as built).
    pub fn on(&self) -> bool {
        self.size > 0
    }

    /// Whether a listener name is a group's.
    pub fn is_group(name: &str) -> bool {
        name.starts_with(GROUP_PREFIX)
    }

    /// The listeners as last published (tests answer for Envoy with them).
    #[cfg(test)]
    pub fn published(&self) -> Option<&Resources> {
        (self.size > 0).then_some(&self.published)
    }

    /// `built` as Envoy gets it: its listeners grouped. Costs what changed
    /// in the built listeners since the last call, and the groups that
    /// changed (their members are decoded and the group encoded again).
    pub fn publish(&mut self, built: &XdsSnapshot) -> XdsSnapshot {
        if self.size == 0 {
            return built.clone();
        }
        let fresh = built.types.get(LISTENER).cloned().unwrap_or_default();
        let mut dirty: BTreeSet<Name> = BTreeSet::new();
        // Tenants whose member count changed, with the members that joined.
        let mut touched: BTreeMap<Tenant, Vec<Name>> = BTreeMap::new();
        let mut consider: Vec<(String, Arc<Resource>)> = Vec::new();
        let last = std::mem::replace(&mut self.last, fresh.clone());
        for d in last.diff(&fresh) {
            let (name, now) = match d {
                DiffItem::Add(n, r) | DiffItem::Update { new: (n, r), .. } => (n, Some(r)),
                DiffItem::Remove(n, _) => (n, None),
            };
            self.leave(name, &mut dirty, &mut touched);
            // A changed member is tried anew, if need be, as it is now (its
            // probe, if any, goes with the version it tried).
            self.probes.remove(name.as_str());
            self.cleared.remove(name.as_str());
            match now {
                Some(r) => consider.push((name.clone(), r.clone())),
                None => drop(self.published.remove(name)),
            }
        }
        for (name, r) in consider {
            let joins = joinable(&r).filter(|_| !Self::is_group(&name));
            match joins {
                Some((tenant, class)) => {
                    self.published.remove(&name);
                    let name: Name = Arc::from(name);
                    self.tenants.entry(tenant.clone()).or_default().members.insert(name.clone());
                    touched.entry(tenant).or_default().push(name.clone());
                    self.members.insert(name, Member { resource: r, class, group: None });
                }
                None => drop(self.published.insert(name, r)),
            }
        }
        for (tenant, joined) in touched {
            self.place(&tenant, &joined, &mut dirty);
        }
        for g in dirty {
            self.assemble(&g);
        }
        let mut out = built.clone();
        // No listener type in the build: nothing is published of it either.
        if out.types.contains_key(LISTENER) {
            out.types.insert(LISTENER.to_owned(), self.published.clone());
        }
        out
    }

    /// Takes a listener out of its group, if it is a member.
    fn leave(&mut self, name: &str, dirty: &mut BTreeSet<Name>, touched: &mut BTreeMap<Tenant, Vec<Name>>) {
        let Some(m) = self.members.remove(name) else { return };
        if let Some(g) = m.group.as_ref().and_then(|g| self.groups.get_mut(g)) {
            g.members.remove(name);
            dirty.insert(g.name.clone());
        }
        let Some(tenant) = tenant_of(&m.resource) else { return };
        if let Some(t) = self.tenants.get_mut(&tenant) {
            t.members.remove(name);
        }
        touched.entry(tenant).or_default();
    }

    /// Places a tenant's members that `joined` (they have no group yet):
    /// a change costs the members that changed, not the tenant's size. All
    /// of the tenant's members are placed again only when its bucket count
    /// changes (which takes the tenant doubling or falling to a quarter).
    fn place(&mut self, tenant: &Tenant, joined: &[Name], dirty: &mut BTreeSet<Name>) {
        let Some(t) = self.tenants.get_mut(tenant) else { return };
        if t.members.is_empty() {
            self.tenants.remove(tenant);
            return;
        }
        let n = t.members.len();
        let buckets = buckets_for(n, t.buckets, self.size);
        let all = buckets != t.buckets;
        t.buckets = buckets;
        let names: Box<dyn Iterator<Item = &Name>> =
            if all { Box::new(t.members.iter()) } else { Box::new(joined.iter()) };
        for name in names {
            let Some(m) = self.members.get_mut(name) else { continue };
            if !all && m.group.is_some() {
                continue;
            }
            let g = group_name(tenant, m.class, bucket(name, buckets));
            if m.group.as_deref() == Some(g.as_str()) {
                continue;
            }
            if let Some(old) = m.group.as_ref().and_then(|g| self.groups.get_mut(g)) {
                old.members.remove(name);
                dirty.insert(old.name.clone());
            }
            let group = self.groups.entry(Arc::from(g)).or_insert_with_key(|k| Group {
                name: k.clone(),
                members: BTreeMap::new(),
                content: BTreeMap::new(),
                resource: None,
                acked: BTreeMap::new(),
            });
            group.members.insert(name.clone(), m.resource.clone());
            dirty.insert(group.name.clone());
            m.group = Some(group.name.clone());
        }
    }

    /// Encodes a group's listener again (or removes it, without members):
    /// its members as built, a tried one as its probe's stand-in.
    fn assemble(&mut self, name: &str) {
        let Some(g) = self.groups.get_mut(name) else { return };
        if g.members.is_empty() {
            self.groups.remove(name);
            self.published.remove(name);
            return;
        }
        let probes = &self.probes;
        g.content = g
            .members
            .iter()
            .filter_map(|(n, r)| match probes.get(n) {
                Some(p) => Some((n.clone(), p.stand_in.clone()?)),
                None => Some((n.clone(), r.clone())),
            })
            .collect();
        if g.content.is_empty() {
            // Only new members, all being tried: nothing to publish yet.
            g.resource = None;
            self.published.remove(name);
            return;
        }
        let decoded: Vec<(&str, Listener)> =
            g.content.iter().filter_map(|(n, r)| Some((&**n, Listener::decode(r.value.as_slice()).ok()?))).collect();
        let listener = group_listener(name, &decoded);
        let r = Arc::new(Resource::new(name.to_owned(), &listener, None));
        if g.resource.as_ref().is_none_or(|old| old.version != r.version) {
            g.resource = Some(r.clone());
        }
        if let Some(r) = &g.resource {
            self.published.insert(name.to_owned(), r.clone());
        }
    }

    /// Envoy's ACK of these listeners (name -> version), with each group
    /// ACKed at its current version replaced by its members' listeners as
    /// it holds them; an ACK of an earlier version of a group is left out,
    /// and so is a probe's (its member is in its group as built again).
    /// Also returns whether a probe went (a build is due).
    pub fn acked(&mut self, resources: BTreeMap<String, u64>) -> (BTreeMap<String, u64>, bool) {
        if self.size == 0 {
            return (resources, false);
        }
        let mut out = BTreeMap::new();
        let mut taken = Vec::new();
        for (name, version) in resources {
            if let Some(p) = self.probes.get(name.as_str()) {
                if p.version == version {
                    taken.push(name);
                }
                continue;
            }
            if !Self::is_group(&name) {
                out.insert(name, version);
                continue;
            }
            let Some(g) = self.groups.get_mut(name.as_str()) else { continue };
            if g.resource.as_ref().is_none_or(|r| r.version != version) {
                continue;
            }
            g.acked.clone_from(&g.content);
            out.extend(g.acked.iter().map(|(n, r)| (n.to_string(), r.version)));
        }
        let release = !taken.is_empty();
        self.take_probes(taken);
        (out, release)
    }

    /// Envoy's NACK of a response with these listeners (see [`Nacked`]).
    /// The listeners refused are those the message names; if it names no
    /// listener of the response, every one in it. A probe it does not
    /// refuse was taken.
    pub fn nacked(&mut self, names: &[String], message: &str) -> Nacked {
        let mut out = Nacked::default();
        if self.size == 0 {
            out.names = names.to_vec();
            return out;
        }
        let named = names.iter().any(|n| message.contains(n.as_str()));
        let refused = |n: &String| !named || message.contains(n.as_str());
        let mut groups: Vec<&String> = Vec::new();
        let mut taken: Vec<String> = Vec::new();
        for n in names {
            if Self::is_group(n) {
                if refused(n) {
                    groups.push(n);
                }
            } else if self.probes.contains_key(n.as_str()) && !refused(n) {
                taken.push(n.clone());
            } else {
                // A refused probe is its member's listener refused by
                // name: its config is blamed as without groups.
                out.names.push(n.clone());
            }
        }
        // Suspects: the members of a refused group that changed since its
        // last ACK (a tried one is there as Envoy ACKed it: not one).
        let mut tried: Vec<(Name, Arc<Resource>, Option<Arc<Resource>>)> = Vec::new();
        for name in groups {
            let Some(g) = self.groups.get(name.as_str()) else { continue };
            let suspects: Vec<(&Name, &Arc<Resource>)> =
                g.content.iter().filter(|(n, r)| g.acked.get(*n).is_none_or(|a| a.version != r.version)).collect();
            match suspects.as_slice() {
                [] => {}
                [(one, _)] => out.blamed.push(one.to_string()),
                many => {
                    let untried: Vec<&(&Name, &Arc<Resource>)> =
                        many.iter().filter(|(n, r)| self.cleared.get(*n) != Some(&r.version)).collect();
                    if untried.is_empty() {
                        // Envoy took each alone and refuses them together.
                        out.blamed.extend(many.iter().map(|(n, _)| n.to_string()));
                    }
                    for (n, r) in untried {
                        tried.push(((*n).clone(), (*r).clone(), g.acked.get(*n).cloned()));
                    }
                }
            }
        }
        out.pulled = !tried.is_empty() || !taken.is_empty();
        let mut dirty = BTreeSet::new();
        for (n, r, stand_in) in tried {
            let Some(probe) = self.probe_of(&r) else {
                // Not a listener Envoy could take: blamed at once.
                out.blamed.push(n.to_string());
                continue;
            };
            self.probes.insert(n.clone(), Probe { built: r.version, version: probe.version, stand_in });
            self.published.insert(n.to_string(), probe);
            dirty.extend(self.members.get(&n).and_then(|m| m.group.clone()));
        }
        for g in dirty {
            self.assemble(&g);
        }
        self.take_probes(taken);
        out
    }

    /// A member's listener as built, at an address of its own that no
    /// connection reaches: Envoy judges its chain without the member
    /// leaving its group.
    fn probe_of(&mut self, r: &Resource) -> Option<Arc<Resource>> {
        let mut l = Listener::decode(r.value.as_slice()).ok()?;
        self.probe_seq = self.probe_seq.wrapping_add(1);
        let at = Ipv4Addr::from(u32::from(PROBE_NET) | (self.probe_seq & PROBE_HOSTS));
        translate::at_frontends(&mut l, [SocketAddrV4::new(at, 1)]);
        // As its chain is in its group: with the agent's access log.
        translate::add_weft_access_log(&mut l);
        Some(Arc::new(Resource::new(r.name.clone(), &l, r.owner.clone())))
    }

    /// Probes Envoy took: they go, and their members are in their groups
    /// as built again.
    fn take_probes(&mut self, names: Vec<String>) {
        let mut dirty = BTreeSet::new();
        for n in names {
            let Some((name, p)) = self.probes.remove_entry(n.as_str()) else { continue };
            self.published.remove(&n);
            dirty.extend(self.members.get(&name).and_then(|m| m.group.clone()));
            self.cleared.insert(name, p.built);
        }
        for g in dirty {
            self.assemble(&g);
        }
    }

    /// A new Envoy has nothing: no group is ACKed (probes stay published:
    /// the new Envoy judges them).
    pub fn reset(&mut self) {
        for g in self.groups.values_mut() {
            g.acked.clear();
        }
    }
}

/// The tenant of a config's listener.
fn tenant_of(r: &Resource) -> Option<Tenant> {
    let owner: &ConfigKey = r.owner.as_ref()?;
    Some((owner.clusterwide, owner.namespace().to_owned()))
}

/// The buckets of a tenant with `n` members, keeping `current` while it
/// fits: at most `size` members per bucket, and more than a quarter of that.
fn buckets_for(n: usize, current: u32, size: usize) -> u32 {
    let size = size.max(1);
    let fits = |b: u32| {
        let room = (b as usize).saturating_mul(size);
        n <= room && (b == 1 || n > room / 4)
    };
    if current >= 1 && fits(current) {
        return current;
    }
    let needed = n.div_ceil(size).max(1);
    u32::try_from(needed.next_power_of_two()).unwrap_or(1 << 31)
}

/// A member's bucket among `buckets` (a power of two).
fn bucket(name: &str, buckets: u32) -> u32 {
    fnv1a_32(name.as_bytes()) & (buckets.max(1) - 1)
}

fn group_name((clusterwide, namespace): &Tenant, class: u32, bucket: u32) -> String {
    let space = if *clusterwide { "*" } else { namespace.as_str() };
    format!("{GROUP_PREFIX}{space}:{class:08x}:{bucket}")
}

/// The tenant and listener-level class of a built listener that can join a
/// group, or None (see the module doc).
fn joinable(r: &Resource) -> Option<(Tenant, u32)> {
    let tenant = tenant_of(r)?;
    let l = Listener::decode(r.value.as_slice()).ok()?;
    can_join(&l).then(|| (tenant, fnv1a_32(&listener_level(&l).encode_to_vec())))
}

/// Whether a config's listener (it has an owner) joins a group when groups
/// are on: the model leaves the agent's access log out of such a listener,
/// and its group's listener gives every chain it (see [`group_listener`]).
pub(crate) fn can_join(l: &Listener) -> bool {
    let [chain] = l.filter_chains.as_slice() else { return false };
    let plain = chain.filter_chain_match.as_ref().is_none_or(|m| *m == FilterChainMatch::default());
    frontends(l).is_some()
        && l.bind_to_port.map(|b| b.value) == Some(false)
        && !l.use_original_dst.is_some_and(|b| b.value)
        && plain
        && l.default_filter_chain.is_none()
        && l.filter_chain_matcher.is_none()
}

/// A listener without its name, addresses and filter chains: what members
/// of one group share.
fn listener_level(l: &Listener) -> Listener {
    Listener {
        name: String::new(),
        address: None,
        additional_addresses: Vec::new(),
        filter_chains: Vec::new(),
        ..l.clone()
    }
}

/// The frontends a virtual listener has as its addresses; None if any of
/// them is not a plain IPv4 TCP address and port, or it has only its
/// unreached placeholder (a loopback address).
fn frontends(l: &Listener) -> Option<Vec<SocketAddrV4>> {
    let one = |a: &Address| -> Option<SocketAddrV4> {
        let Some(address::Address::SocketAddress(s)) = &a.address else { return None };
        let Some(socket_address::PortSpecifier::PortValue(port)) = s.port_specifier else { return None };
        let f = SocketAddrV4::new(s.address.parse::<Ipv4Addr>().ok()?, u16::try_from(port).ok()?);
        // Anything else set on the address (a resolver, a protocol) keeps
        // the listener on its own.
        (*a == translate::frontend_address(f)).then_some(f)
    };
    let mut all = vec![one(l.address.as_ref()?)?];
    for a in &l.additional_addresses {
        if a.socket_options.is_some() {
            return None;
        }
        all.push(one(a.address.as_ref()?)?);
    }
    if all.iter().any(|f| f.ip().is_loopback()) {
        return None;
    }
    Some(all)
}

/// The listener of a group of members (name and listener, by name): their
/// frontends as its addresses, each member's chain once per frontend port,
/// matched by that port and its frontend addresses at that port, each
/// logging to the agent. (The model leaves the log out of the members, see
/// [`can_join`]: 983 bytes of a bench config's 1,329, kept once per config
/// in the group and not again in the member.)
fn group_listener(name: &str, members: &[(&str, Listener)]) -> Listener {
    let mut out = members.first().map(|(_, l)| listener_level(l)).unwrap_or_default();
    out.name = name.to_owned();
    let mut addresses: BTreeSet<SocketAddrV4> = BTreeSet::new();
    for (member, l) in members {
        let (Some(fronts), Some(chain)) = (frontends(l), l.filter_chains.first()) else { continue };
        let mut by_port: BTreeMap<u16, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        for f in &fronts {
            by_port.entry(f.port()).or_default().insert(*f.ip());
            addresses.insert(*f);
        }
        let several = by_port.len() > 1;
        for (port, ips) in by_port {
            let mut c: FilterChain = chain.clone();
            c.name = if several { format!("{member}:{port}") } else { (*member).to_owned() };
            c.filter_chain_match = Some(FilterChainMatch {
                destination_port: Some(UInt32Value { value: u32::from(port) }),
                prefix_ranges: ips
                    .iter()
                    .map(|ip| CidrRange { address_prefix: ip.to_string(), prefix_len: Some(UInt32Value { value: 32 }) })
                    .collect(),
                ..Default::default()
            });
            out.filter_chains.push(c);
        }
    }
    translate::at_frontends(&mut out, addresses);
    translate::add_weft_access_log(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::listener::v3::{Filter, filter};

    use super::*;
    use crate::{k8s::ObjKey, xds::acks::tests::Rng};

    const NAMESPACES: [&str; 3] = ["a", "b", ""];

    fn owner(ns: &str) -> ConfigKey {
        ConfigKey { clusterwide: ns.is_empty(), key: ObjKey::new(ns, "c") }
    }

    /// An HTTP connection manager without the agent's log, as a filter's config.
    fn http_connection_manager() -> filter::ConfigType {
        use envoy_types::pb::{
            envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager,
            google::protobuf::Any,
        };
        let hcm = HttpConnectionManager { stat_prefix: "l".into(), ..Default::default() };
        filter::ConfigType::TypedConfig(Any {
            type_url: <HttpConnectionManager as prost::Name>::type_url(),
            value: hcm.encode_to_vec(),
        })
    }

    /// A config's listener as the model makes it: virtual at `fronts`
    /// (or bound, pinned, ... for `kind` > 0), one chain told apart by `rev`.
    fn listener(name: &str, ns: &str, fronts: &[SocketAddrV4], kind: u64, rev: u64) -> Arc<Resource> {
        let mut l = Listener {
            name: name.to_owned(),
            filter_chains: vec![FilterChain {
                // A connection manager: its group gives it the agent's log.
                filters: vec![Filter { name: format!("{name}@{rev}"), config_type: Some(http_connection_manager()) }],
                ..Default::default()
            }],
            ..Default::default()
        };
        translate::virtual_listener(&mut l, fronts, Some(15000));
        match kind {
            // bound to a port of its own
            1 => l.bind_to_port = None,
            // its chain matches on something already
            2 => {
                l.filter_chains[0].filter_chain_match =
                    Some(FilterChainMatch { server_names: vec!["x".into()], ..Default::default() })
            }
            // two chains
            3 => l.filter_chains.push(FilterChain::default()),
            // a default chain
            4 => l.default_filter_chain = Some(FilterChain::default()),
            // another listener-level field: a class of its own
            5 => l.per_connection_buffer_limit_bytes = Some(UInt32Value { value: 4096 }),
            _ => {}
        }
        Arc::new(Resource::new(name.to_owned(), &l, Some(owner(ns))))
    }

    fn decoded(r: &Resource) -> Listener {
        Listener::decode(r.value.as_slice()).unwrap()
    }

    fn addresses(l: &Listener) -> Vec<Address> {
        l.address.iter().cloned().chain(l.additional_addresses.iter().filter_map(|a| a.address.clone())).collect()
    }

    /// What Envoy hands a connection to `f` to: the listener with that
    /// address, and in it the chain whose match takes it (None if no
    /// listener, several listeners or several chains would).
    fn reached(published: &Resources, f: SocketAddrV4) -> Option<(String, FilterChain)> {
        let at = translate::frontend_address(f);
        let mut with: Vec<(String, Listener)> = published
            .iter()
            .map(|(n, r)| (n.clone(), decoded(r)))
            .filter(|(_, l)| addresses(l).contains(&at))
            .collect();
        let (name, l) = (with.len() == 1).then(|| with.remove(0))?;
        let takes = |c: &&FilterChain| match &c.filter_chain_match {
            None => true,
            Some(m) => {
                m.destination_port.as_ref().is_none_or(|p| p.value == u32::from(f.port()))
                    && (m.prefix_ranges.is_empty()
                        || m.prefix_ranges.iter().any(|r| {
                            r.address_prefix == f.ip().to_string() && r.prefix_len.as_ref().map(|p| p.value) == Some(32)
                        }))
            }
        };
        let chains: Vec<&FilterChain> = l.filter_chains.iter().filter(takes).collect();
        let [c] = chains.as_slice() else { return None };
        Some((name, (*c).clone()))
    }

    /// A random world: listeners of three tenants, most virtual at one to
    /// three frontends of their own (some on two ports), some that may not
    /// join.
    struct World {
        built: BTreeMap<String, (String, Vec<SocketAddrV4>, u64, u64)>,
        next_ip: u32,
    }

    impl World {
        fn step(&mut self, rng: &mut Rng) {
            let i = rng.below(40);
            let name = format!("{}/c{i}/l", NAMESPACES[(i % 3) as usize]);
            match rng.below(4) {
                0 => drop(self.built.remove(&name)),
                1 if self.built.contains_key(&name) => {
                    // an edit of its chain alone
                    if let Some(e) = self.built.get_mut(&name) {
                        e.3 += 1;
                    }
                }
                _ => {
                    let ns = NAMESPACES[(i % 3) as usize].to_owned();
                    let mut fronts = Vec::new();
                    for _ in 0..=rng.below(3) {
                        self.next_ip += 1;
                        let ip = Ipv4Addr::from(0x0a60_0000 + self.next_ip);
                        fronts.push(SocketAddrV4::new(ip, 80));
                        if rng.below(3) == 0 {
                            fronts.push(SocketAddrV4::new(ip, 8080));
                        }
                    }
                    if rng.below(10) == 0 {
                        fronts.clear(); // a placeholder
                    }
                    let kind = if rng.below(4) == 0 { 1 + rng.below(5) } else { 0 };
                    self.built.insert(name, (ns, fronts, kind, 0));
                }
            }
        }

        fn xds(&self) -> XdsSnapshot {
            let mut x = XdsSnapshot::default();
            for (name, (ns, fronts, kind, rev)) in &self.built {
                x.put_shared(listener(name, ns, fronts, *kind, *rev));
            }
            x
        }
    }

    /// After random adds, removals and edits of listeners, published as
    /// groups: every member's connections — to each of its frontends —
    /// reach exactly its own chain, in a group of its tenant; every
    /// listener that may not join is published as built; a group's
    /// members share their listener-level fields; the incremental
    /// publish equals one from scratch (with the same bucket counts); an
    /// edit of a member's chain changes its group alone.
    #[test]
    fn every_members_frontends_reach_exactly_its_own_chain_after_every_random_step() {
        for seed in 1..=6u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut world = World { built: BTreeMap::new(), next_ip: 0 };
            let mut groups = Groups::new(4);
            let mut last = Resources::new();
            for step in 0..150 {
                let before = world.built.clone();
                world.step(&mut rng);
                let built = world.xds();
                let published = groups.publish(&built).types.get(LISTENER).cloned().unwrap_or_default();
                let at = format!("seed {seed} step {step}");
                for (name, r) in built.types.get(LISTENER).into_iter().flatten() {
                    let (ns, fronts, kind, _) = &world.built[name];
                    // Another listener-level field joins a group of its own.
                    let joins = (*kind == 0 || *kind == 5) && !fronts.is_empty();
                    assert_eq!(published.get(name).is_none(), joins, "{at}: {name}");
                    if !joins {
                        assert_eq!(published.get(name), Some(r), "{at}: {name} is published as built");
                        continue;
                    }
                    // Its chain as in its group: with the agent's log.
                    let mut own = decoded(r);
                    translate::add_weft_access_log(&mut own);
                    let own = own.filter_chains.remove(0);
                    for f in fronts {
                        let (group, chain) = reached(&published, *f).unwrap_or_else(|| panic!("{at}: {name} {f}"));
                        let space = if ns.is_empty() { "*" } else { ns.as_str() };
                        assert!(group.starts_with(&format!("{GROUP_PREFIX}{space}:")), "{at}: {name} in {group}");
                        assert_eq!(chain.filters, own.filters, "{at}: {name} {f}");
                        let shared = listener_level(&decoded(&published[&group]));
                        assert_eq!(shared, listener_level(&decoded(r)), "{at}: {name} {f}");
                    }
                }
                // From scratch, with the bucket counts the incremental one has.
                let mut fresh = Groups::new(4);
                for (t, g) in &groups.tenants {
                    fresh.tenants.insert(t.clone(), TenantGroups { buckets: g.buckets, members: BTreeSet::new() });
                }
                let scratch = fresh.publish(&built).types.get(LISTENER).cloned().unwrap_or_default();
                assert_eq!(scratch, published, "{at}");
                // A chain edited alone changes its group alone.
                let edited: Vec<&String> = world
                    .built
                    .iter()
                    .filter(|(n, e)| {
                        before.get(*n).is_some_and(|b| b.0 == e.0 && b.1 == e.1 && b.2 == e.2 && b.3 != e.3)
                    })
                    .map(|(n, _)| n)
                    .collect();
                if !edited.is_empty() {
                    let changed = last.diff(&published).count();
                    assert!(changed <= 1, "{at}: an edit changed {changed} listeners");
                }
                last = published;
            }
        }
    }

    #[test]
    fn bucket_counts_keep_until_a_tenant_doubles_or_falls_to_a_quarter() {
        assert_eq!(buckets_for(1, 0, 100), 1);
        assert_eq!(buckets_for(100, 1, 100), 1);
        assert_eq!(buckets_for(101, 1, 100), 2);
        assert_eq!(buckets_for(10_000, 0, 100), 128);
        assert_eq!(buckets_for(9_000, 128, 100), 128);
        assert_eq!(buckets_for(3_201, 128, 100), 128);
        assert_eq!(buckets_for(3_200, 128, 100), 32);
        assert_eq!(buckets_for(0, 4, 100), 1);
    }

    fn one_group(members: usize) -> (Groups, XdsSnapshot, String) {
        let mut x = XdsSnapshot::default();
        for i in 0..members {
            let f = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, i as u8 + 1), 80);
            x.put_shared(listener(&format!("a/c{i}/l"), "a", &[f], 0, 0));
        }
        let mut groups = Groups::new(100);
        let published = groups.publish(&x);
        let names: Vec<&String> = published.types[LISTENER].keys().collect();
        let [g] = names.as_slice() else { panic!("{names:?}") };
        let g = (*g).clone();
        (groups, x, g)
    }

    fn version(x: &XdsSnapshot, name: &str) -> u64 {
        x.types[LISTENER][name].version
    }

    #[test]
    fn an_ack_of_a_groups_version_is_one_of_its_members_listeners_as_built() {
        let (mut groups, built, g) = one_group(3);
        let published = groups.publish(&built);
        let v = version(&published, &g);
        let (acked, released) = groups.acked(BTreeMap::from([(g.clone(), v), ("weft-proxy".into(), 1)]));
        assert!(!released);
        let want: BTreeMap<String, u64> = (0..3)
            .map(|i| format!("a/c{i}/l"))
            .map(|n| (n.clone(), version(&built, &n)))
            .chain([("weft-proxy".to_owned(), 1)])
            .collect();
        assert_eq!(acked, want);
        // An earlier version of the group is no ACK of its members as built.
        let (acked, _) = groups.acked(BTreeMap::from([(g, !v)]));
        assert!(acked.is_empty(), "{acked:?}");
    }

    #[test]
    fn a_nack_of_a_group_blames_its_one_changed_member_or_tries_the_changed_ones_alone() {
        let (mut groups, mut built, g) = one_group(4);
        let published = groups.publish(&built);
        let acked_group = version(&published, &g);
        groups.acked(BTreeMap::from([(g.clone(), acked_group)]));
        // One member changed since the ACK: it is the one blamed.
        let f = |i: u8| SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, i + 1), 80);
        built.put_shared(listener("a/c1/l", "a", &[f(1)], 0, 1));
        groups.publish(&built);
        let message = format!("Error adding/updating listener(s) {g}: bad");
        let nacked = groups.nacked(&[g.clone(), "weft-proxy".into()], &message);
        assert_eq!(nacked, Nacked { names: vec!["weft-proxy".into()], blamed: vec!["a/c1/l".into()], pulled: false });
        // Two changed (one new): neither is blamed; each is tried on its
        // own at an address nothing reaches, and the group holds the
        // edited one as Envoy ACKed it (the new one not yet): every
        // frontend the group served stays served, by the same chain.
        built.put_shared(listener("a/c9/l", "a", &[f(9)], 0, 0));
        groups.publish(&built);
        let nacked = groups.nacked(std::slice::from_ref(&g), &message);
        assert_eq!(nacked, Nacked { names: vec![], blamed: vec![], pulled: true });
        let published = groups.publish(&built);
        let names: Vec<&String> = published.types[LISTENER].keys().collect();
        assert_eq!(names, [&"a/c1/l".to_owned(), &"a/c9/l".to_owned(), &g], "probes and the group");
        assert_eq!(version(&published, &g), acked_group, "the group as Envoy has it");
        let (at, chain) = reached(&published.types[LISTENER], f(1)).unwrap();
        assert_eq!((at, chain.filters[0].name.as_str()), (g.clone(), "a/c1/l@0"), "its last ACKed chain");
        assert!(reached(&published.types[LISTENER], f(9)).is_none());
        assert!(translate::logs_to_the_agent_once(&decoded(&published.types[LISTENER][&g])), "the group's chains log");
        for probe in ["a/c1/l", "a/c9/l"] {
            let l = decoded(&published.types[LISTENER][probe]);
            assert!(translate::logs_to_the_agent_once(&l), "a probe is its chain as its group has it: {l:?}");
            assert!(
                !translate::logs_to_the_agent_once(&decoded(&built.types[LISTENER][probe])),
                "the member as built has no log"
            );
            let [a] = &addresses(&l)[..] else { panic!("{l:?}") };
            let Some(address::Address::SocketAddress(s)) = &a.address else { panic!("{a:?}") };
            assert!(s.address.starts_with("127.128."), "{s:?}");
        }
        // Envoy refuses one probe by name and so takes the other: the
        // refused one is a NACK of its listener (its config is blamed by
        // the controller), the other is in its group as built.
        let nacked =
            groups.nacked(&["a/c1/l".into(), "a/c9/l".into()], "Error adding/updating listener(s) a/c1/l: bad");
        assert_eq!(nacked, Nacked { names: vec!["a/c1/l".into()], blamed: vec![], pulled: true });
        let published = groups.publish(&built);
        assert_eq!(reached(&published.types[LISTENER], f(9)).map(|(n, _)| n), Some(g.clone()));
        assert!(published.types[LISTENER].contains_key("a/c1/l"), "still tried until its config changes");
        // Its config's next build (its last good version) ends the probe.
        built.put_shared(listener("a/c1/l", "a", &[f(1)], 0, 0));
        let published = groups.publish(&built);
        let names: Vec<&String> = published.types[LISTENER].keys().collect();
        assert_eq!(names, [&g]);
        let (_, chain) = reached(&published.types[LISTENER], f(1)).unwrap();
        assert_eq!(chain.filters[0].name, "a/c1/l@0");
        groups.acked(BTreeMap::from([(g.clone(), version(&published, &g))]));
        // Two edited; Envoy takes both alone (ACKs of the probes), then
        // refuses the group with both: they are blamed together.
        built.put_shared(listener("a/c2/l", "a", &[f(2)], 0, 1));
        built.put_shared(listener("a/c3/l", "a", &[f(3)], 0, 1));
        groups.publish(&built);
        assert!(groups.nacked(std::slice::from_ref(&g), &message).pulled);
        let published = groups.publish(&built);
        let probes = BTreeMap::from(["a/c2/l", "a/c3/l"].map(|n| (n.to_owned(), version(&published, n))));
        let (acked, released) = groups.acked(probes);
        assert!(acked.is_empty() && released, "{acked:?}");
        let published = groups.publish(&built);
        let (_, chain) = reached(&published.types[LISTENER], f(2)).unwrap();
        assert_eq!(chain.filters[0].name, "a/c2/l@1");
        let nacked = groups.nacked(std::slice::from_ref(&g), &message);
        assert_eq!(nacked, Nacked { names: vec![], blamed: vec!["a/c2/l".into(), "a/c3/l".into()], pulled: false });
    }

    #[test]
    fn without_groups_everything_is_published_as_built() {
        let (_, built, _) = one_group(3);
        for size in [0, 1] {
            let mut groups = Groups::new(size);
            assert_eq!(groups.publish(&built), built);
            let names = vec!["a/c1/l".to_owned()];
            assert_eq!(groups.nacked(&names, "x").names, names);
        }
    }
}
