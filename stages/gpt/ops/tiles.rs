//! A matmul for a right-hand matrix whose rows lie in order: dst (m, n) (+)= a (m, k) · b (k, n),
//! b's rows contiguous, a in any layout, run on one thread.
//!
//! `gemm` copies both matrices into its own layout ("packing") at every call. At the shapes of
//! the CPU recipe and of sampling (K = 128, a few hundred rows a thread), that copying was 17% of
//! a sampling step's perf samples (AMD Zen 5), as much as a third of the multiply-adds' own time.
//! These kernels read both matrices where they lie: at each k, one row's NR columns of b are
//! loaded and each of MR rows' element of a is broadcast against them, into MR × NR sums held in
//! registers. Nothing is copied, and nothing is allocated.
//!
//! Each element is one fused multiply-add chain over k in order (in passes of 256, each pass's
//! chain added to dst), from zero, then added to dst's value when accumulating: the same bits
//! however the rows and columns are split between calls or threads, as `gemm`'s large kernels
//! sum (not its small ones: at some shapes the two differ in the last bits). Kernels exist for
//! AVX-512 and for AVX2 with FMA; on other CPUs `available` is false and the caller keeps
//! `gemm`.

/// k per pass over dst: b's rows of a panel (32 columns, 128 bytes) for 256 values of k are 32
/// KiB, within a core's first-level cache.
const KC: usize = 256;
/// Rows of a per block: each block's a (96 rows × 256 k, 96 KiB) stays in the second-level cache
/// while b's panels pass.
const MC: usize = 96;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Avx512,
    Avx2,
    None,
}

fn level() -> Level {
    static LEVEL: std::sync::OnceLock<Level> = std::sync::OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                return Level::Avx512;
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Level::Avx2;
            }
        }
        Level::None
    })
}

/// Whether this CPU runs `matmul`.
pub(crate) fn available() -> bool {
    level() != Level::None
}

/// A level's tile: (MR, NR, kernel).
fn kernel(level: Level) -> Option<(usize, usize, Tile)> {
    match level {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => Some((8, 32, x86::tile_avx512)),
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => Some((6, 16, x86::tile_avx2)),
        _ => None,
    }
}

/// dst (m, n), its rows `ldc` apart, = a (m, k) · b (k, n), plus dst's values when `accumulate`;
/// a's element (i, p) at `a + i·a_rs + p·a_cs`, b's (p, j) at `b + p·ldb + j`.
#[derive(Clone, Copy)]
pub(crate) struct Product {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub dst: *mut f32,
    pub ldc: usize,
    pub a: *const f32,
    pub a_rs: isize,
    pub a_cs: isize,
    pub b: *const f32,
    pub ldb: usize,
    pub accumulate: bool,
}

/// One tile: a `Product` of at most MR rows and NR columns.
type Tile = unsafe fn(Product);

/// Computes `product` on this thread.
///
/// # Safety
/// `available()`; the matrices lie inside live allocations, and dst overlaps neither a nor b.
pub(crate) unsafe fn matmul(product: Product) {
    let tile = kernel(level()).expect("tiles::matmul on a CPU without AVX2");
    // SAFETY: as the caller's.
    unsafe { blocked(tile, product) }
}

/// `matmul` in tiles of `tile`.
///
/// # Safety
/// As `matmul`'s, the CPU running `tile`'s kernel.
unsafe fn blocked((mr, nr, tile): (usize, usize, Tile), p: Product) {
    if p.k == 0 && !p.accumulate {
        for i in 0..p.m {
            // SAFETY: row i of dst, as the caller vouches.
            unsafe { std::slice::from_raw_parts_mut(p.dst.add(i * p.ldc), p.n).fill(0.0) };
        }
    }
    for p0 in (0..p.k).step_by(KC) {
        for i0 in (0..p.m).step_by(MC) {
            let i1 = (i0 + MC).min(p.m);
            for j in (0..p.n).step_by(nr) {
                for i in (i0..i1).step_by(mr) {
                    // SAFETY: the tile lies inside the matrices the caller vouches for.
                    unsafe {
                        tile(Product {
                            m: mr.min(i1 - i),
                            n: nr.min(p.n - j),
                            k: KC.min(p.k - p0),
                            dst: p.dst.add(i * p.ldc + j),
                            a: p.a.offset(i as isize * p.a_rs + p0 as isize * p.a_cs),
                            b: p.b.add(p0 * p.ldb + j),
                            accumulate: p.accumulate || p0 > 0,
                            ..p
                        })
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Product;

    /// Calls `$kernel::<R>($args)` for R = `$rows`, one of the literals listed.
    macro_rules! by_rows {
        ($kernel:ident, $rows:expr, $($r:literal)+; $args:tt) => {
            match $rows {
                $($r => $kernel::<$r> $args,)+
                rows => unreachable!("a tile of {rows} rows"),
            }
        };
    }

    /// AVX-512: up to 8 rows × 32 columns (two vectors), the columns past n masked off.
    pub(super) unsafe fn tile_avx512(p: Product) {
        // SAFETY: as `matmul`'s; `level()` found AVX-512F.
        unsafe { by_rows!(avx512, p.m, 1 2 3 4 5 6 7 8; (p)) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<const R: usize>(p: Product) {
        let mask = |from: usize| -> __mmask16 {
            match p.n.saturating_sub(from) {
                n if n >= 16 => 0xffff,
                n => ((1u32 << n) - 1) as __mmask16,
            }
        };
        let (m0, m1) = (mask(0), mask(16));
        let mut c0 = [_mm512_setzero_ps(); R];
        let mut c1 = [_mm512_setzero_ps(); R];
        // SAFETY: masked-off lanes are neither read nor written (nor fault), so the pointers may
        // run past a matrix's last column; the rest lies inside the caller's matrices.
        unsafe {
            for k in 0..p.k {
                let b = p.b.wrapping_add(k * p.ldb);
                let (b0, b1) = (_mm512_maskz_loadu_ps(m0, b), _mm512_maskz_loadu_ps(m1, b.wrapping_add(16)));
                let a = p.a.wrapping_offset(k as isize * p.a_cs);
                for r in 0..R {
                    let x = _mm512_set1_ps(*a.wrapping_offset(r as isize * p.a_rs));
                    c0[r] = _mm512_fmadd_ps(x, b0, c0[r]);
                    c1[r] = _mm512_fmadd_ps(x, b1, c1[r]);
                }
            }
            for r in 0..R {
                let dst = p.dst.wrapping_add(r * p.ldc);
                if p.accumulate {
                    c0[r] = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, dst), c0[r]);
                    c1[r] = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, dst.wrapping_add(16)), c1[r]);
                }
                _mm512_mask_storeu_ps(dst, m0, c0[r]);
                _mm512_mask_storeu_ps(dst.wrapping_add(16), m1, c1[r]);
            }
        }
    }

    /// AVX2 with FMA: up to 6 rows × 16 columns (two vectors); a tile narrower than 16 columns
    /// goes through masked loads and stores (AMD's masked stores are slow: the edge only).
    pub(super) unsafe fn tile_avx2(p: Product) {
        // SAFETY: as `matmul`'s; `level()` found AVX2 and FMA.
        unsafe {
            match p.n == 16 {
                true => by_rows!(avx2_full, p.m, 1 2 3 4 5 6; (p)),
                false => by_rows!(avx2_part, p.m, 1 2 3 4 5 6; (p)),
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_full<const R: usize>(p: Product) {
        // SAFETY: as `avx2`'s.
        unsafe { avx2::<R, true>(p) }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_part<const R: usize>(p: Product) {
        // SAFETY: as `avx2`'s.
        unsafe { avx2::<R, false>(p) }
    }

    /// R rows × 16 columns: all of them (`FULL`: plain loads and stores) or the first n.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn avx2<const R: usize, const FULL: bool>(p: Product) {
        let mask = |from: usize| {
            let lanes: [i32; 8] = std::array::from_fn(|i| if from + i < p.n { -1 } else { 0 });
            // SAFETY: eight i32s.
            unsafe { _mm256_loadu_si256(lanes.as_ptr().cast()) }
        };
        let (m0, m1) = (mask(0), mask(8));
        let mut c0 = [_mm256_setzero_ps(); R];
        let mut c1 = [_mm256_setzero_ps(); R];
        // SAFETY: as in `avx512`, masked-off lanes are neither read nor written; the rest of the
        // tile lies inside the caller's matrices. (Plain branches on `FULL`, not closures, so
        // that every intrinsic is compiled for AVX2.)
        unsafe {
            for k in 0..p.k {
                let b = p.b.wrapping_add(k * p.ldb);
                let (b0, b1) = match FULL {
                    true => (_mm256_loadu_ps(b), _mm256_loadu_ps(b.add(8))),
                    false => (_mm256_maskload_ps(b, m0), _mm256_maskload_ps(b.wrapping_add(8), m1)),
                };
                let a = p.a.wrapping_offset(k as isize * p.a_cs);
                for r in 0..R {
                    let x = _mm256_broadcast_ss(&*a.wrapping_offset(r as isize * p.a_rs));
                    c0[r] = _mm256_fmadd_ps(x, b0, c0[r]);
                    c1[r] = _mm256_fmadd_ps(x, b1, c1[r]);
                }
            }
            for r in 0..R {
                let dst = p.dst.wrapping_add(r * p.ldc);
                let (d0, d1) = (dst, dst.wrapping_add(8));
                if p.accumulate {
                    let (x0, x1) = match FULL {
                        true => (_mm256_loadu_ps(d0), _mm256_loadu_ps(d1)),
                        false => (_mm256_maskload_ps(d0, m0), _mm256_maskload_ps(d1, m1)),
                    };
                    (c0[r], c1[r]) = (_mm256_add_ps(x0, c0[r]), _mm256_add_ps(x1, c1[r]));
                }
                match FULL {
                    true => (_mm256_storeu_ps(d0, c0[r]), _mm256_storeu_ps(d1, c1[r])),
                    false => (_mm256_maskstore_ps(d0, m0, c0[r]), _mm256_maskstore_ps(d1, m1, c1[r])),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// dst (+)= a · b, each element's products summed in order with fused multiply-adds.
    #[allow(clippy::too_many_arguments)]
    fn reference(m: usize, n: usize, k: usize, dst: &mut [f32], a: &[f32], a_t: bool, b: &[f32], accumulate: bool) {
        for i in 0..m {
            for j in 0..n {
                let mut sum = 0f32;
                for p in 0..k {
                    let x = if a_t { a[p * m + i] } else { a[i * k + p] };
                    sum = x.mul_add(b[p * n + j], sum);
                }
                dst[i * n + j] = if accumulate { dst[i * n + j] + sum } else { sum };
            }
        }
    }

    /// The levels this CPU runs: each kernel is tested where it can run (an AVX-512 CPU
    /// runs both).
    fn levels() -> Vec<(usize, usize, Tile)> {
        let mut levels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx512f") {
                levels.extend(kernel(Level::Avx512));
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                levels.extend(kernel(Level::Avx2));
            }
        }
        levels
    }

    #[test]
    fn tiles_match_ordered_fused_sums_at_every_edge() {
        let mut seed = 1u32;
        let mut next = move || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1 << 24) as f32 - 0.5
        };
        // Rows and columns off every tile edge; k within one pass (same bits as the reference)
        // and over several (the passes' partial sums added: close, not the same bits).
        let shapes = [(1, 1, 1), (7, 33, 5), (13, 65, 128), (9, 17, 300), (100, 40, 600), (6, 16, 0), (200, 48, 64)];
        for (tile, (m, n, k)) in levels().into_iter().flat_map(|tile| shapes.map(|shape| (tile, shape))) {
            for a_t in [false, true] {
                for accumulate in [false, true] {
                    let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
                    let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
                    let start: Vec<f32> = (0..m * n).map(|_| next()).collect();
                    let (mut want, mut got) = (start.clone(), start.clone());
                    reference(m, n, k, &mut want, &a, a_t, &b, accumulate);
                    let (a_rs, a_cs) = if a_t { (1, m as isize) } else { (k as isize, 1) };
                    let (dst, a, b, ldc, ldb) = (got.as_mut_ptr(), a.as_ptr(), b.as_ptr(), n, n);
                    // SAFETY: the matrices are the vectors above, of these sizes.
                    unsafe { blocked(tile, Product { m, n, k, dst, ldc, a, a_rs, a_cs, b, ldb, accumulate }) };
                    for (w, g) in want.iter().zip(&got) {
                        match k <= KC {
                            true => assert_eq!(
                                w.to_bits(),
                                g.to_bits(),
                                "{m}x{n}x{k} MR {} a_t {a_t} acc {accumulate}",
                                tile.0
                            ),
                            false => assert!((w - g).abs() <= 1e-5 * (k as f32), "{m}x{n}x{k}: {w} vs {g}"),
                        }
                    }
                }
            }
        }
    }
}
