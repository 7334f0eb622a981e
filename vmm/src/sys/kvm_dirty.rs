//! KVM dirty tracking beyond kvm-ioctls: manual dirty-log protection with `KVM_CLEAR_DIRTY_LOG`,
//! and the per-vCPU dirty ring (mmap, harvest, `KVM_RESET_DIRTY_RINGS`). TRACKING.md has the
//! rules these follow.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_gfn, kvm_enable_cap,
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref};

use super::{page_size, SysError};

/// Private so the generated ioctl-number functions do not become public API.
mod nr {
    use kvm_bindings::{kvm_clear_dirty_log, KVMIO};
    vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}

/// GET_DIRTY_LOG stops re-protecting; CLEAR_DIRTY_LOG does it per range.
pub const MANUAL_PROTECT_ENABLE: u64 = 1;
/// Dirty bitmaps start all ones, so protection can be added gradually with CLEAR_DIRTY_LOG.
pub const MANUAL_PROTECT_INITIALLY_SET: u64 = 2;

/// Size of `struct kvm_dirty_gfn`, one ring entry.
pub const DIRTY_GFN_SIZE: usize = 16;
/// Set by KVM when it publishes an entry.
pub const DIRTY_GFN_F_DIRTY: u32 = 1;
/// Set by userspace once it has harvested an entry; KVM_RESET_DIRTY_RINGS then recycles it.
pub const DIRTY_GFN_F_RESET: u32 = 2;

const _: () = assert!(std::mem::size_of::<kvm_dirty_gfn>() == DIRTY_GFN_SIZE);

/// KVM_CHECK_EXTENSION returns a negative value only on a broken fd; treat that as "absent".
fn check(vm: &VmFd, cap: u32) -> u64 {
    u64::try_from(vm.check_extension_raw(cap.into())).unwrap_or(0)
}

fn enable_cap(vm: &VmFd, cap: u32, arg0: u64, op: &'static str) -> Result<(), SysError> {
    let mut req = kvm_enable_cap {
        cap,
        ..Default::default()
    };
    req.args[0] = arg0;
    vm.enable_cap(&req)
        .map_err(|e| SysError::os(op, std::io::Error::from_raw_os_error(e.errno())))
}

/// The MANUAL_PROTECT flags this KVM accepts (0: unsupported).
pub fn manual_protect_supported(vm: &VmFd) -> u64 {
    check(vm, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
}

/// Sets the manual-protect flags; 0 turns it back off. INITIALLY_SET only affects slots whose
/// dirty logging is switched on afterwards.
pub fn enable_manual_protect(vm: &VmFd, flags: u64) -> Result<(), SysError> {
    enable_cap(
        vm,
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        flags,
        "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
    )
}

/// Clears (and write-protects again) the pages of `slot` whose bits are set in `bitmap`, bit i
/// meaning page `first_page + i`. The kernel additionally wants `num_pages` a multiple of 64
/// unless the range ends at the slot's end; it answers EINVAL otherwise.
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> Result<(), SysError> {
    if first_page % 64 != 0 {
        return Err(SysError::Invalid(format!(
            "KVM_CLEAR_DIRTY_LOG: first_page {first_page} is not a multiple of 64"
        )));
    }
    let bits = bitmap.len().saturating_mul(64);
    if bits < num_pages as usize {
        return Err(SysError::Invalid(format!(
            "KVM_CLEAR_DIRTY_LOG: bitmap of {} u64 covers {bits} pages, num_pages is {num_pages}",
            bitmap.len()
        )));
    }
    let mut req = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
            // KVM only reads the bitmap (copy_from_user); the pointer type is just the ABI's.
            dirty_bitmap: bitmap.as_ptr().cast_mut().cast(),
        },
    };
    // SAFETY: `vm` is a VM fd, `req` matches struct kvm_clear_dirty_log, and the bitmap holds at
    // least ALIGN(num_pages, 64) bits (checked above), which is all KVM reads from it.
    let rc = unsafe { ioctl_with_mut_ref(vm, nr::KVM_CLEAR_DIRTY_LOG(), &mut req) };
    if rc < 0 {
        return Err(SysError::last_os("KVM_CLEAR_DIRTY_LOG"));
    }
    Ok(())
}

/// What dirty rings this KVM offers; the sizes are the largest ring in bytes (0: unsupported).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyRingCaps {
    pub acq_rel_max_bytes: u32,
    pub plain_max_bytes: u32,
    pub with_bitmap: bool,
}

pub fn dirty_ring_caps(vm: &VmFd) -> DirtyRingCaps {
    let bytes = |cap| u32::try_from(check(vm, cap)).unwrap_or(u32::MAX);
    DirtyRingCaps {
        acq_rel_max_bytes: bytes(KVM_CAP_DIRTY_LOG_RING_ACQ_REL),
        plain_max_bytes: bytes(KVM_CAP_DIRTY_LOG_RING),
        with_bitmap: check(vm, KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP) != 0,
    }
}

/// Switches the VM to dirty rings of `bytes` per vCPU. KVM accepts this only before the first
/// vCPU is created (EINVAL afterwards), only once, and only for sizes from a page up to the
/// cap's maximum.
pub fn enable_dirty_ring(vm: &VmFd, bytes: u32, acq_rel: bool) -> Result<(), SysError> {
    if !bytes.is_power_of_two() {
        return Err(SysError::Invalid(format!(
            "dirty ring size {bytes} bytes is not a power of two"
        )));
    }
    let (cap, op) = if acq_rel {
        (
            KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
            "KVM_ENABLE_CAP(DIRTY_LOG_RING_ACQ_REL)",
        )
    } else {
        (KVM_CAP_DIRTY_LOG_RING, "KVM_ENABLE_CAP(DIRTY_LOG_RING)")
    };
    enable_cap(vm, cap, bytes.into(), op)
}

/// Recycles every harvested (RESET) entry of every vCPU ring and write-protects those pages
/// again; returns how many entries it recycled. Call it before reading the pages you harvested.
pub fn reset_dirty_rings(vm: &VmFd) -> Result<u32, SysError> {
    // SAFETY: `vm` is a VM fd and KVM_RESET_DIRTY_RINGS takes no argument.
    let rc = unsafe { ioctl(vm, nr::KVM_RESET_DIRTY_RINGS()) };
    u32::try_from(rc).map_err(|_| SysError::last_os("KVM_RESET_DIRTY_RINGS"))
}

/// One vCPU's dirty ring, mapped from its vCPU fd. Harvest it in index order from one thread;
/// `entries` must be the ring size given to `enable_dirty_ring` divided by DIRTY_GFN_SIZE.
#[derive(Debug)]
pub struct DirtyRingMap {
    base: *mut kvm_dirty_gfn,
    len: usize,
    entries: u32,
}

// SAFETY: the mapping is owned by this value and unmapped only in Drop; KVM and userspace
// communicate through it with atomic accesses only, so moving it to another thread is fine.
unsafe impl Send for DirtyRingMap {}
// SAFETY: `pop` touches the shared entries only through atomics, so concurrent `&self` calls
// cannot cause a data race (at worst two callers report the same entry).
unsafe impl Sync for DirtyRingMap {}

impl DirtyRingMap {
    pub fn map(vcpu: &VcpuFd, entries: u32) -> Result<DirtyRingMap, SysError> {
        if !entries.is_power_of_two() {
            return Err(SysError::Invalid(format!(
                "dirty ring of {entries} entries is not a power of two"
            )));
        }
        let len = (entries as usize)
            .checked_mul(DIRTY_GFN_SIZE)
            .ok_or_else(|| SysError::Invalid(format!("dirty ring of {entries} entries")))?;
        let offset = KVM_DIRTY_LOG_PAGE_OFFSET as usize * page_size();
        // SAFETY: maps a fresh range chosen by the kernel from the vCPU fd; KVM requires
        // MAP_SHARED and no PROT_EXEC for the ring pages, which is what is asked for.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(SysError::last_os("mmap(dirty ring)"));
        }
        Ok(DirtyRingMap {
            base: ptr.cast(),
            len,
            entries,
        })
    }

    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Harvests entry `index` (taken modulo the ring size): if KVM has published it, marks it
    /// RESET and returns (slot, page offset in slot). The slot is KVM's `as_id << 16 | slot id`.
    pub fn pop(&self, index: u32) -> Option<(u32, u64)> {
        let i = (index & (self.entries - 1)) as usize;
        // SAFETY: i < entries, so the entry lies inside the mapping, which lives as long as
        // `self`. The mapping is page aligned and entries are 16 bytes, so the u32 and u64
        // fields are naturally aligned for the atomic types. All our accesses are atomic;
        // KVM's writes happen-before its store-release of `flags`, which the acquire pairs with.
        let (flags, slot, offset) = unsafe {
            let e = self.base.add(i);
            (
                AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags)),
                AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).slot)),
                AtomicU64::from_ptr(std::ptr::addr_of_mut!((*e).offset)),
            )
        };
        if flags.load(Ordering::Acquire) & DIRTY_GFN_F_DIRTY == 0 {
            return None;
        }
        let found = (slot.load(Ordering::Relaxed), offset.load(Ordering::Relaxed));
        // Release: our reads of slot/offset must complete before KVM may recycle the entry.
        flags.store(DIRTY_GFN_F_RESET, Ordering::Release);
        Some(found)
    }
}

impl Drop for DirtyRingMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range mapped in `map`; no reference into it outlives self.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests;
