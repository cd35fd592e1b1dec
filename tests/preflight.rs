//! The preflight (`src/preflight.rs`, `stages/gpt/estimate.rs`): `run -n` shows what a train
//! stage costs; a stage whose memory cannot fit is refused before anything runs; the memory
//! estimate is within 15% of the peak resident set `nanoflow bench` measures on the CPU; and,
//! once a run has measured this machine's speed, the time is within 25% of the next run's.

use nanoflow_stages::gpt::GptConfig;
use nanoflow_stages::gpt::estimate::{Estimate, Target};
use nanoflow_stages::train::Config;

use crate::Test;

fn pipeline(model: &str) -> String {
    format!(
        "stages:
  text: {{kind: download, path: corpus.txt}}
  chars: {{kind: tokenize, input: '${{text}}', tokenizer: char}}
  model:
    kind: train
    data: ${{chars}}
    device: cpu
{model}"
    )
}

#[test]
fn a_stage_that_cannot_fit_is_refused_before_anything_runs() {
    let test = Test::with_pipeline(&pipeline("    vocab_size: 50304\n    batch_size: 100000\n"));
    test.write("corpus.txt", include_str!("../data/ci/corpus.txt"));
    let output = test.command(&["run", "model"]).env("NANOFLOW_MEMORY", (8u64 << 30).to_string()).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "error: stage `model` needs about 91.5 TiB of memory, more than the 8.0 GiB this machine has \
         (`NANOFLOW_MEMORY`)\n\nhint: `batch_size: 5` and `gradient_accumulation_steps: 800000` keep the same tokens \
         per step and fit; or run it anyway with `--force model`\n"
    );
    assert!(!test.path("artifacts").exists() || test.entries("text").is_empty(), "nothing ran");
    assert!(!test.path("artifacts/text").exists() && !test.path("artifacts/model").exists());
}

#[test]
fn a_dry_run_shows_the_cost_of_each_stage_that_trains() {
    let test = Test::with_pipeline(&pipeline(
        "    n_layer: 4\n    n_head: 4\n    n_embd: 128\n    block_size: 64\n    batch_size: 12\n    \
         gradient_accumulation_steps: 1\n    max_iters: 2000\n",
    ));
    test.write("corpus.txt", include_str!("../data/ci/corpus.txt"));
    let output = test.expect(&["run", "model", "-n"], 0);
    let block: Vec<&str> = output.stdout.lines().skip(3).collect();
    assert_eq!(
        block[0],
        "    params     804.1K (795.9K without position embeddings): 4 layers, 4 heads, 128 wide, T=64, vocab 65"
    );
    assert_eq!(
        block[1],
        "    tokens     768 per step (12 x 64 x 1), 1.5M in 2000 steps: 1.9 per param (Chinchilla ≈ 20)"
    );
    assert_eq!(block[2], "    FLOPs      4.0 GFLOP per step, 7.9 TFLOP in total");
    assert!(
        block[3].starts_with("    memory     ") && block[3].contains(" RAM at batch 12: weights 6.1 MiB"),
        "{block:?}"
    );
    assert_eq!(block[4], "    note       vocabulary ≈ 65 (the char tokenizer's on Shakespeare; the data's decides)");
    assert_eq!(block[5], "    time       unknown until calibrated (a run of this stage on this machine measures it)");
    assert!(!test.path("artifacts").exists(), "`-n` writes nothing");
}

/// `nanoflow bench SHAPE --batch-size B` on the CPU: the preflight's estimate and the measured
/// peak resident set, bytes.
fn estimate_and_bench(shape: &str, model: GptConfig, batch_size: usize) -> (u64, u64) {
    let test = Test::new();
    let batch = batch_size.to_string();
    let args = ["bench", shape, "--batch-size", &batch, "--device", "cpu", "--burn-in", "0", "--iters", "1", "--json"];
    let output = test.expect(&args, 0);
    let measured: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
    let measured = measured["peak_memory_bytes"].as_u64().unwrap();
    let config = Config { batch_size, gradient_accumulation_steps: 1, device: "cpu".into(), ..Config::default() };
    let estimate = Estimate::of_model(&config, &model, Target::Cpu, 1).memory().unwrap().total();
    eprintln!("{shape} at batch {batch_size}: estimate {estimate}, measured {measured}");
    (estimate, measured)
}

fn assert_within(estimate: u64, measured: u64, tolerance: f64) {
    let error = (estimate as f64 - measured as f64).abs() / measured as f64;
    assert!(error <= tolerance, "estimate {estimate} against measured {measured}: {:.1}% off", 100.0 * error);
}

fn char_model(n_layer: usize, n_embd: usize, block_size: usize) -> GptConfig {
    GptConfig { block_size, vocab_size: 65, n_layer, n_head: n_layer, n_embd, dropout: 0.0, bias: false }
}

#[test]
fn memory_is_within_15_percent_for_the_laptop_recipe() {
    let (estimate, measured) = estimate_and_bench("shakespeare-char-cpu", char_model(4, 128, 64), 12);
    assert_within(estimate, measured, 0.15);
}

/// nanoGPT's char recipe's shape at batch 8 (its batch, 64, is a 35 s step on 2 cores: the
/// ignored test below).
#[test]
fn memory_is_within_15_percent_for_the_char_recipe_shape() {
    let (estimate, measured) = estimate_and_bench("shakespeare-char-gpu", char_model(6, 384, 256), 8);
    assert_within(estimate, measured, 0.15);
}

#[test]
fn memory_is_within_15_percent_for_the_char_recipe() {
    let (estimate, measured) = estimate_and_bench("shakespeare-char-gpu", char_model(6, 384, 256), 64);
    assert_within(estimate, measured, 0.15);
}

#[test]
fn memory_is_within_15_percent_for_gpt2_at_b1_t1024() {
    let model = GptConfig { bias: false, ..GptConfig::preset("gpt2").unwrap().with_padded_vocab(64) };
    let (estimate, measured) = estimate_and_bench("gpt2", model, 1);
    assert_within(estimate, measured, 0.15);
}

/// The laptop recipe's shape trained twice: the first run measures this machine's speed (the
/// calibration record), the second's plan says its time from it, within 25% of its own median.
#[test]
#[ignore = "a timing: beside the suite's other trainings on 2 cores the calibrating run is slowed (194 against \
            111 ms); alone it is within 8%: `cargo test --test integration -- --ignored preflight::time`"]
fn time_is_within_25_percent_once_calibrated() {
    let laptop = "    n_layer: 4\n    n_head: 4\n    n_embd: 128\n    block_size: 64\n    batch_size: 12\n    \
                  gradient_accumulation_steps: 1\n    eval_interval: 1000\n    eval_iters: 2\n    log_interval: 1000\n";
    let test = Test::with_pipeline(&pipeline(&format!("{laptop}    max_iters: 20\n    lr_decay_iters: 20\n")));
    test.write("corpus.txt", include_str!("../data/ci/corpus.txt"));
    test.expect(&["run", "model"], 0);
    assert!(test.read("artifacts/.nanoflow/calibration.json").contains("\"ms_per_micro_batch\""));
    let longer = ["--set", "model.max_iters=60", "--set", "model.lr_decay_iters=60"];
    let plan = test.expect(&[&["run", "model", "-n"][..], &longer].concat(), 0).stdout;
    let time = plan.lines().find(|line| line.trim_start().starts_with("time ")).unwrap();
    let predicted: f64 =
        time.split(" steps (").nth(1).and_then(|rest| rest.split(" ms").next()).unwrap().parse().unwrap();
    assert!(time.contains("for 60 steps"), "{time}");
    test.expect(&[&["run", "model"][..], &longer].concat(), 0);
    let entries = test.entries("model");
    let actual = entries
        .iter()
        .filter_map(|key| fs_err::read_to_string(test.path(&format!("artifacts/model/{key}/manifest.json"))).ok())
        .filter_map(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .find(|manifest| manifest["metrics"]["iters"] == 60)
        .and_then(|manifest| manifest["metrics"]["ms_per_iter"].as_f64())
        .unwrap();
    let error = (predicted - actual).abs() / actual;
    eprintln!("predicted {predicted} ms/iter, actual {actual}");
    assert!(error <= 0.25, "predicted {predicted} ms/iter, actual {actual}: {:.0}% off", 100.0 * error);
}
