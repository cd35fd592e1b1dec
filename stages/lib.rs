//! The stage kinds: what each `kind:` of pipeline.yaml does, and nothing about DAGs, keys or the
//! store (that is the engine's half, in `src/`).
//!
//! Every kind is a file at the top of this crate (the file name is what `kind:` says) with a
//! `Config` (a serde struct with `deny_unknown_fields`, its defaults in one place), a `VERSION`
//! that enters the content key, `check(&Config, &Upstream) -> Result<(), Invalid>` (everything
//! `pipeline.yaml` decides: the engine calls it for every stage before anything runs, so a bad
//! param exits 2 instead of failing after hours of upstream work) and
//! `run(&Config, &Context) -> anyhow::Result<Report>`. The engine calls `run` in a child process
//! with an output directory that only becomes visible once `run` returns `Ok`, and with a config
//! that `check` passed.
//!
//! What the kinds use sits in folders beside them, and depends on no kind: `gpt/` (the model and
//! everything that touches tensors: the only place that imports candle), `formats/` (token
//! shards, meta.json, BPE, tokenizers, the training record) and `fetch/` (HTTP, the Hub,
//! digests).

// The kinds, one file each: the file name is what `kind:` says.
pub mod command;
pub mod download;
pub mod eval;
pub mod export;
pub mod finetune;
pub mod sample;
pub mod tokenize;
pub mod train;

// What the kinds use.
pub mod fetch;
pub mod formats;
pub mod gpt;
pub mod interrupt;
pub mod progress;

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
    /// `value` (a config written into an output) with paths under the project's folder made
    /// relative to it: an output names the inputs it came from, not the machine's folders, so
    /// the same run writes the same bytes wherever the project lives.
    pub fn portable(&self, mut value: serde_json::Value) -> serde_json::Value {
        fn walk(value: &mut serde_json::Value, root: &std::path::Path) {
            // Paths inside sentences too ("the best checkpoint of `…/out`").
            match value {
                serde_json::Value::String(text) => {
                    let prefix = format!("{}/", root.display());
                    if text.contains(&prefix) {
                        *text = text.replace(&prefix, "");
                    }
                }
                serde_json::Value::Array(items) => items.iter_mut().for_each(|item| walk(item, root)),
                serde_json::Value::Object(map) => map.values_mut().for_each(|item| walk(item, root)),
                _ => {}
            }
        }
        walk(&mut value, &self.root);
        value
    }

    /// A context for unit tests: the stage writes into `dir/out`, relative paths resolve in `dir`.
    #[cfg(test)]
    pub(crate) fn for_test(dir: &std::path::Path, stage: &str) -> Context {
        let out = dir.join("out");
        fs_err::create_dir_all(&out).expect("a test output directory");
        Context { stage: stage.into(), root: dir.to_path_buf(), out, inputs: BTreeMap::new() }
    }
}

/// A param no run could use, found by a kind's `check`: the key (empty when no one key is to
/// blame) and what is wrong with it, as a lowercase phrase that follows the key's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub key: String,
    pub message: String,
    /// The key is required and absent (or empty); `message` says what it should be.
    pub required: bool,
}

impl Invalid {
    pub fn new(key: &str, message: impl Into<String>) -> Invalid {
        Invalid { key: key.to_string(), message: message.into(), required: false }
    }

    /// `key` must be given: `what` it is, e.g. "a tokenize stage's output, e.g. `data: ${tokens}`".
    pub fn required(key: &str, what: impl Into<String>) -> Invalid {
        Invalid { key: key.to_string(), message: what.into(), required: true }
    }
}

/// `key` must be given (`value` not empty): `what` says what it is.
pub fn required(key: &str, value: &str, what: impl FnOnce() -> String) -> Result<(), Invalid> {
    if value.is_empty() { Err(Invalid::required(key, what())) } else { Ok(()) }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.key.as_str(), self.required) {
            ("", _) => f.write_str(&self.message),
            (key, true) => write!(f, "`{key}` is required: {}", self.message),
            (key, false) => write!(f, "`{key}` {}", self.message),
        }
    }
}

impl std::error::Error for Invalid {}

/// `Err(Invalid)` unless `condition` holds.
pub fn ensure(condition: bool, key: &str, message: impl FnOnce() -> String) -> Result<(), Invalid> {
    if condition { Ok(()) } else { Err(Invalid::new(key, message())) }
}

/// Whether `path` is relative and stays inside the folder it is relative to (no root, no `..`):
/// what `outs`, `deps`, Hub file names and every other path that must not escape are checked by.
pub fn is_inside(path: &str) -> bool {
    use std::path::Component;
    !path.is_empty()
        && std::path::Path::new(path).components().all(|part| matches!(part, Component::Normal(_) | Component::CurDir))
}

/// `key` must be at least 1.
pub fn at_least_one(key: &str, value: usize) -> Result<(), Invalid> {
    ensure(value >= 1, key, || "must be at least 1, not 0".to_string())
}

/// What `check` may know of the rest of the pipeline: which kind of stage a `${stage}` param
/// names.
pub struct Upstream<'a> {
    kind_of: &'a dyn Fn(&str) -> Option<&'static str>,
}

impl<'a> Upstream<'a> {
    /// `kind_of(value)`: the kind of the stage whose output `value` is a path in, if it is one.
    pub fn new(kind_of: &'a dyn Fn(&str) -> Option<&'static str>) -> Upstream<'a> {
        Upstream { kind_of }
    }

    /// No stage references anything (unit tests, `nanoflow sample`).
    pub fn none() -> Upstream<'static> {
        Upstream { kind_of: &|_| None }
    }

    /// When `value` (param `key`) names a stage's output, that stage must be of one of `kinds`:
    /// `what` says what the param wants, e.g. "a tokenize stage's output".
    pub fn expect(&self, key: &str, value: &str, kinds: &[&str], what: &str) -> Result<(), Invalid> {
        match (self.kind_of)(value) {
            Some(kind) if !kinds.contains(&kind) => {
                Err(Invalid::new(key, format!("must be {what}, but `{value}` is the output of a {kind} stage")))
            }
            _ => Ok(()),
        }
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

/// This machine's name (gethostname): what manifests, leases and calibration records say.
pub fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let result = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if result != 0 {
        return "unknown".to_string();
    }
    let end = buffer.iter().position(|&byte| byte == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}
