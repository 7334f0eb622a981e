//! Postcopy on the source: the guest is paused here and runs on the destination. One thread
//! answers the destination's page requests on the urgent connection at once; this thread pushes
//! every pending page on the main connection in order, jumping to the neighbourhood of each
//! request (pages near a fault are likely next). When all are sent it says `Complete` and waits
//! for the destination to confirm it holds every page; only then may this VM end.
//!
//! If a connection breaks after `PostcopyStart`, the guest's only complete copy of memory is
//! here but its CPU state has moved on at the destination: the source stays paused, holding
//! every page, and reports the failure (see README, "Postcopy failures").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::page_index::{AtomicPages, PageIndex};
use super::pages::PageSender;
use super::progress::{MigrationReport, Phase};
use super::protocol::{check_range, Message, ProtocolError, MAX_PAGES_PER_FRAME, PAGE_SIZE};
use super::rate::RateLimiter;
use super::source::{merge_destination_stats, unexpected, Reader, Writer};
use super::MigrationError;
use crate::machine::shared::Shared;

/// A request moves the push cursor to the start of its 1 MiB neighbourhood.
const NEIGHBOURHOOD_PAGES: u64 = 256;
const NO_JUMP: u64 = u64::MAX;
/// How long the destination may take to install the last pages and confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(120);

#[allow(clippy::too_many_arguments)]
pub fn serve(
    shared: &Arc<Shared>,
    pending: &[(u64, u64)],
    mut w: Writer,
    mut r: Reader,
    uw: Writer,
    ur: Reader,
    handover_ms: f64,
    report: &mut MigrationReport,
) -> Result<(), MigrationError> {
    let index = Arc::new(PageIndex::new(&shared.ranges));
    let todo = Arc::new(AtomicPages::new(index.total()));
    for &(gpa, pages) in pending {
        for p in 0..pages {
            if let Some(i) = index.index(gpa + p * PAGE_SIZE) {
                todo.set(i);
            }
        }
    }
    shared.progress().remaining_pages = todo.count();
    let jump = Arc::new(AtomicU64::new(NO_JUMP));
    let requested = Arc::new(AtomicU64::new(0));
    // Closing it is how the request thread learns that postcopy is over.
    let urgent_sock = uw.get_ref().get_ref().try_clone()?;
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
            .spawn(move || answer_requests(&shared, &index, &todo, &jump, &requested, uw, ur))?
    };

    let mut rate = RateLimiter::new(None);
    let mut sender = PageSender::new(&shared.memfd, &shared.ranges);
    let mut cursor = 0u64;
    let mut pushed = 0u64;
    let push = (|| -> Result<(), MigrationError> {
        loop {
            let j = jump.swap(NO_JUMP, Ordering::AcqRel);
            if j != NO_JUMP {
                cursor = j - j % NEIGHBOURHOOD_PAGES;
            }
            let Some(first) = todo.next_set(cursor) else {
                break;
            };
            let mut n = 1;
            let max = index.contiguous_from(first, MAX_PAGES_PER_FRAME as u64);
            while n < max && todo.get(first + n) {
                n += 1;
            }
            for i in first..first + n {
                todo.clear(i);
            }
            let gpa = index.gpa(first).unwrap_or(0);
            let sent = sender.send_run(&mut w, &mut rate, gpa, n)?;
            pushed += sent.pages + sent.zero_pages;
            report.pages_sent += sent.pages;
            report.zero_pages += sent.zero_pages;
            cursor = first + n;
            let mut p = shared.progress();
            p.remaining_pages = todo.count();
            p.bytes = w.bytes_sent();
        }
        w.send(&Message::Complete)?;
        w.flush()?;
        r.get_ref()
            .get_ref()
            .set_read_timeout(Some(CONFIRM_TIMEOUT))?;
        match r.recv()? {
            Message::Resumed => {}
            Message::Abort(reason) => return Err(MigrationError::Aborted(reason)),
            other => return Err(unexpected("Resumed", &other)),
        }
        if let Ok(Message::Stats(json)) = r.recv() {
            merge_destination_stats(report, &json);
        }
        Ok(())
    })();
    let _ = urgent_sock.shutdown(std::net::Shutdown::Both);
    let urgent_bytes = urgent.join().unwrap_or(0);
    report.bytes = w.bytes_sent() + urgent_bytes;
    let mut stats = report
        .destination
        .as_ref()
        .and_then(|d| d.postcopy.clone())
        .unwrap_or_default();
    stats.requested_pages = requested.load(Ordering::Acquire);
    stats.pushed_pages = pushed;
    report.postcopy = Some(stats);
    // Pause to the postcopy hand-over here, plus the destination's restore until its vCPUs ran.
    report.downtime_ms = handover_ms + report.destination.as_ref().map_or(0.0, |d| d.restore_ms);
    if let Err(e) = &push {
        shared.progress().phase = Phase::Failed;
        tracing::error!(
            "postcopy failed after the destination took over: {e}. The guest stays paused \
             here with every page; resume it here only if the destination is gone"
        );
    }
    push
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
        tracing::warn!("postcopy urgent channel: {e}");
    }
    uw.bytes_sent()
}
