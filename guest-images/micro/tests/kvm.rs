//! Runs the payload on /dev/kvm in a minimal VM set up exactly as the crate's entry contract
//! says (and no more: a plain TSS without an I/O bitmap, an empty IDT), and checks every write
//! against the model. Skips, saying why, where /dev/kvm cannot be used.
//!
//! This is also an executable description of the state the VMM must give the payload.

use std::time::{Duration, Instant};

use guest_abi::{gdt, layout, micro, ports};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use micro_guest::exit_status::*;
use micro_guest::{Pattern, Workload, MAILBOX_SIZE, PAYLOAD};

const MEM_SIZE: usize = 64 << 20;

/// Guest RAM: an anonymous mapping, unmapped on drop.
struct Ram {
    ptr: *mut u8,
}

impl Ram {
    fn new() -> Ram {
        // SAFETY: a fresh anonymous private mapping.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap guest RAM");
        Ram { ptr: ptr.cast() }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is MEM_SIZE bytes and lives as long as self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, MEM_SIZE) }
    }

    fn write_u64(&mut self, gpa: u64, value: u64) {
        let at = gpa as usize;
        self.bytes()[at..at + 8].copy_from_slice(&value.to_le_bytes());
    }

    fn read_u64(&mut self, gpa: u64) -> u64 {
        let at = gpa as usize;
        u64::from_le_bytes(self.bytes()[at..at + 8].try_into().expect("8 bytes"))
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), MEM_SIZE) };
    }
}

struct MicroVm {
    ram: Ram,
    // Dropped before `ram`, which KVM maps.
    vcpu: VcpuFd,
    _vm: VmFd,
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// The exit port was written.
    Exit,
    /// `stop_after` pass reports were seen.
    Stopped,
    Halted,
    Other(String),
}

struct Outcome {
    events: Vec<(u16, u32)>,
    end: End,
    cpl: u8,
}

fn code_segment(selector: u16, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: 0xb,
        present: 1,
        dpl,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    }
}

fn data_segment(selector: u16) -> kvm_segment {
    kvm_segment {
        type_: 0x3,
        db: 1,
        l: 0,
        ..code_segment(selector, 0)
    }
}

impl MicroVm {
    /// A VM in the entry state with `mailbox` in place; None (and a note) without /dev/kvm.
    fn new(mailbox: &[u8; MAILBOX_SIZE]) -> Option<MicroVm> {
        let kvm = match Kvm::new() {
            Ok(kvm) => kvm,
            Err(e) => {
                eprintln!("skipped: /dev/kvm: {e}");
                return None;
            }
        };
        let vm = kvm.create_vm().expect("create VM");
        let mut ram = Ram::new();
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: ram.ptr as u64,
        };
        // SAFETY: the region is backed by `ram`, which outlives the VM (field order).
        unsafe { vm.set_user_memory_region(region) }.expect("memslot");

        // GDT: kernel code/data, a busy 64-bit TSS with no I/O bitmap (limit 0x67), user data
        // and 64-bit code at DPL3.
        let g = layout::GDT_GPA;
        let tss = layout::TSS_GPA;
        ram.write_u64(g + u64::from(gdt::KERNEL_CS), 0x00af_9b00_0000_ffff);
        ram.write_u64(g + u64::from(gdt::KERNEL_DS), 0x00cf_9300_0000_ffff);
        let tss_lo = 0x67 | (tss & 0xff_ffff) << 16 | 0x8b << 40 | (tss >> 24 & 0xff) << 56;
        ram.write_u64(g + u64::from(gdt::TSS), tss_lo);
        ram.write_u64(g + u64::from(gdt::TSS) + 8, tss >> 32);
        ram.write_u64(g + u64::from(gdt::USER_DS & !3), 0x00cf_f300_0000_ffff);
        ram.write_u64(g + u64::from(gdt::USER_CS & !3), 0x00af_fb00_0000_ffff);

        // Identity map of 4 GiB with 2 MiB pages; U/S on every level.
        const PRESENT_RW_USER: u64 = 0x7;
        const HUGE: u64 = 0x80;
        ram.write_u64(layout::PML4_GPA, layout::PDPT_GPA | PRESENT_RW_USER);
        for pd in 0..layout::PD_COUNT {
            let pd_gpa = layout::PD_GPA + pd * 4096;
            ram.write_u64(layout::PDPT_GPA + pd * 8, pd_gpa | PRESENT_RW_USER);
            for i in 0..512 {
                let gpa = (pd * 512 + i) << 21;
                ram.write_u64(pd_gpa + i * 8, gpa | HUGE | PRESENT_RW_USER);
            }
        }

        let load = layout::MICRO_LOAD_GPA as usize;
        ram.bytes()[load..load + PAYLOAD.len()].copy_from_slice(PAYLOAD);
        let mb = layout::MICRO_MAILBOX_GPA as usize;
        ram.bytes()[mb..mb + MAILBOX_SIZE].copy_from_slice(mailbox);

        let vcpu = vm.create_vcpu(0).expect("vCPU");
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("CPUID");
        vcpu.set_cpuid2(&cpuid).expect("set CPUID");
        let mut sregs = vcpu.get_sregs().expect("sregs");
        sregs.cs = code_segment(gdt::KERNEL_CS, 0);
        let ds = data_segment(gdt::KERNEL_DS);
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (ds, ds, ds, ds, ds);
        sregs.tr = kvm_segment {
            base: tss,
            limit: 0x67,
            selector: gdt::TSS,
            type_: 0xb,
            present: 1,
            ..Default::default()
        };
        sregs.gdt.base = g;
        sregs.gdt.limit = (gdt::ENTRIES * 8 - 1) as u16;
        sregs.idt.base = layout::IDT_GPA;
        sregs.idt.limit = 0;
        sregs.cr3 = layout::PML4_GPA;
        sregs.cr4 = 1 << 5; // PAE
        sregs.cr0 = 1 | 1 << 4 | 1 << 5 | 1 << 31; // PE, ET, NE, PG
        sregs.efer = 1 << 8 | 1 << 10; // LME, LMA
        vcpu.set_sregs(&sregs).expect("set sregs");
        let mut regs = vcpu.get_regs().expect("regs");
        regs.rip = layout::MICRO_LOAD_GPA;
        regs.rsp = layout::BOOT_STACK_GPA;
        regs.rflags = 0x2;
        vcpu.set_regs(&regs).expect("set regs");
        Some(MicroVm { ram, vcpu, _vm: vm })
    }

    /// Runs until the exit port, a halt, anything unexpected, or `stop_after` passes.
    fn run(&mut self, stop_after: Option<u32>) -> Outcome {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut events = Vec::new();
        let end = loop {
            if Instant::now() > deadline {
                break End::Other("timeout".into());
            }
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    let mut v = [0; 4];
                    let n = data.len().min(4);
                    v[..n].copy_from_slice(&data[..n]);
                    events.push((port, u32::from_le_bytes(v)));
                    if port == ports::MICRO_EXIT {
                        break End::Exit;
                    }
                    if port == ports::MICRO_PASS && Some(events.len() as u32) == stop_after {
                        break End::Stopped;
                    }
                }
                Ok(VcpuExit::Hlt) => break End::Halted,
                Ok(other) => break End::Other(format!("{other:?}")),
                Err(e) => break End::Other(format!("KVM_RUN: {e}")),
            }
        };
        let cpl = self.vcpu.get_sregs().map_or(u8::MAX, |s| s.cs.dpl);
        Outcome { events, end, cpl }
    }

    fn image(&mut self, w: &Workload) -> Vec<u64> {
        (0..w.pages())
            .map(|page| self.ram.read_u64(w.page_gpa(page)))
            .collect()
    }
}

fn pass_events(passes: u64) -> Vec<(u16, u32)> {
    (1..=passes)
        .map(|p| (ports::MICRO_PASS, p as u32))
        .collect()
}

#[test]
fn payload_matches_the_model_under_kvm() {
    for (pattern, pages, passes, param) in [
        (Pattern::Sweep, 1024, 3, 0),
        (Pattern::Random, 2048, 4, 3000),
        (Pattern::Hotset, 3000, 3, 5000),
        (Pattern::Sparse, 2000, 2, 7),
    ] {
        let w = Workload::new(layout::MICRO_REGION_GPA, pages, pattern, passes, param, 7)
            .expect("valid");
        let Some(mut vm) = MicroVm::new(&w.mailbox()) else {
            return;
        };
        let out = vm.run(None);
        assert_eq!(out.end, End::Exit, "{w:?}");
        assert_eq!(out.cpl, 3, "the workload runs at CPL3");
        let mut expected_events = pass_events(passes);
        expected_events.push((ports::MICRO_EXIT, EXIT_OK));
        assert_eq!(out.events, expected_events, "{w:?}");
        let expected: Vec<u64> = w
            .final_image()
            .expect("finite")
            .iter()
            .map(|v| v.unwrap_or(0))
            .collect();
        let image = vm.image(&w);
        let differ = image.iter().zip(&expected).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{w:?}: {differ} pages differ from the model");
        let progress = vm
            .ram
            .read_u64(layout::MICRO_MAILBOX_GPA + micro::OFF_CURRENT_PASS);
        assert_eq!(progress, passes);
        // Nothing written past the region.
        assert_eq!(vm.ram.read_u64(w.region_end()), 0);
    }
}

#[test]
fn endless_workload_reports_every_pass() {
    let w = Workload::new(layout::MICRO_REGION_GPA, 64, Pattern::Hotset, 0, 64, 1).expect("valid");
    let Some(mut vm) = MicroVm::new(&w.mailbox()) else {
        return;
    };
    let out = vm.run(Some(200));
    assert_eq!(out.end, End::Stopped);
    assert_eq!(out.events, pass_events(200));
    let expected: Vec<u64> = w.image_after(200).iter().map(|v| v.unwrap_or(0)).collect();
    assert_eq!(vm.image(&w), expected);
}

#[test]
fn bad_mailbox_is_reported_at_the_exit_port() {
    let w = Workload::new(layout::MICRO_REGION_GPA, 4, Pattern::Sweep, 1, 0, 1).expect("valid");
    let cases: [(u64, u64, u32, u8); 3] = [
        (micro::OFF_MAGIC, 0, EXIT_BAD_MAGIC, 0),
        (micro::OFF_VERSION, 9, EXIT_BAD_VERSION, 0),
        (micro::OFF_PATTERN, 9, EXIT_BAD_PATTERN, 3),
    ];
    for (off, value, status, cpl) in cases {
        let mut mailbox = w.mailbox();
        mailbox[off as usize..off as usize + 8].copy_from_slice(&value.to_le_bytes());
        let Some(mut vm) = MicroVm::new(&mailbox) else {
            return;
        };
        let out = vm.run(None);
        assert_eq!(out.end, End::Exit);
        assert_eq!(out.events, [(ports::MICRO_EXIT, status)]);
        assert_eq!(out.cpl, cpl, "status {status} is reported from CPL{cpl}");
        assert_eq!(vm.image(&w), [0; 4]);
    }
}

#[test]
fn payload_fits_below_its_stack() {
    assert!((layout::MICRO_LOAD_GPA + PAYLOAD.len() as u64) < layout::MICRO_USER_STACK_TOP);
}
