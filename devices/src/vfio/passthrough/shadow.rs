//! The config space a passed-through function shows the guest: a [`ConfigSpace`] built from
//! the device's own bytes, where some bytes are *virtualized* (served from the shadow, never
//! sent to the device) and the rest pass through (read from the device, written to it).
//!
//! Virtualized: the header's identity, BARs and ROM (the guest never sees host addresses;
//! sizing answers from the shadow's masks), capability headers and links rewritten around
//! hidden capabilities, the MSI-X and MSI capabilities (emulated with [`Msix`] and [`Msi`]),
//! and the hidden capabilities' bytes. The command/status dword passes through and also goes to the shadow, whose events
//! (memory decode on/off) the owner acts on. Everything else (PCIe, power management, AER,
//! vendor capabilities) is the device's.
//!
//! Hidden: SR-IOV, ARI and Resizable BAR (a guest must not create VFs or resize BARs behind
//! the VMM's back). The first extended capability sits at 0x100 by definition; when it is hidden,
//! 0x100 holds a header with id 0 linking to the first visible one (as QEMU does).

use std::collections::HashSet;

use crate::pci::bar::{Bar, BarError, BarKind, BarLayout, BAR_COUNT};
use crate::pci::config::{
    ConfigEvent, ConfigHeader, ConfigSpace, BAR0, CAPABILITIES_POINTER, CONFIG_SIZE,
    EXTENDED_CONFIG_SIZE, FIRST_CAPABILITY, HEADER_TYPE, INTERRUPT_PIN, ROM_BAR, STATUS,
    STATUS_CAPABILITIES,
};
use crate::pci::msi::{Msi, MsiError, MSI_64BIT, MSI_CAP_ID, MSI_PER_VECTOR_MASK};
use crate::pci::msix::{Msix, MsixError, MsixLayout, MSIX_CAP_ID, MSIX_CAP_LEN};

use super::transport::{RegionInfo, TransportError, VfioTransport, CONFIG_REGION, ROM_REGION};

pub const SRIOV_EXT_ID: u16 = 0x10;
pub const ARI_EXT_ID: u16 = 0x0e;
pub const REBAR_EXT_ID: u16 = 0x15;
/// Extended capabilities hidden from the guest, with the bytes each spans at most.
pub const HIDDEN_EXTENDED: [(u16, usize); 3] = [
    (SRIOV_EXT_ID, 0x40),
    (ARI_EXT_ID, 0x08),
    (REBAR_EXT_ID, 0x34),
];

#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    #[error("region info of region {index}")]
    RegionInfo {
        index: u32,
        #[source]
        source: TransportError,
    },
    #[error("config region of {size} bytes: a type-0 header needs {CONFIG_SIZE}")]
    ConfigTooSmall { size: u64 },
    #[error("reading the device's config space")]
    ReadConfig(#[source] TransportError),
    #[error("header type {0:#x}: only type-0 functions can be passed through")]
    NotType0(u8),
    #[error(
        "region {index}: mmap area {offset:#x}+{size:#x} runs past the region's {region:#x} bytes"
    )]
    AreaOutside {
        index: u32,
        offset: u64,
        size: u64,
        region: u64,
    },
    #[error("region {index} can be mmap'd but the transport gave no file to map it from")]
    NoFile { index: u32 },
    #[error("BAR layout from the regions")]
    Bars(#[source] BarError),
    #[error(
        "{kind} capability list: link at {from:#x} points to {to:#x}, outside the list's space"
    )]
    CapabilityPointer {
        kind: &'static str,
        from: usize,
        to: usize,
    },
    #[error("{kind} capability list loops back to {offset:#x}")]
    CapabilityLoop { kind: &'static str, offset: usize },
    #[error(
        "MSI-X capability at {offset:#x} claims {cap} vectors, the device's MSI-X IRQ has {irq}"
    )]
    MsixCount { offset: usize, cap: u16, irq: u32 },
    #[error("MSI capability at {offset:#x} claims {cap} vectors, the device's MSI IRQ has {irq}")]
    MsiCount { offset: usize, cap: u8, irq: u32 },
    #[error("irq info of IRQ index {index}")]
    IrqInfo {
        index: u32,
        #[source]
        source: TransportError,
    },
    #[error("MSI capability at {offset:#x}")]
    Msi {
        offset: usize,
        #[source]
        source: MsiError,
    },
    #[error("MSI-X capability at {offset:#x}")]
    Msix {
        offset: usize,
        #[source]
        source: MsixError,
    },
    #[error("rewriting the shadow at {offset:#x}")]
    Rewrite {
        offset: usize,
        #[source]
        source: crate::pci::ConfigError,
    },
}

/// A capability found in the device's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Found {
    id: u16,
    offset: usize,
}

/// The shadow and what was learnt building it.
pub struct Shadow {
    pub cfg: ConfigSpace,
    /// Per byte of `cfg`: served from the shadow only.
    virtualized: Vec<bool>,
    /// Regions 0..=6 (BARs and ROM) as the transport describes them.
    pub regions: Vec<RegionInfo>,
    pub msix: Option<Msix>,
    pub msi: Option<Msi>,
}

fn u16_at(raw: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([raw[o], raw[o + 1]])
}

fn u32_at(raw: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]])
}

impl Shadow {
    /// Reads the device's config space and regions through `t` and builds the shadow.
    pub fn build(t: &mut dyn VfioTransport) -> Result<Self, ShadowError> {
        let info = |t: &mut dyn VfioTransport, index| {
            t.region_info(index)
                .map_err(|source| ShadowError::RegionInfo { index, source })
        };
        let config = info(t, CONFIG_REGION)?;
        if config.size < CONFIG_SIZE as u64 {
            return Err(ShadowError::ConfigTooSmall { size: config.size });
        }
        let extended = config.size >= EXTENDED_CONFIG_SIZE as u64;
        let len = if extended {
            EXTENDED_CONFIG_SIZE
        } else {
            CONFIG_SIZE
        };
        let mut raw = vec![0u8; len];
        t.config_read(0, &mut raw)
            .map_err(ShadowError::ReadConfig)?;
        if raw[HEADER_TYPE] & 0x7f != 0 {
            return Err(ShadowError::NotType0(raw[HEADER_TYPE]));
        }

        let mut regions = Vec::with_capacity(ROM_REGION as usize + 1);
        for index in 0..=ROM_REGION {
            let r = info(t, index)?;
            for a in &r.mmap_areas {
                if a.offset.checked_add(a.size).is_none_or(|end| end > r.size) {
                    return Err(ShadowError::AreaOutside {
                        index,
                        offset: a.offset,
                        size: a.size,
                        region: r.size,
                    });
                }
            }
            if !r.mmap_areas.is_empty() && r.file.is_none() {
                return Err(ShadowError::NoFile { index });
            }
            regions.push(r);
        }
        let layout = bar_layout(&raw, &regions)?;

        let standard = walk_standard(&raw)?;
        let ext = if extended {
            walk_extended(&raw)?
        } else {
            Vec::new()
        };

        let header = ConfigHeader {
            vendor_id: u16_at(&raw, 0),
            device_id: u16_at(&raw, 2),
            ..ConfigHeader::default()
        };
        let mut cfg = ConfigSpace::new(&header, layout, extended);
        let mut virtualized = vec![false; len];
        // The header: all the device's bytes but command and BARs/ROM (the shadow's own).
        let set = |cfg: &mut ConfigSpace, offset: usize, bytes: &[u8]| {
            cfg.set(offset, bytes)
                .map_err(|source| ShadowError::Rewrite { offset, source })
        };
        set(&mut cfg, STATUS, &raw[STATUS..BAR0])?;
        set(&mut cfg, 0x28, &raw[0x28..ROM_BAR])?;
        set(
            &mut cfg,
            CAPABILITIES_POINTER,
            &raw[CAPABILITIES_POINTER..FIRST_CAPABILITY],
        )?;
        set(&mut cfg, FIRST_CAPABILITY, &raw[FIRST_CAPABILITY..])?;
        // One function, no BIST, no INTx (only MSI-X is offered).
        set(&mut cfg, HEADER_TYPE, &[raw[HEADER_TYPE] & 0x7f, 0])?;
        set(&mut cfg, INTERRUPT_PIN, &[0])?;
        virtualized[..4].fill(true);
        virtualized[8..FIRST_CAPABILITY].fill(true);

        // Standard list: none hidden; the headers are the shadow's.
        let mut link = CAPABILITIES_POINTER;
        for cap in &standard {
            set(&mut cfg, link, &[cap.offset as u8])?;
            virtualized[link] = true;
            virtualized[cap.offset] = true; // the id: read-only anyway
            link = cap.offset + 1;
        }
        set(&mut cfg, link, &[0])?;
        virtualized[link] = true;
        if link == CAPABILITIES_POINTER {
            let status = cfg.read_u16(STATUS) & !STATUS_CAPABILITIES;
            set(&mut cfg, STATUS, &status.to_le_bytes())?;
        }

        // Extended list: zero hidden ones, relink visible ones; 0x100 always starts it.
        let mut by_address: Vec<usize> = ext.iter().map(|c| c.offset).collect();
        by_address.sort_unstable();
        let mut visible = Vec::new();
        for cap in &ext {
            match HIDDEN_EXTENDED.iter().find(|(id, _)| *id == cap.id) {
                Some((_, span)) => {
                    let next = by_address
                        .iter()
                        .copied()
                        .find(|&o| o > cap.offset)
                        .unwrap_or(len);
                    let end = (cap.offset + span).min(next).min(len);
                    set(&mut cfg, cap.offset, &vec![0; end - cap.offset])?;
                    virtualized[cap.offset..end].fill(true);
                }
                None => visible.push(*cap),
            }
        }
        let mut header_at = |offset: usize, id: u16, version: u32, next: usize| {
            virtualized[offset..offset + 4].fill(true);
            let h = u32::from(id) | version << 16 | (next as u32) << 20;
            set(&mut cfg, offset, &h.to_le_bytes())
        };
        for (i, cap) in visible.iter().enumerate() {
            let next = visible.get(i + 1).map_or(0, |c| c.offset);
            let version = (u32_at(&raw, cap.offset) >> 16) & 0xf;
            header_at(cap.offset, cap.id, version, next)?;
        }
        if ext.first().is_some_and(|c| c.offset == CONFIG_SIZE)
            && visible.first().is_none_or(|c| c.offset != CONFIG_SIZE)
        {
            let next = visible.first().map_or(0, |c| c.offset);
            header_at(CONFIG_SIZE, 0, 0, next)?;
        }

        let msix = match standard.iter().find(|c| c.id == u16::from(MSIX_CAP_ID)) {
            Some(cap) => {
                let msix = emulate_msix(t, &raw, cap.offset, &mut cfg)?;
                virtualized[cap.offset..cap.offset + MSIX_CAP_LEN].fill(true);
                Some(msix)
            }
            None => None,
        };
        let msi = match standard.iter().find(|c| c.id == u16::from(MSI_CAP_ID)) {
            Some(cap) => {
                let msi = emulate_msi(t, &raw, cap.offset, &mut cfg)?;
                virtualized[cap.offset..cap.offset + msi.cap_len()].fill(true);
                Some(msi)
            }
            None => None,
        };
        Ok(Self {
            cfg,
            virtualized,
            regions,
            msix,
            msi,
        })
    }

    /// A guest config read: virtualized bytes from the shadow, the others from the device
    /// (one transport read spanning them). On a transport error those bytes read all ones.
    pub fn read(
        &self,
        t: &mut dyn VfioTransport,
        offset: usize,
        data: &mut [u8],
    ) -> Result<(), TransportError> {
        self.cfg.read(offset, data);
        let Some((first, last)) = self.passthrough_span(offset, data.len()) else {
            return Ok(());
        };
        let mut tmp = vec![0u8; last + 1 - first];
        let result = t.config_read(first as u64, &mut tmp);
        for (i, b) in tmp.iter().enumerate() {
            let o = first + i;
            if !self.virtualized[o] {
                data[o - offset] = if result.is_ok() { *b } else { 0xff };
            }
        }
        result
    }

    /// A guest write: through the shadow's masks (for its events), and the bytes that pass
    /// through to the device, one write per run.
    pub fn write(
        &mut self,
        t: &mut dyn VfioTransport,
        offset: usize,
        data: &[u8],
    ) -> (Vec<ConfigEvent>, Result<(), TransportError>) {
        let events = self.cfg.write(offset, data);
        let mut result = Ok(());
        let end = offset
            .saturating_add(data.len())
            .min(self.virtualized.len());
        let mut o = offset;
        while o < end {
            if self.virtualized[o] {
                o += 1;
                continue;
            }
            let run_end = (o..end).find(|&p| self.virtualized[p]).unwrap_or(end);
            let r = t.config_write(o as u64, &data[o - offset..run_end - offset]);
            if result.is_ok() {
                result = r;
            }
            o = run_end;
        }
        (events, result)
    }

    /// The first and last byte of `[offset, offset + len)` that pass through.
    fn passthrough_span(&self, offset: usize, len: usize) -> Option<(usize, usize)> {
        let end = offset.saturating_add(len).min(self.virtualized.len());
        let first = (offset..end).find(|&o| !self.virtualized[o])?;
        let last = (first..end).rev().find(|&o| !self.virtualized[o])?;
        Some((first, last))
    }
}

/// BARs from the regions' sizes and the device's BAR registers' type bits.
fn bar_layout(raw: &[u8], regions: &[RegionInfo]) -> Result<BarLayout, ShadowError> {
    let mut bars = Vec::new();
    let mut index = 0;
    while index < BAR_COUNT {
        let size = regions.get(index).map_or(0, |r| r.size);
        let reg = u32_at(raw, BAR0 + 4 * index);
        let kind = if reg & 1 != 0 {
            BarKind::Io
        } else if reg & 0x6 == 0x4 {
            BarKind::Mem64 {
                prefetchable: reg & 0x8 != 0,
            }
        } else {
            BarKind::Mem32 {
                prefetchable: reg & 0x8 != 0,
            }
        };
        if size != 0 {
            bars.push(Bar {
                index: index as u8,
                kind,
                size,
            });
        }
        index += if size != 0 && kind.is_64bit() { 2 } else { 1 };
    }
    let rom = regions
        .get(ROM_REGION as usize)
        .map(|r| r.size)
        .filter(|&s| s != 0);
    BarLayout::new(&bars, rom).map_err(ShadowError::Bars)
}

fn walk_standard(raw: &[u8]) -> Result<Vec<Found>, ShadowError> {
    let mut out = Vec::new();
    if u16_at(raw, STATUS) & STATUS_CAPABILITIES == 0 {
        return Ok(out);
    }
    let kind = "standard";
    let mut seen = HashSet::new();
    let mut from = CAPABILITIES_POINTER;
    let mut ptr = usize::from(raw[from] & 0xfc);
    while ptr != 0 {
        if !(FIRST_CAPABILITY..CONFIG_SIZE - 1).contains(&ptr) {
            return Err(ShadowError::CapabilityPointer {
                kind,
                from,
                to: ptr,
            });
        }
        if !seen.insert(ptr) {
            return Err(ShadowError::CapabilityLoop { kind, offset: ptr });
        }
        out.push(Found {
            id: u16::from(raw[ptr]),
            offset: ptr,
        });
        from = ptr + 1;
        ptr = usize::from(raw[from] & 0xfc);
    }
    Ok(out)
}

fn walk_extended(raw: &[u8]) -> Result<Vec<Found>, ShadowError> {
    let kind = "extended";
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut from = CONFIG_SIZE;
    let mut ptr = CONFIG_SIZE;
    loop {
        if !(CONFIG_SIZE..=raw.len() - 4).contains(&ptr) {
            return Err(ShadowError::CapabilityPointer {
                kind,
                from,
                to: ptr,
            });
        }
        if !seen.insert(ptr) {
            return Err(ShadowError::CapabilityLoop { kind, offset: ptr });
        }
        let header = u32_at(raw, ptr);
        if header == 0 || header == u32::MAX {
            break;
        }
        out.push(Found {
            id: header as u16,
            offset: ptr,
        });
        let next = (header >> 20) as usize & 0xffc;
        if next == 0 {
            break;
        }
        from = ptr;
        ptr = next;
    }
    Ok(out)
}

fn emulate_msix(
    t: &mut dyn VfioTransport,
    raw: &[u8],
    offset: usize,
    cfg: &mut ConfigSpace,
) -> Result<Msix, ShadowError> {
    let err = |source| ShadowError::Msix { offset, source };
    if offset + MSIX_CAP_LEN > CONFIG_SIZE {
        return Err(err(MsixError::Capability(
            crate::pci::ConfigError::OutOfRange {
                offset,
                len: MSIX_CAP_LEN,
            },
        )));
    }
    let vectors = (u16_at(raw, offset + 2) & 0x7ff) + 1;
    let table = u32_at(raw, offset + 4);
    let pba = u32_at(raw, offset + 8);
    let layout = MsixLayout {
        vectors,
        table_bar: (table & 7) as u8,
        table_offset: table & !7,
        pba_bar: (pba & 7) as u8,
        pba_offset: pba & !7,
    };
    let index = super::transport::MSIX_IRQ;
    let irq = t
        .irq_info(index)
        .map_err(|source| ShadowError::IrqInfo { index, source })?;
    if irq.count < u32::from(vectors) {
        return Err(ShadowError::MsixCount {
            offset,
            cap: vectors,
            irq: irq.count,
        });
    }
    Msix::at(layout, cfg, offset).map_err(err)
}

fn emulate_msi(
    t: &mut dyn VfioTransport,
    raw: &[u8],
    offset: usize,
    cfg: &mut ConfigSpace,
) -> Result<Msi, ShadowError> {
    let control = u16_at(raw, offset + 2);
    let vectors = 1u8 << ((control >> 1) & 0x7).min(5);
    let is_64bit = control & MSI_64BIT != 0;
    let per_vector_mask = control & MSI_PER_VECTOR_MASK != 0;
    let index = super::transport::MSI_IRQ;
    let irq = t
        .irq_info(index)
        .map_err(|source| ShadowError::IrqInfo { index, source })?;
    if irq.count < u32::from(vectors) {
        return Err(ShadowError::MsiCount {
            offset,
            cap: vectors,
            irq: irq.count,
        });
    }
    let msi = Msi::at(cfg, offset, vectors, is_64bit, per_vector_mask)
        .map_err(|source| ShadowError::Msi { offset, source })?;
    if offset + msi.cap_len() > CONFIG_SIZE {
        return Err(ShadowError::Msi {
            offset,
            source: MsiError::Capability(crate::pci::ConfigError::OutOfRange {
                offset,
                len: msi.cap_len(),
            }),
        });
    }
    Ok(msi)
}
