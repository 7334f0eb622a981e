//! Layout, bitmap and exit-decoding tests, and the real /dev/kvm. Machines of this kind run
//! different builds of the host kernel (PLATFORM.md §10), and KVM_MEM_USERFAULT is not merged
//! upstream, so no test here assumes either answer: where the kernel takes the flag, a real
//! guest access to a marked page must exit and resume; where it refuses, the refusal must carry
//! the kernel's errno, the same one `probe_support` reports. The hand-built region2 struct is
//! proven against the kernel with the flags every kernel knows.

use super::*;
use crate::sys::testutil::{Mapping, PAGE as TPAGE};
use kvm_bindings::{
    kvm_msr_entry, kvm_segment, kvm_userspace_memory_region, Msrs, KVM_EXIT_MMIO,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit};
use std::sync::Arc;

fn new_vm() -> VmFd {
    Kvm::new().and_then(|k| k.create_vm()).expect("create VM")
}

/// Makes KVM itself write the guest page at `gpa` (MSR_KVM_WALL_CLOCK_NEW writes the wall clock
/// there at once), so the write lands in the slot's memory and its dirty bitmap.
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

#[test]
fn ioctl_number_and_layout_match_the_series() {
    assert_eq!(nr::KVM_SET_USER_MEMORY_REGION2(), 0x40a0_ae49);
    assert_eq!(std::mem::size_of::<UserspaceMemoryRegion2>(), 160);
    let r = UserspaceMemoryRegion2 {
        slot: 1,
        flags: KVM_MEM_USERFAULT,
        userfault_bitmap: 0x1122_3344_5566_7788,
        ..Default::default()
    };
    // SAFETY: a plain-old-data repr(C) struct viewed as its 160 bytes.
    let bytes: &[u8] = unsafe {
        std::slice::from_raw_parts((&r as *const UserspaceMemoryRegion2).cast(), REGION2_SIZE)
    };
    assert_eq!(&bytes[4..8], &8u32.to_ne_bytes());
    assert_eq!(&bytes[48..56], &0x1122_3344_5566_7788u64.to_ne_bytes());
    assert!(bytes[56..].iter().all(|&b| b == 0));
}

#[test]
fn bitmap_bits_ranges_and_pointer() {
    let b = UserfaultBitmap::for_size(130 * PAGE + 1);
    assert_eq!(b.pages(), 131);
    assert_eq!(b.count_set(), 0);
    assert!(b.set(0));
    assert!(!b.set(0));
    assert!(b.set(64));
    assert!(b.is_set_acquire(64) && !b.is_set_acquire(63));
    assert!(b.clear_release(64));
    assert!(!b.clear_release(64));
    // A range across two word boundaries.
    b.set_range(60, 70);
    assert_eq!(b.count_set(), 71);
    assert_eq!(b.set_runs(0, 131), vec![(0, 1), (60, 70)]);
    b.clear_range_release(62, 66);
    assert_eq!(b.set_runs(0, 131), vec![(0, 1), (60, 2), (128, 2)]);
    assert_eq!(b.set_runs(61, 2), vec![(61, 1)]);
    // The pointer KVM gets is the array of longs: bit p of long p/64.
    let ptr = b.as_ptr() as *const u64;
    // SAFETY: the bitmap has 3 words and lives for this block; plain reads of its atomics.
    let words = unsafe { [*ptr, *ptr.add(1), *ptr.add(2)] };
    assert_eq!(words, [1 | (3 << 60), 0, 3]);
    b.set_all();
    assert_eq!(b.count_set(), 131);
    b.clear_range_release(0, 131);
    assert_eq!(b.count_set(), 0);
    b.set_range(5, 0);
    assert_eq!(b.count_set(), 0);
}

#[test]
#[should_panic(expected = "outside a userfault bitmap")]
fn bitmap_refuses_pages_past_its_end() {
    UserfaultBitmap::new(10).set(10);
}

#[test]
#[should_panic(expected = "outside a userfault bitmap")]
fn bitmap_refuses_ranges_past_its_end() {
    UserfaultBitmap::new(10).set_range(8, 3);
}

/// Threads set and clear their own bits of shared words at once: no update is lost.
#[test]
fn concurrent_set_and_clear_lose_nothing() {
    const THREADS: u64 = 8;
    const PAGES: u64 = 1024;
    let b = Arc::new(UserfaultBitmap::new(PAGES));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let b = b.clone();
            std::thread::spawn(move || {
                for round in 0..200 {
                    for p in (t..PAGES).step_by(THREADS as usize) {
                        assert!(b.set(p), "page {p} round {round}");
                    }
                    for p in (t..PAGES).step_by(THREADS as usize) {
                        // Leave every fourth page of the last round set.
                        if round < 199 || p % 4 != 0 {
                            assert!(b.clear_release(p), "page {p} round {round}");
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(b.count_set(), PAGES / 4);
    assert!((0..PAGES).all(|p| b.is_set_acquire(p) == (p % 4 == 0)));
}

/// The install protocol: the installer writes the page, then `clear_release`; whoever sees the
/// bit clear with `is_set_acquire` sees the page's contents.
#[test]
fn clear_release_publishes_the_installed_page() {
    const PAGES: u64 = 256;
    let b = Arc::new(UserfaultBitmap::new(PAGES));
    b.set_all();
    let data: Arc<Vec<AtomicU64>> = Arc::new((0..PAGES).map(|_| AtomicU64::new(0)).collect());
    let installer = {
        let (b, data) = (b.clone(), data.clone());
        std::thread::spawn(move || {
            for p in 0..PAGES {
                data[p as usize].store(p + 1, Ordering::Relaxed);
                b.clear_release(p);
            }
        })
    };
    let mut seen = 0;
    while seen < PAGES {
        if !b.is_set_acquire(seen) {
            assert_eq!(data[seen as usize].load(Ordering::Relaxed), seen + 1);
            seen += 1;
        }
        std::hint::spin_loop();
    }
    installer.join().unwrap();
}

/// The kernel's own words for a refusal, as `probe_support` must name it.
fn named(errno: i32) -> String {
    match errno {
        libc::EINVAL => "no KVM_MEM_USERFAULT (not merged upstream; v3 posted June 2025)".into(),
        libc::ENOTTY => "returned ENOTTY".into(),
        other => std::io::Error::from_raw_os_error(other).to_string(),
    }
}

/// Whatever this kernel is, `probe_support` agrees with the flag tried directly on a fresh VM:
/// supported where the kernel takes a userfault slot, and otherwise refused with the same errno,
/// named in the explanation. Either way the probe leaves no slot behind.
#[test]
fn probe_support_agrees_with_the_kernel_and_leaves_no_slot() {
    let vm = new_vm();
    let support = probe_support(&vm);
    eprintln!("KVM_MEM_USERFAULT here: {support:?}");
    let mem = Mapping::anon(1);
    let bitmap = UserfaultBitmap::new(1);
    let direct_vm = new_vm();
    // SAFETY: `mem` and `bitmap` are declared before the VM, so they outlive its slots.
    let direct =
        unsafe { set_userfault_region(&direct_vm, 0, 0, TPAGE as u64, mem.addr(), &bitmap, 0) };
    match (&support, &direct) {
        (Support::Supported, Ok(())) => remove_slot(&direct_vm, 0).unwrap(),
        (Support::Unsupported { errno, explanation }, Err(e)) => {
            assert_ne!(*errno, 0, "{explanation}");
            assert_eq!(e.errno(), Some(*errno), "the kernel's answer: {e}");
            assert!(explanation.contains(&named(*errno)), "{explanation}");
        }
        _ => panic!("probe_support says {support:?}, the flag tried directly {direct:?}"),
    }
    // Nothing was left at the probe's GPA: a slot of our own fits there.
    let region = UserspaceMemoryRegion2 {
        slot: 0,
        guest_phys_addr: PROBE_GPA,
        memory_size: TPAGE as u64,
        userspace_addr: mem.addr(),
        ..Default::default()
    };
    // SAFETY: `mem` is declared before the VM... and outlives the slot: removed below.
    unsafe { set_region2(&vm, &region) }.unwrap();
    remove_slot(&vm, 0).unwrap();
}

/// A bitmap too small for the slot is refused before the kernel is asked (no errno), on any
/// kernel.
#[test]
fn set_userfault_region_checks_the_bitmap_before_the_kernel() {
    let mem = Mapping::anon(8);
    let vm = new_vm();
    let small = UserfaultBitmap::new(4);
    // SAFETY: refused before any ioctl.
    let e = unsafe { set_userfault_region(&vm, 0, 0, mem.len as u64, mem.addr(), &small, 0) }
        .unwrap_err();
    assert_eq!(e.errno(), None, "{e}");
    assert!(e.to_string().contains("4 pages"), "{e}");
}

/// The guest for the vCPU tests: long mode at CPL0, its GDT, page tables (an identity map of
/// the first GiB in 2 MiB pages) and code in a 64 KiB control slot at GPA 0. The code loads the
/// byte at one GPA and writes it to port [`DONE_PORT`].
const CONTROL_SLOT: u32 = 9;
const CONTROL_LEN: usize = 16;
const GDT: u64 = 0x1000;
const TSS: u64 = 0x1800;
const PML4: u64 = 0x2000;
const PDPT: u64 = 0x3000;
const PD: u64 = 0x4000;
const CODE: u64 = 0x8000;
const DONE_PORT: u8 = 0xf0;

fn put(ctl: &Mapping, gpa: u64, bytes: &[u8]) {
    assert!(gpa as usize + bytes.len() <= ctl.len);
    // SAFETY: the range lies inside the control mapping (checked above), which is live.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), ctl.ptr.add(gpa as usize), bytes.len())
    };
}

/// Loads the guest into a fresh control mapping, registered on `vm`, and sets up `vcpu` to run
/// it; the caller keeps the returned mapping until the VM is gone.
fn load_guest(vm: &VmFd, vcpu: &VcpuFd, gpa: u64) -> Mapping {
    assert!(gpa < 1 << 30, "outside the guest's identity map");
    let ctl = Mapping::anon(CONTROL_LEN);
    // GDT: null, 64-bit kernel code (0x08), kernel data (0x10), 64-bit TSS (0x18).
    put(&ctl, GDT + 0x08, &0x00af_9b00_0000_ffffu64.to_le_bytes());
    put(&ctl, GDT + 0x10, &0x00cf_9300_0000_ffffu64.to_le_bytes());
    let tss = 0x67 | (TSS & 0xff_ffff) << 16 | 0x8b << 40;
    put(&ctl, GDT + 0x18, &tss.to_le_bytes());
    put(&ctl, PML4, &(PDPT | 3).to_le_bytes());
    put(&ctl, PDPT, &(PD | 3).to_le_bytes());
    for i in 0..512u64 {
        put(&ctl, PD + i * 8, &(i << 21 | 0x83).to_le_bytes());
    }
    // mov rax, gpa; mov al, [rax]; out DONE_PORT, al; jmp $
    let mut code = vec![0x48, 0xb8];
    code.extend_from_slice(&gpa.to_le_bytes());
    code.extend_from_slice(&[0x8a, 0x00, 0xe6, DONE_PORT, 0xeb, 0xfe]);
    put(&ctl, CODE, &code);
    let region = kvm_userspace_memory_region {
        slot: CONTROL_SLOT,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ctl.len as u64,
        userspace_addr: ctl.addr(),
    };
    // SAFETY: the caller keeps `ctl` mapped until the VM is closed.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let kvm = Kvm::new().unwrap();
    vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap())
        .unwrap();
    let seg = |selector: u16, type_: u8, long: bool| kvm_segment {
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    };
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs = seg(0x08, 0xb, true);
    let ds = seg(0x10, 0x3, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (ds, ds, ds, ds, ds);
    sregs.tr = kvm_segment {
        base: TSS,
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 0x27;
    sregs.idt.limit = 0;
    sregs.cr3 = PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 1 | 1 << 4 | 1 << 5 | 1 << 31; // PE, ET, NE, PG
    sregs.efer = 1 << 8 | 1 << 10; // LME, LMA
    vcpu.set_sregs(&sregs).unwrap();
    let mut regs = vcpu.get_regs().unwrap();
    regs.rip = CODE;
    regs.rsp = 0xf000;
    regs.rflags = 0x2;
    vcpu.set_regs(&regs).unwrap();
    ctl
}

/// How one KVM_RUN of the guest ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The guest wrote the byte it loaded to the done port.
    Loaded(u8),
    MemoryFault(MemoryFault),
    /// Any other end, described for the test's assertion message.
    Other(String),
}

fn run_guest(vcpu: &mut VcpuFd) -> End {
    loop {
        return match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) if port == u16::from(DONE_PORT) && data.len() == 1 => {
                End::Loaded(data[0])
            }
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                End::MemoryFault(MemoryFault::from_fields(flags, gpa, size))
            }
            Ok(other) => End::Other(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => End::Other(format!("KVM_RUN: {e}")),
        };
    }
}

/// The success path where the kernel has KVM_MEM_USERFAULT: a guest load from a page marked in
/// the bitmap exits with KVM_EXIT_MEMORY_FAULT (flag USERFAULT, the page's GPA) before it
/// happens; once the page is installed and its bit cleared with a store-release, re-entering
/// completes the load with the installed byte. Where the kernel lacks the flag, registering a
/// userfault slot is refused with the errno `probe_support` names, and the exit is not tried.
#[test]
fn userfault_exits_and_resumes_where_the_kernel_has_it() {
    const DATA_SLOT: u32 = 1;
    const DATA_GPA: u64 = 0x20_0000;
    const PAGES: usize = 4;
    let data = Mapping::anon(PAGES);
    let bitmap = UserfaultBitmap::new(PAGES as u64);
    bitmap.set(2);
    let vm = new_vm();
    let support = probe_support(&vm);
    // SAFETY: `data` and `bitmap` are declared before the VM, so they outlive its slots.
    let armed = unsafe {
        set_userfault_region(
            &vm,
            DATA_SLOT,
            DATA_GPA,
            data.len as u64,
            data.addr(),
            &bitmap,
            0,
        )
    };
    match (support, armed) {
        (Support::Unsupported { errno, explanation }, Err(e)) => {
            assert_eq!(e.errno(), Some(errno), "{e} / {explanation}");
            eprintln!(
                "this kernel refuses KVM_MEM_USERFAULT ({e}): the exit is not tried; \
                 {explanation}"
            );
            return;
        }
        (Support::Supported, Ok(())) => {}
        (s, a) => panic!("probe_support says {s:?}, registering the slot {a:?}"),
    }
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let gpa = DATA_GPA + 2 * TPAGE as u64;
    let _ctl = load_guest(&vm, &vcpu, gpa);
    match run_guest(&mut vcpu) {
        End::MemoryFault(f) => {
            assert!(f.userfault, "{f:?}");
            assert_eq!(f.slot_pages(DATA_GPA), (2, 1), "{f:?}");
        }
        other => panic!("a load from a marked page: {other:?}"),
    }
    // The VMM installs the page, then publishes it by clearing the bit; the load then completes.
    data.write(2, 0x5a);
    assert!(bitmap.clear_release(2));
    assert_eq!(run_guest(&mut vcpu), End::Loaded(0x5a));
    // Clearing the flag (a plain re-registration) lets every page through again.
    remove_slot(&vm, DATA_SLOT).unwrap();
}

/// The hand-built struct against the real kernel, without the userfault flag: a dirty-logged
/// slot registered through it receives KVM's own write at the right host offset, reports it in
/// the right dirty bit, conflicts with an overlapping slot, and can be deleted and re-added.
#[test]
fn hand_built_region2_works_on_this_kernel() {
    const PAGES: usize = 64;
    const GPA: u64 = 0x20_0000;
    const SLOT: u32 = 3;
    let mem = Mapping::anon(PAGES);
    let vm = new_vm();
    let region = UserspaceMemoryRegion2 {
        slot: SLOT,
        flags: KVM_MEM_LOG_DIRTY_PAGES,
        guest_phys_addr: GPA,
        memory_size: mem.len as u64,
        userspace_addr: mem.addr(),
        ..Default::default()
    };
    // SAFETY: `mem` is declared before the VM, so it outlives every slot.
    unsafe { set_region2(&vm, &region) }.unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    kvm_writes_page(&vcpu, GPA + 37 * TPAGE as u64);
    let log = vm.get_dirty_log(SLOT, mem.len).unwrap();
    assert_eq!(log, vec![1u64 << 37]);
    // The wall clock (version, seconds) landed in page 37 of our mapping.
    // SAFETY: 12 bytes inside the live mapping, written by KVM before the ioctl returned.
    let wall = unsafe { std::slice::from_raw_parts(mem.ptr.add(37 * TPAGE), 12) };
    assert!(wall.iter().any(|&b| b != 0), "{wall:?}");
    assert!((0..PAGES).filter(|&p| p != 37).all(|p| mem.read(p) == 0));

    // An overlapping slot is refused; the slot deletes and re-adds.
    let other = UserspaceMemoryRegion2 {
        slot: SLOT + 1,
        guest_phys_addr: GPA + 8 * TPAGE as u64,
        memory_size: TPAGE as u64,
        userspace_addr: mem.addr(),
        ..Default::default()
    };
    // SAFETY: as above.
    let e = unsafe { set_region2(&vm, &other) }.unwrap_err();
    assert_eq!(e.errno(), Some(libc::EEXIST), "{e}");
    remove_slot(&vm, SLOT).unwrap();
    // SAFETY: as above.
    unsafe { set_region2(&vm, &other) }.unwrap();
    // An unknown flag bit (one the series does not define either) is refused.
    let bad = UserspaceMemoryRegion2 {
        slot: SLOT,
        flags: 1 << 20,
        ..region
    };
    // SAFETY: as above; refused.
    let e = unsafe { set_region2(&vm, &bad) }.unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
}

/// The vCPU tests' guest on any kernel, through a hand-built region2 slot without the userfault
/// flag: its load reads the byte the host put there. (So where the userfault test skips its
/// exit, the guest it would run is still proven.)
#[test]
fn the_guest_loads_through_a_hand_built_slot() {
    const GPA: u64 = 0x20_0000;
    let data = Mapping::anon(4);
    data.write(2, 0xa5);
    let vm = new_vm();
    let region = UserspaceMemoryRegion2 {
        slot: 1,
        guest_phys_addr: GPA,
        memory_size: data.len as u64,
        userspace_addr: data.addr(),
        ..Default::default()
    };
    // SAFETY: `data` is declared before the VM, so it outlives the slot.
    unsafe { set_region2(&vm, &region) }.unwrap();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    let _ctl = load_guest(&vm, &vcpu, GPA + 2 * TPAGE as u64);
    assert_eq!(run_guest(&mut vcpu), End::Loaded(0xa5));
}

fn run_with_fault(reason: u32, flags: u64, gpa: u64, size: u64) -> kvm_run {
    let mut run = kvm_run {
        exit_reason: reason,
        ..Default::default()
    };
    run.__bindgen_anon_1.memory_fault.flags = flags;
    run.__bindgen_anon_1.memory_fault.gpa = gpa;
    run.__bindgen_anon_1.memory_fault.size = size;
    run
}

#[test]
fn memory_fault_exits_decode() {
    let uf = run_with_fault(
        KVM_EXIT_MEMORY_FAULT,
        KVM_MEMORY_EXIT_FLAG_USERFAULT,
        0x12_3000,
        4096,
    );
    assert_eq!(
        memory_fault(&uf, libc::EFAULT),
        Some(MemoryFault {
            gpa: 0x12_3000,
            size: 4096,
            flags: 1 << 4,
            userfault: true,
            private: false,
        })
    );
    assert_eq!(
        memory_fault(&uf, libc::EHWPOISON).map(|f| f.userfault),
        Some(true)
    );
    // Not a userfault: a private (guest_memfd) conversion exit.
    let private = run_with_fault(
        KVM_EXIT_MEMORY_FAULT,
        u64::from(KVM_MEMORY_EXIT_FLAG_PRIVATE),
        0x4000,
        0x2000,
    );
    let f = memory_fault(&private, libc::EFAULT).unwrap();
    assert!(!f.userfault && f.private);
    // Both flags.
    let both = run_with_fault(KVM_EXIT_MEMORY_FAULT, (1 << 4) | (1 << 3), 0, 4096);
    let f = memory_fault(&both, libc::EFAULT).unwrap();
    assert!(f.userfault && f.private);
    // Other errnos leave exit_reason stale; other exit reasons are not memory faults.
    assert_eq!(memory_fault(&uf, libc::EINTR), None);
    assert_eq!(memory_fault(&uf, libc::EAGAIN), None);
    let mmio = run_with_fault(KVM_EXIT_MMIO, 1 << 4, 0x1000, 8);
    assert_eq!(memory_fault(&mmio, libc::EFAULT), None);
    assert_eq!(memory_fault(&kvm_run::default(), libc::EFAULT), None);
    // The same decoding from kvm-ioctls' VcpuExit::MemoryFault fields.
    assert_eq!(
        MemoryFault::from_fields(1 << 4, 0x12_3000, 4096),
        memory_fault(&uf, libc::EFAULT).unwrap()
    );
}

#[test]
fn memory_fault_pages_in_a_slot() {
    let f = MemoryFault::from_fields(1 << 4, 0x10_5000, 4096);
    assert_eq!(f.slot_pages(0x10_0000), (5, 1));
    let f = MemoryFault::from_fields(1 << 4, 0x10_5800, 0x1000);
    assert_eq!(f.slot_pages(0x10_0000), (5, 2));
    let f = MemoryFault::from_fields(1 << 4, 0x10_5000, 0);
    assert_eq!(f.slot_pages(0x10_0000), (5, 1));
}

/// The vCPU form reads this vCPU's own kvm_run (filled by hand here: no kernel here produces
/// the exit).
#[test]
fn vcpu_memory_fault_reads_the_vcpus_kvm_run() {
    let vm = new_vm();
    let mut vcpu = vm.create_vcpu(0).unwrap();
    assert_eq!(vcpu_memory_fault(&mut vcpu, libc::EFAULT), None);
    {
        let run = vcpu.get_kvm_run();
        run.exit_reason = KVM_EXIT_MEMORY_FAULT;
        run.__bindgen_anon_1.memory_fault.flags = KVM_MEMORY_EXIT_FLAG_USERFAULT;
        run.__bindgen_anon_1.memory_fault.gpa = 0x7000;
        run.__bindgen_anon_1.memory_fault.size = 4096;
    }
    let f = vcpu_memory_fault(&mut vcpu, libc::EFAULT).unwrap();
    assert_eq!((f.gpa, f.size, f.userfault), (0x7000, 4096, true));
    assert_eq!(vcpu_memory_fault(&mut vcpu, libc::EINTR), None);
}
