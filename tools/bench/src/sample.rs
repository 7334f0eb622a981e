//! Hand-built reports for the rendering tests: plausible figures, with the gaps a real run has
//! (no ground truth on Linux, no raw-ioctl figure for userfaultfd, an unsupported backend).

use super::report::{BackendResult, BenchReport, Cell, Unsupported, WorkloadResult};

/// Two workloads (micro with ground truth, Linux without), five backends, one unsupported.
pub(crate) fn report() -> BenchReport {
    BenchReport {
        tool: "vmm bench tracking".to_owned(),
        host: "PVM".to_owned(),
        host_detail: "6.8.0-pvm, 2 CPUs".to_owned(),
        runs: 5,
        workloads: vec![micro_sweep(), linux_agent_random()],
        unsupported: vec![Unsupported {
            backend: "soft-dirty".to_owned(),
            reason: "CONFIG_MEM_SOFT_DIRTY is off".to_owned(),
        }],
        notes: vec!["harvest runs on a separate thread while the guest keeps writing".to_owned()],
    }
}

/// A report with nothing measured, as a runner would produce when every backend failed.
pub(crate) fn empty() -> BenchReport {
    BenchReport {
        tool: "vmm bench tracking".to_owned(),
        host: "hardware".to_owned(),
        host_detail: String::new(),
        runs: 0,
        workloads: Vec::new(),
        unsupported: Vec::new(),
        notes: Vec::new(),
    }
}

/// Name, slowdown, harvest µs/round, ns/page, raw ioctl µs/round, memory KiB, note.
type Row = (
    &'static str,
    f64,
    f64,
    Option<f64>,
    Option<f64>,
    u64,
    Option<&'static str>,
);

const MICRO_ROWS: [Row; 5] = [
    ("bitmap", 1.07, 410.0, Some(6.26), Some(380.0), 8, None),
    (
        "bitmap-manual",
        1.05,
        350.0,
        Some(5.34),
        Some(330.0),
        8,
        None,
    ),
    (
        "ring",
        1.21,
        2900.0,
        Some(44.3),
        Some(2700.0),
        1024,
        Some("ring of 65536 entries per vCPU"),
    ),
    ("uffd-wp", 9.8, 52000.0, Some(793.0), None, 64, None),
    ("uffd-wp-async", 1.9, 1800.0, Some(27.5), None, 512, None),
];

fn micro_sweep() -> WorkloadResult {
    let pages = 65536;
    let baseline = 12.3;
    WorkloadResult {
        guest: "micro".to_owned(),
        name: "sweep".to_owned(),
        region_mib: 256,
        pages,
        rounds_per_run: 8,
        baseline: Cell::from_samples(vec![12.1, 12.3, 12.4, 12.2, 12.6]),
        backends: MICRO_ROWS
            .iter()
            .map(|row| backend(row, baseline, pages as f64, Some(0)))
            .collect(),
    }
}

fn linux_agent_random() -> WorkloadResult {
    let baseline = 40.0;
    let dirty = 3000.0;
    WorkloadResult {
        guest: "linux".to_owned(),
        name: "agent random".to_owned(),
        region_mib: 64,
        pages: 16384,
        rounds_per_run: 20,
        baseline: Cell::from_samples(vec![39.0, 40.0, 41.0]),
        backends: MICRO_ROWS[..3]
            .iter()
            .map(|row| backend(row, baseline, dirty, None))
            .collect(),
    }
}

/// Derives the dependent figures so the sample stays self-consistent.
fn backend(row: &Row, baseline_ms: f64, dirty: f64, misses: Option<u64>) -> BackendResult {
    let &(name, slowdown, harvest_us, ns_per_page, raw_us, mem_kib, note) = row;
    let guest_ms = baseline_ms * slowdown;
    BackendResult {
        backend: name.to_owned(),
        guest: Cell::from_samples(vec![guest_ms * 0.99, guest_ms, guest_ms * 1.02]),
        slowdown,
        extra_guest_us_per_dirty_page: Some((guest_ms - baseline_ms) * 1000.0 / dirty),
        dirty_pages_per_round: dirty,
        expected_pages_per_round: misses.map(|_| dirty),
        misses,
        false_positives: misses,
        harvest_us_per_round: harvest_us,
        harvest_ns_per_dirty_page: ns_per_page,
        harvest_cpu_us_per_round: harvest_us * 0.9,
        raw_ioctl_us_per_round: raw_us,
        harvest_vs_raw: raw_us.map(|raw| harvest_us / raw),
        memory_overhead_kib: mem_kib,
        note: note.map(str::to_owned),
    }
}
