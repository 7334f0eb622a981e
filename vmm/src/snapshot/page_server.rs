//! Out-of-process lazy restore: `vmm page-server --snapshot DIR --socket PATH` serves the pages
//! of one restore (`vmm restore DIR --lazy --demand NAME --page-server PATH`) and exits, as
//! Firecracker's snapshot restore does with its page-fault handler process. The wire format is
//! in `page_proto`.
//!
//! - uffd backends: the restoring vmm arms the pager as in-process, then hands the userfaultfd
//!   (and, for MINOR, the guest-RAM memfd) to the server with
//!   SCM_RIGHTS beside a JSON description of the memory layout. The server builds its own pager
//!   on those descriptors (`UffdMissing::from_fd`, `UffdMinor::from_fd`) and runs the ordinary
//!   `Lazy` fault loop: UFFDIO_COPY / pwrite + UFFDIO_CONTINUE act on the restoring process's
//!   address space through the passed descriptor. The restoring vmm runs no fault thread.
//! - exit backends: the vCPU thread (and the restoring vmm's own fault thread for KVM's and
//!   the VMM's accesses) reads pages through a `PageClient`, one connection per concurrent
//!   caller, and installs them itself as in-process.
//!
//! A server that dies or fails ends the restore with its reason: the restoring vmm watches the
//! main connection and stops the guest rather than let it run on with memory missing.

mod handshake;
mod heartbeat;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::files;
use super::lazy::{DemandReport, Lazy, OnFail, PageSource};
use super::page_proto::{self as proto, Message, ProtoError, HEADER_LEN, MAX_PAGES, PAGE};
use crate::machine::progress::Percentiles;
use crate::memory::RamRange;
use crate::userfault::{
    DemandKind, DemandPager, UffdMinor, UffdMissing, UnknownDemand, UserfaultError,
};
use handshake::{check_handshake, ranges_of};
pub use handshake::{Handshake, Ready, WireRange};

/// How long a peer may take to send a frame that is due (handshake, answers).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `finish` waits for the server's `Stats` (it completes a prefetch first).
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);
/// Descriptors the handshake may carry.
const MAX_FDS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum PageServerError {
    #[error("page server protocol: {0}")]
    Proto(#[from] ProtoError),
    /// The server's words from `Refuse` or `Error`, or the description of a bad handshake that
    /// this server sends in its `Refuse`.
    #[error("the page server refused the restore: {0}")]
    Refused(String),
    /// This server cannot page with the descriptors it was given (its `Refuse` says why).
    #[error("the page server refused the restore: {0}")]
    Unusable(#[source] UserfaultError),
    #[error("the page server refused the restore: {0}")]
    Backend(#[source] UnknownDemand),
    /// A protocol violation described, or the peer's words from its `Error`.
    #[error("{0}")]
    Failed(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Json {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Files(#[from] files::SnapshotFileError),
    #[error(transparent)]
    Demand(#[from] UserfaultError),
    #[error("dropping root: {0}")]
    Sandbox(#[from] crate::seccomp::SeccompError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PageServerError {
    let what = what.into();
    move |source| PageServerError::Io { what, source }
}

fn json_err(what: &'static str) -> impl FnOnce(serde_json::Error) -> PageServerError {
    move |source| PageServerError::Json { what, source }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the server measured (its `Stats` frame, and `vmm page-server --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerReport {
    pub backend: String,
    /// "uffd" (the server handled the faults) or "exits" (it answered page reads).
    pub mode: String,
    pub pid: u32,
    /// uffd mode: the fault handler's report, as an in-process restore gives it.
    pub demand: Option<DemandReport>,
    /// exits mode: `Read` requests answered, pages sent, data connections.
    pub requests: u64,
    pub pages_sent: u64,
    pub connections: u64,
    /// exits mode: request received to answer sent, microseconds.
    pub serve_us: Option<Percentiles>,
}

/// Sends a frame with descriptors attached (SCM_RIGHTS travel with its first byte).
fn send_with_fds(s: &UnixStream, msg: &Message, fds: &[RawFd]) -> Result<(), PageServerError> {
    let frame = proto::encode(0, msg)?;
    let sent = s
        .send_with_fds(&[&frame[..]], fds)
        .map_err(|e| io("sending the handshake and descriptors")(std::io::Error::other(e)))?;
    if sent < frame.len() {
        let mut w = s;
        std::io::Write::write_all(&mut w, &frame[sent..]).map_err(io("sending the handshake"))?;
    }
    Ok(())
}

/// Receives a frame and the descriptors attached to it (each owned, closed on drop).
fn recv_with_fds(s: &UnixStream) -> Result<(Message, Vec<OwnedFd>), PageServerError> {
    let mut h = [0u8; HEADER_LEN];
    let mut raw = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: h.as_mut_ptr() as *mut libc::c_void,
        iov_len: HEADER_LEN,
    }];
    // SAFETY: the one iovec points at `h`, a live writable buffer of HEADER_LEN bytes.
    let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }
        .map_err(|e| io("receiving the handshake")(std::io::Error::other(e)))?;
    let fds = raw[..nfds.min(MAX_FDS)]
        .iter()
        // SAFETY: recvmsg installed these descriptors in this process for us; nothing else
        // owns them.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if n == 0 {
        return Err(ProtoError::Closed.into());
    }
    let mut r = s;
    let (_, msg) = proto::recv_rest(&mut r, &mut h, n)?;
    Ok((msg, fds))
}

/// Whether `fd` is a userfaultfd (its /proc link names the anon inode).
fn is_userfaultfd(fd: &OwnedFd) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|l| l.to_string_lossy().contains("userfaultfd"))
        .unwrap_or(false)
}

/// `vmm page-server`: serves one restore of the snapshot in `dir` on `socket`, then returns.
pub fn serve(dir: &Path, socket: &Path) -> Result<ServerReport, PageServerError> {
    let (_, memfile) = files::read(dir)?;
    let mem_len = memfile
        .metadata()
        .map_err(io("the snapshot's memory file"))?
        .len();
    if let Ok(m) = std::fs::symlink_metadata(socket) {
        if m.file_type().is_socket() {
            let _ = std::fs::remove_file(socket);
        }
    }
    let listener =
        UnixListener::bind(socket).map_err(io(format!("binding {}", socket.display())))?;
    tracing::info!("page server: waiting on {}", socket.display());
    let (main, _) = listener
        .accept()
        .map_err(io("accepting the restoring vmm"))?;
    main.set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(io("the main connection"))?;
    // What needs root is done (socket bound, snapshot open, the peer connected); what the peer
    // sends is read as the `--user` of the policy, if it names one.
    crate::seccomp::drop_privileges()?;
    let (hello, fds) = recv_with_fds(&main)?;
    // Each refusal's reason goes to the restoring vmm in `Refuse`.
    let refuse = |e: PageServerError| -> PageServerError {
        let reason = match &e {
            PageServerError::Refused(why) => why.clone(),
            PageServerError::Unusable(source) => source.to_string(),
            PageServerError::Backend(source) => source.to_string(),
            other => other.to_string(),
        };
        let _ = proto::send(&mut &main, 0, &Message::Refuse(reason));
        e
    };
    let refuse_msg = |why: String| refuse(PageServerError::Refused(why));
    let hs: Handshake = match hello {
        Message::Hello(json) => serde_json::from_slice(&json).map_err(|source| {
            refuse(PageServerError::Json {
                what: "malformed handshake",
                source,
            })
        })?,
        other => {
            return Err(refuse_msg(format!(
                "expected Hello as the first frame, got {}",
                other.name()
            )))
        }
    };
    let kind = check_handshake(&hs, mem_len, fds.len()).map_err(&refuse)?;
    let ranges = ranges_of(&hs.ranges);
    let hosts: Vec<u64> = hs.ranges.iter().map(|r| r.host).collect();
    let pid = std::process::id();
    let session = u64::from(pid) << 32
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    let uffd_mode = kind.is_uffd();
    let writer = Arc::new(Mutex::new(
        main.try_clone().map_err(io("the main connection"))?,
    ));

    let mut lazy_threads: Vec<JoinHandle<()>> = Vec::new();
    let mut prefetcher = None;
    let mut lazy = None;
    let exits = Arc::new(ExitsServer::new(ranges.clone(), memfile, session)?);
    if uffd_mode {
        let mut it = fds.into_iter();
        let uffd = it
            .next()
            .ok_or_else(|| refuse_msg("no userfaultfd received".into()))?;
        if !is_userfaultfd(&uffd) {
            return Err(refuse_msg(
                "the first descriptor is not a userfaultfd".into(),
            ));
        }
        let pager: Arc<dyn DemandPager> = match kind {
            DemandKind::UffdMissing => Arc::new(
                UffdMissing::from_fd(uffd, &ranges, &hosts)
                    .map_err(|e| refuse(PageServerError::Unusable(e)))?,
            ),
            _ => {
                let memfd = it
                    .next()
                    .map(File::from)
                    .ok_or_else(|| refuse_msg("no guest-RAM memfd received".into()))?;
                Arc::new(
                    UffdMinor::from_fd(uffd, &ranges, &hosts, memfd, &hs.pending)
                        .map_err(|e| refuse(PageServerError::Unusable(e)))?,
                )
            }
        };
        let source: Arc<dyn PageSource> = exits.clone();
        let l = Arc::new(
            Lazy::new(pager, source, &ranges, &hs.pending, hs.chunk)
                .map_err(|e| refuse(PageServerError::Unusable(e)))?,
        );
        {
            let writer = writer.clone();
            l.on_fail(Box::new(move |reason| {
                let mut g = lock(&writer);
                let _ = proto::send(&mut *g, 0, &Message::Error(reason.to_string()));
            }));
        }
        let ls = l.clone();
        lazy_threads.push(
            std::thread::Builder::new()
                .name("page-server-faults".into())
                .spawn(move || {
                    crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::PageServer);
                    ls.serve()
                })
                .map_err(io("starting the fault thread"))?,
        );
        if hs.prefetch {
            let lp = l.clone();
            prefetcher = Some(
                std::thread::Builder::new()
                    .name("page-server-prefetch".into())
                    .spawn(move || {
                        crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::PageServer);
                        lp.prefetch()
                    })
                    .map_err(io("starting the prefetch thread"))?,
            );
        }
        lazy = Some(l);
    } else if !fds.is_empty() {
        return Err(refuse_msg(format!(
            "{}: no descriptors expected, got {}",
            hs.backend,
            fds.len()
        )));
    }
    let acceptor = if uffd_mode {
        None
    } else {
        let x = exits.clone();
        Some(
            std::thread::Builder::new()
                .name("page-server-accept".into())
                .spawn(move || {
                    crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::PageServer);
                    x.accept_loop(listener)
                })
                .map_err(io("starting the acceptor"))?,
        )
    };
    let ready = serde_json::to_vec(&Ready { session, pid }).map_err(json_err("encoding Ready"))?;
    proto::send(&mut *lock(&writer), 0, &Message::Ready(ready))?;
    let mut heartbeat = heartbeat::Heartbeat::start(writer.clone())?;
    // From now on the restoring vmm may take as long as its guest runs.
    main.set_read_timeout(None)
        .map_err(io("the main connection"))?;
    // The server's own setup is done (snapshot open, socket, threads): from here its main thread
    // talks on the main connection, joins the others, and the command removes the socket.
    crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::PageServer);
    let mut r = &main;
    let end = loop {
        match proto::recv(&mut r) {
            Ok((_, Message::Resuming)) => {
                if let Some(l) = &lazy {
                    l.resuming();
                }
            }
            Ok((_, Message::Finish)) => break Ok(()),
            Ok((_, Message::Error(reason))) => {
                break Err(PageServerError::Failed(format!(
                    "the restoring vmm gave up: {reason}"
                )))
            }
            Ok((_, other)) => {
                let reason = format!("unexpected {} on the main connection", other.name());
                let _ = proto::send(&mut *lock(&writer), 0, &Message::Error(reason.clone()));
                break Err(PageServerError::Failed(reason));
            }
            Err(ProtoError::Closed) => {
                break Err(PageServerError::Failed(
                    "the restoring vmm closed the connection before Finish (it exited or died)"
                        .into(),
                ))
            }
            Err(e) => break Err(e.into()),
        }
    };
    // A prefetch in progress completes, unless the peer is gone.
    if let Some(p) = prefetcher {
        if end.is_err() {
            if let Some(l) = &lazy {
                l.stop();
            }
        }
        let _ = p.join();
    }
    if let Some(l) = &lazy {
        l.stop();
    }
    for t in lazy_threads {
        let _ = t.join();
    }
    exits.done.store(true, Ordering::Release);
    if let Some(a) = acceptor {
        let _ = a.join();
    }
    end?;
    let data_pages: u64 = hs.pending.iter().map(|r| r.1).sum();
    let mut lat = lock(&exits.serve_us).clone();
    let report = ServerReport {
        backend: hs.backend.clone(),
        mode: if uffd_mode { "uffd" } else { "exits" }.into(),
        pid,
        demand: lazy.as_ref().map(|l| l.report(0, data_pages)),
        requests: exits.requests.load(Ordering::Acquire),
        pages_sent: exits.pages.load(Ordering::Acquire),
        connections: exits.connections.load(Ordering::Acquire),
        serve_us: Percentiles::of(&mut lat),
    };
    let json = serde_json::to_vec(&report).map_err(json_err("encoding the report"))?;
    heartbeat.stop();
    proto::send(&mut *lock(&writer), 0, &Message::Stats(json))?;
    if let Some(e) = report.demand.as_ref().and_then(|d| d.error.clone()) {
        return Err(PageServerError::Failed(format!("serving faults: {e}")));
    }
    Ok(report)
}

/// The server's page reads: the file for its own fault loop (uffd), and the data connections
/// of the exit backends.
struct ExitsServer {
    ranges: Vec<RamRange>,
    file: File,
    session: u64,
    done: AtomicBool,
    requests: AtomicU64,
    pages: AtomicU64,
    connections: AtomicU64,
    serve_us: Mutex<Vec<f64>>,
}

impl PageSource for ExitsServer {
    fn read(&self, gpa: u64, file_offset: u64, buf: &mut [u8]) -> Result<(), UserfaultError> {
        PageSource::read(&self.file, gpa, file_offset, buf)
    }
}

impl ExitsServer {
    fn new(ranges: Vec<RamRange>, file: File, session: u64) -> Result<Self, PageServerError> {
        Ok(ExitsServer {
            ranges,
            file,
            session,
            done: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            serve_us: Mutex::new(Vec::new()),
        })
    }

    fn accept_loop(self: Arc<Self>, listener: UnixListener) {
        while !self.done.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, count 1.
            let rc = unsafe { libc::poll(&mut pfd, 1, 50) };
            if rc <= 0 {
                continue;
            }
            let Ok((conn, _)) = listener.accept() else {
                continue;
            };
            self.connections.fetch_add(1, Ordering::AcqRel);
            let me = self.clone();
            let _ = std::thread::Builder::new()
                .name("page-server-conn".into())
                .spawn(move || {
                    crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::PageServer);
                    if let Err(e) = me.serve_conn(conn) {
                        tracing::warn!("page server: data connection: {e}");
                    }
                });
        }
    }

    fn serve_conn(&self, conn: UnixStream) -> Result<(), PageServerError> {
        conn.set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(io("a data connection"))?;
        let mut r = &conn;
        let mut w = &conn;
        match proto::recv(&mut r)? {
            (_, Message::Join { session }) if session == self.session => {}
            (_, Message::Join { session }) => {
                let reason = format!("unknown session {session:#x}");
                let _ = proto::send(&mut w, 0, &Message::Error(reason.clone()));
                return Err(PageServerError::Failed(reason));
            }
            (_, other) => {
                let reason = format!("expected Join, got {}", other.name());
                let _ = proto::send(&mut w, 0, &Message::Error(reason.clone()));
                return Err(PageServerError::Failed(reason));
            }
        }
        // A vCPU may not fault for a long time: no timeout between requests.
        conn.set_read_timeout(None)
            .map_err(io("a data connection"))?;
        loop {
            let (id, msg) = match proto::recv(&mut r) {
                Ok(m) => m,
                Err(ProtoError::Closed) => return Ok(()),
                Err(e) => {
                    let _ = proto::send(&mut w, 0, &Message::Error(e.to_string()));
                    return Err(e.into());
                }
            };
            let t = Instant::now();
            let Message::Read { gpa, pages } = msg else {
                let reason = format!("expected Read, got {}", msg.name());
                let _ = proto::send(&mut w, id, &Message::Error(reason.clone()));
                return Err(PageServerError::Failed(reason));
            };
            let len = u64::from(pages) * PAGE;
            let Some(off) = self
                .ranges
                .iter()
                .find(|r| gpa >= r.gpa && len <= r.size && gpa - r.gpa <= r.size - len)
                .map(|r| r.file_offset + (gpa - r.gpa))
            else {
                let reason = format!("0x{gpa:x}+{pages} pages is not guest RAM");
                let _ = proto::send(&mut w, id, &Message::Error(reason.clone()));
                return Err(PageServerError::Failed(reason));
            };
            let mut data = vec![0u8; len as usize];
            if let Err(source) = self.file.read_exact_at(&mut data, off) {
                let e = PageServerError::Io {
                    what: format!("reading the snapshot at 0x{gpa:x}"),
                    source,
                };
                let _ = proto::send(&mut w, id, &Message::Error(e.to_string()));
                return Err(e);
            }
            proto::send(&mut w, id, &Message::Data(data))?;
            self.requests.fetch_add(1, Ordering::AcqRel);
            self.pages.fetch_add(u64::from(pages), Ordering::AcqRel);
            lock(&self.serve_us).push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
}

/// The restoring side of a page-server session: the main connection, and its watcher.
pub struct Session {
    path: PathBuf,
    main: UnixStream,
    ready: Ready,
    finishing: Arc<AtomicBool>,
    dead: Arc<Mutex<Option<String>>>,
    watcher: Option<JoinHandle<()>>,
}

impl Session {
    /// Connects, sends the handshake with `fds` attached, and waits for `Ready`.
    pub fn connect(path: &Path, hs: &Handshake, fds: &[RawFd]) -> Result<Session, PageServerError> {
        let main = UnixStream::connect(path).map_err(io(format!(
            "connecting to the page server at {}",
            path.display()
        )))?;
        main.set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(io("the page-server connection"))?;
        let json = serde_json::to_vec(hs).map_err(json_err("encoding the handshake"))?;
        send_with_fds(&main, &Message::Hello(json), fds)?;
        let mut r = &main;
        let ready = match proto::recv(&mut r) {
            Ok((_, Message::Ready(json))) => {
                serde_json::from_slice::<Ready>(&json).map_err(json_err("malformed Ready"))?
            }
            Ok((_, Message::Refuse(reason))) => return Err(PageServerError::Refused(reason)),
            Ok((_, Message::Error(reason))) => return Err(PageServerError::Refused(reason)),
            Ok((_, other)) => {
                return Err(ProtoError::Unexpected {
                    expected: "Ready",
                    found: other.name(),
                }
                .into())
            }
            Err(e) => return Err(e.into()),
        };
        main.set_read_timeout(None)
            .map_err(io("the page-server connection"))?;
        tracing::info!(
            "page server {} (pid {}) serves {}",
            path.display(),
            ready.pid,
            hs.backend
        );
        Ok(Session {
            path: path.to_path_buf(),
            main,
            ready,
            finishing: Arc::new(AtomicBool::new(false)),
            dead: Arc::new(Mutex::new(None)),
            watcher: None,
        })
    }

    /// A page source over data connections of this session (exit backends).
    pub fn client(&self) -> PageClient {
        PageClient {
            path: self.path.clone(),
            pid: self.ready.pid,
            reply_timeout: heartbeat::silence_limit(),
            session: self.ready.session,
            pool: Mutex::new(Vec::new()),
            next_id: AtomicU32::new(1),
        }
    }

    /// Watches the main connection: the server sends only its heartbeat there until `Finish`
    /// unless it failed or died; then, or when it has been silent for `silence_limit()`,
    /// `on_dead` is called with the reason.
    pub fn watch(&mut self, on_dead: OnFail) -> Result<(), PageServerError> {
        let conn = self
            .main
            .try_clone()
            .map_err(io("the page-server connection"))?;
        let finishing = self.finishing.clone();
        let dead = self.dead.clone();
        let path = self.path.clone();
        let pid = self.ready.pid;
        let limit = heartbeat::silence_limit();
        self.watcher = Some(
            std::thread::Builder::new()
                .name("page-server-watch".into())
                .spawn(move || {
                    crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::PageServer);
                    let mut heard = Instant::now();
                    while !finishing.load(Ordering::Acquire) {
                        let silent = heard.elapsed();
                        let why = if silent > limit {
                            format!(
                                "it sent nothing for {:.1} s (no heartbeat: stopped, hung or \
                                 cut off; pid {pid})",
                                silent.as_secs_f64()
                            )
                        } else {
                            let mut pfd = libc::pollfd {
                                fd: conn.as_raw_fd(),
                                events: libc::POLLIN,
                                revents: 0,
                            };
                            // SAFETY: one valid pollfd, count 1.
                            let rc = unsafe { libc::poll(&mut pfd, 1, 50) };
                            if rc <= 0 {
                                continue;
                            }
                            let mut r = &conn;
                            match proto::recv(&mut r) {
                                Ok((_, Message::Alive)) => {
                                    heard = Instant::now();
                                    continue;
                                }
                                Ok((_, Message::Error(reason))) => format!("it failed: {reason}"),
                                Ok((_, other)) => {
                                    format!("it sent an unexpected {}", other.name())
                                }
                                Err(ProtoError::Closed) => {
                                    "it closed the connection (exited or died)".to_string()
                                }
                                Err(e) => e.to_string(),
                            }
                        };
                        let reason = format!(
                            "page server {}: {why}; the guest is stopped rather than run on with \
                             memory missing",
                            path.display()
                        );
                        *lock(&dead) = Some(reason.clone());
                        on_dead(&reason);
                        return;
                    }
                })
                .map_err(io("starting the page-server watcher"))?,
        );
        Ok(())
    }

    /// The server's failure, if it failed.
    pub fn dead(&self) -> Option<String> {
        lock(&self.dead).clone()
    }

    pub fn resuming(&self) -> Result<(), PageServerError> {
        let mut w = &self.main;
        proto::send(&mut w, 0, &Message::Resuming)?;
        Ok(())
    }

    /// Ends the session: the server finishes (a prefetch in progress completes) and reports.
    pub fn finish(mut self) -> Result<ServerReport, PageServerError> {
        self.finishing.store(true, Ordering::Release);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        if let Some(reason) = self.dead() {
            return Err(PageServerError::Failed(reason));
        }
        let mut w = &self.main;
        proto::send(&mut w, 0, &Message::Finish)?;
        // The server completes a prefetch first: allow for it.
        self.main
            .set_read_timeout(Some(FINISH_TIMEOUT))
            .map_err(io("the page-server connection"))?;
        let mut r = &self.main;
        // The heartbeat goes on while the server completes a prefetch; the read timeout ends a
        // silent server, the deadline one that only says Alive.
        let deadline = Instant::now() + FINISH_TIMEOUT;
        let reply = loop {
            match proto::recv(&mut r)? {
                (_, Message::Alive) if Instant::now() < deadline => continue,
                (_, Message::Alive) => {
                    return Err(PageServerError::Failed(format!(
                        "page server {}: no Stats within {} s of Finish, only heartbeats",
                        self.path.display(),
                        FINISH_TIMEOUT.as_secs()
                    )))
                }
                other => break other,
            }
        };
        match reply {
            (_, Message::Stats(json)) => {
                serde_json::from_slice(&json).map_err(json_err("malformed Stats"))
            }
            (_, Message::Error(reason)) => Err(PageServerError::Failed(format!(
                "page server {}: {reason}",
                self.path.display()
            ))),
            (_, other) => Err(ProtoError::Unexpected {
                expected: "Stats",
                found: other.name(),
            }
            .into()),
        }
    }

    /// Tells the server this restore failed (best effort) and closes.
    pub fn abort(self, reason: &str) {
        self.finishing.store(true, Ordering::Release);
        let mut w = &self.main;
        let _ = proto::send(&mut w, 0, &Message::Error(reason.to_string()));
    }
}

/// Reads pages from a page server: one data connection per concurrent caller (a vCPU thread,
/// the fault thread, the prefetcher), taken from a pool and returned after each answer.
pub struct PageClient {
    path: PathBuf,
    /// The server's pid as it gave it (names it in errors).
    pid: u32,
    /// A read's answer is due within the same silence that ends the session.
    reply_timeout: Duration,
    session: u64,
    pool: Mutex<Vec<UnixStream>>,
    next_id: AtomicU32,
}

impl PageClient {
    fn connect(&self) -> Result<UnixStream, PageServerError> {
        let conn = UnixStream::connect(&self.path).map_err(io("connecting"))?;
        conn.set_read_timeout(Some(self.reply_timeout))
            .map_err(io("a data connection"))?;
        let mut w = &conn;
        proto::send(
            &mut w,
            0,
            &Message::Join {
                session: self.session,
            },
        )?;
        Ok(conn)
    }

    fn read_piece(&self, gpa: u64, buf: &mut [u8]) -> Result<(), PageServerError> {
        let popped = lock(&self.pool).pop();
        let conn = match popped {
            Some(c) => c,
            None => self.connect()?,
        };
        let id = self.next_id.fetch_add(1, Ordering::AcqRel);
        let pages = (buf.len() as u64 / PAGE) as u32;
        let mut w = &conn;
        proto::send(&mut w, id, &Message::Read { gpa, pages })?;
        let mut r = &conn;
        let (got, msg) = proto::recv(&mut r).map_err(|e| match e {
            ProtoError::TimedOut { .. } => PageServerError::Failed(format!(
                "it sent nothing for {:.1} s in answer to a read of {gpa:#x} (stopped, hung or \
                 cut off; pid {})",
                self.reply_timeout.as_secs_f64(),
                self.pid
            )),
            e => e.into(),
        })?;
        let data = proto::expect_data(got, id, msg, buf.len())?;
        buf.copy_from_slice(&data);
        lock(&self.pool).push(conn);
        Ok(())
    }
}

impl PageSource for PageClient {
    fn read(&self, gpa: u64, _file_offset: u64, buf: &mut [u8]) -> Result<(), UserfaultError> {
        if buf.len() as u64 % PAGE != 0 {
            return Err(UserfaultError::Fetch {
                gpa,
                len: buf.len() as u64,
                reason: "not whole pages".into(),
            });
        }
        let max = (u64::from(MAX_PAGES) * PAGE) as usize;
        for (i, piece) in buf.chunks_mut(max).enumerate() {
            let at = gpa + (i * max) as u64;
            self.read_piece(at, piece)
                .map_err(|e| UserfaultError::Fetch {
                    gpa: at,
                    len: piece.len() as u64,
                    reason: format!("page server {}: {e}", self.path.display()),
                })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
