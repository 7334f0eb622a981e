//! Pausing and resuming vCPU threads. A pause makes every vCPU leave KVM_RUN, finish the port or
//! MMIO access KVM still has to complete, and park until resumed. Only once *all* of them have
//! parked are their states saved (if asked): a vCPU saved while another still ran could miss an
//! IPI or interrupt sent to it in between, while the VM-wide state saved afterwards would show
//! it delivered. Migration pauses the source for the stop-and-copy and takes the saved states;
//! the API's `pause` and `resume` use the same path without saving. A pause has an owner, and
//! only its owner may lift it: the API cannot resume a guest a migration has stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::kick::Kicker;
use super::state::{StateError, VcpuState};

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
    /// `reason` says what happened instead of a save (none in time, the vCPU stopped): a
    /// message; a failed save is `SaveState`.
    #[error("vcpu{id} could not save its state: {reason}")]
    Save { id: u8, reason: String },
    #[error("vcpu{id} could not save its state: {source}")]
    SaveState {
        id: u8,
        #[source]
        source: StateError,
    },
    #[error("already paused (by {0})")]
    AlreadyPaused(Owner),
    #[error("not paused")]
    NotPaused,
    #[error("the pause belongs to {0}; it cannot be lifted from here")]
    NotOwner(Owner),
}

/// Who paused the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Api,
    Migration,
    /// The API's `finish` (micro guest), for the moment it sets the budget.
    Finish,
    /// A tracking round measured against content (the device scenario).
    Tracking,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Owner::Api => "an API pause",
            Owner::Migration => "a migration",
            Owner::Finish => "a finish request",
            Owner::Tracking => "a tracking round",
        })
    }
}

/// A vCPU's answer to a save request.
pub type Saved = Result<VcpuState, StateError>;

#[derive(Default)]
struct Inner {
    owner: Option<Owner>,
    /// Live vCPU threads (a vCPU that stopped for good is no longer counted).
    live: usize,
    /// Per vCPU id: the pause epoch it is parked in, if any.
    parked_in: Vec<Option<u64>>,
    /// Bumped at each resume, so a parked vCPU knows its pause ended even if another began.
    epoch: u64,
    /// Bumped by the pauser to ask every parked vCPU for its state.
    save_gen: u64,
    states: Vec<Option<Saved>>,
}

impl Inner {
    fn parked(&self) -> usize {
        let e = self.epoch;
        self.parked_in.iter().filter(|p| **p == Some(e)).count()
    }
    fn saved(&self) -> usize {
        self.states.iter().filter(|s| s.is_some()).count()
    }
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
                parked_in: vec![None; vcpus],
                states: std::iter::repeat_with(|| None).take(vcpus).collect(),
                ..Default::default()
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_paused(&self) -> bool {
        self.lock().owner.is_some()
    }

    pub fn owner(&self) -> Option<Owner> {
        self.lock().owner
    }

    /// vCPU side: a pause is pending.
    pub fn pause_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// vCPU side: park until resumed. While parked, `save` runs (on this thread) each time the
    /// pauser asks for the states. Returns at once if the pause was already lifted.
    pub fn park(&self, id: u8, save: &mut dyn FnMut() -> Saved) {
        let idx = id as usize;
        let mut g = self.lock();
        if g.owner.is_none() || idx >= g.parked_in.len() {
            return;
        }
        let epoch = g.epoch;
        let mut seen_gen = g.save_gen;
        g.parked_in[idx] = Some(epoch);
        self.cv.notify_all();
        while g.owner.is_some() && g.epoch == epoch {
            if g.save_gen != seen_gen {
                seen_gen = g.save_gen;
                drop(g);
                let state = save();
                g = self.lock();
                if g.epoch == epoch && g.save_gen == seen_gen {
                    g.states[idx] = Some(state);
                    self.cv.notify_all();
                }
                continue;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.parked_in[idx] = None;
    }

    /// vCPU side: this vCPU stopped for good (guest exit, fault, VMM stop).
    pub fn vcpu_finished(&self, id: u8) {
        let mut g = self.lock();
        g.live = g.live.saturating_sub(1);
        if let Some(p) = g.parked_in.get_mut(id as usize) {
            *p = None;
        }
        self.cv.notify_all();
    }

    /// Waits on the condition variable until `done` or the deadline; false on timeout.
    fn wait_until(
        &self,
        kicker: Option<&Kicker>,
        deadline: Instant,
        done: impl Fn(&Inner) -> Result<bool, PauseError>,
    ) -> Result<bool, PauseError> {
        loop {
            {
                let g = self.lock();
                if done(&g)? {
                    return Ok(true);
                }
                if Instant::now() > deadline {
                    return Ok(false);
                }
            }
            // A vCPU in KVM_RUN only sees the request once it exits.
            if let Some(k) = kicker {
                k.kick_all_and_wait(Duration::from_millis(20));
            }
            let g = self.lock();
            if !done(&g)? {
                let _ = self
                    .cv
                    .wait_timeout(g, Duration::from_millis(5))
                    .unwrap_or_else(|p| p.into_inner());
            }
        }
    }

    /// Pauses every vCPU for `owner` and waits until all have parked; with `save`, then asks
    /// each for its state and returns them (index = vCPU id). On failure the pause is lifted.
    pub fn pause(
        &self,
        kicker: &Kicker,
        owner: Owner,
        save: bool,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, PauseError> {
        {
            let mut g = self.lock();
            if let Some(o) = g.owner {
                return Err(PauseError::AlreadyPaused(o));
            }
            if g.live == 0 {
                return Err(PauseError::NotRunning);
            }
            g.owner = Some(owner);
            for s in g.states.iter_mut() {
                *s = None;
            }
            self.requested.store(true, Ordering::Release);
        }
        let deadline = Instant::now() + timeout;
        let all_parked = self.wait_until(Some(kicker), deadline, |g| {
            if g.live == 0 {
                return Err(PauseError::NotRunning);
            }
            Ok(g.parked() >= g.live)
        });
        match all_parked {
            Ok(true) => {}
            Ok(false) => {
                let (parked, total) = {
                    let g = self.lock();
                    (g.parked(), g.live)
                };
                self.lift();
                return Err(PauseError::Timeout {
                    parked,
                    total,
                    ms: timeout.as_millis() as u64,
                });
            }
            Err(e) => {
                self.lift();
                return Err(e);
            }
        }
        if !save {
            return Ok(Vec::new());
        }
        let saved = self.save_parked(deadline);
        if saved.is_err() {
            self.lift();
        }
        saved
    }

    /// The states of every vCPU of a VM that `owner` paused earlier (a snapshot of a VM paused
    /// through the API): the pause stays as it was, also on failure.
    pub fn states_while_paused(
        &self,
        owner: Owner,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, PauseError> {
        {
            let g = self.lock();
            match g.owner {
                None => return Err(PauseError::NotPaused),
                Some(o) if o != owner => return Err(PauseError::NotOwner(o)),
                Some(_) => {}
            }
        }
        let deadline = Instant::now() + timeout;
        let parked = self.wait_until(None, deadline, |g| {
            if g.live == 0 {
                return Err(PauseError::NotRunning);
            }
            Ok(g.parked() >= g.live)
        })?;
        if !parked {
            let g = self.lock();
            return Err(PauseError::Timeout {
                parked: g.parked(),
                total: g.live,
                ms: timeout.as_millis() as u64,
            });
        }
        {
            let mut g = self.lock();
            for s in g.states.iter_mut() {
                *s = None;
            }
        }
        self.save_parked(deadline)
    }

    /// Every vCPU is parked (out of the guest): asks each for its state (index = vCPU id).
    fn save_parked(&self, deadline: Instant) -> Result<Vec<VcpuState>, PauseError> {
        {
            let mut g = self.lock();
            g.save_gen += 1;
            self.cv.notify_all();
        }
        let saved = self.wait_until(None, deadline, |g| {
            if g.live < g.parked_in.len() {
                return Err(PauseError::NotRunning);
            }
            Ok(g.saved() >= g.states.len())
        });
        match saved {
            Ok(true) => {}
            Ok(false) => {
                return Err(PauseError::Save {
                    id: 0,
                    reason: "not every vCPU saved its state in time".into(),
                });
            }
            Err(e) => return Err(e),
        }
        let mut g = self.lock();
        let mut out = Vec::new();
        for (id, slot) in g.states.iter_mut().enumerate() {
            match slot.take() {
                Some(Ok(s)) => out.push(s),
                Some(Err(source)) => {
                    return Err(PauseError::SaveState {
                        id: id as u8,
                        source,
                    })
                }
                None => {
                    return Err(PauseError::Save {
                        id: id as u8,
                        reason: "it stopped before saving".into(),
                    })
                }
            }
        }
        Ok(out)
    }

    /// `pause` with the states saved, unless `user` holds a pause already (a migration of a
    /// guest paused through the API, as QEMU migrates a stopped VM): then `owner` takes that
    /// pause over, so that `user` cannot lift it midway, and asks for the states. Returns them
    /// and whether the pause was taken over. On failure a taken-over pause is `user`'s again
    /// (the guest stays paused, as it was left); a new one is lifted.
    pub fn pause_or_take_over(
        &self,
        kicker: &Kicker,
        owner: Owner,
        user: Owner,
        timeout: Duration,
    ) -> Result<(Vec<VcpuState>, bool), PauseError> {
        // `user` may pause between the look and `pause`: one more look then.
        for _ in 0..3 {
            let taken = {
                let mut g = self.lock();
                let taken = g.owner == Some(user);
                if taken {
                    g.owner = Some(owner);
                }
                taken
            };
            if taken {
                return match self.states_while_paused(owner, timeout) {
                    Ok(states) => Ok((states, true)),
                    Err(e) => {
                        let _ = self.hand_back(owner, user);
                        Err(e)
                    }
                };
            }
            match self.pause(kicker, owner, true, timeout) {
                Err(PauseError::AlreadyPaused(o)) if o == user => continue,
                r => return r.map(|states| (states, false)),
            }
        }
        Err(PauseError::AlreadyPaused(user))
    }

    /// Gives `from`'s pause to `to` without lifting it: the guest stays paused, and only `to`
    /// can resume it now.
    pub fn hand_back(&self, from: Owner, to: Owner) -> Result<(), PauseError> {
        let mut g = self.lock();
        match g.owner {
            None => Err(PauseError::NotPaused),
            Some(o) if o != from => Err(PauseError::NotOwner(o)),
            Some(_) => {
                g.owner = Some(to);
                Ok(())
            }
        }
    }

    /// Takes `from`'s pause over for `to` if every vCPU is parked in it now (a migration of a
    /// guest its user paused holds that pause from its start). False, and nothing changed,
    /// otherwise.
    pub fn take_over_parked(&self, from: Owner, to: Owner) -> bool {
        let mut g = self.lock();
        if g.owner == Some(from) && g.parked() >= g.live {
            g.owner = Some(to);
            true
        } else {
            false
        }
    }

    /// Before any vCPU runs: each parks, in `owner`'s pause, before it first enters the guest
    /// (a migrated guest its user had paused).
    pub fn hold(&self, owner: Owner) {
        let mut g = self.lock();
        g.owner = Some(owner);
        self.requested.store(true, Ordering::Release);
    }

    /// Resumes the vCPUs parked by `owner`'s pause.
    pub fn resume(&self, owner: Owner) -> Result<(), PauseError> {
        match self.lock().owner {
            None => return Err(PauseError::NotPaused),
            Some(o) if o != owner => return Err(PauseError::NotOwner(o)),
            Some(_) => {}
        }
        self.lift();
        Ok(())
    }

    /// Runs `f` while every vCPU stays parked in `owner`'s pause: nobody can lift the pause
    /// (a `resume` from another API connection waits) until `f` returns. `f` must be short and
    /// must not pause or resume. Refused when the guest is not paused by `owner`.
    pub fn while_paused<R>(&self, owner: Owner, f: impl FnOnce() -> R) -> Result<R, PauseError> {
        let g = self.lock();
        match g.owner {
            None => return Err(PauseError::NotPaused),
            Some(o) if o != owner => return Err(PauseError::NotOwner(o)),
            Some(_) => {}
        }
        if g.parked() < g.live {
            return Err(PauseError::NotPaused);
        }
        let r = f();
        drop(g);
        Ok(r)
    }

    /// Lifts any pause, whoever owns it: the VM is ending (parked vCPUs must see the stop).
    pub fn release_all(&self) {
        self.lift();
    }

    fn lift(&self) {
        let mut g = self.lock();
        g.owner = None;
        g.epoch += 1;
        self.requested.store(false, Ordering::Release);
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn spawn_vcpus(
        ctl: &Arc<PauseControl>,
        n: u8,
        done: &Arc<AtomicBool>,
    ) -> Vec<std::thread::JoinHandle<u32>> {
        (0..n)
            .map(|id| {
                let ctl = ctl.clone();
                let done = done.clone();
                std::thread::spawn(move || {
                    let mut saves = 0;
                    while !done.load(Ordering::Acquire) {
                        if ctl.pause_requested() {
                            ctl.park(id, &mut || {
                                saves += 1;
                                Err(StateError::Invalid(format!(
                                    "vcpu{id} has no KVM state in this test"
                                )))
                            });
                        }
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    ctl.vcpu_finished(id);
                    saves
                })
            })
            .collect()
    }

    #[test]
    fn pause_waits_for_every_vcpu_and_only_its_owner_resumes() {
        let ctl = Arc::new(PauseControl::new(2));
        let kicker = Kicker::default();
        let done = Arc::new(AtomicBool::new(false));
        let threads = spawn_vcpus(&ctl, 2, &done);
        ctl.pause(&kicker, Owner::Api, false, Duration::from_secs(5))
            .unwrap();
        assert!(ctl.is_paused());
        assert!(matches!(
            ctl.pause(&kicker, Owner::Migration, false, Duration::from_secs(1)),
            Err(PauseError::AlreadyPaused(Owner::Api))
        ));
        assert!(matches!(
            ctl.resume(Owner::Migration),
            Err(PauseError::NotOwner(Owner::Api))
        ));
        // While paused: `while_paused` runs for the owner only, with every vCPU parked.
        assert_eq!(ctl.while_paused(Owner::Api, || 7).unwrap(), 7);
        // A migration may hold the user's pause while every vCPU is parked in it, and give it
        // back; it never takes a pause that is not the user's.
        assert!(!ctl.take_over_parked(Owner::Finish, Owner::Migration));
        assert!(ctl.take_over_parked(Owner::Api, Owner::Migration));
        assert!(matches!(
            ctl.resume(Owner::Api),
            Err(PauseError::NotOwner(Owner::Migration))
        ));
        ctl.hand_back(Owner::Migration, Owner::Api).unwrap();
        assert_eq!(ctl.owner(), Some(Owner::Api));
        assert!(matches!(
            ctl.while_paused(Owner::Finish, || ()),
            Err(PauseError::NotOwner(Owner::Api))
        ));
        // A snapshot inside the API's pause asks every parked vCPU for its state and leaves
        // the pause as it was, also when a save fails.
        assert!(matches!(
            ctl.states_while_paused(Owner::Migration, Duration::from_secs(1)),
            Err(PauseError::NotOwner(Owner::Api))
        ));
        let err = ctl
            .states_while_paused(Owner::Api, Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(err, PauseError::SaveState { .. }), "{err}");
        assert_eq!(ctl.owner(), Some(Owner::Api));
        ctl.resume(Owner::Api).unwrap();
        assert!(matches!(ctl.resume(Owner::Api), Err(PauseError::NotPaused)));
        assert!(matches!(
            ctl.while_paused(Owner::Api, || ()),
            Err(PauseError::NotPaused)
        ));
        assert!(matches!(
            ctl.states_while_paused(Owner::Api, Duration::from_secs(1)),
            Err(PauseError::NotPaused)
        ));
        // A save-pause asks every parked vCPU once, after all parked; a failed save lifts it.
        let err = ctl
            .pause(&kicker, Owner::Migration, true, Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(err, PauseError::SaveState { .. }), "{err}");
        assert!(!ctl.is_paused());
        // Back-to-back pauses right after a resume do not see stale parked vCPUs.
        for _ in 0..20 {
            ctl.pause(&kicker, Owner::Api, false, Duration::from_secs(5))
                .unwrap();
            ctl.resume(Owner::Api).unwrap();
        }
        done.store(true, Ordering::Release);
        // Each vCPU saved twice: for the snapshot inside the API's pause and the save-pause.
        for t in threads {
            assert_eq!(t.join().unwrap(), 2);
        }
        assert!(matches!(
            ctl.pause(&kicker, Owner::Api, false, Duration::from_secs(1)),
            Err(PauseError::NotRunning)
        ));
    }

    #[test]
    fn a_migration_takes_over_the_users_pause_and_gives_it_back_on_failure() {
        let ctl = Arc::new(PauseControl::new(2));
        let kicker = Kicker::default();
        let done = Arc::new(AtomicBool::new(false));
        // Held before any vCPU runs (a migrated guest its user had paused): each parks first.
        ctl.hold(Owner::Api);
        let threads = spawn_vcpus(&ctl, 2, &done);
        // The test's vCPUs fail their saves: a taken-over pause goes back to the user, still
        // paused, so the API cannot resume the guest midway but can once it failed.
        let err = ctl
            .pause_or_take_over(
                &kicker,
                Owner::Migration,
                Owner::Api,
                Duration::from_secs(5),
            )
            .unwrap_err();
        assert!(matches!(err, PauseError::SaveState { .. }), "{err}");
        assert_eq!(ctl.owner(), Some(Owner::Api));
        ctl.while_paused(Owner::Api, || ()).unwrap();
        // A pause nobody held is taken anew and lifted on failure.
        ctl.resume(Owner::Api).unwrap();
        let err = ctl
            .pause_or_take_over(
                &kicker,
                Owner::Migration,
                Owner::Api,
                Duration::from_secs(5),
            )
            .unwrap_err();
        assert!(matches!(err, PauseError::SaveState { .. }), "{err}");
        assert!(!ctl.is_paused());
        // Given back only by its owner, and never lifted by it.
        ctl.pause(&kicker, Owner::Migration, false, Duration::from_secs(5))
            .unwrap();
        assert!(matches!(
            ctl.hand_back(Owner::Tracking, Owner::Api),
            Err(PauseError::NotOwner(Owner::Migration))
        ));
        ctl.hand_back(Owner::Migration, Owner::Api).unwrap();
        assert!(matches!(
            ctl.resume(Owner::Migration),
            Err(PauseError::NotOwner(Owner::Api))
        ));
        ctl.while_paused(Owner::Api, || ()).unwrap();
        ctl.resume(Owner::Api).unwrap();
        done.store(true, Ordering::Release);
        for t in threads {
            assert_eq!(t.join().unwrap(), 2);
        }
    }

    #[test]
    fn a_vcpu_that_never_parks_times_out_and_lifts_the_pause() {
        let ctl = PauseControl::new(1);
        let err = ctl
            .pause(
                &Kicker::default(),
                Owner::Api,
                false,
                Duration::from_millis(50),
            )
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
