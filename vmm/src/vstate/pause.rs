//! Pausing and resuming vCPU threads. A pause makes every vCPU leave KVM_RUN, finish any port
//! or MMIO access KVM still has to complete, optionally save its complete state, and park until
//! resumed. Migration pauses the source for the stop-and-copy and takes the saved states; the
//! API's `pause` and `resume` use the same path without saving.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::kick::Kicker;
use super::state::VcpuState;

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the guest is not running (it already stopped)")]
    NotRunning,
    #[error("{parked} of {total} vCPUs parked within {ms} ms; the rest did not leave guest mode")]
    Timeout {
        parked: usize,
        total: usize,
        ms: u64,
    },
    #[error("vcpu{id} could not save its state: {reason}")]
    Save { id: u8, reason: String },
    #[error("already paused")]
    AlreadyPaused,
    #[error("not paused")]
    NotPaused,
}

#[derive(Default)]
struct Inner {
    requested: bool,
    save: bool,
    /// Live vCPU threads (a vCPU that stopped for good is no longer counted).
    live: usize,
    parked: usize,
    /// Per vCPU id: the state saved when it parked (if asked).
    states: Vec<Option<Result<VcpuState, String>>>,
    /// Bumped at each resume, so a parked vCPU knows its pause ended even if another began.
    epoch: u64,
}

/// Shared by the vCPU threads and whoever pauses them.
#[derive(Default)]
pub struct PauseControl {
    /// Fast path for the vCPU loop: checked before every KVM_RUN.
    requested: AtomicBool,
    inner: Mutex<Inner>,
    cv: Condvar,
}

impl PauseControl {
    pub fn new(vcpus: usize) -> Self {
        PauseControl {
            requested: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                live: vcpus,
                states: vec![None; vcpus],
                ..Default::default()
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_paused(&self) -> bool {
        self.lock().requested
    }

    /// vCPU side: a pause is pending.
    pub fn pause_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// vCPU side: does this pause want the vCPU's state saved?
    pub fn wants_state(&self) -> bool {
        self.lock().save
    }

    /// vCPU side: park until resumed, leaving `state` for the pauser. Returns at once if the
    /// pause was already lifted.
    pub fn park(&self, id: u8, state: Option<Result<VcpuState, String>>) {
        let mut g = self.lock();
        if !g.requested {
            return;
        }
        if let Some(slot) = g.states.get_mut(id as usize) {
            *slot = state;
        }
        g.parked += 1;
        let epoch = g.epoch;
        self.cv.notify_all();
        while g.requested && g.epoch == epoch {
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.parked -= 1;
    }

    /// vCPU side: this vCPU stopped for good (guest exit, fault, VMM stop).
    pub fn vcpu_finished(&self) {
        let mut g = self.lock();
        g.live = g.live.saturating_sub(1);
        self.cv.notify_all();
    }

    /// Pauses every vCPU and waits until all have parked; with `save`, returns each vCPU's
    /// state (index = vCPU id). On failure the pause is lifted again.
    pub fn pause(
        &self,
        kicker: &Kicker,
        save: bool,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, PauseError> {
        {
            let mut g = self.lock();
            if g.requested {
                return Err(PauseError::AlreadyPaused);
            }
            if g.live == 0 {
                return Err(PauseError::NotRunning);
            }
            g.requested = true;
            g.save = save;
            for s in g.states.iter_mut() {
                *s = None;
            }
            self.requested.store(true, Ordering::Release);
        }
        let deadline = Instant::now() + timeout;
        loop {
            {
                let g = self.lock();
                if g.live == 0 {
                    drop(g);
                    self.lift();
                    return Err(PauseError::NotRunning);
                }
                if g.parked >= g.live {
                    break;
                }
                if Instant::now() > deadline {
                    let (parked, total) = (g.parked, g.live);
                    drop(g);
                    self.lift();
                    return Err(PauseError::Timeout {
                        parked,
                        total,
                        ms: timeout.as_millis() as u64,
                    });
                }
            }
            // A vCPU in KVM_RUN only sees the request once it exits.
            kicker.kick_all_and_wait(Duration::from_millis(20));
            let g = self.lock();
            if g.parked < g.live {
                let _ = self
                    .cv
                    .wait_timeout(g, Duration::from_millis(5))
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
        if !save {
            return Ok(Vec::new());
        }
        let mut g = self.lock();
        let mut out = Vec::new();
        for (id, slot) in g.states.iter_mut().enumerate() {
            match slot.take() {
                Some(Ok(s)) => out.push(s),
                Some(Err(reason)) => {
                    drop(g);
                    self.lift();
                    return Err(PauseError::Save {
                        id: id as u8,
                        reason,
                    });
                }
                None => {
                    drop(g);
                    self.lift();
                    return Err(PauseError::Save {
                        id: id as u8,
                        reason: "it stopped before parking".into(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Resumes parked vCPUs.
    pub fn resume(&self) -> Result<(), PauseError> {
        if !self.lock().requested {
            return Err(PauseError::NotPaused);
        }
        self.lift();
        Ok(())
    }

    fn lift(&self) {
        let mut g = self.lock();
        g.requested = false;
        g.save = false;
        g.epoch += 1;
        self.requested.store(false, Ordering::Release);
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pause_waits_for_every_vcpu_and_resume_releases_them() {
        let ctl = Arc::new(PauseControl::new(2));
        let kicker = Kicker::default();
        let done = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..2u8)
            .map(|id| {
                let ctl = ctl.clone();
                let done = done.clone();
                std::thread::spawn(move || {
                    let mut parks = 0;
                    while !done.load(Ordering::Acquire) {
                        if ctl.pause_requested() {
                            ctl.park(id, None);
                            parks += 1;
                        }
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    ctl.vcpu_finished();
                    parks
                })
            })
            .collect();
        ctl.pause(&kicker, false, Duration::from_secs(5)).unwrap();
        assert!(ctl.is_paused());
        assert!(matches!(
            ctl.pause(&kicker, false, Duration::from_secs(1)),
            Err(PauseError::AlreadyPaused)
        ));
        ctl.resume().unwrap();
        assert!(matches!(ctl.resume(), Err(PauseError::NotPaused)));
        done.store(true, Ordering::Release);
        for t in threads {
            assert!(t.join().unwrap() >= 1);
        }
        assert!(matches!(
            ctl.pause(&kicker, false, Duration::from_secs(1)),
            Err(PauseError::NotRunning)
        ));
    }

    #[test]
    fn a_vcpu_that_never_parks_times_out_and_lifts_the_pause() {
        let ctl = PauseControl::new(1);
        let err = ctl
            .pause(&Kicker::default(), false, Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(
            err,
            PauseError::Timeout {
                parked: 0,
                total: 1,
                ..
            }
        ));
        assert!(!ctl.is_paused());
    }
}
