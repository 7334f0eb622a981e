//! The `vmm` command line.

mod bench_cli;
mod remote_cli;
mod restore_cli;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use micro_guest::{Pattern, Workload};
use vmm::boot::linux::{LinuxBoot, BASE_CMDLINE};
use vmm::boot::micro::read_payload;
use vmm::machine::TrackingOptions;
use vmm::machine::{self, ConsoleOutput, DiskConfig, GuestConfig, RunReport, VmConfig};
use vmm::memory::parse_size;
use vmm::tracking::TrackerKind;
use vmm::userfault::DemandKind;

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A small KVM VMM whose guest memory is observable"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest: a Linux kernel (--kernel), the built-in micro guest (--micro), or a raw
    /// payload (--payload). Exit code: 0 guest reset/poweroff or micro guest success,
    /// 1 vmm error, 2 usage error, 3 guest kernel panic, 4 guest fault, 5 micro guest failure,
    /// 159 a forbidden syscall (--seccomp kill).
    Run(Box<RunArgs>),
    /// List the dirty-tracking backends and whether each can work on this host (and if not,
    /// the missing capability, feature or errno).
    Backends {
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Control a running VM through its API socket (vmm run --api-socket): status, pause,
    /// resume, console input, migrate.
    Remote(remote_cli::RemoteArgs),
    /// What can this host track? Every mechanism on every memory kind, with the evidence
    /// (runs the `vmm-probe` binary built beside this one; `vmm probe --help` for its options:
    /// --json, --markdown PATH).
    Probe {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Snapshot a running VM (state + memory) into a directory through its API socket.
    Snapshot {
        /// The VM's API socket (vmm run --api-socket).
        #[arg(long)]
        api_socket: PathBuf,
        #[command(flatten)]
        params: vmm::api::SnapshotParams,
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot: eagerly, or lazily with a demand-paging backend (--lazy --demand).
    Restore(restore_cli::RestoreArgs),
    /// Serve the memory of one lazy restore from a separate process (`vmm restore --lazy
    /// --page-server PATH`), then exit.
    PageServer(restore_cli::PageServerArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Compare dirty-tracking backends on the same workloads: exactness, guest slowdown, harvest
    /// cost, memory. Prints a table; --json and --svg for the rest.
    Tracking(bench_cli::TrackingArgs),
    /// Compare demand-paging backends on lazy restores of the micro guest: pages/s per vCPU and
    /// fault latency against an eager restore, 1 to 4 vCPUs, pinned or free, in-process or
    /// page-server handler. Prints a table; --json and --svg for the rest.
    Demand(bench_cli::DemandArgs),
    /// What a passed-through device costs the guest (the gpu-test-device over vfio-user, the
    /// Linux test guest's agent): mapped vs trapped BAR access, MSI-X latency, DMA throughput
    /// against memcpy, DMA-map time per GiB. Prints a table; --json for the rest.
    Passthrough(bench_cli::PassthroughArgs),
}

#[derive(Args)]
pub(crate) struct RunArgs {
    /// Linux kernel: an uncompressed ELF vmlinux or a bzImage.
    #[arg(long, conflicts_with_all = ["micro", "payload"])]
    kernel: Option<PathBuf>,
    /// Initramfs for the Linux kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Replace the whole kernel command line (default: a console on ttyS0 and the PVM options).
    #[arg(long, requires = "kernel")]
    cmdline: Option<String>,
    /// Append to the kernel command line.
    #[arg(long, requires = "kernel")]
    append: Option<String>,
    /// Script for the guest agent: commands separated by ';', arguments by ','
    /// (e.g. "cpus;poweroff"). Passed as vmm.agent= on the kernel command line.
    #[arg(long, requires = "kernel")]
    agent: Option<String>,

    /// Run the built-in micro guest (bare-metal write workload, ground truth for tracking).
    #[arg(long)]
    micro: bool,
    /// Run a raw x86-64 payload under the micro guest's entry contract.
    #[arg(long, conflicts_with = "micro")]
    payload: Option<PathBuf>,
    /// Micro guest write pattern: sweep, random, hotset, sparse.
    #[arg(long, default_value = "sweep")]
    pattern: String,
    /// Micro guest region size in MiB (per vCPU: each vCPU writes its own region).
    #[arg(long, default_value_t = 16)]
    region_mib: u64,
    /// Micro guest shared region, in 4 KiB pages after the private regions, that every vCPU
    /// writes (each its own 8-byte slot of a page). 0: none.
    #[arg(long, default_value_t = 0, requires = "micro")]
    shared_pages: u64,
    /// Micro guest passes (0 = forever).
    #[arg(long, default_value_t = 4)]
    passes: u64,
    /// Writes per pass (random, hotset) or page stride (sparse). Default: one per region page.
    #[arg(long)]
    param: Option<u64>,
    /// Micro guest PRNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// After the micro guest finishes, compare its regions byte for byte with the reference
    /// model (with --passes 0: the model of the budget `vmm remote finish` sets, as always then).
    #[arg(long, requires = "micro")]
    verify: bool,

    /// Number of vCPUs (1 to 32; default 1).
    #[arg(long)]
    vcpus: Option<u32>,
    /// Guest memory size: 128M, 1G, or a plain number of MiB (default 128M).
    #[arg(long)]
    mem: Option<String>,
    /// A virtio-blk disk image: PATH or PATH,ro. Repeatable; the first is /dev/vda.
    #[arg(long)]
    disk: Vec<String>,
    /// Pass a PCI function through: vfio-user:SOCKET (a device served over vfio-user, e.g.
    /// vmm-gpu-test-device) or vfio:/sys/bus/pci/devices/DDDD:BB:DD.F[,iommu=group|iommufd]
    /// (a host device bound to vfio-pci). Repeatable. Guest RAM is DMA-mapped at IOVA = GPA.
    /// With --incoming: one per device of the incoming VM, in its order (its state arrives
    /// over VFIO migration; a destination takes devices only from its own command line).
    #[arg(long)]
    device: Vec<vmm::machine::pci::DeviceSpec>,
    /// The guest's physical address bits (36 up to what the host gives a guest; default: all
    /// of those, capped at 46). Sizes the 64-bit MMIO window where large BARs go, and the
    /// guest's CPUID says the same, as QEMU's phys-bits: try a GPU on a smaller host's map.
    #[arg(long, conflicts_with = "incoming")]
    phys_bits: Option<u8>,
    /// Guest console: stdout, none, or file:PATH.
    #[arg(long, default_value = "stdout")]
    console: String,
    /// Do not feed stdin to the guest console.
    #[arg(long)]
    no_console_input: bool,
    /// Print the run report as JSON on stdout (the console should then go to a file).
    #[arg(long)]
    json: bool,

    /// Track dirty pages with this backend during the run (bitmap, bitmap-manual, ring, uffd-wp,
    /// uffd-wp-async, soft-dirty). The micro guest is harvested at each pass and checked
    /// against its model (with --verify, a miss or false positive fails the run); other
    /// guests every --track-interval-ms.
    #[arg(long)]
    track: Option<String>,
    /// Harvest period for guests without pass sync points.
    #[arg(long, default_value_t = 100)]
    track_interval_ms: u64,
    /// In-situ comparison on a Linux guest: each time the agent starts a workload, switch to
    /// the next backend of this comma-separated list (`none` = untracked), on the running guest.
    /// Nothing is tracked before the first workload. On PVM hosts this is how to use `ring` with
    /// a Linux guest: its emulated kernel can overflow a ring during boot (PLATFORM.md §5).
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "track",
        requires = "kernel"
    )]
    track_schedule: Vec<String>,

    /// Serve the control API (status, pause, resume, console, migrate) on this Unix socket;
    /// `vmm remote --api-socket PATH ...` talks to it. Its directory must be writable by you
    /// alone (README, "The control API socket").
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Create the VM with a KVM dirty ring (needed to migrate with `--tracker ring`).
    #[arg(long)]
    dirty_ring: bool,
    /// Receive a migrating VM instead of booting one: listen on tcp://ADDR:PORT. --mem and
    /// --vcpus, if given, must match the incoming VM; --disk replaces its disk paths.
    #[arg(long, conflicts_with_all = ["kernel", "micro", "payload"])]
    incoming: Option<String>,
    /// With --incoming, precopy: write guest RAM as received (the source's RAM at its pause),
    /// before the guest runs here, to PATH (a new file). A postcopy migration is then refused: use
    /// --dump-final.
    #[arg(long, requires = "incoming")]
    dump_memory: Option<PathBuf>,
    /// Write guest RAM when the run ends to PATH (a new file), read as the guest sees it (after a postcopy
    /// migration, once every page has arrived).
    #[arg(long)]
    dump_final: Option<PathBuf>,
    /// With --incoming: the demand-paging backend postcopy runs on (uffd-missing, uffd-minor,
    /// memslot-exits, kvm-userfault where the kernel has it).
    #[arg(long, requires = "incoming", default_value_t = DemandKind::default())]
    demand: DemandKind,
    /// With --incoming: bytes brought in per vCPU exit (exit backends): 4K to 2M.
    #[arg(long, requires = "incoming", default_value = "4K")]
    demand_chunk: String,
    /// With --incoming: how the migration link is secured, exactly one of --tls-dir,
    /// --tls-psk and --insecure.
    #[command(flatten)]
    transport: vmm::migration::tls::TransportArgs,
    /// With --incoming and --tls-dir: the source's certificate must also carry NAME as a DNS
    /// name or as its subject's CN (QEMU's tls-authz).
    #[arg(long, value_name = "NAME", requires = "incoming")]
    tls_authz: Option<String>,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

/// The sandbox of a vmm that runs a guest (README, "Sandbox").
#[derive(Args)]
pub(crate) struct SandboxArgs {
    /// Per-thread seccomp filters: kill (a forbidden syscall ends the vmm with exit code 159,
    /// naming the syscall and the thread), log (it runs and the kernel logs it), off.
    #[arg(long, value_enum, default_value_t = vmm::seccomp::SeccompMode::Kill)]
    seccomp: vmm::seccomp::SeccompMode,
    /// Once set up (VM, devices, sockets and files open) and before any guest runs or any peer's
    /// request is read, become this user for good: UID[:GID] or NAME[:GROUP] (default group:
    /// the user's own). Needs a vmm started as root.
    #[arg(long)]
    user: Option<String>,
}

impl SandboxArgs {
    /// Sets the sandbox up for this process (before anything else of the command runs).
    pub(crate) fn init(&self) -> Result<()> {
        let user = self
            .user
            .as_deref()
            .map(str::parse::<vmm::seccomp::User>)
            .transpose()?;
        vmm::seccomp::init(vmm::seccomp::Policy {
            mode: self.seccomp,
            user,
        })?;
        Ok(())
    }
}

pub(crate) fn parse_disk(spec: &str) -> Result<DiskConfig> {
    let (path, opt) = match spec.rsplit_once(',') {
        Some((p, "ro")) => (p, true),
        Some((p, "rw")) => (p, false),
        Some((_, other)) => bail!("--disk {spec}: unknown option '{other}' (expected ro or rw)"),
        None => (spec, false),
    };
    let path = PathBuf::from(path);
    check_file("--disk", &path, "disk image", true)?;
    Ok(DiskConfig {
        path,
        read_only: opt,
    })
}

/// A file argument exists and is a regular file (or a block device where `block_ok`); told
/// from its metadata, so a FIFO is named as one rather than opened and waited on.
fn check_file(flag: &str, path: &Path, what: &str, block_ok: bool) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::metadata(path) else {
        bail!("{flag} {}: no such {what} file", path.display());
    };
    let t = meta.file_type();
    if !(t.is_file() || block_ok && t.is_block_device()) {
        bail!(
            "{flag} {}: is a {}, not a regular file{}",
            path.display(),
            vmm::host_file::kind_of(t),
            if block_ok { " or block device" } else { "" }
        );
    }
    Ok(())
}

fn guest_config(a: &RunArgs) -> Result<GuestConfig> {
    if let Some(kernel) = &a.kernel {
        check_file("--kernel", kernel, "kernel", false)?;
        if let Some(initrd) = &a.initrd {
            check_file("--initrd", initrd, "initramfs", false)?;
        }
        let mut cmdline = a
            .cmdline
            .clone()
            .unwrap_or_else(|| BASE_CMDLINE.to_string());
        if let Some(extra) = &a.append {
            cmdline.push(' ');
            cmdline.push_str(extra);
        }
        if let Some(script) = &a.agent {
            if script.contains(char::is_whitespace) {
                bail!("--agent: the script must not contain spaces (use ',' between arguments)");
            }
            cmdline.push_str(&format!(" {}{script}", guest_abi::agent::CMDLINE_KEY));
        }
        return Ok(GuestConfig::Linux(LinuxBoot {
            kernel: kernel.clone(),
            initrd: a.initrd.clone(),
            cmdline,
        }));
    }
    if a.micro || a.payload.is_some() {
        let pattern: Pattern = a.pattern.parse()?;
        let pages = a
            .region_mib
            .checked_mul(256)
            .context("--region-mib is too large")?;
        let param = a.param.unwrap_or(match pattern {
            Pattern::Sparse => 16,
            _ => pages,
        });
        let region = guest_abi::layout::MICRO_REGION_GPA;
        // Every vCPU runs the workload on its own region; the shared one follows them all.
        // A count the machine refuses anyway is left to its own error message.
        let vcpus = match a.vcpus.unwrap_or(1) {
            n if (1..=u32::from(machine::MAX_VCPUS)).contains(&n) => u64::from(n),
            _ => 1,
        };
        let private_bytes = pages
            .checked_mul(4096 * vcpus)
            .context("--region-mib times --vcpus is too large")?;
        let shared_gpa = region.saturating_add(private_bytes);
        let workload = Workload::new(region, pages, pattern, a.passes, param, a.seed)?;
        let workload = workload.with_vcpus(vcpus, shared_gpa, a.shared_pages)?;
        let payload = match &a.payload {
            Some(p) => read_payload(p)?,
            None => micro_guest::PAYLOAD.to_vec(),
        };
        // An endless workload (--passes 0) has no model yet: `vmm remote finish` arms the check
        // for the budget it sets.
        let expected = if a.verify {
            workload
                .final_image()
                .map(|pages| vmm::micro_check::Expected::new(region, pages))
        } else {
            None
        };
        let shared_bytes = a.shared_pages.saturating_mul(4096);
        return Ok(GuestConfig::Micro {
            payload,
            mailbox: workload.mailbox().to_vec(),
            region: Some((region, private_bytes.saturating_add(shared_bytes))),
            expected,
        });
    }
    bail!("nothing to boot: give --kernel (Linux), --micro (the micro guest) or --payload FILE")
}

pub(crate) fn print_report(r: &RunReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    let f = |v: Option<f64>| v.map_or("-".to_string(), |ms| format!("{ms:.1} ms"));
    eprintln!("vmm: {}", r.outcome.describe());
    eprintln!(
        "vmm: host {:?}, {} vCPU(s), {} MiB; setup {}, boot-timer {}, agent ready {}, wall {:.1} ms",
        r.host,
        r.vcpus,
        r.mem_mib,
        f(r.setup_ms),
        f(r.boot_timer_ms),
        f(r.agent_ready_ms),
        r.wall_ms
    );
    if let Some(p) = r.micro_passes {
        eprintln!("vmm: micro guest passes completed: {p}");
    }
    if let Some(c) = &r.micro_check {
        eprintln!(
            "vmm: micro guest memory check: {} pages, {} mismatches",
            c.pages_checked, c.mismatches
        );
    }
    if let Some(kib) = r.rss_beyond_guest_kib {
        eprintln!("vmm: resident memory beyond guest RAM: {kib} KiB");
    }
    if let Some(t) = &r.tracking {
        let backend = t.backend.map_or("none".to_string(), |k| k.to_string());
        let mut harvest: Vec<f64> = t.rounds.iter().map(|r| r.harvest_us).collect();
        harvest.sort_by(f64::total_cmp);
        let median = harvest.get(harvest.len() / 2).copied().unwrap_or(f64::NAN);
        let dirty: u64 = t.rounds.iter().map(|r| r.dirty_pages).sum();
        eprintln!(
            "vmm: tracking {backend}: {} rounds, {dirty} dirty pages in all, median harvest {median:.1} us, {} KiB held",
            t.rounds.len(),
            t.memory_overhead_bytes / 1024
        );
        if t.rounds.iter().any(|r| r.expected.is_some()) {
            eprintln!(
                "vmm: tracking exactness against the micro guest's model: {} misses, {} false positives",
                t.misses, t.false_positives
            );
        }
        if let Some(e) = &t.error {
            eprintln!("vmm: tracking failed: {e}");
        }
    }
    Ok(())
}

fn run(a: RunArgs, start: Instant) -> Result<i32> {
    a.sandbox.init()?;
    if a.incoming.is_some() {
        return remote_cli::incoming(&a, start);
    }
    if a.transport != vmm::migration::tls::TransportArgs::default() {
        bail!("--tls-dir, --tls-psk and --insecure secure an incoming migration: they need --incoming");
    }
    let mem_bytes = parse_size(a.mem.as_deref().unwrap_or("128M"))
        .map_err(|e| anyhow::anyhow!("--mem: {e}"))?;
    if mem_bytes == 0 {
        bail!("--mem: guest memory size must be greater than 0");
    }
    let console: ConsoleOutput = a
        .console
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--console: {e}"))?;
    let disks = a
        .disk
        .iter()
        .map(|d| parse_disk(d))
        .collect::<Result<Vec<_>>>()?;
    let guest = guest_config(&a)?;
    let interval = Duration::from_millis(a.track_interval_ms.max(1));
    let tracking = match &a.track {
        Some(name) => {
            let kind: TrackerKind = name.parse()?;
            let mut opts = TrackingOptions::backend(kind);
            opts.interval = interval;
            Some(opts)
        }
        None if !a.track_schedule.is_empty() => {
            let schedule = a
                .track_schedule
                .iter()
                .map(|n| match n.as_str() {
                    "none" => Ok(None),
                    other => other.parse::<TrackerKind>().map(Some),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Some(TrackingOptions {
                backend: None,
                interval,
                raw_every_other: false,
                schedule,
                content_truth: false,
            })
        }
        None => None,
    };
    let cfg = VmConfig {
        tracking,
        vcpus: a.vcpus.unwrap_or(1),
        mem_bytes,
        guest,
        disks,
        devices: a.device.clone(),
        phys_bits: a.phys_bits,
        console_input: !a.no_console_input && console == ConsoleOutput::Stdout,
        console,
        dirty_ring: a.dirty_ring,
        api_socket: a.api_socket.clone(),
    };
    let mut m = machine::Machine::build_and_boot(&cfg, start)?;
    let dump = a
        .dump_final
        .as_ref()
        .map(|path| machine::final_dump::FinalDump::arm_whole(&mut m, path.clone()));
    let report = m.run(machine::RunHooks {
        api: Some(vmm::api::server::serve_api),
        on_running: None,
    })?;
    if let Some(dump) = dump {
        dump.result().map_err(|e| anyhow::anyhow!(e))?;
    }
    print_report(&report, a.json)?;
    if let Some(t) = &report.tracking {
        if t.error.is_some() {
            return Ok(1);
        }
        if a.verify && report.exit_code == 0 && (t.misses > 0 || t.false_positives > 0) {
            return Ok(machine::report::EXIT_MICRO_FAILED);
        }
    }
    Ok(report.exit_code)
}

fn backends(json: bool) -> Result<i32> {
    let list = vmm::tracking::availability();
    if json {
        let v: Vec<_> = list
            .iter()
            .map(|(k, r)| {
                serde_json::json!({
                    "backend": k.name(),
                    "available": r.is_ok(),
                    "reason": r.as_ref().err(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for (k, r) in &list {
            match r {
                Ok(()) => println!("{:<14} available", k.name()),
                Err(why) => println!("{:<14} unsupported: {why}", k.name()),
            }
        }
        println!(
            "(ring excludes bitmap and bitmap-manual on the same VM: it is chosen at VM creation)"
        );
    }
    Ok(0)
}

/// The probe lives in its own crate (tools/probe), which builds on this library; it runs as the
/// `vmm-probe` binary next to this one.
fn probe(args: &[String]) -> Result<i32> {
    let exe = std::env::current_exe().context("locating the vmm binary")?;
    let probe = exe.with_file_name("vmm-probe");
    if !probe.is_file() {
        bail!(
            "{} is missing: build it with `cargo build -p vmm-probe` (same profile as vmm)",
            probe.display()
        );
    }
    let status = std::process::Command::new(&probe)
        .args(args)
        .status()
        .with_context(|| format!("running {}", probe.display()))?;
    Ok(status.code().unwrap_or(1))
}

/// The error and its causes as `{:#}` writes them, less each cause whose text is already there:
/// the library's errors show their source in their own message and name it as `source()` too.
fn chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}

fn main() {
    let start = Instant::now();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = vmm::host::raise_fd_limit() {
        eprintln!("vmm: warning: raising the open-file limit: {e}");
    }
    let code = match cli.command {
        Command::Run(a) => run(*a, start),
        Command::Backends { json } => backends(json),
        Command::Bench(BenchCommand::Tracking(a)) => bench_cli::tracking(a),
        Command::Bench(BenchCommand::Demand(a)) => bench_cli::demand(a),
        Command::Bench(BenchCommand::Passthrough(a)) => bench_cli::passthrough(a),
        Command::Remote(a) => remote_cli::remote(a),
        Command::Probe { args } => probe(&args),
        Command::Snapshot {
            api_socket,
            params,
            json,
        } => remote_cli::snapshot(api_socket, params, json),
        Command::Restore(a) => restore_cli::run(a, start),
        Command::PageServer(a) => restore_cli::page_server(a),
    };
    let code = match code {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmm: error: {}", chain(&e));
            1
        }
    };
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::chain;
    use anyhow::Context;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let connect = vmm::migration::MigrationError::Connect {
            addr: "h:1".into(),
            source: std::io::Error::other("refused"),
        };
        let e = Err::<(), _>(connect).context("migrating").unwrap_err();
        assert_eq!(chain(&e), "migrating: connecting to h:1: refused");
        let e = Err::<(), _>(std::io::Error::other("inner"))
            .context("outer")
            .unwrap_err();
        assert_eq!(chain(&e), "outer: inner");
    }
}
