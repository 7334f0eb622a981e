//! The THP policy around the THP kind: where it is `never` (Linux's default on machines with
//! less than 512 MiB, such as the lab guest), `madvise` for as long as the kind is probed, then
//! back, as the hugetlb reservation does for nr_hugepages.

const ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// The bracketed choice of a sysfs policy file ("always madvise [never]" -> "never").
fn selected(text: &str) -> Option<&str> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
}

/// Sets `madvise` where the policy is `never`, and puts `never` back on drop.
#[derive(Debug)]
pub struct ThpPolicy {
    /// The policy found, and whether this guard changed it.
    found: String,
    changed: bool,
}

impl ThpPolicy {
    /// Never fails: where the policy cannot be read or changed, `describe` says so and the
    /// kind's own check reports memory that stayed small.
    pub fn ensure_madvise() -> ThpPolicy {
        let found = match std::fs::read_to_string(ENABLED) {
            Ok(t) => selected(&t).unwrap_or("unknown").to_string(),
            Err(e) => format!("unreadable ({e})"),
        };
        if found != "never" {
            return ThpPolicy {
                found,
                changed: false,
            };
        }
        match std::fs::write(ENABLED, "madvise") {
            Ok(()) => ThpPolicy {
                found,
                changed: true,
            },
            Err(e) => ThpPolicy {
                found: format!("never (setting madvise failed: {e})"),
                changed: false,
            },
        }
    }

    pub fn describe(&self) -> String {
        if self.changed {
            "THP policy was `never` (the default below 512 MiB of RAM): set to `madvise` while \
             probed, then back to `never`"
                .into()
        } else {
            format!("THP policy {}", self.found)
        }
    }
}

impl Drop for ThpPolicy {
    fn drop(&mut self) {
        if self.changed {
            if let Err(e) = std::fs::write(ENABLED, "never") {
                eprintln!("vmm-probe: could not restore {ENABLED} to never: {e}");
            }
        }
    }
}

/// Whether the CPU, as the kernel sees it, has 2 MiB pages (x86 THP needs PSE).
pub fn pse() -> String {
    match std::fs::read_to_string("/proc/cpuinfo") {
        Ok(c) => {
            let has = c
                .lines()
                .find(|l| l.starts_with("flags"))
                .is_some_and(|l| l.split_whitespace().any(|f| f == "pse"));
            if has {
                "CPU flag pse present".into()
            } else {
                "CPU flag pse ABSENT (x86 THP needs it)".into()
            }
        }
        Err(e) => format!("CPU flags unreadable ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bracketed_word_is_the_policy() {
        assert_eq!(selected("always madvise [never]\n"), Some("never"));
        assert_eq!(selected("[always] madvise never"), Some("always"));
        assert_eq!(selected("always madvise never"), None);
    }

    /// On this host the policy is whatever it is; a guard leaves it as it found it.
    #[test]
    fn a_guard_leaves_the_policy_as_it_was() {
        let before = std::fs::read_to_string(ENABLED).ok();
        drop(ThpPolicy::ensure_madvise());
        assert_eq!(std::fs::read_to_string(ENABLED).ok(), before);
    }
}
