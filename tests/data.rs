//! The data stage kinds through the engine: `download` from a local HTTP server and a local
//! path, `tokenize` of what it fetched, and the shipped pipeline.yaml being valid.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

use crate::Test;

/// Serves `body` to every GET on 127.0.0.1 (one thread, plain HTTP/1.1) and returns its URL.
fn serve(body: &'static str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|read| read > 2) {
                line.clear();
            }
            let mut stream = &stream;
            let _ =
                write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        }
    });
    format!("http://127.0.0.1:{port}/corpus.txt")
}

const TEXT: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n";

#[test]
fn download_then_tokenize_through_the_engine() {
    let url = serve(TEXT);
    let digest = blake3::hash(TEXT.as_bytes()).to_hex();
    let test = Test::with_pipeline(&format!(
        "stages:\n  text:\n    kind: download\n    url: {url}\n    digest: blake3:{digest}\n  chars:\n    kind: tokenize\n    input: ${{text}}\n    tokenizer: char\n    val_fraction: 0.25\n"
    ));
    test.expect(&["run", "chars"], 0);
    assert_eq!(test.read("artifacts/text/current/corpus.txt"), TEXT);
    let meta: serde_json::Value = serde_json::from_str(&test.read("artifacts/chars/current/meta.json")).unwrap();
    let distinct = TEXT.chars().collect::<std::collections::BTreeSet<_>>().len();
    assert_eq!(meta["vocab_size"], distinct);
    let total = TEXT.chars().count();
    let train = (total as f64 * 0.75).floor() as u64;
    assert_eq!(meta["train_tokens"], train, "{meta}");
    assert_eq!(meta["val_tokens"], total as u64 - train, "{meta}");
    // A shard: 256 int32 header (magic 20240520, version 1, count), then uint16 tokens.
    let shard = fs_err::read(test.path("artifacts/chars/current/train_000000.bin")).unwrap();
    assert_eq!(&shard[..4], &20240520i32.to_le_bytes());
    assert_eq!(&shard[4..8], &1i32.to_le_bytes());
    assert_eq!(shard.len() as u64, 1024 + 2 * train);
    // Nothing to do the second time, and no engine file leaks into a downstream stage's input.
    let output = test.expect(&["run", "chars"], 0);
    assert_eq!(
        test.redact(&output.stderr),
        "\
[1/2] text   cached   artifacts/text/[KEY]/out
[2/2] chars  cached   artifacts/chars/[KEY]/out
ran 0, cached 2 in [TIME]
"
    );
}

#[test]
fn a_pinned_download_with_the_wrong_digest_fails_and_publishes_nothing() {
    let url = serve(TEXT);
    let test = Test::with_pipeline(&format!(
        "stages:\n  text:\n    kind: download\n    url: {url}\n    digest: blake3:{}\n",
        "0".repeat(64)
    ));
    let output = test.expect(&["run", "text"], 1);
    // The progress line's rate varies.
    let stderr: String =
        output.stderr.lines().filter(|line| !line.ends_with("/s")).map(|line| format!("{line}\n")).collect();
    let error = format!(
        "`[URL]` for stage `text` has digest `blake3:{}`, but `digest` pins `blake3:{}`",
        blake3::hash(TEXT.as_bytes()).to_hex(),
        "0".repeat(64)
    );
    assert_eq!(
        test.redact(&stderr.replace(&url, "[URL]")),
        format!(
            "[1/1] text  running  (never run)\n[1/1] text  failed   exit status 1: {error}\n      \
             log: artifacts/text/.partial-[KEY]/log.txt\nerror: 1 stage failed: `text`\nran 0, cached 0 in [TIME]\n"
        )
    );
    assert!(test.entries("text").is_empty());
}

#[test]
fn a_local_path_enters_the_key_by_content() {
    let test = Test::with_pipeline("stages:\n  text:\n    kind: download\n    path: corpus.txt\n");
    test.write("corpus.txt", "one\n");
    test.expect(&["run", "text"], 0);
    test.write("corpus.txt", "two\n");
    assert_eq!(test.expect(&["status"], 0).stdout, "text  stale    file `corpus.txt` changed\n");
    test.expect(&["run", "text"], 0);
    assert_eq!(test.read("artifacts/text/current/corpus.txt"), "two\n");
}

#[test]
fn the_shipped_pipeline_is_valid() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/pipeline.yaml");
    let test = Test::new();
    let output = test.expect(&["-f", shipped, "ls"], 0);
    for target in ["shakespeare-char", "ci"] {
        assert!(output.stdout.contains(&format!("  {target} ")), "{}", output.stdout);
    }
    test.expect(&["-f", shipped, "dag", "ci"], 0);
}

/// The uint16 tokens of a shard file.
fn shard_tokens(bytes: &[u8]) -> Vec<u16> {
    bytes[1024..].chunks(2).map(|pair| u16::from_le_bytes([pair[0], pair[1]])).collect()
}

#[test]
fn char_tokenization_matches_nanogpt_prepare_py() {
    // tests/fixtures/ci_char.json comes from make_char_fixture.py, nanoGPT's prepare.py logic.
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/ci_char.json")).expect("the fixture is JSON");
    let test = Test::with_pipeline(
        "stages:\n  text: {kind: download, path: corpus.txt}\n  chars: {kind: tokenize, input: '${text}', tokenizer: char, val_fraction: 0.1}\n",
    );
    test.write("corpus.txt", include_str!("../data/ci/corpus.txt"));
    test.expect(&["run", "chars"], 0);
    let meta: serde_json::Value = serde_json::from_str(&test.read("artifacts/chars/current/meta.json")).unwrap();
    for key in ["vocab_size", "itos", "train_tokens", "val_tokens"] {
        assert_eq!(meta[key], fixture[key], "`{key}`");
    }
    let train = shard_tokens(&fs_err::read(test.path("artifacts/chars/current/train_000000.bin")).unwrap());
    let val = shard_tokens(&fs_err::read(test.path("artifacts/chars/current/val_000000.bin")).unwrap());
    assert_eq!(serde_json::json!(train[..64]), fixture["train_head"]);
    assert_eq!(serde_json::json!(val[..64]), fixture["val_head"]);
}

/// A URL on this machine whose connection is refused: a source that is not there.
fn refused_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/input.txt", listener.local_addr().unwrap());
    drop(listener);
    url
}

#[test]
fn a_pinned_download_is_its_bytes_wherever_they_come_from() {
    let digest = blake3::hash(TEXT.as_bytes()).to_hex();
    let pipeline = |source: &str| {
        format!(
            "stages:\n  text:\n    kind: download\n    url: {source}\n    digest: blake3:{digest}\n    mirrors: [copy.txt]\n  \
             chars:\n    kind: tokenize\n    input: ${{text}}\n    tokenizer: char\n"
        )
    };
    let test = Test::with_pipeline(&pipeline(&serve(TEXT)));
    test.write("copy.txt", TEXT);
    test.expect(&["run", "chars"], 0);

    // Another URL (here one that is not even there) is another source of the same file.
    test.write("pipeline.yaml", &pipeline(&refused_url().replace("input.txt", "corpus.txt")));
    assert_eq!(test.expect(&["status"], 0).stdout, "text   fresh\nchars  fresh\n");
    let output = test.expect(&["run", "chars"], 0);
    assert_eq!(
        test.redact(&output.stderr),
        "[1/2] text   cached   artifacts/text/[KEY]/out\n[2/2] chars  cached   artifacts/chars/[KEY]/out\nran 0, cached 2 in [TIME]\n"
    );

    // Run again, it comes from the mirror at once, and nothing downstream runs (same bytes).
    let output = test.expect(&["run", "chars", "--force", "text"], 0);
    let stderr = test.redact(&output.stderr);
    assert!(stderr.contains("the host refused the connection ("), "{stderr}");
    // One line of information (issue 29): where it came from, and why not from the URL.
    assert!(stderr.contains("[text] got it from `copy.txt`, the bytes `digest` pins (`http://"), "{stderr}");
    assert_eq!(stderr.lines().filter(|line| line.starts_with("[text] ")).count(), 1, "{stderr}");
    assert!(
        stderr.ends_with("[2/2] chars  cached   artifacts/chars/[KEY]/out\nran 1, cached 1 in [TIME]\n"),
        "{stderr}"
    );
}

/// The main job's download, from a fresh copy of the repo's pipeline, with its URL unreachable:
/// tiny Shakespeare comes from the repo (the rest of the job needs nothing from outside).
#[test]
fn the_main_job_needs_no_network() {
    let test = Test::with_repo_pipeline();
    let repo = env!("CARGO_MANIFEST_DIR");
    let set = format!("shakespeare-text.url={}", refused_url());
    test.expect(&["run", "shakespeare-text", "--set", &set], 0);
    let text = test.read("artifacts/shakespeare-text/current/input.txt");
    assert_eq!(text, fs_err::read_to_string(format!("{repo}/data/tinyshakespeare/input.txt")).unwrap());
}
