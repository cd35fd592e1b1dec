//! `nanoflow metrics STAGE`: every stored output of a stage side by side (`dvc exp show`), one
//! row per key with the params that differ between them and the final metrics, as a table,
//! `--csv` or `--json`; and their loss curves overlaid in one plot (`dvc plots diff`).
//!
//! The table is a polars `DataFrame`: each stored output's record (`metrics.parquet` of a train
//! stage, `results.parquet` of an eval stage) is read and reduced with polars, one frame per
//! output, and the frames are stacked diagonally (a column one output lacks is null there).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nanoflow_stages::formats::metrics as record;
use nanoflow_stages::formats::plot::{self, Chart, Series};
use polars::prelude::*;

use crate::error::Error;
use crate::manifest::{Manifest, OUT};
use crate::plan::Plan;
use crate::printer::{Printer, show_path};
use crate::report::value_text;
use crate::store::Store;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// As many columns as fit the terminal, the ones that tell runs apart first.
    Table,
    /// Every column.
    Wide,
    Csv,
    Json,
}

/// A stored output of the stage.
struct Entry {
    manifest: Manifest,
    out: PathBuf,
    current: bool,
}

pub fn show(
    printer: &Printer,
    plan: &Plan,
    store: &Store,
    stage: &str,
    format: Format,
    plot_path: Option<&Path>,
) -> Result<ExitCode, Error> {
    plan.stage_named(stage)?;
    if matches!(format, Format::Table | Format::Wide) {
        table_style();
    }
    let store_error = |source| Error::Store { path: store.root.clone(), source };
    let current = store.current(stage);
    let mut entries = Vec::new();
    for dir in store.entries(stage).map_err(store_error)? {
        // An entry whose manifest does not parse is damaged; `verify` reports it, this skips it.
        if let Ok(Some(manifest)) = Manifest::read(&dir) {
            entries.push(Entry { manifest, out: dir.join(OUT), current: current.as_deref() == Some(dir.as_path()) });
        }
    }
    if entries.is_empty() {
        return Err(Error::NoOutput { stage: stage.to_string() });
    }
    entries.sort_by(|a, b| a.manifest.finished_at.cmp(&b.manifest.finished_at));

    let varying = varying_params(&entries);
    let failed =
        |error: PolarsError| Error::Failed { what: format!("`metrics` of stage `{stage}`"), source: error.into() };
    let table = table(&entries, &varying).map_err(failed)?;
    print(printer, table, format, &varying).map_err(failed)?;

    let curves = loss_curves(&entries, &varying).map_err(|error| Error::Failed {
        what: format!("reading the records of stage `{stage}`"),
        source: error.into(),
    })?;
    if !curves.is_empty() {
        let path = plot_path
            .map(Path::to_path_buf)
            .unwrap_or_else(|| plan.root.join("reports").join(format!("{stage}-runs.png")));
        let chart = Chart {
            title: format!("{stage}: {} stored runs", entries.len()),
            x_label: "iteration".into(),
            y_label: "loss (cross-entropy)".into(),
            series: curves,
        };
        let write = || -> anyhow::Result<()> {
            if let Some(parent) = path.parent() {
                fs_err::create_dir_all(parent)?;
            }
            plot::write_png(&path, &chart)
        };
        write()
            .map_err(|error| Error::Failed { what: format!("the plot of stage `{stage}`"), source: error.into() })?;
        printer.status(&format!("loss curves of every run: {}", show_path(&path).display()));
    }
    Ok(ExitCode::SUCCESS)
}

/// Params whose value is not the same in every entry, in config order.
fn varying_params(entries: &[Entry]) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for entry in entries {
        for key in entry.manifest.config.as_object().into_iter().flatten().map(|(key, _)| key) {
            if !keys.contains(key) {
                keys.push(key.clone());
            }
        }
    }
    keys.retain(|key| {
        let values: BTreeSet<String> = entries.iter().map(|entry| entry.manifest.config[key].to_string()).collect();
        values.len() > 1
    });
    keys
}

/// One row per entry: key, when, params that vary, final metrics.
fn table(entries: &[Entry], varying: &[String]) -> PolarsResult<DataFrame> {
    let mut frames = Vec::new();
    for entry in entries {
        let manifest = &entry.manifest;
        let mut columns = vec![
            Column::new("key".into(), [&manifest.key[..12.min(manifest.key.len())]]),
            Column::new("current".into(), [if entry.current { "*" } else { "" }]),
            Column::new("finished".into(), [manifest.finished_at.as_str()]),
            Column::new("took_s".into(), [manifest.duration_s]),
        ];
        for key in varying {
            columns.push(param_column(key, &manifest.config[key]));
        }
        let train_record = entry.out.join("metrics.parquet");
        let eval_record = entry.out.join("results.parquet");
        if train_record.exists() {
            columns.extend(train_metrics(&train_record, manifest)?);
        } else if eval_record.exists() {
            columns.extend(eval_metrics(&eval_record)?);
        } else {
            for (name, value) in &manifest.metrics {
                if let Some(number) = value.as_f64() {
                    columns.push(Column::new(name.as_str().into(), [number]));
                }
            }
        }
        frames.push(DataFrame::new(1, columns)?);
    }
    polars::functions::concat_df_diagonal(&frames)
}

/// A param's value as a one-row column: numbers stay numbers (for `--json` and sorting).
fn param_column(key: &str, value: &serde_json::Value) -> Column {
    match value {
        serde_json::Value::Number(number) if number.is_i64() => Column::new(key.into(), [number.as_i64()]),
        serde_json::Value::Number(number) => Column::new(key.into(), [number.as_f64()]),
        serde_json::Value::Bool(flag) => Column::new(key.into(), [*flag]),
        serde_json::Value::Null => Column::new(key.into(), [None::<&str>]),
        other => Column::new(key.into(), [value_text(other)]),
    }
}

/// A train record reduced to its final numbers: iterations, tokens, the last train and val
/// loss, the best val loss; and the speed the run measured (kept in the manifest, as the record
/// holds no timings).
fn train_metrics(path: &Path, manifest: &Manifest) -> PolarsResult<Vec<Column>> {
    let frame = ParquetReader::new(fs_err::File::open(path)?.into_parts().0).finish()?;
    let floats = |name: &str| -> PolarsResult<Float64Chunked> { Ok(frame.column(name)?.f64()?.clone()) };
    let last = |values: &Float64Chunked| values.last_non_null().and_then(|at| values.get(at));
    let (val, train) = (floats("val_loss")?, floats("train_loss")?);
    let (iters, tokens) = (frame.column("iter")?.i64()?.max(), frame.column("tokens")?.i64()?.max());
    Ok(vec![
        Column::new("iters".into(), [iters]),
        Column::new("tokens".into(), [tokens]),
        Column::new("train_loss".into(), [last(&train)]),
        Column::new("val_loss".into(), [last(&val)]),
        Column::new("best_val_loss".into(), [val.min()]),
        Column::new("tokens_per_s".into(), [manifest.metrics.get("tokens_per_second").and_then(|v| v.as_f64())]),
    ])
}

/// An eval's results (one row per model) turned into one row: `<model> <metric>` columns.
fn eval_metrics(path: &Path) -> PolarsResult<Vec<Column>> {
    let frame = ParquetReader::new(fs_err::File::open(path)?.into_parts().0).finish()?;
    let models = frame.column("model")?.str()?.clone();
    let mut columns = Vec::new();
    for (row, model) in models.iter().enumerate() {
        let model = model.unwrap_or("?");
        for column in frame.columns() {
            if column.name() == "model" || column.name() == "params" || !column.dtype().is_primitive_numeric() {
                continue;
            }
            let value = column.get(row)?.extract::<f64>();
            columns.push(Column::new(format!("{model} {}", column.name()).into(), [value]));
        }
    }
    Ok(columns)
}

fn print(printer: &Printer, mut table: DataFrame, format: Format, varying: &[String]) -> PolarsResult<()> {
    let mut bytes = Vec::new();
    match format {
        Format::Csv => CsvWriter::new(&mut bytes).finish(&mut table)?,
        Format::Json => JsonWriter::new(&mut bytes).with_json_format(JsonFormat::Json).finish(&mut table)?,
        Format::Wide => bytes = format!("{}", rounded(&table)?).into_bytes(),
        Format::Table => {
            let (shown, hidden) = fit(rounded(&table)?, varying, terminal_width())?;
            bytes = format!("{shown}").into_bytes();
            if !hidden.is_empty() {
                printer.status(&format!("{} more: {} (`--wide` shows them)", hidden.len(), hidden.join(", ")));
            }
        }
    }
    printer.data(String::from_utf8_lossy(&bytes).trim_end());
    Ok(())
}

/// The columns people compare first: which run (key, current), what set it apart (the params
/// that vary), how it did; then the rest.
const FIRST: &[&str] = &["key", "current"];
const RESULTS: &[&str] = &["val_loss", "best_val_loss", "train_loss", "tokens_per_s", "iters"];

/// The table's columns in the order above, as many as fit in `width` characters (all of them
/// without a width); and the names of those left out.
fn fit(table: DataFrame, varying: &[String], width: Option<usize>) -> PolarsResult<(DataFrame, Vec<String>)> {
    let names: Vec<String> = table.get_column_names().iter().map(|name| name.to_string()).collect();
    let rank = |name: &String| {
        let position = |list: &[&str]| list.iter().position(|item| item == name);
        match (position(FIRST), varying.iter().position(|key| key == name), position(RESULTS)) {
            (Some(at), _, _) => at,
            (_, Some(at), _) => 10 + at,
            (_, _, Some(at)) => 1000 + at,
            // An eval's `<model> <metric>` columns before the bookkeeping (when, how long).
            _ if ["finished", "took_s", "tokens"].contains(&name.as_str()) => 3000,
            _ => 2000,
        }
    };
    let mut ordered = names.clone();
    ordered.sort_by_key(|name| rank(name));
    let Some(width) = width else { return Ok((table.select(ordered)?, Vec::new())) };
    let mut shown = ordered.len();
    loop {
        let candidate = table.select(ordered[..shown].iter().cloned())?;
        let widest = format!("{candidate}").lines().map(|line| line.chars().count()).max().unwrap_or(0);
        // The key and whether it is current always show.
        if widest <= width || shown <= FIRST.len() + 1 {
            return Ok((candidate, ordered[shown..].to_vec()));
        }
        shown -= 1;
    }
}

/// Columns to fit a table in: `COLUMNS` where set, else the terminal's on stdout; none (every
/// column) when stdout is a file or a pipe.
fn terminal_width() -> Option<usize> {
    if let Some(columns) = std::env::var("COLUMNS").ok().and_then(|columns| columns.parse().ok()) {
        return Some(columns);
    }
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ fills the winsize it is given; a non-terminal fails and leaves it.
    let ok = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) } == 0;
    (ok && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

/// polars' table without its shape and type rows, every row and column shown. polars reads
/// these from the environment when it prints.
fn table_style() {
    let settings = [
        ("POLARS_FMT_TABLE_HIDE_DATAFRAME_SHAPE_INFORMATION", "1"),
        ("POLARS_FMT_TABLE_HIDE_COLUMN_DATA_TYPES", "1"),
        ("POLARS_FMT_TABLE_ROUNDED_CORNERS", "1"),
        ("POLARS_FMT_MAX_COLS", "-1"),
        ("POLARS_FMT_MAX_ROWS", "-1"),
        ("POLARS_FMT_STR_LEN", "60"),
        ("POLARS_TABLE_WIDTH", "1000"),
    ];
    for (name, value) in settings {
        if std::env::var_os(name).is_none() {
            // SAFETY: `metrics` calls this first, before polars or anything else starts a thread.
            unsafe { std::env::set_var(name, value) };
        }
    }
}

/// The table with floats rounded as people read them: losses to 4 places, rates to whole units.
fn rounded(table: &DataFrame) -> PolarsResult<DataFrame> {
    let columns = table
        .columns()
        .iter()
        .map(|column| -> PolarsResult<Column> {
            if column.dtype() != &DataType::Float64 {
                return Ok(column.clone());
            }
            let scale = if column.name().contains("per_s") { 1.0 } else { 1e4 };
            let values = column.f64()?.iter().map(|value| value.map(|v| (v * scale).round() / scale));
            Ok(Float64Chunked::from_iter_options(column.name().clone(), values).into_column())
        })
        .collect::<PolarsResult<Vec<_>>>()?;
    DataFrame::new(table.height(), columns)
}

/// Each entry's val loss (with its evaluations marked) and per-step train loss (pale), one
/// colour per entry, named by key and the params that set it apart.
fn loss_curves(entries: &[Entry], varying: &[String]) -> anyhow::Result<Vec<Series>> {
    let mut series = Vec::new();
    for (color, entry) in entries.iter().enumerate() {
        let path = entry.out.join("metrics.parquet");
        if !path.exists() {
            continue;
        }
        let rows = record::read_parquet(&path)?;
        let config: BTreeMap<&str, &serde_json::Value> =
            varying.iter().map(|key| (key.as_str(), &entry.manifest.config[key])).collect();
        let params: Vec<String> = config.iter().map(|(key, value)| format!("{key}={}", value_text(value))).collect();
        let name = match params.is_empty() {
            true => entry.manifest.key[..8].to_string(),
            false => format!("{} ({})", &entry.manifest.key[..8], params.join(", ")),
        };
        let points = |get: fn(&record::Row) -> Option<f64>| {
            rows.iter().filter_map(|row| Some((row.iter as f64, get(row)?))).collect::<Vec<_>>()
        };
        series.push(Series { faint: true, ..Series::new(format!("{name} train"), color, points(|row| row.loss)) });
        series.push(Series { markers: true, ..Series::new(format!("{name} val"), color, points(|row| row.val_loss)) });
    }
    series.retain(|series| !series.points.is_empty());
    Ok(series)
}
