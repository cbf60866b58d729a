#!/usr/bin/env bash
# Benchmark: underlay vs host-gw vs vxlan pod-to-pod throughput and latency, side by side.
# Needs root (namespaces). Extra arguments go to frs-bench (--seconds, --streams, --rounds).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --workspace --release
exec ./target/release/frs-bench "$@"
