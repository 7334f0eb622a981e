//! `vmm restore DIR`: eager or lazy restore of a snapshot taken with `vmm snapshot`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use clap::Args;
use vmm::machine::ConsoleOutput;
use vmm::snapshot::restore::{restore, RestoreOptions};
use vmm::userfault::{memslot_exits::check_chunk, DemandKind};

use crate::{parse_disk, print_report, SandboxArgs};

#[derive(Args)]
pub struct RestoreArgs {
    /// Snapshot directory (from `vmm snapshot --to DIR`).
    dir: PathBuf,
    /// Resume at once and bring guest memory in on demand from the snapshot file.
    #[arg(long)]
    lazy: bool,
    /// Demand-paging backend for --lazy: uffd-missing, uffd-minor, memslot-exits,
    /// kvm-userfault (where the kernel has it).
    #[arg(long, default_value_t = DemandKind::default())]
    demand: DemandKind,
    /// Bytes brought in per fault: a power of two from 4K to 2M.
    #[arg(long, default_value = "4K")]
    demand_chunk: String,
    /// memslot-exits: memslots used before newly mapped chunks are merged with their
    /// neighbours (KVM allows ~32K; merging costs a delete per neighbour).
    #[arg(long, default_value_t = vmm::userfault::memslot_exits::DEFAULT_SOFT_LIMIT)]
    demand_soft_slots: usize,
    /// With --lazy: also bring in untouched pages in the background.
    #[arg(long, requires = "lazy")]
    prefetch: bool,
    /// Replacement disk images (PATH or PATH,ro), in the snapshot's order.
    #[arg(long)]
    disk: Vec<String>,
    /// Guest console: stdout, none, or file:PATH.
    #[arg(long, default_value = "stdout")]
    console: String,
    #[arg(long)]
    no_console_input: bool,
    /// Serve the control API on this Unix socket (in a directory writable by you alone).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Write guest RAM as restored, before the guest runs, to PATH, a new file (eager restore
    /// only).
    #[arg(long, conflicts_with = "lazy")]
    dump_memory: Option<PathBuf>,
    /// Write guest RAM when the run ends to PATH (a new file), read as the guest sees it (with --lazy, every
    /// page the run did not touch is brought in first, through the same installs).
    #[arg(long)]
    dump_final: Option<PathBuf>,
    /// With --lazy: the fault handler runs in `vmm page-server` listening on this Unix socket
    /// (uffd backends: the userfaultfd is handed over; exit backends: pages are requested).
    #[arg(long, requires = "lazy")]
    page_server: Option<PathBuf>,
    /// A passed-through device for the restored VM (vfio-user:SOCKET or vfio:...), one per
    /// device in the snapshot, in its order: each gets the state saved in the snapshot. With
    /// --lazy the device stays stopped until every page is in (needs --prefetch).
    #[arg(long)]
    device: Vec<vmm::machine::pci::DeviceSpec>,
    /// Print the run report (and the demand-paging figures) as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

#[derive(Args)]
pub struct PageServerArgs {
    /// Snapshot directory (from `vmm snapshot --to DIR`) whose memory is served.
    #[arg(long)]
    snapshot: PathBuf,
    /// Unix socket to listen on for one `vmm restore --lazy --page-server PATH`.
    #[arg(long)]
    socket: PathBuf,
    /// Print what the server measured as JSON on stdout at the end.
    #[arg(long)]
    json: bool,
    /// Seccomp filters on the server's threads and `--user`, as for `vmm run`: the server drops
    /// root once its socket is bound, the snapshot open and the restoring vmm connected, before
    /// it reads that vmm's first message.
    #[command(flatten)]
    sandbox: SandboxArgs,
}

/// `vmm page-server`: serves the pages of one lazy restore, then exits.
pub fn page_server(a: PageServerArgs) -> Result<i32> {
    a.sandbox.init()?;
    let r = vmm::snapshot::page_server::serve(&a.snapshot, &a.socket);
    let _ = std::fs::remove_file(&a.socket);
    let r = r?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        let p = |l: &Option<vmm::machine::progress::Percentiles>| {
            l.as_ref().map_or("-".into(), |l| {
                format!("p50 {:.0} us, p99 {:.0} us", l.p50, l.p99)
            })
        };
        match &r.demand {
            Some(d) => eprintln!(
                "vmm page-server: {} faults served ({} zero), {} of {} data pages installed; \
                 fault to installed {}",
                d.faults,
                d.zero_faults,
                d.pages_installed,
                d.data_pages,
                p(&d.fault_us)
            ),
            None => eprintln!(
                "vmm page-server: {} reads ({} pages) on {} connections; served in {}",
                r.requests,
                r.pages_sent,
                r.connections,
                p(&r.serve_us)
            ),
        }
    }
    Ok(0)
}

/// For `vmm bench demand`'s backend list (the other commands parse `--demand` with clap).
pub(crate) fn check_backend(name: &str) -> Result<DemandKind> {
    name.parse().with_context(|| format!("--demand {name}"))
}

pub(crate) fn parse_chunk(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1u64 << 20),
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow!("--demand-chunk {s}: expected a size such as 4K, 64K or 2M"))?;
    check_chunk(n.saturating_mul(mult)).map_err(|e| anyhow!("--demand-chunk: {e}"))
}

pub fn run(a: RestoreArgs, start: Instant) -> Result<i32> {
    a.sandbox.init()?;
    let console: ConsoleOutput = a
        .console
        .parse()
        .map_err(|e: String| anyhow!("--console: {e}"))?;
    let disks = a
        .disk
        .iter()
        .map(|d| parse_disk(d))
        .collect::<Result<Vec<_>>>()?;
    let opts = RestoreOptions {
        dir: a.dir.clone(),
        demand: a.lazy.then_some(a.demand),
        chunk: parse_chunk(&a.demand_chunk)?,
        prefetch: a.prefetch,
        soft_slots: a.demand_soft_slots,
        console_input: !a.no_console_input && console == ConsoleOutput::Stdout,
        console,
        api_socket: a.api_socket.clone(),
        disks,
        dump_memory: a.dump_memory.clone(),
        dump_final: a.dump_final.clone(),
        page_server: a.page_server.clone(),
        devices: a.device.clone(),
    };
    let r = restore(&opts, start)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "run": r.run,
                "restore_ms": r.restore_ms,
                "run_ms": r.run_ms,
                "demand": r.demand
            })
        );
    } else {
        print_report(&r.run, false)?;
        eprintln!(
            "vmm: restore took {:.1} ms to resume; the guest then ran {:.1} ms",
            r.restore_ms, r.run_ms
        );
        if let Some(d) = &r.demand {
            let p = |q: fn(&vmm::machine::progress::Percentiles) -> f64| {
                d.fault_us
                    .as_ref()
                    .map_or("-".into(), |l| format!("{:.0}", q(l)))
            };
            eprintln!(
                "vmm: demand paging ({}): {} faults ({} on zero pages), {} of {} data pages \
                 brought in, {} eager; fault to installed p50 {} us, p99 {} us",
                d.backend,
                d.faults,
                d.zero_faults,
                d.pages_installed,
                d.data_pages,
                d.eager_pages,
                p(|l| l.p50),
                p(|l| l.p99),
            );
            if let Some(x) = &d.exits {
                eprintln!(
                    "vmm: vCPU exits: {} fetched, {} mapped only, {} raced; memslots {} now, \
                     {} at most, {} merges",
                    x.fetched, x.mapped_only, x.raced, x.memslots_now, x.memslots_max, x.merges
                );
            }
            if let Some(e) = &d.error {
                eprintln!("vmm: demand paging failed: {e}");
            }
        }
    }
    Ok(r.run.exit_code)
}
