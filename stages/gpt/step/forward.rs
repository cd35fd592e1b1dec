//! The forward pass, llm.c's `gpt2_forward`: tokens (B, T) -> embeddings (N, C) -> per layer
//! ln_1, c_attn (N, 3C), attention (N, C), attn.c_proj and the residual add, ln_2, c_fc (N, F),
//! GELU, mlp.c_proj (N, C) and the residual add -> ln_f -> logits (N, V) and the mean
//! cross-entropy; or, for a decoding window, the logits (B, V) of each sequence's last position
//! only (`Head`), layer 0's qkv looked up where the model is small (`FirstQkv`). Dropout masks
//! by site, as `Gpt::forward` draws them.

use std::ops::Range;

use super::attention::{attention, last_queries};
use super::matmul::{linear, linear_columns, linear_rows};
use super::params::{Params, Weights};
use super::workspace::{Activations, Dims, Rows, in_row_blocks, mask, read_write, rows_of};
use crate::gpt::config::{GptConfig, LAYER_NORM_EPS};
use crate::gpt::ops::simd;
use crate::gpt::rng::DropoutMask;

/// What `forward` ends with.
#[derive(Clone, Copy)]
pub(super) enum Head<'a> {
    /// The mean cross-entropy against these targets (N), returned, with each row's logits kept.
    Loss(&'a [u32]),
    /// The logits of each sequence's last position only, in `logits`' first B rows; layer 0's
    /// qkv from the table where there is one.
    LastLogits(Option<&'a FirstQkv>),
}

/// The forward pass over (B, T) tokens `x`: the activations into `a`, then `head`.
pub(super) fn forward(
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

/// LayerNorm of rows of `x`, one thread.
pub(super) fn layer_norm_rows(out: &mut [f32], stats: &mut [f32], x: &[f32], ln: &Weights<&[f32]>, c: usize) {
    for ((out, stats), x) in out.chunks_exact_mut(c).zip(stats.chunks_exact_mut(2)).zip(x.chunks_exact(c)) {
        (stats[0], stats[1]) = simd::layer_norm(out, x, ln.w, ln.b, LAYER_NORM_EPS as f32);
    }
}

/// Layer 0's qkv (3C) for every (token, position), row token·block + position: it depends on
/// those two alone (LayerNorm of their embeddings' sum, times c_attn), so a window's first
/// layer is looked up, not computed (of the CPU recipe's window, 8% of the multiply-adds), with
/// the same bits.
pub(super) struct FirstQkv {
    rows: Vec<f32>,
    block: usize,
}

/// Floats up to which `FirstQkv` makes its table (64 MiB; the CPU recipe's is 6.4 MB, GPT-2's
/// would be 475 GB).
const FIRST_QKV_MAX: usize = 1 << 24;

impl FirstQkv {
    pub(super) fn new(p: &Params<&[f32]>, config: &GptConfig) -> Option<FirstQkv> {
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
