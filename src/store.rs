//! The store under `artifacts/`: where entries live, how they are published (rename only once
//! complete), the `current` links, and the locks that let several nanoflow processes share it.
//!
//! ```text
//! artifacts/<stage>/<key16>/out/            a published entry's outputs (what `${stage}` is)
//! artifacts/<stage>/<key16>/manifest.json   ... its record, and log.txt its output
//! artifacts/<stage>/current -> <key16>/out  what the pipeline last produced for the stage
//! artifacts/<stage>/.partial-<key16>/   a run in progress (or interrupted); never served
//! artifacts/.nanoflow/                  the stat cache and lock files
//! ```

use std::io;
use std::path::{Path, PathBuf};

use crate::atomic::{unique, write_atomic};
use crate::error::Error;
use crate::manifest::{MANIFEST, Manifest, OUT};

/// Digits of the key used in directory names: 64 bits, and the manifest holds the full key.
const SHORT_KEY: usize = 16;
/// A stage's history: when each entry became current, and how (see `Store::record`).
pub const HISTORY: &str = "history.jsonl";

#[derive(Debug, Clone)]
pub struct Store {
    pub root: PathBuf,
}

/// A held lock; released when dropped.
#[derive(Debug)]
pub struct Lock {
    _file: fs_err::File,
    /// A key's lock is a lease too, for machines sharing the store where `flock` does not reach.
    _lease: Option<crate::lease::Lease>,
}

impl Store {
    pub fn new(pipeline_root: &Path) -> Store {
        Store { root: pipeline_root.join("artifacts") }
    }

    fn meta(&self) -> PathBuf {
        self.root.join(".nanoflow")
    }

    pub fn stat_cache_file(&self) -> PathBuf {
        self.meta().join("stat-cache.json")
    }

    pub fn stage_dir(&self, stage: &str) -> PathBuf {
        self.root.join(stage)
    }

    pub fn entry_dir(&self, stage: &str, key: &str) -> PathBuf {
        self.stage_dir(stage).join(&key[..SHORT_KEY])
    }

    pub fn partial_dir(&self, stage: &str, key: &str) -> PathBuf {
        self.stage_dir(stage).join(format!(".partial-{}", &key[..SHORT_KEY]))
    }

    /// The entry `current` points into, if any.
    pub fn current(&self, stage: &str) -> Option<PathBuf> {
        let target = fs_err::read_link(self.stage_dir(stage).join("current")).ok()?;
        let entry = target.components().next()?;
        Some(self.stage_dir(stage).join(entry))
    }

    /// The manifest of the entry stored under `key`, if there is one and it is that key's.
    pub fn lookup(&self, stage: &str, key: &str) -> io::Result<Option<Manifest>> {
        // An entry whose manifest does not parse is damaged: not a hit, and a run replaces it.
        let manifest = Manifest::read_checked(&self.entry_dir(stage, key))?.unwrap_or(None);
        Ok(manifest.filter(|manifest| manifest.key == key))
    }

    /// Whether `current` is there but not a link: a copy made by a tool that follows links
    /// (`cp -rL`, `rsync -L`, a sync to storage without them). Damage that `set_current` repairs.
    pub fn current_is_not_a_link(&self, stage: &str) -> bool {
        let link = self.stage_dir(stage).join("current");
        fs_err::symlink_metadata(&link).is_ok_and(|metadata| !metadata.file_type().is_symlink())
    }

    /// Points `current` at the entry for `key`, atomically (a new link renamed over the old).
    pub fn set_current(&self, stage: &str, key: &str) -> io::Result<()> {
        let dir = self.stage_dir(stage);
        let link = dir.join("current");
        let target = Path::new(&key[..SHORT_KEY]).join(OUT);
        if fs_err::read_link(&link).is_ok_and(|current| current == target) {
            return Ok(());
        }
        if self.current_is_not_a_link(stage) {
            let trash = dir.join(unique(".trash"));
            fs_err::rename(&link, &trash)?;
            remove_dir_all(&trash)?;
        }
        let temporary = dir.join(unique(".current"));
        std::os::unix::fs::symlink(&target, &temporary)?;
        fs_err::rename(&temporary, &link).inspect_err(|_| {
            let _ = fs_err::remove_file(&temporary);
        })
    }

    /// Notes in the stage's history that the entry for `key` became current by `how` (`ran` or
    /// `restored`), for reports to say how an output came to be. One appended line each.
    pub fn record(&self, stage: &str, key: &str, how: &str) -> io::Result<()> {
        let time = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let line = serde_json::json!({ "time": time, "key": key, "how": how }).to_string() + "\n";
        let mut file = fs_err::File::options().create(true).append(true).open(self.stage_dir(stage).join(HISTORY))?;
        std::io::Write::write_all(&mut file, line.as_bytes())
    }

    /// How the entry for `key` last became current, if the history says.
    pub fn how_made(&self, stage: &str, key: &str) -> Option<String> {
        let text = fs_err::read_to_string(self.stage_dir(stage).join(HISTORY)).ok()?;
        text.lines().rev().find_map(|line| {
            let event: serde_json::Value = serde_json::from_str(line).ok()?;
            (event["key"] == key).then(|| event["how"].as_str().map(str::to_string)).flatten()
        })
    }

    /// Every stored entry of `stage` (its key's folder, not partial or trash), by name.
    pub fn entries(&self, stage: &str) -> io::Result<Vec<PathBuf>> {
        let mut entries: Vec<PathBuf> = match fs_err::read_dir(self.stage_dir(stage)) {
            Ok(entries) => entries.filter_map(Result::ok).map(|entry| entry.path()).collect(),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(error) => return Err(error),
        };
        entries.retain(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            !name.starts_with('.') && name != "current" && path.is_dir() && !path.is_symlink()
        });
        entries.sort();
        Ok(entries)
    }

    /// Makes a finished partial directory the entry for `key`: the manifest is written last,
    /// files are made read-only, and one rename makes it visible. An existing entry for the key
    /// (a forced re-run, or a damaged one) is moved aside first.
    pub fn publish(&self, stage: &str, key: &str, manifest: &Manifest) -> io::Result<PathBuf> {
        let partial = self.partial_dir(stage, key);
        let entry = self.entry_dir(stage, key);
        for relative in manifest.outputs.keys() {
            make_read_only(&partial.join(OUT).join(relative))?;
        }
        let json = serde_json::to_vec_pretty(manifest).map_err(io::Error::other)?;
        write_atomic(&partial.join(MANIFEST), &json)?;
        if entry.exists() {
            let trash = self.stage_dir(stage).join(unique(".trash"));
            fs_err::rename(&entry, &trash)?;
            fs_err::rename(&partial, &entry)?;
            remove_dir_all(&trash)?;
        } else {
            fs_err::rename(&partial, &entry)?;
        }
        Ok(entry)
    }

    /// Held by every `run` for its whole length (shared), and by `gc` (exclusive), so that `gc`
    /// never deletes what a run is about to use.
    pub fn lock_shared(&self) -> Result<Lock, Error> {
        let file = self.lock_file(&self.meta().join("store.lock"))?;
        file.file().lock_shared().map_err(|source| self.error(source))?;
        Ok(Lock { _file: file, _lease: None })
    }

    pub fn try_lock_exclusive(&self) -> Result<Lock, Error> {
        let path = self.meta().join("store.lock");
        let file = self.lock_file(&path)?;
        match file.file().try_lock() {
            Ok(()) => Ok(Lock { _file: file, _lease: None }),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::StoreBusy { path: self.root.clone() }),
            Err(std::fs::TryLockError::Error(source)) => Err(Error::Store { path, source }),
        }
    }

    /// The lock that makes one process at a time run a given key. `None` when another holds it.
    /// Whether another process holds the lock of `key` now: it is running that stage. (A free
    /// lock is taken and released at once; a lock file that does not exist yet is not made.)
    pub fn key_is_running(&self, stage: &str, key: &str) -> bool {
        let locked = match fs_err::OpenOptions::new().write(true).open(self.key_lock_path(stage, key)) {
            Ok(file) => matches!(file.file().try_lock(), Err(std::fs::TryLockError::WouldBlock)),
            Err(_) => false,
        };
        locked || crate::lease::is_held(&self.key_lock_path(stage, key).with_extension("lease"))
    }

    /// An interrupted run of `key` left a partial output that a resumable kind continues from.
    pub fn has_partial(&self, stage: &str, key: &str) -> bool {
        fs_err::read_dir(self.partial_dir(stage, key).join(OUT)).is_ok_and(|mut entries| entries.next().is_some())
    }

    pub fn try_lock_key(&self, stage: &str, key: &str) -> io::Result<Option<Lock>> {
        let path = self.key_lock_path(stage, key);
        fs_err::create_dir_all(path.parent().expect("lock files live in a folder"))?;
        let file = fs_err::File::create(&path)?;
        match file.file().try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(error)) => return Err(error),
        }
        // Another machine's nanoflow holds the lease where `flock` does not reach it.
        Ok(crate::lease::try_take(&path.with_extension("lease"))?
            .map(|lease| Lock { _file: file, _lease: Some(lease) }))
    }

    /// Who holds the key's lock, for a person waiting on it (`lease::describe`).
    pub fn key_holder(&self, stage: &str, key: &str) -> String {
        crate::lease::describe(&self.key_lock_path(stage, key).with_extension("lease"))
    }

    fn key_lock_path(&self, stage: &str, key: &str) -> PathBuf {
        self.meta().join("locks").join(format!("{stage}-{}.lock", &key[..SHORT_KEY]))
    }

    fn lock_file(&self, path: &Path) -> Result<fs_err::File, Error> {
        fs_err::create_dir_all(self.meta()).map_err(|source| self.error(source))?;
        fs_err::File::create(path).map_err(|source| self.error(source))
    }

    fn error(&self, source: io::Error) -> Error {
        Error::Store { path: self.root.clone(), source }
    }
}

fn make_read_only(path: &Path) -> io::Result<()> {
    let mut permissions = fs_err::metadata(path)?.permissions();
    permissions.set_readonly(true);
    fs_err::set_permissions(path, permissions)
}

/// Removes a tree; a missing one is fine.
pub fn remove_dir_all(path: &Path) -> io::Result<()> {
    match fs_err::remove_dir_all(path) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Total size of the files under `path`.
pub fn disk_usage(path: &Path) -> u64 {
    crate::stat_cache::files_under(path)
        .unwrap_or_default()
        .iter()
        .filter_map(|relative| path.join(relative).symlink_metadata().ok())
        .map(|metadata| metadata.len())
        .sum()
}
