//! The one seeded generator behind every random choice nanoflow makes: GPT-2 init, training and
//! evaluation batches, dropout masks on the CPU, sampling. SplitMix64 (Steele, Lea & Flood, 2014)
//! for the bits, Box-Muller for normal samples: small, the same on every platform and device, and
//! a whole generator in one u64, so its state goes into a checkpoint as a number.

#[derive(Debug, Clone, PartialEq)]
pub struct Rng {
    state: u64,
    /// Box-Muller's second sample, kept for the next `normal` call.
    spare: Option<f64>,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed, spare: None }
    }

    /// The generator a checkpoint recorded with [`Rng::state`].
    pub fn from_state(state: u64) -> Rng {
        Rng::new(state)
    }

    /// What a checkpoint records: the batch stream continues from here. (A pending normal sample
    /// is not part of it; the batch stream draws none.)
    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift without rejection: the bias is below n / 2^64).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in (0, 1), never 0, so that a logarithm of it is finite.
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// A standard normal sample.
    pub fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let radius = (-2.0 * self.uniform().ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * self.uniform();
        self.spare = Some(radius * angle.sin());
        radius * angle.cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64's published first outputs for seed 1234567 (the reference C code's test vector).
    #[test]
    fn is_splitmix64() {
        let mut rng = Rng::new(1234567);
        let first: Vec<u64> = (0..3).map(|_| rng.next_u64()).collect();
        assert_eq!(first, [6457827717110365317, 3203168211198807973, 9817491932198370423]);
    }

    #[test]
    fn resumes_from_its_state() {
        let mut rng = Rng::new(7);
        rng.below(100);
        let mut resumed = Rng::from_state(rng.state());
        assert_eq!(
            (0..5).map(|_| rng.below(1000)).collect::<Vec<_>>(),
            (0..5).map(|_| resumed.below(1000)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn rng_draws_cover_the_range() {
        let mut rng = Rng::new(1);
        let draws: Vec<u64> = (0..1000).map(|_| rng.below(10)).collect();
        assert!(draws.iter().all(|&d| d < 10));
        assert!((0..10).all(|d| draws.contains(&d)));
    }
}
