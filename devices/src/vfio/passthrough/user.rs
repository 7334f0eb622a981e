//! [`VfioTransport`] over vfio-user (the `vfio_user` crate's client, patched to check error
//! replies): a device served by another process on a Unix socket. Regions come with the
//! server's memfd for their mmappable areas; guest RAM is shared by fd (DMA_MAP sends the
//! region's file and offset, which the server mmaps), so RAM must be file-backed.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE,
    VFIO_PCI_NUM_IRQS, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_user::Client;
use vmm_sys_util::eventfd::EventFd;

use super::transport::{
    DeviceInfo, DeviceMigration, DmaRegion, IrqInfo, MigState, MigrationCaps, MmapArea, RegionFile,
    RegionInfo, TransportError, VfioTransport,
};

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("connecting to the vfio-user server at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: vfio_user::Error,
    },
    #[error(
        "the vfio-user server at {path} did not answer within {}s (busy with another client, \
         stopped, or not a vfio-user server)",
        vfio_user::REPLY_TIMEOUT.as_secs()
    )]
    NoAnswer {
        path: PathBuf,
        #[source]
        source: vfio_user::Error,
    },
}

/// Whether `e` is the socket timing out (see `vfio_user::REPLY_TIMEOUT`).
fn timed_out(e: &vfio_user::Error) -> bool {
    use std::io::ErrorKind::{TimedOut, WouldBlock};
    match e {
        vfio_user::Error::StreamRead(io) | vfio_user::Error::StreamWrite(io) => {
            matches!(io.kind(), WouldBlock | TimedOut)
        }
        vfio_user::Error::ReceiveWithFd(errno) | vfio_user::Error::SendWithFd(errno) => {
            matches!(errno.errno(), libc::EAGAIN | libc::ETIMEDOUT)
        }
        _ => false,
    }
}

/// A vfio-user client connection to one device.
pub struct UserTransport {
    client: Client,
    /// Why the connection is unusable, once a call failed in a way that leaves the stream out
    /// of step (a timeout, a short or malformed reply, a dead socket): every later call then
    /// fails at once instead of reading the wrong reply or waiting out the timeout again.
    lost: Option<String>,
    /// Highest region index the server described, plus one.
    regions: u32,
}

impl UserTransport {
    /// Connects to the server at `path` and negotiates (version, regions, sparse areas).
    pub fn connect(path: &Path) -> Result<Self, UserError> {
        let client = Client::new(path).map_err(|source| {
            let path = path.to_path_buf();
            if timed_out(&source) {
                UserError::NoAnswer { path, source }
            } else {
                UserError::Connect { path, source }
            }
        })?;
        let regions = (0..64)
            .filter(|&i| client.region(i).is_some())
            .max()
            .map_or(0, |i| i + 1);
        Ok(Self {
            client,
            regions,
            lost: None,
        })
    }
}

/// A call on a connection already lost (see `UserTransport::lost`).
#[derive(Debug, thiserror::Error)]
#[error("the connection to the vfio-user server was lost earlier ({0})")]
pub struct Lost(String);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl UserTransport {
    /// Runs one client call, or refuses it on a lost connection; a failure other than the
    /// server's own error reply (a whole message: the stream stays in step) or a refused
    /// argument marks the connection lost and shuts it down.
    fn call<T>(
        &mut self,
        f: impl FnOnce(&mut Client) -> Result<T, vfio_user::Error>,
    ) -> Result<T, BoxError> {
        if let Some(why) = &self.lost {
            return Err(Box::new(Lost(why.clone())));
        }
        match f(&mut self.client) {
            Ok(v) => Ok(v),
            Err(e) => {
                if !matches!(
                    e,
                    vfio_user::Error::ErrorReply { .. } | vfio_user::Error::InvalidInput
                ) {
                    self.lost = Some(e.to_string());
                    let _ = self.client.shutdown();
                }
                Err(Box::new(e))
            }
        }
    }
}

impl Drop for UserTransport {
    fn drop(&mut self) {
        // The server resets the device and drops our DMA regions when we leave.
        let _ = self.client.shutdown();
    }
}

/// VFIO migration v2 and DMA logging over vfio-user: DEVICE_FEATURE (16) and MIG_DATA_READ /
/// MIG_DATA_WRITE (17, 18), the patched crate's `feature` and `migration` modules.
impl DeviceMigration for UserTransport {
    fn migration_caps(&mut self) -> Result<Option<MigrationCaps>, TransportError> {
        let flags = self
            .call(|c| c.migration_flags())
            .map_err(|e| TransportError::device("VFIO_DEVICE_FEATURE_MIGRATION", e))?;
        Ok(flags.map(MigrationCaps::from_flags))
    }

    fn set_migration_state(&mut self, state: MigState) -> Result<(), TransportError> {
        self.call(|c| c.set_mig_state(state as u32))
            .map_err(|e| TransportError::device("VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE (SET)", e))
    }

    fn migration_state(&mut self) -> Result<MigState, TransportError> {
        let raw = self
            .call(|c| c.mig_state())
            .map_err(|e| TransportError::device("VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE (GET)", e))?;
        MigState::from_raw(raw).ok_or_else(|| {
            TransportError::device(
                "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE (GET)",
                format!("the server answered state {raw}, which linux/vfio.h does not define"),
            )
        })
    }

    fn migration_read(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        // One message per call: a reply shorter than asked is the end (or "no more now").
        let want = buf.len().min(vfio_user::MAX_MIG_DATA_CHUNK);
        let data = self
            .call(|c| c.mig_data_read(want as u32))
            .map_err(|e| TransportError::device("VFIO_USER_MIG_DATA_READ", e))?;
        if data.len() > want {
            return Err(TransportError::device(
                "VFIO_USER_MIG_DATA_READ",
                format!("{} bytes for a read of {want}", data.len()),
            ));
        }
        buf[..data.len()].copy_from_slice(&data);
        // A full chunk smaller than `buf` is not an end: say so by filling the caller's view
        // only when the server had less than asked.
        if data.len() == want && want < buf.len() {
            let more = self.migration_read(&mut buf[want..])?;
            return Ok(want + more);
        }
        Ok(data.len())
    }

    fn migration_write(&mut self, data: &[u8]) -> Result<(), TransportError> {
        for chunk in data.chunks(vfio_user::MAX_MIG_DATA_CHUNK) {
            self.call(|c| c.mig_data_write(chunk))
                .map_err(|e| TransportError::device("VFIO_USER_MIG_DATA_WRITE", e))?;
        }
        Ok(())
    }

    fn migration_data_size(&mut self) -> Result<Option<u64>, TransportError> {
        self.call(|c| c.mig_data_size())
            .map_err(|e| TransportError::device("VFIO_DEVICE_FEATURE_MIG_DATA_SIZE", e))
    }

    fn dma_logging_supported(&mut self) -> Result<bool, TransportError> {
        self.call(|c| c.dma_logging_probe())
            .map_err(|e| TransportError::device("probing DMA_LOGGING_START", e))
    }

    fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[(u64, u64)],
    ) -> Result<u64, TransportError> {
        let ranges: Vec<vfio_user::DmaLoggingRange> = ranges
            .iter()
            .map(|&(iova, length)| vfio_user::DmaLoggingRange { iova, length })
            .collect();
        self.call(|c| c.dma_logging_start(page_size, &ranges))
            .map_err(|e| TransportError::device("VFIO_DEVICE_FEATURE_DMA_LOGGING_START", e))
    }

    fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u64>, TransportError> {
        let bytes = self
            .call(|c| c.dma_logging_report(iova, length, page_size))
            .map_err(|e| TransportError::device("VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT", e))?;
        // Little-endian bytes, whole u64 words (the crate checks both).
        Ok(bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]))
            .collect())
    }

    fn dma_logging_stop(&mut self) -> Result<(), TransportError> {
        self.call(|c| c.dma_logging_stop())
            .map_err(|e| TransportError::device("VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP", e))
    }
}

impl VfioTransport for UserTransport {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            regions: self.regions,
            // The crate keeps the server's count to itself; vfio-pci's indexes are all asked.
            irqs: VFIO_PCI_NUM_IRQS,
            resettable: self.client.resettable(),
        }
    }

    fn region_info(&mut self, index: u32) -> Result<RegionInfo, TransportError> {
        let Some(r) = self.client.region(index) else {
            return Ok(RegionInfo::absent(index));
        };
        let file = r.file_offset.as_ref().map(|f| RegionFile {
            file: Arc::clone(f.arc()),
            offset: f.start(),
        });
        let mmap_areas = if r.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || file.is_none() {
            Vec::new()
        } else if r.sparse_areas.is_empty() {
            vec![MmapArea {
                offset: 0,
                size: r.size,
            }]
        } else {
            r.sparse_areas
                .iter()
                .filter(|a| a.size != 0)
                .map(|a| MmapArea {
                    offset: a.offset,
                    size: a.size,
                })
                .collect()
        };
        Ok(RegionInfo {
            index,
            size: r.size,
            readable: r.flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: r.flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            file: if mmap_areas.is_empty() { None } else { file },
            mmap_areas,
        })
    }

    fn region_read(
        &mut self,
        index: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), TransportError> {
        self.call(|c| c.region_read(index, offset, data))
            .map_err(|e| TransportError::region("read", index, e))
    }

    fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<(), TransportError> {
        self.call(|c| c.region_write(index, offset, data))
            .map_err(|e| TransportError::region("write", index, e))
    }

    fn irq_info(&mut self, index: u32) -> Result<IrqInfo, TransportError> {
        let i = self
            .call(|c| c.get_irq_info(index))
            .map_err(|e| TransportError::device("GET_IRQ_INFO", e))?;
        Ok(IrqInfo {
            index: i.index,
            count: i.count,
            flags: i.flags,
        })
    }

    fn enable_irqs(&mut self, index: u32, fds: &[&EventFd]) -> Result<(), TransportError> {
        let raw: Vec<_> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
        let count = u32::try_from(raw.len())
            .map_err(|e| TransportError::device("SET_IRQS (eventfds)", e))?;
        self.call(|c| {
            c.set_irqs(
                index,
                VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                count,
                &raw,
            )
        })
        .map_err(|e| TransportError::device("SET_IRQS (eventfds)", e))
    }

    fn disable_irqs(&mut self, index: u32) -> Result<(), TransportError> {
        self.call(|c| {
            c.set_irqs(
                index,
                VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
                0,
                0,
                &[],
            )
        })
        .map_err(|e| TransportError::device("SET_IRQS (none)", e))
    }

    unsafe fn dma_map(&mut self, region: &DmaRegion<'_>) -> Result<(), TransportError> {
        let Some((file, offset)) = region.file else {
            return Err(TransportError::Unsupported {
                op: "DMA_MAP",
                why: "vfio-user shares guest RAM by fd: this RAM has no file",
            });
        };
        self.call(|c| c.dma_map(offset, region.iova, region.size, file.as_raw_fd()))
            .map_err(|e| TransportError::device("DMA_MAP", e))
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), TransportError> {
        self.call(|c| c.dma_unmap(iova, size))
            .map_err(|e| TransportError::device("DMA_UNMAP", e))
    }

    fn reset(&mut self) -> Result<(), TransportError> {
        self.call(|c| c.reset())
            .map_err(|e| TransportError::device("DEVICE_RESET", e))
    }
}
