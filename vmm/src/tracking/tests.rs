//! The KVM backends on a VM whose RAM does not hold slot id 0: every page they report must come
//! from the slot ids the registry gave, not from a numbering they assume.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

use super::*;
use crate::memory::GuestRam;
use crate::vstate::resources::memslots::SlotKind;

const MIB: u64 = 1 << 20;
const BAR_GPA: u64 = 0xd000_0000;

/// Has KVM itself write guest memory at `gpa` (MSR_KVM_WALL_CLOCK_NEW), which dirty logging and
/// the dirty ring record like a vCPU store, without running the vCPU.
fn kvm_writes_page(vcpu: &VcpuFd, gpa: u64) {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: 0x4b56_4d00,
        data: gpa,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(
        vcpu.set_msrs(&msrs).unwrap(),
        1,
        "MSR_KVM_WALL_CLOCK_NEW refused"
    );
}

fn kvm_write_lands_in_the_dirty_set_by_registry_id(kind: TrackerKind) {
    if let Err(why) = kind.check_host() {
        eprintln!("skipping {kind}: {why}");
        return;
    }
    let ram = GuestRam::new(16 * MIB).unwrap();
    let bar = GuestRam::new(8 * MIB).unwrap();
    let vm = Arc::new(Vm::new(16 * MIB).unwrap());
    let entries = kind
        .needs_dirty_ring()
        .then(|| enable_dirty_ring(vm.fd()).unwrap());
    // A device BAR registered first takes the lowest id; RAM gets whatever comes next.
    // SAFETY: `bar` is declared before the VM, so its mapping outlives the slot.
    let bar_slot = unsafe {
        vm.memslots()
            .add(SlotKind::DeviceBar, BAR_GPA, MIB, bar.host_addrs()[0], 0)
    }
    .unwrap();
    vm.register_ram(&ram).unwrap();
    let slots = slots_of(&vm);
    assert_eq!(slots.len(), 1);
    assert_ne!(slots[0].slot, bar_slot.id);
    assert_eq!((slots[0].gpa, slots[0].size), (0, 16 * MIB));

    let vcpu = vm.create_vcpu(0).unwrap();
    let rings = entries.map(|n| {
        let r = Arc::new(DirtyRings::new(vm.clone(), n));
        r.add_vcpu(&vcpu).unwrap();
        r
    });
    let ctx = TrackContext {
        vm: vm.clone(),
        slots: slots.clone(),
        memory: ram.memory().clone(),
        rings: rings.clone(),
        kick: None,
    };
    let mut t = create(kind, &ctx).unwrap();
    t.start().unwrap();
    let mut set = DirtySet::new(&slots);
    t.harvest(&mut set).unwrap();
    set.clear();

    kvm_writes_page(&vcpu, 0x7000);
    t.harvest(&mut set).unwrap();
    assert!(set.contains_gpa(0x7000), "{kind}: {} pages", set.count());
    assert_eq!(set.count(), 1, "{kind}: only the page KVM wrote");
    if let Some(r) = &rings {
        assert_eq!(
            r.stats().bad_entries,
            0,
            "{kind}: every entry named a RAM slot"
        );
    }
    assert!(
        !vm.memslots().get(bar_slot.id).unwrap().dirty_logging(),
        "{kind}: the BAR is never dirty-logged"
    );
    t.stop().unwrap();
    assert!(
        !vm.memslots().ram()[0].dirty_logging(),
        "{kind}: logging off"
    );
}

#[test]
fn bitmap_reports_pages_by_the_registrys_slot_ids() {
    kvm_write_lands_in_the_dirty_set_by_registry_id(TrackerKind::Bitmap);
}

#[test]
fn bitmap_manual_reports_pages_by_the_registrys_slot_ids() {
    kvm_write_lands_in_the_dirty_set_by_registry_id(TrackerKind::BitmapManual);
}

#[test]
fn ring_entries_map_through_the_registrys_slot_ids() {
    kvm_write_lands_in_the_dirty_set_by_registry_id(TrackerKind::Ring);
}

/// `bar_log` beside a KVM bitmap backend: KVM takes dirty logging on a `DeviceBar` slot, reports
/// a page KVM wrote there once (re-armed after), nothing of RAM, and the slot's logging is off
/// again after `stop`.
fn bar_log_sees_a_kvm_write_to_a_device_bar_slot(kind: TrackerKind) {
    use super::bar_log::{BarLog, BarSlotRange};
    if let Err(why) = kind.check_host() {
        eprintln!("skipping {kind}: {why}");
        return;
    }
    let ram = GuestRam::new(16 * MIB).unwrap();
    let bar = GuestRam::new(8 * MIB).unwrap();
    let vm = Arc::new(Vm::new(16 * MIB).unwrap());
    // SAFETY: `bar` is declared before the VM, so its mapping outlives the slot.
    let bar_slot = unsafe {
        vm.memslots()
            .add(SlotKind::DeviceBar, BAR_GPA, MIB, bar.host_addrs()[0], 0)
    }
    .unwrap();
    vm.register_ram(&ram).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let slots = slots_of(&vm);
    let ctx = TrackContext {
        vm: vm.clone(),
        slots: slots.clone(),
        memory: ram.memory().clone(),
        rings: None,
        kick: None,
    };
    let mut t = create(kind, &ctx).unwrap();
    t.start().unwrap();
    let range = BarSlotRange {
        slot: bar_slot.id,
        first_page: 0,
        size: MIB,
    };
    let mut log = BarLog::start(kind, vm.clone(), vec![range]).unwrap();
    assert!(vm.memslots().get(bar_slot.id).unwrap().dirty_logging());
    let harvest = |log: &mut BarLog| {
        let mut pages = Vec::new();
        let mut scratch = Vec::new();
        log.harvest(
            &mut |first, words| {
                for (w, &bits) in words.iter().enumerate() {
                    for b in 0..64 {
                        if bits >> b & 1 == 1 {
                            pages.push(first + w as u64 * 64 + b);
                        }
                    }
                }
            },
            &mut scratch,
        )
        .unwrap();
        pages
    };
    assert_eq!(
        harvest(&mut log),
        Vec::<u64>::new(),
        "{kind}: clean at start"
    );
    kvm_writes_page(&vcpu, BAR_GPA + 3 * 4096);
    assert_eq!(harvest(&mut log), vec![3], "{kind}");
    assert_eq!(harvest(&mut log), Vec::<u64>::new(), "{kind}: re-armed");
    let mut set = DirtySet::new(&slots);
    t.harvest(&mut set).unwrap();
    assert_eq!(set.count(), 0, "{kind}: nothing of the BAR in RAM's set");
    log.stop().unwrap();
    assert!(!vm.memslots().get(bar_slot.id).unwrap().dirty_logging());
    t.stop().unwrap();
}

#[test]
fn bar_log_with_bitmap_sees_kvm_writes_to_a_bar_slot() {
    bar_log_sees_a_kvm_write_to_a_device_bar_slot(TrackerKind::Bitmap);
}

#[test]
fn bar_log_with_bitmap_manual_sees_kvm_writes_to_a_bar_slot() {
    bar_log_sees_a_kvm_write_to_a_device_bar_slot(TrackerKind::BitmapManual);
}
