//! The model's shape: nanoGPT's `GPTConfig` (`GptConfig`), OpenAI's GPT-2 presets, the
//! parameter and FLOP counts (nanoGPT's `get_num_params`, and the PaLM paper's 6N + 12LHQT that
//! `estimate_mfu` divides by), and the constants GPT-2 fixes (init, LayerNorm epsilon). It owns
//! no tensors: the model (`model.rs`), the CPU step (`step/`) and the Hugging Face layout
//! (`hf.rs`) all read it.

use candle_core::Result;
use serde::{Deserialize, Serialize};

/// GPT-2's init: weights ~ N(0, 0.02) (model.py's `_init_weights`).
pub(crate) const INIT_STD: f64 = 0.02;
/// GPT-2's LayerNorm epsilon (HF `layer_norm_epsilon`; PyTorch's default too).
pub(crate) const LAYER_NORM_EPS: f64 = 1e-5;

/// The model's shape. Names follow nanoGPT's `GPTConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    /// The longest context in tokens (HF `n_positions`); the size of `wpe`.
    pub block_size: usize,
    /// Rows of `wte`: the tokenizer's vocabulary, possibly padded (`with_padded_vocab`).
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    /// The probability of zeroing an activation while training: after the embeddings, on the
    /// attention weights and on each residual branch. Read at every forward, so it can be
    /// changed on a built model.
    pub dropout: f64,
    /// Biases in the Linear and LayerNorm layers (GPT-2 has them; nanoGPT finds a model a little
    /// better and faster without).
    pub bias: bool,
}

impl GptConfig {
    /// The names `preset` knows.
    pub const PRESETS: [&'static str; 4] = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"];

    /// OpenAI's GPT-2 sizes (nanoGPT's `from_pretrained`): 124M, 350M, 774M and 1558M params.
    pub fn preset(name: &str) -> Option<GptConfig> {
        let (n_layer, n_head, n_embd) = match name {
            "gpt2" => (12, 12, 768),
            "gpt2-medium" => (24, 16, 1024),
            "gpt2-large" => (36, 20, 1280),
            "gpt2-xl" => (48, 25, 1600),
            _ => return None,
        };
        Some(GptConfig { block_size: 1024, vocab_size: 50257, n_layer, n_head, n_embd, dropout: 0.0, bias: true })
    }

    /// The vocabulary rounded up to a multiple of `multiple`: nanoGPT trains GPT-2 with 50304
    /// (= 50257 padded to 64) rows, since matmuls are faster on such shapes; the extra tokens
    /// never occur and learn to get no probability.
    pub fn with_padded_vocab(&self, multiple: usize) -> GptConfig {
        GptConfig { vocab_size: self.vocab_size.div_ceil(multiple.max(1)) * multiple.max(1), ..self.clone() }
    }

    /// The number of parameters, the tied `wte`/`lm_head` counted once (nanoGPT's
    /// `get_num_params`). `non_embedding` leaves out the position embeddings, as nanoGPT reports;
    /// the token embeddings stay, since they are also the output layer.
    pub fn num_params(&self, non_embedding: bool) -> usize {
        let c = self.n_embd;
        let bias = usize::from(self.bias);
        let layer_norm = c + bias * c;
        let linear = |fan_in: usize, fan_out: usize| fan_in * fan_out + bias * fan_out;
        let block = 2 * layer_norm + linear(c, 3 * c) + linear(c, c) + linear(c, 4 * c) + linear(4 * c, c);
        let wpe = self.block_size * c;
        let total = self.vocab_size * c + wpe + self.n_layer * block + layer_norm;
        if non_embedding { total - wpe } else { total }
    }

    /// FLOPs of one token's forward and backward at full context (nanoGPT's `estimate_mfu`, from
    /// the PaLM paper, appendix B): 6 per parameter plus the attention's 12·L·H·Q·T.
    pub fn flops_per_token(&self) -> f64 {
        let (l, h, q, t) = (self.n_layer, self.n_head, self.n_embd / self.n_head, self.block_size);
        6.0 * self.num_params(true) as f64 + 12.0 * (l * h * q * t) as f64
    }

    pub(crate) fn check(&self) -> Result<()> {
        let sizes = [self.block_size, self.vocab_size, self.n_layer, self.n_head, self.n_embd];
        if sizes.contains(&0) || !self.n_embd.is_multiple_of(self.n_head) || !(0.0..1.0).contains(&self.dropout) {
            candle_core::bail!(
                "invalid GPT config {self:?}: sizes must be positive, `n_embd` a multiple of `n_head`, `dropout` in [0, 1)"
            )
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts Hugging Face reports for OpenAI's checkpoints, and nanoGPT's "123.65M" for gpt2.
    #[test]
    fn presets_have_gpt2s_sizes() {
        let counts = [124_439_808, 354_823_168, 774_030_080, 1_557_611_200];
        for (name, count) in GptConfig::PRESETS.into_iter().zip(counts) {
            assert_eq!(GptConfig::preset(name).unwrap().num_params(false), count, "{name}");
        }
        let gpt2 = GptConfig::preset("gpt2").unwrap();
        assert_eq!(gpt2.num_params(true), 123_653_376);
        assert_eq!(gpt2.with_padded_vocab(64).vocab_size, 50304);
        // 6 * 123_653_376 + 12 * 12 layers * 12 heads * 64 * 1024 tokens.
        assert_eq!(gpt2.flops_per_token(), 855_166_464.0);
        assert_eq!(GptConfig::preset("gpt3"), None);
    }
}
