//! The probe run for real on this host: PLATFORM.md §4's measured facts come out of it, and two
//! runs leave the host as it was.

use std::sync::Mutex;

use vmm_probe::kinds::TEMP_PREFIX;
use vmm_probe::report::{Cell, Mechanism, Outcome, Report};
use vmm_probe::{render, run, ProbeOpts};

/// Tests here read host state around runs; one at a time.
static HOST: Mutex<()> = Mutex::new(());

fn cell<'a>(r: &'a Report, memory: &str, mech: Mechanism) -> &'a Cell {
    r.cells
        .iter()
        .find(|c| c.memory == memory && c.mechanism == mech)
        .unwrap_or_else(|| panic!("no cell {memory} / {mech:?}\n{}", render::text(r)))
}

fn hugepage_state() -> (String, String) {
    let nr = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total = meminfo
        .lines()
        .find(|l| l.starts_with("HugePages_Total:"))
        .unwrap()
        .to_string();
    (nr, total)
}

fn leftover_temp_files(dir: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(TEMP_PREFIX))
        .collect()
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn platform_facts_on_this_host() {
    let _host = HOST.lock().unwrap_or_else(|p| p.into_inner());
    let r = run(&ProbeOpts::default()).unwrap();
    let text = render::text(&r);
    // Anonymous, THP, memfd and hugetlbfs: uffd registers and its real check works.
    for mem in ["anon 4K", "anon THP", "memfd", "hugetlbfs"] {
        for mech in [
            Mechanism::UffdMissing,
            Mechanism::UffdWp,
            Mechanism::UffdWpAsync,
            Mechanism::PagemapScan,
        ] {
            let c = cell(&r, mem, mech);
            assert_eq!(
                c.outcome,
                Outcome::Works,
                "{mem} {mech:?}: {}\n{text}",
                c.evidence
            );
        }
        // CONFIG_MEM_SOFT_DIRTY is off: writes happen, bit 55 never set, and no error says so.
        let c = cell(&r, mem, Mechanism::SoftDirty);
        assert_eq!(c.outcome, Outcome::SilentMiss, "{mem}: {}", c.evidence);
    }
    for mem in ["memfd", "hugetlbfs"] {
        assert_eq!(cell(&r, mem, Mechanism::UffdMinor).outcome, Outcome::Works);
    }
    assert_eq!(
        cell(&r, "anon 4K", Mechanism::UffdMinor).outcome,
        Outcome::errno(libc::EINVAL)
    );
    // THP really is huge here (PLATFORM.md §4: THP works).
    let thp = r.kinds.iter().find(|k| k.memory == "anon THP").unwrap();
    assert!(thp.note.contains(": huge"), "{}", thp.note);
    // guest_memfd mmap: userfaultfd registration is refused with EINVAL.
    for mem in ["guest_memfd MMAP", "guest_memfd MMAP|INIT_SHARED"] {
        for mech in [
            Mechanism::UffdMissing,
            Mechanism::UffdWp,
            Mechanism::UffdMinor,
        ] {
            let c = cell(&r, mem, mech);
            assert_eq!(c.outcome, Outcome::errno(libc::EINVAL), "{mem} {mech:?}");
            assert_eq!(c.matches_prediction, Some(true));
        }
    }
    // KVM dirty logging: a guest writes chosen pages of each RAM kind (and the file mapping);
    // bitmap and ring both report exactly those pages, with nothing from the guest's own
    // (unlogged) control slot.
    for mem in [
        "anon 4K",
        "anon THP",
        "memfd",
        "hugetlbfs",
        "file (MAP_SHARED)",
    ] {
        for mech in [
            Mechanism::KvmDirtyBitmap,
            Mechanism::KvmDirtyBitmapManual,
            Mechanism::KvmDirtyRing,
        ] {
            let c = cell(&r, mem, mech);
            assert_eq!(c.outcome, Outcome::Works, "{mem} {mech:?}: {}", c.evidence);
            assert!(
                c.evidence.contains("guest stores") && c.evidence.contains("at CPL3"),
                "{mem} {mech:?}: the write source is a real guest store: {}",
                c.evidence
            );
            assert!(
                c.evidence.contains("baseline 0 pages dirty")
                    && c.evidence.contains(": 0 misses, 0 false positives"),
                "{mem} {mech:?}: {}",
                c.evidence
            );
            assert!(!c.evidence.contains("other slots"), "{}", c.evidence);
            assert!(c.evidence.contains("[0xd1, 0xd1"), "{}", c.evidence);
            // The same stores from CPL0 (KVM's emulator here) are logged too, and landed.
            assert!(
                c.evidence.contains("at CPL0")
                    && c.evidence.matches(": 0 misses, 0 false positives").count() == 2
                    && c.evidence.contains("[0xd0, 0xd0"),
                "{mem} {mech:?}: the CPL0 pass: {}",
                c.evidence
            );
            if mem != "file (MAP_SHARED)" {
                assert_eq!(c.matches_prediction, Some(true), "{mem} {mech:?}");
            }
        }
    }
    // guest_memfd (every flag combination, also without MMAP): a guest_memfd slot is accepted,
    // the same slot with LOG_DIRTY_PAGES is refused with EINVAL (PLATFORM.md §4).
    for mem in [
        "guest_memfd 0",
        "guest_memfd MMAP",
        "guest_memfd MMAP|INIT_SHARED",
    ] {
        for mech in [
            Mechanism::KvmDirtyBitmap,
            Mechanism::KvmDirtyBitmapManual,
            Mechanism::KvmDirtyRing,
        ] {
            let c = cell(&r, mem, mech);
            assert_eq!(c.outcome, Outcome::errno(libc::EINVAL), "{mem} {mech:?}");
            assert_eq!(c.matches_prediction, Some(true));
            assert!(
                c.evidence
                    .contains("control without LOG_DIRTY_PAGES accepted"),
                "{}",
                c.evidence
            );
        }
    }
    assert!(
        !r.not_covered.iter().any(|n| n.contains("per memory kind")),
        "{:?}",
        r.not_covered
    );
    // No GPU, VFIO or HMM device here: one line each, none claimed found.
    assert_eq!(r.devices.len(), 3);
    assert!(r.devices.iter().all(|d| !d.found), "{:?}", r.devices);
    // The Markdown cell table has as many rows as cells, each with 6 columns.
    let md = render::markdown(&r);
    let rows: Vec<_> = md
        .lines()
        .skip_while(|l| !l.starts_with("| memory | mechanism"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert_eq!(rows.len(), r.cells.len());
    for row in rows {
        let unescaped = row.replace("\\|", "");
        assert_eq!(unescaped.matches('|').count(), 7, "{row}");
    }
}

#[test]
fn two_runs_leave_the_host_as_it_was() {
    let _host = HOST.lock().unwrap_or_else(|p| p.into_inner());
    let before = hugepage_state();
    let fds = fd_count();
    for _ in 0..2 {
        run(&ProbeOpts::default()).unwrap();
        assert_eq!(hugepage_state(), before);
    }
    assert_eq!(fd_count(), fds, "file descriptors leaked");
    assert!(leftover_temp_files("/var/tmp").is_empty());
}
