//! File formats the stages write and read, with no tensors in them: token shards and the
//! `meta.json` beside them, GPT-2's BPE and the tokenizers built on it, and the training record
//! (`metrics.parquet`, `loss.png`).

pub mod bpe;
pub(crate) mod meta;
pub mod metrics;
pub mod plot;
pub(crate) mod shard;
pub(crate) mod table;
pub(crate) mod tokenizer;
