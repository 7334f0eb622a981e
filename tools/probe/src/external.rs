//! Memory the probe did not create (a VFIO BAR mmap, CUDA allocations, a range a GPU reaches
//! through UVM's HMM mode): every CPU-side mechanism tried on it, and, where a device can be
//! made to write it, whether each mechanism sees those device writes. A device write a mechanism
//! does not report is a SILENT MISS: the finding this exists for.
//!
//! The owner of the memory (the cuda or vfio module) keeps it mapped across [`probe`] and
//! supplies the [`DeviceWriter`]; everything armed here (userfaultfds, soft-dirty intervals,
//! scratch VMs) is undone before a cell is returned.

use userfaultfd::RegisterMode;
use vmm::sys::uffd::{FEATURE_WP_ASYNC, FEATURE_WP_UNPOPULATED};

use crate::hmm::trackers::{self, Range};
use crate::kinds::SMALL;
use crate::kvm;
use crate::predict::{predict, predict_device_write, Row};
use crate::rearm;
use crate::report::{Cell, Mechanism, Outcome};
use crate::uffd::Finding;

/// Pages the CPU writes in the CPU check, and the device in the device check: apart, so a
/// report smeared over neighbours shows as a false positive.
pub const CPU_PAGES: [usize; 2] = [2, 6];
pub const DEVICE_PAGES: [usize; 2] = [1, 5];
/// The fewest 4 KiB pages a range must have for those choices.
pub const MIN_PAGES: usize = 8;
/// What the device stores (8 bytes at the start of each of its pages).
pub const DEVICE_VALUE: u64 = 0xd00d_0000_0000_0001;
const CPU_VALUE: u64 = 0xc0de_0000_0000_0002;

/// Why a device write could not be made or did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceFailure {
    /// The errno where the failure was a system call's (a DMA ioctl, test_hmm).
    pub errno: Option<i32>,
    /// The whole reason, e.g. "cuCtxSynchronize: CUDA_ERROR_ILLEGAL_ADDRESS (700)".
    pub why: String,
    /// True when the device faulted on the memory (the access itself failed), as opposed to
    /// the probe failing to issue the write (no context, launch refused before running).
    pub faulted: bool,
}

/// A device that can be made to write memory: a GPU kernel, a DMA engine.
pub trait DeviceWriter {
    /// Who writes, for the evidence: e.g. "GPU kernel (PTX, cuLaunchKernel)".
    fn name(&self) -> String;
    /// Makes the device store `value` (8 bytes, little endian) at the start of each 4 KiB page
    /// index in `pages` of the range starting at `addr`, and returns once the stores are
    /// complete and visible to the CPU. Must not hang: a device stuck on a fault is given up on
    /// after a bounded wait and reported as a failure. The range stays usable afterwards.
    fn write_pages(
        &mut self,
        addr: usize,
        pages: &[usize],
        value: u64,
    ) -> Result<(), DeviceFailure>;
}

/// One range of external memory and how it may be touched.
pub struct External<'a> {
    /// The memory column of its cells, e.g. "CUDA managed (cuMemAllocManaged)".
    pub memory: String,
    /// Which TRACKING.md row it falls in (the predictions).
    pub row: Row,
    /// Page-aligned start and length (a multiple of 4 KiB, at least MIN_PAGES pages).
    pub addr: usize,
    pub len: usize,
    /// The CPU may read it (false: no CPU mapping at all; every CPU mechanism is n/a).
    pub cpu_access: bool,
    /// The CPU and a KVM guest may write it (false for register BARs unless allowed).
    pub cpu_writes: bool,
    pub device: Option<&'a mut dyn DeviceWriter>,
}

impl External<'_> {
    fn range(&self) -> Range {
        Range {
            start: self.addr,
            pages: self.len / SMALL,
        }
    }

    fn valid(&self) -> Result<(), String> {
        if self.addr % SMALL != 0 || self.len % SMALL != 0 || self.len / SMALL < MIN_PAGES {
            return Err(format!(
                "range {:#x}+{:#x} is not {MIN_PAGES}+ aligned 4 KiB pages",
                self.addr, self.len
            ));
        }
        Ok(())
    }
}

/// Which write a cell is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Cpu,
    Device,
}

fn cell(
    ext: &External,
    mech: Mechanism,
    source: Source,
    f: Finding,
    armed: Option<(String, u32)>,
) -> Cell {
    let (outcome, evidence) = f;
    let (armed_by, cycles) = armed.map_or((None, None), |(a, c)| (Some(a), Some(c)));
    let (prediction, step) = match source {
        Source::Cpu => (predict(ext.row, mech), None),
        Source::Device => (
            predict_device_write(ext.row, mech),
            Some(format!(
                "device writes ({})",
                ext.device.as_ref().map_or_else(String::new, |d| d.name())
            )),
        ),
    };
    // The re-armed cycles' verdict has its own label, beside the first arming's.
    let step = match (cycles, step) {
        (Some(n), s) if n > 1 => Some(match s {
            Some(s) => format!("{s}; {}", rearm::step_of(n)),
            None => rearm::step_of(n),
        }),
        (_, s) => s,
    };
    crate::progress(format_args!(
        "{} / {}{}{}: {}",
        ext.memory,
        mech.name(),
        step.as_deref()
            .map_or_else(String::new, |s| format!(" ({s})")),
        armed_by
            .as_deref()
            .map_or_else(String::new, |a| format!(" [armed by {a}]")),
        outcome.short()
    ));
    Cell {
        memory: ext.memory.clone(),
        mechanism: mech,
        step,
        matches_prediction: prediction.matches(&outcome),
        predicted: prediction.text.to_string(),
        outcome,
        evidence,
        armed_by,
        cycles,
    }
}

/// Every mechanism of [`Mechanism::ALL`] on `ext` for CPU writes, then, where there is a device
/// writer, the write trackers and KVM's bitmap for device writes.
pub fn probe(ext: &mut External) -> Vec<Cell> {
    let mut cells = Vec::new();
    if let Err(why) = ext.valid() {
        for mech in Mechanism::ALL {
            let f = (Outcome::Unavailable { why: why.clone() }, why.clone());
            cells.push(cell(ext, mech, Source::Cpu, f, None));
        }
        return cells;
    }
    for mech in Mechanism::ALL {
        for (f, armed) in cpu_cell(ext, mech) {
            cells.push(cell(ext, mech, Source::Cpu, f, armed));
        }
    }
    if ext.device.is_some() {
        // Those that arm no userfaultfd first: TRACKING.md predicts that a GPU access to a
        // range armed with one faults fatally, which can cost the device its context and the
        // later cells their writer. Synchronous WP last: a device write may wait on its handler.
        for mech in [
            Mechanism::SoftDirty,
            Mechanism::KvmDirtyBitmap,
            Mechanism::PagemapScan,
            Mechanism::UffdWp,
        ] {
            for (f, armed) in device_cell(ext, mech) {
                cells.push(cell(ext, mech, Source::Device, f, armed));
            }
        }
    }
    cells
}

/// The uffd registration a mechanism needs, tried on its own so the errno is kept; the uffd is
/// closed again (unregistering) before returning.
fn registration(ext: &External, mech: Mechanism) -> Option<Finding> {
    let (features, mode) = match mech {
        Mechanism::UffdMissing => (0, RegisterMode::MISSING),
        Mechanism::UffdWp => (0, RegisterMode::WRITE_PROTECT),
        Mechanism::UffdMinor => (0, RegisterMode::MINOR),
        Mechanism::UffdWpAsync | Mechanism::PagemapScan => (
            FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED,
            RegisterMode::WRITE_PROTECT,
        ),
        _ => return None,
    };
    let uffd = match crate::uffd::open(features) {
        Ok(u) => u,
        Err(f) => return Some(f),
    };
    match uffd.register_with_mode(ext.addr as *mut _, ext.len, mode) {
        Ok(ioctls) => {
            drop(uffd);
            Some((
                Outcome::Works,
                format!(
                    "UFFDIO_REGISTER {mode:?} (features {features:#x}) accepted over {} pages; \
                     ioctls {ioctls:?}",
                    ext.len / SMALL
                ),
            ))
        }
        Err(e) => Some(crate::uffd::refused(
            &format!("UFFDIO_REGISTER {mode:?} (features {features:#x})"),
            &e,
        )),
    }
}

fn store(addr: usize, page: usize, value: u64) {
    // SAFETY: the caller checked `page` < the range's pages; the owner keeps the range mapped
    // and writable by the CPU (`cpu_writes`) for the whole probe; the store is volatile and no
    // Rust reference to the memory exists.
    unsafe { std::ptr::write_volatile((addr + page * SMALL) as *mut u64, value) }
}

fn load(addr: usize, page: usize) -> u64 {
    // SAFETY: as `store`, for reads (`cpu_access`).
    unsafe { std::ptr::read_volatile((addr + page * SMALL) as *const u64) }
}

fn cpu_cell(ext: &mut External, mech: Mechanism) -> Vec<ArmedFinding> {
    if !ext.cpu_access {
        // Also KVM's: a memslot needs a host mapping of the memory.
        return unarmed((
            Outcome::NotApplicable,
            "no CPU mapping: nothing for a userfaultfd, pagemap or memslot to act on".into(),
        ));
    }
    match mech {
        Mechanism::UffdMissing | Mechanism::UffdMinor => {
            unarmed(registration(ext, mech).unwrap_or_else(|| unreachable_finding(mech)))
        }
        // WP_ASYNC is armed by UFFDIO_WRITEPROTECT once registered; its written-page harvest
        // (and PAGEMAP_SCAN's re-arm) is the PAGEMAP_SCAN cell's.
        Mechanism::UffdWpAsync => {
            let f = registration(ext, mech).unwrap_or_else(|| unreachable_finding(mech));
            let armed = matches!(f.0, Outcome::Works).then(|| {
                (
                    "UFFDIO_REGISTER WP (WP_ASYNC uffd); registration only".to_string(),
                    0,
                )
            });
            vec![(f, armed)]
        }
        Mechanism::UffdWp | Mechanism::PagemapScan | Mechanism::SoftDirty => {
            if let Some(f @ (Outcome::Errno { .. } | Outcome::Unavailable { .. }, _)) =
                registration(ext, mech)
            {
                return unarmed(f);
            }
            if !ext.cpu_writes {
                return unarmed((
                    Outcome::Unavailable {
                        why: "CPU writes to this memory are not made (see the kind's note)".into(),
                    },
                    "registration accepted; no CPU write made, so detection is untried".into(),
                ));
            }
            tracked_writes(ext, mech, Source::Cpu)
        }
        Mechanism::KvmDirtyBitmap | Mechanism::KvmDirtyBitmapManual | Mechanism::KvmDirtyRing => {
            let log = kvm::Log::of(mech);
            unarmed(kvm::dirty_log_external(
                ext.addr,
                ext.len,
                log,
                ext.cpu_writes,
                None,
            ))
        }
        _ => unarmed(unreachable_finding(mech)),
    }
}

fn unreachable_finding(mech: Mechanism) -> Finding {
    let why = format!("{} is not a CPU-side mechanism", mech.name());
    (Outcome::Unavailable { why: why.clone() }, why)
}

/// A finding with how its memory was armed (None: nothing was armed for it).
type ArmedFinding = (Finding, Option<(String, u32)>);

fn unarmed(f: Finding) -> Vec<ArmedFinding> {
    vec![(f, None)]
}

/// The writes of [`rearm::run`]'s cycles, by the CPU or by the device, on 4 KiB pages.
struct CycleWrites<'e, 'd> {
    ext: &'e mut External<'d>,
    source: Source,
    mech: Mechanism,
}

impl rearm::Writes for CycleWrites<'_, '_> {
    fn write(&mut self, units: &[usize], value: u64) -> Result<(), Finding> {
        match self.source {
            Source::Cpu => {
                for &p in units {
                    store(self.ext.addr, p, value);
                }
                Ok(())
            }
            Source::Device => {
                let addr = self.ext.addr;
                let Some(dev) = self.ext.device.as_mut() else {
                    return Err(unreachable_finding(self.mech));
                };
                dev.write_pages(addr, units, value)
                    .map_err(|e| device_failed(e, self.mech))
            }
        }
    }
    fn landed(&mut self, units: &[usize], value: u64) -> Option<usize> {
        self.ext.cpu_access.then(|| {
            units
                .iter()
                .filter(|&&p| load(self.ext.addr, p) == value)
                .count()
        })
    }
    fn unit_of(&self, page: usize) -> usize {
        page
    }
}

/// Arms `mech`'s tracker, runs the write-and-harvest cycles (CPU or device writes) and judges
/// them: the first cycle's verdict (armed by the tracker's own arming) and the re-armed
/// cycles' (armed by each harvest), each with its arming path.
fn tracked_writes(ext: &mut External, mech: Mechanism, source: Source) -> Vec<ArmedFinding> {
    if ext.cpu_writes {
        // Present pages first, as RAM a guest has used is: synchronous WP (without
        // WP_UNPOPULATED) protects only present PTEs, and the first write to a never-touched
        // page would otherwise go unreported for that reason alone.
        for p in 0..ext.len / SMALL {
            store(ext.addr, p, 0);
        }
    }
    let mut tracker = match trackers::new(mech, ext.range()) {
        Ok(t) => t,
        Err(why) => return unarmed((Outcome::Unavailable { why: why.clone() }, why)),
    };
    let who = match source {
        Source::Cpu => "CPU stores".to_string(),
        Source::Device => ext.device.as_ref().map_or_else(String::new, |d| d.name()),
    };
    let value = match source {
        Source::Cpu => CPU_VALUE,
        Source::Device => DEVICE_VALUE,
    };
    let pages = ext.len / SMALL;
    let mut w = CycleWrites { ext, source, mech };
    let got = rearm::run(tracker.as_mut(), pages, &mut w, value);
    // The tracker is dropped (disarmed) before anything else, which releases a device write
    // still waiting on a write-protect fault.
    drop(tracker);
    got.into_iter()
        .map(|a| {
            let (o, ev) = a.finding;
            ((o, format!("{who}: {ev}")), Some((a.armed_by, a.cycles)))
        })
        .collect()
}

/// A device write the CPU cannot read back may never have happened where the mechanism looks
/// (a page moved or copied away): then neither a miss nor a hit can be claimed.
fn not_landed_or(landed: Option<usize>, written: usize, outcome: Outcome, ev: String) -> Finding {
    match landed {
        Some(n) if n < written => (
            Outcome::Unavailable {
                why: format!(
                    "the write is visible to the CPU in only {n} of {written} pages, so the \
                     mechanism's report cannot be judged"
                ),
            },
            ev,
        ),
        _ => (outcome, ev),
    }
}

/// The CPU's read-back of the written pages: proof that the writes happened, so a miss is
/// really a miss. Read after harvesting (a read may migrate managed memory back to the CPU).
fn landed(ext: &External, pages: &[usize]) -> (Option<usize>, String) {
    if !ext.cpu_access {
        return (None, String::new());
    }
    let ok = pages
        .iter()
        .filter(|&&p| load(ext.addr, p) == DEVICE_VALUE)
        .count();
    (
        Some(ok),
        format!(
            "; CPU reads the value back in {ok} of {} written pages",
            pages.len()
        ),
    )
}

fn device_failed(e: DeviceFailure, mech: Mechanism) -> Finding {
    let evidence = format!(
        "{} armed; the device's write failed: {}",
        mech.name(),
        e.why
    );
    match (e.faulted, e.errno) {
        (true, _) => (Outcome::DeviceFault { why: e.why }, evidence),
        (false, Some(code)) => (Outcome::errno(code), evidence),
        (false, None) => (Outcome::Unavailable { why: e.why }, evidence),
    }
}

fn device_cell(ext: &mut External, mech: Mechanism) -> Vec<ArmedFinding> {
    match mech {
        Mechanism::KvmDirtyBitmap | Mechanism::KvmDirtyBitmapManual | Mechanism::KvmDirtyRing => {
            let log = kvm::Log::of(mech);
            if !ext.cpu_access {
                return unarmed((
                    Outcome::NotApplicable,
                    "no CPU mapping: no memslot can be made over it".into(),
                ));
            }
            let (addr, len) = (ext.addr, ext.len);
            let Some(dev) = ext.device.as_mut() else {
                return unarmed(unreachable_finding(mech));
            };
            let mut write = |a: usize| dev.write_pages(a, &DEVICE_PAGES, DEVICE_VALUE);
            let (outcome, ev) = kvm::dirty_log_external(addr, len, log, false, Some(&mut write));
            if !matches!(outcome, Outcome::Works | Outcome::SilentMiss) {
                return unarmed((outcome, ev));
            }
            let (landed, note) = landed(ext, &DEVICE_PAGES);
            unarmed(not_landed_or(
                landed,
                DEVICE_PAGES.len(),
                outcome,
                format!("{ev}{note}"),
            ))
        }
        _ => {
            if ext.cpu_access {
                if let Some(f @ (Outcome::Errno { .. } | Outcome::Unavailable { .. }, _)) =
                    registration(ext, mech)
                {
                    return unarmed((Outcome::NotApplicable, format!("not armed: {}", f.1)));
                }
            } else {
                return unarmed((
                    Outcome::NotApplicable,
                    "no CPU mapping: nothing to arm".into(),
                ));
            }
            tracked_writes(ext, mech, Source::Device)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::Mapping;
    use crate::report::judge;
    use std::collections::BTreeSet;

    /// Stands in for a device only to isolate this module's bookkeeping: it "writes" with the
    /// CPU, which every CPU-side tracker sees, or fails the way a faulting GPU would.
    struct CpuAsDevice {
        fail: Option<DeviceFailure>,
    }

    impl DeviceWriter for CpuAsDevice {
        fn name(&self) -> String {
            "the CPU standing in for a device (unit test)".into()
        }
        fn write_pages(
            &mut self,
            addr: usize,
            pages: &[usize],
            value: u64,
        ) -> Result<(), DeviceFailure> {
            if let Some(f) = self.fail.clone() {
                return Err(f);
            }
            for &p in pages {
                store(addr, p, value);
            }
            Ok(())
        }
    }

    fn is_device(c: &Cell) -> bool {
        c.step
            .as_deref()
            .is_some_and(|s| s.starts_with("device writes"))
    }

    fn anon(pages: usize) -> Mapping {
        Mapping::new(pages * SMALL, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None).unwrap()
    }

    #[test]
    fn judge_names_misses_before_false_positives() {
        let seen: BTreeSet<usize> = [1, 3].into_iter().collect();
        let set = |p: &[usize]| p.iter().copied().collect::<BTreeSet<usize>>();
        assert_eq!(judge(&set(&[1, 5]), &seen).0, Outcome::SilentMiss);
        assert_eq!(judge(&set(&[1]), &seen).0, Outcome::FalsePositive);
        assert_eq!(judge(&set(&[1, 3]), &seen).0, Outcome::Works);
    }

    #[test]
    fn a_short_range_is_refused_in_every_cell() {
        let m = anon(2);
        let mut ext = External {
            memory: "short".into(),
            row: Row::None,
            addr: m.ptr as usize,
            len: m.len,
            cpu_access: true,
            cpu_writes: true,
            device: None,
        };
        let cells = probe(&mut ext);
        assert_eq!(cells.len(), Mechanism::ALL.len());
        assert!(cells
            .iter()
            .all(|c| matches!(c.outcome, Outcome::Unavailable { .. })));
    }

    #[test]
    fn anonymous_memory_through_the_external_path() {
        let m = anon(16);
        let mut dev = CpuAsDevice { fail: None };
        let mut ext = External {
            memory: "anon via external".into(),
            row: Row::PinnedHost,
            addr: m.ptr as usize,
            len: m.len,
            cpu_access: true,
            cpu_writes: true,
            device: Some(&mut dev),
        };
        let cells = probe(&mut ext);
        let get = |mech, device: bool| {
            cells
                .iter()
                .find(|c| c.mechanism == mech && is_device(c) == device)
                .unwrap_or_else(|| panic!("no cell {mech:?} device={device}: {cells:#?}"))
        };
        for mech in [
            Mechanism::UffdMissing,
            Mechanism::UffdWp,
            Mechanism::UffdWpAsync,
            Mechanism::PagemapScan,
        ] {
            assert_eq!(get(mech, false).outcome, Outcome::Works, "{mech:?}");
        }
        // A guest stores into the range, from CPL3 and then from CPL0; KVM logs both passes.
        if std::path::Path::new("/dev/kvm").exists() {
            for mech in [
                Mechanism::KvmDirtyBitmap,
                Mechanism::KvmDirtyBitmapManual,
                Mechanism::KvmDirtyRing,
            ] {
                let c = get(mech, false);
                assert_eq!(c.outcome, Outcome::Works, "{mech:?}: {}", c.evidence);
                assert!(
                    c.evidence.contains("at CPL3") && c.evidence.contains("at CPL0"),
                    "{mech:?}: {}",
                    c.evidence
                );
            }
        }
        assert!(matches!(
            get(Mechanism::UffdMinor, false).outcome,
            Outcome::Errno {
                code: libc::EINVAL,
                ..
            }
        ));
        // The CPU stand-in's stores are CPU stores: the trackers see them, with the read-back.
        let wp = get(Mechanism::UffdWp, true);
        assert_eq!(wp.outcome, Outcome::Works, "{}", wp.evidence);
        assert!(wp.evidence.contains("2 of 2"), "{}", wp.evidence);
        assert_eq!(get(Mechanism::PagemapScan, true).outcome, Outcome::Works);
        // KVM never sees host stores: the bitmap misses them whoever makes them.
        let k = get(Mechanism::KvmDirtyBitmap, true);
        assert!(
            matches!(k.outcome, Outcome::SilentMiss | Outcome::Unavailable { .. }),
            "{k:?}"
        );
    }

    #[test]
    fn a_device_fault_is_reported_as_such() {
        let m = anon(8);
        let mut dev = CpuAsDevice {
            fail: Some(DeviceFailure {
                errno: None,
                why: "GPU fault (test)".into(),
                faulted: true,
            }),
        };
        let mut ext = External {
            memory: "faulting".into(),
            row: Row::HmmMalloc,
            addr: m.ptr as usize,
            len: m.len,
            cpu_access: true,
            cpu_writes: true,
            device: Some(&mut dev),
        };
        let cells = probe(&mut ext);
        let wp = cells
            .iter()
            .find(|c| c.mechanism == Mechanism::UffdWp && is_device(c))
            .unwrap();
        assert!(matches!(wp.outcome, Outcome::DeviceFault { .. }), "{wp:?}");
        assert_eq!(wp.matches_prediction, Some(true));
    }
}
