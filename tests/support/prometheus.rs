//! A real Prometheus server (Debian package `prometheus`) on a loopback port, scraping given
//! targets every second into a temp storage dir, with a client for its query API; `promtool`;
//! and a parser for the text exposition a scrape returns.

use super::http::{http_get, url_encode};
use super::process::{run_to_end, start_on_free_port, text, Server};
use super::{alloc_port, poll_until, require_binary, tail, TempDir};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The job name of the analyser's scrape config: the `job` label of every scraped series.
pub const SCRAPE_JOB: &str = "dnstap-analyser";

/// A running Prometheus; dropping it stops it (its storage lives in the caller's temp dir).
pub struct Prometheus {
    server: Server,
    pub port: u16,
    /// `127.0.0.1:PORT` of each scraped target
    pub targets: Vec<String>,
}

/// One series of an instant vector.
#[derive(Debug, Clone)]
pub struct PromSample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port, scraping `/metrics` of every target
    /// (`127.0.0.1:PORT`) every second; returns once it is ready to answer queries.
    pub fn start(dir: &TempDir, targets: &[String]) -> Prometheus {
        Prometheus::start_with_jobs(dir, targets, &[(SCRAPE_JOB, "")])
    }

    /// Like [`Prometheus::start`] with several scrape jobs of the same targets: each a job
    /// name and YAML lines added to its scrape config (indented four spaces: `scheme: https`,
    /// `basic_auth:`, `tls_config:`). [`SCRAPE_JOB`]'s targets are the ones waited for.
    pub fn start_with_jobs(dir: &TempDir, targets: &[String], jobs: &[(&str, &str)]) -> Prometheus {
        let bin = require_binary("prometheus", "prometheus");
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = dir.join("prometheus.yml");
        let mut text = "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  \
                        evaluation_interval: 1s\nscrape_configs:\n"
            .to_string();
        // scrape_timeout must not exceed the interval; 1 s is plenty on loopback.
        for (job, extra) in jobs {
            text.push_str(&format!(
                "  - job_name: {job}\n    metrics_path: /metrics\n{extra}    \
                 static_configs:\n      - targets: [{list}]\n"
            ));
        }
        fs::write(&config, text).unwrap();
        let storage = dir.join("prometheus-data");
        let spawn = |port: u16| {
            let mut cmd = Command::new(&bin);
            cmd.arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", storage.display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--storage.tsdb.retention.time=1h")
                .arg("--log.level=warn")
                .current_dir(dir.path());
            Server::spawn("prometheus", cmd, dir.join("prometheus.log"))
        };
        let ready = |port: u16| {
            let addr = format!("127.0.0.1:{port}");
            http_get(&addr, "/-/ready", &[]).is_ok_and(|r| r.status == 200)
        };
        let (server, port) =
            start_on_free_port("prometheus", spawn, ready, Duration::from_secs(60));
        Prometheus {
            server,
            port,
            targets: targets.to_vec(),
        }
    }

    /// `127.0.0.1:PORT` of its web listener.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `GET /api/v1/<endpoint>`: the `data` of a successful answer; panics otherwise.
    fn api(&mut self, endpoint: &str) -> Value {
        self.server.assert_running();
        let reply = http_get(&self.addr(), &format!("/api/v1/{endpoint}"), &[])
            .unwrap_or_else(|e| panic!("prometheus API {endpoint}: {e}"));
        let v: Value = serde_json::from_str(&reply.body).unwrap_or_else(|e| {
            panic!("prometheus API {endpoint}: not JSON ({e}): {}", reply.body)
        });
        assert!(
            reply.status == 200 && v["status"] == "success",
            "prometheus API {endpoint}: HTTP {}: {v}",
            reply.status
        );
        v["data"].clone()
    }

    /// Evaluates `promql` now; it must give an instant vector.
    pub fn query(&mut self, promql: &str) -> Vec<PromSample> {
        let data = self.api(&format!("query?query={}", url_encode(promql)));
        assert_eq!(data["resultType"], "vector", "{promql}: {data}");
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| PromSample {
                labels: s["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect(),
                value: s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{promql}: bad sample {s}")),
            })
            .collect()
    }

    /// Evaluates `promql` (e.g. `sum by (status) (...)`) into a map from the values of
    /// `labels`, joined with `/`, to the sample value rounded to an integer count.
    pub fn counts(&mut self, promql: &str, labels: &[&str]) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for s in self.query(promql) {
            let key = labels
                .iter()
                .map(|l| s.labels.get(*l).map_or("", String::as_str))
                .collect::<Vec<_>>()
                .join("/");
            assert!(
                s.value >= 0.0 && s.value.fract() == 0.0,
                "{promql}: {key} = {} is not a count",
                s.value
            );
            let previous = out.insert(key.clone(), s.value as u64);
            assert!(previous.is_none(), "{promql}: {key} twice");
        }
        out
    }

    /// The single value of a scalar-like query (`sum(...)`); None when the vector is empty.
    pub fn value(&mut self, promql: &str) -> Option<f64> {
        let v = self.query(promql);
        assert!(v.len() <= 1, "{promql}: {} series", v.len());
        v.first().map(|s| s.value)
    }

    /// Unix time of the oldest of the targets' latest scrapes, once each has been scraped.
    pub fn last_scrape(&mut self) -> Option<f64> {
        let v = self.query(&format!("timestamp(up{{job=\"{SCRAPE_JOB}\"}})"));
        if v.len() < self.targets.len() {
            return None;
        }
        v.iter().map(|s| s.value).reduce(f64::min)
    }

    /// Waits until every target was scraped successfully (`up == 1`); panics with the
    /// targets' last errors otherwise.
    pub fn wait_for_targets_up(&mut self, timeout: Duration) {
        let want = self.targets.len();
        let up = poll_until(timeout, || {
            self.query(&format!("up{{job=\"{SCRAPE_JOB}\"}} == 1"))
                .len()
                == want
        });
        assert!(
            up,
            "targets not up after {timeout:?}: {}",
            self.targets_report()
        );
    }

    /// Waits until every target has been scraped completely after this call: whatever the
    /// targets expose now is then in Prometheus.
    pub fn wait_for_fresh_scrape(&mut self, timeout: Duration) {
        // A scrape's timestamp is when it started; one that started after `now` saw
        // everything published before it.
        let now = unix_now();
        let fresh = poll_until(timeout, || self.last_scrape().is_some_and(|t| t > now));
        assert!(
            fresh,
            "no scrape of every target within {timeout:?}: {}",
            self.targets_report()
        );
    }

    /// Health and last error of each target (`/api/v1/targets`), for failure messages.
    pub fn targets_report(&mut self) -> String {
        let data = self.api("targets");
        data["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                format!(
                    "{} health={} lastScrape={} lastError={:?}",
                    t["scrapeUrl"], t["health"], t["lastScrape"], t["lastError"]
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The server's log so far.
    pub fn log_text(&self) -> String {
        self.server.log_text()
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// `promtool check metrics` on `exposition` (stdin): Ok with its report, Err with its
/// complaints.
pub fn promtool_check_metrics(exposition: &str) -> Result<String, String> {
    let out = run_to_end(
        Command::new(require_binary("promtool", "prometheus")).args(["check", "metrics"]),
        Some(exposition),
        Duration::from_secs(120),
    );
    let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
    if out.status.success() {
        Ok(report)
    } else {
        Err(report)
    }
}

/// `promtool` run to the end with `args` in the repository root; its exit status is the
/// caller's to judge.
pub fn promtool(args: &[&str]) -> std::process::Output {
    run_to_end(
        Command::new(require_binary("promtool", "prometheus"))
            .args(args)
            .current_dir(super::repo_root()),
        None,
        Duration::from_secs(120),
    )
}

// ---------------------------------------------------------------------------------------------
// The text exposition (Prometheus text 0.0.4) of a scrape

/// One sample line of a scrape.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpoSample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape: the `# TYPE` of each family and every sample.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub types: BTreeMap<String, String>,
    pub samples: Vec<ExpoSample>,
}

impl Exposition {
    /// Parses Prometheus text format; panics on a line it cannot read (a scrape that
    /// Prometheus could not ingest either).
    pub fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
                e.types.insert(name.to_string(), kind.trim().to_string());
            } else if !line.starts_with('#') {
                e.samples.push(
                    parse_sample(line).unwrap_or_else(|| panic!("bad sample line: {line:?}")),
                );
            }
        }
        e
    }

    /// The samples named exactly `name`.
    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a ExpoSample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// A sample named `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// Sum of the samples named `name` whose labels include every `(label, value)` of `with`.
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.named(name)
            .filter(|s| {
                with.iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|s| s.value)
            .sum()
    }
}

/// `name{a="x",b="y"} value [timestamp]`
fn parse_sample(line: &str) -> Option<ExpoSample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(mut body) = rest.strip_prefix('{') {
        loop {
            body = body.trim_start_matches([',', ' ']);
            if let Some(after) = body.strip_prefix('}') {
                rest = after;
                break;
            }
            let (label, after) = body.split_once("=\"")?;
            let (value, after) = label_value(after)?;
            labels.insert(label.trim().to_string(), value);
            body = after;
        }
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(ExpoSample {
        name,
        labels,
        value,
    })
}

/// A quoted label value up to its closing quote (escapes resolved), and what follows it.
fn label_value(s: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => value.push('\n'),
                c => value.push(c),
            },
            c => value.push(c),
        }
    }
    None
}

/// `GET /metrics` from the analyser's metrics port `addr` (`127.0.0.1:PORT`) in Prometheus
/// text format; panics unless it answers 200.
pub fn scrape_text(addr: &str) -> String {
    super::http::http_get_ok(addr, "/metrics").body
}
