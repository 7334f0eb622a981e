//! KVM Userfault (`KVM_MEM_USERFAULT`), v3 semantics (TRACKING.md, "KVM Userfault").
//!
//! Hand-written: the series is not merged upstream (latest posting v3, June 2025), so no crate
//! has it. kvm-bindings 0.14 knows `struct kvm_userspace_memory_region2` only with the old
//! padding (`pad2: [u64; 14]` at byte 48), kvm-ioctls has no `KVM_MEM_USERFAULT` flag and no
//! `KVM_MEMORY_EXIT_FLAG_USERFAULT`. What the series adds:
//! - memslot flag `KVM_MEM_USERFAULT` = 1 << 3, set with `KVM_SET_USER_MEMORY_REGION2`;
//! - `u64 userfault_bitmap` at byte offset 48 of the region2 struct (the first u64 of the old
//!   padding; the struct stays 160 bytes): a userspace pointer to an array of longs, one bit per
//!   4 KiB page of the slot starting at `guest_phys_addr`;
//! - a vCPU access to a page whose bit is set makes `KVM_RUN` fail with EFAULT, `exit_reason`
//!   `KVM_EXIT_MEMORY_FAULT` (39) and `memory_fault.flags` carrying
//!   `KVM_MEMORY_EXIT_FLAG_USERFAULT` = 1 << 4. Userspace installs the page, clears the bit
//!   with a store-release, and re-enters.
//!
//! Support is detected by trying the flag ([`probe_support`]), never by a capability number:
//! the series' capability number changed with every rebase (239, 240, 243, 245) and upstream
//! later reused those numbers for other things.

use std::sync::atomic::{AtomicU64, Ordering};

use kvm_bindings::{kvm_run, KVM_EXIT_MEMORY_FAULT, KVM_MEMORY_EXIT_FLAG_PRIVATE};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use vmm_sys_util::ioctl::ioctl_with_ref;

use super::SysError;

/// Private so the generated ioctl-number functions do not become public API.
mod nr {
    use kvm_bindings::KVMIO;
    // _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2): the same number as upstream's,
    // since the struct keeps its size.
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION2,
        KVMIO,
        0x49,
        super::UserspaceMemoryRegion2
    );
}

/// Memslot flag of the series: accesses to pages marked in the slot's bitmap exit to userspace.
pub const KVM_MEM_USERFAULT: u32 = 1 << 3;
/// `kvm_run.memory_fault.flags` bit of the series: the exit comes from the userfault bitmap.
pub const KVM_MEMORY_EXIT_FLAG_USERFAULT: u64 = 1 << 4;
/// Byte offset of `userfault_bitmap` in `struct kvm_userspace_memory_region2`.
pub const USERFAULT_BITMAP_OFFSET: usize = 48;
/// Size of `struct kvm_userspace_memory_region2`, with and without the series.
pub const REGION2_SIZE: usize = 160;
/// The page size the bitmap counts in (the series maps only 4 KiB pages while enabled).
pub const PAGE: u64 = 4096;

/// `struct kvm_userspace_memory_region2` as the series defines it.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UserspaceMemoryRegion2 {
    pub slot: u32,
    pub flags: u32,
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
    pub guest_memfd_offset: u64,
    pub guest_memfd: u32,
    pub pad1: u32,
    /// Userspace address of the bitmap (an array of longs); read by KVM only with
    /// `KVM_MEM_USERFAULT` in `flags`.
    pub userfault_bitmap: u64,
    pub pad2: [u64; 13],
}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<UserspaceMemoryRegion2>() == REGION2_SIZE);
    assert!(offset_of!(UserspaceMemoryRegion2, userfault_bitmap) == USERFAULT_BITMAP_OFFSET);
    // The same layout as the merged struct, field for field up to the padding.
    assert!(size_of::<kvm_bindings::kvm_userspace_memory_region2>() == REGION2_SIZE);
    assert!(
        offset_of!(kvm_bindings::kvm_userspace_memory_region2, pad2) == USERFAULT_BITMAP_OFFSET
    );
    assert!(
        offset_of!(UserspaceMemoryRegion2, guest_memfd)
            == offset_of!(kvm_bindings::kvm_userspace_memory_region2, guest_memfd)
    );
    assert!(
        offset_of!(UserspaceMemoryRegion2, userspace_addr)
            == offset_of!(kvm_bindings::kvm_userspace_memory_region2, userspace_addr)
    );
    // The kernel reads the bitmap as longs: u64 on x86-64.
    assert!(size_of::<libc::c_ulong>() == size_of::<u64>());
};

/// One bit per 4 KiB page of a memslot, shared with KVM (which reads it while vCPUs run).
/// Never resized, so the address handed to KVM stays valid for the bitmap's lifetime; the
/// bitmap must outlive every slot registered with it.
#[derive(Debug)]
pub struct UserfaultBitmap {
    words: Vec<AtomicU64>,
    pages: u64,
}

impl UserfaultBitmap {
    /// A bitmap for `pages` pages, all clear (nothing faults).
    pub fn new(pages: u64) -> UserfaultBitmap {
        UserfaultBitmap {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    /// A bitmap for a slot of `size` bytes (rounded up to whole pages).
    pub fn for_size(size: u64) -> UserfaultBitmap {
        Self::new(size.div_ceil(PAGE))
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    fn word(&self, page: u64) -> (&AtomicU64, u64) {
        assert!(
            page < self.pages,
            "page {page} outside a userfault bitmap of {} pages",
            self.pages
        );
        (&self.words[(page / 64) as usize], 1 << (page % 64))
    }

    /// Marks `page` missing: a vCPU access exits once KVM (re)reads the bit (for a page already
    /// mapped, only after the slot's flag is toggled). True if it was clear.
    pub fn set(&self, page: u64) -> bool {
        let (w, m) = self.word(page);
        w.fetch_or(m, Ordering::Release) & m == 0
    }

    /// Marks `page` present, with release ordering: every store that installed the page
    /// happens-before KVM (or a vCPU thread) seeing the bit clear, as the series requires.
    /// True if it was set (this call resolved it).
    pub fn clear_release(&self, page: u64) -> bool {
        let (w, m) = self.word(page);
        w.fetch_and(!m, Ordering::Release) & m != 0
    }

    /// Whether `page` is still missing; acquire pairs with `clear_release`, so after `false`
    /// the installed contents are visible.
    pub fn is_set_acquire(&self, page: u64) -> bool {
        let (w, m) = self.word(page);
        w.load(Ordering::Acquire) & m != 0
    }

    /// Sets `pages` pages from `first`.
    pub fn set_range(&self, first: u64, pages: u64) {
        self.for_range(first, pages, |w, m| {
            w.fetch_or(m, Ordering::Release);
        });
    }

    /// Clears `pages` pages from `first` with release ordering.
    pub fn clear_range_release(&self, first: u64, pages: u64) {
        self.for_range(first, pages, |w, m| {
            w.fetch_and(!m, Ordering::Release);
        });
    }

    /// Sets every page.
    pub fn set_all(&self) {
        self.set_range(0, self.pages);
    }

    /// How many pages are marked.
    pub fn count_set(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    /// The set pages in `first..first+pages` as runs (first page, count).
    pub fn set_runs(&self, first: u64, pages: u64) -> Vec<(u64, u64)> {
        let end = first.saturating_add(pages).min(self.pages);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in first..end {
            if self.is_set_acquire(p) {
                match runs.last_mut() {
                    Some((s, n)) if *s + *n == p => *n += 1,
                    _ => runs.push((p, 1)),
                }
            }
        }
        runs
    }

    /// Applies `f` to each word of the range with the mask of its pages in the range (whole
    /// words at a time).
    fn for_range(&self, first: u64, pages: u64, f: impl Fn(&AtomicU64, u64)) {
        let end = first
            .checked_add(pages)
            .filter(|&e| e <= self.pages)
            .unwrap_or_else(|| {
                panic!(
                    "pages {first}+{pages} outside a userfault bitmap of {} pages",
                    self.pages
                )
            });
        let mut p = first;
        while p < end {
            let bit = p % 64;
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 {
                !0
            } else {
                ((1u64 << n) - 1) << bit
            };
            f(&self.words[(p / 64) as usize], mask);
            p += n;
        }
    }

    /// The bitmap's address, for `userfault_bitmap`.
    pub fn as_ptr(&self) -> u64 {
        self.words.as_ptr() as u64
    }
}

/// `KVM_SET_USER_MEMORY_REGION2` with a hand-built struct (any flags, the userfault bitmap
/// field included).
///
/// # Safety
/// As for `VmFd::set_user_memory_region`: `userspace_addr..+memory_size` must stay a valid
/// mapping while the slot exists, and with `KVM_MEM_USERFAULT` the bitmap at
/// `userfault_bitmap` must stay alive and unmoved as long.
pub unsafe fn set_region2(vm: &VmFd, region: &UserspaceMemoryRegion2) -> Result<(), SysError> {
    // SAFETY: the ioctl reads exactly one struct of the size encoded in its number; the caller
    // vouches for the memory it points at.
    let rc = unsafe { ioctl_with_ref(vm, nr::KVM_SET_USER_MEMORY_REGION2(), region) };
    if rc < 0 {
        return Err(SysError::last_os("KVM_SET_USER_MEMORY_REGION2"));
    }
    Ok(())
}

/// Registers (or updates) slot `slot` at `gpa` with `KVM_MEM_USERFAULT | extra_flags` and
/// `bitmap` (which must cover the slot's pages). Enabling the flag zaps the slot's stage-2
/// mappings; bits set later only catch pages KVM has not mapped since.
///
/// # Safety
/// `host_addr..host_addr+size` must stay a valid mapping, and `bitmap` alive and unmoved,
/// while the slot exists with the flag (remove the slot or clear the flag before dropping it).
pub unsafe fn set_userfault_region(
    vm: &VmFd,
    slot: u32,
    gpa: u64,
    size: u64,
    host_addr: u64,
    bitmap: &UserfaultBitmap,
    extra_flags: u32,
) -> Result<(), SysError> {
    if size.div_ceil(PAGE) > bitmap.pages() {
        return Err(SysError::Invalid(format!(
            "a userfault bitmap of {} pages cannot cover a slot of {size} bytes",
            bitmap.pages()
        )));
    }
    let region = UserspaceMemoryRegion2 {
        slot,
        flags: KVM_MEM_USERFAULT | extra_flags,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: host_addr,
        userfault_bitmap: bitmap.as_ptr(),
        ..Default::default()
    };
    // SAFETY: the caller keeps the mapping and the bitmap alive as documented.
    unsafe { set_region2(vm, &region) }
}

/// Deletes slot `slot` (memory_size 0).
pub fn remove_slot(vm: &VmFd, slot: u32) -> Result<(), SysError> {
    let region = UserspaceMemoryRegion2 {
        slot,
        ..Default::default()
    };
    // SAFETY: deleting a slot hands KVM no memory.
    unsafe { set_region2(vm, &region) }
}

/// Whether this kernel takes `KVM_MEM_USERFAULT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Support {
    Supported,
    Unsupported { errno: i32, explanation: String },
}

/// The GPA of the probe's scratch slot: the top page below 4 GiB, inside the 32-bit MMIO hole,
/// where vmm never puts RAM.
pub const PROBE_GPA: u64 = 0xffff_f000;

/// Tries the flag: registers a one-page scratch slot (the highest slot id, at [`PROBE_GPA`])
/// with `KVM_MEM_USERFAULT` and removes it again. EINVAL means the kernel has no such flag.
/// Run it on a VM before its own memory is registered, or on a throwaway VM.
pub fn probe_support(vm: &VmFd) -> Support {
    let slots = vm.check_extension_int(Cap::NrMemslots);
    let slot = u32::try_from(slots.max(1) - 1).unwrap_or(0);
    let page = match ScratchPage::new() {
        Ok(p) => p,
        Err(e) => {
            return Support::Unsupported {
                errno: e.raw_os_error().unwrap_or(0),
                explanation: format!("mapping the probe's scratch page failed: {e}"),
            }
        }
    };
    let bitmap = UserfaultBitmap::new(1);
    // SAFETY: the scratch page and the bitmap outlive the slot, which is removed below before
    // either is dropped.
    let r = unsafe { set_userfault_region(vm, slot, PROBE_GPA, PAGE, page.addr(), &bitmap, 0) };
    match r {
        Ok(()) => {
            if let Err(e) = remove_slot(vm, slot) {
                // The slot still points at the page: keep both alive for the VM's lifetime
                // rather than leave KVM a dangling pointer.
                std::mem::forget(page);
                std::mem::forget(bitmap);
                return Support::Unsupported {
                    errno: e.errno().unwrap_or(0),
                    explanation: format!("the probe slot was accepted but not removed: {e}"),
                };
            }
            Support::Supported
        }
        Err(e) => {
            let errno = e.errno().unwrap_or(0);
            let explanation = match errno {
                libc::EINVAL => format!(
                    "this kernel has no KVM_MEM_USERFAULT (not merged upstream; v3 posted June \
                     2025): KVM_SET_USER_MEMORY_REGION2 with flag 0x{KVM_MEM_USERFAULT:x} \
                     returned EINVAL"
                ),
                libc::ENOTTY => "KVM_SET_USER_MEMORY_REGION2 returned ENOTTY: this kernel has no \
                                 such ioctl (Linux < 6.8), let alone KVM_MEM_USERFAULT"
                    .to_string(),
                libc::EEXIST => format!(
                    "inconclusive: the probe slot {slot} at 0x{PROBE_GPA:x} overlaps a slot of \
                     this VM (probe before registering memory)"
                ),
                _ => format!("registering a KVM_MEM_USERFAULT slot returned errno {errno}: {e}"),
            };
            Support::Unsupported { errno, explanation }
        }
    }
}

/// One anonymous page, unmapped on drop.
struct ScratchPage(*mut libc::c_void);

impl ScratchPage {
    fn new() -> std::io::Result<ScratchPage> {
        // SAFETY: a fresh anonymous mapping chosen by the kernel; it overlaps nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ScratchPage(p))
    }
    fn addr(&self) -> u64 {
        self.0 as u64
    }
}

impl Drop for ScratchPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the page mapped in `new`; KVM no longer refers to it.
        unsafe { libc::munmap(self.0, PAGE as usize) };
    }
}

/// A `KVM_EXIT_MEMORY_FAULT` exit, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFault {
    pub gpa: u64,
    pub size: u64,
    /// The raw flags.
    pub flags: u64,
    /// The page is marked in the slot's userfault bitmap: fetch, install, `clear_release`,
    /// re-enter.
    pub userfault: bool,
    /// A private (guest_memfd) access.
    pub private: bool,
}

impl MemoryFault {
    /// From the three fields of the exit (also what kvm-ioctls' `VcpuExit::MemoryFault` carries:
    /// kvm-ioctls already turns EFAULT + exit reason 39 into that exit).
    pub fn from_fields(flags: u64, gpa: u64, size: u64) -> MemoryFault {
        MemoryFault {
            gpa,
            size,
            flags,
            userfault: flags & KVM_MEMORY_EXIT_FLAG_USERFAULT != 0,
            private: flags & u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE) != 0,
        }
    }

    /// Pages `first..first+count` of a slot starting at `slot_gpa` that the fault covers (at
    /// least one page).
    pub fn slot_pages(&self, slot_gpa: u64) -> (u64, u64) {
        let first = self.gpa.saturating_sub(slot_gpa) / PAGE;
        let end = (self.gpa + self.size.max(1))
            .saturating_sub(slot_gpa)
            .div_ceil(PAGE);
        (first, end.saturating_sub(first).max(1))
    }
}

/// Decodes `run` after `KVM_RUN` failed with `errno`. The memory-fault fields are meaningful
/// only when the ioctl failed with EFAULT (or EHWPOISON) and `exit_reason` is
/// `KVM_EXIT_MEMORY_FAULT`; for every other failure `exit_reason` is stale and this returns
/// None.
pub fn memory_fault(run: &kvm_run, errno: i32) -> Option<MemoryFault> {
    if (errno != libc::EFAULT && errno != libc::EHWPOISON)
        || run.exit_reason != KVM_EXIT_MEMORY_FAULT
    {
        return None;
    }
    // SAFETY: the exit reason says `memory_fault` is the union member the kernel filled.
    let f = unsafe { run.__bindgen_anon_1.memory_fault };
    Some(MemoryFault::from_fields(f.flags, f.gpa, f.size))
}

/// `memory_fault` on this vCPU's `kvm_run`, right after its `KVM_RUN` failed with `errno`.
pub fn vcpu_memory_fault(vcpu: &mut VcpuFd, errno: i32) -> Option<MemoryFault> {
    memory_fault(vcpu.get_kvm_run(), errno)
}

#[cfg(test)]
mod tests;
