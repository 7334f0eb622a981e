//! PCI as the guest sees it: a host bridge at 00:00.0 behind configuration mechanism #1
//! (`conf1`, `root`), type-0 config spaces with capabilities and BARs (`config`, `bar`), MSI-X
//! and MSI (`msix`, `msi`) whose vectors the owner routes through KVM (`vectors`), and the
//! [`PciDevice`] trait an emulated or passed-through function implements (`device`).
//!
//! Hand-written, not a crate: rust-vmm's `vm-device` has a bus and interrupt traits but no PCI;
//! Cloud Hypervisor's and Firecracker's `pci` crates are not published as libraries (and bring
//! their own bus, interrupt manager and snapshot types); nothing on crates.io models a config
//! space with masks, BAR sizing and MSI-X emulation without a VMM attached. The PCI rules here
//! are small and specified (PCI Local Bus 3.0, 6.x), so owning them costs less than adapting.
//!
//! The VMM wires it into every VM (`vmm::machine::pci`): [`ConfigIo`] on its port I/O bus,
//! each function's [`BarLayout::placement_requests`] placed in its address map, a
//! [`BarRange`] per BAR on its buses, [`ConfigEvent`]s acted on through [`PciEvents`], and
//! vectors routed through its [`VectorRoutes`].

pub mod bar;
pub mod conf1;
pub mod config;
pub mod device;
pub mod host_bridge;
pub mod msi;
pub mod msix;
pub mod root;
pub mod vectors;

/// A test function with the H100's BARs and MSI-X, and a recording mock of the owner's routes,
/// for this crate's tests and (feature `test-utils`) the VMM's wiring tests.
#[cfg(any(test, feature = "test-utils"))]
pub mod test_device;

pub use bar::{Bar, BarError, BarKind, BarLayout, BarSlot, PlacementRequest};
pub use conf1::{ConfigIo, CONFIG_ADDRESS_PORT, CONFIG_IO_LEN};
pub use config::{Capability, ConfigError, ConfigEvent, ConfigHeader, ConfigSpace};
pub use device::{BarRange, PciDevice};
pub use host_bridge::HostBridge;
pub use msi::{Msi, MsiError};
pub use msix::{Msix, MsixError, MsixLayout};
pub use root::{PciAddress, PciEvents, PciRoot, RootError};
pub use vectors::{Delivery, MsiMessage, RouteError, VectorRoutes};

#[cfg(test)]
mod bar_tests;
#[cfg(test)]
mod config_tests;
#[cfg(test)]
mod msi_tests;
#[cfg(test)]
mod msix_tests;
#[cfg(test)]
mod root_tests;
