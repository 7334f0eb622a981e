//! The three userspace write-tracking mechanisms the HMM life cycle compares, behind one small
//! interface: `arm` starts a tracking interval, `harvest` returns the pages reported written
//! since and starts the next one.
//! - uffd WP (synchronous): a handler thread records each write-protect fault and un-protects
//!   that page; re-arming write-protects the whole range again.
//! - uffd WP_ASYNC + PAGEMAP_SCAN (PAGE_IS_WRITTEN with PM_SCAN_WP_MATCHING): no messages; the
//!   scan reports and re-protects in one walk.
//! - soft-dirty: clear_refs 4, then pagemap bit 55 (also set on swap-type entries such as
//!   device-private ones).

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use userfaultfd::{Event, FaultKind, RegisterMode, Uffd};
use vmm::sys::pagemap::{clear_soft_dirty, PageRegion, Pagemap, PM_SOFT_DIRTY};
use vmm::sys::uffd::{uffd_with_features, FEATURE_WP_ASYNC, FEATURE_WP_UNPOPULATED};

use crate::kinds::SMALL;
use crate::report::Mechanism;

/// The tracked range: `pages` 4 KiB pages at `start`.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    pub start: usize,
    pub pages: usize,
}

impl Range {
    fn len(self) -> usize {
        self.pages * SMALL
    }
    fn page_of(self, addr: usize) -> Option<usize> {
        let i = addr.checked_sub(self.start)? / SMALL;
        (i < self.pages).then_some(i)
    }
}

pub trait Tracker {
    fn mechanism(&self) -> Mechanism;
    /// Starts a tracking interval: writes from now on are to be reported.
    fn arm(&mut self) -> Result<(), String>;
    /// Page indices reported written since `arm` or the last harvest; re-arms.
    fn harvest(&mut self) -> Result<BTreeSet<usize>, String>;
    /// What `harvest` would report, without re-arming: the check that nothing is reported
    /// before anything is written must not itself re-arm (that would hide the first arming
    /// path behind the harvest's).
    fn peek(&mut self) -> Result<BTreeSet<usize>, String>;
    /// How `arm` protects the range, for the cells' `armed_by`.
    fn armed_by(&self) -> &'static str;
    /// How `harvest` re-protects it for the next interval (what a tracking backend does from
    /// its second harvest on).
    fn rearmed_by(&self) -> &'static str;
}

/// Builds the tracker for `mech` over `range` (registration happens here).
pub fn new(mech: Mechanism, range: Range) -> Result<Box<dyn Tracker>, String> {
    new_with_granule(mech, range, SMALL)
}

/// As [`new`], where the memory's pages are `granule` bytes (hugetlb: 2 MiB): synchronous WP
/// un-protects a faulting page in that size (UFFDIO_WRITEPROTECT refuses a smaller range on
/// hugetlb, which would leave the writer blocked).
pub fn new_with_granule(
    mech: Mechanism,
    range: Range,
    granule: usize,
) -> Result<Box<dyn Tracker>, String> {
    Ok(match mech {
        Mechanism::UffdWp => Box::new(SyncWp::new(range, granule.max(SMALL))?),
        Mechanism::PagemapScan => Box::new(AsyncWpScan::new(range)?),
        Mechanism::SoftDirty => Box::new(SoftDirty { range }),
        other => {
            return Err(format!(
                "{} is not an HMM life-cycle mechanism",
                other.name()
            ))
        }
    })
}

fn uffd_err(op: &str, e: impl std::fmt::Display) -> String {
    format!("{op}: {e}")
}

// --- uffd WP, synchronous -------------------------------------------------------------------

struct SyncWp {
    range: Range,
    uffd: Arc<Uffd>,
    seen: Arc<Mutex<BTreeSet<usize>>>,
    stop: Arc<AtomicBool>,
    handler: Option<JoinHandle<()>>,
}

impl SyncWp {
    fn new(range: Range, granule: usize) -> Result<SyncWp, String> {
        let uffd = uffd_with_features(0).map_err(|e| uffd_err("userfaultfd", e))?;
        uffd.register_with_mode(
            range.start as *mut _,
            range.len(),
            RegisterMode::WRITE_PROTECT,
        )
        .map_err(|e| uffd_err("UFFDIO_REGISTER WP", e))?;
        let uffd = Arc::new(uffd);
        let seen = Arc::new(Mutex::new(BTreeSet::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler = {
            let (uffd, seen, stop) = (uffd.clone(), seen.clone(), stop.clone());
            std::thread::spawn(move || handle_faults(&uffd, range, granule, &seen, &stop))
        };
        Ok(SyncWp {
            range,
            uffd,
            seen,
            stop,
            handler: Some(handler),
        })
    }
}

/// Records every write-protect fault in `range` and un-protects that page (waking the
/// writer), until `stop`.
fn handle_faults(
    uffd: &Uffd,
    range: Range,
    granule: usize,
    seen: &Mutex<BTreeSet<usize>>,
    stop: &AtomicBool,
) {
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes exactly the one pollfd passed.
        if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
            continue;
        }
        let Ok(Some(Event::Pagefault { kind, addr, .. })) = uffd.read_event() else {
            continue;
        };
        let page = addr as usize / SMALL * SMALL;
        if kind == FaultKind::WriteProtected {
            if let Some(i) = range.page_of(page) {
                seen.lock().unwrap_or_else(|p| p.into_inner()).insert(i);
            }
        }
        // Un-protect and wake whatever the fault was, so no writer stays blocked.
        let block = addr as usize / granule * granule;
        let _ = uffd.remove_write_protection(block as *mut _, granule, true);
    }
}

impl Tracker for SyncWp {
    fn mechanism(&self) -> Mechanism {
        Mechanism::UffdWp
    }
    fn arm(&mut self) -> Result<(), String> {
        self.uffd
            .write_protect(self.range.start as *mut _, self.range.len())
            .map_err(|e| uffd_err("UFFDIO_WRITEPROTECT", e))
    }
    fn harvest(&mut self) -> Result<BTreeSet<usize>, String> {
        // Faults are resolved before the writer goes on, so every write that faulted before
        // this call is already recorded.
        let got = std::mem::take(&mut *self.seen.lock().unwrap_or_else(|p| p.into_inner()));
        self.arm()?;
        Ok(got)
    }
    fn peek(&mut self) -> Result<BTreeSet<usize>, String> {
        Ok(self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
    fn armed_by(&self) -> &'static str {
        "UFFDIO_WRITEPROTECT over the range (sync WP uffd)"
    }
    fn rearmed_by(&self) -> &'static str {
        "UFFDIO_WRITEPROTECT over the range by the previous harvest (the uffd-wp backend's re-arm)"
    }
}

impl Drop for SyncWp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
        // Un-protect before the uffd closes (closing would drop the protection anyway).
        let _ =
            self.uffd
                .remove_write_protection(self.range.start as *mut _, self.range.len(), true);
    }
}

// --- uffd WP_ASYNC + PAGEMAP_SCAN -----------------------------------------------------------

struct AsyncWpScan {
    range: Range,
    uffd: Uffd,
    pagemap: Pagemap,
}

impl AsyncWpScan {
    fn new(range: Range) -> Result<AsyncWpScan, String> {
        let uffd = uffd_with_features(FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED)
            .map_err(|e| uffd_err("userfaultfd WP_ASYNC|WP_UNPOPULATED", e))?;
        uffd.register_with_mode(
            range.start as *mut _,
            range.len(),
            RegisterMode::WRITE_PROTECT,
        )
        .map_err(|e| uffd_err("UFFDIO_REGISTER WP", e))?;
        let pagemap = Pagemap::open_self().map_err(|e| uffd_err("open pagemap", e))?;
        Ok(AsyncWpScan {
            range,
            uffd,
            pagemap,
        })
    }

    fn scan(&self, reprotect: bool) -> Result<BTreeSet<usize>, String> {
        let (start, end) = (
            self.range.start as u64,
            (self.range.start + self.range.len()) as u64,
        );
        let mut regions: Vec<PageRegion> = Vec::new();
        self.pagemap
            .scan_written(start, end, reprotect, &mut regions)
            .map_err(|e| uffd_err("PAGEMAP_SCAN", e))?;
        let mut seen = BTreeSet::new();
        for r in &regions {
            let mut p = r.start;
            while p < r.end {
                seen.extend(self.range.page_of(p as usize));
                p += SMALL as u64;
            }
        }
        Ok(seen)
    }
}

impl Tracker for AsyncWpScan {
    fn mechanism(&self) -> Mechanism {
        Mechanism::PagemapScan
    }
    fn arm(&mut self) -> Result<(), String> {
        self.uffd
            .write_protect(self.range.start as *mut _, self.range.len())
            .map_err(|e| uffd_err("UFFDIO_WRITEPROTECT", e))
    }
    fn harvest(&mut self) -> Result<BTreeSet<usize>, String> {
        self.scan(true)
    }
    fn peek(&mut self) -> Result<BTreeSet<usize>, String> {
        self.scan(false)
    }
    fn armed_by(&self) -> &'static str {
        "UFFDIO_WRITEPROTECT over the range (WP_ASYNC uffd)"
    }
    fn rearmed_by(&self) -> &'static str {
        "PAGEMAP_SCAN PM_SCAN_WP_MATCHING by the previous harvest (the uffd-wp-async backend's \
         re-arm)"
    }
}

// --- soft-dirty -----------------------------------------------------------------------------

struct SoftDirty {
    range: Range,
}

impl Tracker for SoftDirty {
    fn mechanism(&self) -> Mechanism {
        Mechanism::SoftDirty
    }
    fn arm(&mut self) -> Result<(), String> {
        clear_soft_dirty().map_err(|e| uffd_err("clear_refs 4", e))
    }
    fn harvest(&mut self) -> Result<BTreeSet<usize>, String> {
        let seen = self.peek()?;
        self.arm()?;
        Ok(seen)
    }
    fn peek(&mut self) -> Result<BTreeSet<usize>, String> {
        let pm = Pagemap::open_self().map_err(|e| uffd_err("open pagemap", e))?;
        let mut entries = Vec::new();
        pm.read_entries(self.range.start as u64, self.range.pages, &mut entries)
            .map_err(|e| uffd_err("read pagemap", e))?;
        let seen = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| *e & PM_SOFT_DIRTY != 0)
            .map(|(i, _)| i)
            .collect();
        Ok(seen)
    }
    fn armed_by(&self) -> &'static str {
        "clear_refs 4 (soft-dirty cleared, PTEs write-protected)"
    }
    fn rearmed_by(&self) -> &'static str {
        "clear_refs 4 by the previous harvest"
    }
}
