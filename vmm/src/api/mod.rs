//! The control API of a running VM: a Unix stream socket (`vmm run --api-socket PATH`) that
//! takes one JSON object per line and answers each with one JSON line. `vmm remote` is its
//! client.
//!
//! | request | reply (besides `"ok": true`) |
//! |---|---|
//! | `{"cmd":"status"}` | `state` (running, paused, migrating, migrated), `vcpus`, `mem_mib`, `micro_passes`, `uptime_ms`, `migration` (phase, round, bytes, remaining_pages, last report) |
//! | `{"cmd":"pause"}` / `{"cmd":"resume"}` | — |
//! | `{"cmd":"console","input":"TEXT"}` | `bytes`: TEXT plus a newline typed on the guest console |
//! | `{"cmd":"migrate","to":"tcp://HOST:PORT","mode":"precopy"\|"postcopy"\|"hybrid","tracker":"bitmap",`<br>`"downtime_ms":300,"bandwidth_mib_s":null,"max_rounds":30,"max_precopy_ms":60000,"dump_memory":null}` | `report`: the migration's metrics, sent when it ends; the VM exits after a successful one |
//!
//! Any failure answers `{"ok":false,"error":"..."}` and changes nothing (a failed migration
//! leaves the guest running here). Requests on one connection are served in order; use another
//! connection to ask for `status` while a `migrate` runs.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    Console {
        input: String,
    },
    Migrate {
        to: String,
        #[serde(default = "default_mode")]
        mode: String,
        #[serde(default = "default_tracker")]
        tracker: String,
        #[serde(default = "default_downtime")]
        downtime_ms: u64,
        #[serde(default)]
        bandwidth_mib_s: Option<u64>,
        #[serde(default = "default_rounds")]
        max_rounds: u32,
        #[serde(default = "default_precopy_ms")]
        max_precopy_ms: u64,
        #[serde(default)]
        dump_memory: Option<std::path::PathBuf>,
    },
}

fn default_mode() -> String {
    "precopy".into()
}
fn default_tracker() -> String {
    "bitmap".into()
}
fn default_downtime() -> u64 {
    300
}
fn default_rounds() -> u32 {
    30
}
fn default_precopy_ms() -> u64 {
    60_000
}
