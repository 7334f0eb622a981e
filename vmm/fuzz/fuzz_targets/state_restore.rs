//! Fuzzes a saved VM state (vm.json's `state`, a migration's `State` frame) through what a
//! lazy restore does before KVM sees it: decode, `VmSnapshot::check`, then the keep-present
//! walks over the guest's descriptor tables, stacks and page tables, on a guest memory made
//! of the input's bytes.
//!
//! The first byte picks the mode: even, the rest is the JSON itself; odd, the rest fills the
//! registers of a valid state (the walks then see any CR3, GDT, TSS or RSP) whose JSON is then
//! corrupted at a few input-chosen places, so decode also sees near-valid documents.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmm::machine::saved_state::VmSnapshot;
use vmm::userfault::keep_present;

/// A legacy-only host (the checks take the XSAVE size as a parameter).
const XSAVE_WORDS: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        restore(rest, rest);
        return;
    }
    let mut bytes = Bytes(rest);
    let snapshot = synthetic(&mut bytes);
    let mut json = encode_synthetic(&snapshot);
    // The real encoder on a sample of the inputs (chosen by length, so a finding reproduces):
    // what encode_synthetic builds must be its bytes exactly.
    if rest.len() % 16 == 0 {
        assert_eq!(json, snapshot.encode().expect("a state encodes"));
    }
    // Up to 4 byte replacements in the JSON.
    for _ in 0..(bytes.u8() % 5) {
        let at = bytes.u64() as usize % json.len();
        json[at] = bytes.u8();
    }
    restore(&json, rest);
});

fn restore(json: &[u8], memory: &[u8]) {
    let Ok(state) = VmSnapshot::decode(json) else {
        return;
    };
    if let Err(e) = state.check(state.vcpus.len(), XSAVE_WORDS) {
        let _ = e.to_string();
        return;
    }
    // Guest memory: page n is the input from offset n * 64 on, cycled (so page tables point
    // at pages whose content the fuzzer controls too).
    let mut read = |gpa: u64| -> Option<Vec<u8>> {
        if memory.is_empty() || gpa >= 1 << 40 {
            return None;
        }
        let start = ((gpa >> 12) as usize).wrapping_mul(64) % memory.len();
        // The bytes of memory.iter().cycle().skip(start).take(4096), by slice copies: that
        // iterator skips element by element, and a walk reads up to MAX_TABLES (65,536) pages.
        let mut page = Vec::with_capacity(4096);
        let mut at = start;
        while page.len() < 4096 {
            let n = (4096 - page.len()).min(memory.len() - at);
            page.extend_from_slice(&memory[at..at + n]);
            at = 0;
        }
        Some(page)
    };
    let pages = keep_present::kvm_touched(&state.vcpus, &mut read);
    assert!(pages.windows(2).all(|w| w[0] < w[1]));
}

/// `snapshot.encode()` of a state made by `synthetic`, without re-encoding what `synthetic`
/// never varies: the XSAVE area, LAPIC, VM state and devices (several KiB of JSON numbers:
/// encode took 38 % of a run without a sanitizer, decode 50 %). Those are encoded once; the
/// rest as `encode` would, field by field in declaration order (serde_json's compact output of
/// a struct is its fields' own outputs joined so). Checked against `encode` on the inputs
/// whose length is a multiple of 16 (above): a field added to the state fails there at once.
fn encode_synthetic(s: &VmSnapshot) -> Vec<u8> {
    static CONSTANT: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    let (middle, tail) = CONSTANT.get_or_init(|| {
        let t = synthetic(&mut Bytes(&[]));
        let v = &t.vcpus[0];
        let mut middle = b",\"xsave\":".to_vec();
        serde_json::to_writer(&mut middle, &v.xsave).unwrap();
        middle.extend_from_slice(b",\"fpu\":");
        serde_json::to_writer(&mut middle, &v.fpu).unwrap();
        middle.extend_from_slice(b",\"xcrs\":");
        serde_json::to_writer(&mut middle, &v.xcrs).unwrap();
        middle.extend_from_slice(b",\"debugregs\":");
        serde_json::to_writer(&mut middle, &v.debugregs).unwrap();
        middle.extend_from_slice(b",\"lapic\":");
        serde_json::to_writer(&mut middle, &v.lapic).unwrap();
        let mut tail = b",\"vcpu_events\":".to_vec();
        serde_json::to_writer(&mut tail, &v.vcpu_events).unwrap();
        tail.extend_from_slice(b",\"tsc_khz\":");
        serde_json::to_writer(&mut tail, &v.tsc_khz).unwrap();
        tail.extend_from_slice(b"}],\"vm\":");
        serde_json::to_writer(&mut tail, &t.vm).unwrap();
        tail.extend_from_slice(b",\"devices\":");
        serde_json::to_writer(&mut tail, &t.devices).unwrap();
        (middle, tail)
    });
    let v = &s.vcpus[0];
    let mut json = Vec::with_capacity(middle.len() + tail.len() + 2048);
    json.extend_from_slice(b"{\"vcpus\":[{\"cpuid\":");
    serde_json::to_writer(&mut json, &v.cpuid).unwrap();
    json.extend_from_slice(b",\"mp_state\":");
    serde_json::to_writer(&mut json, &v.mp_state).unwrap();
    json.extend_from_slice(b",\"regs\":");
    serde_json::to_writer(&mut json, &v.regs).unwrap();
    json.extend_from_slice(b",\"sregs\":");
    serde_json::to_writer(&mut json, &v.sregs).unwrap();
    json.extend_from_slice(middle);
    json.extend_from_slice(b",\"msrs\":");
    serde_json::to_writer(&mut json, &v.msrs).unwrap();
    json.extend_from_slice(tail);
    // `paused` is skipped when false.
    if s.paused {
        json.extend_from_slice(b",\"paused\":true");
    }
    json.push(b'}');
    json
}

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn u64(&mut self) -> u64 {
        let mut v = 0u64;
        for _ in 0..8 {
            v = v << 8 | u64::from(self.u8());
        }
        v
    }
}

fn synthetic(b: &mut Bytes) -> VmSnapshot {
    let chip = |chip_id| kvm_bindings::kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    let mut sregs = kvm_bindings::kvm_sregs {
        cr0: b.u64(),
        cr3: b.u64(),
        cr4: b.u64(),
        efer: b.u64(),
        ..Default::default()
    };
    sregs.gdt.base = b.u64();
    sregs.gdt.limit = b.u64() as u16;
    sregs.idt.base = b.u64();
    sregs.idt.limit = b.u64() as u16;
    sregs.ldt.base = b.u64();
    sregs.ldt.limit = b.u64() as u32;
    sregs.ldt.present = b.u8() & 1;
    sregs.tr.base = b.u64();
    sregs.tr.limit = b.u64() as u32;
    sregs.tr.present = b.u8() & 1;
    sregs.cs.l = b.u8() & 1;
    sregs.ss.base = b.u64();
    let regs = kvm_bindings::kvm_regs {
        rsp: b.u64(),
        ..Default::default()
    };
    let msrs = (0..b.u8() % 4)
        .map(|_| vmm::vstate::state::Msr {
            index: 0x4b56_4d00 + u32::from(b.u8() % 5),
            data: b.u64(),
        })
        .collect();
    VmSnapshot {
        vcpus: vec![vmm::vstate::state::VcpuState {
            cpuid: vec![kvm_bindings::kvm_cpuid_entry2 {
                function: 0x8000_0008,
                eax: u32::from(b.u8()),
                ..Default::default()
            }],
            mp_state: Default::default(),
            regs,
            sregs,
            xsave: Some(vec![0; XSAVE_WORDS]),
            fpu: None,
            xcrs: None,
            debugregs: None,
            lapic: Default::default(),
            msrs,
            vcpu_events: None,
            tsc_khz: None,
        }],
        vm: vmm::vstate::state::VmState {
            pic_master: chip(kvm_bindings::KVM_IRQCHIP_PIC_MASTER),
            pic_slave: chip(kvm_bindings::KVM_IRQCHIP_PIC_SLAVE),
            ioapic: chip(kvm_bindings::KVM_IRQCHIP_IOAPIC),
            pit: Default::default(),
            clock: Default::default(),
        },
        devices: Default::default(),
        // Both values decode; whether the guest starts paused changes nothing checked here.
        paused: b.u8() & 1 == 1,
    }
}
