#!/usr/bin/env bash
# Checks that two builds print the same lines for every capture under tests/fixtures:
# `read FILE --log all --shards 1`, lines sorted (lookup lines and session lines interleave as
# the threads run), and the same exit summary on stderr.
# Usage: benches/same_lines.sh BEFORE_BINARY [AFTER_BINARY (default target/release/dnstap-analyser)]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BEFORE=${1:?usage: same_lines.sh BEFORE_BINARY [AFTER_BINARY]}
AFTER=${2:-$ROOT/target/release/dnstap-analyser}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
status=0 files=0
while IFS= read -r f; do
    files=$((files + 1))
    for side in before after; do
        bin=$BEFORE; [ $side = after ] && bin=$AFTER
        "$bin" read "$f" --log all --shards 1 2>"$TMP/$side.err" | sort >"$TMP/$side.out" || true
        grep '^{"summary"' "$TMP/$side.err" >"$TMP/$side.sum" || true
    done
    if ! cmp -s "$TMP/before.out" "$TMP/after.out" || ! cmp -s "$TMP/before.sum" "$TMP/after.sum"; then
        echo "DIFFERS: $f" >&2
        diff "$TMP/before.out" "$TMP/after.out" | head -5 >&2 || true
        diff "$TMP/before.sum" "$TMP/after.sum" | head -5 >&2 || true
        status=1
    fi
done < <(find "$ROOT/tests/fixtures" -name '*.fstrm' | sort)
echo "$files captures compared: $([ $status = 0 ] && echo 'all the same' || echo 'some differ')"
exit $status
