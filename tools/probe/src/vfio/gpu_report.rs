//! The GPU test device's no-IOMMU run (gpu_noiommu.rs), as the host saves and renders it:
//! `vmm probe --in-guest --gpu-device SOCK [--json] [--markdown PATH]`
//! (tools/probe/reports/lab-guest-gpu-noiommu.{json,md}).

use serde::{Deserialize, Serialize};

use crate::report::Cell;

/// One boot's steps and cells.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuRun {
    /// Seconds from `vmm run` to the probe's ready line, and to the end.
    pub ready_s: Option<f64>,
    pub elapsed_s: f64,
    /// The step lines (selftest::line's format).
    pub steps: Vec<String>,
    pub cells: Vec<Cell>,
}

fn esc(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// Markdown: the steps, then one table row per cell with TRACKING.md's prediction beside it.
pub fn markdown(r: &GpuRun) -> String {
    let mut out = String::from(
        "# The GPU test device under vfio-pci no-IOMMU in the lab guest\n\n\
         tools/gpu-test-device passed into the lab guest over vfio-user, bound to vfio-pci in \
         no-IOMMU mode there (tools/probe/src/vfio/gpu_noiommu.rs). \"device writes\" are its \
         own DMA engine's: RAM -> VRAM for the BAR, VRAM -> RAM at the buffer pages' physical \
         addresses for the buffer.\n\n",
    );
    out.push_str(&format!(
        "Boot: probe ready {} s after `vmm run`, done after {:.1} s.\n\n## Steps\n\n",
        r.ready_s.map_or("?".into(), |s| format!("{s:.1}")),
        r.elapsed_s
    ));
    for l in &r.steps {
        out.push_str(&format!("- `{}`\n", l.trim()));
    }
    out.push_str(
        "\n## Cells\n\n| memory | mechanism | writes | outcome | TRACKING.md | agrees | armed by | \
         evidence |\n|---|---|---|---|---|---|---|---|\n",
    );
    for c in &r.cells {
        let agrees = match c.matches_prediction {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {agrees} | {} | {} |\n",
            esc(&c.memory),
            c.mechanism.name(),
            esc(c.step.as_deref().unwrap_or("CPU writes")),
            esc(&c.outcome.short()),
            esc(&c.predicted),
            esc(c.armed_by.as_deref().unwrap_or("-")),
            esc(&c.evidence)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{Mechanism, Outcome};

    #[test]
    fn every_cell_is_one_row_with_its_pipes_escaped() {
        let cell = |outcome, m| Cell {
            memory: "VRAM | BAR1".into(),
            mechanism: Mechanism::SoftDirty,
            step: Some("device writes".into()),
            outcome,
            evidence: "wrote {1}\nreported {}".into(),
            predicted: "never dirty".into(),
            matches_prediction: m,
            armed_by: Some("clear_refs 4".into()),
            cycles: Some(1),
        };
        let r = GpuRun {
            ready_s: Some(80.0),
            elapsed_s: 95.5,
            steps: vec!["VFIO-STEP gpu-find: ok | x".into()],
            cells: vec![
                cell(Outcome::Works, Some(false)),
                cell(Outcome::NotApplicable, None),
            ],
        };
        let md = markdown(&r);
        let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| VRAM")).collect();
        assert_eq!(rows.len(), 2, "{md}");
        assert!(
            rows[0].contains("VRAM \\| BAR1") && rows[0].contains("**no**"),
            "{md}"
        );
        assert!(rows[1].ends_with("| wrote {1} reported {} |"), "{md}");
        assert!(md.contains("- `VFIO-STEP gpu-find: ok | x`"));
        assert!(md.contains("done after 95.5 s"));
        let back: GpuRun = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.cells.len(), 2);
    }
}
