//! The text side of a model: turning a prompt into token ids and ids back into text, for
//! `sample` and HellaSwag, and the tokenizer files an export carries. A model's tokenizer is
//! the one its data was tokenized with: a tokenize stage records it in `meta.json`, a train
//! stage copies that file into its output, and an export writes it in the form its readers know
//! (Hugging Face's `vocab.json` + `merges.txt` for GPT-2 BPE, `char_vocab.json` for characters).

use std::path::Path;

use anyhow::{Context as _, bail, ensure};

use crate::formats::bpe::{self, Bpe};
use crate::formats::meta::{self, Meta, TokenizerName};

/// The file a char-level export keeps its vocabulary in. Documented in README.md:
/// `{"tokenizer": "char", "itos": ["\n", " ", "!", ...]}` — token id `i` is the character
/// `itos[i]`; a text encodes character by character.
pub const CHAR_VOCAB: &str = "char_vocab.json";

#[derive(Debug, Clone)]
pub enum Tokenizer {
    /// GPT-2's byte-level BPE (tiktoken's `gpt2`), `<|endoftext|>` = 50256.
    Gpt2,
    /// One token per character.
    Char(CharVocab),
}

/// A character vocabulary: token `i` is `chars[i]`, the sorted distinct characters of the data
/// (nanoGPT's `sorted(set(data))`).
#[derive(Debug, Clone)]
pub struct CharVocab {
    chars: Vec<char>,
    /// Token id by code point, `u32::MAX` where absent: a lookup per character, no hashing.
    ids: Vec<u32>,
}

impl CharVocab {
    /// The vocabulary of `chars` (distinct), in that order.
    pub fn new(chars: Vec<char>) -> anyhow::Result<CharVocab> {
        ensure!(
            chars.len() <= 1 << 16,
            "the input has {} distinct characters; token ids must fit uint16 (65536)",
            chars.len()
        );
        let mut ids = vec![u32::MAX; chars.iter().max().map_or(0, |&c| c as usize + 1)];
        for (id, &c) in chars.iter().enumerate() {
            ensure!(ids[c as usize] == u32::MAX, "the character {c:?} is in the vocabulary twice");
            ids[c as usize] = id as u32;
        }
        Ok(CharVocab { chars, ids })
    }

    /// meta.json's `itos`: one character per entry.
    pub fn from_itos(itos: &[String]) -> anyhow::Result<CharVocab> {
        let mut chars = Vec::with_capacity(itos.len());
        for (id, s) in itos.iter().enumerate() {
            let mut it = s.chars();
            match (it.next(), it.next()) {
                (Some(c), None) => chars.push(c),
                _ => bail!("entry {id} of `itos` is {s:?}, not one character"),
            }
        }
        CharVocab::new(chars)
    }

    pub fn itos(&self) -> Vec<String> {
        self.chars.iter().map(|c| c.to_string()).collect()
    }

    /// Appends the ids of `text`; a character the vocabulary lacks is an error naming it.
    pub fn encode(&self, text: &str, out: &mut Vec<u16>) -> anyhow::Result<()> {
        for c in text.chars() {
            match self.ids.get(c as usize) {
                Some(&id) if id != u32::MAX => out.push(id as u16),
                _ => bail!("the character {c:?} is not in the vocabulary"),
            }
        }
        Ok(())
    }
}

impl Tokenizer {
    /// The tokenizer a `meta.json` (a tokenize stage's, or its copy in a train stage) names.
    pub fn from_meta(meta: &Meta) -> anyhow::Result<Tokenizer> {
        Ok(match (meta.tokenizer, &meta.itos) {
            (TokenizerName::Gpt2, _) => Tokenizer::Gpt2,
            (TokenizerName::Char, Some(itos)) => Tokenizer::Char(CharVocab::from_itos(itos)?),
            (TokenizerName::Char, None) => bail!("a `char` tokenizer needs its vocabulary (`itos`)"),
        })
    }

    /// The tokenizer of a model folder: `meta.json` (a train stage's output), `char_vocab.json`
    /// (a char-level export, the tokenizer part of a meta.json) or `vocab.json` (GPT-2 BPE).
    /// `None` when the folder says nothing.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Option<Tokenizer>> {
        for name in [meta::FILE, CHAR_VOCAB] {
            let path = dir.join(name);
            if path.exists() {
                let meta = Meta::parse(&fs_err::read_to_string(&path)?)
                    .with_context(|| format!("could not read `{}`", path.display()))?;
                return Tokenizer::from_meta(&meta).map(Some).with_context(|| format!("in `{}`", path.display()));
            }
        }
        Ok(dir.join("vocab.json").exists().then_some(Tokenizer::Gpt2))
    }

    pub fn name(&self) -> TokenizerName {
        match self {
            Tokenizer::Gpt2 => TokenizerName::Gpt2,
            Tokenizer::Char(_) => TokenizerName::Char,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Gpt2 => bpe::VOCAB_SIZE,
            Tokenizer::Char(vocab) => vocab.chars.len(),
        }
    }

    /// The token that ends a document, if the tokenizer has one (GPT-2's `<|endoftext|>`).
    pub fn end_of_text(&self) -> Option<u16> {
        match self {
            Tokenizer::Gpt2 => Some(bpe::END_OF_TEXT),
            Tokenizer::Char(_) => None,
        }
    }

    /// Appends the ids of `text` (`<|endoftext|>` in it is plain text, as tiktoken's
    /// `encode_ordinary`).
    pub fn encode_into(&self, text: &str, out: &mut Vec<u16>) -> anyhow::Result<()> {
        match self {
            Tokenizer::Gpt2 => Bpe::gpt2().encode(text, out),
            Tokenizer::Char(vocab) => vocab.encode(text, out)?,
        }
        Ok(())
    }

    /// The ids of `text`; a character a char vocabulary lacks is an error naming it.
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let mut out = Vec::new();
        self.encode_into(text, &mut out)?;
        Ok(out.into_iter().map(u32::from).collect())
    }

    /// The bytes of `ids`: BPE tokens may split a UTF-8 character, so a stream is decoded
    /// lossily only once complete (or by [`Utf8Stream`]). Ids past the vocabulary (padding)
    /// become U+FFFD.
    pub fn decode_bytes(&self, ids: &[u32]) -> Vec<u8> {
        match self {
            Tokenizer::Gpt2 => {
                let ids: Vec<u16> = ids.iter().map(|&id| u16::try_from(id).unwrap_or(u16::MAX)).collect();
                Bpe::gpt2().decode(&ids)
            }
            Tokenizer::Char(vocab) => ids
                .iter()
                .map(|&id| vocab.chars.get(id as usize).copied().unwrap_or('\u{fffd}'))
                .collect::<String>()
                .into(),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids)).into_owned()
    }

    /// Writes the files a reader of an export needs to tokenize: for GPT-2, Hugging Face's
    /// `vocab.json`, `merges.txt`, `tokenizer_config.json` and `special_tokens_map.json`
    /// (`GPT2TokenizerFast.from_pretrained(dir)` loads them); for characters, [`CHAR_VOCAB`].
    pub fn write_export(&self, dir: &Path) -> anyhow::Result<Vec<&'static str>> {
        match self {
            Tokenizer::Char(vocab) => {
                let itos = vocab.itos();
                let vocab = serde_json::json!({"tokenizer": "char", "vocab_size": itos.len(), "itos": itos});
                fs_err::write(dir.join(CHAR_VOCAB), serde_json::to_string_pretty(&vocab)? + "\n")?;
                Ok(vec![CHAR_VOCAB])
            }
            Tokenizer::Gpt2 => {
                let bpe = Bpe::gpt2();
                let unicode = bytes_to_unicode();
                let name = |id: u16| -> String {
                    bpe.token_bytes(id).expect("a merge part is a token").iter().map(|&b| unicode[b as usize]).collect()
                };
                let mut vocab = serde_json::Map::new();
                for id in 0..bpe::END_OF_TEXT {
                    vocab.insert(name(id), id.into());
                }
                vocab.insert("<|endoftext|>".into(), bpe::END_OF_TEXT.into());
                fs_err::write(dir.join("vocab.json"), serde_json::to_string(&vocab)?)?;
                let mut merges = String::from("#version: 0.2\n");
                for (left, right) in bpe.merges()? {
                    merges.push_str(&format!("{} {}\n", name(left), name(right)));
                }
                fs_err::write(dir.join("merges.txt"), merges)?;
                let special = serde_json::json!({
                    "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                });
                let mut config = special.clone();
                config["tokenizer_class"] = "GPT2Tokenizer".into();
                config["model_max_length"] = 1024.into();
                config["add_prefix_space"] = false.into();
                fs_err::write(dir.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
                fs_err::write(dir.join("special_tokens_map.json"), serde_json::to_string_pretty(&special)? + "\n")?;
                Ok(vec!["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"])
            }
        }
    }
}

/// GPT-2's printable stand-ins for the 256 byte values (`bytes_to_unicode` in its encoder.py):
/// printable Latin-1 bytes stand for themselves, the rest map to U+0100 onwards in order.
fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut table = ['\0'; 256];
    let mut next = 256;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).expect("Latin-1")
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..")
        };
    }
    table
}

/// Decodes a token stream as it comes, holding back the bytes of a UTF-8 character that is not
/// complete yet, so that printing token by token shows the same text as decoding at the end.
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// The text that `bytes` completes.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An incomplete character at the end waits; an invalid one is replaced now.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let text = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
        self.pending.drain(..valid);
        text
    }

    /// Whatever is left, lossily.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpt2_round_trips_text() -> anyhow::Result<()> {
        let text = "Hello, world! Ünïcödé and 🙂 emoji.\n\n  spaces";
        let ids = Tokenizer::Gpt2.encode(text)?;
        assert_eq!(&ids[..4], &[15496, 11, 995, 0]); // tiktoken gpt2: "Hello", ",", " world", "!"
        assert_eq!(Tokenizer::Gpt2.decode(&ids), text);
        let mut stream = Utf8Stream::default();
        let streamed: String = ids.iter().map(|&id| stream.push(&Tokenizer::Gpt2.decode_bytes(&[id]))).collect();
        assert_eq!(streamed + &stream.finish(), text);
        Ok(())
    }

    #[test]
    fn char_vocabulary_encodes_and_names_unknown_characters() -> anyhow::Result<()> {
        let meta = Meta::parse(r#"{"tokenizer": "char", "vocab_size": 4, "itos": ["\n", " ", "a", "b"]}"#)?;
        let tokenizer = Tokenizer::from_meta(&meta)?;
        assert_eq!(tokenizer.encode("ab a\n")?, vec![2, 3, 1, 2, 0]);
        assert_eq!(tokenizer.decode(&[3, 2, 9]), "ba\u{fffd}");
        let err = tokenizer.encode("abc").unwrap_err();
        assert!(err.to_string().contains("'c' is not in the vocabulary"), "{err}");
        Ok(())
    }

    #[test]
    fn gpt2_export_files_match_gpt2s() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        Tokenizer::Gpt2.write_export(dir.path())?;
        let vocab: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&fs_err::read_to_string(dir.path().join("vocab.json"))?)?;
        assert_eq!(vocab.len(), 50257);
        // Known entries of openai-community/gpt2's vocab.json and merges.txt.
        assert_eq!(vocab["!"], 0);
        assert_eq!(vocab["Ġthe"], 262);
        assert_eq!(vocab["ĠHello"], 18435);
        assert_eq!(vocab["<|endoftext|>"], 50256);
        let merges = fs_err::read_to_string(dir.path().join("merges.txt"))?;
        let lines: Vec<&str> = merges.lines().collect();
        assert_eq!(lines.len(), 50001);
        assert_eq!(&lines[..4], &["#version: 0.2", "Ġ t", "Ġ a", "h e"]);
        assert_eq!(lines[50000], "Ġg azed");
        Ok(())
    }
}
