//! Moving guest pages: the source reads them from the guest-RAM memfd (`pread`, so reading
//! never marks a page dirty and a hole reads as zeros without being allocated) and sends runs of
//! non-zero pages as `Pages` frames and runs of zero pages as `Zero` frames; the destination
//! writes them into its memfd (`pwrite`; zero runs punch holes) after bounds-checking every GPA.
//!
//! While nothing can write guest RAM (every vCPU paused, devices stopped: the stop-and-copy, or
//! a guest its user paused and that has no device), the source skips the copy: it checks and
//! checksums the pages where they are mapped and sends them from there ([`FrozenRam`]), one
//! copy fewer per page. It cannot while the guest runs: a page written between its checksum
//! and its send would arrive with a checksum that no longer matches, and fail the migration.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use super::protocol::{FrameWriter, ProtocolError, MAX_PAGES_PER_FRAME, PAGE_SIZE};
use super::rate::RateLimiter;
use crate::memory::ram_file::{file_offset, punch_hole, NotRam};
use crate::memory::RamRange;

#[derive(Debug, thiserror::Error)]
pub enum PagesError {
    #[error(transparent)]
    NotRam(#[from] NotRam),
    #[error("reading guest RAM at 0x{gpa:x}: {source}")]
    Read { gpa: u64, source: std::io::Error },
    #[error("writing guest RAM at 0x{gpa:x}: {source}")]
    Write { gpa: u64, source: std::io::Error },
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
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

/// Guest RAM as this process maps it, while nothing writes it: sends read it in place.
#[derive(Clone, Copy)]
pub struct FrozenRam<'a> {
    memory: &'a crate::memory::GuestMemory,
}

impl<'a> FrozenRam<'a> {
    /// # Safety
    /// While the value (or a copy) is used, nothing may write guest RAM: every vCPU is parked
    /// and every device that can write it (DMA) is stopped, for as long as `memory` lives.
    pub unsafe fn new(memory: &'a crate::memory::GuestMemory) -> FrozenRam<'a> {
        FrozenRam { memory }
    }

    /// How many of the `pages` pages from `gpa` (at most MAX_PAGES_PER_FRAME) are in memory,
    /// in a row from the first (mincore: a bounded look, where SEEK_HOLE would walk the file
    /// to its next hole). In-place sends read only those: reading a hole through the mapping
    /// would allocate it, and a swapped-out page is better read with `pread`.
    fn resident_pages(&self, gpa: u64, pages: u64) -> u64 {
        let pages = pages.min(MAX_PAGES_PER_FRAME as u64);
        let Some(slice) = self.slice(gpa, pages * PAGE_SIZE) else {
            return 0;
        };
        let mut vec = [0u8; MAX_PAGES_PER_FRAME];
        // SAFETY: mincore reads no memory; the range is a page-aligned part of our mapping
        // (gpa is page aligned, regions start page aligned) and `vec` has a byte per page.
        let rc = unsafe {
            libc::mincore(
                slice.as_ptr() as *mut libc::c_void,
                slice.len(),
                vec.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return 0;
        }
        vec[..pages as usize]
            .iter()
            .take_while(|&&b| b & 1 == 1)
            .count() as u64
    }

    /// `len` bytes of guest RAM from `gpa`, if one region holds them all.
    fn slice(&self, gpa: u64, len: u64) -> Option<&'a [u8]> {
        use vm_memory::{
            Address as _, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion as _,
        };
        let region = self.memory.find_region(GuestAddress(gpa))?;
        let start = gpa.checked_sub(region.start_addr().raw_value())?;
        if start.checked_add(len)? > region.len() {
            return None;
        }
        let len = usize::try_from(len).ok()?;
        // SAFETY: the range lies inside the region (checked above), which stays mapped while
        // `memory` lives ('a); by `new`'s contract nothing writes it meanwhile, so a shared
        // slice over it is sound.
        Some(unsafe { std::slice::from_raw_parts(region.as_ptr().add(start as usize), len) })
    }
}

/// Where a sender reads guest RAM: the memfd and its layout, and in place while it is frozen.
#[derive(Clone, Copy)]
pub struct RamView<'a> {
    pub memfd: &'a File,
    pub ranges: &'a [RamRange],
    pub frozen: Option<FrozenRam<'a>>,
}

/// Reads guest pages and sends them.
pub struct PageSender<'a> {
    pub memfd: &'a File,
    pub ranges: &'a [RamRange],
    buf: Vec<u8>,
    frozen: Option<FrozenRam<'a>>,
}

impl<'a> PageSender<'a> {
    pub fn new(memfd: &'a File, ranges: &'a [RamRange]) -> Self {
        Self::with_buffer(memfd, ranges, Vec::new())
    }

    /// Reads through `buf` (grown to a frame's size if smaller): a data channel keeps its
    /// buffer from round to round.
    pub fn with_buffer(memfd: &'a File, ranges: &'a [RamRange], mut buf: Vec<u8>) -> Self {
        buf.resize(MAX_PAGES_PER_FRAME * PAGE_SIZE as usize, 0);
        PageSender {
            memfd,
            ranges,
            buf,
            frozen: None,
        }
    }

    /// Sends from guest RAM in place while `frozen` is Some (see the module comment), by
    /// copying through the buffer otherwise.
    pub fn set_frozen(&mut self, frozen: Option<FrozenRam<'a>>) {
        self.frozen = frozen;
    }

    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
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
            let mut n = (pages - done).min(MAX_PAGES_PER_FRAME as u64);
            let in_place = match self.frozen {
                Some(frozen) => match frozen.resident_pages(at, n) {
                    0 => None,
                    data => {
                        n = data;
                        frozen.slice(at, n * PAGE_SIZE)
                    }
                },
                None => None,
            };
            let len = n * PAGE_SIZE;
            let buf: &[u8] = match in_place {
                Some(b) => b,
                None => {
                    let off = file_offset(self.ranges, at, len)?;
                    let buf = &mut self.buf[..len as usize];
                    self.memfd
                        .read_exact_at(buf, off)
                        .map_err(|source| PagesError::Read { gpa: at, source })?;
                    buf
                }
            };
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
        .ok_or(NotRam { gpa, len: u64::MAX })?;
    let off = file_offset(ranges, gpa, len)?;
    punch_hole(memfd, off, len).map_err(|source| PagesError::Write { gpa, source })
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn frozen_ram_sent_in_place_gives_the_same_ram_and_holes_stay_holes() {
        let ram = crate::memory::GuestRam::new(8 << 20).unwrap();
        let memfd = ram.file();
        // Data, a zero page that is allocated, data, then a hole, then data past 1 MiB.
        memfd.write_all_at(&[7u8; 4096], 0).unwrap();
        memfd.write_all_at(&[0u8; 4096], PAGE_SIZE).unwrap();
        memfd.write_all_at(&[9u8; 8192], 2 * PAGE_SIZE).unwrap();
        memfd.write_all_at(&[5u8; 4096], 300 * PAGE_SIZE).unwrap();
        let allocated = |f: &File| {
            use std::os::unix::fs::MetadataExt;
            f.metadata().unwrap().blocks()
        };
        let before = allocated(memfd);
        let frames = |frozen: bool| {
            let mut out = Vec::new();
            let mut w = FrameWriter::new(&mut out);
            let mut s = PageSender::new(memfd, ram.ranges());
            // SAFETY: nothing else touches this RAM in this test.
            s.set_frozen(frozen.then(|| unsafe { FrozenRam::new(ram.memory()) }));
            let sent = s
                .send_run(&mut w, &mut RateLimiter::new(None), 0, 2048)
                .unwrap();
            assert_eq!((sent.pages, sent.zero_pages), (4, 2044));
            out
        };
        // What a destination would hold after each stream (frame boundaries may differ: in
        // place, a chunk stops at the next hole).
        let image = |stream: Vec<u8>| {
            let mut img = vec![0xaau8; 8 << 20];
            let mut r = super::super::protocol::FrameReader::new(&stream[..]);
            loop {
                match r.recv() {
                    Ok(super::super::protocol::Message::Pages { gpa, data }) => {
                        img[gpa as usize..gpa as usize + data.len()].copy_from_slice(&data)
                    }
                    Ok(super::super::protocol::Message::Zero { gpa, pages }) => {
                        img[gpa as usize..(gpa + pages * PAGE_SIZE) as usize].fill(0)
                    }
                    Ok(other) => panic!("unexpected {}", other.name()),
                    Err(_) => break,
                }
            }
            img
        };
        let copied = image(frames(false));
        assert!(copied[..4096].iter().all(|&b| b == 7));
        assert!(
            image(frames(true)) == copied,
            "in place and copied give the same RAM"
        );
        // Reading in place never filled a hole (it would allocate the page).
        assert_eq!(allocated(memfd), before);
    }
}
