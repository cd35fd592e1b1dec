//! Every way a pipeline can be wrong gets one clear error with its place, and exit code 2.

use crate::Test;

fn error(yaml: &str) -> String {
    let test = Test::with_pipeline(yaml);
    test.write("exists.txt", "");
    let output = test.expect(&["status"], 2);
    assert_eq!(output.stdout, "");
    output.stderr
}

#[test]
fn yaml_syntax() {
    assert_eq!(
        error("stages:\n  a: {kind: command, run: 'x'\n"),
        "error: invalid YAML at pipeline.yaml:2:6: this `{` is not closed (while parsing a flow mapping, did not find \
         expected ',' or '}' at line 3)\n"
    );
}

#[test]
fn unknown_kind() {
    assert_eq!(
        error("stages:\n  a:\n    kind: comand\n    run: x\n"),
        "error: unknown kind `comand` in stage `a` at pipeline.yaml:3:11\n\nhint: did you mean `command`?\n"
    );
}

#[test]
fn unknown_key_with_a_suggestion() {
    assert_eq!(
        error("stages:\n  a:\n    kind: command\n    rn: x\n"),
        "error: unknown key `rn` in stage `a` at pipeline.yaml:4:5\n\nhint: did you mean `run`?\n"
    );
    assert_eq!(
        error("stagse:\n  a: {kind: command, run: x}\n"),
        "error: unknown key `stagse` at the top level of `pipeline.yaml` at pipeline.yaml:1:1\n\nhint: did you mean `stages`?\n"
    );
}

#[test]
fn reference_to_a_missing_stage() {
    assert_eq!(
        error(
            "stages:\n  train:\n    kind: command\n    run: cat ${tokenise}/x\n  tokenize: {kind: command, run: x}\n"
        ),
        "error: stage `train` refers to unknown stage `tokenise` at pipeline.yaml:4:5\n\nhint: did you mean `tokenize`?\n"
    );
}

#[test]
fn cycle_printed_as_a_path() {
    assert_eq!(
        error("stages:\n  a: {kind: command, run: 'cat ${b}'}\n  b: {kind: command, run: 'cat ${a}'}\n"),
        "error: cycle in the stage graph: a -> b -> a (stage `a` at pipeline.yaml:2:3)\n"
    );
}

#[test]
fn duplicate_stage_names() {
    assert_eq!(
        error("stages:\n  a: {kind: command, run: x}\n  b: {kind: command, run: x}\n  a: {kind: command, run: y}\n"),
        "error: duplicate stage `a` at pipeline.yaml:4:3 (first at pipeline.yaml:2:3)\n"
    );
}

#[test]
fn missing_deps_file() {
    assert_eq!(
        error("stages:\n  a:\n    kind: command\n    run: x\n    deps: [exists.txt, missing.txt]\n"),
        "error: `deps` path `missing.txt` of stage `a` does not exist at pipeline.yaml:5:24\n"
    );
}

#[test]
fn wrong_type() {
    assert_eq!(
        error("stages:\n  a:\n    kind: command\n    run: x\n    outs: 3\n"),
        "error: wrong type for `outs` in stage `a` at pipeline.yaml:5:11: invalid type: integer `3`, expected a sequence\n"
    );
    assert_eq!(
        error("stages:\n  a:\n    kind: command\n    run: x\n    deps: {a: 1}\n"),
        "error: `deps` of stage `a` must be a string or a list of strings at pipeline.yaml:5:11\n"
    );
}

#[test]
fn missing_required_key_and_kind() {
    assert_eq!(
        error("stages:\n  a:\n    kind: command\n"),
        "error: missing key `run` in stage `a` at pipeline.yaml:2:3\n\nhint: `run` is the shell script to run, with \
         `$OUT` the folder it writes into\n"
    );
    assert_eq!(error("stages:\n  a:\n    run: x\n"), "error: stage `a` has no `kind` at pipeline.yaml:2:3\n");
}

#[test]
fn errors_in_config_files_name_that_file() {
    let test = Test::with_pipeline("stages:\n  a:\n    kind: command\n    config: configs/a.yaml\n");
    test.write("configs/a.yaml", "# comment\nrun: x\nout: [y]\n");
    let output = test.expect(&["status"], 2);
    assert_eq!(
        output.stderr,
        "error: unknown key `out` in stage `a` at configs/a.yaml:3:1\n\nhint: did you mean `outs`?\n"
    );
    test.write("pipeline.yaml", "stages:\n  a:\n    kind: command\n    config: configs/b.yaml\n");
    assert_eq!(
        test.expect(&["status"], 2).stderr,
        "error: `config` file `configs/b.yaml` of stage `a` does not exist at pipeline.yaml:4:13\n"
    );
}

#[test]
fn bad_targets_names_and_arguments() {
    assert_eq!(
        error("stages:\n  a: {kind: command, run: x}\ntargets:\n  all: [a, bb]\n"),
        "error: target `all` names unknown stage `bb` at pipeline.yaml:4:12\n"
    );
    assert_eq!(
        error("stages:\n  a/b: {kind: command, run: x}\n"),
        "error: invalid stage name `a/b` at pipeline.yaml:2:3: use letters, digits, `-` and `_`\n"
    );
    let test = Test::with_pipeline("stages:\n  a: {kind: command, run: x}\ntargets:\n  all: [a]\n");
    assert_eq!(
        test.expect(&["run"], 2).stderr,
        "error: no target or stage given\n\nhint: targets in this pipeline: all\n"
    );
    assert_eq!(
        test.expect(&["run", "al"], 2).stderr,
        "error: no target or stage named `al`\n\nhint: did you mean `all`?\n"
    );
    assert_eq!(
        test.expect(&["run", "all", "--set", "a.run"], 2).stderr,
        "error: invalid `--set a.run`: no `=`\n\nhint: write it as `--set stage.key=value`\n"
    );
    assert_eq!(
        test.expect(&["run", "all", "--set", "a.rn=1"], 2).stderr,
        "error: unknown key `rn` in stage `a` in `--set a.rn=1`\n\nhint: did you mean `run`?\n"
    );
    test.expect(&["run", "all", "-j", "0"], 2);
    test.expect(&["run", "all", "--frobnicate"], 2);
}

#[test]
fn a_bad_pipeline_loses_nothing_in_the_store() {
    let test = Test::with_pipeline("stages:\n  a: {kind: command, run: 'echo 1 > $OUT/x'}\n");
    test.expect(&["run", "a"], 0);
    test.write("pipeline.yaml", "stages:\n  a: {kind: command, run: 'echo 2 > $OUT/x', bogus: 1}\n");
    test.expect(&["run", "a"], 2);
    assert_eq!(test.read("artifacts/a/current/x"), "1\n");
}

#[test]
fn no_pipeline_file() {
    let test = Test::new();
    let output = test.expect(&["status"], 2);
    assert!(output.stderr.starts_with("error: no `pipeline.yaml` in `"), "{}", output.stderr);
    assert!(
        output.stderr.ends_with("or any parent directory\n\nhint: pass another file with `-f FILE`\n"),
        "{}",
        output.stderr
    );
}

#[test]
fn a_kind_checks_its_params_while_the_pipeline_is_read() {
    assert_eq!(
        error("stages:\n  t:\n    kind: tokenize\n    tokenizer: char\n"),
        "error: missing key `input` in stage `t` at pipeline.yaml:2:3\n\nhint: `input` is the text to tokenize: a \
         file, a folder or `${download-stage}`\n"
    );
    assert_eq!(
        error("stages:\n  t:\n    kind: tokenize\n    input: exists.txt\n    tokenizer: bytes\n"),
        "error: wrong type for `tokenizer` in stage `t` at pipeline.yaml:5:16: unknown variant `bytes`, expected `char` or `gpt2`\n"
    );
    assert_eq!(
        error("stages:\n  d:\n    kind: download\n    url: https://example.com/a\n    path: exists.txt\n"),
        "error: invalid params in stage `d` at pipeline.yaml:2:3: a download takes only one of `url`, `hf` and `path`\n"
    );
    assert_eq!(
        error("stages:\n  d:\n    kind: download\n    path: nope.txt\n"),
        "error: local input `nope.txt` of stage `d` does not exist at pipeline.yaml:4:5\n"
    );
}

/// Issue 29: `--set shakespeare-model.…` suggested `shakespeare-text` (as few edits away).
#[test]
fn a_set_of_an_unknown_stage_suggests_the_one_holding_every_word() {
    let test = Test::with_repo_pipeline();
    let output = test.expect(&["status", "--set", "shakespeare-model.learning_rate=1e-3"], 2);
    assert_eq!(
        output.stderr,
        "error: invalid `--set shakespeare-model.learning_rate=1e-3`: no stage `shakespeare-model`\n\nhint: did you \
         mean `--set shakespeare-char-model.learning_rate=1e-3`?\n"
    );
}

/// Issue 29: `max_iters: lots` said "expected usize" and pointed at the key.
#[test]
fn an_integer_param_wants_a_whole_number_and_points_at_the_value() {
    let pipeline =
        |value: &str| format!("stages:\n  m:\n    kind: train\n    data: exists.txt\n    max_iters: {value}\n");
    assert_eq!(
        error(&pipeline("lots")),
        "error: wrong type for `max_iters` in stage `m` at pipeline.yaml:5:16: expected a whole number, not `lots`\n"
    );
    assert_eq!(
        error(&pipeline("2.5")),
        "error: wrong type for `max_iters` in stage `m` at pipeline.yaml:5:16: expected a whole number, not `2.5`\n"
    );
    assert_eq!(
        error(&pipeline("-5")),
        "error: wrong type for `max_iters` in stage `m` at pipeline.yaml:5:16: expected a whole number, not `-5`\n"
    );
    assert_eq!(
        error("stages:\n  d:\n    kind: download\n    url: https://a/b\n    retries: 5000000000\n"),
        "error: wrong type for `retries` in stage `d` at pipeline.yaml:5:14: expected a whole number up to \
         4294967295, not `5000000000`\n"
    );
    let test = Test::with_pipeline(&pipeline("1000"));
    test.write("exists.txt", "");
    assert_eq!(
        test.expect(&["status", "--set", "m.max_iters=2.5"], 2).stderr,
        "error: wrong type for `max_iters` in stage `m` in `--set m.max_iters=2.5`: expected a whole number, not `2.5`\n"
    );
}

/// Issue 29: `--set …max_iters=1e3` was refused as a float. A whole float is the integer it is:
/// the same key as writing it out.
#[test]
fn a_whole_float_is_read_as_an_integer() {
    let pipeline = |value: &str| {
        format!(
            "stages:\n  text:\n    kind: download\n    path: corpus.txt\n  chars:\n    kind: tokenize\n    \
             input: ${{text}}\n    tokenizer: char\n    shard_tokens: {value}\n"
        )
    };
    let test = Test::with_pipeline(&pipeline("1000"));
    test.write("corpus.txt", "to be or not to be\n");
    test.expect(&["run", "chars"], 0);
    let fresh = "text   fresh\nchars  fresh\n";
    assert_eq!(test.expect(&["status", "--set", "chars.shard_tokens=1e3"], 0).stdout, fresh);
    test.write("pipeline.yaml", &pipeline("1000.0"));
    assert_eq!(test.expect(&["status"], 0).stdout, fresh);
    let stale = "text   fresh\nchars  stale    param `shard_tokens` changed: 1000 -> 2000\n";
    assert_eq!(test.expect(&["status", "--set", "chars.shard_tokens=2e3"], 0).stdout, stale);
}
