//! The peak FLOPS that MFU is a fraction of: a GPU's dense bfloat16 peak from `device`'s table
//! (nanoGPT's A100 where the table does not know the GPU), and a CPU's own float32 peak,
//! measured here. It does not measure the model: `bench` and `train` do.
//!
//! Why a CPU's peak is measured rather than worked out from its specification (cores × clock ×
//! FMA units × vector lanes × 2): neither factor can be read reliably. `/proc/cpuinfo`'s
//! `cpu MHz` is the base clock, a turbo clock of the moment or, in a VM, whatever the host
//! passes through; and its flags say which instructions a core decodes, not how wide it runs
//! them: `avx512f` on AMD's Zen 4 runs a 512-bit FMA as two 256-bit halves, so lanes × FMA units
//! from the flags is twice what the core can do. A
//! float32 matrix product on `gemm`'s kernels, split between the threads of rayon's pool as the
//! CPU step splits its own (`step/matmul.rs`: one single-threaded `gemm` per block of rows), is what
//! the step's matmuls can reach on this machine as it is set up: MFU against it says how much of
//! the reachable matmul throughput the whole step achieves (the gap being the work around the
//! matmuls), and it stays at or under 100%.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use candle_core::Device;
use gemm::Parallelism;
use rayon::prelude::*;

use crate::gpt::device;

/// A peak and where it comes from, for the report: `this CPU's measured f32 GEMM peak, 2
/// threads`.
#[derive(Debug, Clone, PartialEq)]
pub struct Peak {
    pub flops: f64,
    pub source: String,
}

/// The peak MFU on `device` is against: a GPU's bfloat16 peak by its name (`device::name`),
/// nanoGPT's A100 for a GPU the table does not know, the CPU's measured float32 peak (`cpu`).
pub fn of(device: &Device) -> Peak {
    match device.is_cpu() {
        true => cpu(),
        false => gpu(&device::name(device)),
    }
}

/// A GPU's dense bfloat16 peak by name, or nanoGPT's A100 figure where the table lacks it.
pub fn gpu(name: &str) -> Peak {
    match device::peak_bf16_flops(name) {
        Some(flops) => Peak { flops, source: format!("{name}'s bfloat16 peak") },
        None => Peak {
            flops: device::A100_BF16_FLOPS,
            source: format!("an A100's bfloat16 peak, as nanoGPT: `{name}` is not in nanoflow's table"),
        },
    }
}

/// This CPU's float32 GEMM peak on rayon's pool (the CPU step's threads), measured once per
/// process in about `BUDGET` and kept.
pub fn cpu() -> Peak {
    static PEAK: OnceLock<Peak> = OnceLock::new();
    PEAK.get_or_init(|| {
        let threads = rayon::current_num_threads();
        let flops = measure_gemm(threads, BUDGET);
        let plural = if threads == 1 { "" } else { "s" };
        Peak { flops, source: format!("this CPU's measured f32 GEMM peak, {threads} thread{plural}") }
    })
    .clone()
}

/// How long the CPU's peak is measured for: enough rounds for the best to be a steady one, short
/// enough to go unnoticed before a benchmark.
const BUDGET: Duration = Duration::from_millis(300);

/// Rows of the product per thread, and its inner and outer widths: (256, 512) · (512, 512) per
/// thread, 134 MFLOP, a few milliseconds on a core; the three matrices (2.5 MiB per thread) stay
/// in the caches, so the kernels, not memory, set the pace, as in the step's products of weights.
const ROWS: usize = 256;
const K: usize = 512;
const N: usize = 512;

/// FLOPS of the best of repeated rounds of a float32 product (each thread's rows one `gemm`
/// call), measured for about `budget` after one untimed product.
fn measure_gemm(threads: usize, budget: Duration) -> f64 {
    let threads = threads.max(1);
    let value = |i: usize| ((i % 13) as f32 - 6.0) / 16.0;
    let a: Vec<f32> = (0..threads * ROWS * K).map(value).collect(); // (threads · ROWS, K)
    let b: Vec<f32> = (0..K * N).map(value).collect(); // (K, N)
    let mut c = vec![0f32; threads * ROWS * N]; // (threads · ROWS, N)
    let mut product = || {
        c.par_chunks_mut(ROWS * N).zip(a.par_chunks(ROWS * K)).for_each(|(c, a)| {
            // SAFETY: c is (ROWS, N), a (ROWS, K) and b (K, N), all row-major in live vectors;
            // c overlaps neither.
            unsafe {
                gemm::gemm(
                    ROWS,
                    N,
                    K,
                    c.as_mut_ptr(),
                    1,
                    N as isize,
                    false,
                    a.as_ptr(),
                    1,
                    K as isize,
                    b.as_ptr(),
                    1,
                    N as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            }
        });
    };
    product();
    let flops_per_product = 2.0 * (threads * ROWS * K * N) as f64;
    let started = Instant::now();
    let mut best = 0f64;
    // Rounds of 4 products: a round is 10-20 ms, long enough to time, short enough that a
    // round the machine's other work slowed is one of many.
    while started.elapsed() < budget || best == 0.0 {
        let round = Instant::now();
        for _ in 0..4 {
            product();
        }
        best = best.max(4.0 * flops_per_product / round.elapsed().as_secs_f64().max(1e-9));
    }
    std::hint::black_box(&c);
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_peak_is_measured_once_and_reads_sensibly() {
        let peak = cpu();
        assert!(peak.flops.is_finite() && peak.flops > 0.0, "{peak:?}");
        // Above 100 MFLOPS (a single core of any CPU nanoflow builds for does over 10 GFLOPS,
        // even with the test suite beside it) and under a bound no CPU reaches: every thread an
        // AVX-512 core at 6 GHz with two FMA units (16 lanes × 2 flops × 2 units per cycle).
        let threads = rayon::current_num_threads() as f64;
        assert!(peak.flops > 1e8 && peak.flops < threads * 6e9 * 64.0, "{peak:?}");
        assert!(peak.source.starts_with("this CPU's measured f32 GEMM peak, "), "{peak:?}");
        assert_eq!(of(&Device::Cpu), peak, "measured once per process");
    }

    #[test]
    fn a_shorter_measurement_is_a_number_too() {
        let flops = measure_gemm(1, Duration::ZERO);
        assert!(flops.is_finite() && flops > 0.0, "{flops}");
    }

    #[test]
    fn gpus_by_name() {
        let h100 = gpu("NVIDIA H100 80GB HBM3");
        assert_eq!(h100.flops, 989e12);
        assert_eq!(h100.source, "NVIDIA H100 80GB HBM3's bfloat16 peak");
        let unknown = gpu("NVIDIA T4");
        assert_eq!(unknown.flops, 312e12);
        assert!(unknown.source.starts_with("an A100's bfloat16 peak"), "{unknown:?}");
    }
}
