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

use std::collections::{BTreeMap, BTreeSet};

use weft_ebpf::abi;

use super::types::{PolicyAction, PolicyEntry};

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
}
