//! One thread per vCPU: KVM_RUN, exits dispatched to the port-I/O and MMIO buses, and a precise
//! report for every exit that ends the guest. Nothing here matches port numbers: devices live on
//! the buses.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Once};
use std::time::Instant;

use devices::bus::{Bus, VcpuAction};
use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::kick::RunState;
use super::pause::PauseControl;
use super::vm::Vm;
use crate::memory::RamRange;
use crate::tracking::DirtyRings;
use crate::userfault::DemandExits;

/// Consecutive ring-full exits with nothing to collect before the vCPU gives up: the host
/// kernel pushed past the ring's end (PLATFORM.md §5) and re-entering would livelock.
const RING_FULL_LIVELOCK: u32 = 1000;

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

enum Next {
    Continue,
    /// KVM_RUN returned EINTR (a kick, or immediate_exit): no exit to handle.
    Interrupted,
    Stop(VcpuStop),
    InternalError,
    Shutdown,
    FailEntry(u64),
    RunError(kvm_ioctls::Error),
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
    /// The VM's dirty rings, when it has them: collected here on KVM_EXIT_DIRTY_RING_FULL.
    pub rings: Option<Arc<DirtyRings>>,
    pub ring_full_streak: u32,
    /// Pause requests (API pause, migration stop-and-copy).
    pub pause: Arc<PauseControl>,
    /// For saving this vCPU's state when a pause asks for it.
    pub vm: Arc<Vm>,
    /// An exit-based demand pager, once one is armed: MMIO exits into RAM and instruction
    /// fetches from unmapped RAM are missing pages to bring in, not faults.
    pub demand: DemandExits,
    /// RIP of the last emulation failure re-entered because its code page was being remapped.
    pub code_retry: Option<u64>,
}

impl VcpuRunner {
    /// Runs until the guest or the VMM stops this vCPU; always reports why.
    pub fn run(mut self, events: Sender<VcpuEvent>) {
        // A bug that panics in this thread must still end the VM with a report: without the
        // event the main loop would wait for this vCPU forever.
        let id = self.id;
        let why =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_loop(&events)))
            {
                Ok(why) => why,
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    VcpuStop::Fault(format!("vcpu{id}: internal error in vmm (panic): {msg}"))
                }
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
                Next::Shutdown => {
                    return VcpuStop::Fault(self.fault(
                        "triple fault (KVM_EXIT_SHUTDOWN): the guest hit an exception it could not handle",
                    ))
                }
                Next::FailEntry(reason) => {
                    return VcpuStop::Fault(self.fault(&format!(
                        "KVM_EXIT_FAIL_ENTRY, hardware entry failure reason 0x{reason:x}"
                    )))
                }
                Next::RunError(e) => {
                    return VcpuStop::Fault(self.fault(&format!("KVM_RUN failed: {e}")))
                }
            }
        }
    }

    fn run_once(&mut self) -> Next {
        let id = self.id;
        self.run_state.entering();
        let result = self.fd.run();
        self.run_state.exited();
        let exit = match result {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Next::Interrupted
            }
            Err(e) => return Next::RunError(e),
        };
        if !matches!(
            exit,
            VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL)
        ) {
            self.ring_full_streak = 0;
        }
        match exit {
            VcpuExit::IoIn(port, data) => {
                if self.pio.read(port as u64, data).is_err() {
                    // No device: the bus floats high, as on real hardware; guests probe ports.
                    data.fill(0xff);
                    tracing::trace!("vcpu{id}: in from unclaimed port 0x{port:x}");
                }
                Next::Continue
            }
            VcpuExit::IoOut(port, data) => match self.pio.write(port as u64, data) {
                Ok(action) => action_next(action),
                Err(_) => {
                    tracing::trace!("vcpu{id}: out to unclaimed port 0x{port:x}");
                    Next::Continue
                }
            },
            VcpuExit::MmioRead(addr, data) => {
                if in_ram(&self.ram, addr) {
                    return demand_access(id, self.demand.get(), addr, Access::Read(data));
                }
                if self.mmio.read(addr, data).is_err() {
                    data.fill(0xff);
                    tracing::debug!("vcpu{id}: MMIO read from unclaimed 0x{addr:x}");
                }
                Next::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                if in_ram(&self.ram, addr) {
                    return demand_access(id, self.demand.get(), addr, Access::Write(data));
                }
                match self.mmio.write(addr, data) {
                    Ok(action) => action_next(action),
                    Err(_) => {
                        tracing::debug!("vcpu{id}: MMIO write to unclaimed 0x{addr:x}");
                        Next::Continue
                    }
                }
            }
            VcpuExit::Hlt => Next::Stop(VcpuStop::Fault(format!(
                "vcpu{id}: KVM_EXIT_HLT with the in-kernel irqchip: the vCPU halted with nothing \
                 able to wake it"
            ))),
            VcpuExit::Shutdown => Next::Shutdown,
            VcpuExit::FailEntry(reason, _cpu) => Next::FailEntry(reason),
            VcpuExit::InternalError => match self.demand.get().cloned() {
                Some(pager) => self.missing_code(pager.as_ref()),
                None => Next::InternalError,
            },
            VcpuExit::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(VcpuStop::Poweroff),
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Next::Stop(VcpuStop::Reset),
                other => Next::Stop(VcpuStop::Fault(format!(
                    "vcpu{id}: guest system event {other} (crash or unsupported)"
                ))),
            },
            VcpuExit::IoapicEoi(_) | VcpuExit::IrqWindowOpen | VcpuExit::Intr => Next::Continue,
            // KVM Userfault: the access never executed; once the page is in, re-enter.
            VcpuExit::MemoryFault { flags, gpa, size } => {
                let fault = crate::sys::kvm_userfault::MemoryFault::from_fields(flags, gpa, size);
                match self.demand.get() {
                    Some(pager) if fault.userfault => match pager.resolve(id, gpa, size) {
                        Ok(true) => Next::Continue,
                        Ok(false) => Next::Stop(VcpuStop::Fault(format!(
                            "vcpu{id}: KVM userfault exit at 0x{gpa:x}, outside guest RAM"
                        ))),
                        Err(e) => Next::Stop(VcpuStop::Fault(format!(
                            "vcpu{id}: {} could not bring in 0x{gpa:x}: {e}; the guest stops \
                             rather than run on without it",
                            pager.name()
                        ))),
                    },
                    _ => Next::Stop(VcpuStop::Fault(self.fault(&format!(
                        "KVM_EXIT_MEMORY_FAULT at 0x{gpa:x}+0x{size:x}, flags 0x{flags:x} \
                         (no demand pager handles it)"
                    )))),
                }
            }
            // kvm-ioctls does not know this exit (TRACKING.md): handle the raw reason.
            VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL) => {
                ring_full(id, self.rings.as_deref(), &mut self.ring_full_streak)
            }
            VcpuExit::Unsupported(reason) => Next::Stop(VcpuStop::Fault(format!(
                "vcpu{id}: unhandled KVM exit reason {reason}"
            ))),
            other => Next::Stop(VcpuStop::Fault(format!(
                "vcpu{id}: unexpected KVM exit {other:?}"
            ))),
        }
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
        self.pause.park(self.id, &mut || {
            crate::vstate::state::save_vcpu(kvm, fd).map_err(|e| e.to_string())
        });
        None
    }

    /// An emulation failure while an exit pager is armed: KVM reports an instruction fetch from
    /// a page in no memslot this way, without a GPA. Translate the RIP (and the last byte an
    /// instruction there could span), bring in whatever is missing and re-enter; KVM then
    /// fetches the instruction again. When the code is all mapped, the failure is something
    /// else (an instruction KVM cannot emulate, e.g. a VEX load from a missing page, which
    /// carries no GPA either): stop with the full report instead of guessing.
    fn missing_code(&mut self, pager: &dyn crate::userfault::ExitPager) -> Next {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the member KVM
        // filled in; plain data.
        let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
        if suberror != KVM_INTERNAL_ERROR_EMULATION {
            return Next::InternalError;
        }
        let (Ok(regs), Ok(sregs)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return Next::InternalError;
        };
        let long_mode = sregs.efer & (1 << 10) != 0 && sregs.cs.l != 0;
        let linear = if long_mode {
            regs.rip
        } else {
            sregs.cs.base.wrapping_add(regs.rip)
        };
        let mut brought = false;
        let mut raced = false;
        for at in [linear, linear.wrapping_add(14)] {
            let gpa = match self.fd.translate_gva(at) {
                Ok(t) if t.valid != 0 => t.physical_address,
                _ => continue,
            };
            if !pager.covers(gpa) {
                continue;
            }
            // Mapped now: the fetch may have raced with a memslot merge, which `mapped` waited
            // out. Re-enter once; the same RIP failing again is a real emulation failure.
            if pager.mapped(gpa) {
                raced = true;
                continue;
            }
            match pager.resolve(self.id, gpa, 1) {
                Ok(true) => {
                    pager.note_ifetch();
                    brought = true
                }
                Ok(false) => {}
                Err(e) => {
                    return Next::Stop(VcpuStop::Fault(self.fault(&format!(
                        "{} could not bring in the code page at 0x{gpa:x}: {e}",
                        pager.name()
                    ))))
                }
            }
        }
        if !brought {
            // The code is there: the instruction itself touched an unmapped page in a way
            // KVM cannot emulate (SSE/AVX). Decode its operands, bring their pages in and let
            // the CPU run it natively.
            match self.missing_operands(pager, &regs, &sregs, long_mode) {
                Ok(b) => {
                    if b {
                        pager.note_decoded();
                    }
                    brought = b
                }
                Err(e) => {
                    return Next::Stop(VcpuStop::Fault(self.fault(&format!(
                        "emulation failure with {} armed: {e}",
                        pager.name()
                    ))))
                }
            }
        }
        if brought {
            self.code_retry = None;
            Next::Continue
        } else if raced && self.code_retry != Some(regs.rip) {
            self.code_retry = Some(regs.rip);
            Next::Continue
        } else {
            Next::InternalError
        }
    }

    /// The pages the failed instruction's memory operands touch, brought in when unmapped.
    /// Ok(false): all mapped (a real emulation failure). Err: the accesses cannot be known.
    fn missing_operands(
        &mut self,
        pager: &dyn crate::userfault::ExitPager,
        regs: &kvm_bindings::kvm_regs,
        sregs: &kvm_bindings::kvm_sregs,
        long_mode: bool,
    ) -> Result<bool, String> {
        let Some(bytes) = self.instruction_bytes() else {
            return Ok(false);
        };
        let bitness = if long_mode {
            64
        } else if sregs.cs.db != 0 {
            32
        } else {
            16
        };
        let accesses = crate::vstate::operands::memory_accesses(&bytes, bitness, regs, sregs)?;
        tracing::debug!(
            "vcpu{}: emulation failure at 0x{:x}: operands {accesses:x?}",
            self.id,
            regs.rip
        );
        let mut brought = false;
        for a in accesses {
            let mut page = a.linear & !0xfff;
            let end = a.linear.saturating_add(a.len);
            while page < end {
                let gpa = match self.fd.translate_gva(page) {
                    Ok(t) if t.valid != 0 => t.physical_address & !0xfff,
                    other => {
                        tracing::debug!(
                            "vcpu{}: 0x{page:x} does not translate: {other:?}",
                            self.id
                        );
                        page += 0x1000;
                        continue;
                    }
                };
                tracing::debug!(
                    "vcpu{}: operand page 0x{page:x} -> 0x{gpa:x}, mapped {}",
                    self.id,
                    pager.mapped(gpa)
                );
                if pager.covers(gpa) && !pager.mapped(gpa) {
                    pager
                        .resolve(self.id, gpa, 1)
                        .map_err(|e| format!("bringing in 0x{gpa:x}: {e}"))?;
                    brought = true;
                }
                page += 0x1000;
            }
        }
        Ok(brought)
    }

    /// The instruction bytes KVM put in an emulation-failure exit, if it did.
    fn instruction_bytes(&mut self) -> Option<Vec<u8>> {
        let run = self.fd.get_kvm_run();
        // SAFETY: called right after a KVM_EXIT_INTERNAL_ERROR exit: `internal` is the member
        // KVM filled; plain data.
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
                let bytes = match self.instruction_bytes() {
                    Some(raw) => {
                        let hex: Vec<String> = raw.iter().map(|b| format!("{b:02x}")).collect();
                        format!("instruction bytes: {}", hex.join(" "))
                    }
                    None => format!("no instruction bytes reported (data {data:x?})"),
                };
                let hint = match self.demand.get() {
                    Some(p) => format!(
                        " ({} is armed and the code here is mapped: if this instruction reads \
                         or writes a page not mapped yet in a way KVM cannot emulate, e.g. a \
                         SIMD/VEX access, the exit carries no address and this backend cannot \
                         serve it; restore with --demand uffd-missing)",
                        p.name()
                    ),
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

/// KVM_EXIT_DIRTY_RING_FULL: collect every ring (as the reaper does) and re-enter. If nothing
/// can be collected again and again, the ring has overflowed in the host kernel: stop with the
/// reason rather than spin.
fn ring_full(id: u8, rings: Option<&DirtyRings>, streak: &mut u32) -> Next {
    let Some(rings) = rings else {
        return Next::Stop(VcpuStop::Fault(format!(
            "vcpu{id}: KVM_EXIT_DIRTY_RING_FULL on a VM without dirty rings"
        )));
    };
    rings.note_full_exit();
    match rings.collect() {
        Ok(0) => {
            *streak += 1;
            if *streak >= RING_FULL_LIVELOCK {
                return Next::Stop(VcpuStop::Fault(format!(
                    "vcpu{id}: dirty ring full {streak} times in a row with nothing to collect: \
                     the host kernel overflowed the ring (see PLATFORM.md §5, check dmesg for a \
                     WARN in kvm_dirty_ring_push)"
                )));
            }
            std::thread::yield_now();
            Next::Continue
        }
        Ok(_) => {
            *streak = 0;
            Next::Continue
        }
        Err(e) => Next::Stop(VcpuStop::Fault(format!(
            "vcpu{id}: collecting the dirty rings on a ring-full exit failed: {e}"
        ))),
    }
}

enum Access<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// An MMIO exit into guest RAM. With an exit-based demand pager armed it is a vCPU touching a
/// page that is not mapped yet: bring the page in, then complete the access against memory
/// exactly as KVM would have (a load's data goes back through kvm_run; a store, whose RIP is
/// already past it, is applied here). Completing rather than replaying matters: a load replayed
/// without its data retires without writing its register (PLATFORM.md §8).
fn demand_access(
    id: u8,
    pager: Option<&Arc<dyn crate::userfault::ExitPager>>,
    addr: u64,
    access: Access<'_>,
) -> Next {
    let dir = match access {
        Access::Read(_) => "read",
        Access::Write(_) => "write",
    };
    let Some(pager) = pager else {
        return Next::Stop(mmio_in_ram(id, dir, addr));
    };
    let len = match &access {
        Access::Read(d) => d.len(),
        Access::Write(d) => d.len(),
    } as u64;
    let done = pager.resolve(id, addr, len).and_then(|served| {
        if !served {
            return Ok(false);
        }
        match access {
            Access::Read(data) => pager.complete_read(addr, data)?,
            Access::Write(data) => pager.complete_write(addr, data)?,
        }
        Ok(true)
    });
    match done {
        Ok(true) => Next::Continue,
        Ok(false) => Next::Stop(mmio_in_ram(id, dir, addr)),
        Err(e) => Next::Stop(VcpuStop::Fault(format!(
            "vcpu{id}: {} could not bring in the page of a guest {dir} at 0x{addr:x}: {e}; \
             the guest stops rather than run on without it",
            pager.name()
        ))),
    }
}

fn in_ram(ram: &[RamRange], gpa: u64) -> bool {
    ram.iter().any(|r| r.contains(gpa))
}

/// PVM reports a guest access whose host mapping faults as MMIO to a RAM address: never a
/// device access, and never something to emulate (PLATFORM.md §5).
fn mmio_in_ram(id: u8, dir: &str, addr: u64) -> VcpuStop {
    VcpuStop::Fault(format!(
        "vcpu{id}: MMIO {dir} exit at 0x{addr:x}, which is guest RAM: the host mapping of that \
         page failed, not a device access"
    ))
}

fn action_next(action: VcpuAction) -> Next {
    match action {
        VcpuAction::Continue => Next::Continue,
        VcpuAction::Reset => Next::Stop(VcpuStop::Reset),
        VcpuAction::Exit(code) => Next::Stop(VcpuStop::DeviceExit(code)),
    }
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
