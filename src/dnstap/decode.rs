//! Full decoding with the code generated from proto/dnstap.proto (for rendering), the
//! decoding errors of every path, and dnstap's field encodings (times, addresses).

use super::wire::{walk_message, walk_message_into};
use super::{pb, MessageType, Nanos};
use crate::dns::DnsError;
use quick_protobuf::{BytesReader, MessageRead};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why a dnstap payload yields no event.
#[derive(Debug)]
pub enum DecodeError {
    /// The generated decoder refused the payload.
    Protobuf(quick_protobuf::Error),
    /// The hot-path scan met a truncated field, an overlong varint or an unknown wire type.
    Malformed,
    /// A message without its (required) type.
    NoMessageType,
    NoMessage,
    /// AUTH_*, STUB_*, TOOL_*, UPDATE_*: not part of a client session.
    UnsupportedType(MessageType),
    Dns(DnsError),
}

impl DecodeError {
    /// False for messages that are no part of any session: skipping them loses nothing.
    pub fn loses_a_session_message(&self) -> bool {
        !matches!(self, Self::UnsupportedType(_))
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Protobuf(_) => f.write_str("undecodable dnstap protobuf"),
            Self::Malformed => f.write_str("malformed dnstap protobuf"),
            Self::NoMessageType => f.write_str("dnstap message without a type"),
            Self::NoMessage => f.write_str("dnstap payload without a message"),
            Self::UnsupportedType(t) => write!(f, "message type {t:?} is not part of a session"),
            Self::Dns(_) => f.write_str("undecodable DNS message"),
        }
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Protobuf(e) => Some(e),
            Self::Dns(e) => Some(e),
            _ => None,
        }
    }
}

impl From<DnsError> for DecodeError {
    fn from(e: DnsError) -> Self {
        Self::Dns(e)
    }
}

/// Decodes an encoded dnstap.Message (what sessions keep), borrowing from it.
pub fn decode_message(bytes: &[u8]) -> Result<pb::Message<'_>, DecodeError> {
    walk_message(bytes).map_or_else(|| decode_generated(bytes), Ok)
}

/// [`decode_message`] into `m` (a default message) in place: a renderer decodes a session's
/// messages into its list, without moving each (a few hundred bytes). On an error `m` holds
/// part of the message.
pub fn decode_message_into<'a>(
    bytes: &'a [u8],
    m: &mut pb::Message<'a>,
) -> Result<(), DecodeError> {
    if walk_message_into(bytes, m).is_none() {
        *m = decode_generated(bytes)?;
    }
    Ok(())
}

/// The generated decoder alone: what `decode_message` reads when its walk does not.
pub(crate) fn decode_generated(bytes: &[u8]) -> Result<pb::Message<'_>, DecodeError> {
    let mut reader = BytesReader::from_bytes(bytes);
    pb::Message::from_reader(&mut reader, bytes).map_err(DecodeError::Protobuf)
}

/// Decodes a dnstap frame, borrowing every byte field from it.
pub fn decode(frame: &[u8]) -> Result<pb::Dnstap<'_>, DecodeError> {
    let mut reader = BytesReader::from_bytes(frame);
    pb::Dnstap::from_reader(&mut reader, frame).map_err(DecodeError::Protobuf)
}

/// Seconds and nanoseconds fields as one time; none without the seconds.
pub fn time(sec: Option<u64>, nsec: Option<u32>) -> Option<Nanos> {
    let sec = sec?;
    Some(
        sec.saturating_mul(1_000_000_000)
            .saturating_add(nsec.unwrap_or(0) as u64),
    )
}

/// An address field as a socket; IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes plain IPv4.
pub fn socket(addr: Option<&[u8]>, port: Option<u32>) -> Option<SocketAddr> {
    Some(SocketAddr::new(ip(addr?)?, port.unwrap_or(0) as u16))
}

pub fn ip(addr: &[u8]) -> Option<IpAddr> {
    match addr.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        16 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(addr);
            // One comparison for the `::ffff:0:0/96` prefix (`to_ipv4_mapped` compares bytes).
            let v = u128::from_be_bytes(b);
            Some(if v >> 32 == 0xffff {
                IpAddr::V4(Ipv4Addr::from(v as u32))
            } else {
                IpAddr::V6(Ipv6Addr::from(v))
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error;

    #[test]
    fn mapped_ipv4_is_normalised_and_other_lengths_are_rejected() {
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(ip(&mapped), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(ip(&[10, 0, 0, 2]), Some("10.0.0.2".parse().unwrap()));
        assert_eq!(
            ip(&Ipv6Addr::LOCALHOST.octets()),
            Some("::1".parse().unwrap())
        );
        assert_eq!(ip(&[1, 2, 3]), None);
        // Only `::ffff:a.b.c.d` is IPv4, as `to_ipv4_mapped` says.
        for text in [
            "::ffff:1.2.3.4",
            "::fffe:1.2.3.4",
            "1::ffff:1.2.3.4",
            "::1.2.3.4",
            "::",
        ] {
            let v6: Ipv6Addr = text.parse().unwrap();
            let want = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
            assert_eq!(ip(&v6.octets()), Some(want), "{text}");
        }
    }

    #[test]
    fn times_combine_seconds_and_nanoseconds() {
        assert_eq!(time(Some(2), Some(5)), Some(2_000_000_005));
        assert_eq!(time(None, Some(5)), None);
        assert_eq!(time(Some(1), None), Some(1_000_000_000));
    }

    #[test]
    fn errors_keep_their_causes() {
        let e = decode(b"\xff\xff\xff").unwrap_err();
        assert!(matches!(e, DecodeError::Protobuf(_)));
        let cause = e.source().expect("the protobuf error is kept");
        assert!(cause.downcast_ref::<quick_protobuf::Error>().is_some());
        let e = DecodeError::from(DnsError::Short);
        let cause = e.source().and_then(|c| c.downcast_ref::<DnsError>());
        assert_eq!(cause, Some(&DnsError::Short));
        assert!(DecodeError::NoMessage.source().is_none());
    }
}
