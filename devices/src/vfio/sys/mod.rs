//! The VFIO and iommufd ioctls no crate wraps (vfio-ioctls 0.10, iommufd-ioctls 0.4 and the
//! bindings crates checked), written by hand over the bindings crates' structs:
//! `VFIO_DEVICE_GET_REGION_INFO` with its capability chain (region.rs: vfio-ioctls' region
//! accessors lose the index), `VFIO_IOMMU_GET_INFO` and `VFIO_IOMMU_DIRTY_PAGES` (type1.rs,
//! with the [`type1::Type1Dirty`] session), `IOMMU_HWPT_SET_DIRTY_TRACKING` and
//! `IOMMU_HWPT_GET_DIRTY_BITMAP` (iommufd.rs, beside the crate's HW_INFO and HWPT_ALLOC calls
//! they go with, and the [`iommufd::HwptDirty`] session over all four), `VFIO_DEVICE_FEATURE`'s
//! PROBE (feature.rs), the capability-chain walk they share (caps.rs) and the dirty bitmaps'
//! size arithmetic (bitmap.rs). Their ioctl numbers are checked against the kernel uAPI (const
//! assertions), their structs' sizes and offsets in tests. Every wrapper is tested on real fds
//! that are not VFIO fds (the kernel's ENOTTY): the machines this was written on have no VFIO.

pub mod bitmap;
pub mod caps;
pub mod feature;
pub mod iommufd;
pub mod region;
pub mod type1;

use std::error::Error;

/// `_IO(VFIO_TYPE, nr)`, for the ioctls by hand: VFIO and iommufd both use type ';' and encode
/// neither size nor direction, so the number is just type << 8 | nr
/// (include/uapi/asm-generic/ioctl.h). A const fn, unlike vmm-sys-util's `ioctl_io_nr!`, so
/// the numbers can be checked at compile time.
pub(crate) const fn io_nr(nr: u32) -> libc::c_ulong {
    ((b';' as libc::c_ulong) << 8) | nr as libc::c_ulong
}

/// The errno at the bottom of an error's chain (an `io::Error` or vmm-sys-util's errno, which
/// is what vfio-ioctls wraps), if it came from a system call.
pub fn errno_of(e: &(dyn Error + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(code) = io.raw_os_error() {
                return Some(code);
            }
        }
        if let Some(sys) = err.downcast_ref::<vmm_sys_util::errno::Error>() {
            return Some(sys.errno());
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_is_found_down_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::from_raw_os_error(libc::EBUSY));
        assert_eq!(errno_of(&e), Some(libc::EBUSY));
        let sys = vmm_sys_util::errno::Error::new(libc::ENOTTY);
        assert_eq!(errno_of(&sys), Some(libc::ENOTTY));
        #[derive(Debug, thiserror::Error)]
        #[error("no errno")]
        struct Plain;
        assert_eq!(errno_of(&Plain), None);
    }
}
