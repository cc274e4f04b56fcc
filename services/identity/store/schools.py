"""The schools table: each school's subdomain, name, allowed scopes, open registration."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from libs.common.db import Executor


@dataclass(frozen=True, slots=True)
class School:
    id: int
    subdomain: str
    name: str
    allowed_scopes: tuple[str, ...] | None
    open_registration: bool


def _school(r: asyncpg.Record) -> School:
    scopes = r["allowed_scopes"]
    return School(
        r["id"],
        r["subdomain"],
        r["name"],
        tuple(scopes) if scopes is not None else None,
        r["open_registration"],
    )


async def insert_school(db: Executor, subdomain: str, name: str, school_id: int | None) -> School:
    if school_id is None:
        row = await db.fetchrow(
            "INSERT INTO schools (subdomain, name) VALUES ($1, $2) RETURNING *", subdomain, name
        )
    else:
        row = await db.fetchrow(
            "INSERT INTO schools (id, subdomain, name) VALUES ($1, $2, $3) RETURNING *",
            school_id,
            subdomain,
            name,
        )
        # Keep the identity sequence ahead of explicitly chosen ids, never pulling it back.
        await db.execute(
            "SELECT setval('schools_id_seq', (SELECT max(id) FROM schools))"
            " WHERE (SELECT max(id) FROM schools) >"
            " (SELECT last_value FROM schools_id_seq)"
        )
    assert row is not None
    return _school(row)


async def school_by_subdomain(db: Executor, subdomain: str) -> School | None:
    row = await db.fetchrow("SELECT * FROM schools WHERE subdomain = $1", subdomain)
    return _school(row) if row else None


async def school_by_id(db: Executor, school_id: int) -> School | None:
    row = await db.fetchrow("SELECT * FROM schools WHERE id = $1", school_id)
    return _school(row) if row else None


async def list_schools(db: Executor) -> list[School]:
    return [_school(r) for r in await db.fetch("SELECT * FROM schools ORDER BY id")]


async def set_open_registration(db: Executor, school_id: int, allowed: bool) -> None:
    await db.execute("UPDATE schools SET open_registration = $2 WHERE id = $1", school_id, allowed)
