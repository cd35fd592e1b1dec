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
