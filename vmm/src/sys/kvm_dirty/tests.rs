//! These run the ioctls on /dev/kvm. No guest code runs: KVM's own writes to guest memory
//! (`kvm_writes_page`) produce real dirty bits and ring entries.

use super::*;
use crate::sys::testutil::{Mapping, PAGE};
use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::Kvm;

/// Makes KVM itself write the guest page at `gpa`: setting MSR_KVM_WALL_CLOCK_NEW writes the
/// wall clock there at once, from the vCPU ioctl with the vCPU loaded, so the write is logged
/// to the bitmap or to this vCPU's ring exactly like a guest store.
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

fn new_vm() -> VmFd {
    Kvm::new().and_then(|k| k.create_vm()).expect("create VM")
}

/// Registers `mem` as slot 0 at GPA 0 with dirty logging on.
fn add_logged_slot(vm: &VmFd, mem: &Mapping) {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: 0,
        memory_size: mem.len as u64,
        userspace_addr: mem.addr(),
    };
    // SAFETY: `mem` is a live mapping that the callers declare before the VM, so it outlives it.
    unsafe { vm.set_user_memory_region(region) }.expect("set memslot");
}

fn assert_errno(r: Result<(), SysError>, errno: i32) {
    let e = r.expect_err("the kernel should refuse");
    assert_eq!(e.errno(), Some(errno), "{e}");
}

#[test]
fn ioctl_numbers_match_uapi() {
    assert_eq!(nr::KVM_CLEAR_DIRTY_LOG(), 0xc018_aec0);
    assert_eq!(nr::KVM_RESET_DIRTY_RINGS(), 0xaec7);
}

#[test]
fn manual_protect_initially_set_and_clear() {
    // 200 pages: not a multiple of 64, so the slot's last partial word is exercised.
    const PAGES: usize = 200;
    let mem = Mapping::anon(PAGES);
    let vm = new_vm();
    let mask = manual_protect_supported(&vm);
    assert_eq!(
        mask & 3,
        MANUAL_PROTECT_ENABLE | MANUAL_PROTECT_INITIALLY_SET
    );
    enable_manual_protect(&vm, MANUAL_PROTECT_ENABLE | MANUAL_PROTECT_INITIALLY_SET).unwrap();
    add_logged_slot(&vm, &mem);
    let size = PAGES * PAGE;
    let all = vec![!0u64, !0, !0, 0xff];
    assert_eq!(vm.get_dirty_log(0, size).unwrap(), all);
    // Manual mode: GET does not clear, so a second GET sees the same.
    assert_eq!(vm.get_dirty_log(0, size).unwrap(), all);

    clear_dirty_log(&vm, 0, 0, 64, &[!0]).unwrap();
    assert_eq!(vm.get_dirty_log(0, size).unwrap(), [0, !0, !0, 0xff]);
    // Only the bits set in the bitmap are cleared.
    clear_dirty_log(&vm, 0, 64, 64, &[0xf0]).unwrap();
    assert_eq!(vm.get_dirty_log(0, size).unwrap(), [0, !0xf0, !0, 0xff]);
    // A range ending at the slot's end may have num_pages % 64 != 0.
    clear_dirty_log(&vm, 0, 192, 8, &[0xff]).unwrap();
    assert_eq!(vm.get_dirty_log(0, size).unwrap(), [0, !0xf0, !0, 0]);
    // Elsewhere it may not: the kernel's own check.
    assert_errno(clear_dirty_log(&vm, 0, 64, 10, &[!0]), libc::EINVAL);
    // A fresh write after clearing is logged again.
    let vcpu = vm.create_vcpu(0).unwrap();
    kvm_writes_page(&vcpu, 3 * PAGE as u64);
    assert_eq!(vm.get_dirty_log(0, size).unwrap(), [0b1000, !0xf0, !0, 0]);
    // Unknown flags are refused; 0 switches manual protect off again.
    assert_errno(enable_manual_protect(&vm, 1 << 2), libc::EINVAL);
    enable_manual_protect(&vm, 0).unwrap();
}

#[test]
fn clear_dirty_log_validates_before_the_ioctl() {
    // A VM with no slot 0: if the ioctl were issued it would fail with an Os error (ENOENT).
    let vm = new_vm();
    match clear_dirty_log(&vm, 0, 32, 64, &[!0]) {
        Err(SysError::Invalid(m)) => assert!(m.contains("first_page 32"), "{m}"),
        other => panic!("misaligned first_page: {other:?}"),
    }
    match clear_dirty_log(&vm, 0, 0, 65, &[!0]) {
        Err(SysError::Invalid(m)) => assert!(m.contains("num_pages is 65"), "{m}"),
        other => panic!("short bitmap: {other:?}"),
    }
    let e = clear_dirty_log(&vm, 0, 0, 64, &[!0]).unwrap_err();
    assert!(
        e.errno().is_some(),
        "missing slot should reach the kernel: {e}"
    );
}

#[test]
fn dirty_ring_caps_on_this_host() {
    let caps = dirty_ring_caps(&new_vm());
    eprintln!("dirty ring caps: {caps:?}");
    assert!(caps.acq_rel_max_bytes.is_power_of_two(), "{caps:?}");
    assert!(caps.plain_max_bytes.is_power_of_two(), "{caps:?}");
    // PLATFORM.md §4: this KVM has no ring+bitmap mode.
    assert!(!caps.with_bitmap);
}

#[test]
fn dirty_ring_map_pop_and_reset() {
    const ENTRIES: u32 = 4096;
    let mem = Mapping::anon(64);
    let vm = new_vm();
    enable_dirty_ring(&vm, ENTRIES * DIRTY_GFN_SIZE as u32, true).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    add_logged_slot(&vm, &mem);
    let ring = DirtyRingMap::map(&vcpu, ENTRIES).unwrap();
    assert_eq!(ring.entries(), ENTRIES);
    assert!((0..ENTRIES).all(|i| ring.pop(i).is_none()));
    assert_eq!(reset_dirty_rings(&vm).unwrap(), 0);

    // KVM writes page 3 (several stores, one entry each); harvest in order. Indices run on past
    // the ring size, as a harvester's counter does: `pop` wraps them.
    let mut next = ENTRIES;
    let mut harvest = || {
        let mut got = Vec::new();
        while let Some(e) = ring.pop(next) {
            got.push(e);
            next += 1;
        }
        got
    };
    kvm_writes_page(&vcpu, 3 * PAGE as u64);
    let got = harvest();
    eprintln!("one wall-clock write by KVM: {} ring entries", got.len());
    assert!(!got.is_empty());
    assert!(got.iter().all(|&e| e == (0, 3)), "{got:?}");
    // Harvested entries are RESET, not re-reported; KVM recycles exactly those.
    assert!(ring.pop(ENTRIES).is_none());
    assert_eq!(reset_dirty_rings(&vm).unwrap() as usize, got.len());
    assert_eq!(reset_dirty_rings(&vm).unwrap(), 0);

    kvm_writes_page(&vcpu, 9 * PAGE as u64);
    let again = harvest();
    assert!(
        !again.is_empty() && again.iter().all(|&e| e == (0, 9)),
        "{again:?}"
    );
    assert_eq!(reset_dirty_rings(&vm).unwrap() as usize, again.len());

    // PLATFORM.md §4: with the ring on, the bitmap interface is gone.
    let e = vm.get_dirty_log(0, mem.len).unwrap_err();
    assert_eq!(e.errno(), libc::ENXIO);
    assert_errno(clear_dirty_log(&vm, 0, 0, 64, &[!0]), libc::ENXIO);
}

#[test]
fn dirty_ring_enable_rules() {
    let vm = new_vm();
    match enable_dirty_ring(&vm, 3 * 4096, true) {
        Err(SysError::Invalid(m)) => assert!(m.contains("12288"), "{m}"),
        other => panic!("non-power-of-two size: {other:?}"),
    }
    assert!(matches!(
        enable_dirty_ring(&vm, 0, false),
        Err(SysError::Invalid(_))
    ));
    let _vcpu = vm.create_vcpu(0).unwrap();
    assert_errno(enable_dirty_ring(&vm, 65536, true), libc::EINVAL);
    assert_errno(enable_dirty_ring(&vm, 65536, false), libc::EINVAL);
}

#[test]
fn dirty_ring_map_rejects_bad_sizes() {
    let vm = new_vm();
    enable_dirty_ring(&vm, 65536, true).unwrap();
    // Enabling twice is refused by KVM.
    assert_errno(enable_dirty_ring(&vm, 65536, true), libc::EINVAL);
    let vcpu = vm.create_vcpu(0).unwrap();
    assert!(matches!(
        DirtyRingMap::map(&vcpu, 1000),
        Err(SysError::Invalid(_))
    ));
    assert!(matches!(
        DirtyRingMap::map(&vcpu, 0),
        Err(SysError::Invalid(_))
    ));
}
