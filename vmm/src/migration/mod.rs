//! Live migration between hosts over TCP: precopy, postcopy and hybrid, with any dirty tracker.
//!
//! - `protocol`: the framed, checksummed wire format and its message flows (read it first).
//! - `hello`: the Hello (what VM is coming; the description and its check are `machine`'s).
//! - `source` / `dest`: the two state machines; `postcopy_src` / `postcopy_dst` the postcopy
//!   halves (background push, urgent page requests, the `DemandPager` on the destination).
//! - `tls` / `link`: how each connection is secured (TLS 1.3 with certificates or a
//!   pre-shared key, or `--insecure` plain TCP), and the connection type both sides use.
//! - `channels`: precopy pages over several data connections at once (multifd).
//! - `pages`: moving RAM. Status and report (`progress`) and the state (`saved_state`) are
//!   plain data the machine holds, in `machine`.
//!
//! Precopy policy (documented for users in README): round 1 sends all RAM (zero pages as
//! ranges); each later round harvests the tracker and estimates the downtime as
//! dirty bytes / bandwidth measured over the migration so far. When the estimate is under
//! `--downtime-ms`, or after `--max-rounds` rounds, or `--max-precopy-ms`, the source pauses the
//! guest and does the stop-and-copy (precopy) or switches to postcopy (hybrid).

pub mod channels;
pub mod dest;
pub mod devices;
pub mod hello;
pub mod link;
pub mod pages;
pub mod postcopy_dst;
pub mod postcopy_src;
pub mod presend;
pub mod protocol;
pub mod rate;
pub mod source;
pub mod tls;

// The migration's plain data live with the machine, which holds them for the API and the run
// report; the old paths stay valid.
pub use crate::machine::progress::{self, Mode};

// Messages include their source's text (the API answers with `to_string()`, and a refused
// destination sends it to the source) and name it as `source()` too; `vmm`'s error printer skips
// a cause whose text is already shown.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The user's text, not an error.
    #[error("'{0}' is not a tcp://HOST:PORT address")]
    Url(String),
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("migration stream: {0}")]
    Protocol(#[from] protocol::ProtocolError),
    #[error(transparent)]
    Pages(#[from] pages::PagesError),
    /// Why this VM cannot be hosted: the destination's words (sent in `Refuse`), or this side's
    /// own reason that it sends there.
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    /// This destination cannot host the VM for a host reason (`refuse` sends `{reason}: {source}`).
    #[error("the destination refused the VM: {reason}: {source}")]
    RefusedHere {
        reason: &'static str,
        #[source]
        source: crate::sys::SysError,
    },
    /// The other side's words, received in `Abort`.
    #[error("the other side aborted: {0}")]
    Aborted(String),
    /// The destination's main connection broke or carried the wrong message during postcopy.
    #[error("the other side aborted: main connection: {0}")]
    MainLost(#[source] protocol::ProtocolError),
    #[error("dirty tracking: {0}")]
    Tracking(#[from] crate::tracking::TrackingError),
    /// A passed-through device failed a migration step: the device, the step and its words.
    #[error("passed-through device {0}")]
    Device(String),
    #[error("pausing the guest: {0}")]
    Pause(#[from] crate::vstate::pause::PauseError),
    #[error(transparent)]
    Snapshot(#[from] crate::machine::saved_state::SnapshotError),
    #[error("demand paging: {0}")]
    Userfault(#[from] crate::userfault::UserfaultError),
    /// Why the VM cannot migrate now: a message for the user (the machine's own state).
    #[error("cannot migrate now: {0}")]
    Busy(String),
    #[error("building the destination VM: {0}")]
    Machine(#[source] crate::machine::MachineError),
    /// A Hello (or a connection of its session) that does not describe a VM this side takes:
    /// a description of the violation.
    #[error("bad Hello from the source: {0}")]
    Hello(String),
    #[error("bad Hello from the source: {what}: {source}")]
    HelloJson {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// Securing the link: credentials, handshake, the peer's identity.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// A data connection failed or disagreed with main: which one, and how.
    #[error("data connection {channel}: {reason}")]
    DataChannel { channel: usize, reason: String },
    /// What timed out: a message.
    #[error("timed out {0}")]
    Timeout(String),
    /// `--dump-final` could not be written (the run itself ended as reported); the machine's
    /// message.
    #[error("{0}")]
    FinalDump(String),
    #[error("writing the memory dump {path}: {source}")]
    Dump {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

// The messages stay those the destination gave for each step before it used `assemble`.
impl From<crate::machine::assemble::AssembleError> for MigrationError {
    fn from(e: crate::machine::assemble::AssembleError) -> Self {
        use crate::machine::assemble::AssembleError as A;
        match e {
            A::Refused { reason } => MigrationError::Refused(reason),
            A::Config { reason } => MigrationError::Hello(reason),
            A::Build(e) | A::Run(e) => MigrationError::Machine(e),
            A::Restore(e) => MigrationError::Snapshot(e),
            A::FinalDump { reason } => MigrationError::FinalDump(reason),
        }
    }
}

/// `tcp://HOST:PORT` -> `HOST:PORT`.
pub fn parse_tcp_url(url: &str) -> Result<String, MigrationError> {
    let rest = url
        .strip_prefix("tcp://")
        .ok_or_else(|| MigrationError::Url(url.to_string()))?;
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(rest.to_string())
        }
        _ => Err(MigrationError::Url(url.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_modes() {
        assert_eq!(
            parse_tcp_url("tcp://10.0.0.2:7000").unwrap(),
            "10.0.0.2:7000"
        );
        assert_eq!(parse_tcp_url("tcp://[::1]:7000").unwrap(), "[::1]:7000");
        for bad in [
            "10.0.0.2:7000",
            "tcp://host",
            "tcp://:7",
            "tcp://h:99999",
            "udp://h:1",
        ] {
            assert!(parse_tcp_url(bad).is_err(), "{bad}");
        }
        assert_eq!("hybrid".parse::<Mode>().unwrap(), Mode::Hybrid);
        assert!("fast".parse::<Mode>().is_err());
    }

    #[test]
    fn a_lost_main_connection_reads_as_before_and_keeps_its_cause() {
        use std::error::Error;
        let e = MigrationError::MainLost(protocol::ProtocolError::Closed);
        assert_eq!(
            e.to_string(),
            format!(
                "the other side aborted: main connection: {}",
                protocol::ProtocolError::Closed
            )
        );
        let cause = e
            .source()
            .and_then(|c| c.downcast_ref::<protocol::ProtocolError>());
        assert!(matches!(cause, Some(protocol::ProtocolError::Closed)));
        let bad = serde_json::from_slice::<hello::Hello>(b"{").unwrap_err();
        let e = MigrationError::HelloJson {
            what: "malformed JSON",
            source: bad,
        };
        assert!(e
            .to_string()
            .starts_with("bad Hello from the source: malformed JSON: "));
        assert!(e.source().is_some_and(|c| c.is::<serde_json::Error>()));
    }

    #[test]
    fn assembly_errors_read_as_the_destinations_own() {
        use crate::machine::assemble::AssembleError;
        let refused = AssembleError::Refused {
            reason: "memory size differs".into(),
        };
        let e = MigrationError::from(refused);
        assert!(matches!(e, MigrationError::Refused(_)));
        assert_eq!(
            e.to_string(),
            "the destination refused the VM: memory size differs"
        );
        let e = MigrationError::from(AssembleError::Config {
            reason: "micro guest mailbox size".into(),
        });
        assert_eq!(
            e.to_string(),
            "bad Hello from the source: micro guest mailbox size"
        );
    }
}
