//! The bare-metal micro guest: a few hundred bytes of position-independent x86-64 code
//! (`PAYLOAD`, assembled from `src/micro.S` at build time) that runs a deterministic memory
//! write workload, and a reference model of it (`Workload`) that exactness tests compare
//! guest memory and dirty logs against.
//!
//! # Entry contract (what the VMM sets up)
//! - 64-bit long mode, CPL0, IF=0; paging on with an identity map of the first 4 GiB (2 MiB
//!   pages, U/S set on every level so CPL3 can use it);
//! - the GDT from `guest_abi::gdt` (the payload iretq's to `USER_CS`/`USER_DS`), TR loaded
//!   with the TSS at `guest_abi::layout::TSS_GPA` (no I/O bitmap needed), an empty IDT;
//! - RIP = `guest_abi::layout::MICRO_LOAD_GPA`, where `PAYLOAD` is loaded;
//!   RSP = `guest_abi::layout::BOOT_STACK_GPA` (the CPL0 code pushes one iretq frame there);
//!   RSI = the vCPU index, 0 for the boot vCPU (the others: see below);
//! - the mailbox page at `guest_abi::layout::MICRO_MAILBOX_GPA`, filled by
//!   `Workload::write_mailbox`.
//!
//! # What the payload does
//! At CPL0 (emulated on PVM hosts, so kept to ~35 instructions) it checks the mailbox magic and
//! version, gives the TSS (vCPU 0 only) an I/O permission bitmap that opens the micro ports to CPL3 (it
//! writes `TSS_GPA + 102..TSS_GPA + 273`, rewrites the TSS descriptor in the GDT with the larger
//! limit and reloads TR: PVM clears IOPL on the way to CPL3, so IOPL=3 alone does not let CPL3
//! use `out` there), then `iretq`s to CPL3 with IOPL=3 and IF=0, stack at
//! `MICRO_USER_STACK_TOP` (less `MICRO_USER_STACK_STRIDE` per vCPU index). At CPL3
//! (native speed) it checks the pattern, vCPU count and regions, then runs the passes; before
//! each pass it stores the pass number at `micro::OFF_CURRENT_PASS` (vCPU 0) and its own
//! `micro::vcpu_pass_offset`, after each it writes `micro::port_value(index, pass)` (for vCPU 0:
//! the pass number) to port `MICRO_PASS` and reads the budget `micro::OFF_PASSES` again (the
//! VMM may change it while the guest runs). When done, or on a bad mailbox, it writes a status
//! (see `exit_status`; also through `port_value`) to port `MICRO_EXIT` and then writes it again
//! in a loop (CPL3; so a vCPU resumed after its exit, say from a snapshot, exits at once) or
//! halts (CPL0): the VMM is expected to stop the vCPU at the exit port.
//!
//! With several vCPUs (`guest_abi::micro` describes the contract) every vCPU runs the workload
//! on its own private region and its own slots of an optional shared region; the VMM starts
//! vCPUs other than 0 at the same entry with their index in RSI and TR already covering the
//! I/O bitmap. `Workload::with_vcpus` models it.
//!
//! Nothing in the payload faults on any mailbox contents: an unknown pattern, an empty region
//! or one beyond 4 GiB is reported as an exit status. It never checks that the region is RAM or
//! clear of the payload itself; `Workload::new` does, and the VMM must check the region against
//! the guest's memory size.

pub mod exit_status;
mod model;

pub use model::{
    current_pass, vcpu_current_pass, PageBitmap, Pattern, Workload, WorkloadError, Write, Writes,
    MAILBOX_SIZE, PAGE_SIZE,
};

/// The payload: a flat binary to load at `guest_abi::layout::MICRO_LOAD_GPA`.
pub const PAYLOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/micro.bin"));

include!(concat!(env!("OUT_DIR"), "/offsets.rs"));

#[cfg(test)]
mod tests;
