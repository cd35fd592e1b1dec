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

/// Outputs are regular files in folders, under `$OUT` itself a folder. A symbolic link (`$OUT`
/// or one inside it) would publish what it points to and make it read-only, wherever on the
/// machine it is; a named pipe or a device would hang the hashing; a name that is not UTF-8
/// cannot be written in the manifest. Each is refused before anything is read or sealed, naming
/// it. Nothing outside `dir` is touched: `$OUT` is looked at with `lstat`, never followed.
pub fn check_outputs(dir: &Path) -> Result<(), String> {
    match fs_err::symlink_metadata(dir) {
        Ok(metadata) if metadata.is_dir() => {}
        Ok(metadata) => {
            return Err(format!(
                "`$OUT` is {}, not a folder: a stage writes its outputs into the folder it is given",
                describe(metadata.file_type())
            ));
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err("`$OUT` is gone: the stage removed the folder it was given to write into".to_string());
        }
        Err(error) => return Err(error.to_string()),
    }
    let entries = entries_under(dir).map_err(|error| error.to_string())?;
    if let Some((path, _)) = entries.iter().find(|(path, _)| path.to_str().is_none()) {
        return Err(format!(
            "`$OUT/{}` has a name that is not UTF-8: output names must be UTF-8 (the manifest records them)",
            path.display()
        ));
    }
    let Some((path, kind)) = entries.into_iter().find(|(_, kind)| !kind.is_file()) else { return Ok(()) };
    let what = describe(kind);
    Err(format!(
        "`$OUT/{}` is {what}: outputs must be regular files and folders (copy what a link points to)",
        path.display()
    ))
}

/// Gives every output with other hard links (`ln a $OUT/b`, `cp -l`) its own copy, so that sealing
/// it read-only and keeping it immutable leaves the other name, perhaps a file of the project,
/// as it was. A copy rather than a refusal: a hard link is a legitimate way to make an output
/// (tools make them to save space) and the copy costs what a `cp` would have. The outputs copied.
pub fn own_copies(dir: &Path) -> io::Result<Vec<String>> {
    use std::os::unix::fs::MetadataExt;
    let mut copied = Vec::new();
    for relative in list_outputs(dir)? {
        let path = dir.join(&relative);
        if fs_err::symlink_metadata(&path)?.nlink() > 1 {
            let copy = path.with_file_name(crate::atomic::unique(".link-copy"));
            fs_err::copy(&path, &copy)?;
            fs_err::rename(&copy, &path).inspect_err(|_| {
                let _ = fs_err::remove_file(&copy);
            })?;
            copied.push(relative);
        }
    }
    Ok(copied)
}

/// What a file type is, in words: `a named pipe`.
pub fn describe(kind: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    match () {
        _ if kind.is_file() => "a regular file",
        _ if kind.is_dir() => "a folder",
        _ if kind.is_symlink() => "a symbolic link",
        _ if kind.is_fifo() => "a named pipe",
        _ if kind.is_socket() => "a socket",
        _ => "a device",
    }
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
