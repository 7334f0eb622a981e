//! Write-and-harvest cycles on one armed tracker (hmm/trackers.rs), the way the tracking
//! backends run them: armed once, then each harvest both reports and re-arms for the next
//! interval (the uffd-wp backend with UFFDIO_WRITEPROTECT, the uffd-wp-async backend with
//! PAGEMAP_SCAN's PM_SCAN_WP_MATCHING, soft-dirty with clear_refs). The first cycle is judged on
//! its own (armed by the tracker's `arm`) and the following [`REARMED_CYCLES`] together (each
//! armed by the harvest before it), so a mechanism whose verdict depends on the arming path
//! shows both. Pages written in one cycle are written again in a later one: a re-arm that does
//! not re-protect a page already reported shows as a miss there.

use std::collections::BTreeSet;

use crate::hmm::trackers::{self, Range, Tracker};
use crate::kinds::{self, Kind, SMALL};
use crate::predict;
use crate::report::{Cell, Mechanism, Outcome};
use crate::uffd::Finding;
use crate::ProbeOpts;

/// The mechanisms that harvest and re-arm: the tracking backends' three.
pub const TRACKERS: [Mechanism; 3] = [
    Mechanism::UffdWp,
    Mechanism::PagemapScan,
    Mechanism::SoftDirty,
];

/// What the cycle cells' `step` says, apart from the single-write cells of the same kind.
pub const STEP: &str = "write-and-harvest cycles";

/// The step label of a cycle verdict covering `cycles` cycles: the first arming's or the
/// re-arms' (distinct labels, so both show in the report's matrix).
pub fn step_of(cycles: u32) -> String {
    if cycles <= 1 {
        "cycle 1, first arming".into()
    } else {
        format!("cycles 2-{}, re-armed by each harvest", cycles + 1)
    }
}

/// Cycles after the first, each armed by the previous harvest.
pub const REARMED_CYCLES: usize = 3;

/// One judged verdict with how its memory was armed and how many cycles it covers.
#[derive(Debug, Clone)]
pub struct Armed {
    pub finding: Finding,
    pub armed_by: String,
    pub cycles: u32,
}

/// The units written in each cycle (first, then the re-armed ones), among `units` (>= 4).
/// Spread and overlapping: cycle 2 rewrites a unit of cycle 1, cycle 4 repeats cycle 1.
pub fn cycle_units(units: usize) -> [Vec<usize>; 1 + REARMED_CYCLES] {
    let (a, b, c, d) = (1, 2, units / 2, units.saturating_sub(1));
    let set = |v: [usize; 2]| -> Vec<usize> {
        let s: BTreeSet<usize> = v.into_iter().collect();
        s.into_iter().collect()
    };
    [set([a, c]), set([a, b]), set([c, d]), set([a, c])]
}

/// How a cycle's writes are made and checked, by the memory's owner.
pub trait Writes {
    /// Writes `value` into each unit of `units`; Err ends the run with that finding.
    fn write(&mut self, units: &[usize], value: u64) -> Result<(), Finding>;
    /// How many of `units` read back `value` (None: the CPU cannot read it back); read after
    /// the harvest, so a read cannot disturb what the mechanism saw.
    fn landed(&mut self, units: &[usize], value: u64) -> Option<usize>;
    /// The unit that 4 KiB page `page` of the tracked range belongs to.
    fn unit_of(&self, page: usize) -> usize;
}

/// What one cycle saw, for the evidence.
struct Cycle {
    written: BTreeSet<usize>,
    seen: BTreeSet<usize>,
    landed: Option<usize>,
}

impl Cycle {
    fn missed(&self) -> usize {
        self.written.difference(&self.seen).count()
    }
    fn extra(&self) -> usize {
        self.seen.difference(&self.written).count()
    }
    fn text(&self, n: usize) -> String {
        let landed = match self.landed {
            Some(l) => format!(", read back in {l} of {}", self.written.len()),
            None => String::new(),
        };
        format!(
            "cycle {n}: wrote {:?}{landed}, reported {:?} ({} missed, {} false positives)",
            self.written,
            self.seen,
            self.missed(),
            self.extra()
        )
    }
}

/// The verdict over `cycles`: a write not visible to the CPU makes it unjudgeable, then a
/// miss in any cycle outranks a false positive.
fn verdict(cycles: &[Cycle], first: usize) -> Finding {
    let text: Vec<String> = cycles
        .iter()
        .enumerate()
        .map(|(i, c)| c.text(first + i))
        .collect();
    let evidence = text.join("; ");
    if let Some(c) = cycles
        .iter()
        .find(|c| c.landed.is_some_and(|l| l < c.written.len()))
    {
        let why = format!(
            "the writes are visible to the CPU in only {} of {} units, so the report cannot be \
             judged",
            c.landed.unwrap_or(0),
            c.written.len()
        );
        return (Outcome::Unavailable { why }, evidence);
    }
    let missed: usize = cycles.iter().map(Cycle::missed).sum();
    let extra: usize = cycles.iter().map(Cycle::extra).sum();
    (Outcome::of_write_check(missed, extra), evidence)
}

fn unavailable(why: String) -> Finding {
    (Outcome::Unavailable { why: why.clone() }, why)
}

/// Arms `t`, checks that nothing is reported before any write, then runs the cycles; returns
/// the first cycle's verdict and the re-armed cycles' verdict (one entry where the run ended
/// before the re-armed cycles). `value` is what cycle 1 writes (cycle n writes value + n - 1).
pub fn run(t: &mut dyn Tracker, units: usize, w: &mut dyn Writes, value: u64) -> Vec<Armed> {
    let first_by = t.armed_by().to_string();
    let one = |finding: Finding, by: &str, cycles: u32| {
        vec![Armed {
            finding,
            armed_by: by.to_string(),
            cycles,
        }]
    };
    if let Err(why) = t.arm() {
        return one(unavailable(format!("arming: {why}")), &first_by, 0);
    }
    // Nothing written since arming: anything reported now is reported for nothing (clear_refs
    // skips DMA-pinned pages, for one), and would hide a miss among the written pages.
    match t.peek() {
        Ok(stuck) if !stuck.is_empty() => {
            let units_seen: BTreeSet<usize> = stuck.iter().map(|&p| w.unit_of(p)).collect();
            let f = (
                Outcome::FalsePositive,
                format!(
                    "armed, and with nothing written {} reported units {units_seen:?} (0 \
                     missed, {} false positives): they cannot be cleared here, so writes \
                     cannot be told apart",
                    t.mechanism().name(),
                    units_seen.len()
                ),
            );
            return one(f, &first_by, 0);
        }
        Ok(_) => {}
        Err(why) => return one(unavailable(format!("first read: {why}")), &first_by, 0),
    }
    let sets = cycle_units(units);
    let mut done: Vec<Cycle> = Vec::new();
    for (i, set) in sets.iter().enumerate() {
        let v = value.wrapping_add(i as u64);
        if let Err(f) = w.write(set, v) {
            let by = if i == 0 { &first_by } else { t.rearmed_by() };
            let mut out = Vec::new();
            if i > 0 {
                out.push(Armed {
                    finding: verdict(&done[..1], 1),
                    armed_by: first_by.clone(),
                    cycles: 1,
                });
            }
            let f = (f.0, format!("cycle {}: {}", i + 1, f.1));
            out.push(Armed {
                finding: f,
                armed_by: by.to_string(),
                cycles: i as u32,
            });
            return out;
        }
        let seen = match t.harvest() {
            Ok(s) => s.iter().map(|&p| w.unit_of(p)).collect(),
            Err(why) => {
                let f = unavailable(format!("cycle {} harvest: {why}", i + 1));
                return one(f, &first_by, i as u32);
            }
        };
        let landed = w.landed(set, v);
        done.push(Cycle {
            written: set.iter().copied().collect(),
            seen,
            landed,
        });
    }
    vec![
        Armed {
            finding: verdict(&done[..1], 1),
            armed_by: first_by,
            cycles: 1,
        },
        Armed {
            finding: verdict(&done[1..], 2),
            armed_by: t.rearmed_by().to_string(),
            cycles: REARMED_CYCLES as u32,
        },
    ]
}

/// CPU writes to a memory kind's units (one 8-byte store at +0x40 in each).
struct KindWrites<'a> {
    region: &'a kinds::Region,
}

impl Writes for KindWrites<'_> {
    fn write(&mut self, units: &[usize], value: u64) -> Result<(), Finding> {
        for &u in units {
            // SAFETY: u < the region's units (cycle_units), so the 8 bytes at +0x40 lie inside
            // the mapping, which `self.region` keeps alive; a volatile store, no reference.
            unsafe { std::ptr::write_volatile(self.region.unit_addr(u).add(0x40).cast(), value) };
        }
        Ok(())
    }
    fn landed(&mut self, units: &[usize], value: u64) -> Option<usize> {
        let read = |u: usize| {
            // SAFETY: as in `write`, for a read.
            unsafe { std::ptr::read_volatile(self.region.unit_addr(u).add(0x40).cast::<u64>()) }
        };
        Some(units.iter().filter(|&&u| read(u) == value).count())
    }
    fn unit_of(&self, page: usize) -> usize {
        page * SMALL / self.region.kind.unit()
    }
}

/// The cycle cells of `mech` on a fresh region of `kind`: the first arming's and the re-arms'.
pub fn on_kind(kind: Kind, mech: Mechanism, opts: &ProbeOpts) -> Vec<Cell> {
    let prediction = predict::predict(kind.row(), mech);
    let mk = |finding: Finding, armed: Option<(String, u32)>| {
        let (outcome, evidence) = finding;
        crate::progress(format_args!(
            "{} / {} ({STEP}, armed by {}): {}",
            kind.name(),
            mech.name(),
            armed.as_ref().map_or("-", |a| a.0.as_str()),
            outcome.short()
        ));
        let step = match &armed {
            Some((_, n)) => format!("{STEP}: {}", step_of(*n)),
            None => STEP.to_string(),
        };
        Cell {
            memory: kind.name(),
            mechanism: mech,
            step: Some(step),
            matches_prediction: prediction.matches(&outcome),
            predicted: prediction.text.to_string(),
            outcome,
            evidence,
            armed_by: armed.as_ref().map(|a| a.0.clone()),
            cycles: armed.map(|a| a.1),
        }
    };
    let region = match kinds::create(kind, &opts.file_dir) {
        Ok(r) => r,
        Err(why) => return vec![mk(unavailable(why), None)],
    };
    if !region.cpu_access {
        let f = (
            Outcome::NotApplicable,
            "the CPU may not write this memory (guest-private)".to_string(),
        );
        return vec![mk(f, None)];
    }
    // Present first, as a guest's used RAM is (sync WP protects only present PTEs).
    region.populate();
    let range = Range {
        start: region.addr() as usize,
        pages: region.len / SMALL,
    };
    let mut t = match trackers::new_with_granule(mech, range, kind.unit()) {
        Ok(t) => t,
        Err(why) => {
            // Registration refused: the errno is the single-write cell's; here, why not tried.
            let f = (
                Outcome::NotApplicable,
                format!("not armed: {why} (see the single-write cell)"),
            );
            return vec![mk(f, None)];
        }
    };
    let mut w = KindWrites { region: &region };
    let got = run(t.as_mut(), kind.units(), &mut w, 0xc1c1_0000_0000_0001);
    drop(t);
    got.into_iter()
        .map(|a| mk(a.finding, Some((a.armed_by, a.cycles))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hmm::trackers::{self, Range};
    use crate::kinds::{Mapping, SMALL};
    use crate::report::Mechanism;

    #[test]
    fn cycles_overlap_and_stay_in_range() {
        for units in [4, 8, 16] {
            let sets = cycle_units(units);
            for s in &sets {
                assert!(!s.is_empty() && s.iter().all(|&u| u < units), "{sets:?}");
            }
            assert_eq!(sets[0], sets[3]);
            assert!(sets[1].iter().any(|u| sets[0].contains(u)));
        }
    }

    struct Cpu<'a>(&'a Mapping);

    impl Writes for Cpu<'_> {
        fn write(&mut self, units: &[usize], value: u64) -> Result<(), Finding> {
            for &u in units {
                // SAFETY: u < the mapping's pages; a volatile store, no reference exists.
                unsafe { std::ptr::write_volatile(self.0.ptr.add(u * SMALL).cast(), value) };
            }
            Ok(())
        }
        fn landed(&mut self, units: &[usize], value: u64) -> Option<usize> {
            // SAFETY: as in `write`, for reads.
            let read = |u: usize| unsafe {
                std::ptr::read_volatile(self.0.ptr.add(u * SMALL).cast::<u64>())
            };
            Some(units.iter().filter(|&&u| read(u) == value).count())
        }
        fn unit_of(&self, page: usize) -> usize {
            page
        }
    }

    /// Real trackers on real anonymous memory: each arming path is named, and the uffd ones
    /// (present since 5.7 / 6.7) agree with their evidence wherever they register.
    #[test]
    fn every_tracker_names_both_arming_paths() {
        for mech in [
            Mechanism::UffdWp,
            Mechanism::PagemapScan,
            Mechanism::SoftDirty,
        ] {
            let m =
                Mapping::new(16 * SMALL, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, None).unwrap();
            for p in 0..16 {
                // SAFETY: p < 16 pages of `m`.
                unsafe { std::ptr::write_volatile(m.ptr.add(p * SMALL), 1u8) };
            }
            let range = Range {
                start: m.ptr as usize,
                pages: 16,
            };
            let Ok(mut t) = trackers::new(mech, range) else {
                continue;
            };
            let got = run(t.as_mut(), 16, &mut Cpu(&m), 0xabc0);
            drop(t);
            assert!(!got.is_empty());
            let first = &got[0];
            assert!(!first.armed_by.is_empty());
            if got.len() == 2 {
                assert_ne!(got[0].armed_by, got[1].armed_by, "{mech:?}");
                assert_eq!(got[1].cycles, REARMED_CYCLES as u32);
                for a in &got {
                    // The verdict agrees with the counts in its own evidence.
                    let misses = a.finding.1.matches("(0 missed").count();
                    let cycles = a.finding.1.matches("cycle ").count();
                    if a.finding.0 == Outcome::Works {
                        assert_eq!(misses, cycles, "{a:?}");
                    }
                }
            }
        }
    }
}
