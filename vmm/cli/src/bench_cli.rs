//! `vmm bench ...` arguments and output.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use micro_guest::Pattern;
use vmm::tracking::TrackerKind;
use vmm_bench::{self as bench, tracking::TrackingBench};

#[derive(Args)]
pub struct TrackingArgs {
    /// Backends to compare (comma-separated); default: all. Unsupported ones are listed with
    /// the reason.
    #[arg(long, value_delimiter = ',')]
    backends: Vec<String>,
    /// Micro guest region sizes in MiB (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [64u64, 256])]
    sizes: Vec<u64>,
    /// Micro guest patterns (comma-separated): sweep, random, hotset, sparse.
    #[arg(long, value_delimiter = ',', default_values_t = ["sweep".to_string(), "random".to_string(), "hotset".to_string(), "sparse".to_string()])]
    patterns: Vec<String>,
    /// Passes per run (harvest rounds; the first is not timed).
    #[arg(long, default_value_t = 8)]
    passes: u64,
    /// Runs per (workload, backend); figures are medians.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Write an SVG chart (slowdown and harvest cost per backend) to this file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Also run the Linux guest's agent workload (about two minutes per boot on PVM hosts, plus
    /// the workloads). On PVM, synchronous uffd-wp slows a Linux guest's pass from ~15 ms to
    /// ~5 minutes (measured); leave it out with --backends for a quick run.
    #[arg(long)]
    linux: bool,
    /// Linux kernel (default: from guest-images/out/images.env).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Linux initramfs (default: from guest-images/out/images.env).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Size of the agent's workload buffer in MiB.
    #[arg(long, default_value_t = 64)]
    linux_mib: u64,
    /// The agent's workload pattern: sweep, random or hotset.
    #[arg(long, default_value = "random")]
    linux_pattern: String,
    /// Passes of each agent workload.
    #[arg(long, default_value_t = 10)]
    linux_passes: u64,
    /// Linux boots per backend group (figures are medians).
    #[arg(long, default_value_t = 1)]
    linux_runs: u32,
    /// Keep each Linux boot's console log in this directory.
    #[arg(long)]
    linux_console_dir: Option<PathBuf>,
    /// Instead of the workloads above: the in-situ scenario with the GPU-shaped test device
    /// passed through to a Linux guest (vmm-gpu-test-device, next to this binary): the guest
    /// CPU writing VRAM, the device writing guest RAM, the device writing its VRAM, each under
    /// each backend, against the content of RAM and VRAM (about two minutes per boot on PVM).
    #[arg(long)]
    device_scenario: bool,
    /// The test device's VRAM in MiB (a power of two).
    #[arg(long, default_value_t = 64)]
    device_vram_mib: u64,
    /// Guest memory in MiB for the device scenario.
    #[arg(long, default_value_t = 256)]
    device_mem_mib: u64,
    /// Steps per source in the device scenario (VRAM writes, kernel restarts, page-writer
    /// stretches of two rounds each).
    #[arg(long, default_value_t = 5)]
    device_steps: u32,
    /// Round interval of the device scenario, in milliseconds.
    #[arg(long, default_value_t = 100)]
    device_interval_ms: u64,
    /// The test device's binary (default: vmm-gpu-test-device next to this binary).
    #[arg(long)]
    device_bin: Option<PathBuf>,
}

/// A path from guest-images/out/images.env (written by guest-images/build.sh).
fn image_from_env(key: &str) -> Option<PathBuf> {
    if let Ok(v) = std::env::var(key) {
        return Some(PathBuf::from(v));
    }
    let text = std::fs::read_to_string("guest-images/out/images.env").ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| PathBuf::from(v.trim().trim_matches('"')))
    })
}

pub fn tracking(a: TrackingArgs) -> Result<i32> {
    let backends = if a.backends.is_empty() {
        TrackerKind::ALL.to_vec()
    } else {
        a.backends
            .iter()
            .map(|b| b.parse::<TrackerKind>())
            .collect::<Result<_, _>>()?
    };
    let patterns = a
        .patterns
        .iter()
        .map(|p| p.parse::<Pattern>())
        .collect::<Result<_, _>>()?;
    if a.sizes.iter().any(|&s| s == 0 || s > 2048) {
        anyhow::bail!("--sizes: each size must be between 1 and 2048 MiB");
    }
    if a.device_scenario {
        return device_scenario(a, backends);
    }
    let linux = if a.linux {
        let kernel = a.kernel.or_else(|| image_from_env("VMM_KERNEL")).context(
            "--linux needs --kernel (or run guest-images/build.sh from the repository root)",
        )?;
        let initrd = a
            .initrd
            .or_else(|| image_from_env("VMM_INITRAMFS"))
            .context(
                "--linux needs --initrd (or run guest-images/build.sh from the repository root)",
            )?;
        for p in [&kernel, &initrd] {
            if !p.is_file() {
                anyhow::bail!("{}: no such file", p.display());
            }
        }
        if !["sweep", "random", "hotset"].contains(&a.linux_pattern.as_str()) {
            anyhow::bail!("--linux-pattern must be sweep, random or hotset");
        }
        if a.linux_mib == 0 || a.linux_mib > 1024 || a.linux_passes == 0 || a.linux_runs == 0 {
            anyhow::bail!(
                "--linux-mib must be 1..=1024, --linux-passes and --linux-runs at least 1"
            );
        }
        Some(bench::tracking::LinuxBench {
            kernel,
            initrd,
            size_mib: a.linux_mib,
            pattern: a.linux_pattern,
            passes: a.linux_passes,
            runs: a.linux_runs,
            console_dir: a.linux_console_dir,
        })
    } else {
        None
    };
    let b = TrackingBench {
        linux,
        backends,
        runs: a.runs,
        sizes_mib: a.sizes,
        patterns,
        passes: a.passes,
        progress: !a.quiet && !a.json,
    };
    let report = bench::tracking::run(&b)?;
    let json = bench::to_json(&report);
    if let Some(path) = &a.json_out {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.svg {
        let svg = bench::render_svg(&report)?;
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{json}");
    } else {
        print!("{}", bench::render_table(&report));
    }
    Ok(0)
}

fn device_scenario(a: TrackingArgs, backends: Vec<TrackerKind>) -> Result<i32> {
    let kernel = a
        .kernel
        .or_else(|| image_from_env("VMM_KERNEL"))
        .context("--device-scenario needs --kernel (or run guest-images/build.sh)")?;
    let initrd = a
        .initrd
        .or_else(|| image_from_env("VMM_INITRAMFS"))
        .context("--device-scenario needs --initrd (or run guest-images/build.sh)")?;
    let device_bin = match a.device_bin {
        Some(p) => p,
        None => std::env::current_exe()
            .context("cannot find this vmm binary")?
            .with_file_name("vmm-gpu-test-device"),
    };
    for p in [&kernel, &initrd, &device_bin] {
        if !p.is_file() {
            anyhow::bail!("{}: no such file", p.display());
        }
    }
    if a.device_mem_mib < 128 || a.device_mem_mib > 4096 {
        anyhow::bail!("--device-mem-mib must be 128..=4096");
    }
    if a.device_interval_ms < 10 || a.device_interval_ms > 10_000 {
        anyhow::bail!("--device-interval-ms must be 10..=10000");
    }
    let b = bench::device_tracking::DeviceBench {
        kernel,
        initrd,
        device_bin,
        backends,
        vram_mib: a.device_vram_mib,
        mem_mib: a.device_mem_mib,
        interval: std::time::Duration::from_millis(a.device_interval_ms),
        steps: a.device_steps,
        console_dir: a.linux_console_dir,
    };
    let report = bench::device_tracking::run(&b)?;
    let json = bench::device_table::to_json(&report);
    if let Some(path) = &a.json_out {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{json}");
    } else {
        print!("{}", bench::device_table::render_table(&report));
    }
    Ok(0)
}

#[derive(Args)]
pub struct DemandArgs {
    /// Demand-paging backends (comma-separated); kvm-userfault shows the kernel's refusal
    /// where the host lacks it.
    #[arg(long, value_delimiter = ',', default_values_t = ["uffd-missing".to_string(), "uffd-minor".to_string(), "memslot-exits".to_string(), "kvm-userfault".to_string()])]
    backends: Vec<String>,
    /// vCPU counts with private regions only (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 2, 3, 4])]
    vcpus: Vec<u32>,
    /// vCPU count of the case where every vCPU also writes one shared region (as large as a
    /// private one); 0: no shared case.
    #[arg(long, default_value_t = 4)]
    shared_vcpus: u32,
    /// Each vCPU's private region in MiB.
    #[arg(long, default_value_t = 8)]
    region_mib: u64,
    /// Placements of the restoring process (comma-separated): pinned (taskset -c 0: every
    /// thread on one CPU), free (no affinity).
    #[arg(long, value_delimiter = ',', default_values_t = ["pinned".to_string(), "free".to_string()])]
    placements: Vec<String>,
    /// Fault handlers (comma-separated): in-process, page-server (skipped, with the reason,
    /// where this build has no `vmm page-server`).
    #[arg(long, value_delimiter = ',', default_values_t = ["in-process".to_string(), "page-server".to_string()])]
    handlers: Vec<String>,
    /// Bytes brought in per fault (--demand-chunk of vmm restore).
    #[arg(long, default_value = "4K")]
    chunk: String,
    /// Runs per row (a fresh source guest and snapshot each); figures are medians.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Window (ms of guest passes) in which the snapshot must land after the first pass.
    #[arg(long, default_value_t = 15.0)]
    margin_ms: f64,
    /// A quick check: 1 run, 1 and 2 vCPUs, no shared case, uffd-missing only, free, in-process,
    /// 2 MiB regions (overrides those options).
    #[arg(long)]
    quick: bool,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Write an SVG chart (pages/s per vCPU per backend per vCPU count) to this file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn demand(a: DemandArgs) -> Result<i32> {
    use bench::demand::{runner::Case, DemandBench, Handler, Placement};
    let exe = std::env::current_exe().context("cannot find this vmm binary")?;
    let mut b = DemandBench {
        exe,
        runs: a.runs,
        region_mib: a.region_mib,
        cases: a
            .vcpus
            .iter()
            .map(|&vcpus| Case {
                vcpus,
                shared_pages: 0,
            })
            .collect(),
        backends: a.backends.clone(),
        placements: a
            .placements
            .iter()
            .map(|p| p.parse::<Placement>())
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?,
        handlers: a
            .handlers
            .iter()
            .map(|h| h.parse::<Handler>())
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?,
        chunk: a.chunk.clone(),
        margin_ms: a.margin_ms,
        progress: !a.quiet && !a.json,
    };
    if a.shared_vcpus > 0 {
        b.cases.push(Case {
            vcpus: a.shared_vcpus,
            shared_pages: a.region_mib * 256,
        });
    }
    if a.quick {
        b.runs = 1;
        b.region_mib = 2;
        b.cases = [1, 2]
            .map(|vcpus| Case {
                vcpus,
                shared_pages: 0,
            })
            .to_vec();
        b.backends = vec!["uffd-missing".into()];
        b.placements = vec![Placement::Free];
        b.handlers = vec![Handler::InProcess];
    }
    for be in &b.backends {
        crate::restore_cli::check_backend(be)?;
    }
    crate::restore_cli::parse_chunk(&b.chunk)?;
    if b.region_mib == 0 || b.region_mib > 1024 {
        anyhow::bail!("--region-mib must be 1..=1024");
    }
    if b.cases.iter().any(|c| c.vcpus == 0 || c.vcpus > 32) {
        anyhow::bail!("--vcpus and --shared-vcpus: each count must be 1..=32");
    }
    if b.margin_ms.is_nan() || b.margin_ms <= 0.0 {
        anyhow::bail!("--margin-ms must be positive");
    }
    let report = bench::demand::run(&b)?;
    let json = bench::demand::to_json(&report);
    if let Some(path) = &a.json_out {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.svg {
        let svg = bench::demand::render_svg(&report)?;
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{json}");
    } else {
        print!("{}", bench::demand::render_table(&report));
    }
    Ok(0)
}

#[derive(Args)]
pub struct PassthroughArgs {
    /// Guest boots (a fresh device each); figures are medians.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Accesses per trapped batch and MSI-X samples of the agent's vfio-bench.
    #[arg(long, default_value_t = 200)]
    iterations: u64,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    mem_mib: u64,
    /// The test device's VRAM (its --vram-size).
    #[arg(long, default_value = "256M")]
    vram: String,
    /// Linux kernel (default: from guest-images/out/images.env).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Linux initramfs (default: from guest-images/out/images.env).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The vmm-gpu-test-device binary (default: $VMM_GPU_TEST_DEVICE, else next to this vmm).
    #[arg(long)]
    device_bin: Option<PathBuf>,
    /// A host PCI device bound to vfio-pci (/sys/bus/pci/devices/DDDD:BB:DD.F) whose kernel
    /// VFIO DMA map of guest RAM is timed too; without it that row says it was skipped.
    #[arg(long)]
    kernel_vfio: Option<PathBuf>,
    /// Keep every run's console, logs and report in this directory.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn passthrough(a: PassthroughArgs) -> Result<i32> {
    let exe = std::env::current_exe().context("cannot find this vmm binary")?;
    let kernel = a
        .kernel
        .or_else(|| image_from_env("VMM_KERNEL"))
        .context("needs --kernel (or run guest-images/build.sh from the repository root)")?;
    let initrd = a
        .initrd
        .or_else(|| image_from_env("VMM_INITRAMFS"))
        .context("needs --initrd (or run guest-images/build.sh from the repository root)")?;
    let device_bin = a
        .device_bin
        .or_else(|| std::env::var_os("VMM_GPU_TEST_DEVICE").map(PathBuf::from))
        .unwrap_or_else(|| exe.with_file_name("vmm-gpu-test-device"));
    if a.mem_mib < 128 || a.mem_mib > 65536 {
        anyhow::bail!("--mem-mib must be 128..=65536");
    }
    if a.iterations == 0 || a.iterations > 100_000 {
        anyhow::bail!("--iterations must be 1..=100000");
    }
    let b = bench::passthrough::PassthroughBench {
        exe,
        device_bin,
        kernel,
        initrd,
        runs: a.runs,
        mem_mib: a.mem_mib,
        vram: a.vram,
        iterations: a.iterations,
        kernel_vfio: a.kernel_vfio,
        keep_dir: a.keep,
        progress: !a.quiet && !a.json,
    };
    let report = bench::passthrough::run(&b)?;
    let json = bench::passthrough::to_json(&report);
    if let Some(path) = &a.json_out {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{json}");
    } else {
        print!("{}", bench::passthrough::render_table(&report));
    }
    Ok(0)
}
