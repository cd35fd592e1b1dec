//! Causal self-attention over packed qkv (N, 3C), heads of hs = C / H: the forward pass
//! (`attention`: S = Q Kᵀ, P = softmax(S / √hs), Y = P V into the heads' outputs side by side
//! (N, C), each query's log-sum-exp kept (B, H, T)), its backward (`attention_backward`: dY
//! (N, C) -> dqkv (N, 3C)), and decoding's last query alone (`last_queries`). One (sequence,
//! head) per task, its (T, T) matrices in the task's scratch, a block of query rows at a time.

use rayon::prelude::*;

use super::matmul::{SendPtr, View, gemm_one};
use super::workspace::Dims;
use crate::gpt::ops::{simd, tiles};
use crate::gpt::rng::DropoutMask;

/// Row blocks of the causal (T, T) products: a block of queries needs keys up to its last.
const BLOCK: usize = 32;

/// Causal self-attention from packed qkv (N, 3C) to the heads' outputs side by side (N, C) and
/// each query's log-sum-exp, one (sequence, head) per task, the (T, T) probabilities in the
/// task's scratch: S = Q Kᵀ, P = softmax(S / √hs) (causal, then dropout), Y = P V.
pub(super) fn attention(
    y: &mut [f32],
    lse: &mut [f32],
    scratch: &mut [f32],
    qkv: &[f32],
    d: &Dims,
    mask: Option<DropoutMask>,
) {
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

/// The backward of `attention`, P recomputed from the log-sum-exps: dV = P'ᵀ dY, dP' = dY Vᵀ,
/// dP = dP' through dropout, dS = P ⊙ (dP - rowsum(P ⊙ dP)) / √hs, dQ = dS K, dK = dSᵀ Q; into
/// dqkv (N, 3C), overwritten.
pub(super) fn attention_backward(
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

/// Attention for each sequence's last query only, into its row of y (the heads' outputs side by
/// side), a (sequence, head) at a time on each thread: decoding's last layer, of whose positions
/// only the last goes on (a quarter of the CPU recipe's attention).
pub(super) fn last_queries(y: &mut [f32], scratch: &mut [f32], qkv: &[f32], d: &Dims) {
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
