//! Console input: bytes typed on vmm's stdin go to the guest UART. On a terminal, stdin is put in
//! raw mode (restored on exit) and Ctrl-A x quits, as in QEMU.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::terminal::Terminal;

/// Where typed bytes go (the UART's input queue).
pub type InputSink = Box<dyn FnMut(&[u8]) + Send>;

pub struct StdinInput {
    sink: InputSink,
    escape: bool,
    quit: Arc<AtomicBool>,
}

impl StdinInput {
    pub fn new(sink: InputSink, quit: Arc<AtomicBool>) -> Self {
        StdinInput {
            sink,
            escape: false,
            quit,
        }
    }
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, _events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        let n = match std::io::stdin().lock().read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return,
            Err(_) => 0,
        };
        if n == 0 {
            // EOF: stop watching, or epoll would report it forever.
            let _ = ops.remove(Events::new(&std::io::stdin(), EventSet::IN));
            return;
        }
        let mut out = Vec::with_capacity(n);
        for &b in &buf[..n] {
            if self.escape {
                self.escape = false;
                if b == b'x' {
                    self.quit.store(true, Ordering::Release);
                    return;
                }
                if b != 0x01 {
                    out.push(0x01);
                }
                out.push(b);
            } else if b == 0x01 && is_tty() {
                self.escape = true;
            } else {
                out.push(b);
            }
        }
        (self.sink)(&out);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&std::io::stdin(), EventSet::IN)) {
            // A regular file or /dev/null cannot be polled: run without console input.
            tracing::debug!("console input disabled: {e}");
        }
    }
}

pub fn is_tty() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(std::io::stdin().as_raw_fd()) == 1 }
}

/// Puts the terminal in raw mode for the guest console; restores it when dropped.
pub struct RawTerminal(bool);

impl RawTerminal {
    pub fn enter() -> Self {
        if is_tty() && std::io::stdin().lock().set_raw_mode().is_ok() {
            RawTerminal(true)
        } else {
            RawTerminal(false)
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.0 {
            let _ = std::io::stdin().lock().set_canon_mode();
        }
    }
}
