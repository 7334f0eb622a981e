//! `soft-dirty`: clear_refs ("4") write-protects every page of the process and clears the
//! soft-dirty bits; a later write sets bit 55 of the page's pagemap entry.
//!
//! On a kernel without CONFIG_MEM_SOFT_DIRTY (the machines this project is built on) clear_refs
//! still succeeds and the bit is simply never set, so a tracker would report nothing, silently.
//! `start` therefore runs a self-test on a scratch page and refuses with that reason.
//!
//! Limits where it does work: clear_refs is process-wide (it also write-protects the VMM's own
//! heap) and cannot be combined atomically with reading pagemap, so a write that lands between
//! the read and the clear is lost. Harvests are exact only at quiescent points (vCPUs paused or
//! at a sync point such as the micro guest's pass port).

use super::{DirtySet, DirtyTracker, TrackContext, TrackedSlot, TrackerKind, TrackingError};
use crate::sys::pagemap::{self, Pagemap, PM_SOFT_DIRTY};

const KIND: TrackerKind = TrackerKind::SoftDirty;

pub fn check_host() -> Result<(), TrackingError> {
    match pagemap::soft_dirty_self_test() {
        Ok(true) => Ok(()),
        Ok(false) => Err(TrackingError::Unsupported {
            backend: KIND,
            reason: format!(
                "self-test: after clear_refs and a write to a scratch page, pagemap bit 55 \
                 (soft-dirty) stayed clear, so this kernel silently tracks nothing{}",
                kernel_config_hint()
            ),
        }),
        Err(source) => Err(TrackingError::HostSys {
            backend: KIND,
            what: "self-test failed",
            source,
        }),
    }
}

/// What the running kernel's config says about CONFIG_MEM_SOFT_DIRTY, when it can be read.
fn kernel_config_hint() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let path = format!("/boot/config-{}", release.trim());
    match std::fs::read_to_string(&path) {
        Ok(config) if config.contains("CONFIG_MEM_SOFT_DIRTY=y") => {
            format!(" (though {path} has CONFIG_MEM_SOFT_DIRTY=y)")
        }
        Ok(_) => format!(" ({path}: CONFIG_MEM_SOFT_DIRTY is not set)"),
        Err(_) => " (CONFIG_MEM_SOFT_DIRTY is probably off)".to_string(),
    }
}

pub struct SoftDirty {
    slots: Vec<TrackedSlot>,
    pagemap: Option<Pagemap>,
    entries: Vec<u64>,
}

impl SoftDirty {
    pub fn new(ctx: &TrackContext) -> Self {
        SoftDirty {
            slots: ctx.slots.clone(),
            pagemap: None,
            entries: Vec::new(),
        }
    }

    /// Reads every slot's pagemap, calls `f(slot index, page)` per soft-dirty page, then clears.
    fn take(&mut self, mut f: impl FnMut(usize, u64)) -> Result<u64, TrackingError> {
        let Some(pagemap) = &self.pagemap else {
            return Err(TrackingError::NotStarted(KIND));
        };
        let mut n = 0;
        for (i, s) in self.slots.iter().enumerate() {
            pagemap
                .read_entries(s.host, s.pages() as usize, &mut self.entries)
                .map_err(TrackingError::sys(KIND, "reading /proc/self/pagemap"))?;
            for (page, e) in self.entries.iter().enumerate() {
                if e & PM_SOFT_DIRTY != 0 {
                    f(i, page as u64);
                    n += 1;
                }
            }
        }
        pagemap::clear_soft_dirty().map_err(TrackingError::sys(
            KIND,
            "writing 4 to /proc/self/clear_refs",
        ))?;
        Ok(n)
    }
}

impl DirtyTracker for SoftDirty {
    fn kind(&self) -> TrackerKind {
        KIND
    }

    fn start(&mut self) -> Result<(), TrackingError> {
        check_host()?;
        self.pagemap = Some(
            Pagemap::open_self().map_err(TrackingError::sys(KIND, "opening /proc/self/pagemap"))?,
        );
        pagemap::clear_soft_dirty().map_err(TrackingError::sys(
            KIND,
            "writing 4 to /proc/self/clear_refs",
        ))
    }

    fn harvest(&mut self, into: &mut DirtySet) -> Result<(), TrackingError> {
        self.take(|slot, page| {
            into.set_page(slot, page);
        })?;
        Ok(())
    }

    fn harvest_raw(&mut self) -> Result<u64, TrackingError> {
        self.take(|_, _| {})
    }

    fn stop(&mut self) -> Result<(), TrackingError> {
        self.pagemap = None;
        Ok(())
    }

    fn memory_overhead_bytes(&self) -> u64 {
        (self.entries.capacity() * 8) as u64
    }
}
