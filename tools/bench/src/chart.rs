//! SVG chart of a report: (a) guest slowdown and (b) harvest cost per dirty page, as bars grouped
//! by workload with one bar per backend, stacked one above the other so both panels get the
//! full width that many workloads times many backends need.
//!
//! plotters is built without its `ttf` feature, so no font is loaded: the SVG backend writes
//! `<text>` elements and leaves the glyphs to the viewer, and layout uses plotters' estimate of
//! the text size.

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::axis::GroupAxis;
use super::format::tick;
use super::legend::Legend;
use super::palette;
use super::report::{BackendResult, BenchReport};

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 960;
pub(crate) const FONT: &str = "sans-serif";
/// Larger figures are left out: no benchmark measures them honestly, and plotters' tick search
/// never ends on an axis whose length overflows f64.
const MAX_DRAWABLE: f64 = 1e100;
/// Values spanning more than this factor go on a log axis, or the small bars would be invisible.
const LOG_SPAN: f64 = 100.0;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("drawing the benchmark chart failed: {0}")]
    Draw(#[from] DrawingAreaErrorKind<std::io::Error>),
}

/// One panel's bars: `values[workload][backend]`, `None` where there is nothing to draw.
struct Panel<'r> {
    caption: &'static str,
    y_desc: &'static str,
    workloads: &'r [String],
    colours: &'r [RGBColor],
    values: Vec<Vec<Option<f64>>>,
    /// Where to draw the dashed "untracked" line, if the panel has one.
    reference: Option<f64>,
}

/// Renders the report as a standalone SVG document.
pub fn render_svg(r: &BenchReport) -> Result<String, ChartError> {
    let backends = backend_order(r);
    let colours = palette::colours(&backends);
    let workloads: Vec<String> = r.workloads.iter().map(|w| w.label()).collect();
    let slowdown = Panel {
        caption: "(a) guest slowdown while tracked",
        y_desc: "guest time per round / untracked (x)",
        workloads: &workloads,
        colours: &colours,
        values: collect(r, &backends, |b| Some(b.slowdown)),
        reference: Some(1.0),
    };
    let harvest = Panel {
        caption: "(b) harvest cost per dirty page",
        y_desc: "harvest ns per dirty page",
        workloads: &workloads,
        colours: &colours,
        values: collect(r, &backends, |b| b.harvest_ns_per_dirty_page),
        reference: None,
    };

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let runs = if r.runs == 1 {
            "a single run".to_owned()
        } else {
            format!("medians of {} runs", r.runs)
        };
        let title = format!(
            "{}: {}, host {}{}",
            r.tool,
            runs,
            r.host,
            if r.host_detail.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.host_detail)
            }
        );
        let body = root.titled(&title, (FONT, 22))?;
        let unsupported: Vec<String> = r.unsupported.iter().map(|u| u.backend.clone()).collect();
        let legend = Legend::new(&backends, &colours, &unsupported, WIDTH as i32);
        let (legend_area, panels) = body.split_vertically(legend.height());
        legend.draw(&legend_area)?;
        let (top, bottom) = panels.split_vertically(panels.dim_in_pixel().1 / 2);
        draw_panel(&top, &slowdown)?;
        draw_panel(&bottom, &harvest)?;
        root.present()?;
    }
    Ok(svg)
}

/// Backends in order of first appearance, so every workload uses the same bar slot for each.
fn backend_order(r: &BenchReport) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    for b in r.workloads.iter().flat_map(|w| &w.backends) {
        if !order.contains(&b.backend) {
            order.push(b.backend.clone());
        }
    }
    order
}

/// `values[workload][backend slot]`, keeping only drawable figures: a NaN or infinite median
/// cannot be drawn and would poison the axis range, and so would an absurdly large one (see
/// [`MAX_DRAWABLE`]).
fn collect(
    r: &BenchReport,
    backends: &[String],
    figure: impl Fn(&BackendResult) -> Option<f64>,
) -> Vec<Vec<Option<f64>>> {
    r.workloads
        .iter()
        .map(|w| {
            backends
                .iter()
                .map(|name| {
                    w.backends
                        .iter()
                        .find(|b| &b.backend == name)
                        .and_then(&figure)
                        .filter(|v| v.is_finite() && v.abs() <= MAX_DRAWABLE)
                })
                .collect()
        })
        .collect()
}

fn draw_panel(area: &Area, panel: &Panel) -> Result<(), ChartError> {
    let drawn: Vec<f64> = panel.values.iter().flatten().flatten().copied().collect();
    if drawn.is_empty() || panel.workloads.is_empty() {
        return draw_no_data(area, panel.caption);
    }
    let max = drawn.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min = drawn.iter().copied().fold(f64::INFINITY, f64::min);
    let min_positive = drawn
        .iter()
        .copied()
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    if min_positive.is_finite() && max / min_positive > LOG_SPAN {
        // Whole decades at both ends, so the axis ticks land on round numbers. The bottom is
        // the decade strictly below the smallest bar and the reference line, so a bar of
        // exactly 10 still shows and the untracked line does not sit on the axis.
        let smallest = min_positive.min(panel.reference.unwrap_or(f64::INFINITY));
        let lo = 10f64.powf(smallest.log10().ceil() - 1.0);
        let hi = 10f64.powf(max.log10().ceil()).max(lo * 10.0);
        // Decades beyond f64's range (1e-324, 1e309) round to 0 or inf, which a log axis
        // cannot map; such absurd figures get the linear axis instead.
        if lo > 0.0 && hi.is_finite() {
            return draw_bars(area, panel, (lo..hi).log_scale(), lo, " (log scale)");
        }
    }
    let top = max.max(panel.reference.unwrap_or(0.0)).max(0.0);
    let lo = min.min(0.0);
    let hi = (top + (top - lo) * 0.12).min(f64::MAX);
    let hi = if hi > lo { hi } else { lo + 1.0 };
    draw_bars(area, panel, lo..hi, 0.0, "")
}

/// Draws the grouped bars on whichever y axis `draw_panel` chose; bars grow from `base`.
fn draw_bars<Y>(
    area: &Area,
    panel: &Panel,
    y: Y,
    base: f64,
    caption_suffix: &str,
) -> Result<(), ChartError>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let n = panel.workloads.len();
    let caption = format!("{}{}", panel.caption, caption_suffix);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(GroupAxis::new(n), y)?;
    // Ticks sit at the group centres, so each maps back to its workload by its integer part.
    let x_label = |x: &f64| {
        let i = x.floor().max(0.0) as usize;
        panel.workloads.get(i).cloned().unwrap_or_default()
    };
    let y_label = |v: &f64| tick(*v);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("workload")
        .y_desc(panel.y_desc)
        .x_label_formatter(&x_label)
        .y_label_formatter(&y_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;

    let slots = panel.values.first().map_or(1, Vec::len).max(1);
    // Groups fill 80% of each workload's unit, leaving a gap between workloads.
    let bar = 0.8 / slots as f64;
    for (slot, colour) in panel.colours.iter().enumerate().take(slots) {
        let bars = panel.values.iter().enumerate().filter_map(|(w, row)| {
            let value = row.get(slot).copied().flatten()?;
            let x0 = w as f64 + 0.1 + slot as f64 * bar;
            // The log axis cannot show zero or negatives; such a figure is left out, not faked.
            (base <= 0.0 || value > 0.0)
                .then(|| Rectangle::new([(x0, base), (x0 + bar * 0.9, value)], colour.filled()))
        });
        chart.draw_series(bars)?;
    }
    if let Some(level) = panel.reference {
        chart.draw_series(DashedLineSeries::new(
            vec![(0.0, level), (n as f64, level)],
            8,
            5,
            BLACK.stroke_width(2),
        ))?;
    }
    Ok(())
}

fn draw_no_data(area: &Area, caption: &str) -> Result<(), ChartError> {
    let inner = area.titled(caption, (FONT, 18))?;
    let (w, h) = inner.dim_in_pixel();
    let style = TextStyle::from((FONT, 20)).pos(Pos::new(HPos::Center, VPos::Center));
    inner.draw(&Text::new("no data", (w as i32 / 2, h as i32 / 2), style))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;

    #[test]
    fn renders_svg_with_backends_and_workloads() {
        let report = sample::report();
        let svg = render_svg(&report).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        for w in &report.workloads {
            assert!(svg.contains(&w.name), "workload {} missing", w.name);
        }
        for b in report.workloads.iter().flat_map(|w| &w.backends) {
            assert!(svg.contains(&b.backend), "backend {} missing", b.backend);
        }
        assert!(svg.contains("medians of 5 runs, host PVM"));
        assert!(svg.contains("untracked (1.0x)"));
        assert!(svg.contains("unsupported on this host: soft-dirty"));
    }

    #[test]
    fn wide_spread_uses_log_axis() {
        // The sample's ns/page spans 5.34 to 793, beyond LOG_SPAN.
        let svg = render_svg(&sample::report()).unwrap();
        assert!(svg.contains("log scale"));
    }

    #[test]
    fn empty_report_renders_no_data() {
        let svg = render_svg(&sample::empty()).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("no data"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn single_workload_single_run_renders() {
        let mut report = sample::report();
        report.workloads.truncate(1);
        report.runs = 1;
        let svg = render_svg(&report).unwrap();
        assert!(svg.contains("micro sweep"));
        assert!(svg.contains("a single run, host PVM"));
    }

    #[test]
    fn non_finite_values_are_skipped() {
        let mut report = sample::report();
        for b in &mut report.workloads[0].backends {
            b.slowdown = f64::NAN;
            b.harvest_ns_per_dirty_page = Some(f64::INFINITY);
        }
        report.workloads[1].backends[0].slowdown = f64::NEG_INFINITY;
        let svg = render_svg(&report).unwrap();
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn extreme_values_do_not_panic() {
        // Linear axis (zero and negatives), then log axes across hundreds of decades.
        for extremes in [
            [5e-324, 1e308, -1e308, 0.0, f64::MAX],
            [1e-300, 1e99, 3.0, 5e-324, 1e100],
        ] {
            let mut report = sample::report();
            for (b, v) in report.workloads[0].backends.iter_mut().zip(extremes) {
                b.slowdown = v;
                b.harvest_ns_per_dirty_page = Some(v);
            }
            assert!(render_svg(&report).unwrap().starts_with("<svg"));
        }
    }

    #[test]
    fn all_values_missing_renders_no_data() {
        let mut report = sample::report();
        for b in report.workloads.iter_mut().flat_map(|w| &mut w.backends) {
            b.slowdown = f64::NAN;
            b.harvest_ns_per_dirty_page = None;
        }
        let svg = render_svg(&report).unwrap();
        assert_eq!(svg.matches("no data").count(), 2);
    }

    #[test]
    fn workloads_without_backends_render() {
        let mut report = sample::report();
        for w in &mut report.workloads {
            w.backends.clear();
        }
        assert!(render_svg(&report).unwrap().contains("no data"));
    }
}
