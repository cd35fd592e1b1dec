//! Progress of long work (downloads, tokenizing, evaluations, training), in one style.
//!
//! A stage process does not draw anything itself: its stderr is a pipe to the engine, which
//! runs several stages at once. It sends updates as marked lines (`Update::line`) that the
//! engine turns into one live bar per running stage on a terminal, and into a plain line every
//! few seconds elsewhere (a CI log). Lines a live bar stands in for (nanoGPT's `iter N: …`) are
//! sent as `detail` lines: always in `log.txt`, on the terminal only with `-v` or without a bar.
//! Outside the engine (`nanoflow sample` fetching a Hub model) the same calls print plain lines.

use std::io::Write;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How often a plain progress line is printed.
pub const PLAIN_EVERY: Duration = Duration::from_secs(2);
/// How often an update is sent to the engine (its bar redraws at this pace at most).
const SEND_EVERY: Duration = Duration::from_millis(100);
/// Set by the engine for the processes of a stage: progress goes out as marked lines.
pub const ENV: &str = "NANOFLOW_PROGRESS";
const UPDATE: &str = "::nanoflow-progress::";
const DETAIL: &str = "::nanoflow-detail::";
const VERBOSE: &str = "::nanoflow-verbose::";

/// What a count means, for printing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Bytes,
    Items,
    /// Training iterations: the `iter N` detail lines already say how fast, so no plain line.
    Iters,
}

/// Where a piece of long work is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub label: String,
    pub unit: Unit,
    pub done: u64,
    pub total: Option<u64>,
    /// Seconds since the work started.
    pub elapsed: f64,
    /// A short state shown after the counts, e.g. `loss 2.3100, 8.1k tokens/s`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default)]
    pub finished: bool,
}

impl Update {
    /// The marked line a stage process sends.
    pub fn line(&self) -> String {
        format!("{UPDATE}{}", serde_json::to_string(self).unwrap_or_default())
    }

    /// `label: 1.5 MiB / 3.0 MiB (50%), 1.2 MiB/s`: the line shown where no bar is drawn.
    pub fn plain(&self) -> String {
        let rate = self.done as f64 / self.elapsed.max(1e-9);
        let mut line = match self.total {
            Some(total) if total > 0 => format!(
                "{}: {} / {} ({:.0}%), {}/s",
                self.label,
                self.unit.format(self.done as f64),
                self.unit.format(total as f64),
                100.0 * self.done as f64 / total as f64,
                self.unit.format(rate)
            ),
            _ => format!("{}: {}, {}/s", self.label, self.unit.format(self.done as f64), self.unit.format(rate)),
        };
        if !self.message.is_empty() {
            line += &format!(", {}", self.message);
        }
        line
    }
}

impl Unit {
    pub fn format(self, n: f64) -> String {
        match self {
            Unit::Bytes => format_bytes(n),
            Unit::Items | Unit::Iters => format_count(n),
        }
    }
}

/// A line a stage process wrote, as the engine reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum Line<'a> {
    Update(Update),
    /// A log line a live bar stands in for.
    Detail(&'a str),
    /// A log line for `log.txt` and `-v` only (the resolved config, checkpoint paths).
    Verbose(&'a str),
    Text(&'a str),
}

pub fn parse(line: &str) -> Line<'_> {
    if let Some(json) = line.strip_prefix(UPDATE)
        && let Ok(update) = serde_json::from_str(json)
    {
        return Line::Update(update);
    }
    if let Some(verbose) = line.strip_prefix(VERBOSE) {
        return Line::Verbose(verbose);
    }
    match line.strip_prefix(DETAIL) {
        Some(detail) => Line::Detail(detail),
        None => Line::Text(line),
    }
}

/// Whether this process reports to the engine (set once, from the environment).
fn to_engine() -> bool {
    static TO_ENGINE: OnceLock<bool> = OnceLock::new();
    *TO_ENGINE.get_or_init(|| std::env::var_os(ENV).is_some_and(|value| value == "1"))
}

/// Writes a log line that a live progress bar stands in for (see the module's notes).
pub fn detail(line: &str) {
    let mark = if to_engine() { DETAIL } else { "" };
    let _ = writeln!(std::io::stderr().lock(), "{mark}{line}");
}

/// A line for the stage's `log.txt`, shown on screen only with `-v`: what a reader of the log
/// wants and a person watching the run does not (the resolved config, where checkpoints go).
pub fn verbose(line: &str) {
    let mark = if to_engine() { VERBOSE } else { "" };
    let _ = writeln!(std::io::stderr().lock(), "{mark}{line}");
}

/// Counts work done out of an optional total and reports it (see the module's notes).
pub struct Progress {
    update: Update,
    started: Instant,
    last_sent: Option<Instant>,
}

impl Progress {
    pub fn new(label: impl Into<String>, unit: Unit, total: Option<u64>) -> Progress {
        let update =
            Update { label: label.into(), unit, done: 0, total, elapsed: 0.0, message: String::new(), finished: false };
        Progress { update, started: Instant::now(), last_sent: None }
    }

    pub fn set_total(&mut self, total: Option<u64>) {
        self.update.total = total;
    }

    /// Sets the count (for work resumed part-way, or counted elsewhere) and reports it.
    pub fn set_done(&mut self, done: u64) {
        self.update.done = done;
        self.report(false);
    }

    pub fn set_message(&mut self, message: impl Into<String>) {
        self.update.message = message.into();
    }

    pub fn inc(&mut self, n: u64) {
        self.update.done += n;
        self.report(false);
    }

    /// Reports the final count.
    pub fn finish(&mut self) {
        self.update.finished = true;
        self.report(true);
    }

    fn report(&mut self, now: bool) {
        let every = if to_engine() { SEND_EVERY } else { PLAIN_EVERY };
        // The engine gets the first update at once; a plain line waits its first two seconds.
        let due = self.last_sent.map_or(to_engine(), |last| last.elapsed() >= every);
        if !(now || due) {
            self.last_sent.get_or_insert(self.started);
            return;
        }
        self.last_sent = Some(Instant::now());
        self.update.elapsed = self.started.elapsed().as_secs_f64();
        let line = match to_engine() {
            true => self.update.line(),
            false if self.update.unit == Unit::Iters => return,
            false => self.update.plain(),
        };
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
}

/// `1536.0` -> `1.5 KiB`.
pub fn format_bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{value:.0} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

/// `1234567.0` -> `1.23M`.
pub fn format_count(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2}G", n / 1e9),
        n if n >= 1e6 => format!("{:.2}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}k", n / 1e3),
        n => format!("{n:.0}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_bytes_and_counts() {
        assert_eq!(format_bytes(512.0), "512 B");
        assert_eq!(format_bytes(1536.0), "1.5 KiB");
        assert_eq!(format_bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(format_count(999.0), "999");
        assert_eq!(format_count(1_003_854.0), "1.00M");
    }

    #[test]
    fn an_update_survives_its_line_and_reads_plainly() {
        let update = Update {
            label: "input.txt".into(),
            unit: Unit::Bytes,
            done: 1536,
            total: Some(3072),
            elapsed: 2.0,
            message: String::new(),
            finished: false,
        };
        assert_eq!(parse(&update.line()), Line::Update(update.clone()));
        assert_eq!(update.plain(), "input.txt: 1.5 KiB / 3.0 KiB (50%), 768 B/s");
        let open_ended = Update { total: None, unit: Unit::Items, done: 2000, message: "loss 2.3".into(), ..update };
        assert_eq!(open_ended.plain(), "input.txt: 2.0k, 1.0k/s, loss 2.3");
        assert_eq!(parse("::nanoflow-detail::iter 1: loss 4.2"), Line::Detail("iter 1: loss 4.2"));
        assert_eq!(parse("step 0: train loss 4.2"), Line::Text("step 0: train loss 4.2"));
        assert_eq!(parse("::nanoflow-verbose::n_layer: 4"), Line::Verbose("n_layer: 4"));
        // A marked line that does not parse is shown as it is, not lost.
        assert_eq!(parse("::nanoflow-progress::{"), Line::Text("::nanoflow-progress::{"));
    }
}
