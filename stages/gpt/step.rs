//! The GPT's training step on the CPU, written out in llm.c's shape: the forward pass keeps its
//! activations in buffers allocated once per batch shape, the backward pass walks the layers in
//! reverse with every weight gradient accumulated straight into its sum (matmuls with beta = 1,
//! so micro-batches add up for free), and attention runs as per-head matmuls. No tensor is
//! allocated per op (only a few per-thread partial sums per layer) and no gradient is added
//! twice.
//!
//! Why: through candle's autograd a CPU step of nanoGPT's laptop recipe took 2.4× PyTorch's
//! time, most of it not in the matmuls but around them: a new tensor per op, a `zeros_like` and
//! an `add` per gradient contribution, attention by scalar loops (issue 15, `cargo bench -p
//! nanoflow-stages --bench model`). The model stays `model.rs`'s: this file reads its
//! parameters (`Gpt::parameters`) and computes what `Gpt::forward` + `cross_entropy` +
//! `backward` compute, which the tests check against candle's autograd and against
//! `transformers`, with the same dropout masks (`DropoutMask`). Other devices and dtypes train
//! through candle's autograd, where the time is in the kernels.
//!
//! Decoding (`Decoder`, behind `Gpt::forward_cached` on the CPU) runs the same kernels over the
//! new positions only, the keys and values of earlier ones kept in per-layer buffers.
//!
//! Shapes: B sequences of T tokens, N = B·T rows, C channels, H heads of hs = C / H, F = 4C,
//! V the vocabulary. Every matrix is row-major float32.

use std::ops::Range;

use candle_core::{Result, Storage, Tensor, Var, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::gpt::device::on_cpu_pool;
use crate::gpt::model::{Draw, Gpt, GptConfig, LAYER_NORM_EPS, NextLogits};
use crate::gpt::ops::{simd, tiles};
use crate::gpt::rng::DropoutMask;

/// The step's buffers for one batch shape, and the gradient sums (one per `Gpt::parameters`).
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    shape: (usize, usize),
    acts: Activations,
    grads: Vec<Vec<f32>>,
}

/// What the forward pass keeps for the backward pass, and the backward pass's scratch.
#[derive(Debug, Default)]
struct Activations {
    /// The residual stream: `res[0]` the embeddings, `res[l + 1]` layer l's output (N, C).
    res: Vec<Vec<f32>>,
    /// Layer l's residual stream after its attention (N, C).
    mid: Vec<Vec<f32>>,
    /// LayerNorm outputs (N, C) and their (mean, 1/std) per row (N, 2).
    ln1: Vec<Vec<f32>>,
    ln1_stats: Vec<Vec<f32>>,
    ln2: Vec<Vec<f32>>,
    ln2_stats: Vec<Vec<f32>>,
    /// The packed queries, keys and values (N, 3C), the heads' outputs side by side (N, C) and
    /// each query's log-sum-exp of its scaled scores (B, H, T).
    qkv: Vec<Vec<f32>>,
    atty: Vec<Vec<f32>>,
    lse: Vec<Vec<f32>>,
    /// The MLP's hidden layer before and after GELU, and the tanh inside GELU (N, F; kept for a
    /// backward pass only).
    fch: Vec<Vec<f32>>,
    fcg: Vec<Vec<f32>>,
    fct: Vec<Vec<f32>>,
    lnf: Vec<f32>,
    lnf_stats: Vec<f32>,
    /// Logits (N, V), overwritten by their gradient.
    logits: Vec<f32>,
    losses: Vec<f32>,
    /// A projection's output before dropout and the residual add (N, C).
    branch: Vec<f32>,
    /// Backward: the residual stream's gradient, a branch's gradient, a LayerNorm output's
    /// gradient (N, C); qkv's (N, 3C), the heads' outputs' (N, C), the hidden layer's (N, F).
    dres: Vec<f32>,
    dbranch: Vec<f32>,
    dln: Vec<f32>,
    dqkv: Vec<f32>,
    datty: Vec<f32>,
    dfc: Vec<f32>,
    /// Per-thread (T, T) scores and their gradients.
    scratch: Vec<f32>,
}

/// What a forward pass is for: a loss to take the gradient of, a loss alone, or the logits of
/// each sequence's last position (decoding).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Outputs {
    Backward,
    Loss,
    LastLogits,
}

impl Activations {
    fn new(config: &GptConfig, b: usize, t: usize, outputs: Outputs) -> Activations {
        let (n, c) = (b * t, config.n_embd);
        let backward = outputs == Outputs::Backward;
        let logits_rows = if outputs == Outputs::LastLogits { b } else { n };
        // A forward pass alone (a loss) keeps nothing for later: one layer's buffers, reused,
        // and two for the residual stream (GPT-2 at 8 x 1024: 1.7 GB of logits and 0.5 GB more
        // instead of 7 GB).
        let kept = if backward { config.n_layer } else { 1 };
        let layers = |width: usize| (0..kept).map(|_| vec![0f32; width]).collect::<Vec<_>>();
        let grad = |width: usize| if backward { vec![0f32; width] } else { Vec::new() };
        Activations {
            res: (0..kept + 1).map(|_| vec![0f32; n * c]).collect(),
            mid: layers(n * c),
            ln1: layers(n * c),
            ln1_stats: layers(2 * n),
            ln2: layers(n * c),
            ln2_stats: layers(2 * n),
            qkv: layers(3 * n * c),
            atty: layers(n * c),
            lse: layers(b * config.n_head * t),
            fch: layers(4 * n * c),
            fcg: layers(4 * n * c),
            fct: layers(if backward { 4 * n * c } else { 0 }),
            lnf: vec![0f32; n * c],
            lnf_stats: vec![0f32; 2 * n],
            logits: vec![0f32; logits_rows * config.vocab_size],
            losses: vec![0f32; n],
            branch: vec![0f32; n * c],
            dres: grad(n * c),
            dbranch: grad(n * c),
            dln: grad(n * c),
            dqkv: grad(3 * n * c),
            datty: grad(n * c),
            dfc: grad(4 * n * c),
            scratch: vec![0f32; rayon::current_num_threads() * 3 * t * t],
        }
    }

    fn has_backward(&self) -> bool {
        !self.dres.is_empty()
    }

    /// Where layer l's activations are: (its buffers' index, its input's and its output's in
    /// `res`). Every layer its own with a backward pass to come; otherwise one set, reused, and
    /// two residual buffers in turn.
    fn slots(&self, l: usize) -> (usize, usize, usize) {
        match self.has_backward() {
            true => (l, l, l + 1),
            false => (0, l % 2, (l + 1) % 2),
        }
    }
}

/// `read` of `v` to read and `write` to write (two different elements).
fn read_write<T>(v: &mut [T], read: usize, write: usize) -> (&T, &mut T) {
    assert_ne!(read, write);
    if read < write {
        let (before, after) = v.split_at_mut(write);
        (&before[read], &mut after[0])
    } else {
        let (before, after) = v.split_at_mut(read);
        (&after[0], &mut before[write])
    }
}

/// A layer's weights (or their gradients): a weight and, in a model with biases, a bias.
struct Weights<T> {
    w: T,
    b: Option<T>,
    /// A linear layer's weight (O, I) transposed to (I, O), where a copy was made: `tiles`
    /// reads it as it lies, where `gemm` copies (I, O) out of the weight at every call.
    t: Option<T>,
}

impl<T> Weights<T> {
    /// The next weight of a list, and its bias if the model has biases.
    fn next(bias: bool, next: &mut impl FnMut() -> T) -> Weights<T> {
        let w = next();
        Weights { w, b: bias.then(next), t: None }
    }
}

struct Layer<T> {
    ln_1: Weights<T>,
    c_attn: Weights<T>,
    attn_proj: Weights<T>,
    ln_2: Weights<T>,
    c_fc: Weights<T>,
    mlp_proj: Weights<T>,
}

/// The model's parameters (or their gradients), in `Gpt::parameters` order.
struct Params<T> {
    wte: T,
    wpe: T,
    h: Vec<Layer<T>>,
    ln_f: Weights<T>,
}

impl<T> Params<T> {
    fn from_list(config: &GptConfig, list: impl IntoIterator<Item = T>) -> Params<T> {
        let mut list = list.into_iter();
        let mut next = || list.next().expect("a tensor per parameter");
        let (wte, wpe) = (next(), next());
        let bias = config.bias;
        let h = (0..config.n_layer)
            .map(|_| Layer {
                ln_1: Weights::next(bias, &mut next),
                c_attn: Weights::next(bias, &mut next),
                attn_proj: Weights::next(bias, &mut next),
                ln_2: Weights::next(bias, &mut next),
                c_fc: Weights::next(bias, &mut next),
                mlp_proj: Weights::next(bias, &mut next),
            })
            .collect();
        let ln_f = Weights::next(bias, &mut next);
        Params { wte, wpe, h, ln_f }
    }
}

/// The contiguous float32 data of a CPU tensor's storage.
fn data<'a>((storage, layout): &'a (candle_core::StorageRef<'_>, &candle_core::Layout)) -> Result<&'a [f32]> {
    match (&**storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => Ok(&cpu.as_slice::<f32>()?[start..end]),
        _ => bail!("the explicit CPU step needs contiguous float32 CPU parameters"),
    }
}

/// The (B, T) u32 token ids of a CPU tensor, checked against the vocabulary.
fn tokens(ids: &Tensor, vocab: usize, what: &str) -> Result<Vec<u32>> {
    let ids = ids.flatten_all()?.to_vec1::<u32>()?;
    in_vocabulary(&ids, vocab, what)?;
    Ok(ids)
}

fn in_vocabulary(ids: &[u32], vocab: usize, what: &str) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(&bad) => bail!("{what}: token {bad} is outside the vocabulary of {vocab}"),
        None => Ok(()),
    }
}

/// One micro-batch: the mean loss of `idx` against `targets`, and with `backward` = (weight,
/// dropout seed) its gradient times `weight` added to the workspace's sums.
pub(crate) fn run(
    workspace: &mut Option<Workspace>,
    model: &Gpt,
    idx: &Tensor,
    targets: &Tensor,
    backward: Option<(f32, u64)>,
) -> Result<f32> {
    let config = &model.config;
    let (b, t) = idx.dims2()?;
    if targets.dims2()? != (b, t) || t > config.block_size {
        bail!(
            "a batch of {:?} tokens against targets {:?}, block size {}",
            idx.shape(),
            targets.shape(),
            config.block_size
        )
    }
    let x = tokens(idx, config.vocab_size, "the input")?;
    let y = tokens(targets, config.vocab_size, "cross-entropy")?;
    let params = model.parameters();
    let workspace = workspace.get_or_insert_with(Workspace::default);
    // The gradient sums, at the first backward pass (a model that only evaluates needs none).
    if backward.is_some() && workspace.grads.is_empty() {
        workspace.grads = params.iter().map(|p| vec![0f32; p.elem_count()]).collect();
    }
    let with_backward = backward.is_some() || workspace.acts.has_backward();
    if workspace.shape != (b, t) || with_backward != workspace.acts.has_backward() {
        let outputs = if with_backward { Outputs::Backward } else { Outputs::Loss };
        workspace.acts = Activations::new(config, b, t, outputs);
        workspace.shape = (b, t);
    }
    let guards: Vec<_> = params.iter().map(|p| p.storage_and_layout()).collect();
    let p = Params::from_list(config, param_slices(&guards)?);
    let threads = rayon::current_num_threads();
    let dims = Dims { b, t, c: config.n_embd, h: config.n_head, v: config.vocab_size, threads, decoding: false };
    let dropout = match backward {
        Some((_, seed)) if config.dropout > 0.0 => Some((config.dropout as f32, seed)),
        _ => None,
    };
    let (acts, grads) = (&mut workspace.acts, &mut workspace.grads);
    Ok(on_cpu_pool(|| {
        let loss = forward(acts, &p, &dims, &x, Head::Loss(&y), dropout);
        if let Some((weight, _)) = backward {
            let mut grads = Params::from_list(config, grads.iter_mut().map(Vec::as_mut_slice));
            backward_pass(acts, &p, &mut grads, &dims, &x, &y, weight, dropout);
        }
        loss
    }))
}

/// The sums `run` accumulated, one tensor per var (matched by identity to the model's
/// parameters; zeros for others, and for all before any backward pass), the sums set back to
/// zero.
pub(crate) fn take_gradients<'a>(
    workspace: &mut Option<Workspace>,
    model: &Gpt,
    vars: impl Iterator<Item = &'a Var>,
) -> Result<Vec<Tensor>> {
    let params = model.parameters();
    let grads = &mut workspace.get_or_insert_with(Workspace::default).grads;
    let summed = !grads.is_empty();
    let index = |var: &Var| params.iter().position(|p| p.id() == var.as_tensor().id()).filter(|_| summed);
    vars.map(|var| match index(var) {
        Some(i) => {
            let grad = Tensor::from_slice(&grads[i], var.shape(), var.device())?;
            grads[i].par_chunks_mut(1 << 16).for_each(|chunk| chunk.fill(0.0));
            Ok(grad)
        }
        None => var.zeros_like(),
    })
    .collect()
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

/// The model's parameters as slices, for as long as `guards` live.
fn param_slices<'a>(guards: &'a [(candle_core::StorageRef<'_>, &candle_core::Layout)]) -> Result<Vec<&'a [f32]>> {
    guards.iter().map(data).collect()
}

/// `Gpt::forward_cached` on the CPU: the logits (B, V) of the last of the new positions `idx`
/// (B, T), which follow the `past` positions the decoder holds; their keys and values join those.
pub(crate) fn decode(decoder: &mut Decoder, model: &Gpt, idx: &Tensor, past: usize) -> Result<Tensor> {
    let (b, _) = idx.dims2()?;
    let ids = tokens(idx, model.config.vocab_size, "the input")?;
    let params = model.parameters();
    let guards: Vec<_> = params.iter().map(|p| p.storage_and_layout()).collect();
    let p = Params::from_list(&model.config, param_slices(&guards)?);
    let logits = on_cpu_pool(|| decode_step(decoder, &p, &model.config, &ids, b, past))?;
    Tensor::from_slice(logits, (b, model.config.vocab_size), &candle_core::Device::Cpu)
}

/// `Gpt::generate_with` on the CPU: the whole loop on a thread of rayon's pool (a parallel loop
/// started there hands nothing over and allocates nothing), the parameters read once. While
/// the context fits the block, with `kv_cache`, each step decodes the new position of every
/// row; otherwise it recomputes the window of every row through the training step's forward
/// pass, keeping only the last position's logits.
pub(crate) fn generate(model: &Gpt, draw: &mut Draw, kv_cache: bool) -> Result<()> {
    let params = model.parameters();
    let guards: Vec<_> = params.iter().map(|p| p.storage_and_layout()).collect();
    let p = Params::from_list(&model.config, param_slices(&guards)?);
    let config = &model.config;
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

/// Layer 0's qkv (3C) for every (token, position), row token·block + position: it depends on
/// those two alone (LayerNorm of their embeddings' sum, times c_attn), so a window's first
/// layer is looked up, not computed (of the CPU recipe's window, 8% of the multiply-adds), with
/// the same bits.
struct FirstQkv {
    rows: Vec<f32>,
    block: usize,
}

/// Floats up to which `FirstQkv` makes its table (64 MiB; the CPU recipe's is 6.4 MB, GPT-2's
/// would be 475 GB).
const FIRST_QKV_MAX: usize = 1 << 24;

impl FirstQkv {
    fn new(p: &Params<&[f32]>, config: &GptConfig) -> Option<FirstQkv> {
        let (v, block, c) = (config.vocab_size, config.block_size, config.n_embd);
        let n = v.checked_mul(block)?;
        if n.checked_mul(3 * c)? > FIRST_QKV_MAX {
            return None;
        }
        let mut x = vec![0f32; n * c];
        for (row, x) in x.chunks_exact_mut(c).enumerate() {
            let (token, pos) = (row / block, row % block);
            simd::add(x, &p.wte[token * c..][..c], &p.wpe[pos * c..][..c]);
        }
        let (mut ln, mut stats) = (vec![0f32; n * c], vec![0f32; 2 * n]);
        layer_norm_rows(&mut ln, &mut stats, &x, &p.h[0].ln_1, c);
        let mut rows = vec![0f32; n * 3 * c];
        linear(&mut rows, &ln, &p.h[0].c_attn, c, 3 * c);
        Some(FirstQkv { rows, block })
    }

    /// The qkv (`width` = 3C) of `token` at `pos`.
    fn get(&self, token: u32, pos: usize, width: usize) -> &[f32] {
        &self.rows[(token as usize * self.block + pos) * width..][..width]
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

struct Dims {
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    v: usize,
    /// Threads to split the rows between.
    threads: usize,
    /// A decoding window's forward pass (no backward pass to follow).
    decoding: bool,
}

impl Dims {
    fn n(&self) -> usize {
        self.b * self.t
    }
}

/// The dropout mask of `site` under `dropout` = (p, seed), if training with dropout.
fn mask(dropout: Option<(f32, u64)>, site: usize) -> Option<DropoutMask> {
    dropout.map(|(p, seed)| DropoutMask::new(seed, site as u64, p))
}

/// The rows split into one block per thread.
fn row_blocks(n: usize, threads: usize) -> Vec<Range<usize>> {
    let threads = threads.clamp(1, n.max(1));
    let size = n.div_ceil(threads);
    (0..threads).map(|i| i * size..((i + 1) * size).min(n)).filter(|rows| !rows.is_empty()).collect()
}

/// `task` on each block of rows, in parallel, and what each returned. A layer's row-wise chain
/// (LayerNorm, matmuls by rows, GELU, residual adds) runs as one such region: one hand-off to
/// the other threads instead of one per op.
fn in_row_blocks<R: Send>(d: &Dims, n: usize, task: impl Fn(Range<usize>) -> R + Sync) -> Vec<R> {
    row_blocks(n, d.threads).into_par_iter().map(&task).collect()
}

/// A buffer whose rows the tasks of `in_row_blocks` write, each task its own block.
#[derive(Clone, Copy)]
struct Rows {
    ptr: SendPtr,
    width: usize,
    len: usize,
}

impl Rows {
    fn of(buffer: &mut [f32], width: usize) -> Rows {
        Rows { ptr: SendPtr(buffer.as_mut_ptr()), width, len: buffer.len() }
    }

    /// The rows `rows`, to write.
    ///
    /// # Safety
    /// Only the task given these rows (`in_row_blocks` gives out disjoint blocks) may hold them,
    /// the buffer must outlive the use, and nothing else may borrow it meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get<'a>(&self, rows: &Range<usize>) -> &'a mut [f32] {
        assert!(rows.end * self.width <= self.len);
        unsafe { std::slice::from_raw_parts_mut(self.ptr.get().add(rows.start * self.width), rows.len() * self.width) }
    }
}

/// Rows `rows` of a row-major buffer of `width`.
fn rows_of<'a>(buffer: &'a [f32], width: usize, rows: &Range<usize>) -> &'a [f32] {
    &buffer[rows.start * width..rows.end * width]
}

/// What `forward` ends with.
#[derive(Clone, Copy)]
enum Head<'a> {
    /// The mean cross-entropy against these targets (N), returned, with each row's logits kept.
    Loss(&'a [u32]),
    /// The logits of each sequence's last position only, in `logits`' first B rows; layer 0's
    /// qkv from the table where there is one.
    LastLogits(Option<&'a FirstQkv>),
}

/// The forward pass over (B, T) tokens `x`: the activations into `a`, then `head`.
fn forward(
    a: &mut Activations,
    p: &Params<&[f32]>,
    d: &Dims,
    x: &[u32],
    head: Head,
    dropout: Option<(f32, u64)>,
) -> f32 {
    let (n, t, c, f) = (d.n(), d.t, d.c, 4 * d.c);
    // Token and position embeddings, then dropout.
    let embed_mask = mask(dropout, 0);
    let res0 = Rows::of(&mut a.res[0], c);
    in_row_blocks(d, n, |rows| {
        // SAFETY: each block's rows are its own (and so below, for every `Rows`).
        let out = unsafe { res0.get(&rows) };
        for (row, out) in rows.clone().zip(out.chunks_exact_mut(c)) {
            let (token, pos) = (x[row] as usize, row % t);
            let (wte, wpe) = (&p.wte[token * c..][..c], &p.wpe[pos * c..][..c]);
            simd::add(out, wte, wpe);
            if let Some(mask) = &embed_mask {
                out.iter_mut().enumerate().for_each(|(i, out)| *out *= mask.factor(row * c + i));
            }
        }
    });
    for (l, layer) in p.h.iter().enumerate() {
        let (k, input, output) = a.slots(l);
        let (ln1, stats1, qkv) =
            (Rows::of(&mut a.ln1[k], c), Rows::of(&mut a.ln1_stats[k], 2), Rows::of(&mut a.qkv[k], 3 * c));
        let res = &a.res[input];
        let last = l + 1 == p.h.len();
        let table = match head {
            Head::LastLogits(Some(table)) if l == 0 => Some(table),
            _ => None,
        };
        in_row_blocks(d, n, |rows| unsafe {
            match (table, head) {
                (Some(table), _) => {
                    for (row, out) in rows.clone().zip(qkv.get(&rows).chunks_exact_mut(3 * c)) {
                        out.copy_from_slice(table.get(x[row], row % t, 3 * c));
                    }
                }
                // Decoding's last layer: keys and values at every position, the query at each
                // sequence's last (`last_queries` reads no other).
                (None, Head::LastLogits(_)) if last => {
                    layer_norm_rows(ln1.get(&rows), stats1.get(&rows), rows_of(res, c, &rows), &layer.ln_1, c);
                    linear_columns(qkv.get(&rows), ln1.get(&rows), &layer.c_attn, c, 3 * c, c..3 * c);
                    for row in rows.clone().filter(|row| row % t == t - 1) {
                        let one = row..row + 1;
                        linear_columns(qkv.get(&one), ln1.get(&one), &layer.c_attn, c, 3 * c, 0..c);
                    }
                }
                _ => {
                    layer_norm_rows(ln1.get(&rows), stats1.get(&rows), rows_of(res, c, &rows), &layer.ln_1, c);
                    linear_rows(qkv.get(&rows), ln1.get(&rows), &layer.c_attn, c, 3 * c);
                }
            }
        });
        match head {
            // Nothing reads the last layer's other positions.
            Head::LastLogits(_) if last => last_queries(&mut a.atty[k], &mut a.scratch, &a.qkv[k], d),
            _ => attention(&mut a.atty[k], &mut a.lse[k], &mut a.scratch, &a.qkv[k], d, mask(dropout, 3 * l + 1)),
        }
        let (branch, mid) = (Rows::of(&mut a.branch, c), Rows::of(&mut a.mid[k], c));
        let (ln2, stats2) = (Rows::of(&mut a.ln2[k], c), Rows::of(&mut a.ln2_stats[k], 2));
        let (fch, fcg, fct) = (Rows::of(&mut a.fch[k], f), Rows::of(&mut a.fcg[k], f), Rows::of(&mut a.fct[k], f));
        // Only a backward pass needs GELU's tanh (the same GELU either way, bit for bit).
        let keep_tanh = !a.fct[k].is_empty();
        let (res, out) = read_write(&mut a.res, input, output);
        let out = Rows::of(out, c);
        let atty = &a.atty[k];
        let (attn_mask, mlp_mask) = (mask(dropout, 3 * l + 2), mask(dropout, 3 * l + 3));
        let chain = |rows: Range<usize>| unsafe {
            let first = rows.start * c;
            linear_rows(branch.get(&rows), rows_of(atty, c, &rows), &layer.attn_proj, c, c);
            residual(mid.get(&rows), rows_of(res, c, &rows), branch.get(&rows), attn_mask, first);
            layer_norm_rows(ln2.get(&rows), stats2.get(&rows), mid.get(&rows), &layer.ln_2, c);
            linear_rows(fch.get(&rows), ln2.get(&rows), &layer.c_fc, c, f);
            match keep_tanh {
                true => simd::gelu_keeping_tanh(fcg.get(&rows), fct.get(&rows), fch.get(&rows)),
                false => simd::gelu(fcg.get(&rows), fch.get(&rows)),
            }
            linear_rows(branch.get(&rows), fcg.get(&rows), &layer.mlp_proj, f, c);
            residual(out.get(&rows), mid.get(&rows), branch.get(&rows), mlp_mask, first);
        };
        match head {
            // Decoding needs the last layer's output at each sequence's last position only (of
            // the CPU recipe's 4 layers that skips a fifth of the work).
            Head::LastLogits(_) if last => {
                in_row_blocks(d, d.b, |seqs| seqs.for_each(|seq| chain(seq * t + t - 1..seq * t + t)));
            }
            _ => {
                in_row_blocks(d, n, chain);
            }
        }
    }
    let (lnf, stats, logits) = (Rows::of(&mut a.lnf, c), Rows::of(&mut a.lnf_stats, 2), Rows::of(&mut a.logits, d.v));
    let (losses, last) = (Rows::of(&mut a.losses, 1), &a.res[a.slots(p.h.len() - 1).2]);
    let wte = Weights { w: p.wte, b: None, t: None };
    let y = match head {
        Head::Loss(y) => y,
        Head::LastLogits(_) => {
            in_row_blocks(d, d.b, |seqs| unsafe {
                for seq in seqs {
                    let (row, logits) = (seq * t + t - 1..seq * t + t, logits.get(&(seq..seq + 1)));
                    layer_norm_rows(lnf.get(&row), stats.get(&row), rows_of(last, c, &row), &p.ln_f, c);
                    linear_rows(logits, lnf.get(&row), &wte, c, d.v);
                }
            });
            return f32::NAN;
        }
    };
    let sums = in_row_blocks(d, n, |rows| unsafe {
        layer_norm_rows(lnf.get(&rows), stats.get(&rows), rows_of(last, c, &rows), &p.ln_f, c);
        linear_rows(logits.get(&rows), lnf.get(&rows), &wte, c, d.v);
        let losses = losses.get(&rows);
        for ((loss, row), &target) in losses.iter_mut().zip(logits.get(&rows).chunks_exact(d.v)).zip(&y[rows.clone()]) {
            *loss = simd::cross_entropy(row, target as usize);
        }
        losses.iter().map(|&l| l as f64).sum::<f64>()
    });
    (sums.iter().sum::<f64>() / n as f64) as f32
}

#[allow(clippy::too_many_arguments)]
fn backward_pass(
    a: &mut Activations,
    p: &Params<&[f32]>,
    g: &mut Params<&mut [f32]>,
    d: &Dims,
    x: &[u32],
    y: &[u32],
    weight: f32,
    dropout: Option<(f32, u64)>,
) {
    let (n, t, c, f, v) = (d.n(), d.t, d.c, 4 * d.c, d.v);
    // The loss's gradient over the logits, in their place: (softmax - one_hot) · weight / N;
    // then through the output layer and ln_f.
    let per_row = weight / n as f32;
    let (logits, dln, dres) = (Rows::of(&mut a.logits, v), Rows::of(&mut a.dln, c), Rows::of(&mut a.dres, c));
    let (last, stats) = (&a.res[p.h.len()], &a.lnf_stats);
    let partials = in_row_blocks(d, n, |rows| unsafe {
        let logits = logits.get(&rows);
        for (row, &target) in logits.chunks_exact_mut(v).zip(&y[rows.clone()]) {
            simd::cross_entropy_backward(row, target as usize, per_row);
        }
        dinput_rows(dln.get(&rows), logits, p.wte, c, v);
        let dres = dres.get(&rows);
        dres.fill(0.0);
        let mut partial = Partial::new(&[c, c, c]);
        layer_norm_backward_rows(
            dres,
            &mut partial,
            dln.get(&rows),
            rows_of(last, c, &rows),
            rows_of(stats, 2, &rows),
            &p.ln_f,
            c,
        );
        partial
    });
    add_partials(partials, &mut [Some(&mut *g.ln_f.w), g.ln_f.b.as_deref_mut()]);
    weight_gradient(g.wte, &a.logits, &a.lnf, c, v);
    for l in (0..p.h.len()).rev() {
        let (layer, grads) = (&p.h[l], &mut g.h[l]);
        // The MLP branch: to its input and through ln_2 into the residual stream's gradient.
        let (dbranch, dfc, dln, dres) =
            (Rows::of(&mut a.dbranch, c), Rows::of(&mut a.dfc, f), Rows::of(&mut a.dln, c), Rows::of(&mut a.dres, c));
        let (fch, fct, ln2_stats, mid) = (&a.fch[l], &a.fct[l], &a.ln2_stats[l], &a.mid[l]);
        let mlp_mask = mask(dropout, 3 * l + 3);
        let partials = in_row_blocks(d, n, |rows| unsafe {
            let mut partial = Partial::new(&[c, c, c, c, f]); // ln_2 w, b, scratch; c_proj b; c_fc b
            let dbranch = dbranch.get(&rows);
            dropout_rows(dbranch, dres.get(&rows), mlp_mask, rows.start * c);
            column_sums(partial.part(3), dbranch, c);
            dinput_rows(dfc.get(&rows), dbranch, layer.mlp_proj.w, f, c);
            simd::gelu_backward(dfc.get(&rows), rows_of(fch, f, &rows), rows_of(fct, f, &rows));
            column_sums(partial.part(4), dfc.get(&rows), f);
            dinput_rows(dln.get(&rows), dfc.get(&rows), layer.c_fc.w, c, f);
            let (x, stats) = (rows_of(mid, c, &rows), rows_of(ln2_stats, 2, &rows));
            layer_norm_backward_rows(dres.get(&rows), &mut partial, dln.get(&rows), x, stats, &layer.ln_2, c);
            partial
        });
        add_partials(
            partials,
            &mut [
                Some(&mut *grads.ln_2.w),
                grads.ln_2.b.as_deref_mut(),
                None,
                grads.mlp_proj.b.as_deref_mut(),
                grads.c_fc.b.as_deref_mut(),
            ],
        );
        weight_gradient(grads.mlp_proj.w, &a.dbranch, &a.fcg[l], f, c);
        weight_gradient(grads.c_fc.w, &a.dfc, &a.ln2[l], c, f);
        // The attention branch: its projection, the heads, qkv, and through ln_1.
        let (dbranch, datty, dres) = (Rows::of(&mut a.dbranch, c), Rows::of(&mut a.datty, c), Rows::of(&mut a.dres, c));
        let attn_mask = mask(dropout, 3 * l + 2);
        let partials = in_row_blocks(d, n, |rows| unsafe {
            let mut partial = Partial::new(&[c]);
            let dbranch = dbranch.get(&rows);
            dropout_rows(dbranch, dres.get(&rows), attn_mask, rows.start * c);
            column_sums(partial.part(0), dbranch, c);
            dinput_rows(datty.get(&rows), dbranch, layer.attn_proj.w, c, c);
            partial
        });
        add_partials(partials, &mut [grads.attn_proj.b.as_deref_mut()]);
        weight_gradient(grads.attn_proj.w, &a.dbranch, &a.atty[l], c, c);
        let attention_mask = mask(dropout, 3 * l + 1);
        attention_backward(&mut a.dqkv, &mut a.scratch, &a.datty, &a.qkv[l], &a.lse[l], d, attention_mask);
        let (dqkv, dln, dres) = (Rows::of(&mut a.dqkv, 3 * c), Rows::of(&mut a.dln, c), Rows::of(&mut a.dres, c));
        let (res, ln1_stats) = (&a.res[l], &a.ln1_stats[l]);
        let partials = in_row_blocks(d, n, |rows| unsafe {
            let mut partial = Partial::new(&[c, c, c, 3 * c]); // ln_1 w, b, scratch; c_attn b
            column_sums(partial.part(3), dqkv.get(&rows), 3 * c);
            dinput_rows(dln.get(&rows), dqkv.get(&rows), layer.c_attn.w, c, 3 * c);
            let (x, stats) = (rows_of(res, c, &rows), rows_of(ln1_stats, 2, &rows));
            layer_norm_backward_rows(dres.get(&rows), &mut partial, dln.get(&rows), x, stats, &layer.ln_1, c);
            partial
        });
        add_partials(
            partials,
            &mut [Some(&mut *grads.ln_1.w), grads.ln_1.b.as_deref_mut(), None, grads.c_attn.b.as_deref_mut()],
        );
        weight_gradient(grads.c_attn.w, &a.dqkv, &a.ln1[l], c, 3 * c);
    }
    // The embeddings: rows of `wte` by token, of `wpe` by position.
    let embed_mask = mask(dropout, 0);
    for (row, dx) in a.dres.chunks_exact(c).enumerate() {
        let factor = |i: usize| embed_mask.as_ref().map_or(1.0, |mask| mask.factor(row * c + i));
        let token = x[row] as usize;
        g.wte[token * c..][..c].iter_mut().zip(dx).enumerate().for_each(|(i, (g, &dx))| *g += dx * factor(i));
        g.wpe[(row % t) * c..][..c].iter_mut().zip(dx).enumerate().for_each(|(i, (g, &dx))| *g += dx * factor(i));
    }
}

/// Per-task partial sums of gradients that sum over rows (LayerNorm gains and biases, bias
/// columns): parts of the given widths in one buffer.
struct Partial {
    data: Vec<f32>,
    widths: Vec<usize>,
}

impl Partial {
    fn new(widths: &[usize]) -> Partial {
        Partial { data: vec![0f32; widths.iter().sum()], widths: widths.to_vec() }
    }

    fn part(&mut self, i: usize) -> &mut [f32] {
        let start: usize = self.widths[..i].iter().sum();
        &mut self.data[start..start + self.widths[i]]
    }
}

/// Adds each task's parts, in task order, to the gradients (`None`: a part not kept).
fn add_partials(partials: Vec<Partial>, grads: &mut [Option<&mut [f32]>]) {
    for mut partial in partials {
        for (i, grad) in grads.iter_mut().enumerate() {
            if let Some(grad) = grad {
                simd::add_assign(grad, partial.part(i));
            }
        }
    }
}

/// out = input + dropout(branch); `first` is the rows' first element's index in the whole
/// (N, C) tensor, where the mask is drawn.
fn residual(out: &mut [f32], input: &[f32], branch: &[f32], mask: Option<DropoutMask>, first: usize) {
    match mask {
        None => simd::add(out, input, branch),
        Some(mask) => {
            for (i, (out, (&x, &b))) in out.iter_mut().zip(input.iter().zip(branch)).enumerate() {
                *out = x + b * mask.factor(first + i);
            }
        }
    }
}

/// out = grad through dropout (a copy without a mask); `first` as in `residual`.
fn dropout_rows(out: &mut [f32], grad: &[f32], mask: Option<DropoutMask>, first: usize) {
    match mask {
        None => out.copy_from_slice(grad),
        Some(mask) => {
            for (i, (out, &g)) in out.iter_mut().zip(grad).enumerate() {
                *out = g * mask.factor(first + i);
            }
        }
    }
}

/// sums += the column sums of rows of `width` (a bias's gradient).
fn column_sums(sums: &mut [f32], rows: &[f32], width: usize) {
    for row in rows.chunks_exact(width) {
        simd::add_assign(sums, row);
    }
}

/// LayerNorm of rows of `x`, one thread.
fn layer_norm_rows(out: &mut [f32], stats: &mut [f32], x: &[f32], ln: &Weights<&[f32]>, c: usize) {
    for ((out, stats), x) in out.chunks_exact_mut(c).zip(stats.chunks_exact_mut(2)).zip(x.chunks_exact(c)) {
        (stats[0], stats[1]) = simd::layer_norm(out, x, ln.w, ln.b, LAYER_NORM_EPS as f32);
    }
}

/// LayerNorm's backward over rows, one thread: dx += its gradient; the gain's and bias's
/// gradients into parts 0 and 1 of `partial`, part 2 scratch.
fn layer_norm_backward_rows(
    dx: &mut [f32],
    partial: &mut Partial,
    dout: &[f32],
    x: &[f32],
    stats: &[f32],
    ln: &Weights<&[f32]>,
    c: usize,
) {
    let (dw, rest) = partial.data.split_at_mut(c);
    let (db, rest) = rest.split_at_mut(c);
    let norm = &mut rest[..c];
    let lines = dx.chunks_exact_mut(c).zip(dout.chunks_exact(c)).zip(x.chunks_exact(c).zip(stats.chunks_exact(2)));
    for ((dx, dout), (x, s)) in lines {
        simd::layer_norm_backward(dx, dw, db, norm, dout, x, ln.w, (s[0], s[1]));
    }
}

/// out (rows, O) = input (rows, I) · weightᵀ + bias, one thread.
fn linear_rows(out: &mut [f32], input: &[f32], layer: &Weights<&[f32]>, i: usize, o: usize) {
    linear_columns(out, input, layer, i, o, 0..o);
}

/// Columns `cols` of out (rows, O) = input (rows, I) · weightᵀ + bias, one thread; the other
/// columns as they were.
fn linear_columns(out: &mut [f32], input: &[f32], layer: &Weights<&[f32]>, i: usize, o: usize, cols: Range<usize>) {
    let rows = input.len() / i;
    assert!(out.len() == rows * o && layer.w.len() == o * i && cols.end <= o);
    if let Some(bias) = layer.b {
        out.chunks_exact_mut(o).for_each(|row| row[cols.clone()].copy_from_slice(&bias[cols.clone()]));
    }
    let (dst, weight) = (out[cols.start..].as_mut_ptr(), weight_t(layer, i, o).at(0, cols.start));
    // SAFETY: the views stay inside `input` (rows, I) and the weight (O, I) (its columns `cols`);
    // dst holds columns `cols` of `out`'s rows.
    unsafe { gemm_one(rows, cols.len(), i, dst, o, View::rows(input, i), weight, layer.b.is_some()) };
}

/// dinput (rows, I) = dout (rows, O) · weight (O, I), one thread.
fn dinput_rows(dinput: &mut [f32], dout: &[f32], weight: &[f32], i: usize, o: usize) {
    let rows = dout.len() / o;
    assert!(dinput.len() == rows * i && weight.len() == o * i);
    // SAFETY: as in `linear_rows`.
    unsafe { gemm_one(rows, i, o, dinput.as_mut_ptr(), i, View::rows(dout, o), View::rows(weight, i), false) };
}

/// dweight (O, I) += doutᵀ · input over all N rows, its rows split between the threads.
fn weight_gradient(dweight: &mut [f32], dout: &[f32], input: &[f32], i: usize, o: usize) {
    let n = input.len() / i;
    assert!(dout.len() == n * o && dweight.len() == o * i);
    let dout_t = View { ptr: dout.as_ptr(), rs: 1, cs: o as isize, turned: None };
    // SAFETY: the views stay inside dout (N, O) and input (N, I); dweight holds (O, I).
    unsafe { matmul(o, i, n, dweight.as_mut_ptr(), i, dout_t, View::rows(input, i), true) };
}

/// Elements per rayon task of decoding's loops: enough that a task outlasts waking a thread for
/// it.
const TASK: usize = 1 << 15;

/// Rows of `width` per task.
fn rows_per_task(width: usize) -> usize {
    (TASK / width).max(1)
}

/// out (N, O) = input (N, I) · weightᵀ + bias, the weight (O, I), the rows split between the
/// threads (decoding a prompt or a window; the training step's row-wise regions call
/// `linear_rows`).
fn linear(out: &mut [f32], input: &[f32], layer: &Weights<&[f32]>, i: usize, o: usize) {
    let n = input.len() / i;
    if let Some(bias) = layer.b {
        out.par_chunks_mut(rows_per_task(o) * o)
            .for_each(|rows| rows.chunks_exact_mut(o).for_each(|row| row.copy_from_slice(bias)));
    }
    let a = View::rows(input, i);
    assert!(out.len() >= n * o && layer.w.len() >= o * i);
    // SAFETY: the views stay inside `input` (N, I) and the weight (O, I); `out` holds (N, O).
    unsafe { matmul(n, o, i, out.as_mut_ptr(), o, a, weight_t(layer, i, o), layer.b.is_some()) };
}

/// A linear layer's weight (O, I) as the (I, O) right-hand matrix of input · weightᵀ: its
/// transposed copy where there is one.
fn weight_t(layer: &Weights<&[f32]>, i: usize, o: usize) -> View {
    match layer.t {
        Some(t) if tiles::available() => {
            assert!(t.len() == i * o);
            View { turned: Some(o), ..View::rows(t, o) }
        }
        _ => View { ptr: layer.w.as_ptr(), rs: 1, cs: i as isize, turned: None },
    }
}

/// Transposed copies (I, O) of the linear layers' weights (O, I), in the order of `with_copies`.
fn transposed(p: &Params<&[f32]>, c: usize) -> Vec<Vec<f32>> {
    let transpose = |w: &[f32], i: usize| {
        let o = w.len() / i;
        let mut t = vec![0f32; w.len()];
        for (r, row) in w.chunks_exact(i).enumerate() {
            row.iter().enumerate().for_each(|(k, &x)| t[k * o + r] = x);
        }
        t
    };
    let layers = p.h.iter().flat_map(|l| [(l.c_attn.w, c), (l.attn_proj.w, c), (l.c_fc.w, c), (l.mlp_proj.w, 4 * c)]);
    layers.map(|(w, i)| transpose(w, i)).collect()
}

impl<'a> Params<&'a [f32]> {
    /// The parameters with the linear layers' transposed `copies` (from `transposed`).
    fn with_copies(mut self, copies: &'a [Vec<f32>]) -> Params<&'a [f32]> {
        let mut copies = copies.iter();
        for l in &mut self.h {
            for layer in [&mut l.c_attn, &mut l.attn_proj, &mut l.c_fc, &mut l.mlp_proj] {
                layer.t = Some(copies.next().expect("a copy per linear layer"));
            }
        }
        self
    }
}

/// A matrix in memory: element (r, k) at `ptr + r·rs + k·cs`.
#[derive(Clone, Copy)]
struct View {
    ptr: *const f32,
    rs: isize,
    cs: isize,
    /// Where the matrix's rows lie in order, this far apart, and the caller chose `tiles` for
    /// it (a weight's transposed copy, a window's V or Kᵀ): `gemm_one` multiplies by it there.
    turned: Option<usize>,
}

impl View {
    /// A row-major matrix whose rows are `stride` apart.
    fn rows(data: &[f32], stride: usize) -> View {
        View { ptr: data.as_ptr(), rs: stride as isize, cs: 1, turned: None }
    }

    /// The view moved to element (r, k).
    fn at(self, r: usize, k: usize) -> View {
        // SAFETY (of the callers): the element is inside the matrix the view describes.
        View { ptr: unsafe { self.ptr.offset(r as isize * self.rs + k as isize * self.cs) }, ..self }
    }

    /// The transpose.
    fn t(self) -> View {
        View { ptr: self.ptr, rs: self.cs, cs: self.rs, turned: None }
    }
}

/// A raw pointer that rayon tasks may share: each writes rows no other task writes.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that a closure captures the `SendPtr`, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// dst (m, n), its rows `dst_rs` apart, = a (m, k) · b (k, n), plus dst's values when
/// `accumulate`. The rows of dst are split between the threads, each running a one-thread
/// `gemm` (at 2 threads that beat `gemm`'s own split on every shape of the step), or its columns
/// where it has too few rows (decoding: one row per sequence).
///
/// # Safety
/// The views and dst must describe matrices of these sizes inside live allocations, and dst
/// must not overlap a or b.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, a: View, b: View, accumulate: bool) {
    let threads = rayon::current_num_threads();
    let small = m * n * k < (1 << 18) || threads == 1;
    let (by_rows, tasks) = match () {
        _ if small => (true, 1),
        _ if m >= 2 * threads => (true, threads),
        _ if n >= 64 * threads => (false, threads),
        _ => (true, 1),
    };
    let size = if by_rows { m } else { n };
    let part = size.div_ceil(tasks);
    let dst = SendPtr(dst);
    let (a, b) = (SendView(a), SendView(b));
    (0..tasks).into_par_iter().for_each(|task| {
        let (start, end) = (task * part, ((task + 1) * part).min(size));
        if start >= end {
            return;
        }
        // SAFETY: rows (or columns) start..end of dst belong to this task alone; the caller
        // vouches for the rest.
        unsafe {
            match by_rows {
                true => {
                    let dst = dst.get().add(start * dst_rs);
                    gemm_one(end - start, n, k, dst, dst_rs, a.get().at(start, 0), b.get(), accumulate)
                }
                false => {
                    let dst = dst.get().add(start);
                    gemm_one(m, end - start, k, dst, dst_rs, a.get(), b.get().at(0, start), accumulate)
                }
            }
        }
    });
}

/// `View` for rayon tasks (read-only).
#[derive(Clone, Copy)]
struct SendView(View);
unsafe impl Send for SendView {}
unsafe impl Sync for SendView {}

impl SendView {
    fn get(self) -> View {
        self.0
    }
}

/// One single-threaded `gemm` call: dst (m, n) (+)= a · b.
///
/// # Safety
/// As `matmul`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_one(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, a: View, b: View, accumulate: bool) {
    if m == 0 || n == 0 {
        return;
    }
    if let (true, Some(ldb)) = (a.cs == 1, b.turned) {
        // A row-major input times a matrix whose rows lie in order (a weight's transposed copy,
        // a window's V or Kᵀ): no copy of either (see `tiles`).
        let (ldc, a_rs, a_cs, a, b) = (dst_rs, a.rs, a.cs, a.ptr, b.ptr);
        // SAFETY: as the caller's.
        return unsafe { tiles::matmul(tiles::Product { m, n, k, dst, ldc, a, a_rs, a_cs, b, ldb, accumulate }) };
    }
    // SAFETY: as the caller's; gemm reads dst only when `accumulate`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// Row blocks of the causal (T, T) products: a block of queries needs keys up to its last.
const BLOCK: usize = 32;

/// Causal self-attention from packed qkv (N, 3C) to the heads' outputs side by side (N, C) and
/// each query's log-sum-exp, one (sequence, head) per task, the (T, T) probabilities in the
/// task's scratch: S = Q Kᵀ, P = softmax(S / √hs) (causal, then dropout), Y = P V.
fn attention(y: &mut [f32], lse: &mut [f32], scratch: &mut [f32], qkv: &[f32], d: &Dims, mask: Option<DropoutMask>) {
    let (t, c, heads) = (d.t, d.c, d.h);
    let hs = c / heads;
    // Decoding's windows multiply by `tiles` (Kᵀ into the scratch's free 2T² first, where it
    // fits: hs ≤ 2T); training keeps `gemm`'s sums, so that no loss moved.
    let tiled = d.decoding && tiles::available() && hs <= 2 * t;
    let scale = 1.0 / (hs as f32).sqrt();
    let threads = d.threads.min(scratch.len() / (3 * t * t));
    let pairs = d.b * heads;
    let (y, lse) = (SendPtr(y.as_mut_ptr()), SendPtr(lse.as_mut_ptr()));
    scratch.par_chunks_mut(3 * t * t).take(threads).enumerate().for_each(|(thread, scratch)| {
        let (p, kt) = scratch.split_at_mut(t * t);
        for pair in (thread..pairs).step_by(threads) {
            let (b, h) = (pair / heads, pair % heads);
            let base = View::rows(&qkv[b * t * 3 * c..], 3 * c);
            let (q, k, v) = (base.at(0, h * hs), base.at(0, c + h * hs), base.at(0, 2 * c + h * hs));
            // SAFETY: the (sequence, head) pairs of a task are its own: its rows of `lse`, its
            // columns of y's rows, its scratch; the views stay inside this sequence's qkv.
            // A block of queries at a time, start to end, so that its rows of P stay in cache
            // (GPT-2's (1024, 1024) P is 4 MB).
            unsafe {
                let lse = std::slice::from_raw_parts_mut(lse.get().add(pair * t), t);
                let y = y.get().add(b * t * c + h * hs);
                // Kᵀ (hs, T), for `tiles`.
                let kt = match tiled {
                    true => {
                        let kt = &mut kt[..hs * t];
                        for (j, key) in qkv[b * t * 3 * c + c + h * hs..].chunks(3 * c).take(t).enumerate() {
                            key[..hs].iter().enumerate().for_each(|(d, &x)| kt[d * t + j] = x);
                        }
                        View { turned: Some(t), ..View::rows(kt, t) }
                    }
                    false => k.t(),
                };
                let v = View { turned: tiled.then_some(3 * c), ..v };
                for (start, end) in blocks(t) {
                    gemm_one(end - start, end, hs, p.as_mut_ptr().add(start * t), t, q.at(start, 0), kt, false);
                    for i in start..end {
                        let row = &mut p[i * t..][..end];
                        lse[i] = simd::softmax(&mut row[..=i], scale);
                        row[i + 1..].iter_mut().for_each(|p| *p = 0.0);
                        if let Some(mask) = &mask {
                            let first = (pair * t + i) * t;
                            row[..=i].iter_mut().enumerate().for_each(|(j, p)| *p *= mask.factor(first + j));
                        }
                    }
                    gemm_one(end - start, hs, end, y.add(start * c), c, View::rows(p, t).at(start, 0), v, false);
                }
            }
        }
    });
}

/// Attention for each sequence's last query only, into its row of y (the heads' outputs side by
/// side), a (sequence, head) at a time on each thread: decoding's last layer, of whose positions
/// only the last goes on (a quarter of the CPU recipe's attention).
fn last_queries(y: &mut [f32], scratch: &mut [f32], qkv: &[f32], d: &Dims) {
    let (t, c, heads) = (d.t, d.c, d.h);
    let hs = c / heads;
    let scale = 1.0 / (hs as f32).sqrt();
    let pairs = d.b * heads;
    let threads = d.threads.clamp(1, scratch.len() / t);
    let y = SendPtr(y.as_mut_ptr());
    scratch.par_chunks_exact_mut(t).take(threads).enumerate().for_each(|(thread, scores)| {
        for pair in (thread..pairs).step_by(threads) {
            let (b, h) = (pair / heads, pair % heads);
            let rows = &qkv[b * t * 3 * c..][..t * 3 * c];
            let q = &rows[(t - 1) * 3 * c + h * hs..][..hs];
            // SAFETY: head h's columns of sequence b's last row are this pair's alone.
            let out = unsafe { std::slice::from_raw_parts_mut(y.get().add((b * t + t - 1) * c + h * hs), hs) };
            simd::attend(out, scores, q, &rows[c + h * hs..], &rows[2 * c + h * hs..], 3 * c, scale);
        }
    });
}

/// The row blocks `(start, end)` of a causal (T, T) product.
fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t.div_ceil(BLOCK)).map(move |i| (i * BLOCK, ((i + 1) * BLOCK).min(t)))
}

/// The backward of `attention`, P recomputed from the log-sum-exps: dV = P'ᵀ dY, dP' = dY Vᵀ,
/// dP = dP' through dropout, dS = P ⊙ (dP - rowsum(P ⊙ dP)) / √hs, dQ = dS K, dK = dSᵀ Q; into
/// dqkv (N, 3C), overwritten.
fn attention_backward(
    dqkv: &mut [f32],
    scratch: &mut [f32],
    dy: &[f32],
    qkv: &[f32],
    lse: &[f32],
    d: &Dims,
    mask: Option<DropoutMask>,
) {
    let (t, c, heads) = (d.t, d.c, d.h);
    let hs = c / heads;
    let scale = 1.0 / (hs as f32).sqrt();
    let threads = d.threads.min(scratch.len() / (3 * t * t));
    let pairs = d.b * heads;
    let dqkv = SendPtr(dqkv.as_mut_ptr());
    scratch.par_chunks_mut(3 * t * t).take(threads).enumerate().for_each(|(thread, scratch)| {
        let (p, rest) = scratch.split_at_mut(t * t);
        let (dp, kept) = rest.split_at_mut(t * t);
        for pair in (thread..pairs).step_by(threads) {
            let (b, h) = (pair / heads, pair % heads);
            let base = View::rows(&qkv[b * t * 3 * c..], 3 * c);
            let (q, k, v) = (base.at(0, h * hs), base.at(0, c + h * hs), base.at(0, 2 * c + h * hs));
            let dy = View::rows(&dy[b * t * c..], c).at(0, h * hs);
            let lse = &lse[pair * t..][..t];
            // SAFETY: as in `attention`; this pair's columns of dqkv's rows are the task's own.
            // A block of queries at a time, as in `attention`; dK and dV sum over the blocks.
            unsafe {
                let dq = dqkv.get().add(b * t * 3 * c + h * hs);
                let (dk, dv) = (dq.add(c), dq.add(2 * c));
                for row in 0..t {
                    std::slice::from_raw_parts_mut(dk.add(row * 3 * c), hs).fill(0.0);
                    std::slice::from_raw_parts_mut(dv.add(row * 3 * c), hs).fill(0.0);
                }
                for (start, end) in blocks(t) {
                    gemm_one(end - start, end, hs, p.as_mut_ptr().add(start * t), t, q.at(start, 0), k.t(), false);
                    gemm_one(end - start, end, hs, dp.as_mut_ptr().add(start * t), t, dy.at(start, 0), v.t(), false);
                    for i in start..end {
                        let (row, dp_row) = (&mut p[i * t..][..end], &mut dp[i * t..][..end]);
                        simd::softmax_from_lse(&mut row[..=i], scale, lse[i]);
                        row[i + 1..].iter_mut().for_each(|p| *p = 0.0);
                        if let Some(mask) = &mask {
                            let first = (pair * t + i) * t;
                            let kept = &mut kept[i * t..][..end];
                            for j in 0..=i {
                                let factor = mask.factor(first + j);
                                kept[j] = row[j] * factor;
                                dp_row[j] *= factor;
                            }
                            kept[i + 1..].iter_mut().for_each(|p| *p = 0.0);
                        }
                    }
                    let probabilities = if mask.is_some() { &*kept } else { &*p };
                    // dV[..end] += P'ᵀ dY over the block's queries.
                    let pt = View::rows(probabilities, t).at(start, 0).t();
                    gemm_one(end, hs, end - start, dv, 3 * c, pt, dy.at(start, 0), true);
                    for i in start..end {
                        let (row, dp_row) = (&p[i * t..][..end], &mut dp[i * t..][..end]);
                        simd::softmax_backward(&mut dp_row[..=i], &row[..=i], scale);
                        dp_row[i + 1..].iter_mut().for_each(|ds| *ds = 0.0);
                    }
                    let ds = View::rows(dp, t).at(start, 0);
                    gemm_one(end - start, hs, end, dq.add(start * 3 * c), 3 * c, ds, k, false);
                    // dK[..end] += dSᵀ Q over the block's queries.
                    gemm_one(end, hs, end - start, dk, 3 * c, ds.t(), q.at(start, 0), true);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    //! The explicit step against candle's autograd through `Gpt::forward` (whose ops the model
    //! tests check against `transformers`): the loss and every gradient, with and without
    //! biases, dropout and several blocks of attention rows.

    use candle_core::Device;
    use candle_nn::VarMap;

    use super::*;
    use crate::gpt::Rng;

    fn random_tokens(shape: (usize, usize), vocab: usize, rng: &mut Rng) -> Tensor {
        let ids: Vec<u32> = (0..shape.0 * shape.1).map(|_| rng.below(vocab as u64) as u32).collect();
        Tensor::from_vec(ids, shape, &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    fn compare(config: GptConfig, b: usize, weight: f64) {
        let varmap = VarMap::new();
        let model = Gpt::init(&config, &varmap, &Device::Cpu, 3).unwrap();
        let mut rng = Rng::new(11);
        let (x, y) =
            (random_tokens((b, config.block_size), 50, &mut rng), random_tokens((b, config.block_size), 50, &mut rng));
        model.seed_dropout(42).unwrap();
        let loss = model.accumulate_gradients(&x, &y, weight).unwrap();
        let mut vars: Vec<(String, Var)> =
            varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let explicit = model.take_gradients(vars.iter().map(|(_, var)| var)).unwrap();
        model.seed_dropout(42).unwrap();
        let reference_loss = crate::gpt::cross_entropy(&model.forward(&x, true).unwrap(), &y).unwrap();
        let store = (&reference_loss * weight).unwrap().backward().unwrap();
        let reference_loss = reference_loss.to_scalar::<f32>().unwrap();
        assert!((loss - reference_loss).abs() < 1e-5, "loss {loss} vs autograd's {reference_loss}");
        for ((name, var), grad) in vars.iter().zip(&explicit) {
            let expected = store.get(var.as_tensor()).unwrap();
            let error = max_abs(&(grad - expected).unwrap()) / max_abs(expected).max(1e-6);
            assert!(error < 1e-4, "{config:?}: the gradient of `{name}` differs from autograd's by {error} (relative)");
        }
        // Taken once: the sums start again from zero.
        let again = model.take_gradients(vars.iter().map(|(_, var)| var)).unwrap();
        assert!(again.iter().all(|g| max_abs(g) == 0.0));
    }

    #[test]
    fn the_explicit_step_matches_autograd() {
        let base =
            GptConfig { block_size: 8, vocab_size: 50, n_layer: 2, n_head: 2, n_embd: 16, dropout: 0.0, bias: true };
        compare(base.clone(), 3, 1.0);
        compare(GptConfig { bias: false, ..base.clone() }, 2, 0.5);
        compare(GptConfig { dropout: 0.2, ..base.clone() }, 2, 1.0);
        // Attention rows in several blocks, dropout on every site.
        compare(GptConfig { block_size: 150, n_head: 3, n_embd: 24, dropout: 0.1, ..base }, 2, 0.25);
    }

    #[test]
    fn eval_loss_is_the_forward_loss_and_bad_tokens_are_errors() {
        // Three layers: a loss alone reuses one layer's buffers and two residual ones in turn.
        let config =
            GptConfig { block_size: 8, vocab_size: 50, n_layer: 3, n_head: 2, n_embd: 16, dropout: 0.1, bias: true };
        let varmap = VarMap::new();
        let model = Gpt::init(&config, &varmap, &Device::Cpu, 3).unwrap();
        let mut rng = Rng::new(5);
        let (x, y) = (random_tokens((2, 8), 50, &mut rng), random_tokens((2, 8), 50, &mut rng));
        let expected =
            crate::gpt::cross_entropy(&model.forward(&x, false).unwrap(), &y).unwrap().to_scalar::<f32>().unwrap();
        assert!((model.loss(&x, &y).unwrap() as f32 - expected).abs() < 1e-5);
        // After a training step (every layer's buffers kept), the same loss again.
        model.accumulate_gradients(&x, &y, 1.0).unwrap();
        assert!((model.loss(&x, &y).unwrap() as f32 - expected).abs() < 1e-5);
        let bad = Tensor::new(&[[1u32, 50]], &Device::Cpu).unwrap();
        let error = model.loss(&bad, &bad).unwrap_err().to_string();
        assert!(error.contains("token 50 is outside the vocabulary of 50"), "{error}");
    }

    #[test]
    fn a_windows_last_logits_match_the_full_forward_pass_with_table_and_copies() {
        // Windows shorter than the block too (the first tokens without the cache): at T = 1 and 5
        // the scratch has no room for Kᵀ beside P, and the attention keeps `gemm`.
        for (bias, t) in [(false, 16), (true, 16), (false, 1), (true, 5)] {
            let config =
                GptConfig { block_size: 16, vocab_size: 37, n_layer: 2, n_head: 2, n_embd: 48, dropout: 0.0, bias };
            let model = Gpt::init(&config, &VarMap::new(), &Device::Cpu, 9).unwrap();
            let params = model.parameters();
            let guards: Vec<_> = params.iter().map(|p| p.storage_and_layout()).collect();
            let b = 3;
            let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % config.vocab_size) as u32).collect();
            let dims =
                Dims { b, t, c: config.n_embd, h: config.n_head, v: config.vocab_size, threads: 2, decoding: true };
            let logits = |copies: bool, table: bool| {
                let p = Params::from_list(&config, param_slices(&guards).unwrap());
                let turned = if copies { transposed(&p, config.n_embd) } else { Vec::new() };
                let p = if copies { p.with_copies(&turned) } else { p };
                let first = table.then(|| FirstQkv::new(&p, &config).expect("a small table"));
                let mut acts = Activations::new(&config, b, t, Outputs::LastLogits);
                on_cpu_pool(|| forward(&mut acts, &p, &dims, &ids, Head::LastLogits(first.as_ref()), None));
                acts.logits[..b * config.vocab_size].to_vec()
            };
            // The table holds the bits the window would compute: the same kernels, each element's
            // sum independent of how the rows are split.
            let bits = |l: &[f32]| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let copies = logits(true, false);
            assert_eq!(bits(&logits(true, true)), bits(&copies), "bias {bias}, T {t}: the first layer's table");
            // The copies go through `tiles` where the CPU has it: its sums' order, not gemm's.
            let plain = logits(false, false);
            // And the training forward pass's logits at each sequence's last position (every layer
            // at every position, attention through `attention` and `gemm`, not `last_queries`).
            let p = Params::from_list(&config, param_slices(&guards).unwrap());
            let mut acts = Activations::new(&config, b, t, Outputs::Loss);
            let training = Dims { decoding: false, ..dims };
            on_cpu_pool(|| forward(&mut acts, &p, &training, &ids, Head::Loss(&ids), None));
            let v = config.vocab_size;
            let full: Vec<f32> = (0..b).flat_map(|seq| acts.logits[(seq * t + t - 1) * v..][..v].to_vec()).collect();
            for other in [copies, logits(false, true), full] {
                let error = other.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(error < 1e-5, "bias {bias}, T {t}: {error}");
            }
        }
    }
}
