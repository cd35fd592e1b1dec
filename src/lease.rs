//! A lock that holds across machines sharing a store over NFS, where `flock` may not (an NFSv3
//! mount without lockd, `nolock`, some FUSE filesystems): a lease file created with `O_EXCL`
//! (atomic on NFSv3 and later) naming its holder, which a thread of the holder touches every
//! few seconds. Another process takes it over only when it is stale: its holder is a dead
//! process on this machine (or its pid now belongs to a process that started later), nobody
//! touched it for `STALE` (its machine died, or lost the filesystem), or it names no holder and
//! is older than `UNREADABLE` (its writer died between creating and writing it, or something
//! else wrote it). Breaking a stale lease renames it away first, so of two breakers only one wins.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::atomic::unique;

/// How often the holder touches its lease.
const REFRESH: Duration = Duration::from_secs(10);
/// A lease untouched this long is stale (clocks of a cluster's machines agree far better).
const STALE: Duration = Duration::from_secs(120);
/// A lease that names no holder this long after it was made is nobody's: its holder writes its
/// name right after creating it.
const UNREADABLE: Duration = Duration::from_secs(5);

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Holder {
    pub host: String,
    pub pid: u32,
    /// When the holder started (`host::started`), so that its pid given to another process
    /// later is not taken for it. Absent in leases of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started: Option<u64>,
}

impl Holder {
    fn this_process() -> Holder {
        let pid = std::process::id();
        Holder { host: crate::host::hostname(), pid, started: crate::host::started(pid) }
    }

    /// Whether the holder runs on this machine and is gone: no process has its pid, or the
    /// one that has it started at another time.
    fn gone_from_here(&self) -> bool {
        if self.host != crate::host::hostname() {
            return false;
        }
        !crate::host::alive(self.pid)
            || self.started.is_some_and(|started| crate::host::started(self.pid) != Some(started))
    }
}

/// Who holds the lease at `path`, for a person waiting on it: `pid 12 on login2 (lease
/// `artifacts/.nanoflow/locks/train-….lease`)`.
pub fn describe(path: &Path) -> String {
    let shown = crate::printer::show_path(path);
    match holder(path) {
        Some(holder) => format!("pid {} on {} (lease `{}`)", holder.pid, holder.host, shown.display()),
        None => format!("a process that has not written its name yet (lease `{}`)", shown.display()),
    }
}

/// A held lease; dropping it stops the refresh and removes the file.
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = fs_err::remove_file(&self.path);
    }
}

/// Takes the lease at `path`, breaking a stale one; `None` while another process holds it.
pub fn try_take(path: &Path) -> io::Result<Option<Lease>> {
    for _ in 0..2 {
        match fs_err::OpenOptions::new().write(true).create_new(true).open(path) {
            Ok(mut file) => {
                // No `fsync`: others read the name once this file is closed (NFS flushes on
                // close), and after a crash its holder is gone either way (an empty lease is
                // taken over after `UNREADABLE`). A sync cost each stage's run a disk flush.
                let holder = serde_json::to_vec(&Holder::this_process()).map_err(io::Error::other)?;
                io::Write::write_all(&mut file, &holder)?;
                return Ok(Some(hold(path)));
            }
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                if !is_stale(path) {
                    return Ok(None);
                }
                // Of several processes breaking it, the one whose rename succeeds removes it.
                let aside = path.with_file_name(unique(".stale-lease"));
                if fs_err::rename(path, &aside).is_ok() {
                    let _ = fs_err::remove_file(&aside);
                }
            }
            Err(error) => return Err(error),
        }
    }
    Ok(None)
}

/// Whether a live process holds the lease at `path`.
pub fn is_held(path: &Path) -> bool {
    path.exists() && !is_stale(path)
}

/// Who holds the lease at `path`, as it says.
pub fn holder(path: &Path) -> Option<Holder> {
    serde_json::from_slice(&fs_err::read(path).ok()?).ok()
}

fn is_stale(path: &Path) -> bool {
    let Ok(metadata) = fs_err::metadata(path) else { return false };
    let untouched = metadata.modified().ok().and_then(|modified| SystemTime::now().duration_since(modified).ok());
    if untouched.is_some_and(|untouched| untouched > STALE) {
        return true;
    }
    match holder(path) {
        Some(holder) => holder.gone_from_here(),
        // Being written (its holder writes right after creating it), unless it has been a while.
        None => untouched.is_some_and(|untouched| untouched > UNREADABLE),
    }
}

/// Touches the lease every `REFRESH` until it is dropped.
fn hold(path: &Path) -> Lease {
    let stop = Arc::new(AtomicBool::new(false));
    let (thread_stop, thread_path) = (stop.clone(), path.to_path_buf());
    std::thread::spawn(move || {
        let mut since = Duration::ZERO;
        while !thread_stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
            since += Duration::from_millis(200);
            if since >= REFRESH {
                since = Duration::ZERO;
                if let Ok(file) = fs_err::OpenOptions::new().write(true).open(&thread_path) {
                    let _ = file.file().set_modified(SystemTime::now());
                }
            }
        }
    });
    Lease { path: path.to_path_buf(), stop }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_holder(path: &Path, holder: &Holder) {
        fs_err::write(path, serde_json::to_vec(holder).unwrap()).unwrap();
    }

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.lease");
        let lease = try_take(&path).unwrap().expect("free");
        assert_eq!(holder(&path), Some(Holder::this_process()));
        assert!(try_take(&path).unwrap().is_none(), "held by this live process");
        assert!(is_held(&path));
        drop(lease);
        assert!(!path.exists());
        assert!(try_take(&path).unwrap().is_some());
    }

    #[test]
    fn another_machines_fresh_lease_holds_and_a_stale_one_is_broken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.lease");
        write_holder(&path, &Holder { host: "login2".into(), pid: 1, started: None });
        assert!(try_take(&path).unwrap().is_none(), "a live lease of another machine");
        assert!(is_held(&path));
        let file = fs_err::OpenOptions::new().write(true).open(&path).unwrap();
        file.file().set_modified(SystemTime::now() - STALE - Duration::from_secs(1)).unwrap();
        assert!(!is_held(&path));
        let lease = try_take(&path).unwrap().expect("a stale lease is taken over");
        assert_eq!(holder(&path), Some(Holder::this_process()));
        drop(lease);
    }

    #[test]
    fn a_dead_process_on_this_machine_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.lease");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        write_holder(&path, &Holder { host: crate::host::hostname(), pid, started: None });
        assert!(!is_held(&path));
        assert!(try_take(&path).unwrap().is_some());
    }

    /// Issue 28, item 10: a live pid that another process took since is not the holder.
    #[test]
    fn a_reused_pid_holds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.lease");
        let this = Holder::this_process();
        assert!(this.started.is_some(), "/proc says when this process started");
        write_holder(&path, &Holder { started: this.started.map(|started| started + 1), ..this });
        assert!(!is_held(&path), "the pid is alive, but it started at another time");
        write_holder(&path, &Holder::this_process());
        assert!(is_held(&path));
    }

    /// Issue 28, item 10: an empty or garbage lease is taken over once a few seconds old.
    #[test]
    fn an_unreadable_lease_is_taken_over_once_a_few_seconds_old() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.lease");
        for contents in ["", "garbage"] {
            fs_err::write(&path, contents).unwrap();
            assert!(is_held(&path), "just made: its writer may be writing it");
            let file = fs_err::OpenOptions::new().write(true).open(&path).unwrap();
            file.file().set_modified(SystemTime::now() - UNREADABLE - Duration::from_secs(1)).unwrap();
            assert!(!is_held(&path));
            drop(try_take(&path).unwrap().expect("taken over"));
        }
    }
}
