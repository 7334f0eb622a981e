//! A shared mapping of part of a file (a BAR through the VFIO device fd, or /dev/mem), accessed
//! with volatile loads and stores: it is device memory, which the compiler must not merge or
//! elide.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr;

pub struct Mapping {
    base: *mut libc::c_void,
    map_len: usize,
    /// Offset of the caller's first byte in the mapping (the file offset need not be
    /// page-aligned).
    skew: usize,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value and touched only through
// volatile loads and stores of its own methods; moving it to another thread (the VRAM writer
// workload) moves that ownership. It is not Sync: two threads never share one.
unsafe impl Send for Mapping {}

impl Mapping {
    pub fn new(file: &File, pos: u64, len: usize) -> io::Result<Mapping> {
        let page = crate::pagemap::page_size() as u64;
        let start = pos - pos % page;
        let skew = (pos - start) as usize;
        let map_len = skew
            .checked_add(len)
            .filter(|&l| l > 0)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "bad length"))?;
        let offset = libc::off_t::try_from(start)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
        // SAFETY: a new shared mapping chosen by the kernel; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            base,
            map_len,
            skew,
            len,
        })
    }

    fn word_ptr(&self, at: usize) -> *mut u64 {
        assert!(
            at % 8 == 0 && at + 8 <= self.len && (self.skew + at) % 8 == 0,
            "bad word offset {at:#x} in a {:#x}-byte mapping",
            self.len
        );
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.base.cast::<u8>().add(self.skew + at).cast::<u64>() }
    }

    /// Stores the little-endian u64 at byte `at` (8-aligned, inside the mapping).
    pub fn write_u64(&self, at: usize, value: u64) {
        // SAFETY: an aligned, in-bounds pointer into our live mapping.
        unsafe { ptr::write_volatile(self.word_ptr(at), value.to_le()) }
    }

    pub fn read_u64(&self, at: usize) -> u64 {
        // SAFETY: an aligned, in-bounds pointer into our live mapping.
        u64::from_le(unsafe { ptr::read_volatile(self.word_ptr(at)) })
    }

    fn dword_ptr(&self, at: usize) -> *mut u32 {
        assert!(
            at % 4 == 0 && at + 4 <= self.len && (self.skew + at) % 4 == 0,
            "bad dword offset {at:#x} in a {:#x}-byte mapping",
            self.len
        );
        // SAFETY: in bounds of the mapping (checked above).
        unsafe { self.base.cast::<u8>().add(self.skew + at).cast::<u32>() }
    }

    /// One 4-byte store (a register's width), little-endian, at byte `at` (4-aligned).
    pub fn write_u32(&self, at: usize, value: u32) {
        // SAFETY: an aligned, in-bounds pointer into our live mapping.
        unsafe { ptr::write_volatile(self.dword_ptr(at), value.to_le()) }
    }

    pub fn read_u32(&self, at: usize) -> u32 {
        // SAFETY: an aligned, in-bounds pointer into our live mapping.
        u32::from_le(unsafe { ptr::read_volatile(self.dword_ptr(at)) })
    }

    /// One 1-byte store at byte `at` (a register written byte-wide).
    pub fn write_u8(&self, at: usize, value: u8) {
        assert!(
            at < self.len,
            "bad byte offset {at:#x} in a {:#x}-byte mapping",
            self.len
        );
        // SAFETY: in bounds of our live mapping (checked above).
        unsafe { ptr::write_volatile(self.base.cast::<u8>().add(self.skew + at), value) }
    }

    /// Copies `src` in at `at`, 8 bytes at a time (both 8-byte multiples).
    pub fn write_bytes(&self, at: usize, src: &[u8]) {
        for (i, chunk) in src.chunks_exact(8).enumerate() {
            let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
            self.write_u64(at + 8 * i, word);
        }
    }

    pub fn read_bytes(&self, at: usize, dst: &mut [u8]) {
        for (i, chunk) in dst.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&self.read_u64(at + 8 * i).to_le_bytes());
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe { libc::munmap(self.base, self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_an_unaligned_range_of_a_file() {
        let path = std::env::temp_dir().join(format!("vmm-agent-map-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        file.set_len(3 * 4096).expect("size");
        let map = Mapping::new(&file, 4096 + 64, 256).expect("map");
        let data: Vec<u8> = (0..256u32).map(|i| i as u8).collect();
        map.write_bytes(0, &data);
        let mut back = vec![0u8; 256];
        map.read_bytes(0, &mut back);
        assert_eq!(back, data);
        let mut on_disk = vec![0u8; 256];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut on_disk, 4096 + 64).expect("read");
        assert_eq!(on_disk, data);
        map.write_u32(4, 0xdead_beef);
        assert_eq!(map.read_u32(4), 0xdead_beef);
        assert_eq!(map.read_u64(0) >> 32, 0xdead_beef);
        drop(map);
        std::fs::remove_file(path).expect("cleanup");
    }
}
