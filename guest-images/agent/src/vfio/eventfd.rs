//! An eventfd that VFIO signals for one interrupt vector, read with a bounded wait.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

pub struct EventFd(OwnedFd);

impl EventFd {
    pub fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The counter, reset to 0; 0 if it was 0 (the fd is non-blocking).
    pub fn take(&self) -> io::Result<u64> {
        let mut value = 0u64;
        // SAFETY: reads 8 bytes into a live u64.
        let n = unsafe {
            libc::read(
                self.0.as_raw_fd(),
                (&mut value as *mut u64).cast::<libc::c_void>(),
                8,
            )
        };
        if n == 8 {
            return Ok(value);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => Ok(0),
            _ if n >= 0 => Err(io::Error::other(format!("eventfd read {n} bytes"))),
            _ => Err(e),
        }
    }

    /// Waits up to `timeout` for the counter to become non-zero, then takes it. `Ok(0)` means
    /// the time ran out.
    pub fn wait(&self, timeout: Duration) -> io::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.take()?;
            if got != 0 {
                return Ok(got);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(0);
            }
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            // SAFETY: one live pollfd.
            if unsafe { libc::poll(&mut pfd, 1, ms) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }

    /// Blocks in poll(2) until the counter is non-zero (true) or `timeout` passes (false);
    /// takes nothing. One system call when the interrupt is on its way: what a latency
    /// measurement wants between the trigger and the wake-up.
    pub fn poll_readable(&self, timeout: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: one live pollfd.
            match unsafe { libc::poll(&mut pfd, 1, ms) } {
                n if n > 0 => return Ok(true),
                0 if left.is_zero() || Instant::now() >= deadline => return Ok(false),
                0 => {}
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }

    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Adds `n` to the counter (what VFIO does for each interrupt).
    #[cfg(test)]
    pub fn signal(&self, n: u64) -> io::Result<()> {
        // SAFETY: writes 8 bytes from a live u64.
        let w = unsafe { libc::write(self.raw(), (&n as *const u64).cast::<libc::c_void>(), 8) };
        if w == 8 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_signals_and_times_out() {
        let fd = EventFd::new().expect("eventfd");
        assert_eq!(fd.take().expect("take"), 0);
        let start = Instant::now();
        assert_eq!(fd.wait(Duration::from_millis(50)).expect("wait"), 0);
        assert!(start.elapsed() >= Duration::from_millis(50));
        fd.signal(1).expect("signal");
        fd.signal(2).expect("signal");
        assert_eq!(fd.wait(Duration::from_secs(5)).expect("wait"), 3);
        assert_eq!(fd.take().expect("take"), 0);
    }

    #[test]
    fn polls_without_taking() {
        let fd = EventFd::new().expect("eventfd");
        assert!(!fd.poll_readable(Duration::from_millis(20)).expect("poll"));
        fd.signal(2).expect("signal");
        assert!(fd.poll_readable(Duration::from_secs(5)).expect("poll"));
        assert_eq!(fd.take().expect("take"), 2);
    }

    #[test]
    fn wakes_when_signalled_from_another_thread() {
        let fd = std::sync::Arc::new(EventFd::new().expect("eventfd"));
        let other = std::sync::Arc::clone(&fd);
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            other.signal(1).expect("signal");
        });
        assert_eq!(fd.wait(Duration::from_secs(5)).expect("wait"), 1);
        t.join().expect("join");
    }
}
