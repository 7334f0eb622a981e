//! Each mmap-able BAR of an opened device, mmap'd through the device fd and handed to
//! external.rs, which tries every memory-tracking mechanism on the mapping. BAR memory is never
//! read or written unless it is prefetchable (memory, not registers) and `bar_writes` allows
//! it: a register's read may have side effects. Never run with a bound device here (no VFIO).

use std::path::Path;

use super::region::{self, Region, RegionMap};
use super::region_writer;
use super::{human, open::Opened};
use crate::external::{self, External};
use crate::kinds::SMALL;
use crate::predict::Row;
use crate::report::{Cell, KindStatus};
use crate::ProbeOpts;

use super::discover::VfioDev;

/// The most of one BAR mapped (a GPU's VRAM BAR can be tens of GiB).
pub const MAX_MAP: u64 = 64 << 20;
/// Bits of a sysfs `resource` line's flags (include/linux/ioport.h).
const IORESOURCE_MEM: u64 = 0x200;
const IORESOURCE_PREFETCH: u64 = 0x2000;

/// What the sysfs `resource` file says of BAR `n`: Ok(prefetchable) or why it cannot tell.
pub fn prefetchable(sysfs: &Path, n: u32) -> Result<bool, String> {
    let path = sysfs.join("resource");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let line = text
        .lines()
        .nth(n as usize)
        .ok_or_else(|| format!("{} has no line {n}", path.display()))?;
    let flags = line
        .split_whitespace()
        .nth(2)
        .and_then(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).ok())
        .ok_or_else(|| format!("{} line {n} unreadable: {line:?}", path.display()))?;
    Ok(flags & IORESOURCE_MEM != 0 && flags & IORESOURCE_PREFETCH != 0)
}

/// BAR `n`'s prefetchable bit from the device's own config space (VFIO region 7), for a device
/// whose sysfs directory has no `resource` file (a mediated device). Ok(false) for an I/O BAR.
pub fn config_prefetchable(opened: &Opened, n: u32) -> Result<bool, String> {
    let cfg = region::info(
        opened,
        vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX,
    )
    .map_err(|e| format!("config region: {e}"))?;
    let off = cfg.offset + 0x10 + 4 * u64::from(n);
    let off = libc::off_t::try_from(off).map_err(|_| format!("config offset {off:#x}"))?;
    let mut b = [0u8; 4];
    // SAFETY: pread writes at most the 4 bytes of `b`, which lives across the call; the fd is
    // the open device's.
    let got = unsafe {
        libc::pread(
            std::os::fd::AsRawFd::as_raw_fd(opened),
            b.as_mut_ptr().cast(),
            4,
            off,
        )
    };
    if got != 4 {
        return Err(format!(
            "config space read of BAR{n}: {}",
            std::io::Error::last_os_error()
        ));
    }
    let bar = u32::from_le_bytes(b);
    // Bit 0: I/O space; bit 3: prefetchable memory (PCI spec, base address registers).
    Ok(bar & 1 == 0 && bar & 0x8 != 0)
}

pub struct BarFindings {
    pub kinds: Vec<KindStatus>,
    pub cells: Vec<Cell>,
    /// For the device line, e.g. "BAR0 (16 MiB, registers), BAR1 (32 GiB, prefetchable) probed".
    pub summary: String,
}

fn status(memory: String, available: bool, note: String) -> KindStatus {
    KindStatus {
        memory,
        available,
        note,
    }
}

pub fn probe(opened: &Opened, dev: &VfioDev, opts: &ProbeOpts) -> BarFindings {
    let mut out = BarFindings {
        kinds: Vec::new(),
        cells: Vec::new(),
        summary: String::new(),
    };
    let mut probed = Vec::new();
    let mut skipped = Vec::new();
    for n in region::BAR_REGIONS {
        let plain = format!("VFIO {} BAR{n}", dev.bdf);
        let r = match region::info(opened, n) {
            Ok(r) => r,
            Err(e) => {
                skipped.push(format!("BAR{n}: {e}"));
                out.kinds.push(status(plain, false, e.to_string()));
                continue;
            }
        };
        if r.size == 0 {
            // Not implemented by the device (or the upper half of a 64-bit BAR).
            continue;
        }
        let pref = prefetchable(&dev.sysfs, n).or_else(|sysfs| {
            config_prefetchable(opened, n).map_err(|cfg| format!("{sysfs}; {cfg}"))
        });
        let what = if pref == Ok(true) {
            "prefetchable"
        } else {
            "registers"
        };
        let memory = format!("VFIO {} BAR{n} ({}, {what})", dev.bdf, human(r.size));
        match map_and_probe(opened, &r, &memory, pref, opts) {
            Ok((kind, cells)) => {
                probed.push(format!("BAR{n} ({}, {what})", human(r.size)));
                out.kinds.push(kind);
                out.cells.extend(cells);
            }
            Err(why) => {
                skipped.push(format!("BAR{n}: {why}"));
                out.kinds.push(status(memory, false, why));
            }
        }
    }
    out.summary = match (probed.is_empty(), skipped.is_empty()) {
        (true, true) => "no BAR with a size".into(),
        (false, true) => format!("{} mmap'd and probed", probed.join(", ")),
        (true, false) => format!("no BAR probed ({})", skipped.join("; ")),
        (false, false) => format!(
            "{} mmap'd and probed; not probed: {}",
            probed.join(", "),
            skipped.join("; ")
        ),
    };
    out
}

/// Maps the region's first mmap-able area (at most MAX_MAP) and runs external.rs on it.
fn map_and_probe(
    opened: &Opened,
    r: &Region,
    memory: &str,
    pref: Result<bool, String>,
    opts: &ProbeOpts,
) -> Result<(KindStatus, Vec<Cell>), String> {
    if !r.mmap_able() {
        return Err(format!(
            "not mmap-able (region flags {:#x}: an I/O port BAR, or the driver refuses mmap)",
            r.flags
        ));
    }
    let Some((area_off, area_size)) = r.first_area() else {
        return Err("sparse mmap capability lists no area".into());
    };
    let len = (area_size.min(MAX_MAP) as usize) / SMALL * SMALL;
    if len == 0 {
        return Err(format!(
            "its first mmap area is {area_size:#x} bytes: under a page"
        ));
    }
    let writable = r.flags & vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_WRITE != 0;
    let map =
        RegionMap::new(opened, r.offset + area_off, len, writable).map_err(|e| e.to_string())?;
    let prefetch = *pref.as_ref().unwrap_or(&false);
    let cpu_writes = opts.bar_writes && prefetch && writable;
    let area = match &r.sparse {
        Some(areas) => format!(
            "first of {} sparse-mmap areas (+{area_off:#x}, {})",
            areas.len(),
            human(area_size)
        ),
        None => "the whole region".into(),
    };
    let writes = if cpu_writes {
        "CPU and guest writes allowed (--bar-writes, prefetchable): the mapped area's pages \
         are overwritten (a word at the start of each) before the write checks"
            .to_string()
    } else if !prefetch {
        match &pref {
            Err(why) => format!("never read or written: prefetchable unknown ({why})"),
            Ok(_) => "never read or written: registers (reads may have side effects)".into(),
        }
    } else {
        "never read or written: prefetchable, but bar_writes is off".into()
    };
    let note = format!(
        "mmap'd {} of {} ({area}) MAP_SHARED{} at device-fd offset {:#x}; {writes}",
        human(len as u64),
        human(r.size),
        if writable {
            " read/write"
        } else {
            " read-only"
        },
        r.offset + area_off
    );
    // Where the CPU may write the BAR, the device writes it too, through its region.
    let dev_off = r.offset + area_off;
    let mut writer = None;
    let mut note = note;
    if cpu_writes {
        match region_writer::calibrate(opened, dev_off, map.addr, map.len) {
            Ok(w) => {
                note.push_str(&format!(
                    "; device writes: VFIO region writes (pwrite), measured to land {} KiB past \
                     their offset; the probed range starts there",
                    w.shift() >> 10
                ));
                writer = Some(w);
            }
            Err(why) => note.push_str(&format!("; no device writes: {why}")),
        }
    }
    let skip = writer.as_ref().map_or(0, |w| w.shift());
    let cells = external::probe(&mut External {
        memory: memory.to_string(),
        row: Row::VfioBar,
        addr: map.addr + skip,
        len: map.len - skip,
        cpu_access: true,
        cpu_writes,
        device: writer
            .as_mut()
            .map(|w| w as &mut dyn external::DeviceWriter),
    });
    drop(map);
    Ok((status(memory.to_string(), true, note), cells))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetchable_comes_from_the_resource_flags() {
        let dir = std::env::temp_dir().join(format!("vmm-probe-vfio-bars-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("resource"),
            "0x00000000fb000000 0x00000000fbffffff 0x0000000000040200\n\
             0x0000006000000000 0x00000067ffffffff 0x000000000014220c\n\
             0x0000000000000000 0x0000000000000000 0x0000000000000000\n\
             0x000000000000e000 0x000000000000e07f 0x0000000000040101\n",
        )
        .unwrap();
        let regs = prefetchable(&dir, 0);
        let vram = prefetchable(&dir, 1);
        let io = prefetchable(&dir, 3);
        let missing = prefetchable(&dir, 9);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(regs, Ok(false));
        assert_eq!(vram, Ok(true));
        assert_eq!(io, Ok(false));
        assert!(missing.is_err());
        assert!(prefetchable(Path::new("/nonexistent"), 0).is_err());
    }
}
