//! Fault injection into page installs, for tests only: it proves that the byte-for-byte checks
//! of lazy restore and postcopy can fail. A check that compares guest RAM with its source
//! must catch a page installed with one byte wrong, or filled from the wrong offset; the tests
//! that claim "byte for byte" run once with each fault and must fail.
//!
//! Read once from `VMM_INJECT_INSTALL_FAULT`, and only in debug builds (the ones the
//! integration tests run): a release build never reads it, so production never corrupts.
//!
//! | value | effect |
//! |---|---|
//! | `corrupt@GPA` | when the page at GPA is installed, its middle byte (offset 2048) is flipped |
//! | `misplace@GPA` | the page at GPA is filled from the source's next page (GPA + 4096) |

use std::sync::OnceLock;

/// The environment variable (debug builds only).
pub const ENV: &str = "VMM_INJECT_INSTALL_FAULT";

const PAGE: u64 = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    Corrupt(u64),
    Misplace(u64),
}

impl Injected {
    /// Parses `corrupt@GPA` / `misplace@GPA` (GPA in hex with 0x, or decimal; page aligned).
    pub fn parse(s: &str) -> Option<Injected> {
        let (kind, at) = s.trim().split_once('@')?;
        let at = match at.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok()?,
            None => at.parse().ok()?,
        };
        if at % PAGE != 0 {
            return None;
        }
        match kind {
            "corrupt" => Some(Injected::Corrupt(at)),
            "misplace" => Some(Injected::Misplace(at)),
            _ => None,
        }
    }
}

/// The fault this process injects, if any (debug builds only; see the module doc).
pub fn active() -> Option<Injected> {
    static ACTIVE: OnceLock<Option<Injected>> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        if !cfg!(debug_assertions) {
            return None;
        }
        let v = std::env::var(ENV).ok()?;
        let parsed = Injected::parse(&v);
        match parsed {
            Some(f) => {
                tracing::warn!("{ENV}={v}: injecting {f:?} into page installs (test builds)")
            }
            None => tracing::warn!("{ENV}={v}: not understood, nothing injected"),
        }
        parsed
    })
}

/// The page of an install of `pages` pages at `gpa` that `misplace` fills from the source's
/// next page (the off-by-one-page install bug), if the install holds it.
pub fn misplaced(f: Option<Injected>, gpa: u64, pages: u64) -> Option<u64> {
    match f {
        Some(Injected::Misplace(at)) if at >= gpa && (at - gpa) / PAGE < pages => {
            tracing::warn!("{ENV}: page 0x{at:x} filled from the next page's data");
            Some(at)
        }
        _ => None,
    }
}

/// Flips the middle byte of the target page if `data` (installed at `gpa`) holds it.
pub fn corrupt(f: Option<Injected>, gpa: u64, data: &mut [u8]) {
    let Some(Injected::Corrupt(at)) = f else {
        return;
    };
    let Some(rel) = at.checked_sub(gpa) else {
        return;
    };
    if let Some(b) = rel
        .checked_add(PAGE / 2)
        .and_then(|i| usize::try_from(i).ok())
        .and_then(|i| data.get_mut(i))
    {
        *b ^= 0x5a;
        tracing::warn!("{ENV}: flipped byte 0x{:x} of page 0x{at:x}", PAGE / 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_faults_and_refuses_the_rest() {
        assert_eq!(
            Injected::parse("corrupt@0x200000"),
            Some(Injected::Corrupt(0x20_0000))
        );
        assert_eq!(
            Injected::parse("misplace@8192"),
            Some(Injected::Misplace(8192))
        );
        assert_eq!(Injected::parse("corrupt@0x201"), None);
        assert_eq!(Injected::parse("flip@0x1000"), None);
        assert_eq!(Injected::parse("corrupt"), None);
    }

    #[test]
    fn corrupts_only_the_target_page_and_misplaces_only_its_offset() {
        let f = Some(Injected::Corrupt(0x3000));
        let mut data = vec![0u8; 3 * 4096];
        corrupt(f, 0x2000, &mut data);
        let flipped: Vec<usize> = (0..data.len()).filter(|&i| data[i] != 0).collect();
        assert_eq!(flipped, vec![4096 + 2048]);
        let mut other = vec![0u8; 4096];
        corrupt(f, 0x4000, &mut other);
        corrupt(f, 0x1000, &mut other);
        corrupt(Some(Injected::Corrupt(u64::MAX - 4095)), 0, &mut other);
        assert!(other.iter().all(|&b| b == 0));
        let m = Some(Injected::Misplace(0x3000));
        assert_eq!(misplaced(m, 0x2000, 2), Some(0x3000));
        assert_eq!(misplaced(m, 0x3000, 1), Some(0x3000));
        assert_eq!(misplaced(m, 0x2000, 1), None);
        assert_eq!(misplaced(m, 0x4000, 8), None);
        assert_eq!(misplaced(None, 0x3000, 1), None);
    }
}
