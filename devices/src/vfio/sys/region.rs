//! `VFIO_DEVICE_GET_REGION_INFO` by index, with its capability chain (sparse mmap areas), and
//! the mmap of a region's memory through the device fd ([`RegionMap`]).
//!
//! The ioctl by hand (vfio-bindings' struct and flags) although vfio-ioctls reads regions too:
//! its accessors index a list that skips regions whose query failed, so position n is not
//! guaranteed to be region n, and they answer 0 rather than an error. Any device fd works (a
//! group's device fd or a bound cdev); never run with a bound device here (no VFIO here).

use std::io;
use std::mem::size_of;
use std::os::fd::AsRawFd;

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_BASE, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_BAR5_REGION_INDEX,
    VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
};

use super::caps::{self, CapError};
use super::io_nr;

/// Regions 0..=5 are the BARs of a vfio-pci device.
pub const BAR_REGIONS: std::ops::RangeInclusive<u32> =
    VFIO_PCI_BAR0_REGION_INDEX..=VFIO_PCI_BAR5_REGION_INDEX;

/// By hand, with vfio-bindings' struct: see the module's doc for why not vfio-ioctls'.
pub const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = io_nr(VFIO_BASE + 8);
const _: () = assert!(VFIO_DEVICE_GET_REGION_INFO == 0x3b6c);

const INFO: usize = size_of::<vfio_region_info>();

/// The info struct followed by room for its capabilities, in one buffer the kernel fills.
#[repr(C)]
struct InfoWithCaps {
    info: vfio_region_info,
    tail: [u8; 4096 - INFO],
}
const _: () = assert!(size_of::<InfoWithCaps>() == 4096);

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("VFIO_DEVICE_GET_REGION_INFO({index}): {source}")]
    Ioctl { index: u32, source: io::Error },
    #[error("region {index}: the kernel needs {argsz} bytes for its capabilities, over 4096")]
    CapsTooLarge { index: u32, argsz: u32 },
    #[error("region {index}: {source}")]
    Caps { index: u32, source: CapError },
    #[error("mmap of {len:#x} bytes at device-fd offset {offset:#x}: {source}")]
    Mmap {
        len: usize,
        offset: u64,
        source: io::Error,
    },
}

/// One region as the kernel describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub index: u32,
    pub flags: u32,
    pub size: u64,
    /// Where the region lies in the device fd (for pread and mmap).
    pub offset: u64,
    /// `Some(areas)` when a sparse-mmap capability limits mmap to these (offset, size) areas.
    pub sparse: Option<Vec<(u64, u64)>>,
    /// VFIO_REGION_INFO_CAP_MSIX_MAPPABLE: the MSI-X table may be mmap'd with the rest.
    pub msix_mappable: bool,
}

impl Region {
    pub fn mmap_able(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_MMAP != 0
    }

    /// The first area that may be mmap'd: (offset within the region, size).
    pub fn first_area(&self) -> Option<(u64, u64)> {
        match &self.sparse {
            Some(areas) => areas.iter().copied().find(|&(_, s)| s > 0),
            None => Some((0, self.size)),
        }
    }
}

/// `VFIO_DEVICE_GET_REGION_INFO` for region `index` of the device behind `fd`.
pub fn info(fd: &impl AsRawFd, index: u32) -> Result<Region, RegionError> {
    let mut buf = InfoWithCaps {
        info: vfio_region_info {
            argsz: size_of::<InfoWithCaps>() as u32,
            index,
            ..Default::default()
        },
        tail: [0; 4096 - INFO],
    };
    // SAFETY: VFIO_DEVICE_GET_REGION_INFO reads argsz and index and writes at most argsz bytes
    // into `buf`, which is exactly argsz bytes and lives across the call; the result is checked.
    let rc = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(fd, VFIO_DEVICE_GET_REGION_INFO, &mut buf)
    };
    if rc < 0 {
        let source = io::Error::last_os_error();
        // Some drivers refuse an argsz larger than their own structure (the 6.12 mbochs sample:
        // `outsz > sizeof(info)` is EINVAL): ask again with the bare struct, without caps.
        if source.raw_os_error() == Some(libc::EINVAL) {
            if let Ok(r) = info_bare(fd, index) {
                return Ok(r);
            }
        }
        return Err(RegionError::Ioctl { index, source });
    }
    let i = buf.info;
    // The kernel raises argsz to what the caps need and leaves them out when they do not fit.
    if i.flags & VFIO_REGION_INFO_FLAG_CAPS != 0 && i.argsz as usize > size_of::<InfoWithCaps>() {
        return Err(RegionError::CapsTooLarge {
            index,
            argsz: i.argsz,
        });
    }
    let mut region = Region {
        index,
        flags: i.flags,
        size: i.size,
        offset: i.offset,
        sparse: None,
        msix_mappable: false,
    };
    if i.flags & VFIO_REGION_INFO_FLAG_CAPS != 0 {
        let chain = caps::walk(&buf.tail, INFO, i.cap_offset)
            .map_err(|source| RegionError::Caps { index, source })?;
        for cap in chain {
            match u32::from(cap.id) {
                VFIO_REGION_INFO_CAP_SPARSE_MMAP => {
                    let areas = caps::sparse_areas(&cap)
                        .map_err(|source| RegionError::Caps { index, source })?;
                    region.sparse = Some(areas);
                }
                VFIO_REGION_INFO_CAP_MSIX_MAPPABLE => region.msix_mappable = true,
                _ => {}
            }
        }
    }
    Ok(region)
}

/// `VFIO_DEVICE_GET_REGION_INFO` with argsz = the bare `vfio_region_info`: no capability chain
/// comes back (so no sparse areas: the region is taken whole).
fn info_bare(fd: &impl AsRawFd, index: u32) -> Result<Region, io::Error> {
    let mut info = vfio_region_info {
        argsz: size_of::<vfio_region_info>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: the kernel writes at most argsz bytes, exactly the struct passed, which lives
    // across the call; the result is checked.
    let rc = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(fd, VFIO_DEVICE_GET_REGION_INFO, &mut info)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Region {
        index,
        flags: info.flags,
        size: info.size,
        offset: info.offset,
        sparse: None,
        msix_mappable: false,
    })
}

/// A shared mapping of part of a region through the device fd (a BAR's memory), unmapped on
/// drop.
pub struct RegionMap {
    pub addr: usize,
    pub len: usize,
}

impl RegionMap {
    /// Maps `len` bytes at `offset` in the device fd (a region's offset plus an mmap-able area's
    /// offset within it), read-only unless `writable`.
    pub fn new(
        fd: &impl AsRawFd,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> Result<RegionMap, RegionError> {
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        let err = |source| RegionError::Mmap {
            len,
            offset,
            source,
        };
        let off = libc::off_t::try_from(offset)
            .map_err(|_| err(io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
        // SAFETY: a new shared mapping of the device fd at an address the kernel chooses: it
        // overlaps nothing Rust owns; the kernel checks offset and length against the region.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(RegionMap {
            addr: ptr as usize,
            len,
        })
    }
}

impl Drop for RegionMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; whoever borrowed the address has
        // returned (the owner drops it last).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_no_vfio_device_says_enotty() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let e = info(&null, 0).unwrap_err();
        assert!(
            matches!(&e, RegionError::Ioctl { source, .. } if source.raw_os_error() == Some(libc::ENOTTY)),
            "{e}"
        );
    }

    #[test]
    fn the_mmap_area_is_the_first_nonempty_sparse_one() {
        let mut r = Region {
            index: 0,
            flags: VFIO_REGION_INFO_FLAG_MMAP,
            size: 0x10000,
            offset: 0,
            sparse: None,
            msix_mappable: false,
        };
        assert_eq!(r.first_area(), Some((0, 0x10000)));
        r.sparse = Some(vec![(0, 0), (0x4000, 0xc000)]);
        assert_eq!(r.first_area(), Some((0x4000, 0xc000)));
        r.sparse = Some(Vec::new());
        assert_eq!(r.first_area(), None);
    }

    #[test]
    fn mmap_of_a_file_that_is_no_device_is_a_clean_error() {
        // /dev/null cannot be mmap'd shared (ENODEV): the real call, refused.
        let null = std::fs::File::open("/dev/null").unwrap();
        let e = RegionMap::new(&null, 0, 4096, false).err().unwrap();
        assert!(matches!(e, RegionError::Mmap { .. }), "{e}");
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::ENODEV));
        // An offset mmap cannot take is refused before the kernel is asked.
        let e = RegionMap::new(&null, u64::MAX, 4096, false).err().unwrap();
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::EOVERFLOW));
    }
}
