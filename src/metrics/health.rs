//! Liveness and readiness: `/healthz` fails when a stage stopped making progress while it had
//! work, `/readyz` says whether the analyser accepts dnstap now.
//!
//! Each stage thread owns a [`Heartbeat`] and stamps it with a monotonic time on every loop
//! iteration, saying whether it is busy (in the middle of work) or about to wait for work.
//! A stage is stuck when it has work — it said it was busy, or its `pending` probe (queue
//! depth, batches waiting) says so — and its last stamp is older than the stall limit. An
//! idle stage blocked waiting for input is never stuck, however long it waits.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Tells whether a stage has work waiting, from outside the stage (e.g. its queue depth).
pub type PendingProbe = Box<dyn Fn() -> bool + Send + Sync>;

/// One stage thread's progress stamp.
pub struct Heartbeat {
    name: String,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last stamp.
    last_ms: AtomicU64,
    busy: AtomicBool,
    pending: Option<PendingProbe>,
}

impl Heartbeat {
    /// Stamps progress at `now` (the loop's own clock read). `busy`: the thread is about to
    /// work on something (true) or about to block waiting for work (false).
    pub fn beat(&self, now: Instant, busy: bool) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.last_ms.store(ms, Relaxed);
        self.busy.store(busy, Relaxed);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn stalled_for(&self, now: Instant, limit: Duration) -> Option<Duration> {
        let has_work = self.busy.load(Relaxed) || self.pending.as_ref().is_some_and(|p| p());
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let silent = Duration::from_millis(now_ms.saturating_sub(self.last_ms.load(Relaxed)));
        (has_work && silent > limit).then_some(silent)
    }
}

/// A stage that has had work and made no progress for longer than the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    pub stage: String,
    pub silent_for: Duration,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} made no progress for {} s with work pending",
            self.stage,
            self.silent_for.as_secs()
        )
    }
}

/// Why `/readyz` says no.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    /// The listeners are not all accepting yet.
    Starting,
    /// SIGTERM arrived: the analyser drains and accepts no new streams.
    Draining,
}

impl NotReady {
    pub fn explain(self) -> &'static str {
        match self {
            Self::Starting => "starting: not every listener accepts yet",
            Self::Draining => "draining after a stop signal",
        }
    }
}

/// Every stage's heartbeat and the readiness flags.
pub struct Health {
    epoch: Instant,
    stall_after: Duration,
    stages: Mutex<Vec<Arc<Heartbeat>>>,
    listening: AtomicBool,
    draining: AtomicBool,
}

impl Health {
    pub fn new(stall_after: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            stall_after,
            stages: Mutex::new(Vec::new()),
            listening: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    /// Registers a stage (`reader-0`, `shard-3`, `writer`) stamped now, not busy; the thread
    /// that owns the stage beats it from then on.
    pub fn stage(&self, name: impl Into<String>, pending: Option<PendingProbe>) -> Arc<Heartbeat> {
        let hb = Arc::new(Heartbeat {
            name: name.into(),
            epoch: self.epoch,
            last_ms: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            pending,
        });
        hb.beat(Instant::now(), false);
        self.stages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(hb.clone());
        hb
    }

    /// The stuck stages at `now`; empty when healthy.
    pub fn check(&self, now: Instant) -> Vec<Stall> {
        let stages = self.stages.lock().unwrap_or_else(|e| e.into_inner());
        stages
            .iter()
            .filter_map(|hb| {
                hb.stalled_for(now, self.stall_after)
                    .map(|silent_for| Stall {
                        stage: hb.name.clone(),
                        silent_for,
                    })
            })
            .collect()
    }

    /// The pipeline calls this once every listener accepts.
    pub fn set_listening(&self) {
        self.listening.store(true, Relaxed);
    }

    /// The pipeline calls this when the stop signal arrives.
    pub fn set_draining(&self) {
        self.draining.store(true, Relaxed);
    }

    pub fn ready(&self) -> Result<(), NotReady> {
        if self.draining.load(Relaxed) {
            Err(NotReady::Draining)
        } else if !self.listening.load(Relaxed) {
            Err(NotReady::Starting)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    const LIMIT: Duration = Duration::from_secs(30);

    fn at(h: &Health, secs: u64) -> Instant {
        h.epoch + Duration::from_secs(secs)
    }

    #[test]
    fn an_idle_stage_is_never_stuck() {
        let h = Health::new(LIMIT);
        let hb = h.stage("writer", None);
        hb.beat(at(&h, 1), false);
        assert!(h.check(at(&h, 3600)).is_empty());
    }

    #[test]
    fn a_busy_stage_without_progress_is_stuck_after_the_limit() {
        let h = Health::new(LIMIT);
        let hb = h.stage("reader-0", None);
        hb.beat(at(&h, 10), true);
        assert!(h.check(at(&h, 40)).is_empty(), "exactly the limit is fine");
        let stuck = h.check(at(&h, 41));
        assert_eq!(stuck.len(), 1);
        assert_eq!(stuck[0].stage, "reader-0");
        assert_eq!(stuck[0].silent_for, Duration::from_secs(31));
        assert!(stuck[0].to_string().contains("reader-0"));
        // Progress clears it.
        hb.beat(at(&h, 42), true);
        assert!(h.check(at(&h, 43)).is_empty());
    }

    #[test]
    fn pending_work_seen_from_outside_counts_even_if_the_stage_says_idle() {
        let h = Health::new(LIMIT);
        let depth = Arc::new(AtomicU64::new(0));
        let d = depth.clone();
        let hb = h.stage("shard-1", Some(Box::new(move || d.load(Relaxed) > 0)));
        let other = h.stage("shard-2", None);
        hb.beat(at(&h, 5), false);
        other.beat(at(&h, 100), false);
        assert!(h.check(at(&h, 100)).is_empty());
        depth.store(128, Relaxed);
        let stuck = h.check(at(&h, 100));
        assert_eq!(
            stuck,
            vec![Stall {
                stage: "shard-1".into(),
                silent_for: Duration::from_secs(95)
            }]
        );
    }

    #[test]
    fn ready_once_listening_and_not_while_draining() {
        let h = Health::new(LIMIT);
        assert_eq!(h.ready(), Err(NotReady::Starting));
        h.set_listening();
        assert_eq!(h.ready(), Ok(()));
        h.set_draining();
        assert_eq!(h.ready(), Err(NotReady::Draining));
    }
}
