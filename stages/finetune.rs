//! `kind: finetune`: `train` started from weights, with nanoGPT's finetuning defaults
//! (config/finetune_shakespeare.py: a small constant learning rate, few steps, frequent
//! evaluations, a large effective batch from accumulation). It owns only those defaults and the
//! requirement that `init_from` names weights; the params, the loop, the checkpoints and resume
//! are `train.rs`'s, and every param means what it means there.

use serde::{Deserialize, Serialize};

use crate::train;
use crate::{Context, Invalid, Report, Upstream};

/// Bumped with `train::VERSION` or when these defaults change meaning.
pub const VERSION: u32 = train::VERSION;

pub const NON_SEMANTIC: &[&str] = train::NON_SEMANTIC;
/// What each optional param means when it is unset (the report shows it as the default).
pub const UNSET: &[(&str, &str)] = train::UNSET;

pub const RESUMABLE: bool = train::RESUMABLE;

/// `train`'s params (the same fields, read the same way) with finetune's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Config(pub train::Config);

impl Default for Config {
    /// Where these differ from `train`'s, finetune_shakespeare.py's values, and why.
    fn default() -> Config {
        Config(train::Config {
            // Required: finetuning from scratch is `train`.
            init_from: String::new(),
            // 1 sequence × 32 micro-batches: GPT-2 XL's activations are large, and 32 sequences of
            // 1024 tokens make a step.
            batch_size: 1,
            gradient_accumulation_steps: 32,
            // Shakespeare is 301,966 GPT-2 tokens: 20 steps of 32K tokens are about two epochs.
            max_iters: 20,
            // Small, to adapt the pretrained weights rather than replace them, and constant for so
            // few steps.
            learning_rate: 3e-5,
            decay_lr: false,
            // A short run is watched closely: it overfits fast.
            eval_interval: 5,
            eval_iters: 40,
            // Keep the best model by val loss, not the last, since finetuning overfits.
            always_save_checkpoint: false,
            ..train::Config::default()
        })
    }
}

/// As `train`'s: `data` and `init_from` where they name local folders.
pub fn local_inputs(config: &Config) -> Vec<String> {
    train::local_inputs(&config.0)
}

/// `train`'s rules, and weights to start from.
pub fn check(config: &Config, upstream: &Upstream) -> Result<(), Invalid> {
    if config.0.init_from.is_empty() || config.0.init_from == "scratch" {
        let what = format!("{}; finetuning from scratch is `kind: train`", crate::gpt::source::FORMS);
        return Err(Invalid::required("init_from", what));
    }
    train::check(&config.0, upstream)
}

pub fn run(config: &Config, ctx: &Context) -> anyhow::Result<Report> {
    train::run(&config.0, ctx)
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
        assert_eq!(Config::default().0.learning_rate, 3e-5);
    }

    #[test]
    fn continues_a_train_stage_with_a_cropped_block() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data = char_data(dir.path());
        let pretrain = context(dir.path(), "pretrain");
        train::run(&train::Config { max_iters: 20, eval_interval: 10, ..tiny(data.clone()) }, &pretrain)?;
        let base = crate::gpt::checkpoint::load_state(&pretrain.out, "ckpt")?.unwrap();

        let config = Config(train::Config {
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
            ..Config::default().0
        });
        let ctx = context(dir.path(), "finetune");
        let report = run(&config, &ctx)?;
        let state = crate::gpt::checkpoint::load_state(&ctx.out, "last")?.unwrap();
        assert_eq!(state.model.block_size, 16);
        assert_eq!(state.model.n_embd, base.model.n_embd);
        // Starting from trained weights, the first loss is already near the pretrained one.
        let rows = crate::formats::metrics::read_parquet(&ctx.out.join("metrics.parquet"))?;
        assert!(rows[0].val_loss.unwrap() < base.val_loss + 0.5, "{:?} vs {}", rows[0], base.val_loss);
        assert!(report.metrics["best_val_loss"].as_f64().unwrap().is_finite());

        let missing = Config(train::Config { init_from: String::new(), ..config.0.clone() });
        let error = check(&missing, &Upstream::none()).unwrap_err();
        assert_eq!(error.key, "init_from");
        assert!(error.required, "{error:?}");
        let mismatch = Config(train::Config { n_layer: Some(3), ..config.0 });
        let error = run(&mismatch, &context(dir.path(), "mismatch")).unwrap_err();
        assert!(error.to_string().contains("`n_layer: 3` does not match the checkpoint's 1"), "{error}");
        Ok(())
    }
}
