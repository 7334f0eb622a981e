//! The guest console: where UART output goes, what vmm watches for in it, and console input.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_abi::agent;

/// Where the guest's serial output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    Stdout,
    File(PathBuf),
    Null,
}

// `Err = String`: a message about the user's `--console` text (no error underneath), which the
// CLI's callers take as a `String`.
impl std::str::FromStr for ConsoleOutput {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdout" => Ok(ConsoleOutput::Stdout),
            "none" | "null" => Ok(ConsoleOutput::Null),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(ConsoleOutput::File(PathBuf::from(p))),
                _ => Err(format!(
                    "console '{s}': expected stdout, none, or file:PATH"
                )),
            },
        }
    }
}

impl ConsoleOutput {
    pub fn open(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            ConsoleOutput::Stdout => Box::new(std::io::stdout()),
            ConsoleOutput::File(p) => Box::new(std::fs::File::create(p)?),
            ConsoleOutput::Null => Box::new(std::io::sink()),
        })
    }
}

/// Lines of console output vmm reacts to: the agent's ready marker (a boot-time figure) and a
/// kernel panic (with `panic=1` a panicking kernel resets, which must not look like success).
#[derive(Debug, Default)]
pub struct ConsoleWatch {
    line: Vec<u8>,
    pub agent_ready: Option<Duration>,
    pub kernel_panic: Option<String>,
    /// Agent result lines (after `AGENT: `) not yet handed to the line hook.
    agent_lines: Vec<String>,
}

/// Called with each agent result line (the text after `AGENT: `), in the thread that wrote it
/// to the UART: tracking switches backends between the agent's workloads this way.
pub type LineHook = Box<dyn FnMut(&str) + Send>;

impl ConsoleWatch {
    pub fn feed(&mut self, bytes: &[u8], since: Instant) {
        for &b in bytes {
            if b == b'\n' {
                self.line_done(since);
                self.line.clear();
            } else if self.line.len() < 512 {
                self.line.push(b);
            }
        }
    }

    fn line_done(&mut self, since: Instant) {
        let line = String::from_utf8_lossy(&self.line);
        let line = line.trim_end_matches('\r');
        if self.agent_ready.is_none() && line.trim() == agent::READY_MARKER {
            self.agent_ready = Some(since.elapsed());
        }
        if self.kernel_panic.is_none() && line.contains("Kernel panic - not syncing") {
            self.kernel_panic = Some(line.trim().to_string());
        }
        if let Some((_, rest)) = line.split_once(agent::RESULT_PREFIX) {
            self.agent_lines.push(rest.trim().to_string());
        }
    }
}

/// A console observer closure for the UART, sharing its findings through `watch`.
pub fn observer(
    watch: Arc<Mutex<ConsoleWatch>>,
    start: Instant,
    mut hook: Option<LineHook>,
) -> devices::legacy::serial::OutputObserver {
    Box::new(move |bytes| {
        let lines = match watch.lock() {
            Ok(mut w) => {
                w.feed(bytes, start);
                std::mem::take(&mut w.agent_lines)
            }
            Err(_) => Vec::new(),
        };
        if let Some(hook) = hook.as_mut() {
            for line in &lines {
                hook(line);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_and_panic_are_seen_across_chunks() {
        let mut w = ConsoleWatch::default();
        let t = Instant::now();
        w.feed(b"hello\r\nVMM-AGENT", t);
        assert!(w.agent_ready.is_none());
        w.feed(b"-READY\r\n[  1.0] Kernel panic - not syncing: oops\n", t);
        assert!(w.agent_ready.is_some());
        assert!(w.kernel_panic.as_deref().unwrap().contains("oops"));
    }

    #[test]
    fn console_specs_parse() {
        assert_eq!("stdout".parse::<ConsoleOutput>(), Ok(ConsoleOutput::Stdout));
        assert_eq!(
            "file:/tmp/x".parse::<ConsoleOutput>(),
            Ok(ConsoleOutput::File("/tmp/x".into()))
        );
        assert!("file:".parse::<ConsoleOutput>().is_err());
        assert!("tty".parse::<ConsoleOutput>().is_err());
    }
}
