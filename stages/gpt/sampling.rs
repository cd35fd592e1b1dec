//! How a model's logits become tokens: nanoGPT's `generate` loop (`Draw`: B rows side by side,
//! a token per row per step, each row from its own generator) and the draw of one token from a
//! row of logits (V) under a temperature and top-k (`Sampler`). Where the logits come from is the
//! caller's (`NextLogits`: candle's ops in `model.rs`, the CPU decoder in `step/decode.rs`).

use candle_core::Result;
use rayon::prelude::*;

use crate::gpt::Rng;

/// How `generate_with` draws tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// Divides the logits: below 1 sharper, above 1 flatter; 0 takes the most likely token.
    pub temperature: f64,
    /// Keep only the k most likely tokens (ties at the k-th all stay); `None` keeps all.
    pub top_k: Option<usize>,
    /// Reuse the keys and values of positions already seen (same tokens, less work).
    pub kv_cache: bool,
}

/// What `generate_with` calls with each step's new tokens, one per row.
pub type OnTokens<'a> = dyn FnMut(&[u32]) -> Result<()> + Send + 'a;

/// The model's side of a decoding loop.
pub(crate) trait NextLogits {
    /// The logits (B, V) of the token after the first `len` of each row of `tokens` (B rows of
    /// `stride`), given that earlier calls saw the rows' earlier tokens.
    fn next_logits(&mut self, tokens: &[u32], stride: usize, len: usize) -> Result<&[f32]>;
}

/// A decoding loop: the rows of `tokens` (B of `stride`, the first `len` filled) filled to the
/// end, a token per row per step.
pub(crate) struct Draw<'a, 'b> {
    pub(super) tokens: &'a mut [u32],
    pub(super) stride: usize,
    pub(super) len: usize,
    pub(super) sampling: &'a Sampling,
    /// Row b draws from `rngs[b]`.
    pub(super) rngs: &'a mut [Rng],
    /// Called with each step's new tokens, one per row.
    pub(super) on_tokens: &'a mut OnTokens<'b>,
}

impl Draw<'_, '_> {
    /// Draws every token left. Its buffers are allocated before the first step: with an
    /// allocation-free `logits` (the CPU decoder's), a step allocates nothing.
    pub(crate) fn run(&mut self, logits: &mut dyn NextLogits) -> Result<()> {
        let Sampling { temperature, top_k, .. } = *self.sampling;
        let b = self.rngs.len();
        let mut samplers: Vec<Sampler> = (0..b).map(|_| Sampler::default()).collect();
        let mut next = vec![0u32; b];
        for len in self.len..self.stride {
            let logits = logits.next_logits(self.tokens, self.stride, len)?;
            let v = logits.len() / b;
            // Rows in parallel: cutting GPT-2's 50257 logits to the top 200 is ~0.2 ms a row.
            let rows = next.par_iter_mut().zip(self.rngs.par_iter_mut()).zip(samplers.par_iter_mut());
            rows.enumerate().with_min_len(if v < 4096 { b } else { 1 }).for_each(|(row, ((next, rng), sampler))| {
                *next = sampler.sample(&logits[row * v..][..v], temperature, top_k, rng);
            });
            for (row, &token) in self.tokens.chunks_exact_mut(self.stride).zip(&next) {
                row[len] = token;
            }
            (self.on_tokens)(&next)?;
        }
        Ok(())
    }
}

/// A row's sampling scratch, kept from token to token.
#[derive(Debug, Default)]
struct Sampler {
    values: Vec<f32>,
    weights: Vec<f64>,
}

impl Sampler {
    /// One token id from a row of logits (V): see `Gpt::generate`.
    fn sample(&mut self, logits: &[f32], temperature: f64, top_k: Option<usize>, rng: &mut Rng) -> u32 {
        let argmax = |row: &[f32]| (0..row.len()).fold(0, |best, i| if row[i] > row[best] { i } else { best });
        if temperature == 0.0 {
            return argmax(logits) as u32;
        }
        // Ties at the k-th largest logit all stay in, as in nanoGPT's `logits < v[:, [-1]]`. The
        // k-th largest by selection, not a sort of the whole vocabulary (GPT-2's 50257 at every
        // token).
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let floor = match top_k {
            Some(k) if k < logits.len() => {
                self.values.clear();
                self.values.extend_from_slice(logits);
                *self.values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1
            }
            _ => f32::NEG_INFINITY,
        };
        self.weights.clear();
        let weight = |l: f32| if l < floor { 0.0 } else { ((l as f64 - max) / temperature).exp() };
        self.weights.extend(logits.iter().map(|&l| weight(l)));
        let mut u = rng.uniform() * self.weights.iter().sum::<f64>();
        for (i, w) in self.weights.iter().enumerate() {
            if u < *w {
                return i as u32;
            }
            u -= w;
        }
        argmax(logits) as u32 // rounding left `u` past the last weight; the largest is the best guess
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_follows_the_softmax_within_top_k() {
        let logits = [0.0, 1.0f32.ln(), 2.0f32.ln(), 3.0f32.ln(), -1e9];
        let (mut rng, mut sampler) = (Rng::new(18), Sampler::default());
        let mut counts = [0usize; 5];
        for _ in 0..60_000 {
            counts[sampler.sample(&logits, 1.0, Some(3), &mut rng) as usize] += 1;
        }
        // Top 3 of weights 1, 1, 2, 3: the two 1s tie at the cut and both stay in.
        let expected = [1.0 / 7.0, 1.0 / 7.0, 2.0 / 7.0, 3.0 / 7.0, 0.0];
        for (count, p) in counts.iter().zip(expected) {
            assert!((*count as f64 / 60_000.0 - p).abs() < 0.01, "{counts:?}");
        }
    }
}
