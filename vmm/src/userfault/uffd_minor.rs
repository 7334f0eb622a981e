//! userfaultfd MINOR on guest RAM (a shared memfd mapping): the pending pages stay in the memfd's
//! page cache, but their PTEs in the guest mapping are zapped, so the first access from a vCPU
//! (inside KVM), from KVM itself or from a VMM thread blocks and queues a MINOR event. `install`
//! writes the page's data into the memfd through the file (never through the registered
//! mapping) and UFFDIO_CONTINUE maps the page-cache page and wakes the waiters.
//!
//! Arming:
//! - every pending page is given a page-cache page with `fallocate` (content unknown: whatever
//!   the file held, zero for a hole); after that a pending page can only fault as MINOR;
//! - `MADV_DONTNEED` on the shared mapping zaps the PTEs of the pending pages and keeps the
//!   page cache (fault-around is disabled by the kernel on MINOR-registered VMAs, so a
//!   neighbour's fault never maps a pending page behind our back);
//! - the whole RAM ranges are registered MINOR only, **not** MISSING. A hole can only be a page
//!   that is not pending (pending pages were all allocated above, and nothing in vmm punches
//!   guest RAM), and a hole's right content is zeros: the kernel's ordinary shmem fault gives
//!   exactly that, so catching it would cost a round trip for nothing.
//!
//! MINOR covers the whole ranges (one VMA each, no splitting per pending run), so a page that is
//! not pending can still raise a MINOR fault when its PTE disappears for other reasons (swap-out
//! of a shmem page leaves a swap entry, which counts as "in the page cache"). `next_fault`
//! resolves such faults itself with CONTINUE (no data written) and never reports them; the same
//! holds for a fault on a page installed since it was queued.
//!
//! Two atomic bitsets, one bit per 4 KiB page of all ranges: `claimed` (some install owns or
//! owned the page) and `done` (its data is in the file and it is mapped). Pages that are not
//! pending start with both bits set. `install` claims each page with `fetch_or`; only the
//! claimer writes it, so a page is never written twice and an installed page (which the guest
//! may have written since) is never overwritten. A claimer that fails gives its claim back.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use userfaultfd::{Event, ReadWrite, RegisterMode, Uffd};

use super::{errno_of, uffd_err, DemandPager, Fault, Installed, UserfaultError};
use crate::memory::RamRange;
use crate::sys::uffd as sys_uffd;
use crate::sys::SysError;

const PAGE: u64 = 4096;
/// Zeros written by `install_zero`, this many bytes per pwrite.
const ZERO_CHUNK: usize = 64 << 10;
static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

struct Range {
    ram: RamRange,
    host: u64,
    /// Index of this range's first page in the bitsets.
    first_bit: u64,
}

/// A set of page bits that many threads update.
struct Bits(Vec<AtomicU64>);

impl Bits {
    fn new(pages: u64, set: bool) -> Bits {
        let init = if set { !0 } else { 0 };
        Bits(
            (0..pages.div_ceil(64))
                .map(|_| AtomicU64::new(init))
                .collect(),
        )
    }
    /// Sets the bit; true when it was clear (the caller now owns the page).
    fn claim(&self, bit: u64) -> bool {
        let mask = 1u64 << (bit % 64);
        self.0[(bit / 64) as usize].fetch_or(mask, Ordering::AcqRel) & mask == 0
    }
    fn set(&self, bit: u64) {
        self.0[(bit / 64) as usize].fetch_or(1 << (bit % 64), Ordering::Release);
    }
    fn clear(&self, bit: u64) {
        self.0[(bit / 64) as usize].fetch_and(!(1 << (bit % 64)), Ordering::Release);
    }
    fn get(&self, bit: u64) -> bool {
        self.0[(bit / 64) as usize].load(Ordering::Acquire) & (1 << (bit % 64)) != 0
    }
}

pub struct UffdMinor {
    uffd: Uffd,
    file: File,
    ranges: Vec<Range>,
    claimed: Bits,
    done: Bits,
    armed: AtomicBool,
    /// Faults `next_fault` resolved itself (stale, or on pages not pending).
    spurious: AtomicU64,
}

fn invalid(msg: String) -> UserfaultError {
    UserfaultError::Sys(SysError::Invalid(msg))
}

/// The range table (with each range's first bit) and the total page count.
fn layout(ranges: &[RamRange], host_addrs: &[u64]) -> Result<(Vec<Range>, u64), UserfaultError> {
    if ranges.len() != host_addrs.len() {
        return Err(invalid(format!(
            "{} RAM ranges but {} host addresses",
            ranges.len(),
            host_addrs.len()
        )));
    }
    let mut first_bit = 0;
    let mut table = Vec::with_capacity(ranges.len());
    for (r, host) in ranges.iter().zip(host_addrs) {
        if r.gpa % PAGE != 0 || r.size % PAGE != 0 || host % PAGE != 0 {
            return Err(invalid(format!("RAM range {r:?} is not page aligned")));
        }
        table.push(Range {
            ram: *r,
            host: *host,
            first_bit,
        });
        first_bit += r.size / PAGE;
    }
    Ok((table, first_bit))
}

impl UffdMinor {
    /// Makes the `pending` pages ((gpa, pages) runs) fault as MINOR until installed. Every
    /// other page of `ranges` stays as it is. `memfd` is the file behind the mappings at
    /// `host_addrs` (one per range, in order); the pager keeps its own handle on it.
    pub fn arm(
        ranges: &[RamRange],
        host_addrs: &[u64],
        memfd: &File,
        pending: &[(u64, u64)],
    ) -> Result<UffdMinor, UserfaultError> {
        let (table, first_bit) = layout(ranges, host_addrs)?;
        let file = memfd
            .try_clone()
            .map_err(|e| UserfaultError::Sys(SysError::os("dup of the guest memory file", e)))?;
        let uffd = sys_uffd::uffd_with_features(sys_uffd::FEATURE_MINOR_SHMEM)?;
        let pager = UffdMinor {
            uffd,
            file,
            ranges: table,
            // Everything starts installed; arming clears the pending pages.
            claimed: Bits::new(first_bit, true),
            done: Bits::new(first_bit, true),
            armed: AtomicBool::new(true),
            spurious: AtomicU64::new(0),
        };
        // Check every run before changing anything.
        let mut runs = Vec::with_capacity(pending.len());
        for &(gpa, pages) in pending {
            if gpa % PAGE != 0 {
                return Err(invalid(format!(
                    "pending GPA 0x{gpa:x} is not page aligned"
                )));
            }
            let len = pages
                .checked_mul(PAGE)
                .ok_or(UserfaultError::NotRam { gpa, len: u64::MAX })?;
            if len == 0 {
                continue;
            }
            let (range, off) = pager.locate(gpa, len)?;
            runs.push((len, range, off));
        }
        // 1. Page-cache pages behind every pending page.
        for &(len, range, off) in &runs {
            let file_off = pager.ranges[range].ram.file_offset + off;
            // SAFETY: fallocate on our own descriptor, integer arguments only.
            let rc = unsafe {
                libc::fallocate(
                    pager.file.as_raw_fd(),
                    libc::FALLOC_FL_KEEP_SIZE,
                    file_off as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc != 0 {
                return Err(SysError::last_os("fallocate of pending guest pages").into());
            }
        }
        // 2. MINOR on the whole ranges, before the zap, so no access in between re-maps.
        for r in &pager.ranges {
            pager
                .uffd
                .register_with_mode(
                    r.host as *mut libc::c_void,
                    r.ram.size as usize,
                    RegisterMode::MINOR,
                )
                .map_err(|e| uffd_err("UFFDIO_REGISTER (MINOR) on guest RAM", e))?;
        }
        // 3. Mark pending, then zap their PTEs (the page cache stays).
        for &(len, range, off) in &runs {
            let first = pager.ranges[range].first_bit + off / PAGE;
            for bit in first..first + len / PAGE {
                pager.done.clear(bit);
                pager.claimed.clear(bit);
            }
            let addr = pager.ranges[range].host + off;
            // SAFETY: the range lies inside a live shared mapping of guest RAM; DONTNEED on a
            // shared file mapping only drops PTEs, the data stays in the memfd.
            let rc = unsafe {
                libc::madvise(addr as *mut libc::c_void, len as usize, libc::MADV_DONTNEED)
            };
            if rc != 0 {
                let e = SysError::last_os("madvise(MADV_DONTNEED) on pending guest pages");
                let _ = pager.disarm();
                return Err(e.into());
            }
        }
        Ok(pager)
    }

    /// A pager over a userfaultfd that another process armed with `arm` (received over a
    /// Unix socket: the out-of-process page server). Nothing is registered, allocated or
    /// zapped here: `uffd` must already have the ranges registered MINOR at `host_addrs` (in
    /// the other process) and the `pending` pages zapped; `memfd` is the guest-RAM file behind
    /// them. Installs write through `memfd` and CONTINUE through `uffd`, which works across
    /// processes.
    pub fn from_fd(
        uffd: std::os::fd::OwnedFd,
        ranges: &[RamRange],
        host_addrs: &[u64],
        memfd: File,
        pending: &[(u64, u64)],
    ) -> Result<UffdMinor, UserfaultError> {
        use std::os::fd::{FromRawFd, IntoRawFd};
        let (table, first_bit) = layout(ranges, host_addrs)?;
        let pager = UffdMinor {
            // SAFETY: `uffd` is an owned descriptor whose ownership moves into the `Uffd`.
            uffd: unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) },
            file: memfd,
            ranges: table,
            claimed: Bits::new(first_bit, true),
            done: Bits::new(first_bit, true),
            armed: AtomicBool::new(true),
            spurious: AtomicU64::new(0),
        };
        for &(gpa, pages) in pending {
            if gpa % PAGE != 0 {
                return Err(invalid(format!(
                    "pending GPA 0x{gpa:x} is not page aligned"
                )));
            }
            let len = pages
                .checked_mul(PAGE)
                .ok_or(UserfaultError::NotRam { gpa, len: u64::MAX })?;
            if len == 0 {
                continue;
            }
            let (ri, off) = pager.locate(gpa, len)?;
            let first = pager.ranges[ri].first_bit + off / PAGE;
            for bit in first..first + len / PAGE {
                pager.done.clear(bit);
                pager.claimed.clear(bit);
            }
        }
        Ok(pager)
    }

    /// (range index, offset in it) of `gpa..gpa+len`, which must lie inside one range.
    fn locate(&self, gpa: u64, len: u64) -> Result<(usize, u64), UserfaultError> {
        self.ranges
            .iter()
            .position(|r| {
                gpa >= r.ram.gpa && len <= r.ram.size && gpa - r.ram.gpa <= r.ram.size - len
            })
            .map(|i| (i, gpa - self.ranges[i].ram.gpa))
            .ok_or(UserfaultError::NotRam { gpa, len })
    }

    fn locate_host(&self, addr: u64) -> Option<(usize, u64)> {
        self.ranges
            .iter()
            .position(|r| addr >= r.host && addr < r.host + r.ram.size)
            .map(|i| (i, addr - self.ranges[i].host))
    }

    /// The userfaultfd (to hand to an out-of-process page server).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.uffd.as_raw_fd()
    }

    /// True once `gpa`'s page is installed (or was never pending).
    pub fn is_installed(&self, gpa: u64) -> bool {
        match self.locate(gpa & !(PAGE - 1), PAGE) {
            Ok((i, off)) => self.done.get(self.ranges[i].first_bit + off / PAGE),
            Err(_) => false,
        }
    }

    /// How many pages are still pending (not yet claimed by an install).
    /// Faults `next_fault` resolved itself without reporting them: queued before the page
    /// was installed, or on a page whose PTE went away again (swap-out).
    pub fn spurious_faults(&self) -> u64 {
        self.spurious.load(Ordering::Relaxed)
    }

    pub fn pending_pages(&self) -> u64 {
        // Bits past the last page start set and are never cleared.
        self.claimed
            .0
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_zeros()))
            .sum()
    }

    /// UFFDIO_CONTINUE over `addr..addr+len` (waking waiters), page by page past pages that are
    /// mapped already. True when every page was mapped by this call.
    fn continue_range(&self, addr: u64, len: u64) -> Result<bool, UserfaultError> {
        let mut at = addr;
        let end = addr + len;
        let mut all_new = true;
        while at < end {
            match self
                .uffd
                .r#continue(at as *mut libc::c_void, (end - at) as usize, true)
            {
                // Partial (EAGAIN with progress): go on after the mapped part.
                Ok(mapped) => {
                    let mapped = mapped.min(end - at);
                    if mapped == 0 {
                        continue;
                    }
                    at += mapped - mapped % PAGE;
                    if mapped % PAGE != 0 {
                        at += PAGE;
                    }
                }
                Err(e) => match errno_of(&e) {
                    Some(libc::EAGAIN) => {}
                    // This page is mapped already: wake its waiters and skip it.
                    Some(libc::EEXIST) => {
                        all_new = false;
                        self.uffd
                            .wake(at as *mut libc::c_void, PAGE as usize)
                            .map_err(|e| uffd_err("UFFDIO_WAKE", e))?;
                        at += PAGE;
                    }
                    _ => return Err(uffd_err("UFFDIO_CONTINUE", e)),
                },
            }
        }
        Ok(all_new)
    }

    /// Claims, fills (with `fill(file_offset, page_index_in_request, pages)`) and maps the
    /// pages of `gpa..gpa+pages*4K`; waits for pages that another install owns.
    fn install_with(
        &self,
        gpa: u64,
        pages: u64,
        fill: impl Fn(u64, u64, u64) -> std::io::Result<()>,
    ) -> Result<Installed, UserfaultError> {
        if gpa % PAGE != 0 {
            return Err(invalid(format!(
                "install at GPA 0x{gpa:x}: not page aligned"
            )));
        }
        let len = pages
            .checked_mul(PAGE)
            .ok_or(UserfaultError::NotRam { gpa, len: u64::MAX })?;
        let (ri, off) = self.locate(gpa, len)?;
        if !self.armed.load(Ordering::Acquire) {
            return Err(UserfaultError::Disarmed);
        }
        let r = &self.ranges[ri];
        let first = r.first_bit + off / PAGE;
        let mut result = Installed::Now;
        let mut others = Vec::new();
        let mut i = 0;
        while i < pages {
            if !self.claimed.claim(first + i) {
                result = Installed::AlreadyPresent;
                if !self.done.get(first + i) {
                    others.push(i);
                }
                i += 1;
                continue;
            }
            // A run of pages this call owns.
            let start = i;
            i += 1;
            while i < pages && self.claimed.claim(first + i) {
                i += 1;
            }
            // `i` stopped at a page someone else holds (or the end): look at it again above.
            let n = i - start;
            if !self.fill_and_map(r, off + start * PAGE, first + start, start, n, &fill)? {
                result = Installed::AlreadyPresent;
            }
        }
        // Pages another install owns: it will map them and wake their waiters; return only once
        // they are in, taking a page over if its owner failed and gave the claim back.
        for i in others {
            let bit = first + i;
            let mut spins = 0u32;
            while !self.done.get(bit) {
                if self.claimed.claim(bit) {
                    self.fill_and_map(r, off + i * PAGE, bit, i, 1, &fill)?;
                    break;
                }
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        Ok(result)
    }

    /// Writes and maps `pages` pages this call has claimed (bits `bit..`), then marks them
    /// done. A failed write gives the claims back (nothing was mapped, so a later install may
    /// write them); once the data is in the file the pages count as installed even if CONTINUE
    /// fails, since some of them may be mapped and written by the guest already (a later fault
    /// on them is resolved by `next_fault`).
    fn fill_and_map(
        &self,
        r: &Range,
        off: u64,
        bit: u64,
        index: u64,
        pages: u64,
        fill: &impl Fn(u64, u64, u64) -> std::io::Result<()>,
    ) -> Result<bool, UserfaultError> {
        if let Err(e) = fill(r.ram.file_offset + off, index, pages) {
            for b in bit..bit + pages {
                self.claimed.clear(b);
            }
            return Err(UserfaultError::Sys(SysError::os(
                "pwrite into the guest memory file",
                e,
            )));
        }
        let mapped = self.continue_range(r.host + off, pages * PAGE);
        for b in bit..bit + pages {
            self.done.set(b);
        }
        mapped
    }
}

impl DemandPager for UffdMinor {
    fn name(&self) -> &'static str {
        super::DemandKind::UffdMinor.name()
    }

    fn next_fault(&self, timeout: Duration) -> Result<Option<Fault>, UserfaultError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, count 1.
            let rc =
                unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    return Ok(None);
                }
                return Err(UserfaultError::Poll(e));
            }
            if rc == 0 {
                return Ok(None);
            }
            let event = self
                .uffd
                .read_event()
                .map_err(|e| uffd_err("reading a userfaultfd event", e))?;
            let (addr, rw) = match event {
                None => {
                    if left.is_zero() {
                        return Ok(None);
                    }
                    continue;
                }
                Some(Event::Pagefault { addr, rw, .. }) => (addr as u64 & !(PAGE - 1), rw),
                Some(other) => return Err(UserfaultError::Event(format!("{other:?}"))),
            };
            let (ri, off) = self.locate_host(addr).ok_or_else(|| {
                UserfaultError::Event(format!(
                    "fault at host address 0x{addr:x} outside guest RAM"
                ))
            })?;
            let r = &self.ranges[ri];
            let bit = r.first_bit + off / PAGE;
            if !self.claimed.get(bit) {
                return Ok(Some(Fault {
                    gpa: r.ram.gpa + off,
                    write: matches!(rw, ReadWrite::Write),
                    seen: Instant::now(),
                }));
            }
            // Installed (or never pending) with its PTE gone again (swap-out), or queued before
            // an install that has mapped it since: map the page-cache page as it is.
            self.spurious.fetch_add(1, Ordering::Relaxed);
            if self.done.get(bit) {
                self.continue_range(addr, PAGE)?;
            }
            // Claimed but not done: its installer's CONTINUE wakes the waiter.
            if left.is_zero() {
                return Ok(None);
            }
        }
    }

    fn install(&self, gpa: u64, data: &[u8]) -> Result<Installed, UserfaultError> {
        if data.len() as u64 % PAGE != 0 {
            return Err(invalid(format!(
                "install of {} bytes: not whole pages",
                data.len()
            )));
        }
        let pages = data.len() as u64 / PAGE;
        self.install_with(gpa, pages, |file_off, index, n| {
            let from = (index * PAGE) as usize;
            let to = from + (n * PAGE) as usize;
            self.file.write_all_at(&data[from..to], file_off)
        })
    }

    fn install_zero(&self, gpa: u64, pages: u64) -> Result<Installed, UserfaultError> {
        self.install_with(gpa, pages, |file_off, _, n| {
            let mut done = 0u64;
            let len = n * PAGE;
            while done < len {
                let chunk = (len - done).min(ZERO_CHUNK as u64) as usize;
                self.file.write_all_at(&ZEROS[..chunk], file_off + done)?;
                done += chunk as u64;
            }
            Ok(())
        })
    }

    fn wake(&self, gpa: u64, pages: u64) -> Result<(), UserfaultError> {
        let len = pages.saturating_mul(PAGE);
        let (ri, off) = self.locate(gpa, len)?;
        self.uffd
            .wake(
                (self.ranges[ri].host + off) as *mut libc::c_void,
                len as usize,
            )
            .map_err(|e| uffd_err("UFFDIO_WAKE", e))
    }

    fn disarm(&self) -> Result<(), UserfaultError> {
        self.armed.store(false, Ordering::Release);
        for r in &self.ranges {
            self.uffd
                .unregister(r.host as *mut libc::c_void, r.ram.size as usize)
                .map_err(|e| uffd_err("UFFDIO_UNREGISTER", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
