//! File formats the stages write and read, with no tensors in them: token shards and the
//! `meta.json` beside them, GPT-2's BPE and the tokenizers built on it, and the training record
//! (`metrics.parquet`, `loss.png`); and `replace`, which every file a resumed run reads back
//! is written through.

pub mod bpe;
pub(crate) mod meta;
pub mod metrics;
pub mod plot;
pub(crate) mod shard;
pub(crate) mod table;
pub(crate) mod tokenizer;

use std::path::Path;

use anyhow::Context as _;

/// Writes `path` by calling `write` on a temporary name beside it (`.NAME.tmp`, which
/// `gpt::checkpoint::remove_temporaries` clears), fsyncing and renaming: a run killed at any
/// point leaves the old file or the new one, never a part, for the resumed run to read.
pub fn replace(path: &Path, write: impl FnOnce(&Path) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let name = path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    let temporary = path.with_file_name(format!(".{name}.tmp"));
    write(&temporary)?;
    // Some writers (safetensors) create files readable by their owner only; an output is like any.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs_err::set_permissions(&temporary, std::fs::Permissions::from_mode(0o644))?;
    }
    fs_err::File::open(&temporary)?.sync_all().with_context(|| format!("could not sync `{}`", temporary.display()))?;
    fs_err::rename(&temporary, path)?;
    if let Some(parent) = path.parent() {
        // The rename is durable once the directory is.
        if let Ok(dir) = fs_err::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_replace_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.parquet");
        fs_err::write(&path, "old").unwrap();
        let failed = replace(&path, |temporary| {
            fs_err::write(temporary, "half")?;
            anyhow::bail!("killed")
        });
        assert!(failed.is_err());
        assert_eq!(fs_err::read_to_string(&path).unwrap(), "old");
        replace(&path, |temporary| Ok(fs_err::write(temporary, "new")?)).unwrap();
        assert_eq!(fs_err::read_to_string(&path).unwrap(), "new");
        let left: Vec<_> = fs_err::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
        assert_eq!(left, ["metrics.parquet"], "the temporary is renamed away");
    }
}
