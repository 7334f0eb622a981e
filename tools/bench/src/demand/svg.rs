//! SVG chart of a `vmm bench demand` report: pages/s per vCPU as bars grouped by case (vCPU
//! count), one bar per backend (the eager baseline first), one panel per placement.

use plotters::prelude::*;

use super::model::{DemandBenchReport, EAGER};
use crate::axis::GroupAxis;
use crate::chart::{ChartError, FONT};
use crate::format::tick;

const WIDTH: u32 = 1200;
const PANEL_HEIGHT: u32 = 460;
/// Okabe-Ito colours (distinguishable with the common colour-vision deficiencies) and a few
/// more; the eager baseline is dark grey.
const COLOURS: [RGBColor; 9] = [
    RGBColor(0x00, 0x72, 0xB2),
    RGBColor(0xD5, 0x5E, 0x00),
    RGBColor(0x00, 0x9E, 0x73),
    RGBColor(0xCC, 0x79, 0xA7),
    RGBColor(0x56, 0xB4, 0xE9),
    RGBColor(0xE6, 0x9F, 0x00),
    RGBColor(0x88, 0x22, 0x55),
    RGBColor(0x44, 0xAA, 0x99),
    RGBColor(0x99, 0x99, 0x33),
];
/// Values spanning more than this factor go on a log axis.
const LOG_SPAN: f64 = 100.0;

/// A bar series: backend (with " (page-server)" for the out-of-process handler).
fn series_name(handler: &str, backend: &str) -> String {
    if handler == "page-server" {
        format!("{backend} (page-server)")
    } else {
        backend.to_owned()
    }
}

/// The report as a standalone SVG document.
pub fn render_svg(r: &DemandBenchReport) -> Result<String, ChartError> {
    let mut placements: Vec<String> = Vec::new();
    let mut series: Vec<String> = Vec::new();
    for row in r.cases.iter().flat_map(|c| &c.rows) {
        if !placements.contains(&row.placement) {
            placements.push(row.placement.clone());
        }
        let s = series_name(&row.handler, &row.backend);
        if !series.contains(&s) {
            series.push(s);
        }
    }
    // The baseline first, so it sits at the left of every group.
    series.sort_by_key(|s| s != EAGER);
    let colours: Vec<RGBColor> = series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if s == EAGER {
                RGBColor(0x33, 0x33, 0x33)
            } else {
                COLOURS[i % COLOURS.len()]
            }
        })
        .collect();
    let groups: Vec<String> = r.cases.iter().map(|c| c.label.clone()).collect();
    let panels = placements.len().max(1) as u32;
    let height = 120 + PANEL_HEIGHT * panels;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let runs = if r.runs == 1 {
            "a single run".to_owned()
        } else {
            format!("medians of {} runs", r.runs)
        };
        let pvm = if r.is_pvm() {
            " - PVM timings, not hardware"
        } else {
            ""
        };
        let title = format!(
            "{}: pages/s per vCPU, {runs}, host {} ({}){pvm}",
            r.tool, r.host, r.host_detail
        );
        let (top, footer) = root.split_vertically(height - 30);
        let body = top.titled(&title, (FONT, 20))?;
        if placements.is_empty() {
            body.draw(&Text::new(
                "no data",
                (WIDTH as i32 / 2 - 30, 100),
                (FONT, 20),
            ))?;
        }
        let areas = body.split_evenly((placements.len().max(1), 1));
        for (area, placement) in areas.iter().zip(&placements) {
            // values[group][series]
            let values: Vec<Vec<Option<f64>>> = r
                .cases
                .iter()
                .map(|c| {
                    series
                        .iter()
                        .map(|s| {
                            c.rows
                                .iter()
                                .find(|row| {
                                    &row.placement == placement
                                        && series_name(&row.handler, &row.backend) == *s
                                })
                                .and_then(|row| row.pages_per_s_per_vcpu)
                                .filter(|v| v.is_finite() && *v > 0.0 && *v < 1e100)
                        })
                        .collect()
                })
                .collect();
            let caption = format!(
                "{placement}: {}",
                if placement == "pinned" {
                    "every thread on CPU 0 (taskset -c 0)"
                } else {
                    "threads free on every CPU"
                }
            );
            draw_panel(area, &caption, &groups, &series, &colours, &values)?;
        }
        if !r.refused.is_empty() {
            let text = r
                .refused
                .iter()
                .map(|x| format!("{}: refused ({})", x.backend, x.reason))
                .collect::<Vec<_>>()
                .join("; ");
            footer.draw(&Text::new(
                text,
                (20, 6),
                (FONT, 14).into_font().color(&RGBColor(0x66, 0x66, 0x66)),
            ))?;
        }
        root.present()?;
    }
    Ok(svg)
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    caption: &str,
    groups: &[String],
    series: &[String],
    colours: &[RGBColor],
    values: &[Vec<Option<f64>>],
) -> Result<(), ChartError> {
    let drawn: Vec<f64> = values.iter().flatten().flatten().copied().collect();
    if drawn.is_empty() {
        let inner = area.titled(caption, (FONT, 16))?;
        inner.draw(&Text::new(
            "no data",
            (WIDTH as i32 / 2 - 30, 60),
            (FONT, 18),
        ))?;
        return Ok(());
    }
    let max = drawn.iter().copied().fold(0.0, f64::max);
    let min = drawn.iter().copied().fold(f64::INFINITY, f64::min);
    let log = max / min > LOG_SPAN;
    let n = groups.len();
    let x_label = |x: &f64| {
        groups
            .get(x.floor().max(0.0) as usize)
            .cloned()
            .unwrap_or_default()
    };
    let y_label = |v: &f64| tick(*v);
    let slots = series.len().max(1);
    let bar = 0.8 / slots as f64;
    macro_rules! bars {
        ($chart:expr, $base:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .disable_x_mesh()
                .x_desc("vCPUs (each on its own region; + shared: also one region all write)")
                .y_desc("pages/s per vCPU")
                .x_label_formatter(&x_label)
                .y_label_formatter(&y_label)
                .label_style((FONT, 13))
                .axis_desc_style((FONT, 14))
                .draw()?;
            for (slot, (name, colour)) in series.iter().zip(colours).enumerate() {
                let colour = *colour;
                let rects: Vec<_> = values
                    .iter()
                    .enumerate()
                    .filter_map(|(g, row)| {
                        let v = row.get(slot).copied().flatten()?;
                        let x0 = g as f64 + 0.1 + slot as f64 * bar;
                        Some(Rectangle::new(
                            [(x0, $base), (x0 + bar * 0.9, v)],
                            colour.filled(),
                        ))
                    })
                    .collect();
                chart
                    .draw_series(rects)?
                    .label(name.clone())
                    .legend(move |(x, y)| {
                        Rectangle::new([(x, y - 5), (x + 14, y + 5)], colour.filled())
                    });
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font((FONT, 13))
                .draw()?;
        }};
    }
    let caption = if log {
        format!("{caption} (log scale)")
    } else {
        caption.to_owned()
    };
    let mut builder = ChartBuilder::on(area);
    builder
        .caption(caption, (FONT, 16))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(80);
    if log {
        let lo = 10f64.powf(min.log10().floor());
        let hi = 10f64.powf(max.log10().ceil() + 0.3);
        bars!(
            builder.build_cartesian_2d(GroupAxis::new(n), (lo..hi).log_scale())?,
            lo
        );
    } else {
        bars!(
            builder.build_cartesian_2d(GroupAxis::new(n), 0.0..max * 1.25)?,
            0.0
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::render::tests::sample_report;
    use super::*;

    #[test]
    fn renders_every_case_and_backend() {
        let svg = render_svg(&sample_report()).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        for s in [
            "2 vCPUs",
            "uffd-missing",
            "memslot-exits",
            EAGER,
            "pinned",
            "free",
        ] {
            assert!(svg.contains(s), "{s} missing");
        }
        assert!(svg.contains("PVM timings, not hardware"));
        assert!(svg.contains("kvm-userfault: refused"));
    }

    #[test]
    fn empty_and_missing_figures_render() {
        let mut r = sample_report();
        for row in &mut r.cases[0].rows {
            row.pages_per_s_per_vcpu = None;
        }
        assert!(render_svg(&r).unwrap().contains("no data"));
        r.cases.clear();
        assert!(render_svg(&r).unwrap().contains("no data"));
    }
}
