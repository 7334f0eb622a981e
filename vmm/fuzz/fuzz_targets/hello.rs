//! Fuzzes the Hello frame's JSON as a destination reads it: decode, the compatibility check
//! against a destination started with no constraints, then the VM configuration it builds.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::machine::console::ConsoleOutput;
use vmm::machine::description::{Constraints, GuestDesc};
use vmm::migration::hello::Hello;

fuzz_target!(|data: &[u8]| {
    let Ok(mut hello) = serde_json::from_slice::<Hello>(data) else {
        return;
    };
    // Off: the dirty-ring check opens /dev/kvm (slow per input, and not input handling), and
    // micro verification starts the reference model on a thread of its own.
    hello.vm.dirty_ring = false;
    if let GuestDesc::Micro { verify, .. } = &mut hello.vm.guest {
        *verify = false;
    }
    let disks = match hello.vm.check(&Constraints::default()) {
        Ok(disks) => disks,
        Err(reason) => {
            assert!(!reason.is_empty());
            return;
        }
    };
    let _ = hello
        .vm
        .config(disks, Vec::new(), ConsoleOutput::Null, false, None);
});
