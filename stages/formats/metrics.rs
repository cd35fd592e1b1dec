//! The training record: one row per iteration in `metrics.parquet`, and its loss curves (drawn
//! by `plot`) for `loss.png` and the report. It does not know how the numbers were made.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, ArrayRef, Float64Array, Int64Array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use crate::formats::plot::{self, Chart, Series};

/// What happened at one iteration. The training columns are empty at an iteration that was only
/// evaluated (the last), the evaluation columns at one that was not evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Row {
    pub iter: i64,
    /// The learning rate of this iteration's step.
    pub lr: Option<f64>,
    /// The training loss of the step's last micro-batch (nanoGPT's logged `loss`).
    pub loss: Option<f64>,
    /// The mean loss over `eval_iters` train batches, before the step.
    pub train_loss: Option<f64>,
    /// The mean loss over `eval_iters` val batches, before the step.
    pub val_loss: Option<f64>,
    /// Tokens trained on before this iteration's step (the x axis of "loss against tokens").
    pub tokens: i64,
}

/// The column names, in order. No timings: a deterministic run writes the same record twice
/// (the log and the manifest keep how long it took).
pub const COLUMNS: [&str; 6] = ["iter", "lr", "loss", "train_loss", "val_loss", "tokens"];

/// Writes `rows` as `path` (zstd-compressed parquet).
pub fn write_parquet(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let column =
        |get: fn(&Row) -> Option<f64>| -> ArrayRef { Arc::new(rows.iter().map(get).collect::<Float64Array>()) };
    let columns: Vec<(&str, ArrayRef, bool)> = vec![
        ("iter", Arc::new(rows.iter().map(|row| row.iter).collect::<Int64Array>()), false),
        ("lr", column(|row| row.lr), true),
        ("loss", column(|row| row.loss), true),
        ("train_loss", column(|row| row.train_loss), true),
        ("val_loss", column(|row| row.val_loss), true),
        ("tokens", Arc::new(rows.iter().map(|row| row.tokens).collect::<Int64Array>()), false),
    ];
    crate::formats::table::write(path, columns)
}

/// Reads what `write_parquet` wrote.
pub fn read_parquet(path: &Path) -> anyhow::Result<Vec<Row>> {
    let file = fs_err::File::open(path)?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file.into_parts().0)
        .with_context(|| format!("could not read `{}`", path.display()))?
        .build()?;
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("could not read `{}`", path.display()))?;
        let column = |name: &str| {
            batch.column_by_name(name).with_context(|| format!("`{}` has no column `{name}`", path.display()))
        };
        let int64 = |name: &str| -> anyhow::Result<Int64Array> {
            Ok(column(name)?.as_primitive_opt::<Int64Type>().with_context(|| format!("`{name}` is not int64"))?.clone())
        };
        let (iter, tokens) = (int64("iter")?, int64("tokens")?);
        let floats = COLUMNS[1..5]
            .iter()
            .map(|name| -> anyhow::Result<Float64Array> {
                Ok(column(name)?
                    .as_primitive_opt::<Float64Type>()
                    .with_context(|| format!("`{name}` is not float64"))?
                    .clone())
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        for i in 0..batch.num_rows() {
            let get = |column: usize| floats[column].is_valid(i).then(|| floats[column].value(i));
            rows.push(Row {
                iter: iter.value(i),
                lr: get(0),
                loss: get(1),
                train_loss: get(2),
                val_loss: get(3),
                tokens: tokens.value(i),
            });
        }
    }
    Ok(rows)
}

/// What the loss curves are drawn against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Axis {
    Iteration,
    /// Tokens trained on.
    Tokens,
}

/// The loss curves of a record: the per-step training loss (pale), and where there are
/// evaluations the mean train loss (blue) and val loss (orange), with `prefix` before each
/// series' name (to tell runs apart on one chart) and `color` the first palette colour used.
pub fn loss_series(rows: &[Row], axis: Axis, prefix: &str, color: usize) -> Vec<Series> {
    let x = |row: &Row| match axis {
        Axis::Iteration => row.iter as f64,
        Axis::Tokens => row.tokens as f64,
    };
    let points = |get: fn(&Row) -> Option<f64>| -> Vec<(f64, f64)> {
        rows.iter().filter_map(|row| get(row).map(|value| (x(row), value))).collect()
    };
    let mut series = vec![
        Series { faint: true, ..Series::new(format!("{prefix}train loss (each step)"), color, points(|row| row.loss)) },
        Series { markers: true, ..Series::new(format!("{prefix}train loss"), color, points(|row| row.train_loss)) },
        Series { markers: true, ..Series::new(format!("{prefix}val loss"), color + 1, points(|row| row.val_loss)) },
    ];
    series.retain(|series| !series.points.is_empty());
    series
}

/// The chart of one run's loss curves.
pub fn loss_chart(title: &str, rows: &[Row], axis: Axis) -> Chart {
    let x_label = match axis {
        Axis::Iteration => "iteration",
        Axis::Tokens => "tokens",
    };
    Chart {
        title: title.to_string(),
        x_label: x_label.to_string(),
        y_label: "loss (cross-entropy)".to_string(),
        series: loss_series(rows, axis, "", 0),
    }
}

/// Draws the loss curves against the iteration as `path` (a train output's `loss.png`).
pub fn plot_png(path: &Path, title: &str, rows: &[Row]) -> anyhow::Result<()> {
    plot::write_png(path, &loss_chart(title, rows, Axis::Iteration))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows() -> Vec<Row> {
        (0..=20)
            .map(|i| Row {
                iter: i,
                lr: (i < 20).then_some(1e-3),
                loss: (i < 20).then(|| 4.0 / (1.0 + i as f64)),
                train_loss: (i % 5 == 0).then(|| 4.0 / (1.0 + i as f64)),
                val_loss: (i % 5 == 0).then(|| 4.2 / (1.0 + i as f64)),
                tokens: 10 * i,
            })
            .collect()
    }

    #[test]
    fn parquet_round_trips_with_named_columns() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("metrics.parquet");
        write_parquet(&path, &rows())?;
        assert_eq!(read_parquet(&path)?, rows());
        let reader = ParquetRecordBatchReaderBuilder::try_new(fs_err::File::open(&path)?.into_parts().0)?;
        let names: Vec<String> = reader.schema().fields().iter().map(|field| field.name().clone()).collect();
        assert_eq!(names, COLUMNS);
        Ok(())
    }

    #[test]
    fn plot_is_a_png() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("loss.png");
        plot_png(&path, "train: loss", &rows())?;
        let bytes = fs_err::read(&path)?;
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // An empty record still gives a picture (axes only).
        plot_png(&path, "train: loss", &[])?;
        Ok(())
    }

    #[test]
    fn loss_series_are_the_steps_and_the_evaluations() {
        let series = loss_series(&rows(), Axis::Tokens, "a: ", 2);
        let names: Vec<&str> = series.iter().map(|series| series.name.as_str()).collect();
        assert_eq!(names, ["a: train loss (each step)", "a: train loss", "a: val loss"]);
        assert_eq!(series[0].points.len(), 20);
        assert_eq!(
            series[2].points,
            [(0.0, 4.2), (50.0, 4.2 / 6.0), (100.0, 4.2 / 11.0), (150.0, 4.2 / 16.0), (200.0, 4.2 / 21.0)]
        );
        assert_eq!((series[1].color, series[2].color), (2, 3));
        assert!(series[0].faint && !series[1].faint);
    }
}
