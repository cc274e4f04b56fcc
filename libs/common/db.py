"""PostgreSQL: the connection pool and the migration runner.

Migrations are plain ordered `.sql` files, one folder per service
(`services/<name>/migrations/NNN_what.sql`). They are applied in a transaction each, under a
PostgreSQL advisory lock, so any number of processes may run `migrate` at once and exactly one
applies each file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from libs.common.logging import get_logger

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


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    keep_session: bool = False,
    server_settings: Mapping[str, str] | None = None,
) -> asyncpg.Pool:
    """`keep_session=True` only for a service whose pooled connections never change session
    state: no SET, no LISTEN, no session-level advisory locks (xact locks are fine).
    `server_settings`: PostgreSQL settings for every connection of this pool."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        init=_init_connection,
        reset=_keep_session if keep_session else None,
        command_timeout=30,
        server_settings={"application_name": "loopwise-connect", **(server_settings or {})},
    )
    assert pool is not None
    return pool


def _admin_dsn(dsn: str) -> tuple[str, str]:
    """The DSN of the server's `postgres` database, and the database name `dsn` names."""
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/") or "postgres"
    return urlunsplit(parts._replace(path="/postgres")), name


async def ensure_database(dsn: str) -> None:
    """Create the database `dsn` names when it does not exist yet."""
    admin, name = _admin_dsn(dsn)
    conn = await asyncpg.connect(admin)
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
    conn = await asyncpg.connect(admin)
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
    """Apply every pending migration; return the names applied by this call."""
    await ensure_database(dsn)
    migrations = discover_migrations() if migrations is None else migrations
    applied_now: list[str] = []
    conn = await asyncpg.connect(dsn)
    try:
        # Session-level lock: held across the per-file transactions below, released on close.
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        await conn.execute(_BOOKKEEPING)
        rows = await conn.fetch("SELECT component, version, checksum FROM schema_migrations")
        done = {(r["component"], r["version"]): r["checksum"] for r in rows}
        for m in migrations:
            known = done.get((m.component, m.version))
            if known is not None:
                if known != m.checksum:
                    raise MigrationError(
                        f"{m.component}/{m.name} was changed after it was applied; "
                        "add a new migration instead"
                    )
                continue
            async with conn.transaction():
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
