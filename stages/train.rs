//! `kind: train`: nanoGPT's train.py. It owns the training loop — batches drawn at random
//! offsets of the token shards, gradient accumulation, AdamW with warmup and cosine decay,
//! gradient clipping, periodic train/val loss estimates, checkpoints, resume, and the metrics
//! record. `run_rank` is the loop, as train.py's reads: set up, then per iteration maybe
//! evaluate and checkpoint, step, log. Beside it in `train/`: the rank processes
//! (`supervise.rs`), resume and repair (`resume.rs`), the record and its log lines
//! (`record.rs`). The model is `gpt/model.rs`'s, how a rank steps `gpt/trainer.rs`'s, the
//! optimizer and schedule `optim.rs`'s, the checkpoint layout `checkpoint.rs`'s and the record's
//! files `metrics.rs`'s. `finetune` is this loop with other defaults.
//!
//! Reproducibility: batches come from one seeded RNG whose state is checkpointed, dropout masks
//! from the seed and the micro-step, and each evaluation draws from its own stream derived from
//! (seed, iteration), so neither how often the loss is logged nor when it is evaluated changes
//! the training trajectory; a resumed run repeats the losses of an uninterrupted one.
//!
//! Data parallel (`gpus`, several machines): see `train` and `run_rank`; the collectives are
//! `dist.rs`'s. A world of N ranks trains the model one process would with the same
//! `gradient_accumulation_steps`, up to float rounding.
//!
//! Departures from train.py: nanoGPT takes one more step after the evaluation at `max_iters`
//! and never saves it, this loop stops there (and evaluates there even off `eval_interval`);
//! the best checkpoint is also written at iteration 0, so that one always exists;
//! `best_val_loss` is the best seen, also under `always_save_checkpoint`; and the logged loss
//! of a step is the mean over all its micro-batches (and ranks), not the last micro-batch's.

use std::path::PathBuf;

use anyhow::{Context as _, bail, ensure};
use serde::{Deserialize, Serialize};

use crate::formats::meta::{self, Meta};
use crate::formats::shard::TokenSplit;
use crate::gpt::dist::{Machines, World};
use crate::gpt::estimate::{self, Calibration, CalibrationKey, Estimate, Target};
use crate::gpt::optim::{AdamWParams, Schedule};
use crate::gpt::source::AskedShape;
use crate::gpt::trainer::{Init, Options, Trainer};
use crate::gpt::{GptConfig, Rng, batches};
use crate::progress;
use crate::{Context, Invalid, Report, Upstream, at_least_one, ensure, required};

/// Prints on rank 0 alone (the other ranks train silently).
macro_rules! log {
    ($main:expr, $($arg:tt)*) => { if $main { eprintln!($($arg)*) } };
}

mod record;
mod resume;
mod supervise;

pub use record::estimate_mfu;
use record::{Record, publish};
use resume::{Latest, Run, latest_checkpoint};
use supervise::supervise;
pub use supervise::{WorkerSpec, worker};

/// Bumped when the same params would train a different model or write different files.
pub const VERSION: u32 = 5;

/// Params that cannot change results. `log_interval` only prints; the record keeps every
/// iteration. (`eval_interval` and `eval_iters` do not change the trajectory either, but they
/// choose which model is the best checkpoint and what its val loss is, so they stay in the key.)
pub const NON_SEMANTIC: &[&str] = &["log_interval", "gpus"];
/// What each optional param means when it is unset (the report shows it as the default).
pub const UNSET: &[(&str, &str)] = &[
    ("n_layer", "12 from scratch, else the checkpoint's"),
    ("n_head", "12 from scratch, else the checkpoint's"),
    ("n_embd", "768 from scratch, else the checkpoint's"),
    ("block_size", "1024 from scratch, else the checkpoint's"),
    ("bias", "false from scratch, else the checkpoint's"),
    ("vocab_size", "the data's from scratch, else the checkpoint's"),
];

/// A re-run of an interrupted stage finds its checkpoints and continues from the latest.
pub const RESUMABLE: bool = true;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// A tokenize stage's output: token shards and meta.json. Required; usually `${stage}`.
    pub data: String,
    /// Where the weights start: `scratch` (GPT-2 init, nanoGPT's default), the output of a
    /// `train` or `finetune` stage (its best checkpoint, `ckpt`), or a folder in the Hugging
    /// Face GPT-2 layout (`config.json` + `model.safetensors`, e.g. a download stage's output).
    pub init_from: String,
    /// Layers. Unset: 12 (GPT-2 124M) from scratch, the checkpoint's otherwise.
    pub n_layer: Option<usize>,
    /// Attention heads. Unset: 12 from scratch, the checkpoint's otherwise.
    pub n_head: Option<usize>,
    /// Embedding width. Unset: 768 from scratch, the checkpoint's otherwise.
    pub n_embd: Option<usize>,
    /// Context length. Unset: 1024 from scratch, the checkpoint's otherwise; smaller than the
    /// checkpoint's crops its position embeddings (nanoGPT's `crop_block_size`).
    pub block_size: Option<usize>,
    /// Biases in Linear and LayerNorm layers. Unset: false from scratch (nanoGPT: "a bit better
    /// and faster"), the checkpoint's otherwise.
    pub bias: Option<bool>,
    /// Vocabulary size. Unset: the data's (meta.json `vocab_size`) from scratch, the
    /// checkpoint's otherwise.
    pub vocab_size: Option<usize>,
    /// Round a from-scratch vocabulary up to a multiple of this: 64 turns GPT-2's 50257 into
    /// nanoGPT's 50304, which is faster on GPUs. 1: no padding.
    pub pad_vocab_to_multiple_of: usize,
    /// Dropout probability: 0 for pretraining (nanoGPT), 0.1+ for finetuning small data.
    pub dropout: f64,
    /// Sequences per micro-batch (nanoGPT: 12).
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed per step, to simulate a larger batch
    /// (nanoGPT: 5 * 8 = 40, about 0.5M tokens per step with batch 12 and block 1024).
    pub gradient_accumulation_steps: usize,
    /// Optimizer steps (nanoGPT: 600000 for GPT-2 124M on OpenWebText).
    pub max_iters: usize,
    /// Peak learning rate (nanoGPT: 6e-4).
    pub learning_rate: f64,
    /// AdamW weight decay, applied to 2-D parameters only (nanoGPT: 0.1).
    pub weight_decay: f64,
    /// AdamW beta1 (nanoGPT: 0.9).
    pub beta1: f64,
    /// AdamW beta2 (nanoGPT: 0.95; 0.99 for small data, where steps see few tokens).
    pub beta2: f64,
    /// Clip gradients to this global L2 norm; 0 disables (nanoGPT: 1.0).
    pub grad_clip: f64,
    /// Warm up and cosine-decay the learning rate; false keeps it constant (nanoGPT: true).
    pub decay_lr: bool,
    /// Linear warmup steps (nanoGPT: 2000).
    pub warmup_iters: usize,
    /// The step where the cosine reaches `min_lr`; about `max_iters` per Chinchilla (nanoGPT:
    /// 600000).
    pub lr_decay_iters: usize,
    /// The floor of the schedule, about `learning_rate` / 10 per Chinchilla (nanoGPT: 6e-5).
    pub min_lr: f64,
    /// Estimate train and val loss every this many steps, and checkpoint (nanoGPT: 2000).
    pub eval_interval: usize,
    /// Batches per loss estimate (nanoGPT: 200).
    pub eval_iters: usize,
    /// Print a loss line every this many steps (nanoGPT: 1). Does not change results.
    pub log_interval: usize,
    /// Save the best checkpoint at every evaluation, not only when val loss improves
    /// (nanoGPT: true).
    pub always_save_checkpoint: bool,
    /// Seeds the initialisation, the batches and the evaluations (nanoGPT: 1337).
    pub seed: u64,
    /// `auto` (CUDA when built with it and present, else CPU), `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// The matmuls' dtype: `auto` (bfloat16 on a GPU, float32 on the CPU), `bfloat16`,
    /// `float16` (with dynamic loss scaling) or `float32`. Weights, optimizer moments,
    /// LayerNorm, softmax and the loss stay float32 (mixed precision, as nanoGPT's autocast).
    pub dtype: String,
    /// Data-parallel ranks on this machine, one process each (one per GPU): a number or `auto`
    /// (every GPU; 1 on the CPU). `gradient_accumulation_steps` counts the micro-batches of the
    /// whole world and must divide by the ranks. With `device: cpu`, CPU processes, which CI
    /// uses to prove the fan-out. Does not change results (beyond float rounding), so not part
    /// of the key: a run may resume on another number of GPUs.
    pub gpus: Gpus,
}

/// `gpus`: a count, or `auto` for every GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gpus {
    Count(usize),
    Auto,
}

impl Serialize for Gpus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Gpus::Count(n) => serializer.serialize_u64(*n as u64),
            Gpus::Auto => serializer.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for Gpus {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Gpus, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Gpus;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number of GPUs or `auto`")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Gpus, E> {
                Ok(Gpus::Count(n as usize))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Gpus, E> {
                match s {
                    "auto" => Ok(Gpus::Auto),
                    other => other
                        .parse()
                        .map(Gpus::Count)
                        .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(other), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            data: String::new(),
            init_from: "scratch".into(),
            n_layer: None,
            n_head: None,
            n_embd: None,
            block_size: None,
            bias: None,
            vocab_size: None,
            pad_vocab_to_multiple_of: 1,
            dropout: 0.0,
            batch_size: 12,
            gradient_accumulation_steps: 40,
            max_iters: 600_000,
            learning_rate: 6e-4,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
            decay_lr: true,
            warmup_iters: 2000,
            lr_decay_iters: 600_000,
            min_lr: 6e-5,
            eval_interval: 2000,
            eval_iters: 200,
            log_interval: 1,
            always_save_checkpoint: true,
            seed: 1337,
            device: "auto".into(),
            dtype: "auto".into(),
            gpus: Gpus::Count(1),
        }
    }
}

/// Ways for tests to stop a run part-way, as a kill would.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hooks {
    /// Fail once this many steps are done in this process.
    pub stop_after: Option<usize>,
    /// Fail at this iteration's evaluation after `last` is written and before `ckpt` is, as a
    /// kill between the two would.
    pub stop_before_best: Option<usize>,
    /// Keep the losses on the device between log lines on the CPU too, as on a GPU.
    pub defer_loss_reads: bool,
}

/// The local files and folders whose content the engine hashes into the key: `data` and
/// `init_from` when they name folders rather than `${stage}` outputs (the engine skips those).
pub fn local_inputs(config: &Config) -> Vec<String> {
    let mut paths = vec![config.data.clone()];
    if config.init_from != "scratch" && !GptConfig::PRESETS.contains(&config.init_from.as_str()) {
        paths.push(config.init_from.clone());
    }
    paths.retain(|path| !path.is_empty());
    paths
}

pub fn run(config: &Config, ctx: &Context) -> anyhow::Result<Report> {
    train(config, ctx, &Hooks::default())
}

/// One process, or a world of ranks: `gpus` on this machine times the machines a launcher
/// started (see `dist`).
pub(crate) fn train(config: &Config, ctx: &Context, hooks: &Hooks) -> anyhow::Result<Report> {
    check(config, &Upstream::none())?;
    let machines = Machines::from_env(|name| std::env::var(name).ok())?;
    let local_ranks = match config.gpus {
        Gpus::Count(n) => n,
        Gpus::Auto if config.device == "cpu" => 1,
        Gpus::Auto => crate::gpt::device::gpu_count(),
    };
    // NANOFLOW_RANK_PROCESSES=1: even one rank runs as a worker process over the collective (on
    // one GPU, NCCL with a world of 1), to check that path where only one GPU is at hand.
    if machines.count * local_ranks == 1 && std::env::var_os(RANK_PROCESSES).is_none() {
        return run_rank(config, ctx, hooks, &World::single(), 1);
    }
    supervise(config, ctx, &machines, local_ranks)
}

/// Set: a world of one runs through the multi-process path too.
const RANK_PROCESSES: &str = "NANOFLOW_RANK_PROCESSES";

/// One rank's training (the whole run when the world is one process), nanoGPT's train.py: set
/// up, then per iteration maybe evaluate and checkpoint, step, log. Every rank draws every
/// micro-batch's offsets from the shared seeded stream and takes its share (micro-step `i` goes
/// to rank `i % size`), so a world of N ranks sees the batches one process would, and the
/// averaged gradients match one process's with N times the accumulation. Local rank 0 evaluates
/// and writes the outputs; rank 0 alone prints.
fn run_rank(
    config: &Config,
    ctx: &Context,
    hooks: &Hooks,
    world: &World,
    local_ranks: usize,
) -> anyhow::Result<Report> {
    let (setup, mut trainer, latest) = set_up(config, ctx, hooks, world, local_ranks)?;
    let (mut run, rows) = Run::resume(&setup, &mut trainer, latest)?;
    let mut record = Record::new(&setup, rows, run.iter);
    loop {
        let iter = run.iter;
        let lr = setup.schedule.lr(iter);

        // evaluate the loss on train/val sets and write checkpoints
        let due = iter % config.eval_interval == 0 || iter == config.max_iters;
        if setup.writes && due && run.resumed_from != Some(iter) {
            evaluate_and_checkpoint(&setup, &trainer, &mut run, &mut record)?;
        }
        if iter == config.max_iters {
            break;
        }
        // A signal (a Slurm job's warning before its end, Ctrl-C): a complete checkpoint of this
        // iteration, unless the evaluation above or the resume just wrote one, then stop.
        if trainer.stop_requested() {
            if setup.writes && !due && run.resumed_from != Some(iter) {
                record.write(&ctx.out)?;
                trainer.save(&ctx.out, "last", run.state(&setup, &trainer)?)?;
            }
            log!(setup.main, "iter {iter}: stopping on a signal; the checkpoint holds every step so far");
            return Err(crate::interrupt::Checkpointed { iter: Some(iter) }.into());
        }

        // forward backward update, with optional gradient accumulation to simulate larger batch
        // size; every rank draws every micro-batch's offsets and takes its share
        record.start_step();
        let (data, block_size) = (&setup.data.train, setup.model.block_size);
        let micro_batches: Vec<Vec<u64>> = (0..config.gradient_accumulation_steps)
            .map(|_| batches::batch_offsets(data, &mut run.rng, config.batch_size, block_size))
            .collect();
        let first_micro_step = (iter * config.gradient_accumulation_steps) as u64;
        let skipped = trainer.step(data, &micro_batches, first_micro_step, config.seed, lr, config.grad_clip)?;
        if let Some(scale) = skipped {
            log!(setup.main, "iter {iter}: float16 gradients overflowed; step skipped, loss scale now {scale}");
        }

        // timing and logging
        record.log_step(&setup, &mut trainer, iter, lr, run.last_good)?;
        run.iter += 1;
        if hooks.stop_after == Some(record.steps_here) {
            bail!("stopped after {} steps (test hook)", record.steps_here);
        }
    }
    record.finish(&setup);
    if !setup.writes {
        return Ok(Report::default());
    }
    publish(&setup, &run, record)
}

/// What one rank's run is set up with and keeps to the end: the params, where it prints and
/// writes, the data, the model's shape and what follows from it.
struct Setup<'a> {
    config: &'a Config,
    ctx: &'a Context,
    hooks: &'a Hooks,
    /// Rank 0: prints.
    main: bool,
    /// Local rank 0: evaluates and writes the outputs.
    writes: bool,
    /// Ranks in the world.
    ranks: usize,
    data: Data,
    model: GptConfig,
    /// Micro-batches per step on this rank.
    local_steps: usize,
    tokens_per_iter: usize,
    schedule: Schedule,
    peak_flops: Option<f64>,
    /// The preflight's estimate for the built model (`gpt/estimate.rs`), for the report, and
    /// its time per step where this machine measured the shape before.
    estimate: Estimate,
    estimated_ms_per_iter: Option<f64>,
}

/// The data, the model and its optimizer, the checks that they fit, and the log lines of
/// nanoGPT's set-up; with the latest checkpoint in the output directory, to resume from.
fn set_up<'a>(
    config: &'a Config,
    ctx: &'a Context,
    hooks: &'a Hooks,
    world: &World,
    local_ranks: usize,
) -> anyhow::Result<(Setup<'a>, Trainer, Latest)> {
    let main = world.is_main();
    let writes = world.writes_outputs();
    if main {
        // In log.txt; on screen with `-v` (the manifest records it too).
        for line in config_lines(config)?.lines() {
            progress::verbose(line);
        }
    }
    let data = Data::open(config, ctx, writes)?;
    let trainer = init_model(config, ctx, world, local_ranks, data.vocab_size)?;
    log!(main, "device: {}, matmuls in {}", trainer.device_name(), trainer.matmul_dtype());
    let latest = latest_checkpoint(&ctx.out)?;
    if latest.is_none() {
        log!(main, "initializing {}", trainer.description);
    }
    let model = trainer.config().clone();
    data.check_fits(&model)?;
    check_world(config, world.size)?;
    let local_steps = config.gradient_accumulation_steps / world.size;
    let tokens_per_iter = config.gradient_accumulation_steps * config.batch_size * model.block_size;
    log!(main, "tokens per iteration will be: {tokens_per_iter}");
    log!(main, "number of parameters: {:.2}M", model.num_params(true) as f64 / 1e6);
    let target = if trainer.is_cpu() { Target::Cpu } else { Target::Gpu };
    let estimate = Estimate::of_model(config, &model, target, world.size);
    // A step's time as this machine measured it before for this shape (the engine keeps the
    // record: `src/preflight.rs`), for the report's estimate against the actual.
    // Keyed by the shape as the plan saw it (the vocabulary guessed from the tokenizer where
    // the params leave it to the data), so that the plan and the stage find the same entry.
    let tokenizer = Meta::read(&data.dir).ok().map(|meta| meta.tokenizer.as_str());
    let planned = Estimate::new(config, tokenizer);
    let key = CalibrationKey::new(&planned, &crate::hostname(), &config.device, &config.dtype);
    let calibration = Calibration::read(&estimate::calibration_file(&ctx.root));
    let estimated_ms_per_iter = key.and_then(|key| calibration.find(&key)).map(|ms| ms * local_steps as f64);
    let time = estimated_ms_per_iter.map_or(String::new(), |ms| {
        format!(", time {} at {ms:.1} ms per step", estimate::duration(ms * config.max_iters as f64 / 1e3))
    });
    log!(main, "{}{time}", estimate.summary());
    let [(decay_tensors, decay_params), (nodecay_tensors, nodecay_params)] = trainer.optimizer_groups();
    log!(main, "num decayed parameter tensors: {decay_tensors}, with {decay_params} parameters");
    log!(main, "num non-decayed parameter tensors: {nodecay_tensors}, with {nodecay_params} parameters");
    let schedule = Schedule {
        learning_rate: config.learning_rate,
        decay_lr: config.decay_lr,
        warmup_iters: config.warmup_iters,
        lr_decay_iters: config.lr_decay_iters,
        min_lr: config.min_lr,
    };
    let peak_flops = trainer.peak_flops();
    let ranks = world.size;
    let setup = Setup {
        config,
        ctx,
        hooks,
        main,
        writes,
        ranks,
        data,
        model,
        local_steps,
        tokens_per_iter,
        schedule,
        peak_flops,
        estimate,
        estimated_ms_per_iter,
    };
    Ok((setup, trainer, latest))
}

/// data: random windows of the token stream, like nanoGPT's memmapped get_batch.
struct Data {
    dir: PathBuf,
    /// The tokenizer's vocabulary (meta.json).
    vocab_size: usize,
    train: TokenSplit,
    val: TokenSplit,
}

impl Data {
    fn open(config: &Config, ctx: &Context, writes: bool) -> anyhow::Result<Data> {
        let dir = ctx.root.join(&config.data);
        let vocab_size = Meta::read(&dir).context("`data`")?.vocab_size;
        let train = TokenSplit::open(&dir, "train")?;
        let val = TokenSplit::open(&dir, "val")?;
        if writes {
            // The data's meta.json travels with the model: it names the tokenizer that `sample`,
            // `eval` and `export` need to turn text into this model's tokens and back.
            fs_err::copy(dir.join(meta::FILE), ctx.out.join(meta::FILE))?;
        }
        Ok(Data { dir, vocab_size, train, val })
    }

    /// The model takes the data's tokens, and each split holds a window of `block_size` + 1.
    fn check_fits(&self, model: &GptConfig) -> anyhow::Result<()> {
        ensure!(
            self.vocab_size <= model.vocab_size,
            "the data's vocabulary ({} tokens) does not fit the model's ({})",
            self.vocab_size,
            model.vocab_size
        );
        for (name, split) in [("train", &self.train), ("val", &self.val)] {
            ensure!(
                split.len() > model.block_size as u64,
                "the {name} split of `{}` has {} tokens, fewer than `block_size` + 1 = {}",
                self.dir.display(),
                split.len(),
                model.block_size + 1
            );
        }
        Ok(())
    }
}

/// model init: scratch, a train stage's checkpoint, or GPT-2 weights in the Hugging Face
/// layout; optimizer: AdamW, weight decay on 2-D parameters only (nanoGPT's
/// configure_optimizers).
fn init_model(
    config: &Config,
    ctx: &Context,
    world: &World,
    local_ranks: usize,
    data_vocab: usize,
) -> anyhow::Result<Trainer> {
    let init = match config.init_from.as_str() {
        "scratch" => Init::Scratch(config.scratch_model(data_vocab)),
        spec => Init::Pretrained {
            spec: spec.to_string(),
            root: ctx.root.clone(),
            shape: AskedShape {
                n_layer: config.n_layer,
                n_head: config.n_head,
                n_embd: config.n_embd,
                vocab_size: config.vocab_size,
                bias: config.bias,
                block_size: config.block_size,
                dropout: config.dropout,
            },
        },
    };
    let adamw = AdamWParams { beta1: config.beta1, beta2: config.beta2, eps: 1e-8, weight_decay: config.weight_decay };
    let options =
        Options { device: &config.device, dtype: &config.dtype, world, local_ranks, adamw, seed: config.seed };
    Trainer::new(init, &options)
}

/// nanoGPT's evaluation: the train and val loss estimates, logged and recorded, then the
/// checkpoints: `last` always, `ckpt` when the val loss improved (or always, with
/// `always_save_checkpoint`).
fn evaluate_and_checkpoint(setup: &Setup, trainer: &Trainer, run: &mut Run, record: &mut Record) -> anyhow::Result<()> {
    let (config, ctx, iter) = (setup.config, setup.ctx, run.iter);
    let losses = estimate_loss(trainer, config, &setup.data.train, &setup.data.val, iter)?;
    log!(setup.main, "step {iter}: train loss {:.4}, val loss {:.4}", losses[0], losses[1]);
    for (split, loss) in ["train", "val"].iter().zip(losses) {
        if !loss.is_finite() {
            bail!(diverged(&format!("the {split} loss estimate is {loss}"), iter, run.last_good));
        }
    }
    record.row(iter).train_loss = Some(losses[0]);
    record.row(iter).val_loss = Some(losses[1]);
    run.val_loss = losses[1];
    let improved = losses[1] < run.best_val_loss;
    let save_best = improved || config.always_save_checkpoint;
    if save_best {
        run.best_val_loss = run.best_val_loss.min(losses[1]);
        run.best_iter = Some(iter);
    }
    let state = run.state(setup, trainer)?;
    // The record first: a checkpoint may be older than the record, never newer. Then `last`,
    // then `ckpt`: a resume from `last` repairs a `ckpt` that did not follow.
    record.write(&ctx.out)?;
    trainer.save(&ctx.out, "last", state.clone())?;
    if setup.hooks.stop_before_best == Some(iter) {
        bail!("stopped between `last` and `ckpt` at iter {iter} (test hook)");
    }
    if save_best {
        if setup.main {
            let out = ctx.out.strip_prefix(&ctx.root).unwrap_or(&ctx.out);
            progress::verbose(&format!("saving checkpoint to {}", out.display()));
        }
        trainer.save(&ctx.out, "ckpt", state)?;
    }
    record.plot(ctx)?;
    run.last_good = Some(iter);
    Ok(())
}

impl Config {
    /// The model trained from scratch: what the params say, GPT-2 124M where they are unset, the
    /// vocabulary `vocab_size` or else the data's (`data_vocab`), padded. The trainer and the
    /// preflight's estimate both build it here.
    pub fn scratch_model(&self, data_vocab: usize) -> GptConfig {
        GptConfig {
            block_size: self.block_size.unwrap_or(1024),
            vocab_size: self.vocab_size.unwrap_or(data_vocab).next_multiple_of(self.pad_vocab_to_multiple_of.max(1)),
            n_layer: self.n_layer.unwrap_or(12),
            n_head: self.n_head.unwrap_or(12),
            n_embd: self.n_embd.unwrap_or(768),
            dropout: self.dropout,
            bias: self.bias.unwrap_or(false),
        }
    }
}

/// Everything pipeline.yaml decides: the engine calls this before any stage runs.
pub fn check(config: &Config, upstream: &Upstream) -> Result<(), Invalid> {
    required("data", &config.data, || "a tokenize stage's output, e.g. `data: ${tokenize-stage}`".to_string())?;
    upstream.expect("data", &config.data, &["tokenize", "command"], "a tokenize stage's output")?;
    if config.init_from != "scratch" {
        crate::gpt::source::check("init_from", &config.init_from, upstream)?;
    }
    let shape = [
        ("n_layer", config.n_layer),
        ("n_head", config.n_head),
        ("n_embd", config.n_embd),
        ("block_size", config.block_size),
    ];
    for (key, value) in shape.into_iter().chain([("vocab_size", config.vocab_size)]) {
        if let Some(value) = value {
            at_least_one(key, value)?;
        }
    }
    // From scratch an unset width or head count is GPT-2's; from a checkpoint, the checkpoint's.
    let (n_head, n_embd) = match config.init_from.as_str() {
        "scratch" => (Some(config.n_head.unwrap_or(12)), Some(config.n_embd.unwrap_or(768))),
        _ => (config.n_head, config.n_embd),
    };
    if let (Some(n_head), Some(n_embd)) = (n_head, n_embd) {
        ensure(n_embd.is_multiple_of(n_head), "n_head", || {
            format!(
                "must divide `n_embd` ({n_embd}), and {n_head} does not: each head attends over n_embd / n_head of it"
            )
        })?;
    }
    for (key, value) in [
        ("pad_vocab_to_multiple_of", config.pad_vocab_to_multiple_of),
        ("batch_size", config.batch_size),
        ("gradient_accumulation_steps", config.gradient_accumulation_steps),
        ("eval_interval", config.eval_interval),
        ("eval_iters", config.eval_iters),
        ("log_interval", config.log_interval),
    ] {
        at_least_one(key, value)?;
    }
    for (key, value) in [("dropout", config.dropout), ("beta1", config.beta1), ("beta2", config.beta2)] {
        ensure((0.0..1.0).contains(&value), key, || format!("must be at least 0 and below 1, not {value}"))?;
    }
    for (key, value) in [
        ("learning_rate", config.learning_rate),
        ("min_lr", config.min_lr),
        ("weight_decay", config.weight_decay),
        ("grad_clip", config.grad_clip),
    ] {
        ensure(value.is_finite() && value >= 0.0, key, || format!("must be 0 or more, not {value}"))?;
    }
    crate::gpt::device::check(&config.device)?;
    crate::gpt::device::check_dtype(&config.dtype)?;
    match config.gpus {
        Gpus::Count(0) => Err(Invalid::new("gpus", "must be at least 1, or `auto`")),
        Gpus::Count(ranks) => ensure(config.gradient_accumulation_steps.is_multiple_of(ranks), "gpus", || {
            format!(
                "must divide `gradient_accumulation_steps` ({}), and {ranks} does not: each rank takes an equal share \
                 of a step's micro-batches (nanoGPT divides it by the world size the same way)",
                config.gradient_accumulation_steps
            )
        }),
        Gpus::Auto => Ok(()),
    }
}

/// Each of `ranks` takes an equal share of a step's micro-batches.
fn check_world(config: &Config, ranks: usize) -> anyhow::Result<()> {
    ensure!(
        config.gradient_accumulation_steps.is_multiple_of(ranks),
        "`gradient_accumulation_steps: {}` must be a multiple of the {ranks} ranks: each rank takes an equal share of \
         a step's micro-batches (nanoGPT divides it by the world size the same way)",
        config.gradient_accumulation_steps
    );
    Ok(())
}

/// The config as YAML lines in name order, only the params that differ from `train`'s defaults
/// (the whole config is in the manifest): what this run is, at a glance.
fn config_lines(config: &Config) -> anyhow::Result<String> {
    let (ours, defaults) = (serde_json::to_value(config)?, serde_json::to_value(Config::default())?);
    let mut text = String::from("config (what differs from train's defaults):\n");
    for (key, value) in ours.as_object().into_iter().flatten() {
        if defaults.get(key) != Some(value) {
            text.push_str(&format!("  {key}: {value}\n"));
        }
    }
    Ok(text)
}

fn diverged(what: &str, iter: usize, last_good: Option<usize>) -> String {
    let kept = match last_good {
        Some(at) => format!("the last good checkpoint (iter {at}) is kept"),
        None => "no checkpoint was written yet".into(),
    };
    format!(
        "{what} at iter {iter}: training diverged; {kept}\nhint: lower `learning_rate`, raise `warmup_iters` or set `grad_clip`"
    )
}

/// Where evaluation streams start: far from the training stream (which starts at the seed) on
/// SplitMix64's cycle of 2^64.
const EVAL_STREAM: u64 = 0x6576_616c_0000_0000;

/// nanoGPT's estimate_loss: the mean loss over `eval_iters` batches of each split, with the
/// model in eval mode (no dropout). Batches come from a stream of their own, fixed by the seed
/// and the iteration, so evaluating never moves the training batches.
fn estimate_loss(
    trainer: &Trainer,
    config: &Config,
    train_data: &TokenSplit,
    val_data: &TokenSplit,
    iter: usize,
) -> anyhow::Result<[f64; 2]> {
    let mut out = [0.0; 2];
    for (split, (data, mean)) in [train_data, val_data].into_iter().zip(out.iter_mut()).enumerate() {
        let mut rng = Rng::new(config.seed ^ EVAL_STREAM ^ ((iter as u64) << 1 | split as u64));
        *mean = trainer.evaluate(data, &mut rng, config.eval_iters, config.batch_size)?;
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::Path;

    use candle_core::{DType, Device, Tensor};

    use crate::formats::metrics;
    use crate::gpt::checkpoint;
    use crate::gpt::optim::LossScale;

    pub fn context(root: &Path, out: &str) -> Context {
        let out = root.join(out);
        fs_err::create_dir_all(&out).unwrap();
        Context { stage: "train".into(), root: root.to_path_buf(), out, inputs: BTreeMap::new() }
    }

    /// data/ci/corpus.txt (12 KB of Shakespeare), tokenized by characters into `root/data`.
    pub fn char_data(root: &Path) -> String {
        let corpus = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/ci/corpus.txt");
        let config = crate::tokenize::Config {
            input: corpus.into(),
            tokenizer: crate::formats::meta::TokenizerName::Char,
            ..Default::default()
        };
        let ctx = context(root, "data");
        crate::tokenize::run(&config, &ctx).unwrap();
        ctx.out.to_string_lossy().into_owned()
    }

    /// A model and run small enough for seconds on a CPU.
    pub fn tiny(data: String) -> Config {
        Config {
            data,
            n_layer: Some(1),
            n_head: Some(2),
            n_embd: Some(32),
            block_size: Some(32),
            batch_size: 8,
            gradient_accumulation_steps: 2,
            max_iters: 8,
            learning_rate: 1e-2,
            warmup_iters: 2,
            lr_decay_iters: 8,
            min_lr: 1e-3,
            eval_interval: 2,
            eval_iters: 2,
            device: "cpu".into(),
            ..Config::default()
        }
    }

    fn losses(out: &Path) -> Vec<(i64, Option<f64>, Option<f64>)> {
        let rows = metrics::read_parquet(&out.join("metrics.parquet")).unwrap();
        rows.iter().map(|row| (row.iter, row.loss, row.val_loss)).collect()
    }

    #[test]
    fn tiny_run_learns_and_writes_its_files() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let config = Config {
            max_iters: 30,
            eval_interval: 10,
            eval_iters: 4,
            lr_decay_iters: 30,
            ..tiny(char_data(dir.path()))
        };
        let ctx = context(dir.path(), "out");
        let report = run(&config, &ctx)?;
        let rows = metrics::read_parquet(&ctx.out.join("metrics.parquet"))?;
        let val: Vec<f64> = rows.iter().filter_map(|row| row.val_loss).collect();
        assert_eq!(val.len(), 4, "evaluated at 0, 10, 20, 30");
        assert!(val[3] < val[0] - 0.3, "val loss fell: {val:?}");
        assert_eq!(rows.iter().filter(|row| row.loss.is_some()).count(), 30);
        for name in
            ["ckpt.safetensors", "ckpt.optim.safetensors", "ckpt.json", "last.safetensors", "last.json", "loss.png"]
        {
            assert!(ctx.out.join(name).exists(), "{name}");
        }
        assert_eq!(checkpoint::load_state(&ctx.out, "last")?.unwrap().iter, 30);
        assert_eq!(report.metrics["iters"], 30);
        assert!(report.metrics["best_val_loss"].as_f64().unwrap() <= val[3]);
        Ok(())
    }

    #[test]
    fn resumed_run_repeats_the_uninterrupted_losses() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        // With dropout: its masks too must repeat.
        let config = Config { dropout: 0.1, ..tiny(char_data(dir.path())) };
        let whole = context(dir.path(), "whole");
        train(&config, &whole, &Hooks::default())?;
        let without = context(dir.path(), "without-dropout");
        train(&Config { dropout: 0.0, ..config.clone() }, &without, &Hooks::default())?;
        assert_ne!(losses(&whole.out)[3], losses(&without.out)[3], "dropout changes the losses");

        let interrupted = context(dir.path(), "interrupted");
        let error = train(&config, &interrupted, &Hooks { stop_after: Some(5), ..Hooks::default() }).unwrap_err();
        assert!(error.to_string().contains("test hook"), "{error}");
        assert_eq!(checkpoint::load_state(&interrupted.out, "last")?.unwrap().iter, 4);
        let report = train(&config, &interrupted, &Hooks::default())?;
        assert_eq!(report.metrics["resumed_from_iter"], 4);

        let (expected, found) = (losses(&whole.out), losses(&interrupted.out));
        assert_eq!(expected.len(), 9);
        assert_eq!(expected.len(), found.len());
        for (a, b) in expected.iter().zip(&found) {
            assert_eq!(a.0, b.0);
            for (a, b) in [(a.1, b.1), (a.2, b.2)] {
                assert_eq!(a.is_some(), b.is_some());
                assert!((a.unwrap_or(0.0) - b.unwrap_or(0.0)).abs() < 1e-6, "{expected:?}\n{found:?}");
            }
        }
        Ok(())
    }

    /// Killed after the final evaluation wrote `last` and before it wrote `ckpt` (issue F1): the
    /// next run repairs `ckpt` from `last` and publishes the best model the run recorded, the
    /// same bytes as an uninterrupted run's; no temporary file of an interrupted write survives.
    #[test]
    fn an_interruption_between_last_and_ckpt_is_repaired() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        // A falling val loss: every evaluation is a new best, so `ckpt` follows `last` each time.
        let config = Config { always_save_checkpoint: false, ..tiny(char_data(dir.path())) };
        let whole = context(dir.path(), "whole");
        train(&config, &whole, &Hooks::default())?;
        let expected = checkpoint::load_state(&whole.out, "ckpt")?.unwrap();
        assert_eq!((expected.iter, expected.ckpt_iter), (8, Some(8)));

        for half_written in [false, true] {
            let out = context(dir.path(), &format!("interrupted-{half_written}"));
            let hooks = Hooks { stop_before_best: Some(8), ..Hooks::default() };
            let error = train(&config, &out, &hooks).unwrap_err();
            assert!(error.to_string().contains("test hook"), "{error}");
            assert_eq!(checkpoint::load_state(&out.out, "ckpt")?.unwrap().iter, 6, "the previous best");
            if half_written {
                // The new weights renamed into place, the JSON not: `ckpt` reads as incomplete.
                fs_err::copy(out.out.join("last.safetensors"), out.out.join("ckpt.safetensors"))?;
                assert!(checkpoint::load_state(&out.out, "ckpt")?.is_none());
            }
            // What killed writes leave behind.
            fs_err::write(out.out.join(".tmpAbC123"), "partial safetensors")?;
            fs_err::write(out.out.join(".ckpt.json.tmp"), "{")?;

            train(&config, &out, &Hooks::default())?;
            let repaired = checkpoint::load_state(&out.out, "ckpt")?.unwrap();
            assert_eq!((repaired.iter, repaired.ckpt_iter), (8, Some(8)));
            assert_eq!(repaired.files, expected.files, "the same weights as the uninterrupted run's");
            let names: Vec<String> = fs_err::read_dir(&out.out)?
                .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with('.'))
                .collect();
            assert!(names.is_empty(), "{names:?}");
        }
        Ok(())
    }

    /// A `last.json` that does not parse is an incomplete checkpoint, not a stage that fails
    /// forever (issue F7): the run resumes from `ckpt` and ends with the uninterrupted weights.
    #[test]
    fn an_unparsable_last_json_is_not_resumed_from() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let config = tiny(char_data(dir.path()));
        let whole = context(dir.path(), "whole");
        train(&config, &whole, &Hooks::default())?;
        let out = context(dir.path(), "out");
        train(&config, &out, &Hooks { stop_after: Some(7), ..Hooks::default() }).unwrap_err();
        fs_err::write(checkpoint::state_path(&out.out, "last"), "{ damaged")?;
        let report = train(&config, &out, &Hooks::default())?;
        assert_eq!(report.metrics["resumed_from_iter"], 6);
        let files = |dir: &Path| checkpoint::load_state(dir, "last").unwrap().unwrap().files;
        assert_eq!(files(&out.out), files(&whole.out));
        Ok(())
    }

    /// A finished run's partial output whose `last` is damaged (issue 28, item 5): the resume at
    /// `max_iters` writes `last` again from `ckpt` rather than publishing the damaged file.
    #[test]
    fn a_damaged_last_at_max_iters_is_written_again_before_publishing() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let config = tiny(char_data(dir.path()));
        let out = context(dir.path(), "out");
        train(&config, &out, &Hooks::default())?;
        let expected = checkpoint::load_state(&out.out, "last")?.unwrap();
        fs_err::write(out.out.join("last.safetensors"), [0u8; 50])?;
        assert!(checkpoint::load_state(&out.out, "last")?.is_none(), "damaged");
        train(&config, &out, &Hooks::default())?;
        let last = checkpoint::load_state(&out.out, "last")?.expect("`last` verifies again");
        assert_eq!((last.iter, &last.files), (8, &expected.files));
        Ok(())
    }

    /// A best checkpoint lost otherwise (not the one `last` holds) is an error, not a publish.
    #[test]
    fn a_damaged_older_best_checkpoint_is_not_published() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let config = Config { always_save_checkpoint: false, ..tiny(char_data(dir.path())) };
        let out = context(dir.path(), "out");
        train(&config, &out, &Hooks { stop_after: Some(7), ..Hooks::default() }).unwrap_err();
        let state = checkpoint::load_state(&out.out, "last")?.unwrap();
        assert_eq!((state.iter, state.ckpt_iter), (6, Some(6)));
        // As if `last` (iter 6) had recorded an older best (iter 4), since lost.
        let json = fs_err::read_to_string(checkpoint::state_path(&out.out, "last"))?;
        fs_err::write(checkpoint::state_path(&out.out, "last"), json.replace("\"ckpt_iter\": 6", "\"ckpt_iter\": 4"))?;
        let error = train(&config, &out, &Hooks::default()).unwrap_err().to_string();
        assert!(error.starts_with("the best checkpoint in `"), "{error}");
        assert!(error.contains("(iter 4) is missing or damaged"), "{error}");
        Ok(())
    }

    #[test]
    fn logging_and_evaluation_do_not_move_training() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let config = Config { max_iters: 6, ..tiny(char_data(dir.path())) };
        let base = context(dir.path(), "base");
        run(&config, &base)?;
        let other = context(dir.path(), "other");
        run(&Config { log_interval: 4, eval_interval: 3, ..config }, &other)?;
        let train_losses = |out: &Path| losses(out).into_iter().map(|(iter, loss, _)| (iter, loss)).collect::<Vec<_>>();
        assert_eq!(train_losses(&base.out), train_losses(&other.out));
        // The final models are the same bytes.
        let digest =
            |out: &Path| checkpoint::load_state(out, "last").unwrap().unwrap().files["last.safetensors"].clone();
        assert_eq!(digest(&base.out), digest(&other.out));
        Ok(())
    }

    #[test]
    fn losses_read_at_log_lines_are_the_losses_read_every_step() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let config = Config { max_iters: 7, eval_interval: 5, log_interval: 3, ..tiny(char_data(dir.path())) };
        let every = context(dir.path(), "every");
        train(&config, &every, &Hooks::default())?;
        let deferred = context(dir.path(), "deferred");
        train(&config, &deferred, &Hooks { defer_loss_reads: true, ..Hooks::default() })?;
        assert_eq!(losses(&every.out), losses(&deferred.out));
        let rows = metrics::read_parquet(&deferred.out.join("metrics.parquet"))?;
        let tokens_per_iter = (config.batch_size * config.gradient_accumulation_steps * 32) as i64;
        assert!(rows.iter().all(|row| row.tokens == row.iter * tokens_per_iter), "{rows:?}");
        Ok(())
    }

    #[test]
    fn accumulated_micro_batches_step_like_one_batch() -> anyhow::Result<()> {
        // 2 x 4 sequences draw the same windows as 1 x 8, and the mean of two means is the mean.
        let dir = tempfile::tempdir()?;
        let config = Config { max_iters: 2, eval_interval: 100, ..tiny(char_data(dir.path())) };
        let one = context(dir.path(), "one");
        run(&Config { batch_size: 8, gradient_accumulation_steps: 1, ..config.clone() }, &one)?;
        let two = context(dir.path(), "two");
        run(&Config { batch_size: 4, gradient_accumulation_steps: 2, ..config }, &two)?;
        // The evaluations differ (4 or 8 sequences per batch); the weights must not.
        let diff = max_weight_diff(&one.out, &two.out);
        assert!(diff < 1e-5, "largest weight difference {diff}");
        Ok(())
    }

    fn weights(out: &Path) -> std::collections::HashMap<String, Tensor> {
        candle_core::safetensors::load(out.join("last.safetensors"), &Device::Cpu).unwrap()
    }

    fn max_weight_diff(a: &Path, b: &Path) -> f32 {
        let (a, b) = (weights(a), weights(b));
        assert_eq!(a.len(), b.len());
        a.iter()
            .map(|(name, tensor)| {
                (tensor - &b[name])
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .fold(0.0, f32::max)
    }

    /// Runs `config` as a world of `size` ranks, threads of this process over the CPU collective.
    fn run_world(config: &Config, ctx: &Context, size: usize) -> anyhow::Result<()> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        std::thread::scope(|scope| {
            let ranks: Vec<_> = (0..size)
                .map(|rank| {
                    let world = World { rank, size, local_rank: rank, master: format!("127.0.0.1:{port}") };
                    scope.spawn(move || run_rank(config, ctx, &Hooks::default(), &world, size))
                })
                .collect();
            ranks.into_iter().try_for_each(|rank| rank.join().expect("a rank panicked").map(drop))
        })
    }

    #[test]
    fn two_ranks_train_the_weights_of_one_with_twice_the_accumulation() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        // With dropout, whose masks must follow the micro-step wherever it runs.
        let config =
            Config { gradient_accumulation_steps: 4, max_iters: 6, dropout: 0.1, ..tiny(char_data(dir.path())) };
        let one = context(dir.path(), "one");
        run(&config, &one)?;
        let two = context(dir.path(), "two");
        run_world(&config, &two, 2)?;
        let diff = max_weight_diff(&one.out, &two.out);
        assert!(diff < 1e-5, "largest weight difference {diff}");
        for (a, b) in losses(&one.out).iter().zip(losses(&two.out)) {
            assert_eq!(a.0, b.0);
            assert!((a.1.unwrap_or(0.0) - b.1.unwrap_or(0.0)).abs() < 1e-5, "train loss at {}: {a:?} {b:?}", a.0);
            assert!((a.2.unwrap_or(0.0) - b.2.unwrap_or(0.0)).abs() < 1e-5, "val loss at {}: {a:?} {b:?}", a.0);
        }
        // A world whose ranks cannot share the accumulation evenly is refused before it starts.
        let error = run_world(&Config { gradient_accumulation_steps: 3, ..config }, &context(dir.path(), "odd"), 2)
            .unwrap_err()
            .to_string();
        assert!(error.contains("must be a multiple of the 2 ranks"), "{error}");
        Ok(())
    }

    #[test]
    fn bfloat16_matmuls_track_float32() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let config = Config { max_iters: 10, eval_interval: 10, ..tiny(char_data(dir.path())) };
        let full = context(dir.path(), "float32");
        run(&config, &full)?;
        let mixed = context(dir.path(), "bfloat16");
        run(&Config { dtype: "bfloat16".into(), ..config.clone() }, &mixed)?;
        let (a, b) = (losses(&full.out), losses(&mixed.out));
        let val = |rows: &[(i64, Option<f64>, Option<f64>)]| rows.iter().filter_map(|row| row.2).collect::<Vec<_>>();
        let (a, b) = (val(&a), val(&b));
        assert_eq!(a.len(), 2);
        assert!((a[1] - b[1]).abs() < 0.05, "val loss after 10 steps: float32 {} bfloat16 {}", a[1], b[1]);
        assert!(a[1] != b[1], "the bfloat16 run did round its matmuls");
        // The weights stay float32.
        assert!(weights(&mixed.out).values().all(|tensor| tensor.dtype() == DType::F32));
        Ok(())
    }

    #[test]
    fn float16_scales_the_loss_and_checkpoints_the_scale() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let config = Config { max_iters: 4, dtype: "float16".into(), ..tiny(char_data(dir.path())) };
        let ctx = context(dir.path(), "out");
        run(&config, &ctx)?;
        let state = checkpoint::load_state(&ctx.out, "last")?.unwrap();
        assert_eq!(state.loss_scale, Some(LossScale { scale: 65536.0, good_steps: 4 }));
        assert!(losses(&ctx.out).iter().all(|row| row.1.is_none_or(f64::is_finite)));
        Ok(())
    }

    #[test]
    fn divergence_stops_with_a_clear_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let config = Config {
            learning_rate: 1e9,
            decay_lr: false,
            grad_clip: 0.0,
            max_iters: 20,
            ..tiny(char_data(dir.path()))
        };
        let ctx = context(dir.path(), "out");
        let error = run(&config, &ctx).unwrap_err().to_string();
        assert!(error.contains("training diverged"), "{error}");
        assert!(error.contains("the last good checkpoint (iter"), "{error}");
        // The kept checkpoint reads back.
        assert!(checkpoint::load_state(&ctx.out, "last")?.is_some());
        Ok(())
    }

    #[test]
    fn the_config_prints_what_differs_from_the_defaults() {
        let config = Config { data: "d".into(), n_layer: Some(4), dropout: 0.2, ..Config::default() };
        assert_eq!(
            config_lines(&config).unwrap(),
            "config (what differs from train's defaults):\n  data: \"d\"\n  dropout: 0.2\n  n_layer: 4\n"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let error = serde_json::from_value::<Config>(serde_json::json!({"data": "d", "n_embed": 4})).unwrap_err();
        assert!(error.to_string().contains("unknown field `n_embed`"), "{error}");
        let config = Config { data: "d".into(), dtype: "fp8".into(), ..Config::default() };
        assert_eq!(
            check(&config, &Upstream::none()).unwrap_err().to_string(),
            "`dtype` is `fp8`; use auto, bfloat16, float16 or float32"
        );
        let gpus = |value: serde_json::Value| serde_json::from_value::<Config>(serde_json::json!({"gpus": value}));
        assert_eq!(gpus(serde_json::json!("auto")).unwrap().gpus, Gpus::Auto);
        assert_eq!(gpus(serde_json::json!(8)).unwrap().gpus, Gpus::Count(8));
        let error = gpus(serde_json::json!("all")).unwrap_err().to_string();
        assert!(error.contains("a number of GPUs or `auto`"), "{error}");
        let error =
            check(&Config { gpus: Gpus::Count(0), dtype: "auto".into(), ..config }, &Upstream::none()).unwrap_err();
        assert_eq!(error.to_string(), "`gpus` must be at least 1, or `auto`");
    }
}
