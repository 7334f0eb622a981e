//! The device's view of guest memory: the regions a client sent with DMA_MAP, by IOVA.
//!
//! Each region is the client's fd mapped here, so device writes reach guest RAM without the
//! client (or KVM) seeing them, as a GPU's DMA does. Regions are reference counted: an engine
//! that resolved an IOVA keeps its mapping alive even if the client unmaps it meanwhile.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;

use vm_memory::VolatileSlice;

use crate::memory::{Mapping, MemoryError};

/// Failures of DMA_MAP and DMA_UNMAP (answered to the client with an errno).
#[derive(Debug, thiserror::Error)]
pub enum DmaMapError {
    #[error("DMA_MAP without a file descriptor (DMA_READ/DMA_WRITE are not supported)")]
    NoFd,
    #[error("empty or wrapping IOVA range {iova:#x}+{size:#x}")]
    BadRange { iova: u64, size: u64 },
    #[error("IOVA range {iova:#x}+{size:#x} overlaps a mapped region")]
    Overlap { iova: u64, size: u64 },
    #[error("DMA_UNMAP {iova:#x}+{size:#x} cuts the region at {region:#x}")]
    PartialUnmap { iova: u64, size: u64, region: u64 },
    #[error("DMA_MAP at IOVA {iova:#x}: file offset {offset:#x}+{size:#x} is not within a regular file of {len} bytes")]
    PastEnd {
        iova: u64,
        offset: u64,
        size: u64,
        len: u64,
    },
    #[error("DMA_MAP at IOVA {iova:#x}: cannot inspect the file")]
    Inspect {
        iova: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("mapping the DMA region at IOVA {iova:#x}")]
    Map {
        iova: u64,
        #[source]
        source: MemoryError,
    },
}

impl DmaMapError {
    /// The errno the client gets.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Overlap { .. } => libc::EEXIST,
            Self::Map { .. } => libc::ENOMEM,
            _ => libc::EINVAL,
        }
    }
}

/// Why a DMA access failed (the engine reports it as a status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DmaFault {
    #[error("IOVA {0:#x} is not in any DMA_MAP region")]
    Unmapped(u64),
    #[error("IOVA {0:#x} is in a region mapped without write permission")]
    ReadOnly(u64),
}

/// One DMA_MAP region.
#[derive(Debug)]
pub struct DmaRegion {
    iova: u64,
    writable: bool,
    mapping: Mapping,
}

/// A piece of a DMA transfer that lies in one region.
pub struct Segment {
    region: Arc<DmaRegion>,
    offset: u64,
    len: u64,
}

impl Segment {
    /// The guest bytes of this piece.
    pub fn slice(&self) -> Option<VolatileSlice<'_, ()>> {
        self.region.mapping.slice(self.offset, self.len)
    }
}

/// All regions the client mapped, keyed by first IOVA.
#[derive(Debug, Default)]
pub struct DmaSpace {
    regions: BTreeMap<u64, Arc<DmaRegion>>,
}

impl DmaSpace {
    /// Maps `size` bytes of `fd` from `offset` at `iova`.
    pub fn map(
        &mut self,
        iova: u64,
        size: u64,
        offset: u64,
        fd: Option<File>,
        writable: bool,
    ) -> Result<(), DmaMapError> {
        let fd = fd.ok_or(DmaMapError::NoFd)?;
        let end = iova
            .checked_add(size)
            .filter(|_| size > 0)
            .ok_or(DmaMapError::BadRange { iova, size })?;
        let overlaps = self
            .regions
            .range(..end)
            .next_back()
            .is_some_and(|(_, r)| r.iova + r.mapping.len() > iova);
        if overlaps {
            return Err(DmaMapError::Overlap { iova, size });
        }
        // Touching a mapping past the end of its file is SIGBUS: check before mapping.
        let meta = fd
            .metadata()
            .map_err(|source| DmaMapError::Inspect { iova, source })?;
        let within = offset
            .checked_add(size)
            .is_some_and(|end| end <= meta.len());
        if !meta.is_file() || !within {
            return Err(DmaMapError::PastEnd {
                iova,
                offset,
                size,
                len: meta.len(),
            });
        }
        let mapping = Mapping::new(fd, offset, size, writable)
            .map_err(|source| DmaMapError::Map { iova, source })?;
        self.regions.insert(
            iova,
            Arc::new(DmaRegion {
                iova,
                writable,
                mapping,
            }),
        );
        Ok(())
    }

    /// Removes every region inside `[iova, iova + size)`; one that straddles an end is refused.
    pub fn unmap(&mut self, iova: u64, size: u64) -> Result<(), DmaMapError> {
        let end = iova
            .checked_add(size)
            .ok_or(DmaMapError::BadRange { iova, size })?;
        let mut inside = Vec::new();
        for (&start, region) in &self.regions {
            let region_end = start + region.mapping.len();
            if region_end <= iova || start >= end {
                continue;
            }
            if start < iova || region_end > end {
                return Err(DmaMapError::PartialUnmap {
                    iova,
                    size,
                    region: start,
                });
            }
            inside.push(start);
        }
        for start in inside {
            self.regions.remove(&start);
        }
        Ok(())
    }

    /// Forgets every region (the client left or asked to unmap all).
    pub fn clear(&mut self) {
        self.regions.clear();
    }

    /// Splits `[iova, iova + len)` into per-region pieces, checking write permission if
    /// `write`. Fails at the first byte no region covers.
    pub fn segments(&self, iova: u64, len: u64, write: bool) -> Result<Vec<Segment>, DmaFault> {
        let mut segments = Vec::new();
        let mut at = iova;
        let end = iova.checked_add(len).ok_or(DmaFault::Unmapped(iova))?;
        while at < end {
            let region = self
                .regions
                .range(..=at)
                .next_back()
                .map(|(_, r)| r)
                .filter(|r| at - r.iova < r.mapping.len())
                .ok_or(DmaFault::Unmapped(at))?;
            if write && !region.writable {
                return Err(DmaFault::ReadOnly(at));
            }
            let offset = at - region.iova;
            let piece = (region.mapping.len() - offset).min(end - at);
            segments.push(Segment {
                region: Arc::clone(region),
                offset,
                len: piece,
            });
            at += piece;
        }
        Ok(segments)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::memfd;

    fn file(size: u64) -> Option<File> {
        let file = memfd(c"dma-test").unwrap();
        file.set_len(size).unwrap();
        Some(file)
    }

    fn space() -> DmaSpace {
        let mut space = DmaSpace::default();
        space.map(0x10000, 0x2000, 0, file(0x2000), true).unwrap();
        space.map(0x12000, 0x1000, 0, file(0x1000), false).unwrap();
        space
    }

    #[test]
    fn overlapping_and_empty_maps_are_refused() {
        let mut space = space();
        let overlap = space.map(0x11000, 0x2000, 0, file(0x2000), true);
        assert!(matches!(overlap, Err(DmaMapError::Overlap { .. })));
        let below = space.map(0xf000, 0x2000, 0, file(0x2000), true);
        assert!(matches!(below, Err(DmaMapError::Overlap { .. })));
        let empty = space.map(0x20000, 0, 0, file(0x1000), true);
        assert!(matches!(empty, Err(DmaMapError::BadRange { .. })));
        let past_eof = space.map(0x20000, 0x2000, 0, file(0x1000), true);
        assert!(matches!(past_eof, Err(DmaMapError::PastEnd { .. })));
        let not_a_file = space.map(0x20000, 0x1000, 0, File::open("/dev/zero").ok(), true);
        assert!(matches!(not_a_file, Err(DmaMapError::PastEnd { .. })));
        assert!(matches!(
            space.map(0x20000, 0x1000, 0, None, true),
            Err(DmaMapError::NoFd)
        ));
    }

    #[test]
    fn segments_split_at_regions_and_check_permissions() {
        let space = space();
        let pieces = space.segments(0x11800, 0x1000, false).unwrap();
        let lens: Vec<u64> = pieces.iter().map(|s| s.len).collect();
        assert_eq!(lens, vec![0x800, 0x800]);
        assert_eq!(
            space.segments(0x11800, 0x1000, true).err(),
            Some(DmaFault::ReadOnly(0x12000))
        );
        assert_eq!(
            space.segments(0x12800, 0x1000, false).err(),
            Some(DmaFault::Unmapped(0x13000))
        );
        assert_eq!(
            space.segments(u64::MAX, 2, false).err(),
            Some(DmaFault::Unmapped(u64::MAX))
        );
    }

    #[test]
    fn unmap_takes_whole_regions_only() {
        let mut space = space();
        let cut = space.unmap(0x10000, 0x1000);
        assert!(matches!(
            cut,
            Err(DmaMapError::PartialUnmap {
                region: 0x10000,
                ..
            })
        ));
        space.unmap(0x10000, 0x2000).unwrap();
        assert!(space.segments(0x10000, 1, false).is_err());
        assert!(space.segments(0x12000, 1, false).is_ok());
    }
}
