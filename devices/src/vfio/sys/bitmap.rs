//! The size arithmetic of the dirty bitmaps the kernel fills (type1's GET_BITMAP, iommufd's
//! GET_DIRTY_BITMAP, a device's DMA_LOGGING_REPORT): one bit per page, page `n` at bit `n % 64`
//! of word `n / 64`, which is the kernel's `unsigned long` bitmap read as `u64`s on a 64-bit
//! host. Checked here, before anything is allocated or handed to the kernel: a length and page
//! size from a caller must not overflow, divide by zero or ask for an unbounded buffer.

/// The largest bitmap one call may ask for: type1's own cap (`DIRTY_BITMAP_SIZE_MAX`, INT_MAX
/// pages = 256 MiB of bitmap, 8 TiB at 4 KiB pages). Larger ranges are read in pieces.
pub const MAX_BITMAP_BYTES: u64 = 256 << 20;

// An `unsigned long` bitmap is the same bytes as a `u64` one where longs are 64 bits, or where
// two 32-bit little-endian longs make one little-endian u64.
const _: () = assert!(cfg!(target_pointer_width = "64") || cfg!(target_endian = "little"));

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    #[error("page size {0:#x} is not a power of two")]
    PageSize(u64),
    #[error("an empty range has no dirty bitmap")]
    Empty,
    #[error("[{iova:#x}, +{length:#x}) is not aligned to the page size {page_size:#x}")]
    Unaligned {
        iova: u64,
        length: u64,
        page_size: u64,
    },
    #[error("[{iova:#x}, +{length:#x}) runs past the end of the address space")]
    Overflow { iova: u64, length: u64 },
    #[error("a bitmap of {bytes} bytes is over the {MAX_BITMAP_BYTES} a single read may take")]
    TooLarge { bytes: u64 },
}

/// How many `u64`s hold one bit per `page_size` of `length` bytes (the last page may be
/// partial).
pub fn words(length: u64, page_size: u64) -> Result<usize, BitmapError> {
    if !page_size.is_power_of_two() {
        return Err(BitmapError::PageSize(page_size));
    }
    if length == 0 {
        return Err(BitmapError::Empty);
    }
    let words = length.div_ceil(page_size).div_ceil(64);
    // words <= 2^58, so the byte count cannot overflow.
    let bytes = words * 8;
    if bytes > MAX_BITMAP_BYTES {
        return Err(BitmapError::TooLarge { bytes });
    }
    usize::try_from(words).map_err(|_| BitmapError::TooLarge { bytes })
}

/// [`words`] for a range the kernel wants whole pages of (type1 and iommufd refuse a range
/// whose ends are not aligned to the bitmap's page size, or that wraps).
pub fn range_words(iova: u64, length: u64, page_size: u64) -> Result<usize, BitmapError> {
    let words = words(length, page_size)?;
    if iova.checked_add(length).is_none() {
        return Err(BitmapError::Overflow { iova, length });
    }
    if iova % page_size != 0 || length % page_size != 0 {
        return Err(BitmapError::Unaligned {
            iova,
            length,
            page_size,
        });
    }
    Ok(words)
}

/// Whether page `n` is set in `bitmap` (false beyond its end).
pub fn is_set(bitmap: &[u64], n: u64) -> bool {
    usize::try_from(n / 64)
        .ok()
        .and_then(|w| bitmap.get(w))
        .is_some_and(|word| word & (1 << (n % 64)) != 0)
}

/// How many pages are set.
pub fn count(bitmap: &[u64]) -> u64 {
    bitmap.iter().map(|w| u64::from(w.count_ones())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_up_to_whole_pages_and_whole_words() {
        assert_eq!(words(4096, 4096), Ok(1));
        assert_eq!(words(1, 4096), Ok(1));
        assert_eq!(words(64 * 4096, 4096), Ok(1));
        assert_eq!(words(64 * 4096 + 1, 4096), Ok(2));
        assert_eq!(words(2 << 20, 4096), Ok(8));
        // 1 TiB at 4 KiB: 2^28 pages, 2^22 words, 32 MiB of bitmap.
        assert_eq!(words(1 << 40, 4096), Ok(1 << 22));
    }

    #[test]
    fn bad_sizes_are_errors_not_overflows() {
        assert_eq!(words(4096, 0), Err(BitmapError::PageSize(0)));
        assert_eq!(words(4096, 3000), Err(BitmapError::PageSize(3000)));
        assert_eq!(words(0, 4096), Err(BitmapError::Empty));
        // The whole address space at 1 byte a page: 2^58 words, refused before any allocation.
        assert!(matches!(
            words(u64::MAX, 1),
            Err(BitmapError::TooLarge { bytes }) if bytes == 1 << 61
        ));
        // The bound itself: 8 TiB at 4 KiB pages is exactly MAX_BITMAP_BYTES.
        assert_eq!(words(8 << 40, 4096), Ok((MAX_BITMAP_BYTES / 8) as usize));
        assert!(words((8 << 40) + 4096 * 64, 4096).is_err());
    }

    #[test]
    fn ranges_must_be_aligned_and_must_not_wrap() {
        assert_eq!(range_words(1 << 32, 2 << 20, 4096), Ok(8));
        assert!(matches!(
            range_words(0x1800, 4096, 4096),
            Err(BitmapError::Unaligned { .. })
        ));
        assert!(matches!(
            range_words(0, 4097, 4096),
            Err(BitmapError::Unaligned { .. })
        ));
        assert!(matches!(
            range_words(u64::MAX - 4095, 8192, 4096),
            Err(BitmapError::Overflow { .. })
        ));
    }

    #[test]
    fn page_n_is_bit_n_mod_64_of_word_n_div_64() {
        let b = [1u64 << 3, 1u64 << 63];
        assert!(is_set(&b, 3));
        assert!(!is_set(&b, 4));
        assert!(is_set(&b, 127));
        assert!(!is_set(&b, 128));
        assert!(!is_set(&b, u64::MAX));
        assert_eq!(count(&b), 2);
    }
}
