#!/bin/bash
# Stage 2 of the QEMU test-bed guest (PID 1 on the overlay of the host's root): private /proc,
# /sys, /run, /dev/shm (/tmp stays the overlay's: writes land in the guest's RAM, and the test
# binary may live under the host's /tmp); the modules flanneld's tests need; then the one payload command
# (written by the host as /frs-run/payload.sh), whose output and exit code go back through the
# run directory; then power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777 shm /dev/shm
mount -t tmpfs -o mode=0755 run /run
mkdir -p /run/lock /run/netns
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
hostname frs-guest
ip link set lo up
modprobe -a br_netfilter bridge veth vxlan tun wireguard ipip nf_tables \
    ip_tables iptable_filter iptable_nat nf_nat xt_MASQUERADE xt_comment xt_conntrack 2>/frs-run/modprobe.err
: > /frs-run/started
bash /frs-run/payload.sh > /frs-run/output 2>&1 < /dev/null
echo $? > /frs-run/status.tmp
sync
mv /frs-run/status.tmp /frs-run/status
sync
echo o > /proc/sysrq-trigger
sleep 60
