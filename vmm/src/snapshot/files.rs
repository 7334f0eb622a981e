//! A snapshot on disk: a directory with `vm.json` (the VM description and its complete saved
//! state, the same JSON a migration sends) and `memory`, guest RAM as laid out in the memory
//! file, sparse: zero pages are holes, so restore knows which pages hold data without reading
//! them (SEEK_DATA / SEEK_HOLE).

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::device_files::DeviceFile;
use crate::machine::description::VmDescription;
use crate::machine::saved_state::VmSnapshot;
use crate::memory::RamRange;
use crate::output::{OutputDir, OutputError};

pub const FORMAT: &str = "vmm-snapshot";
/// 2: device state by device id (`devices::DeviceStates`) instead of a field per device type.
pub const VERSION: u32 = 2;
pub const MANIFEST: &str = "vm.json";
pub const MEMORY: &str = "memory";
/// The most a vm.json is read: a description and saved state are kilobytes (a few MiB with
/// many vCPUs' XSAVE areas and device states), so anything larger is not one.
pub const MAX_MANIFEST_BYTES: u64 = 16 << 20;
const PAGE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a vmm snapshot: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path} is snapshot format version {found}; this build reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("encoding the snapshot: {0}")]
    Encode(serde_json::Error),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    HostFile(#[from] crate::host_file::HostFileError),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub vm: VmDescription,
    pub state: VmSnapshot,
    /// Pages of `memory` that hold data (the rest are zero).
    pub data_pages: u64,
    /// Host kind the snapshot was taken on.
    pub host: String,
    /// Each passed-through device's own state, a file per device in `--device` order. Absent
    /// in a snapshot of a VM without devices (and in those taken before devices could be
    /// saved), hence no new format version: such a snapshot reads as it always did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceFile>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> SnapshotFileError + '_ {
    move |source| SnapshotFileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// What a snapshot's manifest says besides the RAM it describes.
pub struct Contents<'a> {
    pub vm: &'a VmDescription,
    pub state: &'a VmSnapshot,
    pub host: &'a str,
    /// The device files already written into the directory.
    pub devices: Vec<DeviceFile>,
}

/// Writes guest RAM (sparse) and the manifest into `dir` (made new for this snapshot:
/// `output::OutputDir`, every file owner-only and created, never overwritten). The manifest is
/// written last, under a temporary name first, so a directory with a `vm.json` is always
/// complete (device files included: they are written before it).
pub fn write(
    dir: &mut OutputDir,
    contents: Contents<'_>,
    memfd: &File,
    ranges: &[RamRange],
) -> Result<Manifest, SnapshotFileError> {
    let mem_path = dir.join(MEMORY);
    let out = dir.create_file(MEMORY)?;
    let total: u64 = ranges
        .iter()
        .map(|r| r.file_offset + r.size)
        .max()
        .unwrap_or(0);
    out.set_len(total).map_err(io(&mem_path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut data_pages = 0;
    for r in ranges {
        let mut done = 0u64;
        while done < r.size {
            let n = (r.size - done).min(buf.len() as u64) as usize;
            memfd
                .read_exact_at(&mut buf[..n], r.file_offset + done)
                .map_err(io(&mem_path))?;
            for (i, page) in buf[..n].chunks(PAGE as usize).enumerate() {
                if !is_zero(page) {
                    out.write_all_at(page, r.file_offset + done + i as u64 * PAGE)
                        .map_err(io(&mem_path))?;
                    data_pages += 1;
                }
            }
            done += n as u64;
        }
    }
    out.sync_all().map_err(io(&mem_path))?;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        vm: contents.vm.clone(),
        state: contents.state.clone(),
        data_pages,
        host: contents.host.into(),
        devices: contents.devices,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(SnapshotFileError::Encode)?;
    let tmp_name = format!("{MANIFEST}.tmp");
    let tmp = dir.join(&tmp_name);
    let mut f = dir.create_file(&tmp_name)?;
    f.write_all(&json).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    dir.rename(&tmp_name, MANIFEST)?;
    Ok(manifest)
}

/// Reads and checks a snapshot directory: the manifest, and the memory file's size against
/// the RAM layout it describes.
pub fn read(dir: &Path) -> Result<(Manifest, File), SnapshotFileError> {
    let path = dir.join(MANIFEST);
    let bytes = crate::host_file::read_bounded(&path, "snapshot manifest", MAX_MANIFEST_BYTES)?;
    let head: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| SnapshotFileError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if head.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(SnapshotFileError::Invalid {
            path,
            reason: format!("no \"format\": \"{FORMAT}\" field"),
        });
    }
    let version = head.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
    if version != VERSION {
        return Err(SnapshotFileError::Version {
            path,
            found: version,
        });
    }
    let manifest: Manifest =
        serde_json::from_value(head).map_err(|e| SnapshotFileError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    let mem_path = dir.join(MEMORY);
    let file = crate::host_file::open_regular(&mem_path, "snapshot memory")?;
    let len = file.metadata().map_err(io(&mem_path))?.len();
    let ranges = crate::memory::ram_layout(manifest.vm.mem_bytes);
    let want: u64 = ranges
        .iter()
        .map(|r| r.file_offset + r.size)
        .max()
        .unwrap_or(0);
    let described: Vec<(u64, u64)> = ranges.iter().map(|r| (r.gpa, r.size)).collect();
    if described != manifest.vm.ram {
        return Err(SnapshotFileError::Invalid {
            path,
            reason: format!(
                "RAM ranges {:x?} do not match the layout of {} MiB",
                manifest.vm.ram,
                manifest.vm.mem_bytes >> 20
            ),
        });
    }
    if len != want {
        return Err(SnapshotFileError::Invalid {
            path: mem_path,
            reason: format!("{len} bytes, the VM has {want} bytes of RAM"),
        });
    }
    Ok((manifest, file))
}

/// Runs of pages (gpa, pages) that hold data in a sparse memory file, per RAM range.
pub fn data_runs(file: &File, ranges: &[RamRange]) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut runs = Vec::new();
    for r in ranges {
        let end = r.file_offset + r.size;
        let mut at = r.file_offset;
        while at < end {
            // SAFETY: lseek on a descriptor we own; no memory is passed.
            let data = unsafe { libc::lseek(fd, at as i64, libc::SEEK_DATA) };
            if data < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                return Err(e);
            }
            let data = data as u64;
            if data >= end {
                break;
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let start = data & !(PAGE - 1);
            let stop = (hole as u64).min(end).div_ceil(PAGE) * PAGE;
            runs.push((r.gpa + (start - r.file_offset), (stop - start) / PAGE));
            at = stop;
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory with `manifest` as its vm.json and no memory file (read never gets there).
    fn manifest_dir(manifest: &serde_json::Value) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(MANIFEST), manifest.to_string()).unwrap();
        dir
    }

    #[test]
    fn a_snapshot_of_the_previous_format_is_refused_naming_both_versions() {
        // Version 1 had a field per device type; none of it is read once the version differs.
        let old = serde_json::json!({
            "format": FORMAT,
            "version": 1,
            "state": {"serial": {}, "transports": [], "micro_passes": 0},
        });
        let dir = manifest_dir(&old);
        let e = read(dir.path()).unwrap_err();
        assert!(
            matches!(e, SnapshotFileError::Version { found: 1, .. }),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.ends_with("is snapshot format version 1; this build reads version 2"),
            "{text}"
        );
    }

    #[test]
    fn a_manifest_without_a_version_is_refused_as_version_0() {
        let dir = manifest_dir(&serde_json::json!({"format": FORMAT}));
        let e = read(dir.path()).unwrap_err();
        assert!(
            matches!(e, SnapshotFileError::Version { found: 0, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn data_runs_follow_the_holes() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("m")).unwrap();
        f.set_len(64 * PAGE).unwrap();
        f.write_all_at(&[1u8; 4096], 3 * PAGE).unwrap();
        f.write_all_at(&[1u8; 8192], 40 * PAGE).unwrap();
        let ranges = vec![
            RamRange {
                gpa: 0,
                size: 32 * PAGE,
                file_offset: 0,
            },
            RamRange {
                gpa: 1 << 32,
                size: 32 * PAGE,
                file_offset: 32 * PAGE,
            },
        ];
        let runs = data_runs(&f, &ranges).unwrap();
        assert_eq!(runs, vec![(3 * PAGE, 1), ((1 << 32) + 8 * PAGE, 2)]);
    }
}
