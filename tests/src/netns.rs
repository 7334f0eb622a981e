//! Two "hosts" on one machine for migration tests: network namespaces `NAME-a` and `NAME-b`
//! joined by a veth pair, made and removed by `tools/two-hosts.sh`. Dropping a [`TwoHosts`]
//! removes both namespaces (and ends whatever still runs inside them), also when a test panics.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Errors from setting up or entering the namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot run {script}: {source}")]
    Spawn {
        script: PathBuf,
        source: std::io::Error,
    },
    #[error("two-hosts.sh up {name} failed ({status}): {stderr}")]
    Up {
        name: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("two-hosts.sh up {name} printed no usable JSON ({reason}): {stdout}")]
    BadOutput {
        name: String,
        reason: String,
        stdout: String,
    },
    #[error("cannot open namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setns into {path} failed: {source}")]
    Setns {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One end of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Side {
    fn suffix(self) -> &'static str {
        match self {
            Side::A => "a",
            Side::B => "b",
        }
    }
}

/// The tool script: `$VMM_TWO_HOSTS` or tools/two-hosts.sh of this checkout.
pub fn script() -> PathBuf {
    std::env::var_os("VMM_TWO_HOSTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("tools/two-hosts.sh"))
}

/// A pair of namespaces that exists until this value is dropped.
#[derive(Debug)]
pub struct TwoHosts {
    pub name: String,
    pub addr_a: Ipv4Addr,
    pub addr_b: Ipv4Addr,
}

impl TwoHosts {
    /// Creates `NAME-a` and `NAME-b` (root only). A pair left over under the same name by an
    /// earlier, killed run is removed first.
    pub fn up(name: &str) -> Result<Self, NetnsError> {
        let script = script();
        let spawn_err = |source| NetnsError::Spawn {
            script: script.clone(),
            source,
        };
        // Leftovers from a run that was killed before its Drop ran.
        let _ = Command::new(&script)
            .args(["down", name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let out = Command::new(&script)
            .args(["up", name, "--json"])
            .stdin(Stdio::null())
            .output()
            .map_err(spawn_err)?;
        if !out.status.success() {
            return Err(NetnsError::Up {
                name: name.to_string(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        // From here on the namespaces exist: let Drop remove them if parsing fails.
        let mut hosts = TwoHosts {
            name: name.to_string(),
            addr_a: Ipv4Addr::UNSPECIFIED,
            addr_b: Ipv4Addr::UNSPECIFIED,
        };
        let bad = |reason: String| NetnsError::BadOutput {
            name: name.to_string(),
            reason,
            stdout: stdout.clone(),
        };
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .ok_or_else(|| bad("no JSON line".into()))?;
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let addr = |key: &str| -> Result<Ipv4Addr, NetnsError> {
            v[key]
                .as_str()
                .ok_or_else(|| bad(format!("{key} missing")))?
                .parse()
                .map_err(|e| bad(format!("{key}: {e}")))
        };
        hosts.addr_a = addr("addr_a")?;
        hosts.addr_b = addr("addr_b")?;
        Ok(hosts)
    }

    /// The namespace's name (`NAME-a` or `NAME-b`).
    pub fn namespace(&self, side: Side) -> String {
        format!("{}-{}", self.name, side.suffix())
    }

    /// The address of `side` on the veth link.
    pub fn addr(&self, side: Side) -> Ipv4Addr {
        match side {
            Side::A => self.addr_a,
            Side::B => self.addr_b,
        }
    }

    /// A command that runs `program` inside `side`'s namespace (`ip netns exec NS program`):
    /// add arguments, spawn as usual. `ip netns exec` execs the program, so the child's pid is
    /// the program's and killing the child ends it.
    pub fn command(&self, side: Side, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.namespace(side)])
            .arg(program);
        cmd
    }

    /// Moves the calling thread into `side`'s network namespace (a network namespace is per
    /// thread): sockets it opens afterwards live there. Use it on a thread of its own.
    pub fn enter(&self, side: Side) -> Result<(), NetnsError> {
        enter_namespace(&self.namespace(side))
    }

    /// Removes the namespaces now (Drop does the same, ignoring errors).
    pub fn down(&self) -> std::io::Result<std::process::ExitStatus> {
        Command::new(script())
            .args(["down", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        match self.down() {
            Ok(s) if s.success() => {}
            Ok(s) => eprintln!("two-hosts.sh down {} failed: {s}", self.name),
            Err(e) => eprintln!("two-hosts.sh down {}: {e}", self.name),
        }
    }
}

/// Moves the calling thread into the named network namespace (/run/netns/NAME).
pub fn enter_namespace(name: &str) -> Result<(), NetnsError> {
    let path = PathBuf::from("/run/netns").join(name);
    let file = File::open(&path).map_err(|source| NetnsError::Open {
        path: path.clone(),
        source,
    })?;
    // SAFETY: setns on a valid, open namespace fd; it changes only this thread's namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Setns {
            path,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Whether /run/netns/NAME exists.
pub fn namespace_exists(name: &str) -> bool {
    PathBuf::from("/run/netns").join(name).exists()
}
