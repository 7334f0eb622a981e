use super::*;
use crate::sys::testutil::{Mapping, PAGE};
use crate::sys::uffd::{
    uffd_with_features, FEATURE_WP_ASYNC, FEATURE_WP_HUGETLBFS_SHMEM, FEATURE_WP_UNPOPULATED,
};
use userfaultfd::{RegisterMode, Uffd};

/// Registers all of `mem` with a WP_ASYNC uffd and write-protects it.
fn protect(mem: &Mapping) -> Uffd {
    let uffd =
        uffd_with_features(FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED | FEATURE_WP_HUGETLBFS_SHMEM)
            .unwrap();
    uffd.register_with_mode(mem.ptr.cast(), mem.len, RegisterMode::WRITE_PROTECT)
        .unwrap();
    uffd.write_protect(mem.ptr.cast(), mem.len).unwrap();
    uffd
}

/// The written regions of `mem` as page-index ranges.
fn written(pm: &Pagemap, mem: &Mapping, reprotect: bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    pm.scan_written(mem.addr(), mem.addr() + mem.len as u64, reprotect, &mut out)
        .unwrap();
    to_pages(mem, &out)
}

fn to_pages(mem: &Mapping, regions: &[PageRegion]) -> Vec<(usize, usize)> {
    regions
        .iter()
        .map(|r| {
            assert_eq!(r.categories, PAGE_IS_WRITTEN, "{r:?}");
            let page = |a: u64| ((a - mem.addr()) / PAGE as u64) as usize;
            (page(r.start), page(r.end))
        })
        .collect()
}

fn entry(pm: &Pagemap, mem: &Mapping, page: usize) -> u64 {
    let mut e = vec![0xdead; 3];
    pm.read_entries(mem.page_addr(page), 1, &mut e).unwrap();
    assert_eq!(e.len(), 1);
    e[0]
}

#[test]
fn ioctl_number_matches_uapi() {
    assert_eq!(nr::PAGEMAP_SCAN(), 0xc060_6610);
}

#[test]
fn wp_async_scan_reports_exactly_the_written_pages() {
    let mem = Mapping::memfd(64);
    (0..64).for_each(|p| mem.write(p, 1));
    let pm = Pagemap::open_self().unwrap();
    let _uffd = protect(&mem);
    assert_eq!(written(&pm, &mem, true), []);

    [3, 10, 11].into_iter().for_each(|p| mem.write(p, 2));
    assert_eq!(written(&pm, &mem, true), [(3, 4), (10, 12)]);
    // The scan protected what it reported.
    assert_eq!(written(&pm, &mem, true), []);
    mem.write(11, 3);
    assert_eq!(written(&pm, &mem, true), [(11, 12)]);

    // Without reprotect the same pages are reported until a reprotecting scan.
    mem.write(20, 4);
    let e = entry(&pm, &mem, 20);
    assert_eq!(
        e & (PM_PRESENT | PM_FILE | PM_UFFD_WP),
        PM_PRESENT | PM_FILE
    );
    assert_eq!(written(&pm, &mem, false), [(20, 21)]);
    assert_eq!(written(&pm, &mem, false), [(20, 21)]);
    assert_eq!(written(&pm, &mem, true), [(20, 21)]);
    assert_ne!(entry(&pm, &mem, 20) & PM_UFFD_WP, 0);
    assert_eq!(written(&pm, &mem, true), []);
    assert!((0..64).all(|p| mem.read(p) != 0));
}

#[test]
fn pages_untouched_before_protection_are_caught() {
    let pm = Pagemap::open_self().unwrap();
    // Anonymous memory needs WP_UNPOPULATED for this; shmem always gets PTE markers.
    for mem in [Mapping::anon(16), Mapping::memfd(16)] {
        let _uffd = protect(&mem);
        let untouched = entry(&pm, &mem, 0);
        assert_eq!(untouched & (PM_PRESENT | PM_UFFD_WP), PM_UFFD_WP);
        assert_eq!(written(&pm, &mem, true), []);
        mem.write(7, 9);
        assert_ne!(entry(&pm, &mem, 7) & PM_PRESENT, 0);
        assert_eq!(written(&pm, &mem, true), [(7, 8)]);
        assert_eq!(written(&pm, &mem, true), []);
    }
}

#[test]
fn scan_resumes_when_the_region_buffer_fills() {
    let mem = Mapping::memfd(64);
    (0..64).for_each(|p| mem.write(p, 1));
    let pm = Pagemap::open_self().unwrap();
    let _uffd = protect(&mem);
    let pages: Vec<usize> = (0..22).step_by(2).chain(40..50).collect();
    let expect: Vec<(usize, usize)> = (0..22)
        .step_by(2)
        .map(|p| (p, p + 1))
        .chain([(40, 50)])
        .collect();
    for buf_len in [1, 2, 5] {
        pages.iter().for_each(|&p| mem.write(p, 2));
        let mut out = Vec::new();
        let mut buf = vec![PageRegion::default(); buf_len];
        let end = mem.addr() + mem.len as u64;
        pm.scan_written_buf(mem.addr(), end, true, &mut out, &mut buf)
            .unwrap();
        assert_eq!(to_pages(&mem, &out), expect, "buffer of {buf_len}");
        assert_eq!(written(&pm, &mem, true), [], "buffer of {buf_len}");
    }
}

#[test]
fn scan_arguments_and_unregistered_memory() {
    let pm = Pagemap::open_self().unwrap();
    let mem = Mapping::anon(8);
    let (a, end) = (mem.addr(), mem.addr() + mem.len as u64);
    let mut out = Vec::new();
    assert!(matches!(
        pm.scan_written(a + 8, end, false, &mut out),
        Err(SysError::Invalid(_))
    ));
    assert!(matches!(
        pm.scan_written(a, end - 1, false, &mut out),
        Err(SysError::Invalid(_))
    ));
    assert!(matches!(
        pm.scan_written(end, a, false, &mut out),
        Err(SysError::Invalid(_))
    ));
    pm.scan_written(a, a, true, &mut out).unwrap();
    assert!(out.is_empty());
    // Not registered with uffd: nothing is write-protected, so every present page counts as
    // written. (So do untouched pages wherever a page table covers them: the kernel's fast path
    // for exactly this query counts every PTE without the uffd-wp bit, empty ones included.)
    (0..8).for_each(|p| mem.write(p, 1));
    // Appending never merges into what `out` already held, even when adjacent.
    pm.scan_written(a, a + PAGE as u64, false, &mut out)
        .unwrap();
    pm.scan_written(a + PAGE as u64, end, false, &mut out)
        .unwrap();
    assert_eq!(to_pages(&mem, &out), [(0, 1), (1, 8)]);
    // Asking the kernel to re-protect there is refused by CHECK_WPASYNC.
    let e = pm.scan_written(a, end, true, &mut out).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EPERM), "{e}");
}

#[test]
fn read_entries_replaces_out_with_one_entry_per_page() {
    let pm = Pagemap::open_self().unwrap();
    let mem = Mapping::anon(4);
    mem.write(1, 5);
    let mut out = vec![1, 2, 3, 4, 5, 6];
    pm.read_entries(mem.addr(), 4, &mut out).unwrap();
    assert_eq!(out.len(), 4);
    assert_eq!(out[0] & PM_PRESENT, 0);
    assert_ne!(out[1] & PM_PRESENT, 0);
    assert_ne!(out[1] & PM_MMAP_EXCLUSIVE, 0);
    assert_eq!(out[1] & PM_FILE, 0);
    // Unaligned start: the page that contains it.
    pm.read_entries(mem.page_addr(1) + 100, 1, &mut out)
        .unwrap();
    assert_ne!(out[0] & PM_PRESENT, 0);
}

/// The `VmFlags` of the VMA that holds `addr`, from /proc/self/smaps (a fresh mapping may have
/// been merged with a neighbour, so it need not start there).
fn vma_flags(addr: u64) -> Vec<String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let holds = |line: &str| {
        let range = line.split_whitespace().next().unwrap_or_default();
        let Some((start, end)) = range.split_once('-') else {
            return false;
        };
        match (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16)) {
            (Ok(start), Ok(end)) => (start..end).contains(&addr),
            _ => false,
        }
    };
    let mut lines = smaps.lines();
    lines
        .by_ref()
        .find(|l| holds(l))
        .unwrap_or_else(|| panic!("no VMA holds {addr:#x} in /proc/self/smaps"));
    let flags = lines
        .find_map(|l| l.strip_prefix("VmFlags:"))
        .unwrap_or_else(|| panic!("no VmFlags for the VMA at {addr:#x}"));
    flags.split_whitespace().map(str::to_owned).collect()
}

/// One look at soft-dirty: (the self-test's verdict, the `sd` VMA flag of a fresh mapping, a page
/// written after a clear shows bit 55, a page written only before it shows bit 55).
fn soft_dirty_evidence(pm: &Pagemap) -> (bool, bool, bool, bool) {
    let verdict = soft_dirty_self_test().unwrap();
    let mem = Mapping::anon(2);
    // A new VMA carries VM_SOFTDIRTY, shown as `sd`, exactly when the kernel is built with
    // CONFIG_MEM_SOFT_DIRTY: evidence that does not go through pagemap bit 55 at all.
    let sd_flag = vma_flags(mem.addr()).iter().any(|f| f == "sd");
    mem.write(0, 1);
    mem.write(1, 1);
    clear_soft_dirty().unwrap();
    mem.write(1, 2);
    let dirty_after_clear = entry(pm, &mem, 1) & PM_SOFT_DIRTY != 0;
    let dirty_before_clear = entry(pm, &mem, 0) & PM_SOFT_DIRTY != 0;
    (verdict, sd_flag, dirty_after_clear, dirty_before_clear)
}

/// Whether soft-dirty works is this kernel's business (machines of this kind run different
/// builds, PLATFORM.md §10), so no answer is expected here: the self-test's verdict must agree
/// with what the kernel shows otherwise. A clear_refs from another test thread (the soft-dirty
/// tracker's self-test) can only make a working soft-dirty look broken, never the reverse, so
/// each piece of evidence counts as seen if any of three looks saw it.
#[test]
fn soft_dirty_self_test_agrees_with_the_kernels_evidence() {
    let pm = Pagemap::open_self().unwrap();
    let looks: Vec<_> = (0..3).map(|_| soft_dirty_evidence(&pm)).collect();
    let any = |f: fn(&(bool, bool, bool, bool)) -> bool| looks.iter().any(f);
    let (verdict, sd_flag, after) = (any(|l| l.0), any(|l| l.1), any(|l| l.2));
    assert_eq!(
        verdict, sd_flag,
        "self-test says soft-dirty works: {verdict}; a fresh VMA's `sd` flag: {sd_flag} ({looks:?})"
    );
    assert_eq!(
        verdict, after,
        "self-test says soft-dirty works: {verdict}; bit 55 of a page written after clear_refs: \
         {after} ({looks:?})"
    );
    // Nothing ever sets the bit of a page not written since the clear.
    assert!(
        !any(|l| l.3),
        "a page written only before clear_refs is soft-dirty: {looks:?}"
    );
    // Where the distribution ships its config, it must say the same.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    if let Ok(config) = std::fs::read_to_string(format!("/boot/config-{}", release.trim())) {
        let built_in = config.lines().any(|l| l == "CONFIG_MEM_SOFT_DIRTY=y");
        assert_eq!(
            verdict,
            built_in,
            "self-test against /boot/config-{}",
            release.trim()
        );
    }
}
