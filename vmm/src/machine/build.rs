//! Assembling a VM from its `VmConfig`: guest RAM, the KVM VM, devices on their buses and the
//! vCPUs, ready to run. A fresh boot then loads the guest (`boot`); an incoming migration
//! restores saved state instead (`migration::dest`).

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use super::tracking_session::{self, SharedSession};
use super::{console, devices_setup, GuestConfig, MachineError, VmConfig, MAX_VCPUS};
use crate::boot::linux::{self, LinuxBootError};
use crate::boot::micro;
use crate::boot::mptable;
use crate::boot::{paging, EntryPoint};
use crate::memory::GuestRam;
use crate::tracking::{self, DirtyRings, RingFullExits};
use crate::userfault::{DemandExits, PagerExits};
use crate::vstate::cpuid;
use crate::vstate::exits::{ExitHandler, Handlers};
use crate::vstate::kick::{Kicker, RunState};
use crate::vstate::pause::PauseControl;
use crate::vstate::regs::{self, RegsError};
use crate::vstate::vcpu::{self, VcpuEvent, VcpuRunner};
use crate::vstate::vm::Vm;

/// A built VM whose vCPU threads have not started.
pub struct Machine {
    pub cfg: VmConfig,
    pub start: Instant,
    /// A fresh Linux boot's kernel being loaded while the VM is made (`build_and_boot`);
    /// `boot` loads the initramfs and joins it.
    pub(super) kernel: Option<KernelLoading>,
    /// When each step of the set-up ended (the report's `setup_parts_ms`): where start-up
    /// time goes, measured in every run.
    pub(super) setup_marks: Vec<(&'static str, Instant)>,
    pub ram: GuestRam,
    pub vm: Arc<Vm>,
    pub rings: Option<Arc<DirtyRings>>,
    pub devs: devices_setup::Devices,
    pub runners: Vec<VcpuRunner>,
    pub watch: Arc<Mutex<console::ConsoleWatch>>,
    pub micro_passes: Arc<AtomicU64>,
    pub session_slot: Arc<OnceLock<SharedSession>>,
    pub boot_rx: Receiver<Duration>,
    pub exit_evt: EventFd,
    pub stop: Arc<AtomicBool>,
    pub kicker: Arc<Kicker>,
    pub pause: Arc<PauseControl>,
    pub events_tx: Sender<VcpuEvent>,
    pub events_rx: Receiver<VcpuEvent>,
    /// Set when an exit-based demand pager is armed (lazy restore, postcopy): the vCPU threads
    /// resolve missing-page exits through it.
    pub demand: DemandExits,
    /// Guest memory is still being paged in (see `Shared::paging_in`).
    pub paging_in: Arc<AtomicBool>,
    /// Called once every vCPU has stopped, while guest RAM is still mapped (and a demand
    /// pager still armed): `--dump-final` brings in what the run never touched and reads RAM.
    pub on_ended: Option<OnEnded>,
}

/// See `Machine::kernel`.
pub(super) type KernelLoading =
    std::thread::JoinHandle<Result<linux::LoadedKernel, LinuxBootError>>;

/// See `Machine::on_ended`.
pub type OnEnded = Box<dyn FnOnce(&crate::memory::GuestMemory) + Send>;

impl Machine {
    /// Creates RAM, the VM (with RAM's memslots: `Vm::with_ram`), devices and vCPUs (CPUID,
    /// MSRs, FPU, LINT set up; no boot registers).
    pub fn build(cfg: &VmConfig, start: Instant) -> Result<Machine, MachineError> {
        Self::build_loading(cfg, start, false)
    }

    /// `build` and `boot`: a fresh boot. A Linux guest's kernel is loaded on a thread of its own
    /// while the VM, its devices and vCPUs are made, and its initramfs after them on this one
    /// (as `linux::load_images` does): writing 14 MB of images into fresh guest RAM was the
    /// largest part of a Linux guest's start-up (~8 ms on PVM hosts) and needs nothing of the
    /// VM.
    pub fn build_and_boot(cfg: &VmConfig, start: Instant) -> Result<Machine, MachineError> {
        Self::build_loading(cfg, start, true)?.boot()
    }

    fn build_loading(
        cfg: &VmConfig,
        start: Instant,
        load_images: bool,
    ) -> Result<Machine, MachineError> {
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS as u32 {
            return Err(MachineError::VcpuCount {
                got: cfg.vcpus,
                max: MAX_VCPUS,
            });
        }
        let nr_vcpus = cfg.vcpus as u8;
        vcpu::install_kick_handler().map_err(MachineError::Signal)?;

        let mut marks = vec![("entered", Instant::now())];
        let ram = GuestRam::new(cfg.mem_bytes)?;
        marks.push(("guest RAM", Instant::now()));
        let kernel = match &cfg.guest {
            GuestConfig::Linux(boot) if load_images => {
                // The thread owns a clone of the regions (each an `Arc` of its mapping): RAM
                // stays mapped while it writes, whatever becomes of the machine.
                let mem = ram.memory().clone();
                let boot = boot.clone();
                let handle = std::thread::Builder::new()
                    .name("load-kernel".into())
                    .spawn(move || linux::load_kernel(&mem, &boot))
                    .map_err(MachineError::Thread)?;
                Some(handle)
            }
            _ => None,
        };
        let vm = Arc::new(Vm::with_ram(&ram, cfg.phys_bits)?);
        marks.push(("VM, RAM memslots and irqchip", Instant::now()));
        let tracked_ring = cfg.tracking.as_ref().is_some_and(|t| t.needs_dirty_ring());
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
                "dirty ring from boot with a Linux guest on PVM: the emulated kernel pushes an \
                 entry per emulated write and can overflow the ring (host WARN, vCPU stopped); use \
                 --track-schedule none,ring to start it at the first agent workload"
            );
        }
        // The ring must be on before any vCPU exists.
        let ring_entries = if tracked_ring || cfg.dirty_ring {
            Some(tracking::enable_dirty_ring(vm.fd())?)
        } else {
            None
        };
        let mem = ram.memory();
        let rings = ring_entries.map(|entries| Arc::new(DirtyRings::new(vm.clone(), entries)));
        let micro = matches!(cfg.guest, GuestConfig::Micro { .. });

        let watch = Arc::new(Mutex::new(console::ConsoleWatch::default()));
        let micro_passes = Arc::new(AtomicU64::new(0));
        // The session exists only once the vCPUs (and their rings) do; the pass hook, created
        // with the devices, finds it here.
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
                passthrough: &cfg.devices,
                micro: micro.then(|| {
                    crate::micro_port::MicroPort::new(micro_passes.clone())
                        .with_vcpus(nr_vcpus)
                        .with_hook(pass_hook)
                }),
                start,
                boot_timer: boot_tx,
            },
        )?;

        marks.push(("devices", Instant::now()));
        // vCPUs: all created before any runs (KVM wants the BSP's LAPIC to know its peers).
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(PauseControl::new(nr_vcpus as usize));
        let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(MachineError::Thread)?;
        let demand: DemandExits = Arc::new(OnceLock::new());
        let mut runners = Vec::new();
        for id in 0..nr_vcpus {
            let fd = vm.create_vcpu(id)?;
            if let Some(rings) = &rings {
                rings
                    .add_vcpu(&fd)
                    .map_err(|source| MachineError::RingMap { id, source })?;
            }
            let cpuid = cpuid::for_vcpu(vm.kvm(), id, nr_vcpus, vm.phys_bits())?;
            fd.set_cpuid2(&cpuid).map_err(|source| RegsError::Ioctl {
                what: "KVM_SET_CPUID2",
                source,
            })?;
            regs::setup_msrs(&fd)?;
            regs::setup_fpu(&fd)?;
            regs::setup_lint(&fd)?;
            // Each vCPU asks the pager first (an MMIO exit into RAM is a missing page), then
            // the rings.
            let mut exits: Vec<Box<dyn ExitHandler>> =
                vec![Box::new(PagerExits::new(id, demand.clone()))];
            if let Some(rings) = &rings {
                exits.push(Box::new(RingFullExits::new(rings.clone())));
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
                exits: Handlers(exits),
                pause: pause.clone(),
                vm: vm.clone(),
            });
        }
        marks.push(("vCPUs", Instant::now()));
        let (events_tx, events_rx) = channel();
        Ok(Machine {
            cfg: cfg.clone(),
            start,
            kernel,
            setup_marks: marks,
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
            kicker: Arc::new(Kicker::default()),
            pause,
            events_tx,
            events_rx,
            demand,
            paging_in: Arc::new(AtomicBool::new(false)),
            on_ended: None,
        })
    }

    /// A fresh boot: boot structures and the guest in RAM, the BSP's entry registers.
    pub fn boot(mut self) -> Result<Machine, MachineError> {
        let cfg = &self.cfg;
        let mem = self.ram.memory();
        regs::write_descriptor_tables(mem)?;
        let micro = matches!(cfg.guest, GuestConfig::Micro { .. });
        paging::write_identity_map(mem, micro).map_err(MachineError::PageTables)?;
        mptable::write(mem, cfg.vcpus as u8)?;
        let entry: EntryPoint = match &cfg.guest {
            GuestConfig::Linux(boot) => {
                let mut boot = boot.clone();
                for arg in &self.devs.virtio_cmdline {
                    boot.cmdline.push(' ');
                    boot.cmdline.push_str(arg);
                }
                let low_end = self.ram.low_end();
                let images = match self.kernel.take() {
                    Some(loading) => linux::load_initrd_beside(mem, low_end, &boot, || {
                        loading.join().map_err(|_| LinuxBootError::LoaderThread)?
                    })?,
                    None => linux::load_images(mem, low_end, &boot)?,
                };
                self.setup_marks
                    .push(("kernel and initramfs in RAM", Instant::now()));
                linux::write_boot_params(&self.ram, &boot, &images)?
            }
            GuestConfig::Micro {
                payload,
                mailbox,
                region,
                ..
            } => {
                if let Some((gpa, bytes)) = region {
                    micro::check_region(&self.ram, *gpa, *bytes)?;
                }
                if self.runners.len() > 1 {
                    micro::write_io_bitmap(mem)?;
                }
                micro::load(&self.ram, payload, mailbox)?
            }
        };
        if let Some(bsp) = self.runners.first() {
            regs::setup_boot_sregs(&bsp.fd)?;
            regs::setup_boot_regs(&bsp.fd, &entry)?;
        }
        // Every vCPU runs a micro guest: the others start at its entry (see `boot::micro`).
        if micro {
            for ap in self.runners.iter().skip(1) {
                micro::setup_ap(&ap.fd, ap.id)?;
            }
        }
        self.setup_marks.push(("boot image loaded", Instant::now()));
        Ok(self)
    }
}
