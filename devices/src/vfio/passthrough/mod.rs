//! One passed-through PCI function over a transport trait (PASSTHROUGH.md, Cloud Hypervisor's
//! split): [`VfioTransport`] is the host side (kernel VFIO in `kernel`, vfio-user in `user`, a
//! mock for unit tests in `mock`); [`PassthroughDevice`] is everything the guest sees, built
//! once over it: the config shadow (`shadow`), BARs, MSI-X, DMA, reset and teardown
//! (`device`).
//!
//! Wiring into the VMM (not done here):
//! 1. Open a transport ([`UserTransport::connect`], or [`KernelTransport::new`] over
//!    [`crate::vfio::open::open`]) and [`PassthroughDevice::new`] it with the owner's
//!    [`PassthroughRoutes`] (one eventfd per MSI-X vector, the same the owner's irqfd uses).
//! 2. [`PassthroughDevice::map_guest_memory`] with all guest RAM (IOVA = GPA; vfio-user needs
//!    file-backed RAM).
//! 3. Place `bar_layout().placement_requests()` (64-bit BARs in the 64-bit window, naturally
//!    aligned), `set_bar_address` each, put the function on the `PciRoot`, a `BarRange` per BAR
//!    on the MMIO (or port I/O) bus, and each [`MappedPiece`] of [`PassthroughDevice::map_bars`]
//!    as a `DeviceBar` memory slot at the BAR's address + `bar_offset`.
//! 4. On `ConfigEvent::BarMoved`, move the BAR's range and its pieces' slots.
//! 5. On guest reset, [`PassthroughDevice::reset`]. Before dropping the device, remove its
//!    slots (the mappings die with it); Drop disables MSI-X and unmaps DMA.

pub mod device;
pub mod kernel;
pub mod map;
pub mod shadow;
pub mod transport;
pub mod user;

#[cfg(test)]
mod device_tests;
#[cfg(test)]
pub mod mock;

pub use device::{BarPiece, MappedPiece, PassthroughDevice, PassthroughError, PassthroughRoutes};
pub use kernel::{KernelError, KernelTransport};
pub use map::{BarMap, MapError};
pub use shadow::ShadowError;
pub use transport::{
    DeviceInfo, DeviceMigration, DmaRegion, IrqInfo, MigState, MigrationCaps, MmapArea,
    PrecopyInfo, RegionFile, RegionInfo, TransportError, VfioTransport,
};
pub use user::{UserError, UserTransport};

/// An error and its sources on one line, for logs.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
