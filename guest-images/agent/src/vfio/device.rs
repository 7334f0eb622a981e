//! One vfio-pci device opened through the legacy container in no-IOMMU mode: region reads and
//! writes (pread/pwrite on the device fd), BAR mmaps, and MSI-X eventfds.
//!
//! In no-IOMMU mode there is no DMA mapping: the device sees guest physical addresses, and a
//! DMA buffer's addresses come from /proc/self/pagemap (see `pagemap`).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::mapping::Mapping;
use super::sys::*;
use crate::pci::Bdf;

const CONTAINER: &str = "/dev/vfio/vfio";

/// A region of the device fd (a BAR, config space...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub index: u32,
    pub flags: u32,
    pub size: u64,
    /// Where the region starts in the device fd.
    pub offset: u64,
}

pub struct Device {
    pub bdf: Bdf,
    // The container and group must stay open while the device fd is used.
    _container: File,
    _group: File,
    fd: File,
}

fn open_rw(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| format!("open {}: {e}", path.display()))
}

impl Device {
    /// Container, group, no-IOMMU type, device fd: the order vfio requires.
    pub fn open(bdf: &Bdf, group: &Path) -> Result<Device, String> {
        let container = open_rw(Path::new(CONTAINER))?;
        let cfd = container.as_raw_fd();
        let version = ioctl_value(cfd, VFIO_GET_API_VERSION, 0)
            .map_err(|e| format!("VFIO_GET_API_VERSION: {e}"))?;
        if version != VFIO_API_VERSION {
            return Err(format!(
                "VFIO API version {version}, want {VFIO_API_VERSION}"
            ));
        }
        if ioctl_value(cfd, VFIO_CHECK_EXTENSION, VFIO_NOIOMMU_IOMMU).unwrap_or(0) != 1 {
            return Err("the VFIO container has no no-IOMMU type (noiommu mode off?)".into());
        }
        let group_file = open_rw(group)?;
        let gfd = group_file.as_raw_fd();
        let mut status = GroupStatus {
            argsz: size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        ioctl_ptr(gfd, VFIO_GROUP_GET_STATUS, &mut status)
            .map_err(|e| format!("VFIO_GROUP_GET_STATUS: {e}"))?;
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(format!("{} is not viable", group.display()));
        }
        let mut container_fd = cfd;
        ioctl_ptr(gfd, VFIO_GROUP_SET_CONTAINER, &mut container_fd)
            .map_err(|e| format!("VFIO_GROUP_SET_CONTAINER: {e}"))?;
        ioctl_value(cfd, VFIO_SET_IOMMU, VFIO_NOIOMMU_IOMMU)
            .map_err(|e| format!("VFIO_SET_IOMMU(no-IOMMU): {e}"))?;
        let name = CString::new(bdf.as_str()).map_err(|_| format!("bad name {bdf}"))?;
        let mut name = name.into_bytes_with_nul();
        let dfd = ioctl_ptr(gfd, VFIO_GROUP_GET_DEVICE_FD, name.as_mut_slice())
            .map_err(|e| format!("VFIO_GROUP_GET_DEVICE_FD {bdf}: {e}"))?;
        Ok(Device {
            bdf: bdf.clone(),
            _container: container,
            _group: group_file,
            // SAFETY: the ioctl returned a new descriptor that nothing else owns.
            fd: unsafe { File::from_raw_fd(dfd) },
        })
    }

    pub fn region(&self, index: u32) -> Result<Region, String> {
        let mut info = RegionInfo {
            argsz: size_of::<RegionInfo>() as u32,
            index,
            ..RegionInfo::default()
        };
        ioctl_ptr(self.fd.as_raw_fd(), VFIO_DEVICE_GET_REGION_INFO, &mut info)
            .map_err(|e| format!("VFIO_DEVICE_GET_REGION_INFO {index}: {e}"))?;
        Ok(Region {
            index,
            flags: info.flags,
            size: info.size,
            offset: info.offset,
        })
    }

    /// Where `len` bytes at `at` in `region` are in the device fd, if inside it.
    fn place(region: &Region, at: u64, len: usize) -> Result<u64, String> {
        match at.checked_add(len as u64) {
            Some(end) if end <= region.size => Ok(region.offset + at),
            _ => Err(format!(
                "{len} bytes at {at:#x} beyond region {} ({:#x} bytes)",
                region.index, region.size
            )),
        }
    }

    /// Reads `buf.len()` bytes at `at` in `region` (vfio-pci splits it into aligned accesses
    /// of up to 4 bytes).
    pub fn read(&self, region: &Region, at: u64, buf: &mut [u8]) -> Result<(), String> {
        let pos = Self::place(region, at, buf.len())?;
        self.fd
            .read_exact_at(buf, pos)
            .map_err(|e| format!("read region {} at {at:#x}: {e}", region.index))
    }

    pub fn write(&self, region: &Region, at: u64, buf: &[u8]) -> Result<(), String> {
        let pos = Self::place(region, at, buf.len())?;
        self.fd
            .write_all_at(buf, pos)
            .map_err(|e| format!("write region {} at {at:#x}: {e}", region.index))
    }

    pub fn read32(&self, region: &Region, at: u64) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.read(region, at, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    pub fn write32(&self, region: &Region, at: u64, value: u32) -> Result<(), String> {
        self.write(region, at, &value.to_le_bytes())
    }

    /// Maps `len` bytes at `at` of an mmap-able region (page-aligned underneath).
    pub fn map(&self, region: &Region, at: u64, len: usize) -> Result<Mapping, String> {
        if region.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(format!("region {} cannot be mmapped", region.index));
        }
        let pos = Self::place(region, at, len)?;
        Mapping::new(&self.fd, pos, len).map_err(|e| format!("mmap region {}: {e}", region.index))
    }

    pub fn irq_count(&self, index: u32) -> Result<u32, String> {
        let mut info = IrqInfo {
            argsz: size_of::<IrqInfo>() as u32,
            index,
            ..IrqInfo::default()
        };
        ioctl_ptr(self.fd.as_raw_fd(), VFIO_DEVICE_GET_IRQ_INFO, &mut info)
            .map_err(|e| format!("VFIO_DEVICE_GET_IRQ_INFO {index}: {e}"))?;
        Ok(info.count)
    }

    /// Enables vectors 0..fds.len() of IRQ `index`, each signalling its eventfd.
    pub fn set_eventfds(&self, index: u32, fds: &[std::os::fd::RawFd]) -> Result<(), String> {
        let mut set = irq_set_eventfds(index, 0, fds);
        ioctl_ptr(
            self.fd.as_raw_fd(),
            VFIO_DEVICE_SET_IRQS,
            set.as_mut_slice(),
        )
        .map(drop)
        .map_err(|e| format!("VFIO_DEVICE_SET_IRQS {index} ({} eventfds): {e}", fds.len()))
    }

    /// Signals vector `vector` of IRQ `index` from the kernel side (a loopback test).
    pub fn trigger_irq(&self, index: u32, vector: u32) -> Result<(), String> {
        let mut set = irq_set_trigger(index, vector);
        ioctl_ptr(
            self.fd.as_raw_fd(),
            VFIO_DEVICE_SET_IRQS,
            set.as_mut_slice(),
        )
        .map(drop)
        .map_err(|e| format!("VFIO_DEVICE_SET_IRQS {index} trigger {vector}: {e}"))
    }

    pub fn disable_irqs(&self, index: u32) -> Result<(), String> {
        let mut set = irq_set_disable(index);
        ioctl_ptr(
            self.fd.as_raw_fd(),
            VFIO_DEVICE_SET_IRQS,
            set.as_mut_slice(),
        )
        .map(drop)
        .map_err(|e| format!("VFIO_DEVICE_SET_IRQS {index} off: {e}"))
    }

    /// Sets memory space and bus master in the command register: the device may then DMA.
    pub fn enable_bus_master(&self) -> Result<(), String> {
        let config = self.region(VFIO_PCI_CONFIG_REGION_INDEX)?;
        let mut cmd = [0u8; 2];
        self.read(&config, PCI_COMMAND, &mut cmd)?;
        let value = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        self.write(&config, PCI_COMMAND, &value.to_le_bytes())
    }
}

const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
