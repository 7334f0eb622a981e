//! A VM's device state: every stateful device's saved state under its id ("serial0",
//! "virtio-blk0"), with the kind and version it was saved as.
//!
//! The VMM registers each [`Stateful`] device under its id when it builds the VM. Saving walks
//! the registry; restoring first matches the saved set against it (same ids, kinds and
//! versions) and only then loads each device, so a state meant for another VM or another build
//! changes nothing and is refused naming the device, its kind and both versions.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::state::{DeviceStateError, Stateful};

/// One device's state as saved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    pub kind: String,
    pub version: u32,
    pub data: serde_json::Value,
}

/// Saved states by device id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceStates(pub BTreeMap<String, SavedState>);

#[derive(Debug, thiserror::Error)]
pub enum StatesError {
    #[error("two devices registered as '{id}'")]
    DuplicateId { id: String },
    #[error("the state has device '{id}' ({kind}), which this VM does not have")]
    UnknownDevice { id: String, kind: String },
    #[error("the state has nothing for device '{id}' ({kind})")]
    MissingDevice { id: String, kind: &'static str },
    #[error("device '{id}' is a {expected} here, but its state is for a {got}")]
    Kind {
        id: String,
        expected: &'static str,
        got: String,
    },
    #[error(
        "device '{id}' ({kind}): the state is version {got}, this build reads version {expected}"
    )]
    Version {
        id: String,
        kind: &'static str,
        expected: u32,
        got: u32,
    },
    #[error("saving device '{id}' ({kind}): {source}")]
    Save {
        id: String,
        kind: &'static str,
        #[source]
        source: DeviceStateError,
    },
    #[error("restoring device '{id}' ({kind}): {source}")]
    Restore {
        id: String,
        kind: &'static str,
        #[source]
        source: DeviceStateError,
    },
}

#[derive(Clone)]
struct Entry {
    id: String,
    /// Read once at registration, so listing kinds takes no device lock.
    kind: &'static str,
    version: u32,
    device: Arc<Mutex<dyn Stateful>>,
}

/// The VM's stateful devices by id, in registration order. Clones share the devices.
#[derive(Clone, Default)]
pub struct StateRegistry {
    entries: Vec<Entry>,
}

impl StateRegistry {
    pub fn new() -> StateRegistry {
        StateRegistry::default()
    }

    /// Registers `device` under `id`; ids are unique within a VM.
    pub fn add(&mut self, id: &str, device: Arc<Mutex<dyn Stateful>>) -> Result<(), StatesError> {
        if self.entries.iter().any(|e| e.id == id) {
            return Err(StatesError::DuplicateId { id: id.to_string() });
        }
        let (kind, version) = {
            let d = device.lock().unwrap_or_else(|p| p.into_inner());
            (d.kind(), d.state_version())
        };
        self.entries.push(Entry {
            id: id.to_string(),
            kind,
            version,
            device,
        });
        Ok(())
    }

    /// (id, kind) of every registered device, in registration order.
    pub fn devices(&self) -> Vec<(String, &'static str)> {
        self.entries
            .iter()
            .map(|e| (e.id.clone(), e.kind))
            .collect()
    }

    /// Every device's state. Call it with the vCPUs paused.
    pub fn save(&self) -> Result<DeviceStates, StatesError> {
        let mut out = BTreeMap::new();
        for e in self.entries.iter() {
            let data = lock(&e.device).save().map_err(|source| StatesError::Save {
                id: e.id.clone(),
                kind: e.kind,
                source,
            })?;
            out.insert(
                e.id.clone(),
                SavedState {
                    kind: e.kind.to_string(),
                    version: e.version,
                    data,
                },
            );
        }
        Ok(DeviceStates(out))
    }

    /// Loads `states` (from the network or a file) into the registered devices. Nothing is
    /// loaded unless every id, kind and version matches; a device refusing its state then
    /// stops the restore there (the VM is not started after a failed restore).
    pub fn restore(&self, states: &DeviceStates) -> Result<(), StatesError> {
        self.check(states)?;
        for e in self.entries.iter() {
            let saved = states
                .0
                .get(&e.id)
                .ok_or_else(|| StatesError::MissingDevice {
                    id: e.id.clone(),
                    kind: e.kind,
                })?;
            lock(&e.device)
                .restore(&saved.data)
                .map_err(|source| StatesError::Restore {
                    id: e.id.clone(),
                    kind: e.kind,
                    source,
                })?;
        }
        Ok(())
    }

    /// The saved set against the registered one: same ids, each with its kind and version.
    pub fn check(&self, states: &DeviceStates) -> Result<(), StatesError> {
        if let Some((id, s)) = states
            .0
            .iter()
            .find(|(id, _)| !self.entries.iter().any(|e| &e.id == *id))
        {
            return Err(StatesError::UnknownDevice {
                id: id.clone(),
                kind: s.kind.clone(),
            });
        }
        for e in self.entries.iter() {
            let Some(saved) = states.0.get(&e.id) else {
                return Err(StatesError::MissingDevice {
                    id: e.id.clone(),
                    kind: e.kind,
                });
            };
            if saved.kind != e.kind {
                return Err(StatesError::Kind {
                    id: e.id.clone(),
                    expected: e.kind,
                    got: saved.kind.clone(),
                });
            }
            if saved.version != e.version {
                return Err(StatesError::Version {
                    id: e.id.clone(),
                    kind: e.kind,
                    expected: e.version,
                    got: saved.version,
                });
            }
        }
        Ok(())
    }
}

fn lock<'a>(device: &'a Mutex<dyn Stateful>) -> MutexGuard<'a, dyn Stateful + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
#[path = "device_states_tests.rs"]
mod tests;
