//! The progress of a long `read` on a terminal: a bar on stderr with bytes, percent, rate,
//! sessions and ETA (1M sessions take seconds; silence looks like a hang), while the session
//! lines go to a file or a pipe. Nothing at all when stderr is not a terminal (a pipe, a log
//! file, CI get the summary line alone), nor when the lines scroll on the same terminal.

use dnstap_analyser::metrics::Metrics;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// How often the bar is brought up to date from the counters.
const REDRAW: Duration = Duration::from_millis(100);

const TEMPLATE: &str =
    "{bar:30} {bytes}/{total_bytes} {percent:>3}% {bytes_per_sec} {msg} ETA {eta}";

/// A bar redrawn from the run's counters; cleared when dropped, before the summary line.
pub struct Progress {
    bar: ProgressBar,
    done: Arc<AtomicBool>,
    redraw: Option<JoinHandle<()>>,
}

impl Progress {
    /// Shows the progress of reading `files` (their sizes make the total; the run's `metrics`
    /// count the bytes read and the sessions), or nothing when stderr is not a terminal or
    /// stdout is one.
    pub fn start(files: &[PathBuf], metrics: Arc<Metrics>) -> Option<Progress> {
        if !std::io::stderr().is_terminal() || std::io::stdout().is_terminal() {
            return None;
        }
        let total = files
            .iter()
            .filter_map(|f| std::fs::metadata(f).ok())
            .map(|m| m.len())
            .sum();
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        bar.set_style(ProgressStyle::with_template(TEMPLATE).expect("a valid template"));
        // Named from the first draw: a read shorter than one redraw is drawn only once.
        bar.set_message("0 sessions");
        let done = Arc::new(AtomicBool::new(false));
        let (shown, stop) = (bar.clone(), done.clone());
        let redraw = thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                while !stop.load(Relaxed) {
                    // Data frames count their length prefix too: at the end, about the total.
                    shown.set_position(metrics.bytes.load(Relaxed).min(total));
                    shown.set_message(format!("{} sessions", metrics.sessions.load(Relaxed)));
                    thread::sleep(REDRAW);
                }
            })
            .ok()?;
        Some(Progress {
            bar,
            done,
            redraw: Some(redraw),
        })
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.store(true, Relaxed);
        if let Some(t) = self.redraw.take() {
            let _ = t.join();
        }
        self.bar.finish_and_clear();
    }
}
