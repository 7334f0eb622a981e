//! Where each PCI function's BARs are: their ranges on the port-I/O and MMIO buses and the
//! pieces of them mapped into the guest as `DeviceBar` memslots. [`BarMappings`] is the one
//! owner of both, so that a guest BAR move changes them together.
//!
//! Placing (firmware's job, before the guest runs): the address map places every BAR of a
//! function (`place_device`), the function's registers get those addresses, and a
//! [`BarRange`] per BAR goes on its bus. The address map keeps that placement reserved for the
//! function's lifetime; a guest move is honoured on the buses and memslots only (the guest
//! owns its BAR addresses, as on hardware), so a later device is never placed on a range a
//! moved BAR left.
//!
//! Moving: a guest write to a BAR register reaches [`BarMappings::moved`] through the root's
//! [`PciEvents`]. The bus range moves at once (`Bus::relocate`: every access sees the BAR at
//! the old or the new address); each mapped piece's memslot is deleted and added again at the
//! new address (KVM cannot move a slot), and between the two an access to the piece exits and
//! is served by the function itself through the bus, so nothing is lost. A move onto a range
//! another BAR still holds waits (logged) and is retried after every later move, which is how
//! a guest's two-step reshuffle settles; two BARs swapping addresses do not (Linux assigns
//! into free space and never swaps).
//!
//! Decode enables (command register) are not acted on: ranges stay where they are while decode
//! is off, which is what a guest sizing a BAR expects (it does not access a BAR meanwhile).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError};
use devices::pci::{
    BarRange, BarSlot, ConfigError, ConfigEvent, PciAddress, PciDevice, PciEvents, PlacementRequest,
};

use crate::vstate::resources::addresses::{AddressError, BarKind, BarPlacement, BarRequest};
use crate::vstate::resources::memslots::{MemSlotError, SlotKind};
use crate::vstate::vm::Vm;

const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BarError {
    /// Boxed: address errors are large. The address map's message names the device.
    #[error("placing the BARs: {source}")]
    Place {
        device: String,
        #[source]
        source: Box<AddressError>,
    },
    #[error("{device}: setting {slot} to {address:#x}: {source}")]
    SetAddress {
        device: String,
        slot: BarSlot,
        address: u64,
        #[source]
        source: ConfigError,
    },
    #[error("{device}: putting {slot} at {base:#x} (+{size:#x}) on the {bus} bus: {source}")]
    Bus {
        device: String,
        slot: BarSlot,
        base: u64,
        size: u64,
        bus: &'static str,
        #[source]
        source: BusError,
    },
    #[error("{function} has BARs placed already")]
    Placed { function: PciAddress },
    #[error("{function} {slot} is not placed")]
    NotPlaced { function: PciAddress, slot: BarSlot },
    #[error("{function} {slot}: an I/O BAR cannot be mapped into the guest")]
    IoBar { function: PciAddress, slot: BarSlot },
    #[error(
        "{function} {slot}: piece {offset:#x}+{size:#x} is not whole pages inside the BAR's \
         {bar_size:#x} bytes"
    )]
    Piece {
        function: PciAddress,
        slot: BarSlot,
        offset: u64,
        size: u64,
        bar_size: u64,
    },
    #[error("{function} {slot}: mapping {size:#x} bytes at {gpa:#x}: {source}")]
    Memslot {
        function: PciAddress,
        slot: BarSlot,
        gpa: u64,
        size: u64,
        #[source]
        source: MemSlotError,
    },
    #[error("{function} {slot}: moving its range from {from:#x} to {to:#x}: {source}")]
    Relocate {
        function: PciAddress,
        slot: BarSlot,
        from: u64,
        to: u64,
        #[source]
        source: BusError,
    },
}

/// A piece of a BAR backed by host memory (a passed-through device's mmap'd region).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedPiece {
    /// From the BAR's start, page aligned.
    pub offset: u64,
    pub size: u64,
    /// Host virtual address of the piece's first byte.
    pub host: u64,
    /// Its memslot while mapped; `None` after a move whose new address KVM refused (RAM
    /// there): accesses then trap to the function, and the next move retries.
    pub slot: Option<u32>,
}

/// One placed BAR.
#[derive(Debug, Clone)]
struct PlacedBar {
    placement: BarPlacement,
    io: bool,
    /// Where its bus range is.
    base: u64,
    /// Where the guest put it last (differs from `base` while a move waits for room).
    wanted: u64,
    pieces: Vec<MappedPiece>,
}

impl PlacedBar {
    fn size(&self) -> u64 {
        self.placement.range.size
    }
}

/// The owner of every PCI function's BAR ranges and BAR memslots. See the module comment.
///
/// Lock order: the root (a vCPU's config write holds it while the events arrive), then this,
/// then a function; [`BarMappings::place`] locks the function it places, which nothing else
/// reaches yet.
pub struct BarMappings {
    vm: Arc<Vm>,
    pio: Bus,
    mmio: Bus,
    bars: BTreeMap<(PciAddress, BarSlot), PlacedBar>,
    /// Functions whose memory decode the guest turned off: their pieces have no memslots
    /// (accesses trap to the function, which answers as a device not decoding would; a
    /// kernel-VFIO BAR mapping is revoked meanwhile, and a memslot over it would fail the
    /// vCPU with EFAULT).
    decode_off: std::collections::BTreeSet<PciAddress>,
}

impl std::fmt::Debug for BarMappings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(
                self.bars
                    .iter()
                    .map(|((a, s), b)| ((a, s), (b.base, b.size()))),
            )
            .finish()
    }
}

/// The address map's request for a BAR the function describes.
fn request_of(r: &PlacementRequest) -> BarRequest {
    let kind = if r.io {
        BarKind::Io
    } else if r.is_64bit {
        BarKind::Mem64 {
            prefetchable: r.prefetchable,
        }
    } else {
        BarKind::Mem32
    };
    BarRequest {
        slot: r.slot,
        kind,
        size: r.size,
    }
}

impl BarMappings {
    /// Mappings onto the VM's port-I/O and MMIO buses (clones of the ones the vCPUs use).
    pub fn new(vm: Arc<Vm>, pio: Bus, mmio: Bus) -> Self {
        Self {
            vm,
            pio,
            mmio,
            bars: BTreeMap::new(),
            decode_off: std::collections::BTreeSet::new(),
        }
    }

    fn bus(&self, io: bool) -> (&Bus, &'static str) {
        if io {
            (&self.pio, "port I/O")
        } else {
            (&self.mmio, "MMIO")
        }
    }

    /// Places every BAR (and the ROM) of `device`, the function at `function`, through the
    /// address map, writes the addresses into its registers and puts a [`BarRange`] per BAR
    /// on its bus; all of it or nothing. `name` is for messages. Call before the guest can
    /// reach the function (see the lock order on [`BarMappings`]).
    pub fn place(
        &mut self,
        name: &str,
        function: PciAddress,
        device: &Arc<Mutex<dyn PciDevice>>,
    ) -> Result<Vec<BarPlacement>, BarError> {
        if self.bars.keys().any(|(a, _)| *a == function) {
            return Err(BarError::Placed { function });
        }
        let lock = || device.lock().unwrap_or_else(|p| p.into_inner());
        let requests: Vec<BarRequest> = lock()
            .bar_layout()
            .placement_requests()
            .iter()
            .map(request_of)
            .collect();
        let placed = self
            .vm
            .resources()
            .addresses()
            .place_device(name, &requests)
            .map_err(|source| BarError::Place {
                device: name.to_string(),
                source: Box::new(source),
            })?;
        let result = self.put_on_buses(name, function, device, &placed);
        if let Err(e) = result {
            self.vm.resources().addresses().release_device(&placed);
            return Err(e);
        }
        for p in &placed {
            tracing::debug!(
                "{name} at {function}: {} at {:#x} (+{:#x})",
                p.request,
                p.range.base,
                p.range.size
            );
        }
        Ok(placed)
    }

    /// Sets the registers and inserts the ranges of `placed`; on an error removes what it
    /// inserted.
    fn put_on_buses(
        &mut self,
        name: &str,
        function: PciAddress,
        device: &Arc<Mutex<dyn PciDevice>>,
        placed: &[BarPlacement],
    ) -> Result<(), BarError> {
        {
            let mut dev = device.lock().unwrap_or_else(|p| p.into_inner());
            for p in placed {
                let slot = p.request.slot;
                dev.set_bar_address(slot, p.range.base)
                    .map_err(|source| BarError::SetAddress {
                        device: name.to_string(),
                        slot,
                        address: p.range.base,
                        source,
                    })?;
            }
        }
        let mut inserted: Vec<(bool, u64)> = Vec::new();
        for p in placed {
            let slot = p.request.slot;
            let io = p.request.kind == BarKind::Io && matches!(slot, BarSlot::Bar(_));
            let range = Arc::new(Mutex::new(BarRange::new(device.clone(), slot)));
            let (bus, bus_name) = self.bus(io);
            let mut bus = bus.clone();
            if let Err(source) = bus.insert(range, p.range.base, p.range.size) {
                for (io, base) in inserted {
                    let _ = self.bus(io).0.remove(base);
                }
                return Err(BarError::Bus {
                    device: name.to_string(),
                    slot,
                    base: p.range.base,
                    size: p.range.size,
                    bus: bus_name,
                    source,
                });
            }
            inserted.push((io, p.range.base));
        }
        for p in placed {
            let slot = p.request.slot;
            let io = p.request.kind == BarKind::Io && matches!(slot, BarSlot::Bar(_));
            self.bars.insert(
                (function, slot),
                PlacedBar {
                    placement: *p,
                    io,
                    base: p.range.base,
                    wanted: p.range.base,
                    pieces: Vec::new(),
                },
            );
        }
        Ok(())
    }

    /// Where `slot` of `function` is on its bus now, if placed.
    pub fn base(&self, function: PciAddress, slot: BarSlot) -> Option<u64> {
        self.bars.get(&(function, slot)).map(|b| b.base)
    }

    /// The mapped pieces of `slot` of `function`.
    pub fn pieces(&self, function: PciAddress, slot: BarSlot) -> Vec<MappedPiece> {
        self.bars
            .get(&(function, slot))
            .map_or_else(Vec::new, |b| b.pieces.clone())
    }

    /// Maps `size` bytes at `offset` into BAR `slot` of `function` straight into the guest:
    /// a `DeviceBar` memslot backed by host memory at `host`, which follows the BAR when the
    /// guest moves it. Accesses there no longer reach the function. Returns the memslot id, or None while the
    /// function does not decode memory (the slot is added when it does).
    ///
    /// # Safety
    /// `host..host + size` must stay a valid mapping until [`BarMappings::unmap`] or
    /// [`BarMappings::remove`] for this function, or until the VM is dropped (KVM maps it
    /// into the guest).
    pub unsafe fn map(
        &mut self,
        function: PciAddress,
        slot: BarSlot,
        offset: u64,
        size: u64,
        host: u64,
    ) -> Result<Option<u32>, BarError> {
        let bar = self
            .bars
            .get_mut(&(function, slot))
            .ok_or(BarError::NotPlaced { function, slot })?;
        if bar.io {
            return Err(BarError::IoBar { function, slot });
        }
        let bar_size = bar.placement.range.size;
        let inside = offset.checked_add(size).is_some_and(|end| end <= bar_size);
        if size == 0 || offset % PAGE != 0 || size % PAGE != 0 || !inside {
            return Err(BarError::Piece {
                function,
                slot,
                offset,
                size,
                bar_size,
            });
        }
        let gpa = bar.base + offset;
        if self.decode_off.contains(&function) {
            bar.pieces.push(MappedPiece {
                offset,
                size,
                host,
                slot: None,
            });
            return Ok(None);
        }
        // SAFETY: the caller vouches for the mapping until the piece is unmapped.
        let added = unsafe {
            self.vm
                .memslots()
                .add(SlotKind::DeviceBar, gpa, size, host, 0)
        }
        .map_err(|source| BarError::Memslot {
            function,
            slot,
            gpa,
            size,
            source,
        })?;
        bar.pieces.push(MappedPiece {
            offset,
            size,
            host,
            slot: Some(added.id),
        });
        Ok(Some(added.id))
    }

    /// Deletes the memslots of every mapped piece of `slot` of `function` (accesses trap to
    /// the function again); the caller may then drop the host mappings.
    pub fn unmap(&mut self, function: PciAddress, slot: BarSlot) -> Result<(), BarError> {
        let bar = self
            .bars
            .get_mut(&(function, slot))
            .ok_or(BarError::NotPlaced { function, slot })?;
        let mut first = Ok(());
        for piece in std::mem::take(&mut bar.pieces) {
            if let Some(id) = piece.slot {
                if let Err(source) = self.vm.memslots().remove(id) {
                    if first.is_ok() {
                        first = Err(BarError::Memslot {
                            function,
                            slot,
                            gpa: bar.base + piece.offset,
                            size: piece.size,
                            source,
                        });
                    }
                }
            }
        }
        first
    }

    /// Takes `function`'s BARs down: memslots, bus ranges, and its address-map placement.
    /// Carries on past errors and returns the first.
    pub fn remove(&mut self, function: PciAddress) -> Result<(), BarError> {
        let slots: Vec<BarSlot> = self
            .bars
            .keys()
            .filter(|(a, _)| *a == function)
            .map(|(_, s)| *s)
            .collect();
        let mut first = Ok(());
        let mut placements = Vec::new();
        for slot in slots {
            let unmapped = self.unmap(function, slot);
            let Some(bar) = self.bars.remove(&(function, slot)) else {
                continue;
            };
            let removed = self
                .bus(bar.io)
                .0
                .remove(bar.base)
                .map(|_| ())
                .map_err(|source| BarError::Bus {
                    device: function.to_string(),
                    slot,
                    base: bar.base,
                    size: bar.size(),
                    bus: self.bus(bar.io).1,
                    source,
                });
            placements.push(bar.placement);
            for r in [unmapped, removed] {
                if first.is_ok() {
                    first = r;
                }
            }
        }
        self.vm.resources().addresses().release_device(&placements);
        first
    }

    /// The guest reprogrammed BAR `slot` of `function` to decode at `to`: moves its bus range
    /// and memslots there, or, if another BAR still holds the range, leaves it waiting.
    /// Then retries every other waiting move. Returns whether this BAR is at `to` now.
    pub fn moved(
        &mut self,
        function: PciAddress,
        slot: BarSlot,
        to: u64,
    ) -> Result<bool, BarError> {
        let bar = self
            .bars
            .get_mut(&(function, slot))
            .ok_or(BarError::NotPlaced { function, slot })?;
        bar.wanted = to;
        let result = self.settle_one(function, slot);
        self.settle();
        result
    }

    /// The guest turned `function`'s memory decode on or off (command register): its mapped
    /// pieces lose their memslots while off and get them back, at the BARs' current
    /// addresses, when on.
    pub fn decode(&mut self, function: PciAddress, on: bool) {
        let changed = if on {
            self.decode_off.remove(&function)
        } else {
            self.decode_off.insert(function)
        };
        if !changed {
            return;
        }
        let memslots = self.vm.memslots();
        for ((f, slot), bar) in self.bars.iter_mut() {
            if *f != function || bar.io {
                continue;
            }
            for piece in bar.pieces.iter_mut() {
                if on {
                    if piece.slot.is_some() {
                        continue;
                    }
                    let gpa = bar.base + piece.offset;
                    // SAFETY: `map`'s caller vouched for the host mapping until the piece is
                    // unmapped; it is the same mapping at the BAR's current address.
                    let added = unsafe {
                        memslots.add(SlotKind::DeviceBar, gpa, piece.size, piece.host, 0)
                    };
                    match added {
                        Ok(s) => piece.slot = Some(s.id),
                        Err(e) => tracing::warn!(
                            "{function} {slot}: the piece at {gpa:#x} stays trapped: {e}"
                        ),
                    }
                } else if let Some(id) = piece.slot.take() {
                    if let Err(e) = memslots.remove(id) {
                        tracing::warn!("{function} {slot}: deleting memslot {id}: {e}");
                    }
                }
            }
        }
        tracing::debug!(
            "{function}: memory decode {}",
            if on { "on" } else { "off" }
        );
    }

    /// Retries every move that waits.
    fn settle(&mut self) {
        let waiting: Vec<(PciAddress, BarSlot)> = self
            .bars
            .iter()
            .filter(|(_, b)| b.base != b.wanted)
            .map(|(k, _)| *k)
            .collect();
        for (function, slot) in waiting {
            if let Err(e) = self.settle_one(function, slot) {
                tracing::warn!("{e}");
            }
        }
    }

    /// Moves one BAR to where the guest wants it, if the bus has room there. An overlap is
    /// not an error (the move waits); a memslot KVM refuses at the new address is logged and
    /// its piece left to trap.
    fn settle_one(&mut self, function: PciAddress, slot: BarSlot) -> Result<bool, BarError> {
        let Some(bar) = self.bars.get(&(function, slot)) else {
            return Err(BarError::NotPlaced { function, slot });
        };
        let (from, to, io) = (bar.base, bar.wanted, bar.io);
        if from == to {
            return Ok(true);
        }
        match self.bus(io).0.relocate(from, to) {
            Ok(()) => {}
            Err(BusError::Overlap { other, .. }) => {
                tracing::warn!(
                    "{function} {slot}: the guest moved it to {to:#x}, where the range at \
                     {other:#x} still is: it stays at {from:#x} until that moves"
                );
                return Ok(false);
            }
            Err(source) => {
                return Err(BarError::Relocate {
                    function,
                    slot,
                    from,
                    to,
                    source,
                })
            }
        }
        let memslots = self.vm.memslots();
        let Some(bar) = self.bars.get_mut(&(function, slot)) else {
            return Err(BarError::NotPlaced { function, slot });
        };
        bar.base = to;
        // Delete every old slot first: a piece's new range may overlap another's old one.
        for piece in bar.pieces.iter_mut() {
            if let Some(id) = piece.slot.take() {
                if let Err(e) = memslots.remove(id) {
                    tracing::warn!(
                        "{function} {slot}: deleting memslot {id} at {:#x}: {e}",
                        from + piece.offset
                    );
                }
            }
        }
        if self.decode_off.contains(&function) {
            tracing::debug!("{function} {slot}: moved from {from:#x} to {to:#x} (not decoding)");
            return Ok(true);
        }
        for piece in bar.pieces.iter_mut() {
            let gpa = to + piece.offset;
            // SAFETY: `map`'s caller vouched for the host mapping until the piece is unmapped;
            // it is the same mapping, at a new guest address.
            let added =
                unsafe { memslots.add(SlotKind::DeviceBar, gpa, piece.size, piece.host, 0) };
            match added {
                Ok(s) => piece.slot = Some(s.id),
                Err(e) => tracing::warn!(
                    "{function} {slot}: the piece at {:#x} stays trapped after the move to \
                     {to:#x}: {e}",
                    piece.offset
                ),
            }
        }
        tracing::debug!("{function} {slot}: moved from {from:#x} to {to:#x}");
        Ok(true)
    }
}

/// The root's [`PciEvents`]: BAR moves reach the [`BarMappings`]; the rest is logged.
pub struct BarEvents(pub Arc<Mutex<BarMappings>>);

impl PciEvents for BarEvents {
    fn config_event(&mut self, function: PciAddress, event: ConfigEvent) {
        match event {
            ConfigEvent::BarMoved { slot, to, .. } => {
                let mut bars = self.0.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = bars.moved(function, slot, to) {
                    tracing::warn!("{e}");
                }
            }
            ConfigEvent::MemoryDecode(on) => {
                self.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .decode(function, on);
            }
            other => tracing::trace!("{function}: {other:?}"),
        }
    }
}
