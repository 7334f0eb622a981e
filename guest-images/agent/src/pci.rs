//! `pci-list`: the guest's PCI functions as the kernel sees them, from /sys/bus/pci/devices:
//! identity, bound driver, BARs (from `resource`) and the MSI/MSI-X capabilities (from
//! `config`). Parsing is pure and tested on the host with made-up files.

use std::fmt;
use std::fs;
use std::path::Path;

use crate::script::parse_u64;

pub const SYSFS_PCI_DEVICES: &str = "/sys/bus/pci/devices";

/// A PCI function address, normalised to `DDDD:BB:DD.F` (lower-case hex). Validated before it
/// is ever put into a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bdf(String);

impl Bdf {
    /// `DDDD:BB:DD.F`, or `BB:DD.F` for domain 0.
    pub fn parse(text: &str) -> Result<Bdf, String> {
        let bad = || format!("bad PCI address {text:?} (want DDDD:BB:DD.F)");
        let parts: Vec<&str> = text.split(':').collect();
        let (domain, bus, slot_fn) = match parts[..] {
            [d, b, sf] => (d, b, sf),
            [b, sf] => ("0000", b, sf),
            _ => return Err(bad()),
        };
        let (slot, func) = slot_fn.split_once('.').ok_or_else(bad)?;
        let hex = |s: &str, digits: usize, max: u32| -> Result<u32, String> {
            if s.is_empty() || s.len() > digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            u32::from_str_radix(s, 16)
                .ok()
                .filter(|&v| v <= max)
                .ok_or_else(bad)
        };
        let (d, b, s, f) = (
            hex(domain, 4, 0xffff)?,
            hex(bus, 2, 0xff)?,
            hex(slot, 2, 0x1f)?,
            hex(func, 1, 7)?,
        );
        Ok(Bdf(format!("{d:04x}:{b:02x}:{s:02x}.{f:x}")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

// Resource flags, include/linux/ioport.h.
const IORESOURCE_IO: u64 = 0x0000_0100;
const IORESOURCE_MEM: u64 = 0x0000_0200;
const IORESOURCE_PREFETCH: u64 = 0x0000_2000;
const IORESOURCE_MEM_64: u64 = 0x0010_0000;
const IORESOURCE_UNSET: u64 = 0x2000_0000;

/// Lines of `resource` that are BARs (then come the ROM and bridge windows).
const BAR_LINES: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Mem32,
    Mem64,
    Io,
}

impl fmt::Display for BarKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BarKind::Mem32 => "mem32",
            BarKind::Mem64 => "mem64",
            BarKind::Io => "io",
        })
    }
}

/// One implemented BAR (the upper half of a 64-bit BAR is not listed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub index: usize,
    pub addr: u64,
    pub size: u64,
    pub kind: BarKind,
    pub prefetchable: bool,
    /// The kernel did not assign it an address.
    pub unset: bool,
}

impl fmt::Display for Bar {
    /// `barN=0xADDR+0xSIZE:KIND[:pf][:unset]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bar{}={:#x}+{:#x}:{}",
            self.index, self.addr, self.size, self.kind
        )?;
        if self.prefetchable {
            f.write_str(":pf")?;
        }
        if self.unset {
            f.write_str(":unset")?;
        }
        Ok(())
    }
}

/// The BARs in a sysfs `resource` file: lines of `0xSTART 0xEND 0xFLAGS`, BARs first.
pub fn parse_resource(text: &str) -> Result<Vec<Bar>, String> {
    let mut bars = Vec::new();
    for (index, line) in text.lines().take(BAR_LINES).enumerate() {
        let fields: Vec<u64> = line
            .split_whitespace()
            .map(|f| parse_u64(f).ok_or_else(|| format!("resource line {index}: bad number {f:?}")))
            .collect::<Result<_, _>>()?;
        let [start, end, flags] = fields[..] else {
            return Err(format!("resource line {index}: want 3 numbers: {line:?}"));
        };
        let kind = if flags & IORESOURCE_IO != 0 {
            BarKind::Io
        } else if flags & IORESOURCE_MEM != 0 {
            if flags & IORESOURCE_MEM_64 != 0 {
                BarKind::Mem64
            } else {
                BarKind::Mem32
            }
        } else {
            continue; // not implemented (or the upper half of a 64-bit BAR)
        };
        if end < start || (start == 0 && end == 0) {
            continue;
        }
        bars.push(Bar {
            index,
            addr: start,
            size: end - start + 1,
            kind,
            prefetchable: flags & IORESOURCE_PREFETCH != 0,
            unset: flags & IORESOURCE_UNSET != 0,
        });
    }
    Ok(bars)
}

const CAP_ID_MSI: u8 = 0x05;
const CAP_ID_MSIX: u8 = 0x11;
const STATUS_CAP_LIST: u8 = 0x10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCap {
    pub offset: u8,
    pub vectors: u16,
    pub enabled: bool,
    pub table_bir: u8,
    pub table_offset: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiCap {
    pub offset: u8,
    /// Vectors the function can ask for (Multiple Message Capable).
    pub vectors: u8,
    pub addr64: bool,
    pub enabled: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub msix: Option<MsixCap>,
    pub msi: Option<MsiCap>,
}

/// The MSI and MSI-X capabilities in (the first 256 bytes of) config space. A short read (a
/// non-root reader sees 64 bytes), a loop or a pointer off the end ends the walk quietly.
pub fn parse_caps(config: &[u8]) -> Caps {
    let mut caps = Caps::default();
    let byte = |at: usize| config.get(at).copied();
    let word = |at: usize| Some(u16::from_le_bytes([byte(at)?, byte(at + 1)?]));
    let dword = |at: usize| Some(u32::from(word(at)?) | u32::from(word(at + 2)?) << 16);
    if byte(0x06).is_none_or(|s| s & STATUS_CAP_LIST == 0) {
        return caps;
    }
    let mut next = byte(0x34).unwrap_or(0) & 0xfc;
    // 48 capabilities at most fit after the header: a longer chain is a loop.
    for _ in 0..48 {
        if next < 0x40 {
            break;
        }
        let at = usize::from(next);
        let (Some(id), Some(ptr)) = (byte(at), byte(at + 1)) else {
            break;
        };
        match id {
            CAP_ID_MSIX => {
                if let (Some(ctrl), Some(table)) = (word(at + 2), dword(at + 4)) {
                    caps.msix = Some(MsixCap {
                        offset: next,
                        vectors: (ctrl & 0x7ff) + 1,
                        enabled: ctrl & 0x8000 != 0,
                        table_bir: (table & 7) as u8,
                        table_offset: table & !7,
                    });
                }
            }
            CAP_ID_MSI => {
                if let Some(ctrl) = word(at + 2) {
                    caps.msi = Some(MsiCap {
                        offset: next,
                        vectors: 1 << ((ctrl >> 1) & 7).min(5),
                        addr64: ctrl & 0x80 != 0,
                        enabled: ctrl & 1 != 0,
                    });
                }
            }
            _ => {}
        }
        next = ptr & 0xfc;
    }
    caps
}

/// One function as `pci-list` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    pub bdf: Bdf,
    pub vendor: u16,
    pub device: u16,
    pub class: u32,
    pub driver: Option<String>,
    pub bars: Vec<Bar>,
    pub caps: Caps,
}

impl fmt::Display for Function {
    /// `BDF vendor=0x1234 device=0x7e57 class=0x030200 driver=NAME|none BARS.. msix=N|none
    /// msi=N|none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} vendor={:#06x} device={:#06x} class={:#08x} driver={}",
            self.bdf,
            self.vendor,
            self.device,
            self.class,
            self.driver.as_deref().unwrap_or("none")
        )?;
        for bar in &self.bars {
            write!(f, " {bar}")?;
        }
        match self.caps.msix {
            Some(m) => write!(
                f,
                " msix={} msix_table=bar{}+{:#x}",
                m.vectors, m.table_bir, m.table_offset
            )?,
            None => f.write_str(" msix=none")?,
        }
        match self.caps.msi {
            Some(m) => write!(f, " msi={}", m.vectors),
            None => f.write_str(" msi=none"),
        }
    }
}

fn read_text(dir: &Path, name: &str) -> Result<String, String> {
    fs::read_to_string(dir.join(name)).map_err(|e| format!("{}/{name}: {e}", dir.display()))
}

fn read_hex(dir: &Path, name: &str) -> Result<u64, String> {
    let text = read_text(dir, name)?;
    parse_u64(text.trim()).ok_or_else(|| format!("{}/{name}: bad number {text:?}", dir.display()))
}

/// The driver a function is bound to: the last component of its `driver` link.
pub fn driver_of(dir: &Path) -> Option<String> {
    let target = fs::read_link(dir.join("driver")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// Reads one function's directory under `root` (normally [`SYSFS_PCI_DEVICES`]).
pub fn read_function(root: &Path, bdf: &Bdf) -> Result<Function, String> {
    let dir = root.join(bdf.as_str());
    if !dir.is_dir() {
        return Err(format!("no PCI function {bdf} in {}", root.display()));
    }
    let narrow = |name: &str, v: u64| -> Result<u16, String> {
        u16::try_from(v).map_err(|_| format!("{bdf}: {name} {v:#x} out of range"))
    };
    let class = read_hex(&dir, "class")?;
    let config =
        fs::read(dir.join("config")).map_err(|e| format!("{}/config: {e}", dir.display()))?;
    Ok(Function {
        bdf: bdf.clone(),
        vendor: narrow("vendor", read_hex(&dir, "vendor")?)?,
        device: narrow("device", read_hex(&dir, "device")?)?,
        class: u32::try_from(class).map_err(|_| format!("{bdf}: class {class:#x} out of range"))?,
        driver: driver_of(&dir),
        bars: parse_resource(&read_text(&dir, "resource")?).map_err(|e| format!("{bdf}: {e}"))?,
        caps: parse_caps(&config),
    })
}

/// Every function under `root`, sorted by address.
pub fn list(root: &Path) -> Result<Vec<Function>, String> {
    let entries = fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut bdfs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("{}: {e}", root.display()))?;
        bdfs.push(Bdf::parse(&entry.file_name().to_string_lossy())?);
    }
    bdfs.sort();
    bdfs.iter().map(|bdf| read_function(root, bdf)).collect()
}

#[cfg(test)]
#[path = "pci_tests.rs"]
mod tests;
