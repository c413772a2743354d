//! Security identities: a number per (namespace, labels) that every node
//! computes the same way without talking to any other.
//!
//! The identity is a hash of the canonical label set, folded into
//! `[65536, 2^32)` (below that are reserved identities). Two different label
//! sets can hash to the same number: every node sees the same label sets
//! (from the same API objects), sorts them by their canonical text, and the
//! first keeps the hashed number while each later one takes the next free
//! number. All nodes therefore agree; the cost is that a colliding label set
//! appearing later can move a set that sorts after it. With 2^32 numbers,
//! 10,000 label sets collide with probability about 1 %.

use std::collections::{BTreeMap, BTreeSet};

use weft_ebpf::abi;

/// Labels that change with every rollout and would split one workload into many identities.
const IGNORED_LABELS: &[&str] = &["pod-template-hash", "controller-revision-hash", "pod-template-generation"];

/// The label Cilium gives every pod with its ServiceAccount's name, so
/// policies can select pods by ServiceAccount.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";

/// A pod's labels as identities and policies see them: its own, plus
/// [`SERVICE_ACCOUNT_LABEL`] (`default` when the pod names no account, as
/// Kubernetes would fill it in).
pub fn pod_labels(labels: &BTreeMap<String, String>, service_account: Option<&str>) -> BTreeMap<String, String> {
    let mut l = labels.clone();
    let sa = service_account.filter(|s| !s.is_empty()).unwrap_or("default");
    l.insert(SERVICE_ACCOUNT_LABEL.to_owned(), sa.to_owned());
    l
}

/// The identity-relevant labels of a pod, in canonical form.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSet(String);

impl LabelSet {
    /// `k8s:io.kubernetes.pod.namespace=<ns>` plus every pod label, sorted.
    pub fn new<'a>(namespace: &str, labels: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut v: Vec<String> = labels
            .into_iter()
            .filter(|(k, _)| !IGNORED_LABELS.contains(k))
            .map(|(k, v)| format!("k8s:{k}={v}"))
            .collect();
        v.push(format!("k8s:io.kubernetes.pod.namespace={namespace}"));
        v.sort();
        v.dedup();
        LabelSet(v.join(";"))
    }

    /// The labels as Hubble prints them (`k8s:key=value`).
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.0.split(';')
    }

    /// The number this set hashes to, before collision handling.
    pub fn hashed(&self) -> u32 {
        // Stable across builds, platforms and versions.
        let folded = crate::hash::fnv1a_32(self.0.as_bytes());
        let span = u32::MAX - abi::IDENTITY_MIN_POD + 1;
        abi::IDENTITY_MIN_POD + folded % span
    }
}

/// Identities for a set of label sets, resolving collisions as described above.
pub fn assign(sets: &BTreeSet<LabelSet>) -> BTreeMap<LabelSet, u32> {
    assign_with(sets, LabelSet::hashed)
}

fn assign_with(sets: &BTreeSet<LabelSet>, hash: impl Fn(&LabelSet) -> u32) -> BTreeMap<LabelSet, u32> {
    let mut taken = BTreeSet::new();
    let mut out = BTreeMap::new();
    for set in sets {
        let mut id = hash(set);
        while !taken.insert(id) {
            id = if id == u32::MAX { abi::IDENTITY_MIN_POD } else { id + 1 };
        }
        out.insert(set.clone(), id);
    }
    out
}

/// Names of the reserved identities, as Hubble prints them.
pub fn reserved_name(id: u32) -> Option<&'static str> {
    Some(match id {
        abi::ID_HOST => "reserved:host",
        abi::ID_WORLD => "reserved:world",
        abi::ID_REMOTE_NODE => "reserved:remote-node",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_labels_same_identity_in_any_order() {
        let a = LabelSet::new("default", [("app", "web"), ("tier", "front")]);
        let b = LabelSet::new("default", [("tier", "front"), ("app", "web"), ("pod-template-hash", "x1")]);
        assert_eq!(a, b);
        assert_eq!(a.hashed(), b.hashed());
        assert!(a.hashed() >= abi::IDENTITY_MIN_POD);
        assert_ne!(a, LabelSet::new("other", [("app", "web"), ("tier", "front")]));
    }

    #[test]
    fn collisions_resolve_the_same_way_everywhere() {
        let sets: BTreeSet<LabelSet> = (0..2000).map(|i| LabelSet::new("ns", [("app", &*format!("a{i}"))])).collect();
        let one = assign(&sets);
        // Another node sees the same sets (in another insertion order): same result.
        let mut reversed: Vec<_> = sets.iter().cloned().collect();
        reversed.reverse();
        let two = assign(&reversed.into_iter().collect());
        assert_eq!(one, two);
        let ids: BTreeSet<u32> = one.values().copied().collect();
        assert_eq!(ids.len(), sets.len(), "identities are unique");
    }

    #[test]
    fn colliding_sets_take_the_next_numbers_in_label_order() {
        let sets: BTreeSet<LabelSet> = ["b", "a", "c"].iter().map(|app| LabelSet::new("ns", [("app", *app)])).collect();
        let ids = assign_with(&sets, |_| u32::MAX - 1);
        let by_app = |app: &str| ids[&LabelSet::new("ns", [("app", app)])];
        assert_eq!(by_app("a"), u32::MAX - 1);
        assert_eq!(by_app("b"), u32::MAX);
        assert_eq!(by_app("c"), abi::IDENTITY_MIN_POD, "wraps past the top");
    }
}
