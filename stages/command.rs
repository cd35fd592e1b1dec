//! `kind: command`: a make rule. A shell script runs in the pipeline's directory with `$OUT` set
//! to the stage's output directory; `${stage}` references in it were already replaced by the
//! engine with upstream output paths. It owns running the script and checking declared outputs;
//! it does not know why it runs (the engine decides that from the content key).

use std::collections::BTreeMap;
use std::process::Command;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{Context, Invalid, Report, Upstream, ensure, required};

/// Bumped when the meaning of a command stage changes (how the script is run), so that every
/// command stage's key changes with it.
pub const VERSION: u32 = 1;

/// Every param can change what the script does.
pub const NON_SEMANTIC: &[&str] = &[];
/// What each optional param means when it is unset (the report shows it as the default).
pub const UNSET: &[(&str, &str)] = &[];

/// A script that failed half-way starts again from an empty `$OUT`.
pub const RESUMABLE: bool = false;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The script, run by `sh -ec` (like a CI step: the first failing line fails the stage) in
    /// the directory holding pipeline.yaml, with `$OUT` the directory it must write into.
    pub run: String,
    /// Files or folders, relative to `$OUT`, that the script must produce; a run that leaves one
    /// out fails, and a stored output missing one is not a cache hit. Empty: anything goes.
    pub outs: Vec<String>,
    /// Extra environment variables for the script. They enter the key like any param.
    pub env: BTreeMap<String, String>,
}

/// A script's local files are named with `deps:` (the engine's key), not by params.
pub fn local_inputs(_config: &Config) -> Vec<String> {
    Vec::new()
}

/// Everything pipeline.yaml decides, before anything runs: a script, and outs inside `$OUT`.
pub fn check(config: &Config, _upstream: &Upstream) -> Result<(), Invalid> {
    required("run", &config.run, || "the shell script to run, with `$OUT` the folder it writes into".to_string())?;
    for (i, out) in config.outs.iter().enumerate() {
        ensure(crate::is_inside(out), &format!("outs[{i}]"), || format!("must be a path inside `$OUT`, not `{out}`"))?;
    }
    Ok(())
}

pub fn run(config: &Config, ctx: &Context) -> anyhow::Result<Report> {
    let status = Command::new("sh")
        .arg("-ec")
        .arg(&config.run)
        .current_dir(&ctx.root)
        .env("OUT", &ctx.out)
        .env("NANOFLOW_STAGE", &ctx.stage)
        .envs(&config.env)
        .status()
        .with_context(|| format!("could not start `sh` for stage `{}`", ctx.stage))?;
    if !status.success() {
        match status.code() {
            Some(code) => bail!("command exited with status {code}"),
            None => bail!("command was killed by a signal ({status})"),
        }
    }
    let missing: Vec<&str> = config.outs.iter().filter(|out| !ctx.out.join(out).exists()).map(String::as_str).collect();
    if !missing.is_empty() {
        bail!("command did not write its declared outs: {}", missing.join(", "));
    }
    Ok(Report::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(dir: &std::path::Path) -> Context {
        Context::for_test(dir, "test")
    }

    fn config(run: &str, outs: &[&str]) -> Config {
        Config { run: run.into(), outs: outs.iter().map(|s| s.to_string()).collect(), env: BTreeMap::new() }
    }

    #[test]
    fn writes_into_out() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        run(&config("echo hi > $OUT/a.txt", &["a.txt"]), &ctx).unwrap();
        assert_eq!(fs_err::read_to_string(ctx.out.join("a.txt")).unwrap(), "hi\n");
    }

    #[test]
    fn failing_line_fails_the_stage() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let error = run(&config("false\necho never > $OUT/a.txt", &[]), &ctx).unwrap_err();
        assert_eq!(error.to_string(), "command exited with status 1");
        assert!(!ctx.out.join("a.txt").exists());
    }

    #[test]
    fn missing_declared_out_fails() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let error = run(&config("touch $OUT/a", &["a", "b"]), &ctx).unwrap_err();
        assert_eq!(error.to_string(), "command did not write its declared outs: b");
    }
}
