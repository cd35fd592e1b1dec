//! `nanoflow bench`: nanoGPT's bench.py. A model of a given shape trains on random tokens —
//! forward, backward, gradient clipping and AdamW, one micro-batch per iteration, as `train`
//! runs them — for a few burn-in iterations, then for timed ones; the report is ms/iter,
//! tokens/s, MFU (nanoGPT's FLOPs per token against the device's bfloat16 peak) and peak memory.

use std::time::Instant;

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

impl Options {
    /// The shapes users compare against: `gpt2` (train_gpt2's 124M, T=1024, batch 12, vocab
    /// padded to 50304, as bench.py) and `shakespeare-char` (6 layers, 384 wide, T=256, batch 64).
    pub fn preset(name: &str) -> anyhow::Result<Options> {
        let (model, batch_size) = match name {
            "shakespeare-char" => (
                GptConfig {
                    block_size: 256,
                    vocab_size: 65,
                    n_layer: 6,
                    n_head: 6,
                    n_embd: 384,
                    dropout: 0.0,
                    bias: false,
                },
                64,
            ),
            other => {
                let preset = GptConfig::preset(other).with_context(|| {
                    format!("unknown shape `{other}`: use gpt2, gpt2-medium, gpt2-large, gpt2-xl or shakespeare-char")
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
    /// The peak `mfu` is against: the device's bfloat16 peak, or an A100's where unknown.
    pub peak_flops: f64,
    pub mfu: f64,
    /// The most device memory seen in use (GPU: all processes'; CPU: this process's peak RSS).
    pub peak_memory_bytes: Option<u64>,
    pub first_loss: f64,
    pub last_loss: f64,
}

/// Runs the benchmark; `progress` gets a line per iteration.
pub fn run(options: &Options, progress: &mut dyn FnMut(&str)) -> anyhow::Result<Measurement> {
    ensure!(options.iters > 0, "`--iters` must be at least 1");
    ensure!(options.batch_size > 0, "`--batch-size` must be at least 1");
    let device = crate::gpt::device::by_name(&options.device)?;
    let dtype = crate::gpt::device::matmul_dtype(&options.dtype, &device)?;
    if device.is_cuda() {
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
    }
    let device_name = crate::gpt::device::name(&device);
    let peak_flops = crate::gpt::device::peak_bf16_flops(&device_name).unwrap_or(crate::gpt::device::A100_BF16_FLOPS);
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
    let mut step = |label: &str, k: usize, n: usize| -> anyhow::Result<f64> {
        let (x, y) = batch()?;
        let vars: Vec<_> = optimizer.vars().collect();
        let (lossf, mut grads) = model.loss_and_gradients(&x, &y, &vars)?;
        optim::clip_grad_norm(&mut grads, 1.0)?;
        optimizer.step(&grads, 6e-4)?;
        peak_memory = peak_memory.max(crate::gpt::device::memory_in_use(&device));
        progress(&format!("{label} {k}/{n} loss: {lossf:.4}"));
        Ok(lossf)
    };
    let mut first_loss = f64::NAN;
    for k in 0..options.burn_in {
        let loss = step("burn-in", k, options.burn_in)?;
        if k == 0 {
            first_loss = loss;
        }
    }
    let started = Instant::now();
    let mut last_loss = f64::NAN;
    for k in 0..options.iters {
        last_loss = step("benchmark", k, options.iters)?;
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
        peak_flops,
        mfu: flops / peak_flops,
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
        let mut lines = Vec::new();
        let measured = run(&options, &mut |line| lines.push(line.to_string()))?;
        assert_eq!(lines.len(), 10);
        assert!(
            lines[0].starts_with("burn-in 0/2 loss: ") && lines[2].starts_with("benchmark 0/8 loss: "),
            "{lines:?}"
        );
        // Uniform random tokens: the loss starts near ln(65) and has nowhere to go.
        assert!((measured.first_loss - 65f64.ln()).abs() < 0.2, "{measured:?}");
        assert!(measured.last_loss.is_finite());
        assert_eq!(measured.tokens_per_iter, 128);
        assert!(measured.ms_per_iter > 0.0 && measured.tokens_per_second > 0.0);
        assert!((measured.mfu - measured.flops / 312e12).abs() < 1e-12, "the CPU is measured against an A100");
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
        let error = Options::preset("llama").unwrap_err().to_string();
        assert!(error.contains("unknown shape `llama`"), "{error}");
    }
}
