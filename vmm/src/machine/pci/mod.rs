//! PCI in every VM: the root bus with its host bridge at 00:00.0 behind configuration
//! mechanism #1 on ports 0xCF8..0xCFF (a Linux guest without ACPI finds PCI this way:
//! PASSTHROUGH.md), and the glue a PCI function needs from the VMM:
//! - `mappings`: its BARs placed through the address map and put on the buses, guest BAR
//!   moves followed on the buses and in `DeviceBar` memslots ([`BarMappings`], the root's
//!   [`BarEvents`]);
//! - `routes`: its MSI/MSI-X vectors as KVM MSI routes with irqfds ([`MsiRoutes`]).
//!
//! A guest that never touches the ports (the micro guest) never sees any of it.

pub mod mappings;
pub mod mig_v2;
pub mod passthrough;
pub mod passthrough_state;
pub mod routes;

use std::sync::{Arc, Mutex, MutexGuard};

use devices::bus::{Bus, BusError};
use devices::pci::{
    ConfigIo, PciAddress, PciDevice, PciRoot, RootError, CONFIG_ADDRESS_PORT, CONFIG_IO_LEN,
};

pub use mappings::{BarError, BarEvents, BarMappings, MappedPiece};
pub use passthrough::{AttachError, Attached, DeviceSpec, SpecError};
pub use routes::{MsiRoutes, RoutesError};

use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("putting PCI configuration mechanism #1 at port {CONFIG_ADDRESS_PORT:#x}: {0}")]
    ConfigIo(#[source] BusError),
    #[error("adding {device} to PCI bus 0: {source}")]
    Root {
        device: String,
        #[source]
        source: RootError,
    },
    #[error("{device}: {source}")]
    Bars {
        device: String,
        #[source]
        source: BarError,
    },
}

/// The VM's PCI bus 0 and the owner of its functions' BARs (a clone is a handle to the same).
#[derive(Clone)]
pub struct Pci {
    root: Arc<Mutex<PciRoot>>,
    bars: Arc<Mutex<BarMappings>>,
}

impl std::fmt::Debug for Pci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pci")
            .field("root", &self.root)
            .field("bars", &self.bars)
            .finish()
    }
}

impl Pci {
    /// The root with its host bridge, mechanism #1 on `pio`, guest BAR moves going to the
    /// BAR mappings over `pio` and `mmio` (the buses the vCPUs dispatch to).
    pub fn new(vm: Arc<Vm>, pio: &mut Bus, mmio: &Bus) -> Result<Self, PciError> {
        let bars = Arc::new(Mutex::new(BarMappings::new(vm, pio.clone(), mmio.clone())));
        let mut root = PciRoot::new();
        root.set_events(Box::new(BarEvents(bars.clone())));
        let root = Arc::new(Mutex::new(root));
        pio.insert(
            Arc::new(Mutex::new(ConfigIo::new(root.clone()))),
            CONFIG_ADDRESS_PORT,
            CONFIG_IO_LEN,
        )
        .map_err(PciError::ConfigIo)?;
        Ok(Self { root, bars })
    }

    pub fn root(&self) -> &Arc<Mutex<PciRoot>> {
        &self.root
    }

    /// The BAR mappings (to map a passed-through BAR's mmap'd pieces). Do not hold the guard
    /// while locking the root (see the lock order on [`BarMappings`]).
    pub fn bars(&self) -> MutexGuard<'_, BarMappings> {
        self.bars.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `device` as function 0 of the next free device number on bus 0 with its BARs
    /// placed, programmed and on the buses. `name` is for messages.
    pub fn add_device(
        &self,
        name: &str,
        device: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<PciAddress, PciError> {
        let mut root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        let function = root
            .add_device(device.clone())
            .map_err(|source| PciError::Root {
                device: name.to_string(),
                source,
            })?;
        // The root stays locked until the BARs are placed, so no guest config access reaches
        // the function half-placed (root before the mappings: their lock order).
        if let Err(source) = self.bars().place(name, function, &device) {
            let _ = root.remove_device(function);
            return Err(PciError::Bars {
                device: name.to_string(),
                source,
            });
        }
        tracing::info!("{name}: PCI function {function}");
        Ok(function)
    }

    /// Removes the function at `function` and everything its BARs held.
    pub fn remove_device(&self, function: PciAddress) -> Result<(), PciError> {
        let mut root = self.root.lock().unwrap_or_else(|p| p.into_inner());
        root.remove_device(function)
            .map_err(|source| PciError::Root {
                device: function.to_string(),
                source,
            })?;
        self.bars()
            .remove(function)
            .map_err(|source| PciError::Bars {
                device: function.to_string(),
                source,
            })
    }
}

#[cfg(test)]
mod tests;
