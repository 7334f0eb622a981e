//! SVG chart of the device comparison: one stacked bar per mode and tool (vmm, vmm+gpu), the
//! downtime split into the parts vmm's source reports (medians of each part), with the median
//! downtime marked on each bar. A mode whose source reports no parts (hybrid) gets one unsplit
//! segment of its median downtime.
//!
//! With the stream scenario (`--stream-mib`) a second panel below it: throughput bars of vmm,
//! vmm+tls and the raw TCP copy of the same run, each marked with its MiB/s and its ratio to
//! raw TCP. The stream panel alone when no Linux-guest vmm run was made (`--stream-only`).
//!
//! plotters is built without its `ttf` feature: the SVG holds `<text>` elements and leaves the
//! glyphs to the viewer.

use plotters::coord::ranged1d::{SegmentValue, SegmentedCoord};
use plotters::coord::types::{RangedCoordf64, RangedCoordi32};
use plotters::coord::Shift;
use plotters::prelude::*;

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 600;
const FONT: &str = "sans-serif";
/// The segment kinds, in stacking order (bottom first), and their colours (Okabe-Ito).
const KINDS: [(&str, RGBColor); 7] = [
    ("pause", RGBColor(0x00, 0x72, 0xB2)),
    ("device stop", RGBColor(0xD5, 0x5E, 0x00)),
    ("final pages", RGBColor(0x56, 0xB4, 0xE9)),
    ("device data", RGBColor(0xE6, 0x9F, 0x00)),
    ("state", RGBColor(0x00, 0x9E, 0x73)),
    ("confirm", RGBColor(0xCC, 0x79, 0xA7)),
    ("not split", RGBColor(0x99, 0x99, 0x99)),
];

#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error("drawing the chart failed: {0}")]
    Draw(#[from] DrawingAreaErrorKind<std::io::Error>),
    #[error("nothing to draw: no vmm run succeeded and no stream figure")]
    Empty,
}

/// One bar: its label, its segments (kind from [`KINDS`], ms) bottom first, and the median
/// downtime it is marked with.
pub struct Bar {
    pub label: String,
    pub segments: Vec<(&'static str, f64)>,
    pub downtime_ms: f64,
}

pub struct ChartInput {
    pub title: String,
    pub bars: Vec<Bar>,
}

/// The stream panel: (label, MiB/s) bars, the raw TCP copy's last, and that copy's MiB/s (the
/// ratios' denominator).
pub struct StreamChart {
    pub title: String,
    pub bars: Vec<(String, f64)>,
    pub tcp_mib_s: Option<f64>,
}

fn colour(kind: &str) -> RGBColor {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or(BLACK, |&(_, c)| c)
}

/// Renders `input` (and `stream`, in a panel below it) as a standalone SVG document.
pub fn render(input: &ChartInput, stream: Option<&StreamChart>) -> Result<String, ChartError> {
    let stream = stream.filter(|s| !s.bars.is_empty());
    let downtime = !input.bars.is_empty();
    let panels = u32::from(downtime) + u32::from(stream.is_some());
    if panels == 0 {
        return Err(ChartError::Empty);
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT * panels)).into_drawing_area();
        root.fill(&WHITE)?;
        let areas = root.split_evenly((panels as usize, 1));
        let mut areas = areas.iter();
        if downtime {
            if let Some(area) = areas.next() {
                draw_downtime(area, input)?;
            }
        }
        if let (Some(s), Some(area)) = (stream, areas.next()) {
            draw_stream(area, s)?;
        }
        root.present()?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type BarChart<'a, 'b> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<SegmentedCoord<RangedCoordi32>, RangedCoordf64>>;

/// A panel's title and axes: one slot per label, which stands under it, and y from 0 to `top`.
/// Both panels share it so that they read as one figure.
fn bar_axes<'a, 'b>(
    root: &'a Area<'b>,
    title: &str,
    labels: &[&str],
    top: f64,
    y_desc: &str,
) -> Result<BarChart<'a, 'b>, ChartError> {
    let n = labels.len() as i32;
    let mut chart = ChartBuilder::on(root)
        .caption(title, (FONT, 18))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(labels.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => labels
                .get(*i as usize)
                .map_or(String::new(), |l| l.to_string()),
            SegmentValue::Last => String::new(),
        })
        .y_desc(y_desc)
        .label_style((FONT, 14))
        .draw()?;
    Ok(chart)
}

/// Slot `x`'s block from `bottom` to `top`, narrower than its slot so that bars stand apart.
fn block(x: i32, bottom: f64, top: f64, c: RGBColor) -> Rectangle<(SegmentValue<i32>, f64)> {
    let mut r = Rectangle::new(
        [
            (SegmentValue::Exact(x), bottom),
            (SegmentValue::Exact(x + 1), top),
        ],
        c.filled(),
    );
    r.set_margin(0, 0, 30, 30);
    r
}

/// The stream panel: one bar per tool and the raw TCP copy, labelled with MiB/s and / TCP.
fn draw_stream(root: &Area<'_>, s: &StreamChart) -> Result<(), ChartError> {
    let top = s.bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1.0) * 1.2;
    let labels: Vec<&str> = s.bars.iter().map(|b| b.0.as_str()).collect();
    let mut chart = bar_axes(root, &s.title, &labels, top, "MiB/s (median)")?;
    // The raw TCP bar is the last one, when there is a TCP figure.
    let tcp_bar = s.tcp_mib_s.map(|_| s.bars.len() - 1);
    chart.draw_series(s.bars.iter().enumerate().map(|(i, b)| {
        // The raw TCP bar (last) grey, the stream bars in the first kind's blue.
        let c = if Some(i) == tcp_bar {
            KINDS[6].1
        } else {
            KINDS[0].1
        };
        block(i as i32, 0.0, b.1, c)
    }))?;
    chart.draw_series(s.bars.iter().enumerate().map(|(i, b)| {
        let text = match s.tcp_mib_s.filter(|t| *t > 0.0) {
            Some(t) if Some(i) != tcp_bar => format!("{:.0} MiB/s ({:.2} x TCP)", b.1, b.1 / t),
            _ => format!("{:.0} MiB/s", b.1),
        };
        Text::new(
            text,
            (SegmentValue::CenterOf(i as i32), b.1 + top * 0.03),
            (FONT, 14).into_font().color(&BLACK),
        )
    }))?;
    Ok(())
}

/// The downtime panel (see the module's documentation).
fn draw_downtime(root: &Area<'_>, input: &ChartInput) -> Result<(), ChartError> {
    let top = input
        .bars
        .iter()
        .map(|b| b.downtime_ms.max(b.segments.iter().map(|s| s.1).sum()))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.2;
    {
        let labels: Vec<&str> = input.bars.iter().map(|b| b.label.as_str()).collect();
        let mut chart = bar_axes(
            root,
            &input.title,
            &labels,
            top,
            "downtime ms (median of each part)",
        )?;
        for &(kind, c) in &KINDS {
            let mut rects = Vec::new();
            for (i, bar) in input.bars.iter().enumerate() {
                let below: f64 = bar
                    .segments
                    .iter()
                    .take_while(|s| s.0 != kind)
                    .map(|s| s.1)
                    .sum();
                if let Some(&(_, ms)) = bar.segments.iter().find(|s| s.0 == kind) {
                    rects.push(block(i as i32, below, below + ms, c));
                }
            }
            if !rects.is_empty() {
                chart.draw_series(rects)?.label(kind).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour(kind).filled())
                });
            }
        }
        // The median downtime over each bar (the parts' medians need not add up to it).
        chart.draw_series(input.bars.iter().enumerate().map(|(i, b)| {
            Text::new(
                format!("{:.1} ms", b.downtime_ms),
                (SegmentValue::CenterOf(i as i32), b.downtime_ms + top * 0.03),
                (FONT, 14).into_font().color(&BLACK),
            )
        }))?;
        chart
            .draw_series(input.bars.iter().enumerate().map(|(i, b)| {
                PathElement::new(
                    [
                        (SegmentValue::Exact(i as i32), b.downtime_ms),
                        (SegmentValue::Exact(i as i32 + 1), b.downtime_ms),
                    ],
                    BLACK.stroke_width(2),
                )
            }))?
            .label("median downtime")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 12, y)], BLACK.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font((FONT, 13))
            .draw()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_bar_label_and_part_in_the_legend() {
        let input = ChartInput {
            title: "t".into(),
            bars: vec![
                Bar {
                    label: "precopy vmm".into(),
                    segments: vec![("pause", 1.0), ("state", 2.0), ("confirm", 5.0)],
                    downtime_ms: 8.5,
                },
                Bar {
                    label: "hybrid vmm+gpu".into(),
                    segments: vec![("not split", 20.0)],
                    downtime_ms: 20.0,
                },
            ],
        };
        let svg = render(&input, None).expect("renders");
        for text in [
            "precopy vmm",
            "hybrid vmm+gpu",
            "pause",
            "not split",
            "8.5 ms",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        let empty = ChartInput {
            title: "t".into(),
            bars: vec![],
        };
        assert!(render(&empty, None).is_err());
        let stream = StreamChart {
            title: "stream".into(),
            bars: vec![
                ("vmm".into(), 1800.0),
                ("vmm+tls".into(), 900.0),
                ("raw TCP".into(), 2000.0),
            ],
            tcp_mib_s: Some(2000.0),
        };
        // The stream panel alone (--stream-only), then both.
        let svg = render(&empty, Some(&stream)).expect("renders");
        for text in [
            "vmm+tls",
            "raw TCP",
            "1800 MiB/s (0.90 x TCP)",
            "2000 MiB/s",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        let both = render(&input, Some(&stream)).expect("renders");
        assert!(both.contains("precopy vmm") && both.contains("0.45 x TCP"));
        assert!(both.contains(&format!("height=\"{}\"", 2 * HEIGHT)));
    }
}
