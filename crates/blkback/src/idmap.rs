//! Maps keyed by a request's id or tag, hashed for the data path.
//!
//! std's default hasher (SipHash-1-3) was a fifth of a ring worker's
//! instructions at 4 KiB QD32 (callgrind, simulator: 767 of 3,815 per
//! request for five lookups). These keys are a single `u64`, so one
//! multiply-xorshift round (SplitMix64's finaliser, a bijection) over the
//! key and a seed drawn per map from std's random keys does: every bit of
//! the key reaches the bits hashbrown uses, and a guest that picks its
//! request ids cannot aim them at one bucket without knowing the seed (the
//! map holds at most a ring's worth of them, which bounds even that).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

/// A `HashMap` keyed by ids, with [`IdHasher`].
pub type IdMap<V> = HashMap<u64, V, IdHashBuilder>;

/// A new, empty [`IdMap`] with room for `capacity` entries.
pub fn id_map<V>(capacity: usize) -> IdMap<V> {
    HashMap::with_capacity_and_hasher(capacity, IdHashBuilder::new())
}

/// Builds [`IdHasher`]s with one random seed.
#[derive(Clone, Copy, Debug)]
pub struct IdHashBuilder {
    seed: u64,
}

impl IdHashBuilder {
    /// A builder with a seed of std's per-process random keys.
    pub fn new() -> Self {
        IdHashBuilder { seed: std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64) }
    }
}

impl Default for IdHashBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BuildHasher for IdHashBuilder {
    type Hasher = IdHasher;

    fn build_hasher(&self) -> IdHasher {
        IdHasher { state: self.seed }
    }
}

/// Hashes one `u64` (anything else is folded in 8 bytes at a time).
#[derive(Debug)]
pub struct IdHasher {
    state: u64,
}

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        let mut z = (self.state ^ v).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        self.state = z ^ (z >> 31);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_share_low_bits_spread_over_the_buckets() {
        // Ids a guest might pick to collide under a weaker hash: equal in
        // their low 32 bits, or multiples of a large power of two.
        let b = IdHashBuilder::new();
        for ids in [(0..4096u64).map(|i| i << 32).collect::<Vec<_>>(), (0..4096u64).map(|i| i << 52).collect()] {
            let mut buckets = std::collections::HashSet::new();
            for id in &ids {
                buckets.insert(b.hash_one(id) & 1023);
            }
            // 4096 keys into 1024 buckets: a good hash leaves ~2% empty.
            assert!(buckets.len() > 900, "{} of 1024 buckets used", buckets.len());
        }
    }

    #[test]
    fn two_maps_hash_the_same_id_differently() {
        let (a, b) = (IdHashBuilder::new(), IdHashBuilder::new());
        assert_ne!(a.hash_one(7u64), b.hash_one(7u64), "seeds are drawn per map");
        let mut m = id_map(4);
        m.insert(7, "seven");
        assert_eq!(m.remove(&7), Some("seven"));
    }
}
