//! MSI and MSI-X eventfds between the passed-through function, its transport and the
//! owner's routes (split from `device_tests` by concept; its helpers are shared).

use super::*;

#[test]
fn msi_enable_hands_the_enabled_vectors_eventfds_to_the_transport_and_routes_them() {
    let (mut dev, h, routes) = open();
    let control = CAP_MSI + 2;
    assert_eq!(
        dev.config().read_u16(control) & 0x18e,
        0x184,
        "4 capable, 64-bit, masks"
    );
    // Address, data, vector 1 masked; then enable with 2 vectors (MME = 1).
    wcfg32(&mut dev, CAP_MSI + 4, 0xfee0_2000);
    wcfg32(&mut dev, CAP_MSI + 8, 0);
    wcfg32(&mut dev, CAP_MSI + 12, 0x60);
    wcfg32(&mut dev, CAP_MSI + 16, 0b10);
    assert!(
        routes.take().is_empty() && h.take_calls().is_empty(),
        "emulated, off"
    );
    dev.config_write(control, &0x0011u16.to_le_bytes());
    assert_eq!(
        h.take_calls(),
        [Call::EnableIrqs {
            index: MSI_IRQ,
            count: 2
        }]
    );
    let msg = MsiMessage {
        address: 0xfee0_2000,
        data: 0x60,
    };
    assert_eq!(routes.take(), [Route::Unmask(0, msg)]);
    // Unmasking vector 1 routes it with its number in the data.
    wcfg32(&mut dev, CAP_MSI + 16, 0);
    let msg1 = MsiMessage { data: 0x61, ..msg };
    assert_eq!(routes.take(), [Route::Unmask(1, msg1)]);
    // One vector only: the transport's eventfds are given again.
    dev.config_write(control, &0x0001u16.to_le_bytes());
    assert_eq!(
        h.take_calls(),
        [
            Call::DisableIrqs { index: MSI_IRQ },
            Call::EnableIrqs {
                index: MSI_IRQ,
                count: 1
            }
        ]
    );
    assert_eq!(routes.take(), [Route::Mask(1)]);
    // Reset takes it down.
    dev.reset().unwrap();
    assert_eq!(routes.take(), [Route::Mask(0)]);
    assert_eq!(
        h.take_calls(),
        [Call::DisableIrqs { index: MSI_IRQ }, Call::Reset]
    );
    assert_eq!(dev.config().read_u16(control) & 0x71, 0);
    assert!(dev.take_errors().is_empty());
}

/// A function whose MSI capability has more vectors (32) than its MSI-X table (16): enabling
/// MSI-X hands the transport one eventfd per table entry, not per MSI vector (VFIO refuses
/// more eventfds than the index has).
#[test]
fn msix_gets_as_many_eventfds_as_its_table_when_msi_has_more() {
    let (t, h) = MockTransport::h100();
    {
        let mut s = h.state();
        s.config[CAP_MSI + 2] = 0x8a; // 32 capable (MMC 5), 64-bit
        s.msi_count = 32;
    }
    let mut dev = PassthroughDevice::new(Box::new(t), Box::new(Routes::default())).unwrap();
    h.take_calls();
    msix_control(&mut dev, MSIX_ENABLE);
    assert_eq!(
        h.take_calls(),
        [Call::EnableIrqs {
            index: MSIX_IRQ,
            count: usize::from(MSIX_VECTORS)
        }]
    );
    assert!(dev.take_errors().is_empty());
}

/// A signal the device raised before MSI-X was disabled is gone after: re-enabling and
/// unmasking the vector delivers nothing stale.
#[test]
fn disabling_msix_clears_signals_left_in_the_eventfds() {
    let (mut dev, h, routes) = open();
    msix_control(&mut dev, MSIX_ENABLE);
    assert!(h.fire(5), "the device has vector 5's eventfd");
    msix_control(&mut dev, 0);
    assert_eq!(
        routes.signalled(5),
        0,
        "a stale signal survived the disable"
    );
    assert!(dev.take_errors().is_empty());
}
