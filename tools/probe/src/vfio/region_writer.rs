//! The device writing its own BAR memory: a write through the VFIO region (pwrite on the device
//! fd at the BAR's offset), which the driver carries out in the kernel (mbochs: kmap + memcpy
//! into the framebuffer page; mdpy: memcpy into its vmalloc buffer). No user page table of the
//! probe's BAR mapping is touched, as none is when a GPU writes its VRAM: the closest a
//! hardware-less guest gets to "the GPU wrote the BAR", and the reason the CPU-side trackers are
//! expected to miss it.
//!
//! Where such a write lands is measured, not assumed: [`calibrate`] writes a marker at BAR
//! offset 0 and finds the page of the mapping that shows it. (The 6.12 mbochs sample subtracts
//! MBOCHS_MMIO_BAR_OFFSET instead of MBOCHS_MEMORY_BAR_OFFSET in `mbochs_access`, so its region
//! writes land two pages further into the framebuffer than their offset says.)

use std::os::fd::AsRawFd;

use crate::external::{DeviceFailure, DeviceWriter};
use crate::kinds::SMALL;

const MARKER: u64 = 0x5ca1_ab1e_0000_0b0b;

/// Writes through the region at `region_off` (the BAR's start in the device fd) so that the
/// value shows at the intended address of the mapping at `map_base`, `shift` bytes further.
pub struct RegionWriter {
    fd: i32,
    region_off: u64,
    map_base: usize,
    shift: usize,
}

fn pwrite(fd: i32, value: u64, off: u64) -> Result<(), DeviceFailure> {
    let fail = |why: String, errno: Option<i32>| DeviceFailure {
        errno,
        why,
        faulted: false,
    };
    let o = libc::off_t::try_from(off).map_err(|_| fail(format!("offset {off:#x}"), None))?;
    let b = value.to_le_bytes();
    // SAFETY: pwrite reads exactly the 8 bytes of `b`, which lives across the call.
    let n = unsafe { libc::pwrite(fd, b.as_ptr().cast(), b.len(), o) };
    if n == b.len() as isize {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    Err(if n < 0 {
        fail(format!("region pwrite at {off:#x}: {e}"), e.raw_os_error())
    } else {
        fail(format!("region pwrite at {off:#x}: {n} of 8 bytes"), None)
    })
}

fn load(addr: usize) -> u64 {
    // SAFETY: callers pass an 8-byte-aligned address inside a live, readable BAR mapping.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

/// Measures where a region write at BAR offset 0 appears in the mapping (`map_len` bytes at
/// `map_base`): Ok(the byte shift) or why it appears nowhere. The marker is wiped afterwards.
pub fn calibrate(
    fd: &impl AsRawFd,
    region_off: u64,
    map_base: usize,
    map_len: usize,
) -> Result<RegionWriter, String> {
    let raw = fd.as_raw_fd();
    pwrite(raw, MARKER, region_off).map_err(|e| e.why)?;
    let page = (0..map_len / SMALL).find(|&p| load(map_base + p * SMALL) == MARKER);
    let Some(page) = page else {
        return Err(format!(
            "a region write of the marker {MARKER:#x} at BAR offset 0 shows in none of the {} \
             mapped pages (the first 8 bytes of the BAR now read {:#x}): region writes cannot \
             be aimed at a page",
            map_len / SMALL,
            load(map_base)
        ));
    };
    let shift = page * SMALL;
    // Wiped through the same path, so nothing the probe wrote stays behind.
    pwrite(raw, 0, region_off).map_err(|e| e.why)?;
    Ok(RegionWriter {
        fd: raw,
        region_off,
        map_base,
        shift,
    })
}

impl RegionWriter {
    /// How far past its offset a region write lands, in bytes (0 where the driver is exact).
    pub fn shift(&self) -> usize {
        self.shift
    }
}

impl DeviceWriter for RegionWriter {
    fn name(&self) -> String {
        format!(
            "the device: VFIO region write (pwrite on the device fd; the driver copies in the \
             kernel, through no user PTE{})",
            if self.shift == 0 {
                String::new()
            } else {
                format!("; lands {} KiB past its offset, measured", self.shift >> 10)
            }
        )
    }

    fn write_pages(
        &mut self,
        addr: usize,
        pages: &[usize],
        value: u64,
    ) -> Result<(), DeviceFailure> {
        for &p in pages {
            let target = addr + p * SMALL;
            let bar_off = target
                .checked_sub(self.map_base + self.shift)
                .ok_or_else(|| DeviceFailure {
                    errno: None,
                    why: format!("page {p} lies before where region writes can land"),
                    faulted: false,
                })?;
            pwrite(self.fd, value, self.region_off + bar_off as u64)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::Mapping;
    use std::os::fd::OwnedFd;

    /// A shared file mapping and pwrite on the same file: a "region" whose writes land where
    /// they say. The calibration finds shift 0, and aimed writes show in the intended pages.
    #[test]
    fn calibration_finds_where_writes_land_and_aims_them() {
        let f = tempfile_fd(16 * SMALL);
        let map = Mapping::new(16 * SMALL, libc::MAP_SHARED, Some(&f)).unwrap();
        let base = map.ptr as usize;
        let mut w = calibrate(&f, 0, base, map.len).unwrap();
        assert_eq!(w.shift(), 0);
        assert_eq!(load(base), 0, "the marker is wiped");
        w.write_pages(base + SMALL, &[2, 5], 0xfeed).unwrap();
        assert_eq!(load(base + 3 * SMALL), 0xfeed);
        assert_eq!(load(base + 6 * SMALL), 0xfeed);
        assert_eq!(load(base + 2 * SMALL), 0);
        // A region offset past the file's end shows nowhere in the mapping.
        let far = calibrate(&f, 64 * SMALL as u64, base, map.len);
        assert!(far.is_err_and(|e| e.contains("shows in none")));
    }

    fn tempfile_fd(len: usize) -> OwnedFd {
        let path = std::env::temp_dir().join(format!("vmm-probe-rw-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file.set_len(len as u64).unwrap();
        OwnedFd::from(file)
    }
}
