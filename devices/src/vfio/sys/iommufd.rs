//! iommufd (/dev/iommu) hardware dirty tracking: `IOMMU_GET_HW_INFO` (does the IOMMU behind the
//! device track dirtiness?), `IOMMU_HWPT_ALLOC` with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`, then
//! `IOMMU_HWPT_SET_DIRTY_TRACKING` and `IOMMU_HWPT_GET_DIRTY_BITMAP`.
//!
//! The first two, like the iommufd itself, its IOAS and `IOMMU_DESTROY`, are iommufd-ioctls'
//! (`IommuFd::get_hw_info`, `IommuFd::alloc_iommu_hwpt`) over iommufd-bindings' structs. The last
//! two are by hand: no crate has them (see below), so they are ioctls on `IommuFd::as_raw_fd()`
//! with iommufd-bindings' structs and command numbers. [`HwptDirty`] is the session over all
//! four. Never run on a real iommufd here (no /dev/iommu on this machine): the tests call them
//! on fds that are no iommufd (ENOTTY); where /dev/iommu exists, on bogus ids (ENOENT).

use iommufd_bindings::{
    iommu_hw_info, iommu_hwpt_alloc, iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE,
    iommu_hwpt_get_dirty_bitmap, iommu_hwpt_set_dirty_tracking,
    iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
    iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
    iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
    IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING, IOMMUFD_TYPE,
};
use iommufd_ioctls::{IommuFd, IommufdError};
use std::io;
use std::mem::size_of;
use std::sync::Arc;

use super::bitmap::{self, BitmapError};
use super::io_nr;

/// By hand, no crate has this: iommufd-ioctls 0.4 (wraps neither dirty-tracking ioctl),
/// iommufd-bindings 0.2 (the struct and command number only), vfio-ioctls 0.10 (none).
pub const IOMMU_HWPT_SET_DIRTY_TRACKING: libc::c_ulong = io_nr(IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING);
/// By hand, no crate has this: as [`IOMMU_HWPT_SET_DIRTY_TRACKING`].
pub const IOMMU_HWPT_GET_DIRTY_BITMAP: libc::c_ulong = io_nr(IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP);
// include/uapi/linux/iommufd.h: _IO(';', 0x8b) and _IO(';', 0x8c).
const _: () = assert!(IOMMUFD_TYPE == b';');
const _: () = assert!(IOMMU_HWPT_SET_DIRTY_TRACKING == 0x3b8b);
const _: () = assert!(IOMMU_HWPT_GET_DIRTY_BITMAP == 0x3b8c);

/// What the hand-written ioctls can fail with (the crate's calls fail with its `IommufdError`).
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("{op}: {source}")]
    Ioctl { op: &'static str, source: io::Error },
    #[error("a bitmap of {have} u64s is too small for {pages} pages")]
    BitmapTooSmall { have: usize, pages: u64 },
    #[error("{op}")]
    Iommufd {
        op: &'static str,
        #[source]
        source: IommufdError,
    },
    #[error("IOMMU_HWPT_GET_DIRTY_BITMAP: {0}")]
    Bitmap(#[from] BitmapError),
}

/// What `IOMMU_GET_HW_INFO` says of the IOMMU behind a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HwInfoOut {
    /// enum iommu_hw_info_type: 1 Intel VT-d, 2 ARM SMMUv3, 4 AMD (6.16+); 0 none.
    pub data_type: u32,
    pub capabilities: u64,
}

impl HwInfoOut {
    pub fn dirty_tracking(&self) -> bool {
        self.capabilities & iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING as u64 != 0
    }
}

/// `IOMMU_GET_HW_INFO` (iommufd-ioctls) for bound device `dev_id`, without the driver data.
pub fn hw_info(fd: &IommuFd, dev_id: u32) -> Result<HwInfoOut, IommufdError> {
    let mut arg = iommu_hw_info {
        size: std::mem::size_of::<iommu_hw_info>() as u32,
        dev_id,
        // data_len 0: the kernel copies no driver data through data_uptr (null).
        ..Default::default()
    };
    fd.get_hw_info(&mut arg)?;
    // SAFETY: both members of the union are a u32 (in_data_type, out_data_type): any value
    // read is a valid u32, and the kernel wrote out_data_type.
    let data_type = unsafe { arg.__bindgen_anon_1.out_data_type };
    Ok(HwInfoOut {
        data_type,
        capabilities: arg.out_capabilities,
    })
}

/// A paging HWPT (iommufd-ioctls' `IOMMU_HWPT_ALLOC`) for `dev_id` over IOAS `ioas`, with
/// `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`; its id. EOPNOTSUPP where the IOMMU cannot track.
pub fn alloc_dirty_hwpt(fd: &IommuFd, dev_id: u32, ioas: u32) -> Result<u32, IommufdError> {
    let mut arg = iommu_hwpt_alloc {
        size: std::mem::size_of::<iommu_hwpt_alloc>() as u32,
        flags: iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
        dev_id,
        pt_id: ioas,
        data_type: iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE,
        ..Default::default()
    };
    fd.alloc_iommu_hwpt(&mut arg)?;
    Ok(arg.out_hwpt_id)
}

fn check(op: &'static str, rc: libc::c_int) -> Result<(), DirtyError> {
    if rc < 0 {
        return Err(DirtyError::Ioctl {
            op,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// `IOMMU_HWPT_SET_DIRTY_TRACKING` on HWPT `hwpt`. By hand, no crate has this: iommufd-ioctls
/// 0.4, iommufd-bindings 0.2 (struct only), vfio-ioctls 0.10 checked.
pub fn set_dirty_tracking(fd: &IommuFd, hwpt: u32, enable: bool) -> Result<(), DirtyError> {
    let arg = iommu_hwpt_set_dirty_tracking {
        size: std::mem::size_of::<iommu_hwpt_set_dirty_tracking>() as u32,
        flags: if enable {
            iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE
        } else {
            0
        },
        hwpt_id: hwpt,
        __reserved: 0,
    };
    // SAFETY: the ioctl goes to `fd`'s own fd (`IommuFd::as_raw_fd`); `arg` is
    // IOMMU_HWPT_SET_DIRTY_TRACKING's struct, its size in `size`; it holds no pointer, the
    // kernel only reads it, it lives across the call and the result is checked.
    let rc =
        unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, IOMMU_HWPT_SET_DIRTY_TRACKING, &arg) };
    check("IOMMU_HWPT_SET_DIRTY_TRACKING", rc)
}

/// `IOMMU_HWPT_GET_DIRTY_BITMAP`: reads and clears the IOMMU's dirty bits for
/// `[iova, iova + length)` into `bitmap`, one bit per `page_size` (bit i: the page at
/// iova + i * page_size). By hand, no crate has this: as [`set_dirty_tracking`].
pub fn get_dirty_bitmap(
    fd: &IommuFd,
    hwpt: u32,
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap: &mut [u64],
) -> Result<(), DirtyError> {
    dirty_bitmap(fd, hwpt, iova, length, page_size, Clear::Yes, bitmap)
}

/// Whether GET_DIRTY_BITMAP clears what it reads. `No` (IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR)
/// is for a last read just before the range is unmapped: clearing would cost IOTLB flushes for
/// bits nobody reads again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Clear {
    Yes,
    No,
}

fn dirty_bitmap(
    fd: &IommuFd,
    hwpt: u32,
    iova: u64,
    length: u64,
    page_size: u64,
    clear: Clear,
    bitmap: &mut [u64],
) -> Result<(), DirtyError> {
    let pages = length.div_ceil(page_size.max(1));
    if (bitmap.len() as u64).saturating_mul(64) < pages {
        return Err(DirtyError::BitmapTooSmall {
            have: bitmap.len(),
            pages,
        });
    }
    // The kernel only sets bits.
    bitmap.fill(0);
    let arg = iommu_hwpt_get_dirty_bitmap {
        size: size_of::<iommu_hwpt_get_dirty_bitmap>() as u32,
        hwpt_id: hwpt,
        flags: match clear {
            Clear::Yes => 0,
            Clear::No => iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
        },
        __reserved: 0,
        iova,
        length,
        page_size,
        data: bitmap.as_mut_ptr() as u64,
    };
    // SAFETY: `arg` is IOMMU_HWPT_GET_DIRTY_BITMAP's struct, its size in `size`, read by the
    // kernel; through `data` it writes at most ceil(length / page_size) bits, which `bitmap`
    // holds (checked above) and which nothing else refers to during the call; the result is
    // checked.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(fd, IOMMU_HWPT_GET_DIRTY_BITMAP, &arg) };
    check(
        match clear {
            Clear::Yes => "IOMMU_HWPT_GET_DIRTY_BITMAP",
            Clear::No => "IOMMU_HWPT_GET_DIRTY_BITMAP(NO_CLEAR)",
        },
        rc,
    )
}

/// One HWPT allocated with dirty tracking, and the tracking on it: [`HwptDirty::alloc`], then
/// the caller attaches the device to [`HwptDirty::id`] in place of its IOAS (vfio-ioctls'
/// `VfioDevice::attach_hwpt`: attaching is the device's ioctl, not the iommufd's), then
/// [`start`](HwptDirty::start), [`report`](HwptDirty::report), [`stop`](HwptDirty::stop).
/// Dropped, it stops tracking and destroys the HWPT; the device must be attached elsewhere
/// (back to the IOAS) by then, or the kernel refuses (EBUSY) and the HWPT lives until the
/// iommufd closes.
pub struct HwptDirty {
    fd: Arc<IommuFd>,
    id: u32,
    tracking: bool,
}

impl HwptDirty {
    /// `IOMMU_GET_HW_INFO`'s `IOMMU_HW_CAP_DIRTY_TRACKING` for bound device `dev_id`: whether
    /// [`HwptDirty::alloc`] can succeed for it.
    pub fn supported(fd: &IommuFd, dev_id: u32) -> Result<bool, DirtyError> {
        hw_info(fd, dev_id)
            .map(|h| h.dirty_tracking())
            .map_err(|source| DirtyError::Iommufd {
                op: "IOMMU_GET_HW_INFO",
                source,
            })
    }

    /// `IOMMU_HWPT_ALLOC(DIRTY_TRACKING)` of a paging HWPT for `dev_id` over IOAS `ioas` (its
    /// mappings are the IOAS's). EOPNOTSUPP where the IOMMU cannot track.
    pub fn alloc(fd: Arc<IommuFd>, dev_id: u32, ioas: u32) -> Result<Self, DirtyError> {
        let id = alloc_dirty_hwpt(&fd, dev_id, ioas).map_err(|source| DirtyError::Iommufd {
            op: "IOMMU_HWPT_ALLOC(DIRTY_TRACKING)",
            source,
        })?;
        Ok(Self {
            fd,
            id,
            tracking: false,
        })
    }

    /// The HWPT's id, to attach the device to.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING(ENABLE)`: the IOMMU records writes from now on.
    pub fn start(&mut self) -> Result<(), DirtyError> {
        set_dirty_tracking(&self.fd, self.id, true)?;
        self.tracking = true;
        Ok(())
    }

    /// The dirty bits of `[iova, iova + length)`, one per `page_size` (page `n`: bit `n % 64`
    /// of word `n / 64`), cleared as they are read.
    pub fn report(&self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>, DirtyError> {
        self.read(iova, length, page_size, Clear::Yes)
    }

    /// As [`HwptDirty::report`] but leaving the bits set (NO_CLEAR): for the last read of a
    /// range about to be unmapped.
    pub fn peek(&self, iova: u64, length: u64, page_size: u64) -> Result<Vec<u64>, DirtyError> {
        self.read(iova, length, page_size, Clear::No)
    }

    fn read(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        clear: Clear,
    ) -> Result<Vec<u64>, DirtyError> {
        let words = bitmap::range_words(iova, length, page_size)?;
        let mut out = vec![0u64; words];
        dirty_bitmap(&self.fd, self.id, iova, length, page_size, clear, &mut out)?;
        Ok(out)
    }

    /// `IOMMU_HWPT_SET_DIRTY_TRACKING` without ENABLE.
    pub fn stop(&mut self) -> Result<(), DirtyError> {
        set_dirty_tracking(&self.fd, self.id, false)?;
        self.tracking = false;
        Ok(())
    }
}

impl Drop for HwptDirty {
    fn drop(&mut self) {
        if self.tracking {
            if let Err(e) = self.stop() {
                tracing::warn!("HWPT {}: dirty tracking left on: {e}", self.id);
            }
        }
        if let Err(e) = self.fd.destroy_iommu_object(self.id) {
            tracing::warn!("HWPT {}: IOMMU_DESTROY: {e}", self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    fn null() -> IommuFd {
        IommuFd::new_from_fd(File::open("/dev/null").unwrap())
    }

    fn enotty(e: &(dyn std::error::Error + 'static)) {
        assert_eq!(crate::vfio::errno_of(e), Some(libc::ENOTTY), "{e}");
    }

    #[test]
    fn the_hand_written_ioctls_on_a_file_that_is_no_iommufd_say_enotty() {
        let fd = null();
        enotty(&set_dirty_tracking(&fd, 3, true).unwrap_err());
        enotty(&set_dirty_tracking(&fd, 3, false).unwrap_err());
        let mut bitmap = [0u64; 8];
        enotty(&get_dirty_bitmap(&fd, 3, 1 << 32, 2 << 20, 4096, &mut bitmap).unwrap_err());
    }

    #[test]
    fn the_crate_calls_on_a_file_that_is_no_iommufd_say_enotty() {
        // iommufd-ioctls' own ioctls, as the probe uses them: the errno comes up its error chain.
        let fd = null();
        enotty(&hw_info(&fd, 1).unwrap_err());
        enotty(&alloc_dirty_hwpt(&fd, 1, 2).unwrap_err());
        enotty(&fd.destroy_iommu_object(2).unwrap_err());
        let e = iommufd_ioctls::IommufdIoas::new(std::sync::Arc::new(null()))
            .err()
            .unwrap();
        enotty(&e);
    }

    #[test]
    fn the_structs_are_the_uapi_s() {
        use std::mem::offset_of;
        // include/uapi/linux/iommufd.h.
        assert_eq!(size_of::<iommu_hwpt_set_dirty_tracking>(), 16);
        type G = iommu_hwpt_get_dirty_bitmap;
        assert_eq!(size_of::<G>(), 48);
        assert_eq!(
            (
                offset_of!(G, hwpt_id),
                offset_of!(G, flags),
                offset_of!(G, iova),
                offset_of!(G, length),
                offset_of!(G, page_size),
                offset_of!(G, data)
            ),
            (4, 8, 16, 24, 32, 40)
        );
        // With fault_id (6.11+); older kernels take the first 40 bytes (size says which).
        assert_eq!(size_of::<iommu_hwpt_alloc>(), 48);
        assert_eq!(offset_of!(iommu_hwpt_alloc, fault_id), 40);
        assert_eq!(offset_of!(iommu_hwpt_alloc, out_hwpt_id), 16);
        assert_eq!(size_of::<iommu_hw_info>(), 40);
        assert_eq!(offset_of!(iommu_hw_info, out_capabilities), 32);
        assert_eq!(
            iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
            1 << 1
        );
        assert_eq!(iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING, 1 << 0);
        assert_eq!(
            iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
            1
        );
        assert_eq!(
            iommufd_hwpt_get_dirty_bitmap_flags_IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR,
            1
        );
    }

    #[test]
    fn the_session_on_a_file_that_is_no_iommufd_names_each_ioctl() {
        let fd = Arc::new(null());
        let named = |e: &DirtyError, op: &str| {
            enotty(e);
            assert!(e.to_string().starts_with(op), "{e}");
        };
        named(
            &HwptDirty::supported(&fd, 1).unwrap_err(),
            "IOMMU_GET_HW_INFO",
        );
        named(
            &HwptDirty::alloc(Arc::clone(&fd), 1, 2).err().unwrap(),
            "IOMMU_HWPT_ALLOC(DIRTY_TRACKING)",
        );
        // A session as if the HWPT existed, to reach the hand-written ioctls.
        let mut h = HwptDirty {
            fd,
            id: 3,
            tracking: false,
        };
        named(&h.start().unwrap_err(), "IOMMU_HWPT_SET_DIRTY_TRACKING");
        named(
            &h.report(1 << 32, 2 << 20, 4096).unwrap_err(),
            "IOMMU_HWPT_GET_DIRTY_BITMAP:",
        );
        named(
            &h.peek(1 << 32, 2 << 20, 4096).unwrap_err(),
            "IOMMU_HWPT_GET_DIRTY_BITMAP(NO_CLEAR)",
        );
        named(&h.stop().unwrap_err(), "IOMMU_HWPT_SET_DIRTY_TRACKING");
        assert!(matches!(
            h.report(1 << 32, 2 << 20, 4095),
            Err(DirtyError::Bitmap(BitmapError::PageSize(4095)))
        ));
        assert!(matches!(
            h.report(0x800, 4096, 4096),
            Err(DirtyError::Bitmap(BitmapError::Unaligned { .. }))
        ));
        // Dropping it tries IOMMU_DESTROY, which fails here and is only logged.
    }

    /// Where /dev/iommu exists: the ioctls reach iommufd (a wrong number would be ENOTTY, a
    /// wrong size or flag EINVAL or EOPNOTSUPP) and are refused for ids that name nothing.
    #[test]
    fn a_real_iommufd_refuses_ids_that_name_nothing_with_enoent() {
        let path = "/dev/iommu";
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("skipped: cannot open {path} ({e}): no iommufd on this host");
                return;
            }
        };
        let fd = Arc::new(IommuFd::new_from_fd(file));
        const NOTHING: u32 = 0xfff0_0000;
        let errno = |e: &DirtyError| crate::vfio::errno_of(e);
        let e = set_dirty_tracking(&fd, NOTHING, true).unwrap_err();
        if errno(&e) == Some(libc::ENOTTY) {
            eprintln!("skipped: {path} predates dirty tracking (Linux < 6.7): {e}");
            return;
        }
        assert_eq!(errno(&e), Some(libc::ENOENT), "{e}");
        let mut h = HwptDirty {
            fd: Arc::clone(&fd),
            id: NOTHING,
            tracking: false,
        };
        for e in [
            h.start().unwrap_err(),
            h.report(1 << 32, 2 << 20, 4096).unwrap_err(),
            h.peek(1 << 32, 2 << 20, 4096).unwrap_err(),
            h.stop().unwrap_err(),
            HwptDirty::supported(&fd, NOTHING).unwrap_err(),
            HwptDirty::alloc(Arc::clone(&fd), NOTHING, NOTHING)
                .err()
                .unwrap(),
        ] {
            assert_eq!(errno(&e), Some(libc::ENOENT), "{e}");
        }
    }

    #[test]
    fn a_short_bitmap_is_refused_before_the_kernel_sees_it() {
        let mut bitmap = [0u64; 7];
        assert!(matches!(
            get_dirty_bitmap(&null(), 3, 0, 2 << 20, 4096, &mut bitmap),
            Err(DirtyError::BitmapTooSmall { pages: 512, .. })
        ));
    }

    #[test]
    fn dirty_tracking_is_capability_bit_0() {
        let h = HwInfoOut {
            data_type: 1,
            capabilities: 1,
        };
        assert!(h.dirty_tracking());
        assert!(!HwInfoOut {
            capabilities: 2,
            ..h
        }
        .dirty_tracking());
    }
}
