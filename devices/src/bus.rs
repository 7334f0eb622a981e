//! An address bus: guest-physical (MMIO) or port ranges mapped to devices.
//!
//! Not rust-vmm's `vm-device` bus: its `write` cannot tell the vCPU what to do next, and a write
//! here can end in a CPU reset (i8042 0xfe) or a VM exit. The bus is small enough to own.
//!
//! The map changes while vCPUs run (PCI BAR reprogramming): readers resolve through an
//! `arc-swap` snapshot (no lock on the hot path, which every PIO/MMIO exit takes), and each
//! change publishes a whole new map at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

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

// Keyed by base address; ranges never overlap, so the last range starting at or below an
// address is the only one that can contain it.
type Ranges = BTreeMap<u64, Mapping>;

struct Shared {
    /// The current map. Readers load it without a lock (arc-swap's loads do not block and are
    /// not blocked by a store); a change builds a new map and swaps it in with one store, so an
    /// access resolves against the old map or the new one, never a half-changed one.
    ranges: ArcSwap<Ranges>,
    /// Serialises changes: each builds on the map it loads, so two at once would lose one.
    writer: Mutex<()>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            ranges: ArcSwap::from_pointee(Ranges::new()),
            writer: Mutex::new(()),
        }
    }
}

/// Address ranges mapped to devices.
///
/// Cloning is cheap (one `Arc`), so each vCPU thread holds its own `Bus`; every clone shares one
/// map, and a change made through any of them (insert, remove, relocate) is seen by all of them
/// from the moment it returns. A guest can thus reprogram a BAR while other vCPUs run.
///
/// The map is never locked while a device runs: an access resolves its device on a snapshot of
/// the map and then calls it, so a device's write may itself change the bus (a PCI config write
/// moving a BAR) without deadlock. An access that resolved just before a change completes on the
/// device it found, as if it had happened just before the change; after [`Bus::remove`]
/// returns, such an access may still be running in the removed device.
#[derive(Clone, Default)]
pub struct Bus {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges = self.shared.ranges.load();
        f.debug_list()
            .entries(ranges.iter().map(|(base, m)| (*base, m.len)))
            .finish()
    }
}

/// Checks that `[base, base + len)` is a valid range that overlaps nothing in `ranges`.
fn check_free(ranges: &Ranges, base: u64, len: u64) -> Result<(), BusError> {
    if len == 0 {
        return Err(BusError::ZeroLength(base));
    }
    // `end` is inclusive so that a range ending exactly at u64::MAX is allowed.
    let end = base
        .checked_add(len - 1)
        .ok_or(BusError::Overflow { base, len })?;
    // The only range that can overlap is the last one starting at or below `end`.
    if let Some((&other, m)) = ranges.range(..=end).next_back() {
        if other.saturating_add(m.len - 1) >= base {
            return Err(BusError::Overlap { base, len, other });
        }
    }
    Ok(())
}

/// The device containing the whole access `[addr, addr + len)`, and its base.
fn resolve(ranges: &Ranges, addr: u64, len: usize) -> Result<(u64, &Mapping), BusError> {
    let (&base, m) = ranges
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

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds the next map from the current one with `change` and publishes it in one store;
    /// on an error nothing is published.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut Ranges) -> Result<T, BusError>,
    ) -> Result<T, BusError> {
        // A panic in another change leaves the published map as it was (it only ever edits a
        // private copy), so a poisoned lock guards nothing broken.
        let _writer = self
            .shared
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut next = Ranges::clone(&self.shared.ranges.load());
        let out = change(&mut next)?;
        self.shared.ranges.store(Arc::new(next));
        Ok(out)
    }

    /// Maps `dev` at `[base, base + len)`, for every clone of this bus.
    ///
    /// Takes `&mut self` as it always has (callers build their buses through `&mut`); the
    /// change is nonetheless shared, like [`Bus::remove`] and [`Bus::relocate`].
    pub fn insert(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        self.update(|ranges| {
            check_free(ranges, base, len)?;
            ranges.insert(base, Mapping { len, dev });
            Ok(())
        })
    }

    /// Unmaps the range that starts at `base` and returns its device.
    pub fn remove(&self, base: u64) -> Result<Arc<Mutex<dyn BusDevice>>, BusError> {
        self.update(|ranges| {
            ranges
                .remove(&base)
                .map(|m| m.dev)
                .ok_or(BusError::NoDevice(base))
        })
    }

    /// Moves the range that starts at `old_base` to start at `new_base`, keeping its length and
    /// device (a guest reprogramming a BAR). Atomic: every access sees the device at the old
    /// base or at the new one, never at neither. The new range may overlap the old one.
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        self.update(|ranges| {
            let m = ranges
                .remove(&old_base)
                .ok_or(BusError::NoDevice(old_base))?;
            // Checked without the moved range itself; on an error `ranges` is discarded.
            check_free(ranges, new_base, m.len)?;
            ranges.insert(new_base, m);
            Ok(())
        })
    }

    /// Reads from the device mapped at `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        // The guard keeps this snapshot alive but is no lock: a store (even one made by this
        // device, on this thread) does not wait for it.
        let ranges = self.shared.ranges.load();
        let (base, m) = resolve(&ranges, addr, data.len())?;
        // A poisoned lock means a thread panicked inside this device: its state cannot be
        // trusted, so report it rather than panic this vCPU or carry on with it.
        let mut dev = m.dev.lock().map_err(|_| BusError::Poisoned(base))?;
        dev.read(addr - base, data);
        Ok(())
    }

    /// Writes to the device mapped at `addr`; the result says what the vCPU should do next.
    /// The device may change this bus from inside its write.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<VcpuAction, BusError> {
        let ranges = self.shared.ranges.load();
        let (base, m) = resolve(&ranges, addr, data.len())?;
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
    fn remove_unmaps_and_returns_the_device() {
        let dev = probe();
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x100, 0x10).unwrap();
        bus.insert(probe(), 0x200, 0x10).unwrap();
        // Only a range's base names it.
        assert!(matches!(bus.remove(0x108), Err(BusError::NoDevice(0x108))));
        let removed = bus.remove(0x100).unwrap();
        removed.lock().unwrap().write(1, &[9]);
        assert_eq!(dev.lock().unwrap().last_write, Some((1, vec![9])));
        assert_eq!(bus.write(0x100, &[1]), Err(BusError::NoDevice(0x100)));
        assert!(matches!(bus.remove(0x100), Err(BusError::NoDevice(0x100))));
        // The neighbour is untouched and the freed range can be mapped again.
        assert_eq!(bus.write(0x200, &[1]), Ok(VcpuAction::Continue));
        bus.insert(probe(), 0x100, 0x10).unwrap();
    }

    #[test]
    fn relocate_moves_the_range_and_keeps_offsets_relative() {
        let dev = probe();
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x1000, 0x10).unwrap();
        bus.relocate(0x1000, 0x8000).unwrap();
        assert_eq!(bus.write(0x1004, &[1]), Err(BusError::NoDevice(0x1004)));
        assert_eq!(bus.write(0x8004, &[1]), Ok(VcpuAction::Continue));
        assert_eq!(dev.lock().unwrap().last_write, Some((4, vec![1])));
        let mut data = [0u8; 1];
        bus.read(0x800f, &mut data).unwrap();
        assert_eq!(data, [0xf]);
        assert_eq!(bus.read(0x8010, &mut data), Err(BusError::NoDevice(0x8010)));
        // Onto part of its own old range, and back: it only ever overlaps itself.
        bus.relocate(0x8000, 0x8008).unwrap();
        bus.relocate(0x8008, 0x8000).unwrap();
        bus.read(0x8000, &mut data).unwrap();
        assert_eq!(data, [0]);
    }

    #[test]
    fn relocate_rejects_missing_overlapping_and_overflowing_targets() {
        let mut bus = Bus::new();
        bus.insert(probe(), 0x100, 0x10).unwrap();
        bus.insert(probe(), 0x200, 0x10).unwrap();
        assert_eq!(bus.relocate(0x300, 0x400), Err(BusError::NoDevice(0x300)));
        assert_eq!(bus.relocate(0x104, 0x400), Err(BusError::NoDevice(0x104)));
        for base in [0x1f8, 0x200, 0x20f] {
            assert_eq!(
                bus.relocate(0x100, base),
                Err(BusError::Overlap {
                    base,
                    len: 0x10,
                    other: 0x200
                })
            );
        }
        assert_eq!(
            bus.relocate(0x100, u64::MAX - 4),
            Err(BusError::Overflow {
                base: u64::MAX - 4,
                len: 0x10
            })
        );
        // A refused move leaves the device where it was.
        let mut data = [0u8; 1];
        bus.read(0x105, &mut data).unwrap();
        assert_eq!(data, [5]);
        assert_eq!(bus.read(0x1f8, &mut data), Err(BusError::NoDevice(0x1f8)));
        // Touching the neighbour's ends is fine.
        bus.relocate(0x100, 0x1f0).unwrap();
        bus.relocate(0x1f0, 0x210).unwrap();
    }

    #[test]
    fn changes_through_any_clone_reach_every_clone() {
        let mut bus = Bus::new();
        let vcpu = bus.clone();
        bus.insert(probe(), 0x60, 5).unwrap();
        assert_eq!(vcpu.write(0x60, &[1]), Ok(VcpuAction::Continue));
        vcpu.relocate(0x60, 0x70).unwrap();
        assert_eq!(bus.write(0x60, &[1]), Err(BusError::NoDevice(0x60)));
        assert_eq!(bus.write(0x74, &[1]), Ok(VcpuAction::Continue));
        bus.remove(0x70).unwrap();
        assert_eq!(vcpu.write(0x74, &[1]), Err(BusError::NoDevice(0x74)));
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
