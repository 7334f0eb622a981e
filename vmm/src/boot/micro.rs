//! Loading a bare-metal payload (the micro guest, or any raw x86-64 code) and its mailbox.
//!
//! Entry contract (see `guest-images/micro`): long mode, CPL0, identity map of the first 4 GiB
//! with the U/S bit set, RIP at `MICRO_LOAD_GPA`, RSP at `BOOT_STACK_GPA`, IF=0.

use std::path::{Path, PathBuf};

use guest_abi::layout;
use vm_memory::{Bytes, GuestAddress};

use super::EntryPoint;
use crate::memory::GuestRam;

#[derive(Debug, thiserror::Error)]
pub enum MicroBootError {
    #[error("cannot read payload {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("payload {path} is empty")]
    Empty { path: PathBuf },
    #[error("payload is {size} bytes; at most {max} fit at 0x{gpa:x}", max = layout::MICRO_MAX_SIZE, gpa = layout::MICRO_LOAD_GPA)]
    TooBig { size: usize },
    #[error("mailbox is {0} bytes; it must be at most one 4 KiB page")]
    Mailbox(usize),
    #[error("workload region [0x{start:x}, 0x{end:x}) is not inside guest RAM below the MMIO hole (RAM ends at 0x{ram_end:x}); give the guest more memory or a smaller region")]
    Region { start: u64, end: u64, ram_end: u64 },
    #[error("writing the payload into guest memory failed: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Reads a raw payload file.
pub fn read_payload(path: &Path) -> Result<Vec<u8>, MicroBootError> {
    let bytes = std::fs::read(path).map_err(|source| MicroBootError::Read {
        path: path.to_owned(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(MicroBootError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(bytes)
}

/// Checks that a workload region lies in low guest RAM and above the payload's own pages.
pub fn check_region(ram: &GuestRam, start: u64, bytes: u64) -> Result<(), MicroBootError> {
    let end = start.saturating_add(bytes);
    if start < layout::MICRO_USER_STACK_TOP || end > ram.low_end() {
        return Err(MicroBootError::Region {
            start,
            end,
            ram_end: ram.low_end(),
        });
    }
    Ok(())
}

/// Copies the payload and mailbox into guest RAM.
pub fn load(ram: &GuestRam, payload: &[u8], mailbox: &[u8]) -> Result<EntryPoint, MicroBootError> {
    if payload.len() as u64 > layout::MICRO_MAX_SIZE {
        return Err(MicroBootError::TooBig {
            size: payload.len(),
        });
    }
    if mailbox.len() > 4096 {
        return Err(MicroBootError::Mailbox(mailbox.len()));
    }
    let mem = ram.memory();
    mem.write_slice(payload, GuestAddress(layout::MICRO_LOAD_GPA))?;
    mem.write_slice(mailbox, GuestAddress(layout::MICRO_MAILBOX_GPA))?;
    Ok(EntryPoint {
        rip: layout::MICRO_LOAD_GPA,
        rsp: layout::BOOT_STACK_GPA,
        rsi: 0,
    })
}
