//! The report as a plain-text table (stdout) and as Markdown a person can attach to a bug.

use std::fmt::Write;

use crate::report::{Cell, Outcome, Report};

fn matches(c: &Cell) -> &'static str {
    match c.matches_prediction {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

pub fn text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "vmm-probe report v{} on kernel {}",
        r.version, r.host.kernel
    );
    match (&r.host.uffd_features, &r.host.uffd_error) {
        (Some(f), _) => {
            let _ = writeln!(
                s,
                "userfaultfd features {f}: {}",
                r.host.uffd_feature_names.join(" ")
            );
        }
        (None, Some(e)) => {
            let _ = writeln!(s, "userfaultfd unavailable: {e}");
        }
        (None, None) => {}
    }
    let _ = writeln!(s, "\nmemory kinds:");
    for k in &r.kinds {
        let mark = if k.available { "ok " } else { "-- " };
        let _ = writeln!(s, "  {mark}{:<28} {}", k.memory, k.note);
    }
    let w_mem = r
        .cells
        .iter()
        .map(|c| c.label().len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(
        s,
        "\n{:<w_mem$}  {:<20}  {:<14}  {:<5}  evidence",
        "memory", "mechanism", "outcome", "pred?"
    );
    for c in &r.cells {
        let _ = writeln!(
            s,
            "{:<w_mem$}  {:<20}  {:<14}  {:<5}  {}  [predicted: {}]",
            c.label(),
            c.mechanism.name(),
            c.outcome.short(),
            matches(c),
            c.evidence,
            c.predicted
        );
    }
    let _ = writeln!(s, "\ndevices:");
    for d in &r.devices {
        let _ = writeln!(s, "  {:<5} {}", d.device, d.line);
    }
    let _ = writeln!(s, "\nnot covered by this version:");
    for n in &r.not_covered {
        let _ = writeln!(s, "  - {n}");
    }
    s
}

/// Escapes what would break a Markdown table cell.
fn md(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# vmm-probe report (v{})\n", r.version);
    let _ = writeln!(s, "- kernel: `{}`", md(&r.host.kernel));
    if let Some(f) = &r.host.uffd_features {
        let _ = writeln!(
            s,
            "- userfaultfd features: `{f}` ({})",
            r.host.uffd_feature_names.join(", ")
        );
    }
    let _ = writeln!(
        s,
        "\n## Memory kinds\n\n| memory | created | note |\n|---|---|---|"
    );
    for k in &r.kinds {
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            md(&k.memory),
            if k.available { "yes" } else { "no" },
            md(&k.note)
        );
    }
    let _ = writeln!(
        s,
        "\n## Cells\n\n| memory | mechanism | outcome | predicted (TRACKING.md) | matches | evidence |\n|---|---|---|---|---|---|"
    );
    for c in &r.cells {
        let outcome = if matches!(c.outcome, Outcome::SilentMiss | Outcome::FalsePositive) {
            format!("**{}**", c.outcome.short())
        } else {
            c.outcome.short()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            md(&c.label()),
            c.mechanism.name(),
            md(&outcome),
            md(&c.predicted),
            matches(c),
            md(&c.evidence)
        );
    }
    let _ = writeln!(s, "\n## Devices\n");
    for d in &r.devices {
        let _ = writeln!(s, "- {}: {}", d.device, md(&d.line));
    }
    let _ = writeln!(s, "\n## Not covered by this version\n");
    for n in &r.not_covered {
        let _ = writeln!(s, "- {}", md(n));
    }
    s
}
