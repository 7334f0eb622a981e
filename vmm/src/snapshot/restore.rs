//! `vmm restore DIR`: builds the VM a snapshot describes, restores its state and runs it.
//! Eager restore copies every data page in first; lazy restore (`--lazy --demand NAME`)
//! resumes at once and lets a `DemandPager` bring pages in on first touch (see `lazy`).

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use super::device_files::RestoredDevices;
use super::files;
use super::lazy::{DemandReport, Lazy, PageSource};
use super::page_server::{Handshake, Session, WireRange};
use super::SnapshotError;
use crate::api::server::serve_api;
use crate::machine::assemble::{self, AssembleError, Demand, Here, Resume};
use crate::machine::description::Constraints;
use crate::machine::final_dump::Fill;
use crate::machine::pci::passthrough::PassthroughHandle;
use crate::machine::shared::Shared;
use crate::machine::{ConsoleOutput, DiskConfig, GuestConfig, Machine, RunReport};
use crate::userfault::{keep_present, DemandKind, DemandPager, Fetch, UffdMinor, UffdMissing};
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
    /// This side's passed-through devices (`--device`), one per device in the snapshot, in
    /// order: each gets its saved state (a restore, as a migration destination, takes
    /// devices only from its own command line).
    pub devices: Vec<crate::machine::pci::DeviceSpec>,
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
    let here = Here {
        constraints: Constraints {
            disks: opts.disks.clone(),
            devices: opts.devices.clone(),
            // vm.json is a file the user chose: its disk paths serve when no --disk is given.
            local_description: true,
            ..Default::default()
        },
        console: opts.console.clone(),
        console_input: opts.console_input,
        api_socket: opts.api_socket.clone(),
    };
    let cfg = assemble::config(&manifest.vm, &here)?;
    // Before anything reads the saved state (a lazy restore walks its descriptor tables).
    manifest.state.check_here(manifest.vm.vcpus as usize)?;
    if opts.demand.is_some() && opts.dump_memory.is_some() {
        return Err(SnapshotError::Refused(
            "--dump-memory takes guest RAM before the guest runs, which a lazy restore does not \
             have whole: use --dump-final (guest RAM at the end, every page brought in)"
                .into(),
        ));
    }
    let with_devices = !manifest.vm.passthrough.is_empty();
    if with_devices && opts.demand.is_some() {
        lazy_with_devices(opts)?;
    }
    let machine = Machine::build(&cfg, start).map_err(SnapshotError::Machine)?;
    let handles: Vec<PassthroughHandle> = machine
        .devs
        .passthrough
        .iter()
        .map(|a| a.handle())
        .collect();
    // Before any page is copied: the files whole, the functions those of the snapshot, each
    // device loaded and left stopped until its guest runs.
    let devices = RestoredDevices::load(
        &opts.dir,
        &manifest.devices,
        &handles,
        &manifest.vm.passthrough,
    )?;
    let devices = Arc::new(Mutex::new(devices));
    let ranges = machine.ram.ranges().to_vec();
    let runs = files::data_runs(&memfile, &ranges).map_err(io("finding the snapshot's data"))?;
    let data_pages: u64 = runs.iter().map(|r| r.1).sum();
    let t0 = Instant::now();
    let ms_since = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;

    let Some(backend) = opts.demand else {
        copy_runs(&memfile, machine.ram.file(), &ranges, &runs)?;
        if let Some(path) = &opts.dump_memory {
            crate::memory::ram_file::dump_ram(machine.ram.file(), &ranges, path)
                .map_err(io(format!("writing {}", path.display())))?;
        }
        let restore_ms = Cell::new(0.0);
        let t_run = Cell::new(Instant::now());
        let mut resume: Resume<SnapshotError> =
            Resume::new(&manifest.state, Some(serve_api), Box::new(|_| {}));
        resume.final_dump = opts.dump_final.clone().map(|p| (p, None));
        resume.restored = Some(Box::new(|| {
            restore_ms.set(ms_since(t0));
            tracing::info!(
                "restored {data_pages} data pages in {:.1} ms",
                restore_ms.get()
            );
            // The devices run just before the vCPUs: guest RAM is whole by now.
            lock(&devices).run()?;
            t_run.set(Instant::now());
            Ok(())
        }));
        let run = assemble::resume(machine, resume)?;
        return Ok(Restored {
            run,
            demand: None,
            restore_ms: restore_ms.get(),
            run_ms: ms_since(t_run.get()),
        });
    };
    let demand = Demand {
        backend,
        chunk: opts.chunk,
        soft_slots: opts.soft_slots,
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
        let session = Session::connect(path, &handshake(names), &fds)?;
        let session = RefCell::new(Some(session));
        {
            let st = stopper.clone();
            if let Some(s) = session.borrow_mut().as_mut() {
                s.watch(Box::new(move |reason| st.stop(reason)))?;
            }
        }
        let restore_ms = Cell::new(0.0);
        let t_run = Cell::new(Instant::now());
        let run_ms = Cell::new(0.0);
        let server = RefCell::new(None);
        let mut resume: Resume<SnapshotError> =
            Resume::new(&manifest.state, Some(serve_api), stopper.on_running());
        // The server serves every fault until Finish: reading a missing page through this
        // process's registered mapping brings it in like a guest touch.
        resume.final_dump = opts.dump_final.clone().map(|p| (p, None));
        resume.restored = Some(Box::new(|| {
            restore_ms.set(ms_since(t0));
            tracing::info!(
                "resuming with {data_pages} data pages brought in on demand by {backend} in page \
                 server {} ({:.1} ms to resume)",
                path.display(),
                restore_ms.get()
            );
            if let Some(s) = session.borrow().as_ref() {
                s.resuming()?;
            }
            t_run.set(Instant::now());
            Ok(())
        }));
        resume.not_started = Some(Box::new(|e| {
            if let AssembleError::Restore(e) = e {
                if let Some(s) = session.borrow_mut().take() {
                    s.abort(&e.to_string());
                }
            }
        }));
        resume.ended = Some(Box::new(|| {
            run_ms.set(ms_since(t_run.get()));
            *server.borrow_mut() = session.borrow_mut().take().map(|s| s.finish());
            // The registration must outlive every access: drop the pager only now.
            drop(pager);
        }));
        let run = assemble::resume(machine, resume)?;
        let mut server = server.into_inner().ok_or_else(|| {
            SnapshotError::Refused("the page server sent no fault report".into())
        })??;
        let mut demand = server
            .demand
            .take()
            .ok_or_else(|| SnapshotError::Refused("the page server sent no fault report".into()))?;
        demand.page_server = serde_json::to_value(&server).ok();
        return Ok(Restored {
            run,
            demand: Some(demand),
            restore_ms: restore_ms.get(),
            run_ms: run_ms.get(),
        });
    }

    let pager = machine.arm_demand(&demand, &runs)?;
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
    // Devices stay stopped until then too (as a hybrid migration's destination): a device
    // running while pages are missing would DMA from holes, or have its writes overwritten by
    // pages brought in later. The vCPUs run meanwhile.
    {
        let flag = machine.paging_in.clone();
        let devices = devices.clone();
        let st = stopper.clone();
        lazy.on_filled(Box::new(move || {
            flag.store(false, Ordering::Release);
            if with_devices {
                match lock(&devices).run() {
                    Ok(()) => tracing::info!("every page is in: passed-through devices run"),
                    Err(e) => st.stop(&format!("starting the passed-through devices: {e}")),
                }
            }
        }));
    }
    let serve = {
        let l = lazy.clone();
        std::thread::Builder::new()
            .name("lazy-restore".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::PageServer);
                l.serve()
            })
            .map_err(io("starting the fault handler"))?
    };
    let mut eager_pages = 0;
    let prepared = (|| -> Result<(), SnapshotError> {
        if let Some(exits) = pager.exits() {
            exits.set_fetch(lazy.clone() as Arc<dyn Fetch>);
            // Pages KVM touches itself never exit: they must be mapped before any vCPU runs.
            let micro = matches!(cfg.guest, GuestConfig::Micro { .. });
            let keep_pages = must_be_present(&manifest.state.vcpus, &keep, &ranges, &runs, micro);
            assemble::keep_mapped(exits.as_ref(), &keep_pages)?;
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
                .spawn(move || {
                    crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::PageServer);
                    l.prefetch()
                })
                .map_err(io("starting the prefetch thread"))?;
        }
        Ok(())
    })();
    let session = RefCell::new(session);
    let abort = |e: &dyn std::fmt::Display| {
        lazy.stop();
        if let Some(s) = session.borrow_mut().take() {
            s.abort(&e.to_string());
        }
    };
    if let Err(e) = prepared {
        abort(&e);
        return Err(e);
    }
    let restore_ms = Cell::new(0.0);
    let t_run = Cell::new(Instant::now());
    let run_ms = Cell::new(0.0);
    let server = RefCell::new(None);
    let mut resume: Resume<SnapshotError> =
        Resume::new(&manifest.state, Some(serve_api), stopper.on_running());
    resume.final_dump = opts.dump_final.clone().map(|p| {
        let l = lazy.clone();
        let fill: Fill = Box::new(move || {
            l.clone().prefetch();
            l.error()
                .map_or(Ok(()), |e| Err(format!("bringing in the rest: {e}")))
        });
        (p, Some(fill))
    });
    resume.restored = Some(Box::new(|| {
        restore_ms.set(ms_since(t0));
        tracing::info!(
            "resuming with {data_pages} data pages in the snapshot file, brought in on demand by \
             {backend}{} ({:.1} ms to resume)",
            opts.page_server.as_ref().map_or(String::new(), |p| format!(
                " from page server {}",
                p.display()
            )),
            restore_ms.get()
        );
        if let Some(s) = session.borrow().as_ref() {
            s.resuming()?;
        }
        lazy.resuming();
        t_run.set(Instant::now());
        Ok(())
    }));
    resume.not_started = Some(Box::new(|e| {
        if let AssembleError::Restore(e) = e {
            abort(e);
        }
    }));
    resume.ended = Some(Box::new(|| {
        run_ms.set(ms_since(t_run.get()));
        lazy.stop();
        let _ = serve.join();
        *server.borrow_mut() = session.borrow_mut().take().map(|s| s.finish());
    }));
    let run = assemble::resume(machine, resume)?;
    let mut demand = lazy.report(eager_pages, data_pages);
    if let Some(server) = server.into_inner() {
        demand.page_server = Some(serde_json::to_value(server?).unwrap_or_default());
    }
    Ok(Restored {
        run,
        demand: Some(demand),
        restore_ms: restore_ms.get(),
        run_ms: run_ms.get(),
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Lazy restore with a passed-through device follows a hybrid migration's rule: the device
/// stays stopped until every page is in. Only the in-process prefetch says when that is.
fn lazy_with_devices(opts: &RestoreOptions) -> Result<(), SnapshotError> {
    if opts.page_server.is_some() {
        return Err(SnapshotError::Refused(
            "--lazy with a passed-through device cannot use --page-server: the device stays \
             stopped until every page is in, and this side is not told when the page server \
             has brought them all"
                .into(),
        ));
    }
    if !opts.prefetch {
        return Err(SnapshotError::Refused(
            "--lazy with a passed-through device needs --prefetch: the device stays stopped \
             until every page is in (it may DMA to any of them), and without the prefetch \
             the pages the guest never touches would never come"
                .into(),
        ));
    }
    Ok(())
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
