//! The receiving side (`vmm run --incoming tcp://ADDR:PORT`): waits for one source, checks the
//! Hello against what this host and its command line allow (refusing before any memory moves),
//! builds the VM without booting it, writes received pages into guest RAM after bounds-checking
//! each, restores the state and runs the guest — at `Complete` (precopy) or at once with memory
//! still missing (`PostcopyStart`).

use std::io::{BufReader, BufWriter};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::channels::Receivers;
use super::devices::{DestDevices, PassthroughHandle};
use super::hello::Hello;
use super::link::Link;
use super::pages;
use super::protocol::{
    check_range, FrameReader, FrameWriter, Message, ProtocolError, Role, ABORT_NOT_STARTED,
    PAGE_SIZE,
};
use super::source::{unexpected, Reader, Writer, READ_BUFFER};
use super::tls::{Acceptor, Transport};
use super::{postcopy_dst, MigrationError, Mode};
use crate::api::server::serve_api;
use crate::machine::assemble::{self, AssembleError, Here, Resume};
use crate::machine::description::Constraints;
use crate::machine::final_dump::Fill;
use crate::machine::progress::{DestinationStats, MigrationReport};
use crate::machine::saved_state::VmSnapshot;
use crate::machine::{ConsoleOutput, Machine, RunReport};

/// How long the destination waits for the source's second (urgent) connection.
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(10);
/// The source sends continuously while it migrates; this long a silence means it is gone.
const SILENCE_TIMEOUT: Duration = Duration::from_secs(60);
/// `--dump-final` after a postcopy run waits this long for the pages still on the source.
const FILL_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct IncomingOptions {
    /// HOST:PORT to listen on.
    pub listen: String,
    pub console: ConsoleOutput,
    pub console_input: bool,
    pub api_socket: Option<PathBuf>,
    pub constraints: Constraints,
    /// Precopy only: write guest RAM as received (the source's RAM at its pause), before the
    /// guest runs here, into this file. A postcopy destination never holds it whole before
    /// running: such a migration is refused (use `dump_final`).
    pub dump_memory: Option<PathBuf>,
    /// Write guest RAM when the run ends into this file, read as the guest sees it (postcopy:
    /// once every page has arrived).
    pub dump_final: Option<PathBuf>,
    /// The demand-paging backend for postcopy.
    pub demand: postcopy_dst::Demand,
    /// How both connections are secured (TLS, or `--insecure` plain TCP).
    pub transport: Transport,
}

/// Secures an accepted connection (the handshake checks the source's identity before any
/// frame is read) and splits it.
fn streams(
    stream: TcpStream,
    tls: &Acceptor,
    peer: &str,
) -> Result<(Writer, Reader), MigrationError> {
    stream.set_nodelay(true)?;
    let stream: Link = tls.accept(stream, peer)?;
    stream.set_write_timeout(Some(SILENCE_TIMEOUT))?;
    Ok((
        FrameWriter::new(BufWriter::with_capacity(1 << 20, stream.try_clone()?)),
        FrameReader::new(BufReader::with_capacity(READ_BUFFER, stream)),
    ))
}

/// Receives one migration and runs the guest to its end.
pub fn run_incoming(opts: &IncomingOptions, start: Instant) -> Result<RunReport, MigrationError> {
    // The credentials are read before listening: a bad file fails at once.
    let tls = opts.transport.acceptor()?;
    let listener = TcpListener::bind(&opts.listen).map_err(|source| MigrationError::Listen {
        addr: opts.listen.clone(),
        source,
    })?;
    tracing::info!("waiting for an incoming migration on {}", opts.listen);
    let (stream, peer) = listener.accept()?;
    tracing::info!("incoming migration from {peer} ({})", opts.transport.name());
    let (mut w, mut r) = streams(stream, &tls, &peer.to_string())?;
    r.get_ref()
        .get_ref()
        .set_read_timeout(Some(SILENCE_TIMEOUT))?;
    let begun = Instant::now();

    let hello = match r.recv().map_err(|e| match e {
        ProtocolError::TimedOut => MigrationError::Timeout(format!(
            "after {} s waiting for {peer} to send its Hello",
            SILENCE_TIMEOUT.as_secs()
        )),
        e => e.into(),
    })? {
        Message::Hello(json) => {
            serde_json::from_slice::<Hello>(&json).map_err(|source| MigrationError::HelloJson {
                what: "malformed JSON",
                source,
            })
        }
        other => Err(unexpected("Hello", &other)),
    };
    let hello = match hello {
        Ok(h) => h,
        Err(e) => return Err(refuse(&mut w, e)),
    };
    let here = Here {
        constraints: opts.constraints.clone(),
        console: opts.console.clone(),
        console_input: opts.console_input,
        api_socket: opts.api_socket.clone(),
    };
    let cfg = match assemble::config(&hello.vm, &here) {
        Ok(c) => c,
        Err(e) => return Err(refuse(&mut w, e.into())),
    };
    if hello.mode != Mode::Precopy {
        if let Err(e) = demand_fits(&opts.demand) {
            return Err(refuse(&mut w, e));
        }
        // Postcopy needs userfaultfd here: find out before the source commits to it.
        if let Err(source) = crate::sys::uffd::available_features() {
            return Err(refuse(
                &mut w,
                MigrationError::RefusedHere {
                    reason: "postcopy needs userfaultfd on the destination, which it cannot open",
                    source,
                },
            ));
        }
    }
    if hello.mode != Mode::Precopy && opts.dump_memory.is_some() {
        let why = "this destination was started with --dump-memory (guest RAM before the guest \
                   runs), which a postcopy destination never holds whole: use --dump-final";
        return Err(refuse(&mut w, MigrationError::Refused(why.into())));
    }
    let machine = match Machine::build(&cfg, start) {
        Ok(m) => m,
        Err(e) => return Err(refuse(&mut w, MigrationError::Machine(e))),
    };
    // This side's devices: the functions the source has, and ready to take their state.
    let handles: Vec<PassthroughHandle> = machine
        .devs
        .passthrough
        .iter()
        .map(|a| a.handle())
        .collect();
    if let Err(e) = same_functions(&handles, &hello.vm.passthrough) {
        return Err(refuse(&mut w, e));
    }
    let mut devs = match DestDevices::resuming(&handles) {
        Ok(d) => d,
        Err(e) => return Err(refuse(&mut w, e)),
    };
    // memslot-exits cannot see KVM's own accesses: the page tables must all be here before the
    // guest runs. A guest with one address space (the micro guest) has them all under its
    // CR3, which this side walks itself (`Receiver::keep_present`); Linux has one per process,
    // and only the source can find those (`presend`).
    let many_address_spaces = matches!(
        hello.vm.guest,
        crate::machine::description::GuestDesc::Linux { .. }
    );
    if hello.mode != Mode::Precopy
        && opts.demand.backend.misses_kvm_accesses()
        && many_address_spaces
    {
        let json = serde_json::to_vec(&super::presend::AcceptOptions {
            presend_page_tables: true,
        })
        .map_err(|source| MigrationError::HelloJson {
            what: "encoding the Accept options",
            source,
        })?;
        w.send(&Message::AcceptWith(json))?;
    } else {
        w.send(&Message::Accept)?;
    }
    w.flush()?;
    tracing::info!(
        "accepted a {:?} migration of a {} MiB, {} vCPU VM from a {} host",
        hello.mode,
        hello.vm.mem_bytes >> 20,
        hello.vm.vcpus,
        crate::peer_text::sanitize(&hello.source_host)
    );
    let urgent = if hello.mode == Mode::Precopy {
        None
    } else {
        let deadline = Instant::now() + CHANNEL_TIMEOUT;
        match accept_channel(&listener, hello.session, &tls, deadline)? {
            (w, r, Role::Urgent) => Some((w, r)),
            (_, _, role) => {
                return Err(MigrationError::Hello(format!(
                    "expected the urgent connection, got {role:?}"
                )))
            }
        }
    };

    let ram = machine.ram.ranges().to_vec();
    let table: Vec<(u64, u64)> = ram.iter().map(|r| (r.gpa, r.size)).collect();
    let memfd = machine.ram.file();
    // Precopy pages on data connections, stored by their own threads (`channels`).
    let mut receivers = if hello.channels > 0 {
        match Receivers::accept(&listener, hello.session, hello.channels, &tls, memfd, &ram) {
            Ok(rx) => Some(rx),
            Err(e) => return Err(abort(&mut w, e)),
        }
    } else {
        None
    };
    let mut report = MigrationReport {
        role: "destination".into(),
        mode: Some(hello.mode),
        transport: Some(opts.transport.name().into()),
        ..Default::default()
    };
    let mut snapshot = None;
    let mut state_at = None;
    let pending = loop {
        let next = r.recv().map_err(|e| match e {
            ProtocolError::TimedOut => MigrationError::Timeout(format!(
                "after {} s without a frame from the source {peer}: it went silent mid-migration",
                SILENCE_TIMEOUT.as_secs()
            )),
            e => e.into(),
        })?;
        match next {
            Message::Pages { gpa, data } => {
                check_range(&table, gpa, data.len() as u64)?;
                pages::write_pages(memfd, &ram, gpa, &data)?;
                report.pages_sent += data.len() as u64 / PAGE_SIZE;
                r.recycle(data);
            }
            Message::Zero { gpa, pages: n } => {
                check_range(&table, gpa, n.saturating_mul(PAGE_SIZE))?;
                pages::zero_pages(memfd, &ram, gpa, n)?;
                report.zero_pages += n;
            }
            Message::RoundEnd { round, pages } => {
                // A barrier: every data connection's share of the round is stored first.
                if let Some(rx) = receivers.as_mut() {
                    if let Err(e) = rx.round_end(round, pages, SILENCE_TIMEOUT) {
                        return Err(abort(&mut w, e));
                    }
                }
                report.rounds = round;
                report.pages_per_round.push(pages);
            }
            Message::Alive => {}
            Message::DeviceData { device, data } => {
                if let Err(e) = devs.write(device, &data) {
                    return Err(abort(&mut w, e));
                }
            }
            Message::State(json) => {
                state_at = Some(Instant::now());
                let decoded = VmSnapshot::decode(&json)?;
                // Validated here, before the keep-present walks of a postcopy switch read it.
                decoded.check_here(hello.vm.vcpus as usize)?;
                snapshot = Some(decoded);
            }
            Message::Complete if hello.mode == Mode::Precopy => break None,
            Message::PostcopyStart { pending } if hello.mode != Mode::Precopy => {
                for &(gpa, n) in &pending {
                    check_range(&table, gpa, n.saturating_mul(PAGE_SIZE))?;
                }
                break Some(pending);
            }
            Message::Abort(reason) => return Err(MigrationError::Aborted(reason)),
            other => {
                return Err(unexpected(
                    "Pages, Zero, RoundEnd, State or the end",
                    &other,
                ))
            }
        }
    };
    let snapshot = snapshot.ok_or_else(|| {
        MigrationError::Protocol(super::protocol::ProtocolError::Unexpected {
            expected: "State",
            found: if pending.is_some() {
                "PostcopyStart"
            } else {
                "Complete"
            },
        })
    })?;
    let state_at = state_at.unwrap_or_else(Instant::now);
    report.bytes = r.bytes_received();
    if let Some(rx) = receivers.take() {
        let (pages, zero, bytes) = rx.stored();
        report.pages_sent += pages;
        report.zero_pages += zero;
        report.bytes += bytes;
        report.channels = Some(u32::from(hello.channels));
        rx.finish();
    }
    // Every device checks the stream it got: a bad one stops the migration here, before the
    // guest runs anywhere but on the source.
    if let Err(e) = devs.loaded() {
        return Err(abort(&mut w, e));
    }
    let times = devs.times.clone();
    let has_devices = !devs.is_empty();

    match pending {
        None => {
            if let Some(path) = &opts.dump_memory {
                crate::memory::ram_file::dump_ram(memfd, &ram, path).map_err(|source| {
                    MigrationError::Dump {
                        path: path.clone(),
                        source,
                    }
                })?;
            }
            let report = Arc::new(Mutex::new(report));
            // Until the run starts, the writer is the restore's, to tell the source it failed.
            let w = Arc::new(Mutex::new(w));
            let on_running: crate::machine::run::OnRunning = {
                let report = report.clone();
                let w = w.clone();
                Box::new(move |shared| {
                    let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                    let mut rep = report.lock().unwrap_or_else(|p| p.into_inner());
                    rep.downtime_ms = state_at.elapsed().as_secs_f64() * 1000.0;
                    rep.total_ms = begun.elapsed().as_secs_f64() * 1000.0;
                    let confirmed = w
                        .send(&Message::Resumed)
                        .and_then(|()| {
                            let t = *times.lock().unwrap_or_else(|p| p.into_inner());
                            let stats = DestinationStats {
                                restore_ms: rep.downtime_ms,
                                postcopy: None,
                                device_load_ms: has_devices.then_some(t.load_ms),
                                device_run_ms: has_devices.then_some(t.run_ms),
                            };
                            let json = serde_json::to_vec(&stats).unwrap_or_default();
                            w.send(&Message::Stats(json))
                        })
                        .and_then(|()| w.flush());
                    rep.ok = confirmed.is_ok();
                    shared.progress().report = Some(rep.clone());
                    if let Err(e) = confirmed {
                        // The source resumes its copy when it does not hear from us: this one
                        // must not run on beside it.
                        let msg = format!(
                            "could not confirm the migration to the source ({e}); it resumes \
                             its own copy, so this one stops"
                        );
                        rep.error = Some(msg.clone());
                        shared.progress().report = Some(rep.clone());
                        shared.end_run(crate::vstate::vcpu::VcpuStop::Fault(msg));
                    }
                })
            };
            let mut resume: Resume<MigrationError> =
                Resume::new(&snapshot, Some(serve_api), on_running);
            // A device that will not run: the source hears it at once and resumes its copy.
            let abort_w = w.clone();
            resume.restored = Some(Box::new(move || {
                devs.run().map_err(|e| {
                    let mut w = abort_w.lock().unwrap_or_else(|p| p.into_inner());
                    abort(&mut w, e)
                })
            }));
            resume.final_dump = opts.dump_final.clone().map(|p| (p, None));
            resume.not_started = Some(Box::new(|e| {
                if let AssembleError::Restore(e) = e {
                    let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = w.send(&Message::Abort(format!(
                        "the destination cannot restore: {e}"
                    )));
                    let _ = w.flush();
                }
            }));
            assemble::resume(machine, resume)
        }
        Some(pending) => {
            let Some((uw, ur)) = urgent else {
                return Err(MigrationError::Busy("no urgent channel".into()));
            };
            let pager = match postcopy_dst::Receiver::start(
                &machine,
                &opts.demand,
                &pending,
                postcopy_dst::Links { w, r, uw, ur },
                report,
                begun,
            ) {
                Ok(p) => p,
                Err(failed) => {
                    let (e, w) = *failed;
                    if let Some(mut w) = w {
                        let _ = w.send(&Message::Abort(format!("{ABORT_NOT_STARTED}{e}")));
                        let _ = w.flush();
                    }
                    return Err(e);
                }
            };
            match pager.keep_present(&snapshot.vcpus) {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    "{}: {n} page-table, descriptor and PV pages mapped before resuming",
                    opts.demand.backend
                ),
                Err(e) => {
                    pager.fail(&format!(
                        "{ABORT_NOT_STARTED}cannot map the pages KVM touches itself: {e}"
                    ));
                    return Err(e);
                }
            }
            // Passed-through devices stay stopped until every page is here: a device running
            // while pages are missing would DMA from holes (zeros) or have its writes
            // overwritten by pages arriving later. The vCPUs run meanwhile; what they write to
            // the device's registers waits in the device until it runs (device-specific).
            pager.on_filled(Box::new(move || devs.run().map_err(|e| e.to_string())));
            let on_running: crate::machine::run::OnRunning = {
                let pager = pager.clone();
                Box::new(move |shared| {
                    pager.running(shared.clone(), state_at.elapsed().as_secs_f64() * 1000.0);
                })
            };
            let mut resume: Resume<MigrationError> =
                Resume::new(&snapshot, Some(serve_api), on_running);
            resume.final_dump = opts.dump_final.clone().map(|p| {
                let pager = pager.clone();
                let fill: Fill = Box::new(move || pager.wait_filled(FILL_TIMEOUT));
                (p, Some(fill))
            });
            // The run fails to start only before any vCPU thread runs (API socket, threads).
            resume.not_started = Some(Box::new(|e| match e {
                AssembleError::Restore(e) => {
                    pager.fail(&format!("{ABORT_NOT_STARTED}cannot restore the state: {e}"))
                }
                AssembleError::Run(e) => pager.fail(&format!("{ABORT_NOT_STARTED}{e}")),
                _ => {}
            }));
            assemble::resume(machine, resume)
        }
    }
}

/// Whether this destination's demand-paging backend can work here at all (memslot-exits
/// gets the pages KVM touches itself from the source, see `presend`).
fn demand_fits(demand: &postcopy_dst::Demand) -> Result<(), MigrationError> {
    // `why` is the backend's message; the refusal sends it to the source as text.
    demand.backend.check_host().map_err(|why| {
        MigrationError::Refused(format!("postcopy with --demand {}: {why}", demand.backend))
    })
}

/// This side's functions against the Hello's, one for one (the count was checked with the
/// description).
fn same_functions(
    here: &[PassthroughHandle],
    theirs: &[crate::machine::description::PassthroughDesc],
) -> Result<(), MigrationError> {
    for (i, (h, t)) in here.iter().zip(theirs).enumerate() {
        let mine = crate::machine::pci::mig_v2::function_ids(h);
        if &mine != t {
            return Err(MigrationError::Refused(format!(
                "passed-through device {i}: the source's is {t}, this destination's ({}) is {mine}",
                h.spec
            )));
        }
    }
    Ok(())
}

/// After Accept: tells the source this side gives up, and returns the error for its exit.
fn abort(w: &mut Writer, e: MigrationError) -> MigrationError {
    let _ = w.send(&Message::Abort(format!("{ABORT_NOT_STARTED}{e}")));
    let _ = w.flush();
    e
}

/// Refuses the migration with the reason and returns the error for this side's exit.
fn refuse(w: &mut Writer, e: MigrationError) -> MigrationError {
    let reason = match &e {
        MigrationError::Refused(r) => r.clone(),
        MigrationError::RefusedHere { reason, source } => format!("{reason}: {source}"),
        other => other.to_string(),
    };
    let _ = w.send(&Message::Refuse(reason));
    let _ = w.flush();
    e
}

/// Accepts the source's next additional connection for `session` by `deadline`, secures it and
/// reads its `Channel` frame: the role it says it carries (the caller checks it).
pub(super) fn accept_channel(
    listener: &TcpListener,
    session: u64,
    tls: &Acceptor,
    deadline: Instant,
) -> Result<(Writer, Reader, Role), MigrationError> {
    listener.set_nonblocking(true)?;
    let (stream, peer) = loop {
        match listener.accept() {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(MigrationError::Timeout(
                        "waiting for the source's next connection (urgent or data)".into(),
                    ));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    };
    stream.set_nonblocking(false)?;
    let (w, mut r) = streams(stream, tls, &peer.to_string())?;
    r.get_ref()
        .get_ref()
        .set_read_timeout(Some(CHANNEL_TIMEOUT))?;
    let first = r.recv();
    r.get_ref().get_ref().set_read_timeout(None)?;
    match first? {
        Message::Channel { session: s, role } if s == session => Ok((w, r, role)),
        Message::Channel { session: s, .. } => Err(MigrationError::Hello(format!(
            "another connection for session {s:x}, expected {session:x}"
        ))),
        other => Err(unexpected("Channel", &other)),
    }
}
