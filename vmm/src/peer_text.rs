//! Text a peer chose (a migration's `Refuse` and `Abort` reasons, a page server's `Refuse` and
//! `Error`, the source's host name) made fit for a terminal and a log: a frame may carry
//! megabytes, and escape sequences would reach the user's terminal as commands. Applied where
//! such text is decoded, so every later message and log line shows the clean form.

/// At most this many characters are kept, the truncation note included.
pub const MAX_CHARS: usize = 512;

/// Room kept for the " … (N more bytes)" note.
const NOTE_CHARS: usize = 32;

/// `text` without terminal escape sequences (ESC and CSI sequences are dropped whole), with
/// every other control or bidirectional-override character as `?`, line breaks and tabs as
/// spaces, and cut to [`MAX_CHARS`] characters with a note of how many bytes were left out.
/// Idempotent, so a reason relayed through another frame is not cut twice.
pub fn sanitize(text: &str) -> String {
    // (byte offset in `text`, clean character), one past the limit at most: the loop is
    // bounded by MAX_CHARS kept characters, not by the peer's length (escape sequences are
    // skipped at the cost of reading them, which is linear).
    let mut kept: Vec<(usize, char)> = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if kept.len() > MAX_CHARS {
            break;
        }
        let clean = match c {
            '\u{1b}' => {
                // ESC [ params final (CSI), ESC ] ... BEL/ST (OSC), or ESC and one character.
                match chars.next().map(|(_, n)| n) {
                    Some('[') => {
                        for (_, n) in chars.by_ref() {
                            if ('\u{40}'..='\u{7e}').contains(&n) {
                                break;
                            }
                        }
                    }
                    Some(']') => {
                        while let Some((_, n)) = chars.next() {
                            if n == '\u{7}' || n == '\u{9c}' {
                                break;
                            }
                            if n == '\u{1b}' {
                                chars.next_if(|&(_, n)| n == '\\');
                                break;
                            }
                        }
                    }
                    _ => {}
                }
                continue;
            }
            '\n' | '\r' | '\t' => ' ',
            c if c.is_control() || is_bidi_control(c) => '?',
            c => c,
        };
        kept.push((at, clean));
    }
    if kept.len() <= MAX_CHARS {
        return kept.into_iter().map(|(_, c)| c).collect();
    }
    let cut = MAX_CHARS - NOTE_CHARS;
    let left = text.len() - kept[cut].0;
    let mut out: String = kept[..cut].iter().map(|&(_, c)| c).collect();
    out.push_str(&format!(" … ({left} more bytes)"));
    out
}

fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_passes_unchanged() {
        let s = "memory size differs: the source VM has 64 MiB, ünïcode kept";
        assert_eq!(sanitize(s), s);
    }

    #[test]
    fn escape_sequences_and_control_characters_are_removed() {
        let s = "a\u{1b}[31;1mred\u{1b}[0m b\u{1b}]0;title\u{7} c\u{1b}]8;;http://x\u{1b}\\d\u{1b}c\u{0}\u{9b}\u{202e}e\nf\tg\r";
        let clean = sanitize(s);
        assert_eq!(clean, "ared b cd???e f g ");
        assert!(!clean.chars().any(|c| c.is_control()));
    }

    #[test]
    fn long_text_is_cut_with_a_note_of_what_was_left() {
        let s = "x".repeat(1 << 20);
        let clean = sanitize(&s);
        assert!(
            clean.chars().count() <= MAX_CHARS,
            "{}",
            clean.chars().count()
        );
        let kept = MAX_CHARS - NOTE_CHARS;
        assert!(clean.starts_with(&"x".repeat(kept)));
        assert!(clean.ends_with(&format!(" … ({} more bytes)", (1 << 20) - kept)));
        // Text just at the limit is not cut.
        let edge = "y".repeat(MAX_CHARS);
        assert_eq!(sanitize(&edge), edge);
    }

    #[test]
    fn sanitizing_twice_changes_nothing() {
        for s in [
            "x".repeat(1 << 16),
            "y".repeat(MAX_CHARS + 1),
            format!("{}\u{1b}[", "é".repeat(700)),
            "\u{1b}[1m".repeat(400),
            "ok".into(),
        ] {
            let once = sanitize(&s);
            assert_eq!(sanitize(&once), once);
        }
    }
}
