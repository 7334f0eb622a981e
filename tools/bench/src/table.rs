//! Plain-text rendering of a report: one aligned table per workload, for a terminal or a log.

use super::format::{or_dash, ratio, sig3};
use super::report::{BackendResult, BenchReport, WorkloadResult};

/// Column headers; the first column (backend) is left-aligned, the figures right-aligned.
const HEADERS: [&str; 12] = [
    "backend",
    "slowdown",
    "+us/dirty page",
    "dirty/round",
    "expected",
    "misses",
    "false pos",
    "harvest us/round",
    "ns/page",
    "CPU us/round",
    "vs raw ioctl",
    "mem KiB",
];

/// Columns are separated by this much space; wide enough to read, narrow enough for 132 columns.
const GUTTER: &str = "  ";

/// Renders the whole report as text, ending in a newline.
pub fn render_table(r: &BenchReport) -> String {
    let mut lines = vec![header_line(r)];
    for w in &r.workloads {
        lines.push(String::new());
        lines.extend(workload_block(w));
    }
    if !r.unsupported.is_empty() {
        lines.push(String::new());
        for u in &r.unsupported {
            lines.push(format!("{}: unsupported: {}", u.backend, u.reason));
        }
    }
    if !r.notes.is_empty() {
        lines.push(String::new());
        lines.push("notes:".to_owned());
        for note in &r.notes {
            lines.push(format!("  - {note}"));
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

fn header_line(r: &BenchReport) -> String {
    let detail = if r.host_detail.is_empty() {
        String::new()
    } else {
        format!(" ({})", r.host_detail)
    };
    let runs = if r.runs == 1 {
        "figures are from a single run".to_owned()
    } else {
        format!("figures are medians of {} runs", r.runs)
    };
    format!("{}: host {}{}; {}", r.tool, r.host, detail, runs)
}

fn workload_block(w: &WorkloadResult) -> Vec<String> {
    let mut lines = vec![format!(
        "{}, {} MiB ({} pages), {} rounds per run; untracked: {} ms/round",
        w.label(),
        w.region_mib,
        w.pages,
        w.rounds_per_run,
        sig3(w.baseline.guest_ms_per_round),
    )];
    if w.backends.is_empty() {
        lines.push("  (no backend results)".to_owned());
        return lines;
    }
    let rows: Vec<[String; 12]> = w.backends.iter().map(row).collect();
    let widths = column_widths(&rows);
    let header = HEADERS.map(str::to_owned);
    lines.push(format!("  {}", align(&header, &widths)));
    let rule_width = widths.iter().sum::<usize>() + GUTTER.len() * (widths.len() - 1);
    lines.push(format!("  {}", "-".repeat(rule_width)));
    for cells in &rows {
        lines.push(format!("  {}", align(cells, &widths)));
    }
    // Notes go under the table rather than in a column: they are free text of any length and
    // would otherwise stretch every row.
    for b in &w.backends {
        if let Some(note) = &b.note {
            lines.push(format!("  note: {}: {note}", b.backend));
        }
    }
    lines
}

fn row(b: &BackendResult) -> [String; 12] {
    [
        b.backend.clone(),
        ratio(b.slowdown),
        or_dash(b.extra_guest_us_per_dirty_page, sig3),
        sig3(b.dirty_pages_per_round),
        or_dash(b.expected_pages_per_round, sig3),
        or_dash(b.misses, |v| v.to_string()),
        or_dash(b.false_positives, |v| v.to_string()),
        sig3(b.harvest_us_per_round),
        or_dash(b.harvest_ns_per_dirty_page, sig3),
        sig3(b.harvest_cpu_us_per_round),
        or_dash(b.harvest_vs_raw, ratio),
        b.memory_overhead_kib.to_string(),
    ]
}

fn column_widths(rows: &[[String; 12]]) -> [usize; 12] {
    let mut widths = HEADERS.map(|h| h.chars().count());
    for cells in rows {
        for (width, cell) in widths.iter_mut().zip(cells) {
            *width = (*width).max(cell.chars().count());
        }
    }
    widths
}

fn align(cells: &[String; 12], widths: &[usize; 12]) -> String {
    let padded: Vec<String> = cells
        .iter()
        .zip(widths)
        .enumerate()
        .map(|(i, (cell, &w))| {
            if i == 0 {
                format!("{cell:<w$}")
            } else {
                format!("{cell:>w$}")
            }
        })
        .collect();
    padded.join(GUTTER)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;

    /// The table lines of the first workload block: header, rule, then one row per backend.
    fn first_table(text: &str) -> Vec<&str> {
        text.lines()
            .skip_while(|l| !l.trim_start().starts_with("backend"))
            .take_while(|l| !l.is_empty() && !l.trim_start().starts_with("note:"))
            .collect()
    }

    #[test]
    fn header_names_host_detail_and_runs() {
        let text = render_table(&sample::report());
        let first = text.lines().next().unwrap_or_default();
        assert!(first.contains("host PVM"), "{first}");
        assert!(first.contains("6.8.0-pvm, 2 CPUs"), "{first}");
        assert!(first.contains("figures are medians of 5 runs"), "{first}");
    }

    #[test]
    fn columns_align() {
        let report = sample::report();
        let text = render_table(&report);
        let table = first_table(&text);
        assert_eq!(table.len(), 2 + report.workloads[0].backends.len());
        let width = table[0].chars().count();
        for line in &table {
            assert_eq!(line.chars().count(), width, "misaligned: {line:?}");
        }
        // Right-aligned figures: the last column ends at the same place on every line.
        assert!(table.iter().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn workload_title_has_size_rounds_and_baseline() {
        let text = render_table(&sample::report());
        assert!(text.contains(
            "micro sweep, 256 MiB (65536 pages), 8 rounds per run; untracked: 12.3 ms/round"
        ));
    }

    #[test]
    fn missing_figures_show_dash() {
        let text = render_table(&sample::report());
        // The Linux workload has no ground truth, so misses and false positives are "-".
        let linux_row = text
            .lines()
            .skip_while(|l| !l.starts_with("linux agent random"))
            .find(|l| l.trim_start().starts_with("bitmap "))
            .unwrap_or_default();
        let cells: Vec<&str> = linux_row.split_whitespace().collect();
        assert_eq!(cells[5], "-", "{linux_row}");
        assert_eq!(cells[6], "-", "{linux_row}");
    }

    #[test]
    fn ratios_and_counts_are_formatted() {
        let text = render_table(&sample::report());
        assert!(text.contains("1.07x"));
        assert!(text.contains("65536"));
    }

    #[test]
    fn unsupported_and_notes_listed() {
        let text = render_table(&sample::report());
        assert!(text.contains("soft-dirty: unsupported: CONFIG_MEM_SOFT_DIRTY is off"));
        assert!(text.contains("notes:\n  - "));
        assert!(text.contains("note: ring: "));
    }

    #[test]
    fn empty_report_renders_header_only() {
        let text = render_table(&sample::empty());
        assert_eq!(text.lines().count(), 1);
        assert!(text.contains("figures are medians of 0 runs"));
    }
}
