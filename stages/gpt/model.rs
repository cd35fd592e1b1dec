//! The GPT: nanoGPT's model.py in Candle, read top to bottom the same way. It owns the model's
//! layers and forward pass, GPT-2's init, the loss and, as model.py, `generate`. Its shape
//! (`GptConfig` and the GPT-2 presets) is `config.rs`'s, the sampling loop `sampling.rs`'s. It
//! does not own training (optimizer, schedule, checkpoints: `train.rs`), tokenizers or prompts.
//!
//! Variable names are the Hugging Face GPT-2 keys without the `transformer.` prefix (`wte.weight`,
//! `h.3.attn.c_attn.weight`, `ln_f.bias`), in candle's orientation: a linear weight is
//! (out, in). Reading and writing the Hugging Face files is `hf.rs`'s.
//!
//! Every op here has a backward. candle 0.11's `candle_nn::LayerNorm` and `softmax_last_dim` take
//! fused kernels without one and would silently stop the gradient, so LayerNorm, GELU and the
//! causal softmax come from `ops.rs`: fused CPU kernels with their backward, plain candle ops
//! elsewhere.
//!
//! In float32 on the CPU (`Gpt::explicit`, the one place that picks the path), training steps
//! (`accumulate_gradients`), losses (`loss`), cached decoding (`forward_cached`) and sampling
//! (`generate_with`) run this model written out in `step/`, over these same parameters
//! (`Gpt::parameters`), without candle's per-op overhead; its tests hold it to this file's
//! forward and backward and to `transformers`. The step reads the config and the parameters it
//! is handed, never this file's types.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use candle_core::{DType, Device, IndexOp, Module, Result, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Embedding, Init, VarBuilder, VarMap};

use crate::gpt::Rng;
use crate::gpt::config::GptConfig;
// Re-exported where `hf.rs` and `source.rs` read them.
use crate::gpt::config::{INIT_STD, LAYER_NORM_EPS};
use crate::gpt::rng::DropoutMask;
use crate::gpt::sampling::OnTokens;
use crate::gpt::sampling::{Draw, NextLogits, Sampling};
use crate::gpt::step::{self, Decoder, Workspace};

/// LayerNorm with an optional bias (see the module docs).
struct LayerNorm {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl LayerNorm {
    fn new(config: &GptConfig, vb: VarBuilder) -> Result<LayerNorm> {
        let weight = vb.get_with_hints(config.n_embd, "weight", Init::Const(1.0))?;
        let bias = config.bias.then(|| vb.get_with_hints(config.n_embd, "bias", Init::Const(0.0))).transpose()?;
        Ok(LayerNorm { weight, bias })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = crate::gpt::ops::normalize(x, LAYER_NORM_EPS as f32)?.broadcast_mul(&self.weight)?;
        match &self.bias {
            Some(bias) => x.broadcast_add(bias),
            None => Ok(x),
        }
    }
}

/// y = x Wᵀ + b over the last dimension. Unlike `candle_nn::Linear`, which multiplies each batch
/// row by a broadcast weight (B small matmuls, and B weight gradients to sum), the leading
/// dimensions are flattened into one matmul.
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(weight: Tensor, bias: Option<Tensor>) -> Linear {
        Linear { weight, bias }
    }
}

impl Linear {
    /// The matmul in `dtype` (bfloat16 or float16 under mixed precision: the float32 weight is
    /// cast per pass, as autocast does, and the product comes back in float32).
    fn forward(&self, x: &Tensor, dtype: DType) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        let width = dims.pop().unwrap_or(1);
        let rows = dims.iter().product::<usize>();
        let y = crate::gpt::ops::matmul_as(&x.reshape((rows, width))?, &self.weight.t()?, dtype)?;
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        dims.push(self.weight.dim(0)?);
        y.reshape(dims)
    }
}

/// A Linear layer with GPT-2's init: weight ~ N(0, `std`), bias zero.
fn linear(fan_in: usize, fan_out: usize, std: f64, config: &GptConfig, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get_with_hints((fan_out, fan_in), "weight", Init::Randn { mean: 0.0, stdev: std })?;
    let bias = config.bias.then(|| vb.get_with_hints(fan_out, "bias", Init::Const(0.0))).transpose()?;
    Ok(Linear::new(weight, bias))
}

/// The init of the projections that end a residual branch (`c_proj`): GPT-2 scales them by
/// 1/sqrt(2·n_layer), two branches per layer adding up on the residual stream.
fn residual_std(config: &GptConfig) -> f64 {
    INIT_STD / (2.0 * config.n_layer as f64).sqrt()
}

/// What one forward pass needs besides its input: the matmul dtype and dropout.
///
/// Dropout is inverted, with probability `p` (the identity at 0: not training), its masks drawn
/// so that a seed gives the same masks: on the CPU from `DropoutMask` (candle's CPU backend
/// cannot be seeded), the same masks the explicit CPU step (`step/`) draws; elsewhere from the
/// device's generator, which `Gpt::seed_dropout` seeds.
struct Pass {
    p: f32,
    seed: u64,
    dtype: DType,
}

impl Pass {
    /// Dropout at `site` (see `DropoutMask::new`).
    fn dropout(&self, x: &Tensor, site: usize) -> Result<Tensor> {
        if self.p == 0.0 {
            return Ok(x.clone());
        }
        if !x.device().is_cpu() {
            return candle_nn::ops::dropout(x, self.p);
        }
        let mask = DropoutMask::new(self.seed, site as u64, self.p);
        let mask: Vec<f32> = (0..x.elem_count()).map(|i| mask.factor(i)).collect();
        x.mul(&Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)
    }
}

struct CausalSelfAttention {
    /// Query, key and value projections for all heads, in one matmul.
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    /// The layer's index: its dropout sites are 3·layer + 1 (probabilities) and + 2 (output).
    layer: usize,
}

impl CausalSelfAttention {
    fn new(config: &GptConfig, vb: VarBuilder, layer: usize) -> Result<CausalSelfAttention> {
        let c = config.n_embd;
        let c_attn = linear(c, 3 * c, INIT_STD, config, vb.pp("c_attn"))?;
        let c_proj = linear(c, c, residual_std(config), config, vb.pp("c_proj"))?;
        Ok(CausalSelfAttention { c_attn, c_proj, n_head: config.n_head, layer })
    }

    /// With a `cache`, `x` holds the positions after those cached, whose keys and values are
    /// reused; this step's are written after them.
    fn forward(&self, x: &Tensor, pass: &Pass, cache: Option<LayerSlot>) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?; // batch size, sequence length, embedding dimensionality (n_embd)
        let hs = c / self.n_head;
        let qkv = self.c_attn.forward(x, pass.dtype)?; // (B, T, 3C)
        if cache.is_none() && pass.p == 0.0 {
            // The common case, training or evaluating without dropout: one fused op on the CPU.
            let y = crate::gpt::ops::causal_attention(&qkv, self.n_head, pass.dtype)?;
            return self.c_proj.forward(&y, pass.dtype);
        }
        // (B, nh, T, hs): the heads move next to the batch.
        let head = |i: usize| qkv.narrow(2, i * c, c)?.reshape((b, t, self.n_head, hs))?.transpose(1, 2)?.contiguous();
        let (q, mut k, mut v) = (head(0)?, head(1)?, head(2)?);
        let mut past = 0;
        if let Some(LayerSlot { cache, past: cached, capacity }) = cache {
            // Written in place into buffers of the whole context, allocated at the first step:
            // appending by `Tensor::cat` copied the whole cache at every token (GPT-2 at 500
            // positions: 37 MB a token).
            let fresh = || Tensor::zeros((b, self.n_head, capacity, hs), k.dtype(), k.device());
            let buffers = match cache.take() {
                Some(buffers) => buffers,
                None => (fresh()?, fresh()?),
            };
            buffers.0.slice_set(&k, 2, cached)?;
            buffers.1.slice_set(&v, 2, cached)?;
            past = cached;
            k = buffers.0.narrow(2, 0, past + t)?; // (B, nh, past + T, hs)
            v = buffers.1.narrow(2, 0, past + t)?;
            *cache = Some(buffers);
        }
        // Scaled dot-product attention, each position seeing only itself and earlier ones.
        let att = crate::gpt::ops::matmul_as(&q, &k.t()?, pass.dtype)?; // (B, nh, T, past + T)
        let att = crate::gpt::ops::causal_softmax(&att, 1.0 / (hs as f64).sqrt(), past)?;
        let att = pass.dropout(&att, 3 * self.layer + 1)?;
        let y = crate::gpt::ops::matmul_as(&att, &v, pass.dtype)?; // (B, nh, T, hs)
        let y = y.transpose(1, 2)?.reshape((b, t, c))?; // (B, T, C): the heads side by side again
        pass.dropout(&self.c_proj.forward(&y, pass.dtype)?, 3 * self.layer + 2)
    }
}

/// One layer's cached keys and values: (B, nh, block_size, hs) buffers each, their first
/// `KvCache::len` positions filled.
type LayerCache = Option<(Tensor, Tensor)>;

/// What a layer's attention needs of the cache: its buffers, the positions cached before this
/// step and the buffers' size (the block size).
struct LayerSlot<'a> {
    cache: &'a mut LayerCache,
    past: usize,
    capacity: usize,
}

/// The keys and values of every layer for the positions a model has seen, so that generating
/// the next token computes one position instead of the whole context. Not `Clone`: each step
/// writes into its buffers, which a clone would share.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    /// The explicit CPU path's cache and buffers (`step/decode.rs`), where the model is
    /// `explicit()`.
    decoder: Decoder,
}

impl KvCache {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        *self = KvCache::default();
    }

    /// Empty again, keeping the explicit path's buffers for the positions to come.
    fn restart(&mut self) {
        self.layers.clear();
        self.len = 0;
    }
}

struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
    /// The layer's index: its dropout site is 3·layer + 3.
    layer: usize,
}

impl Mlp {
    fn new(config: &GptConfig, vb: VarBuilder, layer: usize) -> Result<Mlp> {
        let c = config.n_embd;
        let c_fc = linear(c, 4 * c, INIT_STD, config, vb.pp("c_fc"))?;
        let c_proj = linear(4 * c, c, residual_std(config), config, vb.pp("c_proj"))?;
        Ok(Mlp { c_fc, c_proj, layer })
    }

    fn forward(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        // The tanh approximation GPT-2 uses (HF's "gelu_new").
        let x = crate::gpt::ops::gelu(&self.c_fc.forward(x, pass.dtype)?)?; // (B, T, 4C)
        pass.dropout(&self.c_proj.forward(&x, pass.dtype)?, 3 * self.layer + 3)
    }
}

/// A pre-LayerNorm transformer block (GPT-2 moved the LayerNorms to the branch inputs).
struct Block {
    ln_1: LayerNorm,
    attn: CausalSelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(config: &GptConfig, vb: VarBuilder, layer: usize) -> Result<Block> {
        Ok(Block {
            ln_1: LayerNorm::new(config, vb.pp("ln_1"))?,
            attn: CausalSelfAttention::new(config, vb.pp("attn"), layer)?,
            ln_2: LayerNorm::new(config, vb.pp("ln_2"))?,
            mlp: Mlp::new(config, vb.pp("mlp"), layer)?,
        })
    }

    fn forward(&self, x: &Tensor, pass: &Pass, cache: Option<LayerSlot>) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.ln_1.forward(x)?, pass, cache)?)?;
        &x + self.mlp.forward(&self.ln_2.forward(&x)?, pass)?
    }
}

/// nanoGPT's `GPT`: embeddings, `n_layer` blocks, a final LayerNorm and the tied output layer.
/// Its variables live in the `VarMap` (or files) its `VarBuilder` came from.
pub struct Gpt {
    pub config: GptConfig,
    pub(crate) wte: Embedding,
    wpe: Embedding,
    h: Vec<Block>,
    ln_f: LayerNorm,
    /// Shares its weight with `wte` (weight tying, Press & Wolf 2017): one variable, whose
    /// gradient sums both uses.
    lm_head: Linear,
    /// What dropout masks are drawn from (see `Pass`); `seed_dropout` sets it.
    dropout_seed: AtomicU64,
    /// The explicit CPU step's buffers (`step/workspace.rs`), made at its first use.
    workspace: Mutex<Option<Workspace>>,
    /// The dtype of the matmuls (`with_matmul_dtype`); weights and everything else stay float32.
    dtype: DType,
}

impl Gpt {
    /// Builds the model over `vb`; variables it lacks are created with GPT-2's init (a `VarMap`
    /// backend) or are an error (a file backend).
    pub fn new(config: &GptConfig, vb: VarBuilder) -> Result<Gpt> {
        config.check()?;
        let embedding = |rows: usize, name: &str| -> Result<Embedding> {
            let weight = vb.get_with_hints((rows, config.n_embd), name, Init::Randn { mean: 0.0, stdev: INIT_STD })?;
            Ok(Embedding::new(weight, config.n_embd))
        };
        let wte = embedding(config.vocab_size, "wte.weight")?;
        let wpe = embedding(config.block_size, "wpe.weight")?;
        let h = (0..config.n_layer).map(|i| Block::new(config, vb.pp(format!("h.{i}")), i)).collect::<Result<_>>()?;
        let ln_f = LayerNorm::new(config, vb.pp("ln_f"))?;
        let lm_head = Linear::new(wte.embeddings().clone(), None);
        Ok(Gpt {
            config: config.clone(),
            wte,
            wpe,
            h,
            ln_f,
            lm_head,
            dropout_seed: AtomicU64::new(0),
            workspace: Mutex::new(None),
            dtype: DType::F32,
        })
    }

    /// A fresh model with GPT-2's init, its variables in `varmap`: the same seed gives the same
    /// weights on any device. Variables already in `varmap` are kept.
    pub fn init(config: &GptConfig, varmap: &VarMap, device: &Device, seed: u64) -> Result<Gpt> {
        let backend = SeededVarMap { varmap: varmap.clone(), rng: Mutex::new(Rng::new(seed)) };
        Gpt::new(config, VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone()))
    }

    /// Mixed precision: the matmuls in `dtype` (bfloat16 or float16) with float32 weights,
    /// accumulation, LayerNorm, softmax and loss, as PyTorch's autocast runs nanoGPT.
    pub fn with_matmul_dtype(mut self, dtype: DType) -> Gpt {
        self.dtype = dtype;
        self
    }

    /// Restarts the dropout masks from `seed`: the trainer seeds each micro-step from the run's
    /// seed and the step, so that a resumed run draws the masks the uninterrupted one drew.
    pub fn seed_dropout(&self, seed: u64) -> Result<()> {
        self.dropout_seed.store(seed, Ordering::Relaxed);
        let device = self.wte.embeddings().device();
        if !device.is_cpu() {
            device.set_seed(seed)?;
        }
        Ok(())
    }

    /// The parameters in the order the explicit CPU step reads them (`step/params.rs`): `wte`, `wpe`,
    /// then per layer ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj, each weight followed by
    /// its bias where the model has biases, then ln_f.
    pub(crate) fn parameters(&self) -> Vec<&Tensor> {
        let mut tensors: Vec<(&Tensor, Option<&Tensor>)> = Vec::new();
        for block in &self.h {
            tensors.push((&block.ln_1.weight, block.ln_1.bias.as_ref()));
            tensors.push((&block.attn.c_attn.weight, block.attn.c_attn.bias.as_ref()));
            tensors.push((&block.attn.c_proj.weight, block.attn.c_proj.bias.as_ref()));
            tensors.push((&block.ln_2.weight, block.ln_2.bias.as_ref()));
            tensors.push((&block.mlp.c_fc.weight, block.mlp.c_fc.bias.as_ref()));
            tensors.push((&block.mlp.c_proj.weight, block.mlp.c_proj.bias.as_ref()));
        }
        tensors.push((&self.ln_f.weight, self.ln_f.bias.as_ref()));
        let mut all = vec![self.wte.embeddings(), self.wpe.embeddings()];
        for (weight, bias) in tensors {
            all.push(weight);
            all.extend(bias);
        }
        all
    }

    /// Whether `accumulate_gradients`, `loss`, `forward_cached` and `generate_with` run the
    /// explicit CPU step (`step/`): float32 matmuls on the CPU. Elsewhere training goes through
    /// candle's autograd.
    pub fn explicit(&self) -> bool {
        self.dtype == DType::F32 && self.wte.embeddings().device().is_cpu()
    }

    /// One micro-batch forward and backward by the explicit CPU step: adds `weight` times the
    /// gradient of the mean cross-entropy of `forward(idx, true)` against `targets` (both (B, T)
    /// u32) to the sums `take_gradients` returns, the dropout masks drawn from the
    /// `seed_dropout` seed. Returns the mean loss. Only where `explicit()`.
    pub fn accumulate_gradients(&self, idx: &Tensor, targets: &Tensor, weight: f64) -> Result<f32> {
        let seed = self.dropout_seed.load(Ordering::Relaxed);
        let mut workspace = lock(&self.workspace);
        step::run(&mut workspace, &self.config, &self.parameters(), idx, targets, Some((weight as f32, seed)))
    }

    /// The gradients summed by `accumulate_gradients` since the last call, one per `vars` (zeros
    /// for a variable the model does not use), and zero sums for the next step.
    pub fn take_gradients<'a>(&self, vars: impl Iterator<Item = &'a Var>) -> Result<Vec<Tensor>> {
        let mut workspace = lock(&self.workspace);
        step::take_gradients(&mut workspace, &self.parameters(), vars)
    }

    /// One batch forward and backward, as the benchmarks time it: the mean loss of
    /// `forward(idx, true)` against `targets` and its gradient for each of `vars`, by the explicit
    /// CPU step where `explicit()`, by candle's autograd elsewhere.
    pub fn loss_and_gradients(&self, idx: &Tensor, targets: &Tensor, vars: &[&Var]) -> Result<(f64, Vec<Tensor>)> {
        if self.explicit() {
            let loss = self.accumulate_gradients(idx, targets, 1.0)?;
            return Ok((loss as f64, self.take_gradients(vars.iter().copied())?));
        }
        let loss = cross_entropy(&self.forward(idx, true)?, targets)?;
        let store = loss.backward()?;
        let grads = vars.iter().map(|var| store.get(var.as_tensor()).cloned().map_or_else(|| var.zeros_like(), Ok));
        Ok((loss.to_dtype(DType::F64)?.to_scalar::<f64>()?, grads.collect::<Result<_>>()?))
    }

    /// The mean cross-entropy of `forward(idx, false)` against `targets` (both (B, T) u32): the
    /// explicit CPU step's forward where `explicit()`, candle's ops elsewhere.
    pub fn loss(&self, idx: &Tensor, targets: &Tensor) -> Result<f64> {
        if self.explicit() {
            let mut workspace = lock(&self.workspace);
            return Ok(step::run(&mut workspace, &self.config, &self.parameters(), idx, targets, None)? as f64);
        }
        cross_entropy(&self.forward(idx, false)?, targets)?.to_dtype(DType::F64)?.to_scalar::<f64>()
    }

    /// idx (B, T) u32 token ids -> logits (B, T, vocab_size) f32. `train` turns dropout on.
    pub fn forward(&self, idx: &Tensor, train: bool) -> Result<Tensor> {
        let x = self.hidden(idx, train, None)?;
        self.lm_head.forward(&x, self.dtype) // (B, T, vocab_size)
    }

    /// idx (B, T) u32: the tokens after the `cache.len()` ones the cache holds -> the logits of
    /// the last position (B, vocab_size), the same as `forward` on the whole sequence gives there.
    /// The cache takes in these positions. Inference only (no dropout).
    pub fn forward_cached(&self, idx: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let t = idx.dim(1)?;
        if self.explicit() {
            let logits = step::decode(&mut cache.decoder, &self.config, &self.parameters(), idx, cache.len)?;
            cache.len += t;
            return Ok(logits);
        }
        let x = self.hidden(idx, false, Some(cache))?; // (B, T, C)
        self.lm_head.forward(&x.i((.., t - 1, ..))?.contiguous()?, self.dtype) // (B, vocab_size)
    }

    /// The final LayerNorm's output (B, T, C): everything but the output layer.
    fn hidden(&self, idx: &Tensor, train: bool, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        let (_, t) = idx.dims2()?;
        let past = cache.as_ref().map_or(0, |cache| cache.len);
        if past + t > self.config.block_size {
            candle_core::bail!(
                "cannot forward a sequence of length {}, block size is only {}",
                past + t,
                self.config.block_size
            )
        }
        let p = if train { self.config.dropout as f32 } else { 0.0 };
        let pass = Pass { p, seed: self.dropout_seed.load(Ordering::Relaxed), dtype: self.dtype };
        let pos = Tensor::arange(past as u32, (past + t) as u32, idx.device())?; // (T)
        let tok_emb = self.wte.forward(idx)?; // (B, T, C)
        let pos_emb = self.wpe.forward(&pos)?; // (T, C)
        let mut x = pass.dropout(&tok_emb.broadcast_add(&pos_emb)?, 0)?;
        if let Some(cache) = cache.as_deref_mut() {
            cache.layers.resize(self.h.len(), None);
            cache.len += t;
        }
        let capacity = self.config.block_size;
        for (i, block) in self.h.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|cache| LayerSlot { cache: &mut cache.layers[i], past, capacity });
            x = block.forward(&x, &pass, slot)?;
        }
        self.ln_f.forward(&x)
    }

    /// Shortens the context to `block_size` by keeping the first rows of `wpe` (nanoGPT's
    /// `crop_block_size`): finetuning GPT-2 on short sequences need not carry 1024 positions.
    /// `wpe.weight` in `varmap` becomes a new, smaller variable: crop before building the
    /// optimizer over `varmap.all_vars()`.
    pub fn crop_block_size(&mut self, varmap: &VarMap, block_size: usize) -> Result<()> {
        if block_size == 0 || block_size > self.config.block_size {
            candle_core::bail!("cannot crop block size {} to {block_size}", self.config.block_size)
        }
        let wpe = Var::from_tensor(&self.wpe.embeddings().narrow(0, 0, block_size)?.contiguous()?)?;
        self.wpe = Embedding::new(wpe.as_tensor().clone(), self.config.n_embd);
        lock(varmap.data()).insert("wpe.weight".to_string(), wpe);
        self.config.block_size = block_size;
        Ok(())
    }

    /// Continues each row of idx (B, T) u32 by `max_new_tokens` tokens, each drawn from the
    /// softmax of the last position's logits / `temperature`, cut to the `top_k` most likely
    /// (nanoGPT's `generate`); the model sees the last `block_size` tokens. Temperature 0 takes
    /// the most likely token. Row b draws from `Rng::stream(seed, b)`: the same `seed` gives the
    /// same tokens. Returns (B, T + max_new_tokens).
    pub fn generate(
        &self,
        idx: &Tensor,
        max_new_tokens: usize,
        temperature: f64,
        top_k: Option<usize>,
        seed: u64,
    ) -> Result<Tensor> {
        let sampling = Sampling { max_new_tokens, temperature, top_k, kv_cache: true };
        let mut rngs: Vec<Rng> = (0..idx.dim(0)?).map(|row| Rng::stream(seed, row as u64)).collect();
        self.generate_with(idx, &sampling, &mut rngs, &mut |_| Ok(()))
    }

    /// `generate` with the settings in `sampling`, row b drawing from `rngs[b]`, calling
    /// `on_tokens` with each step's new token of every row as it is drawn.
    ///
    /// The rows are decoded side by side: on the CPU a step reads each weight once for all of
    /// them (a step of GPT-2 124M reads half a gigabyte of weights, whether for one row or ten),
    /// and no row's tokens depend on the others'.
    /// With the KV cache each step computes one position while the context fits `block_size`.
    /// Past it the window slides, every position changes its place, and nothing cached is valid:
    /// each step then recomputes the last `block_size` tokens, as nanoGPT does for all steps.
    /// The tokens are the same either way (the cache only skips recomputation).
    pub fn generate_with(
        &self,
        idx: &Tensor,
        sampling: &Sampling,
        rngs: &mut [Rng],
        on_tokens: &mut OnTokens,
    ) -> Result<Tensor> {
        if sampling.temperature < 0.0 || sampling.top_k == Some(0) {
            candle_core::bail!("cannot sample with temperature {} and top_k {:?}", sampling.temperature, sampling.top_k)
        }
        let (b, t) = idx.dims2()?;
        if rngs.len() != b {
            candle_core::bail!("{b} rows to continue but {} generators", rngs.len())
        }
        let stride = t + sampling.max_new_tokens;
        let mut tokens = vec![0u32; b * stride];
        for (row, prompt) in tokens.chunks_exact_mut(stride).zip(idx.to_vec2::<u32>()?) {
            row[..t].copy_from_slice(&prompt);
        }
        let mut draw = Draw { tokens: &mut tokens, stride, len: t, sampling, rngs, on_tokens };
        match self.explicit() {
            true => step::generate(&self.config, &self.parameters(), &mut draw, sampling.kv_cache)?,
            false => draw.run(&mut CandleLogits {
                model: self,
                device: idx.device().clone(),
                cache: KvCache::default(),
                kv_cache: sampling.kv_cache,
                logits: Vec::new(),
            })?,
        }
        Tensor::from_vec(tokens, (b, stride), idx.device())
    }
}

/// `NextLogits` through candle's ops (a GPU, or a dtype the explicit step does not run).
struct CandleLogits<'a> {
    model: &'a Gpt,
    device: Device,
    cache: KvCache,
    kv_cache: bool,
    logits: Vec<f32>,
}

impl NextLogits for CandleLogits<'_> {
    fn next_logits(&mut self, tokens: &[u32], stride: usize, len: usize) -> Result<&[f32]> {
        let block_size = self.model.config.block_size;
        let fits = self.kv_cache && len <= block_size;
        if self.kv_cache && !fits {
            // The window slid: the whole window again, into a cache that keeps its buffers.
            self.cache.restart();
        }
        let start = if fits { self.cache.len() } else { len.saturating_sub(block_size) };
        let rows: Vec<u32> = tokens.chunks_exact(stride).flat_map(|row| &row[start..len]).copied().collect();
        let idx = Tensor::from_vec(rows, (tokens.len() / stride, len - start), &self.device)?;
        let logits = match self.kv_cache {
            true => self.model.forward_cached(&idx, &mut self.cache)?, // (B, V)
            false => self.model.forward(&idx, false)?.i((.., len - start - 1, ..))?,
        };
        self.logits = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        Ok(&self.logits)
    }
}

/// Mean cross-entropy over all positions: logits (B, T, V), targets (B, T) u32.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    crate::gpt::ops::cross_entropy(&logits.reshape((b * t, v))?, &targets.reshape(b * t)?)
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A `VarBuilder` backend that creates missing variables in a `VarMap` as the `VarMap` does, but
/// draws normal inits from a seeded generator: candle's CPU `randn` cannot be seeded.
struct SeededVarMap {
    varmap: VarMap,
    rng: Mutex<Rng>,
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, device: &Device) -> Result<Tensor> {
        if let Init::Randn { mean, stdev } = init
            && !self.varmap.contains_tensor(name)
        {
            let mut rng = lock(&self.rng);
            let values: Vec<f32> = (0..shape.elem_count()).map(|_| (mean + stdev * rng.normal()) as f32).collect();
            let var = Var::from_tensor(&Tensor::from_vec(values, &shape, device)?.to_dtype(dtype)?)?;
            lock(self.varmap.data()).insert(name.to_string(), var);
        }
        self.varmap.get(shape, name, init, dtype, device)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _device: &Device) -> Result<Tensor> {
        candle_core::bail!("`{name}` has no shape: a VarMap creates variables only with one")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    //! Known answers from Hugging Face `transformers` (tests/fixtures/make_gpt2_fixture.py wrote
    //! them; the Rust side reads only the files), plus the properties nanoGPT's model has.

    use std::path::PathBuf;

    use candle_nn::Optimizer;

    use super::*;
    use crate::gpt::hf::{HF_PREFIX, is_conv1d};
    use std::collections::HashMap;
    use std::path::Path;

    /// tests/fixtures, or `NANOFLOW_FIXTURES` for a test binary carried to another machine.
    fn fixture(name: &str) -> PathBuf {
        let dir = std::env::var_os("NANOFLOW_FIXTURES")
            .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"), PathBuf::from);
        dir.join(name)
    }

    fn reference() -> HashMap<String, Tensor> {
        candle_core::safetensors::load(fixture("tiny-gpt2-reference.safetensors"), &Device::Cpu).unwrap()
    }

    fn tiny_gpt2() -> (Gpt, VarMap) {
        let varmap = VarMap::new();
        let gpt = Gpt::load_hf(&fixture("tiny-gpt2"), &varmap, &Device::Cpu).unwrap();
        (gpt, varmap)
    }

    /// The reference's `idx` and `targets`, stored as i64, as the u32 the model takes.
    fn batch(reference: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
        (reference["idx"].to_dtype(DType::U32).unwrap(), reference["targets"].to_dtype(DType::U32).unwrap())
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        a.sub(b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    fn max_abs(a: &Tensor) -> f32 {
        a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    fn vars(varmap: &VarMap) -> Vec<(String, Var)> {
        let mut vars: Vec<_> = lock(varmap.data()).iter().map(|(name, var)| (name.clone(), var.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    fn tiny_config(bias: bool) -> GptConfig {
        GptConfig { block_size: 8, vocab_size: 16, n_layer: 2, n_head: 2, n_embd: 16, dropout: 0.0, bias }
    }

    fn random_tokens(shape: (usize, usize), vocab_size: usize, seed: u64) -> Tensor {
        let mut rng = Rng::new(seed);
        let ids: Vec<u32> = (0..shape.0 * shape.1).map(|_| (rng.next_u64() % vocab_size as u64) as u32).collect();
        Tensor::from_vec(ids, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn logits_and_loss_match_transformers() {
        let reference = reference();
        let (gpt, _varmap) = tiny_gpt2();
        let (idx, targets) = batch(&reference);
        let logits = gpt.forward(&idx, false).unwrap();
        let loss = cross_entropy(&logits, &targets).unwrap().to_scalar::<f32>().unwrap();
        let expected_loss = reference["loss"].i(0).unwrap().to_scalar::<f32>().unwrap();
        let logits_error = max_abs_diff(&logits, &reference["logits"]);
        eprintln!("logits max abs error {logits_error:e}, loss {loss} vs {expected_loss}");
        assert!(logits_error < 1e-5, "logits differ from transformers' by {logits_error}");
        assert!((loss - expected_loss).abs() < 1e-5, "loss {loss}, transformers {expected_loss}");
    }

    #[test]
    fn gradients_match_pytorch() {
        let reference = reference();
        let (gpt, varmap) = tiny_gpt2();
        let (idx, targets) = batch(&reference);
        let grads = cross_entropy(&gpt.forward(&idx, false).unwrap(), &targets).unwrap().backward().unwrap();
        let vars = vars(&varmap);
        let grads: Vec<Tensor> = vars
            .iter()
            .map(|(name, var)| grads.get(var).unwrap_or_else(|| panic!("`{name}` has no gradient")).clone())
            .collect();
        assert_gradients_match(&reference, &vars, &grads);
    }

    /// The explicit CPU step (`step/`), which trains on the CPU, against the same reference.
    #[test]
    fn the_explicit_steps_loss_and_gradients_match_pytorch() {
        let reference = reference();
        let (gpt, varmap) = tiny_gpt2();
        assert!(gpt.explicit());
        let (idx, targets) = batch(&reference);
        let vars = vars(&varmap);
        let var_refs: Vec<&Var> = vars.iter().map(|(_, var)| var).collect();
        let (loss, grads) = gpt.loss_and_gradients(&idx, &targets, &var_refs).unwrap();
        let expected_loss = reference["loss"].i(0).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((loss - expected_loss).abs() < 1e-5, "loss {loss}, transformers {expected_loss}");
        assert_gradients_match(&reference, &vars, &grads);
    }

    /// Each of `grads` (one per var) against transformers' within 1e-5 of its largest entry.
    fn assert_gradients_match(reference: &HashMap<String, Tensor>, vars: &[(String, Var)], grads: &[Tensor]) {
        assert_eq!(vars.len(), reference.keys().filter(|key| key.starts_with("grad.")).count());
        let mut worst = 0f32;
        for ((name, _), grad) in vars.iter().zip(grads) {
            let expected = &reference[&format!("grad.{name}")];
            let expected = if is_conv1d(name) { expected.t().unwrap() } else { expected.clone() };
            // Relative to the tensor's largest gradient: float32 sums of many terms round by
            // about 1e-7 of their largest term, not of each small entry.
            let error = max_abs_diff(grad, &expected) / max_abs(&expected).max(1e-3);
            assert!(error < 1e-5, "the gradient of `{name}` differs from PyTorch's by {error} (relative)");
            worst = worst.max(error);
        }
        eprintln!("worst relative gradient error {worst:e}");
    }

    /// The tiny GPT-2 on `device` with matmuls in `dtype` against transformers' float32 logits,
    /// loss and gradients: (logits error, loss error, worst relative gradient error).
    fn error_against_transformers(device: &Device, dtype: DType) -> (f32, f32, f32) {
        let reference = reference();
        let varmap = VarMap::new();
        let gpt = Gpt::load_hf(&fixture("tiny-gpt2"), &varmap, device).unwrap().with_matmul_dtype(dtype);
        let (idx, targets) = batch(&reference);
        let (idx, targets) = (idx.to_device(device).unwrap(), targets.to_device(device).unwrap());
        let logits = gpt.forward(&idx, false).unwrap();
        let loss = cross_entropy(&logits, &targets).unwrap();
        let grads = loss.backward().unwrap();
        let logits_error = max_abs_diff(&logits.to_device(&Device::Cpu).unwrap(), &reference["logits"]);
        let loss = loss.to_device(&Device::Cpu).unwrap().to_scalar::<f32>().unwrap();
        let loss_error = (loss - reference["loss"].i(0).unwrap().to_scalar::<f32>().unwrap()).abs();
        let mut worst = 0f32;
        for (name, var) in vars(&varmap) {
            let grad = grads.get(&var).unwrap().to_device(&Device::Cpu).unwrap();
            let expected = &reference[&format!("grad.{name}")];
            let expected = if is_conv1d(&name) { expected.t().unwrap() } else { expected.clone() };
            worst = worst.max(max_abs_diff(&grad, &expected) / max_abs(&expected).max(1e-3));
        }
        (logits_error, loss_error, worst)
    }

    #[test]
    fn bfloat16_matmuls_stay_near_transformers() {
        let (logits, loss, grads) = error_against_transformers(&Device::Cpu, DType::BF16);
        eprintln!("bfloat16 matmuls: logits {logits:e}, loss {loss:e}, gradients {grads:e} (relative)");
        assert!(logits < 1e-1 && loss < 1e-2 && grads < 5e-2, "{logits} {loss} {grads}");
        assert!(logits > 1e-6, "the matmuls did round to bfloat16");
    }

    /// The CUDA path (plain matmuls, the fused kernels) against transformers, in float32 and
    /// bfloat16: opt-in (`--include-ignored`) on a machine with a GPU and `--features cuda`.
    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a CUDA GPU: run with --include-ignored there"]
    fn cuda_logits_loss_and_gradients_match_transformers() {
        let device = Device::new_cuda(0).expect("a CUDA device (this test is for GPU machines)");
        let (logits, loss, grads) = error_against_transformers(&device, DType::F32);
        eprintln!("CUDA float32: logits {logits:e}, loss {loss:e}, gradients {grads:e} (relative)");
        assert!(logits < 1e-4 && loss < 1e-4 && grads < 1e-4, "{logits} {loss} {grads}");
        let (logits, loss, grads) = error_against_transformers(&device, DType::BF16);
        eprintln!("CUDA bfloat16: logits {logits:e}, loss {loss:e}, gradients {grads:e} (relative)");
        assert!(logits < 1e-1 && loss < 1e-2 && grads < 5e-2, "{logits} {loss} {grads}");
    }

    /// candle's fused LayerNorm and softmax have no backward: one of them anywhere would leave
    /// every variable before it without a gradient, with no error.
    #[test]
    fn every_parameter_gets_a_gradient() {
        for bias in [true, false] {
            let varmap = VarMap::new();
            let config = GptConfig { dropout: 0.1, ..tiny_config(bias) };
            let gpt = Gpt::init(&config, &varmap, &Device::Cpu, 7).unwrap();
            let idx = random_tokens((2, 8), config.vocab_size, 1);
            let targets = random_tokens((2, 8), config.vocab_size, 2);
            for train in [false, true] {
                let grads = cross_entropy(&gpt.forward(&idx, train).unwrap(), &targets).unwrap().backward().unwrap();
                for (name, var) in vars(&varmap) {
                    let grad = grads.get(&var).unwrap_or_else(|| panic!("`{name}` has no gradient (bias {bias})"));
                    assert!(max_abs(grad) > 0.0, "`{name}` has a zero gradient (bias {bias}, train {train})");
                }
            }
        }
    }

    #[test]
    fn loads_the_hubs_unprefixed_layout_with_buffers_and_lm_head() {
        let dir = tempfile::tempdir().unwrap();
        let mut tensors = candle_core::safetensors::load(fixture("tiny-gpt2/model.safetensors"), &Device::Cpu).unwrap();
        tensors = tensors
            .into_iter()
            .map(|(key, tensor)| (key.strip_prefix(HF_PREFIX).unwrap().to_string(), tensor))
            .collect();
        for i in 0..2 {
            tensors.insert(format!("h.{i}.attn.bias"), Tensor::ones((1, 1, 16, 16), DType::F32, &Device::Cpu).unwrap());
        }
        tensors.insert("lm_head.weight".to_string(), tensors["wte.weight"].clone());
        candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
        fs_err::copy(fixture("tiny-gpt2/config.json"), dir.path().join("config.json")).unwrap();

        let reference = reference();
        let (idx, _) = batch(&reference);
        let varmap = VarMap::new();
        let gpt = Gpt::load_hf(&dir.path().join("model.safetensors"), &varmap, &Device::Cpu).unwrap();
        let (expected, expected_varmap) = tiny_gpt2();
        assert_eq!(vars(&varmap).len(), vars(&expected_varmap).len());
        let logits = gpt.forward(&idx, false).unwrap();
        assert_eq!(max_abs_diff(&logits, &expected.forward(&idx, false).unwrap()), 0.0);

        // An untied head is a different model: refuse it rather than drop it.
        tensors.insert("lm_head.weight".to_string(), (&tensors["wte.weight"] * 2.0).unwrap());
        candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
        let error = Gpt::load_hf(dir.path(), &VarMap::new(), &Device::Cpu).err().unwrap();
        assert!(error.to_string().contains("`lm_head.weight` that differs"), "{error}");
    }

    #[test]
    fn a_missing_tensor_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut tensors = candle_core::safetensors::load(fixture("tiny-gpt2/model.safetensors"), &Device::Cpu).unwrap();
        tensors.remove("transformer.h.1.mlp.c_fc.bias");
        candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
        fs_err::copy(fixture("tiny-gpt2/config.json"), dir.path().join("config.json")).unwrap();
        let error = Gpt::load_hf(dir.path(), &VarMap::new(), &Device::Cpu).err().unwrap();
        assert!(format!("{error:#}").contains("h.1.mlp.c_fc.bias"), "{error:#}");
    }

    #[test]
    fn save_hf_writes_what_transformers_wrote_and_loads_back() {
        let (gpt, varmap) = tiny_gpt2();
        let dir = tempfile::tempdir().unwrap();
        gpt.save_hf(&varmap, dir.path()).unwrap();
        // Same keys, same orientation, same bytes as `save_pretrained`'s file.
        let saved = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
        let original = candle_core::safetensors::load(fixture("tiny-gpt2/model.safetensors"), &Device::Cpu).unwrap();
        let mut keys: Vec<_> = saved.keys().collect();
        keys.sort();
        let mut original_keys: Vec<_> = original.keys().collect();
        original_keys.sort();
        assert_eq!(keys, original_keys);
        for (key, tensor) in &saved {
            assert_eq!(tensor.shape(), original[key].shape(), "{key}");
            assert_eq!(max_abs_diff(tensor, &original[key]), 0.0, "{key}");
        }

        let reference = reference();
        let (idx, _) = batch(&reference);
        let loaded = Gpt::load_hf(dir.path(), &VarMap::new(), &Device::Cpu).unwrap();
        assert_eq!(loaded.config, gpt.config);
        let logits = loaded.forward(&idx, false).unwrap();
        assert_eq!(max_abs_diff(&logits, &gpt.forward(&idx, false).unwrap()), 0.0);
    }

    /// HF's GPT-2 always has biases: a model without them is written with zero ones.
    #[test]
    fn save_hf_gives_a_biasless_model_zero_biases() {
        let config = tiny_config(false);
        let varmap = VarMap::new();
        let gpt = Gpt::init(&config, &varmap, &Device::Cpu, 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        gpt.save_hf(&varmap, dir.path()).unwrap();
        let loaded_varmap = VarMap::new();
        let loaded = Gpt::load_hf(dir.path(), &loaded_varmap, &Device::Cpu).unwrap();
        assert_eq!(loaded.config, GptConfig { bias: true, ..config.clone() });
        assert_eq!(vars(&loaded_varmap).len(), 4 + 12 * config.n_layer);
        let idx = random_tokens((2, 8), config.vocab_size, 4);
        let logits = loaded.forward(&idx, false).unwrap();
        assert_eq!(max_abs_diff(&logits, &gpt.forward(&idx, false).unwrap()), 0.0);
    }

    #[test]
    fn init_is_gpt2s_and_seeded() {
        let config =
            GptConfig { block_size: 64, vocab_size: 512, n_layer: 4, n_head: 4, n_embd: 64, dropout: 0.0, bias: true };
        let varmap = VarMap::new();
        Gpt::init(&config, &varmap, &Device::Cpu, 42).unwrap();
        let vars: HashMap<String, Var> = vars(&varmap).into_iter().collect();
        let count: usize = vars.values().map(|var| var.elem_count()).sum();
        assert_eq!(count, config.num_params(false));
        let stats = |name: &str| {
            let values = vars[name].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mean = values.iter().sum::<f32>() / values.len() as f32;
            let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / values.len() as f32;
            (mean, variance.sqrt())
        };
        let scaled = 0.02 / (2.0 * config.n_layer as f32).sqrt();
        for (name, std) in [
            ("wte.weight", 0.02),
            ("wpe.weight", 0.02),
            ("h.0.attn.c_attn.weight", 0.02),
            ("h.3.mlp.c_fc.weight", 0.02),
            ("h.0.attn.c_proj.weight", scaled),
            ("h.3.mlp.c_proj.weight", scaled),
        ] {
            let (mean, actual) = stats(name);
            assert!(mean.abs() < 0.1 * std, "`{name}` has mean {mean}");
            assert!((actual / std - 1.0).abs() < 0.05, "`{name}` has std {actual}, GPT-2 init {std}");
        }
        for name in ["h.1.ln_1.weight", "ln_f.weight"] {
            assert_eq!(stats(name), (1.0, 0.0), "{name}");
        }
        for name in ["h.1.ln_2.bias", "h.2.attn.c_attn.bias", "h.2.mlp.c_proj.bias"] {
            assert_eq!(stats(name), (0.0, 0.0), "{name}");
        }

        let same = VarMap::new();
        Gpt::init(&config, &same, &Device::Cpu, 42).unwrap();
        let other = VarMap::new();
        Gpt::init(&config, &other, &Device::Cpu, 43).unwrap();
        for (name, var) in self::vars(&same) {
            assert_eq!(max_abs_diff(var.as_tensor(), vars[&name].as_tensor()), 0.0, "{name}");
        }
        let other: HashMap<String, Var> = self::vars(&other).into_iter().collect();
        assert!(max_abs_diff(other["wte.weight"].as_tensor(), vars["wte.weight"].as_tensor()) > 0.0);
    }

    #[test]
    fn a_token_never_sees_the_future() {
        let config = tiny_config(true);
        let gpt = Gpt::init(&config, &VarMap::new(), &Device::Cpu, 5).unwrap();
        let idx = random_tokens((1, 8), config.vocab_size, 6);
        let mut changed = idx.to_vec2::<u32>().unwrap();
        changed[0][5] = (changed[0][5] + 1) % config.vocab_size as u32;
        let changed = Tensor::new(changed, &Device::Cpu).unwrap();
        let before = gpt.forward(&idx, false).unwrap();
        let after = gpt.forward(&changed, false).unwrap();
        assert_eq!(max_abs_diff(&before.narrow(1, 0, 5).unwrap(), &after.narrow(1, 0, 5).unwrap()), 0.0);
        assert!(max_abs_diff(&before.narrow(1, 5, 3).unwrap(), &after.narrow(1, 5, 3).unwrap()) > 0.0);
    }

    #[test]
    fn dropout_only_while_training() {
        let config = GptConfig { dropout: 0.5, ..tiny_config(true) };
        let gpt = Gpt::init(&config, &VarMap::new(), &Device::Cpu, 8).unwrap();
        let idx = random_tokens((2, 8), config.vocab_size, 9);
        let eval = gpt.forward(&idx, false).unwrap();
        assert_eq!(max_abs_diff(&eval, &gpt.forward(&idx, false).unwrap()), 0.0);
        assert!(max_abs_diff(&eval, &gpt.forward(&idx, true).unwrap()) > 0.0);
    }

    #[test]
    fn overfits_one_batch() {
        let config = tiny_config(true);
        let varmap = VarMap::new();
        let gpt = Gpt::init(&config, &varmap, &Device::Cpu, 10).unwrap();
        let idx = random_tokens((2, 8), config.vocab_size, 11);
        let targets = random_tokens((2, 8), config.vocab_size, 12);
        let params = candle_nn::ParamsAdamW { lr: 1e-2, weight_decay: 0.0, ..Default::default() };
        let mut optimizer = candle_nn::AdamW::new(varmap.all_vars(), params).unwrap();
        let mut losses = Vec::new();
        for _ in 0..60 {
            let loss = cross_entropy(&gpt.forward(&idx, true).unwrap(), &targets).unwrap();
            optimizer.backward_step(&loss).unwrap();
            losses.push(loss.to_scalar::<f32>().unwrap());
        }
        let last = *losses.last().unwrap();
        assert!(losses[0] > 2.0 && last < 0.05, "losses {losses:?}");
    }

    #[test]
    fn crop_block_size_keeps_the_first_positions() {
        let reference = reference();
        let (idx, _) = batch(&reference);
        let (mut gpt, varmap) = tiny_gpt2();
        let before = gpt.forward(&idx, false).unwrap();
        gpt.crop_block_size(&varmap, 8).unwrap();
        assert_eq!(gpt.config.block_size, 8);
        assert_eq!(lock(varmap.data())["wpe.weight"].dims(), &[8, 32]);
        assert_eq!(max_abs_diff(&gpt.forward(&idx, false).unwrap(), &before), 0.0);
        let too_long = Tensor::zeros((1, 9), DType::U32, &Device::Cpu).unwrap();
        assert!(gpt.forward(&too_long, false).is_err());
        assert!(gpt.crop_block_size(&varmap, 9).is_err());
    }

    #[test]
    fn generate_samples_repeatably_and_greedy_at_top_k_1() {
        let config = tiny_config(true);
        let gpt = Gpt::init(&config, &VarMap::new(), &Device::Cpu, 13).unwrap();
        let prompt = random_tokens((2, 3), config.vocab_size, 14);
        // Past block_size (8): the context slides.
        let sampled = gpt.generate(&prompt, 10, 1.0, None, 15).unwrap();
        assert_eq!(sampled.dims(), &[2, 13]);
        assert_eq!(sampled.narrow(1, 0, 3).unwrap().to_vec2::<u32>().unwrap(), prompt.to_vec2::<u32>().unwrap());
        assert!(sampled.flatten_all().unwrap().to_vec1::<u32>().unwrap().iter().all(|&id| id < 16));
        let again = gpt.generate(&prompt, 10, 1.0, None, 15).unwrap();
        assert_eq!(again.to_vec2::<u32>().unwrap(), sampled.to_vec2::<u32>().unwrap());

        let top_1 = gpt.generate(&prompt, 10, 0.8, Some(1), 16).unwrap();
        assert_eq!(
            top_1.to_vec2::<u32>().unwrap(),
            gpt.generate(&prompt, 10, 0.0, None, 17).unwrap().to_vec2::<u32>().unwrap()
        );
        let mut greedy = prompt.clone();
        for _ in 0..10 {
            let t = greedy.dim(1).unwrap();
            let context = greedy.narrow(1, t.saturating_sub(8), t.min(8)).unwrap();
            let logits = gpt.forward(&context, false).unwrap();
            let next = logits.i((.., context.dim(1).unwrap() - 1, ..)).unwrap().argmax_keepdim(1).unwrap();
            greedy = Tensor::cat(&[&greedy, &next], 1).unwrap();
        }
        assert_eq!(top_1.to_vec2::<u32>().unwrap(), greedy.to_vec2::<u32>().unwrap());
    }

    #[test]
    fn kv_cache_gives_the_logits_and_samples_of_full_recomputation() {
        for bias in [true, false] {
            let config = tiny_config(bias);
            let gpt = Gpt::init(&config, &VarMap::new(), &Device::Cpu, 21).unwrap();
            let idx = random_tokens((2, 8), config.vocab_size, 22);
            let full = gpt.forward(&idx, false).unwrap(); // (B, T, V)
            let mut cache = KvCache::default();
            // A prompt of 3 in one go, then one token at a time.
            let mut steps = vec![(0, 3)];
            steps.extend((3..8).map(|t| (t, 1)));
            for (start, len) in steps {
                let logits = gpt.forward_cached(&idx.narrow(1, start, len).unwrap(), &mut cache).unwrap();
                let expected = full.i((.., start + len - 1, ..)).unwrap();
                assert!(max_abs_diff(&logits, &expected) < 1e-5, "position {}", start + len - 1);
            }
            assert_eq!(cache.len(), 8);
            assert!(gpt.forward_cached(&idx.narrow(1, 0, 1).unwrap(), &mut cache).is_err(), "past block_size");

            let prompt = random_tokens((2, 3), config.vocab_size, 23);
            let run = |kv_cache: bool| {
                let sampling = Sampling { max_new_tokens: 12, temperature: 1.0, top_k: Some(5), kv_cache };
                let mut streamed = Vec::new();
                let mut rngs = [Rng::new(24), Rng::new(25)];
                let out = gpt
                    .generate_with(&prompt, &sampling, &mut rngs, &mut |next| {
                        streamed.push(next.to_vec());
                        Ok(())
                    })
                    .unwrap();
                (out.to_vec2::<u32>().unwrap(), streamed)
            };
            let (cached, streamed) = run(true);
            assert_eq!(cached, run(false).0);
            assert_eq!(streamed.len(), 12);
            assert_eq!(streamed[4], vec![cached[0][7], cached[1][7]]);
            // Side by side or alone, a row draws the same tokens.
            for (row, seed) in [(0, 24), (1, 25)] {
                let sampling = Sampling { max_new_tokens: 12, temperature: 1.0, top_k: Some(5), kv_cache: true };
                let alone = prompt.narrow(0, row, 1).unwrap();
                let out = gpt.generate_with(&alone, &sampling, &mut [Rng::new(seed)], &mut |_| Ok(())).unwrap();
                assert_eq!(out.to_vec2::<u32>().unwrap()[0], cached[row], "row {row}");
            }
        }
    }
}
