//! `kind: tokenize`: text in, token shards out. It owns reading documents (plain text, jsonl,
//! parquet, streamed so memory does not grow with the input), the `char` and `gpt2` tokenizers'
//! use, the train/val split and `meta.json`. The shard format is `shard.rs`'s, GPT-2's BPE is
//! `bpe.rs`'s; which inputs are fresh is the engine's business.
//!
//! Documents follow nanoGPT's prepare scripts: with `gpt2`, every document's tokens are followed
//! by `<|endoftext|>` (openwebtext/prepare.py); with `char`, documents are concatenated and the
//! vocabulary is the sorted distinct characters (shakespeare_char/prepare.py). A `.txt` file is
//! one document, a jsonl line or a parquet row is one.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail, ensure};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::formats::bpe;
use crate::formats::meta::{Meta, ShardFormat, Source, TokenizerName};
use crate::formats::shard::{self, ShardWriter};
use crate::formats::tokenizer::{CharVocab, Tokenizer};
use crate::{Context, Invalid, Progress, Report, Unit, Upstream, ensure, required};

/// Bumped when the same params would give different tokens or files.
pub const VERSION: u32 = 1;

/// Params that cannot change the output: the shards are byte-identical at any thread count.
pub const NON_SEMANTIC: &[&str] = &["threads"];
/// What each optional param means when it is unset (the report shows it as the default).
pub const UNSET: &[(&str, &str)] = &[("val_fraction", "0.1 (0 with `val_input`)"), ("val_input", "none")];

/// Tokenizing again from the start is cheap next to keeping partial shards consistent.
pub const RESUMABLE: bool = false;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The text to tokenize: a file, or a folder whose files are read in sorted path order
    /// (hidden files skipped). Required; usually `${download-stage}`.
    pub input: String,
    /// How to read the files: `text` (a file is one document), `jsonl` (one document per line,
    /// in `field`), `parquet` (one document per row, in column `field`), or `auto`: by extension
    /// (`.txt`, `.jsonl`, `.parquet`; in a folder, other files are skipped with a note).
    pub format: Format,
    /// The jsonl field or parquet column holding the text; `text` is what Hugging Face text
    /// datasets (openwebtext, fineweb) use.
    pub field: String,
    /// `gpt2` (tiktoken's GPT-2 BPE, `<|endoftext|>` after each document) or `char` (one token
    /// per character; the vocabulary goes into meta.json). Default `gpt2`, what GPT-2 models use.
    pub tokenizer: TokenizerName,
    /// The fraction of the token stream, taken from its end, that becomes the `val` split.
    /// Unset: 0.1 (nanoGPT's 90/10), or 0 when `val_input` is given. The split point is
    /// `floor(tokens * (1 - val_fraction))`, which for `char` is exactly where nanoGPT's
    /// shakespeare_char cuts the text (`data[:int(n*0.9)]`).
    pub val_fraction: Option<f64>,
    /// A separate input for the `val` split (same `format` and `field`), instead of a fraction.
    pub val_input: Option<String>,
    /// Tokens per shard file: 100M (200 MB files, as llm.c's fineweb shards), few enough files
    /// for large corpora and small enough to copy around.
    pub shard_tokens: u64,
    /// Worker threads; 0 uses every core. Does not change the output.
    pub threads: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            input: String::new(),
            format: Format::Auto,
            field: "text".into(),
            tokenizer: TokenizerName::Gpt2,
            val_fraction: None,
            val_input: None,
            shard_tokens: 100_000_000,
            threads: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Auto,
    Text,
    Jsonl,
    Parquet,
}

/// Text is read and encoded this many bytes at a time: big enough to keep every core busy,
/// small enough that memory stays flat.
const BATCH_BYTES: usize = 16 << 20;
/// A long document splits into chunks of about this size so that its pieces encode in parallel.
const CHUNK_BYTES: usize = 64 << 10;

impl Config {
    /// The fraction of the stream that goes to `val`, from `val_fraction` and `val_input`.
    fn val_fraction(&self) -> Result<f64, Invalid> {
        let fraction = match (self.val_fraction, &self.val_input) {
            (Some(_), Some(_)) => {
                return Err(Invalid::new("val_fraction", "and `val_input` both choose the val split: set one"));
            }
            (Some(fraction), None) => fraction,
            (None, Some(_)) => 0.0,
            (None, None) => 0.1,
        };
        ensure((0.0..1.0).contains(&fraction), "val_fraction", || {
            format!("must be at least 0 and below 1, not {fraction}")
        })?;
        Ok(fraction)
    }
}

/// Everything pipeline.yaml decides, before anything runs.
pub fn check(config: &Config, _upstream: &Upstream) -> Result<(), Invalid> {
    required("input", &config.input, || "the text to tokenize: a file, a folder or `${download-stage}`".to_string())?;
    config.val_fraction()?;
    ensure(config.shard_tokens >= 1, "shard_tokens", || "must be at least 1, not 0".to_string())
}

/// `input` and `val_input` when they name local files rather than `${stage}` outputs (the
/// engine skips references): their content enters the key.
pub fn local_inputs(config: &Config) -> Vec<String> {
    std::iter::once(config.input.clone()).chain(config.val_input.clone()).filter(|path| !path.is_empty()).collect()
}

pub fn run(config: &Config, ctx: &Context) -> anyhow::Result<Report> {
    let val_fraction = config.val_fraction()?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(config.threads).build()?;

    let train_files = list_files(&ctx.root.join(&config.input), config.format)?;
    let val_files = match &config.val_input {
        Some(val_input) => list_files(&ctx.root.join(val_input), config.format)?,
        None => Vec::new(),
    };
    let tokenizer = match config.tokenizer {
        TokenizerName::Gpt2 => Tokenizer::Gpt2,
        TokenizerName::Char => Tokenizer::Char(char_vocab(train_files.iter().chain(&val_files), &config.field)?),
    };

    let mut train = ShardWriter::new(&ctx.out, "train", config.shard_tokens)?;
    let text = pool.install(|| encode_files(&train_files, &config.field, &tokenizer, &mut train, "tokenize train"))?;
    let (train_paths, mut train_tokens) = train.finish()?;
    // Not merely end-of-text tokens: a `gpt2` tokenization of empty documents is not data.
    ensure!(text > 0 && train_tokens > 0, "`input` holds no text to tokenize");
    let mut val = ShardWriter::new(&ctx.out, "val", config.shard_tokens)?;
    if !val_files.is_empty() {
        let text = pool.install(|| encode_files(&val_files, &config.field, &tokenizer, &mut val, "tokenize val"))?;
        ensure!(text > 0, "`val_input` holds no text to tokenize");
    } else if val_fraction > 0.0 {
        let keep = (train_tokens as f64 * (1.0 - val_fraction)).floor() as u64;
        shard::split_off_tail(&train_paths, train_tokens, train_tokens - keep, &mut val)?;
        train_tokens = keep;
    }
    let (_, val_tokens) = val.finish()?;

    let mut sources = Vec::new();
    for (split, files) in [("train", &train_files), ("val", &val_files)] {
        for file in files {
            let digest = pool
                .install(|| crate::fetch::digest::blake3_file(&file.path))
                .with_context(|| format!("could not read `{}`", file.path.display()))?;
            let bytes = fs_err::metadata(&file.path)?.len();
            sources.push(Source { blake3: digest, bytes, path: file.name.clone(), split: split.into() });
        }
    }
    let meta = Meta {
        eot_token: tokenizer.end_of_text(),
        itos: match &tokenizer {
            Tokenizer::Char(vocab) => Some(vocab.itos()),
            Tokenizer::Gpt2 => None,
        },
        shard_format: ShardFormat::default(),
        sources,
        tokenizer: config.tokenizer,
        train_tokens,
        val_tokens,
        vocab_size: tokenizer.vocab_size(),
    };
    meta.write(&ctx.out)?;

    let mut report = Report {
        summary: format!("{train_tokens} train tokens, {val_tokens} val tokens, vocab {}", tokenizer.vocab_size()),
        ..Report::default()
    };
    report.metrics.insert("train_tokens".into(), train_tokens.into());
    report.metrics.insert("val_tokens".into(), val_tokens.into());
    report.metrics.insert("vocab_size".into(), tokenizer.vocab_size().into());
    Ok(report)
}

/// One input file and how to read it.
#[derive(Debug, Clone)]
struct SourceFile {
    path: PathBuf,
    /// The path relative to the input (its file name when the input is a file): what meta.json
    /// records, so that meta.json does not depend on where the store lives.
    name: String,
    format: Format,
}

fn format_of(path: &Path) -> Option<Format> {
    match path.extension()?.to_str()? {
        "txt" | "text" => Some(Format::Text),
        "jsonl" | "ndjson" => Some(Format::Jsonl),
        "parquet" => Some(Format::Parquet),
        _ => None,
    }
}

/// The files of `input` in sorted order, each with its format.
fn list_files(input: &Path, format: Format) -> anyhow::Result<Vec<SourceFile>> {
    let metadata = fs_err::metadata(input).context("could not read `input`")?;
    if metadata.is_file() {
        let format = match format {
            Format::Auto => format_of(input).with_context(|| {
                format!(
                    "cannot tell the format of `{}` from its extension\nhint: set `format:` to text, jsonl or parquet",
                    input.display()
                )
            })?,
            format => format,
        };
        let name = input.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
        return Ok(vec![SourceFile { path: input.to_path_buf(), name, format }]);
    }
    let mut found = Vec::new();
    let mut folders = vec![input.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in fs_err::read_dir(&folder)? {
            let path = entry?.path();
            if path.file_name().is_some_and(|name| name.to_string_lossy().starts_with('.')) {
                continue;
            }
            if path.is_dir() {
                folders.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    let mut files = Vec::new();
    for path in found {
        let name = path.strip_prefix(input).unwrap_or(&path).to_string_lossy().replace('\\', "/");
        let file_format = match format {
            Format::Auto => match format_of(&path) {
                Some(format) => format,
                None => {
                    eprintln!("tokenize: skipping `{name}`: not .txt, .jsonl or .parquet");
                    continue;
                }
            },
            format => format,
        };
        files.push(SourceFile { path, name, format: file_format });
    }
    ensure!(!files.is_empty(), "no input files in `{}`", input.display());
    Ok(files)
}

/// Calls `sink(text, end_of_document)` with the documents of `file` in order, a long document
/// in several calls cut at places where tokenization may break (see `bpe::boundary`).
fn read_documents(
    file: &SourceFile,
    field: &str,
    sink: &mut dyn FnMut(&str, bool) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let path = &file.path;
    match file.format {
        Format::Text | Format::Auto => {
            let mut reader = fs_err::File::open(path)?;
            let mut buffer: Vec<u8> = Vec::new();
            let mut offset = 0u64;
            loop {
                let start = buffer.len();
                buffer.resize(start + (4 << 20), 0);
                let read = reader
                    .read(&mut buffer[start..])
                    .with_context(|| format!("could not read `{}`", path.display()))?;
                buffer.truncate(start + read);
                let at_end = read == 0;
                let valid = match std::str::from_utf8(&buffer) {
                    Ok(text) => text.len(),
                    Err(error) if error.error_len().is_none() && !at_end => error.valid_up_to(),
                    Err(error) => {
                        bail!("`{}` is not UTF-8 text (byte {})", path.display(), offset + error.valid_up_to() as u64)
                    }
                };
                let text = std::str::from_utf8(&buffer[..valid]).expect("checked above");
                if at_end {
                    return sink(text, true);
                }
                if let Some(cut) = bpe::last_boundary(text) {
                    sink(&text[..cut], false)?;
                    buffer.drain(..cut);
                    offset += cut as u64;
                }
            }
        }
        Format::Jsonl => {
            let mut reader = BufReader::with_capacity(1 << 20, fs_err::File::open(path)?);
            let mut line = String::new();
            for number in 1.. {
                line.clear();
                if reader.read_line(&mut line).with_context(|| format!("could not read `{}`", path.display()))? == 0 {
                    return Ok(());
                }
                if line.trim().is_empty() {
                    continue;
                }
                let mut object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&line)
                    .with_context(|| format!("`{}:{number}` is not a JSON object", path.display()))?;
                match object.get_mut(field) {
                    Some(serde_json::Value::String(text)) => sink(text, true)?,
                    Some(_) => bail!("field `{field}` in `{}:{number}` is not a string", path.display()),
                    None => bail!(
                        "`{}:{number}` has no field `{field}`\nhint: set `field:` to the field holding the text",
                        path.display()
                    ),
                }
            }
            Ok(())
        }
        Format::Parquet => read_parquet(path, field, sink),
    }
}

/// One row at a time from column `field`, reading a record batch at a time.
fn read_parquet(
    path: &Path,
    field: &str,
    sink: &mut dyn FnMut(&str, bool) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use arrow_array::cast::AsArray;
    use parquet::arrow::ProjectionMask;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    let file = fs_err::File::open(path)?.into_file();
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("`{}` is not a parquet file", path.display()))?;
    let columns: Vec<String> = builder.schema().fields().iter().map(|column| column.name().clone()).collect();
    let Some(index) = columns.iter().position(|name| name == field) else {
        bail!(
            "`{}` has no column `{field}` (it has: {})\nhint: set `field:` to the column holding the text",
            path.display(),
            columns.join(", ")
        );
    };
    let mask = ProjectionMask::roots(builder.parquet_schema(), [index]);
    let reader = builder.with_projection(mask).with_batch_size(256).build()?;
    for batch in reader {
        let batch = batch.with_context(|| format!("could not read `{}`", path.display()))?;
        let column = batch.column(0);
        let not_text =
            || anyhow::anyhow!("column `{field}` of `{}` is {}, not text", path.display(), column.data_type());
        if let Some(array) = column.as_string_opt::<i32>() {
            for text in array.iter().flatten() {
                sink(text, true)?;
            }
        } else if let Some(array) = column.as_string_opt::<i64>() {
            for text in array.iter().flatten() {
                sink(text, true)?;
            }
        } else if let Some(array) = column.as_string_view_opt() {
            for text in array.iter().flatten() {
                sink(text, true)?;
            }
        } else {
            return Err(not_text());
        }
    }
    Ok(())
}

/// The character vocabulary of `files`: their sorted distinct characters, as nanoGPT's
/// `sorted(set(data))`.
fn char_vocab<'a>(files: impl Iterator<Item = &'a SourceFile>, field: &str) -> anyhow::Result<CharVocab> {
    let mut seen = vec![false; 0x110000];
    for file in files {
        read_documents(file, field, &mut |text, _| {
            for c in text.chars() {
                seen[c as usize] = true;
            }
            Ok(())
        })?;
    }
    CharVocab::new((0..0x110000u32).filter(|&code| seen[code as usize]).filter_map(char::from_u32).collect())
}

/// Encodes every document of `files` into `writer`; returns the bytes of text read. A reader
/// thread cuts the documents into batches of about `BATCH_BYTES` while the previous batch
/// encodes: the batch's documents (and the chunks of long ones) encode in parallel and are
/// written in order. At most two batches exist at once, so memory does not grow with the input.
fn encode_files(
    files: &[SourceFile],
    field: &str,
    tokenizer: &Tokenizer,
    writer: &mut ShardWriter,
    label: &str,
) -> anyhow::Result<u64> {
    let mut progress = Progress::new(label, Unit::Bytes, None);
    let mut text = 0;
    std::thread::scope(|scope| {
        let (sender, receiver) = std::sync::mpsc::sync_channel::<Vec<(String, bool)>>(1);
        let reader = scope.spawn(move || -> anyhow::Result<()> {
            let mut batch = Vec::new();
            let mut batch_bytes = 0;
            for file in files {
                read_documents(file, field, &mut |text, end| {
                    batch.push((text.to_string(), end));
                    batch_bytes += text.len();
                    if batch_bytes >= BATCH_BYTES {
                        batch_bytes = 0;
                        // A closed channel means the encoder failed; its error is the one shown.
                        ensure!(sender.send(std::mem::take(&mut batch)).is_ok(), "stopped");
                    }
                    Ok(())
                })?;
            }
            let _ = sender.send(batch);
            Ok(())
        });
        let mut encoded = Ok(());
        for batch in &receiver {
            encoded = encode_batch(&batch, tokenizer, writer);
            if encoded.is_err() {
                break;
            }
            let bytes: u64 = batch.iter().map(|(text, _)| text.len() as u64).sum();
            text += bytes;
            progress.inc(bytes);
        }
        drop(receiver);
        let read = reader.join().expect("the reader thread does not panic");
        encoded.and(read)
    })?;
    progress.finish();
    Ok(text)
}

fn encode_batch(batch: &[(String, bool)], tokenizer: &Tokenizer, writer: &mut ShardWriter) -> anyhow::Result<()> {
    let tasks: Vec<(&str, bool)> = batch
        .iter()
        .flat_map(|(text, end)| {
            let parts = bpe::chunks(text, CHUNK_BYTES);
            let last = parts.len() - 1;
            parts.into_iter().enumerate().map(move |(i, part)| (part, *end && i == last))
        })
        .collect();
    let encode = |&(text, end): &(&str, bool)| -> anyhow::Result<Vec<u16>> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        tokenizer.encode_into(text, &mut out)?;
        out.extend(tokenizer.end_of_text().filter(|_| end));
        Ok(out)
    };
    let encoded: Vec<Vec<u16>> = tasks.par_iter().map(encode).collect::<anyhow::Result<_>>()?;
    for tokens in &encoded {
        writer.write(tokens)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::bpe::Bpe;
    use crate::formats::shard::TokenSplit;

    fn context(dir: &Path) -> Context {
        Context::for_test(dir, "test")
    }

    fn tokens(dir: &Path, split: &str) -> Vec<u16> {
        let split = TokenSplit::open(dir, split).unwrap();
        split.slice(0, split.len() as usize).unwrap()
    }

    fn meta(dir: &Path) -> serde_json::Value {
        serde_json::from_str(&fs_err::read_to_string(dir.join("meta.json")).unwrap()).unwrap()
    }

    fn char_config(input: &str) -> Config {
        Config { input: input.into(), tokenizer: TokenizerName::Char, ..Config::default() }
    }

    #[test]
    fn char_level_splits_like_nanogpt() {
        let dir = tempfile::tempdir().unwrap();
        let text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n";
        fs_err::write(dir.path().join("input.txt"), text).unwrap();
        let ctx = context(dir.path());
        let report = run(&char_config("input.txt"), &ctx).unwrap();

        let mut chars: Vec<char> = text.chars().collect();
        chars.sort();
        chars.dedup();
        let n = text.chars().count();
        let train_n = (n as f64 * 0.9) as usize;
        let expected: Vec<u16> = text.chars().map(|c| chars.binary_search(&c).unwrap() as u16).collect();
        assert_eq!(tokens(&ctx.out, "train"), expected[..train_n]);
        assert_eq!(tokens(&ctx.out, "val"), expected[train_n..]);
        let meta = meta(&ctx.out);
        assert_eq!(meta["vocab_size"], chars.len());
        assert_eq!(meta["itos"][0], "\n");
        assert_eq!(meta["train_tokens"], train_n);
        assert_eq!(meta["sources"][0]["path"], "input.txt");
        assert_eq!(meta["sources"][0]["blake3"], blake3::hash(text.as_bytes()).to_hex().as_str());
        assert_eq!(
            report.summary,
            format!("{train_n} train tokens, {} val tokens, vocab {}", n - train_n, chars.len())
        );
    }

    #[test]
    fn tiny_shakespeare_gives_nanogpts_numbers() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/tinyshakespeare/input.txt"));
        let dir = tempfile::tempdir().unwrap();
        let ctx = context(dir.path());
        run(&char_config(path.to_str().unwrap()), &ctx).unwrap();
        let meta = meta(&ctx.out);
        assert_eq!(meta["vocab_size"], 65);
        assert_eq!(meta["train_tokens"], 1_003_854);
        assert_eq!(meta["val_tokens"], 111_540);
        assert_eq!(TokenSplit::open(&ctx.out, "train").unwrap().len(), 1_003_854);
        assert_eq!(TokenSplit::open(&ctx.out, "val").unwrap().len(), 111_540);
    }

    #[test]
    fn gpt2_documents_end_with_eot_and_shards_do_not_depend_on_threads() {
        let fixture: serde_json::Value = serde_json::from_str(
            &fs_err::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gpt2_bpe.json"))
                .unwrap(),
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let lines: String = fixture["documents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|text| serde_json::json!({"id": 1, "text": text}).to_string() + "\n")
            .collect();
        fs_err::write(dir.path().join("docs.jsonl"), lines).unwrap();
        let expected: Vec<u16> = serde_json::from_value(fixture["document_stream"].clone()).unwrap();
        let mut outputs = Vec::new();
        for threads in [1, 3] {
            let ctx = Context { out: dir.path().join(format!("out{threads}")), ..context(dir.path()) };
            fs_err::create_dir_all(&ctx.out).unwrap();
            let config = Config {
                input: "docs.jsonl".into(),
                val_fraction: Some(0.0),
                shard_tokens: 5,
                threads,
                ..Config::default()
            };
            run(&config, &ctx).unwrap();
            assert_eq!(tokens(&ctx.out, "train"), expected);
            let files: Vec<Vec<u8>> = (0..expected.len().div_ceil(5))
                .map(|i| fs_err::read(ctx.out.join(shard::shard_name("train", i))).unwrap())
                .collect();
            outputs.push((files, fs_err::read(ctx.out.join("meta.json")).unwrap()));
        }
        assert_eq!(outputs[0], outputs[1]);
    }

    #[test]
    fn a_folder_of_text_files_and_a_val_input() {
        let dir = tempfile::tempdir().unwrap();
        fs_err::create_dir_all(dir.path().join("train/sub")).unwrap();
        fs_err::write(dir.path().join("train/b.txt"), "bb").unwrap();
        fs_err::write(dir.path().join("train/a.txt"), "a").unwrap();
        fs_err::write(dir.path().join("train/sub/c.txt"), "c").unwrap();
        fs_err::write(dir.path().join("train/.hidden"), "zzz").unwrap();
        fs_err::write(dir.path().join("val.txt"), "ab").unwrap();
        let ctx = context(dir.path());
        let config = Config { val_input: Some("val.txt".into()), ..char_config("train") };
        run(&config, &ctx).unwrap();
        assert_eq!(tokens(&ctx.out, "train"), [0, 1, 1, 2]);
        assert_eq!(tokens(&ctx.out, "val"), [0, 1]);
        let names: Vec<String> = meta(&ctx.out)["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["path"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["a.txt", "b.txt", "sub/c.txt", "val.txt"]);
    }

    #[test]
    fn long_text_streams_in_blocks_like_one_piece() {
        let dir = tempfile::tempdir().unwrap();
        let text = "Lorem ipsum dolor sit amet, it's 12345 — naïve “quotes”   and\n\n\ttabs.  ".repeat(150_000);
        fs_err::write(dir.path().join("big.txt"), &text).unwrap();
        let ctx = context(dir.path());
        run(
            &Config { input: "big.txt".into(), val_fraction: Some(0.25), shard_tokens: 1 << 20, ..Config::default() },
            &ctx,
        )
        .unwrap();
        let mut expected = Vec::new();
        Bpe::gpt2().encode(&text, &mut expected);
        expected.push(bpe::END_OF_TEXT);
        let mut got = tokens(&ctx.out, "train");
        got.extend(tokens(&ctx.out, "val"));
        assert_eq!(got, expected);
    }

    #[test]
    fn parquet_rows_are_documents() {
        use arrow_array::{ArrayRef, Int32Array, RecordBatch, StringArray};
        use parquet::arrow::ArrowWriter;
        use parquet::basic::{Compression, ZstdLevel};
        use parquet::file::properties::WriterProperties;
        use std::sync::Arc;

        let dir = tempfile::tempdir().unwrap();
        let texts = ["hello", "world", "ab"];
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(Int32Array::from(vec![1, 2, 3])) as ArrayRef),
            ("content", Arc::new(StringArray::from(texts.to_vec())) as ArrayRef),
        ])
        .unwrap();
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(Some(2))
            .build();
        let file = fs_err::File::create(dir.path().join("data.parquet")).unwrap().into_file();
        let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(properties)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();

        let ctx = context(dir.path());
        let config = Config {
            input: "data.parquet".into(),
            field: "content".into(),
            val_fraction: Some(0.0),
            ..Config::default()
        };
        run(&config, &ctx).unwrap();
        let mut expected = Vec::new();
        for text in texts {
            Bpe::gpt2().encode(text, &mut expected);
            expected.push(bpe::END_OF_TEXT);
        }
        assert_eq!(tokens(&ctx.out, "train"), expected);

        let error = run(&Config { field: "body".into(), ..config }, &context(dir.path())).unwrap_err().to_string();
        assert!(error.contains("has no column `body` (it has: id, content)"), "{error}");
    }

    #[test]
    fn bad_params_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        fs_err::write(dir.path().join("notes.md"), "x").unwrap();
        let ctx = context(dir.path());
        let error = run(&char_config("notes.md"), &ctx).unwrap_err().to_string();
        assert!(error.contains("cannot tell the format of"), "{error}");
        let config = Config { val_fraction: Some(0.1), val_input: Some("v.txt".into()), ..char_config("notes.md") };
        assert!(run(&config, &ctx).unwrap_err().to_string().contains("set one"));
        // An empty file is no data with either tokenizer (gpt2 would have made one `<|endoftext|>`).
        fs_err::write(dir.path().join("empty.txt"), "").unwrap();
        for tokenizer in [TokenizerName::Char, TokenizerName::Gpt2] {
            let config = Config { tokenizer, ..char_config("empty.txt") };
            let error = run(&config, &context(dir.path())).unwrap_err().to_string();
            assert_eq!(error, "`input` holds no text to tokenize");
        }
        let error = check(&Config { shard_tokens: 0, ..char_config("notes.md") }, &Upstream::none()).unwrap_err();
        assert_eq!(error.to_string(), "`shard_tokens` must be at least 1, not 0");
        let unknown = serde_json::from_str::<Config>(r#"{"input": "x", "tokeniser": "char"}"#).unwrap_err().to_string();
        assert!(unknown.contains("unknown field `tokeniser`"), "{unknown}");
    }
}
