//! What the PCI root needs from a function, and the adapter that puts one of its BARs on a bus.

use std::sync::{Arc, Mutex};

use super::bar::{BarLayout, BarSlot};
use super::config::{ConfigError, ConfigEvent};
use crate::bus::{BusDevice, VcpuAction};

/// A PCI function: an emulated device, or a passed-through one whose config space is a shadow.
pub trait PciDevice: Send {
    /// A guest config read of `data.len()` bytes at `offset` (any size, any offset; bytes past
    /// the function's space read as all ones).
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// A guest config write; returns what the owner must act on (BAR moves, decode changes).
    fn config_write(&mut self, offset: usize, data: &[u8]) -> Vec<ConfigEvent>;
    /// A trapped guest read of BAR `slot` at `offset` from the BAR's start.
    fn bar_read(&mut self, slot: BarSlot, offset: u64, data: &mut [u8]);
    /// A trapped guest write of BAR `slot` at `offset` from the BAR's start.
    fn bar_write(&mut self, slot: BarSlot, offset: u64, data: &[u8]);
    /// The BARs and ROM it decodes (what the address map places).
    fn bar_layout(&self) -> BarLayout;
    /// Firmware's placement of `slot` at `address`, before the guest runs (no event).
    fn set_bar_address(&mut self, slot: BarSlot, address: u64) -> Result<(), ConfigError>;
}

/// One BAR of a function as a [`BusDevice`], to insert on the MMIO (or port I/O) bus at the
/// BAR's address; moved with `Bus::relocate` when the guest reprograms the BAR.
pub struct BarRange {
    device: Arc<Mutex<dyn PciDevice>>,
    slot: BarSlot,
}

impl BarRange {
    pub fn new(device: Arc<Mutex<dyn PciDevice>>, slot: BarSlot) -> Self {
        Self { device, slot }
    }

    pub fn slot(&self) -> BarSlot {
        self.slot
    }
}

impl BusDevice for BarRange {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.device.lock() {
            Ok(mut d) => d.bar_read(self.slot, offset, data),
            Err(_) => {
                tracing::warn!("{} read: its device panicked earlier", self.slot);
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        match self.device.lock() {
            Ok(mut d) => d.bar_write(self.slot, offset, data),
            Err(_) => tracing::warn!("{} write: its device panicked earlier", self.slot),
        }
        VcpuAction::Continue
    }
}
