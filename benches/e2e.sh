#!/usr/bin/env bash
# End-to-end benchmark of dnstap-analyser against the reference receivers, on this machine,
# on loopback, with identical generated CoreDNS traffic (same dnstap-loadgen seed and flags)
# sent into each receiver in turn.
#
# Usage: benches/e2e.sh [OPTIONS] [SUITE...]
#   SUITE: compare (default) | paced | storm | scaling | tls | all
#     compare  max rate, pre-generated, into: fstrm_capture -w /dev/null, Go `dnstap -l -q`,
#              Go `dnstap -l -j`, analyser --log failed, analyser --log all (JSON to /dev/null)
#     paced    --paced-msgs messages/s (default 1,000,000) for --paced-secs (default 60)
#              into the analyser --log failed; its drops must be zero
#     storm    upstream outage: every session times out (CQ + FQ per attempt, no CR);
#              --storm-sessions (default 1,200,000) paced at 100k sessions/s, so ~1M
#              sessions wait for expiry at once; peak RSS, and all must end Failed/5
#     scaling  analyser --log failed with --shards 1/2/4 x --readers 1/2
#     tls      analyser --log failed over plaintext, TLS and mTLS (certificates made with the
#              openssl CLI into DIR/tls), the same traffic into each: the cost of TLS
#     ratio    --rounds rounds of fstrm_capture -w /dev/null then the analyser --log failed
#              (then the --baseline analyser, if given), interleaved; prints each round's
#              throughput and CPU-per-message ratios to fstrm_capture and their medians,
#              and each analyser thread's CPU per million messages (the steadiest figure:
#              within a few % between rounds where the ratios move by 15 %)
#   OPTIONS:
#     --sessions N        sessions per compare/scaling run (default 600000: ~2.07M messages)
#     --connections N     emulated CoreDNS pods (default 4)
#     --seed N            loadgen seed (default 1)
#     --paced-msgs N      messages per second for the paced run (default 1000000)
#     --paced-secs N      seconds for the paced run (default 60)
#     --storm-sessions N  sessions for the storm (default 1200000)
#     --port N            first TCP port to use (default 17000)
#     --out DIR           where results go (default target/bench-e2e/<timestamp>)
#     --no-build          use the existing target/production binaries
#     --analyser-args "…" extra flags for every analyser run (e.g. "--pin")
#     --loadgen-args "…"  extra flags for every max-rate load-generator run (compare, scaling,
#                         tls, ratio), e.g. a healthy cluster's mix instead of the default
#                         outage-grade one: "--mix local=3,forward=15,timeout=0.1,no_response=0.02
#                         --rcodes NOERROR=84,NXDOMAIN=15,SERVFAIL=0.6,REFUSED=0.4", or issue
#                         #18's cache-heavy shape (2.68M messages per 1M sessions):
#                         "--mix local=2,forward=1 --rcodes NOERROR=84,NXDOMAIN=15,SERVFAIL=0.6,REFUSED=0.4"
#     --analyser BIN      the analyser binary (default target/production/dnstap-analyser)
#     --baseline BIN      ratio: another analyser binary (e.g. main's) measured in each round too
#     --loadgen BIN       the load generator binary (default target/production/dnstap-loadgen)
#     --rounds N          ratio: rounds (default 3)
#
# Every run writes DIR/<name>.{time,stderr,truth.json,loadgen.err} and one line to
# DIR/results.jsonl; a Markdown table is printed at the end (DIR/results.md).
# msgs/s = messages sent / (first byte .. last FINISH) as the sender saw it: a receiver
# sends FINISH only after it has read everything before STOP. CPU-s and peak RSS are the
# receiver's own, from /usr/bin/time -v.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SESSIONS=600000
CONNS=4
SEED=1
PACED_MSGS=1000000
PACED_SECS=60
STORM_SESSIONS=1200000
PORT=17000
OUT=""
BUILD=1
AN_EXTRA=""
LG_EXTRA=""
AN=""
LG=""
BASELINE=""
ROUNDS=3
SUITES=()

while [ $# -gt 0 ]; do
    case "$1" in
    --sessions) SESSIONS=$2; shift 2 ;;
    --connections) CONNS=$2; shift 2 ;;
    --seed) SEED=$2; shift 2 ;;
    --paced-msgs) PACED_MSGS=$2; shift 2 ;;
    --paced-secs) PACED_SECS=$2; shift 2 ;;
    --storm-sessions) STORM_SESSIONS=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --analyser-args) AN_EXTRA=$2; shift 2 ;;
    --loadgen-args) LG_EXTRA=$2; shift 2 ;;
    --analyser) AN=$2; shift 2 ;;
    --baseline) BASELINE=$2; shift 2 ;;
    --loadgen) LG=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//; /^set -euo/d'; exit 0 ;;
    compare | paced | storm | scaling | tls | ratio) SUITES+=("$1"); shift ;;
    all) SUITES+=(compare paced storm scaling tls); shift ;;
    *) echo "e2e.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ ${#SUITES[@]} -eq 0 ] && SUITES=(compare)
OUT=${OUT:-$ROOT/target/bench-e2e/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
: > "$OUT/results.jsonl"

if [ "$BUILD" = 1 ]; then
    (cd "$ROOT" && cargo build --profile production --workspace --bins >&2)
fi
LG=${LG:-$ROOT/target/production/dnstap-loadgen}
AN=${AN:-$ROOT/target/production/dnstap-analyser}
for b in "$LG" "$AN" ${BASELINE:+"$BASELINE"} /usr/bin/time; do
    [ -x "$b" ] || { echo "e2e.sh: $b missing" >&2; exit 2; }
done
HAVE_FSTRM=1; command -v fstrm_capture >/dev/null || HAVE_FSTRM=0
HAVE_GO=1; command -v dnstap >/dev/null || HAVE_GO=0

{
    echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
    echo "cpu: $(awk -F: '/model name/ {print $2; exit}' /proc/cpuinfo | sed 's/^ *//')"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "analyser: $("$AN" --version 2>/dev/null || true); loadgen: $("$LG" --version)"
    command -v fstrm_capture >/dev/null && echo "fstrm_capture: $(dpkg-query -W -f='${Version}' fstrm-bin 2>/dev/null || echo '?')"
    command -v dnstap >/dev/null && echo "go dnstap: $(dpkg-query -W -f='${Version}' golang-github-dnstap-golang-dnstap-cli 2>/dev/null || echo '?')"
} | tee "$OUT/machine.txt" >&2

wait_listen() { # PORT PID
    for _ in $(seq 1 200); do
        if [ -n "$(ss -ltnH "sport = :$1" 2>/dev/null)" ]; then return 0; fi
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# thread_cpu PID: "TID NAME SECONDS" for each thread (user + system CPU; the analyser names
# its threads reader-N, shard-N, lookup-N, writer)
thread_cpu() {
    local t tick
    tick=$(getconf CLK_TCK)
    for t in /proc/"$1"/task/*; do
        awk -v tid="${t##*/}" -v name="$(cat "$t/comm" 2>/dev/null)" -v tick="$tick" \
            '{printf "%s %s %.2f\n", tid, name, ($14 + $15) / tick}' "$t/stat" 2>/dev/null
    done
}

# measure NAME KIND STDOUT "LOADGEN ARGS" RECEIVER-CMD...
# KIND: analyser | fstrm | go (how drops are accounted)
measure() {
    local name=$1 kind=$2 stdout=$3 lgargs=$4
    shift 4
    PORT=$((PORT + 1))
    local cmd=()
    for a in "$@"; do cmd+=("${a//@PORT@/$PORT}"); done
    echo "== $name: ${cmd[*]}" >&2
    /usr/bin/time -v -o "$OUT/$name.time" "${cmd[@]}" >"$stdout" 2>"$OUT/$name.stderr" &
    local tp=$!
    if ! wait_listen "$PORT" "$tp"; then
        echo "e2e.sh: $name did not listen on $PORT" >&2
        cat "$OUT/$name.stderr" >&2
        return 1
    fi
    local rp sampler
    rp=$(pgrep -P "$tp" || true)
    # Each thread's CPU, sampled every 50 ms until the receiver ends (threads end one by one
    # as it shuts down: each counts with its last sample).
    (
        while [ -n "$rp" ] && kill -0 "$rp" 2>/dev/null; do
            # A thread ending between listing and reading it fails one read: not the loop.
            thread_cpu "$rp" >>"$OUT/$name.threads" || true
            sleep 0.05
        done
    ) &
    sampler=$!
    # shellcheck disable=SC2086
    "$LG" run --connect "127.0.0.1:$PORT" --connections "$CONNS" --seed "$SEED" $lgargs \
        --truth "$OUT/$name.truth.json" 2>"$OUT/$name.loadgen.err" || {
        echo "e2e.sh: loadgen failed for $name:" >&2
        cat "$OUT/$name.loadgen.err" >&2
    }
    sleep 0.2
    [ -n "$rp" ] && kill -TERM "$rp"
    wait "$tp" || true
    wait "$sampler" || true
    local verified=null
    if [ "$kind" = analyser ]; then
        if "$LG" verify --ground-truth "$OUT/$name.truth.json" --summary "$OUT/$name.stderr" \
            >"$OUT/$name.verify.json" 2>"$OUT/$name.verify.err"; then
            verified=true
        else
            verified=false
        fi
    fi
    python3 - "$name" "$kind" "$OUT" "$verified" "${cmd[*]}" "$lgargs" >>"$OUT/results.jsonl" <<'PY'
import json, re, sys
name, kind, out, verified, cmd, lgargs = sys.argv[1:7]
gt = json.load(open(f"{out}/{name}.truth.json"))["ground_truth"]
t = open(f"{out}/{name}.time").read()
def field(label):
    m = re.search(re.escape(label) + r"[^:]*:\s*([0-9.:]+)", t)
    return m.group(1) if m else "0"
cpu = float(field("User time")) + float(field("System time"))
rss_mib = int(field("Maximum resident set size")) / 1024
sent = gt["messages"]["sent"]
elapsed = gt["rate"]["elapsed_s"]
err = open(f"{out}/{name}.stderr", errors="replace").read()
drops = None
received = None
sessions_by = None
if kind == "analyser":
    summ = None
    for line in err.splitlines():
        if line.startswith('{"summary"'):
            summ = json.loads(line)["summary"]
    if summ:
        received = summ["messages"]
        drops = sum(summ["dropped"].values()) + max(0, sent - received)
        sessions_by = {f"{st}/{b}": n for st, row in summ.get("status_bitmap", {}).items()
                       for b, n in row.items() if n}
elif kind == "fstrm":
    m = re.search(r"wrote (\d+) frames", err)
    if m:
        received = int(m.group(1)) - 2  # START and STOP are frames too
        drops = sent - received
last = {}
try:
    for line in open(f"{out}/{name}.threads"):
        parts = line.split()
        if len(parts) == 3 and parts[1]:
            last[parts[0]] = (parts[1], max(float(parts[2]), last.get(parts[0], ("", 0))[1]))
except OSError:
    pass
threads = {}
for thread, cpu_s in last.values():
    threads[thread] = round(threads.get(thread, 0) + cpu_s, 2)
res = {
    "name": name, "receiver": cmd, "loadgen": lgargs.strip(), "messages": sent,
    "sessions": gt["sessions"], "elapsed_s": round(elapsed, 3),
    "msgs_per_s": round(sent / elapsed) if elapsed else 0,
    "cpu_s": round(cpu, 2), "cpu_s_per_M": round(cpu / sent * 1e6, 3) if sent else None,
    "peak_rss_mib": round(rss_mib, 1), "received": received, "drops": drops,
    "finish": gt["rate"]["finish_received"], "verified": json.loads(verified),
    # drops already include the messages the receiver never counted (sent - received), so
    # processed is sent - drops (received - drops would subtract those twice).
    "processed_msgs_per_s": round((sent - drops) / elapsed) if drops is not None and elapsed else None,
    "expected_sessions": gt["status_bitmap"], "sessions_by": sessions_by,
    "threads_cpu_s": threads,
}
print(json.dumps(res))
PY
    tail -1 "$OUT/results.jsonl" >&2
}

LG_MAX="--sessions $SESSIONS --pregen $LG_EXTRA"

suite_compare() {
    if [ "$HAVE_FSTRM" = 1 ]; then
        measure fstrm_capture fstrm /dev/null "$LG_MAX" \
            fstrm_capture -t protobuf:dnstap.Dnstap -a 127.0.0.1 -p @PORT@ -w /dev/null
    fi
    if [ "$HAVE_GO" = 1 ]; then
        measure go_dnstap_q go /dev/null "$LG_MAX" dnstap -l 127.0.0.1:@PORT@ -q
        measure go_dnstap_j go /dev/null "$LG_MAX" dnstap -l 127.0.0.1:@PORT@ -j
    fi
    # shellcheck disable=SC2086
    measure analyser_log_failed analyser /dev/null "$LG_MAX" \
        "$AN" --listen tcp://127.0.0.1:@PORT@ --log failed $AN_EXTRA
    # shellcheck disable=SC2086
    measure analyser_log_all_json analyser /dev/null "$LG_MAX" \
        "$AN" --listen tcp://127.0.0.1:@PORT@ --log all --format json $AN_EXTRA
}

suite_paced() {
    # ~3.45 messages per session with the default mix.
    local rate
    rate=$(python3 -c "print(round($PACED_MSGS / 3.449))")
    # shellcheck disable=SC2086
    measure "analyser_paced_${PACED_MSGS}" analyser /dev/null \
        "--rate $rate --duration $PACED_SECS" \
        "$AN" --listen tcp://127.0.0.1:@PORT@ --log failed $AN_EXTRA
}

suite_storm() {
    # Paced at 100k sessions/s (~300k msgs/s) on the wall clock: below the analyser's capacity,
    # so nothing is shed and every session must end Failed/5, while 100k/s x the 10 s session
    # timeout = 1M sessions wait for expiry at once. (At max rate the analyser sheds load, and
    # a shard that shed events marks every session open on it SampleLoss.)
    local secs
    secs=$(python3 -c "print($STORM_SESSIONS / 100000)")
    # --log sampleloss: the summary still counts every session's Status/BitMap; printing
    # 100k failure lines a second would measure rendering (the compare suite does that), not
    # the million sessions waiting for expiry.
    # shellcheck disable=SC2086
    measure analyser_storm analyser /dev/null \
        "--rate 100000 --duration $secs --mix timeout=1" \
        "$AN" --listen tcp://127.0.0.1:@PORT@ --log sampleloss $AN_EXTRA
}

suite_scaling() {
    for readers in 1 2; do
        for shards in 1 2 4; do
            # shellcheck disable=SC2086
            measure "analyser_r${readers}_s${shards}" analyser /dev/null "$LG_MAX" \
                "$AN" --listen tcp://127.0.0.1:@PORT@ --log failed --readers "$readers" \
                --shards "$shards" $AN_EXTRA
        done
    done
}

# A throwaway CA, the analyser's certificate (localhost, 127.0.0.1) and a client's, in DIR/tls.
make_certs() {
    local d=$OUT/tls
    mkdir -p "$d"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=bench-ca -keyout "$d/ca.key" -out "$d/ca.pem" 2>/dev/null
    for who in server client; do
        local usage=serverAuth
        [ "$who" = client ] && usage=clientAuth
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$who" \
            -keyout "$d/$who.key" -out "$d/$who.csr" 2>/dev/null
        openssl x509 -req -in "$d/$who.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" \
            -CAcreateserial -days 2 -out "$d/$who.pem" \
            -extfile <(printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=%s\n' "$usage") \
            2>/dev/null
    done
}

suite_tls() {
    command -v openssl >/dev/null || { echo "e2e.sh: tls needs openssl (Debian: openssl)" >&2; return 1; }
    make_certs
    local d=$OUT/tls
    local lg_tls="$LG_MAX --tls --tls-ca $d/ca.pem --tls-server-name localhost"
    local an_tls=(--tls-cert "$d/server.pem" --tls-key "$d/server.key")
    # shellcheck disable=SC2086
    measure analyser_plain analyser /dev/null "$LG_MAX" \
        "$AN" --listen tcp://127.0.0.1:@PORT@ --log failed $AN_EXTRA
    # shellcheck disable=SC2086
    measure analyser_tls analyser /dev/null "$lg_tls" \
        "$AN" --listen tls://127.0.0.1:@PORT@ "${an_tls[@]}" --log failed $AN_EXTRA
    # shellcheck disable=SC2086
    measure analyser_mtls analyser /dev/null "$lg_tls --tls-cert $d/client.pem --tls-key $d/client.key" \
        "$AN" --listen tls://127.0.0.1:@PORT@ "${an_tls[@]}" --tls-client-ca "$d/ca.pem" \
        --log failed $AN_EXTRA
}

suite_ratio() {
    [ "$HAVE_FSTRM" = 1 ] || { echo "e2e.sh: ratio needs fstrm_capture (Debian: fstrm-bin)" >&2; return 1; }
    for round in $(seq 1 "$ROUNDS"); do
        echo "load before round $round: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
        measure "ratio${round}_fstrm_capture" fstrm /dev/null "$LG_MAX" \
            fstrm_capture -t protobuf:dnstap.Dnstap -a 127.0.0.1 -p @PORT@ -w /dev/null
        # shellcheck disable=SC2086
        measure "ratio${round}_analyser" analyser /dev/null "$LG_MAX" \
            "$AN" --listen tcp://127.0.0.1:@PORT@ --log failed $AN_EXTRA
        if [ -n "$BASELINE" ]; then
            # shellcheck disable=SC2086
            measure "ratio${round}_baseline" analyser /dev/null "$LG_MAX" \
                "$BASELINE" --listen tcp://127.0.0.1:@PORT@ --log failed $AN_EXTRA
        fi
    done
}

for s in "${SUITES[@]}"; do
    "suite_$s"
done

python3 - "$OUT" <<'PY' | tee "$OUT/results.md"
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/results.jsonl") if l.strip()]
by = {r["name"]: r for r in rows}
print("| run | messages | msgs/s received | msgs/s processed | CPU-s / M msgs | peak RSS MiB | drops | verified |")
print("|---|---:|---:|---:|---:|---:|---:|---|")
for r in rows:
    d = "n/a" if r["drops"] is None else f"{r['drops']:,}"
    p = "-" if r.get("processed_msgs_per_s") is None else f"{r['processed_msgs_per_s']:,}"
    v = {True: "yes", False: "NO", None: "-"}[r["verified"]]
    print(f"| {r['name']} | {r['messages']:,} | {r['msgs_per_s']:,} | {p} | {r['cpu_s_per_M']} | {r['peak_rss_mib']} | {d} | {v} |")
for r in rows:
    if r.get("sessions_by") is not None and "storm" in r["name"]:
        f5 = r["sessions_by"].get("Failed/5", 0)
        print(f"\n{r['name']}: {f5:,} of {r['sessions']:,} sessions ended Failed/5; all: {r['sessions_by']}")
def ratio(a, b):
    if a in by and b in by and by[b]["msgs_per_s"]:
        print(f"\n{a} / {b} msgs/s: **{by[a]['msgs_per_s'] / by[b]['msgs_per_s']:.2f}x**")
ratio("analyser_log_failed", "fstrm_capture")
ratio("analyser_log_all_json", "fstrm_capture")
ratio("analyser_log_failed", "go_dnstap_q")
ratio("analyser_log_all_json", "go_dnstap_j")
ratio("analyser_tls", "analyser_plain")
ratio("analyser_mtls", "analyser_plain")
import re, statistics
rounds = sorted({int(m.group(1)) for n in by for m in [re.match(r"ratio(\d+)_", n)] if m})
for who in ("analyser", "baseline"):
    pairs = [(by[f"ratio{i}_{who}"], by[f"ratio{i}_fstrm_capture"]) for i in rounds
             if f"ratio{i}_{who}" in by and f"ratio{i}_fstrm_capture" in by]
    if not pairs:
        continue
    tput = [a["msgs_per_s"] / f["msgs_per_s"] for a, f in pairs if f["msgs_per_s"]]
    cpu = [a["cpu_s_per_M"] / f["cpu_s_per_M"] for a, f in pairs if f["cpu_s_per_M"]]
    print(f"\n{who} --log failed vs fstrm_capture, per round: throughput "
          + ", ".join(f"{x:.2f}x" for x in tput) + "; CPU per message "
          + ", ".join(f"{x:.2f}x" for x in cpu))
    print(f"{who} median: throughput **{statistics.median(tput):.2f}x**, "
          f"CPU per message **{statistics.median(cpu):.2f}x**")
    # Where the CPU goes: each thread's CPU-seconds per million messages (median over the
    # rounds), beside fstrm_capture's whole process.
    names = sorted({t for a, _ in pairs for t in a["threads_cpu_s"]})
    per_m = {t: statistics.median(a["threads_cpu_s"].get(t, 0) / a["messages"] * 1e6
                                  for a, _ in pairs) for t in names}
    fstrm = statistics.median(f["cpu_s_per_M"] for _, f in pairs)
    shown = [t for t in names if per_m[t] >= 0.005]
    if shown:
        print(f"{who} CPU-s / M msgs by thread (median): "
              + ", ".join(f"{t} {per_m[t]:.3f}" for t in shown)
              + f"; fstrm_capture (whole) {fstrm:.3f}")
for a in ("analyser_tls", "analyser_mtls"):
    if a in by and "analyser_plain" in by and by["analyser_plain"]["cpu_s_per_M"]:
        print(f"\n{a} / analyser_plain CPU-s per M msgs: **{by[a]['cpu_s_per_M'] / by['analyser_plain']['cpu_s_per_M']:.2f}x**")
PY
echo "results in $OUT" >&2
