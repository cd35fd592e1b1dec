//! A host that is not there (no network, or a typo in a URL or `HF_ENDPOINT`) fails at once, in
//! one line that names the host, with what to do on a `hint:` line: the Hub's dataset listings,
//! its models and plain URLs alike (issue 29: they retried for 31 s and printed the chain three
//! times). No test reaches the network: every host is `nonexistent.invalid`.

use std::time::{Duration, Instant};

use crate::{Output, Test};

/// `nanoflow ARGS` with the Hub at a host that does not resolve and an empty Hub cache, expecting
/// exit code 1 well within the first retry's backoff.
fn offline(test: &Test, args: &[&str]) -> Output {
    let mut command = test.command(args);
    command.env("HF_ENDPOINT", "http://nonexistent.invalid").env("HF_HOME", test.path("hf"));
    // A proxy would answer for the host that does not resolve.
    for name in
        ["HF_HUB_CACHE", "HF_TOKEN", "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"]
    {
        command.env_remove(name);
    }
    let started = Instant::now();
    let output = command.output().expect("nanoflow starts");
    let elapsed = started.elapsed();
    let output = Output {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    assert_eq!(output.code, 1, "nanoflow {args:?}\n--- stderr\n{}", output.stderr);
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}: a host that does not resolve is not retried");
    output
}

/// What to do when the Hub that `HF_ENDPOINT` names cannot be reached.
const HUB_HINT: &str = "check `HF_ENDPOINT` (`http://nonexistent.invalid`), copy `HF_HOME` from a machine that has \
                        the files";

#[test]
fn a_hub_dataset_listing_fails_at_once_naming_the_host() {
    let test = Test::with_pipeline(
        "stages:\n  owt:\n    kind: download\n    hf: {repo: Skylion007/openwebtext, type: dataset, revision: \
         refs/convert/parquet, files: [\"plain_text/train/*.parquet\"]}\n",
    );
    let output = offline(&test, &["run", "owt"]);
    let error = "could not list the files of dataset `Skylion007/openwebtext` at revision `refs/convert/parquet` for \
                 stage `owt`: cannot reach `nonexistent.invalid` (the name does not resolve): offline?";
    assert_eq!(
        test.redact(&output.stderr),
        format!(
            "[1/1] owt  running  (never run)\n[1/1] owt  failed   exit status 1: {error}\n      hint: {HUB_HINT}, or \
             download the files elsewhere and use a `path:` download (a copied `HF_HOME` serves files named in full, \
             not patterns)\n      log: artifacts/owt/.partial-[KEY]/log.txt\n\
             error: 1 stage failed: `owt`\nran 0, cached 0 in [TIME]\n"
        )
    );
}

#[test]
fn a_hub_model_fails_at_once_naming_the_host() {
    let test = Test::new();
    let output = offline(&test, &["sample", "gpt2"]);
    assert_eq!(
        output.stderr,
        format!(
            "error: sampling from `gpt2` failed: cannot reach `nonexistent.invalid` (the name does not resolve): \
             offline?\n\nhint: {HUB_HINT}, or download `config.json` and `model.safetensors` of \
             `openai-community/gpt2` elsewhere and name their folder instead of `gpt2`\n"
        )
    );
    assert_eq!(output.stdout, "");
}

#[test]
fn a_url_whose_host_does_not_resolve_fails_at_once_naming_the_host() {
    let test =
        Test::with_pipeline("stages:\n  text:\n    kind: download\n    url: https://nonexistent.invalid/input.txt\n");
    let output = offline(&test, &["run", "text"]);
    let error = "could not download `https://nonexistent.invalid/input.txt` for stage `text`: cannot reach \
                 `nonexistent.invalid` (the name does not resolve): offline?";
    assert_eq!(
        test.redact(&output.stderr),
        format!(
            "[1/1] text  running  (never run)\n[1/1] text  failed   exit status 1: {error}\n      hint: run where \
             `nonexistent.invalid` can be reached, or download the file elsewhere and use a `path:` download (or list \
             it in `mirrors`, pinned by `digest`)\n      log: artifacts/text/.partial-[KEY]/log.txt\n\
             error: 1 stage failed: `text`\nran 0, cached 0 in [TIME]\n"
        )
    );
}
