//! `memslot-exits`: the exit model on stock kernels. A missing chunk of guest RAM is simply in
//! no memslot, so a vCPU access to it leaves `KVM_RUN` (PLATFORM.md §8): a load or store as an
//! MMIO exit with the GPA, an instruction fetch as an emulation failure without one (the vCPU
//! translates its RIP). The vCPU thread gets the chunk's pages into the memory file, adds a
//! memslot for the chunk, completes the trapped access against memory and re-enters.
//!
//! What this cannot see, and how it is covered:
//! - KVM's own accesses (kvmclock, steal time, PV EOI; guest page-table walks under shadow
//!   paging; the frames it pushes when it delivers an event) need a memslot: a page-table page,
//!   a PV page or a stack page that is missing makes the guest see a fault that never happened
//!   (a double fault for a stack), with no exit at all. Such pages must be present before the
//!   vCPUs run; `eager_pages` finds them (see `keep_present`).
//! - The VMM's own accesses go through the host mapping of the memory file, where userfaultfd
//!   MISSING stays registered (as KVM Userfault intends for non-vCPU accesses).
//! - The memslot count is limited (32764 here): below `soft_limit` slots each chunk gets its own
//!   slot (cheapest add); above it, a chunk is widened to reach its nearest unpinned mapped
//!   neighbour (up to `MAX_WIDEN` away, bringing in the pages between) and merged with it
//!   (delete + create). So the count stays near the soft limit plus the pinned runs plus one
//!   isolated chunk per 2 MiB at worst. `KVM_X86_QUIRK_SLOT_ZAP_ALL` is disabled when KVM allows it, so a delete zaps only
//!   that slot's shadow pages instead of the whole guest's.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kvm_bindings::kvm_enable_cap;

use super::exits::{ExitBase, ExitPager, ExitStats, Fetch, Waiters};
use super::{DemandPager, Fault, Installed, UffdMissing, UserfaultError};
use crate::memory::RamRange;
use crate::vstate::resources::memslots::{MemSlotError, SlotKind};
use crate::vstate::vm::Vm;

const PAGE: u64 = 4096;
/// Slots used before chunks start being merged with their neighbours.
pub const DEFAULT_SOFT_LIMIT: usize = 1024;
/// Above the soft limit, a chunk is widened across at most this much unmapped memory to reach
/// a neighbour it can merge with: those pages are brought in too (they are the guest's real
/// contents, so mapping them is correct), trading extra fetches for a bounded slot count.
const MAX_WIDEN: u64 = 2 << 20;

/// Chunk sizes accepted (bytes): powers of two from 4 KiB to 2 MiB.
pub fn check_chunk(bytes: u64) -> Result<u64, UserfaultError> {
    if bytes.is_power_of_two() && (PAGE..=2 << 20).contains(&bytes) {
        Ok(bytes)
    } else {
        Err(UserfaultError::BadChunk { bytes })
    }
}

#[derive(Clone, Copy)]
struct Run {
    /// The run's memslot, a `DemandChunk` in the VM's registry.
    slot: u32,
    size: u64,
    /// Holds pages KVM itself touches (page tables, descriptor tables, PV pages): never
    /// deleted or merged, since KVM's own accesses fail silently while a slot is being
    /// replaced.
    pinned: bool,
}

struct Slots {
    /// Mapped runs by start GPA.
    runs: BTreeMap<u64, Run>,
    disarmed: bool,
    /// The original one-slot-per-range layout is back (`settle_layout`).
    settled: bool,
}

struct Inner {
    base: ExitBase,
    vm: Arc<Vm>,
    ranges: Vec<(RamRange, u64)>,
    chunk: u64,
    soft_limit: usize,
    slots: Mutex<Slots>,
    fetched: AtomicU64,
    mapped_only: AtomicU64,
    raced: AtomicU64,
    merges: AtomicU64,
    max_slots: AtomicU64,
    ifetch: AtomicU64,
    decoded: AtomicU64,
}

pub struct MemslotExits {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemslotExits {
    /// Takes over the VM's RAM memslots: only chunks with no pending page stay mapped for the
    /// vCPUs. Call before any vCPU runs, after the pending pages were punched out of `memfd`.
    pub fn arm(
        vm: Arc<Vm>,
        ranges: &[RamRange],
        host_addrs: &[u64],
        memfd: &File,
        pending: &[(u64, u64)],
        chunk: u64,
        soft_limit: usize,
    ) -> Result<MemslotExits, UserfaultError> {
        let chunk = check_chunk(chunk)?;
        let waiters = Arc::new(Waiters::new(ranges, memfd, pending)?);
        disable_zap_all(&vm);
        let uffd = UffdMissing::arm(ranges, host_addrs)?;
        let inner = Inner {
            base: ExitBase { uffd, waiters },
            vm,
            ranges: ranges
                .iter()
                .copied()
                .zip(host_addrs.iter().copied())
                .collect(),
            chunk,
            soft_limit: soft_limit.max(1),
            slots: Mutex::new(Slots {
                runs: BTreeMap::new(),
                disarmed: false,
                settled: false,
            }),
            fetched: AtomicU64::new(0),
            mapped_only: AtomicU64::new(0),
            raced: AtomicU64::new(0),
            merges: AtomicU64::new(0),
            max_slots: AtomicU64::new(0),
            ifetch: AtomicU64::new(0),
            decoded: AtomicU64::new(0),
        };
        // Runs holding pages KVM touches get pinned by `keep_mapped` before the vCPUs run.
        {
            let mut s = lock(&inner.slots);
            let memslots = inner.vm.memslots();
            for ram in memslots.ram() {
                memslots
                    .remove(ram.id)
                    .map_err(memslot_error("taking over the RAM memslots"))?;
            }
            for (r, _) in &inner.ranges {
                let mut run: Option<(u64, u64)> = None;
                let mut at = r.gpa;
                while at < r.end() {
                    let end = (at + chunk).min(r.end());
                    let present = inner
                        .base
                        .waiters
                        .missing_runs(at, (end - at) / PAGE)
                        .is_empty();
                    match (&mut run, present) {
                        (Some((_, size)), true) => *size += end - at,
                        (None, true) => run = Some((at, end - at)),
                        (Some(_), false) => {
                            if let Some((g, n)) = run.take() {
                                inner.add_slot(&mut s, g, n, false)?;
                            }
                        }
                        (None, false) => {}
                    }
                    at = end;
                }
                if let Some((g, n)) = run {
                    inner.add_slot(&mut s, g, n, false)?;
                }
            }
        }
        tracing::info!(
            "memslot-exits: {} pages missing, {} KiB chunks, {} memslots mapped",
            inner.base.waiters.remaining(),
            chunk >> 10,
            lock(&inner.slots).runs.len()
        );
        Ok(MemslotExits {
            inner: Arc::new(inner),
        })
    }
}

/// `map_err` adapter for a registry call that failed while doing `what`.
fn memslot_error(what: &'static str) -> impl FnOnce(MemSlotError) -> UserfaultError {
    move |source| UserfaultError::Memslot { what, source }
}

/// Without this quirk disabled, deleting any memslot zaps the shadow pages of the whole guest
/// (measured: a re-read of 3000 pages went from 61 us to 10 ms, PLATFORM.md §8).
fn disable_zap_all(vm: &Vm) {
    let quirks = vm
        .fd()
        .check_extension_raw(kvm_bindings::KVM_CAP_DISABLE_QUIRKS2 as libc::c_ulong);
    let zap = kvm_bindings::KVM_X86_QUIRK_SLOT_ZAP_ALL as i32;
    if quirks & zap == 0 {
        tracing::info!(
            "memslot-exits: KVM cannot disable KVM_X86_QUIRK_SLOT_ZAP_ALL: each memslot delete \
             zaps the whole guest's shadow pages"
        );
        return;
    }
    let cap = kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_DISABLE_QUIRKS2,
        args: [zap as u64, 0, 0, 0],
        ..Default::default()
    };
    if let Err(e) = vm.fd().enable_cap(&cap) {
        tracing::info!("memslot-exits: disabling KVM_X86_QUIRK_SLOT_ZAP_ALL failed: {e}");
    }
}

impl Inner {
    fn host_of(&self, gpa: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|(r, _)| r.contains(gpa))
            .map(|(r, h)| h + (gpa - r.gpa))
    }

    /// Registers [gpa, gpa+size) of guest RAM as a memslot of `kind`; returns its id.
    fn map_run(&self, kind: SlotKind, gpa: u64, size: u64) -> Result<u32, UserfaultError> {
        let host = self
            .host_of(gpa)
            .ok_or(UserfaultError::NotRam { gpa, len: size })?;
        // SAFETY: the host range lies inside the guest-RAM mapping (found by `host_of`, and a
        // run never crosses a RAM range), which outlives the VM.
        let added = unsafe { self.vm.memslots().add(kind, gpa, size, host, 0) };
        added.map(|slot| slot.id).map_err(|source| {
            let what = match source {
                MemSlotError::Exhausted { .. } => {
                    "guest RAM is too fragmented for this chunk size (use a larger --demand-chunk)"
                }
                _ => "mapping guest RAM for the vCPUs",
            };
            UserfaultError::Memslot { what, source }
        })
    }

    fn add_slot(
        &self,
        s: &mut Slots,
        gpa: u64,
        size: u64,
        pinned: bool,
    ) -> Result<(), UserfaultError> {
        let slot = self.map_run(SlotKind::DemandChunk, gpa, size)?;
        s.runs.insert(gpa, Run { slot, size, pinned });
        self.max_slots
            .fetch_max(s.runs.len() as u64, Ordering::AcqRel);
        Ok(())
    }

    fn remove_run(&self, s: &mut Slots, start: u64) -> Result<u64, UserfaultError> {
        let Some(run) = s.runs.remove(&start) else {
            return Ok(0);
        };
        self.vm
            .memslots()
            .remove(run.slot)
            .map_err(memslot_error("unmapping a demand chunk"))?;
        Ok(run.size)
    }

    fn is_mapped(s: &Slots, gpa: u64) -> bool {
        s.disarmed
            || s.runs
                .range(..=gpa)
                .next_back()
                .is_some_and(|(start, run)| gpa < start + run.size)
    }

    fn waiters_remaining(&self) -> u64 {
        self.base.waiters.remaining()
    }

    /// The pieces of [start, end) no run maps, as (gpa, size).
    fn unmapped_parts(s: &Slots, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut parts = Vec::new();
        let mut at = start;
        if let Some((g, run)) = s.runs.range(..start).next_back() {
            at = at.max(g + run.size);
        }
        for (&g, run) in s.runs.range(start..end) {
            if g > at {
                parts.push((at, g - at));
            }
            at = at.max(g + run.size);
        }
        if at < end {
            parts.push((at, end - at));
        }
        parts
    }

    /// The chunk holding `gpa`, clipped to its RAM range.
    fn chunk_of(&self, gpa: u64) -> Option<(u64, u64)> {
        let (r, _) = self.ranges.iter().find(|(r, _)| r.contains(gpa))?;
        let start = r.gpa + (gpa - r.gpa) / self.chunk * self.chunk;
        Some((start, (start + self.chunk).min(r.end())))
    }

    /// Maps [start, end) for the vCPUs, merging with unpinned neighbours once many slots are
    /// used. While a merge replaces slots, vCPU accesses to them exit and are completed against
    /// memory (they find the range mapped under the lock), and KVM's own accesses would fail,
    /// which is why pages KVM touches are pinned in slots of their own.
    fn map_chunk(&self, start: u64, end: u64, pinned: bool) -> Result<(), UserfaultError> {
        let mut s = lock(&self.slots);
        let parts = Self::unmapped_parts(&s, start, end);
        if parts.first() != Some(&(start, end - start)) {
            // Another vCPU mapped part of it meanwhile (a widened range can overlap): map what
            // is left as it is.
            for (g, n) in parts {
                self.add_slot(&mut s, g, n, pinned)?;
            }
            return Ok(());
        }
        if s.runs.len() < self.soft_limit || pinned {
            return self.add_slot(&mut s, start, end - start, pinned);
        }
        let left = s
            .runs
            .range(..start)
            .next_back()
            .filter(|(g, run)| *g + run.size == start && !run.pinned)
            .map(|(g, _)| *g);
        let right = s.runs.get(&end).filter(|run| !run.pinned).map(|_| end);
        let mut from = start;
        let mut to = end;
        if let Some(l) = left {
            from = l;
            self.remove_run(&mut s, l)?;
        }
        if let Some(r) = right {
            to = end + self.remove_run(&mut s, r)?;
        }
        if left.is_some() || right.is_some() {
            self.merges.fetch_add(1, Ordering::AcqRel);
        }
        self.add_slot(&mut s, from, to - from, false)
    }

    /// Above the soft limit: [start, end) stretched to touch its nearest unpinned mapped
    /// neighbour, when that is at most `MAX_WIDEN` away (see `MAX_WIDEN`).
    fn widen(&self, start: u64, end: u64) -> (u64, u64) {
        let s = lock(&self.slots);
        if s.runs.len() < self.soft_limit {
            return (start, end);
        }
        let Some((r, _)) = self.ranges.iter().find(|(r, _)| r.contains(start)) else {
            return (start, end);
        };
        let left = s
            .runs
            .range(r.gpa..start)
            .next_back()
            .filter(|(g, run)| !run.pinned && *g + run.size <= start)
            .map(|(g, run)| start - (g + run.size));
        let right = s
            .runs
            .range(end..r.end())
            .next()
            .filter(|(_, run)| !run.pinned)
            .map(|(g, _)| g - end);
        match (left, right) {
            (Some(l), Some(rt)) if l <= rt && l <= MAX_WIDEN => (start - l, end),
            (Some(_), Some(rt)) if rt <= MAX_WIDEN => (start, end + rt),
            (Some(l), None) if l <= MAX_WIDEN => (start - l, end),
            (None, Some(rt)) if rt <= MAX_WIDEN => (start, end + rt),
            _ => (start, end),
        }
    }

    fn bring_and_map(&self, gpa: u64, len: u64, pinned: bool) -> Result<bool, UserfaultError> {
        if !self.covers(gpa) {
            return Ok(false);
        }
        let last = gpa + len.max(1) - 1;
        let mut at = gpa;
        loop {
            let Some((start, end)) = self.chunk_of(at) else {
                return Ok(false);
            };
            let (start, end) = if pinned {
                (start, end)
            } else {
                self.widen(start, end)
            };
            let already = {
                let mut s = lock(&self.slots);
                let mapped = Self::is_mapped(&s, start);
                if mapped && pinned {
                    if let Some((_, run)) = s.runs.range_mut(..=start).next_back() {
                        run.pinned = true;
                    }
                }
                mapped
            };
            if already {
                if !pinned {
                    self.raced.fetch_add(1, Ordering::AcqRel);
                }
            } else {
                if self
                    .base
                    .waiters
                    .bring_in(start, (end - start) / PAGE, false)?
                {
                    self.fetched.fetch_add(1, Ordering::AcqRel);
                } else {
                    self.mapped_only.fetch_add(1, Ordering::AcqRel);
                }
                self.map_chunk(start, end, pinned)?;
            }
            if last < end {
                return Ok(true);
            }
            at = end;
        }
    }
}

impl ExitPager for Inner {
    fn name(&self) -> &'static str {
        super::DemandKind::MemslotExits.name()
    }

    fn covers(&self, gpa: u64) -> bool {
        self.base.waiters.covers(gpa)
    }

    fn resolve(&self, _vcpu: u8, gpa: u64, len: u64) -> Result<bool, UserfaultError> {
        self.bring_and_map(gpa, len, false)
    }

    fn keep_mapped(&self, gpa: u64) -> Result<bool, UserfaultError> {
        self.bring_and_map(gpa, PAGE, true)
    }

    fn mapped(&self, gpa: u64) -> bool {
        Self::is_mapped(&lock(&self.slots), gpa)
    }

    fn layout_settled(&self) -> bool {
        lock(&self.slots).settled
    }

    fn settle_layout(&self) -> Result<(), UserfaultError> {
        if self.waiters_remaining() != 0 {
            return Err(UserfaultError::Unsupported(format!(
                "{} pages are still missing",
                self.waiters_remaining()
            )));
        }
        let mut s = lock(&self.slots);
        if s.settled {
            return Ok(());
        }
        s.disarmed = true;
        let starts: Vec<u64> = s.runs.keys().copied().collect();
        for start in starts {
            self.remove_run(&mut s, start)?;
        }
        for (r, _) in &self.ranges {
            self.map_run(SlotKind::Ram, r.gpa, r.size)?;
        }
        s.settled = true;
        Ok(())
    }

    fn pin_mapped(&self) {
        for run in lock(&self.slots).runs.values_mut() {
            run.pinned = true;
        }
    }

    fn note_ifetch(&self) {
        self.ifetch.fetch_add(1, Ordering::AcqRel);
    }

    fn note_decoded(&self) {
        self.decoded.fetch_add(1, Ordering::AcqRel);
    }

    fn complete_read(&self, gpa: u64, data: &mut [u8]) -> Result<(), UserfaultError> {
        self.base.waiters.read(gpa, data)
    }

    fn complete_write(&self, gpa: u64, data: &[u8]) -> Result<(), UserfaultError> {
        self.base.waiters.write(gpa, data)
    }

    fn set_fetch(&self, fetch: Arc<dyn Fetch>) {
        let _ = self.base.waiters.fetch.set(fetch);
    }

    fn stats(&self) -> ExitStats {
        ExitStats {
            fetched: self.fetched.load(Ordering::Acquire),
            mapped_only: self.mapped_only.load(Ordering::Acquire),
            raced: self.raced.load(Ordering::Acquire),
            ifetch: self.ifetch.load(Ordering::Acquire),
            decoded: self.decoded.load(Ordering::Acquire),
            memslots_now: lock(&self.slots).runs.len() as u64,
            memslots_max: self.max_slots.load(Ordering::Acquire),
            merges: self.merges.load(Ordering::Acquire),
        }
    }
}

#[cfg(test)]
mod tests;

impl DemandPager for MemslotExits {
    fn name(&self) -> &'static str {
        super::DemandKind::MemslotExits.name()
    }

    fn next_fault(&self, timeout: Duration) -> Result<Option<Fault>, UserfaultError> {
        self.inner.base.next_fault(timeout)
    }

    fn install(&self, gpa: u64, data: &[u8]) -> Result<Installed, UserfaultError> {
        self.inner.base.install(gpa, data)
    }

    fn install_zero(&self, gpa: u64, pages: u64) -> Result<Installed, UserfaultError> {
        self.inner.base.install_zero(gpa, pages)
    }

    fn wake(&self, gpa: u64, pages: u64) -> Result<(), UserfaultError> {
        self.inner.base.uffd.wake(gpa, pages)
    }

    fn note_zero(&self, gpa: u64, pages: u64) {
        self.inner.base.waiters.mark_present(gpa, pages);
    }

    /// Every page is present: map every gap between the mapped runs with one slot each.
    /// Only adds slots (at most one more than there are runs): replacing them with the
    /// original one-per-range layout would open a window in which KVM's own accesses fail
    /// (see `map_chunk`).
    fn disarm(&self) -> Result<(), UserfaultError> {
        self.inner.base.uffd.disarm()?;
        let inner = &self.inner;
        if inner.base.waiters.remaining() != 0 {
            return Err(UserfaultError::Unsupported(format!(
                "memslot-exits disarmed with {} pages still missing",
                inner.base.waiters.remaining()
            )));
        }
        let mut s = lock(&inner.slots);
        for (r, _) in &inner.ranges {
            let mut gaps = Vec::new();
            let mut at = r.gpa;
            for (&start, run) in s.runs.range(r.gpa..r.end()) {
                if start > at {
                    gaps.push((at, start - at));
                }
                at = at.max(start + run.size);
            }
            if at < r.end() {
                gaps.push((at, r.end() - at));
            }
            for (g, n) in gaps {
                inner.add_slot(&mut s, g, n, false)?;
            }
        }
        s.disarmed = true;
        Ok(())
    }

    fn exits(&self) -> Option<Arc<dyn ExitPager>> {
        Some(self.inner.clone())
    }
}
