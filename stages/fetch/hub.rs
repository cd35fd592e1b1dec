//! The `hf:` source of `kind: download`: files of a Hugging Face Hub repository fetched into the
//! Hub cache (`HF_HOME`, shared with Python's `huggingface_hub`), then hard-linked into `$OUT`
//! under their repo paths. It owns naming the files (patterns are expanded against the repo
//! listing), retrying and placing them; `hf-hub` owns the cache layout, the repo listing and the
//! URLs.
//!
//! A file's transfer is ours, not `hf-hub`'s: its metadata probe sends the token to wherever the
//! Hub redirects (the CDN of an LFS file), and the token must not leave the Hub's host. Here the
//! probe follows redirects within the Hub with the token and stops at the first other host; the
//! file is then fetched from there without it (`http::fetch_with`, which resumes a `.part` blob).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::fetch::check_relative;
use crate::fetch::http::{self, Attempt, Retry, Unreachable};
use crate::progress::format_bytes;

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
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| ENDPOINT.into());
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

/// What a 401 or 403 of the Hub means.
const GATED: &str = "the repo may be gated or private: accept its terms on the Hub and set `HF_TOKEN`";

/// Where the Hub is when `HF_ENDPOINT` does not say.
const ENDPOINT: &str = "https://huggingface.co";

/// One repo at one revision on the Hub, through the cache.
struct Client {
    cache: hf_hub::Cache,
    repo: hf_hub::Repo,
    api_repo: hf_hub::api::sync::ApiRepo,
    /// `Bearer <token>`, for the Hub's host only.
    authorization: Option<String>,
    /// Follows no redirect by itself: `probe` decides where the token may go.
    probing: ureq::Agent,
    what: String,
    /// ` for stage `name`` when a download stage asked, so errors name it.
    for_stage: String,
    /// What to do when the Hub cannot be reached (see `offline_hint`).
    offline_hint: String,
}

/// Where a file's bytes are, and what the cache calls them.
#[derive(Debug, PartialEq)]
struct Probe {
    commit: String,
    etag: String,
    /// The Hub's URL of the file, or the other host it redirected to.
    location: String,
    /// Whether `location` is on the Hub's host (and gets the token).
    on_hub: bool,
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
        let authorization = env.token.as_ref().map(|token| format!("Bearer {token}"));
        let probing = http::builder().redirects(0).build();
        let offline_hint = offline_hint(hub, &env.endpoint, stage.is_some());
        Ok(Client { cache, repo, api_repo, authorization, probing, what, for_stage, offline_hint })
    }

    /// The cached file `file`, downloaded first unless the cache holds it for this revision (then
    /// no network at all). The cache is laid out as `huggingface_hub` lays it out: the bytes in
    /// `blobs/<etag>`, a link to them at `snapshots/<commit>/<file>`, the revision's commit in
    /// `refs/<revision>`.
    fn get(&self, file: &str, retry: Retry) -> anyhow::Result<PathBuf> {
        if let Some(path) = self.cache.repo(self.repo.clone()).get(file) {
            return Ok(path);
        }
        let url = self.api_repo.url(file);
        let context = |error: anyhow::Error| {
            let (what, for_stage) = (&self.what, &self.for_stage);
            // An unreachable host is named by the error; any other failure names the URL.
            match Unreachable::hinted(error, || self.offline_hint.clone()) {
                Ok(error) => error.context(format!("could not download `{file}` of {what}{for_stage}")),
                Err(error) => error.context(format!("could not download `{file}` of {what} (`{url}`){for_stage}")),
            }
        };
        let probe = retry.run(&url, || self.probe(&url)).map_err(context)?;
        let folder = self.cache.path().join(self.repo.folder_name());
        let blob = folder.join("blobs").join(&probe.etag);
        if !blob.exists() {
            fs_err::create_dir_all(folder.join("blobs"))?;
            let part = folder.join("blobs").join(format!("{}.part", probe.etag));
            let authorization = self.authorization.as_deref().filter(|_| probe.on_hub);
            http::fetch_with(&http::agent(), &probe.location, authorization, &part, retry, file).map_err(context)?;
            fs_err::rename(&part, &blob)?;
            http::remove_if_present(&http::validator_path(&part))?;
        }
        let pointer = folder.join("snapshots").join(&probe.commit).join(file);
        if let Some(parent) = pointer.parent() {
            fs_err::create_dir_all(parent)?;
        }
        http::remove_if_present(&pointer)?;
        // Relative, as huggingface_hub makes it: `../../blobs/<etag>`, one more `..` per folder.
        let up = "../".repeat(file.matches('/').count() + 2);
        std::os::unix::fs::symlink(format!("{up}blobs/{}", probe.etag), &pointer)?;
        self.cache.repo(self.repo.clone()).create_ref(&probe.commit)?;
        Ok(pointer)
    }

    /// Asks the Hub for `url` (one byte of it) and follows its redirects while they stay on its
    /// host, with the token; a redirect to another host ends the probe there, and the token
    /// never goes to it. The first answer that names the commit and the file's etag names them.
    fn probe(&self, url: &str) -> Result<Probe, Attempt> {
        let hub_host = host(url);
        let (mut commit, mut etag) = (None, None);
        let mut location = url.to_string();
        for _ in 0..10 {
            let mut request = self.probing.get(&location).set("Range", "bytes=0-0");
            if let Some(authorization) = &self.authorization {
                request = request.set("Authorization", authorization);
            }
            let response = match request.call() {
                Ok(response) => response,
                Err(ureq::Error::Status(code @ (401 | 403), response)) => {
                    let error = anyhow!("the server answered {code} {}", response.status_text());
                    return Err(Attempt::Fatal(error.context(GATED)));
                }
                Err(error) => return Err(http::failed(error)),
            };
            commit = commit.or_else(|| response.header("X-Repo-Commit").map(str::to_string));
            let named = response.header("X-Linked-Etag").or_else(|| response.header("ETag"));
            etag = etag.or_else(|| named.map(|etag| etag.trim_start_matches("W/").replace('"', "")));
            if !(300..400).contains(&response.status()) {
                break;
            }
            let next = response.header("Location").ok_or_else(|| {
                Attempt::Fatal(anyhow!("the Hub answered {} without a `Location`", response.status()))
            })?;
            location = join(&location, next);
            if host(&location) != hub_host {
                break;
            }
        }
        let missing = |what| Attempt::Fatal(anyhow!("the Hub's answer has no `{what}` header"));
        Ok(Probe {
            commit: commit.ok_or_else(|| missing("X-Repo-Commit"))?,
            etag: etag.ok_or_else(|| missing("ETag"))?,
            on_hub: host(&location) == hub_host,
            location,
        })
    }
}

/// What to do when the Hub at `endpoint` cannot be reached: go where it can be, use a copy of
/// the Hub cache, another endpoint, or the files by path (a download stage's `path:`, or the
/// folder of a model named by the Hub).
fn offline_hint(hub: &Hub, endpoint: &str, for_stage: bool) -> String {
    let reach = match endpoint == ENDPOINT {
        true => "run where the network reaches the Hub".to_string(),
        false => format!("check `HF_ENDPOINT` (`{endpoint}`)"),
    };
    let by_path = match for_stage {
        true => "download the files elsewhere and use a `path:` download".to_string(),
        false => {
            let name = hub.repo.rsplit('/').next().unwrap_or(&hub.repo);
            format!(
                "download {} of `{}` elsewhere and name their folder instead of `{name}`",
                quoted(&hub.files),
                hub.repo
            )
        }
    };
    let mirror = if endpoint == ENDPOINT { ", point `HF_ENDPOINT` at a mirror" } else { "" };
    format!("{reach}, copy `HF_HOME` from a machine that has the files{mirror}, or {by_path}")
}

/// `a`, `a` and `b`, `a`, `b` and `c`.
fn quoted(names: &[String]) -> String {
    let names: Vec<String> = names.iter().map(|name| format!("`{name}`")).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => names.concat(),
    }
}

/// `scheme://host:port` of a URL.
fn host(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |at| at + 3);
    let end = url[after_scheme..].find('/').map_or(url.len(), |at| after_scheme + at);
    &url[..end]
}

/// A `Location` read against the URL that sent it: absolute, host-relative (`/path`) or
/// scheme-relative (`//host/path`).
fn join(base: &str, location: &str) -> String {
    if location.contains("://") {
        location.to_string()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("{}//{rest}", &base[..base.find("://").map_or(0, |at| at + 1)])
    } else if location.starts_with('/') {
        format!("{}{location}", host(base))
    } else {
        let directory = &base[..base.rfind('/').map_or(base.len(), |at| at + 1)];
        format!("{directory}{location}")
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
    let files = hub_files(hub, &client.api_repo, retry, &client.offline_hint)
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
fn hub_files(
    hub: &Hub,
    api_repo: &hf_hub::api::sync::ApiRepo,
    retry: Retry,
    offline_hint: &str,
) -> anyhow::Result<Vec<String>> {
    let listing = match hub.files.iter().any(|file| is_pattern(file)) {
        true => {
            let url = api_repo.info_request().url().to_string();
            // A copied cache holds files, not the listing: it serves only files named in full.
            let hint = || format!("{offline_hint} (a copied `HF_HOME` serves files named in full, not patterns)");
            let info = with_retries(retry, &url, || api_repo.info()).map_err(|error| {
                Unreachable::hinted(error, hint).unwrap_or_else(|error| error.context(format!("`{url}`")))
            })?;
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
/// retried; a host that is not there, a 401/403 (with a hint) and anything else fail at once.
fn with_retries<T>(
    retry: Retry,
    url: &str,
    mut call: impl FnMut() -> Result<T, hf_hub::api::sync::ApiError>,
) -> anyhow::Result<T> {
    use hf_hub::api::sync::ApiError;
    retry.run(url, || {
        call().map_err(|error| match error {
            ApiError::RequestError(request) => match *request {
                ureq::Error::Status(code @ (401 | 403), response) => {
                    let error = anyhow!("the server answered {code} {}", response.status_text());
                    Attempt::Fatal(error.context(GATED))
                }
                request => http::failed(request),
            },
            ApiError::IoError(_) | ApiError::TooManyRetries(_) => Attempt::Retry(error.into()),
            error => Attempt::Fatal(error.into()),
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
    fn the_token_goes_to_the_hub_and_its_own_redirects_never_to_another_host() {
        let hub = FakeHub::start();
        let cdn = Server::start();
        // An LFS file: the Hub answers 302 to its CDN, naming the commit and the file's etag.
        let weights = vec![7u8; 3000];
        let etag = blake3::hash(&weights).to_hex().to_string();
        cdn.route("/lfs/weights", Route::new(weights.clone()).header("ETag", "\"cdn\""));
        let redirect = Route { redirect: Some(format!("{}/lfs/weights", cdn.url)), ..Route::default() };
        let redirect = redirect.header("X-Repo-Commit", COMMIT).header("X-Linked-Etag", &format!("\"{etag}\""));
        hub.server.route("/openai-community/gpt2/resolve/main/model.safetensors", redirect);
        // A renamed repo: a redirect on the Hub's own host keeps the token.
        hub.file("openai-community/gpt2-renamed", "config.json", b"{}");
        let moved = Route {
            redirect: Some("/openai-community/gpt2-renamed/resolve/main/config.json".into()),
            ..Route::default()
        };
        hub.server.route("/openai-community/gpt2/resolve/main/config.json", moved);

        let spec = Hub {
            repo: "openai-community/gpt2".into(),
            files: files(&["model.safetensors", "config.json"]),
            ..Hub::default()
        };
        let (ctx, report) = hub.run(spec);
        report.unwrap();
        assert_eq!(fs_err::read(ctx.out.join("model.safetensors")).unwrap(), weights);
        assert_eq!(fs_err::read(ctx.out.join("config.json")).unwrap(), b"{}");
        let on_hub = hub.server.requests();
        assert_eq!(on_hub.len(), 4, "{on_hub:?}");
        assert!(on_hub.iter().all(|request| request.headers["authorization"] == "Bearer hf_secret"), "{on_hub:?}");
        let on_cdn = cdn.requests();
        assert!(!on_cdn.is_empty());
        assert!(on_cdn.iter().all(|request| !request.headers.contains_key("authorization")), "{on_cdn:?}");
        // The cache is huggingface_hub's: the snapshot links to the blob named by the etag.
        let snapshot = hub.dir.path().join(format!("hf/hub/models--openai-community--gpt2/snapshots/{COMMIT}"));
        let link = fs_err::read_link(snapshot.join("model.safetensors")).unwrap();
        assert_eq!(link, Path::new(&format!("../../blobs/{etag}")));
        let reference = hub.dir.path().join("hf/hub/models--openai-community--gpt2/refs/main");
        assert_eq!(fs_err::read_to_string(reference).unwrap(), COMMIT);
    }

    #[test]
    fn host_and_join_read_locations_as_browsers_do() {
        assert_eq!(host("https://huggingface.co/gpt2/resolve/main/x"), "https://huggingface.co");
        assert_eq!(host("http://127.0.0.1:8080"), "http://127.0.0.1:8080");
        let base = "https://huggingface.co/a/resolve/main/x";
        assert_eq!(join(base, "https://cdn-lfs.hf.co/b"), "https://cdn-lfs.hf.co/b");
        assert_eq!(join(base, "//cdn-lfs.hf.co/b"), "https://cdn-lfs.hf.co/b");
        assert_eq!(join(base, "/c/resolve/main/x"), "https://huggingface.co/c/resolve/main/x");
        assert_eq!(join(base, "y"), "https://huggingface.co/a/resolve/main/y");
    }

    #[test]
    fn a_broken_connection_resumes_from_the_cache_part_file() {
        let hub = FakeHub::start();
        let body: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let route = hub.file("openai-community/gpt2", "model.safetensors", &body);
        // The first request (the probe, `Range: bytes=0-0`) is whole; the download breaks after
        // 20000 bytes.
        let route = Route { breaks: 2, break_after: 20_000, ..route };
        hub.server.route("/openai-community/gpt2/resolve/main/model.safetensors", route);
        let spec = Hub { repo: "openai-community/gpt2".into(), files: files(&["model.safetensors"]), ..Hub::default() };
        let (ctx, report) = hub.run(spec);
        report.unwrap();
        assert_eq!(fs_err::read(ctx.out.join("model.safetensors")).unwrap(), body);
        let ranges: Vec<String> =
            hub.server.requests().iter().filter_map(|request| request.headers.get("range").cloned()).collect();
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
    fn an_unreachable_hub_fails_at_once_in_one_line_saying_what_to_do() {
        let hub = FakeHub::start();
        let dir = hub.dir.path();
        let ctx = Context { stage: "owt".into(), root: dir.into(), out: dir.join("out"), inputs: BTreeMap::new() };
        let env =
            || Ok(HubEnv { endpoint: "http://nonexistent.invalid".into(), cache: dir.join("hf/hub"), token: None });
        let run = |files: &[&str]| {
            let hf = Hub {
                repo: "a/b".into(),
                repo_type: RepoType::Dataset,
                files: files.iter().map(|file| file.to_string()).collect(),
                ..Hub::default()
            };
            let config = Config { hf: Some(hf), retries: 5, backoff_ms: 60_000, ..Config::default() };
            let started = std::time::Instant::now();
            let error = format!("{:#}", run_with(&config, &ctx, &env).unwrap_err());
            assert!(started.elapsed() < std::time::Duration::from_secs(5), "no retry for a host that is not there");
            error
        };
        let unreachable = "cannot reach `nonexistent.invalid` (the name does not resolve): offline?";
        let hint = "check `HF_ENDPOINT` (`http://nonexistent.invalid`), copy `HF_HOME` from a machine that has the \
                    files, or download the files elsewhere and use a `path:` download";
        assert_eq!(
            run(&["data/*.parquet"]),
            format!(
                "could not list the files of dataset `a/b` at revision `main` for stage `owt`: {unreachable}\nhint: \
                 {hint} (a copied `HF_HOME` serves files named in full, not patterns)"
            )
        );
        assert_eq!(
            run(&["data/0.parquet"]),
            format!(
                "could not download `data/0.parquet` of dataset `a/b` at revision `main` for stage `owt`: \
                 {unreachable}\nhint: {hint}"
            )
        );
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
