//! The engine's one error type. Every variant carries what a person needs to find the problem:
//! the file and line (through `Origin`/`Location`), the stage and the key; `hint` adds a
//! "did you mean" where one is known. `main.rs` renders it as `error:` / `caused by:` / `hint:`.

use std::path::PathBuf;

use crate::source_map::{Location, Origin};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no `pipeline.yaml` in `{}` or any parent directory", dir.display())]
    NoPipeline { dir: PathBuf },

    #[error("could not read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid YAML at {location}: {message}")]
    Syntax { location: Location, message: String },

    #[error("`{file}` declares no stages")]
    EmptyPipeline { file: String },

    #[error("duplicate {what} `{name}` at {second} (first at {first})")]
    Duplicate { what: &'static str, name: String, first: Location, second: Location },

    #[error("{what} must be {expected} {origin}")]
    Shape { what: String, expected: &'static str, origin: Origin },

    #[error("invalid stage name `{name}` at {location}: use letters, digits, `-` and `_`")]
    InvalidName { name: String, location: Location },

    #[error("stage `{stage}` has no `kind` at {location}")]
    MissingKind { stage: String, location: Location },

    #[error("unknown kind `{kind}` in stage `{stage}` {origin}")]
    UnknownKind { stage: String, kind: String, origin: Origin, suggestion: Option<String> },

    #[error("unknown key `{key}` {place} {origin}")]
    UnknownKey { place: String, key: String, origin: Origin, suggestion: Option<String> },

    #[error("missing key `{key}` in stage `{stage}` at {location}")]
    MissingKey { stage: String, key: String, location: Location, what: Option<String> },

    #[error("invalid params in stage `{stage}` at {location}: {message}")]
    InvalidParams { stage: String, location: Location, message: String },

    #[error("invalid `{key}` in stage `{stage}` {origin}: {message}")]
    InvalidParam { stage: String, key: String, origin: Origin, message: String },

    #[error("invalid `{key}` {origin}: {message}")]
    InvalidSetting { key: String, origin: Origin, message: String },

    #[error("wrong type for `{key}` in stage `{stage}` {origin}: {message}")]
    WrongType { stage: String, key: String, origin: Origin, message: String },

    #[error("stage `{stage}` refers to unknown stage `{reference}` {origin}")]
    UnknownReference { stage: String, reference: String, origin: Origin, suggestion: Option<String> },

    #[error("target `{target}` names unknown stage `{stage}` at {location}")]
    UnknownTargetStage { target: String, stage: String, location: Location, suggestion: Option<String> },

    #[error("cycle in the stage graph: {} (stage `{}` at {location})", cycle.join(" -> "), cycle[0])]
    Cycle { cycle: Vec<String>, location: Location },

    #[error("{what} `{path}` of stage `{stage}` does not exist {origin}")]
    MissingFile { what: &'static str, stage: String, path: String, origin: Origin },

    #[error("no target or stage named `{name}`")]
    UnknownName { name: String, suggestion: Option<String> },

    #[error("no target or stage given")]
    NothingToRun { targets: Vec<String> },

    #[error("no stage, model folder or Hub GPT-2 named `{name}`")]
    UnknownModel { name: String, stages: Vec<String> },

    #[error("invalid `{option}`: {message}")]
    InvalidArgument { option: String, message: String },

    #[error("invalid `--set {argument}`: {message}")]
    InvalidSet { argument: String, message: String, suggestion: Option<String> },

    #[error("`--force {stage}` names a stage that this run does not include")]
    ForceOutsideRun { stage: String },

    /// The preflight's memory estimate of a train or finetune stage is over what the machine
    /// has (`preflight.rs`).
    #[error("stage `{stage}` needs about {needs} of memory, more than the {available} this machine has ({source_of})")]
    DoesNotFit { stage: String, needs: String, available: String, source_of: &'static str, suggestion: Option<String> },

    #[error("store error at `{}`", path.display())]
    Store {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("another nanoflow process is using the store at `{}`", path.display())]
    StoreBusy { path: PathBuf },

    #[error("stage `{stage}` has no output yet")]
    NoOutput { stage: String },

    #[error("nothing of `{}` is built yet", names.join("`, `"))]
    NothingBuilt { names: Vec<String> },

    #[error("could not write `{}`", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A command that runs a kind's code directly (`nanoflow sample`) failed in it.
    #[error("{what} failed")]
    Failed {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// `Failed` because a host is not there (offline, most often): one line and what to do,
    /// not the chain of what was being fetched.
    #[error("{what} failed: {}", unreachable.message())]
    Unreachable { what: String, unreachable: nanoflow_stages::fetch::Unreachable },
}

impl Error {
    /// 2 for anything wrong with the pipeline, a config or the arguments (nothing ran);
    /// 1 for trouble while running.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Store { .. }
            | Error::StoreBusy { .. }
            | Error::NoOutput { .. }
            | Error::NothingBuilt { .. }
            | Error::Write { .. }
            | Error::Failed { .. }
            | Error::Unreachable { .. } => 1,
            _ => 2,
        }
    }

    /// `what` (e.g. "sampling from `gpt2`") failed with `error`, from a kind's code.
    pub fn failed(what: String, error: anyhow::Error) -> Error {
        match nanoflow_stages::fetch::Unreachable::find(&error) {
            Some(unreachable) => Error::Unreachable { what, unreachable: unreachable.clone() },
            None => Error::Failed { what, source: error.into() },
        }
    }

    /// One line of advice shown under the error, when there is one.
    pub fn hint(&self) -> Option<String> {
        match self {
            Error::UnknownKind { suggestion, .. }
            | Error::UnknownKey { suggestion, .. }
            | Error::UnknownReference { suggestion, .. }
            | Error::UnknownTargetStage { suggestion, .. }
            | Error::UnknownName { suggestion, .. } => {
                suggestion.as_ref().map(|name| format!("did you mean `{name}`?"))
            }
            Error::UnknownModel { name, stages } => Some(match suggest(name, stages.iter().map(String::as_str)) {
                Some(stage) => format!("did you mean `{stage}`?"),
                None => "a model is a stage of pipeline.yaml, a folder holding ckpt.json or config.json, or gpt2, \
                         gpt2-medium, gpt2-large, gpt2-xl"
                    .to_string(),
            }),
            Error::NothingToRun { targets } if !targets.is_empty() => {
                Some(format!("targets in this pipeline: {}", targets.join(", ")))
            }
            Error::NoPipeline { .. } => Some("pass another file with `-f FILE`".to_string()),
            Error::EmptyPipeline { .. } => Some(
                "a pipeline is a `stages:` mapping, e.g. `stages: {hello: {kind: command, run: 'echo hi > $OUT/hi.txt'}}`"
                    .to_string(),
            ),
            Error::MissingKey { key, what: Some(what), .. } => Some(format!("`{key}` is {what}")),
            Error::StoreBusy { .. } => Some("wait for it to finish, then try again".to_string()),
            Error::InvalidSet { suggestion: Some(argument), .. } => Some(format!("did you mean `--set {argument}`?")),
            Error::InvalidSet { .. } => Some("write it as `--set stage.key=value`".to_string()),
            Error::NoOutput { stage } => Some(format!("run it with `nanoflow run {stage}`")),
            Error::NothingBuilt { names } => Some(format!("run it with `nanoflow run {}`", names.join(" "))),
            Error::Unreachable { unreachable, .. } => unreachable.hint.clone(),
            Error::DoesNotFit { stage, suggestion, .. } => Some(match suggestion {
                Some(fits) => format!("{fits} keep the same tokens per step and fit; or run it anyway with `--force {stage}`"),
                None => format!("a smaller model or `block_size` would fit; or run it anyway with `--force {stage}`"),
            }),
            _ => None,
        }
    }
}

/// serde_yaml's message in a person's words: without the ` at line N column M` it appends (the
/// engine shows its own position) and without its internal names.
pub fn plain_message(message: &str) -> String {
    let message = match message.find(" at line ") {
        Some(index) => &message[..index],
        None => message,
    };
    message
        .replace("unit value", "an empty value")
        .replace("expected a Value::Tagged enum", "expected a name")
        .replace(" as u128, expected any YAML value", ", which is too large")
}

/// The closest of `candidates` to `name`, if it is close enough to be what was meant: one that
/// holds every word of `name` (`shakespeare-model` -> `shakespeare-char-model`, `layer` ->
/// `n_layer`), else a typo or two away (edit distance) or sharing a stem (Jaro-Winkler), as
/// cargo and just judge it. The fewest edits wins among equals.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    fn words(text: &str) -> impl Iterator<Item = &str> {
        text.split(['-', '_', '.']).filter(|word| !word.is_empty())
    }
    let typed: Vec<&str> = words(name).collect();
    candidates
        .into_iter()
        .filter_map(|candidate| {
            let distance = strsim::damerau_levenshtein(name, candidate);
            let holds_every_word =
                !typed.is_empty() && typed.iter().all(|word| words(candidate).any(|own| own == *word));
            let close =
                distance <= (name.len().max(candidate.len()) / 3).max(1) || strsim::jaro_winkler(name, candidate) > 0.9;
            (holds_every_word || close).then_some(((!holds_every_word, distance), candidate))
        })
        .min_by_key(|(rank, _)| *rank)
        .map(|(_, candidate)| candidate.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_names_only() {
        let keys = ["n_embd", "n_layer", "n_head"];
        assert_eq!(suggest("n_embed", keys).as_deref(), Some("n_embd"));
        assert_eq!(suggest("rn", ["run", "outs", "env"]).as_deref(), Some("run"));
        assert_eq!(suggest("learning_rate", keys), None);
        assert_eq!(suggest("layer", keys).as_deref(), Some("n_layer"));
    }

    #[test]
    fn prefers_the_name_that_holds_every_word_typed() {
        // `shakespeare-text` is as few edits away (5), but holds no `model`.
        let stages =
            ["shakespeare-text", "shakespeare-char-data", "shakespeare-char-model", "finetune-shakespeare-model"];
        assert_eq!(suggest("shakespeare-model", stages).as_deref(), Some("shakespeare-char-model"));
        assert_eq!(suggest("char-model", stages).as_deref(), Some("shakespeare-char-model"));
        assert_eq!(suggest("shakespeare-txt", stages).as_deref(), Some("shakespeare-text"));
        assert_eq!(suggest("openwebtext", stages), None);
    }
}
