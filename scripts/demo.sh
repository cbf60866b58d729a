#!/usr/bin/env bash
# The main job: builds flannel-rs and runs a local demo cluster in network namespaces.
# Needs root (namespaces); touches nothing in the root namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --workspace
exec ./target/debug/frs-demo "$@"
