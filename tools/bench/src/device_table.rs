//! Rendering of a `vmm bench tracking --device-scenario` report: an aligned text table (one
//! block per source and backend) and JSON.

use super::device_tracking::{DeviceReport, SOURCES};

/// The report as pretty-printed JSON.
pub fn to_json(r: &DeviceReport) -> String {
    serde_json::to_string_pretty(r)
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot serialise the report: {e}\"}}"))
}

const HEADERS: [&str; 9] = [
    "source",
    "backend",
    "memory",
    "written",
    "reported",
    "missed",
    "false pos",
    "rounds",
    "vram coverage",
];

/// The report as aligned text, ending in a newline.
pub fn render_table(r: &DeviceReport) -> String {
    let mut lines = vec![format!(
        "{}: host {} ({}); {} boot(s); device memory: {}",
        r.tool, r.host, r.host_detail, r.boots, r.device_memory
    )];
    let cells: Vec<[String; 9]> = r
        .rows
        .iter()
        .map(|w| {
            [
                w.source.clone(),
                w.backend.clone(),
                format!("{}{}", w.memory, if w.source_memory { " *" } else { "" }),
                w.written.to_string(),
                w.reported.to_string(),
                w.missed.to_string(),
                w.false_positives.to_string(),
                w.rounds.to_string(),
                if w.memory == "vram" {
                    if w.covered {
                        "covered".into()
                    } else {
                        format!("not covered: {}", w.coverage)
                    }
                } else {
                    String::new()
                },
            ]
        })
        .collect();
    let mut widths = HEADERS.map(|h| h.chars().count());
    for c in &cells {
        for (w, cell) in widths.iter_mut().zip(c).take(8) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |c: &[String]| {
        c.iter()
            .enumerate()
            .map(|(i, cell)| {
                let w = widths[i];
                match i {
                    0..=2 => format!("{cell:<w$}"),
                    8 => cell.clone(),
                    _ => format!("{cell:>w$}"),
                }
            })
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    lines.push(String::new());
    for (source, what) in SOURCES {
        lines.push(format!("{source}: {what}"));
    }
    lines.push(String::new());
    lines.push(format!("  {}", line(&HEADERS.map(str::to_owned))));
    let mut last = String::new();
    for (row, c) in r.rows.iter().zip(&cells) {
        let key = format!("{}/{}", row.source, row.backend);
        if !last.is_empty() && key != last {
            lines.push(String::new());
        }
        last = key;
        lines.push(format!("  {}", line(c)));
    }
    if !r.unsupported.is_empty() {
        lines.push(String::new());
        for u in &r.unsupported {
            lines.push(format!("{}: unsupported: {}", u.backend, u.reason));
        }
    }
    lines.push(String::new());
    lines.push("notes:".into());
    for n in &r.notes {
        lines.push(format!("  - {n}"));
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}
