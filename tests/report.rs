//! What a user sees of what was made: the summary at the end of `run`, `nanoflow report`'s card
//! (markdown, PNG plots, one self-contained HTML page) and `nanoflow metrics`' table of every
//! stored run of a stage.

use crate::Test;

fn pipeline() -> String {
    "stages:
  text: {kind: download, path: corpus.txt}
  chars: {kind: tokenize, input: '${text}', tokenizer: char}
  model:
    kind: train
    data: ${chars}
    n_layer: 1
    n_head: 2
    n_embd: 16
    block_size: 16
    batch_size: 4
    max_iters: 20
    lr_decay_iters: 20
    warmup_iters: 0
    learning_rate: 1.0e-2
    eval_interval: 10
    eval_iters: 2
    log_interval: 5
    device: cpu
  samples:
    kind: sample
    model: ${model}
    num_samples: 2
    max_new_tokens: 20
    device: cpu
targets:
  tiny: [samples]
"
    .to_string()
}

/// A tiny train → sample pipeline (target `tiny`) with its corpus.
pub fn test() -> Test {
    let test = Test::with_pipeline(&pipeline());
    test.write("corpus.txt", include_str!("../data/ci/corpus.txt"));
    test
}

#[test]
fn a_run_ends_with_what_it_made_and_where() {
    let test = test();
    let output = test.expect(&["run", "tiny"], 0);
    let tail: Vec<&str> = output.stderr.lines().skip_while(|line| !line.starts_with("ran 4, cached 0")).collect();
    assert_eq!(tail.len(), 7, "{}", output.stderr);
    assert_eq!(tail[1], "made:");
    assert!(tail[2].starts_with("  model    20 iters, val loss "), "{}", tail[2]);
    assert!(tail[2].contains(" tokens/s (median step); took "), "{}", tail[2]);
    assert_eq!(tail[3], "           artifacts/model/current/");
    assert!(tail[4].starts_with("  samples  2 samples of 20 tokens"), "{}", tail[4]);
    assert_eq!(tail[5], "           artifacts/samples/current/");
    assert_eq!(tail[6], "see it all: nanoflow report tiny");
    // The iteration lines keep nanoGPT's format where no bar is drawn (stderr is a pipe here),
    // and in the log, with no progress markers in either.
    assert!(output.stderr.contains("[model] iter 5: loss "), "{}", output.stderr);
    assert!(!output.stderr.contains("::nanoflow"), "{}", output.stderr);
    let log = test.read("artifacts/model/current/../log.txt");
    assert!(log.contains("\niter 15: loss ") && log.contains("\nstep 20: train loss "), "{log}");
    assert!(!log.contains("::nanoflow"), "{log}");

    // Found in the store, the same summary.
    let again = test.expect(&["run", "tiny"], 0);
    assert!(again.stderr.contains("ran 0, cached 4 in"), "{}", again.stderr);
    assert!(again.stderr.contains("\nmade:\n  model    20 iters, val loss "), "{}", again.stderr);
}

#[test]
fn report_writes_markdown_plots_and_one_self_contained_page() {
    let test = test();
    test.expect(&["run", "tiny"], 0);
    let output = test.expect(&["report", "tiny"], 0);
    assert_eq!(output.stdout.lines().last(), Some("reports/tiny/report.html"));
    let markdown = test.read("reports/tiny/report.md");
    // The loss plot first (issue 29): before the machine, the stage table and the params.
    let loss = markdown.find("![model: train and val loss against iteration](model-loss-iteration.png)").unwrap();
    assert!(loss < markdown.find("## Machine\n").unwrap(), "{markdown}");
    // Against tokens it would be the same picture (the tokens per iteration never change).
    assert!(!markdown.contains("against tokens"), "{markdown}");
    for expected in [
        "# nanoflow report: tiny\n",
        "## Loss\n",
        "## Machine\n",
        "| CPU | ",
        "| stage | kind | state | took | result |\n",
        "| model | train | ran | ",
        "## model (train)\n",
        "| learning_rate | 0.01 | 6e-4 |\n",
        "| best_val_loss | ",
        "| n_layer | 1 | 12 from scratch, else the checkpoint's |\n",
        "## samples (sample)\n",
        "The first ",
    ] {
        assert!(markdown.contains(expected), "`{expected}` in:\n{markdown}");
    }
    let bytes = fs_err::read(test.path("reports/tiny/model-loss-iteration.png")).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let html = test.read("reports/tiny/report.html");
    assert_eq!(html.matches("<img src=\"data:image/png;base64,").count(), 1);
    assert!(!html.contains("src=\"http") && !html.contains("<script"), "nothing is fetched");

    // A param changed and changed back: the output is restored from the store, and says so.
    test.expect(&["run", "tiny", "--set", "model.learning_rate=2e-2"], 0);
    test.expect(&["run", "tiny"], 0);
    test.expect(&["report", "tiny", "-o", "card"], 0);
    let markdown = test.read("card/report.md");
    assert!(markdown.contains("| model | train | restored | "), "{markdown}");
    assert!(markdown.contains("restored from the store (it ran "), "{markdown}");
}

#[test]
fn report_of_nothing_built_says_how_to_build_it() {
    let test = test();
    let output = test.expect(&["report", "tiny"], 1);
    assert_eq!(output.stderr, "error: nothing of `tiny` is built yet\n\nhint: run it with `nanoflow run tiny`\n");
    assert!(!test.path("reports/tiny/report.md").exists());
}

#[test]
fn metrics_lists_every_stored_run_with_what_set_it_apart() {
    let test = test();
    test.expect(&["run", "model"], 0);
    test.expect(&["run", "model", "--set", "model.learning_rate=2e-2"], 0);

    let output = test.expect(&["metrics", "model", "--json"], 0);
    let rows: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["learning_rate"], 0.01);
    assert_eq!(rows[1]["learning_rate"], 0.02);
    assert_eq!((rows[0]["current"].as_str(), rows[1]["current"].as_str()), (Some(""), Some("*")));
    for row in rows {
        assert_eq!(row["iters"], 20);
        let (val, best) = (row["val_loss"].as_f64().unwrap(), row["best_val_loss"].as_f64().unwrap());
        assert!(best <= val && val > 0.0, "{row}");
        // Only the params that differ between the runs are columns.
        assert!(row.get("n_layer").is_none() && row.get("batch_size").is_none(), "{row}");
    }
    // The record agrees with what the run reported.
    let manifest: serde_json::Value =
        serde_json::from_str(&test.read("artifacts/model/current/../manifest.json")).unwrap();
    assert_eq!(rows[1]["val_loss"].as_f64(), manifest["metrics"]["val_loss"].as_f64());

    let csv = test.expect(&["metrics", "model", "--csv"], 0).stdout;
    let header = csv.lines().next().unwrap();
    assert_eq!(
        header,
        "key,current,finished,took_s,learning_rate,iters,tokens,train_loss,val_loss,best_val_loss,tokens_per_s"
    );
    assert_eq!(csv.lines().count(), 3);
    assert!(csv.ends_with("\n"));

    let table = test.expect(&["metrics", "model", "--wide"], 0);
    assert!(table.stdout.contains("learning_rate") && table.stdout.contains("best_val_loss"), "{}", table.stdout);
    assert!(table.stdout.lines().next().unwrap().chars().count() > 100, "{}", table.stdout);
    assert_eq!(table.stderr, "loss curves of every run: reports/model-runs.png\n");
    // At 80 columns (issue 29): the key, what set the runs apart and the losses first, the rest
    // named on stderr.
    let narrow = test.command(&["metrics", "model"]).env("COLUMNS", "80").output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&narrow.stdout), String::from_utf8_lossy(&narrow.stderr));
    assert!(stdout.lines().all(|line| line.chars().count() <= 80), "{stdout}");
    let header = stdout.lines().nth(1).unwrap();
    let columns: Vec<&str> =
        header.split('┆').map(|cell| cell.trim_matches(|c: char| c == '│' || c.is_whitespace())).collect();
    assert_eq!(columns[..4], ["key", "current", "learning_rate", "val_loss"], "{stdout}");
    assert!(stderr.starts_with(&format!("{} more: ", 11 - columns.len())), "{stderr}");
    assert!(stderr.contains("finished") && stderr.contains("(`--wide` shows them)"), "{stderr}");

    // `gc` keeps the runs `metrics` compares unless asked, and says so (issue 29).
    let gc = test.expect(&["gc", "-n"], 0);
    assert_eq!(gc.stdout, "");
    assert!(gc.stderr.contains("kept 1 other run of `model` that `nanoflow metrics model` compares"), "{}", gc.stderr);
    let gc = test.expect(&["gc", "--all-runs"], 0);
    assert_eq!(gc.stdout.lines().count(), 1, "{}", gc.stdout);
    assert_eq!(test.entries("model").len(), 1);
    let bytes = fs_err::read(test.path("reports/model-runs.png")).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");

    let unknown = test.expect(&["metrics", "modle"], 2);
    assert!(unknown.stderr.starts_with("error: no target or stage named `modle`"), "{}", unknown.stderr);
    assert!(unknown.stderr.contains("did you mean `model`?"), "{}", unknown.stderr);
    let unbuilt = test.expect(&["metrics", "samples"], 1);
    assert!(unbuilt.stderr.starts_with("error: stage `samples` has no output yet"), "{}", unbuilt.stderr);
}
