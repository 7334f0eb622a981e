//! Bad input: a VFIO device that vanishes while the probe holds it. An mbochs instance is
//! opened through its group, its framebuffer BAR mmap'd and armed (WP_ASYNC + PAGEMAP_SCAN, a
//! probe cell in progress: CPU writes, harvests), and then removed through sysfs from another
//! thread, as an administrator would.
//!
//! What 6.12 does (drivers/vfio/vfio_main.c, `vfio_unregister_group_dev`): it first unhooks the
//! device from its group and deletes its `vfio-dev/vfioN` class device, then waits, 10 s at a
//! time and for as long as it takes, until every open fd is released, calling the driver's
//! `request` op on each round so the driver can ask userspace to let go (vfio-pci signals its
//! REQ IRQ eventfd). The mdev samples have no `request` op and offer no REQ IRQ, so nothing
//! tells the holder: the remover blocks until the holder lets go. The cell therefore watches
//! both ways a holder can learn of it, bounded: the request IRQ where the device offers one,
//! and the device's `vfio-dev/` entry in sysfs, polled between harvests. Seeing either, the cell
//! ends with ENODEV and releases everything (munmap, device fd, group, container), which lets
//! the removal finish. A removal neither way shows within [`DEADLINE`] still ends the cell,
//! as a failure, with everything released: never a hang.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use devices::vfio::open::{self, Access};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{mdev, region};
use crate::hmm::trackers::{self, Range};
use crate::kinds::SMALL;
use crate::report::Mechanism;

/// How long the cell waits for a sign of the removal before it gives up holding the device.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// How long the removal may take once everything is released.
const REMOVE_DEADLINE: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);
/// vfio-pci's IRQ index of the device request (VFIO_PCI_REQ_IRQ_INDEX).
const REQ_IRQ_INDEX: u32 = 4;
const UUID: &str = "0c9e5a1e-16b0-4a7c-9d1e-0000000000ee";
const TYPE: &str = "mbochs-small";

#[derive(Debug, thiserror::Error)]
pub enum VanishError {
    #[error(transparent)]
    Mdev(#[from] mdev::MdevError),
    #[error("opening the instance through group {group}: {source}")]
    Open {
        group: u32,
        #[source]
        source: open::OpenError,
    },
    #[error("{0}")]
    Setup(String),
    /// The cell ended without seeing the removal; everything was released anyway.
    #[error("{0}")]
    NotSeen(String),
    /// The removal did not complete after the device was released.
    #[error("{0}")]
    StillBlocked(String),
}

fn group_of(dev: &Path) -> Result<u32, VanishError> {
    std::fs::read_link(dev.join("iommu_group"))
        .ok()
        .and_then(|l| l.file_name()?.to_str()?.parse().ok())
        .ok_or_else(|| VanishError::Setup(format!("{}: no iommu_group link", dev.display())))
}

/// Whether the device's vfio-dev class entry is still there (deleted first by removal).
fn registered(dev: &Path) -> bool {
    std::fs::read_dir(dev.join("vfio-dev")).is_ok_and(|mut d| d.next().is_some())
}

/// How the holder learnt of the removal.
enum Seen {
    RequestIrq(u64),
    SysfsGone,
}

/// Runs the scenario; Ok is the evidence of a cell that ended with the error and a removal
/// that completed, in bounded time.
pub fn run(sys: &Path) -> Result<String, VanishError> {
    let dev = mdev::create(sys, TYPE, UUID)?;
    let group = group_of(&dev)?;
    let node = PathBuf::from(format!("/dev/vfio/{group}"));
    let access = Access::Group {
        node: node.clone(),
        id: group,
    };
    let opened = open::open(&dev, &access, Path::new("/dev"))
        .map_err(|source| VanishError::Open { group, source })?;
    let bar = region::info(&opened, 0).map_err(|e| VanishError::Setup(format!("BAR0: {e}")))?;
    let len = (bar.size as usize).min(64 * SMALL);
    let map = region::RegionMap::new(&opened, bar.offset, len, true)
        .map_err(|e| VanishError::Setup(format!("mmap BAR0: {e}")))?;
    // The request IRQ, where the device offers one.
    let req = opened
        .device()
        .get_irq_info(REQ_IRQ_INDEX)
        .map_or(0, |i| i.count);
    let efd = if req > 0 {
        let efd = EventFd::new(EFD_NONBLOCK).map_err(|e| VanishError::Setup(e.to_string()))?;
        opened
            .device()
            .enable_irq(REQ_IRQ_INDEX, vec![&efd])
            .map_err(|e| VanishError::Setup(format!("request IRQ: {e}")))?;
        Some(efd)
    } else {
        None
    };
    let range = Range {
        start: map.addr,
        pages: len / SMALL,
    };
    // Armed where the kernel lets it be (the BAR cells say whether it does); the scenario is
    // about the holder, so an arming refusal is evidence, not the end.
    let mut tracker = match trackers::new(Mechanism::PagemapScan, range) {
        Ok(mut t) => match t.arm() {
            Ok(()) => Ok(t),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };

    // The removal, from another thread: it blocks in the kernel until the device is released.
    let (tx, rx) = mpsc::channel();
    let remove = dev.join("remove");
    let asked = Instant::now();
    std::thread::spawn(move || {
        let r = std::fs::write(&remove, "1");
        let _ = tx.send((r.map_err(|e| e.to_string()), asked.elapsed()));
    });

    // The cell in progress: write a page, harvest, look for the removal; bounded.
    let mut harvests = 0usize;
    let mut reported = 0usize;
    let mut early_remove = None;
    let seen = loop {
        let page = harvests % range.pages;
        // SAFETY: page < the mapped pages; the mapping lives until `map` drops below.
        unsafe { std::ptr::write_volatile((map.addr + page * SMALL) as *mut u64, harvests as u64) };
        if let Ok(t) = tracker.as_mut() {
            match t.harvest() {
                Ok(s) => reported += s.len(),
                Err(e) => break Err(format!("harvest {harvests} failed: {e}")),
            }
        }
        harvests += 1;
        if let Some(fd) = &efd {
            if let Ok(n) = fd.read() {
                break Ok(Seen::RequestIrq(n));
            }
        }
        if !registered(&dev) {
            break Ok(Seen::SysfsGone);
        }
        if let Ok(done) = rx.try_recv() {
            // Removed while held without blocking: recorded, the cell ends all the same.
            early_remove = Some(done);
            break Ok(Seen::SysfsGone);
        }
        if asked.elapsed() > DEADLINE {
            break Err(format!(
                "no sign of the removal within {} s",
                DEADLINE.as_secs()
            ));
        }
        std::thread::sleep(POLL);
    };
    let seen_after = asked.elapsed();
    let tracker = tracker.map(|_| ());
    // The cell ends here: release everything the probe held, in order (the tracker, holding
    // the uffd registration, went just above).
    drop(map);
    // vfio-ioctls 0.10's VfioDevice::drop re-reads the group id from the `iommu_group` link of
    // the path it was given, after closing the device fd, which lets the removal go on and
    // delete the device's link: it panicked here (caught until then) before devices::vfio
    // handed it a stand-in path that outlives the device (devices/src/vfio/standin.rs). Not
    // caught any more: a panic now would be a regression, and PID 1 dying says so loudly.
    drop(opened);
    let drop_note = "released cleanly (vfio-ioctls' drop put the group back through the \
                     stand-in path; no panic)";
    let released = Instant::now();
    let removed = match early_remove {
        Some(r) => Some(r),
        None => rx.recv_timeout(REMOVE_DEADLINE).ok(),
    };
    let armed = match &tracker {
        Ok(_) => format!(
            "{} pages armed WP_ASYNC + PAGEMAP_SCAN, {harvests} write-and-harvest cycles, \
             {reported} pages reported",
            range.pages
        ),
        Err(e) => format!("not armed ({e}), {harvests} CPU writes"),
    };
    let held = format!("held {} (BAR0 mmap'd; {armed})", opened_what(group));
    let irq = if req > 0 {
        format!("request IRQ offered ({req}) and armed")
    } else {
        "no request IRQ offered (VFIO_PCI_REQ_IRQ_INDEX count 0: the mdev samples have no \
         .request op)"
            .to_string()
    };
    let how = match &seen {
        Ok(Seen::RequestIrq(n)) => format!("request IRQ signalled ({n})"),
        Ok(Seen::SysfsGone) => "its vfio-dev/ entry left sysfs".to_string(),
        Err(e) => e.clone(),
    };
    let removal = match removed {
        Some((Ok(()), t)) => format!(
            "the removal completed {} ms after it was asked ({} ms after the release)",
            t.as_millis(),
            t.saturating_sub(released - asked).as_millis()
        ),
        Some((Err(e), _)) => format!("the removal failed: {e}"),
        None => {
            return Err(VanishError::StillBlocked(format!(
                "{held}; {irq}; {how}; everything released ({drop_note}), but the removal is \
                 still blocked {} s later",
                REMOVE_DEADLINE.as_secs()
            )))
        }
    };
    let gone = match std::fs::File::open(&node) {
        Ok(_) => format!("{} still opens", node.display()),
        Err(e) => format!("reopening {}: {e}", node.display()),
    };
    let ev = format!(
        "{held}; {irq}; removal asked through sysfs; {how} after {} ms: the cell ended with \
         ENODEV (device removed while held) and released it: {drop_note}; {removal}; {gone}",
        seen_after.as_millis()
    );
    match seen {
        Ok(_) => Ok(ev),
        Err(_) => Err(VanishError::NotSeen(ev)),
    }
}

fn opened_what(group: u32) -> String {
    format!("{TYPE} instance {UUID} through group {group} in a type1 container")
}
