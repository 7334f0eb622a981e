//! userfaultfd on the real kernel. Machines of this kind run different builds of the host kernel
//! (PLATFORM.md §10), so no test assumes a feature: the mask the handshake reports must agree
//! with what the handshake accepts, and a test that needs a feature exercises it where the
//! kernel offers it and otherwise checks that asking for it is refused with EINVAL.

use super::*;
use crate::sys::testutil::{Mapping, PAGE};
use std::os::fd::AsRawFd;
use userfaultfd::{Event, FaultKind, ReadWrite, RegisterMode};

/// Waits up to 5 s for the fd to become readable.
fn poll_readable(fd: &impl AsRawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
    n == 1 && pfd.revents & libc::POLLIN != 0
}

#[test]
fn ioctl_numbers_match_uapi() {
    assert_eq!(nr::USERFAULTFD_IOC_NEW(), 0xaa00);
    assert_eq!(nr::UFFDIO_API(), 0xc018_aa3f);
}

#[test]
fn feature_names_cover_every_bit() {
    assert_eq!(
        feature_names(FEATURE_WP_ASYNC | FEATURE_PAGEFAULT_FLAG_WP),
        ["PAGEFAULT_FLAG_WP", "WP_ASYNC"]
    );
    assert_eq!(feature_names(0x1ffff).len(), 17);
    assert_eq!(feature_names(1 << 17), ["UNKNOWN"]);
    assert!(feature_names(0).is_empty());
}

/// The features this kernel offers, or None (after checking that asking for `needed` anyway is
/// refused with EINVAL) where it lacks one of them.
fn offered(needed: u64, what: &str) -> Option<u64> {
    let mask = available_features().unwrap();
    if mask & needed == needed {
        return Some(mask);
    }
    let e = uffd_with_features(needed).expect_err("features the kernel does not offer");
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    eprintln!(
        "SKIPPED {what}: the kernel offers {:?}, not {:?}",
        feature_names(mask),
        feature_names(needed & !mask)
    );
    None
}

/// Every known feature the kernel reports can be enabled on its own, and every one it does not
/// report is refused with EINVAL: the mask agrees with the handshake, whichever features this
/// kernel has.
#[test]
fn available_features_agree_with_the_handshake() {
    let mask = available_features().unwrap();
    eprintln!("uffd features {mask:#x}: {:?}", feature_names(mask));
    for bit in (0..17).map(|b| 1u64 << b) {
        let name = feature_names(bit);
        match uffd_with_features(bit) {
            Ok(_) => assert_ne!(mask & bit, 0, "{name:?} enabled but not reported"),
            // The one feature gated on a capability (CAP_SYS_PTRACE), not on the kernel.
            Err(e) if bit == FEATURE_EVENT_FORK && e.errno() == Some(libc::EPERM) => {}
            Err(e) => {
                assert_eq!(mask & bit, 0, "{name:?} reported but refused: {e}");
                assert_eq!(e.errno(), Some(libc::EINVAL), "{name:?}: {e}");
            }
        }
    }
}

#[test]
fn both_open_paths_give_nonblocking_cloexec_fds() {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    for fd in [open().unwrap(), open_syscall(flags).unwrap()] {
        // SAFETY: F_GETFL/F_GETFD on an fd we own.
        let (fl, fdfl) = unsafe {
            (
                libc::fcntl(fd.as_raw_fd(), libc::F_GETFL),
                libc::fcntl(fd.as_raw_fd(), libc::F_GETFD),
            )
        };
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        assert_ne!(fdfl & libc::FD_CLOEXEC, 0);
        // A working userfaultfd either way: the handshake reports the same features.
        assert_eq!(api(&fd, 0).unwrap(), available_features().unwrap());
    }
}

#[test]
fn api_refuses_unknown_features_and_a_second_handshake() {
    let e = api(&open().unwrap(), 1 << 63).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e}");
    assert!(e.to_string().starts_with("UFFDIO_API failed"), "{e}");

    let fd = open().unwrap();
    api(&fd, 0).unwrap();
    let e = api(&fd, 0).unwrap_err();
    eprintln!("second UFFDIO_API: {e}");
    assert!(e.errno().is_some(), "{e}");
}

/// Joins the writer when dropped, after the uffd (declared later, dropped earlier) is closed,
/// which releases a writer still blocked on a fault if the test failed half-way.
struct JoinOnDrop(Option<std::thread::JoinHandle<()>>);

impl Drop for JoinOnDrop {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

#[test]
fn sync_write_protect_fault_is_reported_and_released() {
    const PAGES: usize = 16;
    // WP on shmem: PAGEFAULT_FLAG_WP, and WP_HUGETLBFS_SHMEM reports that shmem takes it.
    let needed = FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_HUGETLBFS_SHMEM;
    if offered(needed, "the sync WP fault").is_none() {
        return;
    }
    let mem = Mapping::memfd(PAGES);
    (0..PAGES).for_each(|p| mem.write(p, 1));
    let mut writer = JoinOnDrop(None);
    let uffd = uffd_with_features(FEATURE_PAGEFAULT_FLAG_WP).unwrap();
    uffd.register_with_mode(mem.ptr.cast(), mem.len, RegisterMode::WRITE_PROTECT)
        .unwrap();
    uffd.write_protect(mem.ptr.cast(), mem.len).unwrap();
    // Nothing is pending: the fd is non-blocking, so this returns at once.
    assert!(uffd.read_event().unwrap().is_none());

    let target = mem.page_addr(5) as usize + 8;
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    writer.0 = Some(std::thread::spawn(move || {
        // SAFETY: `target` is inside `mem`, which the test keeps mapped until this thread is
        // joined (JoinOnDrop is declared after `mem`).
        unsafe { std::ptr::write_volatile(target as *mut u8, 7) };
        let _ = done_tx.send(());
    }));

    assert!(poll_readable(&uffd), "no WP fault reported within 5 s");
    match uffd.read_event().unwrap() {
        Some(Event::Pagefault { kind, rw, addr, .. }) => {
            assert_eq!(kind, FaultKind::WriteProtected);
            assert_eq!(rw, ReadWrite::Write);
            // Without EXACT_ADDRESS the kernel reports the page, not the byte.
            assert_eq!(addr as u64, mem.page_addr(5));
        }
        other => panic!("expected a WP page fault, got {other:?}"),
    }
    // The writer is still blocked on the protected page.
    assert!(done_rx.try_recv().is_err());
    assert_eq!(mem.read(5), 1);

    uffd.remove_write_protection(mem.page_addr(5) as *mut _, PAGE, true)
        .unwrap();
    done_rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("writer not released by remove_write_protection(wake)");
    if let Some(h) = writer.0.take() {
        h.join().unwrap();
    }
    // SAFETY: byte 8 of page 5 is inside the mapping; the writer has been joined.
    assert_eq!(unsafe { *mem.ptr.add(5 * PAGE + 8) }, 7);
}
