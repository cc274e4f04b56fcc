#!/usr/bin/env bash
# Build the base images from Debian's packages, for a machine that reaches Debian's mirror but no
# image registry (docker.io): mmdebstrap makes a minimal bookworm root file system with the
# packages each image needs, `<engine> import` turns it into an image, and a small Containerfile
# (deploy/images/<name>/) adds the user, entrypoint and healthcheck the compose file expects.
#
#   deploy/images/build-base.sh [python|postgres|redis ...]   (all three by default)
#
# An image that exists already is kept (FORCE=1 rebuilds). Names (override by variable):
#   BASE_IMAGE      localhost/loopwise-connect-base:bookworm      python3 3.11, venv, CA bundle
#   POSTGRES_IMAGE  localhost/loopwise-connect-postgres:15        postgresql-15, as postgres:15
#   REDIS_IMAGE     localhost/loopwise-connect-redis:7            redis-server 7, as redis:7
set -euo pipefail
cd "$(dirname "$0")/../.."

ENGINE=${CONTAINER_ENGINE:-podman}
if [ "$ENGINE" = podman ]; then
  export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}
fi
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-}
BASE_IMAGE=${BASE_IMAGE:-localhost/loopwise-connect-base:bookworm}
POSTGRES_IMAGE=${POSTGRES_IMAGE:-localhost/loopwise-connect-postgres:15}
REDIS_IMAGE=${REDIS_IMAGE:-localhost/loopwise-connect-redis:7}

log() { printf '== %s\n' "$*" >&2; }

exists() { "$ENGINE" image inspect "$1" >/dev/null 2>&1; }

# mmdebstrap's root file system as a single-layer image named $1 with Debian packages $2.
rootfs_image() {
  local name=$1 packages=$2 tar
  shift 2
  tar=$(mktemp --suffix=.tar)
  # --variant=minbase: no init, no apt recommends; docs, man pages and apt lists are dropped
  # (they are half of a minimal Debian and nothing in a container reads them).
  # merged-usr by symlinks: bookworm's way installs usrmerge, which pulls 46 MB of Perl in.
  mmdebstrap --quiet --variant=minbase --include="$packages" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' "$@" \
    "$SUITE" "$tar" ${MIRROR:+"$MIRROR"}
  "$ENGINE" import --change 'CMD ["/bin/bash"]' "$tar" "$name" >/dev/null
  rm -f "$tar"
}

build() {
  local what=$1 image=$2 packages=$3
  shift 3
  if exists "$image" && [ -z "${FORCE:-}" ]; then
    log "$what: $image exists"
    return
  fi
  local started=$SECONDS
  log "$what: mmdebstrap $SUITE with $packages"
  rootfs_image "$image-rootfs" "$packages" "$@"
  if [ -d "deploy/images/$what" ]; then
    local format=()
    # Podman writes OCI images by default, which keep no HEALTHCHECK.
    [ "$ENGINE" = podman ] && format=(--format docker)
    "$ENGINE" build --quiet "${format[@]}" --build-arg ROOTFS="$image-rootfs" -t "$image" \
      "deploy/images/$what" >/dev/null
    "$ENGINE" rmi "$image-rootfs" >/dev/null
  else
    "$ENGINE" tag "$image-rootfs" "$image"
    "$ENGINE" rmi "$image-rootfs" >/dev/null
  fi
  log "$what: $image built in $((SECONDS - started)) s"
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(python postgres redis)
for target in "${targets[@]}"; do
  case $target in
    python) build python "$BASE_IMAGE" python3,python3-venv,ca-certificates ;;
    # The package makes a cluster 15/main on install; the image makes its own on first start.
    postgres) build postgres "$POSTGRES_IMAGE" postgresql-15 \
      --customize-hook='chroot "$1" pg_dropcluster 15 main' ;;
    redis) build redis "$REDIS_IMAGE" redis-server ;;
    *) log "unknown image $target (python, postgres, redis)"; exit 2 ;;
  esac
done
