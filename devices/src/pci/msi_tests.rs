//! MSI: the capability's layouts and masks, and what the owner's routes are told.

use super::bar::BarLayout;
use super::config::{ConfigHeader, ConfigSpace, STATUS, STATUS_CAPABILITIES};
use super::msi::*;
use super::test_device::{Call, MockRoutes};
use super::vectors::{Delivery, MsiMessage};

fn space() -> ConfigSpace {
    let header = ConfigHeader {
        vendor_id: 0x1af4,
        device_id: 0x1000,
        ..ConfigHeader::default()
    };
    ConfigSpace::new(&header, BarLayout::default(), false)
}

/// A guest programming MSI: address, data, then message control.
fn program(cfg: &mut ConfigSpace, msi: &Msi, address: u64, data: u16, control: u16, wide: bool) {
    let off = msi.cap_offset();
    cfg.write(off + 4, &(address as u32).to_le_bytes());
    let data_at = if wide {
        cfg.write(off + 8, &((address >> 32) as u32).to_le_bytes());
        off + 12
    } else {
        off + 8
    };
    cfg.write(data_at, &data.to_le_bytes());
    cfg.write(off + 2, &control.to_le_bytes());
}

fn written(msi: &mut Msi, cfg: &mut ConfigSpace, routes: &mut MockRoutes) -> Vec<Call> {
    msi.config_written(cfg, routes).unwrap();
    routes.take()
}

#[test]
fn the_capability_lays_out_each_variant_with_its_control_bits() {
    for (wide, mask, next) in [
        (false, false, 0x4c),
        (true, false, 0x50),
        (false, true, 0x54),
        (true, true, 0x58),
    ] {
        let mut cfg = space();
        let msi = Msi::new(&mut cfg, 4, wide, mask).unwrap();
        let off = msi.cap_offset();
        assert_eq!(off, 0x40);
        assert_eq!(cfg.read_u8(off), MSI_CAP_ID);
        assert_ne!(cfg.read_u16(STATUS) & STATUS_CAPABILITIES, 0);
        let control = cfg.read_u16(off + 2);
        assert_eq!(control & 0xe, 2 << 1, "4 vectors capable");
        assert_eq!(control & MSI_64BIT != 0, wide);
        assert_eq!(control & MSI_PER_VECTOR_MASK != 0, mask);
        // The next capability lands right after: the length is what the spec gives.
        let after = cfg.add_capability(0x09, &[0; 2], &[0; 2]).unwrap();
        assert_eq!(after, next, "wide {wide} mask {mask}");
        // Only enable and multiple message enable are writable in control.
        cfg.write(off + 2, &[0xff, 0xff]);
        assert_eq!(cfg.read_u16(off + 2), control | 0x71);
    }
}

#[test]
fn enabling_msi_routes_vector_0_with_its_message() {
    let mut cfg = space();
    let mut msi = Msi::new(&mut cfg, 1, true, false).unwrap();
    let mut routes = MockRoutes::default();
    program(&mut cfg, &msi, 0x1_fee0_1000, 0x4021, MSI_ENABLE, true);
    let want = MsiMessage {
        address: 0x1_fee0_1000,
        data: 0x4021,
    };
    assert_eq!(
        written(&mut msi, &mut cfg, &mut routes),
        [Call::Unmask(0, want)]
    );
    cfg.write(msi.cap_offset() + 2, &[0, 0]);
    assert_eq!(written(&mut msi, &mut cfg, &mut routes), [Call::Mask(0)]);
}

#[test]
fn a_32bit_capability_has_no_upper_address() {
    let mut cfg = space();
    let mut msi = Msi::new(&mut cfg, 1, false, false).unwrap();
    let mut routes = MockRoutes::default();
    program(&mut cfg, &msi, 0xfee0_0003, 0x30, MSI_ENABLE, false);
    let want = MsiMessage {
        address: 0xfee0_0000,
        data: 0x30,
    };
    assert_eq!(
        written(&mut msi, &mut cfg, &mut routes),
        [Call::Unmask(0, want)]
    );
}

#[test]
fn multiple_messages_put_the_vector_in_the_low_data_bits() {
    let mut cfg = space();
    let mut msi = Msi::new(&mut cfg, 8, true, false).unwrap();
    let mut routes = MockRoutes::default();
    // Four of eight enabled (MME = 2); the guest's data has its low bits clear, but any set
    // low bits are replaced by the vector number.
    program(&mut cfg, &msi, 0xfee0_0000, 0x43, MSI_ENABLE | 2 << 4, true);
    assert_eq!(msi.allotted(&cfg), 4);
    let calls = written(&mut msi, &mut cfg, &mut routes);
    let want: Vec<Call> = (0..4)
        .map(|v| {
            Call::Unmask(
                v,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x40 | u32::from(v),
                },
            )
        })
        .collect();
    assert_eq!(calls, want);
}

#[test]
fn multiple_message_enable_is_capped_at_what_is_capable() {
    let mut cfg = space();
    let msi = Msi::new(&mut cfg, 2, false, false).unwrap();
    cfg.write(msi.cap_offset() + 2, &[(MSI_ENABLE | 5 << 4) as u8]);
    assert_eq!(msi.allotted(&cfg), 2);
}

#[test]
fn a_live_msis_new_message_reprograms_the_route() {
    let mut cfg = space();
    let mut msi = Msi::new(&mut cfg, 1, false, false).unwrap();
    let mut routes = MockRoutes::default();
    program(&mut cfg, &msi, 0xfee0_0000, 0x30, MSI_ENABLE, false);
    written(&mut msi, &mut cfg, &mut routes);
    // Linux moving the interrupt to CPU 2 while MSI stays enabled.
    cfg.write(msi.cap_offset() + 4, &0xfee0_2000u32.to_le_bytes());
    let want = MsiMessage {
        address: 0xfee0_2000,
        data: 0x30,
    };
    assert_eq!(
        written(&mut msi, &mut cfg, &mut routes),
        [Call::Unmask(0, want)]
    );
}

#[test]
fn per_vector_masking_pends_and_releases() {
    let mut cfg = space();
    let mut msi = Msi::new(&mut cfg, 2, true, true).unwrap();
    let mut routes = MockRoutes::default();
    let mask_at = msi.cap_offset() + 0x10;
    let pending_at = msi.cap_offset() + 0x14;
    program(&mut cfg, &msi, 0xfee0_0000, 0x50, MSI_ENABLE | 1 << 4, true);
    written(&mut msi, &mut cfg, &mut routes);
    cfg.write(mask_at, &2u32.to_le_bytes());
    assert_eq!(written(&mut msi, &mut cfg, &mut routes), [Call::Mask(1)]);
    let fired = msi.trigger(&mut cfg, 1, &mut routes).unwrap();
    assert_eq!(fired, Delivery::Pending);
    assert_eq!(cfg.read_u32(pending_at), 2);
    assert_eq!(
        msi.trigger(&mut cfg, 0, &mut routes).unwrap(),
        Delivery::Sent
    );
    assert_eq!(routes.take(), [Call::Trigger(0)]);
    cfg.write(mask_at, &0u32.to_le_bytes());
    let msg1 = MsiMessage {
        address: 0xfee0_0000,
        data: 0x51,
    };
    assert_eq!(
        written(&mut msi, &mut cfg, &mut routes),
        [Call::Unmask(1, msg1), Call::Trigger(1)]
    );
    assert_eq!(cfg.read_u32(pending_at), 0);
}

#[test]
fn pending_bits_and_mask_bits_past_the_vectors_are_read_only() {
    let mut cfg = space();
    let msi = Msi::new(&mut cfg, 4, false, true).unwrap();
    let mask_at = msi.cap_offset() + 0x0c;
    cfg.write(mask_at, &[0xff; 8]);
    assert_eq!(cfg.read_u32(mask_at), 0xf);
    assert_eq!(cfg.read_u32(mask_at + 4), 0);
}

#[test]
fn a_disabled_msi_drops_triggers() {
    let mut cfg = space();
    let mut msi = Msi::new(&mut cfg, 4, true, true).unwrap();
    let mut routes = MockRoutes::default();
    assert_eq!(
        msi.trigger(&mut cfg, 0, &mut routes).unwrap(),
        Delivery::Dropped
    );
    program(&mut cfg, &msi, 0xfee0_0000, 0x50, MSI_ENABLE, true);
    assert_eq!(
        msi.trigger(&mut cfg, 3, &mut routes).unwrap(),
        Delivery::Dropped,
        "one vector allotted"
    );
    assert!(matches!(
        msi.trigger(&mut cfg, 4, &mut routes),
        Err(MsiError::NoVector(4))
    ));
    assert!(routes.take().is_empty());
}

#[test]
fn vector_counts_must_be_powers_of_two_up_to_32() {
    for n in [0, 3, 64] {
        let mut cfg = space();
        assert!(matches!(
            Msi::new(&mut cfg, n, false, false),
            Err(MsiError::Vectors(_))
        ));
    }
    let mut cfg = space();
    let msi = Msi::new(&mut cfg, 32, true, true).unwrap();
    let mask_at = msi.cap_offset() + 0x10;
    cfg.write(mask_at, &[0xff; 4]);
    assert_eq!(cfg.read_u32(mask_at), u32::MAX);
}
