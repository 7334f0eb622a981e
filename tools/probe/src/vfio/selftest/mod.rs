//! `vmm-probe --vfio-selftest` (and the lab guest's init, before the probe): the VMM's kernel-VFIO
//! transport (`devices::vfio::open` + `KernelTransport`, the code `vmm run --device vfio:` uses)
//! driven against the kernel's sample mediated device `mtty` (samples/vfio-mdev/mtty.c, built into
//! the lab kernel). mtty needs no hardware and no IOMMU: its group is emulated, so the type1
//! container and DMA map work, and it implements VFIO migration v2 (STOP_COPY and PRE_COPY) and
//! the DMA-logging callbacks (which log nothing: mtty does no DMA; the report also needs the
//! kernel's iova_bitmap, built only with CONFIG_IOMMUFD_DRIVER).
//!
//! Each step prints one line, `VFIO-STEP <name>: ok | <evidence>`, `... refused errno=<n> (<NAME>)
//! | <what>` (the kernel said no), `... failed | <why>` (no errno: a check on the data failed) or
//! `... skipped | <why>` (an earlier step it needs did not succeed). The lines are framed between
//! [`BEGIN`] and [`END`] on the console; tools/probe/tests/lab_guest.rs parses them.

use std::error::Error;
use std::io::Write;
use std::path::{Path, PathBuf};

use devices::vfio::open::{self, Access};
use devices::vfio::passthrough::transport::{
    DeviceMigration, DmaRegion, MigState, VfioTransport, CONFIG_REGION, MSI_IRQ,
};
use devices::vfio::passthrough::KernelTransport;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{chain, errno_of};
use crate::report::errno_name;

pub const BEGIN: &str = "VMM-VFIO-SELFTEST-BEGIN";
pub const END: &str = "VMM-VFIO-SELFTEST-END";
/// The prefix of every step line.
pub const STEP: &str = "VFIO-STEP ";

/// The mdev type: one serial port (BAR0, 8 I/O registers).
const MTTY_TYPE: &str = "mtty-1";
/// Fixed instance names: the lab guest boots fresh each time; elsewhere a leftover instance of
/// the same name is removed first.
const UUID_SRC: &str = "0c9e5a1e-16b0-4a7c-9d1e-000000000001";
const UUID_DST: &str = "0c9e5a1e-16b0-4a7c-9d1e-000000000002";

const BAR0: u32 = 0;
const INTX_IRQ: u32 = 0;
// 8250 register offsets in mtty's BAR0 (include/uapi/linux/serial_reg.h).
const UART_RX_TX: u64 = 0;
const UART_IER: u64 = 1;
const UART_FCR: u64 = 2;
const UART_LCR: u64 = 3;
const UART_LSR: u64 = 5;
const UART_SCR: u64 = 7;
const UART_IER_THRI: u8 = 0x02;
/// FIFO on, both FIFOs cleared.
const UART_FCR_ON_CLEAR: u8 = 0x07;
const UART_LSR_DR: u8 = 0x01;

/// The DMA buffer: at this IOVA, this big.
const DMA_IOVA: u64 = 0x10_0000;
const DMA_LEN: u64 = 2 << 20;

type BoxError = Box<dyn Error + Send + Sync + 'static>;

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok(String),
    Refused { errno: i32, what: String },
    Failed(String),
    Skipped(String),
}

impl Outcome {
    fn of(r: Result<String, BoxError>) -> Self {
        match r {
            Ok(evidence) => Outcome::Ok(evidence),
            Err(e) => match errno_of(e.as_ref()) {
                Some(errno) => Outcome::Refused {
                    errno,
                    what: chain(e.as_ref()),
                },
                None => Outcome::Failed(chain(e.as_ref())),
            },
        }
    }
}

/// One step's line as the guest prints it.
pub fn line(name: &str, outcome: &Outcome) -> String {
    let one_line = |s: &str| s.replace('\n', " ");
    match outcome {
        Outcome::Ok(ev) => format!("{STEP}{name}: ok | {}", one_line(ev)),
        Outcome::Refused { errno, what } => format!(
            "{STEP}{name}: refused errno={errno} ({}) | {}",
            errno_name(*errno),
            one_line(what)
        ),
        Outcome::Failed(why) => format!("{STEP}{name}: failed | {}", one_line(why)),
        Outcome::Skipped(why) => format!("{STEP}{name}: skipped | {}", one_line(why)),
    }
}

/// A parsed step line: its name, its outcome word (`ok`, `refused`, `failed`, `skipped`), the
/// errno of a refusal, and the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedStep {
    pub name: String,
    pub outcome: String,
    pub errno: Option<i32>,
    pub detail: String,
}

/// Parses a line [`line`] printed; `None` for any other line.
pub fn parse(l: &str) -> Option<ParsedStep> {
    let rest = l.trim_end_matches('\r').strip_prefix(STEP)?;
    let (name, rest) = rest.split_once(": ")?;
    let (head, detail) = rest.split_once(" | ").unwrap_or((rest, ""));
    let mut words = head.split_whitespace();
    let outcome = words.next()?.to_string();
    let errno = words
        .next()
        .and_then(|w| w.strip_prefix("errno="))
        .and_then(|n| n.parse().ok());
    Some(ParsedStep {
        name: name.to_string(),
        outcome,
        errno,
        detail: detail.to_string(),
    })
}

struct Printer<'a, W: Write> {
    out: &'a mut W,
}

impl<W: Write> Printer<'_, W> {
    /// Runs a step, prints its line, returns its value when it succeeded.
    fn step<T>(
        &mut self,
        name: &str,
        f: impl FnOnce() -> Result<(T, String), BoxError>,
    ) -> Option<T> {
        let (value, outcome) = match f() {
            Ok((v, ev)) => (Some(v), Outcome::Ok(ev)),
            Err(e) => (None, Outcome::of(Err(e))),
        };
        self.print(name, &outcome);
        value
    }

    fn skip(&mut self, name: &str, why: &str) {
        self.print(name, &Outcome::Skipped(why.to_string()));
    }

    fn print(&mut self, name: &str, outcome: &Outcome) {
        let _ = writeln!(self.out, "{}", line(name, outcome));
        let _ = self.out.flush();
    }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), BoxError> {
    if ok {
        Ok(())
    } else {
        Err(what().into())
    }
}

/// The mdev type directory of `ty` under any parent of /sys/class/mdev_bus.
fn find_type(sys: &Path, ty: &str) -> Result<PathBuf, BoxError> {
    let bus = sys.join("class/mdev_bus");
    let parents =
        std::fs::read_dir(&bus).map_err(|e| Box::new(PathError(bus.clone(), e)) as BoxError)?;
    for p in parents.flatten() {
        let dir = p.path().join("mdev_supported_types").join(ty);
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    Err(format!("no mdev type {ty} under {}", bus.display()).into())
}

fn read_trim(p: &Path) -> Result<String, BoxError> {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .map_err(|e| Box::new(PathError(p.to_path_buf(), e)) as BoxError)
}

fn write_sysfs(p: &Path, what: &str) -> Result<(), BoxError> {
    std::fs::write(p, what).map_err(|e| Box::new(PathError(p.to_path_buf(), e)) as BoxError)
}

/// An I/O error with the file it happened on (the errno stays reachable as its source).
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.display())]
struct PathError(PathBuf, #[source] std::io::Error);

/// Creates instance `uuid` of the type at `ty`; returns its sysfs directory and IOMMU group.
fn create(sys: &Path, ty: &Path, uuid: &str) -> Result<(PathBuf, u32), BoxError> {
    let dev = sys.join("bus/mdev/devices").join(uuid);
    if dev.exists() {
        write_sysfs(&dev.join("remove"), "1")?;
    }
    write_sysfs(&ty.join("create"), uuid)?;
    let link = std::fs::read_link(dev.join("iommu_group"))
        .map_err(|e| Box::new(PathError(dev.join("iommu_group"), e)) as BoxError)?;
    let group = link
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| {
            format!(
                "{}: unreadable group link {}",
                dev.display(),
                link.display()
            )
        })?;
    Ok((dev, group))
}

fn open_group(dev: &Path, group: u32) -> Result<(KernelTransport, String), BoxError> {
    let access = Access::Group {
        node: PathBuf::from(format!("/dev/vfio/{group}")),
        id: group,
    };
    let opened = open::open(dev, &access, Path::new("/dev"))?;
    let how = opened.describe();
    Ok((KernelTransport::new(opened)?, how))
}

fn read_reg(t: &mut KernelTransport, reg: u64) -> Result<u8, BoxError> {
    // mtty's registers are bytes: a wider access reaches only its first byte.
    let mut b = [0u8; 1];
    t.region_read(BAR0, reg, &mut b)?;
    Ok(b[0])
}

fn write_reg(t: &mut KernelTransport, reg: u64, v: u8) -> Result<(), BoxError> {
    t.region_write(BAR0, reg, &[v])?;
    Ok(())
}

/// Whether the eventfd was signalled (reading it clears it).
fn fired(fd: &EventFd) -> Result<Option<u64>, BoxError> {
    match fd.read() {
        Ok(n) => Ok(Some(n)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The serial-port state written on the source and checked on the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortState {
    lcr: u8,
    scr: u8,
    /// Bytes in mtty's loopback FIFO (written to TX, read back from RX).
    fifo: [u8; 3],
}

fn put_state(t: &mut KernelTransport, s: &PortState) -> Result<(), BoxError> {
    write_reg(t, UART_FCR, UART_FCR_ON_CLEAR)?;
    write_reg(t, UART_LCR, s.lcr)?;
    write_reg(t, UART_SCR, s.scr)?;
    for b in s.fifo {
        write_reg(t, UART_RX_TX, b)?;
    }
    Ok(())
}

/// Reads the state back (draining the FIFO).
fn take_state(t: &mut KernelTransport) -> Result<(PortState, u8), BoxError> {
    let lcr = read_reg(t, UART_LCR)?;
    let scr = read_reg(t, UART_SCR)?;
    let lsr = read_reg(t, UART_LSR)?;
    let mut fifo = [0u8; 3];
    for b in &mut fifo {
        *b = read_reg(t, UART_RX_TX)?;
    }
    Ok((PortState { lcr, scr, fifo }, lsr))
}

/// Drains the migration data fd.
fn read_all(t: &mut KernelTransport) -> Result<Vec<u8>, BoxError> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = t.migration_read(&mut buf)?;
        data.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            return Ok(data);
        }
    }
}

/// Loads `data` into `dst` (RESUMING, then STOP loads it, then RUNNING) and checks that the
/// port reads back as `want`.
fn resume_and_check(
    dst: &mut KernelTransport,
    data: &[u8],
    want: &PortState,
) -> Result<String, BoxError> {
    dst.set_migration_state(MigState::Resuming)?;
    dst.migration_write(data)?;
    dst.set_migration_state(MigState::Stop)?;
    dst.set_migration_state(MigState::Running)?;
    let (got, lsr) = take_state(dst)?;
    check(got == *want, || {
        format!("destination reads {got:x?}, the source had {want:x?}")
    })?;
    check(lsr & UART_LSR_DR != 0, || {
        format!("destination LSR {lsr:#x} has no data ready")
    })?;
    Ok(format!(
        "destination reads LCR {:#04x} SCR {:#04x} FIFO {:?} (LSR {lsr:#04x} before draining)",
        got.lcr,
        got.scr,
        String::from_utf8_lossy(&got.fifo)
    ))
}

/// Anonymous memory for the DMA steps, unmapped on drop.
struct Buffer {
    addr: *mut libc::c_void,
    len: usize,
}

impl Buffer {
    fn new(len: usize) -> Result<Self, BoxError> {
        // SAFETY: a fresh private anonymous mapping; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Self { addr, len })
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: the mapping this struct made, unmapped once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Maps and unmaps `buf` through the transport's container or IOAS.
fn dma_map_unmap(t: &mut KernelTransport, buf: &Buffer) -> Result<((), String), BoxError> {
    let region = DmaRegion {
        iova: DMA_IOVA,
        size: DMA_LEN,
        host_addr: buf.addr as usize,
        file: None,
    };
    // SAFETY: `buf` stays mapped until after the unmap below (it outlives this call).
    unsafe { t.dma_map(&region)? };
    t.dma_unmap(DMA_IOVA, DMA_LEN)?;
    Ok((
        (),
        format!(
            "{} KiB at IOVA {DMA_IOVA:#x} mapped and unmapped",
            DMA_LEN >> 10
        ),
    ))
}

/// Runs every step against two fresh mtty instances under `sys` (normally /sys), printing a line
/// per step between [`BEGIN`] and [`END`]. Returns how many steps failed or were refused.
pub fn run(sys: &Path, out: &mut impl Write) -> usize {
    let _ = writeln!(out, "{BEGIN}");
    let mut lines = Vec::new();
    {
        let mut tee = Tee {
            out: &mut *out,
            lines: &mut lines,
        };
        let mut p = Printer { out: &mut tee };
        steps(sys, &mut p);
    }
    let _ = writeln!(out, "{END}");
    let _ = out.flush();
    lines
        .iter()
        .filter_map(|l| parse(l))
        .filter(|s| s.outcome == "failed" || s.outcome == "refused")
        .count()
}

/// Writes through, keeping the lines for the count.
struct Tee<'a, W: Write> {
    out: &'a mut W,
    lines: &'a mut Vec<String>,
}

impl<W: Write> Write for Tee<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let s = String::from_utf8_lossy(buf);
        self.lines.extend(s.lines().map(str::to_string));
        self.out.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

fn steps<W: Write>(sys: &Path, p: &mut Printer<'_, W>) {
    let Some(ty) = p.step("mdev-type", || {
        let ty = find_type(sys, MTTY_TYPE)?;
        let avail = read_trim(&ty.join("available_instances"))?;
        let ev = format!("{} (available_instances {avail})", ty.display());
        Ok((ty, ev))
    }) else {
        return;
    };
    let Some((src_dev, src_group)) = p.step("mdev-create", || {
        let (dev, group) = create(sys, &ty, UUID_SRC)?;
        let (dst, dst_group) = create(sys, &ty, UUID_DST)?;
        let ev = format!(
            "{} (group {group}) and {} (group {dst_group})",
            dev.display(),
            dst.display()
        );
        Ok(((dev, group), ev))
    }) else {
        return;
    };
    let dst_dev = sys.join("bus/mdev/devices").join(UUID_DST);

    group_steps(p, &src_dev, src_group, &dst_dev);
    cdev_steps(p, &src_dev);

    p.step("mdev-remove", || {
        for uuid in [UUID_SRC, UUID_DST] {
            write_sysfs(&sys.join("bus/mdev/devices").join(uuid).join("remove"), "1")?;
        }
        Ok(((), "both instances removed".to_string()))
    });
    // Bad input: an instance removed through sysfs while held (vanish.rs).
    p.step("mdev-vanish", || {
        super::vanish::run(sys)
            .map(|ev| ((), ev))
            .map_err(|e| Box::new(e) as BoxError)
    });
}

fn group_steps<W: Write>(p: &mut Printer<'_, W>, src_dev: &Path, group: u32, dst_dev: &Path) {
    const NEEDS: &str = "the source was not opened through its group";
    let Some(mut t) = p.step("open-group", || {
        let (t, how) = open_group(src_dev, group)?;
        Ok((t, how))
    }) else {
        for s in [
            "device-info",
            "region-info",
            "config-read",
            "bar-rw",
            "reset",
            "irq-intx",
            "irq-msi",
            "dma-map-type1",
            "migration-caps",
            "migration-precopy",
            "migration-stop-copy",
            "dma-logging-start",
            "dma-logging-report",
            "dma-logging-stop",
        ] {
            p.skip(s, NEEDS);
        }
        return;
    };
    p.step("device-info", || {
        let i = t.device_info();
        Ok((
            (),
            format!(
                "{} regions, {} IRQ indexes, reset flag {}",
                i.regions, i.irqs, i.resettable
            ),
        ))
    });
    p.step("region-info", || {
        let cfg = t.region_info(CONFIG_REGION)?;
        let bar0 = t.region_info(BAR0)?;
        // mtty's config region is 255 bytes (MTTY_CONFIG_SPACE_SIZE 0xff): a PCI header fits.
        check(cfg.size >= 64 && bar0.size == 8, || {
            format!("config {} bytes, BAR0 {} bytes", cfg.size, bar0.size)
        })?;
        Ok((
            (),
            format!(
                "config {} bytes (r {} w {}), BAR0 {} bytes (r {} w {}, mmap areas {})",
                cfg.size,
                cfg.readable,
                cfg.writable,
                bar0.size,
                bar0.readable,
                bar0.writable,
                bar0.mmap_areas.len()
            ),
        ))
    });
    p.step("config-read", || {
        let mut ids = [0u8; 4];
        t.config_read(0, &mut ids)?;
        let (vendor, device) = (
            u16::from_le_bytes([ids[0], ids[1]]),
            u16::from_le_bytes([ids[2], ids[3]]),
        );
        // mtty_create_config_space: vendor 0x4348, device 0x3253.
        check(vendor == 0x4348 && device == 0x3253, || {
            format!("ids {vendor:04x}:{device:04x}, mtty's are 4348:3253")
        })?;
        Ok(((), format!("vendor:device {vendor:04x}:{device:04x}")))
    });
    p.step("bar-rw", || {
        write_reg(&mut t, UART_SCR, 0x5a)?;
        let got = read_reg(&mut t, UART_SCR)?;
        check(got == 0x5a, || {
            format!("SCR reads {got:#x} after writing 0x5a")
        })?;
        Ok((
            (),
            "BAR0 scratch register wrote 0x5a, read 0x5a".to_string(),
        ))
    });
    p.step("reset", || {
        t.reset()?;
        let state = t.migration_state()?;
        Ok((
            (),
            format!("VFIO_DEVICE_RESET returned 0; migration state after it {state:?}"),
        ))
    });
    p.step("irq-intx", || irq(&mut t, INTX_IRQ));
    p.step("irq-msi", || irq(&mut t, MSI_IRQ));
    p.step("dma-map-type1", || {
        let buf = Buffer::new(DMA_LEN as usize)?;
        dma_map_unmap(&mut t, &buf)
    });

    let caps = p.step("migration-caps", || {
        let caps = t
            .migration_caps()?
            .ok_or("the device has no migration support (VFIO_DEVICE_FEATURE_MIGRATION)")?;
        let size = t.migration_data_size()?;
        Ok((caps, format!("{caps:?}; stop-copy size estimate {size:?}")))
    });
    match (caps, open_group(dst_dev, group_of(dst_dev))) {
        (Some(caps), Ok((mut dst, _))) => {
            if caps.pre_copy {
                p.step("migration-precopy", || precopy(&mut t, &mut dst));
            } else {
                p.skip("migration-precopy", "the device does not offer PRE_COPY");
            }
            p.step("migration-stop-copy", || stop_copy(&mut t, &mut dst));
        }
        (None, _) => {
            for s in ["migration-precopy", "migration-stop-copy"] {
                p.skip(s, "no migration capabilities");
            }
        }
        (_, Err(e)) => {
            let o = Outcome::of(Err(e));
            for s in ["migration-precopy", "migration-stop-copy"] {
                p.print(s, &o);
            }
        }
    }
    dma_logging(p, &mut t);
}

fn group_of(dev: &Path) -> u32 {
    std::fs::read_link(dev.join("iommu_group"))
        .ok()
        .and_then(|l| l.file_name()?.to_str()?.parse().ok())
        .unwrap_or(u32::MAX)
}

fn irq(t: &mut KernelTransport, index: u32) -> Result<((), String), BoxError> {
    let info = t.irq_info(index)?;
    check(info.count >= 1, || {
        format!("IRQ index {index} has no vectors")
    })?;
    let fd = EventFd::new(EFD_NONBLOCK)?;
    t.enable_irqs(index, &[&fd])?;
    // IER with THRI while the loopback FIFO is empty: mtty raises the interrupt at once.
    write_reg(t, UART_FCR, UART_FCR_ON_CLEAR)?;
    write_reg(t, UART_IER, 0)?;
    write_reg(t, UART_IER, UART_IER_THRI)?;
    let count = fired(&fd)?;
    write_reg(t, UART_IER, 0)?;
    t.disable_irqs(index)?;
    let count = count.ok_or("the eventfd was not signalled after IER THRI was set")?;
    Ok((
        (),
        format!(
            "index {index}: {} vector(s), flags {:#x}; eventfd signalled (count {count}) on IER THRI; disabled",
            info.count, info.flags
        ),
    ))
}

fn precopy(src: &mut KernelTransport, dst: &mut KernelTransport) -> Result<((), String), BoxError> {
    let want = PortState {
        lcr: 0x1b,
        scr: 0xc3,
        fifo: *b"pre",
    };
    put_state(src, &want)?;
    src.set_migration_state(MigState::PreCopy)?;
    let first = src.precopy_info()?.ok_or("no VFIO_MIG_GET_PRECOPY_INFO")?;
    let mut data = read_all(src)?;
    let after = src.precopy_info()?.ok_or("no VFIO_MIG_GET_PRECOPY_INFO")?;
    check(
        first.initial_bytes == data.len() as u64 && after.initial_bytes == 0,
        || {
            format!(
                "precopy_info said {first:?}, {} bytes read, then {after:?}",
                data.len()
            )
        },
    )?;
    let precopied = data.len();
    src.set_migration_state(MigState::StopCopy)?;
    data.extend(read_all(src)?);
    src.set_migration_state(MigState::Stop)?;
    let checked = resume_and_check(dst, &data, &want)?;
    // Back to RUNNING for the next steps (STOP -> RUNNING drops the data fd).
    src.set_migration_state(MigState::Running)?;
    Ok((
        (),
        format!(
            "PRE_COPY: precopy_info initial {} dirty {}, read {precopied} bytes, then initial {} dirty {}; \
             STOP_COPY: {} more bytes; {checked}",
            first.initial_bytes,
            first.dirty_bytes,
            after.initial_bytes,
            after.dirty_bytes,
            data.len() - precopied
        ),
    ))
}

fn stop_copy(
    src: &mut KernelTransport,
    dst: &mut KernelTransport,
) -> Result<((), String), BoxError> {
    let want = PortState {
        lcr: 0x03,
        scr: 0x3c,
        fifo: *b"vmm",
    };
    put_state(src, &want)?;
    // RUNNING -> STOP_COPY: the kernel walks through STOP.
    src.set_migration_state(MigState::StopCopy)?;
    let data = read_all(src)?;
    src.set_migration_state(MigState::Stop)?;
    let state = src.migration_state()?;
    // The destination ran since the precopy step: RESUMING starts afresh from RUNNING.
    let checked = resume_and_check(dst, &data, &want)?;
    src.set_migration_state(MigState::Running)?;
    Ok((
        (),
        format!(
            "{} bytes read in STOP_COPY, source then {state:?}; {checked}",
            data.len()
        ),
    ))
}

/// DMA logging over a DMA-mapped buffer: start, report, stop, one line each (a kernel without
/// CONFIG_IOMMUFD_DRIVER starts and stops but refuses the report: its iova_bitmap is a stub
/// answering EOPNOTSUPP).
fn dma_logging<W: Write>(p: &mut Printer<'_, W>, t: &mut KernelTransport) {
    const STEPS: [&str; 3] = [
        "dma-logging-start",
        "dma-logging-report",
        "dma-logging-stop",
    ];
    let buf = match Buffer::new(DMA_LEN as usize) {
        Ok(b) => b,
        Err(e) => {
            let o = Outcome::of(Err(e));
            for s in STEPS {
                p.print(s, &o);
            }
            return;
        }
    };
    let region = DmaRegion {
        iova: DMA_IOVA,
        size: DMA_LEN,
        host_addr: buf.addr as usize,
        file: None,
    };
    // SAFETY: `buf` outlives the mapping (unmapped below, before it drops).
    if let Err(e) = unsafe { t.dma_map(&region) } {
        let o = Outcome::of(Err(e.into()));
        for s in STEPS {
            p.print(s, &o);
        }
        return;
    }
    let page = p.step(STEPS[0], || {
        check(t.dma_logging_supported()?, || {
            "the DMA_LOGGING_START probe says unsupported".to_string()
        })?;
        let page = t.dma_logging_start(4096, &[(DMA_IOVA, DMA_LEN)])?;
        Ok((
            page,
            format!(
                "probe ok; started over {} KiB at IOVA {DMA_IOVA:#x}, page size {page}",
                DMA_LEN >> 10
            ),
        ))
    });
    match page {
        Some(page) => {
            p.step(STEPS[1], || {
                let bits = t.dma_logging_report(DMA_IOVA, DMA_LEN, page)?;
                let dirty: u32 = bits.iter().map(|w| w.count_ones()).sum();
                Ok((
                    (),
                    format!(
                        "{} pages reported, {dirty} dirty (mtty does no DMA)",
                        DMA_LEN / page.max(1)
                    ),
                ))
            });
            p.step(STEPS[2], || {
                t.dma_logging_stop()?;
                Ok(((), "stopped".to_string()))
            });
        }
        None => {
            for s in &STEPS[1..] {
                p.skip(s, "DMA logging did not start");
            }
        }
    }
    if let Err(e) = t.dma_unmap(DMA_IOVA, DMA_LEN) {
        p.print("dma-logging-unmap", &Outcome::of(Err(e.into())));
    }
}

fn cdev_steps<W: Write>(p: &mut Printer<'_, W>, dev: &Path) {
    let iommu = PathBuf::from("/dev/iommu");
    if !iommu.exists() {
        p.skip("open-cdev", "no /dev/iommu (kernel without IOMMUFD)");
        p.skip("dma-map-iommufd", "no /dev/iommu (kernel without IOMMUFD)");
        return;
    }
    let Some(mut t) = p.step("open-cdev", || {
        let node = open::derived_cdev(dev)?;
        let access = Access::Cdev {
            node,
            iommu: iommu.clone(),
        };
        let opened = open::open(dev, &access, Path::new("/dev"))?;
        let how = opened.describe();
        let mut t = KernelTransport::new(opened)?;
        let mut ids = [0u8; 4];
        t.config_read(0, &mut ids)?;
        Ok((t, format!("{how}; config ids {:02x?}", ids)))
    }) else {
        p.skip(
            "dma-map-iommufd",
            "the device was not opened through its cdev",
        );
        return;
    };
    p.step("dma-map-iommufd", || {
        let buf = Buffer::new(DMA_LEN as usize)?;
        dma_map_unmap(&mut t, &buf)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_prints_a_line_that_parses_back() {
        let cases = [
            (Outcome::Ok("a | b".into()), "ok", None),
            (
                Outcome::Refused {
                    errno: libc::ENOTTY,
                    what: "x\ny".into(),
                },
                "refused",
                Some(libc::ENOTTY),
            ),
            (Outcome::Failed("no".into()), "failed", None),
            (Outcome::Skipped("why".into()), "skipped", None),
        ];
        for (o, word, errno) in cases {
            let l = line("irq-msi", &o);
            assert!(!l.contains('\n'), "{l}");
            let p = parse(&l).unwrap();
            assert_eq!(p.name, "irq-msi");
            assert_eq!(p.outcome, word, "{l}");
            assert_eq!(p.errno, errno, "{l}");
        }
        assert!(line(
            "s",
            &Outcome::Refused {
                errno: libc::ENOTTY,
                what: String::new()
            }
        )
        .contains("errno=25 (ENOTTY)"));
        assert_eq!(parse("[ 1.0] VFIO-STEP x: ok"), None);
    }

    #[test]
    fn an_error_with_an_errno_is_a_refusal_and_one_without_is_a_failure() {
        let io: BoxError = Box::new(PathError(
            PathBuf::from("/sys/x"),
            std::io::Error::from_raw_os_error(libc::EBUSY),
        ));
        assert!(matches!(
            Outcome::of(Err(io)),
            Outcome::Refused { errno: libc::EBUSY, ref what } if what.contains("/sys/x")
        ));
        assert!(matches!(
            Outcome::of(Err("data differs".into())),
            Outcome::Failed(_)
        ));
    }

    #[test]
    fn without_mdev_bus_the_run_stops_at_the_first_step_and_counts_it() {
        let dir = std::env::temp_dir().join(format!("vmm-selftest-{}", std::process::id()));
        let mut out = Vec::new();
        let bad = run(&dir, &mut out);
        let text = String::from_utf8(out).unwrap();
        let steps: Vec<_> = text.lines().filter_map(parse).collect();
        assert_eq!(steps.len(), 1, "{text}");
        assert_eq!(steps[0].name, "mdev-type");
        assert_eq!(steps[0].errno, Some(libc::ENOENT), "{text}");
        assert_eq!(bad, 1);
        assert!(
            text.starts_with(BEGIN) && text.trim_end().ends_with(END),
            "{text}"
        );
    }
}
