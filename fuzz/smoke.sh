#!/usr/bin/env bash
# Builds the AFL++ fuzz targets (afl.rs, stable toolchain) and fuzzes each for a bounded time.
# Fails on any crash, and on any committed regression input that breaks its property again.
#
#   fuzz/smoke.sh                      # 30 s per target, 2 targets at a time
#   FUZZ_SECONDS=900 FUZZ_KEEP_GOING=1 FUZZ_OUT=long fuzz/smoke.sh [TARGET...]   # a longer run
#
# Needs: cargo, a C compiler and make (AFL++ is built from the source cargo-afl ships), and
# crates.io the first time (cargo-afl is installed with `cargo install` when missing).
# Outputs go to fuzz/out/<target>/ (AFL's queue, crashes, fuzzer_stats); see docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")"

AFL_RS_VERSION=0.18.2
SECONDS_PER_TARGET=${FUZZ_SECONDS:-30}
JOBS=${FUZZ_JOBS:-2}
OUT=${FUZZ_OUT:-out}
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(framestream dnstap_scan dns_question pipeline)

# The fuzz crate is outside the main workspace, so the root `cargo fmt --all` does not see it.
cargo fmt --check

if ! cargo afl --version 2>/dev/null | grep -q "^cargo-afl $AFL_RS_VERSION "; then
    # Installing cargo-afl also builds AFL++ for the current toolchain.
    cargo install cargo-afl --version "$AFL_RS_VERSION" --locked
fi
# AFL++'s runtime is built per rustc version: build it when this toolchain has none yet (a
# toolchain updated since the install). "Already built" is the usual answer, not a failure.
if ! built=$(cargo afl config --build 2>&1) && ! grep -q "already built" <<<"$built"; then
    echo "$built"
    exit 1
fi

# cargo-afl turns overflow checks on for every crate; the analyser ships without them, and
# quick-protobuf 0.8.1 underflows on malformed nested lengths (harmless wrap-around in a
# release build: docs/fuzzing.md, "Build note"). Fuzz what ships; debug assertions stay on.
# Not --locked: the analyser's own dependencies are locked by the root Cargo.lock, and a
# dependency added there must not break this build until fuzz/Cargo.lock catches up.
RUSTFLAGS="-C overflow-checks=off" cargo afl build --release

# Every committed input must still pass its target's checks before anything new is looked for.
for t in "${TARGETS[@]}"; do
    if [ -d "regressions/$t" ]; then
        target/release/replay "$t" "regressions/$t" 2>/dev/null
    fi
done

CORPUS=$(mktemp -d)
trap 'rm -rf "$CORPUS"' EXIT
target/release/seeds ../tests/fixtures "$CORPUS"

export AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_NO_UI=1 \
    AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_QUIET=1
# A smoke run stops a target at its first crash; a long run (FUZZ_KEEP_GOING=1) collects them.
[ -n "${FUZZ_KEEP_GOING:-}" ] || export AFL_BENCH_UNTIL_CRASH=1
mkdir -p "$OUT"
fuzz_one() {
    local t=$1
    rm -rf "${OUT:?}/$t"
    # -t: the pipeline target starts threads per input; a loaded CI machine needs slack.
    cargo afl fuzz -V "$SECONDS_PER_TARGET" -t 5000 -i "$CORPUS/$t" -o "$OUT/$t" \
        "target/release/$t" >"$OUT/$t.log" 2>&1 || true
}
running=0
for t in "${TARGETS[@]}"; do
    fuzz_one "$t" &
    running=$((running + 1))
    if [ "$running" -ge "$JOBS" ]; then
        wait -n || true
        running=$((running - 1))
    fi
done
wait

failed=0
for t in "${TARGETS[@]}"; do
    dir="$OUT/$t/default"
    if [ ! -f "$dir/fuzzer_stats" ]; then
        echo "fuzz $t: afl-fuzz did not run:"
        tail -20 "$OUT/$t.log"
        failed=1
        continue
    fi
    stat() { sed -n "s/^$1 *: //p" "$dir/fuzzer_stats"; }
    crashes=$(find "$dir/crashes" -type f ! -name README.txt | wc -l)
    hangs=$(find "$dir/hangs" -type f | wc -l)
    echo "fuzz $t: $(stat execs_done) execs ($(stat execs_per_sec)/s), edges $(stat edges_found)/$(stat total_edges) ($(stat bitmap_cvg)), corpus $(stat corpus_count), crashes $crashes, hangs $hangs"
    if [ "$crashes" -gt 0 ]; then
        failed=1
        for c in $(find "$dir/crashes" -type f ! -name README.txt | head -3); do
            echo "--- $c"
            RUST_BACKTRACE=1 "target/release/$t" <"$c" 2>&1 | grep -v '^ *at /rustc' | head -40 || true
        done
    fi
done
if [ "$failed" -ne 0 ]; then
    echo "fuzz smoke: FAILED (crash inputs under fuzz/$OUT/<target>/default/crashes)"
    exit 1
fi
echo "fuzz smoke: ${#TARGETS[@]} targets, no crashes"
