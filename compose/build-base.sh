#!/usr/bin/env bash
# Build the local base image zkv-base:bookworm without any registry:
# debootstrap a minimal Debian bookworm rootfs and `docker import` it.
#
# Idempotent: if the tag already exists it is reused (set ZKV_BASE_REBUILD=1 to force).
# The rootfs lives in a temp dir that is removed on exit, success or not.
#
# Env: ZKV_BASE_IMAGE (default zkv-base:bookworm), DEBIAN_MIRROR
#      (default http://deb.debian.org/debian), ZKV_BASE_REBUILD=1.
set -euo pipefail

IMAGE="${ZKV_BASE_IMAGE:-zkv-base:bookworm}"
SUITE="bookworm"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PACKAGES="python3,python3-venv,python3-pip,ca-certificates,iptables,iproute2,procps"

log() { printf '[build-base] %s\n' "$*" >&2; }
die() { printf '[build-base] ERROR: %s\n' "$*" >&2; exit 1; }

command -v docker >/dev/null 2>&1 || die "docker CLI not found"
docker info >/dev/null 2>&1 || die "no Docker engine reachable (is dockerd running, may you use it?)"

if [[ "${ZKV_BASE_REBUILD:-0}" != "1" ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "reusing existing image $IMAGE ($(docker image inspect -f '{{.Id}}' "$IMAGE" | cut -c1-19))"
    exit 0
fi

SUDO=""
if [[ "$(id -u)" != "0" ]]; then
    command -v sudo >/dev/null 2>&1 || die "debootstrap needs root and sudo is not available"
    SUDO="sudo"
fi

if ! command -v debootstrap >/dev/null 2>&1 && [[ ! -x /usr/sbin/debootstrap ]]; then
    log "debootstrap not found: installing it with apt-get"
    $SUDO apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq debootstrap \
        || die "could not install debootstrap"
fi
DEBOOTSTRAP="$(command -v debootstrap || echo /usr/sbin/debootstrap)"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/zkv-rootfs.XXXXXX")"
cleanup() {
    # The rootfs holds root-owned device nodes: remove with the same privileges.
    $SUDO rm -rf --one-file-system "$WORK" 2>/dev/null || true
}
trap cleanup EXIT
ROOTFS="$WORK/rootfs"

start=$(date +%s)
log "debootstrap $SUITE (minbase + $PACKAGES) from $MIRROR into $ROOTFS"
if ! $SUDO "$DEBOOTSTRAP" --variant=minbase --include="$PACKAGES" \
        "$SUITE" "$ROOTFS" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
    tail -n 30 "$WORK/debootstrap.log" >&2 || true
    die "debootstrap failed (see log above; is $MIRROR reachable from this host?)"
fi

# Slim the image: package lists and caches are useless without an index anyway.
$SUDO rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
    "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* 2>/dev/null || true

log "importing rootfs as $IMAGE"
$SUDO tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    - "$IMAGE" >/dev/null || die "docker import failed"

docker run --rm "$IMAGE" python3 -c 'import sys, venv; print(sys.version.split()[0])' \
    >/dev/null || die "imported image $IMAGE has no working python3"
log "built $IMAGE in $(( $(date +%s) - start ))s: $(docker run --rm "$IMAGE" python3 --version)"
