//! Postcopy on the destination: the guest runs while pages are still on the source. Every
//! pending page is punched out of guest RAM and a `DemandPager` (userfaultfd MISSING) reports
//! each touch of one; the fault thread asks the source for it on the urgent connection, and two
//! receiver threads (main: background push; urgent: answers) install pages atomically, which
//! wakes the waiting vCPU or VMM thread. When the source has sent everything and no page is
//! pending, the pager is disarmed and the destination confirms `Resumed`.
//!
//! If a connection breaks before that, pages the guest will need exist only on the source: the
//! guest cannot continue here, so the process exits at once with the reason instead of letting a
//! vCPU run on with a missing page (the source still holds every page).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::pages;
use super::protocol::{check_range, Message, ProtocolError, ABORT_NOT_STARTED, PAGE_SIZE};
use super::source::{unexpected, Reader, Writer};
use super::MigrationError;
use crate::machine::progress::{
    DestinationStats, MigrationReport, Percentiles, Phase, PostcopyStats,
};
use crate::machine::shared::Shared;
use crate::machine::Machine;
use crate::memory::page_index::{AtomicPages, PageIndex};
use crate::memory::ram_file::NotRam;
use crate::userfault::{self, DemandPager, Installed};

/// The demand-paging backend the destination runs postcopy on (`--demand`).
pub use crate::machine::assemble::Demand;

/// Exit status of a destination whose postcopy could not finish.
pub const EXIT_POSTCOPY_LOST: i32 = 1;

pub struct Links {
    pub w: Writer,
    pub r: Reader,
    pub uw: Writer,
    pub ur: Reader,
}

struct Inner {
    pager: Arc<dyn DemandPager>,
    index: PageIndex,
    table: Vec<(u64, u64)>,
    pending: AtomicPages,
    remaining: AtomicU64,
    waiting: Mutex<HashMap<u64, Instant>>,
    latencies_us: Mutex<Vec<f64>>,
    faults: AtomicU64,
    requests: AtomicU64,
    pushed: AtomicU64,
    complete: AtomicBool,
    done: AtomicBool,
    /// The main connection's receiver has ended (the source closed it).
    main_closed: AtomicBool,
    requests_w: Mutex<Writer>,
    main_w: Mutex<Option<Writer>>,
    running: Mutex<Option<(Arc<Shared>, f64, Instant)>>,
    /// Runs once every page is here, before the source hears so (passed-through devices
    /// start then: they must never touch a missing page).
    on_filled: Mutex<Option<OnFilled>>,
    report: Mutex<MigrationReport>,
    begun: Instant,
}

/// See `Inner::on_filled`; its error (a message) fails the migration here.
pub type OnFilled = Box<dyn FnOnce() -> Result<(), String> + Send>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The destination's postcopy machinery, started before the state is restored (restoring may
/// already touch guest memory: KVM writes the kvmclock page).
#[derive(Clone)]
pub struct Receiver {
    inner: Arc<Inner>,
}

impl Receiver {
    /// Punches the pending pages out of guest RAM, arms the pager and starts the fault and
    /// receiver threads. On failure nothing ran yet: the main connection's writer comes back
    /// with the error, to tell the source.
    pub fn start(
        machine: &Machine,
        demand: &Demand,
        pending: &[(u64, u64)],
        links: Links,
        report: MigrationReport,
        begun: Instant,
    ) -> Result<Receiver, Box<(MigrationError, Option<Writer>)>> {
        let Links { w, r, uw, ur } = links;
        let ram = machine.ram.ranges().to_vec();
        let memfd = machine.ram.file();
        let index = PageIndex::new(&ram);
        let marks = AtomicPages::new(index.total());
        let prepared = (|| -> Result<Arc<dyn DemandPager>, MigrationError> {
            for &(gpa, n) in pending {
                for p in 0..n {
                    let page = gpa + p * PAGE_SIZE;
                    let fresh = index.index(page).is_some_and(|i| marks.set(i));
                    if !fresh {
                        return Err(MigrationError::Protocol(ProtocolError::Malformed {
                            kind: "PostcopyStart",
                            seq: 0,
                            reason: format!("page 0x{page:x} is listed twice or is not RAM"),
                        }));
                    }
                }
                pages::zero_pages(memfd, &ram, gpa, n)?;
            }
            // Exit backends get no inline fetch: vCPU exits queue their pages for the fault
            // thread, which asks the source as for any other fault.
            Ok(machine.arm_demand(demand, pending)?)
        })();
        let pager = match prepared {
            Ok(p) => p,
            Err(e) => return Err(Box::new((e, Some(w)))),
        };
        let remaining = marks.count();
        tracing::info!("postcopy: {remaining} pages still on the source; resuming now");
        let inner = Arc::new(Inner {
            pager,
            table: ram.iter().map(|r| (r.gpa, r.size)).collect(),
            index,
            pending: marks,
            remaining: AtomicU64::new(remaining),
            waiting: Mutex::new(HashMap::new()),
            latencies_us: Mutex::new(Vec::new()),
            faults: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            pushed: AtomicU64::new(0),
            complete: AtomicBool::new(false),
            done: AtomicBool::new(false),
            main_closed: AtomicBool::new(false),
            requests_w: Mutex::new(uw),
            main_w: Mutex::new(Some(w)),
            running: Mutex::new(None),
            on_filled: Mutex::new(None),
            report: Mutex::new(report),
            begun,
        });
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Migration);
                    f()
                })
                .map(|_| ())
        };
        let started = (|| -> std::io::Result<()> {
            let i = inner.clone();
            spawn("postcopy-faults", Box::new(move || i.fault_loop()))?;
            let i = inner.clone();
            spawn(
                "postcopy-main",
                Box::new(move || {
                    i.clone().receive_loop(r, true);
                    i.main_closed.store(true, Ordering::Release);
                }),
            )?;
            let i = inner.clone();
            spawn(
                "postcopy-urgent",
                Box::new(move || i.receive_loop(ur, false)),
            )
        })();
        let receiver = Receiver { inner };
        if let Err(e) = started {
            // The writer went into the receiver: tell the source through it.
            receiver.fail(&format!(
                "{ABORT_NOT_STARTED}cannot start the postcopy threads: {e}"
            ));
            return Err(Box::new((MigrationError::Io(e), None)));
        }
        Ok(receiver)
    }

    /// Exit backends: maps, before any vCPU runs, the pages KVM touches itself (page tables
    /// reachable from each vCPU's CR3, descriptor tables, TSS stacks, PV pages), asking the
    /// source for each that is still there, and pins what is mapped already (the source sent
    /// the page tables of every address space first, see `presend`).
    pub fn keep_present(
        &self,
        vcpus: &[crate::vstate::state::VcpuState],
    ) -> Result<u64, MigrationError> {
        let Some(exits) = self.inner.pager.exits() else {
            return Ok(0);
        };
        // What the source sent before the switch includes every possible page table.
        exits.pin_mapped();
        let mut failed = None;
        let mut read = |gpa: u64| -> Option<Vec<u8>> {
            if !exits.covers(gpa) {
                return None;
            }
            if let Err(e) = exits.keep_mapped(gpa) {
                failed.get_or_insert(e);
                return None;
            }
            let mut page = vec![0u8; PAGE_SIZE as usize];
            exits.complete_read(gpa, &mut page).ok()?;
            Some(page)
        };
        let pages = userfault::keep_present::kvm_touched(vcpus, &mut read);
        crate::machine::assemble::keep_mapped(exits.as_ref(), &pages)?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        Ok(pages.len() as u64)
    }

    /// `f` runs once every page is here (set before the vCPUs run).
    pub fn on_filled(&self, f: OnFilled) {
        *lock(&self.inner.on_filled) = Some(f);
    }

    /// The vCPUs run: from now on the destination owns the guest.
    pub fn running(&self, shared: Arc<Shared>, restore_ms: f64) {
        {
            let mut p = shared.progress();
            p.phase = Phase::Incoming;
            p.remaining_pages = self.inner.remaining.load(Ordering::Acquire);
        }
        *lock(&self.inner.running) = Some((shared, restore_ms, Instant::now()));
        self.inner.maybe_finish();
    }

    /// Waits until every page is here (`--dump-final` after the run), at most `limit`. The
    /// error is a message for the dump's report (`machine::final_dump::Fill`), not a chain.
    pub fn wait_filled(&self, limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        loop {
            let i = &self.inner;
            let left = i.remaining.load(Ordering::Acquire);
            if left == 0 && i.complete.load(Ordering::Acquire) && i.done.load(Ordering::Acquire) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{left} pages still on the source {} s after the run ended",
                    limit.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The destination could not start the guest: tell the source (which still holds it).
    pub fn fail(&self, reason: &str) {
        self.inner.done.store(true, Ordering::Release);
        if let Some(w) = lock(&self.inner.main_w).as_mut() {
            let _ = w.send(&Message::Abort(reason.to_string()));
            let _ = w.flush();
        }
        // Let the source read the Abort before this process exits: closing a socket with the
        // source's pushed pages still unread resets it, and the reset can destroy the Abort
        // in flight. The main receiver keeps reading until the source closes its side.
        let deadline = Instant::now() + Duration::from_secs(3);
        while !self.inner.main_closed.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Inner {
    fn fault_loop(self: Arc<Self>) {
        while !self.done.load(Ordering::Acquire) {
            match self.pager.next_fault(Duration::from_millis(50)) {
                Ok(Some(f)) => {
                    if let Err(e) = self.on_fault(f.gpa, f.seen) {
                        self.lost(&format!("handling a fault at 0x{:x}: {e}", f.gpa));
                    }
                }
                Ok(None) => {}
                Err(e) => self.lost(&format!("reading faults: {e}")),
            }
        }
    }

    fn on_fault(&self, gpa: u64, seen: Instant) -> Result<(), MigrationError> {
        self.faults.fetch_add(1, Ordering::AcqRel);
        let idx = self
            .index
            .index(gpa)
            .ok_or(pages::PagesError::NotRam(NotRam {
                gpa,
                len: PAGE_SIZE,
            }))?;
        if self.pending.get(idx) {
            let first = match lock(&self.waiting).entry(idx) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(seen);
                    true
                }
            };
            if first {
                let mut uw = lock(&self.requests_w);
                uw.send(&Message::PageRequest { gpa, pages: 1 })?;
                uw.flush()?;
                self.requests.fetch_add(1, Ordering::AcqRel);
            }
            // Installed meanwhile? Then whoever faulted may have missed that wake-up.
            if !self.pending.get(idx) {
                self.pager.wake(gpa, 1)?;
            }
        } else {
            // Not pending: a page that was zero at the pause (never sent), or one installed
            // since the fault was queued.
            if self.pager.install_zero(gpa, 1)? == Installed::AlreadyPresent {
                self.pager.wake(gpa, 1)?;
            }
        }
        Ok(())
    }

    fn receive_loop(self: Arc<Self>, mut r: Reader, main: bool) {
        loop {
            let msg = match r.recv() {
                Ok(m) => m,
                Err(ProtocolError::Closed) if self.done.load(Ordering::Acquire) => return,
                Err(e) => {
                    if !self.done.load(Ordering::Acquire) {
                        self.lost(&format!(
                            "{} connection: {e}",
                            if main { "main" } else { "urgent" }
                        ));
                    }
                    return;
                }
            };
            let handled = match msg {
                Message::Pages { gpa, data } => self.on_pages(gpa, &data, main),
                Message::Zero { gpa, pages } => self.on_zero(gpa, pages),
                Message::Complete if main => {
                    self.complete.store(true, Ordering::Release);
                    Ok(())
                }
                Message::Abort(reason) => Err(MigrationError::Aborted(reason)),
                other => Err(unexpected("Pages, Zero or Complete", &other)),
            };
            if let Err(e) = handled {
                self.lost(&e.to_string());
                return;
            }
            if let Some((shared, ..)) = lock(&self.running).as_ref() {
                shared.progress().remaining_pages = self.remaining.load(Ordering::Acquire);
            }
            self.maybe_finish();
        }
    }

    fn resolved(&self, idx: u64) {
        if self.pending.clear(idx) {
            self.remaining.fetch_sub(1, Ordering::AcqRel);
        }
    }

    fn on_pages(&self, gpa: u64, data: &[u8], pushed: bool) -> Result<(), MigrationError> {
        check_range(&self.table, gpa, data.len() as u64)?;
        let mut mangled;
        let mut data = data;
        if let Some(f) = userfault::inject::active() {
            mangled = data.to_vec();
            userfault::inject::corrupt(Some(f), gpa, &mut mangled);
            data = &mangled;
        }
        self.pager.install(gpa, data)?;
        let n = data.len() as u64 / PAGE_SIZE;
        if pushed {
            self.pushed.fetch_add(n, Ordering::AcqRel);
        }
        for k in 0..n {
            if let Some(idx) = self.index.index(gpa + k * PAGE_SIZE) {
                self.resolved(idx);
                if let Some(t) = lock(&self.waiting).remove(&idx) {
                    lock(&self.latencies_us).push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        Ok(())
    }

    fn on_zero(&self, gpa: u64, n: u64) -> Result<(), MigrationError> {
        check_range(&self.table, gpa, n.saturating_mul(PAGE_SIZE))?;
        for k in 0..n {
            let page = gpa + k * PAGE_SIZE;
            let Some(idx) = self.index.index(page) else {
                continue;
            };
            self.resolved(idx);
            self.pager.note_zero(page, 1);
            // Someone waits on it: install the zero page now (others stay holes, which read
            // as zeros once the pager is disarmed).
            let waited = lock(&self.waiting).remove(&idx);
            if let Some(t) = waited {
                self.pager.install_zero(page, 1)?;
                lock(&self.latencies_us).push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        Ok(())
    }

    fn maybe_finish(&self) {
        if !self.complete.load(Ordering::Acquire) || self.remaining.load(Ordering::Acquire) != 0 {
            return;
        }
        let running = lock(&self.running).clone();
        let Some((shared, restore_ms, resumed_at)) = running else {
            return;
        };
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Err(e) = self.pager.disarm() {
            tracing::error!("disarming the postcopy pager: {e}");
        }
        shared.paging_in.store(false, Ordering::Release);
        let filled = lock(&self.on_filled).take();
        if let Some(f) = filled {
            if let Err(why) = f() {
                // The guest's device cannot run here, and the source gave it up already.
                let msg = format!("every page arrived, but {why}");
                tracing::error!("{msg}");
                shared.end_run(crate::vstate::vcpu::VcpuStop::Fault(msg));
            }
        }
        let mut lat = lock(&self.latencies_us).clone();
        let stats = PostcopyStats {
            faults: self.faults.load(Ordering::Acquire),
            requested_pages: self.requests.load(Ordering::Acquire),
            latency_us: Percentiles::of(&mut lat),
            pushed_pages: self.pushed.load(Ordering::Acquire),
            fill_ms: resumed_at.elapsed().as_secs_f64() * 1000.0,
        };
        tracing::info!(
            "postcopy done: {} faults, {} pages requested, {} pushed, every page here {:.1} ms after resume",
            stats.faults,
            stats.requested_pages,
            stats.pushed_pages,
            stats.fill_ms
        );
        let mut report = lock(&self.report).clone();
        report.ok = true;
        report.downtime_ms = restore_ms;
        report.total_ms = self.begun.elapsed().as_secs_f64() * 1000.0;
        report.postcopy = Some(stats.clone());
        if let Some(w) = lock(&self.main_w).as_mut() {
            let json = serde_json::to_vec(&DestinationStats {
                restore_ms,
                postcopy: Some(stats),
                ..Default::default()
            })
            .unwrap_or_default();
            let sent = w
                .send(&Message::Resumed)
                .and_then(|()| w.send(&Message::Stats(json)))
                .and_then(|()| w.flush());
            if let Err(e) = sent {
                tracing::warn!("confirming postcopy to the source: {e}");
                report.error = Some(format!("confirming to the source: {e}"));
            }
            report.bytes = w.bytes_sent();
        }
        let mut p = shared.progress();
        p.report = Some(report);
        p.phase = Phase::None;
        p.remaining_pages = 0;
    }

    /// A connection or the pager failed while pages are still on the source.
    fn lost(&self, why: &str) {
        if self.done.swap(true, Ordering::AcqRel) {
            return;
        }
        let left = self.remaining.load(Ordering::Acquire);
        let msg = format!(
            "postcopy failed with {left} pages still on the source: {why}. The guest cannot \
             continue here without them; stopping this VM now (the source still holds every \
             page and the guest's state as of the pause)"
        );
        tracing::error!("{msg}");
        eprintln!("vmm: error: {msg}");
        std::process::exit(EXIT_POSTCOPY_LOST);
    }
}
