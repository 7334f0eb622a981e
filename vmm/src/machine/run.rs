//! Running a built VM: the tracking session, vCPU threads, the control API (through a hook:
//! the API sits above the machine), and the main thread's event loop until the guest ends,
//! then the report.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use super::build::Machine;
use super::report::{self, Outcome, RunReport, SetupPart};
use super::shared::{Shared, SharedParts};
use super::tracking_session::{self, Harvester, Session, SharedSession};
use super::{stdin, GuestConfig, MachineError, VmConfig};
use crate::vstate::vcpu::{self, VcpuEvent, VcpuStop};

/// Called once the vCPU threads run, with the VM's shared handles (an incoming migration
/// confirms to the source here).
pub type OnRunning = Box<dyn FnOnce(&Arc<Shared>) + Send>;

/// A service beside the running VM (the control API): started before any vCPU runs, so that
/// its failure leaves the guest never started, and stopped once the guest has ended.
pub trait Attendant: Send {
    fn stop(self: Box<Self>);
}

/// Serves the control API on `VmConfig::api_socket` for this VM (`api::server::serve`).
pub type ServeApi = fn(&Path, Arc<Shared>) -> std::io::Result<Box<dyn Attendant>>;

/// What the caller adds to a run.
#[derive(Default)]
pub struct RunHooks {
    /// Required when the config names an API socket.
    pub api: Option<ServeApi>,
    /// Given: the run resumes a VM (restore, incoming migration) rather than boots one.
    pub on_running: Option<OnRunning>,
}

impl Machine {
    /// Runs the VM to its end and reports how it went.
    pub fn run(self, hooks: RunHooks) -> Result<RunReport, MachineError> {
        let RunHooks { api, on_running } = hooks;
        let Machine {
            cfg,
            start,
            kernel: _,
            setup_marks,
            ram,
            vm,
            rings,
            devs,
            runners,
            watch,
            micro_passes,
            session_slot,
            boot_rx,
            exit_evt,
            stop,
            kicker,
            pause,
            events_tx,
            events_rx,
            demand,
            paging_in,
            on_ended,
        } = self;
        let mem = ram.memory();
        let micro = matches!(cfg.guest, GuestConfig::Micro { .. });
        let nr_vcpus = cfg.vcpus as u8;
        let shared = Arc::new(Shared::new(
            SharedParts {
                vm: vm.clone(),
                memory: mem.clone(),
                ranges: ram.ranges().to_vec(),
                memfd: ram.file().try_clone().map_err(MachineError::Thread)?,
                rings: rings.clone(),
                kicker: kicker.clone(),
                pause: pause.clone(),
                micro_passes: micro_passes.clone(),
                description: crate::machine::description::VmDescription::of(&cfg, ram.ranges()),
                micro_budget: crate::micro_finish::MicroBudget::of(&cfg.guest),
                tracking_active: cfg.tracking.is_some(),
                start,
                paging_in,
                demand,
                events: events_tx.clone(),
                exit_evt: exit_evt.try_clone().map_err(MachineError::Thread)?,
            },
            &devs,
        ));

        let session = match &cfg.tracking {
            Some(opts) => {
                let model = match &cfg.guest {
                    // Per-pass exactness needs the guest to stand still at each pass: with
                    // several vCPUs the others keep writing, so no model then.
                    GuestConfig::Micro { mailbox, .. } => {
                        <&[u8; micro_guest::MAILBOX_SIZE]>::try_from(mailbox.as_slice())
                            .ok()
                            .and_then(|m| micro_guest::Workload::from_mailbox(m).ok())
                            .filter(|w| w.vcpus() == 1)
                    }
                    GuestConfig::Linux(_) => None,
                };
                let ctx = shared.track_context();
                let mut session = Session::start(opts, &ctx, model, start)?;
                if opts.content_truth {
                    let device = devs.passthrough.iter().find_map(|a| a.device_memory());
                    // SAFETY: guest RAM lives until this function returns, the passed-through
                    // devices (and their BAR mappings) with `devs`, past the session's finish.
                    unsafe { session.with_content_truth(device) };
                }
                let s: SharedSession = Arc::new(Mutex::new(session));
                let _ = session_slot.set(s.clone());
                Some(s)
            }
            None => None,
        };

        tracing::info!(
            "{} {} on {}: {} vCPU(s), {} MiB",
            if on_running.is_some() {
                "resuming"
            } else {
                "starting"
            },
            match &cfg.guest {
                GuestConfig::Linux(b) => format!("Linux kernel {}", b.kernel.display()),
                GuestConfig::Micro { .. } => "micro guest".to_string(),
            },
            vm.host_kind(),
            nr_vcpus,
            cfg.mem_bytes >> 20
        );

        // A run with an API socket ends cleanly on SIGTERM/SIGINT, so the socket goes with it
        // (`terminate`); installed first, so no signal finds the socket made and no handler.
        let terminate = match &cfg.api_socket {
            Some(_) => Some(super::terminate::Guard::install().map_err(MachineError::Terminate)?),
            None => None,
        };
        // Before any vCPU runs: a failure here must leave the guest never started.
        let api = match (&cfg.api_socket, api) {
            (Some(path), Some(serve)) => {
                Some(serve(path, shared.clone()).map_err(MachineError::Api)?)
            }
            (Some(_), None) => return Err(MachineError::NoApiServer),
            (None, _) => None,
        };
        // Set up: KVM, guest memory, disks, devices and the API socket are open. What needs
        // root is done; the guest, which all else is there to serve, has not run yet.
        if let Err(e) = crate::seccomp::drop_privileges() {
            if let Some(api) = api {
                api.stop();
            }
            return Err(MachineError::Sandbox(e));
        }
        let mut threads = Vec::new();
        for runner in runners {
            let tx = events_tx.clone();
            let state = runner.run_state.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{}", runner.id))
                .spawn(move || runner.run(tx))
                .map_err(MachineError::Thread)?;
            kicker.add(&handle, state);
            threads.push(handle);
        }
        drop(events_tx);
        // Guests without a sync point of their own are harvested periodically.
        let harvester = match (&session, &cfg.tracking, micro) {
            (Some(s), Some(opts), false) => {
                let pause = opts.content_truth.then(|| {
                    let (pause, kicker) = (pause.clone(), kicker.clone());
                    Arc::new(move |f: &mut dyn FnMut()| {
                        let owner = crate::vstate::pause::Owner::Tracking;
                        if pause
                            .pause(&kicker, owner, false, Duration::from_secs(5))
                            .is_err()
                        {
                            return false;
                        }
                        f();
                        let _ = pause.resume(owner);
                        true
                    }) as tracking_session::RoundPause
                });
                Some(
                    Harvester::spawn(s.clone(), opts.interval, pause)
                        .map_err(MachineError::Thread)?,
                )
            }
            _ => None,
        };
        if let Some(f) = on_running {
            f(&shared);
        }

        let quit = Arc::new(AtomicBool::new(false));
        let _raw = cfg.console_input.then(stdin::RawTerminal::enter);
        // A micro guest ends when every vCPU has exited with status 0 (or one stops otherwise).
        let exits_needed = if micro { usize::from(nr_vcpus) } else { 1 };
        // Every thread of the run is started: the main thread's own work from here is the
        // event loop and the end of the run.
        if let Err(e) = crate::seccomp::apply(crate::seccomp::ThreadKind::Main) {
            // The vCPUs run already: stop them, as any failure of the run does.
            shared.end_run(crate::vstate::vcpu::VcpuStop::Fault(e.to_string()));
        }
        let ended = event_loop(
            &cfg,
            &devs,
            &exit_evt,
            &events_rx,
            &quit,
            terminate.as_ref(),
            exits_needed,
        );
        let rss = report::rss_beyond_shmem_kib();
        if let Some(api) = api {
            api.stop();
        }
        // Read before the handlers go: the run may have ended on its own meanwhile.
        let signal = terminate.as_ref().and_then(|t| t.received());
        drop(terminate);
        // Harvests end before the vCPU threads do: a kick must never target a finished thread.
        if let Some(h) = harvester {
            h.stop();
        }
        stop.store(true, Ordering::Release);
        let tracking = session.map(|s| {
            // The vCPU threads may still hold a clone inside the pass hook: finish under the lock.
            let mut guard = tracking_session::lock(&s);
            let taken = std::mem::replace(&mut *guard, Session::empty());
            taken.finish()
        });
        // Parked vCPUs (a pause, or the source of a finished migration) must see the stop.
        pause.release_all();
        stop_vcpus(&stop, threads);
        if let Some(f) = on_ended {
            f(mem);
        }
        let (first_run, why) = ended?;
        let migration = shared.progress().report.clone();

        let boot_timer = boot_rx.try_iter().next();
        let watch = watch
            .lock()
            .map(|w| (w.agent_ready, w.kernel_panic.clone()));
        let (agent_ready, kernel_panic) = watch.unwrap_or((None, None));
        // Against the check armed now (`--verify`, or the last `finish`), for the final budget.
        let micro_check = match &why {
            VcpuStop::DeviceExit(0) => shared.micro.budget.check(mem),
            _ => None,
        };
        let mut outcome = match signal {
            Some(signal) if why == VcpuStop::Stopped => Outcome::Terminated { signal },
            _ => Outcome::from_stop(why, kernel_panic),
        };
        if let Some(c) = micro_check.as_ref().filter(|c| c.mismatches > 0) {
            outcome = Outcome::Fault {
                message: format!(
                    "micro guest memory differs from the reference model on {} of {} pages; first at {:x?} (gpa, expected, found)",
                    c.mismatches, c.pages_checked, c.first_mismatch
                ),
            };
        }
        Ok(RunReport {
            host: vm.host_kind(),
            exit_code: outcome.exit_code(),
            outcome,
            vcpus: nr_vcpus,
            mem_mib: cfg.mem_bytes >> 20,
            setup_ms: first_run.map(|t| ms(t.duration_since(start))),
            setup_parts_ms: setup_marks
                .iter()
                .map(|(step, t)| SetupPart {
                    step,
                    at_ms: ms(t.duration_since(start)),
                })
                .collect(),
            boot_timer_ms: boot_timer.map(ms),
            agent_ready_ms: agent_ready.map(ms),
            micro_passes: micro.then(|| micro_passes.load(Ordering::Acquire)),
            micro_check,
            rss_beyond_guest_kib: rss,
            wall_ms: ms(start.elapsed()),
            tracking,
            migration,
            passthrough: devs.passthrough.iter().map(|a| a.dma_map.clone()).collect(),
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A subscriber that only wakes the loop when a vCPU stops.
struct ExitWatch(EventFd);

impl MutEventSubscriber for ExitWatch {
    fn process(&mut self, _events: event_manager::Events, _ops: &mut event_manager::EventOps) {
        let _ = self.0.read();
    }
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        if let Err(e) = ops.add(event_manager::Events::new(
            &self.0,
            vmm_sys_util::epoll::EventSet::IN,
        )) {
            tracing::error!("cannot watch vCPU exits: {e}");
        }
    }
}

type Ended = (Option<Instant>, VcpuStop);

/// Runs the main thread's loop until the first vCPU stops (or the user quits from the console,
/// or a SIGTERM/SIGINT arrives while `terminate` is installed).
/// A vCPU that stops with `DeviceExit(0)` only ends the loop once `exits_needed` different vCPUs
/// have (the micro guest's vCPUs each exit when done); any other stop ends it at once.
fn event_loop(
    cfg: &VmConfig,
    devs: &super::devices_setup::Devices,
    exit_evt: &EventFd,
    rx: &Receiver<VcpuEvent>,
    quit: &Arc<AtomicBool>,
    terminate: Option<&super::terminate::Guard>,
    exits_needed: usize,
) -> Result<Ended, MachineError> {
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(MachineError::EventLoop)?;
    let watch_evt = exit_evt.try_clone().map_err(MachineError::Thread)?;
    em.add_subscriber(Arc::new(Mutex::new(ExitWatch(watch_evt))));
    if cfg.console_input {
        let input = stdin::StdinInput::new(devs.console_input(), quit.clone());
        em.add_subscriber(Arc::new(Mutex::new(input)));
    }
    let mut first_run = None;
    let mut exited = std::collections::BTreeSet::new();
    loop {
        for ev in rx.try_iter() {
            match ev {
                VcpuEvent::FirstRun(t) => first_run = Some(t),
                VcpuEvent::Stopped {
                    id,
                    why: VcpuStop::DeviceExit(0),
                } if exited.len() + 1 < exits_needed => {
                    exited.insert(id);
                    tracing::debug!(
                        "vcpu{id} exited with status 0 ({} of {exits_needed})",
                        exited.len()
                    );
                }
                VcpuEvent::Stopped { id, why } => {
                    tracing::debug!("vcpu{id} stopped: {why:?}");
                    return Ok((first_run, why));
                }
            }
        }
        if quit.load(Ordering::Acquire) {
            return Ok((first_run, VcpuStop::Stopped));
        }
        if let Some(sig) = terminate.and_then(|t| t.received()) {
            tracing::info!("{}: ending the run", super::terminate::name(sig));
            return Ok((first_run, VcpuStop::Stopped));
        }
        em.run_with_timeout(100).map_err(MachineError::EventLoop)?;
    }
}

/// Stops every vCPU thread: raise the flag, then kick each thread out of KVM_RUN until it ends.
/// The kick repeats because a signal that lands between the flag check and KVM_RUN is lost.
fn stop_vcpus(stop: &AtomicBool, threads: Vec<JoinHandle<()>>) {
    stop.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(5);
    for t in threads {
        while !t.is_finished() {
            if Instant::now() > deadline {
                tracing::error!("a vCPU thread did not stop within 5 s; exiting without it");
                return;
            }
            let _ = t.kill(vcpu::kick_signal());
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = t.join();
    }
}
