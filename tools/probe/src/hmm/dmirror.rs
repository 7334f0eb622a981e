//! The kernel's emulated HMM device, test_hmm (`/dev/hmm_dmirror*`, CONFIG_TEST_HMM): its ioctl
//! interface, written by hand from Linux 6.12's `lib/test_hmm_uapi.h` (the header is not
//! installed as uapi; it lives beside the driver):
//!
//! ```c
//! struct hmm_dmirror_cmd { __u64 addr; __u64 ptr; __u64 npages; __u64 cpages; __u64 faults; };
//! #define HMM_DMIRROR_READ           _IOWR('H', 0x00, struct hmm_dmirror_cmd)
//! #define HMM_DMIRROR_WRITE          _IOWR('H', 0x01, struct hmm_dmirror_cmd)
//! #define HMM_DMIRROR_MIGRATE_TO_DEV _IOWR('H', 0x02, struct hmm_dmirror_cmd)
//! #define HMM_DMIRROR_MIGRATE_TO_SYS _IOWR('H', 0x03, struct hmm_dmirror_cmd)
//! ```
//!
//! READ/WRITE make the "device" copy `npages` pages at `addr` of the caller's address space
//! to/from the buffer at `ptr`, through the device's own page table (filled by
//! `hmm_range_fault`, as a real HMM driver would); a page the device holds as device-private
//! memory is accessed without touching the CPU page table. MIGRATE_TO_DEV moves pages into
//! device-private memory (`migrate_vma_*`), MIGRATE_TO_SYS back to system RAM.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// `struct hmm_dmirror_cmd` (lib/test_hmm_uapi.h, Linux 6.12): five `__u64`, 40 bytes.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DmirrorCmd {
    /// In: user address the device reads/writes or migrates.
    pub addr: u64,
    /// In: user buffer the device copies to/from.
    pub ptr: u64,
    /// In: number of pages.
    pub npages: u64,
    /// Out: pages copied or migrated.
    pub cpages: u64,
    /// Out: device page faults taken.
    pub faults: u64,
}

const _: () = assert!(std::mem::size_of::<DmirrorCmd>() == 40);

/// `_IOWR('H', nr, struct hmm_dmirror_cmd)`: dir read|write (3) << 30, size << 16, type << 8, nr.
const fn iowr_h(nr: u64) -> u64 {
    (3 << 30) | ((std::mem::size_of::<DmirrorCmd>() as u64) << 16) | ((b'H' as u64) << 8) | nr
}

pub const HMM_DMIRROR_READ: u64 = iowr_h(0x00);
pub const HMM_DMIRROR_WRITE: u64 = iowr_h(0x01);
pub const HMM_DMIRROR_MIGRATE_TO_DEV: u64 = iowr_h(0x02);
pub const HMM_DMIRROR_MIGRATE_TO_SYS: u64 = iowr_h(0x03);

/// One open dmirror device. Each open file is a separate "device context" mirroring the
/// calling process's address space.
pub struct Dmirror {
    file: File,
    pub path: PathBuf,
}

/// What the device did: pages copied or migrated, and device faults taken.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    pub cpages: u64,
    pub faults: u64,
}

impl Dmirror {
    pub fn open(path: &Path) -> std::io::Result<Dmirror> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Dmirror {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Runs one command; Err is the errno the driver returned.
    fn cmd(&self, req: u64, addr: *const u8, buf: *mut u8, npages: u64) -> Result<Done, i32> {
        let mut cmd = DmirrorCmd {
            addr: addr as u64,
            ptr: buf as u64,
            npages,
            ..DmirrorCmd::default()
        };
        // SAFETY: `cmd` is a live struct hmm_dmirror_cmd the driver reads and writes back.
        // The driver accesses `addr` only through this process's page tables (as a device
        // would, via hmm_range_fault/migrate_vma), and `ptr` with copy_{to,from}_user for
        // `npages` pages: callers pass a buffer of at least that size (see `read`/`write`).
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), req as _, &mut cmd) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO));
        }
        Ok(Done {
            cpages: cmd.cpages,
            faults: cmd.faults,
        })
    }

    /// The device writes `data` (whole pages) at `addr`.
    pub fn write(&self, addr: *const u8, data: &[u8]) -> Result<Done, i32> {
        let pages = (data.len() / crate::kinds::SMALL) as u64;
        // The driver only reads the buffer (copy_from_user); the cast is for the shared path.
        self.cmd(HMM_DMIRROR_WRITE, addr, data.as_ptr().cast_mut(), pages)
    }

    /// The device reads whole pages at `addr` into `out`.
    pub fn read(&self, addr: *const u8, out: &mut [u8]) -> Result<Done, i32> {
        let pages = (out.len() / crate::kinds::SMALL) as u64;
        self.cmd(HMM_DMIRROR_READ, addr, out.as_mut_ptr(), pages)
    }

    /// Migrates whole pages at `addr` into the device's device-private memory; the driver
    /// copies what it migrated into `out` (one page per page; it fails with EFAULT without it).
    pub fn migrate_to_dev(&self, addr: *const u8, out: &mut [u8]) -> Result<Done, i32> {
        let pages = (out.len() / crate::kinds::SMALL) as u64;
        self.cmd(HMM_DMIRROR_MIGRATE_TO_DEV, addr, out.as_mut_ptr(), pages)
    }

    /// Migrates `npages` pages at `addr` back to system RAM.
    pub fn migrate_to_sys(&self, addr: *const u8, npages: u64) -> Result<Done, i32> {
        self.cmd(
            HMM_DMIRROR_MIGRATE_TO_SYS,
            addr,
            std::ptr::null_mut(),
            npages,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_the_c_macros() {
        // _IOWR('H', 0x01, 40 bytes) = 0xc0284801, as gcc computes it from the header.
        assert_eq!(HMM_DMIRROR_READ, 0xc028_4800);
        assert_eq!(HMM_DMIRROR_WRITE, 0xc028_4801);
        assert_eq!(HMM_DMIRROR_MIGRATE_TO_DEV, 0xc028_4802);
        assert_eq!(HMM_DMIRROR_MIGRATE_TO_SYS, 0xc028_4803);
    }
}
