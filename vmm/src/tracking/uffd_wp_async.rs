//! `uffd-wp-async`: userfaultfd write-protect with UFFD_FEATURE_WP_ASYNC. The kernel resolves
//! each write fault itself (no message, no handler thread), leaving the page marked written;
//! PAGEMAP_SCAN with PM_SCAN_WP_MATCHING reports the written pages and re-protects them in
//! the same call. WP_UNPOPULATED makes never-touched pages protected too.

use userfaultfd::{RegisterMode, Uffd};

use super::{DirtySet, DirtyTracker, TrackContext, TrackedSlot, TrackerKind, TrackingError};
use crate::memory::PAGE_SIZE;
use crate::sys::pagemap::{PageRegion, Pagemap};
use crate::sys::uffd as sys_uffd;

const KIND: TrackerKind = TrackerKind::UffdWpAsync;
const FEATURES: u64 = sys_uffd::FEATURE_WP_ASYNC | sys_uffd::FEATURE_WP_UNPOPULATED;

pub fn check_host() -> Result<(), TrackingError> {
    let features =
        sys_uffd::available_features().map_err(TrackingError::host_sys(KIND, "userfaultfd"))?;
    if features & FEATURES != FEATURES {
        return Err(TrackingError::Unsupported {
            backend: KIND,
            reason: format!(
                "userfaultfd features {features:#x} lack {} (WP_ASYNC needs Linux 6.7)",
                sys_uffd::feature_names(FEATURES & !features).join(", ")
            ),
        });
    }
    Ok(())
}

pub struct UffdWpAsync {
    slots: Vec<TrackedSlot>,
    running: Option<(Uffd, Pagemap)>,
    regions: Vec<PageRegion>,
}

impl UffdWpAsync {
    pub fn new(ctx: &TrackContext) -> Self {
        UffdWpAsync {
            slots: ctx.slots.clone(),
            running: None,
            regions: Vec::new(),
        }
    }

    /// Scans slot `s` for written pages into `self.regions`, re-protecting them.
    fn scan(&mut self, s: TrackedSlot) -> Result<(), TrackingError> {
        let Some((_, pagemap)) = &self.running else {
            return Err(TrackingError::NotStarted(KIND));
        };
        self.regions.clear();
        pagemap
            .scan_written(s.host, s.host + s.size, true, &mut self.regions)
            .map_err(TrackingError::sys(KIND, "PAGEMAP_SCAN"))
    }
}

impl DirtyTracker for UffdWpAsync {
    fn kind(&self) -> TrackerKind {
        KIND
    }

    fn start(&mut self) -> Result<(), TrackingError> {
        check_host()?;
        let pagemap =
            Pagemap::open_self().map_err(TrackingError::sys(KIND, "opening /proc/self/pagemap"))?;
        let uffd = sys_uffd::uffd_with_features(FEATURES)
            .map_err(TrackingError::sys(KIND, "opening a userfaultfd"))?;
        for s in &self.slots {
            uffd.register_with_mode(
                s.host as *mut libc::c_void,
                s.size as usize,
                RegisterMode::WRITE_PROTECT,
            )
            .map_err(TrackingError::uffd(KIND, "UFFDIO_REGISTER (write-protect)"))?;
            uffd.write_protect(s.host as *mut libc::c_void, s.size as usize)
                .map_err(TrackingError::uffd(KIND, "UFFDIO_WRITEPROTECT"))?;
        }
        self.running = Some((uffd, pagemap));
        Ok(())
    }

    fn harvest(&mut self, into: &mut DirtySet) -> Result<(), TrackingError> {
        for (i, s) in self.slots.clone().into_iter().enumerate() {
            self.scan(s)?;
            for r in &self.regions {
                let first = (r.start - s.host) / PAGE_SIZE;
                into.set_pages(i, first, (r.end - r.start) / PAGE_SIZE);
            }
        }
        Ok(())
    }

    fn harvest_raw(&mut self) -> Result<u64, TrackingError> {
        let mut pages = 0;
        for s in self.slots.clone() {
            self.scan(s)?;
            pages += self
                .regions
                .iter()
                .map(|r| (r.end - r.start) / PAGE_SIZE)
                .sum::<u64>();
        }
        Ok(pages)
    }

    fn stop(&mut self) -> Result<(), TrackingError> {
        let Some((uffd, _)) = self.running.take() else {
            return Ok(());
        };
        let mut result = Ok(());
        for s in &self.slots {
            let addr = s.host as *mut libc::c_void;
            let r = uffd
                .remove_write_protection(addr, s.size as usize, true)
                .and_then(|()| uffd.unregister(addr, s.size as usize))
                .map_err(TrackingError::uffd(KIND, "lifting write-protection"));
            result = result.and(r);
        }
        result
    }

    fn memory_overhead_bytes(&self) -> u64 {
        (self.regions.capacity() * std::mem::size_of::<PageRegion>()) as u64
    }
}

impl Drop for UffdWpAsync {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("{e}");
        }
    }
}
