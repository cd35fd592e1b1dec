//! The training record: one row per iteration in `metrics.parquet` and the loss curve in
//! `loss.png`. It owns both file formats (the plot is drawn by hand: axes, ticks with a 3x5
//! pixel font, and the curves); it does not know how the numbers were made.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type};
use arrow_array::{Array, ArrayRef, Float64Array, Int64Array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

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
    /// Wall time of the step, milliseconds.
    pub ms_per_iter: Option<f64>,
    /// Tokens the step trained on per second.
    pub tokens_per_second: Option<f64>,
}

/// The column names, in order.
pub const COLUMNS: [&str; 7] = ["iter", "lr", "loss", "train_loss", "val_loss", "ms_per_iter", "tokens_per_second"];

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
        ("ms_per_iter", column(|row| row.ms_per_iter), true),
        ("tokens_per_second", column(|row| row.tokens_per_second), true),
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
        let iter = column("iter")?.as_primitive_opt::<Int64Type>().context("`iter` is not int64")?.clone();
        let floats = COLUMNS[1..]
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
                ms_per_iter: get(4),
                tokens_per_second: get(5),
            });
        }
    }
    Ok(rows)
}

/// A plotted column of the record.
type Column = fn(&Row) -> Option<f64>;

const WIDTH: usize = 800;
const HEIGHT: usize = 500;
const LEFT: usize = 70;
const RIGHT: usize = 20;
const TOP: usize = 20;
const BOTTOM: usize = 40;
const TRAIN_STEP: [u8; 3] = [173, 203, 227];
const TRAIN: [u8; 3] = [31, 119, 180];
const VAL: [u8; 3] = [255, 127, 14];

/// Draws the loss curves as `path`: the per-step training loss (light blue), and where there
/// are evaluations the mean train loss (blue) and val loss (orange), against the iteration.
pub fn plot_png(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let mut canvas = Canvas { pixels: vec![255; WIDTH * HEIGHT * 3] };
    let series: [(Column, [u8; 3]); 3] =
        [(|row| row.loss, TRAIN_STEP), (|row| row.train_loss, TRAIN), (|row| row.val_loss, VAL)];
    let values =
        || rows.iter().flat_map(|row| [row.loss, row.train_loss, row.val_loss]).flatten().filter(|v| v.is_finite());
    let (mut y_min, mut y_max) =
        values().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    if y_max - y_min < 1e-9 {
        (y_min, y_max) = (y_min - 0.5, y_max + 0.5);
    }
    let x_max = rows.iter().map(|row| row.iter).max().unwrap_or(1).max(1) as f64;
    let (plot_w, plot_h) = ((WIDTH - LEFT - RIGHT) as f64, (HEIGHT - TOP - BOTTOM) as f64);
    let to_x = |iter: f64| LEFT as f64 + iter / x_max * plot_w;
    let to_y = |loss: f64| TOP as f64 + (y_max - loss) / (y_max - y_min) * plot_h;

    // Grid and tick labels: five steps on each axis.
    for i in 0..=5 {
        let loss = y_min + (y_max - y_min) * i as f64 / 5.0;
        let y = to_y(loss).round() as usize;
        canvas.line(LEFT as f64, y as f64, (WIDTH - RIGHT) as f64, y as f64, [230, 230, 230]);
        canvas.text(&format!("{loss:.2}"), 8, y.saturating_sub(5), [0, 0, 0]);
        let iter = (x_max * i as f64 / 5.0).round();
        let x = to_x(iter).round() as usize;
        canvas.line(x as f64, TOP as f64, x as f64, (HEIGHT - BOTTOM) as f64, [230, 230, 230]);
        let label = format!("{iter}");
        canvas.text(&label, x.saturating_sub(label.len() * 4), HEIGHT - BOTTOM + 10, [0, 0, 0]);
    }
    for (get, color) in series {
        let points: Vec<(f64, f64)> = rows
            .iter()
            .filter_map(|row| get(row).filter(|v| v.is_finite()).map(|v| (to_x(row.iter as f64), to_y(v))))
            .collect();
        for pair in points.windows(2) {
            canvas.line(pair[0].0, pair[0].1, pair[1].0, pair[1].1, color);
        }
        if let [(x, y)] = points[..] {
            canvas.line(x - 2.0, y, x + 2.0, y, color);
        }
    }
    // Axes last, over the grid.
    let (left, bottom) = (LEFT as f64, (HEIGHT - BOTTOM) as f64);
    canvas.line(left, TOP as f64, left, bottom, [0, 0, 0]);
    canvas.line(left, bottom, (WIDTH - RIGHT) as f64, bottom, [0, 0, 0]);

    let file = std::io::BufWriter::new(fs_err::File::create(path)?);
    let mut encoder = png::Encoder::new(file, WIDTH as u32, HEIGHT as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().with_context(|| format!("could not write `{}`", path.display()))?;
    writer.write_image_data(&canvas.pixels).with_context(|| format!("could not write `{}`", path.display()))?;
    writer.finish().with_context(|| format!("could not write `{}`", path.display()))?;
    Ok(())
}

struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn set(&mut self, x: i64, y: i64, color: [u8; 3]) {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            let at = (y as usize * WIDTH + x as usize) * 3;
            self.pixels[at..at + 3].copy_from_slice(&color);
        }
    }

    /// A one-pixel line (DDA: a step per pixel along the longer axis).
    fn line(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, color: [u8; 3]) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            self.set((x0 + (x1 - x0) * t).round() as i64, (y0 + (y1 - y0) * t).round() as i64, color);
        }
    }

    /// Digits, `.`, `-` and `e` in a 3x5 font drawn at twice the size.
    fn text(&mut self, text: &str, x: usize, y: usize, color: [u8; 3]) {
        for (i, c) in text.chars().enumerate() {
            let glyph: [u8; 5] = match c {
                '0' => [7, 5, 5, 5, 7],
                '1' => [2, 6, 2, 2, 7],
                '2' => [7, 1, 7, 4, 7],
                '3' => [7, 1, 7, 1, 7],
                '4' => [5, 5, 7, 1, 1],
                '5' => [7, 4, 7, 1, 7],
                '6' => [7, 4, 7, 5, 7],
                '7' => [7, 1, 1, 1, 1],
                '8' => [7, 5, 7, 5, 7],
                '9' => [7, 5, 7, 1, 7],
                '.' => [0, 0, 0, 0, 2],
                '-' => [0, 0, 7, 0, 0],
                'e' => [0, 7, 7, 4, 7],
                _ => [0; 5],
            };
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..3 {
                    if bits & (4 >> col) != 0 {
                        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                            let px = x + i * 8 + col * 2 + dx;
                            self.set(px as i64, (y + row * 2 + dy) as i64, color);
                        }
                    }
                }
            }
        }
    }
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
                ms_per_iter: (i < 20).then_some(12.5),
                tokens_per_second: (i < 20).then_some(1000.0),
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
        plot_png(&path, &rows())?;
        let bytes = fs_err::read(&path)?;
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // An empty record still gives a picture (axes only).
        plot_png(&path, &[])?;
        Ok(())
    }
}
