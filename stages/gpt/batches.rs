//! Batches of token windows, as nanoGPT's `get_batch` draws them from its memmapped data, and the
//! mean loss over a number of them (nanoGPT's `estimate_loss`), which both `train`'s evaluations
//! and `eval`'s loss columns are.

use candle_core::{Device, Tensor};

use crate::formats::shard::TokenSplit;
use crate::gpt::{Gpt, Rng};

/// nanoGPT's get_batch: `batch_size` windows at uniform random offsets; y is x shifted by one.
pub fn get_batch(
    data: &TokenSplit,
    rng: &mut Rng,
    (batch_size, block_size, vocab_size): (usize, usize, usize),
    device: &Device,
) -> anyhow::Result<(Tensor, Tensor)> {
    let offsets = batch_offsets(data, rng, batch_size, block_size);
    read_batch(data, &offsets, (block_size, vocab_size), device)
}

/// Where a batch's windows start: every rank draws every batch's, to stay on the shared stream.
pub fn batch_offsets(data: &TokenSplit, rng: &mut Rng, batch_size: usize, block_size: usize) -> Vec<u64> {
    (0..batch_size).map(|_| rng.below(data.len() - block_size as u64)).collect()
}

/// The windows at `offsets`: x (B, T) and y, x shifted by one. A token the model's vocabulary
/// does not have is an error naming its file (it would be an index past the embedding table).
pub fn read_batch(
    data: &TokenSplit,
    offsets: &[u64],
    (block_size, vocab_size): (usize, usize),
    device: &Device,
) -> anyhow::Result<(Tensor, Tensor)> {
    let mut window = vec![0u16; block_size + 1];
    let mut x = Vec::with_capacity(offsets.len() * block_size);
    let mut y = Vec::with_capacity(offsets.len() * block_size);
    for &offset in offsets {
        data.read(offset, &mut window)?;
        if let Some(at) = window.iter().position(|&token| token as usize >= vocab_size) {
            let offset = offset + at as u64;
            anyhow::bail!(
                "token {} at position {offset} of `{}` is past the model's vocabulary ({vocab_size} tokens)\nhint: \
                 the data was tokenized for another model; re-run its `tokenize` stage or set `vocab_size`",
                window[at],
                data.file_of(offset).display()
            );
        }
        x.extend(window[..block_size].iter().map(|&token| token as u32));
        y.extend(window[1..].iter().map(|&token| token as u32));
    }
    let x = Tensor::from_vec(x, (offsets.len(), block_size), device)?; // (B, T)
    let y = Tensor::from_vec(y, (offsets.len(), block_size), device)?; // (B, T)
    Ok((x, y))
}

/// The mean loss of `model` in eval mode (no dropout) over `iters` batches of `data`, drawn from
/// `rng`; `on_batch` is called after each (progress).
#[allow(clippy::too_many_arguments)]
pub fn mean_loss(
    model: &Gpt,
    data: &TokenSplit,
    rng: &mut Rng,
    iters: usize,
    batch_size: usize,
    block_size: usize,
    device: &Device,
    on_batch: &mut dyn FnMut(),
) -> anyhow::Result<f64> {
    let mut sum = 0.0;
    for _ in 0..iters {
        let (x, y) = get_batch(data, rng, (batch_size, block_size, model.config.vocab_size), device)?;
        sum += model.loss(&x, &y)?;
        on_batch();
    }
    Ok(sum / iters as f64)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::train::tests::char_data;

    #[test]
    fn batches_are_reproducible_windows() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let data = char_data(dir.path());
        let split = TokenSplit::open(Path::new(&data), "train")?;
        let draw = |seed| get_batch(&split, &mut Rng::new(seed), (4, 16, 65), &Device::Cpu).unwrap();
        let (x, y) = draw(1337);
        let (x2, y2) = draw(1337);
        assert_eq!(x.to_vec2::<u32>()?, x2.to_vec2::<u32>()?);
        assert_eq!(y.to_vec2::<u32>()?, y2.to_vec2::<u32>()?);
        assert_ne!(x.to_vec2::<u32>()?, draw(1338).0.to_vec2::<u32>()?);
        for (x, y) in x.to_vec2::<u32>()?.iter().zip(y.to_vec2::<u32>()?) {
            assert_eq!(x[1..], y[..15], "y is x shifted by one");
        }
        Ok(())
    }

    #[test]
    fn a_token_past_the_vocabulary_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = char_data(dir.path());
        let split = TokenSplit::open(Path::new(&data), "train").unwrap();
        // The characters are ids up to 64; a model of 10 tokens cannot read them.
        let error = get_batch(&split, &mut Rng::new(1), (4, 16, 10), &Device::Cpu).unwrap_err().to_string();
        assert!(error.contains("is past the model's vocabulary (10 tokens)"), "{error}");
        assert!(error.contains("train_000000.bin`"), "{error}");
    }
}
