//! A virtio-blk read lands in guest memory through the VMM's own mapping, where KVM's dirty log
//! never sees it. Every backend must still report those pages: the harvest ORs in the VMM-write
//! bitmap (and the userfaultfd backends also see the write themselves). Real VM on /dev/kvm,
//! real memfd guest RAM, the real virtio-blk device driven through its MMIO registers.

use std::io::Write;
use std::sync::Arc;

use devices::bus::BusDevice;
use devices::interrupt::IrqLine;
use devices::virtio::block::{Block, SECTOR_SIZE};
use devices::virtio::test_utils::{reg_read, reg_write, Buf, DriverQueue};
use devices::virtio::{MmioTransport, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio::*;
use vm_memory::{Bytes, GuestAddress};
use vmm::memory::GuestRam;
use vmm::tracking::{self, DirtyRings, DirtySet, TrackContext, TrackerKind};
use vmm::vstate::vm::Vm;

const QUEUE_BASE: u64 = 0x10_0000;
const HEADER: u64 = 0x11_0000;
const STATUS: u64 = 0x12_0000;
/// Two pages the device fills from the disk.
const DATA: u64 = 0x20_0000;
const DATA_LEN: u32 = 8192;

fn disk() -> std::fs::File {
    let mut f = tempfile_in_tmp();
    let bytes: Vec<u8> = (0..64 * SECTOR_SIZE).map(|i| (i % 251) as u8 + 1).collect();
    f.write_all(&bytes).unwrap();
    f
}

fn tempfile_in_tmp() -> std::fs::File {
    vmm_sys_util::tempfile::TempFile::new().unwrap().into_file()
}

/// Brings the device up and queues one IN request for 8 KiB at sector 0 (driver-side writes
/// only; the device has not run yet).
fn queue_read(mem: &vmm::memory::GuestMemory) -> MmioTransport {
    let block = Block::new(disk(), false, "trk").unwrap();
    let irq = Arc::new(IrqLine::new(5).unwrap());
    let mut t = MmioTransport::new(Box::new(block), mem.clone(), irq).unwrap();
    let mut q = DriverQueue::new(mem, QUEUE_BASE, 16);
    let mut status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
    reg_write(&mut t, VIRTIO_MMIO_STATUS, status);
    reg_write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    reg_write(
        &mut t,
        VIRTIO_MMIO_DRIVER_FEATURES,
        (VIRTIO_F_VERSION_1 >> 32) as u32,
    );
    status |= VIRTIO_CONFIG_S_FEATURES_OK;
    reg_write(&mut t, VIRTIO_MMIO_STATUS, status);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 16);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc as u32);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail as u32);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, q.used as u32);
    reg_write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
    reg_write(
        &mut t,
        VIRTIO_MMIO_STATUS,
        status | VIRTIO_CONFIG_S_DRIVER_OK,
    );
    assert_eq!(
        reg_read(&mut t, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_DRIVER_OK
    );
    mem.write_obj(VIRTIO_BLK_T_IN.to_le(), GuestAddress(HEADER))
        .unwrap();
    mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
    mem.write_obj(0u64, GuestAddress(HEADER + 8)).unwrap();
    q.add_chain(
        mem,
        &[
            Buf::ro(HEADER, 16),
            Buf::wo(DATA, DATA_LEN),
            Buf::wo(STATUS, 1),
        ],
    );
    t
}

fn read_lands_in_dirty_set(kind: TrackerKind) {
    let ram = GuestRam::new(16 << 20).unwrap();
    let vm = Arc::new(Vm::new(ram.size()).unwrap());
    let entries = kind
        .needs_dirty_ring()
        .then(|| tracking::enable_dirty_ring(vm.fd()).unwrap());
    vm.register_ram(&ram).unwrap();
    let slots = tracking::slots_of(&vm);
    let mem = ram.memory().clone();
    // The ring lives on a vCPU; one that never runs is enough to hold it.
    let vcpu = vm.create_vcpu(0).unwrap();
    let rings = entries.map(|n| {
        let r = Arc::new(DirtyRings::new(vm.clone(), n));
        r.add_vcpu(&vcpu).unwrap();
        r
    });
    let ctx = TrackContext {
        vm: vm.clone(),
        slots: slots.clone(),
        memory: mem.clone(),
        rings,
        kick: None,
    };
    let mut transport = queue_read(&mem);
    let mut tracker = tracking::create(kind, &ctx).unwrap();
    tracker.start().unwrap();

    // The device runs in this thread, as it would in a vCPU thread on QueueNotify. Under
    // uffd-wp its writes block here until the handler thread lifts the protection.
    transport.write(u64::from(VIRTIO_MMIO_QUEUE_NOTIFY), &0u32.to_le_bytes());
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        VIRTIO_BLK_S_OK as u8,
        "{kind}: the read failed"
    );
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(DATA + 4097)).unwrap(),
        (4097 % 251) as u8 + 1
    );

    let mut set = DirtySet::new(&slots);
    tracker.harvest(&mut set).unwrap();
    for gpa in [DATA, DATA + 4096, STATUS] {
        assert!(
            set.contains_gpa(gpa),
            "{kind}: device write at {gpa:#x} missing from the dirty set"
        );
    }
    let used_page = QUEUE_BASE + 0x1000;
    assert!(
        set.contains_gpa(used_page),
        "{kind}: used ring update missing"
    );
    assert!(
        !set.contains_gpa(HEADER),
        "{kind}: the header was only read"
    );
    assert!(
        !set.contains_gpa(0x80_0000),
        "{kind}: untouched page reported"
    );

    // The next round starts clean: nothing was written since.
    set.clear();
    tracker.harvest(&mut set).unwrap();
    assert!(set.is_empty(), "{kind}: {} stale pages", set.count());
    tracker.stop().unwrap();
}

#[test]
fn virtio_blk_read_is_in_every_available_backends_dirty_set() {
    let mut tested = Vec::new();
    for kind in TrackerKind::ALL {
        match kind.check_host() {
            Ok(()) => {
                read_lands_in_dirty_set(kind);
                tested.push(kind.name());
            }
            Err(why) => eprintln!("{kind}: not available here, not tested: {why}"),
        }
    }
    // The KVM bitmap needs nothing but KVM: a host where it is missing is not a host at all.
    assert!(tested.contains(&"bitmap"), "tested only {tested:?}");
    eprintln!("tested: {tested:?}");
}
