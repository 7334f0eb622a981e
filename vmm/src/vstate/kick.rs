//! Synchronous kicks: make every vCPU leave guest mode once and wait until it has. A dirty-ring
//! harvest needs this on hardware, where Intel PML buffers dirtied GFNs inside the CPU until
//! the next VM exit (TRACKING.md); a signal alone does not say when the exit happened.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::vcpu::kick_signal;

/// Published by a vCPU thread around each KVM_RUN.
#[derive(Debug, Default)]
pub struct RunState {
    in_guest: AtomicBool,
    exits: AtomicU64,
    done: AtomicBool,
}

impl RunState {
    pub fn entering(&self) {
        self.in_guest.store(true, Ordering::SeqCst);
    }
    pub fn exited(&self) {
        self.in_guest.store(false, Ordering::SeqCst);
        self.exits.fetch_add(1, Ordering::SeqCst);
    }
    pub fn finished(&self) {
        self.done.store(true, Ordering::SeqCst);
        self.in_guest.store(false, Ordering::SeqCst);
    }
}

#[derive(Default)]
pub struct Kicker {
    vcpus: Mutex<Vec<(libc::pthread_t, Arc<RunState>)>>,
}

impl Kicker {
    pub fn add<T>(&self, thread: &JoinHandle<T>, state: Arc<RunState>) {
        let mut v = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
        v.push((thread.as_pthread_t(), state));
    }

    /// Kicks every vCPU that is in guest mode and waits (up to `timeout`) until each has left
    /// it at least once. Returns false on timeout. The signal repeats because one that lands
    /// just before KVM_RUN enters the guest is not noticed until the next exit.
    pub fn kick_all_and_wait(&self, timeout: Duration) -> bool {
        let vcpus = self.vcpus.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = Instant::now() + timeout;
        let me = // SAFETY: pthread_self has no preconditions.
            unsafe { libc::pthread_self() };
        for (thread, state) in vcpus.iter() {
            if *thread == me {
                continue;
            }
            let seen = state.exits.load(Ordering::SeqCst);
            while state.in_guest.load(Ordering::SeqCst)
                && !state.done.load(Ordering::SeqCst)
                && state.exits.load(Ordering::SeqCst) == seen
            {
                if Instant::now() > deadline {
                    return false;
                }
                // SAFETY: `thread` belongs to a vCPU thread that is not done (checked above);
                // the kick signal has a no-op handler installed by the machine.
                unsafe { libc::pthread_kill(*thread, kick_signal()) };
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        true
    }
}
