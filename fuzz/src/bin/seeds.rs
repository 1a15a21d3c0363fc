//! Writes the seed corpora from the captures: `seeds <fixtures dir> <corpus dir>`.
//! framestream/ and pipeline/ get small captures whole and the head of each large one,
//! dnstap_scan/ one payload per (server, message type, length), dns_question/ the distinct DNS
//! wire messages. Nothing is committed: fuzz/smoke.sh runs this before fuzzing.

use bytes::BytesMut;
use dnstap_analyser::dnstap;
use dnstap_analyser::framestream::{encode_control, encode_data, ControlKind, Frame, FrameDecoder};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Captures up to this size are seeds as they are; larger ones are cut to their first frames.
const WHOLE: usize = 2048;
const HEAD_FRAMES: usize = 6;
const MAX_DNS_SEEDS: usize = 200;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, fixtures, corpus] = &args[..] else {
        eprintln!("usage: seeds <tests/fixtures> <corpus dir>");
        std::process::exit(2);
    };
    let corpus = Path::new(corpus);
    for t in ["framestream", "pipeline", "dnstap_scan", "dns_question"] {
        std::fs::create_dir_all(corpus.join(t)).expect("create corpus dir");
    }
    let mut payload_kinds = BTreeSet::new();
    let mut dns = BTreeSet::new();
    let mut counts = [0usize; 3];
    for capture in captures(Path::new(fixtures)) {
        let bytes = std::fs::read(&capture).expect("read capture");
        let name = format!(
            "{}_{}",
            capture
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy(),
            capture.file_stem().unwrap().to_string_lossy()
        );
        let payloads = data_frames(&bytes);
        let stream = if bytes.len() <= WHOLE {
            bytes.clone()
        } else {
            head(&payloads[..HEAD_FRAMES.min(payloads.len())])
        };
        write(corpus, "pipeline", &name, &stream);
        // framestream: byte 0 = 4096-byte frame limit, byte 1 = chunking seed.
        write(
            corpus,
            "framestream",
            &name,
            &[&[2u8, 7][..], &stream].concat(),
        );
        counts[0] += 1;
        for p in &payloads {
            let Ok(tap) = dnstap::scan(p) else { continue };
            let Some(m) = tap.message else { continue };
            let kind = (
                name.split('_').next().unwrap().to_owned(),
                m.kind,
                p.len() / 64,
            );
            if payload_kinds.insert(format!("{kind:?}")) {
                write(corpus, "dnstap_scan", &format!("{name}_{}", counts[1]), p);
                counts[1] += 1;
            }
            for wire in [m.query_message, m.response_message].into_iter().flatten() {
                if dns.len() < MAX_DNS_SEEDS && dns.insert(wire.to_vec()) {
                    write(
                        corpus,
                        "dns_question",
                        &format!("{name}_{}", counts[2]),
                        wire,
                    );
                    counts[2] += 1;
                }
            }
        }
    }
    eprintln!(
        "seeds: {} captures, {} dnstap payloads, {} DNS messages",
        counts[0], counts[1], counts[2]
    );
}

fn captures(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for server in std::fs::read_dir(root).expect("fixtures dir") {
        let dir = server.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&dir).unwrap() {
            let p = f.unwrap().path();
            if p.extension().is_some_and(|e| e == "fstrm") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn data_frames(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut buf = BytesMut::from(bytes);
    let dec = FrameDecoder::new(1 << 20);
    let mut out = Vec::new();
    while let Ok(Some(frame)) = dec.decode(&mut buf) {
        if let Frame::Data(d) = frame {
            out.push(d.to_vec());
        }
    }
    out
}

/// A unidirectional capture of these payloads: START, data, STOP.
fn head(payloads: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_control(
        ControlKind::Start,
        &[dnstap_analyser::framestream::DNSTAP_CONTENT_TYPE],
        &mut out,
    );
    for p in payloads {
        encode_data(p, &mut out);
    }
    encode_control(ControlKind::Stop, &[], &mut out);
    out
}

fn write(corpus: &Path, target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus.join(target).join(name), bytes).expect("write seed");
}
