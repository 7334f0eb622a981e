//! Memory the sys tests hand to KVM, userfaultfd and pagemap.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

pub const PAGE: usize = 4096;

/// An mmap that is unmapped on drop. Declare it before anything that points into it (a VM, a
/// thread, a uffd registration) so that it is dropped last.
pub struct Mapping {
    pub ptr: *mut u8,
    pub len: usize,
    _fd: Option<OwnedFd>,
}

// SAFETY: the mapping is plain memory owned by this value; tests only touch it through raw
// pointers whose accesses they synchronise themselves (join, uffd wake).
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only hands out the address.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Private anonymous memory, never touched.
    pub fn anon(pages: usize) -> Mapping {
        Self::map(pages, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None)
    }

    /// A MAP_SHARED view of a fresh memfd (shmem), never touched.
    pub fn memfd(pages: usize) -> Mapping {
        // SAFETY: the name is NUL-terminated; memfd_create returns a new fd or -1.
        let raw = unsafe { libc::memfd_create(c"sys-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = pages * PAGE;
        // SAFETY: ftruncate on our own memfd.
        let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) };
        assert_eq!(rc, 0, "ftruncate: {}", std::io::Error::last_os_error());
        Self::map(pages, libc::MAP_SHARED, Some(fd))
    }

    fn map(pages: usize, flags: libc::c_int, fd: Option<OwnedFd>) -> Mapping {
        let len = pages * PAGE;
        let raw_fd = fd.as_ref().map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a fresh mapping chosen by the kernel; it overlaps nothing Rust owns.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw_fd,
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Mapping {
            ptr: ptr.cast(),
            len,
            _fd: fd,
        }
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    pub fn page_addr(&self, page: usize) -> u64 {
        self.addr() + (page * PAGE) as u64
    }

    /// Writes one byte into `page` (volatile, so the store really reaches the page tables).
    pub fn write(&self, page: usize, value: u8) {
        assert!(page * PAGE < self.len);
        // SAFETY: the byte lies inside this live, writable mapping.
        unsafe { std::ptr::write_volatile(self.ptr.add(page * PAGE), value) };
    }

    pub fn read(&self, page: usize) -> u8 {
        assert!(page * PAGE < self.len);
        // SAFETY: the byte lies inside this live, readable mapping.
        unsafe { std::ptr::read_volatile(self.ptr.add(page * PAGE)) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range mapped in `map`; nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
