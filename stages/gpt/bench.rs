//! `nanoflow bench`: nanoGPT's bench.py. A model of a given shape trains on random tokens —
//! forward, backward, gradient clipping and AdamW, one micro-batch per iteration, as `train`
//! runs them — for a few burn-in iterations, then for timed ones; the report is ms/iter,
//! tokens/s, MFU (nanoGPT's FLOPs per token against the device's peak, `peak`) and peak memory.
//! Which shape a name means on a device is decided here; how it is shown is the command's.

use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use candle_core::Tensor;
use candle_nn::VarMap;

use crate::gpt::optim::{self, AdamW, AdamWParams};
use crate::gpt::{Gpt, GptConfig, Rng};

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct Options {
    pub model: GptConfig,
    pub batch_size: usize,
    pub device: String,
    pub dtype: String,
    /// Untimed iterations first (bench.py: 10).
    pub burn_in: usize,
    /// Timed iterations (bench.py: 20).
    pub iters: usize,
    pub seed: u64,
}

/// The laptop recipe's model (configs/train_shakespeare_char_cpu.yaml, nanoGPT's README "I
/// only have a MacBook"): 4 layers, 4 heads, 128 wide, T=64, batch 12 — what a CPU trains.
const SHAKESPEARE_CHAR_CPU: (GptConfig, usize) =
    (GptConfig { block_size: 64, vocab_size: 65, n_layer: 4, n_head: 4, n_embd: 128, dropout: 0.0, bias: false }, 12);

/// nanoGPT's train_shakespeare_char.py, the GPU recipe: 6 layers, 6 heads, 384 wide, T=256,
/// batch 64 (10.65M parameters; a step of it takes seconds on a laptop's CPU).
const SHAKESPEARE_CHAR_GPU: (GptConfig, usize) =
    (GptConfig { block_size: 256, vocab_size: 65, n_layer: 6, n_head: 6, n_embd: 384, dropout: 0.0, bias: false }, 64);

impl Options {
    /// The shapes users compare against, whatever the device: `gpt2` (train_gpt2's 124M,
    /// T=1024, batch 12, vocab padded to 50304, as bench.py) and its larger siblings,
    /// `shakespeare-char-gpu` (nanoGPT's GPU recipe) and `shakespeare-char-cpu` (the laptop
    /// recipe). `shakespeare-char` is the GPU recipe here; `Shape::pick` makes it the laptop
    /// recipe on a CPU.
    pub fn preset(name: &str) -> anyhow::Result<Options> {
        let (model, batch_size) = match name {
            "shakespeare-char" | "shakespeare-char-gpu" => SHAKESPEARE_CHAR_GPU,
            "shakespeare-char-cpu" => SHAKESPEARE_CHAR_CPU,
            other => {
                let preset = GptConfig::preset(other).with_context(|| {
                    format!(
                        "unknown shape `{other}`: use gpt2, gpt2-medium, gpt2-large, gpt2-xl, shakespeare-char, \
                         shakespeare-char-cpu or shakespeare-char-gpu"
                    )
                })?;
                (GptConfig { bias: false, ..preset.with_padded_vocab(64) }, 12)
            }
        };
        Ok(Options {
            model,
            batch_size,
            device: "auto".into(),
            dtype: "auto".into(),
            burn_in: 10,
            iters: 20,
            seed: 1337,
        })
    }
}

/// A shape a name picked for a device.
#[derive(Debug, Clone)]
pub struct Shape {
    /// The preset it is, e.g. `shakespeare-char-cpu`.
    pub name: String,
    pub options: Options,
    /// Why this shape, where the name given does not say it alone (`auto`, or
    /// `shakespeare-char` on a CPU).
    pub why: Option<&'static str>,
}

impl Shape {
    /// The shape `name` means on `device`: `auto` is GPT-2 on a GPU and the laptop recipe on a
    /// CPU, where GPT-2's 30 iterations take half an hour; `shakespeare-char` is nanoGPT's GPU
    /// recipe on a GPU and the laptop recipe on a CPU (what each trains). Other names are the
    /// same everywhere.
    pub fn pick(name: &str, device: &str) -> anyhow::Result<Shape> {
        let on_cpu = crate::gpt::device::by_name(device)?.is_cpu();
        let (preset, why) = match (name, on_cpu) {
            ("auto", true) => (
                "shakespeare-char-cpu",
                Some(
                    "the laptop recipe's shape (configs/train_shakespeare_char_cpu.yaml), the default on a \
                     CPU (`nanoflow bench gpt2` for GPT-2's)",
                ),
            ),
            ("auto", false) => ("gpt2", Some("the default on a GPU")),
            ("shakespeare-char", true) => (
                "shakespeare-char-cpu",
                Some(
                    "the laptop recipe's shape (configs/train_shakespeare_char_cpu.yaml), shakespeare-char's \
                     on a CPU (shakespeare-char-gpu for the GPU recipe's)",
                ),
            ),
            ("shakespeare-char", false) => ("shakespeare-char-gpu", None),
            (other, _) => (other, None),
        };
        let mut options = Options::preset(preset)?;
        options.device = device.into();
        Ok(Shape { name: preset.into(), options, why })
    }
}
/// What a benchmark measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Measurement {
    pub device: String,
    pub dtype: String,
    pub parameters: usize,
    pub tokens_per_iter: usize,
    pub ms_per_iter: f64,
    pub tokens_per_second: f64,
    /// Achieved model FLOPs per second (nanoGPT's 6N + 12LHQT per token).
    pub flops: f64,
    /// The peak `mfu` is against: a GPU's bfloat16 peak (an A100's where unknown), a CPU's
    /// measured float32 GEMM peak (`peak`).
    pub peak_flops: f64,
    /// Where `peak_flops` comes from, e.g. `this CPU's measured f32 GEMM peak, 2 threads`.
    pub peak_flops_source: String,
    pub mfu: f64,
    /// The most device memory seen in use (GPU: all processes'; CPU: this process's peak RSS).
    pub peak_memory_bytes: Option<u64>,
    pub first_loss: f64,
    pub last_loss: f64,
}

/// What `run` reports as it goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Iteration `done` of `total` (the burn-in's first, then the timed ones) took `seconds`.
    Step { done: usize, total: usize, timed: bool, loss: f64, seconds: f64 },
    /// The iterations left look like taking over `LONG`: `seconds` for `steps` steps of
    /// `step_seconds`. Sent once, as soon as a step's time says so (`expected_left`).
    Long { seconds: f64, steps: usize, step_seconds: f64 },
}

/// A benchmark expected to run longer than this is announced (`Event::Long`).
pub const LONG: Duration = Duration::from_secs(60);

/// A first iteration at least this long says how long the others take. A shorter one may be
/// mostly one-off work (the step's buffers allocated, a GPU's kernels loaded: a few seconds),
/// so the second one is waited for.
const FIRST_STEP_TELLS: f64 = 10.0;

/// How long the `left` iterations after iteration `done` (counting from 1) should take, judged
/// by that iteration's `seconds`, where it is a fair guess: the second iteration, or the first
/// where it alone took `FIRST_STEP_TELLS` (GPT-2 on a CPU: a minute, so the warning comes then,
/// not two minutes in).
fn expected_left(done: usize, left: usize, seconds: f64) -> Option<f64> {
    match done {
        1 if seconds >= FIRST_STEP_TELLS => Some(left as f64 * seconds),
        2 => Some(left as f64 * seconds),
        _ => None,
    }
}

/// Runs the benchmark; `progress` hears of every iteration, and of a long run (`Event`).
pub fn run(options: &Options, progress: &mut dyn FnMut(Event)) -> anyhow::Result<Measurement> {
    ensure!(options.iters > 0, "`--iters` must be at least 1");
    ensure!(options.batch_size > 0, "`--batch-size` must be at least 1");
    let device = crate::gpt::device::by_name(&options.device)?;
    let dtype = crate::gpt::device::matmul_dtype(&options.dtype, &device)?;
    if device.is_cuda() {
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
    }
    let device_name = crate::gpt::device::name(&device);
    // Before the model: on a CPU this measures a GEMM for a moment, on nothing else's time.
    let peak = crate::gpt::peak::of(&device);
    let config = &options.model;
    let varmap = VarMap::new();
    let model = Gpt::init(config, &varmap, &device, options.seed)?.with_matmul_dtype(dtype);
    let params = AdamWParams { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut optimizer = AdamW::new(varmap.data().lock().expect("varmap lock").clone(), params)?;
    let mut rng = Rng::new(options.seed);
    let (b, t) = (options.batch_size, config.block_size);
    let mut batch = || -> candle_core::Result<(Tensor, Tensor)> {
        let tokens: Vec<u32> = (0..b * (t + 1)).map(|_| (rng.uniform() * config.vocab_size as f64) as u32).collect();
        let all = Tensor::from_vec(tokens, (b, t + 1), &device)?;
        Ok((all.narrow(1, 0, t)?.contiguous()?, all.narrow(1, 1, t)?.contiguous()?))
    };
    let mut peak_memory = crate::gpt::device::memory_in_use(&device);
    let total = options.burn_in + options.iters;
    let mut announced = false;
    let mut step = |done: usize| -> anyhow::Result<f64> {
        let started = Instant::now();
        let (x, y) = batch()?;
        let vars: Vec<_> = optimizer.vars().collect();
        let (loss, mut grads) = model.loss_and_gradients(&x, &y, &vars)?;
        optim::clip_grad_norm(&mut grads, 1.0)?;
        optimizer.step(&grads, 6e-4)?;
        peak_memory = peak_memory.max(crate::gpt::device::memory_in_use(&device));
        let seconds = started.elapsed().as_secs_f64();
        let timed = done > options.burn_in;
        progress(Event::Step { done, total, timed, loss, seconds });
        if let Some(left) = expected_left(done, total - done, seconds)
            && left > LONG.as_secs_f64()
            && !announced
        {
            announced = true;
            progress(Event::Long { seconds: left, steps: total - done, step_seconds: seconds });
        }
        Ok(loss)
    };
    let mut first_loss = f64::NAN;
    for k in 0..options.burn_in {
        let loss = step(k + 1)?;
        if k == 0 {
            first_loss = loss;
        }
    }
    let started = Instant::now();
    let mut last_loss = f64::NAN;
    for k in 0..options.iters {
        last_loss = step(options.burn_in + k + 1)?;
        if first_loss.is_nan() {
            first_loss = last_loss;
        }
    }
    device.synchronize()?;
    let seconds = started.elapsed().as_secs_f64();
    if device.is_cpu() {
        peak_memory = crate::gpt::device::cpu_peak_memory().or(peak_memory);
    }
    let tokens_per_iter = b * t;
    let flops = config.flops_per_token() * (tokens_per_iter * options.iters) as f64 / seconds;
    Ok(Measurement {
        device: device_name,
        dtype: format!("{dtype:?}").to_lowercase(),
        parameters: config.num_params(true),
        tokens_per_iter,
        ms_per_iter: seconds * 1e3 / options.iters as f64,
        tokens_per_second: (tokens_per_iter * options.iters) as f64 / seconds,
        flops,
        peak_flops: peak.flops,
        peak_flops_source: peak.source,
        mfu: flops / peak.flops,
        peak_memory_bytes: peak_memory,
        first_loss,
        last_loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_shape_trains_and_reports() -> anyhow::Result<()> {
        let mut options = Options::preset("shakespeare-char")?;
        options.model = GptConfig { n_layer: 1, n_head: 2, n_embd: 32, block_size: 32, ..options.model };
        options.batch_size = 4;
        options.device = "cpu".into();
        options.burn_in = 2;
        options.iters = 8;
        let mut events = Vec::new();
        let measured = run(&options, &mut |event| events.push(event))?;
        let steps: Vec<_> = events
            .iter()
            .map(|event| match event {
                Event::Step { done, total, timed, .. } => (*done, *total, *timed),
                Event::Long { .. } => panic!("a second's benchmark is not long: {events:?}"),
            })
            .collect();
        let expected: Vec<_> = (1..=10).map(|done| (done, 10, done > 2)).collect();
        assert_eq!(steps, expected);
        // Uniform random tokens: the loss starts near ln(65) and has nowhere to go.
        assert!((measured.first_loss - 65f64.ln()).abs() < 0.2, "{measured:?}");
        assert!(measured.last_loss.is_finite());
        assert_eq!(measured.tokens_per_iter, 128);
        assert!(measured.ms_per_iter > 0.0 && measured.tokens_per_second > 0.0);
        // Against this CPU's own measured peak, not an A100's 312 TFLOPS.
        assert!(measured.peak_flops < 1e12, "{measured:?}");
        assert!(measured.peak_flops_source.starts_with("this CPU's measured f32 GEMM peak"), "{measured:?}");
        assert!((measured.mfu - measured.flops / measured.peak_flops).abs() < 1e-12);
        assert!(measured.mfu > 0.0 && measured.mfu <= 1.0, "{measured:?}");
        assert!(measured.peak_memory_bytes.unwrap() > 0);
        assert_eq!(measured.dtype, "f32");
        Ok(())
    }

    #[test]
    fn presets_are_bench_pys_shapes() {
        let gpt2 = Options::preset("gpt2").unwrap();
        assert_eq!(
            (gpt2.model.n_layer, gpt2.model.n_embd, gpt2.model.block_size, gpt2.model.vocab_size),
            (12, 768, 1024, 50304)
        );
        assert_eq!(gpt2.batch_size, 12);
        assert!(!gpt2.model.bias);
        let gpu = Options::preset("shakespeare-char-gpu").unwrap();
        assert_eq!((gpu.model.n_layer, gpu.model.n_embd, gpu.model.block_size, gpu.batch_size), (6, 384, 256, 64));
        assert!((gpu.model.num_params(true) as f64 / 1e6 - 10.65).abs() < 0.01);
        let error = Options::preset("llama").unwrap_err().to_string();
        assert!(error.contains("unknown shape `llama`"), "{error}");
    }

    /// The CPU shape is the laptop recipe's, as its config file says.
    #[test]
    fn the_cpu_shape_is_the_laptop_recipes() {
        let recipe =
            fs_err::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/train_shakespeare_char_cpu.yaml"))
                .unwrap();
        let value = |key: &str| -> usize {
            let line = recipe.lines().find(|line| line.starts_with(&format!("{key}:"))).unwrap();
            line[key.len() + 1..].trim().parse().unwrap()
        };
        let cpu = Options::preset("shakespeare-char-cpu").unwrap();
        let model = &cpu.model;
        assert_eq!(
            (model.n_layer, model.n_head, model.n_embd, model.block_size, cpu.batch_size),
            (value("n_layer"), value("n_head"), value("n_embd"), value("block_size"), value("batch_size"))
        );
    }

    #[test]
    fn a_cpu_gets_the_laptop_shape_unless_another_is_named() {
        let auto = Shape::pick("auto", "cpu").unwrap();
        assert_eq!(
            (auto.name.as_str(), auto.options.model.n_embd, auto.options.device.as_str()),
            ("shakespeare-char-cpu", 128, "cpu")
        );
        assert!(auto.why.unwrap().contains("the default on a CPU"), "{auto:?}");
        let char = Shape::pick("shakespeare-char", "cpu").unwrap();
        assert_eq!(char.name, "shakespeare-char-cpu");
        assert!(char.why.unwrap().contains("shakespeare-char-gpu for the GPU recipe's"), "{char:?}");
        let named = Shape::pick("shakespeare-char-gpu", "cpu").unwrap();
        assert_eq!((named.name.as_str(), named.options.model.n_embd, named.why), ("shakespeare-char-gpu", 384, None));
        let gpt2 = Shape::pick("gpt2", "cpu").unwrap();
        assert_eq!((gpt2.name.as_str(), gpt2.why), ("gpt2", None));
        let error = Shape::pick("auto", "tpu").unwrap_err().to_string();
        assert!(error.contains("unknown `device` `tpu`"), "{error}");
    }

    #[test]
    fn a_long_run_is_told_by_its_second_iteration_or_a_long_first() {
        assert_eq!(expected_left(1, 29, 5.0), None, "a first iteration of seconds may be one-off work");
        assert_eq!(expected_left(1, 29, 60.0), Some(29.0 * 60.0));
        assert_eq!(expected_left(2, 28, 4.5), Some(28.0 * 4.5));
        assert_eq!(expected_left(3, 27, 60.0), None, "told once");
    }
}
