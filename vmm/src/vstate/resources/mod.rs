//! The guest's resources, each with one owner (Firecracker's `vstate/resources.rs` is the
//! model): the memory slots (`memslots`, held by the `Vm` itself since every memslot ioctl
//! goes through it), the address map (port I/O, the 32-bit MMIO window, the 64-bit window sized
//! from the physical address bits) and the GSIs with their routing table. The VM holds one
//! `Resources` and one `MemSlots`; nothing else numbers slots, device addresses or GSIs.
//!
//! Each part has its own lock: placing a device's BARs and wiring its interrupts are
//! independent, and neither is on a vCPU's path.

pub mod addresses;
pub mod interrupts;
pub mod memslots;

use std::sync::{Mutex, MutexGuard};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VmFd};

pub use addresses::{AddressError, AddressMap};
pub use interrupts::{InterruptError, InterruptRouting};

#[derive(Debug, thiserror::Error)]
pub enum ResourcesError {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error(
        "--phys-bits {asked}: the guest can have {min} to {supported} physical address bits on \
         this host"
    )]
    PhysBits { asked: u8, min: u8, supported: u8 },
    #[error(transparent)]
    Addresses(#[from] AddressError),
    #[error(transparent)]
    Interrupts(#[from] InterruptError),
}

/// The fewest physical address bits a guest may be given: the 32-bit MMIO hole and RAM above
/// it need more than 32.
pub const MIN_PHYS_BITS: u8 = 36;

/// The owner of a VM's device addresses and interrupts.
#[derive(Debug)]
pub struct Resources {
    addresses: Mutex<AddressMap>,
    interrupts: Mutex<InterruptRouting>,
}

impl Resources {
    /// For a VM whose in-kernel irqchip exists already and whose RAM ends (exclusive) at
    /// `ram_end`. Sends the routing table once, so that from here on the table KVM has is the
    /// one kept here (it equals KVM's default until a route is added).
    /// `phys_limit`, when given, is the guest's physical address bits (at most what the host
    /// gives a guest): a smaller host's address space, as QEMU's `phys-bits`.
    pub fn new(
        kvm: &Kvm,
        fd: &VmFd,
        ram_end: u64,
        phys_limit: Option<u8>,
    ) -> Result<Self, ResourcesError> {
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ResourcesError::SupportedCpuid)?;
        let mut phys_bits = addresses::guest_phys_bits(&supported);
        if let Some(asked) = phys_limit {
            if !(MIN_PHYS_BITS..=phys_bits).contains(&asked) {
                return Err(ResourcesError::PhysBits {
                    asked,
                    min: MIN_PHYS_BITS,
                    supported: phys_bits,
                });
            }
            phys_bits = asked;
        }
        let addresses = AddressMap::new(ram_end, phys_bits)?;
        let interrupts = InterruptRouting::new()?;
        interrupts.send(fd)?;
        Ok(Self {
            addresses: Mutex::new(addresses),
            interrupts: Mutex::new(interrupts),
        })
    }

    pub fn addresses(&self) -> MutexGuard<'_, AddressMap> {
        self.addresses.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn interrupts(&self) -> MutexGuard<'_, InterruptRouting> {
        self.interrupts.lock().unwrap_or_else(|p| p.into_inner())
    }
}
