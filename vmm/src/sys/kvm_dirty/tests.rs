//! These run the ioctls on /dev/kvm. No guest code runs: KVM's own writes to guest memory
//! (`kvm_writes_page`) produce real dirty bits and ring entries. Machines of this kind run
//! different builds of the host kernel (PLATFORM.md §10), so no test assumes the kernel offers
//! manual protect or a dirty ring: where it does, the test exercises it and checks the result;
//! where it does not, it checks that enabling it is refused with the kernel's errno.

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

/// Ring entries the ring tests use, and the bytes that makes.
const RING_ENTRIES: u32 = 4096;
const RING_BYTES: u32 = RING_ENTRIES * DIRTY_GFN_SIZE as u32;

/// Which ring flavour this kernel offers for `RING_BYTES` (ACQ_REL preferred, as vmm does), or
/// None after checking that enabling one is refused with the kernel's errno.
fn ring_offered(what: &str) -> Option<bool> {
    let caps = dirty_ring_caps(&new_vm());
    if caps.acq_rel_max_bytes >= RING_BYTES {
        return Some(true);
    }
    if caps.plain_max_bytes >= RING_BYTES {
        return Some(false);
    }
    let e = enable_dirty_ring(&new_vm(), RING_BYTES, true).expect_err("a ring KVM did not offer");
    assert!(e.errno().is_some(), "{e}");
    eprintln!("SKIPPED {what}: KVM offers no {RING_BYTES}-byte dirty ring ({caps:?}); {e}");
    None
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
    let wanted = MANUAL_PROTECT_ENABLE | MANUAL_PROTECT_INITIALLY_SET;
    if mask & wanted != wanted {
        // Not offered: asking for it anyway is refused, with the kernel's errno.
        let e = enable_manual_protect(&vm, wanted).expect_err("manual protect KVM did not offer");
        assert!(e.errno().is_some(), "{e}");
        eprintln!("SKIPPED: KVM offers MANUAL_DIRTY_LOG_PROTECT2 flags {mask:#x} only; {e}");
        return;
    }
    enable_manual_protect(&vm, wanted).unwrap();
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

/// What KVM says about its rings agrees with what it does: each flavour's largest size is 0
/// (absent) or a power of two; one offered can be enabled at a page's size, one not offered is
/// refused with an errno; ring+bitmap is offered only with a ring.
#[test]
fn dirty_ring_caps_agree_with_enabling_a_ring() {
    let caps = dirty_ring_caps(&new_vm());
    eprintln!("dirty ring caps: {caps:?}");
    for (max, acq_rel) in [
        (caps.acq_rel_max_bytes, true),
        (caps.plain_max_bytes, false),
    ] {
        assert!(max == 0 || max.is_power_of_two(), "{caps:?}");
        let page = page_size() as u32;
        let enabled = enable_dirty_ring(&new_vm(), page, acq_rel);
        if max >= page {
            enabled.unwrap_or_else(|e| panic!("acq_rel={acq_rel} offered up to {max}: {e}"));
        } else {
            let e = enabled.expect_err("a ring KVM did not offer");
            assert!(e.errno().is_some(), "acq_rel={acq_rel}: {e}");
        }
    }
    if caps.with_bitmap {
        assert!(
            caps.acq_rel_max_bytes > 0 || caps.plain_max_bytes > 0,
            "{caps:?}"
        );
    }
}

#[test]
fn dirty_ring_map_pop_and_reset() {
    const ENTRIES: u32 = RING_ENTRIES;
    let Some(acq_rel) = ring_offered("the ring harvest") else {
        return;
    };
    let mem = Mapping::anon(64);
    let vm = new_vm();
    enable_dirty_ring(&vm, RING_BYTES, acq_rel).unwrap();
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

    // KVM's rule wherever it has a ring: with the ring on (and ring+bitmap not enabled, which
    // nothing here does), the bitmap interface answers ENXIO.
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
    // After the first vCPU it is too late: EINVAL, on a kernel with rings or without them.
    let _vcpu = vm.create_vcpu(0).unwrap();
    assert_errno(enable_dirty_ring(&vm, 65536, true), libc::EINVAL);
    assert_errno(enable_dirty_ring(&vm, 65536, false), libc::EINVAL);
}

#[test]
fn dirty_ring_map_rejects_bad_sizes() {
    let Some(acq_rel) = ring_offered("the ring size checks") else {
        return;
    };
    let vm = new_vm();
    enable_dirty_ring(&vm, RING_BYTES, acq_rel).unwrap();
    // Enabling twice is refused by KVM.
    assert_errno(enable_dirty_ring(&vm, RING_BYTES, acq_rel), libc::EINVAL);
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
