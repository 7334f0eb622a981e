//! `DirtySet`: which guest pages changed, one bitmap per memslot in KVM's dirty-log layout (bit
//! `i % 64` of word `i / 64` is page `i` of the slot), so KVM bitmaps OR in without conversion.

use super::TrackedSlot;
use crate::memory::PAGE_SIZE;

/// The dirty pages of one memslot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotBits {
    pub slot: u32,
    pub gpa: u64,
    pub pages: u64,
    pub words: Vec<u64>,
}

impl SlotBits {
    fn end(&self) -> u64 {
        self.gpa + self.pages * PAGE_SIZE
    }
}

/// Dirty pages over all tracked memslots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySet {
    slots: Vec<SlotBits>,
}

impl DirtySet {
    /// An empty set over `slots`.
    pub fn new(slots: &[TrackedSlot]) -> DirtySet {
        DirtySet {
            slots: slots
                .iter()
                .map(|s| SlotBits {
                    slot: s.slot,
                    gpa: s.gpa,
                    pages: s.pages(),
                    words: vec![0; s.pages().div_ceil(64) as usize],
                })
                .collect(),
        }
    }

    pub fn slots(&self) -> &[SlotBits] {
        &self.slots
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.slots
            .iter()
            .flat_map(|s| &s.words)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.iter().flat_map(|s| &s.words).all(|&w| w == 0)
    }

    /// Empties the set, keeping its allocation.
    pub fn clear(&mut self) {
        for s in &mut self.slots {
            s.words.fill(0);
        }
    }

    /// Index into `slots()` of the slot holding `gpa`.
    pub fn slot_index_of(&self, gpa: u64) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| gpa >= s.gpa && gpa < s.end())
    }

    /// Marks page `page` of the slot at `index` (out-of-range pages are ignored and reported
    /// false: a kernel or a ring entry naming a page outside the slot is not trusted).
    pub fn set_page(&mut self, index: usize, page: u64) -> bool {
        match self.slots.get_mut(index) {
            Some(s) if page < s.pages => {
                s.words[(page / 64) as usize] |= 1 << (page % 64);
                true
            }
            _ => false,
        }
    }

    /// Marks the page holding `gpa`; false when `gpa` is not tracked RAM.
    pub fn insert_gpa(&mut self, gpa: u64) -> bool {
        match self.slot_index_of(gpa) {
            Some(i) => {
                let page = (gpa - self.slots[i].gpa) / PAGE_SIZE;
                self.set_page(i, page)
            }
            None => false,
        }
    }

    /// Marks `count` pages from page `first` of the slot at `index` (clipped to the slot).
    pub fn set_pages(&mut self, index: usize, first: u64, count: u64) {
        let Some(s) = self.slots.get_mut(index) else {
            return;
        };
        let end = first.saturating_add(count).min(s.pages);
        let mut page = first;
        while page < end {
            let bit = page % 64;
            let n = (64 - bit).min(end - page);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << bit
            };
            s.words[(page / 64) as usize] |= mask;
            page += n;
        }
    }

    pub fn contains_gpa(&self, gpa: u64) -> bool {
        self.slot_index_of(gpa).is_some_and(|i| {
            let s = &self.slots[i];
            let page = (gpa - s.gpa) / PAGE_SIZE;
            s.words[(page / 64) as usize] & (1 << (page % 64)) != 0
        })
    }

    /// ORs KVM-layout `words` into the slot at `index` (extra words are ignored).
    pub fn or_words(&mut self, index: usize, words: &[u64]) {
        if let Some(s) = self.slots.get_mut(index) {
            for (dst, src) in s.words.iter_mut().zip(words) {
                *dst |= src;
            }
        }
    }

    /// Adds every page of `other`, which must range over the same slots.
    pub fn union_with(&mut self, other: &DirtySet) {
        for (i, s) in other.slots.iter().enumerate() {
            self.or_words(i, &s.words);
        }
    }

    /// The dirty bits of `pages` pages from `gpa` (page aligned), in the same layout: bit `i`
    /// is the page at `gpa + i * 4096`. Pages outside tracked RAM read as clean.
    pub fn range_words(&self, gpa: u64, pages: u64) -> Vec<u64> {
        let mut out = vec![0u64; pages.div_ceil(64) as usize];
        for i in 0..pages {
            if self.contains_gpa(gpa + i * PAGE_SIZE) {
                out[(i / 64) as usize] |= 1 << (i % 64);
            }
        }
        out
    }

    /// Dirty guest-physical ranges `(gpa, bytes)`, adjacent pages merged, ascending.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for s in &self.slots {
            for (wi, &word) in s.words.iter().enumerate() {
                let mut w = word;
                while w != 0 {
                    let bit = w.trailing_zeros() as u64;
                    w &= w - 1;
                    let gpa = s.gpa + (wi as u64 * 64 + bit) * PAGE_SIZE;
                    match runs.last_mut() {
                        Some((start, len)) if *start + *len == gpa => *len += PAGE_SIZE,
                        _ => runs.push((gpa, PAGE_SIZE)),
                    }
                }
            }
        }
        runs
    }

    /// Bytes of bitmap this set holds.
    pub fn bitmap_bytes(&self) -> u64 {
        self.slots.iter().map(|s| s.words.len() as u64 * 8).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Vec<TrackedSlot> {
        vec![
            TrackedSlot {
                slot: 0,
                gpa: 0,
                size: 130 * PAGE_SIZE,
                host: 0,
            },
            TrackedSlot {
                slot: 1,
                gpa: 1 << 32,
                size: 64 * PAGE_SIZE,
                host: 0,
            },
        ]
    }

    #[test]
    fn pages_land_in_their_slot() {
        let mut set = DirtySet::new(&slots());
        assert!(set.insert_gpa(0x1000));
        assert!(set.insert_gpa((1 << 32) + 0x3fff));
        assert!(!set.insert_gpa(130 * PAGE_SIZE), "past slot 0");
        assert!(!set.insert_gpa(u64::MAX));
        assert_eq!(set.count(), 2);
        assert!(set.contains_gpa(0x1fff));
        assert!(set.contains_gpa((1 << 32) + 0x3000));
        assert!(!set.contains_gpa(0x2000));
        assert!(!set.set_page(0, 130), "page beyond the slot is refused");
        assert!(!set.set_page(7, 0), "no such slot");
    }

    #[test]
    fn ranges_and_runs() {
        let mut set = DirtySet::new(&slots());
        set.set_pages(0, 62, 5);
        set.set_pages(0, 128, 100); // clipped to 2 pages
        set.set_pages(1, 0, 1);
        assert_eq!(set.count(), 8);
        assert_eq!(
            set.runs(),
            vec![
                (62 * PAGE_SIZE, 5 * PAGE_SIZE),
                (128 * PAGE_SIZE, 2 * PAGE_SIZE),
                (1 << 32, PAGE_SIZE)
            ]
        );
        let words = set.range_words(60 * PAGE_SIZE, 8);
        assert_eq!(words, vec![0b0111_1100]);
        let mut other = DirtySet::new(&slots());
        other.insert_gpa(0);
        set.union_with(&other);
        assert_eq!(set.count(), 9);
        set.clear();
        assert!(set.is_empty());
    }

    #[test]
    fn full_words_set() {
        let mut set = DirtySet::new(&slots());
        set.set_pages(0, 0, 130);
        assert_eq!(set.count(), 130);
        assert_eq!(set.slots()[0].words, vec![u64::MAX, u64::MAX, 0b11]);
    }
}
