//! How the lab guest hands its report to the host over the serial console: the JSON report between
//! a begin and an end marker line, and a final line with the probe's exit status. The kernel's own
//! console messages (printk) may interleave with the console text, so the host takes only the
//! lines between the markers, and a part counts only if its end marker arrived.

pub const READY: &str = "VMM-PROBE-READY";
pub const JSON_BEGIN: &str = "VMM-PROBE-JSON-BEGIN";
pub const JSON_END: &str = "VMM-PROBE-JSON-END";
/// Followed by ` ok` or ` error: <why>`.
pub const DONE: &str = "VMM-PROBE-DONE";

/// The lines strictly between `begin` and `end` (carriage returns dropped; kernel messages,
/// which start with `[` + a timestamp under PRINTK_TIME, left out), or None if either marker is
/// missing.
pub fn section(console: &str, begin: &str, end: &str) -> Option<String> {
    let mut lines = console.lines().map(|l| l.trim_end_matches('\r'));
    lines.by_ref().find(|l| *l == begin)?;
    let mut out = String::new();
    for l in lines {
        if l == end {
            return Some(out);
        }
        if is_kernel_message(l) {
            continue;
        }
        out.push_str(l);
        out.push('\n');
    }
    None
}

/// A printk line: `[    12.345678] ...`.
fn is_kernel_message(l: &str) -> bool {
    let Some(rest) = l.strip_prefix('[') else {
        return false;
    };
    match rest.split_once(']') {
        Some((ts, _)) => {
            let ts = ts.trim();
            !ts.is_empty() && ts.chars().all(|c| c.is_ascii_digit() || c == '.')
        }
        None => false,
    }
}

/// The DONE line's status text, if it arrived.
pub fn done(console: &str) -> Option<String> {
    console
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .find_map(|l| l.strip_prefix(DONE))
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_skip_kernel_lines_and_need_both_markers() {
        let c = format!(
            "boot\r\n{JSON_BEGIN}\r\n{{\"a\":\r\n[   41.123456] WARNING: x\r\n1}}\r\n{JSON_END}\r\n{DONE} ok\r\n"
        );
        assert_eq!(section(&c, JSON_BEGIN, JSON_END).unwrap(), "{\"a\":\n1}\n");
        assert_eq!(done(&c).unwrap(), "ok");
        let cut = format!("{JSON_BEGIN}\n{{\n");
        assert_eq!(section(&cut, JSON_BEGIN, JSON_END), None);
        assert_eq!(section("nothing", JSON_BEGIN, JSON_END), None);
        // A JSON array line is not a kernel message.
        assert!(!is_kernel_message("[\"x\"]"));
        assert!(is_kernel_message("[    0.000000] Linux version"));
    }
}
