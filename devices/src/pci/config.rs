//! A type-0 configuration space: 256 bytes, or 4 KiB with the PCIe extended space, where each
//! register has a mask of the bits the guest may write and a mask of the bits it clears by
//! writing one (RW1C); every other bit is read-only to the guest and set by the device itself.
//!
//! BAR registers need no special casing for sizing: a BAR's write mask is its address bits, so
//! the all-ones probe reads back the size mask with the read-only type flags. What the config
//! space adds is bookkeeping the owner needs: a write returns [`ConfigEvent`]s ("BAR2 moved to
//! X", "memory decode off", "the MSI-X capability was written"), so the owner can relocate the
//! BAR's range on the bus or reprogram interrupt routes.
//!
//! Guest accesses of any size at any offset are served byte by byte: bytes outside the space
//! read as all ones and writes to them are dropped.

use super::bar::{BarKind, BarLayout, BarSlot, BAR_COUNT};

pub const CONFIG_SIZE: usize = 256;
pub const EXTENDED_CONFIG_SIZE: usize = 4096;

pub const VENDOR_ID: usize = 0x00;
pub const DEVICE_ID: usize = 0x02;
pub const COMMAND: usize = 0x04;
pub const STATUS: usize = 0x06;
pub const REVISION_ID: usize = 0x08;
pub const CLASS_PROG_IF: usize = 0x09;
pub const SUBCLASS: usize = 0x0a;
pub const CLASS_CODE: usize = 0x0b;
pub const HEADER_TYPE: usize = 0x0e;
pub const BAR0: usize = 0x10;
pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const SUBSYSTEM_ID: usize = 0x2e;
pub const ROM_BAR: usize = 0x30;
pub const CAPABILITIES_POINTER: usize = 0x34;
pub const INTERRUPT_LINE: usize = 0x3c;
pub const INTERRUPT_PIN: usize = 0x3d;
/// Where the first standard capability goes (the type-0 header ends here).
pub const FIRST_CAPABILITY: usize = 0x40;

pub const COMMAND_IO: u16 = 1 << 0;
pub const COMMAND_MEMORY: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Bits of the command register a guest may write: I/O, memory, bus master, parity error
/// response, SERR#, INTx disable.
pub const COMMAND_WRITABLE: u16 = 0x0547;
pub const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Error bits of the status register, cleared by writing one.
pub const STATUS_RW1C: u16 = 0xf900;
pub const ROM_ENABLE: u32 = 1;
const ROM_ADDRESS_MASK: u32 = 0xffff_f800;

// Dword indexes of registers with side effects.
const COMMAND_DWORD: usize = COMMAND / 4;
const BAR0_DWORD: usize = BAR0 / 4;
const ROM_DWORD: usize = ROM_BAR / 4;
/// More links than fit in the space means a loop (a device's capability list is its data).
const MAX_STANDARD_CAPS: usize = (CONFIG_SIZE - FIRST_CAPABILITY) / 4;
const MAX_EXTENDED_CAPS: usize = (EXTENDED_CONFIG_SIZE - CONFIG_SIZE) / 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("no room for capability {id:#x} of {len} bytes at {offset:#x}")]
    NoRoom { id: u16, len: usize, offset: usize },
    #[error("capability {id:#x}: {mask} write-mask bytes for {body} body bytes")]
    MaskLength { id: u16, mask: usize, body: usize },
    #[error("extended capabilities need the {EXTENDED_CONFIG_SIZE}-byte config space")]
    NotExtended,
    #[error("{slot} is not implemented")]
    NoSuchBar { slot: BarSlot },
    #[error("{slot}: address {address:#x} is not aligned to its size {size:#x} or out of reach")]
    BadAddress {
        slot: BarSlot,
        address: u64,
        size: u64,
    },
    #[error("{len} bytes at {offset:#x} run past the config space")]
    OutOfRange { offset: usize, len: usize },
}

/// The identity registers of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConfigHeader {
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u8,
    pub class_code: u8,
    pub subclass: u8,
    pub prog_if: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// INTx pin (1 = INTA#), 0 for none.
    pub interrupt_pin: u8,
}

/// What a guest write changed that the owner has to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigEvent {
    /// A BAR (or the ROM) now decodes at `to`: relocate its range. Sizing probes (all address
    /// bits written as ones) are not moves; a 64-bit BAR is reported when its upper half is
    /// written, which every guest does after the lower half.
    BarMoved { slot: BarSlot, from: u64, to: u64 },
    /// The command register's memory space enable changed.
    MemoryDecode(bool),
    /// The command register's I/O space enable changed.
    IoDecode(bool),
    /// The ROM BAR's enable bit changed.
    RomDecode(bool),
    /// Bytes of the capability at `offset` were written (the MSI/MSI-X message control).
    Capability {
        id: u16,
        extended: bool,
        offset: usize,
    },
}

/// A capability found by walking the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    pub id: u16,
    pub offset: usize,
    pub extended: bool,
}

/// A capability added here, with its length (the list itself holds no lengths).
#[derive(Debug, Clone, Copy)]
struct Added {
    cap: Capability,
    len: usize,
}

/// A function's configuration space. See the module comment.
#[derive(Debug, Clone)]
pub struct ConfigSpace {
    regs: Vec<u32>,
    writable: Vec<u32>,
    rw1c: Vec<u32>,
    layout: BarLayout,
    /// Where each BAR (by lower register) and the ROM decode as last reported to the owner.
    placed: [u64; BAR_COUNT],
    rom_placed: u64,
    added: Vec<Added>,
    next_standard: usize,
    next_extended: usize,
}

impl ConfigSpace {
    /// A space with `header`'s identity, `layout`'s BARs and ROM (all at address 0), and the
    /// extended 4 KiB if `extended`.
    pub fn new(header: &ConfigHeader, layout: BarLayout, extended: bool) -> Self {
        let size = if extended {
            EXTENDED_CONFIG_SIZE
        } else {
            CONFIG_SIZE
        };
        let mut cfg = Self {
            regs: vec![0; size / 4],
            writable: vec![0; size / 4],
            rw1c: vec![0; size / 4],
            layout: BarLayout::default(),
            placed: [0; BAR_COUNT],
            rom_placed: 0,
            added: Vec::new(),
            next_standard: FIRST_CAPABILITY,
            next_extended: CONFIG_SIZE,
        };
        cfg.regs[0] = u32::from(header.vendor_id) | u32::from(header.device_id) << 16;
        cfg.regs[REVISION_ID / 4] = u32::from(header.revision_id)
            | u32::from(header.prog_if) << 8
            | u32::from(header.subclass) << 16
            | u32::from(header.class_code) << 24;
        cfg.regs[SUBSYSTEM_VENDOR_ID / 4] =
            u32::from(header.subsystem_vendor_id) | u32::from(header.subsystem_id) << 16;
        cfg.regs[INTERRUPT_LINE / 4] = u32::from(header.interrupt_pin) << 8;
        cfg.writable[COMMAND_DWORD] = u32::from(COMMAND_WRITABLE);
        cfg.rw1c[COMMAND_DWORD] = u32::from(STATUS_RW1C) << 16;
        // Cache line size and latency timer: plain storage.
        cfg.writable[0x0c / 4] = 0xffff;
        cfg.writable[INTERRUPT_LINE / 4] = 0xff;
        for bar in layout.bars() {
            let i = BAR0_DWORD + usize::from(bar.index);
            let mask = !(bar.size - 1);
            cfg.regs[i] = bar.kind.flags();
            cfg.writable[i] = mask as u32 & !bar.kind.flag_mask();
            if bar.kind.is_64bit() {
                cfg.writable[i + 1] = (mask >> 32) as u32;
            }
        }
        if let Some(size) = layout.rom() {
            cfg.writable[ROM_DWORD] = (!(size - 1) as u32 & ROM_ADDRESS_MASK) | ROM_ENABLE;
        }
        cfg.layout = layout;
        cfg
    }

    /// Its size in bytes: 256 or 4096.
    pub fn len(&self) -> usize {
        self.regs.len() * 4
    }

    pub fn is_empty(&self) -> bool {
        self.regs.is_empty()
    }

    pub fn bar_layout(&self) -> &BarLayout {
        &self.layout
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the end read as 0xff.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i)
                .and_then(|o| self.byte(o))
                .unwrap_or(0xff);
        }
    }

    fn byte(&self, offset: usize) -> Option<u8> {
        let reg = self.regs.get(offset / 4)?;
        Some((reg >> (8 * (offset % 4))) as u8)
    }

    /// The dword at `offset & !3`, all ones past the end (for the owner's own use).
    pub fn read_u32(&self, offset: usize) -> u32 {
        self.regs.get(offset / 4).copied().unwrap_or(u32::MAX)
    }

    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut b = [0; 2];
        self.read(offset, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u8(&self, offset: usize) -> u8 {
        let mut b = [0; 1];
        self.read(offset, &mut b);
        b[0]
    }

    /// The device's own write: sets bytes regardless of the masks, with no events.
    pub fn set(&mut self, offset: usize, data: &[u8]) -> Result<(), ConfigError> {
        set_bytes(&mut self.regs, offset, data)
    }

    pub fn set_u16(&mut self, offset: usize, value: u16) -> Result<(), ConfigError> {
        self.set(offset, &value.to_le_bytes())
    }

    pub fn set_u32(&mut self, offset: usize, value: u32) -> Result<(), ConfigError> {
        self.set(offset, &value.to_le_bytes())
    }

    /// Makes the bits of `mask` in `mask.len()` bytes at `offset` writable by the guest (and the
    /// others read-only).
    pub fn set_write_mask(&mut self, offset: usize, mask: &[u8]) -> Result<(), ConfigError> {
        set_bytes(&mut self.writable, offset, mask)
    }

    /// Makes the bits of `mask` at `offset` write-one-to-clear for the guest.
    pub fn set_rw1c_mask(&mut self, offset: usize, mask: &[u8]) -> Result<(), ConfigError> {
        set_bytes(&mut self.rw1c, offset, mask)
    }

    /// A guest write of `data` at `offset`, through the masks. Returns what the owner must act
    /// on, in the order it happened.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Vec<ConfigEvent> {
        let mut events = Vec::new();
        let Some(end) = offset.checked_add(data.len()) else {
            return events;
        };
        let end = end.min(self.len());
        let mut o = offset;
        while o < end {
            let dword = o / 4;
            let stop = ((dword + 1) * 4).min(end);
            let (mut value, mut bytes) = (0u32, 0u32);
            for (p, b) in (o..stop).zip(&data[o - offset..]) {
                let shift = 8 * (p % 4);
                value |= u32::from(*b) << shift;
                bytes |= 0xff << shift;
            }
            self.write_dword(dword, value, bytes, &mut events);
            self.note_capabilities(o, stop, &mut events);
            o = stop;
        }
        events
    }

    fn write_dword(&mut self, dword: usize, value: u32, bytes: u32, events: &mut Vec<ConfigEvent>) {
        let old = self.regs[dword];
        let writable = self.writable[dword] & bytes;
        let mut new = (old & !writable) | (value & writable);
        new &= !(value & self.rw1c[dword] & bytes);
        self.regs[dword] = new;
        match dword {
            COMMAND_DWORD => {
                let changed = old ^ new;
                if changed & u32::from(COMMAND_MEMORY) != 0 {
                    events.push(ConfigEvent::MemoryDecode(
                        new & u32::from(COMMAND_MEMORY) != 0,
                    ));
                }
                if changed & u32::from(COMMAND_IO) != 0 {
                    events.push(ConfigEvent::IoDecode(new & u32::from(COMMAND_IO) != 0));
                }
            }
            d if (BAR0_DWORD..BAR0_DWORD + BAR_COUNT).contains(&d) => {
                self.check_bar_move(d - BAR0_DWORD, events)
            }
            ROM_DWORD => {
                if (old ^ new) & ROM_ENABLE != 0 {
                    events.push(ConfigEvent::RomDecode(new & ROM_ENABLE != 0));
                }
                let mask = self.writable[ROM_DWORD] & ROM_ADDRESS_MASK;
                let to = u64::from(new & mask);
                if mask != 0 && new & mask != mask && to != self.rom_placed {
                    let from = std::mem::replace(&mut self.rom_placed, to);
                    events.push(ConfigEvent::BarMoved {
                        slot: BarSlot::Rom,
                        from,
                        to,
                    });
                }
            }
            _ => {}
        }
    }

    /// After a write to BAR register `reg`: reports a move of the BAR it belongs to.
    fn check_bar_move(&mut self, reg: usize, events: &mut Vec<ConfigEvent>) {
        let Some(bar) = self.layout.bars().iter().find(|b| {
            let i = usize::from(b.index);
            i == reg || (b.kind.is_64bit() && i + 1 == reg)
        }) else {
            return;
        };
        let index = usize::from(bar.index);
        if bar.kind.is_64bit() && reg == index {
            // The lower half of a 64-bit BAR: wait for the upper half.
            return;
        }
        let lower = BAR0_DWORD + index;
        let upper = if bar.kind.is_64bit() {
            lower + 1
        } else {
            lower
        };
        let mask = self.writable[upper];
        if mask != 0 && self.regs[upper] & mask == mask {
            return; // Sizing: every address bit written as one.
        }
        let to = self.bar_address_of(index, bar.kind);
        if to != self.placed[index] {
            let from = std::mem::replace(&mut self.placed[index], to);
            events.push(ConfigEvent::BarMoved {
                slot: BarSlot::Bar(bar.index),
                from,
                to,
            });
        }
    }

    fn bar_address_of(&self, index: usize, kind: BarKind) -> u64 {
        let lower = BAR0_DWORD + index;
        let lo = u64::from(self.regs[lower] & !kind.flag_mask());
        if kind.is_64bit() {
            lo | u64::from(self.regs[lower + 1]) << 32
        } else {
            lo
        }
    }

    fn note_capabilities(&self, start: usize, end: usize, events: &mut Vec<ConfigEvent>) {
        for a in &self.added {
            let o = a.cap.offset;
            if start < o + a.len && o < end {
                let ev = ConfigEvent::Capability {
                    id: a.cap.id,
                    extended: a.cap.extended,
                    offset: o,
                };
                if !events.contains(&ev) {
                    events.push(ev);
                }
            }
        }
    }

    /// The address `slot` decodes at now (its registers, whatever the command register says).
    pub fn bar_address(&self, slot: BarSlot) -> Option<u64> {
        match slot {
            BarSlot::Bar(i) => {
                let bar = self.layout.bar(i)?;
                Some(self.bar_address_of(usize::from(i), bar.kind))
            }
            BarSlot::Rom => {
                self.layout.rom()?;
                Some(u64::from(self.regs[ROM_DWORD] & ROM_ADDRESS_MASK))
            }
        }
    }

    /// The owner placing a BAR (firmware's job): sets its address with no event.
    pub fn set_bar_address(&mut self, slot: BarSlot, address: u64) -> Result<(), ConfigError> {
        let (size, reach) = match slot {
            BarSlot::Bar(i) => {
                let bar = *self.layout.bar(i).ok_or(ConfigError::NoSuchBar { slot })?;
                let reach = match bar.kind {
                    BarKind::Mem64 { .. } => u64::MAX,
                    BarKind::Io => u64::from(u16::MAX),
                    BarKind::Mem32 { .. } => u64::from(u32::MAX),
                };
                (bar.size, reach)
            }
            BarSlot::Rom => (
                self.layout.rom().ok_or(ConfigError::NoSuchBar { slot })?,
                u64::from(u32::MAX),
            ),
        };
        if address % size != 0 || address > reach {
            return Err(ConfigError::BadAddress {
                slot,
                address,
                size,
            });
        }
        match slot {
            BarSlot::Bar(i) => {
                let index = usize::from(i);
                let lower = BAR0_DWORD + index;
                let flags = self.regs[lower] & self.layout.bar(i).map_or(0, |b| b.kind.flag_mask());
                self.regs[lower] = address as u32 | flags;
                if self.layout.bar(i).is_some_and(|b| b.kind.is_64bit()) {
                    self.regs[lower + 1] = (address >> 32) as u32;
                }
                self.placed[index] = address;
            }
            BarSlot::Rom => {
                let enable = self.regs[ROM_DWORD] & ROM_ENABLE;
                self.regs[ROM_DWORD] = address as u32 | enable;
                self.rom_placed = address;
            }
        }
        Ok(())
    }

    /// Whether the command register enables memory decode.
    pub fn memory_enabled(&self) -> bool {
        self.read_u16(COMMAND) & COMMAND_MEMORY != 0
    }

    /// Whether the command register enables I/O decode.
    pub fn io_enabled(&self) -> bool {
        self.read_u16(COMMAND) & COMMAND_IO != 0
    }

    /// Appends a standard capability: `id`, the link, then `body`, whose bits set in
    /// `write_mask` (one byte per body byte) the guest may write. Returns its offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        write_mask: &[u8],
    ) -> Result<usize, ConfigError> {
        let wide = u16::from(id);
        if body.len() != write_mask.len() {
            return Err(ConfigError::MaskLength {
                id: wide,
                mask: write_mask.len(),
                body: body.len(),
            });
        }
        let offset = self.next_standard;
        let len = 2 + body.len();
        if offset + len > CONFIG_SIZE {
            return Err(ConfigError::NoRoom {
                id: wide,
                len,
                offset,
            });
        }
        self.set(offset, &[id, 0])?;
        self.set(offset + 2, body)?;
        self.set_write_mask(offset + 2, write_mask)?;
        match self.last_added(false) {
            Some(prev) => self.set(prev + 1, &[offset as u8])?,
            None => {
                self.set(CAPABILITIES_POINTER, &[offset as u8])?;
                let status = self.read_u16(STATUS) | STATUS_CAPABILITIES;
                self.set_u16(STATUS, status)?;
            }
        }
        self.next_standard = (offset + len).next_multiple_of(4);
        self.added.push(Added {
            cap: Capability {
                id: wide,
                offset,
                extended: false,
            },
            len,
        });
        Ok(offset)
    }

    /// Appends a PCIe extended capability (at 0x100 and up): its 4-byte header (`id`,
    /// `version`, the link), then `body` with `write_mask` as for [`Self::add_capability`].
    pub fn add_extended_capability(
        &mut self,
        id: u16,
        version: u8,
        body: &[u8],
        write_mask: &[u8],
    ) -> Result<usize, ConfigError> {
        if self.len() < EXTENDED_CONFIG_SIZE {
            return Err(ConfigError::NotExtended);
        }
        if body.len() != write_mask.len() {
            return Err(ConfigError::MaskLength {
                id,
                mask: write_mask.len(),
                body: body.len(),
            });
        }
        let offset = self.next_extended;
        let len = 4 + body.len();
        if offset + len > EXTENDED_CONFIG_SIZE {
            return Err(ConfigError::NoRoom { id, len, offset });
        }
        self.set_u32(offset, u32::from(id) | u32::from(version & 0xf) << 16)?;
        self.set(offset + 4, body)?;
        self.set_write_mask(offset + 4, write_mask)?;
        if let Some(prev) = self.last_added(true) {
            let header = self.read_u32(prev) & 0x000f_ffff;
            self.set_u32(prev, header | (offset as u32) << 20)?;
        }
        self.next_extended = (offset + len).next_multiple_of(4);
        self.added.push(Added {
            cap: Capability {
                id,
                offset,
                extended: true,
            },
            len,
        });
        Ok(offset)
    }

    /// Registers a capability already in the bytes (a passed-through device's, at the device's
    /// offset) as one the owner emulates: guest writes to its `len` bytes report
    /// [`ConfigEvent::Capability`]. Its write mask is set apart ([`Self::set_write_mask`]).
    pub fn adopt_capability(&mut self, cap: Capability, len: usize) -> Result<(), ConfigError> {
        match cap.offset.checked_add(len) {
            Some(end) if end <= self.len() => {}
            _ => {
                return Err(ConfigError::NoRoom {
                    id: cap.id,
                    len,
                    offset: cap.offset,
                })
            }
        }
        self.added.push(Added { cap, len });
        Ok(())
    }

    fn last_added(&self, extended: bool) -> Option<usize> {
        self.added
            .iter()
            .rev()
            .find(|a| a.cap.extended == extended)
            .map(|a| a.cap.offset)
    }

    /// Walks the capability lists as a guest would, from the bytes (so it also works on a
    /// passed-through device's shadow): the standard list from the capabilities pointer, then
    /// the extended list from 0x100. Stops at a link out of range or a loop.
    pub fn capabilities(&self) -> Vec<Capability> {
        let mut out = Vec::new();
        if self.read_u16(STATUS) & STATUS_CAPABILITIES != 0 {
            let mut ptr = usize::from(self.read_u8(CAPABILITIES_POINTER) & 0xfc);
            while ptr >= FIRST_CAPABILITY && out.len() < MAX_STANDARD_CAPS {
                out.push(Capability {
                    id: u16::from(self.read_u8(ptr)),
                    offset: ptr,
                    extended: false,
                });
                ptr = usize::from(self.read_u8(ptr + 1) & 0xfc);
            }
        }
        if self.len() >= EXTENDED_CONFIG_SIZE {
            let mut ptr = CONFIG_SIZE;
            let mut walked = 0;
            while ptr >= CONFIG_SIZE && walked < MAX_EXTENDED_CAPS {
                let header = self.read_u32(ptr);
                if header == 0 || header == u32::MAX {
                    break;
                }
                out.push(Capability {
                    id: header as u16,
                    offset: ptr,
                    extended: true,
                });
                walked += 1;
                ptr = (header >> 20) as usize & 0xffc;
            }
        }
        out
    }

    /// The offset of the first capability with `id` (standard or extended as asked).
    pub fn find_capability(&self, id: u16, extended: bool) -> Option<usize> {
        self.capabilities()
            .into_iter()
            .find(|c| c.id == id && c.extended == extended)
            .map(|c| c.offset)
    }
}

fn set_bytes(regs: &mut [u32], offset: usize, bytes: &[u8]) -> Result<(), ConfigError> {
    let out = ConfigError::OutOfRange {
        offset,
        len: bytes.len(),
    };
    match offset.checked_add(bytes.len()) {
        Some(end) if end <= regs.len() * 4 => {}
        _ => return Err(out),
    }
    for (i, b) in bytes.iter().enumerate() {
        let o = offset + i;
        let shift = 8 * (o % 4);
        let reg = &mut regs[o / 4];
        *reg = (*reg & !(0xff << shift)) | u32::from(*b) << shift;
    }
    Ok(())
}
