//! Stopping a long stage cleanly: SIGUSR1 (Slurm's warning before a time limit or preemption,
//! `--signal=USR1@…`), SIGTERM and SIGINT (Ctrl-C, `scancel`, the engine stopping its stages)
//! ask a stage that can resume (train, finetune) to write a complete checkpoint at its next
//! step and exit with [`CHECKPOINTED`]; the run of the same key resumes from it. A second signal,
//! or any signal to a stage that cannot resume, takes the stage's process group down at once.

use std::sync::atomic::{AtomicBool, Ordering};

/// The exit status of a stage that stopped on a signal after writing a complete checkpoint
/// (sysexits' EX_TEMPFAIL: "try again later").
pub const CHECKPOINTED: u8 = 75;

static REQUESTED: AtomicBool = AtomicBool::new(false);
static STOPPABLE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    if STOPPABLE.load(Ordering::SeqCst) && !REQUESTED.swap(true, Ordering::SeqCst) {
        return;
    }
    // SAFETY: kill(2) is async-signal-safe; 0 is this process's group (the stage and its ranks).
    unsafe { libc::kill(0, libc::SIGKILL) };
}

/// Handles SIGUSR1, SIGTERM and SIGINT in this process from now on; `stoppable`: the stage
/// checks [`requested`] and checkpoints, rather than being killed.
pub fn install(stoppable: bool) {
    STOPPABLE.store(stoppable, Ordering::SeqCst);
    for signal in [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only touches atomics and calls kill(2), both async-signal-safe.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}

/// Whether a signal asked this stage to checkpoint and stop.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// The error of a stage that stopped on a signal with a complete checkpoint (at `iter`, where
/// the process that wrote it says): the stage process exits with [`CHECKPOINTED`].
#[derive(Debug)]
pub struct Checkpointed {
    pub iter: Option<usize>,
}

impl std::fmt::Display for Checkpointed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = self.iter.map(|iter| format!(" at iter {iter}")).unwrap_or_default();
        write!(f, "stopped on a signal with a complete checkpoint{at}: the next run resumes from it")
    }
}

/// The exit status for `error`: [`CHECKPOINTED`] when it is a [`Checkpointed`], else 1.
pub fn exit_status(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<Checkpointed>().is_some() { CHECKPOINTED } else { 1 }
}

impl std::error::Error for Checkpointed {}
