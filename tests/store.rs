//! The store: layout, manifests, `verify`, `gc`, `show`.

use std::os::unix::fs::PermissionsExt;

use crate::{Test, stage};

fn pipeline() -> Test {
    Test::with_pipeline(&format!(
        "stages:\n{}{}",
        stage("a", "mkdir $OUT/sub; echo one > $OUT/sub/a.txt"),
        stage("b", "cat ${a}/sub/a.txt > $OUT/b.txt")
    ))
}

#[test]
fn an_entry_holds_outputs_log_and_a_manifest() {
    let test = pipeline();
    test.expect(&["run", "b"], 0);
    let manifest: serde_json::Value = serde_json::from_str(&test.read("artifacts/b/current/../manifest.json")).unwrap();
    assert_eq!(manifest["stage"], "b");
    assert_eq!(manifest["kind"], "command");
    assert_eq!(manifest["exit_status"], 0);
    assert_eq!(manifest["key"].as_str().unwrap().len(), 64);
    assert_eq!(manifest["params"]["run"], "echo b >> runs.log\ncat ${a}/sub/a.txt > $OUT/b.txt\n");
    let a_digest = serde_json::from_str::<serde_json::Value>(&test.read("artifacts/a/current/../manifest.json"))
        .unwrap()["output_digest"]
        .clone();
    assert_eq!(manifest["inputs"]["a"], a_digest);
    assert_eq!(manifest["outputs"]["b.txt"]["digest"], blake3::hash(b"one\n").to_hex().as_str());
    assert_eq!(manifest["outputs"]["b.txt"]["size"], 4);
    for key in ["started_at", "finished_at", "duration_s", "host", "nanoflow_version", "config"] {
        assert!(!manifest[key].is_null(), "manifest lacks `{key}`");
    }
    // The config the child ran with has the reference replaced by a path in the store.
    assert!(manifest["config"]["run"].as_str().unwrap().contains("/artifacts/a/"));
    // Outputs are read-only once published.
    let mode = fs_err::metadata(test.path("artifacts/b/current/b.txt")).unwrap().permissions().mode();
    assert_eq!(mode & 0o222, 0);
}

fn tamper(test: &Test, relative: &str, contents: &str) {
    let path = test.path(relative);
    let mut permissions = fs_err::metadata(&path).unwrap().permissions();
    permissions.set_mode(0o644);
    fs_err::set_permissions(&path, permissions).unwrap();
    fs_err::write(&path, contents).unwrap();
}

#[test]
fn verify_reports_a_tampered_output_and_run_repairs_it() {
    let test = pipeline();
    test.expect(&["run", "b"], 0);
    test.runs();
    let output = test.expect(&["verify"], 0);
    assert_eq!(test.redact(&output.stdout), "a  ok       artifacts/a/[KEY]/out\nb  ok       artifacts/b/[KEY]/out\n");
    assert_eq!(output.stderr, "");

    tamper(&test, "artifacts/a/current/sub/a.txt", "two\n");
    let output = test.expect(&["verify"], 1);
    assert_eq!(test.redact(&output.stdout), "a  damaged  `sub/a.txt` changed\nb  ok       artifacts/b/[KEY]/out\n");
    assert_eq!(output.stderr, "error: damaged output in `a`; `nanoflow run` runs them again\n");
    let status = test.expect(&["status"], 0);
    assert_eq!(status.stdout, "a  stale    output `sub/a.txt` changed\nb  waiting  on `a`\n");

    // Same-size tampering is caught even though the size matches (the stat cache notices
    // the new mtime and re-reads the file).
    test.expect(&["run", "b"], 0);
    assert_eq!(test.runs(), ["a"]);
    assert_eq!(test.read("artifacts/a/current/sub/a.txt"), "one\n");
    test.expect(&["verify"], 0);
}

#[test]
fn gc_removes_entries_no_current_points_to() {
    let test = pipeline();
    test.expect(&["run", "b"], 0);
    test.expect(&["run", "b", "--set", "a.run=mkdir $OUT/sub; echo two > $OUT/sub/a.txt"], 0);
    assert_eq!(test.entries("a").len(), 2);
    let dry = test.expect(&["gc", "--dry-run"], 0);
    assert_eq!(dry.stdout.lines().count(), 2, "{}", dry.stdout);
    assert!(dry.stderr.contains("would remove 2 entries"), "{}", dry.stderr);
    assert_eq!(test.entries("a").len(), 2);
    let output = test.expect(&["gc"], 0);
    assert!(output.stderr.contains("removed 2 entries"), "{}", output.stderr);
    assert_eq!(test.entries("a").len(), 1);
    assert_eq!(test.entries("b").len(), 1);
    // What is current still works.
    test.runs();
    test.expect(&["run", "b", "--set", "a.run=mkdir $OUT/sub; echo two > $OUT/sub/a.txt"], 0);
    assert_eq!(test.runs(), Vec::<String>::new());
}

#[test]
fn show_prints_the_current_path_and_manifest() {
    let test = pipeline();
    assert_eq!(
        test.expect(&["show", "a"], 1).stderr,
        "error: stage `a` has no output yet\n\nhint: run it with `nanoflow run a`\n"
    );
    test.expect(&["run", "a"], 0);
    let output = test.expect(&["show", "a"], 0);
    let mut lines = output.stdout.lines();
    let path = lines.next().unwrap();
    assert!(path.starts_with("artifacts/a/") && test.path(path).join("sub/a.txt").exists(), "{path}");
    let manifest: serde_json::Value = serde_json::from_str(&lines.collect::<Vec<_>>().join("\n")).unwrap();
    assert_eq!(manifest["stage"], "a");
    test.expect(&["show", "nope"], 2);
}
