//! One HTTP(S) URL streamed into a `.part` file, for `kind: download`: retries with exponential
//! backoff, and resumes with a `Range` request both after a broken connection and across runs
//! (the `.part` file and the validator beside it survive in a resumable stage's output
//! directory). It does not know the final file name or the digest pin; `download.rs` checks the
//! finished `.part` and renames it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow};

use crate::{Progress, Unit};

/// The longest wait between two attempts, however many have failed.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts after the first that fail without receiving a byte; an attempt that makes
    /// progress resets the count, so a long download on a flaky link is not given up on.
    pub retries: u32,
    /// The wait before the first retry; it doubles with each failed attempt.
    pub backoff: Duration,
}

/// The client every download uses: rustls, proxies from the environment, and a read timeout so
/// that a stalled connection fails (and is resumed) instead of hanging forever.
pub fn agent() -> ureq::Agent {
    builder().build()
}

/// `agent`'s settings, for a client that needs one more (the Hub's probe follows no redirect).
pub fn builder() -> ureq::AgentBuilder {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(30))
        .timeout_read(Duration::from_secs(60))
        .user_agent(concat!("nanoflow/", env!("CARGO_PKG_VERSION")))
        .try_proxy_from_env(true)
}

/// The file beside `part` remembering the server's validator (its `ETag` or `Last-Modified`),
/// sent as `If-Range` on a resume so that bytes of an older version are never glued onto a newer.
pub fn validator_path(part: &Path) -> PathBuf {
    let mut name = part.file_name().unwrap_or_default().to_os_string();
    name.push(".validator");
    part.with_file_name(name)
}

/// Downloads `url` into `part`, continuing from whatever `part` already holds. Returns the
/// number of bytes in `part` once the server has sent them all.
pub fn fetch(agent: &ureq::Agent, url: &str, part: &Path, retry: Retry, label: &str) -> anyhow::Result<u64> {
    fetch_with(agent, url, None, part, retry, label)
}

/// `fetch`, sending `authorization` to `url`'s host (the agent drops it on a redirect to
/// another host).
pub fn fetch_with(
    agent: &ureq::Agent,
    url: &str,
    authorization: Option<&str>,
    part: &Path,
    retry: Retry,
    label: &str,
) -> anyhow::Result<u64> {
    let mut progress = Progress::new(label, Unit::Bytes, None);
    retry.run(url, || {
        let before = file_len(part).map_err(Attempt::Fatal)?;
        match attempt(agent, url, authorization, part, &mut progress) {
            Err(Attempt::Retry(error)) if file_len(part).map_err(Attempt::Fatal)? > before => {
                Err(Attempt::Progressed(error))
            }
            other => other,
        }
    })?;
    progress.finish();
    file_len(part)
}

/// How one attempt failed: worth another try (a broken connection, a 5xx) or not (a 404, a full
/// disk).
pub enum Attempt {
    Retry(anyhow::Error),
    /// Worth another try, and it got somewhere (bytes arrived): the count of failures restarts.
    Progressed(anyhow::Error),
    Fatal(anyhow::Error),
}

impl Retry {
    /// Calls `attempt` until it succeeds, fails for good, or has failed `retries` times in a row,
    /// waiting `backoff` × 2^n (at most a minute) before each retry. The one retry loop of every
    /// download: plain URLs and the Hub's files alike.
    pub fn run<T>(self, url: &str, mut attempt: impl FnMut() -> Result<T, Attempt>) -> anyhow::Result<T> {
        let mut failures = 0;
        loop {
            let error = match attempt() {
                Ok(value) => return Ok(value),
                Err(Attempt::Fatal(error)) => return Err(error),
                Err(Attempt::Retry(error)) => error,
                Err(Attempt::Progressed(error)) => {
                    failures = 0;
                    error
                }
            };
            failures += 1;
            if failures > self.retries {
                return Err(error.context(format!("gave up after {} retries", self.retries)));
            }
            let wait = self.backoff.saturating_mul(1 << (failures - 1).min(16)).min(MAX_BACKOFF);
            eprintln!("{url}: {error:#}; retry {failures}/{} in {wait:.1?}", self.retries);
            std::thread::sleep(wait);
        }
    }
}

fn attempt(
    agent: &ureq::Agent,
    url: &str,
    authorization: Option<&str>,
    part: &Path,
    progress: &mut Progress,
) -> Result<(), Attempt> {
    let start = file_len(part).map_err(Attempt::Fatal)?;
    let validator_file = validator_path(part);
    // Identity: a range of a gzip-encoded body is not a range of the file.
    let mut request = agent.get(url).set("Accept-Encoding", "identity");
    if let Some(authorization) = authorization {
        request = request.set("Authorization", authorization);
    }
    if start > 0 {
        request = request.set("Range", &format!("bytes={start}-"));
        if let Ok(validator) = fs_err::read_to_string(&validator_file) {
            request = request.set("If-Range", validator.trim());
        }
    }
    let response = match request.call() {
        Ok(response) => response,
        // The `.part` already holds every byte: an earlier run stopped before the rename.
        Err(ureq::Error::Status(416, response)) if start > 0 => {
            if content_range(&response).and_then(|(_, total)| total) == Some(start) {
                progress.set_total(Some(start));
                progress.set_done(start);
                return Ok(());
            }
            truncate(part).map_err(Attempt::Fatal)?;
            return Err(Attempt::Retry(anyhow!("the server refused to resume at byte {start}; starting over")));
        }
        Err(error) => return Err(failed(error)),
    };

    // 206 continues the `.part`; 200 is the whole file (the server ignores ranges, or the file
    // changed since the `.part` was started and `If-Range` failed), so the `.part` starts over.
    let (offset, total) = match response.status() {
        206 => match content_range(&response) {
            Some((first, total)) if first == start => (start, total),
            _ => {
                truncate(part).map_err(Attempt::Fatal)?;
                return Err(Attempt::Retry(anyhow!("the server sent a range other than the one asked for")));
            }
        },
        200 => (0, response.header("Content-Length").and_then(|length| length.parse().ok())),
        code => {
            return Err(Attempt::Fatal(anyhow!("unexpected answer {code} {}", response.status_text())));
        }
    };
    // A weak validator (`W/"..."`) cannot be used in `If-Range`; `Last-Modified` then serves.
    let validator = response.header("ETag").filter(|etag| !etag.starts_with("W/")).or(response.header("Last-Modified"));
    match validator {
        Some(validator) => fs_err::write(&validator_file, validator).map_err(|error| Attempt::Fatal(error.into()))?,
        None => remove_if_present(&validator_file).map_err(Attempt::Fatal)?,
    }

    let mut file = fs_err::OpenOptions::new()
        .create(true)
        .append(offset > 0)
        .write(true)
        .truncate(offset == 0)
        .open(part)
        .map_err(|error| Attempt::Fatal(error.into()))?;
    progress.set_total(total);
    progress.set_done(offset);
    let mut received = offset;
    let mut reader = response.into_reader();
    let mut buffer = vec![0; 256 * 1024];
    loop {
        let n = match reader.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => {
                let error = anyhow!(error).context(format!("the connection broke after {received} bytes"));
                return Err(Attempt::Retry(error));
            }
        };
        file.write_all(&buffer[..n]).map_err(|error| Attempt::Fatal(error.into()))?;
        received += n as u64;
        progress.inc(n as u64);
    }
    file.flush().map_err(|error| Attempt::Fatal(error.into()))?;
    match total {
        Some(total) if received != total => {
            Err(Attempt::Retry(anyhow!("the connection closed after {received} of {total} bytes")))
        }
        _ => Ok(()),
    }
}

/// How a request that got no usable answer failed: a 408, 429 or 5xx and a broken connection
/// may pass on a retry, other statuses will not, and neither will a host that is not there.
pub fn failed(error: ureq::Error) -> Attempt {
    match error {
        ureq::Error::Status(code, response) => {
            let error = anyhow!("the server answered {code} {}", response.status_text());
            let transient = code == 408 || code == 429 || code >= 500;
            if transient { Attempt::Retry(error) } else { Attempt::Fatal(error) }
        }
        // A host that does not resolve or refuses the connection is not there: no retry helps
        // (a stage with mirrors goes on to the next at once). A timeout or a reset may pass.
        ureq::Error::Transport(transport) => match Unreachable::from_transport(&transport) {
            Some(unreachable) => Attempt::Fatal(unreachable.into()),
            None => Attempt::Retry(anyhow!(describe(&transport))),
        },
    }
}

/// A host that is not there for us: its name does not resolve (no network, or a typo in the URL
/// or `HF_ENDPOINT`) or it refuses the connection. Said in one line that names the host; the
/// caller that knows what was being fetched adds what to do instead (`hint`), shown on a line of
/// its own after everything else.
#[derive(Debug, Clone, PartialEq)]
pub struct Unreachable {
    /// `huggingface.co`, or `127.0.0.1:8080` when the URL names a port.
    pub host: String,
    /// The system's reason a connection was refused; `None`: the name does not resolve.
    pub refused: Option<String>,
    /// What to do instead, e.g. use a copy of the file.
    pub hint: Option<String>,
}

impl Unreachable {
    fn from_transport(transport: &ureq::Transport) -> Option<Unreachable> {
        let cause = std::error::Error::source(transport);
        let refused = cause
            .and_then(|source| source.downcast_ref::<std::io::Error>())
            .is_some_and(|error| error.kind() == std::io::ErrorKind::ConnectionRefused);
        let host = transport.url().map_or_else(
            || "the host".to_string(),
            |url| match url.port() {
                Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
                None => url.host_str().unwrap_or_default().to_string(),
            },
        );
        match transport.kind() {
            ureq::ErrorKind::Dns => Some(Unreachable { host, refused: None, hint: None }),
            ureq::ErrorKind::ConnectionFailed if refused => {
                let cause = cause.map_or_else(|| "connection refused".to_string(), |cause| cause.to_string());
                Some(Unreachable { host, refused: Some(cause), hint: None })
            }
            _ => None,
        }
    }

    /// The first `Unreachable` in `error`'s chain.
    pub fn find(error: &anyhow::Error) -> Option<&Unreachable> {
        error.chain().find_map(|cause| cause.downcast_ref::<Unreachable>())
    }

    /// `error` with `hint` added to the `Unreachable` it holds, if it holds one and has no hint
    /// yet; `Err(error)` when it holds none.
    pub fn hinted(mut error: anyhow::Error, hint: impl FnOnce() -> String) -> Result<anyhow::Error, anyhow::Error> {
        match error.downcast_mut::<Unreachable>() {
            Some(unreachable) => {
                unreachable.hint.get_or_insert_with(hint);
                Ok(error)
            }
            None => Err(error),
        }
    }

    /// The message without the hint.
    pub fn message(&self) -> String {
        match &self.refused {
            None => format!("cannot reach `{}` (the name does not resolve): offline?", self.host),
            Some(cause) => format!("cannot reach `{}`: the host refused the connection ({cause})", self.host),
        }
    }
}

/// The message, then the hint on a line of its own: innermost in an error chain, it comes last
/// in the one line a stage prints (`{error:#}`).
impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message())?;
        match &self.hint {
            Some(hint) => write!(f, "\nhint: {hint}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for Unreachable {}

/// A transport error without its URL (the caller names it once) and with its cause said once
/// (ureq's own `Display` starts with the URL and already holds the cause that `{:#}` repeats).
pub fn describe(transport: &ureq::Transport) -> String {
    let mut text = transport.kind().to_string();
    if let Some(message) = transport.message() {
        text.push_str(&format!(": {message}"));
    }
    if let Some(cause) = std::error::Error::source(transport) {
        text.push_str(&format!(" ({cause})"));
    }
    text
}

/// `Content-Range: bytes 100-199/1000` -> `(100, Some(1000))`; `bytes */1000` -> `(0, Some(1000))`.
fn content_range(response: &ureq::Response) -> Option<(u64, Option<u64>)> {
    let value = response.header("Content-Range")?.strip_prefix("bytes ")?;
    let (range, total) = value.split_once('/')?;
    let total = total.trim().parse().ok();
    let first = match range.split_once('-') {
        Some((first, _)) => first.trim().parse().ok()?,
        None => 0,
    };
    Some((first, total))
}

fn file_len(path: &Path) -> anyhow::Result<u64> {
    match fs_err::metadata(path) {
        Ok(metadata) => Ok(metadata.len()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(error) => Err(error.into()),
    }
}

fn truncate(path: &Path) -> anyhow::Result<()> {
    fs_err::File::create(path).map(drop).context("could not restart the download")
}

pub fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match fs_err::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error.into()),
        _ => Ok(()),
    }
}
