//! The in-situ tracking scenario with a passed-through device (`TrackingOptions::content_truth`):
//! what a tracking session adds to measure each backend against the content of guest RAM and
//! of the device's memory, phase by phase.
//!
//! Phases are marked by the guest agent (`echo,devtrack:start:LABEL` .. `echo,devtrack:done`;
//! no spaces: the agent's script travels in one word of the kernel command line)
//! and applied at the next round, which the harvester takes with every vCPU parked: switching
//! backends, harvesting and comparing content then happen while no vCPU writes, so a vCPU
//! store is always in the same round for the tracker and for the truth. (Applying a marker
//! in the vCPU thread that printed it, as the workload schedule does, would race the guest's
//! next writes, and that thread cannot park itself.) The device keeps writing during a round:
//! no backend sees its writes, so which round counts them changes nothing.

use std::sync::Arc;

use serde::Serialize;

use super::content_truth::{count_region, Counts, TruthCounts, Watched};
use super::pci::MappedPiece;
use crate::tracking::bar_log::{BarLog, BarSlotRange};
use crate::tracking::{DirtySet, TrackedSlot, TrackerKind, TrackingError};
use crate::vstate::vm::Vm;

/// The agent line (after `AGENT: `) that opens a phase; the rest of the line is its label.
pub const START_MARKER: &str = "echo devtrack:start:";
/// The agent line that closes the open phase.
pub const DONE_MARKER: &str = "echo devtrack:done";

/// A marker seen, to apply at the next round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    Start(String),
    Done,
}

impl Marker {
    pub fn parse(line: &str) -> Option<Marker> {
        if let Some(label) = line.strip_prefix(START_MARKER) {
            return Some(Marker::Start(label.trim().to_string()));
        }
        (line.trim() == DONE_MARKER).then_some(Marker::Done)
    }
}

/// The device memory to watch: its mapped pieces now, asked again at each phase start (a
/// guest BAR move gives the pieces new memslots, never new host addresses).
#[derive(Clone)]
pub struct DeviceMemory {
    /// "00:01.0 BAR1", for reports.
    pub name: String,
    pub pieces: Arc<dyn Fn() -> Vec<MappedPiece> + Send + Sync>,
}

/// Whether a phase's backend saw the device memory, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Coverage {
    pub covered: bool,
    pub how: String,
}

struct WatchedPiece {
    host: u64,
    first_page: u64,
    watched: Watched,
}

pub struct DeviceTruth {
    vm: Arc<Vm>,
    ram: Vec<Watched>,
    device: Option<(DeviceMemory, Vec<WatchedPiece>, u64)>,
    log: Option<BarLog>,
    pub pending: Vec<Marker>,
    scratch: Vec<u64>,
}

impl DeviceTruth {
    /// Copies guest RAM (`slots`) and the device memory as they are now.
    ///
    /// # Safety
    /// The slots' and pieces' host mappings must stay valid for the life of the value.
    pub unsafe fn new(vm: Arc<Vm>, slots: &[TrackedSlot], device: Option<DeviceMemory>) -> Self {
        // SAFETY: vouched for by our caller.
        let ram = slots
            .iter()
            .map(|s| unsafe { Watched::new(s.host, s.size) })
            .collect();
        let device = device.map(|d| {
            let mut first_page = 0;
            let pieces: Vec<WatchedPiece> = (d.pieces)()
                .iter()
                .map(|p| {
                    let w = WatchedPiece {
                        host: p.host,
                        first_page,
                        // SAFETY: vouched for by our caller.
                        watched: unsafe { Watched::new(p.host, p.size) },
                    };
                    first_page += w.watched.pages();
                    w
                })
                .collect();
            (d, pieces, first_page)
        });
        DeviceTruth {
            vm,
            ram,
            device,
            log: None,
            pending: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// The device memory's name and size in pages, if watched.
    pub fn device_memory(&self) -> Option<(String, u64)> {
        self.device.as_ref().map(|(d, _, n)| (d.name.clone(), *n))
    }

    /// Starts logging the device memory for `kind` where its mechanism can; what it covers.
    pub fn start_phase(&mut self, kind: Option<TrackerKind>) -> Result<Coverage, TrackingError> {
        self.log = None;
        let Some((mem, pieces, _)) = &self.device else {
            return Ok(Coverage {
                covered: false,
                how: "no device memory mapped".into(),
            });
        };
        let Some(kind) = kind else {
            return Ok(Coverage {
                covered: false,
                how: "untracked".into(),
            });
        };
        if !BarLog::covers(kind) {
            return Ok(Coverage {
                covered: false,
                how: BarLog::not_covered_reason(kind).into(),
            });
        }
        let now = (mem.pieces)();
        let mut slots = Vec::new();
        for w in pieces {
            match now.iter().find(|p| p.host == w.host).and_then(|p| p.slot) {
                Some(slot) => slots.push(BarSlotRange {
                    slot,
                    first_page: w.first_page,
                    size: w.watched.pages() * crate::memory::PAGE_SIZE,
                }),
                None => {
                    return Ok(Coverage {
                        covered: false,
                        how: format!(
                        "{}: a piece has no memslot now (its BAR moved, or memory decode is off)",
                        mem.name
                    ),
                    })
                }
            }
        }
        let n = slots.len();
        self.log = Some(BarLog::start(kind, self.vm.clone(), slots)?);
        Ok(Coverage {
            covered: true,
            how: format!(
                "KVM_MEM_LOG_DIRTY_PAGES on {n} DeviceBar memslot(s) of {}",
                mem.name
            ),
        })
    }

    pub fn stop_phase(&mut self) -> Result<(), TrackingError> {
        match self.log.take() {
            Some(mut log) => log.stop(),
            None => Ok(()),
        }
    }

    /// One round: compares content, harvests the device memory's log if on, and counts
    /// against `reported` (the RAM backend's harvest; `None` when untracked).
    pub fn round(&mut self, reported: Option<&DirtySet>) -> Result<TruthCounts, TrackingError> {
        let mut out = TruthCounts::default();
        for (i, w) in self.ram.iter_mut().enumerate() {
            let mut changed = vec![0u64; w.pages().div_ceil(64) as usize];
            w.changed(&mut changed);
            let rep = reported
                .and_then(|r| r.slots().get(i))
                .map(|s| &s.words[..]);
            let w = &*w;
            count_region(
                w.pages(),
                &changed,
                rep,
                |p| w.stamped(p),
                &mut out.ram_cpu,
                &mut out.ram_device,
            );
        }
        if let Some((_, pieces, pages)) = &mut self.device {
            let words = pages.div_ceil(64) as usize;
            let mut changed = vec![0u64; words];
            let mut piece_bits = Vec::new();
            for p in pieces.iter_mut() {
                piece_bits.clear();
                piece_bits.resize(p.watched.pages().div_ceil(64) as usize, 0);
                p.watched.changed(&mut piece_bits);
                or_at(&mut changed, p.first_page, &piece_bits, p.watched.pages());
            }
            let reported = match &mut self.log {
                Some(log) => {
                    let mut bits = vec![0u64; words];
                    let mut mark = |first: u64, w: &[u64]| or_at(&mut bits, first, w, u64::MAX);
                    log.harvest(&mut mark, &mut self.scratch)?;
                    Some(bits)
                }
                None => None,
            };
            let mut unused = Counts::default();
            count_region(
                *pages,
                &changed,
                reported.as_deref(),
                |_| true,
                &mut unused,
                &mut out.device_memory,
            );
        }
        Ok(out)
    }
}

/// ORs `src` (bits for pages `first..first + limit`) into `dst` at page `first`.
fn or_at(dst: &mut [u64], first: u64, src: &[u64], limit: u64) {
    for (w, &bits) in src.iter().enumerate() {
        let mut bits = bits;
        while bits != 0 {
            let b = u64::from(bits.trailing_zeros());
            bits &= bits - 1;
            let i = w as u64 * 64 + b;
            if i >= limit {
                break;
            }
            let page = first + i;
            if let Some(d) = dst.get_mut((page / 64) as usize) {
                *d |= 1 << (page % 64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_parse() {
        assert_eq!(
            Marker::parse("echo devtrack:start:dma"),
            Some(Marker::Start("dma".into()))
        );
        assert_eq!(Marker::parse("echo devtrack:done"), Some(Marker::Done));
        assert_eq!(Marker::parse("workload start size_mib=1"), None);
    }

    #[test]
    fn pieces_land_at_their_offsets() {
        let mut dst = vec![0u64; 2];
        or_at(&mut dst, 62, &[0b101], 3);
        assert_eq!(dst, [1 << 62, 1]);
    }
}
