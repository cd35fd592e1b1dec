//! The rank processes of a data-parallel world on this machine, started as torchrun starts them:
//! one `nanoflow __rank` per local rank, its spec as JSON on stdin, in the stage's process group
//! (a stopped stage takes its ranks down). All are waited for; when one fails, the others get a
//! moment to fail on their own (their collectives lose it), then are stopped.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};

/// The hidden command a rank runs: `nanoflow __rank`, with its spec on stdin.
pub const COMMAND: &str = "__rank";

/// Starts a rank per `(rank, spec)` and waits for all of them.
pub fn run(specs: Vec<(usize, Vec<u8>)>) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the nanoflow executable to start ranks with")?;
    let mut ranks = Vec::new();
    for (rank, spec) in specs {
        let mut child = Command::new(&exe)
            .arg(COMMAND)
            .stdin(Stdio::piped())
            .spawn()
            .with_context(|| format!("could not start rank {rank} (`{} {COMMAND}`)", exe.display()))?;
        let mut stdin = child.stdin.take().expect("piped");
        ranks.push((rank, child));
        std::io::Write::write_all(&mut stdin, &spec)?;
    }
    wait(&mut ranks)
}

fn wait(ranks: &mut [(usize, Child)]) -> anyhow::Result<()> {
    let mut done = vec![false; ranks.len()];
    let mut failed: Vec<String> = Vec::new();
    let mut first_failure: Option<Instant> = None;
    // Ranks that stopped on a signal after the checkpoint they agreed on.
    let mut checkpointed = 0;
    loop {
        for ((rank, child), done) in ranks.iter_mut().zip(&mut done) {
            if *done {
                continue;
            }
            if let Some(status) = child.try_wait()? {
                *done = true;
                if status.code() == Some(crate::interrupt::CHECKPOINTED as i32) {
                    checkpointed += 1;
                } else if !status.success() {
                    failed.push(format!("rank {rank} ({status})"));
                    first_failure.get_or_insert_with(Instant::now);
                }
            }
        }
        if done.iter().all(|&done| done) {
            break;
        }
        if first_failure.is_some_and(|at| at.elapsed() > Duration::from_secs(5)) {
            for ((rank, child), done) in ranks.iter_mut().zip(&done) {
                if !done {
                    let _ = child.kill();
                    let _ = child.wait();
                    failed.push(format!("rank {rank} (stopped)"));
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if failed.is_empty() && checkpointed > 0 {
        return Err(crate::interrupt::Checkpointed { iter: None }.into());
    }
    ensure!(
        failed.is_empty(),
        "{} failed: {}; the checkpoints written so far are kept, and the next run resumes from the last",
        if failed.len() == 1 { "a rank" } else { "ranks" },
        failed.join(", ")
    );
    Ok(())
}
