//! The VM file descriptor: capabilities, memslots, in-kernel irqchip and PIT, and the guest's
//! resources (device addresses, GSIs and interrupt routing: `vstate::resources`).

use std::sync::Arc;

use kvm_bindings::{kvm_enable_cap, kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

use super::resources::memslots::{MemSlotError, MemSlots, SlotKind};
use super::resources::{Resources, ResourcesError};
use crate::host::HostKind;
use crate::memory::{ram_layout, GuestRam};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("this KVM lacks a capability vmm needs: {0}")]
    MissingCap(&'static str),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("{what} failed: {source}")]
    Setup {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{what}: {source}")]
    Memslot {
        what: &'static str,
        source: MemSlotError,
    },
    #[error("KVM_CREATE_VCPU {id} failed: {source}")]
    CreateVcpu { id: u8, source: kvm_ioctls::Error },
    /// Boxed: it is rare (VM creation only) and much larger than the rest.
    #[error("setting up the guest's resources: {0}")]
    Resources(#[source] Box<ResourcesError>),
}

/// Where KVM may put the three pages of its real-mode TSS (unused on hardware with unrestricted
/// guests, required by the ioctl): just below the BIOS area, inside the platform area the
/// address map reserves (`resources::addresses::PLATFORM_START`).
const TSS_ADDRESS: usize = 0xfffb_d000;

/// A KVM VM with its in-kernel interrupt controllers.
pub struct Vm {
    kvm: Kvm,
    /// Shared with `memslots`, which issues the memslot ioctls.
    fd: Arc<VmFd>,
    host: HostKind,
    memslots: MemSlots,
    resources: Resources,
}

impl Vm {
    /// A VM for `ram_bytes` of guest RAM (laid out by `memory::ram_layout`; the 64-bit MMIO
    /// window starts after it).
    pub fn new(ram_bytes: u64) -> Result<Self, VmError> {
        Self::with_phys_bits(ram_bytes, None)
    }

    /// [`Vm::new`] with the guest's physical address bits limited to `phys_limit` (checked
    /// against what the host gives a guest; see `Resources::new`).
    pub fn with_phys_bits(ram_bytes: u64, phys_limit: Option<u8>) -> Result<Self, VmError> {
        Self::create(ram_bytes, phys_limit, None)
    }

    /// A VM with `ram` registered as its RAM memslots (one per range), limited as in
    /// [`Vm::with_phys_bits`].
    ///
    /// The slots are registered before the irqchip exists, because of what KVM does with them
    /// afterwards: each KVM_SET_USER_MEMORY_REGION waits for an SRCU grace period on the VM
    /// (`kvm_swap_active_memslots`), and one that follows KVM_CREATE_IRQCHIP within ~10 ms (the
    /// PIC and IOAPIC's I/O bus registrations) waits 4-11 ms for it on PVM hosts (HZ=250),
    /// against 0.1-0.3 ms when it comes first (C test, create VM + memslot + TSS + irqchip +
    /// PIT + routing + vCPU: 4.9-6.2 ms in the old order, 0.7-1.5 ms in this one, 3 runs each).
    /// That wait was most of a micro guest's start-up.
    pub fn with_ram(ram: &GuestRam, phys_limit: Option<u8>) -> Result<Self, VmError> {
        Self::create(ram.size(), phys_limit, Some(ram))
    }

    fn create(
        ram_bytes: u64,
        phys_limit: Option<u8>,
        ram: Option<&GuestRam>,
    ) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
            (Cap::Irqfd, "KVM_CAP_IRQFD"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = Arc::new(kvm.create_vm().map_err(VmError::CreateVm)?);
        let memslots = MemSlots::new(fd.clone());
        if let Some(ram) = ram {
            Self::add_ram_slots(&memslots, ram)?;
        }
        let setup = |what| move |source| VmError::Setup { what, source };
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(setup("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(setup("KVM_CREATE_PIT2"))?;
        // Report, rather than silently re-inject, instructions KVM cannot emulate (on hardware a
        // CPL>0 failure would otherwise become a #UD in the guest). PVM ignores it.
        let cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_EXIT_ON_EMULATION_FAILURE,
            args: [1, 0, 0, 0],
            ..Default::default()
        };
        if let Err(e) = fd.enable_cap(&cap) {
            tracing::debug!("KVM_CAP_EXIT_ON_EMULATION_FAILURE not enabled: {e}");
        }
        let ram_end = ram_layout(ram_bytes).last().map_or(0, |r| r.end());
        let resources = Resources::new(&kvm, &fd, ram_end, phys_limit)
            .map_err(|e| VmError::Resources(Box::new(e)))?;
        Ok(Vm {
            kvm,
            memslots,
            fd,
            host: HostKind::detect(),
            resources,
        })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }
    pub fn host_kind(&self) -> HostKind {
        self.host
    }
    /// The guest's physical address bits (its CPUID says the same: `cpuid::for_vcpu`).
    pub fn phys_bits(&self) -> u8 {
        self.resources.addresses().phys_bits()
    }

    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    /// The VM's memory slots: the only place slot ids are handed out.
    pub fn memslots(&self) -> &MemSlots {
        &self.memslots
    }

    /// One RAM memslot per RAM range, ids from the registry (a VM made by [`Vm::new`]; see
    /// [`Vm::with_ram`] for why a machine registers them at creation instead).
    pub fn register_ram(&self, ram: &GuestRam) -> Result<(), VmError> {
        Self::add_ram_slots(&self.memslots, ram)
    }

    fn add_ram_slots(memslots: &MemSlots, ram: &GuestRam) -> Result<(), VmError> {
        for (range, host) in ram.ranges().iter().zip(ram.host_addrs()) {
            // SAFETY: the host range is a live mapping owned by the machine's `GuestRam`,
            // which outlives the VM (the machine drops the VM and its vCPUs before guest RAM).
            unsafe { memslots.add(SlotKind::Ram, range.gpa, range.size, host, 0) }.map_err(
                |source| VmError::Memslot {
                    what: "registering guest RAM",
                    source,
                },
            )?;
        }
        Ok(())
    }

    /// Turns KVM dirty logging (KVM_MEM_LOG_DIRTY_PAGES) on or off for every RAM memslot.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        self.memslots
            .set_dirty_logging(on)
            .map_err(|source| VmError::Memslot {
                what: if on {
                    "turning dirty logging on"
                } else {
                    "turning dirty logging off"
                },
                source,
            })
    }

    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(id as u64)
            .map_err(|source| VmError::CreateVcpu { id, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a real VM: `with_ram` leaves one RAM slot per range, at the ranges' addresses (the
    /// 4 GiB guest has two, around the MMIO hole), and registering the same RAM again fails
    /// with the registry's overlap error.
    #[test]
    fn a_vm_made_with_ram_has_its_slots() {
        for size in [64 << 20, 4 << 30] {
            let ram = GuestRam::new(size).unwrap();
            let vm = Vm::with_ram(&ram, None).unwrap();
            let slots = vm.memslots().ram();
            assert_eq!(slots.len(), ram.ranges().len());
            for (s, r) in slots.iter().zip(ram.ranges()) {
                assert_eq!((s.gpa, s.size), (r.gpa, r.size));
            }
            let again = vm.register_ram(&ram);
            assert!(matches!(again, Err(VmError::Memslot { .. })), "{again:?}");
        }
    }
}
