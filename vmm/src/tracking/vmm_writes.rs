//! ORs the VMM's own writes into every backend's harvest. KVM logs only vCPU stores, and device
//! emulation writing through the VMM's mapping is invisible to it (TRACKING.md); vm-memory marks
//! those writes in each region's `AtomicBitmap`, which this wrapper drains on every harvest.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{DirtySet, DirtyTracker, TrackedSlot, TrackerKind, TrackingError};
use crate::memory::GuestMemory;

pub struct WithVmmWrites {
    inner: Box<dyn DirtyTracker>,
    memory: GuestMemory,
    /// Index into the dirty set's slots for each memory region, in region order.
    region_slot: Vec<Option<usize>>,
}

impl WithVmmWrites {
    pub fn new(inner: Box<dyn DirtyTracker>, memory: GuestMemory, slots: Vec<TrackedSlot>) -> Self {
        let region_slot = memory
            .iter()
            .map(|r| slots.iter().position(|s| s.gpa == r.start_addr().0))
            .collect();
        WithVmmWrites {
            inner,
            memory,
            region_slot,
        }
    }

    /// Drops what the VMM wrote before tracking began.
    fn reset_vmm_bitmaps(&self) {
        for region in self.memory.iter() {
            // The mmap region's own `AtomicBitmap` (the trait's `bitmap()` is a slice view).
            std::ops::Deref::deref(region).bitmap().reset();
        }
    }
}

impl DirtyTracker for WithVmmWrites {
    fn kind(&self) -> TrackerKind {
        self.inner.kind()
    }

    fn start(&mut self) -> Result<(), TrackingError> {
        self.reset_vmm_bitmaps();
        self.inner.start()
    }

    fn harvest(&mut self, into: &mut DirtySet) -> Result<(), TrackingError> {
        // The backend first: its harvest re-arms the kernel. VMM writes are drained after, so a
        // write racing with the harvest lands in this round or the next, never in neither.
        self.inner.harvest(into)?;
        for (region, slot) in self.memory.iter().zip(&self.region_slot) {
            // Usually nothing: device writes are rare, and an untouched bitmap costs one load.
            if let (Some(words), Some(index)) =
                (std::ops::Deref::deref(region).bitmap().take(), slot)
            {
                into.or_words(*index, &words);
            }
        }
        Ok(())
    }

    fn harvest_raw(&mut self) -> Result<u64, TrackingError> {
        self.inner.harvest_raw()
    }

    fn stop(&mut self) -> Result<(), TrackingError> {
        self.inner.stop()
    }

    fn memory_overhead_bytes(&self) -> u64 {
        let vmm_bitmaps: u64 = self
            .memory
            .iter()
            .map(|r| r.len().div_ceil(4096 * 64) * 8)
            .sum();
        self.inner.memory_overhead_bytes() + vmm_bitmaps
    }

    fn background_cpu_ns(&self) -> u64 {
        self.inner.background_cpu_ns()
    }
}
