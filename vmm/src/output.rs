//! Files the VMM writes where someone asked it to (an API client's `snapshot --to DIR` and
//! `migrate --dump-memory FILE`, `--dump-memory` and `--dump-final` on the command line): only
//! new files, owner-only (0600), never through a symbolic link. Whoever chose the path may be a
//! careless user or a script; whatever is already there (a file, a link planted in a shared
//! directory) is left untouched and the write is refused, naming the path and what is there.

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Owner-only: a snapshot or dump is guest RAM.
const FILE_MODE: libc::mode_t = 0o600;
const DIR_MODE: libc::mode_t = 0o700;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Something is at the path already: refused rather than overwritten or followed.
    #[error("{}: {}", path.display(), exists_reason(what))]
    Exists { path: PathBuf, what: &'static str },
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn exists_reason(what: &str) -> String {
    format!(
        "{what} is there already; vmm only creates new files (it never overwrites one or follows \
         a symbolic link)"
    )
}

impl OutputError {
    /// The message without the path, for callers whose own message names it already.
    pub fn reason(&self) -> String {
        match self {
            OutputError::Exists { what, .. } => exists_reason(what),
            OutputError::Io { op, source, .. } => format!("{op}: {source}"),
        }
    }

    fn kind(&self) -> std::io::ErrorKind {
        match self {
            OutputError::Exists { .. } => std::io::ErrorKind::AlreadyExists,
            OutputError::Io { source, .. } => source.kind(),
        }
    }

    /// As an `io::Error` whose text is `reason()` (the caller names the path).
    pub fn into_io(self) -> std::io::Error {
        std::io::Error::new(self.kind(), self.reason())
    }
}

/// What `path` is, without following a link (for the refusal's message).
fn what_is_at(path: &Path) -> &'static str {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => "a symbolic link",
        Ok(m) if m.is_dir() => "a directory",
        Ok(m) if m.is_file() => "a file",
        Ok(_) => "a special file",
        Err(_) => "something",
    }
}

fn c_path(path: &Path) -> Result<CString, OutputError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| OutputError::Io {
        path: path.to_path_buf(),
        op: "the path",
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "contains a NUL byte"),
    })
}

const CREATE_FLAGS: libc::c_int =
    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;

/// openat(dirfd, name, O_CREAT|O_EXCL|O_NOFOLLOW, 0600): `shown` is the path for messages.
fn create_at(dirfd: libc::c_int, name: &CString, shown: &Path) -> Result<File, OutputError> {
    // SAFETY: `name` is a NUL-terminated string that outlives the call; the fd returned, if
    // any, is new and owned by the File below.
    let fd = unsafe { libc::openat(dirfd, name.as_ptr(), CREATE_FLAGS, FILE_MODE) };
    if fd < 0 {
        let source = std::io::Error::last_os_error();
        // O_EXCL answers EEXIST for anything there, a dangling link included.
        return Err(match source.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::ELOOP) => OutputError::Exists {
                path: shown.to_path_buf(),
                what: what_is_at(shown),
            },
            _ => OutputError::Io {
                path: shown.to_path_buf(),
                op: "creating it",
                source,
            },
        });
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Creates `path` as a new owner-only file (O_CREAT | O_EXCL | O_NOFOLLOW, 0600) and opens it
/// for writing. Its directory must exist.
pub fn create_new(path: &Path) -> Result<File, OutputError> {
    create_at(libc::AT_FDCWD, &c_path(path)?, path)
}

/// A directory made for one output (a snapshot): created new (0700), every file inside created
/// relative to its descriptor, so neither a link swapped in for the directory afterwards nor
/// one inside it redirects a write.
pub struct OutputDir {
    path: PathBuf,
    dir: File,
    /// Names created inside, for `discard`.
    created: Vec<CString>,
}

impl OutputDir {
    /// Creates `path` (its parents as needed, as `mkdir -p` would); refuses one that exists.
    pub fn create(path: &Path) -> Result<OutputDir, OutputError> {
        let io = |op: &'static str| {
            move |source| OutputError::Io {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io("creating its parent directories"))?;
        }
        let c = c_path(path)?;
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        if unsafe { libc::mkdir(c.as_ptr(), DIR_MODE) } != 0 {
            let source = std::io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::EEXIST) => OutputError::Exists {
                    path: path.to_path_buf(),
                    what: what_is_at(path),
                },
                _ => io("creating the directory")(source),
            });
        }
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: as above; the fd returned, if any, is owned by the File below.
        let fd = unsafe { libc::open(c.as_ptr(), flags) };
        if fd < 0 {
            return Err(io("opening the new directory")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(OutputDir {
            path: path.to_path_buf(),
            // SAFETY: `fd` was just opened and nothing else owns it.
            dir: unsafe { File::from_raw_fd(fd) },
            created: Vec::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside, for messages.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates the new file `name` (a plain name) inside, owner-only, for writing.
    pub fn create_file(&mut self, name: &str) -> Result<File, OutputError> {
        let shown = self.join(name);
        let c = plain_name(name, &shown)?;
        let f = create_at(self.dir.as_raw_fd(), &c, &shown)?;
        self.created.push(c);
        Ok(f)
    }

    /// Renames `from` to `to` inside, refusing to replace anything at `to`.
    pub fn rename(&mut self, from: &str, to: &str) -> Result<(), OutputError> {
        let shown = self.join(to);
        let (f, t) = (plain_name(from, &shown)?, plain_name(to, &shown)?);
        let fd = self.dir.as_raw_fd();
        // SAFETY: both names are NUL-terminated strings that outlive the call; `fd` is ours.
        let rc = unsafe { libc::renameat2(fd, f.as_ptr(), fd, t.as_ptr(), libc::RENAME_NOREPLACE) };
        if rc != 0 {
            return Err(OutputError::Io {
                path: shown,
                op: "renaming into place",
                source: std::io::Error::last_os_error(),
            });
        }
        self.created.retain(|n| *n != f);
        self.created.push(t);
        Ok(())
    }

    /// Removes what was created inside and the directory itself (a failed snapshot leaves
    /// nothing behind, so the same path can be used again). Best effort: logged, not returned.
    pub fn discard(self) {
        for name in &self.created {
            // SAFETY: `name` is NUL-terminated and outlives the call; the fd is ours.
            if unsafe { libc::unlinkat(self.dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
                tracing::warn!(
                    "cannot remove {}: {}",
                    self.path.join(name.to_string_lossy().as_ref()).display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        if let Err(e) = std::fs::remove_dir(&self.path) {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

/// A name without a slash: files inside an `OutputDir` stay inside it.
fn plain_name(name: &str, shown: &Path) -> Result<CString, OutputError> {
    let bad = |why: &str| OutputError::Io {
        path: shown.to_path_buf(),
        op: "the name",
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, why.to_string()),
    };
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(bad("not a plain file name"));
    }
    CString::new(name).map_err(|_| bad("contains a NUL byte"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn create_new_makes_an_owner_only_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dump");
        create_new(&p).unwrap().write_all(b"ram").unwrap();
        assert_eq!(mode(&p), 0o600);
        assert_eq!(std::fs::read(&p).unwrap(), b"ram");
    }

    #[test]
    fn create_new_refuses_a_symlink_and_leaves_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        let link = dir.path().join("dump");
        symlink(&target, &link).unwrap();
        let e = create_new(&link).unwrap_err();
        assert!(
            matches!(
                e,
                OutputError::Exists {
                    what: "a symbolic link",
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains(&*link.to_string_lossy()), "{e}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        // A dangling link is refused too (O_CREAT alone would create its target).
        let dangling = dir.path().join("dangling");
        symlink(dir.path().join("nowhere"), &dangling).unwrap();
        assert!(create_new(&dangling).is_err());
        assert!(!dir.path().join("nowhere").exists());
    }

    #[test]
    fn create_new_refuses_an_existing_file_without_truncating_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dump");
        std::fs::write(&p, b"old").unwrap();
        let e = create_new(&p).unwrap_err();
        assert!(e.to_string().contains("a file is there already"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
    }

    #[test]
    fn an_output_dir_is_new_owner_only_and_its_files_too() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/snap");
        let mut out = OutputDir::create(&p).unwrap();
        assert_eq!(mode(&p), 0o700);
        out.create_file("memory").unwrap();
        assert_eq!(mode(&p.join("memory")), 0o600);
        out.create_file("vm.json.tmp").unwrap();
        out.rename("vm.json.tmp", "vm.json").unwrap();
        assert!(p.join("vm.json").is_file());
        assert!(out.create_file("../escape").is_err());
        // Existing: refused, whatever it is.
        let e = OutputDir::create(&p).err().unwrap();
        assert!(
            e.to_string().contains("a directory is there already"),
            "{e}"
        );
        let link = dir.path().join("link");
        symlink(dir.path().join("elsewhere"), &link).unwrap();
        assert!(OutputDir::create(&link).is_err());
        assert!(!dir.path().join("elsewhere").exists());
    }

    #[test]
    fn a_symlink_inside_an_output_dir_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, b"keep me").unwrap();
        let p = dir.path().join("snap");
        let mut out = OutputDir::create(&p).unwrap();
        // Planted after the directory was made (by whoever could write there).
        symlink(&target, p.join("memory")).unwrap();
        let e = out.create_file("memory").unwrap_err();
        assert!(matches!(e, OutputError::Exists { .. }), "{e:?}");
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    }

    #[test]
    fn discard_removes_what_was_created() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("snap");
        let mut out = OutputDir::create(&p).unwrap();
        out.create_file("memory").unwrap();
        out.create_file("x.tmp").unwrap();
        out.rename("x.tmp", "x").unwrap();
        out.discard();
        assert!(!p.exists());
    }
}
