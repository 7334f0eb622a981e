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
/// answers.
pub trait VfioTransport: Send {
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
