//! `manifest.json`, the record written beside a stage's outputs when it is published: the key
//! and what it was made of, the resolved config, a digest per output file, timings, host and
//! version, and the stage's report. A store entry without one is not an entry.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::cache_key::KeyMaterial;
use crate::stat_cache::{StatCache, entries_under, files_under, hash_file};

/// A store entry is `out/` (the stage's outputs and nothing else: what `${stage}` and `current`
/// point at), the manifest and the log.
pub const OUT: &str = "out";
pub const MANIFEST: &str = "manifest.json";
pub const LOG: &str = "log.txt";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub nanoflow_version: String,
    pub stage: String,
    pub key: String,
    #[serde(flatten)]
    pub material: KeyMaterial,
    /// The config the stage ran with, non-semantic keys included.
    pub config: serde_json::Value,
    pub outputs: BTreeMap<String, OutputFile>,
    /// One digest over all outputs: what downstream keys are made of.
    pub output_digest: String,
    pub started_at: String,
    pub finished_at: String,
    pub duration_s: f64,
    pub exit_status: i32,
    pub host: String,
    #[serde(default)]
    pub summary: String,
    #[serde(default)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    pub digest: String,
    pub size: u64,
}

/// Something wrong with a stored output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Damage {
    Missing(String),
    Changed(String),
    Unexpected(String),
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Missing(path) => write!(f, "`{path}` is missing"),
            Damage::Changed(path) => write!(f, "`{path}` changed"),
            Damage::Unexpected(path) => write!(f, "`{path}` is not in the manifest"),
        }
    }
}

impl Manifest {
    pub fn read(dir: &Path) -> io::Result<Option<Manifest>> {
        let path = dir.join(MANIFEST);
        match fs_err::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, format!("{}: {error}", path.display()))),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// `read`, with a manifest that does not parse (a damaged store) told apart from trouble
    /// reading it: `Err(why)` inside, so that callers treat the entry as damaged and go on.
    pub fn read_checked(dir: &Path) -> io::Result<Result<Option<Manifest>, String>> {
        match Manifest::read(dir) {
            Ok(manifest) => Ok(Ok(manifest)),
            Err(error) if error.kind() == io::ErrorKind::InvalidData => Ok(Err(format!("`{MANIFEST}` does not parse"))),
            Err(error) => Err(error),
        }
    }

    /// Whether the outputs of the entry `dir` are still what was published, looking at each
    /// file's `stat` first and reading only files that changed, and at the listing for files
    /// that were added (what `verify` reports, `run` repairs). Cheap enough for every `status`.
    pub fn check(&self, dir: &Path, cache: &mut StatCache) -> io::Result<Vec<Damage>> {
        let dir = dir.join(OUT);
        let mut damage = Vec::new();
        for relative in list_outputs(&dir)? {
            if !self.outputs.contains_key(&relative) {
                damage.push(Damage::Unexpected(relative));
            }
        }
        for (relative, recorded) in &self.outputs {
            let path = dir.join(relative);
            match fs_err::metadata(&path) {
                Err(error) if error.kind() == io::ErrorKind::NotFound => damage.push(Damage::Missing(relative.clone())),
                Err(error) => return Err(error),
                Ok(metadata) if metadata.len() != recorded.size => damage.push(Damage::Changed(relative.clone())),
                Ok(_) if cache.digest(&path)? != recorded.digest => damage.push(Damage::Changed(relative.clone())),
                Ok(_) => {}
            }
        }
        Ok(damage)
    }

    /// Like `check`, but reads every byte again and also reports files that should not be there.
    pub fn verify(&self, dir: &Path) -> io::Result<Vec<Damage>> {
        let dir = dir.join(OUT);
        let found = list_outputs(&dir)?;
        let mut damage = Vec::new();
        for (relative, recorded) in &self.outputs {
            if !found.contains(relative) {
                damage.push(Damage::Missing(relative.clone()));
            } else if hash_file(&dir.join(relative))? != recorded.digest {
                damage.push(Damage::Changed(relative.clone()));
            }
        }
        for relative in found {
            if !self.outputs.contains_key(&relative) {
                damage.push(Damage::Unexpected(relative));
            }
        }
        Ok(damage)
    }
}

/// The files in an output directory, relative, sorted.
pub fn list_outputs(dir: &Path) -> io::Result<Vec<String>> {
    Ok(files_under(dir)?.into_iter().map(|path| path.to_string_lossy().into_owned()).collect())
}

/// Outputs are regular files in folders. A symbolic link would publish what it points to (and
/// make it read-only, wherever on the machine it is); a named pipe or a device would hang the
/// hashing. Either is refused before anything is read, naming it.
pub fn check_outputs(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let entries = entries_under(dir).map_err(|error| error.to_string())?;
    let Some((path, kind)) = entries.into_iter().find(|(_, kind)| !kind.is_file()) else { return Ok(()) };
    let what = match () {
        _ if kind.is_symlink() => "a symbolic link",
        _ if kind.is_fifo() => "a named pipe",
        _ if kind.is_socket() => "a socket",
        _ => "a device",
    };
    Err(format!(
        "`$OUT/{}` is {what}: outputs must be regular files and folders (copy what a link points to)",
        path.display()
    ))
}

/// Hashes every output in `dir`.
pub fn hash_outputs(dir: &Path) -> io::Result<BTreeMap<String, OutputFile>> {
    list_outputs(dir)?
        .into_iter()
        .map(|relative| {
            let path = dir.join(&relative);
            let size = fs_err::metadata(&path)?.len();
            Ok((relative, OutputFile { digest: hash_file(&path)?, size }))
        })
        .collect()
}

/// One digest over (path, digest) of every output: equal outputs, equal digest.
pub fn output_digest(outputs: &BTreeMap<String, OutputFile>) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"nanoflow-outputs-v1\0");
    for (path, file) in outputs {
        hasher.update(path.as_bytes());
        hasher.update(b"\0");
        hasher.update(file.digest.as_bytes());
        hasher.update(b"\n");
    }
    hasher.finalize().to_hex().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_digest_depends_on_names_and_bytes() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for dir in [a.path(), b.path()] {
            fs_err::create_dir_all(dir.join("sub")).unwrap();
            fs_err::write(dir.join("sub/x.txt"), b"x").unwrap();
        }
        let digest_a = output_digest(&hash_outputs(a.path()).unwrap());
        assert_eq!(digest_a, output_digest(&hash_outputs(b.path()).unwrap()));
        fs_err::write(b.path().join("sub/x.txt"), b"y").unwrap();
        assert_ne!(digest_a, output_digest(&hash_outputs(b.path()).unwrap()));
    }
}
