//! `nanoflow bench` on a CPU (issue 29): the laptop recipe's shape by default, one line for the
//! burn-in rather than one per iteration, and MFU against the CPU's own measured peak rather
//! than an A100's 312 TFLOPS.

use crate::Test;

/// A tiny override of the CPU shape: a benchmark of a fraction of a second.
const TINY: [&str; 6] = ["--device", "cpu", "--batch-size", "1", "--block-size", "8"];

#[test]
fn bench_on_a_cpu_defaults_to_the_laptop_shape_and_its_own_peak() {
    let test = Test::new();
    let output = test.expect(&[&["bench"][..], &TINY, &["--burn-in", "30", "--iters", "3"]].concat(), 0);
    let lines: Vec<&str> = output.stderr.lines().collect();
    assert_eq!(
        lines[0],
        "shakespeare-char-cpu: 4 layers, 4 heads, 128 wide, block 8, vocab 65, batch 1 (0.80M parameters): the laptop \
         recipe's shape (configs/train_shakespeare_char_cpu.yaml), the default on a CPU (`nanoflow bench gpt2` for \
         GPT-2's)"
    );
    assert_eq!(lines[1], "30 untimed burn-in iterations, then 3 timed");
    // No line per iteration: where no bar is drawn, a line every few seconds at most.
    assert!(lines.len() <= 4, "{}", output.stderr);
    assert!(!output.stderr.contains("warning:"), "a benchmark of a second is not long: {}", output.stderr);

    // `MFU: 7.16% of 83 GFLOPS (this CPU's measured f32 GEMM peak, 2 threads)`
    let stdout = output.stdout.trim_end();
    assert!(stdout.starts_with("time per iteration: ") && !stdout.contains('\n'), "{stdout}");
    let (_, mfu) = stdout.split_once("MFU: ").unwrap();
    let (percent, peak) = mfu.split_once("% of ").unwrap();
    let percent: f64 = percent.parse().unwrap();
    assert!(percent > 0.0 && percent <= 100.0, "{stdout}");
    let (flops, source) = peak.split_once(" GFLOPS (").unwrap();
    assert!(flops.parse::<f64>().unwrap() > 0.0, "{stdout}");
    assert!(source.starts_with("this CPU's measured f32 GEMM peak, "), "{stdout}");
    assert!(source.contains(" thread") && source.contains("), peak memory "), "{stdout}");
    assert!(!stdout.contains("TFLOPS"), "not an A100's peak: {stdout}");
}

#[test]
fn bench_shakespeare_char_on_a_cpu_is_the_laptop_recipe() {
    let test = Test::new();
    let output = test.expect(
        &[&["bench", "shakespeare-char"][..], &TINY, &["--burn-in", "1", "--iters", "2", "--json"]].concat(),
        0,
    );
    assert!(
        output.stderr.starts_with(
            "shakespeare-char-cpu: 4 layers, 4 heads, 128 wide, block 8, vocab 65, batch 1 (0.80M parameters): the \
             laptop recipe's shape (configs/train_shakespeare_char_cpu.yaml), shakespeare-char's on a CPU \
             (shakespeare-char-gpu for the GPU recipe's)\n1 untimed burn-in iteration, then 2 timed\n"
        ),
        "{}",
        output.stderr
    );
    let measured: serde_json::Value = serde_json::from_str(&output.stdout).unwrap();
    assert_eq!(measured["tokens_per_iter"], 8);
    assert_eq!(measured["device"], "cpu");
    for key in ["ms_per_iter", "tokens_per_second", "mfu", "peak_flops", "peak_memory_bytes"] {
        assert!(measured[key].as_f64().unwrap() > 0.0, "{key}: {measured}");
    }
    assert!(measured["mfu"].as_f64().unwrap() <= 1.0, "{measured}");
    assert!(measured["peak_flops"].as_f64().unwrap() < 1e12, "a CPU's peak, not an A100's: {measured}");
    let source = measured["peak_flops_source"].as_str().unwrap();
    assert!(source.starts_with("this CPU's measured f32 GEMM peak, "), "{measured}");

    // The GPU recipe by its own name, on the CPU all the same.
    let gpu =
        test.expect(&[&["bench", "shakespeare-char-gpu"][..], &TINY, &["--burn-in", "0", "--iters", "1"]].concat(), 0);
    assert!(
        gpu.stderr.starts_with("shakespeare-char-gpu: 6 layers, 6 heads, 384 wide, block 8, vocab 65, batch 1 (10.65M parameters)\nno burn-in, then 1 timed\n"),
        "{}",
        gpu.stderr
    );
}

#[test]
fn bench_rejects_what_it_cannot_run() {
    let test = Test::new();
    let bad = test.expect(&["bench", "--dtype", "fp8", "--device", "cpu", "--iters", "1"], 1);
    assert!(bad.stderr.contains("unknown `dtype` `fp8`"), "{}", bad.stderr);
    let shape = test.expect(&["bench", "llama", "--device", "cpu"], 1);
    assert!(shape.stderr.contains("unknown shape `llama`"), "{}", shape.stderr);
}
