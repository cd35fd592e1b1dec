//! The CPU's hot loops (the explicit step's row kernels in `gpt/step/`, AdamW's update), each
//! compiled three times, for AVX-512, for AVX2 with FMA and for the x86-64 baseline, and run at
//! the widest level the CPU has.
//! nanoflow is built for the baseline (SSE2, 4 floats a vector) so that one binary runs on any
//! x86-64; `gemm` picks its kernels at run time the same way, and without it the exp- and
//! tanh-heavy kernels (GELU, softmax, cross-entropy) ran 4 floats at a time on a 16-wide core.
//!
//! Sums and maxima run in 16 lanes at every level and no multiply-add is fused, so a kernel gives
//! the same bits on every CPU.

use super::cpu::{LANES, exp, exp_lanes, gelu_at, gelu_grad_with_tanh, gelu_tanh, gelu_tanh_lanes, gelu_with_tanh};

/// Compiles a function for AVX-512, for AVX2 + FMA and for the baseline, and calls the widest
/// one this CPU runs.
macro_rules! widest {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512dq")
                {
                    // SAFETY: this CPU has the features `v4` is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for `v3`.
                    return unsafe { v3($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// Σ x, in 16 lanes.
#[inline(always)]
fn sum16(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for k in 0..16 {
            lanes[k] += chunk[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Σ a·b, in 16 lanes.
#[inline(always)]
fn dot16(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a16.remainder().iter().zip(b16.remainder()).map(|(a, b)| a * b).sum();
    for (a, b) in a16.zip(b16) {
        for k in 0..16 {
            lanes[k] += a[k] * b[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// max(x · scale), in 16 lanes.
#[inline(always)]
fn max16(x: &[f32], scale: f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |max, &v| max.max(v * scale));
    for chunk in chunks {
        for k in 0..16 {
            lanes[k] = lanes[k].max(chunk[k] * scale);
        }
    }
    lanes.iter().fold(tail, |max, &v| max.max(v))
}

/// (max, Σ e^(x - max)) of a row.
#[inline(always)]
fn logsumexp_parts(row: &[f32]) -> (f32, f32) {
    let max = max16(row, 1.0);
    let mut lanes = [0f32; 16];
    let chunks = row.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|&v| exp(v - max)).sum();
    for chunk in chunks {
        for k in 0..16 {
            lanes[k] += exp(chunk[k] - max);
        }
    }
    (max, lanes.iter().sum::<f32>() + tail)
}

/// e^(x · scale - shift) of each value x of `row`, in place, `LANES` at a time, the rest (a
/// causal row's scores are often fewer) 16 at a time, the last pass padded.
#[inline(always)]
fn exp_scaled(row: &mut [f32], scale: f32, shift: f32) {
    let (passes, rest) = row.as_chunks_mut::<LANES>();
    for x in passes {
        x.iter_mut().for_each(|x| *x = *x * scale - shift);
        exp_lanes(x);
    }
    for rest in rest.chunks_mut(16) {
        let mut pass = [0f32; 16];
        pass.iter_mut().zip(rest.iter()).for_each(|(p, &x)| *p = x * scale - shift);
        exp_lanes(&mut pass);
        rest.copy_from_slice(&pass[..rest.len()]);
    }
}

/// Softmax of `row · scale` in place; returns its log-sum-exp.
#[inline(always)]
fn softmax_inline(row: &mut [f32], scale: f32) -> f32 {
    let max = max16(row, scale);
    exp_scaled(row, scale, max);
    let sum = sum16(row);
    let inverse = 1.0 / sum;
    row.iter_mut().for_each(|p| *p *= inverse);
    max + sum.ln()
}

widest! {
    /// Softmax of `row · scale` in place; returns its log-sum-exp.
    pub(crate) fn softmax(row: &mut [f32], scale: f32) -> f32 {
        softmax_inline(row, scale)
    }
}

widest! {
    /// One query's attention over cached positions, one head: `scores` (one per position) =
    /// softmax(q · k_j · scale), out = Σ_j p_j v_j. `keys` and `values` start at the head's first
    /// column, position j's row `stride` further on.
    pub(crate) fn attend(out: &mut [f32], scores: &mut [f32], q: &[f32], keys: &[f32], values: &[f32], stride: usize, scale: f32) {
        let hs = q.len();
        for (j, s) in scores.iter_mut().enumerate() {
            *s = dot16(q, &keys[j * stride..][..hs]);
        }
        softmax_inline(scores, scale);
        out.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            out.iter_mut().zip(&values[j * stride..][..hs]).for_each(|(o, &v)| *o += p * v);
        }
    }
}

widest! {
    /// out[r·N + j] = xs[j] · w[r] for each row r of `w` and each of the N rows of `xs`, all
    /// `width` wide (out is (R, N)): matrix-vector products for a few vectors, reading the matrix
    /// once, in its rows' order. Each dot product is `dot16`'s, bit for bit, four rows of `xs`
    /// at a time against each row of `w` (one row's 16 lanes alone wait on the adder's latency).
    pub(crate) fn matvecs(out: &mut [f32], xs: &[f32], w: &[f32], width: usize) {
        let n = xs.len() / width;
        for (out, row) in out.chunks_exact_mut(n).zip(w.chunks_exact(width)) {
            let mut j = 0;
            while j + 4 <= n {
                let x = |k: usize| &xs[(j + k) * width..][..width];
                let dots = dot16_4([x(0), x(1), x(2), x(3)], row);
                out[j..j + 4].copy_from_slice(&dots);
                j += 4;
            }
            for j in j..n {
                out[j] = dot16(&xs[j * width..][..width], row);
            }
        }
    }
}

/// `dot16` of four vectors with one: the same sums, in the same order, for each (four lane sets
/// side by side, written out so that they stay in registers).
#[inline(always)]
fn dot16_4(xs: [&[f32]; 4], w: &[f32]) -> [f32; 4] {
    let (mut l0, mut l1, mut l2, mut l3) = ([0f32; 16], [0f32; 16], [0f32; 16], [0f32; 16]);
    let len = w.len();
    let [x0, x1, x2, x3] = xs.map(|x| &x[..len]);
    let chunks = w.chunks_exact(16).zip(x0.chunks_exact(16)).zip(x1.chunks_exact(16));
    let chunks = chunks.zip(x2.chunks_exact(16)).zip(x3.chunks_exact(16));
    for ((((w, a), b), c), d) in chunks {
        for k in 0..16 {
            l0[k] += a[k] * w[k];
            l1[k] += b[k] * w[k];
            l2[k] += c[k] * w[k];
            l3[k] += d[k] * w[k];
        }
    }
    let whole = len / 16 * 16;
    let lanes = [l0, l1, l2, l3];
    std::array::from_fn(|r| {
        let tail: f32 = xs[r][whole..len].iter().zip(&w[whole..]).map(|(a, b)| a * b).sum();
        lanes[r].iter().sum::<f32>() + tail
    })
}

widest! {
    /// x += branch (a residual add in place).
    pub(crate) fn add_assign(x: &mut [f32], branch: &[f32]) {
        x.iter_mut().zip(branch).for_each(|(x, &b)| *x += b);
    }
}

widest! {
    /// e^(s · scale - lse) for each score s of a row, in place: a softmax again from its
    /// log-sum-exp.
    pub(crate) fn softmax_from_lse(row: &mut [f32], scale: f32, lse: f32) {
        exp_scaled(row, scale, lse);
    }
}

widest! {
    /// The gradient of a row's scaled softmax, in place of dL/dp (`grad`), from its
    /// probabilities: dL/ds = scale · p · (dL/dp - Σ p · dL/dp).
    pub(crate) fn softmax_backward(grad: &mut [f32], p: &[f32], scale: f32) {
        let row_dot = dot16(p, grad);
        grad.iter_mut().zip(p).for_each(|(g, &p)| *g = scale * p * (*g - row_dot));
    }
}

widest! {
    /// The mean cross-entropy's row: -log softmax(row)[target].
    pub(crate) fn cross_entropy(row: &[f32], target: usize) -> f32 {
        let (max, sum) = logsumexp_parts(row);
        sum.ln() + max - row[target]
    }
}

widest! {
    /// The cross-entropy's gradient over a row of logits, in place: (softmax - one_hot) · g.
    pub(crate) fn cross_entropy_backward(row: &mut [f32], target: usize, g: f32) {
        let (max, sum) = logsumexp_parts(row);
        let scale = g / sum;
        row.iter_mut().for_each(|v| *v = exp(*v - max) * scale);
        row[target] -= g;
    }
}

widest! {
    /// GELU (tanh approximation) of `x` into `out`.
    pub(crate) fn gelu(out: &mut [f32], x: &[f32]) {
        let ((outs, out_rest), (xs, x_rest)) = (out.as_chunks_mut::<LANES>(), x.as_chunks::<LANES>());
        for (out, x) in outs.iter_mut().zip(xs) {
            gelu_tanh_lanes(out, x);
            for k in 0..LANES {
                out[k] = gelu_with_tanh(x[k], out[k]);
            }
        }
        out_rest.iter_mut().zip(x_rest).for_each(|(y, &x)| *y = gelu_at(x));
    }
}

widest! {
    /// GELU of `x` into `out`, keeping the tanh of each input in `tanh` for the backward pass
    /// (the exp and the division are most of GELU's cost).
    pub(crate) fn gelu_keeping_tanh(out: &mut [f32], tanh: &mut [f32], x: &[f32]) {
        let (outs, out_rest) = out.as_chunks_mut::<LANES>();
        let ((tanhs, tanh_rest), (xs, x_rest)) = (tanh.as_chunks_mut::<LANES>(), x.as_chunks::<LANES>());
        for ((out, t), x) in outs.iter_mut().zip(tanhs.iter_mut()).zip(xs) {
            gelu_tanh_lanes(t, x);
            for k in 0..LANES {
                out[k] = gelu_with_tanh(x[k], t[k]);
            }
        }
        for ((y, t), &x) in out_rest.iter_mut().zip(tanh_rest.iter_mut()).zip(x_rest) {
            *t = gelu_tanh(x);
            *y = gelu_with_tanh(x, *t);
        }
    }
}

widest! {
    /// GELU's backward in place of dL/dy (`grad`), at the inputs `x` whose tanh the forward
    /// kept.
    pub(crate) fn gelu_backward(grad: &mut [f32], x: &[f32], tanh: &[f32]) {
        for ((g, &x), &t) in grad.iter_mut().zip(x).zip(tanh) {
            *g = gelu_grad_with_tanh(x, t, *g);
        }
    }
}

widest! {
    /// LayerNorm of one row into `out`; returns (mean, 1 / std).
    pub(crate) fn layer_norm(out: &mut [f32], x: &[f32], w: &[f32], b: Option<&[f32]>, eps: f32) -> (f32, f32) {
        let n = x.len() as f32;
        let mean = sum16(x) / n;
        out.iter_mut().zip(x).for_each(|(o, &x)| *o = x - mean);
        let rstd = 1.0 / (dot16(out, out) / n + eps).sqrt();
        out.iter_mut().zip(w).for_each(|(o, &w)| *o = *o * rstd * w);
        if let Some(b) = b {
            out.iter_mut().zip(b).for_each(|(o, &b)| *o += b);
        }
        (mean, rstd)
    }
}

widest! {
    /// LayerNorm's backward for one row: dx += its gradient; the weight's and bias's gradients
    /// += this row's parts (`dw`, `db`). `norm` is scratch of the row's width.
    pub(crate) fn layer_norm_backward(
        dx: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
        norm: &mut [f32],
        dout: &[f32],
        x: &[f32],
        w: &[f32],
        stats: (f32, f32),
    ) {
        let (mean, rstd) = stats;
        let n = x.len() as f32;
        norm.iter_mut().zip(x).for_each(|(h, &x)| *h = (x - mean) * rstd);
        dw.iter_mut().zip(dout.iter().zip(norm.iter())).for_each(|(dw, (&g, &h))| *dw += g * h);
        db.iter_mut().zip(dout).for_each(|(db, &g)| *db += g);
        // dL/dx̂ = dout · w; dx = rstd · (dx̂ - mean(dx̂) - x̂ · mean(dx̂ · x̂))
        let mut lanes = ([0f32; 16], [0f32; 16]);
        let rows = dout.chunks_exact(16).zip(w.chunks_exact(16)).zip(norm.chunks_exact(16));
        for ((g, w), h) in rows {
            for k in 0..16 {
                let d = g[k] * w[k];
                lanes.0[k] += d;
                lanes.1[k] += d * h[k];
            }
        }
        let (mut sum_d, mut sum_dh) = (lanes.0.iter().sum::<f32>(), lanes.1.iter().sum::<f32>());
        let full = x.len() / 16 * 16;
        for i in full..x.len() {
            let d = dout[i] * w[i];
            sum_d += d;
            sum_dh += d * norm[i];
        }
        let (mean_d, mean_dh) = (sum_d / n, sum_dh / n);
        for ((dx, &h), (&g, &w)) in dx.iter_mut().zip(norm.iter()).zip(dout.iter().zip(w)) {
            *dx += rstd * (g * w - mean_d - h * mean_dh);
        }
    }
}

widest! {
    /// out = input + branch (a residual add without dropout).
    pub(crate) fn add(out: &mut [f32], input: &[f32], branch: &[f32]) {
        out.iter_mut().zip(input.iter().zip(branch)).for_each(|(o, (&x, &b))| *o = x + b);
    }
}

widest! {
    /// An AdamW moment in place: m = β m + (1 - β) g, or g² for the second moment. The arithmetic
    /// of candle's scalar ops (`x * mul + add`), so the op-by-op form gives the same bits.
    pub(crate) fn adamw_moment(m: &mut [f32], g: &[f32], beta: f32, one_minus_beta: f32, squared: bool) {
        match squared {
            false => m.iter_mut().zip(g).for_each(|(m, &g)| *m = (*m * beta + 0.0) + (g * one_minus_beta + 0.0)),
            true => m.iter_mut().zip(g).for_each(|(m, &g)| *m = (*m * beta + 0.0) + ((g * g) * one_minus_beta + 0.0)),
        }
    }
}

widest! {
    /// AdamW's parameter update in place from the new moments: p = p · decay - m / (√v / √bc2 + ε)
    /// · step_size, in the op-by-op form's arithmetic.
    pub(crate) fn adamw_update(
        param: &mut [f32],
        m: &[f32],
        v: &[f32],
        decay: Option<f32>,
        inverse_sqrt_bc2: f32,
        eps: f32,
        step_size: f32,
    ) {
        let decay = |p: f32| match decay {
            Some(decay) => p * decay + 0.0,
            None => p,
        };
        for ((p, &m), &v) in param.iter_mut().zip(m).zip(v) {
            // candle's `+ eps` is `x * 1 + eps`: the same bits
            let denom = (v.sqrt() * inverse_sqrt_bc2 + 0.0) + eps;
            *p = decay(*p) - ((m / denom) * step_size + 0.0);
        }
    }
}

widest! {
    /// Σ g² of a slice, in 16 lanes.
    pub(crate) fn sum_of_squares(g: &[f32]) -> f32 {
        dot16(g, g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_kernels_match_plain_arithmetic() {
        let row: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 / 17.0 - 3.0).collect();
        let mut p = row.clone();
        let lse = softmax(&mut p, 0.5);
        let plain_lse = row.iter().map(|&s| ((s * 0.5) as f64).exp()).sum::<f64>().ln();
        assert!((lse as f64 - plain_lse).abs() < 1e-5, "{lse} vs {plain_lse}");
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        let mut again = row.clone();
        softmax_from_lse(&mut again, 0.5, lse);
        assert!(again.iter().zip(&p).all(|(a, b)| (a - b).abs() < 1e-6));
        let ce = cross_entropy(&row, 3) as f64;
        let expected = row.iter().map(|&s| (s as f64).exp()).sum::<f64>().ln() - row[3] as f64;
        assert!((ce - expected).abs() < 1e-5, "{ce} vs {expected}");
        let (w, b): (Vec<f32>, Vec<f32>) = (0..37).map(|i| (1.0 + i as f32 / 37.0, i as f32 / 50.0)).unzip();
        let mut out = vec![0f32; 37];
        let (mean, rstd) = layer_norm(&mut out, &row, &w, Some(&b), 1e-5);
        let plain_mean = row.iter().sum::<f32>() / 37.0;
        let plain_var = row.iter().map(|&x| (x - plain_mean).powi(2)).sum::<f32>() / 37.0;
        assert!((mean - plain_mean).abs() < 1e-5 && (rstd - 1.0 / (plain_var + 1e-5).sqrt()).abs() < 1e-4);
        assert!((out[5] - ((row[5] - plain_mean) * rstd * w[5] + b[5])).abs() < 1e-5);
    }

    #[test]
    fn exp_kernels_give_each_value_its_own_bits_in_passes_and_alone() {
        use crate::gpt::ops::cpu::gelu_at;
        // Two passes of 64 values and a rest of 22.
        let x: Vec<f32> = (0..150).map(|i| ((i * 7919) % 1001) as f32 / 100.0 - 5.0).collect();
        let (mut out, mut kept, mut tanh) = (vec![0f32; 150], vec![0f32; 150], vec![0f32; 150]);
        gelu(&mut out, &x);
        gelu_keeping_tanh(&mut kept, &mut tanh, &x);
        let mut shifted = x.clone();
        softmax_from_lse(&mut shifted, 0.5, 1.0);
        for i in 0..150 {
            assert_eq!(out[i].to_bits(), gelu_at(x[i]).to_bits(), "gelu({})", x[i]);
            assert_eq!(kept[i].to_bits(), out[i].to_bits(), "gelu_keeping_tanh({})", x[i]);
            assert_eq!(tanh[i].to_bits(), gelu_tanh(x[i]).to_bits(), "tanh at {}", x[i]);
            assert_eq!(shifted[i].to_bits(), exp(x[i] * 0.5 - 1.0).to_bits(), "exp({} / 2 - 1)", x[i]);
        }
    }

    #[test]
    fn matvecs_are_each_rows_dot_product_bit_for_bit() {
        let value = |i: usize| ((i * 7919) % 101) as f32 / 17.0 - 3.0;
        // 37 wide: two 16-lane chunks and a tail; 7 vectors: a group of four and three alone.
        let (width, rows, n) = (37, 5, 7);
        let w: Vec<f32> = (0..rows * width).map(value).collect();
        let xs: Vec<f32> = (0..n * width).map(|i| value(i + 3) * 0.5).collect();
        let mut out = vec![0f32; rows * n];
        matvecs(&mut out, &xs, &w, width);
        for r in 0..rows {
            for j in 0..n {
                let (x, row) = (&xs[j * width..][..width], &w[r * width..][..width]);
                assert_eq!(out[r * n + j].to_bits(), dot16(x, row).to_bits(), "row {r}, vector {j}");
                let plain: f64 = x.iter().zip(row).map(|(&a, &b)| a as f64 * b as f64).sum();
                assert!((out[r * n + j] as f64 - plain).abs() < 1e-4);
            }
        }
        // One vector alone gives the same as among others.
        let mut alone = vec![0f32; rows];
        matvecs(&mut alone, &xs[2 * width..][..width], &w, width);
        assert!((0..rows).all(|r| alone[r].to_bits() == out[r * n + 2].to_bits()));
    }
}
