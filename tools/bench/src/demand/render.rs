//! Text and JSON renderings of a `vmm bench demand` report.

use super::model::{
    upstream_us_per_page, DemandBenchReport, Row, UPSTREAM_REFERENCE, UPSTREAM_VCPUS,
};
use crate::format::{or_dash, ratio, sig3};

const HEADERS: [&str; 10] = [
    "placement",
    "handler",
    "backend",
    "pages/s/vCPU",
    "touch ms",
    "guest us/page",
    "x eager",
    "fault p50 us",
    "fault p99 us",
    "faults",
];
/// Columns after the first three are figures, right-aligned.
const TEXT_COLUMNS: usize = 3;
const GUTTER: &str = "  ";

/// The report as JSON (pretty-printed, no trailing newline).
pub fn to_json(r: &DemandBenchReport) -> String {
    serde_json::to_string_pretty(r).unwrap_or_else(|e| {
        serde_json::json!({ "error": format!("cannot serialise the report: {e}") }).to_string()
    })
}

/// Reads a report written by [`to_json`].
pub fn from_json(s: &str) -> Result<DemandBenchReport, serde_json::Error> {
    serde_json::from_str(s)
}

fn row_cells(r: &Row) -> [String; 10] {
    [
        r.placement.clone(),
        r.handler.clone(),
        r.backend.clone(),
        or_dash(r.pages_per_s_per_vcpu, sig3),
        or_dash(r.touch_ms, sig3),
        or_dash(r.guest_us_per_page, sig3),
        or_dash(r.vs_eager, ratio),
        or_dash(r.fault_p50_us, sig3),
        or_dash(r.fault_p99_us, sig3),
        or_dash(r.faults, sig3),
    ]
}

fn align(cells: &[String], widths: &[usize]) -> String {
    cells
        .iter()
        .zip(widths)
        .enumerate()
        .map(|(i, (c, w))| {
            if i < TEXT_COLUMNS {
                format!("{c:<w$}")
            } else {
                format!("{c:>w$}")
            }
        })
        .collect::<Vec<_>>()
        .join(GUTTER)
        .trim_end()
        .to_owned()
}

/// The report as an aligned table with its caveats, ending in a newline.
pub fn render_table(r: &DemandBenchReport) -> String {
    let runs = if r.runs == 1 {
        "figures from a single run".to_owned()
    } else {
        format!("figures are medians of {} runs", r.runs)
    };
    let mut lines = vec![format!(
        "{}: host {} ({}); {runs}; {} MiB private region per vCPU, {} per fault",
        r.tool, r.host, r.host_detail, r.region_mib, r.chunk
    )];
    if r.is_pvm() {
        lines.push(
            "host is PVM (software nested virtualization, shadow paging): PVM timings, NOT hardware timings"
                .to_owned(),
        );
    }
    for c in &r.cases {
        lines.push(String::new());
        lines.push(format!(
            "{}: {} region pages; warm pass {} ms; passes left after restore: {}",
            c.label,
            c.pages,
            sig3(c.warm_pass_ms),
            c.remaining_passes
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let header = HEADERS.map(str::to_owned);
        let cells: Vec<[String; 10]> = c.rows.iter().map(row_cells).collect();
        let mut widths: Vec<usize> = header.iter().map(String::len).collect();
        for row in &cells {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        lines.push(format!("  {}", align(&header, &widths)));
        for row in &cells {
            lines.push(format!("  {}", align(row, &widths)));
        }
    }
    let case_failures = r.cases.iter().flat_map(|c| {
        c.failures
            .iter()
            .map(move |f| format!("  {}: {f}", c.label))
    });
    let failures: Vec<String> = case_failures
        .chain(r.cases.iter().flat_map(|c| {
            c.rows.iter().flat_map(move |row| {
                row.failures.iter().map(move |f| {
                    format!(
                        "  {} / {} / {} / {}: {f}",
                        c.label, row.placement, row.handler, row.backend
                    )
                })
            })
        }))
        .collect();
    if !r.refused.is_empty() || !r.skipped.is_empty() || !failures.is_empty() {
        lines.push(String::new());
    }
    for x in &r.refused {
        lines.push(format!("{}: refused: {}", x.backend, x.reason));
    }
    for s in &r.skipped {
        lines.push(format!("skipped: {s}"));
    }
    if !failures.is_empty() {
        lines.push("failed runs (left out of the medians):".to_owned());
        lines.extend(failures);
    }
    lines.push(String::new());
    lines.extend(UPSTREAM_REFERENCE.iter().map(|s| (*s).to_owned()));
    lines.push(upstream_comparison(r));
    if !r.notes.is_empty() {
        lines.push(String::new());
        lines.push("notes:".to_owned());
        lines.extend(r.notes.iter().map(|n| format!("  - {n}")));
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

/// Our 2-vCPU ratios beside upstream's, per placement, for the backends upstream measured.
/// Upstream's figures are for 2 vCPUs on private regions, so only that case is set beside them:
/// a run without it says so rather than compare another vCPU count with them.
fn upstream_comparison(r: &DemandBenchReport) -> String {
    let Some(case) = r
        .cases
        .iter()
        .find(|c| c.vcpus == UPSTREAM_VCPUS && c.shared_pages == 0)
    else {
        return format!(
            "  no {UPSTREAM_VCPUS}-vCPU case on private regions in this run, so none of its figures is set beside upstream's"
        );
    };
    let upstream_base = upstream_us_per_page(super::model::EAGER).unwrap_or(f64::NAN);
    let mut parts = Vec::new();
    for row in &case.rows {
        let (Some(up), Some(ours)) = (upstream_us_per_page(&row.backend), row.vs_eager) else {
            continue;
        };
        if row.backend == super::model::EAGER || row.handler == "page-server" {
            continue;
        }
        parts.push(format!(
            "{} {}: {} here vs {} upstream",
            row.backend,
            row.placement,
            ratio(ours),
            ratio(up / upstream_base)
        ));
    }
    if parts.is_empty() {
        format!("  {}: no backend upstream measured ran here", case.label)
    } else {
        format!(
            "  ratio to no-fault, {} here: {}",
            case.label,
            parts.join("; ")
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::model::{CaseResult, Refused, EAGER};
    use super::*;

    pub(crate) fn sample_report() -> DemandBenchReport {
        let row =
            |placement: &str, handler: &str, backend: &str, rate: f64, p50: Option<f64>| Row {
                placement: placement.into(),
                handler: handler.into(),
                backend: backend.into(),
                pages_per_s_per_vcpu: Some(rate),
                touch_ms: Some(1024e3 / rate),
                guest_us_per_page: Some(1e6 / rate),
                vs_eager: None,
                fault_p50_us: p50,
                fault_p99_us: p50.map(|p| p * 4.0),
                faults: p50.map(|_| 2048.0),
                samples: vec![rate],
                failures: vec![],
            };
        let mut c = CaseResult {
            label: "2 vCPUs".into(),
            vcpus: 2,
            shared_pages: 0,
            pages: 2048,
            warm_pass_ms: 0.05,
            remaining_passes: vec![30, 31],
            failures: vec![],
            rows: vec![
                row("pinned", "-", EAGER, 250_000.0, None),
                row("pinned", "in-process", "uffd-missing", 25_000.0, Some(38.0)),
                row("free", "-", EAGER, 200_000.0, None),
                row("free", "in-process", "memslot-exits", 10_000.0, Some(70.0)),
            ],
        };
        c.rows[3].failures.push("run 2: boom".into());
        c.failures.push("run 3: no snapshot".into());
        c.fill_ratios();
        DemandBenchReport {
            tool: "vmm bench demand".into(),
            host: "PVM".into(),
            host_detail: "Linux 6.18.44, 2 CPUs".into(),
            runs: 3,
            region_mib: 4,
            chunk: "4K".into(),
            cases: vec![c],
            refused: vec![Refused {
                backend: "kvm-userfault".into(),
                reason: "KVM_MEM_USERFAULT: EINVAL".into(),
            }],
            skipped: vec!["out-of-process handler (page-server): not in this build".into()],
            notes: vec!["a note".into()],
        }
    }

    #[test]
    fn table_has_every_row_the_caveats_and_the_labelled_reference() {
        let t = render_table(&sample_report());
        assert!(t.contains("PVM timings, NOT hardware timings"), "{t}");
        assert!(t.contains("medians of 3 runs"));
        assert!(t.contains("2 vCPUs: 2048 region pages"));
        let line = t
            .lines()
            .find(|l| l.contains("uffd-missing") && l.contains("pinned"))
            .unwrap();
        // 40 us/page against a 4 us/page baseline: 10x.
        assert!(
            line.contains("25000")
                && line.contains("41.0")
                && line.contains("40.0")
                && line.contains("10.0x"),
            "{line}"
        );
        assert!(t.contains("kvm-userfault: refused: KVM_MEM_USERFAULT: EINVAL"));
        assert!(t.contains("skipped: out-of-process handler"));
        assert!(t.contains("2 vCPUs / free / in-process / memslot-exits: run 2: boom"));
        assert!(t.contains("  2 vCPUs: run 3: no snapshot"), "{t}");
        assert!(t.contains("NOT measured on this host"));
        assert!(
            t.contains("uffd-missing pinned: 10.0x here vs 3.48x upstream"),
            "{t}"
        );
        assert!(t.ends_with('\n'));
        // The header row lines up with the figures.
        let header = t.lines().find(|l| l.contains("pages/s/vCPU")).unwrap();
        assert_eq!(header.find("backend"), line.find("uffd-missing"));
    }

    /// A run without the 2-vCPU case (e.g. `--vcpus 1`) is never compared with upstream's
    /// 2-vCPU figures; it says the case is absent.
    #[test]
    fn upstream_figures_are_set_only_beside_the_2_vcpu_case() {
        let mut r = sample_report();
        r.cases[0].vcpus = 1;
        r.cases[0].label = "1 vCPU".into();
        let t = render_table(&r);
        assert!(!t.contains("here vs"), "{t}");
        assert!(
            t.contains("no 2-vCPU case on private regions in this run"),
            "{t}"
        );
        // The upstream lines themselves stay, labelled as not measured here.
        assert!(t.contains("NOT measured on this host"));
        // 2 vCPUs on a shared region is not upstream's case either.
        let mut r = sample_report();
        r.cases[0].shared_pages = 64;
        assert!(!render_table(&r).contains("here vs"));
    }

    #[test]
    fn hardware_hosts_get_no_pvm_warning() {
        let mut r = sample_report();
        r.host = "hardware".into();
        assert!(!render_table(&r).contains("NOT hardware"));
    }

    #[test]
    fn json_round_trips() {
        let r = sample_report();
        let text = to_json(&r);
        let back = from_json(&text).unwrap();
        assert_eq!(back, r);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["cases"][0]["rows"][1]["backend"], "uffd-missing");
        assert_eq!(v["refused"][0]["backend"], "kvm-userfault");
    }
}
