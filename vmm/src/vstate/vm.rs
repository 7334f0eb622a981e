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
            memslots: MemSlots::new(fd.clone()),
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

    /// One RAM memslot per RAM range, ids from the registry.
    pub fn register_ram(&self, ram: &GuestRam) -> Result<(), VmError> {
        for (range, host) in ram.ranges().iter().zip(ram.host_addrs()) {
            // SAFETY: the host range is a live mapping owned by the machine's `GuestRam`,
            // which outlives the VM (the machine drops the VM and its vCPUs before guest RAM).
            unsafe {
                self.memslots
                    .add(SlotKind::Ram, range.gpa, range.size, host, 0)
            }
            .map_err(|source| VmError::Memslot {
                what: "registering guest RAM",
                source,
            })?;
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
