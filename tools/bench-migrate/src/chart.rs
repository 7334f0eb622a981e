//! SVG chart of the device comparison: one stacked bar per mode and tool (vmm, vmm+gpu), the
//! downtime split into the parts vmm's source reports (medians of each part), with the median
//! downtime marked on each bar. A mode whose source reports no parts (hybrid) gets one unsplit
//! segment of its median downtime.
//!
//! plotters is built without its `ttf` feature: the SVG holds `<text>` elements and leaves the
//! glyphs to the viewer.

use plotters::coord::ranged1d::SegmentValue;
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
    #[error("nothing to draw: no vmm run succeeded")]
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

fn colour(kind: &str) -> RGBColor {
    KINDS
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or(BLACK, |&(_, c)| c)
}

/// Renders `input` as a standalone SVG document.
pub fn render(input: &ChartInput) -> Result<String, ChartError> {
    if input.bars.is_empty() {
        return Err(ChartError::Empty);
    }
    let n = input.bars.len() as i32;
    let top = input
        .bars
        .iter()
        .map(|b| b.downtime_ms.max(b.segments.iter().map(|s| s.1).sum()))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.2;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(&input.title, (FONT, 18))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..top)?;
        let labels: Vec<&str> = input.bars.iter().map(|b| b.label.as_str()).collect();
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
            .y_desc("downtime ms (median of each part)")
            .label_style((FONT, 14))
            .draw()?;
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
                    let x = i as i32;
                    let mut r = Rectangle::new(
                        [
                            (SegmentValue::Exact(x), below),
                            (SegmentValue::Exact(x + 1), below + ms),
                        ],
                        c.filled(),
                    );
                    r.set_margin(0, 0, 30, 30);
                    rects.push(r);
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
        root.present()?;
    }
    Ok(svg)
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
        let svg = render(&input).expect("renders");
        for text in [
            "precopy vmm",
            "hybrid vmm+gpu",
            "pause",
            "not split",
            "8.5 ms",
        ] {
            assert!(svg.contains(text), "{text} missing");
        }
        assert!(render(&ChartInput {
            title: "t".into(),
            bars: vec![]
        })
        .is_err());
    }
}
