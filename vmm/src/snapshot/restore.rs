//! `vmm restore DIR`: builds the VM a snapshot describes, restores its state and runs it.
//! Eager restore copies every data page in first; lazy restore (`--lazy --demand NAME`)
//! resumes at once and lets a `DemandPager` bring pages in on first touch (see `lazy`).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use super::files;
use super::lazy::{DemandReport, Lazy, PageSource};
use super::page_server::{Handshake, Session, WireRange};
use super::SnapshotError;
use crate::machine::description::Constraints;
use crate::machine::final_dump::FinalDump;
use crate::machine::shared::Shared;
use crate::machine::{ConsoleOutput, DiskConfig, GuestConfig, Machine, RunHooks, RunReport};
use crate::userfault::{
    self, keep_present, ArmArgs, DemandKind, DemandPager, Fetch, UffdMinor, UffdMissing,
};
use crate::vstate::vcpu::VcpuStop;

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub dir: PathBuf,
    /// None: eager. Some(kind): lazy with this demand-paging backend.
    pub demand: Option<DemandKind>,
    /// Bytes brought in per fault (a power of two, 4 KiB to 2 MiB).
    pub chunk: u64,
    /// Bring in untouched pages in the background too.
    pub prefetch: bool,
    /// memslot-exits: slots used before chunks are merged.
    pub soft_slots: usize,
    pub console: ConsoleOutput,
    pub console_input: bool,
    pub api_socket: Option<PathBuf>,
    /// Replacement disk paths, in order (the snapshot names the originals).
    pub disks: Vec<DiskConfig>,
    /// Eager restore only: write guest RAM as restored, before any vCPU runs, into this file
    /// (lazily, memory is not all there until the guest has run: use `dump_final`).
    pub dump_memory: Option<PathBuf>,
    /// Write guest RAM when the run ends into this file, read as the guest sees it; lazily,
    /// every page the run did not touch is brought in first, through the same installs.
    pub dump_final: Option<PathBuf>,
    /// Lazy only: the fault handler runs in `vmm page-server` listening on this socket.
    pub page_server: Option<PathBuf>,
}

/// Ends the run when demand paging fails for good (a dead page server, an unreadable
/// snapshot): the guest must never run on with memory missing. A failure before the vCPUs run
/// ends the run as soon as it starts.
#[derive(Clone, Default)]
struct Stopper {
    shared: Arc<OnceLock<Arc<Shared>>>,
    reason: Arc<Mutex<Option<String>>>,
}

impl Stopper {
    fn stop(&self, reason: &str) {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| reason.to_string());
        if let Some(sh) = self.shared.get() {
            sh.end_run(VcpuStop::Fault(format!("lazy restore: {reason}")));
        }
    }

    fn on_running(&self) -> crate::machine::run::OnRunning {
        let me = self.clone();
        Box::new(move |sh: &Arc<Shared>| {
            let _ = me.shared.set(sh.clone());
            let early = me.reason.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(r) = early {
                sh.end_run(VcpuStop::Fault(format!("lazy restore: {r}")));
            }
        })
    }
}

pub struct Restored {
    pub run: RunReport,
    pub demand: Option<DemandReport>,
    /// Start of restore to the vCPUs about to run.
    pub restore_ms: f64,
    /// The vCPUs' start to the end of the run.
    pub run_ms: f64,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Io { what, source }
}

pub fn restore(opts: &RestoreOptions, start: Instant) -> Result<Restored, SnapshotError> {
    let (manifest, memfile) = files::read(&opts.dir)?;
    let constraints = Constraints {
        disks: opts.disks.clone(),
        ..Default::default()
    };
    let disks = manifest
        .vm
        .check(&constraints)
        .map_err(SnapshotError::Refused)?;
    let cfg = manifest
        .vm
        .config(
            disks,
            opts.console.clone(),
            opts.console_input,
            opts.api_socket.clone(),
        )
        .map_err(SnapshotError::Refused)?;
    if opts.demand.is_some() && opts.dump_memory.is_some() {
        return Err(SnapshotError::Refused(
            "--dump-memory takes guest RAM before the guest runs, which a lazy restore does not \
             have whole: use --dump-final (guest RAM at the end, every page brought in)"
                .into(),
        ));
    }
    let mut machine =
        Machine::build(&cfg, start).map_err(|e| SnapshotError::Machine(e.to_string()))?;
    let ranges = machine.ram.ranges().to_vec();
    let runs = files::data_runs(&memfile, &ranges).map_err(io("finding the snapshot's data"))?;
    let data_pages: u64 = runs.iter().map(|r| r.1).sum();
    let t0 = Instant::now();

    let Some(backend) = opts.demand else {
        copy_runs(&memfile, machine.ram.file(), &ranges, &runs)?;
        if let Some(path) = &opts.dump_memory {
            crate::memory::ram_file::dump_ram(machine.ram.file(), &ranges, path)
                .map_err(io(format!("writing {}", path.display())))?;
        }
        manifest.state.restore(&machine)?;
        let restore_ms = t0.elapsed().as_secs_f64() * 1000.0;
        tracing::info!("restored {data_pages} data pages in {restore_ms:.1} ms");
        let final_dump = opts
            .dump_final
            .clone()
            .map(|p| FinalDump::arm_whole(&mut machine, p));
        let t_run = Instant::now();
        let run = machine
            .run(RunHooks {
                api: Some(crate::api::server::serve_api),
                on_running: Some(Box::new(|_| {})),
            })
            .map_err(|e| SnapshotError::Machine(e.to_string()))?;
        if let Some(d) = final_dump {
            d.result().map_err(SnapshotError::FinalDump)?;
        }
        return Ok(Restored {
            run,
            demand: None,
            restore_ms,
            run_ms: t_run.elapsed().as_secs_f64() * 1000.0,
        });
    };

    let host_addrs = machine.ram.host_addrs();
    let stopper = Stopper::default();
    let wire: Vec<WireRange> = ranges
        .iter()
        .zip(&host_addrs)
        .map(|(r, h)| WireRange {
            gpa: r.gpa,
            size: r.size,
            file_offset: r.file_offset,
            host: *h,
        })
        .collect();
    let handshake = |fds: Vec<String>| Handshake {
        backend: backend.to_string(),
        ranges: wire.clone(),
        pending: runs.clone(),
        chunk: opts.chunk,
        prefetch: opts.prefetch,
        fds,
    };

    // uffd backends out of process: arm here, hand the descriptors over, run no fault thread.
    if let (Some(path), true) = (&opts.page_server, backend.is_uffd()) {
        let (pager, fds, names): (Arc<dyn DemandPager>, Vec<RawFd>, Vec<String>) =
            if backend.needs_memfd() {
                let p = UffdMinor::arm(&ranges, &host_addrs, machine.ram.file(), &runs)?;
                let fds = vec![p.raw_fd(), machine.ram.file().as_raw_fd()];
                (Arc::new(p), fds, vec!["uffd".into(), "memfd".into()])
            } else {
                let p = UffdMissing::arm(&ranges, &host_addrs)?;
                let fds = vec![p.raw_fd()];
                (Arc::new(p), fds, vec!["uffd".into()])
            };
        // The server may fill every page, but this side is not told when: it stays marked
        // as paging in (no snapshot or migration of this VM).
        machine.paging_in.store(true, Ordering::Release);
        let mut session = Session::connect(path, &handshake(names), &fds)?;
        {
            let st = stopper.clone();
            session.watch(Box::new(move |reason| st.stop(reason)))?;
        }
        if let Err(e) = manifest.state.restore(&machine) {
            session.abort(&e.to_string());
            return Err(e.into());
        }
        let restore_ms = t0.elapsed().as_secs_f64() * 1000.0;
        tracing::info!(
            "resuming with {data_pages} data pages brought in on demand by {backend} in page \
             server {} ({restore_ms:.1} ms to resume)",
            path.display()
        );
        session.resuming()?;
        // The server serves every fault until Finish: reading a missing page through this
        // process's registered mapping brings it in like a guest touch.
        let final_dump = opts
            .dump_final
            .clone()
            .map(|p| FinalDump::arm_whole(&mut machine, p));
        let t_run = Instant::now();
        let run = machine.run(RunHooks {
            api: Some(crate::api::server::serve_api),
            on_running: Some(stopper.on_running()),
        });
        let run_ms = t_run.elapsed().as_secs_f64() * 1000.0;
        let server = session.finish();
        // The registration must outlive every access: drop the pager only now.
        drop(pager);
        let run = run.map_err(|e| SnapshotError::Machine(e.to_string()))?;
        if let Some(d) = final_dump {
            d.result().map_err(SnapshotError::FinalDump)?;
        }
        let mut server = server?;
        let mut demand = server
            .demand
            .take()
            .ok_or_else(|| SnapshotError::Refused("the page server sent no fault report".into()))?;
        demand.page_server = serde_json::to_value(&server).ok();
        return Ok(Restored {
            run,
            demand: Some(demand),
            restore_ms,
            run_ms,
        });
    }

    let pager = userfault::arm(
        backend,
        ArmArgs {
            vm: machine.vm.clone(),
            ranges: &ranges,
            host_addrs: &host_addrs,
            memfd: machine.ram.file(),
            pending: &runs,
            chunk: opts.chunk,
            soft_slots: opts.soft_slots,
        },
    )?;
    let keep = memfile.try_clone().map_err(io("the memory file"))?;
    // Exit backends out of process: pages are read from the server, installed here.
    let mut session = match &opts.page_server {
        Some(path) => Some(Session::connect(path, &handshake(Vec::new()), &[])?),
        None => None,
    };
    let source: Arc<dyn PageSource> = match &session {
        Some(s) => Arc::new(s.client()),
        None => Arc::new(memfile),
    };
    let lazy = Arc::new(Lazy::new(
        pager.clone(),
        source,
        &ranges,
        &runs,
        opts.chunk,
    )?);
    {
        let st = stopper.clone();
        lazy.on_fail(Box::new(move |reason| st.stop(reason)));
    }
    if let Some(s) = &mut session {
        let st = stopper.clone();
        s.watch(Box::new(move |reason| st.stop(reason)))?;
    }
    // Until every page is here, the memory file has holes: no snapshot or migration of it.
    machine.paging_in.store(true, Ordering::Release);
    {
        let flag = machine.paging_in.clone();
        lazy.on_filled(Box::new(move || flag.store(false, Ordering::Release)));
    }
    let serve = {
        let l = lazy.clone();
        std::thread::Builder::new()
            .name("lazy-restore".into())
            .spawn(move || l.serve())
            .map_err(io("starting the fault handler"))?
    };
    let mut eager_pages = 0;
    let prepared = (|| -> Result<(), SnapshotError> {
        if let Some(exits) = pager.exits() {
            let _ = machine.demand.set(exits.clone());
            exits.set_fetch(lazy.clone() as Arc<dyn Fetch>);
            // Pages KVM touches itself never exit: they must be mapped before any vCPU runs.
            let micro = matches!(cfg.guest, GuestConfig::Micro { .. });
            let keep_pages = must_be_present(&manifest.state.vcpus, &keep, &ranges, &runs, micro);
            for gpa in &keep_pages {
                if exits.covers(*gpa) {
                    exits.keep_mapped(*gpa)?;
                }
            }
            if !micro {
                // Zero pages mapped now may be (empty) page tables of some process too.
                exits.pin_mapped();
            }
            eager_pages = keep_pages.len() as u64;
            tracing::info!(
                "{backend}: {eager_pages} pages KVM touches itself (page tables, descriptor \
                 tables, event stacks, paravirtual pages) mapped before resuming"
            );
        }
        if opts.prefetch {
            let l = lazy.clone();
            std::thread::Builder::new()
                .name("lazy-prefetch".into())
                .spawn(move || l.prefetch())
                .map_err(io("starting the prefetch thread"))?;
        }
        manifest.state.restore(&machine)?;
        Ok(())
    })();
    if let Err(e) = prepared {
        lazy.stop();
        if let Some(s) = session {
            s.abort(&e.to_string());
        }
        return Err(e);
    }
    let restore_ms = t0.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(
        "resuming with {data_pages} data pages in the snapshot file, brought in on demand by \
         {backend}{} ({restore_ms:.1} ms to resume)",
        opts.page_server.as_ref().map_or(String::new(), |p| format!(
            " from page server {}",
            p.display()
        ))
    );
    if let Some(s) = &session {
        s.resuming()?;
    }
    lazy.resuming();
    let final_dump = opts.dump_final.clone().map(|p| {
        let l = lazy.clone();
        let fill = Box::new(move || {
            l.clone().prefetch();
            l.error()
                .map_or(Ok(()), |e| Err(format!("bringing in the rest: {e}")))
        });
        FinalDump::arm(&mut machine, p, fill)
    });
    let t_run = Instant::now();
    let run = machine.run(RunHooks {
        api: Some(crate::api::server::serve_api),
        on_running: Some(stopper.on_running()),
    });
    let run_ms = t_run.elapsed().as_secs_f64() * 1000.0;
    lazy.stop();
    let _ = serve.join();
    let server = session.map(|s| s.finish());
    let run = run.map_err(|e| SnapshotError::Machine(e.to_string()))?;
    if let Some(d) = final_dump {
        d.result().map_err(SnapshotError::FinalDump)?;
    }
    let mut demand = lazy.report(eager_pages, data_pages);
    if let Some(server) = server {
        demand.page_server = Some(serde_json::to_value(server?).unwrap_or_default());
    }
    Ok(Restored {
        run,
        demand: Some(demand),
        restore_ms,
        run_ms,
    })
}

/// Pages to map before the vCPUs run under an exit backend (see `keep_present`): the page
/// tables reachable from every vCPU's CR3, and for a guest with many address spaces (Linux)
/// every data page that could be a page table; plus the paravirtual pages KVM writes.
fn must_be_present(
    vcpus: &[crate::vstate::state::VcpuState],
    file: &File,
    ranges: &[crate::memory::RamRange],
    runs: &[(u64, u64)],
    single_address_space: bool,
) -> Vec<u64> {
    let read = |gpa: u64| -> Option<Vec<u8>> {
        let r = ranges.iter().find(|r| r.contains(gpa))?;
        let mut page = vec![0u8; 4096];
        file.read_exact_at(&mut page, r.file_offset + (gpa - r.gpa))
            .ok()?;
        Some(page)
    };
    let mut pages = keep_present::kvm_touched(vcpus, &mut |g| read(g));
    if !single_address_space {
        let bits = keep_present::guest_phys_bits(vcpus.first());
        for &(gpa, n) in runs {
            for p in 0..n {
                let g = gpa + p * 4096;
                if read(g).is_some_and(|page| keep_present::could_be_page_table(&page, bits)) {
                    pages.push(g);
                }
            }
        }
    }
    pages.sort_unstable();
    pages.dedup();
    pages
}

fn copy_runs(
    from: &File,
    to: &File,
    ranges: &[crate::memory::RamRange],
    runs: &[(u64, u64)],
) -> Result<(), SnapshotError> {
    let mut buf = vec![0u8; 1 << 20];
    for &(gpa, n) in runs {
        let r = ranges
            .iter()
            .find(|r| r.contains(gpa))
            .ok_or(SnapshotError::Refused(format!(
                "data at 0x{gpa:x} is not RAM"
            )))?;
        let mut off = r.file_offset + (gpa - r.gpa);
        let mut left = n * 4096;
        while left > 0 {
            let len = left.min(buf.len() as u64) as usize;
            from.read_exact_at(&mut buf[..len], off)
                .map_err(io("reading the snapshot's memory"))?;
            to.write_all_at(&buf[..len], off)
                .map_err(io("writing guest RAM"))?;
            off += len as u64;
            left -= len as u64;
        }
    }
    Ok(())
}
