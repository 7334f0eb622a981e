//! The host bridge at 00:00.0: a function with no BARs and class 0x0600, there so that Linux's
//! check of configuration mechanism #1 (`pci_sanity_check`: a host bridge or VGA device on bus
//! 0) accepts the mechanism and scans the bus.

use super::bar::{BarLayout, BarSlot};
use super::config::{ConfigError, ConfigEvent, ConfigHeader, ConfigSpace};
use super::device::PciDevice;

/// Intel's vendor id with the device id Cloud Hypervisor and Firecracker give their host
/// bridges; drivers bind nothing to it.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x8086;
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0d57;
pub const CLASS_BRIDGE: u8 = 0x06;
pub const SUBCLASS_HOST_BRIDGE: u8 = 0x00;

#[derive(Debug, Clone)]
pub struct HostBridge {
    cfg: ConfigSpace,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    pub fn new() -> Self {
        let header = ConfigHeader {
            vendor_id: HOST_BRIDGE_VENDOR_ID,
            device_id: HOST_BRIDGE_DEVICE_ID,
            class_code: CLASS_BRIDGE,
            subclass: SUBCLASS_HOST_BRIDGE,
            ..ConfigHeader::default()
        };
        Self {
            cfg: ConfigSpace::new(&header, BarLayout::default(), false),
        }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.cfg.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) -> Vec<ConfigEvent> {
        self.cfg.write(offset, data)
    }
    fn bar_read(&mut self, _slot: BarSlot, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _slot: BarSlot, _offset: u64, _data: &[u8]) {}
    fn bar_layout(&self) -> BarLayout {
        BarLayout::default()
    }
    fn set_bar_address(&mut self, slot: BarSlot, address: u64) -> Result<(), ConfigError> {
        self.cfg.set_bar_address(slot, address)
    }
}
