//! All of nanoflow's own terminal output goes through here: data on stdout, status on stderr,
//! `-q` and `-v`, and colour only on a terminal without `NO_COLOR` (uv's manners). Lines from
//! several stage processes arrive on several threads; a lock keeps each line whole.
//!
//! Stages' progress (see `nanoflow_stages::progress`) is drawn here: on a terminal one live
//! bar per running stage (indicatif), below the lines, which print above the bars; elsewhere a
//! plain line every few seconds.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle, TermLike};
use nanoflow_stages::progress::{PLAIN_EVERY, Unit, Update};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verbosity {
    Quiet,
    Normal,
    Verbose,
}

#[derive(Debug, Clone, Copy)]
pub enum Style {
    Dim,
    Green,
    Yellow,
    Red,
    Cyan,
}

#[derive(Debug)]
pub struct Printer {
    pub verbosity: Verbosity,
    color: bool,
    lock: Mutex<()>,
    /// The live bars, on a terminal.
    live: Option<MultiProgress>,
    /// Per stage: its bar and the label it shows, or (without bars) when its label's work
    /// started and when a plain line was last printed.
    progress: Mutex<HashMap<String, Shown>>,
    /// Where lines go under the bars: stderr, or a test's in-memory terminal.
    lines: Option<Box<dyn TermLike>>,
}

#[derive(Debug)]
enum Shown {
    Bar { bar: ProgressBar, label: String },
    Plain { label: String, last: Instant },
}

impl Printer {
    pub fn new(verbosity: Verbosity) -> Printer {
        let terminal = std::io::stderr().is_terminal();
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
        let dumb = std::env::var_os("TERM").is_some_and(|term| term == "dumb");
        let live = (terminal && !dumb && verbosity >= Verbosity::Normal)
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10)));
        Printer::with_bars(verbosity, !no_color && terminal, live)
    }

    fn with_bars(verbosity: Verbosity, color: bool, live: Option<MultiProgress>) -> Printer {
        Printer { verbosity, color, lock: Mutex::new(()), live, progress: Mutex::new(HashMap::new()), lines: None }
    }

    pub fn paint(&self, style: Style, text: &str) -> String {
        let code = match style {
            Style::Dim => "2",
            Style::Green => "32",
            Style::Yellow => "33",
            Style::Red => "31",
            Style::Cyan => "36",
        };
        if self.color { format!("\x1b[{code}m{text}\x1b[0m") } else { text.to_string() }
    }

    /// A status line (stderr), hidden by `-q`.
    pub fn status(&self, line: &str) {
        if self.verbosity >= Verbosity::Normal {
            self.stderr(line);
        }
    }

    /// Detail shown with `-v` only.
    pub fn verbose(&self, line: &str) {
        if self.verbosity >= Verbosity::Verbose {
            self.stderr(line);
        }
    }

    /// A line a stage printed, prefixed with its name; hidden by `-q` (it is still in log.txt).
    pub fn stage_line(&self, stage: &str, line: &str) {
        if self.verbosity >= Verbosity::Normal {
            let prefix = self.paint(Style::Dim, &format!("[{stage}]"));
            self.stderr(&format!("{prefix} {line}"));
        }
    }

    /// A line a live bar stands in for (nanoGPT's `iter N: …`): shown with `-v`, or where no
    /// bar is drawn.
    pub fn stage_detail(&self, stage: &str, line: &str) {
        if self.verbosity >= Verbosity::Verbose || (self.live.is_none() && self.verbosity >= Verbosity::Normal) {
            let prefix = self.paint(Style::Dim, &format!("[{stage}]"));
            self.stderr(&format!("{prefix} {line}"));
        }
    }

    /// A stage's progress: its bar moves, or a plain line is printed now and then.
    pub fn progress(&self, stage: &str, update: &Update) {
        if self.verbosity == Verbosity::Quiet {
            return;
        }
        let mut shown = self.progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(live) = &self.live else {
            let fresh = match shown.get(stage) {
                Some(Shown::Plain { label, .. }) => label != &update.label,
                _ => true,
            };
            if fresh {
                let last = Instant::now();
                shown.insert(stage.to_string(), Shown::Plain { label: update.label.clone(), last });
            }
            let Some(Shown::Plain { last, .. }) = shown.get_mut(stage) else { return };
            if update.unit != Unit::Iters && (update.finished || last.elapsed() >= PLAIN_EVERY) {
                *last = Instant::now();
                drop(shown);
                self.stage_line(stage, &update.plain());
            }
            return;
        };
        let fresh = match shown.get(stage) {
            Some(Shown::Bar { label, .. }) => label != &update.label,
            _ => true,
        };
        if fresh {
            let bar = ProgressBar::new(update.total.unwrap_or(0))
                .with_style(bar_style(update, self.color))
                .with_prefix(format!("[{stage}]"))
                .with_position(update.done);
            bar.reset_eta();
            let bar = match shown.remove(stage) {
                Some(Shown::Bar { bar: old, .. }) => {
                    // The stage's next piece of work takes the old bar's place.
                    let bar = live.insert_after(&old, bar);
                    old.finish_and_clear();
                    live.remove(&old);
                    bar
                }
                _ => live.add(bar),
            };
            shown.insert(stage.to_string(), Shown::Bar { bar, label: update.label.clone() });
        }
        let Some(Shown::Bar { bar, .. }) = shown.get(stage) else { return };
        if let Some(total) = update.total {
            bar.set_length(total);
        }
        bar.set_position(update.done);
        let message = match update.unit {
            Unit::Iters => update.message.clone(),
            _ if update.message.is_empty() => update.label.clone(),
            _ => format!("{}: {}", update.label, update.message),
        };
        bar.set_message(message);
    }

    /// A stage's process ended: its bar goes.
    pub fn end_progress(&self, stage: &str) {
        let mut shown = self.progress.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let (Some(Shown::Bar { bar, .. }), Some(live)) = (shown.remove(stage), &self.live) {
            bar.finish_and_clear();
            live.remove(&bar);
        }
    }

    /// A warning or failure: shown even with `-q`.
    pub fn error(&self, line: &str) {
        self.stderr(line);
    }

    /// Data: what a command is asked for (`status`, `ls`, `show`), on stdout.
    pub fn data(&self, line: &str) {
        let _guard = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
    }

    fn stderr(&self, line: &str) {
        let _guard = self.lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match &self.live {
            // Printed above the bars, which are drawn again below it. A line of its own with a
            // real newline (indicatif's `println` pads lines to the width instead, so a `script`
            // or asciinema log of a run was one line, and a widened terminal joined them).
            Some(live) => live.suspend(|| match &self.lines {
                Some(term) => {
                    let _ = term.write_line(line);
                }
                None => {
                    let _ = writeln!(std::io::stderr().lock(), "{line}");
                }
            }),
            None => {
                let _ = writeln!(std::io::stderr().lock(), "{line}");
            }
        }
    }
}

/// How a bar looks: counts as the unit reads, the rate and what is left.
fn bar_style(update: &Update, color: bool) -> ProgressStyle {
    let prefix = if color { "{prefix:.dim}" } else { "{prefix}" };
    let bar = if color { "[{bar:24.cyan/blue}]" } else { "[{bar:24}]" };
    let template = match (update.unit, update.total.is_some()) {
        (Unit::Iters, _) => format!("{prefix} {bar} iter {{pos}}/{{len}}  {{msg}}  {{elapsed}} elapsed, ETA {{eta}}"),
        (Unit::Bytes, true) => format!(
            "{prefix} {{msg}} {bar} {{binary_bytes}}/{{binary_total_bytes}}, {{binary_bytes_per_sec}}, ETA {{eta}}"
        ),
        (Unit::Bytes, false) => format!("{prefix} {{spinner}} {{msg}} {{binary_bytes}}, {{binary_bytes_per_sec}}"),
        (Unit::Items, true) => format!("{prefix} {{msg}} {bar} {{pos}}/{{len}}, {{per_sec}}, ETA {{eta}}"),
        (Unit::Items, false) => format!("{prefix} {{spinner}} {{msg}} {{pos}}, {{per_sec}}"),
    };
    ProgressStyle::with_template(&template).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
}

/// A path relative to the current directory when it is under it, as people want to read it.
pub fn show_path(path: &Path) -> PathBuf {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::InMemoryTerm;

    fn update(label: &str, unit: Unit, done: u64, total: Option<u64>, message: &str) -> Update {
        Update { label: label.into(), unit, done, total, elapsed: 1.0, message: message.into(), finished: false }
    }

    #[test]
    fn a_terminal_gets_one_live_bar_per_stage_under_the_lines() {
        let term = InMemoryTerm::new(10, 120);
        let live = MultiProgress::with_draw_target(ProgressDrawTarget::term_like(Box::new(term.clone())));
        let printer =
            Printer { lines: Some(Box::new(term.clone())), ..Printer::with_bars(Verbosity::Normal, false, Some(live)) };
        printer.progress("model", &update("train", Unit::Iters, 120, Some(2000), "loss 2.3100, 8.1k tokens/s"));
        printer.progress("text", &update("input.txt", Unit::Bytes, 1536, Some(3072), ""));
        printer.stage_line("model", "step 250: train loss 1.9000, val loss 2.0000");
        printer.stage_detail("model", "iter 120: loss 2.3100, time 95.00ms");
        let screen = term.contents();
        let lines: Vec<&str> = screen.lines().collect();
        assert_eq!(lines[0], "[model] step 250: train loss 1.9000, val loss 2.0000", "{screen}");
        assert!(lines[1].starts_with("[model] [=>"), "{screen}");
        assert!(lines[1].contains("iter 120/2000  loss 2.3100, 8.1k tokens/s  "), "{screen}");
        assert!(lines[1].contains(" elapsed, ETA "), "{screen}");
        assert!(lines[2].starts_with("[text] input.txt [") && lines[2].contains("1.50 KiB/3.00 KiB"), "{screen}");
        assert!(!screen.contains("iter 120: loss"), "a bar stands in for the iteration lines:\n{screen}");

        // A stage whose process ended loses its bar; the next piece of work replaces a bar.
        printer.end_progress("model");
        printer.progress("text", &update("chars", Unit::Items, 3, Some(10), ""));
        let screen = term.contents();
        assert!(!screen.contains("iter 120/2000"), "{screen}");
        assert!(screen.contains("[text] chars [") && screen.contains("3/10"), "{screen}");
        assert!(!screen.contains("input.txt"), "{screen}");
    }

    #[test]
    fn without_a_terminal_the_iteration_lines_are_shown_and_progress_is_a_line_now_and_then() {
        let printer = Printer::with_bars(Verbosity::Normal, false, None);
        // Nothing to see in a test but that it does not panic or draw: lines go to stderr.
        printer.progress("text", &update("input.txt", Unit::Bytes, 1, Some(2), ""));
        let shown = printer.progress.lock().unwrap();
        assert!(matches!(shown.get("text"), Some(Shown::Plain { label, .. }) if label == "input.txt"));
    }
}
