"""What asyncpg's statement cache is worth, and what PgBouncer costs (README "Production
topology"): the token endpoint's refresh grant, as identity's stores run it, in three setups.

    .venv/bin/python -m bench.statement_cache [--seconds 5] [--rounds 3] [--workers 8]

- `cache 100, direct`: asyncpg's default (`make dev`), named statements prepared once per
  connection;
- `cache 0, direct`: DATABASE_STATEMENT_CACHE=0 on PostgreSQL itself: every statement parsed
  again (unnamed) in the same round trip as its execution;
- `cache 0, PgBouncer`: `make cluster`'s setting, through a PgBouncer 1.18 in transaction pooling
  (services/dev/topology.pgbouncer_proc, 20 server connections) in front of the same server.

One grant is what identity does for `grant_type=refresh_token` (services/identity/token/
refresh_token.py): the client read, then a transaction that locks the presented token, reads
its school and rotates it (successor inserted, grant touched). Each worker rotates its own chain
of tokens on a pool of `--workers` connections; the setups alternate round by round and the
median round is printed. Its own database on the PostgreSQL of DATABASE_URL (default
127.0.0.1:5432), dropped at the end; PgBouncer on a free port, stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import os
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg

from libs.common import db
from libs.common.config import Settings, load_settings
from libs.common.logging import configure_logging
from services.dev import topology
from services.identity import clients, schools, users
from services.identity.store import clients as client_store
from services.identity.store import grants as grant_store
from services.identity.store import refresh_tokens as refresh_store
from services.identity.store import schools as school_store

DEFAULT_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
TTL = 3600


@dataclass(frozen=True)
class Seeded:
    school_id: int
    client_id: str
    user_id: UUID


@dataclass(frozen=True)
class Figures:
    setup: str
    grants_per_s: float
    p50_ms: float
    p99_ms: float


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def _key() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


def _hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


async def _seed(settings: Settings) -> Seeded:
    pool = await db.create_pool(settings=settings, min_size=1, max_size=2)
    try:
        school = await schools.create_school(pool, settings, f"cache{secrets.token_hex(3)}", "B")
        user, _ = await users.create_user(
            pool,
            school_id=school.id,
            email="bench@example.com",
            password=secrets.token_urlsafe(16),
            role="admin",
        )
        made = await clients.create_client(
            pool,
            settings,
            school=school,
            name="Statement cache bench",
            redirect_uris=["https://app.example.com/callback"],
            public=True,
            scopes=["openid", "courses:read"],
        )
        return Seeded(school.id, made.client.id, user.id)
    finally:
        await pool.close()


async def _first_token(pool: asyncpg.Pool, seeded: Seeded) -> bytes:
    grant = await grant_store.insert_grant(
        pool,
        school_id=seeded.school_id,
        client_id=seeded.client_id,
        user_id=seeded.user_id,
        scopes=["openid", "courses:read"],
    )
    token_hash = _hash(secrets.token_urlsafe(32))
    await refresh_store.insert_refresh_token(
        pool,
        token_hash=token_hash,
        grant_id=grant.id,
        client_id=seeded.client_id,
        scopes=["openid", "courses:read"],
        resource=None,
        auth_time=None,
        ttl_seconds=TTL,
    )
    return token_hash


async def _refresh_grant(pool: asyncpg.Pool, seeded: Seeded, presented: bytes) -> bytes:
    """One refresh grant's statements, as identity runs them; the successor's hash."""
    client = await client_store.client_by_id(pool, seeded.client_id)
    assert client is not None
    successor = _hash(secrets.token_urlsafe(32))
    async with pool.acquire() as conn, conn.transaction():
        state = await refresh_store.lock_refresh_token(conn, presented)
        assert state is not None
        assert state.rotated_at is None
        assert await school_store.school_by_id(conn, state.school_id) is not None
        assert await refresh_store.rotate_refresh_token(conn, presented, successor, TTL)
    return successor


async def _measure(
    setup: str, dsn: str, cache: int, seeded: Seeded, *, workers: int, seconds: float
) -> Figures:
    pool = await db.create_pool(
        dsn, min_size=workers, max_size=workers, statement_cache=cache, keep_session=True
    )
    latencies: list[float] = []
    try:
        chains = [await _first_token(pool, seeded) for _ in range(workers)]

        async def worker(i: int, until: float, record: bool) -> None:
            while time.perf_counter() < until:
                started = time.perf_counter()
                chains[i] = await _refresh_grant(pool, seeded, chains[i])
                if record:
                    latencies.append(time.perf_counter() - started)

        warm = time.perf_counter() + min(1.0, seconds / 4)
        await asyncio.gather(*(worker(i, warm, False) for i in range(workers)))
        started = time.perf_counter()
        until = started + seconds
        await asyncio.gather(*(worker(i, until, True) for i in range(workers)))
        elapsed = time.perf_counter() - started
    finally:
        await pool.close()
    ordered = sorted(latencies)
    return Figures(
        setup,
        len(ordered) / elapsed,
        1000 * ordered[len(ordered) // 2],
        1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
    )


async def main(args: argparse.Namespace) -> int:
    configure_logging("warning")
    server = os.environ.get("DATABASE_URL", DEFAULT_SERVER)
    name = f"lcbench_stmtcache_{secrets.token_hex(4)}"
    direct = _with_database(server, name)
    settings = load_settings(
        {
            "CONNECT_ENV": "test",
            "DATABASE_URL": direct,
            "KEY_ENCRYPTION_KEY": _key(),
            "SECRET_PEPPER": _key(),
            "LOG_LEVEL": "warning",
        }
    )
    program = topology.ensure_packages(["pgbouncer"])["pgbouncer"]
    port = topology._free_ports(1)[0]
    with tempfile.TemporaryDirectory(prefix="lcbench-pgbouncer-") as tmp:
        directory = Path(tmp)
        # PgBouncer runs as PostgreSQL's user (pgbouncer_proc) and must reach its directory.
        os.chmod(directory, 0o755)
        bouncer = topology.pgbouncer_proc(
            program,
            directory / "run",
            port,
            urlsplit(server).port or 5432,
            log_file=directory / "pgbouncer.out",
        )
        await db.migrate(direct)
        await bouncer.start()
        try:
            await bouncer.wait_ready(timeout=30)
            parts = urlsplit(direct)
            pooled = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}"))
            seeded = await _seed(settings)
            setups = [
                ("cache 100, direct", direct, 100),
                ("cache 0, direct", direct, 0),
                ("cache 0, PgBouncer", pooled, 0),
            ]
            rounds: dict[str, list[Figures]] = {s[0]: [] for s in setups}
            for _ in range(args.rounds):
                for setup, dsn, cache in setups:
                    rounds[setup].append(
                        await _measure(
                            setup,
                            dsn,
                            cache,
                            seeded,
                            workers=args.workers,
                            seconds=args.seconds,
                        )
                    )
        finally:
            await bouncer.stop()
            await db.drop_database(direct)
    print(
        f"refresh grant's statements, {args.workers} workers, {args.rounds} rounds of "
        f"{args.seconds:g}s, median round (machine: {os.cpu_count()} cores)"
    )
    base = statistics.median(f.grants_per_s for f in rounds["cache 100, direct"])
    for setup, figures in rounds.items():
        mid = sorted(figures, key=lambda f: f.grants_per_s)[len(figures) // 2]
        print(
            f"  {setup:<20} {mid.grants_per_s:8,.0f} grants/s ({mid.grants_per_s / base:4.0%})"
            f"  p50 {mid.p50_ms:5.2f} ms  p99 {mid.p99_ms:6.2f} ms"
        )
    return 0


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.statement_cache")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=8)
    return parser.parse_args(argv)


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(_parse(sys.argv[1:]))))
