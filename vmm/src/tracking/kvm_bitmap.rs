//! `bitmap`: KVM_MEM_LOG_DIRTY_PAGES on every RAM slot, harvested with KVM_GET_DIRTY_LOG, which
//! returns the slot's bitmap and write-protects the pages it reports in the same call.

use std::sync::Arc;

use super::{DirtySet, DirtyTracker, TrackContext, TrackedSlot, TrackerKind, TrackingError};
use crate::sys::kvm_dirty;
use crate::vstate::vm::Vm;

const KIND: TrackerKind = TrackerKind::Bitmap;

pub struct KvmBitmap {
    vm: Arc<Vm>,
    slots: Vec<TrackedSlot>,
    started: bool,
}

impl KvmBitmap {
    pub fn new(ctx: &TrackContext) -> Result<Self, TrackingError> {
        refuse_on_ring_vm(KIND, ctx)?;
        Ok(KvmBitmap {
            vm: ctx.vm.clone(),
            slots: ctx.slots.clone(),
            started: false,
        })
    }
}

/// The KVM bitmap is unusable while the dirty ring is on (ENXIO): say so up front.
pub fn refuse_on_ring_vm(kind: TrackerKind, ctx: &TrackContext) -> Result<(), TrackingError> {
    if ctx.rings.is_some() {
        return Err(TrackingError::Unsupported {
            backend: kind,
            reason: "this VM has the dirty ring on; KVM then refuses GET/CLEAR_DIRTY_LOG with \
                     ENXIO (DIRTY_LOG_RING_WITH_BITMAP is not offered here)"
                .into(),
        });
    }
    Ok(())
}

/// KVM_GET_DIRTY_LOG of one slot (re-protecting, or not with manual protect on).
pub fn get_log(kind: TrackerKind, vm: &Vm, s: &TrackedSlot) -> Result<Vec<u64>, TrackingError> {
    vm.fd()
        .get_dirty_log(s.slot, s.size as usize)
        .map_err(TrackingError::kvm(kind, "KVM_GET_DIRTY_LOG"))
}

pub fn logging(kind: TrackerKind, vm: &Vm, on: bool) -> Result<(), TrackingError> {
    vm.set_dirty_logging(on)
        .map_err(|source| TrackingError::Vm {
            backend: kind,
            op: if on {
                "turning dirty logging on"
            } else {
                "turning dirty logging off"
            },
            source: Box::new(source),
        })
}

impl DirtyTracker for KvmBitmap {
    fn kind(&self) -> TrackerKind {
        KIND
    }

    fn start(&mut self) -> Result<(), TrackingError> {
        // Manual protect changes what GET_DIRTY_LOG does; a previous bitmap-manual run may have
        // left it on. Hosts without the capability never had it on.
        if kvm_dirty::manual_protect_supported(self.vm.fd()) != 0 {
            kvm_dirty::enable_manual_protect(self.vm.fd(), 0).map_err(TrackingError::sys(
                KIND,
                "turning manual dirty-log protect off",
            ))?;
        }
        logging(KIND, &self.vm, true)?;
        self.started = true;
        Ok(())
    }

    fn harvest(&mut self, into: &mut DirtySet) -> Result<(), TrackingError> {
        if !self.started {
            return Err(TrackingError::NotStarted(KIND));
        }
        for (i, s) in self.slots.iter().enumerate() {
            into.or_words(i, &get_log(KIND, &self.vm, s)?);
        }
        Ok(())
    }

    fn harvest_raw(&mut self) -> Result<u64, TrackingError> {
        let mut dirty = 0;
        for s in &self.slots {
            let words = get_log(KIND, &self.vm, s)?;
            dirty += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        }
        Ok(dirty)
    }

    fn stop(&mut self) -> Result<(), TrackingError> {
        if self.started {
            self.started = false;
            logging(KIND, &self.vm, false)?;
        }
        Ok(())
    }

    fn memory_overhead_bytes(&self) -> u64 {
        // KVM keeps one bitmap per slot (two with manual protect off: it double-buffers), and
        // each GET returns a fresh copy to us.
        super::bitmap_bytes(&self.slots) * 3
    }
}

impl Drop for KvmBitmap {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("{e}");
        }
    }
}
