//! SVG plots of a run: training loss terms over steps, retrieval before and after per language.

use std::path::Path;

use plotters::prelude::*;

use crate::train::StepRecord;
use crate::{Error, Result};

fn plot_error(e: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("plotting failed: {e}"))
}

/// Draws every loss term of `records` against the step as an SVG file (written atomically).
pub fn plot_training(records: &[StepRecord], path: &Path) -> Result<()> {
    if records.is_empty() {
        return Err(Error::InvalidArgument("no training records to plot".into()));
    }
    type Term = (&'static str, fn(&StepRecord) -> Option<f32>, RGBColor);
    let terms: [Term; 4] = [
        ("total", |r| Some(r.loss), BLACK),
        ("sentence", |r| r.sentence, BLUE),
        ("word", |r| r.word, GREEN),
        ("mlm (unweighted)", |r| r.mlm, RED),
    ];
    let finite = |v: f32| v.is_finite().then_some(v);
    let values = records
        .iter()
        .flat_map(|r| terms.iter().filter_map(move |t| t.1(r).and_then(finite)));
    let (lo, hi) = values.fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo.min(0.0), hi.max(lo + 1e-3))
    } else {
        (0.0, 1.0)
    };
    let last = records.last().map_or(1, |r| r.step).max(2);

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("training loss", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(1u64..last, lo..hi * 1.05)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .draw()
            .map_err(plot_error)?;
        for (name, get, color) in terms {
            let points: Vec<(u64, f32)> = records
                .iter()
                .filter_map(|r| get(r).and_then(finite).map(|v| (r.step, v)))
                .collect();
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(plot_error)?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    crate::fs::write_atomic(path, svg.as_bytes())
}

/// One language's retrieval accuracy before and after training.
#[derive(Debug, Clone, PartialEq)]
pub struct BeforeAfter {
    /// Language (or pair) label.
    pub label: String,
    /// Accuracy before training, in [0, 1].
    pub before: f32,
    /// Accuracy after training, in [0, 1].
    pub after: f32,
}

/// Draws grouped bars of accuracy before (grey) and after (blue) per language as an SVG file.
pub fn plot_before_after(title: &str, rows: &[BeforeAfter], path: &Path) -> Result<()> {
    if rows.is_empty() {
        return Err(Error::InvalidArgument("no rows to plot".into()));
    }
    let top = rows
        .iter()
        .map(|r| r.before.max(r.after))
        .fold(0.0f32, f32::max)
        .max(0.05)
        * 1.15;
    let labels: Vec<String> = rows.iter().map(|r| r.label.clone()).collect();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f32..rows.len() as f32, 0f32..top)
            .map_err(plot_error)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(rows.len() * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.floor() as usize;
                if (x - x.floor() - 0.5).abs() < 0.26 {
                    labels.get(i).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_desc("acc@1")
            .draw()
            .map_err(plot_error)?;
        let bars = |offset: f32, color: RGBColor, get: fn(&BeforeAfter) -> f32| {
            rows.iter().enumerate().map(move |(i, r)| {
                let x = i as f32 + offset;
                Rectangle::new([(x, 0.0), (x + 0.35, get(r))], color.filled())
            })
        };
        chart
            .draw_series(bars(0.12, RGBColor(160, 160, 160), |r| r.before))
            .map_err(plot_error)?
            .label("before")
            .legend(|(x, y)| {
                Rectangle::new(
                    [(x, y - 5), (x + 12, y + 5)],
                    RGBColor(160, 160, 160).filled(),
                )
            });
        chart
            .draw_series(bars(0.53, BLUE, |r| r.after))
            .map_err(plot_error)?
            .label("after")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], BLUE.filled()));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    crate::fs::write_atomic(path, svg.as_bytes())
}
