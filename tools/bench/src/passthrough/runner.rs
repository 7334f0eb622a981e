//! The runner of `vmm bench passthrough`: per run, a fresh gpu-test-device (vfio-user server)
//! and a fresh boot of the Linux test guest with it (`vmm run --device --json`, this very
//! binary), whose agent binds the device to vfio-pci and runs `vfio-bench`; then, if a kernel
//! VFIO device is given, one boot per run with it to time its DMA map.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmm::host::HostKind;

use super::model::{
    agent_bench_line, agreed, dma_map_ms_per_gib, reduce, Figure, PassthroughBenchReport,
    RunSample, NO_KERNEL_VFIO,
};

/// The function the first `--device` becomes.
pub const BDF: &str = "0000:00:01.0";
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const DEVICE_START: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct PassthroughBench {
    /// The vmm binary to drive (normally `std::env::current_exe()`).
    pub exe: PathBuf,
    /// `vmm-gpu-test-device`.
    pub device_bin: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub runs: u32,
    pub mem_mib: u64,
    pub vram: String,
    /// `vfio-bench`'s ITERATIONS.
    pub iterations: u64,
    /// A host device bound to vfio-pci (its sysfs directory) to time kernel VFIO's DMA map.
    pub kernel_vfio: Option<PathBuf>,
    /// Keep every run's console, logs and report here.
    pub keep_dir: Option<PathBuf>,
    pub progress: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PassthroughBenchError {
    #[error("{0}")]
    Usage(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("no run yielded every figure: {}", .0.join("; "))]
    NoRuns(Vec<String>),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PassthroughBenchError {
    let what = what.into();
    move |source| PassthroughBenchError::Io { what, source }
}

/// Waits for `child` at most `limit`, killing it after that; (status, timed out).
fn wait_within(child: &mut Child, limit: Duration) -> (Option<ExitStatus>, bool) {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return (Some(s), false),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                return (child.wait().ok(), true);
            }
        }
    }
}

/// The gpu-test-device on `socket`, once it says it listens (its `--json` ready line).
fn start_device(b: &PassthroughBench, socket: &Path, log: &Path) -> Result<Child, String> {
    let err = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let mut child = Command::new(&b.device_bin)
        .arg("--socket")
        .arg(socket)
        .args(["--vram-size", &b.vram, "--once", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", b.device_bin.display()))?;
    let Some(out) = child.stdout.take() else {
        let _ = child.kill();
        return Err("no stdout from the device".into());
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(out).read_line(&mut line);
        let _ = tx.send(line);
    });
    match rx.recv_timeout(DEVICE_START) {
        Ok(line) if line.contains("\"ready\":true") => Ok(child),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            let said = std::fs::read_to_string(log).unwrap_or_default();
            Err(format!(
                "the gpu-test-device did not come up ({}): {}",
                if other.is_ok() {
                    "no ready line"
                } else {
                    "timed out"
                },
                said.trim()
            ))
        }
    }
}

/// One `vmm run` of the test guest with `device` and the agent `script`: (report JSON on
/// stdout, console text).
fn boot(
    b: &PassthroughBench,
    dir: &Path,
    name: &str,
    device: &str,
    script: &str,
) -> Result<(String, String), String> {
    let console = dir.join(format!("{name}.console"));
    let out = dir.join(format!("{name}.json"));
    let err = dir.join(format!("{name}.err"));
    let file = |p: &Path| File::create(p).map_err(|e| format!("{}: {e}", p.display()));
    let mut child = Command::new(&b.exe)
        .arg("run")
        .arg("--kernel")
        .arg(&b.kernel)
        .arg("--initrd")
        .arg(&b.initrd)
        .args(["--mem", &format!("{}M", b.mem_mib), "--device", device])
        .args(["--agent", script, "--json", "--no-console-input"])
        .arg("--console")
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::from(file(&out)?))
        .stderr(Stdio::from(file(&err)?))
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", b.exe.display()))?;
    let (status, timed_out) = wait_within(&mut child, BOOT_TIMEOUT);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    if timed_out || status.is_none_or(|s| !s.success()) {
        let stderr = read(&err);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(format!(
            "vmm run {}: {last}",
            if timed_out {
                "timed out".to_owned()
            } else {
                status.map_or("no status".into(), |s| s.to_string())
            }
        ));
    }
    Ok((read(&out), read(&console)))
}

fn one_run(b: &PassthroughBench, dir: &Path, run: u32) -> Result<RunSample, String> {
    let socket = dir.join(format!("gpu-{run}.sock"));
    let mut device = start_device(b, &socket, &dir.join(format!("gpu-{run}.log")))?;
    let script = format!("vfio-bind,{BDF};vfio-bench,{BDF},{};poweroff", b.iterations);
    let spec = format!("vfio-user:{}", socket.display());
    let result = boot(b, dir, &format!("run-{run}"), &spec, &script);
    // With --once it leaves with its client; never let it outlive the run.
    if wait_within(&mut device, Duration::from_secs(10)).1 {
        eprintln!("vmm bench passthrough: the gpu-test-device did not exit; killed");
    }
    let (json, console) = result?;
    let line = agent_bench_line(&console)?;
    let (_, per_gib) = dma_map_ms_per_gib(&json)?;
    RunSample::parse(&line, per_gib)
}

fn kernel_vfio_run(
    b: &PassthroughBench,
    dir: &Path,
    sysfs: &Path,
    run: u32,
) -> Result<f64, String> {
    let spec = format!("vfio:{}", sysfs.display());
    let (json, _) = boot(b, dir, &format!("kernel-vfio-{run}"), &spec, "poweroff")?;
    let (transport, per_gib) = dma_map_ms_per_gib(&json)?;
    if transport != "vfio" {
        return Err(format!(
            "the run report says transport {transport}, not vfio"
        ));
    }
    Ok(per_gib)
}

/// A scratch directory, removed when dropped unless it is the user's --keep directory.
struct Scratch {
    dir: PathBuf,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn host_detail() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("Linux {}, {cpus} CPUs", release.trim())
}

pub fn run(b: &PassthroughBench) -> Result<PassthroughBenchReport, PassthroughBenchError> {
    if b.runs == 0 {
        return Err(PassthroughBenchError::Usage(
            "--runs must be at least 1".into(),
        ));
    }
    for (what, p) in [
        ("kernel", &b.kernel),
        ("initramfs", &b.initrd),
        ("gpu-test-device", &b.device_bin),
    ] {
        if !p.is_file() {
            return Err(PassthroughBenchError::Usage(format!(
                "{what} {}: no such file",
                p.display()
            )));
        }
    }
    let scratch = match &b.keep_dir {
        Some(d) => Scratch {
            dir: d.clone(),
            keep: true,
        },
        None => Scratch {
            dir: std::env::temp_dir().join(format!("vmm-bench-passthrough-{}", std::process::id())),
            keep: false,
        },
    };
    std::fs::create_dir_all(&scratch.dir).map_err(io(scratch.dir.display().to_string()))?;
    let dir = scratch.dir.as_path();
    let host = HostKind::detect();
    let kernel_runs = if b.kernel_vfio.is_some() { b.runs } else { 0 };
    let bar = crate::progress::bar(u64::from(b.runs + kernel_runs), b.progress, "boots");
    if b.progress {
        bar.println(format!(
            "vmm bench passthrough: host {host}{}",
            if host == HostKind::Pvm {
                ": PVM timings, not hardware timings"
            } else {
                ""
            }
        ));
    }
    let (mut samples, mut failures) = (Vec::new(), Vec::new());
    for run in 1..=b.runs {
        bar.set_message(format!("run {run}: device, boot, vfio-bench"));
        match one_run(b, dir, run) {
            Ok(s) => samples.push(s),
            Err(e) => failures.push(format!("run {run}: {e}")),
        }
        bar.inc(1);
    }
    let (kernel_vfio_dma_map, kernel_vfio_skipped) = match &b.kernel_vfio {
        None => (None, Some(NO_KERNEL_VFIO.to_owned())),
        Some(sysfs) => {
            let mut ms = Vec::new();
            let mut why = None;
            for run in 1..=b.runs {
                bar.set_message(format!("kernel VFIO run {run}: {}", sysfs.display()));
                match kernel_vfio_run(b, dir, sysfs, run) {
                    Ok(v) => ms.push(v),
                    Err(e) => why = Some(format!("failed: {e}")),
                }
                bar.inc(1);
            }
            if ms.is_empty() {
                (None, why)
            } else {
                let figure = Figure {
                    key: "kernel_dma_map_ms_per_gib".into(),
                    label: format!(
                        "kernel VFIO DMA map of guest RAM, per GiB ({})",
                        sysfs.display()
                    ),
                    unit: "ms".into(),
                    median: crate::median(&ms),
                    samples: ms,
                };
                (Some(figure), None)
            }
        }
    };
    bar.finish_and_clear();
    if samples.is_empty() {
        return Err(PassthroughBenchError::NoRuns(failures));
    }
    let (figures, ratios) = reduce(&samples);
    let mut bytes: Vec<f64> = samples.iter().map(|s| s.dma_bytes as f64).collect();
    bytes.sort_by(f64::total_cmp);
    let mut notes = vec![
        format!(
            "per run: a fresh gpu-test-device (vfio-user, {} VRAM) and a fresh boot of the Linux test guest ({} MiB), whose agent binds {BDF} to vfio-pci (no-IOMMU) and runs vfio-bench,{BDF},{} in guest user space; figures are medians over the runs of each run's median",
            b.vram, b.mem_mib, b.iterations
        ),
        "access: ns per 4-byte access over batches; mapped = a VRAM page through the VFIO mmap (a memory slot, no exit), trapped = SCRATCH in BAR0's register page (every access exits to vmm, which forwards it to the server as a vfio-user message)".into(),
        "MSI-X: doorbell of a 64-byte DMA (trapped write) -> poll(2) on the vector's eventfd returns; the doorbell write alone is listed beside it".into(),
        "DMA: one transfer between VRAM and a physically contiguous piece of guest RAM, doorbell -> DMA_STATUS seen done by polling the trapped register (interrupts off); the doorbell write and the last status read are in the time, so a transfer this small understates the engine".into(),
        "vfio-user DMA_MAP: vmm's map_guest_memory (all guest RAM, at IOVA = GPA), from the run's --json report; the server mmaps the memory file, nothing is pinned".into(),
    ];
    if host == HostKind::Pvm {
        notes.push("host is PVM (/sys/module/kvm_pvm exists): guest ring 0 is emulated, so anything through the guest kernel (the interrupt's handler and wake-up, poll) is far slower than on hardware; these are PVM timings, NOT hardware timings".into());
    }
    if cfg!(debug_assertions) {
        notes.push(
            "debug build of vmm and the device: trapped accesses pay unoptimized code".into(),
        );
    }
    Ok(PassthroughBenchReport {
        tool: "vmm bench passthrough".into(),
        host: match host {
            HostKind::Pvm => "PVM".into(),
            HostKind::Hardware => "hardware".into(),
        },
        host_detail: host_detail(),
        build: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
        runs: b.runs,
        runs_ok: samples.len() as u32,
        mem_mib: b.mem_mib,
        iterations: b.iterations,
        trapped_via: agreed(samples.iter().map(|s| s.trapped_via.as_str())),
        dma_contig: agreed(samples.iter().map(|s| s.dma_contig.as_str())),
        dma_bytes: crate::median(&bytes) as u64,
        figures,
        ratios,
        kernel_vfio_dma_map,
        kernel_vfio_skipped,
        failures,
        notes,
    })
}
