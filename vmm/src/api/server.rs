//! Serves the control API on a Unix socket: one thread accepts, one thread per connection.
//!
//! Who may use it, and for how long (README, "The control API socket"):
//! - the socket is created 0600 (bound inside a private 0700 directory, then moved into place:
//!   at no moment is it more open), in a directory owned by this user or root that no one else
//!   may write (else refused: another user could replace the socket or squat its name);
//! - the socket path is taken over only from a stale socket (one nobody answers on); a live
//!   socket, a file, a directory or a link there refuses the start;
//! - each client's uid (SO_PEERCRED) must be the VMM's own or root's; others get an error reply
//!   and a warning in the log;
//! - at most `MAX_CONNECTIONS` at once (the next is answered "busy"), and each request must
//!   arrive whole within the request timeout (10 s; `VMM_API_REQUEST_TIMEOUT_MS` changes it,
//!   for tests), so a client that connects and says nothing is dropped.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Request;
use crate::machine::progress::Phase;
use crate::machine::run::Attendant;
use crate::machine::shared::Shared;
use crate::migration::source::{hand_over, migrate};
use crate::vstate::pause::Owner;

/// Longest request line accepted (a console input or a migrate request is far shorter).
const MAX_LINE: usize = 64 << 10;
/// Connections served at once; one more is answered "busy" and closed.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a request may take to arrive whole (from connecting, or from the last reply).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Overrides `REQUEST_TIMEOUT` (milliseconds): lets tests see an idle client dropped quickly.
pub const REQUEST_TIMEOUT_ENV: &str = "VMM_API_REQUEST_TIMEOUT_MS";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "{}: the API socket's directory must be owned by uid {own} (this VMM's) or root and \
         writable by no one else (it is owned by uid {uid}, mode {mode:04o}): another user \
         could replace the socket; use a private directory such as $XDG_RUNTIME_DIR",
        dir.display()
    )]
    UnsafeDir {
        dir: PathBuf,
        own: u32,
        uid: u32,
        mode: u32,
    },
    #[error(
        "{}: {what} is there; the API replaces only a stale socket (one nobody answers on)",
        path.display()
    )]
    Occupied { path: PathBuf, what: &'static str },
    #[error("{}: another process is serving on this socket", path.display())]
    InUse { path: PathBuf },
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl ServerError {
    fn kind(&self) -> std::io::ErrorKind {
        match self {
            ServerError::UnsafeDir { .. } => std::io::ErrorKind::PermissionDenied,
            ServerError::Occupied { .. } => std::io::ErrorKind::AlreadyExists,
            ServerError::InUse { .. } => std::io::ErrorKind::AddrInUse,
            ServerError::Io { source, .. } => source.kind(),
        }
    }
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> ServerError {
    let path = path.to_path_buf();
    move |source| ServerError::Io { path, op, source }
}

fn c_path(path: &Path) -> Result<CString, ServerError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| ServerError::Io {
        path: path.to_path_buf(),
        op: "the socket path",
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "contains a NUL byte"),
    })
}

pub struct ApiServer {
    path: PathBuf,
    /// The socket file's (device, inode): `stop` removes the path only while it is still ours.
    inode: (u64, u64),
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// `machine::ServeApi`: the control API for a run.
pub fn serve_api(path: &Path, shared: Arc<Shared>) -> std::io::Result<Box<dyn Attendant>> {
    match ApiServer::start(path, shared) {
        Ok(s) => Ok(Box::new(s)),
        Err(e) => Err(std::io::Error::new(e.kind(), e)),
    }
}

impl Attendant for ApiServer {
    fn stop(self: Box<Self>) {
        ApiServer::stop(*self);
    }
}

/// What the server enforces on each connection.
#[derive(Debug, Clone, Copy)]
struct Limits {
    own_uid: u32,
    request_timeout: Duration,
}

fn request_timeout() -> Duration {
    match std::env::var(REQUEST_TIMEOUT_ENV) {
        Err(_) => REQUEST_TIMEOUT,
        Ok(v) => match v.parse::<u64>() {
            Ok(ms) if ms > 0 => Duration::from_millis(ms),
            _ => {
                tracing::warn!(
                    "{REQUEST_TIMEOUT_ENV}={v:?} is not a number of milliseconds; using {} s",
                    REQUEST_TIMEOUT.as_secs()
                );
                REQUEST_TIMEOUT
            }
        },
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// The directory the socket goes in: owned by `own` or root, writable by its owner only.
pub fn check_socket_dir(dir: &Path, own: u32) -> Result<(), ServerError> {
    let meta = std::fs::metadata(dir).map_err(io_err(dir, "the socket's directory"))?;
    let (uid, mode) = (meta.uid(), meta.permissions().mode() & 0o7777);
    if (uid == own || uid == 0) && mode & 0o022 == 0 {
        return Ok(());
    }
    Err(ServerError::UnsafeDir {
        dir: dir.to_path_buf(),
        own,
        uid,
        mode,
    })
}

/// Clears the way for the socket at `path`: nothing there, or a stale socket (removed).
fn clear_socket_path(path: &Path) -> Result<(), ServerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path, "looking at the socket path")(e)),
    };
    let ft = meta.file_type();
    let what = if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else if !ft.is_socket() {
        "a special file"
    } else {
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(ServerError::InUse {
                    path: path.to_path_buf(),
                })
            }
            // A socket file left by a vmm that died: nothing listens on it.
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                tracing::info!("removing the stale socket {}", path.display());
                return std::fs::remove_file(path)
                    .map_err(io_err(path, "removing the stale socket"));
            }
            Err(e) => return Err(io_err(path, "probing the socket there")(e)),
        }
    };
    Err(ServerError::Occupied {
        path: path.to_path_buf(),
        what,
    })
}

/// Binds a listener at `path`, mode 0600 from its first moment: bound inside a new 0700
/// directory beside it (umask is process-wide, so changing it would race other threads'
/// files), chmod-ed there, then renamed into place without replacing anything.
fn bind_private(path: &Path, dir: &Path) -> Result<UnixListener, ServerError> {
    let to = c_path(path)?;
    let mut buf = c_path(&dir.join(".vmm-api-XXXXXX"))?.into_bytes_with_nul();
    // SAFETY: `buf` is a writable NUL-terminated template that outlives the call; mkdtemp
    // fills in the X's in place and makes the directory 0700.
    if unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) }.is_null() {
        return Err(io_err(dir, "creating a private directory for the socket")(
            std::io::Error::last_os_error(),
        ));
    }
    buf.pop();
    let private = PathBuf::from(std::ffi::OsStr::from_bytes(&buf));
    let tmp = private.join("s");
    let r = (|| {
        let listener = UnixListener::bind(&tmp).map_err(io_err(path, "binding"))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(path, "chmod 0600"))?;
        let from = c_path(&tmp)?;
        // SAFETY: both paths are NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_file(&tmp);
            return Err(io_err(path, "moving the socket into place")(e));
        }
        Ok(listener)
    })();
    let _ = std::fs::remove_dir(&private);
    r
}

impl ApiServer {
    pub fn start(path: &Path, shared: Arc<Shared>) -> Result<ApiServer, ServerError> {
        let own_uid = euid();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        check_socket_dir(dir, own_uid)?;
        clear_socket_path(path)?;
        let listener = bind_private(path, dir)?;
        let meta = std::fs::symlink_metadata(path).map_err(io_err(path, "the new socket"))?;
        listener
            .set_nonblocking(true)
            .map_err(io_err(path, "the listener"))?;
        let limits = Limits {
            own_uid,
            request_timeout: request_timeout(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // Set up: the socket is bound and listening.
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Api);
                accept_loop(listener, shared, s, limits)
            })
            .map_err(io_err(path, "starting the API thread"))?;
        tracing::info!("control API on {}", path.display());
        Ok(ApiServer {
            path: path.to_path_buf(),
            inode: (meta.dev(), meta.ino()),
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.inode => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("cannot remove {}: {e}", self.path.display());
                }
            }
            _ => tracing::warn!(
                "{} is no longer the API socket this VMM created; left alone",
                self.path.display()
            ),
        }
    }
}

/// The uid of the process at the other end (SO_PEERCRED: as it was when it connected).
pub fn peer_uid(stream: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes given, on a socket we own.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether a client of uid `peer` may use the API of a VMM running as `own`.
pub fn peer_allowed(peer: u32, own: u32) -> bool {
    peer == own || peer == 0
}

/// Counts a connection while it is served.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>) -> Option<Slot> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CONNECTIONS).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers and closes a connection that will not be served (a short write: it fits the new
/// socket's buffer, and the timeout bounds it anyway).
fn turn_away(mut stream: UnixStream, msg: String) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let _ = reply(&mut stream, error(msg));
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>, stop: Arc<AtomicBool>, limits: Limits) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                match peer_uid(&stream) {
                    Ok(uid) if peer_allowed(uid, limits.own_uid) => {}
                    Ok(uid) => {
                        tracing::warn!("API: refused a client of uid {uid}");
                        turn_away(
                            stream,
                            format!(
                                "uid {uid} may not use this API (only uid {} and root may)",
                                limits.own_uid
                            ),
                        );
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!("API: refused a client whose uid cannot be read: {e}");
                        continue;
                    }
                }
                let Some(slot) = Slot::take(&active) else {
                    tracing::warn!("API: {MAX_CONNECTIONS} connections open; refused another");
                    turn_away(
                        stream,
                        format!(
                            "busy: {MAX_CONNECTIONS} API connections are open already (the \
                             most served at once); try again later"
                        ),
                    );
                    continue;
                };
                let shared = shared.clone();
                if let Err(e) =
                    std::thread::Builder::new()
                        .name("api-conn".into())
                        .spawn(move || {
                            // It inherits the accept thread's filter; its own names it.
                            crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Api);
                            let _slot = slot;
                            serve(stream, &shared, limits.request_timeout)
                        })
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

#[derive(Debug, thiserror::Error)]
enum ReadError {
    #[error("no complete request within {0:?}; closing the connection")]
    TimedOut(Duration),
    #[error("request longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("the request is not UTF-8")]
    NotUtf8,
    #[error("reading the request: {0}")]
    Io(#[source] std::io::Error),
}

/// Request lines off a connection, each within a deadline of its own: a byte now and then does
/// not keep a connection open (the whole line must arrive in time).
struct Lines {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Lines {
    /// The next line without its newline (the last one may lack it); None at the end.
    fn next(&mut self, timeout: Duration) -> Result<Option<String>, ReadError> {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(at) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=at).collect();
                return String::from_utf8(line)
                    .map(Some)
                    .map_err(|_| ReadError::NotUtf8);
            }
            if self.buf.len() >= MAX_LINE {
                return Err(ReadError::TooLong);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ReadError::TimedOut(timeout));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(ReadError::Io)?;
            match self.stream.read(&mut chunk) {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => {
                    let line = std::mem::take(&mut self.buf);
                    return String::from_utf8(line)
                        .map(Some)
                        .map_err(|_| ReadError::NotUtf8);
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    return Err(ReadError::TimedOut(timeout))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }
}

fn serve(stream: UnixStream, shared: &Arc<Shared>, timeout: Duration) {
    let _ = stream.set_nonblocking(false);
    // A client that stops reading does not hold this thread forever either.
    let _ = stream.set_write_timeout(Some(timeout));
    let Ok(mut out) = stream.try_clone() else {
        return;
    };
    let mut lines = Lines {
        stream,
        buf: Vec::new(),
    };
    loop {
        let line = match lines.next(timeout) {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(e) => {
                if matches!(e, ReadError::TimedOut(_)) {
                    tracing::debug!("API: {e}");
                }
                let _ = reply(&mut out, error(e.to_string()));
                return;
            }
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_socket_is_bound_0600_and_no_private_directory_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _l = bind_private(&path, dir.path()).unwrap();
        assert_eq!(mode(&path), 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("api.sock")]);
        UnixStream::connect(&path).unwrap();
    }

    #[test]
    fn a_socket_directory_others_may_write_or_own_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let me = euid();
        check_socket_dir(dir.path(), me).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = check_socket_dir(dir.path(), me).unwrap_err();
        assert!(
            e.to_string().contains("writable by no one else") && e.to_string().contains("1777"),
            "{e}"
        );
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        check_socket_dir(dir.path(), me).unwrap();
        // Owned by another user: as root, give it away; otherwise pretend to be someone else.
        let own = if me == 0 {
            let c = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
            // SAFETY: a NUL-terminated path that outlives the call.
            assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
            0
        } else {
            me + 1
        };
        let e = check_socket_dir(dir.path(), own).unwrap_err();
        assert!(matches!(e, ServerError::UnsafeDir { .. }), "{e:?}");
    }

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        clear_socket_path(&p("none")).unwrap();

        std::fs::write(p("file"), b"keep").unwrap();
        let e = clear_socket_path(&p("file")).unwrap_err();
        assert!(e.to_string().contains("a regular file is there"), "{e}");
        assert_eq!(std::fs::read(p("file")).unwrap(), b"keep");

        std::fs::create_dir(p("dir")).unwrap();
        assert!(matches!(
            clear_socket_path(&p("dir")),
            Err(ServerError::Occupied {
                what: "a directory",
                ..
            })
        ));

        // A link, even to a stale socket: the link is not ours to judge through.
        let stale = p("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        symlink(&stale, p("link")).unwrap();
        assert!(matches!(
            clear_socket_path(&p("link")),
            Err(ServerError::Occupied {
                what: "a symbolic link",
                ..
            })
        ));

        let live = p("live.sock");
        let _l = UnixListener::bind(&live).unwrap();
        assert!(matches!(
            clear_socket_path(&live),
            Err(ServerError::InUse { .. })
        ));
        assert!(live.exists());

        clear_socket_path(&stale).unwrap();
        assert!(std::fs::symlink_metadata(&stale).is_err());
    }

    #[test]
    fn peers_of_our_uid_or_root_are_allowed_others_not() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(peer_allowed(0, 0));
        assert!(!peer_allowed(65534, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(!peer_allowed(1000, 0));
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(peer_uid(&a).unwrap(), euid());
    }

    #[test]
    fn the_connection_cap_refuses_one_more_until_one_ends() {
        let active = Arc::new(AtomicUsize::new(0));
        let mut slots: Vec<_> = (0..MAX_CONNECTIONS)
            .map(|_| Slot::take(&active).unwrap())
            .collect();
        assert!(Slot::take(&active).is_none());
        slots.pop();
        assert!(Slot::take(&active).is_some());
    }

    #[test]
    fn a_request_must_arrive_whole_before_its_deadline() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut lines = Lines {
            stream: a,
            buf: Vec::new(),
        };
        b.write_all(b"{\"cmd\":\"status\"}\n{\"cmd\"").unwrap();
        let t = Duration::from_millis(200);
        assert_eq!(lines.next(t).unwrap().unwrap(), "{\"cmd\":\"status\"}\n");
        // Half a line and then a byte now and then: still dropped at the deadline.
        let writer = std::thread::spawn(move || {
            for _ in 0..10 {
                std::thread::sleep(Duration::from_millis(50));
                if b.write_all(b" ").is_err() {
                    break;
                }
            }
        });
        let t0 = Instant::now();
        assert!(matches!(lines.next(t), Err(ReadError::TimedOut(_))));
        assert!(
            t0.elapsed() < Duration::from_millis(450),
            "{:?}",
            t0.elapsed()
        );
        writer.join().unwrap();
    }

    #[test]
    fn a_line_longer_than_the_limit_is_refused() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut lines = Lines {
            stream: a,
            buf: Vec::new(),
        };
        let writer = std::thread::spawn(move || {
            let _ = b.write_all(&vec![b'x'; MAX_LINE + 10]);
        });
        assert!(matches!(
            lines.next(Duration::from_secs(5)),
            Err(ReadError::TooLong)
        ));
        drop(lines);
        writer.join().unwrap();
    }
}
