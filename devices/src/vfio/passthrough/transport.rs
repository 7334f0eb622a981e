//! The host side of one passed-through PCI function, whoever serves it: the kernel (vfio-pci
//! through vfio-ioctls, `kernel.rs`), another process (vfio-user, `user.rs`) or a test
//! (`mock.rs`). Cloud Hypervisor's split (`pci/src/vfio.rs`): everything the guest sees is
//! built once, in `device.rs`, over this trait.
//!
//! Indexes are vfio-pci's: regions 0..=5 the BARs, 6 the ROM, 7 config space; IRQ indexes
//! INTx 0, MSI 1, MSI-X 2.

use std::fs::File;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use vfio_bindings::bindings::vfio::{
    VFIO_PCI_CONFIG_REGION_INDEX as CONFIG_REGION, VFIO_PCI_MSIX_IRQ_INDEX as MSIX_IRQ,
    VFIO_PCI_MSI_IRQ_INDEX as MSI_IRQ, VFIO_PCI_ROM_REGION_INDEX as ROM_REGION,
};

/// A transport's failure, with what it was doing and the cause kept whole.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{op} on region {index}")]
    Region {
        op: &'static str,
        index: u32,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{op}")]
    Device {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{op} is not supported by this transport: {why}")]
    Unsupported { op: &'static str, why: &'static str },
}

impl TransportError {
    pub fn region(
        op: &'static str,
        index: u32,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Region {
            op,
            index,
            source: source.into(),
        }
    }

    pub fn device(
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Device {
            op,
            source: source.into(),
        }
    }
}

/// What VFIO_DEVICE_GET_INFO says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    pub regions: u32,
    pub irqs: u32,
    /// VFIO_DEVICE_FLAGS_RESET: the device can be reset.
    pub resettable: bool,
}

/// An area of a region that may be mmap'd: offset within the region and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmapArea {
    pub offset: u64,
    pub size: u64,
}

/// The file a region's memory is mmap'd from, and where the region starts in it (the device
/// fd at the region's offset for kernel VFIO; the server's memfd for vfio-user).
#[derive(Debug, Clone)]
pub struct RegionFile {
    pub file: Arc<File>,
    pub offset: u64,
}

/// One region as the transport describes it.
#[derive(Debug, Clone)]
pub struct RegionInfo {
    pub index: u32,
    pub size: u64,
    pub readable: bool,
    pub writable: bool,
    /// The areas that may be mmap'd (the sparse-mmap capability, or the whole region when it
    /// is mmappable without one); empty when nothing may be.
    pub mmap_areas: Vec<MmapArea>,
    /// What to mmap the areas from; `None` when nothing may be mmap'd.
    pub file: Option<RegionFile>,
}

impl RegionInfo {
    /// A region the device does not implement (size 0).
    pub fn absent(index: u32) -> Self {
        Self {
            index,
            size: 0,
            readable: false,
            writable: false,
            mmap_areas: Vec::new(),
            file: None,
        }
    }
}

/// What VFIO_DEVICE_GET_IRQ_INFO says about one IRQ index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqInfo {
    pub index: u32,
    pub count: u32,
    pub flags: u32,
}

/// Guest RAM to make reachable by the device's DMA at `iova` (= its guest physical address).
#[derive(Debug, Clone, Copy)]
pub struct DmaRegion<'a> {
    pub iova: u64,
    pub size: u64,
    /// Where the VMM maps it (kernel VFIO pins these pages).
    pub host_addr: usize,
    /// The file behind it and the offset of `iova` in it (vfio-user sends the fd).
    pub file: Option<(&'a File, u64)>,
}

/// The host side of one function. Every method may fail; none may panic on what the device
/// answers. Migration and DMA logging are [`DeviceMigration`]'s.
pub trait VfioTransport: DeviceMigration + Send {
    fn device_info(&self) -> DeviceInfo;
    fn region_info(&mut self, index: u32) -> Result<RegionInfo, TransportError>;
    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), TransportError>;
    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), TransportError>;

    fn config_read(&mut self, offset: u64, data: &mut [u8]) -> Result<(), TransportError> {
        self.region_read(CONFIG_REGION, offset, data)
    }
    fn config_write(&mut self, offset: u64, data: &[u8]) -> Result<(), TransportError> {
        self.region_write(CONFIG_REGION, offset, data)
    }

    fn irq_info(&mut self, index: u32) -> Result<IrqInfo, TransportError>;
    /// VFIO_DEVICE_SET_IRQS, ACTION_TRIGGER | DATA_EVENTFD: vectors `0..fds.len()` of IRQ
    /// `index` signal these eventfds.
    fn enable_irqs(&mut self, index: u32, fds: &[&EventFd]) -> Result<(), TransportError>;
    /// VFIO_DEVICE_SET_IRQS, ACTION_TRIGGER | DATA_NONE, count 0: IRQ `index` signals nothing.
    fn disable_irqs(&mut self, index: u32) -> Result<(), TransportError>;

    /// Makes `region` reachable by the device's DMA at `region.iova`.
    ///
    /// # Safety
    /// `region.host_addr..+size` (and the file range) must be guest RAM that stays mapped until
    /// [`Self::dma_unmap`] of the same range: the device may write it at any time.
    unsafe fn dma_map(&mut self, region: &DmaRegion<'_>) -> Result<(), TransportError>;
    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), TransportError>;

    fn reset(&mut self) -> Result<(), TransportError>;
}

/// VFIO migration v2 device states (`enum vfio_device_mig_state` in linux/vfio.h; vfio-user's
/// MIG_DEVICE_STATE feature uses the same numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u32)]
pub enum MigState {
    Error = 0,
    Stop = 1,
    Running = 2,
    StopCopy = 3,
    Resuming = 4,
    RunningP2p = 5,
    PreCopy = 6,
    PreCopyP2p = 7,
}

impl MigState {
    /// The state a device reports as a number, or `None` for one linux/vfio.h does not define.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Error,
            1 => Self::Stop,
            2 => Self::Running,
            3 => Self::StopCopy,
            4 => Self::Resuming,
            5 => Self::RunningP2p,
            6 => Self::PreCopy,
            7 => Self::PreCopyP2p,
            _ => return None,
        })
    }
}

/// What a device's VFIO_DEVICE_FEATURE_MIGRATION says it can do (`VFIO_MIGRATION_*` flags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MigrationCaps {
    /// VFIO_MIGRATION_STOP_COPY: the minimum for a device to migrate at all.
    pub stop_copy: bool,
    /// VFIO_MIGRATION_P2P: the RUNNING_P2P state (quiesce before stop, for peer-to-peer DMA).
    pub p2p: bool,
    /// VFIO_MIGRATION_PRE_COPY: state can be read while the device runs (precopy rounds).
    pub pre_copy: bool,
}

impl MigrationCaps {
    pub fn from_flags(flags: u64) -> Self {
        Self {
            stop_copy: flags & 1 != 0,
            p2p: flags & 2 != 0,
            pre_copy: flags & 4 != 0,
        }
    }
}

/// VFIO_MIG_GET_PRECOPY_INFO: what a device in PRE_COPY still holds for the next reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrecopyInfo {
    /// Bytes of the initial state not read yet.
    pub initial_bytes: u64,
    /// Bytes of state changed since it was read (an estimate; may grow while the device runs).
    pub dirty_bytes: u64,
}

/// Migration and device DMA tracking: the part of a transport the live migration of a VM
/// with a passed-through device uses. Every method has a default that says the transport
/// cannot, so a transport without them (the mock) still builds; kernel VFIO implements them
/// with vfio-ioctls, vfio-user with the DEVICE_FEATURE and MIG_DATA commands.
pub trait DeviceMigration {
    /// VFIO_DEVICE_FEATURE_MIGRATION: `None` when the device has no migration support (the
    /// feature is absent), else what it can do.
    fn migration_caps(&mut self) -> Result<Option<MigrationCaps>, TransportError> {
        Ok(None)
    }
    /// VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, SET: one arc (or a path the device takes itself)
    /// of the migration state machine.
    fn set_migration_state(&mut self, _state: MigState) -> Result<(), TransportError> {
        Err(TransportError::Unsupported {
            op: "setting the migration state",
            why: "the transport has no migration support",
        })
    }
    /// VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, GET.
    fn migration_state(&mut self) -> Result<MigState, TransportError> {
        Err(TransportError::Unsupported {
            op: "reading the migration state",
            why: "the transport has no migration support",
        })
    }
    /// Reads migration data (PRE_COPY or STOP_COPY) into `buf`; returns how many bytes came.
    /// Fewer than `buf.len()` means no more for now (PRE_COPY) or the end (STOP_COPY).
    fn migration_read(&mut self, _buf: &mut [u8]) -> Result<usize, TransportError> {
        Err(TransportError::Unsupported {
            op: "reading migration data",
            why: "the transport has no migration support",
        })
    }
    /// Writes migration data (RESUMING), all of `data`.
    fn migration_write(&mut self, _data: &[u8]) -> Result<(), TransportError> {
        Err(TransportError::Unsupported {
            op: "writing migration data",
            why: "the transport has no migration support",
        })
    }
    /// VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: the device's estimate of its stop-copy data, for the
    /// downtime estimate. `None` when it does not say.
    fn migration_data_size(&mut self) -> Result<Option<u64>, TransportError> {
        Ok(None)
    }
    /// VFIO_MIG_GET_PRECOPY_INFO, where the transport has it (kernel VFIO); `None` otherwise.
    fn precopy_info(&mut self) -> Result<Option<PrecopyInfo>, TransportError> {
        Ok(None)
    }
    /// Whether the device can log its DMA writes (a PROBE of DMA_LOGGING_START).
    fn dma_logging_supported(&mut self) -> Result<bool, TransportError> {
        Ok(false)
    }
    /// VFIO_DEVICE_FEATURE_DMA_LOGGING_START over `ranges` (iova, length) at `page_size` (a
    /// hint); returns the page size the device chose.
    fn dma_logging_start(
        &mut self,
        _page_size: u64,
        _ranges: &[(u64, u64)],
    ) -> Result<u64, TransportError> {
        Err(TransportError::Unsupported {
            op: "starting DMA logging",
            why: "the transport has no DMA logging",
        })
    }
    /// VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT of `[iova, iova + length)`: one bit per
    /// `page_size` (page `n` is bit `n % 64` of word `n / 64`); reported bits are cleared.
    fn dma_logging_report(
        &mut self,
        _iova: u64,
        _length: u64,
        _page_size: u64,
    ) -> Result<Vec<u64>, TransportError> {
        Err(TransportError::Unsupported {
            op: "reading the DMA log",
            why: "the transport has no DMA logging",
        })
    }
    /// VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP.
    fn dma_logging_stop(&mut self) -> Result<(), TransportError> {
        Err(TransportError::Unsupported {
            op: "stopping DMA logging",
            why: "the transport has no DMA logging",
        })
    }

    /// Whether the IOMMU in front of the device can track its DMA writes, and how (a name for
    /// reports): type1's VFIO_IOMMU_DIRTY_PAGES, iommufd's HWPT dirty tracking. `None` when
    /// neither is there (vfio-user has no IOMMU: the server is the device).
    fn iommu_dirty(&mut self) -> Result<Option<&'static str>, TransportError> {
        Ok(None)
    }
    /// Starts IOMMU dirty tracking over every DMA mapping.
    fn iommu_dirty_start(&mut self) -> Result<(), TransportError> {
        Err(TransportError::Unsupported {
            op: "starting IOMMU dirty tracking",
            why: "no IOMMU dirty tracking behind this transport",
        })
    }
    /// The IOMMU's dirty bits of one whole DMA mapping `[iova, iova + length)` at 4 KiB (page
    /// `n`: bit `n % 64` of word `n / 64`), cleared as read.
    fn iommu_dirty_report(&mut self, _iova: u64, _length: u64) -> Result<Vec<u64>, TransportError> {
        Err(TransportError::Unsupported {
            op: "reading IOMMU dirty bits",
            why: "no IOMMU dirty tracking behind this transport",
        })
    }
    fn iommu_dirty_stop(&mut self) -> Result<(), TransportError> {
        Err(TransportError::Unsupported {
            op: "stopping IOMMU dirty tracking",
            why: "no IOMMU dirty tracking behind this transport",
        })
    }
}
