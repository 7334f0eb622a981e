//! `vmm bench tracking --device-scenario`: in-situ tracking with a passed-through device. One
//! Linux guest with the GPU-shaped test device (tools/gpu-test-device) runs three write
//! sources one at a time, each under each backend, on the same running guest:
//! - `cpu-vram`: the guest CPU writes VRAM through its BAR mapping (agent `vfio-vram`);
//! - `dma`: the device's page writer stamps guest RAM pages through its own mapping of the
//!   memory file (agent `vfio-workload,..,start,dma`), as a GPU's DMA would;
//! - `device-vram`: the device's kernel fills its own VRAM (`vfio-workload,..,start,vram`).
//!
//! The truth is content (vmm `content_truth`): each round, with the vCPUs parked, the VMM
//! compares guest RAM and VRAM with their bytes at the previous round. Nothing here expects a
//! figure: the table shows what each mechanism saw. The ring needs a VM of its own (chosen at
//! creation), so it gets a second boot. `device_table` renders the report, `test_device` runs
//! the device.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::test_device::Device;
use super::tracking::BenchError;
use vmm::host::HostKind;
use vmm::machine::content_truth::Counts;
use vmm::machine::device_truth::{DONE_MARKER, START_MARKER};
use vmm::machine::pci::DeviceSpec;
use vmm::machine::{self, ConsoleOutput, GuestConfig, TrackingOptions, TrackingReport, VmConfig};
use vmm::tracking::TrackerKind;

/// Where vmm puts the first passed-through function (the host bridge is 00:00.0); short, as
/// the agent accepts it: the whole script must fit in the kernel command line.
const BDF: &str = "00:01.0";
/// The x86 kernel keeps the first 2047 bytes of its command line and would drop the rest
/// silently (vmm refuses a longer one for an ELF kernel): phases that do not fit go to
/// another boot.
const CMDLINE_MAX: usize = vmm::boot::linux::X86_COMMAND_LINE_SIZE - 1;
/// The write sources, in the order each backend sees them.
pub const SOURCES: [(&str, &str); 3] = [
    (
        "cpu-vram",
        "the guest CPU writes VRAM through the BAR mapping (agent vfio-vram)",
    ),
    (
        "dma",
        "the device's page writer writes guest RAM through its own mapping (agent vfio-workload dma)",
    ),
    (
        "device-vram",
        "the device's kernel fills its own VRAM (agent vfio-workload vram)",
    ),
];
/// Bytes each `vfio-vram` step writes (64 pages).
const CPU_VRAM_BYTES: u64 = 256 << 10;
/// The page writer's pace in pages per second (its window is 256 pages).
const DMA_RATE: u32 = 2000;

#[derive(Debug, Clone)]
pub struct DeviceBench {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// vmm-gpu-test-device.
    pub device_bin: PathBuf,
    pub backends: Vec<TrackerKind>,
    pub vram_mib: u64,
    pub mem_mib: u64,
    pub interval: Duration,
    /// Steps per phase: `vfio-vram` writes, kernel restarts, page-writer intervals.
    pub steps: u32,
    pub console_dir: Option<PathBuf>,
}

/// One (source, backend, memory) cell.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceRow {
    pub source: String,
    pub backend: String,
    /// "ram (other)", "ram (page writer)" or "vram".
    pub memory: String,
    /// Whether this memory is what the source writes (the others are the guest's background).
    pub source_memory: bool,
    pub written: u64,
    pub reported: u64,
    pub detected: u64,
    pub missed: u64,
    pub false_positives: u64,
    pub rounds: u64,
    /// For vram: whether the backend watched it, and how (or why not).
    pub covered: bool,
    pub coverage: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeviceReport {
    pub tool: String,
    pub host: String,
    pub host_detail: String,
    pub boots: u32,
    pub device_memory: String,
    pub vram_mib: u64,
    /// Median time a round spent comparing content, with the vCPUs parked (ms).
    pub round_compare_ms: f64,
    /// Rounds for which the vCPUs could not be parked (counted all the same).
    pub unparked_rounds: u64,
    pub rows: Vec<DeviceRow>,
    pub unsupported: Vec<super::Unsupported>,
    pub notes: Vec<String>,
}

/// The agent script of one phase of `source`.
fn phase_script(b: &DeviceBench, source: &str) -> Vec<String> {
    // Markers apply at the next round: leave two rounds around each.
    let gap = 2 * b.interval.as_millis() as u64 + 50;
    let step = 2 * b.interval.as_millis() as u64;
    let vram_bytes = b.vram_mib << 20;
    let mut work = Vec::new();
    match source {
        "cpu-vram" => {
            for k in 0..u64::from(b.steps) {
                let offset = (k * CPU_VRAM_BYTES) % vram_bytes.max(CPU_VRAM_BYTES);
                work.push(format!("vfio-vram,{BDF},{offset},{CPU_VRAM_BYTES}"));
                work.push(format!("sleep,{step}"));
            }
        }
        "dma" => {
            work.push(format!("vfio-workload,{BDF},start,dma,{DMA_RATE}"));
            work.push(format!("sleep,{}", step * u64::from(b.steps)));
            work.push(format!("vfio-workload,{BDF},stop"));
        }
        _ => {
            // Each start fills with a new pattern; a kernel pass rewriting the same pattern
            // changes nothing, so restarts are what makes VRAM change.
            for _ in 0..b.steps {
                work.push(format!("vfio-workload,{BDF},start,vram"));
                work.push(format!("sleep,{step}"));
                work.push(format!("vfio-workload,{BDF},stop"));
            }
        }
    }
    // The start marker must be applied (the backend started) before the work begins, hence
    // the gap; the work's writes are all in before the done marker, and a done and the next
    // start applied at the same round still close and open in order.
    let start = START_MARKER.trim_start_matches("echo ");
    let done = DONE_MARKER.trim_start_matches("echo ");
    [
        vec![format!("echo,{start}{source}"), format!("sleep,{gap}")],
        work,
        vec![format!("echo,{done}")],
    ]
    .concat()
}

/// The kernel command line of a boot running every source under each of `schedule`.
fn cmdline(b: &DeviceBench, schedule: &[TrackerKind]) -> String {
    let mut script = vec![format!("vfio-bind,{BDF}")];
    for _ in schedule {
        for (source, _) in SOURCES {
            script.extend(phase_script(b, source));
        }
    }
    script.push("poweroff".into());
    format!(
        "{} {}{}",
        vmm::boot::linux::BASE_CMDLINE,
        guest_abi::agent::CMDLINE_KEY,
        script.join(";")
    )
}

/// `backends` in groups whose command line fits, in order; the ring alone (its own VM).
fn boots(b: &DeviceBench, backends: &[TrackerKind]) -> Result<Vec<Vec<TrackerKind>>, BenchError> {
    let mut out: Vec<Vec<TrackerKind>> = Vec::new();
    for &k in backends {
        match out.last_mut() {
            Some(last)
                if !k.needs_dirty_ring()
                    && !last.iter().any(|x| x.needs_dirty_ring())
                    && cmdline(b, &[last.as_slice(), &[k]].concat()).len() <= CMDLINE_MAX =>
            {
                last.push(k)
            }
            _ => out.push(vec![k]),
        }
    }
    if let Some(g) = out.iter().find(|g| cmdline(b, g).len() > CMDLINE_MAX) {
        return Err(BenchError::Usage(format!(
            "one backend's phases need a {}-byte kernel command line (the kernel keeps \
             {CMDLINE_MAX}): use fewer --device-steps",
            cmdline(b, g).len()
        )));
    }
    Ok(out)
}

fn boot(b: &DeviceBench, schedule: &[TrackerKind], n: u32) -> Result<TrackingReport, BenchError> {
    let what = format!("device scenario, boot {n}");
    let dir = std::env::temp_dir();
    let socket = dir.join(format!("vmm-devtrack-{}-{n}.sock", std::process::id()));
    let device = Device::start(&b.device_bin, socket, b.vram_mib)?;
    let phases: Vec<Option<TrackerKind>> = schedule
        .iter()
        .flat_map(|&k| SOURCES.map(|_| Some(k)))
        .collect();
    let cmdline = cmdline(b, schedule);
    let console = match &b.console_dir {
        Some(d) => ConsoleOutput::File(d.join(format!("device-{n}.log"))),
        None => ConsoleOutput::Null,
    };
    let cfg = VmConfig {
        vcpus: 1,
        mem_bytes: b.mem_mib << 20,
        guest: GuestConfig::Linux(vmm::boot::linux::LinuxBoot {
            kernel: b.kernel.clone(),
            initrd: Some(b.initrd.clone()),
            cmdline,
        }),
        disks: Vec::new(),
        devices: vec![DeviceSpec::VfioUser(device.socket.clone())],
        phys_bits: None,
        console,
        console_input: false,
        tracking: Some(TrackingOptions {
            backend: None,
            interval: b.interval,
            raw_every_other: false,
            schedule: phases.clone(),
            content_truth: true,
        }),
        dirty_ring: false,
        api_socket: None,
    };
    let report = machine::run(&cfg, Instant::now()).map_err(|source| BenchError::Machine {
        what: what.clone(),
        source,
    })?;
    drop(device);
    if report.exit_code != 0 {
        return Err(BenchError::Guest {
            what,
            outcome: report.outcome.describe(),
        });
    }
    let t = report.tracking.ok_or_else(|| BenchError::Tracking {
        what: what.clone(),
        error: "no tracking report".into(),
    })?;
    if let Some(error) = &t.error {
        return Err(BenchError::Tracking {
            what,
            error: error.clone(),
        });
    }
    if t.phases.len() != phases.len() {
        return Err(BenchError::Tracking {
            what,
            error: format!(
                "{} of {} phases completed (keep the console with --linux-console-dir)",
                t.phases.len(),
                phases.len()
            ),
        });
    }
    Ok(t)
}

fn row(source: &str, backend: &str, memory: &str, own: bool, c: &Counts, rounds: u64) -> DeviceRow {
    DeviceRow {
        source: source.into(),
        backend: backend.into(),
        memory: memory.into(),
        source_memory: own,
        written: c.written,
        reported: c.detected + c.false_positives,
        detected: c.detected,
        missed: c.missed,
        false_positives: c.false_positives,
        rounds,
        covered: true,
        coverage: "guest RAM".into(),
    }
}

fn rows_of(t: &TrackingReport) -> Vec<DeviceRow> {
    let mut rows = Vec::new();
    for p in &t.phases {
        let (Some(label), Some(truth)) = (&p.label, &p.truth) else {
            continue;
        };
        let backend = p.backend.map_or("none", |k| k.name());
        rows.push(row(
            label,
            backend,
            "ram (other)",
            false,
            &truth.ram_cpu,
            p.rounds,
        ));
        rows.push(row(
            label,
            backend,
            "ram (page writer)",
            label == "dma",
            &truth.ram_device,
            p.rounds,
        ));
        let mut vram = row(
            label,
            backend,
            "vram",
            label != "dma",
            &truth.device_memory,
            p.rounds,
        );
        let cov = p.device_memory.clone();
        vram.covered = cov.as_ref().is_some_and(|c| c.covered);
        vram.coverage = cov.map_or_else(|| "-".into(), |c| c.how);
        rows.push(vram);
    }
    rows
}

pub fn run(b: &DeviceBench) -> Result<DeviceReport, BenchError> {
    if b.steps == 0 || b.vram_mib == 0 || !b.vram_mib.is_power_of_two() {
        return Err(BenchError::Usage(
            "the device scenario needs at least 1 step and a power-of-two VRAM size in MiB".into(),
        ));
    }
    let mut unsupported = Vec::new();
    let mut offered = Vec::new();
    for &k in &b.backends {
        match k.check_host() {
            Err(e) => unsupported.push(super::Unsupported {
                backend: k.name().to_string(),
                reason: e.reason(),
            }),
            Ok(()) => offered.push(k),
        }
    }
    // Synchronous uffd-wp late (the slowest under an emulated guest kernel), the ring last.
    offered.sort_by_key(|k| (k.needs_dirty_ring(), *k == TrackerKind::UffdWp));
    let groups = boots(b, &offered)?;
    let mut rows = Vec::new();
    let mut device_memory = String::new();
    let mut boots = 0;
    let mut compare_ms = Vec::new();
    let mut unparked_rounds = 0;
    for schedule in groups {
        boots += 1;
        let t = boot(b, &schedule, boots)?;
        compare_ms.extend(
            t.rounds
                .iter()
                .filter_map(|r| r.truth_us)
                .map(|us| us / 1000.0),
        );
        unparked_rounds += t.rounds.iter().filter(|r| r.paused == Some(false)).count() as u64;
        if let Some((name, pages)) = &t.device_memory {
            device_memory = format!("{name}, {pages} pages mapped");
        }
        rows.extend(rows_of(&t));
    }
    Ok(DeviceReport {
        tool: "vmm bench tracking --device-scenario".into(),
        host: match HostKind::detect() {
            HostKind::Pvm => "PVM".into(),
            HostKind::Hardware => "hardware".into(),
        },
        host_detail: super::tracking::host_detail(),
        boots,
        device_memory,
        vram_mib: b.vram_mib,
        round_compare_ms: super::median(&compare_ms),
        unparked_rounds,
        rows,
        unsupported,
        notes: vec![
            format!(
                "one Linux guest per boot (1 vCPU, {} MiB) with vmm-gpu-test-device passed through (vfio-user, VRAM {} MiB); each backend runs each source once, in turn, on the same running guest; the ring gets a boot of its own, and backends whose agent script would not fit in the kernel command line (2047 bytes) another",
                b.mem_mib, b.vram_mib
            ),
            format!(
                "truth by content: every {} ms, with the vCPUs parked, guest RAM and VRAM are compared with their bytes at the previous round; written = pages whose bytes changed; a write of the bytes a page already held counts as a false positive if reported",
                b.interval.as_millis()
            ),
            "ram (page writer): RAM pages that now carry the device page writer's stamp (magic 0x5047575249544552 at byte 8); ram (other): every other RAM page: the guest kernel and agent in every phase, plus, in cpu-vram, the device's DMA of the written VRAM back into RAM (vfio-vram checks its writes so); vram: every mapped BAR piece of the device (the test device's VRAM is BAR1; BAR0's memory pages and BAR3 are watched too), whoever wrote it".into(),
            "source memory (*): the memory the phase's source writes; the other rows of a phase are the guest's background".into(),
            "vram coverage: only the KVM bitmap backends are asked to log VRAM (KVM_MEM_LOG_DIRTY_PAGES on its DeviceBar memslots); the others watch guest RAM only".into(),
            "figures are from one run; nothing is expected of them".into(),
            format!(
                "each round's comparison took {:.1} ms (median) with the vCPUs parked; {unparked_rounds} round(s) could not park them (a race then can move a vCPU write between rounds)",
                super::median(&compare_ms)
            ),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bench(steps: u32) -> DeviceBench {
        DeviceBench {
            kernel: "k".into(),
            initrd: "i".into(),
            device_bin: "d".into(),
            backends: Vec::new(),
            vram_mib: 16,
            mem_mib: 192,
            interval: Duration::from_millis(100),
            steps,
            console_dir: None,
        }
    }

    #[test]
    fn boots_keep_order_fit_the_command_line_and_give_the_ring_its_own() {
        use TrackerKind::*;
        let all = [Bitmap, BitmapManual, UffdWpAsync, UffdWp, Ring];
        for steps in [1, 3, 8] {
            let b = bench(steps);
            let groups = boots(&b, &all).unwrap();
            assert_eq!(groups.concat(), all, "steps {steps}");
            assert_eq!(groups.last().unwrap(), &vec![Ring], "steps {steps}");
            for g in &groups {
                assert!(cmdline(&b, g).len() <= CMDLINE_MAX, "steps {steps}: {g:?}");
            }
        }
        // Each phase is in the script, marked, in order.
        let line = cmdline(&bench(1), &[Bitmap]);
        let marks: Vec<&str> = line.matches("devtrack:start:").collect();
        assert_eq!(marks.len(), SOURCES.len());
        assert_eq!(line.matches("devtrack:done").count(), SOURCES.len());
        let script = line.split_once(guest_abi::agent::CMDLINE_KEY).unwrap().1;
        assert!(!script.contains(' '), "{script}");
    }

    #[test]
    fn a_phase_too_long_for_the_command_line_is_refused() {
        let err = boots(&bench(200), &[TrackerKind::Bitmap]).unwrap_err();
        assert!(
            err.to_string().contains("use fewer --device-steps"),
            "{err}"
        );
    }
}
