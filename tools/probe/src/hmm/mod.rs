//! HMM ranges, probed for real on the kernel's emulated HMM device (test_hmm, present in the lab
//! guest: `guest-images/build.sh --lab`). For each mechanism (uffd WP, WP_ASYNC + PAGEMAP_SCAN,
//! soft-dirty), armed before or after pages migrate to device-private memory, one anonymous
//! region goes through the life cycle below and every step is a row: what was written, what the
//! mechanism reported, and whether a write was missed (SILENT MISS) or invented (FALSE POSITIVE).
//!
//! 1. migrate pages 1-4 to the device (HMM_DMIRROR_MIGRATE_TO_DEV): no write;
//! 2. the device writes pages 1-2 while they are device-private (HMM_DMIRROR_WRITE);
//! 3. the CPU writes pages 1 and 3: each CPU fault migrates its page back to RAM;
//! 4. the CPU writes pages 1 and 3 again (now ordinary RAM);
//! 5. the device writes page 6, which never left RAM (hmm_range_fault on the CPU page table).
//!
//! Pagemap shows where each page is (device-private entries read as swap entries, bit 62), and
//! after step 3 the CPU reads back what the device wrote in step 2: proof that the device write
//! happened, so a mechanism that did not report it really missed it.

pub mod dmirror;
pub mod trackers;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use vmm::sys::pagemap::{Pagemap, PM_PRESENT, PM_SWAP};

use crate::kinds::{Mapping, SMALL};
use crate::predict::{predict_hmm, HmmStep};
use crate::report::{errno_name, judge, Cell, Mechanism, Outcome};
use dmirror::Dmirror;
use trackers::{Range, Tracker};

/// Pages in the region; see the module docs for which ones each step touches.
const PAGES: usize = 8;
const MIGRATED: [usize; 4] = [1, 2, 3, 4];
const DEVICE_WRITES: [usize; 2] = [1, 2];
const CPU_WRITES: [usize; 2] = [1, 3];
const DEVICE_WRITE_IN_RAM: usize = 6;
/// What the device writes (every byte of its pages), and what the CPU writes (one byte).
const DEVICE_BYTE: u8 = 0xd1;
const CPU_OFFSET: usize = 0x80;

/// Synchronous uffd WP last: its CPU writes block on the handler thread, the likeliest place
/// for a run to hang.
pub const MECHANISMS: [Mechanism; 3] = [
    Mechanism::SoftDirty,
    Mechanism::PagemapScan,
    Mechanism::UffdWp,
];

/// The first test_hmm device node under `dev` (device 0 is device-private).
pub fn find_device(dev: &Path) -> Option<PathBuf> {
    let p = dev.join("hmm_dmirror0");
    p.exists().then_some(p)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Armed {
    BeforeMigration,
    AfterMigration,
}

impl Armed {
    fn memory(self) -> String {
        match self {
            Armed::BeforeMigration => "HMM anon, armed before migration".into(),
            Armed::AfterMigration => "HMM anon, armed after migration".into(),
        }
    }
}

/// Every life-cycle row for every mechanism, both arming points.
pub fn lifecycle(path: &Path) -> Vec<Cell> {
    let mut cells = Vec::new();
    for armed in [Armed::BeforeMigration, Armed::AfterMigration] {
        for mech in MECHANISMS {
            cells.extend(one_run(path, mech, armed));
        }
    }
    cells
}

fn step_name(step: HmmStep) -> &'static str {
    match step {
        HmmStep::MigrateToDevice => "1 migrate pages 1-4 to device",
        HmmStep::DeviceWriteOnDevice => "2 device writes pages 1-2 (device-private)",
        HmmStep::CpuWriteMigratesBack => "3 CPU writes pages 1,3 (migrate back to RAM)",
        HmmStep::CpuWriteAgain => "4 CPU writes pages 1,3 again (RAM)",
        HmmStep::DeviceWriteInRam => "5 device writes page 6 (in RAM)",
    }
}

fn cell(armed: Armed, mech: Mechanism, step: HmmStep, outcome: Outcome, evidence: String) -> Cell {
    let p = predict_hmm(mech, step);
    crate::progress(format_args!(
        "{}: {} / {}: {}: {evidence}",
        armed.memory(),
        step_name(step),
        mech.name(),
        outcome.short()
    ));
    Cell {
        memory: armed.memory(),
        mechanism: mech,
        step: Some(step_name(step).into()),
        matches_prediction: p.matches(&outcome),
        predicted: p.text.to_string(),
        outcome,
        evidence,
        armed_by: None,
        cycles: None,
    }
}

fn unavailable(armed: Armed, mech: Mechanism, step: HmmStep, why: String) -> Cell {
    cell(
        armed,
        mech,
        step,
        Outcome::Unavailable { why: why.clone() },
        why,
    )
}

/// The region under test: 8 private anonymous 4 KiB pages, every one written once.
struct Region {
    map: Mapping,
}

impl Region {
    fn new() -> Result<Region, String> {
        let map = Mapping::new(PAGES * SMALL, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None)
            .map_err(|e| format!("mmap: {e}"))?;
        // SAFETY: advice on exactly the mapping just created.
        unsafe { libc::madvise(map.ptr.cast(), map.len, libc::MADV_NOHUGEPAGE) };
        let r = Region { map };
        for i in 0..PAGES {
            r.cpu_write(i, 0x11);
        }
        Ok(r)
    }
    fn page(&self, i: usize) -> *mut u8 {
        self.map.ptr.wrapping_add(i * SMALL)
    }
    fn range(&self) -> Range {
        Range {
            start: self.map.ptr as usize,
            pages: PAGES,
        }
    }
    fn cpu_write(&self, i: usize, v: u8) {
        // SAFETY: page i < PAGES lies in the mapping, which lives as long as `self`.
        unsafe { std::ptr::write_volatile(self.page(i).add(CPU_OFFSET), v) };
    }
    fn cpu_read(&self, i: usize, off: usize) -> u8 {
        // SAFETY: as in cpu_write; off < SMALL.
        unsafe { std::ptr::read_volatile(self.page(i).add(off)) }
    }
    /// Where each page is: 'R' present in RAM, 'D' a swap-type entry (device-private here:
    /// there is no swap in the lab guest), '-' not mapped, '?' unreadable.
    fn placement(&self) -> String {
        let mut e = Vec::new();
        match Pagemap::open_self().and_then(|p| p.read_entries(self.map.ptr as u64, PAGES, &mut e))
        {
            Ok(()) => e
                .iter()
                .map(|v| match (v & PM_PRESENT != 0, v & PM_SWAP != 0) {
                    (true, _) => 'R',
                    (false, true) => 'D',
                    _ => '-',
                })
                .collect(),
            Err(_) => "?".repeat(PAGES),
        }
    }
    fn on_device(&self, i: usize) -> bool {
        self.placement().as_bytes().get(i) == Some(&b'D')
    }
}

fn errno_text(code: i32) -> String {
    format!("{} ({code})", errno_name(code))
}

/// One life cycle for `mech`, armed at `armed`.
fn one_run(path: &Path, mech: Mechanism, armed: Armed) -> Vec<Cell> {
    let first = if armed == Armed::BeforeMigration {
        HmmStep::MigrateToDevice
    } else {
        HmmStep::DeviceWriteOnDevice
    };
    let dev = match Dmirror::open(path) {
        Ok(d) => d,
        Err(e) => {
            return vec![unavailable(
                armed,
                mech,
                first,
                format!("open {}: {e}", path.display()),
            )]
        }
    };
    let region = match Region::new() {
        Ok(r) => r,
        Err(why) => return vec![unavailable(armed, mech, first, why)],
    };
    let mut tracker = match trackers::new(mech, region.range()) {
        Ok(t) => t,
        Err(why) => {
            return vec![unavailable(
                armed,
                mech,
                first,
                format!("registration: {why}"),
            )]
        }
    };
    let mut rows = Vec::new();
    match run_steps(&dev, &region, tracker.as_mut(), armed, &mut rows) {
        Ok(()) => {}
        Err((step, why)) => rows.push(unavailable(armed, mech, step, why)),
    }
    // Each row judges one harvest: the first was armed by the tracker's own arming, every later
    // one by the harvest before it (item 4: the arming path named on every written-page row).
    for (i, row) in rows.iter_mut().enumerate() {
        if matches!(row.outcome, Outcome::Unavailable { .. }) {
            continue;
        }
        let by = if i == 0 {
            tracker.armed_by()
        } else {
            tracker.rearmed_by()
        };
        row.armed_by = Some(by.to_string());
        row.cycles = Some(1);
    }
    // The tracker (uffd, handler thread) goes before the region; remaining device-private pages
    // are freed with the mapping.
    drop(tracker);
    drop(region);
    rows
}

type StepErr = (HmmStep, String);

fn run_steps(
    dev: &Dmirror,
    region: &Region,
    t: &mut dyn Tracker,
    armed: Armed,
    rows: &mut Vec<Cell>,
) -> Result<(), StepErr> {
    let mech = t.mechanism();
    let harvest =
        |t: &mut dyn Tracker, step| t.harvest().map_err(|e| (step, format!("harvest: {e}")));
    let arm = |t: &mut dyn Tracker, step| t.arm().map_err(|e| (step, format!("arm: {e}")));

    // 1. Migration to the device.
    let step = HmmStep::MigrateToDevice;
    crate::progress(format_args!(
        "{} / {}: start {}",
        armed.memory(),
        mech.name(),
        step_name(step)
    ));
    if armed == Armed::BeforeMigration {
        arm(t, step)?;
    }
    let before = region.placement();
    let mut copy = vec![0u8; MIGRATED.len() * SMALL];
    let done = dev
        .migrate_to_dev(region.page(MIGRATED[0]), &mut copy)
        .map_err(|e| {
            (
                step,
                format!("HMM_DMIRROR_MIGRATE_TO_DEV: {}", errno_text(e)),
            )
        })?;
    let after = region.placement();
    if !MIGRATED.iter().all(|&i| region.on_device(i)) {
        return Err((
            step,
            format!(
                "pages 1-4 not device-private after MIGRATE_TO_DEV (cpages {}; placement {before} -> {after})",
                done.cpages
            ),
        ));
    }
    if armed == Armed::BeforeMigration {
        let seen = harvest(t, step)?;
        let (outcome, judged) = judge(&BTreeSet::new(), &seen);
        rows.push(cell(
            armed,
            mech,
            step,
            outcome,
            format!(
                "MIGRATE_TO_DEV moved {} pages (placement {before} -> {after}, R=RAM D=device); {judged}",
                done.cpages
            ),
        ));
    } else {
        arm(t, HmmStep::DeviceWriteOnDevice)?;
    }

    // 2. The device writes device-private pages.
    let step = HmmStep::DeviceWriteOnDevice;
    crate::progress(format_args!(
        "{} / {}: start {}",
        armed.memory(),
        mech.name(),
        step_name(step)
    ));
    let data = vec![DEVICE_BYTE; DEVICE_WRITES.len() * SMALL];
    let device_wrote = dev.write(region.page(DEVICE_WRITES[0]), &data);
    let seen = harvest(t, step)?;
    let after = region.placement();
    rows.push(match device_wrote {
        Ok(d) => {
            let written: BTreeSet<usize> = DEVICE_WRITES.into_iter().collect();
            let (outcome, judged) = judge(&written, &seen);
            cell(
                armed,
                mech,
                step,
                outcome,
                format!(
                    "HMM_DMIRROR_WRITE ok ({} pages, {} device faults), placement after {after}; {judged}",
                    d.cpages, d.faults
                ),
            )
        }
        Err(e) => cell(
            armed,
            mech,
            step,
            Outcome::errno(e),
            format!(
                "HMM_DMIRROR_WRITE refused with {}: the armed mechanism made the device-private \
                 entries read-only and test_hmm cannot upgrade them (placement {after}); reported {seen:?}",
                errno_text(e)
            ),
        ),
    });

    // 3. The CPU writes device-private pages: each write faults them back to RAM.
    let step = HmmStep::CpuWriteMigratesBack;
    crate::progress(format_args!(
        "{} / {}: start {}",
        armed.memory(),
        mech.name(),
        step_name(step)
    ));
    let before = region.placement();
    for i in CPU_WRITES {
        region.cpu_write(i, 0xc1);
    }
    let seen = harvest(t, step)?;
    let after = region.placement();
    let device_byte = region.cpu_read(DEVICE_WRITES[0], 0);
    let proof = match device_wrote {
        Ok(_) if device_byte == DEVICE_BYTE => {
            format!("CPU reads the device's {DEVICE_BYTE:#04x} back from page 1: the device write landed")
        }
        Ok(_) => format!(
            "CPU reads {device_byte:#04x} from page 1, not the device's {DEVICE_BYTE:#04x}: the device write was LOST"
        ),
        Err(_) => format!("page 1 holds {device_byte:#04x} (the device write was refused)"),
    };
    let written: BTreeSet<usize> = CPU_WRITES.into_iter().collect();
    let (outcome, judged) = judge(&written, &seen);
    rows.push(cell(
        armed,
        mech,
        step,
        outcome,
        format!("placement {before} -> {after}; {proof}; {judged}"),
    ));

    // 4. The CPU writes the same pages again, now in RAM.
    let step = HmmStep::CpuWriteAgain;
    for i in CPU_WRITES {
        region.cpu_write(i, 0xc2);
    }
    let seen = harvest(t, step)?;
    let (outcome, judged) = judge(&written, &seen);
    rows.push(cell(armed, mech, step, outcome, judged));

    // 5. The device writes a page that never left RAM.
    let step = HmmStep::DeviceWriteInRam;
    crate::progress(format_args!(
        "{} / {}: start {}",
        armed.memory(),
        mech.name(),
        step_name(step)
    ));
    let data = vec![DEVICE_BYTE; SMALL];
    let wrote = dev.write(region.page(DEVICE_WRITE_IN_RAM), &data);
    let seen = harvest(t, step)?;
    let readback = region.cpu_read(DEVICE_WRITE_IN_RAM, 0);
    rows.push(match wrote {
        Ok(d) => {
            let written: BTreeSet<usize> = [DEVICE_WRITE_IN_RAM].into_iter().collect();
            let (outcome, judged) = judge(&written, &seen);
            cell(
                armed,
                mech,
                step,
                outcome,
                format!(
                    "HMM_DMIRROR_WRITE ok ({} pages, {} device faults), CPU reads back {readback:#04x}; {judged}",
                    d.cpages, d.faults
                ),
            )
        }
        Err(e) => cell(
            armed,
            mech,
            step,
            Outcome::errno(e),
            format!(
                "HMM_DMIRROR_WRITE refused with {}: hmm_range_fault's write fault hit the armed \
                 mechanism; reported {seen:?}",
                errno_text(e)
            ),
        ),
    });
    Ok(())
}
