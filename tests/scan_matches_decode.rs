//! The hot path's field scan reads exactly what the generated protobuf decoder reads, for
//! every message of every real capture (CoreDNS, unbound, BIND, Knot Resolver, dnsdist).

mod support;

use bytes::BytesMut;
use dnstap_analyser::dnstap;
use dnstap_analyser::framestream::{Frame, FrameDecoder};

#[test]
fn scan_agrees_with_the_generated_decoder_on_every_capture() {
    let root = support::fixtures_dir();
    let mut checked = 0;
    for server in ["coredns", "unbound", "named", "kresd", "dnsdist"] {
        for entry in std::fs::read_dir(root.join(server)).expect("tests/fixtures/<server>") {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "fstrm") {
                continue;
            }
            let mut buf = BytesMut::from(&std::fs::read(&path).unwrap()[..]);
            let dec = FrameDecoder::new(1 << 20);
            while let Some(frame) = dec.decode(&mut buf).unwrap() {
                let Frame::Data(d) = frame else { continue };
                let full = dnstap::decode(&d).unwrap();
                let fast = dnstap::scan(&d).unwrap();
                let (m, f) = (full.message.as_ref().unwrap(), fast.message.unwrap());
                let what = path.display();
                assert_eq!(
                    full.identity.as_deref().unwrap_or(&[]),
                    fast.identity,
                    "{what}"
                );
                assert_eq!(
                    full.version.as_deref().unwrap_or(&[]),
                    fast.version,
                    "{what}"
                );
                assert_eq!(Some(m.type_pb), f.kind, "{what}");
                assert_eq!(m.socket_protocol, f.protocol, "{what}");
                assert_eq!(m.query_address.as_deref(), f.query_address, "{what}");
                assert_eq!(m.response_address.as_deref(), f.response_address, "{what}");
                assert_eq!(
                    (m.query_port, m.response_port),
                    (f.query_port, f.response_port),
                    "{what}"
                );
                assert_eq!(
                    (m.query_time_sec, m.query_time_nsec),
                    (f.query_time_sec, f.query_time_nsec),
                    "{what}"
                );
                assert_eq!(
                    (m.response_time_sec, m.response_time_nsec),
                    (f.response_time_sec, f.response_time_nsec),
                    "{what}"
                );
                assert_eq!(m.query_message.as_deref(), f.query_message, "{what}");
                assert_eq!(m.response_message.as_deref(), f.response_message, "{what}");
                checked += 1;
            }
        }
    }
    assert!(checked > 11_000, "only {checked} messages checked");
}
