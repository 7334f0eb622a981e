//! Checks guest RAM against the micro guest's reference model once the workload has finished:
//! the first 8 bytes of every private region page must hold the value the model says was
//! written last (or 0 for pages never written), and with a shared region every one of its
//! words must hold what the model says (each vCPU's slot its last value, everything else 0).
//! This is the ground truth later checks build on.

use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// The expected final image of a micro-guest region.
#[derive(Clone)]
pub struct Expected {
    pub region_gpa: u64,
    image: Arc<Image>,
}

/// Per page: the last value written, or None if never written. With several vCPUs, their
/// private regions one after the other (`micro_guest::Workload::final_image`).
type Pages = Vec<Option<u64>>;

struct Image {
    ready: OnceLock<Pages>,
    computing: Mutex<Option<JoinHandle<Pages>>>,
}

impl std::fmt::Debug for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Expected")
            .field("region_gpa", &self.region_gpa)
            .field("ready", &self.image.ready.get().map(|p| p.len()))
            .finish()
    }
}

impl Expected {
    pub fn new(region_gpa: u64, pages: Pages) -> Expected {
        let ready = OnceLock::new();
        let _ = ready.set(pages);
        Expected {
            region_gpa,
            image: Arc::new(Image {
                ready,
                computing: Mutex::new(None),
            }),
        }
    }

    /// Computes the image on a background thread: a long workload's model takes seconds, and
    /// a migration's destination must not keep the source waiting for it before it accepts.
    /// None for an endless workload (nothing to check).
    pub fn in_background(region_gpa: u64, workload: micro_guest::Workload) -> Option<Expected> {
        if workload.passes() == 0 {
            return None;
        }
        let handle = std::thread::Builder::new()
            .name("micro-model".into())
            .spawn(move || workload.final_image().unwrap_or_default())
            .ok();
        let image = Image {
            ready: OnceLock::new(),
            computing: Mutex::new(handle),
        };
        Some(Expected {
            region_gpa,
            image: Arc::new(image),
        })
    }

    /// The image, waiting for the background computation if it still runs.
    pub fn pages(&self) -> &[Option<u64>] {
        self.image.ready.get_or_init(|| {
            let handle = self
                .image
                .computing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            handle.and_then(|h| h.join().ok()).unwrap_or_default()
        })
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckResult {
    pub pages_checked: u64,
    /// Words of the shared region checked (0 without one).
    pub shared_words_checked: u64,
    pub mismatches: u64,
    /// The first mismatch: (GPA, expected, found).
    pub first_mismatch: Option<(u64, u64, u64)>,
}

impl CheckResult {
    fn compare(&mut self, gpa: u64, want: u64, found: u64) {
        if found != want {
            self.mismatches += 1;
            self.first_mismatch.get_or_insert((gpa, want, found));
        }
    }
}

/// Reads the u64 at `gpa`; something other than `want` if it cannot be read.
fn read(mem: &GuestMemory, gpa: u64, want: u64) -> u64 {
    mem.read_obj(GuestAddress(gpa)).unwrap_or(!want)
}

pub fn check(mem: &GuestMemory, expected: &Expected) -> CheckResult {
    let mut result = CheckResult {
        pages_checked: 0,
        shared_words_checked: 0,
        mismatches: 0,
        first_mismatch: None,
    };
    for (i, want) in expected.pages().iter().enumerate() {
        let gpa = expected.region_gpa + i as u64 * 4096;
        let want = want.unwrap_or(0);
        result.pages_checked += 1;
        result.compare(gpa, want, read(mem, gpa, want));
    }
    result
}

/// Adds the shared region of `workload`, once every vCPU finished its passes, to `result`.
/// Nothing for an endless workload or one without a shared region.
pub fn check_shared(mem: &GuestMemory, workload: &micro_guest::Workload, result: &mut CheckResult) {
    if workload.passes() == 0 || workload.shared_pages() == 0 {
        return;
    }
    let image = workload.shared_image_after(workload.passes());
    for (i, want) in image.iter().enumerate() {
        let gpa = workload.shared_gpa() + 8 * i as u64;
        let want = want.unwrap_or(0);
        result.shared_words_checked += 1;
        result.compare(gpa, want, read(mem, gpa, want));
    }
}

/// The whole check after a micro guest run: the private regions against `expected`, and the
/// shared region of the workload in `mailbox` (the page vmm wrote at boot), if it has one. A
/// mailbox that does not parse (a raw payload's) adds nothing.
pub fn check_run(mem: &GuestMemory, expected: &Expected, mailbox: &[u8]) -> CheckResult {
    let mut result = check(mem, expected);
    let workload = <&[u8; micro_guest::MAILBOX_SIZE]>::try_from(mailbox)
        .ok()
        .and_then(|m| micro_guest::Workload::from_mailbox(m).ok());
    if let Some(w) = workload {
        check_shared(mem, &w, &mut result);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use micro_guest::{Pattern, Workload};

    /// Writes what the model says every vCPU writes, then checks; then breaks one shared slot.
    #[test]
    fn checks_private_regions_and_every_shared_word() {
        let ram = GuestRam::new(16 << 20).expect("guest RAM");
        let mem = ram.memory();
        let region = guest_abi::layout::MICRO_REGION_GPA;
        let w = Workload::new(region, 16, Pattern::Random, 2, 40, 3)
            .and_then(|w| w.with_vcpus(4, region + 64 * 4096, 2))
            .expect("valid");
        for vcpu in 0..4 {
            for wr in w.vcpu_writes(vcpu).take_while(|wr| wr.pass <= 2) {
                mem.write_obj(wr.value, GuestAddress(wr.gpa))
                    .expect("write");
            }
        }
        let expected = Expected::new(region, w.final_image().expect("finite"));
        let r = check_run(mem, &expected, &w.mailbox());
        assert_eq!(
            (r.pages_checked, r.shared_words_checked, r.mismatches),
            (64, 1024, 0)
        );
        // A stray write into another vCPU's slot word (slot 5 is nobody's) is caught.
        let stray = w.shared_gpa() + 4096 + 8 * 5;
        mem.write_obj(1u64, GuestAddress(stray)).expect("write");
        let r = check_run(mem, &expected, &w.mailbox());
        assert_eq!(r.mismatches, 1);
        assert_eq!(r.first_mismatch, Some((stray, 0, 1)));
        // Without a parsable mailbox, only the private regions.
        let r = check_run(mem, &expected, &[]);
        assert_eq!((r.shared_words_checked, r.mismatches), (0, 0));
    }
}
