//! Status codes the payload writes to `guest_abi::ports::MICRO_EXIT`.
//!
//! This file is also compiled into build.rs (by `#[path]`), which hands the values to the
//! assembler, so the payload and the host read the same numbers.

/// The workload ran all its passes.
pub const EXIT_OK: u32 = 0;
/// The mailbox does not start with `guest_abi::micro::MAGIC` (reported from CPL0).
pub const EXIT_BAD_MAGIC: u32 = 1;
/// The mailbox version is not `guest_abi::micro::VERSION` (reported from CPL0).
pub const EXIT_BAD_VERSION: u32 = 2;
/// The pattern field is not one of the `guest_abi::micro::PATTERN_*` values.
pub const EXIT_BAD_PATTERN: u32 = 3;
/// The region is empty or does not fit in the identity-mapped first 4 GiB.
pub const EXIT_BAD_REGION: u32 = 4;
/// The vCPU count is above `guest_abi::micro::MAX_VCPUS`, or this vCPU's index is not below it.
pub const EXIT_BAD_VCPU: u32 = 5;

/// A short description of an exit status, for the VMM's logs.
pub fn describe(status: u32) -> &'static str {
    match status {
        EXIT_OK => "workload finished",
        EXIT_BAD_MAGIC => "bad mailbox magic",
        EXIT_BAD_VERSION => "bad mailbox version",
        EXIT_BAD_PATTERN => "unknown pattern",
        EXIT_BAD_REGION => "region empty or beyond the 4 GiB identity map",
        EXIT_BAD_VCPU => "vCPU count above the maximum, or vCPU index beyond the count",
        _ => "unknown status",
    }
}
