//! The explicit step against candle's autograd through `Gpt::forward` (whose ops the model
//! tests check against `transformers`): the loss and every gradient, with and without
//! biases, dropout and several blocks of attention rows.

use candle_core::Device;
use candle_nn::VarMap;

use super::forward::{FirstQkv, Head, forward};
use super::params::{Params, param_slices, transposed};
use super::workspace::{Activations, Dims, Outputs};
use super::*;
use crate::gpt::{Gpt, Rng};

fn random_tokens(shape: (usize, usize), vocab: usize, rng: &mut Rng) -> Tensor {
    let ids: Vec<u32> = (0..shape.0 * shape.1).map(|_| rng.below(vocab as u64) as u32).collect();
    Tensor::from_vec(ids, shape, &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn compare(config: GptConfig, b: usize, weight: f64) {
    let varmap = VarMap::new();
    let model = Gpt::init(&config, &varmap, &Device::Cpu, 3).unwrap();
    let mut rng = Rng::new(11);
    let (x, y) =
        (random_tokens((b, config.block_size), 50, &mut rng), random_tokens((b, config.block_size), 50, &mut rng));
    model.seed_dropout(42).unwrap();
    let loss = model.accumulate_gradients(&x, &y, weight).unwrap();
    let mut vars: Vec<(String, Var)> =
        varmap.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let explicit = model.take_gradients(vars.iter().map(|(_, var)| var)).unwrap();
    model.seed_dropout(42).unwrap();
    let reference_loss = crate::gpt::cross_entropy(&model.forward(&x, true).unwrap(), &y).unwrap();
    let store = (&reference_loss * weight).unwrap().backward().unwrap();
    let reference_loss = reference_loss.to_scalar::<f32>().unwrap();
    assert!((loss - reference_loss).abs() < 1e-5, "loss {loss} vs autograd's {reference_loss}");
    for ((name, var), grad) in vars.iter().zip(&explicit) {
        let expected = store.get(var.as_tensor()).unwrap();
        let error = max_abs(&(grad - expected).unwrap()) / max_abs(expected).max(1e-6);
        assert!(error < 1e-4, "{config:?}: the gradient of `{name}` differs from autograd's by {error} (relative)");
    }
    // Taken once: the sums start again from zero.
    let again = model.take_gradients(vars.iter().map(|(_, var)| var)).unwrap();
    assert!(again.iter().all(|g| max_abs(g) == 0.0));
}

#[test]
fn the_explicit_step_matches_autograd() {
    let base = GptConfig { block_size: 8, vocab_size: 50, n_layer: 2, n_head: 2, n_embd: 16, dropout: 0.0, bias: true };
    compare(base.clone(), 3, 1.0);
    compare(GptConfig { bias: false, ..base.clone() }, 2, 0.5);
    compare(GptConfig { dropout: 0.2, ..base.clone() }, 2, 1.0);
    // Attention rows in several blocks, dropout on every site.
    compare(GptConfig { block_size: 150, n_head: 3, n_embd: 24, dropout: 0.1, ..base }, 2, 0.25);
}

#[test]
fn eval_loss_is_the_forward_loss_and_bad_tokens_are_errors() {
    // Three layers: a loss alone reuses one layer's buffers and two residual ones in turn.
    let config =
        GptConfig { block_size: 8, vocab_size: 50, n_layer: 3, n_head: 2, n_embd: 16, dropout: 0.1, bias: true };
    let varmap = VarMap::new();
    let model = Gpt::init(&config, &varmap, &Device::Cpu, 3).unwrap();
    let mut rng = Rng::new(5);
    let (x, y) = (random_tokens((2, 8), 50, &mut rng), random_tokens((2, 8), 50, &mut rng));
    let expected =
        crate::gpt::cross_entropy(&model.forward(&x, false).unwrap(), &y).unwrap().to_scalar::<f32>().unwrap();
    assert!((model.loss(&x, &y).unwrap() as f32 - expected).abs() < 1e-5);
    // After a training step (every layer's buffers kept), the same loss again.
    model.accumulate_gradients(&x, &y, 1.0).unwrap();
    assert!((model.loss(&x, &y).unwrap() as f32 - expected).abs() < 1e-5);
    let bad = Tensor::new(&[[1u32, 50]], &Device::Cpu).unwrap();
    let error = model.loss(&bad, &bad).unwrap_err().to_string();
    assert!(error.contains("token 50 is outside the vocabulary of 50"), "{error}");
}

#[test]
fn a_windows_last_logits_match_the_full_forward_pass_with_table_and_copies() {
    // Windows shorter than the block too (the first tokens without the cache): at T = 1 and 5
    // the scratch has no room for Kᵀ beside P, and the attention keeps `gemm`.
    for (bias, t) in [(false, 16), (true, 16), (false, 1), (true, 5)] {
        let config =
            GptConfig { block_size: 16, vocab_size: 37, n_layer: 2, n_head: 2, n_embd: 48, dropout: 0.0, bias };
        let model = Gpt::init(&config, &VarMap::new(), &Device::Cpu, 9).unwrap();
        let params = model.parameters();
        let guards: Vec<_> = params.iter().map(|p| p.storage_and_layout()).collect();
        let b = 3;
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % config.vocab_size) as u32).collect();
        let dims = Dims { b, t, c: config.n_embd, h: config.n_head, v: config.vocab_size, threads: 2, decoding: true };
        let logits = |copies: bool, table: bool| {
            let p = Params::from_list(&config, param_slices(&guards).unwrap());
            let turned = if copies { transposed(&p, config.n_embd) } else { Vec::new() };
            let p = if copies { p.with_copies(&turned) } else { p };
            let first = table.then(|| FirstQkv::new(&p, &config).expect("a small table"));
            let mut acts = Activations::new(&config, b, t, Outputs::LastLogits);
            on_cpu_pool(|| forward(&mut acts, &p, &dims, &ids, Head::LastLogits(first.as_ref()), None));
            acts.logits[..b * config.vocab_size].to_vec()
        };
        // The table holds the bits the window would compute: the same kernels, each element's
        // sum independent of how the rows are split.
        let bits = |l: &[f32]| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let copies = logits(true, false);
        assert_eq!(bits(&logits(true, true)), bits(&copies), "bias {bias}, T {t}: the first layer's table");
        // The copies go through `tiles` where the CPU has it: its sums' order, not gemm's.
        let plain = logits(false, false);
        // And the training forward pass's logits at each sequence's last position (every layer
        // at every position, attention through `attention` and `gemm`, not `last_queries`).
        let p = Params::from_list(&config, param_slices(&guards).unwrap());
        let mut acts = Activations::new(&config, b, t, Outputs::Loss);
        let training = Dims { decoding: false, ..dims };
        on_cpu_pool(|| forward(&mut acts, &p, &training, &ids, Head::Loss(&ids), None));
        let v = config.vocab_size;
        let full: Vec<f32> = (0..b).flat_map(|seq| acts.logits[(seq * t + t - 1) * v..][..v].to_vec()).collect();
        for other in [copies, logits(false, true), full] {
            let error = other.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(error < 1e-5, "bias {bias}, T {t}: {error}");
        }
    }
}
