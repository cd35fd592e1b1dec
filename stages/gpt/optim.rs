//! The optimizer side of training: nanoGPT's learning-rate schedule, global-norm gradient
//! clipping, and an AdamW whose moments can be saved and restored exactly (candle-nn's `AdamW`
//! keeps them private, and decays every parameter). It knows tensors and names, not the model.
//!
//! AdamW follows PyTorch's `torch.optim.AdamW` (Loshchilov & Hutter, "Decoupled Weight Decay
//! Regularization", 2019) step for step, with nanoGPT's `configure_optimizers` grouping: weight
//! decay on parameters with two or more dimensions (matmul weights, embeddings), none on biases
//! and LayerNorm gains.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context as _, bail};
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::gpt::ops::simd;

/// nanoGPT's `get_lr`: linear warmup over `warmup_iters`, then cosine decay from
/// `learning_rate` to `min_lr` at `lr_decay_iters`, then `min_lr`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub learning_rate: f64,
    pub decay_lr: bool,
    pub warmup_iters: usize,
    pub lr_decay_iters: usize,
    pub min_lr: f64,
}

impl Schedule {
    pub fn lr(&self, iter: usize) -> f64 {
        if !self.decay_lr {
            return self.learning_rate;
        }
        // 1) linear warmup for warmup_iters steps
        if iter < self.warmup_iters {
            return self.learning_rate * (iter + 1) as f64 / (self.warmup_iters + 1) as f64;
        }
        // 2) if iter > lr_decay_iters, return min learning rate
        if iter > self.lr_decay_iters {
            return self.min_lr;
        }
        // 3) in between, use cosine decay down to min learning rate
        let decay_ratio =
            (iter - self.warmup_iters) as f64 / (self.lr_decay_iters.saturating_sub(self.warmup_iters)).max(1) as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * decay_ratio).cos()); // coeff ranges 0..1
        self.min_lr + coeff * (self.learning_rate - self.min_lr)
    }
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm`, like
/// `torch.nn.utils.clip_grad_norm_` (which adds 1e-6 to the norm); returns the norm before, as
/// a scalar tensor on the gradients' device: nothing here waits for the device.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> candle_core::Result<Tensor> {
    if let Some(norm) = cpu_grad_norm(grads)? {
        // On the CPU, the same arithmetic on numbers, and a gradient copied only when it shrinks.
        let coef = (max_norm as f32 * (1.0 / (norm + 1e-6))).min(1.0);
        if coef < 1.0 {
            let scale = |grad: &mut Tensor| grad.affine(coef as f64, 0.0).map(|scaled| *grad = scaled);
            crate::gpt::device::on_cpu_pool(|| grads.par_iter_mut().try_for_each(scale))?;
        }
        return Tensor::new(norm, &candle_core::Device::Cpu);
    }
    let norm = grad_norm(grads)?;
    // min(1, max_norm / (norm + 1e-6)), as torch's clamp of the clip coefficient.
    let coef = ((norm.clone() + 1e-6)?.recip()? * max_norm)?.minimum(1.0)?;
    for grad in grads.iter_mut() {
        *grad = grad.broadcast_mul(&coef.to_dtype(grad.dtype())?)?;
    }
    Ok(norm)
}

/// The global L2 norm of float32 CPU `grads`, read in place (`None` for other devices, dtypes
/// and layouts): candle's ops would square every gradient into a new tensor first.
fn cpu_grad_norm(grads: &[Tensor]) -> candle_core::Result<Option<f32>> {
    if !grads.iter().all(|g| g.device().is_cpu() && g.dtype() == DType::F32 && g.is_contiguous()) {
        return Ok(None);
    }
    // Each gradient's sum in parallel, the sums added in order: the same total every time.
    let sum_of_squares = || -> candle_core::Result<Option<f64>> {
        let sums = grads.par_iter().map(|grad| {
            let (storage, layout) = grad.storage_and_layout();
            let candle_core::Storage::Cpu(storage) = &*storage else { return Ok(None) };
            let data = cpu(storage, layout)?;
            let squares = |chunk: &[f32]| simd::sum_of_squares(chunk) as f64;
            Ok(Some(data.par_chunks(CHUNK).map(squares).collect::<Vec<f64>>().iter().sum::<f64>()))
        });
        let sums = sums.collect::<candle_core::Result<Option<Vec<f64>>>>()?;
        Ok(sums.map(|sums| sums.iter().sum()))
    };
    Ok(crate::gpt::device::on_cpu_pool(sum_of_squares)?.map(|sum| sum.sqrt() as f32))
}

/// The global L2 norm of `grads`, a float32 scalar tensor.
pub fn grad_norm(grads: &[Tensor]) -> candle_core::Result<Tensor> {
    let sums = grads
        .iter()
        .map(|grad| grad.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&sums, 0)?.sum_all()?.sqrt()
}

/// Dynamic loss scaling for float16 matmuls (PyTorch's GradScaler with its defaults): the loss
/// is multiplied by `scale` before backward so that small gradients survive float16; a step
/// whose gradients overflow is skipped and halves the scale, 2000 good steps in a row double
/// it. Checkpointed, so a resumed run scales as the uninterrupted one did.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScale {
    pub scale: f64,
    pub good_steps: usize,
}

impl Default for LossScale {
    fn default() -> LossScale {
        LossScale { scale: 65536.0, good_steps: 0 }
    }
}

impl LossScale {
    const GROWTH_INTERVAL: usize = 2000;

    /// After a step's gradients are in: whether they are finite (take the step) or not (skip
    /// it), and the scale for the next one.
    pub fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale /= 2.0;
            self.good_steps = 0;
        }
        finite
    }
}

/// AdamW's hyperparameters; `lr` is passed to each `step` because the schedule changes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// AdamW over named parameters, in name order, with its first and second moments.
pub struct AdamW {
    params: AdamWParams,
    /// (name, parameter, decayed?)
    vars: Vec<(String, Var, bool)>,
    /// `exp_avg` per parameter.
    m: Vec<Tensor>,
    /// `exp_avg_sq` per parameter.
    v: Vec<Tensor>,
    /// Steps taken (PyTorch's `state['step']`), for the bias corrections.
    step: u64,
}

impl AdamW {
    /// `vars` by name (a `VarMap`'s contents); they are kept sorted so that the order of the
    /// updates, and of the saved state, does not depend on a hash map.
    pub fn new(vars: HashMap<String, Var>, params: AdamWParams) -> candle_core::Result<AdamW> {
        let mut vars: Vec<(String, Var)> = vars.into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut m = Vec::with_capacity(vars.len());
        let mut v = Vec::with_capacity(vars.len());
        for (_, var) in &vars {
            m.push(var.zeros_like()?);
            v.push(var.zeros_like()?);
        }
        let vars = vars.into_iter().map(|(name, var)| (name.clone(), var.clone(), var.rank() >= 2)).collect();
        Ok(AdamW { params, vars, m, v, step: 0 })
    }

    /// The parameters, in the order `step` expects their gradients.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.vars.iter().map(|(_, var, _)| var)
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    /// How many parameters (tensors, elements) are decayed and not: nanoGPT prints this.
    pub fn groups(&self) -> [(usize, usize); 2] {
        let mut groups = [(0, 0); 2];
        for (_, var, decay) in &self.vars {
            let group = &mut groups[usize::from(!decay)];
            group.0 += 1;
            group.1 += var.elem_count();
        }
        groups
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to the i-th of `vars()`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        let AdamWParams { beta1, beta2, eps, weight_decay } = self.params;
        self.step += 1;
        let bias_correction1 = 1.0 - beta1.powi(self.step as i32);
        let bias_correction2 = 1.0 - beta2.powi(self.step as i32);
        let step_size = lr / bias_correction1;
        let (vars, m, v) = (&self.vars, &mut self.m, &mut self.v);
        let constants = |decay: bool| Constants {
            decay: (decay && weight_decay != 0.0).then_some(1.0 - lr * weight_decay),
            beta1,
            beta2,
            inverse_sqrt_bc2: 1.0 / bias_correction2.sqrt(),
            eps,
            step_size,
        };
        let cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous();
        let mut all = vars.iter().zip(grads).zip(m.iter().zip(v.iter()));
        if all.all(|(((_, var, _), grad), (m, v))| [var.as_tensor(), grad, m, v].into_iter().all(cpu))
            && grads.len() == vars.len()
        {
            // All in place on the CPU: the parameters side by side (the CPU recipe's 27 are each
            // too small to split well), each split further where it is large.
            let update = || {
                let all = vars.par_iter().zip(grads).zip(m.par_iter().zip(v.par_iter()));
                all.try_for_each(|(((_, var, decay), grad), (m, v))| {
                    step_cpu(var, grad, m, v, &constants(*decay)).map(|_| ())
                })
            };
            return crate::gpt::device::on_cpu_pool(update);
        }
        for (i, ((_, var, decay), grad)) in vars.iter().zip(grads).enumerate() {
            if !step_cpu(var, grad, &m[i], &v[i], &constants(*decay))? {
                (m[i], v[i]) = step_ops(var, grad, &m[i], &v[i], &constants(*decay))?;
            }
        }
        Ok(())
    }

    /// Writes the moments (`exp_avg.NAME`, `exp_avg_sq.NAME`) and the step count (`step`) as
    /// safetensors.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut tensors = HashMap::new();
        for (i, (name, _, _)) in self.vars.iter().enumerate() {
            tensors.insert(format!("exp_avg.{name}"), self.m[i].clone());
            tensors.insert(format!("exp_avg_sq.{name}"), self.v[i].clone());
        }
        let device = self.m.first().map(|m| m.device().clone()).unwrap_or(candle_core::Device::Cpu);
        tensors.insert("step".to_string(), Tensor::new(&[self.step as i64], &device)?);
        candle_core::safetensors::save(&tensors, path)
            .with_context(|| format!("could not write optimizer state `{}`", path.display()))
    }

    /// Restores what `save` wrote; every parameter must be there with its shape.
    pub fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let device = self.m.first().map(|m| m.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let mut tensors = candle_core::safetensors::load(path, &device)
            .with_context(|| format!("could not read optimizer state `{}`", path.display()))?;
        for (i, (name, var, _)) in self.vars.iter().enumerate() {
            for (key, slot) in
                [(format!("exp_avg.{name}"), &mut self.m[i]), (format!("exp_avg_sq.{name}"), &mut self.v[i])]
            {
                let tensor = tensors
                    .remove(&key)
                    .with_context(|| format!("optimizer state `{}` has no `{key}`", path.display()))?;
                if tensor.dims() != var.dims() {
                    bail!(
                        "optimizer state `{}`: `{key}` has shape {:?}, the model {:?}",
                        path.display(),
                        tensor.dims(),
                        var.dims()
                    );
                }
                *slot = tensor.to_dtype(slot.dtype())?;
            }
        }
        let step =
            tensors.remove("step").with_context(|| format!("optimizer state `{}` has no `step`", path.display()))?;
        self.step = step.to_vec1::<i64>()?.first().copied().unwrap_or(0) as u64;
        Ok(())
    }
}

/// One AdamW update's constants, as `AdamW::step`'s op-by-op form applies them.
struct Constants {
    /// `1 - lr * weight_decay` for a decayed parameter (with a weight decay).
    decay: Option<f64>,
    beta1: f64,
    beta2: f64,
    inverse_sqrt_bc2: f64,
    eps: f64,
    step_size: f64,
}

/// AdamW's update of one parameter in candle's ops, on any device and dtype: writes the
/// parameter, returns the new moments.
fn step_ops(var: &Var, grad: &Tensor, m: &Tensor, v: &Tensor, c: &Constants) -> candle_core::Result<(Tensor, Tensor)> {
    let mut param = var.as_tensor().clone();
    if let Some(decay) = c.decay {
        param = param.affine(decay, 0.0)?;
    }
    let grad = grad.to_dtype(m.dtype())?;
    let m = ((m * c.beta1)? + (&grad * (1.0 - c.beta1))?)?;
    let v = ((v * c.beta2)? + (grad.sqr()? * (1.0 - c.beta2))?)?;
    let denom = ((v.sqrt()? * c.inverse_sqrt_bc2)? + c.eps)?;
    let update = (m.div(&denom)? * c.step_size)?;
    var.set(&param.sub(&update)?)?;
    Ok((m, v))
}

/// AdamW's update of one float32 CPU parameter in place: its moments, then the parameter, each
/// in one pass over its buffer with no allocation. The op-by-op form makes 14 passes, each with a
/// new allocation (for GPT-2 124M that was 8.5 s of a 43 s CPU step; new buffers for the three
/// results still cost 4 s of page faults). The arithmetic is that form's, in the same order, in
/// float32 (candle's scalar ops are `x * mul + add` with f32 constants), so the results are the
/// same bits. `false` where it does not apply (other devices, dtypes, layouts).
fn step_cpu(var: &Var, grad: &Tensor, m: &Tensor, v: &Tensor, c: &Constants) -> candle_core::Result<bool> {
    let param = var.as_tensor();
    let all = [param, grad, m, v];
    if !all.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()) {
        return Ok(false);
    }
    let f = |x: f64| x as f32;
    m.inplace_op2(grad, &Moment { beta: f(c.beta1), one_minus_beta: f(1.0 - c.beta1), squared: false })?;
    v.inplace_op2(grad, &Moment { beta: f(c.beta2), one_minus_beta: f(1.0 - c.beta2), squared: true })?;
    let update = Update {
        decay: c.decay.map(f),
        inverse_sqrt_bc2: f(c.inverse_sqrt_bc2),
        eps: f(c.eps),
        step_size: f(c.step_size),
    };
    param.inplace_op3(m, v, &update)?;
    Ok(true)
}

/// The contiguous float32 data of a CPU storage, mutable.
fn cpu_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> candle_core::Result<&'a mut [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("AdamW: a non-contiguous tensor") };
    match storage {
        CpuStorage::F32(data) => Ok(&mut data[start..end]),
        _ => candle_core::bail!("AdamW: float32 expected"),
    }
}

/// The contiguous float32 data of a CPU storage.
fn cpu<'a>(storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("AdamW: a non-contiguous tensor") };
    Ok(&storage.as_slice::<f32>()?[start..end])
}

/// Elements per rayon task of the in-place updates.
const CHUNK: usize = 1 << 14;

/// A moment in place from the gradient: m = β m + (1 - β) g, or with g² for the second.
struct Moment {
    beta: f32,
    one_minus_beta: f32,
    squared: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, g: &CpuStorage, g_l: &Layout) -> candle_core::Result<()> {
        let (moment, g) = (cpu_mut(dst, dst_l)?, cpu(g, g_l)?);
        moment.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).for_each(|(moment, g)| {
            simd::adamw_moment(moment, g, self.beta, self.one_minus_beta, self.squared);
        });
        Ok(())
    }
}

/// The parameter in place from its new moments (and decay).
struct Update {
    decay: Option<f32>,
    inverse_sqrt_bc2: f32,
    eps: f32,
    step_size: f32,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        m: &CpuStorage,
        m_l: &Layout,
        v: &CpuStorage,
        v_l: &Layout,
    ) -> candle_core::Result<()> {
        let (param, m, v) = (cpu_mut(dst, dst_l)?, cpu(m, m_l)?, cpu(v, v_l)?);
        param.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK))).for_each(|(param, (m, v))| {
            simd::adamw_update(param, m, v, self.decay, self.inverse_sqrt_bc2, self.eps, self.step_size);
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The one-pass CPU update gives the op-by-op form's bits, decayed or not, over steps.
    #[test]
    fn fused_cpu_adamw_matches_the_op_by_op_update_bit_for_bit() -> candle_core::Result<()> {
        let device = Device::Cpu;
        let n = 40_000; // more than one rayon chunk
        let start = Tensor::randn(0f32, 1.0, n, &device)?;
        let (fused, ops) = (Var::from_tensor(&start)?, Var::from_tensor(&start.copy()?)?);
        let zeros = Tensor::zeros(n, DType::F32, &device)?;
        let fused_mv = (zeros.copy()?, zeros.copy()?);
        let mut ops_mv = (zeros.clone(), zeros);
        for step in 1..=4 {
            let grad = (Tensor::randn(0f32, 1.0, n, &device)? * 1e-2)?;
            let bc2 = 1.0 - 0.99f64.powi(step);
            for decay in [Some(1.0 - 1e-3 * 0.1), None] {
                let c = Constants {
                    decay,
                    beta1: 0.9,
                    beta2: 0.99,
                    inverse_sqrt_bc2: 1.0 / bc2.sqrt(),
                    eps: 1e-8,
                    step_size: 1e-3 / (1.0 - 0.9f64.powi(step)),
                };
                assert!(step_cpu(&fused, &grad, &fused_mv.0, &fused_mv.1, &c)?, "f32 on the CPU");
                ops_mv = step_ops(&ops, &grad, &ops_mv.0, &ops_mv.1, &c)?;
            }
        }
        let bits = |t: &Tensor| t.to_vec1::<f32>().map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        assert_eq!(bits(fused.as_tensor())?, bits(ops.as_tensor())?);
        assert_eq!(bits(&fused_mv.0)?, bits(&ops_mv.0)?);
        assert_eq!(bits(&fused_mv.1)?, bits(&ops_mv.1)?);
        assert_ne!(bits(fused.as_tensor())?, bits(&start)?, "the parameter moved");
        Ok(())
    }

    /// nanoGPT's get_lr, transcribed.
    fn nanogpt_get_lr(it: usize, lr: f64, warmup: usize, decay: usize, min_lr: f64) -> f64 {
        if it < warmup {
            return lr * (it as f64 + 1.0) / (warmup as f64 + 1.0);
        }
        if it > decay {
            return min_lr;
        }
        let ratio = (it - warmup) as f64 / (decay - warmup) as f64;
        min_lr + 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()) * (lr - min_lr)
    }

    #[test]
    fn schedule_is_nanogpts_get_lr() {
        let schedule =
            Schedule { learning_rate: 6e-4, decay_lr: true, warmup_iters: 2000, lr_decay_iters: 600000, min_lr: 6e-5 };
        for it in [0, 1, 999, 1999, 2000, 2001, 300000, 599999, 600000, 600001, 700000] {
            let expected = nanogpt_get_lr(it, 6e-4, 2000, 600000, 6e-5);
            assert!((schedule.lr(it) - expected).abs() < 1e-15, "iter {it}");
        }
        // Pinned values: warmup start, the end of warmup, the midpoint of the cosine, the floor.
        assert!((schedule.lr(0) - 6e-4 / 2001.0).abs() < 1e-18);
        assert!((schedule.lr(2000) - 6e-4).abs() < 1e-18);
        assert!((schedule.lr(301000) - (6e-5 + 0.5 * (6e-4 - 6e-5))).abs() < 1e-15);
        assert_eq!(schedule.lr(600001), 6e-5);
        let constant = Schedule { decay_lr: false, ..schedule };
        assert_eq!(constant.lr(0), 6e-4);
        assert_eq!(constant.lr(700000), 6e-4);
    }

    #[test]
    fn adamw_matches_a_hand_computed_step_and_decays_only_matrices() -> anyhow::Result<()> {
        let device = Device::Cpu;
        let weight = Var::from_tensor(&Tensor::new(&[[1f32, -2.0], [0.5, 3.0]], &device)?)?;
        let bias = Var::from_tensor(&Tensor::new(&[1f32, -1.0], &device)?)?;
        let vars = HashMap::from([("w".to_string(), weight.clone()), ("b".to_string(), bias.clone())]);
        let params = AdamWParams { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
        let mut optimizer = AdamW::new(vars, params)?;
        assert_eq!(optimizer.groups(), [(1, 4), (1, 2)]);
        // Sorted names: "b" then "w".
        let grad_b = Tensor::new(&[0.5f32, -0.25], &device)?;
        let grad_w = Tensor::new(&[[0.1f32, 0.2], [-0.3, 0.0]], &device)?;
        let lr = 0.01;
        let reference = |p: f64, g: f64, steps: i32, decay: bool| {
            // PyTorch AdamW, by hand, for the same gradient each step.
            let (mut p, mut m, mut v) = (p, 0.0f64, 0.0f64);
            for t in 1..=steps {
                if decay {
                    p *= 1.0 - lr * 0.1;
                }
                m = 0.9 * m + 0.1 * g;
                v = 0.95 * v + 0.05 * g * g;
                let denom = v.sqrt() / (1.0 - 0.95f64.powi(t)).sqrt() + 1e-8;
                p -= lr / (1.0 - 0.9f64.powi(t)) * m / denom;
            }
            p
        };
        optimizer.step(&[grad_b.clone(), grad_w.clone()], lr)?;
        optimizer.step(&[grad_b, grad_w], lr)?;
        let w = weight.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        let b = bias.as_tensor().to_vec1::<f32>()?;
        for (got, (p, g)) in w.iter().zip([(1.0, 0.1), (-2.0, 0.2), (0.5, -0.3), (3.0, 0.0)]) {
            assert!((*got as f64 - reference(p, g, 2, true)).abs() < 1e-6, "w {got}");
        }
        for (got, (p, g)) in b.iter().zip([(1.0, 0.5), (-1.0, -0.25)]) {
            assert!((*got as f64 - reference(p, g, 2, false)).abs() < 1e-6, "b {got}");
        }
        // A zero gradient on a matrix still decays it: 3.0 * (1 - 0.001)^2.
        assert!((w[3] as f64 - 3.0 * 0.999f64.powi(2)).abs() < 1e-6);
        assert_eq!(optimizer.steps(), 2);
        Ok(())
    }

    #[test]
    fn adamw_state_round_trips() -> anyhow::Result<()> {
        let device = Device::Cpu;
        let make = || -> anyhow::Result<(Var, AdamW)> {
            let weight = Var::from_tensor(&Tensor::new(&[[1f32, -2.0], [0.5, 3.0]], &device)?)?;
            let vars = HashMap::from([("w".to_string(), weight.clone())]);
            let params = AdamWParams { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
            Ok((weight, AdamW::new(vars, params)?))
        };
        let grad = Tensor::new(&[[0.1f32, 0.2], [-0.3, 0.4]], &device)?;
        let (a, mut first) = make()?;
        first.step(std::slice::from_ref(&grad), 0.01)?;
        let dir = tempfile::tempdir()?;
        first.save(&dir.path().join("optim.safetensors"))?;
        let (b, mut second) = make()?;
        b.set(a.as_tensor())?;
        second.load(&dir.path().join("optim.safetensors"))?;
        assert_eq!(second.steps(), 1);
        first.step(std::slice::from_ref(&grad), 0.01)?;
        second.step(&[grad], 0.01)?;
        assert_eq!(a.as_tensor().flatten_all()?.to_vec1::<f32>()?, b.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn clipping_scales_to_the_global_norm() -> anyhow::Result<()> {
        let device = Device::Cpu;
        // Global norm of (3, 4) and (12) is 13.
        let mut grads = vec![Tensor::new(&[3f32, 4.0], &device)?, Tensor::new(&[12f32], &device)?];
        let norm = clip_grad_norm(&mut grads, 1.0)?.to_scalar::<f32>()?;
        assert!((norm - 13.0).abs() < 1e-5);
        let a = grads[0].to_vec1::<f32>()?;
        let b = grads[1].to_vec1::<f32>()?;
        let clipped = ((a[0] * a[0] + a[1] * a[1] + b[0] * b[0]) as f64).sqrt();
        assert!((clipped - 1.0).abs() < 1e-5, "{clipped}");
        assert!((a[0] as f64 - 3.0 / 13.0).abs() < 1e-5);
        // Under the limit: unchanged.
        let mut small = vec![Tensor::new(&[0.3f32, 0.4], &device)?];
        clip_grad_norm(&mut small, 1.0)?;
        assert_eq!(small[0].to_vec1::<f32>()?, vec![0.3, 0.4]);
        Ok(())
    }

    #[test]
    fn loss_scale_halves_on_overflow_and_doubles_after_a_run_of_good_steps() {
        let mut scale = LossScale::default();
        assert!(!scale.update(false));
        assert_eq!(scale.scale, 32768.0);
        for _ in 0..1999 {
            assert!(scale.update(true));
        }
        assert_eq!(scale.scale, 32768.0);
        scale.update(true);
        assert_eq!(scale, LossScale { scale: 65536.0, good_steps: 0 });
    }
}
