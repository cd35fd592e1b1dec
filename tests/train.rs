//! The train kind through the engine: a killed train stage resumes from its last complete
//! checkpoint (the kind is resumable, so the engine keeps its partial output).

use crate::{Test, signal, wait_until};

fn pipeline(max_iters: usize) -> String {
    format!(
        "stages:
  text: {{kind: download, path: corpus.txt}}
  chars: {{kind: tokenize, input: '${{text}}', tokenizer: char}}
  model:
    kind: train
    data: ${{chars}}
    n_layer: 1
    n_head: 2
    n_embd: 16
    block_size: 16
    batch_size: 4
    gradient_accumulation_steps: 1
    max_iters: {max_iters}
    lr_decay_iters: {max_iters}
    warmup_iters: 0
    learning_rate: 1.0e-2
    eval_interval: 10
    eval_iters: 2
    log_interval: 100
    always_save_checkpoint: true
    device: cpu
"
    )
}

#[test]
fn a_killed_train_stage_resumes_from_its_last_checkpoint() {
    let test = Test::with_pipeline(&pipeline(1000));
    test.write("corpus.txt", include_str!("../data/ci/corpus.txt"));
    let mut child = test.spawn(&["run", "model"]);
    let stage_dir = test.path("artifacts/model");
    // Wait for a complete checkpoint past the first one in the partial output, then kill nanoflow.
    wait_until(|| {
        std::fs::read_dir(&stage_dir).into_iter().flatten().flatten().any(|entry| {
            let state = entry.path().join("out/last.json");
            fs_err::read_to_string(state).is_ok_and(|json| !json.contains("\"iter\": 0,") && json.contains("\"iter\""))
        })
    });
    signal(child.id() as i32, libc::SIGKILL);
    child.wait().unwrap();
    assert!(test.entries("model").is_empty(), "nothing is published by a killed run");

    let output = test.expect(&["run", "model"], 0);
    assert!(output.stderr.contains("[model] resuming from `"), "{}", output.stderr);
    assert!(!output.stderr.contains("[model] step 0:"), "{}", output.stderr);
    assert!(test.path("artifacts/model/current/ckpt.safetensors").exists());
    assert!(test.path("artifacts/model/current/metrics.parquet").exists());
}
