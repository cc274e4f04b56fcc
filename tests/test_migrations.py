"""Migrations: concurrent migrators agree on one schema; applied files are immutable."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from libs.common import db
from libs.common.config import Settings
from tests.support import connect, database_env

CLI = str(Path(sys.executable).with_name("loopwise-connect"))
_TABLE = re.compile(
    r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(?:([a-z_][a-z0-9_]*)\.)?([a-z_][a-z0-9_]*)", re.I
)
# The schemas migrations own: everything but PostgreSQL's own catalogues.
_OURS = "NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
# What the contract's identity service cannot work without, whatever else migrations add.
CORE_IDENTITY_TABLES = {
    "schools",
    "users",
    "school_memberships",
    "clients",
    "grants",
    "signing_keys",
    "authorization_codes",
    "refresh_tokens",
}

FreshDatabase = Callable[[], str]


@pytest.fixture
async def fresh_database(settings: Settings, run_id: str) -> AsyncIterator[FreshDatabase]:
    """Names of databases that do not exist yet on the test server; dropped afterwards."""
    made: list[str] = []

    def new() -> str:
        name = f"{run_id}_mig_{secrets.token_hex(4)}"
        dsn = urlunsplit(urlsplit(settings.database_url)._replace(path=f"/{name}"))
        made.append(dsn)
        return dsn

    yield new
    for dsn in made:
        await db.drop_database(dsn)


async def _fetch(dsn: str, query: str) -> list[asyncpg.Record]:
    conn = await connect(dsn)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


async def _tables(dsn: str) -> set[str]:
    """Every table migrations made, as `table` in public and `schema.table` elsewhere."""
    rows = await _fetch(
        dsn,
        "SELECT table_schema, table_name FROM information_schema.tables"
        f" WHERE table_schema {_OURS}",
    )
    return {
        r["table_name"]
        if r["table_schema"] == "public"
        else f"{r['table_schema']}.{r['table_name']}"
        for r in rows
    }


async def _schema(dsn: str) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """The columns and indexes of every schema we own: what "the same schema" means here."""
    columns = await _fetch(
        dsn,
        "SELECT table_schema, table_name, column_name, data_type, is_nullable"
        f" FROM information_schema.columns WHERE table_schema {_OURS} ORDER BY 1, 2, 3",
    )
    indexes = await _fetch(
        dsn,
        "SELECT schemaname, tablename, indexname, indexdef FROM pg_indexes"
        f" WHERE schemaname {_OURS} ORDER BY 1, 2, 3",
    )
    # Index definitions name no database, so they compare across databases as they are.
    return [tuple(r) for r in columns], [tuple(r) for r in indexes]


async def _assert_migrated_once(dsn: str, applied_by_callers: list[list[str]]) -> None:
    """Every migration applied by exactly one caller and recorded exactly once, unchanged."""
    migrations = db.discover_migrations()
    names = [f"{m.component}/{m.name}" for m in migrations]
    everything = [name for applied in applied_by_callers for name in applied]
    assert sorted(everything) == sorted(names), "each migration applied by exactly one caller"

    rows = await _fetch(
        dsn,
        "SELECT component, version, name, checksum FROM schema_migrations"
        " ORDER BY component, version",
    )
    recorded = {(r["component"], r["version"]): r for r in rows}
    assert len(rows) == len(migrations) == len(recorded)
    for m in migrations:
        row = recorded[(m.component, m.version)]
        assert (row["name"], row["checksum"]) == (m.name, m.checksum)

    declared = {
        f"{schema}.{table}".lower() if schema else table.lower()
        for m in migrations
        for schema, table in _TABLE.findall(m.sql)
    }
    assert declared >= CORE_IDENTITY_TABLES
    assert declared | {"schema_migrations"} <= await _tables(dsn)


async def test_concurrent_migrate_calls_apply_each_file_once(
    fresh_database: FreshDatabase,
) -> None:
    """Four migrators racing on a database that does not exist yet leave one schema."""
    dsn = fresh_database()
    results = await asyncio.gather(*(db.migrate(dsn) for _ in range(4)))
    await _assert_migrated_once(dsn, list(results))
    assert await db.migrate(dsn) == [], "a second migrate applies nothing"


async def _cli_migrate(env: dict[str, str]) -> list[str]:
    proc = await asyncio.create_subprocess_exec(
        CLI,
        "migrate",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    applied: list[str] = json.loads(out)["applied"]
    return applied


async def test_cli_processes_and_in_process_migrators_race(
    fresh_database: FreshDatabase, base_env: dict[str, str], settings: Settings
) -> None:
    """Two real `loopwise-connect migrate` processes and two in-process calls, on two fresh
    databases at once, each database ends with every file applied once and the same schema."""
    dsn_a, dsn_b = fresh_database(), fresh_database()
    env = {**base_env, **database_env(base_env, dsn_b)}
    runs: list[Awaitable[list[str]]] = [
        _cli_migrate(env),
        _cli_migrate(env),
        db.migrate(dsn_b),
        db.migrate(dsn_a),
        db.migrate(dsn_a),
    ]
    results = await asyncio.gather(*runs)
    await _assert_migrated_once(dsn_b, list(results[:3]))
    await _assert_migrated_once(dsn_a, list(results[3:]))
    assert await _cli_migrate(env) == []
    schema_b = await _schema(dsn_b)
    assert schema_b == await _schema(dsn_a)
    assert schema_b[0], "the schema has columns"


async def test_changed_migration_is_refused(fresh_database: FreshDatabase) -> None:
    """A file edited after it was applied stops migrate with MigrationError, changing nothing."""
    dsn = fresh_database()
    migrations = db.discover_migrations()
    await db.migrate(dsn, migrations)
    before = await _fetch(dsn, "SELECT component, version, checksum FROM schema_migrations")

    for index in (0, len(migrations) - 1):
        edited = list(migrations)
        original = edited[index]
        edited[index] = dataclasses.replace(original, sql=original.sql + "\n-- edited\n")
        assert edited[index].checksum != original.checksum
        with pytest.raises(db.MigrationError, match=re.escape(original.name)):
            await db.migrate(dsn, edited)

    after = await _fetch(dsn, "SELECT component, version, checksum FROM schema_migrations")
    assert sorted(map(tuple, after)) == sorted(map(tuple, before))


async def test_new_migration_applies_alone_and_failure_rolls_back(
    fresh_database: FreshDatabase,
) -> None:
    """Only pending files run; a failing file leaves neither its changes nor its record."""
    dsn = fresh_database()
    migrations = db.discover_migrations()
    await db.migrate(dsn, migrations)

    added = db.Migration("identity", 9001, "9001_probe", "CREATE TABLE probe_added (id int);")
    assert await db.migrate(dsn, [*migrations, added]) == ["identity/9001_probe"]

    broken = db.Migration(
        "identity", 9002, "9002_broken", "CREATE TABLE probe_broken (id int); SELECT 1 / 0;"
    )
    with pytest.raises(asyncpg.DivisionByZeroError):
        await db.migrate(dsn, [*migrations, added, broken])
    tables = await _tables(dsn)
    assert "probe_added" in tables
    assert "probe_broken" not in tables
    versions = {
        r["version"]
        for r in await _fetch(
            dsn, "SELECT version FROM schema_migrations WHERE component = 'identity'"
        )
    }
    assert 9001 in versions
    assert 9002 not in versions
