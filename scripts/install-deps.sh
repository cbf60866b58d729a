#!/usr/bin/env bash
# Installs the system packages flannel-rs needs to build, test and demo on Debian 12.
set -euo pipefail
need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v iptables >/dev/null || need+=(iptables)
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
command -v openssl >/dev/null || need+=(openssl)
command -v iperf3 >/dev/null || need+=(iperf3)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v bridge >/dev/null || need+=(iproute2)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
# The container image test (scripts/image.sh): podman with runc, and mmdebstrap for the base.
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
# Operations: promtool checks the /metrics exposition.
command -v promtool >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for a dpkg lock held by another installer instead of failing.
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${need[@]}" >/dev/null
fi
# The user-mode-linux test-bed (crates/testbed/src/uml.rs): a kernel with ipip/ESP/XFRM as a
# process; kmod for modprobe in the guest, iptables-legacy (the guest has no nf_tables for ip).
need_uml=()
command -v linux.uml >/dev/null || need_uml+=(user-mode-linux)
command -v modprobe >/dev/null || need_uml+=(kmod)
command -v iptables-legacy >/dev/null || need_uml+=(iptables)
if [ ${#need_uml[@]} -gt 0 ]; then
    echo "installing: ${need_uml[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq -o DPkg::Lock::Timeout=600 "${need_uml[@]}" >/dev/null
fi
