//! [`VfioTransport`] over kernel VFIO: a device opened by [`crate::vfio::open`] (its group in a
//! type1 container, or its cdev bound to an iommufd), driven through vfio-ioctls' `VfioDevice`
//! for IRQs and reset, and through the device fd for the rest: region info by hand
//! ([`crate::vfio::sys::region`]: the crate's accessors lose the index and hide errors), and
//! region reads and writes with pread/pwrite at the region's offset (the crate's log failures
//! and return nothing). DMA maps host addresses: the container's or the IOAS's.
//!
//! Needs a device bound to vfio-pci (or a sample mdev): none here, so only what runs without
//! one is tested; the rest is exercised on hardware.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, VFIO_BASE, VFIO_DEVICE_FLAGS_RESET, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vmm_sys_util::eventfd::EventFd;

use super::transport::{
    DeviceInfo, DmaRegion, IrqInfo, MmapArea, RegionFile, RegionInfo, TransportError, VfioTransport,
};
use crate::vfio::open::Opened;
use crate::vfio::sys::region;

/// `VFIO_DEVICE_GET_INFO`, by hand: vfio-ioctls keeps the flags (can it reset?) private.
pub const VFIO_DEVICE_GET_INFO: libc::c_ulong = crate::vfio::sys::io_nr(VFIO_BASE + 7);
const _: () = assert!(VFIO_DEVICE_GET_INFO == 0x3b6b);

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("duplicating the device fd (for mmap of its regions)")]
    DupFd(#[source] std::io::Error),
    #[error("VFIO_DEVICE_GET_INFO")]
    DeviceInfo(#[source] std::io::Error),
}

/// `VFIO_DEVICE_GET_INFO` on the device behind `fd`.
pub fn device_info(fd: &impl AsRawFd) -> Result<DeviceInfo, KernelError> {
    let mut info = vfio_device_info {
        argsz: std::mem::size_of::<vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: VFIO_DEVICE_GET_INFO writes at most argsz bytes into `info`, which is exactly
    // that big and lives across the call; the result is checked.
    let rc =
        unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(fd, VFIO_DEVICE_GET_INFO, &mut info) };
    if rc < 0 {
        return Err(KernelError::DeviceInfo(std::io::Error::last_os_error()));
    }
    Ok(DeviceInfo {
        regions: info.num_regions,
        irqs: info.num_irqs,
        resettable: info.flags & VFIO_DEVICE_FLAGS_RESET != 0,
    })
}

/// Where one region lies in the device fd.
#[derive(Debug, Clone, Copy)]
struct Span {
    offset: u64,
    size: u64,
}

/// A kernel VFIO device as a transport.
pub struct KernelTransport {
    opened: Opened,
    /// The device fd again, shared with the BAR pieces the VMM maps.
    file: Arc<File>,
    info: DeviceInfo,
    spans: HashMap<u32, Span>,
}

impl KernelTransport {
    pub fn new(opened: Opened) -> Result<Self, KernelError> {
        let info = device_info(&opened)?;
        // SAFETY: the fd is the open device's, valid while `opened` lives, which outlasts this
        // borrow; it is only duplicated.
        let fd = unsafe { BorrowedFd::borrow_raw(opened.as_raw_fd()) };
        let file = File::from(fd.try_clone_to_owned().map_err(KernelError::DupFd)?);
        Ok(Self {
            opened,
            file: Arc::new(file),
            info,
            spans: HashMap::new(),
        })
    }

    fn span(
        &mut self,
        op: &'static str,
        index: u32,
        offset: u64,
        len: usize,
    ) -> Result<u64, TransportError> {
        let span = match self.spans.get(&index) {
            Some(s) => *s,
            None => {
                self.region_info(index)?;
                self.spans
                    .get(&index)
                    .copied()
                    .ok_or_else(|| TransportError::region(op, index, "no such region"))?
            }
        };
        match offset.checked_add(len as u64) {
            Some(end) if end <= span.size => Ok(span.offset + offset),
            _ => Err(TransportError::region(
                op,
                index,
                std::io::Error::from_raw_os_error(libc::EINVAL),
            )),
        }
    }
}

// Migration and DMA logging: not yet (answers "unsupported").
impl super::transport::DeviceMigration for KernelTransport {}

impl VfioTransport for KernelTransport {
    fn device_info(&self) -> DeviceInfo {
        self.info
    }

    fn region_info(&mut self, index: u32) -> Result<RegionInfo, TransportError> {
        let r = region::info(&self.opened, index)
            .map_err(|e| TransportError::region("GET_REGION_INFO", index, e))?;
        self.spans.insert(
            index,
            Span {
                offset: r.offset,
                size: r.size,
            },
        );
        let mmap_areas: Vec<MmapArea> = if !r.mmap_able() {
            Vec::new()
        } else {
            match &r.sparse {
                Some(areas) => areas
                    .iter()
                    .filter(|&&(_, size)| size != 0)
                    .map(|&(offset, size)| MmapArea { offset, size })
                    .collect(),
                None => vec![MmapArea {
                    offset: 0,
                    size: r.size,
                }],
            }
        };
        let file = (!mmap_areas.is_empty()).then(|| RegionFile {
            file: Arc::clone(&self.file),
            offset: r.offset,
        });
        Ok(RegionInfo {
            index,
            size: r.size,
            readable: r.flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: r.flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap_areas,
            file,
        })
    }

    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), TransportError> {
        let at = self.span("read", index, offset, data.len())?;
        self.file
            .read_exact_at(data, at)
            .map_err(|e| TransportError::region("read", index, e))
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), TransportError> {
        let at = self.span("write", index, offset, data.len())?;
        self.file
            .write_all_at(data, at)
            .map_err(|e| TransportError::region("write", index, e))
    }

    fn irq_info(&mut self, index: u32) -> Result<IrqInfo, TransportError> {
        Ok(match self.opened.device().get_irq_info(index) {
            Some(i) => IrqInfo {
                index,
                count: i.count,
                flags: i.flags,
            },
            None => IrqInfo {
                index,
                count: 0,
                flags: 0,
            },
        })
    }

    fn enable_irqs(&mut self, index: u32, fds: &[&EventFd]) -> Result<(), TransportError> {
        self.opened
            .device()
            .enable_irq(index, fds.to_vec())
            .map_err(|e| TransportError::device("SET_IRQS (eventfds)", e))
    }

    fn disable_irqs(&mut self, index: u32) -> Result<(), TransportError> {
        self.opened
            .device()
            .disable_irq(index)
            .map_err(|e| TransportError::device("SET_IRQS (none)", e))
    }

    unsafe fn dma_map(&mut self, region: &DmaRegion<'_>) -> Result<(), TransportError> {
        let size =
            usize::try_from(region.size).map_err(|e| TransportError::device("DMA map", e))?;
        let addr = region.host_addr as *mut u8;
        // SAFETY: the caller keeps `host_addr..+size` mapped guest RAM until it is unmapped
        // (this function's contract); the ioctl pins it for the device.
        let result = unsafe {
            match &self.opened {
                Opened::Legacy { container, .. } => container.vfio_dma_map(region.iova, size, addr),
                Opened::Cdev(c) => c.iommufd.vfio_dma_map(region.iova, size, addr),
            }
        };
        result.map_err(|e| TransportError::device("DMA map", e))
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), TransportError> {
        let size = usize::try_from(size).map_err(|e| TransportError::device("DMA unmap", e))?;
        let result = match &self.opened {
            Opened::Legacy { container, .. } => container.vfio_dma_unmap(iova, size),
            Opened::Cdev(c) => c.iommufd.vfio_dma_unmap(iova, size),
        };
        result.map_err(|e| TransportError::device("DMA unmap", e))
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        self.opened.device().reset();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_info_of_a_file_that_is_no_vfio_device_says_enotty() {
        let null = File::open("/dev/null").unwrap();
        let e = device_info(&null).unwrap_err();
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::ENOTTY), "{e}");
    }

    /// On hardware: VMM_VFIO_SYSFS=/sys/bus/pci/devices/0000:01:00.0 with the device bound to
    /// vfio-pci and its group at /dev/vfio/N (run as root).
    #[test]
    fn a_bound_device_opens_as_a_transport() {
        let Some(sysfs) = std::env::var_os("VMM_VFIO_SYSFS") else {
            eprintln!("skipped: VMM_VFIO_SYSFS is not set (needs a device bound to vfio-pci)");
            return;
        };
        let sysfs = std::path::PathBuf::from(sysfs);
        let group = match std::fs::read_link(sysfs.join("iommu_group")) {
            Ok(link) => link
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u32>().ok()),
            Err(e) => {
                eprintln!("skipped: {}: no IOMMU group ({e})", sysfs.display());
                return;
            }
        };
        let Some(id) = group else {
            eprintln!("skipped: {}: unreadable IOMMU group", sysfs.display());
            return;
        };
        let access = crate::vfio::Access::Group {
            node: std::path::PathBuf::from(format!("/dev/vfio/{id}")),
            id,
        };
        let opened = crate::vfio::open::open(&sysfs, &access, std::path::Path::new("/dev"))
            .expect("open the bound device");
        let mut t = KernelTransport::new(opened).expect("transport");
        let mut ids = [0u8; 4];
        t.config_read(0, &mut ids).expect("config read");
        assert_ne!(
            u32::from_le_bytes(ids),
            u32::MAX,
            "a device answers its ids"
        );
        let config = t
            .region_info(super::super::transport::CONFIG_REGION)
            .expect("config region");
        assert!(config.size >= 256);
    }
}
