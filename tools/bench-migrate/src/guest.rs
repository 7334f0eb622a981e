//! What both runners share: child processes that die with their guard, waiting on a console log,
//! the guest images and the agent's lines.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} exited ({status}) while waiting for {waiting_for}; see {log}")]
    Exited {
        what: String,
        status: std::process::ExitStatus,
        waiting_for: String,
        log: PathBuf,
    },
    #[error("no {waiting_for} in {log} within {secs} s")]
    Timeout {
        waiting_for: String,
        log: PathBuf,
        secs: u64,
    },
    #[error("the guest kernel panicked; see {log}")]
    Panic { log: PathBuf },
}

/// A child process that is killed (SIGKILL) and reaped when the guard goes out of scope, so no
/// error path leaves a VM running.
pub struct ChildGuard {
    pub what: String,
    pub child: Child,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin from /dev/null and stdout/stderr into `log`.
    pub fn spawn(what: &str, mut cmd: Command, log: &Path) -> Result<Self, GuestError> {
        let create = |path: &Path| {
            std::fs::File::create(path).map_err(|source| GuestError::Create {
                path: path.to_path_buf(),
                source,
            })
        };
        let out = create(log)?;
        let err = out.try_clone().map_err(|source| GuestError::Create {
            path: log.to_path_buf(),
            source,
        })?;
        tracing::debug!("spawn {what}: {cmd:?}");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|source| GuestError::Spawn {
                what: what.to_string(),
                source,
            })?;
        Ok(ChildGuard {
            what: what.to_string(),
            child,
        })
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.exited().is_none() {
            tracing::debug!("killing {} (pid {})", self.what, self.child.id());
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The lines of `text` that are whole (newline-terminated), without their line ends. The line
/// being written is left for the next look: a console file grows as the guest prints, and a
/// serial port (QEMU's) delivers a line a few bytes at a time, so a half-written
/// `workload-verify checksum=` must not be read as the answer.
pub fn complete_lines(text: &str) -> impl Iterator<Item = &str> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| l.trim_end_matches('\n').trim_end_matches('\r'))
}

/// Polls `log` until a line satisfies `pred` and returns it. Fails early if `proc` exits or the
/// guest kernel panics.
pub fn wait_for_line(
    log: &Path,
    waiting_for: &str,
    pred: impl Fn(&str) -> bool,
    timeout: Duration,
    mut proc: Option<&mut ChildGuard>,
) -> Result<String, GuestError> {
    let start = Instant::now();
    loop {
        // Read as bytes: a console log may hold anything the guest printed.
        if let Ok(bytes) = std::fs::read(log) {
            let text = String::from_utf8_lossy(&bytes);
            for line in complete_lines(&text) {
                if pred(line) {
                    return Ok(line.to_string());
                }
                if line.contains("Kernel panic") {
                    return Err(GuestError::Panic {
                        log: log.to_path_buf(),
                    });
                }
            }
        }
        if let Some(p) = proc.as_deref_mut() {
            if let Some(status) = p.exited() {
                return Err(GuestError::Exited {
                    what: p.what.clone(),
                    status,
                    waiting_for: waiting_for.to_string(),
                    log: log.to_path_buf(),
                });
            }
        }
        if start.elapsed() > timeout {
            return Err(GuestError::Timeout {
                waiting_for: waiting_for.to_string(),
                log: log.to_path_buf(),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `proc` listens on TCP `port` (IPv4 or IPv6), read from /proc/PID/net/tcp*, which
/// shows the process's own network namespace. Probing by connecting would hand the destination
/// a bogus migration stream.
pub fn wait_listening(
    proc: &mut ChildGuard,
    port: u16,
    timeout: Duration,
    log: &Path,
) -> Result<(), GuestError> {
    let start = Instant::now();
    let pid = proc.child.id();
    loop {
        let listening = ["tcp", "tcp6"].iter().any(|f| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
                .is_ok_and(|t| t.lines().skip(1).any(|l| is_listen_line(l, port)))
        });
        if listening {
            return Ok(());
        }
        if let Some(status) = proc.exited() {
            return Err(GuestError::Exited {
                what: proc.what.clone(),
                status,
                waiting_for: format!("a listening socket on port {port}"),
                log: log.to_path_buf(),
            });
        }
        if start.elapsed() > timeout {
            return Err(GuestError::Timeout {
                waiting_for: format!("a socket listening on port {port}"),
                log: log.to_path_buf(),
                secs: timeout.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A /proc/net/tcp line (`sl local rem st ...`) of a socket listening (st 0A) on `port`.
fn is_listen_line(line: &str, port: u16) -> bool {
    let mut f = line.split_whitespace();
    let (Some(_), Some(local), Some(_), Some(st)) = (f.next(), f.next(), f.next(), f.next()) else {
        return false;
    };
    st == "0A"
        && local
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            == Some(port)
}

/// The agent's result text on a console line (`AGENT: workload-verify ...` -> `workload-verify
/// ...`), if the line is one.
pub fn agent_result(line: &str) -> Option<&str> {
    line.split_once(guest_abi::agent::RESULT_PREFIX)
        .map(|(_, rest)| rest.trim())
}

/// A line the endless workload prints once it runs (after its first pass).
pub fn is_workload_running(line: &str) -> bool {
    agent_result(line).is_some_and(|r| r.starts_with("workload pass="))
}

/// The agent's answer to `workload-verify`.
pub fn is_verify_result(line: &str) -> bool {
    agent_result(line).is_some_and(|r| r.starts_with("workload-verify"))
}

/// The agent's answer to `vfio-workload,BDF,stop`: its result (`vfio-workload BDF stopped=...`)
/// or its refusal (`error vfio-workload: ...`), either of which ends the wait.
pub fn is_device_stop_result(line: &str) -> bool {
    agent_result(line)
        .is_some_and(|r| r.starts_with("vfio-workload ") || r.starts_with("error vfio-workload:"))
}

/// Whether a `workload-verify` (or `vfio-workload` stop) answer says the memory survived.
pub fn verify_ok(line: &str) -> bool {
    agent_result(line).is_some_and(|r| r.split_whitespace().any(|w| w == "ok=true"))
}

/// Kernel and initramfs: explicit paths or guest-images/out/images.env.
pub fn images(
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    use anyhow::Context;
    if let (Some(k), Some(i)) = (kernel.clone(), initrd.clone()) {
        return Ok((k, i));
    }
    let env_path = vmm_tests::workspace_root().join("guest-images/out/images.env");
    let env = std::fs::read_to_string(&env_path).with_context(|| {
        format!(
            "{} missing: run guest-images/build.sh (or pass --kernel and --initrd)",
            env_path.display()
        )
    })?;
    let get = |key: &str| {
        env.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(|v| PathBuf::from(v.trim().trim_matches('"')))
            .with_context(|| format!("{key} missing from {}", env_path.display()))
    };
    let k = kernel.map_or_else(|| get("VMM_KERNEL"), Ok)?;
    let i = initrd.map_or_else(|| get("VMM_INITRAMFS"), Ok)?;
    for p in [&k, &i] {
        anyhow::ensure!(
            p.is_file(),
            "{} missing: run guest-images/build.sh",
            p.display()
        );
    }
    Ok((k, i))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_lines_are_recognised() {
        assert!(is_workload_running(
            "AGENT: workload pass=1 checksum=0123456789abcdef"
        ));
        assert!(!is_workload_running("workload,32,random,0"));
        let good = "AGENT: workload-verify checksum=1 expected=1 ok=true bad_pages=0";
        let bad = "AGENT: workload-verify checksum=1 expected=2 ok=false bad_pages=3";
        assert!(is_verify_result(good) && verify_ok(good));
        assert!(is_verify_result(bad) && !verify_ok(bad));
        // The console's echo of the typed command is not an answer.
        assert!(!is_verify_result("workload-stop;workload-verify"));
        let pw = "AGENT: vfio-workload 0000:00:01.0 stopped=dma written=9 pages=4 ok=true ms=5";
        let refused = "AGENT: error vfio-workload: after 9 writes 2 of 4 pages are wrong";
        assert!(is_device_stop_result(pw) && verify_ok(pw));
        assert!(is_device_stop_result(refused) && !verify_ok(refused));
        assert!(!is_device_stop_result(
            "AGENT: vfio-workload,0000:00:01.0,stop"
        ));
        assert!(!is_device_stop_result(
            "vfio-workload 0000:00:01.0 stopped=dma ok=true"
        ));
    }

    #[test]
    fn only_whole_lines_are_read() {
        let text =
            "a\r\nAGENT: workload-verify checksum=1 expected=1 ok=true\nAGENT: workload-verify che";
        let lines: Vec<&str> = complete_lines(text).collect();
        assert_eq!(
            lines,
            ["a", "AGENT: workload-verify checksum=1 expected=1 ok=true"]
        );
        assert_eq!(complete_lines("half").count(), 0);
    }

    #[test]
    fn proc_net_tcp_listen_lines() {
        let listen = "   0: 0202D50A:1131 00000000:0000 0A 00000000:00000000 00:00000000 00000000";
        let established = "   1: 0202D50A:1131 0102D50A:9C40 01 00000000:00000000 00:00000000";
        assert!(is_listen_line(listen, 0x1131));
        assert!(!is_listen_line(listen, 0x1132));
        assert!(!is_listen_line(established, 0x1131));
        assert!(!is_listen_line("garbage", 1));
    }
}
