#!/usr/bin/env bash
# `make up` / `make down`: the whole system in containers, in one command, for a maintainer and
# for CI. `deploy/up.sh [up|down|images]`.
#
#   up      build the base images if missing (where they are built locally), build the
#           application image, start PostgreSQL and Redis, wait for them, start the rest, wait
#           until the gateway answers, print the URLs and the admin logins, and each step's time
#   down    stop and remove the containers (CONNECT_DOWN_VOLUMES=1: the volumes too)
#   images  only build the images (and print their sizes)
#
# Variables:
#   CONTAINER_ENGINE     docker | podman (default: docker if its engine answers, else podman)
#   LOCAL_BASE_IMAGES    yes | no | auto: build python/PostgreSQL/Redis images from Debian's
#                        packages (deploy/images/build-base.sh) instead of pulling python:3.11-slim,
#                        postgres:15-alpine, redis:7-alpine; auto = yes for Podman with mmdebstrap
#   BASE_IMAGE, POSTGRES_IMAGE, REDIS_IMAGE, CONNECT_IMAGE   the images themselves
#   CONNECT_HTTP_PORT    the gateway's published port and the public URLs' port (8080)
#   CONNECT_DEMO_ADMIN_PASSWORD  admin@demo.example.com's password (generated and printed if unset)
#   COMPOSE_PROJECT_NAME the compose project (loopwise-connect), to run two side by side
#   CONNECT_UP_TIMEOUT   seconds to wait for the gateway (180)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
action=${1:-up}

log() { printf '== %s\n' "$*" >&2; }
die() { printf 'deploy/up.sh: %s\n' "$*" >&2; exit 1; }

ENGINE=${CONTAINER_ENGINE:-}
if [ -z "$ENGINE" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then ENGINE=docker
  elif command -v podman >/dev/null 2>&1; then ENGINE=podman
  else die "no container engine: install Docker or Podman, or set CONTAINER_ENGINE"; fi
fi
case $ENGINE in
  docker) COMPOSE=(docker compose) ;;
  podman)
    # runc, cgroupfs, no rlimits: the project's settings, never /etc's (deploy/podman/).
    export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/deploy/podman/containers.conf}
    if [ -x "$ROOT/.venv/bin/podman-compose" ]; then COMPOSE=("$ROOT/.venv/bin/podman-compose")
    elif command -v podman-compose >/dev/null 2>&1; then COMPOSE=(podman-compose)
    else die "podman-compose is missing: run make install (it is in requirements.lock)"; fi ;;
  *) die "CONTAINER_ENGINE must be docker or podman, got $ENGINE" ;;
esac
command -v "$ENGINE" >/dev/null 2>&1 || die "$ENGINE is not installed"
export CONTAINER_ENGINE=$ENGINE

LOCAL=${LOCAL_BASE_IMAGES:-auto}
if [ "$LOCAL" = auto ]; then
  if [ "$ENGINE" = podman ] && command -v mmdebstrap >/dev/null 2>&1; then LOCAL=yes; else LOCAL=no; fi
fi
if [ "$LOCAL" = yes ]; then
  export BASE_IMAGE=${BASE_IMAGE:-localhost/loopwise-connect-base:bookworm}
  export POSTGRES_IMAGE=${POSTGRES_IMAGE:-localhost/loopwise-connect-postgres:15}
  export REDIS_IMAGE=${REDIS_IMAGE:-localhost/loopwise-connect-redis:7}
fi
export BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}
export CONNECT_IMAGE=${CONNECT_IMAGE:-localhost/loopwise-connect:dev}
export CONNECT_HTTP_PORT=${CONNECT_HTTP_PORT:-8080}
export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-loopwise-connect}
COMPOSE+=(-p "$COMPOSE_PROJECT_NAME" -f "$ROOT/deploy/docker-compose.yml")

compose() { "${COMPOSE[@]}" "$@"; }

# The container of a compose service, by the labels both Docker Compose and podman-compose set.
container_of() {
  "$ENGINE" ps -a -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" \
    --filter "label=com.docker.compose.service=$1" | head -n1
}

size_mb() { "$ENGINE" image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1 / 1e6}'; }

build_images() {
  local started=$SECONDS
  if [ "$LOCAL" = yes ]; then
    deploy/images/build-base.sh python postgres redis
  fi
  log "images: base images ready in $((SECONDS - started)) s"
  started=$SECONDS
  local args=(build -f deploy/Dockerfile -t "$CONNECT_IMAGE" --build-arg "BASE_IMAGE=$BASE_IMAGE")
  # pip reaches PyPI from the build: on the host's network, with the host's CA bundle (a
  # TLS-inspecting proxy's root is in it where there is one), passed as a build secret.
  local ca=${PIP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
  [ -s "$ca" ] && args+=(--secret "id=pip_ca,src=$ca")
  args+=(--network host)
  # Podman writes OCI images by default, which have no HEALTHCHECK.
  [ "$ENGINE" = podman ] && args+=(--format docker)
  "$ENGINE" "${args[@]}" . >&2
  log "images: $CONNECT_IMAGE built in $((SECONDS - started)) s"
  for image in "$CONNECT_IMAGE" "$BASE_IMAGE" "$POSTGRES_IMAGE" "$REDIS_IMAGE"; do
    "$ENGINE" image inspect "$image" >/dev/null 2>&1 && log "size: $image $(size_mb "$image")"
  done
  return 0
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2 deadline=$((SECONDS + $1))
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { log "$what: not ready after $limit s"; return 1; }
    sleep 1
  done
}

gateway_ready() {
  python3 - "$CONNECT_HTTP_PORT" <<'PY'
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
}

show_failure() {
  compose ps >&2 || true
  for service in migrate identity school-api webhooks gateway; do
    local id
    id=$(container_of "$service")
    [ -n "$id" ] && { log "logs: $service"; "$ENGINE" logs --tail 30 "$id" >&2 || true; }
  done
  return 0
}

up() {
  local started=$SECONDS
  build_images
  local step=$SECONDS
  # The stores first, until they answer: Podman before 4.6 runs no healthchecks without systemd
  # and podman-compose then skips `condition: service_healthy`; Docker needs none of this.
  compose up -d postgres redis >&2
  local pg redis
  pg=$(container_of postgres) redis=$(container_of redis)
  wait_for 90 postgres "$ENGINE" exec "$pg" pg_isready -U postgres -h 127.0.0.1
  wait_for 60 redis "$ENGINE" exec "$redis" redis-cli ping
  log "up: PostgreSQL and Redis ready in $((SECONDS - step)) s"
  step=$SECONDS
  # Then migrate to its end, then the services, each step told not to start what it depends
  # on: podman-compose turns depends_on into `podman run --requires`, and Podman 4.3 cannot
  # start a container whose requirement (migrate) has exited and requires others in turn.
  compose up -d --no-deps migrate >&2
  local migrate
  migrate=$(container_of migrate)
  "$ENGINE" wait "$migrate" >/dev/null
  if [ "$("$ENGINE" inspect --format '{{.State.ExitCode}}' "$migrate")" != 0 ]; then
    show_failure
    die "migrate --demo failed"
  fi
  log "up: migrated and seeded in $((SECONDS - step)) s"
  step=$SECONDS
  compose up -d --no-deps identity school-api webhooks gateway >&2
  if ! wait_for "${CONNECT_UP_TIMEOUT:-180}" gateway gateway_ready; then
    show_failure
    die "the gateway did not turn ready on port $CONNECT_HTTP_PORT"
  fi
  log "up: services ready in $((SECONDS - step)) s; make up took $((SECONDS - started)) s in all"
  cat <<MSG

Loopwise Connect is running in containers ($ENGINE, project $COMPOSE_PROJECT_NAME).

  platform        http://localhost:$CONNECT_HTTP_PORT
  demo            http://demo.localhost:$CONNECT_HTTP_PORT
  discovery       http://demo.localhost:$CONNECT_HTTP_PORT/.well-known/openid-configuration

Admin logins (migrate --demo):
MSG
  # migrate's one JSON result, among its JSON log lines.
  "$ENGINE" logs "$migrate" 2>&1 | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        result = json.loads(line)
    except ValueError:
        continue
    for x in result.get("logins", []) if isinstance(result, dict) else []:
        print("  {school:<15} {email}  password: {password}".format(**x))
'
  printf '\nStop it with: make down\n'
}

down() {
  local args=(down)
  [ -n "${CONNECT_DOWN_VOLUMES:-}" ] && args+=(-v)
  compose "${args[@]}" >&2
}

case $action in
  up) up ;;
  down) down ;;
  images) build_images ;;
  *) die "usage: deploy/up.sh [up|down|images]" ;;
esac
