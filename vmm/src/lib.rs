//! vmm: a small KVM virtual machine monitor whose memory is observable.
//!
//! Layers (see ARCHITECTURE.md): `memory` (guest RAM), `vstate` (VM and vCPUs), `boot` (kernel
//! and payload loading), `machine` (assembling and running a VM), `host` (what KVM this is).

pub mod api;
pub mod boot;
pub mod host;
pub mod host_file;
#[cfg(test)]
mod layering;
pub mod machine;
pub mod memory;
pub mod micro_check;
pub mod micro_finish;
pub mod micro_port;
pub mod migration;
pub mod output;
pub mod peer_text;
pub mod seccomp;
pub mod snapshot;
pub mod sys;
pub mod tracking;
pub mod userfault;
pub mod vstate;
