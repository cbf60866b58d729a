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
# Kernel WireGuard tests (crates/testbed/src/qemu.rs): a QEMU guest (software emulation) booting
# Debian's stock kernel, busybox for its initramfs, xz to unpack the kernel, wg to read state back.
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
installed() { [ "$(dpkg-query -W -f '${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]; }
installed linux-image-amd64 || need+=(linux-image-amd64)
installed busybox-static || need+=(busybox-static)
command -v xz >/dev/null || need+=(xz-utils)
command -v wg >/dev/null || need+=(wireguard-tools)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${need[@]}" >/dev/null
fi
# The wireguard backend's tests and benchmark: Debian's user-space wireguard-go and `wg`
# (interop peer and reference), nsenter (util-linux) to reach their mount namespaces.
wg_need=()
command -v wireguard-go >/dev/null || wg_need+=(wireguard-go)
command -v wg >/dev/null || wg_need+=(wireguard-tools)
command -v nsenter >/dev/null || wg_need+=(util-linux)
if [ ${#wg_need[@]} -gt 0 ]; then
    echo "installing: ${wg_need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${wg_need[@]}" >/dev/null
fi
