//! The registry on its own (ids, limit, lookups) and on a real KVM VM without vCPUs (what KVM
//! has registered, and with which flags).

use std::os::raw::c_int;

use super::*;
use crate::memory::GuestRam;

const MIB: u64 = 1 << 20;

fn scratch_vm() -> Arc<VmFd> {
    Arc::new(kvm_ioctls::Kvm::new().unwrap().create_vm().unwrap())
}

fn errno(e: &MemSlotError) -> Option<c_int> {
    match e {
        MemSlotError::Kvm { source, .. } => Some(source.errno()),
        _ => None,
    }
}

/// KVM's answer to GET_DIRTY_LOG on `id`: Ok only while the slot exists with logging on.
fn dirty_log(fd: &VmFd, id: u32, size: u64) -> Result<(), c_int> {
    fd.get_dirty_log(id, size as usize)
        .map(|_| ())
        .map_err(|e| e.errno())
}

fn slot(id: u32, gpa: u64, size: u64) -> Slot {
    Slot {
        id,
        kind: SlotKind::DemandChunk,
        gpa,
        size,
        host: 0x7000_0000_0000 + gpa,
        flags: 0,
        userfault_bitmap: 0,
    }
}

#[test]
fn table_reuses_freed_ids_lowest_first_and_refuses_past_its_limit() {
    let mut t = Table::new(3);
    for (i, gpa) in [0, 0x10_0000, 0x20_0000].into_iter().enumerate() {
        let id = t.check_new(SlotKind::DemandChunk, gpa, 0x1000).unwrap();
        assert_eq!(id, i as u32);
        t.insert(slot(id, gpa, 0x1000));
    }
    let e = t
        .check_new(SlotKind::DemandChunk, 0x30_0000, 0x1000)
        .unwrap_err();
    assert!(matches!(e, MemSlotError::Exhausted { limit: 3, .. }), "{e}");
    assert!(e.to_string().contains("all 3 ids"), "{e}");
    t.remove(2).unwrap();
    t.remove(0).unwrap();
    assert_eq!(t.check_new(SlotKind::Ram, 0x30_0000, 0x1000).unwrap(), 0);
    t.insert(slot(0, 0x30_0000, 0x1000));
    assert_eq!(t.check_new(SlotKind::Ram, 0x40_0000, 0x1000).unwrap(), 2);
}

#[test]
fn table_finds_the_slot_of_a_gpa_and_refuses_overlaps() {
    let mut t = Table::new(8);
    t.insert(slot(5, 0x10_0000, 0x2000));
    t.insert(slot(1, 0x20_0000, 0x1000));
    assert_eq!(t.at(0x10_1fff).map(|s| s.id), Some(5));
    assert_eq!(t.at(0x10_2000), None, "one past the end");
    assert_eq!(t.at(0x0f_ffff), None);
    assert_eq!(t.at(0x20_0000).map(|s| s.id), Some(1));
    // Overlapping the end, the start, or covering a slot whole.
    for (gpa, size) in [
        (0x10_1000, 0x2000),
        (0x0f_f000, 0x2000),
        (0x1f_0000, 0x20_0000),
    ] {
        let e = t.check_new(SlotKind::Ram, gpa, size).unwrap_err();
        assert!(matches!(e, MemSlotError::Overlap { .. }), "{gpa:x}: {e}");
    }
    // Touching is not overlapping.
    assert!(t.check_new(SlotKind::Ram, 0x10_2000, 0x1000).is_ok());
    assert!(matches!(
        t.check_new(SlotKind::Ram, 0x30_0000, 0x800),
        Err(MemSlotError::Unaligned { .. })
    ));
    assert!(matches!(
        t.check_new(SlotKind::Ram, 0x30_0000, 0),
        Err(MemSlotError::Unaligned { .. })
    ));
}

/// RAM and a device BAR on one VM: both reach KVM with the ids the registry gave, lookups and
/// kinds answer from the registry, and dirty logging changes the RAM slot's flags in KVM only.
#[test]
fn ram_and_a_device_bar_register_on_a_real_vm_and_only_ram_is_dirty_logged() {
    let ram = GuestRam::new(16 * MIB).unwrap();
    let bar = GuestRam::new(8 * MIB).unwrap();
    let fd = scratch_vm();
    let slots = MemSlots::new(fd.clone());
    assert!(slots.limit() >= 32, "KVM offers {}", slots.limit());
    let host = ram.host_addrs()[0];
    let bar_gpa = 0xd000_0000;
    // SAFETY: `ram` and `bar` are declared before the VM, so their mappings outlive its slots.
    let (r, b) = unsafe {
        (
            slots.add(SlotKind::Ram, 0, 16 * MIB, host, 0).unwrap(),
            slots
                .add(SlotKind::DeviceBar, bar_gpa, MIB, bar.host_addrs()[0], 0)
                .unwrap(),
        )
    };
    assert_ne!(r.id, b.id);
    assert_eq!(slots.len(), 2);
    assert_eq!(slots.ram(), vec![r]);
    assert_eq!(slots.of_kind(SlotKind::DeviceBar), vec![b]);
    assert_eq!(
        slots.at(bar_gpa + 0x800).map(|s| s.kind),
        Some(SlotKind::DeviceBar)
    );
    assert_eq!(slots.at(0x1234).map(|s| (s.id, s.host)), Some((r.id, host)));
    assert_eq!(slots.at(16 * MIB), None);

    assert_eq!(
        dirty_log(&fd, r.id, r.size),
        Err(libc::ENOENT),
        "logging off"
    );
    slots.set_dirty_logging(true).unwrap();
    assert!(slots.get(r.id).unwrap().dirty_logging());
    assert!(!slots.get(b.id).unwrap().dirty_logging());
    assert_eq!(
        dirty_log(&fd, r.id, r.size),
        Ok(()),
        "KVM logs the RAM slot"
    );
    assert_eq!(
        dirty_log(&fd, b.id, b.size),
        Err(libc::ENOENT),
        "not the BAR"
    );
    slots.set_dirty_logging(false).unwrap();
    assert_eq!(dirty_log(&fd, r.id, r.size), Err(libc::ENOENT));

    // set_flags on one slot reaches KVM too.
    slots.set_flags(b.id, KVM_MEM_LOG_DIRTY_PAGES).unwrap();
    assert_eq!(dirty_log(&fd, b.id, b.size), Ok(()));
    assert_eq!(
        slots.set_flags(99, 0).unwrap_err().to_string(),
        "no memslot 99 is registered"
    );
}

/// A removed slot is gone from KVM and its id comes back for the next slot of any kind; an
/// overlap is refused before KVM is asked; KVM's own refusals keep the table unchanged.
#[test]
fn removed_ids_are_reused_on_a_real_vm_and_failures_leave_the_table_unchanged() {
    let ram = GuestRam::new(16 * MIB).unwrap();
    let fd = scratch_vm();
    let slots = MemSlots::new(fd.clone());
    let host = ram.host_addrs()[0];
    // SAFETY (all `add`s below): `ram` is declared before the VM and outlives its slots.
    let a = unsafe { slots.add(SlotKind::Ram, 0, 8 * MIB, host, 0) }.unwrap();
    let b = unsafe { slots.add(SlotKind::Ram, 8 * MIB, 8 * MIB, host + 8 * MIB, 0) }.unwrap();
    let e = unsafe { slots.add(SlotKind::DemandChunk, 4 * MIB, PAGE, host, 0) }.unwrap_err();
    assert!(
        matches!(e, MemSlotError::Overlap { other, .. } if other == a),
        "{e}"
    );

    assert_eq!(slots.remove(a.id).unwrap(), a);
    assert!(slots.at(0).is_none());
    // KVM no longer has it: a plain region at the same GPA under another id is accepted.
    let probe = kvm_userspace_memory_region {
        slot: 77,
        guest_phys_addr: 0,
        memory_size: PAGE,
        userspace_addr: host,
        flags: 0,
    };
    // SAFETY: `ram` outlives the VM; the probe slot is deleted right after.
    unsafe { fd.set_user_memory_region(probe) }.unwrap();
    let chunk = unsafe { slots.add(SlotKind::DemandChunk, 0, PAGE, host, 0) }.unwrap_err();
    assert_eq!(errno(&chunk), Some(libc::EEXIST), "{chunk}");
    assert_eq!(slots.len(), 1, "a refused slot is not recorded");
    let gone = kvm_userspace_memory_region {
        slot: 77,
        ..Default::default()
    };
    // SAFETY: deleting hands KVM no memory.
    unsafe { fd.set_user_memory_region(gone) }.unwrap();

    let chunk = unsafe { slots.add(SlotKind::DemandChunk, 0, PAGE, host, 0) }.unwrap();
    assert_eq!(chunk.id, a.id, "the freed id is handed out again");
    assert_eq!(slots.of_kind(SlotKind::DemandChunk), vec![chunk]);
    assert_eq!(slots.ram(), vec![b]);
    assert!(matches!(
        slots.remove(a.id + 100),
        Err(MemSlotError::NoSuchSlot(_))
    ));
}

/// Past the limit a slot is refused with a clear error, and a freed id makes room again.
#[test]
fn the_limit_is_refused_with_a_clear_error_on_a_real_vm() {
    let ram = GuestRam::new(16 * MIB).unwrap();
    let slots = MemSlots::with_limit(scratch_vm(), 2);
    let host = ram.host_addrs()[0];
    // SAFETY (all `add`s below): `ram` is declared before the VM and outlives its slots.
    let first = unsafe { slots.add(SlotKind::DemandChunk, 0, PAGE, host, 0) }.unwrap();
    unsafe { slots.add(SlotKind::DemandChunk, 2 * PAGE, PAGE, host + 2 * PAGE, 0) }.unwrap();
    let e = unsafe { slots.add(SlotKind::DemandChunk, 4 * PAGE, PAGE, host + 4 * PAGE, 0) }
        .unwrap_err();
    assert!(matches!(e, MemSlotError::Exhausted { limit: 2, .. }), "{e}");
    assert!(e.to_string().starts_with("out of memslots"), "{e}");
    slots.remove(first.id).unwrap();
    let again = unsafe { slots.add(SlotKind::DemandChunk, 4 * PAGE, PAGE, host + 4 * PAGE, 0) };
    assert_eq!(again.unwrap().id, first.id);
}
