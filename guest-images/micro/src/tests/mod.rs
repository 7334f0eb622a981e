use std::process::Command;

use guest_abi::{layout, micro};

use crate::*;

mod native;

const REGION: u64 = layout::MICRO_REGION_GPA;

fn workload(pages: u64, pattern: Pattern, passes: u64, param: u64) -> Workload {
    Workload::new(REGION, pages, pattern, passes, param, 42).expect("valid workload")
}

#[test]
fn pattern_names_round_trip() {
    for p in Pattern::ALL {
        assert_eq!(p.name().parse::<Pattern>(), Ok(p));
        assert_eq!(Pattern::from_abi(p.abi()), Some(p));
        assert_eq!(p.to_string(), p.name());
    }
    assert_eq!(
        "Sweep".parse::<Pattern>(),
        Err(WorkloadError::UnknownPattern("Sweep".into()))
    );
    assert_eq!(Pattern::from_abi(4), None);
}

#[test]
fn sweep_writes_every_page_in_order_each_pass() {
    let w = workload(100, Pattern::Sweep, 3, 0);
    let writes: Vec<_> = w.writes().collect();
    assert_eq!(writes.len(), 300);
    for (n, wr) in writes.iter().enumerate() {
        let n = n as u64;
        assert_eq!(wr.pass, n / 100 + 1);
        assert_eq!(wr.index, n % 100);
        assert_eq!(wr.page, n % 100);
        assert_eq!(wr.value, micro::store_value(wr.pass, wr.index));
    }
    for pass in 1..=3 {
        assert_eq!(w.pages_written_in_pass(pass).count(), 100);
    }
    assert!(w.pages_written_in_pass(4).is_empty());
}

#[test]
fn sparse_writes_every_stride_page() {
    let w = workload(100, Pattern::Sparse, 2, 7);
    assert_eq!(w.writes_per_pass(), 15); // pages 0, 7, ..., 98
    let set = w.pages_written_in_pass(2);
    assert_eq!(
        set.iter().collect::<Vec<_>>(),
        (0..100).step_by(7).collect::<Vec<_>>()
    );

    // Stride 0 means 1; a stride beyond the region writes page 0 only.
    let w = workload(10, Pattern::Sparse, 1, 0);
    assert_eq!(w.pages_written_in_pass(1).count(), 10);
    let w = workload(10, Pattern::Sparse, 1, u64::MAX);
    assert_eq!(w.pages_written_in_pass(1).iter().collect::<Vec<_>>(), [0]);
}

#[test]
fn hotset_sends_about_90_percent_of_writes_to_the_hot_tenth() {
    let w = workload(10_000, Pattern::Hotset, 1, 100_000);
    let hot = w.writes().filter(|wr| wr.page < 1_000).count() as f64;
    // 90% by design plus the hot tenth of the 10% uniform writes: 91%.
    let share = hot / 100_000.0;
    assert!((0.90..0.92).contains(&share), "hot share {share}");
    assert!(w.writes().all(|wr| wr.page < 10_000));

    // A region under 10 pages still has a hot set of one page.
    let w = workload(5, Pattern::Hotset, 1, 1000);
    let zero = w.writes().filter(|wr| wr.page == 0).count();
    assert!(zero > 900, "{zero}");
}

#[test]
fn random_spreads_over_the_region() {
    let w = workload(64, Pattern::Random, 1, 64 * 100);
    let mut counts = [0u32; 64];
    for wr in w.writes() {
        counts[wr.page as usize] += 1;
    }
    assert!(counts.iter().all(|&c| (50..150).contains(&c)), "{counts:?}");
}

#[test]
fn writes_are_deterministic_and_depend_on_the_seed() {
    let a = workload(1000, Pattern::Random, 3, 500);
    let same: Vec<_> = a.writes().collect();
    assert_eq!(a.writes().collect::<Vec<_>>(), same);
    let b = Workload::new(REGION, 1000, Pattern::Random, 3, 500, 43).expect("valid");
    assert_ne!(
        b.writes().map(|w| w.page).collect::<Vec<_>>(),
        same.iter().map(|w| w.page).collect::<Vec<_>>()
    );
    // Seed 0 behaves as seed 1.
    let zero = Workload::new(REGION, 1000, Pattern::Random, 1, 500, 0).expect("valid");
    let one = Workload::new(REGION, 1000, Pattern::Random, 1, 500, 1).expect("valid");
    assert_eq!(
        zero.writes().collect::<Vec<_>>(),
        one.writes().collect::<Vec<_>>()
    );
}

#[test]
fn prng_carries_over_between_passes() {
    let w = workload(1000, Pattern::Hotset, 5, 300);
    let all: Vec<_> = w.writes().collect();
    let from3: Vec<_> = w.writes_from_pass(3).collect();
    assert_eq!(from3, all[600..]);
    // Passes differ: the state was not reset.
    let pages = |pass| {
        all.iter()
            .filter(move |wr| wr.pass == pass)
            .map(|wr| wr.page)
    };
    assert!(pages(1).ne(pages(2)));
    // The first write uses the state advanced once from the seed.
    assert_eq!(
        all[0].page,
        micro::page_for(micro::PATTERN_HOTSET, 1000, 300, 0, micro::xorshift64(42))
    );
}

#[test]
fn endless_workloads_keep_going() {
    let w = workload(10, Pattern::Sweep, 0, 0);
    assert_eq!(w.writes().nth(10_000).map(|wr| wr.pass), Some(1001));
    assert_eq!(w.final_image(), None);
    assert_eq!(
        w.image_after(2),
        workload(10, Pattern::Sweep, 2, 0).final_image().unwrap()
    );
}

#[test]
fn final_image_holds_each_page_s_last_write() {
    let w = workload(10, Pattern::Sparse, 3, 4);
    let image = w.final_image().expect("finite");
    let expected: Vec<_> = (0..10)
        .map(|page| (page % 4 == 0).then(|| micro::store_value(3, page / 4)))
        .collect();
    assert_eq!(image, expected);

    let w = workload(50, Pattern::Random, 4, 20);
    let image = w.final_image().expect("finite");
    let mut written = PageBitmap::new(50);
    for wr in w.writes() {
        written.insert(wr.page);
    }
    for (page, value) in image.iter().enumerate() {
        assert_eq!(value.is_some(), written.contains(page as u64));
    }
    assert_eq!(written, w.pages_written_in_passes(1, 4));
}

#[test]
fn mailbox_round_trips() {
    let w = Workload::new(0x80_0000, 77, Pattern::Hotset, 9, 1234, 5).expect("valid");
    let mut page = [0xaa; MAILBOX_SIZE];
    w.write_mailbox(&mut page);
    assert_eq!(page[..8], *b"MICROGST");
    assert_eq!(Workload::from_mailbox(&page), Ok(w));
    assert_eq!(current_pass(&page), 0);
    assert_eq!(page[72..80], 1u64.to_le_bytes()); // one vCPU
    assert!(page[80..].iter().all(|&b| b == 0));

    let mut bad = page;
    bad[0] = b'X';
    assert!(matches!(
        Workload::from_mailbox(&bad),
        Err(WorkloadError::BadMagic(_))
    ));
    let mut bad = page;
    bad[8] = 7;
    assert_eq!(
        Workload::from_mailbox(&bad),
        Err(WorkloadError::BadVersion(7))
    );
    let mut bad = page;
    bad[32] = 9;
    assert_eq!(
        Workload::from_mailbox(&bad),
        Err(WorkloadError::UnknownPatternValue(9))
    );
}

#[test]
fn invalid_workloads_are_rejected() {
    let new = |gpa, pages, pattern, param| Workload::new(gpa, pages, pattern, 1, param, 1);
    assert_eq!(
        new(REGION, 0, Pattern::Sweep, 0),
        Err(WorkloadError::NoPages)
    );
    assert_eq!(
        new(REGION + 8, 1, Pattern::Sweep, 0),
        Err(WorkloadError::Unaligned(REGION + 8))
    );
    assert!(matches!(
        new(0x20_0000, 1, Pattern::Sweep, 0),
        Err(WorkloadError::OutOfRange { .. })
    ));
    let top = Workload::MAX_REGION_END;
    assert!(new(top - PAGE_SIZE, 1, Pattern::Sweep, 0).is_ok());
    assert!(matches!(
        new(top - PAGE_SIZE, 2, Pattern::Sweep, 0),
        Err(WorkloadError::OutOfRange { .. })
    ));
    assert!(matches!(
        new(REGION, u64::MAX, Pattern::Sweep, 0),
        Err(WorkloadError::OutOfRange { .. })
    ));
    assert_eq!(
        new(REGION, 1, Pattern::Random, 0),
        Err(WorkloadError::NoWrites(Pattern::Random))
    );
    assert!(new(REGION, 1, Pattern::Sparse, 0).is_ok());
}

#[test]
fn bitmap_matches_the_dirty_log_layout() {
    let mut set = PageBitmap::new(130);
    for page in [0, 63, 64, 129] {
        set.insert(page);
    }
    assert_eq!(set.words(), [1 | 1 << 63, 1, 2]);
    assert_eq!(set.iter().collect::<Vec<_>>(), [0, 63, 64, 129]);
    assert_eq!(set.count(), 4);
    // Bits past the region (a log of a bigger slot) are dropped.
    assert_eq!(PageBitmap::from_words(130, &[1 | 1 << 63, 1, u64::MAX]), {
        let mut s = set.clone();
        s.insert(128);
        s
    });
    assert!(!set.contains(130));
}

#[test]
fn payload_fits_and_ends_in_a_guard() {
    assert!(!PAYLOAD.is_empty());
    assert!((PAYLOAD.len() as u64) < layout::MICRO_MAX_SIZE);
    // No int3 anywhere (it would be padding or a breakpoint; neither may run), and the last
    // instruction is the guard that jumps back to the exit `out`, so nothing falls off the end.
    assert!(!PAYLOAD.contains(&0xcc));
    assert_eq!(PAYLOAD[PAYLOAD.len() - 3..], [0xef, 0xeb, 0xfd]);
    assert!(USER_ENTRY_OFFSET > 0 && USER_ENTRY_OFFSET < PAYLOAD.len());
    // It starts with the magic check: movabs $MAGIC, %rax.
    assert_eq!(PAYLOAD[..2], [0x48, 0xb8]);
    assert_eq!(PAYLOAD[2..10], micro::MAGIC.to_le_bytes());
}

/// Disassembles the payload (binutils are needed to build it anyway) and checks what each
/// privilege level may run: CPL0 a few emulator-friendly instructions, CPL3 nothing privileged.
#[test]
fn payload_disassembles_to_the_expected_instructions() {
    let dir = std::env::temp_dir().join(format!("micro-guest-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let bin = dir.join("payload.bin");
    std::fs::write(&bin, PAYLOAD).expect("write payload");
    let out = Command::new("objdump")
        .args(["-D", "-b", "binary", "-m", "i386:x86-64"])
        .arg(&bin)
        .output()
        .expect("run objdump");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let insns: Vec<(usize, String)> = text
        .lines()
        .filter_map(|line| {
            let (addr, rest) = line.split_once(":\t")?;
            let addr = usize::from_str_radix(addr.trim(), 16).ok()?;
            let mnemonic = rest
                .split('\t')
                .nth(1)?
                .split_whitespace()
                .next()?
                .to_owned();
            Some((addr, mnemonic))
        })
        .collect();
    assert!(!insns.is_empty(), "{text}");
    assert!(!text.contains("(bad)"), "{text}");
    // Plain moves, compares, pushes, shifts, one string store and ltr/iretq: all within what
    // KVM's emulator handles.
    let allowed_cpl0 = [
        "movabs", "cmp", "cmpq", "jne", "movw", "lea", "mov", "xor", "rep", "movb", "movq", "ltr",
        "push", "iretq", "jmp", "out", "hlt", "test", "movzbl", "shl", "sub", "or",
    ];
    let (cpl0, cpl3): (Vec<_>, Vec<_>) = insns.iter().partition(|(a, _)| *a < USER_ENTRY_OFFSET);
    for (addr, m) in &cpl0 {
        assert!(allowed_cpl0.contains(&m.as_str()), "CPL0 {m} at {addr:#x}");
    }
    assert!(cpl0.len() <= 40, "{} CPL0 instructions", cpl0.len());
    for (addr, m) in &cpl3 {
        assert!(
            !["hlt", "iretq", "int3", "cli", "sti", "wrmsr", "rdmsr"].contains(&m.as_str()),
            "CPL3 {m} at {addr:#x}"
        );
    }
    assert!(
        cpl3.iter().any(|(a, _)| *a == USER_ENTRY_OFFSET),
        "user_entry is an instruction boundary"
    );
}

fn smp(vcpus: u64, shared: u64) -> Workload {
    Workload::new(REGION, 100, Pattern::Random, 3, 150, 42)
        .and_then(|w| w.with_vcpus(vcpus, REGION + vcpus * 100 * PAGE_SIZE, shared))
        .expect("valid workload")
}

#[test]
fn one_vcpu_without_shared_pages_is_the_plain_workload() {
    let plain = workload(100, Pattern::Random, 3, 150);
    let one = plain.with_vcpus(1, 0x1234_5000, 0).expect("valid");
    assert_eq!(one, plain);
    assert_eq!(
        one.vcpu_writes(0).collect::<Vec<_>>(),
        plain.writes().collect::<Vec<_>>()
    );
    for wr in plain.writes() {
        assert_eq!(wr.vcpu, 0);
        assert_eq!(wr.gpa, plain.page_gpa(wr.page));
        assert_eq!(wr.value, micro::store_value(wr.pass, wr.index));
    }
}

#[test]
fn each_vcpu_writes_its_own_region_and_slots() {
    let w = smp(4, 3);
    assert_eq!(w.logical_pages(), 103);
    assert_eq!(w.private_regions_end(), REGION + 400 * PAGE_SIZE);
    let mut shared_writes = 0;
    for vcpu in 0..4 {
        let private = w.private_region_gpa(vcpu)..w.private_region_gpa(vcpu) + 100 * PAGE_SIZE;
        for wr in w.vcpu_writes(vcpu) {
            assert_eq!(wr.vcpu, vcpu);
            assert_eq!(wr.value, micro::store_value_for(vcpu, wr.pass, wr.index));
            if wr.page < 100 {
                assert!(private.contains(&wr.gpa), "{wr:?}");
                assert_eq!(wr.gpa % PAGE_SIZE, 0);
            } else {
                shared_writes += 1;
                assert_eq!(
                    wr.gpa,
                    w.shared_gpa() + (wr.page - 100) * PAGE_SIZE + 8 * vcpu
                );
            }
        }
    }
    assert!(shared_writes > 0, "random writes reach the shared pages");
    // Different seeds per vCPU: different page sequences.
    let pages = |v| w.vcpu_writes(v).map(|wr| wr.page).collect::<Vec<_>>();
    assert_ne!(pages(0), pages(1));
    assert_eq!(
        w.vcpu_writes(2).next().map(|wr| wr.page),
        Some(micro::xorshift64(micro::vcpu_seed(42, 2)) % 103)
    );
}

#[test]
fn images_hold_every_vcpu_s_last_writes() {
    let w = smp(3, 2);
    let image = w.final_image().expect("finite");
    let shared = w.shared_image_after(3);
    assert_eq!(image.len(), 300);
    assert_eq!(shared.len(), 2 * 512);
    let mut want_private = vec![None; 300];
    let mut want_shared = vec![None; 1024];
    for vcpu in 0..3 {
        for wr in w.vcpu_writes(vcpu) {
            if wr.page < 100 {
                want_private[(vcpu * 100 + wr.page) as usize] = Some(wr.value);
            } else {
                want_shared[((wr.gpa - w.shared_gpa()) / 8) as usize] = Some(wr.value);
            }
        }
    }
    assert_eq!(image, want_private);
    assert_eq!(shared, want_shared);
    // Only slots 0..3 of a shared page are ever written.
    assert!(shared
        .chunks(512)
        .all(|page| page[3..].iter().all(Option::is_none)));
    // The union of the private pages written per pass covers every written page.
    let written = w.pages_written_in_passes(1, 3);
    assert_eq!(written.pages(), 300);
    assert_eq!(
        written.count(),
        image.iter().filter(|v| v.is_some()).count() as u64
    );
}

#[test]
fn smp_mailbox_round_trips_and_progress_is_per_vcpu() {
    let w = smp(8, 5);
    let mut page = w.mailbox();
    assert_eq!(Workload::from_mailbox(&page), Ok(w));
    page[micro::vcpu_pass_offset(7) as usize..][..8].copy_from_slice(&6u64.to_le_bytes());
    assert_eq!(vcpu_current_pass(&page, 7), 6);
    assert_eq!(vcpu_current_pass(&page, 0), 0);
    assert_eq!(vcpu_current_pass(&page, 8), 0);
    // A count of 0 is read as 1, as the payload does.
    let one = workload(100, Pattern::Sweep, 1, 0);
    let mut page = one.mailbox();
    page[micro::OFF_VCPUS as usize..][..8].fill(0);
    assert_eq!(Workload::from_mailbox(&page), Ok(one));
}

#[test]
fn invalid_vcpu_counts_and_shared_regions_are_rejected() {
    let w = workload(100, Pattern::Sweep, 1, 0);
    assert_eq!(w.with_vcpus(0, 0, 0), Err(WorkloadError::VcpuCount(0)));
    assert_eq!(w.with_vcpus(9, 0, 0), Err(WorkloadError::VcpuCount(9)));
    let end = REGION + 400 * PAGE_SIZE;
    assert!(w.with_vcpus(4, end, 1).is_ok());
    assert_eq!(
        w.with_vcpus(4, end + 8, 1),
        Err(WorkloadError::SharedUnaligned(end + 8))
    );
    // Overlapping a private region, below the payload, beyond the hole.
    for gpa in [end - PAGE_SIZE, 0x20_0000, Workload::MAX_REGION_END] {
        assert!(
            matches!(
                w.with_vcpus(4, gpa, 1),
                Err(WorkloadError::SharedOutOfRange { .. })
            ),
            "{gpa:#x}"
        );
    }
    // Private regions past the hole.
    let top = Workload::new(
        Workload::MAX_REGION_END - PAGE_SIZE,
        1,
        Pattern::Sweep,
        1,
        0,
        1,
    )
    .expect("valid");
    assert!(matches!(
        top.with_vcpus(2, 0, 0),
        Err(WorkloadError::OutOfRange { .. })
    ));
}

#[test]
fn port_values_carry_the_vcpu() {
    assert_eq!(micro::port_value(0, 5), 5);
    assert_eq!(micro::port_value(3, 5), 3 << 24 | 5);
    assert_eq!(micro::port_value(1, (1 << 24) + 2), 1 << 24 | 2);
    assert_eq!(micro::split_port_value(micro::port_value(7, 123)), (7, 123));
    assert_eq!(micro::vcpu_seed(42, 0), 42);
    assert_ne!(micro::vcpu_seed(42, 1), micro::vcpu_seed(42, 2));
}
