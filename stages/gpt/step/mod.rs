//! The GPT's training step on the CPU, written out in llm.c's shape: the forward pass keeps its
//! activations in buffers allocated once per batch shape, the backward pass walks the layers in
//! reverse with every weight gradient accumulated straight into its sum (matmuls with beta = 1,
//! so micro-batches add up for free), and attention runs as per-head matmuls. No tensor is
//! allocated per op (only a few per-thread partial sums per layer) and no gradient is added
//! twice.
//!
//! Why: through candle's autograd a CPU step of nanoGPT's laptop recipe took 2.4× PyTorch's
//! time, most of it not in the matmuls but around them: a new tensor per op, a `zeros_like` and
//! an `add` per gradient contribution, attention by scalar loops (issue 15, `cargo bench -p
//! nanoflow-stages --bench model`). The model stays `model.rs`'s: `Gpt` hands this folder its
//! config and parameters (`Gpt::parameters`), and the step computes what `Gpt::forward` +
//! `cross_entropy` + `backward` compute, which the tests check against candle's autograd and
//! against `transformers`, with the same dropout masks (`DropoutMask`). Other devices and dtypes
//! train through candle's autograd, where the time is in the kernels. The step never reads the
//! model's types: `Gpt` calls it, never the other way round.
//!
//! Decoding (`Decoder`, behind `Gpt::forward_cached` on the CPU) runs the same kernels over the
//! new positions only, the keys and values of earlier ones kept in per-layer buffers.
//!
//! - `workspace`: the buffers (`Workspace`, `Activations`), the sizes (`Dims`), the rows split
//!   between the threads;
//! - `params`: the parameters as slices (`Params`) and the token ids;
//! - `forward`, `backward`: the two passes, layer by layer; `attention`: its forward and
//!   backward; `matmul`: the linear layers' kernels and their raw-pointer views;
//! - `decode`: decoding with the KV cache, and the sampling loop's logits.
//!
//! Shapes: B sequences of T tokens, N = B·T rows, C channels, H heads of hs = C / H, F = 4C,
//! V the vocabulary. Every matrix is row-major float32.

use candle_core::{Result, Tensor, Var, bail};
use rayon::prelude::*;

use crate::gpt::config::GptConfig;
use crate::gpt::device::on_cpu_pool;

mod attention;
mod backward;
mod decode;
mod forward;
mod matmul;
mod params;
#[cfg(test)]
mod tests;
mod workspace;

use backward::backward_pass;
pub(crate) use decode::{Decoder, decode, generate};
use forward::{Head, forward};
use params::{Params, param_slices, tokens};
use workspace::{Activations, Dims, Outputs};
pub(crate) use workspace::{Workspace, activation_floats};

/// One micro-batch of the model `config` whose parameters are `params` (in `Gpt::parameters`
/// order): the mean loss of `idx` (B, T) against `targets` (B, T), and with `backward` =
/// (weight, dropout seed) its gradient times `weight` added to the workspace's sums.
pub(crate) fn run(
    workspace: &mut Option<Workspace>,
    config: &GptConfig,
    params: &[&Tensor],
    idx: &Tensor,
    targets: &Tensor,
    backward: Option<(f32, u64)>,
) -> Result<f32> {
    let (b, t) = idx.dims2()?;
    if targets.dims2()? != (b, t) || t > config.block_size {
        bail!(
            "a batch of {:?} tokens against targets {:?}, block size {}",
            idx.shape(),
            targets.shape(),
            config.block_size
        )
    }
    let x = tokens(idx, config.vocab_size, "the input")?;
    let y = tokens(targets, config.vocab_size, "cross-entropy")?;
    let workspace = workspace.get_or_insert_with(Workspace::default);
    // The gradient sums, at the first backward pass (a model that only evaluates needs none).
    if backward.is_some() && workspace.grads.is_empty() {
        workspace.grads = params.iter().map(|p| vec![0f32; p.elem_count()]).collect();
    }
    let with_backward = backward.is_some() || workspace.acts.has_backward();
    if workspace.shape != (b, t) || with_backward != workspace.acts.has_backward() {
        let outputs = if with_backward { Outputs::Backward } else { Outputs::Loss };
        workspace.acts = Activations::new(config, b, t, outputs);
        workspace.shape = (b, t);
    }
    let guards: Vec<_> = params.iter().map(|p| p.storage_and_layout()).collect();
    let p = Params::from_list(config, param_slices(&guards)?);
    let threads = rayon::current_num_threads();
    let dims = Dims { b, t, c: config.n_embd, h: config.n_head, v: config.vocab_size, threads, decoding: false };
    let dropout = match backward {
        Some((_, seed)) if config.dropout > 0.0 => Some((config.dropout as f32, seed)),
        _ => None,
    };
    let (acts, grads) = (&mut workspace.acts, &mut workspace.grads);
    Ok(on_cpu_pool(|| {
        let loss = forward(acts, &p, &dims, &x, Head::Loss(&y), dropout);
        if let Some((weight, _)) = backward {
            let mut grads = Params::from_list(config, grads.iter_mut().map(Vec::as_mut_slice));
            backward_pass(acts, &p, &mut grads, &dims, &x, &y, weight, dropout);
        }
        loss
    }))
}

/// The sums `run` accumulated, one tensor per var (matched by identity to `params`, the model's
/// parameters; zeros for others, and for all before any backward pass), the sums set back to
/// zero.
pub(crate) fn take_gradients<'a>(
    workspace: &mut Option<Workspace>,
    params: &[&Tensor],
    vars: impl Iterator<Item = &'a Var>,
) -> Result<Vec<Tensor>> {
    let grads = &mut workspace.get_or_insert_with(Workspace::default).grads;
    let summed = !grads.is_empty();
    let index = |var: &Var| params.iter().position(|p| p.id() == var.as_tensor().id()).filter(|_| summed);
    vars.map(|var| match index(var) {
        Some(i) => {
            let grad = Tensor::from_slice(&grads[i], var.shape(), var.device())?;
            grads[i].par_chunks_mut(1 << 16).for_each(|chunk| chunk.fill(0.0));
            Ok(grad)
        }
        None => var.zeros_like(),
    })
    .collect()
}
