//! The VM's memory-slot registry: the one owner of KVM memslot ids.
//!
//! Guest RAM, device BARs mapped for the guest and the chunks a demand pager maps one at a time
//! all live in the same KVM id space (`KVM_CAP_NR_MEMSLOTS` ids per address space). Whoever
//! adds a slot asks the registry for an id; whoever needs to know which slots exist (dirty
//! trackers, dirty-ring entries, migration, snapshots) asks the registry which ones there are,
//! never assumes a numbering. Freed ids are reused lowest first, so a VM that only ever
//! registers its RAM keeps the dense ids it always had.
//!
//! Every change goes to KVM under the registry's lock, so the table and KVM never disagree
//! (a failed ioctl leaves the table as it was).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Cap, VmFd};

use crate::sys::kvm_userfault::{self as uf, UserfaultBitmap, KVM_MEM_USERFAULT};
use crate::sys::SysError;

/// KVM's memslot count before `KVM_CAP_NR_MEMSLOTS` existed (a kernel that answers 0).
const LEGACY_NR_MEMSLOTS: u32 = 32;

/// What a memslot maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SlotKind {
    /// Guest RAM: one slot per RAM range while the layout is settled; dirty logging applies.
    Ram,
    /// A device BAR mapped straight into the guest (passthrough): never dirty-logged by KVM.
    DeviceBar,
    /// A piece of guest RAM mapped by a demand pager (`memslot-exits`) while pages are missing.
    DemandChunk,
}

/// One registered memslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub id: u32,
    pub kind: SlotKind,
    pub gpa: u64,
    pub size: u64,
    /// Host virtual address of the slot's first byte.
    pub host: u64,
    /// `KVM_MEM_*` flags as KVM has them now.
    pub flags: u32,
    /// Address of the KVM Userfault bitmap while `KVM_MEM_USERFAULT` is in `flags` (0 otherwise):
    /// every later flag change must hand KVM the same bitmap again.
    userfault_bitmap: u64,
}

impl Slot {
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa < self.end()
    }
    pub fn dirty_logging(&self) -> bool {
        self.flags & KVM_MEM_LOG_DIRTY_PAGES != 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemSlotError {
    #[error(
        "out of memslots: all {limit} ids KVM allows are in use (asked for a {kind:?} slot at \
         0x{gpa:x})"
    )]
    Exhausted {
        limit: u32,
        kind: SlotKind,
        gpa: u64,
    },
    #[error("a {kind:?} slot at 0x{gpa:x}+0x{size:x} overlaps slot {other:?}")]
    Overlap {
        kind: SlotKind,
        gpa: u64,
        size: u64,
        other: Slot,
    },
    #[error("a {kind:?} slot at 0x{gpa:x}+0x{size:x} is not a whole number of 4 KiB pages")]
    Unaligned { kind: SlotKind, gpa: u64, size: u64 },
    #[error("no memslot {0} is registered")]
    NoSuchSlot(u32),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {id} ({kind:?}) at 0x{gpa:x}+0x{size:x} failed: {source}")]
    Kvm {
        id: u32,
        kind: SlotKind,
        gpa: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_MEM_USERFAULT on slot {id} at 0x{gpa:x}+0x{size:x}: {source}")]
    Userfault {
        id: u32,
        gpa: u64,
        size: u64,
        source: SysError,
    },
}

const PAGE: u64 = 4096;

/// The bookkeeping alone (no KVM): ids, their slots, and a GPA index for lookups.
#[derive(Debug)]
struct Table {
    slots: BTreeMap<u32, Slot>,
    /// Start GPA -> id; slots never overlap, so this orders them.
    by_gpa: BTreeMap<u64, u32>,
    /// Ids handed out before and released since.
    free: BTreeSet<u32>,
    /// Lowest id never handed out.
    next: u32,
    limit: u32,
}

impl Table {
    fn new(limit: u32) -> Table {
        Table {
            slots: BTreeMap::new(),
            by_gpa: BTreeMap::new(),
            free: BTreeSet::new(),
            next: 0,
            limit,
        }
    }

    /// The id the next slot will get, if any is left (not taken yet).
    fn peek_id(&self) -> Option<u32> {
        match self.free.first() {
            Some(&id) => Some(id),
            None if self.next < self.limit => Some(self.next),
            None => None,
        }
    }

    fn at(&self, gpa: u64) -> Option<&Slot> {
        let (_, id) = self.by_gpa.range(..=gpa).next_back()?;
        self.slots.get(id).filter(|s| s.contains(gpa))
    }

    /// A registered slot sharing a byte with [gpa, gpa+size).
    fn overlapping(&self, gpa: u64, size: u64) -> Option<&Slot> {
        let end = gpa.saturating_add(size);
        self.at(gpa).or_else(|| {
            let (_, id) = self.by_gpa.range(gpa..end).next()?;
            self.slots.get(id)
        })
    }

    /// Records `slot` under the id `peek_id` gave.
    fn insert(&mut self, slot: Slot) {
        if !self.free.remove(&slot.id) {
            self.next = self.next.max(slot.id + 1);
        }
        self.by_gpa.insert(slot.gpa, slot.id);
        self.slots.insert(slot.id, slot);
    }

    fn remove(&mut self, id: u32) -> Option<Slot> {
        let slot = self.slots.remove(&id)?;
        self.by_gpa.remove(&slot.gpa);
        self.free.insert(id);
        Some(slot)
    }

    fn check_new(&self, kind: SlotKind, gpa: u64, size: u64) -> Result<u32, MemSlotError> {
        if size == 0 || size % PAGE != 0 || gpa % PAGE != 0 || gpa.checked_add(size).is_none() {
            return Err(MemSlotError::Unaligned { kind, gpa, size });
        }
        if let Some(other) = self.overlapping(gpa, size) {
            return Err(MemSlotError::Overlap {
                kind,
                gpa,
                size,
                other: *other,
            });
        }
        self.peek_id().ok_or(MemSlotError::Exhausted {
            limit: self.limit,
            kind,
            gpa,
        })
    }
}

/// The registry. Shared by vCPU threads, demand pagers and trackers through the `Vm`, hence the
/// lock inside.
pub struct MemSlots {
    fd: Arc<VmFd>,
    table: Mutex<Table>,
}

impl MemSlots {
    /// A registry for the VM `fd`, with as many ids as its KVM allows.
    pub fn new(fd: Arc<VmFd>) -> MemSlots {
        let nr = fd.check_extension_int(Cap::NrMemslots);
        let limit = u32::try_from(nr)
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or(LEGACY_NR_MEMSLOTS);
        Self::with_limit(fd, limit)
    }

    /// A registry that hands out at most `limit` ids (below what KVM allows: tests, reserves).
    pub fn with_limit(fd: Arc<VmFd>, limit: u32) -> MemSlots {
        MemSlots {
            fd,
            table: Mutex::new(Table::new(limit)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn limit(&self) -> u32 {
        self.lock().limit
    }

    /// Registers [gpa, gpa+size) backed by host memory at `host` under a fresh id.
    ///
    /// # Safety
    /// `host..host+size` must be a mapping that stays valid until the slot is removed or the VM
    /// is dropped (KVM maps it into the guest and writes it on the guest's behalf).
    pub unsafe fn add(
        &self,
        kind: SlotKind,
        gpa: u64,
        size: u64,
        host: u64,
        flags: u32,
    ) -> Result<Slot, MemSlotError> {
        let mut t = self.lock();
        let id = t.check_new(kind, gpa, size)?;
        let slot = Slot {
            id,
            kind,
            gpa,
            size,
            host,
            flags: flags & !KVM_MEM_USERFAULT,
            userfault_bitmap: 0,
        };
        self.send(&slot)?;
        t.insert(slot);
        Ok(slot)
    }

    /// Deletes slot `id` in KVM and frees the id.
    pub fn remove(&self, id: u32) -> Result<Slot, MemSlotError> {
        let mut t = self.lock();
        let slot = *t.slots.get(&id).ok_or(MemSlotError::NoSuchSlot(id))?;
        let gone = kvm_userspace_memory_region {
            slot: id,
            ..Default::default()
        };
        // SAFETY: a zero-sized region deletes the slot; it hands KVM no memory.
        unsafe { self.fd.set_user_memory_region(gone) }.map_err(|source| MemSlotError::Kvm {
            id,
            kind: slot.kind,
            gpa: slot.gpa,
            size: 0,
            source,
        })?;
        t.remove(id);
        Ok(slot)
    }

    /// Replaces the `KVM_MEM_*` flags of slot `id` (KVM allows changing only the flags of a
    /// live slot). `KVM_MEM_USERFAULT` is kept as it is: `arm_userfault` and
    /// `disarm_userfault` own it, since it needs a bitmap.
    pub fn set_flags(&self, id: u32, flags: u32) -> Result<(), MemSlotError> {
        let mut t = self.lock();
        let slot = t.slots.get_mut(&id).ok_or(MemSlotError::NoSuchSlot(id))?;
        self.update(slot, |s| {
            s.flags = (flags & !KVM_MEM_USERFAULT) | (s.flags & KVM_MEM_USERFAULT)
        })
    }

    /// Turns `KVM_MEM_LOG_DIRTY_PAGES` on or off for every RAM slot. Turning logging on
    /// write-protects the slot (or, with manual protect INITIALLY_SET, marks it all dirty).
    /// Device BARs and demand chunks are left alone.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), MemSlotError> {
        let mut t = self.lock();
        for slot in t.slots.values_mut().filter(|s| s.kind == SlotKind::Ram) {
            if slot.dirty_logging() != on {
                self.update(slot, |s| s.flags ^= KVM_MEM_LOG_DIRTY_PAGES)?;
            }
        }
        Ok(())
    }

    /// Re-registers slot `id` with `KVM_MEM_USERFAULT` and `bitmap` (KVM Userfault, see
    /// `sys::kvm_userfault`): vCPU accesses to pages marked in it exit to userspace.
    ///
    /// # Safety
    /// `bitmap` must stay alive and unmoved until `disarm_userfault(id)` or `remove(id)` (KVM
    /// reads it while vCPUs run), and must cover the slot's pages.
    pub unsafe fn arm_userfault(
        &self,
        id: u32,
        bitmap: &UserfaultBitmap,
    ) -> Result<(), MemSlotError> {
        let mut t = self.lock();
        let slot = t.slots.get_mut(&id).ok_or(MemSlotError::NoSuchSlot(id))?;
        if slot.size.div_ceil(PAGE) > bitmap.pages() {
            return Err(MemSlotError::Userfault {
                id,
                gpa: slot.gpa,
                size: slot.size,
                source: SysError::Invalid(format!(
                    "a userfault bitmap of {} pages cannot cover the slot",
                    bitmap.pages()
                )),
            });
        }
        self.update(slot, |s| {
            s.flags |= KVM_MEM_USERFAULT;
            s.userfault_bitmap = bitmap.as_ptr();
        })
    }

    /// Takes `KVM_MEM_USERFAULT` off slot `id` (KVM stops reading its bitmap).
    pub fn disarm_userfault(&self, id: u32) -> Result<(), MemSlotError> {
        let mut t = self.lock();
        let slot = t.slots.get_mut(&id).ok_or(MemSlotError::NoSuchSlot(id))?;
        self.update(slot, |s| {
            s.flags &= !KVM_MEM_USERFAULT;
            s.userfault_bitmap = 0;
        })
    }

    /// Applies `change` to a copy of `slot`, tells KVM, and keeps the change only if KVM took it.
    fn update(&self, slot: &mut Slot, change: impl FnOnce(&mut Slot)) -> Result<(), MemSlotError> {
        let mut updated = *slot;
        change(&mut updated);
        if updated != *slot {
            self.send(&updated)?;
            *slot = updated;
        }
        Ok(())
    }

    /// Registers `slot` in KVM as it stands (a new slot, or new flags for a live one).
    fn send(&self, slot: &Slot) -> Result<(), MemSlotError> {
        if slot.flags & KVM_MEM_USERFAULT != 0 {
            let region = uf::UserspaceMemoryRegion2 {
                slot: slot.id,
                flags: slot.flags,
                guest_phys_addr: slot.gpa,
                memory_size: slot.size,
                userspace_addr: slot.host,
                userfault_bitmap: slot.userfault_bitmap,
                ..Default::default()
            };
            // SAFETY: the mapping was vouched for by `add`'s caller and the bitmap by
            // `arm_userfault`'s, both for as long as the slot keeps the flag.
            return unsafe { uf::set_region2(&self.fd, &region) }.map_err(|source| {
                MemSlotError::Userfault {
                    id: slot.id,
                    gpa: slot.gpa,
                    size: slot.size,
                    source,
                }
            });
        }
        let region = kvm_userspace_memory_region {
            slot: slot.id,
            flags: slot.flags,
            guest_phys_addr: slot.gpa,
            memory_size: slot.size,
            userspace_addr: slot.host,
        };
        // SAFETY: the mapping was vouched for by `add`'s caller for the slot's lifetime.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| MemSlotError::Kvm {
            id: slot.id,
            kind: slot.kind,
            gpa: slot.gpa,
            size: slot.size,
            source,
        })
    }

    /// Slot `id`, if registered.
    pub fn get(&self, id: u32) -> Option<Slot> {
        self.lock().slots.get(&id).copied()
    }

    /// The slot holding `gpa`, if any.
    pub fn at(&self, gpa: u64) -> Option<Slot> {
        self.lock().at(gpa).copied()
    }

    /// The slots of `kind`, in GPA order.
    pub fn of_kind(&self, kind: SlotKind) -> Vec<Slot> {
        let t = self.lock();
        t.by_gpa
            .values()
            .filter_map(|id| t.slots.get(id))
            .filter(|s| s.kind == kind)
            .copied()
            .collect()
    }

    /// The RAM slots in GPA order: what dirty tracking, migration and snapshots walk.
    pub fn ram(&self) -> Vec<Slot> {
        self.of_kind(SlotKind::Ram)
    }

    /// How many slots are registered (all kinds).
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
