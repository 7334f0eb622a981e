use kvm_ioctls::Kvm;

use super::*;

/// A VM with the in-kernel PIC and IOAPIC and no vCPU: enough for routing and irqfds.
fn vm_with_irqchip() -> (Kvm, VmFd) {
    let kvm = Kvm::new().expect("/dev/kvm");
    let fd = kvm.create_vm().expect("KVM_CREATE_VM");
    fd.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    (kvm, fd)
}

fn pin(chip: IrqChip, pin: u32) -> Route {
    Route::Pin { chip, pin }
}

#[test]
fn the_table_starts_as_kvms_default() {
    let r = InterruptRouting::new().unwrap();
    // 16 GSIs on both the IOAPIC and a PIC, 8 more on the IOAPIC only.
    assert_eq!(r.entries().len(), 16 * 2 + 8);
    assert_eq!(
        r.routes(0),
        [pin(IrqChip::Ioapic, 0), pin(IrqChip::PicMaster, 0)]
    );
    assert_eq!(
        r.routes(2),
        [pin(IrqChip::Ioapic, 2), pin(IrqChip::PicMaster, 2)]
    );
    assert_eq!(
        r.routes(4),
        [pin(IrqChip::Ioapic, 4), pin(IrqChip::PicMaster, 4)]
    );
    assert_eq!(
        r.routes(12),
        [pin(IrqChip::Ioapic, 12), pin(IrqChip::PicSlave, 4)]
    );
    assert_eq!(r.routes(23), [pin(IrqChip::Ioapic, 23)]);
    assert!(r.routes(24).is_empty());
    let e = r.entries();
    assert!(e.iter().all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
    assert!(e.windows(2).all(|w| w[0].gsi <= w[1].gsi), "GSI order");
}

#[test]
fn pins_and_one_msi_are_sent_and_the_msi_irqfd_triggers() {
    let (_kvm, fd) = vm_with_irqchip();
    let mut r = InterruptRouting::new().unwrap();
    r.send(&fd).expect("the default table is accepted");
    let line = r.irq_line(&fd).unwrap();
    assert_eq!(line.gsi(), FIRST_DEVICE_PIN);
    let msg = MsiMessage {
        address: 0xfee0_0000,
        data: 0x41,
    };
    let msi = r.msi_vector(&fd, msg).unwrap();
    assert_eq!(msi.gsi(), FIRST_MSI_GSI);
    // The whole table went out again: every pin route plus the MSI one.
    let entries = r.entries();
    assert_eq!(entries.len(), 16 * 2 + 8 + 1);
    let last = entries.last().unwrap();
    assert_eq!((last.gsi, last.type_), (FIRST_MSI_GSI, KVM_IRQ_ROUTING_MSI));
    assert_eq!(r.routes(FIRST_MSI_GSI), [Route::Msi(msg)]);
    // No vCPU receives it, but the irqfd accepts the edge (KVM delivers it in the kernel).
    msi.trigger().unwrap();
    line.trigger().unwrap();

    let moved = MsiMessage { data: 0x42, ..msg };
    r.update_msi(&fd, msi.gsi(), moved).unwrap();
    assert_eq!(r.routes(FIRST_MSI_GSI), [Route::Msi(moved)]);
    r.release_msi(&fd, &msi).unwrap();
    assert!(r.routes(FIRST_MSI_GSI).is_empty());
    let again = r.msi_vector(&fd, msg).unwrap();
    assert_eq!(again.gsi(), FIRST_MSI_GSI, "the freed GSI is reused");
}

#[test]
fn an_irqfd_needs_a_route() {
    let (_kvm, fd) = vm_with_irqchip();
    let r = InterruptRouting::new().unwrap();
    let stray = MsiVector::new(FIRST_MSI_GSI + 7).unwrap();
    assert!(matches!(
        r.register_irqfd(&fd, &stray),
        Err(InterruptError::NoRoute(gsi)) if gsi == FIRST_MSI_GSI + 7
    ));
}

#[test]
fn isa_lines_have_one_owner_and_device_pins_run_out() {
    let (_kvm, fd) = vm_with_irqchip();
    let mut r = InterruptRouting::new().unwrap();
    assert_eq!(r.isa_line(&fd, 4).unwrap().gsi(), 4);
    assert!(matches!(
        r.isa_line(&fd, 4),
        Err(InterruptError::IsaTaken(4))
    ));
    assert!(matches!(
        r.isa_line(&fd, FIRST_DEVICE_PIN),
        Err(InterruptError::NotIsa(_))
    ));
    let gsis: Vec<u32> = (FIRST_DEVICE_PIN..IOAPIC_PINS)
        .map(|_| r.irq_line(&fd).unwrap().gsi())
        .collect();
    assert_eq!(gsis, (FIRST_DEVICE_PIN..IOAPIC_PINS).collect::<Vec<_>>());
    assert!(matches!(
        r.irq_line(&fd),
        Err(InterruptError::Exhausted { .. })
    ));
}

#[test]
fn update_refuses_a_pin_gsi() {
    let (_kvm, fd) = vm_with_irqchip();
    let mut r = InterruptRouting::new().unwrap();
    assert!(matches!(
        r.update_msi(&fd, 4, MsiMessage::default()),
        Err(InterruptError::NotMsi(4))
    ));
    assert_eq!(r.routes(4).len(), 2, "unchanged");
}
