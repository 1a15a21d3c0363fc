//! The benches' input: the 10,724 messages of a real CoreDNS burst
//! (tests/fixtures/coredns/h_burst_5k.fstrm), as a reader hands them to the shards.

use bytes::{Bytes, BytesMut};
use dnstap_analyser::dns;
use dnstap_analyser::dnstap::{self, Event, SenderProfile, SourceId};
use dnstap_analyser::framestream::{Frame, FrameDecoder};

pub fn capture() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/coredns/h_burst_5k.fstrm"
    );
    std::fs::read(path).expect("tests/fixtures/coredns/h_burst_5k.fstrm is part of the repository")
}

pub fn frames(bytes: &[u8]) -> Vec<Bytes> {
    let dec = FrameDecoder::new(1 << 20);
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(f) = dec.decode(&mut buf).unwrap() {
        if let Frame::Data(d) = f {
            out.push(d);
        }
    }
    out
}

/// Events as a reader would batch them: each with its encoded message in the returned bytes.
pub fn events(frames: &[Bytes]) -> (Vec<Event>, Vec<u8>) {
    let hasher = dns::key_hasher();
    let mut watermark = 0;
    let mut bytes = Vec::new();
    let events = frames
        .iter()
        .map(|f| {
            let tap = dnstap::scan(f).unwrap();
            let mut ev =
                Event::from_fields(&tap, SourceId(0), SenderProfile::CoreDns, &hasher).unwrap();
            watermark = watermark.max(ev.time().unwrap_or(0));
            ev.watermark = watermark;
            ev.message = dnstap::MessageSpan {
                start: bytes.len() as u32,
                len: tap.message_bytes.len() as u32,
                ..ev.message
            };
            bytes.extend_from_slice(tap.message_bytes);
            ev
        })
        .collect();
    (events, bytes)
}
