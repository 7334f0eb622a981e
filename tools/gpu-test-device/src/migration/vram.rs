//! Which VRAM pages the destination lacks: a digest per page of what was last sent.
//!
//! The device cannot see the CPU writes a VMM makes through its mmap of the VRAM memfd, so a
//! pass reads every page and compares its digest with the one last sent; pages the engines
//! (or vfio-user region writes) wrote are also marked in `Shared::vram_written` and resent
//! whatever their digest. Holes of the sparse memfd (found with SEEK_DATA) read as zero
//! without being touched, so a mostly empty 1 GiB VRAM is neither read nor allocated.

use std::os::fd::RawFd;

use gpu_test_device::pci::PAGE_SIZE;

use crate::engines::PageLog;
use crate::memory::DeviceMemory;
use crate::migration::stream::{
    record, KIND_VRAM_DATA, KIND_VRAM_ZERO, MAX_DATA_PAGES, RECORD_HEADER, VRAM_DATA_HEADER,
};

const PAGE: usize = PAGE_SIZE as usize;

/// A page's digest and whether it is all zero. Four independent multiply-xor lanes over u64
/// words: fast (no dependency chain across lanes) and not fooled by moved or swapped words.
pub fn digest(page: &[u8]) -> (u64, bool) {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut lanes = [K, K.rotate_left(16), K.rotate_left(32), K.rotate_left(48)];
    let mut any = 0;
    for block in page.chunks_exact(32) {
        for (lane, word) in lanes.iter_mut().zip(block.chunks_exact(8)) {
            let mut bytes = [0; 8];
            bytes.copy_from_slice(word);
            let w = u64::from_le_bytes(bytes);
            any |= w;
            *lane = (*lane ^ w).wrapping_mul(K).rotate_left(29);
        }
    }
    let folded = lanes
        .iter()
        .fold(0u64, |h, &lane| (h.rotate_left(17) ^ lane).wrapping_mul(K));
    (folded, any == 0)
}

/// The data extent found at or after `from`: `[from, start)` is a hole, `[start, end)` data.
#[derive(Clone, Copy)]
struct Extent {
    from: u64,
    start: u64,
    end: u64,
}

/// Where the file has data at or after `from` (`size`, `size` when only holes follow).
fn data_extent(fd: RawFd, from: u64, size: u64) -> Extent {
    let seek = |offset: u64, whence| {
        let offset = libc::off_t::try_from(offset).ok()?;
        // SAFETY: lseek on a valid fd touches no memory of ours; it moves the file offset,
        // which neither the device nor the VMM uses (both reach VRAM through mmaps).
        let at = unsafe { libc::lseek(fd, offset, whence) };
        u64::try_from(at).ok()
    };
    match seek(from, libc::SEEK_DATA) {
        Some(start) => Extent {
            from,
            start,
            end: seek(start, libc::SEEK_HOLE).unwrap_or(size),
        },
        // ENXIO: no data from here on.
        None if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => Extent {
            from,
            start: size,
            end: size,
        },
        // No SEEK_DATA: every page counts as data.
        None => Extent {
            from,
            start: from,
            end: size,
        },
    }
}

/// The pages being put together into one record.
enum Run {
    None,
    Zero {
        first: u64,
        count: u64,
    },
    /// A VRAM_DATA record being written at `at` in the output.
    Data {
        at: usize,
        first: u64,
        count: usize,
    },
}

/// Per-page digests of what the destination has, and a scan position.
pub struct VramTracker {
    pages: u64,
    digests: Vec<u64>,
    /// One bit per page sent at least once.
    sent: Vec<u64>,
    unsent: u64,
    cursor: u64,
    /// Pages left in the pass under way (0: none).
    left: u64,
    extent: Option<Extent>,
    run: Run,
}

impl VramTracker {
    /// A tracker for `size` bytes of VRAM, every page still to send.
    pub fn new(size: u64) -> Self {
        let pages = size / PAGE_SIZE;
        Self {
            pages,
            digests: vec![0; pages as usize],
            sent: vec![0; pages.div_ceil(64) as usize],
            unsent: pages,
            cursor: 0,
            left: 0,
            extent: None,
            run: Run::None,
        }
    }

    /// Starts a pass over every page, from where the last one stopped.
    pub fn start_pass(&mut self) {
        self.left = self.pages;
        self.extent = None;
    }

    /// Whether a pass is under way.
    pub fn in_pass(&self) -> bool {
        self.left > 0
    }

    /// Bytes of VRAM known to need sending: pages never sent and pages the engines wrote
    /// (CPU writes show only when a pass reads them).
    pub fn estimate(&self, written: &PageLog) -> u64 {
        (self.unsent + written.count()).min(self.pages) * PAGE_SIZE
    }

    fn is_sent(&self, page: u64) -> bool {
        self.sent[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    fn is_hole(&mut self, fd: RawFd, page: u64) -> bool {
        let offset = page * PAGE_SIZE;
        let size = self.pages * PAGE_SIZE;
        let extent = match self.extent {
            Some(e) if e.from <= offset && offset < e.end => e,
            _ => data_extent(fd, offset, size),
        };
        self.extent = Some(extent);
        offset < extent.start
    }

    /// Scans on until `out` holds at least `want` bytes or the pass ends, appending VRAM
    /// records for the pages that changed since they were last sent.
    pub fn scan(&mut self, vram: &DeviceMemory, written: &PageLog, out: &mut Vec<u8>, want: usize) {
        let mut page_buf = vec![0u8; PAGE];
        let (zero_digest, _) = digest(&page_buf);
        while self.left > 0 && out.len() < want {
            let page = self.cursor;
            // Taken before the read: a write after it marks the page again.
            let marked = written.take(page);
            let hole = !marked && self.is_hole(vram.raw_fd(), page);
            let (sum, zero) = if hole {
                (zero_digest, true)
            } else {
                if let Some(slice) = vram.mapping().slice(page * PAGE_SIZE, PAGE_SIZE) {
                    slice.copy_to(&mut page_buf[..]);
                }
                digest(&page_buf)
            };
            let index = page as usize;
            let changed = !self.is_sent(page) || marked || self.digests[index] != sum;
            if changed {
                if !self.is_sent(page) {
                    self.sent[index / 64] |= 1 << (page % 64);
                    self.unsent -= 1;
                }
                self.digests[index] = sum;
                let data = if zero { None } else { Some(&page_buf[..]) };
                self.add(out, page, data);
            } else {
                self.flush(out);
            }
            self.left -= 1;
            self.cursor = (page + 1) % self.pages;
            if self.cursor == 0 {
                // Runs do not wrap around the end of VRAM.
                self.flush(out);
                self.extent = None;
            }
        }
        self.flush(out);
    }

    /// Adds `page` (its bytes, or `None` for a zero page) to the run, starting a new one
    /// where it does not continue the current.
    fn add(&mut self, out: &mut Vec<u8>, page: u64, data: Option<&[u8]>) {
        let continues = match (&self.run, data) {
            (Run::Zero { first, count }, None) => first + count == page,
            (Run::Data { first, count, .. }, Some(_)) => {
                first + *count as u64 == page && *count < MAX_DATA_PAGES
            }
            _ => false,
        };
        if !continues {
            self.flush(out);
        }
        match (&mut self.run, data) {
            (Run::Zero { count, .. }, None) => *count += 1,
            (Run::Data { count, .. }, Some(bytes)) => {
                out.extend_from_slice(bytes);
                *count += 1;
            }
            (_, None) => {
                self.run = Run::Zero {
                    first: page,
                    count: 1,
                }
            }
            (_, Some(bytes)) => {
                let at = out.len();
                // Length and count are filled in when the run ends.
                record(out, KIND_VRAM_DATA, &[&[0; VRAM_DATA_HEADER]]);
                out[at + RECORD_HEADER..at + RECORD_HEADER + 8]
                    .copy_from_slice(&(page * PAGE_SIZE).to_le_bytes());
                out.extend_from_slice(bytes);
                self.run = Run::Data {
                    at,
                    first: page,
                    count: 1,
                };
            }
        }
    }

    /// Ends the run under way: writes its record, or completes it.
    fn flush(&mut self, out: &mut Vec<u8>) {
        match std::mem::replace(&mut self.run, Run::None) {
            Run::None => {}
            Run::Zero { first, count } => {
                let offset = (first * PAGE_SIZE).to_le_bytes();
                record(out, KIND_VRAM_ZERO, &[&offset, &count.to_le_bytes()]);
            }
            Run::Data { at, count, .. } => {
                let len = (VRAM_DATA_HEADER + count * PAGE) as u32;
                out[at + 4..at + 8].copy_from_slice(&len.to_le_bytes());
                let count_at = at + RECORD_HEADER + 8;
                out[count_at..count_at + 4].copy_from_slice(&(count as u32).to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_sees_any_word_change_and_zero_pages() {
        let mut page = vec![0u8; PAGE];
        let (zero, is_zero) = digest(&page);
        assert!(is_zero);
        page[4095] = 1;
        let (one, is_zero) = digest(&page);
        assert!(!is_zero && one != zero);
        page[4095] = 0;
        page[7] = 0x80;
        assert_ne!(digest(&page).0, one);
        // Words swapped between lanes or positions change the digest.
        let mut a = vec![0u8; PAGE];
        let mut b = vec![0u8; PAGE];
        a[0] = 1;
        b[8] = 1;
        assert_ne!(digest(&a).0, digest(&b).0);
        a[0] = 0;
        a[32] = 1;
        assert_ne!(digest(&a).0, digest(&b).0);
    }
}
