//! `bitmap-manual`: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with INITIALLY_SET. GET_DIRTY_LOG then only
//! reads the log; KVM_CLEAR_DIRTY_LOG re-protects exactly the pages we took, chunk by chunk, so
//! write-protection work is proportional to what was dirty rather than to the slot size.
//! INITIALLY_SET makes turning logging on cheap (no up-front write-protect of the whole slot;
//! `start` protects it chunk by chunk).

use std::sync::Arc;

use super::kvm_bitmap::{get_log, logging, refuse_on_ring_vm};
use super::{DirtySet, DirtyTracker, TrackContext, TrackedSlot, TrackerKind, TrackingError};
use crate::sys::kvm_dirty::{self, MANUAL_PROTECT_ENABLE, MANUAL_PROTECT_INITIALLY_SET};
use crate::vstate::vm::Vm;

const KIND: TrackerKind = TrackerKind::BitmapManual;
const WANTED: u64 = MANUAL_PROTECT_ENABLE | MANUAL_PROTECT_INITIALLY_SET;
/// Pages per KVM_CLEAR_DIRTY_LOG: 256 MiB of guest RAM, a multiple of 64 as `first_page` must
/// be. Bounded so one call never holds KVM's MMU lock for a whole large slot.
const CLEAR_CHUNK_PAGES: u64 = 64 * 1024;

pub fn check_host() -> Result<(), TrackingError> {
    check_mask(&super::scratch_vm(KIND)?)
}

/// Whether this KVM offers manual protect with INITIALLY_SET.
fn check_mask(vm: &kvm_ioctls::VmFd) -> Result<(), TrackingError> {
    let mask = kvm_dirty::manual_protect_supported(vm);
    if mask & WANTED != WANTED {
        return Err(TrackingError::Unsupported {
            backend: KIND,
            reason: format!(
                "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (168) offers flags {mask:#x}, need ENABLE|INITIALLY_SET (0x3)"
            ),
        });
    }
    Ok(())
}

pub struct KvmBitmapManual {
    vm: Arc<Vm>,
    slots: Vec<TrackedSlot>,
    started: bool,
}

impl KvmBitmapManual {
    pub fn new(ctx: &TrackContext) -> Result<Self, TrackingError> {
        refuse_on_ring_vm(KIND, ctx)?;
        check_mask(ctx.vm.fd())?;
        Ok(KvmBitmapManual {
            vm: ctx.vm.clone(),
            slots: ctx.slots.clone(),
            started: false,
        })
    }

    fn get(&self, s: &TrackedSlot) -> Result<Vec<u64>, TrackingError> {
        get_log(KIND, &self.vm, s)
    }

    /// Re-protects the pages set in `words` (the slot's whole log), skipping clean chunks.
    fn clear(&self, s: &TrackedSlot, words: &[u64]) -> Result<(), TrackingError> {
        let pages = s.pages();
        let mut first = 0;
        while first < pages {
            let n = CLEAR_CHUNK_PAGES.min(pages - first);
            let w0 = (first / 64) as usize;
            let w1 = (first + n).div_ceil(64) as usize;
            let chunk = &words[w0..w1.min(words.len())];
            if chunk.iter().any(|&w| w != 0) {
                // `n` is a multiple of 64 except for the slot's last chunk, which KVM accepts.
                kvm_dirty::clear_dirty_log(self.vm.fd(), s.slot, first, n as u32, chunk)
                    .map_err(TrackingError::sys(KIND, "KVM_CLEAR_DIRTY_LOG"))?;
            }
            first += n;
        }
        Ok(())
    }
}

impl DirtyTracker for KvmBitmapManual {
    fn kind(&self) -> TrackerKind {
        KIND
    }

    fn start(&mut self) -> Result<(), TrackingError> {
        kvm_dirty::enable_manual_protect(self.vm.fd(), WANTED).map_err(TrackingError::sys(
            KIND,
            "enabling KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2",
        ))?;
        logging(KIND, &self.vm, true)?;
        self.started = true;
        // INITIALLY_SET: every page starts dirty and writable. Protect them all now so the
        // first harvest reports only writes made after `start`, like every other backend.
        for s in self.slots.clone() {
            let words = self.get(&s)?;
            self.clear(&s, &words)?;
        }
        Ok(())
    }

    fn harvest(&mut self, into: &mut DirtySet) -> Result<(), TrackingError> {
        if !self.started {
            return Err(TrackingError::NotStarted(KIND));
        }
        for (i, s) in self.slots.iter().enumerate() {
            let words = self.get(s)?;
            // Clear (re-protect) before anyone reads the pages' contents.
            self.clear(s, &words)?;
            into.or_words(i, &words);
        }
        Ok(())
    }

    fn harvest_raw(&mut self) -> Result<u64, TrackingError> {
        let mut dirty = 0;
        for s in &self.slots {
            let words = self.get(s)?;
            self.clear(s, &words)?;
            dirty += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        }
        Ok(dirty)
    }

    fn stop(&mut self) -> Result<(), TrackingError> {
        if self.started {
            self.started = false;
            logging(KIND, &self.vm, false)?;
            kvm_dirty::enable_manual_protect(self.vm.fd(), 0).map_err(TrackingError::sys(
                KIND,
                "turning manual dirty-log protect off",
            ))?;
        }
        Ok(())
    }

    fn memory_overhead_bytes(&self) -> u64 {
        // KVM's bitmap per slot plus the copy each GET returns.
        super::bitmap_bytes(&self.slots) * 2
    }
}

impl Drop for KvmBitmapManual {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("{e}");
        }
    }
}
