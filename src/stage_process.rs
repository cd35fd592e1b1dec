//! The child side of running a stage: `nanoflow __stage` reads a spec on stdin, runs the kind
//! in this process, and writes its report to a file. A stage that panics, runs out of memory or
//! is killed takes only this process down; the engine publishes nothing it did not finish.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use nanoflow_stages::Context;

use crate::stage_kind::StageKind;

/// What the engine hands a stage process.
#[derive(Debug, Serialize, Deserialize)]
pub struct StageSpec {
    pub stage: String,
    pub kind: String,
    /// The resolved config, `${stage}` references replaced by paths.
    pub params: serde_json::Value,
    pub root: PathBuf,
    pub out: PathBuf,
    pub inputs: BTreeMap<String, PathBuf>,
    /// Where to write the stage's `Report` as JSON once it succeeds.
    pub report: PathBuf,
}

/// Set by the engine on a local stage process: the engine's pid.
pub const ENGINE_PID: &str = "NANOFLOW_ENGINE_PID";

pub fn main(spec_file: Option<PathBuf>) -> ExitCode {
    if spec_file.is_none() {
        die_with_engine();
    }
    exit(run(spec_file))
}

/// Asks the kernel to SIGTERM this process when the engine that started it dies (so an engine
/// killed with SIGKILL leaves no stage running on), and stops at once if it has died already.
/// Done here rather than between `fork` and `exec`, so that the engine starts stages with
/// `posix_spawn`: a `fork` copied the engine's page tables, a millisecond or more per stage.
fn die_with_engine() {
    let Some(engine) = std::env::var(ENGINE_PID).ok().and_then(|pid| pid.parse::<libc::pid_t>().ok()) else {
        return;
    };
    // SAFETY: prctl, getppid and raise touch no memory of this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        // Started by the engine, so a parent other than it means the engine died before the
        // `prctl`: what the signal would have said.
        if libc::getppid() != engine {
            libc::raise(libc::SIGTERM);
        }
    }
}

/// The error and what caused it, on one line of stderr for the engine to show: "error:
/// `model`: the checkpoint … is incomplete", not a bare "error: `model`".
fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let status = nanoflow_stages::interrupt::exit_status(&error);
            // A stop on a signal is said once, by the stage's first process; its ranks and the
            // job's other tasks stop with it quietly.
            let quiet = std::env::var("SLURM_PROCID").is_ok_and(|rank| rank != "0") || RANK.get().is_some();
            if status != nanoflow_stages::interrupt::CHECKPOINTED {
                eprintln!("error: {error:#}");
            } else if !quiet {
                // Asked for, and nothing lost: a stop, not an error.
                eprintln!("{error:#}");
            }
            ExitCode::from(status)
        }
    }
}

/// Set in a rank process.
static RANK: std::sync::OnceLock<()> = std::sync::OnceLock::new();

/// `nanoflow __rank`: one rank of a data-parallel train stage, its spec on stdin. Its stage
/// process started it and stops it (same process group); rank 0's output is the stage's log.
pub fn rank_main() -> ExitCode {
    nanoflow_stages::interrupt::install(true);
    let _ = RANK.set(());
    let run = || -> anyhow::Result<()> {
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input).context("could not read the rank spec")?;
        let spec: nanoflow_stages::train::WorkerSpec = serde_json::from_str(&input).context("invalid rank spec")?;
        nanoflow_stages::train::worker(spec)
    };
    exit(run())
}

/// The spec from `spec_file` (a Slurm job's tasks) or stdin (a local child).
fn run(spec_file: Option<PathBuf>) -> anyhow::Result<()> {
    let input = match &spec_file {
        Some(path) => fs_err::read_to_string(path).context("could not read the stage spec")?,
        None => {
            let mut input = String::new();
            std::io::stdin().read_to_string(&mut input).context("could not read the stage spec")?;
            input
        }
    };
    let spec: StageSpec = serde_json::from_str(&input).context("invalid stage spec")?;
    let kind = StageKind::parse(&spec.kind).with_context(|| format!("unknown kind `{}`", spec.kind))?;
    // The engine stops a stage with SIGTERM to its process group, the kernel sends the same if
    // the engine dies, Slurm sends SIGUSR1 before a job's end: a kind that resumes checkpoints
    // first, any other takes its whole group down at once (no script or worker outlives it).
    nanoflow_stages::interrupt::install(kind.resumable());
    let context = Context { stage: spec.stage, root: spec.root, out: spec.out, inputs: spec.inputs };
    let report = kind.run(spec.params, &context)?;
    // Every task of a Slurm job runs the stage; the first one reports.
    if std::env::var("SLURM_PROCID").is_ok_and(|rank| rank != "0") {
        return Ok(());
    }
    // An empty report is no file: the engine reads a missing one as empty (it removed any
    // earlier one before starting this process), and a trivial stage makes one file fewer.
    if report.summary.is_empty() && report.metrics.is_empty() {
        return Ok(());
    }
    let json = serde_json::to_vec(&report)?;
    // Renamed into place whole, without an `fsync`: the engine reads it once this process has
    // ended and then deletes it; after a crash nothing publishes, so nothing reads it.
    let temporary = spec.report.with_file_name(crate::atomic::unique(".write"));
    fs_err::write(&temporary, &json)?;
    fs_err::rename(&temporary, &spec.report)?;
    Ok(())
}
