//! The `hf:` source of `kind: download`: files of a Hugging Face Hub repository fetched through
//! `hf-hub`'s sync client into the Hub cache (`HF_HOME`, shared with Python's `huggingface_hub`),
//! then hard-linked into `$OUT` under their repo paths. It owns naming the files (patterns are
//! expanded against the repo listing), retrying and placing them; `hf-hub` owns the cache layout
//! and resuming a file from its `.part` blob.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::fetch::check_relative;
use crate::fetch::http::{self, Attempt, Retry};
use crate::progress::format_bytes;
use crate::{Progress, Unit};

/// Files of one Hub repository at one revision, e.g.
/// `{repo: openai-community/gpt2, files: [config.json, model.safetensors]}` or
/// `{repo: HuggingFaceFW/fineweb-edu, type: dataset, files: ["sample/10BT/*.parquet"]}`.
/// They land in `$OUT` under their paths in the repo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hub {
    /// `owner/name` on the Hub.
    pub repo: String,
    /// `model` or `dataset`; the Hub keeps them apart (`/datasets/...` URLs). Default `model`,
    /// as on the Hub.
    #[serde(rename = "type")]
    pub repo_type: RepoType,
    /// A branch, tag or commit. Default `main`; pin a commit for bytes that never change under
    /// the same key (a branch is fetched once per key and then served from the Hub cache).
    pub revision: String,
    /// Paths in the repo, or glob patterns over them (`*` stays within a folder, `**` crosses
    /// folders), e.g. `sample/10BT/*.parquet`. A pattern lists the repo through the Hub API and
    /// must match at least one file. There is no default: a whole repo is rarely what is wanted
    /// (gpt2's holds the weights in five formats).
    pub files: Vec<String>,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub { repo: String::new(), repo_type: RepoType::Model, revision: "main".into(), files: Vec::new() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RepoType {
    Model,
    Dataset,
}

impl RepoType {
    fn name(self) -> &'static str {
        match self {
            RepoType::Model => "model",
            RepoType::Dataset => "dataset",
        }
    }
}

/// Where the Hub is and who we are to it, from `HF_ENDPOINT`, `HF_HOME` (or `HF_HUB_CACHE`) and
/// `HF_TOKEN` (or the token file `huggingface-cli login` writes). The token goes into request
/// headers only: never into params, outputs or messages.
pub(crate) struct HubEnv {
    pub endpoint: String,
    pub cache: PathBuf,
    pub token: Option<String>,
}

impl HubEnv {
    pub fn from_process() -> anyhow::Result<HubEnv> {
        let var = |name: &str| std::env::var(name).ok().filter(|value| !value.trim().is_empty());
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into());
        let home = match (var("HF_HOME"), std::env::var_os("HOME")) {
            (Some(home), _) => PathBuf::from(home),
            (None, Some(home)) => Path::new(&home).join(".cache/huggingface"),
            (None, None) => bail!("cannot find the Hugging Face cache: set `HF_HOME`"),
        };
        let cache = var("HF_HUB_CACHE").map_or_else(|| home.join("hub"), PathBuf::from);
        let token = var("HF_TOKEN").or_else(|| hf_hub::Cache::new(home.join("hub")).token());
        Ok(HubEnv { endpoint: endpoint.trim_end_matches('/').to_string(), cache, token })
    }
}

/// One repo at one revision on the Hub, through the cache.
struct Client {
    cache: hf_hub::Cache,
    repo: hf_hub::Repo,
    api_repo: hf_hub::api::sync::ApiRepo,
    what: String,
    /// ` for stage `name`` when a download stage asked, so errors name it.
    for_stage: String,
}

impl Client {
    fn new(hub: &Hub, env: &HubEnv, stage: Option<&str>) -> anyhow::Result<Client> {
        let for_stage = stage.map_or_else(String::new, |stage| format!(" for stage `{stage}`"));
        let what = format!("{} `{}` at revision `{}`", hub.repo_type.name(), hub.repo, hub.revision);
        let cache = hf_hub::Cache::new(env.cache.clone());
        let api = hf_hub::api::sync::ApiBuilder::from_cache(cache.clone())
            .with_endpoint(env.endpoint.clone())
            .with_token(env.token.clone())
            .with_progress(false)
            .with_user_agent("nanoflow", env!("CARGO_PKG_VERSION"))
            .build()
            .with_context(|| format!("could not set up the Hub client{for_stage}"))?;
        let repo_type = match hub.repo_type {
            RepoType::Model => hf_hub::RepoType::Model,
            RepoType::Dataset => hf_hub::RepoType::Dataset,
        };
        let repo = hf_hub::Repo::with_revision(hub.repo.clone(), repo_type, hub.revision.clone());
        let api_repo = api.repo(repo.clone());
        Ok(Client { cache, repo, api_repo, what, for_stage })
    }

    /// The cached file `file`, downloaded first unless the cache holds it for this revision (then
    /// no network at all).
    fn get(&self, file: &str, retry: Retry) -> anyhow::Result<PathBuf> {
        if let Some(path) = self.cache.repo(self.repo.clone()).get(file) {
            return Ok(path);
        }
        let url = self.api_repo.url(file);
        with_retries(retry, &url, || {
            let progress = HubProgress(Progress::new(file, Unit::Bytes, None));
            self.api_repo.download_with_progress(file, progress)
        })
        .with_context(|| format!("could not download `{file}` of {} (`{url}`){}", self.what, self.for_stage))
    }
}

/// The files of a Hub repo, fetched into the Hub cache (or found there): their paths there, by
/// file. For models named by the Hub (`init_from: gpt2`) rather than by a download stage.
pub(crate) fn fetch(hub: &Hub, retry: Retry) -> anyhow::Result<Vec<PathBuf>> {
    let client = Client::new(hub, &HubEnv::from_process()?, None)?;
    hub.files.iter().map(|file| client.get(file, retry)).collect()
}

/// Fetches `hub`'s files and places them under `out` at their repo paths, for stage `stage`:
/// (files, bytes, a one-line summary).
pub(crate) fn download(
    hub: &Hub,
    retry: Retry,
    env: &HubEnv,
    stage: &str,
    out: &Path,
) -> anyhow::Result<(u64, u64, String)> {
    let client = Client::new(hub, env, Some(stage))?;
    let (what, for_stage) = (&client.what, &client.for_stage);
    let files = hub_files(hub, &client.api_repo, retry)
        .with_context(|| format!("could not list the files of {what}{for_stage}"))?;
    let (mut bytes, count) = (0, files.len() as u64);
    for file in &files {
        let cached = client.get(file, retry)?;
        let target = out.join(file);
        bytes += place(&cached, &target)
            .with_context(|| format!("could not place `{file}` of {what} in the output{for_stage}"))?;
    }
    Ok((count, bytes, format!("{count} files of {what}, {}", format_bytes(bytes as f64))))
}

/// The repo paths `hub.files` names, patterns expanded against the repo listing (fetched only
/// when there is a pattern), in order and without repeats.
fn hub_files(hub: &Hub, api_repo: &hf_hub::api::sync::ApiRepo, retry: Retry) -> anyhow::Result<Vec<String>> {
    let listing = match hub.files.iter().any(|file| is_pattern(file)) {
        true => {
            let url = api_repo.info_request().url().to_string();
            let info = with_retries(retry, &url, || api_repo.info()).with_context(|| format!("`{url}`"))?;
            info.siblings.into_iter().map(|sibling| sibling.rfilename).collect()
        }
        false => Vec::new(),
    };
    expand(&hub.files, listing)
}

pub(crate) fn is_pattern(file: &str) -> bool {
    file.contains(['*', '?', '['])
}

/// Shell-style patterns: `*` stays within a folder, `**` as a whole segment crosses folders.
pub(crate) fn pattern(text: &str) -> Result<glob::Pattern, String> {
    glob::Pattern::new(text).map_err(|error| format!("`{text}` is not a valid pattern: {error}"))
}

fn expand(entries: &[String], mut listing: Vec<String>) -> anyhow::Result<Vec<String>> {
    listing.sort();
    let options = glob::MatchOptions { case_sensitive: true, require_literal_separator: true, ..Default::default() };
    let mut files: Vec<String> = Vec::new();
    for entry in entries {
        if !is_pattern(entry) {
            files.push(entry.clone());
            continue;
        }
        let pattern = pattern(entry).map_err(|error| anyhow!(error))?;
        let matched: Vec<&String> = listing.iter().filter(|name| pattern.matches_with(name, options)).collect();
        if matched.is_empty() {
            bail!("no file in the repo matches `{entry}`");
        }
        files.extend(matched.into_iter().cloned());
    }
    let mut seen = std::collections::HashSet::new();
    files.retain(|file| seen.insert(file.clone()));
    for file in &files {
        check_relative(file).map_err(|error| anyhow!("the repo lists an unsafe path: {error}"))?;
    }
    Ok(files)
}

/// `call` under `retry`: transient errors (timeouts, 408, 429, 5xx, broken connections) are
/// retried, a 401/403 fails at once with a hint, anything else fails at once.
fn with_retries<T>(
    retry: Retry,
    url: &str,
    mut call: impl FnMut() -> Result<T, hf_hub::api::sync::ApiError>,
) -> anyhow::Result<T> {
    use hf_hub::api::sync::ApiError;
    retry.run(url, || {
        call().map_err(|error| {
            let status = match &error {
                ApiError::RequestError(request) => match request.as_ref() {
                    ureq::Error::Status(code, _) => Some(*code),
                    ureq::Error::Transport(_) => None,
                },
                _ => None,
            };
            let transient = match &error {
                ApiError::RequestError(_) => status.is_none_or(|code| code == 408 || code == 429 || code >= 500),
                ApiError::IoError(_) | ApiError::TooManyRetries(_) => true,
                _ => false,
            };
            let error = anyhow::Error::new(error);
            match status {
                Some(401 | 403) => Attempt::Fatal(
                    error.context("the repo may be gated or private: accept its terms on the Hub and set `HF_TOKEN`"),
                ),
                _ if transient => Attempt::Retry(error),
                _ => Attempt::Fatal(error),
            }
        })
    })
}

/// Puts the cached file at `target`: a hard link when the cache is on the same filesystem (no
/// copy of a multi-gigabyte parquet file; cache blobs are never modified in place), else a copy.
fn place(cached: &Path, target: &Path) -> anyhow::Result<u64> {
    let blob = fs_err::canonicalize(cached)?;
    if let Some(parent) = target.parent() {
        fs_err::create_dir_all(parent)?;
    }
    http::remove_if_present(target)?;
    if fs_err::hard_link(&blob, target).is_err() {
        fs_err::copy(&blob, target)?;
    }
    Ok(fs_err::metadata(target)?.len())
}

/// `hf-hub`'s progress callbacks onto our progress lines.
struct HubProgress(Progress);

impl hf_hub::api::Progress for HubProgress {
    fn init(&mut self, size: usize, _filename: &str) {
        self.0.set_total(Some(size as u64));
        self.0.set_done(0);
    }

    fn update(&mut self, size: usize) {
        self.0.inc(size as u64);
    }

    fn finish(&mut self) {
        self.0.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::download::{Config, run_with};
    use crate::{Context, Report};
    use nanoflow_test_support::{Route, Server};
    use std::collections::BTreeMap;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    struct FakeHub {
        server: Server,
        dir: tempfile::TempDir,
    }

    impl FakeHub {
        fn start() -> FakeHub {
            FakeHub { server: Server::start(), dir: tempfile::tempdir().unwrap() }
        }

        /// Serves `file` the way the Hub does at `/{prefix}{repo}/resolve/{revision}/{file}`: the
        /// `etag` names the cache blob, `x-repo-commit` the snapshot folder.
        fn file(&self, prefix: &str, file: &str, body: &[u8]) -> Route {
            let etag = format!("\"{}\"", blake3::hash(body).to_hex());
            let route = Route::new(body).header("ETag", &etag).header("X-Repo-Commit", COMMIT);
            self.server.route(&format!("/{prefix}/resolve/main/{file}"), route.clone());
            route
        }

        fn env(&self) -> anyhow::Result<HubEnv> {
            Ok(HubEnv {
                endpoint: self.server.url.clone(),
                cache: self.dir.path().join("hf/hub"),
                token: Some("hf_secret".into()),
            })
        }

        fn run(&self, hub: Hub) -> (Context, anyhow::Result<Report>) {
            let out = self.dir.path().join(format!("out{}", self.server.requests().len()));
            fs_err::create_dir_all(&out).unwrap();
            let ctx = Context { stage: "gpt2".into(), root: self.dir.path().into(), out, inputs: BTreeMap::new() };
            let config = Config { hf: Some(hub), retries: 2, backoff_ms: 1, ..Config::default() };
            let report = run_with(&config, &ctx, &|| self.env());
            (ctx, report)
        }
    }

    fn files(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| name.to_string()).collect()
    }

    #[test]
    fn model_files_land_under_their_repo_paths_and_come_from_the_cache_next_time() {
        let hub = FakeHub::start();
        hub.file("openai-community/gpt2", "config.json", b"{\"n_layer\": 12}");
        hub.file("openai-community/gpt2", "onnx/decoder.onnx", &[1; 5000]);
        let spec = Hub {
            repo: "openai-community/gpt2".into(),
            files: files(&["config.json", "onnx/decoder.onnx"]),
            ..Hub::default()
        };
        let (ctx, report) = hub.run(spec.clone());
        let report = report.unwrap();
        assert_eq!(fs_err::read(ctx.out.join("config.json")).unwrap(), b"{\"n_layer\": 12}");
        assert_eq!(fs_err::read(ctx.out.join("onnx/decoder.onnx")).unwrap(), [1; 5000]);
        assert_eq!(report.summary, "2 files of model `openai-community/gpt2` at revision `main`, 4.9 KiB");
        let requests = hub.server.requests();
        assert!(requests.iter().all(|request| request.headers["authorization"] == "Bearer hf_secret"));
        assert!(!serde_json::to_string(&report).unwrap().contains("hf_secret"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            assert_eq!(fs_err::metadata(ctx.out.join("config.json")).unwrap().nlink(), 2, "hard-linked from the cache");
        }

        // The cache holds this revision now: a second stage needs no network.
        let (ctx, report) = hub.run(spec);
        report.unwrap();
        assert_eq!(fs_err::read(ctx.out.join("onnx/decoder.onnx")).unwrap(), [1; 5000]);
        assert_eq!(hub.server.requests().len(), requests.len());
    }

    #[test]
    fn dataset_patterns_expand_against_the_repo_listing() {
        let hub = FakeHub::start();
        let repo = "datasets/HuggingFaceFW/fineweb-edu";
        let names = ["README.md", "sample/100BT/000.parquet", "sample/10BT/000.parquet", "sample/10BT/001.parquet"];
        for name in names.iter().chain(&["sample/10BT/extra/002.parquet"]) {
            hub.file(repo, name, name.as_bytes());
        }
        let siblings: Vec<_> = names.iter().map(|name| serde_json::json!({"rfilename": name})).collect();
        let listing = serde_json::json!({"sha": COMMIT, "siblings": siblings}).to_string();
        hub.server.route("/api/datasets/HuggingFaceFW/fineweb-edu/revision/main", Route::new(listing));
        let spec = Hub {
            repo: "HuggingFaceFW/fineweb-edu".into(),
            repo_type: RepoType::Dataset,
            files: files(&["sample/10BT/*.parquet", "README.md"]),
            ..Hub::default()
        };
        let (ctx, report) = hub.run(spec.clone());
        assert_eq!(report.unwrap().metrics["files"], 3);
        assert_eq!(fs_err::read_to_string(ctx.out.join("sample/10BT/001.parquet")).unwrap(), "sample/10BT/001.parquet");
        assert!(ctx.out.join("README.md").exists());
        assert!(!ctx.out.join("sample/100BT").exists());

        let spec = Hub { files: files(&["sample/1BT/*.parquet"]), ..spec };
        let error = format!("{:#}", hub.run(spec).1.unwrap_err());
        assert_eq!(
            error,
            "could not list the files of dataset `HuggingFaceFW/fineweb-edu` at revision `main` for stage `gpt2`: \
             no file in the repo matches `sample/1BT/*.parquet`"
        );
    }

    #[test]
    fn a_broken_connection_resumes_from_the_cache_part_file() {
        let hub = FakeHub::start();
        let body: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let route = hub.file("openai-community/gpt2", "model.safetensors", &body);
        // The first request (hf-hub's metadata probe, `Range: bytes=0-0`) is whole; the download
        // breaks after 20000 bytes.
        let route = Route { breaks: 2, break_after: 20_000, ..route };
        hub.server.route("/openai-community/gpt2/resolve/main/model.safetensors", route);
        let spec = Hub { repo: "openai-community/gpt2".into(), files: files(&["model.safetensors"]), ..Hub::default() };
        let (ctx, report) = hub.run(spec);
        report.unwrap();
        assert_eq!(fs_err::read(ctx.out.join("model.safetensors")).unwrap(), body);
        let ranges: Vec<String> =
            hub.server.requests().iter().map(|request| request.headers["range"].clone()).collect();
        assert!(ranges.contains(&"bytes=20000-".to_string()), "{ranges:?}");
    }

    #[test]
    fn a_missing_file_names_the_file_the_repo_and_the_url() {
        let hub = FakeHub::start();
        let spec = Hub { repo: "openai-community/gpt2".into(), files: files(&["nope.bin"]), ..Hub::default() };
        let error = format!("{:#}", hub.run(spec).1.unwrap_err());
        let url = format!("{}/openai-community/gpt2/resolve/main/nope.bin", hub.server.url);
        assert!(
            error.starts_with(&format!(
                "could not download `nope.bin` of model `openai-community/gpt2` at revision `main` (`{url}`) for stage `gpt2`: "
            )),
            "{error}"
        );
        assert!(error.contains("404"), "{error}");
        assert_eq!(hub.server.requests().len(), 1, "a 404 is not retried");
        assert_eq!(hub.server.requests()[0].path, "/openai-community/gpt2/resolve/main/nope.bin");
    }

    #[test]
    fn patterns_match_within_or_across_folders() {
        let listing = files(&["b.parquet", "sample/10BT/000.parquet", "sample/10BT/x/001.parquet", "sample/a.json"]);
        let expand = |entries: &[&str]| expand(&files(entries), listing.clone()).map_err(|e| e.to_string());
        assert_eq!(expand(&["sample/10BT/*.parquet"]).unwrap(), ["sample/10BT/000.parquet"]);
        assert_eq!(
            expand(&["sample/**/*.parquet", "b.parquet"]).unwrap(),
            ["sample/10BT/000.parquet", "sample/10BT/x/001.parquet", "b.parquet"]
        );
        assert_eq!(expand(&["*.parquet"]).unwrap(), ["b.parquet"]);
        assert_eq!(expand(&["*.txt"]).unwrap_err(), "no file in the repo matches `*.txt`");
    }
}
