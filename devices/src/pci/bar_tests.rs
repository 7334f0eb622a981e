//! BAR layouts: what is refused, and what the address map is asked for.

use super::bar::*;
use super::test_device::{h100_layout, GIB, MIB};

fn bar(index: u8, kind: BarKind, size: u64) -> Bar {
    Bar { index, kind, size }
}

const MEM64: BarKind = BarKind::Mem64 { prefetchable: true };
const MEM32: BarKind = BarKind::Mem32 {
    prefetchable: false,
};

#[test]
fn bad_layouts_are_refused_with_the_reason() {
    let cases = [
        (
            vec![bar(6, MEM32, 4096)],
            None,
            BarError::Index { index: 6 },
        ),
        (
            vec![bar(5, MEM64, 4096)],
            None,
            BarError::NoUpperHalf { index: 5 },
        ),
        (
            vec![bar(0, MEM64, 4096), bar(1, MEM32, 4096)],
            None,
            BarError::Taken {
                slot: BarSlot::Bar(1),
            },
        ),
        (
            vec![bar(0, MEM32, 3 * MIB)],
            None,
            BarError::NotPowerOfTwo {
                slot: BarSlot::Bar(0),
                size: 3 * MIB,
            },
        ),
        (
            vec![bar(0, MEM32, 8)],
            None,
            BarError::SizeOutOfRange {
                slot: BarSlot::Bar(0),
                size: 8,
                min: MIN_MEM_BAR,
                max: 1 << 31,
            },
        ),
        (
            vec![bar(0, MEM32, 4 * GIB)],
            None,
            BarError::SizeOutOfRange {
                slot: BarSlot::Bar(0),
                size: 4 * GIB,
                min: MIN_MEM_BAR,
                max: 1 << 31,
            },
        ),
        (
            vec![bar(0, BarKind::Io, 512)],
            None,
            BarError::SizeOutOfRange {
                slot: BarSlot::Bar(0),
                size: 512,
                min: MIN_IO_BAR,
                max: MAX_IO_BAR,
            },
        ),
        (
            vec![],
            Some(1024),
            BarError::SizeOutOfRange {
                slot: BarSlot::Rom,
                size: 1024,
                min: MIN_ROM,
                max: 1 << 31,
            },
        ),
    ];
    for (bars, rom, want) in cases {
        assert_eq!(BarLayout::new(&bars, rom), Err(want.clone()), "{want}");
    }
}

#[test]
fn h100_placement_requests_keep_64bit_and_prefetchable() {
    let reqs = h100_layout().placement_requests();
    let want = [
        (BarSlot::Bar(0), 16 * MIB, 16 * MIB, false, false),
        (BarSlot::Bar(1), 128 * GIB, 128 * GIB, true, true),
        (BarSlot::Bar(3), 32 * MIB, 32 * MIB, true, true),
        (BarSlot::Rom, 512 * 1024, 512 * 1024, false, false),
    ];
    assert_eq!(reqs.len(), want.len());
    for (r, (slot, size, align, pf, wide)) in reqs.iter().zip(want) {
        assert_eq!(
            (r.slot, r.size, r.align, r.prefetchable, r.is_64bit, r.io),
            (slot, size, align, pf, wide, false)
        );
    }
}

#[test]
fn small_memory_bars_are_page_aligned_and_io_bars_naturally() {
    let layout = BarLayout::new(&[bar(0, MEM32, 16), bar(1, BarKind::Io, 32)], None).unwrap();
    let reqs = layout.placement_requests();
    assert_eq!((reqs[0].size, reqs[0].align), (16, MIN_MEM_ALIGN));
    assert_eq!((reqs[1].size, reqs[1].align, reqs[1].io), (32, 32, true));
}

#[test]
fn bars_are_kept_in_register_order() {
    let layout = BarLayout::new(&[bar(4, MEM32, 4096), bar(0, MEM32, 4096)], None).unwrap();
    let order: Vec<u8> = layout.bars().iter().map(|b| b.index).collect();
    assert_eq!(order, [0, 4]);
}
