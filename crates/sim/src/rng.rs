//! A seeded pseudo-random generator for scenario tests and benchmarks
//! (xorshift64*): a run is its seed's alone, so a failure reproduces from
//! the seed it prints. Not for anything a guest could predict to its gain.

/// xorshift64* (Vigna); any seed (0 is mapped to a fixed non-zero state).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 { 0x9e37_79b9_7f4a_7c15 } else { seed })
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_one_sequence_and_zero_is_not_stuck() {
        let a: Vec<u64> = (0..4).scan(Rng::new(7), |r, _| Some(r.next_u64())).collect();
        let b: Vec<u64> = (0..4).scan(Rng::new(7), |r, _| Some(r.next_u64())).collect();
        assert_eq!(a, b);
        let mut z = Rng::new(0);
        assert_ne!(z.next_u64(), z.next_u64());
        assert!((0..1000).all(|_| Rng::new(3).below(10) < 10));
    }
}
