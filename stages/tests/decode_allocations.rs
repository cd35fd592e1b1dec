//! A decode step on the CPU allocates nothing (issue 15): a global allocator counts every
//! allocation of the process, and `generate_with`'s callback reads the count after each step.
//! Its own test binary, so that no other test allocates beside it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use nanoflow_stages::gpt::{Gpt, GptConfig, Rng, Sampling};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is the system allocator's, counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn a_decode_step_allocates_nothing() -> anyhow::Result<()> {
    let small =
        GptConfig { block_size: 32, vocab_size: 65, n_layer: 2, n_head: 4, n_embd: 64, dropout: 0.0, bias: false };
    // 12 rows of ~12.7M parameters: a step big enough to be split between the threads.
    let wide =
        GptConfig { block_size: 32, vocab_size: 256, n_layer: 4, n_head: 8, n_embd: 512, dropout: 0.0, bias: true };
    // Once unmeasured first: a pool thread's first steal registers it with crossbeam's epoch
    // (an allocation, once per thread), whichever step it happens in.
    for (config, rows, measured) in [(wide.clone(), 12, false), (small, 3, true), (wide, 12, true)] {
        let model = Gpt::init(&config, &VarMap::new(), &Device::Cpu, 5)?;
        assert!(model.explicit());
        let prompt = Tensor::zeros((rows, 2), DType::U32, &Device::Cpu)?;
        let sampling = Sampling { max_new_tokens: 16, temperature: 0.8, top_k: Some(5), kv_cache: true };
        let mut rngs: Vec<Rng> = (0..rows as u64).map(|k| Rng::stream(1, k)).collect();
        let mut counts = Vec::with_capacity(sampling.max_new_tokens);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        model.generate_with(&prompt, &sampling, &mut rngs, &mut |_| {
            counts.push(ALLOCATIONS.load(Ordering::Relaxed));
            Ok(())
        })?;
        if !measured {
            continue;
        }
        // The prompt's step allocates the decoder's buffers (the count works), the next one
        // widens a buffer from the prompt's rows to one per sequence; the rest allocate nothing.
        assert!(counts[0] > before, "the first step allocated nothing: is the allocator counting?");
        let steps: Vec<usize> = counts.windows(2).map(|pair| pair[1] - pair[0]).collect();
        assert!(steps[2..].iter().all(|&n| n == 0), "{rows} rows, allocations per step: {steps:?}");
    }
    Ok(())
}
