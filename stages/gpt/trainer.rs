//! How one rank trains: the model and its AdamW on a device, a step's micro-batches forward and
//! backward with their gradients summed, averaged over the ranks, unscaled (float16), clipped and
//! applied; evaluations; checkpoints written and resumed. `train.rs` decides *when* (the
//! schedule, the evaluations, which checkpoint, the log lines); this is the *how*, and the only
//! part of training that touches tensors.
//!
//! Losses stay on the device until `read_losses`: on a GPU, reading one waits for the whole
//! step, so the loop reads them once per log line.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use crate::formats::shard::TokenSplit;
use crate::gpt::checkpoint::{self, State};
use crate::gpt::dist::{Collective, World};
use crate::gpt::optim::{self, AdamW, AdamWParams, LossScale};
use crate::gpt::source::{self, AskedShape};
use crate::gpt::{Gpt, GptConfig, Rng, batches, device};

/// Where the weights start.
pub enum Init {
    /// GPT-2's init of this shape (nanoGPT's `init_from = 'scratch'`).
    Scratch(GptConfig),
    /// A model's weights (see `source`), in the shape asked where it may differ (a smaller
    /// `block_size` crops).
    Pretrained { spec: String, root: PathBuf, shape: AskedShape },
}

/// Where and how a rank trains.
pub struct Options<'a> {
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: &'a str,
    /// The matmuls' dtype: `auto`, `bfloat16`, `float16` or `float32`.
    pub dtype: &'a str,
    pub world: &'a World,
    /// Ranks on this machine: each takes the GPU of its local rank.
    pub local_ranks: usize,
    pub adamw: AdamWParams,
    /// Seeds the init (and, through `step`, the dropout masks).
    pub seed: u64,
}

pub struct Trainer {
    pub model: Gpt,
    /// What the weights started from, for the log.
    pub description: String,
    varmap: VarMap,
    optimizer: AdamW,
    device: Device,
    dtype: DType,
    collective: Option<Box<dyn Collective>>,
    /// float16 only: GradScaler's dynamic loss scale.
    loss_scale: Option<LossScale>,
    /// Each step's mean loss, not yet read back from the device; in a world of several ranks,
    /// with whether any rank was asked to stop (`interrupt`) beside it.
    pending: Vec<Tensor>,
    /// Read with the losses: the ranks agree to stop after the last step read.
    stop: bool,
    world: World,
}

impl Trainer {
    pub fn new(init: Init, options: &Options) -> anyhow::Result<Trainer> {
        let device = device::for_rank(options.device, options.world.local_rank, options.local_ranks)?;
        let dtype = device::matmul_dtype(options.dtype, &device)?;
        if device.is_cuda() {
            // TF32 for what stays float32, as nanoGPT allows it.
            candle_core::cuda::set_gemm_reduced_precision_f32(true);
        }
        // A rank started by a supervisor always has a master, even in a world of one.
        let world = options.world.clone();
        let collective = if world.master.is_empty() { None } else { Some(crate::gpt::dist::connect(&world, &device)?) };
        let varmap = VarMap::new();
        let (model, description) = match init {
            Init::Scratch(config) => {
                (Gpt::init(&config, &varmap, &device, options.seed)?, "a new model from scratch".to_string())
            }
            Init::Pretrained { spec, root, shape } => {
                let source = source::source(&spec, &root, &device).context("`init_from`")?;
                let config = shape.resolve(&source.config, &source.dir)?;
                let model = Gpt::init(&config, &varmap, &device, options.seed)?;
                for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
                    let tensor = source
                        .tensors
                        .get(name)
                        .with_context(|| format!("the checkpoint in `{}` has no `{name}`", source.dir.display()))?;
                    // Cropping: the first block_size positions of the position embedding (B, T).
                    let tensor =
                        if name == "wpe.weight" { tensor.narrow(0, 0, config.block_size)? } else { tensor.clone() };
                    var.set(&tensor.to_dtype(var.dtype())?).with_context(|| format!("could not load `{name}`"))?;
                }
                (model, format!("from {}", source.description))
            }
        };
        let model = model.with_matmul_dtype(dtype);
        let optimizer = AdamW::new(varmap.data().lock().expect("varmap lock").clone(), options.adamw)?;
        // float16 matmuls need their gradients scaled up to survive (nanoGPT's GradScaler).
        let loss_scale = (dtype == DType::F16).then(LossScale::default);
        Ok(Trainer {
            model,
            description,
            varmap,
            optimizer,
            device,
            dtype,
            collective,
            loss_scale,
            pending: Vec::new(),
            stop: false,
            world,
        })
    }

    pub fn config(&self) -> &GptConfig {
        &self.model.config
    }

    /// The device's name, e.g. `cpu` or `NVIDIA H100 80GB HBM3`.
    pub fn device_name(&self) -> String {
        device::name(&self.device)
    }

    pub fn is_cpu(&self) -> bool {
        self.device.is_cpu()
    }

    /// The matmuls' dtype, e.g. `bf16`.
    pub fn matmul_dtype(&self) -> &'static str {
        self.dtype.as_str()
    }

    /// The device's bfloat16 peak, for MFU: a GPU's own, nanoGPT's A100 for a GPU nanoflow does
    /// not know, none on the CPU (a fraction of an A100 says nothing about a CPU).
    pub fn peak_flops(&self) -> Option<f64> {
        match self.device.is_cpu() {
            true => None,
            false => Some(device::peak_bf16_flops(&self.device_name()).unwrap_or(device::A100_BF16_FLOPS)),
        }
    }

    /// (tensors, parameters) with weight decay and without (nanoGPT's optimizer groups).
    pub fn optimizer_groups(&self) -> [(usize, usize); 2] {
        self.optimizer.groups()
    }

    pub fn loss_scale(&self) -> Option<LossScale> {
        self.loss_scale
    }

    /// Loads checkpoint `name` of `dir`: weights and AdamW's state, and the loss scale it recorded.
    pub fn resume(&mut self, dir: &Path, name: &str, loss_scale: Option<LossScale>) -> anyhow::Result<()> {
        let mut varmap = self.varmap.clone();
        checkpoint::load_weights(dir, name, &mut varmap, Some(&mut self.optimizer))?;
        if self.loss_scale.is_some() {
            self.loss_scale = Some(loss_scale.unwrap_or_default());
        }
        Ok(())
    }

    /// Writes checkpoint `name` into `dir` (complete once `NAME.json` is renamed into place).
    pub fn save(&self, dir: &Path, name: &str, state: State) -> anyhow::Result<()> {
        checkpoint::save(dir, name, &self.varmap, &self.optimizer, state)
    }

    /// nanoGPT's estimate_loss for one split: the mean loss over `iters` batches drawn from
    /// `rng`, in eval mode (no dropout).
    pub fn evaluate(&self, data: &TokenSplit, rng: &mut Rng, iters: usize, batch_size: usize) -> anyhow::Result<f64> {
        let block_size = self.model.config.block_size;
        batches::mean_loss(&self.model, data, rng, iters, batch_size, block_size, &self.device, &mut || {})
    }

    /// One optimizer step. `micro_batches` holds the offsets of every micro-batch of the step,
    /// the whole world's: this rank takes micro-batch `i` when `i % world size` is its rank, so N
    /// ranks see the batches one process would. `first_micro_step` (the run's count of
    /// micro-batches before this step) and `seed` fix the dropout masks, so that a resumed run
    /// or a world of another size draws the ones the uninterrupted run drew.
    ///
    /// Returns the new loss scale when float16 gradients overflowed and the step was skipped.
    pub fn step(
        &mut self,
        data: &TokenSplit,
        micro_batches: &[Vec<u64>],
        first_micro_step: u64,
        seed: u64,
        lr: f64,
        grad_clip: f64,
    ) -> anyhow::Result<Option<f64>> {
        let block_size = self.model.config.block_size;
        let local_steps = micro_batches.len() / self.world.size;
        let mut grads: Vec<Option<Tensor>> = vec![None; self.optimizer.vars().count()];
        let mut loss_sum: Option<Tensor> = None;
        let scale = self.loss_scale.map_or(1.0, |s| s.scale);
        // float32 on the CPU: the explicit step (gpt/step/) sums the gradients in its buffers.
        let explicit = self.model.explicit();
        for (micro_step, offsets) in micro_batches.iter().enumerate() {
            if micro_step % self.world.size != self.world.rank {
                continue;
            }
            let vocab_size = self.model.config.vocab_size;
            let (x, y) = batches::read_batch(data, offsets, (block_size, vocab_size), &self.device)?;
            let step = first_micro_step + micro_step as u64;
            self.model.seed_dropout(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15))?;
            // scale the loss to account for gradient accumulation
            let weight = scale / local_steps as f64;
            let loss = if explicit {
                Tensor::new(self.model.accumulate_gradients(&x, &y, weight)?, &self.device)?
            } else {
                let logits = self.model.forward(&x, true)?; // (B, T, vocab_size)
                let loss = crate::gpt::cross_entropy(&logits, &y)?;
                let store = (&loss * weight)?.backward()?;
                for (sum, var) in grads.iter_mut().zip(self.optimizer.vars()) {
                    if let Some(grad) = store.get(var.as_tensor()) {
                        *sum = Some(match sum.take() {
                            Some(sum) => (sum + grad)?,
                            None => grad.clone(),
                        });
                    }
                }
                loss.detach()
            };
            loss_sum = Some(match loss_sum {
                Some(sum) => (sum + loss)?,
                None => loss,
            });
        }
        let mut grads: Vec<Tensor> = match explicit {
            true => self.model.take_gradients(self.optimizer.vars())?,
            false => grads
                .into_iter()
                .zip(self.optimizer.vars())
                .map(|(grad, var)| grad.map_or_else(|| var.zeros_like(), Ok))
                .collect::<candle_core::Result<_>>()?,
        };
        // the step's loss: the mean over all its micro-batches, averaged over the ranks along with
        // the gradients (one collective call per bucket, the loss riding in the last)
        let mut loss = (loss_sum.context("no micro-batch for this rank")? / local_steps as f64)?;
        if let Some(collective) = self.collective.as_deref_mut() {
            // A signal reaches the ranks at different steps; the flag averaged with the loss
            // makes all of them stop after the same one.
            let stop = Tensor::new(&[crate::interrupt::requested() as u8 as f32], &self.device)?;
            let extra = Tensor::cat(&[loss.to_dtype(DType::F32)?.reshape(1)?, stop], 0)?;
            loss = crate::gpt::dist::average(collective, &mut grads, &extra)?;
        }
        self.pending.push(loss);
        let mut skipped = None;
        if let Some(loss_scale) = &mut self.loss_scale {
            // float16: whether this step overflowed decides whether it is taken (a wait per step).
            let norm = optim::grad_norm(&grads)?.to_scalar::<f32>()?;
            if !loss_scale.update(norm.is_finite()) {
                skipped = Some(scale / 2.0);
            }
            for grad in &mut grads {
                *grad = (&*grad / scale)?;
            }
        }
        if skipped.is_none() {
            if grad_clip != 0.0 {
                optim::clip_grad_norm(&mut grads, grad_clip)?;
            }
            self.optimizer.step(&grads, lr)?;
        }
        Ok(skipped)
    }

    /// The losses of the steps since the last read, in order, in one read from the device.
    pub fn read_losses(&mut self) -> anyhow::Result<Vec<f64>> {
        let losses =
            self.pending.drain(..).map(|loss| loss.to_dtype(DType::F64)).collect::<candle_core::Result<Vec<_>>>()?;
        if self.collective.is_none() {
            return Ok(Tensor::stack(&losses, 0)?.to_vec1::<f64>()?);
        }
        let rows = Tensor::stack(&losses, 0)?.to_vec2::<f64>()?;
        self.stop |= rows.iter().any(|row| row[1] > 0.0);
        Ok(rows.iter().map(|row| row[0]).collect())
    }

    /// Whether to checkpoint and stop now, every step read: a signal asked this process to
    /// (`interrupt`), or, in a world of several ranks, any rank, all agreeing on the step.
    pub fn stop_requested(&self) -> bool {
        self.pending.is_empty() && if self.collective.is_some() { self.stop } else { crate::interrupt::requested() }
    }
}
