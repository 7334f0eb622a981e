//! Data channels: precopy pages over several connections at once, as QEMU's multifd moves
//! them, so that reading guest RAM and sending it (source) and receiving and storing it
//! (destination: the copy into fresh memfd pages is most of its time) run on several cores.
//!
//! The split is by address: the page at `gpa` always goes on channel `(gpa / CHUNK_BYTES) % n`,
//! so every version of a page crosses one connection in order and the channels need no ordering
//! between them. The only synchronisation is the round end: each channel closes a round with its
//! own `RoundEnd` (its share of the pages); the destination passes main's `RoundEnd` (the total)
//! only once every channel has closed that round (`Receivers::round_end`). The wire rules are in
//! `protocol` ("Data channels").

use std::fs::File;
use std::net::{Shutdown, TcpListener};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::link::Link;
use super::pages::{self, PageSender, RamView, Sent};
use super::protocol::{check_range, Message, ProtocolError, Role, MAX_DATA_CHANNELS, PAGE_SIZE};
use super::rate::RateLimiter;
use super::source::{Reader, Writer};
use super::MigrationError;
use crate::memory::RamRange;

/// Guest RAM is dealt to the channels in chunks of this size (a huge page: long runs stay on
/// one connection, and a round's pages spread over all of them).
pub const CHUNK_BYTES: u64 = 2 << 20;

/// The channel that carries the page at `gpa`.
pub fn channel_of(gpa: u64, n: usize) -> usize {
    // n >= 1 here; `max` keeps a zero from ever dividing.
    ((gpa / CHUNK_BYTES) % (n.max(1) as u64)) as usize
}

/// Cuts runs of pages (gpa, pages) at chunk boundaries and deals the pieces to `n` channels.
pub fn split(runs: &[(u64, u64)], n: usize) -> Vec<Vec<(u64, u64)>> {
    let mut out = vec![Vec::new(); n.max(1)];
    for &(gpa, pages) in runs {
        let mut at = gpa;
        let mut left = pages;
        while left > 0 {
            let to_boundary = (CHUNK_BYTES - at % CHUNK_BYTES) / PAGE_SIZE;
            let take = left.min(to_boundary.max(1));
            out[channel_of(at, n)].push((at, take));
            at = at.saturating_add(take * PAGE_SIZE);
            left -= take;
        }
    }
    out
}

/// The source's data connections.
pub struct DataChannels {
    writers: Vec<Writer>,
    /// Each channel's page buffer, kept from round to round.
    buffers: Vec<Vec<u8>>,
}

impl DataChannels {
    /// Opens `n` data connections to `addr` for `session` (each secured like main).
    pub fn connect(
        addr: &str,
        tls: &super::tls::Connector,
        session: u64,
        n: u8,
    ) -> Result<DataChannels, MigrationError> {
        let mut writers = Vec::with_capacity(n as usize);
        for i in 0..n {
            let (mut w, _r) = super::source::connect(addr, tls)?;
            w.send(&Message::Channel {
                session,
                role: Role::Data(i),
            })?;
            w.flush()?;
            writers.push(w);
        }
        Ok(DataChannels {
            buffers: vec![Vec::new(); writers.len()],
            writers,
        })
    }

    pub fn len(&self) -> usize {
        self.writers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.writers.is_empty()
    }

    /// Bytes sent on every data connection so far.
    pub fn bytes_sent(&self) -> u64 {
        self.writers.iter().map(|w| w.bytes_sent()).sum()
    }

    /// Sends the pages of `runs` (gpa, bytes), each on its channel, every channel on a thread
    /// of its own, and closes the round on each. `bandwidth` (bytes/s, all channels together)
    /// is shared evenly. Meanwhile `main` says `Alive` every second, so that the destination,
    /// which watches main for silence, knows the source is there.
    pub fn send_round(
        &mut self,
        main: &mut Writer,
        ram: RamView<'_>,
        runs: &[(u64, u64)],
        round: u32,
        bandwidth: Option<u64>,
    ) -> Result<Sent, MigrationError> {
        let n = self.writers.len();
        let page_runs: Vec<(u64, u64)> = runs.iter().map(|&(g, b)| (g, b / PAGE_SIZE)).collect();
        let shares = split(&page_runs, n);
        let per_channel = bandwidth.map(|b| (b / n.max(1) as u64).max(1));
        let (tx, done) = mpsc::channel::<(usize, Result<Sent, MigrationError>)>();
        thread::scope(|s| {
            let mut started = 0;
            let mut first_error = None;
            for (i, ((w, buf), share)) in self
                .writers
                .iter_mut()
                .zip(self.buffers.iter_mut())
                .zip(shares.iter())
                .enumerate()
            {
                let tx = tx.clone();
                let spawned = thread::Builder::new()
                    .name(format!("migrate-data{i}"))
                    .spawn_scoped(s, move || {
                        crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Migration);
                        // Sends the thread's result even if sending pages panics.
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            send_share(w, buf, ram, share, round, per_channel).map_err(|e| {
                                MigrationError::DataChannel {
                                    channel: i,
                                    reason: e.to_string(),
                                }
                            })
                        }))
                        .unwrap_or_else(|_| {
                            Err(MigrationError::DataChannel {
                                channel: i,
                                reason: "its thread panicked".into(),
                            })
                        });
                        let _ = tx.send((i, result));
                    });
                match spawned {
                    Ok(_) => started += 1,
                    Err(e) => {
                        first_error.get_or_insert(MigrationError::Io(e));
                        break;
                    }
                }
            }
            drop(tx);
            let mut total = Sent::default();
            let mut finished = 0;
            let mut alive_at = Instant::now();
            while finished < started {
                match done.recv_timeout(ALIVE_EVERY) {
                    Ok((_, Ok(sent))) => {
                        total += sent;
                        finished += 1;
                    }
                    Ok((_, Err(e))) => {
                        first_error.get_or_insert(e);
                        finished += 1;
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                if first_error.is_none() && alive_at.elapsed() >= ALIVE_EVERY {
                    alive_at = Instant::now();
                    if let Err(e) = main.send(&Message::Alive).and_then(|()| main.flush()) {
                        first_error.get_or_insert(e.into());
                    }
                }
            }
            match first_error {
                Some(e) => Err(e),
                None => Ok(total),
            }
        })
    }
}

/// How often the source says `Alive` on main while the data channels carry a round.
const ALIVE_EVERY: Duration = Duration::from_secs(1);

/// One channel's share of a round, then its `RoundEnd`.
fn send_share(
    w: &mut Writer,
    buf: &mut Vec<u8>,
    ram: RamView<'_>,
    share: &[(u64, u64)],
    round: u32,
    bandwidth: Option<u64>,
) -> Result<Sent, MigrationError> {
    let mut sender = PageSender::with_buffer(ram.memfd, ram.ranges, std::mem::take(buf));
    sender.set_frozen(ram.frozen);
    let mut rate = RateLimiter::new(bandwidth);
    let result = (|| {
        let mut sent = Sent::default();
        for &(gpa, pages) in share {
            sent += sender.send_run(w, &mut rate, gpa, pages)?;
        }
        w.send(&Message::RoundEnd {
            round,
            pages: sent.pages + sent.zero_pages,
        })?;
        w.flush()?;
        Ok(sent)
    })();
    *buf = sender.into_buffer();
    result
}

/// How long the destination waits for each data connection once the main one is accepted.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Round ends (of all channels) reported and not yet taken by main's barrier, at most.
const EVENTS_QUEUED: usize = 64;

/// What a destination's channel thread reports.
enum Event {
    RoundEnd {
        channel: usize,
        round: u32,
        pages: u64,
    },
    Failed {
        channel: usize,
        error: MigrationError,
    },
}

/// What the destination's channel threads stored and read, all channels together.
#[derive(Debug, Default)]
pub struct Stored {
    pub pages: AtomicU64,
    pub zero_pages: AtomicU64,
    pub bytes: AtomicU64,
}

/// The destination's data connections, each read by a thread of its own that stores pages in
/// guest RAM as they come.
pub struct Receivers {
    threads: Vec<JoinHandle<()>>,
    stored: Arc<Stored>,
    /// To wake the threads (shut the sockets) at the end.
    links: Vec<Link>,
    events: mpsc::Receiver<Event>,
    /// Round ends reported and not yet matched with main's, per channel, in order.
    pending: Vec<std::collections::VecDeque<(u32, u64)>>,
}

impl Receivers {
    /// Accepts the source's `n` data connections for `session` (any order, each index once)
    /// and starts their threads.
    pub fn accept(
        listener: &TcpListener,
        session: u64,
        n: u8,
        tls: &super::tls::Acceptor,
        memfd: &File,
        ram: &[RamRange],
    ) -> Result<Receivers, MigrationError> {
        if n > MAX_DATA_CHANNELS {
            return Err(MigrationError::Hello(format!(
                "the source asks for {n} data connections; the most is {MAX_DATA_CHANNELS}"
            )));
        }
        let mut readers: Vec<Option<Reader>> = (0..n).map(|_| None).collect();
        let mut links = Vec::with_capacity(n as usize);
        let deadline = Instant::now() + ACCEPT_TIMEOUT;
        for _ in 0..n {
            let (_w, r, role) = super::dest::accept_channel(listener, session, tls, deadline)?;
            let i = match role {
                Role::Data(i) if i < n => i as usize,
                other => {
                    return Err(MigrationError::Hello(format!(
                        "expected one of {n} data connections, got {other:?}"
                    )))
                }
            };
            if readers[i].is_some() {
                return Err(MigrationError::Hello(format!(
                    "data connection {i} opened twice"
                )));
            }
            // No read timeout: a channel may idle while main carries device data, and main's
            // own silence limit (the source says `Alive` there) covers a source gone quiet.
            links.push(r.get_ref().get_ref().try_clone()?);
            readers[i] = Some(r);
        }
        // Bounded: a source that closes rounds on a data connection faster than main's barriers
        // pass them (a hostile one, endlessly) stalls that connection's thread, not our memory.
        let (tx, events) = mpsc::sync_channel(EVENTS_QUEUED);
        let stored = Arc::new(Stored::default());
        let table: Vec<(u64, u64)> = ram.iter().map(|r| (r.gpa, r.size)).collect();
        let mut threads = Vec::with_capacity(n as usize);
        for (channel, r) in readers.into_iter().enumerate() {
            let Some(r) = r else { continue };
            let memfd = memfd.try_clone()?;
            let ram = ram.to_vec();
            let table = table.clone();
            let tx = tx.clone();
            let stored = stored.clone();
            let t = thread::Builder::new()
                .name(format!("migrate-data{channel}"))
                .spawn(move || {
                    crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::Migration);
                    if let Err(error) = receive(r, channel, &memfd, &ram, &table, &tx, &stored) {
                        let _ = tx.send(Event::Failed { channel, error });
                    }
                })?;
            threads.push(t);
        }
        Ok(Receivers {
            threads,
            stored,
            links,
            events,
            pending: vec![Default::default(); n as usize],
        })
    }

    /// Waits until every channel has closed `round`; checks that their shares add up to
    /// `total` (main's count). A channel silent for `silence` ends it.
    pub fn round_end(
        &mut self,
        round: u32,
        total: u64,
        silence: Duration,
    ) -> Result<(), MigrationError> {
        loop {
            if self.pending.iter().all(|q| !q.is_empty()) {
                let mut sum = 0u64;
                for (i, q) in self.pending.iter_mut().enumerate() {
                    match q.pop_front() {
                        Some((r, pages)) if r == round => sum = sum.saturating_add(pages),
                        Some((r, _)) => {
                            return Err(MigrationError::DataChannel {
                                channel: i,
                                reason: format!("it closed round {r} where main closed {round}"),
                            })
                        }
                        None => unreachable!("checked non-empty above"),
                    }
                }
                if sum != total {
                    return Err(MigrationError::Hello(format!(
                        "round {round}: the data connections carried {sum} pages, main says \
                         {total}"
                    )));
                }
                return Ok(());
            }
            match self.events.recv_timeout(silence) {
                Ok(Event::RoundEnd {
                    channel,
                    round,
                    pages,
                }) => self.pending[channel].push_back((round, pages)),
                Ok(Event::Failed { channel, error }) => {
                    return Err(MigrationError::DataChannel {
                        channel,
                        reason: error.to_string(),
                    })
                }
                Err(_) => {
                    return Err(MigrationError::Timeout(format!(
                        "after {} s without the end of round {round} on every data connection",
                        silence.as_secs()
                    )))
                }
            }
        }
    }

    /// Stops the threads (they are idle once the last round has ended) and says what they
    /// stored.
    pub fn finish(mut self) {
        self.shut();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Pages, zero pages and bytes the channels have taken so far.
    pub fn stored(&self) -> (u64, u64, u64) {
        (
            self.stored.pages.load(Relaxed),
            self.stored.zero_pages.load(Relaxed),
            self.stored.bytes.load(Relaxed),
        )
    }

    fn shut(&self) {
        for l in &self.links {
            let _ = l.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Receivers {
    /// On an error the threads are woken (their sockets shut) and left to end on their own.
    fn drop(&mut self) {
        self.shut();
    }
}

/// One channel's thread: stores pages until the source closes the connection.
fn receive(
    mut r: Reader,
    channel: usize,
    memfd: &File,
    ram: &[RamRange],
    table: &[(u64, u64)],
    tx: &mpsc::SyncSender<Event>,
    stored: &Stored,
) -> Result<(), MigrationError> {
    let mut counted = 0u64;
    loop {
        let next = r.recv();
        let bytes = r.bytes_received();
        stored
            .bytes
            .fetch_add(bytes.saturating_sub(counted), Relaxed);
        counted = bytes;
        let msg = match next {
            Ok(m) => m,
            // The source closes the channels when the precopy part is over; the destination
            // shuts them at its end. Either way nothing is lost: main's barrier came first.
            Err(ProtocolError::Closed) => return Ok(()),
            Err(ProtocolError::Io(e)) if e.kind() == std::io::ErrorKind::NotConnected => {
                return Ok(())
            }
            Err(ProtocolError::TimedOut) => {
                return Err(MigrationError::Timeout(format!(
                    "data connection {channel}: the source went silent"
                )))
            }
            Err(e) => return Err(e.into()),
        };
        match msg {
            Message::Pages { gpa, data } => {
                check_range(table, gpa, data.len() as u64)?;
                pages::write_pages(memfd, ram, gpa, &data)?;
                stored
                    .pages
                    .fetch_add(data.len() as u64 / PAGE_SIZE, Relaxed);
                r.recycle(data);
            }
            Message::Zero { gpa, pages: n } => {
                check_range(table, gpa, n.saturating_mul(PAGE_SIZE))?;
                pages::zero_pages(memfd, ram, gpa, n)?;
                stored.zero_pages.fetch_add(n, Relaxed);
            }
            Message::RoundEnd { round, pages } => {
                if tx
                    .send(Event::RoundEnd {
                        channel,
                        round,
                        pages,
                    })
                    .is_err()
                {
                    return Ok(());
                }
            }
            other => {
                return Err(super::source::unexpected(
                    "Pages, Zero or RoundEnd on a data connection",
                    &other,
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_cut_at_chunks_and_each_chunk_has_one_channel() {
        let pages_per_chunk = CHUNK_BYTES / PAGE_SIZE;
        // One run from the middle of chunk 0 to the middle of chunk 3, and one page in chunk 5.
        let runs = [(CHUNK_BYTES / 2, 3 * pages_per_chunk), (5 * CHUNK_BYTES, 1)];
        let shares = split(&runs, 2);
        assert_eq!(
            shares[0],
            vec![
                (CHUNK_BYTES / 2, pages_per_chunk / 2),
                (2 * CHUNK_BYTES, pages_per_chunk)
            ]
        );
        assert_eq!(
            shares[1],
            vec![
                (CHUNK_BYTES, pages_per_chunk),
                (3 * CHUNK_BYTES, pages_per_chunk / 2),
                (5 * CHUNK_BYTES, 1)
            ]
        );
        // Nothing lost, nothing doubled.
        let total: u64 = shares.iter().flatten().map(|&(_, p)| p).sum();
        assert_eq!(total, 3 * pages_per_chunk + 1);
        for (i, share) in shares.iter().enumerate() {
            for &(gpa, pages) in share {
                assert_eq!(channel_of(gpa, 2), i);
                assert_eq!(channel_of(gpa + (pages - 1) * PAGE_SIZE, 2), i);
            }
        }
    }

    #[test]
    fn one_channel_takes_everything_in_order() {
        let runs = [(0, 1000), (8 << 20, 3)];
        let shares = split(&runs, 1);
        assert_eq!(shares.len(), 1);
        let total: u64 = shares[0].iter().map(|&(_, p)| p).sum();
        assert_eq!(total, 1003);
        assert!(shares[0].windows(2).all(|w| w[0].0 < w[1].0));
    }
}
