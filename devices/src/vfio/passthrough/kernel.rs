//! [`VfioTransport`] over kernel VFIO: a device opened by [`crate::vfio::open`] (its group in a
//! type1 container, or its cdev bound to an iommufd), driven through vfio-ioctls' `VfioDevice`
//! for IRQs and reset, and through the device fd for the rest: region info by hand
//! ([`crate::vfio::sys::region`]: the crate's accessors lose the index and hide errors), and
//! region reads and writes with pread/pwrite at the region's offset (the crate's log failures
//! and return nothing). DMA maps host addresses: the container's or the IOAS's.
//!
//! Migration and DMA logging ([`DeviceMigration`]) are vfio-ioctls' (`VfioDevice`'s migration
//! v2 and DMA-logging calls, which also keep the data fd the kernel hands back for STOP_COPY,
//! PRE_COPY and RESUMING), except the DMA-logging probe ([`crate::vfio::sys::feature`]: the
//! crate has none). What the crate leaves to its caller is done here: reads that fill the
//! buffer across short reads and PRE_COPY's ENOMSG, "absent" told apart from "failed", and
//! report sizes bounded before the crate allocates.
//!
//! Needs a device bound to vfio-pci (or a sample mdev): none here, so only what runs without
//! one is tested; the rest is exercised on hardware.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, VFIO_BASE, VFIO_DEVICE_FEATURE_DMA_LOGGING_START, VFIO_DEVICE_FLAGS_RESET,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{DmaLoggingRange, VfioContainer, VfioError};
use vmm_sys_util::eventfd::EventFd;

use super::transport::{
    DeviceInfo, DeviceMigration, DmaRegion, IrqInfo, MigState, MigrationCaps, MmapArea,
    PrecopyInfo, RegionFile, RegionInfo, TransportError, VfioTransport,
};
use crate::vfio::open::Opened;
use crate::vfio::sys::bitmap::{self, BitmapError};
use crate::vfio::sys::feature::{self, Direction};
use crate::vfio::sys::iommufd::HwptDirty;
use crate::vfio::sys::region;
use crate::vfio::sys::type1::Type1Dirty;

/// `VFIO_DEVICE_GET_INFO`, by hand: vfio-ioctls keeps the flags (can it reset?) private.
pub const VFIO_DEVICE_GET_INFO: libc::c_ulong = crate::vfio::sys::io_nr(VFIO_BASE + 7);
const _: () = assert!(VFIO_DEVICE_GET_INFO == 0x3b6b);
/// `VFIO_DEVICE_RESET`, by hand: vfio-ioctls' `reset()` returns nothing, and skips the ioctl
/// when the device info lacks VFIO_DEVICE_FLAGS_RESET, which some drivers that do reset never
/// set (the mtty sample handles the ioctl but leaves the flag clear).
pub const VFIO_DEVICE_RESET: libc::c_ulong = crate::vfio::sys::io_nr(VFIO_BASE + 11);
const _: () = assert!(VFIO_DEVICE_RESET == 0x3b6f);

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("duplicating the device fd (for mmap of its regions)")]
    DupFd(#[source] std::io::Error),
    #[error("VFIO_DEVICE_GET_INFO")]
    DeviceInfo(#[source] std::io::Error),
    #[error("to {state:?}")]
    SetMigState {
        state: MigState,
        #[source]
        source: VfioError,
    },
    #[error("the device reports migration state {0}, which linux/vfio.h does not define")]
    UnknownMigState(u32),
    #[error("VFIO_DEVICE_RESET")]
    Reset(#[source] std::io::Error),
}

/// `VFIO_DEVICE_RESET` on the device behind `fd`; the kernel's refusal is returned (EINVAL or
/// ENOTTY from a device that cannot reset), not hidden.
pub fn device_reset(fd: &impl AsRawFd) -> Result<(), KernelError> {
    // SAFETY: VFIO_DEVICE_RESET takes no argument and touches no memory of this process.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl(fd, VFIO_DEVICE_RESET) };
    if rc < 0 {
        return Err(KernelError::Reset(std::io::Error::last_os_error()));
    }
    Ok(())
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
    /// IOMMU dirty tracking, while a migration runs it.
    iommu_dirty: Option<IommuDirty>,
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
            iommu_dirty: None,
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

/// Whether a device-feature call failed because the device has no such feature: the kernel
/// answers ENOTTY for a feature the device's driver does not know (vfio-pci-core's default) or
/// a device without migration ops, rather than an error of the call itself.
fn feature_absent(e: &VfioError) -> bool {
    crate::vfio::errno_of(e) == Some(libc::ENOTTY)
}

fn mig_state(raw: u32) -> Result<MigState, KernelError> {
    MigState::from_raw(raw).ok_or(KernelError::UnknownMigState(raw))
}

/// Fills `buf` from the migration data fd until it is full or the fd has nothing more: a read
/// of 0 (the end of STOP_COPY's stream) or ENOMSG (PRE_COPY's "nothing more for now", per
/// linux/vfio.h). One read may return less while more follows, and the trait promises that a
/// short count means no more.
fn fill(
    buf: &mut [u8],
    mut read: impl FnMut(&mut [u8]) -> Result<usize, VfioError>,
) -> Result<usize, VfioError> {
    let mut done = 0;
    while done < buf.len() {
        match read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n.min(buf.len() - done),
            Err(VfioError::VfioMigrationDataIo(e))
                if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(VfioError::VfioMigrationDataIo(e)) if e.raw_os_error() == Some(libc::ENOMSG) => {
                break
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl DeviceMigration for KernelTransport {
    fn migration_caps(&mut self) -> Result<Option<MigrationCaps>, TransportError> {
        // The crate answers None itself for ENOTTY and EINVAL (no migration v2).
        let flags = self
            .opened
            .device()
            .query_migration_support()
            .map_err(|e| TransportError::device("VFIO_DEVICE_FEATURE_MIGRATION (get)", e))?;
        Ok(flags.map(MigrationCaps::from_flags))
    }

    fn set_migration_state(&mut self, state: MigState) -> Result<(), TransportError> {
        self.opened
            .device()
            .set_migration_state(state as u32)
            .map_err(|source| {
                TransportError::device(
                    "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE (set)",
                    KernelError::SetMigState { state, source },
                )
            })
    }

    fn migration_state(&mut self) -> Result<MigState, TransportError> {
        let op = "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE (get)";
        let raw = self
            .opened
            .device()
            .get_migration_state()
            .map_err(|e| TransportError::device(op, e))?;
        mig_state(raw).map_err(|e| TransportError::device(op, e))
    }

    fn migration_read(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        let device = self.opened.device();
        fill(buf, |b| device.read_migration_data(b))
            .map_err(|e| TransportError::device("reading the migration data fd", e))
    }

    fn migration_write(&mut self, data: &[u8]) -> Result<(), TransportError> {
        self.opened
            .device()
            .write_migration_data(data)
            .map_err(|e| TransportError::device("writing the migration data fd", e))
    }

    fn migration_data_size(&mut self) -> Result<Option<u64>, TransportError> {
        match self.opened.device().get_mig_data_size() {
            Ok(size) => Ok(Some(size)),
            Err(e) if feature_absent(&e) => Ok(None),
            Err(e) => Err(TransportError::device(
                "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE (get)",
                e,
            )),
        }
    }

    fn precopy_info(&mut self) -> Result<Option<PrecopyInfo>, TransportError> {
        match self.opened.device().mig_get_precopy_info() {
            Ok(i) => Ok(Some(PrecopyInfo {
                initial_bytes: i.initial_bytes,
                dirty_bytes: i.dirty_bytes,
            })),
            // A data fd without the ioctl: a driver without PRE_COPY.
            Err(e) if feature_absent(&e) => Ok(None),
            // Includes NoMigrationDataFd: the device is not in PRE_COPY.
            Err(e) => Err(TransportError::device("VFIO_MIG_GET_PRECOPY_INFO", e)),
        }
    }

    fn dma_logging_supported(&mut self) -> Result<bool, TransportError> {
        feature::supported(
            &self.opened,
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            Direction::Set,
        )
        .map_err(|e| TransportError::device("probing DMA logging", e))
    }

    fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<u64, TransportError> {
        let ranges: Vec<DmaLoggingRange> = ranges
            .iter()
            .map(|&(iova, length)| DmaLoggingRange { iova, length })
            .collect();
        self.opened
            .device()
            .start_dma_logging(page_size, &ranges)
            .map_err(|e| TransportError::device("VFIO_DEVICE_FEATURE_DMA_LOGGING_START", e))
    }

    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u64>, TransportError> {
        let op = "VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT";
        // The crate allocates length / page_size bits unchecked: bound it first. The crate's
        // bitmap is the kernel's (page n at bit n % 64 of word n / 64), the trait's layout.
        bitmap::words(length, page_size).map_err(|e| TransportError::device(op, e))?;
        if iova.checked_add(length).is_none() {
            return Err(TransportError::device(
                op,
                BitmapError::Overflow { iova, length },
            ));
        }
        self.opened
            .device()
            .report_dma_logging(DmaLoggingRange { iova, length }, page_size)
            .map_err(|e| TransportError::device(op, e))
    }

    fn dma_logging_stop(&mut self) -> Result<(), TransportError> {
        self.opened
            .device()
            .stop_dma_logging()
            .map_err(|e| TransportError::device("VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP", e))
    }

    fn iommu_dirty(&mut self) -> Result<Option<&'static str>, TransportError> {
        match &self.opened {
            Opened::Legacy { container, .. } => {
                let cap = Type1Dirty::capability(container)
                    .map_err(|e| TransportError::device("VFIO_IOMMU_GET_INFO", e))?;
                // The dirty set is 4 KiB pages: a container tracking coarser pages would need
                // its bits spread, which no x86 type1 does.
                Ok(cap
                    .filter(|m| m.page_size() == Some(IOMMU_PAGE))
                    .map(|_| "type1 dirty pages (VFIO_IOMMU_DIRTY_PAGES)"))
            }
            Opened::Cdev(c) => HwptDirty::supported(c.fd(), c.dev_id)
                .map(|yes| yes.then_some("iommufd HWPT dirty tracking"))
                .map_err(|e| TransportError::device("IOMMU_GET_HW_INFO", e)),
        }
    }

    fn iommu_dirty_start(&mut self) -> Result<(), TransportError> {
        if self.iommu_dirty.is_some() {
            return Err(TransportError::device(
                "starting IOMMU dirty tracking",
                "already started",
            ));
        }
        let tracking = match &self.opened {
            Opened::Legacy { container, .. } => IommuDirty::Type1(
                Type1Dirty::start(container.clone())
                    .map_err(|e| TransportError::device("VFIO_IOMMU_DIRTY_PAGES(START)", e))?,
            ),
            Opened::Cdev(c) => {
                let fd = c.iommufd.iommufd().clone();
                let mut hwpt = HwptDirty::alloc(fd, c.dev_id, c.ioas())
                    .map_err(|e| TransportError::device("IOMMU_HWPT_ALLOC(DIRTY_TRACKING)", e))?;
                // The device's DMA goes through the new HWPT (same IOAS mappings) from here.
                c.device.attach_hwpt(hwpt.id()).map_err(|e| {
                    TransportError::device("attaching to the dirty-tracking HWPT", e)
                })?;
                if let Err(e) = hwpt.start() {
                    let _ = c.device.attach_hwpt(c.ioas());
                    return Err(TransportError::device(
                        "IOMMU_HWPT_SET_DIRTY_TRACKING(ENABLE)",
                        e,
                    ));
                }
                IommuDirty::Hwpt(hwpt)
            }
        };
        self.iommu_dirty = Some(tracking);
        Ok(())
    }

    fn iommu_dirty_report(&mut self, iova: u64, length: u64) -> Result<Vec<u64>, TransportError> {
        match &self.iommu_dirty {
            Some(IommuDirty::Type1(t)) => t
                .report(iova, length, IOMMU_PAGE)
                .map_err(|e| TransportError::device("VFIO_IOMMU_DIRTY_PAGES(GET_BITMAP)", e)),
            Some(IommuDirty::Hwpt(h)) => h
                .report(iova, length, IOMMU_PAGE)
                .map_err(|e| TransportError::device("IOMMU_HWPT_GET_DIRTY_BITMAP", e)),
            None => Err(TransportError::device(
                "reading IOMMU dirty bits",
                "tracking is not started",
            )),
        }
    }

    fn iommu_dirty_stop(&mut self) -> Result<(), TransportError> {
        match self.iommu_dirty.take() {
            Some(IommuDirty::Type1(t)) => t
                .stop()
                .map_err(|e| TransportError::device("VFIO_IOMMU_DIRTY_PAGES(STOP)", e)),
            Some(IommuDirty::Hwpt(mut h)) => {
                let stopped = h.stop();
                // Back onto the IOAS before the HWPT is destroyed (the kernel refuses to
                // destroy one a device is attached to).
                if let Opened::Cdev(c) = &self.opened {
                    c.device
                        .attach_hwpt(c.ioas())
                        .map_err(|e| TransportError::device("re-attaching to the IOAS", e))?;
                }
                drop(h);
                stopped.map_err(|e| {
                    TransportError::device("IOMMU_HWPT_SET_DIRTY_TRACKING(DISABLE)", e)
                })
            }
            None => Ok(()),
        }
    }
}

/// IOMMU dirty tracking in progress: type1's on the container, or iommufd's on a HWPT the
/// device was moved to.
enum IommuDirty {
    Type1(Type1Dirty<Arc<VfioContainer>>),
    Hwpt(HwptDirty),
}

/// The granule the IOMMU dirty bits are asked at: the dirty set's.
const IOMMU_PAGE: u64 = 4096;

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
        match device_reset(&self.opened) {
            Ok(()) => Ok(()),
            // A device that does not claim to reset and refuses: nothing was there to reset
            // (as before for such devices); one that claims it and fails is an error.
            Err(_) if !self.info.resettable => Ok(()),
            Err(e) => Err(TransportError::device("reset", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_reaches_the_kernel_and_returns_its_errno() {
        // /dev/null is no VFIO device: the ioctl itself must be made (not skipped for want of
        // a flag, as vfio-ioctls does) and its ENOTTY come back.
        let null = File::open("/dev/null").unwrap();
        let e = device_reset(&null).unwrap_err();
        assert!(matches!(e, KernelError::Reset(_)), "{e}");
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::ENOTTY), "{e}");
    }

    #[test]
    fn device_info_of_a_file_that_is_no_vfio_device_says_enotty() {
        let null = File::open("/dev/null").unwrap();
        let e = device_info(&null).unwrap_err();
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::ENOTTY), "{e}");
    }

    fn io_err(errno: i32) -> VfioError {
        VfioError::VfioMigrationDataIo(std::io::Error::from_raw_os_error(errno))
    }

    #[test]
    fn a_read_fills_the_buffer_across_short_reads_and_interrupts() {
        // The device has 10 bytes, handed out 3 at a time, with an EINTR in between.
        let mut left = 10usize;
        let mut calls = 0;
        let mut buf = [0u8; 8];
        let n = fill(&mut buf, |b| {
            calls += 1;
            if calls == 2 {
                return Err(io_err(libc::EINTR));
            }
            let n = b.len().min(3).min(left);
            b[..n].fill(0xab);
            left -= n;
            Ok(n)
        })
        .unwrap();
        assert_eq!(n, 8);
        assert_eq!(buf, [0xab; 8]);
        // Then the last 2 bytes and the end of the stream: a short count.
        let n = fill(&mut buf, |b| {
            let n = b.len().min(left);
            left -= n;
            Ok(n)
        })
        .unwrap();
        assert_eq!(n, 2);
    }

    #[test]
    fn enomsg_is_pre_copy_s_nothing_more_for_now_not_an_error() {
        let mut first = true;
        let mut buf = [0u8; 16];
        let n = fill(&mut buf, |b| {
            if std::mem::take(&mut first) {
                b[..5].fill(1);
                Ok(5)
            } else {
                Err(io_err(libc::ENOMSG))
            }
        })
        .unwrap();
        assert_eq!(n, 5);
        assert_eq!(fill(&mut buf, |_| Err(io_err(libc::ENOMSG))).unwrap(), 0);
        let e = fill(&mut buf, |_| Err(io_err(libc::EIO))).unwrap_err();
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::EIO));
        assert!(matches!(
            fill(&mut buf, |_| Err(VfioError::NoMigrationDataFd)),
            Err(VfioError::NoMigrationDataFd)
        ));
        assert_eq!(fill(&mut [], |_| unreachable!()).unwrap(), 0);
    }

    #[test]
    fn only_enotty_means_the_feature_is_absent() {
        let feature = |errno| VfioError::VfioDeviceFeature(vmm_sys_util::errno::Error::new(errno));
        assert!(feature_absent(&feature(libc::ENOTTY)));
        assert!(!feature_absent(&feature(libc::EIO)));
        assert!(!feature_absent(&VfioError::NoMigrationDataFd));
        assert!(feature_absent(&VfioError::VfioMigGetPrecopyInfo(
            vmm_sys_util::errno::Error::new(libc::ENOTTY)
        )));
    }

    #[test]
    fn every_uapi_state_maps_and_others_are_errors() {
        for raw in 0..8 {
            assert_eq!(mig_state(raw).unwrap() as u32, raw);
        }
        assert!(matches!(mig_state(8), Err(KernelError::UnknownMigState(8))));
    }

    /// The bound device of VMM_VFIO_SYSFS, opened through its group; `None` (with the reason
    /// printed) when there is none.
    fn bound_transport() -> Option<KernelTransport> {
        let Some(sysfs) = std::env::var_os("VMM_VFIO_SYSFS") else {
            eprintln!("skipped: VMM_VFIO_SYSFS is not set (needs a device bound to vfio-pci)");
            return None;
        };
        let sysfs = std::path::PathBuf::from(sysfs);
        let group = match std::fs::read_link(sysfs.join("iommu_group")) {
            Ok(link) => link
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.parse::<u32>().ok()),
            Err(e) => {
                eprintln!("skipped: {}: no IOMMU group ({e})", sysfs.display());
                return None;
            }
        };
        let Some(id) = group else {
            eprintln!("skipped: {}: unreadable IOMMU group", sysfs.display());
            return None;
        };
        let access = crate::vfio::Access::Group {
            node: std::path::PathBuf::from(format!("/dev/vfio/{id}")),
            id,
        };
        let opened = crate::vfio::open::open(&sysfs, &access, std::path::Path::new("/dev"))
            .expect("open the bound device");
        Some(KernelTransport::new(opened).expect("transport"))
    }

    /// On hardware (as `a_bound_device_opens_as_a_transport`): only questions, the device's
    /// state is not changed. A plain vfio-pci device answers no migration and no DMA logging;
    /// a variant driver (mlx5, pds, hisi_acc, mtty) answers its capabilities and RUNNING.
    #[test]
    fn a_bound_device_answers_the_migration_questions() {
        let Some(mut t) = bound_transport() else {
            return;
        };
        let caps = t.migration_caps().expect("migration caps");
        let logging = t.dma_logging_supported().expect("DMA logging probe");
        eprintln!("migration: {caps:?}; DMA logging: {logging}");
        if caps.is_some() {
            assert_eq!(t.migration_state().expect("state"), MigState::Running);
            eprintln!("stop-copy size: {:?}", t.migration_data_size());
        }
        if !logging {
            assert!(t.dma_logging_report(0, 1 << 20, 4096).is_err());
        }
    }

    /// On hardware: VMM_VFIO_SYSFS=/sys/bus/pci/devices/0000:01:00.0 with the device bound to
    /// vfio-pci and its group at /dev/vfio/N (run as root).
    #[test]
    fn a_bound_device_opens_as_a_transport() {
        let Some(mut t) = bound_transport() else {
            return;
        };
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
