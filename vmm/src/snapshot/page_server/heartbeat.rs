//! The server's `Alive` heartbeat on the main connection, and how long the restoring vmm waits
//! for it. With the uffd backends the server alone reads the userfaultfd: a server that is
//! stopped (SIGSTOP, a debugger) or hung leaves a faulting vCPU blocked in the kernel, and only
//! the silence of the main connection tells the restoring vmm. It then stops the guest and ends
//! the restore with an error naming the server and how long it was silent.

use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{io, lock, PageServerError};
use crate::snapshot::page_proto::{self as proto, Message, HEARTBEAT};

/// How long the restoring vmm lets the server be silent before it gives up on it: many
/// heartbeats, so a loaded host that delays a thread does not end a healthy restore.
/// `VMM_PAGE_SERVER_SILENCE_MS` overrides it (tests; hosts known to stall longer).
const SILENCE_DEFAULT: Duration = Duration::from_secs(15);

/// The silence after which the server counts as gone (never below two heartbeats).
pub fn silence_limit() -> Duration {
    std::env::var("VMM_PAGE_SERVER_SILENCE_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(SILENCE_DEFAULT, Duration::from_millis)
        .max(HEARTBEAT * 2)
}

/// The server's heartbeat thread; stopped (and joined) before the server's last frame.
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Heartbeat {
    /// Sends `Alive` on `writer` every `HEARTBEAT` until stopped or the connection fails.
    pub fn start(writer: Arc<Mutex<UnixStream>>) -> Result<Heartbeat, PageServerError> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("page-server-alive".into())
            .spawn(move || {
                // Started before the server's main thread filters itself: its own filter.
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::PageServer);
                heartbeat(&flag, &writer);
            })
            .map_err(io("starting the heartbeat thread"))?;
        Ok(Heartbeat {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// Says `Alive` every `HEARTBEAT` until `stop` is set or the connection fails.
fn heartbeat(stop: &AtomicBool, writer: &Mutex<UnixStream>) {
    loop {
        std::thread::park_timeout(HEARTBEAT);
        if stop.load(Ordering::Acquire) {
            return;
        }
        if proto::send(&mut *lock(writer), 0, &Message::Alive).is_err() {
            // The restoring vmm is gone: the main loop sees the same and ends.
            return;
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_server_says_alive_until_stopped() {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(HEARTBEAT * 5)).unwrap();
        let mut hb = Heartbeat::start(Arc::new(Mutex::new(a))).unwrap();
        let mut r = &b;
        for _ in 0..2 {
            assert_eq!(proto::recv(&mut r).unwrap().1, Message::Alive);
        }
        hb.stop();
        // Nothing after the stop (at most one already in flight): the stopped thread dropped
        // its end, or nothing comes within two heartbeats.
        b.set_read_timeout(Some(HEARTBEAT * 2)).unwrap();
        let mut buf = Vec::new();
        loop {
            match proto::recv(&mut r) {
                Ok((_, m)) => buf.push(m),
                Err(proto::ProtoError::TimedOut { .. } | proto::ProtoError::Closed) => break,
                Err(e) => panic!("{e}"),
            }
            assert!(buf.len() <= 1, "heartbeats after the stop: {buf:?}");
        }
    }

    #[test]
    fn the_limit_spans_several_heartbeats() {
        assert!(silence_limit() >= HEARTBEAT * 2);
    }
}
