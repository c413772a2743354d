//! The one hash the agent uses for values that must come out the same on
//! every node and across restarts and versions: pod identities, policy rule
//! ids, names of generated objects, xDS resource versions. FNV-1a (64-bit),
//! from the `fnv` crate: stable by definition, unlike std's `DefaultHasher`,
//! and fast on the short inputs it gets.

use std::hash::Hasher;

/// FNV-1a 64 of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    h.finish()
}

/// The same, folded to 32 bits (the high half xored into the low).
pub fn fnv1a_32(bytes: &[u8]) -> u32 {
    let h = fnv1a(bytes);
    (h ^ (h >> 32)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_fnv1a_64() {
        // The FNV specification's test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
