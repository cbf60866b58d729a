#!/bin/busybox sh
# Stage 1 of the QEMU test-bed guest (PID 1 in the initramfs that testbed::qemu builds): load the
# virtio and 9p modules, mount the host's root read-only over virtio-9p under a tmpfs overlay (so
# nothing the guest writes reaches the host's disk), mount the run directory (the only host
# directory the guest can write), and switch_root into stage 2.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {
    echo "frs-guest: $*"
    echo o > /proc/sysrq-trigger
    sleep 60
}
for m in /modules/*.ko; do
    insmod "$m" || fail "insmod $m failed"
done
mount -t 9p -o ro,trans=virtio,version=9p2000.L,cache=loose,msize=512000 hostroot /lower \
    || fail "mounting the host root over 9p failed"
mount -t tmpfs -o mode=0755 upper /upper
mkdir -p /upper/data /upper/work
mount -t overlay -o lowerdir=/lower,upperdir=/upper/data,workdir=/upper/work root /newroot \
    || fail "overlay mount failed"
mkdir -p /newroot/frs-run
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 frsrun /newroot/frs-run \
    || fail "mounting the run directory failed"
mount --move /dev /newroot/dev
umount /sys /proc
exec switch_root /newroot /bin/bash /frs-run/stage2.sh
fail "switch_root failed"
