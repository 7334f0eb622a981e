//! Lazy restore's page source: pages come from the snapshot's memory file on first touch,
//! read through a `PageSource` (the file itself, or a page-server client).
//!
//! - A handler thread serves the pager's fault queue (userfaultfd faults of vCPUs, KVM and the
//!   VMM's device threads; with no inline fetch, exit backends' vCPU faults too).
//! - Exit backends call `Fetch::fetch` from the vCPU thread itself.
//! - With `prefetch`, a background thread brings in everything not touched yet, after which
//!   the pager is disarmed.
//!
//! Every install goes through the pager, which never overwrites a present page, so the
//! handler, a vCPU and the prefetcher can race for a page safely. The one race the pager
//! cannot absorb is with the prefetch's disarm: an install that read "still missing" just
//! before the prefetcher brought the last page in would reach userfaultfd after the ranges
//! were unregistered (UFFDIO_COPY/CONTINUE then fail with ENOENT). `gate` orders the two.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::machine::progress::Percentiles;
use crate::memory::page_index::{AtomicPages, PageIndex};
use crate::memory::RamRange;
use crate::userfault::{inject, DemandPager, ExitStats, Fetch, Installed, UserfaultError};

const PAGE: u64 = 4096;

/// Where page data comes from: the snapshot's memory file, or a page server over a socket.
pub trait PageSource: Send + Sync {
    /// Fills `buf` (whole pages) with the snapshot's data at `gpa`, which lies at
    /// `file_offset` in the memory file.
    fn read(&self, gpa: u64, file_offset: u64, buf: &mut [u8]) -> Result<(), UserfaultError>;
}

impl PageSource for File {
    fn read(&self, gpa: u64, file_offset: u64, buf: &mut [u8]) -> Result<(), UserfaultError> {
        self.read_exact_at(buf, file_offset)
            .map_err(|e| UserfaultError::Fetch {
                gpa,
                len: buf.len() as u64,
                reason: format!("reading the snapshot's memory file: {e}"),
            })
    }
}

/// Called once when lazy restore fails for good (to stop the guest).
pub type OnFail = Box<dyn Fn(&str) + Send + Sync>;

pub struct Lazy {
    pager: Arc<dyn DemandPager>,
    source: Arc<dyn PageSource>,
    on_fail: std::sync::OnceLock<OnFail>,
    /// Called once the prefetch has brought in every page and the pager is disarmed.
    filled_hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    ranges: Vec<RamRange>,
    index: PageIndex,
    /// Pages that hold data in the snapshot and have not been installed yet.
    data: AtomicPages,
    chunk: u64,
    latencies_us: Mutex<Vec<f64>>,
    faults: AtomicU64,
    zero_faults: AtomicU64,
    installed: AtomicU64,
    done: AtomicBool,
    /// Held shared by every install, exclusively by the prefetch's disarm; true once the
    /// pager is disarmed (every page present, nothing left to install).
    gate: RwLock<bool>,
    error: Mutex<Option<String>>,
    filled_ms: Mutex<Option<f64>>,
    last_install: Mutex<Option<Instant>>,
    begun: Mutex<Instant>,
}

/// What lazy restore measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemandReport {
    pub backend: String,
    /// Faults served: userfaultfd events plus vCPU exits that fetched pages.
    pub faults: u64,
    /// Faults on pages that are zero in the snapshot (installed as zero pages).
    pub zero_faults: u64,
    pub pages_installed: u64,
    pub data_pages: u64,
    /// Pages brought in before the vCPUs ran (page tables and paravirtual pages; exit backends).
    pub eager_pages: u64,
    /// Fault seen (or fetch called) to pages installed, microseconds.
    pub fault_us: Option<Percentiles>,
    #[serde(skip_deserializing)]
    pub exits: Option<ExitStats>,
    /// With --prefetch: resume to every page present.
    pub filled_ms: Option<f64>,
    /// Resume to the last page installed (the demand-paging phase of a workload that touches
    /// its memory once).
    pub last_install_ms: Option<f64>,
    pub error: Option<String>,
    /// Out of process: where the handler ran and what the page server counted.
    #[serde(default)]
    pub page_server: Option<serde_json::Value>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Lazy {
    pub fn new(
        pager: Arc<dyn DemandPager>,
        source: Arc<dyn PageSource>,
        ranges: &[RamRange],
        runs: &[(u64, u64)],
        chunk: u64,
    ) -> Result<Lazy, UserfaultError> {
        let index = PageIndex::new(ranges);
        let data = AtomicPages::new(index.total());
        for &(gpa, n) in runs {
            for p in 0..n {
                let page = gpa + p * PAGE;
                let i = index.index(page).ok_or(UserfaultError::NotRam {
                    gpa: page,
                    len: PAGE,
                })?;
                data.set(i);
            }
        }
        Ok(Lazy {
            pager,
            source,
            on_fail: std::sync::OnceLock::new(),
            filled_hook: Mutex::new(None),
            ranges: ranges.to_vec(),
            index,
            data,
            chunk: chunk.max(PAGE),
            latencies_us: Mutex::new(Vec::new()),
            faults: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            installed: AtomicU64::new(0),
            done: AtomicBool::new(false),
            gate: RwLock::new(false),
            error: Mutex::new(None),
            filled_ms: Mutex::new(None),
            last_install: Mutex::new(None),
            begun: Mutex::new(Instant::now()),
        })
    }

    fn has_data(&self, gpa: u64) -> bool {
        self.index.index(gpa).is_some_and(|i| self.data.get(i))
    }

    fn file_offset(&self, gpa: u64, len: u64) -> Result<u64, UserfaultError> {
        crate::memory::ram_file::file_offset(&self.ranges, gpa, len)
            .map_err(|_| UserfaultError::NotRam { gpa, len })
    }

    /// Installs the snapshot's data pages in [gpa, gpa+pages) that are not installed yet.
    /// Returns whether `gpa` itself was installed now.
    pub fn bring(&self, gpa: u64, pages: u64) -> Result<bool, UserfaultError> {
        let disarmed = self.gate.read().unwrap_or_else(|p| p.into_inner());
        if *disarmed {
            return Ok(false);
        }
        let mut first_now = false;
        let mut at = gpa;
        let end = gpa + pages * PAGE;
        while at < end {
            if !self.has_data(at) {
                at += PAGE;
                continue;
            }
            let mut n = 1;
            while at + n * PAGE < end && self.has_data(at + n * PAGE) {
                n += 1;
            }
            let len = n * PAGE;
            let off = self.file_offset(at, len)?;
            let mut buf = vec![0u8; len as usize];
            self.source.read(at, off, &mut buf)?;
            let fault = inject::active();
            if let Some(p) = inject::misplaced(fault, at, n) {
                let rel = p - at;
                let page = &mut buf[rel as usize..(rel + PAGE) as usize];
                self.source.read(p + PAGE, off + rel + PAGE, page)?;
            }
            inject::corrupt(fault, at, &mut buf);
            let r = self.pager.install(at, &buf)?;
            *lock(&self.last_install) = Some(Instant::now());
            if at == gpa {
                first_now = r == Installed::Now;
            }
            for p in 0..n {
                if let Some(i) = self.index.index(at + p * PAGE) {
                    if self.data.clear(i) {
                        self.installed.fetch_add(1, Ordering::AcqRel);
                    }
                }
            }
            at += len;
        }
        Ok(first_now)
    }

    /// The chunk around `gpa`, clipped to its RAM range.
    fn chunk_of(&self, gpa: u64) -> (u64, u64) {
        match self.ranges.iter().find(|r| r.contains(gpa)) {
            Some(r) => {
                let start = r.gpa + (gpa - r.gpa) / self.chunk * self.chunk;
                let end = (start + self.chunk).min(r.end());
                (start, (end - start) / PAGE)
            }
            None => (gpa, 1),
        }
    }

    fn on_fault(&self, gpa: u64, seen: Instant) -> Result<(), UserfaultError> {
        self.faults.fetch_add(1, Ordering::AcqRel);
        if self.has_data(gpa) {
            let (start, pages) = self.chunk_of(gpa);
            self.bring(start, pages)?;
            // Installed by someone else meanwhile: whoever faulted may have missed the wake.
            self.pager.wake(gpa, 1)?;
        } else {
            self.zero_faults.fetch_add(1, Ordering::AcqRel);
            let disarmed = self.gate.read().unwrap_or_else(|p| p.into_inner());
            // Once disarmed, the unregister woke every waiter and a zero page needs no install.
            if !*disarmed && self.pager.install_zero(gpa, 1)? == Installed::AlreadyPresent {
                self.pager.wake(gpa, 1)?;
            }
        }
        lock(&self.latencies_us).push(seen.elapsed().as_secs_f64() * 1e6);
        Ok(())
    }

    /// Serves the pager's fault queue until `stop`.
    pub fn serve(self: Arc<Self>) {
        while !self.done.load(Ordering::Acquire) {
            let r = self
                .pager
                .next_fault(Duration::from_millis(50))
                .and_then(|f| match f {
                    Some(f) => self.on_fault(f.gpa, f.seen),
                    None => Ok(()),
                });
            if let Err(e) = r {
                self.fail(&format!("serving a fault: {e}"));
                return;
            }
        }
    }

    /// Brings in every page not touched yet, then disarms the pager.
    pub fn prefetch(self: Arc<Self>) {
        let mut next = 0;
        while !self.done.load(Ordering::Acquire) {
            let Some(i) = self.data.next_set(next) else {
                break;
            };
            let n = self.index.contiguous_from(i, 256).max(1);
            let Some(gpa) = self.index.gpa(i) else { break };
            if let Err(e) = self.bring(gpa, n) {
                self.fail(&format!("prefetching 0x{gpa:x}: {e}"));
                return;
            }
            next = i + n;
        }
        let mut disarmed = self.gate.write().unwrap_or_else(|p| p.into_inner());
        if self.data.count() == 0 && !*disarmed {
            *lock(&self.filled_ms) = Some(lock(&self.begun).elapsed().as_secs_f64() * 1000.0);
            match self.pager.disarm() {
                Ok(()) => {
                    *disarmed = true;
                    drop(disarmed);
                    if let Some(hook) = lock(&self.filled_hook).take() {
                        hook();
                    }
                }
                Err(e) => {
                    drop(disarmed);
                    self.fail(&format!("disarming the pager after the prefetch: {e}"));
                }
            }
        }
    }

    fn fail(&self, reason: &str) {
        tracing::error!("lazy restore: {reason}");
        lock(&self.error).get_or_insert_with(|| reason.to_string());
        if let Some(f) = self.on_fail.get() {
            f(reason);
        }
    }

    /// Sets what to do when the restore fails for good (once; later calls are ignored).
    pub fn on_fail(&self, f: OnFail) {
        let _ = self.on_fail.set(f);
    }

    /// Sets what to do once every page is here (after a complete prefetch).
    pub fn on_filled(&self, f: Box<dyn FnOnce() + Send>) {
        *lock(&self.filled_hook) = Some(f);
    }

    /// The first failure, if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.error).clone()
    }

    /// The vCPUs are about to run: times in the report count from here.
    pub fn resuming(&self) {
        *lock(&self.begun) = Instant::now();
    }

    pub fn stop(&self) {
        self.done.store(true, Ordering::Release);
    }

    pub fn report(&self, eager_pages: u64, data_pages: u64) -> DemandReport {
        let mut lat = lock(&self.latencies_us).clone();
        DemandReport {
            backend: self.pager.name().to_string(),
            faults: self.faults.load(Ordering::Acquire),
            zero_faults: self.zero_faults.load(Ordering::Acquire),
            pages_installed: self.installed.load(Ordering::Acquire),
            data_pages,
            eager_pages,
            fault_us: Percentiles::of(&mut lat),
            exits: self.pager.exits().map(|e| e.stats()),
            filled_ms: *lock(&self.filled_ms),
            last_install_ms: lock(&self.last_install).map(|t| {
                let begun = *lock(&self.begun);
                t.saturating_duration_since(begun).as_secs_f64() * 1000.0
            }),
            error: lock(&self.error).clone(),
            page_server: None,
        }
    }
}

impl Fetch for Lazy {
    fn fetch(&self, gpa: u64, pages: u64) -> Result<(), UserfaultError> {
        let seen = Instant::now();
        self.faults.fetch_add(1, Ordering::AcqRel);
        self.bring(gpa, pages)?;
        lock(&self.latencies_us).push(seen.elapsed().as_secs_f64() * 1e6);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use crate::userfault::UffdMissing;
    use std::sync::mpsc;
    use vm_memory::{Bytes, GuestAddress};

    const BASE: u64 = 0x10_0000;

    /// Pages read back as their own GPA; the one-page read of `hold` (a vCPU's fetch, not the
    /// prefetcher's run) parks until released, to put it in the middle of the prefetch.
    struct Parked {
        hold: u64,
        parked: Mutex<Option<mpsc::Sender<()>>>,
        release: Mutex<mpsc::Receiver<()>>,
    }

    impl PageSource for Parked {
        fn read(&self, gpa: u64, _off: u64, buf: &mut [u8]) -> Result<(), UserfaultError> {
            for (i, page) in buf.chunks_mut(PAGE as usize).enumerate() {
                page[..8].copy_from_slice(&(gpa + i as u64 * PAGE).to_le_bytes());
            }
            if gpa == self.hold && buf.len() == PAGE as usize {
                if let Some(tx) = lock(&self.parked).take() {
                    let _ = tx.send(());
                    let _ = lock(&self.release).recv();
                }
            }
            Ok(())
        }
    }

    /// A fetch that found its page missing, and installs it only after the prefetcher brought
    /// every page in, must still succeed: the prefetcher may not unregister the ranges under
    /// it (it did, and the late UFFDIO_COPY failed with ENOENT and stopped the guest).
    #[test]
    fn a_fetch_in_flight_holds_off_the_prefetchs_disarm() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let pager: Arc<dyn DemandPager> =
            Arc::new(UffdMissing::arm(ram.ranges(), &ram.host_addrs()).unwrap());
        let hold = BASE + 2 * PAGE;
        let (parked_tx, parked_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel();
        let source = Arc::new(Parked {
            hold,
            parked: Mutex::new(Some(parked_tx)),
            release: Mutex::new(release_rx),
        });
        let lazy = Arc::new(Lazy::new(pager, source, ram.ranges(), &[(BASE, 4)], PAGE).unwrap());
        let fetcher = {
            let lazy = lazy.clone();
            std::thread::spawn(move || lazy.fetch(hold, 1))
        };
        parked_rx.recv().unwrap();
        let prefetcher = {
            let lazy = lazy.clone();
            std::thread::spawn(move || lazy.prefetch())
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while lazy.data.count() != 0 {
            assert!(
                Instant::now() < deadline,
                "the prefetch never brought the pages in"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // The pass does not depend on this pause; it gives a prefetcher that wrongly disarms
        // now the time to do it, so that the regression shows.
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            lock(&lazy.filled_ms).is_none(),
            "disarmed with a fetch in flight"
        );
        release_tx.send(()).unwrap();
        fetcher.join().unwrap().unwrap();
        prefetcher.join().unwrap();
        assert_eq!(lazy.error(), None);
        assert!(
            lock(&lazy.filled_ms).is_some(),
            "the prefetch never disarmed"
        );
        let mem = ram.memory();
        for p in 0..4 {
            let gpa = BASE + p * PAGE;
            assert_eq!(mem.read_obj::<u64>(GuestAddress(gpa)).unwrap(), gpa);
        }
        // Disarmed: a page that never had data reads as zero without any handler.
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(BASE + 64 * PAGE)).unwrap(),
            0
        );
    }
}
