//! Ground truth by content for in-situ tracking with a passed-through device: at each round the
//! VMM compares every page of guest RAM and of the device's memory (its mapped BAR pages: on a
//! GPU, VRAM among them) with the copy it kept at the previous round. A page whose bytes changed was
//! written; a page written with the bytes it already held does not count as written.
//!
//! Why content and not a model: the writers are the guest kernel, the agent and the device,
//! and only the content is common to all of them. The device's own writes reach guest RAM
//! through its mapping of the memory file and VRAM through its memfd, so the VMM's mapping of
//! the same files shows them, as it shows vCPU stores.
//!
//! Guest RAM pages are attributed by what they now hold: a page with the test device's page
//! writer magic at byte 8 is the device's (it stamps every page it writes so), any other the
//! guest CPU's (kernel, agent).

use serde::Serialize;

use crate::memory::PAGE_SIZE;

/// The gpu-test-device's page writer stores this u64 at byte 8 of every page it writes
/// (tools/gpu-test-device README, "Page writer").
pub const PAGE_WRITER_MAGIC: u64 = 0x5047_5752_4954_4552;

const PAGE: usize = PAGE_SIZE as usize;

/// Written pages against what a tracker reported, for one kind of memory and writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Pages whose content changed (the truth).
    pub written: u64,
    /// Written pages the tracker reported.
    pub detected: u64,
    /// Written pages the tracker did not report.
    pub missed: u64,
    /// Reported pages whose content did not change (same-value writes count here).
    pub false_positives: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.written += o.written;
        self.detected += o.detected;
        self.missed += o.missed;
        self.false_positives += o.false_positives;
    }

    /// Counts one page given whether it changed and whether it was reported.
    fn page(&mut self, changed: bool, reported: bool) {
        match (changed, reported) {
            (true, true) => {
                self.written += 1;
                self.detected += 1;
            }
            (true, false) => {
                self.written += 1;
                self.missed += 1;
            }
            (false, true) => self.false_positives += 1,
            (false, false) => {}
        }
    }
}

/// One round (or a phase's sum) by memory and writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TruthCounts {
    /// Guest RAM pages without the page writer's stamp: the guest CPU's writes.
    pub ram_cpu: Counts,
    /// Guest RAM pages the device's page writer stamped: its DMA.
    pub ram_device: Counts,
    /// The device's memory (VRAM), whoever wrote it.
    pub device_memory: Counts,
}

impl TruthCounts {
    pub fn add(&mut self, o: &TruthCounts) {
        self.ram_cpu.add(&o.ram_cpu);
        self.ram_device.add(&o.ram_device);
        self.device_memory.add(&o.device_memory);
    }
}

/// A range of host memory (a RAM memslot, a mapped BAR piece) and its copy at the last round.
pub struct Watched {
    host: u64,
    pages: u64,
    copy: Vec<u8>,
}

impl Watched {
    /// Starts watching `size` bytes at `host`, copying them now.
    ///
    /// # Safety
    /// `host..host + size` must stay mapped and readable for the life of the value (it is
    /// read at every [`Watched::changed`]).
    pub unsafe fn new(host: u64, size: u64) -> Watched {
        let pages = size / PAGE_SIZE;
        let mut w = Watched {
            host,
            pages,
            copy: vec![0; (pages * PAGE_SIZE) as usize],
        };
        let mut none = vec![0; pages.div_ceil(64) as usize];
        w.changed(&mut none);
        w
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Sets in `bits` (one per page, KVM's dirty-log layout) every page whose content differs
    /// from the copy, and takes the new content as the copy.
    pub fn changed(&mut self, bits: &mut [u64]) {
        for i in 0..self.pages as usize {
            // SAFETY: the range is mapped for our life (`new`'s contract). Others (vCPUs, the
            // device) may write it meanwhile, as they may any guest memory the VMM reads; a
            // torn read only moves part of a change into the next round's comparison.
            let live = unsafe {
                std::slice::from_raw_parts((self.host as usize + i * PAGE) as *const u8, PAGE)
            };
            let old = &mut self.copy[i * PAGE..(i + 1) * PAGE];
            // Compared in place and copied only when different: most pages do not change, and
            // the round runs with the vCPUs parked.
            if old != live {
                old.copy_from_slice(live);
                if let Some(w) = bits.get_mut(i / 64) {
                    *w |= 1 << (i % 64);
                }
            }
        }
    }

    /// Whether page `i` (as last copied) carries the page writer's stamp.
    pub fn stamped(&self, i: u64) -> bool {
        let at = i as usize * PAGE + 8;
        self.copy
            .get(at..at + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .is_some_and(|b| u64::from_le_bytes(b) == PAGE_WRITER_MAGIC)
    }
}

/// Counts the pages of one region: `changed` and `reported` are bitmaps over its pages;
/// `device(i)` says whether page `i` goes to the device's counts rather than the CPU's.
pub fn count_region(
    pages: u64,
    changed: &[u64],
    reported: Option<&[u64]>,
    device: impl Fn(u64) -> bool,
    cpu: &mut Counts,
    dev: &mut Counts,
) {
    let words = pages.div_ceil(64) as usize;
    for w in 0..words {
        let c = changed.get(w).copied().unwrap_or(0);
        let r = reported.and_then(|r| r.get(w).copied()).unwrap_or(0);
        let mut any = c | r;
        while any != 0 {
            let bit = any.trailing_zeros();
            any &= any - 1;
            let i = w as u64 * 64 + u64::from(bit);
            if i >= pages {
                break;
            }
            let into = if device(i) { &mut *dev } else { &mut *cpu };
            into.page(c >> bit & 1 == 1, r >> bit & 1 == 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_page_is_seen_once_and_a_same_value_write_not_at_all() {
        let mut mem = vec![0u8; 4 * PAGE];
        // SAFETY: `mem` outlives `w` and is not resized.
        let mut w = unsafe { Watched::new(mem.as_ptr() as u64, mem.len() as u64) };
        mem[PAGE + 5] = 1;
        mem[3 * PAGE] = 0; // same value
        let mut bits = [0u64];
        w.changed(&mut bits);
        assert_eq!(bits, [0b10]);
        let mut again = [0u64];
        w.changed(&mut again);
        assert_eq!(again, [0]);
    }

    #[test]
    fn stamped_pages_go_to_the_device_and_every_page_lands_in_one_cell() {
        let mut mem = vec![0u8; 3 * PAGE];
        // SAFETY: `mem` outlives `w` and is not resized.
        let mut w = unsafe { Watched::new(mem.as_ptr() as u64, mem.len() as u64) };
        mem[8..16].copy_from_slice(&PAGE_WRITER_MAGIC.to_le_bytes());
        mem[PAGE] = 7;
        let mut changed = [0u64];
        w.changed(&mut changed);
        assert!(w.stamped(0) && !w.stamped(1) && !w.stamped(2));
        // Reported: page 1 (written) and page 2 (not written).
        let reported = [0b110u64];
        let (mut cpu, mut dev) = (Counts::default(), Counts::default());
        count_region(
            3,
            &changed,
            Some(&reported),
            |i| w.stamped(i),
            &mut cpu,
            &mut dev,
        );
        assert_eq!(
            dev,
            Counts {
                written: 1,
                detected: 0,
                missed: 1,
                false_positives: 0
            }
        );
        assert_eq!(
            cpu,
            Counts {
                written: 1,
                detected: 1,
                missed: 0,
                false_positives: 1
            }
        );
    }
}
