//! What a train or finetune stage will cost, from its params alone, before anything runs (the
//! preflight): parameters (nanoGPT's `get_num_params`), tokens per step and in total, tokens per
//! parameter (Chinchilla's ~20 as the reference), FLOPs (nanoGPT's `estimate_mfu` numerator: 6N plus
//! 12·L·H·Q·T per token, forward and backward) and peak memory on the device. It owns the
//! arithmetic and its wording; which stages are planned, the machine's memory, the measured
//! time and the refusal are the engine's (`src/preflight.rs`). The calibration record's format
//! (`Calibration`: a step's measured time per machine and shape) is here, since the engine writes
//! it and both the engine and the train stage read it.
//!
//! Memory on the CPU (the explicit step, `step/`) is what the process really allocates, in f32:
//! the weights twice (the model's, and what initialising them freed: glibc keeps it resident
//! under `device::keep_freed_memory`'s trim threshold, between the live tensors; without it
//! GPT-2 at B1 T1024 measured 12.6% over the estimate, with it 0.5% under), the step's gradient sums (`Workspace::grads`), the gradients handed to the
//! optimizer (`take_gradients` copies the sums into tensors: a second copy), AdamW's two moments
//! (updated in place, `optim::step_cpu`), the step's activations exactly as
//! `workspace::activation_floats` counts what `Activations::new` allocates, and a fixed process
//! baseline (`CPU_BASELINE_BYTES`). On a GPU (candle's autograd) the formula is coarser: weights,
//! gradients and moments in f32 (16 bytes per parameter), and activations per layer of
//! Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
//! eq. 1: s·b·h·(34 + 5·a·s/h) bytes at 16 bits) plus the logits in f32 and their gradient; it has
//! no test here (no GPU), so it is shown with "≈".

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::gpt::GptConfig;
use crate::gpt::step::activation_floats;
use crate::train::{Config, Gpus};

/// The resident memory of a `nanoflow __stage` or `nanoflow bench` process beside its model,
/// optimizer and step buffers: the binary's touched pages, the C and Rust runtimes, rayon's and
/// gemm's threads with their stacks and packing buffers, the CPU peak measurement's matrices.
/// Measured as the peak RSS (VmHWM) of `nanoflow bench shakespeare-char-cpu --batch-size 1
/// --block-size 8 --burn-in 0 --iters 1` (40.0 and 39.3 MiB on a 2-core VM) less what this file
/// counts for that shape (0.80M parameters × 20 bytes = 15.2 MiB, activations 0.1 MiB): 24-25
/// MiB.
pub const CPU_BASELINE_BYTES: u64 = 25 << 20;

/// Chinchilla's compute-optimal tokens per parameter (Hoffmann et al. 2022), the reference.
pub const CHINCHILLA_TOKENS_PER_PARAM: f64 = 20.0;

/// Where a stage will train: the CPU's explicit step or a GPU through candle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Cpu,
    Gpu,
}

/// The memory one rank needs at its peak, by what holds it (bytes).
#[derive(Debug, Clone, PartialEq)]
pub struct Memory {
    pub target: Target,
    /// On the CPU with the copy initialisation leaves resident (see the top of this file).
    pub weights: u64,
    /// Gradients: on the CPU the step's sums and the copy the optimizer reads.
    pub gradients: u64,
    /// AdamW's first and second moments.
    pub moments: u64,
    pub activations: u64,
    /// The process before the model (CPU only).
    pub baseline: u64,
}

impl Memory {
    pub fn total(&self) -> u64 {
        self.weights + self.gradients + self.moments + self.activations + self.baseline
    }
}

/// A train or finetune stage's cost, as far as its params say it.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    /// The model's shape, where the params decide it (from scratch, or a GPT-2 preset).
    pub model: Option<GptConfig>,
    /// What had to be assumed or is unknown, e.g. "vocabulary ≈ 65 (the char tokenizer's)".
    pub notes: Vec<String>,
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub max_iters: usize,
    /// Ranks the step's micro-batches are split between (1 on the CPU).
    pub ranks: usize,
    pub target: Target,
}

impl Estimate {
    /// The estimate for `config`; `tokenizer` is the tokenizer of the data it trains on (`char`,
    /// `gpt2`), where the planner knows it, for a vocabulary the params leave to the data.
    pub fn new(config: &Config, tokenizer: Option<&str>) -> Estimate {
        let mut notes = Vec::new();
        let target = if config.device == "cpu" || !cfg!(feature = "cuda") { Target::Cpu } else { Target::Gpu };
        let model = match config.init_from.as_str() {
            "scratch" => {
                let vocab = config.vocab_size.or_else(|| {
                    let (vocab, name) = match tokenizer? {
                        "char" => (65, "the char tokenizer's on Shakespeare"),
                        "gpt2" => (50257, "GPT-2's"),
                        _ => return None,
                    };
                    notes.push(format!("vocabulary ≈ {vocab} ({name}; the data's decides)"));
                    Some(vocab)
                });
                match vocab {
                    Some(vocab) => Some(config.scratch_model(vocab)),
                    None => {
                        notes.push("the vocabulary is the data's: unknown until it is tokenized".into());
                        None
                    }
                }
            }
            preset if GptConfig::preset(preset).is_some() => GptConfig::preset(preset).map(|model| GptConfig {
                block_size: config.block_size.unwrap_or(model.block_size).min(model.block_size),
                dropout: config.dropout,
                ..model
            }),
            _ => {
                notes.push("the model is the checkpoint's shape: unknown until it exists".into());
                None
            }
        };
        let ranks = match (target, config.gpus) {
            (Target::Cpu, _) | (_, Gpus::Auto) => 1,
            (Target::Gpu, Gpus::Count(n)) => n.max(1),
        };
        if matches!((target, config.gpus), (Target::Gpu, Gpus::Auto)) {
            notes.push("`gpus: auto`: per GPU as if one; the world's size is the machine's".into());
        }
        Estimate {
            model,
            notes,
            batch_size: config.batch_size,
            gradient_accumulation_steps: config.gradient_accumulation_steps,
            max_iters: config.max_iters,
            ranks,
            target,
        }
    }

    pub fn tokens_per_step(&self) -> Option<u64> {
        let model = self.model.as_ref()?;
        Some((self.gradient_accumulation_steps * self.batch_size * model.block_size) as u64)
    }

    pub fn total_tokens(&self) -> Option<u64> {
        Some(self.tokens_per_step()? * self.max_iters as u64)
    }

    /// FLOPs of one optimizer step, forward and backward (nanoGPT's `estimate_mfu`).
    pub fn flops_per_step(&self) -> Option<f64> {
        Some(self.model.as_ref()?.flops_per_token() * self.tokens_per_step()? as f64)
    }

    /// Peak memory of one rank: the CPU's as `step/` allocates, a GPU's by the formula above.
    pub fn memory(&self) -> Option<Memory> {
        self.memory_at(self.batch_size)
    }

    /// `memory` with `batch_size` sequences per micro-batch.
    pub fn memory_at(&self, batch_size: usize) -> Option<Memory> {
        let model = self.model.as_ref()?;
        let p = model.num_params(false) as u64;
        let (b, t) = (batch_size as u64, model.block_size as u64);
        let (c, l, h, v) = (model.n_embd as u64, model.n_layer as u64, model.n_head as u64, model.vocab_size as u64);
        Some(match self.target {
            Target::Cpu => {
                let threads = std::thread::available_parallelism().map_or(1, usize::from);
                let floats = activation_floats(model, batch_size, model.block_size, threads);
                Memory {
                    target: self.target,
                    weights: 8 * p,
                    gradients: 8 * p,
                    moments: 8 * p,
                    activations: 4 * floats as u64,
                    baseline: CPU_BASELINE_BYTES,
                }
            }
            Target::Gpu => Memory {
                target: self.target,
                weights: 4 * p,
                gradients: 4 * p,
                moments: 8 * p,
                activations: l * t * b * c * (34 + 5 * h * t / c) + 3 * 4 * b * t * v,
                baseline: 0,
            },
        })
    }

    /// The largest batch (a divisor of the step's sequences, so that accumulation keeps the
    /// tokens per step) whose memory fits `available` bytes, and the accumulation it needs.
    pub fn fitting_batch(&self, available: u64) -> Option<(usize, usize)> {
        let sequences = self.batch_size * self.gradient_accumulation_steps;
        (1..self.batch_size)
            .rev()
            .filter(|b| sequences.is_multiple_of(*b) && (sequences / b).is_multiple_of(self.ranks))
            .find(|&b| self.memory_at(b).is_some_and(|memory| memory.total() <= available))
            .map(|b| (b, sequences / b))
    }

    /// The estimate of a run whose model is built: `model` on `target`, the rest from `config`.
    pub fn of_model(config: &Config, model: &GptConfig, target: Target, ranks: usize) -> Estimate {
        Estimate {
            model: Some(model.clone()),
            notes: Vec::new(),
            batch_size: config.batch_size,
            gradient_accumulation_steps: config.gradient_accumulation_steps,
            max_iters: config.max_iters,
            ranks,
            target,
        }
    }

    /// One line for a stage's start: `preflight: 0.80M params, 768 tokens per step (1.5M in
    /// total, 1.9 per param), 4.9 GFLOP per step, memory 75.6 MiB`.
    pub fn summary(&self) -> String {
        let Some(model) = &self.model else { return "preflight: the model's shape is unknown".into() };
        let total = self.total_tokens().unwrap_or(0);
        let memory = self.memory().map_or(String::new(), |memory| {
            let approx = if memory.target == Target::Gpu { "≈ " } else { "" };
            format!(", memory {approx}{} per rank", bytes_text(memory.total()))
        });
        format!(
            "preflight: {} params, {} tokens per step ({} in total, {} per param), {} per step{memory}",
            count(model.num_params(false) as f64),
            count(self.tokens_per_step().unwrap_or(0) as f64),
            count(total as f64),
            ratio(total as f64 / model.num_params(false) as f64),
            flops(self.flops_per_step().unwrap_or(0.0)),
        )
    }

    /// The preflight's lines, without the time (the engine adds it): params, tokens, FLOPs,
    /// memory, and the notes.
    pub fn lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(model) = &self.model {
            let (all, non_embedding) = (model.num_params(false), model.num_params(true));
            lines.push(format!(
                "params     {} ({} without position embeddings): {} layers, {} heads, {} wide, T={}, vocab {}",
                count(all as f64),
                count(non_embedding as f64),
                model.n_layer,
                model.n_head,
                model.n_embd,
                model.block_size,
                model.vocab_size
            ));
            let (per_step, total) = (self.tokens_per_step().unwrap_or(0), self.total_tokens().unwrap_or(0));
            lines.push(format!(
                "tokens     {} per step ({} x {} x {}), {} in {} steps: {} per param (Chinchilla ≈ {})",
                count(per_step as f64),
                self.batch_size,
                model.block_size,
                self.gradient_accumulation_steps,
                count(total as f64),
                self.max_iters,
                ratio(total as f64 / all as f64),
                CHINCHILLA_TOKENS_PER_PARAM
            ));
            let per_step = self.flops_per_step().unwrap_or(0.0);
            lines.push(format!(
                "FLOPs      {} per step, {} in total",
                flops(per_step),
                flops(per_step * self.max_iters as f64)
            ));
        }
        if let Some(memory) = self.memory() {
            let (approx, device, rank) = match memory.target {
                Target::Cpu => ("", "RAM", String::new()),
                Target::Gpu => ("≈ ", "GPU memory", if self.ranks > 1 { " per rank".into() } else { String::new() }),
            };
            let baseline = match memory.baseline {
                0 => String::new(),
                bytes => format!(" + process {}", bytes_text(bytes)),
            };
            lines.push(format!(
                "memory     {approx}{} {device}{rank} at batch {}: weights {} + gradients {} + AdamW {} + activations {}{baseline}",
                bytes_text(memory.total()),
                self.batch_size,
                bytes_text(memory.weights),
                bytes_text(memory.gradients),
                bytes_text(memory.moments),
                bytes_text(memory.activations),
            ));
        }
        lines.extend(self.notes.iter().map(|note| format!("note       {note}")));
        lines
    }
}

/// What a measured speed is the speed of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationKey {
    pub nanoflow_version: String,
    pub host: String,
    pub device: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub batch_size: usize,
    pub vocab_size: usize,
    pub dtype: String,
}

impl CalibrationKey {
    /// The key of `estimate`'s shape on `host` with `device` and `dtype` as the params write
    /// them; none where the shape is unknown.
    pub fn new(estimate: &Estimate, host: &str, device: &str, dtype: &str) -> Option<CalibrationKey> {
        let model = estimate.model.as_ref()?;
        Some(CalibrationKey {
            nanoflow_version: env!("CARGO_PKG_VERSION").to_string(),
            host: host.to_string(),
            device: device.to_string(),
            n_layer: model.n_layer,
            n_head: model.n_head,
            n_embd: model.n_embd,
            block_size: model.block_size,
            batch_size: estimate.batch_size,
            vocab_size: model.vocab_size,
            dtype: dtype.to_string(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(flatten)]
    pub key: CalibrationKey,
    /// The median ms of one rank's micro-batch (a step's ms / micro-batches per rank).
    pub ms_per_micro_batch: f64,
}

/// The calibration record (`artifacts/.nanoflow/calibration.json`): the engine writes it after
/// a train stage, the preflight and the train stage read it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Calibration {
    pub format: String,
    pub entries: Vec<Entry>,
}

pub const CALIBRATION_FORMAT: &str = "nanoflow-calibration-1";

impl Calibration {
    /// The record at `path`; empty where it is missing, damaged or of another format, and without
    /// other versions' entries.
    pub fn read(path: &Path) -> Calibration {
        let parsed = fs_err::read(path).ok().and_then(|bytes| serde_json::from_slice::<Calibration>(&bytes).ok());
        let mut calibration = parsed.filter(|calibration| calibration.format == CALIBRATION_FORMAT).unwrap_or_default();
        calibration.format = CALIBRATION_FORMAT.to_string();
        calibration.entries.retain(|entry| {
            entry.key.nanoflow_version == env!("CARGO_PKG_VERSION") && entry.ms_per_micro_batch.is_finite()
        });
        calibration
    }

    pub fn find(&self, key: &CalibrationKey) -> Option<f64> {
        self.entries.iter().find(|entry| &entry.key == key).map(|entry| entry.ms_per_micro_batch)
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            fs_err::create_dir_all(parent)?;
        }
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        // A name of its own per writer (`.calibration-PID-N`), as the engine's atomic writes.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let temporary = path.with_file_name(format!(".calibration-{}-{n}", std::process::id()));
        fs_err::write(&temporary, text)?;
        fs_err::rename(&temporary, path)
    }
}

/// The calibration record of the store under pipeline root `root`.
pub fn calibration_file(root: &Path) -> std::path::PathBuf {
    root.join("artifacts").join(".nanoflow").join("calibration.json")
}

/// A ratio to two significant digits under 10 (`0.038`, `1.9`), whole above (`2371`).
fn ratio(x: f64) -> String {
    match x {
        x if x >= 10.0 => format!("{x:.0}"),
        x if x >= 1.0 => format!("{x:.1}"),
        x if x >= 0.1 => format!("{x:.2}"),
        x => format!("{x:.3}"),
    }
}

/// A count in words people read: `124.4M`, `491.5K`, `9.8B`, `1.2T`.
pub fn count(n: f64) -> String {
    match n {
        n if n >= 1e12 => format!("{:.1}T", n / 1e12),
        n if n >= 1e9 => format!("{:.1}B", n / 1e9),
        n if n >= 1e6 => format!("{:.1}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}K", n / 1e3),
        n => format!("{n:.0}"),
    }
}

/// FLOPs in SI units: `4.2e14` as `420.0 TFLOP`.
pub fn flops(n: f64) -> String {
    let units = [(1e21, "ZFLOP"), (1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")];
    units
        .iter()
        .find(|(scale, _)| n >= *scale)
        .map_or(format!("{n:.0} FLOP"), |(scale, unit)| format!("{:.1} {unit}", n / scale))
}

/// Bytes in binary units: `1.4 GiB`, `52.3 MiB`.
pub fn bytes_text(n: u64) -> String {
    let n = n as f64;
    match n {
        n if n >= (1u64 << 40) as f64 => format!("{:.1} TiB", n / (1u64 << 40) as f64),
        n if n >= (1u64 << 30) as f64 => format!("{:.1} GiB", n / (1u64 << 30) as f64),
        n if n >= (1u64 << 20) as f64 => format!("{:.1} MiB", n / (1u64 << 20) as f64),
        n => format!("{:.1} KiB", n / 1024.0),
    }
}

/// A duration as `≈ 26 s`, `≈ 14 min`, `≈ 2 h 10 min`, `≈ 3 d 4 h`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        s if s < 90 => format!("≈ {s} s"),
        s if s < 3600 => format!("≈ {} min", (s + 30) / 60),
        s if s < 86400 => {
            let minutes = (s + 30) / 60;
            format!("≈ {} h {} min", minutes / 60, minutes % 60)
        }
        s => {
            let hours = (s + 1800) / 3600;
            format!("≈ {} d {} h", hours / 24, hours % 24)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn laptop() -> Config {
        Config {
            n_layer: Some(4),
            n_head: Some(4),
            n_embd: Some(128),
            block_size: Some(64),
            batch_size: 12,
            gradient_accumulation_steps: 1,
            max_iters: 2000,
            device: "cpu".into(),
            ..Config::default()
        }
    }

    #[test]
    fn gpt2_counts_as_nanogpt_does() {
        let config =
            Config { vocab_size: Some(50257), pad_vocab_to_multiple_of: 64, bias: Some(true), ..Config::default() };
        let estimate = Estimate::new(&config, None);
        let model = estimate.model.clone().unwrap();
        assert_eq!(model.vocab_size, 50304);
        // nanoGPT's train.py: 12 × 40 × 1024 = 491,520 tokens per iteration.
        assert_eq!(estimate.tokens_per_step(), Some(491_520));
        assert_eq!(estimate.total_tokens(), Some(491_520 * 600_000));
        assert_eq!(estimate.flops_per_step(), Some(model.flops_per_token() * 491_520.0));
        assert!(estimate.notes.is_empty(), "{:?}", estimate.notes);
    }

    #[test]
    fn the_vocabulary_comes_from_the_tokenizer_where_unset() {
        let estimate = Estimate::new(&laptop(), Some("char"));
        assert_eq!(estimate.model.as_ref().unwrap().vocab_size, 65);
        assert_eq!(estimate.notes, ["vocabulary ≈ 65 (the char tokenizer's on Shakespeare; the data's decides)"]);
        assert_eq!(Estimate::new(&laptop(), None).model, None);
        let checkpoint = Config { init_from: "${model}".into(), ..laptop() };
        let estimate = Estimate::new(&checkpoint, Some("char"));
        assert_eq!((estimate.model.clone(), estimate.memory()), (None, None));
        let hub = Config { init_from: "gpt2-xl".into(), block_size: None, ..laptop() };
        assert_eq!(Estimate::new(&hub, None).model.unwrap().n_layer, 48);
    }

    #[test]
    fn memory_counts_the_steps_buffers() {
        let estimate = Estimate::new(&laptop(), Some("char"));
        let memory = estimate.memory().unwrap();
        let p = estimate.model.as_ref().unwrap().num_params(false) as u64;
        assert_eq!((memory.weights, memory.gradients, memory.moments), (8 * p, 8 * p, 8 * p));
        assert!(memory.activations > 4 * 12 * 64 * 128 * 20 * 4, "{memory:?}");
        // Half the batch with twice the accumulation keeps the tokens and needs less.
        let (b, steps) = estimate.fitting_batch(memory.total() - 1).unwrap();
        assert_eq!((b, steps), (6, 2));
        assert_eq!(estimate.fitting_batch(0), None);
    }

    #[test]
    fn words_for_numbers() {
        assert_eq!(count(124_439_808.0), "124.4M");
        assert_eq!(flops(4.2e14), "420.0 TFLOP");
        assert_eq!(bytes_text(3 << 29), "1.5 GiB");
        assert_eq!(duration(26.4), "≈ 26 s");
        assert_eq!(duration(7800.0), "≈ 2 h 10 min");
        assert_eq!(duration(600.0), "≈ 10 min");
    }

    fn key() -> CalibrationKey {
        CalibrationKey {
            nanoflow_version: env!("CARGO_PKG_VERSION").into(),
            host: "h".into(),
            device: "cpu".into(),
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            block_size: 64,
            batch_size: 12,
            vocab_size: 65,
            dtype: "auto".into(),
        }
    }

    #[test]
    fn damaged_or_other_version_records_are_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calibration.json");
        fs_err::write(&path, "{not json").unwrap();
        assert!(Calibration::read(&path).entries.is_empty());
        let old =
            Entry { key: CalibrationKey { nanoflow_version: "0.0.0-old".into(), ..key() }, ms_per_micro_batch: 5.0 };
        let now = Entry { key: key(), ms_per_micro_batch: 7.0 };
        let record = Calibration { format: CALIBRATION_FORMAT.into(), entries: vec![old, now] };
        record.write(&path).unwrap();
        let read = Calibration::read(&path);
        assert_eq!(read.entries.len(), 1);
        assert_eq!(read.find(&key()), Some(7.0));
        fs_err::write(&path, serde_json::json!({"format": "other", "entries": []}).to_string()).unwrap();
        assert_eq!(Calibration::read(&path).find(&key()), None);
    }
}
