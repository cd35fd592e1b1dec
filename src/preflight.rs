//! The plan knows the cost: for each planned train or finetune stage, what it will take —
//! parameters, tokens, FLOPs and memory from its params (`gpt/estimate.rs` does the arithmetic),
//! and time from this machine's measured speed for that shape (the calibration record) — shown
//! by `run -n` and `status -v`, and a stage that cannot fit in this machine's memory refused
//! before anything runs. It owns writing the record (`artifacts/.nanoflow/calibration.json`,
//! whose format is `estimate.rs`'s, since the train stage reads it too), the machine's memory and
//! the refusal; not the arithmetic, and not how a stage trains.
//!
//! The record: one entry per (nanoflow version, host, device, shape: layers, heads, width,
//! block, batch, vocabulary, dtype), the median ms of one rank's micro-batch as the stage's
//! manifest reports it (`ms_per_iter` / micro-batches per rank). A record that does not parse,
//! or entries another nanoflow version wrote, are ignored, and rewritten at the next train
//! stage's end; nothing else of the preflight writes.

use std::path::PathBuf;

use nanoflow_stages::gpt::estimate::{self, Calibration, CalibrationKey, Entry, Estimate, Target};
use nanoflow_stages::train;

use crate::error::Error;
use crate::manifest::Manifest;
use crate::plan::Plan;
use crate::stage_kind::StageKind;
use crate::store::Store;

/// The estimate of `plan`'s stage `index`, if it trains.
pub fn estimate(plan: &Plan, index: usize) -> Option<Estimate> {
    let stage = &plan.stages[index];
    if !matches!(stage.kind, StageKind::Train | StageKind::Finetune) {
        return None;
    }
    let config: train::Config = serde_json::from_value(stage.params.clone()).ok()?;
    // The data's tokenizer, where `data` is a tokenize stage's output: it says the vocabulary
    // the params leave to the data.
    let tokenizer = crate::reference::leading(&config.data)
        .and_then(|name| plan.stages.iter().find(|stage| stage.name == name))
        .filter(|upstream| upstream.kind == StageKind::Tokenize)
        .and_then(|upstream| upstream.params.get("tokenizer")?.as_str().map(str::to_string));
    Some(Estimate::new(&config, tokenizer.as_deref()))
}

/// The preflight block of stage `index` (indented lines), or none for a stage that does not
/// train.
pub fn lines(plan: &Plan, store: &Store, index: usize) -> Vec<String> {
    let Some(estimate) = estimate(plan, index) else { return Vec::new() };
    let mut lines = estimate.lines();
    lines.push(format!("time       {}", time_text(&estimate, &plan.stages[index].params, store)));
    lines.into_iter().map(|line| format!("    {line}")).collect()
}

/// `≈ 2 h 10 min (41.2 ms per micro-batch measured on this machine)`, or what to do to know.
pub fn time_text(estimate: &Estimate, params: &serde_json::Value, store: &Store) -> String {
    match (calibration_key(estimate, params), estimate.model.as_ref()) {
        (Some(key), Some(_)) => match Calibration::read(&calibration_file(store)).find(&key) {
            Some(ms) => {
                let micro_batches = micro_batches_per_rank(estimate);
                let seconds = ms * micro_batches as f64 * estimate.max_iters as f64 / 1e3;
                let on = match (estimate.target, estimate.ranks) {
                    (Target::Gpu, ranks) if ranks > 1 => format!(" on {ranks} GPUs"),
                    _ => String::new(),
                };
                format!(
                    "{}{on} for {} steps ({:.1} ms per step measured on this machine; evaluations not included)",
                    estimate::duration(seconds),
                    estimate.max_iters,
                    ms * micro_batches as f64
                )
            }
            None => "unknown until calibrated (a run of this stage on this machine measures it)".to_string(),
        },
        _ => "unknown until the model's shape is".to_string(),
    }
}

fn micro_batches_per_rank(estimate: &Estimate) -> usize {
    (estimate.gradient_accumulation_steps / estimate.ranks.max(1)).max(1)
}

/// Refuses, before anything runs, a selected train or finetune stage on the CPU whose memory
/// estimate is over this machine's available memory, unless `force` names it.
pub fn refuse_what_does_not_fit(plan: &Plan, selected: &[usize], force: &[String]) -> Result<(), Error> {
    let Some((available, source_of)) = memory_available() else { return Ok(()) };
    for &index in selected {
        let name = &plan.stages[index].name;
        let Some(estimate) = estimate(plan, index) else { continue };
        let Some(memory) = estimate.memory() else { continue };
        if estimate.target != Target::Cpu || memory.total() <= available || force.contains(name) {
            continue;
        }
        let suggestion = estimate
            .fitting_batch(available)
            .map(|(batch, steps)| format!("`batch_size: {batch}` and `gradient_accumulation_steps: {steps}`"));
        return Err(Error::DoesNotFit {
            stage: name.clone(),
            needs: estimate::bytes_text(memory.total()),
            available: estimate::bytes_text(available),
            source_of,
            suggestion,
        });
    }
    Ok(())
}

/// The machine's memory (`MemTotal`), bytes, and where the figure comes from; `NANOFLOW_MEMORY`
/// (bytes) stands in for it, for tests and for a machine to be shared. A plan over `MemTotal`
/// can never fit, whatever else runs; `MemAvailable` moves with every other process (a test
/// suite's own), so a plan refused by it one minute would run the next. None where neither says.
fn memory_available() -> Option<(u64, &'static str)> {
    if let Some(bytes) = std::env::var("NANOFLOW_MEMORY").ok().and_then(|text| text.parse().ok()) {
        return Some((bytes, "`NANOFLOW_MEMORY`"));
    }
    let meminfo = fs_err::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((kib * 1024, "`MemTotal` in /proc/meminfo"))
}

pub fn calibration_file(store: &Store) -> PathBuf {
    store.root.join(".nanoflow").join("calibration.json")
}

/// After a run: each finished train or finetune stage's measured speed into the record.
pub fn calibrate(plan: &Plan, store: &Store, finished: &[String]) {
    let path = calibration_file(store);
    let mut calibration = Calibration::read(&path);
    let mut changed = false;
    for (index, stage) in plan.stages.iter().enumerate() {
        if !finished.contains(&stage.name) {
            continue;
        }
        let Some(estimate) = estimate(plan, index) else { continue };
        let Some(key) = calibration_key(&estimate, &stage.params) else { continue };
        let Some(manifest) = store.current(&stage.name).and_then(|dir| Manifest::read(&dir).ok().flatten()) else {
            continue;
        };
        // Measured elsewhere (a restored or pulled output), or by another version: not this
        // machine's speed.
        if manifest.host != key.host || manifest.nanoflow_version != key.nanoflow_version {
            continue;
        }
        // A stage that ran no step, measured nothing of this shape worth keeping.
        let Some(ms) = manifest.metrics.get("ms_per_iter").and_then(serde_json::Value::as_f64) else { continue };
        if !(ms.is_finite() && ms > 0.0) {
            continue;
        }
        calibration.entries.retain(|entry| entry.key != key);
        calibration.entries.push(Entry { key, ms_per_micro_batch: ms / micro_batches_per_rank(&estimate) as f64 });
        changed = true;
    }
    if changed {
        // A record that cannot be written is a time unknown next time, never a failed run.
        let _ = calibration.write(&path);
    }
}

/// The record's key of `estimate`'s shape on this machine with `params`' device and dtype.
fn calibration_key(estimate: &Estimate, params: &serde_json::Value) -> Option<CalibrationKey> {
    let text = |key: &str| params.get(key).and_then(serde_json::Value::as_str).unwrap_or("auto").to_string();
    CalibrationKey::new(estimate, &crate::host::hostname(), &text("device"), &text("dtype"))
}
