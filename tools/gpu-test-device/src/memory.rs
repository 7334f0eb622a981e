//! Device memory (BAR backings) and client memory (DMA_MAP regions): shared mappings of fds.
//!
//! Every mapping goes through vm-memory's `MmapRegion`, which owns the `mmap`/`munmap` pair and
//! bounds-checks every access, so this crate needs no `unsafe` of its own for memory.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

/// Failures creating or mapping memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("memfd_create for {name:?}")]
    Memfd {
        name: &'static CStr,
        #[source]
        source: std::io::Error,
    },
    #[error("sizing memfd {name:?} to {size} bytes")]
    Truncate {
        name: &'static CStr,
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("size {0} does not fit this host's address space")]
    TooLarge(u64),
    #[error("mapping {size} bytes at file offset {offset:#x}")]
    Map {
        offset: u64,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
}

/// One shared mapping of a file: a BAR's backing or a client's DMA region.
#[derive(Debug)]
pub struct Mapping {
    region: MmapRegion<()>,
}

impl Mapping {
    /// Maps `size` bytes of `file` from `offset`, shared, readable and (if `writable`) writable.
    pub fn new(file: File, offset: u64, size: u64, writable: bool) -> Result<Self, MemoryError> {
        let len = usize::try_from(size).map_err(|_| MemoryError::TooLarge(size))?;
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        let region = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(prot)
            .with_mmap_flags(libc::MAP_SHARED)
            .build()
            .map_err(|source| MemoryError::Map {
                offset,
                size,
                source,
            })?;
        Ok(Self { region })
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.region.size() as u64
    }

    /// The bytes `[offset, offset + len)`, or `None` where they are not all inside.
    pub fn slice(&self, offset: u64, len: u64) -> Option<VolatileSlice<'_, ()>> {
        let end = offset.checked_add(len)?;
        if end > self.len() {
            return None;
        }
        self.region.get_slice(offset as usize, len as usize).ok()
    }
}

/// A sparse memfd of `size` bytes mapped shared: the backing of a mmappable BAR.
#[derive(Debug)]
pub struct DeviceMemory {
    fd: File,
    mapping: Mapping,
}

impl DeviceMemory {
    /// Creates the memfd (no page is allocated until touched) and maps it.
    pub fn new(name: &'static CStr, size: u64) -> Result<Self, MemoryError> {
        let fd = memfd(name)?;
        fd.set_len(size)
            .map_err(|source| MemoryError::Truncate { name, size, source })?;
        let map_fd = fd
            .try_clone()
            .map_err(|source| MemoryError::Memfd { name, source })?;
        let mapping = Mapping::new(map_fd, 0, size, true)?;
        Ok(Self { fd, mapping })
    }

    /// The fd offered to clients for mmap (stays open as long as `self`).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The device's own mapping.
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }
}

/// A new memfd, close-on-exec.
pub(crate) fn memfd(name: &'static CStr) -> Result<File, MemoryError> {
    // SAFETY: `name` is NUL-terminated; memfd_create returns a new fd or -1 and touches no
    // memory of ours.
    let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(MemoryError::Memfd {
            name,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `raw` is a new fd that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(raw) }))
}
