//! What regions a PCI function decodes: its BARs and expansion ROM, checked once so that the
//! config space built from them and the placement requests handed to the address map can rely
//! on every size being a power of two and every 64-bit BAR having its upper register.

use std::fmt;

/// Registers a type-0 header has for BARs (0x10..0x28).
pub const BAR_COUNT: usize = 6;
/// Smallest memory BAR the PCI spec allows (the four flag bits sit below it).
pub const MIN_MEM_BAR: u64 = 16;
/// Smallest I/O BAR (two flag bits).
pub const MIN_IO_BAR: u64 = 4;
/// Largest I/O BAR the PCI spec allows.
pub const MAX_IO_BAR: u64 = 256;
/// Smallest expansion ROM: its address field starts at bit 11.
pub const MIN_ROM: u64 = 2048;
/// Memory BARs are placed at least page aligned, so each can be a memslot or trapped alone.
pub const MIN_MEM_ALIGN: u64 = 4096;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BarError {
    #[error("BAR{index}: there are only {BAR_COUNT} BAR registers")]
    Index { index: u8 },
    #[error("BAR{index} (64-bit) needs BAR{} for its upper half, past the last register", index + 1)]
    NoUpperHalf { index: u8 },
    #[error("{slot} is given twice (a 64-bit BAR takes its register and the next)")]
    Taken { slot: BarSlot },
    #[error("{slot}: size {size:#x} is not a power of two")]
    NotPowerOfTwo { slot: BarSlot, size: u64 },
    #[error("{slot}: size {size:#x} is outside [{min:#x}, {max:#x}] for its kind")]
    SizeOutOfRange {
        slot: BarSlot,
        size: u64,
        min: u64,
        max: u64,
    },
}

/// Which register of a function a region belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BarSlot {
    Bar(u8),
    Rom,
}

impl fmt::Display for BarSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BarSlot::Bar(i) => write!(f, "BAR{i}"),
            BarSlot::Rom => f.write_str("ROM"),
        }
    }
}

/// What kind of address a BAR decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32 { prefetchable: bool },
    Mem64 { prefetchable: bool },
}

impl BarKind {
    pub fn is_64bit(self) -> bool {
        matches!(self, BarKind::Mem64 { .. })
    }
    pub fn is_prefetchable(self) -> bool {
        matches!(
            self,
            BarKind::Mem32 { prefetchable: true } | BarKind::Mem64 { prefetchable: true }
        )
    }
    /// The read-only low bits of the BAR register (PCI 3.0 6.2.5.1).
    pub fn flags(self) -> u32 {
        match self {
            BarKind::Io => 0x1,
            BarKind::Mem32 { prefetchable } => u32::from(prefetchable) << 3,
            BarKind::Mem64 { prefetchable } => 0x4 | u32::from(prefetchable) << 3,
        }
    }
    /// The low bits that are flags, not address.
    pub fn flag_mask(self) -> u32 {
        match self {
            BarKind::Io => 0x3,
            _ => 0xf,
        }
    }
}

/// One BAR a function implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// Its register, 0..=5 (a 64-bit BAR also takes `index + 1`).
    pub index: u8,
    pub kind: BarKind,
    pub size: u64,
}

/// A function's BARs and ROM, checked: use [`BarLayout::new`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BarLayout {
    bars: Vec<Bar>,
    rom: Option<u64>,
}

/// One region for the address map to place: plain data, so `devices` needs nothing from the
/// VMM (the VMM turns it into its own request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlacementRequest {
    pub slot: BarSlot,
    pub size: u64,
    /// Natural alignment (a BAR decodes by its size), at least a page for memory.
    pub align: u64,
    pub prefetchable: bool,
    /// Can be placed above 4 GiB (a 64-bit memory BAR).
    pub is_64bit: bool,
    /// Port I/O rather than memory.
    pub io: bool,
}

impl BarLayout {
    /// Checks `bars` and `rom` (the ROM's size, if there is one): registers in range and not
    /// shared, sizes powers of two within what each kind can decode.
    pub fn new(bars: &[Bar], rom: Option<u64>) -> Result<Self, BarError> {
        let mut taken = [false; BAR_COUNT];
        for bar in bars {
            let slot = BarSlot::Bar(bar.index);
            let first = usize::from(bar.index);
            if first >= BAR_COUNT {
                return Err(BarError::Index { index: bar.index });
            }
            let regs = if bar.kind.is_64bit() {
                if first + 1 >= BAR_COUNT {
                    return Err(BarError::NoUpperHalf { index: bar.index });
                }
                first..first + 2
            } else {
                first..first + 1
            };
            for r in regs {
                if taken[r] {
                    return Err(BarError::Taken { slot });
                }
                taken[r] = true;
            }
            let (min, max) = match bar.kind {
                BarKind::Io => (MIN_IO_BAR, MAX_IO_BAR),
                BarKind::Mem32 { .. } => (MIN_MEM_BAR, 1 << 31),
                BarKind::Mem64 { .. } => (MIN_MEM_BAR, 1 << 63),
            };
            check_size(slot, bar.size, min, max)?;
        }
        if let Some(size) = rom {
            check_size(BarSlot::Rom, size, MIN_ROM, 1 << 31)?;
        }
        let mut bars = bars.to_vec();
        bars.sort_by_key(|b| b.index);
        Ok(Self { bars, rom })
    }

    /// The BARs, by register.
    pub fn bars(&self) -> &[Bar] {
        &self.bars
    }

    /// The BAR whose (lower) register is `index`.
    pub fn bar(&self, index: u8) -> Option<&Bar> {
        self.bars.iter().find(|b| b.index == index)
    }

    /// The ROM's size, if there is one.
    pub fn rom(&self) -> Option<u64> {
        self.rom
    }

    /// What the address map must place for this function, BARs by register then the ROM.
    pub fn placement_requests(&self) -> Vec<PlacementRequest> {
        let mut out: Vec<PlacementRequest> = self
            .bars
            .iter()
            .map(|b| {
                let io = b.kind == BarKind::Io;
                PlacementRequest {
                    slot: BarSlot::Bar(b.index),
                    size: b.size,
                    align: if io {
                        b.size
                    } else {
                        b.size.max(MIN_MEM_ALIGN)
                    },
                    prefetchable: b.kind.is_prefetchable(),
                    is_64bit: b.kind.is_64bit(),
                    io,
                }
            })
            .collect();
        if let Some(size) = self.rom {
            out.push(PlacementRequest {
                slot: BarSlot::Rom,
                size,
                align: size.max(MIN_MEM_ALIGN),
                prefetchable: false,
                is_64bit: false,
                io: false,
            });
        }
        out
    }
}

fn check_size(slot: BarSlot, size: u64, min: u64, max: u64) -> Result<(), BarError> {
    if !size.is_power_of_two() {
        return Err(BarError::NotPowerOfTwo { slot, size });
    }
    if size < min || size > max {
        return Err(BarError::SizeOutOfRange {
            slot,
            size,
            min,
            max,
        });
    }
    Ok(())
}
