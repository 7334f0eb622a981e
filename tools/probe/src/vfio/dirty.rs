//! The DMA dirty-tracking mechanisms on an opened device, one cell each, over a fresh 2 MiB
//! anonymous buffer DMA-mapped at [`IOVA`] (2 MiB further per mechanism): iommufd hardware
//! dirty tracking (cdev path), VFIO type1 `VFIO_IOMMU_DIRTY_PAGES` (group path) and VFIO
//! device DMA logging (both). Each is enabled, the CPU stores to two pages, the bitmap is read,
//! and everything is undone in reverse order, on every path. The probe cannot make the device
//! DMA (that needs its driver), so a cell says whether tracking could be enabled and what the
//! bitmap held, never that device writes were seen. The buffer is mapped and unmapped, the HWPT
//! allocated, attached and destroyed, and DMA logging driven through the crates (vfio-ioctls,
//! iommufd-ioctls); by hand are only iommufd.rs's two dirty-tracking ioctls and type1.rs's.
//! Never run with a bound device here (no VFIO on this machine).

use vfio_ioctls::{DmaLoggingRange, VfioContainer, VfioOps};

use super::dma::{explain, judge, set_bits, DmaBuffer, Steps, Undo, BUF_LEN, IOVA, PAGES};
use super::open::{CdevOpen, Opened};
use super::{chain, iommufd, type1};
use crate::kinds::SMALL;
use crate::predict::{predict, Row};
use crate::report::{Cell, KindStatus, Mechanism, Outcome};
use crate::uffd::Finding;

pub struct DmaFindings {
    pub kind: KindStatus,
    pub cells: Vec<Cell>,
    /// For the device line: each mechanism's short outcome.
    pub summary: String,
}

pub fn probe(opened: &Opened, bdf: &str) -> DmaFindings {
    let memory = format!("anon 4K DMA-mapped for {bdf}");
    let mut cells = Vec::new();
    let mut summary = Vec::new();
    for mech in Mechanism::DMA {
        let (outcome, evidence) = match mech {
            Mechanism::IommufdHwDirty => iommufd_cell(opened),
            Mechanism::VfioType1Dirty => type1_cell(opened),
            _ => logging_cell(opened),
        };
        let p = predict(Row::AnonMemfd, mech);
        crate::progress(format_args!(
            "{memory} / {}: {}",
            mech.name(),
            outcome.short()
        ));
        summary.push(format!("{} {}", mech.name(), outcome.short()));
        cells.push(Cell {
            memory: memory.clone(),
            mechanism: mech,
            step: None,
            matches_prediction: p.matches(&outcome),
            predicted: p.text.to_string(),
            outcome,
            evidence,
            // The DMA trackers are enabled, not armed page by page.
            armed_by: None,
            cycles: None,
        });
    }
    DmaFindings {
        kind: KindStatus {
            memory,
            available: true,
            note: format!(
                "{} KiB private anonymous, MADV_NOHUGEPAGE, a fresh one per mechanism, \
                 DMA-mapped read/write at IOVA {IOVA:#x} + {} KiB per mechanism (a failed \
                 unmap cannot collide with the next mapping)",
                BUF_LEN >> 10,
                BUF_LEN >> 10
            ),
        },
        cells,
        summary: summary.join(", "),
    }
}

fn not_here(why: &str) -> Finding {
    (Outcome::NotApplicable, why.to_string())
}

fn buffer(steps: &Steps) -> Result<DmaBuffer, Finding> {
    DmaBuffer::new().map_err(|e| steps.fail("allocating the buffer", &e))
}

/// Maps `buf` at IOVA through vfio-ioctls, into the device's IOAS (`VfioIommufd`:
/// IOMMU_IOAS_MAP) or the type1 container (`VfioContainer`: VFIO_IOMMU_MAP_DMA); `what` names
/// the failing step, `done` the mapping. The guard unmaps (the crate checks that the whole
/// length was unmapped).
fn map_dma<'a>(
    ops: &'a dyn VfioOps,
    iova: u64,
    buf: &'a DmaBuffer,
    (what, done): (&str, &str),
    steps: &mut Steps,
) -> Result<Undo<'a>, Finding> {
    // SAFETY: `buf` is only touched through raw pointers and outlives the guard, which unmaps
    // before `buf` is dropped (every caller declares the guard after the buffer).
    unsafe { ops.vfio_dma_map(iova, BUF_LEN, buf.ptr()) }.map_err(|e| steps.fail(what, &e))?;
    steps.ok(format!("{} KiB {done} at IOVA {iova:#x}", BUF_LEN >> 10));
    Ok(Undo::new("unmapping the buffer", move || {
        ops.vfio_dma_unmap(iova, BUF_LEN).map_err(|e| chain(&e))
    }))
}

fn map_ioas<'a>(
    c: &'a CdevOpen,
    iova: u64,
    buf: &'a DmaBuffer,
    steps: &mut Steps,
) -> Result<Undo<'a>, Finding> {
    let what = ("mapping the buffer", "IOAS-mapped");
    map_dma(&*c.iommufd, iova, buf, what, steps)
}

fn map_type1<'a>(
    container: &'a VfioContainer,
    iova: u64,
    buf: &'a DmaBuffer,
    steps: &mut Steps,
) -> Result<Undo<'a>, Finding> {
    let what = (
        "mapping the buffer (VFIO_IOMMU_MAP_DMA)",
        "VFIO_IOMMU_MAP_DMA'd",
    );
    map_dma(container, iova, buf, what, steps)
}

/// Each mechanism's own IOVA window, so a mapping a failed unmap left behind cannot make the
/// next mechanism's map fail (EEXIST) and be blamed on it.
fn iova_of(mech: Mechanism) -> u64 {
    let i = Mechanism::DMA.iter().position(|&m| m == mech).unwrap_or(0);
    IOVA + (i * BUF_LEN) as u64
}

fn iommufd_cell(opened: &Opened) -> Finding {
    let Opened::Cdev(c) = opened else {
        return not_here(
            "opened through its group (legacy type1 container): iommufd HW dirty tracking needs \
             the device's cdev bound to /dev/iommu",
        );
    };
    let mut steps = Steps::default();
    match iommufd::hw_info(c.fd(), c.dev_id) {
        Ok(h) => steps.ok(format!(
            "IOMMU_GET_HW_INFO: type {}, capabilities {:#x} (IOMMU_HW_CAP_DIRTY_TRACKING {})",
            h.data_type,
            h.capabilities,
            if h.dirty_tracking() { "set" } else { "clear" }
        )),
        // The allocation below is the decisive call; this is only evidence.
        Err(e) => steps.ok(format!("IOMMU_GET_HW_INFO failed: {}", chain(&e))),
    }
    match iommufd_run(c, &mut steps) {
        Ok(f) | Err(f) => f,
    }
}

fn iommufd_run(c: &CdevOpen, steps: &mut Steps) -> Result<Finding, Finding> {
    let fd = c.fd();
    let ioas = c.ioas();
    let hwpt = iommufd::alloc_dirty_hwpt(fd, c.dev_id, ioas).map_err(|e| {
        explain(
            steps.fail("allocating a HWPT with IOMMU_HWPT_ALLOC_DIRTY_TRACKING", &e),
            libc::EOPNOTSUPP,
            "the IOMMU cannot track DMA dirtiness for this device",
        )
    })?;
    let destroy = Undo::new("destroying the HWPT", move || {
        fd.destroy_iommu_object(hwpt).map_err(|e| chain(&e))
    });
    steps.ok(format!(
        "HWPT {hwpt} allocated with IOMMU_HWPT_ALLOC_DIRTY_TRACKING over IOAS {ioas}"
    ));
    c.device
        .attach_hwpt(hwpt)
        .map_err(|e| steps.fail("attaching the device to it", &e))?;
    // Back on the IOAS before the HWPT is destroyed (an attached HWPT cannot be).
    let reattach = Undo::new("moving the device back to the IOAS", move || {
        c.device.attach_hwpt(ioas).map_err(|e| chain(&e))
    });
    steps.ok("device attached to it");
    let buf = buffer(steps)?;
    let iova = iova_of(Mechanism::IommufdHwDirty);
    let unmap = map_ioas(c, iova, &buf, steps)?;
    iommufd::set_dirty_tracking(fd, hwpt, true).map_err(|e| steps.fail("enabling tracking", &e))?;
    let disable = Undo::new("disabling tracking", move || {
        iommufd::set_dirty_tracking(fd, hwpt, false).map_err(|e| chain(&e))
    });
    steps.ok("tracking enabled");
    buf.cpu_writes();
    let mut bitmap = [0u64; PAGES / 64];
    iommufd::get_dirty_bitmap(fd, hwpt, iova, BUF_LEN as u64, SMALL as u64, &mut bitmap)
        .map_err(|e| steps.fail("reading the bitmap", &e))?;
    let torn: Vec<String> = [disable.run(), unmap.run(), reattach.run(), destroy.run()]
        .into_iter()
        .flatten()
        .collect();
    Ok(judge(
        steps,
        &set_bits(&bitmap, PAGES),
        PAGES,
        SMALL as u64,
        false,
        &torn,
    ))
}

fn type1_cell(opened: &Opened) -> Finding {
    let Opened::Legacy { container, .. } = opened else {
        return not_here(
            "bound to an iommufd through its cdev: VFIO_IOMMU_DIRTY_PAGES exists only on a \
             legacy type1 container (the group path)",
        );
    };
    let mut steps = Steps::default();
    // The IOMMU's smallest page: the only size GET_BITMAP accepts.
    let mut pgsize = SMALL as u64;
    match type1::info(&**container) {
        Ok(info) => {
            let sizes = info
                .migration
                .map_or(info.iova_pgsizes, |m| m.pgsize_bitmap);
            if sizes != 0 {
                pgsize = 1 << sizes.trailing_zeros();
            }
            steps.ok(match info.migration {
                Some(m) => format!(
                    "VFIO_IOMMU_GET_INFO: migration capability (dirty tracking): pgsize_bitmap \
                     {:#x}, max bitmap {} bytes",
                    m.pgsize_bitmap, m.max_dirty_bitmap_size
                ),
                None => format!(
                    "VFIO_IOMMU_GET_INFO: iova_pgsizes {:#x}, no migration capability (this \
                     backend offers no dirty tracking)",
                    info.iova_pgsizes
                ),
            });
        }
        Err(e) => steps.ok(format!("VFIO_IOMMU_GET_INFO failed: {}", chain(&e))),
    }
    match type1_run(container, pgsize, &mut steps) {
        Ok(f) | Err(f) => f,
    }
}

fn type1_run(
    container: &VfioContainer,
    pgsize: u64,
    steps: &mut Steps,
) -> Result<Finding, Finding> {
    let buf = buffer(steps)?;
    let iova = iova_of(Mechanism::VfioType1Dirty);
    let unmap = map_type1(container, iova, &buf, steps)?;
    type1::start(container).map_err(|e| steps.fail("starting tracking", &e))?;
    let stop = Undo::new("stopping tracking", move || {
        type1::stop(container).map_err(|e| chain(&e))
    });
    steps.ok("tracking started");
    buf.cpu_writes();
    let bits = (BUF_LEN as u64).div_ceil(pgsize) as usize;
    let mut bitmap = vec![0u64; bits.div_ceil(64)];
    type1::bitmap(container, iova, BUF_LEN as u64, pgsize, &mut bitmap)
        .map_err(|e| steps.fail(&format!("reading the bitmap in {pgsize}-byte pages"), &e))?;
    let torn: Vec<String> = [stop.run(), unmap.run()].into_iter().flatten().collect();
    Ok(judge(
        steps,
        &set_bits(&bitmap, bits),
        bits,
        pgsize,
        true,
        &torn,
    ))
}

fn logging_cell(opened: &Opened) -> Finding {
    let mut steps = Steps::default();
    match logging_run(opened, &mut steps) {
        Ok(f) | Err(f) => f,
    }
}

/// vfio-ioctls' DMA logging (VFIO_DEVICE_FEATURE DMA_LOGGING_START/REPORT/STOP) on the device,
/// opened either way.
fn logging_run(opened: &Opened, steps: &mut Steps) -> Result<Finding, Finding> {
    let buf = buffer(steps)?;
    let iova = iova_of(Mechanism::VfioDmaLogging);
    let unmap = match opened {
        Opened::Cdev(c) => map_ioas(c, iova, &buf, steps)?,
        Opened::Legacy { container, .. } => map_type1(container, iova, &buf, steps)?,
    };
    let device = opened.device();
    let page = SMALL as u64;
    let range = DmaLoggingRange {
        iova,
        length: BUF_LEN as u64,
    };
    let started = device.start_dma_logging(page, &[range]).map_err(|e| {
        explain(
            steps.fail("starting DMA logging (vfio-ioctls)", &e),
            libc::ENOTTY,
            "the device's driver implements no DMA logging",
        )
    })?;
    let stop = Undo::new("stopping DMA logging", move || {
        device.stop_dma_logging().map_err(|e| chain(&e))
    });
    steps.ok(format!(
        "DMA logging started (the driver chose {started}-byte pages)"
    ));
    buf.cpu_writes();
    let bitmap = device
        .report_dma_logging(range, page)
        .map_err(|e| steps.fail("reading the log (vfio-ioctls)", &e))?;
    let torn: Vec<String> = [stop.run(), unmap.run()].into_iter().flatten().collect();
    Ok(judge(
        steps,
        &set_bits(&bitmap, PAGES),
        PAGES,
        page,
        false,
        &torn,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_mechanism_maps_its_own_iova_window() {
        let w: Vec<u64> = Mechanism::DMA.iter().map(|&m| iova_of(m)).collect();
        assert_eq!(w[0], IOVA);
        for pair in w.windows(2) {
            assert_eq!(pair[1] - pair[0], BUF_LEN as u64);
        }
    }
}
