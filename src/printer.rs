//! All of nanoflow's own terminal output goes through here: data on stdout, status on stderr,
//! `-q` and `-v`, and colour only on a terminal without `NO_COLOR` (uv's manners). Lines from
//! several stage processes arrive on several threads; a lock keeps each line whole.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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
}

impl Printer {
    pub fn new(verbosity: Verbosity) -> Printer {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
        Printer { verbosity, color: !no_color && std::io::stderr().is_terminal(), lock: Mutex::new(()) }
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
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }
}

/// A path relative to the current directory when it is under it, as people want to read it.
pub fn show_path(path: &Path) -> PathBuf {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
}
