//! One thread per vCPU: KVM_RUN, each exit handed to `dispatch` (the port-I/O and MMIO buses,
//! or the vCPU's `ExitHandler` for memory exits), and a precise report for every exit that ends
//! the guest. Nothing here matches port numbers or knows demand paging or dirty rings.

mod dispatch;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Once};
use std::time::Instant;

use devices::bus::Bus;
use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use self::dispatch::{dispatch, AddressSpace, Exit, Next};
use super::exits::{ExitHandler, Handlers};
use super::kick::RunState;
use super::pause::PauseControl;
use super::vm::Vm;
use crate::memory::RamRange;

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for a reset (i8042 0xfe, or KVM's SYSTEM_EVENT reset).
    Reset,
    /// The guest powered off (KVM SYSTEM_EVENT shutdown).
    Poweroff,
    /// A device ended the VM with this code (the micro guest's exit port).
    DeviceExit(i32),
    /// The guest did something that cannot continue: the message says what and where.
    Fault(String),
    /// The VMM asked the vCPU to stop.
    Stopped,
    /// The guest was migrated away and runs on the destination now.
    Migrated,
    /// A snapshot was taken and the VM asked to end: the guest lives on in the snapshot.
    Snapshotted,
}

/// What a vCPU thread tells the machine.
#[derive(Debug)]
pub enum VcpuEvent {
    /// The first KVM_RUN of vCPU 0 is about to happen.
    FirstRun(Instant),
    /// This vCPU has stopped.
    Stopped { id: u8, why: VcpuStop },
}

/// The signal that kicks a vCPU thread out of KVM_RUN (the handler does nothing; the point is
/// the EINTR).
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn noop_handler(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(kick_signal(), noop_handler));
    result
}

pub struct VcpuRunner {
    pub id: u8,
    pub fd: VcpuFd,
    pub pio: Bus,
    pub mmio: Bus,
    pub ram: Vec<RamRange>,
    pub stop: Arc<AtomicBool>,
    /// Written after each `Stopped` event so the machine's event loop wakes up.
    pub exit_evt: EventFd,
    /// In guest mode or not, for synchronous kicks.
    pub run_state: Arc<RunState>,
    /// Memory exits: missing pages (demand paging) and full dirty rings.
    pub exits: Handlers,
    /// Pause requests (API pause, migration stop-and-copy).
    pub pause: Arc<PauseControl>,
    /// For saving this vCPU's state when a pause asks for it.
    pub vm: Arc<Vm>,
}

impl VcpuRunner {
    /// Runs until the guest or the VMM stops this vCPU; always reports why.
    pub fn run(mut self, events: Sender<VcpuEvent>) {
        // A bug that panics in this thread must still end the VM with a report: without the
        // event the main loop would wait for this vCPU forever.
        let id = self.id;
        // Set up: the vCPU fd, its kvm_run mapping and guest memory exist; only the run is left.
        let sandboxed = crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu);
        let why = match sandboxed {
            Err(e) => VcpuStop::Fault(format!("vcpu{id}: {e}")),
            Ok(()) => match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.run_loop(&events)
            })) {
                Ok(why) => why,
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    VcpuStop::Fault(format!("vcpu{id}: internal error in vmm (panic): {msg}"))
                }
            },
        };
        self.run_state.finished();
        self.pause.vcpu_finished(self.id);
        if let VcpuStop::Fault(msg) = &why {
            // The machine's report carries the message; this is for the log's timeline only.
            tracing::debug!("{msg}");
        }
        let _ = events.send(VcpuEvent::Stopped { id: self.id, why });
        let _ = self.exit_evt.write(1);
    }

    fn run_loop(&mut self, events: &Sender<VcpuEvent>) -> VcpuStop {
        if self.id == 0 {
            let _ = events.send(VcpuEvent::FirstRun(Instant::now()));
        }
        loop {
            if self.stop.load(Ordering::Acquire) {
                return VcpuStop::Stopped;
            }
            let next = if self.pause.pause_requested() {
                match self.park() {
                    Some(next) => next,
                    None => continue,
                }
            } else {
                self.run_once()
            };
            match next {
                Next::Continue | Next::Interrupted => {}
                Next::Stop(why) => return why,
                Next::InternalError => return VcpuStop::Fault(self.internal_error()),
                Next::Fault(what) => return VcpuStop::Fault(self.fault(&what)),
            }
        }
    }

    fn run_once(&mut self) -> Next {
        self.run_state.entering();
        let result = self.fd.run();
        self.run_state.exited();
        let space = AddressSpace {
            pio: &self.pio,
            mmio: &self.mmio,
            ram: &self.ram,
        };
        let insn: Option<Vec<u8>>;
        let exit = match result {
            Ok(VcpuExit::IoIn(port, data)) => Exit::IoIn(port, data),
            Ok(VcpuExit::IoOut(port, data)) => Exit::IoOut(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => Exit::MmioRead(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => Exit::MmioWrite(addr, data),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
                // member KVM filled in; plain data.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                if suberror == KVM_INTERNAL_ERROR_EMULATION {
                    insn = instruction_bytes(&mut self.fd);
                    Exit::EmulationFailure {
                        cpu: &self.fd,
                        insn: insn.as_deref(),
                    }
                } else {
                    Exit::InternalError
                }
            }
            Ok(VcpuExit::MemoryFault { flags, gpa, size }) => {
                Exit::MemoryFault { flags, gpa, size }
            }
            // kvm-ioctls does not know this exit (TRACKING.md): it comes as the raw reason.
            Ok(VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL)) => {
                Exit::DirtyRingFull
            }
            Ok(VcpuExit::Unsupported(reason)) => Exit::Unsupported(reason),
            Ok(VcpuExit::Hlt) => Exit::Hlt,
            Ok(VcpuExit::Shutdown) => Exit::Shutdown,
            Ok(VcpuExit::FailEntry(reason, _cpu)) => Exit::FailEntry(reason),
            Ok(VcpuExit::SystemEvent(kind, _)) => Exit::SystemEvent(kind),
            Ok(VcpuExit::IoapicEoi(_) | VcpuExit::IrqWindowOpen | VcpuExit::Intr) => Exit::Nothing,
            Ok(other) => Exit::Unexpected(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Next::Interrupted
            }
            Err(e) => return Next::Fault(format!("KVM_RUN failed: {e}")),
        };
        dispatch(self.id, exit, &space, &mut self.exits)
    }

    /// Parks this thread for a pause. First KVM finishes the port or MMIO access of the last
    /// exit (its result sits in kvm_run until the next KVM_RUN): with immediate_exit set,
    /// KVM_RUN completes it and returns EINTR without entering the guest; should it report a
    /// new exit instead, that exit is dispatched as usual and the loop repeats. So a saved state
    /// is always the one after the instruction. An exit that ends the vCPU is returned instead
    /// of parking.
    fn park(&mut self) -> Option<Next> {
        self.fd.set_kvm_immediate_exit(1);
        let finished = loop {
            match self.run_once() {
                Next::Interrupted => break None,
                Next::Continue => {}
                other => break Some(other),
            }
        };
        self.fd.set_kvm_immediate_exit(0);
        if finished.is_some() {
            return finished;
        }
        let (kvm, fd) = (self.vm.kvm(), &self.fd);
        self.pause
            .park(self.id, &mut || crate::vstate::state::save_vcpu(kvm, fd));
        None
    }

    /// Decodes KVM_EXIT_INTERNAL_ERROR; for an emulation failure, the instruction bytes.
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union member
        // KVM filled in; it is plain data.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let ndata = (internal.ndata as usize).min(internal.data.len());
        let data = &internal.data[..ndata];
        let what = match internal.suberror {
            KVM_INTERNAL_ERROR_EMULATION => {
                // kvm_run.emulation_failure: data[0] = flags, then insn_size (u8) and 15 bytes.
                let bytes = match instruction_bytes(&mut self.fd) {
                    Some(raw) => {
                        let hex: Vec<String> = raw.iter().map(|b| format!("{b:02x}")).collect();
                        format!("instruction bytes: {}", hex.join(" "))
                    }
                    None => format!("no instruction bytes reported (data {data:x?})"),
                };
                let hint = match self.exits.failure_note() {
                    Some(note) => format!(" ({note})"),
                    None => String::new(),
                };
                format!(
                    "emulation failure: KVM cannot execute the guest instruction at RIP; \
                     {bytes}{hint}"
                )
            }
            2 => "simultaneous exceptions (KVM_INTERNAL_ERROR_SIMUL_EX)".to_string(),
            3 => format!("event delivery failed (KVM_INTERNAL_ERROR_DELIVERY_EV) {data:x?}"),
            4 => format!(
                "unexpected exit reason (KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON) {data:x?}"
            ),
            n => format!("internal error suberror {n} {data:x?}"),
        };
        self.fault(&what)
    }

    /// `what`, prefixed with the vCPU and followed by its registers.
    fn fault(&self, what: &str) -> String {
        format!("vcpu{}: {what}\n{}", self.id, describe_state(&self.fd))
    }
}

/// The instruction bytes KVM put in an emulation-failure exit, if it did. Only right after a
/// KVM_EXIT_INTERNAL_ERROR exit.
fn instruction_bytes(fd: &mut VcpuFd) -> Option<Vec<u8>> {
    let run = fd.get_kvm_run();
    // SAFETY: the caller saw a KVM_EXIT_INTERNAL_ERROR exit: `internal` is the member KVM
    // filled; plain data.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let ndata = (internal.ndata as usize).min(internal.data.len());
    let data = &internal.data[..ndata];
    if ndata < 3 || data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES as u64 == 0 {
        return None;
    }
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&data[1].to_le_bytes());
    raw[8..].copy_from_slice(&data[2].to_le_bytes());
    let n = (raw[0] as usize).min(15);
    Some(raw[1..1 + n].to_vec())
}

/// The registers a person needs to see where a guest went wrong.
pub fn describe_state(fd: &VcpuFd) -> String {
    let mut out = String::new();
    match fd.get_regs() {
        Ok(r) => out.push_str(&format!(
            "  RIP={:#018x} RSP={:#018x} RFLAGS={:#010x}\n  RAX={:#018x} RBX={:#018x} RCX={:#018x} RDX={:#018x}\n  RSI={:#018x} RDI={:#018x} RBP={:#018x}\n  R8 ={:#018x} R9 ={:#018x} R10={:#018x} R11={:#018x}\n  R12={:#018x} R13={:#018x} R14={:#018x} R15={:#018x}\n",
            r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9,
            r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
        )),
        Err(e) => out.push_str(&format!("  (registers unavailable: {e})\n")),
    }
    match fd.get_sregs() {
        Ok(s) => out.push_str(&format!(
            "  CS={:#06x} (CPL{}) SS={:#06x} CR0={:#x} CR2={:#x} CR3={:#x} CR4={:#x} EFER={:#x}",
            s.cs.selector, s.cs.dpl, s.ss.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        )),
        Err(e) => out.push_str(&format!("  (special registers unavailable: {e})")),
    }
    out
}
