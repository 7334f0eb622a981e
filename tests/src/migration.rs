//! What the migration tests drive alike: the plain-TCP `migrate` command. Shared so that every
//! test asks for a migration the same way, and a change to it is made once.

use std::path::Path;

use crate::process::remote;

/// `vmm remote migrate --insecure --to TO --mode MODE --json EXTRA...` on the API socket `sock`
/// -> (exit code, reply JSON or Null, stderr). Plain TCP, for tests whose fakes, cuts or hosts
/// have no key to share (TLS has tests of its own).
pub fn migrate_insecure(
    sock: &Path,
    to: &str,
    mode: &str,
    extra: &[&str],
) -> (Option<i32>, serde_json::Value, String) {
    let mut args = vec![
        "migrate",
        "--insecure",
        "--to",
        to,
        "--mode",
        mode,
        "--json",
    ];
    args.extend_from_slice(extra);
    remote(sock, &args)
}
