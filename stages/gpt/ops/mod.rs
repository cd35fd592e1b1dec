//! The GPT's fused kernels, each with its backward: GELU, LayerNorm's normalization, the
//! attention's causal softmax, causal attention from packed qkv (CPU) and the cross-entropy.
//! Built from candle's plain ops, each of these is a chain of 5 to 12 passes over memory and as
//! many allocations, forward and backward, and on the CPU recipe they cost more than the matmuls
//! (`cargo bench -p nanoflow-stages --bench model`: GELU's `tanh` and `powf` alone were a fifth
//! of a step). Fused, each is one pass each way.
//!
//! This file dispatches: f32 on the CPU runs `cpu.rs`'s kernels, f32 on CUDA (`--features cuda`)
//! `kernels.cu`'s through `cuda.rs`, and everything else (other dtypes) the plain-op versions in
//! `plain.rs`, which are also what the tests check the fused ones against.

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
pub mod plain;
pub(crate) mod simd;
pub(crate) mod tiles;

use candle_core::{DType, Result, Tensor};

use cpu::{CausalAttention, CausalSoftmax, CrossEntropy, Gelu, Normalize};

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

#[cfg(test)]
mod tests {
    use super::cpu::{exp, tanh};
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
