//! Issue 28: nothing outside the store is touched by publishing a stage, and inputs the planner
//! cannot use (NaN params, a FIFO for a config, a dep leading out through a link, an unclosed
//! `${`) exit 2 before anything runs. Each test failed before its fix.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use crate::{Test, stage};

fn writable(test: &Test, relative: &str) -> bool {
    fs_err::metadata(test.path(relative)).unwrap().permissions().mode() & 0o200 != 0
}

/// Item 2: `$OUT` replaced by a link to a folder elsewhere is refused; that folder keeps its modes.
#[test]
fn out_replaced_by_a_symbolic_link_is_refused_and_its_target_left_alone() {
    let test = Test::with_pipeline(&format!("stages:\n{}", stage("sneaky", "rm -rf $OUT; ln -s \"$PWD/mine\" $OUT")));
    test.write("mine/data.txt", "mine\n");
    let output = test.expect(&["run", "sneaky"], 1);
    assert_eq!(
        test.redact(&output.stderr),
        "\
[1/1] sneaky  running  (never run)
[1/1] sneaky  failed   `$OUT` is a symbolic link, not a folder: a stage writes its outputs into the folder it is given
      log: artifacts/sneaky/.partial-[KEY]/log.txt
error: 1 stage failed: `sneaky`
ran 0, cached 0 in [TIME]
"
    );
    assert!(writable(&test, "mine/data.txt"), "the link's target is still writable");
    assert!(test.entries("sneaky").is_empty());
}

/// `$OUT` removed and not made again: a clear failure, not "No such file".
#[test]
fn out_removed_is_refused_by_name() {
    let test = Test::with_pipeline(&format!("stages:\n{}", stage("gone", "rm -rf $OUT")));
    let stderr = test.expect(&["run", "gone"], 1).stderr;
    assert!(stderr.contains("failed   `$OUT` is gone: the stage removed the folder it was given"), "{stderr}");
}

/// Item 3: an output hard-linked to a project file is stored as a copy of its own; the project's
/// file stays writable and keeps its one inode.
#[test]
fn a_hard_link_in_out_is_stored_as_a_copy_and_the_linked_file_left_alone() {
    let test = Test::with_pipeline(&format!("stages:\n{}", stage("linked", "ln corpus.txt $OUT/c.txt")));
    test.write("corpus.txt", "to be or not to be\n");
    test.expect(&["run", "linked"], 0);
    assert!(writable(&test, "corpus.txt"));
    let project = fs_err::metadata(test.path("corpus.txt")).unwrap();
    let stored = fs_err::metadata(test.path("artifacts/linked/current/c.txt")).unwrap();
    assert_eq!((project.nlink(), stored.nlink()), (1, 1));
    assert_ne!(project.ino(), stored.ino());
    assert_eq!(test.read("artifacts/linked/current/c.txt"), "to be or not to be\n");
    test.expect(&["verify", "linked"], 0);
}

/// Item 10: a name that is not UTF-8 is refused naming the rule, not as a missing file.
#[test]
fn a_name_that_is_not_utf8_is_refused_by_name() {
    let test = Test::with_pipeline(&format!("stages:\n{}", stage("odd", "touch $OUT/$(printf 'a\\377b')")));
    let stderr = test.expect(&["run", "odd"], 1).stderr;
    assert!(stderr.contains("has a name that is not UTF-8: output names must be UTF-8"), "{stderr}");
}

/// Item 4: NaN and infinities exit 2 naming the key, file and line, in the pipeline, in a config
/// file and on the command line, for float params of every kind.
#[test]
fn non_finite_numbers_are_refused_where_they_are_written() {
    let test = Test::with_repo_pipeline();
    let pipeline = test.read("pipeline.yaml");
    test.write("pipeline.yaml", &pipeline.replacen("val_fraction: 0.1 ", "val_fraction: .nan", 1));
    let stderr = test.expect(&["run", "shakespeare-char", "-n"], 2).stderr;
    assert!(stderr.starts_with("error: invalid `val_fraction` in stage `"), "{stderr}");
    assert!(stderr.contains(": must be a finite number, not `.nan`\n"), "{stderr}");
    assert!(stderr.contains("at pipeline.yaml:"), "{stderr}");
    test.write("pipeline.yaml", &pipeline);

    let config = test.read("configs/train_shakespeare_char_cpu.yaml");
    test.write("configs/train_shakespeare_char_cpu.yaml", &format!("{config}\nweight_decay: .inf\n"));
    let stderr = test.expect(&["run", "shakespeare-char", "-n"], 2).stderr;
    assert!(stderr.contains("invalid `weight_decay` in stage `shakespeare-char-model`"), "{stderr}");
    assert!(stderr.contains("at configs/train_shakespeare_char_cpu.yaml:"), "{stderr}");
    assert!(stderr.contains("must be a finite number, not `.inf`"), "{stderr}");
    test.write("configs/train_shakespeare_char_cpu.yaml", &config);

    let stderr = test.expect(&["run", "ci", "-n", "--set", "ci-char-samples.temperature=-.inf"], 2).stderr;
    assert_eq!(
        stderr,
        "error: invalid `temperature` in stage `ci-char-samples` in `--set ci-char-samples.temperature=-.inf`: must be \
         a finite number, not `-.inf`\n"
    );
    assert!(!test.path("artifacts").exists(), "nothing ran");
}

/// Item 8: a `config:` or `deps:` entry that is a named pipe exits 2 at once (it hung the load).
#[test]
fn a_named_pipe_as_config_or_dep_exits_2_at_once() {
    let test = Test::with_pipeline("stages:\n  a:\n    kind: command\n    config: fifo\n");
    let made = std::process::Command::new("mkfifo").arg(test.path("fifo")).status().unwrap();
    assert!(made.success());
    let started = std::time::Instant::now();
    assert_eq!(
        test.expect(&["status"], 2).stderr,
        "error: invalid `config` in stage `a` at pipeline.yaml:4:13: `fifo` is a named pipe, not a regular file\n"
    );
    test.write("pipeline.yaml", "stages:\n  a:\n    kind: command\n    run: 'true'\n    deps: [fifo]\n");
    assert_eq!(
        test.expect(&["status"], 2).stderr,
        "error: invalid `deps` in stage `a` at pipeline.yaml:5:12: `fifo` is a named pipe, not a regular file or a \
         folder\n"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

/// Item 9: a dep inside the project as written that leads out of it through a link exits 2.
#[test]
fn a_dep_leading_outside_through_a_link_exits_2() {
    let test = Test::with_pipeline("stages:\n  a:\n    kind: command\n    run: 'true'\n    deps: [lnk]\n");
    std::os::unix::fs::symlink("/etc/hostname", test.path("lnk")).unwrap();
    assert_eq!(
        test.expect(&["status"], 2).stderr,
        "error: invalid `deps` in stage `a` at pipeline.yaml:5:12: `lnk` leads outside the pipeline's folder (to \
         `/etc/hostname`) through a symbolic link; deps are files of the project\n"
    );
    // A link that stays inside is fine.
    test.write("inside.txt", "x");
    fs_err::remove_file(test.path("lnk")).unwrap();
    std::os::unix::fs::symlink("inside.txt", test.path("lnk")).unwrap();
    test.expect(&["status"], 0);
}

/// Item 10: an unclosed `${` exits 2 at load instead of failing in the shell.
#[test]
fn an_unclosed_reference_exits_2_at_load() {
    let test = Test::with_pipeline(
        "stages:\n  a:\n    kind: command\n    run: cat ${b/x.txt\n  b: {kind: command, run: 'true'}\n",
    );
    assert_eq!(
        test.expect(&["run", "a"], 2).stderr,
        "error: invalid `run` in stage `a` at pipeline.yaml:4:5: a `${` is not closed: write `${stage}` for a stage's \
         output, `$${` for a literal `${`\n"
    );
}

/// Item 10: `gc -n` gives a leftover `.current-*` link its own size, not its target's; `gc`
/// removes the link and leaves the entry.
#[test]
fn gc_counts_a_leftover_current_link_as_a_link() {
    let test = Test::with_pipeline(&format!("stages:\n{}", stage("a", "head -c 100000 /dev/zero > $OUT/big")));
    test.expect(&["run", "a"], 0);
    let target = fs_err::read_link(test.path("artifacts/a/current")).unwrap();
    std::os::unix::fs::symlink(&target, test.path("artifacts/a/.current-123-0")).unwrap();
    let dry = test.expect(&["gc", "-n"], 0);
    let size = target.as_os_str().len();
    assert_eq!(dry.stdout, format!("artifacts/a/.current-123-0  {size} B\n"));
    test.expect(&["gc"], 0);
    assert!(!test.path("artifacts/a/.current-123-0").exists());
    test.expect(&["verify", "a"], 0);
}

/// Item 10: `nanoflow sample` of a stage that is not a model exits 2 with the reason first.
#[test]
fn sampling_a_tokenize_stage_exits_2_saying_why() {
    let test = Test::with_repo_pipeline();
    assert_eq!(
        test.expect(&["sample", "ci-char"], 2).stderr,
        "error: invalid `STAGE_OR_MODEL`: must be a model (the output of a train, finetune, export or download \
         stage), but `${ci-char}` is the output of a tokenize stage\n"
    );
}
