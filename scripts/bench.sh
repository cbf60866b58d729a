#!/usr/bin/env bash
# Benchmarks (release build, needs root for namespaces):
#   ./scripts/bench.sh [--seconds N] [--streams N] [--rounds N] [--modes a,b,..]
#       data path: underlay vs host-gw vs vxlan vs udp vs wireguard (and wireguard-go),
#       pod-to-pod throughput and latency;
#   ./scripts/bench.sh --uml --modes underlay,host-gw,vxlan,ipip,ipsec [...]
#       the same inside a user-mode-linux guest (a kernel with ipip and ESP; one CPU: ratios only);
#   ./scripts/bench.sh kube [--nodes N] [--adds N] [--heartbeats N]
#       kube mode: one flanneld against N kubelet-shaped Nodes (memory, start-up, event latency);
#   ./scripts/bench.sh ops [--leases N] [--scrapes N] [--doctor-runs N]
#       /metrics scrape cost and `flanneld doctor` time with N leases programmed.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --workspace --release
if [ "${1:-}" = kube ]; then
    shift
    exec ./target/release/frs-kube-bench "$@"
fi
if [ "${1:-}" = ops ]; then
    shift
    exec ./target/release/frs-ops-bench "$@"
fi
exec ./target/release/frs-bench "$@"
