//! MSI-X: the capability, table and PBA through the test device's BAR0, and what the owner's
//! routes are told (a mock records it).

use super::bar::BarSlot;
use super::device::PciDevice;
use super::msix::*;
use super::test_device::{Call, MockRoutes, TestDevice, MSIX_VECTORS, PBA_OFFSET};
use super::vectors::{Delivery, MsiMessage};

fn device() -> (TestDevice, MockRoutes) {
    let routes = MockRoutes::default();
    (TestDevice::new(routes.clone()), routes)
}

fn control(dev: &mut TestDevice, value: u16) {
    let off = dev.msix.cap_offset() + 2;
    dev.config_write(off, &value.to_le_bytes());
}

fn write_entry(dev: &mut TestDevice, vector: u16, msg: MsiMessage) {
    let base = u64::from(vector) * MSIX_ENTRY_SIZE;
    // As Linux does: address as one qword, then the data.
    dev.bar_write(BarSlot::Bar(0), base, &msg.address.to_le_bytes());
    dev.bar_write(BarSlot::Bar(0), base + 8, &msg.data.to_le_bytes());
}

fn set_mask(dev: &mut TestDevice, vector: u16, masked: bool) {
    let off = u64::from(vector) * MSIX_ENTRY_SIZE + 12;
    dev.bar_write(BarSlot::Bar(0), off, &u32::from(masked).to_le_bytes());
}

fn msg(n: u32) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000 | u64::from(n) << 12,
        data: 0x40 + n,
    }
}

fn read_bar0_u32(dev: &mut TestDevice, offset: u64) -> u32 {
    let mut b = [0; 4];
    dev.bar_read(BarSlot::Bar(0), offset, &mut b);
    u32::from_le_bytes(b)
}

#[test]
fn the_capability_describes_table_and_pba_and_only_enable_and_mask_are_writable() {
    let (mut dev, _) = device();
    let off = dev.cfg.find_capability(u16::from(MSIX_CAP_ID), false);
    assert_eq!(off, Some(dev.msix.cap_offset()));
    let off = dev.msix.cap_offset();
    assert_eq!(dev.cfg.read_u16(off + 2), MSIX_VECTORS - 1);
    assert_eq!(dev.cfg.read_u32(off + 4), 0, "table: BAR0 offset 0");
    assert_eq!(
        dev.cfg.read_u32(off + 8),
        PBA_OFFSET,
        "PBA: BAR0 offset 64 KiB"
    );
    control(&mut dev, 0xffff);
    assert_eq!(
        dev.cfg.read_u16(off + 2),
        MSIX_ENABLE | MSIX_FUNCTION_MASK | (MSIX_VECTORS - 1)
    );
    assert!(dev.msix.enabled() && dev.msix.function_masked());
    dev.config_write(off + 4, &[0xff; 8]);
    assert_eq!(dev.cfg.read_u32(off + 4), 0);
}

#[test]
fn nothing_is_routed_until_a_vector_is_enabled_and_unmasked() {
    let (mut dev, routes) = device();
    write_entry(&mut dev, 3, msg(3));
    control(&mut dev, MSIX_ENABLE);
    assert!(routes.take().is_empty(), "every vector starts masked");
    set_mask(&mut dev, 3, false);
    assert_eq!(routes.take(), [Call::Unmask(3, msg(3))]);
    assert_eq!(dev.msix.message(3), Some(msg(3)));
}

#[test]
fn masking_a_live_vector_disconnects_it() {
    let (mut dev, routes) = device();
    control(&mut dev, MSIX_ENABLE);
    write_entry(&mut dev, 3, msg(3));
    set_mask(&mut dev, 3, false);
    routes.take();
    set_mask(&mut dev, 3, true);
    assert_eq!(routes.take(), [Call::Mask(3)]);
    set_mask(&mut dev, 3, true);
    assert!(routes.take().is_empty(), "no change, no call");
}

#[test]
fn a_live_vectors_new_message_reprograms_its_route() {
    let (mut dev, routes) = device();
    control(&mut dev, MSIX_ENABLE);
    write_entry(&mut dev, 5, msg(5));
    set_mask(&mut dev, 5, false);
    routes.take();
    dev.bar_write(
        BarSlot::Bar(0),
        5 * MSIX_ENTRY_SIZE + 8,
        &0x99u32.to_le_bytes(),
    );
    let want = MsiMessage {
        data: 0x99,
        ..msg(5)
    };
    assert_eq!(routes.take(), [Call::Unmask(5, want)]);
}

#[test]
fn function_mask_and_disable_take_every_live_vector_down_and_back() {
    let (mut dev, routes) = device();
    control(&mut dev, MSIX_ENABLE);
    for v in [1, 69] {
        write_entry(&mut dev, v, msg(u32::from(v)));
        set_mask(&mut dev, v, false);
    }
    routes.take();
    control(&mut dev, MSIX_ENABLE | MSIX_FUNCTION_MASK);
    assert_eq!(routes.take(), [Call::Mask(1), Call::Mask(69)]);
    control(&mut dev, MSIX_ENABLE);
    assert_eq!(
        routes.take(),
        [Call::Unmask(1, msg(1)), Call::Unmask(69, msg(69))]
    );
    control(&mut dev, 0);
    assert_eq!(routes.take(), [Call::Mask(1), Call::Mask(69)]);
}

#[test]
fn a_masked_vector_that_fires_is_pending_and_sent_on_unmask() {
    let (mut dev, routes) = device();
    control(&mut dev, MSIX_ENABLE);
    write_entry(&mut dev, 66, msg(66));
    let fired = dev.msix.trigger(66, &mut dev.routes).unwrap();
    assert_eq!(fired, Delivery::Pending);
    assert!(routes.take().is_empty());
    // PBA qword 1, bit 2, as the guest reads it.
    assert_eq!(read_bar0_u32(&mut dev, u64::from(PBA_OFFSET) + 8), 1 << 2);
    assert_eq!(read_bar0_u32(&mut dev, u64::from(PBA_OFFSET)), 0);
    set_mask(&mut dev, 66, false);
    assert_eq!(
        routes.take(),
        [Call::Unmask(66, msg(66)), Call::Trigger(66)]
    );
    assert!(!dev.msix.pending(66));
    assert_eq!(read_bar0_u32(&mut dev, u64::from(PBA_OFFSET) + 8), 0);
}

#[test]
fn function_mask_pends_too() {
    let (mut dev, routes) = device();
    control(&mut dev, MSIX_ENABLE | MSIX_FUNCTION_MASK);
    write_entry(&mut dev, 0, msg(0));
    set_mask(&mut dev, 0, false);
    assert_eq!(
        dev.msix.trigger(0, &mut dev.routes).unwrap(),
        Delivery::Pending
    );
    control(&mut dev, MSIX_ENABLE);
    assert_eq!(routes.take(), [Call::Unmask(0, msg(0)), Call::Trigger(0)]);
}

#[test]
fn a_live_vector_fires_at_once_and_a_disabled_one_not_at_all() {
    let (mut dev, routes) = device();
    assert_eq!(
        dev.msix.trigger(2, &mut dev.routes).unwrap(),
        Delivery::Dropped
    );
    assert!(!dev.msix.pending(2));
    control(&mut dev, MSIX_ENABLE);
    write_entry(&mut dev, 2, msg(2));
    set_mask(&mut dev, 2, false);
    routes.take();
    assert_eq!(
        dev.msix.trigger(2, &mut dev.routes).unwrap(),
        Delivery::Sent
    );
    assert_eq!(routes.take(), [Call::Trigger(2)]);
    assert!(matches!(
        dev.msix.trigger(MSIX_VECTORS, &mut dev.routes),
        Err(MsixError::NoVector(70))
    ));
}

#[test]
fn the_table_reads_back_with_reserved_bits_clear() {
    let (mut dev, _) = device();
    dev.bar_write(BarSlot::Bar(0), 16, &[0xff; 16]);
    assert_eq!(
        read_bar0_u32(&mut dev, 16),
        0xffff_fffc,
        "address is dword aligned"
    );
    assert_eq!(read_bar0_u32(&mut dev, 20), u32::MAX);
    assert_eq!(read_bar0_u32(&mut dev, 24), u32::MAX);
    assert_eq!(
        read_bar0_u32(&mut dev, 28),
        MSIX_VECTOR_MASKED,
        "one control bit"
    );
    assert_eq!(
        read_bar0_u32(&mut dev, 12),
        MSIX_VECTOR_MASKED,
        "reset state: masked"
    );
}

#[test]
fn the_pba_is_read_only() {
    let (mut dev, _) = device();
    dev.bar_write(BarSlot::Bar(0), u64::from(PBA_OFFSET), &[0xff; 8]);
    assert_eq!(read_bar0_u32(&mut dev, u64::from(PBA_OFFSET)), 0);
    assert!(!dev.msix.pending(0));
}

#[test]
fn bar_accesses_outside_msix_are_left_to_the_device() {
    let (mut dev, _) = device();
    let past_table = u64::from(MSIX_VECTORS) * MSIX_ENTRY_SIZE;
    let mut b = [0; 4];
    assert!(!dev.msix.bar_read(0, past_table, &mut b));
    assert!(!dev.msix.bar_read(1, 0, &mut b), "another BAR");
    assert!(
        !dev.msix.bar_read(0, past_table - 2, &mut b),
        "straddles the end"
    );
    let mut routes = MockRoutes::default();
    assert!(!dev.msix.bar_write(0, 0x2_0000, &b, &mut routes).unwrap());
    dev.bar_write(BarSlot::Bar(0), 0x2_0000, &[1, 2, 3, 4]);
    assert_eq!(read_bar0_u32(&mut dev, 0x2_0000), 0x0403_0201);
}

#[test]
fn table_and_pba_accesses_of_any_size_and_offset_never_panic() {
    let (mut dev, _) = device();
    control(&mut dev, MSIX_ENABLE);
    let mut routes = MockRoutes::default();
    let table_end = u64::from(MSIX_VECTORS) * MSIX_ENTRY_SIZE;
    let offsets = (0..64)
        .chain(table_end - 32..table_end + 32)
        .chain([u64::MAX - 3, u64::MAX]);
    for offset in offsets {
        for size in 0..=9 {
            let mut buf = vec![0; size];
            dev.msix.table_read(offset, &mut buf);
            dev.msix.pba_read(offset, &mut buf);
            dev.msix
                .table_write(offset, &vec![0x5a; size], &mut routes)
                .unwrap();
            dev.msix.bar_read(0, offset, &mut buf);
            dev.msix.bar_write(0, offset, &buf, &mut routes).unwrap();
        }
    }
}

#[test]
fn a_failing_route_is_reported_with_its_source_and_the_others_still_programmed() {
    let routes = MockRoutes {
        failing: vec![1],
        ..MockRoutes::default()
    };
    let mut dev = TestDevice::new(routes.clone());
    let mut owner = routes.clone();
    control(&mut dev, MSIX_ENABLE | MSIX_FUNCTION_MASK);
    for v in [1, 2] {
        write_entry(&mut dev, v, msg(u32::from(v)));
        set_mask(&mut dev, v, false);
    }
    let cap = dev.msix.cap_offset();
    dev.cfg.write(cap + 2, &MSIX_ENABLE.to_le_bytes());
    let err = dev.msix.config_written(&dev.cfg, &mut owner).unwrap_err();
    assert!(matches!(err, MsixError::Route { vector: 1, .. }), "{err}");
    let source = std::error::Error::source(&err).map(ToString::to_string);
    assert_eq!(source.as_deref(), Some("no route for 1"));
    assert_eq!(routes.take(), [Call::Unmask(2, msg(2))]);
    // Not marked as programmed: the next change tries vector 1 again.
    owner.failing.clear();
    dev.msix.config_written(&dev.cfg, &mut owner).unwrap();
    assert_eq!(routes.take(), [Call::Unmask(1, msg(1))]);
}

#[test]
fn layouts_that_do_not_fit_their_bars_are_refused() {
    let layout = MsixLayout {
        vectors: 4,
        table_bar: 0,
        table_offset: 0,
        pba_bar: 0,
        pba_offset: 0x1000,
    };
    let cases = [
        (
            MsixLayout {
                vectors: 0,
                ..layout
            },
            "vectors",
        ),
        (
            MsixLayout {
                vectors: 2049,
                ..layout
            },
            "vectors",
        ),
        (
            MsixLayout {
                table_bar: 2,
                ..layout
            },
            "no bar",
        ),
        (
            MsixLayout {
                table_offset: 4,
                ..layout
            },
            "unaligned",
        ),
        (
            MsixLayout {
                pba_offset: 16 * (1 << 20),
                ..layout
            },
            "outside",
        ),
        (
            MsixLayout {
                pba_offset: 0x30,
                ..layout
            },
            "overlap",
        ),
    ];
    for (bad, why) in cases {
        let (mut dev, _) = device();
        let err = Msix::new(bad, &mut dev.cfg).unwrap_err();
        let ok = match why {
            "vectors" => matches!(err, MsixError::Vectors(_)),
            "no bar" => matches!(err, MsixError::NoBar { bar: 2, .. }),
            "unaligned" => matches!(err, MsixError::Unaligned { .. }),
            "outside" => matches!(err, MsixError::Outside { .. }),
            _ => matches!(err, MsixError::Overlap(0)),
        };
        assert!(ok, "{why}: {err}");
    }
}

#[test]
fn reset_takes_live_vectors_down_and_clears_table_pba_and_control() {
    let (mut dev, routes) = device();
    control(&mut dev, MSIX_ENABLE);
    write_entry(&mut dev, 1, msg(1));
    set_mask(&mut dev, 1, false);
    set_mask(&mut dev, 2, true);
    dev.msix.trigger(2, &mut dev.routes).unwrap();
    routes.take();
    dev.msix.reset(&mut dev.cfg, &mut dev.routes).unwrap();
    assert_eq!(routes.take(), vec![Call::Mask(1)]);
    assert!(!dev.msix.enabled() && !dev.msix.pending(2) && dev.msix.vector_masked(1));
    assert_eq!(dev.msix.message(1), Some(MsiMessage::default()));
    let off = dev.msix.cap_offset() + 2;
    assert_eq!(dev.cfg.read_u16(off) & MSIX_ENABLE, 0);
}

#[test]
fn a_capability_at_a_given_offset_keeps_its_link_and_reports_writes() {
    use super::bar::{Bar, BarKind, BarLayout};
    use super::config::{ConfigEvent, ConfigHeader, ConfigSpace};
    let bar = Bar {
        index: 0,
        kind: BarKind::Mem32 {
            prefetchable: false,
        },
        size: 1 << 20,
    };
    let layout = BarLayout::new(&[bar], None).unwrap();
    let mut cfg = ConfigSpace::new(&ConfigHeader::default(), layout, false);
    cfg.set(0x90, &[MSIX_CAP_ID, 0xa0]).unwrap();
    let l = MsixLayout {
        vectors: 4,
        table_bar: 0,
        table_offset: 0x800,
        pba_bar: 0,
        pba_offset: 0x2000,
    };
    let msix = Msix::at(l, &mut cfg, 0x90).unwrap();
    assert_eq!(cfg.read_u8(0x91), 0xa0, "link kept");
    assert_eq!(cfg.read_u16(0x92), 3);
    assert_eq!(cfg.read_u32(0x94), 0x800);
    assert_eq!(cfg.read_u32(0x98), 0x2000);
    let events = cfg.write(0x92, &MSIX_ENABLE.to_le_bytes());
    assert_eq!(
        events,
        [ConfigEvent::Capability {
            id: u16::from(MSIX_CAP_ID),
            extended: false,
            offset: 0x90
        }]
    );
    assert_eq!(msix.cap_offset(), 0x90);
    // Past the end of the space: refused, not a panic.
    assert!(matches!(
        Msix::at(l, &mut cfg, 0xf8),
        Err(MsixError::Capability(_))
    ));
}
