//! What the migration tests drive and fake alike: the plain-TCP `migrate` command, and the VM a
//! hand-made source describes. Shared so that every test asks for a migration the same way and
//! every fake source claims the same VM, and a change to either is made once.

use std::path::Path;

use vmm::machine::description::{GuestDesc, VmDescription};

use crate::process::remote;

/// `vmm remote migrate --insecure --to TO --mode MODE --json EXTRA...` on the API socket `sock`
/// -> (exit code, reply JSON or Null, stderr). Plain TCP, for tests whose fakes, cuts or hosts
/// have no key to share (TLS has tests of its own).
pub fn migrate_insecure(
    sock: &Path,
    to: &str,
    mode: &str,
    extra: &[&str],
) -> (Option<i32>, serde_json::Value, String) {
    let mut args = vec![
        "migrate",
        "--insecure",
        "--to",
        to,
        "--mode",
        mode,
        "--json",
    ];
    args.extend_from_slice(extra);
    remote(sock, &args)
}

/// The 64 MiB VM a hand-made source describes.
pub fn fake_vm() -> VmDescription {
    VmDescription {
        vcpus: 1,
        mem_bytes: 64 << 20,
        ram: vec![(0, 64 << 20)],
        guest: GuestDesc::Linux {
            kernel: "none".into(),
        },
        disks: vec![],
        devices: vmm::machine::devices_setup::device_ids(false, 0),
        dirty_ring: false,
        phys_bits: None,
        passthrough: vec![],
    }
}
