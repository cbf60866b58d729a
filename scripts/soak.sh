#!/usr/bin/env bash
# Soak run (release build, needs root for namespaces): N hosts with churn for a given time,
# reporting drift, convergence, packet loss, memory and descriptor growth.
#   ./scripts/soak.sh [--hosts 4] [--seconds 1800]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --workspace --release
exec ./target/release/frs-soak "$@"
