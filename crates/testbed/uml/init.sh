#!/bin/sh
# PID 1 of the user-mode-linux guest (see crates/testbed/src/uml.rs).
#
# The kernel mounted the host's root through hostfs, where every write would land on the host's
# disk. So: put an overlay over it (upper = tmpfs) and chroot into that, give the guest its own
# proc/sys/dev/run (/tmp stays the overlay's: writes stay in RAM, and the test binary may live
# under the host's /tmp), mount only the result directory from the host (hostfs, read-write), load
# the modules the tests need, switch iptables to the legacy backend, run the payload, pass its exit
# code out through the result directory and power off. FRS_RESULT arrives as an environment
# variable from the kernel command line.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Keep glibc off AVX-512: UML 6.1 saves FPU state only up to the AVX (ymm) registers.
export GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX512ER,-AVX512PF
if [ -z "$FRS_STAGE2" ]; then
    KVER=$(uname -r)
    mount -t proc proc /proc
    mount -t tmpfs -o size=1200m tmpfs /run
    insmod /usr/lib/uml/modules/$KVER/kernel/fs/overlayfs/overlay.ko || { echo "frs-uml: no overlay module"; poweroff -f; }
    mkdir -p /run/ov/upper /run/ov/work /run/ov/root
    mount -t overlay overlay -o lowerdir=/,upperdir=/run/ov/upper,workdir=/run/ov/work /run/ov/root \
        || { echo "frs-uml: overlay mount failed"; poweroff -f; }
    umount /proc
    export FRS_STAGE2=1 KVER
    exec chroot /run/ov/root /bin/sh "$0"
fi
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mkdir -p /lib/modules/$KVER
mount --bind /usr/lib/uml/modules/$KVER /lib/modules/$KVER
mkdir -p /frs-result
mount -t hostfs -o "$FRS_RESULT" none /frs-result || { echo "frs-uml: result dir mount failed"; poweroff -f; }
modprobe -a -q ipip esp4 xfrm_user af_key br_netfilter veth bridge vxlan tun \
    ip_tables iptable_filter iptable_nat iptable_mangle nf_conntrack nf_nat xt_MASQUERADE \
    xt_conntrack xt_comment xt_mark xt_addrtype xt_multiport nf_reject_ipv4 ipt_REJECT \
    ip6_tables ip6table_filter ip6table_nat 2>/frs-result/modprobe.log
update-alternatives --quiet --set iptables /usr/sbin/iptables-legacy
update-alternatives --quiet --set ip6tables /usr/sbin/ip6tables-legacy
ip link set lo up
date +%s.%N > /frs-result/payload-start
/bin/sh /frs-result/payload.sh > /frs-result/output 2>&1
echo $? > /frs-result/rc.tmp
mv /frs-result/rc.tmp /frs-result/rc
sync
poweroff -f
