//! A shard's consumer of finished sessions: works out each session's [`Diagnosis`] once and
//! hands that one value to the summary counters, the live metrics, `/top` and, for the
//! sessions `--log` and `--sample-succeeded` want, the renderer, whose lines it batches for
//! the writer thread.

use super::writer;
use super::{LinePolicy, Renderer};
use crate::correlate::{self, MessageStore, Session, Verdict};
use crate::diagnosis::Diagnosis;
use crate::metrics::health::Heartbeat;
use crate::metrics::model::ThreadStats;
use crate::metrics::top::{Failure, ShardTop};
use crate::metrics::Metrics;
use crossbeam_channel::Sender;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// Counts every finished session, renders the ones `--log` and `--sample-succeeded` want
/// into a batch for the writer.
pub struct LineSink {
    batch: Vec<u8>,
    out: Sender<Vec<u8>>,
    /// The writer has gone (its sink ended or failed): nothing more is rendered, but every
    /// session is still counted.
    writer_gone: bool,
    renderer: Renderer,
    policy: LinePolicy,
    metrics: Arc<Metrics>,
    /// The session at hand, worked out once (reused, so a session allocates nothing).
    diagnosis: Diagnosis,
    /// The live metrics of this shard.
    pub stats: ThreadStats,
    pub heartbeat: Arc<Heartbeat>,
    /// This shard's part of `/top`, and the upstreams a Failed session is counted under.
    pub top: ShardTop,
    top_upstreams: Vec<SocketAddr>,
    top_workload: String,
}

/// What a shard's `LineSink` is made of.
pub struct LineSinkParts {
    pub out: Sender<Vec<u8>>,
    pub renderer: Renderer,
    pub policy: LinePolicy,
    pub metrics: Arc<Metrics>,
    pub stats: ThreadStats,
    pub heartbeat: Arc<Heartbeat>,
    pub top: ShardTop,
}

impl LineSink {
    pub fn new(p: LineSinkParts) -> Self {
        Self {
            batch: Vec::with_capacity(writer::BATCH_BYTES + 4096),
            out: p.out,
            writer_gone: false,
            renderer: p.renderer,
            policy: p.policy,
            metrics: p.metrics,
            diagnosis: Diagnosis::default(),
            stats: p.stats,
            heartbeat: p.heartbeat,
            top: p.top,
            top_upstreams: Vec::new(),
            top_workload: String::new(),
        }
    }

    /// Counts a Failed session into `/top`: its qname, client and the upstreams it tried.
    fn record_top_failure(&mut self) {
        let d = &self.diagnosis;
        self.top_upstreams.clear();
        self.top_upstreams.extend(d.upstreams().flatten());
        let (namespace, pod) = (d.client_namespace(), d.client_pod());
        let workload = namespace.is_some() || pod.is_some();
        if workload {
            self.top_workload.clear();
            self.top_workload.push_str(namespace.unwrap_or("-"));
            self.top_workload.push('/');
            self.top_workload.push_str(pod.unwrap_or("-"));
        }
        let failure = Failure {
            cause: d.cause,
            qname: d.qname(),
            client: d.client.map(|c| c.ip()),
            upstreams: &self.top_upstreams,
            workload: workload.then_some(self.top_workload.as_str()),
        };
        let at = self.top.since_origin(Instant::now());
        self.top.record(at, &failure);
    }

    /// Hands the batch to the writer when it is big enough, or when `force`d (each tick, so
    /// lines never wait long at low rates). A send fails only once the writer has returned,
    /// which also wakes a send blocked on the full channel.
    pub fn hand_over(&mut self, force: bool) {
        if self.batch.len() >= writer::BATCH_BYTES || (force && !self.batch.is_empty()) {
            let full = std::mem::replace(
                &mut self.batch,
                Vec::with_capacity(writer::BATCH_BYTES + 4096),
            );
            if self.out.send(full).is_err() {
                self.writer_gone = true;
                self.batch = Vec::new();
            }
            // A batch handed over is progress, also in the middle of a long flush.
            self.heartbeat.beat(Instant::now(), true);
        }
    }
}

impl correlate::SessionSink for LineSink {
    fn session(&mut self, s: &Session, v: Verdict, store: &MessageStore) {
        self.metrics.session(&v);
        self.diagnosis.refill(s, v, store);
        self.stats.record_session(&self.diagnosis);
        let failed = v.status == correlate::Status::Failed;
        let prints = !self.writer_gone && self.policy.prints(s, &v);
        if failed || prints {
            self.diagnosis.read_client_side(s, store);
        }
        if failed {
            self.record_top_failure();
        }
        if prints {
            self.renderer
                .render(s, &self.diagnosis, store, &mut self.batch);
            self.metrics.sessions_printed.fetch_add(1, Relaxed);
            // A flush can emit a million sessions in one call: hand over as we go.
            self.hand_over(false);
        }
    }
}
