#!/usr/bin/env bash
# Builds the flannel-rs container image (default localhost/flannel-rs:dev) with podman from
# packaging/Containerfile, without any container registry:
#   1. a Debian bookworm base made by mmdebstrap (iptables, nftables, iproute2, ca-certificates),
#      cached as a tarball under /var/cache/flannel-rs and imported as localhost/debian-base:bookworm;
#   2. the release binaries built on this host (cargo build --release -p flanneld -p flannel-cni);
#   3. `podman build --target prebuilt` with BASE_IMAGE=<that base>, so the Containerfile's
#      Rust stage is never used (nor pulled).
# Prints the image id on stdout (everything else goes to stderr). Idempotent: when the binaries,
# the Containerfile and the base are unchanged, it only checks and prints the id.
# Needs root. Environment: FLANNEL_RS_IMAGE (image name), FLANNEL_RS_CACHE (cache dir),
# FLANNEL_RS_SKIP_CARGO=1 (use the existing release binaries as they are).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
image=${FLANNEL_RS_IMAGE:-localhost/flannel-rs:dev}
cache=${FLANNEL_RS_CACHE:-/var/cache/flannel-rs}
base=localhost/debian-base:bookworm
packages=iptables,nftables,iproute2,ca-certificates
mirror=http://deb.debian.org/debian
podman=(podman --runtime runc --cgroup-manager=cgroupfs)

log() { echo "image.sh: $*" >&2; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }
start=$(now)

for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null || { log "$tool missing (run scripts/install-deps.sh)"; exit 1; }
done

mkdir -p "$cache"
# One build at a time per machine (test processes and users may call this concurrently).
exec 9>"$cache/lock"
flock 9

# podman cannot set rlimits in this kind of sandbox unless the default ulimits are empty.
conf=/etc/containers/containers.conf
if ! grep -qs '^[[:space:]]*default_ulimits[[:space:]]*=' "$conf"; then
    mkdir -p "$(dirname "$conf")"
    if grep -qs '^[[:space:]]*\[containers\]' "$conf"; then
        sed -i '0,/^[[:space:]]*\[containers\]/s//&\ndefault_ulimits = []/' "$conf"
    else
        printf '[containers]\ndefault_ulimits = []\n' >>"$conf"
    fi
    log "set default_ulimits = [] in $conf"
fi

# 1. The base tarball (name keyed by what goes into it) and its import.
key=$(printf 'bookworm minbase %s %s v1' "$packages" "$mirror" | sha256sum | cut -c1-12)
tarball=$cache/debian-bookworm-$key.tar
if [ ! -s "$tarball" ] || [ ! -s "$tarball.sha256" ]; then
    t=$(now)
    tmp=$cache/.tmp-$$-base.tar
    trap 'rm -f "$tmp"' EXIT
    log "building the Debian base with mmdebstrap (a few minutes, once)"
    mmdebstrap --quiet --variant=minbase --include="$packages" \
        --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        bookworm "$tmp" \
        "deb $mirror bookworm main" "deb $mirror bookworm-updates main" \
        "deb http://deb.debian.org/debian-security bookworm-security main" >&2
    sha256sum "$tmp" | cut -d' ' -f1 >"$tarball.sha256"
    mv "$tmp" "$tarball"
    trap - EXIT
    log "base tarball $(du -h "$tarball" | cut -f1) in $(since "$t")"
fi
base_sum=$(cat "$tarball.sha256")
label() { "${podman[@]}" image inspect --format "{{index .Labels \"$2\"}}" "$1" 2>/dev/null || true; }
if [ "$(label "$base" io.flannel-rs.base)" != "$base_sum" ]; then
    t=$(now)
    old_base=$("${podman[@]}" image inspect --format '{{.Id}}' "$base" 2>/dev/null || true)
    "${podman[@]}" import --change "LABEL io.flannel-rs.base=$base_sum" --change 'CMD ["/bin/bash"]' \
        "$tarball" "$base" >/dev/null
    [ -z "$old_base" ] || "${podman[@]}" rmi "$old_base" >/dev/null 2>&1 || true
    log "imported $base in $(since "$t")"
fi
base_id=$("${podman[@]}" image inspect --format '{{.Id}}' "$base")

# 2. The binaries: release by default; FLANNEL_RS_IMAGE_PROFILE=debug takes the debug build
#    the test suite has just made (debug info stripped in the image), saving a release build.
cargo=${CARGO:-cargo}
profile=${FLANNEL_RS_IMAGE_PROFILE:-release}
# (debug builds the whole workspace, as the test command does, so the features match and the
# build is a no-op there instead of a rebuild of flanneld with other features.)
case "$profile" in
    release) cargo_profile=(--release -p flanneld -p flannel-cni) ;;
    debug) cargo_profile=(--workspace) ;;
    *) echo "FLANNEL_RS_IMAGE_PROFILE must be release or debug, not $profile" >&2; exit 2 ;;
esac
if [ "${FLANNEL_RS_SKIP_CARGO:-0}" != 1 ]; then
    t=$(now)
    "$cargo" build "${cargo_profile[@]}" >&2
    log "cargo build ($profile): $(since "$t")"
fi
target=$("$cargo" metadata --no-deps --format-version 1 | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bins=("$target/$profile/flanneld" "$target/$profile/flannel" "$target/$profile/mk-docker-opts")

# 3. The image, rebuilt only when its inputs changed.
fingerprint=$( (sha256sum "${bins[@]}" | cut -d' ' -f1; sha256sum packaging/Containerfile | cut -d' ' -f1;
    echo "$base_id") | sha256sum | cut -c1-32)
if [ "$(label "$image" io.flannel-rs.fingerprint)" != "$fingerprint" ]; then
    t=$(now)
    old=$("${podman[@]}" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
    ctx=$(mktemp -d "$cache/ctx.XXXXXX")
    trap 'rm -rf "$ctx"' EXIT
    mkdir "$ctx/bin"
    cp "${bins[@]}" "$ctx/bin/"
    if [ "$profile" = debug ]; then
        strip --strip-debug "$ctx"/bin/*
    fi
    "${podman[@]}" build --runtime runc --network=none --pull=never --layers=false \
        --target prebuilt --build-arg BASE_IMAGE="$base" --build-arg PREBUILT_DIR=bin \
        --label io.flannel-rs.fingerprint="$fingerprint" \
        -t "$image" -f "$root/packaging/Containerfile" "$ctx" >&2
    rm -rf "$ctx"
    trap - EXIT
    # The previous build of this image, now untagged (kept if a container still uses it).
    if [ -n "$old" ] && [ "$old" != "$("${podman[@]}" image inspect --format '{{.Id}}' "$image")" ]; then
        "${podman[@]}" rmi "$old" >/dev/null 2>&1 || true
    fi
    log "built $image in $(since "$t")"
fi
"${podman[@]}" image inspect --format '{{.Id}}' "$image"
log "done in $(since "$start")"
