//! Every arm of `dispatch`, fed made-up exits: no KVM, no guest.

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusDevice, VcpuAction};
use kvm_bindings::{kvm_regs, kvm_sregs};

use super::*;

const RAM_END: u64 = 0x10_0000;
const UART: u16 = 0x3f8;
const MMIO_DEV: u64 = 0xd000_0000;

/// Reads fill with 0x5a; writes are recorded and answered with `action`.
struct Probe {
    writes: Vec<(u64, Vec<u8>)>,
    action: VcpuAction,
}

impl BusDevice for Probe {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn write(&mut self, offset: u64, data: &[u8]) -> VcpuAction {
        self.writes.push((offset, data.to_vec()));
        self.action
    }
}

struct Machine {
    pio: Bus,
    mmio: Bus,
    ram: Vec<RamRange>,
    dev: Arc<Mutex<Probe>>,
}

impl Machine {
    /// One probe device, at port 0x3f8 (8 ports) and at MMIO 0xd0000000 (a page); 1 MiB of RAM.
    fn new(action: VcpuAction) -> Machine {
        let dev = Arc::new(Mutex::new(Probe {
            writes: Vec::new(),
            action,
        }));
        let (mut pio, mut mmio) = (Bus::new(), Bus::new());
        pio.insert(dev.clone(), UART.into(), 8).unwrap();
        mmio.insert(dev.clone(), MMIO_DEV, 0x1000).unwrap();
        Machine {
            pio,
            mmio,
            ram: vec![RamRange {
                gpa: 0,
                size: RAM_END,
                file_offset: 0,
            }],
            dev,
        }
    }

    fn run(&self, exit: Exit<'_>, handler: &mut dyn ExitHandler) -> Next {
        let space = AddressSpace {
            pio: &self.pio,
            mmio: &self.mmio,
            ram: &self.ram,
        };
        dispatch(3, exit, &space, handler)
    }

    fn writes(&self) -> Vec<(u64, Vec<u8>)> {
        self.dev.lock().unwrap().writes.clone()
    }
}

/// Answers every memory exit with `answer`, recording what it was asked.
#[derive(Default)]
struct Recorder {
    answer: Option<Outcome>,
    calls: Vec<String>,
    progress: u32,
}

impl Recorder {
    fn answering(answer: Outcome) -> Recorder {
        Recorder {
            answer: Some(answer),
            ..Default::default()
        }
    }
    fn reply(&mut self, call: String) -> Outcome {
        self.calls.push(call);
        self.answer.clone().unwrap_or(Outcome::Declined)
    }
}

impl ExitHandler for Recorder {
    fn ram_access(&mut self, gpa: u64, access: RamAccess<'_>) -> Outcome {
        let call = match access {
            RamAccess::Read(data) => {
                data.fill(0xab);
                format!("read 0x{gpa:x}+{}", data.len())
            }
            RamAccess::Write(data) => format!("write 0x{gpa:x} {data:02x?}"),
        };
        self.reply(call)
    }
    fn memory_fault(&mut self, flags: u64, gpa: u64, size: u64) -> Outcome {
        self.reply(format!("fault 0x{gpa:x}+0x{size:x} flags {flags:x}"))
    }
    fn emulation_failure(&mut self, cpu: &dyn GuestCpu, insn: Option<&[u8]>) -> Outcome {
        let rip = cpu.regs().map(|r| r.rip).unwrap_or_default();
        self.reply(format!("emulation 0x{rip:x} {insn:02x?}"))
    }
    fn ring_full(&mut self) -> Outcome {
        self.reply("ring full".into())
    }
    fn progress(&mut self) {
        self.progress += 1;
    }
}

struct Cpu;
impl GuestCpu for Cpu {
    fn regs(&self) -> Option<kvm_regs> {
        Some(kvm_regs {
            rip: 0x4000,
            ..Default::default()
        })
    }
    fn sregs(&self) -> Option<kvm_sregs> {
        None
    }
    fn translate(&self, _gva: u64) -> Option<u64> {
        None
    }
}

fn fault_text(next: Next) -> String {
    match next {
        Next::Stop(VcpuStop::Fault(m)) => m,
        other => panic!("expected a fault stop, got {other:?}"),
    }
}

#[test]
fn port_reads_reach_the_device_and_unclaimed_ports_float_high() {
    let m = Machine::new(VcpuAction::Continue);
    let mut h = Recorder::default();
    let mut data = [0u8; 2];
    assert!(matches!(
        m.run(Exit::IoIn(UART + 5, &mut data), &mut h),
        Next::Continue
    ));
    assert_eq!(data, [0x5a; 2]);
    assert!(matches!(
        m.run(Exit::IoIn(0x80, &mut data), &mut h),
        Next::Continue
    ));
    assert_eq!(data, [0xff; 2]);
    assert!(h.calls.is_empty(), "{:?}", h.calls);
}

#[test]
fn port_writes_follow_the_devices_action_and_unclaimed_ones_are_dropped() {
    let m = Machine::new(VcpuAction::Continue);
    let mut h = Recorder::default();
    assert!(matches!(
        m.run(Exit::IoOut(UART, b"h"), &mut h),
        Next::Continue
    ));
    assert_eq!(m.writes(), vec![(0, b"h".to_vec())]);
    assert!(matches!(
        m.run(Exit::IoOut(0x80, &[1]), &mut h),
        Next::Continue
    ));
    assert_eq!(m.writes().len(), 1);

    let reset = Machine::new(VcpuAction::Reset);
    assert!(matches!(
        reset.run(Exit::IoOut(UART, &[0xfe]), &mut h),
        Next::Stop(VcpuStop::Reset)
    ));
    let exit = Machine::new(VcpuAction::Exit(7));
    assert!(matches!(
        exit.run(Exit::IoOut(UART + 1, &[7]), &mut h),
        Next::Stop(VcpuStop::DeviceExit(7))
    ));
}

#[test]
fn mmio_outside_ram_reaches_the_device_or_floats_high() {
    let m = Machine::new(VcpuAction::Continue);
    let mut h = Recorder::answering(Outcome::Stop("must not be asked".into()));
    let mut data = [0u8; 4];
    assert!(matches!(
        m.run(Exit::MmioRead(MMIO_DEV + 0x10, &mut data), &mut h),
        Next::Continue
    ));
    assert_eq!(data, [0x5a; 4]);
    assert!(matches!(
        m.run(Exit::MmioWrite(MMIO_DEV + 0x20, &[1, 2]), &mut h),
        Next::Continue
    ));
    assert_eq!(m.writes(), vec![(0x20, vec![1, 2])]);
    // A hole between RAM and the device: nothing answers.
    assert!(matches!(
        m.run(Exit::MmioRead(RAM_END, &mut data), &mut h),
        Next::Continue
    ));
    assert_eq!(data, [0xff; 4]);
    assert!(matches!(
        m.run(Exit::MmioWrite(RAM_END + 8, &[3]), &mut h),
        Next::Continue
    ));
    assert_eq!(m.writes().len(), 1);
    assert!(h.calls.is_empty(), "{:?}", h.calls);

    let exit = Machine::new(VcpuAction::Exit(2));
    assert!(matches!(
        exit.run(Exit::MmioWrite(MMIO_DEV, &[2]), &mut h),
        Next::Stop(VcpuStop::DeviceExit(2))
    ));
}

#[test]
fn mmio_into_ram_goes_to_the_handler_and_never_to_a_device() {
    let m = Machine::new(VcpuAction::Continue);
    let mut h = Recorder::answering(Outcome::Resume);
    let mut data = [0u8; 8];
    assert!(matches!(
        m.run(Exit::MmioRead(0x2000, &mut data), &mut h),
        Next::Continue
    ));
    assert_eq!(data, [0xab; 8], "the handler's data goes back to the guest");
    assert!(matches!(
        m.run(Exit::MmioWrite(RAM_END - 1, &[9]), &mut h),
        Next::Continue
    ));
    assert_eq!(h.calls, ["read 0x2000+8", "write 0xfffff [09]"]);
    assert!(m.writes().is_empty());

    let mut failing = Recorder::answering(Outcome::Stop("pager gone".into()));
    let msg = fault_text(m.run(Exit::MmioWrite(0x3000, &[1]), &mut failing));
    assert_eq!(msg, "vcpu3: pager gone");
}

#[test]
fn mmio_into_ram_nobody_serves_stops_the_guest_naming_the_address() {
    let m = Machine::new(VcpuAction::Continue);
    let mut data = [0u8; 4];
    let msg = fault_text(m.run(Exit::MmioRead(0x5000, &mut data), &mut Recorder::default()));
    assert!(
        msg.starts_with("vcpu3: MMIO read exit at 0x5000, which is guest RAM"),
        "{msg}"
    );
    let msg = fault_text(m.run(Exit::MmioWrite(0x6000, &[1]), &mut Recorder::default()));
    assert!(msg.contains("MMIO write exit at 0x6000"), "{msg}");
}

#[test]
fn memory_faults_resume_once_handled_and_stop_with_registers_otherwise() {
    let m = Machine::new(VcpuAction::Continue);
    let fault = || Exit::MemoryFault {
        flags: 0x8,
        gpa: 0x7000,
        size: 0x1000,
    };
    let mut h = Recorder::answering(Outcome::Resume);
    assert!(matches!(m.run(fault(), &mut h), Next::Continue));
    assert_eq!(h.calls, ["fault 0x7000+0x1000 flags 8"]);
    match m.run(fault(), &mut Recorder::default()) {
        Next::Fault(msg) => assert!(
            msg.starts_with("KVM_EXIT_MEMORY_FAULT at 0x7000+0x1000, flags 0x8"),
            "{msg}"
        ),
        other => panic!("{other:?}"),
    }
    let mut h = Recorder::answering(Outcome::StopWithRegisters("bad page".into()));
    assert!(matches!(m.run(fault(), &mut h), Next::Fault(msg) if msg == "bad page"));
}

#[test]
fn ring_full_goes_to_the_handler_and_other_exits_count_as_progress() {
    let m = Machine::new(VcpuAction::Continue);
    let mut h = Recorder::answering(Outcome::Resume);
    assert!(matches!(m.run(Exit::DirtyRingFull, &mut h), Next::Continue));
    assert!(matches!(m.run(Exit::DirtyRingFull, &mut h), Next::Continue));
    assert_eq!(h.progress, 0, "a ring-full exit is not progress");
    assert!(matches!(m.run(Exit::Nothing, &mut h), Next::Continue));
    assert!(matches!(
        m.run(Exit::IoOut(0x80, &[0]), &mut h),
        Next::Continue
    ));
    assert_eq!(h.progress, 2);
    assert_eq!(h.calls, ["ring full", "ring full"]);

    let msg = fault_text(m.run(Exit::DirtyRingFull, &mut Recorder::default()));
    assert_eq!(
        msg,
        "vcpu3: KVM_EXIT_DIRTY_RING_FULL on a VM without dirty rings"
    );
    let mut h = Recorder::answering(Outcome::Stop("overflowed".into()));
    assert_eq!(
        fault_text(m.run(Exit::DirtyRingFull, &mut h)),
        "vcpu3: overflowed"
    );
}

#[test]
fn emulation_failures_go_to_the_handler_with_their_bytes_and_else_are_internal_errors() {
    let m = Machine::new(VcpuAction::Continue);
    let bytes = [0x66, 0x0f, 0x62, 0x05];
    let failure = || Exit::EmulationFailure {
        cpu: &Cpu,
        insn: Some(&bytes),
    };
    let mut h = Recorder::answering(Outcome::Resume);
    assert!(matches!(m.run(failure(), &mut h), Next::Continue));
    assert_eq!(h.calls, ["emulation 0x4000 Some([66, 0f, 62, 05])"]);
    assert!(matches!(
        m.run(failure(), &mut Recorder::default()),
        Next::InternalError
    ));
    let mut h = Recorder::answering(Outcome::StopWithRegisters("cannot decode".into()));
    assert!(matches!(m.run(failure(), &mut h), Next::Fault(msg) if msg == "cannot decode"));
    // Other internal errors never reach the handler.
    let mut h = Recorder::answering(Outcome::Resume);
    assert!(matches!(
        m.run(Exit::InternalError, &mut h),
        Next::InternalError
    ));
    assert!(h.calls.is_empty());
}

#[test]
fn exits_that_end_the_guest_say_why() {
    let m = Machine::new(VcpuAction::Continue);
    let mut h = Recorder::answering(Outcome::Resume);
    let shutdown = kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN;
    let reset = kvm_bindings::KVM_SYSTEM_EVENT_RESET;
    assert!(matches!(
        m.run(Exit::SystemEvent(shutdown), &mut h),
        Next::Stop(VcpuStop::Poweroff)
    ));
    assert!(matches!(
        m.run(Exit::SystemEvent(reset), &mut h),
        Next::Stop(VcpuStop::Reset)
    ));
    let crash = fault_text(m.run(Exit::SystemEvent(5), &mut h));
    assert!(crash.contains("guest system event 5"), "{crash}");
    let hlt = fault_text(m.run(Exit::Hlt, &mut h));
    assert!(hlt.starts_with("vcpu3: KVM_EXIT_HLT"), "{hlt}");
    assert!(matches!(m.run(Exit::Shutdown, &mut h), Next::Fault(m) if m.contains("triple fault")));
    assert!(
        matches!(m.run(Exit::FailEntry(0x21), &mut h), Next::Fault(m) if m.contains("reason 0x21"))
    );
    let raw = fault_text(m.run(Exit::Unsupported(77), &mut h));
    assert_eq!(raw, "vcpu3: unhandled KVM exit reason 77");
    let odd = fault_text(m.run(Exit::Unexpected("Debug".into()), &mut h));
    assert_eq!(odd, "vcpu3: unexpected KVM exit Debug");
    assert!(h.calls.is_empty(), "{:?}", h.calls);
}
