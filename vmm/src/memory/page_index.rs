//! Guest pages numbered 0..N across the RAM ranges, and a concurrent bitmap over them: which
//! pages postcopy still has to move (source: not yet sent; destination: not yet present).

use std::sync::atomic::{AtomicU64, Ordering};

use super::{RamRange, PAGE_SIZE};

#[derive(Debug, Clone)]
pub struct PageIndex {
    /// (first gpa, pages, first index)
    ranges: Vec<(u64, u64, u64)>,
    total: u64,
}

impl PageIndex {
    pub fn new(ranges: &[RamRange]) -> PageIndex {
        let mut next = 0;
        let ranges = ranges
            .iter()
            .map(|r| {
                let pages = r.size / PAGE_SIZE;
                let e = (r.gpa, pages, next);
                next += pages;
                e
            })
            .collect();
        PageIndex {
            ranges,
            total: next,
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn index(&self, gpa: u64) -> Option<u64> {
        self.ranges.iter().find_map(|&(start, pages, first)| {
            let off = gpa.checked_sub(start)? / PAGE_SIZE;
            (off < pages).then_some(first + off)
        })
    }

    pub fn gpa(&self, index: u64) -> Option<u64> {
        self.ranges.iter().find_map(|&(start, pages, first)| {
            (index >= first && index < first + pages).then(|| start + (index - first) * PAGE_SIZE)
        })
    }

    /// The longest run of consecutive page indexes from `index` that stays inside one range,
    /// capped at `max`.
    pub fn contiguous_from(&self, index: u64, max: u64) -> u64 {
        self.ranges
            .iter()
            .find(|&&(_, pages, first)| index >= first && index < first + pages)
            .map_or(0, |&(_, pages, first)| (first + pages - index).min(max))
    }
}

/// A bitmap that threads set and clear concurrently.
pub struct AtomicPages {
    words: Vec<AtomicU64>,
    len: u64,
}

impl AtomicPages {
    pub fn new(len: u64) -> AtomicPages {
        AtomicPages {
            words: (0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// Sets bit `i`; true if it was clear.
    pub fn set(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let bit = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    /// Clears bit `i`; true if it was set.
    pub fn clear(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        let bit = 1u64 << (i % 64);
        self.words[(i / 64) as usize].fetch_and(!bit, Ordering::AcqRel) & bit != 0
    }

    /// The first set bit at or after `from`, wrapping around once.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        let scan = |lo: u64, hi: u64| -> Option<u64> {
            let mut i = lo;
            while i < hi {
                let w = self.words[(i / 64) as usize].load(Ordering::Acquire) >> (i % 64);
                if w != 0 {
                    let found = i + w.trailing_zeros() as u64;
                    return (found < hi).then_some(found);
                }
                i = (i / 64 + 1) * 64;
            }
            None
        };
        let from = from.min(self.len);
        scan(from, self.len).or_else(|| scan(0, from))
    }

    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Acquire).count_ones() as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_and_gpa_round_trip_across_the_hole() {
        let ranges = crate::memory::ram_layout((4 << 30) - 4096 * 4 + (8 << 20));
        let idx = PageIndex::new(&ranges);
        let low_pages = ranges[0].size / PAGE_SIZE;
        assert_eq!(idx.index(0), Some(0));
        assert_eq!(idx.index(ranges[1].gpa), Some(low_pages));
        assert_eq!(idx.gpa(low_pages), Some(ranges[1].gpa));
        assert_eq!(idx.index(ranges[0].size), None);
        assert_eq!(idx.gpa(idx.total()), None);
        assert_eq!(idx.contiguous_from(low_pages - 2, 10), 2);
    }

    #[test]
    fn atomic_pages_find_and_wrap() {
        let b = AtomicPages::new(200);
        assert_eq!(b.next_set(0), None);
        assert!(b.set(5));
        assert!(!b.set(5));
        assert!(b.set(130));
        assert_eq!(b.next_set(6), Some(130));
        assert_eq!(b.next_set(131), Some(5));
        assert!(b.clear(5));
        assert!(!b.clear(5));
        assert_eq!(b.count(), 1);
        assert!(!b.set(200));
        assert!(!b.get(999));
    }
}
