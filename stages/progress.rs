//! Progress for long stages. A stage's stderr is a pipe that the engine prefixes with
//! `[stage]`, so progress is a line now and then (every two seconds at most), not a redrawn bar.

use std::io::Write;
use std::time::{Duration, Instant};

const EVERY: Duration = Duration::from_secs(2);

/// Counts work done out of an optional total and prints `label: done/total (pct%), rate` lines.
pub struct Progress {
    label: String,
    unit: Unit,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_print: Instant,
}

/// What a count means, for printing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Bytes,
    Items,
}

impl Progress {
    pub fn new(label: impl Into<String>, unit: Unit, total: Option<u64>) -> Progress {
        let now = Instant::now();
        Progress { label: label.into(), unit, total, done: 0, started: now, last_print: now }
    }

    pub fn set_total(&mut self, total: Option<u64>) {
        self.total = total;
    }

    /// Sets the count (for work resumed part-way) without printing.
    pub fn set_done(&mut self, done: u64) {
        self.done = done;
    }

    pub fn inc(&mut self, n: u64) {
        self.done += n;
        if self.last_print.elapsed() >= EVERY {
            self.print();
        }
    }

    /// Prints the final line.
    pub fn finish(&mut self) {
        self.print();
    }

    fn print(&mut self) {
        self.last_print = Instant::now();
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        let rate = self.done as f64 / seconds;
        let line = match self.total {
            Some(total) if total > 0 => format!(
                "{}: {} / {} ({:.0}%), {}/s",
                self.label,
                self.format(self.done as f64),
                self.format(total as f64),
                100.0 * self.done as f64 / total as f64,
                self.format(rate)
            ),
            _ => format!("{}: {}, {}/s", self.label, self.format(self.done as f64), self.format(rate)),
        };
        let _ = writeln!(std::io::stderr(), "{line}");
    }

    fn format(&self, n: f64) -> String {
        match self.unit {
            Unit::Bytes => format_bytes(n),
            Unit::Items => format_count(n),
        }
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
}
