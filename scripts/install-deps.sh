#!/usr/bin/env bash
# Installs the system packages flannel-rs needs to build, test and demo on Debian 12
# (one apt transaction for whatever is missing; a no-op when everything is there).
set -euo pipefail
need=()
installed() { [ "$(dpkg-query -W -f '${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]; }
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
command -v curl >/dev/null || need+=(curl)
command -v cc >/dev/null || need+=(gcc)
[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
# The container image test (scripts/image.sh): podman with runc, and mmdebstrap for the base.
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
# Operations: promtool checks the /metrics exposition.
command -v promtool >/dev/null || need+=(prometheus)
# Kernel WireGuard tests (crates/testbed/src/qemu.rs): a QEMU guest (software emulation) booting
# Debian's stock kernel, busybox for its initramfs, xz to unpack the kernel, wg to read state back.
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
installed linux-image-amd64 || need+=(linux-image-amd64)
installed busybox-static || need+=(busybox-static)
command -v xz >/dev/null || need+=(xz-utils)
# The wireguard backend's tests and benchmark: Debian's user-space wireguard-go and `wg`
# (interop peer and reference), nsenter (util-linux) to reach their mount namespaces.
command -v wireguard-go >/dev/null || need+=(wireguard-go)
command -v wg >/dev/null || need+=(wireguard-tools)
command -v nsenter >/dev/null || need+=(util-linux)
# The user-mode-linux test-bed (crates/testbed/src/uml.rs): a kernel with ipip/ESP/XFRM as a
# process; kmod for modprobe in the guest, iptables-legacy (the guest has no nf_tables for ip).
command -v linux.uml >/dev/null || need+=(user-mode-linux)
command -v modprobe >/dev/null || need+=(kmod)
command -v iptables-legacy >/dev/null || need+=(iptables)
# The ipsec backend (tests in the UML guest): strongSwan's charon, and swanctl (the package also
# holds charon's vici plugin, the socket flanneld talks to).
[ -x /usr/lib/ipsec/charon ] || need+=(strongswan-charon)
[ -e /usr/lib/ipsec/plugins/libstrongswan-vici.so ] || need+=(strongswan-swanctl)
# The cloud-route tests (moto, the providers' SDKs) are installed with pip, below.
python3 -m pip --version >/dev/null 2>&1 || need+=(python3-pip)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Wait for a dpkg lock held by another installer instead of failing.
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${need[@]}" >/dev/null
fi
# The cloud-route backends' tests drive the fake clouds with the real clients: moto in server
# mode (the fake EC2/IAM/STS) with boto3, the Tencent Cloud SDK and Google's API client. Pinned;
# skipped when the pinned versions are importable. Debian's python marks itself externally
# managed; these are test tools, installed for root.
MOTO_VERSION=5.2.1
if ! python3 -c "import boto3, flask, flask_cors, moto, moto.server, tencentcloud.vpc.v20170312, googleapiclient.discovery; assert moto.__version__ == '$MOTO_VERSION'" 2>/dev/null; then
    echo "installing: moto[server]==$MOTO_VERSION, tencentcloud-sdk-python, google-api-python-client (pip)"
    python3 -m pip install -q --root-user-action=ignore --break-system-packages \
        "moto[server]==$MOTO_VERSION" boto3 \
        tencentcloud-sdk-python-common==3.1.195 tencentcloud-sdk-python-vpc==3.1.193 \
        google-api-python-client==2.202.0 >/dev/null
fi
