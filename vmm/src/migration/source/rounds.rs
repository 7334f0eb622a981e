//! Precopy's page traffic: how one round's pages go out (main or the data connections, from a
//! frozen guest in place or through the copying sender), the precopy rounds until the guest
//! can be paused, and the user's pause held through them. Apart from `source.rs` because it is
//! the one part of the source that moves RAM; the state machine around it only decides when.

use std::time::{Duration, Instant};

use super::{MigrateOptions, Writer};
use crate::machine::progress::{MigrationReport, Phase};
use crate::machine::shared::Shared;
use crate::migration::channels::DataChannels;
use crate::migration::devices::SourceDevices;
use crate::migration::pages::{FrozenRam, PageSender, RamView, Sent};
use crate::migration::protocol::{Message, PAGE_SIZE};
use crate::migration::rate::RateLimiter;
use crate::migration::MigrationError;
use crate::tracking::{DirtySet, DirtyTracker};
use crate::vstate::pause::Owner;

/// How a round's pages go: on the data connections if there are any, else on main.
pub(super) struct Pages<'a, 'b> {
    pub(super) sender: &'a mut PageSender<'b>,
    pub(super) rate: &'a mut RateLimiter,
    pub(super) data: Option<&'a mut DataChannels>,
    /// Guest RAM nothing writes now: sent in place (`pages::FrozenRam`).
    pub(super) frozen: Option<FrozenRam<'b>>,
}

/// The pause of a guest its user paused, held by the migration through the precopy rounds
/// (so the user cannot lift it midway), and given back when dropped.
pub(super) struct HeldPause<'a> {
    shared: &'a Shared,
    held: bool,
}

impl<'a> HeldPause<'a> {
    pub(super) fn take(shared: &'a Shared) -> HeldPause<'a> {
        let held = shared.passthrough.is_empty()
            && shared.pause.take_over_parked(Owner::Api, Owner::Migration);
        HeldPause { shared, held }
    }

    pub(super) fn frozen(&self) -> Option<FrozenRam<'a>> {
        // SAFETY: held means every vCPU is parked in the migration's pause, which only the
        // migration lifts (after this value is dropped), and the VM has no device that could
        // write its RAM.
        self.held
            .then(|| unsafe { FrozenRam::new(&self.shared.memory) })
    }
}

impl Drop for HeldPause<'_> {
    fn drop(&mut self) {
        if self.held {
            let _ = self.shared.pause.hand_back(Owner::Migration, Owner::Api);
        }
    }
}

impl Pages<'_, '_> {
    /// Sends the pages of `runs` (gpa, bytes) of round `round` (main's `RoundEnd` is the
    /// caller's).
    pub(super) fn send_round(
        &mut self,
        shared: &Shared,
        opts: &MigrateOptions,
        w: &mut Writer,
        runs: &[(u64, u64)],
        round: u32,
    ) -> Result<Sent, MigrationError> {
        match self.data.as_deref_mut() {
            Some(d) => d.send_round(
                w,
                RamView {
                    memfd: &shared.memfd,
                    ranges: &shared.ranges,
                    frozen: self.frozen,
                },
                runs,
                round,
                opts.bandwidth_mib_s.map(|m| m << 20),
            ),
            None => {
                self.sender.set_frozen(self.frozen);
                let mut sent = Sent::default();
                let result = (|| {
                    for &(gpa, bytes) in runs {
                        sent += self.sender.send_run(w, self.rate, gpa, bytes / PAGE_SIZE)?;
                    }
                    Ok(sent)
                })();
                self.sender.set_frozen(None);
                result
            }
        }
    }

    /// Bytes sent so far on main and the data connections.
    pub(super) fn bytes_sent(&self, w: &Writer) -> u64 {
        w.bytes_sent() + self.data.as_ref().map_or(0, |d| d.bytes_sent())
    }
}

/// Precopy rounds until the estimated downtime is under the target or a limit is reached.
/// Leaves in `dirty` the pages written since the last round sent.
#[allow(clippy::too_many_arguments)]
pub(super) fn precopy_rounds(
    shared: &Shared,
    opts: &MigrateOptions,
    report: &mut MigrationReport,
    w: &mut Writer,
    pages: &mut Pages<'_, '_>,
    mut tracker: Option<&mut (dyn DirtyTracker + '_)>,
    dirty: &mut DirtySet,
    devs: &mut SourceDevices,
) -> Result<(), MigrationError> {
    let started = Instant::now();
    shared.progress().phase = Phase::Precopy;
    // Round 1: all of RAM; each later one, what the tracker saw written during the one before.
    let mut runs: Vec<(u64, u64)> = shared.ranges.iter().map(|r| (r.gpa, r.size)).collect();
    let mut round = 1;
    loop {
        let sent = pages.send_round(shared, opts, w, &runs, round)?;
        devs.send_precopy(w)?;
        w.send(&Message::RoundEnd {
            round,
            pages: sent.pages + sent.zero_pages,
        })?;
        w.flush()?;
        note_round(report, shared, round, sent, pages.bytes_sent(w));
        dirty.clear();
        if let Some(t) = tracker.as_deref_mut() {
            t.harvest(dirty)?;
        }
        let dirty_pages = dirty.count();
        shared.progress().remaining_pages = dirty_pages;
        let elapsed = started.elapsed().as_secs_f64();
        let bandwidth = (pages.bytes_sent(w) as f64 / elapsed.max(1e-6)).max(1.0);
        // The devices' remaining state goes in the downtime too.
        let device_bytes = devs.pending_bytes();
        let estimate_ms = (dirty_pages * PAGE_SIZE + device_bytes) as f64 / bandwidth * 1000.0;
        let why = if estimate_ms <= opts.downtime_ms as f64 {
            Some(format!(
                "converged: {dirty_pages} dirty pages, estimated downtime {estimate_ms:.1} ms <= {} ms",
                opts.downtime_ms
            ))
        } else if report.rounds >= opts.max_rounds {
            Some(format!(
                "round limit {} reached with {dirty_pages} dirty pages (estimate {estimate_ms:.1} ms)",
                opts.max_rounds
            ))
        } else if started.elapsed() >= Duration::from_millis(opts.max_precopy_ms) {
            Some(format!(
                "time limit {} ms reached with {dirty_pages} dirty pages (estimate {estimate_ms:.1} ms)",
                opts.max_precopy_ms
            ))
        } else {
            None
        };
        if let Some(why) = why {
            tracing::info!("precopy switchover after {} rounds: {why}", report.rounds);
            report.switchover = Some(why);
            return Ok(());
        }
        round = report.rounds + 1;
        runs = dirty.runs();
    }
}

pub(super) fn note_round(
    report: &mut MigrationReport,
    shared: &Shared,
    round: u32,
    sent: Sent,
    bytes: u64,
) {
    report.rounds = round;
    report.pages_per_round.push(sent.pages + sent.zero_pages);
    report.pages_sent += sent.pages;
    report.zero_pages += sent.zero_pages;
    report.bytes = bytes;
    let mut p = shared.progress();
    p.round = round;
    p.bytes = bytes;
}
