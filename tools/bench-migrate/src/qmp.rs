//! A minimal QMP client: one Unix socket, one command at a time, asynchronous events skipped.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path} did not accept a connection within {secs} s: {source}")]
    Connect {
        path: PathBuf,
        secs: u64,
        source: std::io::Error,
    },
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP sent something that is not JSON ({reason}): {line}")]
    Parse { reason: String, line: String },
    #[error("QMP {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events seen so far: name and QEMU's timestamp (wall clock, seconds).
    events: Vec<(String, f64)>,
}

impl Qmp {
    /// Connects (retrying while QEMU starts), reads the greeting, negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < timeout => {
                    tracing::trace!("QMP {}: {e}, retrying", path.display());
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.to_path_buf(),
                        secs: timeout.as_secs(),
                        source,
                    })
                }
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read_message()?;
        tracing::debug!("QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(line.trim()).map_err(|e| QmpError::Parse {
            reason: e.to_string(),
            line,
        })
    }

    /// Runs `command` and returns its `return` value. Events that arrive first are logged.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer.write_all(text.as_bytes())?;
        loop {
            let reply = self.read_message()?;
            if let Some(event) = reply.get("event") {
                tracing::debug!("QMP event {event}: {}", reply["data"]);
                let ts = &reply["timestamp"];
                if let (Some(name), Some(s), Some(us)) = (
                    event.as_str(),
                    ts["seconds"].as_f64(),
                    ts["microseconds"].as_f64(),
                ) {
                    self.events.push((name.to_string(), s + us / 1e6));
                }
                continue;
            }
            if let Some(err) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: err["class"].as_str().unwrap_or("?").to_string(),
                    desc: err["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Ok(reply.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    /// The timestamp (wall clock, seconds) of the first event `name` seen so far.
    pub fn first_event(&self, name: &str) -> Option<f64> {
        self.events.iter().find(|(n, _)| n == name).map(|&(_, t)| t)
    }

    /// `migrate-set-capabilities` with every named capability on.
    pub fn set_capabilities(&mut self, names: &[&str]) -> Result<(), QmpError> {
        if names.is_empty() {
            return Ok(());
        }
        let caps: Vec<Value> = names
            .iter()
            .map(|n| json!({ "capability": n, "state": true }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )?;
        Ok(())
    }
}
