//! The run's record and its log lines: a row per iteration (metrics.parquet and loss.png, read
//! by `metrics` and the report), each step's time (the run's speed is the median step's), the
//! running MFU, the progress bar and nanoGPT's `iter N: loss X, time Yms, mfu Z%` lines; and the
//! report a finished run publishes.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};

use super::resume::Run;
use super::{Setup, diverged};
use crate::formats::metrics::{self, Row};
use crate::gpt::GptConfig;
use crate::gpt::checkpoint;
use crate::gpt::estimate::Target;
use crate::gpt::trainer::Trainer;
use crate::progress::{self, Progress, Unit, format_count};
use crate::{Context, Report};

/// The run's record (a row per iteration: metrics.parquet and loss.png), each step's time and
/// the running MFU, the progress bar and nanoGPT's log lines.
pub(super) struct Record {
    rows: Vec<Row>,
    tokens_per_iter: usize,
    /// Steps whose losses are still on the device: (iter, lr); `window` times them.
    pending: Vec<(usize, f64)>,
    window: Instant,
    /// Steps this process took.
    pub(super) steps_here: usize,
    running_mfu: Option<f64>,
    /// Each step's time: the run's speed is the median step's (one figure everywhere: the
    /// summary, the manifest, `metrics`, the report), as nanoGPT's log lines read.
    step_times: Vec<f64>,
    progress: Progress,
}

impl Record {
    /// The record so far (`rows`, up to `iter`).
    pub(super) fn new(setup: &Setup, rows: Vec<Row>, iter: usize) -> Record {
        let mut progress = Progress::new("train", Unit::Iters, Some(setup.config.max_iters as u64));
        if setup.main {
            progress.set_done(iter as u64);
        }
        Record {
            rows,
            tokens_per_iter: setup.tokens_per_iter,
            pending: Vec::new(),
            window: Instant::now(),
            steps_here: 0,
            running_mfu: None,
            step_times: Vec::new(),
            progress,
        }
    }

    /// The record's row for `iter`, added when missing.
    pub(super) fn row(&mut self, iter: usize) -> &mut Row {
        let rows = &mut self.rows;
        if rows.last().is_none_or(|row| row.iter != iter as i64) {
            rows.push(Row { iter: iter as i64, tokens: (iter * self.tokens_per_iter) as i64, ..Row::default() });
        }
        rows.last_mut().expect("just pushed")
    }

    pub(super) fn write(&self, out: &Path) -> anyhow::Result<()> {
        metrics::write_parquet(&out.join("metrics.parquet"), &self.rows)
    }

    pub(super) fn plot(&self, ctx: &Context) -> anyhow::Result<()> {
        metrics::plot_png(&ctx.out.join("loss.png"), &format!("{}: loss", ctx.stage), &self.rows)
    }

    /// A step starts: the window that times the unread steps starts with the first of them.
    pub(super) fn start_step(&mut self) {
        if self.pending.is_empty() {
            self.window = Instant::now();
        }
    }

    /// timing and logging of the step at `iter`: the losses stay on the device until a log line,
    /// an evaluation or the end needs them (on a GPU, reading one waits for the whole step), and
    /// are then read in one go; the CPU reads each step's at once.
    pub(super) fn log_step(
        &mut self,
        setup: &Setup,
        trainer: &mut Trainer,
        iter: usize,
        lr: f64,
        last_good: Option<usize>,
    ) -> anyhow::Result<()> {
        let config = setup.config;
        self.pending.push((iter, lr));
        let next = iter + 1;
        let flush = (trainer.is_cpu() && !setup.hooks.defer_loss_reads)
            || (setup.ranks == 1 && crate::interrupt::requested())
            || iter.is_multiple_of(config.log_interval)
            || next.is_multiple_of(config.eval_interval)
            || next == config.max_iters
            || setup.hooks.stop_after == Some(self.steps_here + 1);
        if !flush {
            return Ok(());
        }
        let losses = trainer.read_losses()?;
        let dt = self.window.elapsed().as_secs_f64() / self.pending.len() as f64;
        self.window = Instant::now();
        for ((at, lr), lossf) in std::mem::take(&mut self.pending).into_iter().zip(losses) {
            if !lossf.is_finite() && trainer.loss_scale().is_none() {
                bail!(diverged(&format!("the training loss is {lossf}"), at, last_good));
            }
            self.step_times.push(dt);
            self.steps_here += 1;
            if let Some(peak_flops) = setup.peak_flops.filter(|_| self.steps_here >= 5) {
                // let the training loop settle a bit
                let mfu = estimate_mfu(&setup.model, config.batch_size * setup.local_steps, dt, peak_flops);
                self.running_mfu = Some(self.running_mfu.map_or(mfu, |running| 0.9 * running + 0.1 * mfu));
            }
            if at % config.log_interval == 0 && setup.main {
                // nanoGPT's line; MFU only once measured, and only on a device with a known peak.
                let mfu = self.running_mfu.map(|mfu| format!(", mfu {:.2}%", mfu * 100.0)).unwrap_or_default();
                progress::detail(&format!("iter {at}: loss {lossf:.4}, time {:.2}ms{mfu}", dt * 1000.0));
            }
            if setup.main {
                let rate = format_count(setup.tokens_per_iter as f64 / dt);
                self.progress.set_message(format!("loss {lossf:.4}, {rate} tokens/s"));
                self.progress.set_done(at as u64 + 1);
            }
            let record = self.row(at);
            record.lr = Some(lr);
            record.loss = Some(lossf);
        }
        Ok(())
    }

    pub(super) fn finish(&mut self, setup: &Setup) {
        if setup.main {
            self.progress.finish();
        }
    }
}

/// The end of a run that writes the outputs: published only with the best checkpoint whole and
/// the one the run recorded; the record, its plot, and the report (the speed: the median step's).
pub(super) fn publish(setup: &Setup, run: &Run, mut record: Record) -> anyhow::Result<Report> {
    let (config, ctx) = (setup.config, setup.ctx);
    let best = checkpoint::load_state(&ctx.out, "ckpt")?
        .with_context(|| format!("the best checkpoint in `{}` does not verify", ctx.out.display()))?;
    if let Some(at) = run.best_iter {
        ensure!(best.iter == at, "the best checkpoint holds iter {}, the run recorded iter {at}", best.iter);
    }
    record.write(&ctx.out)?;
    record.plot(ctx)?;
    let last = record.rows.iter().rev().find_map(|row| Some((row.train_loss?, row.val_loss?)));
    let (train_loss, val_loss) = last.unwrap_or((f64::NAN, f64::NAN));
    let median_step = median(&mut record.step_times);
    let tokens_per_iter = setup.tokens_per_iter;
    let tokens_per_second = if median_step > 0.0 { tokens_per_iter as f64 / median_step } else { 0.0 };
    let best_val_loss = run.best_val_loss;
    let mut report = Report {
        summary: format!(
            "{} iters, val loss {val_loss:.4} (best {best_val_loss:.4}), {:.0} tokens/s (median step)",
            config.max_iters, tokens_per_second
        ),
        ..Report::default()
    };
    let metrics = &mut report.metrics;
    metrics.insert("iters".into(), config.max_iters.into());
    metrics.insert("train_loss".into(), json_number(train_loss));
    metrics.insert("val_loss".into(), json_number(val_loss));
    metrics.insert("best_val_loss".into(), json_number(best_val_loss));
    metrics.insert("tokens_per_second".into(), json_number(tokens_per_second));
    metrics.insert("ms_per_iter".into(), json_number(1000.0 * median_step));
    metrics.insert("parameters".into(), setup.model.num_params(true).into());
    if let Some(iter) = run.resumed_from {
        metrics.insert("resumed_from_iter".into(), iter.into());
    }
    // The preflight's estimate beside what was measured (the report shows both): one rank's
    // peak memory, and on the CPU the process's peak resident set (VmHWM).
    if let Some(memory) = setup.estimate.memory() {
        metrics.insert("estimated_peak_bytes".into(), memory.total().into());
    }
    metrics.insert("estimated_flops_per_step".into(), json_number(setup.estimate.flops_per_step().unwrap_or(f64::NAN)));
    if let Some(ms) = setup.estimated_ms_per_iter {
        metrics.insert("estimated_ms_per_iter".into(), json_number(ms));
    }
    if setup.estimate.target == Target::Cpu
        && let Some(bytes) = crate::gpt::device::cpu_peak_memory()
    {
        metrics.insert("measured_peak_bytes".into(), bytes.into());
    }
    Ok(report)
}

/// The median of `values` (0 when there are none).
fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 { values[middle] } else { (values[middle - 1] + values[middle]) / 2.0 }
}

/// nanoGPT's estimate_mfu: achieved FLOPs per second as a fraction of a peak (nanoGPT's is an
/// A100's bfloat16 312 TFLOPS; nanoflow uses the GPU's own where it knows it), from the PaLM
/// paper's 6N + 12LHQT FLOPs per token. `fwdbwd_per_iter`: sequences per step on this device.
pub fn estimate_mfu(model: &GptConfig, fwdbwd_per_iter: usize, dt: f64, peak_flops: f64) -> f64 {
    let flops_per_iter = model.flops_per_token() * model.block_size as f64 * fwdbwd_per_iter as f64;
    flops_per_iter / dt / peak_flops
}

fn json_number(x: f64) -> serde_json::Value {
    serde_json::Number::from_f64(x).map_or(serde_json::Value::Null, serde_json::Value::Number)
}
