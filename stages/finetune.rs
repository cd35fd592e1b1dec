//! `kind: finetune`: `train` started from weights, with nanoGPT's finetuning defaults
//! (config/finetune_shakespeare.py: a small constant learning rate, few steps, frequent
//! evaluations, a large effective batch from accumulation). It owns only those defaults and the
//! requirement that `init_from` names weights; the loop, the checkpoints and resume are
//! `train.rs`'s, and every param means what it means there.

use anyhow::ensure;
use serde::{Deserialize, Serialize};

use crate::train;
use crate::{Context, Report};

/// Bumped with `train::VERSION` or when these defaults change meaning.
pub const VERSION: u32 = train::VERSION;

pub const NON_SEMANTIC: &[&str] = train::NON_SEMANTIC;

pub const RESUMABLE: bool = train::RESUMABLE;

/// `train`'s params; the doc comments say where the defaults differ.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// A tokenize stage's output. Required.
    pub data: String,
    /// The weights to start from: a `train`/`finetune` stage's output, or a Hugging Face GPT-2
    /// folder (a download stage of `openai-community/gpt2`, `gpt2-medium`, `gpt2-large` or
    /// `gpt2-xl`). Required: finetuning from scratch is `train`.
    pub init_from: String,
    /// Must match the checkpoint when set.
    pub n_layer: Option<usize>,
    /// Must match the checkpoint when set.
    pub n_head: Option<usize>,
    /// Must match the checkpoint when set.
    pub n_embd: Option<usize>,
    /// Smaller than the checkpoint's crops the model (GPT-2's 1024 to a laptop's 256).
    pub block_size: Option<usize>,
    /// Must match the checkpoint when set.
    pub bias: Option<bool>,
    /// Must match the checkpoint when set.
    pub vocab_size: Option<usize>,
    /// Only used from scratch.
    pub pad_vocab_to_multiple_of: usize,
    /// 0, as nanoGPT's finetune (which keeps train.py's); raise it for very small data.
    pub dropout: f64,
    /// 1 (finetune_shakespeare.py): GPT-2 XL's activations are large.
    pub batch_size: usize,
    /// 32 (finetune_shakespeare.py): 32 sequences of 1024 tokens per step.
    pub gradient_accumulation_steps: usize,
    /// 20 (finetune_shakespeare.py): Shakespeare is 301,966 GPT-2 tokens, so 20 steps of 32K
    /// tokens are about two epochs.
    pub max_iters: usize,
    /// 3e-5 (finetune_shakespeare.py): small, to adapt the pretrained weights, not replace them.
    pub learning_rate: f64,
    /// As train: 0.1.
    pub weight_decay: f64,
    /// As train: 0.9.
    pub beta1: f64,
    /// As train: 0.95.
    pub beta2: f64,
    /// As train: 1.0.
    pub grad_clip: f64,
    /// false (finetune_shakespeare.py): a constant learning rate for so few steps.
    pub decay_lr: bool,
    /// As train (2000); unused while `decay_lr` is false.
    pub warmup_iters: usize,
    /// As train (600000); unused while `decay_lr` is false.
    pub lr_decay_iters: usize,
    /// As train (6e-5); unused while `decay_lr` is false.
    pub min_lr: f64,
    /// 5 (finetune_shakespeare.py): a short run is watched closely, it overfits fast.
    pub eval_interval: usize,
    /// 40 (finetune_shakespeare.py).
    pub eval_iters: usize,
    /// As train: 1.
    pub log_interval: usize,
    /// false (finetune_shakespeare.py): keep the best model by val loss, not the last, since
    /// finetuning overfits.
    pub always_save_checkpoint: bool,
    /// As train: 1337.
    pub seed: u64,
    /// As train: auto.
    pub device: String,
    /// As train: auto (bfloat16 on a GPU, float32 on the CPU).
    pub dtype: String,
    /// As train: 1.
    pub gpus: train::Gpus,
}

impl Default for Config {
    fn default() -> Config {
        let train = train::Config::default();
        Config {
            data: String::new(),
            init_from: String::new(),
            n_layer: None,
            n_head: None,
            n_embd: None,
            block_size: None,
            bias: None,
            vocab_size: None,
            pad_vocab_to_multiple_of: train.pad_vocab_to_multiple_of,
            dropout: train.dropout,
            batch_size: 1,
            gradient_accumulation_steps: 32,
            max_iters: 20,
            learning_rate: 3e-5,
            weight_decay: train.weight_decay,
            beta1: train.beta1,
            beta2: train.beta2,
            grad_clip: train.grad_clip,
            decay_lr: false,
            warmup_iters: train.warmup_iters,
            lr_decay_iters: train.lr_decay_iters,
            min_lr: train.min_lr,
            eval_interval: 5,
            eval_iters: 40,
            log_interval: train.log_interval,
            always_save_checkpoint: false,
            seed: train.seed,
            device: train.device,
            dtype: train.dtype,
            gpus: train.gpus,
        }
    }
}

impl Config {
    /// The same params as `train`'s config: the fields are the same, so this cannot fail.
    pub fn to_train(&self) -> train::Config {
        serde_json::from_value(serde_json::to_value(self).expect("a Config serializes"))
            .expect("finetune and train configs have the same fields")
    }
}

/// As `train`'s: `data` and `init_from` where they name local folders.
pub fn local_inputs(config: &Config) -> Vec<String> {
    train::local_inputs(&config.to_train())
}

pub fn run(config: &Config, ctx: &Context) -> anyhow::Result<Report> {
    ensure!(
        !config.init_from.is_empty() && config.init_from != "scratch",
        "`init_from` is required: a train stage's output or a Hugging Face GPT-2 folder, e.g. `init_from: ${{gpt2-weights}}`"
    );
    train::run(&config.to_train(), ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::tests::{char_data, context, tiny};

    #[test]
    fn has_trains_fields() {
        let keys = |value: serde_json::Value| value.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        let finetune = serde_json::to_value(Config::default()).unwrap();
        let train = serde_json::to_value(train::Config::default()).unwrap();
        assert_eq!(keys(finetune), keys(train));
        assert_eq!(Config::default().to_train().learning_rate, 3e-5);
    }

    #[test]
    fn continues_a_train_stage_with_a_cropped_block() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data = char_data(dir.path());
        let pretrain = context(dir.path(), "pretrain");
        train::run(&train::Config { max_iters: 20, eval_interval: 10, ..tiny(data.clone()) }, &pretrain)?;
        let base = crate::checkpoint::load_state(&pretrain.out, "ckpt")?.unwrap();

        let config = Config {
            data,
            init_from: pretrain.out.to_string_lossy().into_owned(),
            block_size: Some(16),
            max_iters: 4,
            eval_interval: 2,
            eval_iters: 2,
            batch_size: 4,
            gradient_accumulation_steps: 1,
            learning_rate: 1e-3,
            device: "cpu".into(),
            ..Config::default()
        };
        let ctx = context(dir.path(), "finetune");
        let report = run(&config, &ctx)?;
        let state = crate::checkpoint::load_state(&ctx.out, "last")?.unwrap();
        assert_eq!(state.model.block_size, 16);
        assert_eq!(state.model.n_embd, base.model.n_embd);
        // Starting from trained weights, the first loss is already near the pretrained one.
        let rows = crate::metrics::read_parquet(&ctx.out.join("metrics.parquet"))?;
        assert!(rows[0].val_loss.unwrap() < base.val_loss + 0.5, "{:?} vs {}", rows[0], base.val_loss);
        assert!(report.metrics["best_val_loss"].as_f64().unwrap().is_finite());

        let missing = run(&Config { init_from: String::new(), ..config.clone() }, &ctx).unwrap_err();
        assert!(missing.to_string().contains("`init_from` is required"), "{missing}");
        let mismatch = Config { n_layer: Some(3), ..config };
        let error = run(&mismatch, &context(dir.path(), "mismatch")).unwrap_err();
        assert!(error.to_string().contains("`n_layer: 3` does not match the checkpoint's 1"), "{error}");
        Ok(())
    }
}
