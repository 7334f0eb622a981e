use super::*;
use crate::memory::GuestRam;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

fn next(pager: &UffdMinor) -> Fault {
    let start = Instant::now();
    loop {
        if let Some(f) = pager.next_fault(Duration::from_secs(1)).unwrap() {
            return f;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no fault came");
    }
}

/// Waits until an event is queued on the userfaultfd, without reading it.
fn wait_queued(pager: &UffdMinor) {
    let mut pfd = libc::pollfd {
        fd: pager.uffd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    assert_eq!(rc, 1, "no fault was queued");
}

fn page_of(byte: u8) -> Vec<u8> {
    vec![byte; PAGE as usize]
}

/// A thread reading a pending page blocks until the pager installs it and then sees the
/// installed bytes (not what the file held before); pages that are not pending never fault;
/// a second install never overwrites; zero installs, partial ranges and bad ranges behave as
/// documented; disarm stops everything.
#[test]
fn a_pending_page_blocks_until_installed() {
    let ram = GuestRam::new(8 << 20).unwrap();
    let mem = ram.memory().clone();
    // Old content in the pending pages (as a stale snapshot would leave): must not leak.
    for p in 0..=0x20u64 {
        mem.write_obj(0xdead_0000u64 + p, GuestAddress(p * PAGE + 8))
            .unwrap();
    }
    let pager = Arc::new(
        UffdMinor::arm(
            ram.ranges(),
            &ram.host_addrs(),
            ram.file(),
            &[(0x4000, 4), (0x9000, 3), (0x20000, 1)],
        )
        .unwrap(),
    );
    assert_eq!(pager.name(), "uffd-minor");
    assert_eq!(pager.pending_pages(), 8);
    assert!(pager.is_installed(0x2000));
    assert!(!pager.is_installed(0x5000));
    // Not pending: no fault, content kept; an untouched hole reads zero without an event.
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(0x2008)).unwrap(),
        0xdead_0002
    );
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x40000)).unwrap(), 0);
    assert!(pager
        .next_fault(Duration::from_millis(50))
        .unwrap()
        .is_none());

    let reader = {
        let mem = mem.clone();
        std::thread::spawn(move || mem.read_obj::<u64>(GuestAddress(0x5008)).unwrap())
    };
    let fault = next(&pager);
    assert_eq!(fault.gpa, 0x5000);
    assert!(!fault.write);
    let mut page = vec![0u8; PAGE as usize];
    page[8..16].copy_from_slice(&0xfeed_beef_u64.to_le_bytes());
    assert_eq!(pager.install(0x5000, &page).unwrap(), Installed::Now);
    assert_eq!(reader.join().unwrap(), 0xfeed_beef);
    assert!(pager.is_installed(0x5000));

    // The guest writes the installed page; a later install of it changes nothing.
    mem.write_obj(0x1111u64, GuestAddress(0x5010)).unwrap();
    assert_eq!(
        pager.install(0x5000, &page_of(0xff)).unwrap(),
        Installed::AlreadyPresent
    );
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x5010)).unwrap(), 0x1111);
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(0x5008)).unwrap(),
        0xfeed_beef
    );

    // A run with an installed page in the middle: the others land, that one is kept.
    let mut three = page_of(0x11).repeat(3);
    three[PAGE as usize..2 * PAGE as usize].fill(0x22);
    assert_eq!(
        pager.install(0x4000, &three).unwrap(),
        Installed::AlreadyPresent
    );
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4000)).unwrap(), 0x11);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x5010)).unwrap(), 0x1111);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x6000)).unwrap(), 0x11);

    // Zero pages replace the old file content.
    assert_eq!(pager.install_zero(0x9000, 3).unwrap(), Installed::Now);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0xa008)).unwrap(), 0);
    // A write fault is reported as one.
    let writer = {
        let mem = mem.clone();
        std::thread::spawn(move || mem.write_obj(7u8, GuestAddress(0x7000)).unwrap())
    };
    let fault = next(&pager);
    assert_eq!(fault.gpa, 0x7000);
    assert!(fault.write);
    pager.install(0x7000, &page_of(0x33)).unwrap();
    writer.join().unwrap();
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x7000)).unwrap(), 7);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x7001)).unwrap(), 0x33);

    // Bad requests.
    assert!(pager.install(0x7f_ffff_f000, &page).is_err());
    assert!(pager.install(0x20000, &page[..100]).is_err());
    assert!(pager.install(0x20008, &page).is_err());
    assert_eq!(pager.pending_pages(), 1);

    pager.disarm().unwrap();
    // Disarmed: the still-pending page reads the file as it is, with no event; installs
    // are refused, since they could overwrite what the guest writes from now on.
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(0x20008)).unwrap(),
        0xdead_0000 + 0x20
    );
    assert!(pager.install(0x20000, &page).is_err());
}

/// A fault woken by an install before its event was read leaves nothing to report, and a
/// fault on an installed page whose PTE was dropped again (as a swap-out does) is resolved
/// inside `next_fault` with a plain CONTINUE and never reported.
#[test]
fn stale_and_spurious_faults_are_not_reported() {
    let ram = GuestRam::new(8 << 20).unwrap();
    let mem = ram.memory().clone();
    let host = ram.host_addrs()[0];
    let pager = UffdMinor::arm(ram.ranges(), &[host], ram.file(), &[(0x3000, 2)]).unwrap();
    let reader = {
        let mem = mem.clone();
        std::thread::spawn(move || mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap())
    };
    // Install without reading the event first; the reader wakes.
    wait_queued(&pager);
    assert_eq!(
        pager.install(0x3000, &page_of(0x42)).unwrap(),
        Installed::Now
    );
    assert_eq!(reader.join().unwrap(), 0x42);
    // The wake dropped its unread event from the queue (the kernel removes a woken
    // waiter's message): nothing is reported.
    assert!(pager
        .next_fault(Duration::from_millis(100))
        .unwrap()
        .is_none());
    assert_eq!(pager.spurious_faults(), 0);

    // Drop the PTE of the installed page: the next access is a MINOR fault again.
    // SAFETY: one page of the live guest-RAM mapping; DONTNEED keeps the page cache.
    let rc = unsafe {
        libc::madvise(
            (host + 0x3000) as *mut libc::c_void,
            PAGE as usize,
            libc::MADV_DONTNEED,
        )
    };
    assert_eq!(rc, 0);
    let reader = {
        let mem = mem.clone();
        std::thread::spawn(move || mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap())
    };
    wait_queued(&pager);
    assert!(pager
        .next_fault(Duration::from_millis(100))
        .unwrap()
        .is_none());
    assert_eq!(reader.join().unwrap(), 0x42);
    assert_eq!(pager.spurious_faults(), 1);
    // The other pending page still faults and is reported.
    let reader = {
        let mem = mem.clone();
        std::thread::spawn(move || mem.read_obj::<u8>(GuestAddress(0x4000)).unwrap())
    };
    assert_eq!(next(&pager).gpa, 0x4000);
    pager.install_zero(0x4000, 1).unwrap();
    assert_eq!(reader.join().unwrap(), 0);
    pager.disarm().unwrap();
}

/// Many threads install the same pages with different bytes at once: every page ends up
/// wholly from one installer, exactly one install claims each page, every call returns
/// only after its pages are in, and readers blocked on them all wake.
#[test]
fn concurrent_installs_of_the_same_pages_are_safe() {
    const PAGES: u64 = 64;
    let ram = GuestRam::new(8 << 20).unwrap();
    let mem = ram.memory().clone();
    let pager = Arc::new(
        UffdMinor::arm(
            ram.ranges(),
            &ram.host_addrs(),
            ram.file(),
            &[(0x100000, PAGES)],
        )
        .unwrap(),
    );
    let readers: Vec<_> = (0..4u64)
        .map(|i| {
            let mem = mem.clone();
            std::thread::spawn(move || {
                mem.read_obj::<u8>(GuestAddress(0x100000 + i * 16 * PAGE))
                    .unwrap()
            })
        })
        .collect();
    let installers: Vec<_> = (1..=4u8)
        .map(|t| {
            let pager = pager.clone();
            let mem = mem.clone();
            std::thread::spawn(move || {
                let data = page_of(t).repeat(PAGES as usize);
                // Different chunkings so claims interleave.
                let step = u64::from(t) * 3;
                let mut now = 0;
                let mut p = 0;
                while p < PAGES {
                    let n = step.min(PAGES - p);
                    let from = (p * PAGE) as usize;
                    let to = ((p + n) * PAGE) as usize;
                    if pager.install(0x100000 + p * PAGE, &data[from..to]).unwrap()
                        == Installed::Now
                    {
                        now += n;
                    }
                    // Returned: the pages are in (this thread may read them: no fault).
                    assert!(pager.is_installed(0x100000 + p * PAGE));
                    assert_ne!(
                        mem.read_obj::<u8>(GuestAddress(0x100000 + p * PAGE))
                            .unwrap(),
                        0
                    );
                    p += n;
                }
                now
            })
        })
        .collect();
    let mut now_total = 0;
    for t in installers {
        now_total += t.join().unwrap();
    }
    for r in readers {
        assert_ne!(r.join().unwrap(), 0);
    }
    assert!(now_total <= PAGES);
    assert_eq!(pager.pending_pages(), 0);
    for p in 0..PAGES {
        let mut buf = page_of(0);
        mem.read_slice(&mut buf, GuestAddress(0x100000 + p * PAGE))
            .unwrap();
        assert!(buf.iter().all(|&b| b == buf[0] && b != 0), "page {p} mixed");
    }
    // Faults queued by the readers are stale now.
    assert!(pager
        .next_fault(Duration::from_millis(50))
        .unwrap()
        .is_none());
    pager.disarm().unwrap();
}

/// CONTINUE over a run whose middle page is mapped already: the kernel maps the first page,
/// stops at the mapped one (partial, then EEXIST); the helper skips it (waking its
/// waiters) and maps the rest.
#[test]
fn continue_skips_pages_mapped_already() {
    let ram = GuestRam::new(8 << 20).unwrap();
    let mem = ram.memory().clone();
    let host = ram.host_addrs()[0];
    let pager = UffdMinor::arm(ram.ranges(), &[host], ram.file(), &[(0x8000, 3)]).unwrap();
    assert_eq!(
        pager.install(0x9000, &page_of(0x99)).unwrap(),
        Installed::Now
    );
    ram.file().write_all_at(&page_of(0x88), 0x8000).unwrap();
    ram.file().write_all_at(&page_of(0xaa), 0xa000).unwrap();
    assert!(!pager.continue_range(host + 0x8000, 3 * PAGE).unwrap());
    assert!(pager.continue_range(host + 0x8000, PAGE).is_ok());
    // All three are mapped: no fault (this thread would hang otherwise).
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x8000)).unwrap(), 0x88);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 0x99);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0xa000)).unwrap(), 0xaa);
    pager.disarm().unwrap();
}

/// KVM's own access to a pending page (here: the wall clock it writes when the guest sets
/// MSR_KVM_WALL_CLOCK_NEW) blocks in the kernel until the page is installed, and then lands
/// on top of the installed contents.
#[test]
fn kvm_access_to_a_pending_page_waits_for_install() {
    use kvm_bindings::{kvm_msr_entry, kvm_userspace_memory_region, Msrs};
    let ram = GuestRam::new(8 << 20).unwrap();
    let mem = ram.memory().clone();
    let pager =
        UffdMinor::arm(ram.ranges(), &ram.host_addrs(), ram.file(), &[(0x6000, 1)]).unwrap();
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let r = ram.ranges()[0];
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: r.gpa,
        memory_size: r.size,
        userspace_addr: ram.host_addrs()[0],
    };
    // SAFETY: `ram` outlives the VM (declared first, dropped last).
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    let setter = std::thread::spawn(move || {
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: 0x4b56_4d00,
            data: 0x6000,
            ..Default::default()
        }])
        .unwrap();
        vcpu.set_msrs(&msrs).unwrap()
    });
    let fault = next(&pager);
    assert_eq!(fault.gpa, 0x6000);
    assert!(!setter.is_finished());
    pager.install(0x6000, &page_of(0x5a)).unwrap();
    assert_eq!(setter.join().unwrap(), 1);
    let mut buf = page_of(0);
    mem.read_slice(&mut buf, GuestAddress(0x6000)).unwrap();
    // struct pvclock_wall_clock { u32 version, sec, nsec }: written; the rest installed.
    assert_ne!(&buf[..12], &[0x5a; 12]);
    assert!(buf[12..].iter().all(|&b| b == 0x5a));
    pager.disarm().unwrap();
}

#[test]
fn bad_arguments_are_refused_before_arming() {
    let ram = GuestRam::new(8 << 20).unwrap();
    let hosts = ram.host_addrs();
    assert!(UffdMinor::arm(ram.ranges(), &[], ram.file(), &[]).is_err());
    assert!(matches!(
        UffdMinor::arm(ram.ranges(), &hosts, ram.file(), &[(0x7fff_0000, 1)]),
        Err(UserfaultError::NotRam { .. })
    ));
    assert!(UffdMinor::arm(ram.ranges(), &hosts, ram.file(), &[(0x1001, 1)]).is_err());
    // Nothing was registered: a second pager can still take the range.
    let p = UffdMinor::arm(ram.ranges(), &hosts, ram.file(), &[]).unwrap();
    assert_eq!(p.pending_pages(), 0);
    p.disarm().unwrap();
}
