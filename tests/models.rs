//! Models by Hub name (`init_from: gpt2`, `model: gpt2`, `nanoflow sample gpt2`) through a local
//! Hub (`HF_ENDPOINT`), and `nanoflow sample` on stage outputs. The "Hub GPT-2" is a tiny model
//! with GPT-2's vocabulary that nanoflow trains and exports in the test itself.

use nanoflow_test_support::{Route, Server};

use crate::{Output, Test};

const CORPUS: &str = include_str!("../data/ci/corpus.txt");

const TINY: &str = "stages:
  text: {kind: download, path: corpus.txt}
  tokens: {kind: tokenize, input: '${text}', tokenizer: gpt2}
  tiny:
    kind: train
    data: ${tokens}
    n_layer: 1
    n_head: 2
    n_embd: 8
    block_size: 16
    batch_size: 2
    gradient_accumulation_steps: 1
    max_iters: 2
    eval_interval: 2
    eval_iters: 1
    device: cpu
  tiny-export: {kind: export, model: '${tiny}'}
";

/// Stages that name the Hub's `gpt2`.
const FROM_THE_HUB: &str = "
  finetuned:
    kind: finetune
    data: ${tokens}
    init_from: gpt2
    block_size: 8
    batch_size: 2
    gradient_accumulation_steps: 1
    max_iters: 2
    eval_interval: 2
    eval_iters: 1
    device: cpu
  hub-samples:
    kind: sample
    model: gpt2
    start: 'ROMEO:'
    num_samples: 2
    max_new_tokens: 6
  table:
    kind: eval
    models: [gpt2, '${finetuned}']
    data: ${tokens}
    eval_iters: 2
    batch_size: 2
  never-run:
    kind: export
    model: ${finetuned}
  samples-of-it:
    kind: sample
    model: ${finetuned}
";

/// A local Hub serving `files` (name -> body) as `openai-community/gpt2`.
fn hub(files: &[(&str, Vec<u8>)]) -> Server {
    let server = Server::start();
    for (name, body) in files {
        let etag = format!("\"{}\"", blake3::hash(body).to_hex());
        let route = Route::new(body.clone())
            .header("ETag", &etag)
            .header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567");
        server.route(&format!("/openai-community/gpt2/resolve/main/{name}"), route);
    }
    server
}

fn with_hub(test: &Test, server: &Server, args: &[&str]) -> Output {
    let output = test
        .command(args)
        .env("HF_ENDPOINT", &server.url)
        .env("HF_HOME", test.path("hf"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .output()
        .expect("nanoflow starts");
    Output {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
fn hub_gpt2_finetunes_samples_and_evaluates_and_nanoflow_sample_prints() {
    let test = Test::with_pipeline(TINY);
    test.write("corpus.txt", CORPUS);
    test.expect(&["run", "tiny-export"], 0);
    let export = test.path("artifacts/tiny-export/current");
    let files: Vec<(&str, Vec<u8>)> = ["config.json", "model.safetensors"]
        .into_iter()
        .map(|name| (name, fs_err::read(export.join(name)).unwrap()))
        .collect();
    let server = hub(&files);

    test.write("pipeline.yaml", &format!("{TINY}{FROM_THE_HUB}"));
    let run = with_hub(&test, &server, &["run", "finetuned", "hub-samples", "table"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let fetched: Vec<String> = server.requests().into_iter().map(|request| request.path).collect();
    assert!(fetched.iter().any(|path| path.ends_with("/gpt2/resolve/main/model.safetensors")), "{fetched:?}");
    assert!(run.stderr.contains("gpt2 (openai-community/gpt2 on the Hub)"), "{}", run.stderr);
    let samples = test.read("artifacts/hub-samples/current/samples.txt");
    assert_eq!(samples.matches("---------------\n").count(), 2, "{samples}");
    assert!(samples.starts_with("ROMEO:"), "{samples}");
    let table = test.read("artifacts/table/current/results.md");
    assert!(table.contains("| gpt2 ") && table.contains("| finetuned "), "{table}");

    // The direct command: a Hub name, streamed to stdout; the same seed gives the same text.
    let args = ["sample", "gpt2", "ROMEO:", "--num-samples", "2", "--max-new-tokens", "5", "--seed", "7"];
    let first = with_hub(&test, &server, &args);
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(first.stdout.matches("\n---------------\n").count(), 2, "{}", first.stdout);
    assert!(first.stdout.starts_with("ROMEO:"), "{}", first.stdout);
    assert_eq!(with_hub(&test, &server, &args).stdout, first.stdout);
    // A stage's output by the stage's name.
    let finetuned = with_hub(&test, &server, &["sample", "finetuned", "--num-samples", "1", "--max-new-tokens", "3"]);
    assert_eq!(finetuned.code, 0, "{}", finetuned.stderr);
    assert_eq!(finetuned.stdout.matches("\n---------------\n").count(), 1, "{}", finetuned.stdout);
    // A stage that has not run yet has nothing to sample from.
    let never = with_hub(&test, &server, &["sample", "never-run"]);
    assert_eq!(never.code, 1, "{never:?}");
    assert!(never.stderr.contains("never-run") && never.stderr.contains("nanoflow run never-run"), "{}", never.stderr);
    // A stage that is not a model is refused for what it is, before anything loads.
    assert_eq!(
        with_hub(&test, &server, &["sample", "samples-of-it"]).stderr,
        "error: invalid `STAGE_OR_MODEL`: must be a model (the output of a train, finetune, export or download \
         stage), but `${samples-of-it}` is the output of a sample stage\n"
    );
}

#[test]
fn a_hub_model_that_is_not_there_names_the_stage_the_key_and_the_url() {
    let test = Test::with_pipeline(
        "stages:
  text: {kind: download, path: corpus.txt}
  tokens: {kind: tokenize, input: '${text}', tokenizer: gpt2}
  finetuned: {kind: finetune, data: '${tokens}', init_from: gpt2-medium, max_iters: 1, device: cpu}
",
    );
    test.write("corpus.txt", CORPUS);
    let server = hub(&[]);
    let run = with_hub(&test, &server, &["run", "finetuned"]);
    assert_ne!(run.code, 0);
    for needle in
        ["finetuned", "init_from", "gpt2-medium", "openai-community/gpt2-medium/resolve/main/config.json", "404"]
    {
        assert!(run.stderr.contains(needle), "{needle}\n{}", run.stderr);
    }
    assert_eq!(test.entries("tokens").len(), 1, "the stages before it are in the store");
}

#[test]
fn a_failing_stage_says_why_in_one_line_without_a_backtrace_unless_asked() {
    let test = Test::with_pipeline(
        "stages:\n  samples:\n    kind: sample\n    model: broken\n    num_samples: 1\n    max_new_tokens: 4\n    device: cpu\n",
    );
    test.write("broken/ckpt.json", "{\"format\": \"nanoflow-checkpoint\"");
    let mut command = test.command(&["run", "samples"]);
    command.env("RUST_BACKTRACE", "1");
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    // The substance is on the failure line, after the param it concerns.
    let failed = stderr.lines().find(|line| line.contains("failed   exit status 1: ")).unwrap();
    let (_, message) = failed.split_once("exit status 1: ").unwrap();
    assert!(message.starts_with("`model`: ") && message.len() > "`model`: ".len() + 10, "{stderr}");
    assert!(!stderr.contains("caused by") && !stderr.contains("backtrace"), "{stderr}");
    assert!(!stderr.lines().any(|line| line.trim_start().starts_with("0: ")), "{stderr}");

    // The environment a stage sees: RUST_BACKTRACE off, unless `-v` asks for backtraces.
    let test = Test::with_pipeline(&format!("stages:\n{}", crate::stage("bt", "echo \"$RUST_BACKTRACE\" > $OUT/bt")));
    for (flags, seen) in [(&[][..], "0\n"), (&["-v"][..], "1\n")] {
        let mut command = test.command(&[&["run", "bt", "--force", "bt"][..], flags].concat());
        command.env("RUST_BACKTRACE", "1");
        assert!(command.output().unwrap().status.success());
        assert_eq!(test.read("artifacts/bt/current/bt"), seen, "{flags:?}");
    }
}
