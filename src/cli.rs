//! The command line, parsed raw by clap; `lib.rs` turns it into work.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "nanoflow", version, about = "make for GPT training: content-keyed, cached pipeline stages")]
pub struct Cli {
    /// The pipeline file [default: pipeline.yaml here or in the nearest parent directory]
    #[arg(short = 'f', long = "file", global = true, value_name = "FILE")]
    pub file: Option<PathBuf>,

    /// Print only errors and failures
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// Also print keys and why each stage runs
    #[arg(short, long, global = true)]
    pub verbose: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build targets or stages, and everything upstream of them, running only what is stale
    Run {
        /// Targets or stages (a target wins over a stage of the same name)
        #[arg(value_name = "NAME")]
        names: Vec<String>,
        /// Print what would run and why, and run nothing
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Run up to N independent stages at once [default: 1; under Slurm, all]
        #[arg(short = 'j', long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        jobs: Option<u16>,
        /// Override a param for this run (it enters the key): `--set train.max_iters=100`
        #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
        set: Vec<String>,
        /// Run STAGE even if its output is stored
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
        /// Where stages run: `local` (child processes) or `slurm` (a job per stage, on a shared
        /// store) [default: pipeline.yaml's `executor:`, else local]
        #[arg(long, value_name = "EXECUTOR", value_parser = ["local", "slurm"])]
        executor: Option<String>,
    },
    /// Say for each stage whether its output is fresh, and if not, why
    Status {
        #[arg(value_name = "NAME")]
        names: Vec<String>,
        /// Judge as if this param were set: `--set train.max_iters=100`
        #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
        set: Vec<String>,
    },
    /// Draw the stage graph
    Dag {
        #[arg(value_name = "NAME")]
        names: Vec<String>,
        /// Graphviz instead of text
        #[arg(long)]
        dot: bool,
    },
    /// List targets and stages
    Ls,
    /// Print a stage's current output directory and its manifest
    Show {
        #[arg(value_name = "STAGE")]
        stage: String,
    },
    /// Remove store entries that no stage's `current` points to
    Gc {
        /// Print what would be removed, and remove nothing
        #[arg(short = 'n', long)]
        dry_run: bool,
        /// Also remove interrupted runs' partial outputs (a train stage resumes from these)
        #[arg(long)]
        partial: bool,
        /// Also remove the other runs of train, finetune and eval stages (kept by default: they
        /// are what `nanoflow metrics` compares)
        #[arg(long)]
        all_runs: bool,
    },
    /// Re-hash current outputs against their manifests and report damage
    Verify {
        #[arg(value_name = "NAME")]
        names: Vec<String>,
    },
    /// Write a report card of what NAME made (and everything upstream): markdown with PNG plots
    /// and one self-contained HTML page; prints the page's path
    Report {
        #[arg(value_name = "NAME", required = true)]
        names: Vec<String>,
        /// The folder to write into [default: reports/NAME]
        #[arg(short, long, value_name = "DIR")]
        output: Option<PathBuf>,
    },
    /// Compare every stored output of a stage: the params that differ and the final metrics,
    /// one row per key, and their loss curves in one plot
    Metrics {
        #[arg(value_name = "STAGE")]
        stage: String,
        /// Print CSV
        #[arg(long, conflicts_with = "json")]
        csv: bool,
        /// Print JSON (an array of rows)
        #[arg(long)]
        json: bool,
        /// Every column, however wide (by default as many as fit `COLUMNS` or the terminal)
        #[arg(long, conflicts_with_all = ["csv", "json"])]
        wide: bool,
        /// Where to draw the loss curves [default: reports/STAGE-runs.png]
        #[arg(long, value_name = "PNG")]
        plot: Option<PathBuf>,
    },
    /// Continue a prompt with a model, printing as it generates (nanoGPT's sample.py)
    Sample {
        /// A train/finetune/export stage of the pipeline (its current output), a model folder,
        /// or a Hub GPT-2: gpt2, gpt2-medium, gpt2-large, gpt2-xl
        #[arg(value_name = "STAGE_OR_MODEL")]
        model: String,
        /// The prompt, or `FILE:path` to read it from a file [default: a newline]
        #[arg(value_name = "PROMPT")]
        start: Option<String>,
        /// Samples to draw
        #[arg(long, default_value_t = 10, value_name = "N")]
        num_samples: usize,
        /// Tokens generated per sample
        #[arg(long, default_value_t = 500, value_name = "N")]
        max_new_tokens: usize,
        /// 1.0 keeps the model's distribution, lower is more conservative, 0 greedy
        #[arg(long, default_value_t = 0.8, value_name = "T")]
        temperature: f64,
        /// Keep only the K most likely tokens at each step; 0 keeps all
        #[arg(long, default_value_t = 200, value_name = "K")]
        top_k: usize,
        /// The same seed gives the same text
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        /// auto, cpu, cuda or cuda:N
        #[arg(long, default_value = "auto")]
        device: String,
        /// Recompute the whole context for every token, as sample.py does (same text, slower)
        #[arg(long)]
        no_kv_cache: bool,
    },
    /// Time training steps of a model shape on random tokens (nanoGPT's bench.py): ms/iter,
    /// tokens/s, MFU (against a GPU's bfloat16 peak, or the CPU's measured f32 GEMM peak) and
    /// peak memory
    Bench {
        /// auto (gpt2 on a GPU, shakespeare-char-cpu on a CPU), gpt2 (train_gpt2's 124M, T=1024,
        /// batch 12), gpt2-medium, gpt2-large, gpt2-xl, shakespeare-char (the GPU recipe on a GPU,
        /// the laptop recipe on a CPU), shakespeare-char-gpu (6 layers, 384 wide, T=256, batch 64)
        /// or shakespeare-char-cpu (4 layers, 128 wide, T=64, batch 12)
        #[arg(value_name = "SHAPE", default_value = "auto")]
        shape: String,
        /// Sequences per iteration [default: the shape's]
        #[arg(long, value_name = "N")]
        batch_size: Option<usize>,
        /// Context length [default: the shape's]
        #[arg(long, value_name = "T")]
        block_size: Option<usize>,
        /// auto, cpu, cuda or cuda:N
        #[arg(long, default_value = "auto")]
        device: String,
        /// auto (bfloat16 on a GPU, float32 on the CPU), bfloat16, float16 or float32
        #[arg(long, default_value = "auto")]
        dtype: String,
        /// Untimed iterations first
        #[arg(long, default_value_t = 10, value_name = "N")]
        burn_in: usize,
        /// Timed iterations
        #[arg(long, default_value_t = 20, value_name = "N")]
        iters: usize,
        /// Print the measurement as JSON
        #[arg(long)]
        json: bool,
    },
    /// Run one stage in this process (the engine's child; not for people)
    #[command(name = "__stage", hide = true)]
    Stage {
        /// Read the spec from this file rather than stdin (each task of a Slurm job)
        #[arg(long, value_name = "FILE")]
        spec: Option<std::path::PathBuf>,
    },
    /// Run one rank of a data-parallel train stage (the stage's child; not for people)
    #[command(name = "__rank", hide = true)]
    Rank,
}
