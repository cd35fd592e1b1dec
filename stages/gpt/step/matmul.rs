//! The linear layers' kernels and the matrix views they take: `linear_rows` (rows, I) ->
//! (rows, O) = input · weightᵀ + bias with the weight (O, I), `dinput_rows` (rows, O) ->
//! (rows, I), `weight_gradient` (O, I) += doutᵀ · input over all N rows, and `linear` (the rows
//! split between the threads); under them `matmul` and `gemm_one`, which multiply `View`s (raw
//! pointers with row and column strides, so that a kernel reads a head's columns or a transpose
//! in place) by `gemm`, or by `tiles` where a matrix's rows lie in order.

use std::ops::Range;

use gemm::Parallelism;
use rayon::prelude::*;

use super::params::Weights;
use crate::gpt::ops::tiles;

/// out (rows, O) = input (rows, I) · weightᵀ + bias, one thread.
pub(super) fn linear_rows(out: &mut [f32], input: &[f32], layer: &Weights<&[f32]>, i: usize, o: usize) {
    linear_columns(out, input, layer, i, o, 0..o);
}

/// Columns `cols` of out (rows, O) = input (rows, I) · weightᵀ + bias, one thread; the other
/// columns as they were.
pub(super) fn linear_columns(
    out: &mut [f32],
    input: &[f32],
    layer: &Weights<&[f32]>,
    i: usize,
    o: usize,
    cols: Range<usize>,
) {
    let rows = input.len() / i;
    assert!(out.len() == rows * o && layer.w.len() == o * i && cols.end <= o);
    if let Some(bias) = layer.b {
        out.chunks_exact_mut(o).for_each(|row| row[cols.clone()].copy_from_slice(&bias[cols.clone()]));
    }
    let (dst, weight) = (out[cols.start..].as_mut_ptr(), weight_t(layer, i, o).at(0, cols.start));
    // SAFETY: the views stay inside `input` (rows, I) and the weight (O, I) (its columns `cols`);
    // dst holds columns `cols` of `out`'s rows.
    unsafe { gemm_one(rows, cols.len(), i, dst, o, View::rows(input, i), weight, layer.b.is_some()) };
}

/// dinput (rows, I) = dout (rows, O) · weight (O, I), one thread.
pub(super) fn dinput_rows(dinput: &mut [f32], dout: &[f32], weight: &[f32], i: usize, o: usize) {
    let rows = dout.len() / o;
    assert!(dinput.len() == rows * i && weight.len() == o * i);
    // SAFETY: as in `linear_rows`.
    unsafe { gemm_one(rows, i, o, dinput.as_mut_ptr(), i, View::rows(dout, o), View::rows(weight, i), false) };
}

/// dweight (O, I) += doutᵀ · input over all N rows, its rows split between the threads.
pub(super) fn weight_gradient(dweight: &mut [f32], dout: &[f32], input: &[f32], i: usize, o: usize) {
    let n = input.len() / i;
    assert!(dout.len() == n * o && dweight.len() == o * i);
    let dout_t = View { ptr: dout.as_ptr(), rs: 1, cs: o as isize, turned: None };
    // SAFETY: the views stay inside dout (N, O) and input (N, I); dweight holds (O, I).
    unsafe { matmul(o, i, n, dweight.as_mut_ptr(), i, dout_t, View::rows(input, i), true) };
}

/// out (N, O) = input (N, I) · weightᵀ + bias, the weight (O, I), the rows split between the
/// threads (decoding a prompt or a window; the training step's row-wise regions call
/// `linear_rows`).
pub(super) fn linear(out: &mut [f32], input: &[f32], layer: &Weights<&[f32]>, i: usize, o: usize) {
    let n = input.len() / i;
    if let Some(bias) = layer.b {
        out.par_chunks_mut(rows_per_task(o) * o)
            .for_each(|rows| rows.chunks_exact_mut(o).for_each(|row| row.copy_from_slice(bias)));
    }
    let a = View::rows(input, i);
    assert!(out.len() >= n * o && layer.w.len() >= o * i);
    // SAFETY: the views stay inside `input` (N, I) and the weight (O, I); `out` holds (N, O).
    unsafe { matmul(n, o, i, out.as_mut_ptr(), o, a, weight_t(layer, i, o), layer.b.is_some()) };
}

/// Elements per rayon task of decoding's loops: enough that a task outlasts waking a thread for
/// it.
pub(super) const TASK: usize = 1 << 15;

/// Rows of `width` per task.
fn rows_per_task(width: usize) -> usize {
    (TASK / width).max(1)
}

/// A linear layer's weight (O, I) as the (I, O) right-hand matrix of input · weightᵀ: its
/// transposed copy where there is one.
fn weight_t(layer: &Weights<&[f32]>, i: usize, o: usize) -> View {
    match layer.t {
        Some(t) if tiles::available() => {
            assert!(t.len() == i * o);
            View { turned: Some(o), ..View::rows(t, o) }
        }
        _ => View { ptr: layer.w.as_ptr(), rs: 1, cs: i as isize, turned: None },
    }
}

/// A matrix in memory: element (r, k) at `ptr + r·rs + k·cs`.
#[derive(Clone, Copy)]
pub(super) struct View {
    pub(super) ptr: *const f32,
    pub(super) rs: isize,
    pub(super) cs: isize,
    /// Where the matrix's rows lie in order, this far apart, and the caller chose `tiles` for
    /// it (a weight's transposed copy, a window's V or Kᵀ): `gemm_one` multiplies by it there.
    pub(super) turned: Option<usize>,
}

impl View {
    /// A row-major matrix whose rows are `stride` apart.
    pub(super) fn rows(data: &[f32], stride: usize) -> View {
        View { ptr: data.as_ptr(), rs: stride as isize, cs: 1, turned: None }
    }

    /// The view moved to element (r, k).
    pub(super) fn at(self, r: usize, k: usize) -> View {
        // SAFETY (of the callers): the element is inside the matrix the view describes.
        View { ptr: unsafe { self.ptr.offset(r as isize * self.rs + k as isize * self.cs) }, ..self }
    }

    /// The transpose.
    pub(super) fn t(self) -> View {
        View { ptr: self.ptr, rs: self.cs, cs: self.rs, turned: None }
    }
}

/// A raw pointer that rayon tasks may share: each writes rows no other task writes.
#[derive(Clone, Copy)]
pub(super) struct SendPtr(pub(super) *mut f32);

unsafe impl Send for SendPtr {}

unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so that a closure captures the `SendPtr`, not its field).
    pub(super) fn get(self) -> *mut f32 {
        self.0
    }
}

/// dst (m, n), its rows `dst_rs` apart, = a (m, k) · b (k, n), plus dst's values when
/// `accumulate`. The rows of dst are split between the threads, each running a one-thread
/// `gemm` (at 2 threads that beat `gemm`'s own split on every shape of the step), or its columns
/// where it has too few rows (decoding: one row per sequence).
///
/// # Safety
/// The views and dst must describe matrices of these sizes inside live allocations, and dst
/// must not overlap a or b.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, a: View, b: View, accumulate: bool) {
    let threads = rayon::current_num_threads();
    let small = m * n * k < (1 << 18) || threads == 1;
    let (by_rows, tasks) = match () {
        _ if small => (true, 1),
        _ if m >= 2 * threads => (true, threads),
        _ if n >= 64 * threads => (false, threads),
        _ => (true, 1),
    };
    let size = if by_rows { m } else { n };
    let part = size.div_ceil(tasks);
    let dst = SendPtr(dst);
    let (a, b) = (SendView(a), SendView(b));
    (0..tasks).into_par_iter().for_each(|task| {
        let (start, end) = (task * part, ((task + 1) * part).min(size));
        if start >= end {
            return;
        }
        // SAFETY: rows (or columns) start..end of dst belong to this task alone; the caller
        // vouches for the rest.
        unsafe {
            match by_rows {
                true => {
                    let dst = dst.get().add(start * dst_rs);
                    gemm_one(end - start, n, k, dst, dst_rs, a.get().at(start, 0), b.get(), accumulate)
                }
                false => {
                    let dst = dst.get().add(start);
                    gemm_one(m, end - start, k, dst, dst_rs, a.get(), b.get().at(0, start), accumulate)
                }
            }
        }
    });
}

/// `View` for rayon tasks (read-only).
#[derive(Clone, Copy)]
struct SendView(View);

unsafe impl Send for SendView {}

unsafe impl Sync for SendView {}

impl SendView {
    fn get(self) -> View {
        self.0
    }
}

/// One single-threaded `gemm` call: dst (m, n) (+)= a · b.
///
/// # Safety
/// As `matmul`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_one(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    a: View,
    b: View,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if let (true, Some(ldb)) = (a.cs == 1, b.turned) {
        // A row-major input times a matrix whose rows lie in order (a weight's transposed copy,
        // a window's V or Kᵀ): no copy of either (see `tiles`).
        let (ldc, a_rs, a_cs, a, b) = (dst_rs, a.rs, a.cs, a.ptr, b.ptr);
        // SAFETY: as the caller's.
        return unsafe { tiles::matmul(tiles::Product { m, n, k, dst, ldc, a, a_rs, a_cs, b, ldb, accumulate }) };
    }
    // SAFETY: as the caller's; gemm reads dst only when `accumulate`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a.ptr,
            a.cs,
            a.rs,
            b.ptr,
            b.cs,
            b.rs,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}
