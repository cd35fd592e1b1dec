//! The Slurm executor against a real Slurm: `scripts/slurm-up` starts a one-machine cluster
//! (`.ci/run` does, and sets `NANOFLOW_REQUIRE_SLURM=1`); elsewhere the tests that need one say
//! they skipped. The test folders live on this machine's filesystem, which the cluster's one node
//! shares, as a cluster's nodes share a store.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Test, signal};

/// Whether a Slurm answers here; fails where one is required.
fn slurm() -> bool {
    let up = Command::new("sinfo").args(["--noheader", "--responding"]).output();
    let up = up.is_ok_and(|output| output.status.success() && !output.stdout.is_empty());
    if !up {
        assert!(
            std::env::var_os("NANOFLOW_REQUIRE_SLURM").is_none(),
            "NANOFLOW_REQUIRE_SLURM is set, but no Slurm answers (start one with scripts/slurm-up)"
        );
        eprintln!("skipped: no Slurm answers here (scripts/slurm-up starts one)");
    }
    up
}

/// Waits up to two minutes (a job waits in the queue) for `condition`.
fn wait_long(what: &str, condition: impl Fn() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < Duration::from_secs(120), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The job ids a run printed, in order.
fn job_ids(stderr: &str) -> Vec<String> {
    stderr.lines().filter_map(|line| Some(line.split_once("submitted as Slurm job ")?.1.trim().to_string())).collect()
}

/// `JobName` and `JobState` of job `id`, as slurmctld has them.
fn job(id: &str) -> (String, String) {
    let output = Command::new("scontrol").args(["show", "job", "--oneliner", id]).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let field = |name: &str| {
        text.split_whitespace().find_map(|word| word.strip_prefix(&format!("{name}="))).unwrap_or_default().to_string()
    };
    (field("JobName"), field("JobState"))
}

/// `JobName` and `State` of finished job `id`, as `sacct` lists it: from the accounting database,
/// or where there is none (as with `scripts/slurm-up`) from the job completion log.
fn sacct(id: &str) -> (String, String) {
    for completion in [&[][..], &["--completion"][..]] {
        let output = Command::new("sacct")
            .args(["--noheader", "--parsable2", "--allocations", "--format=JobName,State", "--jobs", id])
            .args(completion)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        if let Some((name, state)) = text.lines().last().and_then(|line| line.split_once('|')) {
            return (name.to_string(), state.to_string());
        }
    }
    panic!("sacct does not list job {id}");
}

/// The id of the job running `stage` now, once it is submitted.
fn running_job(test: &Test, stage: &str) -> String {
    let dir = test.path(&format!("artifacts/{stage}"));
    let id = || {
        let entries = fs_err::read_dir(&dir).ok()?;
        entries.flatten().find_map(|entry| fs_err::read_to_string(entry.path().join("job/job-id")).ok())
    };
    wait_long("the job's id", || id().is_some());
    id().unwrap()
}

fn digest(test: &Test, stage: &str) -> String {
    let manifest = test.read(&format!("artifacts/{stage}/current/../manifest.json"));
    let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    manifest["output_digest"].as_str().unwrap().to_string()
}

#[test]
fn ci_runs_as_one_slurm_job_per_stage_and_makes_what_the_local_executor_makes() {
    if !slurm() {
        return;
    }
    let cluster = Test::with_repo_pipeline();
    let output = cluster.expect(&["run", "ci", "--executor", "slurm"], 0);
    let ran: Vec<&str> = output
        .stderr
        .lines()
        .filter(|line| line.contains("  running  ("))
        .filter_map(|line| line.split_whitespace().nth(1))
        .collect();
    assert!(ran.len() >= 10, "{}", output.stderr);
    // One job per stage that ran, each named after it and finished.
    let mut jobs: Vec<String> = job_ids(&output.stderr)
        .iter()
        .map(|id| {
            let (name, state) = sacct(id);
            assert_eq!(state, "COMPLETED", "job {id} ({name})");
            name.trim_start_matches("nanoflow:").to_string()
        })
        .collect();
    let mut expected: Vec<String> = ran.iter().map(|stage| stage.to_string()).collect();
    jobs.sort();
    expected.sort();
    assert_eq!(jobs, expected);

    let local = Test::with_repo_pipeline();
    local.expect(&["run", "ci"], 0);
    for stage in &expected {
        assert_eq!(digest(&cluster, stage), digest(&local, stage), "`{stage}` differs from the local executor's");
    }

    let again = cluster.expect(&["run", "ci", "--executor", "slurm"], 0);
    assert!(job_ids(&again.stderr).is_empty(), "{}", again.stderr);
    assert!(again.stderr.contains("ran 0, cached 12"), "{}", again.stderr);
}

#[test]
fn a_two_task_train_job_warned_before_its_end_checkpoints_and_resumes_to_an_uninterrupted_runs_losses() {
    if !slurm() {
        return;
    }
    let cluster =
        Test::with_pipeline(&(crate::train::ranks_pipeline(1500, 1, 2) + "    resources: {tasks_per_node: 2}\n"));
    cluster.write("corpus.txt", include_str!("../data/ci/corpus.txt"));
    let child = cluster.spawn(&["run", "model", "--executor", "slurm"]);
    let id = running_job(&cluster, "model");
    // Past the first evaluation, the warning Slurm sends before a job's end (`--signal`).
    let log = || {
        let dir = cluster.path("artifacts/model");
        let entries = fs_err::read_dir(dir).into_iter().flatten().flatten();
        entries.filter_map(|entry| fs_err::read_to_string(entry.path().join("log.txt")).ok()).collect::<String>()
    };
    wait_long("the first evaluation", || log().contains("step 0:"));
    let sent = Command::new("scancel").args(["--signal=USR1", &id]).status().unwrap();
    assert!(sent.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("data parallel: 2 ranks, 1 on this machine (machine 1 of 2)"), "{stderr}");
    assert!(stderr.contains("stopping on a signal; the checkpoint holds every step so far"), "{stderr}");
    assert!(stderr.contains(&format!("Slurm job {id} stopped before its end with a checkpoint; submitting it again")));
    assert!(stderr.contains("[model] resuming from `"), "{stderr}");
    assert_eq!(stderr.matches("[model] submitted as Slurm job ").count(), 2, "{stderr}");

    // The same world of two ranks, uninterrupted, on this machine.
    let local = Test::with_pipeline(&crate::train::ranks_pipeline(1500, 2, 2));
    local.write("corpus.txt", include_str!("../data/ci/corpus.txt"));
    local.expect(&["run", "model"], 0);
    for file in ["metrics.parquet", "ckpt.safetensors", "last.safetensors"] {
        let path = format!("artifacts/model/current/{file}");
        assert!(
            fs_err::read(cluster.path(&path)).unwrap() == fs_err::read(local.path(&path)).unwrap(),
            "{file} differs from an uninterrupted run's"
        );
    }
}

#[test]
fn status_shows_the_job_scancel_fails_the_stage_and_ctrl_c_cancels_the_job() {
    if !slurm() {
        return;
    }
    let test = Test::with_pipeline("stages:\n  slow:\n    kind: command\n    run: sleep 300; touch $OUT/done\n");
    let child = test.spawn(&["run", "slow", "--executor", "slurm"]);
    let id = running_job(&test, "slow");
    wait_long("the job to run", || job(&id).1 == "RUNNING");
    let status = test.expect(&["status", "slow"], 0);
    assert!(status.stdout.starts_with(&format!("slow  running  as Slurm job {id}: RUNNING on ")), "{}", status.stdout);
    assert!(Command::new("scancel").arg(&id).status().unwrap().success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("slow  failed   Slurm job {id} was cancelled (`scancel`)")), "{stderr}");
    assert!(test.entries("slow").is_empty());

    // Ctrl-C of `nanoflow run` cancels the job it submitted.
    let child = test.spawn(&["run", "slow", "--executor", "slurm"]);
    let id = running_job(&test, "slow");
    wait_long("the job to run", || job(&id).1 == "RUNNING");
    signal(child.id() as i32, libc::SIGINT);
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("slow  stopped  (interrupted; nothing published)"), "{stderr}");
    assert_eq!(job(&id).1, "CANCELLED");
    assert!(test.entries("slow").is_empty());
}

#[test]
fn a_job_slurm_refuses_fails_its_stage_with_slurms_reason() {
    if !slurm() {
        return;
    }
    let test = Test::with_pipeline(
        "stages:\n  hello:\n    kind: command\n    run: echo hi > $OUT/hi.txt\n    resources: {partition: nope}\n",
    );
    let output = test.expect(&["run", "hello", "--executor", "slurm"], 1);
    assert!(
        output.stderr.contains("[1/1] hello  failed   Slurm refused the job: invalid partition specified: nope"),
        "{}",
        output.stderr
    );
}

#[test]
fn without_sbatch_the_slurm_executor_says_what_to_do_before_anything_runs() {
    let test =
        Test::with_pipeline("executor: slurm\nstages:\n  hello:\n    kind: command\n    run: echo hi > $OUT/hi.txt\n");
    let output = test.run_with_path(&["run", "hello"], "/nonexistent");
    assert_eq!(output.code, 2, "{}", output.stderr);
    assert!(output.stderr.contains("`sbatch` is not on PATH"), "{}", output.stderr);
    assert!(output.stderr.contains("scripts/slurm-up"), "{}", output.stderr);
    assert!(!test.path("artifacts/hello").exists());
}

#[test]
fn bad_resources_exit_2_naming_the_file_the_stage_and_the_key() {
    let test = Test::with_pipeline(
        "stages:\n  hello:\n    kind: command\n    run: echo hi > $OUT/hi.txt\n    resources: {gpus: 2, time: soon}\n",
    );
    let output = test.expect(&["run", "hello"], 2);
    assert!(
        output
            .stderr
            .contains("invalid `resources.time` in stage `hello` at pipeline.yaml:5:5: `soon` is not a Slurm time"),
        "{}",
        output.stderr
    );
    test.write(
        "pipeline.yaml",
        "stages:\n  hello:\n    kind: command\n    run: echo hi\n    resources: {tasks_per_node: 2}\n",
    );
    let output = test.expect(&["status"], 2);
    assert!(
        output
            .stderr
            .contains("invalid `resources` in stage `hello` at pipeline.yaml:5:5: a command stage runs as one task"),
        "{}",
        output.stderr
    );
    test.write("pipeline.yaml", "executor: slurrm\nstages:\n  hello:\n    kind: command\n    run: echo hi\n");
    let output = test.expect(&["status"], 2);
    assert!(
        output.stderr.contains("invalid `executor` at pipeline.yaml:1:1: expected one of local, slurm"),
        "{}",
        output.stderr
    );
    test.write("pipeline.yaml", "resources: {gpu: 1}\nstages:\n  hello:\n    kind: command\n    run: echo hi\n");
    let output = test.expect(&["status"], 2);
    assert!(output.stderr.contains("unknown key `gpu` (did you mean `gpus`?)"), "{}", output.stderr);
}

/// A store shared by machines over NFS, where `flock` may not reach across them: another
/// machine's nanoflow holding a key's lease keeps this one waiting, and `status` says it runs.
#[test]
fn another_machines_lease_on_a_key_keeps_the_stage_waiting_until_it_is_released() {
    let test = Test::with_pipeline("stages:\n  hello:\n    kind: command\n    run: echo hi > $OUT/hi.txt; exit 3\n");
    test.expect(&["run", "hello"], 1);
    let locks = test.path("artifacts/.nanoflow/locks");
    let lock = fs_err::read_dir(&locks)
        .unwrap()
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.file_name().unwrap().to_string_lossy().starts_with("hello-"));
    let lease = lock.unwrap().with_extension("lease");
    fs_err::write(&lease, r#"{"host":"login2","pid":1}"#).unwrap();
    assert_eq!(test.expect(&["status", "hello"], 0).stdout, "hello  running  in another nanoflow process\n");
    let mut child = test.spawn(&["run", "hello"]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(child.try_wait().unwrap().is_none(), "it waits for the lease");
    fs_err::remove_file(&lease).unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Who holds it, where, and the file (issue 28, item 10).
    let name = lease.file_name().unwrap().to_string_lossy().into_owned();
    let line = format!(
        "waiting for another nanoflow process running `hello`: pid 1 on login2 (lease `artifacts/.nanoflow/locks/{name}`)"
    );
    assert!(stderr.contains(&line), "{stderr}");
    assert_eq!(output.status.code(), Some(1), "{stderr}");
}

#[test]
fn a_job_whose_nanoflow_was_killed_is_followed_by_the_next_run_not_run_twice() {
    if !slurm() {
        return;
    }
    let test =
        Test::with_pipeline("stages:\n  slow:\n    kind: command\n    run: echo $SLURM_JOB_ID > $OUT/job; sleep 6\n");
    let mut child = test.spawn(&["run", "slow", "--executor", "slurm"]);
    let id = running_job(&test, "slow");
    wait_long("the job to run", || job(&id).1 == "RUNNING");
    signal(child.id() as i32, libc::SIGKILL);
    child.wait().unwrap();
    let output = test.expect(&["run", "slow", "--executor", "slurm"], 0);
    assert!(
        output.stderr.contains(&format!("[slow] following Slurm job {id}, which an earlier nanoflow submitted")),
        "{}",
        output.stderr
    );
    assert!(job_ids(&output.stderr).is_empty(), "{}", output.stderr);
    assert_eq!(test.read("artifacts/slow/current/job").trim(), id);
}

/// Issue 28, item 1: the job outlives its nanoflow and completes before the next run, which
/// publishes that job's output instead of submitting the stage again.
#[test]
fn a_job_that_finished_while_its_nanoflow_was_away_is_published_not_run_again() {
    if !slurm() {
        return;
    }
    let test = Test::with_pipeline(
        "stages:\n  slow:\n    kind: command\n    run: echo $SLURM_JOB_ID >> ran.txt; sleep 4; echo $SLURM_JOB_ID > $OUT/job\n",
    );
    let mut child = test.spawn(&["run", "slow", "--executor", "slurm"]);
    let id = running_job(&test, "slow");
    wait_long("the job to run", || job(&id).1 == "RUNNING");
    signal(child.id() as i32, libc::SIGKILL);
    child.wait().unwrap();
    wait_long("the job to complete", || job(&id).1 == "COMPLETED");
    let output = test.expect(&["run", "slow", "--executor", "slurm"], 0);
    let line = format!(
        "[slow] Slurm job {id}, which an earlier nanoflow submitted, ended while nanoflow was away; taking up its output"
    );
    assert!(output.stderr.contains(&line), "{}", output.stderr);
    assert!(job_ids(&output.stderr).is_empty(), "{}", output.stderr);
    assert_eq!(test.read("ran.txt").lines().collect::<Vec<_>>(), [id.as_str()], "the script ran once");
    assert_eq!(test.read("artifacts/slow/current/job").trim(), id);
    test.expect(&["verify", "slow"], 0);
}

/// A job that failed while its nanoflow was away is not taken up: the next run submits the
/// stage again (a command stage starts over).
#[test]
fn a_job_that_failed_while_its_nanoflow_was_away_is_run_again() {
    if !slurm() {
        return;
    }
    let test = Test::with_pipeline(
        "stages:\n  flaky:\n    kind: command\n    run: echo $SLURM_JOB_ID >> ran.txt; sleep 3; test -e ok; echo done > $OUT/x\n",
    );
    let mut child = test.spawn(&["run", "flaky", "--executor", "slurm"]);
    let id = running_job(&test, "flaky");
    wait_long("the job to run", || job(&id).1 == "RUNNING");
    signal(child.id() as i32, libc::SIGKILL);
    child.wait().unwrap();
    wait_long("the job to fail", || job(&id).1 == "FAILED");
    test.write("ok", "");
    let output = test.expect(&["run", "flaky", "--executor", "slurm"], 0);
    assert_eq!(job_ids(&output.stderr).len(), 1, "{}", output.stderr);
    assert_eq!(test.read("ran.txt").lines().count(), 2);
}

/// Issue 28, item 11: by default `sbatch` hands the job the submitter's environment (and slurmctld
/// keeps it in its state directory); the README's `--export` recipe keeps a secret out of both.
#[test]
fn the_readmes_export_recipe_keeps_a_secret_out_of_the_job_and_slurms_state() {
    if !slurm() {
        return;
    }
    const SECRET: &str = "nanoflow-test-secret-4f1c9a";
    let stage = "  env:\n    kind: command\n    run: env > $OUT/env.txt; sleep 3\n";
    // slurmctld's files of job `id` (`StateSaveLocation/hash.<id % 10>/job.<id>/environment`).
    let state_holds_secret = |id: &str| {
        let dir = format!("/var/spool/slurmctld/hash.{}/job.{id}", id.parse::<u64>().unwrap() % 10);
        let output = Command::new("grep").args(["-rqa", SECRET, &dir]).output().unwrap();
        output.status.success()
    };
    for recipe in [false, true] {
        let resources = if recipe { "resources: {sbatch: [\"--export=PATH,HOME\"]}\n" } else { "" };
        let test = Test::with_pipeline(&format!("{resources}stages:\n{stage}"));
        let mut child = test.command(&["run", "env", "--executor", "slurm"]);
        let mut child = child.env("NANOFLOW_TEST_TOKEN", SECRET).stderr(std::process::Stdio::piped()).spawn().unwrap();
        let id = running_job(&test, "env");
        // While the job exists, slurmctld holds its environment (where this test may read it).
        let readable = fs_err::read_dir("/var/spool/slurmctld").is_ok();
        let held = readable && state_holds_secret(&id);
        assert!(child.wait().unwrap().success(), "job {id}");
        let env = test.read("artifacts/env/current/env.txt");
        assert_eq!(env.contains(SECRET), !recipe, "recipe {recipe}: the job's environment");
        if readable {
            assert_eq!(held, !recipe, "recipe {recipe}: Slurm's state directory");
        }
        assert!(env.contains("SLURM_JOB_ID="), "{env}");
    }
}
