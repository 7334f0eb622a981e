//! userfaultfd on one memory kind: MISSING, WP, MINOR and WP_ASYNC, each registered and then
//! checked for real by a thread touching a page. Every wait has a timeout; on timeout the uffd is
//! dropped (which wakes any blocked faulter), so the probe never hangs.

use std::os::fd::AsRawFd;
use std::thread::JoinHandle;

use userfaultfd::{Event, FaultKind, RegisterMode, Uffd};
use vmm::sys::pagemap::{Pagemap, PM_UFFD_WP};
use vmm::sys::uffd::{uffd_with_features, FEATURE_WP_ASYNC, FEATURE_WP_UNPOPULATED};

use crate::kinds::{Region, SMALL};
use crate::report::Outcome;

/// How long a fault check waits for its event. Generous: in the lab guest (emulated ring 0 on a
/// PVM host) a MISSING fault on a fresh huge page took over 2 s under load, which a shorter wait
/// reported as a silent miss. Only a real miss ever waits this long.
const EVENT_TIMEOUT_MS: i32 = 10_000;
/// The unit the real checks touch; at an offset so the fault address is not just the page base.
const TARGET_UNIT: usize = 1;
const TARGET_OFF: usize = 0x123;

/// An outcome and the evidence behind it.
pub type Finding = (Outcome, String);

/// An error from a uffd call as a finding: an errno outcome when the kernel gave one.
pub(crate) fn refused(op: &str, e: &userfaultfd::Error) -> Finding {
    match vmm::userfault::errno_of(e) {
        Some(code) => (Outcome::errno(code), format!("{op}: {e} (errno {code})")),
        None => (
            Outcome::Unavailable {
                why: format!("{op}: {e}"),
            },
            format!("{op}: {e}"),
        ),
    }
}

/// A uffd with `features`, or the finding that says why there is none.
pub fn open(features: u64) -> Result<Uffd, Finding> {
    uffd_with_features(features).map_err(|e| match e.errno() {
        Some(code) => (
            Outcome::errno(code),
            format!("userfaultfd with features {features:#x}: {e}"),
        ),
        None => (Outcome::Unavailable { why: e.to_string() }, e.to_string()),
    })
}

pub fn register(uffd: &Uffd, r: &Region, mode: RegisterMode) -> Result<(), Finding> {
    uffd.register_with_mode(r.addr().cast(), r.len, mode)
        .map(|_| ())
        .map_err(|e| refused(&format!("UFFDIO_REGISTER {mode:?}"), &e))
}

enum Touch {
    Read,
    Write(u8),
}

/// Touches `addr` from a new thread, which may block in a userfault; returns the byte there.
fn touch_in_thread(addr: *mut u8, touch: Touch) -> JoinHandle<u8> {
    let a = addr as usize;
    std::thread::spawn(move || {
        let p = a as *mut u8;
        // SAFETY: `p` lies in a Region that the spawning function keeps mapped until it has
        // joined this thread.
        unsafe {
            if let Touch::Write(v) = touch {
                std::ptr::write_volatile(p, v);
            }
            std::ptr::read_volatile(p)
        }
    })
}

/// Waits up to the timeout for one event. Ok(None): nothing arrived.
fn wait_event(uffd: &Uffd) -> Result<Option<Event>, String> {
    let mut pfd = libc::pollfd {
        fd: uffd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll reads and writes exactly the one pollfd passed.
    let n = unsafe { libc::poll(&mut pfd, 1, EVENT_TIMEOUT_MS) };
    if n < 0 {
        return Err(format!("poll: {}", std::io::Error::last_os_error()));
    }
    if n == 0 {
        return Ok(None);
    }
    uffd.read_event()
        .map_err(|e| format!("read uffd event: {e}"))
}

/// Runs the fault check: `touch` on the target from a thread, expect a `want` fault there,
/// `resolve` it. On anything else the uffd is dropped first, which releases the thread.
fn fault_check(
    uffd: Uffd,
    r: &Region,
    touch: Touch,
    want: FaultKind,
    resolve: impl FnOnce(&Uffd, *mut u8) -> Result<(), String>,
) -> (bool, String) {
    let target = r.unit_addr(TARGET_UNIT).wrapping_add(TARGET_OFF);
    let base = r.unit_addr(TARGET_UNIT);
    let thread = touch_in_thread(target, touch);
    let (ok, mut evidence) = match wait_event(&uffd) {
        Ok(Some(Event::Pagefault { kind, addr, .. })) => {
            let page = addr as usize / SMALL * SMALL;
            let want_page = target as usize / SMALL * SMALL;
            if kind == want && page == want_page {
                match resolve(&uffd, base) {
                    Ok(()) => (
                        true,
                        format!("{kind:?} fault at {addr:?} (touched {target:?}); resolved"),
                    ),
                    Err(e) => (false, format!("{kind:?} fault at {addr:?}; resolving: {e}")),
                }
            } else {
                (
                    false,
                    format!("expected {want:?} at {target:?}, got {kind:?} at {addr:?}"),
                )
            }
        }
        Ok(Some(other)) => (false, format!("unexpected event {other:?}")),
        Ok(None) => (
            false,
            format!("no event within {EVENT_TIMEOUT_MS} ms of touching {target:?}"),
        ),
        Err(e) => (false, e),
    };
    // Dropping the uffd wakes the thread if it is still blocked; it then faults normally.
    drop(uffd);
    match thread.join() {
        Ok(v) => evidence.push_str(&format!("; thread read {v:#04x}")),
        Err(_) => return (false, format!("{evidence}; touching thread panicked")),
    }
    (ok, evidence)
}

fn not_cpu_accessible() -> Finding {
    (
        Outcome::NotApplicable,
        "registered, but the CPU may not touch this memory (guest-private): no fault to check"
            .into(),
    )
}

pub fn missing(r: &Region) -> Finding {
    let uffd = match open(0) {
        Ok(u) => u,
        Err(f) => return f,
    };
    if let Err(f) = register(&uffd, r, RegisterMode::MISSING) {
        return f;
    }
    if !r.cpu_access {
        return not_cpu_accessible();
    }
    let unit = r.kind.unit();
    let fill = vec![0x77u8; unit];
    let (ok, ev) = fault_check(uffd, r, Touch::Read, FaultKind::Missing, |u, base| {
        // SAFETY: `fill` is `unit` readable bytes; `base` is a unit-aligned, registered and
        // still missing page of the region; UFFDIO_COPY only fills that page.
        unsafe { u.copy(fill.as_ptr().cast(), base.cast(), unit, true) }
            .map(|_| ())
            .map_err(|e| format!("UFFDIO_COPY: {e}"))
    });
    verdict(ok, 0x77, ev, "UFFDIO_COPY filled 0x77")
}

pub fn wp(r: &Region) -> Finding {
    let uffd = match open(0) {
        Ok(u) => u,
        Err(f) => return f,
    };
    if r.cpu_access {
        r.populate();
    }
    if let Err(f) = register(&uffd, r, RegisterMode::WRITE_PROTECT) {
        return f;
    }
    if !r.cpu_access {
        return not_cpu_accessible();
    }
    if let Err(e) = uffd.write_protect(r.addr().cast(), r.len) {
        let (o, ev) = refused("UFFDIO_WRITEPROTECT", &e);
        return (o, format!("registered; {ev}"));
    }
    let unit = r.kind.unit();
    let (ok, ev) = fault_check(
        uffd,
        r,
        Touch::Write(0x99),
        FaultKind::WriteProtected,
        |u, base| {
            u.remove_write_protection(base.cast(), unit, true)
                .map_err(|e| format!("un-protect: {e}"))
        },
    );
    verdict(ok, 0x99, ev, "write 0x99 completed after un-protect")
}

pub fn minor(r: &Region) -> Finding {
    let uffd = match open(0) {
        Ok(u) => u,
        Err(f) => return f,
    };
    // Fill the page cache through a second view, leaving the primary view unmapped.
    let alias = if r.kind.page_cache_backed() && r.cpu_access {
        match r.alias() {
            Ok(a) => {
                let off = TARGET_UNIT * r.kind.unit() + TARGET_OFF;
                // SAFETY: `off` lies inside the alias mapping, which lives until the end of
                // this function.
                unsafe { std::ptr::write_volatile(a.ptr.add(off), 0x42) };
                Some(a)
            }
            Err(e) => {
                return (
                    Outcome::Unavailable {
                        why: format!("second view: {e}"),
                    },
                    String::new(),
                )
            }
        }
    } else {
        None
    };
    if let Err(f) = register(&uffd, r, RegisterMode::MINOR) {
        return f;
    }
    if alias.is_none() {
        return (
            Outcome::Works,
            "registered; no page cache here to set up a minor fault, so only registration was checked"
                .into(),
        );
    }
    let unit = r.kind.unit();
    let (ok, ev) = fault_check(uffd, r, Touch::Read, FaultKind::Minor, |u, base| {
        u.r#continue(base.cast(), unit, true)
            .map(|_| ())
            .map_err(|e| format!("UFFDIO_CONTINUE: {e}"))
    });
    drop(alias);
    verdict(
        ok,
        0x42,
        ev,
        "page cache held 0x42 via a second view; UFFDIO_CONTINUE mapped it",
    )
}

/// WP with the WP_ASYNC feature: a write to a protected page completes without a message and
/// the kernel clears the page's uffd-wp bit (what PAGEMAP_SCAN then reports).
pub fn wp_async(r: &Region) -> Finding {
    let uffd = match open(FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED) {
        Ok(u) => u,
        Err(f) => return f,
    };
    if r.cpu_access {
        r.populate();
    }
    if let Err(f) = register(&uffd, r, RegisterMode::WRITE_PROTECT) {
        return f;
    }
    if !r.cpu_access {
        return not_cpu_accessible();
    }
    if let Err(e) = uffd.write_protect(r.addr().cast(), r.len) {
        let (o, ev) = refused("UFFDIO_WRITEPROTECT", &e);
        return (o, format!("registered; {ev}"));
    }
    let target = r.unit_addr(TARGET_UNIT).wrapping_add(TARGET_OFF);
    let thread = touch_in_thread(target, Touch::Write(0x31));
    // A sync-WP kernel would block the writer and queue a message: look for one.
    let event = wait_event_short(&uffd);
    // Closing the uffd drops every protection, so the bits are read while it is open; a
    // blocked (sync) writer is released by the close first.
    let (value, bits) = if event.is_none() {
        let value = thread.join().unwrap_or(0);
        let bits = wp_bits(r);
        drop(uffd);
        (value, bits)
    } else {
        drop(uffd);
        (thread.join().unwrap_or(0), "not read".into())
    };
    let evidence = format!(
        "write to a protected page {}; read back {value:#04x}; uffd-wp bit (pagemap 57): {bits}",
        match &event {
            Some(e) => format!("queued a message ({e})"),
            None => "completed with no message".into(),
        }
    );
    if event.is_none() && value == 0x31 {
        (Outcome::Works, evidence)
    } else {
        (
            Outcome::Unavailable {
                why: "WP_ASYNC did not resolve the fault by itself".into(),
            },
            evidence,
        )
    }
}

fn wait_event_short(uffd: &Uffd) -> Option<String> {
    std::thread::sleep(std::time::Duration::from_millis(50));
    match uffd.read_event() {
        Ok(Some(e)) => Some(format!("{e:?}")),
        Ok(None) => None,
        Err(e) => Some(format!("read error {e}")),
    }
}

/// The uffd-wp bit of the written 4 KiB page and of an untouched one, as text.
fn wp_bits(r: &Region) -> String {
    let read = |addr: *mut u8| -> String {
        let mut e = Vec::new();
        match Pagemap::open_self().and_then(|p| p.read_entries(addr as u64, 1, &mut e)) {
            Ok(()) => match e.first() {
                Some(v) if v & PM_UFFD_WP != 0 => "set".into(),
                Some(_) => "clear".into(),
                None => "?".into(),
            },
            Err(err) => format!("unreadable ({err})"),
        }
    };
    let written = read(r.unit_addr(TARGET_UNIT));
    let untouched = read(r.unit_addr(0));
    format!("written page {written}, untouched page {untouched}")
}

fn verdict(ok: bool, want: u8, evidence: String, how: &str) -> Finding {
    let read_ok = evidence.ends_with(&format!("thread read {want:#04x}"));
    if ok && read_ok {
        (Outcome::Works, format!("{evidence}; {how}"))
    } else if ok {
        (
            Outcome::Unavailable {
                why: "fault seen but the page did not hold the resolved contents".into(),
            },
            evidence,
        )
    } else {
        // Registered, a real access happened, and no correct event came: the mechanism missed it.
        (Outcome::SilentMiss, evidence)
    }
}
