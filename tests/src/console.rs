//! A guest's console file, read while its VMM runs: the agent's result lines, and waiting for
//! one of them with the VMM's own state in the failure message.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::agent_lines;
use crate::process::Bg;

/// The console file's text so far (empty if it does not exist yet).
pub fn console(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// Waits until the console at `path` has an agent line for which `found` holds; fails the test
/// if `vm` ends first (with its stderr and the console) or after `timeout`.
pub fn wait_agent_line(
    path: &Path,
    what: &str,
    found: impl Fn(&str) -> bool,
    timeout: Duration,
    vm: &mut Bg,
) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = agent_lines(&console(path)).into_iter().find(|l| found(l)) {
            return l;
        }
        if let Some(st) = vm.try_wait() {
            panic!(
                "{} ended ({st}) before the agent printed {what}:\n{}\nconsole:\n{}",
                vm.name,
                vm.stderr(),
                console(path)
            );
        }
        assert!(
            Instant::now() < deadline,
            "no agent line {what} within {timeout:?}; {} stderr:\n{}\nconsole:\n{}",
            vm.name,
            vm.stderr(),
            console(path)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the console at `path` has an agent line starting with `prefix`.
pub fn wait_agent(path: &Path, prefix: &str, timeout: Duration, vm: &mut Bg) -> String {
    wait_agent_line(
        path,
        &format!("'{prefix}'"),
        |l| l.starts_with(prefix),
        timeout,
        vm,
    )
}
