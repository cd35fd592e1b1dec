//! The step's buffers: `Workspace` (the activations and the gradient sums, one per
//! `Gpt::parameters`) and `Activations` (every activation the forward pass keeps for the
//! backward pass, allocated once per batch shape; each field says its shape); the sizes a pass
//! runs at (`Dims`); and how a pass splits its N rows between the threads (`in_row_blocks`, each
//! task writing its own block of a buffer through `Rows`).

use std::ops::Range;

use rayon::prelude::*;

use super::matmul::SendPtr;
use crate::gpt::config::GptConfig;
use crate::gpt::rng::DropoutMask;

/// The step's buffers for one batch shape, and the gradient sums (one per `Gpt::parameters`).
#[derive(Debug, Default)]
pub(crate) struct Workspace {
    pub(super) shape: (usize, usize),
    pub(super) acts: Activations,
    pub(super) grads: Vec<Vec<f32>>,
}

/// What the forward pass keeps for the backward pass, and the backward pass's scratch.
#[derive(Debug, Default)]
pub(super) struct Activations {
    /// The residual stream: `res[0]` the embeddings, `res[l + 1]` layer l's output (N, C).
    pub(super) res: Vec<Vec<f32>>,
    /// Layer l's residual stream after its attention (N, C).
    pub(super) mid: Vec<Vec<f32>>,
    /// LayerNorm outputs (N, C) and their (mean, 1/std) per row (N, 2).
    pub(super) ln1: Vec<Vec<f32>>,
    pub(super) ln1_stats: Vec<Vec<f32>>,
    pub(super) ln2: Vec<Vec<f32>>,
    pub(super) ln2_stats: Vec<Vec<f32>>,
    /// The packed queries, keys and values (N, 3C), the heads' outputs side by side (N, C) and
    /// each query's log-sum-exp of its scaled scores (B, H, T).
    pub(super) qkv: Vec<Vec<f32>>,
    pub(super) atty: Vec<Vec<f32>>,
    pub(super) lse: Vec<Vec<f32>>,
    /// The MLP's hidden layer before and after GELU, and the tanh inside GELU (N, F; kept for a
    /// backward pass only).
    pub(super) fch: Vec<Vec<f32>>,
    pub(super) fcg: Vec<Vec<f32>>,
    pub(super) fct: Vec<Vec<f32>>,
    pub(super) lnf: Vec<f32>,
    pub(super) lnf_stats: Vec<f32>,
    /// Logits (N, V), overwritten by their gradient.
    pub(super) logits: Vec<f32>,
    pub(super) losses: Vec<f32>,
    /// A projection's output before dropout and the residual add (N, C).
    pub(super) branch: Vec<f32>,
    /// Backward: the residual stream's gradient, a branch's gradient, a LayerNorm output's
    /// gradient (N, C); qkv's (N, 3C), the heads' outputs' (N, C), the hidden layer's (N, F).
    pub(super) dres: Vec<f32>,
    pub(super) dbranch: Vec<f32>,
    pub(super) dln: Vec<f32>,
    pub(super) dqkv: Vec<f32>,
    pub(super) datty: Vec<f32>,
    pub(super) dfc: Vec<f32>,
    /// Per-thread (T, T) scores and their gradients.
    pub(super) scratch: Vec<f32>,
}

/// What a forward pass is for: a loss to take the gradient of, a loss alone, or the logits of
/// each sequence's last position (decoding).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Outputs {
    Backward,
    Loss,
    LastLogits,
}

impl Activations {
    pub(super) fn new(config: &GptConfig, b: usize, t: usize, outputs: Outputs) -> Activations {
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

    /// The floats `new` allocates for a training step (`Outputs::Backward`) with `threads` in
    /// rayon's pool: what the preflight (`gpt/estimate.rs`) counts as the step's activations.
    /// Kept beside `new`, field by field; `the_estimate_counts_what_new_allocates` holds them
    /// together.
    fn floats(config: &GptConfig, b: usize, t: usize, threads: usize) -> usize {
        let (n, c, l) = (b * t, config.n_embd, config.n_layer);
        let res = (l + 1) * n * c;
        // mid, ln1, ln2, atty (N, C); ln1_stats, ln2_stats (N, 2); qkv (N, 3C); lse (B, H, T);
        // fch, fcg, fct (N, 4C).
        let per_layer = 4 * n * c + 2 * 2 * n + 3 * n * c + b * config.n_head * t + 3 * 4 * n * c;
        // lnf, branch (N, C); lnf_stats (N, 2); logits (N, V); losses (N).
        let top = 2 * n * c + 2 * n + n * config.vocab_size + n;
        // dres, dbranch, dln, datty (N, C); dqkv (N, 3C); dfc (N, 4C).
        let grads = 4 * n * c + 3 * n * c + 4 * n * c;
        res + l * per_layer + top + grads + threads * 3 * t * t
    }

    pub(super) fn has_backward(&self) -> bool {
        !self.dres.is_empty()
    }

    /// Where layer l's activations are: (its buffers' index, its input's and its output's in
    /// `res`). Every layer its own with a backward pass to come; otherwise one set, reused, and
    /// two residual buffers in turn.
    pub(super) fn slots(&self, l: usize) -> (usize, usize, usize) {
        match self.has_backward() {
            true => (l, l, l + 1),
            false => (0, l % 2, (l + 1) % 2),
        }
    }
}

/// The floats a training step's activations take at batch `b` and context `t` with `threads` in
/// rayon's pool (`Activations::floats`): what the preflight counts (`gpt/estimate.rs`).
pub(crate) fn activation_floats(config: &GptConfig, b: usize, t: usize, threads: usize) -> usize {
    Activations::floats(config, b, t, threads)
}

/// `read` of `v` to read and `write` to write (two different elements).
pub(super) fn read_write<T>(v: &mut [T], read: usize, write: usize) -> (&T, &mut T) {
    assert_ne!(read, write);
    if read < write {
        let (before, after) = v.split_at_mut(write);
        (&before[read], &mut after[0])
    } else {
        let (before, after) = v.split_at_mut(read);
        (&after[0], &mut before[write])
    }
}

pub(super) struct Dims {
    pub(super) b: usize,
    pub(super) t: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) v: usize,
    /// Threads to split the rows between.
    pub(super) threads: usize,
    /// A decoding window's forward pass (no backward pass to follow).
    pub(super) decoding: bool,
}

impl Dims {
    pub(super) fn n(&self) -> usize {
        self.b * self.t
    }
}

/// The dropout mask of `site` under `dropout` = (p, seed), if training with dropout.
pub(super) fn mask(dropout: Option<(f32, u64)>, site: usize) -> Option<DropoutMask> {
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
pub(super) fn in_row_blocks<R: Send>(d: &Dims, n: usize, task: impl Fn(Range<usize>) -> R + Sync) -> Vec<R> {
    row_blocks(n, d.threads).into_par_iter().map(&task).collect()
}

/// A buffer whose rows the tasks of `in_row_blocks` write, each task its own block.
#[derive(Clone, Copy)]
pub(super) struct Rows {
    ptr: SendPtr,
    width: usize,
    len: usize,
}

impl Rows {
    pub(super) fn of(buffer: &mut [f32], width: usize) -> Rows {
        Rows { ptr: SendPtr(buffer.as_mut_ptr()), width, len: buffer.len() }
    }

    /// The rows `rows`, to write.
    ///
    /// # Safety
    /// Only the task given these rows (`in_row_blocks` gives out disjoint blocks) may hold them,
    /// the buffer must outlive the use, and nothing else may borrow it meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn get<'a>(&self, rows: &Range<usize>) -> &'a mut [f32] {
        assert!(rows.end * self.width <= self.len);
        unsafe { std::slice::from_raw_parts_mut(self.ptr.get().add(rows.start * self.width), rows.len() * self.width) }
    }
}

/// Rows `rows` of a row-major buffer of `width`.
pub(super) fn rows_of<'a>(buffer: &'a [f32], width: usize, rows: &Range<usize>) -> &'a [f32] {
    &buffer[rows.start * width..rows.end * width]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The preflight's count and the allocation cannot drift apart.
    #[test]
    fn the_estimate_counts_what_new_allocates() {
        let shapes = [(4, 4, 128, 65, 12, 64), (2, 3, 48, 50304, 3, 17), (1, 1, 16, 7, 1, 1)];
        for (n_layer, n_head, n_embd, vocab_size, b, t) in shapes {
            let config = GptConfig { block_size: t, vocab_size, n_layer, n_head, n_embd, dropout: 0.1, bias: true };
            let a = Activations::new(&config, b, t, Outputs::Backward);
            let nested = |v: &Vec<Vec<f32>>| v.iter().map(Vec::len).sum::<usize>();
            let allocated = [&a.res, &a.mid, &a.ln1, &a.ln1_stats, &a.ln2, &a.ln2_stats, &a.qkv, &a.atty, &a.lse]
                .into_iter()
                .chain([&a.fch, &a.fcg, &a.fct])
                .map(nested)
                .sum::<usize>()
                + [&a.lnf, &a.lnf_stats, &a.logits, &a.losses, &a.branch, &a.dres, &a.dbranch, &a.dln, &a.dqkv]
                    .into_iter()
                    .chain([&a.datty, &a.dfc, &a.scratch])
                    .map(Vec::len)
                    .sum::<usize>();
            assert_eq!(Activations::floats(&config, b, t, rayon::current_num_threads()), allocated, "{config:?}");
        }
    }
}
