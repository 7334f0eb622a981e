//! The control API of a running VM: a Unix stream socket (`vmm run --api-socket PATH`) that
//! takes one JSON object per line and answers each with one JSON line. `vmm remote` is its
//! client.
//!
//! | request | reply (besides `"ok": true`) |
//! |---|---|
//! | `{"cmd":"status"}` | `state` (running, paused, migrating, migrated), `vcpus`, `mem_mib`, `micro_passes`, `micro_budget` (the micro guest's budget, 0 = forever; null for Linux), `uptime_ms`, `migration` (phase, round, bytes, remaining_pages, last report) |
//! | `{"cmd":"pause"}` / `{"cmd":"resume"}` | — |
//! | `{"cmd":"finish","after":N}` | `passes`: T, the micro guest's new budget: every vCPU ends after pass T = (furthest vCPU's current pass) + N, and the run is checked against the model of T passes. Refused for Linux, a raw `--payload`, during a migration or snapshot, N = 0, a budget already reached, or T beyond 64 bits. A guest paused with `pause` stays paused |
//! | `{"cmd":"console","input":"TEXT"}` | `bytes`: TEXT plus a newline typed on the guest console |
//! | `{"cmd":"migrate","to":"tcp://HOST:PORT","mode":"precopy"\|"postcopy"\|"hybrid","tracker":"bitmap",`<br>`"downtime_ms":300,"bandwidth_mib_s":null,"max_rounds":30,"max_precopy_ms":60000,"dump_memory":null,`<br>exactly one of `"tls_dir":"DIR"`, `"tls_psk":"FILE"`, `"insecure":true`; with tls_dir optionally `"tls_hostname"`, `"tls_authz"`}` | `report`: the migration's metrics (`transport` names how the link was secured), sent when it ends; the VM exits after a successful one |
//!
//! | `{"cmd":"snapshot","to":"DIR","exit":false}` | `snapshot`: directory, data pages, pause time; with `exit` the VM then ends |
//!
//! Any failure answers `{"ok":false,"error":"..."}` and changes nothing (a failed migration
//! leaves the guest running here). Requests on one connection are served in order; use another
//! connection to ask for `status` while a `migrate` runs.
//!
//! Who may connect, how many at once, how long a request may take, and what may lie at the
//! socket path: `server`'s module comment. Files the API writes are created new, owner-only,
//! never through a link (`crate::output`).

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The message `Mode`'s parser gives (its `FromStr` also serves clap).
    #[error("{0}")]
    Mode(String),
    #[error(transparent)]
    Tracker(#[from] crate::tracking::TrackingError),
    /// The message `DeviceDirty`'s parser gives.
    #[error("{0}")]
    DeviceDirty(String),
    #[error("--channels {0}: at most {max} data connections", max = crate::migration::protocol::MAX_DATA_CHANNELS)]
    Channels(u8),
    #[error(transparent)]
    Transport(#[from] crate::migration::tls::TlsError),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Pause,
    Resume,
    /// Micro guest: end every vCPU after `after` more passes than the furthest one has reached
    /// (`micro_finish`).
    Finish {
        after: u64,
    },
    Console {
        input: String,
    },
    /// Boxed: the largest request by far (serde reads and writes it as if it were not).
    Migrate(Box<MigrateParams>),
    Snapshot(SnapshotParams),
}

/// A snapshot request (`vmm snapshot`, `vmm remote ... snapshot`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, clap::Args)]
pub struct SnapshotParams {
    /// New directory to write the snapshot into (vm.json and memory; refused if anything is
    /// there already: `output::OutputDir`).
    #[arg(long)]
    pub to: std::path::PathBuf,
    /// End the VM after the snapshot instead of resuming it.
    #[arg(long)]
    #[serde(default)]
    pub exit: bool,
}

/// A migration request: the same fields on the command line (`vmm remote ... migrate`) and in
/// the API's JSON.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, clap::Args)]
pub struct MigrateParams {
    /// tcp://HOST:PORT of the destination (`vmm run --incoming tcp://ADDR:PORT`).
    #[arg(long)]
    pub to: String,
    /// precopy, postcopy, or hybrid (precopy rounds, then postcopy).
    #[arg(long, default_value = "precopy")]
    #[serde(default = "default_mode")]
    pub mode: String,
    /// Dirty tracker for the precopy rounds (see `vmm backends`).
    #[arg(long, default_value = "bitmap")]
    #[serde(default = "default_tracker")]
    pub tracker: String,
    /// Switch over once the estimated downtime is below this.
    #[arg(long, default_value_t = 300)]
    #[serde(default = "default_downtime")]
    pub downtime_ms: u64,
    /// Bandwidth cap in MiB/s (default: unlimited).
    #[arg(long)]
    #[serde(default)]
    pub bandwidth_mib_s: Option<u64>,
    /// Data connections for the precopy pages, each with a thread on both sides (QEMU's
    /// multifd channels); 0 sends them on the main connection. Postcopy uses none.
    #[arg(long, default_value_t = crate::migration::source::DEFAULT_CHANNELS)]
    #[serde(default = "default_channels")]
    pub channels: u8,
    /// Switch over after this many precopy rounds at most.
    #[arg(long, default_value_t = 30)]
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// Switch over after this long in precopy at most.
    #[arg(long, default_value_t = 60_000)]
    #[serde(default = "default_precopy_ms")]
    pub max_precopy_ms: u64,
    /// Write guest RAM as it is at the pause into this new file (for byte-for-byte checks;
    /// refused if anything is there already, a link included).
    #[arg(long)]
    #[serde(default)]
    pub dump_memory: Option<std::path::PathBuf>,
    /// How passed-through devices' DMA into guest RAM is tracked: log (the device's own DMA
    /// log; refused if it has none), iommu (the IOMMU's dirty bits: type1 or iommufd HWPT,
    /// kernel VFIO only), all-pinned (every pinned page counts as written at every
    /// round), or off (debugging only: device writes after a page was sent are lost).
    #[arg(long, default_value = "log")]
    #[serde(default = "default_device_dirty")]
    pub device_dirty: String,
    /// How the link is secured: exactly one of tls_dir, tls_psk and insecure.
    #[command(flatten)]
    #[serde(flatten)]
    pub transport: crate::migration::tls::TransportArgs,
    /// With --tls-dir: the name the destination's certificate must carry instead of the host
    /// in --to.
    #[arg(long, value_name = "NAME")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
    /// With --tls-dir: the destination's certificate must also carry NAME as a DNS name or
    /// as its subject's CN (QEMU's tls-authz).
    #[arg(long, value_name = "NAME")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
}

impl MigrateParams {
    /// Checks the names and builds the migration's options.
    pub fn options(&self) -> Result<crate::migration::source::MigrateOptions, ApiError> {
        Ok(crate::migration::source::MigrateOptions {
            to: self.to.clone(),
            mode: self.mode.parse().map_err(ApiError::Mode)?,
            tracker: self.tracker.parse()?,
            downtime_ms: self.downtime_ms,
            bandwidth_mib_s: self.bandwidth_mib_s,
            max_rounds: self.max_rounds.max(1),
            max_precopy_ms: self.max_precopy_ms,
            dump_memory: self.dump_memory.clone(),
            device_dirty: self.device_dirty.parse().map_err(ApiError::DeviceDirty)?,
            channels: match self.channels {
                n if n <= crate::migration::protocol::MAX_DATA_CHANNELS => n,
                n => return Err(ApiError::Channels(n)),
            },
            transport: crate::migration::tls::Transport::choose(
                &self.transport,
                self.tls_authz.as_deref(),
                self.tls_hostname.as_deref(),
            )?,
        })
    }
}

fn default_channels() -> u8 {
    crate::migration::source::DEFAULT_CHANNELS
}
fn default_device_dirty() -> String {
    "log".into()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_with_defaults_and_refuse_junk() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"migrate","to":"tcp://h:1","insecure":true}"#).unwrap();
        let Request::Migrate(p) = r else {
            panic!("not a migrate request")
        };
        assert_eq!(
            (p.mode.as_str(), p.downtime_ms, p.max_rounds),
            ("precopy", 300, 30)
        );
        assert!(p.options().is_ok());
        // No way chosen to secure the link: refused, naming the three.
        let r: Request = serde_json::from_str(r#"{"cmd":"migrate","to":"tcp://h:1"}"#).unwrap();
        let Request::Migrate(open) = r else {
            panic!("not a migrate request")
        };
        let e = open.options().unwrap_err().to_string();
        assert!(e.contains("--tls-psk") && e.contains("--insecure"), "{e}");
        let bad = MigrateParams {
            tracker: "nope".into(),
            ..*p.clone()
        };
        assert!(bad.options().is_err());
        assert_eq!(
            p.channels,
            crate::migration::source::DEFAULT_CHANNELS,
            "a request without channels gets the default"
        );
        let many = MigrateParams {
            channels: crate::migration::protocol::MAX_DATA_CHANNELS + 1,
            ..*p.clone()
        };
        let e = many.options().unwrap_err().to_string();
        assert!(e.contains("at most 8 data connections"), "{e}");
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"console","input":"x"}"#).unwrap(),
            Request::Console { input: "x".into() }
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"finish","after":50}"#).unwrap(),
            Request::Finish { after: 50 }
        );
        assert_eq!(
            serde_json::to_string(&Request::Finish { after: 3 }).unwrap(),
            r#"{"cmd":"finish","after":3}"#
        );
        for bad in [
            r#"{"cmd":"finish"}"#,
            r#"{"cmd":"finish","after":-1}"#,
            r#"{"cmd":"finish","after":18446744073709551616}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }
}
