//! Guest RAM: one memfd, mapped shared, laid out around the 32-bit MMIO hole.
//!
//! Shared memfd backing (rather than anonymous private memory) is deliberate: userfaultfd MINOR
//! faults, postcopy migration and an out-of-process page server all need a second mapping of the
//! same pages. Writes the VMM makes through `GuestMemory` are recorded in vm-memory's
//! `AtomicBitmap` (wrapped in `devices::WriteBitmap`), which dirty tracking ORs into every
//! harvest.

use std::fs::File;
use std::os::fd::FromRawFd;

pub mod page_index;
pub mod ram_file;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend};

use crate::vstate::resources::addresses::{MMIO32_END, MMIO32_START};

/// The guest memory type every component shares (the devices crate uses the same one).
pub type GuestMemory = devices::GuestMemory;

/// Guest page size used for all dirty-tracking bookkeeping.
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size must be at least {min} MiB, got {got} bytes")]
    TooSmall { min: u64, got: u64 },
    #[error("guest memory size {0} bytes is not a multiple of 4 KiB")]
    Unaligned(u64),
    #[error("guest memory size {size} MiB exceeds this host's memory ({host} MiB)")]
    TooLarge { size: u64, host: u64 },
    #[error("memfd_create failed: {0}")]
    Memfd(std::io::Error),
    #[error("sizing the guest memory file to {size} bytes failed: {source}")]
    Truncate { size: u64, source: std::io::Error },
    #[error("mapping guest memory failed: {0}")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    // The size errors carry the user's text, not a flattened error.
    #[error("'{text}' is not a size (examples: 128M, 1G, 512)")]
    NotASize { text: String },
    #[error("unknown size unit '{unit}' in '{text}'")]
    SizeUnit { unit: String, text: String },
    #[error("size '{text}' overflows")]
    SizeOverflow { text: String },
}

/// One contiguous piece of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    pub gpa: u64,
    pub size: u64,
    /// Offset of this range in the memfd.
    pub file_offset: u64,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa < self.end()
    }
}

/// Splits `size` bytes of RAM around the 32-bit MMIO hole of the address map.
pub fn ram_layout(size: u64) -> Vec<RamRange> {
    let low = size.min(MMIO32_START);
    let mut ranges = vec![RamRange {
        gpa: 0,
        size: low,
        file_offset: 0,
    }];
    if size > low {
        ranges.push(RamRange {
            gpa: MMIO32_END,
            size: size - low,
            file_offset: low,
        });
    }
    ranges
}

/// Guest RAM and the file behind it.
pub struct GuestRam {
    memory: GuestMemory,
    file: File,
    ranges: Vec<RamRange>,
    size: u64,
}

/// Smallest RAM we accept: the boot structures, a micro guest's code and stack, and some room.
pub const MIN_MEM_BYTES: u64 = 8 << 20;

impl GuestRam {
    /// Creates `size` bytes of guest RAM backed by a fresh memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size < MIN_MEM_BYTES {
            return Err(MemoryError::TooSmall {
                min: MIN_MEM_BYTES >> 20,
                got: size,
            });
        }
        if size % PAGE_SIZE != 0 {
            return Err(MemoryError::Unaligned(size));
        }
        if let Some(host) = host_mem_bytes() {
            if size > host {
                return Err(MemoryError::TooLarge {
                    size: size >> 20,
                    host: host >> 20,
                });
            }
        }
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"vmm-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)
            .map_err(|source| MemoryError::Truncate { size, source })?;
        let ranges = ram_layout(size);
        let regions = ranges.iter().map(|r| {
            let clone = file.try_clone().map_err(MemoryError::Memfd)?;
            Ok((
                GuestAddress(r.gpa),
                r.size as usize,
                Some(FileOffset::new(clone, r.file_offset)),
            ))
        });
        let regions: Result<Vec<_>, MemoryError> = regions.collect();
        let memory = GuestMemory::from_ranges_with_files(regions?).map_err(MemoryError::Map)?;
        Ok(GuestRam {
            memory,
            file,
            ranges,
            size,
        })
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }
    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The memfd behind guest RAM (for a second mapping: page servers, postcopy).
    pub fn file(&self) -> &File {
        &self.file
    }
    /// True when `gpa` is guest RAM.
    pub fn is_ram(&self, gpa: u64) -> bool {
        self.ranges.iter().any(|r| r.contains(gpa))
    }
    /// Host virtual address of each range, in the order of `ranges()`.
    pub fn host_addrs(&self) -> Vec<u64> {
        self.memory
            .iter()
            .map(|region| region.as_ptr() as u64)
            .collect()
    }
    /// Highest RAM address below the MMIO hole (exclusive).
    pub fn low_end(&self) -> u64 {
        self.ranges[0].end()
    }
}

/// The host's total memory, from /proc/meminfo.
pub fn host_mem_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Parses a memory size: `512M`, `1G`, `256MiB`, `4096K`, or a plain number of MiB (as QEMU).
pub fn parse_size(text: &str) -> Result<u64, MemoryError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| MemoryError::NotASize {
        text: text.to_owned(),
    })?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1 << 20,
        "k" | "kb" | "kib" => 1 << 10,
        "g" | "gb" | "gib" => 1 << 30,
        "b" => 1,
        other => {
            return Err(MemoryError::SizeUnit {
                unit: other.to_owned(),
                text: text.to_owned(),
            })
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| MemoryError::SizeOverflow {
            text: text.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn layout_splits_around_the_hole() {
        assert_eq!(ram_layout(128 << 20).len(), 1);
        let big = ram_layout(4 << 30);
        assert_eq!(big.len(), 2);
        assert_eq!(big[0].end(), MMIO32_START);
        assert_eq!(big[1].gpa, MMIO32_END);
        assert_eq!(big[0].size + big[1].size, 4 << 30);
        assert_eq!(big[1].file_offset, big[0].size);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("128M").unwrap(), 128 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("256").unwrap(), 256 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn ram_is_shared_memfd_and_bitmap_tracks_vmm_writes() {
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.memory()
            .write_obj(0xabcdu64, GuestAddress(0x5000))
            .unwrap();
        let region = ram.memory().find_region(GuestAddress(0x5000)).unwrap();
        assert!(region.bitmap().is_addr_set(0x5000));
        assert!(!region.bitmap().is_addr_set(0x9000));
        // The same bytes are visible through the memfd.
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 8];
        ram.file().read_exact_at(&mut buf, 0x5000).unwrap();
        assert_eq!(u64::from_le_bytes(buf), 0xabcd);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(
            GuestRam::new(0),
            Err(MemoryError::TooSmall { .. })
        ));
        assert!(matches!(
            GuestRam::new((16 << 20) + 1),
            Err(MemoryError::Unaligned(_))
        ));
        assert!(matches!(
            GuestRam::new(1 << 50),
            Err(MemoryError::TooLarge { .. })
        ));
    }
}
