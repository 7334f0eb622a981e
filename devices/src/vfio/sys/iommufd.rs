//! iommufd (/dev/iommu) hardware dirty tracking: `IOMMU_GET_HW_INFO` (does the IOMMU behind the
//! device track dirtiness?), `IOMMU_HWPT_ALLOC` with `IOMMU_HWPT_ALLOC_DIRTY_TRACKING`, then
//! `IOMMU_HWPT_SET_DIRTY_TRACKING` and `IOMMU_HWPT_GET_DIRTY_BITMAP`.
//!
//! The first two, like the iommufd itself, its IOAS and `IOMMU_DESTROY`, are iommufd-ioctls'
//! (`IommuFd::get_hw_info`, `IommuFd::alloc_iommu_hwpt`) over iommufd-bindings' structs. The last
//! two are by hand: no crate has them (see below), so they are ioctls on `IommuFd::as_raw_fd()`
//! with iommufd-bindings' structs and command numbers. Never run on a real iommufd here (no
//! /dev/iommu on this machine): the tests call them on fds that are no iommufd (ENOTTY).

use iommufd_bindings::{
    iommu_hw_info, iommu_hwpt_alloc, iommu_hwpt_data_type_IOMMU_HWPT_DATA_NONE,
    iommu_hwpt_get_dirty_bitmap, iommu_hwpt_set_dirty_tracking,
    iommufd_hw_capabilities_IOMMU_HW_CAP_DIRTY_TRACKING,
    iommufd_hwpt_alloc_flags_IOMMU_HWPT_ALLOC_DIRTY_TRACKING,
    iommufd_hwpt_set_dirty_tracking_flags_IOMMU_HWPT_DIRTY_TRACKING_ENABLE,
    IOMMUFD_CMD_HWPT_GET_DIRTY_BITMAP, IOMMUFD_CMD_HWPT_SET_DIRTY_TRACKING, IOMMUFD_TYPE,
};
use iommufd_ioctls::{IommuFd, IommufdError};
use std::io;

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
    let pages = length.div_ceil(page_size.max(1));
    if (bitmap.len() as u64) * 64 < pages {
        return Err(DirtyError::BitmapTooSmall {
            have: bitmap.len(),
            pages,
        });
    }
    // The kernel only sets bits.
    bitmap.fill(0);
    let arg = iommu_hwpt_get_dirty_bitmap {
        size: std::mem::size_of::<iommu_hwpt_get_dirty_bitmap>() as u32,
        hwpt_id: hwpt,
        flags: 0,
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
    check("IOMMU_HWPT_GET_DIRTY_BITMAP", rc)
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
