//! SIGTERM and SIGINT while a run serves a control API socket: the run ends as if stopped from
//! the console (outcome `terminated`, exit code 128 + the signal), so the API server removes its
//! socket and the report is printed, instead of the process dying with the socket file left
//! behind. A second signal before the run has ended takes the default action at once (a stuck
//! shutdown can still be killed).

use std::sync::atomic::{AtomicI32, Ordering};

/// The first signal received while a `Guard` is installed (0: none). A signal handler may only
/// touch lock-free atomics.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

const SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

extern "C" fn on_signal(sig: libc::c_int) {
    if RECEIVED
        .compare_exchange(0, sig, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        // SAFETY: signal() and raise() are async-signal-safe; the default action ends us.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
    }
}

/// The handlers, installed for as long as this lives; the previous ones are put back on drop.
pub struct Guard {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl Guard {
    pub fn install() -> std::io::Result<Guard> {
        RECEIVED.store(0, Ordering::Release);
        let mut guard = Guard { old: Vec::new() };
        for sig in SIGNALS {
            // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value.
            let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
            act.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            // Other threads' blocking calls go on rather than fail with EINTR.
            act.sa_flags = libc::SA_RESTART;
            // SAFETY: as above.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: both pointers are to valid sigaction values for the call's duration; the
            // handler only touches an atomic (and re-raises with the default action).
            if unsafe { libc::sigaction(sig, &act, &mut old) } != 0 {
                // Dropping `guard` puts back what was installed so far.
                return Err(std::io::Error::last_os_error());
            }
            guard.old.push((sig, old));
        }
        Ok(guard)
    }

    /// The signal received since `install`, if any.
    pub fn received(&self) -> Option<i32> {
        match RECEIVED.load(Ordering::Acquire) {
            0 => None,
            sig => Some(sig),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        for (sig, old) in &self.old {
            // SAFETY: `old` is the action sigaction returned for this signal.
            unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
        }
    }
}

/// The signal's name, for the report.
pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signal_is_recorded_while_installed_and_the_old_action_returns() {
        let guard = Guard::install().unwrap();
        assert_eq!(guard.received(), None);
        // SAFETY: raising a signal our handler catches.
        unsafe { libc::raise(libc::SIGTERM) };
        assert_eq!(guard.received(), Some(libc::SIGTERM));
        drop(guard);
        // SAFETY: reading the current action only.
        let mut now: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: a null new action reads the current one into `now`.
        unsafe { libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut now) };
        assert_ne!(
            now.sa_sigaction,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t
        );
    }
}
