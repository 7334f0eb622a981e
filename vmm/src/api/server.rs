//! Serves the control API on a Unix socket: one thread accepts, one thread per connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use super::Request;
use crate::machine::progress::Phase;
use crate::machine::run::Attendant;
use crate::machine::shared::Shared;
use crate::migration::source::{hand_over, migrate};
use crate::vstate::pause::Owner;

/// Longest request line accepted (a console input or a migrate request is far shorter).
const MAX_LINE: usize = 64 << 10;

pub struct ApiServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// `machine::ServeApi`: the control API for a run.
pub fn serve_api(path: &Path, shared: Arc<Shared>) -> std::io::Result<Box<dyn Attendant>> {
    Ok(Box::new(ApiServer::start(path, shared)?))
}

impl Attendant for ApiServer {
    fn stop(self: Box<Self>) {
        ApiServer::stop(*self);
    }
}

impl ApiServer {
    pub fn start(path: &Path, shared: Arc<Shared>) -> std::io::Result<ApiServer> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is in use by another process", path.display()),
                ));
            }
            // A socket file left by a vmm that died: nothing listens on it.
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(listener, shared, s))?;
        tracing::info!("control API on {}", path.display());
        Ok(ApiServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = shared.clone();
                if let Err(e) = std::thread::Builder::new()
                    .name("api-conn".into())
                    .spawn(move || serve(stream, &shared))
                {
                    tracing::warn!("API: cannot start a connection thread: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => {
                tracing::warn!("API: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve(stream: UnixStream, shared: &Arc<Shared>) {
    let _ = stream.set_nonblocking(false);
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream).take(MAX_LINE as u64);
    let mut line = String::new();
    loop {
        line.clear();
        reader.set_limit(MAX_LINE as u64);
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if !line.ends_with('\n') && line.len() >= MAX_LINE => {
                let _ = reply(
                    &mut out,
                    error(format!("request longer than {MAX_LINE} bytes")),
                );
                return;
            }
            Ok(_) => {}
            Err(e) => {
                let _ = reply(&mut out, error(format!("reading the request: {e}")));
                return;
            }
        }
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => handle(req, shared),
            Err(e) => error(format!("bad request: {e}")),
        };
        let migrated = answer.get("migrated").and_then(Value::as_bool) == Some(true);
        let snapshot_exit = answer.get("exit").and_then(Value::as_bool) == Some(true);
        let sent = reply(&mut out, answer);
        if migrated {
            // Only now, with the report on its way: the VM's run ends and the process exits.
            hand_over(shared);
        }
        if snapshot_exit {
            crate::snapshot::take::end_after(shared);
        }
        if sent.is_err() {
            return;
        }
    }
}

fn reply(out: &mut UnixStream, v: Value) -> std::io::Result<()> {
    let mut text = v.to_string();
    text.push('\n');
    out.write_all(text.as_bytes())
}

fn error(msg: String) -> Value {
    json!({ "ok": false, "error": msg })
}

pub fn handle(req: Request, shared: &Arc<Shared>) -> Value {
    match req {
        Request::Status => status(shared),
        Request::Pause => {
            match shared
                .pause
                .pause(&shared.kicker, Owner::Api, false, Duration::from_secs(5))
            {
                Ok(_) => json!({ "ok": true }),
                Err(e) => error(e.to_string()),
            }
        }
        Request::Resume => {
            // A migration's pause is lifted by the migration; after a postcopy failure the
            // guest waits for this explicit decision (README, "Postcopy failures").
            let failed_postcopy = shared.progress().phase == Phase::Failed
                && shared.pause.owner() == Some(Owner::Migration);
            let owner = if failed_postcopy {
                Owner::Migration
            } else {
                Owner::Api
            };
            match shared.pause.resume(owner) {
                Ok(()) => json!({ "ok": true }),
                Err(e) => error(e.to_string()),
            }
        }
        Request::Finish { after } => match crate::micro_finish::finish(shared, after) {
            Ok(passes) => json!({ "ok": true, "passes": passes }),
            Err(e) => error(e.to_string()),
        },
        Request::Console { input } => {
            let mut bytes = input.into_bytes();
            bytes.push(b'\n');
            shared.console_input(&bytes);
            json!({ "ok": true, "bytes": bytes.len() })
        }
        Request::Snapshot(params) => snapshot(shared, &params),
        Request::Migrate(params) => {
            let opts = match params.options() {
                Ok(o) => o,
                Err(e) => return error(e.to_string()),
            };
            match migrate(shared, &opts) {
                Ok(report) => json!({ "ok": true, "migrated": true, "report": report }),
                Err(e) => {
                    let report = shared.progress().report.clone();
                    json!({ "ok": false, "error": e.to_string(), "report": report })
                }
            }
        }
    }
}

fn snapshot(shared: &Shared, p: &crate::api::SnapshotParams) -> Value {
    match crate::snapshot::take::take(shared, &p.to, p.exit) {
        Ok(taken) => json!({ "ok": true, "snapshot": taken, "exit": p.exit }),
        Err(e) => error(e.to_string()),
    }
}

fn status(shared: &Shared) -> Value {
    let p = shared.progress().clone();
    let state = match p.phase {
        Phase::Completed => "migrated",
        Phase::Incoming => "receiving",
        Phase::Connecting | Phase::Precopy | Phase::StopAndCopy | Phase::Postcopy => "migrating",
        _ if shared.pause.is_paused() => "paused",
        _ => "running",
    };
    json!({
        "ok": true,
        "state": state,
        "vcpus": shared.description.vcpus,
        "mem_mib": shared.description.mem_bytes >> 20,
        "micro_passes": shared.micro_passes(),
        "micro_budget": shared.micro.budget.passes(),
        "uptime_ms": shared.start.elapsed().as_secs_f64() * 1000.0,
        "migration": p,
    })
}
