//! Reading a boot image (a kernel's segments, an initramfs) into guest RAM through the RAM's
//! memfd rather than its mapping.
//!
//! linux-loader copies each segment with `read_exact_volatile_from`: `read(2)` into the guest
//! mapping, where every fresh page is a page fault (allocate, zero, map) in the middle of the
//! copy. `pwrite(2)` of the same bytes on the memfd allocates the pages in the write path, with
//! no fault and no zeroing of pages it writes whole. On PVM hosts (C test, the 17 MB vmlinux of
//! the guest images into a fresh 128 MiB memfd, 3 runs each): `read` into the mapping 15-19 ms,
//! `pwrite` from a mapping of the image 8-11 ms, `pread`+`pwrite` through a 256 KiB buffer
//! 12-13 ms. Loading was most of a Linux guest's start-up. This is a property of our
//! memfd-backed RAM that no crate knows, so the reader is written here; linux-loader still parses
//! and checks the image and decides where each byte goes.
//!
//! The image is mapped read-only and only the kernel reads that mapping (inside `pwrite`): a
//! file truncated under us makes `pwrite` fail with EFAULT, never a SIGBUS in the VMM. Reads
//! into anything but guest RAM (headers into linux-loader's structs) are plain `pread`s.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, MmapRegion, ReadVolatile, VolatileMemoryError, VolatileSlice};

use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

use crate::memory::GuestMemory;

/// One piece of guest RAM's mapping and where it lies in the memfd.
#[derive(Debug, Clone, Copy)]
struct Piece<'a> {
    host: u64,
    size: u64,
    memfd: &'a File,
    file_offset: u64,
}

/// A boot image opened for linux-loader (`Read + ReadVolatile + Seek`) that writes what lands in
/// guest RAM through the RAM's memfd.
pub struct ImageReader<'a> {
    image: File,
    len: u64,
    pos: u64,
    /// The whole image, mapped read-only on the first write into RAM (headers never need it).
    source: Option<MmapRegion<()>>,
    pieces: Vec<Piece<'a>>,
}

impl<'a> ImageReader<'a> {
    /// `image`'s length is taken now: a file that grows later is read to this length, one that
    /// shrinks ends the read with an error. Regions of `mem` without a file behind them are
    /// written through their mapping, as vm-memory would.
    pub fn new(image: File, mem: &'a GuestMemory) -> std::io::Result<Self> {
        let len = image.metadata()?.len();
        let pieces = mem
            .iter()
            .filter_map(|region| {
                let f = region.file_offset()?;
                Some(Piece {
                    host: region.as_ptr() as u64,
                    size: region.len(),
                    memfd: f.file(),
                    file_offset: f.start(),
                })
            })
            .collect();
        Ok(ImageReader {
            image,
            len,
            pos: 0,
            source: None,
            pieces,
        })
    }

    fn left(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    /// The memfd and offset of host bytes `host..host + len`, if all of them are guest RAM.
    fn memfd_offset(&self, host: u64, len: u64) -> Option<(&'a File, u64)> {
        self.pieces.iter().find_map(|p| {
            let off = host.checked_sub(p.host)?;
            (off.checked_add(len)? <= p.size).then_some((p.memfd, p.file_offset + off))
        })
    }

    fn source(&mut self) -> std::io::Result<*const u8> {
        if self.source.is_none() {
            let len = usize::try_from(self.len)
                .map_err(|_| std::io::Error::other("image larger than the address space"))?;
            let region = MmapRegionBuilder::new(len)
                .with_file_offset(FileOffset::new(self.image.try_clone()?, 0))
                .with_mmap_prot(libc::PROT_READ)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| std::io::Error::other(format!("mapping the image: {e}")))?;
            self.source = Some(region);
        }
        Ok(self
            .source
            .as_ref()
            .map_or(std::ptr::null(), |r| r.as_ptr()))
    }

    /// Writes image bytes `pos..pos + len` to `memfd` at `offset`.
    fn write_to_ram(&mut self, memfd: &File, offset: u64, len: usize) -> std::io::Result<()> {
        let source = self.source()?;
        let mut done = 0usize;
        while done < len {
            let from = self.pos as usize + done;
            // SAFETY: `source` maps `self.len` bytes of the image and `from + (len - done)` is
            // at most `pos + len <= self.len` (the caller bounds `len` by `left()`); the pointer
            // and length describe readable memory that only the kernel reads here.
            let n = unsafe {
                libc::pwrite(
                    memfd.as_raw_fd(),
                    source.add(from).cast(),
                    len - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if e.raw_os_error() == Some(libc::EFAULT) {
                    return Err(std::io::Error::other(
                        "the image shrank while it was being read",
                    ));
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            done += n as usize;
        }
        Ok(())
    }
}

impl Read for ImageReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.left()).unwrap_or(usize::MAX));
        let n = self.image.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for ImageReader<'_> {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let (base, delta) = match to {
            SeekFrom::Start(n) => (n, 0),
            SeekFrom::End(d) => (self.len, d),
            SeekFrom::Current(d) => (self.pos, d),
        };
        self.pos = base.checked_add_signed(delta).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before the start of the image or past 2^64",
            )
        })?;
        Ok(self.pos)
    }
}

impl ReadVolatile for ImageReader<'_> {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let want = buf
            .len()
            .min(usize::try_from(self.left()).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let host = buf.ptr_guard_mut().as_ptr() as u64;
        match self.memfd_offset(host, want as u64) {
            Some((memfd, offset)) => {
                self.write_to_ram(memfd, offset, want)
                    .map_err(VolatileMemoryError::IOError)?;
                // What vm-memory's own reads do: the VMM-writes bitmap learns of these bytes.
                buf.bitmap().mark_dirty(0, want);
                self.pos += want as u64;
                Ok(want)
            }
            None => {
                self.image
                    .seek(SeekFrom::Start(self.pos))
                    .map_err(VolatileMemoryError::IOError)?;
                let mut part = buf.subslice(0, want)?;
                let n = (&self.image).read_volatile(&mut part)?;
                self.pos += n as u64;
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use std::io::Write;
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestAddress};

    fn image(bytes: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    /// Bytes read into guest RAM arrive through the memfd at the right place (seen through
    /// the mapping), mark the VMM-writes bitmap, and a read that spans the end of the image
    /// stops there; headers read into ordinary memory come from the same positions.
    #[test]
    fn image_bytes_land_in_ram_where_the_loader_asks() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let data: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i * 7 % 251) as u8).collect();
        let mut r = ImageReader::new(image(&data), ram.memory()).unwrap();
        let mut head = [0u8; 16];
        r.read_exact(&mut head).unwrap();
        assert_eq!(head, data[..16]);
        r.seek(SeekFrom::Start(100)).unwrap();
        let mem = ram.memory();
        mem.read_exact_volatile_from(GuestAddress(0x20_0000), &mut r, 3 * 4096)
            .unwrap();
        let mut back = vec![0u8; 3 * 4096];
        mem.read_slice(&mut back, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(back, data[100..100 + 3 * 4096]);
        let region = mem.find_region(GuestAddress(0x20_0000)).unwrap();
        assert!(region.bitmap().dirty_at(0x20_0000 + 2 * 4096));
        assert!(!region.bitmap().dirty_at(0x20_0000 + 3 * 4096));
        // Nothing is left: a further read into RAM is end of file, not garbage.
        assert!(mem
            .read_exact_volatile_from(GuestAddress(0x30_0000), &mut r, 1)
            .is_err());
        assert_eq!(r.seek(SeekFrom::End(0)).unwrap(), data.len() as u64);
        assert!(r.seek(SeekFrom::Current(-(data.len() as i64) - 1)).is_err());
    }

    /// A read that crosses from RAM into the MMIO hole is cut by vm-memory into per-region
    /// pieces; each piece that is RAM goes through the memfd at its own offset (the 4 GiB
    /// guest's second range starts past the hole, at memfd offset 3 GiB).
    #[test]
    fn ram_above_the_hole_is_written_at_its_memfd_offset() {
        let ram = GuestRam::new(4 << 30).unwrap();
        let high = ram.ranges()[1];
        let data: Vec<u8> = (0..8192).map(|i| (i % 253) as u8).collect();
        let mut r = ImageReader::new(image(&data), ram.memory()).unwrap();
        ram.memory()
            .read_exact_volatile_from(GuestAddress(high.gpa + 4096), &mut r, 8192)
            .unwrap();
        let mut back = vec![0u8; 8192];
        ram.file()
            .read_exact_at(&mut back, high.file_offset + 4096)
            .unwrap();
        assert_eq!(back, data);
    }

    /// An image that shrinks after it was opened ends the load with an error, not a signal.
    #[test]
    fn an_image_that_shrinks_is_an_error() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let f = image(&vec![1u8; 64 << 10]);
        let mut r = ImageReader::new(f.try_clone().unwrap(), ram.memory()).unwrap();
        r.source().unwrap();
        f.set_len(4096).unwrap();
        let e = ram
            .memory()
            .read_exact_volatile_from(GuestAddress(0x10_0000), &mut r, 64 << 10);
        assert!(e.is_err(), "{e:?}");
    }
}
