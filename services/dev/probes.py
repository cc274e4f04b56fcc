"""Probes of the local stores, shared by `localstores` and the servers it starts.

Whether something answers on a port, whether it is a PostgreSQL we can use (creating the
database if it is missing) or a Redis that answers PING, and the log all of them write to.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import redis
import structlog
from redis.backoff import NoBackoff
from redis.retry import Retry

HOST = "127.0.0.1"
PG_SUPERUSER = "postgres"

_TCP_PROBE_TIMEOUT = 0.5

_T = TypeVar("_T")


def logger() -> Any:
    # Unconfigured structlog prints to stdout, which belongs to the CLI's `--json` answer.
    if structlog.is_configured():
        return structlog.get_logger("localstores")
    return structlog.wrap_logger(structlog.PrintLogger(file=sys.stderr)).bind(logger="localstores")


def tcp_answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=_TCP_PROBE_TIMEOUT):
            return True
    except OSError:
        return False


def _run_coro(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    # asyncio.run refuses to nest; the CLI's `dev` command may call us from inside a loop.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="localstores") as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


async def _pg_ready(port: int, database_name: str, wait: float) -> None:
    """Connect as the superuser and make sure `database_name` exists.

    Retries only while the server says it is starting up or recovering: anything else (wrong
    password, not PostgreSQL at all) will not get better by waiting.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            conn = await asyncpg.connect(
                host=HOST, port=port, user=PG_SUPERUSER, database="postgres", timeout=5
            )
            break
        except asyncpg.CannotConnectNowError as exc:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"PostgreSQL on {HOST}:{port} not ready: {exc}") from exc
            await asyncio.sleep(0.1)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database_name)
        if not exists:
            # Another process may create it between our check and our CREATE.
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{database_name}"')
            logger().info("localstores.database_created", database=database_name, port=port)
    finally:
        await conn.close()


def pg_usable(port: int, database_name: str, wait: float = 0.0) -> Exception | None:
    try:
        _run_coro(lambda: _pg_ready(port, database_name, wait))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return exc
    return None


def redis_usable(port: int) -> Exception | None:
    # No retries: redis-py's default backoff turns one refused probe into seconds of waiting.
    client = redis.Redis(
        host=HOST,
        port=port,
        socket_connect_timeout=1,
        socket_timeout=2,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return exc
    finally:
        client.close()
    return None


def tail(path: Path, lines: int = 30) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
