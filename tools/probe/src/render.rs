//! The report as a plain-text table (stdout) and as Markdown a person can attach to a bug.

use std::fmt::Write;

use crate::report::{Cell, Mechanism, Outcome, Report};

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
            evidence(c),
            c.predicted
        );
    }
    let against: Vec<String> = contradicting(r)
        .map(|c| format!("{} / {}", c.label(), c.mechanism.name()))
        .collect();
    let _ = writeln!(
        s,
        "\ncontradicting TRACKING.md: {} of {} cells{}",
        against.len(),
        r.cells.len(),
        if against.is_empty() {
            String::new()
        } else {
            format!(": {}", against.join("; "))
        }
    );
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

/// The cells whose outcome contradicts TRACKING.md's prediction.
fn contradicting(r: &Report) -> impl Iterator<Item = &Cell> {
    r.cells
        .iter()
        .filter(|c| c.matches_prediction == Some(false))
}

/// The evidence, after how the memory was armed where the cell armed it.
fn evidence(c: &Cell) -> String {
    match (&c.armed_by, c.cycles) {
        (Some(by), Some(n)) => format!(
            "[armed by {by}; {n} cycle{}] {}",
            if n == 1 { "" } else { "s" },
            c.evidence
        ),
        (Some(by), None) => format!("[armed by {by}] {}", c.evidence),
        _ => c.evidence.clone(),
    }
}

/// An outcome as a matrix entry: findings in bold, a contradicted prediction marked.
fn entry(c: &Cell) -> String {
    let o = c.outcome.short();
    let o = if matches!(
        c.outcome,
        Outcome::SilentMiss | Outcome::FalsePositive | Outcome::DeviceFault { .. }
    ) {
        format!("**{o}**")
    } else {
        o
    };
    if c.matches_prediction == Some(false) {
        format!("{o} (≠)")
    } else {
        o
    }
}

/// The cells as one matrix (a row per memory kind or life-cycle step, a column per mechanism),
/// then every cell that contradicts TRACKING.md: what a reader looks for first.
fn glance(s: &mut String, r: &Report) {
    let mut mechs: Vec<Mechanism> = Vec::new();
    let mut rows: Vec<String> = Vec::new();
    for c in &r.cells {
        if !mechs.contains(&c.mechanism) {
            mechs.push(c.mechanism);
        }
        if !rows.contains(&c.label()) {
            rows.push(c.label());
        }
    }
    if rows.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n## At a glance\n\n(≠: contradicts TRACKING.md's prediction; -: not tried)\n"
    );
    let head: Vec<&str> = mechs.iter().map(|m| m.name()).collect();
    let _ = writeln!(s, "| memory | {} |", head.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(mechs.len()));
    for row in &rows {
        let line: Vec<String> = mechs
            .iter()
            .map(|m| {
                r.cells
                    .iter()
                    .find(|c| &c.label() == row && c.mechanism == *m)
                    .map_or_else(|| "-".to_string(), |c| md(&entry(c)))
            })
            .collect();
        let _ = writeln!(s, "| {} | {} |", md(row), line.join(" | "));
    }
    let against: Vec<&Cell> = contradicting(r).collect();
    let _ = writeln!(
        s,
        "\n### Contradicting TRACKING.md ({} of {} cells)\n",
        against.len(),
        r.cells.len()
    );
    for c in against {
        let why = crate::explain::why(c).unwrap_or("not explained yet");
        let _ = writeln!(
            s,
            "- {} / {}: {}, predicted {}. **Why:** {}. Evidence: {}",
            md(&c.label()),
            c.mechanism.name(),
            c.outcome.short(),
            md(&c.predicted),
            md(why),
            md(&evidence(c))
        );
    }
}

pub fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# vmm-probe report (v{})\n", r.version);
    let _ = writeln!(s, "- kernel: `{}`", md(&r.host.kernel));
    if let Some(b) = &r.host.kernel_build {
        let _ = writeln!(s, "- kernel build: `{}`", md(b));
    }
    if let Some(c) = &r.host.kernel_config {
        let _ = writeln!(s, "- kernel config: {}", md(c));
    }
    if let Some(f) = &r.host.uffd_features {
        let _ = writeln!(
            s,
            "- userfaultfd features: `{f}` ({})",
            r.host.uffd_feature_names.join(", ")
        );
    }
    glance(&mut s, r);
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
            md(&evidence(c))
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
