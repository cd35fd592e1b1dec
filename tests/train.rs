//! The train kind through the engine: a killed train stage resumes from its last complete
//! checkpoint (the kind is resumable, so the engine keeps its partial output), and a stage with
//! `gpus: 2` fans out to two rank processes (CPU ones here) that train what one process would.

use crate::{Test, signal, wait_until};

fn pipeline(max_iters: usize) -> String {
    ranks_pipeline(max_iters, 1, 1)
}

pub(crate) fn ranks_pipeline(max_iters: usize, gpus: usize, accumulation: usize) -> String {
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
    gradient_accumulation_steps: {accumulation}
    gpus: {gpus}
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
    // While it runs, `status` says so.
    let status = test.expect(&["status", "model"], 0);
    assert_eq!(status.stdout, "text   fresh\nchars  fresh\nmodel  running  in another nanoflow process\n");
    signal(child.id() as i32, libc::SIGKILL);
    child.wait().unwrap();
    assert!(test.entries("model").is_empty(), "nothing is published by a killed run");
    // Killed, it says the next run resumes; and the next run says it resumes, not "never run".
    assert_eq!(
        test.expect(&["status", "model"], 0).stdout,
        "text   fresh\nchars  fresh\nmodel  stale    never run; an interrupted run's partial output: the next run resumes\n"
    );

    let output = test.expect(&["run", "model"], 0);
    assert!(output.stderr.contains("[3/3] model  running  (resuming an interrupted run)\n"), "{}", output.stderr);
    assert!(output.stderr.contains("[model] resuming from `"), "{}", output.stderr);
    assert!(!output.stderr.contains("[model] initializing"), "{}", output.stderr);
    assert!(!output.stderr.contains("[model] step 0:"), "{}", output.stderr);
    assert!(test.path("artifacts/model/current/ckpt.safetensors").exists());
    assert!(test.path("artifacts/model/current/metrics.parquet").exists());
}

/// (iter, loss, val loss) of a finished train stage's record.
fn record(test: &Test, stage: &str) -> Vec<(i64, Option<f64>, Option<f64>)> {
    let path = test.path(&format!("artifacts/{stage}/current/metrics.parquet"));
    let rows = nanoflow_stages::formats::metrics::read_parquet(&path).unwrap();
    rows.iter().map(|row| (row.iter, row.loss, row.val_loss)).collect()
}

/// `nanoflow run model` with one more environment variable, expecting exit `code`: its stderr.
fn run_model_with(test: &Test, (name, value): (&str, &str), code: i32) -> String {
    let output = test.command(&["run", "model"]).env(name, value).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(code), "{stderr}");
    stderr
}

#[test]
fn two_cpu_ranks_fail_together_resume_and_match_one_process() {
    let test = Test::with_pipeline(&ranks_pipeline(20, 2, 4));
    test.write("corpus.txt", include_str!("../data/ci/corpus.txt"));
    // Rank 1 dies after 13 steps: the stage fails as a whole, keeping the checkpoint at 10.
    let stderr = run_model_with(&test, ("NANOFLOW_TEST_STOP_AFTER", "1:13"), 1);
    assert!(stderr.contains("data parallel: 2 ranks, 2 on this machine"), "{stderr}");
    assert!(stderr.contains("rank 1 (exit status: 1)"), "{stderr}");
    assert!(stderr.contains("the next run resumes from the last"), "{stderr}");
    assert!(test.entries("model").is_empty(), "nothing is published by a failed run");

    let output = test.expect(&["run", "model"], 0);
    assert!(output.stderr.contains("[model] resuming from `"), "{}", output.stderr);
    assert!(!output.stderr.contains(".rank-report-0.json"));
    assert!(!test.path("artifacts/model/current/.rank-report-0.json").exists());
    // `gpus` is not part of the key: the same model on one process is already built.
    let cached = test.expect(&["run", "model", "--set", "model.gpus=1"], 0);
    assert!(cached.stderr.contains("cached"), "{}", cached.stderr);

    // One rank with the whole accumulation, uninterrupted, logs the same losses; it too runs as a
    // rank process over the collective here (what checks NCCL on a single GPU).
    let one = Test::with_pipeline(&ranks_pipeline(20, 1, 4));
    one.write("corpus.txt", include_str!("../data/ci/corpus.txt"));
    let stderr = run_model_with(&one, ("NANOFLOW_RANK_PROCESSES", "1"), 0);
    assert!(stderr.contains("data parallel: 1 rank, 1 on this machine"), "{stderr}");
    let (expected, found) = (record(&one, "model"), record(&test, "model"));
    assert_eq!(expected.len(), found.len());
    for (a, b) in expected.iter().zip(&found) {
        assert_eq!(a.0, b.0);
        for (a, b) in [(a.1, b.1), (a.2, b.2)] {
            assert!((a.unwrap_or(0.0) - b.unwrap_or(0.0)).abs() < 1e-4, "{expected:?}\n{found:?}");
        }
    }
}

#[test]
fn a_forced_rerun_of_a_deterministic_train_writes_the_same_bytes_and_nothing_downstream_runs() {
    let test = Test::with_pipeline(&format!(
        "{}  samples: {{kind: sample, model: '${{model}}', num_samples: 1, max_new_tokens: 8, device: cpu}}\n",
        pipeline(20)
    ));
    test.write("corpus.txt", include_str!("../data/ci/corpus.txt"));
    test.expect(&["run", "samples"], 0);
    let manifest = |stage: &str| -> serde_json::Value {
        serde_json::from_str(&test.read(&format!("artifacts/{stage}/current/../manifest.json"))).unwrap()
    };
    let (model, samples) = (manifest("model"), manifest("samples"));
    // Timings and the machine's folders stay in the manifest and the log, out of the outputs.
    for file in ["ckpt.json", "last.json"] {
        let json = test.read(&format!("artifacts/model/current/{file}"));
        assert!(!json.contains(test.path("").to_str().unwrap()), "{file}: {json}");
    }
    let settings = test.read("artifacts/samples/current/samples.json");
    assert!(!settings.contains("seconds") && !settings.contains(test.path("").to_str().unwrap()), "{settings}");

    let output = test.expect(&["run", "samples", "--force", "model"], 0);
    assert!(output.stderr.contains("[3/4] model    done"), "{}", output.stderr);
    assert!(output.stderr.contains("[4/4] samples  cached"), "{}", output.stderr);
    assert_eq!(manifest("model")["output_digest"], model["output_digest"]);
    assert_eq!(manifest("model")["outputs"], model["outputs"]);
    assert_eq!(manifest("samples")["key"], samples["key"]);
}

/// Ctrl-C (or a Slurm job's warning, SIGUSR1) during training: the stage writes a checkpoint of
/// the step it is at and stops; the next run resumes from that step to the very losses and
/// weights of an uninterrupted run — one process, and two ranks that agree on where to stop.
#[test]
fn a_train_stage_stopped_by_a_signal_checkpoints_its_step_and_resumes_to_the_same_run() {
    for gpus in [1, 2] {
        let interrupted = Test::with_pipeline(&ranks_pipeline(300, gpus, 2));
        interrupted.write("corpus.txt", include_str!("../data/ci/corpus.txt"));
        let child = interrupted.spawn(&["run", "model"]);
        let partial = || {
            let dir = interrupted.path("artifacts/model");
            fs_err::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|entry| entry.path())
                .find(|path| path.file_name().is_some_and(|name| name.to_string_lossy().starts_with(".partial-")))
        };
        // Past the evaluation at iter 10, so that the stop most likely falls between two.
        wait_until(|| {
            partial().is_some_and(|dir| {
                fs_err::read_to_string(dir.join("out/last.json")).is_ok_and(|json| json.contains("\"iter\": 10,"))
            })
        });
        signal(child.id() as i32, libc::SIGINT);
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(130), "{stderr}");
        assert!(stderr.contains("stopping on a signal; the checkpoint holds every step so far"), "{stderr}");
        let state = fs_err::read_to_string(partial().unwrap().join("out/last.json")).unwrap();
        let state: serde_json::Value = serde_json::from_str(&state).unwrap();
        let at = state["iter"].as_u64().unwrap();
        assert!(at >= 10, "{state}");

        let output = interrupted.expect(&["run", "model"], 0);
        assert!(output.stderr.contains(&format!("at iter {at}")), "{}", output.stderr);
        let whole = Test::with_pipeline(&ranks_pipeline(300, gpus, 2));
        whole.write("corpus.txt", include_str!("../data/ci/corpus.txt"));
        whole.expect(&["run", "model"], 0);
        assert_eq!(record(&interrupted, "model"), record(&whole, "model"));
        let weights = "artifacts/model/current/last.safetensors";
        assert!(fs_err::read(interrupted.path(weights)).unwrap() == fs_err::read(whole.path(weights)).unwrap());
    }
}
