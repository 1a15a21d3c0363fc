//! The ingest hot path (read buffer → frames → scan → event → router → shard queue) allocates
//! nothing per message: counted with a counting global allocator over a capture, which is
//! deterministic, so the bound is exact enough to assert. What it does allocate is per read
//! buffer (1 MiB) and per batch of 128 events (the batch and its event vector).

use dnstap_analyser::diagnosis::recall::RecallConfig;
use dnstap_analyser::ingest::{file, LossBoard, QueueDepths, Router, SenderLimits, Shared};
use dnstap_analyser::metrics::Metrics;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

#[path = "../benches/support/counting.rs"]
mod counting;
use counting::{allocations, Counting};

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn reading_a_capture_allocates_per_batch_not_per_message() {
    let capture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/coredns/h_burst_5k.fstrm");
    let limits = SenderLimits::default();
    let metrics = Arc::new(Metrics::default());
    let shared = Shared {
        sources: Arc::new(limits.registry()),
        board: Arc::new(LossBoard::default()),
        metrics: metrics.clone(),
        max_frame_size: 1 << 20,
        session_timeout: 10_000_000_000,
        limits,
        recall: RecallConfig::default(),
    };
    // One shard, whose queue holds every batch (taken after the count).
    let (tx, rx) = crossbeam_channel::bounded(1 << 16);
    let depths: QueueDepths = Arc::new([AtomicU64::new(0)]);
    let mut router = Router::new(vec![tx], depths, 1 << 30, false, metrics.clone());

    let (allocations, errors) = allocations(|| {
        let errors = file::read_files(&[&capture], &shared, &mut router, &mut |_| {});
        router.flush();
        errors
    });

    assert!(errors.is_empty(), "{errors:?}");
    let messages = metrics.messages.load(Relaxed) as usize;
    assert_eq!(messages, 10_724, "every message of the capture was read");
    let batches = rx.len();
    assert!(batches >= messages / 128, "{batches} batches");
    // Per batch: its box and its event vector. Per read buffer, per stream and per identity: a
    // few. What is left over must be far below one per message.
    let per_message = allocations as f64 / messages as f64;
    eprintln!(
        "{allocations} allocations for {messages} messages ({per_message:.4} per message), \
         {batches} batches"
    );
    assert!(
        allocations <= 2 * batches as u64 + 64,
        "{allocations} allocations for {messages} messages in {batches} batches"
    );
}
