//! What this machine and its processes are, for the records that name them (manifests, reports)
//! and the leases that must tell a live holder from a dead one: the hostname, and when a process
//! started (a pid the kernel gave again to another process has another start time).

use std::io;

pub use nanoflow_stages::hostname;

/// Whether process `pid` exists on this machine.
pub fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    // SAFETY: signal 0 sends nothing; it asks whether the process exists.
    unsafe { libc::kill(pid, 0) == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM) }
}

/// When process `pid` started, in clock ticks since boot (`/proc/PID/stat`'s 22nd field); `None`
/// where `/proc` does not say.
pub fn started(pid: u32) -> Option<u64> {
    let stat = fs_err::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after its end.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}
