//! `kvm-userfault`: the KVM Userfault uAPI (v3 semantics, not merged upstream; see
//! `sys::kvm_userfault` and TRACKING.md). Every RAM memslot is re-registered with
//! `KVM_MEM_USERFAULT` and a bitmap with one bit per missing page; a vCPU access to a marked
//! page fails `KVM_RUN` with a `KVM_EXIT_MEMORY_FAULT` exit (flag USERFAULT) carrying the GPA.
//! The vCPU thread gets the page in, clears its bit with a store-release, and re-enters: the
//! access was never executed, so nothing needs completing.
//!
//! KVM's own accesses and the VMM's go through the host mapping, where userfaultfd MISSING
//! stays registered, as the series intends.
//!
//! Support is detected by trying the flag on a scratch slot; a kernel without the series
//! refuses it with EINVAL, and arming then fails with the kernel's answer.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::exits::{ExitBase, ExitPager, ExitStats, Fetch, Waiters};
use super::{DemandPager, Fault, Installed, UffdMissing, UserfaultError};
use crate::memory::RamRange;
use crate::sys::kvm_userfault::{self as sys, Support, UserfaultBitmap};
use crate::vstate::resources::memslots;
use crate::vstate::vm::Vm;

const PAGE: u64 = 4096;

/// A RAM memslot of the VM's registry and the bitmap KVM reads for it.
struct Slot {
    slot: memslots::Slot,
    bitmap: UserfaultBitmap,
}

impl Slot {
    fn contains(&self, gpa: u64) -> bool {
        self.slot.contains(gpa)
    }
}

struct Inner {
    base: ExitBase,
    vm: Arc<Vm>,
    slots: Vec<Slot>,
    chunk: u64,
    fetched: AtomicU64,
    cleared_only: AtomicU64,
}

pub struct KvmUserfault {
    inner: Arc<Inner>,
}

/// Whether this kernel has KVM Userfault, found by trying the memslot flag on a throwaway VM.
pub fn support() -> Result<(), UserfaultError> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|source| UserfaultError::Kvm {
        what: "cannot open /dev/kvm",
        source,
    })?;
    let vm = kvm.create_vm().map_err(|source| UserfaultError::Kvm {
        what: "KVM_CREATE_VM failed",
        source,
    })?;
    match sys::probe_support(&vm) {
        Support::Supported => Ok(()),
        Support::Unsupported { explanation, .. } => Err(UserfaultError::Unsupported(explanation)),
    }
}

impl KvmUserfault {
    /// Re-registers the VM's RAM slots (whatever ids its registry gave them) with
    /// KVM_MEM_USERFAULT and the pending pages marked. Before any vCPU runs.
    pub fn arm(
        vm: Arc<Vm>,
        ranges: &[RamRange],
        host_addrs: &[u64],
        memfd: &File,
        pending: &[(u64, u64)],
        chunk: u64,
    ) -> Result<KvmUserfault, UserfaultError> {
        let chunk = super::memslot_exits::check_chunk(chunk)?;
        // On a throwaway VM: the probe takes a slot id of its own, which on this VM belongs
        // to the registry.
        support().map_err(|e| UserfaultError::KvmUserfaultMissing(Box::new(e)))?;
        let ram = vm.memslots().ram();
        let registered = ram
            .iter()
            .map(|s| (s.gpa, s.size))
            .eq(ranges.iter().map(|r| (r.gpa, r.size)));
        if !registered {
            return Err(UserfaultError::Unsupported(format!(
                "kvm-userfault needs guest RAM registered as one memslot per RAM range; the VM \
                 has RAM slots {:x?}",
                ram.iter().map(|s| (s.gpa, s.size)).collect::<Vec<_>>()
            )));
        }
        let waiters = Arc::new(Waiters::new(ranges, memfd, pending)?);
        let mut slots = Vec::new();
        for slot in ram {
            let bitmap = UserfaultBitmap::for_size(slot.size);
            for &(gpa, n) in pending {
                for p in 0..n {
                    let page = gpa + p * PAGE;
                    if slot.contains(page) {
                        bitmap.set((page - slot.gpa) / PAGE);
                    }
                }
            }
            slots.push(Slot { slot, bitmap });
        }
        let uffd = UffdMissing::arm(ranges, host_addrs)?;
        let inner = Inner {
            base: ExitBase { uffd, waiters },
            vm,
            slots,
            chunk,
            fetched: AtomicU64::new(0),
            cleared_only: AtomicU64::new(0),
        };
        for s in &inner.slots {
            // SAFETY: the bitmap lives in `inner`, which outlives the slot's flag (disarm
            // clears it, and the VM is dropped before the pager).
            unsafe { inner.vm.memslots().arm_userfault(s.slot.id, &s.bitmap) }.map_err(
                |source| UserfaultError::Memslot {
                    what: "arming KVM_MEM_USERFAULT",
                    source,
                },
            )?;
        }
        Ok(KvmUserfault {
            inner: Arc::new(inner),
        })
    }
}

impl Inner {
    fn slot_of(&self, gpa: u64) -> Option<&Slot> {
        self.slots.iter().find(|s| s.contains(gpa))
    }

    fn bit_set(&self, gpa: u64) -> bool {
        self.slot_of(gpa)
            .is_some_and(|s| s.bitmap.is_set_acquire((gpa - s.slot.gpa) / PAGE))
    }
}

impl ExitPager for Inner {
    fn name(&self) -> &'static str {
        super::DemandKind::KvmUserfault.name()
    }

    fn covers(&self, gpa: u64) -> bool {
        self.slot_of(gpa).is_some()
    }

    fn resolve(&self, _vcpu: u8, gpa: u64, len: u64) -> Result<bool, UserfaultError> {
        let Some(slot) = self.slot_of(gpa) else {
            return Ok(false);
        };
        let r = slot.slot;
        let start = r.gpa + (gpa - r.gpa) / self.chunk * self.chunk;
        let end = (start + self.chunk)
            .max(gpa + len.max(1))
            .min(r.end())
            .div_ceil(PAGE)
            * PAGE;
        if self
            .base
            .waiters
            .bring_in(start, (end - start) / PAGE, false)?
        {
            self.fetched.fetch_add(1, Ordering::AcqRel);
        } else {
            self.cleared_only.fetch_add(1, Ordering::AcqRel);
        }
        // The pages are in the memory file: only now may KVM map them (release, as the
        // series requires, so KVM sees the page contents before the cleared bit).
        let first = (start - r.gpa) / PAGE;
        slot.bitmap.clear_range_release(first, (end - start) / PAGE);
        Ok(true)
    }

    fn keep_mapped(&self, gpa: u64) -> Result<bool, UserfaultError> {
        // KVM's own accesses go through userfaultfd here; bringing the page in is enough.
        self.resolve(0, gpa, PAGE)
    }

    fn mapped(&self, gpa: u64) -> bool {
        !self.bit_set(gpa)
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
            mapped_only: self.cleared_only.load(Ordering::Acquire),
            ..Default::default()
        }
    }
}

impl DemandPager for KvmUserfault {
    fn name(&self) -> &'static str {
        super::DemandKind::KvmUserfault.name()
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

    /// Every page is present: the slots lose the flag (so KVM stops reading the bitmaps).
    fn disarm(&self) -> Result<(), UserfaultError> {
        self.inner.base.uffd.disarm()?;
        for s in &self.inner.slots {
            s.bitmap.clear_range_release(0, s.bitmap.pages());
            self.inner
                .vm
                .memslots()
                .disarm_userfault(s.slot.id)
                .map_err(|source| UserfaultError::Memslot {
                    what: "clearing KVM_MEM_USERFAULT",
                    source,
                })?;
        }
        Ok(())
    }

    fn exits(&self) -> Option<Arc<dyn ExitPager>> {
        Some(self.inner.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    /// Where the kernel lacks KVM Userfault (every host of this kind so far, PLATFORM.md §4),
    /// arming must refuse with the kernel's answer and leave the VM's memslots as they were;
    /// where it has it, the arming must be live.
    #[test]
    fn arming_is_refused_with_the_kernels_answer_where_the_kernel_lacks_it() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let vm = Arc::new(Vm::new(ram.size()).unwrap());
        vm.register_ram(&ram).unwrap();
        let supported = support();
        let armed = KvmUserfault::arm(
            vm.clone(),
            ram.ranges(),
            &ram.host_addrs(),
            ram.file(),
            &[(0x10000, 4)],
            PAGE,
        );
        match (supported, armed) {
            (Err(why), Err(e)) => {
                let (e, why) = (e.to_string(), why.to_string());
                assert!(e.contains("kvm-userfault is not available"), "{e}");
                assert!(e.contains(&why), "{e} / {why}");
                // The reason is the kernel's answer, named: what a throwaway VM's probe got.
                let vm = kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap();
                let Support::Unsupported { errno, .. } = sys::probe_support(&vm) else {
                    panic!("a second probe found the support the first lacked")
                };
                let named = match errno {
                    libc::EINVAL => "returned EINVAL".to_string(),
                    libc::ENOTTY => "returned ENOTTY".to_string(),
                    other => format!("returned errno {other}"),
                };
                assert!(why.contains(&named), "errno {errno}: {why}");
            }
            (Ok(()), Ok(p)) => {
                // A patched kernel: the bits and the exit contract are live.
                let ex = p.exits().unwrap();
                assert!(!ex.mapped(0x10000));
                assert!(ex.mapped(0x20000));
            }
            (s, a) => panic!("probe {s:?} and arm {:?} disagree", a.err()),
        }
    }
}
