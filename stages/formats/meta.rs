//! `meta.json`: what a tokenize stage records beside its shards, and what every reader of token
//! data or of a model's tokenizer reads back — the tokenizer, the vocabulary size, the token
//! counts and the sources. A train stage copies it into its output, so a model carries the
//! tokenizer of its data. A char-level export's `char_vocab.json` is the tokenizer part of it.
//!
//! The fields are in alphabetical order, the order the file has always had (serde_json's maps
//! are sorted), so that a tokenize stage's output is byte for byte what it was.

use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::formats::shard;

/// The file's name in a tokenize (or train) stage's output.
pub const FILE: &str = "meta.json";

/// The tokenizers nanoflow knows, by the name `tokenizer:` and meta.json give them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerName {
    /// One token per character; the vocabulary is the sorted distinct characters (`itos`).
    Char,
    /// GPT-2's byte-level BPE (tiktoken's `gpt2`), `<|endoftext|>` = 50256.
    Gpt2,
}

impl TokenizerName {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenizerName::Char => "char",
            TokenizerName::Gpt2 => "gpt2",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// The token appended after each document (`<|endoftext|>` for GPT-2), if any.
    #[serde(default)]
    pub eot_token: Option<u16>,
    /// The `char` vocabulary: token `i` is the character `itos[i]` (nanoGPT's meta.pkl).
    #[serde(default)]
    pub itos: Option<Vec<String>>,
    #[serde(default)]
    pub shard_format: ShardFormat,
    /// The files tokenized, in order.
    #[serde(default)]
    pub sources: Vec<Source>,
    pub tokenizer: TokenizerName,
    #[serde(default)]
    pub train_tokens: u64,
    #[serde(default)]
    pub val_tokens: u64,
    pub vocab_size: usize,
}

/// The shard format the tokens are in (`shard.rs`), for readers other than nanoflow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardFormat {
    pub dtype: String,
    pub header_bytes: usize,
    pub magic: i32,
    pub version: i32,
}

impl Default for ShardFormat {
    fn default() -> ShardFormat {
        ShardFormat {
            dtype: "uint16".into(),
            header_bytes: shard::HEADER_BYTES,
            magic: shard::MAGIC,
            version: shard::FORMAT_VERSION,
        }
    }
}

/// One input file: its path relative to the input (so that meta.json does not depend on where
/// the store lives), size and digest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub blake3: String,
    pub bytes: u64,
    pub path: String,
    pub split: String,
}

impl Meta {
    /// The meta.json of `dir`, which must be a tokenize stage's output (or a train stage's).
    pub fn read(dir: &Path) -> anyhow::Result<Meta> {
        let path = dir.join(FILE);
        let text = fs_err::read_to_string(&path)
            .with_context(|| format!("`{}` is not a tokenize stage's output (it has no {FILE})", dir.display()))?;
        Meta::parse(&text).with_context(|| format!("could not read `{}`", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Meta> {
        let meta: Meta = serde_json::from_str(text)?;
        anyhow::ensure!(
            meta.tokenizer != TokenizerName::Char || meta.itos.is_some(),
            "a `char` tokenizer needs its vocabulary (`itos`)"
        );
        Ok(meta)
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        fs_err::write(dir.join(FILE), serde_json::to_string_pretty(self)? + "\n")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file as tokenize wrote it before it was typed: the same bytes.
    #[test]
    fn writes_what_it_always_wrote() {
        let meta = Meta {
            eot_token: None,
            itos: Some(vec!["\n".into(), "a".into()]),
            shard_format: ShardFormat::default(),
            sources: vec![Source { blake3: "ab".into(), bytes: 3, path: "input.txt".into(), split: "train".into() }],
            tokenizer: TokenizerName::Char,
            train_tokens: 2,
            val_tokens: 1,
            vocab_size: 2,
        };
        let untyped = serde_json::json!({
            "tokenizer": "char",
            "vocab_size": 2,
            "eot_token": null,
            "itos": ["\n", "a"],
            "shard_format": { "magic": 20240520, "version": 1, "header_bytes": 1024, "dtype": "uint16" },
            "train_tokens": 2,
            "val_tokens": 1,
            "sources": [{"split": "train", "path": "input.txt", "bytes": 3, "blake3": "ab"}],
        });
        assert_eq!(serde_json::to_string_pretty(&meta).unwrap(), serde_json::to_string_pretty(&untyped).unwrap());
        assert_eq!(Meta::parse(&serde_json::to_string(&meta).unwrap()).unwrap(), meta);
    }
}
