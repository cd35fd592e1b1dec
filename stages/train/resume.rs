//! Resume and repair: where a run stands (`Run`: what a checkpoint records beside the weights
//! and the optimizer), taken up from the latest complete checkpoint an interrupted run of the
//! same key left in the output directory, with a best checkpoint that an interruption left
//! behind written again.

use std::path::Path;

use anyhow::ensure;

use super::{Config, NON_SEMANTIC, Setup};
use crate::formats::metrics::{self, Row};
use crate::gpt::Rng;
use crate::gpt::checkpoint::{self, State};
use crate::gpt::trainer::Trainer;

/// The latest complete checkpoint in the output directory, if any: its name and what it holds.
pub(super) type Latest = Option<(&'static str, State)>;

/// Where the run stands: what a checkpoint records beside the weights and the optimizer.
pub(super) struct Run {
    pub(super) iter: usize,
    pub(super) best_val_loss: f64,
    /// The iteration the best checkpoint holds, as the run recorded it.
    pub(super) best_iter: Option<usize>,
    /// The val loss of the last evaluation, for a checkpoint written between two.
    pub(super) val_loss: f64,
    /// Draws the training batches' offsets.
    pub(super) rng: Rng,
    /// The iteration this process resumed at.
    pub(super) resumed_from: Option<usize>,
    /// The iteration of the last checkpoint written, for a divergence's message.
    pub(super) last_good: Option<usize>,
}

impl Run {
    /// resume: an interrupted run of the same key left its checkpoints in the output directory.
    /// From the `latest` of them (its weights and AdamW's state loaded into `trainer`, the best
    /// checkpoint repaired), with the record up to there; otherwise from iteration 0.
    pub(super) fn resume(setup: &Setup, trainer: &mut Trainer, latest: Latest) -> anyhow::Result<(Run, Vec<Row>)> {
        let (config, out) = (setup.config, &setup.ctx.out);
        let mut run = Run {
            iter: 0,
            best_val_loss: f64::INFINITY,
            best_iter: None,
            val_loss: f64::NAN,
            rng: Rng::new(config.seed),
            resumed_from: None,
            last_good: None,
        };
        let mut rows: Vec<Row> = Vec::new();
        if setup.writes {
            checkpoint::remove_temporaries(out)?;
        }
        let Some((name, state)) = latest else { return Ok((run, rows)) };
        check_same_run(config, &state, out)?;
        trainer.resume(out, name, state.loss_scale)?;
        if setup.writes {
            repair_best(trainer, out, &state)?;
            // Resumed from `ckpt`: `last` is missing or damaged (it is never older). Written again
            // now, or a run resumed at `max_iters` would publish the damaged one.
            if name == "ckpt" {
                trainer.save(out, "last", state.clone())?;
            }
        }
        let iter = state.iter;
        let metrics_path = out.join("metrics.parquet");
        if metrics_path.exists() {
            rows = metrics::read_parquet(&metrics_path)?;
            rows.retain(|row| row.iter <= iter as i64);
        }
        log!(setup.main, "resuming from `{}` at iter {iter}", checkpoint::state_path(out, name).display());
        run.iter = iter;
        run.val_loss = state.val_loss;
        run.best_val_loss = state.best_val_loss;
        run.best_iter = state.ckpt_iter;
        run.rng = Rng::from_state(state.rng);
        run.resumed_from = Some(iter);
        run.last_good = Some(iter);
        Ok((run, rows))
    }

    /// What a checkpoint at this iteration records beside the weights and the optimizer.
    pub(super) fn state(&self, setup: &Setup, trainer: &Trainer) -> anyhow::Result<State> {
        Ok(State {
            format: checkpoint::FORMAT.into(),
            version: checkpoint::FORMAT_VERSION,
            iter: self.iter,
            best_val_loss: self.best_val_loss,
            val_loss: self.val_loss,
            model: setup.model.clone(),
            config: setup.ctx.portable(serde_json::to_value(setup.config)?),
            rng: self.rng.state(),
            files: Default::default(),
            loss_scale: trainer.loss_scale(),
            ckpt_iter: self.best_iter,
        })
    }
}

/// The most advanced complete checkpoint in `dir`, if any.
pub(super) fn latest_checkpoint(dir: &Path) -> anyhow::Result<Latest> {
    let mut latest: Latest = None;
    for name in ["last", "ckpt"] {
        if let Some(state) = checkpoint::load_state(dir, name)?
            && latest.as_ref().is_none_or(|(_, best)| state.iter > best.iter)
        {
            latest = Some((name, state));
        }
    }
    Ok(latest)
}

/// Makes `ckpt` what `state` (just loaded into `trainer`) says it is. An interruption after `last`
/// was written and before `ckpt` was leaves `ckpt` older than it should be, or half replaced
/// (new weights under an old JSON, which reads as incomplete); when `state` is the one `ckpt`
/// should hold, it is written again from the weights just loaded.
fn repair_best(trainer: &Trainer, out: &Path, state: &State) -> anyhow::Result<()> {
    let Some(at) = state.ckpt_iter else { return Ok(()) };
    let best = checkpoint::load_state(out, "ckpt")?;
    if best.as_ref().is_some_and(|best| best.iter == at) {
        return Ok(());
    }
    ensure!(
        at == state.iter,
        "the best checkpoint in `{}` (iter {at}) is missing or damaged\nhint: run the stage again with `--force` to start it over",
        out.display()
    );
    eprintln!("writing the best checkpoint (iter {at}) that an interrupted run did not finish");
    trainer.save(out, "ckpt", state.clone())
}

/// A checkpoint in the output directory must come from the same run: the engine keeps it only
/// for the same key, so anything else is a stray file.
fn check_same_run(config: &Config, state: &State, out: &Path) -> anyhow::Result<()> {
    let semantic = |value: &serde_json::Value| {
        let mut value = value.clone();
        if let Some(map) = value.as_object_mut() {
            for key in NON_SEMANTIC.iter().chain(&["data", "init_from"]) {
                map.remove(*key);
            }
        }
        value
    };
    ensure!(
        semantic(&state.config) == semantic(&serde_json::to_value(config)?),
        "`{}` holds a checkpoint of another config\nhint: remove it to start over",
        out.display()
    );
    Ok(())
}
