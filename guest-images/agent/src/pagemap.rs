//! DMA buffers for a device behind no-IOMMU VFIO: locked anonymous memory whose pages' physical
//! addresses come from /proc/self/pagemap (the device sees guest physical addresses; the host
//! VMM maps all guest RAM for DMA at IOVA = GPA).
//!
//! A pagemap entry is a little-endian u64 per virtual page: bit 63 present, bit 62 swapped,
//! bits 0-54 the page frame number (reads as 0 without CAP_SYS_ADMIN).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::ptr;

const PAGEMAP: &str = "/proc/self/pagemap";
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const PFN_MASK: u64 = (1 << 55) - 1;
/// The x86 huge page a hugetlb buffer is made of.
pub const HUGE_PAGE: usize = 2 << 20;

pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .unwrap_or(4096)
}

/// The page frame number in a pagemap entry, if the page is in memory and its frame shown.
pub fn pfn(entry: u64) -> Result<u64, String> {
    if entry & PRESENT == 0 {
        return Err(if entry & SWAPPED != 0 {
            "page swapped out".into()
        } else {
            "page not present".into()
        });
    }
    match entry & PFN_MASK {
        0 => Err("page frame hidden (pagemap needs CAP_SYS_ADMIN)".into()),
        pfn => Ok(pfn),
    }
}

/// A physically contiguous piece of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Byte offset in the buffer.
    pub offset: usize,
    pub phys: u64,
    pub len: usize,
}

/// Splits a buffer of `len` bytes whose pages have frames `pfns` into physically contiguous
/// segments, in buffer order.
pub fn segments(pfns: &[u64], page: usize, len: usize) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    for (i, &pfn) in pfns.iter().enumerate() {
        let offset = i * page;
        if offset >= len {
            break;
        }
        let piece = page.min(len - offset);
        let phys = pfn * page as u64;
        match out.last_mut() {
            Some(s) if s.phys + s.len as u64 == phys => s.len += piece,
            _ => out.push(Segment {
                offset,
                phys,
                len: piece,
            }),
        }
    }
    out
}

/// The longest run of physically consecutive frames among `pfns` (in any buffer order), at
/// most `max` long: its first frame, and the buffer page holding each of its frames in order.
pub fn longest_run(pfns: &[u64], max: usize) -> Option<(u64, Vec<usize>)> {
    let mut by_frame: Vec<(u64, usize)> = pfns.iter().copied().zip(0..).collect();
    by_frame.sort_unstable();
    by_frame.dedup_by_key(|(pfn, _)| *pfn);
    let (mut best, mut best_len) = (0, 0);
    let mut start = 0;
    for i in 0..by_frame.len() {
        if i > start && by_frame[i].0 != by_frame[i - 1].0 + 1 {
            start = i;
        }
        if i + 1 - start > best_len {
            (best, best_len) = (start, i + 1 - start);
        }
    }
    let run = by_frame.get(best..best + best_len.min(max))?;
    let first = run.first()?.0;
    Some((first, run.iter().map(|&(_, page)| page).collect()))
}

/// Locked, zeroed anonymous memory with the frame of every page.
pub struct DmaBuffer {
    ptr: *mut u8,
    len: usize,
    page: usize,
    pfns: Vec<u64>,
}

impl DmaBuffer {
    pub fn new(len: usize) -> Result<DmaBuffer, String> {
        Self::with_flags(len, 0)
    }

    /// A buffer of 2 MiB hugetlb pages (each physically contiguous), if the guest kernel has
    /// HugeTLB and a free page in its pool; `len` a multiple of [`HUGE_PAGE`].
    pub fn new_huge(len: usize) -> Result<DmaBuffer, String> {
        if len == 0 || len % HUGE_PAGE != 0 {
            return Err(format!(
                "hugetlb buffer size {len} is not a multiple of 2 MiB"
            ));
        }
        Self::with_flags(len, libc::MAP_HUGETLB | libc::MAP_HUGE_2MB)
    }

    fn with_flags(len: usize, flags: libc::c_int) -> Result<DmaBuffer, String> {
        let page = page_size();
        let map_len = len
            .checked_next_multiple_of(page)
            .filter(|&l| l > 0)
            .ok_or_else(|| format!("bad DMA buffer size {len}"))?;
        // SAFETY: a new private anonymous mapping; nothing else refers to it.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "mmap {map_len} bytes: {}",
                std::io::Error::last_os_error()
            ));
        }
        let mut buf = DmaBuffer {
            ptr: ptr.cast(),
            len,
            page,
            pfns: Vec::new(),
        };
        // Locked (and so faulted in) before the frames are read; with no swap and no
        // compaction in the guest kernel the frames then stay put (`check_frames` verifies).
        // SAFETY: locks exactly our mapping.
        if unsafe { libc::mlock(ptr, map_len) } != 0 {
            return Err(format!("mlock: {}", std::io::Error::last_os_error()));
        }
        buf.fill(0);
        buf.pfns = buf.read_frames()?;
        Ok(buf)
    }

    fn pages(&self) -> usize {
        self.len.div_ceil(self.page)
    }

    fn read_frames(&self) -> Result<Vec<u64>, String> {
        let file = File::open(PAGEMAP).map_err(|e| format!("{PAGEMAP}: {e}"))?;
        let mut raw = vec![0u8; self.pages() * 8];
        let first = (self.ptr as usize / self.page) as u64 * 8;
        file.read_exact_at(&mut raw, first)
            .map_err(|e| format!("{PAGEMAP}: {e}"))?;
        raw.chunks_exact(8)
            .enumerate()
            .map(|(i, b)| {
                let entry = u64::from_le_bytes(b.try_into().unwrap_or_default());
                pfn(entry).map_err(|e| format!("DMA buffer page {i}: {e}"))
            })
            .collect()
    }

    /// Fails if any page moved since the buffer was made (the device would have used stale
    /// addresses).
    pub fn check_frames(&self) -> Result<(), String> {
        if self.read_frames()? == self.pfns {
            Ok(())
        } else {
            Err("DMA buffer pages moved".into())
        }
    }

    pub fn pfns(&self) -> &[u64] {
        &self.pfns
    }

    pub fn page_bytes(&self) -> usize {
        self.page
    }

    pub fn segments(&self) -> Vec<Segment> {
        segments(&self.pfns, self.page, self.len)
    }

    pub fn fill(&mut self, byte: u8) {
        // SAFETY: our mapping holds at least `len` bytes.
        unsafe { ptr::write_bytes(self.ptr, byte, self.len) };
    }

    /// Copies `src` in at offset 0 (`src` no longer than the buffer).
    pub fn write(&mut self, src: &[u8]) {
        let n = src.len().min(self.len);
        // SAFETY: `n` bytes fit in both; the buffers are distinct.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), self.ptr, n) };
    }

    /// Copies `src` in at byte `at`; false (nothing copied) if it does not fit.
    pub fn write_at(&mut self, at: usize, src: &[u8]) -> bool {
        if at.checked_add(src.len()).is_none_or(|end| end > self.len) {
            return false;
        }
        // SAFETY: `at + src.len()` bytes fit in our mapping (checked); the buffers are distinct.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(at), src.len()) };
        true
    }

    /// A plain memcpy of `len` bytes from `src` to `dst` within the buffer (the two ranges
    /// apart); false (nothing copied) if they overlap or do not fit.
    pub fn copy_within(&mut self, src: usize, dst: usize, len: usize) -> bool {
        let fits = |at: usize| at.checked_add(len).is_some_and(|end| end <= self.len);
        let apart = src.checked_add(len).is_some_and(|e| e <= dst)
            || dst.checked_add(len).is_some_and(|e| e <= src);
        if !fits(src) || !fits(dst) || !apart {
            return false;
        }
        // SAFETY: both ranges lie inside our mapping (checked) and do not overlap (checked).
        unsafe { ptr::copy_nonoverlapping(self.ptr.add(src), self.ptr.add(dst), len) };
        true
    }

    /// `len` bytes at `at`, read with volatile loads (a device wrote them); None beyond the end.
    pub fn read_at(&self, at: usize, len: usize) -> Option<Vec<u8>> {
        if at.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: every index is below `at + len <= self.len`, inside our mapping.
        Some(
            (at..at + len)
                .map(|i| unsafe { ptr::read_volatile(self.ptr.add(i)) })
                .collect(),
        )
    }

    /// The contents, read with volatile loads: a device may have written them behind the
    /// compiler's back.
    pub fn read(&self) -> Vec<u8> {
        // SAFETY: every byte index is below `len`, inside our mapping.
        (0..self.len)
            .map(|i| unsafe { ptr::read_volatile(self.ptr.add(i)) })
            .collect()
    }

    /// The little-endian u64 at byte `at` (8-aligned, inside the buffer), read volatile.
    pub fn read_u64(&self, at: usize) -> Option<u64> {
        if at % 8 != 0 || at.checked_add(8)? > self.len {
            return None;
        }
        // SAFETY: aligned (the mapping is page-aligned) and in bounds (checked above).
        Some(u64::from_le(unsafe {
            ptr::read_volatile(self.ptr.add(at).cast::<u64>())
        }))
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly our mapping (which also unlocks it).
        unsafe { libc::munmap(self.ptr.cast(), self.pages() * self.page) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_pagemap_entries() {
        assert_eq!(pfn(PRESENT | 0x1234), Ok(0x1234));
        assert_eq!(pfn(PRESENT | 1 << 55 | 0x1234), Ok(0x1234)); // soft-dirty etc. ignored
        assert_eq!(pfn(PRESENT | PFN_MASK), Ok(PFN_MASK));
        assert!(pfn(0x1234).expect_err("absent").contains("not present"));
        assert!(pfn(SWAPPED | 0x1234).expect_err("swap").contains("swapped"));
        assert!(pfn(PRESENT).expect_err("hidden").contains("CAP_SYS_ADMIN"));
    }

    #[test]
    fn merges_physically_contiguous_pages() {
        let segs = segments(&[10, 11, 12, 40, 38, 39], 4096, 6 * 4096 - 100);
        assert_eq!(
            segs,
            [
                Segment {
                    offset: 0,
                    phys: 10 * 4096,
                    len: 3 * 4096
                },
                Segment {
                    offset: 3 * 4096,
                    phys: 40 * 4096,
                    len: 4096
                },
                Segment {
                    offset: 4 * 4096,
                    phys: 38 * 4096,
                    len: 2 * 4096 - 100
                },
            ]
        );
        assert_eq!(
            segments(&[5, 6], 4096, 100),
            [Segment {
                offset: 0,
                phys: 5 * 4096,
                len: 100
            }]
        );
        assert_eq!(segments(&[], 4096, 0), []);
    }

    #[test]
    fn finds_the_longest_run_in_any_order() {
        // Frames 20..=23 sit at buffer pages 4, 1, 3, 5 (in frame order); 7, 8 is shorter.
        let pfns = [7, 21, 8, 22, 20, 23, 99];
        assert_eq!(longest_run(&pfns, 100), Some((20, vec![4, 1, 3, 5])));
        assert_eq!(longest_run(&pfns, 2), Some((20, vec![4, 1])));
        assert_eq!(longest_run(&[5], 8), Some((5, vec![0])));
        assert_eq!(longest_run(&[], 8), None);
        assert_eq!(longest_run(&[3, 3, 4], 8), Some((3, vec![0, 2])));
    }

    #[test]
    fn hugetlb_buffers_need_whole_huge_pages() {
        assert!(DmaBuffer::new_huge(4096).is_err());
        assert!(DmaBuffer::new_huge(0).is_err());
    }

    #[test]
    fn a_buffer_knows_its_frames_when_allowed_to() {
        // Frames are hidden without CAP_SYS_ADMIN: then making the buffer must fail cleanly.
        match DmaBuffer::new(3 * 4096 + 5) {
            Ok(mut buf) => {
                assert_eq!(buf.pfns().len(), 4);
                buf.write(&[1, 2, 3, 4, 5, 6, 7, 8]);
                assert_eq!(buf.read_u64(0), Some(0x0807_0605_0403_0201));
                assert_eq!(buf.read_u64(2 * 4096), Some(0));
                assert_eq!(buf.read_u64(3 * 4096), None); // 5 bytes left
                assert_eq!(buf.read_u64(4), None);
                assert_eq!(buf.read().len(), 3 * 4096 + 5);
                assert!(buf.write_at(4096, &[9, 9]));
                assert!(!buf.write_at(3 * 4096 + 4, &[9, 9]));
                assert_eq!(buf.read_at(4095, 3), Some(vec![0, 9, 9]));
                assert_eq!(buf.read_at(3 * 4096, 6), None);
                assert!(buf.copy_within(4095, 8192, 3));
                assert_eq!(buf.read_at(8192, 3), Some(vec![0, 9, 9]));
                assert!(!buf.copy_within(0, 100, 200)); // overlapping
                assert!(!buf.copy_within(0, 3 * 4096, 8)); // past the end
                buf.check_frames().expect("frames stay");
                let total: usize = buf.segments().iter().map(|s| s.len).sum();
                assert_eq!(total, 3 * 4096 + 5);
            }
            Err(e) => assert!(e.contains("CAP_SYS_ADMIN") || e.contains("mlock"), "{e}"),
        }
    }
}
