//! Line charts as PNG files, drawn with `plotters`: a title, labelled axes, a legend and one
//! colour per series. The loss curve in a train output, the report's plots and `nanoflow
//! metrics`' overlay are all drawn here, so they look alike. Text is set in DejaVu Sans, shipped
//! in `assets/fonts/` (with its licence), so a plot needs no system fonts.

use std::path::Path;
use std::sync::Once;

use anyhow::{Context as _, anyhow};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

const FONT: &[u8] = include_bytes!("assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
pub const WIDTH: u32 = 900;
pub const HEIGHT: u32 = 540;

/// matplotlib's `tab10`: the colours people read loss curves in.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line of a chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// An index into the palette (wrapping); series sharing one share a colour.
    pub color: usize,
    /// Drawn thin and pale, behind the others (e.g. the noisy per-step training loss).
    pub faint: bool,
    /// Each point marked with a dot (e.g. evaluations, which are few).
    pub markers: bool,
}

impl Series {
    pub fn new(name: impl Into<String>, color: usize, points: Vec<(f64, f64)>) -> Series {
        Series { name: name.into(), points, color, faint: false, markers: false }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// Draws `chart` as the PNG `path`. Non-finite points are left out; a chart with no points
/// still gets its title and axes.
pub fn write_png(path: &Path, chart: &Chart) -> anyhow::Result<()> {
    let pixels = draw(chart).with_context(|| format!("could not draw `{}`", path.display()))?;
    super::replace(path, |temporary| {
        let file = std::io::BufWriter::new(fs_err::File::create(temporary)?);
        let mut encoder = png::Encoder::new(file, WIDTH, HEIGHT);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let write = || -> Result<(), png::EncodingError> {
            let mut writer = encoder.write_header()?;
            writer.write_image_data(&pixels)?;
            writer.finish()
        };
        write().with_context(|| format!("could not write `{}`", path.display()))
    })
}

/// The chart as RGB pixels, row by row.
fn draw(chart: &Chart) -> anyhow::Result<Vec<u8>> {
    static FONT_REGISTERED: Once = Once::new();
    FONT_REGISTERED.call_once(|| {
        // The font is compiled in and known to parse (a test draws text with it).
        let _ = register_font(FAMILY, FontStyle::Normal, FONT);
    });
    let series: Vec<Series> = chart
        .series
        .iter()
        .map(|series| Series {
            points: series.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect(),
            ..series.clone()
        })
        .collect();
    let (x_range, y_range) = ranges(&series);
    let mut pixels = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        let error = |error: &dyn std::fmt::Display| anyhow!("{error}");
        root.fill(&WHITE).map_err(|e| error(&e))?;
        let mut context = ChartBuilder::on(&root)
            .caption(&chart.title, (FAMILY, 22))
            .margin(14)
            .x_label_area_size(48)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range, y_range)
            .map_err(|e| error(&e))?;
        context
            .configure_mesh()
            .x_desc(&chart.x_label)
            .y_desc(&chart.y_label)
            .axis_desc_style((FAMILY, 16))
            .label_style((FAMILY, 13))
            .x_label_formatter(&|x| short_number(*x))
            .y_label_formatter(&|y| format!("{y:.2}"))
            .light_line_style(RGBColor(247, 247, 247))
            .bold_line_style(RGBColor(220, 220, 220))
            .draw()
            .map_err(|e| error(&e))?;
        // Faint series first, so the others are drawn over them.
        let mut order: Vec<&Series> = series.iter().collect();
        order.sort_by_key(|series| !series.faint);
        for series in order {
            let base = PALETTE[series.color % PALETTE.len()];
            let color = if series.faint { base.mix(0.35) } else { base.to_rgba() };
            let style = ShapeStyle { color, filled: false, stroke_width: if series.faint { 1 } else { 2 } };
            let drawn =
                context.draw_series(LineSeries::new(series.points.iter().copied(), style)).map_err(|e| error(&e))?;
            drawn.label(&series.name).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], style));
            if series.markers || series.points.len() == 1 {
                context
                    .draw_series(series.points.iter().map(|&point| Circle::new(point, 3, color.filled())))
                    .map_err(|e| error(&e))?;
            }
        }
        if !series.is_empty() {
            context
                .configure_series_labels()
                .label_font((FAMILY, 14))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(200, 200, 200))
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| error(&e))?;
        }
        root.present().map_err(|e| error(&e))?;
    }
    Ok(pixels)
}

/// The axes' ranges: every point inside, a little room above and below.
fn ranges(series: &[Series]) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let points = || series.iter().flat_map(|series| series.points.iter());
    let span = |values: &mut dyn Iterator<Item = f64>| {
        values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)))
    };
    let (mut x_min, mut x_max) = span(&mut points().map(|p| p.0));
    let (mut y_min, mut y_max) = span(&mut points().map(|p| p.1));
    if !x_min.is_finite() {
        (x_min, x_max, y_min, y_max) = (0.0, 1.0, 0.0, 1.0);
    }
    if x_max - x_min < 1e-12 {
        (x_min, x_max) = (x_min - 1.0, x_max + 1.0);
    }
    if y_max - y_min < 1e-12 {
        (y_min, y_max) = (y_min - 0.5, y_max + 0.5);
    }
    let pad = (y_max - y_min) * 0.05;
    (x_min..x_max, y_min - pad..y_max + pad)
}

/// `1500000.0` -> `1.5M`, `250.0` -> `250`: tick labels that fit.
pub fn short_number(x: f64) -> String {
    let magnitude = x.abs();
    let (value, suffix) = match magnitude {
        m if m >= 1e9 => (x / 1e9, "B"),
        m if m >= 1e6 => (x / 1e6, "M"),
        m if m >= 1e4 => (x / 1e3, "k"),
        _ => (x, ""),
    };
    let text = format!("{value:.2}");
    let text = if text.contains('.') { text.trim_end_matches('0').trim_end_matches('.') } else { &text };
    format!("{text}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(series: Vec<Series>) -> Chart {
        Chart { title: "loss".into(), x_label: "iteration".into(), y_label: "loss".into(), series }
    }

    /// Pixels of one colour, give or take anti-aliasing.
    fn count(pixels: &[u8], color: RGBColor) -> usize {
        pixels
            .chunks(3)
            .filter(|p| {
                (p[0] as i32 - color.0 as i32).abs() < 8
                    && (p[1] as i32 - color.1 as i32).abs() < 8
                    && (p[2] as i32 - color.2 as i32).abs() < 8
            })
            .count()
    }

    #[test]
    fn each_series_is_drawn_in_its_colour_and_text_is_drawn() -> anyhow::Result<()> {
        let line = |scale: f64| (0..50).map(|i| (i as f64, scale / (1.0 + i as f64))).collect::<Vec<_>>();
        let pixels = draw(&chart(vec![Series::new("train", 0, line(4.0)), Series::new("val", 1, line(4.4))]))?;
        assert!(count(&pixels, PALETTE[0]) > 200, "the train line");
        assert!(count(&pixels, PALETTE[1]) > 200, "the val line");
        // Text is black-ish: title, tick labels, axis names and legend.
        let dark = pixels.chunks(3).filter(|p| p.iter().all(|&c| c < 80)).count();
        assert!(dark > 1000, "text was drawn ({dark} dark pixels)");
        let empty = draw(&chart(vec![]))?;
        assert_eq!(count(&empty, PALETTE[0]), 0);
        Ok(())
    }

    #[test]
    fn points_that_are_not_finite_are_left_out() -> anyhow::Result<()> {
        let points = vec![(0.0, 1.0), (1.0, f64::NAN), (2.0, f64::INFINITY), (3.0, 0.5)];
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("plot.png");
        write_png(&path, &chart(vec![Series::new("loss", 2, points)]))?;
        assert_eq!(&fs_err::read(&path)?[..8], b"\x89PNG\r\n\x1a\n");
        Ok(())
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(short_number(1_500_000.0), "1.5M");
        assert_eq!(short_number(250.0), "250");
        assert_eq!(short_number(20_000.0), "20k");
        assert_eq!(short_number(0.25), "0.25");
        assert_eq!(short_number(3e9), "3B");
    }
}
