//! Live-migration benchmark: the same Linux guest and workload migrated by QEMU 7.2 and by vmm
//! between two network namespaces (tools/two-hosts.sh) over TCP, in one run, next to what the
//! link itself does (one TCP connection's throughput, a 4 KiB request/response round trip).
//!
//! Each migration boots a fresh source guest whose agent runs an endless memory-writing
//! workload, migrates it, then stops the workload on the destination and has the agent verify
//! its memory: a sample counts only if that says `ok=true`. Prints medians over `--runs` per tool
//! and mode, and the ratios vmm/QEMU (downtime, total time), migration throughput / raw TCP, and
//! postcopy fault latency / TCP round trip. No thresholds: the numbers are the result.
//!
//! `--tools vmm,vmm+gpu` compares vmm without and with a passed-through device: `vmm+gpu` starts
//! the test device server (tools/gpu-test-device) in each namespace, passes it through over
//! vfio-user on both sides, and adds to the agent script the device's bind and its page writer
//! (DMA into guest RAM); after the migration the destination checks the memory workload and
//! every page-writer stamp, and the run counts only if both say ok=true. It reports, per mode,
//! downtime and total time with / without the device, the device's state bytes, its DMA-log
//! pages and harvest cost per round, and (precopy) the downtime split into its parts.
//!
//! `vmm` migrates over plain TCP (`--insecure`), `vmm+tls` over TLS 1.3 with a pre-shared key
//! (`--tls-psk`, rustls in userland: this host has no kTLS), same guest, same run: the summary
//! gives both throughputs per mode and their ratio, TLS's cost.
//!
//! `--stream-mib N` adds the stream scenario (stream.rs): vmm's micro guest sweeps N MiB (every
//! page non-zero), is paused and migrated by precopy, per tool `vmm` and `vmm+tls`; its MiB/s
//! is set against the raw TCP copy of the same run (`--tcp-mib` then defaults to N).
//! `--stream-only` runs that scenario alone (no Linux guest, no QEMU).

mod baseline;
mod chart;
mod guest;
mod qemu;
mod qmp;
mod sample;
mod stats;
mod stream;
mod summary;
mod vmm;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use sample::{Mode, Sample, Tool};
use summary::{
    chart_input, print_table, stream_chart_input, summarize, DeviceSummary, Skipped, Summary,
};
use vmm_tests::netns::{Side, TwoHosts};

/// vmm's kernel command line (vmm/src/boot/linux.rs `BASE_CMDLINE`), so both VMMs boot the guest
/// the same way; the agent script is appended.
const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 noxsave \
clearcpuid=151,288,308,158,306 tsc=reliable clocksource=kvm-clock \
rcupdate.rcu_cpu_stall_suppress=1 no-kvmapf";

#[derive(Parser)]
#[command(about = "Live migration between two network namespaces: vmm vs QEMU 7.2")]
struct Args {
    /// Migrations per tool and mode (each boots a fresh guest).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Smoke test: one run.
    #[arg(long)]
    quick: bool,
    /// Which VMMs to measure: qemu, vmm (plain TCP, --insecure), vmm+tls (TLS with a
    /// pre-shared key), vmm+gpu (vmm with the test device passed through).
    #[arg(long, value_delimiter = ',', default_value = "qemu,vmm,vmm+tls")]
    tools: Vec<Tool>,
    /// Which migration modes.
    #[arg(long, value_delimiter = ',', default_value = "precopy,postcopy")]
    modes: Vec<Mode>,
    /// The vmm binary (default: target/release/vmm of this checkout).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Kernel and initramfs (default: guest-images/out/images.env).
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// The agent script: must start an endless workload (PASSES = 0).
    #[arg(long, default_value = "workload,32,random,0")]
    agent: String,
    /// Downtime target given to both tools.
    #[arg(long, default_value_t = 300)]
    downtime_ms: u64,
    /// Bandwidth cap for both in MiB/s (0: none; QEMU's own default would be 32 MiB/s).
    #[arg(long, default_value_t = 0)]
    max_bandwidth_mib: u64,
    /// vmm's dirty tracker.
    #[arg(long, default_value = "bitmap")]
    tracker: String,
    /// vmm's data connections for precopy pages (`vmm remote migrate --channels`; default:
    /// vmm's own).
    #[arg(long)]
    channels: Option<u8>,
    /// Time the workload runs untracked between the source's first pass and the migration.
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// MiB written for the raw TCP throughput baseline (default: 256, or --stream-mib's N
    /// when the stream scenario runs, so both move a similar volume).
    #[arg(long)]
    tcp_mib: Option<u64>,
    /// The stream scenario: vmm's micro guest sweeps N MiB (every page stamped, non-zero), is
    /// paused and migrated by precopy (one full round, an empty stop-and-copy), once per run for
    /// each of `vmm` and `vmm+tls` in --tools (qemu and vmm+gpu are skipped), and its throughput
    /// is compared with the raw TCP copy of the same run. The destination resumes it, runs one
    /// more pass and checks its memory against the model: a run counts only if that passes.
    /// 0: off.
    #[arg(long, default_value_t = 0)]
    stream_mib: u64,
    /// Run only the stream scenario (needs --stream-mib): no Linux guest migrations, so no
    /// guest images and no QEMU either.
    #[arg(long, requires = "stream_mib")]
    stream_only: bool,
    /// 4 KiB round trips timed for the RTT baseline.
    #[arg(long, default_value_t = 2000)]
    rtt_samples: usize,
    #[arg(long, default_value_t = 300)]
    boot_timeout_s: u64,
    #[arg(long, default_value_t = 600)]
    migrate_timeout_s: u64,
    #[arg(long, default_value_t = 180)]
    verify_timeout_s: u64,
    /// Namespace pair name (default: bm<pid>).
    #[arg(long)]
    name: Option<String>,
    /// Where per-run logs go (default: /tmp/bench-migrate.<pid>, removed unless a run fails).
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Keep the logs even when every run succeeds.
    #[arg(long)]
    keep_logs: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Also write the JSON summary to this file (whichever of table or JSON is printed).
    #[arg(long)]
    json_file: Option<PathBuf>,
    /// Also write an SVG chart (downtime split into its parts, without and with the device).
    #[arg(long)]
    svg: Option<PathBuf>,
    /// vmm+gpu: the test device server (default: $VMM_GPU_TEST_DEVICE, else
    /// vmm-gpu-test-device next to the vmm binary).
    #[arg(long)]
    device_bin: Option<PathBuf>,
    /// vmm+gpu: the device's VRAM.
    #[arg(long, default_value_t = 64)]
    vram_mib: u64,
    /// vmm+gpu: pages per second the device's page writer stamps into guest RAM.
    #[arg(long, default_value_t = 2000)]
    dma_pages_s: u64,
    /// vmm+gpu: `vmm remote migrate --device-dirty` (log, all-pinned, off; default: vmm's own).
    #[arg(long)]
    device_dirty: Option<String>,
}

/// The passed-through device of `vmm+gpu` runs.
pub struct DeviceConfig {
    pub bin: PathBuf,
    pub vram_mib: u64,
    pub dma_pages_s: u64,
    pub dirty: Option<String>,
}

/// What every migration run uses.
pub struct Config {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub mem_mib: u64,
    pub vcpus: u32,
    pub agent: String,
    pub downtime_ms: u64,
    pub max_bandwidth_mib: u64,
    pub tracker: String,
    /// `--channels` for vmm's migrations (None: vmm's default).
    pub channels: Option<u8>,
    pub settle: Duration,
    pub boot_timeout: Duration,
    pub migrate_timeout: Duration,
    pub verify_timeout: Duration,
    pub device: DeviceConfig,
}

impl Config {
    pub fn cmdline(&self) -> String {
        format!("{BASE_CMDLINE} vmm.agent={}", self.agent)
    }
    /// QEMU's max-bandwidth (bytes/s); "none" is 1 TiB/s.
    pub fn max_bandwidth_bytes_s(&self) -> u64 {
        match self.max_bandwidth_mib {
            0 => 1 << 40,
            m => m << 20,
        }
    }
}

const PLACEMENT: &str = "both namespaces on one machine, linked by a veth pair; source, \
destination and the bench share its CPUs";

fn host_kind() -> &'static str {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "pvm"
    } else {
        "hardware"
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// On SIGINT/SIGTERM: remove the namespaces (which ends every VM still inside them) and exit,
/// since the Drop guards do not run when a signal ends the process.
fn clean_up_on_signal(name: String) {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    std::thread::spawn(move || loop {
        if INTERRUPTED.load(Ordering::SeqCst) {
            eprintln!("interrupted: removing namespaces {name}-a/-b and their VMs");
            let _ = std::process::Command::new(vmm_tests::netns::script())
                .args(["down", &name])
                .status();
            std::process::exit(130);
        }
        std::thread::sleep(Duration::from_millis(100));
    });
}

/// A line for the user: above the bar, or on stderr when the bar is hidden (not a terminal), where
/// indicatif's own println prints nothing.
fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        eprintln!("{line}");
    } else {
        pb.println(line);
    }
}

/// Routes log lines around the progress bar.
struct BarWriter(ProgressBar);

impl std::io::Write for BarWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .suspend(|| std::io::Write::write_all(&mut std::io::stderr(), buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runs = if args.quick { 1 } else { args.runs.max(1) };
    let mut tools = args.tools.clone();
    tools.sort();
    tools.dedup();
    let mut modes = args.modes.clone();
    modes.sort();
    modes.dedup();

    if args.stream_only && args.stream_mib == 0 {
        bail!("--stream-only needs --stream-mib N (N > 0)");
    }
    if args.stream_only {
        modes.clear();
    }
    let stream_tools: Vec<Tool> = if args.stream_mib > 0 {
        tools
            .iter()
            .copied()
            .filter(|&t| summary::stream_refuses(t).is_none())
            .collect()
    } else {
        Vec::new()
    };
    if args.stream_mib > 0 {
        for &t in &tools {
            if let Some(reason) = summary::stream_refuses(t) {
                eprintln!("stream: skipping {}: {reason}", t.name());
            }
        }
        if stream_tools.is_empty() {
            bail!("--stream-mib needs vmm or vmm+tls in --tools");
        }
    }
    let tcp_mib = args.tcp_mib.unwrap_or(if args.stream_mib > 0 {
        args.stream_mib
    } else {
        256
    });
    let mut skipped = Vec::new();
    for &mode in &modes {
        for &tool in &tools {
            if let Some(reason) = tool.refuses(mode) {
                eprintln!("skipping {} {}: {reason}", tool.name(), mode.name());
                skipped.push(Skipped { tool, mode, reason });
            }
        }
    }
    let pairs: Vec<(Mode, Tool)> = modes
        .iter()
        .flat_map(|&m| tools.iter().map(move |&t| (m, t)))
        .filter(|&(m, t)| t.refuses(m).is_none())
        .collect();
    let steps = (runs * (1 + pairs.len() + stream_tools.len())) as u64;
    let pb = ProgressBar::new(steps);
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let log_pb = pb.clone();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(move || BarWriter(log_pb.clone()))
        .init();

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-migrate must run as root (it creates network namespaces)");
    }
    let root = vmm_tests::workspace_root();
    let vmm_bin = args
        .vmm
        .clone()
        .unwrap_or_else(|| root.join("target/release/vmm"));
    if tools.iter().any(|t| t.is_vmm()) {
        vmm::check_support(&vmm_bin).context("vmm preflight")?;
    }
    let device = DeviceConfig {
        bin: args
            .device_bin
            .clone()
            .or_else(|| std::env::var_os("VMM_GPU_TEST_DEVICE").map(PathBuf::from))
            .unwrap_or_else(|| vmm_bin.with_file_name("vmm-gpu-test-device")),
        vram_mib: args.vram_mib,
        dma_pages_s: args.dma_pages_s,
        dirty: args.device_dirty.clone(),
    };
    let linux_tools = |t: &Tool| pairs.iter().any(|&(_, p)| p == *t);
    if pairs.iter().any(|&(_, t)| t == Tool::VmmGpu) {
        vmm::check_device_support(&vmm_bin, &device).context("vmm+gpu preflight")?;
    }
    let qemu_version = if linux_tools(&Tool::Qemu) {
        Some(qemu::ensure_installed()?)
    } else {
        None
    };
    // The stream scenario alone boots no Linux guest.
    let (kernel, initrd) = if pairs.is_empty() {
        (PathBuf::new(), PathBuf::new())
    } else {
        guest::images(args.kernel.clone(), args.initrd.clone())?
    };
    let cfg = Config {
        vmm: vmm_bin.clone(),
        kernel,
        initrd,
        mem_mib: args.mem_mib,
        vcpus: args.vcpus,
        agent: args.agent.clone(),
        downtime_ms: args.downtime_ms,
        max_bandwidth_mib: args.max_bandwidth_mib,
        tracker: args.tracker.clone(),
        channels: args.channels,
        settle: Duration::from_millis(args.settle_ms),
        boot_timeout: Duration::from_secs(args.boot_timeout_s),
        migrate_timeout: Duration::from_secs(args.migrate_timeout_s),
        verify_timeout: Duration::from_secs(args.verify_timeout_s),
        device,
    };

    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("bm{}", std::process::id()));
    clean_up_on_signal(name.clone());
    let hosts = TwoHosts::up(&name).context("creating the two namespaces")?;
    let (ns_a, ns_b) = (hosts.namespace(Side::A), hosts.namespace(Side::B));
    let log_dir = args
        .log_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/tmp/bench-migrate.{}", std::process::id())));
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;

    let mut samples = Vec::new();
    let mut stream_samples = Vec::new();
    let mut baselines = Vec::new();
    let mut port = 4400u16;
    for run in 1..=runs {
        pb.set_message(format!("run {run}/{runs}: TCP baselines"));
        let b = baseline::measure(&ns_a, &ns_b, hosts.addr_b, tcp_mib, args.rtt_samples)
            .context("TCP baseline between the namespaces")?;
        say(
            &pb,
            format!(
                "run {run}: TCP {:.0} MiB/s, 4 KiB RTT p50 {:.1} us p99 {:.1} us",
                b.tcp_mib_s, b.rtt_p50_us, b.rtt_p99_us
            ),
        );
        baselines.push(b);
        pb.inc(1);
        for &(mode, tool) in &pairs {
            port += 1;
            let dir = log_dir.join(format!("run{run}-{}-{}", tool.name(), mode.name()));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let label = format!("run {run}/{runs}: {} {}", tool.name(), mode.name());
            let progress = |stage: &str| pb.set_message(format!("{label}: {stage}"));
            let result = match tool {
                Tool::Qemu => qemu::run(&hosts, &cfg, mode, run, port, &dir, &progress)
                    .map_err(anyhow::Error::from),
                Tool::Vmm | Tool::VmmGpu | Tool::VmmTls => {
                    vmm::run(&hosts, &cfg, tool, mode, run, port, &dir, &progress)
                        .map_err(anyhow::Error::from)
                }
            };
            let sample = result.unwrap_or_else(|e| {
                let mut s = Sample::new(tool, mode, run);
                s.error = Some(format!("{e:#} (logs: {})", dir.display()));
                s
            });
            let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.0}"));
            let line = if sample.ok {
                format!(
                    "{label}: total {} ms, downtime {} ms, {} MiB, rounds {}, faults {}",
                    f(sample.total_ms),
                    f(sample.downtime_ms),
                    f(sample.bytes.map(|b| b as f64 / 1048576.0)),
                    f(sample.rounds.map(|r| r as f64)),
                    f(sample.postcopy_faults.map(|r| r as f64)),
                )
            } else {
                format!(
                    "{label}: FAILED: {}",
                    sample.error.as_deref().unwrap_or("?")
                )
            };
            say(&pb, line);
            samples.push(sample);
            pb.inc(1);
        }
        for &tool in &stream_tools {
            port += 1;
            let dir = log_dir.join(format!("run{run}-{}-stream", tool.name()));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let label = format!(
                "run {run}/{runs}: {} stream {} MiB",
                tool.name(),
                args.stream_mib
            );
            let progress = |stage: &str| pb.set_message(format!("{label}: {stage}"));
            let tcp_copy = |sink| baseline::throughput(&ns_a, &ns_b, hosts.addr_b, tcp_mib, sink);
            let mut sample = stream::StreamSample::new(tool, run, args.stream_mib);
            let result = stream::run(&hosts, &cfg, port, &dir, &progress, &tcp_copy, &mut sample);
            if let Err(e) = result {
                sample.ok = false;
                sample.error = Some(format!("{e:#} (logs: {})", dir.display()));
            }
            let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.0}"));
            let line = if sample.ok {
                format!(
                    "{label}: total {} ms, downtime {} ms, {} MiB, {} MiB/s, {} zero pages; raw TCP \
                     just before {} MiB/s, into fresh memory {} MiB/s",
                    f(sample.total_ms),
                    f(sample.downtime_ms),
                    f(sample.mib_sent()),
                    f(sample.throughput_mib_s()),
                    f(sample.zero_pages.map(|z| z as f64)),
                    f(sample.adjacent_tcp_mib_s),
                    f(sample.adjacent_tcp_fresh_mib_s),
                )
            } else {
                format!(
                    "{label}: FAILED: {}",
                    sample.error.as_deref().unwrap_or("?")
                )
            };
            say(&pb, line);
            stream_samples.push(sample);
            pb.inc(1);
        }
    }
    pb.finish_and_clear();
    drop(hosts);

    let (baseline, groups, comparisons, device_comparisons) =
        summarize(&samples, &baselines, &tools, &modes);
    let tls_comparisons = summary::tls_comparisons(&groups, &modes);
    let failed =
        samples.iter().filter(|s| !s.ok).count() + stream_samples.iter().filter(|s| !s.ok).count();
    let migrations = samples.len() + stream_samples.len();
    let stream = (args.stream_mib > 0)
        .then(|| summary::summarize_stream(args.stream_mib, &baseline, &tools, stream_samples));
    let summary = Summary {
        host: host_kind(),
        placement: PLACEMENT,
        qemu: qemu_version,
        vmm: tools
            .iter()
            .any(|t| t.is_vmm())
            .then(|| vmm_bin.display().to_string()),
        runs,
        mem_mib: cfg.mem_mib,
        vcpus: cfg.vcpus,
        agent: cfg.agent.clone(),
        downtime_target_ms: cfg.downtime_ms,
        tracker: cfg.tracker.clone(),
        device: tools.contains(&Tool::VmmGpu).then(|| DeviceSummary {
            server: cfg.device.bin.display().to_string(),
            vram_mib: cfg.device.vram_mib,
            dma_pages_s: cfg.device.dma_pages_s,
            agent: vmm::device_agent(&cfg.device, &cfg.agent),
        }),
        baseline,
        groups,
        comparisons,
        device_comparisons,
        tls_comparisons,
        skipped,
        samples,
        stream,
    };
    if let Some(path) = &args.json_file {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        let svg = chart::render(
            &chart_input(&summary),
            stream_chart_input(&summary).as_ref(),
        )?;
        std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("chart: {}", path.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_table(&summary);
    }
    if failed > 0 {
        bail!(
            "{failed} of {migrations} migrations failed; logs kept in {}",
            log_dir.display()
        );
    }
    if args.keep_logs {
        eprintln!("logs in {}", log_dir.display());
    } else if args.log_dir.is_none() {
        let _ = std::fs::remove_dir_all(&log_dir);
    }
    Ok(())
}
