//! The Hello frame's JSON: what the source tells the destination about the VM before any
//! memory moves. The description itself and its compatibility check are the machine's
//! (`machine::description`), shared with snapshots.

use serde::{Deserialize, Serialize};

use super::Mode;
use crate::machine::description::VmDescription;

/// The Hello frame's payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub vm: VmDescription,
    pub mode: Mode,
    /// Names the migration's extra connections.
    pub session: u64,
    /// The source's host kind, for the destination's log.
    pub source_host: String,
    /// Data connections the source opens for precopy pages (0: pages go on the main
    /// connection). See `protocol`'s "Data channels".
    #[serde(default)]
    pub channels: u8,
}
