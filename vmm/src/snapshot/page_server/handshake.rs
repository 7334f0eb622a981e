//! The handshake of a page-server session: the restoring vmm's `Hello` (its memory layout and
//! backend) and the server's `Ready`, and the server's check of the `Hello`.

use serde::{Deserialize, Serialize};

use super::PageServerError;
use crate::memory::RamRange;
use crate::snapshot::page_proto::PAGE;
use crate::userfault::DemandKind;

/// One RAM range as the restoring process maps it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireRange {
    pub gpa: u64,
    pub size: u64,
    pub file_offset: u64,
    /// Host address of its mapping in the restoring process (uffd backends).
    pub host: u64,
}

/// The JSON `Hello`: what the server needs to serve one restore.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Handshake {
    pub backend: String,
    pub ranges: Vec<WireRange>,
    /// Pages (gpa, count) that hold data in the snapshot and are missing.
    pub pending: Vec<(u64, u64)>,
    pub chunk: u64,
    pub prefetch: bool,
    /// What the descriptors attached to `Hello` are, in order: "uffd", "memfd".
    pub fds: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ready {
    pub session: u64,
    pub pid: u32,
}

pub(super) fn ranges_of(w: &[WireRange]) -> Vec<RamRange> {
    w.iter()
        .map(|r| RamRange {
            gpa: r.gpa,
            size: r.size,
            file_offset: r.file_offset,
        })
        .collect()
}

/// Checks a handshake against the snapshot's memory file of `mem_len` bytes; the backend it
/// names.
pub(super) fn check_handshake(
    h: &Handshake,
    mem_len: u64,
    nfds: usize,
) -> Result<DemandKind, PageServerError> {
    let kind: DemandKind = h.backend.parse().map_err(PageServerError::Backend)?;
    let refused = |why: String| Err(PageServerError::Refused(why));
    if h.ranges.is_empty() {
        return refused("no RAM ranges".into());
    }
    for r in &h.ranges {
        if r.gpa % PAGE != 0 || r.size % PAGE != 0 || r.file_offset % PAGE != 0 || r.size == 0 {
            return refused(format!("RAM range {r:?} is not page aligned"));
        }
        let end = r.file_offset.checked_add(r.size);
        if end.is_none_or(|e| e > mem_len) || r.gpa.checked_add(r.size).is_none() {
            return refused(format!(
                "RAM range {r:?} lies outside the snapshot's memory file ({mem_len} bytes): \
                 not the snapshot this vmm restores?"
            ));
        }
    }
    let ranges = ranges_of(&h.ranges);
    for &(gpa, n) in &h.pending {
        let len = n.checked_mul(PAGE);
        let inside = len.is_some_and(|len| {
            ranges
                .iter()
                .any(|r| gpa >= r.gpa && len <= r.size && gpa - r.gpa <= r.size - len)
        });
        if gpa % PAGE != 0 || !inside {
            return refused(format!("pending run 0x{gpa:x}+{n} pages is not guest RAM"));
        }
    }
    if !h.chunk.is_power_of_two() || !(PAGE..=2 << 20).contains(&h.chunk) {
        return refused(format!("chunk {} is not a power of two in 4K..2M", h.chunk));
    }
    let expect = kind.handed_fds();
    if h.fds != expect {
        return refused(format!(
            "{}: descriptors {:?} announced, expected {expect:?}",
            h.backend, h.fds
        ));
    }
    if nfds != expect.len() {
        return refused(format!(
            "{} descriptors announced but {nfds} received",
            expect.len()
        ));
    }
    Ok(kind)
}
