//! The hasher of the memory store's maps, keyed by [`StoreKey`](crate::key::StoreKey).

/// A fast, per-process keyed hasher for maps keyed by [`StoreKey`](crate::key::StoreKey).
///
/// A store key is a SHA-256 digest, so its bytes are already uniform; what a
/// hash table still needs is that a client cannot aim many keys at one
/// bucket. Mixing the digest with a random per-process seed through a
/// folded 64×64→128-bit multiply (the core of foldhash) keeps bucket
/// placement unpredictable at a fraction of SipHash's cost.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StoreKeyHasherBuilder {
    seed: [u64; 2],
}

impl StoreKeyHasherBuilder {
    pub(crate) fn new() -> Self {
        use std::hash::BuildHasher;
        let random = std::collections::hash_map::RandomState::new();
        Self {
            seed: [random.hash_one(0x5eed_u64), random.hash_one(0xf00d_u64) | 1],
        }
    }
}

impl std::hash::BuildHasher for StoreKeyHasherBuilder {
    type Hasher = StoreKeyHasher;
    fn build_hasher(&self) -> StoreKeyHasher {
        StoreKeyHasher {
            seed: self.seed,
            state: self.seed[0],
        }
    }
}

#[derive(Debug)]
pub(crate) struct StoreKeyHasher {
    seed: [u64; 2],
    state: u64,
}

impl std::hash::Hasher for StoreKeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(16);
        for chunk in &mut chunks {
            let (a, b) = chunk.split_at(8);
            let a = u64::from_le_bytes(a.try_into().unwrap_or_default()) ^ self.seed[0];
            let b = u64::from_le_bytes(b.try_into().unwrap_or_default()) ^ self.seed[1];
            self.state = folded_multiply(self.state ^ a, b);
        }
        for &byte in chunks.remainder() {
            self.state = folded_multiply(self.state ^ u64::from(byte), self.seed[1]);
        }
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

fn folded_multiply(a: u64, b: u64) -> u64 {
    let full = u128::from(a) * u128::from(b);
    (full as u64) ^ ((full >> 64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::StoreKey;

    #[test]
    fn the_fast_hasher_spreads_keys_and_depends_on_its_seed() {
        use std::hash::BuildHasher;
        let (a, b) = (StoreKeyHasherBuilder::new(), StoreKeyHasherBuilder::new());
        let keys: Vec<StoreKey> = (0u32..4096)
            .map(|i| StoreKey::from_parts(b"", &i.to_be_bytes()))
            .collect();
        let buckets: std::collections::HashSet<u64> =
            keys.iter().map(|k| a.hash_one(k) & 1023).collect();
        assert!(
            buckets.len() > 900,
            "4096 keys over 1024 buckets hit {} of them",
            buckets.len()
        );
        let same = keys
            .iter()
            .filter(|k| a.hash_one(k) == b.hash_one(k))
            .count();
        assert_eq!(same, 0, "different seeds place keys differently");
        assert_eq!(a.hash_one(keys[7]), a.hash_one(keys[7]));
    }
}
