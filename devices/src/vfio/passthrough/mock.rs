//! A transport for unit tests: an H100-shaped function (BAR0 16 MiB with the MSI-X table at an
//! unaligned offset, BAR1 128 GiB 64-bit prefetchable, BAR3 32 MiB 64-bit prefetchable, a
//! 512 KiB ROM, the PCIe extended space with SR-IOV, ARI and Resizable BAR to hide), host BAR
//! addresses in its config space, every call recorded, and faults to inject.
//!
//! The state sits behind a shared handle so a test can change the device before opening it,
//! and look at what it was asked afterwards.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::transport::{
    DeviceInfo, DmaRegion, IrqInfo, MmapArea, RegionFile, RegionInfo, TransportError,
    VfioTransport, CONFIG_REGION, MSIX_IRQ, MSI_IRQ, ROM_REGION,
};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

pub const VENDOR: u16 = 0x10de;
pub const DEVICE: u16 = 0x2330;
/// Where the host placed the BARs: what the guest must never see.
pub const HOST_BAR0: u32 = 0xfa00_0000;
pub const HOST_BAR1: u64 = 0x3a0_0000_0000;
pub const HOST_BAR3: u64 = 0x3b_f200_0000;
pub const HOST_ROM: u32 = 0xfb00_0000;
pub const BAR0_SIZE: u64 = 16 * MIB;
pub const BAR1_SIZE: u64 = 128 * GIB;
pub const BAR3_SIZE: u64 = 32 * MIB;
pub const ROM_SIZE: u64 = 512 * 1024;
pub const MSIX_VECTORS: u16 = 16;
/// Unaligned, like the real device's and the gpu-test-device's.
pub const MSIX_TABLE: u32 = 0xb9_0800;
pub const MSIX_PBA: u32 = 0xba_0000;

// Standard capabilities: PM -> MSI (64-bit, per-vector mask, 4 vectors) -> PCIe -> MSI-X.
pub const CAP_PM: usize = 0x60;
pub const CAP_MSI: usize = 0x68;
pub const CAP_PCIE: usize = 0x80;
pub const MSI_VECTORS: u8 = 4;
pub const CAP_MSIX: usize = 0xc8;
// Extended: SR-IOV (hidden) -> ARI (hidden) -> AER -> Resizable BAR (hidden) -> VSEC.
pub const EXT_SRIOV: usize = 0x100;
pub const EXT_ARI: usize = 0x140;
pub const EXT_AER: usize = 0x150;
pub const EXT_REBAR: usize = 0x1a0;
pub const EXT_VSEC: usize = 0x1b0;

/// One thing the device was asked (config reads are left out: there are many).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    RegionRead {
        index: u32,
        offset: u64,
        len: usize,
    },
    RegionWrite {
        index: u32,
        offset: u64,
        data: Vec<u8>,
    },
    ConfigWrite {
        offset: u64,
        data: Vec<u8>,
    },
    EnableIrqs {
        index: u32,
        count: usize,
    },
    DisableIrqs {
        index: u32,
    },
    DmaMap {
        iova: u64,
        size: u64,
        fd: bool,
    },
    DmaUnmap {
        iova: u64,
        size: u64,
    },
    Reset,
}

/// The device's state; tests change it through [`MockHandle::state`].
pub struct MockState {
    pub config: Vec<u8>,
    pub regions: Vec<RegionInfo>,
    pub msix_count: u32,
    pub msi_count: u32,
    pub resettable: bool,
    /// Bytes written to regions other than config (reads of others give 0).
    pub memory: HashMap<(u32, u64), u8>,
    pub calls: Vec<Call>,
    /// Operations (`"region_info"`, `"region_read"`, `"config_read"`, `"enable_irqs"`,
    /// `"dma_map"`, `"reset"`, ...) that fail until removed.
    pub failing: Vec<&'static str>,
    /// The eventfds last given for MSI-X, to fire a vector as the device would.
    pub msix_fds: Vec<EventFd>,
}

/// A shared view of the mock's state.
#[derive(Clone)]
pub struct MockHandle(Arc<Mutex<MockState>>);

impl MockHandle {
    pub fn state(&self) -> MutexGuard<'_, MockState> {
        match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn take_calls(&self) -> Vec<Call> {
        std::mem::take(&mut self.state().calls)
    }

    /// Signals MSI-X vector `v` as the device would; false if no eventfd is set for it.
    pub fn fire(&self, v: usize) -> bool {
        self.state()
            .msix_fds
            .get(v)
            .is_some_and(|fd| fd.write(1).is_ok())
    }
}

pub struct MockTransport(MockHandle);

impl MockTransport {
    /// The H100-shaped function and a handle on its state.
    pub fn h100() -> (Self, MockHandle) {
        let handle = MockHandle(Arc::new(Mutex::new(MockState {
            config: h100_config(),
            regions: h100_regions(),
            msix_count: u32::from(MSIX_VECTORS),
            msi_count: u32::from(MSI_VECTORS),
            resettable: true,
            memory: HashMap::new(),
            calls: Vec::new(),
            failing: Vec::new(),
            msix_fds: Vec::new(),
        })));
        (Self(handle.clone()), handle)
    }

    fn check(&self, op: &'static str) -> Result<MutexGuard<'_, MockState>, TransportError> {
        let state = self.0.state();
        if state.failing.contains(&op) {
            return Err(TransportError::device(
                op,
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(state)
    }
}

fn put(cfg: &mut [u8], offset: usize, bytes: &[u8]) {
    cfg[offset..offset + bytes.len()].copy_from_slice(bytes);
}

fn ext_header(id: u16, next: usize) -> [u8; 4] {
    (u32::from(id) | 1 << 16 | (next as u32) << 20).to_le_bytes()
}

/// The H100's config space as the host has it, BARs placed by the host's firmware.
pub fn h100_config() -> Vec<u8> {
    let mut c = vec![0u8; 4096];
    put(&mut c, 0x00, &VENDOR.to_le_bytes());
    put(&mut c, 0x02, &DEVICE.to_le_bytes());
    put(&mut c, 0x04, &0x0006u16.to_le_bytes()); // memory + bus master, as the host left it
    put(&mut c, 0x06, &0x0010u16.to_le_bytes()); // capability list
    put(&mut c, 0x08, &[0xa1, 0x00, 0x02, 0x03]); // revision, 3D controller
    c[0x0e] = 0x80; // multi-function: not for a single passed-through function
    put(&mut c, 0x10, &HOST_BAR0.to_le_bytes());
    put(&mut c, 0x14, &(HOST_BAR1 as u32 | 0xc).to_le_bytes());
    put(&mut c, 0x18, &((HOST_BAR1 >> 32) as u32).to_le_bytes());
    put(&mut c, 0x1c, &(HOST_BAR3 as u32 | 0xc).to_le_bytes());
    put(&mut c, 0x20, &((HOST_BAR3 >> 32) as u32).to_le_bytes());
    put(&mut c, 0x2c, &0x10de_1626u32.to_le_bytes());
    put(&mut c, 0x30, &(HOST_ROM | 1).to_le_bytes());
    c[0x34] = CAP_PM as u8;
    c[0x3c] = 0x0b;
    c[0x3d] = 1;
    put(&mut c, CAP_PM, &[0x01, CAP_MSI as u8, 0x03, 0x00]);
    put(&mut c, CAP_MSI, &[0x05, CAP_PCIE as u8, 0x84, 0x01]); // 4 capable, 64-bit, masks
    put(&mut c, CAP_PCIE, &[0x10, CAP_MSIX as u8, 0x02, 0x00]);
    put(&mut c, CAP_PCIE + 4, &0x1234_5678u32.to_le_bytes()); // device capabilities
    put(&mut c, CAP_MSIX, &[0x11, 0x00]);
    put(&mut c, CAP_MSIX + 2, &(MSIX_VECTORS - 1).to_le_bytes());
    put(&mut c, CAP_MSIX + 4, &MSIX_TABLE.to_le_bytes());
    put(&mut c, CAP_MSIX + 8, &MSIX_PBA.to_le_bytes());
    put(&mut c, EXT_SRIOV, &ext_header(0x10, EXT_ARI));
    put(&mut c, EXT_SRIOV + 0x0c, &0x0008_0008u32.to_le_bytes()); // total/initial VFs
    put(&mut c, EXT_ARI, &ext_header(0x0e, EXT_AER));
    put(&mut c, EXT_AER, &ext_header(0x01, EXT_REBAR));
    put(&mut c, EXT_AER + 4, &0xdead_beefu32.to_le_bytes());
    put(&mut c, EXT_REBAR, &ext_header(0x15, EXT_VSEC));
    put(&mut c, EXT_REBAR + 4, &0x0fff_fff0u32.to_le_bytes());
    put(&mut c, EXT_VSEC, &ext_header(0x0b, 0));
    put(&mut c, EXT_VSEC + 4, &0x0100_0001u32.to_le_bytes());
    c
}

fn mappable(index: u32, size: u64) -> RegionInfo {
    let file = File::open("/dev/null").ok().map(|f| RegionFile {
        file: Arc::new(f),
        offset: u64::from(index) << 40,
    });
    RegionInfo {
        index,
        size,
        readable: true,
        writable: true,
        mmap_areas: vec![MmapArea { offset: 0, size }],
        file,
    }
}

/// Regions 0..=8 as vfio-pci reports them for an H100: BARs wholly mmappable (the MSI-X
/// table included, as with VFIO_REGION_INFO_CAP_MSIX_MAPPABLE), the ROM read-only.
pub fn h100_regions() -> Vec<RegionInfo> {
    let mut r: Vec<RegionInfo> = (0..9).map(RegionInfo::absent).collect();
    r[0] = mappable(0, BAR0_SIZE);
    r[1] = mappable(1, BAR1_SIZE);
    r[3] = mappable(3, BAR3_SIZE);
    r[ROM_REGION as usize] = RegionInfo {
        readable: true,
        size: ROM_SIZE,
        ..RegionInfo::absent(ROM_REGION)
    };
    r[CONFIG_REGION as usize] = RegionInfo {
        readable: true,
        writable: true,
        size: 4096,
        ..RegionInfo::absent(CONFIG_REGION)
    };
    r
}

fn out_of_range(op: &'static str, index: u32) -> TransportError {
    TransportError::region(op, index, std::io::Error::from_raw_os_error(libc::EINVAL))
}

// Migration and DMA logging: not yet (answers "unsupported").
impl super::transport::DeviceMigration for MockTransport {}

impl VfioTransport for MockTransport {
    fn device_info(&self) -> DeviceInfo {
        let s = self.0.state();
        DeviceInfo {
            regions: s.regions.len() as u32,
            irqs: 5,
            resettable: s.resettable,
        }
    }

    fn region_info(&mut self, index: u32) -> Result<RegionInfo, TransportError> {
        let s = self.check("region_info")?;
        s.regions
            .get(index as usize)
            .cloned()
            .ok_or_else(|| out_of_range("region_info", index))
    }

    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), TransportError> {
        if index == CONFIG_REGION {
            let s = self.check("config_read")?;
            let o = usize::try_from(offset).map_err(|_| out_of_range("config_read", index))?;
            let src = s
                .config
                .get(o..o.saturating_add(data.len()))
                .ok_or_else(|| out_of_range("config_read", index))?;
            data.copy_from_slice(src);
            return Ok(());
        }
        let mut s = self.check("region_read")?;
        s.calls.push(Call::RegionRead {
            index,
            offset,
            len: data.len(),
        });
        for (i, b) in data.iter_mut().enumerate() {
            *b = s
                .memory
                .get(&(index, offset.wrapping_add(i as u64)))
                .copied()
                .unwrap_or(0);
        }
        Ok(())
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), TransportError> {
        if index == CONFIG_REGION {
            let mut s = self.check("config_write")?;
            s.calls.push(Call::ConfigWrite {
                offset,
                data: data.to_vec(),
            });
            let o = usize::try_from(offset).map_err(|_| out_of_range("config_write", index))?;
            let dst = s
                .config
                .get_mut(o..o.saturating_add(data.len()))
                .ok_or_else(|| out_of_range("config_write", index))?;
            dst.copy_from_slice(data);
            return Ok(());
        }
        let mut s = self.check("region_write")?;
        s.calls.push(Call::RegionWrite {
            index,
            offset,
            data: data.to_vec(),
        });
        for (i, b) in data.iter().enumerate() {
            s.memory.insert((index, offset.wrapping_add(i as u64)), *b);
        }
        Ok(())
    }

    fn irq_info(&mut self, index: u32) -> Result<IrqInfo, TransportError> {
        let s = self.check("irq_info")?;
        let count = match index {
            MSIX_IRQ => s.msix_count,
            MSI_IRQ => s.msi_count,
            _ => 0,
        };
        Ok(IrqInfo {
            index,
            count,
            flags: 0,
        })
    }

    fn enable_irqs(&mut self, index: u32, fds: &[&EventFd]) -> Result<(), TransportError> {
        let mut s = self.check("enable_irqs")?;
        let count = match index {
            MSIX_IRQ => s.msix_count,
            MSI_IRQ => s.msi_count,
            _ => 0,
        };
        // As kernel VFIO (vfio-pci) and vfio-ioctls do.
        if fds.len() > count as usize {
            return Err(TransportError::device(
                "enable_irqs",
                format!("{} eventfds for an index of {count}", fds.len()),
            ));
        }
        s.calls.push(Call::EnableIrqs {
            index,
            count: fds.len(),
        });
        if index == MSIX_IRQ {
            s.msix_fds = fds
                .iter()
                .map(|fd| fd.try_clone())
                .collect::<Result<_, _>>()
                .map_err(|e| TransportError::device("enable_irqs", e))?;
        }
        Ok(())
    }

    fn disable_irqs(&mut self, index: u32) -> Result<(), TransportError> {
        let mut s = self.check("disable_irqs")?;
        s.calls.push(Call::DisableIrqs { index });
        if index == MSIX_IRQ {
            s.msix_fds.clear();
        }
        Ok(())
    }

    unsafe fn dma_map(&mut self, region: &DmaRegion<'_>) -> Result<(), TransportError> {
        let mut s = self.check("dma_map")?;
        s.calls.push(Call::DmaMap {
            iova: region.iova,
            size: region.size,
            fd: region.file.is_some(),
        });
        Ok(())
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), TransportError> {
        let mut s = self.check("dma_unmap")?;
        s.calls.push(Call::DmaUnmap { iova, size });
        Ok(())
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        let mut s = self.check("reset")?;
        s.calls.push(Call::Reset);
        Ok(())
    }
}
