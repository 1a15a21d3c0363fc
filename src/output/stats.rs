//! `--stats-interval`: the exit summary, also printed on stderr every interval while the
//! analyser runs, so that `kubectl logs` alone shows the trend. The line is the exit
//! summary's (cumulative counters since start) plus `"interval":true` and `"uptime_s"`.

use crate::metrics::Metrics;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The thread that prints the periodic summary. Dropping it stops the thread at once (its
/// wait ends when the stop channel closes) and waits for it, so no periodic line can follow
/// the exit summary.
pub struct PeriodicSummary {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl PeriodicSummary {
    /// Prints `metrics`' summary every `every` through `print` (stderr in the binary).
    pub fn start(
        metrics: Arc<Metrics>,
        every: Duration,
        mut print: impl FnMut(&str) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let started = Instant::now();
        let thread = std::thread::Builder::new()
            .name("stats".into())
            .spawn(move || {
                while wait(&stopped, every) {
                    print(&interval_line(&metrics.summary_json(), started.elapsed()));
                }
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Prints to stderr, one whole line per call (stderr's lock keeps it whole).
    pub fn to_stderr(metrics: Arc<Metrics>, every: Duration) -> std::io::Result<Self> {
        Self::start(metrics, every, |line| eprintln!("{line}"))
    }
}

impl Drop for PeriodicSummary {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits one interval; false once the owner is gone.
fn wait(stopped: &Receiver<()>, every: Duration) -> bool {
    matches!(stopped.recv_timeout(every), Err(RecvTimeoutError::Timeout))
}

/// `{"summary":{...}}` becomes `{"summary":{...},"interval":true,"uptime_s":N}`.
fn interval_line(summary: &str, uptime: Duration) -> String {
    let mut v: serde_json::Value = match serde_json::from_str(summary) {
        Ok(v) => v,
        Err(_) => return summary.to_string(),
    };
    if let Some(obj) = v.as_object_mut() {
        obj.insert("interval".into(), true.into());
        obj.insert("uptime_s".into(), uptime.as_secs().into());
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn the_line_is_the_summary_marked_as_an_interval() {
        let m = Metrics::default();
        let line: serde_json::Value =
            serde_json::from_str(&interval_line(&m.summary_json(), Duration::from_secs(61)))
                .unwrap();
        let exit: serde_json::Value = serde_json::from_str(&m.summary_json()).unwrap();
        assert_eq!(line["summary"], exit["summary"]);
        assert_eq!(line["interval"], true);
        assert_eq!(line["uptime_s"], 61);
    }

    #[test]
    fn lines_come_while_it_runs_and_stop_when_it_is_dropped() {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = lines.clone();
        let stats = PeriodicSummary::start(
            Arc::new(Metrics::default()),
            Duration::from_millis(5),
            move |l| sink.lock().unwrap().push(l.to_string()),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while lines.lock().unwrap().len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(stats);
        let printed = lines.lock().unwrap().len();
        assert!(printed >= 2, "{printed} lines");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            lines.lock().unwrap().len(),
            printed,
            "a line after the drop"
        );
    }

    #[test]
    fn a_long_interval_does_not_delay_the_stop() {
        let stats = PeriodicSummary::start(
            Arc::new(Metrics::default()),
            Duration::from_secs(3600),
            |_| panic!("no line within an hour"),
        )
        .unwrap();
        // Drop joins: this returns only if the wait ended with the stop channel.
        drop(stats);
    }
}
