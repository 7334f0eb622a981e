//! The sending side: handshake, precopy rounds with a dirty tracker, pause, stop-and-copy or the
//! switch to postcopy, and the ownership hand-over. Until the point of no return (the
//! destination told to run: `Complete` in precopy, `PostcopyStart` in postcopy) any failure
//! resumes the guest here, intact.
//!
//! The pages each precopy round sends, and how, are `rounds`'s: this file decides when to pause
//! and who owns the guest.

use std::io::{BufReader, BufWriter};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::channels::DataChannels;
use super::devices::{DeviceDirty, SourceDevices};
use super::hello::Hello;
use super::link::Link;
use super::pages::{FrozenRam, PageSender};
use super::protocol::{FrameReader, FrameWriter, Message, ProtocolError, Role, PAGE_SIZE};
use super::rate::RateLimiter;
use super::tls::{Connector, Transport};
use super::{parse_tcp_url, postcopy_src, MigrationError, Mode};
use crate::machine::progress::{DeviceMigrationStats, DowntimeParts, MigrationReport, Phase};
use crate::machine::saved_state::VmSnapshot;
use crate::machine::shared::Shared;
use crate::tracking::device_dma::{DmaStats, WithDeviceDma};
use crate::tracking::{self, DirtySet, DirtyTracker, TrackerKind};
use crate::vstate::pause::{Owner, PauseError};

mod rounds;

use rounds::{note_round, precopy_rounds, HeldPause, Pages};

/// How long the source waits for the destination to restore and confirm it runs.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the destination may take to accept or refuse the Hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// A send that makes no progress this long means the destination stopped reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// The destination's statistics follow its confirmation at once, or not at all.
pub(super) const STATS_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a paused source waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct MigrateOptions {
    pub to: String,
    pub mode: Mode,
    pub tracker: TrackerKind,
    pub downtime_ms: u64,
    /// Bandwidth cap in MiB/s (None: unlimited).
    pub bandwidth_mib_s: Option<u64>,
    pub max_rounds: u32,
    pub max_precopy_ms: u64,
    /// Write guest RAM as it is at the pause into this file (tests compare it with the
    /// destination's).
    pub dump_memory: Option<PathBuf>,
    /// How passed-through devices' DMA into guest RAM is tracked.
    pub device_dirty: DeviceDirty,
    /// How both connections are secured (TLS, or `--insecure` plain TCP).
    pub transport: Transport,
    /// Data connections for precopy pages (0: on the main connection). Postcopy uses none.
    pub channels: u8,
}

/// Data connections a migration opens unless told otherwise (`--channels`): none. On the
/// 2-core hosts this project measures on, where both ends share the cores, 2 channels moved
/// a frozen 1 GiB guest slower than main alone (1442/1199/1551 vs 1714/1494/1759 MiB/s): the
/// destination's threads serialize on the memfd's inode lock while writing guest RAM, and
/// spin on it. They pay off where each side has cores to spare and the link outruns one
/// thread (README, "Data channels").
pub const DEFAULT_CHANNELS: u8 = 0;

impl MigrateOptions {
    pub fn new(to: &str, mode: Mode, tracker: TrackerKind, transport: Transport) -> Self {
        MigrateOptions {
            to: to.to_string(),
            mode,
            tracker,
            downtime_ms: 300,
            bandwidth_mib_s: None,
            max_rounds: 30,
            max_precopy_ms: 60_000,
            dump_memory: None,
            device_dirty: DeviceDirty::default(),
            transport,
            channels: DEFAULT_CHANNELS,
        }
    }
}

/// A connection's read buffer. Small on purpose: frames' headers come through it, but a page
/// payload larger than it is read straight from the socket into the frame (one copy fewer
/// than through a buffer that the header's read had filled with the payload).
pub(super) const READ_BUFFER: usize = 64 << 10;

pub(super) type Writer = FrameWriter<BufWriter<Link>>;
pub(super) type Reader = FrameReader<BufReader<Link>>;

/// Connects to the destination and secures the connection (the handshake checks its identity).
pub(super) fn connect(addr: &str, tls: &Connector) -> Result<(Writer, Reader), MigrationError> {
    let err = |source| MigrationError::Connect {
        addr: addr.to_string(),
        source,
    };
    let sock = addr
        .to_socket_addrs()
        .map_err(err)?
        .next()
        .ok_or_else(|| err(std::io::Error::other("no address")))?;
    let stream = TcpStream::connect_timeout(&sock, Duration::from_secs(10)).map_err(err)?;
    stream.set_nodelay(true)?;
    let stream = tls.connect(stream, addr)?;
    stream.set_write_timeout(Some(SEND_TIMEOUT))?;
    let w = FrameWriter::new(BufWriter::with_capacity(1 << 20, stream.try_clone()?));
    let r = FrameReader::new(BufReader::with_capacity(READ_BUFFER, stream));
    Ok((w, r))
}

/// Migrates the running VM behind `shared`. On success the guest runs on the destination (the
/// caller then ends this VM's run with `hand_over`); on failure before the point of no return
/// the guest runs on here.
pub fn migrate(
    shared: &Arc<Shared>,
    opts: &MigrateOptions,
) -> Result<MigrationReport, MigrationError> {
    if shared.tracking_active {
        return Err(MigrationError::Busy(
            "a --track session owns dirty tracking on this VM".into(),
        ));
    }
    if opts.mode != Mode::Postcopy && opts.tracker == TrackerKind::SoftDirty {
        return Err(MigrationError::Busy(
            "soft-dirty cannot track a running guest for migration: a write that lands between \
             reading pagemap and clear_refs loses its dirty bit (use bitmap, bitmap-manual, \
             ring, uffd-wp or uffd-wp-async)"
                .into(),
        ));
    }
    {
        let mut p = shared.progress();
        if matches!(
            p.phase,
            Phase::Connecting | Phase::Precopy | Phase::StopAndCopy | Phase::Postcopy
        ) {
            return Err(MigrationError::Busy(
                "a migration is already running".into(),
            ));
        }
        if p.phase == Phase::Completed {
            return Err(MigrationError::Busy(
                "this VM was already migrated away".into(),
            ));
        }
        p.phase = Phase::Connecting;
        p.round = 0;
        p.bytes = 0;
        p.ram_bytes = shared.ranges.iter().map(|r| r.size).sum();
    }
    let start = Instant::now();
    let mut report = MigrationReport {
        role: "source".into(),
        mode: Some(opts.mode),
        tracker: (opts.mode != Mode::Postcopy).then(|| opts.tracker.to_string()),
        transport: Some(opts.transport.name().into()),
        ..Default::default()
    };
    let result = run(shared, opts, &mut report);
    report.total_ms = start.elapsed().as_secs_f64() * 1000.0;
    if report.total_ms > 0.0 {
        report.throughput_mib_s =
            report.bytes as f64 / (1 << 20) as f64 / (report.total_ms / 1000.0);
    }
    let mut p = shared.progress();
    match &result {
        Ok(()) => {
            report.ok = true;
            p.phase = Phase::Completed;
        }
        Err(e) => {
            report.error = Some(e.to_string());
            p.phase = Phase::Failed;
        }
    }
    p.report = Some(report.clone());
    drop(p);
    result.map(|()| report)
}

/// After a successful migration (and after its requester has the report): ends this VM's run,
/// since the guest lives on the destination now.
pub fn hand_over(shared: &Shared) {
    shared.end_run(crate::vstate::vcpu::VcpuStop::Migrated);
}

fn session_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ ((std::process::id() as u64) << 32)
}

fn run(
    shared: &Arc<Shared>,
    opts: &MigrateOptions,
    report: &mut MigrationReport,
) -> Result<(), MigrationError> {
    let addr = parse_tcp_url(&opts.to)?;
    shared.memory_complete().map_err(MigrationError::Busy)?;
    // Every device's support checked before anything connects or moves.
    let (mut devs, dma_sources) =
        SourceDevices::check(&shared.passthrough, opts.mode, opts.device_dirty)?;
    let dma_stats = Arc::new(DmaStats::default());
    shared.settle_memslots::<MigrationError>()?;
    // The credentials are read now, once for both connections.
    let tls = opts.transport.connector(&addr)?;
    let (mut w, mut r) = connect(&addr, &tls)?;
    let session = session_id();
    let hello = Hello {
        vm: shared.describe(),
        mode: opts.mode,
        session,
        source_host: shared.vm.host_kind().to_string(),
        channels: if opts.mode == Mode::Postcopy {
            0
        } else {
            opts.channels
        },
    };
    let json = serde_json::to_vec(&hello).map_err(|source| MigrationError::HelloJson {
        what: "encoding it",
        source,
    })?;
    w.send(&Message::Hello(json))?;
    w.flush()?;
    r.get_ref()
        .get_ref()
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let answer = r.recv().map_err(|e| match e {
        ProtocolError::TimedOut => MigrationError::Timeout(format!(
            "after {} s waiting for {addr} to accept or refuse the VM (is a vmm run \
                 --incoming listening there, and not busy with another migration?)",
            HANDSHAKE_TIMEOUT.as_secs()
        )),
        other => other.into(),
    })?;
    let accepted = match answer {
        Message::Accept => super::presend::AcceptOptions::default(),
        Message::AcceptWith(json) => {
            serde_json::from_slice(&json).map_err(|source| MigrationError::HelloJson {
                what: "the destination's Accept options",
                source,
            })?
        }
        Message::Refuse(reason) => return Err(MigrationError::Refused(reason)),
        // Its words (sanitized and cut when decoded) say more than "expected Accept".
        Message::Abort(reason) => return Err(MigrationError::Aborted(reason)),
        other => return Err(unexpected("Accept", &other)),
    };
    r.get_ref().get_ref().set_read_timeout(None)?;
    let urgent = if opts.mode == Mode::Precopy {
        None
    } else {
        let (mut uw, ur) = connect(&addr, &tls)?;
        uw.send(&Message::Channel {
            session,
            role: Role::Urgent,
        })?;
        uw.flush()?;
        Some((uw, ur))
    };
    let mut data = if hello.channels > 0 {
        match DataChannels::connect(&addr, &tls, session, hello.channels) {
            Ok(d) => Some(d),
            Err(e) => {
                let e = peer_reason(&mut r, e);
                let _ = w.send(&Message::Abort(e.to_string()));
                let _ = w.flush();
                return Err(e);
            }
        }
    } else {
        None
    };
    report.channels = data.as_ref().map(|d| d.len() as u32);

    let mut rate = RateLimiter::new(opts.bandwidth_mib_s.map(|m| m << 20));
    let mut sender = PageSender::new(&shared.memfd, &shared.ranges);
    // A guest its user paused (and without devices, which could write RAM by DMA) stays
    // frozen through the rounds: the pages go from where they are mapped.
    let held = HeldPause::take(shared);
    let mut tracker: Option<Box<dyn DirtyTracker>> = None;
    let mut dirty = DirtySet::new(&shared.ram_slots());
    let result = (|| -> Result<(), MigrationError> {
        if opts.mode != Mode::Postcopy {
            let ctx = shared.track_context();
            let mut t = tracking::create(opts.tracker, &ctx)?;
            if !devs.is_empty() {
                t = Box::new(WithDeviceDma::new(
                    t,
                    dma_sources,
                    ctx.slots.clone(),
                    dma_stats.clone(),
                ));
            }
            t.start()?;
            tracker = Some(t);
            devs.start_precopy()?;
            precopy_rounds(
                shared,
                opts,
                report,
                &mut w,
                &mut Pages {
                    sender: &mut sender,
                    rate: &mut rate,
                    data: data.as_mut(),
                    frozen: held.frozen(),
                },
                tracker.as_deref_mut(),
                &mut dirty,
                &mut devs,
            )?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        devs.recover();
        stop_tracker(tracker.as_deref_mut());
        let e = peer_reason(&mut r, e);
        let _ = w.send(&Message::Abort(e.to_string()));
        let _ = w.flush();
        return Err(e);
    }

    // Stop the guest: from here until the point of no return, failure resumes it. A guest its
    // user paused is taken over as it is, and on failure given back paused.
    // Given back to be taken over at once, as any user's pause is.
    drop(held);
    shared.progress().phase = Phase::StopAndCopy;
    let paused_at = Instant::now();
    let (vcpus, user_paused) = match shared.pause.pause_or_take_over(
        &shared.kicker,
        Owner::Migration,
        Owner::Api,
        PAUSE_TIMEOUT,
    ) {
        Ok(v) => v,
        Err(e) => {
            devs.recover();
            stop_tracker(tracker.as_deref_mut());
            let _ = w.send(&Message::Abort(format!("the source could not pause: {e}")));
            let _ = w.flush();
            return Err(e.into());
        }
    };
    let mut parts = DowntimeParts {
        pause_ms: paused_at.elapsed().as_secs_f64() * 1000.0,
        ..Default::default()
    };
    let (mut harvest_ms, mut capture_ms) = (0.0, 0.0);
    let before_commit = (|| -> Result<VmSnapshot, MigrationError> {
        // The devices stop before the last harvest, so the DMA log's tail is in it.
        devs.stop()?;
        let t = Instant::now();
        if let Some(t) = tracker.as_deref_mut() {
            t.harvest(&mut dirty)?;
        }
        stop_tracker(tracker.as_deref_mut());
        harvest_ms = t.elapsed().as_secs_f64() * 1000.0;
        if let Some(path) = &opts.dump_memory {
            crate::memory::ram_file::dump_ram(&shared.memfd, &shared.ranges, path).map_err(
                |source| MigrationError::Dump {
                    path: path.clone(),
                    source,
                },
            )?;
        }
        let t = Instant::now();
        let mut snapshot = VmSnapshot::capture(shared, vcpus)?;
        capture_ms = t.elapsed().as_secs_f64() * 1000.0;
        // The destination keeps it paused until its user resumes it there.
        snapshot.paused = user_paused;
        Ok(snapshot)
    })();
    let snapshot = match before_commit {
        Ok(s) => s,
        Err(e) => {
            devs.recover();
            return Err(abort_and_resume(shared, user_paused, &mut w, e));
        }
    };
    parts.device_stop_ms = devs.stop_copy_ms;
    parts.harvest_ms = harvest_ms;
    parts.capture_ms = capture_ms;

    match opts.mode {
        Mode::Precopy => {
            let committed = (|| -> Result<(), MigrationError> {
                let round = report.rounds + 1;
                let t = Instant::now();
                let mut pages = Pages {
                    sender: &mut sender,
                    rate: &mut rate,
                    data: data.as_mut(),
                    // SAFETY: every vCPU is parked (the pause above) and the devices are
                    // stopped (`devs.stop()` before the last harvest), until the state is sent.
                    frozen: Some(unsafe { FrozenRam::new(&shared.memory) }),
                };
                let sent = pages.send_round(shared, opts, &mut w, &dirty.runs(), round)?;
                w.send(&Message::RoundEnd {
                    round,
                    pages: sent.pages + sent.zero_pages,
                })?;
                let bytes = pages.bytes_sent(&w);
                note_round(report, shared, round, sent, bytes);
                parts.final_pages_ms = t.elapsed().as_secs_f64() * 1000.0;
                let t = Instant::now();
                devs.send_stop_copy(&mut w)?;
                parts.device_data_ms = t.elapsed().as_secs_f64() * 1000.0;
                let t = Instant::now();
                w.send(&Message::State(snapshot.encode()?))?;
                w.send(&Message::Complete)?;
                w.flush()?;
                parts.state_ms = t.elapsed().as_secs_f64() * 1000.0;
                Ok(())
            })();
            if let Err(e) = committed {
                devs.recover();
                let e = peer_reason(&mut r, e);
                return Err(abort_and_resume(shared, user_paused, &mut w, e));
            }
            let waiting = Instant::now();
            // Complete is sent: the destination may run the guest from now on. If it never
            // confirms, resuming here as well is what keeps the guest alive when the
            // destination died; README documents the window where both could run.
            let confirmed = r
                .get_ref()
                .get_ref()
                .set_read_timeout(Some(CONFIRM_TIMEOUT))
                .map_err(MigrationError::from)
                .and_then(|()| {
                    match r.recv().map_err(|e| match e {
                        ProtocolError::TimedOut => MigrationError::Timeout(format!(
                        "after {} s waiting for the destination to confirm it resumed the guest",
                        CONFIRM_TIMEOUT.as_secs()
                    )),
                        e => e.into(),
                    })? {
                        Message::Resumed => Ok(()),
                        Message::Abort(reason) => Err(MigrationError::Aborted(reason)),
                        other => Err(unexpected("Resumed", &other)),
                    }
                });
            if let Err(e) = confirmed {
                devs.recover();
                let _ = release_pause(shared, user_paused);
                return Err(e);
            }
            devs.finish();
            report.downtime_ms = paused_at.elapsed().as_secs_f64() * 1000.0;
            parts.confirm_ms = waiting.elapsed().as_secs_f64() * 1000.0;
            report.downtime_parts = Some(parts);
            note_devices(report, &devs, opts, &dma_stats);
            report.bytes = w.bytes_sent() + data.as_ref().map_or(0, |d| d.bytes_sent());
            let _ = r.get_ref().get_ref().set_read_timeout(Some(STATS_TIMEOUT));
            if let Ok(Message::Stats(json)) = r.recv() {
                merge_destination_stats(report, &json);
            }
            Ok(())
        }
        Mode::Postcopy | Mode::Hybrid => {
            // The data connections' part is over (the destination passed their last round's
            // barrier before it reads what follows on main): closing them ends its threads.
            let data_bytes = data.take().map_or(0, |d| d.bytes_sent());
            let pending: Vec<(u64, u64)> = if opts.mode == Mode::Postcopy {
                shared
                    .ranges
                    .iter()
                    .map(|r| (r.gpa, r.size / PAGE_SIZE))
                    .collect()
            } else {
                dirty
                    .runs()
                    .into_iter()
                    .map(|(gpa, bytes)| (gpa, bytes / PAGE_SIZE))
                    .collect()
            };
            // A destination that cannot see KVM's own accesses gets every page that could be
            // a page table now, while the guest is paused (see `presend`).
            let pending = if accepted.presend_page_tables {
                let t = Instant::now();
                let bits = crate::userfault::keep_present::guest_phys_bits(snapshot.vcpus.first());
                let (now, rest) = super::presend::split(
                    &shared.memfd,
                    &shared.ranges,
                    &pending,
                    &snapshot.vcpus,
                    bits,
                );
                let sent = (|| -> Result<(), MigrationError> {
                    for &gpa in &now {
                        sender.send_run(&mut w, &mut rate, gpa, 1)?;
                    }
                    Ok(())
                })();
                if let Err(e) = sent {
                    return Err(abort_and_resume(shared, user_paused, &mut w, e));
                }
                report.presend_pages = Some(now.len() as u64);
                report.presend_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
                tracing::info!(
                    "postcopy: sent {} possible page-table pages first ({:.1} ms)",
                    now.len(),
                    t.elapsed().as_secs_f64() * 1000.0
                );
                rest
            } else {
                pending
            };
            // Everything that can fail without the destination's help happens before the
            // point of no return.
            let prepared = match urgent {
                Some((uw, ur)) => postcopy_src::Postcopy::prepare(shared, &pending, r, uw, ur),
                None => Err(MigrationError::Busy("no urgent channel".into())),
            };
            let postcopy = match prepared {
                Ok(p) => p,
                Err(e) => return Err(abort_and_resume(shared, user_paused, &mut w, e)),
            };
            let committed = (|| -> Result<(), MigrationError> {
                let t = Instant::now();
                devs.send_stop_copy(&mut w)?;
                parts.device_data_ms = t.elapsed().as_secs_f64() * 1000.0;
                let t = Instant::now();
                w.send(&Message::State(snapshot.encode()?))?;
                w.send(&Message::PostcopyStart {
                    pending: pending.clone(),
                })?;
                w.flush()?;
                parts.state_ms = t.elapsed().as_secs_f64() * 1000.0;
                Ok(())
            })();
            if let Err(e) = committed {
                postcopy.cancel();
                devs.recover();
                return Err(abort_and_resume(shared, user_paused, &mut w, e));
            }
            // Past the point of no return: the device's state lives on the destination.
            devs.finish();
            report.downtime_parts = Some(parts);
            note_devices(report, &devs, opts, &dma_stats);
            shared.progress().phase = Phase::Postcopy;
            let handover_ms = paused_at.elapsed().as_secs_f64() * 1000.0;
            let served = postcopy.serve(shared, w, handover_ms, user_paused, report);
            report.bytes += data_bytes;
            served
        }
    }
}

/// What the devices moved and what their DMA logs cost, for the report (none without devices).
fn note_devices(
    report: &mut MigrationReport,
    devs: &SourceDevices,
    opts: &MigrateOptions,
    dma: &DmaStats,
) {
    use std::sync::atomic::Ordering::Relaxed;
    if devs.is_empty() {
        return;
    }
    let harvests = dma.harvests.load(Relaxed);
    report.devices = Some(DeviceMigrationStats {
        devices: devs.len(),
        precopy_bytes: devs.precopy_bytes,
        stop_copy_bytes: devs.stop_copy_bytes,
        dirty: opts.device_dirty.to_string(),
        dma_pages: dma.pages.load(Relaxed),
        dma_harvests: harvests,
        dma_harvest_ms_per_round: dma.ns.load(Relaxed) as f64 / 1e6 / harvests.max(1) as f64,
    });
}

fn stop_tracker(tracker: Option<&mut (dyn DirtyTracker + '_)>) {
    if let Some(t) = tracker {
        if let Err(e) = t.stop() {
            tracing::warn!("stopping the migration's dirty tracker: {e}");
        }
    }
}

/// A send that failed because the destination gave up: its `Abort` (sent before it closed the
/// connection, never read while the source only writes) says why, better than "connection
/// reset". Looks for one briefly; otherwise `e` stands.
fn peer_reason(r: &mut Reader, e: MigrationError) -> MigrationError {
    let from_link = matches!(
        &e,
        MigrationError::Io(_)
            | MigrationError::Protocol(ProtocolError::Io(_))
            | MigrationError::Pages(super::pages::PagesError::Protocol(ProtocolError::Io(_)))
    );
    if !from_link
        || r.get_ref()
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(1)))
            .is_err()
    {
        return e;
    }
    match r.recv() {
        Ok(Message::Abort(reason)) => MigrationError::Aborted(reason),
        _ => e,
    }
}

/// Before the point of no return: tell the destination, and let the guest run on here (or
/// stay paused, if its user had paused it).
fn abort_and_resume(
    shared: &Shared,
    user_paused: bool,
    w: &mut Writer,
    e: MigrationError,
) -> MigrationError {
    let _ = w.send(&Message::Abort(e.to_string()));
    let _ = w.flush();
    if let Err(re) = release_pause(shared, user_paused) {
        tracing::error!("resuming the guest after a failed migration: {re}");
    }
    if user_paused {
        tracing::warn!("migration failed, the guest stays here, paused as its user left it: {e}");
    } else {
        tracing::warn!("migration failed, the guest runs on here: {e}");
    }
    e
}

/// Lifts the migration's pause; a pause the migration took over from the user goes back to
/// them instead: the guest stays paused until the user's own `resume`.
pub(super) fn release_pause(shared: &Shared, user_paused: bool) -> Result<(), PauseError> {
    if user_paused {
        shared.pause.hand_back(Owner::Migration, Owner::Api)
    } else {
        shared.pause.resume(Owner::Migration)
    }
}

pub(super) fn unexpected(expected: &'static str, found: &Message) -> MigrationError {
    MigrationError::Protocol(super::protocol::ProtocolError::Unexpected {
        expected,
        found: found.name(),
    })
}

/// Folds the destination's own figures (downtime it saw, postcopy faults) into the report.
pub(super) fn merge_destination_stats(report: &mut MigrationReport, json: &[u8]) {
    match serde_json::from_slice::<crate::machine::progress::DestinationStats>(json) {
        Ok(s) => {
            // The destination's restore is part of the confirmation wait: split it out.
            if let Some(p) = report.downtime_parts.as_mut() {
                p.destination_restore_ms = Some(s.restore_ms);
            }
            report.destination = Some(s);
        }
        Err(e) => tracing::warn!("the destination's statistics do not parse: {e}"),
    }
}
