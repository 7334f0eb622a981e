//! These run on /dev/kvm: real VMs, real vCPUs, a tiny real guest. On PVM the guest's CPL0 code
//! is emulated (PLATFORM.md §1), so the payload is a handful of instructions.

use guest_abi::layout;
use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::boot::{paging, EntryPoint};
use crate::host::HostKind;
use crate::memory::GuestRam;
use crate::vstate::vm::Vm;
use crate::vstate::{cpuid, regs};

const RAM: u64 = 8 << 20;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_KVM_WALL_CLOCK_NEW: u32 = 0x4b56_4d00;
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const APIC_LVTT: usize = 0x320;
const APIC_LVT_TIMER_TSCDEADLINE: u32 = 2 << 17;
const APIC_LVT_MASKED: u32 = 1 << 16;

/// A VM with RAM and one vCPU. Fields drop in order: the vCPU and VM before the RAM they map.
struct Guest {
    vcpu: VcpuFd,
    vm: Vm,
    ram: GuestRam,
}

impl Guest {
    /// A VM as the destination of a migration creates it: nothing set up in the vCPU.
    fn fresh() -> Guest {
        let ram = GuestRam::new(RAM).unwrap();
        let vm = Vm::new(ram.size()).unwrap();
        vm.register_ram(&ram).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        Guest { vcpu, vm, ram }
    }

    /// A VM set up as vmm boots a bare-metal payload: long mode, CPL0, identity map.
    fn booted(payload: &[u8]) -> Guest {
        let g = Guest::fresh();
        let mem = g.ram.memory();
        regs::write_descriptor_tables(mem).unwrap();
        paging::write_identity_map(mem, false).unwrap();
        mem.write_slice(payload, GuestAddress(layout::MICRO_LOAD_GPA))
            .unwrap();
        let cpuid = cpuid::for_vcpu(g.vm.kvm(), 0, 1, g.vm.phys_bits()).unwrap();
        g.vcpu.set_cpuid2(&cpuid).unwrap();
        regs::setup_msrs(&g.vcpu).unwrap();
        regs::setup_fpu(&g.vcpu).unwrap();
        regs::setup_lint(&g.vcpu).unwrap();
        regs::setup_boot_sregs(&g.vcpu).unwrap();
        let entry = EntryPoint {
            rip: layout::MICRO_LOAD_GPA,
            rsp: layout::BOOT_STACK_GPA,
            rsi: 0,
        };
        regs::setup_boot_regs(&g.vcpu, &entry).unwrap();
        g
    }

    fn save(&self) -> (VmState, VcpuState) {
        let vm = save_vm(self.vm.fd()).unwrap();
        let vcpu = save_vcpu(self.vm.kvm(), &self.vcpu).unwrap();
        (vm, vcpu)
    }

    /// Copies all of this guest's RAM into `dst` (the stop-and-copy, minus the network).
    fn copy_ram_to(&self, dst: &Guest) {
        let mut buf = vec![0u8; RAM as usize];
        self.ram
            .memory()
            .read_slice(&mut buf, GuestAddress(0))
            .unwrap();
        dst.ram.memory().write_slice(&buf, GuestAddress(0)).unwrap();
    }
}

/// Through JSON, as the state travels.
fn wire<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
    serde_json::from_str(&serde_json::to_string(v).unwrap()).unwrap()
}

fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

fn set_msr(vcpu: &VcpuFd, index: u32, data: u64) {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(vcpu.set_msrs(&msrs).unwrap(), 1, "MSR 0x{index:x} refused");
}

fn get_msr(vcpu: &VcpuFd, index: u32) -> u64 {
    let (read, _) = vcpu_state::read_msrs(vcpu, &[index]).unwrap();
    read[0].data
}

/// Whether KVM_SET_MSRS of MSR_IA32_TSC moves this vCPU's TSC. On hardware KVM it does (TSC
/// offsetting). On PVM the guest TSC is the host TSC: a guest's RDTSC runs natively at CPL3
/// and the write is accepted but has no effect (measured).
fn tsc_follows_writes(vcpu: &VcpuFd) -> bool {
    set_msr(vcpu, MSR_IA32_TSC, 1 << 40);
    get_msr(vcpu, MSR_IA32_TSC).abs_diff(1 << 40) < 1 << 36
}

fn lapic_reg(lapic: &kvm_bindings::kvm_lapic_state, off: usize) -> u32 {
    let b = |i: usize| lapic.regs[off + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(lapic: &mut kvm_bindings::kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[off + i] = *byte as std::os::raw::c_char;
    }
}

/// What `save_vcpu` keeps agrees with what this KVM offers: each optional piece is saved exactly
/// when its capability (for XSAVE, the ioctl itself) says this KVM has it, holds what KVM
/// reports for the idle vCPU, and every MSR is saved exactly when the vCPU reads it on its own.
/// Which pieces a host has is not asserted (PLATFORM.md §10: machines of this kind differ), only
/// that the saved state neither drops nor invents any.
#[test]
fn saved_state_holds_exactly_what_this_kvm_offers() {
    let g = Guest::fresh();
    let kvm = g.vm.kvm();
    let fd = &g.vcpu;
    let state = save_vcpu(kvm, fd).unwrap();
    let cap = |c: u32| kvm.check_extension_raw(c.into()) > 0;
    eprintln!("host: {}", g.vm.host_kind());

    // XSAVE, or the legacy FPU area where the vCPU refuses KVM_GET_XSAVE: exactly one of them.
    let legacy = fd.get_xsave();
    assert_eq!(
        state.xsave.is_some(),
        legacy.is_ok(),
        "KVM_GET_XSAVE: {legacy:?}"
    );
    assert_eq!(state.fpu.is_some(), state.xsave.is_none());
    if let (Some(area), Ok(legacy)) = (&state.xsave, &legacy) {
        // The KVM_CAP_XSAVE2 size, never less than the legacy 4 KiB area.
        let xsave2 = usize::try_from(kvm.check_extension_int(kvm_ioctls::Cap::Xsave2)).unwrap();
        let legacy_words = legacy.region.len();
        assert_eq!(area.len(), xsave2.div_ceil(4).max(legacy_words));
        assert_eq!(
            area[..legacy_words],
            legacy.region[..],
            "the legacy part of the area"
        );
    }
    if let Some(fpu) = state.fpu {
        assert_eq!(fpu, FpuState::from(fd.get_fpu().unwrap()));
    }
    assert_eq!(
        state.xcrs.is_some(),
        cap(kvm_bindings::KVM_CAP_XCRS),
        "XCRs saved / KVM_CAP_XCRS"
    );
    if let Some(xcrs) = state.xcrs {
        assert_eq!(xcrs, fd.get_xcrs().unwrap());
    }
    assert_eq!(
        state.debugregs.is_some(),
        cap(kvm_bindings::KVM_CAP_DEBUGREGS),
        "debug registers saved / KVM_CAP_DEBUGREGS"
    );
    if let Some(debugregs) = state.debugregs {
        assert_eq!(debugregs, fd.get_debug_regs().unwrap());
    }
    assert_eq!(
        state.vcpu_events.is_some(),
        cap(kvm_bindings::KVM_CAP_VCPU_EVENTS),
        "vCPU events saved / KVM_CAP_VCPU_EVENTS"
    );
    if let Some(events) = state.vcpu_events {
        assert_eq!(events, fd.get_vcpu_events().unwrap());
    }
    // Saved where KVM reports a frequency; a KVM that has the ioctl may still refuse it.
    let khz = cap(kvm_bindings::KVM_CAP_GET_TSC_KHZ)
        .then(|| fd.get_tsc_khz().ok())
        .flatten();
    assert_eq!(state.tsc_khz, khz, "TSC kHz saved / KVM_GET_TSC_KHZ");

    // MSRs: each index once, and each one KVM lists saved exactly when a KVM_GET_MSRS of that
    // MSR alone reads it. Those saved beyond the list (MTRRs, TSC_AUX) must be readable too.
    let readable = |index: u32| {
        let mut one = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .unwrap();
        fd.get_msrs(&mut one).unwrap() == 1
    };
    let list = kvm.get_msr_index_list().unwrap();
    let saved: Vec<u32> = state.msrs.iter().map(|m| m.index).collect();
    let mut unique = saved.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), saved.len(), "an MSR saved twice: {saved:x?}");
    let wrong: Vec<(u32, bool)> = list
        .as_slice()
        .iter()
        .map(|&i| (i, readable(i)))
        .filter(|&(i, read)| saved.contains(&i) != read)
        .collect();
    assert!(
        wrong.is_empty(),
        "(MSR, readable alone) saved wrongly: {wrong:x?}"
    );
    let invented: Vec<u32> = saved.iter().copied().filter(|&i| !readable(i)).collect();
    assert!(invented.is_empty(), "saved but unreadable: {invented:x?}");
    eprintln!(
        "  MSRs: {} listed, {} saved ({} beyond the list)",
        list.as_slice().len(),
        saved.len(),
        saved
            .iter()
            .filter(|i| !list.as_slice().contains(i))
            .count()
    );
    // What migration cannot do without, on any KVM: the TSC and kvmclock.
    assert!(state.msr(MSR_IA32_TSC).is_some());
    assert!(state.msr(MSR_KVM_SYSTEM_TIME_NEW).is_some());
    assert!(state.msr(MSR_KVM_WALL_CLOCK_NEW).is_some());
}

/// Puts state into A that a fresh vCPU does not have, so the round trip proves something:
/// kvmclock on, the wall clock written, the LAPIC timer in TSC-deadline mode with a deadline
/// far ahead, a TSC value of our own. Returns the deadline.
fn make_state_interesting(g: &Guest) -> u64 {
    set_msr(&g.vcpu, MSR_IA32_TSC, 1 << 40);
    set_msr(&g.vcpu, MSR_KVM_WALL_CLOCK_NEW, 0x3000);
    set_msr(&g.vcpu, MSR_KVM_SYSTEM_TIME_NEW, 0x4000 | 1);
    let mut lapic = g.vcpu.get_lapic().unwrap();
    set_lapic_reg(
        &mut lapic,
        APIC_LVTT,
        APIC_LVT_TIMER_TSCDEADLINE | APIC_LVT_MASKED | 0xec,
    );
    g.vcpu.set_lapic(&lapic).unwrap();
    // About 400 s ahead at the host's rate: it cannot fire during the test.
    let deadline = get_msr(&g.vcpu, MSR_IA32_TSC) + (1 << 40);
    set_msr(&g.vcpu, MSR_IA32_TSC_DEADLINE, deadline);
    let mut regs = g.vcpu.get_regs().unwrap();
    regs.rax = 0x1122_3344_5566_7788;
    regs.r15 = 0xfeed;
    g.vcpu.set_regs(&regs).unwrap();
    deadline
}

#[test]
fn save_json_restore_save_is_equal() {
    // Arrange: a booted, configured VM A and a fresh VM B.
    let a = Guest::booted(&[0xf4]);
    let deadline = make_state_interesting(&a);
    let b = Guest::fresh();

    // Act: save A, send through JSON, restore into B, save B.
    let (vm_a, cpu_a) = a.save();
    let (vm_sent, cpu_sent) = (wire(&vm_a), wire(&cpu_a));
    restore_vm(b.vm.fd(), &vm_sent).unwrap();
    restore_vcpu(&b.vcpu, &cpu_sent).unwrap();
    let (vm_b, cpu_b) = b.save();

    // Assert: everything that does not move by itself is equal.
    assert_eq!(cpu_b.cpuid, cpu_a.cpuid);
    assert_eq!(cpu_b.mp_state, cpu_a.mp_state);
    assert_eq!(cpu_b.regs, cpu_a.regs);
    assert_eq!(cpu_b.sregs, cpu_a.sregs);
    assert_eq!(cpu_b.xsave, cpu_a.xsave);
    assert_eq!(cpu_b.fpu, cpu_a.fpu);
    assert_eq!(cpu_b.xcrs, cpu_a.xcrs);
    assert_eq!(cpu_b.debugregs, cpu_a.debugregs);
    assert_eq!(json(&cpu_b.vcpu_events), json(&cpu_a.vcpu_events));
    assert_eq!(cpu_b.tsc_khz, cpu_a.tsc_khz);
    assert_eq!(cpu_b.lapic.regs[..], cpu_a.lapic.regs[..]);
    assert_eq!(
        lapic_reg(&cpu_b.lapic, APIC_LVTT) & (3 << 17),
        APIC_LVT_TIMER_TSCDEADLINE
    );
    let index = |s: &VcpuState| s.msrs.iter().map(|m| m.index).collect::<Vec<_>>();
    assert_eq!(index(&cpu_b), index(&cpu_a));
    // The TSC runs on between the two saves; everything else stays put.
    let khz = u64::from(cpu_a.tsc_khz.unwrap_or(1_000_000));
    for (ma, mb) in cpu_a.msrs.iter().zip(&cpu_b.msrs) {
        if ma.index == MSR_IA32_TSC {
            assert!(
                mb.data >= ma.data && mb.data - ma.data < 10_000 * khz,
                "TSC went from 0x{:x} to 0x{:x}",
                ma.data,
                mb.data
            );
        } else {
            assert_eq!(mb, ma, "MSR 0x{:x}", ma.index);
        }
    }
    assert_eq!(
        cpu_b.msr(MSR_KVM_SYSTEM_TIME_NEW),
        Some(0x4000 | 1),
        "kvmclock"
    );
    assert_eq!(cpu_b.msr(MSR_KVM_WALL_CLOCK_NEW), Some(0x3000));
    // Not in KVM's list, set by regs::setup_msrs: MTRR default type write-back, enabled.
    assert_eq!(cpu_b.msr(MSR_MTRR_DEF_TYPE), Some(0x806));
    assert_eq!(
        cpu_b.msr(MSR_IA32_TSC_DEADLINE),
        Some(deadline),
        "TSC deadline"
    );

    assert_eq!(json(&vm_b.pic_master), json(&vm_a.pic_master));
    assert_eq!(json(&vm_b.pic_slave), json(&vm_a.pic_slave));
    assert_eq!(json(&vm_b.ioapic), json(&vm_a.ioapic));
    // KVM_SET_PIT2 reloads each channel's count "now": only the load time differs.
    for (ca, cb) in vm_a.pit.channels.iter().zip(&vm_b.pit.channels) {
        let strip = |c: &kvm_bindings::kvm_pit_channel_state| {
            let mut c = *c;
            c.count_load_time = 0;
            json(&c)
        };
        assert_eq!(strip(cb), strip(ca));
    }
    assert_eq!(vm_b.pit.flags, vm_a.pit.flags);
    // The clock resumes where it was saved (no KVM_CLOCK_REALTIME here) and runs on.
    assert!(
        vm_b.clock.clock >= vm_a.clock.clock
            && vm_b.clock.clock - vm_a.clock.clock < 10_000_000_000,
        "kvmclock went from {} to {}",
        vm_a.clock.clock,
        vm_b.clock.clock
    );
}

/// The payload: a loop that reports a counter (OUT 0x80), asks the VMM for a number (IN 0x84),
/// adds it to RBX and stores RBX at 0x200000. Eight instructions, so the emulator is quick.
const PORT_COUNTER: u16 = 0x80;
const PORT_INPUT: u16 = 0x84;
const SUM_GPA: u64 = 0x20_0000;
#[rustfmt::skip]
const PAYLOAD: [u8; 22] = [
    0x48, 0xff, 0xc1,                               // loop: inc rcx
    0x89, 0xc8,                                     //       mov eax, ecx
    0xe7, 0x80,                                     //       out 0x80, eax
    0xe5, 0x84,                                     //       in eax, 0x84
    0x48, 0x01, 0xc3,                               //       add rbx, rax
    0x48, 0x89, 0x1c, 0x25, 0x00, 0x00, 0x20, 0x00, //       mov [0x200000], rbx
    0xeb, 0xea,                                     //       jmp loop
];
/// Where RIP is once the OUT, or the IN, has completed.
const AFTER_OUT: u64 = 7;
const AFTER_IN: u64 = 9;

/// What the VMM answers to the `n`th IN: distinct, so a lost or repeated IN shows in the sum.
fn input(n: u32) -> u32 {
    n * 7 + 3
}

/// The two exits of one loop iteration, in the order the guest makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    Counter,
    Input,
}

/// Runs the payload from iteration `n`, whose next exit must be `next`, checking that exits
/// alternate (OUT n, IN n, OUT n+1, ...) and answering each IN, until the exit `stop` arrives.
/// Returns with that exit handled but not yet completed by KVM.
fn run_payload(vcpu: &mut VcpuFd, mut n: u32, mut next: Port, stop: (u32, Port)) {
    loop {
        let this = next;
        match (vcpu.run().unwrap(), this) {
            (VcpuExit::IoOut(PORT_COUNTER, data), Port::Counter) => {
                let got = u32::from_le_bytes(data.try_into().unwrap());
                assert_eq!(got, n, "the guest's counter");
                next = Port::Input;
            }
            (VcpuExit::IoIn(PORT_INPUT, data), Port::Input) => {
                data.copy_from_slice(&input(n).to_le_bytes());
                next = Port::Counter;
            }
            (other, _) => {
                let exit = format!("{other:?}");
                panic!(
                    "iteration {n}: expected the {this:?} exit, got {exit}\n{}",
                    crate::vstate::vcpu::describe_state(vcpu)
                )
            }
        }
        if (n, this) == stop {
            return;
        }
        if this == Port::Input {
            n += 1;
        }
    }
}

/// Runs the payload on VM A until exit `pause` is pending, completes it, moves the VM to a
/// fresh VM B through JSON and a RAM copy, and runs B to iteration `end`. Checks the guest's
/// registers, memory and TSC on the way.
fn migrate_mid_loop(pause: (u32, Port), end: u32) {
    let expected_sum = |upto: u32| (1..=upto).map(|n| u64::from(input(n))).sum::<u64>();
    let (at, port) = pause;

    // Arrange: run on A until the exit is pending, then let KVM finish the instruction.
    let mut a = Guest::booted(&PAYLOAD);
    // A TSC far from where B's own starts (0 at creation), so B shows whose it runs on.
    let tsc_virtual = tsc_follows_writes(&a.vcpu);
    run_payload(&mut a.vcpu, 1, Port::Counter, pause);
    complete_pending_io(&mut a.vcpu).unwrap();
    let regs = a.vcpu.get_regs().unwrap();
    let (rip, rax) = match port {
        Port::Counter => (AFTER_OUT, u64::from(at)),
        Port::Input => (AFTER_IN, u64::from(input(at))),
    };
    assert_eq!(
        regs.rip,
        layout::MICRO_LOAD_GPA + rip,
        "instruction completed"
    );
    assert_eq!(regs.rax, rax);
    assert_eq!(regs.rcx, u64::from(at));
    // Nothing is pending any more: a second call is harmless.
    complete_pending_io(&mut a.vcpu).unwrap();
    assert_eq!(a.vcpu.get_regs().unwrap(), regs);

    // Act: save A, move state and RAM to a fresh VM B, drop A, restore and run B.
    let (vm_state, cpu_state) = a.save();
    let (vm_state, cpu_state) = (wire(&vm_state), wire(&cpu_state));
    let mut b = Guest::fresh();
    a.copy_ram_to(&b);
    drop(a);
    restore_vm(b.vm.fd(), &vm_state).unwrap();
    restore_vcpu(&b.vcpu, &cpu_state).unwrap();
    assert_eq!(b.vcpu.get_regs().unwrap(), regs);
    // B's first exit is the one after the paused one: the completed access is neither lost
    // nor repeated.
    let (n, next) = match port {
        Port::Counter => (at, Port::Input),
        Port::Input => (at + 1, Port::Counter),
    };
    run_payload(&mut b.vcpu, n, next, (end, Port::Counter));
    complete_pending_io(&mut b.vcpu).unwrap();

    // Assert: registers and memory show one uninterrupted run.
    let regs = b.vcpu.get_regs().unwrap();
    assert_eq!(regs.rcx, u64::from(end));
    assert_eq!(
        regs.rbx,
        expected_sum(end - 1),
        "RBX: every input added once"
    );
    let stored: u64 = b.ram.memory().read_obj(GuestAddress(SUM_GPA)).unwrap();
    assert_eq!(stored, expected_sum(end - 1), "the sum in guest memory");
    // The guest's TSC continued from A's (and, where KVM offsets the TSC, not from B's own).
    let after = save_vcpu(b.vm.kvm(), &b.vcpu).unwrap();
    let (tsc_a, tsc_b) = (
        cpu_state.msr(MSR_IA32_TSC).unwrap(),
        after.msr(MSR_IA32_TSC).unwrap(),
    );
    let khz = u64::from(cpu_state.tsc_khz.unwrap_or(1_000_000));
    assert!(
        tsc_b > tsc_a && tsc_b - tsc_a < 60_000 * khz,
        "TSC 0x{tsc_a:x} on A, 0x{tsc_b:x} on B"
    );
    if tsc_virtual {
        assert!(
            tsc_a.abs_diff(1 << 40) < 60_000 * khz,
            "A's TSC 0x{tsc_a:x}"
        );
    } else {
        // Only PVM may ignore the TSC: on hardware KVM this is a bug.
        assert_eq!(HostKind::detect(), HostKind::Pvm, "TSC writes ignored");
        eprintln!("PVM: the guest TSC is the host TSC; restoring MSR_IA32_TSC has no effect");
    }
}

#[test]
fn guest_paused_on_an_in_continues_on_a_second_vm() {
    migrate_mid_loop((25, Port::Input), 40);
}

#[test]
fn guest_paused_on_an_out_continues_on_a_second_vm() {
    migrate_mid_loop((25, Port::Counter), 40);
}

/// A valid state to corrupt: saved from a booted vCPU.
fn saved_state() -> VcpuState {
    let g = Guest::booted(&[0xf4]);
    save_vcpu(g.vm.kvm(), &g.vcpu).unwrap()
}

fn assert_invalid(r: Result<(), StateError>, needle: &str) {
    match r {
        Err(StateError::Invalid(m)) => assert!(m.contains(needle), "{m}"),
        other => panic!("expected Invalid({needle}), got {other:?}"),
    }
}

#[test]
fn restore_rejects_odd_input_before_touching_the_vcpu() {
    let good = saved_state();
    let b = Guest::fresh();
    let before = b.vcpu.get_regs().unwrap();
    let bad = |f: &dyn Fn(&mut VcpuState)| {
        let mut s = good.clone();
        f(&mut s);
        restore_vcpu(&b.vcpu, &s)
    };

    assert_invalid(bad(&|s| s.cpuid.clear()), "0 CPUID entries");
    assert_invalid(
        bad(&|s| s.cpuid = vec![s.cpuid[0]; 1000]),
        "1000 CPUID entries",
    );
    assert_invalid(bad(&|s| s.xsave = Some(vec![0; 10])), "10 words");
    assert_invalid(
        bad(&|s| {
            let mut area = s.xsave.clone().unwrap();
            area.resize(100_000, 0);
            area[99_999] = 1;
            s.xsave = Some(area);
        }),
        "beyond",
    );
    assert_invalid(
        bad(&|s| {
            s.xsave = None;
            s.fpu = None;
        }),
        "neither",
    );
    assert_invalid(
        bad(&|s| {
            s.msrs = vec![
                Msr {
                    index: 0x10,
                    data: 0
                };
                5000
            ]
        }),
        "5000 MSRs",
    );
    // None of that reached KVM.
    assert_eq!(b.vcpu.get_regs().unwrap(), before);
    // State from a wire that garbled a fixed-size structure: kvm-bindings pads or truncates,
    // so it still parses, and restoring it cannot panic.
    let mut v = json(&good);
    v["lapic"] = serde_json::json!([1, 2, 3]);
    let odd: VcpuState = serde_json::from_value(v).unwrap();
    let _ = restore_vcpu(&b.vcpu, &odd);
}

#[test]
fn restore_names_the_msr_kvm_refuses() {
    let mut s = saved_state();
    s.msrs.insert(
        3,
        Msr {
            index: 0xdead_beef,
            data: 5,
        },
    );
    let b = Guest::fresh();
    match restore_vcpu(&b.vcpu, &s) {
        Err(
            e @ StateError::MsrRefused {
                index, accepted, ..
            },
        ) => {
            assert_eq!(index, 0xdead_beef);
            assert_eq!(accepted, 3);
            assert!(e.to_string().contains("0xdeadbeef"), "{e}");
        }
        other => panic!("expected MsrRefused, got {other:?}"),
    }
}

#[test]
fn a_larger_zero_padded_xsave_area_is_accepted() {
    let mut s = saved_state();
    let area = s.xsave.as_mut().expect("this host has XSAVE");
    let words = area.len();
    area.resize(words + 512, 0);
    let b = Guest::fresh();
    restore_vcpu(&b.vcpu, &s).unwrap();
    let again = save_vcpu(b.vm.kvm(), &b.vcpu).unwrap();
    assert_eq!(again.xsave.unwrap().len(), words);
}

#[test]
fn the_fpu_fallback_restores_the_legacy_state() {
    // A state as a KVM without XSAVE saves it.
    let a = Guest::booted(&[0xf4]);
    let mut fpu = a.vcpu.get_fpu().unwrap();
    fpu.fcw = 0x27f;
    fpu.xmm[3] = [0xab; 16];
    fpu.mxcsr = 0x1fa0;
    a.vcpu.set_fpu(&fpu).unwrap();
    // KVM_GET/SET_FPU leave MXCSR out (KVM never copies kvm_fpu.mxcsr): compare with what
    // KVM reports, not with what was written.
    let fpu = a.vcpu.get_fpu().unwrap();
    eprintln!("MXCSR through KVM_SET_FPU/KVM_GET_FPU: 0x{:x}", fpu.mxcsr);
    let mut s = save_vcpu(a.vm.kvm(), &a.vcpu).unwrap();
    s.xsave = None;
    s.fpu = Some(fpu.into());

    let b = Guest::fresh();
    restore_vcpu(&b.vcpu, &wire(&s)).unwrap();
    assert_eq!(
        FpuState::from(b.vcpu.get_fpu().unwrap()),
        FpuState::from(fpu)
    );
}

#[test]
fn vm_restore_checks_chip_ids() {
    let a = Guest::fresh();
    let mut s = save_vm(a.vm.fd()).unwrap();
    s.pic_slave.chip_id = 7;
    let b = Guest::fresh();
    assert_invalid(restore_vm(b.vm.fd(), &s), "chip id 7");
}

#[test]
fn complete_pending_io_on_an_idle_vcpu_is_harmless() {
    let mut g = Guest::booted(&PAYLOAD);
    let before = g.vcpu.get_regs().unwrap();
    complete_pending_io(&mut g.vcpu).unwrap();
    assert_eq!(g.vcpu.get_regs().unwrap(), before);
    // The flag is cleared again: the next KVM_RUN enters the guest.
    assert!(matches!(
        g.vcpu.run().unwrap(),
        VcpuExit::IoOut(PORT_COUNTER, _)
    ));
}

#[test]
fn errors_expose_the_errno() {
    let e = StateError::Ioctl {
        ioctl: "KVM_SET_MSRS",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    };
    assert_eq!(e.errno(), Some(libc::EINVAL));
    assert!(e.to_string().starts_with("KVM_SET_MSRS failed"), "{e}");
    assert_eq!(StateError::Invalid("x".into()).errno(), None);
}

#[test]
fn save_skips_msrs_kvm_will_not_read() {
    let g = Guest::booted(&[0xf4]);
    // Refused ones first, in the middle, last, and twice in a row; a batch boundary too.
    let mut indices = vec![0xdead_0001, MSR_IA32_TSC, 0xdead_0002, 0xdead_0003];
    indices.extend(std::iter::repeat_n(MSR_MTRR_DEF_TYPE, 300));
    indices.push(0xdead_0004);
    let (read, refused) = vcpu_state::read_msrs(&g.vcpu, &indices).unwrap();
    assert_eq!(
        refused,
        [0xdead_0001, 0xdead_0002, 0xdead_0003, 0xdead_0004]
    );
    assert_eq!(read.len(), 301);
    assert_eq!(read[0].index, MSR_IA32_TSC);
    assert!(read[1..].iter().all(|m| *m
        == Msr {
            index: MSR_MTRR_DEF_TYPE,
            data: 0x806
        }));
}
