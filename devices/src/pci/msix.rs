//! MSI-X (PCI 3.0 6.8.2): the capability in config space (table size, table and PBA each as a
//! BAR indicator + offset, enable and function mask in message control) and the table and PBA
//! themselves, which live in a BAR and are always trapped (never mapped into the guest), since
//! the VMM must see every change to a vector's message or mask.
//!
//! A vector is live when MSI-X is enabled, the function is not masked and its own mask bit is
//! clear. Every change of a vector's liveness or of a live vector's message is handed to the
//! owner's [`VectorRoutes`]. An emulated device fires through [`Msix::trigger`], which sets the
//! pending bit of a masked vector; unmasking a pending vector sends it and clears the bit.

use super::bar::{BarKind, BAR_COUNT};
use super::config::{Capability, ConfigError, ConfigSpace};
use super::vectors::{reconcile, Delivery, MsiMessage, RouteError, VectorRoutes};

pub const MSIX_CAP_ID: u8 = 0x11;
/// Bytes per table entry: address low, address high, data, vector control.
pub const MSIX_ENTRY_SIZE: u64 = 16;
pub const MSIX_MAX_VECTORS: u16 = 2048;
pub const MSIX_ENABLE: u16 = 1 << 15;
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control's mask bit, the only one defined.
pub const MSIX_VECTOR_MASKED: u32 = 1;
/// Offset of message control in the capability.
const CONTROL: usize = 2;
/// Bytes of the capability: id, link, message control, table, PBA.
pub const MSIX_CAP_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("{0} MSI-X vectors: must be 1..={MSIX_MAX_VECTORS}")]
    Vectors(u16),
    #[error("MSI-X {what} in BAR{bar}: no such memory BAR")]
    NoBar { what: &'static str, bar: u8 },
    #[error("MSI-X {what} offset {offset:#x} is not 8-byte aligned")]
    Unaligned { what: &'static str, offset: u32 },
    #[error("MSI-X {what} ({offset:#x}+{len:#x}) does not fit in BAR{bar} of {size:#x} bytes")]
    Outside {
        what: &'static str,
        bar: u8,
        offset: u32,
        len: u64,
        size: u64,
    },
    #[error("MSI-X table and PBA overlap in BAR{0}")]
    Overlap(u8),
    #[error("adding the MSI-X capability")]
    Capability(#[source] ConfigError),
    #[error("MSI-X vector {0} does not exist")]
    NoVector(u16),
    #[error("reprogramming MSI-X vector {vector}")]
    Route {
        vector: u16,
        #[source]
        source: RouteError,
    },
}

/// Where a function's MSI-X structures live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    pub vectors: u16,
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

impl MsixLayout {
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * MSIX_ENTRY_SIZE
    }
    /// One bit per vector in whole qwords.
    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }
}

/// A function's MSI-X state. See the module comment.
#[derive(Debug, Clone)]
pub struct Msix {
    layout: MsixLayout,
    cap_offset: usize,
    /// Four dwords per vector, as the guest sees them.
    table: Vec<u32>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// What the owner was last told per vector: its message while live.
    programmed: Vec<Option<MsiMessage>>,
}

impl Msix {
    /// Checks `layout` against `cfg`'s BARs and adds the capability to `cfg`. Every vector
    /// starts masked, MSI-X disabled.
    pub fn new(layout: MsixLayout, cfg: &mut ConfigSpace) -> Result<Self, MsixError> {
        check(&layout, cfg)?;
        let (body, mask) = capability_body(&layout);
        let cap_offset = cfg
            .add_capability(MSIX_CAP_ID, &body, &mask)
            .map_err(MsixError::Capability)?;
        Ok(Self::fresh(layout, cap_offset))
    }

    /// For a passed-through function: the capability stays where the device has it, at
    /// `offset` (its id and link bytes kept), with its body rewritten from `layout` and
    /// emulated here. Every vector starts masked, MSI-X disabled.
    pub fn at(layout: MsixLayout, cfg: &mut ConfigSpace, offset: usize) -> Result<Self, MsixError> {
        check(&layout, cfg)?;
        let (body, mask) = capability_body(&layout);
        let body_offset = offset + CONTROL;
        cfg.set(body_offset, &body)
            .and_then(|()| cfg.set_write_mask(body_offset, &mask))
            .and_then(|()| {
                let cap = Capability {
                    id: u16::from(MSIX_CAP_ID),
                    offset,
                    extended: false,
                };
                cfg.adopt_capability(cap, MSIX_CAP_LEN)
            })
            .map_err(MsixError::Capability)?;
        Ok(Self::fresh(layout, offset))
    }

    fn fresh(layout: MsixLayout, cap_offset: usize) -> Self {
        let n = usize::from(layout.vectors);
        let mut table = vec![0; n * 4];
        for entry in table.chunks_exact_mut(4) {
            entry[3] = MSIX_VECTOR_MASKED;
        }
        Self {
            layout,
            cap_offset,
            table,
            pba: vec![0; n.div_ceil(64)],
            enabled: false,
            function_masked: false,
            programmed: vec![None; n],
        }
    }

    /// Back to power-on (a function reset): disabled, every vector masked and zeroed, nothing
    /// pending, message control cleared in `cfg`; `routes` is told of vectors that were live.
    pub fn reset(
        &mut self,
        cfg: &mut ConfigSpace,
        routes: &mut dyn VectorRoutes,
    ) -> Result<(), MsixError> {
        let control = self.cap_offset + CONTROL;
        let value = cfg.read_u16(control) & !(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        cfg.set_u16(control, value).map_err(MsixError::Capability)?;
        let fresh = Self::fresh(self.layout, self.cap_offset);
        self.table = fresh.table;
        self.pba = fresh.pba;
        self.enabled = false;
        self.function_masked = false;
        self.sync(0..self.layout.vectors, routes)
    }

    pub fn layout(&self) -> &MsixLayout {
        &self.layout
    }

    /// Where the capability sits in config space.
    pub fn cap_offset(&self) -> usize {
        self.cap_offset
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// `vector`'s message as the table holds it.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        let e = self.table.chunks_exact(4).nth(usize::from(vector))?;
        Some(MsiMessage {
            address: u64::from(e[0]) | u64::from(e[1]) << 32,
            data: e[2],
        })
    }

    /// Whether `vector`'s own mask bit is set (true for a vector that does not exist).
    pub fn vector_masked(&self, vector: u16) -> bool {
        self.table
            .get(usize::from(vector) * 4 + 3)
            .is_none_or(|c| c & MSIX_VECTOR_MASKED != 0)
    }

    pub fn pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pba.get(v / 64).is_some_and(|q| q >> (v % 64) & 1 != 0)
    }

    fn set_pending(&mut self, vector: u16, pending: bool) {
        let v = usize::from(vector);
        if let Some(q) = self.pba.get_mut(v / 64) {
            let bit = 1u64 << (v % 64);
            if pending {
                *q |= bit;
            } else {
                *q &= !bit;
            }
        }
    }

    fn live(&self, vector: u16) -> Option<MsiMessage> {
        if !self.enabled || self.function_masked || self.vector_masked(vector) {
            return None;
        }
        self.message(vector)
    }

    /// After a guest write touched the capability: takes enable and function mask from
    /// message control and tells `routes` about every vector that changed.
    pub fn config_written(
        &mut self,
        cfg: &ConfigSpace,
        routes: &mut dyn VectorRoutes,
    ) -> Result<(), MsixError> {
        let control = cfg.read_u16(self.cap_offset + CONTROL);
        self.enabled = control & MSIX_ENABLE != 0;
        self.function_masked = control & MSIX_FUNCTION_MASK != 0;
        self.sync(0..self.layout.vectors, routes)
    }

    /// Reconciles `vectors` with `routes`; on errors carries on and returns the first.
    fn sync(
        &mut self,
        vectors: std::ops::Range<u16>,
        routes: &mut dyn VectorRoutes,
    ) -> Result<(), MsixError> {
        let mut first = Ok(());
        for v in vectors {
            let now = self.live(v);
            let Some(programmed) = self.programmed.get_mut(usize::from(v)) else {
                continue;
            };
            let result = match reconcile(v, programmed, now, routes) {
                Ok(true) if self.pending(v) => {
                    self.set_pending(v, false);
                    routes.trigger(v)
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e),
            };
            if let Err(source) = result {
                if first.is_ok() {
                    first = Err(MsixError::Route { vector: v, source });
                }
            }
        }
        first
    }

    /// A guest read of the table at `offset` (from the table's start); bytes past it read 0.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        read_dwords(&self.table, offset, data);
    }

    /// A guest write to the table at `offset`: any size, any alignment (the spec only allows
    /// aligned dwords and qwords; others are applied byte by byte rather than refused).
    pub fn table_write(
        &mut self,
        offset: u64,
        data: &[u8],
        routes: &mut dyn VectorRoutes,
    ) -> Result<(), MsixError> {
        let mut touched: Option<(u16, u16)> = None;
        for (i, b) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i as u64) else {
                break;
            };
            let Ok(o) = usize::try_from(o) else { break };
            let Some(reg) = self.table.get_mut(o / 4) else {
                break;
            };
            let shift = 8 * (o % 4);
            // Address low is dword aligned; vector control has one writable bit.
            let writable: u32 = match (o / 4) % 4 {
                0 => !3,
                3 => MSIX_VECTOR_MASKED,
                _ => u32::MAX,
            };
            let mask = writable & 0xff << shift;
            *reg = (*reg & !mask) | (u32::from(*b) << shift & mask);
            let v = (o / 16) as u16;
            touched = Some(touched.map_or((v, v), |(lo, hi)| (lo.min(v), hi.max(v))));
        }
        match touched {
            Some((lo, hi)) => self.sync(lo..hi + 1, routes),
            None => Ok(()),
        }
    }

    /// A guest read of the PBA at `offset` (from the PBA's start); bytes past it read 0.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| Some((self.pba.get(o / 8)? >> (8 * (o % 8))) as u8))
                .unwrap_or(0);
        }
    }

    /// Serves a guest read of `bar` at `offset` if it falls wholly in the table or the PBA;
    /// returns false (nothing read) otherwise.
    pub fn bar_read(&self, bar: u8, offset: u64, data: &mut [u8]) -> bool {
        if let Some(o) = self.table_offset_of(bar, offset, data.len()) {
            self.table_read(o, data);
            true
        } else if let Some(o) = self.pba_offset_of(bar, offset, data.len()) {
            self.pba_read(o, data);
            true
        } else {
            false
        }
    }

    /// Applies a guest write to `bar` at `offset` if it falls wholly in the table (a PBA write
    /// is taken and dropped: the PBA is read-only). Returns whether it was MSI-X's.
    pub fn bar_write(
        &mut self,
        bar: u8,
        offset: u64,
        data: &[u8],
        routes: &mut dyn VectorRoutes,
    ) -> Result<bool, MsixError> {
        if let Some(o) = self.table_offset_of(bar, offset, data.len()) {
            self.table_write(o, data, routes)?;
            Ok(true)
        } else {
            Ok(self.pba_offset_of(bar, offset, data.len()).is_some())
        }
    }

    fn table_offset_of(&self, bar: u8, offset: u64, len: usize) -> Option<u64> {
        let l = &self.layout;
        within(bar, offset, len, l.table_bar, l.table_offset, l.table_len())
    }

    fn pba_offset_of(&self, bar: u8, offset: u64, len: usize) -> Option<u64> {
        let l = &self.layout;
        within(bar, offset, len, l.pba_bar, l.pba_offset, l.pba_len())
    }

    /// An emulated device raising `vector`: sent if live, made pending if masked, dropped if
    /// MSI-X is disabled.
    pub fn trigger(
        &mut self,
        vector: u16,
        routes: &mut dyn VectorRoutes,
    ) -> Result<Delivery, MsixError> {
        if vector >= self.layout.vectors {
            return Err(MsixError::NoVector(vector));
        }
        if !self.enabled {
            return Ok(Delivery::Dropped);
        }
        if self.live(vector).is_none() {
            self.set_pending(vector, true);
            return Ok(Delivery::Pending);
        }
        routes
            .trigger(vector)
            .map_err(|source| MsixError::Route { vector, source })?;
        Ok(Delivery::Sent)
    }
}

/// Checks `layout` against `cfg`'s BARs: table and PBA in memory BARs, aligned, inside, apart.
fn check(layout: &MsixLayout, cfg: &ConfigSpace) -> Result<(), MsixError> {
    if layout.vectors == 0 || layout.vectors > MSIX_MAX_VECTORS {
        return Err(MsixError::Vectors(layout.vectors));
    }
    let regions = [
        (
            "table",
            layout.table_bar,
            layout.table_offset,
            layout.table_len(),
        ),
        ("PBA", layout.pba_bar, layout.pba_offset, layout.pba_len()),
    ];
    for (what, bar, offset, len) in regions {
        let size = match cfg.bar_layout().bar(bar) {
            Some(b) if b.kind != BarKind::Io && usize::from(bar) < BAR_COUNT => b.size,
            _ => return Err(MsixError::NoBar { what, bar }),
        };
        if offset % 8 != 0 {
            return Err(MsixError::Unaligned { what, offset });
        }
        if u64::from(offset) + len > size {
            return Err(MsixError::Outside {
                what,
                bar,
                offset,
                len,
                size,
            });
        }
    }
    let (t, p) = (u64::from(layout.table_offset), u64::from(layout.pba_offset));
    if layout.table_bar == layout.pba_bar && t < p + layout.pba_len() && p < t + layout.table_len()
    {
        return Err(MsixError::Overlap(layout.table_bar));
    }
    Ok(())
}

/// The capability's body after id and link (message control, table, PBA) and its write mask
/// (enable and function mask only).
fn capability_body(layout: &MsixLayout) -> ([u8; 10], [u8; 10]) {
    let mut body = [0u8; 10];
    body[..2].copy_from_slice(&(layout.vectors - 1).to_le_bytes());
    body[2..6].copy_from_slice(&(layout.table_offset | u32::from(layout.table_bar)).to_le_bytes());
    body[6..].copy_from_slice(&(layout.pba_offset | u32::from(layout.pba_bar)).to_le_bytes());
    let mut mask = [0u8; 10];
    mask[..2].copy_from_slice(&(MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes());
    (body, mask)
}

/// `offset - start` if `[offset, offset + len)` lies in `[start, start + region)` of `bar`.
fn within(bar: u8, offset: u64, len: usize, in_bar: u8, start: u32, region: u64) -> Option<u64> {
    if bar != in_bar {
        return None;
    }
    let rel = offset.checked_sub(u64::from(start))?;
    let end = rel.checked_add(u64::try_from(len).ok()?)?;
    (end <= region).then_some(rel)
}

fn read_dwords(regs: &[u32], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| Some((regs.get(o / 4)? >> (8 * (o % 4))) as u8))
            .unwrap_or(0);
    }
}
