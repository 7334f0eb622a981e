//! `uffd-wp`: userfaultfd write-protect on guest RAM. Every first write to a protected page
//! (by a vCPU through KVM, or by the VMM) blocks the writer until the handler thread records the
//! page and lifts the protection: exact, but each write costs a round trip through this process
//! (~40 us here, PLATFORM.md §4).

use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use userfaultfd::{Event, FaultKind, RegisterMode, Uffd};

use super::{
    thread_cpu_ns, DirtySet, DirtyTracker, TrackContext, TrackedSlot, TrackerKind, TrackingError,
};
use crate::memory::PAGE_SIZE;
use crate::sys::uffd as sys_uffd;

const KIND: TrackerKind = TrackerKind::UffdWp;
/// How long the handler sleeps in poll before re-checking its stop flag.
const POLL_MS: i32 = 50;

pub fn check_host() -> Result<(), TrackingError> {
    let features =
        sys_uffd::available_features().map_err(TrackingError::host_sys(KIND, "userfaultfd"))?;
    if features & sys_uffd::FEATURE_WP_HUGETLBFS_SHMEM == 0 {
        return Err(TrackingError::Unsupported {
            backend: KIND,
            reason: format!(
                "userfaultfd write-protect on shmem (guest RAM is a memfd) is missing: features {features:#x} lack WP_HUGETLBFS_SHMEM"
            ),
        });
    }
    Ok(())
}

/// One bit per page of each slot, set by the handler thread.
struct Bits {
    slots: Vec<TrackedSlot>,
    words: Vec<Vec<AtomicU64>>,
    /// Held by the handler from recording a page to un-protecting it, and by a harvest from
    /// taking the bits to re-protecting those pages. Without it a harvest could take and
    /// re-protect a page between the handler's record and its un-protect, which would then
    /// leave the page writable with its bit clear: every later write lost.
    gate: Mutex<()>,
}

impl Bits {
    fn new(slots: &[TrackedSlot]) -> Bits {
        Bits {
            slots: slots.to_vec(),
            words: slots
                .iter()
                .map(|s| {
                    (0..s.pages().div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
            gate: Mutex::new(()),
        }
    }

    /// Records the page holding host address `addr`; false when it is not guest RAM.
    fn record(&self, addr: u64) -> bool {
        for (s, words) in self.slots.iter().zip(&self.words) {
            if addr >= s.host && addr < s.host + s.size {
                let page = (addr - s.host) / PAGE_SIZE;
                words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
                return true;
            }
        }
        false
    }
}

pub struct UffdWp {
    slots: Vec<TrackedSlot>,
    state: Option<Running>,
    cpu_ns: Arc<AtomicU64>,
    /// Snapshot buffer reused across harvests.
    snapshot: Vec<u64>,
}

struct Running {
    uffd: Arc<Uffd>,
    bits: Arc<Bits>,
    stop: Arc<AtomicBool>,
    handler: JoinHandle<()>,
    error: Arc<Mutex<Option<TrackingError>>>,
}

impl UffdWp {
    pub fn new(ctx: &TrackContext) -> Self {
        UffdWp {
            slots: ctx.slots.clone(),
            state: None,
            cpu_ns: Arc::new(AtomicU64::new(0)),
            snapshot: Vec::new(),
        }
    }

    /// Takes the handler's bits (an atomic swap per word), then write-protects the pages taken,
    /// with the handler held off (`Bits::gate`). In that order: a write between the swap and
    /// the protection lands before the caller reads the page (it reads after the harvest), and
    /// every later write faults and is recorded for the next round. Protecting first and
    /// clearing afterwards would lose the record of a write that faulted in between (the
    /// handler sets the bit and un-protects, then the clear erases the bit, leaving the page
    /// writable and untracked): a migration test caught exactly that on the micro guest's
    /// mailbox page.
    fn take(&mut self, mut on_page_run: impl FnMut(usize, u64, u64)) -> Result<u64, TrackingError> {
        let Some(state) = &self.state else {
            return Err(TrackingError::NotStarted(KIND));
        };
        if let Some(e) = state.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        let mut total = 0;
        let _gate = state.bits.gate.lock().unwrap_or_else(|p| p.into_inner());
        for (i, (s, words)) in state.bits.slots.iter().zip(&state.bits.words).enumerate() {
            self.snapshot.clear();
            self.snapshot
                .extend(words.iter().map(|w| w.swap(0, Ordering::AcqRel)));
            for_each_run(&self.snapshot, s.pages(), |first, count| {
                let addr = (s.host + first * PAGE_SIZE) as *mut libc::c_void;
                state
                    .uffd
                    .write_protect(addr, (count * PAGE_SIZE) as usize)
                    .map_err(TrackingError::uffd(KIND, "UFFDIO_WRITEPROTECT"))?;
                on_page_run(i, first, count);
                total += count;
                Ok(())
            })?;
        }
        Ok(total)
    }
}

/// Calls `f(first_page, count)` for each run of set bits.
pub fn for_each_run(
    words: &[u64],
    pages: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), TrackingError>,
) -> Result<(), TrackingError> {
    let bit = |p: u64| words[(p / 64) as usize] & (1 << (p % 64)) != 0;
    let mut p = 0;
    while p < pages {
        if words[(p / 64) as usize] == 0 {
            p = (p / 64 + 1) * 64;
            continue;
        }
        if !bit(p) {
            p += 1;
            continue;
        }
        let start = p;
        while p < pages && bit(p) {
            p += 1;
        }
        f(start, p - start)?;
    }
    Ok(())
}

fn handler_loop(
    uffd: &Uffd,
    bits: &Bits,
    stop: &AtomicBool,
    cpu: &AtomicU64,
) -> Result<(), TrackingError> {
    let base = thread_cpu_ns();
    let mut pfd = libc::pollfd {
        fd: uffd.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !stop.load(Ordering::Acquire) {
        // SAFETY: `pfd` is one valid pollfd and the count passed is 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(TrackingError::Io {
                backend: KIND,
                op: "the fault handler's poll on the userfaultfd",
                source: e,
            });
        }
        loop {
            let event = uffd.read_event().map_err(TrackingError::uffd(
                KIND,
                "the fault handler reading a userfaultfd event",
            ))?;
            match event {
                None => break,
                Some(Event::Pagefault {
                    kind: FaultKind::WriteProtected,
                    addr,
                    ..
                }) => {
                    let page = addr as u64 & !(PAGE_SIZE - 1);
                    let _gate = bits.gate.lock().unwrap_or_else(|p| p.into_inner());
                    if !bits.record(page) {
                        return Err(TrackingError::Other {
                            backend: KIND,
                            message: format!(
                                "the fault handler failed: write fault at {page:#x}, outside guest RAM"
                            ),
                        });
                    }
                    uffd.remove_write_protection(
                        page as *mut libc::c_void,
                        PAGE_SIZE as usize,
                        true,
                    )
                    .map_err(|source| TrackingError::Unprotect {
                        backend: KIND,
                        page,
                        source,
                    })?;
                }
                Some(other) => {
                    return Err(TrackingError::Other {
                        backend: KIND,
                        message: format!(
                            "the fault handler failed: unexpected userfaultfd event {other:?}"
                        ),
                    })
                }
            }
        }
        cpu.store(thread_cpu_ns() - base, Ordering::Relaxed);
    }
    Ok(())
}

impl DirtyTracker for UffdWp {
    fn kind(&self) -> TrackerKind {
        KIND
    }

    fn start(&mut self) -> Result<(), TrackingError> {
        check_host()?;
        let uffd = sys_uffd::uffd_with_features(sys_uffd::FEATURE_PAGEFAULT_FLAG_WP)
            .map_err(TrackingError::sys(KIND, "opening a userfaultfd"))?;
        for s in &self.slots {
            let addr = s.host as *mut libc::c_void;
            uffd.register_with_mode(addr, s.size as usize, RegisterMode::WRITE_PROTECT)
                .map_err(TrackingError::uffd(KIND, "UFFDIO_REGISTER (write-protect)"))?;
        }
        for s in &self.slots {
            uffd.write_protect(s.host as *mut libc::c_void, s.size as usize)
                .map_err(TrackingError::uffd(KIND, "UFFDIO_WRITEPROTECT"))?;
        }
        let uffd = Arc::new(uffd);
        let bits = Arc::new(Bits::new(&self.slots));
        let stop = Arc::new(AtomicBool::new(false));
        let error = Arc::new(Mutex::new(None));
        let (u, b, st, cpu, err) = (
            uffd.clone(),
            bits.clone(),
            stop.clone(),
            self.cpu_ns.clone(),
            error.clone(),
        );
        let handler = std::thread::Builder::new()
            .name("uffd-wp".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Tracking);
                if let Err(e) = handler_loop(&u, &b, &st, &cpu) {
                    tracing::error!("uffd-wp handler: {e}");
                    *err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    // Never leave a writer blocked: lift all protection and stop tracking.
                    for s in &b.slots {
                        let _ = u.remove_write_protection(
                            s.host as *mut libc::c_void,
                            s.size as usize,
                            true,
                        );
                    }
                }
            })
            .map_err(|source| TrackingError::Io {
                backend: KIND,
                op: "starting the fault handler thread",
                source,
            })?;
        self.state = Some(Running {
            uffd,
            bits,
            stop,
            handler,
            error,
        });
        Ok(())
    }

    fn harvest(&mut self, into: &mut DirtySet) -> Result<(), TrackingError> {
        self.take(|slot, first, count| into.set_pages(slot, first, count))?;
        Ok(())
    }

    fn harvest_raw(&mut self) -> Result<u64, TrackingError> {
        self.take(|_, _, _| {})
    }

    fn stop(&mut self) -> Result<(), TrackingError> {
        let Some(state) = self.state.take() else {
            return Ok(());
        };
        // Lift protection and wake any blocked writer before the handler goes away.
        let mut result = Ok(());
        for s in &self.slots {
            let addr = s.host as *mut libc::c_void;
            let r = state
                .uffd
                .remove_write_protection(addr, s.size as usize, true)
                .and_then(|()| state.uffd.unregister(addr, s.size as usize))
                .map_err(TrackingError::uffd(KIND, "lifting write-protection"));
            result = result.and(r);
        }
        state.stop.store(true, Ordering::Release);
        let _ = state.handler.join();
        result
    }

    fn memory_overhead_bytes(&self) -> u64 {
        // The handler's bits and the snapshot buffer.
        self.slots
            .iter()
            .map(|s| s.pages().div_ceil(64) * 8 * 2)
            .sum()
    }

    fn background_cpu_ns(&self) -> u64 {
        self.cpu_ns.load(Ordering::Relaxed)
    }
}

impl Drop for UffdWp {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!("{e}");
        }
    }
}
