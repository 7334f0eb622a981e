//! Checks guest RAM against the micro guest's reference model once the workload has finished:
//! the first 8 bytes of every region page must hold the value the model says was written last
//! (or 0 for pages never written). This is the ground truth later checks build on.

use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// The expected final image of a micro-guest region.
#[derive(Debug, Clone)]
pub struct Expected {
    pub region_gpa: u64,
    /// Per page: the last value written, or None if never written.
    pub pages: Vec<Option<u64>>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckResult {
    pub pages_checked: u64,
    pub mismatches: u64,
    /// The first mismatching page: (GPA, expected, found).
    pub first_mismatch: Option<(u64, u64, u64)>,
}

pub fn check(mem: &GuestMemory, expected: &Expected) -> CheckResult {
    let mut result = CheckResult {
        pages_checked: 0,
        mismatches: 0,
        first_mismatch: None,
    };
    for (i, want) in expected.pages.iter().enumerate() {
        let gpa = expected.region_gpa + i as u64 * 4096;
        let want = want.unwrap_or(0);
        let found: u64 = mem.read_obj(GuestAddress(gpa)).unwrap_or(!want);
        result.pages_checked += 1;
        if found != want {
            result.mismatches += 1;
            result.first_mismatch.get_or_insert((gpa, want, found));
        }
    }
    result
}
