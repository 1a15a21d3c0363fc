//! Escaping for `--format text`: a sender-controlled string (identity, qname, the diagnosis
//! that quotes them) must not be able to end the line and forge the next session.

use std::io::Write;

/// Appends `s` with the backslash and every control or line-separating character escaped:
/// `\\`, `\n`, `\r`, `\t`, otherwise `\u{..}`. The result is one physical line.
pub fn escape_into(out: &mut Vec<u8>, s: &str) {
    if !s.bytes().any(|b| b < 0x20 || b == b'\\' || b >= 0x7f) {
        out.extend_from_slice(s.as_bytes());
        return;
    }
    let mut utf8 = [0u8; 4];
    for c in s.chars() {
        match c {
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            // C0, DEL, C1 (NEL among them) and the Unicode line and paragraph separators.
            c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::escape_into;

    fn escaped(s: &str) -> String {
        let mut out = Vec::new();
        escape_into(&mut out, s);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn plain_text_is_copied() {
        assert_eq!(
            escaped("coredns-5d78c9869d-x2x7q"),
            "coredns-5d78c9869d-x2x7q"
        );
        assert_eq!(escaped("pod é"), "pod é");
    }

    #[test]
    fn line_breaks_and_controls_are_escaped() {
        assert_eq!(
            escaped("a\nb\rc\td\\e\u{0}\u{7f}\u{85}\u{2028}"),
            r"a\nb\rc\td\\e\u{0}\u{7f}\u{85}\u{2028}"
        );
    }
}
