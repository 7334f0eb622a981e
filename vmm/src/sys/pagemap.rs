//! `/proc/self/pagemap`: per-page entries (pread) and the `PAGEMAP_SCAN` ioctl (6.7+), which
//! with a WP_ASYNC userfaultfd reports written pages and write-protects them again in one call.
//! Also soft-dirty (`clear_refs`), which needs CONFIG_MEM_SOFT_DIRTY; see `soft_dirty_self_test`.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;

use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use super::{page_size, SysError};

/// Private so the generated ioctl-number function does not become public API.
mod nr {
    vmm_sys_util::ioctl_iowr_nr!(PAGEMAP_SCAN, 0x66 /* 'f' */, 16, super::PmScanArg);
}

/// struct pm_scan_arg from include/uapi/linux/fs.h.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    /// Written by the kernel: where the walk stopped (== end when it covered the whole range).
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

/// struct page_region: pages [start, end) share `categories`.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

const _: () = assert!(std::mem::size_of::<PmScanArg>() == 96);
const _: () = assert!(std::mem::size_of::<PageRegion>() == 24);

/// Write-protect the pages reported, atomically with reporting them.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail (EPERM) if part of the range is not registered with a WP_ASYNC userfaultfd.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub const PAGE_IS_HUGE: u64 = 1 << 6;
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;
pub const PAGE_IS_GUARD: u64 = 1 << 8;

// Bits of a /proc/PID/pagemap entry (Documentation/admin-guide/mm/pagemap.rst).
pub const PM_SOFT_DIRTY: u64 = 1 << 55;
pub const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;
pub const PM_UFFD_WP: u64 = 1 << 57;
pub const PM_FILE: u64 = 1 << 61;
pub const PM_SWAP: u64 = 1 << 62;
pub const PM_PRESENT: u64 = 1 << 63;

/// Regions fetched per PAGEMAP_SCAN call; the scan resumes from walk_end when they run out.
const SCAN_BUF_REGIONS: usize = 1024;

/// This process's pagemap. One open file serves any number of reads and scans.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    pub fn open_self() -> Result<Pagemap, SysError> {
        let file = File::open("/proc/self/pagemap")
            .map_err(|e| SysError::os("open /proc/self/pagemap", e))?;
        Ok(Pagemap { file })
    }

    /// Appends to `out` the regions of [start, end) written since they were last protected
    /// (PAGE_IS_WRITTEN). With `reprotect`, the kernel write-protects exactly what it reports
    /// in the same walk, and fails with EPERM on memory not registered with a WP_ASYNC uffd.
    /// Regions this call produces are merged when adjacent (whatever the internal buffer size);
    /// entries already in `out` are never touched.
    pub fn scan_written(
        &self,
        start: u64,
        end: u64,
        reprotect: bool,
        out: &mut Vec<PageRegion>,
    ) -> Result<(), SysError> {
        let mut buf = vec![PageRegion::default(); SCAN_BUF_REGIONS];
        self.scan_written_buf(start, end, reprotect, out, &mut buf)
    }

    fn scan_written_buf(
        &self,
        start: u64,
        end: u64,
        reprotect: bool,
        out: &mut Vec<PageRegion>,
        buf: &mut [PageRegion],
    ) -> Result<(), SysError> {
        let page = page_size() as u64;
        if start % page != 0 || end % page != 0 {
            return Err(SysError::Invalid(format!(
                "PAGEMAP_SCAN range {start:#x}..{end:#x} is not page aligned"
            )));
        }
        if start > end {
            return Err(SysError::Invalid(format!(
                "PAGEMAP_SCAN range {start:#x}..{end:#x} is reversed"
            )));
        }
        let flags = if reprotect {
            PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC
        } else {
            0
        };
        let first_new = out.len();
        let mut cur = start;
        while cur < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags,
                start: cur,
                end,
                vec: buf.as_mut_ptr() as u64,
                vec_len: buf.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            // SAFETY: `arg` is a struct pm_scan_arg; `vec` points to `buf.len()` writable
            // page_region slots, which is all the kernel fills. The scanned range is only read
            // (and possibly write-protected) by the kernel, never touched as Rust memory here.
            let n = unsafe { ioctl_with_mut_ref(&self.file, nr::PAGEMAP_SCAN(), &mut arg) };
            let n = usize::try_from(n).map_err(|_| SysError::last_os("PAGEMAP_SCAN"))?;
            let regions = buf.get(..n).ok_or_else(|| {
                SysError::Invalid(format!(
                    "PAGEMAP_SCAN returned {n} regions for {}",
                    buf.len()
                ))
            })?;
            for r in regions {
                match out[first_new..].last_mut() {
                    Some(last) if last.end == r.start && last.categories == r.categories => {
                        last.end = r.end
                    }
                    _ => out.push(*r),
                }
            }
            // The kernel stops early only when the vector is full; it must have moved on.
            if arg.walk_end <= cur {
                return Err(SysError::Invalid(format!(
                    "PAGEMAP_SCAN made no progress at {cur:#x} (walk_end {:#x})",
                    arg.walk_end
                )));
            }
            cur = arg.walk_end;
        }
        Ok(())
    }

    /// Replaces the contents of `out` with the pagemap entries (PM_* bits) of `pages` pages
    /// starting at the page that contains `start`.
    pub fn read_entries(
        &self,
        start: u64,
        pages: usize,
        out: &mut Vec<u64>,
    ) -> Result<(), SysError> {
        out.clear();
        let bytes = pages
            .checked_mul(8)
            .ok_or_else(|| SysError::Invalid(format!("{pages} pagemap entries")))?;
        let mut raw = vec![0u8; bytes];
        self.file
            .read_exact_at(&mut raw, start / page_size() as u64 * 8)
            .map_err(|e| SysError::os("pread /proc/self/pagemap", e))?;
        out.extend(raw.chunks_exact(8).map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_ne_bytes(b)
        }));
        Ok(())
    }
}

/// Clears the soft-dirty bits of the whole process. Succeeds even where CONFIG_MEM_SOFT_DIRTY
/// is off (as on the PVM hosts), in which case the bits are simply never set.
pub fn clear_soft_dirty() -> Result<(), SysError> {
    OpenOptions::new()
        .write(true)
        .open("/proc/self/clear_refs")
        .and_then(|mut f| f.write_all(b"4"))
        .map_err(|e| SysError::os("write 4 > /proc/self/clear_refs", e))
}

/// Whether soft-dirty tracking really works here: a page written after clear_soft_dirty must
/// show PM_SOFT_DIRTY. Ok(false) means the kernel accepts clear_refs but does not track.
pub fn soft_dirty_self_test() -> Result<bool, SysError> {
    let page = page_size();
    // SAFETY: a fresh private anonymous page chosen by the kernel; nothing else refers to it.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(SysError::last_os("mmap(soft-dirty probe)"));
    }
    let write = |v: u8| {
        // SAFETY: the first byte of the page mapped above, which stays mapped until munmap below.
        unsafe { std::ptr::write_volatile(ptr.cast::<u8>(), v) }
    };
    let result = (|| -> Result<bool, SysError> {
        let pagemap = Pagemap::open_self()?;
        write(1);
        clear_soft_dirty()?;
        write(2);
        let mut entry = Vec::with_capacity(1);
        pagemap.read_entries(ptr as u64, 1, &mut entry)?;
        Ok(entry.first().is_some_and(|e| e & PM_SOFT_DIRTY != 0))
    })();
    // SAFETY: unmaps the page mapped above; `write` is not used past this point.
    unsafe { libc::munmap(ptr, page) };
    result
}

#[cfg(test)]
mod tests;
