//! Slurm as the executor (`--executor slurm`, or `executor: slurm` in pipeline.yaml): each stale
//! stage becomes one batch job that runs `nanoflow __stage` on every task of its allocation,
//! against the one store on a shared filesystem; the engine stays where it was started, submits
//! a stage once its inputs are published, follows the job (`scontrol`, then `sacct`), shows its
//! output as a local stage's, and publishes the output as it would a local child's.
//!
//! Why a job per ready stage rather than the whole DAG up front with `--dependency=afterok`:
//! a stage's key includes the digests of its inputs' outputs, known only once they are made,
//! and a re-made input with the same bytes leaves everything downstream cached (early cutoff);
//! a job submitted up front could run a stage that turns out to be cached, and could not be
//! published by anyone. Submitting as inputs finish costs a scheduler round per stage, which
//! is small beside a stage worth a cluster.
//!
//! Only `sbatch`, `scontrol`, `sacct` and `scancel` are called: the contract is Slurm's commands.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

/// Where a pipeline's stages run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExecutorKind {
    /// Child processes of this nanoflow, on this machine.
    #[default]
    Local,
    /// One Slurm job per stage.
    Slurm,
}

impl ExecutorKind {
    pub const NAMES: &[&str] = &["local", "slurm"];

    pub fn parse(name: &str) -> Option<ExecutorKind> {
        match name {
            "local" => Some(ExecutorKind::Local),
            "slurm" => Some(ExecutorKind::Slurm),
            _ => None,
        }
    }
}

/// What a stage's job asks Slurm for: `resources:` at the top of pipeline.yaml (every stage's
/// defaults) and in a stage (its own), over the kind's defaults. Only the executor reads them: they
/// never enter a key.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// `--partition`
    pub partition: Option<String>,
    /// `--account`
    pub account: Option<String>,
    /// `--qos`
    pub qos: Option<String>,
    /// `--nodes`: a train stage on several nodes is one job, one task per node by default.
    pub nodes: Option<u32>,
    /// `--ntasks-per-node`: each task runs the stage (train: one machine of the world).
    pub tasks_per_node: Option<u32>,
    /// `--gpus-per-node`; a stage on a GPU asks for `gpus` of its params (1 for `auto`).
    pub gpus: Option<u32>,
    /// `--cpus-per-task`
    pub cpus: Option<u32>,
    /// `--mem` per node: `64G`, `500M`.
    pub mem: Option<String>,
    /// `--time`: `30`, `4:00:00`, `2-00:00:00`.
    pub time: Option<String>,
    /// Seconds before the job's end at which a stage that resumes (train, finetune) is told to
    /// write a checkpoint and stop (`--signal=USR1@…`); it is then submitted again and resumes.
    pub warn: Option<u32>,
    /// More `sbatch` options, as written: `["--constraint=a100", "--exclusive"]`.
    pub sbatch: Option<Vec<String>>,
}

/// The warning before a job's end that a resumable stage gets by default.
const DEFAULT_WARN: u32 = 300;

impl Resources {
    pub const KEYS: &[&str] =
        &["partition", "account", "qos", "nodes", "tasks_per_node", "gpus", "cpus", "mem", "time", "warn", "sbatch"];

    /// `value` read as resources, or the message of what is wrong with it.
    pub fn parse(value: &serde_yaml::Value) -> Result<Resources, (Option<String>, String)> {
        let plain = |error: serde_yaml::Error| crate::error::plain_message(&error.to_string());
        let mapping =
            value.as_mapping().ok_or((None, "expected a mapping: `{partition: gpu, gpus: 8}`".to_string()))?;
        // One key at a time, so that the error names it.
        for (key, value) in mapping {
            let name = key.as_str().unwrap_or_default();
            if !Self::KEYS.contains(&name) {
                let hint = crate::error::suggest(name, Self::KEYS.iter().copied())
                    .map(|key| format!(" (did you mean `{key}`?)"))
                    .unwrap_or_default();
                return Err((None, format!("unknown key `{name}`{hint}; known: {}", Self::KEYS.join(", "))));
            }
            let alone: serde_yaml::Mapping = [(key.clone(), value.clone())].into_iter().collect();
            serde_yaml::from_value::<Resources>(alone.into())
                .map_err(|error| (Some(name.to_string()), plain(error)))?;
        }
        let resources: Resources = serde_yaml::from_value(value.clone()).map_err(|error| (None, plain(error)))?;
        resources.check()?;
        Ok(resources)
    }

    fn check(&self) -> Result<(), (Option<String>, String)> {
        let fail = |key: &str, message: String| Err((Some(key.to_string()), message));
        for (key, value) in [("partition", &self.partition), ("account", &self.account), ("qos", &self.qos)] {
            if let Some(value) = value
                && (value.is_empty() || value.chars().any(|c| c.is_whitespace() || c == '#'))
            {
                return fail(key, format!("`{value}` is not a Slurm name"));
            }
        }
        for (key, value) in [("nodes", self.nodes), ("tasks_per_node", self.tasks_per_node), ("cpus", self.cpus)] {
            if value == Some(0) {
                return fail(key, "must be at least 1".to_string());
            }
        }
        if let Some(mem) = &self.mem {
            let digits = mem.trim_end_matches(['K', 'M', 'G', 'T']);
            if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) || mem.len() - digits.len() > 1 {
                return fail("mem", format!("`{mem}` is not a size: write it as `64G`, `500M`"));
            }
        }
        if let Some(time) = &self.time {
            let Some(seconds) = time_limit_seconds(time) else {
                return fail(
                    "time",
                    format!("`{time}` is not a Slurm time: write `30` (minutes), `4:00:00`, `2-00:00:00`"),
                );
            };
            if let Some(warn) = self.warn
                && u64::from(warn) >= seconds
            {
                return fail("warn", format!("{warn} s is not before the job's end ({time} is {seconds} s)"));
            }
        }
        for flag in self.sbatch.iter().flatten() {
            if !flag.starts_with('-') || flag.contains('\n') {
                return fail("sbatch", format!("`{flag}` is not an sbatch option (`--constraint=a100`)"));
            }
        }
        Ok(())
    }

    /// `over` on top of `self`: what `over` says wins.
    pub fn merged(&self, over: &Resources) -> Resources {
        Resources {
            partition: over.partition.clone().or_else(|| self.partition.clone()),
            account: over.account.clone().or_else(|| self.account.clone()),
            qos: over.qos.clone().or_else(|| self.qos.clone()),
            nodes: over.nodes.or(self.nodes),
            tasks_per_node: over.tasks_per_node.or(self.tasks_per_node),
            gpus: over.gpus.or(self.gpus),
            cpus: over.cpus.or(self.cpus),
            mem: over.mem.clone().or_else(|| self.mem.clone()),
            time: over.time.clone().or_else(|| self.time.clone()),
            warn: over.warn.or(self.warn),
            sbatch: match (&self.sbatch, &over.sbatch) {
                (Some(base), Some(more)) => Some(base.iter().chain(more).cloned().collect()),
                (base, more) => more.clone().or_else(|| base.clone()),
            },
        }
    }

    /// A kind's defaults, from its params: a stage on a GPU (`device` not `cpu`) asks for its
    /// `gpus` (1 for `auto`), one task per node; a stage that resumes is warned before its end.
    pub fn defaults(params: &serde_json::Value, resumable: bool) -> Resources {
        let device = params.get("device").and_then(|device| device.as_str());
        let gpus = match device {
            Some("cpu") | None => None,
            Some(_) => Some(params.get("gpus").and_then(serde_json::Value::as_u64).unwrap_or(1) as u32),
        };
        Resources { gpus, warn: resumable.then_some(DEFAULT_WARN), ..Resources::default() }
    }

    /// The `#SBATCH` lines.
    fn directives(&self) -> Vec<String> {
        let mut lines = Vec::new();
        let mut add = |flag: &str, value: Option<String>| {
            if let Some(value) = value {
                lines.push(format!("--{flag}={value}"));
            }
        };
        add("partition", self.partition.clone());
        add("account", self.account.clone());
        add("qos", self.qos.clone());
        add("nodes", Some(self.nodes.unwrap_or(1).to_string()));
        add("ntasks-per-node", Some(self.tasks_per_node.unwrap_or(1).to_string()));
        add("gpus-per-node", self.gpus.filter(|&gpus| gpus > 0).map(|gpus| gpus.to_string()));
        add("cpus-per-task", self.cpus.map(|cpus| cpus.to_string()));
        add("mem", self.mem.clone());
        add("time", self.time.clone());
        add("signal", self.warn.map(|seconds| format!("USR1@{seconds}")));
        lines.extend(self.sbatch.iter().flatten().cloned());
        lines
    }
}

/// Seconds in a Slurm time limit: `M`, `M:S`, `H:M:S`, `D-H`, `D-H:M`, `D-H:M:S`.
fn time_limit_seconds(time: &str) -> Option<u64> {
    let number = |text: &str| text.parse::<u64>().ok();
    let (days, rest) = match time.split_once('-') {
        Some((days, rest)) => (number(days)?, Some(rest)),
        None => (0, None),
    };
    let parts: Vec<u64> = rest.unwrap_or(time).split(':').map(number).collect::<Option<_>>()?;
    let seconds = match (rest.is_some(), parts.as_slice()) {
        (false, [minutes]) => minutes * 60,
        (false, [minutes, seconds]) => minutes * 60 + seconds,
        (_, [hours, minutes, seconds]) => hours * 3600 + minutes * 60 + seconds,
        (true, [hours]) => hours * 3600,
        (true, [hours, minutes]) => hours * 3600 + minutes * 60,
        _ => return None,
    };
    Some(days * 86400 + seconds)
}

/// The files of one stage's job, in the stage's partial directory (`job/`): the spec its tasks
/// read, the batch script, and Slurm's output file.
pub struct JobFiles {
    pub dir: PathBuf,
}

impl JobFiles {
    pub fn new(partial: &Path) -> JobFiles {
        JobFiles { dir: partial.join("job") }
    }

    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }

    pub fn script(&self) -> PathBuf {
        self.dir.join("job.sh")
    }

    /// Where Slurm writes the job's stdout and stderr.
    pub fn output(&self, job: &str) -> PathBuf {
        self.dir.join(format!("slurm-{job}.out"))
    }

    /// The id of the job running the stage now, for `status`.
    pub fn current(&self) -> PathBuf {
        self.dir.join("job-id")
    }

    /// The job an earlier nanoflow submitted for this partial directory and never saw end (it was
    /// killed, or its login dropped), when that job is worth taking up rather than submitting
    /// the stage anew: Slurm still runs it (it is followed), or it ended meanwhile with the
    /// stage done (its output is published, no new job) or stopped with a checkpoint (submitted
    /// again, it resumes). A job that failed or that Slurm forgot is not taken up: the stage runs.
    pub fn earlier_job(&self) -> Option<(String, JobState)> {
        let id = fs_err::read_to_string(self.current()).ok()?.trim().to_string();
        let state = Slurm::state(&id)?;
        (!state.is_final() || state.succeeded() || state.stopped_to_resume()).then_some((id, state))
    }

    /// The batch script: resources as `#SBATCH` lines, then every task runs the stage.
    pub fn write_script(&self, stage: &str, resources: &Resources) -> std::io::Result<()> {
        let exe = std::env::current_exe()?;
        let mut script =
            String::from("#!/bin/bash\n# Written by nanoflow for one run of a stage; `sbatch` it to run again.\n");
        script += &format!("#SBATCH --job-name={}\n", shell_word(&format!("nanoflow:{stage}")));
        script += &format!("#SBATCH --output={}\n", self.dir.join("slurm-%j.out").display());
        script += "#SBATCH --open-mode=append\n";
        // Preempted or on a failed node, the job goes back to the queue (and resumes).
        script += "#SBATCH --requeue\n";
        for directive in resources.directives() {
            script += &format!("#SBATCH {directive}\n");
        }
        script += &format!(
            "export {progress}=1 {shared}=1 RUST_BACKTRACE=0\n\
             # rank 0 of a train stage listens here: one port per job, so jobs on one node do not meet\n\
             export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))\n\
             exec srun --kill-on-bad-exit=1{cpus} {exe} __stage --spec {spec}\n",
            progress = nanoflow_stages::progress::ENV,
            shared = nanoflow_stages::gpt::dist::SHARED_OUT,
            cpus = resources.cpus.map(|cpus| format!(" --cpus-per-task={cpus}")).unwrap_or_default(),
            exe = shell_word(&exe.display().to_string()),
            spec = shell_word(&self.spec().display().to_string()),
        );
        fs_err::create_dir_all(&self.dir)?;
        crate::atomic::write_atomic(&self.script(), script.as_bytes())
    }
}

/// `text` quoted for bash when it needs it.
pub fn shell_word(text: &str) -> String {
    if text.chars().all(|c| c.is_ascii_alphanumeric() || "/._-:+=,@%".contains(c)) {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Where a job stands, in Slurm's words (`JobState`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    pub state: String,
    /// The exit code of the batch script, once it ended.
    pub exit_code: Option<i32>,
    /// Why it waits (`Resources`, `Priority`), where it runs.
    pub reason: Option<String>,
    pub nodes: Option<String>,
}

impl JobState {
    /// Ended, one way or another: Slurm will not run it again by itself.
    pub fn is_final(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "REQUEUED"
                | "REQUEUE_FED"
                | "REQUEUE_HOLD"
                | "RESIZING"
                | "SUSPENDED"
                | "STAGE_OUT"
                | "SIGNALING"
                | "STOPPED"
                | "RESV_DEL_HOLD"
        )
    }

    /// Ended with the stage done: its output is complete.
    pub fn succeeded(&self) -> bool {
        self.state == "COMPLETED" && self.exit_code == Some(0)
    }

    /// Ended before the stage's end with a checkpoint (a time limit's warning, a preemption):
    /// submitted again, the stage resumes.
    pub fn stopped_to_resume(&self) -> bool {
        let checkpointed = self.exit_code == Some(i32::from(nanoflow_stages::interrupt::CHECKPOINTED));
        (checkpointed && self.state != "CANCELLED") || self.state == "PREEMPTED"
    }

    /// One line for people: `RUNNING on node1`, `PENDING (Resources)`.
    pub fn describe(&self) -> String {
        let mut line = self.state.clone();
        if let Some(nodes) = self.nodes.as_ref().filter(|_| self.state == "RUNNING") {
            line += &format!(" on {nodes}");
        }
        if let Some(reason) = self.reason.as_ref().filter(|_| self.state == "PENDING") {
            line += &format!(" ({reason})");
        }
        line
    }
}

/// Calls to Slurm's commands.
pub struct Slurm;

impl Slurm {
    /// Fails with what to do when `sbatch` is not on PATH.
    pub fn check_installed() -> Result<(), String> {
        match Command::new("sbatch").arg("--version").output() {
            Ok(output) if output.status.success() => Ok(()),
            Ok(output) => Err(format!("`sbatch --version` failed: {}", String::from_utf8_lossy(&output.stderr).trim())),
            Err(_) => {
                Err("`sbatch` is not on PATH: run nanoflow on a machine that submits Slurm jobs (a login node), \
                           or start a one-machine Slurm with `scripts/slurm-up`"
                    .to_string())
            }
        }
    }

    /// Submits `script`; the job id, or Slurm's reason for refusing it.
    pub fn submit(script: &Path) -> Result<String, String> {
        let output = Command::new("sbatch")
            .arg("--parsable")
            .arg(script)
            .output()
            .map_err(|error| format!("could not run `sbatch`: {error}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            let message = stderr.trim().trim_start_matches("sbatch: error: ");
            return Err(format!("Slurm refused the job: {}", message.replace("\nsbatch: error: ", "; ")));
        }
        // `--parsable` prints `id` or `id;cluster`.
        let id = stdout.trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
            return Err(format!("`sbatch --parsable` printed `{}`, not a job id", stdout.trim()));
        }
        Ok(id)
    }

    /// Where job `id` stands: `scontrol` while slurmctld remembers it, else `sacct`; `None` when
    /// neither knows it.
    pub fn state(id: &str) -> Option<JobState> {
        let output = Command::new("scontrol").args(["show", "job", "--oneliner", id]).output().ok()?;
        if output.status.success() {
            let text = String::from_utf8_lossy(&output.stdout);
            if let Some(state) = parse_scontrol(&text) {
                return Some(state);
            }
        }
        // The accounting database; on a cluster without one, the job completion log
        // (`JobCompType=jobcomp/filetxt`, `sacct --completion`), one line per run of the job.
        for completion in [false, true] {
            let mut sacct = Command::new("sacct");
            sacct.args([
                "--noheader",
                "--parsable2",
                "--allocations",
                "--format=State,ExitCode,NodeList",
                "--jobs",
                id,
            ]);
            if completion {
                sacct.arg("--completion");
            }
            let output = sacct.output().ok()?;
            if let Some(state) = parse_sacct(&String::from_utf8_lossy(&output.stdout)) {
                return Some(state);
            }
        }
        None
    }

    /// `scancel`: Slurm sends SIGTERM to the job's tasks (a train stage checkpoints), then
    /// SIGKILL after its `KillWait`.
    pub fn cancel(id: &str) {
        let _ = Command::new("scancel").arg(id).output();
    }
}

/// `scontrol show job --oneliner`'s `JobState=… Reason=… ExitCode=2:0 … NodeList=…`.
fn parse_scontrol(text: &str) -> Option<JobState> {
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
            .filter(|value| !value.is_empty() && *value != "(null)" && *value != "None")
            .map(str::to_string)
    };
    let state = field("JobState")?;
    let exit_code = field("ExitCode").and_then(|code| code.split(':').next()?.parse().ok());
    let ended = !matches!(state.as_str(), "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING");
    Some(JobState { exit_code: exit_code.filter(|_| ended), reason: field("Reason"), nodes: field("NodeList"), state })
}

/// `sacct --parsable2 --allocations --format=State,ExitCode,NodeList`: `CANCELLED by 0|0:15|node1`;
/// the last line is the job's last run.
fn parse_sacct(text: &str) -> Option<JobState> {
    let line = text.lines().rfind(|line| !line.trim().is_empty())?;
    let mut fields = line.split('|');
    let state = fields.next()?.split_whitespace().next()?.to_string();
    let exit_code = fields.next().and_then(|code| code.split(':').next()?.parse().ok());
    let nodes = fields.next().map(str::to_string).filter(|nodes| !nodes.is_empty() && nodes != "None assigned");
    Some(JobState { state, exit_code, reason: None, nodes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_slurm_time_limits() {
        assert_eq!(time_limit_seconds("30"), Some(1800));
        assert_eq!(time_limit_seconds("30:15"), Some(1815));
        assert_eq!(time_limit_seconds("4:00:00"), Some(14400));
        assert_eq!(time_limit_seconds("2-00:00:00"), Some(172_800));
        assert_eq!(time_limit_seconds("1-12"), Some(129_600));
        assert_eq!(time_limit_seconds("1-0:30"), Some(88_200));
        assert_eq!(time_limit_seconds("four hours"), None);
        assert_eq!(time_limit_seconds("1:2:3:4"), None);
    }

    #[test]
    fn checks_resources_naming_the_key() {
        let parse = |yaml: &str| Resources::parse(&serde_yaml::from_str(yaml).unwrap());
        assert_eq!(parse("{partition: gpu, gpus: 8, nodes: 2, time: '2-00:00:00'}").unwrap().gpus, Some(8));
        assert_eq!(parse("{mem: 64GB}").unwrap_err().0.as_deref(), Some("mem"));
        assert_eq!(parse("{time: soon}").unwrap_err().0.as_deref(), Some("time"));
        assert_eq!(parse("{time: '10', warn: 600}").unwrap_err().0.as_deref(), Some("warn"));
        assert_eq!(parse("{nodes: 0}").unwrap_err().0.as_deref(), Some("nodes"));
        assert_eq!(parse("{sbatch: [exclusive]}").unwrap_err().0.as_deref(), Some("sbatch"));
        let (key, message) = parse("{gpu: 8}").unwrap_err();
        assert!(message.contains("unknown key `gpu` (did you mean `gpus`?)"), "{key:?} {message}");
        let (key, _) = parse("{gpus: eight}").unwrap_err();
        assert_eq!(key.as_deref(), Some("gpus"));
    }

    #[test]
    fn stage_resources_win_over_the_pipelines_and_the_kinds() {
        let kind = Resources::defaults(&serde_json::json!({"device": "auto", "gpus": 8}), true);
        assert_eq!((kind.gpus, kind.warn), (Some(8), Some(DEFAULT_WARN)));
        let cpu = Resources::defaults(&serde_json::json!({"device": "cpu", "gpus": 2}), true);
        assert_eq!(cpu.gpus, None);
        let top = Resources {
            partition: Some("batch".into()),
            sbatch: Some(vec!["--exclusive".into()]),
            ..Default::default()
        };
        let stage = Resources { gpus: Some(4), sbatch: Some(vec!["--constraint=a100".into()]), ..Default::default() };
        let resources = kind.merged(&top).merged(&stage);
        assert_eq!(resources.partition.as_deref(), Some("batch"));
        assert_eq!(resources.gpus, Some(4));
        assert_eq!(
            resources.directives(),
            [
                "--partition=batch",
                "--nodes=1",
                "--ntasks-per-node=1",
                "--gpus-per-node=4",
                "--signal=USR1@300",
                "--exclusive",
                "--constraint=a100"
            ]
        );
    }

    #[test]
    fn reads_job_states() {
        let running = "JobId=12 JobName=nanoflow:ci-model UserId=root(0) JobState=RUNNING Reason=None \
                       ExitCode=0:0 NodeList=node1 BatchHost=node1";
        let state = parse_scontrol(running).unwrap();
        assert_eq!(
            (state.state.as_str(), state.exit_code, state.describe()),
            ("RUNNING", None, "RUNNING on node1".into())
        );
        let pending = "JobId=13 JobState=PENDING Reason=Resources Dependency=(null) ExitCode=0:0 NodeList=(null)";
        assert_eq!(parse_scontrol(pending).unwrap().describe(), "PENDING (Resources)");
        let failed = parse_scontrol("JobId=14 JobState=FAILED Reason=NonZeroExitCode ExitCode=75:0").unwrap();
        assert_eq!((failed.exit_code, failed.is_final()), (Some(75), true));
        let cancelled = parse_sacct("CANCELLED by 0|0:15|node1\n").unwrap();
        assert_eq!((cancelled.state.as_str(), cancelled.exit_code), ("CANCELLED", Some(0)));
        assert!(parse_sacct("").is_none());
    }
}
