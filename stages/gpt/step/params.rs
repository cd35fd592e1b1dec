//! What the step reads: the model's parameters as slices of their tensors' storage (`Params`, in
//! `Gpt::parameters` order: wte (V, C), wpe (block, C), per layer ln_1 (C), c_attn (3C, C),
//! attn.c_proj (C, C), ln_2 (C), c_fc (4C, C), mlp.c_proj (C, 4C), each weight followed by its
//! bias where the model has biases, then ln_f (C)), the gradient sums in the same shape, the
//! linear weights' transposed copies decoding may keep (`transposed`), and the token ids (B, T),
//! checked against the vocabulary.

use candle_core::{Result, Storage, Tensor, bail};

use crate::gpt::config::GptConfig;

/// The model's parameters (or their gradients), in `Gpt::parameters` order.
pub(super) struct Params<T> {
    pub(super) wte: T,
    pub(super) wpe: T,
    pub(super) h: Vec<Layer<T>>,
    pub(super) ln_f: Weights<T>,
}

pub(super) struct Layer<T> {
    pub(super) ln_1: Weights<T>,
    pub(super) c_attn: Weights<T>,
    pub(super) attn_proj: Weights<T>,
    pub(super) ln_2: Weights<T>,
    pub(super) c_fc: Weights<T>,
    pub(super) mlp_proj: Weights<T>,
}

/// A layer's weights (or their gradients): a weight and, in a model with biases, a bias.
pub(super) struct Weights<T> {
    pub(super) w: T,
    pub(super) b: Option<T>,
    /// A linear layer's weight (O, I) transposed to (I, O), where a copy was made: `tiles`
    /// reads it as it lies, where `gemm` copies (I, O) out of the weight at every call.
    pub(super) t: Option<T>,
}

impl<T> Params<T> {
    pub(super) fn from_list(config: &GptConfig, list: impl IntoIterator<Item = T>) -> Params<T> {
        let mut list = list.into_iter();
        let mut next = || list.next().expect("a tensor per parameter");
        let (wte, wpe) = (next(), next());
        let bias = config.bias;
        let h = (0..config.n_layer)
            .map(|_| Layer {
                ln_1: Weights::next(bias, &mut next),
                c_attn: Weights::next(bias, &mut next),
                attn_proj: Weights::next(bias, &mut next),
                ln_2: Weights::next(bias, &mut next),
                c_fc: Weights::next(bias, &mut next),
                mlp_proj: Weights::next(bias, &mut next),
            })
            .collect();
        let ln_f = Weights::next(bias, &mut next);
        Params { wte, wpe, h, ln_f }
    }
}

impl<T> Weights<T> {
    /// The next weight of a list, and its bias if the model has biases.
    fn next(bias: bool, next: &mut impl FnMut() -> T) -> Weights<T> {
        let w = next();
        Weights { w, b: bias.then(next), t: None }
    }
}

/// The contiguous float32 data of a CPU tensor's storage.
fn data<'a>((storage, layout): &'a (candle_core::StorageRef<'_>, &candle_core::Layout)) -> Result<&'a [f32]> {
    match (&**storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => Ok(&cpu.as_slice::<f32>()?[start..end]),
        _ => bail!("the explicit CPU step needs contiguous float32 CPU parameters"),
    }
}

/// The model's parameters as slices, for as long as `guards` live.
pub(super) fn param_slices<'a>(
    guards: &'a [(candle_core::StorageRef<'_>, &candle_core::Layout)],
) -> Result<Vec<&'a [f32]>> {
    guards.iter().map(data).collect()
}

/// Transposed copies (I, O) of the linear layers' weights (O, I), in the order of `with_copies`.
pub(super) fn transposed(p: &Params<&[f32]>, c: usize) -> Vec<Vec<f32>> {
    let transpose = |w: &[f32], i: usize| {
        let o = w.len() / i;
        let mut t = vec![0f32; w.len()];
        for (r, row) in w.chunks_exact(i).enumerate() {
            row.iter().enumerate().for_each(|(k, &x)| t[k * o + r] = x);
        }
        t
    };
    let layers = p.h.iter().flat_map(|l| [(l.c_attn.w, c), (l.attn_proj.w, c), (l.c_fc.w, c), (l.mlp_proj.w, 4 * c)]);
    layers.map(|(w, i)| transpose(w, i)).collect()
}

impl<'a> Params<&'a [f32]> {
    /// The parameters with the linear layers' transposed `copies` (from `transposed`).
    pub(super) fn with_copies(mut self, copies: &'a [Vec<f32>]) -> Params<&'a [f32]> {
        let mut copies = copies.iter();
        for l in &mut self.h {
            for layer in [&mut l.c_attn, &mut l.attn_proj, &mut l.c_fc, &mut l.mlp_proj] {
                layer.t = Some(copies.next().expect("a copy per linear layer"));
            }
        }
        self
    }
}

/// The (B, T) u32 token ids of a CPU tensor, checked against the vocabulary.
pub(super) fn tokens(ids: &Tensor, vocab: usize, what: &str) -> Result<Vec<u32>> {
    let ids = ids.flatten_all()?.to_vec1::<u32>()?;
    in_vocabulary(&ids, vocab, what)?;
    Ok(ids)
}

pub(super) fn in_vocabulary(ids: &[u32], vocab: usize, what: &str) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(&bad) => bail!("{what}: token {bad} is outside the vocabulary of {vocab}"),
        None => Ok(()),
    }
}
