"""The development database `make dev` runs on: migrated, its secrets checked, the demo seeded.

The development secrets (`.data/dev-secrets`, generated) and the development database must
agree, or every token request fails: `make clean` removes the secrets while a PostgreSQL on the
default port keeps the database, and two checkouts share that database. So the secrets file
notes the databases it was used with (`dev-secrets.databases`), and when new secrets meet the
development database holding data made under others, that database is started afresh.

Behind a transaction pooler (`make cluster`: DATABASE_URL is PgBouncer's) all of this runs on
the server itself (DATABASE_SESSION_URL), before any service starts: the pooler keeps the
server sessions our own migrate/check/seed opened idle in its pool for minutes, and those
would hold the database against the DROP of a start afresh, refused as "in use by another
process". On the server itself, a session on the database is another process's (a direct
client, or the pooler serving one).
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from libs.common import db
from libs.common.config import Settings
from services.dev import seed
from services.identity import secret_checks


def _bindings(secrets_file: Path) -> Path:
    """Beside the development secrets: the databases `make dev` has used them with."""
    return secrets_file.with_name(secrets_file.name + ".databases")


def _bound(secrets_file: Path, database_url: str) -> bool:
    try:
        return database_url in _bindings(secrets_file).read_text().splitlines()
    except FileNotFoundError:
        return False


def _bind(secrets_file: Path, database_url: str) -> None:
    if _bound(secrets_file, database_url):
        return
    path = _bindings(secrets_file)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "a") as out:
        out.write(database_url + "\n")


def _database_name(database_url: str) -> str:
    return urlsplit(database_url).path.lstrip("/") or "postgres"


async def _start_afresh(database_url: str) -> None:
    # Not WITH (FORCE): a database another process is using (another checkout's `make dev`
    # still running) is left alone, and the user is told.
    try:
        await db.drop_database(database_url, force=False)
    except asyncpg.ObjectInUseError:
        raise RuntimeError(
            f"the development database {_database_name(database_url)} holds data made with"
            " other development secrets and is in use by another process (another `make dev`?):"
            " stop it and start again"
        ) from None
    await db.migrate(database_url)


async def prepare(
    settings: Settings, *, own_database: bool, logins_file: Path = seed.LOGINS_FILE
) -> list[seed.Login]:
    """Migrate, make sure the secrets are the database's own, seed the demo schools.

    `own_database`: the database is the development one this command found or started itself
    (no DATABASE_URL given). Only that one, and only for development secrets generated into a
    file that has not been used with it yet (new after `make clean`, or another checkout's
    database), is started afresh when it holds data made under other secrets: development
    data that nothing could open any more. Anything else with secrets that are not the
    database's is refused (SecretMismatch, exit status 2), and nothing is dropped.
    """
    dsn = settings.session_database_url  # module docstring
    await db.migrate(dsn)
    try:
        await _verify_secrets(settings, dsn)
    except secret_checks.SecretMismatch:
        secrets_file = settings.dev_secrets
        if not (
            own_database
            and settings.is_development
            and secrets_file is not None
            and not _bound(secrets_file, settings.database_url)
        ):
            raise
        sys.stdout.write(
            f"The development database {_database_name(settings.database_url)} was made with"
            f" other development secrets than the new ones in {secrets_file}: starting it"
            " afresh (development data only).\n"
        )
        sys.stdout.flush()
        await _start_afresh(dsn)
        await _verify_secrets(settings, dsn)
    if own_database and settings.dev_secrets is not None:
        _bind(settings.dev_secrets, settings.database_url)
    pool = await db.create_pool(dsn, settings=settings, min_size=1, max_size=2)
    try:
        return await seed.seed_demo(pool, settings, logins_file)
    finally:
        await pool.close()


async def _verify_secrets(settings: Settings, dsn: str) -> None:
    pool = await db.create_pool(dsn, settings=settings, min_size=1, max_size=1)
    try:
        await secret_checks.verify(pool, settings)
    finally:
        await pool.close()
