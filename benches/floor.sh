#!/usr/bin/env bash
# The floor under issue #18's e2e goal: what the analyser's reading of each message costs before
# any correlation, measured against fstrm_capture in the same rounds as the whole analyser.
#
# Usage: benches/floor.sh [--rounds N] [--sessions N] [--out DIR] [--loadgen-args "…"]
#   --rounds N          interleaved rounds per comparison (default 3)
#   --sessions N        sessions per run (default 1000000)
#   --out DIR           where results go (default target/bench-floor/<timestamp>)
#   --loadgen-args "…"  the traffic (default issue #18's cache-heavy shape, "--mix local=2,forward=1
#                       --rcodes NOERROR=84,NXDOMAIN=15,SERVFAIL=0.6,REFUSED=0.4"; "" for the
#                       load generator's default, outage-grade mix)
#
# Builds three analysers from the committed HEAD (git archive; uncommitted changes are not in
# them), each with the shipped production profile, in target/floor:
#   whole        HEAD as it is
#   decode-only  every message is read as always (protobuf, DNS question, identity, loss
#                tracking, recall, the event) and routed; the shard drops each batch unread
#   frames-only  each data frame is counted and not read: sockets, the Frame Streams
#                handshake and the frame walk, which is what fstrm_capture does
# then runs `benches/e2e.sh ratio` twice: decode-only against whole, decode-only against
# frames-only (3 interleaved rounds each by default). The two variants are one-line patches;
# if the code they patch has changed, the script stops and says which.
#
# The first run builds the dependencies once more (~4 min on 2 cores), later runs ~1.5 min per
# build. docs/benchmarks.md ("round 8, the floor under the goal") has the results and reading.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=3
SESSIONS=1000000
OUT=""
LG_ARGS="--mix local=2,forward=1 --rcodes NOERROR=84,NXDOMAIN=15,SERVFAIL=0.6,REFUSED=0.4"
while [ $# -gt 0 ]; do
    case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --sessions) SESSIONS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --loadgen-args) LG_ARGS=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//; /^set -euo/d'; exit 0 ;;
    *) echo "floor.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
OUT=${OUT:-$ROOT/target/bench-floor/$(date +%Y%m%d-%H%M%S)}
SRC=$ROOT/target/floor/src
export CARGO_TARGET_DIR=$ROOT/target/floor/target
mkdir -p "$OUT/bin"

fresh_source() {
    rm -rf "$SRC" && mkdir -p "$SRC"
    # -m: fresh mtimes, so cargo rebuilds from the restored sources (an archive's older
    # times would pass for the previous variant's build).
    git -C "$ROOT" archive HEAD | tar -x -m -C "$SRC"
}

# patch FILE FROM TO: replace the one line FROM (a literal) with TO, or stop.
patch_line() {
    local file=$SRC/$1
    [ "$(grep -cF -- "$2" "$file")" = 1 ] || {
        echo "floor.sh: $1 no longer has exactly one line '$2'; update the variant in $0" >&2
        exit 2
    }
    FROM=$2 TO=$3 perl -pi -e 's/\Q$ENV{FROM}\E/$ENV{TO}/' "$file"
}

build() { # NAME
    (cd "$SRC" && cargo build --profile production --workspace --bin dnstap-analyser --bin dnstap-loadgen >&2)
    cp "$CARGO_TARGET_DIR/production/dnstap-analyser" "$OUT/bin/$1"
}

fresh_source
build whole
cp "$CARGO_TARGET_DIR/production/dnstap-loadgen" "$OUT/bin/dnstap-loadgen"
patch_line src/pipeline.rs \
    'batch.each(|ev, message| corr.on_event(ev, message, now, &mut sink));' 'drop(batch);'
build decode-only
fresh_source
patch_line src/ingest/mod.rs \
    'self.on_payload(payload, at + len - payload.len(), router);' 'let _ = (payload, &router);'
build frames-only

run() { # NAME BASELINE
    "$ROOT/benches/e2e.sh" --no-build --loadgen "$OUT/bin/dnstap-loadgen" ratio \
        --rounds "$ROUNDS" --sessions "$SESSIONS" --loadgen-args "$LG_ARGS" \
        --analyser "$OUT/bin/decode-only" --baseline "$OUT/bin/$2" --out "$OUT/$1" \
        > "$OUT/$1.log" 2>&1 || { tail -n 20 "$OUT/$1.log" >&2; exit 1; }
    grep -E '^(analyser|baseline)( median| CPU-s)' "$OUT/$1.log" | sed "s/^analyser/decode-only/; s/^baseline/$2/"
}
run against-whole whole
run against-frames frames-only
echo "results in $OUT"
