//! A whole VM: guest RAM, KVM state, devices on their buses, vCPU threads, and the main thread's
//! event loop (console input, vCPU stops). `run` builds it from a `VmConfig`, runs it to its end
//! and says how it ended.

pub mod console;
pub mod devices_setup;
pub mod report;
pub mod stdin;
pub mod tracking_session;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::boot::linux::{self, LinuxBoot, LinuxBootError};
use crate::boot::micro::{self, MicroBootError};
use crate::boot::mptable::{self, MpTableError};
use crate::boot::{paging, EntryPoint};
use crate::memory::{GuestRam, MemoryError};
use crate::tracking::{self, DirtyRings, TrackContext, TrackingError};
use crate::vstate::cpuid::{self, CpuidError};
use crate::vstate::kick::{Kicker, RunState};
use crate::vstate::regs::{self, RegsError};
use crate::vstate::vcpu::{self, VcpuEvent, VcpuRunner, VcpuStop};
use crate::vstate::vm::{Vm, VmError};
use tracking_session::{Harvester, Session, SharedSession};

pub use console::ConsoleOutput;
pub use report::{Outcome, RunReport};
pub use tracking_session::{Round, TrackingOptions, TrackingReport};

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("--vcpus must be between 1 and {max}, got {got}")]
    VcpuCount { got: u32, max: u8 },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Linux(#[from] LinuxBootError),
    #[error(transparent)]
    Micro(#[from] MicroBootError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    Regs(#[from] RegsError),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error("writing page tables into guest memory failed: {0}")]
    PageTables(vm_memory::GuestMemoryError),
    #[error(transparent)]
    Devices(#[from] devices_setup::DeviceSetupError),
    #[error("cannot open the console output: {0}")]
    Console(std::io::Error),
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("cannot start a vCPU thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error(transparent)]
    Tracking(#[from] TrackingError),
    #[error("mapping the dirty ring of vCPU {id}: {source}")]
    RingMap {
        id: u8,
        source: crate::sys::SysError,
    },
}

/// Largest vCPU count: the MP table must fit in the EBDA KiB.
pub const MAX_VCPUS: u8 = 32;

/// What runs in the guest.
#[derive(Debug, Clone)]
pub enum GuestConfig {
    Linux(LinuxBoot),
    /// A raw payload entered in long mode at CPL0 (see `boot::micro`), with its mailbox page and
    /// the workload region it writes, if any (checked against guest RAM).
    Micro {
        payload: Vec<u8>,
        mailbox: Vec<u8>,
        region: Option<(u64, u64)>,
        /// Checked against guest RAM when the guest exits with status 0.
        expected: Option<crate::micro_check::Expected>,
    },
}

/// A virtio-blk disk.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vcpus: u32,
    pub mem_bytes: u64,
    pub guest: GuestConfig,
    pub disks: Vec<DiskConfig>,
    pub console: ConsoleOutput,
    /// Feed vmm's stdin to the guest console.
    pub console_input: bool,
    /// Dirty tracking during the run, if any.
    pub tracking: Option<TrackingOptions>,
}

/// Builds the VM described by `cfg`, runs it to its end and reports how it went.
/// `start` is the process start, the zero of every time in the report.
pub fn run(cfg: &VmConfig, start: Instant) -> Result<RunReport, MachineError> {
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS as u32 {
        return Err(MachineError::VcpuCount {
            got: cfg.vcpus,
            max: MAX_VCPUS,
        });
    }
    let nr_vcpus = cfg.vcpus as u8;
    vcpu::install_kick_handler().map_err(MachineError::Signal)?;

    let ram = GuestRam::new(cfg.mem_bytes)?;
    let vm = Arc::new(Vm::new()?);
    let want_ring = cfg.tracking.as_ref().is_some_and(|t| t.needs_dirty_ring());
    let ring_from_boot = cfg
        .tracking
        .as_ref()
        .and_then(|t| t.backend)
        .is_some_and(|k| k.needs_dirty_ring());
    if ring_from_boot
        && matches!(cfg.guest, GuestConfig::Linux(_))
        && vm.host_kind() == crate::host::HostKind::Pvm
    {
        tracing::warn!(
            "dirty ring from boot with a Linux guest on PVM: the emulated kernel pushes an entry \
             per emulated write and can overflow the ring (host WARN, vCPU stopped); use \
             --track-schedule none,ring to start it at the first agent workload"
        );
    }
    // The ring must be on before any vCPU exists.
    let ring_entries = if want_ring {
        Some(tracking::enable_dirty_ring(vm.fd())?)
    } else {
        None
    };
    vm.register_ram(&ram)?;
    let mem = ram.memory();
    let slots = tracking::slots_of(&ram);
    let rings =
        ring_entries.map(|entries| Arc::new(DirtyRings::new(vm.clone(), entries, slots.clone())));

    regs::write_descriptor_tables(mem)?;
    let micro = matches!(cfg.guest, GuestConfig::Micro { .. });
    paging::write_identity_map(mem, micro).map_err(MachineError::PageTables)?;
    mptable::write(mem, nr_vcpus)?;

    let entry: EntryPoint = match &cfg.guest {
        GuestConfig::Linux(boot) => {
            let mut boot = boot.clone();
            for (i, _) in cfg.disks.iter().enumerate() {
                boot.cmdline.push(' ');
                boot.cmdline
                    .push_str(&devices_setup::virtio_cmdline(i as u32));
            }
            linux::load(&ram, &boot)?
        }
        GuestConfig::Micro {
            payload,
            mailbox,
            region,
            ..
        } => {
            if let Some((gpa, bytes)) = region {
                micro::check_region(&ram, *gpa, *bytes)?;
            }
            micro::load(&ram, payload, mailbox)?
        }
    };

    let watch = Arc::new(Mutex::new(console::ConsoleWatch::default()));
    let micro_passes = Arc::new(AtomicU64::new(0));
    // The session exists only once the vCPUs (and their rings) do; the pass hook, created with
    // the devices, finds it here.
    let session_slot: Arc<OnceLock<SharedSession>> = Arc::new(OnceLock::new());
    let pass_hook: Option<crate::micro_port::PassHook> = cfg.tracking.as_ref().map(|_| {
        let slot = session_slot.clone();
        Box::new(move |pass| {
            if let Some(s) = slot.get() {
                tracking_session::lock(s).round(Some(pass));
            }
        }) as crate::micro_port::PassHook
    });
    let line_hook: Option<console::LineHook> = cfg
        .tracking
        .as_ref()
        .filter(|t| !t.schedule.is_empty())
        .map(|_| {
            let slot = session_slot.clone();
            Box::new(move |line: &str| {
                if let Some(s) = slot.get() {
                    tracking_session::lock(s).on_agent_line(line);
                }
            }) as console::LineHook
        });
    let (boot_tx, boot_rx) = channel();
    let out = cfg.console.open().map_err(MachineError::Console)?;
    let devs = devices_setup::create(
        &vm,
        mem,
        devices_setup::DeviceOptions {
            console: out,
            observer: console::observer(watch.clone(), start, line_hook),
            disks: &cfg.disks,
            micro: micro.then(|| (micro_passes.clone(), pass_hook)),
            start,
            boot_timer: boot_tx,
        },
    )?;

    // vCPUs: all created before any runs (KVM wants the BSP's LAPIC to know its peers).
    let stop = Arc::new(AtomicBool::new(false));
    let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::Thread)?;
    let mut runners = Vec::new();
    for id in 0..nr_vcpus {
        let fd = vm.create_vcpu(id)?;
        if let Some(rings) = &rings {
            rings
                .add_vcpu(&fd)
                .map_err(|source| MachineError::RingMap { id, source })?;
        }
        let cpuid = cpuid::for_vcpu(vm.kvm(), id, nr_vcpus)?;
        fd.set_cpuid2(&cpuid).map_err(|source| RegsError::Ioctl {
            what: "KVM_SET_CPUID2",
            source,
        })?;
        regs::setup_msrs(&fd)?;
        regs::setup_fpu(&fd)?;
        regs::setup_lint(&fd)?;
        if id == 0 {
            regs::setup_boot_sregs(&fd)?;
            regs::setup_boot_regs(&fd, &entry)?;
        }
        runners.push(VcpuRunner {
            id,
            fd,
            pio: devs.pio.clone(),
            mmio: devs.mmio.clone(),
            ram: ram.ranges().to_vec(),
            stop: stop.clone(),
            exit_evt: exit_evt.try_clone().map_err(MachineError::Thread)?,
            run_state: Arc::new(RunState::default()),
            rings: rings.clone(),
            ring_full_streak: 0,
        });
    }

    let kicker = Arc::new(Kicker::default());
    let session = match &cfg.tracking {
        Some(opts) => {
            let k = kicker.clone();
            let ctx = TrackContext {
                vm: vm.clone(),
                slots,
                memory: mem.clone(),
                rings: rings.clone(),
                kick: Some(Arc::new(move || {
                    if !k.kick_all_and_wait(Duration::from_millis(500)) {
                        tracing::warn!("a vCPU did not leave guest mode within 500 ms of a kick");
                    }
                })),
            };
            let model = match &cfg.guest {
                GuestConfig::Micro { mailbox, .. } => {
                    <&[u8; micro_guest::MAILBOX_SIZE]>::try_from(mailbox.as_slice())
                        .ok()
                        .and_then(|m| micro_guest::Workload::from_mailbox(m).ok())
                }
                GuestConfig::Linux(_) => None,
            };
            let s: SharedSession = Arc::new(Mutex::new(Session::start(opts, &ctx, model, start)?));
            let _ = session_slot.set(s.clone());
            Some(s)
        }
        None => None,
    };

    tracing::info!(
        "starting {} on {}: {} vCPU(s), {} MiB",
        match &cfg.guest {
            GuestConfig::Linux(b) => format!("Linux kernel {}", b.kernel.display()),
            GuestConfig::Micro { .. } => "micro guest".to_string(),
        },
        vm.host_kind(),
        nr_vcpus,
        cfg.mem_bytes >> 20
    );

    let (tx, rx) = channel();
    let mut threads = Vec::new();
    for runner in runners {
        let tx = tx.clone();
        let state = runner.run_state.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", runner.id))
            .spawn(move || runner.run(tx))
            .map_err(MachineError::Thread)?;
        kicker.add(&handle, state);
        threads.push(handle);
    }
    drop(tx);
    // Guests without a sync point of their own are harvested periodically.
    let harvester = match (&session, &cfg.tracking, micro) {
        (Some(s), Some(opts), false) => {
            Some(Harvester::spawn(s.clone(), opts.interval).map_err(MachineError::Thread)?)
        }
        _ => None,
    };

    let quit = Arc::new(AtomicBool::new(false));
    let _raw = cfg.console_input.then(stdin::RawTerminal::enter);
    let ended = event_loop(cfg, &devs, &exit_evt, &rx, &quit);
    let rss = report::rss_beyond_shmem_kib();
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
    stop_vcpus(&stop, threads);
    let ended = ended?;
    // Late events (other vCPUs reporting `Stopped`) carry nothing new.
    let (first_run, why) = ended;

    let boot_timer = boot_rx.try_iter().next();
    let watch = watch
        .lock()
        .map(|w| (w.agent_ready, w.kernel_panic.clone()));
    let (agent_ready, kernel_panic) = watch.unwrap_or((None, None));
    let micro_check = match (&cfg.guest, &why) {
        (
            GuestConfig::Micro {
                expected: Some(expected),
                ..
            },
            VcpuStop::DeviceExit(0),
        ) => Some(crate::micro_check::check(mem, expected)),
        _ => None,
    };
    let mut outcome = Outcome::from_stop(why, kernel_panic);
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
        boot_timer_ms: boot_timer.map(ms),
        agent_ready_ms: agent_ready.map(ms),
        micro_passes: micro.then(|| micro_passes.load(Ordering::Acquire)),
        micro_check,
        rss_beyond_guest_kib: rss,
        wall_ms: ms(start.elapsed()),
        tracking,
    })
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

/// Runs the main thread's loop until the first vCPU stops (or the user quits from the console).
fn event_loop(
    cfg: &VmConfig,
    devs: &devices_setup::Devices,
    exit_evt: &EventFd,
    rx: &Receiver<VcpuEvent>,
    quit: &Arc<AtomicBool>,
) -> Result<Ended, MachineError> {
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| MachineError::EventLoop(format!("{e:?}")))?;
    let watch_evt = exit_evt.try_clone().map_err(MachineError::Thread)?;
    em.add_subscriber(Arc::new(Mutex::new(ExitWatch(watch_evt))));
    if cfg.console_input {
        let input = stdin::StdinInput::new(devs.console_input(), quit.clone());
        em.add_subscriber(Arc::new(Mutex::new(input)));
    }
    let mut first_run = None;
    loop {
        for ev in rx.try_iter() {
            match ev {
                VcpuEvent::FirstRun(t) => first_run = Some(t),
                VcpuEvent::Stopped { id, why } => {
                    tracing::debug!("vcpu{id} stopped: {why:?}");
                    return Ok((first_run, why));
                }
            }
        }
        if quit.load(Ordering::Acquire) {
            return Ok((first_run, VcpuStop::Stopped));
        }
        em.run_with_timeout(100)
            .map_err(|e| MachineError::EventLoop(format!("{e:?}")))?;
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
