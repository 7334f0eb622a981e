//! Moving guest pages: the source reads them from the guest-RAM memfd (`pread`, so reading
//! never marks a page dirty and a hole reads as zeros without being allocated) and sends runs of
//! non-zero pages as `Pages` frames and runs of zero pages as `Zero` frames; the destination
//! writes them into its memfd (`pwrite`; zero runs punch holes) after bounds-checking every GPA.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::protocol::{FrameWriter, ProtocolError, MAX_PAGES_PER_FRAME, PAGE_SIZE};
use super::rate::RateLimiter;
use crate::memory::RamRange;

#[derive(Debug, thiserror::Error)]
pub enum PagesError {
    #[error("GPA range 0x{gpa:x}+0x{len:x} is not guest RAM")]
    NotRam { gpa: u64, len: u64 },
    #[error("reading guest RAM at 0x{gpa:x}: {source}")]
    Read { gpa: u64, source: std::io::Error },
    #[error("writing guest RAM at 0x{gpa:x}: {source}")]
    Write { gpa: u64, source: std::io::Error },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// The memfd offset of [gpa, gpa+len) when it lies inside one RAM range.
pub fn file_offset(ranges: &[RamRange], gpa: u64, len: u64) -> Result<u64, PagesError> {
    ranges
        .iter()
        .find(|r| gpa >= r.gpa && len <= r.size && gpa - r.gpa <= r.size - len)
        .map(|r| r.file_offset + (gpa - r.gpa))
        .ok_or(PagesError::NotRam { gpa, len })
}

/// Counts of one batch of sends.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    pub pages: u64,
    pub zero_pages: u64,
}

impl std::ops::AddAssign for Sent {
    fn add_assign(&mut self, o: Sent) {
        self.pages += o.pages;
        self.zero_pages += o.zero_pages;
    }
}

fn is_zero(page: &[u8]) -> bool {
    let (pre, words, post) = // SAFETY: every bit pattern is a valid u64.
        unsafe { page.align_to::<u64>() };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Reads guest pages and sends them.
pub struct PageSender<'a> {
    pub memfd: &'a File,
    pub ranges: &'a [RamRange],
    buf: Vec<u8>,
}

impl<'a> PageSender<'a> {
    pub fn new(memfd: &'a File, ranges: &'a [RamRange]) -> Self {
        PageSender {
            memfd,
            ranges,
            buf: vec![0; MAX_PAGES_PER_FRAME * PAGE_SIZE as usize],
        }
    }

    /// How many of the `pages` pages from `gpa` lie in a hole of the memfd (SEEK_DATA finds
    /// the next allocated byte; shmem answers it from its page cache).
    fn hole_pages(&self, gpa: u64, pages: u64) -> Result<u64, PagesError> {
        let off = file_offset(self.ranges, gpa, PAGE_SIZE)?;
        // SAFETY: lseek on a descriptor we own, with plain integer arguments.
        let data =
            unsafe { libc::lseek(self.memfd.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data at or after `off`: the rest of the file is a hole.
                Some(libc::ENXIO) => Ok(pages),
                // A file system without SEEK_DATA: read everything.
                _ => Ok(0),
            };
        }
        let hole = (data as u64).saturating_sub(off) / PAGE_SIZE;
        Ok(hole.min(pages))
    }

    /// Sends `pages` pages from `gpa`, in frames of at most MAX_PAGES_PER_FRAME, zero runs as
    /// `Zero` frames.
    pub fn send_run<W: Write>(
        &mut self,
        w: &mut FrameWriter<W>,
        rate: &mut RateLimiter,
        gpa: u64,
        pages: u64,
    ) -> Result<Sent, PagesError> {
        let mut sent = Sent::default();
        let mut done = 0;
        while done < pages {
            let at = gpa + done * PAGE_SIZE;
            // Holes in the memfd (never-touched RAM) are zero without reading them.
            let hole = self.hole_pages(at, pages - done)?;
            if hole > 0 {
                w.send(&super::protocol::Message::Zero {
                    gpa: at,
                    pages: hole,
                })?;
                sent.zero_pages += hole;
                rate.account(32);
                done += hole;
                continue;
            }
            let n = (pages - done).min(MAX_PAGES_PER_FRAME as u64);
            let len = n * PAGE_SIZE;
            let off = file_offset(self.ranges, at, len)?;
            let buf = &mut self.buf[..len as usize];
            self.memfd
                .read_exact_at(buf, off)
                .map_err(|source| PagesError::Read { gpa: at, source })?;
            // Split the chunk into alternating runs of zero and non-zero pages.
            let mut i = 0u64;
            while i < n {
                let zero = is_zero(&buf[(i * PAGE_SIZE) as usize..((i + 1) * PAGE_SIZE) as usize]);
                let mut j = i + 1;
                while j < n
                    && is_zero(&buf[(j * PAGE_SIZE) as usize..((j + 1) * PAGE_SIZE) as usize])
                        == zero
                {
                    j += 1;
                }
                let run_gpa = at + i * PAGE_SIZE;
                if zero {
                    w.send(&super::protocol::Message::Zero {
                        gpa: run_gpa,
                        pages: j - i,
                    })?;
                    sent.zero_pages += j - i;
                    rate.account(32);
                } else {
                    let bytes = &buf[(i * PAGE_SIZE) as usize..(j * PAGE_SIZE) as usize];
                    w.send_pages(run_gpa, bytes)?;
                    sent.pages += j - i;
                    rate.account(bytes.len() as u64);
                }
                i = j;
            }
            done += n;
        }
        Ok(sent)
    }
}

/// Writes received pages into guest RAM (the memfd) on the destination.
pub fn write_pages(
    memfd: &File,
    ranges: &[RamRange],
    gpa: u64,
    data: &[u8],
) -> Result<(), PagesError> {
    let off = file_offset(ranges, gpa, data.len() as u64)?;
    memfd
        .write_all_at(data, off)
        .map_err(|source| PagesError::Write { gpa, source })
}

/// Makes `pages` pages from `gpa` zero by punching a hole (frees the memory, reads as zeros).
pub fn zero_pages(
    memfd: &File,
    ranges: &[RamRange],
    gpa: u64,
    pages: u64,
) -> Result<(), PagesError> {
    let len = pages
        .checked_mul(PAGE_SIZE)
        .ok_or(PagesError::NotRam { gpa, len: u64::MAX })?;
    let off = file_offset(ranges, gpa, len)?;
    punch_hole(memfd, off, len).map_err(|source| PagesError::Write { gpa, source })
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
    let out = File::create(path)?;
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

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE_SIZE as usize];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        assert!(is_zero(&p[1..4095]));
    }

    #[test]
    fn holes_are_found_without_reading() {
        let ram = crate::memory::GuestRam::new(8 << 20).unwrap();
        let memfd = ram.file();
        memfd.write_all_at(&[7u8; 4096], 3 * PAGE_SIZE).unwrap();
        let sender = PageSender::new(memfd, ram.ranges());
        assert_eq!(sender.hole_pages(0, 10).unwrap(), 3);
        assert_eq!(sender.hole_pages(0, 2).unwrap(), 2);
        assert_eq!(sender.hole_pages(3 * PAGE_SIZE, 10).unwrap(), 0);
        assert_eq!(sender.hole_pages(4 * PAGE_SIZE, 6).unwrap(), 6);
        // And a whole run over that layout sends one data page, the rest as zero ranges.
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out);
        let mut s2 = PageSender::new(memfd, ram.ranges());
        let sent = s2
            .send_run(&mut w, &mut RateLimiter::new(None), 0, 16)
            .unwrap();
        assert_eq!((sent.pages, sent.zero_pages), (1, 15));
    }
}
