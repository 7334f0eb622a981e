//! DMA logging (vfio-user DEVICE_FEATURE, DMA_LOGGING_START/STOP/REPORT): the guest-RAM pages
//! the device's engines wrote, as a GPU with dirty tracking reports them for live migration.
//!
//! While started, every write of the DMA engine (VRAM->RAM) and the page writer sets the bit
//! of each logged page it touched, after the bytes landed. A report hands out and clears the
//! bits of its window, at the page size it asks (bits merged or replicated from the logging
//! page size), as the kernel's DMA_LOGGING_REPORT does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use gpu_test_device::pci::PAGE_SIZE;
use vfio_user::DmaLoggingRange;

/// The most pages all started ranges may cover together, at the logging page size (2 MiB of
/// bitmap; 64 GiB of 4 KiB pages).
pub const MAX_LOGGED_PAGES: u64 = 1 << 24;

/// Refused DMA logging requests; each answers the client with an errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    #[error("page size {0:#x} is not a power of two of at least 4 KiB")]
    PageSize(u64),
    #[error("DMA_LOGGING_START without ranges")]
    NoRanges,
    #[error("range {iova:#x}+{length:#x} is empty, wraps or is not aligned to {page_size:#x}")]
    BadRange {
        iova: u64,
        length: u64,
        page_size: u64,
    },
    #[error("ranges at {0:#x} and {1:#x} overlap")]
    Overlap(u64, u64),
    #[error("ranges cover {0} pages, more than {MAX_LOGGED_PAGES}")]
    TooLarge(u64),
    #[error("DMA logging is already started")]
    Started,
    #[error("DMA logging is not started")]
    NotStarted,
    #[error("report window {iova:#x}+{length:#x} is empty, not aligned to {page_size:#x} or not inside one started range")]
    Window {
        iova: u64,
        length: u64,
        page_size: u64,
    },
    #[error("report bitmap of {got} bytes, {needed} needed")]
    Bitmap { got: usize, needed: usize },
}

impl LogError {
    /// The errno the client gets.
    pub fn errno(&self) -> i32 {
        match self {
            Self::Started => libc::EBUSY,
            _ => libc::EINVAL,
        }
    }
}

/// One started range: a bit per logging page.
#[derive(Debug)]
struct LoggedRange {
    iova: u64,
    length: u64,
    bits: Vec<AtomicU64>,
}

/// What START set up.
#[derive(Debug)]
struct Logging {
    page_size: u64,
    /// Sorted by IOVA, disjoint.
    ranges: Vec<LoggedRange>,
}

/// The device's DMA log: off, or the started ranges.
#[derive(Debug, Default)]
pub struct DirtyLog {
    state: RwLock<Option<Logging>>,
}

fn valid_page_size(page_size: u64) -> bool {
    page_size.is_power_of_two() && page_size >= PAGE_SIZE
}

impl DirtyLog {
    /// Starts logging writes into `ranges` at `page_size`; returns the page size used.
    pub fn start(&self, page_size: u64, ranges: &[DmaLoggingRange]) -> Result<u64, LogError> {
        if !valid_page_size(page_size) {
            return Err(LogError::PageSize(page_size));
        }
        if ranges.is_empty() {
            return Err(LogError::NoRanges);
        }
        let mut sorted = ranges.to_vec();
        sorted.sort_by_key(|r| r.iova);
        let mut pages: u64 = 0;
        for (i, r) in sorted.iter().enumerate() {
            let aligned = r.iova % page_size == 0 && r.length % page_size == 0;
            if r.length == 0 || !aligned || r.iova.checked_add(r.length).is_none() {
                return Err(LogError::BadRange {
                    iova: r.iova,
                    length: r.length,
                    page_size,
                });
            }
            if let Some(next) = sorted.get(i + 1) {
                if r.iova + r.length > next.iova {
                    return Err(LogError::Overlap(r.iova, next.iova));
                }
            }
            pages = pages.saturating_add(r.length / page_size);
        }
        if pages > MAX_LOGGED_PAGES {
            return Err(LogError::TooLarge(pages));
        }
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if state.is_some() {
            return Err(LogError::Started);
        }
        let ranges = sorted
            .iter()
            .map(|r| LoggedRange {
                iova: r.iova,
                length: r.length,
                bits: (0..(r.length / page_size).div_ceil(64))
                    .map(|_| AtomicU64::new(0))
                    .collect(),
            })
            .collect();
        *state = Some(Logging { page_size, ranges });
        Ok(page_size)
    }

    /// Stops logging and forgets the bits (stopping when stopped is fine, as in the kernel).
    pub fn stop(&self) {
        *self.state.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Records that the device wrote `[iova, iova + len)` (call after the write).
    pub fn mark(&self, iova: u64, len: u64) {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let Some(logging) = state.as_ref() else {
            return;
        };
        let end = iova.saturating_add(len);
        for range in &logging.ranges {
            let start = iova.max(range.iova);
            let stop = end.min(range.iova + range.length);
            if start >= stop {
                continue;
            }
            let first = (start - range.iova) / logging.page_size;
            let last = (stop - 1 - range.iova) / logging.page_size;
            for page in first..=last {
                if let Some(word) = range.bits.get((page / 64) as usize) {
                    word.fetch_or(1 << (page % 64), Ordering::Relaxed);
                }
            }
        }
    }

    /// Sets in `bitmap` (zeroed; page `n` is bit `n % 8` of byte `n / 8`) the `page_size`
    /// pages of `[iova, iova + length)` written since the last report of them, and clears
    /// them. The window must be aligned to `page_size` and inside one started range.
    pub fn report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> Result<(), LogError> {
        if !valid_page_size(page_size) {
            return Err(LogError::PageSize(page_size));
        }
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let logging = state.as_ref().ok_or(LogError::NotStarted)?;
        let window = LogError::Window {
            iova,
            length,
            page_size,
        };
        let end = iova.checked_add(length).ok_or(window)?;
        if length == 0 || iova % page_size != 0 || length % page_size != 0 {
            return Err(window);
        }
        let range = logging
            .ranges
            .iter()
            .find(|r| r.iova <= iova && end <= r.iova + r.length)
            .ok_or(window)?;
        let needed = (length / page_size).div_ceil(8) as usize;
        if bitmap.len() < needed {
            return Err(LogError::Bitmap {
                got: bitmap.len(),
                needed,
            });
        }
        // The logging pages the window touches, taken (read and cleared) word by word.
        let unit = logging.page_size;
        let first = (iova - range.iova) / unit;
        let last = (end - 1 - range.iova) / unit;
        for word_index in first / 64..=last / 64 {
            let lo = (word_index * 64).max(first);
            let hi = (word_index * 64 + 63).min(last);
            let mask = (u64::MAX >> (63 - (hi - lo))) << (lo % 64);
            let Some(word) = range.bits.get(word_index as usize) else {
                continue;
            };
            let mut taken = word.fetch_and(!mask, Ordering::Relaxed) & mask;
            while taken != 0 {
                let page = word_index * 64 + u64::from(taken.trailing_zeros());
                taken &= taken - 1;
                // The report pages this logging page overlaps inside the window.
                let start = (range.iova + page * unit).max(iova);
                let stop = (range.iova + (page + 1) * unit).min(end);
                for bit in (start - iova) / page_size..=(stop - 1 - iova) / page_size {
                    if let Some(byte) = bitmap.get_mut((bit / 8) as usize) {
                        *byte |= 1 << (bit % 8);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(iova: u64, length: u64) -> DmaLoggingRange {
        DmaLoggingRange { iova, length }
    }

    fn bits(bitmap: &[u8]) -> Vec<u64> {
        (0..bitmap.len() as u64 * 8)
            .filter(|&n| bitmap[(n / 8) as usize] & (1 << (n % 8)) != 0)
            .collect()
    }

    #[test]
    fn report_merges_and_replicates_across_page_sizes() {
        let log = DirtyLog::default();
        log.start(0x1000, &[range(0x10_0000, 0x10_0000)]).unwrap();
        log.mark(0x10_3000, 1);
        log.mark(0x10_8ff0, 0x20);
        let mut map = vec![0; 8];
        // 8 KiB report pages: 0x3000 is in page 1; 0x8000 and 0x9000 both in page 4.
        log.report(0x10_0000, 0x2_0000, 0x2000, &mut map).unwrap();
        assert_eq!(bits(&map), vec![1, 4]);
        let mut map = vec![0; 8];
        log.report(0x10_0000, 0x2_0000, 0x2000, &mut map).unwrap();
        assert!(bits(&map).is_empty(), "a report clears what it reported");

        let log = DirtyLog::default();
        log.start(0x4000, &[range(0, 0x10_0000)]).unwrap();
        log.mark(0x5000, 1);
        let mut map = vec![0; 8];
        log.report(0, 0x1_0000, 0x1000, &mut map).unwrap();
        assert_eq!(
            bits(&map),
            vec![4, 5, 6, 7],
            "a 16 KiB page is four 4 KiB pages"
        );
    }

    #[test]
    fn marks_outside_every_range_or_when_stopped_are_dropped() {
        let log = DirtyLog::default();
        log.mark(0x1000, 0x1000);
        log.start(0x1000, &[range(0x1_0000, 0x4000)]).unwrap();
        log.mark(0, 0x1_0000);
        log.mark(0x1_4000, 0x1000);
        log.mark(u64::MAX - 1, 10);
        let mut map = vec![0; 8];
        log.report(0x1_0000, 0x4000, 0x1000, &mut map).unwrap();
        assert!(bits(&map).is_empty());
        log.stop();
        assert_eq!(
            log.report(0x1_0000, 0x4000, 0x1000, &mut map),
            Err(LogError::NotStarted)
        );
    }

    #[test]
    fn bad_starts_are_refused() {
        let log = DirtyLog::default();
        let one = [range(0, 0x1000)];
        assert_eq!(log.start(0x800, &one), Err(LogError::PageSize(0x800)));
        assert_eq!(log.start(0x3000, &one), Err(LogError::PageSize(0x3000)));
        assert_eq!(log.start(0x1000, &[]), Err(LogError::NoRanges));
        assert!(matches!(
            log.start(0x1000, &[range(0x1000, 0)]),
            Err(LogError::BadRange { .. })
        ));
        assert!(matches!(
            log.start(0x1000, &[range(0x800, 0x1000)]),
            Err(LogError::BadRange { .. })
        ));
        assert!(matches!(
            log.start(0x1000, &[range(u64::MAX - 0xfff, 0x2000)]),
            Err(LogError::BadRange { .. })
        ));
        assert_eq!(
            log.start(0x1000, &[range(0x4000, 0x2000), range(0x2000, 0x3000)]),
            Err(LogError::Overlap(0x2000, 0x4000))
        );
        let huge = [range(0, (MAX_LOGGED_PAGES + 1) * 0x1000)];
        assert_eq!(
            log.start(0x1000, &huge),
            Err(LogError::TooLarge(MAX_LOGGED_PAGES + 1))
        );
        log.start(0x1000, &one).unwrap();
        assert_eq!(log.start(0x1000, &one), Err(LogError::Started));
    }

    #[test]
    fn bad_report_windows_are_refused() {
        let log = DirtyLog::default();
        log.start(0x1000, &[range(0x1_0000, 0x4000), range(0x1_4000, 0x1000)])
            .unwrap();
        let mut map = vec![0; 8];
        for (iova, length) in [
            (0x1_0000, 0),
            (0x1_0800, 0x1000),
            (0xf000, 0x2000),
            (0x1_3000, 0x2000),
        ] {
            assert!(matches!(
                log.report(iova, length, 0x1000, &mut map),
                Err(LogError::Window { .. })
            ));
        }
        assert_eq!(
            log.report(0x1_0000, 0x1000, 0x1001, &mut map),
            Err(LogError::PageSize(0x1001))
        );
        assert!(matches!(
            log.report(0x1_0000, 0x4000, 0x1000, &mut []),
            Err(LogError::Bitmap { .. })
        ));
    }
}
