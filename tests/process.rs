//! Stages as processes: output streaming, failures, parallelism, signals and concurrent runs.

use crate::{Test, alive, signal, stage, wait_until};

#[test]
fn output_is_streamed_with_a_prefix_and_kept_in_log_txt() {
    let test =
        Test::with_pipeline(&format!("stages:\n{}", stage("talk", "echo to-stdout; echo to-stderr >&2; touch $OUT/x")));
    let output = test.expect(&["run", "talk"], 0);
    // The two streams are read apart, so their lines may come in either order.
    let mut lines: Vec<String> = test.redact(&output.stderr).lines().map(str::to_string).collect();
    lines[1..3].sort();
    assert_eq!(
        lines,
        [
            "[1/1] talk  running  (never run)",
            "[talk] to-stderr",
            "[talk] to-stdout",
            "[1/1] talk  done     [TIME]  artifacts/talk/[KEY]/out",
            "ran 1, cached 0 in [TIME]",
        ]
    );
    let mut log: Vec<String> = test.read("artifacts/talk/current/../log.txt").lines().map(str::to_string).collect();
    log.sort();
    assert_eq!(log, ["to-stderr", "to-stdout"]);
    // -q hides stage output and status lines.
    test.expect(&["run", "talk", "--force", "talk", "-q"], 0);
    assert_eq!(test.run(&["run", "talk", "-q"]).stderr, "");
}

#[test]
fn a_failing_stage_exits_1_stops_its_dependents_and_keeps_its_siblings() {
    let yaml = format!(
        "stages:\n{}{}{}{}targets:\n  all: [after, sibling]\n",
        stage("bad", "echo about to fail >&2; exit 3"),
        stage("after", "cat ${bad}/x > $OUT/y"),
        stage("sibling", "echo ok > $OUT/ok.txt"),
        stage("unrelated", "true"),
    );
    let test = Test::with_pipeline(&yaml);
    let output = test.expect(&["run", "all"], 1);
    assert_eq!(test.runs(), ["bad", "sibling"]);
    assert_eq!(
        test.redact(&output.stderr),
        "\
[1/3] bad        running  (never run)
[bad] about to fail
[1/3] bad        failed   exit status 1: command exited with status 3
      log: artifacts/bad/.partial-[KEY]/log.txt
[2/3] after      skipped  (`bad` did not finish)
[3/3] sibling    running  (never run)
[3/3] sibling    done     [TIME]  artifacts/sibling/[KEY]/out
error: 1 stage failed: `bad`; not run because of it: `after`
ran 1, cached 0 in [TIME]
"
    );
    // With -j 2 the sibling runs beside the failing stage, and finishes all the same.
    test.expect(&["run", "all", "-j", "2"], 1);
    assert_eq!(test.runs(), ["bad"]);
    assert_eq!(test.read("artifacts/sibling/current/ok.txt"), "ok\n");
    assert!(test.entries("bad").is_empty());
    // The failed run's log is kept for reading.
    let partial = std::fs::read_dir(test.path("artifacts/bad")).unwrap().next().unwrap().unwrap().path();
    assert!(fs_err::read_to_string(partial.join("log.txt")).unwrap().contains("about to fail"));
}

#[test]
fn missing_declared_outs_fail_the_stage() {
    let test = Test::with_pipeline("stages:\n  a:\n    kind: command\n    run: touch $OUT/one\n    outs: [one, two]\n");
    let output = test.expect(&["run", "a"], 1);
    assert_eq!(
        test.redact(&output.stderr),
        "\
[1/1] a  running  (never run)
[1/1] a  failed   exit status 1: command did not write its declared outs: two
      log: artifacts/a/.partial-[KEY]/log.txt
error: 1 stage failed: `a`
ran 0, cached 0 in [TIME]
"
    );
    assert!(test.entries("a").is_empty());
}

#[test]
fn jobs_run_independent_stages_at_once() {
    // Each stage waits for the other to start: only a parallel run finishes.
    let yaml = format!(
        "stages:\n{}{}targets:\n  both: [left, right]\n",
        stage("left", "touch left.started; while [ ! -f right.started ]; do sleep 0.02; done"),
        stage("right", "touch right.started; while [ ! -f left.started ]; do sleep 0.02; done"),
    );
    let test = Test::with_pipeline(&yaml);
    test.expect(&["run", "both", "-j", "2"], 0);
}

/// A stage that, while `slow` exists, writes its shell's pid and sleeps.
fn sleeper() -> Test {
    let test = Test::with_pipeline(&format!(
        "stages:\n{}",
        stage("nap", "if [ -f slow ]; then echo $$ > pid; sleep 30; fi\n      echo rested > $OUT/x.txt")
    ));
    test.write("slow", "");
    test
}

#[test]
fn a_stage_killed_with_sigkill_publishes_nothing_and_runs_next_time() {
    let test = sleeper();
    let child = test.spawn(&["run", "nap"]);
    let pid: i32 = test.wait_for_file("pid").trim().parse().unwrap();
    signal(pid, libc::SIGKILL);
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        test.redact(&String::from_utf8_lossy(&output.stderr)),
        "\
[1/1] nap  running  (never run)
[1/1] nap  failed   exit status 1: command was killed by a signal (signal: 9 (SIGKILL))
      log: artifacts/nap/.partial-[KEY]/log.txt
error: 1 stage failed: `nap`
ran 0, cached 0 in [TIME]
"
    );
    assert!(test.entries("nap").is_empty());
    assert!(!test.path("artifacts/nap/current").exists());

    fs_err::remove_file(test.path("slow")).unwrap();
    test.runs();
    test.expect(&["run", "nap"], 0);
    assert_eq!(test.runs(), ["nap"]);
    assert_eq!(test.read("artifacts/nap/current/x.txt"), "rested\n");
}

#[test]
fn killing_nanoflow_with_sigkill_takes_its_stages_down_and_publishes_nothing() {
    let test = sleeper();
    let mut child = test.spawn(&["run", "nap"]);
    let pid: i32 = test.wait_for_file("pid").trim().parse().unwrap();
    signal(child.id() as i32, libc::SIGKILL);
    child.wait().unwrap();
    wait_until(|| !alive(pid));
    assert!(test.entries("nap").is_empty());
    fs_err::remove_file(test.path("slow")).unwrap();
    test.runs();
    test.expect(&["run", "nap"], 0);
    assert_eq!(test.runs(), ["nap"]);
}

#[test]
fn sigterm_stops_the_stages_exits_130_and_publishes_nothing() {
    let test = sleeper();
    let child = test.spawn(&["run", "nap"]);
    let pid: i32 = test.wait_for_file("pid").trim().parse().unwrap();
    signal(child.id() as i32, libc::SIGTERM);
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130));
    // Whether the stage's own last words get out before nanoflow stops is a race.
    let stderr = test
        .redact(&String::from_utf8_lossy(&output.stderr))
        .replace("[nap] error: command was killed by a signal (signal: 15 (SIGTERM))\n", "");
    assert_eq!(
        stderr,
        "\
[1/1] nap  running  (never run)
[1/1] nap  stopped  (interrupted; nothing published)
stopped: nothing half-done was published; `nanoflow run nap` goes on where this run stopped
"
    );
    wait_until(|| !alive(pid));
    assert!(test.entries("nap").is_empty());
}

#[test]
fn two_concurrent_runs_on_one_store_run_each_stage_once() {
    let yaml = format!(
        "stages:\n{}{}{}targets:\n  all: [c]\n",
        stage("a", "sleep 0.3; echo a > $OUT/a"),
        stage("b", "sleep 0.3; cat ${a}/a > $OUT/b"),
        stage("c", "sleep 0.3; cat ${b}/b > $OUT/c"),
    );
    let test = Test::with_pipeline(&yaml);
    let first = test.spawn(&["run", "all"]);
    let second = test.spawn(&["run", "all"]);
    for child in [first, second] {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    assert_eq!(test.runs(), ["a", "b", "c"]);
    assert_eq!(test.entries("c").len(), 1);
    assert_eq!(test.read("artifacts/c/current/c"), "a\n");
    test.expect(&["run", "all"], 0);
    assert_eq!(test.runs(), Vec::<String>::new());
}

#[test]
fn gc_refuses_while_a_run_holds_the_store() {
    let test = sleeper();
    let child = test.spawn(&["run", "nap"]);
    let pid: i32 = test.wait_for_file("pid").trim().parse().unwrap();
    let output = test.expect(&["gc"], 1);
    assert!(output.stderr.starts_with("error: another nanoflow process is using the store at `"), "{}", output.stderr);
    signal(pid, libc::SIGKILL);
    child.wait_with_output().unwrap();
    test.expect(&["gc"], 0);
}

#[test]
fn a_background_job_of_a_stage_does_not_outlive_it() {
    // Without the group kill, the job kept the output pipe open and `run` waited for it.
    let test = Test::with_pipeline(&format!(
        "stages:\n{}",
        stage("bg", "(sleep 0.5; touch late) &\n      echo done > $OUT/x")
    ));
    test.expect(&["run", "bg"], 0);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(!test.path("late").exists());
}
