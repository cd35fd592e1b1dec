//! The fused kernels' CUDA halves: `kernels.cu` compiled to PTX by build.rs, launched on candle's
//! CUDA storage.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};

/// A scalar kernel argument after the buffers.
pub enum Arg {
    U32(u32),
    U64(u64),
    F32(f32),
}
use candle_core::{CudaStorage, Layout, Result, Shape, bail};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ops.ptx"));
/// Threads per row of the row-wise kernels (ROW_THREADS in ops.cu).
const ROW_THREADS: u32 = 256;

fn view<'a, T: candle_core::cuda_backend::CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
) -> Result<CudaView<'a, T>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(storage.as_cuda_slice::<T>()?.slice(start..end)),
        None => bail!("fused kernel: the input must be contiguous"),
    }
}

/// f(inputs..., out, n) over every element, in a grid-stride loop.
pub fn elementwise(name: &str, inputs: &[(&CudaStorage, &Layout)], layout: &Layout) -> Result<(CudaStorage, Shape)> {
    let n = layout.shape().elem_count();
    let blocks = (n as u32).div_ceil(256).clamp(1, 65_535);
    let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    launch(name, inputs, layout, &[Arg::U64(n as u64)], config)
}

/// f(inputs..., out, extra args...) with one block per row of `layout`'s last dimension.
pub fn rows(
    name: &str,
    inputs: &[(&CudaStorage, &Layout)],
    layout: &Layout,
    extra: &[Arg],
) -> Result<(CudaStorage, Shape)> {
    let width = layout.shape().dims().last().copied().unwrap_or(1).max(1);
    let rows = (layout.shape().elem_count() / width) as u32;
    launch(name, inputs, layout, extra, row_config(rows))
}

/// f(inputs..., out, extra...) into a new f32 buffer of `layout`'s shape.
fn launch(
    name: &str,
    inputs: &[(&CudaStorage, &Layout)],
    layout: &Layout,
    extra: &[Arg],
    config: LaunchConfig,
) -> Result<(CudaStorage, Shape)> {
    let device = inputs[0].0.device().clone();
    let views = inputs.iter().map(|(s, l)| view::<f32>(s, l)).collect::<Result<Vec<_>>>()?;
    let out = unsafe { device.alloc::<f32>(layout.shape().elem_count())? };
    let func = device.get_or_load_custom_func(name, "nanoflow_ops", PTX)?;
    let mut builder = func.builder();
    for view in &views {
        builder.arg(view);
    }
    builder.arg(&out);
    for arg in extra {
        match arg {
            Arg::U32(value) => builder.arg(value),
            Arg::U64(value) => builder.arg(value),
            Arg::F32(value) => builder.arg(value),
        };
    }
    if config.grid_dim.0 > 0 {
        unsafe { builder.launch(config) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, device), layout.shape().clone()))
}

/// The cross-entropy kernels: f(logits, targets, [grad,] out, vocab), a block per row.
pub fn cross_entropy(
    name: &str,
    logits: (&CudaStorage, &Layout),
    targets: (&CudaStorage, &Layout),
    grad: Option<(&CudaStorage, &Layout)>,
    rows: usize,
    out_len: usize,
    vocab: u32,
) -> Result<(CudaStorage, Shape)> {
    let device = logits.0.device().clone();
    let logits = view::<f32>(logits.0, logits.1)?;
    let targets = view::<u32>(targets.0, targets.1)?;
    let grad = grad.map(|(s, l)| view::<f32>(s, l)).transpose()?;
    let out = unsafe { device.alloc::<f32>(out_len)? };
    let func = device.get_or_load_custom_func(name, "nanoflow_ops", PTX)?;
    let mut builder = func.builder();
    builder.arg(&logits).arg(&targets);
    if let Some(grad) = &grad {
        builder.arg(grad);
    }
    builder.arg(&out).arg(&vocab);
    if rows > 0 {
        unsafe { builder.launch(row_config(rows as u32)) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(rows)))
}

/// One block of ROW_THREADS per row.
fn row_config(rows: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows, 1, 1), block_dim: (ROW_THREADS, 1, 1), shared_mem_bytes: 0 }
}
