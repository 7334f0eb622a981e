//! Postcopy on the source: the guest is paused here and runs on the destination. One thread
//! answers the destination's page requests on the urgent connection at once; the migration
//! thread pushes every pending page on the main connection in order, jumping to the
//! neighbourhood of each request (pages near a fault are likely next); a third thread listens on
//! the main connection for the destination's word. When all pages are sent the source says
//! `Complete` and waits for the destination to confirm it holds every page; only then may this
//! VM end.
//!
//! If the destination reports that it never ran the guest (`protocol::ABORT_NOT_STARTED`), the
//! source still has the only live copy and resumes it. If a connection breaks once the
//! destination may have run the guest, its CPU state has moved on there and part of its memory
//! is only here: the source stays paused, holding every page, and reports the failure (see
//! README, "Postcopy failures").

use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver as Events, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::link::Link;
use super::pages::PageSender;
use super::protocol::{
    check_range, Message, ProtocolError, ABORT_NOT_STARTED, MAX_PAGES_PER_FRAME, PAGE_SIZE,
};
use super::rate::RateLimiter;
use super::source::{merge_destination_stats, unexpected, Reader, Writer, STATS_TIMEOUT};
use super::MigrationError;
use crate::machine::progress::{MigrationReport, Phase};
use crate::machine::shared::Shared;
use crate::memory::page_index::{AtomicPages, PageIndex};

/// A request moves the push cursor to the start of its 1 MiB neighbourhood.
const NEIGHBOURHOOD_PAGES: u64 = 256;
const NO_JUMP: u64 = u64::MAX;
/// How long the destination may take to install the last pages and confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(120);

/// What the destination says on the main connection.
enum Word {
    Resumed,
    Stats(Vec<u8>),
    /// The destination's words, from its `Abort`.
    Aborted(String),
    Lost(ProtocolError),
}

/// The postcopy machinery, set up before the point of no return.
pub struct Postcopy {
    index: Arc<PageIndex>,
    todo: Arc<AtomicPages>,
    jump: Arc<AtomicU64>,
    requested: Arc<AtomicU64>,
    urgent: Option<JoinHandle<u64>>,
    urgent_sock: Link,
    main_sock: Link,
    words: Events<Word>,
    listener: Option<JoinHandle<()>>,
}

impl Postcopy {
    /// Builds the pending set and starts the urgent-request and main-connection threads; they
    /// do nothing visible until `serve`.
    pub fn prepare(
        shared: &Arc<Shared>,
        pending: &[(u64, u64)],
        r: Reader,
        uw: Writer,
        ur: Reader,
    ) -> Result<Postcopy, MigrationError> {
        let index = Arc::new(PageIndex::new(&shared.ranges));
        let todo = Arc::new(AtomicPages::new(index.total()));
        for &(gpa, pages) in pending {
            for p in 0..pages {
                if let Some(i) = index.index(gpa + p * PAGE_SIZE) {
                    todo.set(i);
                }
            }
        }
        // Closing these is how the two threads learn that postcopy is over.
        let urgent_sock = uw.get_ref().get_ref().try_clone()?;
        let main_sock = r.get_ref().get_ref().try_clone()?;
        let jump = Arc::new(AtomicU64::new(NO_JUMP));
        let requested = Arc::new(AtomicU64::new(0));
        let urgent = {
            let (shared, index, todo, jump, requested) = (
                shared.clone(),
                index.clone(),
                todo.clone(),
                jump.clone(),
                requested.clone(),
            );
            std::thread::Builder::new()
                .name("postcopy-urgent".into())
                .spawn(move || {
                    crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Migration);
                    answer_requests(&shared, &index, &todo, &jump, &requested, uw, ur)
                })?
        };
        let (tx, words) = channel();
        let listener = std::thread::Builder::new()
            .name("postcopy-listen".into())
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Migration);
                listen(r, tx)
            })?;
        Ok(Postcopy {
            index,
            todo,
            jump,
            requested,
            urgent: Some(urgent),
            urgent_sock,
            main_sock,
            words,
            listener: Some(listener),
        })
    }

    /// The point of no return was not reached: stop the threads.
    pub fn cancel(mut self) {
        self.close();
    }

    fn close(&mut self) -> u64 {
        let _ = self.urgent_sock.shutdown(Shutdown::Both);
        let _ = self.main_sock.shutdown(Shutdown::Read);
        let bytes = self.urgent.take().map_or(0, |t| t.join().unwrap_or(0));
        if let Some(t) = self.listener.take() {
            let _ = t.join();
        }
        bytes
    }

    /// Pushes every pending page, then waits for the destination's confirmation.
    pub fn serve(
        mut self,
        shared: &Arc<Shared>,
        mut w: Writer,
        handover_ms: f64,
        user_paused: bool,
        report: &mut MigrationReport,
    ) -> Result<(), MigrationError> {
        shared.progress().remaining_pages = self.todo.count();
        let mut rate = RateLimiter::new(None);
        let mut sender = PageSender::new(&shared.memfd, &shared.ranges);
        let mut cursor = 0u64;
        let mut pushed = 0u64;
        let outcome = (|| -> Result<(), MigrationError> {
            loop {
                match self.words.try_recv() {
                    Ok(word) => return Err(word_error(word)),
                    Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => {}
                }
                let j = self.jump.swap(NO_JUMP, Ordering::AcqRel);
                if j != NO_JUMP {
                    cursor = j - j % NEIGHBOURHOOD_PAGES;
                }
                let Some(first) = self.todo.next_set(cursor) else {
                    break;
                };
                let mut n = 1;
                let max = self
                    .index
                    .contiguous_from(first, MAX_PAGES_PER_FRAME as u64);
                while n < max && self.todo.get(first + n) {
                    n += 1;
                }
                for i in first..first + n {
                    self.todo.clear(i);
                }
                let gpa = self.index.gpa(first).unwrap_or(0);
                let sent = sender.send_run(&mut w, &mut rate, gpa, n)?;
                pushed += sent.pages + sent.zero_pages;
                report.pages_sent += sent.pages;
                report.zero_pages += sent.zero_pages;
                cursor = first + n;
                let mut p = shared.progress();
                p.remaining_pages = self.todo.count();
                p.bytes = w.bytes_sent();
            }
            w.send(&Message::Complete)?;
            w.flush()?;
            match self.words.recv_timeout(CONFIRM_TIMEOUT) {
                Ok(Word::Resumed) => {}
                Ok(other) => return Err(word_error(other)),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(MigrationError::Timeout(
                        "waiting for the destination to confirm it holds every page".into(),
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrationError::Aborted("the destination went away".into()))
                }
            }
            if let Ok(Word::Stats(json)) = self.words.recv_timeout(STATS_TIMEOUT) {
                merge_destination_stats(report, &json);
            }
            Ok(())
        })();
        // A write can fail because the destination gave up and closed: its Abort, saying
        // whether it ever ran the guest, may be just behind. Look before deciding.
        let outcome = match outcome {
            Err(e) if !matches!(e, MigrationError::Aborted(_) | MigrationError::MainLost(_)) => {
                match self.words.recv_timeout(Duration::from_secs(2)) {
                    Ok(Word::Aborted(reason)) => Err(MigrationError::Aborted(reason)),
                    _ => Err(e),
                }
            }
            other => other,
        };
        let urgent_bytes = self.close();
        report.bytes = w.bytes_sent() + urgent_bytes;
        let mut stats = report
            .destination
            .as_ref()
            .and_then(|d| d.postcopy.clone())
            .unwrap_or_default();
        stats.requested_pages = self.requested.load(Ordering::Acquire);
        stats.pushed_pages = pushed;
        report.postcopy = Some(stats);
        // Pause to the postcopy hand-over here, plus the destination's restore until its vCPUs
        // ran.
        report.downtime_ms =
            handover_ms + report.destination.as_ref().map_or(0.0, |d| d.restore_ms);
        match outcome {
            Ok(()) => Ok(()),
            Err(MigrationError::Aborted(reason)) if reason.starts_with(ABORT_NOT_STARTED) => {
                // The destination never ran the guest: the copy here is the live one (paused
                // still, if its user had paused it).
                if let Err(e) = super::source::release_pause(shared, user_paused) {
                    tracing::error!("resuming the guest after the destination gave up: {e}");
                }
                tracing::warn!("postcopy abandoned before the destination ran the guest; it runs on here: {reason}");
                Err(MigrationError::Aborted(reason))
            }
            Err(e) => {
                shared.progress().phase = Phase::Failed;
                tracing::error!(
                    "postcopy failed after the destination took over: {e}. The guest stays \
                     paused here with every page; resume it here only if the destination is gone"
                );
                Err(e)
            }
        }
    }
}

fn word_error(word: Word) -> MigrationError {
    match word {
        Word::Aborted(reason) => MigrationError::Aborted(reason),
        Word::Lost(e) => MigrationError::MainLost(e),
        Word::Resumed | Word::Stats(_) => MigrationError::Protocol(ProtocolError::Unexpected {
            expected: "nothing before Complete",
            found: "Resumed",
        }),
    }
}

/// The main connection, destination to source: Resumed, Stats, or an Abort.
fn listen(mut r: Reader, tx: std::sync::mpsc::Sender<Word>) {
    loop {
        let word = match r.recv() {
            Ok(Message::Resumed) => Word::Resumed,
            Ok(Message::Stats(json)) => Word::Stats(json),
            Ok(Message::Abort(reason)) => Word::Aborted(reason),
            Ok(other) => Word::Lost(ProtocolError::Unexpected {
                expected: "Resumed",
                found: other.name(),
            }),
            Err(ProtocolError::Closed) => return,
            Err(e) => Word::Lost(e),
        };
        let last = !matches!(word, Word::Resumed);
        if tx.send(word).is_err() || last {
            return;
        }
    }
}

/// The urgent connection: each PageRequest is answered at once with those pages (their
/// current content: the guest is paused here) and moves the push cursor. Returns bytes sent.
fn answer_requests(
    shared: &Shared,
    index: &PageIndex,
    todo: &AtomicPages,
    jump: &AtomicU64,
    requested: &AtomicU64,
    mut uw: Writer,
    mut ur: Reader,
) -> u64 {
    let ram = shared.ram_table();
    let mut sender = PageSender::new(&shared.memfd, &shared.ranges);
    let mut rate = RateLimiter::new(None);
    let result = (|| -> Result<(), MigrationError> {
        loop {
            match ur.recv() {
                Ok(Message::PageRequest { gpa, pages }) => {
                    let len = pages as u64 * PAGE_SIZE;
                    check_range(&ram, gpa, len)?;
                    sender.send_run(&mut uw, &mut rate, gpa, pages as u64)?;
                    uw.flush()?;
                    requested.fetch_add(pages as u64, Ordering::AcqRel);
                    if let Some(i) = index.index(gpa) {
                        for k in 0..pages as u64 {
                            todo.clear(i + k);
                        }
                        jump.store(i, Ordering::Release);
                    }
                }
                Ok(other) => return Err(unexpected("PageRequest", &other)),
                Err(ProtocolError::Closed) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    })();
    if let Err(e) = result {
        tracing::debug!("postcopy urgent channel: {e}");
    }
    uw.bytes_sent()
}
