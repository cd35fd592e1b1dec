//! `nanoflow report NAME...`: a report card of the current outputs of NAME and everything
//! upstream of it (nanochat's report.md, DVC's metrics and plots in one page). One document is
//! built and written twice: `report.md` with its PNG plots beside it, and `report.html`, one
//! self-contained page (plots inlined) to open in a browser or attach to an issue.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::Engine as _;
use nanoflow_stages::formats::metrics::{self, Axis};
use nanoflow_stages::formats::plot;

use crate::error::Error;
use crate::manifest::{Manifest, OUT};
use crate::plan::Plan;
use crate::printer::{Printer, show_path};
use crate::stage_kind::StageKind;
use crate::store::Store;

/// Lines of samples shown per sample stage.
const SAMPLE_LINES: usize = 16;

/// A piece of the document.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Heading(usize, String),
    Paragraph(String),
    /// Header, then rows.
    Table(Vec<String>, Vec<Vec<String>>),
    /// A PNG beside the report: its file name and what it shows.
    Image {
        file: String,
        alt: String,
    },
    Code(String),
}

/// Writes the report for `names` into `dir` (default `reports/NAME`), printing its HTML path.
pub fn write(
    printer: &Printer,
    plan: &Plan,
    store: &Store,
    names: &[String],
    dir: Option<&Path>,
) -> Result<ExitCode, Error> {
    let selected = plan.select(names)?;
    let dir = dir.map(Path::to_path_buf).unwrap_or_else(|| plan.root.join("reports").join(names.join("+")));
    let write_error = |source: std::io::Error| Error::Write { path: dir.clone(), source };
    fs_err::create_dir_all(&dir).map_err(write_error)?;
    let stages: Vec<Stored> = selected.iter().map(|&index| Stored::read(plan, store, index)).collect();
    if stages.iter().all(|stage| stage.manifest.is_none()) {
        return Err(Error::NothingBuilt { names: names.to_vec() });
    }

    fn failed(stage: &Stored) -> impl Fn(anyhow::Error) -> Error + '_ {
        move |error| Error::Failed { what: format!("the report on stage `{}`", stage.name), source: error.into() }
    }
    // The loss curves first: what a person opens the report for.
    let mut plots = Vec::new();
    for stage in &stages {
        plots.extend(stage.plots(&dir).map_err(failed(stage))?);
    }
    let mut blocks =
        vec![Block::Heading(1, format!("nanoflow report: {}", names.join(", "))), Block::Paragraph(provenance(plan))];
    if !plots.is_empty() {
        blocks.push(Block::Heading(2, "Loss".into()));
        blocks.extend(plots);
    }
    blocks.extend([
        Block::Heading(2, "Machine".into()),
        Block::Table(vec!["".into(), "".into()], machine()),
        Block::Heading(2, "Stages".into()),
        Block::Table(
            ["stage", "kind", "state", "took", "result"].map(String::from).to_vec(),
            stages.iter().map(Stored::overview).collect(),
        ),
    ]);
    for stage in &stages {
        blocks.extend(stage.section().map_err(failed(stage))?);
    }

    let markdown = markdown(&blocks);
    fs_err::write(dir.join("report.md"), &markdown).map_err(write_error)?;
    let html = html(&format!("nanoflow report: {}", names.join(", ")), &blocks, &dir).map_err(write_error)?;
    let html_path = dir.join("report.html");
    fs_err::write(&html_path, html).map_err(write_error)?;
    printer.status(&format!("wrote {}", show_path(&dir.join("report.md")).display()));
    printer.data(&show_path(&html_path).display().to_string());
    Ok(ExitCode::SUCCESS)
}

/// A stage of the report and what the store holds for it.
struct Stored {
    name: String,
    kind: StageKind,
    /// The manifest of the current output, if there is one.
    manifest: Option<Manifest>,
    /// How the current output came to be: `ran` or `restored` (from the stage's history).
    how: Option<String>,
    /// The current output's folder.
    out: Option<PathBuf>,
}

impl Stored {
    fn read(plan: &Plan, store: &Store, index: usize) -> Stored {
        let stage = &plan.stages[index];
        let entry = store.current(&stage.name);
        let manifest = entry.as_deref().and_then(|entry| Manifest::read(entry).ok().flatten());
        let how = manifest.as_ref().and_then(|manifest| store.how_made(&stage.name, &manifest.key));
        Stored {
            name: stage.name.clone(),
            kind: stage.kind,
            out: entry.map(|entry| entry.join(OUT)),
            how: how.or_else(|| manifest.as_ref().map(|_| "ran".to_string())),
            manifest,
        }
    }

    fn overview(&self) -> Vec<String> {
        let Some(manifest) = &self.manifest else {
            return vec![self.name.clone(), self.kind.name().into(), "not built".into(), String::new(), String::new()];
        };
        vec![
            self.name.clone(),
            self.kind.name().into(),
            self.how.clone().unwrap_or_default(),
            duration(manifest.duration_s),
            manifest.summary.clone(),
        ]
    }

    /// The stage's loss curves, if it trained: against iterations, and against tokens only
    /// where that is another picture (the tokens per iteration changed within the run).
    fn plots(&self, dir: &Path) -> anyhow::Result<Vec<Block>> {
        let Some(record) = self.out.as_ref().map(|out| out.join("metrics.parquet")).filter(|path| path.exists()) else {
            return Ok(Vec::new());
        };
        let rows = metrics::read_parquet(&record)?;
        let per_iter: BTreeSet<i64> = rows.iter().filter(|row| row.iter > 0).map(|row| row.tokens / row.iter).collect();
        let mut axes = vec![(Axis::Iteration, "iteration")];
        if per_iter.len() > 1 {
            axes.push((Axis::Tokens, "tokens"));
        }
        let mut blocks = Vec::new();
        for (axis, against) in axes {
            let file = format!("{}-loss-{against}.png", self.name);
            let title = match per_iter.first() {
                Some(tokens) if per_iter.len() == 1 => {
                    format!("{}: loss against iteration ({tokens} tokens each)", self.name)
                }
                _ => format!("{}: loss against {against}", self.name),
            };
            let chart = metrics::loss_chart(&title, &rows, axis);
            plot::write_png(&dir.join(&file), &chart)?;
            blocks.push(Block::Image { file, alt: format!("{}: train and val loss against {against}", self.name) });
        }
        Ok(blocks)
    }

    fn section(&self) -> anyhow::Result<Vec<Block>> {
        let mut blocks = vec![Block::Heading(2, format!("{} ({})", self.name, self.kind.name()))];
        let (Some(manifest), Some(out)) = (&self.manifest, &self.out) else {
            blocks.push(Block::Paragraph(format!("Not built yet: `nanoflow run {}` makes it.", self.name)));
            return Ok(blocks);
        };
        let made = match self.how.as_deref() {
            Some("restored") => format!(
                "restored from the store (it ran {} on `{}` in {})",
                manifest.finished_at,
                manifest.host,
                duration(manifest.duration_s)
            ),
            _ => format!("ran {} on `{}` in {}", manifest.finished_at, manifest.host, duration(manifest.duration_s)),
        };
        blocks.push(Block::Paragraph(format!(
            "Key `{}`, {made}. Output: `{}`.{}",
            &manifest.key[..12.min(manifest.key.len())],
            show_path(out).display(),
            if manifest.summary.is_empty() { String::new() } else { format!(" {}.", manifest.summary) }
        )));
        let params = changed_params(self.kind, &manifest.config);
        if !params.is_empty() {
            blocks.push(Block::Paragraph("Params that differ from the kind's defaults:".into()));
            blocks.push(Block::Table(vec!["param".into(), "value".into(), "default".into()], params));
        }
        let (scalars, tables) = metric_rows(&manifest.metrics);
        if !scalars.is_empty() {
            blocks.push(Block::Table(vec!["metric".into(), "value".into()], scalars));
        }
        for (name, header, rows) in tables {
            blocks.push(Block::Paragraph(format!("`{name}`:")));
            blocks.push(Block::Table(header, rows));
        }
        let against = estimate_against_actual(&manifest.metrics);
        if !against.is_empty() {
            blocks.push(Block::Paragraph("The preflight's estimate against what the run measured:".into()));
            blocks.push(Block::Table(
                vec![String::new(), "estimate".into(), "actual".into(), "actual / estimate".into()],
                against,
            ));
        }
        let samples = out.join("samples.txt");
        if samples.exists() {
            let text = fs_err::read_to_string(&samples)?;
            let head: Vec<&str> = text.lines().take(SAMPLE_LINES).collect();
            blocks.push(Block::Paragraph(format!("The first {} lines of `samples.txt`:", head.len())));
            blocks.push(Block::Code(head.join("\n")));
        }
        Ok(blocks)
    }
}

/// `estimate | actual` rows for what a train stage estimated before it ran (`preflight.rs`) and
/// measured: peak memory, and ms/iter where both are recorded.
fn estimate_against_actual(metrics: &serde_json::Map<String, serde_json::Value>) -> Vec<Vec<String>> {
    let number = |key: &str| metrics.get(key).and_then(serde_json::Value::as_f64);
    let pairs = [
        ("peak memory", "estimated_peak_bytes", "measured_peak_bytes", true),
        ("ms/iter", "estimated_ms_per_iter", "ms_per_iter", false),
    ];
    pairs
        .into_iter()
        .filter_map(|(what, estimated, measured, bytes)| {
            let (estimate, actual) = (number(estimated)?, number(measured)?);
            let text = |x: f64| if bytes { nanoflow_stages::progress::format_bytes(x) } else { format!("{x:.1}") };
            Some(vec![what.to_string(), text(estimate), text(actual), format!("{:.2}", actual / estimate)])
        })
        .collect()
}

/// `param | value | default` for each resolved param that is not the kind's default.
pub fn changed_params(kind: StageKind, config: &serde_json::Value) -> Vec<Vec<String>> {
    let defaults = kind.defaults();
    let Some(config) = config.as_object() else { return Vec::new() };
    config
        .iter()
        .filter(|(key, value)| defaults.get(key.as_str()) != Some(value))
        .map(|(key, value)| {
            let default = match defaults.get(key.as_str()) {
                // An optional param's default is what the kind does without it, in words.
                Some(serde_json::Value::Null) => {
                    kind.unset().iter().find(|(name, _)| name == key).map_or("unset", |(_, what)| what).to_string()
                }
                Some(default) => value_text(default),
                None => String::new(),
            };
            vec![key.clone(), value_text(value), default]
        })
        .collect()
}

/// A JSON value as a cell: strings without quotes, paths into the store shortened.
pub fn value_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => show_path(Path::new(text)).display().to_string(),
        serde_json::Value::Number(number) => match number.as_f64() {
            Some(x) if number.is_f64() => format_float(x),
            _ => number.to_string(),
        },
        other => other.to_string(),
    }
}

/// Metrics as `metric | value` rows, and lists of objects (eval's `results`) as tables.
type Tables = Vec<(String, Vec<String>, Vec<Vec<String>>)>;
fn metric_rows(metrics: &serde_json::Map<String, serde_json::Value>) -> (Vec<Vec<String>>, Tables) {
    let mut scalars = Vec::new();
    let mut tables = Vec::new();
    for (name, value) in metrics {
        match value.as_array() {
            Some(items) if items.iter().all(serde_json::Value::is_object) => {
                let mut header: Vec<String> = Vec::new();
                for item in items.iter().filter_map(serde_json::Value::as_object) {
                    for key in item.keys() {
                        if !header.contains(key) {
                            header.push(key.clone());
                        }
                    }
                }
                let rows = items
                    .iter()
                    .map(|item| header.iter().map(|key| item.get(key).map(value_text).unwrap_or_default()).collect())
                    .collect();
                tables.push((name.clone(), header, rows));
            }
            _ => scalars.push(vec![name.clone(), value_text(value)]),
        }
    }
    (scalars, tables)
}

/// As people read them: losses to 4 places (`1.8933`), rates whole (`7219`), small values as
/// written in configs (`6e-5`, `0.99`).
fn format_float(x: f64) -> String {
    if x == 0.0 || !x.is_finite() {
        return x.to_string();
    }
    match x.abs() {
        a if a >= 1e3 => format!("{x:.0}"),
        a if a >= 1e-3 => {
            let text = format!("{x:.4}");
            text.trim_end_matches('0').trim_end_matches('.').to_string()
        }
        _ => format!("{x:e}"),
    }
}

/// `3m 58s`, `2.1s`.
pub fn duration(seconds: f64) -> String {
    match seconds {
        s if s >= 3600.0 => format!("{}h {:02}m", (s / 3600.0) as u64, ((s % 3600.0) / 60.0) as u64),
        s if s >= 60.0 => format!("{}m {:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        s => format!("{s:.1}s"),
    }
}

/// When, by which nanoflow, from which commit of which pipeline.
fn provenance(plan: &Plan) -> String {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(&plan.root)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(commit) => {
            let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            format!("commit `{commit}`{}", if dirty { " with uncommitted changes" } else { "" })
        }
        None => "not in a git repository".to_string(),
    };
    format!(
        "Written {now} by nanoflow {} for the pipeline in `{}` ({commit}).",
        env!("CARGO_PKG_VERSION"),
        plan.root.display()
    )
}

/// What the machine writing the report is: CPU, cores, memory, GPUs, system.
fn machine() -> Vec<Vec<String>> {
    let read = |path: &str| fs_err::read_to_string(path).unwrap_or_default();
    let field = |text: &str, name: &str| {
        text.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == name).then(|| value.trim().trim_matches('"').to_string())
        })
    };
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = field(&cpuinfo, "model name").unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let memory = field(&read("/proc/meminfo"), "MemTotal")
        .and_then(|kib| kib.trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let gpus = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().replace('\n', "; "))
        .filter(|gpus| !gpus.is_empty())
        .unwrap_or_else(|| "none found".into());
    let system = read("/etc/os-release")
        .lines()
        .find_map(|line| Some(line.strip_prefix("PRETTY_NAME=")?.trim_matches('"').to_string()))
        .unwrap_or_else(|| std::env::consts::OS.into());
    let host = crate::host::hostname();
    [
        ("host", host),
        ("CPU", format!("{cpu}, {cores} cores available")),
        ("memory", memory),
        ("GPU", gpus),
        ("system", system),
    ]
    .into_iter()
    .map(|(name, value)| vec![name.to_string(), value])
    .collect()
}

/// The report as markdown. Params, metrics, summaries and samples are whatever a stage wrote, so
/// nothing of theirs is read as markup: `<`, `>` and `&` become entities outside code spans (a
/// viewer that renders HTML in markdown runs none of it), a `|` in a cell cannot end it, and a
/// sample is fenced by more backticks than it holds in a row.
pub fn markdown(blocks: &[Block]) -> String {
    let mut text = String::new();
    let cell = |cell: &str| markdown_inline(&cell.replace('\n', " ")).replace('|', "\\|");
    for block in blocks {
        match block {
            Block::Heading(level, title) => writeln!(text, "{} {}\n", "#".repeat(*level), markdown_inline(title)),
            Block::Paragraph(paragraph) => writeln!(text, "{}\n", markdown_inline(paragraph)),
            Block::Table(header, rows) => {
                let line =
                    |cells: &[String]| format!("| {} |", cells.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | "));
                let _ = writeln!(text, "{}", line(header));
                let _ = writeln!(text, "|{}", " --- |".repeat(header.len()));
                for row in rows {
                    let _ = writeln!(text, "{}", line(row));
                }
                writeln!(text)
            }
            Block::Image { file, alt } => writeln!(text, "![{alt}]({file})\n"),
            Block::Code(code) => {
                let longest = code.split(|c| c != '`').map(str::len).max().unwrap_or(0);
                let fence = "`".repeat(longest.max(2) + 1);
                writeln!(text, "{fence}text\n{code}\n{fence}\n")
            }
        }
        .expect("writing to a String");
    }
    text
}

/// One page, the plots inlined as data URLs, no scripts, nothing fetched.
pub fn html(title: &str, blocks: &[Block], dir: &Path) -> std::io::Result<String> {
    let mut body = String::new();
    for block in blocks {
        match block {
            Block::Heading(level, title) => {
                let _ = writeln!(body, "<h{level}>{}</h{level}>", inline(title));
            }
            Block::Paragraph(paragraph) => {
                let _ = writeln!(body, "<p>{}</p>", inline(paragraph));
            }
            Block::Table(header, rows) => {
                body.push_str("<table>\n");
                if header.iter().any(|cell| !cell.is_empty()) {
                    let cells: String = header.iter().map(|cell| format!("<th>{}</th>", escape(cell))).collect();
                    let _ = writeln!(body, "<tr>{cells}</tr>");
                }
                for row in rows {
                    let cells: String = row.iter().map(|cell| td(cell)).collect();
                    let _ = writeln!(body, "<tr>{cells}</tr>");
                }
                body.push_str("</table>\n");
            }
            Block::Image { file, alt } => {
                let png = fs_err::read(dir.join(file))?;
                let data = base64::engine::general_purpose::STANDARD.encode(png);
                let _ = writeln!(body, "<p><img src=\"data:image/png;base64,{data}\" alt=\"{}\"></p>", escape(alt));
            }
            Block::Code(code) => {
                let _ = writeln!(body, "<pre>{}</pre>", escape(code));
            }
        }
    }
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>\n{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n",
        escape(title)
    ))
}

const STYLE: &str =
    "body { font-family: system-ui, sans-serif; max-width: 960px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
td.long { overflow-wrap: anywhere; }
th { background: #f4f4f4; }
code, pre { font-family: ui-monospace, monospace; background: #f6f6f6; }
pre { padding: 0.8em; overflow-x: auto; }
img { max-width: 100%; }
";

/// A cell; one holding a word too long for a line (a digest, a path) may break inside it.
fn td(cell: &str) -> String {
    let long = cell.split_whitespace().any(|word| word.len() > 40);
    format!("<td{}>{}</td>", if long { " class=\"long\"" } else { "" }, escape(cell))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Markdown text whose `<`, `>` and `&` outside `code` spans are entities: shown as written,
/// never read as HTML. (Inside a code span markdown shows them as they are.)
fn markdown_inline(text: &str) -> String {
    text.split('`')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 {
                part.to_string()
            } else {
                part.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
            }
        })
        .collect::<Vec<_>>()
        .join("`")
}

/// A paragraph's text with `code` spans, as markdown writes them.
fn inline(text: &str) -> String {
    escape(text)
        .split('`')
        .enumerate()
        .map(|(i, part)| if i % 2 == 1 { format!("<code>{part}</code>") } else { part.to_string() })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_document_reads_the_same_as_markdown_and_html() {
        let blocks = vec![
            Block::Heading(2, "train (train)".into()),
            Block::Paragraph("Key `abc`, ran <fast>.".into()),
            Block::Table(vec!["param".into(), "value".into()], vec![vec!["a|b".into(), "1".into()]]),
            Block::Code("ROMEO:\n<3".into()),
        ];
        assert_eq!(
            markdown(&blocks),
            "## train (train)\n\nKey `abc`, ran &lt;fast&gt;.\n\n| param | value |\n| --- | --- |\n| a\\|b | 1 |\n\n```text\nROMEO:\n<3\n```\n\n"
        );
        let page = html("t", &blocks, Path::new(".")).unwrap();
        assert!(page.contains("<h2>train (train)</h2>\n<p>Key <code>abc</code>, ran &lt;fast&gt;.</p>"));
        assert!(page.contains("<tr><th>param</th><th>value</th></tr>\n<tr><td>a|b</td><td>1</td></tr>"));
        assert!(page.contains("<pre>ROMEO:\n&lt;3</pre>"));
    }

    /// Issue 28, item 7: what stages wrote cannot become markup in `report.md`.
    #[test]
    fn markdown_shows_params_and_samples_as_written_never_as_html() {
        let blocks = vec![
            Block::Table(
                vec!["param".into(), "value".into()],
                vec![vec!["start".into(), "<img src=x onerror=alert(1)> | a & b".into()]],
            ),
            Block::Paragraph("The first lines of <b>samples</b> in `<dir>`:".into()),
            Block::Code("<script>alert(1)</script>\n```\n# not a heading".into()),
        ];
        assert_eq!(
            markdown(&blocks),
            "| param | value |\n| --- | --- |\n| start | &lt;img src=x onerror=alert(1)&gt; \\| a &amp; b |\n\n\
             The first lines of &lt;b&gt;samples&lt;/b&gt; in `<dir>`:\n\n\
             ````text\n<script>alert(1)</script>\n```\n# not a heading\n````\n\n"
        );
    }

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(duration(2.06), "2.1s");
        assert_eq!(duration(238.0), "3m 58s");
        assert_eq!(duration(3725.0), "1h 02m");
    }

    #[test]
    fn metrics_split_into_scalars_and_tables() {
        let metrics = serde_json::json!({
            "val_loss": 1.89331,
            "iters": 2000,
            "results": [{"model": "gpt2", "val_loss": 3.1}, {"model": "m", "hellaswag_acc": 0.25}],
        });
        let (scalars, tables) = metric_rows(metrics.as_object().unwrap());
        assert_eq!(scalars, [["iters", "2000"], ["val_loss", "1.8933"]]);
        assert_eq!(tables.len(), 1);
        assert_eq!(tables[0].1, ["model", "val_loss", "hellaswag_acc"]);
        assert_eq!(tables[0].2, [["gpt2", "3.1", ""], ["m", "", "0.25"]]);
        assert_eq!(format_float(6e-5), "6e-5");
        assert_eq!(format_float(7218.747), "7219");
        assert_eq!(format_float(0.99), "0.99");
    }
}
