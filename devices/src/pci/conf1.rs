//! PCI configuration mechanism #1 (PCI 3.0 3.2.2.3.2): a dword address register at 0xCF8
//! (bit 31 enable, bus 23:16, device 15:11, function 10:8, register 7:2) and a data window at
//! 0xCFC..0xCFF through which byte, word and dword accesses reach that register's bytes.
//!
//! As a [`BusDevice`] inserted on the port I/O bus at [`CONFIG_ADDRESS_PORT`] for
//! [`CONFIG_IO_LEN`] ports. With the enable bit clear, data reads return all ones and writes
//! are dropped. Accesses that are not whole dwords at 0xCF8 update only the bytes they cover
//! (like Cloud Hypervisor); reserved bits 30:24 and 1:0 always read zero.

use std::sync::{Arc, Mutex};

use super::root::{PciAddress, PciRoot};
use crate::bus::{BusDevice, VcpuAction};

pub const CONFIG_ADDRESS_PORT: u64 = 0xcf8;
/// 0xCF8..=0xCFF.
pub const CONFIG_IO_LEN: u64 = 8;
pub const CONFIG_ENABLE: u32 = 1 << 31;
/// Bits of the address register that hold something.
const ADDRESS_BITS: u32 = CONFIG_ENABLE | 0x00ff_fffc;
const DATA_OFFSET: u64 = 4;

/// Mechanism #1 over a shared [`PciRoot`].
#[derive(Debug)]
pub struct ConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl ConfigIo {
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        Self { root, address: 0 }
    }

    pub fn root(&self) -> &Arc<Mutex<PciRoot>> {
        &self.root
    }

    /// The address register as the guest last set it.
    pub fn address(&self) -> u32 {
        self.address
    }

    /// The function and register byte the data window at `offset` (0..4) reaches now.
    fn target(&self, offset: u64) -> Option<(PciAddress, usize)> {
        if self.address & CONFIG_ENABLE == 0 {
            return None;
        }
        let a = self.address;
        let function = PciAddress::new((a >> 16) as u8, (a >> 11) as u8 & 0x1f, (a >> 8) as u8 & 7);
        let register = (a & 0xfc) as usize + usize::try_from(offset).ok()?;
        Some((function, register))
    }
}

/// Whether `[offset, offset + len)` lies in `[start, start + 4)`.
fn in_dword(offset: u64, len: usize, start: u64) -> bool {
    offset >= start
        && u64::try_from(len)
            .ok()
            .and_then(|l| offset.checked_add(l))
            .is_some_and(|end| end <= start + 4)
}

impl BusDevice for ConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if in_dword(offset, data.len(), 0) {
            let bytes = self.address.to_le_bytes();
            let start = offset as usize;
            data.copy_from_slice(&bytes[start..start + data.len()]);
        } else if in_dword(offset, data.len(), DATA_OFFSET) {
            match self.target(offset - DATA_OFFSET) {
                Some((function, register)) => {
                    let root = self.root.lock().unwrap_or_else(|p| p.into_inner());
                    root.config_read(function, register, data);
                }
                None => data.fill(0xff),
            }
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        if in_dword(offset, data.len(), 0) {
            let mut bytes = self.address.to_le_bytes();
            let start = offset as usize;
            bytes[start..start + data.len()].copy_from_slice(data);
            self.address = u32::from_le_bytes(bytes) & ADDRESS_BITS;
        } else if in_dword(offset, data.len(), DATA_OFFSET) {
            if let Some((function, register)) = self.target(offset - DATA_OFFSET) {
                let mut root = self.root.lock().unwrap_or_else(|p| p.into_inner());
                root.config_write(function, register, data);
            }
        }
        VcpuAction::Continue
    }
}
