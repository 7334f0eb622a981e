//! A BAR piece mapped into this process at an address congruent to its place in the BAR modulo
//! the BAR's alignment (up to 1 GiB), so that host huge pages can back it and KVM can map it
//! with huge pages too: vfio-pci serves BAR faults with huge pages since Linux 6.12 when the
//! virtual address is aligned like the physical one (PASSTHROUGH.md), and a BAR's physical
//! address is aligned to its size.
//!
//! Done by reserving `len + align` bytes of address space (PROT_NONE, no memory), mapping the
//! piece over it at the chosen address (MAP_FIXED), and giving back the rest.

use std::io;
use std::os::fd::AsRawFd;

/// The largest page the kernel maps a BAR with.
pub const MAX_ALIGN: u64 = 1 << 30;
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("{len:#x} bytes at file offset {offset:#x}: {why}")]
    Range {
        len: u64,
        offset: u64,
        why: &'static str,
    },
    #[error("reserving {len:#x} bytes of address space")]
    Reserve {
        len: usize,
        #[source]
        source: io::Error,
    },
    #[error("mmap of {len:#x} bytes at file offset {offset:#x}")]
    Mmap {
        len: usize,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// A shared mapping, unmapped on drop.
#[derive(Debug)]
pub struct BarMap {
    addr: usize,
    len: usize,
}

impl BarMap {
    /// Maps `len` bytes of `fd` at `offset` (read-only unless `writable`) at an address equal
    /// to `bar_offset` modulo `align` (a power of two, capped at [`MAX_ALIGN`]; under a page
    /// means a page).
    pub fn new(
        fd: &impl AsRawFd,
        offset: u64,
        len: u64,
        writable: bool,
        bar_offset: u64,
        align: u64,
    ) -> Result<Self, MapError> {
        let range = |why| MapError::Range { len, offset, why };
        if len == 0 || len % PAGE != 0 || offset % PAGE != 0 {
            return Err(range("not whole pages"));
        }
        if !align.is_power_of_two() {
            return Err(range("alignment is not a power of two"));
        }
        let align = align.clamp(PAGE, MAX_ALIGN);
        // A regular file (a vfio-user server's memfd) must hold the whole piece: a page past
        // its end would SIGBUS the guest's access (KVM_RUN then fails with EFAULT). A server
        // that shrinks it later still can; seals would be needed to rule that out.
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes a `stat` into the buffer it is given and reads nothing else.
        if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } == 0 {
            // SAFETY: fstat returned 0, so it filled the whole struct.
            let st = unsafe { st.assume_init() };
            let end = offset.checked_add(len).ok_or_else(|| range("past 2^64"))?;
            if st.st_mode & libc::S_IFMT == libc::S_IFREG
                && u64::try_from(st.st_size).unwrap_or(0) < end
            {
                return Err(range("beyond the end of the file"));
            }
        }
        let file_offset = libc::off_t::try_from(offset).map_err(|_| range("offset too large"))?;
        let size = usize::try_from(len).map_err(|_| range("too large for this host"))?;
        let slack = usize::try_from(align).map_err(|_| range("too large for this host"))?;
        let reserve = size
            .checked_add(slack)
            .ok_or_else(|| range("too large for this host"))?;
        // SAFETY: a new private PROT_NONE mapping at an address the kernel chooses: it overlaps
        // nothing Rust owns and holds no memory.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(MapError::Reserve {
                len: reserve,
                source: io::Error::last_os_error(),
            });
        }
        let base = base as usize;
        let phase = (bar_offset % align) as usize;
        // The first address at or above `base` that is `phase` modulo the alignment.
        let start = base + (phase + slack - base % slack) % slack;
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: `start..start + size` lies inside the reservation made above (start < base +
        // align, and the reservation is size + align long), which only this function knows of;
        // MAP_FIXED replaces that part of it.
        let ptr = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                size,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd.as_raw_fd(),
                file_offset,
            )
        };
        let result = if ptr == libc::MAP_FAILED {
            Err(MapError::Mmap {
                len: size,
                offset,
                source: io::Error::last_os_error(),
            })
        } else {
            Ok(())
        };
        let (head, tail) = match result {
            Ok(()) => (
                (base, start - base),
                (start + size, base + reserve - start - size),
            ),
            Err(_) => ((base, reserve), (0, 0)),
        };
        for (at, n) in [head, tail] {
            if n != 0 {
                // SAFETY: unmaps parts of the reservation that hold nothing (outside the piece,
                // or all of it when the piece could not be mapped).
                unsafe { libc::munmap(at as *mut libc::c_void, n) };
            }
        }
        result.map(|()| Self {
            addr: start,
            len: size,
        })
    }

    pub fn addr(&self) -> usize {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for BarMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `new` made; the owner removed the memory slots
        // that used it before dropping the device (its documented contract).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_piece_is_placed_congruent_to_its_bar_offset_and_shows_the_file() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4 << 20).unwrap();
        file.write_all_at(b"piece", 0x3000).unwrap();
        let align = 2 << 20;
        let map = BarMap::new(&file, 0x2000, 2 << 20, true, 0x1000 + align, align).unwrap();
        assert_eq!(map.addr() as u64 % align, 0x1000);
        assert_eq!(map.len(), 2 << 20);
        // SAFETY: reads 5 bytes inside the live mapping just made.
        let got = unsafe { std::slice::from_raw_parts((map.addr() + 0x1000) as *const u8, 5) };
        assert_eq!(got, b"piece");
    }

    #[test]
    fn bad_ranges_and_unmappable_files_are_refused() {
        let file = tempfile::tempfile().unwrap();
        let e = BarMap::new(&file, 0, 100, false, 0, 4096).unwrap_err();
        assert!(matches!(e, MapError::Range { .. }), "{e}");
        let e = BarMap::new(&file, 0, 4096, false, 0, 3).unwrap_err();
        assert!(matches!(e, MapError::Range { .. }), "{e}");
        let null = std::fs::File::open("/dev/null").unwrap();
        let e = BarMap::new(&null, 0, 4096, true, 0, 4096).unwrap_err();
        assert!(matches!(e, MapError::Mmap { .. }), "{e}");
        assert_eq!(crate::vfio::errno_of(&e), Some(libc::EACCES));
    }

    #[test]
    fn a_piece_past_the_end_of_a_regular_file_is_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(2 * PAGE).unwrap();
        let e = BarMap::new(&file, PAGE, 2 * PAGE, true, 0, PAGE).unwrap_err();
        assert!(e.to_string().contains("beyond the end of the file"), "{e}");
        assert!(BarMap::new(&file, PAGE, PAGE, true, 0, PAGE).is_ok());
    }
}
