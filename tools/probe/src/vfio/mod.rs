//! VFIO devices (typically a passed-through GPU): every BAR mmap'd through the device fd with
//! every memory-tracking mechanism tried on the mapping (external.rs), and the DMA dirty-tracking
//! mechanisms tried on a DMA-mapped buffer: iommufd hardware dirty tracking, VFIO type1
//! `VFIO_IOMMU_DIRTY_PAGES` and VFIO device DMA logging.
//!
//! The calls are the ones a host with a bound device makes; this code has never run with a bound
//! device (the machines it was written on have no VFIO hardware: no /dev/vfio, no /dev/iommu).
//! Its ioctl wrappers are tested against real fds that are not VFIO fds (the kernel's ENOTTY).
//!
//! The VFIO layer is shared with the VMM and lives in `devices::vfio`: opening a device either
//! way (its group into a type1 container, or its cdev bound to an iommufd and attached to an
//! IOAS, through vfio-ioctls and iommufd-ioctls), mapping a region through the device fd, and
//! the ioctls no crate has (region info, type1 dirty pages, iommufd HWPT dirty tracking; see
//! `devices::vfio::sys`). It is re-exported here as `caps`, `iommufd`, `region`, `type1` and
//! `errno_of`. The probe keeps what is its own: discovery over /dev and sysfs (discover.rs), the
//! experiments on BARs and DMA (bars.rs, dirty.rs, dma.rs, which map DMA and drive device DMA
//! logging through vfio-ioctls directly) and the report.
//!
//! A device is opened through its cdev and /dev/iommu where both exist (the iommufd path), else
//! through its group (the legacy path). vfio-ioctls opens /dev/vfio nodes at fixed paths, so a
//! device is opened only when the probe looks at /dev. Where a device cannot be opened (a VM
//! holds its group: EBUSY; not root: EACCES) the device line and a per-device [`KindStatus`] say
//! so; nothing is ever reported as tried that was not.

pub mod bars;
pub mod dirty;
pub mod discover;
pub mod dma;
pub mod gpu_noiommu;
pub mod gpu_report;
pub mod mdev;
pub mod noiommu;
pub mod open;
pub mod region_writer;
pub mod selftest;
pub mod vanish;

// The ioctl layer the VMM shares (devices::vfio), under the names the probe has always used.
pub use devices::vfio::errno_of;
pub use devices::vfio::sys::{caps, iommufd, region, type1};

use std::error::Error;

use crate::devices::DeviceFindings;
use crate::report::{errno_name, Cell, DeviceLine, KindStatus};
use crate::ProbeOpts;

/// The error and its causes in one line, without repeating a cause its parent already quotes.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        let s = err.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = err.source();
    }
    out
}

/// What an errno means for a VFIO node, for the device line.
pub fn hint(errno: Option<i32>) -> &'static str {
    match errno {
        Some(libc::EBUSY) => " (a VM or another process holds the device or its group)",
        Some(libc::EPERM | libc::EACCES) => " (not permitted: run as root or grant the node)",
        _ => "",
    }
}

/// `1.5 GiB`-style sizes for memory labels.
pub fn human(bytes: u64) -> String {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (unit, name) in UNITS {
        if bytes >= unit {
            return if bytes % unit == 0 {
                format!("{} {name}", bytes / unit)
            } else {
                format!("{:.1} {name}", bytes as f64 / unit as f64)
            };
        }
    }
    format!("{bytes} B")
}

/// Finds the VFIO devices under `opts.dev_dir` / `opts.sys_dir`, opens each, mmaps and probes
/// its BARs and tries the DMA mechanisms; with nothing there, one line (found = false).
pub fn probe(opts: &ProbeOpts) -> DeviceFindings {
    // The sample mdevs live as long as this function: created before discovery, removed after.
    let (_instances, created) = if opts.sample_mdevs {
        mdev::create_samples(&opts.sys_dir)
    } else {
        (mdev::Instances::default(), Vec::new())
    };
    let mut found = discover::discover(&opts.dev_dir, &opts.sys_dir);
    found.notes.extend(created);
    if found.nodes.is_empty() {
        let line = if found.vfio_dir {
            "no VFIO device: /dev/vfio/ has no group or cdev"
        } else {
            "no VFIO: /dev/vfio/ absent"
        };
        return DeviceFindings {
            kinds: Vec::new(),
            cells: Vec::new(),
            line: DeviceLine {
                device: "VFIO".into(),
                found: false,
                line: line.into(),
            },
        };
    }
    let mut kinds = Vec::new();
    let mut cells = Vec::new();
    let mut parts = Vec::new();
    for dev in &found.devices {
        let (k, c, part) = probe_device(dev, opts);
        kinds.extend(k);
        cells.extend(c);
        parts.push(part);
    }
    parts.extend(found.notes.iter().cloned());
    let nodes: Vec<String> = found
        .nodes
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    DeviceFindings {
        kinds,
        cells,
        line: DeviceLine {
            device: "VFIO".into(),
            found: true,
            line: format!(
                "{} device(s) behind {}: {}",
                found.devices.len(),
                nodes.join(", "),
                parts.join("; ")
            ),
        },
    }
}

/// One device: opened (or why not), its BARs, the DMA mechanisms; the device line's part for it.
fn probe_device(dev: &discover::VfioDev, opts: &ProbeOpts) -> (Vec<KindStatus>, Vec<Cell>, String) {
    let name = dev.describe();
    let opened = match open::open(dev, &opts.dev_dir) {
        Ok(o) => o,
        Err(e) => {
            let errno = errno_of(&e);
            let why = format!("{}{}", chain(&e), e.meaning());
            let code = errno.map_or_else(String::new, |c| format!("{}: ", errno_name(c)));
            let kind = KindStatus {
                memory: format!("VFIO {}", dev.bdf),
                available: false,
                note: format!("{}: not opened: {why}", dev.access.describe()),
            };
            return (
                vec![kind],
                Vec::new(),
                format!("{name}: not opened: {code}{why}"),
            );
        }
    };
    let mut kinds = vec![KindStatus {
        memory: format!("VFIO {}", dev.bdf),
        available: true,
        note: format!("opened {}", opened.describe()),
    }];
    let bars = bars::probe(&opened, dev, opts);
    let dma = dirty::probe(&opened, &dev.bdf);
    kinds.extend(bars.kinds);
    kinds.push(dma.kind);
    let mut cells = bars.cells;
    cells.extend(dma.cells);
    let line = format!(
        "{name} opened {}: {}; DMA: {}",
        opened.describe(),
        bars.summary,
        dma.summary
    );
    (kinds, cells, line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(16 << 20), "16 MiB");
        assert_eq!(human(32 << 30), "32 GiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
        assert_eq!(human(4096), "4 KiB");
        assert_eq!(human(12), "12 B");
    }

    #[test]
    fn errno_is_found_down_the_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::from_raw_os_error(libc::EBUSY));
        assert_eq!(errno_of(&e), Some(libc::EBUSY));
        assert!(chain(&e).starts_with("outer: "), "{}", chain(&e));
        let sys = vmm_sys_util::errno::Error::new(libc::ENOTTY);
        assert_eq!(errno_of(&sys), Some(libc::ENOTTY));
        assert!(hint(Some(libc::EBUSY)).contains("VM"));
    }

    /// The device line agrees with /dev/vfio: absent, it says so and nothing else is probed;
    /// present, it never claims it absent, and `found` goes with the devices it lists.
    #[test]
    fn the_device_line_agrees_with_dev_vfio() {
        let f = probe(&ProbeOpts::default());
        if std::path::Path::new("/dev/vfio").exists() {
            assert_ne!(f.line.line, "no VFIO: /dev/vfio/ absent");
            assert_eq!(
                f.line.found,
                f.line.line.contains("device(s) behind"),
                "{}",
                f.line.line
            );
            assert!(f.line.found || (f.kinds.is_empty() && f.cells.is_empty()));
            return;
        }
        assert!(!f.line.found);
        assert_eq!(f.line.line, "no VFIO: /dev/vfio/ absent");
        assert!(f.kinds.is_empty() && f.cells.is_empty());
    }
}
