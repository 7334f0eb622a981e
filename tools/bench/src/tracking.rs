//! The runner of `vmm bench tracking`: the same micro-guest workloads (and optionally the Linux
//! guest's agent workload), untracked and then under each backend, `runs` times each, reduced
//! to medians in a `BenchReport`.
//!
//! Every run is a fresh VM with the same payload, workload and seed, so backends see identical
//! guest behaviour; the dirty ring must be chosen when a VM is created, so a VM per run is also
//! the only way to put the ring and the bitmap backends side by side. Harvests happen at the
//! micro guest's pass port, while the guest waits: exact sync points, so misses and false
//! positives are counted per pass against the reference model. Rounds alternate between the
//! VMM's harvest path and the bare kernel calls (`harvest_raw`) so both are measured on the
//! same workload in the same run.

use std::time::{Duration, Instant};

use guest_abi::layout;
use micro_guest::{Pattern, Workload};

use super::report::{median, BackendResult, BenchReport, Cell, Unsupported, WorkloadResult};
use vmm::host::HostKind;
use vmm::machine::{self, ConsoleOutput, GuestConfig, TrackingOptions, TrackingReport, VmConfig};
use vmm::tracking::TrackerKind;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("micro guest workload: {0}")]
    Workload(#[from] micro_guest::WorkloadError),
    #[error("{what}: {source}")]
    Machine {
        what: String,
        source: machine::MachineError,
    },
    #[error("{what}: the guest ended badly: {outcome}")]
    Guest { what: String, outcome: String },
    #[error("{what}: tracking failed: {error}")]
    Tracking { what: String, error: String },
    #[error("{0}")]
    Usage(String),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct TrackingBench {
    pub backends: Vec<TrackerKind>,
    pub runs: u32,
    pub sizes_mib: Vec<u64>,
    pub patterns: Vec<Pattern>,
    /// Passes per run; each pass is one harvest round.
    pub passes: u64,
    pub progress: bool,
    /// Also the Linux guest's agent workload, compared in situ.
    pub linux: Option<LinuxBench>,
}

/// The Linux guest part: one boot runs the agent's workload once per backend, switching the
/// backend between workloads on the same running guest, with untracked runs first and last as
/// the baseline. The ring needs a VM of its own (it is chosen at creation), so it gets a second
/// boot with its own baseline.
#[derive(Debug, Clone)]
pub struct LinuxBench {
    pub kernel: std::path::PathBuf,
    pub initrd: std::path::PathBuf,
    pub size_mib: u64,
    pub pattern: String,
    pub passes: u64,
    pub runs: u32,
    /// Where to keep each boot's console (`linux-<run>-<boot>.log`); none: discarded.
    pub console_dir: Option<std::path::PathBuf>,
}

/// Rounds of a run that count: the first pass also covers the guest's boot code and the
/// first touch of every page, so it is left out of the timing figures.
fn timed(rounds: &[machine::Round]) -> impl Iterator<Item = &machine::Round> {
    rounds.iter().skip(1)
}

struct RunFigures {
    guest_ms: f64,
    dirty: f64,
    expected: Option<f64>,
    harvest_us: f64,
    cpu_us: f64,
    raw_us: Option<f64>,
    misses: u64,
    fps: u64,
    checked: bool,
    overhead: u64,
}

/// Harvest figures of `rounds`: medians of the VMM-path rounds (wall, and CPU plus the
/// backend threads' share), and of the raw-kernel-call rounds if there are any.
fn harvest_figures(
    rounds: &[&machine::Round],
    background_us_per_round: f64,
) -> (f64, f64, Option<f64>) {
    let med = |f: &dyn Fn(&machine::Round) -> f64, raw: bool| {
        median(
            &rounds
                .iter()
                .filter(|r| r.raw == raw)
                .map(|r| f(r))
                .collect::<Vec<_>>(),
        )
    };
    let has_raw = rounds.iter().any(|r| r.raw);
    (
        med(&|r| r.harvest_us, false),
        med(&|r| r.harvest_cpu_us, false) + background_us_per_round,
        has_raw.then(|| med(&|r| r.harvest_us, true)),
    )
}

fn figures(t: &TrackingReport) -> RunFigures {
    let rounds: Vec<_> = timed(&t.rounds).collect();
    let vmm: Vec<_> = rounds.iter().filter(|r| !r.raw).collect();
    let med = |v: Vec<f64>| median(&v);
    let background_us_per_round = t.background_cpu_ms * 1000.0 / t.rounds.len().max(1) as f64;
    let (harvest_us, cpu_us, raw_us) = harvest_figures(&rounds, background_us_per_round);
    RunFigures {
        guest_ms: med(rounds.iter().map(|r| r.guest_ms).collect()),
        dirty: med(vmm.iter().map(|r| r.dirty_pages as f64).collect()),
        expected: vmm.iter().any(|r| r.expected.is_some()).then(|| {
            med(vmm
                .iter()
                .filter_map(|r| r.expected.map(|e| e as f64))
                .collect())
        }),
        harvest_us,
        cpu_us,
        raw_us,
        // Exactness counts every checked round, the first included.
        misses: t.misses,
        fps: t.false_positives,
        checked: t.rounds.iter().any(|r| r.misses.is_some()),
        overhead: t.memory_overhead_bytes,
    }
}

fn micro_config(w: &Workload, region_mib: u64) -> VmConfig {
    VmConfig {
        vcpus: 1,
        // The region sits at MICRO_REGION_GPA (4 MiB); leave room above it.
        mem_bytes: (region_mib + 16) << 20,
        guest: GuestConfig::Micro {
            payload: micro_guest::PAYLOAD.to_vec(),
            mailbox: w.mailbox().to_vec(),
            region: Some((w.region_gpa(), w.pages() * 4096)),
            expected: None,
        },
        disks: Vec::new(),
        devices: Vec::new(),
        phys_bits: None,
        console: ConsoleOutput::Null,
        console_input: false,
        dirty_ring: false,
        api_socket: None,
        tracking: None,
    }
}

fn run_once(
    cfg: &VmConfig,
    backend: Option<TrackerKind>,
    what: &str,
) -> Result<TrackingReport, BenchError> {
    let mut cfg = cfg.clone();
    cfg.tracking = Some(TrackingOptions {
        backend,
        interval: Duration::from_millis(100),
        raw_every_other: backend.is_some(),
        schedule: Vec::new(),
        content_truth: false,
    });
    tracked_run(&cfg, what)
}

/// Runs `cfg` and returns its tracking report; a guest that ends badly or a tracking failure is
/// an error, never a figure.
fn tracked_run(cfg: &VmConfig, what: &str) -> Result<TrackingReport, BenchError> {
    let report = machine::run(cfg, Instant::now()).map_err(|source| BenchError::Machine {
        what: what.to_string(),
        source,
    })?;
    if report.exit_code != 0 {
        return Err(BenchError::Guest {
            what: what.to_string(),
            outcome: report.outcome.describe(),
        });
    }
    let t = report.tracking.ok_or_else(|| BenchError::Tracking {
        what: what.to_string(),
        error: "no tracking report".into(),
    })?;
    if let Some(error) = &t.error {
        return Err(BenchError::Tracking {
            what: what.to_string(),
            error: error.clone(),
        });
    }
    Ok(t)
}

/// Writes per pass for each pattern: every page once (sweep), as many writes as pages
/// (random, hot set), every 16th page (sparse).
fn param_for(pattern: Pattern, pages: u64) -> u64 {
    match pattern {
        Pattern::Sparse => 16,
        _ => pages,
    }
}

pub fn run(b: &TrackingBench) -> Result<BenchReport, BenchError> {
    if b.runs == 0 || b.passes < 3 {
        return Err(BenchError::Usage(
            "--runs must be at least 1 and --passes at least 3 (the first pass is not timed)"
                .into(),
        ));
    }
    let mut unsupported = Vec::new();
    let mut backends = Vec::new();
    for &k in &b.backends {
        match k.check_host() {
            Ok(()) => backends.push(k),
            Err(e) => unsupported.push(Unsupported {
                backend: k.name().to_string(),
                reason: e.reason(),
            }),
        }
    }
    let cells = b.sizes_mib.len() * b.patterns.len() * (backends.len() + 1) * b.runs as usize;
    let bar = crate::progress::bar(cells as u64, b.progress, "runs");
    let mut workloads = Vec::new();
    for &size in &b.sizes_mib {
        let pages = size * 256;
        for &pattern in &b.patterns {
            let w = Workload::new(
                layout::MICRO_REGION_GPA,
                pages,
                pattern,
                b.passes,
                param_for(pattern, pages),
                1,
            )?;
            let cfg = micro_config(&w, size);
            let mut baseline = Vec::new();
            let mut per_backend: Vec<Vec<RunFigures>> =
                backends.iter().map(|_| Vec::new()).collect();
            // Interleave backends within each run so slow drift on the host spreads evenly.
            for run in 0..b.runs {
                let what = format!("micro {pattern} {size} MiB, run {}", run + 1);
                bar.set_message(format!("{what}: untracked"));
                baseline.push(figures(&run_once(&cfg, None, &what)?).guest_ms);
                bar.inc(1);
                for (i, &k) in backends.iter().enumerate() {
                    bar.set_message(format!("{what}: {k}"));
                    let what = format!("{what}, {k}");
                    per_backend[i].push(figures(&run_once(&cfg, Some(k), &what)?));
                    bar.inc(1);
                }
            }
            let base = Cell::from_samples(baseline);
            let results = backends
                .iter()
                .zip(per_backend)
                .map(|(k, runs)| backend_result(*k, &base, &runs))
                .collect();
            workloads.push(WorkloadResult {
                guest: "micro".into(),
                name: pattern.name().into(),
                region_mib: size,
                pages,
                rounds_per_run: b.passes - 1,
                baseline: base,
                backends: results,
            });
        }
    }
    bar.finish_and_clear();
    let mut notes = Vec::new();
    if let Some(l) = &b.linux {
        let (w, note) = linux_workload(l, &backends, b.progress)?;
        workloads.push(w);
        notes.push(note);
    }
    Ok(BenchReport {
        tool: "vmm bench tracking".into(),
        host: match HostKind::detect() {
            HostKind::Pvm => "PVM".into(),
            HostKind::Hardware => "hardware".into(),
        },
        host_detail: host_detail(),
        runs: b.runs,
        workloads,
        unsupported,
        notes: [vec![
            format!(
                "micro guest at CPL3, 1 vCPU; each run is a fresh VM; {} passes per run, the first not timed; harvests at the pass port while the guest waits",
                b.passes
            ),
            "guest ms/round excludes harvest time; misses and false positives are summed over every checked round of every run, against the reference model".into(),
            "raw ioctl: alternate rounds of the same run use only the kernel calls (DirtyTracker::harvest_raw); harvest includes the VMM-write bitmap and the dirty set".into(),
            "CPU us/round includes the backend's own threads (reaper, fault handler) spread over the rounds".into(),
        ], notes].concat(),
    })
}

fn backend_result(k: TrackerKind, base: &Cell, runs: &[RunFigures]) -> BackendResult {
    let med = |f: &dyn Fn(&RunFigures) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let guest = Cell::from_samples(runs.iter().map(|r| r.guest_ms).collect());
    let dirty = med(&|r| r.dirty);
    let harvest = med(&|r| r.harvest_us);
    let raw = runs
        .iter()
        .all(|r| r.raw_us.is_some())
        .then(|| med(&|r| r.raw_us.unwrap_or(f64::NAN)));
    let checked = runs.iter().all(|r| r.checked);
    BackendResult {
        backend: k.name().into(),
        slowdown: guest.guest_ms_per_round / base.guest_ms_per_round,
        extra_guest_us_per_dirty_page: (dirty > 0.0)
            .then(|| (guest.guest_ms_per_round - base.guest_ms_per_round) * 1000.0 / dirty),
        dirty_pages_per_round: dirty,
        expected_pages_per_round: runs
            .iter()
            .all(|r| r.expected.is_some())
            .then(|| med(&|r| r.expected.unwrap_or(f64::NAN))),
        misses: checked.then(|| runs.iter().map(|r| r.misses).sum()),
        false_positives: checked.then(|| runs.iter().map(|r| r.fps).sum()),
        harvest_us_per_round: harvest,
        harvest_ns_per_dirty_page: (dirty > 0.0).then(|| harvest * 1000.0 / dirty),
        harvest_cpu_us_per_round: med(&|r| r.cpu_us),
        raw_ioctl_us_per_round: raw,
        harvest_vs_raw: raw.map(|raw| harvest / raw),
        memory_overhead_kib: runs.iter().map(|r| r.overhead).max().unwrap_or(0) / 1024,
        guest,
        note: None,
    }
}

pub(crate) fn host_detail() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("Linux {}, {cpus} CPUs", release.trim())
}

/// One Linux boot running `schedule` (one agent workload per entry); the tracking report.
fn linux_boot(
    l: &LinuxBench,
    schedule: &[Option<TrackerKind>],
    what: &str,
    console: ConsoleOutput,
) -> Result<TrackingReport, BenchError> {
    let workload = format!("workload,{},{},{}", l.size_mib, l.pattern, l.passes);
    let script: Vec<&str> = schedule
        .iter()
        .map(|_| workload.as_str())
        .chain(["poweroff"])
        .collect();
    let cmdline = format!(
        "{} {}{}",
        vmm::boot::linux::BASE_CMDLINE,
        guest_abi::agent::CMDLINE_KEY,
        script.join(";")
    );
    let cfg = VmConfig {
        vcpus: 1,
        mem_bytes: (l.size_mib + 192) << 20,
        guest: GuestConfig::Linux(vmm::boot::linux::LinuxBoot {
            kernel: l.kernel.clone(),
            initrd: Some(l.initrd.clone()),
            cmdline,
        }),
        disks: Vec::new(),
        devices: Vec::new(),
        phys_bits: None,
        console,
        console_input: false,
        tracking: Some(TrackingOptions {
            backend: None,
            interval: Duration::from_millis(100),
            raw_every_other: true,
            schedule: schedule.to_vec(),
            content_truth: false,
        }),
        dirty_ring: false,
        api_socket: None,
    };
    let t = tracked_run(&cfg, what)?;
    if t.phases.len() != schedule.len() {
        return Err(BenchError::Tracking {
            what: what.to_string(),
            error: format!(
                "{} of {} workloads completed (see the agent's output with vmm run)",
                t.phases.len(),
                schedule.len()
            ),
        });
    }
    Ok(t)
}

/// Figures of phase `i` of a Linux boot; guest time is per workload pass.
fn linux_phase(t: &TrackingReport, i: usize, passes: u64) -> RunFigures {
    let rounds: Vec<_> = t.rounds.iter().filter(|r| r.phase == i).collect();
    let p = &t.phases[i];
    let background_us_per_round = p.background_cpu_ms * 1000.0 / rounds.len().max(1) as f64;
    let (harvest_us, cpu_us, raw_us) = harvest_figures(&rounds, background_us_per_round);
    RunFigures {
        guest_ms: p.guest_ms.unwrap_or(f64::NAN) / passes as f64,
        // Pages per pass: every round's count (raw rounds report theirs too) over the passes.
        dirty: rounds.iter().map(|r| r.dirty_pages as f64).sum::<f64>() / passes as f64,
        expected: None,
        harvest_us,
        cpu_us,
        raw_us,
        misses: 0,
        fps: 0,
        checked: false,
        overhead: p.memory_overhead_bytes,
    }
}

fn linux_workload(
    l: &LinuxBench,
    backends: &[TrackerKind],
    progress: bool,
) -> Result<(WorkloadResult, String), BenchError> {
    let mut plain: Vec<TrackerKind> = backends
        .iter()
        .copied()
        .filter(|k| !k.needs_dirty_ring())
        .collect();
    // Synchronous uffd-wp last: on PVM hosts a Linux guest under it slows down by orders of
    // magnitude (a pass that takes 6 ms untracked takes about a minute), so the others are
    // measured first.
    plain.sort_by_key(|k| *k == TrackerKind::UffdWp);
    let ring = backends.iter().any(|k| k.needs_dirty_ring());
    let mut boots: Vec<Vec<Option<TrackerKind>>> = Vec::new();
    let with_baselines =
        |middle: Vec<Option<TrackerKind>>| [vec![None], middle, vec![None]].concat();
    if !plain.is_empty() {
        boots.push(with_baselines(plain.iter().copied().map(Some).collect()));
    }
    if ring {
        boots.push(with_baselines(vec![Some(TrackerKind::Ring)]));
    }
    let bar = crate::progress::bar(boots.len() as u64 * u64::from(l.runs), progress, "runs");
    let mut baseline = Vec::new();
    let mut per_backend: Vec<(TrackerKind, Vec<RunFigures>, Vec<f64>)> = Vec::new();
    for run in 0..l.runs {
        for (n, schedule) in boots.iter().enumerate() {
            let what = format!("linux agent workload, run {}, boot {}", run + 1, n + 1);
            bar.set_message(format!("{what}: booting (about a minute on PVM)"));
            let console = match &l.console_dir {
                Some(dir) => {
                    ConsoleOutput::File(dir.join(format!("linux-{}-{}.log", run + 1, n + 1)))
                }
                None => ConsoleOutput::Null,
            };
            let t = linux_boot(l, schedule, &what, console)?;
            bar.inc(1);
            let base: Vec<f64> = schedule
                .iter()
                .enumerate()
                .filter(|(_, k)| k.is_none())
                .map(|(i, _)| linux_phase(&t, i, l.passes).guest_ms)
                .collect();
            let base = median(&base);
            baseline.push(base);
            for (i, kind) in schedule.iter().enumerate() {
                let Some(kind) = kind else { continue };
                let fig = linux_phase(&t, i, l.passes);
                match per_backend.iter_mut().find(|(k, _, _)| k == kind) {
                    Some((_, figs, bases)) => {
                        figs.push(fig);
                        bases.push(base);
                    }
                    None => per_backend.push((*kind, vec![fig], vec![base])),
                }
            }
        }
    }
    bar.finish_and_clear();
    let results = per_backend
        .iter()
        .map(|(k, figs, bases)| {
            // Each backend against the baseline of its own boot.
            let base = Cell::from_samples(bases.clone());
            let mut r = backend_result(*k, &base, figs);
            r.note = Some("in situ: same running guest as its baseline".into());
            r
        })
        .collect();
    let pages = l.size_mib * 256;
    let note = format!(
        "linux: agent `workload,{},{},{}` in guest user space, 1 vCPU; one boot per group of backends, switched between workloads on the running guest, untracked first and last; harvest every 100 ms; guest ms from the agent's own clock, per pass; no ground truth (misses not counted)",
        l.size_mib, l.pattern, l.passes
    );
    Ok((
        WorkloadResult {
            guest: "linux".into(),
            name: format!("agent {}", l.pattern),
            region_mib: l.size_mib,
            pages,
            rounds_per_run: l.passes,
            baseline: Cell::from_samples(baseline),
            backends: results,
        },
        note,
    ))
}
