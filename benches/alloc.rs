//! Heap allocations per message on the hot path, counted by a counting global allocator over
//! the 10,724 messages of a real CoreDNS burst (tests/fixtures/coredns/h_burst_5k.fstrm):
//!   cargo bench --bench alloc
//! Counts are deterministic (single thread, same input), so the bench asserts its bounds.
//!
//! The capture is replayed several times through the same stages, an hour of event time apart,
//! as a long run sees it: the first pass grows the buffers (session table, message store,
//! expiry lanes, lookup table), the later passes show the steady state. Stages:
//! - shard: correlator, diagnosis, metrics recording, `/top`, the hand-over of each session's
//!   lookup record (`LineSink` with `--log sampleloss`: nothing to render on this capture);
//! - lookup: the lookup stage's join and close, and the lookup metrics (`--log-lookups none`);
//! - rendering, apart: the session lines of `--log failed` and the lookup lines of
//!   `--log-lookups problems`; the session lines allocate per printed line.

use dnstap_analyser::correlate::{Config, Correlator};
use dnstap_analyser::dnstap::{Event, SourceId, SourceRegistry};
use dnstap_analyser::lookup::record::RecordBatch;
use dnstap_analyser::lookup::stage::LookupRoute;
use dnstap_analyser::lookup::{self, LookupTable};
use dnstap_analyser::metrics::lookups::LookupStats;
use dnstap_analyser::metrics::model::{Telemetry, TelemetryConfig, ThreadKind};
use dnstap_analyser::metrics::top::{TopBoard, TopConfig};
use dnstap_analyser::metrics::Metrics;
use dnstap_analyser::output::lines::{LineSink, LineSinkParts};
use dnstap_analyser::output::lookup::{LookupLines, LookupPolicy};
use dnstap_analyser::output::{Format, LineOptions, LinePolicy, LogFilter, Renderer};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/capture.rs"]
mod capture;

#[path = "support/counting.rs"]
mod counting;
use counting::{allocations, Counting};

#[global_allocator]
static GLOBAL: Counting = Counting;

const PASSES: u64 = 4;
const HOUR: u64 = 3_600_000_000_000;

/// The event `pass` hours later.
fn later(ev: &Event, pass: u64) -> Event {
    let mut ev = ev.clone();
    let shift = |t: Option<u64>| t.map(|t| t + pass * HOUR);
    ev.query_time = shift(ev.query_time);
    ev.response_time = shift(ev.response_time);
    ev.watermark += pass * HOUR;
    ev
}

/// Per pass: allocations in the shard (session lines rendered there included), in the lookup
/// stage, and in rendering the lookup lines.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    shard: u64,
    lookup: u64,
    render_lookups: u64,
}

fn run(events: &[Event], bytes: &[u8], log: &str, lookup_lines: LookupPolicy) -> Vec<Counts> {
    let metrics = Arc::new(Metrics::default());
    let sources = Arc::new(SourceRegistry::new(16, Duration::from_secs(600)));
    // The capture's events carry SourceId(0): registered, as a connected sender's identity
    // is (an unknown id reads as empty strings, made afresh each time).
    let identity = sources.intern(b"h_burst", b"CoreDNS-1.10.1");
    assert_eq!(identity, SourceId(0), "the capture's identity");
    let telemetry = Arc::new(Telemetry::new(
        metrics.clone(),
        sources.clone(),
        TelemetryConfig::default(),
    ));
    let (tx, rx) = crossbeam_channel::unbounded::<RecordBatch>();
    let log = LogFilter::parse(log).expect("a --log value");
    let mut sink = LineSink::new(LineSinkParts {
        out: LookupRoute::new(vec![tx], Arc::new(AtomicBool::new(false))),
        renderer: Renderer::new(Format::Json, sources.clone()),
        policy: LinePolicy::new(log, LineOptions::default()),
        metrics: metrics.clone(),
        stats: telemetry.thread_stats(ThreadKind::Shard(0)),
        heartbeat: telemetry.health.stage("shard-0", None),
        top: TopBoard::new(TopConfig::default()).shard(),
    });
    let mut corr = Correlator::new(Config {
        idle_flush: false,
        ..Config::default()
    });
    let mut table = LookupTable::new(lookup::Config::default(), 0, 1);
    let mut stats = LookupStats::default();
    let mut lines = LookupLines::new(Format::Json, sources.clone());
    let mut out = Vec::with_capacity(1 << 20);
    let now = Instant::now();
    let mut passes = Vec::new();
    for pass in 0..PASSES {
        let mut counts = Counts::default();
        let shifted: Vec<Event> = events.iter().map(|ev| later(ev, pass)).collect();
        (counts.shard, ()) = allocations(|| {
            for mut ev in shifted {
                let message = ev.message.of(bytes);
                corr.on_event(&mut ev, message, now, &mut sink);
            }
            corr.flush(|_| 0, &mut sink);
            sink.hand_over(true);
        });
        let batches: Vec<RecordBatch> = rx.try_iter().collect();
        let mut clock = pass * HOUR;
        // As the stage does: each lookup counted, and printed, as it ends. Its rendering is
        // counted apart (`allocations` nests: the table's count includes it).
        let mut rendered = 0;
        let mut emit = |l: &lookup::Lookup| {
            stats.record(l, &sources, 256);
            if lookup_lines.prints(l) {
                rendered += allocations(|| lines.render(l, &mut out)).0;
            }
        };
        for batch in &batches {
            let (n, ()) = allocations(|| {
                for r in &batch.records {
                    clock += 1_000;
                    let Some(q) = r.facts.as_ref().and_then(|f| batch.query(f)) else {
                        continue;
                    };
                    table.on_query(&q, clock, &mut emit);
                }
            });
            counts.lookup += n;
        }
        counts.lookup += allocations(|| table.flush(&mut emit)).0;
        counts.render_lookups = rendered;
        counts.lookup -= rendered;
        out.clear();
        passes.push(counts);
    }
    passes
}

fn main() {
    let (events, bytes) = capture::events(&capture::frames(&capture::capture()));
    let n = events.len() as f64;
    println!(
        "{} messages per pass, {PASSES} passes an hour apart",
        events.len()
    );
    let per = |c: u64| c as f64 / n;
    let quiet = run(&events, &bytes, "sampleloss", LookupPolicy::None);
    let printing = run(&events, &bytes, "failed", LookupPolicy::Problems);
    for (name, passes) in [
        ("--log sampleloss --log-lookups none", &quiet),
        ("--log failed --log-lookups problems", &printing),
    ] {
        println!("{name}: allocations per message (shard, lookup stage, lookup lines)");
        for (i, c) in passes.iter().enumerate() {
            println!(
                "  pass {}: shard {:.3}  lookup {:.3}  lookup lines {:.3}",
                i + 1,
                per(c.shard),
                per(c.lookup),
                per(c.render_lookups),
            );
        }
    }
    let warm = quiet[PASSES as usize - 1];
    let printed = printing[PASSES as usize - 1];
    println!(
        "rendering --log failed (session lines, in the shard's count): {:.3} per message",
        per(printed.shard) - per(warm.shard)
    );
    println!(
        "steady state: shard {} allocations ({:.4} per message), lookup stage {:.3} per message",
        warm.shard,
        per(warm.shard),
        per(warm.lookup)
    );
    // What is left in the shard is per hand-over of 128 sessions to the lookup stage (a new
    // batch), not per message.
    assert!(
        per(warm.shard) < 0.01,
        "the shard allocates per message again: {:.4}",
        per(warm.shard)
    );
    // 0.012 with the finished lookup written into the table's own and the strings let go
    // reused (what is left: index lists of one base that outgrow their inline room); 0.60
    // with finished lookups recycled; 3.08 when each owned new strings.
    assert!(
        per(warm.lookup) < 0.05,
        "the lookup stage allocates per finished lookup again: {:.3}",
        per(warm.lookup)
    );
    // 0.366 when each line formatted its diagnosis into a new String.
    assert!(
        per(printed.render_lookups) < 0.01,
        "lookup lines allocate per line again: {:.3}",
        per(printed.render_lookups)
    );
}
