//! PCI configuration space of a type 0 function: identity, three memory BARs, one MSI-X
//! capability.
//!
//! Every byte has a write mask; a write keeps the read-only bits and takes the writable ones.
//! BAR masks are the BAR's address bits, so the all-ones sizing probe reads back the size with
//! the flag bits, as on hardware.

use gpu_test_device::pci;

/// Command register bits a driver may set: I/O space, memory space, bus master.
const COMMAND_WRITABLE: u16 = 0x0007;
/// Command register: INTx disable.
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: capability list present.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// BAR flag bits: memory, 64-bit, prefetchable.
const BAR_MEM_64_PREFETCH: u32 = 0b1100;
/// MSI-X message control: enable and function mask.
const MSIX_CONTROL_WRITABLE: u16 = 0xc000;

/// Failures of a config access (the client gets EINVAL).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config access {offset:#x}+{len} outside the {size} bytes of config space")]
    OutOfRange { offset: u64, len: usize, size: u64 },
    #[error("restored config space: {len} bytes instead of {size}")]
    RestoreSize { len: usize, size: u64 },
    #[error("restored config space differs from this device's in read-only bits at {0:#x}")]
    ReadOnlyDiffers(usize),
}

/// The identity the device presents.
#[derive(Debug, Clone, Copy)]
pub struct Identity {
    pub vendor_id: u16,
    pub device_id: u16,
    pub msix_vectors: u16,
    pub vram_size: u64,
}

/// Config space contents and write masks.
pub struct ConfigSpace {
    bytes: [u8; pci::CONFIG_SIZE as usize],
    writable: [u8; pci::CONFIG_SIZE as usize],
}

impl ConfigSpace {
    /// Config space at reset: BARs unassigned, MSI-X disabled.
    pub fn new(id: Identity) -> Self {
        let mut config = Self {
            bytes: [0; pci::CONFIG_SIZE as usize],
            writable: [0; pci::CONFIG_SIZE as usize],
        };
        config.set16(0x00, id.vendor_id, 0);
        config.set16(0x02, id.device_id, 0);
        config.set16(0x04, 0, COMMAND_WRITABLE | COMMAND_INTX_DISABLE);
        config.set16(0x06, STATUS_CAP_LIST, 0);
        config.set32(0x08, pci::CLASS_CODE << 8 | u32::from(pci::REVISION_ID), 0);
        // Header type 0, single function.
        config.set_bar(0, pci::BAR0_SIZE, 0);
        config.set_bar(1, id.vram_size, BAR_MEM_64_PREFETCH);
        config.set_bar(3, pci::BAR3_SIZE, BAR_MEM_64_PREFETCH);
        config.set16(0x2c, id.vendor_id, 0);
        config.set16(0x2e, id.device_id, 0);
        config.bytes[0x34] = pci::MSIX_CAP_OFFSET;
        // Interrupt line is scratch for the OS; interrupt pin 0: no INTx.
        config.writable[0x3c] = 0xff;

        let cap = usize::from(pci::MSIX_CAP_OFFSET);
        config.bytes[cap] = 0x11;
        config.bytes[cap + 1] = 0;
        config.set16(cap + 2, id.msix_vectors - 1, MSIX_CONTROL_WRITABLE);
        // BIR 0 in the low three bits of both offsets.
        config.set32(cap + 4, pci::MSIX_TABLE_OFFSET as u32, 0);
        config.set32(cap + 8, pci::MSIX_PBA_OFFSET as u32, 0);
        config
    }

    /// Reads `data.len()` bytes from `offset`.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> Result<(), ConfigError> {
        let range = self.range(offset, data.len())?;
        data.copy_from_slice(&self.bytes[range]);
        Ok(())
    }

    /// Writes `data` at `offset`, bit by bit through the write masks.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ConfigError> {
        let range = self.range(offset, data.len())?;
        for (i, value) in range.zip(data) {
            let mask = self.writable[i];
            self.bytes[i] = (self.bytes[i] & !mask) | (value & mask);
        }
        Ok(())
    }

    /// Every byte, as a migration saves them (the write masks follow from the identity).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Takes the bytes a migration saved. Their read-only bits must be this device's own: a
    /// stream from a device of another identity or layout is refused, nothing changed.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), ConfigError> {
        if bytes.len() != self.bytes.len() {
            return Err(ConfigError::RestoreSize {
                len: bytes.len(),
                size: pci::CONFIG_SIZE,
            });
        }
        let differs =
            (0..bytes.len()).find(|&i| (bytes[i] ^ self.bytes[i]) & !self.writable[i] != 0);
        if let Some(at) = differs {
            return Err(ConfigError::ReadOnlyDiffers(at));
        }
        self.bytes.copy_from_slice(bytes);
        Ok(())
    }

    fn range(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, ConfigError> {
        let out = || ConfigError::OutOfRange {
            offset,
            len,
            size: pci::CONFIG_SIZE,
        };
        let start = usize::try_from(offset).map_err(|_| out())?;
        let end = start
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(out)?;
        Ok(start..end)
    }

    fn set16(&mut self, at: usize, value: u16, writable: u16) {
        self.bytes[at..at + 2].copy_from_slice(&value.to_le_bytes());
        self.writable[at..at + 2].copy_from_slice(&writable.to_le_bytes());
    }

    fn set32(&mut self, at: usize, value: u32, writable: u32) {
        self.bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
        self.writable[at..at + 4].copy_from_slice(&writable.to_le_bytes());
    }

    /// BAR `index` of `size` bytes (a power of two); 64-bit if `flags` says so, taking the
    /// next BAR as its upper half.
    fn set_bar(&mut self, index: usize, size: u64, flags: u32) {
        let at = 0x10 + 4 * index;
        let address_mask = !(size - 1);
        self.set32(at, flags, (address_mask as u32) & !0xf);
        if flags & 0b0100 != 0 {
            self.set32(at + 4, 0, (address_mask >> 32) as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ConfigSpace {
        ConfigSpace::new(Identity {
            vendor_id: 0x1234,
            device_id: 0x7e57,
            msix_vectors: 8,
            vram_size: 64 << 30,
        })
    }

    fn read32(config: &ConfigSpace, offset: u64) -> u32 {
        let mut data = [0; 4];
        config.read(offset, &mut data).unwrap();
        u32::from_le_bytes(data)
    }

    #[test]
    fn sizing_probe_reads_back_sizes_and_flags() {
        let mut config = config();
        for bar in 0..6 {
            config.write(0x10 + 4 * bar, &[0xff; 4]).unwrap();
        }
        assert_eq!(read32(&config, 0x10), 0xff00_0000);
        // 64 GiB: no low address bits; the upper half holds the size.
        assert_eq!(read32(&config, 0x14), 0x0000_000c);
        assert_eq!(read32(&config, 0x18), 0xffff_fff0);
        assert_eq!(read32(&config, 0x1c), 0xfe00_000c);
        assert_eq!(read32(&config, 0x20), 0xffff_ffff);
        assert_eq!(read32(&config, 0x24), 0);
    }

    #[test]
    fn identity_is_read_only() {
        let mut config = config();
        config.write(0, &[0; 4]).unwrap();
        assert_eq!(read32(&config, 0), 0x7e57_1234);
        assert_eq!(read32(&config, 8) >> 8, 0x03_02_00);
    }

    #[test]
    fn msix_control_takes_only_enable_and_mask() {
        let mut config = config();
        config.write(0x42, &0xffffu16.to_le_bytes()).unwrap();
        assert_eq!(read32(&config, 0x40), 0xc007_0011);
    }

    #[test]
    fn restore_takes_writable_bits_and_refuses_read_only_ones() {
        let mut source = config();
        source.write(0x04, &[0x06, 0]).unwrap();
        source.write(0x10, &[0, 0, 0, 0xc0]).unwrap();
        let mut target = config();
        target.restore(source.bytes()).unwrap();
        assert_eq!(target.bytes(), source.bytes());
        let mut other = source.bytes().to_vec();
        other[0] ^= 1;
        assert!(matches!(
            target.restore(&other),
            Err(ConfigError::ReadOnlyDiffers(0))
        ));
        assert!(target.restore(&other[..255]).is_err());
    }

    #[test]
    fn access_past_the_end_is_refused() {
        let config = config();
        assert!(config.read(254, &mut [0; 4]).is_err());
        assert!(config.read(u64::MAX, &mut [0; 1]).is_err());
    }
}
