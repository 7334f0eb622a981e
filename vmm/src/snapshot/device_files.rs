//! Passed-through devices in a snapshot: each device's own state (what VFIO migration v2 hands
//! over in STOP_COPY: registers, engines, device memory) in a file of its own, `deviceN.bin`,
//! listed in the manifest with its length and CRC-32 so a restore checks it before the device
//! sees a byte. The same rules as a live migration (`migration::devices`): a device that
//! cannot migrate is refused before anything is written, naming it; the device is stopped
//! (its DMA ends) before guest RAM is read; it runs again when the guest resumes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use devices::vfio::passthrough::MigState;
use serde::{Deserialize, Serialize};

use crate::machine::description::PassthroughDesc;
use crate::machine::pci::mig_v2::{function_ids, MigDevice, MigV2Error, READ_CHUNK};
use crate::machine::pci::passthrough::PassthroughHandle;
use crate::output::OutputDir;

/// The most state one device may leave in a snapshot (a bound on a misbehaving device, far
/// above any VRAM this VMM maps; the same bound as a migration's stop-copy).
pub const DEVICE_DATA_LIMIT: u64 = 1 << 40;

#[derive(Debug, thiserror::Error)]
pub enum DeviceFileError {
    /// Refused before anything was written: the device cannot have its state saved.
    #[error("{0}; refused before anything was written")]
    Unmovable(#[source] MigV2Error),
    /// A step of the device's state machine or data transfer failed.
    #[error("{0}")]
    Device(#[from] MigV2Error),
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    #[error(transparent)]
    HostFile(#[from] crate::host_file::HostFileError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The snapshot's device files do not fit this restore (count, names, sizes, checksums,
    /// the functions given): a description.
    #[error("{0}")]
    Refused(String),
}

/// One device's file as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFile {
    /// `deviceN.bin`, N the device's index in `--device` order (nothing else is accepted on
    /// restore: the name comes from a file a user may have edited).
    pub name: String,
    pub len: u64,
    /// CRC-32 (IEEE) of the whole file: catches truncation and corruption, not tampering.
    pub crc32: u32,
}

pub fn file_name(index: usize) -> String {
    format!("device{index}.bin")
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DeviceFileError + '_ {
    move |source| DeviceFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The devices of a VM being snapshotted, in `--device` order.
pub struct SnapshotDevices {
    devs: Vec<MigDevice>,
}

impl SnapshotDevices {
    /// Every device must offer VFIO migration with STOP_COPY; asked before the guest pauses.
    pub fn check(handles: &[PassthroughHandle]) -> Result<Self, DeviceFileError> {
        let devs = handles
            .iter()
            .map(|h| MigDevice::check(h).map_err(DeviceFileError::Unmovable))
            .collect::<Result<_, _>>()?;
        Ok(SnapshotDevices { devs })
    }

    /// With the vCPUs paused: RUNNING -> STOP -> STOP_COPY, so no device writes guest RAM
    /// while it is read.
    pub fn stop(&mut self) -> Result<(), DeviceFileError> {
        for d in &mut self.devs {
            d.set(MigState::Stop)?;
            d.set(MigState::StopCopy)?;
        }
        Ok(())
    }

    /// Writes each device's stop-copy data into `dir/deviceN.bin` (new owner-only files, as
    /// the data is the device's memory).
    pub fn save(&mut self, dir: &mut OutputDir) -> Result<Vec<DeviceFile>, DeviceFileError> {
        let mut out = Vec::new();
        for (i, d) in self.devs.iter_mut().enumerate() {
            let name = file_name(i);
            let path = dir.join(&name);
            let mut f = dir.create_file(&name)?;
            let mut crc = crc32fast::Hasher::new();
            let len = d.read_all(DEVICE_DATA_LIMIT, &mut |data: &[u8]| {
                crc.update(data);
                f.write_all(data).map_err(io(&path))
            })?;
            f.sync_all().map_err(io(&path))?;
            out.push(DeviceFile {
                name,
                len,
                crc32: crc.finalize(),
            });
        }
        Ok(out)
    }

    /// The guest resumes: STOP_COPY -> STOP -> RUNNING (`run`), or ends with the snapshot
    /// (`!run`: left in STOP, its state now only in the files).
    pub fn finish(&mut self, run: bool) {
        for d in &mut self.devs {
            let path: &[MigState] = if run {
                &[MigState::Stop, MigState::Running]
            } else {
                &[MigState::Stop]
            };
            for &to in path {
                if let Err(e) = d.set(to) {
                    tracing::error!("after the snapshot: {e}");
                    break;
                }
            }
        }
    }

    /// The snapshot failed: every device runs again.
    pub fn recover(&mut self) {
        for d in &mut self.devs {
            d.recover("a failed snapshot");
        }
    }
}

/// Opens a device file for reading: not through a symlink, a regular file of the listed
/// length.
fn open_checked(dir: &Path, index: usize, f: &DeviceFile) -> Result<File, DeviceFileError> {
    if f.name != file_name(index) {
        return Err(DeviceFileError::Refused(format!(
            "the manifest names device {index}'s file {:?}; expected {:?}",
            f.name,
            file_name(index)
        )));
    }
    let path = dir.join(&f.name);
    // Never waits on a FIFO, never follows a symlink, refuses anything but a regular file.
    let file = crate::host_file::open_regular_nofollow(&path, "snapshot device file")?;
    let meta = file.metadata().map_err(io(&path))?;
    if meta.len() != f.len {
        return Err(DeviceFileError::Refused(format!(
            "{} is {} bytes, the manifest says {}",
            path.display(),
            meta.len(),
            f.len
        )));
    }
    if f.len > DEVICE_DATA_LIMIT {
        return Err(DeviceFileError::Refused(format!(
            "{} is {} bytes, more than a device may save ({DEVICE_DATA_LIMIT})",
            path.display(),
            f.len
        )));
    }
    Ok(file)
}

/// Reads exactly `len` bytes of `file` in bounded pieces, handing each to `sink`.
fn stream(
    file: &mut File,
    path: &Path,
    len: u64,
    sink: &mut dyn FnMut(&[u8]) -> Result<(), DeviceFileError>,
) -> Result<(), DeviceFileError> {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        file.read_exact(&mut buf[..n]).map_err(io(path))?;
        sink(&buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// The devices of a VM being restored, from this side's own `--device` list, loaded and
/// stopped until `run`.
pub struct RestoredDevices {
    devs: Vec<MigDevice>,
}

impl RestoredDevices {
    /// Checks the snapshot's device files (names, lengths, checksums) and this side's functions
    /// against the description, then loads each device: STOP -> RESUMING, its data, RESUMING ->
    /// STOP (where the device checks what it got). On a failure the devices loaded so far run
    /// again as they were and nothing else is touched.
    pub fn load(
        dir: &Path,
        files: &[DeviceFile],
        handles: &[PassthroughHandle],
        described: &[PassthroughDesc],
    ) -> Result<Self, DeviceFileError> {
        if files.len() != handles.len() || described.len() != handles.len() {
            return Err(DeviceFileError::Refused(format!(
                "the snapshot holds the state of {} passed-through device(s) for a VM with {}; \
                 this restore was given {} (--device, one per device, in order)",
                files.len(),
                described.len(),
                handles.len()
            )));
        }
        for (i, (h, theirs)) in handles.iter().zip(described).enumerate() {
            let mine = function_ids(h);
            if &mine != theirs {
                return Err(DeviceFileError::Refused(format!(
                    "passed-through device {i}: the snapshot's is {theirs}, this restore's ({}) \
                     is {mine}",
                    h.spec
                )));
            }
        }
        // Every file whole before any device is touched.
        let mut opened = Vec::new();
        for (i, f) in files.iter().enumerate() {
            let mut file = open_checked(dir, i, f)?;
            let path = dir.join(&f.name);
            let mut crc = crc32fast::Hasher::new();
            stream(&mut file, &path, f.len, &mut |d| {
                crc.update(d);
                Ok(())
            })?;
            let got = crc.finalize();
            if got != f.crc32 {
                return Err(DeviceFileError::Refused(format!(
                    "{}: CRC-32 {got:08x}, the manifest says {:08x}: the file is corrupt",
                    path.display(),
                    f.crc32
                )));
            }
            file.seek(SeekFrom::Start(0)).map_err(io(&path))?;
            opened.push((file, path, f.len));
        }
        let mut me = RestoredDevices { devs: Vec::new() };
        let loaded = (|| -> Result<(), DeviceFileError> {
            for (h, (mut file, path, len)) in handles.iter().zip(opened) {
                let mut d = MigDevice::check(h)?;
                d.set(MigState::Stop)?;
                me.devs.push(d);
                let d = me.devs.last_mut().ok_or_else(|| {
                    DeviceFileError::Refused("no device to load (internal)".into())
                })?;
                d.set(MigState::Resuming)?;
                stream(&mut file, &path, len, &mut |data| Ok(d.write(data)?))?;
                d.set(MigState::Stop)?;
            }
            Ok(())
        })();
        if let Err(e) = loaded {
            me.recover();
            return Err(e);
        }
        Ok(me)
    }

    /// STOP -> RUNNING: just before the vCPUs run (eager), or once every page is in (lazy).
    pub fn run(&mut self) -> Result<(), DeviceFileError> {
        for d in &mut self.devs {
            d.set(MigState::Running)?;
        }
        Ok(())
    }

    fn recover(&mut self) {
        for d in &mut self.devs {
            d.recover("a failed restore");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(name: &str, data: &[u8]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(name), data).unwrap();
        dir
    }

    #[test]
    fn a_device_file_of_another_length_is_refused_naming_both() {
        let dir = dir_with("device0.bin", b"abc");
        let f = DeviceFile {
            name: "device0.bin".into(),
            len: 4,
            crc32: 0,
        };
        let e = open_checked(dir.path(), 0, &f).unwrap_err().to_string();
        assert!(
            e.ends_with("device0.bin is 3 bytes, the manifest says 4"),
            "{e}"
        );
    }

    #[test]
    fn a_device_file_name_other_than_its_index_is_refused() {
        let dir = dir_with("device0.bin", b"abc");
        let f = DeviceFile {
            name: "../device0.bin".into(),
            len: 3,
            crc32: 0,
        };
        let e = open_checked(dir.path(), 0, &f).unwrap_err().to_string();
        assert!(e.contains("expected \"device0.bin\""), "{e}");
    }

    #[test]
    fn a_symlinked_device_file_is_not_followed() {
        let dir = dir_with("elsewhere", b"abc");
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir.path().join("device0.bin"))
            .unwrap();
        let f = DeviceFile {
            name: "device0.bin".into(),
            len: 3,
            crc32: 0,
        };
        let e = open_checked(dir.path(), 0, &f).unwrap_err();
        assert!(
            matches!(&e, DeviceFileError::HostFile(crate::host_file::HostFileError::Io { source, .. })
                if source.raw_os_error() == Some(libc::ELOOP)),
            "{e:?}"
        );
    }

    #[test]
    fn a_fifo_as_device_file_is_refused_not_waited_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device0.bin");
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo touches nothing else.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let f = DeviceFile {
            name: "device0.bin".into(),
            len: 3,
            crc32: 0,
        };
        let e = open_checked(dir.path(), 0, &f).unwrap_err().to_string();
        assert!(e.contains("FIFO, not a regular file"), "{e}");
    }

    #[test]
    fn a_stream_ends_short_of_its_length_with_an_error() {
        let dir = dir_with("d", &[7u8; 10]);
        let path = dir.path().join("d");
        let mut f = File::open(&path).unwrap();
        let mut seen = 0;
        let e = stream(&mut f, &path, 11, &mut |d| {
            seen += d.len();
            Ok(())
        })
        .unwrap_err();
        assert_eq!(seen, 0, "nothing is handed on from a short file");
        assert!(matches!(e, DeviceFileError::Io { .. }), "{e:?}");
    }
}
