//! Integration tests: each runs the real `nanoflow` binary on a pipeline written into a fresh
//! temporary directory (just's `Test` builder). Stages append their name to `runs.log` in that
//! directory, so a test can see exactly which stages ran.

mod bench;
mod browser;
mod cache;
mod check;
mod cli;
mod data;
mod first_hour;
mod models;
mod offline;
mod outside;
mod preflight;
mod process;
mod readme;
mod report;
mod slurm;
mod store;
mod train;
mod validate;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Test {
    dir: tempfile::TempDir,
}

#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Default for Test {
    fn default() -> Test {
        Test::new()
    }
}

impl Test {
    pub fn new() -> Test {
        Test { dir: tempfile::tempdir().expect("a temporary directory") }
    }

    pub fn with_pipeline(yaml: &str) -> Test {
        let test = Test::new();
        test.write("pipeline.yaml", yaml);
        test
    }

    /// A fresh copy of the repo's pipeline.yaml with the configs and the data it ships.
    pub fn with_repo_pipeline() -> Test {
        let test = Test::new();
        let repo = env!("CARGO_MANIFEST_DIR");
        test.write("pipeline.yaml", &fs_err::read_to_string(format!("{repo}/pipeline.yaml")).unwrap());
        let configs = fs_err::read_dir(format!("{repo}/configs")).unwrap();
        let configs = configs.map(|entry| format!("configs/{}", entry.unwrap().file_name().to_string_lossy()));
        let data = ["data/tinyshakespeare/input.txt", "data/ci/corpus.txt", "data/ci/hellaswag.jsonl"];
        for file in configs.chain(data.map(String::from)) {
            test.write(&file, &fs_err::read_to_string(format!("{repo}/{file}")).unwrap());
        }
        test
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    pub fn write(&self, relative: &str, contents: &str) {
        let path = self.path(relative);
        fs_err::create_dir_all(path.parent().unwrap()).unwrap();
        fs_err::write(path, contents).unwrap();
    }

    pub fn read(&self, relative: &str) -> String {
        fs_err::read_to_string(self.path(relative)).unwrap()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nanoflow"));
        command.args(args).current_dir(self.dir.path()).env("NO_COLOR", "1");
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let output = self.command(args).output().expect("nanoflow starts");
        Output {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// `nanoflow ARGS` with `PATH` set to `path` (the commands it finds there, or not).
    pub fn run_with_path(&self, args: &[&str], path: &str) -> Output {
        let output = self.command(args).env("PATH", path).output().expect("nanoflow starts");
        Output {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// `nanoflow ARGS`, expecting exit code `code`.
    pub fn expect(&self, args: &[&str], code: i32) -> Output {
        let output = self.run(args);
        assert_eq!(
            output.code, code,
            "nanoflow {args:?}\n--- stdout\n{}\n--- stderr\n{}",
            output.stdout, output.stderr
        );
        output
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("nanoflow starts")
    }

    /// The stages that ran since the last call, in order (from `runs.log`), and clears it.
    pub fn runs(&self) -> Vec<String> {
        let path = self.path("runs.log");
        let runs = fs_err::read_to_string(&path).unwrap_or_default();
        let _ = fs_err::remove_file(&path);
        runs.lines().map(str::to_string).collect()
    }

    /// Published entries of `stage` (not partial, not `current`).
    pub fn entries(&self, stage: &str) -> Vec<String> {
        let dir = self.path(&format!("artifacts/{stage}"));
        let mut entries: Vec<String> = fs_err::read_dir(dir)
            .map(|entries| {
                entries.filter_map(Result::ok).map(|e| e.file_name().to_string_lossy().into_owned()).collect()
            })
            .unwrap_or_default();
        entries.retain(|name| !name.starts_with('.') && name != "current" && name != "history.jsonl");
        entries.sort();
        entries
    }

    /// `text` as a test can compare it whole: the test's folder as `[ROOT]`, store keys (16 hex
    /// digits after a `/` or `-`) as `[KEY]`, durations (`0.0s`, `12ms`) as `[TIME]`.
    pub fn redact(&self, text: &str) -> String {
        let text = text.replace(&self.dir.path().display().to_string(), "[ROOT]");
        let bytes = text.as_bytes();
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        while i < bytes.len() {
            let boundary = i == 0 || !bytes[i - 1].is_ascii_alphanumeric() && bytes[i - 1] != b'.';
            let hex = bytes[i..].iter().take_while(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()).count();
            if i > 0
                && matches!(bytes[i - 1], b'/' | b'-')
                && hex == 16
                && bytes.get(i + 16).is_none_or(|b| !b.is_ascii_alphanumeric())
            {
                out.push_str("[KEY]");
                i += 16;
                continue;
            }
            let number = bytes[i..].iter().take_while(|b| b.is_ascii_digit() || **b == b'.').count();
            if boundary && number > 0 && bytes[i].is_ascii_digit() {
                let unit = [&b"ms"[..], b"s"].into_iter().find(|unit| bytes[i + number..].starts_with(unit));
                if let Some(unit) = unit
                    && bytes.get(i + number + unit.len()).is_none_or(|b| !b.is_ascii_alphanumeric())
                {
                    out.push_str("[TIME]");
                    i += number + unit.len();
                    continue;
                }
            }
            let len = text[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&text[i..i + len]);
            i += len;
        }
        out
    }

    pub fn wait_for_file(&self, relative: &str) -> String {
        let path = self.path(relative);
        wait_until(|| path.exists() && !fs_err::read_to_string(&path).unwrap_or_default().is_empty());
        fs_err::read_to_string(path).unwrap()
    }
}

/// A stage that logs its run and writes `text` into `file` in its output.
pub fn stage(name: &str, run: &str) -> String {
    format!("  {name}:\n    kind: command\n    run: |\n      echo {name} >> runs.log\n      {run}\n")
}

pub fn wait_until(condition: impl Fn() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < Duration::from_secs(90), "timed out waiting");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

pub fn signal(pid: i32, signal: i32) {
    // SAFETY: sends a signal to a process this test started.
    unsafe { libc::kill(pid, signal) };
}
