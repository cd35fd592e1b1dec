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

    /// The `k`-th of the generators one seed gives to things drawn side by side (sampling: one
    /// per sample), so that what one draws does not depend on how many others draw beside it.
    pub fn stream(seed: u64, k: u64) -> Rng {
        Rng::new(mix(seed ^ mix(k.wrapping_add(1).wrapping_mul(GOLDEN))))
    }

    /// What a checkpoint records: the batch stream continues from here. (A pending normal sample
    /// is not part of it; the batch stream draws none.)
    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
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

/// SplitMix64's increment (2^64 / φ).
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One dropout mask on the CPU: element `index` is kept (and scaled by 1 / (1 - p)) when the
/// SplitMix64 output at position `index` of the stream keyed by (seed, site) is at least p·2^64.
/// Each element's draw stands alone, so the backward pass recomputes the forward's mask instead
/// of storing it, threads draw without sharing a stream, and the explicit CPU step and the
/// op-by-op model (`site`s numbered alike) draw the same masks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropoutMask {
    key: u64,
    threshold: u64,
    /// 1 / (1 - p): what a kept element is multiplied by.
    pub(crate) scale: f32,
}

impl DropoutMask {
    /// The mask of dropout `site` (0: the embeddings; 3l + 1, 3l + 2, 3l + 3: layer l's
    /// attention probabilities, attention output and MLP output) for probability `p`.
    pub(crate) fn new(seed: u64, site: u64, p: f32) -> DropoutMask {
        let threshold = (p as f64 * 18_446_744_073_709_551_616.0) as u64;
        DropoutMask { key: mix(seed ^ mix(site.wrapping_mul(GOLDEN))), threshold, scale: 1.0 / (1.0 - p) }
    }

    /// What element `index` is multiplied by: 0 or `scale`.
    #[inline(always)]
    pub(crate) fn factor(&self, index: usize) -> f32 {
        if mix(self.key.wrapping_add((index as u64).wrapping_mul(GOLDEN))) >= self.threshold { self.scale } else { 0.0 }
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
    fn dropout_masks_drop_about_p_and_differ_by_site_and_seed() {
        let mask = DropoutMask::new(5, 1, 0.2);
        let kept: Vec<f32> = (0..100_000).map(|i| mask.factor(i)).collect();
        let dropped = kept.iter().filter(|&&f| f == 0.0).count() as f64 / kept.len() as f64;
        assert!((dropped - 0.2).abs() < 0.005, "dropped {dropped}");
        assert!(kept.iter().all(|&f| f == 0.0 || f == 1.25));
        for other in [DropoutMask::new(5, 2, 0.2), DropoutMask::new(6, 1, 0.2)] {
            assert_ne!(kept, (0..100_000).map(|i| other.factor(i)).collect::<Vec<_>>());
        }
        assert!((0..1000).all(|i| DropoutMask::new(5, 1, 0.0).factor(i) == 1.0));
    }

    #[test]
    fn streams_of_a_seed_differ() {
        let first = |mut rng: Rng| (0..4).map(|_| rng.next_u64()).collect::<Vec<_>>();
        let streams: Vec<_> = (0..3).map(|k| first(Rng::stream(9, k))).collect();
        assert_eq!(streams[1], first(Rng::stream(9, 1)));
        assert!(streams[0] != streams[1] && streams[1] != streams[2] && streams[0] != streams[2]);
        assert_ne!(streams[0], first(Rng::stream(10, 0)));
        // Not the seed's own stream shifted: no draw of one is among another's.
        assert!(streams[0].iter().all(|x| !streams[1].contains(x) && !first(Rng::new(9)).contains(x)));
    }

    #[test]
    fn rng_draws_cover_the_range() {
        let mut rng = Rng::new(1);
        let draws: Vec<u64> = (0..1000).map(|_| rng.below(10)).collect();
        assert!(draws.iter().all(|&d| d < 10));
        assert!((0..10).all(|d| draws.contains(&d)));
    }
}
