//! The exit model of demand paging: a vCPU that touches a missing page leaves `KVM_RUN` with
//! the GPA (an MMIO exit into a memslot hole, or KVM Userfault's `KVM_EXIT_MEMORY_FAULT`), and
//! its own thread gets the page in before re-entering, instead of sleeping on a shared
//! userfaultfd wait queue. Accesses made by KVM itself and by the VMM's device threads still go
//! through the host mapping, so the exit backends keep userfaultfd MISSING on it for those.
//!
//! Pages come in one of two ways:
//! - inline: a `Fetch` (a snapshot file, a page server) is set, and the vCPU thread calls it;
//! - queued: without one, the vCPU queues a `Fault` that `DemandPager::next_fault` hands to
//!   whoever serves faults (postcopy's fault thread), and sleeps until `install` covers it.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Fault, UserfaultError};
use crate::memory::page_index::{AtomicPages, PageIndex};
use crate::memory::RamRange;

const PAGE: u64 = 4096;

/// The machine's slot for an armed exit pager, shared with every vCPU thread.
pub type DemandExits = Arc<OnceLock<Arc<dyn ExitPager>>>;

/// How the vCPU threads resolve their exits (one per exit backend).
pub trait ExitPager: Send + Sync {
    fn name(&self) -> &'static str;
    /// Whether `gpa` is guest RAM this pager serves.
    fn covers(&self, gpa: u64) -> bool;
    /// A vCPU access at [gpa, gpa+len) exited because its page is not mapped for vCPUs yet.
    /// Returns once every page it touches is present and mapped; the caller then completes the
    /// access against memory (`complete_read` / `complete_write`). `Ok(false)`: not RAM this
    /// pager serves (a real device access or a real fault).
    fn resolve(&self, vcpu: u8, gpa: u64, len: u64) -> Result<bool, UserfaultError>;
    /// Brings in and maps the page at `gpa` for good: KVM itself touches it (page tables,
    /// descriptor tables, PV pages), so it must never be unmapped, even for a moment.
    fn keep_mapped(&self, gpa: u64) -> Result<bool, UserfaultError>;
    /// Whether the page at `gpa` is mapped for vCPUs (an exit on a mapped page is a race with
    /// a memslot update, or a bug).
    fn mapped(&self, gpa: u64) -> bool;
    /// Reads guest RAM at `gpa` from the memory file (for an MMIO read exit's data).
    fn complete_read(&self, gpa: u64, data: &mut [u8]) -> Result<(), UserfaultError>;
    /// Applies an MMIO write exit's data to guest RAM.
    fn complete_write(&self, gpa: u64, data: &[u8]) -> Result<(), UserfaultError>;
    /// Sets the inline page source: from now on vCPU threads fetch their own pages.
    fn set_fetch(&self, fetch: Arc<dyn Fetch>);
    /// Counters of the exits resolved so far.
    fn stats(&self) -> ExitStats;
    /// Pins everything mapped now: before the vCPUs run, what is present may hold pages KVM
    /// reads itself (page tables of any process), so those slots must never be replaced.
    fn pin_mapped(&self) {}
    /// Whether the VM's memslots are one per RAM range again (or never changed).
    fn layout_settled(&self) -> bool {
        true
    }
    /// With every vCPU paused and every page present: replaces this backend's memslots with
    /// one RAM slot per RAM range (as `Vm::register_ram` made them; ids from the registry).
    fn settle_layout(&self) -> Result<(), UserfaultError> {
        Ok(())
    }
    /// An instruction fetch from an unmapped page was resolved (an emulation-failure exit).
    fn note_ifetch(&self) {}
    /// An instruction's memory operands were decoded and brought in (see `ExitStats::decoded`).
    fn note_decoded(&self) {}
}

/// Where missing pages come from when the vCPU thread fetches them itself.
pub trait Fetch: Send + Sync {
    /// Makes `pages` pages at `gpa` present in guest RAM (through the pager's `install`, so
    /// nothing present is overwritten), blocking until they are.
    fn fetch(&self, gpa: u64, pages: u64) -> Result<(), UserfaultError>;
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ExitStats {
    /// Exits that had to fetch at least one page.
    pub fetched: u64,
    /// Exits on pages already present in memory that only needed mapping (pushed in the
    /// background, or installed for a VMM access).
    pub mapped_only: u64,
    /// Exits on pages already mapped (a race with a memslot update).
    pub raced: u64,
    /// Instruction fetches from a missing page (emulation-failure exits without a GPA).
    pub ifetch: u64,
    /// Instructions KVM could not emulate (SSE/AVX) whose operands were decoded and mapped.
    pub decoded: u64,
    pub memslots_now: u64,
    pub memslots_max: u64,
    pub merges: u64,
}

/// Missing-page bookkeeping shared by the exit backends: which pages are not yet in guest RAM,
/// vCPUs waiting for some, and the queue of vCPU faults for a queued handler.
pub struct Waiters {
    index: PageIndex,
    ranges: Vec<RamRange>,
    missing: AtomicPages,
    remaining: AtomicU64,
    lock: Mutex<Option<String>>,
    cv: Condvar,
    queue: Mutex<VecDeque<Fault>>,
    queued: EventFd,
    pub fetch: OnceLock<Arc<dyn Fetch>>,
    memfd: File,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Waiters {
    pub fn new(
        ranges: &[RamRange],
        memfd: &File,
        pending: &[(u64, u64)],
    ) -> Result<Waiters, UserfaultError> {
        let index = PageIndex::new(ranges);
        let missing = AtomicPages::new(index.total());
        for &(gpa, n) in pending {
            for p in 0..n {
                let page = gpa + p * PAGE;
                let i = index.index(page).ok_or(UserfaultError::NotRam {
                    gpa: page,
                    len: PAGE,
                })?;
                missing.set(i);
            }
        }
        let remaining = missing.count();
        Ok(Waiters {
            index,
            ranges: ranges.to_vec(),
            missing,
            remaining: AtomicU64::new(remaining),
            lock: Mutex::new(None),
            cv: Condvar::new(),
            queue: Mutex::new(VecDeque::new()),
            queued: EventFd::new(EFD_NONBLOCK).map_err(UserfaultError::Poll)?,
            fetch: OnceLock::new(),
            memfd: memfd.try_clone().map_err(UserfaultError::Poll)?,
        })
    }

    pub fn covers(&self, gpa: u64) -> bool {
        self.index.index(gpa & !(PAGE - 1)).is_some()
    }

    pub fn is_missing(&self, gpa: u64) -> bool {
        self.index
            .index(gpa & !(PAGE - 1))
            .is_some_and(|i| self.missing.get(i))
    }

    /// Pages still missing.
    pub fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Acquire)
    }

    /// Marks pages present (after an install) and wakes every waiting vCPU.
    pub fn mark_present(&self, gpa: u64, pages: u64) {
        let mut changed = false;
        for p in 0..pages {
            if let Some(i) = self.index.index(gpa + p * PAGE) {
                if self.missing.clear(i) {
                    self.remaining.fetch_sub(1, Ordering::AcqRel);
                    changed = true;
                }
            }
        }
        if changed {
            let _g = lock(&self.lock);
            self.cv.notify_all();
        }
    }

    /// The handler failed for good: every waiting and future vCPU gets this error.
    pub fn fail(&self, reason: &str) {
        let mut g = lock(&self.lock);
        if g.is_none() {
            *g = Some(reason.to_string());
        }
        self.cv.notify_all();
    }

    /// Gets every missing page of [gpa, gpa+pages) in: through the inline fetch when there is
    /// one, else by queueing faults for the handler and waiting for its installs.
    pub fn bring_in(&self, gpa: u64, pages: u64, write: bool) -> Result<bool, UserfaultError> {
        let runs = self.missing_runs(gpa, pages);
        if runs.is_empty() {
            return Ok(false);
        }
        if let Some(f) = self.fetch.get() {
            for (g, n) in runs {
                f.fetch(g, n)?;
            }
            return Ok(true);
        }
        let seen = Instant::now();
        {
            let mut q = lock(&self.queue);
            for &(g, n) in &runs {
                for p in 0..n {
                    q.push_back(Fault {
                        gpa: g + p * PAGE,
                        write,
                        seen,
                    });
                }
            }
        }
        let _ = self.queued.write(1);
        let mut g = lock(&self.lock);
        loop {
            if let Some(reason) = g.as_ref() {
                return Err(UserfaultError::Fetch {
                    gpa,
                    len: pages * PAGE,
                    reason: reason.clone(),
                });
            }
            if self.missing_runs(gpa, pages).is_empty() {
                return Ok(true);
            }
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Runs of missing pages inside [gpa, gpa+pages).
    pub fn missing_runs(&self, gpa: u64, pages: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in 0..pages {
            let page = gpa + p * PAGE;
            if self.is_missing(page) {
                match runs.last_mut() {
                    Some((start, n)) if *start + *n * PAGE == page => *n += 1,
                    _ => runs.push((page, 1)),
                }
            }
        }
        runs
    }

    /// The next queued vCPU fault, if any.
    pub fn pop(&self) -> Option<Fault> {
        let f = lock(&self.queue).pop_front();
        if f.is_none() {
            let _ = self.queued.read();
        }
        f
    }

    pub fn queued_fd(&self) -> RawFd {
        self.queued.as_raw_fd()
    }

    fn file_offset(&self, gpa: u64, len: u64) -> Result<u64, UserfaultError> {
        crate::memory::ram_file::file_offset(&self.ranges, gpa, len)
            .map_err(|_| UserfaultError::NotRam { gpa, len })
    }

    pub fn read(&self, gpa: u64, data: &mut [u8]) -> Result<(), UserfaultError> {
        let off = self.file_offset(gpa, data.len() as u64)?;
        self.memfd
            .read_exact_at(data, off)
            .map_err(|source| UserfaultError::RamFile {
                gpa,
                len: data.len() as u64,
                what: "reading guest RAM",
                source,
            })
    }

    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), UserfaultError> {
        let off = self.file_offset(gpa, data.len() as u64)?;
        self.memfd
            .write_all_at(data, off)
            .map_err(|source| UserfaultError::RamFile {
                gpa,
                len: data.len() as u64,
                what: "writing guest RAM",
                source,
            })
    }
}

/// What every exit backend shares: userfaultfd MISSING on the host mapping (for KVM's and the
/// VMM's own accesses), and the missing-page bookkeeping with its queue of vCPU faults.
pub struct ExitBase {
    pub uffd: super::UffdMissing,
    pub waiters: Arc<Waiters>,
}

impl ExitBase {
    /// The next fault: a queued vCPU fault first, else a userfaultfd event.
    pub fn next_fault(&self, timeout: Duration) -> Result<Option<Fault>, UserfaultError> {
        if let Some(f) = self.waiters.pop() {
            return Ok(Some(f));
        }
        let (uffd, queued) = poll_two(self.uffd.raw_fd(), self.waiters.queued_fd(), timeout)?;
        if queued {
            if let Some(f) = self.waiters.pop() {
                return Ok(Some(f));
            }
        }
        if uffd {
            return self.uffd.read_fault();
        }
        Ok(None)
    }

    /// Installs through userfaultfd (waking the VMM's and KVM's waiters) and marks the pages
    /// present (waking the vCPUs').
    pub fn install(&self, gpa: u64, data: &[u8]) -> Result<super::Installed, UserfaultError> {
        let r = super::DemandPager::install(&self.uffd, gpa, data)?;
        self.waiters.mark_present(gpa, data.len() as u64 / PAGE);
        Ok(r)
    }

    pub fn install_zero(&self, gpa: u64, pages: u64) -> Result<super::Installed, UserfaultError> {
        let r = super::DemandPager::install_zero(&self.uffd, gpa, pages)?;
        self.waiters.mark_present(gpa, pages);
        Ok(r)
    }
}

/// Waits up to `timeout` for either descriptor to become readable; returns which were.
pub fn poll_two(a: RawFd, b: RawFd, timeout: Duration) -> Result<(bool, bool), UserfaultError> {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: two valid pollfds, count 2.
    let rc = unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            2,
            timeout.as_millis().min(i32::MAX as u128) as i32,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok((false, false));
        }
        return Err(UserfaultError::Poll(e));
    }
    Ok((fds[0].revents != 0, fds[1].revents != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    struct Fill(Arc<Waiters>);
    impl Fetch for Fill {
        fn fetch(&self, gpa: u64, pages: u64) -> Result<(), UserfaultError> {
            self.0.write(gpa, &vec![0xab; (pages * PAGE) as usize])?;
            self.0.mark_present(gpa, pages);
            Ok(())
        }
    }

    #[test]
    fn queued_faults_wait_for_installs_and_inline_fetches_run_in_the_caller() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let w = Arc::new(Waiters::new(ram.ranges(), ram.file(), &[(0x10000, 4)]).unwrap());
        assert_eq!(w.remaining(), 4);
        assert_eq!(w.missing_runs(0xf000, 6), vec![(0x10000, 4)]);
        assert!(!w.bring_in(0x20000, 1, false).unwrap());
        let t = {
            let w = w.clone();
            std::thread::spawn(move || w.bring_in(0x11000, 2, true))
        };
        let mut got = Vec::new();
        while got.len() < 2 {
            match w.pop() {
                Some(f) => got.push(f.gpa),
                None => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        assert_eq!(got, vec![0x11000, 0x12000]);
        w.mark_present(0x11000, 2);
        assert!(t.join().unwrap().unwrap());
        assert_eq!(w.remaining(), 2);
        let _ = w.fetch.set(Arc::new(Fill(w.clone())));
        assert!(w.bring_in(0x10000, 4, false).unwrap());
        let mut b = [0u8; 2];
        w.read(0x13ffe, &mut b).unwrap();
        assert_eq!(b, [0xab, 0xab]);
        assert_eq!(w.remaining(), 0);
        // A failed handler ends every wait with its reason.
        let w2 = Waiters::new(ram.ranges(), ram.file(), &[(0x30000, 1)]).unwrap();
        w2.fail("page server gone");
        let e = w2.bring_in(0x30000, 1, false).unwrap_err().to_string();
        assert!(e.contains("page server gone"), "{e}");
        assert!(w2.read(0x7f_0000_0000, &mut b).is_err());
    }
}
