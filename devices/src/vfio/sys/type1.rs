//! VFIO type1 dirty page tracking on a legacy container: `VFIO_IOMMU_GET_INFO` (its migration
//! capability says the IOMMU driver can track) and `VFIO_IOMMU_DIRTY_PAGES` START / GET_BITMAP /
//! STOP. Type1 cannot see DMA: it reports every page pinned for a device that does not report
//! its own pins (any vfio-pci device) as dirty, on every read (TRACKING.md: all-dirty).
//!
//! By hand: no crate has either ioctl. vfio-ioctls 0.10 maps DMA through its container but has
//! no wrapper for them (it defines VFIO_IOMMU_GET_INFO's number privately and never issues it);
//! vfio-bindings 0.7 has only the structs and flags, used here; iommufd-ioctls is iommufd only.
//! The container gives its fd (`AsRawFd`). Never run on a real container here (no VFIO).

use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::AsRawFd;

use vfio_bindings::bindings::vfio::{
    vfio_bitmap, vfio_iommu_type1_dirty_bitmap, vfio_iommu_type1_dirty_bitmap_get,
    vfio_iommu_type1_info, vfio_iommu_type1_info_cap_migration, VFIO_BASE,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
    VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION,
    VFIO_TYPE,
};

use super::bitmap::{self, BitmapError};
use super::caps::{self, CapError};
use super::io_nr;

/// By hand, no crate has this: vfio-ioctls 0.10 (number private, never issued), vfio-bindings
/// 0.7 (structs only), iommufd-ioctls 0.4 (iommufd only).
pub const VFIO_IOMMU_GET_INFO: libc::c_ulong = io_nr(VFIO_BASE + 12);
/// By hand, no crate has this: vfio-ioctls 0.10 (no wrapper, no number), vfio-bindings 0.7
/// (structs and flags only), iommufd-ioctls 0.4 (iommufd only).
pub const VFIO_IOMMU_DIRTY_PAGES: libc::c_ulong = io_nr(VFIO_BASE + 17);
// include/uapi/linux/vfio.h: _IO(';', 100 + 12) and _IO(';', 100 + 17).
const _: () = assert!(VFIO_TYPE == b';');
const _: () = assert!(VFIO_IOMMU_GET_INFO == 0x3b70);
const _: () = assert!(VFIO_IOMMU_DIRTY_PAGES == 0x3b75);

const INFO: usize = size_of::<vfio_iommu_type1_info>();

/// The info struct followed by room for its capabilities, in one buffer the kernel fills.
#[repr(C)]
struct InfoWithCaps {
    info: vfio_iommu_type1_info,
    tail: [u8; 4096 - INFO],
}
const _: () = assert!(size_of::<InfoWithCaps>() == 4096);

/// `struct vfio_iommu_type1_dirty_bitmap` with `struct vfio_iommu_type1_dirty_bitmap_get` in its
/// flexible `data[]`, as GET_BITMAP takes them: one buffer.
#[repr(C)]
struct DirtyBitmapGet {
    head: vfio_iommu_type1_dirty_bitmap,
    get: vfio_iommu_type1_dirty_bitmap_get,
}
const _: () =
    assert!(offset_of!(DirtyBitmapGet, get) == offset_of!(vfio_iommu_type1_dirty_bitmap, data));
const _: () = assert!(size_of::<DirtyBitmapGet>() == 8 + 40);

#[derive(Debug, thiserror::Error)]
pub enum Type1Error {
    #[error("{op}: {source}")]
    Ioctl { op: &'static str, source: io::Error },
    #[error("VFIO_IOMMU_GET_INFO: the capabilities need {argsz} bytes, over 4096")]
    CapsTooLarge { argsz: u32 },
    #[error("VFIO_IOMMU_GET_INFO: {0}")]
    Caps(#[from] CapError),
    #[error("a bitmap of {have} u64s is too small for {pages} pages")]
    BitmapTooSmall { have: usize, pages: u64 },
    #[error("VFIO_IOMMU_DIRTY_PAGES(GET_BITMAP): {0}")]
    Bitmap(#[from] BitmapError),
}

/// `struct vfio_iommu_type1_info_cap_migration`: present when type1 can track dirty pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    pub flags: u32,
    /// Page sizes dirty bitmaps can be read in; GET_BITMAP takes only the smallest.
    pub pgsize_bitmap: u64,
    pub max_dirty_bitmap_size: u64,
}

impl Migration {
    /// The one page size GET_BITMAP accepts: the smallest in `pgsize_bitmap`.
    pub fn page_size(&self) -> Option<u64> {
        (self.pgsize_bitmap != 0).then(|| 1 << self.pgsize_bitmap.trailing_zeros())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Info {
    pub iova_pgsizes: u64,
    pub migration: Option<Migration>,
}

fn check(op: &'static str, rc: libc::c_int) -> Result<(), Type1Error> {
    if rc < 0 {
        return Err(Type1Error::Ioctl {
            op,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The migration capability's fields, read from its bytes at vfio-bindings' offsets.
fn migration(cap: &caps::Cap) -> Result<Migration, CapError> {
    type M = vfio_iommu_type1_info_cap_migration;
    let b = cap.bytes;
    let (Some(flags), Some(pgsize_bitmap), Some(max)) = (
        caps::u32_at(b, offset_of!(M, flags)),
        caps::u64_at(b, offset_of!(M, pgsize_bitmap)),
        caps::u64_at(b, offset_of!(M, max_dirty_bitmap_size)),
    ) else {
        return Err(CapError::Short {
            id: cap.id,
            have: b.len(),
            need: size_of::<M>(),
        });
    };
    Ok(Migration {
        flags,
        pgsize_bitmap,
        max_dirty_bitmap_size: max,
    })
}

/// `VFIO_IOMMU_GET_INFO` on a container whose IOMMU type is set.
pub fn info(container: &impl AsRawFd) -> Result<Info, Type1Error> {
    let mut buf = InfoWithCaps {
        info: vfio_iommu_type1_info {
            argsz: size_of::<InfoWithCaps>() as u32,
            ..Default::default()
        },
        tail: [0; 4096 - INFO],
    };
    // SAFETY: the kernel writes at most argsz bytes into `buf`, which is exactly argsz bytes and
    // lives across the call; the result is checked.
    let rc = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ref(container, VFIO_IOMMU_GET_INFO, &mut buf)
    };
    check("VFIO_IOMMU_GET_INFO", rc)?;
    let i = buf.info;
    if i.flags & VFIO_IOMMU_INFO_CAPS != 0 && i.argsz as usize > size_of::<InfoWithCaps>() {
        return Err(Type1Error::CapsTooLarge { argsz: i.argsz });
    }
    let mut out = Info {
        iova_pgsizes: i.iova_pgsizes,
        migration: None,
    };
    if i.flags & VFIO_IOMMU_INFO_CAPS != 0 {
        for cap in caps::walk(&buf.tail, INFO, i.cap_offset)? {
            if u32::from(cap.id) == VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION {
                out.migration = Some(migration(&cap)?);
            }
        }
    }
    Ok(out)
}

fn start_or_stop(container: &impl AsRawFd, flags: u32, op: &'static str) -> Result<(), Type1Error> {
    let arg = vfio_iommu_type1_dirty_bitmap {
        argsz: size_of::<vfio_iommu_type1_dirty_bitmap>() as u32,
        flags,
        ..Default::default()
    };
    // SAFETY: the kernel reads the 8 bytes of `arg` (argsz; START and STOP carry no data),
    // which lives across the call; the result is checked.
    let rc =
        unsafe { vmm_sys_util::ioctl::ioctl_with_ref(container, VFIO_IOMMU_DIRTY_PAGES, &arg) };
    check(op, rc)
}

pub fn start(container: &impl AsRawFd) -> Result<(), Type1Error> {
    start_or_stop(
        container,
        VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
        "VFIO_IOMMU_DIRTY_PAGES(START)",
    )
}

pub fn stop(container: &impl AsRawFd) -> Result<(), Type1Error> {
    start_or_stop(
        container,
        VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
        "VFIO_IOMMU_DIRTY_PAGES(STOP)",
    )
}

/// GET_BITMAP for a whole DMA mapping `[iova, iova + size)`, one bit per `pgsize` (which must be
/// the IOMMU's smallest page size).
pub fn bitmap(
    container: &impl AsRawFd,
    iova: u64,
    size: u64,
    pgsize: u64,
    bitmap: &mut [u64],
) -> Result<(), Type1Error> {
    let pages = size.div_ceil(pgsize.max(1));
    if (bitmap.len() as u64).saturating_mul(64) < pages {
        return Err(Type1Error::BitmapTooSmall {
            have: bitmap.len(),
            pages,
        });
    }
    // The kernel wants zeroed memory and sets bits only.
    bitmap.fill(0);
    let arg = DirtyBitmapGet {
        head: vfio_iommu_type1_dirty_bitmap {
            argsz: size_of::<DirtyBitmapGet>() as u32,
            flags: VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP,
            ..Default::default()
        },
        get: vfio_iommu_type1_dirty_bitmap_get {
            iova,
            size,
            bitmap: vfio_bitmap {
                pgsize,
                size: pages.div_ceil(64) * 8,
                data: bitmap.as_mut_ptr(),
            },
        },
    };
    // SAFETY: the kernel reads `arg` (argsz bytes, its size) and writes at most bitmap.size
    // bytes through bitmap.data, which `bitmap` holds (checked above) for the whole call and
    // nothing else refers to; the result is checked.
    let rc =
        unsafe { vmm_sys_util::ioctl::ioctl_with_ref(container, VFIO_IOMMU_DIRTY_PAGES, &arg) };
    check("VFIO_IOMMU_DIRTY_PAGES(GET_BITMAP)", rc)
}

/// Dirty page tracking on one type1 container, started by [`Type1Dirty::start`] and stopped by
/// [`Type1Dirty::stop`] or, failing that, on drop (tracking left on keeps type1 accounting every
/// pinned page). Generic over how the container is held (`Arc<VfioContainer>`, a `File`).
pub struct Type1Dirty<C: AsRawFd> {
    container: C,
    tracking: bool,
}

impl<C: AsRawFd> Type1Dirty<C> {
    /// The container's migration capability: `None` when type1 cannot track on it.
    pub fn capability(container: &C) -> Result<Option<Migration>, Type1Error> {
        Ok(info(container)?.migration)
    }

    /// `VFIO_IOMMU_DIRTY_PAGES(START)`: tracking from now on, for every DMA mapping.
    pub fn start(container: C) -> Result<Self, Type1Error> {
        start(&container)?;
        Ok(Self {
            container,
            tracking: true,
        })
    }

    /// `VFIO_IOMMU_DIRTY_PAGES(GET_BITMAP)` of one whole DMA mapping `[iova, iova + size)`,
    /// one bit per `page_size` (the capability's [`Migration::page_size`]); type1 clears what
    /// it reports.
    pub fn report(&self, iova: u64, size: u64, page_size: u64) -> Result<Vec<u64>, Type1Error> {
        let words = bitmap::range_words(iova, size, page_size)?;
        let mut out = vec![0u64; words];
        bitmap(&self.container, iova, size, page_size, &mut out)?;
        Ok(out)
    }

    /// `VFIO_IOMMU_DIRTY_PAGES(STOP)`.
    pub fn stop(mut self) -> Result<(), Type1Error> {
        self.tracking = false;
        stop(&self.container)
    }
}

impl<C: AsRawFd> Drop for Type1Dirty<C> {
    fn drop(&mut self) {
        if self.tracking {
            if let Err(e) = stop(&self.container) {
                tracing::warn!("type1 dirty tracking left on: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ioctl_on_a_file_that_is_no_container_says_enotty() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let enotty = |e: Type1Error| {
            assert_eq!(crate::vfio::errno_of(&e), Some(libc::ENOTTY), "{e}");
        };
        enotty(info(&null).unwrap_err());
        enotty(start(&null).unwrap_err());
        enotty(stop(&null).unwrap_err());
        let mut b = [0u64; 8];
        enotty(bitmap(&null, 1 << 32, 2 << 20, 4096, &mut b).unwrap_err());
    }

    #[test]
    fn the_structs_are_the_uapi_s() {
        // include/uapi/linux/vfio.h, x86_64 and arm64 alike.
        assert_eq!(size_of::<vfio_iommu_type1_info>(), 24);
        assert_eq!(offset_of!(vfio_iommu_type1_info, cap_offset), 16);
        assert_eq!(size_of::<vfio_iommu_type1_dirty_bitmap>(), 8);
        assert_eq!(size_of::<vfio_bitmap>(), 24);
        assert_eq!(offset_of!(vfio_bitmap, data), 16);
        assert_eq!(size_of::<vfio_iommu_type1_dirty_bitmap_get>(), 40);
        assert_eq!(offset_of!(vfio_iommu_type1_dirty_bitmap_get, bitmap), 16);
        type M = vfio_iommu_type1_info_cap_migration;
        assert_eq!(size_of::<M>(), 32);
        assert_eq!(offset_of!(M, flags), 8);
        assert_eq!(offset_of!(M, pgsize_bitmap), 16);
        assert_eq!(offset_of!(M, max_dirty_bitmap_size), 24);
        assert_eq!(VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION, 2);
        assert_eq!(
            (
                VFIO_IOMMU_DIRTY_PAGES_FLAG_START,
                VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
                VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP
            ),
            (1, 2, 4)
        );
    }

    #[test]
    fn the_session_on_a_file_that_is_no_container_names_each_ioctl() {
        let null = || std::fs::File::open("/dev/null").unwrap();
        let e = Type1Dirty::capability(&null()).unwrap_err();
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::ENOTTY), "{e}");
        let e = Type1Dirty::start(null()).err().unwrap();
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::ENOTTY), "{e}");
        assert!(
            e.to_string().starts_with("VFIO_IOMMU_DIRTY_PAGES(START)"),
            "{e}"
        );
        // A session as if START had worked, to reach GET_BITMAP and STOP.
        let s = Type1Dirty {
            container: null(),
            tracking: true,
        };
        let e = s.report(1 << 32, 2 << 20, 4096).unwrap_err();
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::ENOTTY), "{e}");
        assert!(e.to_string().contains("GET_BITMAP"), "{e}");
        assert!(matches!(
            s.report(1 << 32, 2 << 20, 0),
            Err(Type1Error::Bitmap(BitmapError::PageSize(0)))
        ));
        assert!(matches!(
            s.report(0, u64::MAX - 4095, 1),
            Err(Type1Error::Bitmap(BitmapError::TooLarge { .. }))
        ));
        let e = s.stop().unwrap_err();
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::ENOTTY), "{e}");
        assert!(
            e.to_string().starts_with("VFIO_IOMMU_DIRTY_PAGES(STOP)"),
            "{e}"
        );
    }

    #[test]
    fn the_capability_s_page_size_is_its_smallest() {
        let m = Migration {
            flags: 0,
            pgsize_bitmap: 0x4020_1000,
            max_dirty_bitmap_size: 256 << 20,
        };
        assert_eq!(m.page_size(), Some(0x1000));
        assert_eq!(
            Migration {
                pgsize_bitmap: 0,
                ..m
            }
            .page_size(),
            None
        );
    }

    /// On a host with VFIO: a fresh container has no IOMMU driver until a group joins it, so
    /// the kernel's container ioctl answers the type1 ioctls EINVAL (not ENOTTY: the number
    /// reached VFIO).
    #[test]
    fn a_real_container_without_a_group_refuses_with_einval() {
        let path = "/dev/vfio/vfio";
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("skipped: cannot open {path} ({e}): no VFIO on this host");
                return;
            }
        };
        let e = info(&file).unwrap_err();
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::EINVAL), "{e}");
        let e = Type1Dirty::start(file).err().unwrap();
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::EINVAL), "{e}");
    }

    #[test]
    fn a_short_bitmap_is_refused_before_the_kernel_sees_it() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let mut b = [0u64; 7];
        assert!(matches!(
            bitmap(&null, 1 << 32, 2 << 20, 4096, &mut b),
            Err(Type1Error::BitmapTooSmall { pages: 512, .. })
        ));
    }

    #[test]
    fn the_migration_capability_is_read_at_the_bindings_offsets() {
        // A migration cap as the kernel lays it out: header, flags, pad, pgsize_bitmap, max.
        let mut b = 2u16.to_ne_bytes().to_vec();
        b.extend(1u16.to_ne_bytes());
        b.extend(0u32.to_ne_bytes());
        b.extend(0u32.to_ne_bytes());
        b.extend(0u32.to_ne_bytes());
        b.extend(0x1000u64.to_ne_bytes());
        b.extend((256u64 << 20).to_ne_bytes());
        let c = caps::walk(&b, INFO, INFO as u32).unwrap();
        let m = migration(&c[0]).unwrap();
        assert_eq!(
            (m.pgsize_bitmap, m.max_dirty_bitmap_size),
            (0x1000, 256 << 20)
        );
        let short = caps::walk(&b[..24], INFO, INFO as u32).unwrap();
        assert!(matches!(
            migration(&short[0]),
            Err(CapError::Short { need: 32, .. })
        ));
    }
}
