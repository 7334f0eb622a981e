//! Checks guest RAM against the micro guest's reference model once the workload has finished,
//! page by page and byte for byte: every private region page must hold the value the model says
//! was written last (or 0 for pages never written) in its first 8 bytes and zeros in the other
//! 4088, and with a shared region every word of it must hold what the model says (each vCPU's
//! slot its last value, everything else 0). Mismatches are counted in pages. This is the ground
//! truth later checks build on.

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
            .spawn(move || {
                crate::seccomp::apply_or_exit(crate::seccomp::ThreadKind::MicroModel);
                workload.final_image().unwrap_or_default()
            });
        let ready = OnceLock::new();
        let handle = match handle {
            Ok(h) => Some(h),
            Err(e) => {
                // No thread: compute it here rather than check against nothing.
                tracing::warn!(
                    "cannot start the micro guest's model thread ({e}); computing it now"
                );
                let _ = ready.set(workload.final_image().unwrap_or_default());
                None
            }
        };
        let image = Image {
            ready,
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
    /// Pages (private or shared) with at least one byte other than the model's.
    pub mismatches: u64,
    /// The first differing word: (its GPA, expected, found).
    pub first_mismatch: Option<(u64, u64, u64)>,
}

/// Words in a page.
const WORDS: usize = 4096 / 8;

impl CheckResult {
    fn new() -> CheckResult {
        CheckResult {
            pages_checked: 0,
            shared_words_checked: 0,
            mismatches: 0,
            first_mismatch: None,
        }
    }

    /// Compares the page at `gpa` word by word with `want(word index)`; one mismatch per page.
    fn compare_page(&mut self, mem: &GuestMemory, gpa: u64, want: impl Fn(usize) -> u64) {
        let mut page = [0u8; 4096];
        let found = match mem.read_slice(&mut page, GuestAddress(gpa)) {
            Ok(()) => page
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8])))
                .enumerate()
                .find(|&(i, word)| word != want(i)),
            // Unreadable: its first word stands for it, as something other than expected.
            Err(_) => Some((0, !want(0))),
        };
        if let Some((i, word)) = found {
            self.mismatches += 1;
            self.first_mismatch
                .get_or_insert((gpa + 8 * i as u64, want(i), word));
        }
    }
}

/// Checks every private region page against `expected`: its first word the model's last value
/// (0 if never written), the rest of the page zero.
pub fn check(mem: &GuestMemory, expected: &Expected) -> CheckResult {
    let mut result = CheckResult::new();
    for (i, want) in expected.pages().iter().enumerate() {
        let gpa = expected.region_gpa + i as u64 * 4096;
        let first = want.unwrap_or(0);
        result.pages_checked += 1;
        result.compare_page(mem, gpa, |w| if w == 0 { first } else { 0 });
    }
    result
}

/// Adds the shared region of `workload` after `workload.passes()` passes of every vCPU (the
/// run's final budget), every word of it, to `result`. Nothing for an endless workload or one
/// without a shared region.
pub fn check_shared(mem: &GuestMemory, workload: &micro_guest::Workload, result: &mut CheckResult) {
    if workload.passes() == 0 || workload.shared_pages() == 0 {
        return;
    }
    let image = workload.shared_image_after(workload.passes());
    for (page, words) in image.chunks(WORDS).enumerate() {
        let gpa = workload.shared_gpa() + 4096 * page as u64;
        result.shared_words_checked += words.len() as u64;
        result.compare_page(mem, gpa, |w| words.get(w).copied().flatten().unwrap_or(0));
    }
}

/// The whole check after a micro guest run: the private regions against `expected`, and the
/// shared region of the workload in `mailbox` (the page vmm wrote at boot, with the run's final
/// budget: `micro_finish::MicroBudget` keeps it), if it has one. A mailbox that does not parse
/// (a raw payload's) adds nothing.
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

    /// Every byte of every page counts, not only the words the guest writes: a byte flipped in
    /// the middle of a private page, or in a shared page beyond the vCPU slots, is caught, and
    /// mismatches count pages, not bytes or words.
    #[test]
    fn a_flipped_byte_anywhere_in_a_page_is_caught() {
        let ram = GuestRam::new(16 << 20).expect("guest RAM");
        let mem = ram.memory();
        let region = guest_abi::layout::MICRO_REGION_GPA;
        let w = Workload::new(region, 16, Pattern::Sweep, 2, 0, 1)
            .and_then(|w| w.with_vcpus(2, region + 32 * 4096, 3))
            .expect("valid");
        for vcpu in 0..2 {
            for wr in w.vcpu_writes(vcpu).take_while(|wr| wr.pass <= 2) {
                mem.write_obj(wr.value, GuestAddress(wr.gpa))
                    .expect("write");
            }
        }
        let expected = Expected::new(region, w.final_image().expect("finite"));
        let clean = check_run(mem, &expected, &w.mailbox());
        assert_eq!(
            (
                clean.pages_checked,
                clean.shared_words_checked,
                clean.mismatches
            ),
            (32, 3 * 512, 0)
        );

        // Private page 5 of vCPU 1, offset 2048: the word at 2048 must be 0.
        let private = region + (16 + 5) * 4096 + 2048;
        mem.write_obj(0x40u8, GuestAddress(private)).expect("write");
        let r = check_run(mem, &expected, &w.mailbox());
        assert_eq!(r.mismatches, 1);
        assert_eq!(r.first_mismatch, Some((private, 0, 0x40)));
        // A second byte in the same page, lower: still one page, and it is the first word.
        mem.write_obj(1u8, GuestAddress(private - 1000))
            .expect("write");
        let r = check_run(mem, &expected, &w.mailbox());
        assert_eq!(r.mismatches, 1);
        assert_eq!(r.first_mismatch, Some((private - 1000, 0, 1)));

        // Shared page 2, word 300 (the vCPU slots are words 0 and 1): a second page.
        let shared = w.shared_gpa() + 2 * 4096 + 8 * 300 + 5;
        mem.write_obj(0x80u8, GuestAddress(shared)).expect("write");
        let r = check_run(mem, &expected, &w.mailbox());
        assert_eq!(r.mismatches, 2);
        assert_eq!(r.first_mismatch, Some((private - 1000, 0, 1)));
        // Put the private page back: the shared word is then the first mismatch.
        mem.write_slice(&[0; 4096 - 8], GuestAddress(region + (16 + 5) * 4096 + 8))
            .expect("write");
        let r = check_run(mem, &expected, &w.mailbox());
        assert_eq!(r.mismatches, 1);
        assert_eq!(r.first_mismatch, Some((shared - 5, 0, 0x80 << 40)));
    }
}
