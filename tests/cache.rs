//! What runs and what doesn't: the content key at work.

use crate::{Test, stage};

fn chain() -> String {
    format!(
        "stages:\n{}{}{}{}targets:\n  all: [c, side]\n",
        stage("a", "echo one > $OUT/a.txt"),
        stage("b", "cat ${a}/a.txt > $OUT/b.txt"),
        stage("c", "cat ${b}/b.txt > $OUT/c.txt"),
        stage("side", "echo side > $OUT/side.txt"),
    )
}

#[test]
fn second_run_runs_nothing() {
    let test = Test::with_pipeline(&chain());
    test.expect(&["run", "all"], 0);
    assert_eq!(test.runs(), ["a", "b", "c", "side"]);
    let output = test.expect(&["run", "all"], 0);
    assert_eq!(test.runs(), Vec::<String>::new());
    assert_eq!(
        test.redact(&output.stderr),
        "\
[1/4] a     cached   artifacts/a/[KEY]/out
[2/4] b     cached   artifacts/b/[KEY]/out
[3/4] c     cached   artifacts/c/[KEY]/out
[4/4] side  cached   artifacts/side/[KEY]/out
ran 0, cached 4 in [TIME]
"
    );
    assert_eq!(test.read("artifacts/c/current/c.txt"), "one\n");
}

#[test]
fn param_change_reruns_that_stage_and_its_dependents_only() {
    let test = Test::with_pipeline(&chain());
    test.expect(&["run", "all"], 0);
    test.runs();
    test.write("pipeline.yaml", &chain().replace("echo one", "echo two"));
    let output = test.expect(&["run", "all"], 0);
    assert_eq!(test.runs(), ["a", "b", "c"]);
    assert_eq!(
        test.redact(&output.stderr),
        r#"[1/4] a     running  (param `run` changed: "echo a >> runs.log\necho one > $OUT/a.… -> "echo a >> runs.log\necho two > $OUT/a.…)
[1/4] a     done     [TIME]  artifacts/a/[KEY]/out
[2/4] b     running  (input `a` changed)
[2/4] b     done     [TIME]  artifacts/b/[KEY]/out
[3/4] c     running  (input `b` changed)
[3/4] c     done     [TIME]  artifacts/c/[KEY]/out
[4/4] side  cached   artifacts/side/[KEY]/out
ran 3, cached 1 in [TIME]
"#
    );
    assert_eq!(test.read("artifacts/c/current/c.txt"), "two\n");
}

#[test]
fn comments_and_key_order_rerun_nothing() {
    let test = Test::with_pipeline(&chain());
    test.expect(&["run", "all"], 0);
    test.runs();
    let reordered = format!(
        "# the same pipeline, written differently\ntargets:\n  all: [c, side]   # a comment\nstages:\n  side: {{run: \"echo side >> runs.log\\necho side > $OUT/side.txt\\n\", kind: command}}\n{}{}{}",
        stage("c", "cat ${b}/b.txt > $OUT/c.txt"),
        stage("b", "cat ${a}/a.txt > $OUT/b.txt"),
        stage("a", "echo one > $OUT/a.txt"),
    );
    test.write("pipeline.yaml", &reordered);
    test.expect(&["run", "all"], 0);
    assert_eq!(test.runs(), Vec::<String>::new());
}

#[test]
fn reverting_a_param_restores_from_the_store_without_running() {
    let test = Test::with_pipeline(&chain());
    test.expect(&["run", "all"], 0);
    test.write("pipeline.yaml", &chain().replace("echo one", "echo two"));
    test.expect(&["run", "all"], 0);
    test.runs();
    test.write("pipeline.yaml", &chain());
    let status = test.expect(&["status"], 0);
    assert_eq!(
        status.stdout,
        r#"a     stale    param `run` changed: "echo a >> runs.log\necho two > $OUT/a.… -> "echo a >> runs.log\necho one > $OUT/a.… (stored: restores without running)
b     stale    input `a` changed (stored: restores without running)
c     stale    input `b` changed (stored: restores without running)
side  fresh
"#
    );
    let output = test.expect(&["run", "all"], 0);
    assert_eq!(test.runs(), Vec::<String>::new());
    assert_eq!(
        test.redact(&output.stderr),
        "\
[1/4] a     restored artifacts/a/[KEY]/out
[2/4] b     restored artifacts/b/[KEY]/out
[3/4] c     restored artifacts/c/[KEY]/out
[4/4] side  cached   artifacts/side/[KEY]/out
ran 0, cached 4 in [TIME]
"
    );
    assert_eq!(test.read("artifacts/c/current/c.txt"), "one\n");
}

#[test]
fn same_upstream_bytes_stop_the_rebuild_early_cutoff() {
    let test = Test::with_pipeline(&chain());
    test.expect(&["run", "all"], 0);
    test.runs();
    // A different command that writes the same bytes: `a` runs again, `b` and `c` do not.
    test.write("pipeline.yaml", &chain().replace("echo one > $OUT/a.txt", "printf 'one\\n' > $OUT/a.txt"));
    test.expect(&["run", "all"], 0);
    assert_eq!(test.runs(), ["a"]);
}

#[test]
fn deps_file_content_enters_the_key_and_touch_does_not() {
    let yaml = format!("stages:\n{}    deps: [scripts/make.sh]\n", stage("a", "sh scripts/make.sh > $OUT/a.txt"));
    let test = Test::with_pipeline(&yaml);
    test.write("scripts/make.sh", "echo v1\n");
    test.expect(&["run", "a"], 0);
    assert_eq!(test.runs(), ["a"]);
    // Same content, new mtime: nothing to do.
    test.write("scripts/make.sh", "echo v1\n");
    test.expect(&["run", "a"], 0);
    assert_eq!(test.runs(), Vec::<String>::new());
    test.write("scripts/make.sh", "echo v2\n");
    let status = test.expect(&["status"], 0);
    assert_eq!(status.stdout, "a  stale    file `scripts/make.sh` changed\n");
    test.expect(&["run", "a"], 0);
    assert_eq!(test.runs(), ["a"]);
    assert_eq!(test.read("artifacts/a/current/a.txt"), "v2\n");
}

#[test]
fn config_files_enter_the_key_and_stage_keys_override_them() {
    let yaml = "stages:\n  a:\n    kind: command\n    config: configs/a.yaml\n    outs: [x.txt]\n";
    let test = Test::with_pipeline(yaml);
    test.write(
        "configs/a.yaml",
        "# what to run\nrun: echo from-config > $OUT/x.txt; echo a >> runs.log\nouts: [other.txt]\n",
    );
    test.expect(&["run", "a"], 0);
    assert_eq!(test.read("artifacts/a/current/x.txt"), "from-config\n");
    test.write("configs/a.yaml", "run: echo changed > $OUT/x.txt; echo a >> runs.log\n");
    test.expect(&["run", "a"], 0);
    assert_eq!(test.read("artifacts/a/current/x.txt"), "changed\n");
}

#[test]
fn set_overrides_enter_the_key() {
    let test = Test::with_pipeline(&chain());
    test.expect(&["run", "c"], 0);
    test.runs();
    test.expect(&["run", "c", "--set", "a.run=echo a >> runs.log; echo three > $OUT/a.txt"], 0);
    assert_eq!(test.runs(), ["a", "b", "c"]);
    assert_eq!(test.read("artifacts/c/current/c.txt"), "three\n");
    // Back to the file's params: restored, not run.
    test.expect(&["run", "c"], 0);
    assert_eq!(test.runs(), Vec::<String>::new());
    assert_eq!(test.read("artifacts/c/current/c.txt"), "one\n");
}

#[test]
fn force_reruns_a_stored_stage() {
    let test = Test::with_pipeline(&chain());
    test.expect(&["run", "all"], 0);
    test.runs();
    test.expect(&["run", "all", "--force", "b"], 0);
    // `b` writes the same bytes again, so `c` is cut off.
    assert_eq!(test.runs(), ["b"]);
    test.expect(&["run", "side", "--force", "b"], 2);
}

#[test]
fn dry_run_says_what_would_run_and_runs_nothing() {
    let test = Test::with_pipeline(&chain());
    let output = test.expect(&["run", "-n", "all"], 0);
    assert_eq!(
        output.stdout,
        "a     run      never run\n\
         b     run      never run (after `a`)\n\
         c     run      never run (after `b`)\n\
         side  run      never run\n"
    );
    assert_eq!(test.runs(), Vec::<String>::new());
    assert!(!test.path("artifacts/a").exists());
    // Once they ran, a change upstream may leave them cached (early cutoff).
    test.expect(&["run", "all"], 0);
    let output = test.expect(&["run", "-n", "all", "--set", "a.run=echo a >> runs.log; echo 2 > $OUT/a"], 0);
    assert!(
        output.stdout.contains("b     run?     after `a` (skipped if its output comes out the same)\n"),
        "{}",
        output.stdout
    );
}
