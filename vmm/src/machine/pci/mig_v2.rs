//! One passed-through function's VFIO migration v2 state machine (linux/vfio.h), driven the
//! same way by its two users: a live migration (`migration::devices`) and a snapshot or restore
//! (`snapshot::device_files`). It sits beside `PassthroughHandle`, below both, so neither
//! upper layer imports the other and both refuse a device for the same reasons, in the same
//! words.

use devices::vfio::passthrough::{chain, MigState, MigrationCaps};

use super::passthrough::PassthroughHandle;
use crate::machine::description::PassthroughDesc;

/// Bytes asked of a device per read (vfio-user carries at most 1 MiB per message).
pub const READ_CHUNK: usize = 512 << 10;

#[derive(Debug, thiserror::Error)]
pub enum MigV2Error {
    #[error("{device}: asking for its migration support: {reason}")]
    Caps { device: String, reason: String },
    #[error(
        "{device}: the device has no VFIO migration support (no \
         VFIO_DEVICE_FEATURE_MIGRATION): its state cannot move"
    )]
    NoMigration { device: String },
    #[error(
        "{device}: the device's VFIO migration lacks STOP_COPY, the minimum to move its state"
    )]
    NoStopCopy { device: String },
    #[error("{device}: {from:?} -> {to:?}: {reason}")]
    Transition {
        device: String,
        from: MigState,
        to: MigState,
        reason: String,
    },
    #[error("{device}: reading its migration data ({state:?}): {reason}")]
    Read {
        device: String,
        state: MigState,
        reason: String,
    },
    #[error("{device}: the device returned {got} bytes for a read of {asked}")]
    Overlong {
        device: String,
        got: usize,
        asked: usize,
    },
    #[error("{device}: its migration data exceeds {limit} bytes")]
    TooMuch { device: String, limit: u64 },
    #[error("{device}: writing its migration data: {reason}")]
    Write { device: String, reason: String },
}

/// A function under migration v2, with the state this side last set.
pub struct MigDevice {
    pub handle: PassthroughHandle,
    pub caps: MigrationCaps,
    pub state: MigState,
}

impl MigDevice {
    /// The device, running, if it can have its state moved at all (STOP_COPY at least).
    pub fn check(handle: &PassthroughHandle) -> Result<Self, MigV2Error> {
        let device = || handle.spec.clone();
        let caps = handle
            .lock()
            .migration()
            .migration_caps()
            .map_err(|e| MigV2Error::Caps {
                device: device(),
                reason: chain(&e),
            })?;
        let caps = match caps {
            Some(c) if c.stop_copy => c,
            Some(_) => return Err(MigV2Error::NoStopCopy { device: device() }),
            None => return Err(MigV2Error::NoMigration { device: device() }),
        };
        Ok(MigDevice {
            handle: handle.clone(),
            caps,
            state: MigState::Running,
        })
    }

    pub fn set(&mut self, to: MigState) -> Result<(), MigV2Error> {
        self.handle
            .lock()
            .migration()
            .set_migration_state(to)
            .map_err(|e| MigV2Error::Transition {
                device: self.handle.spec.clone(),
                from: self.state,
                to,
                reason: chain(&e),
            })?;
        self.state = to;
        Ok(())
    }

    /// One read of the device's migration data into `buf`; a short read (less than `buf`)
    /// means it has no more for now (all of it, in STOP_COPY).
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, MigV2Error> {
        let n = self
            .handle
            .lock()
            .migration()
            .migration_read(buf)
            .map_err(|e| MigV2Error::Read {
                device: self.handle.spec.clone(),
                state: self.state,
                reason: chain(&e),
            })?;
        // A transport that claims more than it was given must not be trusted with the slice.
        if n > buf.len() {
            return Err(MigV2Error::Overlong {
                device: self.handle.spec.clone(),
                got: n,
                asked: buf.len(),
            });
        }
        Ok(n)
    }

    /// Reads until a short read, handing each piece to `sink`; refuses more than `limit`
    /// bytes (a bound on a misbehaving device). Returns the bytes read.
    pub fn read_all<E: From<MigV2Error>>(
        &mut self,
        limit: u64,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut buf = vec![0u8; READ_CHUNK];
        let mut total = 0u64;
        loop {
            let n = self.read(&mut buf)?;
            total += n as u64;
            if total > limit {
                return Err(MigV2Error::TooMuch {
                    device: self.handle.spec.clone(),
                    limit,
                }
                .into());
            }
            if n > 0 {
                sink(&buf[..n])?;
            }
            if n < buf.len() {
                return Ok(total);
            }
        }
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), MigV2Error> {
        self.handle
            .lock()
            .migration()
            .migration_write(data)
            .map_err(|e| MigV2Error::Write {
                device: self.handle.spec.clone(),
                reason: chain(&e),
            })
    }

    /// Back to RUNNING from wherever this side left it (a failed migration or snapshot); logs
    /// and gives up on the first arc the device refuses, since nothing better can be done.
    pub fn recover(&mut self, after: &str) {
        let path: &[MigState] = match self.state {
            MigState::Running => &[],
            MigState::PreCopy => &[MigState::Running],
            MigState::StopCopy | MigState::Resuming => &[MigState::Stop, MigState::Running],
            _ => &[MigState::Running],
        };
        for &to in path {
            if let Err(e) = self.set(to) {
                tracing::error!("after {after}: {e}");
                break;
            }
        }
    }
}

/// The function's vendor:device as its config space reads now: what a migration's Hello or a
/// snapshot's description lists for it, and what the receiving side checks its own against.
pub fn function_ids(handle: &PassthroughHandle) -> PassthroughDesc {
    use devices::pci::PciDevice;
    let mut ids = [0u8; 4];
    handle
        .device
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .config_read(0, &mut ids);
    PassthroughDesc {
        vendor_id: u16::from_le_bytes([ids[0], ids[1]]),
        device_id: u16::from_le_bytes([ids[2], ids[3]]),
    }
}
