//! With `--features cuda`: compiles gpt/ops/kernels.cu to PTX with nvcc (`$CUDA_ROOT/bin/nvcc`, else
//! the one on PATH) for `CUDA_COMPUTE_CAP` (default 80), which ops.rs embeds. Without the
//! feature there is nothing to build.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=gpt/ops/kernels.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("ops.ptx");
    let nvcc = std::env::var_os("CUDA_ROOT")
        .map(|root| PathBuf::from(root).join("bin/nvcc"))
        .filter(|nvcc| nvcc.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let status = Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "--use_fast_math",
            &format!("--gpu-architecture=compute_{cap}"),
            "gpt/ops/kernels.cu",
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap_or_else(|error| panic!("could not run `{}` to build gpt/ops/kernels.cu: {error}", nvcc.display()));
    assert!(status.success(), "`{}` failed on gpt/ops/kernels.cu ({status})", nvcc.display());
}
