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
    #[error("registering guest RAM: {0}")]
    RegistrationThread(String),
    /// Boxed: it is rare (VM creation only) and much larger than the rest.
    #[error("setting up the guest's resources: {0}")]
    Resources(#[source] Box<ResourcesError>),
}

/// Guest RAM's memslots being registered on a thread of their own (`register_ram_in_background`).
/// Each KVM_SET_USER_MEMORY_REGION waits for an SRCU grace period (kvm_swap_active_memslots ->
/// synchronize_srcu): milliseconds spent asleep, the largest part of a micro guest's setup on
/// PVM, during which a fresh boot builds its devices and vCPUs and loads its images instead.
/// Joined on drop, so guest RAM is never unmapped while the ioctl may still run.
pub struct RamRegistration {
    handle: Option<std::thread::JoinHandle<Result<(), VmError>>>,
}

impl RamRegistration {
    /// Waits for the registration and returns its result.
    pub fn wait(mut self) -> Result<(), VmError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), VmError> {
        match self.handle.take() {
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(VmError::RegistrationThread(
                    "its thread panicked".to_string(),
                ))
            }),
            None => Ok(()),
        }
    }
}

impl Drop for RamRegistration {
    fn drop(&mut self) {
        let _ = self.join();
    }
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

    /// `register_ram` on a thread of its own; `RamRegistration::wait` before anything needs the
    /// slots (a vCPU runs, a slot changes).
    pub fn register_ram_in_background(
        self: &Arc<Self>,
        ram: &GuestRam,
    ) -> Result<RamRegistration, VmError> {
        let vm = self.clone();
        let parts: Vec<(u64, u64, u64)> = ram
            .ranges()
            .iter()
            .zip(ram.host_addrs())
            .map(|(r, host)| (r.gpa, r.size, host))
            .collect();
        let handle = std::thread::Builder::new()
            .name("ram-slots".into())
            .spawn(move || {
                for (gpa, size, host) in parts {
                    // SAFETY: the host range is a live mapping owned by the machine's
                    // `GuestRam`, which the caller keeps until this thread is joined
                    // (`RamRegistration` joins on drop and is dropped before the RAM), and
                    // which outlives the VM as in `register_ram`.
                    unsafe { vm.memslots.add(SlotKind::Ram, gpa, size, host, 0) }.map_err(
                        |source| VmError::Memslot {
                            what: "registering guest RAM",
                            source,
                        },
                    )?;
                }
                Ok(())
            })
            .map_err(|e| VmError::RegistrationThread(format!("starting its thread: {e}")))?;
        Ok(RamRegistration {
            handle: Some(handle),
        })
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

    /// On a real VM: the background registration leaves one RAM slot per range, at the ranges'
    /// addresses, and a second registration of the same RAM fails with the registry's overlap
    /// error through `wait` (the thread's result is not lost).
    #[test]
    fn ram_registered_in_the_background_is_in_kvm_once_waited_for() {
        let ram = GuestRam::new(64 << 20).unwrap();
        let vm = Arc::new(Vm::new(ram.size()).unwrap());
        vm.register_ram_in_background(&ram).unwrap().wait().unwrap();
        let slots = vm.memslots().ram();
        assert_eq!(slots.len(), ram.ranges().len());
        for (s, r) in slots.iter().zip(ram.ranges()) {
            assert_eq!((s.gpa, s.size), (r.gpa, r.size));
        }
        let again = vm.register_ram_in_background(&ram).unwrap().wait();
        assert!(matches!(again, Err(VmError::Memslot { .. })), "{again:?}");
        // Dropped without waiting: the drop joins (nothing outlives `ram`).
        drop(vm.register_ram_in_background(&ram).unwrap());
    }
}
