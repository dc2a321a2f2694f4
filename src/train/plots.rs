//! Line charts of a run (SVG, drawn with plotters): losses per epoch and Recall@1 per
//! evaluation.

use std::path::Path;

use plotters::prelude::*;

use crate::error::Cause;

use super::EpochRecord;
use super::run_dir::RunDir;
use super::step::Loss;

/// One named line.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// A chart that could not be drawn or written.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw {}", path.display())]
pub struct PlotError {
    pub path: std::path::PathBuf,
    #[source]
    pub source: Cause,
}

fn plot_error(path: &Path) -> impl Fn(Cause) -> PlotError + '_ {
    move |source| PlotError {
        path: path.to_path_buf(),
        source,
    }
}

// plotters' errors are generic over the backend; only their text is kept.
fn cause(e: impl std::fmt::Display) -> Cause {
    Cause(e.to_string())
}

/// Draws `series` into an SVG file at `path`.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), PlotError> {
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(cause)
        .and_then(|_| draw(&root, title, x_label, y_label, series))
        .and_then(|_| root.present().map_err(cause))
        .map_err(plot_error(path))
}

/// Draws several charts side by side into one SVG file.
pub fn line_charts(
    path: &Path,
    panels: &[(&str, &str, &str, Vec<Series>)],
) -> Result<(), PlotError> {
    let root = SVGBackend::new(path, (640 * panels.len().max(1) as u32, 480)).into_drawing_area();
    let drawn = (|| {
        root.fill(&WHITE).map_err(cause)?;
        let areas = root.split_evenly((1, panels.len().max(1)));
        for (area, (title, x, y, series)) in areas.iter().zip(panels) {
            draw(area, title, x, y, series)?;
        }
        root.present().map_err(cause)
    })();
    drawn.map_err(plot_error(path))
}

fn draw(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), Cause> {
    let points = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in points {
        if y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(cause)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .draw()
        .map_err(cause)?;
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.1.is_finite())
            .collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
            .map_err(cause)?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, colour.filled())))
            .map_err(cause)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(cause)?;
    Ok(())
}

/// Recall@1 per evaluated epoch of `split` ("test" or "validation").
pub fn recall_curve(records: &[EpochRecord], split: &str) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| {
            let m = if split == "test" {
                r.test.as_ref()
            } else {
                r.validation.as_ref()
            }?;
            Some((r.epoch as f64, *m.recall.get("1")?))
        })
        .collect()
}

/// `losses.svg` (the metric update's losses, and the classifier's and generator's, which are
/// on another scale) and `recall.svg` of a run.
pub fn run_plots(run: &RunDir, records: &[EpochRecord]) -> Result<(), PlotError> {
    let trained: Vec<&EpochRecord> = records.iter().filter(|r| r.epoch > 0).collect();
    let panel = |losses: &[Loss]| -> Vec<Series> {
        losses
            .iter()
            .map(|l| l.name())
            .filter(|n| {
                trained
                    .iter()
                    .any(|r| r.losses.get(*n).is_some_and(|v| *v != 0.0))
            })
            .map(|n| Series {
                name: n.to_string(),
                points: trained
                    .iter()
                    .filter_map(|r| Some((r.epoch as f64, *r.losses.get(n)?)))
                    .collect(),
            })
            .collect()
    };
    line_charts(
        &run.losses_plot(),
        &[
            (
                "Metric update (mean per epoch)",
                "epoch",
                "loss",
                panel(&[Loss::M, Loss::Syn, Loss::Gnnce, Loss::Metric]),
            ),
            (
                "Classifier and generator (mean per epoch)",
                "epoch",
                "loss",
                panel(&[Loss::Softce, Loss::Gence, Loss::Div, Loss::Gen]),
            ),
        ],
    )?;
    let mut recall = vec![Series {
        name: "test R@1".into(),
        points: recall_curve(records, "test"),
    }];
    let validation = recall_curve(records, "validation");
    if !validation.is_empty() {
        recall.push(Series {
            name: "validation R@1".into(),
            points: validation,
        });
    }
    line_chart(&run.recall_plot(), "Recall@1", "epoch", "R@1 (%)", &recall)
}
