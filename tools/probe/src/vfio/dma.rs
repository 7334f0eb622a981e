//! What the DMA mechanisms' cells share: the DMA buffer, undo guards, the evidence of the steps
//! taken, and the judging of a dirty bitmap.

use std::collections::BTreeSet;
use std::error::Error;

use super::{chain, errno_of};
use crate::external::CPU_PAGES;
use crate::kinds::{Mapping, SMALL};
use crate::report::Outcome;
use crate::uffd::Finding;

/// 2 MiB: 512 4 KiB pages.
pub const BUF_LEN: usize = 2 << 20;
pub const PAGES: usize = BUF_LEN / SMALL;
/// Where the buffer is DMA-mapped: above 4 GiB, clear of the reserved windows IOMMUs keep below
/// it (the x86 MSI window at 0xfee00000, RMRRs), and within any IOMMU's address width.
pub const IOVA: u64 = 1 << 32;
const CPU_VALUE: u64 = 0xc0de_0000_0000_00d1;

#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    #[error("mmap of the 2 MiB buffer: {0}")]
    Mmap(#[source] std::io::Error),
    #[error("madvise(MADV_NOHUGEPAGE): {0}")]
    Madvise(#[source] std::io::Error),
}

/// Private anonymous memory in 4 KiB pages, only ever touched through raw pointers (a device may
/// DMA into it while it is mapped).
pub struct DmaBuffer {
    map: Mapping,
}

impl DmaBuffer {
    pub fn new() -> Result<DmaBuffer, DmaError> {
        let map = Mapping::new(BUF_LEN, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None)
            .map_err(DmaError::Mmap)?;
        // SAFETY: the range is exactly `map`'s; madvise only changes the kernel's paging policy.
        let rc = unsafe { libc::madvise(map.ptr.cast(), BUF_LEN, libc::MADV_NOHUGEPAGE) };
        if rc != 0 {
            return Err(DmaError::Madvise(std::io::Error::last_os_error()));
        }
        Ok(DmaBuffer { map })
    }

    pub fn ptr(&self) -> *mut u8 {
        self.map.ptr
    }

    pub fn addr(&self) -> usize {
        self.map.ptr as usize
    }

    /// The CPU's stores (not DMA) into CPU_PAGES.
    pub fn cpu_writes(&self) {
        for &p in &CPU_PAGES {
            // SAFETY: p < PAGES, inside the mapping `self` owns; a volatile store through a raw
            // pointer, no reference to the memory exists.
            unsafe {
                std::ptr::write_volatile(self.map.ptr.add(p * SMALL).cast::<u64>(), CPU_VALUE)
            };
        }
    }
}

/// Runs its step's undo once: explicitly through [`Undo::run`] (which reports a failure), or on
/// drop when a later step failed. Guards are declared in order, so they drop in reverse.
pub struct Undo<'a> {
    what: &'static str,
    f: Option<Box<dyn FnOnce() -> Result<(), String> + 'a>>,
}

impl<'a> Undo<'a> {
    pub fn new(what: &'static str, f: impl FnOnce() -> Result<(), String> + 'a) -> Undo<'a> {
        Undo {
            what,
            f: Some(Box::new(f)),
        }
    }

    /// The failure, if the undo failed.
    pub fn run(mut self) -> Option<String> {
        let f = self.f.take()?;
        f().err().map(|e| format!("{}: {e}", self.what))
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if let Some(f) = self.f.take() {
            let _ = f();
        }
    }
}

/// The steps taken so far, for the evidence.
#[derive(Default)]
pub struct Steps(Vec<String>);

impl Steps {
    pub fn ok(&mut self, step: impl Into<String>) {
        self.0.push(step.into());
    }

    /// The cell for a step the kernel refused (its errno) or that could not be set up.
    pub fn fail(&self, step: &str, e: &(dyn Error + 'static)) -> Finding {
        let why = chain(e);
        let evidence = if self.0.is_empty() {
            format!("{step}: {why}")
        } else {
            format!("{}; then {step}: {why}", self.0.join("; "))
        };
        match errno_of(e) {
            Some(code) => (Outcome::errno(code), evidence),
            None => (Outcome::Unavailable { why }, evidence),
        }
    }

    pub fn text(&self) -> String {
        self.0.join("; ")
    }
}

/// Says what an expected refusal means, where the step failed with `code`.
pub fn explain(mut f: Finding, code: i32, meaning: &str) -> Finding {
    if matches!(f.0, Outcome::Errno { code: c, .. } if c == code) {
        f.1.push_str(&format!(" ({meaning})"));
    }
    f
}

/// The set bits among the first `bits` of `bitmap`.
pub fn set_bits(bitmap: &[u64], bits: usize) -> BTreeSet<usize> {
    (0..bits)
        .filter(|&i| bitmap.get(i / 64).is_some_and(|w| w >> (i % 64) & 1 == 1))
        .collect()
}

/// "2, 6" or "0-511".
pub fn ranges(set: &BTreeSet<usize>) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut it = set.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end += 1;
            it.next();
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    out.join(", ")
}

/// The cell for a bitmap read after CPU (never device) stores. Nothing was DMA-written, so a
/// bitmap that reports nothing saw exactly what happened; anything it reports is a false
/// positive. `all_dirty_expected` (type1) names the all-dirty case as TRACKING.md predicts it.
pub fn judge(
    steps: &Steps,
    dirty: &BTreeSet<usize>,
    bits: usize,
    unit: u64,
    all_dirty_expected: bool,
    teardown: &[String],
) -> Finding {
    let cpu_bits: BTreeSet<usize> = CPU_PAGES
        .iter()
        .map(|&p| p * SMALL / unit.max(1) as usize)
        .collect();
    let seen_cpu = cpu_bits.iter().filter(|b| dirty.contains(b)).count();
    let cpu = CPU_PAGES.map(|p| p.to_string()).join(",");
    let read = if dirty.is_empty() {
        format!("bitmap read: 0 of {bits} pages dirty")
    } else if dirty.len() == bits {
        format!(
            "bitmap read: {bits} of {bits} pages dirty: all-dirty{}",
            if all_dirty_expected {
                " (TRACKING.md: VFIO type1 reports every pinned page)"
            } else {
                ""
            }
        )
    } else {
        format!(
            "bitmap read: {} of {bits} pages dirty (pages {})",
            dirty.len(),
            ranges(dirty)
        )
    };
    let cpu_note = format!(
        "the CPU stores to pages {cpu} are not DMA and were {}reported",
        match seen_cpu {
            0 => "not ".to_string(),
            n if n == cpu_bits.len() => String::new(),
            n => format!("{n} of {} ", cpu_bits.len()),
        }
    );
    let unit_note = if unit as usize == SMALL {
        String::new()
    } else {
        format!(" ({unit}-byte pages)")
    };
    let torn = if teardown.is_empty() {
        String::new()
    } else {
        format!("; teardown failed: {}", teardown.join("; "))
    };
    let evidence = format!(
        "{}; {read}{unit_note}; {cpu_note}; no device DMA was issued: the probe cannot make a \
         device DMA without its driver, so detection of device writes is untried{torn}",
        steps.text()
    );
    // An empty bitmap proves only that tracking could be enabled and read: a dead tracker
    // reads the same with no DMA issued, so that is no "works".
    let outcome = if dirty.is_empty() {
        Outcome::Unavailable {
            why: "enabled and read back empty; no device DMA issued, so whether it sees device \
                  writes is untried"
                .into(),
        }
    } else {
        Outcome::FalsePositive
    };
    (outcome, evidence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_read_as_page_sets() {
        let mut bm = [0u64; 8];
        bm[0] = 0b100_0100;
        bm[7] = 1 << 63;
        let s = set_bits(&bm, 512);
        assert_eq!(s.iter().copied().collect::<Vec<_>>(), vec![2, 6, 511]);
        assert_eq!(ranges(&s), "2, 6, 511");
        assert_eq!(ranges(&set_bits(&[u64::MAX; 8], 512)), "0-511");
        assert!(set_bits(&[], 512).is_empty());
    }

    #[test]
    fn judging_names_what_was_read() {
        let mut steps = Steps::default();
        steps.ok("tracking enabled");
        let (o, ev) = judge(&steps, &BTreeSet::new(), PAGES, 4096, false, &[]);
        assert!(matches!(o, Outcome::Unavailable { .. }), "{o:?}");
        assert!(
            ev.starts_with("tracking enabled; bitmap read: 0 of 512 pages dirty"),
            "{ev}"
        );
        assert!(
            ev.contains("were not reported") && ev.contains("untried"),
            "{ev}"
        );
        let all: BTreeSet<usize> = (0..PAGES).collect();
        let (o, ev) = judge(&steps, &all, PAGES, 4096, true, &["unmap: EBUSY".into()]);
        assert_eq!(o, Outcome::FalsePositive);
        assert!(
            ev.contains(
                "512 of 512 pages dirty: all-dirty (TRACKING.md: VFIO type1 reports every \
                 pinned page)"
            ),
            "{ev}"
        );
        assert!(ev.contains("teardown failed: unmap: EBUSY"), "{ev}");
        // Elsewhere all-dirty is just what was read.
        let (o, ev) = judge(&steps, &all, PAGES, 4096, false, &[]);
        assert_eq!(o, Outcome::FalsePositive);
        assert!(ev.contains("dirty: all-dirty;"), "{ev}");
    }

    #[test]
    fn a_buffer_and_its_guards() {
        let buf = DmaBuffer::new().unwrap();
        buf.cpu_writes();
        let ran = std::cell::Cell::new(0);
        {
            let _a = Undo::new("a", || {
                ran.set(ran.get() + 1);
                Ok(())
            });
            let b = Undo::new("b", || Err("EBUSY".into()));
            assert_eq!(b.run(), Some("b: EBUSY".into()));
        }
        assert_eq!(ran.get(), 1, "a dropped guard undoes its step once");
    }
}
