//! Structural checks of the log agent configs in `deploy/logging/` (Promtail, Grafana Alloy,
//! Fluent Bit, OpenTelemetry Collector). None of these agents installs from Debian here, so they
//! are not run: each config is parsed, and the test checks that it unwraps the kubelet's CRI
//! wrapper, drops stderr, parses the JSON, takes its timestamp from the `time` key with a
//! format that matches every `time` the analyser really printed, and labels with
//! low-cardinality fields only. Each check is also run on a broken copy of its config and must
//! fail there.

mod support;

use serde_yaml::Value as Yaml;
use std::collections::BTreeSet;
use std::fs;
use std::process::Command;
use std::time::Duration;
use support::{analyser_bin, coredns_fixture, repo_root, run_to_end, text};

/// Fields with few distinct values; anything else (qname, client, ...) must stay in the line.
const LOW_CARDINALITY: &[&str] = &["kind", "status", "cause", "identity"];

type Check = fn(&str, &[String]) -> Result<(), String>;

fn config(name: &str) -> String {
    let path = repo_root().join("deploy/logging").join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `time` of every stdout line of a real run (sessions and lookups), after checking that
/// each line starts with it and that stderr (which the configs drop) holds no such line.
fn real_times() -> Vec<String> {
    let out = run_to_end(
        Command::new(analyser_bin())
            .arg("read")
            .arg(coredns_fixture("h_burst_5k.fstrm"))
            .args(["--log", "all"]),
        None,
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut kinds = BTreeSet::new();
    let times: Vec<String> = text(&out.stdout)
        .lines()
        .map(|line| {
            assert!(
                line.starts_with("{\"time\":\""),
                "line without time first: {line}"
            );
            let json: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            kinds.insert(json["kind"].as_str().expect("kind").to_string());
            json["time"].as_str().expect("time").to_string()
        })
        .collect();
    assert_eq!(kinds, BTreeSet::from(["lookup".into(), "session".into()]));
    assert!(
        !text(&out.stderr).contains("{\"time\""),
        "a line went to stderr"
    );
    times
}

#[test]
fn configs_parse_read_json_and_take_the_lines_own_time() {
    let times = real_times();
    for (name, check) in CONFIGS {
        check(&config(name), &times).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

const CONFIGS: &[(&str, Check)] = &[
    ("promtail.yaml", check_promtail),
    ("alloy.river", check_alloy),
    ("fluent-bit.yaml", check_fluent_bit),
    ("otelcol.yaml", check_otelcol),
];

/// Each mutation breaks one rule; the check must notice it.
#[test]
fn broken_configs_fail_the_checks() {
    let times = real_times();
    let broken: &[(&str, &str, &str)] = &[
        ("promtail.yaml", "source: time", "source: query_time"),
        ("promtail.yaml", "RFC3339Nano", "RFC1123"),
        ("promtail.yaml", "identity: identity", "identity: qname"),
        ("promtail.yaml", "- cri: {}", "- output: {source: x}"),
        ("promtail.yaml", "value: stderr", "value: stdout"),
        (
            "alloy.river",
            "source = \"time\"",
            "source = \"query_time\"",
        ),
        ("alloy.river", "RFC3339Nano", "2006-01-02 15:04:05"),
        ("alloy.river", "cause    = \"\"", "qname    = \"\""),
        (
            "alloy.river",
            "cause    = \"cause\"",
            "cause    = \"qname\"",
        ),
        ("alloy.river", "stage.cri {}", "stage.static_labels {}"),
        ("alloy.river", "stage.cri {}", "stage.cri {"),
        ("promtail.yaml", "server:\n", "server: [\n"),
        ("alloy.river", "value  = \"stderr\"", "value  = \"stdout\""),
        (
            "alloy.river",
            "forward_to = [loki.write.default.receiver]\n",
            "",
        ),
        ("fluent-bit.yaml", "time_key: time", "time_key: query_time"),
        ("fluent-bit.yaml", "%S.%LZ", "%S"),
        ("fluent-bit.yaml", "format: json", "format: regex"),
        ("fluent-bit.yaml", "docker, cri", "docker"),
        (
            "fluent-bit.yaml",
            "exclude: stream stderr",
            "exclude: stream stdout",
        ),
        ("otelcol.yaml", "attributes.time", "attributes.query_time"),
        ("otelcol.yaml", "04:05.999999999Z07:00", "04:05.000Z07:00"),
        ("otelcol.yaml", "attributes.kind", "attributes.qname"),
        ("otelcol.yaml", "type: container", "type: regex_parser"),
        ("otelcol.yaml", "== \"stderr\"", "== \"stdout\""),
    ];
    for (name, from, to) in broken {
        let good = config(name);
        assert!(good.contains(from), "{name} no longer contains {from:?}");
        let check = CONFIGS.iter().find(|(n, _)| n == name).unwrap().1;
        match check(&good.replacen(from, to, 1), &times) {
            Ok(()) => panic!("{name} with {from:?} -> {to:?} passed the check"),
            Err(e) => eprintln!("{name} with {from:?} -> {to:?}: {e}"),
        }
    }
}

// ---- Promtail ----

fn check_promtail(text: &str, times: &[String]) -> Result<(), String> {
    let doc: Yaml = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let stages = doc["scrape_configs"][0]["pipeline_stages"]
        .as_sequence()
        .ok_or("no pipeline_stages")?;
    let stage = |name: &str| stages.iter().position(|s| s.get(name).is_some());
    let at = |name: &str| stage(name).ok_or(format!("no {name} stage"));
    let (cri, drop, json, labels, timestamp) = (
        at("cri")?,
        at("drop")?,
        at("json")?,
        at("labels")?,
        at("timestamp")?,
    );
    if !(cri < drop && drop < json && json < labels && json < timestamp) {
        return Err("stages out of order (cri, drop, json, labels/timestamp)".into());
    }
    let drop = &stages[drop]["drop"];
    expect_str(&drop["source"], "stream", "drop source")?;
    expect_str(&drop["value"], "stderr", "drop value")?;
    let expressions = &stages[json]["json"]["expressions"];
    let extracted = |name: &str| -> Result<String, String> {
        let e = expressions
            .get(name)
            .ok_or(format!("json does not extract {name}"))?;
        Ok(e.as_str().unwrap_or(name).to_string())
    };
    let ts = &stages[timestamp]["timestamp"];
    let source = ts["source"].as_str().ok_or("timestamp without source")?;
    expect_eq(&extracted(source)?, "time", "JSON key of the timestamp")?;
    let format = ts["format"].as_str().ok_or("timestamp without format")?;
    go_layout_matches_all(&go_named_layout(format), times)?;
    let mapping = stages[labels]["labels"]
        .as_mapping()
        .ok_or("labels not a map")?;
    for (label, from) in mapping {
        let from = from.as_str().or(label.as_str()).unwrap_or_default();
        low_cardinality(&extracted(from)?)?;
    }
    Ok(())
}

// ---- Grafana Alloy (River) ----

/// A River block: `name "label" { attributes and blocks }`; an object attribute (`x = { .. }`)
/// is kept as a nested block named after the attribute.
#[derive(Debug, Default)]
struct Block {
    name: String,
    attrs: Vec<(String, String)>,
    blocks: Vec<Block>,
}

impl Block {
    fn attr(&self, key: &str) -> Option<&str> {
        let value = self.attrs.iter().find(|(k, _)| k == key)?;
        Some(value.1.trim_end_matches(',').trim_matches('"'))
    }
    fn block(&self, name: &str) -> Result<&Block, String> {
        let found = self.blocks.iter().find(|b| b.name == name);
        found.ok_or(format!("no {name} block"))
    }
}

/// A small line-based River reader: enough to reject unbalanced braces or a line that is neither
/// a block header, an attribute, a comment nor a closing brace.
fn parse_river(text: &str) -> Result<Block, String> {
    let mut stack = vec![Block::default()];
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split(" //").next().unwrap().trim();
        if line.is_empty() || line.starts_with("//") {
            continue;
        }
        let err = || format!("line {}: cannot read {raw:?}", n + 1);
        if line == "}" || line == "}," {
            let done = stack.pop().ok_or_else(err)?;
            stack.last_mut().ok_or_else(err)?.blocks.push(done);
        } else if let Some(head) = line.strip_suffix('{').or(line.strip_suffix("{}")) {
            let head = head.trim();
            let name = match head.split_once(char::is_whitespace) {
                Some((name, label)) if label.trim().starts_with('"') => name,
                None => head,
                Some((name, "=")) => name,
                _ => return Err(err()),
            };
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            {
                return Err(err());
            }
            stack.push(Block {
                name: name.into(),
                ..Block::default()
            });
            if line.ends_with("{}") {
                let done = stack.pop().unwrap();
                stack.last_mut().unwrap().blocks.push(done);
            }
        } else if let Some((key, value)) = line.split_once('=') {
            let key = key.trim();
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(err());
            }
            let attrs = &mut stack.last_mut().unwrap().attrs;
            attrs.push((key.into(), value.trim().into()));
        } else {
            return Err(err());
        }
    }
    match stack.len() {
        1 => Ok(stack.pop().unwrap()),
        _ => Err("unbalanced braces".into()),
    }
}

fn check_alloy(text: &str, times: &[String]) -> Result<(), String> {
    let root = parse_river(text)?;
    let process = root.block("loki.process")?;
    if !process
        .attr("forward_to")
        .is_some_and(|f| f.contains("loki.write"))
    {
        return Err("loki.process does not forward to loki.write".into());
    }
    root.block("loki.write")?;
    let order: Vec<&str> = process.blocks.iter().map(|b| b.name.as_str()).collect();
    let pos = |name: &str| {
        order
            .iter()
            .position(|n| *n == name)
            .ok_or(format!("no {name}"))
    };
    let (cri, drop, json) = (pos("stage.cri")?, pos("stage.drop")?, pos("stage.json")?);
    let (labels, timestamp) = (pos("stage.labels")?, pos("stage.timestamp")?);
    if !(cri < drop && drop < json && json < labels && json < timestamp) {
        return Err("stages out of order (cri, drop, json, labels/timestamp)".into());
    }
    let drop = process.block("stage.drop")?;
    expect_eq(
        drop.attr("source").unwrap_or_default(),
        "stream",
        "drop source",
    )?;
    expect_eq(
        drop.attr("value").unwrap_or_default(),
        "stderr",
        "drop value",
    )?;
    let expressions = process.block("stage.json")?.block("expressions")?;
    let extracted = |name: &str| -> Result<String, String> {
        let path = expressions
            .attr(name)
            .ok_or(format!("json does not extract {name}"))?;
        Ok(if path.is_empty() { name } else { path }.to_string())
    };
    let ts = process.block("stage.timestamp")?;
    let source = ts.attr("source").ok_or("timestamp without source")?;
    expect_eq(&extracted(source)?, "time", "JSON key of the timestamp")?;
    let format = ts.attr("format").ok_or("timestamp without format")?;
    go_layout_matches_all(&go_named_layout(format), times)?;
    for (label, from) in &process.block("stage.labels")?.block("values")?.attrs {
        let from = from.trim_end_matches(',').trim_matches('"');
        low_cardinality(&extracted(if from.is_empty() { label } else { from })?)?;
    }
    Ok(())
}

// ---- Fluent Bit (YAML) ----

fn check_fluent_bit(text: &str, times: &[String]) -> Result<(), String> {
    let doc: Yaml = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let section = |name: &str| {
        doc["pipeline"][name]
            .as_sequence()
            .cloned()
            .unwrap_or_default()
    };
    let named = |list: &[Yaml], name: &str| -> Vec<Yaml> {
        list.iter()
            .filter(|p| p["name"].as_str() == Some(name))
            .cloned()
            .collect()
    };
    let tail = named(&section("inputs"), "tail");
    let tail = tail.first().ok_or("no tail input")?;
    let multiline = tail["multiline.parser"].as_str().unwrap_or_default();
    if !multiline.split(',').any(|p| p.trim() == "cri") {
        return Err("the tail input does not unwrap CRI lines (multiline.parser cri)".into());
    }
    let filters = section("filters");
    let grep = named(&filters, "grep");
    if !grep
        .iter()
        .any(|g| g["exclude"].as_str() == Some("stream stderr"))
    {
        return Err("no grep filter excluding stream stderr".into());
    }
    let parser_filter = named(&filters, "parser");
    let parser_filter = parser_filter.first().ok_or("no parser filter")?;
    expect_str(
        &parser_filter["key_name"],
        "log",
        "parser filter key_name (cri output)",
    )?;
    let wanted = parser_filter["parser"]
        .as_str()
        .ok_or("parser filter without parser")?;
    let parsers = doc["parsers"].as_sequence().cloned().unwrap_or_default();
    let parser = named(&parsers, wanted);
    let parser = parser.first().ok_or(format!("no parser {wanted}"))?;
    expect_str(&parser["format"], "json", "parser format")?;
    expect_str(&parser["time_key"], "time", "parser time_key")?;
    let format = parser["time_format"].as_str().ok_or("no time_format")?;
    for time in times {
        strptime_matches(format, time)?;
    }
    let outputs = section("outputs");
    if !outputs
        .iter()
        .any(|o| matches!(o["name"].as_str(), Some("es" | "opensearch")))
    {
        return Err("no es or opensearch output".into());
    }
    Ok(())
}

// ---- OpenTelemetry Collector filelog ----

fn check_otelcol(text: &str, times: &[String]) -> Result<(), String> {
    let doc: Yaml = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let receivers = doc["receivers"].as_mapping().ok_or("no receivers")?;
    let (name, filelog) = receivers
        .iter()
        .find(|(k, _)| {
            k.as_str()
                .is_some_and(|k| k.split('/').next() == Some("filelog"))
        })
        .ok_or("no filelog receiver")?;
    let name = name.as_str().unwrap();
    let pipelines = doc["service"]["pipelines"]
        .as_mapping()
        .ok_or("no pipelines")?;
    let used = pipelines.values().any(|p| {
        p["receivers"]
            .as_sequence()
            .is_some_and(|r| r.iter().any(|r| r.as_str() == Some(name)))
    });
    if !used {
        return Err(format!("{name} is in no pipeline"));
    }
    let ops = filelog["operators"].as_sequence().ok_or("no operators")?;
    let at = |kind: &str| {
        ops.iter()
            .position(|o| o["type"].as_str() == Some(kind))
            .ok_or(format!("no {kind}"))
    };
    let (container, filter, json) = (at("container")?, at("filter")?, at("json_parser")?);
    if !(container < filter && filter < json) {
        return Err("operators out of order (container, filter, json_parser)".into());
    }
    let expr = ops[filter]["expr"].as_str().unwrap_or_default();
    if !(expr.contains("log.iostream") && expr.contains("\"stderr\"")) {
        return Err(format!("the filter does not drop stderr: {expr}"));
    }
    let parser = &ops[json];
    let to = parser["parse_to"].as_str().unwrap_or("attributes");
    let ts = &parser["timestamp"];
    expect_str(
        &ts["parse_from"],
        &format!("{to}.time"),
        "timestamp parse_from",
    )?;
    expect_str(&ts["layout_type"], "gotime", "timestamp layout_type")?;
    let layout = ts["layout"].as_str().ok_or("no layout")?;
    go_layout_matches_all(layout, times)?;
    for op in &ops[json..] {
        let into_resource = op["to"].as_str().is_some_and(|t| t.starts_with("resource"));
        if matches!(op["type"].as_str(), Some("copy" | "move")) && into_resource {
            let from = op["from"].as_str().unwrap_or_default();
            low_cardinality(from.strip_prefix(&format!("{to}.")).unwrap_or(from))?;
        }
    }
    Ok(())
}

// ---- Time formats ----

/// The Go layout Promtail and Alloy use for a format name (else the format is a layout).
fn go_named_layout(format: &str) -> String {
    match format {
        "RFC3339" => "2006-01-02T15:04:05Z07:00",
        "RFC3339Nano" => "2006-01-02T15:04:05.999999999Z07:00",
        "RFC1123" => "Mon, 02 Jan 2006 15:04:05 MST",
        "UnixNs" | "Unix" | "UnixMs" | "UnixUs" => "<epoch>",
        other => other,
    }
    .to_string()
}

fn go_layout_matches_all(layout: &str, times: &[String]) -> Result<(), String> {
    times.iter().try_for_each(|t| go_layout_matches(layout, t))
}

/// Whether Go's time.Parse(layout, value) would accept `value`, for the layout elements an
/// RFC 3339 time can match (anything else is refused). As in Go, a fractional second may follow
/// the seconds even when the layout has none.
fn go_layout_matches(layout: &str, value: &str) -> Result<(), String> {
    let fail = || format!("layout {layout:?} does not match {value:?}");
    let (mut l, mut v) = (layout, value);
    while !l.is_empty() {
        let digits = [
            ("2006", 4),
            ("01", 2),
            ("02", 2),
            ("15", 2),
            ("04", 2),
            ("05", 2),
        ];
        if let Some((token, n)) = digits.iter().find(|(t, _)| l.starts_with(t)) {
            v = take_digits(v, *n, *n).ok_or_else(fail)?;
            l = &l[token.len()..];
            if *token == "05" && !l.starts_with(".9") && !l.starts_with(".0") {
                v = optional_fraction(v, 9);
            }
        } else if let Some(rest) = l.strip_prefix(".9") {
            let nines = 1 + rest.chars().take_while(|c| *c == '9').count();
            l = &l[1 + nines..];
            v = optional_fraction(v, nines);
        } else if let Some(rest) = l.strip_prefix(".0") {
            let zeros = 1 + rest.chars().take_while(|c| *c == '0').count();
            l = &l[1 + zeros..];
            let fraction = v
                .strip_prefix('.')
                .and_then(|v| take_digits(v, zeros, zeros));
            v = fraction.ok_or_else(fail)?;
        } else if let Some(rest) = l.strip_prefix("Z07:00") {
            l = rest;
            v = match v.strip_prefix('Z') {
                Some(v) => v,
                None => offset(v).ok_or_else(fail)?,
            };
        } else {
            let c = l.chars().next().unwrap();
            // A digit here is a layout element this check does not know: refuse it.
            if c.is_ascii_digit() || !v.starts_with(c) {
                return Err(fail());
            }
            l = &l[c.len_utf8()..];
            v = &v[c.len_utf8()..];
        }
    }
    match v.is_empty() {
        true => Ok(()),
        false => Err(fail()),
    }
}

/// Whether Fluent Bit's strptime would read all of `value` with `format`, for the conversions an
/// RFC 3339 time can match (%L is Fluent Bit's fractional second, up to nanoseconds).
fn strptime_matches(format: &str, value: &str) -> Result<(), String> {
    let fail = || format!("time_format {format:?} does not match {value:?}");
    let (mut f, mut v) = (format.chars(), value);
    while let Some(c) = f.next() {
        let next = match c {
            '%' => match f.next() {
                Some('Y') => take_digits(v, 4, 4),
                Some('m' | 'd' | 'H' | 'M' | 'S') => take_digits(v, 2, 2),
                Some('L') => take_digits(v, 1, 9),
                Some('z') => v.strip_prefix('Z').or_else(|| offset(v)),
                Some('%') => v.strip_prefix('%'),
                _ => None,
            },
            c => v.strip_prefix(c),
        };
        v = next.ok_or_else(fail)?;
    }
    match v.is_empty() {
        true => Ok(()),
        false => Err(fail()),
    }
}

fn take_digits(v: &str, min: usize, max: usize) -> Option<&str> {
    let n = v.bytes().take(max).take_while(u8::is_ascii_digit).count();
    (n >= min).then(|| &v[n..])
}

fn optional_fraction(v: &str, max: usize) -> &str {
    v.strip_prefix('.')
        .and_then(|f| take_digits(f, 1, max))
        .unwrap_or(v)
}

/// `+hh:mm`, `-hh:mm`, `+hhmm` or `-hhmm`.
fn offset(v: &str) -> Option<&str> {
    let v = v.strip_prefix('+').or_else(|| v.strip_prefix('-'))?;
    let v = take_digits(v, 2, 2)?;
    take_digits(v.strip_prefix(':').unwrap_or(v), 2, 2)
}

// ---- Small helpers ----

fn low_cardinality(field: &str) -> Result<(), String> {
    match LOW_CARDINALITY.contains(&field) {
        true => Ok(()),
        false => Err(format!("{field} is not a low-cardinality field")),
    }
}

fn expect_eq(got: &str, want: &str, what: &str) -> Result<(), String> {
    match got == want {
        true => Ok(()),
        false => Err(format!("{what} is {got:?}, not {want:?}")),
    }
}

fn expect_str(got: &Yaml, want: &str, what: &str) -> Result<(), String> {
    expect_eq(got.as_str().unwrap_or_default(), want, what)
}

#[test]
fn time_format_checks_refuse_what_does_not_fit() {
    let t = "2026-11-25T17:16:02.489316388Z";
    assert!(go_layout_matches("2006-01-02T15:04:05.999999999Z07:00", t).is_ok());
    assert!(
        go_layout_matches("2006-01-02T15:04:05Z07:00", t).is_ok(),
        "Go allows a fraction"
    );
    assert!(go_layout_matches("2006-01-02T15:04:05.000Z07:00", t).is_err());
    assert!(go_layout_matches("2006-01-02 15:04:05.999999999Z07:00", t).is_err());
    assert!(go_layout_matches("2006-01-02T15:04:05.999999999", t).is_err());
    assert!(go_layout_matches("<epoch>", t).is_err());
    assert!(strptime_matches("%Y-%m-%dT%H:%M:%S.%LZ", t).is_ok());
    assert!(strptime_matches("%Y-%m-%dT%H:%M:%S.%L%z", t).is_ok());
    assert!(strptime_matches("%Y-%m-%dT%H:%M:%SZ", t).is_err());
    assert!(strptime_matches("%Y-%m-%d %H:%M:%S.%LZ", t).is_err());
}
