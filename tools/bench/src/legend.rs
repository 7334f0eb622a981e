//! The chart's legend: one colour swatch per backend, the dashed "untracked" line, and the
//! backends this host could not run, so a missing colour is explained on the chart itself.
//!
//! Without a font (plotters' `ttf` feature is off) text cannot be measured, so entry widths are
//! estimated from the character count, generously, as plotters itself does.

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::chart::{ChartError, FONT};

/// Height of one legend row in pixels.
const ROW: i32 = 24;
/// Left and right margin of the legend rows.
const MARGIN: i32 = 20;
/// Room for the mark before the label.
const MARK: i32 = 30;

enum Mark {
    Swatch(RGBColor),
    Dashed,
    /// Text only, greyed.
    Remark,
}

struct Entry {
    mark: Mark,
    label: String,
    /// Top-left corner, once laid out.
    at: (i32, i32),
}

/// Legend entries laid out in rows for a chart `width` pixels wide.
pub(crate) struct Legend {
    entries: Vec<Entry>,
}

impl Legend {
    /// `colours[i]` is the colour of `backends[i]`.
    pub(crate) fn new(
        backends: &[String],
        colours: &[RGBColor],
        unsupported: &[String],
        width: i32,
    ) -> Self {
        let mut entries: Vec<Entry> = backends
            .iter()
            .zip(colours)
            .map(|(name, colour)| entry(Mark::Swatch(*colour), name.clone()))
            .collect();
        entries.push(entry(Mark::Dashed, "untracked (1.0x)".to_owned()));
        if !unsupported.is_empty() {
            let label = format!("unsupported on this host: {}", unsupported.join(", "));
            entries.push(entry(Mark::Remark, label));
        }
        let (mut x, mut y) = (MARGIN, 4);
        for e in &mut entries {
            let w = entry_width(e);
            // Wrap, unless the entry is first on its row (then it is simply too long to fit).
            if x + w > width - MARGIN && x > MARGIN {
                x = MARGIN;
                y += ROW;
            }
            e.at = (x, y);
            x += w;
        }
        Self { entries }
    }

    /// Pixels the legend needs, including a small gap below it.
    pub(crate) fn height(&self) -> i32 {
        self.entries.last().map_or(0, |e| e.at.1) + ROW + 8
    }

    pub(crate) fn draw(&self, area: &DrawingArea<SVGBackend<'_>, Shift>) -> Result<(), ChartError> {
        let style = TextStyle::from((FONT, 15)).pos(Pos::new(HPos::Left, VPos::Center));
        for e in &self.entries {
            let (x, y) = e.at;
            let mid = y + ROW / 2;
            let mut text_x = x + MARK;
            let mut text_style = style.clone();
            match e.mark {
                Mark::Swatch(colour) => {
                    area.draw(&Rectangle::new(
                        [(x, mid - 7), (x + 22, mid + 7)],
                        colour.filled(),
                    ))?;
                }
                Mark::Dashed => {
                    for dash in [0, 9, 18] {
                        area.draw(&PathElement::new(
                            vec![(x + dash, mid), (x + dash + 5, mid)],
                            BLACK.stroke_width(2),
                        ))?;
                    }
                }
                Mark::Remark => {
                    text_x = x;
                    text_style = text_style.color(&RGBColor(0x66, 0x66, 0x66));
                }
            }
            area.draw(&Text::new(e.label.as_str(), (text_x, mid), text_style))?;
        }
        Ok(())
    }
}

fn entry(mark: Mark, label: String) -> Entry {
    Entry {
        mark,
        label,
        at: (0, 0),
    }
}

fn entry_width(e: &Entry) -> i32 {
    let mark = if matches!(e.mark, Mark::Remark) {
        0
    } else {
        MARK
    };
    let chars = i32::try_from(e.label.chars().count()).unwrap_or(i32::MAX / 16);
    mark + 8 * chars + 24
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("backend-number-{i}")).collect()
    }

    #[test]
    fn short_legend_is_one_row() {
        let backends = names(2);
        let legend = Legend::new(&backends, &[BLACK, BLACK], &[], 1200);
        assert!(legend
            .entries
            .iter()
            .all(|e| e.at.1 == legend.entries[0].at.1));
        assert!(legend.height() < 2 * ROW);
    }

    #[test]
    fn long_legend_wraps_within_width() {
        let backends = names(12);
        let colours = vec![BLACK; 12];
        let legend = Legend::new(&backends, &colours, &["soft-dirty".to_owned()], 800);
        assert!(legend.height() > 2 * ROW);
        for e in &legend.entries {
            assert!(
                e.at.0 + entry_width(e) <= 800 - MARGIN,
                "{} overflows",
                e.label
            );
        }
    }
}
