//! `kind: download`: brings outside bytes into the store, from exactly one of an HTTP(S) `url:`
//! (streamed, retried, resumed, optionally pinned to a digest), files of a Hugging Face Hub repo
//! (`hf:`, through `hf-hub`'s sync client and its cache) or a local `path:` (copied; the engine
//! hashes its content into the key through `local_inputs`). It owns getting complete, verified
//! files into `$OUT` under their final names; it does not decide when to download again (that is
//! the content key: the URL, repo, revision and file list are params).
//!
//! ```yaml
//! shakespeare-text:
//!   kind: download
//!   url: https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt
//!   digest: blake3:<64 hex digits>
//! fineweb-edu-10bt:
//!   kind: download
//!   hf: {repo: HuggingFaceFW/fineweb-edu, type: dataset, files: ["sample/10BT/*.parquet"]}
//! ```

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::fetch::Unreachable;
use crate::fetch::check_relative;
use crate::fetch::http::{self, Retry};
use crate::fetch::hub::{self, HubEnv};
pub use crate::fetch::hub::{Hub, RepoType};
use crate::progress::format_bytes;
use crate::{Context, Invalid, Report, Upstream, ensure};

/// Bumped when what a download stage writes changes meaning, so that every download key changes.
pub const VERSION: u32 = 1;

/// Params that only say how patiently to fetch; the bytes that land are the same.
pub const NON_SEMANTIC: &[&str] = &["retries", "backoff_ms"];
/// What each optional param means when it is unset (the report shows it as the default).
pub const UNSET: &[(&str, &str)] = &[
    ("url", "none"),
    ("hf", "none"),
    ("path", "none"),
    ("filename", "the source's last segment"),
    ("digest", "not pinned"),
];

/// A re-run of the same key keeps `$OUT`, so a `.part` file left by an interrupted run resumes.
pub const RESUMABLE: bool = true;

/// What to download: exactly one source (`check` makes sure before anything runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// An HTTP(S) URL to fetch. Exactly one of `url`, `hf` and `path` is set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Files of a Hugging Face Hub repository; see [`Hub`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hf: Option<Hub>,
    /// A local file or folder, relative to pipeline.yaml. A file is copied to `$OUT/<filename>`;
    /// a folder's contents are copied into `$OUT` as they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The name of the file in `$OUT` for a `url` or a `path` file. Unset: the last segment of
    /// the URL's path, or the local file's own name, which is what people expect to find.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    /// `blake3:<hex>` or `sha256:<hex>`: the downloaded file must have this digest, or the stage
    /// fails and keeps nothing. Unset: anything the server sends is accepted (the report prints
    /// the blake3 to pin). For a `url` or a `path` file; the Hub checks its own files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Other sources of the same file, tried in order after `url` or `path` fails: URLs, or
    /// files relative to pipeline.yaml (a copy kept in the repo makes a pipeline work with no
    /// network). Needs `digest`: the pin is what makes them the same file.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
    /// Attempts after a failed one (a broken connection, a timeout, 5xx, 429) before giving up; an
    /// attempt that receives bytes resets the count. 5 rides out a minute-long outage.
    pub retries: u32,
    /// The wait before the first retry, in milliseconds; it doubles with every failed attempt
    /// (capped at a minute). 1000 is polite to a server that is struggling.
    pub backoff_ms: u64,
}

// Options are left out of the serialized form when unset so that adding an optional param later
// does not change the key of every existing download stage.
impl Default for Config {
    fn default() -> Config {
        Config {
            url: None,
            hf: None,
            path: None,
            filename: None,
            digest: None,
            mirrors: Vec::new(),
            retries: 5,
            backoff_ms: 1000,
        }
    }
}

impl Config {
    fn pin(&self) -> anyhow::Result<Option<Digest>> {
        Ok(self.digest.as_deref().map(Digest::parse).transpose().map_err(|message| Invalid::new("digest", message))?)
    }
}

/// What serde cannot check: exactly one source, and well-formed URLs, names, digests and
/// patterns.
pub fn check(config: &Config, _upstream: &Upstream) -> Result<(), Invalid> {
    let sources = [config.url.is_some(), config.hf.is_some(), config.path.is_some()];
    match sources.iter().filter(|set| **set).count() {
        1 => {}
        0 => return Err(Invalid::new("", "a download needs one of `url`, `hf` or `path`")),
        _ => return Err(Invalid::new("", "a download takes only one of `url`, `hf` and `path`")),
    }
    if let Some(url) = &config.url {
        ensure(is_url(url), "url", || format!("must start with `http://` or `https://`, not `{url}`"))?;
    }
    if let Some(digest) = &config.digest {
        Digest::parse(digest).map_err(|message| Invalid::new("digest", message))?;
    }
    if let Some(filename) = &config.filename {
        check_file_name(filename).map_err(|message| Invalid::new("filename", message))?;
    }
    if !config.mirrors.is_empty() {
        ensure(config.digest.is_some(), "mirrors", || {
            "needs `digest`: without a pin nothing says the mirrors hold the same file".to_string()
        })?;
    }
    for (i, mirror) in config.mirrors.iter().enumerate() {
        ensure(is_url(mirror) || (!mirror.is_empty() && !mirror.contains("://")), &format!("mirrors[{i}]"), || {
            format!("must be an http(s) URL or a file relative to pipeline.yaml, not `{mirror}`")
        })?;
    }
    if let Some(hub) = &config.hf {
        if config.filename.is_some() || config.digest.is_some() {
            let key = if config.filename.is_some() { "filename" } else { "digest" };
            return Err(Invalid::new(key, "applies to `url` and `path`, not to `hf`"));
        }
        ensure(hub.repo.split('/').filter(|part| !part.is_empty()).count() == 2, "hf", || {
            format!("`repo` must be `owner/name`, not `{}`", hub.repo)
        })?;
        ensure(!hub.files.is_empty(), "hf", || "`files` must list at least one file or pattern".to_string())?;
        for file in &hub.files {
            check_relative(file).map_err(|message| Invalid::new("hf", format!("`files`: {message}")))?;
            if hub::is_pattern(file) {
                hub::pattern(file).map_err(|message| Invalid::new("hf", format!("`files`: {message}")))?;
            }
        }
    }
    Ok(())
}

/// The local files and folders whose content the engine hashes into the key: the `path`.
/// A pinned `path` is not: its bytes are the digest's, wherever they come from.
pub fn local_inputs(config: &Config) -> Vec<String> {
    match config.digest {
        Some(_) => Vec::new(),
        None => config.path.iter().cloned().collect(),
    }
}

/// The config as it enters the key (before `NON_SEMANTIC` leaves it): with a `digest`, the file
/// is defined by its bytes and its name, so where it comes from (`url`, `path`, `mirrors`) is a
/// source, not part of the key, and the name it would take from the URL is written out. Changing
/// a mirror, or the URL of a pinned file, re-runs nothing.
pub fn keyed(config: &Config) -> Config {
    let mut keyed = config.clone();
    if keyed.digest.is_some() && keyed.hf.is_none() {
        keyed.filename = file_name(config).ok();
        (keyed.url, keyed.path, keyed.mirrors) = (None, None, Vec::new());
    }
    keyed
}

pub fn run(config: &Config, ctx: &Context) -> anyhow::Result<Report> {
    run_with(config, ctx, &HubEnv::from_process)
}

/// `run` with the Hub's endpoint, cache and token coming from `hub_env` instead of the process
/// environment (tests point it at a local server).
pub(crate) fn run_with(
    config: &Config,
    ctx: &Context,
    hub_env: &dyn Fn() -> anyhow::Result<HubEnv>,
) -> anyhow::Result<Report> {
    check(config, &Upstream::none())?;
    fs_err::create_dir_all(&ctx.out)?;
    let retry = Retry { retries: config.retries, backoff: Duration::from_millis(config.backoff_ms) };
    if let Some(hub) = &config.hf {
        let (files, bytes, summary) = hub::download(hub, retry, &hub_env()?, &ctx.stage, &ctx.out)?;
        return Ok(report(summary, bytes, files, None));
    }
    let primary = config.url.iter().chain(&config.path).next().expect("check made sure that one source is set");
    let sources: Vec<&String> = std::iter::once(primary).chain(&config.mirrors).collect();
    let mut failed: Vec<anyhow::Error> = Vec::new();
    for (i, source) in sources.iter().enumerate() {
        let result = match is_url(source) {
            true => download_url(source, config, retry, ctx),
            false => copy_path(source, config, ctx),
        };
        match result {
            Ok(report) => {
                // A mirror is the documented way to work offline: one line of information, not
                // a warning per source tried (those are in log.txt).
                if i > 0 {
                    let why: Vec<String> = sources[..i]
                        .iter()
                        .zip(&failed)
                        .map(|(tried, error)| format!("`{tried}`: {}", error.root_cause()))
                        .collect();
                    eprintln!("got it from `{source}`, the bytes `digest` pins ({})", why.join("; "));
                }
                return Ok(report);
            }
            Err(error) => {
                if sources.get(i + 1).is_some() {
                    crate::progress::verbose(&format!("{error:#}; trying the next source"));
                }
                failed.push(error);
            }
        }
    }
    let hint = failed.iter().find_map(Unreachable::find).map(|unreachable| {
        format!(
            "run where `{}` can be reached, or download the file elsewhere and use a `path:` download (or \
             list it in `mirrors`, pinned by `digest`)",
            unreachable.host
        )
    });
    if failed.len() == 1 {
        let error = failed.remove(0);
        return Err(match hint {
            Some(hint) => Unreachable::hinted(error, || hint).unwrap_or_else(|error| error),
            None => error,
        });
    }
    let reasons: Vec<String> = failed.iter().map(|error| format!("\n  {error:#}")).collect();
    let hint = hint.map(|hint| format!("\nhint: {hint}")).unwrap_or_default();
    bail!(
        "stage `{}` could not get its file from any of its {} sources:{}{hint}",
        ctx.stage,
        sources.len(),
        reasons.concat()
    )
}

fn is_url(source: &str) -> bool {
    source.starts_with("http://") || source.starts_with("https://")
}

/// The file's name in `$OUT`: `filename`, else the primary source's last segment (a mirror's own
/// name does not matter: it holds the same bytes).
fn file_name(config: &Config) -> anyhow::Result<String> {
    if let Some(filename) = &config.filename {
        return Ok(filename.clone());
    }
    match (&config.url, &config.path) {
        (Some(url), _) => url_file_name(url).context("set `filename`"),
        (None, Some(path)) => {
            Ok(Path::new(path).file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default())
        }
        (None, None) => bail!("no source"),
    }
}

// --- url ---------------------------------------------------------------------------------------

fn download_url(url: &str, config: &Config, retry: Retry, ctx: &Context) -> anyhow::Result<Report> {
    let stage = &ctx.stage;
    let filename = file_name(config).with_context(|| format!("stage `{stage}`: `{url}`"))?;
    let target = ctx.out.join(&filename);
    let part = ctx.out.join(format!("{filename}.part"));
    let pin = config.pin()?;

    let bytes = http::fetch(&http::agent(), url, &part, retry, &filename)
        .with_context(|| format!("could not download `{url}` for stage `{stage}`"))?;
    let actual = Digest::of_file(pin.as_ref(), &part)
        .with_context(|| format!("could not hash `{}` for stage `{stage}`", part.display()))?;
    if let Some(expected) = &pin
        && actual != *expected
    {
        // The bytes are wrong, not merely incomplete: the next run must start over, not resume.
        http::remove_if_present(&part)?;
        http::remove_if_present(&http::validator_path(&part))?;
        bail!("`{url}` for stage `{stage}` has digest `{actual}`, but `digest` pins `{expected}`");
    }
    fs_err::rename(&part, &target)?;
    http::remove_if_present(&http::validator_path(&part))?;
    Ok(report(format!("{filename}, {}, {actual}", format_bytes(bytes as f64)), bytes, 1, Some(actual.to_string())))
}

/// `https://host/a/b/input.txt?x=1#y` -> `input.txt`.
fn url_file_name(url: &str) -> anyhow::Result<String> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = rest.split(['?', '#']).next().unwrap_or_default();
    let name = path.split_once('/').map_or("", |(_, path)| path).rsplit('/').next().unwrap_or_default();
    check_file_name(name).map_err(|_| anyhow!("the URL `{url}` does not end in a file name"))?;
    Ok(name.to_string())
}

// --- digests -----------------------------------------------------------------------------------

/// A pinned digest: `blake3:<hex>` or `sha256:<hex>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Digest {
    algorithm: Algorithm,
    hex: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    Blake3,
    Sha256,
}

impl Digest {
    fn parse(text: &str) -> Result<Digest, String> {
        let (algorithm, hex) = match text.split_once(':') {
            Some(("blake3", hex)) => (Algorithm::Blake3, hex),
            Some(("sha256", hex)) => (Algorithm::Sha256, hex),
            _ => {
                return Err(format!("must be `blake3:<hex>` or `sha256:<hex>`, not `{text}`"));
            }
        };
        if hex.len() != 64 || !hex.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err(format!("must have 64 hex digits after the `:`, not `{text}`"));
        }
        Ok(Digest { algorithm, hex: hex.to_ascii_lowercase() })
    }

    /// The digest of the file at `path` in the algorithm of `pin`; blake3 when there is no pin
    /// (for the report, so that people can pin it).
    fn of_file(pin: Option<&Digest>, path: &Path) -> anyhow::Result<Digest> {
        let algorithm = pin.map_or(Algorithm::Blake3, |pin| pin.algorithm);
        let hex = match algorithm {
            Algorithm::Blake3 => crate::fetch::digest::blake3_file(path)?,
            Algorithm::Sha256 => {
                use sha2::Digest as _;
                let mut hasher = sha2::Sha256::new();
                let mut file = fs_err::File::open(path)?;
                let mut buffer = vec![0; 1 << 20];
                loop {
                    let n = file.read(&mut buffer)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buffer[..n]);
                }
                hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect()
            }
        };
        Ok(Digest { algorithm, hex })
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.algorithm {
            Algorithm::Blake3 => "blake3",
            Algorithm::Sha256 => "sha256",
        };
        write!(f, "{name}:{}", self.hex)
    }
}

// --- path --------------------------------------------------------------------------------------

fn copy_path(path: &str, config: &Config, ctx: &Context) -> anyhow::Result<Report> {
    let stage = &ctx.stage;
    let source = ctx.root.join(path);
    let metadata = fs_err::metadata(&source).with_context(|| format!("stage `{stage}` cannot read `{path}`"))?;
    if metadata.is_dir() {
        if config.filename.is_some() || config.digest.is_some() {
            bail!("stage `{stage}`: `filename` and `digest` apply to a file, and `{path}` is a folder");
        }
        let (files, bytes) =
            copy_dir(&source, &ctx.out).with_context(|| format!("could not copy `{path}` for stage `{stage}`"))?;
        return Ok(report(format!("{files} files, {}", format_bytes(bytes as f64)), bytes, files, None));
    }
    let filename = file_name(config)?;
    let pin = config.pin()?;
    let actual = Digest::of_file(pin.as_ref(), &source)
        .with_context(|| format!("could not hash `{path}` for stage `{stage}`"))?;
    if let Some(expected) = &pin
        && actual != *expected
    {
        bail!("`{path}` for stage `{stage}` has digest `{actual}`, but `digest` pins `{expected}`");
    }
    let bytes = fs_err::copy(&source, ctx.out.join(&filename))
        .with_context(|| format!("could not copy `{path}` for stage `{stage}`"))?;
    Ok(report(format!("{filename}, {}, {actual}", format_bytes(bytes as f64)), bytes, 1, Some(actual.to_string())))
}

/// Copies the contents of `from` into `to`, following symbolic links; returns (files, bytes).
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<(u64, u64)> {
    let (mut files, mut bytes) = (0, 0);
    fs_err::create_dir_all(to)?;
    let mut entries = fs_err::read_dir(from)?.collect::<Result<Vec<_>, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let (source, target) = (entry.path(), to.join(entry.file_name()));
        if fs_err::metadata(&source)?.is_dir() {
            let (more_files, more_bytes) = copy_dir(&source, &target)?;
            files += more_files;
            bytes += more_bytes;
        } else {
            bytes += fs_err::copy(&source, &target)?;
            files += 1;
        }
    }
    Ok((files, bytes))
}

// --- shared ------------------------------------------------------------------------------------

pub(crate) fn report(summary: String, bytes: u64, files: u64, digest: Option<String>) -> Report {
    let mut report = Report { summary, ..Report::default() };
    report.metrics.insert("bytes".into(), bytes.into());
    report.metrics.insert("files".into(), files.into());
    if let Some(digest) = digest {
        report.metrics.insert("digest".into(), digest.into());
    }
    report
}

/// A single path segment that is safe to create in `$OUT`.
fn check_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\\']) {
        return Err(format!("must be a plain file name, not `{name}`"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nanoflow_test_support::{Route, Server};

    fn context(dir: &Path) -> Context {
        Context::for_test(dir, "text")
    }

    /// 100 kB that no off-by-one can reproduce by accident.
    fn body() -> Vec<u8> {
        (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect()
    }

    fn url_config(url: String) -> Config {
        Config { url: Some(url), retries: 3, backoff_ms: 1, ..Config::default() }
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            fs_err::read_dir(dir).unwrap().map(|entry| entry.unwrap().file_name().to_string_lossy().into()).collect();
        names.sort();
        names
    }

    #[test]
    fn downloads_a_url_under_its_last_segment() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let server = Server::start();
        server.route("/data/input.txt", Route::new(body()));
        let report = run(&url_config(format!("{}/data/input.txt?raw=1", server.url)), &ctx).unwrap();
        assert_eq!(fs_err::read(ctx.out.join("input.txt")).unwrap(), body());
        assert_eq!(listing(&ctx.out), ["input.txt"]);
        let blake3 = format!("blake3:{}", blake3::hash(&body()).to_hex());
        assert_eq!(report.metrics["digest"], blake3.as_str());
        assert_eq!(report.metrics["bytes"], 100_000);
        // A plain first request, with no compression that would make byte ranges meaningless.
        let request = &server.requests()[0];
        assert_eq!(request.headers.get("range"), None);
        assert_eq!(request.headers["accept-encoding"], "identity");
    }

    #[test]
    fn a_broken_connection_resumes_with_a_range() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let server = Server::start();
        let route = Route { breaks: 2, break_after: 30_000, ..Route::new(body()).header("ETag", "\"v1\"") };
        server.route("/input.txt", route);
        run(&url_config(format!("{}/input.txt", server.url)), &ctx).unwrap();
        assert_eq!(fs_err::read(ctx.out.join("input.txt")).unwrap(), body());
        assert_eq!(listing(&ctx.out), ["input.txt"]);
        let requests = server.requests();
        let ranges: Vec<_> = requests.iter().map(|request| request.headers.get("range").cloned()).collect();
        assert_eq!(ranges, [None, Some("bytes=30000-".into()), Some("bytes=60000-".into())]);
        assert_eq!(requests[2].headers["if-range"], "\"v1\"");
    }

    #[test]
    fn a_part_file_left_by_an_interrupted_run_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let server = Server::start();
        server.route("/input.txt", Route::new(body()).header("ETag", "\"v1\""));
        fs_err::write(ctx.out.join("input.txt.part"), &body()[..1000]).unwrap();
        fs_err::write(ctx.out.join("input.txt.part.validator"), "\"v1\"").unwrap();
        run(&url_config(format!("{}/input.txt", server.url)), &ctx).unwrap();
        assert_eq!(fs_err::read(ctx.out.join("input.txt")).unwrap(), body());
        assert_eq!(listing(&ctx.out), ["input.txt"]);
        assert_eq!(server.requests()[0].headers["range"], "bytes=1000-");
    }

    #[test]
    fn a_part_file_of_an_older_version_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let server = Server::start();
        server.route("/input.txt", Route::new(body()).header("ETag", "\"v2\""));
        fs_err::write(ctx.out.join("input.txt.part"), vec![7; 1000]).unwrap();
        fs_err::write(ctx.out.join("input.txt.part.validator"), "\"v1\"").unwrap();
        run(&url_config(format!("{}/input.txt", server.url)), &ctx).unwrap();
        assert_eq!(fs_err::read(ctx.out.join("input.txt")).unwrap(), body());
        assert_eq!(listing(&ctx.out), ["input.txt"]);
    }

    #[test]
    fn a_complete_part_file_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let server = Server::start();
        server.route("/input.txt", Route::new(body()));
        fs_err::write(ctx.out.join("input.txt.part"), body()).unwrap();
        run(&url_config(format!("{}/input.txt", server.url)), &ctx).unwrap();
        assert_eq!(fs_err::read(ctx.out.join("input.txt")).unwrap(), body());
        assert_eq!(server.requests().len(), 1);
    }

    #[test]
    fn server_errors_are_retried() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let server = Server::start();
        server.route("/input.txt", Route { failures: 2, ..Route::new(body()) });
        run(&url_config(format!("{}/input.txt", server.url)), &ctx).unwrap();
        assert_eq!(fs_err::read(ctx.out.join("input.txt")).unwrap(), body());
        assert_eq!(server.requests().len(), 3);
    }

    #[test]
    fn not_found_fails_at_once_naming_stage_and_url() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let server = Server::start();
        let url = format!("{}/missing.txt", server.url);
        let error = run(&url_config(url.clone()), &ctx).unwrap_err();
        assert_eq!(
            format!("{error:#}"),
            format!("could not download `{url}` for stage `text`: the server answered 404 Not Found")
        );
        assert_eq!(server.requests().len(), 1);
        assert!(listing(&ctx.out).is_empty());
    }

    /// A closed port on this machine: a URL whose connection is refused.
    fn refused_url() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/input.txt", listener.local_addr().unwrap());
        drop(listener);
        url
    }

    #[test]
    fn a_refused_connection_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let url = refused_url();
        let config = Config { retries: 5, backoff_ms: 60_000, ..url_config(url.clone()) };
        let started = std::time::Instant::now();
        let error = format!("{:#}", run(&config, &ctx).unwrap_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "no backoff for an absent host");
        let host = url.trim_start_matches("http://").trim_end_matches("/input.txt");
        assert_eq!(
            error,
            format!(
                "could not download `{url}` for stage `text`: cannot reach `{host}`: the host refused the connection \
                 (Connection refused (os error 111))\nhint: run where `{host}` can be reached, or download the file \
                 elsewhere and use a `path:` download (or list it in `mirrors`, pinned by `digest`)"
            )
        );
        assert!(listing(&ctx.out).is_empty());
    }

    #[test]
    fn a_host_that_does_not_resolve_fails_at_once_saying_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let config =
            Config { retries: 5, backoff_ms: 60_000, ..url_config("http://nonexistent.invalid/input.txt".into()) };
        let started = std::time::Instant::now();
        let error = format!("{:#}", run(&config, &ctx).unwrap_err());
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "no backoff for an absent host");
        assert_eq!(
            error,
            "could not download `http://nonexistent.invalid/input.txt` for stage `text`: cannot reach \
             `nonexistent.invalid` (the name does not resolve): offline?\nhint: run where `nonexistent.invalid` can \
             be reached, or download the file elsewhere and use a `path:` download (or list it in `mirrors`, pinned \
             by `digest`)"
        );
    }

    #[test]
    fn mirrors_are_tried_in_order_and_must_hold_the_pinned_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start();
        server.route("/wrong.txt", Route::new(b"not the file".to_vec()));
        server.route("/right.txt", Route::new(body()));
        fs_err::write(dir.path().join("copy.txt"), body()).unwrap();
        let pin = format!("blake3:{}", blake3::hash(&body()).to_hex());
        let pinned = |mirrors: Vec<String>| Config {
            digest: Some(pin.clone()),
            mirrors,
            backoff_ms: 60_000,
            ..url_config(refused_url())
        };

        // The URL's host is absent, the first mirror serves other bytes, the second the file.
        let ctx = context(dir.path());
        let mirrors = vec![format!("{}/wrong.txt", server.url), format!("{}/right.txt", server.url)];
        run(&pinned(mirrors), &ctx).unwrap();
        assert_eq!(listing(&ctx.out), ["input.txt"], "named after the URL, not the mirror");
        assert_eq!(fs_err::read(ctx.out.join("input.txt")).unwrap(), body());

        // A file in the repo serves as a mirror.
        let ctx = Context::for_test(&dir.path().join("second"), "text");
        let ctx = Context { root: dir.path().to_path_buf(), ..ctx };
        run(&pinned(vec!["copy.txt".into()]), &ctx).unwrap();
        assert_eq!(fs_err::read(ctx.out.join("input.txt")).unwrap(), body());

        // None holds it: every source's failure, in order.
        let ctx = Context::for_test(&dir.path().join("third"), "text");
        let config = pinned(vec![format!("{}/wrong.txt", server.url), "absent.txt".into()]);
        let error = format!("{:#}", run(&config, &ctx).unwrap_err());
        let lines: Vec<&str> = error.lines().collect();
        assert_eq!(lines[0], "stage `text` could not get its file from any of its 3 sources:");
        assert!(lines[1].contains("the host refused the connection"), "{error}");
        assert!(lines[2].contains("wrong.txt` for stage `text` has digest `blake3:"), "{error}");
        assert!(lines[3].contains("cannot read `absent.txt`"), "{error}");
        assert!(listing(&ctx.out).is_empty());
    }

    #[test]
    fn a_pinned_download_is_keyed_by_its_digest_not_its_sources() {
        let pinned = Config { digest: Some(format!("blake3:{}", "a".repeat(64))), ..url_config("https://a/b".into()) };
        let key = |config: &Config| serde_json::to_value(keyed(config)).unwrap();
        let digest = pinned.digest.clone().unwrap();
        assert_eq!(key(&pinned), serde_json::json!({"filename": "b", "digest": digest, "retries": 3, "backoff_ms": 1}));
        let moved =
            Config { url: Some("https://mirror/x/b".into()), mirrors: vec!["copy.txt".into()], ..pinned.clone() };
        assert_eq!(key(&moved), key(&pinned), "another source of the same file");
        let renamed = Config { url: Some("https://a/c".into()), ..pinned.clone() };
        assert_ne!(key(&renamed), key(&pinned), "the name it takes is part of what it is");
        assert!(local_inputs(&Config { url: None, path: Some("data/x.txt".into()), ..pinned.clone() }).is_empty());
        assert_eq!(
            key(&url_config("https://a/b".into())),
            serde_json::json!({"url": "https://a/b", "retries": 3, "backoff_ms": 1})
        );
        let unpinned = Config { mirrors: vec!["copy.txt".into()], ..url_config("https://a/b".into()) };
        assert_eq!(
            check(&unpinned, &Upstream::none()).unwrap_err().to_string(),
            "`mirrors` needs `digest`: without a pin nothing says the mirrors hold the same file"
        );
        let bad = Config { mirrors: vec!["ftp://a/b".into()], ..pinned };
        assert_eq!(
            check(&bad, &Upstream::none()).unwrap_err().to_string(),
            "`mirrors[0]` must be an http(s) URL or a file relative to pipeline.yaml, not `ftp://a/b`"
        );
    }

    #[test]
    fn a_digest_mismatch_keeps_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let server = Server::start();
        server.route("/input.txt", Route::new(body()));
        let url = format!("{}/input.txt", server.url);
        let wrong = format!("blake3:{}", "0".repeat(64));
        let config = Config { digest: Some(wrong.clone()), ..url_config(url.clone()) };
        let error = run(&config, &ctx).unwrap_err();
        let actual = blake3::hash(&body()).to_hex();
        assert_eq!(
            error.to_string(),
            format!("`{url}` for stage `text` has digest `blake3:{actual}`, but `digest` pins `{wrong}`")
        );
        assert!(listing(&ctx.out).is_empty());
    }

    #[test]
    fn a_matching_digest_passes_in_either_algorithm() {
        use sha2::Digest as _;
        let server = Server::start();
        server.route("/input.txt", Route::new(body()));
        let sha256: String = sha2::Sha256::digest(body()).iter().map(|byte| format!("{byte:02x}")).collect();
        let pins = [format!("blake3:{}", blake3::hash(&body()).to_hex()), format!("sha256:{}", sha256.to_uppercase())];
        for pin in pins {
            let dir = tempfile::tempdir().unwrap();
            let ctx = context(dir.path());
            let config = Config { digest: Some(pin.clone()), ..url_config(format!("{}/input.txt", server.url)) };
            let report = run(&config, &ctx).unwrap();
            assert_eq!(report.metrics["digest"], pin.to_lowercase().as_str());
            assert_eq!(fs_err::read(ctx.out.join("input.txt")).unwrap(), body());
        }
    }

    #[test]
    fn filename_overrides_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        let server = Server::start();
        server.route("/download", Route::new(body()));
        let config =
            Config { filename: Some("shakespeare.txt".into()), ..url_config(format!("{}/download", server.url)) };
        run(&config, &ctx).unwrap();
        assert_eq!(listing(&ctx.out), ["shakespeare.txt"]);
    }

    #[test]
    fn url_file_names() {
        assert_eq!(url_file_name("https://host/a/b/input.txt?x=1#y").unwrap(), "input.txt");
        assert_eq!(url_file_name("http://host:8080/input.txt").unwrap(), "input.txt");
        assert!(url_file_name("https://host/a/").is_err());
        assert!(url_file_name("https://host").is_err());
        assert!(url_file_name("https://host/..").is_err());
    }

    #[test]
    fn params_are_checked_before_running() {
        let parse = |json: serde_json::Value| serde_json::from_value::<Config>(json).map_err(|e| e.to_string());
        let check =
            |json: serde_json::Value| check(&parse(json).unwrap(), &Upstream::none()).map_err(|e| e.to_string());
        assert_eq!(check(serde_json::json!({})).unwrap_err(), "a download needs one of `url`, `hf` or `path`");
        assert_eq!(
            check(serde_json::json!({"url": "https://a/b", "path": "x"})).unwrap_err(),
            "a download takes only one of `url`, `hf` and `path`"
        );
        assert_eq!(
            check(serde_json::json!({"url": "ftp://a/b"})).unwrap_err(),
            "`url` must start with `http://` or `https://`, not `ftp://a/b`"
        );
        assert_eq!(
            check(serde_json::json!({"url": "https://a/b", "digest": "md5:00"})).unwrap_err(),
            "`digest` must be `blake3:<hex>` or `sha256:<hex>`, not `md5:00`"
        );
        assert!(
            parse(serde_json::json!({"url": "https://a/b", "retry": 3})).unwrap_err().contains("unknown field `retry`")
        );
        assert!(check(serde_json::json!({"hf": {"repo": "gpt2", "files": ["a"]}})).unwrap_err().contains("owner/name"));
        assert!(check(serde_json::json!({"hf": {"repo": "a/b", "files": ["../x"]}})).unwrap_err().contains("inside"));
        assert!(check(serde_json::json!({"hf": {"repo": "a/b"}})).unwrap_err().contains("at least one"));
        assert!(check(serde_json::json!({"hf": {"repo": "a/b", "files": ["[a"]}})).unwrap_err().contains("pattern"));

        // Defaults are filled in, unset options stay out of the serialized form (and the key).
        let config = parse(serde_json::json!({"hf": {"repo": "a/b", "files": ["x"]}})).unwrap();
        assert_eq!(
            serde_json::to_value(&config).unwrap(),
            serde_json::json!({
                "hf": {"repo": "a/b", "type": "model", "revision": "main", "files": ["x"]},
                "retries": 5,
                "backoff_ms": 1000,
            })
        );
        assert!(local_inputs(&config).is_empty());
        let config = parse(serde_json::json!({"path": "data/corpus"})).unwrap();
        assert_eq!(local_inputs(&config), ["data/corpus"]);
    }

    #[test]
    fn copies_a_local_file_or_folder() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        fs_err::create_dir_all(dir.path().join("corpus/more")).unwrap();
        fs_err::write(dir.path().join("corpus/a.txt"), "a").unwrap();
        fs_err::write(dir.path().join("corpus/more/b.txt"), "bb").unwrap();
        let report = run(&Config { path: Some("corpus".into()), ..Config::default() }, &ctx).unwrap();
        assert_eq!(report.summary, "2 files, 3 B");
        assert_eq!(fs_err::read_to_string(ctx.out.join("more/b.txt")).unwrap(), "bb");
        assert_eq!(listing(&ctx.out), ["a.txt", "more"]);

        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        fs_err::write(dir.path().join("input.txt"), "hello").unwrap();
        let pin = format!("blake3:{}", blake3::hash(b"hello").to_hex().to_ascii_uppercase());
        let config = Config { path: Some("input.txt".into()), digest: Some(pin), ..Config::default() };
        run(&config, &ctx).unwrap();
        assert_eq!(fs_err::read_to_string(ctx.out.join("input.txt")).unwrap(), "hello");

        let config = Config { digest: Some(format!("sha256:{}", "0".repeat(64))), ..config };
        let error = run(&config, &ctx).unwrap_err().to_string();
        assert!(error.starts_with("`input.txt` for stage `text` has digest `sha256:"), "{error}");

        let error = run(&Config { path: Some("missing".into()), ..Config::default() }, &ctx).unwrap_err();
        assert!(format!("{error:#}").starts_with("stage `text` cannot read `missing`: "), "{error:#}");
    }
}
