//! A session log that fits a cluster (issue #9): `--sample-succeeded`, `--messages`,
//! `--stats-interval` and duration flags with units, on real CoreDNS captures and through the
//! real binary.

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;
use support::*;

/// 5000 sessions: 4439 Succeeded, 561 Failed (tests/coredns_fixtures.rs).
fn burst() -> Vec<std::path::PathBuf> {
    vec![coredns_fixture("h_burst_5k.fstrm")]
}

/// A CoreDNS restart in the middle of a stream: SampleLoss sessions as well.
fn reconnect() -> Vec<std::path::PathBuf> {
    vec![
        coredns_fixture("i_reconnect.part1.fstrm"),
        coredns_fixture("i_reconnect.part2.fstrm"),
    ]
}

/// The line without `key`, as text: lines compare as multisets of these.
fn without(line: &Value, keys: &[&str]) -> String {
    let mut v = line.clone();
    for k in keys {
        v.as_object_mut().unwrap().remove(*k);
    }
    v.to_string()
}

fn multiset<'a>(
    lines: impl IntoIterator<Item = &'a Value>,
    drop: &[&str],
) -> BTreeMap<String, usize> {
    // Lookup ids are numbered as sessions reach the lookup stage, which depends on the
    // shards' timing: unique within a run, not the same in a replay.
    let drop = [drop, &["lookup"]].concat();
    let mut m = BTreeMap::new();
    for l in lines {
        *m.entry(without(l, &drop)).or_insert(0) += 1;
    }
    m
}

fn of_status<'a>(out: &'a Output, status: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    out.sessions.iter().filter(move |s| s_status(s) == status)
}

fn summary_status(out: &Output, status: &str) -> u64 {
    out.summary["status"][status].as_u64().unwrap()
}

#[test]
fn sampling_prints_a_tenth_of_the_succeeded_and_every_failed_session() {
    let full = read(&burst(), &["--shards", "2"]);
    let sampled = read(&burst(), &["--shards", "2", "--sample-succeeded", "0.1"]);
    assert_eq!(full.sessions.len(), 5000, "every session without sampling");

    // The summary counts every session, sampled or not.
    for key in ["sessions", "messages", "status", "status_bitmap", "bitmap"] {
        assert_eq!(sampled.summary[key], full.summary[key], "summary.{key}");
    }
    assert_eq!(
        sampled.summary["sessions_printed"],
        sampled.sessions.len() as u64
    );

    // Every Failed (and SampleLoss) line, exactly as without sampling and without a rate.
    let failed = summary_status(&sampled, "Failed");
    assert!(failed > 500, "the capture has Failed sessions: {failed}");
    assert_eq!(of_status(&sampled, "Failed").count() as u64, failed);
    assert_eq!(
        of_status(&sampled, "SampleLoss").count() as u64,
        summary_status(&sampled, "SampleLoss")
    );
    assert_eq!(
        multiset(of_status(&sampled, "Failed"), &[]),
        multiset(of_status(&full, "Failed"), &[])
    );

    // Succeeded: within five standard deviations of a binomial draw at 0.1, each saying its
    // rate, and each one of the lines the full run printed.
    let n = summary_status(&sampled, "Succeeded") as f64;
    let printed: Vec<&Value> = of_status(&sampled, "Succeeded").collect();
    let (mean, sigma) = (0.1 * n, (n * 0.1 * 0.9).sqrt());
    let k = printed.len() as f64;
    assert!(
        (k - mean).abs() <= 5.0 * sigma,
        "{k} Succeeded printed of {n}: expected {mean:.0} ± {:.0}",
        5.0 * sigma
    );
    for line in &printed {
        assert_eq!(line["sample_rate"], 0.1, "{line}");
    }
    let all_succeeded = multiset(of_status(&full, "Succeeded"), &[]);
    for (line, count) in multiset(printed.iter().copied(), &["sample_rate"]) {
        assert!(
            all_succeeded.get(&line).is_some_and(|&c| c >= count),
            "a sampled line the full run did not print: {line}"
        );
    }
    for line in of_status(&sampled, "Failed") {
        assert!(line.get("sample_rate").is_none(), "{line}");
    }
}

#[test]
fn the_same_input_samples_the_same_sessions_whatever_the_shards() {
    let lines = |shards: &str| {
        let out = read(
            &burst(),
            &["--shards", shards, "--sample-succeeded", "0.05"],
        );
        multiset(&out.sessions, &[])
    };
    let once = lines("1");
    assert!(once.len() > 561, "some Succeeded lines are printed");
    assert_eq!(once, lines("1"), "a replay prints the same sessions");
    assert_eq!(once, lines("3"), "the sample does not depend on the shard");
}

#[test]
fn at_rate_zero_only_failed_and_sampleloss_sessions_are_printed() {
    let out = read(&reconnect(), &["--sample-succeeded", "0"]);
    let loss = summary_status(&out, "SampleLoss");
    assert!(
        loss > 0,
        "the capture has SampleLoss sessions: {}",
        out.summary
    );
    assert!(summary_status(&out, "Succeeded") > 0);
    assert_eq!(of_status(&out, "Succeeded").count(), 0);
    assert_eq!(of_status(&out, "SampleLoss").count() as u64, loss);
    assert_eq!(
        of_status(&out, "Failed").count() as u64,
        summary_status(&out, "Failed")
    );
    // --log decides first: the sample only thins the Succeeded sessions it lets through.
    let loss_only = read(
        &reconnect(),
        &["--sample-succeeded", "0.5", "--log", "sampleloss"],
    );
    assert_eq!(loss_only.sessions.len() as u64, loss);
    assert!(loss_only
        .sessions
        .iter()
        .all(|s| s_status(s) == "SampleLoss"));
}

#[test]
fn messages_none_and_failed_keep_everything_but_the_messages() {
    let full = read(&burst(), &[]);
    let none = read(&burst(), &["--messages", "none"]);
    let failed = read(&burst(), &["--messages", "failed"]);
    // Lookups follow the order sessions reach the lookup stage from the shards: a replay may
    // join a few of dnsperf's repeated names differently.
    let sessions_part = |o: &Output| {
        let mut s = o.summary.clone();
        s.as_object_mut().unwrap().remove("lookups");
        s
    };
    assert_eq!(sessions_part(&none), sessions_part(&full));
    assert_eq!(sessions_part(&failed), sessions_part(&full));

    assert!(none.sessions.iter().all(|s| s.get("messages").is_none()));
    assert_eq!(
        multiset(&none.sessions, &[]),
        multiset(&full.sessions, &["messages"]),
        "diagnosis, rcodes, upstreams and latencies stay"
    );
    // Not trivially so: the lines do carry upstream attempts and latencies.
    let forwarded = none
        .sessions
        .iter()
        .filter(|s| !s_upstreams(s).is_empty() && s["latency_ms"].is_number())
        .count();
    assert!(
        forwarded > 300,
        "{forwarded} forwarded sessions with a latency"
    );

    for s in &failed.sessions {
        let has = s.get("messages").is_some();
        assert_eq!(has, s_status(s) != "Succeeded", "{}", describe(s));
    }
    assert_eq!(
        multiset(of_status(&failed, "Succeeded"), &[]),
        multiset(of_status(&full, "Succeeded"), &["messages"])
    );
    assert_eq!(
        multiset(of_status(&failed, "Failed"), &[]),
        multiset(of_status(&full, "Failed"), &[])
    );
}

#[test]
fn sampling_and_messages_combine() {
    let out = read(
        &burst(),
        &["--sample-succeeded", "0.01", "--messages", "failed"],
    );
    for s in &out.sessions {
        match s_status(s) {
            "Succeeded" => {
                assert_eq!(s["sample_rate"], 0.01);
                assert!(s.get("messages").is_none());
            }
            _ => assert!(!s_messages(s).is_empty(), "{}", describe(s)),
        }
    }
}

#[test]
fn durations_with_units_mean_the_same_as_plain_seconds() {
    let lines = |timeout: &str, grace: &str| {
        let out = read(
            &reconnect(),
            &["--session-timeout", timeout, "--orphan-grace", grace],
        );
        multiset(&out.sessions, &[])
    };
    let plain = lines("10", "2");
    assert!(!plain.is_empty());
    assert_eq!(plain, lines("10000ms", "2s"));
    assert_eq!(plain, lines("10s", "2000ms"));
}

/// Runs the binary with `args` (a usage error exits before reading anything).
fn refused(args: &[&str]) -> String {
    let out = run_to_end(
        Command::new(analyser_bin()).args(args),
        None,
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{args:?} must be a usage error");
    text(&out.stderr)
}

#[test]
fn bad_values_are_refused_with_a_reason() {
    for (args, reason) in [
        (&["--sample-succeeded", "1.5"][..], "between 0 and 1"),
        (&["--sample-succeeded", "1%"], "between 0 and 1"),
        (&["--messages", "some"], "use all, failed or none"),
        (&["--stats-interval", "0s"], "above zero"),
        (&["--session-timeout", "3d"], "unknown unit"),
        (&["--idle-timeout", "48h"], "maximum of 24h"),
        (&["--handshake-timeout", "soon"], "not a duration"),
    ] {
        let err = refused(args);
        assert!(err.contains(reason), "{args:?}: {err}");
        assert!(err.contains(args[0]), "{args:?} names the flag: {err}");
    }
}

#[test]
fn stats_interval_prints_the_summary_while_serving() {
    let served = Analyser::serve_tcp(&["--stats-interval", "1s", "--shards", "2"]);
    let file = coredns_fixture("h_burst_5k.fstrm");
    run_sender(&mut fstrm_replay_tcp(served.port(), &file));
    assert!(
        served.wait_for_lines(5000, Duration::from_secs(60)),
        "5000 sessions printed"
    );
    // A periodic line that has seen every session: the trend is in the log before the exit.
    let interval_lines = |stderr: &str| -> Vec<Value> {
        stderr
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["interval"] == true)
            .collect()
    };
    let seen_all = poll_until(Duration::from_secs(30), || {
        interval_lines(&served.stderr_so_far())
            .iter()
            .any(|v| v["summary"]["sessions"] == 5000)
    });
    assert!(
        seen_all,
        "no periodic summary with 5000 sessions:\n{}",
        served.stderr_so_far()
    );
    let out = served.stop();

    let periodic = interval_lines(&out.stderr);
    assert!(!periodic.is_empty());
    let mut last = 0;
    for v in &periodic {
        let s = &v["summary"];
        let sessions = s["sessions"].as_u64().unwrap();
        assert!(sessions >= last, "counters never go back: {v}");
        last = sessions;
        assert!(v["uptime_s"].is_u64(), "{v}");
        let keys = |o: &Value| o.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(s), keys(&out.summary), "the exit summary's shape");
    }
    // The exit summary comes last and is not marked.
    let final_line: Value = serde_json::from_str(out.stderr.lines().last().unwrap()).unwrap();
    assert!(final_line.get("interval").is_none(), "{final_line}");
    assert_eq!(out.summary["sessions"], 5000);
}
