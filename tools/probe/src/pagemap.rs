//! Written-page detection through `/proc/self/pagemap`: PAGEMAP_SCAN with a WP_ASYNC uffd, and
//! soft-dirty (clear_refs 4 + bit 55). Both write chosen units and compare what was written
//! with what was reported: misses make a silent miss, extra pages a false positive; only an
//! exact report works.

use std::collections::BTreeSet;

use userfaultfd::RegisterMode;
use vmm::sys::pagemap::{clear_soft_dirty, PageRegion, Pagemap, PM_SOFT_DIRTY};
use vmm::sys::uffd::{FEATURE_WP_ASYNC, FEATURE_WP_UNPOPULATED};

use crate::kinds::{Region, SMALL};
use crate::report::Outcome;
use crate::uffd::{self, Finding};

/// The units written: first-but-one, a neighbour, and the last-but-one, leaving untouched units
/// between and around them so a smeared report shows up as false positives.
fn chosen(units: usize) -> BTreeSet<usize> {
    [1, 2, units.saturating_sub(2)].into_iter().collect()
}

fn write_units(r: &Region, units: &BTreeSet<usize>) {
    for &u in units {
        // SAFETY: unit `u` < the region's unit count, so the byte lies inside the mapping.
        unsafe { std::ptr::write_volatile(r.unit_addr(u).wrapping_add(0x40), 0xd1) };
    }
}

fn sys_finding(op: &str, e: &vmm::sys::SysError) -> Finding {
    match e.errno() {
        Some(code) => (Outcome::errno(code), format!("{op}: {e}")),
        None => (
            Outcome::Unavailable {
                why: format!("{op}: {e}"),
            },
            e.to_string(),
        ),
    }
}

/// Compares written with reported units; the evidence says both.
fn compare(
    written: &BTreeSet<usize>,
    seen: &BTreeSet<usize>,
    small_pages: usize,
    how: &str,
) -> Finding {
    let misses: Vec<_> = written.difference(seen).collect();
    let extra: Vec<_> = seen.difference(written).collect();
    let evidence = format!(
        "wrote units {written:?}; {how} reported units {seen:?} ({small_pages} 4K pages): {} \
         misses, {} false positives",
        misses.len(),
        extra.len()
    );
    (Outcome::of_write_check(misses.len(), extra.len()), evidence)
}

pub fn scan_written(r: &Region) -> Finding {
    let u = match uffd::open(FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED) {
        Ok(u) => u,
        Err(f) => return f,
    };
    if r.cpu_access {
        r.populate();
    }
    if let Err(f) = uffd::register(&u, r, RegisterMode::WRITE_PROTECT) {
        return f;
    }
    if !r.cpu_access {
        return (
            Outcome::NotApplicable,
            "registered, but the CPU may not write this memory".into(),
        );
    }
    if let Err(e) = u.write_protect(r.addr().cast(), r.len) {
        return (
            Outcome::Unavailable {
                why: format!("UFFDIO_WRITEPROTECT: {e}"),
            },
            String::new(),
        );
    }
    let pm = match Pagemap::open_self() {
        Ok(p) => p,
        Err(e) => return sys_finding("open pagemap", &e),
    };
    let (start, end) = (r.addr() as u64, r.addr() as u64 + r.len as u64);
    let mut regions: Vec<PageRegion> = Vec::new();
    // A first scan re-protects anything the populate writes left marked.
    if let Err(e) = pm.scan_written(start, end, true, &mut regions) {
        return sys_finding("PAGEMAP_SCAN (baseline)", &e);
    }
    regions.clear();
    let written = chosen(r.kind.units());
    write_units(r, &written);
    if let Err(e) = pm.scan_written(start, end, true, &mut regions) {
        return sys_finding("PAGEMAP_SCAN", &e);
    }
    let unit = r.kind.unit() as u64;
    let mut seen = BTreeSet::new();
    let mut small = 0;
    for reg in &regions {
        small += ((reg.end - reg.start) / SMALL as u64) as usize;
        let mut p = reg.start;
        while p < reg.end {
            seen.insert(((p - start) / unit) as usize);
            p += SMALL as u64;
        }
    }
    drop(u);
    compare(&written, &seen, small, "PAGEMAP_SCAN (PAGE_IS_WRITTEN)")
}

pub fn soft_dirty(r: &Region) -> Finding {
    if !r.cpu_access {
        return (
            Outcome::NotApplicable,
            "the CPU may not write this memory (guest-private)".into(),
        );
    }
    r.populate();
    if let Err(e) = clear_soft_dirty() {
        return sys_finding("clear_refs 4", &e);
    }
    let written = chosen(r.kind.units());
    write_units(r, &written);
    let pm = match Pagemap::open_self() {
        Ok(p) => p,
        Err(e) => return sys_finding("open pagemap", &e),
    };
    let pages = r.len / SMALL;
    let mut entries = Vec::with_capacity(pages);
    if let Err(e) = pm.read_entries(r.addr() as u64, pages, &mut entries) {
        return sys_finding("read pagemap", &e);
    }
    let per_unit = r.kind.unit() / SMALL;
    let set: Vec<usize> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| *e & PM_SOFT_DIRTY != 0)
        .map(|(i, _)| i)
        .collect();
    let seen: BTreeSet<usize> = set.iter().map(|i| i / per_unit).collect();
    let (outcome, evidence) = compare(&written, &seen, set.len(), "bit 55");
    let evidence = if set.is_empty() {
        format!(
            "clear_refs 4 accepted, {} units written, bit 55 set on 0 of {pages} pages: \
             soft-dirty sees nothing (no error anywhere); {evidence}",
            written.len()
        )
    } else {
        evidence
    };
    (outcome, evidence)
}
