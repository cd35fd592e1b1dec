//! Content digests of files and folders, remembered by (path, size, mtime, inode) so that a file
//! that has not changed is not read again: `nanoflow status` over gigabytes of data answers from
//! `stat` calls alone (git's index, Bazel's digest cache). It owns digests; it does not know what
//! they are for.

use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::atomic::write_atomic;

/// A file modified this recently may still be being written in the same mtime tick: hash it,
/// but don't remember the digest (git's "racy clean" problem).
const RACY: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    size: u64,
    mtime_ns: i64,
    inode: u64,
    digest: String,
}

impl Entry {
    fn of(metadata: &std::fs::Metadata, digest: String) -> Entry {
        Entry {
            size: metadata.len(),
            mtime_ns: metadata.mtime() * 1_000_000_000 + metadata.mtime_nsec(),
            inode: metadata.ino(),
            digest,
        }
    }

    fn matches(&self, metadata: &std::fs::Metadata) -> bool {
        *self == Entry::of(metadata, self.digest.clone())
    }
}

#[derive(Debug)]
pub struct StatCache {
    file: PathBuf,
    entries: HashMap<PathBuf, Entry>,
    /// Entries learned by this process, merged into the file on `save`.
    learned: HashMap<PathBuf, Entry>,
}

impl StatCache {
    /// Loads the cache kept in `file`; a missing or unreadable one is an empty cache.
    pub fn open(file: &Path) -> StatCache {
        StatCache { file: file.to_path_buf(), entries: read_entries(file), learned: HashMap::new() }
    }

    /// blake3 of a file's bytes, or of a folder's sorted (relative path, digest) list.
    pub fn digest(&mut self, path: &Path) -> io::Result<String> {
        let metadata = fs_err::metadata(path)?;
        if metadata.is_dir() {
            let mut hasher = blake3::Hasher::new();
            hasher.update(b"nanoflow-dir-v1\0");
            for relative in files_under(path)? {
                let digest = self.digest(&path.join(&relative))?;
                hasher.update(relative.to_string_lossy().as_bytes());
                hasher.update(b"\0");
                hasher.update(digest.as_bytes());
                hasher.update(b"\n");
            }
            return Ok(hasher.finalize().to_hex().to_string());
        }
        if let Some(entry) = self.entries.get(path).filter(|entry| entry.matches(&metadata)) {
            return Ok(entry.digest.clone());
        }
        let digest = hash_file(path)?;
        let modified = metadata.modified().unwrap_or(UNIX_EPOCH);
        let settled = SystemTime::now().duration_since(modified).is_ok_and(|age| age > RACY);
        if settled {
            self.learn(path, Entry::of(&metadata, digest.clone()));
        }
        Ok(digest)
    }

    /// Records a digest computed elsewhere (outputs hashed at publish, which nothing writes
    /// any more), so the next look at that file costs one `stat`.
    pub fn remember(&mut self, path: &Path, digest: &str) -> io::Result<()> {
        let metadata = fs_err::metadata(path)?;
        self.learn(path, Entry::of(&metadata, digest.to_string()));
        Ok(())
    }

    fn learn(&mut self, path: &Path, entry: Entry) {
        self.entries.insert(path.to_path_buf(), entry.clone());
        self.learned.insert(path.to_path_buf(), entry);
    }

    /// Merges what this process learned into the file, under a lock, atomically: concurrent
    /// nanoflow processes each add their entries and none is lost or torn.
    pub fn save(&mut self) -> io::Result<()> {
        if self.learned.is_empty() {
            return Ok(());
        }
        if let Some(parent) = self.file.parent() {
            fs_err::create_dir_all(parent)?;
        }
        let lock = fs_err::File::create(self.file.with_extension("lock"))?;
        lock.file().lock()?;
        let mut entries = read_entries(&self.file);
        entries.extend(self.learned.drain());
        let json = serde_json::to_vec(&entries).map_err(io::Error::other)?;
        write_atomic(&self.file, &json)?;
        self.entries = entries;
        Ok(())
    }

    /// Drops entries for paths that no longer exist (after `gc`).
    pub fn prune(&mut self) -> io::Result<()> {
        let lock = fs_err::File::create(self.file.with_extension("lock"))?;
        lock.file().lock()?;
        let mut entries = read_entries(&self.file);
        entries.retain(|path, _| path.exists());
        write_atomic(&self.file, &serde_json::to_vec(&entries).map_err(io::Error::other)?)?;
        self.entries = entries;
        Ok(())
    }
}

fn read_entries(file: &Path) -> HashMap<PathBuf, Entry> {
    fs_err::read(file).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default()
}

/// Below this size a file is read whole and hashed on this thread: the block reader sets up an
/// 8 MB buffer (zeroed, a page fault per page) that cost a trivial stage more than its own run.
const SMALL: u64 = 1 << 20;

/// blake3 of a file: a small one read at once, a large one by blocks hashed on all cores (the
/// same digest either way).
pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut file = fs_err::File::open(path)?;
    if file.metadata()?.len() < SMALL {
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut file, &mut bytes)?;
        // It may have grown since the `stat`; then it is large after all.
        if (bytes.len() as u64) < SMALL {
            return Ok(blake3::hash(&bytes).to_hex().to_string());
        }
    }
    nanoflow_stages::fetch::digest::blake3_file(path)
}

/// The files under `dir` (following no symlinks into other trees), relative, sorted.
pub fn files_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(entries_under(dir)?.into_iter().map(|(path, _)| path).collect())
}

/// Everything under `dir` that is not a folder (files, links, pipes, ...), relative, sorted, with
/// its type as `lstat` sees it: links are not followed.
pub fn entries_under(dir: &Path) -> io::Result<Vec<(PathBuf, std::fs::FileType)>> {
    let mut entries = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        for entry in fs_err::read_dir(dir.join(&relative))? {
            let entry = entry?;
            let (path, kind) = (relative.join(entry.file_name()), entry.file_type()?);
            match kind.is_dir() {
                true => stack.push(path),
                false => entries.push((path, kind)),
            }
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backdate(path: &Path) {
        let old = SystemTime::now() - Duration::from_secs(60);
        fs_err::File::options().write(true).open(path).unwrap().file().set_modified(old).unwrap();
    }

    #[test]
    fn remembers_settled_files_and_notices_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("data.bin");
        fs_err::write(&file, b"hello").unwrap();
        backdate(&file);
        let mut cache = StatCache::open(&dir.path().join("cache.json"));
        let digest = cache.digest(&file).unwrap();
        assert_eq!(digest, blake3::hash(b"hello").to_hex().to_string());
        cache.save().unwrap();

        let mut reopened = StatCache::open(&dir.path().join("cache.json"));
        assert_eq!(reopened.entries.get(&file).map(|e| e.digest.clone()), Some(digest));

        fs_err::write(&file, b"world").unwrap();
        assert_eq!(reopened.digest(&file).unwrap(), blake3::hash(b"world").to_hex().to_string());
    }

    #[test]
    fn small_and_large_files_hash_as_blake3_of_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        for size in [0, 5, SMALL as usize - 1, SMALL as usize, SMALL as usize + 3] {
            let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let file = dir.path().join(format!("{size}.bin"));
            fs_err::write(&file, &bytes).unwrap();
            assert_eq!(hash_file(&file).unwrap(), blake3::hash(&bytes).to_hex().to_string(), "{size} bytes");
        }
    }

    #[test]
    fn does_not_remember_files_still_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fresh.txt");
        fs_err::write(&file, b"x").unwrap();
        let mut cache = StatCache::open(&dir.path().join("cache.json"));
        cache.digest(&file).unwrap();
        assert!(cache.entries.is_empty());
    }

    #[test]
    fn folder_digest_covers_names_and_contents() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("f");
        fs_err::create_dir_all(folder.join("sub")).unwrap();
        fs_err::write(folder.join("a"), b"1").unwrap();
        fs_err::write(folder.join("sub/b"), b"2").unwrap();
        let mut cache = StatCache::open(&dir.path().join("cache.json"));
        let before = cache.digest(&folder).unwrap();
        fs_err::rename(folder.join("a"), folder.join("c")).unwrap();
        let renamed = cache.digest(&folder).unwrap();
        assert_ne!(before, renamed);
        fs_err::rename(folder.join("c"), folder.join("a")).unwrap();
        assert_eq!(cache.digest(&folder).unwrap(), before);
    }
}
