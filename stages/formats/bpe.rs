//! GPT-2's byte-pair encoding, token for token what tiktoken's `gpt2` encoding gives
//! (`encode_ordinary`: `<|endoftext|>` in the text is plain text). It owns the ranks, the
//! pre-tokenizer and the merges; it does not know files, documents or shards (`tokenize.rs`).
//!
//! Speed comes from three places:
//! - the pre-tokenizer is hand-written instead of a backtracking regex: GPT-2's pattern
//!   `'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s` only ever
//!   looks one character past a run of whitespace, so one forward scan reproduces it exactly;
//! - most pieces are whole tokens (one hash lookup), and the merges of the others are cached per
//!   thread;
//! - the merges of a long piece run over a heap (O(n log n)) rather than rescanning the piece
//!   after every merge, so no input is quadratic (the `bpe` crate's point, reached differently).
//!
//! Text splits at [`boundary`]s into chunks that encode independently to the same tokens as the
//! whole, which is what lets `tokenize` use every core and stay byte-identical at any thread count.

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::OnceLock;

use rayon::prelude::*;
use rustc_hash::FxHashMap;

/// tiktoken's `r50k_base` ranks, which are the `gpt2` encoding's: `base64(token bytes) rank`
/// per line.
const RANKS: &str = include_str!("assets/r50k_base.tiktoken");

/// `<|endoftext|>`, which nanoGPT appends after every document.
pub const END_OF_TEXT: u16 = 50256;
/// 50,256 merged tokens plus `<|endoftext|>`.
pub const VOCAB_SIZE: usize = 50257;

/// The ranks and the inverse table, parsed once per process.
pub struct Bpe {
    /// Tokens of up to 7 bytes (nearly all lookups), keyed by [`short_key`]: hashing a `u64`
    /// is one multiply, hashing a slice is a loop.
    short: FxHashMap<u64, u16>,
    /// Longer tokens.
    long: FxHashMap<Box<[u8]>, u16>,
    tokens: Vec<Box<[u8]>>,
}

/// The bytes of a token of at most 7 bytes and its length, in one `u64`.
#[inline(always)]
fn short_key(bytes: &[u8]) -> u64 {
    let mut key = [0u8; 8];
    key[..bytes.len()].copy_from_slice(bytes);
    key[7] = bytes.len() as u8;
    u64::from_le_bytes(key)
}

/// A piece longer than this merges over a heap; shorter ones rescan (fewer allocations).
const HEAP_ABOVE: usize = 128;
/// Per-thread cache of merged pieces; cleared when it grows past this many entries.
const CACHE_ENTRIES: usize = 1 << 16;

/// A piece's bytes -> its tokens.
type PieceCache = FxHashMap<Box<[u8]>, Box<[u16]>>;

thread_local! {
    static CACHE: RefCell<PieceCache> = RefCell::new(FxHashMap::default());
}

impl Bpe {
    /// The GPT-2 tokenizer (parsed on first use, about 10 ms).
    pub fn gpt2() -> &'static Bpe {
        static GPT2: OnceLock<Bpe> = OnceLock::new();
        GPT2.get_or_init(|| Bpe::parse(RANKS).expect("the embedded gpt2 ranks parse"))
    }

    fn parse(text: &str) -> anyhow::Result<Bpe> {
        let (mut short, mut long) = (FxHashMap::default(), FxHashMap::default());
        let mut tokens = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let (token, rank) =
                line.split_once(' ').ok_or_else(|| anyhow::anyhow!("rank line {} has no space", number + 1))?;
            let token: Box<[u8]> = base64_decode(token)?.into();
            let rank: usize = rank.parse()?;
            anyhow::ensure!(rank == tokens.len(), "ranks are not consecutive at line {}", number + 1);
            if token.len() <= 7 {
                short.insert(short_key(&token), rank as u16);
            } else {
                long.insert(token.clone(), rank as u16);
            }
            tokens.push(token);
        }
        anyhow::ensure!(tokens.len() == END_OF_TEXT as usize, "expected {END_OF_TEXT} ranks, found {}", tokens.len());
        Ok(Bpe { short, long, tokens })
    }

    /// Appends the tokens of `text` to `out`, like tiktoken's `encode_ordinary`.
    pub fn encode(&self, text: &str, out: &mut Vec<u16>) {
        let mut rest = text;
        while !rest.is_empty() {
            let end = next_piece(rest);
            self.encode_piece(&rest.as_bytes()[..end], out);
            rest = &rest[end..];
        }
    }

    /// [`encode`](Self::encode) on all cores: `text` splits at boundaries into chunks of about
    /// `chunk_bytes` that encode independently; the result is identical.
    pub fn encode_parallel(&self, text: &str, chunk_bytes: usize) -> Vec<u16> {
        let parts: Vec<Vec<u16>> = chunks(text, chunk_bytes)
            .par_iter()
            .map(|chunk| {
                let mut out = Vec::with_capacity(chunk.len() / 3);
                self.encode(chunk, &mut out);
                out
            })
            .collect();
        parts.concat()
    }

    /// The bytes of `tokens` (invalid UTF-8 is possible mid-sequence; decode lossily at the end).
    pub fn decode(&self, tokens: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        for &token in tokens {
            match self.tokens.get(token as usize) {
                Some(bytes) => out.extend_from_slice(bytes),
                None if token == END_OF_TEXT => out.extend_from_slice(b"<|endoftext|>"),
                None => out.extend_from_slice("\u{fffd}".as_bytes()),
            }
        }
        out
    }

    /// The bytes of token `id`; `None` for `<|endoftext|>` and ids past the vocabulary.
    pub fn token_bytes(&self, id: u16) -> Option<&[u8]> {
        self.tokens.get(id as usize).map(|bytes| &bytes[..])
    }

    /// GPT-2's merge list (what Hugging Face keeps in merges.txt), derived from the ranks: the
    /// token of rank `r` (past the 256 single bytes) is the merge of the two tokens that BPE
    /// reaches when it may only use merges ranked below `r`. In rank order.
    pub fn merges(&self) -> anyhow::Result<Vec<(u16, u16)>> {
        let mut merges = Vec::with_capacity(self.tokens.len());
        for (rank, token) in self.tokens.iter().enumerate() {
            if token.len() < 2 {
                continue;
            }
            let mut parts: Vec<&[u8]> = token.chunks(1).collect();
            while parts.len() > 2 {
                let best = (0..parts.len() - 1)
                    .filter_map(|i| {
                        let merged = [parts[i], parts[i + 1]].concat();
                        self.rank(&merged).filter(|&r| (r as usize) < rank).map(|r| (r, i))
                    })
                    .min()
                    .ok_or_else(|| anyhow::anyhow!("token {rank} is not a merge of lower-ranked tokens"))?;
                let i = best.1;
                parts[i] =
                    &token[parts[..i].iter().map(|p| p.len()).sum::<usize>()..][..parts[i].len() + parts[i + 1].len()];
                parts.remove(i + 1);
            }
            let left = self.rank(parts[0]).expect("a part of a merge is a token");
            let right = self.rank(parts[1]).expect("a part of a merge is a token");
            anyhow::ensure!((left as usize) < rank && (right as usize) < rank, "token {rank} merges later tokens");
            merges.push((left, right));
        }
        Ok(merges)
    }

    #[inline(always)]
    fn rank(&self, bytes: &[u8]) -> Option<u16> {
        if bytes.len() <= 7 { self.short.get(&short_key(bytes)).copied() } else { self.long.get(bytes).copied() }
    }

    fn encode_piece(&self, piece: &[u8], out: &mut Vec<u16>) {
        if let Some(rank) = self.rank(piece) {
            out.push(rank);
            return;
        }
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some(tokens) = cache.get(piece) {
                out.extend_from_slice(tokens);
                return;
            }
            let start = out.len();
            if piece.len() > HEAP_ABOVE {
                self.merge_with_heap(piece, out);
            } else {
                self.merge_by_scanning(piece, out);
            }
            if cache.len() >= CACHE_ENTRIES {
                cache.clear();
            }
            cache.insert(piece.into(), out[start..].into());
        })
    }

    /// tiktoken's merge loop: merge the adjacent pair whose concatenation has the lowest rank
    /// (the leftmost on a tie) until no pair is a token. `parts[i]` is (start of part i, rank of
    /// parts i and i+1 merged).
    fn merge_by_scanning(&self, piece: &[u8], out: &mut Vec<u16>) {
        let mut parts: Vec<(usize, u32)> = (0..=piece.len()).map(|start| (start, u32::MAX)).collect();
        let pair_rank = |parts: &[(usize, u32)], i: usize| -> u32 {
            // The rank of parts i and i+1 merged, once part i+1 merged with i+2 is accounted for
            // by the caller (it passes the parts before removing one).
            if i + 3 < parts.len() {
                self.rank(&piece[parts[i].0..parts[i + 3].0]).map_or(u32::MAX, u32::from)
            } else {
                u32::MAX
            }
        };
        for i in 0..piece.len().saturating_sub(1) {
            parts[i].1 = self.rank(&piece[i..i + 2]).map_or(u32::MAX, u32::from);
        }
        loop {
            let (mut best, mut at) = (u32::MAX, 0);
            for (i, &(_, rank)) in parts[..parts.len() - 1].iter().enumerate() {
                if rank < best {
                    (best, at) = (rank, i);
                }
            }
            if best == u32::MAX {
                break;
            }
            if at > 0 {
                parts[at - 1].1 = pair_rank(&parts, at - 1);
            }
            parts[at].1 = pair_rank(&parts, at);
            parts.remove(at + 1);
        }
        for pair in parts.windows(2) {
            out.push(self.rank(&piece[pair[0].0..pair[1].0]).expect("every byte is a token"));
        }
    }

    /// The same merges as [`merge_by_scanning`](Self::merge_by_scanning) in O(n log n): candidate
    /// pairs wait in a min-heap ordered by (rank, start), so the pop order is tiktoken's (lowest
    /// rank, leftmost first). A popped pair is stale unless both its parts are still whole.
    fn merge_with_heap(&self, piece: &[u8], out: &mut Vec<u16>) {
        let n = piece.len();
        const NONE: usize = usize::MAX;
        // Parts are byte ranges `start..next[start]`; only part starts are meaningful.
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        for i in 0..n - 1 {
            if let Some(rank) = self.rank(&piece[i..i + 2]) {
                heap.push(Reverse((rank, i, i + 2)));
            }
        }
        while let Some(Reverse((_, start, end))) = heap.pop() {
            if !alive[start] {
                continue;
            }
            let middle = next[start];
            if middle >= n || next[middle] != end {
                continue;
            }
            alive[middle] = false;
            next[start] = end;
            if end < n {
                prev[end] = start;
                if let Some(rank) = self.rank(&piece[start..next[end]]) {
                    heap.push(Reverse((rank, start, next[end])));
                }
            }
            if prev[start] != NONE {
                let before = prev[start];
                if let Some(rank) = self.rank(&piece[before..end]) {
                    heap.push(Reverse((rank, before, end)));
                }
            }
        }
        let mut start = 0;
        while start < n {
            out.push(self.rank(&piece[start..next[start]]).expect("every merged part is a token"));
            start = next[start];
        }
    }
}

/// The classes GPT-2's pattern distinguishes: `\p{L}`, `\p{N}`, `\s` and everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Class {
    Letter = 0,
    Number = 1,
    Space = 2,
    Other = 3,
}

/// The class of every code point, as a two-level table (blocks of 256 code points, shared when
/// equal) built from the regex crate's own Unicode tables, so classes match tiktoken's regex.
struct Classes {
    blocks: Vec<u16>,
    table: Vec<[Class; 256]>,
}

fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let mut flat = vec![Class::Other; 0x110000];
        for (pattern, class) in [(r"\p{L}", Class::Letter), (r"\p{N}", Class::Number), (r"\s", Class::Space)] {
            let hir = regex_syntax::parse(pattern).expect("a valid class");
            let regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(ranges)) = hir.kind() else {
                unreachable!("{pattern} is a Unicode class")
            };
            for range in ranges.iter() {
                flat[range.start() as usize..=range.end() as usize].fill(class);
            }
        }
        let mut blocks = Vec::new();
        let mut table: Vec<[Class; 256]> = Vec::new();
        let mut seen: FxHashMap<[u8; 256], u16> = FxHashMap::default();
        for block in flat.chunks_exact(256) {
            let block: [Class; 256] = block.try_into().expect("256 classes");
            let key = block.map(|class| class as u8);
            let index = *seen.entry(key).or_insert_with(|| {
                table.push(block);
                (table.len() - 1) as u16
            });
            blocks.push(index);
        }
        Classes { blocks, table }
    })
}

const ASCII: [Class; 128] = {
    let mut table = [Class::Other; 128];
    let mut byte = 0;
    while byte < 128 {
        let c = byte as u8;
        table[byte] = if c.is_ascii_alphabetic() {
            Class::Letter
        } else if c.is_ascii_digit() {
            Class::Number
        } else if matches!(c, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ') {
            Class::Space
        } else {
            Class::Other
        };
        byte += 1;
    }
    table
};

/// The class and UTF-8 length of the character starting at `bytes[0]`.
#[inline(always)]
fn class_at(bytes: &[u8]) -> (Class, usize) {
    let first = bytes[0];
    if first < 0x80 {
        return (ASCII[first as usize], 1);
    }
    let (code, len) = decode(bytes);
    let classes = classes();
    (classes.table[classes.blocks[(code >> 8) as usize] as usize][(code & 0xff) as usize], len)
}

/// The code point and length of the (valid, non-ASCII) UTF-8 character at `bytes[0]`.
#[inline(always)]
fn decode(bytes: &[u8]) -> (u32, usize) {
    let first = bytes[0] as u32;
    if first < 0xe0 {
        (((first & 0x1f) << 6) | (bytes[1] as u32 & 0x3f), 2)
    } else if first < 0xf0 {
        (((first & 0x0f) << 12) | ((bytes[1] as u32 & 0x3f) << 6) | (bytes[2] as u32 & 0x3f), 3)
    } else {
        (
            ((first & 0x07) << 18)
                | ((bytes[1] as u32 & 0x3f) << 12)
                | ((bytes[2] as u32 & 0x3f) << 6)
                | (bytes[3] as u32 & 0x3f),
            4,
        )
    }
}

/// The end of a run of `class` starting at `at`.
#[inline(always)]
fn run_end(bytes: &[u8], mut at: usize, class: Class) -> usize {
    while at < bytes.len() {
        let (next, len) = class_at(&bytes[at..]);
        if next != class {
            break;
        }
        at += len;
    }
    at
}

/// The length of the first piece of (non-empty) `text` under GPT-2's pattern, alternatives
/// tried in order as the regex does:
/// 1. `'(?:[sdmt]|ll|ve|re)`: a contraction;
/// 2. ` ?\p{L}++`, ` ?\p{N}++`, ` ?[^\s\p{L}\p{N}]++` (three alternatives): a run of one
///    class, with one leading space (U+0020 only) when the space is followed by that class;
/// 3. `\s++$`: whitespace that runs to the end of the text;
/// 4. `\s+(?!\S)`: whitespace followed by a non-space: all but its last character, so that a
///    final space can join the next word (needs two or more characters);
/// 5. `\s`: one whitespace character.
#[inline]
fn next_piece(text: &str) -> usize {
    let bytes = text.as_bytes();
    if bytes[0] == b'\'' && bytes.len() >= 2 {
        match bytes[1] {
            b's' | b'd' | b'm' | b't' => return 2,
            b'l' if bytes.get(2) == Some(&b'l') => return 3,
            b'v' | b'r' if bytes.get(2) == Some(&b'e') => return 3,
            _ => {}
        }
    }
    let (class, len) = class_at(bytes);
    if class != Class::Space {
        return run_end(bytes, len, class);
    }
    if bytes[0] == b' ' && len < bytes.len() {
        let (after, _) = class_at(&bytes[1..]);
        if after != Class::Space {
            return run_end(bytes, 1, after);
        }
    }
    // A whitespace run: find its end and where its last character starts.
    let mut last = 0;
    let mut at = len;
    while at < bytes.len() {
        let (next, next_len) = class_at(&bytes[at..]);
        if next != Class::Space {
            break;
        }
        last = at;
        at += next_len;
    }
    if at == bytes.len() {
        at
    } else if last > 0 {
        last
    } else {
        len
    }
}

/// Whether the pieces of `text` have a break at byte `at` whatever precedes it, so that
/// `text[..at]` and `text[at..]` encode independently to the tokens of `text`. True where the
/// class changes after a letter, number or other character that is not `'` (an apostrophe
/// may start a contraction): no piece spans such a change except ` ?X` and whitespace runs,
/// which begin with a space, not end with one.
pub fn boundary(text: &str, at: usize) -> bool {
    if at == 0 || at >= text.len() || !text.is_char_boundary(at) {
        return false;
    }
    let bytes = text.as_bytes();
    let mut before = at - 1;
    while !text.is_char_boundary(before) {
        before -= 1;
    }
    if bytes[before] == b'\'' {
        return false;
    }
    let (class_before, _) = class_at(&bytes[before..]);
    let (class_after, _) = class_at(&bytes[at..]);
    class_before != Class::Space && class_before != class_after
}

/// `text` cut at boundaries into chunks of about `target` bytes (longer where no boundary is
/// near); concatenating their encodings gives the encoding of `text`.
pub fn chunks(text: &str, target: usize) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > target {
        match (target..rest.len()).find(|&at| boundary(rest, at)) {
            Some(at) => {
                out.push(&rest[..at]);
                rest = &rest[at..];
            }
            None => break,
        }
    }
    out.push(rest);
    out
}

/// The last boundary of `text`, if any: where a streaming reader may cut a block.
pub fn last_boundary(text: &str) -> Option<usize> {
    (1..text.len()).rev().find(|&at| boundary(text, at))
}

fn base64_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut bits, mut count) = (0u32, 0);
    for byte in text.bytes() {
        let value = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => anyhow::bail!("invalid base64 `{text}`"),
        };
        bits = (bits << 6) | value as u32;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let end = next_piece(rest);
            out.push(&rest[..end]);
            rest = &rest[end..];
        }
        out
    }

    #[test]
    fn pre_tokenizes_like_the_gpt2_pattern() {
        assert_eq!(pieces("Hello world"), ["Hello", " world"]);
        assert_eq!(pieces("don't DON'T we'll"), ["don", "'t", " DON", "'", "T", " we", "'ll"]);
        assert_eq!(pieces("a  b"), ["a", " ", " b"]);
        assert_eq!(pieces("a\n\nb"), ["a", "\n", "\n", "b"]);
        assert_eq!(pieces("a   \n  b  "), ["a", "   \n ", " b", "  "]);
        assert_eq!(pieces("x 's 123 4!? "), ["x", " '", "s", " 123", " 4", "!?", " "]);
        assert_eq!(pieces("é\u{3000}日本"), ["é", "\u{3000}", "日本"]);
    }

    #[test]
    fn encodes_known_tokens() {
        let bpe = Bpe::gpt2();
        let mut out = Vec::new();
        bpe.encode("Hello world", &mut out);
        assert_eq!(out, [15496, 995]);
        assert_eq!(bpe.decode(&out), b"Hello world");
    }

    /// `tests/fixtures/gpt2_bpe.json` holds tiktoken's own output (`make_bpe_fixture.py`).
    #[test]
    fn matches_tiktoken_fixture() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gpt2_bpe.json");
        let fixture: serde_json::Value = serde_json::from_str(&fs_err::read_to_string(path).unwrap()).unwrap();
        let bpe = Bpe::gpt2();
        for case in fixture["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let expected: Vec<u16> = serde_json::from_value(case["tokens"].clone()).unwrap();
            let mut got = Vec::new();
            bpe.encode(text, &mut got);
            assert_eq!(got, expected, "{text:?}");
            assert_eq!(bpe.decode(&got), text.as_bytes());
        }
    }

    /// A larger check against tiktoken-rs's `r50k_base` (the same ranks and pattern) on tiny
    /// Shakespeare and on every chunk boundary of generated text.
    #[test]
    fn matches_tiktoken_rs() {
        let reference = tiktoken_rs::r50k_base().unwrap();
        let bpe = Bpe::gpt2();
        let mut texts =
            vec!["Ünïcödé ΑΒΓ 日本語 🦀👩‍👩‍👧 can't WON'T 3.14 x = [1, 2]; \t\n\r\n  \u{a0} \u{2003}end  ".repeat(50)];
        texts.push(
            fs_err::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/tinyshakespeare/input.txt")).unwrap(),
        );
        for text in texts {
            let expected: Vec<u16> = reference.encode_ordinary(&text).into_iter().map(|t| t as u16).collect();
            let mut got = Vec::new();
            bpe.encode(&text, &mut got);
            assert_eq!(got.len(), expected.len());
            assert!(got == expected);
        }
    }

    #[test]
    fn heap_and_scan_merge_alike() {
        let bpe = Bpe::gpt2();
        for piece in [
            "=".repeat(300),
            "abcdefghijklmnopqrstuvwxyz".repeat(10),
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".into(),
            "🦀🦀🦀🦀".into(),
        ] {
            let (mut scanned, mut heaped) = (Vec::new(), Vec::new());
            bpe.merge_by_scanning(piece.as_bytes(), &mut scanned);
            bpe.merge_with_heap(piece.as_bytes(), &mut heaped);
            assert_eq!(scanned, heaped, "{piece}");
            assert_eq!(bpe.decode(&heaped), piece.as_bytes());
        }
    }

    #[test]
    fn chunks_encode_like_the_whole() {
        let bpe = Bpe::gpt2();
        let text = "It's 2024: naïve café-owners   said \"don't!\"\n\n  Über 123,456.78 — 日本語のテキスト。\t\tend  "
            .repeat(40);
        let mut whole = Vec::new();
        bpe.encode(&text, &mut whole);
        for target in [1, 7, 50, 333] {
            let mut joined = Vec::new();
            for chunk in chunks(&text, target) {
                bpe.encode(chunk, &mut joined);
            }
            assert_eq!(joined, whole, "target {target}");
        }
        assert_eq!(bpe.encode_parallel(&text, 100), whole);
    }
}
