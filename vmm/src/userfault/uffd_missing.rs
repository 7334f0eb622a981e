//! userfaultfd MISSING on guest RAM (a shared memfd mapping): any access to a page that is not
//! in the page cache (a hole) blocks the accessing thread — a vCPU inside KVM, KVM itself
//! (kvmclock updates), or a VMM device thread — and queues an event; UFFDIO_COPY or
//! UFFDIO_ZEROPAGE installs the page and wakes it. The handler must never touch guest RAM
//! through the registered mapping itself.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use userfaultfd::{Event, ReadWrite, Uffd};

use super::{uffd_err, DemandPager, Fault, Installed, UserfaultError};
use crate::memory::RamRange;
use crate::sys::uffd as sys_uffd;

const PAGE: u64 = 4096;

pub struct UffdMissing {
    uffd: Uffd,
    /// (RAM range, host address of its mapping).
    ranges: Vec<(RamRange, u64)>,
}

impl UffdMissing {
    /// Registers every RAM range for MISSING faults. Pages present in the memfd stay present;
    /// every hole now faults to this pager.
    pub fn arm(ranges: &[RamRange], host_addrs: &[u64]) -> Result<UffdMissing, UserfaultError> {
        let uffd = sys_uffd::uffd_with_features(0)?;
        let ranges: Vec<(RamRange, u64)> = ranges
            .iter()
            .copied()
            .zip(host_addrs.iter().copied())
            .collect();
        for (r, host) in &ranges {
            uffd.register(*host as *mut libc::c_void, r.size as usize)
                .map_err(|e| uffd_err("UFFDIO_REGISTER (MISSING) on guest RAM", e))?;
        }
        Ok(UffdMissing { uffd, ranges })
    }

    /// A pager over a userfaultfd that another process registered with `arm` (received over
    /// a Unix socket: the out-of-process page server). Nothing is registered here; UFFDIO_COPY,
    /// ZEROPAGE and WAKE act on the address space that created `uffd`, at `host_addrs` (its
    /// mappings of `ranges`).
    pub fn from_fd(
        uffd: std::os::fd::OwnedFd,
        ranges: &[RamRange],
        host_addrs: &[u64],
    ) -> Result<UffdMissing, UserfaultError> {
        use std::os::fd::{FromRawFd, IntoRawFd};
        if ranges.len() != host_addrs.len() {
            return Err(UserfaultError::Unsupported(format!(
                "{} RAM ranges but {} host addresses",
                ranges.len(),
                host_addrs.len()
            )));
        }
        // SAFETY: `uffd` is an owned descriptor whose ownership moves into the `Uffd`.
        let uffd = unsafe { Uffd::from_raw_fd(uffd.into_raw_fd()) };
        Ok(UffdMissing {
            uffd,
            ranges: ranges
                .iter()
                .copied()
                .zip(host_addrs.iter().copied())
                .collect(),
        })
    }

    fn host(&self, gpa: u64, len: u64) -> Result<*mut libc::c_void, UserfaultError> {
        self.ranges
            .iter()
            .find(|(r, _)| gpa >= r.gpa && len <= r.size && gpa - r.gpa <= r.size - len)
            .map(|(r, host)| (host + (gpa - r.gpa)) as *mut libc::c_void)
            .ok_or(UserfaultError::NotRam { gpa, len })
    }

    /// The userfaultfd, for a caller that polls it beside other descriptors.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.uffd.as_raw_fd()
    }

    /// Reads one pending event (call when the descriptor is readable): the fault, or None.
    pub fn read_fault(&self) -> Result<Option<Fault>, UserfaultError> {
        match self
            .uffd
            .read_event()
            .map_err(|e| uffd_err("reading a userfaultfd event", e))?
        {
            None => Ok(None),
            Some(Event::Pagefault { addr, rw, .. }) => {
                let addr = addr as u64 & !(PAGE - 1);
                let gpa = self.gpa_of(addr).ok_or_else(|| {
                    UserfaultError::Event(format!(
                        "fault at host address 0x{addr:x} outside guest RAM"
                    ))
                })?;
                Ok(Some(Fault {
                    gpa,
                    write: matches!(rw, ReadWrite::Write),
                    seen: Instant::now(),
                }))
            }
            Some(other) => Err(UserfaultError::Event(format!("{other:?}"))),
        }
    }

    fn gpa_of(&self, addr: u64) -> Option<u64> {
        self.ranges
            .iter()
            .find(|(r, host)| addr >= *host && addr < host + r.size)
            .map(|(r, host)| r.gpa + (addr - host))
    }
}

impl DemandPager for UffdMissing {
    fn name(&self) -> &'static str {
        super::DemandKind::UffdMissing.name()
    }

    fn next_fault(&self, timeout: Duration) -> Result<Option<Fault>, UserfaultError> {
        let fd = self.uffd.as_raw_fd();
        let (ready, _) = super::exits::poll_two(fd, fd, timeout)?;
        if !ready {
            return Ok(None);
        }
        self.read_fault()
    }

    fn install(&self, gpa: u64, data: &[u8]) -> Result<Installed, UserfaultError> {
        let dst = self.host(gpa, data.len() as u64)?;
        // SAFETY: `dst..dst+len` lies inside a registered guest-RAM mapping (checked by `host`)
        // and `data` is a live buffer of that length; UFFDIO_COPY only fills missing pages.
        let r = unsafe {
            self.uffd
                .copy(data.as_ptr() as *const libc::c_void, dst, data.len(), true)
        };
        let done = match r {
            Ok(_) => return Ok(Installed::Now),
            // The kernel stops at the first page that is present (EEXIST), after copying the
            // ones before it (reported as a partial copy, EAGAIN).
            Err(userfaultfd::Error::PartiallyCopied(n)) => n,
            Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => 0,
            Err(e) => return Err(uffd_err("UFFDIO_COPY", e)),
        };
        let page = PAGE as usize;
        // The count comes from the kernel, negative errnos included (cast): one past the
        // buffer says nothing was copied, so every page is tried again below.
        let done = if done > data.len() { 0 } else { done };
        let start = done - done % page;
        for (i, chunk) in data[start..].chunks(page).enumerate() {
            let at = gpa + (start + i * page) as u64;
            let dst = self.host(at, PAGE)?;
            // SAFETY: as above, for one page of the same checked range.
            let r = unsafe {
                self.uffd.copy(
                    chunk.as_ptr() as *const libc::c_void,
                    dst,
                    chunk.len(),
                    true,
                )
            };
            match r {
                Ok(_) => {}
                Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {}
                Err(e) => return Err(uffd_err("UFFDIO_COPY", e)),
            }
        }
        Ok(Installed::AlreadyPresent)
    }

    fn install_zero(&self, gpa: u64, pages: u64) -> Result<Installed, UserfaultError> {
        let len = pages
            .checked_mul(PAGE)
            .ok_or(UserfaultError::NotRam { gpa, len: u64::MAX })?;
        let dst = self.host(gpa, len)?;
        // SAFETY: the range lies inside a registered guest-RAM mapping (checked by `host`).
        let r = unsafe { self.uffd.zeropage(dst, len as usize, true) };
        match r {
            Ok(_) => return Ok(Installed::Now),
            Err(userfaultfd::Error::ZeropageFailed(errno))
                if errno as i32 == libc::EEXIST || errno as i32 == libc::EAGAIN => {}
            Err(e) => return Err(uffd_err("UFFDIO_ZEROPAGE", e)),
        }
        // Some page of the range is present: do the rest page by page.
        for i in 0..pages {
            let dst = self.host(gpa + i * PAGE, PAGE)?;
            // SAFETY: one page inside the checked range.
            match unsafe { self.uffd.zeropage(dst, PAGE as usize, true) } {
                Ok(_) => {}
                Err(userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::EEXIST => {}
                Err(e) => return Err(uffd_err("UFFDIO_ZEROPAGE", e)),
            }
        }
        Ok(Installed::AlreadyPresent)
    }

    fn wake(&self, gpa: u64, pages: u64) -> Result<(), UserfaultError> {
        let len = pages.saturating_mul(PAGE);
        let dst = self.host(gpa, len)?;
        self.uffd
            .wake(dst, len as usize)
            .map_err(|e| uffd_err("UFFDIO_WAKE", e))
    }

    fn disarm(&self) -> Result<(), UserfaultError> {
        for (r, host) in &self.ranges {
            self.uffd
                .unregister(*host as *mut libc::c_void, r.size as usize)
                .map_err(|e| uffd_err("UFFDIO_UNREGISTER", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    /// A thread reading a missing page blocks until the pager installs it, and then sees the
    /// installed bytes; zero pages and present pages behave as documented.
    #[test]
    fn a_missing_page_blocks_until_installed() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let mem = ram.memory().clone();
        mem.write_obj(0x1234_5678u32, GuestAddress(0x2000)).unwrap();
        let pager = Arc::new(UffdMissing::arm(ram.ranges(), &ram.host_addrs()).unwrap());
        // Present before arming: no fault.
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(),
            0x1234_5678
        );
        let reader = {
            let mem = mem.clone();
            std::thread::spawn(move || mem.read_obj::<u64>(GuestAddress(0x5008)).unwrap())
        };
        let fault = loop {
            if let Some(f) = pager.next_fault(Duration::from_secs(5)).unwrap() {
                break f;
            }
        };
        assert_eq!(fault.gpa, 0x5000);
        assert!(!fault.write);
        let mut page = vec![0u8; 4096];
        page[8..16].copy_from_slice(&0xfeed_beef_u64.to_le_bytes());
        assert_eq!(pager.install(0x5000, &page).unwrap(), Installed::Now);
        assert_eq!(reader.join().unwrap(), 0xfeed_beef);
        // A second install of the same page changes nothing.
        assert_eq!(
            pager.install(0x5000, &[0xffu8; 4096]).unwrap(),
            Installed::AlreadyPresent
        );
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x5008)).unwrap(),
            0xfeed_beef
        );
        assert_eq!(pager.install_zero(0x9000, 2).unwrap(), Installed::Now);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0xa000)).unwrap(), 0);
        // A range with a present page in the middle: the rest still lands, nothing is
        // overwritten.
        let mut three = vec![0x11u8; 3 * 4096];
        three[4096..8192].fill(0x22);
        assert_eq!(
            pager.install(0x4000, &three).unwrap(),
            Installed::AlreadyPresent
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x4000)).unwrap(), 0x11);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x5008)).unwrap(),
            0xfeed_beef
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x6000)).unwrap(), 0x11);
        assert!(pager.install(0x7f_ffff_f000, &page).is_err());
        pager.disarm().unwrap();
        // Disarmed: an untouched hole reads as zeros without any event.
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x20000)).unwrap(), 0);
    }
}
