//! Loading a bare-metal payload (the micro guest, or any raw x86-64 code) and its mailbox.
//!
//! Entry contract (see `guest-images/micro`): long mode, CPL0, identity map of the first 4 GiB
//! with the U/S bit set, RIP at `MICRO_LOAD_GPA`, RSP at `BOOT_STACK_GPA`, IF=0.
//!
//! With several vCPUs every vCPU enters the payload (`guest_abi::micro` docs): vCPU 0 as above
//! with RSI = 0; vCPU i > 0 is made runnable directly (no INIT/SIPI) by `setup_ap`, with RSI = i,
//! its own CPL0 stack, and TR already covering the TSS's I/O bitmap, which `write_io_bitmap`
//! puts in place before any vCPU runs. So the other vCPUs wait for nothing vCPU 0 does.

use std::path::{Path, PathBuf};

use guest_abi::layout;
use kvm_bindings::{kvm_mp_state, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::EntryPoint;
use crate::memory::{GuestMemory, GuestRam};
use crate::vstate::regs::{self, RegsError};

#[derive(Debug, thiserror::Error)]
pub enum MicroBootError {
    #[error("cannot read payload: {0}")]
    Read(#[from] crate::host_file::HostFileError),
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
    #[error("the micro guest runs on at most {max} vCPUs (vCPU index {index})", max = guest_abi::micro::MAX_VCPUS)]
    VcpuIndex { index: u8 },
    #[error("starting micro guest vCPU {index}: {source}")]
    Ap { index: u8, source: RegsError },
}

/// Reads a raw payload file: a regular file no larger than what fits at its load address,
/// checked before reading (a FIFO or `/dev/zero` is refused, not read).
pub fn read_payload(path: &Path) -> Result<Vec<u8>, MicroBootError> {
    let bytes = crate::host_file::read_bounded(path, "payload", layout::MICRO_MAX_SIZE)?;
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

/// TR limit that covers the TSS, its I/O bitmap and the bitmap's 0xff end byte.
const IOPB_TR_LIMIT: u32 = (layout::MICRO_IOPB_OFFSET + layout::MICRO_IOPB_BYTES) as u32;

/// Gives the TSS the I/O permission bitmap that opens the micro ports to CPL3: the bytes
/// vCPU 0's payload writes at CPL0 (I/O map base at offset 102, an all-zero bitmap, one 0xff
/// byte), written before any vCPU runs so that the other vCPUs, whose TR `setup_ap` loads with
/// the covering limit, never depend on vCPU 0 having got there first.
pub fn write_io_bitmap(mem: &GuestMemory) -> Result<(), MicroBootError> {
    let base = layout::TSS_GPA;
    mem.write_obj(layout::MICRO_IOPB_OFFSET as u16, GuestAddress(base + 102))?;
    let bitmap = vec![0u8; layout::MICRO_IOPB_BYTES as usize];
    let start = base + layout::MICRO_IOPB_OFFSET;
    mem.write_slice(&bitmap, GuestAddress(start))?;
    mem.write_obj(0xffu8, GuestAddress(start + layout::MICRO_IOPB_BYTES))?;
    Ok(())
}

/// Makes vCPU `index` (> 0) runnable at the payload's entry, as the micro guest's contract
/// says: the boot segments and paging of vCPU 0, RIP = `MICRO_LOAD_GPA`, RSI = `index`, RSP =
/// `BOOT_STACK_GPA - index * MICRO_BOOT_STACK_STRIDE`, TR covering the I/O bitmap, and MP
/// state RUNNABLE so that KVM_RUN does not wait for an INIT/SIPI.
pub fn setup_ap(fd: &VcpuFd, index: u8) -> Result<(), MicroBootError> {
    if u64::from(index) >= guest_abi::micro::MAX_VCPUS {
        return Err(MicroBootError::VcpuIndex { index });
    }
    let ap = |source| MicroBootError::Ap { index, source };
    let ioctl = |what| move |source| ap(RegsError::Ioctl { what, source });
    regs::setup_boot_sregs(fd).map_err(ap)?;
    let mut sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
    sregs.tr.limit = IOPB_TR_LIMIT;
    fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
    let entry = EntryPoint {
        rip: layout::MICRO_LOAD_GPA,
        rsp: layout::BOOT_STACK_GPA - u64::from(index) * layout::MICRO_BOOT_STACK_STRIDE,
        rsi: u64::from(index),
    };
    regs::setup_boot_regs(fd, &entry).map_err(ap)?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(ioctl("KVM_SET_MP_STATE"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_bitmap_is_what_the_payload_writes() {
        let ram = GuestRam::new(16 << 20).expect("guest RAM");
        let mem = ram.memory();
        write_io_bitmap(mem).expect("write");
        let tss = layout::TSS_GPA;
        let base: u16 = mem.read_obj(GuestAddress(tss + 102)).expect("read");
        assert_eq!(u64::from(base), layout::MICRO_IOPB_OFFSET);
        let end = tss + layout::MICRO_IOPB_OFFSET + layout::MICRO_IOPB_BYTES;
        let last: u8 = mem.read_obj(GuestAddress(end)).expect("read");
        assert_eq!(last, 0xff);
        // The micro ports are inside the bitmap, and the TR limit covers its end byte.
        let top_port = u64::from(guest_abi::ports::MICRO_EXIT) + 3;
        assert!(top_port < layout::MICRO_IOPB_BYTES * 8);
        assert_eq!(
            u64::from(IOPB_TR_LIMIT),
            end - tss,
            "the limit is the offset of the last byte"
        );
        // The lowest AP stack stays in the boot stack page, above the zero page.
        let lowest = layout::BOOT_STACK_GPA
            - (guest_abi::micro::MAX_VCPUS - 1) * layout::MICRO_BOOT_STACK_STRIDE;
        assert!(lowest - 40 > layout::ZERO_PAGE_GPA + 0x1000);
    }
}
