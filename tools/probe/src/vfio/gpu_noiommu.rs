//! The VMM's own GPU-shaped test device (tools/gpu-test-device, passed into the lab guest over
//! vfio-user) bound to vfio-pci in no-IOMMU mode inside the guest (issue 16 item 3): its VRAM BAR
//! mmap'd through the device fd and every mechanism tried on it (CPU writes, and device writes
//! by its own DMA engine, RAM -> VRAM), then a probe buffer written by the device's DMA
//! (VRAM -> RAM) with every mechanism tried on that.
//!
//! With no IOMMU the device's DMA addresses are guest-physical: the buffer's pages are
//! populated and locked (mlock2) before the cells, so each has a physical address that stays
//! put, read from /proc/self/pagemap (root) right before the device is pointed at it. (The
//! userfaultfd MISSING and MINOR cells are registrations only on external memory, so populated
//! pages take nothing from them.) The VMM maps all guest RAM for the vfio-user device at IOVA = guest-physical,
//! so the device reaches it; its copy happens in the device process, through its own mapping of
//! guest RAM, which no page table of the guest sees: what a GPU's DMA is to a host.
//!
//! The setup is the administrator's: no-IOMMU mode (`vfio.enable_unsafe_noiommu_mode=1` on the
//! command line, or the module parameter), `driver_override` + bind to vfio-pci, then the group
//! node `/dev/vfio/noiommu-<N>` (noiommu.rs opens it; vfio-ioctls cannot). Each step prints a
//! line in the self-test's format (selftest::line) between [`BEGIN`] and [`END`]; the cells go
//! as one JSON line between [`CELLS_BEGIN`] and [`CELLS_END`].

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::noiommu::{self, NoIommuDevice};
use super::region;
use super::selftest::{line, Outcome};
use crate::external::{self, DeviceFailure, DeviceWriter, External};
use crate::kinds::SMALL;
use crate::predict::Row;
use crate::report::Cell;

pub const BEGIN: &str = "VMM-GPU-NOIOMMU-BEGIN";
pub const END: &str = "VMM-GPU-NOIOMMU-END";
pub const CELLS_BEGIN: &str = "VMM-GPU-NOIOMMU-CELLS-BEGIN";
pub const CELLS_END: &str = "VMM-GPU-NOIOMMU-CELLS-END";
/// The steps, in order (the lab test requires each).
pub const STEPS: [&str; 8] = [
    "gpu-find",
    "gpu-noiommu-mode",
    "gpu-bind-vfio-pci",
    "gpu-open-noiommu",
    "gpu-registers",
    "gpu-vram-bar",
    "gpu-dma-buffer",
    "gpu-dma-trackers",
];

// tools/gpu-test-device (its lib's `pci` and `regs`), restated: the probe is built static
// for the guest and does not link the device.
const VENDOR: &str = "0x1234";
const DEVICE: &str = "0x7e57";
const VRAM_BAR: u32 = 1;
const REG_ID: u64 = 0x000;
const ID_VALUE: u32 = 0x4750_5554;
const DMA_SRC_LO: u64 = 0x100;
const DMA_DST_LO: u64 = 0x108;
const DMA_LEN_LO: u64 = 0x110;
const DMA_DIR: u64 = 0x118;
const DIR_RAM_TO_VRAM: u32 = 0;
const DIR_VRAM_TO_RAM: u32 = 1;
const DMA_DOORBELL: u64 = 0x11c;
const DMA_STATUS: u64 = 0x120;
const DMA_COMPLETIONS: u64 = 0x124;
const DMA_ERRORS: u64 = 0x128;

/// Pages of VRAM and of the buffer the mechanisms are tried on.
const PAGES: usize = 64;
/// A device transfer not done by then is given up on (a failure, never a hang).
const DMA_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("{path}: {source}")]
    Sysfs {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    NoIommu(#[from] noiommu::NoIommuError),
    #[error(transparent)]
    Region(#[from] region::RegionError),
}

impl GpuError {
    fn errno(&self) -> Option<i32> {
        match self {
            GpuError::Sysfs { source, .. } => source.raw_os_error(),
            GpuError::NoIommu(e) => super::errno_of(e),
            GpuError::Region(e) => super::errno_of(e),
            GpuError::Setup(_) => None,
        }
    }

    fn outcome(&self) -> Outcome {
        match self.errno() {
            Some(errno) => Outcome::Refused {
                errno,
                what: super::chain(self),
            },
            None => Outcome::Failed(super::chain(self)),
        }
    }
}

fn read_trim(p: &Path) -> Result<String, GpuError> {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .map_err(|source| GpuError::Sysfs {
            path: p.to_path_buf(),
            source,
        })
}

fn write_sysfs(p: &Path, v: &str) -> Result<(), GpuError> {
    std::fs::write(p, v).map_err(|source| GpuError::Sysfs {
        path: p.to_path_buf(),
        source,
    })
}

/// The first PCI function with the test device's ids.
pub fn find(sys: &Path) -> Result<PathBuf, GpuError> {
    let bus = sys.join("bus/pci/devices");
    let entries = std::fs::read_dir(&bus).map_err(|source| GpuError::Sysfs {
        path: bus.clone(),
        source,
    })?;
    let mut names: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    names.sort();
    names
        .into_iter()
        .find(|d| {
            read_trim(&d.join("vendor")).is_ok_and(|v| v == VENDOR)
                && read_trim(&d.join("device")).is_ok_and(|v| v == DEVICE)
        })
        .ok_or_else(|| {
            GpuError::Setup(format!(
                "no PCI function {VENDOR}:{DEVICE} under {}",
                bus.display()
            ))
        })
}

/// Turns no-IOMMU mode on where it is off; says which it was.
fn noiommu_mode(sys: &Path) -> Result<String, GpuError> {
    let p = sys.join("module/vfio/parameters/enable_unsafe_noiommu_mode");
    let before = read_trim(&p)?;
    if before == "Y" {
        return Ok(format!("{} is Y (set on the command line)", p.display()));
    }
    write_sysfs(&p, "1")?;
    let after = read_trim(&p)?;
    if after != "Y" {
        return Err(GpuError::Setup(format!(
            "{} reads {after} after writing 1",
            p.display()
        )));
    }
    Ok(format!("{} was {before}, set to Y", p.display()))
}

fn driver_of(dev: &Path) -> Option<String> {
    std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|l| Some(l.file_name()?.to_str()?.to_string()))
}

/// driver_override + bind; returns the no-IOMMU group node.
fn bind(sys: &Path, dev: &Path) -> Result<(PathBuf, String), GpuError> {
    let bdf = dev
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| GpuError::Setup(format!("{}: no PCI address", dev.display())))?
        .to_string();
    let before = driver_of(dev);
    if before.as_deref() != Some("vfio-pci") {
        write_sysfs(&dev.join("driver_override"), "vfio-pci")?;
        if before.is_some() {
            write_sysfs(&dev.join("driver/unbind"), &bdf)?;
        }
        write_sysfs(&sys.join("bus/pci/drivers/vfio-pci/bind"), &bdf)?;
    }
    let now = driver_of(dev);
    if now.as_deref() != Some("vfio-pci") {
        return Err(GpuError::Setup(format!(
            "{bdf} is bound to {now:?} after the bind"
        )));
    }
    let group = std::fs::read_link(dev.join("iommu_group"))
        .ok()
        .and_then(|l| Some(l.file_name()?.to_str()?.to_string()))
        .ok_or_else(|| GpuError::Setup(format!("{bdf}: no iommu_group link after the bind")))?;
    let node = PathBuf::from(format!("/dev/vfio/noiommu-{group}"));
    Ok((
        node.clone(),
        format!(
            "{bdf} was bound to {}, now vfio-pci (driver_override); group {group}, node {}",
            before.as_deref().unwrap_or("no driver"),
            node.display()
        ),
    ))
}

/// BAR0's registers through the region (pread/pwrite on the device fd: vfio-pci does the MMIO).
struct Regs {
    fd: i32,
    off: u64,
}

impl Regs {
    fn read(&self, reg: u64) -> Result<u32, DeviceFailure> {
        let mut b = [0u8; 4];
        let o = libc::off_t::try_from(self.off + reg)
            .map_err(|_| fail(format!("register {reg:#x}")))?;
        // SAFETY: pread writes at most 4 bytes into `b`, which lives across the call.
        let n = unsafe { libc::pread(self.fd, b.as_mut_ptr().cast(), 4, o) };
        if n != 4 {
            return Err(sys_fail(format!("reading register {reg:#x}")));
        }
        Ok(u32::from_le_bytes(b))
    }

    fn write(&self, reg: u64, v: u32) -> Result<(), DeviceFailure> {
        let b = v.to_le_bytes();
        let o = libc::off_t::try_from(self.off + reg)
            .map_err(|_| fail(format!("register {reg:#x}")))?;
        // SAFETY: pwrite reads the 4 bytes of `b`, which lives across the call.
        let n = unsafe { libc::pwrite(self.fd, b.as_ptr().cast(), 4, o) };
        if n != 4 {
            return Err(sys_fail(format!("writing register {reg:#x}")));
        }
        Ok(())
    }

    fn write64(&self, lo: u64, v: u64) -> Result<(), DeviceFailure> {
        self.write(lo, v as u32)?;
        self.write(lo + 4, (v >> 32) as u32)
    }

    /// One transfer, waited for through the device's completion and error counters.
    fn dma(&self, src: u64, dst: u64, len: u64, dir: u32) -> Result<(), DeviceFailure> {
        let done = self.read(DMA_COMPLETIONS)?;
        let errs = self.read(DMA_ERRORS)?;
        self.write64(DMA_SRC_LO, src)?;
        self.write64(DMA_DST_LO, dst)?;
        self.write64(DMA_LEN_LO, len)?;
        self.write(DMA_DIR, dir)?;
        self.write(DMA_DOORBELL, 1)?;
        let start = Instant::now();
        loop {
            if self.read(DMA_COMPLETIONS)? != done {
                return Ok(());
            }
            if self.read(DMA_ERRORS)? != errs {
                let status = self.read(DMA_STATUS)?;
                return Err(DeviceFailure {
                    errno: None,
                    why: format!(
                        "DMA {src:#x} -> {dst:#x} ({len} bytes, dir {dir}) failed: status \
                         {status:#x} (0x10: an IOVA outside every DMA map)"
                    ),
                    faulted: true,
                });
            }
            if start.elapsed() > DMA_DEADLINE {
                return Err(fail(format!(
                    "DMA {src:#x} -> {dst:#x} not done after {} s",
                    DMA_DEADLINE.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn fail(why: String) -> DeviceFailure {
    DeviceFailure {
        errno: None,
        why,
        faulted: false,
    }
}

fn sys_fail(what: String) -> DeviceFailure {
    let e = std::io::Error::last_os_error();
    DeviceFailure {
        errno: e.raw_os_error(),
        why: format!("{what}: {e}"),
        faulted: false,
    }
}

/// The physical address of the page at `addr` (pagemap: bit 63 present, bits 0-54 the PFN;
/// root sees PFNs), or why there is none.
fn phys(pagemap: &std::fs::File, addr: usize) -> Result<u64, DeviceFailure> {
    let mut b = [0u8; 8];
    let off = (addr / SMALL * 8) as u64;
    std::os::unix::fs::FileExt::read_exact_at(pagemap, &mut b, off)
        .map_err(|e| fail(format!("pagemap of {addr:#x}: {e}")))?;
    let e = u64::from_le_bytes(b);
    if e >> 63 == 0 {
        return Err(fail(format!(
            "page {addr:#x} is not present: it has no physical address for the device to \
             write (pagemap {e:#x})"
        )));
    }
    let pfn = e & ((1 << 55) - 1);
    if pfn == 0 {
        return Err(fail(format!(
            "pagemap hides the PFN of {addr:#x} (not root?)"
        )));
    }
    Ok(pfn * SMALL as u64 + (addr % SMALL) as u64)
}

/// Locked anonymous pages (unmapped on drop).
struct Locked {
    addr: usize,
    len: usize,
}

impl Locked {
    fn new(len: usize, touch: bool) -> Result<Self, GpuError> {
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(GpuError::Setup(format!(
                "mmap: {}",
                std::io::Error::last_os_error()
            )));
        }
        let me = Locked {
            addr: p as usize,
            len,
        };
        // SAFETY: mlock2 on the mapping just made; MLOCK_ONFAULT locks pages as they fault in.
        let r = unsafe { libc::mlock2(p, len, libc::MLOCK_ONFAULT) };
        if r != 0 {
            return Err(GpuError::Setup(format!(
                "mlock2: {}",
                std::io::Error::last_os_error()
            )));
        }
        if touch {
            for i in 0..len / SMALL {
                // SAFETY: inside the mapping just made.
                unsafe { std::ptr::write_volatile((me.addr + i * SMALL) as *mut u64, 0) };
            }
        }
        Ok(me)
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: the mapping this struct made, unmapped once (munmap also unlocks it).
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// The device writing its own VRAM: its DMA engine copies 8 bytes from a locked staging page
/// of guest RAM (RAM -> VRAM) to the start of each page. No page table of the probe's BAR
/// mapping is touched.
struct VramWriter<'a> {
    regs: &'a Regs,
    pagemap: &'a std::fs::File,
    staging: &'a Locked,
    /// VRAM offset of the probed mapping's start.
    vram_off: u64,
    base: usize,
}

impl DeviceWriter for VramWriter<'_> {
    fn name(&self) -> String {
        "the device's DMA engine, RAM -> VRAM".into()
    }

    fn write_pages(
        &mut self,
        addr: usize,
        pages: &[usize],
        value: u64,
    ) -> Result<(), DeviceFailure> {
        // SAFETY: the staging page is mapped and locked for the writer's life.
        unsafe { std::ptr::write_volatile(self.staging.addr as *mut u64, value) };
        let src = phys(self.pagemap, self.staging.addr)?;
        for &p in pages {
            let dst = self.vram_off + (addr - self.base + p * SMALL) as u64;
            self.regs.dma(src, dst, 8, DIR_RAM_TO_VRAM)?;
        }
        Ok(())
    }
}

/// The device writing the probe's buffer: 8 bytes from a VRAM scratch page (stored there by
/// the CPU through the BAR mapping) to each page's physical address (VRAM -> RAM).
struct DmaWriter<'a> {
    regs: &'a Regs,
    pagemap: &'a std::fs::File,
    scratch: usize,
    scratch_off: u64,
}

impl DeviceWriter for DmaWriter<'_> {
    fn name(&self) -> String {
        "the device's DMA engine, VRAM -> RAM at the pages' physical addresses (no IOMMU)".into()
    }

    fn write_pages(
        &mut self,
        addr: usize,
        pages: &[usize],
        value: u64,
    ) -> Result<(), DeviceFailure> {
        // SAFETY: the scratch word lies in the live VRAM mapping, outside the probed range.
        unsafe { std::ptr::write_volatile(self.scratch as *mut u64, value) };
        for &p in pages {
            let dst = phys(self.pagemap, addr + p * SMALL)?;
            self.regs.dma(self.scratch_off, dst, 8, DIR_VRAM_TO_RAM)?;
        }
        Ok(())
    }
}

/// What the run found: step lines and cells.
pub struct Findings {
    pub lines: Vec<String>,
    pub cells: Vec<Cell>,
}

struct Steps {
    lines: Vec<String>,
}

impl Steps {
    fn step<T>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> Result<(T, String), GpuError>,
    ) -> Option<T> {
        let (v, o) = match f() {
            Ok((v, ev)) => (Some(v), Outcome::Ok(ev)),
            Err(e) => (None, e.outcome()),
        };
        self.lines.push(line(name, &o));
        v
    }

    fn skip_rest(&mut self, from: &str, why: &str) {
        let i = STEPS.iter().position(|s| *s == from).unwrap_or(STEPS.len());
        for s in &STEPS[i..] {
            self.lines.push(line(s, &Outcome::Skipped(why.to_string())));
        }
    }
}

/// Every step on the first test device under `sys`.
pub fn run(sys: &Path) -> Findings {
    let mut s = Steps { lines: Vec::new() };
    let mut cells = Vec::new();
    let found = s.step("gpu-find", || {
        let d = find(sys)?;
        let ev = format!("{} ({VENDOR}:{DEVICE})", d.display());
        Ok((d, ev))
    });
    let Some(dev) = found else {
        s.skip_rest("gpu-noiommu-mode", "no test device");
        return Findings {
            lines: s.lines,
            cells,
        };
    };
    if s.step("gpu-noiommu-mode", || Ok(((), noiommu_mode(sys)?)))
        .is_none()
    {
        s.skip_rest("gpu-bind-vfio-pci", "no-IOMMU mode is off");
        return Findings {
            lines: s.lines,
            cells,
        };
    }
    let Some(node) = s.step("gpu-bind-vfio-pci", || bind(sys, &dev)) else {
        s.skip_rest("gpu-open-noiommu", "not bound to vfio-pci");
        return Findings {
            lines: s.lines,
            cells,
        };
    };
    let bdf = dev
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let Some(opened) = s.step("gpu-open-noiommu", || {
        let d = noiommu::open(Path::new("/dev/vfio"), &node, &bdf)?;
        let ev = format!(
            "{} opened through {} in a container set to VFIO_NOIOMMU_IOMMU (raw ioctls)",
            bdf, d.group
        );
        Ok((d, ev))
    }) else {
        s.skip_rest("gpu-registers", "the device was not opened");
        return Findings {
            lines: s.lines,
            cells,
        };
    };
    let Some(regs) = s.step("gpu-registers", || registers(&opened)) else {
        s.skip_rest("gpu-vram-bar", "BAR0's registers do not answer");
        return Findings {
            lines: s.lines,
            cells,
        };
    };
    let pagemap = match std::fs::File::open("/proc/self/pagemap") {
        Ok(f) => f,
        Err(e) => {
            s.skip_rest("gpu-vram-bar", &format!("/proc/self/pagemap: {e}"));
            return Findings {
                lines: s.lines,
                cells,
            };
        }
    };
    let Some(map) = s.step("gpu-vram-bar", || {
        let (map, c, ev) = vram(&opened, &regs, &pagemap)?;
        cells.extend(c);
        Ok((map, ev))
    }) else {
        s.skip_rest("gpu-dma-buffer", "the VRAM BAR was not mapped");
        return Findings {
            lines: s.lines,
            cells,
        };
    };
    s.step("gpu-dma-buffer", || {
        let (c, ev) = dma_buffer(&regs, &pagemap, &map)?;
        cells.extend(c);
        Ok(((), ev))
    });
    // The DMA-side trackers' answers are the evidence, refusals included (the cells above are
    // the CPU-side mechanisms'; Mechanism::ALL has no cell for these on external memory).
    s.step("gpu-dma-trackers", || Ok(((), opened.dma_trackers())));
    Findings {
        lines: s.lines,
        cells,
    }
}

fn registers(d: &NoIommuDevice) -> Result<(Regs, String), GpuError> {
    let r0 = region::info(d, 0)?;
    let regs = Regs {
        fd: d.as_raw_fd(),
        off: r0.offset,
    };
    let id = regs.read(REG_ID).map_err(|e| GpuError::Setup(e.why))?;
    if id != ID_VALUE {
        return Err(GpuError::Setup(format!(
            "ID reads {id:#x}, the device's is {ID_VALUE:#x}"
        )));
    }
    Ok((
        regs,
        format!(
            "BAR0 ({} bytes) ID {id:#x} (\"GPUT\") read through the region",
            r0.size
        ),
    ))
}

/// The VRAM BAR mapped (the probed pages and a scratch page after them) and its cells.
fn vram(
    d: &NoIommuDevice,
    regs: &Regs,
    pagemap: &std::fs::File,
) -> Result<(region::RegionMap, Vec<Cell>, String), GpuError> {
    let r = region::info(d, VRAM_BAR)?;
    let len = (PAGES + 1) * SMALL;
    if (r.size as usize) < len {
        return Err(GpuError::Setup(format!(
            "VRAM BAR is {} bytes, under {len}",
            r.size
        )));
    }
    let map = region::RegionMap::new(d, r.offset, len, true)?;
    let staging = Locked::new(SMALL, true)?;
    let mut w = VramWriter {
        regs,
        pagemap,
        staging: &staging,
        vram_off: 0,
        base: map.addr,
    };
    let cells = external::probe(&mut External {
        memory: "gpu-test-device VRAM BAR1 (vfio-pci, no-IOMMU)".into(),
        row: Row::VfioBar,
        addr: map.addr,
        len: PAGES * SMALL,
        cpu_access: true,
        cpu_writes: true,
        device: Some(&mut w),
    });
    let ev = format!(
        "VRAM BAR1 {} bytes at device-fd offset {:#x}: the first {PAGES} pages mmap'd \
         MAP_SHARED read/write and probed ({} cells); device writes by its DMA engine from a \
         locked staging page",
        r.size,
        r.offset,
        cells.len()
    );
    Ok((map, cells, ev))
}

/// A locked buffer written by the device's DMA at its physical addresses, and its cells.
fn dma_buffer(
    regs: &Regs,
    pagemap: &std::fs::File,
    map: &region::RegionMap,
) -> Result<(Vec<Cell>, String), GpuError> {
    let buf = Locked::new(PAGES * SMALL, true)?;
    let mut w = DmaWriter {
        regs,
        pagemap,
        scratch: map.addr + PAGES * SMALL,
        scratch_off: (PAGES * SMALL) as u64,
    };
    let cells = external::probe(&mut External {
        memory: "anonymous 4 KiB, mlocked, device DMA target (no-IOMMU)".into(),
        row: Row::PinnedHost,
        addr: buf.addr,
        len: buf.len,
        cpu_access: true,
        cpu_writes: true,
        device: Some(&mut w),
    });
    let ev = format!(
        "{PAGES} pages at {:#x}, populated and locked; the device DMAs 8 bytes from a VRAM \
         scratch page to each written page's physical address (pagemap, read right before) \
         ({} cells)",
        buf.addr,
        cells.len()
    );
    Ok((cells, ev))
}

/// Runs, prints the lines and the cells framed on `out`; returns the findings.
pub fn emit(sys: &Path, out: &mut impl Write) -> Findings {
    let f = run(sys);
    let _ = writeln!(out, "{BEGIN}");
    for l in &f.lines {
        let _ = writeln!(out, "{l}");
    }
    let _ = writeln!(out, "{END}");
    let _ = writeln!(out, "{CELLS_BEGIN}");
    let _ = writeln!(
        out,
        "{}",
        serde_json::to_string(&f.cells).unwrap_or_else(|e| format!("[] (unserializable: {e})"))
    );
    let _ = writeln!(out, "{CELLS_END}");
    let _ = out.flush();
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_device_every_step_after_find_is_skipped_naming_why() {
        let dir = std::env::temp_dir().join(format!("vmm-probe-gpu-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bus/pci/devices/0000:00:01.0")).unwrap();
        std::fs::write(dir.join("bus/pci/devices/0000:00:01.0/vendor"), "0x8086\n").unwrap();
        std::fs::write(dir.join("bus/pci/devices/0000:00:01.0/device"), "0x1237\n").unwrap();
        let f = run(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        let steps: Vec<_> = f
            .lines
            .iter()
            .filter_map(|l| super::super::selftest::parse(l))
            .collect();
        let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, STEPS);
        assert_eq!(steps[0].outcome, "failed", "{:?}", steps[0]);
        assert!(steps[0].detail.contains("no PCI function 0x1234:0x7e57"));
        assert!(steps[1..].iter().all(|s| s.outcome == "skipped"));
        assert!(f.cells.is_empty());
    }

    #[test]
    fn a_page_the_probe_never_touched_has_no_physical_address_for_the_device() {
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        let fresh = Locked::new(2 * SMALL, false);
        let Ok(fresh) = fresh else {
            eprintln!("skipped: mlock2 refused here");
            return;
        };
        let absent = phys(&pagemap, fresh.addr);
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_volatile((fresh.addr + SMALL) as *mut u64, 1) };
        let present = phys(&pagemap, fresh.addr + SMALL);
        assert!(absent.unwrap_err().why.contains("not present"));
        // Root reads the PFN; others see it zeroed, which is refused rather than used.
        match present {
            Ok(pa) => assert_eq!(pa % SMALL as u64, 0),
            Err(e) => assert!(e.why.contains("hides the PFN"), "{}", e.why),
        }
    }
}
