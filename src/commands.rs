//! One function per subcommand. Each loads and validates the pipeline first (so a bad
//! pipeline exits 2 before anything happens), then does its one job.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use crate::error::Error;
use crate::executor::{self, Executor, Options};
use crate::freshness::{self, Freshness};
use crate::manifest::{Manifest, OUT};
use crate::pipeline::{self, PipelineFile};
use crate::plan::Plan;
use crate::printer::{Printer, Style, show_path};
use crate::slurm::ExecutorKind;
use crate::stat_cache::StatCache;
use crate::store::{self, Store};
use nanoflow_stages::progress::format_bytes;

/// Exit code of a run stopped by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it).
const INTERRUPTED: u8 = 130;

fn load(file: Option<&Path>, sets: &[String]) -> Result<(Plan, Store), Error> {
    let cwd = std::env::current_dir().map_err(|source| Error::Read { path: ".".into(), source })?;
    let path = show_path(&pipeline::find(file, &cwd)?);
    let plan = Plan::build(PipelineFile::load(&path)?, sets)?;
    let store = Store::new(&plan.root);
    Ok((plan, store))
}

fn store_error(store: &Store) -> impl Fn(std::io::Error) -> Error + '_ {
    |source| Error::Store { path: store.root.clone(), source }
}

/// What `nanoflow run` was asked beside the names.
#[derive(Debug, Default)]
pub struct RunFlags {
    pub dry_run: bool,
    /// `-j`: independent stages at once; by default 1 here, all of them under Slurm.
    pub jobs: Option<usize>,
    pub sets: Vec<String>,
    pub force: Vec<String>,
    /// `--executor`, over pipeline.yaml's `executor:`.
    pub executor: Option<ExecutorKind>,
}

pub fn run(printer: &Printer, file: Option<&Path>, names: &[String], flags: RunFlags) -> Result<ExitCode, Error> {
    let RunFlags { dry_run, jobs, sets, force, executor } = flags;
    let (sets, force) = (sets.as_slice(), force.as_slice());
    let (plan, store) = load(file, sets)?;
    if names.is_empty() {
        return Err(Error::NothingToRun { targets: plan.targets.iter().map(|target| target.name.clone()).collect() });
    }
    let selected = plan.select(names)?;
    for stage in force {
        if !selected.iter().any(|&index| &plan.stages[index].name == stage) {
            return Err(Error::ForceOutsideRun { stage: stage.clone() });
        }
    }
    if dry_run {
        let assessed = assess_all(&plan, &store, &selected)?;
        for (index, freshness) in &assessed {
            let name = &plan.stages[*index].name;
            let (state, why) = match freshness {
                _ if force.contains(name) => ("run", "forced".to_string()),
                Freshness::Fresh { .. } => ("cached", String::new()),
                Freshness::Restorable { reasons, .. } => ("restore", reasons.join("; ")),
                Freshness::Stale { reasons, .. } => ("run", reasons.join("; ")),
                // Never run: it runs once its inputs exist; no earlier output can make it cached.
                Freshness::Waiting { upstream } if store.current(name).is_none() => {
                    ("run", format!("never run (after `{}`)", upstream.join("`, `")))
                }
                Freshness::Waiting { upstream } => {
                    ("run?", format!("after `{}` (skipped if its output comes out the same)", upstream.join("`, `")))
                }
            };
            printer.data(&row(&plan, name, state, &why));
            for line in crate::preflight::lines(&plan, &store, *index) {
                printer.data(&line);
            }
        }
        // Refused as a bad param is: exit 2, after the plan that shows why.
        crate::preflight::refuse_what_does_not_fit(&plan, &selected, force)?;
        printer.status("dry run: nothing was run");
        return Ok(ExitCode::SUCCESS);
    }
    crate::preflight::refuse_what_does_not_fit(&plan, &selected, force)?;

    let executor = executor.unwrap_or(plan.executor);
    if executor == ExecutorKind::Slurm {
        crate::slurm::Slurm::check_installed()
            .map_err(|message| Error::InvalidArgument { option: "--executor slurm".to_string(), message })?;
    }
    let jobs = jobs.unwrap_or(match executor {
        ExecutorKind::Local => 1,
        // The cluster's scheduler decides what runs when.
        ExecutorKind::Slurm => selected.len(),
    });
    executor::install_signal_handler();
    let clock = Instant::now();
    let options = Options { jobs, force: force.iter().cloned().collect(), executor };
    let summary = Executor::new(&plan, &store, printer, options).run(&selected)?;
    let seconds = clock.elapsed().as_secs_f64();
    crate::preflight::calibrate(&plan, &store, &summary.finished);
    if summary.interrupted {
        // Ctrl-C is how people stop a run: said as a stop, with what to type to go on.
        let mut again = vec!["nanoflow run".to_string()];
        again.extend(names.iter().cloned());
        again.extend(sets.iter().map(|set| format!("--set {}", crate::slurm::shell_word(set))));
        printer.error(&format!(
            "{} nothing half-done was published; `{}` goes on where this run stopped",
            printer.paint(Style::Yellow, "stopped:"),
            again.join(" ")
        ));
        return Ok(ExitCode::from(INTERRUPTED));
    }
    if !summary.failed.is_empty() {
        let mut message = format!(
            "{} {} failed: `{}`",
            printer.paint(Style::Red, "error:"),
            plural(summary.failed.len(), "stage"),
            summary.failed.join("`, `")
        );
        if !summary.skipped.is_empty() {
            message += &format!("; not run because of it: `{}`", summary.skipped.join("`, `"));
        }
        printer.error(&message);
        printer.status(&format!("ran {}, cached {} in {seconds:.1}s", summary.ran, summary.cached));
        return Ok(ExitCode::FAILURE);
    }
    printer.status(&format!("ran {}, cached {} in {seconds:.1}s", summary.ran, summary.cached));
    made(printer, &plan, &store, &summary.finished, names);
    Ok(ExitCode::SUCCESS)
}

/// What the run made that people look at (models, evaluations, samples, exports): for each, its
/// result line, how long it took and where it is; then how to see it all.
fn made(printer: &Printer, plan: &Plan, store: &Store, finished: &[String], names: &[String]) {
    let finished: BTreeSet<&String> = finished.iter().collect();
    let products: Vec<(&str, Manifest)> = plan
        .stages
        .iter()
        .filter(|stage| finished.contains(&stage.name) && stage.kind.is_product())
        .filter_map(|stage| {
            let manifest = Manifest::read(&store.current(&stage.name)?).ok()??;
            Some((stage.name.as_str(), manifest))
        })
        .collect();
    if products.is_empty() {
        return;
    }
    let width = products.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    printer.status("made:");
    for (name, manifest) in &products {
        let took = crate::report::duration(manifest.duration_s);
        let result = if manifest.summary.is_empty() { String::new() } else { format!("{}; ", manifest.summary) };
        printer.status(&format!("  {name:<width$}  {result}took {took}"));
        let link = store.stage_dir(name).join("current");
        printer.status(&format!("  {:<width$}  {}/", "", show_path(&link).display()));
    }
    printer.status(&format!("see it all: nanoflow report {}", names.join(" ")));
}

pub fn status(printer: &Printer, file: Option<&Path>, names: &[String], sets: &[String]) -> Result<ExitCode, Error> {
    let (plan, store) = load(file, sets)?;
    let (selected, untouched) = match names.is_empty() {
        true if plan.targets.len() > 1 => touched(&plan, &store)?,
        true => (plan.order().to_vec(), Vec::new()),
        false => (plan.select(names)?, Vec::new()),
    };
    for (index, freshness) in assess_all(&plan, &store, &selected)? {
        let name = &plan.stages[index].name;
        let (state, why) = match &freshness {
            Freshness::Fresh { .. } => ("fresh", String::new()),
            Freshness::Restorable { reasons, .. } => {
                ("stale", format!("{} (stored: restores without running)", reasons.join("; ")))
            }
            Freshness::Stale { key, .. } if store.key_is_running(name, key) => {
                let job = crate::slurm::JobFiles::new(&store.partial_dir(name, key)).current();
                match fs_err::read_to_string(job).ok().map(|id| id.trim().to_string()) {
                    Some(id) => {
                        let state = crate::slurm::Slurm::state(&id);
                        let queued = state.as_ref().is_some_and(|state| state.state == "PENDING");
                        let described = state.map_or_else(|| "unknown to Slurm".to_string(), |state| state.describe());
                        (if queued { "queued" } else { "running" }, format!("as Slurm job {id}: {described}"))
                    }
                    None => ("running", "in another nanoflow process".to_string()),
                }
            }
            Freshness::Stale { key, reasons, .. }
                if plan.stages[index].kind.resumable() && store.has_partial(name, key) =>
            {
                ("stale", format!("{}; an interrupted run's partial output: the next run resumes", reasons.join("; ")))
            }
            Freshness::Stale { reasons, .. } => ("stale", reasons.join("; ")),
            Freshness::Waiting { upstream } => ("waiting", format!("on `{}`", upstream.join("`, `"))),
        };
        printer.data(&row(&plan, name, state, &why));
        if let Freshness::Fresh { manifest } | Freshness::Restorable { manifest, .. } = &freshness {
            printer.verbose(&format!("    key {}", manifest.key));
        }
        for line in crate::preflight::lines(&plan, &store, index) {
            printer.verbose(&line);
        }
    }
    if !untouched.is_empty() {
        let width = untouched.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
        printer.data(&format!("{}never run:", if selected.is_empty() { "" } else { "\n" }));
        for (name, stages) in untouched {
            printer.data(&format!("  {name:<width$}  {} (`nanoflow status {name}`)", plural(stages, "stage")));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a bare `status` shows of a pipeline file with several targets: the stages of every target that has been run (any stage of it
/// has an output), and stages in no target that have one, in pipeline order; and, a line each,
/// the targets never run (name, number of stages). A pipeline file ships many pipelines; the
/// user cares about the ones they touched.
/// Targets never run: each one's name and how many stages it has.
type Untouched = Vec<(String, usize)>;

fn touched(plan: &Plan, store: &Store) -> Result<(Vec<usize>, Untouched), Error> {
    let built = |index: &usize| store.current(&plan.stages[*index].name).is_some();
    let mut shown = BTreeSet::new();
    let mut untouched = Vec::new();
    for target in &plan.targets {
        let stages = plan.select(std::slice::from_ref(&target.name))?;
        if stages.iter().any(built) {
            shown.extend(stages);
        } else {
            untouched.push((target.name.clone(), stages.len()));
        }
    }
    let in_targets: BTreeSet<usize> =
        plan.targets.iter().flat_map(|target| plan.select(std::slice::from_ref(&target.name))).flatten().collect();
    shown.extend(plan.order().iter().filter(|index| !in_targets.contains(index) && built(index)));
    let selected = plan.order().iter().copied().filter(|index| shown.contains(index)).collect();
    Ok((selected, untouched))
}

/// Every selected stage judged in order, each using the digests of the upstream ones that
/// need no run.
fn assess_all(plan: &Plan, store: &Store, selected: &[usize]) -> Result<Vec<(usize, Freshness)>, Error> {
    let mut cache = StatCache::open(&store.stat_cache_file());
    let mut digests: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut assessed = Vec::new();
    for &index in selected {
        let freshness = freshness::assess(plan, store, &mut cache, index, &digests).map_err(store_error(store))?;
        digests.insert(plan.stages[index].name.clone(), freshness.output_digest().map(str::to_string));
        assessed.push((index, freshness));
    }
    let _ = cache.save();
    Ok(assessed)
}

fn select_or_all(plan: &Plan, names: &[String]) -> Result<Vec<usize>, Error> {
    if names.is_empty() { Ok(plan.order().to_vec()) } else { plan.select(names) }
}

fn row(plan: &Plan, name: &str, state: &str, why: &str) -> String {
    let width = plan.name_width();
    format!("{name:<width$}  {state:<8} {why}").trim_end().to_string()
}

pub fn dag(printer: &Printer, file: Option<&Path>, names: &[String], dot: bool) -> Result<ExitCode, Error> {
    let (plan, _) = load(file, &[])?;
    let selected = select_or_all(&plan, names)?;
    if dot {
        printer.data("digraph nanoflow {");
        printer.data("  rankdir=LR;");
        for &index in &selected {
            let stage = &plan.stages[index];
            printer.data(&format!("  \"{}\" [label=\"{}\\n({})\"];", stage.name, stage.name, stage.kind.name()));
            for input in &stage.inputs {
                printer.data(&format!("  \"{input}\" -> \"{}\";", stage.name));
            }
        }
        printer.data("}");
        return Ok(ExitCode::SUCCESS);
    }
    // Text: each stage under the deepest of its inputs, one line each, upstream first.
    let mut depth: BTreeMap<&str, usize> = BTreeMap::new();
    for &index in &selected {
        let stage = &plan.stages[index];
        let level = stage.inputs.iter().filter_map(|input| depth.get(input.as_str())).max().map_or(0, |d| d + 1);
        depth.insert(&stage.name, level);
        let arrow = if stage.inputs.is_empty() { String::new() } else { format!("  <- {}", stage.inputs.join(", ")) };
        printer.data(&format!("{}{} ({}){arrow}", "  ".repeat(level), stage.name, stage.kind.name()));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn ls(printer: &Printer, file: Option<&Path>) -> Result<ExitCode, Error> {
    let (plan, _) = load(file, &[])?;
    let width =
        plan.stages.iter().map(|s| s.name.len()).chain(plan.targets.iter().map(|t| t.name.len())).max().unwrap_or(0);
    if !plan.targets.is_empty() {
        printer.data("targets:");
        for target in &plan.targets {
            printer.data(&format!("  {:<width$}  {}", target.name, target.stages.join(" ")));
        }
    }
    printer.data("stages:");
    for stage in &plan.stages {
        printer.data(&format!("  {:<width$}  {}", stage.name, stage.kind.name()));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn show(printer: &Printer, file: Option<&Path>, stage: &str) -> Result<ExitCode, Error> {
    let (plan, store) = load(file, &[])?;
    plan.stage_named(stage)?;
    let Some(dir) = store.current(stage) else {
        printer.error(&format!("{} stage `{stage}` has no output yet", printer.paint(Style::Red, "error:")));
        printer.error(&format!("\n{} run it with `nanoflow run {stage}`", printer.paint(Style::Cyan, "hint:")));
        return Ok(ExitCode::FAILURE);
    };
    let manifest = Manifest::read(&dir).map_err(store_error(&store))?;
    printer.data(&show_path(&dir.join(OUT)).display().to_string());
    if let Some(manifest) = manifest {
        printer.data(&serde_json::to_string_pretty(&manifest).expect("a manifest is JSON"));
    }
    Ok(ExitCode::SUCCESS)
}

/// `nanoflow sample`: the sample kind's code in this process, printing to stdout as it goes. A
/// name of a pipeline stage means that stage's current output; anything else is a model as the
/// kind reads it (a folder, or a Hub GPT-2 by name).
pub fn sample(file: Option<&Path>, mut config: nanoflow_stages::sample::Config) -> Result<ExitCode, Error> {
    use nanoflow_stages::sample::{self, Event, SEPARATOR};
    use std::io::Write;

    let cwd = std::env::current_dir().map_err(|source| Error::Read { path: ".".into(), source })?;
    let mut root = cwd.clone();
    let pipeline = match pipeline::find(file, &cwd) {
        Ok(path) => Some(path),
        Err(Error::NoPipeline { .. }) if file.is_none() => None,
        Err(error) => return Err(error),
    };
    // The arguments are checked as a sample stage's params would be, before any model loads; a
    // stage named is checked as `model: ${stage}` would be (a tokenize stage is not a model).
    let invalid_argument = |invalid: nanoflow_stages::Invalid| {
        let option = match invalid.key.as_str() {
            "model" => "STAGE_OR_MODEL".to_string(),
            "start" => "PROMPT".to_string(),
            key => format!("--{}", key.replace('_', "-")),
        };
        Error::InvalidArgument { option, message: invalid.message }
    };
    let (asked, mut stage_names) = (config.model.clone(), Vec::new());
    if let Some(path) = pipeline {
        let (plan, store) = load(Some(&path), &[])?;
        stage_names = plan.stages.iter().map(|stage| stage.name.clone()).collect();
        if let Some(index) = plan.index(&config.model) {
            let kind = plan.stages[index].kind.name();
            let kind_of = |_: &str| Some(kind);
            let named = nanoflow_stages::sample::Config { model: format!("${{{asked}}}"), ..config.clone() };
            nanoflow_stages::sample::check(&named, &nanoflow_stages::Upstream::new(&kind_of))
                .map_err(invalid_argument)?;
            let dir = store.current(&config.model).ok_or_else(|| Error::NoOutput { stage: config.model.clone() })?;
            config.model = dir.join(OUT).to_string_lossy().into_owned();
        } else if !nanoflow_stages::gpt::GptConfig::PRESETS.contains(&config.model.as_str()) {
            config.model = cwd.join(&config.model).to_string_lossy().into_owned();
        }
        root = plan.root.clone();
        if let Some(prompt) = config.start.strip_prefix("FILE:") {
            // A prompt file is named from where the command runs, not from the pipeline's folder.
            config.start = format!("FILE:{}", cwd.join(prompt).display());
        }
    }
    nanoflow_stages::sample::check(&config, &nanoflow_stages::Upstream::none()).map_err(invalid_argument)?;
    let is_model =
        nanoflow_stages::gpt::GptConfig::PRESETS.contains(&config.model.as_str()) || root.join(&config.model).exists();
    if !is_model {
        return Err(Error::UnknownModel { name: asked, stages: stage_names });
    }
    // Not a lock held throughout: the callback runs on a thread of the decoding pool.
    let mut stdout = std::io::stdout();
    let what = format!("sampling from `{}`", config.model);
    sample::generate(&config, &root, &mut |event| {
        let _ = match event {
            Event::Text(text) => write!(stdout, "{text}"),
            Event::EndOfSample => writeln!(stdout, "\n{SEPARATOR}"),
        };
        let _ = stdout.flush();
    })
    .map_err(|error| Error::failed(what, error))?;
    Ok(ExitCode::SUCCESS)
}

/// `nanoflow bench`: the shape and progress on stderr, the measurement on stdout. `shape`
/// `auto` (no shape named) is the laptop recipe's on a CPU and GPT-2's on a GPU
/// (`bench::Shape::pick`). The iterations move one live bar with an ETA on a terminal (a line
/// every few seconds elsewhere), and a run that will take over a minute says so as soon as an
/// iteration's time tells.
#[allow(clippy::too_many_arguments)]
pub fn bench(
    printer: &Printer,
    shape: &str,
    batch_size: Option<usize>,
    block_size: Option<usize>,
    device: String,
    dtype: String,
    burn_in: usize,
    iters: usize,
    json: bool,
) -> Result<ExitCode, Error> {
    use nanoflow_stages::gpt::bench::{self, Event, Shape};
    use nanoflow_stages::progress::{PLAIN_EVERY, Unit, Update};
    let what = format!("benchmarking `{shape}`");
    let failed = |error: anyhow::Error| Error::Failed { what: what.clone(), source: error.into() };
    let picked = Shape::pick(shape, &device).map_err(failed)?;
    let mut options = picked.options;
    options.batch_size = batch_size.unwrap_or(options.batch_size);
    options.model.block_size = block_size.unwrap_or(options.model.block_size);
    options.dtype = dtype;
    options.burn_in = burn_in;
    options.iters = iters;
    let model = &options.model;
    let why = picked.why.map_or(String::new(), |why| format!(": {why}"));
    printer.status(&format!(
        "{}: {} layers, {} heads, {} wide, block {}, vocab {}, batch {} ({:.2}M parameters){why}",
        picked.name,
        model.n_layer,
        model.n_head,
        model.n_embd,
        model.block_size,
        model.vocab_size,
        options.batch_size,
        model.num_params(true) as f64 / 1e6
    ));
    let untimed = match options.burn_in {
        0 => "no burn-in".to_string(),
        1 => "1 untimed burn-in iteration".to_string(),
        n => format!("{n} untimed burn-in iterations"),
    };
    printer.status(&format!("{untimed}, then {} timed", options.iters));
    let started = Instant::now();
    // As `progress::Progress`: a plain line once the work has run for a while, not at once.
    let mut last_line = Instant::now();
    // The timed iterations so far, and their seconds: what the time left is judged by once
    // there are some (the burn-in's are slower while the buffers grow).
    let mut timed_so_far = (0, 0.0);
    let mut on_event = |event: Event| match event {
        Event::Step { done, total, timed, loss, seconds } => {
            let phase = if timed { "" } else { " (burn-in)" };
            let message = format!("loss {loss:.4}, {:.2}ms{phase}", seconds * 1e3);
            let update = Update {
                label: "bench".into(),
                unit: Unit::Iters,
                done: done as u64,
                total: Some(total as u64),
                elapsed: started.elapsed().as_secs_f64(),
                message: message.clone(),
                finished: done == total,
            };
            printer.progress("bench", &update);
            // Where no bar is drawn: a line every few seconds, with the time left.
            if timed {
                timed_so_far = (timed_so_far.0 + 1, timed_so_far.1 + seconds);
            }
            if last_line.elapsed() >= PLAIN_EVERY && done < total {
                last_line = Instant::now();
                let per_iteration = match timed_so_far {
                    (0, _) => seconds,
                    (count, sum) => sum / count as f64,
                };
                let left = (total - done) as f64 * per_iteration;
                let eta = crate::report::duration(left);
                printer.stage_detail("bench", &format!("iter {done}/{total}: {message}, ETA {eta}"));
            }
        }
        Event::Long { seconds, steps, step_seconds } => printer.error(&format!(
            "{} this benchmark takes about {} more ({steps} iterations of ~{}); Ctrl-C stops it",
            printer.paint(Style::Yellow, "warning:"),
            crate::report::duration(seconds),
            crate::report::duration(step_seconds)
        )),
    };
    let measured = bench::run(&options, &mut on_event);
    printer.end_progress("bench");
    let measured = measured.map_err(failed)?;
    if json {
        printer.data(&serde_json::to_string_pretty(&measured).expect("a measurement serializes"));
        return Ok(ExitCode::SUCCESS);
    }
    let memory =
        measured.peak_memory_bytes.map_or("unknown".into(), |bytes| format!("{:.2} GiB", bytes as f64 / 1073741824.0));
    // A GPU's peak is a bfloat16 table figure, shown as before with the device and dtype; a
    // CPU's is measured in f32, and the line says so (and the matmuls' dtype where it differs).
    let peak = match (measured.device.as_str(), measured.dtype.as_str()) {
        ("cpu", "f32") => format!("{} ({})", format_flops(measured.peak_flops), measured.peak_flops_source),
        ("cpu", dtype) => {
            format!("{} ({}; matmuls in {dtype})", format_flops(measured.peak_flops), measured.peak_flops_source)
        }
        (device, dtype) => format!("{:.0} TFLOPS ({device}, {dtype})", measured.peak_flops / 1e12),
    };
    printer.data(&format!(
        "time per iteration: {:.2}ms, {:.0} tokens/s, MFU: {} of {peak}, peak memory {memory}",
        measured.ms_per_iter,
        measured.tokens_per_second,
        format_percent(measured.mfu),
    ));
    Ok(ExitCode::SUCCESS)
}

/// `153e9` -> `153 GFLOPS`, `2.5e12` -> `2.5 TFLOPS`.
fn format_flops(flops: f64) -> String {
    match flops {
        f if f >= 1e12 => format!("{:.1} TFLOPS", f / 1e12),
        f if f >= 1e9 => format!("{:.0} GFLOPS", f / 1e9),
        f => format!("{:.0} MFLOPS", f / 1e6),
    }
}

/// A fraction as a percentage with two decimals, or three significant digits where smaller (a
/// tiny shape's MFU is not `0.00%`): `0.3124` -> `31.24%`, `0.000123` -> `0.0123%`.
fn format_percent(fraction: f64) -> String {
    let percent = fraction * 100.0;
    let decimals = match percent {
        p if p >= 1.0 || p <= 0.0 || !p.is_finite() => 2,
        p => (2.0 - p.log10().floor()) as usize,
    };
    format!("{percent:.decimals$}%")
}

pub fn report(
    printer: &Printer,
    file: Option<&Path>,
    names: &[String],
    output: Option<&Path>,
) -> Result<ExitCode, Error> {
    let (plan, store) = load(file, &[])?;
    crate::report::write(printer, &plan, &store, names, output)
}

pub fn metrics(
    printer: &Printer,
    file: Option<&Path>,
    stage: &str,
    format: crate::metrics::Format,
    plot: Option<&Path>,
) -> Result<ExitCode, Error> {
    let (plan, store) = load(file, &[])?;
    crate::metrics::show(printer, &plan, &store, stage, format, plot)
}

/// The kinds whose other runs `gc` keeps unless `--all-runs`: the runs `nanoflow metrics`
/// compares (a model's training record, an evaluation's table), costly to make again.
const COMPARED: &[&str] = &["train", "finetune", "eval"];

pub fn gc(
    printer: &Printer,
    file: Option<&Path>,
    dry_run: bool,
    partial: bool,
    all_runs: bool,
) -> Result<ExitCode, Error> {
    let (_, store) = load(file, &[])?;
    let _lock = store.try_lock_exclusive()?;
    let mut removed = 0;
    let mut bytes = 0;
    let stage_dirs = match fs_err::read_dir(&store.root) {
        Ok(entries) => entries.filter_map(Result::ok).map(|entry| entry.path()).collect::<Vec<_>>(),
        Err(_) => Vec::new(),
    };
    let mut stage_dirs: Vec<_> = stage_dirs.into_iter().filter(|dir| dir.is_dir() && !is_hidden(dir)).collect();
    stage_dirs.sort();
    let mut kept: Vec<(String, usize)> = Vec::new();
    for stage_dir in stage_dirs {
        let stage = stage_dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let current = store.current(&stage);
        let mut entries: Vec<_> =
            fs_err::read_dir(&stage_dir).map_err(store_error(&store))?.filter_map(Result::ok).collect();
        entries.sort_by_key(|entry| entry.file_name());
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let keep = name == "current"
                || name == store::HISTORY
                || current.as_deref().is_some_and(|entry| entry == path)
                || (name.starts_with(".partial-") && !partial);
            if keep {
                continue;
            }
            let compared = !all_runs
                && path.is_dir()
                && Manifest::read(&path)
                    .ok()
                    .flatten()
                    .is_some_and(|manifest| COMPARED.contains(&manifest.material.kind.as_str()));
            if compared {
                match kept.last_mut() {
                    Some((name, count)) if *name == stage => *count += 1,
                    _ => kept.push((stage.clone(), 1)),
                }
                continue;
            }
            // A link (a `.current-*` an interrupted `set_current` left) is the link's few bytes,
            // not the entry it points at, which stays.
            let link = path.symlink_metadata().map(|m| m.len()).unwrap_or(0);
            let size = if path.is_symlink() { link } else { store::disk_usage(&path).max(link) };
            printer.data(&format!("{}  {}", show_path(&path).display(), format_bytes(size as f64)));
            removed += 1;
            bytes += size;
            if !dry_run {
                let result = if path.is_dir() && !path.is_symlink() {
                    store::remove_dir_all(&path)
                } else {
                    fs_err::remove_file(&path)
                };
                result.map_err(store_error(&store))?;
            }
        }
    }
    if !dry_run {
        let _ = StatCache::open(&store.stat_cache_file()).prune();
    }
    let verb = if dry_run { "would remove" } else { "removed" };
    printer.status(&format!("{verb} {}, {}", plural(removed, "entry"), format_bytes(bytes as f64)));
    for (stage, count) in kept {
        printer.status(&format!(
            "kept {} of `{stage}` that `nanoflow metrics {stage}` compares (`gc --all-runs` removes them too)",
            plural(count, "other run")
        ));
    }
    Ok(ExitCode::SUCCESS)
}

fn is_hidden(path: &Path) -> bool {
    path.file_name().is_some_and(|name| name.to_string_lossy().starts_with('.'))
}

pub fn verify(printer: &Printer, file: Option<&Path>, names: &[String]) -> Result<ExitCode, Error> {
    let (plan, store) = load(file, &[])?;
    let selected = select_or_all(&plan, names)?;
    let mut damaged = BTreeSet::new();
    for index in selected {
        let name = &plan.stages[index].name;
        let Some(dir) = store.current(name) else {
            if store.current_is_not_a_link(name) {
                printer.data(&row(&plan, name, "damaged", "`current` is a copy, not a link"));
                damaged.insert(name.clone());
            } else {
                printer.data(&row(&plan, name, "missing", "no output yet"));
            }
            continue;
        };
        let manifest = Manifest::read_checked(&dir).map_err(store_error(&store))?;
        let damage = match &manifest {
            Ok(Some(manifest)) => {
                manifest.verify(&dir).map_err(store_error(&store))?.iter().map(ToString::to_string).collect()
            }
            Ok(None) => vec!["`manifest.json` is missing".to_string()],
            Err(why) => vec![why.clone()],
        };
        if damage.is_empty() {
            printer.data(&row(&plan, name, "ok", &show_path(&dir.join(OUT)).display().to_string()));
        } else {
            printer.data(&row(&plan, name, "damaged", &damage.join("; ")));
            damaged.insert(name.clone());
        }
    }
    if damaged.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    printer.error(&format!(
        "{} damaged output in `{}`; `nanoflow run` runs them again",
        printer.paint(Style::Red, "error:"),
        damaged.into_iter().collect::<Vec<_>>().join("`, `")
    ));
    Ok(ExitCode::FAILURE)
}

fn plural(count: usize, noun: &str) -> String {
    match (count, noun) {
        (1, _) => format!("1 {noun}"),
        (_, "entry") => format!("{count} entries"),
        _ => format!("{count} {noun}s"),
    }
}
