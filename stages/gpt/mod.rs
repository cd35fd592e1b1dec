//! The GPT and everything that touches tensors: the only part of nanoflow that imports candle.
//! The stage kinds above this folder say *what* to train, sample, evaluate or export; this folder
//! says how, on a CPU or a GPU.
//!
//! - `model`: nanoGPT's model.py (the layers, GPT-2 init, the loss, `generate`); `config`: its
//!   shape and the GPT-2 presets; `sampling`: the decoding loop and the draw of a token; `hf`:
//!   the Hugging Face GPT-2 layout; `ops`: the fused kernels, CPU and CUDA; `step`: the model's
//!   training step and decoding written out for the CPU, llm.c's way;
//! - `source`: where a model's weights come from (a Hub name, a train stage, an HF folder);
//! - `optim`: AdamW, the learning-rate schedule, clipping; `checkpoint`: what a run saves and
//!   resumes from; `rng`: the one seeded generator;
//! - `trainer`: how one rank trains (`train.rs` says when); `batches`: token windows and the
//!   mean loss over them;
//! - `device`: devices and dtypes by name; `dist`: data-parallel ranks and their collective;
//!   `ranks`: their processes on this machine;
//! - `bench`: nanoGPT's bench.py.

pub(crate) mod batches;
pub mod bench;
pub(crate) mod checkpoint;
pub(crate) mod config;
pub(crate) mod device;
pub mod estimate;
pub use device::{keep_freed_memory, one_cpu_pool};
pub mod dist;
pub(crate) mod hf;
pub(crate) mod model;
pub(crate) mod ops;
pub mod optim;
pub(crate) mod peak;
pub(crate) mod ranks;
pub(crate) mod rng;
pub(crate) mod sampling;
pub(crate) mod source;
pub(crate) mod step;
pub(crate) mod trainer;

pub use config::GptConfig;
pub use model::{Gpt, cross_entropy};
pub use rng::Rng;
pub use sampling::Sampling;
