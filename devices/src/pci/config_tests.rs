//! Config space: masks, RW1C, BAR sizing in the H100's shape, moves and decode reported to the
//! owner, the capability list, and guest accesses of every size at every offset.

use super::bar::{Bar, BarKind, BarLayout, BarSlot};
use super::config::*;
use super::test_device::{h100_layout, GIB};

fn h100() -> ConfigSpace {
    ConfigSpace::new(&header(), h100_layout(), true)
}

fn header() -> ConfigHeader {
    ConfigHeader {
        vendor_id: 0x10de,
        device_id: 0x2330,
        class_code: 0x03,
        subclass: 0x02,
        revision_id: 0xa1,
        interrupt_pin: 1,
        ..ConfigHeader::default()
    }
}

fn read32(cfg: &ConfigSpace, offset: usize) -> u32 {
    let mut b = [0; 4];
    cfg.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn write32(cfg: &mut ConfigSpace, offset: usize, v: u32) -> Vec<ConfigEvent> {
    cfg.write(offset, &v.to_le_bytes())
}

fn bar_reg(i: usize) -> usize {
    BAR0 + 4 * i
}

/// The guest's probe of one BAR register: write all ones, read, restore.
fn probe(cfg: &mut ConfigSpace, offset: usize) -> (u32, Vec<ConfigEvent>) {
    let orig = read32(cfg, offset);
    let mut events = write32(cfg, offset, u32::MAX);
    let sized = read32(cfg, offset);
    events.extend(write32(cfg, offset, orig));
    (sized, events)
}

#[test]
fn identity_registers_are_read_only() {
    let mut cfg = h100();
    let before: Vec<u32> = [0x00, 0x08, 0x2c].map(|o| read32(&cfg, o)).to_vec();
    for o in [0x00, 0x08, 0x2c] {
        write32(&mut cfg, o, u32::MAX);
    }
    let after: Vec<u32> = [0x00, 0x08, 0x2c].map(|o| read32(&cfg, o)).to_vec();
    assert_eq!(before, after);
    assert_eq!(read32(&cfg, 0), 0x2330_10de);
    assert_eq!(read32(&cfg, 0x08), 0x0302_00a1);
}

#[test]
fn command_keeps_only_its_writable_bits() {
    let mut cfg = h100();
    cfg.write(COMMAND, &0xffffu16.to_le_bytes());
    assert_eq!(cfg.read_u16(COMMAND), COMMAND_WRITABLE);
}

#[test]
fn status_error_bits_clear_on_one_and_others_stay() {
    let mut cfg = h100();
    cfg.set_u16(STATUS, 0xf900 | STATUS_CAPABILITIES).unwrap();
    cfg.write(STATUS, &0x0100u16.to_le_bytes());
    assert_eq!(cfg.read_u16(STATUS), 0xf800 | STATUS_CAPABILITIES);
    // Writing zeros clears nothing; writing ones to read-only bits sets nothing.
    cfg.write(STATUS, &0u16.to_le_bytes());
    assert_eq!(cfg.read_u16(STATUS), 0xf800 | STATUS_CAPABILITIES);
    cfg.write(STATUS, &0x00ffu16.to_le_bytes());
    assert_eq!(cfg.read_u16(STATUS), 0xf800 | STATUS_CAPABILITIES);
}

#[test]
fn interrupt_line_is_writable_and_pin_is_not() {
    let mut cfg = h100();
    cfg.write(INTERRUPT_LINE, &[0x0b, 0x04]);
    assert_eq!(cfg.read_u8(INTERRUPT_LINE), 0x0b);
    assert_eq!(cfg.read_u8(INTERRUPT_PIN), 1);
}

#[test]
fn h100_bars_size_as_the_nvidia_driver_expects() {
    let mut cfg = h100();
    // BAR0: 16 MiB, 32-bit, not prefetchable.
    assert_eq!(probe(&mut cfg, bar_reg(0)).0, 0xff00_0000);
    // BAR1/2: 128 GiB, 64-bit, prefetchable (type 10b, prefetch bit): no low address bits.
    assert_eq!(probe(&mut cfg, bar_reg(1)).0, 0x0000_000c);
    assert_eq!(probe(&mut cfg, bar_reg(2)).0, 0xffff_ffe0);
    // BAR3/4: 32 MiB, 64-bit, prefetchable.
    assert_eq!(probe(&mut cfg, bar_reg(3)).0, 0xfe00_000c);
    assert_eq!(probe(&mut cfg, bar_reg(4)).0, 0xffff_ffff);
    // BAR5: not implemented.
    assert_eq!(probe(&mut cfg, bar_reg(5)).0, 0);
    // ROM, probed the way Linux does (enable bit left clear): 512 KiB.
    write32(&mut cfg, ROM_BAR, !ROM_ENABLE);
    assert_eq!(read32(&cfg, ROM_BAR), 0xfff8_0000);
    // The size the guest computes from the two halves.
    let lo = u64::from(probe(&mut cfg, bar_reg(1)).0 & !0xf);
    let hi = u64::from(probe(&mut cfg, bar_reg(2)).0);
    assert_eq!(!(lo | hi << 32) + 1, 128 * GIB);
}

#[test]
fn probing_restores_the_address_and_reports_nothing() {
    let mut cfg = h100();
    cfg.set_bar_address(BarSlot::Bar(0), 0xc000_0000).unwrap();
    cfg.set_bar_address(BarSlot::Bar(1), 0x40_0000_0000)
        .unwrap();
    for i in 0..6 {
        let (_, events) = probe(&mut cfg, bar_reg(i));
        assert!(events.is_empty(), "BAR{i}: {events:?}");
    }
    assert_eq!(cfg.bar_address(BarSlot::Bar(0)), Some(0xc000_0000));
    assert_eq!(cfg.bar_address(BarSlot::Bar(1)), Some(0x40_0000_0000));
    assert_eq!(read32(&cfg, bar_reg(1)), 0xc, "flags survive");
}

#[test]
fn io_and_prefetchable_32bit_bars_size_with_their_flags() {
    let layout = BarLayout::new(
        &[
            Bar {
                index: 0,
                kind: BarKind::Io,
                size: 32,
            },
            Bar {
                index: 1,
                kind: BarKind::Mem32 { prefetchable: true },
                size: 1 << 20,
            },
        ],
        None,
    )
    .unwrap();
    let mut cfg = ConfigSpace::new(&header(), layout, false);
    assert_eq!(probe(&mut cfg, bar_reg(0)).0, 0xffff_ffe1);
    assert_eq!(probe(&mut cfg, bar_reg(1)).0, 0xfff0_0008);
}

#[test]
fn a_32bit_bar_move_is_reported_once() {
    let mut cfg = h100();
    cfg.set_bar_address(BarSlot::Bar(0), 0xc000_0000).unwrap();
    let events = write32(&mut cfg, bar_reg(0), 0xd000_0000);
    let moved = ConfigEvent::BarMoved {
        slot: BarSlot::Bar(0),
        from: 0xc000_0000,
        to: 0xd000_0000,
    };
    assert_eq!(events, [moved]);
    assert!(write32(&mut cfg, bar_reg(0), 0xd000_0000).is_empty());
    assert_eq!(cfg.bar_address(BarSlot::Bar(0)), Some(0xd000_0000));
}

#[test]
fn a_64bit_bar_move_is_reported_when_its_upper_half_is_written() {
    let mut cfg = h100();
    cfg.set_bar_address(BarSlot::Bar(3), 0x40_0000_0000)
        .unwrap();
    assert!(write32(&mut cfg, bar_reg(3), 0x0200_0000).is_empty());
    let events = write32(&mut cfg, bar_reg(4), 0x60);
    assert_eq!(
        events,
        [ConfigEvent::BarMoved {
            slot: BarSlot::Bar(3),
            from: 0x40_0000_0000,
            to: 0x60_0200_0000,
        }]
    );
    // Both halves in one 8-byte write: one event.
    let mut both = 0x0400_0000u32.to_le_bytes().to_vec();
    both.extend_from_slice(&0x70u32.to_le_bytes());
    let events = cfg.write(bar_reg(3), &both);
    assert_eq!(
        events,
        [ConfigEvent::BarMoved {
            slot: BarSlot::Bar(3),
            from: 0x60_0200_0000,
            to: 0x70_0400_0000,
        }]
    );
}

#[test]
fn rom_move_and_enable_are_reported() {
    let mut cfg = h100();
    cfg.set_bar_address(BarSlot::Rom, 0xc100_0000).unwrap();
    let events = write32(&mut cfg, ROM_BAR, 0xc200_0000 | ROM_ENABLE);
    assert_eq!(
        events,
        [
            ConfigEvent::RomDecode(true),
            ConfigEvent::BarMoved {
                slot: BarSlot::Rom,
                from: 0xc100_0000,
                to: 0xc200_0000,
            }
        ]
    );
    assert_eq!(read32(&cfg, ROM_BAR), 0xc200_0001);
}

#[test]
fn decode_changes_are_reported_from_the_command_register() {
    let mut cfg = h100();
    let mem = COMMAND_MEMORY | COMMAND_BUS_MASTER;
    assert_eq!(
        cfg.write(COMMAND, &mem.to_le_bytes()),
        [ConfigEvent::MemoryDecode(true)]
    );
    assert!(cfg.write(COMMAND, &mem.to_le_bytes()).is_empty());
    assert_eq!(
        cfg.write(COMMAND, &[(mem | COMMAND_IO) as u8]),
        [ConfigEvent::IoDecode(true)]
    );
    assert!(
        cfg.write(COMMAND + 1, &[0x04]).is_empty(),
        "INTx disable only"
    );
    assert_eq!(
        cfg.write(COMMAND, &[0]),
        [
            ConfigEvent::MemoryDecode(false),
            ConfigEvent::IoDecode(false)
        ]
    );
    assert!(!cfg.memory_enabled() && !cfg.io_enabled());
}

#[test]
fn set_bar_address_refuses_absent_and_misaligned_bars() {
    let mut cfg = h100();
    assert_eq!(
        cfg.set_bar_address(BarSlot::Bar(2), 0),
        Err(ConfigError::NoSuchBar {
            slot: BarSlot::Bar(2)
        })
    );
    assert!(matches!(
        cfg.set_bar_address(BarSlot::Bar(1), 64 * GIB),
        Err(ConfigError::BadAddress { .. })
    ));
    assert!(matches!(
        cfg.set_bar_address(BarSlot::Bar(0), 1 << 32),
        Err(ConfigError::BadAddress { .. })
    ));
}

#[test]
fn capabilities_are_linked_and_walked_in_order() {
    let mut cfg = h100();
    let a = cfg.add_capability(0x01, &[0; 6], &[0; 6]).unwrap();
    let b = cfg.add_capability(0x10, &[0; 3], &[0; 3]).unwrap();
    let c = cfg.add_capability(0x09, &[0; 2], &[0; 2]).unwrap();
    assert_eq!((a, b, c), (0x40, 0x48, 0x50), "dword aligned, packed");
    assert_ne!(cfg.read_u16(STATUS) & STATUS_CAPABILITIES, 0);
    assert_eq!(cfg.read_u8(CAPABILITIES_POINTER), 0x40);
    let x = cfg
        .add_extended_capability(0x0001, 2, &[0; 8], &[0; 8])
        .unwrap();
    let y = cfg
        .add_extended_capability(0x000b, 1, &[0; 4], &[0; 4])
        .unwrap();
    assert_eq!((x, y), (0x100, 0x10c));
    let walked: Vec<(u16, usize, bool)> = cfg
        .capabilities()
        .iter()
        .map(|c| (c.id, c.offset, c.extended))
        .collect();
    assert_eq!(
        walked,
        [
            (0x01, 0x40, false),
            (0x10, 0x48, false),
            (0x09, 0x50, false),
            (0x0001, 0x100, true),
            (0x000b, 0x10c, true)
        ]
    );
    assert_eq!(read32(&cfg, 0x100), 0x1 | 2 << 16 | 0x10c << 20);
    assert_eq!(cfg.find_capability(0x09, false), Some(0x50));
    assert_eq!(cfg.find_capability(0x0b, true), Some(0x10c));
    assert_eq!(cfg.find_capability(0x05, false), None);
}

#[test]
fn a_space_without_capabilities_walks_to_nothing() {
    let cfg = h100();
    assert!(cfg.capabilities().is_empty());
}

#[test]
fn a_capability_loop_ends_the_walk() {
    let mut cfg = h100();
    let a = cfg.add_capability(0x01, &[0; 2], &[0; 2]).unwrap();
    let b = cfg.add_capability(0x02, &[0; 2], &[0; 2]).unwrap();
    cfg.set(b + 1, &[a as u8]).unwrap();
    let walked = cfg.capabilities();
    assert!(walked.len() <= (CONFIG_SIZE - FIRST_CAPABILITY) / 4);
    assert_eq!(
        (walked[0].offset, walked[1].offset, walked[2].offset),
        (a, b, a)
    );
}

#[test]
fn capability_bytes_follow_their_write_mask_and_report_the_write() {
    let mut cfg = h100();
    let off = cfg
        .add_capability(0x05, &[0x00, 0x00, 0x00, 0x00], &[0x71, 0x00, 0xff, 0x00])
        .unwrap();
    let events = cfg.write(off, &[0xff; 6]);
    assert_eq!(cfg.read_u8(off), 0x05, "id is read-only");
    assert_eq!(cfg.read_u8(off + 1), 0x00, "link is read-only");
    assert_eq!(read32(&cfg, off) >> 16, 0x0071);
    assert_eq!(read32(&cfg, off + 4) & 0xffff, 0x00ff);
    assert_eq!(
        events,
        [ConfigEvent::Capability {
            id: 0x05,
            extended: false,
            offset: off
        }]
    );
    assert!(
        cfg.write(off + 6, &[0xff]).is_empty(),
        "past the capability"
    );
}

#[test]
fn capabilities_that_do_not_fit_are_refused() {
    let mut cfg = h100();
    assert_eq!(
        cfg.add_capability(0x09, &[0; 200], &[0; 200]),
        Err(ConfigError::NoRoom {
            id: 0x09,
            len: 202,
            offset: 0x40
        })
    );
    assert!(matches!(
        cfg.add_capability(0x09, &[0; 4], &[0; 3]),
        Err(ConfigError::MaskLength { .. })
    ));
    let mut small = ConfigSpace::new(&header(), BarLayout::default(), false);
    assert_eq!(
        small.add_extended_capability(1, 1, &[], &[]),
        Err(ConfigError::NotExtended)
    );
}

#[test]
fn guest_accesses_of_any_size_and_offset_never_panic() {
    for extended in [false, true] {
        let mut cfg = ConfigSpace::new(&header(), h100_layout(), extended);
        let len = cfg.len();
        for offset in (0..len + 16).chain([usize::MAX - 3, usize::MAX]) {
            for size in 0..=9 {
                let mut buf = vec![0u8; size];
                cfg.read(offset, &mut buf);
                cfg.write(offset, &vec![0xa5; size]);
            }
        }
        let mut past = [0u8; 4];
        cfg.read(len - 2, &mut past);
        assert_eq!(past[2..], [0xff, 0xff], "bytes past the end read all ones");
        assert_eq!(cfg.read_u16(VENDOR_ID), 0x10de, "identity untouched");
    }
}

#[test]
fn a_write_across_two_registers_reaches_both() {
    let mut cfg = h100();
    // Latency timer and BIST..header type are one dword; interrupt line sits after MAX_LAT.
    cfg.write(0x3b, &[0xff, 0x0e]);
    assert_eq!(cfg.read_u8(INTERRUPT_LINE), 0x0e);
    cfg.write(0x0b, &[0xff, 0x40]);
    assert_eq!(cfg.read_u8(CLASS_CODE), 0x03, "class is read-only");
    assert_eq!(cfg.read_u8(0x0c), 0x40, "cache line size is writable");
}
