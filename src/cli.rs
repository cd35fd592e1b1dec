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
        /// Run up to N independent stages at once
        #[arg(short = 'j', long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        jobs: u16,
        /// Override a param for this run (it enters the key): `--set train.max_iters=100`
        #[arg(long = "set", value_name = "STAGE.KEY=VALUE")]
        set: Vec<String>,
        /// Run STAGE even if its output is stored
        #[arg(long, value_name = "STAGE")]
        force: Vec<String>,
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
    },
    /// Re-hash current outputs against their manifests and report damage
    Verify {
        #[arg(value_name = "NAME")]
        names: Vec<String>,
    },
    /// Run one stage in this process (the engine's child; not for people)
    #[command(name = "__stage", hide = true)]
    Stage,
}
