//! Writing files so that a reader sees the old version or the new one, never a part: a unique
//! temporary name beside the target, `fsync`, then `rename`. The store, the stat cache and the
//! stage process all write this way.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// A name no other process or thread will pick: `prefix-<pid>-<n>`.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Writes `bytes` to `path` so that readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let temporary = dir.join(unique(".write"));
    let mut file = fs_err::File::create(&temporary)?;
    std::io::Write::write_all(&mut file, bytes)?;
    file.sync_all()?;
    fs_err::rename(&temporary, path)
}
