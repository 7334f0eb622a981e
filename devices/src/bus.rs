//! An address bus: guest-physical (MMIO) or port ranges mapped to devices.
//!
//! Not rust-vmm's `vm-device` bus: its `write` cannot tell the vCPU what to do next, and a write
//! here can end in a CPU reset (i8042 0xfe) or a VM exit. The bus is small enough to own.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What the vCPU that made an access should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuAction {
    /// Carry on running the guest.
    Continue,
    /// The guest asked for a CPU reset (e.g. i8042 command 0xfe).
    Reset,
    /// A device ended the VM with this exit code.
    Exit(i32),
}

/// A device on a [`Bus`]. Offsets are relative to the base the device was inserted at; `data`
/// has the access size (1, 2, 4 or 8 bytes in practice, but a device must cope with any).
pub trait BusDevice: Send {
    /// Fills `data` with what the guest reads at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Applies a guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction;
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("no device at {0:#x}")]
    NoDevice(u64),
    #[error("access of {len} bytes at {addr:#x} runs past the end of its device")]
    Straddle { addr: u64, len: usize },
    #[error("device range at {0:#x} has length 0")]
    ZeroLength(u64),
    #[error("device range {base:#x}+{len:#x} overflows the address space")]
    Overflow { base: u64, len: u64 },
    #[error("device range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
    #[error("device at {0:#x} is unusable: a thread panicked while holding it")]
    Poisoned(u64),
}

#[derive(Clone)]
struct Mapping {
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// Address ranges mapped to devices.
///
/// Cloning is cheap (one `Arc`), so each vCPU thread holds its own `Bus`. A clone is a snapshot:
/// a device inserted afterwards is seen only by the `Bus` it was inserted into, so build the bus
/// completely before handing clones to vCPU threads.
#[derive(Clone, Default)]
pub struct Bus {
    // Keyed by base address; ranges never overlap, so the last range starting at or below an
    // address is the only one that can contain it.
    ranges: Arc<BTreeMap<u64, Mapping>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|(base, m)| (*base, m.len)))
            .finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `dev` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        // `end` is inclusive so that a range ending exactly at u64::MAX is allowed.
        let end = base
            .checked_add(len - 1)
            .ok_or(BusError::Overflow { base, len })?;
        // The only ranges that can overlap are the last one starting at or below `end`.
        if let Some((&other, m)) = self.ranges.range(..=end).next_back() {
            if other.saturating_add(m.len - 1) >= base {
                return Err(BusError::Overlap { base, len, other });
            }
        }
        Arc::make_mut(&mut self.ranges).insert(base, Mapping { len, dev });
        Ok(())
    }

    /// The device containing the whole access `[addr, addr + len)`, and the offset of `addr`.
    fn resolve(&self, addr: u64, len: usize) -> Result<(u64, &Mapping), BusError> {
        let (&base, m) = self
            .ranges
            .range(..=addr)
            .next_back()
            .ok_or(BusError::NoDevice(addr))?;
        let offset = addr - base;
        if offset >= m.len {
            return Err(BusError::NoDevice(addr));
        }
        let fits = u64::try_from(len)
            .ok()
            .and_then(|l| offset.checked_add(l))
            .is_some_and(|end| end <= m.len);
        if !fits {
            return Err(BusError::Straddle { addr, len });
        }
        Ok((base, m))
    }

    /// Reads from the device mapped at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (base, m) = self.resolve(addr, data.len())?;
        // A poisoned lock means a thread panicked inside this device: its state cannot be
        // trusted, so report it rather than panic this vCPU or carry on with it.
        let mut dev = m.dev.lock().map_err(|_| BusError::Poisoned(base))?;
        dev.read(addr - base, data);
        Ok(())
    }

    /// Writes to the device mapped at `addr`; the result says what the vCPU should do next.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<VcpuAction, BusError> {
        let (base, m) = self.resolve(addr, data.len())?;
        let mut dev = m.dev.lock().map_err(|_| BusError::Poisoned(base))?;
        Ok(dev.write(addr - base, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Remembers the last write and answers reads with the offset's low byte.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
            self.last_write = Some((offset, data.to_vec()));
            if data == [0xee] {
                VcpuAction::Exit(3)
            } else {
                VcpuAction::Continue
            }
        }
    }

    fn probe() -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe::default()))
    }

    #[test]
    fn insert_rejects_zero_length_overflow_and_overlap() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(probe(), 0x100, 0),
            Err(BusError::ZeroLength(0x100))
        );
        assert_eq!(
            bus.insert(probe(), u64::MAX, 2),
            Err(BusError::Overflow {
                base: u64::MAX,
                len: 2
            })
        );
        bus.insert(probe(), 0x100, 0x10).unwrap();
        // Same start, inside, straddling either end.
        for (base, len) in [(0x100, 1), (0x108, 2), (0xf8, 0x10), (0x10f, 0x10)] {
            assert_eq!(
                bus.insert(probe(), base, len),
                Err(BusError::Overlap {
                    base,
                    len,
                    other: 0x100
                })
            );
        }
        // Neighbours touching either end are fine, and so is the very top of the space.
        bus.insert(probe(), 0xf0, 0x10).unwrap();
        bus.insert(probe(), 0x110, 0x10).unwrap();
        bus.insert(probe(), u64::MAX, 1).unwrap();
    }

    #[test]
    fn accesses_reach_the_right_device_with_relative_offsets() {
        let (a, b) = (probe(), probe());
        let mut bus = Bus::new();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x400, 8).unwrap();

        let mut data = [0u8; 2];
        bus.read(0x3fa, &mut data).unwrap();
        assert_eq!(data, [2, 2]);
        assert_eq!(bus.write(0x404, &[7]), Ok(VcpuAction::Continue));
        assert_eq!(bus.write(0x400, &[0xee]), Ok(VcpuAction::Exit(3)));
        assert_eq!(b.lock().unwrap().last_write, Some((0, vec![0xee])));
        assert!(a.lock().unwrap().last_write.is_none());
    }

    #[test]
    fn unmapped_and_straddling_accesses_are_errors() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x100, 0x10).unwrap();
        let mut data = [0u8; 4];
        assert_eq!(bus.read(0xff, &mut data), Err(BusError::NoDevice(0xff)));
        assert_eq!(bus.read(0x110, &mut data), Err(BusError::NoDevice(0x110)));
        assert_eq!(
            bus.read(0x10e, &mut data),
            Err(BusError::Straddle {
                addr: 0x10e,
                len: 4
            })
        );
        assert_eq!(bus.write(0x0, &[1]), Err(BusError::NoDevice(0)));
        // The last bytes of the range are still reachable.
        bus.read(0x10c, &mut data).unwrap();
    }

    #[test]
    fn clones_share_devices() {
        let dev = probe();
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x60, 5).unwrap();
        let clone = bus.clone();
        clone.write(0x64, &[1]).unwrap();
        assert_eq!(dev.lock().unwrap().last_write, Some((4, vec![1])));
    }

    #[test]
    fn poisoned_device_is_an_error_not_a_panic() {
        let dev = probe();
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x60, 5).unwrap();
        let poisoner = dev.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock();
            panic!("poison the device lock");
        })
        .join();
        assert_eq!(bus.write(0x60, &[1]), Err(BusError::Poisoned(0x60)));
        let mut data = [0u8; 1];
        assert_eq!(bus.read(0x60, &mut data), Err(BusError::Poisoned(0x60)));
    }
}
