//! `run`: drives the pods (one thread and connection each), or writes a .fstrm file, and
//! builds the ground-truth summary.

use crate::gen::{self, Config, Counts, Model, PodGen, Progress, NS};
use crate::send::{self, Target};
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub enum Output {
    Send(Target),
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub output: Output,
    /// Sessions per second over all pods; None = as fast as the receiver takes them.
    pub rate: Option<f64>,
    pub duration: Option<Duration>,
    /// Generate every pod's whole stream before connecting (max rate, bounded by --sessions).
    pub pregen: bool,
    pub chunk: usize,
    pub connect_patience: Duration,
    pub finish_patience: Duration,
    /// Local address the pods connect from (`--bind`).
    pub bind: Option<std::net::IpAddr>,
}

/// Wall-clock facts of a run.
#[derive(Debug, Clone, Default)]
pub struct Timing {
    pub generate_s: f64,
    /// From the first data byte to the last one written, over all pods.
    pub send_s: f64,
    /// From the first data byte to the last FINISH.
    pub finish_s: f64,
    pub finishes: u32,
}

pub struct RunResult {
    pub counts: Counts,
    pub per_pod: Vec<(u32, bool, Counts)>,
    pub records: Vec<Vec<u8>>,
    pub timing: Timing,
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

pub fn run(cfg: Config, opts: &RunOptions) -> Result<RunResult, String> {
    match &opts.output {
        Output::File(path) => write_file(cfg, opts, path),
        Output::Send(target) => send_all(cfg, opts, target),
    }
}

fn finish_result(pods: Vec<PodGen>, timing: Timing) -> RunResult {
    let mut counts = Counts::default();
    let mut per_pod = Vec::new();
    let mut records = Vec::new();
    for p in pods {
        counts.add(&p.counts);
        per_pod.push((p.pod, p.is_mapped(), p.counts.clone()));
        records.push(p.records);
    }
    RunResult {
        counts,
        per_pod,
        records,
        timing,
    }
}

/// One Frame Streams file: the pods' streams merged in 10 ms windows of event time.
fn write_file(cfg: Config, opts: &RunOptions, path: &PathBuf) -> Result<RunResult, String> {
    let model = Model::new(cfg);
    let mut pods: Vec<PodGen> = (0..model.cfg.pods)
        .map(|i| {
            let mut p = PodGen::new(model.clone(), i);
            p.hold_pending = true;
            p
        })
        .collect();
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut buf = Vec::with_capacity(opts.chunk + 4096);
    send::file_start(&mut buf);
    let t0 = Instant::now();
    let step = 10_000_000;
    let mut until = model.cfg.start_ns;
    loop {
        let mut all_done = true;
        for p in pods.iter_mut() {
            if let Some(d) = opts.duration {
                if t0.elapsed() >= d {
                    p.stop_new();
                }
            }
            loop {
                let r = p.fill(&mut buf, until, opts.chunk);
                if buf.len() >= opts.chunk {
                    w.write_all(&buf).map_err(|e| e.to_string())?;
                    buf.clear();
                }
                match r {
                    Progress::Full => continue,
                    Progress::Done => break,
                    Progress::Due(_) => {
                        all_done = false;
                        break;
                    }
                }
            }
        }
        if all_done {
            break;
        }
        until += step;
    }
    send::file_stop(&mut buf);
    w.write_all(&buf).map_err(|e| e.to_string())?;
    w.flush().map_err(|e| e.to_string())?;
    let s = t0.elapsed().as_secs_f64();
    Ok(finish_result(
        pods,
        Timing {
            generate_s: s,
            send_s: s,
            finish_s: s,
            finishes: 0,
        },
    ))
}

struct PodOutcome {
    gen: PodGen,
    first_byte: Option<Instant>,
    last_byte: Instant,
    finished_at: Instant,
    finish: bool,
}

fn send_all(mut cfg: Config, opts: &RunOptions, target: &Target) -> Result<RunResult, String> {
    if opts.pregen && cfg.sessions == u64::MAX {
        return Err(
            "--pregen needs a session count (--sessions, or --rate with --duration)".into(),
        );
    }
    let paced = opts.rate.is_some();
    if paced {
        // Event time follows the wall clock, so the analyser's timeouts run in real time.
        cfg.start_ns = now_ns() + 200_000_000;
    }
    let model = Model::new(cfg);
    let n = model.cfg.pods as usize;
    let barrier = Arc::new(Barrier::new(n + 1));
    let t_gen = Instant::now();
    let mut handles = Vec::new();
    for i in 0..model.cfg.pods {
        let model = model.clone();
        let barrier = barrier.clone();
        let target = target.clone();
        let opts = opts.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("pod-{i}"))
                .spawn(move || pod_thread(model, i, &target, &opts, &barrier))
                .map_err(|e| e.to_string())?,
        );
    }
    // Everyone connected and (with --pregen) generated: go.
    barrier.wait();
    let start = Instant::now();
    let generate_s = start.duration_since(t_gen).as_secs_f64();
    let mut outs = Vec::new();
    let mut err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(o)) => outs.push(o),
            Ok(Err(e)) => err = Some(e),
            Err(_) => err = Some("a pod thread panicked".to_string()),
        }
    }
    if let Some(e) = err {
        return Err(e);
    }
    let first = outs
        .iter()
        .filter_map(|o| o.first_byte)
        .min()
        .unwrap_or(start);
    let last = outs.iter().map(|o| o.last_byte).max().unwrap_or(start);
    let fin = outs.iter().map(|o| o.finished_at).max().unwrap_or(start);
    let timing = Timing {
        generate_s,
        send_s: last.saturating_duration_since(first).as_secs_f64(),
        finish_s: fin.saturating_duration_since(first).as_secs_f64(),
        finishes: outs.iter().filter(|o| o.finish).count() as u32,
    };
    Ok(finish_result(
        outs.into_iter().map(|o| o.gen).collect(),
        timing,
    ))
}

fn pod_thread(
    model: Arc<Model>,
    pod: u32,
    target: &Target,
    opts: &RunOptions,
    barrier: &Barrier,
) -> Result<PodOutcome, String> {
    let mut g = PodGen::new(model.clone(), pod);
    // Connect and handshake first; a failure must still release the barrier.
    let conn = send::connect(target, opts.bind, opts.connect_patience)
        .and_then(|mut c| send::open(&mut c, opts.connect_patience).map(|_| c));
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    if conn.is_ok() && opts.pregen {
        loop {
            let mut buf = Vec::with_capacity(opts.chunk + 4096);
            let r = g.fill(&mut buf, u64::MAX, opts.chunk);
            chunks.push(buf);
            if r == Progress::Done {
                break;
            }
        }
    }
    barrier.wait();
    let mut conn = conn?;
    let start = Instant::now();
    let mut first_byte = None;
    let mut write = |conn: &mut send::Conn, buf: &[u8]| -> Result<(), String> {
        if buf.is_empty() {
            return Ok(());
        }
        first_byte.get_or_insert_with(Instant::now);
        conn.write_all(buf)
            .map_err(|e| format!("coredns-{pod}: write: {e}"))
    };
    if opts.pregen {
        for c in &chunks {
            write(&mut conn, c)?;
        }
        drop(chunks);
    } else {
        let mut buf = Vec::with_capacity(opts.chunk + 4096);
        let start_ns = model.cfg.start_ns;
        loop {
            let elapsed = start.elapsed();
            if opts.duration.is_some_and(|d| elapsed >= d) {
                g.stop_new();
            }
            let until = match opts.rate {
                Some(_) => start_ns + elapsed.as_nanos() as u64,
                None => u64::MAX,
            };
            buf.clear();
            let r = g.fill(&mut buf, until, opts.chunk);
            write(&mut conn, &buf)?;
            match r {
                Progress::Done => break,
                Progress::Full => {}
                Progress::Due(t) => {
                    // Write in batches of about a millisecond: at high rates the next message
                    // is due in microseconds, and a write per message would cost more than
                    // the receiver's work.
                    let now = start_ns + start.elapsed().as_nanos() as u64;
                    let wait = t.saturating_sub(now).clamp(PACE_TICK_NS, 20 * PACE_TICK_NS);
                    std::thread::sleep(Duration::from_nanos(wait));
                }
            }
        }
    }
    let last_byte = Instant::now();
    let finish = send::close(&mut conn, opts.finish_patience)?;
    Ok(PodOutcome {
        gen: g,
        first_byte,
        last_byte,
        finished_at: Instant::now(),
        finish,
    })
}

fn by_type(v: &[u64; 4]) -> Value {
    let mut m = Map::new();
    for (i, n) in v.iter().enumerate() {
        m.insert(gen::TYPE_NAMES[i].to_string(), json!(n));
    }
    Value::Object(m)
}

/// The ground-truth summary printed at the end of `run`.
pub fn truth_json(cfg: &Config, opts: &RunOptions, r: &RunResult) -> Value {
    let c = &r.counts;
    let mut status = Map::new();
    let mut bitmap: std::collections::BTreeMap<u8, u64> = Default::default();
    let mut status_bitmap = Map::new();
    for (si, name) in gen::STATUS_NAMES.iter().enumerate() {
        let mut total = 0;
        for b in 0..16u8 {
            let n = c.status_bitmap[si][b as usize];
            if n > 0 {
                total += n;
                *bitmap.entry(b).or_default() += n;
                status_bitmap.insert(format!("{name}/{b}"), json!(n));
            }
        }
        status.insert(name.to_string(), json!(total));
    }
    let bitmap: Map<String, Value> = bitmap
        .into_iter()
        .map(|(b, n)| (b.to_string(), json!(n)))
        .collect();
    let outcome_names = [
        "local",
        "forward",
        "forward_retry",
        "timeout",
        "no_response",
    ];
    let outcomes: Map<String, Value> = outcome_names
        .iter()
        .zip(c.outcomes)
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let rcodes: Map<String, Value> = c
        .rcodes
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| (crate::dnswire::rcode_name(r as u8).to_string(), json!(n)))
        .collect();
    let sent = c.messages_sent();
    let t = &r.timing;
    let elapsed = if t.finish_s > 0.0 {
        t.finish_s
    } else {
        t.send_s
    };
    let rate = |n: u64| {
        if elapsed > 0.0 {
            (n as f64 / elapsed).round()
        } else {
            0.0
        }
    };
    let mode = match (&opts.output, opts.rate) {
        (Output::File(_), _) => "file",
        (_, Some(_)) => "paced",
        (_, None) => "max",
    };
    let mix: Map<String, Value> = gen::Outcome::ALL
        .iter()
        .zip(cfg.mix)
        .map(|(o, w)| (o.name().to_string(), json!(w)))
        .collect();
    let rcode_mix: Map<String, Value> = cfg
        .rcodes
        .iter()
        .map(|(r, w)| (crate::dnswire::rcode_name(*r).to_string(), json!(w)))
        .collect();
    json!({"ground_truth": {
        "generator": concat!("dnstap-loadgen ", env!("CARGO_PKG_VERSION")),
        "seed": cfg.seed,
        "connections": cfg.pods,
        "identities": r.per_pod.iter().map(|(p, _, _)| Model::identity(*p)).collect::<Vec<_>>(),
        "mapped_ipv4_identities": r.per_pod.iter().filter(|(_, m, _)| *m).map(|(p, _, _)| Model::identity(*p)).collect::<Vec<_>>(),
        "version": gen::VERSION,
        "workload": {
            "names": cfg.names, "zipf_s": cfg.zipf_s, "clients": cfg.clients, "mix": mix,
            "retry_share": cfg.retry_share, "rcode_mix": rcode_mix, "aaaa_share": cfg.aaaa_share,
            "event_rate": cfg.event_rate, "upstreams": cfg.upstreams,
        },
        "sessions": c.sessions,
        "sessions_intact": c.intact,
        "sessions_lost_some": c.lost_some,
        "sessions_lost_all": c.lost_all,
        "sessions_lost_answered": {
            "Succeeded": c.lost_answered[gen::SUCCEEDED],
            "Failed": c.lost_answered[gen::FAILED],
        },
        "expected_sessions": c.intact + c.lost_some,
        "status": status,
        "bitmap": bitmap,
        "status_bitmap": status_bitmap,
        "outcomes": outcomes,
        "rcodes": rcodes,
        "messages": {
            "generated": c.messages_generated(),
            "sent": sent,
            "dropped_on_purpose": c.messages_dropped(),
            "by_type": by_type(&c.generated.map_with(&c.dropped, |g, d| g - d)),
            "dropped_by_type": by_type(&c.dropped),
        },
        "loss": {
            "requested": cfg.loss,
            "achieved": if c.messages_generated() > 0 { c.messages_dropped() as f64 / c.messages_generated() as f64 } else { 0.0 },
            "bursts": c.bursts,
            "burst_len": [cfg.loss_burst.0, cfg.loss_burst.1],
        },
        "rate": {
            "mode": mode,
            "target_sessions_per_s": opts.rate,
            "elapsed_s": elapsed,
            "send_s": t.send_s,
            "generate_s": t.generate_s,
            "sessions_per_s": rate(c.sessions),
            "messages_per_s": rate(sent),
            "bytes": c.bytes,
            "mbytes_per_s": if elapsed > 0.0 { (c.bytes as f64 / elapsed / 1e6 * 10.0).round() / 10.0 } else { 0.0 },
            "finish_received": t.finishes,
        },
        "sender_max_sessions_in_flight": c.max_in_flight,
        "per_connection": r.per_pod.iter().map(|(p, m, pc)| json!({
            "identity": Model::identity(*p), "mapped_ipv4": m, "sessions": pc.sessions,
            "messages_sent": pc.messages_sent(), "dropped_on_purpose": pc.messages_dropped(),
        })).collect::<Vec<_>>(),
    }})
}

trait MapWith {
    fn map_with(&self, o: &Self, f: impl Fn(u64, u64) -> u64) -> Self;
}
impl MapWith for [u64; 4] {
    fn map_with(&self, o: &Self, f: impl Fn(u64, u64) -> u64) -> Self {
        [
            f(self[0], o[0]),
            f(self[1], o[1]),
            f(self[2], o[2]),
            f(self[3], o[3]),
        ]
    }
}

pub const NS_PER_S: u64 = NS;

/// Paced senders wake up at most this often (ns).
const PACE_TICK_NS: u64 = 1_000_000;
