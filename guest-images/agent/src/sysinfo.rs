//! `cpus` and `meminfo`: what the guest kernel reports about its CPUs and memory.

use std::fs;

const CPU_ONLINE: &str = "/sys/devices/system/cpu/online";
const MEMINFO: &str = "/proc/meminfo";

/// `AGENT: cpus=<sysconf> online=<cpu list>`.
pub fn cpus() -> String {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let online = fs::read_to_string(CPU_ONLINE)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown({e})"));
    format!("cpus={n} online={online}")
}

/// `AGENT: mem_total_kib=... mem_available_kib=...`.
pub fn meminfo() -> Result<String, String> {
    let text = fs::read_to_string(MEMINFO).map_err(|e| format!("{MEMINFO}: {e}"))?;
    let total = field_kib(&text, "MemTotal").ok_or("no MemTotal in /proc/meminfo")?;
    let mut line = format!("mem_total_kib={total}");
    if let Some(avail) = field_kib(&text, "MemAvailable") {
        line += &format!(" mem_available_kib={avail}");
    }
    Ok(line)
}

/// One `/proc/meminfo` field in KiB, if it can be read.
pub fn meminfo_kib(name: &str) -> Option<u64> {
    field_kib(&fs::read_to_string(MEMINFO).ok()?, name)
}

/// Parses `Name:   1234 kB` lines.
fn field_kib(meminfo: &str, name: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let (key, rest) = line.split_once(':')?;
        if key.trim() != name {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo_fields() {
        let text = "MemTotal:         123456 kB\nMemFree:   100 kB\nMemAvailable: 99 kB\n";
        assert_eq!(field_kib(text, "MemTotal"), Some(123456));
        assert_eq!(field_kib(text, "MemAvailable"), Some(99));
        assert_eq!(field_kib(text, "Mem"), None);
        assert_eq!(field_kib("MemTotal: x kB", "MemTotal"), None);
    }

    #[test]
    fn reports_this_host() {
        assert!(cpus().starts_with("cpus="));
        assert!(meminfo().expect("meminfo").starts_with("mem_total_kib="));
    }
}
