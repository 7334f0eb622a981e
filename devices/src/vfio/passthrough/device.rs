//! One passed-through PCI function over a [`VfioTransport`]: the config shadow
//! ([`super::shadow`]), trapped BAR accesses sent to the transport, the mmappable pieces of each
//! BAR (everything but the MSI-X table and PBA pages) for the VMM to map as memory slots, MSI-X
//! and MSI vectors as eventfds handed to the transport and routed by the owner, guest RAM DMA-mapped
//! at IOVA = GPA, reset, and teardown on drop.
//!
//! Interrupts never pass through the VMM: the device signals a vector's eventfd, which the
//! owner's [`PassthroughRoutes`] registered as a KVM irqfd on an MSI route when the guest
//! unmasked the vector.

use std::sync::Arc;

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::pci::bar::{BarKind, BarLayout, BarSlot};
use crate::pci::config::{ConfigError, ConfigEvent};
use crate::pci::device::PciDevice;
use crate::pci::msi::{MsiError, MSI_CAP_ID};
use crate::pci::msix::{MsixError, MSIX_CAP_ID, MSIX_ENABLE};
use crate::pci::vectors::{MsiMessage, RouteError, VectorRoutes};
use crate::GuestMemory;

use super::map::{BarMap, MapError};
use super::shadow::{Shadow, ShadowError};
use super::transport::{
    DmaRegion, RegionFile, TransportError, VfioTransport, MSIX_IRQ, MSI_IRQ, ROM_REGION,
};

/// Memory slots and the MSI-X pages are cut at host pages.
pub const PAGE: u64 = 4096;
/// Guest-driven failures kept for the owner (see [`PassthroughDevice::take_errors`]).
const KEPT_ERRORS: usize = 16;

/// The owner's side of a passed-through function's vectors: the routes, and the eventfd each
/// vector's irqfd listens on (the device hands it to the transport, which signals it).
pub trait PassthroughRoutes: VectorRoutes + Send {
    /// `vector`'s eventfd (a clone of the one the owner's irqfd uses), made on first ask.
    fn eventfd(&mut self, vector: u16) -> Result<EventFd, RouteError>;
}

#[derive(Debug, thiserror::Error)]
pub enum PassthroughError {
    #[error("building the config shadow")]
    Shadow(#[source] ShadowError),
    #[error("MSI-X vector {vector}: the owner gave no eventfd")]
    Eventfd {
        vector: u16,
        #[source]
        source: RouteError,
    },
    #[error("{op}")]
    Transport {
        op: &'static str,
        #[source]
        source: TransportError,
    },
    #[error("MSI-X")]
    Msix(#[source] MsixError),
    #[error("MSI")]
    Msi(#[source] MsiError),
    #[error("{slot}: mapping {size:#x} bytes at BAR offset {bar_offset:#x}")]
    Map {
        slot: BarSlot,
        bar_offset: u64,
        size: u64,
        #[source]
        source: MapError,
    },
    #[error("guest RAM region at {gpa:#x}: DMA map of {size:#x} bytes")]
    DmaMap {
        gpa: u64,
        size: u64,
        #[source]
        source: TransportError,
    },
    #[error("guest RAM is already DMA-mapped")]
    AlreadyMapped,
    #[error("the device cannot be reset (no VFIO_DEVICE_FLAGS_RESET)")]
    NotResettable,
}

fn transport(op: &'static str) -> impl FnOnce(TransportError) -> PassthroughError {
    move |source| PassthroughError::Transport { op, source }
}

/// A part of a BAR the guest may reach without exits: map `size` bytes of `file` at
/// `file.offset` to the BAR's address + `bar_offset` (page aligned, page multiple).
#[derive(Debug, Clone)]
pub struct BarPiece {
    pub slot: BarSlot,
    pub bar_offset: u64,
    pub size: u64,
    pub file: RegionFile,
    pub writable: bool,
}

/// A [`BarPiece`] mapped in this process (by [`PassthroughDevice::map_bars`]): register
/// `host_addr..+size` as a memory slot at the BAR's address + `bar_offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedPiece {
    pub slot: BarSlot,
    pub bar_offset: u64,
    pub size: u64,
    pub host_addr: usize,
    /// Mapped read-only when false: the owner must not give it to the guest as a writable
    /// memslot (a guest write would fault the vCPU), so it leaves such a piece trapped.
    pub writable: bool,
}

/// Lets the `Box<dyn PassthroughRoutes>` be passed where `&mut dyn VectorRoutes` is asked.
struct Routes<'a>(&'a mut dyn PassthroughRoutes);

impl VectorRoutes for Routes<'_> {
    fn unmask(&mut self, vector: u16, msg: MsiMessage) -> Result<(), RouteError> {
        self.0.unmask(vector, msg)
    }
    fn mask(&mut self, vector: u16) -> Result<(), RouteError> {
        self.0.mask(vector)
    }
    fn trigger(&mut self, vector: u16) -> Result<(), RouteError> {
        self.0.trigger(vector)
    }
}

/// A passed-through function. See the module comment.
pub struct PassthroughDevice {
    transport: Box<dyn VfioTransport>,
    shadow: Shadow,
    routes: Box<dyn PassthroughRoutes>,
    eventfds: Vec<EventFd>,
    /// Whether the transport has the MSI-X eventfds now.
    msix_irqs: bool,
    /// How many MSI eventfds the transport has now.
    msi_irqs: u8,
    maps: Vec<(MappedPiece, BarMap)>,
    dma: Vec<(u64, u64)>,
    /// Kept so the DMA-mapped RAM stays mapped until it is unmapped.
    memory: Option<GuestMemory>,
    errors: Vec<PassthroughError>,
    /// Every guest-driven failure so far (a guest polling a dead server fails on every access).
    failures: u64,
}

impl PassthroughDevice {
    /// Reads the function through `transport`, builds its shadow, and takes one eventfd per
    /// vector from `routes` (as many as MSI-X or MSI has, whichever has more: a guest enables
    /// one at a time, so vector n of either uses the same eventfd and route).
    pub fn new(
        mut transport: Box<dyn VfioTransport>,
        mut routes: Box<dyn PassthroughRoutes>,
    ) -> Result<Self, PassthroughError> {
        let shadow = Shadow::build(transport.as_mut()).map_err(PassthroughError::Shadow)?;
        let vectors = shadow
            .msix
            .as_ref()
            .map_or(0, |m| m.layout().vectors)
            .max(shadow.msi.as_ref().map_or(0, |m| u16::from(m.vectors())));
        let eventfds = (0..vectors)
            .map(|vector| {
                routes
                    .eventfd(vector)
                    .map_err(|source| PassthroughError::Eventfd { vector, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            transport,
            shadow,
            routes,
            eventfds,
            msix_irqs: false,
            msi_irqs: 0,
            maps: Vec::new(),
            dma: Vec::new(),
            memory: None,
            errors: Vec::new(),
            failures: 0,
        })
    }

    /// The shadow config space (what the guest sees, virtualized bytes only).
    pub fn config(&self) -> &crate::pci::ConfigSpace {
        &self.shadow.cfg
    }

    /// MSI-X vectors the function has (0 without MSI-X).
    pub fn msix_vectors(&self) -> u16 {
        self.shadow.msix.as_ref().map_or(0, |m| m.layout().vectors)
    }

    /// Failures of guest-driven work (config and BAR accesses cannot return errors), oldest
    /// first, at most 16 kept; the owner logs or counts them.
    pub fn take_errors(&mut self) -> Vec<PassthroughError> {
        std::mem::take(&mut self.errors)
    }

    fn record(&mut self, e: PassthroughError) {
        self.failures += 1;
        // The first few, then one line per 10000: a guest polling a dead device must not
        // flood the log.
        if self.failures <= KEPT_ERRORS as u64 || self.failures % 10_000 == 0 {
            tracing::warn!(
                "passthrough: {} ({} failures so far)",
                crate::vfio::passthrough::chain(&e),
                self.failures
            );
        }
        if self.errors.len() < KEPT_ERRORS {
            self.errors.push(e);
        }
    }

    /// The parts of each memory BAR that may be mapped into the guest: the transport's mmap
    /// areas cut to whole pages, minus the pages holding the MSI-X table and PBA (those stay
    /// trapped, even when the table shares its page with other registers).
    pub fn mmappable_pieces(&self) -> Vec<BarPiece> {
        let mut out = Vec::new();
        let layout = self.shadow.cfg.bar_layout();
        let msix = self.shadow.msix.as_ref().map(|m| *m.layout());
        for bar in layout.bars() {
            if bar.kind == BarKind::Io {
                continue;
            }
            let Some(region) = self.shadow.regions.get(usize::from(bar.index)) else {
                continue;
            };
            let Some(file) = &region.file else { continue };
            let mut holes = Vec::new();
            if let Some(l) = msix {
                if l.table_bar == bar.index {
                    holes.push(page_span(u64::from(l.table_offset), l.table_len()));
                }
                if l.pba_bar == bar.index {
                    holes.push(page_span(u64::from(l.pba_offset), l.pba_len()));
                }
            }
            for area in &region.mmap_areas {
                let start = area.offset.next_multiple_of(PAGE);
                let end = (area.offset + area.size).min(bar.size) / PAGE * PAGE;
                for (s, e) in subtract(start, end, &holes) {
                    out.push(BarPiece {
                        slot: BarSlot::Bar(bar.index),
                        bar_offset: s,
                        size: e - s,
                        file: RegionFile {
                            file: Arc::clone(&file.file),
                            offset: file.offset.saturating_add(s),
                        },
                        writable: region.writable,
                    });
                }
            }
        }
        out
    }

    /// Maps every mmappable piece into this process (once; later calls return the same), for
    /// the VMM to register as memory slots; each at an address congruent to its BAR offset
    /// modulo the BAR's size (up to 1 GiB), so huge pages can back it. The mappings live as
    /// long as the device: remove the slots before dropping it.
    pub fn map_bars(&mut self) -> Result<Vec<MappedPiece>, PassthroughError> {
        if self.maps.is_empty() {
            let layout = self.shadow.cfg.bar_layout().clone();
            for p in self.mmappable_pieces() {
                let align = match p.slot {
                    BarSlot::Bar(i) => layout.bar(i).map_or(PAGE, |b| b.size),
                    BarSlot::Rom => PAGE,
                };
                let map = BarMap::new(
                    &*p.file.file,
                    p.file.offset,
                    p.size,
                    p.writable,
                    p.bar_offset,
                    align,
                )
                .map_err(|source| PassthroughError::Map {
                    slot: p.slot,
                    bar_offset: p.bar_offset,
                    size: p.size,
                    source,
                })?;
                let piece = MappedPiece {
                    slot: p.slot,
                    bar_offset: p.bar_offset,
                    size: p.size,
                    host_addr: map.addr(),
                    writable: p.writable,
                };
                self.maps.push((piece, map));
            }
        }
        Ok(self.maps.iter().map(|(p, _)| *p).collect())
    }

    /// Makes all of `memory` reachable by the device's DMA at IOVA = GPA (once, before the
    /// guest runs). A clone of `memory` is kept so the mappings outlive the DMA maps.
    pub fn map_guest_memory(&mut self, memory: &GuestMemory) -> Result<(), PassthroughError> {
        if self.memory.is_some() {
            return Err(PassthroughError::AlreadyMapped);
        }
        for region in memory.iter() {
            let gpa = region.start_addr().raw_value();
            let size = region.len();
            let file = region.file_offset().map(|f| (f.file(), f.start()));
            let dma = DmaRegion {
                iova: gpa,
                size,
                host_addr: region.as_ptr() as usize,
                file,
            };
            // SAFETY: the range is one of `memory`'s regions, which stays mapped while a clone
            // of `memory` lives: the device keeps one until Drop has unmapped every range.
            let result = unsafe { self.transport.dma_map(&dma) };
            if let Err(source) = result {
                self.unmap_dma();
                return Err(PassthroughError::DmaMap { gpa, size, source });
            }
            self.dma.push((gpa, size));
        }
        self.memory = Some(memory.clone());
        Ok(())
    }

    fn unmap_dma(&mut self) {
        for (iova, size) in std::mem::take(&mut self.dma) {
            if let Err(e) = self.transport.dma_unmap(iova, size) {
                self.record(transport("DMA unmap")(e));
            }
        }
    }

    /// A guest (or VMM) reset: MSI-X off (routes masked, eventfds taken back from the
    /// transport), the device reset, the shadow's command register cleared. BAR addresses
    /// and DMA maps stay.
    pub fn reset(&mut self) -> Result<(), PassthroughError> {
        if !self.transport.device_info().resettable {
            return Err(PassthroughError::NotResettable);
        }
        let mut first = Ok(());
        if let Some(msix) = self.shadow.msix.as_mut() {
            let r = msix.reset(&mut self.shadow.cfg, &mut Routes(self.routes.as_mut()));
            first = first.and(r.map_err(PassthroughError::Msix));
        }
        if let Some(msi) = self.shadow.msi.as_mut() {
            let r = msi.reset(&mut self.shadow.cfg, &mut Routes(self.routes.as_mut()));
            first = first.and(r.map_err(PassthroughError::Msi));
        }
        if std::mem::take(&mut self.msix_irqs) {
            let r = self.transport.disable_irqs(MSIX_IRQ);
            first = first.and(r.map_err(transport("disabling MSI-X")));
        }
        if std::mem::take(&mut self.msi_irqs) != 0 {
            let r = self.transport.disable_irqs(MSI_IRQ);
            first = first.and(r.map_err(transport("disabling MSI")));
        }
        let r = self.transport.reset();
        first = first.and(r.map_err(transport("device reset")));
        self.drain_eventfds();
        let _ = self.shadow.cfg.write(crate::pci::config::COMMAND, &[0, 0]);
        first
    }

    /// Clears every vector's eventfd count once the transport has them no more: a signal left
    /// from before an MSI-X/MSI disable or a reset must not be delivered as a spurious
    /// interrupt when the guest enables and unmasks the vector again. Polled first, so an
    /// owner's blocking eventfd never blocks here.
    fn drain_eventfds(&self) {
        use std::os::fd::AsRawFd;
        for evt in &self.eventfds {
            let mut pfd = libc::pollfd {
                fd: evt.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one valid fd (the eventfd lives in `self`) with no timeout.
            let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
            if ready == 1 && pfd.revents & libc::POLLIN != 0 {
                let _ = evt.read();
            }
        }
    }

    /// After a guest write touched the MSI-X capability: eventfds to the transport first when
    /// MSI-X turns on, routes brought in line, eventfds taken back when it turns off.
    fn msix_written(&mut self) {
        let Some(msix) = self.shadow.msix.as_mut() else {
            return;
        };
        let control = self.shadow.cfg.read_u16(msix.cap_offset() + 2);
        let enable = control & MSIX_ENABLE != 0;
        let mut errors = Vec::new();
        if enable && !self.msix_irqs {
            // As many as the table has: `eventfds` is sized for MSI too, which may have more,
            // and VFIO refuses more eventfds than the index's count.
            let vectors = usize::from(msix.layout().vectors);
            let fds: Vec<&EventFd> = self.eventfds.iter().take(vectors).collect();
            match self.transport.enable_irqs(MSIX_IRQ, &fds) {
                Ok(()) => self.msix_irqs = true,
                Err(e) => errors.push(transport("enabling MSI-X")(e)),
            }
        }
        if let Err(e) = msix.config_written(&self.shadow.cfg, &mut Routes(self.routes.as_mut())) {
            errors.push(PassthroughError::Msix(e));
        }
        if !enable && self.msix_irqs {
            match self.transport.disable_irqs(MSIX_IRQ) {
                Ok(()) => {
                    self.msix_irqs = false;
                    self.drain_eventfds();
                }
                Err(e) => errors.push(transport("disabling MSI-X")(e)),
            }
        }
        for e in errors {
            self.record(e);
        }
    }

    /// After a guest write touched the MSI capability: the transport gets as many eventfds as
    /// vectors are enabled (re-given when that changes), then routes are brought in line.
    fn msi_written(&mut self) {
        let Some(msi) = self.shadow.msi.as_mut() else {
            return;
        };
        let cfg = &mut self.shadow.cfg;
        let want = if msi.enabled(cfg) {
            msi.allotted(cfg)
        } else {
            0
        };
        let mut errors = Vec::new();
        if want != self.msi_irqs {
            if self.msi_irqs != 0 {
                match self.transport.disable_irqs(MSI_IRQ) {
                    Ok(()) => self.msi_irqs = 0,
                    Err(e) => errors.push(transport("disabling MSI")(e)),
                }
            }
            if want != 0 {
                let fds: Vec<&EventFd> = self.eventfds.iter().take(usize::from(want)).collect();
                match self.transport.enable_irqs(MSI_IRQ, &fds) {
                    Ok(()) => self.msi_irqs = want,
                    Err(e) => errors.push(transport("enabling MSI")(e)),
                }
            }
        }
        if let Err(e) = msi.config_written(cfg, &mut Routes(self.routes.as_mut())) {
            errors.push(PassthroughError::Msi(e));
        }
        for e in errors {
            self.record(e);
        }
    }

    /// The transport's migration and DMA-logging half (live migration drives the device's
    /// VFIO migration state machine and its DMA log through it).
    pub fn migration(&mut self) -> &mut dyn super::transport::DeviceMigration {
        self.transport.as_mut()
    }

    /// The MSI-X table as (BAR, offset in it, bytes), for saving what the guest programmed.
    pub fn msix_table(&self) -> Option<(u8, u64, u64)> {
        self.shadow.msix.as_ref().map(|m| {
            let l = m.layout();
            (l.table_bar, u64::from(l.table_offset), l.table_len())
        })
    }

    /// Turns MSI-X and MSI off and unmaps DMA; what Drop does, callable earlier to see the
    /// errors. The BAR pieces stay mapped until Drop: the owner's memslots may still point at
    /// them (it removes those before dropping the device).
    pub fn teardown(&mut self) -> Vec<PassthroughError> {
        if std::mem::take(&mut self.msix_irqs) {
            if let Err(e) = self.transport.disable_irqs(MSIX_IRQ) {
                self.record(transport("disabling MSI-X")(e));
            }
        }
        if std::mem::take(&mut self.msi_irqs) != 0 {
            if let Err(e) = self.transport.disable_irqs(MSI_IRQ) {
                self.record(transport("disabling MSI")(e));
            }
        }
        self.unmap_dma();
        self.memory = None;
        self.take_errors()
    }
}

impl Drop for PassthroughDevice {
    fn drop(&mut self) {
        self.teardown();
        self.maps.clear();
    }
}

impl PciDevice for PassthroughDevice {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if let Err(e) = self.shadow.read(self.transport.as_mut(), offset, data) {
            self.record(transport("config read")(e));
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) -> Vec<ConfigEvent> {
        let (events, result) = self.shadow.write(self.transport.as_mut(), offset, data);
        if let Err(e) = result {
            self.record(transport("config write")(e));
        }
        let msix = events.iter().any(|e| {
            matches!(e, ConfigEvent::Capability { id, extended: false, .. } if *id == u16::from(MSIX_CAP_ID))
        });
        if msix {
            self.msix_written();
        }
        let msi = events.iter().any(|e| {
            matches!(e, ConfigEvent::Capability { id, extended: false, .. } if *id == u16::from(MSI_CAP_ID))
        });
        if msi {
            self.msi_written();
        }
        events
    }

    fn bar_read(&mut self, slot: BarSlot, offset: u64, data: &mut [u8]) {
        let region = match slot {
            BarSlot::Bar(i) => {
                if let Some(m) = &self.shadow.msix {
                    if m.bar_read(i, offset, data) {
                        return;
                    }
                }
                u32::from(i)
            }
            BarSlot::Rom => ROM_REGION,
        };
        if let Err(e) = self.transport.region_read(region, offset, data) {
            data.fill(0xff);
            self.record(transport("BAR read")(e));
        }
    }

    fn bar_write(&mut self, slot: BarSlot, offset: u64, data: &[u8]) {
        let BarSlot::Bar(i) = slot else {
            return; // The ROM is read-only.
        };
        if let Some(m) = self.shadow.msix.as_mut() {
            match m.bar_write(i, offset, data, &mut Routes(self.routes.as_mut())) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => return self.record(PassthroughError::Msix(e)),
            }
        }
        if let Err(e) = self.transport.region_write(u32::from(i), offset, data) {
            self.record(transport("BAR write")(e));
        }
    }

    fn bar_layout(&self) -> BarLayout {
        self.shadow.cfg.bar_layout().clone()
    }

    fn set_bar_address(&mut self, slot: BarSlot, address: u64) -> Result<(), ConfigError> {
        self.shadow.cfg.set_bar_address(slot, address)
    }
}

/// The whole pages `[offset, offset + len)` touches.
fn page_span(offset: u64, len: u64) -> (u64, u64) {
    (
        offset / PAGE * PAGE,
        offset.saturating_add(len).next_multiple_of(PAGE),
    )
}

/// `[start, end)` minus `holes`, in order, without empty pieces.
fn subtract(start: u64, end: u64, holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut pieces = if start < end {
        vec![(start, end)]
    } else {
        Vec::new()
    };
    for &(hs, he) in holes {
        pieces = pieces
            .into_iter()
            .flat_map(|(s, e)| {
                if he <= s || e <= hs {
                    vec![(s, e)]
                } else {
                    vec![(s, hs.max(s)), (he.min(e), e)]
                }
            })
            .filter(|(s, e)| s < e)
            .collect();
    }
    pieces
}
