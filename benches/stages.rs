//! Per-stage cost in ns per message, over the 10,724 messages of a real CoreDNS burst
//! (../shared/fixtures/coredns/h_burst_5k.fstrm):
//!   cargo bench --bench stages
//! Stages: Frame Streams decoding, protobuf decoding, DNS question parsing, event extraction,
//! correlation + classification, and JSON rendering of the finished sessions.

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use dnstap_analyser::correlate::{Config, Correlator, Session, Verdict};
use dnstap_analyser::dns;
use dnstap_analyser::dnstap::{self, Event, SenderProfile, SourceId, SourceRegistry};
use dnstap_analyser::framestream::{Frame, FrameDecoder};
use dnstap_analyser::output::{Format, Renderer};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

fn capture() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/coredns/h_burst_5k.fstrm"
    );
    std::fs::read(path).expect("../shared/fixtures must sit beside the checkout")
}

fn frames(bytes: &[u8]) -> Vec<Bytes> {
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

fn events(frames: &[Bytes]) -> Vec<Event> {
    let hasher = dns::key_hasher();
    let mut watermark = 0;
    frames
        .iter()
        .map(|f| {
            let tap = dnstap::scan(f).unwrap();
            let mut ev = Event::from_fields(
                &tap,
                f.clone(),
                SourceId(0),
                SenderProfile::CoreDns,
                &hasher,
            )
            .unwrap();
            watermark = watermark.max(ev.time().unwrap_or(0));
            ev.watermark = watermark;
            ev
        })
        .collect()
}

fn sessions(events: &[Event]) -> Vec<(Session, Verdict)> {
    let mut out = Vec::new();
    let mut corr = Correlator::new(Config {
        idle_flush: false,
        ..Config::default()
    });
    let now = Instant::now();
    let mut sink = |s: Session, v: Verdict| out.push((s, v));
    for ev in events {
        corr.on_event(ev.clone(), now, &mut sink);
    }
    corr.flush(|_| 0, &mut sink);
    out
}

fn stages(c: &mut Criterion) {
    let bytes = capture();
    let frames = frames(&bytes);
    let events = events(&frames);
    let sessions = sessions(&events);
    let n = frames.len() as u64;
    let mut g = c.benchmark_group("per_message");
    g.throughput(Throughput::Elements(n));

    g.bench_function("frame_decode", |b| {
        let dec = FrameDecoder::new(1 << 20);
        b.iter_batched(
            || BytesMut::from(&bytes[..]),
            |mut buf| {
                while let Some(f) = dec.decode(&mut buf).unwrap() {
                    black_box(f);
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("protobuf_scan", |b| {
        b.iter(|| {
            for f in &frames {
                black_box(dnstap::scan(f).unwrap());
            }
        })
    });
    g.bench_function("protobuf_decode_full", |b| {
        b.iter(|| {
            for f in &frames {
                black_box(dnstap::decode(f).unwrap());
            }
        })
    });
    let wires: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| {
            let tap = dnstap::decode(f).unwrap();
            let m = tap.message.unwrap();
            m.query_message.or(m.response_message).unwrap().into_owned()
        })
        .collect();
    g.bench_function("dns_question", |b| {
        let hasher = dns::key_hasher();
        b.iter(|| {
            for w in &wires {
                black_box(dns::parse_question(w, &hasher).unwrap());
            }
        })
    });
    g.bench_function("event_extract", |b| {
        b.iter(|| black_box(self::events(&frames)))
    });
    g.bench_function("correlate_classify", |b| {
        b.iter_batched(
            || events.clone(),
            |evs| black_box(self::sessions(&evs)),
            BatchSize::LargeInput,
        )
    });
    g.finish();

    let mut g = c.benchmark_group("per_session");
    g.throughput(Throughput::Elements(sessions.len() as u64));
    let renderer = Renderer::new(Format::Json, Arc::new(SourceRegistry::default()));
    g.bench_function("render_json", |b| {
        let mut out = Vec::with_capacity(16 << 20);
        b.iter(|| {
            out.clear();
            for (s, v) in &sessions {
                renderer.render(s, v, &mut out);
            }
            black_box(out.len())
        })
    });
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
