//! The VFIO ioctls the agent needs, written by hand from linux/vfio.h. The agent is a static
//! binary with libc as its only system dependency, and rust-vmm's `vfio-ioctls` has no
//! no-IOMMU container type (VFIO_NOIOMMU_IOMMU): the guest has no IOMMU, so that is the only
//! container it can open.

use std::io;
use std::os::fd::RawFd;

/// `VFIO_TYPE` (`';'`) and `VFIO_BASE`: every VFIO ioctl is `_IO(VFIO_TYPE, VFIO_BASE + n)`
/// (no size or direction bits, despite what the comments in vfio.h say).
const VFIO_TYPE: libc::Ioctl = b';' as libc::Ioctl;
const VFIO_BASE: libc::Ioctl = 100;

const fn vfio_io(n: libc::Ioctl) -> libc::Ioctl {
    (VFIO_TYPE << 8) | (VFIO_BASE + n)
}

pub const VFIO_GET_API_VERSION: libc::Ioctl = vfio_io(0);
pub const VFIO_CHECK_EXTENSION: libc::Ioctl = vfio_io(1);
pub const VFIO_SET_IOMMU: libc::Ioctl = vfio_io(2);
pub const VFIO_GROUP_GET_STATUS: libc::Ioctl = vfio_io(3);
pub const VFIO_GROUP_SET_CONTAINER: libc::Ioctl = vfio_io(4);
pub const VFIO_GROUP_GET_DEVICE_FD: libc::Ioctl = vfio_io(6);
pub const VFIO_DEVICE_GET_REGION_INFO: libc::Ioctl = vfio_io(8);
pub const VFIO_DEVICE_GET_IRQ_INFO: libc::Ioctl = vfio_io(9);
pub const VFIO_DEVICE_SET_IRQS: libc::Ioctl = vfio_io(10);

pub const VFIO_API_VERSION: i32 = 0;
pub const VFIO_NOIOMMU_IOMMU: libc::c_ulong = 8;

pub const VFIO_GROUP_FLAGS_VIABLE: u32 = 1 << 0;

pub const VFIO_REGION_INFO_FLAG_MMAP: u32 = 1 << 2;

pub const VFIO_IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub const VFIO_IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub const VFIO_IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;

/// Region indexes of a vfio-pci device.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;
/// IRQ index of MSI-X.
pub const VFIO_PCI_MSIX_IRQ_INDEX: u32 = 2;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct GroupStatus {
    pub argsz: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

/// `struct vfio_irq_set` is followed by its data (one `s32` eventfd per vector here): built as
/// 32-bit words so that the header and the fds are aligned.
pub fn irq_set_eventfds(index: u32, start: u32, fds: &[RawFd]) -> Vec<u32> {
    let count = u32::try_from(fds.len()).unwrap_or(u32::MAX);
    let argsz = 20u32.saturating_add(count.saturating_mul(4));
    let mut words = vec![
        argsz,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        index,
        start,
        count,
    ];
    // The kernel reads them as s32: the same bits.
    words.extend(fds.iter().map(|&fd| fd as u32));
    words
}

/// `vfio_irq_set` with no data and count 0: disables every vector of `index`.
pub fn irq_set_disable(index: u32) -> Vec<u32> {
    vec![
        20,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        index,
        0,
        0,
    ]
}

/// `vfio_irq_set` with no data, count 1: the kernel signals vector `start`'s eventfd itself.
pub fn irq_set_trigger(index: u32, start: u32) -> Vec<u32> {
    vec![
        20,
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        index,
        start,
        1,
    ]
}

/// An ioctl whose argument is a plain integer.
pub fn ioctl_value(fd: RawFd, request: libc::Ioctl, arg: libc::c_ulong) -> io::Result<i32> {
    // SAFETY: the VFIO ioctls called this way take their argument by value and touch no
    // memory of ours; a bad fd or request only makes the call fail.
    let ret = unsafe { libc::ioctl(fd, request, arg) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// An ioctl whose argument points at `arg`, which the kernel may read and write within the
/// `argsz` the caller set (never beyond `size_of_val(arg)`).
pub fn ioctl_ptr<T: ?Sized>(fd: RawFd, request: libc::Ioctl, arg: &mut T) -> io::Result<i32> {
    // SAFETY: `arg` is a live, exclusively borrowed buffer; every caller sets its argsz to at
    // most its size, so the kernel stays inside it.
    let ret = unsafe { libc::ioctl(fd, request, (arg as *mut T).cast::<libc::c_void>()) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_vfio_h() {
        // _IO(';', 100 + n) = 0x3b00 | (100 + n).
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_SET_IOMMU, 0x3b66);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3b68);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3b6e);
        assert_eq!(std::mem::size_of::<RegionInfo>(), 32);
        assert_eq!(std::mem::size_of::<IrqInfo>(), 16);
    }

    #[test]
    fn irq_sets_carry_their_eventfds() {
        assert_eq!(
            irq_set_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, 0, &[5, 6]),
            [28, 0x24, 2, 0, 2, 5, 6]
        );
        assert_eq!(irq_set_disable(2), [20, 0x21, 2, 0, 0]);
        assert_eq!(irq_set_trigger(2, 3), [20, 0x21, 2, 3, 1]);
    }
}
