//! Opening the host files a user or a peer names (payload, vm.json, disks) without trusting
//! what they are: a FIFO must not block the open, a device must not be read without end, and
//! a block device's size is not its `metadata().len()` (0).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum HostFileError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {path} is a {kind}, not a regular file")]
    NotRegular {
        what: &'static str,
        path: PathBuf,
        kind: &'static str,
    },
    #[error("{what} {path} is {size} bytes; at most {max} are read")]
    TooBig {
        what: &'static str,
        path: PathBuf,
        size: u64,
        max: u64,
    },
}

/// What a file that is not a regular one is, in words for an error message.
pub fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    }
}

/// Opens `path` without blocking on a FIFO (O_NONBLOCK, cleared once the type is known), and
/// returns it only if it is a regular file, or a block device where `block_ok`; with
/// `nofollow`, a symlink as the last component is refused (ELOOP).
fn open_checked(
    path: &Path,
    what: &'static str,
    write: bool,
    block_ok: bool,
    nofollow: bool,
) -> Result<File, HostFileError> {
    let io = |source| HostFileError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | if nofollow { libc::O_NOFOLLOW } else { 0 })
        .open(path)
        .map_err(io)?;
    let t = file.metadata().map_err(io)?.file_type();
    if !(t.is_file() || (block_ok && t.is_block_device())) {
        return Err(HostFileError::NotRegular {
            what,
            path: path.to_owned(),
            kind: kind_of(t),
        });
    }
    // SAFETY: F_GETFL/F_SETFL on a descriptor this function owns; no memory is passed.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0
        // SAFETY: as above.
        || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0
    {
        return Err(io(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Opens a regular file for reading (a FIFO, device or directory is refused, never waited on).
pub fn open_regular(path: &Path, what: &'static str) -> Result<File, HostFileError> {
    open_checked(path, what, false, false, false)
}

/// As `open_regular`, for a file inside a directory this process reads as a whole (a
/// snapshot's): a symlink there is refused rather than followed.
pub fn open_regular_nofollow(path: &Path, what: &'static str) -> Result<File, HostFileError> {
    open_checked(path, what, false, false, true)
}

/// Opens a disk image (a regular file or a block device) for the guest, read-write unless
/// `read_only`; a FIFO, a directory or a character device is refused, never waited on.
pub fn open_disk(path: &Path, read_only: bool) -> Result<File, HostFileError> {
    open_checked(path, "disk", !read_only, true, false)
}

/// Reads a regular file whole, refusing it before reading if it is over `max` bytes.
pub fn read_bounded(path: &Path, what: &'static str, max: u64) -> Result<Vec<u8>, HostFileError> {
    let mut file = open_regular(path, what)?;
    let io = |source| HostFileError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let size = file.metadata().map_err(io)?.len();
    if size > max {
        return Err(HostFileError::TooBig {
            what,
            path: path.to_owned(),
            size,
            max,
        });
    }
    // `take` too: the file may grow between the check and the read.
    let mut bytes = Vec::with_capacity(size as usize);
    (&mut file)
        .take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > max {
        return Err(HostFileError::TooBig {
            what,
            path: path.to_owned(),
            size: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes)
}

/// A disk's size in bytes: a regular file or a block device, measured by seeking to its end
/// (a block device's metadata says 0 bytes).
pub fn disk_bytes(path: &Path) -> Result<u64, HostFileError> {
    let mut file = open_checked(path, "disk", false, true, false)?;
    file.seek(SeekFrom::End(0))
        .map_err(|source| HostFileError::Io {
            what: "disk",
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_bounded(&fifo, "payload", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        assert!(disk_bytes(&fifo).is_err());
    }

    #[test]
    fn devices_and_directories_are_refused_and_sizes_are_bounded() {
        let e = read_bounded(Path::new("/dev/zero"), "payload", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let e = read_bounded(dir.path(), "vm.json", 1 << 20).unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        let f = dir.path().join("big");
        std::fs::write(&f, vec![1u8; 100]).unwrap();
        let e = read_bounded(&f, "vm.json", 99).unwrap_err();
        assert!(matches!(e, HostFileError::TooBig { size: 100, .. }), "{e}");
        assert_eq!(read_bounded(&f, "vm.json", 100).unwrap().len(), 100);
        assert_eq!(disk_bytes(&f).unwrap(), 100);
    }
}
