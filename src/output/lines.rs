//! A shard's consumer of finished sessions: works out each session's [`Diagnosis`] once and
//! hands that one value to the summary counters, the live metrics, `/top`, for the sessions
//! `--log` and `--sample-succeeded` want the renderer, and for every session the lookup stage
//! (with its line, when printed), which completes the lines for the writer.

use super::{LinePolicy, Renderer};
use crate::correlate::{self, MessageStore, Session, Verdict};
use crate::diagnosis::Diagnosis;
use crate::lookup::stage::LookupRoute;
use crate::metrics::health::Heartbeat;
use crate::metrics::model::ThreadStats;
use crate::metrics::top::{Failure, ShardTop};
use crate::metrics::{Metrics, SessionCounts};
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// Sessions a shard counts before it adds them to the shared metrics (it also adds them
/// before each hand-over to the lookup stage).
const COUNTS_HELD: u64 = 64;

/// Counts every finished session, renders the ones `--log` and `--sample-succeeded` want,
/// and hands every session to the lookup stage.
pub struct LineSink {
    out: LookupRoute,
    /// The writer has gone (its sink ended or failed): nothing more is rendered, but every
    /// session is still counted.
    writer_gone: bool,
    renderer: Renderer,
    policy: LinePolicy,
    metrics: Arc<Metrics>,
    /// Sessions finished and not yet added to `metrics`.
    counts: SessionCounts,
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
    pub out: LookupRoute,
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
            out: p.out,
            writer_gone: false,
            renderer: p.renderer,
            policy: p.policy,
            metrics: p.metrics,
            counts: SessionCounts::default(),
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
            source: d.source,
            qtype: d.qtype,
        };
        let at = self.top.since_origin(Instant::now());
        self.top.record(at, &failure);
    }

    /// Hands the batches to the lookup stage when they are big enough, or when `force`d
    /// (each tick, so lines never wait long at low rates). A send fails only once the stage
    /// has returned, which also wakes a send blocked on the full channel.
    pub fn hand_over(&mut self, force: bool) {
        // The counts go first whenever a batch goes: its send may wait on a full stage, and
        // the exit summary after a shutdown deadline reads them.
        if self.counts.pending() >= COUNTS_HELD || self.out.has_due(force) {
            self.metrics.add_sessions(&mut self.counts);
        }
        match self.out.hand_over(force) {
            None => self.writer_gone = true,
            // A batch handed over is progress, also in the middle of a long flush (every
            // session adds a record, so batches keep going). Not per session: a clock read each.
            Some(true) => self.heartbeat.beat(Instant::now(), true),
            Some(false) => {}
        }
    }
}

impl correlate::SessionSink for LineSink {
    fn session(&mut self, s: &Session, v: Verdict, store: &MessageStore) {
        self.counts.count(&v);
        self.diagnosis.refill(s, v, store);
        self.stats.record_session(&self.diagnosis);
        // The lookup stage joins every session by its client, question and answer.
        self.diagnosis.read_client_side(s, store);
        self.diagnosis.read_answer(s, store);
        if v.status == correlate::Status::Failed {
            self.record_top_failure();
        } else {
            self.top.record_success(self.diagnosis.source);
        }
        let prints = !self.writer_gone && self.policy.prints(s, &v);
        let (renderer, d) = (&self.renderer, &self.diagnosis);
        let line = prints.then_some(|out: &mut Vec<u8>| renderer.render(s, d, store, out));
        self.out.push(d, line);
        if prints {
            self.metrics.sessions_printed.fetch_add(1, Relaxed);
        }
        // A flush can emit a million sessions in one call: hand over as we go.
        self.hand_over(false);
    }
}
