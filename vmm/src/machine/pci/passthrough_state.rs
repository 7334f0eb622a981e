//! What the guest programmed into a passed-through function, as VMM-side device state: its
//! config space as the guest reads it and its MSI-X table. The device's own state (registers,
//! memory, engines) is not here: it moves through VFIO migration (`migration::devices`).
//!
//! Restoring replays the guest's writes through the same paths the guest's own accesses take
//! (the root bus for config space, the function's BAR for the MSI-X table), so BAR moves,
//! memory decode, MSI-X routes and eventfds follow exactly as they did on the source; nothing
//! is set behind the bus's back.

use std::sync::{Arc, Mutex};

use devices::pci::{BarSlot, PciAddress, PciDevice};
use devices::state::{DeviceStateError, Stateful};
use devices::vfio::passthrough::PassthroughDevice;
use serde::{Deserialize, Serialize};

use super::Pci;

/// The kind a passed-through function's state is saved as.
pub const KIND: &str = "vfio-pci-function";
const VERSION: u32 = 1;
/// Conventional config space: what the guest can program (no extended capabilities here).
const CONFIG_BYTES: usize = 256;
const COMMAND: usize = 0x04;
const BARS: std::ops::Range<usize> = 0x10..0x28;
const ROM: usize = 0x30;
const INTERRUPT_LINE: usize = 0x3c;
const MSI_CAP_ID: u16 = 0x05;
const MSIX_CAP_ID: u16 = 0x11;

/// The saved state: plain bytes, checked against the function they land on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestView {
    /// Config space bytes 0..256 as the guest reads them.
    pub config: Vec<u8>,
    /// The MSI-X table as the guest wrote it (empty without MSI-X).
    pub msix_table: Vec<u8>,
}

/// A passed-through function registered among the VM's stateful devices.
pub struct PassthroughState {
    pci: Pci,
    function: PciAddress,
    device: Arc<Mutex<PassthroughDevice>>,
}

impl PassthroughState {
    pub fn new(pci: Pci, function: PciAddress, device: Arc<Mutex<PassthroughDevice>>) -> Self {
        Self {
            pci,
            function,
            device,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PassthroughDevice> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn save_view(&self) -> GuestView {
        let mut dev = self.lock();
        let mut config = vec![0u8; CONFIG_BYTES];
        for (i, chunk) in config.chunks_mut(4).enumerate() {
            dev.config_read(i * 4, chunk);
        }
        let mut msix_table = Vec::new();
        if let Some((bar, offset, len)) = dev.msix_table() {
            msix_table = vec![0u8; len as usize];
            for (i, chunk) in msix_table.chunks_mut(4).enumerate() {
                dev.bar_read(BarSlot::Bar(bar), offset + i as u64 * 4, chunk);
            }
        }
        GuestView { config, msix_table }
    }

    /// Checks `view` against this function (same identity, same MSI-X table size), then
    /// replays it. Nothing is written when the check fails.
    pub fn restore_view(&self, view: &GuestView) -> Result<(), DeviceStateError> {
        let bad = |why: String| DeviceStateError::Passthrough(why);
        if view.config.len() != CONFIG_BYTES {
            return Err(bad(format!(
                "config space of {} bytes, expected {CONFIG_BYTES}",
                view.config.len()
            )));
        }
        let (ids, table, caps) = {
            let mut dev = self.lock();
            let mut ids = [0u8; 4];
            dev.config_read(0, &mut ids);
            let caps: Vec<(u16, usize)> = dev
                .config()
                .capabilities()
                .iter()
                .filter(|c| !c.extended)
                .map(|c| (c.id, c.offset))
                .collect();
            (ids, dev.msix_table(), caps)
        };
        if view.config[..4] != ids {
            return Err(bad(format!(
                "the state is for PCI device {:02x}{:02x}:{:02x}{:02x}, this function is \
                 {:02x}{:02x}:{:02x}{:02x}",
                view.config[1],
                view.config[0],
                view.config[3],
                view.config[2],
                ids[1],
                ids[0],
                ids[3],
                ids[2]
            )));
        }
        let table_len = table.map_or(0, |(_, _, len)| len as usize);
        if view.msix_table.len() != table_len {
            return Err(bad(format!(
                "MSI-X table of {} bytes, this function's has {table_len}",
                view.msix_table.len()
            )));
        }
        let cfg = &view.config;
        // Capability offsets come from the device (a vfio-user server may be hostile): a
        // capability placed at the very end of config space must not index past it.
        let write = |offset: usize, len: usize| {
            let Some(bytes) = offset.checked_add(len).and_then(|end| cfg.get(offset..end)) else {
                return;
            };
            let mut root = self.pci.root().lock().unwrap_or_else(|p| p.into_inner());
            root.config_write(self.function, offset, bytes);
        };
        // Decode off while the BARs move, as a guest reprogramming them would have it.
        {
            let mut root = self.pci.root().lock().unwrap_or_else(|p| p.into_inner());
            let mut command = [0u8; 2];
            root.config_read(self.function, COMMAND, &mut command);
            let off = u16::from_le_bytes(command) & !0x3;
            root.config_write(self.function, COMMAND, &off.to_le_bytes());
        }
        for offset in BARS.step_by(4) {
            write(offset, 4);
        }
        write(ROM, 4);
        write(INTERRUPT_LINE, 1);
        if let Some((bar, offset, _)) = table {
            let mut dev = self.lock();
            for (i, entry) in view.msix_table.chunks(4).enumerate() {
                dev.bar_write(BarSlot::Bar(bar), offset + i as u64 * 4, entry);
            }
        }
        write(COMMAND, 2);
        // MSI's address and data before its control word; MSI-X's control (enable, mask)
        // last of all, once the table it enables is in place.
        for &(id, at) in &caps {
            if id == MSI_CAP_ID {
                for offset in (at + 4..(at + 24).min(CONFIG_BYTES)).step_by(4) {
                    write(offset, 4);
                }
                write(at + 2, 2);
            }
        }
        for &(id, at) in &caps {
            if id == MSIX_CAP_ID {
                write(at + 2, 2);
            }
        }
        Ok(())
    }
}

impl Stateful for PassthroughState {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn state_version(&self) -> u32 {
        VERSION
    }

    fn save(&self) -> Result<serde_json::Value, DeviceStateError> {
        devices::state::to_data(&self.save_view())
    }

    fn restore(&mut self, data: &serde_json::Value) -> Result<(), DeviceStateError> {
        let view: GuestView = devices::state::from_data(data)?;
        self.restore_view(&view)
    }
}
