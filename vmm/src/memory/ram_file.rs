//! Guest RAM as a file: where a GPA lives in the memfd, punching pages out of it, and dumping
//! all of RAM to a file in the memfd's layout (what migration, snapshots and `--dump-final`
//! compare byte for byte).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::RamRange;

/// A GPA range that does not lie inside one RAM range.
#[derive(Debug, thiserror::Error)]
#[error("GPA range 0x{gpa:x}+0x{len:x} is not guest RAM")]
pub struct NotRam {
    pub gpa: u64,
    pub len: u64,
}

/// The memfd offset of [gpa, gpa+len) when it lies inside one RAM range.
pub fn file_offset(ranges: &[RamRange], gpa: u64, len: u64) -> Result<u64, NotRam> {
    ranges
        .iter()
        .find(|r| gpa >= r.gpa && len <= r.size && gpa - r.gpa <= r.size - len)
        .map(|r| r.file_offset + (gpa - r.gpa))
        .ok_or(NotRam { gpa, len })
}

/// fallocate(PUNCH_HOLE | KEEP_SIZE): the pages read as zeros afterwards and, on a mapping
/// registered with userfaultfd MISSING, fault again.
pub fn punch_hole(memfd: &File, off: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own, with plain integer arguments.
    let rc = unsafe {
        libc::fallocate(
            memfd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Copies all of guest RAM into `path` (same layout as the memfd): the byte-for-byte record the
/// migration tests compare between source and destination.
pub fn dump_ram(memfd: &File, ranges: &[RamRange], path: &std::path::Path) -> std::io::Result<()> {
    dump_with(ranges, path, |r, done, buf| {
        memfd.read_exact_at(buf, r.file_offset + done)
    })
}

/// Copies all of guest RAM into `path` (same layout as the memfd), read through the VMM's own
/// mapping of it, as the guest sees it: under a userfaultfd pager a missing page is brought in
/// by the read itself. The byte-for-byte record of `--dump-final`.
pub fn dump_mapped(
    mem: &crate::memory::GuestMemory,
    ranges: &[RamRange],
    path: &std::path::Path,
) -> std::io::Result<()> {
    use vm_memory::{Bytes, GuestAddress};
    dump_with(ranges, path, |r, done, buf| {
        let gpa = r.gpa + done;
        mem.read_slice(buf, GuestAddress(gpa))
            .map_err(|e| std::io::Error::other(format!("reading 0x{gpa:x}: {e}")))
    })
}

/// Writes every RAM range into `path` at its memfd offset, 1 MiB at a time, as `read` fills it
/// (`read(range, offset in the range, buffer)`).
fn dump_with(
    ranges: &[RamRange],
    path: &std::path::Path,
    mut read: impl FnMut(&RamRange, u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    // A new owner-only file, never through a link (`output`): the dump is guest RAM.
    let out = crate::output::create_new(path).map_err(crate::output::OutputError::into_io)?;
    let mut buf = vec![0u8; 1 << 20];
    for r in ranges {
        let mut done = 0u64;
        while done < r.size {
            let n = (r.size - done).min(buf.len() as u64) as usize;
            read(r, done, &mut buf[..n])?;
            out.write_all_at(&buf[..n], r.file_offset + done)?;
            done += n as u64;
        }
    }
    out.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::PAGE_SIZE;

    fn ranges() -> Vec<RamRange> {
        vec![
            RamRange {
                gpa: 0,
                size: 16 * PAGE_SIZE,
                file_offset: 0,
            },
            RamRange {
                gpa: 1 << 32,
                size: 16 * PAGE_SIZE,
                file_offset: 16 * PAGE_SIZE,
            },
        ]
    }

    #[test]
    fn file_offsets_are_bounds_checked() {
        let r = ranges();
        assert_eq!(file_offset(&r, 0, PAGE_SIZE).unwrap(), 0);
        assert_eq!(
            file_offset(&r, (1 << 32) + PAGE_SIZE, PAGE_SIZE).unwrap(),
            17 * PAGE_SIZE
        );
        assert!(file_offset(&r, 15 * PAGE_SIZE, 2 * PAGE_SIZE).is_err());
        assert!(file_offset(&r, 16 * PAGE_SIZE, PAGE_SIZE).is_err());
        assert!(file_offset(&r, u64::MAX - 10, PAGE_SIZE).is_err());
        assert!(file_offset(&r, 0, u64::MAX).is_err());
    }
}
