//! The fused kernels' CPU halves (f32, contiguous, rayon over rows), as candle `CustomOp`s whose
//! `cuda_fwd` launches the CUDA halves (`cuda.rs`).

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

#[cfg(feature = "cuda")]
use super::cuda;

/// √(2/π), GPT-2's GELU (the tanh approximation, HF's `gelu_new`).
const GELU_K: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// The contiguous f32 data of a CPU tensor.
fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: the input must be contiguous"),
    }
}

/// The size of the last dimension: the rows the row-wise kernels work on.
fn width(layout: &Layout) -> usize {
    layout.shape().dims().last().copied().unwrap_or(1)
}

/// A new buffer of `a`'s size whose rows of `width` are `f(row index, a's row, b's row, out row)`,
/// computed in parallel tasks of about 16K elements. One-input kernels pass their input twice.
fn map_rows(a: &[f32], b: &[f32], width: usize, f: impl Fn(usize, &[f32], &[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    let rows = (16_384 / width.max(1)).max(1);
    let task = rows * width;
    out.par_chunks_mut(task).zip(a.par_chunks(task).zip(b.par_chunks(task))).enumerate().for_each(
        |(index, (out, (a, b)))| {
            let row_pairs = a.chunks_exact(width).zip(b.chunks_exact(width));
            for (row, (out, (a, b))) in out.chunks_exact_mut(width).zip(row_pairs).enumerate() {
                f(index * rows + row, a, b, out);
            }
        },
    );
    out
}

/// Softmax of a row of scores, in place.
#[inline]
fn softmax_in_place(row: &mut [f32]) {
    let max = row.iter().fold(f32::NEG_INFINITY, |max, &v| max.max(v));
    let mut sum = 0.0;
    for p in row.iter_mut() {
        *p = exp(*p - max);
        sum += *p;
    }
    let inverse = 1.0 / sum;
    row.iter_mut().for_each(|p| *p *= inverse);
}

/// Values per pass of the exp-based kernels (GELU, softmax): e^x is a chain of ~20 dependent
/// operations, and a loop over one vector at a time waits on each one's latency; a step at a time
/// over 64 values keeps the pipelines full (GELU 31% faster on AMD Zen 1, the same bits).
pub(crate) const LANES: usize = 64;

/// e^x of each of L values in place, within ~2e-7 relative for |x| < 87, in plain arithmetic
/// the compiler vectorizes (libm's `expf`/`tanhf` are calls, one element at a time), a step at
/// a time across the values: each value's operations are the same whatever L, so are its bits.
#[inline(always)]
pub(crate) fn exp_lanes<const L: usize>(x: &mut [f32; L]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer, kept in the bits
    let (mut shifted, mut r) = ([0f32; L], [0f32; L]);
    for k in 0..L {
        x[k] = x[k].clamp(-87.0, 87.0);
        shifted[k] = x[k] * LOG2E + ROUND;
        let n = shifted[k] - ROUND;
        r[k] = x[k] - n * LN2_HI - n * LN2_LO; // |r| <= ln2/2
    }
    // Σ r^i / i! for i <= 7, innermost first.
    let mut p = [1.0 / 5040.0; L];
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        for k in 0..L {
            p[k] = c + r[k] * p[k];
        }
    }
    for k in 0..L {
        // 2^n, built in the exponent bits: the low bits of `shifted` hold n.
        x[k] = p[k] * f32::from_bits(shifted[k].to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    }
}

/// e^x (`exp_lanes` of one value).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let mut x = [x];
    exp_lanes(&mut x);
    x[0]
}

/// tanh(u) = 1 - 2 / (e^2u + 1) of each of L values in place, within ~2e-7 absolute.
#[inline(always)]
fn tanh_lanes<const L: usize>(u: &mut [f32; L]) {
    u.iter_mut().for_each(|u| *u = 2.0 * u.clamp(-9.0, 9.0));
    exp_lanes(u);
    u.iter_mut().for_each(|e| *e = 1.0 - 2.0 / (*e + 1.0));
}

/// tanh(u) (`tanh_lanes` of one value), for the tests against libm's.
#[cfg(test)]
pub(super) fn tanh(u: f32) -> f32 {
    let mut u = [u];
    tanh_lanes(&mut u);
    u[0]
}

/// GELU (tanh approximation) of one value.
#[inline(always)]
pub(crate) fn gelu_at(x: f32) -> f32 {
    gelu_with_tanh(x, gelu_tanh(x))
}

/// GELU at `x` whose inner tanh `t` is known.
#[inline(always)]
pub(crate) fn gelu_with_tanh(x: f32, t: f32) -> f32 {
    0.5 * x * (1.0 + t)
}

/// The tanh inside GELU of each of L values `x`, into `t`.
#[inline(always)]
pub(crate) fn gelu_tanh_lanes<const L: usize>(t: &mut [f32; L], x: &[f32; L]) {
    for k in 0..L {
        t[k] = GELU_K * (x[k] + GELU_C * x[k] * x[k] * x[k]);
    }
    tanh_lanes(t);
}

/// The tanh inside GELU at `x`.
#[inline(always)]
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    let mut t = [0.0];
    gelu_tanh_lanes(&mut t, &[x]);
    t[0]
}

/// dL/dx of GELU at `x`, given dL/dy = `g`.
#[inline(always)]
fn gelu_grad_at(x: f32, g: f32) -> f32 {
    gelu_grad_with_tanh(x, gelu_tanh(x), g)
}

/// dL/dx of GELU at `x` whose inner tanh `t` is known, given dL/dy = `g`.
#[inline(always)]
pub(crate) fn gelu_grad_with_tanh(x: f32, t: f32, g: f32) -> f32 {
    let du = GELU_K * (1.0 + 3.0 * GELU_C * x * x);
    g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du)
}

pub(super) struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(16_384).zip(x.par_chunks(16_384)).for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = gelu_at(x);
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluBackward)?))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        cuda::elementwise("gelu_fwd", &[(storage, layout)], layout)
    }
}

/// (x, dL/dy) -> dL/dx of GELU.
pub(super) struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-tanh-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, grad) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(16_384).zip(x.par_chunks(16_384).zip(grad.par_chunks(16_384))).for_each(|(dx, (x, g))| {
            for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                *dx = gelu_grad_at(x, g);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        cuda::elementwise("gelu_bwd", &[(s1, l1), (s2, l2)], l1)
    }
}

/// Mean and 1/sqrt(var + eps) of a row.
#[inline]
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

pub(super) struct Normalize {
    pub(super) eps: f32,
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        "layer-norm-normalize"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let y = map_rows(x, x, width(layout), |_, x, _, y| {
            let (mean, rstd) = moments(x, self.eps);
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - mean) * rstd;
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &NormalizeBackward { eps: self.eps })?))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let width = width(layout) as u32;
        cuda::rows("normalize_fwd", &[(storage, layout)], layout, &[cuda::Arg::U32(width), cuda::Arg::F32(self.eps)])
    }
}

/// (x, dL/dx̂) -> dL/dx = rstd · (g - mean(g) - x̂ · mean(g · x̂)), per row.
pub(super) struct NormalizeBackward {
    eps: f32,
}

impl CustomOp2 for NormalizeBackward {
    fn name(&self) -> &'static str {
        "layer-norm-normalize-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, grad) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let dx = map_rows(x, grad, width(l1), |_, x, g, dx| {
            let (mean, rstd) = moments(x, self.eps);
            let n = x.len() as f32;
            let mean_g = g.iter().sum::<f32>() / n;
            let mean_gx = g.iter().zip(x).map(|(&g, &x)| g * (x - mean) * rstd).sum::<f32>() / n;
            for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                *dx = rstd * (g - mean_g - (x - mean) * rstd * mean_gx);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let width = width(l1) as u32;
        cuda::rows("normalize_bwd", &[(s1, l1), (s2, l2)], l1, &[cuda::Arg::U32(width), cuda::Arg::F32(self.eps)])
    }
}

pub(super) struct CausalSoftmax {
    pub(super) scale: f32,
    pub(super) past: usize,
}

impl CausalSoftmax {
    /// (T, keys): the query count and key count of `shape` (…, T, past + T).
    pub(super) fn dims(&self, shape: &Shape) -> Result<(usize, usize)> {
        let dims = shape.dims();
        let (t, keys) = match dims {
            [.., t, keys] => (*t, *keys),
            _ => bail!("causal softmax: scores of rank >= 2 expected, got {shape:?}"),
        };
        if keys != self.past + t {
            bail!("causal softmax: {keys} keys for {t} queries after {} cached positions", self.past);
        }
        Ok((t, keys))
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let scores = slice(storage, layout, self.name())?;
        let (t, keys) = self.dims(layout.shape())?;
        let p = map_rows(scores, scores, keys, |row, s, _, p| {
            // Query `row % t` is position past + row % t: it sees that many keys and itself.
            let seen = self.past + row % t + 1;
            for (p, &s) in p[..seen].iter_mut().zip(&s[..seen]) {
                *p = s * self.scale;
            }
            softmax_in_place(&mut p[..seen]);
        });
        Ok((CpuStorage::F32(p), layout.shape().clone()))
    }

    fn bwd(&self, _scores: &Tensor, p: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(p.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBackward { scale: self.scale })?))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (t, keys) = self.dims(layout.shape())?;
        use cuda::Arg::{F32, U32};
        let args = [U32(t as u32), U32(keys as u32), U32(self.past as u32), F32(self.scale)];
        cuda::rows("causal_softmax_fwd", &[(storage, layout)], layout, &args)
    }
}

/// (p, dL/dp) -> dL/dscores = scale · p · (g - Σ g·p), per row (masked entries have p = 0).
pub(super) struct SoftmaxBackward {
    scale: f32,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "causal-softmax-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (p, grad) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let ds = map_rows(p, grad, width(l1), |_, p, g, ds| {
            let p_dot_g = dot(p, g);
            for ((ds, &p), &g) in ds.iter_mut().zip(p).zip(g) {
                *ds = self.scale * p * (g - p_dot_g);
            }
        });
        Ok((CpuStorage::F32(ds), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let width = width(l1) as u32;
        cuda::rows("softmax_bwd", &[(s1, l1), (s2, l2)], l1, &[cuda::Arg::U32(width), cuda::Arg::F32(self.scale)])
    }
}

/// (logits (N, V), targets (N) u32) -> the loss of each row (N).
pub(super) struct CrossEntropy;

/// logsumexp of a row, as (max, Σ e^(x - max)).
#[inline]
fn logsumexp_parts(row: &[f32]) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |max, &v| max.max(v));
    (max, row.iter().map(|&v| exp(v - max)).sum())
}

/// The contiguous u32 data of a CPU tensor.
fn targets_slice<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u32]> {
    let data = storage.as_slice::<u32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("cross-entropy: the targets must be contiguous"),
    }
}

/// (rows, vocab) of logits and targets that belong together.
fn cross_entropy_dims(logits: &Layout, targets: &Layout) -> Result<(usize, usize)> {
    let (rows, vocab) = logits.shape().dims2()?;
    if targets.shape().dims() != [rows] {
        bail!("cross-entropy: {rows} rows of logits but targets of shape {:?}", targets.shape())
    }
    Ok((rows, vocab))
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = cross_entropy_dims(l1, l2)?;
        let (logits, targets) = (slice(s1, l1, self.name())?, targets_slice(s2, l2)?);
        if let Some(&bad) = targets.iter().find(|&&target| target as usize >= vocab) {
            bail!("cross-entropy: target {bad} is outside the vocabulary of {vocab}")
        }
        let mut loss = vec![0f32; rows];
        loss.par_iter_mut().zip(logits.par_chunks(vocab)).zip(targets.par_iter()).for_each(|((loss, row), &target)| {
            let (max, sum) = logsumexp_parts(row);
            *loss = sum.ln() + max - row[target as usize];
        });
        Ok((CpuStorage::F32(loss), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
        let (rows, vocab) = cross_entropy_dims(l1, l2)?;
        cuda::cross_entropy("cross_entropy_fwd", (s1, l1), (s2, l2), None, rows, rows, vocab as u32)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dlogits = logits.apply_op3_no_bwd(targets, &grad.contiguous()?, &CrossEntropyBackward)?;
        Ok((Some(dlogits), None))
    }
}

/// (logits (N, V), targets (N), dL/dloss (N)) -> dL/dlogits = (softmax - one_hot) · dL/dloss.
pub(super) struct CrossEntropyBackward;

impl CustomOp3 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, vocab) = cross_entropy_dims(l1, l2)?;
        let (logits, targets, grad) =
            (slice(s1, l1, self.name())?, targets_slice(s2, l2)?, slice(s3, l3, self.name())?);
        let mut dlogits = vec![0f32; logits.len()];
        dlogits
            .par_chunks_mut(vocab)
            .zip(logits.par_chunks(vocab))
            .zip(targets.par_iter().zip(grad.par_iter()))
            .for_each(|((d, row), (&target, &g))| {
                let (max, sum) = logsumexp_parts(row);
                let scale = g / sum;
                for (d, &v) in d.iter_mut().zip(row) {
                    *d = exp(v - max) * scale;
                }
                d[target as usize] -= g;
            });
        Ok((CpuStorage::F32(dlogits), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, vocab) = cross_entropy_dims(l1, l2)?;
        let out = cuda::cross_entropy(
            "cross_entropy_bwd",
            (s1, l1),
            (s2, l2),
            Some((s3, l3)),
            rows,
            rows * vocab,
            vocab as u32,
        )?;
        Ok((out.0, l1.shape().clone()))
    }
}

/// a · b, in 8 lanes so that it vectorizes.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = a8.remainder().iter().zip(b8.remainder()).map(|(a, b)| a * b).sum::<f32>();
    for (a, b) in a8.zip(b8) {
        for lane in 0..8 {
            lanes[lane] += a[lane] * b[lane];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// y += a · x.
#[inline(always)]
fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

pub(super) struct CausalAttention {
    pub(super) n_head: usize,
}

impl CausalAttention {
    /// (T, C) of `qkv` (B, T, 3C).
    pub(super) fn dims(&self, shape: &Shape) -> Result<(usize, usize)> {
        match shape.dims() {
            &[_, t, three_c] if three_c % 3 == 0 && (three_c / 3) % self.n_head == 0 => Ok((t, three_c / 3)),
            dims => {
                bail!("causal attention: (B, T, 3C) with C a multiple of {} heads expected, got {dims:?}", self.n_head)
            }
        }
    }
}

/// One head of one sequence, its queries, keys and values gathered out of the packed rows into
/// contiguous (T, hs) blocks, so that the inner loops run over plain slices.
pub(super) struct Head {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    hs: usize,
    scale: f32,
}

impl Head {
    /// Head `h` of the sequence `qkv` (T, 3C).
    fn gather(qkv: &[f32], c: usize, hs: usize, h: usize) -> Head {
        let t = qkv.len() / (3 * c);
        let (mut q, mut k, mut v) =
            (Vec::with_capacity(t * hs), Vec::with_capacity(t * hs), Vec::with_capacity(t * hs));
        for row in qkv.chunks_exact(3 * c) {
            q.extend_from_slice(&row[h * hs..][..hs]);
            k.extend_from_slice(&row[c + h * hs..][..hs]);
            v.extend_from_slice(&row[2 * c + h * hs..][..hs]);
        }
        Head { q, k, v, hs, scale: 1.0 / (hs as f32).sqrt() }
    }

    /// Row i of the attention probabilities, over keys 0..=i, into `p` (i + 1).
    fn probabilities(&self, i: usize, p: &mut [f32]) {
        let query = &self.q[i * self.hs..][..self.hs];
        for (p, key) in p.iter_mut().zip(self.k.chunks_exact(self.hs)) {
            *p = self.scale * dot(query, key);
        }
        softmax_in_place(p);
    }
}

/// Writes the (T, hs) block `block` into columns `offset..offset + hs` of the rows of `rows`.
fn scatter(block: &[f32], rows: &mut [f32], width: usize, offset: usize) {
    let hs = block.len() / (rows.len() / width);
    for (row, part) in rows.chunks_exact_mut(width).zip(block.chunks_exact(hs)) {
        row[offset..][..hs].copy_from_slice(part);
    }
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = slice(storage, layout, self.name())?;
        let (t, c) = self.dims(layout.shape())?;
        let hs = c / self.n_head;
        let mut y = vec![0f32; qkv.len() / 3];
        // One sequence per task: its output rows are the task's own.
        y.par_chunks_mut(t * c).zip(qkv.par_chunks(t * 3 * c)).for_each(|(y, qkv)| {
            let (mut p, mut out) = (vec![0f32; t], vec![0f32; t * hs]);
            for h in 0..self.n_head {
                let head = Head::gather(qkv, c, hs, h);
                out.fill(0.0);
                for (i, out) in out.chunks_exact_mut(hs).enumerate() {
                    let p = &mut p[..=i];
                    head.probabilities(i, p);
                    for (&p, value) in p.iter().zip(head.v.chunks_exact(hs)) {
                        axpy(out, p, value);
                    }
                }
                scatter(&out, y, c, h * hs);
            }
        });
        let (b, _, _) = layout.shape().dims3()?;
        Ok((CpuStorage::F32(y), Shape::from((b, t, c))))
    }

    fn bwd(&self, qkv: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op2_no_bwd(&grad.contiguous()?, &CausalAttentionBackward { n_head: self.n_head })?))
    }
}

/// (qkv, dL/dy) -> dL/dqkv, per sequence and head, with P recomputed:
/// dV = Pᵀ dY, dP = dY Vᵀ, dS = P ⊙ (dP - rowsum(P ⊙ dP)), dQ = dS K / √hs, dK = dSᵀ Q / √hs.
pub(super) struct CausalAttentionBackward {
    n_head: usize,
}

impl CustomOp2 for CausalAttentionBackward {
    fn name(&self) -> &'static str {
        "causal-attention-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (qkv, grad) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let (t, c) = CausalAttention { n_head: self.n_head }.dims(l1.shape())?;
        let hs = c / self.n_head;
        let mut dqkv = vec![0f32; qkv.len()];
        let sequences = qkv.par_chunks(t * 3 * c).zip(grad.par_chunks(t * c));
        dqkv.par_chunks_mut(t * 3 * c).zip(sequences).for_each(|(dqkv, (qkv, dy))| {
            let (mut p, mut dp) = (vec![0f32; t], vec![0f32; t]);
            let (mut dq, mut dk, mut dv, mut dy_head) =
                (vec![0f32; t * hs], vec![0f32; t * hs], vec![0f32; t * hs], vec![0f32; t * hs]);
            for h in 0..self.n_head {
                let head = Head::gather(qkv, c, hs, h);
                for (row, block) in dy.chunks_exact(c).zip(dy_head.chunks_exact_mut(hs)) {
                    block.copy_from_slice(&row[h * hs..][..hs]);
                }
                dq.fill(0.0);
                dk.fill(0.0);
                dv.fill(0.0);
                for (i, dy_i) in dy_head.chunks_exact(hs).enumerate() {
                    let (p, dp) = (&mut p[..=i], &mut dp[..=i]);
                    head.probabilities(i, p);
                    let mut row_dot = 0.0; // Σ_j P_ij dP_ij
                    let values = head.v.chunks_exact(hs).zip(dv.chunks_exact_mut(hs));
                    for ((&p, dp), (value, dv_j)) in p.iter().zip(dp.iter_mut()).zip(values) {
                        axpy(dv_j, p, dy_i); // dV_j += P_ij dY_i
                        *dp = dot(dy_i, value);
                        row_dot += p * *dp;
                    }
                    let query = &head.q[i * hs..][..hs];
                    let dq_i = &mut dq[i * hs..][..hs];
                    let keys = head.k.chunks_exact(hs).zip(dk.chunks_exact_mut(hs));
                    for ((&p, &dp), (key, dk_j)) in p.iter().zip(dp.iter()).zip(keys) {
                        let ds = head.scale * p * (dp - row_dot);
                        axpy(dq_i, ds, key); // dQ_i += dS_ij K_j
                        axpy(dk_j, ds, query); // dK_j += dS_ij Q_i
                    }
                }
                scatter(&dq, dqkv, 3 * c, h * hs);
                scatter(&dk, dqkv, 3 * c, c + h * hs);
                scatter(&dv, dqkv, 3 * c, 2 * c + h * hs);
            }
        });
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}
