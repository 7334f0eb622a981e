//! Postcopy for a destination whose demand pager cannot see KVM's own accesses
//! (memslot-exits): before the guest leaves, the source sends every pending page that could be
//! a page table or a page KVM writes itself (see `userfault::keep_present`), so that none of
//! them is missing when the destination's vCPUs start. Only the source can find them: they
//! are in every address space of the guest, and only it has their contents. The destination
//! asks for this in its `Accept`; the scan runs while the guest is paused, so it is downtime
//! (reported as `presend_ms`).

use std::fs::File;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use crate::memory::RamRange;
use crate::userfault::keep_present;
use crate::vstate::state::VcpuState;

const PAGE: u64 = 4096;

/// What the destination asks of the source in `Accept` (an empty payload is the default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcceptOptions {
    /// Send pages that could be page tables (and PV/descriptor pages) before `PostcopyStart`.
    #[serde(default)]
    pub presend_page_tables: bool,
}

/// Splits `pending` into the pages to send now and the rest. Reads page contents from the
/// guest-RAM memfd.
pub fn split(
    memfd: &File,
    ranges: &[RamRange],
    pending: &[(u64, u64)],
    vcpus: &[VcpuState],
    phys_bits: u32,
) -> (Vec<u64>, Vec<(u64, u64)>) {
    let read = |gpa: u64| -> Option<Vec<u8>> {
        let r = ranges.iter().find(|r| r.contains(gpa))?;
        let mut page = vec![0u8; PAGE as usize];
        memfd
            .read_exact_at(&mut page, r.file_offset + (gpa - r.gpa))
            .ok()?;
        Some(page)
    };
    let mut now = keep_present::kvm_touched(vcpus, &mut |g| read(g));
    let bits = phys_bits;
    let mut buf = vec![0u8; 1 << 20];
    for &(gpa, n) in pending {
        let Some(r) = ranges.iter().find(|r| r.contains(gpa)) else {
            continue;
        };
        let mut done = 0;
        while done < n {
            let count = (n - done).min(buf.len() as u64 / PAGE);
            let at = gpa + done * PAGE;
            let bytes = &mut buf[..(count * PAGE) as usize];
            if memfd
                .read_exact_at(bytes, r.file_offset + (at - r.gpa))
                .is_ok()
            {
                for (i, page) in bytes.chunks(PAGE as usize).enumerate() {
                    if keep_present::could_be_page_table(page, bits) {
                        now.push(at + i as u64 * PAGE);
                    }
                }
            }
            done += count;
        }
    }
    now.sort_unstable();
    now.dedup();
    let mut rest = Vec::new();
    let mut k = 0;
    for &(gpa, n) in pending {
        let mut run: Option<(u64, u64)> = None;
        for p in 0..n {
            let page = gpa + p * PAGE;
            while k < now.len() && now[k] < page {
                k += 1;
            }
            if k < now.len() && now[k] == page {
                if let Some(r) = run.take() {
                    rest.push(r);
                }
                continue;
            }
            match &mut run {
                Some((_, c)) => *c += 1,
                None => run = Some((page, 1)),
            }
        }
        if let Some(r) = run {
            rest.push(r);
        }
    }
    let pending_now: Vec<u64> = now
        .into_iter()
        .filter(|&g| pending.iter().any(|&(s, n)| g >= s && g < s + n * PAGE))
        .collect();
    (pending_now, rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;

    #[test]
    fn page_table_candidates_leave_the_pending_set() {
        let ram = GuestRam::new(8 << 20).unwrap();
        let f = ram.file();
        // 0x3000: a page-table-like page; 0x4000: random data; 0x5000: zero.
        f.write_all_at(&0x7003u64.to_le_bytes(), 0x3000).unwrap();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut data = vec![0u8; 4096];
        for w in data.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&(x | 1 | 1 << 50).to_le_bytes());
        }
        f.write_all_at(&data, 0x4000).unwrap();
        let (now, rest) = split(f, ram.ranges(), &[(0x2000, 4)], &[], 46);
        assert_eq!(now, vec![0x3000]);
        assert_eq!(rest, vec![(0x2000, 1), (0x4000, 2)]);
        assert_eq!(
            serde_json::from_slice::<AcceptOptions>(b"{}").unwrap(),
            AcceptOptions::default()
        );
    }
}
