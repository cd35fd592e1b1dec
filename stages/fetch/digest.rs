//! blake3 of a file, read in large blocks, each hashed on all cores. Not memory-mapped: a
//! mapped multi-gigabyte file shows up in a process's (and a container's) memory as if it were
//! held, and this is as fast once the file is in the page cache.

use std::io::{self, Read};
use std::path::Path;

/// Large enough for blake3's rayon split to keep every core busy.
const BLOCK: usize = 8 << 20;

/// The blake3 hex digest of the file at `path`.
pub fn blake3_file(path: &Path) -> io::Result<String> {
    let mut file = fs_err::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut block = vec![0u8; BLOCK];
    loop {
        let mut filled = 0;
        while filled < BLOCK {
            match file.read(&mut block[filled..]) {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        if filled == 0 {
            break;
        }
        hasher.update_rayon(&block[..filled]);
        if filled < BLOCK {
            break;
        }
    }
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_blake3_of_the_bytes_across_block_edges() {
        let dir = tempfile::tempdir().unwrap();
        for size in [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 12345] {
            let bytes: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let path = dir.path().join(format!("{size}.bin"));
            fs_err::write(&path, &bytes).unwrap();
            assert_eq!(blake3_file(&path).unwrap(), blake3::hash(&bytes).to_hex().as_str(), "size {size}");
        }
    }
}
