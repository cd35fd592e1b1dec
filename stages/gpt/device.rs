//! Devices by name (`auto`, `cpu`, `cuda`, `cuda:N`), the dtype of the matmuls, and what the
//! benchmarks and the MFU estimate need to know about a GPU: its count, name, bfloat16 peak and
//! memory in use.

use anyhow::{Context as _, bail};
use candle_core::{DType, Device};

use crate::Invalid;

/// A `device` param: `auto`, `cpu`, `cuda` or `cuda:N`. Whether this build has CUDA, or this
/// machine a GPU, is known only where the stage runs.
pub fn check(name: &str) -> Result<(), Invalid> {
    let ordinal = name.strip_prefix("cuda:").map(|n| n.parse::<usize>().is_ok());
    match (name, ordinal) {
        ("auto" | "cpu" | "cuda", _) | (_, Some(true)) => Ok(()),
        _ => Err(Invalid::new("device", format!("is `{name}`; use auto, cpu, cuda or cuda:N"))),
    }
}

/// A `dtype` param: `auto`, `bfloat16`, `float16` or `float32`.
pub fn check_dtype(dtype: &str) -> Result<(), Invalid> {
    crate::ensure(matches!(dtype, "auto" | "bfloat16" | "float16" | "float32"), "dtype", || {
        format!("is `{dtype}`; use auto, bfloat16, float16 or float32")
    })
}

/// The device `name` picks for a rank: `auto` is CUDA when nanoflow is built with `--features
/// cuda` and a GPU is present, else the CPU. Ranks of a multi-GPU world take the GPU of their
/// local rank (`cuda`/`auto`), so `cuda:N` names a device only for a single process.
pub fn for_rank(name: &str, local_rank: usize, local_ranks: usize) -> anyhow::Result<Device> {
    if local_ranks > 1 && name.starts_with("cuda:") {
        bail!("`device: {name}` pins one GPU, but this stage runs {local_ranks} ranks here: use `device: cuda`");
    }
    let device = match name {
        // candle's `cuda_if_available` only asks whether CUDA was compiled in: try the GPU.
        "auto" => Device::new_cuda(local_rank).unwrap_or(Device::Cpu),
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(local_rank).with_context(|| {
            format!("`device: cuda`: no CUDA device {local_rank} (nanoflow needs `--features cuda`)")
        })?,
        other => match other.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
            Some(ordinal) => Device::new_cuda(ordinal).with_context(|| {
                format!("`device: {other}`: no such CUDA device (nanoflow needs `--features cuda`)")
            })?,
            None => bail!("unknown `device` `{other}`: use auto, cpu, cuda or cuda:N"),
        },
    };
    keep_freed_memory(&device)?;
    Ok(device)
}

/// Keeps freed memory for the next step instead of handing it back at every free: a training
/// or decoding step frees and allocates the same tensors each time.
///
/// On a GPU, in the device's pool (its default release threshold is 0): candle allocates every
/// tensor from cudarc's stream-ordered pool, so a step's allocations are the previous step's
/// memory reused. On the CPU, in glibc's heap: by default it returns the heap's top to the
/// kernel once 128 KiB are free there, and the next step faults the pages back in; a 1 GiB trim
/// threshold and 256 MiB of top padding took the CPU recipe's step from 112 to 95 ms (median,
/// 2 threads, `cargo bench -p nanoflow-stages --bench model -- train`). And glibc maps every
/// block over 32 MiB (its largest mmap threshold) on its own and unmaps it when freed: GPT-2's
/// 154 MB embedding gradient, its logits, its parameter copies came back as fresh pages at every
/// step, which the kernel zeroed (6% of a GPT-2 finetune step's samples, perf) and a VM faulted
/// in; with no mmaps they come from the heap that is kept (3-5% faster GPT-2 steps, in each of
/// three alternating rounds). `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_` or `MALLOC_MMAP_MAX_`
/// in the environment still win.
pub fn keep_freed_memory(device: &Device) -> anyhow::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if device.is_cpu() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let set = |name: &str| std::env::var_os(name).is_some();
            if !set("MALLOC_TRIM_THRESHOLD_") && !set("MALLOC_TOP_PAD_") && !set("MALLOC_MMAP_MAX_") {
                // SAFETY: mallopt sets allocator parameters under glibc's own lock.
                unsafe {
                    libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
                    libc::mallopt(libc::M_TOP_PAD, 256 << 20);
                    libc::mallopt(libc::M_MMAP_MAX, 0);
                }
            }
        });
    }
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        use cudarc::driver::sys;
        let stream = cuda.cuda_stream();
        let context = stream.context();
        context.bind_to_thread()?;
        let mut pool = std::ptr::null_mut();
        let mut threshold = u64::MAX;
        // SAFETY: plain driver calls on this context's device, with valid out-pointers.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()).result()?;
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
            .result()?;
        }
    }
    let _ = device;
    Ok(())
}

/// One thread pool for the CPU, and its size decided once. candle 0.11 runs elementwise ops on a
/// pool of its own beside rayon's (which runs the matmuls and nanoflow's kernels), and its idle
/// workers spin: on 2 cores a quarter of a training step's samples were that spinning (perf).
/// With `CANDLE_NUM_THREADS=1` its pool has no workers and those ops run on the calling thread.
/// And where `RAYON_NUM_THREADS` is unset, candle works out its thread count again for every
/// matmul, reading all of `/proc/cpuinfo` each time (6000 reads in 8 s of sampling, strace):
/// setting it once to that count (the physical cores, or the process's CPU mask) makes every
/// later call an environment lookup, and gives rayon's pool the same size.
/// Reads and sets the environment, so it must run before any thread starts (first in `main`);
/// a `CANDLE_NUM_THREADS` or `RAYON_NUM_THREADS` already set wins.
pub fn one_cpu_pool() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: called first in `main`, while the process has one thread.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads().to_string();
        // SAFETY: as above.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", threads) };
    }
}

/// Runs `f` on a thread of rayon's pool (directly where it is on one already). Each parallel
/// loop started from outside the pool hands its work to the pool and puts the caller to sleep
/// until it is done: two thread wake-ups per loop, some 40 µs on a 2-core VM, which a CPU step's
/// hundreds of short loops (the explicit step's kernels, AdamW's per-tensor updates) paid in
/// full. From a pool thread, a loop runs on the caller and the other threads join in.
pub(crate) fn on_cpu_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// The device `name` picks for one process.
pub fn by_name(name: &str) -> anyhow::Result<Device> {
    for_rank(name, 0, 1)
}

/// GPUs on this machine: what `gpus: auto` fans out to (1 without CUDA, so a CPU run stays one
/// process).
pub fn gpu_count() -> usize {
    #[cfg(feature = "cuda")]
    if let Ok(count) = cudarc::driver::CudaContext::device_count() {
        return (count as usize).max(1);
    }
    1
}

/// The dtype of the matmuls for `dtype` (a stage's key) on `device`: `auto` is bfloat16 on a GPU
/// (nanoGPT's choice where the GPU has it; nanoflow's CUDA build targets compute capability 8.0
/// and up, which all do) and float32 on the CPU. Weights, optimizer moments, LayerNorm, softmax
/// and the loss stay float32 whatever it is.
pub fn matmul_dtype(dtype: &str, device: &Device) -> anyhow::Result<DType> {
    Ok(match dtype {
        "auto" if device.is_cuda() => DType::BF16,
        "auto" | "float32" => DType::F32,
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        other => bail!("unknown `dtype` `{other}`: use auto, bfloat16, float16 or float32"),
    })
}

/// What a GPU is called, for reports: `NVIDIA H100 80GB HBM3`, or `cpu`.
pub fn name(device: &Device) -> String {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device
        && let Ok(name) = cuda.cuda_stream().context().name()
    {
        return name;
    }
    match device {
        Device::Cpu => "cpu".into(),
        other => format!("{other:?}"),
    }
}

/// Dense bfloat16 peak FLOPS of a GPU by name, the denominator of MFU. `None` for a GPU this
/// table does not know (reports then use nanoGPT's A100 figure) and for the CPU, whose peak
/// `peak::cpu` measures.
pub fn peak_bf16_flops(name: &str) -> Option<f64> {
    let name = name.to_ascii_uppercase();
    let table: &[(&str, f64)] = &[
        ("H200", 989e12),
        ("H100 PCIE", 756e12),
        ("H100", 989e12),
        ("GH200", 989e12),
        ("B200", 2250e12),
        ("A100", 312e12),
        ("A10G", 70e12),
        ("L40S", 362e12),
        ("L4", 121e12),
        ("RTX 4090", 165e12),
        ("RTX 3090", 71e12),
    ];
    table.iter().find(|(key, _)| name.contains(key)).map(|&(_, flops)| flops)
}

/// nanoGPT's MFU denominator: an A100's bfloat16 peak.
pub const A100_BF16_FLOPS: f64 = 312e12;

/// Bytes of device memory in use: on a GPU the driver's total minus free (all processes'), on
/// the CPU this process's resident set.
pub fn memory_in_use(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let (free, total) = cuda.cuda_stream().context().mem_get_info().ok()?;
        return Some((total - free) as u64);
    }
    match device {
        Device::Cpu => proc_status_kib("VmRSS:").map(|kib| kib * 1024),
        _ => None,
    }
}

/// The CPU process's peak resident set (`VmHWM`), bytes.
pub fn cpu_peak_memory() -> Option<u64> {
    proc_status_kib("VmHWM:").map(|kib| kib * 1024)
}

fn proc_status_kib(field: &str) -> Option<u64> {
    let status = fs_err::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_dtypes() {
        assert!(by_name("cpu").unwrap().is_cpu());
        assert!(by_name("tpu").unwrap_err().to_string().contains("use auto, cpu, cuda or cuda:N"));
        let error = for_rank("cuda:1", 0, 2).unwrap_err().to_string();
        assert!(error.contains("use `device: cuda`"), "{error}");
        assert_eq!(matmul_dtype("auto", &Device::Cpu).unwrap(), DType::F32);
        assert_eq!(matmul_dtype("bfloat16", &Device::Cpu).unwrap(), DType::BF16);
        assert!(matmul_dtype("fp8", &Device::Cpu).unwrap_err().to_string().contains("unknown `dtype` `fp8`"));
    }

    #[test]
    fn gpu_peaks_by_name() {
        assert_eq!(peak_bf16_flops("NVIDIA H100 80GB HBM3"), Some(989e12));
        assert_eq!(peak_bf16_flops("NVIDIA H100 PCIe"), Some(756e12));
        assert_eq!(peak_bf16_flops("NVIDIA A100-SXM4-40GB"), Some(312e12));
        assert_eq!(peak_bf16_flops("cpu"), None);
    }

    #[test]
    fn cpu_memory_is_read() {
        assert!(memory_in_use(&Device::Cpu).unwrap() > 0);
        assert!(cpu_peak_memory().unwrap() >= memory_in_use(&Device::Cpu).unwrap() / 2);
    }
}
