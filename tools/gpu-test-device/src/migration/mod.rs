//! VFIO migration v2: the device state machine, the source's data stream (PRE_COPY and
//! STOP_COPY) and the destination's loader (RESUMING).
//!
//! States are linux/vfio.h's. The device makes the spec's direct transitions (RUNNING <->
//! STOP, RUNNING -> PRE_COPY, PRE_COPY -> RUNNING, PRE_COPY -> STOP_COPY, STOP <-> STOP_COPY,
//! STOP <-> RESUMING) and PRE_COPY -> STOP (what the kernel makes of PRE_COPY -> PRE_COPY_P2P
//! -> RUNNING_P2P -> STOP on a device without P2P). Any other request between supported states
//! follows the shortest path through those, never through PRE_COPY, STOP_COPY or RESUMING on
//! the way (RUNNING -> STOP_COPY goes through STOP; STOP -> PRE_COPY through RUNNING). ERROR,
//! the P2P states and unknown values are refused with EINVAL; ERROR is left only by a reset.
//!
//! Engines run in RUNNING and PRE_COPY only: every other state closes the engines' gate, so a
//! running engine waits where it was (its job and position are part of the device state).
//!
//! The stream format is in `stream`; `vram` finds the VRAM pages to send.

pub mod stream;
mod vram;

use gpu_test_device::pci::PAGE_SIZE;
use vfio_bindings::bindings::vfio::{VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY};

use crate::config_space::{ConfigError, Identity};
use crate::engines::PageLog;
use crate::memory::DeviceMemory;
use states::{PRE_COPY, RESUMING, RUNNING, STOP, STOP_COPY};
use stream::{DeviceState, Parser, Record, StreamError, KIND_DEVICE_STATE, KIND_END};
use vram::VramTracker;

/// What VFIO_DEVICE_FEATURE_MIGRATION answers.
pub const FLAGS: u64 = (VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY) as u64;

/// Failures of migration requests; each answers the client with an errno.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("no transition from state {from} to {to}")]
    Transition { from: u32, to: u32 },
    #[error("migration data {0} in state {1}")]
    WrongState(&'static str, u32),
    #[error("migration stream refused")]
    Stream(#[from] StreamError),
    #[error("restoring config space")]
    Config(#[from] ConfigError),
}

impl MigrationError {
    /// Every refusal is the client's request or stream: EINVAL, as the kernel answers.
    pub fn errno(&self) -> i32 {
        libc::EINVAL
    }
}

/// The next state on the way from `from` to `to` (`from != to`); `None`: refused.
pub fn next_step(from: u32, to: u32) -> Option<u32> {
    match (from, to) {
        (RUNNING, STOP | PRE_COPY)
        | (STOP, RUNNING | STOP_COPY | RESUMING)
        | (PRE_COPY, RUNNING | STOP_COPY | STOP)
        | (STOP_COPY, STOP)
        | (RESUMING, STOP) => Some(to),
        (RUNNING, STOP_COPY | RESUMING) => Some(STOP),
        (PRE_COPY, RESUMING) => Some(STOP),
        (STOP, PRE_COPY) => Some(RUNNING),
        (STOP_COPY | RESUMING, RUNNING | PRE_COPY | STOP_COPY | RESUMING) => Some(STOP),
        _ => None,
    }
}

/// Whether the engines may run in `state`.
pub fn engines_run(state: u32) -> bool {
    state == RUNNING || state == PRE_COPY
}

/// The device's migration side: its state, and the stream being saved or loaded.
pub struct Migration {
    pub enabled: bool,
    /// Fault injection for tests (`--crash-at`): the process exits, without a reply, when
    /// asked to go to this state, as a device server dying at that step would.
    pub crash_at: Option<u32>,
    pub state: u32,
    pub saver: Option<Saver>,
    pub loader: Option<Loader>,
}

impl Migration {
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            crash_at: None,
            state: RUNNING,
            saver: None,
            loader: None,
        }
    }

    /// Back to RUNNING with no stream (device reset).
    pub fn reset(&mut self) {
        self.state = RUNNING;
        self.saver = None;
        self.loader = None;
    }
}

/// The states of linux/vfio.h this device has (`enum vfio_device_mig_state`).
pub mod states {
    use vfio_bindings::bindings::vfio as v;

    /// A state by the name `--crash-at` takes.
    pub fn by_name(name: &str) -> Option<u32> {
        Some(match name {
            "stop" => STOP,
            "running" => RUNNING,
            "stop-copy" => STOP_COPY,
            "resuming" => RESUMING,
            "pre-copy" => PRE_COPY,
            _ => return None,
        })
    }

    pub const ERROR: u32 = v::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR;
    pub const STOP: u32 = v::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP;
    pub const RUNNING: u32 = v::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING;
    pub const STOP_COPY: u32 = v::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY;
    pub const RESUMING: u32 = v::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING;
    pub const PRE_COPY: u32 = v::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// PRE_COPY: VRAM passes, each read ending short when its pass ends.
    Precopy,
    /// STOP_COPY: one last pass, then the device state and the end.
    Final,
    Done,
}

/// The source's stream: a header, VRAM records, then (STOP_COPY) the state and the end.
pub struct Saver {
    tracker: VramTracker,
    /// Records made and not yet read (a record may be read in pieces).
    outbox: Vec<u8>,
    taken: usize,
    phase: Phase,
}

impl Saver {
    /// A new stream from a device of `identity`: every page is still to send.
    pub fn new(identity: &Identity) -> Self {
        let mut outbox = Vec::new();
        stream::header(&mut outbox, identity);
        Self {
            tracker: VramTracker::new(identity.vram_size),
            outbox,
            taken: 0,
            phase: Phase::Precopy,
        }
    }

    /// STOP_COPY: the device no longer changes, one more pass from here covers everything.
    pub fn begin_final(&mut self) {
        self.tracker.start_pass();
        self.phase = Phase::Final;
    }

    /// Fills the front of `buf`; returns how much. In PRE_COPY a read ends short where a
    /// pass over VRAM ends (the next read starts another); in STOP_COPY only at the end.
    pub fn read(
        &mut self,
        buf: &mut [u8],
        vram: &DeviceMemory,
        written: &PageLog,
        state: &dyn Fn() -> Vec<u8>,
    ) -> usize {
        let mut filled = 0;
        let mut pass_ended = false;
        loop {
            let ready = &self.outbox[self.taken..];
            let n = ready.len().min(buf.len() - filled);
            buf[filled..filled + n].copy_from_slice(&ready[..n]);
            filled += n;
            self.taken += n;
            if filled == buf.len() {
                return filled;
            }
            self.outbox.clear();
            self.taken = 0;
            let want = buf.len() - filled;
            match self.phase {
                Phase::Precopy if pass_ended => return filled,
                Phase::Precopy => {
                    if !self.tracker.in_pass() {
                        self.tracker.start_pass();
                    }
                    self.tracker.scan(vram, written, &mut self.outbox, want);
                    pass_ended = !self.tracker.in_pass();
                }
                Phase::Final if self.tracker.in_pass() => {
                    self.tracker.scan(vram, written, &mut self.outbox, want);
                }
                Phase::Final => {
                    stream::record(&mut self.outbox, KIND_DEVICE_STATE, &[&state()]);
                    stream::record(&mut self.outbox, KIND_END, &[]);
                    self.phase = Phase::Done;
                }
                Phase::Done => return filled,
            }
        }
    }

    /// Bytes still to come, as far as known: records waiting, VRAM known to be changed, and
    /// (`state_len`) the device state and end records.
    pub fn estimate(&self, written: &PageLog, state_len: u64) -> u64 {
        let pending = (self.outbox.len() - self.taken) as u64;
        match self.phase {
            Phase::Done => pending,
            _ => pending + self.tracker.estimate(written) + state_len,
        }
    }
}

/// The destination's side: VRAM records go to VRAM as they arrive, the device state is kept
/// until the stream is known to be whole (RESUMING -> STOP applies it).
pub struct Loader {
    parser: Parser,
    state: Option<Box<DeviceState>>,
}

impl Loader {
    pub fn new(identity: Identity) -> Self {
        Self {
            parser: Parser::new(identity),
            state: None,
        }
    }

    /// The next piece of the stream (split anywhere).
    pub fn write(&mut self, data: &[u8], vram: &DeviceMemory) -> Result<(), StreamError> {
        let state = &mut self.state;
        self.parser.feed(data, &mut |record| match record {
            Record::Data { offset, pages } => {
                // The parser checked the range against the VRAM size.
                if let Some(slice) = vram.mapping().slice(offset, pages.len() as u64) {
                    slice.copy_from(pages);
                }
            }
            Record::Zero { offset, count } => zero(vram, offset, count * PAGE_SIZE),
            Record::State(device) => *state = Some(device),
            Record::End => {}
        })
    }

    /// The device state, if the whole stream arrived and was valid.
    pub fn finish(self) -> Result<DeviceState, StreamError> {
        self.parser.finish()?;
        self.state.map(|s| *s).ok_or(StreamError::Incomplete)
    }
}

/// Zeroes `[offset, offset + len)` of VRAM: a hole punched in the memfd keeps it sparse;
/// where that fails, zeros written.
fn zero(vram: &DeviceMemory, offset: u64, len: u64) {
    let (Ok(at), Ok(size)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return;
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on our own memfd touches no memory of ours; the range was checked
    // to lie inside VRAM, and the mappings of it read zeros afterwards.
    if unsafe { libc::fallocate(vram.raw_fd(), mode, at, size) } == 0 {
        return;
    }
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done);
        if let Some(slice) = vram.mapping().slice(offset + done, n) {
            slice.copy_from(&zeros[..n as usize]);
        }
        done += n;
    }
}

#[cfg(test)]
mod tests {
    use super::states::ERROR;
    use super::*;

    const ALL: [u32; 9] = [ERROR, STOP, RUNNING, STOP_COPY, RESUMING, 5, PRE_COPY, 7, 8];

    #[test]
    fn every_path_ends_at_its_target_without_passing_saving_or_resuming_states() {
        for from in [STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY] {
            for to in [STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY] {
                let mut at = from;
                let mut steps = 0;
                while at != to {
                    at = next_step(at, to).unwrap_or_else(|| panic!("{from} -> {to}"));
                    steps += 1;
                    assert!(steps <= 3, "{from} -> {to} loops");
                    let passing = at != to;
                    assert!(
                        !(passing && [PRE_COPY, STOP_COPY, RESUMING].contains(&at)),
                        "{from} -> {to} passes through {at}"
                    );
                }
            }
        }
    }

    #[test]
    fn error_p2p_and_unknown_states_are_refused() {
        for state in ALL {
            assert_eq!(next_step(ERROR, state), None);
            assert_eq!(next_step(state, ERROR), None);
            for p2p in [5, 7, 8, u32::MAX] {
                assert_eq!(next_step(state, p2p), None);
            }
        }
    }
}
