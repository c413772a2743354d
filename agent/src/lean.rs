//! Lists the indexes keep per object. At 10,000 objects most of these lists
//! hold one or two items, and a vector grown by pushes takes room for four
//! at its first (a `BTreeMap` takes a node of eleven for its first entry):
//! these take the room they hold while small, and grow as vectors do after.

/// Room for one more item in `v`: one place more at a time while it holds
/// fewer than four, then as a vector grows (doubling, so a long list costs
/// what a vector's does).
fn room_for_one<T>(v: &mut Vec<T>) {
    if v.len() == v.capacity() && v.len() < 4 {
        v.reserve_exact(1);
    }
}

/// Pushes `x` (see [`room_for_one`]).
pub fn push<T>(v: &mut Vec<T>, x: T) {
    room_for_one(v);
    v.push(x);
}

/// Inserts `x` at `at` (see [`room_for_one`]).
pub fn insert<T>(v: &mut Vec<T>, at: usize, x: T) {
    room_for_one(v);
    v.insert(at, x);
}

/// A map kept as a vector sorted by key, for the few entries an object has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmallMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<K: Ord, V> SmallMap<K, V> {
    /// The value of `k`, `V::default()` put in first if it has none.
    pub fn or_default(&mut self, k: K) -> &mut V
    where
        V: Default,
    {
        let at = match self.0.binary_search_by(|(x, _)| x.cmp(&k)) {
            Ok(at) => at,
            Err(at) => {
                insert(&mut self.0, at, (k, V::default()));
                at
            }
        };
        &mut self.0[at].1
    }

    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        let at = self.0.binary_search_by(|(x, _)| x.cmp(k)).ok()?;
        Some(&mut self.0[at].1)
    }

    pub fn remove(&mut self, k: &K) -> Option<V> {
        let at = self.0.binary_search_by(|(x, _)| x.cmp(k)).ok()?;
        Some(self.0.remove(at).1)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries, in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<K, V> IntoIterator for SmallMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::xds::acks::tests::Rng;

    #[test]
    fn a_small_list_takes_the_room_it_holds_and_a_long_one_grows_as_a_vector() {
        let mut v = Vec::new();
        for i in 0..4 {
            push(&mut v, i);
            assert_eq!(v.capacity(), v.len());
        }
        for i in 4..1000 {
            push(&mut v, i);
        }
        assert_eq!(v, (0..1000).collect::<Vec<_>>());
        assert!(v.capacity() < 2 * v.len() + 8, "{}", v.capacity());
    }

    /// Random puts, updates and removals: the same entries, in the same
    /// order, as a `BTreeMap` given the same.
    #[test]
    fn a_small_map_holds_what_a_btree_map_holds() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut small: SmallMap<u64, Vec<u64>> = SmallMap::default();
        let mut reference: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for step in 0..2000 {
            let k = rng.below(12);
            match rng.below(3) {
                0 | 1 => {
                    small.or_default(k).push(step);
                    reference.entry(k).or_default().push(step);
                }
                _ => assert_eq!(small.remove(&k), reference.remove(&k)),
            }
            if let (Some(a), Some(b)) = (small.get_mut(&k), reference.get_mut(&k)) {
                assert_eq!(a, b);
            }
            assert_eq!(small.iter().collect::<Vec<_>>(), reference.iter().collect::<Vec<_>>(), "step {step}");
            assert_eq!(small.is_empty(), reference.is_empty());
        }
        assert_eq!(small.into_iter().collect::<Vec<_>>(), reference.into_iter().collect::<Vec<_>>());
    }
}
