//! The stage kinds: what each `kind:` of pipeline.yaml does, and nothing about DAGs, keys or the
//! store (that is the engine's half, in `src/`).
//!
//! Every kind is a module with a `Config` (a serde struct with `deny_unknown_fields`, its
//! defaults in one place), a `VERSION` that enters the content key, and
//! `run(&Config, &Context) -> anyhow::Result<Report>`. The engine calls `run` in a child process
//! with an output directory that only becomes visible once `run` returns `Ok`.

pub mod bench;
pub mod bpe;
pub mod checkpoint;
pub mod command;
pub mod device;
pub mod digest;
pub mod dist;
pub mod download;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod gpt;
mod http;
mod hub;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod optim;
pub mod progress;
pub mod sample;
pub mod shard;
/// Test support: a local HTTP server for the download and Hub tests (also the CLI's).
#[doc(hidden)]
pub mod test_server;
pub mod tokenize;
pub mod tokenizer;
pub mod train;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use progress::{Progress, Unit};

/// Where a stage runs: its name, its inputs and the directory it writes into.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Context {
    /// The stage's name in pipeline.yaml, for messages.
    pub stage: String,
    /// The directory holding pipeline.yaml: relative paths in params resolve against it.
    pub root: PathBuf,
    /// The directory the stage writes into (`$OUT`). Empty on a fresh run; a resumable kind may
    /// find the complete checkpoints of an interrupted run with the same key here.
    pub out: PathBuf,
    /// The output directory of each upstream stage, by stage name.
    pub inputs: BTreeMap<String, PathBuf>,
}

impl Context {
    /// A context for unit tests: the stage writes into `dir/out`, relative paths resolve in `dir`.
    #[cfg(test)]
    pub(crate) fn for_test(dir: &std::path::Path, stage: &str) -> Context {
        let out = dir.join("out");
        fs_err::create_dir_all(&out).expect("a test output directory");
        Context { stage: stage.into(), root: dir.to_path_buf(), out, inputs: BTreeMap::new() }
    }
}

/// What a stage hands back to the engine: one line for people and numbers for the manifest.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// One line shown after the stage finishes, e.g. `1003854 train tokens, 111540 val tokens`.
    #[serde(default)]
    pub summary: String,
    /// Metrics recorded in the manifest (`val_loss`, `tokens`, ...).
    #[serde(default)]
    pub metrics: serde_json::Map<String, serde_json::Value>,
}
