//! Decoding on the CPU: `decode` (`Gpt::forward_cached`: the new positions (B, T) after the
//! `past` ones the `Decoder` holds -> the logits (B, V) of the last) and `generate`
//! (`Gpt::generate_with`'s loop). A step runs the step's kernels over the new rows only
//! (`decode_step`), the keys and values of earlier positions kept in per-layer (B, block, C)
//! buffers; where the context no longer fits the block, or without the cache, it recomputes the
//! window through `forward`, keeping the last position's logits only.

use candle_core::{Result, Tensor, bail};
use rayon::prelude::*;

use super::forward::{FirstQkv, Head, forward, layer_norm_rows};
use super::matmul::{SendPtr, TASK, linear, linear_rows};
use super::params::{Params, Weights, in_vocabulary, param_slices, tokens, transposed};
use super::workspace::{Activations, Dims, Outputs};
use crate::gpt::config::GptConfig;
use crate::gpt::device::on_cpu_pool;
use crate::gpt::ops::{simd, tiles};
use crate::gpt::sampling::{Draw, NextLogits};

/// `Gpt::forward_cached` on the CPU: the logits (B, V) of the last of the new positions `idx`
/// (B, T), which follow the `past` positions the decoder holds; their keys and values join those.
pub(crate) fn decode(
    decoder: &mut Decoder,
    config: &GptConfig,
    params: &[&Tensor],
    idx: &Tensor,
    past: usize,
) -> Result<Tensor> {
    let (b, _) = idx.dims2()?;
    let ids = tokens(idx, config.vocab_size, "the input")?;
    let guards: Vec<_> = params.iter().map(|p| p.storage_and_layout()).collect();
    let p = Params::from_list(config, param_slices(&guards)?);
    let logits = on_cpu_pool(|| decode_step(decoder, &p, config, &ids, b, past))?;
    Tensor::from_slice(logits, (b, config.vocab_size), &candle_core::Device::Cpu)
}

/// `Gpt::generate_with` on the CPU: the whole loop on a thread of rayon's pool (a parallel loop
/// started there hands nothing over and allocates nothing), the parameters read once. While
/// the context fits the block, with `kv_cache`, each step decodes the new position of every
/// row; otherwise it recomputes the window of every row through the training step's forward
/// pass, keeping only the last position's logits.
pub(crate) fn generate(config: &GptConfig, params: &[&Tensor], draw: &mut Draw, kv_cache: bool) -> Result<()> {
    let guards: Vec<_> = params.iter().map(|p| p.storage_and_layout()).collect();
    let p = Params::from_list(config, param_slices(&guards)?);
    // A small model's windows spend as long copying weights in `gemm` as multiplying (K = 128):
    // its weights are transposed once here instead, for `tiles` (GPT-2's 340 MB are not, nor
    // any on a CPU without `tiles`, where nothing would read them).
    let copies = match config.num_params(false) <= SMALL_MODEL && tiles::available() {
        true => transposed(&p, config.n_embd),
        false => Vec::new(),
    };
    let p = if copies.is_empty() { p } else { p.with_copies(&copies) };
    let mut logits = Explicit {
        p,
        config,
        kv_cache,
        decoder: Decoder::default(),
        cached: 0,
        window: None,
        first: None,
        ids: Vec::new(),
    };
    on_cpu_pool(|| draw.run(&mut logits))
}

/// Decoding on the CPU (`Gpt::forward_cached`, `Gpt::generate_with`): each layer's keys and
/// values of the positions seen, and the buffers of a step, allocated at the first step (and when
/// a step brings more positions than any before): a step of one token per sequence allocates
/// nothing.
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    /// Sequences decoded side by side.
    batch: usize,
    /// Per layer (B, block_size, C): the keys, the values.
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    /// The new positions' rows: residual stream, LayerNorm output and stats, qkv, heads'
    /// outputs, a branch, the MLP's hidden layer before and after GELU.
    x: Vec<f32>,
    ln: Vec<f32>,
    stats: Vec<f32>,
    qkv: Vec<f32>,
    y: Vec<f32>,
    branch: Vec<f32>,
    fch: Vec<f32>,
    fcg: Vec<f32>,
    /// A linear layer's outputs for a few rows, turned: (O, N) (`decode_linear`).
    turned: Vec<f32>,
    /// Per (sequence, head): the attention scores of one query.
    scores: Vec<f32>,
    /// The last position of each sequence after ln_f, and its logits (B, V).
    last: Vec<f32>,
    logits: Vec<f32>,
}

/// Grows `buffer` to `len` (never shrinks: the next step reuses it).
fn at_least(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// Parameters up to which sampling keeps transposed copies of the weights (64 MiB of them).
const SMALL_MODEL: usize = 1 << 24;

/// `NextLogits` on the CPU.
struct Explicit<'a> {
    p: Params<&'a [f32]>,
    config: &'a GptConfig,
    kv_cache: bool,
    decoder: Decoder,
    /// Positions the decoder holds.
    cached: usize,
    /// A recomputed window's (B, T) and buffers (a forward pass's, for the last logits only).
    window: Option<((usize, usize), Activations)>,
    /// Layer 0's qkv for every (token, position), made at the first window where it is small.
    first: Option<Option<FirstQkv>>,
    /// The token ids of the step's positions, row after row.
    ids: Vec<u32>,
}

impl NextLogits for Explicit<'_> {
    fn next_logits(&mut self, tokens: &[u32], stride: usize, len: usize) -> Result<&[f32]> {
        let (b, block, v) = (tokens.len() / stride, self.config.block_size, self.config.vocab_size);
        let decoding = self.kv_cache && len <= block;
        let start = if decoding { self.cached } else { len.saturating_sub(block) };
        self.ids.clear();
        for row in tokens.chunks_exact(stride) {
            self.ids.extend_from_slice(&row[start..len]);
        }
        in_vocabulary(&self.ids, v, "the input")?;
        if decoding {
            let logits = decode_step(&mut self.decoder, &self.p, self.config, &self.ids, b, start)?;
            self.cached = len;
            return Ok(logits);
        }
        let t = len - start;
        if self.window.as_ref().is_none_or(|(shape, _)| *shape != (b, t)) {
            self.window = Some(((b, t), Activations::new(self.config, b, t, Outputs::LastLogits)));
        }
        let first = self.first.get_or_insert_with(|| FirstQkv::new(&self.p, self.config)).as_ref();
        let acts = &mut self.window.as_mut().expect("made above").1;
        let threads = if small_step(self.config, b * t) { 1 } else { rayon::current_num_threads() };
        let dims = Dims { b, t, c: self.config.n_embd, h: self.config.n_head, v, threads, decoding: true };
        forward(acts, &self.p, &dims, &self.ids, Head::LastLogits(first), None);
        Ok(&acts.logits[..b * v])
    }
}

/// Whether a decoding step over `rows` positions is one task: handing a small step's dozens of
/// short loops (the CPU recipe's model, a token for each of a few sequences: ~0.01 GFLOP) to a
/// second thread cost more than they took.
fn small_step(config: &GptConfig, rows: usize) -> bool {
    config.num_params(false) * rows < 1 << 27
}

/// The logits (B, V) of the last of the new positions `ids` (B rows of T, each in the
/// vocabulary), which follow the `past` positions the decoder holds; their keys and values join
/// those.
fn decode_step<'d>(
    d: &'d mut Decoder,
    p: &Params<&[f32]>,
    config: &GptConfig,
    ids: &[u32],
    b: usize,
    past: usize,
) -> Result<&'d [f32]> {
    let (c, heads, block, v) = (config.n_embd, config.n_head, config.block_size, config.vocab_size);
    let t = ids.len() / b;
    if past + t > block {
        bail!("cannot forward a sequence of length {}, block size is only {block}", past + t)
    }
    if d.batch != b || d.keys.len() != config.n_layer {
        if past != 0 {
            bail!("a decoder of {} sequences given {b}", d.batch)
        }
        d.batch = b;
        d.keys = (0..config.n_layer).map(|_| vec![0f32; b * block * c]).collect();
        d.values = (0..config.n_layer).map(|_| vec![0f32; b * block * c]).collect();
    }
    let n = b * t;
    let hs = c / heads;
    let scale = 1.0 / (hs as f32).sqrt();
    let task = if small_step(config, n) { usize::MAX } else { TASK };
    let x = at_least(&mut d.x, n * c);
    for (row, x) in x.chunks_exact_mut(c).enumerate() {
        let (token, pos) = (ids[row] as usize, past + row % t);
        simd::add(x, &p.wte[token * c..][..c], &p.wpe[pos * c..][..c]);
    }
    let (ln, stats) = (at_least(&mut d.ln, n * c), at_least(&mut d.stats, 2 * n));
    let (qkv, y) = (at_least(&mut d.qkv, 3 * n * c), at_least(&mut d.y, n * c));
    let (branch, scores) = (at_least(&mut d.branch, n * c), at_least(&mut d.scores, b * heads * block));
    let (fch, fcg) = (at_least(&mut d.fch, 4 * n * c), at_least(&mut d.fcg, 4 * n * c));
    let turned = &mut d.turned;
    for (l, layer) in p.h.iter().enumerate() {
        layer_norm_rows(ln, stats, x, &layer.ln_1, c);
        decode_linear(qkv, turned, ln, &layer.c_attn, c, 3 * c, task);
        let (keys, values) = (&mut d.keys[l], &mut d.values[l]);
        for (row, qkv) in qkv.chunks_exact(3 * c).enumerate() {
            let at = ((row / t) * block + past + row % t) * c;
            keys[at..][..c].copy_from_slice(&qkv[c..2 * c]);
            values[at..][..c].copy_from_slice(&qkv[2 * c..]);
        }
        // One task per (sequence, head), each over its queries.
        let (keys, values, qkv_rows) = (&*keys, &*values, &*qkv);
        let y_rows = SendPtr(y.as_mut_ptr());
        let work = (past + t) * t * c * b;
        let pair = |(pair, scores): (usize, &mut [f32])| {
            let (seq, h) = (pair / heads, pair % heads);
            let (keys, values) = (&keys[seq * block * c + h * hs..], &values[seq * block * c + h * hs..]);
            for i in 0..t {
                let row = seq * t + i;
                let q = &qkv_rows[row * 3 * c + h * hs..][..hs];
                // SAFETY: this pair's columns of its sequence's rows of y are its own.
                let out = unsafe { std::slice::from_raw_parts_mut(y_rows.get().add(row * c + h * hs), hs) };
                simd::attend(out, &mut scores[..past + i + 1], q, keys, values, c, scale);
            }
        };
        match work < task.saturating_mul(4) {
            true => scores.chunks_mut(block).enumerate().for_each(pair),
            false => scores.par_chunks_mut(block).enumerate().for_each(pair),
        }
        decode_linear(branch, turned, y, &layer.attn_proj, c, c, task);
        simd::add_assign(x, branch);
        layer_norm_rows(ln, stats, x, &layer.ln_2, c);
        decode_linear(fch, turned, ln, &layer.c_fc, c, 4 * c, task);
        simd::gelu(fcg, fch);
        decode_linear(branch, turned, fcg, &layer.mlp_proj, 4 * c, c, task);
        simd::add_assign(x, branch);
    }
    let last = at_least(&mut d.last, b * c);
    for (seq, last) in last.chunks_exact_mut(c).enumerate() {
        last.copy_from_slice(&x[(seq * t + t - 1) * c..][..c]);
    }
    let (ln, stats) = (&mut ln[..b * c], &mut stats[..2 * b]);
    layer_norm_rows(ln, stats, last, &p.ln_f, c);
    let logits = at_least(&mut d.logits, b * v);
    decode_linear(logits, turned, ln, &Weights { w: p.wte, b: None, t: None }, c, v, task);
    Ok(logits)
}

/// out (N, O) = input (N, I) · weightᵀ + bias, the weight (O, I), in tasks of about `task`
/// elements (`usize::MAX`: one task).
fn decode_linear(
    out: &mut [f32],
    turned: &mut Vec<f32>,
    input: &[f32],
    layer: &Weights<&[f32]>,
    i: usize,
    o: usize,
    task: usize,
) {
    let n = input.len() / i;
    assert!(out.len() == n * o && layer.w.len() == o * i);
    if n > 16 {
        // A prompt or a window: `gemm`.
        if task == usize::MAX {
            return linear_rows(out, input, layer, i, o);
        }
        return linear(out, input, layer, i, o);
    }
    // A row per sequence: each row of the weight dotted with every input row, so that the weight
    // is read once, in order, for all of them (`gemm` would pack, copy, all of it first), into
    // `turned` (O, N); its rows split between the tasks. Each output is the same dot product
    // whatever the other rows.
    let turned = at_least(turned, o * n);
    let rows = (task / i).max(64);
    turned
        .par_chunks_mut(rows * n)
        .zip(layer.w.par_chunks(rows * i))
        .for_each(|(out, w)| simd::matvecs(out, input, w, i));
    for (row, out) in out.chunks_exact_mut(o).enumerate() {
        for (r, out) in out.iter_mut().enumerate() {
            let dot = turned[r * n + row];
            *out = layer.b.map_or(dot, |bias| bias[r] + dot);
        }
    }
}
