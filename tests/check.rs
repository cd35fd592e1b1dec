//! Every param a kind can judge from pipeline.yaml and `--set` alone is judged before any stage
//! runs: exit 2, the file, line and column (or the `--set` argument), the stage and the key, and
//! nothing run or stored. One case per rule.

use crate::Test;

/// A pipeline with a stage of every kind that trains or reads a model, over a command stage that
/// would log its run.
const PIPELINE: &str = "\
stages:
  text:
    kind: command
    run: |
      echo text >> runs.log
      printf 'To be, or not to be\\n' > $OUT/input.txt
  fetched:
    kind: download
    path: corpus.txt
  tokens:
    kind: tokenize
    input: ${text}
    tokenizer: char
  model:
    kind: train
    data: ${tokens}
    n_layer: 1
    n_head: 2
    n_embd: 16
    block_size: 8
    batch_size: 2
    gradient_accumulation_steps: 2
    max_iters: 2
    eval_interval: 1
    eval_iters: 1
    device: cpu
  tuned:
    kind: finetune
    data: ${tokens}
    init_from: ${model}
  samples:
    kind: sample
    model: ${model}
    temperature: -1
  scores:
    kind: eval
    models: [gpt2, '${model}']
    data: ${tokens}
  exported:
    kind: export
    model: ${model}
targets:
  all: [tuned, samples, scores, exported]
";

/// `nanoflow run all` with `sets`, on PIPELINE with `edit` applied: exit 2, no stage ran, nothing
/// stored; the stderr.
fn refused(edit: (&str, &str), sets: &[&str]) -> String {
    let test = Test::with_pipeline(&PIPELINE.replace(edit.0, edit.1));
    test.write("corpus.txt", "To be\n");
    let mut args = vec!["run", "all"];
    for set in sets {
        args.extend(["--set", set]);
    }
    let output = test.expect(&args, 2);
    assert_eq!(test.runs(), Vec::<String>::new(), "a stage ran");
    assert!(!test.path("artifacts").exists() || test.entries("text").is_empty(), "something was stored");
    output.stderr
}

/// `--set` on the pipeline with `samples.temperature` made valid.
fn with_set(set: &str) -> String {
    refused(("    temperature: -1\n", ""), &[set])
}

#[test]
fn a_bad_sample_temperature_in_the_file_points_at_its_line() {
    assert_eq!(
        refused(("", ""), &[]),
        "error: invalid `temperature` in stage `samples` at pipeline.yaml:34:5: must be 0 (greedy) or more, not -1\n"
    );
}

#[test]
fn train_shape() {
    assert_eq!(
        with_set("model.n_head=3"),
        "error: invalid `n_head` in stage `model` in `--set model.n_head=3`: must divide `n_embd` (16), and 3 does \
         not: each head attends over n_embd / n_head of it\n"
    );
    for key in ["block_size", "n_layer", "n_embd", "n_head"] {
        assert_eq!(
            with_set(&format!("model.{key}=0")),
            format!("error: invalid `{key}` in stage `model` in `--set model.{key}=0`: must be at least 1, not 0\n")
        );
    }
}

#[test]
fn train_counts() {
    for key in ["batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"] {
        assert_eq!(
            with_set(&format!("model.{key}=0")),
            format!("error: invalid `{key}` in stage `model` in `--set model.{key}=0`: must be at least 1, not 0\n")
        );
    }
}

#[test]
fn train_optimizer() {
    assert_eq!(
        with_set("model.dropout=1.5"),
        "error: invalid `dropout` in stage `model` in `--set model.dropout=1.5`: must be at least 0 and below 1, \
         not 1.5\n"
    );
    assert_eq!(
        with_set("model.learning_rate=-1"),
        "error: invalid `learning_rate` in stage `model` in `--set model.learning_rate=-1`: must be 0 or more, not -1\n"
    );
    assert_eq!(
        with_set("model.beta1=2.0"),
        "error: invalid `beta1` in stage `model` in `--set model.beta1=2.0`: must be at least 0 and below 1, not 2\n"
    );
}

#[test]
fn train_devices_and_ranks() {
    assert_eq!(
        with_set("model.gpus=0"),
        "error: invalid `gpus` in stage `model` in `--set model.gpus=0`: must be at least 1, or `auto`\n"
    );
    assert_eq!(
        with_set("model.gpus=3"),
        "error: invalid `gpus` in stage `model` in `--set model.gpus=3`: must divide `gradient_accumulation_steps` \
         (2), and 3 does not: each rank takes an equal share of a step's micro-batches (nanoGPT divides it by the \
         world size the same way)\n"
    );
    assert_eq!(
        with_set("model.device=tpu"),
        "error: invalid `device` in stage `model` in `--set model.device=tpu`: is `tpu`; use auto, cpu, cuda or \
         cuda:N\n"
    );
    assert_eq!(
        with_set("model.dtype=float8"),
        "error: invalid `dtype` in stage `model` in `--set model.dtype=float8`: is `float8`; use auto, bfloat16, \
         float16 or float32\n"
    );
}

#[test]
fn finetune_needs_weights() {
    assert_eq!(
        with_set("tuned.init_from=scratch"),
        "error: missing key `init_from` in stage `tuned` at pipeline.yaml:27:3\n\nhint: `init_from` is a GPT-2 name \
         (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a train stage's output (ckpt.json) or a Hugging Face GPT-2 \
         folder (config.json); finetuning from scratch is `kind: train`\n"
    );
    assert_eq!(
        with_set("tuned.learning_rate=-0.1"),
        "error: invalid `learning_rate` in stage `tuned` in `--set tuned.learning_rate=-0.1`: must be 0 or more, \
         not -0.1\n"
    );
}

#[test]
fn tokenize_eval_and_sample_counts() {
    assert_eq!(
        with_set("tokens.shard_tokens=0"),
        "error: invalid `shard_tokens` in stage `tokens` in `--set tokens.shard_tokens=0`: must be at least 1, not 0\n"
    );
    for key in ["batch_size", "eval_iters"] {
        assert_eq!(
            with_set(&format!("scores.{key}=0")),
            format!("error: invalid `{key}` in stage `scores` in `--set scores.{key}=0`: must be at least 1, not 0\n")
        );
    }
    assert_eq!(
        with_set("samples.num_samples=0"),
        "error: invalid `num_samples` in stage `samples` in `--set samples.num_samples=0`: must be at least 1, not 0\n"
    );
}

#[test]
fn eval_needs_models_and_something_to_measure() {
    assert_eq!(
        with_set("scores.models=[]"),
        "error: missing key `models` in stage `scores` at pipeline.yaml:34:3\n\nhint: `models` is a list of models, \
         each a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), a train stage's output (ckpt.json) or a \
         Hugging Face GPT-2 folder (config.json)\n"
    );
    assert_eq!(
        with_set("scores.data=''"),
        "error: invalid params in stage `scores` at pipeline.yaml:34:3: nothing to measure: set `data` (a tokenize \
         stage's output) for losses, `hellaswag` for HellaSwag, or both\n"
    );
}

#[test]
fn references_to_the_wrong_kind_of_stage() {
    assert_eq!(
        with_set("scores.models=[gpt2, '${tokens}']"),
        "error: invalid `models[1]` in stage `scores` in `--set scores.models=[gpt2, '${tokens}']`: must be a model \
         (the output of a train, finetune, export or download stage), but `${tokens}` is the output of a tokenize \
         stage\n"
    );
    assert_eq!(
        with_set("samples.model=${tokens}"),
        "error: invalid `model` in stage `samples` in `--set samples.model=${tokens}`: must be a model (the output \
         of a train, finetune, export or download stage), but `${tokens}` is the output of a tokenize stage\n"
    );
    assert_eq!(
        with_set("exported.model=${tokens}"),
        "error: invalid `model` in stage `exported` in `--set exported.model=${tokens}`: must be a model (the output \
         of a train, finetune, export or download stage), but `${tokens}` is the output of a tokenize stage\n"
    );
    assert_eq!(
        with_set("model.data=${fetched}"),
        "error: invalid `data` in stage `model` in `--set model.data=${fetched}`: must be a tokenize stage's output, \
         but `${fetched}` is the output of a download stage\n"
    );
}

/// A param outside the key is checked like any other, also when its stage is stored and the
/// stage is not even part of the run.
#[test]
fn params_outside_the_key_are_checked_while_cached() {
    let test = Test::with_pipeline(&PIPELINE.replace("    temperature: -1\n", ""));
    test.write("corpus.txt", "To be\n");
    test.expect(&["run", "text"], 0);
    assert_eq!(test.runs(), ["text"]);
    let output = test.expect(&["run", "text", "--set", "model.log_interval=0"], 2);
    assert_eq!(
        output.stderr,
        "error: invalid `log_interval` in stage `model` in `--set model.log_interval=0`: must be at least 1, not 0\n"
    );
    assert_eq!(test.runs(), Vec::<String>::new());
    test.expect(&["run", "text"], 0);
    assert_eq!(test.runs(), Vec::<String>::new(), "still cached");
}

#[test]
fn an_empty_pipeline_is_an_error() {
    for text in ["", "# nothing yet\n", "stages:\n", "stages: {}\ntargets: {}\n"] {
        let test = Test::with_pipeline(text);
        assert_eq!(
            test.expect(&["status"], 2).stderr,
            "error: `pipeline.yaml` declares no stages\n\nhint: a pipeline is a `stages:` mapping, e.g. `stages: \
             {hello: {kind: command, run: 'echo hi > $OUT/hi.txt'}}`\n",
            "{text:?}"
        );
    }
}

#[test]
fn command_outs_stay_inside_out() {
    for (out, key) in [("/etc/passwd", "outs[0]"), ("../../x", "outs[0]")] {
        let test =
            Test::with_pipeline(&format!("stages:\n  a:\n    kind: command\n    run: 'true'\n    outs: ['{out}']\n"));
        assert_eq!(
            test.expect(&["run", "a"], 2).stderr,
            format!(
                "error: invalid `{key}` in stage `a` at pipeline.yaml:5:5: must be a path inside `$OUT`, not `{out}`\n"
            )
        );
    }
}

#[test]
fn nanoflow_sample_checks_its_arguments() {
    let test = Test::with_pipeline(&PIPELINE.replace("    temperature: -1\n", ""));
    test.write("corpus.txt", "To be\n");
    assert_eq!(
        test.expect(&["sample", "nosuch"], 2).stderr,
        "error: no stage, model folder or Hub GPT-2 named `nosuch`\n\nhint: a model is a stage of pipeline.yaml, a \
         folder holding ckpt.json or config.json, or gpt2, gpt2-medium, gpt2-large, gpt2-xl\n"
    );
    assert_eq!(
        test.expect(&["sample", "modle"], 2).stderr,
        "error: no stage, model folder or Hub GPT-2 named `modle`\n\nhint: did you mean `model`?\n"
    );
    assert_eq!(
        test.expect(&["sample", "gpt2", "--temperature=-1"], 2).stderr,
        "error: invalid `--temperature`: must be 0 (greedy) or more, not -1\n"
    );
    assert_eq!(
        test.expect(&["sample", "gpt2", "--num-samples", "0"], 2).stderr,
        "error: invalid `--num-samples`: must be at least 1, not 0\n"
    );
    assert_eq!(test.runs(), Vec::<String>::new());
}

#[test]
fn deps_stay_inside_the_project() {
    for dep in ["/etc/hostname", "../../../etc/passwd"] {
        let test =
            Test::with_pipeline(&format!("stages:\n  a:\n    kind: command\n    run: 'true'\n    deps: ['{dep}']\n"));
        assert_eq!(
            test.expect(&["run", "a"], 2).stderr,
            format!(
                "error: invalid `deps` in stage `a` at pipeline.yaml:5:12: `{dep}` is outside the pipeline's folder; deps \
                 are files of the project\n"
            )
        );
    }
}
