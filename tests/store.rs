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

/// A link in `$OUT` is refused, not followed: its target keeps its mode, nothing is published
/// (issue F2).
#[test]
fn a_symbolic_link_in_out_is_refused_and_its_target_left_alone() {
    let test = Test::with_pipeline(&format!("stages:\n{}", stage("linky", "ln -s \"$PWD/target.txt\" $OUT/x.txt")));
    test.write("target.txt", "mine\n");
    let output = test.expect(&["run", "linky"], 1);
    assert_eq!(
        test.redact(&output.stderr),
        "\
[1/1] linky  running  (never run)
[1/1] linky  failed   `$OUT/x.txt` is a symbolic link: outputs must be regular files and folders (copy what a link points to)
      log: artifacts/linky/.partial-[KEY]/log.txt
error: 1 stage failed: `linky`
ran 0, cached 0 in [TIME]
"
    );
    let mode = fs_err::metadata(test.path("target.txt")).unwrap().permissions().mode();
    assert_ne!(mode & 0o200, 0, "the target is still writable");
    assert!(test.entries("linky").is_empty());
}

/// A named pipe in `$OUT` fails the stage at once instead of hanging the publisher (issue F3).
#[test]
fn a_named_pipe_in_out_fails_the_stage_instead_of_hanging() {
    let test = Test::with_pipeline(&format!("stages:\n{}", stage("piped", "mkdir $OUT/sub; mkfifo $OUT/sub/progress")));
    let child = test.spawn(&["run", "piped"]);
    let started = std::time::Instant::now();
    let output = child.wait_with_output().unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("failed   `$OUT/sub/progress` is a named pipe: outputs must be regular files"), "{stderr}");
    assert!(test.entries("piped").is_empty());
}

/// A manifest that does not parse is a damaged output, like a missing one: `status` says so,
/// `verify` reports it and every other stage, `run` repairs it (issue F6).
#[test]
fn a_corrupt_manifest_is_damage_that_run_repairs() {
    let test = pipeline();
    test.expect(&["run", "b"], 0);
    test.runs();
    tamper(&test, "artifacts/a/current/../manifest.json", "{ not json");
    assert_eq!(
        test.expect(&["status"], 0).stdout,
        "a  stale    output damaged: `manifest.json` does not parse\nb  waiting  on `a`\n"
    );
    let output = test.expect(&["verify"], 1);
    assert_eq!(
        test.redact(&output.stdout),
        "a  damaged  `manifest.json` does not parse\nb  ok       artifacts/b/[KEY]/out\n"
    );
    test.expect(&["run", "b"], 0);
    assert_eq!(test.runs(), ["a"]);
    test.expect(&["verify"], 0);
}

/// `current` copied into a real folder (`cp -rL`, `rsync -L`) is damage: `status` and `verify`
/// say so and `run` puts the link back, leaving nothing behind (issue F8).
#[test]
fn a_current_that_is_a_folder_is_damage_that_run_repairs() {
    let test = pipeline();
    test.expect(&["run", "a"], 0);
    test.runs();
    let current = test.path("artifacts/a/current");
    let copy = test.path("copy");
    std::process::Command::new("cp").arg("-rL").arg(&current).arg(&copy).status().unwrap();
    fs_err::remove_file(&current).unwrap();
    fs_err::rename(&copy, &current).unwrap();
    assert_eq!(
        test.expect(&["status", "a"], 0).stdout,
        "a  stale    output damaged: `current` is a copy, not a link (stored: restores without running)\n"
    );
    assert_eq!(test.expect(&["verify", "a"], 1).stdout, "a  damaged  `current` is a copy, not a link\n");
    test.expect(&["run", "a"], 0);
    assert_eq!(test.runs(), Vec::<String>::new(), "restored from the store, not run");
    assert!(fs_err::symlink_metadata(&current).unwrap().file_type().is_symlink());
    let leftovers: Vec<String> = fs_err::read_dir(test.path("artifacts/a"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with(".current") || name.starts_with(".trash"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    test.expect(&["verify", "a"], 0);
}

/// A file added to a published output is damage to `status` and `run` as it is to `verify`:
/// the two agree, and `run` repairs it (issue F9).
#[test]
fn a_stray_file_in_an_output_is_repaired_by_run() {
    let test = pipeline();
    test.expect(&["run", "a"], 0);
    test.runs();
    let out = test.path("artifacts/a/current");
    let mut permissions = fs_err::metadata(&out).unwrap().permissions();
    permissions.set_mode(0o755);
    fs_err::set_permissions(&out, permissions).unwrap();
    test.write("artifacts/a/current/stray.txt", "hi\n");
    assert_eq!(test.expect(&["verify", "a"], 1).stdout, "a  damaged  `stray.txt` is not in the manifest\n");
    assert_eq!(test.expect(&["status", "a"], 0).stdout, "a  stale    output `stray.txt` is not in the manifest\n");
    test.expect(&["run", "a"], 0);
    assert_eq!(test.runs(), ["a"]);
    assert!(!test.path("artifacts/a/current/stray.txt").exists());
    test.expect(&["verify", "a"], 0);
}
