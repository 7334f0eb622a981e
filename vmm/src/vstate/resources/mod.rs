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
    #[error(transparent)]
    Addresses(#[from] AddressError),
    #[error(transparent)]
    Interrupts(#[from] InterruptError),
}

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
    pub fn new(kvm: &Kvm, fd: &VmFd, ram_end: u64) -> Result<Self, ResourcesError> {
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ResourcesError::SupportedCpuid)?;
        let phys_bits = addresses::guest_phys_bits(&supported);
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
