//! memslot-exits on a real KVM VM (no vCPU: the slot bookkeeping, the VMM's own accesses
//! through userfaultfd, merging and disarm). The vCPU side runs in tests/tests/lazy_restore.rs.

use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::memory::GuestRam;
use crate::userfault::exits::Fetch;
use crate::vstate::resources::memslots::SlotKind;

const MIB: u64 = 1 << 20;

struct Fill {
    pager: Arc<MemslotExits>,
}

impl Fetch for Fill {
    fn fetch(&self, gpa: u64, pages: u64) -> Result<(), UserfaultError> {
        let mut data = vec![0u8; (pages * PAGE) as usize];
        for (i, page) in data.chunks_mut(PAGE as usize).enumerate() {
            page[..8].copy_from_slice(&(gpa + i as u64 * PAGE).to_le_bytes());
        }
        self.pager.install(gpa, &data).map(|_| ())
    }
}

fn armed(pending: &[(u64, u64)], soft: usize) -> (GuestRam, Arc<Vm>, Arc<MemslotExits>) {
    let ram = GuestRam::new(16 * MIB).unwrap();
    let vm = Arc::new(Vm::new(ram.size()).unwrap());
    vm.register_ram(&ram).unwrap();
    let pager = Arc::new(
        MemslotExits::arm(
            vm.clone(),
            ram.ranges(),
            &ram.host_addrs(),
            ram.file(),
            pending,
            PAGE,
            soft,
        )
        .unwrap(),
    );
    (ram, vm, pager)
}

#[test]
fn pending_pages_are_unmapped_until_resolved_and_slots_stay_bounded() {
    // 64 pending pages every other page from 8 MiB: the worst case for slot count.
    let pending: Vec<(u64, u64)> = (0..64).map(|i| (8 * MIB + 2 * i * PAGE, 1)).collect();
    let (_ram, _vm, pager) = armed(&pending, 4);
    let ex = pager.exits().unwrap();
    ex.set_fetch(Arc::new(Fill {
        pager: pager.clone(),
    }));
    assert!(ex.mapped(0x1000));
    assert!(!ex.mapped(8 * MIB));
    assert!(
        ex.mapped(8 * MIB + PAGE),
        "present pages between stay mapped"
    );
    for i in 0..64 {
        let gpa = 8 * MIB + 2 * i * PAGE;
        assert!(ex.resolve(0, gpa + 8, 8).unwrap());
        assert!(ex.mapped(gpa));
        let mut w = [0u8; 8];
        ex.complete_read(gpa, &mut w).unwrap();
        assert_eq!(u64::from_le_bytes(w), gpa);
    }
    let st = ex.stats();
    assert_eq!(st.fetched, 64);
    assert!(st.merges > 0, "{st:?}");
    // Above the soft limit every new chunk merged into an unpinned neighbour.
    assert!(st.memslots_max <= 4 + 66, "{st:?}");
    assert!(
        !ex.resolve(0, 64 * MIB, 8).unwrap(),
        "outside RAM is not ours"
    );
    pager.disarm().unwrap();
    assert!(ex.mapped(8 * MIB));
}

#[test]
fn the_vmms_own_access_to_a_missing_page_waits_for_the_handler() {
    let (ram, _vm, pager) = armed(&[(4 * MIB, 2)], DEFAULT_SOFT_LIMIT);
    let mem = ram.memory().clone();
    let reader = std::thread::spawn(move || mem.read_obj::<u64>(GuestAddress(4 * MIB + PAGE)));
    let fault = loop {
        if let Some(f) = pager.next_fault(Duration::from_secs(5)).unwrap() {
            break f;
        }
    };
    assert_eq!(fault.gpa, 4 * MIB + PAGE);
    let mut page = vec![0u8; PAGE as usize];
    page[..8].copy_from_slice(&0xabcdu64.to_le_bytes());
    pager.install(4 * MIB + PAGE, &page).unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), 0xabcd);
    // The page is in memory but not yet mapped for vCPUs: an exit on it only maps.
    let ex = pager.exits().unwrap();
    assert!(!ex.mapped(4 * MIB + PAGE));
    assert!(ex.resolve(0, 4 * MIB + PAGE, 8).unwrap());
    assert_eq!(ex.stats().mapped_only, 1);
}

#[test]
fn queued_vcpu_faults_reach_the_handler_and_wake_on_install() {
    let (_ram, _vm, pager) = armed(&[(2 * MIB, 1)], DEFAULT_SOFT_LIMIT);
    let ex = pager.exits().unwrap();
    let vcpu = std::thread::spawn(move || ex.resolve(3, 2 * MIB + 16, 4));
    let fault = loop {
        if let Some(f) = pager.next_fault(Duration::from_secs(5)).unwrap() {
            break f;
        }
    };
    assert_eq!(fault.gpa, 2 * MIB);
    pager.install(2 * MIB, &[7u8; 4096]).unwrap();
    assert!(vcpu.join().unwrap().unwrap());
    assert!(pager.exits().unwrap().mapped(2 * MIB));
}

/// The pager's slots are the registry's: while armed, RAM is only `DemandChunk` slots around
/// the missing pages (a device BAR registered before RAM keeps its slot and its id); once
/// every page is in, `settle_layout` gives back one `Ram` slot per range through the registry.
#[test]
fn chunks_live_in_the_registry_and_settling_restores_ram_slots() {
    let ram = GuestRam::new(16 * MIB).unwrap();
    let bar = GuestRam::new(8 * MIB).unwrap();
    let vm = Arc::new(Vm::new(16 * MIB).unwrap());
    // SAFETY: `bar` is declared before the VM, so its mapping outlives the slot.
    let bar_slot = unsafe {
        vm.memslots().add(
            SlotKind::DeviceBar,
            0xd000_0000,
            MIB,
            bar.host_addrs()[0],
            0,
        )
    }
    .unwrap();
    vm.register_ram(&ram).unwrap();
    let pending = [(4 * MIB, 1), (8 * MIB, 2)];
    let pager = Arc::new(
        MemslotExits::arm(
            vm.clone(),
            ram.ranges(),
            &ram.host_addrs(),
            ram.file(),
            &pending,
            PAGE,
            DEFAULT_SOFT_LIMIT,
        )
        .unwrap(),
    );
    let slots = vm.memslots();
    assert!(slots.ram().is_empty(), "the pager took the RAM slots over");
    let chunks = slots.of_kind(SlotKind::DemandChunk);
    // Around two holes: [0, 4M), [4M+4K, 8M), [8M+8K, 16M).
    let spans: Vec<(u64, u64)> = chunks.iter().map(|s| (s.gpa, s.end())).collect();
    assert_eq!(
        spans,
        vec![
            (0, 4 * MIB),
            (4 * MIB + PAGE, 8 * MIB),
            (8 * MIB + 2 * PAGE, 16 * MIB)
        ]
    );
    assert_eq!(
        slots.get(bar_slot.id),
        Some(bar_slot),
        "the BAR is untouched"
    );
    assert_eq!(slots.at(4 * MIB), None, "a missing page is in no slot");

    let ex = pager.exits().unwrap();
    ex.set_fetch(Arc::new(Fill {
        pager: pager.clone(),
    }));
    assert!(ex.resolve(0, 4 * MIB, 8).unwrap());
    assert_eq!(
        slots.at(4 * MIB).map(|s| s.kind),
        Some(SlotKind::DemandChunk)
    );
    assert!(
        ex.settle_layout().is_err(),
        "not while pages are still missing"
    );
    assert!(ex.resolve(0, 8 * MIB, 2 * PAGE).unwrap());
    ex.settle_layout().unwrap();
    assert!(ex.layout_settled());
    assert!(slots.of_kind(SlotKind::DemandChunk).is_empty());
    let ram_slots: Vec<(u64, u64)> = slots.ram().iter().map(|s| (s.gpa, s.size)).collect();
    assert_eq!(ram_slots, vec![(0, 16 * MIB)]);
    assert_eq!(slots.len(), 2, "RAM and the BAR");
    assert!(slots.get(bar_slot.id).is_some());
    // KVM agrees: dirty logging can be turned on for the restored RAM slot.
    slots.set_dirty_logging(true).unwrap();
    let id = slots.ram()[0].id;
    vm.fd().get_dirty_log(id, (16 * MIB) as usize).unwrap();
}
