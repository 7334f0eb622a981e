//! Text and JSON renderings of a `vmm bench passthrough` report.

use super::model::PassthroughBenchReport;
use crate::format::{ratio, sig3};

/// The report as JSON (pretty-printed, no trailing newline).
pub fn to_json(r: &PassthroughBenchReport) -> String {
    serde_json::to_string_pretty(r).unwrap_or_else(|e| {
        serde_json::json!({ "error": format!("cannot serialise the report: {e}") }).to_string()
    })
}

/// Reads a report written by [`to_json`].
pub fn from_json(s: &str) -> Result<PassthroughBenchReport, serde_json::Error> {
    serde_json::from_str(s)
}

/// Rows of cells, the first column left-aligned, the others right-aligned.
fn columns(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(c, s)| match c {
                0 => format!("{s:<w$}", w = widths[c]),
                _ => format!("{s:>w$}", w = widths[c]),
            })
            .collect();
        out += cells.join("  ").trim_end();
        out.push('\n');
    }
    out
}

pub fn render_table(r: &PassthroughBenchReport) -> String {
    let mut out = format!(
        "{}: host {} ({}), {} build, {} of {} runs ok, medians\n\
         guest {} MiB, {} iterations, trapped page via {}, DMA buffer {} ({} bytes)\n\n",
        r.tool,
        r.host,
        r.host_detail,
        r.build,
        r.runs_ok,
        r.runs,
        r.mem_mib,
        r.iterations,
        r.trapped_via,
        r.dma_contig,
        r.dma_bytes
    );
    let mut rows = vec![vec![
        "figure".to_owned(),
        "median".into(),
        "unit".into(),
        "per run".into(),
    ]];
    for f in r.figures.iter().chain(&r.kernel_vfio_dma_map) {
        let runs: Vec<String> = f.samples.iter().map(|&s| sig3(s)).collect();
        rows.push(vec![
            f.label.clone(),
            sig3(f.median),
            f.unit.clone(),
            runs.join(" "),
        ]);
    }
    out += &columns(&rows);
    out.push('\n');
    let mut rows = vec![vec!["ratio".to_owned(), "of medians".into()]];
    for q in &r.ratios {
        rows.push(vec![q.label.clone(), ratio(q.value)]);
    }
    out += &columns(&rows);
    if let Some(why) = &r.kernel_vfio_skipped {
        out += &format!("\nkernel VFIO DMA map: {why}\n");
    }
    for f in &r.failures {
        out += &format!("failed: {f}\n");
    }
    out.push('\n');
    for n in &r.notes {
        out += &format!("- {n}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::model::{reduce, RunSample, NO_KERNEL_VFIO};
    use super::*;

    fn report() -> PassthroughBenchReport {
        let line = "vfio-bench x ok=true trapped_via=mmap mapped_read_ns=0.5 \
            trapped_read_ns=100000 mapped_write_ns=0.25 trapped_write_ns=90000 \
            msix_p50_ns=4e6 msix_p90_ns=7e6 doorbell_p50_ns=2e5 dma_to_ram_mib_s=6000 \
            dma_to_vram_mib_s=5000 dma_to_ram_device_mib_s=9000 dma_to_vram_device_mib_s=8000 memcpy_mib_s=40000 dma_contig=pagemap-run dma_bytes=4096";
        let s = RunSample::parse(line, 0.4).expect("line");
        let (figures, ratios) = reduce(&[s]);
        PassthroughBenchReport {
            tool: "vmm bench passthrough".into(),
            host: "PVM".into(),
            host_detail: "Linux 6.8, 2 CPUs".into(),
            build: "debug".into(),
            runs: 1,
            runs_ok: 1,
            mem_mib: 256,
            iterations: 200,
            trapped_via: "mmap".into(),
            dma_contig: "pagemap-run".into(),
            dma_bytes: 4096,
            figures,
            ratios,
            kernel_vfio_dma_map: None,
            kernel_vfio_skipped: Some(NO_KERNEL_VFIO.into()),
            failures: vec![],
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn the_table_lists_every_figure_and_ratio() {
        let r = report();
        let t = render_table(&r);
        for f in &r.figures {
            assert!(t.contains(&f.label), "{} missing:\n{t}", f.label);
        }
        assert!(t.contains("200000x"), "{t}"); // trapped / mapped read
        assert!(t.contains("0.150x"), "{t}"); // DMA -> RAM / memcpy
        assert!(t.contains(NO_KERNEL_VFIO), "{t}");
        assert!(t.contains("host PVM"), "{t}");
    }

    #[test]
    fn json_round_trips() {
        let r = report();
        assert_eq!(from_json(&to_json(&r)).expect("parse"), r);
    }
}
