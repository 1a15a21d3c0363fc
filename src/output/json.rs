//! A minimal JSON writer over a reusable byte buffer: output lines are built without
//! intermediate trees.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

pub struct Json<'a> {
    pub out: &'a mut Vec<u8>,
    /// Whether the next key or value needs a comma before it: a value (or a closed object or
    /// array) was the last thing written, not a key or an opening bracket. One flag does for
    /// every level: what closes a level is a value of the level around it.
    comma: bool,
    seconds: Seconds,
}

/// The last two seconds written by [`Json::time`] and their `YYYY-MM-DDTHH:MM:SS`, and which
/// to replace next: a line's times lie within a second or two (a query's, and its late
/// response's), and successive lines' too, so only the fraction is formatted again.
#[derive(Debug, Clone, Copy)]
pub struct Seconds {
    texts: [(u64, [u8; SECOND_LEN]); 2],
    next: usize,
}

impl Default for Seconds {
    fn default() -> Self {
        Self {
            texts: [(NO_SECOND, [0; SECOND_LEN]); 2],
            next: 0,
        }
    }
}

/// A place in a line: [`Json::mark`].
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    len: usize,
    comma: bool,
}

/// No second: a Unix second from nanoseconds in a u64 is far below it.
const NO_SECOND: u64 = u64::MAX;

const SECOND_LEN: usize = 19;

impl<'a> Json<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Self::with_seconds(out, Seconds::default())
    }

    /// A writer that starts from the seconds an earlier one wrote ([`Json::seconds`]).
    pub fn with_seconds(out: &'a mut Vec<u8>, seconds: Seconds) -> Self {
        Self {
            out,
            comma: false,
            seconds,
        }
    }

    /// The seconds written last, for the next line's writer.
    pub fn seconds(&self) -> Seconds {
        self.seconds
    }

    /// The comma before a value, if it needs one; a comma after it.
    #[inline(always)]
    fn sep(&mut self) {
        if self.comma {
            self.out.push(b',');
        }
        self.comma = true;
    }

    fn open(&mut self, bracket: u8) {
        self.sep();
        self.out.push(bracket);
        self.comma = false;
    }

    fn close(&mut self, bracket: u8) {
        self.out.push(bracket);
        self.comma = true;
    }

    /// Where the line is, for [`Json::rewind`]: a writer that may find, part-way, that it
    /// cannot write its value goes back and lets another write it.
    pub fn mark(&self) -> Mark {
        Mark {
            len: self.out.len(),
            comma: self.comma,
        }
    }

    /// Back to `mark`, as if nothing had been written since (the last seconds kept for
    /// times stay: they are still what they say).
    pub fn rewind(&mut self, mark: Mark) {
        self.out.truncate(mark.len);
        self.comma = mark.comma;
    }

    pub fn begin_object(&mut self) {
        self.open(b'{');
    }

    pub fn end_object(&mut self) {
        self.close(b'}');
    }

    pub fn begin_array(&mut self) {
        self.open(b'[');
    }

    pub fn end_array(&mut self) {
        self.close(b']');
    }

    /// Writes `"name":` (the value follows without its own separator). Names are the schema's
    /// own identifiers, so they are written as they are. Inlined: every key is a constant, so
    /// the copy folds into a few stores of constant bytes (a line has a hundred or more keys).
    #[inline(always)]
    pub fn key(&mut self, name: &'static str) {
        let comma = std::mem::replace(&mut self.comma, false);
        push_quoted(self.out, comma, name, b"\":");
    }

    pub fn string(&mut self, s: &str) {
        // Most strings of a line are short and plain (names, mnemonics, identities): written
        // as a name is, without the escaping copy.
        if s.len() <= 32 && is_plain(s.as_bytes()) {
            return self.plain(s);
        }
        self.sep();
        escape(self.out, s);
    }

    /// One of the schema's own constant strings (names, mnemonics): nothing to escape.
    pub fn name(&mut self, s: &'static str) {
        self.plain(s);
    }

    /// A string with nothing to escape.
    fn plain(&mut self, s: &str) {
        let comma = std::mem::replace(&mut self.comma, true);
        push_quoted(self.out, comma, s, b"\"");
    }

    /// A `Display` value as a JSON string, escaped while it is formatted (no temporary).
    pub fn display(&mut self, v: impl std::fmt::Display) {
        self.sep();
        self.out.push(b'"');
        let _ = write!(Escaping(self.out), "{v}");
        self.out.push(b'"');
    }

    /// A string whose content `write` produces already JSON-safe (no quotes, backslashes or
    /// control bytes left unescaped).
    pub fn string_with(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        self.sep();
        self.out.push(b'"');
        write(self.out);
        self.out.push(b'"');
    }

    /// Whole members of the schema's own fixed text (keys, values and the separators between
    /// them, `,` first where a member precedes), written as they are.
    #[inline(always)]
    pub fn members(&mut self, text: &'static str) {
        self.out.extend_from_slice(text.as_bytes());
        self.comma = true;
    }

    /// The first `len` bytes of `buf`, a value (JSON text) put together by the caller.
    #[inline(always)]
    pub fn value_text<const N: usize>(&mut self, buf: &[u8; N], len: usize) {
        self.sep();
        extend_prefix(self.out, buf, len);
    }

    /// The first `len` bytes of `buf`: whole members put together by the caller, their
    /// separators included.
    #[inline(always)]
    pub fn members_text<const N: usize>(&mut self, buf: &[u8; N], len: usize) {
        extend_prefix(self.out, buf, len);
        self.comma = true;
    }

    /// The first `len` bytes of `buf`: members put together by the caller (their separators
    /// included) and the key of one more, whose value follows.
    #[inline(always)]
    pub fn members_and_key<const N: usize>(&mut self, buf: &[u8; N], len: usize) {
        extend_prefix(self.out, buf, len);
        self.comma = false;
    }

    /// Members already written in this line, at `text` (with the comma before them), written
    /// again.
    pub fn copy_members(&mut self, text: std::ops::Range<usize>) {
        self.out.extend_from_within(text);
        self.comma = true;
    }

    /// A value already written in this line, at `text`, written again.
    pub fn copy_value(&mut self, text: std::ops::Range<usize>) {
        self.sep();
        self.out.extend_from_within(text);
    }

    /// A timestamp as an RFC 3339 string.
    pub fn time(&mut self, nanos: u64) {
        self.sep();
        let secs = nanos / 1_000_000_000;
        let seconds = &mut self.seconds;
        let second = match seconds.texts.iter().find(|(s, _)| *s == secs) {
            Some((_, text)) => *text,
            None => {
                let text = rfc3339_second(secs);
                seconds.texts[seconds.next] = (secs, text);
                seconds.next ^= 1;
                text
            }
        };
        // `"`, the second, `.nnnnnnnnnZ` and `"`: one copy of a fixed size.
        let mut text = [b'"'; SECOND_LEN + 13];
        text[1..=SECOND_LEN].copy_from_slice(&second);
        text[SECOND_LEN + 1..SECOND_LEN + 12]
            .copy_from_slice(&fraction((nanos % 1_000_000_000) as u32));
        self.out.extend_from_slice(&text);
    }

    pub fn uint(&mut self, v: u64) {
        self.sep();
        write_uint(self.out, v);
    }

    /// A duration in nanoseconds as milliseconds with three decimals (microsecond precision),
    /// in integer arithmetic: float formatting is slow.
    pub fn millis(&mut self, nanos: u64) {
        self.sep();
        write_millis(self.out, nanos);
    }

    /// An address as a string; IPv4 written octet by octet, quotes and all in one copy.
    pub fn ip(&mut self, ip: IpAddr) {
        let IpAddr::V4(v4) = ip else {
            return self.string_with(|out| write_ip(out, ip));
        };
        self.sep();
        let mut text = [b'"'; 18];
        let len = put_ipv4(&mut text, 1, v4);
        text[len] = b'"';
        extend_prefix(self.out, &text, len + 1);
    }

    /// `ip:port` (`[v6]:port`) as a string.
    pub fn socket(&mut self, addr: SocketAddr) {
        let SocketAddr::V4(v4) = addr else {
            return self.string_with(|out| {
                out.push(b'[');
                write_ip(out, addr.ip());
                out.extend_from_slice(b"]:");
                write_uint(out, addr.port().into());
            });
        };
        self.sep();
        let mut text = [b'"'; 32];
        let mut len = put_ipv4(&mut text, 1, *v4.ip());
        text[len] = b':';
        len = put_uint(&mut text, len + 1, v4.port().into());
        text[len] = b'"';
        extend_prefix(self.out, &text, len + 1);
    }

    /// A finite number in its shortest form (`0.01`, never an exponent); null otherwise.
    pub fn float(&mut self, v: f64) {
        if !v.is_finite() {
            return self.null();
        }
        self.sep();
        let _ = write!(Fmt(self.out), "{v}");
    }

    pub fn bool(&mut self, v: bool) {
        self.sep();
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
    }

    pub fn null(&mut self) {
        self.sep();
        self.out.extend_from_slice(b"null");
    }

    #[inline(always)]
    pub fn field_str(&mut self, name: &'static str, v: &str) {
        self.key(name);
        self.string(v);
    }

    /// `"name":` and one of the schema's own constant strings (nothing to escape).
    #[inline(always)]
    pub fn field_name(&mut self, name: &'static str, v: &'static str) {
        self.key(name);
        self.name(v);
    }

    #[inline(always)]
    pub fn field_opt_str(&mut self, name: &'static str, v: Option<&str>) {
        self.key(name);
        match v {
            Some(v) => self.string(v),
            None => self.null(),
        }
    }

    #[inline(always)]
    pub fn field_uint(&mut self, name: &'static str, v: u64) {
        self.key(name);
        self.uint(v);
    }
}

/// Appends `,` if `comma`, then `"`, `text` and `tail` (`":` after a key, `"` after a name).
/// A text of at most 16 bytes (nearly all the schema's keys and names) is put together in a
/// stack buffer by fixed-size copies, which the whole buffer follows into `out` before `out`
/// is cut back: a copy of a length known only at run time calls memcpy, and lines have dozens
/// of keys and names.
#[inline(always)]
fn push_quoted(out: &mut Vec<u8>, comma: bool, text: &str, tail: &[u8]) {
    let (text, n) = (text.as_bytes(), text.len());
    if (17..=32).contains(&n) && tail.len() <= 2 {
        // Names and values of up to 32 bytes (most of a line's qnames): the same with two
        // copies of 16 bytes.
        let mut buf = [0u8; 40];
        buf[0] = b',';
        buf[1] = b'"';
        buf[2..18].copy_from_slice(&text[..16]);
        buf[n - 14..n + 2].copy_from_slice(&text[n - 16..]);
        return append_quoted(out, &mut buf, comma, n, tail);
    }
    if n > 16 || tail.len() > 2 {
        if comma {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(text);
        out.extend_from_slice(tail);
        return;
    }
    let mut buf = [0u8; 24];
    buf[0] = b',';
    buf[1] = b'"';
    // Two overlapping copies of a fixed size cover every length up to twice that size.
    match n {
        8..=16 => {
            buf[2..10].copy_from_slice(&text[..8]);
            buf[n - 6..n + 2].copy_from_slice(&text[n - 8..]);
        }
        4..=7 => {
            buf[2..6].copy_from_slice(&text[..4]);
            buf[n - 2..n + 2].copy_from_slice(&text[n - 4..]);
        }
        _ => {
            for (i, &b) in text.iter().enumerate() {
                buf[2 + i] = b;
            }
        }
    }
    append_quoted(out, &mut buf, comma, n, tail);
}

/// `buf` (`,"` then the text's `n` bytes) with `tail` after the text, appended from the comma,
/// or from the quote when no comma is needed: one copy of the whole buffer, then the line cut
/// back to its end.
#[inline(always)]
fn append_quoted<const N: usize>(
    out: &mut Vec<u8>,
    buf: &mut [u8; N],
    comma: bool,
    n: usize,
    tail: &[u8],
) {
    for (i, &b) in tail.iter().enumerate() {
        buf[2 + n + i] = b;
    }
    let end = out.len() + 2 + n + tail.len();
    if comma {
        out.extend_from_slice(&buf[..]);
        out.truncate(end);
    } else {
        out.extend_from_slice(&buf[1..]);
        out.truncate(end - 1);
    }
}

/// The first `len` bytes of `buf` appended: the whole buffer copied and the line cut back. A
/// copy of a fixed size is a few stores; one of a length known only at run time calls memcpy.
#[inline(always)]
fn extend_prefix<const N: usize>(out: &mut Vec<u8>, buf: &[u8; N], len: usize) {
    let end = out.len() + len.min(N);
    out.extend_from_slice(buf);
    out.truncate(end);
}

/// `v` in decimal, as `itoa` writes it.
fn write_uint(out: &mut Vec<u8>, v: u64) {
    match u32::try_from(v) {
        Ok(v) => {
            let mut text = [0u8; 10];
            let len = put_uint(&mut text, 0, v);
            extend_prefix(out, &text, len);
        }
        Err(_) => out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
    }
}

/// Puts `v` in decimal into `text` at `at`, two digits at a time; returns where it ends.
/// `text` must have room for ten digits after `at`.
pub fn put_uint<const N: usize>(text: &mut [u8; N], at: usize, v: u32) -> usize {
    let len = match v {
        0..=9 => 1,
        10..=99 => 2,
        100..=999 => 3,
        1_000..=9_999 => 4,
        10_000..=99_999 => 5,
        100_000..=999_999 => 6,
        1_000_000..=9_999_999 => 7,
        10_000_000..=99_999_999 => 8,
        100_000_000..=999_999_999 => 9,
        _ => 10,
    };
    let (mut rest, mut end) = (v, at + len);
    while end >= at + 2 {
        let pair = (rest % 100) as usize * 2;
        text[end - 2..end].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        rest /= 100;
        end -= 2;
    }
    if end > at {
        text[at] = b'0' + rest as u8;
    }
    at + len
}

/// Puts `ip` in dotted decimal into `text` at `at`; returns where it ends. `text` must have
/// room for 16 bytes after `at`.
fn put_ipv4<const N: usize>(text: &mut [u8; N], mut at: usize, ip: std::net::Ipv4Addr) -> usize {
    for octet in ip.octets() {
        let (digits, len) = OCTETS[usize::from(octet)];
        text[at..at + 4].copy_from_slice(&digits);
        at += usize::from(len);
    }
    at - 1
}

/// Each octet's decimal digits and a dot (`7.`, `42.`, `255.`, padded to four bytes), and
/// their length.
static OCTETS: [([u8; 4], u8); 256] = octets();

const fn octets() -> [([u8; 4], u8); 256] {
    let mut table = [([0; 4], 0); 256];
    let mut i = 0;
    while i < 256 {
        let (hundreds, tens, ones) = (
            b'0' + (i / 100) as u8,
            b'0' + (i / 10 % 10) as u8,
            b'0' + (i % 10) as u8,
        );
        table[i] = match i {
            0..=9 => ([ones, b'.', 0, 0], 2),
            10..=99 => ([tens, ones, b'.', 0], 3),
            _ => ([hundreds, tens, ones, b'.'], 4),
        };
        i += 1;
    }
    table
}

struct Fmt<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Fmt<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

pub fn write_millis(out: &mut Vec<u8>, nanos: u64) {
    // Saturating: a sender controls the times, and a wrapped sum would print 0.000.
    let micros = nanos.saturating_add(500) / 1000;
    let mut b = itoa::Buffer::new();
    out.extend_from_slice(b.format(micros / 1000).as_bytes());
    let frac = micros % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut text = [0u8; 16];
            let len = put_ipv4(&mut text, 0, v4);
            extend_prefix(out, &text, len);
        }
        IpAddr::V6(v6) => {
            let _ = write!(Fmt(out), "{v6}");
        }
    }
}

/// Formats straight into the buffer, escaping as JSON string content.
struct Escaping<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

pub fn escape(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    escape_into(out, s);
    out.push(b'"');
}

/// Appends `s` as JSON string content (without the quotes). Copies runs of plain bytes in one
/// go; only quotes, backslashes and controls are rewritten.
pub fn escape_into(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    if is_plain(bytes) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            let _ = write!(Fmt(out), "\\u{b:04x}");
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Whether no byte needs escaping (no quote, backslash or control byte), eight bytes at a
/// time: the check runs over every string of every line. The last word overlaps the one
/// before it, and fewer than eight bytes are read as two overlapping halves (or three
/// bytes): bytes tested twice change nothing, and no byte is copied one at a time.
fn is_plain(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // A byte of `x` is zero, or below `n`: the classic word-at-a-time tests.
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * n as u64) & !x & HIGHS;
    let hit = |x: u64| {
        below(x, 0x20) | below(x ^ (ONES * b'"' as u64), 1) | below(x ^ (ONES * b'\\' as u64), 1)
    };
    let n = bytes.len();
    let word = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
    let half = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap_or_default());
    let last = match n {
        0 => return true,
        1..=3 => {
            let mut last = [b'a'; 8];
            [last[0], last[1], last[2]] = [bytes[0], bytes[n / 2], bytes[n - 1]];
            u64::from_ne_bytes(last)
        }
        4..=7 => u64::from(half(0)) | u64::from(half(n - 4)) << 32,
        _ => {
            let mut at = 0;
            while at + 8 < n {
                if hit(word(at)) != 0 {
                    return false;
                }
                at += 8;
            }
            word(n - 8)
        }
    };
    hit(last) == 0
}

/// RFC 3339 UTC with nanoseconds, from Unix nanoseconds.
pub fn write_rfc3339(out: &mut Vec<u8>, nanos: u64) {
    out.extend_from_slice(&rfc3339_second(nanos / 1_000_000_000));
    out.extend_from_slice(&fraction((nanos % 1_000_000_000) as u32));
}

/// `YYYY-MM-DDTHH:MM:SS` of a Unix second (days-from-civil, inverted).
fn rfc3339_second(secs: u64) -> [u8; SECOND_LEN] {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut text = *b"0000-00-00T00:00:00";
    let mut pair = |at: usize, v: u64| {
        let v = (v % 100) as usize * 2;
        text[at..at + 2].copy_from_slice(&DIGIT_PAIRS[v..v + 2]);
    };
    let year = year.clamp(0, 9999) as u64;
    pair(0, year / 100);
    pair(2, year);
    pair(5, month as u64);
    pair(8, day as u64);
    pair(11, rem / 3600);
    pair(14, rem % 3600 / 60);
    pair(17, rem % 60);
    text
}

/// `.nnnnnnnnnZ`: the nanoseconds of a second (below 10^9), in 32-bit arithmetic, two digits
/// at a time.
fn fraction(frac: u32) -> [u8; 11] {
    let mut text = *b".000000000Z";
    let mut rest = frac % 100_000_000;
    text[1] = b'0' + (frac / 100_000_000 % 10) as u8;
    for at in [8, 6, 4, 2] {
        let pair = (rest % 100) as usize * 2;
        text[at..at + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
        rest /= 100;
    }
    text
}

/// `00` to `99`, for two digits at a time.
const DIGIT_PAIRS: &[u8; 200] = b"\
    0001020304050607080910111213141516171819\
    2021222324252627282930313233343536373839\
    4041424344454647484950515253545556575859\
    6061626364656667686970717273747576777879\
    8081828384858687888990919293949596979899";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_names_of_any_length_are_quoted_and_separated() {
        const LONG: &str = "abcdefghijklmnopqrstuvwxyz_0123456789_ABCDEFGHIJKLMNOPQRSTUVWXYZ";
        for name in (0..=LONG.len()).map(|n| &LONG[..n]) {
            let mut out = Vec::new();
            let mut j = Json::new(&mut out);
            j.begin_array();
            j.name(name);
            j.name(name);
            j.end_array();
            assert_eq!(
                String::from_utf8(out).unwrap(),
                format!("[\"{name}\",\"{name}\"]")
            );
            let mut out = Vec::new();
            let mut j = Json::new(&mut out);
            j.name(name);
            assert_eq!(String::from_utf8(out).unwrap(), format!("\"{name}\""));
            let mut out = Vec::new();
            let mut j = Json::new(&mut out);
            j.begin_object();
            j.field_uint(name, 1);
            j.field_uint(name, 2);
            j.end_object();
            let want = format!("{{\"{name}\":1,\"{name}\":2}}");
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    #[test]
    fn the_word_at_a_time_check_finds_every_byte_that_needs_escaping() {
        let naive = |b: &[u8]| !b.iter().any(|&c| c < 0x20 || c == b'"' || c == b'\\');
        for len in (1..=17).chain([23]) {
            for pos in 0..len {
                for c in 0..=255u8 {
                    // Bytes around the one tested: plain ASCII, and UTF-8 high bytes.
                    for fill in [b'a', 0xc3, 0x7f, 0x21] {
                        let mut b = vec![fill; len];
                        b[pos] = c;
                        assert_eq!(is_plain(&b), naive(&b), "{b:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn strings_of_any_length_are_escaped_where_they_need_it() {
        let mut text = String::new();
        for len in 0..=20 {
            for special in [
                None,
                Some('"'),
                Some('\\'),
                Some('\n'),
                Some('\u{1}'),
                Some('é'),
            ] {
                for pos in 0..len.max(1) {
                    text.clear();
                    text.extend((0..len).map(|i| match special {
                        Some(c) if i == pos => c,
                        _ => char::from(b'a' + i as u8),
                    }));
                    let mut out = Vec::new();
                    let mut j = Json::new(&mut out);
                    j.begin_array();
                    j.string(&text);
                    j.string(&text);
                    j.end_array();
                    let want = serde_json::to_string(&[&text, &text]).unwrap();
                    assert_eq!(String::from_utf8(out).unwrap(), want);
                }
            }
        }
    }

    #[test]
    fn writes_nested_values_with_commas_and_escapes() {
        let mut buf = Vec::new();
        let mut j = Json::new(&mut buf);
        j.begin_object();
        j.field_str("a", "x\"y\n");
        j.key("list");
        j.begin_array();
        j.uint(1);
        j.null();
        j.begin_object();
        j.end_object();
        j.end_array();
        j.field_opt_str("none", None);
        j.end_object();
        let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a":"x\"y\n","list":[1,null,{}],"none":null})
        );
    }

    fn rfc3339(nanos: u64) -> String {
        let mut v = Vec::new();
        write_rfc3339(&mut v, nanos);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn numbers_addresses_and_durations() {
        let mut buf = Vec::new();
        let mut j = Json::new(&mut buf);
        j.begin_array();
        j.uint(18_446_744_073_709_551_615);
        j.millis(476_000);
        j.millis(12_345_678_999);
        j.ip("192.0.2.1".parse().unwrap());
        j.ip("0.10.100.255".parse().unwrap());
        j.socket("[2001:db8::1]:53".parse().unwrap());
        j.socket("10.0.0.2:5353".parse().unwrap());
        j.end_array();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            r#"[18446744073709551615,0.476,12345.679,"192.0.2.1","0.10.100.255","[2001:db8::1]:53","10.0.0.2:5353"]"#
        );
    }

    #[test]
    fn numbers_and_addresses_are_written_as_display_writes_them() {
        let mut out = Vec::new();
        let mut v = 0u64;
        while v < u64::MAX / 3 {
            for n in [v, v + 1, v.saturating_sub(1), v * 7 / 5] {
                out.clear();
                write_uint(&mut out, n);
                assert_eq!(out, n.to_string().as_bytes());
            }
            v = v * 10 + 9;
        }
        for n in (0..100_000).chain([u64::MAX]) {
            out.clear();
            write_uint(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
        for a in [0u8, 1, 9, 10, 99, 100, 199, 255] {
            for b in [0u8, 7, 42, 250] {
                let ip = std::net::Ipv4Addr::new(a, b, b, a);
                out.clear();
                write_ip(&mut out, ip.into());
                assert_eq!(out, ip.to_string().as_bytes());
                let addr = std::net::SocketAddr::from((ip, u16::from(a) * 257));
                out.clear();
                Json::new(&mut out).socket(addr);
                assert_eq!(out, format!("\"{addr}\"").as_bytes());
            }
        }
    }

    #[test]
    fn times_of_one_line_share_their_seconds_only_when_they_are_in_them() {
        let times = [
            1_795_626_659_525_087_273,
            1_795_626_659_000_000_001,
            1_795_626_660_999_999_999,
            1_795_626_659_525_087_273,
            1_795_626_661_000_000_000,
            1_795_626_659_000_000_000,
            1_795_626_660_000_000_000,
            0,
        ];
        let mut buf = Vec::new();
        let mut j = Json::new(&mut buf);
        j.begin_array();
        for t in times {
            j.time(t);
        }
        j.end_array();
        let each: Vec<String> = times
            .iter()
            .map(|&t| format!("\"{}\"", rfc3339(t)))
            .collect();
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            format!("[{}]", each.join(","))
        );
        assert_eq!(rfc3339(times[2]), "2026-11-25T17:11:00.999999999Z");
    }

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        // 2026-11-25 17:10:59.525087273 UTC, b_forward's CQ.
        assert_eq!(
            rfc3339(1_795_626_659_525_087_273),
            "2026-11-25T17:10:59.525087273Z"
        );
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
    }
}
