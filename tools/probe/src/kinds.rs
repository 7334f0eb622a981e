//! The memory kinds the probe creates, each a `Region` that unmaps and closes everything it
//! holds on drop, and the hugetlb reservation guard that puts `nr_hugepages` back.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use kvm_ioctls::{Kvm, VmFd};

use crate::predict::Row;

pub const SMALL: usize = 4096;
pub const HUGE: usize = 2 << 20;

/// KVM_CREATE_GUEST_MEMFD flags (include/uapi/linux/kvm.h, 6.18); kvm-bindings 0.14 lacks them.
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1 << 0;
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 1 << 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Anon4k,
    AnonThp,
    Memfd,
    Hugetlb,
    GuestMemfd { flags: u64 },
    File,
}

impl Kind {
    /// Every kind this version probes, guest_memfd once per flag combination.
    pub fn all() -> Vec<Kind> {
        vec![
            Kind::Anon4k,
            Kind::AnonThp,
            Kind::Memfd,
            Kind::Hugetlb,
            Kind::GuestMemfd { flags: 0 },
            Kind::GuestMemfd {
                flags: GUEST_MEMFD_FLAG_MMAP,
            },
            Kind::GuestMemfd {
                flags: GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED,
            },
            Kind::File,
        ]
    }

    pub fn name(self) -> String {
        match self {
            Kind::Anon4k => "anon 4K".into(),
            Kind::AnonThp => "anon THP".into(),
            Kind::Memfd => "memfd".into(),
            Kind::Hugetlb => "hugetlbfs".into(),
            Kind::GuestMemfd { flags } => {
                let mut names = Vec::new();
                if flags & GUEST_MEMFD_FLAG_MMAP != 0 {
                    names.push("MMAP");
                }
                if flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0 {
                    names.push("INIT_SHARED");
                }
                if names.is_empty() {
                    names.push("0");
                }
                format!("guest_memfd {}", names.join("|"))
            }
            Kind::File => "file (MAP_SHARED)".into(),
        }
    }

    pub fn row(self) -> Row {
        match self {
            Kind::Anon4k | Kind::AnonThp | Kind::Memfd => Row::AnonMemfd,
            Kind::Hugetlb => Row::Hugetlb,
            Kind::GuestMemfd { .. } => Row::GuestMemfd,
            Kind::File => Row::None,
        }
    }

    /// The granularity writes are chosen in and results counted in.
    pub fn unit(self) -> usize {
        match self {
            Kind::AnonThp | Kind::Hugetlb => HUGE,
            _ => SMALL,
        }
    }

    /// Units per region: enough that the chosen written pages leave untouched ones around them.
    pub fn units(self) -> usize {
        match self {
            Kind::AnonThp | Kind::Hugetlb => 4,
            _ => 16,
        }
    }

    /// Backed by shmem/hugetlb page cache, i.e. a candidate for MINOR faults.
    pub fn page_cache_backed(self) -> bool {
        matches!(self, Kind::Memfd | Kind::Hugetlb | Kind::File)
    }
}

/// One mmap, unmapped on drop.
#[derive(Debug)]
pub struct Mapping {
    pub ptr: *mut u8,
    pub len: usize,
}

impl Mapping {
    pub fn new(len: usize, flags: libc::c_int, fd: Option<&OwnedFd>) -> std::io::Result<Mapping> {
        let raw = fd.map_or(-1, |f| f.as_raw_fd());
        // SAFETY: a fresh mapping at an address the kernel chooses; it overlaps nothing Rust owns.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                raw,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping this value created; nothing refers to it any more
        // (regions are dropped only after every thread touching them has been joined).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A memory kind, mapped and not yet touched. Field order is drop order: the mappings go
/// first, then the fd, then the VM that owns a guest_memfd.
#[derive(Debug)]
pub struct Region {
    pub kind: Kind,
    /// Held only to be unmapped on drop.
    _map: Mapping,
    /// Where the usable, aligned part starts (THP over-allocates to align to 2 MiB).
    start: *mut u8,
    pub len: usize,
    fd: Option<OwnedFd>,
    _vm: Option<VmFd>,
    /// False for guest_memfd without INIT_SHARED: a CPU access would SIGBUS.
    pub cpu_access: bool,
}

impl Region {
    pub fn addr(&self) -> *mut u8 {
        self.start
    }

    pub fn unit_addr(&self, unit: usize) -> *mut u8 {
        self.start.wrapping_add(unit * self.kind.unit())
    }

    /// Writes one byte into every 4 KiB page, so every page (or huge page) is present.
    pub fn populate(&self) {
        for off in (0..self.len).step_by(SMALL) {
            // SAFETY: `off` lies inside this region's mapping, which lives as long as `self`.
            unsafe { std::ptr::write_volatile(self.start.add(off), 0x5a) };
        }
    }

    /// A second MAP_SHARED view of the same backing file, to fill the page cache without
    /// mapping pages in the primary view (the set-up for a MINOR fault).
    pub fn alias(&self) -> std::io::Result<Mapping> {
        let fd = self.fd.as_ref().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::Unsupported, "no backing file")
        })?;
        Mapping::new(self.len, libc::MAP_SHARED, Some(fd))
    }
}

/// Creates `kind`, untouched; Err is the one-line reason it cannot be created here.
pub fn create(kind: Kind, file_dir: &Path) -> Result<Region, String> {
    let len = kind.units() * kind.unit();
    let shared = libc::MAP_SHARED;
    match kind {
        Kind::Anon4k => {
            let map = Mapping::new(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None)
                .map_err(|e| format!("mmap anonymous: {e}"))?;
            madvise(&map, 0, len, libc::MADV_NOHUGEPAGE)?;
            Ok(region(kind, map, 0, len, None, None, true))
        }
        Kind::AnonThp => {
            // Over-allocate by one huge page so an aligned 2 MiB window exists inside.
            let map = Mapping::new(len + HUGE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None)
                .map_err(|e| format!("mmap anonymous: {e}"))?;
            let skew = (HUGE - map.ptr as usize % HUGE) % HUGE;
            madvise(&map, skew, len, libc::MADV_HUGEPAGE)?;
            Ok(region(kind, map, skew, len, None, None, true))
        }
        Kind::Memfd => {
            let fd = memfd("vmm-probe", libc::MFD_CLOEXEC, len)?;
            let map =
                Mapping::new(len, shared, Some(&fd)).map_err(|e| format!("mmap memfd: {e}"))?;
            Ok(region(kind, map, 0, len, Some(fd), None, true))
        }
        Kind::Hugetlb => {
            // A hugetlbfs file (memfd MFD_HUGETLB) mapped shared, so MINOR can be set up
            // through a second view; MAP_HUGETLB alone would give an fd-less private mapping.
            let fd = memfd("vmm-probe-huge", libc::MFD_CLOEXEC | libc::MFD_HUGETLB, len)?;
            let map = Mapping::new(len, shared | libc::MAP_HUGETLB, Some(&fd))
                .map_err(|e| format!("mmap hugetlbfs: {e}"))?;
            Ok(region(kind, map, 0, len, Some(fd), None, true))
        }
        Kind::GuestMemfd { flags } => guest_memfd(kind, flags, len),
        Kind::File => {
            let fd = temp_file(file_dir, len)?;
            let map =
                Mapping::new(len, shared, Some(&fd)).map_err(|e| format!("mmap file: {e}"))?;
            Ok(region(kind, map, 0, len, Some(fd), None, true))
        }
    }
}

fn region(
    kind: Kind,
    map: Mapping,
    skew: usize,
    len: usize,
    fd: Option<OwnedFd>,
    vm: Option<VmFd>,
    cpu_access: bool,
) -> Region {
    let start = map.ptr.wrapping_add(skew);
    Region {
        kind,
        _map: map,
        start,
        len,
        fd,
        _vm: vm,
        cpu_access,
    }
}

fn madvise(map: &Mapping, off: usize, len: usize, advice: libc::c_int) -> Result<(), String> {
    // SAFETY: the range lies inside `map`; madvise only changes the kernel's paging policy.
    let rc = unsafe { libc::madvise(map.ptr.wrapping_add(off).cast(), len, advice) };
    if rc != 0 {
        return Err(format!(
            "madvise({advice}): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn memfd(name: &str, flags: libc::c_uint, len: usize) -> Result<OwnedFd, String> {
    let cname = CString::new(name).map_err(|e| e.to_string())?;
    // SAFETY: `cname` is NUL-terminated; memfd_create returns a new fd or -1.
    let raw = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
    if raw < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    truncate(&fd, len)?;
    Ok(fd)
}

fn truncate(fd: &OwnedFd, len: usize) -> Result<(), String> {
    let len = libc::off_t::try_from(len).map_err(|e| e.to_string())?;
    // SAFETY: ftruncate on a descriptor this module owns.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
        return Err(format!("ftruncate: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A temporary file in `dir`, unlinked at once so nothing is left behind even if the probe dies.
fn temp_file(dir: &Path, len: usize) -> Result<OwnedFd, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = temp_path(dir);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    std::fs::remove_file(&path).map_err(|e| format!("unlink {}: {e}", path.display()))?;
    let fd = OwnedFd::from(file);
    truncate(&fd, len)?;
    Ok(fd)
}

/// Temp files are named `vmm-probe-<pid>-<n>`; tests look for leftovers by this prefix.
pub const TEMP_PREFIX: &str = "vmm-probe-";

fn temp_path(dir: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()))
}

fn guest_memfd(kind: Kind, flags: u64, len: usize) -> Result<Region, String> {
    let vm = Kvm::new()
        .and_then(|kvm| kvm.create_vm())
        .map_err(|e| format!("scratch VM: {e}"))?;
    let req = kvm_bindings::kvm_create_guest_memfd {
        size: len as u64,
        flags,
        reserved: [0; 6],
    };
    let raw = vm.create_guest_memfd(req).map_err(|e| {
        format!(
            "KVM_CREATE_GUEST_MEMFD flags={flags:#x}: {} ({})",
            crate::report::errno_name(e.errno()),
            e
        )
    })?;
    // SAFETY: KVM_CREATE_GUEST_MEMFD returned a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    if flags & GUEST_MEMFD_FLAG_MMAP == 0 {
        return Err(format!(
            "created (flags={flags:#x}) but not mmap-able without GUEST_MEMFD_FLAG_MMAP: no CPU \
             mapping for any userspace mechanism to act on"
        ));
    }
    let map = Mapping::new(len, libc::MAP_SHARED, Some(&fd))
        .map_err(|e| format!("created (flags={flags:#x}); mmap: {e}"))?;
    let cpu = flags & GUEST_MEMFD_FLAG_INIT_SHARED != 0;
    Ok(region(kind, map, 0, len, Some(fd), Some(vm), cpu))
}

/// Reserves hugetlb pages when too few are free, and puts `nr_hugepages` back on drop.
#[derive(Debug)]
pub struct HugepageReservation {
    old: Option<u64>,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugepageReservation {
    /// Makes at least `pages` 2 MiB pages free. Err: the one-line reason it could not.
    pub fn ensure(pages: u64) -> Result<HugepageReservation, String> {
        let free = meminfo("HugePages_Free")?;
        if free >= pages {
            return Ok(HugepageReservation { old: None });
        }
        let old = read_u64(NR_HUGEPAGES)?;
        let want = old + (pages - free);
        // From here on the guard exists, so any early return restores the old value.
        let guard = HugepageReservation { old: Some(old) };
        std::fs::write(NR_HUGEPAGES, want.to_string())
            .map_err(|e| format!("write {want} > {NR_HUGEPAGES}: {e}"))?;
        let got = read_u64(NR_HUGEPAGES)?;
        if got < want {
            return Err(format!(
                "asked for {want} hugepages, kernel gave {got} (fragmented memory?)"
            ));
        }
        Ok(guard)
    }

    pub fn describe(&self) -> String {
        match self.old {
            None => "enough free hugepages already; nr_hugepages untouched".into(),
            Some(old) => format!("reserved pages (nr_hugepages was {old}; restored afterwards)"),
        }
    }
}

impl Drop for HugepageReservation {
    fn drop(&mut self) {
        if let Some(old) = self.old {
            // Nothing to do on failure but say so: a destructor cannot return an error.
            if let Err(e) = std::fs::write(NR_HUGEPAGES, old.to_string()) {
                eprintln!("vmm-probe: could not restore {NR_HUGEPAGES} to {old}: {e}");
            }
        }
    }
}

fn read_u64(path: &str) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("read {path}: {e}"))?;
    text.trim()
        .parse()
        .map_err(|e| format!("parse {path} {text:?}: {e}"))
}

/// A field of /proc/meminfo, in its own unit (kB or pages).
pub fn meminfo(field: &str) -> Result<u64, String> {
    let text =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| format!("read /proc/meminfo: {e}"))?;
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| *k == field)
        .and_then(|(_, v)| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/meminfo"))
}

/// AnonHugePages (kB) of the VMA that contains `addr`, from /proc/self/smaps.
pub fn anon_huge_kb(addr: *const u8) -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/self/smaps")
        .map_err(|e| format!("read /proc/self/smaps: {e}"))?;
    let a = addr as usize;
    let mut inside = false;
    for line in text.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((lo, hi)) = range.split_once('-') {
                if let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                {
                    inside = lo <= a && a < hi;
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("AnonHugePages:") {
                return v
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| format!("bad smaps line {line:?}"));
            }
        }
    }
    Err(format!("no VMA holds {a:#x} in /proc/self/smaps"))
}
