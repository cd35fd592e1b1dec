//! The GPT on the CPU: ms/iter of a training step (forward, backward, clipping, AdamW, as `train`
//! does them, on random batches), with the time split between forward, backward and update, for
//! the shapes of issue 15: nanoGPT's CPU recipe (4 layers, 128 wide, block 64, batch 12, vocab 65),
//! its default char config (6 layers, 384 wide, block 256, batch 64, dropout 0.2) and GPT-2 124M
//! at batch 1, block 1024 (a CPU finetune step); and sampling tokens/s with and without the KV
//! cache for the CPU recipe's model and for GPT-2 124M's shape (random weights, 5 samples side by
//! side, as the `sample` stage draws them).
//!
//!     cargo bench -p nanoflow-stages --bench model [-- train|sample] [-- recipe|char|gpt2] [-- --iters N]
//!
//! (`sample` knows `recipe` and `gpt2`.)
//!
//! `--iters` sets the CPU recipe's timed iterations (30); the two large shapes take 1 warm-up and
//! 3 timed ones (a step of each is seconds on a laptop).
//!
//! nanoGPT's side of the comparison (PyTorch on the same machine) is `benches/nanogpt_cpu.py`;
//! `benches/torch_matmuls.py` times torch's matmuls alone for the GPT-2 step's linear layers (the
//! floor under that step on a CPU, whoever runs it).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use nanoflow_stages::gpt::optim::{self, AdamW, AdamWParams};
use nanoflow_stages::gpt::{self, Gpt, GptConfig, Rng, Sampling};

fn main() -> anyhow::Result<()> {
    // As nanoflow's `main` does.
    gpt::one_cpu_pool();
    let args: Vec<String> = std::env::args().skip(1).filter(|arg| arg != "--bench").collect();
    let iters =
        args.iter().position(|arg| arg == "--iters").and_then(|i| args.get(i + 1)).map_or(Ok(30), |n| n.parse())?;
    let which: Vec<&str> = args.iter().map(String::as_str).filter(|arg| ["train", "sample"].contains(arg)).collect();
    let all = which.is_empty();
    let shapes: Vec<&str> =
        args.iter().map(String::as_str).filter(|arg| ["recipe", "char", "gpt2"].contains(arg)).collect();
    eprintln!("candle {} CPU threads", candle_core::utils::get_num_threads());
    // As `device::for_rank` does for every device nanoflow opens.
    gpt::keep_freed_memory(&Device::Cpu)?;
    if all || which.contains(&"train") {
        for (name, config, batch, warm_up, timed) in train_shapes(iters) {
            if shapes.is_empty() || shapes.contains(&name) {
                train(name, &config, batch, warm_up, timed)?;
            }
        }
    }
    if all || which.contains(&"sample") {
        sample(&shapes)?;
    }
    Ok(())
}

fn cpu_recipe() -> GptConfig {
    GptConfig { block_size: 64, vocab_size: 65, n_layer: 4, n_head: 4, n_embd: 128, dropout: 0.0, bias: false }
}

/// The train shapes: (name, model, batch size, warm-up iterations, timed iterations).
fn train_shapes(iters: usize) -> [(&'static str, GptConfig, usize, usize, usize); 3] {
    let char_default =
        GptConfig { block_size: 256, vocab_size: 65, n_layer: 6, n_head: 6, n_embd: 384, dropout: 0.2, bias: false };
    let gpt2 = GptConfig { vocab_size: 50304, ..GptConfig::preset("gpt2").expect("gpt2 is a preset") };
    [("recipe", cpu_recipe(), 12, 5, iters), ("char", char_default, 64, 1, 3), ("gpt2", gpt2, 1, 1, 3)]
}

fn random_batch(rng: &mut Rng, b: usize, t: usize, vocab: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let tokens: Vec<u32> = (0..b * (t + 1)).map(|_| (rng.uniform() * vocab as f64) as u32).collect();
    let all = Tensor::from_vec(tokens, (b, t + 1), &Device::Cpu)?;
    Ok((all.narrow(1, 0, t)?, all.narrow(1, 1, t)?))
}

fn train(name: &str, config: &GptConfig, batch: usize, warm_up: usize, iters: usize) -> anyhow::Result<()> {
    let t = config.block_size;
    let varmap = VarMap::new();
    let model = Gpt::init(config, &varmap, &Device::Cpu, 1337)?;
    let vars: HashMap<_, _> = varmap.data().lock().expect("varmap").clone();
    let params = AdamWParams { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
    let mut optimizer = AdamW::new(vars, params)?;
    let mut rng = Rng::new(1337);
    let (mut backward, mut update, mut total) = (Vec::new(), Vec::new(), Vec::new());
    for iter in 0..warm_up + iters {
        let (x, y) = random_batch(&mut rng, batch, t, config.vocab_size)?;
        let started = Instant::now();
        model.seed_dropout(iter as u64)?;
        let vars: Vec<_> = optimizer.vars().collect();
        let (_loss, mut grads) = model.loss_and_gradients(&x, &y, &vars)?;
        let backwarded = Instant::now();
        optim::clip_grad_norm(&mut grads, 1.0)?;
        optimizer.step(&grads, 1e-3)?;
        let done = Instant::now();
        if iter >= warm_up {
            backward.push((backwarded - started).as_secs_f64() * 1e3);
            update.push((done - backwarded).as_secs_f64() * 1e3);
            total.push((done - started).as_secs_f64() * 1e3);
        }
    }
    let tokens = (batch * t) as f64;
    println!(
        "train, {name} ({} layers, {} wide, {} params, dropout {}, {batch}x{t} tokens/iter), {iters} iters after {warm_up} warm-up:",
        config.n_layer,
        config.n_embd,
        config.num_params(true),
        config.dropout
    );
    println!(
        "  {:.1} ms/iter median ({:.1} mean, {:.1} min), {:.0} tokens/s",
        median(&total),
        mean(&total),
        total.iter().copied().fold(f64::INFINITY, f64::min),
        tokens / median(&total) * 1e3
    );
    println!(
        "  forward + loss + backward {:.1} ms, clip + AdamW {:.1} ms (medians; {})",
        median(&backward),
        median(&update),
        if model.explicit() { "the explicit CPU step" } else { "candle's autograd" }
    );
    Ok(())
}

/// Sampling tokens/s for the shapes in `shapes` (`recipe`, `gpt2`; all when empty): 5 samples
/// from a one-token prompt, as the `sample` stage draws them (side by side), random weights.
fn sample(shapes: &[&str]) -> anyhow::Result<()> {
    let gpt2 = GptConfig::preset("gpt2").expect("gpt2 is a preset");
    let samples = 5;
    // Without the cache GPT-2's 5 x 100 tokens recompute ~6 TFLOP: the recipe's shape only.
    // The small shape: the median of 3 timed runs after an untimed one (one run is under a
    // second, and as noisy); GPT-2's: one run.
    for (shape, name, config, new_tokens, uncached, warm_up, timed) in [
        ("recipe", "shakespeare-char shape", cpu_recipe(), 500, true, 1, 3),
        ("gpt2", "GPT-2 124M shape", gpt2, 100, false, 0, 1),
    ] {
        if !shapes.is_empty() && !shapes.contains(&shape) {
            continue;
        }
        let varmap = VarMap::new();
        let model = Gpt::init(&config, &varmap, &Device::Cpu, 1337)?;
        let idx = Tensor::zeros((samples, 1), DType::U32, &Device::Cpu)?;
        for kv_cache in [true, false] {
            if !kv_cache && !uncached {
                continue;
            }
            let sampling = Sampling { max_new_tokens: new_tokens, temperature: 0.8, top_k: Some(200), kv_cache };
            let mut rates = Vec::new();
            for run in 0..warm_up + timed {
                let mut rngs: Vec<Rng> = (0..samples as u64).map(|k| Rng::stream(1337, k)).collect();
                let started = Instant::now();
                model.generate_with(&idx, &sampling, &mut rngs, &mut |_| Ok(()))?;
                if run >= warm_up {
                    rates.push((samples * new_tokens) as f64 / started.elapsed().as_secs_f64());
                }
            }
            println!(
                "sample, {name} (block {}), {samples} x {new_tokens} new tokens, kv cache {}: {:.1} tokens/s",
                config.block_size,
                if kv_cache { "on " } else { "off" },
                median(&rates)
            );
        }
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}
