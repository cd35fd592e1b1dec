//! A world of rank processes on this machine, as torchrun starts them: the supervisor that
//! spawns this machine's ranks and waits for them (`supervise`), and each rank's side
//! (`worker`, reading its `WorkerSpec`). What a rank does is `run_rank`'s.

use std::path::PathBuf;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::{Config, Hooks, check, check_world, run_rank};
use crate::gpt::dist::{Machines, World};
use crate::{Context, Report, Upstream};

/// What one rank of a multi-process run needs: `nanoflow __rank` reads it as JSON on stdin
/// (`gpt/ranks.rs` starts them).
#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub config: Config,
    pub context: Context,
    pub world: World,
    /// Ranks on this machine.
    pub local_ranks: usize,
    /// Where local rank 0 writes the stage's report for the supervisor.
    pub report: Option<PathBuf>,
    /// Test hook: fail after this many steps.
    pub stop_after: Option<usize>,
}

/// One rank: `nanoflow __rank`'s body.
pub fn worker(spec: WorkerSpec) -> anyhow::Result<()> {
    let hooks = Hooks { stop_after: spec.stop_after, ..Hooks::default() };
    check(&spec.config, &Upstream::none())?;
    let report = run_rank(&spec.config, &spec.context, &hooks, &spec.world, spec.local_ranks)
        .with_context(|| format!("rank {} of {}", spec.world.rank, spec.world.size))?;
    if let Some(path) = spec.report {
        fs_err::write(path, serde_json::to_vec(&report)?)?;
    }
    Ok(())
}

/// Test hook for the fan-out: `NANOFLOW_TEST_STOP_AFTER=RANK:STEPS` makes that rank fail after
/// that many steps, as a crash would.
const STOP_HOOK: &str = "NANOFLOW_TEST_STOP_AFTER";

/// Spawns this machine's ranks, one process each (as torchrun does), and waits for them: all
/// succeed, or the first that fails stops the others and fails the stage. The checkpoints the
/// run wrote stay in the output directory, so the next run resumes from the last one.
pub(super) fn supervise(
    config: &Config,
    ctx: &Context,
    machines: &Machines,
    local_ranks: usize,
) -> anyhow::Result<Report> {
    let size = machines.count * local_ranks;
    check_world(config, size)?;
    if config.init_from != "scratch" {
        // Fetch a Hub model once here rather than in every rank at the same time.
        crate::gpt::source::prefetch(&config.init_from, &ctx.root).context("`init_from`")?;
    }
    let master = if machines.count == 1 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        format!("127.0.0.1:{port}")
    } else {
        format!("{}:{}", machines.master_addr, machines.master_port)
    };
    let stop: Option<(usize, usize)> = std::env::var(STOP_HOOK).ok().and_then(|value| {
        let (rank, steps) = value.split_once(':')?;
        Some((rank.parse().ok()?, steps.parse().ok()?))
    });
    eprintln!(
        "data parallel: {size} rank{}, {local_ranks} on this machine (machine {} of {}), rank 0 at {master}",
        if size == 1 { "" } else { "s" },
        machines.rank,
        machines.count
    );
    let report = ctx.out.join(format!(".rank-report-{}.json", machines.rank));
    let mut specs = Vec::new();
    for local_rank in 0..local_ranks {
        let rank = machines.rank * local_ranks + local_rank;
        let spec = WorkerSpec {
            config: config.clone(),
            context: ctx.clone(),
            world: World { rank, size, local_rank, master: master.clone() },
            local_ranks,
            report: (local_rank == 0).then(|| report.clone()),
            stop_after: stop.filter(|&(at, _)| at == rank).map(|(_, steps)| steps),
        };
        specs.push((rank, serde_json::to_vec(&spec)?));
    }
    crate::gpt::ranks::run(specs)?;
    let json = fs_err::read(&report).context("rank 0 finished without a report")?;
    fs_err::remove_file(&report)?;
    Ok(serde_json::from_slice(&json)?)
}
