//! Target 2: the hot path's field scan (`dnstap::scan`) against the full quick-protobuf
//! decode (`dnstap::decode`, and `dnstap::decode_message` on the message bytes the session
//! keeps).
//!
//! Rule checked: whenever both succeed they read the same identity, version, message presence,
//! type, protocol, addresses, ports, times and wire messages; and the message bytes `scan`
//! hands to the session decode (`decode_message`) exactly as the frame's message did. Where
//! only one of them succeeds is allowed (docs/fuzzing.md says which inputs do that); the
//! `replay --classify` tool counts those cases over a corpus. A kept message that does not
//! decode is allowed: the renderer shows it as undecodable (the `pipeline` target checks that
//! it is on its line). A tag wider than 32 bits, which quick-protobuf truncates, is malformed
//! to the scan (finding 4, fixed), so both never accept such an input.

use dnstap_analyser::dnstap::{self, DnstapMessage, MessageFields};
use dnstap_analyser::metrics::{Discard, ErrorChain};

/// Which of the two decoders accepted the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Agreement {
    BothOk,
    BothErr,
    OnlyScan,
    /// Scan accepts, and even the kept message alone does not decode: the renderer shows it
    /// as undecodable bytes.
    OnlyScanKeptUndecodable,
    OnlyDecode,
}

pub fn check(data: &[u8]) {
    classify(data);
}

/// Checks the rule and says which quadrant the input falls in.
pub fn classify(data: &[u8]) -> Agreement {
    let (fast, full) = (dnstap::scan(data), dnstap::decode(data));
    let (fast, full) = match (fast, full) {
        (Ok(fast), Ok(full)) => (fast, full),
        (Err(e), Err(_)) => {
            let _ = (ErrorChain(&e).to_string(), Discard::from(&e));
            return Agreement::BothErr;
        }
        (Ok(fast), Err(_)) => {
            let kept = fast.message.is_none() || dnstap::decode_message(fast.message_bytes).is_ok();
            return if kept {
                Agreement::OnlyScan
            } else {
                Agreement::OnlyScanKeptUndecodable
            };
        }
        (Err(_), Ok(_)) => return Agreement::OnlyDecode,
    };
    assert!(!has_wide_tag(data), "both accept a tag over 32 bits");
    assert_eq!(full.identity.as_deref().unwrap_or(&[]), fast.identity);
    assert_eq!(full.version.as_deref().unwrap_or(&[]), fast.version);
    assert_eq!(full.message.is_some(), fast.message.is_some());
    if let (Some(m), Some(f)) = (&full.message, &fast.message) {
        same_fields(m, f);
        // What the session keeps decodes to the very message the frame held.
        let kept = dnstap::decode_message(fast.message_bytes).expect("kept message decodes");
        assert_eq!(&kept, m, "kept message decodes differently");
    }
    Agreement::BothOk
}

fn same_fields(m: &DnstapMessage<'_>, f: &MessageFields<'_>) {
    // The generated decoder defaults an absent type; the scan leaves it None.
    assert_eq!(m.type_pb, f.kind.unwrap_or_default(), "type");
    assert_eq!(m.socket_protocol, f.protocol, "protocol");
    assert_eq!(m.query_address.as_deref(), f.query_address, "query_address");
    assert_eq!(m.response_address.as_deref(), f.response_address);
    assert_eq!(
        (m.query_port, m.response_port),
        (f.query_port, f.response_port)
    );
    assert_eq!(
        (m.query_time_sec, m.query_time_nsec),
        (f.query_time_sec, f.query_time_nsec)
    );
    assert_eq!(
        (m.response_time_sec, m.response_time_nsec),
        (f.response_time_sec, f.response_time_nsec)
    );
    assert_eq!(m.query_message.as_deref(), f.query_message, "query_message");
    assert_eq!(m.response_message.as_deref(), f.response_message);
}

/// Whether a dnstap frame the scan accepted has a tag over `u32::MAX`, at the top level or in
/// its message. Walks the fields as the scan does.
pub fn has_wide_tag(frame: &[u8]) -> bool {
    fn walk(mut b: &[u8], nested: bool) -> bool {
        while let Some(tag) = varint(&mut b) {
            if tag > u32::MAX as u64 {
                return true;
            }
            let value = match tag & 7 {
                0 => varint(&mut b).map(|_| &[][..]),
                1 => take(&mut b, 8),
                2 => varint(&mut b).and_then(|n| take(&mut b, usize::try_from(n).ok()?)),
                5 => take(&mut b, 4),
                _ => None,
            };
            match value {
                Some(v) if tag == 114 && !nested => {
                    if walk(v, true) {
                        return true;
                    }
                }
                Some(_) => {}
                None => return false,
            }
        }
        false
    }
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= ((byte & 0x7f) as u64).checked_shl(7 * i).unwrap_or(0);
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }
    fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if n > b.len() {
            return None;
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Some(head)
    }
    walk(frame, false)
}
