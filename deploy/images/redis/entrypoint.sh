#!/bin/sh
# As the official image: a bare `redis-server ...` listens on every address of the container
# without protected mode, which would otherwise refuse every client from another container.
set -eu
if [ "${1:-}" = redis-server ]; then
  shift
  exec redis-server --bind '* -::*' --protected-mode no "$@"
fi
exec "$@"
