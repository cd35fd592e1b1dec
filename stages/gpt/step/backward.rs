//! The backward pass, llm.c's `gpt2_backward`: the loss's gradient over the logits (N, V), in
//! their place, back through the tied output layer and ln_f, then each layer in reverse (the MLP
//! branch, then the attention branch, each through its LayerNorm into the residual stream's
//! gradient (N, C)) to the embeddings. Every weight gradient is added straight into its sum
//! (`weight_gradient`, beta = 1); gradients that sum over rows (LayerNorm gains, biases) as
//! per-task partial sums (`Partial`), added in task order.

use super::attention::attention_backward;
use super::matmul::{dinput_rows, weight_gradient};
use super::params::{Params, Weights};
use super::workspace::{Activations, Dims, Rows, in_row_blocks, mask, rows_of};
use crate::gpt::ops::simd;
use crate::gpt::rng::DropoutMask;

#[allow(clippy::too_many_arguments)]
pub(super) fn backward_pass(
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
