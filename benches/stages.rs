//! Per-stage cost in ns per message, over the 10,724 messages of a real CoreDNS burst
//! (tests/fixtures/coredns/h_burst_5k.fstrm):
//!   cargo bench --bench stages
//! Stages: Frame Streams decoding, protobuf decoding, DNS question parsing, event extraction,
//! correlation + classification, and JSON rendering of the finished sessions (all of them with
//! their messages, without them, and sampled as `--sample-succeeded 0.01 --messages failed`).
//! And the lookup stage's join per query, for a forwarder asking many names that share a first
//! label (`lookup_join`).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dnstap_analyser::correlate::{Config, Correlator, MessageStore, Session, Verdict};
use dnstap_analyser::diagnosis::Diagnosis;
use dnstap_analyser::dns;
use dnstap_analyser::dnstap::{self, Event, SourceId, SourceRegistry};
use dnstap_analyser::framestream::FrameDecoder;
use dnstap_analyser::lookup::{self, LookupTable, Outcome, Query};
use dnstap_analyser::output::{
    Format, LineOptions, LinePolicy, LogFilter, Messages as MessageLines, Renderer, SampleRate,
};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

#[path = "support/capture.rs"]
mod capture;
use capture::{capture, frames};

/// Events as a reader would batch them: each with its encoded message in `Messages`.
struct Messages(Vec<u8>);

fn events(frames: &[Bytes]) -> (Vec<Event>, Messages) {
    let (events, bytes) = capture::events(frames);
    (events, Messages(bytes))
}

/// Runs the correlator over the events, handing each finished session to `sink`.
fn correlate(
    (events, Messages(bytes)): &(Vec<Event>, Messages),
    sink: &mut impl FnMut(&Session, Verdict, &MessageStore),
) {
    let mut corr = Correlator::new(Config {
        idle_flush: false,
        ..Config::default()
    });
    let now = Instant::now();
    for ev in events {
        corr.on_event(&mut ev.clone(), ev.message.of(bytes), now, sink);
    }
    corr.flush(|_| 0, sink);
}

fn stages(c: &mut Criterion) {
    let bytes = capture();
    let frames = frames(&bytes);
    let events = events(&frames);
    let mut sessions = 0u64;
    correlate(&events, &mut |_, _, _| sessions += 1);
    let n = frames.len() as u64;
    let mut g = c.benchmark_group("per_message");
    g.throughput(Throughput::Elements(n));

    g.bench_function("frame_decode", |b| {
        // As the reader does: the complete frames of the buffer, then each read in place.
        let dec = FrameDecoder::new(1 << 20);
        b.iter(|| {
            let mut at = 0;
            while let Ok(n @ 1..) = dec.complete_prefix(&bytes[at..]) {
                let piece = &bytes[at..at + n];
                let mut p = 0;
                while let Some((f, len)) = dec.frame_at(&piece[p..]).unwrap() {
                    black_box(f);
                    p += len;
                }
                at += n;
            }
        })
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
        b.iter(|| {
            let mut n = 0u32;
            correlate(&events, &mut |s, v, _| {
                black_box((s, v));
                n += 1;
            });
            n
        })
    });
    g.finish();

    // Correlation again plus rendering every session: subtract correlate_classify.
    let mut g = c.benchmark_group("per_session");
    g.throughput(Throughput::Elements(sessions));
    let renderer = Renderer::new(Format::Json, Arc::new(SourceRegistry::default()));
    g.bench_function("correlate_and_render_json", |b| {
        let mut out = Vec::with_capacity(16 << 20);
        b.iter(|| {
            out.clear();
            correlate(&events, &mut |s, v, store| {
                renderer.render(s, &Diagnosis::of(s, v, store), store, &mut out)
            });
            black_box(out.len())
        })
    });
    // Issue #9: the same lines without their messages, and the policy recommended for an
    // analyser left on (every session still goes through the policy; 1 % of the Succeeded
    // and every Failed one is rendered).
    for (name, rate, messages) in [
        (
            "correlate_and_render_json_messages_failed",
            1.0,
            MessageLines::Failed,
        ),
        (
            "correlate_and_render_json_messages_none",
            1.0,
            MessageLines::None,
        ),
        (
            "correlate_and_render_json_sample_0.01_messages_failed",
            0.01,
            MessageLines::Failed,
        ),
    ] {
        let options = LineOptions {
            sample_succeeded: SampleRate::new(rate).unwrap(),
            messages,
        };
        let policy = LinePolicy::new(LogFilter::ALL, options);
        let renderer =
            Renderer::new(Format::Json, Arc::new(SourceRegistry::default())).with_options(options);
        g.bench_function(name, |b| {
            let mut out = Vec::with_capacity(16 << 20);
            b.iter(|| {
                out.clear();
                correlate(&events, &mut |s, v, store| {
                    if policy.prints(s, &v) {
                        renderer.render(s, &Diagnosis::of(s, v, store), store, &mut out)
                    }
                });
                black_box(out.len())
            })
        });
    }
    g.finish();
}

/// One client (a node-local cache or forwarder) asking `www.d<i>.com` for 10,000 names, each
/// from a fresh port, so each query opens a lookup and the client stays at its bound of 256
/// open ones, all under the first label `www`.
fn lookup_join(c: &mut Criterion) {
    const QUERIES: u64 = 100_000;
    let names: Vec<String> = (0..10_000).map(|i| format!("www.d{i}.com.")).collect();
    let mut g = c.benchmark_group("lookup_join");
    g.throughput(Throughput::Elements(QUERIES));
    g.bench_function("forwarder_one_first_label", |b| {
        b.iter(|| {
            let cfg = lookup::Config {
                max_per_client: 256,
                ..lookup::Config::default()
            };
            let mut table = LookupTable::new(cfg, 0, 1);
            let mut ended = 0u64;
            for i in 0..QUERIES {
                let t = 1_700_000_000_000_000_000 + i * 10_000;
                let q = Query {
                    client: ([10, 0, 0, 9], 1024 + (i % 60_000) as u16).into(),
                    identity: SourceId(0),
                    qname: &names[(i % 10_000) as usize],
                    qtype: lookup::QTYPE_A,
                    outcome: Outcome::Answered,
                    cname_target: None,
                    query_time: t,
                    response_time: Some(t + 1_000_000),
                    dns_id: Some(i as u16),
                };
                table.on_query(&q, t, &mut |_| ended += 1);
            }
            black_box(ended)
        })
    });
    g.finish();
}

criterion_group!(benches, stages, lookup_join);
criterion_main!(benches);
