//! KVM dirty logging on the `DeviceBar` memslots of a passed-through device's memory (VRAM),
//! beside the `bitmap` and `bitmap-manual` backends, to measure what KVM's log sees there.
//! KVM logs vCPU stores through its own page tables, whatever memory backs the slot; the
//! device's own writes to that memory never pass through them (TRACKING.md, "GPU memory").
//! The other backends watch RAM only and are not asked to cover device memory.
//!
//! Turned on after the RAM backend's `start` (so a manual-protect VM's INITIALLY_SET applies to
//! these slots too) and off before its `stop`.

use std::sync::Arc;

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;

use super::{TrackerKind, TrackingError};
use crate::sys::kvm_dirty;
use crate::vstate::vm::{Vm, VmError};

/// One logged slot: its id and size (from its first byte in the watched range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarSlotRange {
    pub slot: u32,
    /// Page of the watched range the slot starts at.
    pub first_page: u64,
    pub size: u64,
}

pub struct BarLog {
    kind: TrackerKind,
    vm: Arc<Vm>,
    slots: Vec<BarSlotRange>,
    on: bool,
}

impl BarLog {
    /// Whether `kind` can be asked to log device memory (the KVM bitmap backends).
    pub fn covers(kind: TrackerKind) -> bool {
        matches!(kind, TrackerKind::Bitmap | TrackerKind::BitmapManual)
    }

    /// Why `kind` does not cover device memory here (for reports).
    pub fn not_covered_reason(kind: TrackerKind) -> &'static str {
        match kind {
            TrackerKind::Ring => {
                "the dirty ring logs the RAM slots only here (vmm does not turn logging on for \
                 BAR slots on a ring VM)"
            }
            TrackerKind::UffdWp | TrackerKind::UffdWpAsync | TrackerKind::SoftDirty => {
                "watches the VMM's mapping of guest RAM only (a vfio-pci BAR mapping is \
                 VM_PFNMAP: userfaultfd refuses it with EINVAL, soft-dirty skips it)"
            }
            TrackerKind::Bitmap | TrackerKind::BitmapManual => "covered",
        }
    }

    /// Turns logging on for `slots` as `kind` (bitmap or bitmap-manual) harvests.
    pub fn start(
        kind: TrackerKind,
        vm: Arc<Vm>,
        slots: Vec<BarSlotRange>,
    ) -> Result<BarLog, TrackingError> {
        let mut log = BarLog {
            kind,
            vm,
            slots,
            on: false,
        };
        log.set(true)?;
        if kind == TrackerKind::BitmapManual {
            // INITIALLY_SET marked every page dirty: protect them now, as the backend does.
            let mut scratch = Vec::new();
            log.harvest(&mut |_, _| {}, &mut scratch)?;
        }
        Ok(log)
    }

    fn set(&mut self, on: bool) -> Result<(), TrackingError> {
        for s in &self.slots {
            let Some(cur) = self.vm.memslots().get(s.slot) else {
                continue;
            };
            let flags = if on {
                cur.flags | KVM_MEM_LOG_DIRTY_PAGES
            } else {
                cur.flags & !KVM_MEM_LOG_DIRTY_PAGES
            };
            self.vm
                .memslots()
                .set_flags(s.slot, flags)
                .map_err(|source| TrackingError::Vm {
                    backend: self.kind,
                    op: "dirty logging on a device BAR slot",
                    source: Box::new(VmError::Memslot {
                        what: "KVM_MEM_LOG_DIRTY_PAGES on a device BAR slot",
                        source,
                    }),
                })?;
        }
        self.on = on;
        Ok(())
    }

    /// Calls `mark(first_page, words)` with each slot's log (re-protecting what it reports);
    /// `scratch` is reused between calls.
    pub fn harvest(
        &mut self,
        mark: &mut dyn FnMut(u64, &[u64]),
        scratch: &mut Vec<u64>,
    ) -> Result<(), TrackingError> {
        for s in &self.slots {
            *scratch = self
                .vm
                .fd()
                .get_dirty_log(s.slot, s.size as usize)
                .map_err(TrackingError::kvm(
                    self.kind,
                    "KVM_GET_DIRTY_LOG (BAR slot)",
                ))?;
            if self.kind == TrackerKind::BitmapManual && scratch.iter().any(|&w| w != 0) {
                let pages = s.size / crate::memory::PAGE_SIZE;
                let n = u32::try_from(pages).map_err(|_| TrackingError::Other {
                    backend: self.kind,
                    message: format!("BAR slot {} of {pages} pages is too large", s.slot),
                })?;
                kvm_dirty::clear_dirty_log(self.vm.fd(), s.slot, 0, n, scratch).map_err(
                    TrackingError::sys(self.kind, "KVM_CLEAR_DIRTY_LOG (BAR slot)"),
                )?;
            }
            mark(s.first_page, scratch);
        }
        Ok(())
    }

    pub fn stop(&mut self) -> Result<(), TrackingError> {
        if self.on {
            self.set(false)?;
        }
        Ok(())
    }
}

impl Drop for BarLog {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("{e}");
        }
    }
}
