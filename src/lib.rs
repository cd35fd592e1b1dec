//! nanoflow's engine: pipeline.yaml -> validated DAG -> content keys -> store -> child processes.
//! It knows nothing of tensors or tokenizers; the stage kinds live in the `nanoflow-stages`
//! crate. The control flow of every command is visible here, in one place.

mod atomic;
mod cache_key;
mod cli;
mod commands;
mod error;
mod executor;
mod freshness;
mod host;
mod lease;
mod manifest;
mod metrics;
mod pipeline;
mod plan;
mod preflight;
mod printer;
mod reference;
mod report;
mod slurm;
mod source_map;
mod stage_kind;
mod stage_process;
mod stat_cache;
mod store;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::error::Error;
use crate::printer::{Printer, Style, Verbosity};

pub fn main() -> ExitCode {
    nanoflow_stages::gpt::one_cpu_pool();
    let cli = Cli::parse();
    match cli.command {
        Command::Stage { spec } => return stage_process::main(spec),
        Command::Rank => return stage_process::rank_main(),
        _ => {}
    }
    let verbosity = match (cli.quiet, cli.verbose) {
        (true, _) => Verbosity::Quiet,
        (_, true) => Verbosity::Verbose,
        _ => Verbosity::Normal,
    };
    let printer = Printer::new(verbosity);
    match run(cli, &printer) {
        Ok(code) => code,
        Err(error) => {
            render(&printer, &error);
            ExitCode::from(error.exit_code())
        }
    }
}

fn run(cli: Cli, printer: &Printer) -> Result<ExitCode, Error> {
    let file = cli.file.as_deref();
    match cli.command {
        Command::Run { names, dry_run, jobs, set, force, executor } => {
            let flags = commands::RunFlags {
                dry_run,
                jobs: jobs.map(usize::from),
                sets: set,
                force,
                executor: executor.as_deref().and_then(slurm::ExecutorKind::parse),
            };
            commands::run(printer, file, &names, flags)
        }
        Command::Status { names, set } => commands::status(printer, file, &names, &set),
        Command::Dag { names, dot } => commands::dag(printer, file, &names, dot),
        Command::Ls => commands::ls(printer, file),
        Command::Show { stage } => commands::show(printer, file, &stage),
        Command::Gc { dry_run, partial, all_runs } => commands::gc(printer, file, dry_run, partial, all_runs),
        Command::Verify { names } => commands::verify(printer, file, &names),
        Command::Report { names, output } => commands::report(printer, file, &names, output.as_deref()),
        Command::Metrics { stage, csv, json, wide, plot } => {
            let format = match (csv, json, wide) {
                (true, _, _) => metrics::Format::Csv,
                (_, true, _) => metrics::Format::Json,
                (_, _, true) => metrics::Format::Wide,
                _ => metrics::Format::Table,
            };
            commands::metrics(printer, file, &stage, format, plot.as_deref())
        }
        Command::Sample {
            model,
            start,
            num_samples,
            max_new_tokens,
            temperature,
            top_k,
            seed,
            device,
            no_kv_cache,
        } => {
            let config = nanoflow_stages::sample::Config {
                model,
                start: start.unwrap_or_else(|| "\n".into()),
                num_samples,
                max_new_tokens,
                temperature,
                top_k,
                seed,
                device,
                kv_cache: !no_kv_cache,
            };
            commands::sample(file, config)
        }
        Command::Bench { shape, batch_size, block_size, device, dtype, burn_in, iters, json } => {
            commands::bench(printer, &shape, batch_size, block_size, device, dtype, burn_in, iters, json)
        }
        Command::Stage { .. } | Command::Rank => unreachable!("handled before the printer exists"),
    }
}

/// `error: ...`, then `caused by: ...` per source, then `hint: ...` (uv's shape).
fn render(printer: &Printer, error: &Error) {
    printer.error(&format!("{} {error}", printer.paint(Style::Red, "error:")));
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        printer.error(&format!("  {} {cause}", printer.paint(Style::Red, "caused by:")));
        source = cause.source();
    }
    if let Some(hint) = error.hint() {
        printer.error("");
        printer.error(&format!("{} {hint}", printer.paint(Style::Cyan, "hint:")));
    }
}
