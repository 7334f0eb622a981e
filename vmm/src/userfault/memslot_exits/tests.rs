//! memslot-exits on a real KVM VM (no vCPU: the slot bookkeeping, the VMM's own accesses
//! through userfaultfd, merging and disarm). The vCPU side runs in tests/tests/lazy_restore.rs.

use std::sync::Arc;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::memory::GuestRam;
use crate::userfault::exits::Fetch;

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
