//! A minimal JSON writer over a reusable byte buffer: output lines are built without
//! intermediate trees.

use std::fmt::Write as _;

pub struct Json<'a> {
    pub out: &'a mut Vec<u8>,
    /// Per nesting level: whether the next member needs a comma.
    first: Vec<bool>,
}

impl<'a> Json<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        Self {
            out,
            first: Vec::with_capacity(8),
        }
    }

    fn sep(&mut self) {
        if let Some(first) = self.first.last_mut() {
            if !*first {
                self.out.push(b',');
            }
            *first = false;
        }
    }

    pub fn begin_object(&mut self) {
        self.sep();
        self.out.push(b'{');
        self.first.push(true);
    }

    pub fn end_object(&mut self) {
        self.first.pop();
        self.out.push(b'}');
    }

    pub fn begin_array(&mut self) {
        self.sep();
        self.out.push(b'[');
        self.first.push(true);
    }

    pub fn end_array(&mut self) {
        self.first.pop();
        self.out.push(b']');
    }

    /// Writes `"name":` (the value follows without its own separator).
    pub fn key(&mut self, name: &str) {
        self.sep();
        escape(self.out, name);
        self.out.push(b':');
        if let Some(first) = self.first.last_mut() {
            *first = true;
        }
    }

    pub fn string(&mut self, s: &str) {
        self.sep();
        escape(self.out, s);
    }

    pub fn bytes_lossy(&mut self, b: &[u8]) {
        self.string(&String::from_utf8_lossy(b));
    }

    pub fn display(&mut self, v: impl std::fmt::Display) {
        let mut s = String::new();
        let _ = write!(s, "{v}");
        self.string(&s);
    }

    pub fn uint(&mut self, v: u64) {
        self.sep();
        let _ = write!(Fmt(self.out), "{v}");
    }

    pub fn float3(&mut self, v: f64) {
        self.sep();
        let _ = write!(Fmt(self.out), "{v:.3}");
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

    pub fn field_str(&mut self, name: &str, v: &str) {
        self.key(name);
        self.string(v);
    }

    pub fn field_opt_str(&mut self, name: &str, v: Option<&str>) {
        self.key(name);
        match v {
            Some(v) => self.string(v),
            None => self.null(),
        }
    }

    pub fn field_uint(&mut self, name: &str, v: u64) {
        self.key(name);
        self.uint(v);
    }
}

struct Fmt<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Fmt<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

pub fn escape(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    for &b in s.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => {
                let _ = write!(Fmt(out), "\\u{b:04x}");
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// RFC 3339 UTC with nanoseconds, from Unix nanoseconds (days-from-civil, inverted).
pub fn rfc3339(nanos: u64) -> String {
    let secs = nanos / 1_000_000_000;
    let frac = nanos % 1_000_000_000;
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
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{frac:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
