#!/usr/bin/env bash
# Build the local base image sandbay's agent image starts from, without an image registry:
# debootstrap a Debian rootfs into a folder, then `docker import` it. Idempotent: does nothing
# when the image exists, and reuses a finished rootfs folder.
#
# Usage: .ci/base-image.sh [ROOTFS_DIR]
#   ROOTFS_DIR             where to debootstrap (default $SANDBAY_ROOTFS or a temporary dir)
#   SANDBAY_BASE_IMAGE     image to create (default sandbay-base:bookworm)
#   SANDBAY_DEBIAN_MIRROR  Debian mirror (default http://deb.debian.org/debian)
set -euo pipefail

image="${SANDBAY_BASE_IMAGE:-sandbay-base:bookworm}"
suite="bookworm"
mirror="${SANDBAY_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
packages="python3,python3-venv,python3-pip,ca-certificates,procps"

log() { printf 'base-image: %s\n' "$*" >&2; }

if ! command -v docker >/dev/null 2>&1; then
    log "docker CLI not found; install docker.io and start dockerd"
    exit 1
fi

if docker image inspect "$image" >/dev/null 2>&1; then
    log "$image already exists; nothing to do"
    exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    # debootstrap needs root (chroot, device nodes, file ownership).
    sudo=(sudo)
fi

cleanup_dir=""
rootfs="${1:-${SANDBAY_ROOTFS:-}}"
if [ -z "$rootfs" ]; then
    rootfs="$(mktemp -d -t sandbay-rootfs.XXXXXX)"
    cleanup_dir="$rootfs"
fi
cleanup() {
    if [ -n "$cleanup_dir" ]; then
        "${sudo[@]}" rm -rf --one-file-system "$cleanup_dir"
    fi
}
trap cleanup EXIT

# A finished debootstrap has python3 and no leftover /debootstrap work folder.
if [ -x "$rootfs/usr/bin/python3" ] && [ -f "$rootfs/var/lib/dpkg/status" ] \
    && [ ! -e "$rootfs/debootstrap" ]; then
    log "reusing the rootfs in $rootfs"
else
    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap"
        "${sudo[@]}" apt-get update -qq
        DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq debootstrap
    fi
    if [ -e "$rootfs/debootstrap" ]; then
        log "$rootfs holds an unfinished debootstrap; starting over"
        "${sudo[@]}" rm -rf --one-file-system "$rootfs"
    fi
    mkdir -p "$rootfs"
    log "debootstrapping $suite into $rootfs (a few minutes)"
    "${sudo[@]}" debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror"
fi

log "importing $rootfs as $image"
# Package lists and downloaded .debs are dropped: `apt-get update` restores them when needed.
"${sudo[@]}" tar -C "$rootfs" --numeric-owner \
    --exclude='./var/lib/apt/lists/*_*' --exclude='./var/cache/apt/*.bin' \
    --exclude='./var/cache/apt/archives/*.deb' \
    --exclude='./proc/*' --exclude='./sys/*' \
    -c . \
    | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase $suite ($packages)" \
        - "$image" >/dev/null

docker run --rm --network none "$image" python3 -c 'import ensurepip, sys; print(sys.version)' >&2
log "built $image"
