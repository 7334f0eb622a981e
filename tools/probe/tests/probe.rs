//! The probe run for real on this host. Machines of this kind differ (PLATFORM.md §10: one build
//! of the same host kernel has KVM_CREATE_GUEST_MEMFD, another answers ENOTTY), so nothing here
//! asserts that this kernel has or lacks a mechanism. What is asserted holds on any host: every
//! cell's verdict agrees with its own evidence, a refusal carries the kernel's errno, the report
//! agrees with what the kernel says about itself (its userfaultfd feature mask, its KVM
//! capabilities, its build config, a guest_memfd created here), and two runs leave the host as
//! it was.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Mutex;

use vmm::sys::kvm_dirty::MANUAL_PROTECT_ENABLE;
use vmm_probe::kinds::{Kind, GUEST_MEMFD_FLAG_MMAP, TEMP_PREFIX};
use vmm_probe::kvm_guest::{STORED, STORED_CPL0};
use vmm_probe::report::{errno_name, Cell, Mechanism, Outcome, Report};
use vmm_probe::{render, run, ProbeOpts};

/// Tests here read host state around runs; one at a time.
static HOST: Mutex<()> = Mutex::new(());

const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

fn cells<'a>(r: &'a Report, memory: &'a str) -> impl Iterator<Item = &'a Cell> + 'a {
    r.cells.iter().filter(move |c| c.memory == memory)
}

fn cell<'a>(r: &'a Report, memory: &str, mech: Mechanism) -> Option<&'a Cell> {
    r.cells
        .iter()
        .find(|c| c.memory == memory && c.mechanism == mech)
}

/// One line per cell, for failure messages.
fn what(c: &Cell) -> String {
    format!(
        "{} / {}: {:?}: {}",
        c.label(),
        c.mechanism.name(),
        c.outcome,
        c.evidence
    )
}

/// Every "N misses, M false positives" (KVM, pagemap) and "N missed, M false positives"
/// (report::judge) count in an evidence text, in order.
fn counts(evidence: &str) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    for marker in [" misses, ", " missed, "] {
        let mut rest = evidence;
        while let Some(i) = rest.find(marker) {
            let missed = rest[..i]
                .rsplit(|ch: char| !ch.is_ascii_digit())
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no count before {marker:?} in {evidence}"));
            let after = &rest[i + marker.len()..];
            let digits = after.chars().take_while(char::is_ascii_digit).count();
            assert!(
                after[digits..].starts_with(" false positive"),
                "unparsable count in {evidence}"
            );
            let extra = after[..digits].parse().unwrap();
            found.push((missed, extra));
            rest = after;
        }
    }
    found
}

/// The evidence names the kernel's answer: its symbolic name, or its number as the uffd crate
/// ("errno 22") and std::io ("os error 22") print it.
fn names_errno(evidence: &str, code: i32) -> bool {
    let name = errno_name(code);
    (name != "errno" && evidence.contains(name))
        || evidence.contains(&format!("errno {code}"))
        || evidence.contains(&format!("os error {code}"))
}

/// The hex byte right after `prefix` in `evidence` ("thread read 0x77" -> 0x77).
fn byte_after(evidence: &str, prefix: &str) -> Option<u8> {
    let i = evidence.find(prefix)? + prefix.len();
    let hex = evidence[i..].strip_prefix("0x")?;
    let len = hex.chars().take_while(char::is_ascii_hexdigit).count();
    u8::from_str_radix(&hex[..len], 16).ok()
}

/// The bytes of every "host view of the written bytes: [..]" list in `evidence`.
fn host_views(evidence: &str) -> Vec<Vec<u8>> {
    evidence
        .split("host view of the written bytes: [")
        .skip(1)
        .map(|rest| {
            rest.split(']')
                .next()
                .unwrap_or_default()
                .split(", ")
                .filter(|b| !b.is_empty())
                .map(|b| u8::from_str_radix(b.trim_start_matches("0x"), 16).unwrap())
                .collect()
        })
        .collect()
}

/// A cell's verdict agrees with its evidence, whatever the host: "works" only where what was
/// written is exactly what was reported (or the fault was seen and resolved with the right
/// contents), "silent miss" only with writes made and not reported, a refusal only with the
/// kernel's errno in the evidence. Runs on every cell, device cells included (where only the
/// format-independent rules apply: `host_kind` is false).
fn assert_verdict_agrees_with_evidence(c: &Cell, host_kind: bool) {
    let w = what(c);
    let counts = counts(&c.evidence);
    let missed: usize = counts.iter().map(|n| n.0).sum();
    let extra: usize = counts.iter().map(|n| n.1).sum();
    match &c.outcome {
        Outcome::Works if !counts.is_empty() => {
            assert_eq!((missed, extra), (0, 0), "works, but not exact: {w}");
        }
        Outcome::Works if host_kind => {
            // A fault check: the fault came at the touched page, was resolved, and the touching
            // thread then read what the resolution installed; or WP_ASYNC let the write through
            // with no message; or MINOR with no page cache to fault on, registration only.
            let fault = c.evidence.contains("; resolved; thread read ");
            let async_wp = c
                .evidence
                .contains("write to a protected page completed with no message; read back 0x31");
            let registered = c.evidence.contains("only registration was checked");
            assert!(fault || async_wp || registered, "works, on what? {w}");
            if fault {
                let read = byte_after(&c.evidence, "thread read ").unwrap();
                let installed = [
                    ("UFFDIO_COPY filled ", Mechanism::UffdMissing),
                    ("; write ", Mechanism::UffdWp),
                    ("page cache held ", Mechanism::UffdMinor),
                ]
                .into_iter()
                .find(|(_, m)| *m == c.mechanism)
                .and_then(|(prefix, _)| byte_after(&c.evidence, prefix));
                assert_eq!(installed, Some(read), "read back what was installed: {w}");
            }
        }
        Outcome::Works => {}
        Outcome::SilentMiss if !counts.is_empty() => {
            assert!(missed > 0, "silent miss with nothing missed: {w}");
        }
        Outcome::SilentMiss => {
            // A fault check whose access happened and whose fault never came (or came wrong).
            assert!(
                c.evidence.contains("no event within")
                    || c.evidence.contains("expected ")
                    || c.evidence.contains("resolving: "),
                "silent miss without a missed access: {w}"
            );
        }
        Outcome::FalsePositive => {
            assert!(missed == 0 && extra > 0, "false positive without one: {w}");
        }
        Outcome::Errno { name, code } => {
            assert!(*code > 0, "{w}");
            assert_eq!(name, errno_name(*code), "{w}");
            assert!(
                names_errno(&c.evidence, *code),
                "a refusal must carry the kernel's errno: {w}"
            );
        }
        Outcome::Unavailable { why } => assert!(!why.trim().is_empty(), "no reason: {w}"),
        Outcome::DeviceFault { why } => assert!(!why.trim().is_empty(), "no reason: {w}"),
        Outcome::NotApplicable => assert!(!c.evidence.trim().is_empty(), "no reason: {w}"),
    }
    if matches!(
        c.outcome,
        Outcome::Unavailable { .. } | Outcome::NotApplicable
    ) {
        assert_eq!(c.matches_prediction, None, "judged without a result: {w}");
    }
    // Item 4 of issue 16: every write-protect / written-page verdict says how it was armed and
    // over how many write-and-harvest cycles.
    let tracking = matches!(
        c.mechanism,
        Mechanism::UffdWp | Mechanism::UffdWpAsync | Mechanism::PagemapScan | Mechanism::SoftDirty
    );
    if tracking
        && matches!(
            c.outcome,
            Outcome::Works | Outcome::SilentMiss | Outcome::FalsePositive
        )
    {
        let by = c.armed_by.as_deref().unwrap_or("");
        assert!(!by.is_empty(), "a verdict without its arming path: {w}");
        assert!(c.cycles.is_some(), "a verdict without its cycle count: {w}");
    }
    // Soft-dirty's silent miss is "writes made, none reported, no error": say both numbers.
    if let Some(i) = c.evidence.find(" units written, bit 55 set on 0 of") {
        let written: usize = c.evidence[..i]
            .rsplit(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        assert!(written > 0, "no writes made: {w}");
        assert_eq!(c.outcome, Outcome::SilentMiss, "{w}");
    }
}

/// KVM dirty-log cells on memory the probe mapped: where the slot was accepted and writes made,
/// they came from the probe's own guest (at CPL3, then at CPL0: KVM's emulator on PVM hosts,
/// native on hardware; the guest is the probe's code, so it must run on either), and the bytes
/// the host reads back are the ones each pass stored.
fn assert_kvm_write_source(c: &Cell) {
    let w = what(c);
    if !matches!(
        c.outcome,
        Outcome::Works | Outcome::SilentMiss | Outcome::FalsePositive
    ) {
        return;
    }
    assert!(
        c.evidence.contains("write source: guest stores") && c.evidence.contains("at CPL3"),
        "the probe's guest did not store: {w}"
    );
    assert!(
        c.evidence
            .contains(&format!("then the same stores of {STORED_CPL0:#x} at CPL0")),
        "the probe's guest did not store from CPL0: {w}"
    );
    // Two harvests judged: CPL3's and CPL0's; no entries from the unlogged control slot.
    assert_eq!(counts(&c.evidence).len(), 2, "{w}");
    assert!(!c.evidence.contains("other slots"), "{w}");
    let views = host_views(&c.evidence);
    assert_eq!(views.len(), 2, "{w}");
    for (view, stored) in views.iter().zip([STORED, STORED_CPL0]) {
        assert!(
            !view.is_empty() && view.iter().all(|&b| b == stored),
            "the host reads {view:x?}, the guest stored {stored:#x}: {w}"
        );
    }
}

/// The kernel's build config (/proc/config.gz), where it exposes one.
fn kernel_config() -> Option<String> {
    let out = std::process::Command::new("zcat")
        .arg("/proc/config.gz")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// KVM_CREATE_GUEST_MEMFD with `flags` on a throwaway VM, done here independently of the probe:
/// Ok where this kernel makes one, Err(errno) where it refuses.
fn guest_memfd_here(flags: u64) -> Result<(), i32> {
    let vm = kvm_ioctls::Kvm::new()
        .and_then(|k| k.create_vm())
        .expect("a VM on /dev/kvm");
    let req = kvm_bindings::kvm_create_guest_memfd {
        size: 64 << 10,
        flags,
        reserved: [0; 6],
    };
    let raw = vm.create_guest_memfd(req).map_err(|e| e.errno())?;
    // SAFETY: a fresh descriptor nothing else owns; closed at once.
    drop(unsafe { OwnedFd::from_raw_fd(raw) });
    Ok(())
}

/// The guest_memfd kinds against a guest_memfd created here. Where the kernel refuses
/// (PLATFORM.md §10: ENOTTY on one build), the kind is unavailable and every KVM cell a clean
/// "unavailable" naming that errno; where it makes one, no cell may claim creation failed, and a
/// refused dirty-log slot names its errno and the control registration that tells which flag
/// was refused.
fn assert_guest_memfd_agrees(r: &Report) {
    for kind in Kind::all() {
        let Kind::GuestMemfd { flags } = kind else {
            continue;
        };
        let name = kind.name();
        let status = r.kinds.iter().find(|k| k.memory == name).unwrap();
        let kvm_cells: Vec<&Cell> = cells(r, &name).filter(|c| c.mechanism.is_kvm()).collect();
        assert_eq!(kvm_cells.len(), 3, "{name}: one cell per KVM log");
        match guest_memfd_here(flags) {
            Err(code) => {
                let refusal = format!(
                    "KVM_CREATE_GUEST_MEMFD flags={flags:#x}: {}",
                    errno_name(code)
                );
                eprintln!(
                    "{name}: this kernel refuses KVM_CREATE_GUEST_MEMFD with {}",
                    errno_name(code)
                );
                assert!(!status.available, "{name}: {}", status.note);
                assert!(status.note.contains(&refusal), "{name}: {}", status.note);
                // Without a guest_memfd there is no mapping for a userspace mechanism.
                assert!(
                    cells(r, &name).all(|c| c.mechanism.is_kvm()),
                    "{name}: userspace cells on memory that was never made"
                );
                for c in kvm_cells {
                    // The plain bitmap's scratch VM needs nothing more than the VM made above,
                    // so its cell gets as far as the refusal; the manual and ring cells may stop
                    // earlier where KVM lacks their capability (judged by their own evidence).
                    let reached = c.mechanism == Mechanism::KvmDirtyBitmap
                        || c.evidence.contains("KVM_CREATE_GUEST_MEMFD");
                    match &c.outcome {
                        Outcome::Unavailable { why } if reached => {
                            assert!(why.contains(&refusal), "{}", what(c))
                        }
                        Outcome::Unavailable { .. } | Outcome::Errno { .. } if !reached => {}
                        _ => panic!("the kernel refuses guest_memfd: {}", what(c)),
                    }
                }
            }
            Ok(()) => {
                eprintln!("{name}: this kernel makes a guest_memfd");
                // The probe's refusal text, which must then appear nowhere.
                let refused = format!("KVM_CREATE_GUEST_MEMFD flags={flags:#x}: ");
                assert!(
                    !status.note.contains(&refused),
                    "{name}: the kernel makes one, the probe says it could not: {}",
                    status.note
                );
                if flags & GUEST_MEMFD_FLAG_MMAP == 0 {
                    assert!(!status.available, "{name}: {}", status.note);
                    assert!(status.note.contains("not mmap-able"), "{}", status.note);
                } else {
                    assert!(
                        status.available || status.note.contains("; mmap: "),
                        "{name}: made and mmap-able, yet: {}",
                        status.note
                    );
                }
                for c in kvm_cells {
                    assert!(
                        !c.evidence.contains(&refused),
                        "the kernel makes one, the cell says it could not: {}",
                        what(c)
                    );
                    // A refused dirty-logged slot names the errno and what the same fd without
                    // LOG_DIRTY_PAGES got, which tells which flag the kernel refuses.
                    if let Outcome::Errno { name: errno, .. } = &c.outcome {
                        if c.evidence.contains("created on the scratch VM") {
                            let slot = format!(
                                "KVM_SET_USER_MEMORY_REGION2(GUEST_MEMFD|LOG_DIRTY_PAGES): {errno}"
                            );
                            assert!(
                                c.evidence.contains(&slot)
                                    && c.evidence.contains("control without LOG_DIRTY_PAGES"),
                                "{}",
                                what(c)
                            );
                        }
                    }
                }
            }
        }
    }
}

/// What the kernel itself says it lacks, no cell claims works: a userfaultfd feature missing
/// from its UFFDIO_API mask, a dirty ring or manual protect it does not offer, soft-dirty
/// compiled out of its config. (The converse, advertised but broken, is a finding the report
/// shows, not a test failure.)
fn assert_no_cell_works_beyond_what_the_kernel_offers(r: &Report) {
    let offered = |feature: &str| r.host.uffd_feature_names.iter().any(|f| f == feature);
    if let Some(e) = &r.host.uffd_error {
        eprintln!("userfaultfd unavailable here: {e}");
    }
    for c in &r.cells {
        let needs: &[&str] = match (c.mechanism, c.memory.as_str()) {
            (Mechanism::UffdWpAsync | Mechanism::PagemapScan, _) => &["WP_ASYNC", "WP_UNPOPULATED"],
            (Mechanism::UffdWp, "memfd" | "hugetlbfs") => {
                &["PAGEFAULT_FLAG_WP", "WP_HUGETLBFS_SHMEM"]
            }
            (Mechanism::UffdWp, _) => &["PAGEFAULT_FLAG_WP"],
            (Mechanism::UffdMinor, "memfd") => &["MINOR_SHMEM"],
            (Mechanism::UffdMinor, "hugetlbfs") => &["MINOR_HUGETLBFS"],
            (Mechanism::UffdMissing, "hugetlbfs") => &["MISSING_HUGETLBFS"],
            (Mechanism::UffdMissing, "memfd") => &["MISSING_SHMEM"],
            _ => &[],
        };
        if let Some(lacking) = needs.iter().find(|f| !offered(f)) {
            assert_ne!(
                c.outcome,
                Outcome::Works,
                "the kernel does not offer {lacking}: {}",
                what(c)
            );
        }
    }
    let vm = kvm_ioctls::Kvm::new()
        .and_then(|k| k.create_vm())
        .expect("a VM on /dev/kvm");
    let ring = vmm::sys::kvm_dirty::dirty_ring_caps(&vm);
    let manual = vmm::sys::kvm_dirty::manual_protect_supported(&vm);
    eprintln!("KVM here: dirty ring {ring:?}, MANUAL_DIRTY_LOG_PROTECT2 flags {manual:#x}");
    for c in &r.cells {
        let lacking = match c.mechanism {
            Mechanism::KvmDirtyRing if ring.acq_rel_max_bytes == 0 && ring.plain_max_bytes == 0 => {
                Some("a dirty ring")
            }
            Mechanism::KvmDirtyBitmapManual if manual & MANUAL_PROTECT_ENABLE == 0 => {
                Some("MANUAL_DIRTY_LOG_PROTECT2")
            }
            _ => None,
        };
        if let Some(lacking) = lacking {
            assert_ne!(
                c.outcome,
                Outcome::Works,
                "KVM offers no {lacking}: {}",
                what(c)
            );
        }
    }
    match kernel_config() {
        Some(config) if !config.contains("\nCONFIG_MEM_SOFT_DIRTY=y") => {
            eprintln!("this kernel is built without CONFIG_MEM_SOFT_DIRTY");
            // The probe's own memory kinds (device kinds word their evidence their own way).
            let host_kinds: Vec<String> = Kind::all().into_iter().map(Kind::name).collect();
            for c in r
                .cells
                .iter()
                .filter(|c| c.mechanism == Mechanism::SoftDirty && host_kinds.contains(&c.memory))
            {
                // Nothing can set bit 55: the writes are made and none is reported, or the
                // probe could not make them at all.
                assert!(
                    matches!(
                        c.outcome,
                        Outcome::SilentMiss
                            | Outcome::NotApplicable
                            | Outcome::Unavailable { .. }
                            | Outcome::Errno { .. }
                    ),
                    "soft-dirty is compiled out: {}",
                    what(c)
                );
                if c.outcome == Outcome::SilentMiss {
                    // The cycle cells say what each harvest reported: nothing, every time.
                    let cycles_saw_nothing = c
                        .step
                        .as_deref()
                        .is_some_and(|s| s.starts_with(vmm_probe::rearm::STEP))
                        && !c
                            .evidence
                            .split("reported {")
                            .skip(1)
                            .any(|t| t.starts_with(|ch: char| ch.is_ascii_digit()));
                    assert!(
                        c.evidence.contains("bit 55 set on 0 of") || cycles_saw_nothing,
                        "soft-dirty is compiled out, yet a bit was seen: {}",
                        what(c)
                    );
                }
            }
        }
        Some(_) => eprintln!("this kernel is built with CONFIG_MEM_SOFT_DIRTY"),
        None => eprintln!("no /proc/config.gz here: soft-dirty checked against its evidence only"),
    }
}

/// The THP kind's note says huge only where AnonHugePages covers the whole region, and only
/// where the kernel has THP at all.
fn assert_thp_note_agrees(r: &Report) {
    let Some(thp) = r.kinds.iter().find(|k| k.memory == "anon THP") else {
        panic!("no anon THP kind line");
    };
    if !thp.available {
        return;
    }
    let kib = (Kind::AnonThp.units() * Kind::AnonThp.unit()) >> 10;
    let note = &thp.note;
    let kb_after = |prefix: &str| -> u64 {
        let i = note.find(prefix).unwrap_or_else(|| panic!("{note}")) + prefix.len();
        note[i..]
            .split(|ch: char| !ch.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{note}"))
    };
    if note.contains(" kB: huge") {
        assert_eq!(kb_after("AnonHugePages "), kib as u64, "{note}");
        assert!(
            Path::new("/sys/kernel/mm/transparent_hugepage").exists(),
            "huge without THP: {note}"
        );
    } else if note.contains("NOT (all) huge") {
        assert!(kb_after("AnonHugePages is only ") < kib as u64, "{note}");
    } else {
        assert!(note.contains("could not check hugeness"), "{note}");
    }
}

/// Each kind the probe could make has a cell for every mechanism; a kind it could not make says
/// why and has none (bar guest_memfd's KVM cells, which need no mapping).
fn assert_kinds_and_cells_agree(r: &Report) {
    for kind in Kind::all() {
        let name = kind.name();
        let status = r
            .kinds
            .iter()
            .find(|k| k.memory == name)
            .unwrap_or_else(|| panic!("no kind line for {name}"));
        let have: Vec<Mechanism> = cells(r, &name).map(|c| c.mechanism).collect();
        if status.available {
            for mech in Mechanism::ALL {
                assert!(have.contains(&mech), "{name}: no {mech:?} cell");
            }
        } else {
            assert!(
                !status.note.trim().is_empty(),
                "{name}: unavailable, no reason"
            );
            let memslot_only = matches!(kind, Kind::GuestMemfd { .. });
            assert!(
                have.iter().all(|m| memslot_only && m.is_kvm()),
                "{name} was not made ({}), yet has cells {have:?}",
                status.note
            );
        }
    }
}

/// The device lines agree with /dev: found only where the nodes are.
fn assert_devices_agree(r: &Report) {
    assert_eq!(r.devices.len(), 3, "{:?}", r.devices);
    let dev_names: Vec<String> = std::fs::read_dir("/dev")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // A VFIO group (/dev/vfio/<n>) or cdev (/dev/vfio/devices/vfio<n>): not the container node.
    let vfio_nodes = std::fs::read_dir("/dev/vfio")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .any(|e| e.file_name() != "vfio" && e.file_name() != "devices")
        })
        .unwrap_or(false)
        || std::fs::read_dir("/dev/vfio/devices").is_ok_and(|mut rd| rd.next().is_some());
    for d in &r.devices {
        let present = match d.device.as_str() {
            "GPU" => dev_names.iter().any(|n| n.starts_with("nvidia")),
            "VFIO" => vfio_nodes,
            "HMM" => dev_names.iter().any(|n| n.starts_with("hmm_dmirror")),
            other => panic!("unknown device line {other}"),
        };
        // The GPU line may be found through the CUDA driver alone; never found-less nodes.
        if d.device != "GPU" {
            assert_eq!(d.found, present, "{d:?}");
        } else if present {
            assert!(d.found, "{d:?}");
        }
        if !d.found {
            assert!(d.line.starts_with("no "), "an absent device says so: {d:?}");
        }
    }
}

#[test]
fn every_verdict_agrees_with_its_evidence_and_the_kernel() {
    let _host = HOST.lock().unwrap_or_else(|p| p.into_inner());
    let r = run(&ProbeOpts::default()).unwrap();
    let text = render::text(&r);
    eprintln!("{text}");
    let host_kinds: Vec<String> = Kind::all().into_iter().map(Kind::name).collect();
    for c in &r.cells {
        assert_verdict_agrees_with_evidence(c, host_kinds.contains(&c.memory));
    }
    assert_kinds_and_cells_agree(&r);
    // KVM dirty logging on the RAM kinds and the file mapping: the probe's guest wrote them.
    for mem in [
        "anon 4K",
        "anon THP",
        "memfd",
        "hugetlbfs",
        "file (MAP_SHARED)",
    ] {
        for c in cells(&r, mem).filter(|c| c.mechanism.is_kvm()) {
            assert_kvm_write_source(c);
        }
    }
    assert_guest_memfd_agrees(&r);
    assert_no_cell_works_beyond_what_the_kernel_offers(&r);
    assert_thp_note_agrees(&r);
    assert_devices_agree(&r);
    // The anonymous kind is the one every host has: its cells must all be there to be judged.
    for mech in Mechanism::ALL {
        assert!(
            cell(&r, "anon 4K", mech).is_some(),
            "no anon 4K {mech:?} cell\n{text}"
        );
    }
    assert!(
        !r.not_covered.iter().any(|n| n.contains("per memory kind")),
        "{:?}",
        r.not_covered
    );
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

/// The checks above, fed evidence of the kinds each verdict must carry and of the kinds it must
/// not: a "works" with a miss, a silent miss with none, a refusal without its errno.
#[test]
fn the_consistency_checks_reject_verdicts_their_evidence_contradicts() {
    fn cell(mechanism: Mechanism, outcome: Outcome, evidence: &str) -> Cell {
        Cell {
            memory: "anon 4K".into(),
            mechanism,
            step: None,
            outcome,
            evidence: evidence.into(),
            predicted: "-".into(),
            matches_prediction: None,
            armed_by: Some("UFFDIO_WRITEPROTECT (test)".into()),
            cycles: Some(1),
        }
    }
    fn rejected(c: Cell) -> bool {
        std::panic::catch_unwind(|| assert_verdict_agrees_with_evidence(&c, true)).is_err()
    }
    let exact = "wrote units {1, 2}; PAGEMAP_SCAN reported units {1, 2} (2 4K pages): 0 misses, 0 false positives";
    let missed =
        "wrote units {1, 2}; bit 55 reported units {} (0 4K pages): 2 misses, 0 false positives";
    let extra = "wrote pages {1}, reported {1, 5}: 0 missed, 1 false positives";
    let kvm_missed = "KVM_GET_DIRTY_LOG reported pages {1}: 0 misses, 0 false positives; then ...: 1 misses, 0 false positives";
    // Agreeing verdicts pass.
    assert_verdict_agrees_with_evidence(&cell(Mechanism::PagemapScan, Outcome::Works, exact), true);
    assert_verdict_agrees_with_evidence(
        &cell(Mechanism::SoftDirty, Outcome::SilentMiss, missed),
        true,
    );
    assert_verdict_agrees_with_evidence(
        &cell(Mechanism::KvmDirtyRing, Outcome::FalsePositive, extra),
        true,
    );
    assert_verdict_agrees_with_evidence(
        &cell(
            Mechanism::UffdMinor,
            Outcome::errno(libc::EINVAL),
            "UFFDIO_REGISTER RegisterMode(MINOR): System error (errno 22)",
        ),
        true,
    );
    assert_verdict_agrees_with_evidence(
        &cell(
            Mechanism::UffdMissing,
            Outcome::Works,
            "Missing fault at 0x1000 (touched 0x1123); resolved; thread read 0x77; UFFDIO_COPY filled 0x77",
        ),
        true,
    );
    // Contradicted verdicts are rejected.
    assert!(rejected(cell(Mechanism::SoftDirty, Outcome::Works, missed)));
    assert!(rejected(cell(
        Mechanism::KvmDirtyBitmap,
        Outcome::Works,
        kvm_missed
    )));
    assert!(rejected(cell(
        Mechanism::KvmDirtyRing,
        Outcome::Works,
        extra
    )));
    assert!(rejected(cell(
        Mechanism::PagemapScan,
        Outcome::SilentMiss,
        exact
    )));
    assert!(rejected(cell(
        Mechanism::KvmDirtyBitmap,
        Outcome::errno(libc::ENOTTY),
        "KVM_SET_USER_MEMORY_REGION2: refused"
    )));
    assert!(rejected(cell(
        Mechanism::UffdWp,
        Outcome::Works,
        "registered"
    )));
    assert!(rejected(cell(
        Mechanism::UffdMissing,
        Outcome::Works,
        "Missing fault at 0x1000 (touched 0x1123); resolved; thread read 0x00; UFFDIO_COPY filled 0x77",
    )));
    assert!(rejected(cell(
        Mechanism::SoftDirty,
        Outcome::Works,
        "clear_refs 4 accepted, 3 units written, bit 55 set on 0 of 16 pages: soft-dirty sees nothing",
    )));
    // A written-page verdict that does not say how its memory was armed (issue 16, item 4).
    let mut unarmed = cell(Mechanism::PagemapScan, Outcome::Works, exact);
    unarmed.armed_by = None;
    assert!(rejected(unarmed));
    let mut uncounted = cell(Mechanism::UffdWp, Outcome::SilentMiss, missed);
    uncounted.cycles = None;
    assert!(rejected(uncounted));
}

#[test]
fn two_runs_leave_the_host_as_it_was() {
    let _host = HOST.lock().unwrap_or_else(|p| p.into_inner());
    let before = host_state();
    let fds = fd_count();
    for _ in 0..2 {
        run(&ProbeOpts::default()).unwrap();
        assert_eq!(host_state(), before);
    }
    assert_eq!(fd_count(), fds, "file descriptors leaked");
    assert!(leftover_temp_files("/var/tmp").is_empty());
}

/// What the probe may change and must put back: the hugetlb pool and the THP policy.
fn host_state() -> (String, String, Option<String>) {
    let nr = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total = meminfo
        .lines()
        .find(|l| l.starts_with("HugePages_Total:"))
        .unwrap()
        .to_string();
    (nr, total, std::fs::read_to_string(THP_ENABLED).ok())
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
