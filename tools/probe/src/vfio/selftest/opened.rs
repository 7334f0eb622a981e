//! The self-test's steps on the source instance opened either way: through its group in a
//! type1 container (device and region info, config space, BAR0, reset, IRQs, a DMA map, the
//! migrations to the destination instance, DMA logging), then through its cdev bound to an
//! iommufd (config space, a DMA map in its IOAS).

use std::io::Write;
use std::path::{Path, PathBuf};

use devices::vfio::open::{self, Access};
use devices::vfio::passthrough::transport::{
    DeviceMigration, DmaRegion, VfioTransport, CONFIG_REGION, MSI_IRQ,
};
use devices::vfio::passthrough::KernelTransport;

use super::mtty::{irq, precopy, read_reg, stop_copy, write_reg, BAR0, INTX_IRQ, UART_SCR};
use super::{check, BoxError, Outcome, Printer};

/// The DMA buffer: at this IOVA, this big.
const DMA_IOVA: u64 = 0x10_0000;
const DMA_LEN: u64 = 2 << 20;

fn open_group(dev: &Path, group: u32) -> Result<(KernelTransport, String), BoxError> {
    let access = Access::Group {
        node: PathBuf::from(format!("/dev/vfio/{group}")),
        id: group,
    };
    let opened = open::open(dev, &access, Path::new("/dev"))?;
    let how = opened.describe();
    Ok((KernelTransport::new(opened)?, how))
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

pub(super) fn group_steps<W: Write>(
    p: &mut Printer<'_, W>,
    src_dev: &Path,
    group: u32,
    dst_dev: &Path,
) {
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

pub(super) fn cdev_steps<W: Write>(p: &mut Printer<'_, W>, dev: &Path) {
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
