//! Running what `run` selected: independent stages in parallel (`-j`), each stale one in a child
//! process whose output is streamed with a `[stage]` prefix and saved in `log.txt`, published
//! only when it succeeds. A failure stops the stages downstream of it and lets the others
//! finish; Ctrl-C or SIGTERM stops every child and publishes nothing half-done.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime};

use nanoflow_stages::Report;
use nanoflow_stages::progress::{self, Line, Unit};

use crate::cache_key::KeyMaterial;
use crate::error::Error;
use crate::freshness::{self, Freshness};
use crate::manifest::{LOG, Manifest, OUT, check_outputs, hash_outputs, output_digest, own_copies};
use crate::plan::Plan;
use crate::printer::{Printer, Style, show_path};
use crate::reference;
use crate::slurm::{ExecutorKind, JobFiles, Resources, Slurm};
use crate::stage_process::StageSpec;
use crate::stat_cache::StatCache;
use crate::store::{self, Lock, Store};

/// Set by Ctrl-C / SIGTERM: start nothing new, publish nothing.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// Process-group ids of the running stage processes, for the signal handler.
static CHILDREN: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Lines of a stage's output kept in memory for the failure summary.
const TAIL: usize = 20;

pub fn install_signal_handler() {
    let _ = ctrlc::set_handler(|| {
        INTERRUPTED.store(true, Ordering::SeqCst);
        for &group in CHILDREN.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).iter() {
            // SAFETY: kill(2) with a negative pid signals a process group; no memory is touched.
            unsafe { libc::kill(-group, libc::SIGTERM) };
        }
    });
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

#[derive(Debug, Default)]
pub struct Options {
    pub jobs: usize,
    pub force: BTreeSet<String>,
    /// Child processes here, or a Slurm job per stage.
    pub executor: ExecutorKind,
}

/// How a stage's process, or its job, ended.
struct Ended {
    success: bool,
    /// "exit status 1", "killed by signal 9", "Slurm job 12 reached its time limit …".
    reason: String,
}

impl From<ExitStatus> for Ended {
    fn from(status: ExitStatus) -> Ended {
        let reason = match status.code() {
            Some(code) => format!("exit status {code}"),
            None => {
                format!("killed by signal {}", std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0))
            }
        };
        Ended { success: status.success(), reason }
    }
}

/// How often a Slurm job's state and output are read.
const POLL: Duration = Duration::from_millis(500);
/// A job that stopped with a checkpoint before its end is submitted again, this many times at most.
const RESUBMITS: usize = 1000;

#[derive(Debug, Default)]
pub struct Summary {
    pub ran: usize,
    pub cached: usize,
    pub failed: Vec<String>,
    pub skipped: Vec<String>,
    /// Stages whose output is current now (ran or found), in the order they finished.
    pub finished: Vec<String>,
    pub interrupted: bool,
}

/// A finished upstream stage: what downstream keys and paths need.
#[derive(Debug, Clone)]
struct Done {
    digest: String,
    /// Its output directory in the store.
    out: PathBuf,
}

enum Outcome {
    /// Fresh already, or restored from the store, or published meanwhile by another process.
    Cached {
        done: Done,
        how: &'static str,
    },
    Ran {
        done: Done,
        seconds: f64,
        summary: String,
    },
    Failed {
        message: String,
        tail: Vec<String>,
        log: PathBuf,
    },
    Interrupted,
}

pub struct Executor<'a> {
    plan: &'a Plan,
    store: &'a Store,
    printer: &'a Printer,
    cache: Mutex<StatCache>,
    options: Options,
    width: usize,
}

impl<'a> Executor<'a> {
    pub fn new(plan: &'a Plan, store: &'a Store, printer: &'a Printer, options: Options) -> Executor<'a> {
        let cache = Mutex::new(StatCache::open(&store.stat_cache_file()));
        let width = plan.stages.iter().map(|stage| stage.name.len()).max().unwrap_or(0);
        Executor { plan, store, printer, cache, options, width }
    }

    /// Builds `selected` (indices in upstream-first order).
    pub fn run(&self, selected: &[usize]) -> Result<Summary, Error> {
        let _store_lock: Lock = self.store.lock_shared()?;
        let total = selected.len();
        let mut summary = Summary::default();
        let mut done: BTreeMap<String, Done> = BTreeMap::new();
        let mut broken: BTreeSet<String> = BTreeSet::new();
        // Each stage counts the inputs it still waits for; one that finishes makes ready those
        // it was the last input of. A step costs the stage's edges, not a scan of every stage
        // (which made a run of 1,000 stages quadratic).
        let position_of: HashMap<&str, usize> = selected
            .iter()
            .enumerate()
            .map(|(position, &index)| (self.plan.stages[index].name.as_str(), position))
            .collect();
        let mut missing = vec![0usize; total];
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); total];
        for (position, &index) in selected.iter().enumerate() {
            for input in &self.plan.stages[index].inputs {
                missing[position] += 1;
                if let Some(&upstream) = position_of.get(input.as_str()) {
                    dependents[upstream].push(position);
                }
            }
        }
        let mut ready: BTreeSet<usize> = (0..total).filter(|&position| missing[position] == 0).collect();
        let mut skipped = vec![false; total];
        let mut running = 0;
        let (sender, receiver) = mpsc::channel::<(usize, Outcome)>();
        std::thread::scope(|scope| {
            loop {
                // An outcome decided here without a thread: a stage found in the store is a few
                // `stat` calls and a manifest, far cheaper than starting a thread for it. It is
                // handled before the next stage starts, so stages finish in the order written.
                let mut settled = None;
                while settled.is_none()
                    && !interrupted()
                    && running < self.options.jobs.max(1)
                    && let Some(position) = ready.pop_first()
                {
                    let index = selected[position];
                    let stage = &self.plan.stages[index];
                    let upstream: BTreeMap<String, Done> =
                        stage.inputs.iter().map(|input| (input.clone(), done[input].clone())).collect();
                    match self.prepare(index, &upstream) {
                        Ok(Prepared::Cached(outcome)) => settled = Some((position, outcome)),
                        prepared => {
                            let sender = sender.clone();
                            scope.spawn(move || {
                                let outcome = self.build(index, position, total, &upstream, prepared);
                                let _ = sender.send((position, outcome));
                            });
                            running += 1;
                        }
                    }
                }
                let (position, outcome) = match settled {
                    Some(outcome) => outcome,
                    None if running == 0 => break,
                    None => {
                        let Ok(received) = receiver.recv() else { break };
                        running -= 1;
                        received
                    }
                };
                let name = self.plan.stages[selected[position]].name.clone();
                let finished_ok = matches!(outcome, Outcome::Cached { .. } | Outcome::Ran { .. });
                match outcome {
                    Outcome::Cached { done: finished, how } => {
                        self.line(position, total, &name, Style::Green, how, &self.show_path(&finished.out));
                        self.printer.verbose(&format!("      output digest {}", finished.digest));
                        summary.cached += 1;
                        summary.finished.push(name.clone());
                        done.insert(name, finished);
                    }
                    Outcome::Ran { done: finished, seconds, summary: report } => {
                        let detail = format!("{seconds:.1}s  {}", self.show_path(&finished.out));
                        self.line(position, total, &name, Style::Green, "done", &detail);
                        self.printer.verbose(&format!("      output digest {}", finished.digest));
                        if !report.is_empty() {
                            self.printer.status(&format!("      {report}"));
                        }
                        summary.ran += 1;
                        summary.finished.push(name.clone());
                        done.insert(name, finished);
                    }
                    Outcome::Failed { message, tail, log } => {
                        let last_words = |line: &&String| line.starts_with("error: ") || line.starts_with("hint: ");
                        if self.printer.verbosity == crate::printer::Verbosity::Quiet {
                            for line in tail.iter().filter(|line| !last_words(line)) {
                                self.printer.error(&format!("[{name}] {line}"));
                            }
                        }
                        self.line(position, total, &name, Style::Red, "failed", &message);
                        if let Some(hint) = tail
                            .iter()
                            .rev()
                            .take_while(|line| last_words(line))
                            .find(|line| line.starts_with("hint: "))
                        {
                            self.printer.error(&format!("      {hint}"));
                        }
                        self.printer.error(&format!("      log: {}", self.show_path(&log)));
                        summary.failed.push(name.clone());
                        broken.insert(name);
                    }
                    Outcome::Interrupted => {
                        self.line(position, total, &name, Style::Yellow, "stopped", "(interrupted; nothing published)");
                        broken.insert(name);
                    }
                }
                if finished_ok {
                    for &next in &dependents[position] {
                        missing[next] -= 1;
                        if missing[next] == 0 && !skipped[next] {
                            ready.insert(next);
                        }
                    }
                } else if !interrupted() {
                    // Everything downstream of it is skipped, upstream first.
                    let mut downstream: BTreeSet<usize> = dependents[position].iter().copied().collect();
                    while let Some(next) = downstream.pop_first() {
                        let stage = &self.plan.stages[selected[next]];
                        if skipped[next] {
                            continue;
                        }
                        let Some(failed) = stage.inputs.iter().find(|input| broken.contains(*input)) else { continue };
                        self.line(
                            next,
                            total,
                            &stage.name,
                            Style::Yellow,
                            "skipped",
                            &format!("(`{failed}` did not finish)"),
                        );
                        broken.insert(stage.name.clone());
                        summary.skipped.push(stage.name.clone());
                        skipped[next] = true;
                        ready.remove(&next);
                        downstream.extend(dependents[next].iter().copied());
                    }
                }
            }
        });
        summary.interrupted = interrupted();
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = cache.save() {
            self.printer.error(&format!("warning: could not save the stat cache: {error}"));
        }
        Ok(summary)
    }

    /// Makes stage `index` current: from the store when its key is there, else by running it.
    /// `prepared`: what `prepare` found.
    fn build(
        &self,
        index: usize,
        position: usize,
        total: usize,
        upstream: &BTreeMap<String, Done>,
        prepared: std::io::Result<Prepared>,
    ) -> Outcome {
        let stage = &self.plan.stages[index];
        match prepared {
            Ok(Prepared::Cached(outcome)) => outcome,
            Ok(Prepared::Run { key, material, reasons }) => {
                let resuming = stage.kind.resumable()
                    && !self.options.force.contains(&stage.name)
                    && self.store.has_partial(&stage.name, &key);
                let why = match resuming {
                    true => "resuming an interrupted run".to_string(),
                    false => reasons.join("; "),
                };
                self.line(position, total, &stage.name, Style::Cyan, "running", &format!("({why})"));
                self.printer.verbose(&format!("      key {key}"));
                match self.execute(index, &key, material, upstream) {
                    Ok(outcome) => outcome,
                    Err(error) => Outcome::Failed {
                        message: format!("{error}"),
                        tail: Vec::new(),
                        log: self.store.partial_dir(&stage.name, &key).join(LOG),
                    },
                }
            }
            Err(error) => Outcome::Failed {
                message: format!("{error}"),
                tail: Vec::new(),
                log: self.store.stage_dir(&stage.name),
            },
        }
    }

    fn prepare(&self, index: usize, upstream: &BTreeMap<String, Done>) -> std::io::Result<Prepared> {
        let stage = &self.plan.stages[index];
        let digests: BTreeMap<String, Option<String>> =
            upstream.iter().map(|(name, done)| (name.clone(), Some(done.digest.clone()))).collect();
        let freshness = {
            let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if self.options.force.contains(&stage.name) {
                let material = freshness::material(self.plan, &mut cache, index, &digests)?;
                Freshness::Stale { key: material.key(), material, reasons: vec!["forced".to_string()] }
            } else {
                freshness::assess(self.plan, self.store, &mut cache, index, &digests)?
            }
        };
        match freshness {
            Freshness::Fresh { manifest } => Ok(Prepared::Cached(self.cached(&stage.name, &manifest, "cached")?)),
            Freshness::Restorable { manifest, .. } => {
                Ok(Prepared::Cached(self.cached(&stage.name, &manifest, "restored")?))
            }
            Freshness::Stale { key, material, reasons } => Ok(Prepared::Run { key, material, reasons }),
            Freshness::Waiting { upstream } => {
                unreachable!("stage `{}` started before `{}` finished", stage.name, upstream.join("`, `"))
            }
        }
    }

    fn cached(&self, stage: &str, manifest: &Manifest, how: &'static str) -> std::io::Result<Outcome> {
        self.store.set_current(stage, &manifest.key)?;
        if how == "restored" {
            self.store.record(stage, &manifest.key, how)?;
        }
        let out = self.store.entry_dir(stage, &manifest.key).join(OUT);
        Ok(Outcome::Cached { done: Done { digest: manifest.output_digest.clone(), out }, how })
    }

    /// Runs a stale stage: takes its key's lock (waiting if another process holds it, then
    /// using that process's result), runs the child, and publishes.
    fn execute(
        &self,
        index: usize,
        key: &str,
        material: KeyMaterial,
        upstream: &BTreeMap<String, Done>,
    ) -> std::io::Result<Outcome> {
        let stage = &self.plan.stages[index];
        let _lock = match self.lock_key(&stage.name, key)? {
            Some(lock) => lock,
            None => return Ok(Outcome::Interrupted),
        };
        if !self.options.force.contains(&stage.name)
            && let Some(manifest) = self.store.lookup(&stage.name, key)?
        {
            let dir = self.store.entry_dir(&stage.name, key);
            let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if manifest.check(&dir, &mut cache)?.is_empty() {
                drop(cache);
                return self.cached(&stage.name, &manifest, "cached");
            }
        }

        // A resumable kind continues from an interrupted run's partial output, unless forced:
        // `--force` starts over (also from a partial output too damaged to resume from).
        let partial = self.store.partial_dir(&stage.name, key);
        // A job that an earlier nanoflow submitted for this key and never saw end (that nanoflow
        // was killed, or its login session dropped) is taken up, not run a second time: followed
        // while it runs, published if it finished meanwhile.
        let live_job = match self.options.executor {
            ExecutorKind::Slurm => JobFiles::new(&partial).earlier_job(),
            ExecutorKind::Local => None,
        };
        if live_job.is_none() && (!stage.kind.resumable() || self.options.force.contains(&stage.name)) {
            store::remove_dir_all(&partial)?;
        }
        let out = partial.join(OUT);
        fs_err::create_dir_all(&out)?;
        let mut params = stage.params.clone();
        reference::strings_mut(&mut params, &mut |text| {
            *text = reference::substitute(text, |name| upstream[name].out.display().to_string());
        });
        let report_path = self.store.stage_dir(&stage.name).join(format!(".report-{key}.json"));
        // An earlier job's report is its own (it may have written it already).
        if live_job.is_none() {
            let _ = fs_err::remove_file(&report_path);
        }
        let spec = StageSpec {
            stage: stage.name.clone(),
            kind: stage.kind.name().to_string(),
            params: params.clone(),
            root: self.plan.root.clone(),
            out: out.clone(),
            inputs: upstream.iter().map(|(name, done)| (name.clone(), done.out.clone())).collect(),
            report: report_path.clone(),
        };

        let started_at = SystemTime::now();
        let clock = Instant::now();
        let log_path = partial.join(LOG);
        let (ended, tail) = match self.options.executor {
            ExecutorKind::Local => {
                let (status, tail) = self.spawn(&stage.name, &spec, &log_path)?;
                (Ended::from(status), tail)
            }
            ExecutorKind::Slurm => {
                self.submit(&stage.name, &stage.resources, &spec, (&partial, live_job), &log_path)?
            }
        };
        if interrupted() {
            return Ok(Outcome::Interrupted);
        }
        if !ended.success {
            let reason = ended.reason;
            let error_line = tail.iter().rev().find(|line| line.starts_with("error: ")).cloned();
            let message = match error_line {
                Some(line) => format!("{reason}: {}", line.trim_start_matches("error: ")),
                None => reason,
            };
            return Ok(Outcome::Failed { message, tail, log: log_path });
        }
        let report: Report =
            fs_err::read(&report_path).ok().and_then(|bytes| serde_json::from_slice(&bytes).ok()).unwrap_or_default();
        let _ = fs_err::remove_file(&report_path);

        if let Err(message) = check_outputs(&out) {
            return Ok(Outcome::Failed { message, tail, log: log_path });
        }
        for relative in own_copies(&out)? {
            self.printer.verbose(&format!("      `$OUT/{relative}` had other hard links: stored as a copy of its own"));
        }
        let outputs = hash_outputs(&out)?;
        let digest = output_digest(&outputs);
        let manifest = Manifest {
            nanoflow_version: env!("CARGO_PKG_VERSION").to_string(),
            stage: stage.name.clone(),
            key: key.to_string(),
            material,
            config: params,
            outputs,
            output_digest: digest.clone(),
            started_at: humantime::format_rfc3339_seconds(started_at).to_string(),
            finished_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            duration_s: (clock.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
            exit_status: 0,
            host: crate::host::hostname(),
            summary: report.summary.clone(),
            metrics: report.metrics,
        };
        if interrupted() {
            return Ok(Outcome::Interrupted);
        }
        let out = self.store.publish(&stage.name, key, &manifest)?.join(OUT);
        self.store.set_current(&stage.name, key)?;
        self.store.record(&stage.name, key, "ran")?;
        let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (relative, file) in &manifest.outputs {
            cache.remember(&out.join(relative), &file.digest)?;
        }
        Ok(Outcome::Ran { done: Done { digest, out }, seconds: manifest.duration_s, summary: report.summary })
    }

    /// The key's lock, waiting politely for another process; `None` if interrupted meanwhile.
    fn lock_key(&self, stage: &str, key: &str) -> std::io::Result<Option<Lock>> {
        let mut announced = false;
        loop {
            if let Some(lock) = self.store.try_lock_key(stage, key)? {
                return Ok(Some(lock));
            }
            if interrupted() {
                return Ok(None);
            }
            if !announced {
                let holder = self.store.key_holder(stage, key);
                self.printer.status(&format!("      waiting for another nanoflow process running `{stage}`: {holder}"));
                announced = true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `nanoflow __stage` in its own process group, streams its output, waits for it.
    fn spawn(&self, stage: &str, spec: &StageSpec, log_path: &Path) -> std::io::Result<(ExitStatus, Vec<String>)> {
        let mut command = Command::new(std::env::current_exe()?);
        command.arg("__stage").stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        command.process_group(0).env(progress::ENV, "1");
        // Messages, not backtraces (candle's errors carry one when RUST_BACKTRACE is set, as it
        // is in many environments), unless asked for with `-v`.
        if self.printer.verbosity < crate::printer::Verbosity::Verbose {
            command.env("RUST_BACKTRACE", "0").env("RUST_LIB_BACKTRACE", "0");
        }
        // The stage asks the kernel to SIGTERM it if the engine dies (`die_with_engine`), so an
        // engine killed with SIGKILL leaves no stage running on. Not in a `pre_exec` hook: one
        // makes `spawn` fork (copying the engine's page tables) instead of `posix_spawn`.
        command.env(crate::stage_process::ENGINE_PID, std::process::id().to_string());
        let mut child = command.spawn()?;
        let pid = child.id() as i32;
        CHILDREN.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(pid);
        if interrupted() {
            // SAFETY: signals the group just created.
            unsafe { libc::kill(-pid, libc::SIGTERM) };
        }
        let json = serde_json::to_vec(spec).map_err(std::io::Error::other)?;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(&json);
        }
        let output = Streamed::open(log_path)?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let status = std::thread::scope(|scope| {
            scope.spawn(|| self.stream(stage, stdout, &output));
            scope.spawn(|| self.stream(stage, stderr, &output));
            let status = child.wait();
            // Nothing of a stage outlives it: a script's background job or an orphaned worker
            // would otherwise hold the output pipes open (and the engine with them).
            // SAFETY: signals the process group this stage process led.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            status
        });
        self.printer.end_progress(stage);
        CHILDREN.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).retain(|&child| child != pid);
        let status = status?;
        Ok((status, self.finish(stage, output, status.success())))
    }

    fn stream(&self, stage: &str, from: impl Read, output: &Streamed) {
        let mut reader = BufReader::new(from);
        let mut buffer = Vec::new();
        while reader.read_until(b'\n', &mut buffer).is_ok_and(|read| read > 0) {
            self.handle(stage, &buffer, output);
            buffer.clear();
        }
    }

    /// The stage's process ended: lines held back are shown if it succeeded (they were not its
    /// last words after all); if it failed they are its error, which the `failed` line says.
    /// The tail, for the failure summary.
    fn finish(&self, stage: &str, output: Streamed, success: bool) -> Vec<String> {
        let held = output.held.into_inner().unwrap_or_default();
        if success {
            for line in &held {
                self.printer.stage_line(stage, line);
            }
        }
        output.tail.into_inner().unwrap_or_default().into()
    }

    /// One line of a stage's output: a progress update is drawn, a detail line shown where
    /// details are, any other line printed with the stage's prefix; all but the updates go to
    /// `log.txt` and the tail kept for the failure summary.
    fn handle(&self, stage: &str, bytes: &[u8], output: &Streamed) {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim_end_matches(['\n', '\r']);
        let (line, plain) = match progress::parse(text) {
            Line::Update(update) => {
                self.printer.progress(stage, &update);
                // The log keeps where each piece of work ended, not every update.
                if !update.finished || update.unit == Unit::Iters {
                    return;
                }
                (update.plain(), false)
            }
            Line::Detail(line) => {
                self.printer.stage_detail(stage, line);
                (line.to_string(), false)
            }
            Line::Verbose(line) => {
                self.printer.verbose(&format!("{} {line}", self.printer.paint(Style::Dim, &format!("[{stage}]"))));
                (line.to_string(), false)
            }
            Line::Text(line) => (line.to_string(), true),
        };
        if let Ok(mut log) = output.log.lock() {
            let _ = writeln!(log, "{line}");
        }
        if plain {
            // A stage's `error:` (and the `hint:` after it) is its last word when it fails:
            // held back, and said once, by the `failed` line, if it does.
            let mut held = output.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if line.starts_with("error: ") || (line.starts_with("hint: ") && !held.is_empty()) {
                held.push(line.clone());
            } else {
                for earlier in held.drain(..) {
                    self.printer.stage_line(stage, &earlier);
                }
                self.printer.stage_line(stage, &line);
            }
        }
        if let Ok(mut tail) = output.tail.lock() {
            if tail.len() == TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }

    /// Runs the stage as a Slurm job (see `slurm`): writes its spec and batch script into the
    /// partial directory, submits it, follows its state and its output file until it ends, and
    /// submits it again while it stops with a checkpoint before its end (a time limit or a
    /// preemption warning). Ctrl-C cancels the job.
    fn submit(
        &self,
        stage: &str,
        resources: &Resources,
        spec: &StageSpec,
        (partial, mut live_job): (&Path, Option<(String, crate::slurm::JobState)>),
        log_path: &Path,
    ) -> std::io::Result<(Ended, Vec<String>)> {
        let files = JobFiles::new(partial);
        files.write_script(stage, resources)?;
        crate::atomic::write_atomic(&files.spec(), &serde_json::to_vec(spec).map_err(std::io::Error::other)?)?;
        let output = Streamed::open(log_path)?;
        let tail_lines = |output: Streamed, success: bool| self.finish(stage, output, success);
        let mut submissions = 0;
        loop {
            if interrupted() {
                return Ok((Ended { success: false, reason: "interrupted".into() }, tail_lines(output, false)));
            }
            let id = match live_job.take() {
                Some((id, state)) if state.is_final() => {
                    let line = format!(
                        "Slurm job {id}, which an earlier nanoflow submitted, ended while nanoflow was away; taking up its output"
                    );
                    self.printer.stage_line(stage, &line);
                    id
                }
                Some((id, _)) => {
                    self.printer
                        .stage_line(stage, &format!("following Slurm job {id}, which an earlier nanoflow submitted"));
                    id
                }
                None => match Slurm::submit(&files.script()) {
                    Ok(id) => {
                        crate::atomic::write_atomic(&files.current(), id.as_bytes())?;
                        self.printer.stage_line(stage, &format!("submitted as Slurm job {id}"));
                        id
                    }
                    Err(message) => return Ok((Ended { success: false, reason: message }, tail_lines(output, false))),
                },
            };
            submissions += 1;
            let job_output = files.output(&id);
            let mut follower = Follower::default();
            let mut shown = String::new();
            let mut cancelled = false;
            let mut unknown = 0;
            let state = loop {
                if interrupted() && !cancelled {
                    Slurm::cancel(&id);
                    cancelled = true;
                }
                let state = Slurm::state(&id);
                if let Some(state) = &state {
                    let described = state.describe();
                    if described != shown {
                        self.printer.stage_line(stage, &format!("Slurm job {id}: {described}"));
                        shown = described;
                    }
                }
                follower.read(&job_output, |line| self.handle(stage, line, &output));
                match state {
                    Some(state) if state.is_final() => break Some(state),
                    Some(_) => {}
                    // Just submitted, or slurmctld restarting: give it a minute.
                    None if unknown < 120 => unknown += 1,
                    None => break None,
                }
                std::thread::sleep(POLL);
            };
            // What the job wrote last (a shared filesystem may show it a moment late).
            std::thread::sleep(POLL);
            follower.read(&job_output, |line| self.handle(stage, line, &output));
            follower.finish(|line| self.handle(stage, line, &output));
            self.printer.end_progress(stage);
            let _ = fs_err::remove_file(files.current());
            let Some(state) = state else {
                let reason = format!("Slurm lost track of job {id} (neither `scontrol` nor `sacct` knows it)");
                return Ok((Ended { success: false, reason }, tail_lines(output, false)));
            };
            if state.stopped_to_resume() && !interrupted() && submissions <= RESUBMITS {
                self.printer.stage_line(
                    stage,
                    &format!("Slurm job {id} stopped before its end with a checkpoint; submitting it again"),
                );
                continue;
            }
            let success = state.succeeded();
            let reason = match state.state.as_str() {
                "COMPLETED" | "FAILED" => format!("Slurm job {id}: exit status {}", state.exit_code.unwrap_or(-1)),
                "CANCELLED" => format!("Slurm job {id} was cancelled (`scancel`)"),
                "TIMEOUT" => format!("Slurm job {id} reached its time limit: raise `resources.time`"),
                "OUT_OF_MEMORY" => format!("Slurm job {id} ran out of memory: raise `resources.mem`"),
                "NODE_FAIL" => format!("the node of Slurm job {id} failed; run it again to resume"),
                "BOOT_FAIL" | "DEADLINE" | "REVOKED" | "SPECIAL_EXIT" | "PREEMPTED" => {
                    format!("Slurm job {id} ended {}", state.state)
                }
                other => format!("Slurm job {id} ended in state {other}"),
            };
            return Ok((Ended { success, reason }, tail_lines(output, false)));
        }
    }

    fn line(&self, position: usize, total: usize, stage: &str, style: Style, state: &str, detail: &str) {
        let counter = self.printer.paint(Style::Dim, &format!("[{}/{total}]", position + 1));
        let state = self.printer.paint(style, &format!("{state:<8}"));
        let line = format!("{counter} {stage:<width$}  {state} {detail}", width = self.width);
        // A failure is shown even with `-q`.
        if matches!(style, Style::Red) { self.printer.error(&line) } else { self.printer.status(&line) }
    }

    fn show_path(&self, path: &Path) -> String {
        show_path(path).display().to_string()
    }
}

enum Prepared {
    Cached(Outcome),
    Run { key: String, material: KeyMaterial, reasons: Vec<String> },
}

/// What a stage's process (or job) printed, as it arrives: its log, the last lines for the
/// failure summary, and the lines held back until it is known whether they were its last.
struct Streamed {
    log: Mutex<fs_err::File>,
    tail: Mutex<VecDeque<String>>,
    held: Mutex<Vec<String>>,
}

impl Streamed {
    fn open(log: &Path) -> std::io::Result<Streamed> {
        Ok(Streamed {
            log: Mutex::new(fs_err::File::options().create(true).append(true).open(log)?),
            tail: Mutex::new(VecDeque::with_capacity(TAIL)),
            held: Mutex::new(Vec::new()),
        })
    }
}

/// Reads a file another machine appends to, a whole line at a time.
#[derive(Default)]
struct Follower {
    offset: u64,
    pending: Vec<u8>,
}

impl Follower {
    /// Calls `line` with each whole line written since the last call.
    fn read(&mut self, path: &Path, mut line: impl FnMut(&[u8])) {
        use std::io::Seek;
        let Ok(mut file) = fs_err::File::open(path) else { return };
        if file.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut bytes = Vec::new();
        if let Ok(read) = file.read_to_end(&mut bytes) {
            self.offset += read as u64;
        }
        self.pending.extend_from_slice(&bytes);
        while let Some(end) = self.pending.iter().position(|&byte| byte == b'\n') {
            let rest = self.pending.split_off(end + 1);
            line(&self.pending);
            self.pending = rest;
        }
    }

    /// The last line, when the file does not end with a newline.
    fn finish(&mut self, mut line: impl FnMut(&[u8])) {
        if !self.pending.is_empty() {
            line(&std::mem::take(&mut self.pending));
        }
    }
}
