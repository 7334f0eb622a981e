use kvm_bindings::kvm_cpuid_entry2;

use super::*;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// An NVIDIA H100 as the host's vfio-pci shows it: BAR0 16 MiB (32-bit), BAR1 128 GiB and BAR3
/// 32 MiB (64-bit, prefetchable), and an expansion ROM.
fn h100() -> Vec<BarRequest> {
    vec![
        BarRequest {
            slot: BarSlot::Bar(0),
            kind: BarKind::Mem32,
            size: 16 * MIB,
        },
        BarRequest {
            slot: BarSlot::Bar(1),
            kind: BarKind::Mem64 { prefetchable: true },
            size: 128 * GIB,
        },
        BarRequest {
            slot: BarSlot::Bar(3),
            kind: BarKind::Mem64 { prefetchable: true },
            size: 32 * MIB,
        },
        BarRequest {
            slot: BarSlot::Rom,
            kind: BarKind::Mem32,
            size: 512 << 10,
        },
    ]
}

/// RAM end of an 8 GiB guest: 3 GiB below the hole, 5 GiB from 4 GiB.
const RAM_END_8G: u64 = 9 * GIB;

fn overlaps(a: Range, b: Range) -> bool {
    a.base < b.end() && b.base < a.end()
}

#[test]
fn h100_is_placed_naturally_aligned_at_39_40_and_46_bits() {
    for bits in [39u8, 40, 46] {
        let mut map = AddressMap::new(RAM_END_8G, bits).unwrap();
        let placed = map.place_device("H100", &h100()).unwrap();
        assert_eq!(placed.len(), 4, "{bits} bits");
        let ram = [
            Range {
                base: 0,
                size: MMIO32_START,
            },
            Range {
                base: MMIO32_END,
                size: RAM_END_8G - MMIO32_END,
            },
        ];
        for (p, want) in placed.iter().zip(h100()) {
            assert_eq!(p.request, want, "caller's order kept");
            let r = p.range;
            assert_eq!(r.size, want.size);
            assert_eq!(r.base % want.size, 0, "{} naturally aligned", want.slot);
            assert!(
                ram.iter().all(|m| !overlaps(*m, r)),
                "{} not over RAM",
                want.slot
            );
            let (lo, hi) = match want.kind {
                BarKind::Mem64 { .. } => map.mmio64_window().unwrap(),
                _ => (MMIO32_START, PLATFORM_START),
            };
            assert!(r.base >= lo && r.end() <= hi, "{} in its window", want.slot);
            assert!(r.end() <= 1 << bits, "{} below 2^{bits}", want.slot);
        }
        for (i, a) in placed.iter().enumerate() {
            for b in &placed[i + 1..] {
                assert!(!overlaps(a.range, b.range));
            }
        }
        // The first 128 GiB-aligned address above RAM.
        assert_eq!(placed[1].range.base, 128 * GIB, "{bits} bits");
        assert_eq!(map.mmio64_window(), Some((RAM_END_8G, 1 << bits)));
    }
}

#[test]
fn the_window_follows_the_bits_in_how_many_h100s_fit() {
    // 39 bits: 512 GiB of space, 128 GiB slots at 128, 256 and 384 GiB.
    // 40 bits: 1 TiB, slots up to 896 GiB; 896..1024 GiB crosses AMD's HyperTransport hole.
    for (bits, fit) in [(39u8, 3), (40, 6)] {
        let mut map = AddressMap::new(RAM_END_8G, bits).unwrap();
        for n in 0..fit {
            map.place_device(&format!("H100 #{n}"), &h100())
                .unwrap_or_else(|e| panic!("{bits} bits, device {n}: {e}"));
        }
        let err = map.place_device("one H100 too many", &h100()).unwrap_err();
        assert!(
            matches!(err, AddressError::DeviceDoesNotFit { ref unfit, .. } if unfit.phys_bits == bits)
        );
    }
    // 46 bits: 64 TiB; what runs out first is the 32-bit window (each needs a 16 MiB BAR0 there).
    let mut map = AddressMap::new(RAM_END_8G, 46).unwrap();
    for n in 0..32 {
        map.place_device(&format!("H100 #{n}"), &h100()).unwrap();
    }
}

#[test]
fn a_device_that_cannot_fit_is_refused_naming_sizes_and_bits() {
    // 36 bits (the architectural default): 64 GiB of guest-physical space in all.
    let mut map = AddressMap::new(RAM_END_8G, 36).unwrap();
    let err = map
        .place_device("H100 at 0000:01:00.0", &h100())
        .unwrap_err();
    let msg = err.to_string();
    for part in [
        "H100 at 0000:01:00.0",
        "BAR0 16 MiB (32-bit)",
        "BAR1 128 GiB (64-bit, prefetchable)",
        "BAR3 32 MiB (64-bit, prefetchable)",
        "ROM 512 KiB",
        "36 physical address bits",
        "64-bit MMIO window [0x240000000, 0x1000000000)",
    ] {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
}

#[test]
fn a_refused_device_leaves_nothing_placed() {
    let mut map = AddressMap::new(RAM_END_8G, 36).unwrap();
    let bars = [
        BarRequest {
            slot: BarSlot::Bar(0),
            kind: BarKind::Mem32,
            size: 256 * MIB,
        },
        BarRequest {
            slot: BarSlot::Bar(2),
            kind: BarKind::Mem64 {
                prefetchable: false,
            },
            size: 64 * GIB,
        },
    ];
    // The 256 MiB BAR is placed first (it is the only one that fits), then taken back.
    assert!(map.place_device("too big", &bars).is_err());
    let again = map.place_device("small", &bars[..1]).unwrap();
    assert_eq!(again[0].range.base, MMIO32_START);
}

#[test]
fn without_a_64_bit_window_the_refusal_says_so() {
    let mut map = AddressMap::new(1 << 36, 36).unwrap();
    assert_eq!(map.mmio64_window(), None);
    let msg = map.place_device("H100", &h100()).unwrap_err().to_string();
    assert!(msg.contains("(none: RAM reaches the top"), "{msg}");
}

#[test]
fn bar_sizes_must_be_powers_of_two() {
    let mut map = AddressMap::new(RAM_END_8G, 46).unwrap();
    let bad = [BarRequest {
        slot: BarSlot::Bar(2),
        kind: BarKind::Mem32,
        size: 3 * MIB,
    }];
    let msg = map.place_device("odd", &bad).unwrap_err().to_string();
    assert!(msg.contains("BAR2 is 3145728 bytes"), "{msg}");
}

#[test]
fn virtio_slots_are_consecutive_pages_from_the_hole_start() {
    let mut map = AddressMap::new(128 * MIB, 46).unwrap();
    let first = map.allocate_virtio_mmio().unwrap();
    let second = map.allocate_virtio_mmio().unwrap();
    assert_eq!(first.base, MMIO32_START);
    assert_eq!(second.base, MMIO32_START + VIRTIO_MMIO_SLOT);
    assert_eq!(second.size, VIRTIO_MMIO_SLOT);
}

#[test]
fn fixed_ranges_in_the_hole_are_never_handed_out() {
    // 256 MiB-aligned places in the hole: 3 GiB (free), 0xd000_0000 (the boot timer's page),
    // 0xe000_0000 (free), 0xf000_0000 (overlaps the IOAPIC/LAPIC/firmware area).
    let mut map = AddressMap::new(128 * MIB, 46).unwrap();
    let bar = [BarRequest {
        slot: BarSlot::Bar(0),
        kind: BarKind::Mem32,
        size: 256 * MIB,
    }];
    let a = map.place_device("a", &bar).unwrap()[0].range.base;
    let b = map.place_device("b", &bar).unwrap()[0].range.base;
    assert_eq!((a, b), (MMIO32_START, 0xe000_0000));
    assert!(map.place_device("c", &bar).is_err());
}

#[test]
fn io_and_small_memory_bars_are_aligned_above_their_minimum() {
    let mut map = AddressMap::new(128 * MIB, 46).unwrap();
    let bars = [
        BarRequest {
            slot: BarSlot::Bar(0),
            kind: BarKind::Io,
            size: 0x20,
        },
        BarRequest {
            slot: BarSlot::Bar(1),
            kind: BarKind::Mem32,
            size: 0x100,
        },
        BarRequest {
            slot: BarSlot::Bar(2),
            kind: BarKind::Mem32,
            size: 0x100,
        },
    ];
    let placed = map.place_device("small", &bars).unwrap();
    assert_eq!(
        placed[0].range.base, PIO_ALLOC_START,
        "I/O above the ISA range"
    );
    assert_eq!(placed[1].range.base % 4096, 0);
    assert_eq!(placed[2].range.base % 4096, 0);
    assert_ne!(placed[1].range.base, placed[2].range.base);
}

fn cpuid_with(leaf: Option<u32>) -> CpuId {
    let mut entries = vec![kvm_cpuid_entry2 {
        function: 0,
        eax: 0x8000_0008,
        ..Default::default()
    }];
    if let Some(eax) = leaf {
        entries.push(kvm_cpuid_entry2 {
            function: 0x8000_0008,
            eax,
            ..Default::default()
        });
    }
    CpuId::from_entries(&entries).unwrap()
}

#[test]
fn phys_bits_come_from_leaf_80000008_capped() {
    assert_eq!(guest_phys_bits(&cpuid_with(Some(0x3027))), 39);
    assert_eq!(guest_phys_bits(&cpuid_with(Some(0x302e))), 46);
    assert_eq!(
        guest_phys_bits(&cpuid_with(Some(0x3034))),
        MAX_PHYS_BITS,
        "52 capped"
    );
    // EAX[23:16]: KVM's own limit on guest-physical addresses wins when lower.
    assert_eq!(guest_phys_bits(&cpuid_with(Some(0x28_3034))), 40);
    assert_eq!(guest_phys_bits(&cpuid_with(None)), 36);
}
