//! Issue 29, the first hour: what a newcomer reads in the terminal says what they need.

use crate::{Test, stage};

/// A bare `status` of a file with many pipelines shows the ones that were run, and a line for
/// each never run.
#[test]
fn bare_status_shows_the_pipelines_that_were_run_and_a_line_for_the_rest() {
    let test = Test::with_pipeline(&format!(
        "stages:\n{}{}{}{}targets:\n  mine: [b]\n  theirs: [d]\n  other: [c]\n",
        stage("a", "echo a > $OUT/a"),
        stage("b", "cat ${a}/a > $OUT/b"),
        stage("c", "echo c > $OUT/c"),
        stage("d", "cat ${c}/c > $OUT/d"),
    ));
    assert_eq!(
        test.expect(&["status"], 0).stdout,
        "never run:\n  mine    2 stages (`nanoflow status mine`)\n  theirs  2 stages (`nanoflow status theirs`)\n  other   1 stage (`nanoflow status other`)\n"
    );
    test.expect(&["run", "mine"], 0);
    assert_eq!(
        test.expect(&["status"], 0).stdout,
        "a  fresh\nb  fresh\n\nnever run:\n  theirs  2 stages (`nanoflow status theirs`)\n  other   1 stage (`nanoflow status other`)\n"
    );
    assert_eq!(test.expect(&["status", "theirs"], 0).stdout, "c  stale    never run\nd  waiting  on `c`\n");
}

/// No shipped target shares a stage's name, so `show`, `report` and `run` of a name mean one thing.
#[test]
fn no_shipped_target_is_also_a_stage() {
    let test = Test::with_repo_pipeline();
    let ls = test.expect(&["ls"], 0).stdout;
    let (targets, stages) = ls.split_once("stages:\n").unwrap();
    let name = |line: &str| line.split_whitespace().next().unwrap_or_default().to_string();
    let stages: Vec<String> = stages.lines().map(name).collect();
    for target in targets.lines().skip(1).map(name) {
        assert!(!stages.contains(&target), "`{target}` is both a target and a stage");
    }
}

/// On a terminal (a pty, through `script`), the lines printed above the live bars end with a
/// newline: a terminal log (`script`, asciinema) keeps them as lines, not one padded line.
#[test]
fn lines_on_a_terminal_end_with_newlines() {
    let test = Test::with_pipeline(&format!(
        "stages:\n{}",
        stage("a", "echo first line; sleep 0.3; echo second line; sleep 0.3; echo done > $OUT/x")
    ));
    let nanoflow = env!("CARGO_BIN_EXE_nanoflow");
    let typescript = test.path("typescript");
    let status = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &format!("{nanoflow} run a")])
        .arg(&typescript)
        .current_dir(test.path(""))
        .env("TERM", "xterm")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .status()
        .expect("script(1), from util-linux, runs");
    assert!(status.success());
    let log = String::from_utf8_lossy(&fs_err::read(&typescript).unwrap()).into_owned();
    for line in ["[a] first line", "[a] second line"] {
        assert!(log.contains(&format!("{line}\r\n")), "`{line}` ends with a newline:\n{log:?}");
    }
}
