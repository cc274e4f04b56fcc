"""Through a real PgBouncer 1.18 in transaction pooling (libs/common/db.py's rules).

PgBouncer runs in front of the test PostgreSQL with two server connections per database, so
concurrent clients share server sessions and every transaction may land on another one.
Skipped only when Debian's pgbouncer cannot be installed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from libs.common import db
from libs.common.config import Settings
from tests.support import free_port

POOL_SIZE = 2
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
async def pgbouncer_url(
    settings: Settings, migrated: None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    """The test run's database, through PgBouncer."""
    from services.dev import topology

    try:
        programs = topology.ensure_packages(["pgbouncer"])
    except RuntimeError as exc:
        pytest.skip(f"no pgbouncer: {exc}")
    server = urlsplit(settings.database_url)
    directory = tmp_path_factory.mktemp("pgbouncer")
    directory.chmod(0o755)
    port = free_port()
    proc = topology.pgbouncer_proc(
        programs["pgbouncer"],
        directory / "run",
        port,
        server.port or 5432,
        log_file=directory / "pgbouncer.out",
        pool_size=POOL_SIZE,
    )
    await proc.start()
    try:
        await proc.wait_ready(timeout=30)
        yield urlunsplit(server._replace(netloc=f"{server.username}@127.0.0.1:{port}"))
    finally:
        await proc.stop()


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def _mixed_work(pool: asyncpg.Pool, worker: int, rounds: int) -> int:
    """Queries of several shapes, in and out of transactions; returns how many were checked."""
    checked = 0
    for i in range(rounds):
        n = worker * 1000 + i
        assert await pool.fetchval("SELECT $1::int + 1", n) == n + 1
        assert await pool.fetchval("SELECT $1::text || 'x'", str(n)) == f"{n}x"
        row = await pool.fetchrow("SELECT $1::jsonb AS doc, $2::uuid[] AS ids", {"n": n}, [])
        assert row is not None and row["doc"] == {"n": n}
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", n)
            assert await conn.fetchval("SELECT $1::bigint * 2", n) == 2 * n
        checked += 4
    return checked


async def _mixed_work_on(
    pools: list[asyncpg.Pool], workers: int, rounds: int
) -> list[int | BaseException]:
    """`workers` running `_mixed_work` at once, spread over `pools` (closed afterwards): how
    many each checked, or what it raised."""
    try:
        return await asyncio.gather(
            *(_mixed_work(pools[w % len(pools)], w, rounds) for w in range(workers)),
            return_exceptions=True,
        )
    finally:
        for pool in pools:
            await pool.close()


async def test_statement_cache_zero_holds_under_concurrency(pgbouncer_url: str) -> None:
    pools = [
        await db.create_pool(pgbouncer_url, min_size=2, max_size=8, statement_cache=0)
        for _ in range(3)
    ]
    done = await _mixed_work_on(pools, 24, 25)
    errors = [d for d in done if isinstance(d, BaseException)]
    assert not errors, errors[:3]
    assert sum(d for d in done if isinstance(d, int)) == 24 * 25 * 4


async def test_a_pool_from_settings_takes_their_statement_cache(
    settings: Settings, pgbouncer_url: str
) -> None:
    """`create_pool(settings=...)` (what every service and the tests open): the cache of 0
    and the pool sizes come from the settings, so no caller can forget them behind PgBouncer."""
    pooled = dataclasses.replace(
        settings,
        database_url=pgbouncer_url,
        database_statement_cache=0,
        db_pool_min=2,
        db_pool_max=8,
    )
    pools = [await db.create_pool(settings=pooled) for _ in range(2)]
    sizes = [(p.get_min_size(), p.get_max_size()) for p in pools]
    done = await _mixed_work_on(pools, 16, 10)
    assert sizes == [(2, 8), (2, 8)]
    errors = [d for d in done if isinstance(d, BaseException)]
    assert not errors, errors[:3]


async def test_named_statements_break_without_statement_cache_zero(pgbouncer_url: str) -> None:
    """Why DATABASE_STATEMENT_CACHE=0 exists: asyncpg's default cache names its statements,
    and the next transaction finds them missing on another server session."""
    pools = [
        await db.create_pool(pgbouncer_url, min_size=4, max_size=4, statement_cache=100)
        for _ in range(2)
    ]
    done = await _mixed_work_on(pools, 8, 10)
    assert any(isinstance(d, asyncpg.PostgresError) for d in done)


_PREPARE_LOOP = """
import asyncio, sys
from libs.common import db

async def main(url, rounds):
    conn = await db.connect(url, statement_cache=0)
    kept = []  # as a caller holding its statements would: none is closed meanwhile
    try:
        for i in range(rounds):
            async with conn.transaction():
                stmt = await conn.prepare("SELECT $1::int * 3")
                assert await stmt.fetchval(i) == i * 3
            kept.append(stmt)
    finally:
        await conn.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def test_explicit_prepare_from_many_processes(pgbouncer_url: str) -> None:
    """An explicit prepare() (inside a transaction, the statements kept) from processes that
    meet on the same two server sessions. asyncpg's statement names come from a process-wide
    counter, equal in every process: named statements would collide there ("already
    exists") or be missing in the next transaction; with statement cache 0 asyncpg prepares
    them unnamed and parses again at every execution."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _PREPARE_LOOP,
            pgbouncer_url,
            "200",
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    results = [await p.communicate() for p in procs]
    failures = [
        err.decode()[-600:] for (_, err), p in zip(results, procs, strict=True) if p.returncode
    ]
    assert not failures, failures[0]


async def test_startup_parameters_pgbouncer_refuses_are_left_out(pgbouncer_url: str) -> None:
    """Identity's audit pool asks for plan_cache_mode; PgBouncer refuses a connection that
    sends it ("unsupported startup parameter"). Under statement cache 0 it is not sent."""
    with pytest.raises(asyncpg.PostgresError, match="unsupported startup parameter"):
        await asyncpg.connect(
            pgbouncer_url,
            statement_cache_size=0,
            server_settings={"plan_cache_mode": "force_generic_plan"},
        )
    pool = await db.create_pool(
        pgbouncer_url,
        min_size=1,
        max_size=1,
        server_settings={"plan_cache_mode": "force_generic_plan"},
        statement_cache=0,
    )
    try:
        assert await pool.fetchval("SELECT current_setting('application_name')") == (
            "loopwise-connect"
        )
    finally:
        await pool.close()


async def test_concurrent_migrations_through_pgbouncer(pgbouncer_url: str, run_id: str) -> None:
    """Migrators at once through transaction pooling: each file exactly once, nobody stuck. A
    session advisory lock would stay held by a server session the migrator has left."""
    dsn = _with_database(pgbouncer_url, f"{run_id}_pgb_{secrets.token_hex(3)}")
    try:
        applied = await asyncio.wait_for(
            asyncio.gather(*(db.migrate(dsn) for _ in range(4))), timeout=120
        )
        names = [name for run in applied for name in run]
        assert len(names) == len(set(names)) == len(db.discover_migrations())
        again = await db.migrate(dsn)
        assert again == []
    finally:
        await db.drop_database(dsn)
