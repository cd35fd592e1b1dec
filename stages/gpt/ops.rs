//! Fused CPU kernels for the GPT's elementwise spots, each with its backward: GELU, LayerNorm's
//! normalization and the attention's causal softmax. Built from candle's plain ops, each of these
//! is a chain of 5 to 12 passes over memory and as many allocations, forward and backward, and on
//! the CPU recipe they cost more than the matmuls (`cargo bench -p nanoflow-stages --bench model`:
//! GELU's `tanh` and `powf` alone were a fifth of a step). Here each is one pass each way.
//!
//! On other devices, and for dtypes other than f32, the same functions run the plain-op versions
//! (`plain::*`), which are also what the tests check the fused ones against.

#[cfg(feature = "cuda")]
use candle_core::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// √(2/π), GPT-2's GELU (the tanh approximation, HF's `gelu_new`).
const GELU_K: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// GELU, tanh approximation.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    match fused(x) {
        true => x.contiguous()?.apply_op1(Gelu),
        false => plain::gelu(x),
    }
}

/// (x - mean) / sqrt(var + eps) over the last dimension (biased variance, as PyTorch's
/// LayerNorm); the affine part stays with the caller.
pub fn normalize(x: &Tensor, eps: f32) -> Result<Tensor> {
    match fused(x) {
        true => x.contiguous()?.apply_op1(Normalize { eps }),
        false => plain::normalize(x, eps),
    }
}

/// Attention probabilities from raw scores `att` (B, nh, T, past + T): softmax over the last
/// dimension of `att * scale`, where query i (position past + i) sees keys 0..=past + i only.
pub fn causal_softmax(att: &Tensor, scale: f64, past: usize) -> Result<Tensor> {
    match fused(att) {
        true => att.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32, past }),
        false => plain::causal_softmax(att, scale, past),
    }
}

/// Causal self-attention from the packed projections `qkv` (B, T, 3C) (queries, keys, values
/// side by side, `n_head` heads of C / n_head each) to the heads' outputs side by side (B, T, C):
/// softmax(q kᵀ / √hs, causal) v per head. Training without dropout and without a cache; the
/// fused kernel skips the head split and merge copies and the T×T score tensors.
pub fn causal_attention(qkv: &Tensor, n_head: usize, dtype: DType) -> Result<Tensor> {
    match qkv.device().is_cpu() && qkv.dtype() == DType::F32 && dtype == DType::F32 {
        true => qkv.contiguous()?.apply_op1(CausalAttention { n_head }),
        // Heads by matmuls (in `dtype`) around the causal softmax, fused where it can be.
        false => attention_by_matmuls(qkv, n_head, dtype, causal_softmax),
    }
}

/// The mean cross-entropy of logits (N, V) against targets (N) u32. Fused, it never builds the
/// (N, V) log-softmax: the forward keeps one loss per row, the backward recomputes each row's
/// softmax as it writes the gradient (for GPT-2's 50304-wide vocabulary that (N, V) tensor is
/// the largest of the step).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    match fused(logits) && targets.dtype() == DType::U32 {
        true => logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy)?.mean_all(),
        false => candle_nn::loss::cross_entropy(logits, targets),
    }
}

/// `a · b` with the multiplication in `dtype` and the product in float32: mixed precision's
/// matmul (bfloat16 or float16 inputs, float32 accumulation in cuBLAS), or a plain float32 one.
pub fn matmul_as(a: &Tensor, b: &Tensor, dtype: DType) -> Result<Tensor> {
    if a.dtype() == dtype && b.dtype() == dtype {
        return a.matmul(b);
    }
    a.to_dtype(dtype)?.matmul(&b.to_dtype(dtype)?)?.to_dtype(DType::F32)
}

/// Whether the fused kernel runs: f32 on the CPU, or on CUDA with `--features cuda`.
fn fused(x: &Tensor) -> bool {
    x.dtype() == DType::F32 && (x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda()))
}

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

/// e^x, within ~2e-7 relative for |x| < 87, in plain arithmetic the compiler vectorizes (libm's
/// `expf`/`tanhf` are calls, one element at a time).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer, kept in the bits
    let x = x.clamp(-87.0, 87.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO; // |r| <= ln2/2
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n, built in the exponent bits: the low bits of `shifted` hold n.
    let scale = f32::from_bits(shifted.to_bits().wrapping_sub(0x4B40_0000).wrapping_add(127) << 23);
    p * scale
}

/// tanh(u) = 1 - 2 / (e^2u + 1), within ~2e-7 absolute.
#[inline(always)]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u.clamp(-9.0, 9.0)) + 1.0)
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(16_384).zip(x.par_chunks(16_384)).for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = 0.5 * x * (1.0 + tanh(GELU_K * (x + GELU_C * x * x * x)));
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
struct GeluBackward;

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "gelu-tanh-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, grad) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(16_384).zip(x.par_chunks(16_384).zip(grad.par_chunks(16_384))).for_each(|(dx, (x, g))| {
            for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                let x2 = x * x;
                let t = tanh(GELU_K * (x + GELU_C * x2 * x));
                let du = GELU_K * (1.0 + 3.0 * GELU_C * x2);
                *dx = g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du);
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

struct Normalize {
    eps: f32,
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
struct NormalizeBackward {
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

struct CausalSoftmax {
    scale: f32,
    past: usize,
}

impl CausalSoftmax {
    /// (T, keys): the query count and key count of `shape` (…, T, past + T).
    fn dims(&self, shape: &Shape) -> Result<(usize, usize)> {
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
struct SoftmaxBackward {
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
struct CrossEntropy;

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
struct CrossEntropyBackward;

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

#[cfg(feature = "cuda")]
mod cuda {
    //! Launching kernels/ops.cu's kernels on candle's CUDA storage.

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};

    /// A scalar kernel argument after the buffers.
    pub enum Arg {
        U32(u32),
        U64(u64),
        F32(f32),
    }
    use candle_core::{CudaStorage, Layout, Result, Shape, bail};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ops.ptx"));
    /// Threads per row of the row-wise kernels (ROW_THREADS in ops.cu).
    const ROW_THREADS: u32 = 256;

    fn view<'a, T: candle_core::cuda_backend::CudaDType>(
        storage: &'a CudaStorage,
        layout: &Layout,
    ) -> Result<CudaView<'a, T>> {
        match layout.contiguous_offsets() {
            Some((start, end)) => Ok(storage.as_cuda_slice::<T>()?.slice(start..end)),
            None => bail!("fused kernel: the input must be contiguous"),
        }
    }

    /// f(inputs..., out, n) over every element, in a grid-stride loop.
    pub fn elementwise(
        name: &str,
        inputs: &[(&CudaStorage, &Layout)],
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let n = layout.shape().elem_count();
        let blocks = (n as u32).div_ceil(256).clamp(1, 65_535);
        let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch(name, inputs, layout, &[Arg::U64(n as u64)], config)
    }

    /// f(inputs..., out, extra args...) with one block per row of `layout`'s last dimension.
    pub fn rows(
        name: &str,
        inputs: &[(&CudaStorage, &Layout)],
        layout: &Layout,
        extra: &[Arg],
    ) -> Result<(CudaStorage, Shape)> {
        let width = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let rows = (layout.shape().elem_count() / width) as u32;
        launch(name, inputs, layout, extra, row_config(rows))
    }

    /// f(inputs..., out, extra...) into a new f32 buffer of `layout`'s shape.
    fn launch(
        name: &str,
        inputs: &[(&CudaStorage, &Layout)],
        layout: &Layout,
        extra: &[Arg],
        config: LaunchConfig,
    ) -> Result<(CudaStorage, Shape)> {
        let device = inputs[0].0.device().clone();
        let views = inputs.iter().map(|(s, l)| view::<f32>(s, l)).collect::<Result<Vec<_>>>()?;
        let out = unsafe { device.alloc::<f32>(layout.shape().elem_count())? };
        let func = device.get_or_load_custom_func(name, "nanoflow_ops", PTX)?;
        let mut builder = func.builder();
        for view in &views {
            builder.arg(view);
        }
        builder.arg(&out);
        for arg in extra {
            match arg {
                Arg::U32(value) => builder.arg(value),
                Arg::U64(value) => builder.arg(value),
                Arg::F32(value) => builder.arg(value),
            };
        }
        if config.grid_dim.0 > 0 {
            unsafe { builder.launch(config) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, device), layout.shape().clone()))
    }

    /// The cross-entropy kernels: f(logits, targets, [grad,] out, vocab), a block per row.
    pub fn cross_entropy(
        name: &str,
        logits: (&CudaStorage, &Layout),
        targets: (&CudaStorage, &Layout),
        grad: Option<(&CudaStorage, &Layout)>,
        rows: usize,
        out_len: usize,
        vocab: u32,
    ) -> Result<(CudaStorage, Shape)> {
        let device = logits.0.device().clone();
        let logits = view::<f32>(logits.0, logits.1)?;
        let targets = view::<u32>(targets.0, targets.1)?;
        let grad = grad.map(|(s, l)| view::<f32>(s, l)).transpose()?;
        let out = unsafe { device.alloc::<f32>(out_len)? };
        let func = device.get_or_load_custom_func(name, "nanoflow_ops", PTX)?;
        let mut builder = func.builder();
        builder.arg(&logits).arg(&targets);
        if let Some(grad) = &grad {
            builder.arg(grad);
        }
        builder.arg(&out).arg(&vocab);
        if rows > 0 {
            unsafe { builder.launch(row_config(rows as u32)) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(rows)))
    }

    /// One block of ROW_THREADS per row.
    fn row_config(rows: u32) -> LaunchConfig {
        LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 }
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

struct CausalAttention {
    n_head: usize,
}

impl CausalAttention {
    /// (T, C) of `qkv` (B, T, 3C).
    fn dims(&self, shape: &Shape) -> Result<(usize, usize)> {
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
struct Head {
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
struct CausalAttentionBackward {
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

/// The same functions from candle's differentiable ops: what other devices run, and the
/// reference the fused kernels are tested against.
/// Causal self-attention from packed (B, T, 3C) qkv with the heads as batched matmuls in
/// `dtype` and `softmax` (scores, scale, past) between them.
fn attention_by_matmuls(
    qkv: &Tensor,
    n_head: usize,
    dtype: DType,
    softmax: fn(&Tensor, f64, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let (t, c) = CausalAttention { n_head }.dims(qkv.shape())?;
    let b = qkv.dim(0)?;
    let hs = c / n_head;
    // (B, nh, T, hs): the heads move next to the batch.
    let head = |i: usize| qkv.narrow(2, i * c, c)?.reshape((b, t, n_head, hs))?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (head(0)?, head(1)?, head(2)?);
    let att = softmax(&matmul_as(&q, &k.t()?, dtype)?, 1.0 / (hs as f64).sqrt(), 0)?;
    matmul_as(&att, &v, dtype)?.transpose(1, 2)?.reshape((b, t, c)) // the heads side by side again
}

pub mod plain {
    use super::*;

    pub fn gelu(x: &Tensor) -> Result<Tensor> {
        // candle's `gelu` is the tanh approximation.
        x.gelu()
    }

    pub fn normalize(x: &Tensor, eps: f32) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?; // (B, T, 1)
        let x = x.broadcast_sub(&mean)?; // (B, T, C)
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?; // (B, T, 1), biased as PyTorch's
        x.broadcast_div(&(variance + eps as f64)?.sqrt()?)
    }

    #[cfg(test)]
    pub fn causal_attention(qkv: &Tensor, n_head: usize, dtype: DType) -> Result<Tensor> {
        attention_by_matmuls(qkv, n_head, dtype, causal_softmax)
    }

    pub fn causal_softmax(att: &Tensor, scale: f64, past: usize) -> Result<Tensor> {
        let (t, keys) = CausalSoftmax { scale: scale as f32, past }.dims(att.shape())?;
        let att = (att * scale)?;
        let att = if t > 1 {
            let mask: Vec<u8> = (0..t).flat_map(|i| (0..keys).map(move |j| u8::from(j > past + i))).collect();
            let future = Tensor::from_vec(mask, (t, keys), att.device())?.broadcast_as(att.shape())?;
            let minus_infinity = Tensor::new(f32::NEG_INFINITY, att.device())?.to_dtype(att.dtype())?;
            future.where_cond(&minus_infinity.broadcast_as(att.shape())?, &att)?
        } else {
            att // one new position sees every cached one
        };
        candle_nn::ops::softmax(&att, D::Minus1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        a.sub(b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn exp_and_tanh_are_libms_to_float_precision() {
        for i in -8700..=8700 {
            let x = i as f32 / 100.0;
            let relative = (exp(x) - x.exp()).abs() / x.exp();
            assert!(relative < 4e-7, "exp({x}): {} vs {}", exp(x), x.exp());
        }
        for i in -2000..=2000 {
            let u = i as f32 / 100.0;
            assert!((tanh(u) - u.tanh()).abs() < 3e-7, "tanh({u}): {} vs {}", tanh(u), u.tanh());
        }
    }

    /// Each fused op against its plain version on random inputs: the values, and the gradient of
    /// a random linear function of the output.
    fn check(
        shape: &[usize],
        fused: impl Fn(&Tensor) -> Result<Tensor>,
        plain: impl Fn(&Tensor) -> Result<Tensor>,
        tolerance: f32,
    ) -> Result<()> {
        check_on(&Device::Cpu, shape, fused, plain, tolerance)
    }

    /// The fused op on `device` against the plain ops on the CPU, values and gradients, for the
    /// same random input.
    fn check_on(
        device: &Device,
        shape: &[usize],
        fused: impl Fn(&Tensor) -> Result<Tensor>,
        plain: impl Fn(&Tensor) -> Result<Tensor>,
        tolerance: f32,
    ) -> Result<()> {
        let x = (Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * 3.0)?;
        let (x_fused, x_plain) = (Var::from_tensor(&x.to_device(device)?)?, Var::from_tensor(&x)?);
        let (y_fused, y_plain) = (fused(x_fused.as_tensor())?.to_device(&Device::Cpu)?, plain(x_plain.as_tensor())?);
        let weights = Tensor::randn(0f32, 1.0, y_plain.shape(), &Device::Cpu)?;
        assert!(max_abs_diff(&y_fused, &y_plain) < tolerance, "values differ by {}", max_abs_diff(&y_fused, &y_plain));
        let grad = |x: &Var, y: &Tensor| -> Result<Tensor> {
            let grads = (y * &weights.to_device(y.device())?)?.sum_all()?.backward()?;
            grads.get(x.as_tensor()).expect("a gradient").to_device(&Device::Cpu)
        };
        let y_fused = fused(x_fused.as_tensor())?;
        let (g_fused, g_plain) = (grad(&x_fused, &y_fused)?, grad(&x_plain, &y_plain)?);
        let scale = g_plain.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
        let diff = max_abs_diff(&g_fused, &g_plain) / scale;
        assert!(diff < tolerance, "gradients differ by {diff} (relative to {scale})");
        Ok(())
    }

    fn targets(rows: usize, vocab: usize, device: &Device) -> Tensor {
        let mut rng = crate::gpt::Rng::new(7);
        let targets: Vec<u32> = (0..rows).map(|_| (rng.uniform() * vocab as f64) as u32).collect();
        Tensor::from_vec(targets, rows, device).unwrap()
    }

    #[test]
    fn fused_cross_entropy_matches_candles() -> Result<()> {
        let (rows, vocab) = (37, 101);
        let fused = |x: &Tensor| cross_entropy(x, &targets(rows, vocab, x.device()));
        let plain = |x: &Tensor| candle_nn::loss::cross_entropy(x, &targets(rows, vocab, x.device()));
        check(&[rows, vocab], fused, plain, 1e-5)?;
        let outside = Tensor::new(&[0u32, 101], &Device::Cpu)?;
        let error = cross_entropy(&Tensor::zeros((2, 101), DType::F32, &Device::Cpu)?, &outside).unwrap_err();
        assert!(error.to_string().contains("target 101 is outside the vocabulary of 101"), "{error}");
        Ok(())
    }

    /// The CUDA kernels against the plain ops: opt-in (`--include-ignored`, as `.ci/gpu-check`
    /// runs it) on a machine with a GPU and `--features cuda`, where no GPU is a failure.
    #[cfg(feature = "cuda")]
    #[test]
    #[ignore = "needs a CUDA GPU: run with --include-ignored there"]
    fn cuda_kernels_match_the_plain_ops() -> Result<()> {
        let device = Device::new_cuda(0).expect("a CUDA device (this test is for GPU machines)");
        check_on(&device, &[3, 7, 50], gelu, plain::gelu, 1e-4)?;
        check_on(&device, &[2, 5, 768], |x| normalize(x, 1e-5), |x| plain::normalize(x, 1e-5), 1e-4)?;
        for (t, past) in [(9, 0), (5, 3), (1, 6), (300, 0)] {
            check_on(
                &device,
                &[2, 3, t, past + t],
                |x| causal_softmax(x, 0.125, past),
                |x| plain::causal_softmax(x, 0.125, past),
                1e-4,
            )?;
        }
        let (rows, vocab) = (64, 50304);
        let fused = |x: &Tensor| cross_entropy(x, &targets(rows, vocab, x.device()));
        let plain = |x: &Tensor| candle_nn::loss::cross_entropy(x, &targets(rows, vocab, x.device()));
        check_on(&device, &[rows, vocab], fused, plain, 1e-4)
    }

    #[test]
    fn fused_gelu_matches_candles() -> Result<()> {
        check(&[3, 7, 50], gelu, plain::gelu, 1e-5)
    }

    #[test]
    fn fused_normalize_matches_the_plain_ops() -> Result<()> {
        check(&[2, 5, 48], |x| normalize(x, 1e-5), |x| plain::normalize(x, 1e-5), 1e-5)
    }

    #[test]
    fn fused_attention_matches_heads_matmuls_and_softmax() -> Result<()> {
        check(
            &[3, 7, 3 * 24],
            |x| causal_attention(x, 4, DType::F32),
            |x| plain::causal_attention(x, 4, DType::F32),
            1e-5,
        )?;
        check(
            &[2, 1, 3 * 8],
            |x| causal_attention(x, 2, DType::F32),
            |x| plain::causal_attention(x, 2, DType::F32),
            1e-5,
        )
    }

    #[test]
    fn fused_causal_softmax_matches_mask_and_softmax() -> Result<()> {
        // Training (no cache), a prompt after cached positions, and one new position.
        for (t, past) in [(9, 0), (5, 3), (1, 6)] {
            check(
                &[2, 3, t, past + t],
                |x| causal_softmax(x, 0.35, past),
                |x| plain::causal_softmax(x, 0.35, past),
                1e-5,
            )?;
        }
        let p = causal_softmax(&Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu)?, 1.0, 0)?;
        assert_eq!(p.flatten_all()?.to_vec1::<f32>()?, [1.0, 0.0, 0.0, 0.5, 0.5, 0.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]);
        Ok(())
    }
}
