//! One virtio-blk request (virtio 1.2 §5.2.6): a descriptor chain of a 16-byte read-only header,
//! data buffers, and a one-byte writable status, checked end to end before the disk is touched.
//!
//! Like Linux and the other VMMs, the header is expected in a descriptor of its own (Linux always
//! lays requests out that way); a header split across descriptors is refused with IOERR.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, Bytes, GuestMemoryBackend, GuestMemoryError, ReadVolatile, VolatileMemoryError,
    WriteVolatile,
};

use super::SECTOR_SIZE;
use crate::GuestMemory;

/// Size of `struct virtio_blk_outhdr`: type (le32), reserved (le32), sector (le64).
const HEADER_LEN: u32 = 16;
const SECTOR_FIELD_OFFSET: u64 = 8;
pub(super) const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    #[error("no header and data before the status descriptor")]
    TooShort,
    #[error("header descriptor is device-writable or shorter than {HEADER_LEN} bytes")]
    BadHeader,
    #[error("data descriptor points the wrong way for this request")]
    BadDirection,
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    Unaligned(u64),
    #[error("sector {sector} + {len} bytes runs past the end of the disk ({disk_bytes} bytes)")]
    OutOfRange {
        sector: u64,
        len: u64,
        disk_bytes: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("GET_ID without a device-writable buffer")]
    NoIdBuffer,
    #[error("request type {0} not supported")]
    Unsupported(u32),
    #[error("guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
    #[error("moving data between the disk and guest memory: {0}")]
    Transfer(#[from] VolatileMemoryError),
    #[error("disk image: {0}")]
    Io(#[from] io::Error),
}

impl RequestError {
    fn status(&self) -> u32 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        }
    }
}

/// The disk image behind a virtio-blk device.
#[derive(Debug)]
pub(super) struct Disk {
    pub(super) file: File,
    pub(super) read_only: bool,
    /// Usable size in bytes: a whole number of sectors.
    pub(super) bytes: u64,
    /// GET_ID answer, NUL-padded.
    pub(super) id: [u8; ID_LEN],
}

impl Disk {
    /// Runs the request in `chain` and writes its status. Returns the used length: the bytes
    /// written into the chain's device-writable buffers (data read plus the status byte).
    pub(super) fn execute(
        &mut self,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let head = chain.head_index();
        // At most a queue size (or an indirect table's worth) of descriptors: the chain
        // iterator counts them down, so a looping chain ends.
        let descs: Vec<Descriptor> = chain.collect();
        let Some((status, rest)) = descs.split_last() else {
            tracing::warn!(head, "virtio-blk: empty descriptor chain");
            return 0;
        };
        if !status.is_write_only() || status.len() == 0 {
            // Nowhere to say it failed; the used ring entry at least gives the buffers back.
            tracing::warn!(
                head,
                "virtio-blk: chain does not end in a writable status byte"
            );
            return 0;
        }
        let (code, written) = match self.run(mem, rest) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(e) => {
                tracing::warn!(head, "virtio-blk request failed: {e}");
                (e.status(), 0)
            }
        };
        // Status codes are single bytes (0, 1, 2).
        if let Err(e) = mem.write_obj(code as u8, status.addr()) {
            tracing::warn!(head, "virtio-blk: writing the status byte: {e}");
            return written;
        }
        written.saturating_add(1)
    }

    /// Validates and performs the request; returns the data bytes written to the guest.
    fn run(&mut self, mem: &GuestMemory, descs: &[Descriptor]) -> Result<u32, RequestError> {
        let (header, data) = descs.split_first().ok_or(RequestError::TooShort)?;
        if header.is_write_only() || header.len() < HEADER_LEN {
            return Err(RequestError::BadHeader);
        }
        let request_type = u32::from_le(mem.read_obj::<u32>(header.addr())?);
        let sector_addr = header
            .addr()
            .checked_add(SECTOR_FIELD_OFFSET)
            .ok_or(RequestError::BadHeader)?;
        let sector = u64::from_le(mem.read_obj::<u64>(sector_addr)?);

        match request_type {
            VIRTIO_BLK_T_IN => {
                let (offset, len) = self.check_transfer(sector, data, true)?;
                self.file.seek(SeekFrom::Start(offset))?;
                for d in data {
                    for slice in GuestMemoryBackend::get_slices(mem, d.addr(), d.len() as usize) {
                        // `File`'s ReadVolatile marks what it fills in the slice's dirty bitmap
                        // (vm-memory io.rs, read_volatile_raw_fd), so the AtomicBitmap sees it.
                        self.file.read_exact_volatile(&mut slice?)?;
                    }
                }
                Ok(u32::try_from(len).unwrap_or(u32::MAX))
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(RequestError::ReadOnly);
                }
                let (offset, _) = self.check_transfer(sector, data, false)?;
                self.file.seek(SeekFrom::Start(offset))?;
                for d in data {
                    for slice in GuestMemoryBackend::get_slices(mem, d.addr(), d.len() as usize) {
                        self.file.write_all_volatile(&slice?)?;
                    }
                }
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                // Nothing of a read-only disk can be dirty in the host's page cache.
                if !self.read_only {
                    self.file.sync_data()?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let buf = data
                    .first()
                    .filter(|d| d.is_write_only())
                    .ok_or(RequestError::NoIdBuffer)?;
                let n = ID_LEN.min(buf.len() as usize);
                mem.write_slice(&self.id[..n], buf.addr())?;
                Ok(n as u32)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// Checks the data descriptors of an IN (`to_guest`) or OUT request starting at `sector`;
    /// returns the byte offset in the image and the total length.
    fn check_transfer(
        &self,
        sector: u64,
        data: &[Descriptor],
        to_guest: bool,
    ) -> Result<(u64, u64), RequestError> {
        if data.iter().any(|d| d.is_write_only() != to_guest) {
            return Err(RequestError::BadDirection);
        }
        // At most 65536 descriptors of at most 4 GiB each: no overflow in a u64.
        let len: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        if len % SECTOR_SIZE != 0 {
            return Err(RequestError::Unaligned(len));
        }
        let offset = sector.checked_mul(SECTOR_SIZE);
        match offset.and_then(|o| Some((o, o.checked_add(len)?))) {
            Some((offset, end)) if end <= self.bytes => Ok((offset, len)),
            _ => Err(RequestError::OutOfRange {
                sector,
                len,
                disk_bytes: self.bytes,
            }),
        }
    }
}
