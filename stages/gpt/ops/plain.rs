//! The same functions from candle's differentiable ops: what other devices run, and the
//! reference the fused kernels are tested against.

#[cfg(test)]
use candle_core::DType;
use candle_core::{D, Result, Tensor};

#[cfg(test)]
use super::attention_by_matmuls;
use super::cpu::CausalSoftmax;

pub fn gelu(x: &Tensor) -> Result<Tensor> {
    // candle's `gelu` is the tanh approximation.
    x.gelu()
}

pub fn normalize(x: &Tensor, eps: f32) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?; // (B, T, 1)
    let x = x.broadcast_sub(&mean)?; // (B, T, C)
    let variance = x.sqr()?.mean_keepdim(D::Minus1)?; // (B, T, 1), biased as PyTorch's
    x.broadcast_div(&(variance + eps as f64)?.sqrt()?)
}

#[cfg(test)]
pub fn causal_attention(qkv: &Tensor, n_head: usize, dtype: DType) -> Result<Tensor> {
    attention_by_matmuls(qkv, n_head, dtype, causal_softmax)
}

pub fn causal_softmax(att: &Tensor, scale: f64, past: usize) -> Result<Tensor> {
    let (t, keys) = CausalSoftmax { scale: scale as f32, past }.dims(att.shape())?;
    let att = (att * scale)?;
    let att = if t > 1 {
        let mask: Vec<u8> = (0..t).flat_map(|i| (0..keys).map(move |j| u8::from(j > past + i))).collect();
        let future = Tensor::from_vec(mask, (t, keys), att.device())?.broadcast_as(att.shape())?;
        let minus_infinity = Tensor::new(f32::NEG_INFINITY, att.device())?.to_dtype(att.dtype())?;
        future.where_cond(&minus_infinity.broadcast_as(att.shape())?, &att)?
    } else {
        att // one new position sees every cached one
    };
    candle_nn::ops::softmax(&att, D::Minus1)
}
