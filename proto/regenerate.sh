#!/usr/bin/env bash
# Regenerates src/dnstap/pb.rs from proto/dnstap.proto with quick-protobuf's generator.
# Needs: cargo install pb-rs --version 0.10.0
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
pb-rs --single-mod --output "$out/dnstap.rs" proto/dnstap.proto
# The generated "use super::*" would leak the parent module into the schema types.
sed "/^use super::\*;$/d" "$out/dnstap.rs" > src/dnstap/pb.rs
rm -rf "$out"
