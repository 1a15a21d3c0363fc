//! `verify`: compares the ground truth of a run with what the analyser reported: its stderr
//! summary line and, the strongest check, its JSON session lines matched one by one to the
//! generated sessions by (identity, qname, DNS id, client).

use hashbrown::HashMap;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;

#[derive(Debug, Default)]
pub struct Report {
    pub errors: Vec<String>,
    pub notes: Vec<String>,
    pub facts: serde_json::Map<String, Value>,
}

impl Report {
    fn err(&mut self, e: String) {
        self.errors.push(e);
    }
    fn fact(&mut self, k: &str, v: impl Into<Value>) {
        self.facts.insert(k.to_string(), v.into());
    }
    pub fn to_json(&self) -> Value {
        json!({"verify": {
            "ok": self.errors.is_empty(),
            "errors": self.errors.len(),
            "first_errors": self.errors.iter().take(20).collect::<Vec<_>>(),
            "notes": self.notes,
            "facts": self.facts,
        }})
    }
}

/// Which statuses the analyser printed: its own `--log` filter, parsed the same way.
pub use dnstap_analyser::output::LogFilter as Logged;

/// Whether the analyser printed sessions of this status name.
fn logs(logged: &Logged, status: &str) -> bool {
    use dnstap_analyser::correlate::Status;
    Status::ALL
        .iter()
        .any(|st| st.name() == status && logged.allows(*st))
}

fn read_json(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The last `{"summary":...}` line of a file (the analyser's stderr).
pub fn read_summary(path: &Path) -> Result<Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.lines()
        .rev()
        .filter(|l| l.trim_start().starts_with('{'))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find_map(|v| v.get("summary").cloned())
        .ok_or_else(|| format!("{}: no {{\"summary\":...}} line", path.display()))
}

fn num(v: &Value, path: &[&str]) -> u64 {
    let mut cur = v;
    for p in path {
        match cur.get(p) {
            Some(x) => cur = x,
            None => return 0,
        }
    }
    cur.as_u64().unwrap_or(0)
}

fn count_map(v: Option<&Value>) -> std::collections::BTreeMap<String, u64> {
    v.and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_u64().filter(|n| *n > 0).map(|n| (k.clone(), n)))
                .collect()
        })
        .unwrap_or_default()
}

pub struct Inputs<'a> {
    pub truth: &'a Path,
    pub truth_sessions: Option<&'a Path>,
    pub summary: Option<&'a Path>,
    pub sessions: Option<&'a Path>,
    pub logged: Logged,
}

pub fn verify(inp: &Inputs) -> Result<Report, String> {
    let gt_doc = read_json(inp.truth)?;
    let gt = gt_doc.get("ground_truth").cloned().unwrap_or(gt_doc);
    let mut rep = Report::default();
    let sender_loss = num(&gt, &["messages", "dropped_on_purpose"]);
    rep.fact("sender_dropped_messages", sender_loss);
    let mut analyser_drops = 0u64;
    if let Some(p) = inp.summary {
        let s = read_summary(p)?;
        // Only a full shard queue is the analyser shedding load; any other discard of
        // generated traffic is a bug (the generator only writes valid messages).
        let dropped = count_map(s.get("dropped"));
        analyser_drops = dropped.get("queue_full").copied().unwrap_or(0);
        for (why, n) in dropped.iter().filter(|(k, _)| k.as_str() != "queue_full") {
            rep.err(format!(
                "analyser discarded {n} of the generated messages as {why}"
            ));
        }
        check_summary(&gt, &s, sender_loss, analyser_drops, &mut rep);
    }
    if let Some(p) = inp.sessions {
        let tp = inp
            .truth_sessions
            .ok_or("--sessions needs --truth-sessions (the per-session ground truth of the run)")?;
        check_sessions(
            tp,
            p,
            inp.logged,
            sender_loss > 0,
            analyser_drops > 0,
            &mut rep,
        )?;
    }
    if inp.summary.is_none() && inp.sessions.is_none() {
        return Err("nothing to verify: give --summary and/or --sessions".into());
    }
    Ok(rep)
}

/// `{"Succeeded":{"15":n}}` (the analyser) or `{"Succeeded/15":n}` (the ground truth) as
/// "Status/bitmap" -> n.
fn status_bitmap(v: Option<&Value>) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let Some(m) = v.and_then(Value::as_object) else {
        return out;
    };
    for (k, v) in m {
        match v {
            Value::Object(inner) => {
                for (b, n) in inner {
                    if let Some(n) = n.as_u64().filter(|n| *n > 0) {
                        out.insert(format!("{k}/{b}"), n);
                    }
                }
            }
            v => {
                if let Some(n) = v.as_u64().filter(|n| *n > 0) {
                    out.insert(k.clone(), n);
                }
            }
        }
    }
    out
}

fn check_summary(gt: &Value, s: &Value, sender_loss: u64, analyser_drops: u64, rep: &mut Report) {
    let sent = num(gt, &["messages", "sent"]);
    let got_messages = num(s, &["messages"]);
    rep.fact("messages_sent", sent);
    rep.fact("analyser_messages", got_messages);
    rep.fact("analyser_queue_full_drops", analyser_drops);
    // The analyser counts every decoded message, before it may shed it: all must be there.
    if got_messages != sent {
        rep.err(format!(
            "analyser counted {got_messages} messages, the generator sent {sent}"
        ));
    }
    check_message_types(gt, s, rep);
    let gt_status = count_map(gt.get("status"));
    let got_status = count_map(s.get("status"));
    rep.fact("analyser_status", json!(got_status));
    rep.fact("expected_status", json!(gt_status));
    let gt_sb = status_bitmap(gt.get("status_bitmap"));
    let got_sb = status_bitmap(s.get("status_bitmap"));
    rep.fact("analyser_status_bitmap", json!(got_sb));
    rep.fact("expected_status_bitmap", json!(gt_sb));
    if sender_loss == 0 && analyser_drops == 0 {
        // Below capacity and without loss: everything must agree exactly.
        let exp_sessions = num(gt, &["expected_sessions"]);
        let got_sessions = num(s, &["sessions"]);
        if got_sessions != exp_sessions {
            rep.err(format!(
                "analyser reported {got_sessions} sessions, expected {exp_sessions}"
            ));
        }
        if gt_status != got_status {
            rep.err(format!(
                "status counts differ: expected {gt_status:?}, analyser {got_status:?}"
            ));
        }
        let gt_bitmap = count_map(gt.get("bitmap"));
        let got_bitmap = count_map(s.get("bitmap"));
        if gt_bitmap != got_bitmap {
            rep.err(format!(
                "bitmap counts differ: expected {gt_bitmap:?}, analyser {got_bitmap:?}"
            ));
        }
        if s.get("status_bitmap").is_some() && gt_sb != got_sb {
            rep.err(format!(
                "(status, bitmap) counts differ: expected {gt_sb:?}, analyser {got_sb:?}"
            ));
        }
    } else {
        check_summary_under_loss(
            gt,
            &gt_status,
            &got_status,
            &gt_sb,
            &got_sb,
            analyser_drops,
            rep,
        );
    }
}

/// With loss (issue #10's verdict rule): every session whose CLIENT_RESPONSE was delivered
/// carries that response's verdict, so the Succeeded count and the count of Failed sessions
/// with a response are exact; Failed sessions without a response (timeouts, no response) may
/// turn SampleLoss when loss is evident while they are open, so Failed can only shrink by
/// those. When the analyser shed events itself it may have lost responses too: then the counts
/// can only shrink.
fn check_summary_under_loss(
    gt: &Value,
    gt_status: &std::collections::BTreeMap<String, u64>,
    got_status: &std::collections::BTreeMap<String, u64>,
    gt_sb: &std::collections::BTreeMap<String, u64>,
    got_sb: &std::collections::BTreeMap<String, u64>,
    analyser_drops: u64,
    rep: &mut Report,
) {
    let g = |m: &std::collections::BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    // (Status, whether the bitmap has the CR bit) totals of a "Status/bitmap" map.
    let answered = |m: &std::collections::BTreeMap<String, u64>, st: &str| -> u64 {
        m.iter()
            .filter_map(|(k, n)| {
                let (s, b) = k.split_once('/')?;
                let b: u8 = b.parse().ok()?;
                (s == st && b & 2 != 0).then_some(*n)
            })
            .sum()
    };
    rep.fact(
        "sessions_lost_answered",
        gt.get("sessions_lost_answered")
            .cloned()
            .unwrap_or(Value::Null),
    );
    for st in ["Succeeded", "Failed"] {
        let (e, a) = (answered(gt_sb, st), answered(got_sb, st));
        let exact = analyser_drops == 0;
        if (exact && a != e) || a > e {
            rep.err(format!(
                "analyser reported {a} {st} sessions with a client response, the ground truth \
                 has {e}: every session whose response was delivered carries its verdict"
            ));
        }
    }
    for (k, a) in got_sb {
        if k.starts_with("SampleLoss/")
            && k["SampleLoss/".len()..]
                .parse::<u8>()
                .is_ok_and(|b| b & 2 != 0)
        {
            rep.err(format!(
                "analyser reported {a} {k}: a session whose client response arrived is never SampleLoss"
            ));
        }
    }
    let (e, a) = (g(gt_status, "Failed"), g(got_status, "Failed"));
    if a > e {
        rep.err(format!(
            "analyser reported {a} Failed, the ground truth has only {e}"
        ));
    }
    rep.fact(
        "unanswered_sessions_flagged_sampleloss_at_most",
        e.saturating_sub(a),
    );
    if analyser_drops > 0 {
        rep.notes.push(format!(
            "the analyser shed {analyser_drops} events (queue_full): exact counts not required"
        ));
    }
}

#[derive(Debug, Clone)]
struct Truth {
    client: String,
    status: String,
    bitmap: u8,
    lost: bool,
    /// A line was matched to it (a lost session may come out in pieces).
    used: bool,
    /// The line carrying its client response was matched to it.
    verdict_seen: bool,
}

/// BitMap bit of CLIENT_RESPONSE.
const CR: u8 = 2;

impl Truth {
    /// Whether its CLIENT_RESPONSE was delivered: then its status is known and exact.
    fn answered(&self) -> bool {
        self.bitmap & CR != 0
    }

    /// Whether a Succeeded/Failed line with `bitmap` is this session, or (lost sessions only)
    /// its piece that holds the response: the response decides the status, the bitmap is
    /// what was delivered (a piece may lack what an earlier fragment took).
    fn explains_answer(&self, status: &str, bitmap: u8) -> bool {
        if self.verdict_seen || self.status != status {
            return false;
        }
        if self.lost {
            self.answered() && bitmap & CR != 0 && bitmap & !self.bitmap == 0
        } else {
            !self.used && self.bitmap == bitmap
        }
    }
}

type Key = (String, String, Option<u16>);

fn norm_qname(q: &str) -> String {
    q.trim_end_matches('.').to_ascii_lowercase()
}

struct TruthTable {
    all: Vec<Truth>,
    by_id: HashMap<Key, Vec<usize>>,
    /// (identity, qname, client) for session lines that carry no DNS id; built on demand.
    by_client: Option<HashMap<(String, String, String), Vec<usize>>>,
    keys: Vec<Key>,
}

impl TruthTable {
    fn candidates(
        &mut self,
        identity: String,
        qname: String,
        id: Option<u16>,
        client: &Option<String>,
        used_too: bool,
    ) -> Vec<usize> {
        let all = &self.all;
        let live = |i: &usize| {
            (used_too || !all[*i].used) && client.as_ref().is_none_or(|c| *c == all[*i].client)
        };
        if id.is_some() {
            return self
                .by_id
                .get(&(identity, qname, id))
                .map(|v| v.iter().copied().filter(live).collect())
                .unwrap_or_default();
        }
        let Some(c) = client else {
            // Neither id nor client: every session of the name is a candidate.
            return self
                .keys
                .iter()
                .enumerate()
                .filter(|(i, k)| k.0 == identity && k.1 == qname && live(i))
                .map(|(i, _)| i)
                .collect();
        };
        let idx = self.by_client.get_or_insert_with(|| {
            let mut m: HashMap<(String, String, String), Vec<usize>> = HashMap::new();
            for (i, k) in self.keys.iter().enumerate() {
                m.entry((k.0.clone(), k.1.clone(), all[i].client.clone()))
                    .or_default()
                    .push(i);
            }
            m
        });
        idx.get(&(identity, qname, c.clone()))
            .map(|v| v.iter().copied().filter(live).collect())
            .unwrap_or_default()
    }
}

fn load_truth(path: &Path) -> Result<TruthTable, String> {
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut t = TruthTable {
        all: Vec::new(),
        by_id: HashMap::new(),
        by_client: None,
        keys: Vec::new(),
    };
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let c: Vec<&str> = line.split('\t').collect();
        if c.len() < 8 {
            return Err(format!("{}: bad line {line:?}", path.display()));
        }
        let key = (c[0].to_string(), norm_qname(c[1]), c[2].parse().ok());
        t.by_id.entry(key.clone()).or_default().push(t.all.len());
        t.keys.push(key);
        t.all.push(Truth {
            client: c[3].to_string(),
            status: c[5].to_string(),
            bitmap: c[6].parse().unwrap_or(0),
            lost: c[7] == "1",
            used: false,
            verdict_seen: false,
        });
    }
    Ok(t)
}

/// The DNS id of a session line: a top-level `id`/`dns_id`, else the first message's.
fn line_id(v: &Value) -> Option<u16> {
    for k in ["dns_id", "id"] {
        if let Some(n) = v.get(k).and_then(Value::as_u64) {
            return Some(n as u16);
        }
    }
    let msgs = v.get("messages")?.as_array()?;
    msgs.iter().find_map(|m| {
        let d = m.get("dns")?;
        d.get("id")
            .or_else(|| d.get("header").and_then(|h| h.get("id")))
            .and_then(Value::as_u64)
            .map(|n| n as u16)
    })
}

fn check_sessions(
    truth_path: &Path,
    sessions_path: &Path,
    logged: Logged,
    sender_loss: bool,
    analyser_shed: bool,
    rep: &mut Report,
) -> Result<(), String> {
    let loss = sender_loss || analyser_shed;
    let mut truth = load_truth(truth_path)?;
    let f = std::fs::File::open(sessions_path)
        .map_err(|e| format!("{}: {e}", sessions_path.display()))?;
    let (mut lines, mut matched, mut lost_ok, mut flagged, mut stray_loss) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut no_id, mut fragments, mut lost_with_verdict) = (0u64, 0u64, 0u64);
    for (n, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| e.to_string())?;
        if !line.starts_with('{') {
            continue;
        }
        let v: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                rep.err(format!("session line {}: not JSON: {e}", n + 1));
                continue;
            }
        };
        // Lookup lines (`"kind":"lookup"`) join sessions; the sessions are what is verified.
        if v.get("summary").is_some() || v["kind"] == "lookup" {
            continue;
        }
        lines += 1;
        let status = v
            .get("status")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let bitmap = v.get("bitmap").and_then(Value::as_u64).unwrap_or(0) as u8;
        let identity = v
            .get("identity")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let qname = norm_qname(v.get("qname").and_then(Value::as_str).unwrap_or(""));
        let client = v.get("client").and_then(Value::as_str).map(str::to_string);
        let id = line_id(&v);
        if id.is_none() {
            no_id += 1;
        }
        let what = format!(
            "line {}: {status}/{bitmap} {identity} {qname} id={id:?} client={client:?}",
            n + 1
        );
        // Pieces of a lost session find it used already: they may match it again.
        let cands = truth.candidates(identity, qname, id, &client, true);
        let all = &mut truth.all;
        match status.as_str() {
            "Succeeded" | "Failed" => {
                let intact = cands
                    .iter()
                    .copied()
                    .find(|&i| !all[i].lost && all[i].explains_answer(&status, bitmap));
                let found = intact.or_else(|| {
                    cands
                        .iter()
                        .copied()
                        .find(|&i| all[i].explains_answer(&status, bitmap))
                });
                if let Some(i) = found {
                    let t = &mut all[i];
                    t.used = true;
                    t.verdict_seen = t.answered();
                    if t.lost {
                        lost_with_verdict += 1;
                    } else {
                        matched += 1;
                    }
                } else {
                    let truth = cands
                        .iter()
                        .map(|&i| &all[i])
                        .find(|t| !t.verdict_seen)
                        .or_else(|| cands.first().map(|&i| &all[i]))
                        .map(|t| {
                            format!(
                                "{}/{}{}",
                                t.status,
                                t.bitmap,
                                match (t.lost, t.answered()) {
                                    (true, true) => " (it lost messages; its response was delivered)",
                                    (true, false) => " (it lost messages, its response among them or it had none)",
                                    _ => "",
                                }
                            )
                        })
                        .unwrap_or_else(|| "no such session".into());
                    rep.err(format!("{what}: ground truth says {truth}"));
                }
            }
            "SampleLoss" => {
                if bitmap & CR != 0 {
                    rep.err(format!(
                        "{what}: its client response arrived, so its outcome is known and it \
                         must carry that response's verdict"
                    ));
                }
                let unused = |i: &usize| !all[*i].used;
                if let Some(&i) = cands.iter().filter(|i| unused(i)).find(|&&i| all[i].lost) {
                    all[i].used = true;
                    lost_ok += 1;
                } else if let Some(&i) = cands.iter().filter(|i| unused(i)).find(|&&i| !all[i].lost)
                {
                    all[i].used = true;
                    let t = &all[i];
                    flagged += 1;
                    if !loss || t.answered() {
                        rep.err(format!(
                            "{what}: no message of it was lost, ground truth says {}/{}",
                            t.status, t.bitmap
                        ));
                    }
                } else if cands.iter().any(|&i| all[i].lost) {
                    // A lost session may come out in pieces (orphans).
                    fragments += 1;
                } else {
                    stray_loss += 1;
                    if !loss {
                        rep.err(format!("{what}: no such session in the ground truth"));
                    }
                }
            }
            other => rep.err(format!("{what}: unknown status {other:?}")),
        }
    }
    // Generated sessions that should have been printed but were not.
    let (mut missing, mut lost_unseen, mut unseen_maybe_flagged) = (0u64, 0u64, 0u64);
    let (mut vanished, mut answered, mut answer_missing, mut answer_shed) =
        (0u64, 0u64, 0u64, 0u64);
    for t in truth.all.iter().filter(|t| t.status != "-") {
        if t.answered() && logs(&logged, &t.status) {
            answered += 1;
            if !t.verdict_seen {
                if analyser_shed {
                    // The analyser may have shed the response itself.
                    answer_shed += 1;
                } else {
                    answer_missing += 1;
                    if answer_missing <= 20 {
                        rep.err(format!(
                            "generated session {}/{} client {} (lost messages: {}): its response \
                             was delivered but no {} line carries it",
                            t.status, t.bitmap, t.client, t.lost, t.status
                        ));
                    }
                }
            }
            continue;
        }
        if t.used {
            continue;
        }
        if t.lost {
            lost_unseen += 1;
        } else if logs(&logged, &t.status) {
            if analyser_shed {
                vanished += 1;
            } else if loss && !logged.sample_loss {
                unseen_maybe_flagged += 1;
            } else {
                missing += 1;
                if missing <= 20 {
                    rep.err(format!(
                        "generated session {}/{} client {} never reported",
                        t.status, t.bitmap, t.client
                    ));
                }
            }
        }
    }
    if answer_missing > 20 {
        rep.err(format!(
            "... {} more answered sessions without a line carrying their verdict",
            answer_missing - 20
        ));
    }
    if missing > 20 {
        rep.err(format!(
            "... {} more generated sessions never reported",
            missing - 20
        ));
    }
    if analyser_shed {
        rep.fact("sessions_not_reported_analyser_shed", vanished);
        rep.fact(
            "answered_sessions_without_their_verdict_analyser_shed",
            answer_shed,
        );
    }
    rep.fact("session_lines", lines);
    rep.fact("lines_matched_exactly", matched);
    rep.fact("sessions_with_response_delivered", answered);
    rep.fact(
        "sessions_with_response_delivered_carrying_its_verdict",
        answered - answer_missing - answer_shed,
    );
    rep.fact(
        "lost_sessions_carrying_their_response_verdict",
        lost_with_verdict,
    );
    rep.fact("lost_sessions_reported_sampleloss", lost_ok);
    rep.fact("unanswered_intact_sessions_flagged_sampleloss", flagged);
    rep.fact("sampleloss_fragments_of_lost_sessions", fragments);
    rep.fact("sampleloss_lines_without_a_generated_session", stray_loss);
    rep.fact("lost_sessions_not_matched", lost_unseen);
    rep.fact("missing_sessions", missing);
    if unseen_maybe_flagged > 0 {
        rep.fact(
            "intact_sessions_not_printed_possibly_sampleloss",
            unseen_maybe_flagged,
        );
    }
    if no_id > 0 {
        rep.notes.push(format!(
            "{no_id} session lines carry no DNS id; they were matched without it"
        ));
    }
    Ok(())
}

/// The messages by type: the summary names them as the lines and the metrics do
/// (FORWARDER_*); a type missing from it is an error, never a count of 0.
fn check_message_types(gt: &Value, s: &Value, rep: &mut Report) {
    match s.get("messages_by_type").and_then(Value::as_object) {
        Some(by) => {
            for name in [
                "CLIENT_QUERY",
                "CLIENT_RESPONSE",
                "FORWARDER_QUERY",
                "FORWARDER_RESPONSE",
            ] {
                let e = num(gt, &["messages", "by_type", name]);
                match by.get(name).and_then(Value::as_u64) {
                    Some(a) if a == e => {}
                    Some(a) => rep.err(format!(
                        "analyser counted {a} {name} messages, the generator sent {e}"
                    )),
                    None => rep.err(format!(
                        "the analyser summary's messages_by_type has no {name}: {by:?}"
                    )),
                }
            }
        }
        None => rep.err("the analyser summary has no messages_by_type".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the per-session check of `lines` against `truth` (TSV rows without the header)
    /// with sender loss; returns the errors.
    fn errors(truth: &[&str], lines: &[&str]) -> Vec<String> {
        let dir = std::env::temp_dir().join(format!(
            "loadgen-verify-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (t, s) = (dir.join("truth.tsv"), dir.join("sessions.jsonl"));
        std::fs::write(
            &t,
            format!("{}{}\n", crate::gen::RECORD_HEADER, truth.join("\n")),
        )
        .unwrap();
        std::fs::write(&s, lines.join("\n")).unwrap();
        let mut rep = Report::default();
        check_sessions(&t, &s, Logged::ALL, true, false, &mut rep).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        rep.errors
    }

    fn line(status: &str, bitmap: u8, qname: &str, id: u16) -> String {
        format!(
            r#"{{"status":"{status}","bitmap":{bitmap},"identity":"coredns-0","qname":"{qname}.","client":"10.244.0.2:1000","dns_id":{id}}}"#
        )
    }

    // identity qname id client outcome status bitmap lost rcode cq_time
    const INTACT: &str =
        "coredns-0\ta.example.com\t1\t10.244.0.2:1000\tforward\tSucceeded\t15\t0\tNOERROR\t1";
    /// Lost its CQ; FQ, FR and the SERVFAIL response were delivered.
    const LOST_ANSWERED: &str =
        "coredns-0\tb.example.com\t2\t10.244.0.2:1000\tforward\tFailed\t14\t1\tSERVFAIL\t2";
    /// Lost its FR and CR: the outcome is unknown.
    const LOST_UNANSWERED: &str =
        "coredns-0\tc.example.com\t3\t10.244.0.2:1000\tforward\tSampleLoss\t5\t1\tNOERROR\t3";

    #[test]
    fn answered_sessions_must_carry_their_verdict_under_loss() {
        let good = [
            line("Succeeded", 15, "a.example.com", 1),
            line("Failed", 14, "b.example.com", 2),
            line("SampleLoss", 5, "c.example.com", 3),
        ];
        let truth = [INTACT, LOST_ANSWERED, LOST_UNANSWERED];
        let refs = |v: &[String]| v.iter().map(String::clone).collect::<Vec<_>>();
        fn as_str(v: &[String]) -> Vec<&str> {
            v.iter().map(String::as_str).collect()
        }
        let ok = refs(&good);
        assert_eq!(errors(&truth, &as_str(&ok)), Vec::<String>::new());

        // The old rule (an answered session that lost messages is SampleLoss) now fails...
        let mut old = refs(&good);
        old[1] = line("SampleLoss", 14, "b.example.com", 2);
        let e = errors(&truth, &as_str(&old));
        assert!(
            e.iter()
                .any(|e| e.contains("must carry that response's verdict")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|e| e.contains("no Failed line carries it")),
            "{e:?}"
        );
        // ... as does a wrong verdict, and a verdict for an unknown outcome.
        let mut wrong = refs(&good);
        wrong[1] = line("Succeeded", 14, "b.example.com", 2);
        assert!(!errors(&truth, &as_str(&wrong)).is_empty());
        let mut guessed = refs(&good);
        guessed[2] = line("Failed", 5, "c.example.com", 3);
        assert!(!errors(&truth, &as_str(&guessed)).is_empty());
    }

    #[test]
    fn message_types_are_the_forwarder_names_and_none_may_be_missing() {
        let gt = json!({"messages": {"by_type": {
            "CLIENT_QUERY": 2, "CLIENT_RESPONSE": 2, "FORWARDER_QUERY": 1, "FORWARDER_RESPONSE": 1
        }}});
        let check = |summary: Value| {
            let mut rep = Report::default();
            check_message_types(&gt, &summary, &mut rep);
            rep.errors
        };
        let good = json!({"messages_by_type": {
            "CLIENT_QUERY": 2, "CLIENT_RESPONSE": 2, "FORWARDER_QUERY": 1, "FORWARDER_RESPONSE": 1
        }});
        assert_eq!(check(good), Vec::<String>::new());
        // The old names are not read as 0s that happen to match.
        let old = json!({"messages_by_type": {
            "CLIENT_QUERY": 2, "CLIENT_RESPONSE": 2, "UPSTREAM_QUERY": 1, "UPSTREAM_RESPONSE": 1
        }});
        let e = check(old);
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e[0].contains("has no FORWARDER_QUERY"), "{e:?}");
        assert_eq!(check(json!({})).len(), 1);
    }

    #[test]
    fn a_wrong_ground_truth_is_caught() {
        let lines = [
            line("Succeeded", 15, "a.example.com", 1),
            line("Failed", 14, "b.example.com", 2),
            line("SampleLoss", 5, "c.example.com", 3),
        ];
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        // The truth of the old rule: the answered session that lost its CQ as SampleLoss.
        let old_truth = LOST_ANSWERED.replace("\tFailed\t", "\tSampleLoss\t");
        let e = errors(&[INTACT, &old_truth, LOST_UNANSWERED], &lines);
        assert!(e.iter().any(|e| e.contains("line 2: Failed/14")), "{e:?}");
    }

    #[test]
    fn a_lost_session_may_come_out_in_pieces() {
        // Its orphan FQ first (SampleLoss), then the piece with the response.
        let lines = [
            line("SampleLoss", 4, "b.example.com", 2),
            line("Failed", 10, "b.example.com", 2),
        ];
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        assert_eq!(errors(&[LOST_ANSWERED], &lines), Vec::<String>::new());
        // A second piece with a response is one too many.
        let twice = [lines[1], lines[1]];
        assert!(!errors(&[LOST_ANSWERED], &twice).is_empty());
    }
}
