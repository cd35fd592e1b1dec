//! Token shards: the files `tokenize` writes and `train` / `eval` read. It owns the on-disk
//! format (llm.c's) and a memory-mapped reader over a split; it does not know tokenizers.
//!
//! A shard is a header of 256 little-endian int32 — magic 20240520, version 1, the number of
//! tokens, the rest 0 — followed by the tokens as little-endian uint16 (llm.c's `dev/data`
//! format). A split is `train_000000.bin`, `train_000001.bin`, ... read in name order as one
//! stream. nanoGPT's headerless `train.bin` / `val.bin` (a bare uint16 array) read as a split too.

use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail, ensure};
use memmap2::Mmap;

/// The first int32 of every shard (llm.c's token files).
pub const MAGIC: i32 = 20240520;
/// The shard layout version; a reader refuses any other.
pub const FORMAT_VERSION: i32 = 1;
/// 256 int32.
pub const HEADER_BYTES: usize = 256 * 4;

/// The name of shard `index` of `split`: `train_000003.bin`.
pub fn shard_name(split: &str, index: usize) -> String {
    format!("{split}_{index:06}.bin")
}

fn header(tokens: u64) -> anyhow::Result<[u8; HEADER_BYTES]> {
    let count = i32::try_from(tokens).context("a shard holds at most 2^31-1 tokens")?;
    let mut header = [0u8; HEADER_BYTES];
    header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[8..12].copy_from_slice(&count.to_le_bytes());
    Ok(header)
}

/// Writes one split as shards of at most `shard_tokens` tokens each. A shard is written with a
/// zero count and gets its real count when it is closed; nothing reads shards before `finish`.
pub struct ShardWriter {
    dir: PathBuf,
    split: String,
    shard_tokens: u64,
    current: Option<(BufWriter<fs_err::File>, u64)>,
    paths: Vec<PathBuf>,
    total: u64,
}

impl ShardWriter {
    pub fn new(dir: &Path, split: &str, shard_tokens: u64) -> anyhow::Result<ShardWriter> {
        ensure!(shard_tokens > 0, "`shard_tokens` must be at least 1");
        header(shard_tokens)?;
        Ok(ShardWriter {
            dir: dir.to_path_buf(),
            split: split.to_string(),
            shard_tokens,
            current: None,
            paths: Vec::new(),
            total: 0,
        })
    }

    pub fn write(&mut self, mut tokens: &[u16]) -> anyhow::Result<()> {
        let mut bytes = Vec::with_capacity(2 * tokens.len().min(1 << 20));
        while !tokens.is_empty() {
            if self.current.is_none() {
                let path = self.dir.join(shard_name(&self.split, self.paths.len()));
                let mut file = BufWriter::with_capacity(1 << 20, fs_err::File::create(&path)?);
                file.write_all(&header(0)?).with_context(|| format!("could not write `{}`", path.display()))?;
                self.paths.push(path);
                self.current = Some((file, 0));
            }
            let (file, count) = self.current.as_mut().expect("a shard is open");
            let take = ((self.shard_tokens - *count) as usize).min(tokens.len()).min(1 << 20);
            bytes.clear();
            bytes.extend(tokens[..take].iter().flat_map(|token| token.to_le_bytes()));
            let path = self.paths.last().expect("a shard is open");
            file.write_all(&bytes).with_context(|| format!("could not write `{}`", path.display()))?;
            *count += take as u64;
            self.total += take as u64;
            tokens = &tokens[take..];
            if *count == self.shard_tokens {
                self.close()?;
            }
        }
        Ok(())
    }

    fn close(&mut self) -> anyhow::Result<()> {
        if let Some((file, count)) = self.current.take() {
            let path = self.paths.last().expect("a shard is open").clone();
            let mut file = file.into_inner().map_err(|error| error.into_error())?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(&header(count)?)?;
            file.sync_all().with_context(|| format!("could not write `{}`", path.display()))?;
        }
        Ok(())
    }

    /// Closes the last shard; returns the shard paths and the number of tokens written.
    pub fn finish(mut self) -> anyhow::Result<(Vec<PathBuf>, u64)> {
        self.close()?;
        Ok((std::mem::take(&mut self.paths), self.total))
    }
}

/// Moves the last `tail` tokens of the shards at `paths` (one split, `total` tokens) into
/// `into`, truncating and removing those shards so that the first split keeps the head. This is
/// how `val_fraction` takes the tail of a stream whose length is known only at its end.
pub fn split_off_tail(
    paths: &[PathBuf],
    total: u64,
    tail: u64,
    into: &mut ShardWriter,
) -> anyhow::Result<Vec<PathBuf>> {
    ensure!(tail <= total, "cannot split {tail} tokens off {total}");
    let keep = total - tail;
    {
        let split = TokenSplit::from_paths(paths.to_vec(), Layout::Sharded)?;
        ensure!(split.len() == total, "shards hold {} tokens, expected {total}", split.len());
        let mut buffer = vec![0u16; 1 << 20];
        let mut offset = keep;
        while offset < total {
            let n = ((total - offset) as usize).min(buffer.len());
            split.read(offset, &mut buffer[..n])?;
            into.write(&buffer[..n])?;
            offset += n as u64;
        }
    }
    let mut kept = Vec::new();
    let mut start = 0u64;
    for path in paths {
        let count = read_header(path)?;
        if start >= keep {
            fs_err::remove_file(path)?;
        } else {
            if start + count > keep {
                let count = keep - start;
                let mut file = fs_err::OpenOptions::new().write(true).open(path)?;
                file.set_len((HEADER_BYTES as u64) + 2 * count)?;
                file.write_all(&header(count)?)?;
                file.sync_all()?;
            }
            kept.push(path.clone());
        }
        start += count;
    }
    Ok(kept)
}

/// The token count in a shard's header, checking magic and version.
fn read_header(path: &Path) -> anyhow::Result<u64> {
    use std::io::Read;
    let mut bytes = [0u8; 12];
    fs_err::File::open(path)?
        .read_exact(&mut bytes)
        .with_context(|| format!("`{}` is too short for a token shard", path.display()))?;
    check_header(path, &bytes)
}

fn int(bytes: &[u8], index: usize) -> i32 {
    i32::from_le_bytes(bytes[4 * index..4 * index + 4].try_into().expect("4 bytes"))
}

fn check_header(path: &Path, bytes: &[u8]) -> anyhow::Result<u64> {
    let hint = "re-run the `tokenize` stage that produced it";
    if bytes.len() < 12 || int(bytes, 0) != MAGIC {
        let magic = if bytes.len() >= 4 { int(bytes, 0) } else { 0 };
        bail!("`{}` is not a token shard (magic {magic}, expected {MAGIC})\nhint: {hint}", path.display());
    }
    let version = int(bytes, 1);
    if version != FORMAT_VERSION {
        bail!(
            "`{}` has token shard version {version}, this nanoflow reads version {FORMAT_VERSION}\nhint: {hint}",
            path.display()
        );
    }
    let count = int(bytes, 2);
    ensure!(count >= 0, "`{}` has a negative token count {count}\nhint: {hint}", path.display());
    Ok(count as u64)
}

/// How the files of a split store their tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// nanoflow / llm.c shards with a header.
    Sharded,
    /// nanoGPT's `train.bin`: a bare little-endian uint16 array.
    Raw,
}

struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the first token.
    data: usize,
    tokens: u64,
}

/// One split (`train` or `val`) as a single stream of tokens over memory-mapped files.
pub struct TokenSplit {
    shards: Vec<Shard>,
    /// `starts[i]`: the index in the stream of shard i's first token.
    starts: Vec<u64>,
    len: u64,
    layout: Layout,
}

impl TokenSplit {
    /// Opens `split` in `dir`: all `{split}_NNNNNN.bin` shards in name order, or else nanoGPT's
    /// `{split}.bin` (with a shard header if it has one, else a raw uint16 array).
    pub fn open(dir: &Path, split: &str) -> anyhow::Result<TokenSplit> {
        let prefix = format!("{split}_");
        let mut paths = Vec::new();
        for entry in fs_err::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
            if let Some(digits) = name.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(".bin"))
                && !digits.is_empty()
                && digits.bytes().all(|b| b.is_ascii_digit())
            {
                paths.push(path);
            }
        }
        paths.sort();
        if !paths.is_empty() {
            return TokenSplit::from_paths(paths, Layout::Sharded);
        }
        let raw = dir.join(format!("{split}.bin"));
        if raw.is_file() {
            let layout = if has_valid_header(&raw)? { Layout::Sharded } else { Layout::Raw };
            return TokenSplit::from_paths(vec![raw], layout);
        }
        bail!(
            "no `{split}` tokens in `{}`: expected `{}` files or `{split}.bin`\nhint: point this at the output of a `tokenize` stage",
            dir.display(),
            shard_name(split, 0)
        )
    }

    /// Opens the given files, in this order, as one split.
    pub fn from_paths(paths: Vec<PathBuf>, layout: Layout) -> anyhow::Result<TokenSplit> {
        let mut shards = Vec::new();
        let mut starts = Vec::new();
        let mut len = 0u64;
        for path in paths {
            let file = fs_err::File::open(&path)?;
            let bytes = file.metadata()?.len();
            let (data, tokens) = match layout {
                Layout::Sharded => {
                    let mut head = [0u8; 12];
                    use std::io::Read;
                    (&file).read_exact(&mut head).map_err(|_| {
                        anyhow::anyhow!(
                            "`{}` is too short for a token shard\nhint: re-run the `tokenize` stage that produced it",
                            path.display()
                        )
                    })?;
                    let tokens = check_header(&path, &head)?;
                    let expected = HEADER_BYTES as u64 + 2 * tokens;
                    ensure!(
                        bytes == expected,
                        "`{}` {}: its header says {tokens} tokens ({expected} bytes) but it has {bytes} bytes\nhint: re-run the `tokenize` stage that produced it",
                        path.display(),
                        if bytes < expected { "is truncated" } else { "has bytes past its tokens" }
                    );
                    (HEADER_BYTES, tokens)
                }
                Layout::Raw => {
                    ensure!(
                        bytes % 2 == 0,
                        "`{}` has an odd size ({bytes} bytes), so it is not a uint16 token file",
                        path.display()
                    );
                    (0, bytes / 2)
                }
            };
            if tokens == 0 {
                continue;
            }
            // SAFETY: the store never rewrites a published file; a file changed underneath us
            // would give wrong tokens, not memory unsafety beyond what any mmap reader accepts.
            let map =
                unsafe { Mmap::map(file.file()) }.with_context(|| format!("could not map `{}`", path.display()))?;
            starts.push(len);
            len += tokens;
            shards.push(Shard { path, map, data, tokens });
        }
        Ok(TokenSplit { shards, starts, len, layout })
    }

    /// The number of tokens in the split.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The files of the split, in stream order.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|shard| shard.path.as_path())
    }

    /// Copies `out.len()` tokens starting at stream position `offset` into `out`, across shard
    /// boundaries.
    /// The file holding token `offset` of the split, for messages.
    pub fn file_of(&self, offset: u64) -> &Path {
        let index = self.starts.partition_point(|&start| start <= offset).saturating_sub(1);
        &self.shards[index].path
    }

    pub fn read(&self, offset: u64, out: &mut [u16]) -> anyhow::Result<()> {
        let end = offset.checked_add(out.len() as u64).filter(|&end| end <= self.len);
        ensure!(
            end.is_some(),
            "tokens {offset}..{} are past the end of the split ({} tokens)",
            offset + out.len() as u64,
            self.len
        );
        let mut index = self.starts.partition_point(|&start| start <= offset).saturating_sub(1);
        let mut position = offset;
        let mut done = 0;
        while done < out.len() {
            let shard = &self.shards[index];
            let within = position - self.starts[index];
            let n = ((shard.tokens - within) as usize).min(out.len() - done);
            let start = shard.data + 2 * within as usize;
            let bytes = &shard.map[start..start + 2 * n];
            for (token, pair) in out[done..done + n].iter_mut().zip(bytes.chunks_exact(2)) {
                *token = u16::from_le_bytes([pair[0], pair[1]]);
            }
            done += n;
            position += n as u64;
            index += 1;
        }
        Ok(())
    }

    /// `n` tokens starting at `offset`.
    pub fn slice(&self, offset: u64, n: usize) -> anyhow::Result<Vec<u16>> {
        let mut out = vec![0u16; n];
        self.read(offset, &mut out)?;
        Ok(out)
    }
}

/// Whether `path` starts with a shard header whose count matches its size (so that a raw
/// `train.bin` whose first tokens happen to spell the magic is still read as raw).
fn has_valid_header(path: &Path) -> anyhow::Result<bool> {
    use std::io::Read;
    let mut file = fs_err::File::open(path)?;
    let size = file.metadata()?.len();
    let mut head = [0u8; 12];
    if file.read_exact(&mut head).is_err() {
        return Ok(false);
    }
    Ok(int(&head, 0) == MAGIC
        && int(&head, 1) == FORMAT_VERSION
        && size == HEADER_BYTES as u64 + 2 * int(&head, 2).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_split(dir: &Path, split: &str, tokens: &[u16], shard_tokens: u64) -> (Vec<PathBuf>, u64) {
        let mut writer = ShardWriter::new(dir, split, shard_tokens).unwrap();
        for chunk in tokens.chunks(7) {
            writer.write(chunk).unwrap();
        }
        writer.finish().unwrap()
    }

    #[test]
    fn a_shard_with_bytes_past_its_tokens_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, _) = write_split(dir.path(), "train", &[1, 2, 3], 100);
        let mut bytes = fs_err::read(&paths[0]).unwrap();
        bytes.push(7);
        fs_err::write(&paths[0], bytes).unwrap();
        let error = TokenSplit::open(dir.path(), "train").err().unwrap().to_string();
        assert!(error.ends_with("has bytes past its tokens: its header says 3 tokens (1030 bytes) but it has 1031 bytes\nhint: re-run the `tokenize` stage that produced it"), "{error}");
    }

    #[test]
    fn writes_llm_c_format() {
        let dir = tempfile::tempdir().unwrap();
        let (paths, total) = write_split(dir.path(), "train", &[1, 2, 258], 100);
        assert_eq!(total, 3);
        assert_eq!(paths, vec![dir.path().join("train_000000.bin")]);
        let bytes = fs_err::read(&paths[0]).unwrap();
        assert_eq!(bytes.len(), 1024 + 6);
        assert_eq!(&bytes[0..12], &[0x88, 0xd8, 0x34, 0x01, 1, 0, 0, 0, 3, 0, 0, 0]);
        assert!(bytes[12..1024].iter().all(|&b| b == 0));
        assert_eq!(&bytes[1024..], &[1, 0, 2, 0, 2, 1]);
    }

    #[test]
    fn reads_across_shards() {
        let dir = tempfile::tempdir().unwrap();
        let tokens: Vec<u16> = (0..1000).collect();
        let (paths, _) = write_split(dir.path(), "train", &tokens, 64);
        assert_eq!(paths.len(), 16);
        let split = TokenSplit::open(dir.path(), "train").unwrap();
        assert_eq!(split.len(), 1000);
        assert_eq!(split.layout(), Layout::Sharded);
        assert_eq!(split.slice(60, 10).unwrap(), (60..70).collect::<Vec<u16>>());
        assert_eq!(split.slice(0, 1000).unwrap(), tokens);
        assert!(split.slice(995, 6).is_err());
    }

    #[test]
    fn splits_off_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let tokens: Vec<u16> = (0..100).collect();
        for tail in [0u64, 1, 10, 11, 25, 99] {
            let train_dir = dir.path().join(format!("t{tail}"));
            fs_err::create_dir_all(&train_dir).unwrap();
            let (paths, total) = write_split(&train_dir, "train", &tokens, 10);
            let mut val = ShardWriter::new(&train_dir, "val", 10).unwrap();
            split_off_tail(&paths, total, tail, &mut val).unwrap();
            val.finish().unwrap();
            let train = TokenSplit::open(&train_dir, "train").unwrap();
            assert_eq!(train.slice(0, train.len() as usize).unwrap(), tokens[..100 - tail as usize]);
            if tail > 0 {
                let val = TokenSplit::open(&train_dir, "val").unwrap();
                assert_eq!(val.slice(0, val.len() as usize).unwrap(), tokens[100 - tail as usize..]);
            }
        }
    }

    #[test]
    fn reads_nanogpt_raw_bin() {
        let dir = tempfile::tempdir().unwrap();
        let bytes: Vec<u8> = [5u16, 6, 65535].iter().flat_map(|t| t.to_le_bytes()).collect();
        fs_err::write(dir.path().join("val.bin"), bytes).unwrap();
        let split = TokenSplit::open(dir.path(), "val").unwrap();
        assert_eq!(split.layout(), Layout::Raw);
        assert_eq!(split.slice(0, 3).unwrap(), vec![5, 6, 65535]);
    }

    #[test]
    fn wrong_magic_names_the_file_and_the_stage() {
        let dir = tempfile::tempdir().unwrap();
        fs_err::write(dir.path().join("train_000000.bin"), vec![7u8; 2048]).unwrap();
        let error = TokenSplit::open(dir.path(), "train").err().unwrap().to_string();
        assert!(error.contains("train_000000.bin` is not a token shard"), "{error}");
        assert!(error.contains("re-run the `tokenize` stage"), "{error}");

        let (paths, _) = write_split(dir.path(), "val", &[1, 2], 10);
        let mut bytes = fs_err::read(&paths[0]).unwrap();
        bytes[4] = 9;
        fs_err::write(&paths[0], bytes).unwrap();
        let error = TokenSplit::open(dir.path(), "val").err().unwrap().to_string();
        assert!(error.contains("has token shard version 9"), "{error}");
    }
}
