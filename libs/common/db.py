"""PostgreSQL: the connection pool and the migration runner.

Migrations are plain ordered `.sql` files, one folder per service
(`services/<name>/migrations/NNN_what.sql`). Each is applied in a transaction of its own that
first takes a transaction-scoped advisory lock and then looks whether the file is still
pending, so any number of processes may run `migrate` at once and exactly one applies each
file, directly on PostgreSQL or through a transaction-pooling PgBouncer alike (a session lock
would be taken on one server session and released on another).

Behind a transaction pooler (PgBouncer 1.18, `pool_mode = transaction`) each transaction may
run on another server session, so nothing may rely on session state between transactions:

- named prepared statements: `statement_cache=0` (DATABASE_STATEMENT_CACHE). asyncpg (0.32)
  then names no statement, an explicit `prepare()` included, and sends Parse again with
  every Bind, Execute and Sync, so no statement is bound across a Sync on another server
  session (tests/test_pgbouncer.py shows it under concurrency, and the default cache failing);
- startup parameters: PgBouncer refuses any it does not track (`unsupported startup
  parameter`), so with `statement_cache=0` only those it forwards are sent. The others we
  use are planner hints for cached statements (identity's `plan_cache_mode`), which mean
  nothing when every statement is parsed afresh;
- LISTEN and session advisory locks: on DATABASE_SESSION_URL (a direct or session-pooled
  DSN), never on a pooled connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from libs.common.logging import get_logger

if TYPE_CHECKING:
    from libs.common.config import Settings

log = get_logger(__name__)

# Arbitrary, fixed: the advisory lock every migrator of this product takes.
_MIGRATION_LOCK = 0x4C57_434E  # "LWCN"
_FILE_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")

SERVICES_ROOT = Path(__file__).resolve().parents[2] / "services"
# Order matters where one service's tables refer to another's.
MIGRATION_COMPONENTS = ("identity", "school_api", "webhooks", "gateway")


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """A release that skips asyncpg's reset query (RESET ALL, UNLISTEN, advisory unlock): one
    round trip fewer per pooled call. asyncpg still rolls back a transaction left open."""


# asyncpg's own default.
DEFAULT_STATEMENT_CACHE = 100

# The startup parameters PgBouncer 1.18 forwards to the server; it refuses a connection that
# sends any other (unless listed in its ignore_startup_parameters, which drops it silently).
POOLER_STARTUP_PARAMETERS = frozenset(
    {"application_name", "client_encoding", "datestyle", "timezone", "standard_conforming_strings"}
)


class ConnectOptions(TypedDict):
    statement_cache_size: int
    server_settings: dict[str, str]


def connect_options(
    statement_cache: int, server_settings: Mapping[str, str] | None = None
) -> ConnectOptions:
    """asyncpg.connect/create_pool keyword arguments for a DSN with this statement cache.

    `statement_cache=0` is taken to mean a transaction pooler: only the startup parameters it
    forwards are sent (module docstring)."""
    wanted = dict(server_settings or {})
    if statement_cache == 0:
        dropped = sorted(k for k in wanted if k.lower() not in POOLER_STARTUP_PARAMETERS)
        if dropped:
            log.info("db_settings_left_out", settings=dropped, reason="statement_cache=0")
        wanted = {k: v for k, v in wanted.items() if k not in dropped}
    return ConnectOptions(
        statement_cache_size=statement_cache,
        server_settings=wanted,
    )


async def connect(
    dsn: str,
    *,
    statement_cache: int = DEFAULT_STATEMENT_CACHE,
    server_settings: Mapping[str, str] | None = None,
) -> asyncpg.Connection:
    """One connection, outside any pool, with the same pooler rules as `create_pool`."""
    return await asyncpg.connect(dsn, **connect_options(statement_cache, server_settings))


@dataclass(frozen=True, slots=True)
class PoolTarget:
    """Where a pool connects and how: what `create_pool(settings=...)` takes from Settings."""

    dsn: str
    statement_cache: int
    min_size: int
    max_size: int


def pool_target(
    dsn: str | None,
    settings: Settings | None,
    *,
    statement_cache: int | None,
    min_size: int | None,
    max_size: int | None,
) -> PoolTarget:
    """With `settings`: its DATABASE_URL, DATABASE_STATEMENT_CACHE and DB_POOL_MIN/MAX, each
    unless given. Without: `dsn` is taken for PostgreSQL itself (asyncpg's statement cache)
    unless `statement_cache` says otherwise. A pool for a configured database goes through
    settings, so behind a transaction pooler no caller can forget the cache of 0."""
    if settings is not None:
        return PoolTarget(
            dsn=dsn or settings.database_url,
            statement_cache=(
                settings.database_statement_cache if statement_cache is None else statement_cache
            ),
            min_size=settings.db_pool_min if min_size is None else min_size,
            max_size=settings.db_pool_max if max_size is None else max_size,
        )
    if dsn is None:
        raise TypeError("create_pool needs a dsn or settings")
    return PoolTarget(
        dsn=dsn,
        statement_cache=DEFAULT_STATEMENT_CACHE if statement_cache is None else statement_cache,
        min_size=2 if min_size is None else min_size,
        max_size=10 if max_size is None else max_size,
    )


async def create_pool(
    dsn: str | None = None,
    *,
    settings: Settings | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    keep_session: bool = False,
    server_settings: Mapping[str, str] | None = None,
    statement_cache: int | None = None,
) -> asyncpg.Pool:
    """A pool on `settings`' database with its statement cache and pool sizes (`pool_target`),
    or on a bare `dsn` (PostgreSQL itself unless `statement_cache` says otherwise).

    `keep_session=True` only for a service whose pooled connections never change session
    state: no SET, no LISTEN, no session-level advisory locks (xact locks are fine).
    `server_settings`: PostgreSQL settings for every connection of this pool."""
    target = pool_target(
        dsn, settings, statement_cache=statement_cache, min_size=min_size, max_size=max_size
    )
    pool = await asyncpg.create_pool(
        target.dsn,
        min_size=target.min_size,
        max_size=target.max_size,
        init=_init_connection,
        reset=_keep_session if keep_session else None,
        command_timeout=30,
        **connect_options(
            target.statement_cache,
            {"application_name": "loopwise-connect", **(server_settings or {})},
        ),
    )
    assert pool is not None
    return pool


async def _maintenance_connection(dsn: str) -> asyncpg.Connection:
    # Rare and short: no statement cache, so it works through a transaction pooler as is.
    return await connect(dsn, statement_cache=0)


def _admin_dsn(dsn: str) -> tuple[str, str]:
    """The DSN of the server's `postgres` database, and the database name `dsn` names."""
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/") or "postgres"
    return urlunsplit(parts._replace(path="/postgres")), name


async def ensure_database(dsn: str) -> None:
    """Create the database `dsn` names when it does not exist yet."""
    admin, name = _admin_dsn(dsn)
    conn = await _maintenance_connection(admin)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if not exists:
            # Another process may create it between our check and our create.
            with contextlib.suppress(asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def drop_database(dsn: str, *, force: bool = True) -> None:
    """`force`: end the sessions connected to it; without, a database in use is not dropped
    (asyncpg.ObjectInUseError)."""
    admin, name = _admin_dsn(dsn)
    conn = await _maintenance_connection(admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"' + (" WITH (FORCE)" if force else ""))
    finally:
        await conn.close()


@dataclass(frozen=True, slots=True)
class Migration:
    component: str
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def discover_migrations(root: Path = SERVICES_ROOT) -> list[Migration]:
    found: list[Migration] = []
    for component in MIGRATION_COMPONENTS:
        folder = root / component / "migrations"
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            match = _FILE_NAME.match(path.name)
            if match:
                found.append(Migration(component, int(match.group(1)), path.stem, path.read_text()))
    return found


_BOOKKEEPING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component  text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


class MigrationError(RuntimeError):
    pass


async def migrate(dsn: str, migrations: list[Migration] | None = None) -> list[str]:
    """Apply every pending migration; return the names applied by this call.

    No session state: each file's transaction takes the migration lock for itself
    (`pg_advisory_xact_lock`) and reads what is applied under it, so it works on PostgreSQL
    and through a transaction-pooling PgBouncer alike (module docstring)."""
    await ensure_database(dsn)
    migrations = discover_migrations() if migrations is None else migrations
    applied_now: list[str] = []
    conn = await _maintenance_connection(dsn)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            await conn.execute(_BOOKKEEPING)
        for m in migrations:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
                known = await conn.fetchval(
                    "SELECT checksum FROM schema_migrations WHERE component = $1 AND version = $2",
                    m.component,
                    m.version,
                )
                if known is not None:
                    if known != m.checksum:
                        raise MigrationError(
                            f"{m.component}/{m.name} was changed after it was applied; "
                            "add a new migration instead"
                        )
                    continue
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (component, version, name, checksum)"
                    " VALUES ($1, $2, $3, $4)",
                    m.component,
                    m.version,
                    m.name,
                    m.checksum,
                )
            applied_now.append(f"{m.component}/{m.name}")
            log.info("migration_applied", migration=f"{m.component}/{m.name}")
    finally:
        await conn.close()
    return applied_now


async def ping(pool: asyncpg.Pool) -> bool:
    try:
        return bool(await pool.fetchval("SELECT 1", timeout=2))
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False


# What a query can run on: the pool, or one connection taken from it (inside a transaction).
Connection = asyncpg.Connection | PoolConnectionProxy
Executor = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy
