//! virtio-blk (virtio 1.2 §5.2) on a host file: one queue, IN / OUT / FLUSH / GET_ID.
//!
//! Hand-written: crates.io has no virtio-blk device crate (checked with `cargo info virtio-blk`);
//! virtio-queue supplies the rings and chains, vm-memory the guest-memory transfers.
//!
//! Migration: no request is ever in flight between two MMIO exits. A request is run to its end
//! (disk I/O, status byte, used ring entry) inside `process_queue`, which the transport calls
//! from the QueueNotify write, in the vCPU thread, with the device's bus lock held; there is no
//! ioeventfd, worker thread or asynchronous I/O. Once every vCPU has left KVM_RUN (and the
//! state is saved under that same lock) every chain popped from the avail ring has been pushed
//! to the used ring, so the state needs only the ring positions, which the transport saves.
//! The disk's contents travel outside this state (shared storage).

mod request;

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueState, QueueT};

use super::queue::drain_queue;
use super::{
    DeviceSnapshot, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::state::DeviceStateError;
use crate::GuestMemory;
use request::{Disk, ID_LEN};

/// virtio-blk always counts in 512-byte sectors, whatever the image's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request: the queue size less the header and status descriptors, since
/// indirect descriptors are not offered.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// capacity (le64), size_max (le32), seg_max (le32), geometry (4 bytes), blk_size (le32).
const CONFIG_LEN: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("finding the disk image's size: {0}")]
    Size(#[source] io::Error),
    #[error("disk serial {0:?} is longer than {ID_LEN} bytes")]
    SerialTooLong(String),
}

/// State that exists only between DRIVER_OK and reset.
struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// A virtio-blk device backed by a file (or a host block device).
pub struct Block {
    disk: Disk,
    queue_sizes: [u16; 1],
    config: [u8; CONFIG_LEN],
    active: Option<Active>,
}

impl Block {
    /// A disk on `file`, which must be open for writing unless `read_only`. `serial` is what the
    /// guest sees as the disk's ID (GET_ID, /sys/block/vda/serial): at most 20 bytes.
    pub fn new(mut file: File, read_only: bool, serial: &str) -> Result<Self, BlockError> {
        let id = serial.as_bytes();
        if id.len() > ID_LEN {
            return Err(BlockError::SerialTooLong(serial.to_string()));
        }
        let mut padded = [0u8; ID_LEN];
        padded[..id.len()].copy_from_slice(id);

        // Seeking to the end works for block devices too, where metadata says 0.
        let file_len = file.seek(SeekFrom::End(0)).map_err(BlockError::Size)?;
        let sectors = file_len / SECTOR_SIZE;
        if file_len % SECTOR_SIZE != 0 {
            tracing::warn!(
                "disk image is not a whole number of sectors; its last {} bytes are unreachable",
                file_len % SECTOR_SIZE
            );
        }

        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());

        Ok(Self {
            disk: Disk {
                file,
                read_only,
                bytes: sectors * SECTOR_SIZE,
                id: padded,
            },
            queue_sizes: [QUEUE_SIZE],
            config,
            active: None,
        })
    }

    /// Opens the image at `path`; the serial is made from the file's device and inode numbers,
    /// stable for as long as the file exists.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let mut serial = format!("{:x}{:x}", meta.dev(), meta.ino());
        serial.truncate(ID_LEN);
        Self::new(file, read_only, &serial)
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.bytes / SECTOR_SIZE
    }

    pub fn is_read_only(&self) -> bool {
        self.disk.read_only
    }

    /// What the guest has seen of the disk. The config space and features follow from the
    /// capacity and read-only flag, which the destination's image must match; the serial does
    /// not (`open` derives it from the host's inode), so it travels.
    pub fn save_state(&self) -> BlockState {
        BlockState {
            capacity: self.capacity(),
            read_only: self.disk.read_only,
            serial: self.disk.id,
        }
    }

    /// Checks that this disk is the one the guest saw and adopts its serial.
    pub fn restore_state(&mut self, state: &BlockState) -> Result<(), DeviceStateError> {
        if state.capacity != self.capacity() {
            return Err(DeviceStateError::DiskCapacity {
                expected: self.capacity(),
                got: state.capacity,
            });
        }
        if state.read_only != self.disk.read_only {
            return Err(DeviceStateError::DiskReadOnly {
                expected: self.disk.read_only,
                got: state.read_only,
            });
        }
        self.disk.id = state.serial;
        Ok(())
    }
}

/// virtio-blk's guest-visible identity. The ring positions are the transport's to save.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub read_only: bool,
    /// The GET_ID answer, NUL-padded.
    pub serial: [u8; ID_LEN],
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if self.disk.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing is writable without VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
        tracing::warn!(offset, len = data.len(), "virtio-blk config write ignored");
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<VirtioInterrupt>,
        _features: u64,
    ) -> Result<(), VirtioError> {
        let got = queues.len();
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(VirtioError::QueueCount { expected: 1, got });
        };
        if !queue.ready() {
            return Err(VirtioError::QueueNotReady(0));
        }
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn process_queue(&mut self, index: u16) -> Result<(), VirtioError> {
        if index != 0 {
            return Err(VirtioError::NoSuchQueue(index));
        }
        let Some(active) = &mut self.active else {
            return Err(VirtioError::NotActivated);
        };
        let disk = &mut self.disk;
        let mem = &active.mem;
        let notify = drain_queue(&mut active.queue, index, mem, |chain| {
            disk.execute(mem, chain)
        })?;
        if notify {
            active
                .interrupt
                .signal_used_queue()
                .map_err(VirtioError::Interrupt)?;
        }
        Ok(())
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .iter()
            .map(|active| active.queue.state())
            .collect()
    }

    fn save_snapshot(&self) -> DeviceSnapshot {
        DeviceSnapshot::Block(self.save_state())
    }

    fn restore_snapshot(&mut self, snapshot: &DeviceSnapshot) -> Result<(), DeviceStateError> {
        let DeviceSnapshot::Block(state) = snapshot;
        self.restore_state(state)
    }

    fn kind(&self) -> &'static str {
        "virtio-blk"
    }
}

#[cfg(test)]
mod tests;
