//! The listening socket: created only where nothing but a stale socket of ours could be.

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

/// Why the socket path cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{0}: is a symbolic link; refusing to follow or replace it")]
    Symlink(PathBuf),
    #[error("{0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("{0}: a server is already listening there")]
    InUse(PathBuf),
    #[error("{path}: cannot inspect it")]
    Inspect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot remove the stale socket")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot bind")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The socket file this process created; removed on drop if it is still that file.
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.dev() == self.dev && meta.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds a listening socket at `path`. An existing path is replaced only if it is a socket
/// nobody listens on (a server that was killed leaves one); a symlink or any other file is
/// refused.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketFile), SocketError> {
    let owned = || path.to_path_buf();
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => return Err(SocketError::Symlink(owned())),
        Ok(meta) if !meta.file_type().is_socket() => return Err(SocketError::NotASocket(owned())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(SocketError::InUse(owned())),
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
                    path: owned(),
                    source,
                })?;
            }
            Err(source) => {
                return Err(SocketError::Inspect {
                    path: owned(),
                    source,
                })
            }
        },
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(source) => {
            return Err(SocketError::Inspect {
                path: owned(),
                source,
            })
        }
    }
    // bind(2) never follows a symlink at the last component: it fails if anything is there.
    let listener = UnixListener::bind(path).map_err(|source| SocketError::Bind {
        path: owned(),
        source,
    })?;
    let meta = std::fs::symlink_metadata(path).map_err(|source| SocketError::Inspect {
        path: owned(),
        source,
    })?;
    let file = SocketFile {
        path: owned(),
        dev: meta.dev(),
        ino: meta.ino(),
    };
    Ok((listener, file))
}
