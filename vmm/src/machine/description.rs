//! What VM this is, as a migration's Hello and a snapshot's vm.json carry it, and the check a
//! destination or restore makes against it before building the VM.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::machine::devices_setup::{device_ids, passthrough_id};
use crate::machine::{DiskConfig, GuestConfig, VmConfig, MAX_VCPUS};
use crate::memory::{ram_layout, RamRange};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub enum GuestDesc {
    Linux {
        kernel: String,
    },
    /// The micro guest's mailbox (its workload), so the destination can check the final memory
    /// against the reference model as the source would have.
    Micro {
        mailbox: Vec<u8>,
        region: Option<(u64, u64)>,
        verify: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskDesc {
    pub path: PathBuf,
    pub read_only: bool,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmDescription {
    pub vcpus: u32,
    pub mem_bytes: u64,
    /// (gpa, size) of every RAM range.
    pub ram: Vec<(u64, u64)>,
    pub guest: GuestDesc,
    pub disks: Vec<DiskDesc>,
    /// The VM's devices by id (`devices_setup::device_ids`), in the order they were built.
    pub devices: Vec<String>,
    /// The VM was created with a dirty ring.
    pub dirty_ring: bool,
    /// Its guest's physical address bits, when limited (`--phys-bits`): the destination's
    /// guest must see the same CPUID and address map.
    #[serde(default)]
    pub phys_bits: Option<u8>,
    /// Its passed-through PCI functions, in `--device` order: the destination must be started
    /// with as many `--device`s of the same identity (their state moves over VFIO migration).
    #[serde(default)]
    pub passthrough: Vec<PassthroughDesc>,
}

/// A passed-through function as a Hello names it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PassthroughDesc {
    pub vendor_id: u16,
    pub device_id: u16,
}

impl std::fmt::Display for PassthroughDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor_id, self.device_id)
    }
}

/// What the destination insists on (its own command line), checked against the Hello.
#[derive(Debug, Clone, Default)]
pub struct Constraints {
    pub mem_bytes: Option<u64>,
    pub vcpus: Option<u32>,
    /// This side's disks, one per disk of the VM, in order (shared storage mounted elsewhere).
    pub disks: Vec<DiskConfig>,
    /// The description is a local file the user chose (a snapshot's vm.json), not a peer's
    /// Hello: without `disks` its own paths are opened, and a refusal may name host files.
    /// A migration destination leaves it false: a peer never chooses which host files are
    /// opened read-write, nor learns anything about them.
    pub local_description: bool,
    /// This side's passed-through devices (`--device`), one per function the VM has, in
    /// order: a destination takes devices only from its own command line.
    pub devices: Vec<crate::machine::pci::DeviceSpec>,
}

impl VmDescription {
    pub fn of(cfg: &VmConfig, ranges: &[RamRange]) -> VmDescription {
        let guest = match &cfg.guest {
            GuestConfig::Linux(b) => GuestDesc::Linux {
                kernel: b.kernel.display().to_string(),
            },
            GuestConfig::Micro {
                mailbox,
                region,
                expected,
                ..
            } => GuestDesc::Micro {
                mailbox: mailbox.clone(),
                region: *region,
                verify: expected.is_some(),
            },
        };
        let mut devices = device_ids(
            matches!(cfg.guest, GuestConfig::Micro { .. }),
            cfg.disks.len(),
        );
        devices.extend((0..cfg.devices.len()).map(passthrough_id));
        VmDescription {
            vcpus: cfg.vcpus,
            mem_bytes: cfg.mem_bytes,
            ram: ranges.iter().map(|r| (r.gpa, r.size)).collect(),
            guest,
            disks: cfg
                .disks
                .iter()
                .map(|d| DiskDesc {
                    path: d.path.clone(),
                    read_only: d.read_only,
                    // The real size (a block device's metadata says 0); the VM was built
                    // with this disk open, so a failure here is a race the check then reports.
                    bytes: crate::host_file::disk_bytes(&d.path).unwrap_or(0),
                })
                .collect(),
            devices,
            dirty_ring: cfg.dirty_ring
                || cfg.tracking.as_ref().is_some_and(|t| t.needs_dirty_ring()),
            phys_bits: cfg.phys_bits,
            // Filled in from the running devices (`Shared::describe`).
            passthrough: Vec::new(),
        }
    }

    /// This description with the micro guest's mailbox and check as they are now: the mailbox
    /// vmm wrote at boot, with the budget (`OFF_PASSES`) a `finish` may have set since, and
    /// `verify` once a check is armed (`--verify`, or a finish). What a migration's Hello and a
    /// snapshot's vm.json carry (`Shared::describe`), so the destination's or restored VM's
    /// model is the one for the budget the guest obeys. Other guests are left as they are.
    pub fn with_micro(mut self, mailbox: &[u8], verify_now: bool) -> VmDescription {
        if let GuestDesc::Micro {
            mailbox: m, verify, ..
        } = &mut self.guest
        {
            *m = mailbox.to_vec();
            *verify = verify_now;
        }
        self
    }

    /// The VM to build from this description, with this side's console, disks and API socket
    /// (a migration's destination, a snapshot's restore).
    pub fn config(
        &self,
        disks: Vec<DiskConfig>,
        devices: Vec<crate::machine::pci::DeviceSpec>,
        console: crate::machine::ConsoleOutput,
        console_input: bool,
        api_socket: Option<PathBuf>,
    ) -> Result<VmConfig, String> {
        let guest = match &self.guest {
            GuestDesc::Linux { kernel } => GuestConfig::Linux(crate::boot::linux::LinuxBoot {
                kernel: kernel.into(),
                initrd: None,
                cmdline: String::new(),
            }),
            GuestDesc::Micro {
                mailbox,
                region,
                verify,
            } => {
                // The mailbox holds the budget as it was when the source described the VM
                // (`with_micro`): a finished workload's model is the one for that budget.
                let expected = if *verify {
                    let mb = <&[u8; micro_guest::MAILBOX_SIZE]>::try_from(mailbox.as_slice())
                        .map_err(|_| "micro guest mailbox size".to_string())?;
                    let workload = micro_guest::Workload::from_mailbox(mb)
                        .map_err(|e| format!("micro guest mailbox: {e}"))?;
                    let (gpa, _) = region.ok_or("micro guest without a region")?;
                    crate::micro_check::Expected::in_background(gpa, workload)
                } else {
                    None
                };
                GuestConfig::Micro {
                    payload: Vec::new(),
                    mailbox: mailbox.clone(),
                    region: *region,
                    expected,
                }
            }
        };
        Ok(VmConfig {
            vcpus: self.vcpus,
            mem_bytes: self.mem_bytes,
            guest,
            disks,
            devices,
            console,
            console_input,
            tracking: None,
            dirty_ring: self.dirty_ring,
            phys_bits: self.phys_bits,
            api_socket,
        })
    }

    /// The source's devices against those this vmm builds for the described guest and disks
    /// (the device states must then match them one for one).
    fn check_devices(&self) -> Result<(), String> {
        let micro = matches!(self.guest, GuestDesc::Micro { .. });
        let mut built = device_ids(micro, self.disks.len());
        built.extend((0..self.passthrough.len()).map(passthrough_id));
        if self.devices == built {
            return Ok(());
        }
        let built_list = built.join(", ");
        if let Some(extra) = self.devices.iter().find(|d| !built.contains(d)) {
            return Err(format!(
                "device '{extra}' is not one this vmm builds for this VM ({built_list})"
            ));
        }
        if let Some(missing) = built.iter().find(|d| !self.devices.contains(d)) {
            return Err(format!(
                "the source VM has no device '{missing}', which this vmm builds for it ({built_list})"
            ));
        }
        Err(format!(
            "the source VM's devices ({}) are not those this vmm builds for it ({built_list})",
            self.devices.join(", ")
        ))
    }

    /// Refuses a VM this destination cannot host, with the reason; otherwise the disks to open.
    /// The reason is the text sent to the source in `Refuse` (`AssembleError::Refused`), so it
    /// stays a message.
    pub fn check(&self, local: &Constraints) -> Result<Vec<DiskConfig>, String> {
        if let Some(mem) = local.mem_bytes {
            if mem != self.mem_bytes {
                return Err(format!(
                    "memory size differs: the source VM has {} MiB, this destination was started with --mem {} MiB",
                    self.mem_bytes >> 20,
                    mem >> 20
                ));
            }
        }
        if let Some(v) = local.vcpus {
            if v != self.vcpus {
                return Err(format!(
                    "vCPU count differs: the source VM has {}, this destination was started with --vcpus {v}",
                    self.vcpus
                ));
            }
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS as u32 {
            return Err(format!(
                "{} vCPUs: this vmm supports 1 to {MAX_VCPUS}",
                self.vcpus
            ));
        }
        let layout: Vec<(u64, u64)> = ram_layout(self.mem_bytes)
            .iter()
            .map(|r| (r.gpa, r.size))
            .collect();
        if layout != self.ram {
            return Err(format!(
                "RAM layout {:x?} is not this vmm's layout for {} bytes ({layout:x?})",
                self.ram, self.mem_bytes
            ));
        }
        self.check_devices()?;
        if local.devices.len() != self.passthrough.len() {
            let theirs: Vec<String> = self.passthrough.iter().map(|p| p.to_string()).collect();
            return Err(format!(
                "the source VM has {} passed-through device(s) ({}); this destination was \
                 started with {} --device (give one per device, in the same order)",
                self.passthrough.len(),
                if theirs.is_empty() {
                    "none".to_string()
                } else {
                    theirs.join(", ")
                },
                local.devices.len()
            ));
        }
        if local.disks.is_empty() && !self.disks.is_empty() && !local.local_description {
            return Err(format!(
                "the source VM has {} disk(s); this destination takes disks only from its own \
                 command line (start it with one --disk per disk, in order)",
                self.disks.len()
            ));
        }
        if !local.disks.is_empty() && local.disks.len() != self.disks.len() {
            return Err(format!(
                "the source VM has {} disks, this destination was given {}",
                self.disks.len(),
                local.disks.len()
            ));
        }
        let mut disks = Vec::new();
        for (i, d) in self.disks.iter().enumerate() {
            let path = local
                .disks
                .get(i)
                .map_or(d.path.clone(), |l| l.path.clone());
            // Toward a peer the refusal says only what differs; the details stay in the log.
            let bytes = crate::host_file::disk_bytes(&path).map_err(|e| {
                if local.local_description {
                    format!("disk {i}: {e}")
                } else {
                    tracing::warn!("refusing the incoming VM: disk {i}: {e}");
                    format!("disk {i}: this destination cannot open its --disk")
                }
            })?;
            if bytes != d.bytes {
                if local.local_description {
                    return Err(format!(
                        "disk {i}: {} has {bytes} bytes, the VM's disk had {}",
                        path.display(),
                        d.bytes
                    ));
                }
                tracing::warn!(
                    "refusing the incoming VM: disk {i}: {} has {bytes} bytes, the source's has {}",
                    path.display(),
                    d.bytes
                );
                return Err(format!(
                    "disk {i}: its size differs from the source's disk ({} bytes)",
                    d.bytes
                ));
            }
            disks.push(DiskConfig {
                path,
                read_only: d.read_only,
            });
        }
        if self.dirty_ring {
            crate::tracking::TrackerKind::Ring
                .check_host()
                .map_err(|e| {
                    format!(
                        "the VM uses a dirty ring, which this host lacks: {}",
                        e.reason()
                    )
                })?;
        }
        Ok(disks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc() -> VmDescription {
        VmDescription {
            vcpus: 2,
            mem_bytes: 64 << 20,
            ram: vec![(0, 64 << 20)],
            guest: GuestDesc::Linux {
                kernel: "vmlinux".into(),
            },
            disks: vec![],
            devices: device_ids(false, 0),
            dirty_ring: false,
            phys_bits: None,
            passthrough: Vec::new(),
        }
    }

    #[test]
    fn a_matching_destination_accepts() {
        assert!(desc().check(&Constraints::default()).is_ok());
        let c = Constraints {
            mem_bytes: Some(64 << 20),
            vcpus: Some(2),
            disks: vec![],
            devices: vec![],
            local_description: false,
        };
        assert!(desc().check(&c).is_ok());
    }

    #[test]
    fn a_destination_needs_one_device_per_passed_through_function() {
        let mut d = desc();
        d.passthrough.push(PassthroughDesc {
            vendor_id: 0x1234,
            device_id: 0x7e57,
        });
        d.devices.push(passthrough_id(0));
        let err = d.check(&Constraints::default()).unwrap_err();
        assert!(
            err.contains("1 passed-through device(s) (1234:7e57)")
                && err.contains("started with 0 --device"),
            "{err}"
        );
        let c = Constraints {
            devices: vec!["vfio-user:/tmp/gpu.sock".parse().unwrap()],
            ..Default::default()
        };
        assert!(d.check(&c).is_ok());
        // A device the description does not list as a state id is refused as any other.
        d.devices.pop();
        assert!(d.check(&c).is_err());
        let err = desc().check(&c).unwrap_err();
        assert!(
            err.contains("has 0 passed-through device(s) (none)"),
            "{err}"
        );
    }

    #[test]
    fn mismatches_are_refused_with_the_reason() {
        let c = Constraints {
            mem_bytes: Some(128 << 20),
            ..Default::default()
        };
        assert!(desc()
            .check(&c)
            .unwrap_err()
            .contains("memory size differs"));
        let c = Constraints {
            vcpus: Some(1),
            ..Default::default()
        };
        assert!(desc().check(&c).unwrap_err().contains("vCPU count differs"));
        let mut d = desc();
        d.devices.push("virtio-gpu".into());
        assert!(d
            .check(&Constraints::default())
            .unwrap_err()
            .contains("virtio-gpu"));
        let mut d = desc();
        d.devices.retain(|id| id != "serial0");
        let e = d.check(&Constraints::default()).unwrap_err();
        assert!(e.contains("no device 'serial0'"), "{e}");
        // A virtio-blk device without its disk.
        let mut d = desc();
        d.devices.push("virtio-blk0".into());
        let e = d.check(&Constraints::default()).unwrap_err();
        assert!(e.contains("'virtio-blk0' is not one"), "{e}");
        let mut d = desc();
        d.ram = vec![(0, 1 << 40)];
        assert!(d
            .check(&Constraints::default())
            .unwrap_err()
            .contains("layout"));
        let mut d = desc();
        d.vcpus = 0;
        assert!(d.check(&Constraints::default()).is_err());
    }

    fn with_disk(path: &std::path::Path, bytes: u64) -> VmDescription {
        let mut d = desc();
        d.disks.push(DiskDesc {
            path: path.to_owned(),
            read_only: false,
            bytes,
        });
        d.devices = device_ids(false, 1);
        d
    }

    #[test]
    fn a_destination_refuses_disks_it_was_not_given_without_naming_host_files() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("secret.img");
        std::fs::write(&host, vec![0u8; 12345]).unwrap();
        // The peer names a host file that exists: the refusal must not depend on it.
        let named = with_disk(&host, 4096).check(&Constraints::default());
        let missing = with_disk(&dir.path().join("absent"), 4096).check(&Constraints::default());
        let e = named.unwrap_err();
        assert_eq!(
            e,
            missing.unwrap_err(),
            "existence leaks through the refusal"
        );
        assert!(
            e.contains("takes disks only from its own command line"),
            "{e}"
        );
        assert!(!e.contains("12345") && !e.contains("secret"), "{e}");
        // A snapshot's vm.json is the user's own file: its paths still serve.
        let snapshot = Constraints {
            local_description: true,
            ..Default::default()
        };
        let disks = with_disk(&host, 12345).check(&snapshot).unwrap();
        assert_eq!(disks[0].path, host);
    }

    #[test]
    fn a_size_mismatch_toward_the_peer_does_not_say_the_host_file_size() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("mine.img");
        std::fs::write(&local, vec![0u8; 12345]).unwrap();
        let c = Constraints {
            disks: vec![DiskConfig {
                path: local.clone(),
                read_only: false,
            }],
            ..Default::default()
        };
        let e = with_disk(std::path::Path::new("/theirs"), 4096)
            .check(&c)
            .unwrap_err();
        assert!(e.contains("size differs"), "{e}");
        assert!(!e.contains("12345") && !e.contains("mine.img"), "{e}");
        let disks = with_disk(std::path::Path::new("/theirs"), 12345)
            .check(&c)
            .unwrap();
        assert_eq!(disks[0].path, local, "the destination's own path is used");
    }
}
