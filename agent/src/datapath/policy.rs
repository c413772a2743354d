//! Policy entries as `weft_policy` trie keys. The datapath makes two lookups
//! per new connection (the peer's own entries, and entries for any peer) and
//! lets a deny from either win, so what the trie holds must already say what
//! the entries mean together:
//!
//! - a port range becomes one key per aligned power-of-two block;
//! - an allow that a deny of the same peer covers entirely is left out (the
//!   trie would otherwise return the narrower allow);
//! - two entries with the same key keep one value: a deny over an allow, an
//!   allow through the proxy over a plain one (the proxy's rules then admit
//!   what the plain one did), else the first rule id.
//!
//! An endpoint's entries change while the datapath judges connections with
//! them, one map write at a time: [`replace`] orders the writes so that no
//! state in between allows what the policy it leaves and the one it goes to
//! would both refuse.

use std::collections::{BTreeMap, BTreeSet};

use weft_ebpf::abi;

use super::{
    error::{DatapathError, Result},
    types::{PolicyAction, PolicyEntry},
};

/// One trie entry: the key's prefix length and data, and its value.
pub(crate) type PolicySlot = (u32, abi::PolicyMatch, abi::PolicyVal);

/// Aligned blocks covering `[first, last]`: (start, bits fixed of 16).
pub fn port_blocks(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(first), u32::from(last));
    while lo <= hi {
        // The largest block starting at lo that is aligned and ends by hi.
        let mut size = if lo == 0 { 1u32 << 16 } else { 1u32 << lo.trailing_zeros().min(16) };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let bits = 16 - size.trailing_zeros() as u8;
        out.push((lo as u16, bits));
        lo += size;
    }
    out
}

fn raw_action(a: PolicyAction) -> u8 {
    (match a {
        PolicyAction::Allow => abi::POLICY_ALLOW,
        PolicyAction::Deny => abi::POLICY_DENY,
    }) as u8
}

/// The trie entries of one endpoint's policy.
pub(crate) fn slots(ep_id: u16, entries: &[PolicyEntry]) -> Vec<PolicySlot> {
    let mut keyed: BTreeMap<(u32, abi::PolicyMatch), abi::PolicyVal> = BTreeMap::new();
    for e in entries {
        let base = abi::PolicyMatch {
            ep_id,
            direction: e.direction.raw(),
            identity: e.identity,
            proto: e.proto.map(|p| p.number()).unwrap_or(0),
            ..Default::default()
        };
        let blocks: Vec<(u32, u16)> = match (e.proto, e.ports) {
            (None, _) => vec![(abi::POLICY_PREFIX_FIXED, 0)],
            (Some(_), None) => vec![(abi::POLICY_PREFIX_PROTO, 0)],
            (Some(_), Some((a, b))) => port_blocks(a, b)
                .into_iter()
                .map(|(start, bits)| (abi::POLICY_PREFIX_PROTO + u32::from(bits), start))
                .collect(),
        };
        for (prefixlen, port) in blocks {
            let key = abi::PolicyMatch { dport: port.to_be(), ..base };
            let val = abi::PolicyVal {
                action: raw_action(e.action),
                prefixlen: prefixlen as u8,
                proxy_port: e.proxy_port.unwrap_or(0),
                rule_id: e.rule_id,
            };
            keyed
                .entry((prefixlen, key))
                .and_modify(|held| {
                    let deny = abi::POLICY_DENY as u8;
                    if (val.action == deny && held.action != deny)
                        || (held.action != deny && held.proxy_port == 0 && val.proxy_port != 0)
                    {
                        *held = val;
                    }
                })
                .or_insert(val);
        }
    }
    // Denies of each peer (and direction): leave out allows they cover.
    let denies: BTreeSet<(u32, abi::PolicyMatch)> =
        keyed.iter().filter(|(_, v)| v.action == abi::POLICY_DENY as u8).map(|(k, _)| *k).collect();
    keyed
        .into_iter()
        .filter(|((len, key), val)| {
            val.action == abi::POLICY_DENY as u8
                || !denies.iter().any(|(dlen, d)| {
                    d.direction == key.direction && d.identity == key.identity && covers((*dlen, d), (*len, key))
                })
        })
        .map(|((len, key), val)| (len, key, val))
        .collect()
}

/// Whether trie entry `outer` matches everything `inner` does.
fn covers(outer: (u32, &abi::PolicyMatch), inner: (u32, &abi::PolicyMatch)) -> bool {
    let ((olen, o), (ilen, i)) = (outer, inner);
    if olen > ilen {
        return false;
    }
    if olen <= abi::POLICY_PREFIX_FIXED {
        return true;
    }
    if o.proto != i.proto {
        return false;
    }
    let bits = olen - abi::POLICY_PREFIX_PROTO;
    if bits == 0 {
        return true;
    }
    let mask = u16::MAX << (16 - bits);
    u16::from_be(o.dport) & mask == u16::from_be(i.dport) & mask
}

/// What `weft_policy` holds for one endpoint: trie key -> value.
pub(crate) type Held = BTreeMap<(u32, abi::PolicyMatch), abi::PolicyVal>;

/// Where an endpoint's entries are written: `weft_policy` (a model of it
/// in the tests).
pub(crate) trait PolicyStore {
    /// Writes one entry; a map without room is [`DatapathError::MapFull`].
    fn write(&mut self, slot: &PolicySlot) -> Result<()>;
    /// Removes one entry (one already gone is no error).
    fn remove(&mut self, len: u32, key: &abi::PolicyMatch) -> Result<()>;
}

fn is_deny(v: &abi::PolicyVal) -> bool {
    v.action == abi::POLICY_DENY as u8
}

/// Replaces the entries `held` says `store` holds for one endpoint with
/// `slots`, keeping `held` true as it goes. The datapath reads the entries
/// between any two writes, so they go in this order: the new denies, then
/// the stale allows out, then the new allows, then the stale denies out.
/// Until the first new allow is written every state allows only what the
/// old entries allowed, and from then on only what the new ones allow
/// (adding a deny or removing an allow never lets more through; writing
/// the new allows before the stale ones are out would, for a moment, let
/// through the union of both policies). Entries already there are not
/// written again.
///
/// A full map: what does not fit is left out, allows before denies (no
/// allow is written while one of the new denies waits for room), and the
/// call says the map is full; room freed by a removal goes to what waits.
/// If a new deny still finds no room once the stale allows are out, every
/// allow of the endpoint goes before the stale denies do, so the endpoint
/// refuses more than either policy while it waits for room, never less.
pub(crate) fn replace(store: &mut impl PolicyStore, held: &mut Held, slots: &[PolicySlot]) -> Result<()> {
    let wanted: BTreeMap<(u32, abi::PolicyMatch), abi::PolicyVal> =
        slots.iter().map(|(len, key, val)| ((*len, *key), *val)).collect();
    let stale = |held: &Held, deny: bool| -> Vec<(u32, abi::PolicyMatch)> {
        held.iter().filter(|(k, v)| !wanted.contains_key(k) && is_deny(v) == deny).map(|(k, _)| *k).collect()
    };
    let mut w = Writer { store, held, waiting: Vec::new(), full: None };
    for slot in slots.iter().filter(|s| is_deny(&s.2)) {
        w.write(slot)?;
    }
    for k in stale(w.held, false) {
        w.remove(k)?;
    }
    for slot in slots.iter().filter(|s| !is_deny(&s.2)) {
        w.write(slot)?;
    }
    if w.deny_waits() {
        let allows: Vec<_> = w.held.iter().filter(|(_, v)| !is_deny(v)).map(|(k, _)| *k).collect();
        for k in allows {
            w.store.remove(k.0, &k.1)?;
            w.held.remove(&k);
            if let Some(val) = wanted.get(&k) {
                w.waiting.push((k.0, k.1, *val));
            }
        }
    }
    for k in stale(w.held, true) {
        w.remove(k)?;
    }
    w.retry()?;
    match w.full {
        Some(full) if !w.waiting.is_empty() => Err(full),
        _ => Ok(()),
    }
}

/// The writes of one [`replace`]: what did not fit waits, denies first.
struct Writer<'a, S> {
    store: &'a mut S,
    held: &'a mut Held,
    waiting: Vec<PolicySlot>,
    /// The map's "full" error, for the caller.
    full: Option<DatapathError>,
}

impl<S: PolicyStore> Writer<'_, S> {
    fn deny_waits(&self) -> bool {
        self.waiting.iter().any(|s| is_deny(&s.2))
    }

    /// Writes one entry unless the map holds it already; an allow waits
    /// while a deny does.
    fn write(&mut self, slot: &PolicySlot) -> Result<()> {
        let (len, key, val) = *slot;
        if self.held.get(&(len, key)) == Some(&val) {
            return Ok(());
        }
        if !is_deny(&val) && self.deny_waits() {
            self.waiting.push(*slot);
            return Ok(());
        }
        match self.store.write(slot) {
            Ok(()) => {
                self.held.insert((len, key), val);
                Ok(())
            }
            Err(full @ DatapathError::MapFull { .. }) => {
                self.full = Some(full);
                self.waiting.push(*slot);
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Removes one entry and gives the room to what waits.
    fn remove(&mut self, (len, key): (u32, abi::PolicyMatch)) -> Result<()> {
        self.store.remove(len, &key)?;
        self.held.remove(&(len, key));
        self.retry()
    }

    fn retry(&mut self) -> Result<()> {
        for slot in std::mem::take(&mut self.waiting) {
            self.write(&slot)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::types::{Direction, Proto};

    fn entry(identity: u32, proto: Option<Proto>, ports: Option<(u16, u16)>, action: PolicyAction) -> PolicyEntry {
        PolicyEntry { direction: Direction::Egress, identity, proto, ports, action, rule_id: 1, proxy_port: None }
    }

    #[test]
    fn port_ranges_become_aligned_blocks() {
        assert_eq!(port_blocks(80, 80), vec![(80, 16)]);
        assert_eq!(port_blocks(0, 65535), vec![(0, 0)]);
        assert_eq!(port_blocks(8080, 8083), vec![(8080, 14)]);
        // 1000..=2000: every port once, no block past the end.
        let blocks = port_blocks(1000, 2000);
        let covered: u32 = blocks.iter().map(|(_, bits)| 1u32 << (16 - bits)).sum();
        assert_eq!(covered, 1001);
        assert!(blocks.len() <= 2 * 16);
        for (start, bits) in &blocks {
            let size = 1u32 << (16 - bits);
            assert_eq!(u32::from(*start) % size, 0, "aligned");
            assert!(u32::from(*start) + size - 1 <= 2000);
        }
        assert_eq!(port_blocks(65535, 65535), vec![(65535, 16)]);
    }

    #[test]
    fn a_deny_of_the_same_peer_shadows_the_allows_it_covers() {
        let s = slots(
            3,
            &[
                entry(7, Some(Proto::Tcp), Some((80, 80)), PolicyAction::Allow),
                entry(7, Some(Proto::Tcp), Some((443, 443)), PolicyAction::Allow),
                entry(7, Some(Proto::Tcp), Some((0, 255)), PolicyAction::Deny),
                entry(8, Some(Proto::Tcp), Some((80, 80)), PolicyAction::Allow),
            ],
        );
        let kept: Vec<(u32, u16, u8)> =
            s.iter().map(|(_, k, v)| (k.identity, u16::from_be(k.dport), v.action)).collect();
        assert_eq!(
            kept,
            vec![(7, 0, abi::POLICY_DENY as u8), (7, 443, abi::POLICY_ALLOW as u8), (8, 80, abi::POLICY_ALLOW as u8)]
        );
    }

    #[test]
    fn same_key_deny_wins_then_the_proxy() {
        let mut l7 = entry(0, Some(Proto::Tcp), Some((80, 80)), PolicyAction::Allow);
        l7.proxy_port = Some(10001);
        let plain = entry(0, Some(Proto::Tcp), Some((80, 80)), PolicyAction::Allow);
        let s = slots(1, &[plain, l7]);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].2.proxy_port, 10001);
        let s = slots(1, &[l7, entry(0, Some(Proto::Tcp), Some((80, 80)), PolicyAction::Deny)]);
        assert_eq!((s.len(), s[0].2.action), (1, abi::POLICY_DENY as u8));
        // Any protocol: one entry at the fixed prefix.
        let s = slots(1, &[entry(9, None, None, PolicyAction::Allow)]);
        assert_eq!((s[0].0, s[0].2.prefixlen), (abi::POLICY_PREFIX_FIXED, abi::POLICY_PREFIX_FIXED as u8));
    }

    /// `weft_policy` with room for `room` entries, recording every state
    /// the datapath could read between two writes.
    struct Model {
        entries: Held,
        room: usize,
        states: Vec<Held>,
    }

    impl Model {
        fn holding(slots: &[PolicySlot], room: usize) -> Self {
            let entries = slots.iter().map(|(l, k, v)| ((*l, *k), *v)).collect();
            Self { entries, room, states: Vec::new() }
        }
    }

    impl PolicyStore for Model {
        fn write(&mut self, (len, key, val): &PolicySlot) -> Result<()> {
            if !self.entries.contains_key(&(*len, *key)) && self.entries.len() >= self.room {
                return Err(DatapathError::MapFull {
                    map: "weft_policy",
                    key: "policy",
                    max_entries: self.room as u32,
                });
            }
            self.entries.insert((*len, *key), *val);
            self.states.push(self.entries.clone());
            Ok(())
        }

        fn remove(&mut self, len: u32, key: &abi::PolicyMatch) -> Result<()> {
            self.entries.remove(&(len, *key));
            self.states.push(self.entries.clone());
            Ok(())
        }
    }

    const EP: u16 = 3;
    const PEERS: [u32; 3] = [7, 8, 9];
    const PROTOS: [Proto; 2] = [Proto::Tcp, Proto::Udp];
    const PORTS: u16 = 8;

    /// The trie's answer for one key: its longest matching entry.
    fn lookup(held: &Held, identity: u32, proto: Proto, port: u16) -> Option<abi::PolicyVal> {
        let probe = abi::PolicyMatch {
            ep_id: EP,
            direction: Direction::Egress.raw(),
            identity,
            proto: proto.number(),
            dport: port.to_be(),
            ..Default::default()
        };
        held.iter()
            .filter(|((len, k), _)| {
                (k.ep_id, k.direction, k.identity) == (probe.ep_id, probe.direction, probe.identity)
                    && covers((*len, k), (abi::POLICY_PREFIX_FULL, &probe))
            })
            .max_by_key(|((len, _), _)| *len)
            .map(|(_, v)| *v)
    }

    /// What an enforcing endpoint holding `held` lets in, as policy_check in
    /// lib/policy.h decides: a deny from the peer's or the any-peer lookup
    /// wins, else an allow from either admits.
    fn allowed(held: &Held) -> BTreeSet<(u32, u8, u16)> {
        let mut out = BTreeSet::new();
        for peer in PEERS {
            for proto in PROTOS {
                for port in 0..PORTS {
                    let hits = [lookup(held, peer, proto, port), lookup(held, 0, proto, port)];
                    let hits: Vec<_> = hits.iter().flatten().collect();
                    if !hits.iter().any(|v| is_deny(v)) && !hits.is_empty() {
                        out.insert((peer, proto.number(), port));
                    }
                }
            }
        }
        out
    }

    /// Entries policies are made of here: of one peer and of any peer,
    /// ports, ranges and whole protocols, allows, denies and a proxy.
    fn pool() -> Vec<PolicyEntry> {
        let (tcp, udp) = (Some(Proto::Tcp), Some(Proto::Udp));
        let mut proxied = entry(9, tcp, Some((2, 2)), PolicyAction::Allow);
        proxied.proxy_port = Some(10001);
        vec![
            entry(7, tcp, Some((1, 1)), PolicyAction::Allow),
            entry(7, tcp, Some((0, 7)), PolicyAction::Allow),
            entry(7, tcp, Some((2, 3)), PolicyAction::Deny),
            entry(0, tcp, Some((4, 5)), PolicyAction::Allow),
            entry(0, tcp, Some((5, 5)), PolicyAction::Deny),
            entry(8, None, None, PolicyAction::Allow),
            entry(0, udp, None, PolicyAction::Allow),
            proxied,
        ]
    }

    /// Changes between two policies made of the pool's entries: every old
    /// policy, each against the new ones whose number `b` has
    /// `b * step + a` a multiple of `spread` (all 65,536 pairs take a minute in debug).
    fn changes(step: usize, spread: usize) -> Vec<(Vec<PolicyEntry>, Vec<PolicyEntry>)> {
        let pool = pool();
        let subset =
            |mask: usize| pool.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, e)| *e).collect();
        let n = 1 << pool.len();
        (0..n)
            .flat_map(|a| (0..n).filter(move |b| (b * step + a).is_multiple_of(spread)).map(move |b| (a, b)))
            .map(|(a, b)| (subset(a), subset(b)))
            .collect()
    }

    /// Goes from policy `old` to `new` in a map with room for `room`
    /// entries (None: as many as both need), checking every state in
    /// between; returns what `replace` said and the last state.
    fn replace_checked(old: &[PolicyEntry], new: &[PolicyEntry], room: Option<usize>) -> (Result<()>, Held) {
        let (from, to) = (slots(EP, old), slots(EP, new));
        let mut store = Model::holding(&from, room.unwrap_or(from.len() + to.len()));
        let mut held = store.entries.clone();
        let (before, after) = (allowed(&store.entries), allowed(&Model::holding(&to, 0).entries));
        let result = replace(&mut store, &mut held, &to);
        assert_eq!(held, store.entries, "held says what the map holds");
        for (i, state) in store.states.iter().enumerate() {
            let now = allowed(state);
            assert!(
                now.is_subset(&before) || now.is_subset(&after),
                "write {i} of {old:?} -> {new:?} lets through {:?}, which the old policy refuses, and {:?}, \
                 which the new one refuses ((peer, protocol, port))",
                now.difference(&before).collect::<Vec<_>>(),
                now.difference(&after).collect::<Vec<_>>()
            );
        }
        (result, store.entries)
    }

    /// Every change between two policies made of the pool's entries, with
    /// room for both: no state between two writes lets through what both
    /// the old and the new policy refuse (writing the new entries before
    /// taking out the stale ones let through their union), and the map
    /// ends holding the new policy. Timing plays no part: each state the
    /// datapath could read is checked.
    #[test]
    fn no_state_between_two_policies_allows_what_both_refuse() {
        for (old, new) in changes(7, 29) {
            let (result, last) = replace_checked(&old, &new, None);
            result.unwrap();
            assert_eq!(last, Model::holding(&slots(EP, &new), 0).entries, "{old:?} -> {new:?}");
        }
    }

    /// The same with a map that is full: the states in between still let
    /// through nothing both policies refuse, the last refuses at least what
    /// the new policy does, and with room for the new policy alone the map
    /// ends holding it (the stale entries make the room).
    #[test]
    fn a_full_map_refuses_more_in_between_never_less() {
        for (old, new) in changes(3, 37) {
            let wanted = Model::holding(&slots(EP, &new), 0).entries;
            let (result, last) = replace_checked(&old, &new, Some(wanted.len()));
            result.unwrap_or_else(|e| panic!("{old:?} -> {new:?}: {e}"));
            assert_eq!(last, wanted, "{old:?} -> {new:?}");
            if wanted.len() > 1 {
                // One entry short (enough when the map holds the new
                // entries already): all in, or refusing more than the new policy.
                let (result, last) = replace_checked(&old, &new, Some(wanted.len() - 1));
                match result {
                    Ok(()) => assert_eq!(last, wanted, "{old:?} -> {new:?}"),
                    Err(DatapathError::MapFull { .. }) => {
                        assert!(allowed(&last).is_subset(&allowed(&wanted)), "{old:?} -> {new:?} left {last:?}")
                    }
                    Err(e) => panic!("{old:?} -> {new:?}: {e}"),
                }
            }
        }
    }

    /// The case the order is for: a policy that allowed peer 7 replaced by
    /// one that allows peer 8. Written new-first, peer 7 and 8 were both let
    /// in for a moment; now peer 8 is let in only once peer 7 no longer is.
    #[test]
    fn a_peer_is_let_in_only_after_the_one_it_replaces_is_out() {
        let tcp = Some(Proto::Tcp);
        let old = [entry(7, tcp, Some((1, 1)), PolicyAction::Allow)];
        let new = [entry(8, tcp, Some((1, 1)), PolicyAction::Allow)];
        let mut store = Model::holding(&slots(EP, &old), 10);
        let mut held = store.entries.clone();
        replace(&mut store, &mut held, &slots(EP, &new)).unwrap();
        let seen: Vec<BTreeSet<(u32, u8, u16)>> = store.states.iter().map(allowed).collect();
        let tcp1 = |peer| BTreeSet::from([(peer, Proto::Tcp.number(), 1)]);
        assert_eq!(seen, vec![BTreeSet::new(), tcp1(8)]);
    }
}
