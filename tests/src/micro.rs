//! The micro guest as a migration or snapshot source: started with an API socket, and waited on
//! until it has run some passes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{remote, wait_api, Bg};
use crate::vmm_bin;

/// Starts the micro guest (random pattern, 4 MiB region, verified against its model, `passes`
/// passes, `extra` arguments) with its API socket at DIR/src.sock; returns once it answers.
pub fn micro_source(dir: &Path, passes: u64, extra: &[&str]) -> (Bg, PathBuf) {
    let sock = dir.join("src.sock");
    let mut cmd = Command::new(vmm_bin());
    cmd.args(["run", "--micro", "--pattern", "random", "--region-mib", "4"])
        .args([
            "--param",
            "256",
            "--passes",
            &passes.to_string(),
            "--verify",
        ])
        .args(["--console", "none", "--json", "--api-socket"])
        .arg(&sock)
        .args(extra);
    let bg = Bg::spawn("source", cmd);
    wait_api(&sock, Duration::from_secs(20));
    (bg, sock)
}

/// Polls `status` every 10 ms, at most `tries` times, until the guest has run 20 passes, so its
/// memory is no longer as booted.
pub fn wait_some_passes(sock: &Path, tries: u32) {
    for _ in 0..tries {
        let (_, v, _) = remote(sock, &["status", "--json"]);
        if v["micro_passes"].as_u64().unwrap_or(0) >= 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
