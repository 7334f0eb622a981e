//! Child processes. As PID 1 the agent inherits every orphan in the guest and must reap them,
//! or they stay zombies. One thread does all the reaping: SIGCHLD is blocked in every thread
//! and that thread takes it with `sigwait`. A foreground child (`sh`) is waited for through
//! the reaper, which hands over its status, so the two never race for the same child.

use std::io;
use std::mem::MaybeUninit;
use std::process::Command;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;

#[derive(Default)]
struct State {
    /// The child `run_foreground` waits for, and its wait status once reaped.
    foreground: Option<libc::pid_t>,
    status: Option<libc::c_int>,
}

pub struct Reaper {
    state: Mutex<State>,
    reaped: Condvar,
}

/// Blocks SIGCHLD in the calling thread, and so in every thread it creates later. Call before
/// starting any thread. A no-op handler is installed too: PID 1 drops signals left at SIG_DFL,
/// and this makes sure SIGCHLD is never one of them.
pub fn block_sigchld() -> io::Result<()> {
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: plain libc signal calls on zero-initialised, then filled, structures.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ignore as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let set = sigchld_set();
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}

fn sigchld_set() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset with a valid signal number.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGCHLD);
        set.assume_init()
    }
}

impl Reaper {
    /// Starts the reaping thread. `block_sigchld` must have run first.
    pub fn start() -> io::Result<Arc<Reaper>> {
        let reaper = Arc::new(Reaper {
            state: Mutex::new(State::default()),
            reaped: Condvar::new(),
        });
        let r = Arc::clone(&reaper);
        thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.run())?;
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves plain data behind: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        let set = sigchld_set();
        loop {
            let mut sig = 0;
            // SAFETY: valid set and out pointer.
            unsafe { libc::sigwait(&set, &mut sig) };
            // SIGCHLDs coalesce: reap everything that has exited. Under the lock, so that a
            // child cannot be reaped between its spawn and its registration as foreground.
            let mut state = self.lock();
            loop {
                let mut status = 0;
                // SAFETY: valid out pointer.
                let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                if state.foreground == Some(pid) {
                    state.status = Some(status);
                    self.reaped.notify_all();
                }
            }
        }
    }

    /// Spawns `cmd` and waits for it; returns its wait status.
    pub fn run_foreground(&self, cmd: &mut Command) -> io::Result<libc::c_int> {
        let mut state = self.lock();
        // Holding the lock across spawn keeps the reaper off this child until it is registered
        // (std may itself wait for a child whose exec failed).
        let child = cmd.spawn()?;
        let pid = libc::pid_t::try_from(child.id())
            .map_err(|_| io::Error::other("child pid out of range"))?;
        state.foreground = Some(pid);
        state.status = None;
        while state.status.is_none() {
            state = self.reaped.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.foreground = None;
        Ok(state.status.take().unwrap_or_default())
    }
}

/// `exit=N` or `signal=N` for a wait status.
pub fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit={}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("signal={}", libc::WTERMSIG(status))
    } else {
        format!("status={status:#x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_wait_statuses() {
        assert_eq!(describe_status(3 << 8), "exit=3");
        assert_eq!(describe_status(9), "signal=9");
    }
}
