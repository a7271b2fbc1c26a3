//! Guest-supplied text made safe to log or forward: bounded and with control characters
//! escaped, so a guest cannot flood the host's logs or forge log lines.

/// Longest guest text the host passes on (error messages, versions), in bytes.
pub const MAX_GUEST_TEXT: usize = 4096;

/// `s` cut to at most `max` bytes on a character boundary (with `...` when cut) and with
/// control characters (newlines, escapes) written as `\n`, `\u{1b}` and so on.
pub fn bounded(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 3);
    for c in s.chars() {
        let piece: String = if c.is_control() {
            c.escape_default().collect()
        } else {
            c.into()
        };
        if out.len() + piece.len() > max {
            out.push_str("...");
            break;
        }
        out.push_str(&piece);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_is_cut_on_a_character_boundary_and_control_characters_escaped() {
        assert_eq!(bounded("plain", 100), "plain");
        assert_eq!(bounded("two\nlines\x1b[31m", 100), "two\\nlines\\u{1b}[31m");
        let long = "é".repeat(10_000);
        let cut = bounded(&long, MAX_GUEST_TEXT);
        assert!(cut.len() <= MAX_GUEST_TEXT + 3 && cut.ends_with("..."), "{}", cut.len());
        assert!(bounded(&"\n".repeat(5000), 10).len() <= 13);
    }
}
