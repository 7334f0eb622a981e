//! A vmm process running in the background (a migration source or destination): its stderr
//! collected as it comes, waits with deadlines, and its JSON report at the end.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub struct Bg {
    pub name: String,
    child: Child,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    /// The threads reading stdout and stderr: joined once the process ended, so nothing it
    /// printed is lost.
    readers: Vec<JoinHandle<()>>,
}

fn lock(m: &Mutex<String>) -> std::sync::MutexGuard<'_, String> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn collect(mut r: impl Read + Send + 'static, into: Arc<Mutex<String>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            lock(&into).push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
}

impl Bg {
    /// Spawns `cmd` (stdin null, stdout and stderr collected).
    pub fn spawn(name: &str, mut cmd: Command) -> Bg {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stderr.take().unwrap(), stderr.clone()),
            collect(child.stdout.take().unwrap(), stdout.clone()),
        ];
        Bg {
            name: name.to_string(),
            child,
            stderr,
            stdout,
            readers,
        }
    }

    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// Waits until stderr contains `text`; panics with the log after `timeout` or if the
    /// process ends first.
    pub fn wait_for(&mut self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr().contains(text) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "{} ended ({st}) before printing '{text}':\n{}",
                    self.name,
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: no '{text}' within {timeout:?}:\n{}",
                self.name,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit (killing the process and failing the test after `timeout`); returns
    /// (exit status, all of stdout, all of stderr).
    pub fn wait_output(mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "{} did not exit within {timeout:?}:\n{}",
                    self.name,
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The pipes close when the process (and whatever inherited them) is gone.
        for r in std::mem::take(&mut self.readers) {
            let _ = r.join();
        }
        let out = lock(&self.stdout).clone();
        (status, out, self.stderr())
    }

    /// Waits for the exit; returns (exit code, the last stdout line as JSON if any, stderr).
    pub fn finish(self, timeout: Duration) -> (Option<i32>, serde_json::Value, String) {
        let name = self.name.clone();
        let (status, out, err) = self.wait_output(timeout);
        let report = out
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or(serde_json::Value::Null);
        assert!(!err.contains("panicked"), "{name} panicked:\n{err}");
        (status.code(), report, err)
    }

    /// Kills the process with SIGKILL (a device server dying without a word) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id (to send it a signal).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `vmm remote --api-socket SOCK ARGS...` -> (exit code, reply JSON or Null, stderr).
pub fn remote(sock: &Path, args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let mut all = vec!["remote", "--api-socket", sock.to_str().unwrap()];
    all.extend_from_slice(args);
    let run = crate::vmm(&all);
    let v = serde_json::from_str(run.stdout.trim()).unwrap_or(serde_json::Value::Null);
    run.assert_no_panic();
    (run.code(), v, run.stderr)
}

/// Waits until the API socket answers `status`; returns the reply.
pub fn wait_api(sock: &Path, timeout: Duration) -> serde_json::Value {
    let deadline = Instant::now() + timeout;
    loop {
        if sock.exists() {
            let (code, v, _) = remote(sock, &["status", "--json"]);
            if code == Some(0) {
                return v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "API socket {} never answered",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP port free on 127.0.0.1 right now (the kernel picks it; no fixed fallback that two
/// tests could share).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free TCP port on 127.0.0.1: {e}"))
}
