//! A small seeded generator (SplitMix64), so that seeded results (bootstrap resamples, data
//! subsets, splits) are the same on every platform and every dependency version.

/// SplitMix64: a fast 64-bit generator with good statistical quality for sampling.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
    rows: Option<(usize, usize)>,
}

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Rng {
            state: seed ^ 0x853c_49e6_748f_ea9b,
            rows: None,
        }
    }

    /// This generator for the rows `start..` of a batch of `total` images split across
    /// data-parallel replicas: per-image draws (drop-path masks) are made for the whole batch
    /// and the replica keeps its own rows, so that the replicas together draw what one model
    /// given the whole batch draws ([`Rng::batch_rows`]).
    pub fn for_rows(mut self, start: usize, total: usize) -> Self {
        self.rows = Some((start, total));
        self
    }

    /// `(start, total)` set by [`Rng::for_rows`]: draw `total` per-image values, keep those
    /// from `start`.
    pub fn batch_rows(&self) -> Option<(usize, usize)> {
        self.rows
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), without modulo bias.
    pub fn below(&mut self, n: usize) -> usize {
        let n = n as u64;
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let v = self.next_u64();
            if v < zone {
                return (v % n) as usize;
            }
        }
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_in_range() {
        let a: Vec<u64> = (0..5)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let mut r = Rng::new(7);
        assert_eq!(a, (0..5).map(|_| r.next_u64()).collect::<Vec<_>>());
        let mut r = Rng::new(1);
        assert!((0..1000).all(|_| r.below(3) < 3));
    }
}
