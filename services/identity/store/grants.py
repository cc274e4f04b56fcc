"""Grants: the row (insert, lookup, revocation, the self-registered ones of a school), the
client_credentials standing grant made on first use, and a grant's status for the endpoints
that take an access token back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from libs.common.db import Executor

# The live standing grant, touched; or a new one. ON CONFLICT on the partial unique index
# (003_tokens.sql) makes concurrent first requests agree: the loser inserts nothing and
# finds the winner's row on its retry.
_STANDING = """
WITH existing AS (
    UPDATE grants SET last_used_at = now()
    WHERE client_id = $1 AND school_id = $2 AND user_id IS NULL AND revoked_at IS NULL
    RETURNING id, false AS created
), created AS (
    INSERT INTO grants (school_id, client_id, user_id, scopes, last_used_at)
    SELECT $2, $1, NULL, $3, now() WHERE NOT EXISTS (SELECT 1 FROM existing)
    ON CONFLICT (client_id, school_id) WHERE user_id IS NULL AND revoked_at IS NULL
    DO NOTHING
    RETURNING id, true AS created
)
SELECT id, created FROM existing UNION ALL SELECT id, created FROM created
"""


async def standing_grant(
    db: Executor, *, client_id: str, school_id: int, scopes: Sequence[str]
) -> tuple[UUID, bool]:
    """The client's live user-less grant at the school, made on first use; (id, created)."""
    for _ in range(3):
        row = await db.fetchrow(_STANDING, client_id, school_id, list(scopes))
        if row is not None:
            return row["id"], row["created"]
    raise RuntimeError("could not find or create the standing grant")


@dataclass(frozen=True, slots=True)
class GrantStatus:
    school_id: int
    client_id: str
    user_id: UUID | None
    revoked: bool


async def grant_status(db: Executor, grant_id: UUID) -> GrantStatus | None:
    row = await db.fetchrow(
        "SELECT school_id, client_id, user_id, revoked_at IS NOT NULL AS revoked"
        " FROM grants WHERE id = $1",
        grant_id,
    )
    if row is None:
        return None
    return GrantStatus(row["school_id"], row["client_id"], row["user_id"], row["revoked"])


@dataclass(frozen=True, slots=True)
class Grant:
    id: UUID
    school_id: int
    client_id: str
    user_id: UUID | None
    scopes: tuple[str, ...]
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


def _grant(r: asyncpg.Record) -> Grant:
    return Grant(
        r["id"],
        r["school_id"],
        r["client_id"],
        r["user_id"],
        tuple(r["scopes"]),
        r["created_at"],
        r["last_used_at"],
        r["revoked_at"],
    )


async def insert_grant(
    db: Executor, *, school_id: int, client_id: str, user_id: UUID | None, scopes: Sequence[str]
) -> Grant:
    row = await db.fetchrow(
        "INSERT INTO grants (school_id, client_id, user_id, scopes, last_used_at)"
        " VALUES ($1, $2, $3, $4, now()) RETURNING *",
        school_id,
        client_id,
        user_id,
        list(scopes),
    )
    assert row is not None
    return _grant(row)


async def grant_by_id(db: Executor, grant_id: UUID) -> Grant | None:
    row = await db.fetchrow("SELECT * FROM grants WHERE id = $1", grant_id)
    return _grant(row) if row else None


async def mark_grants_revoked(db: Executor, grant_ids: Sequence[UUID], reason: str) -> list[Grant]:
    """Revoke each once; the grants revoked now (not those already revoked or never there)."""
    rows = await db.fetch(
        "UPDATE grants SET revoked_at = now(), revoked_reason = $2"
        " WHERE id = ANY($1::uuid[]) AND revoked_at IS NULL RETURNING *",
        list(grant_ids),
        reason,
    )
    return [_grant(r) for r in rows]


async def schools_of_grants(db: Executor, grant_ids: Sequence[UUID]) -> dict[UUID, int]:
    """The school of each grant that exists."""
    rows = await db.fetch(
        "SELECT id, school_id FROM grants WHERE id = ANY($1::uuid[])", list(grant_ids)
    )
    return {r["id"]: r["school_id"] for r in rows}


async def active_grants_of(
    db: Executor, *, user_id: UUID, client_id: str | None = None, school_id: int | None = None
) -> list[Grant]:
    rows = await db.fetch(
        "SELECT * FROM grants WHERE user_id = $1 AND revoked_at IS NULL"
        " AND ($2::text IS NULL OR client_id = $2) AND ($3::bigint IS NULL OR school_id = $3)"
        " ORDER BY created_at",
        user_id,
        client_id,
        school_id,
    )
    return [_grant(r) for r in rows]


async def live_self_registered_grants(db: Executor, school_id: int) -> list[UUID]:
    """The unrevoked grants at the school of clients that registered themselves (RFC 7591):
    the school's own and platform clients alike."""
    rows = await db.fetch(
        "SELECT g.id FROM grants g JOIN clients c ON c.id = g.client_id"
        " WHERE g.school_id = $1 AND g.revoked_at IS NULL AND c.created_via = 'registration'"
        " ORDER BY g.created_at",
        school_id,
    )
    return [r["id"] for r in rows]


async def forget_self_registered_consents(db: Executor, school_id: int) -> int:
    """Forget what users at the school consented to for clients that registered themselves;
    how many consents were forgotten."""
    result: str = await db.execute(
        "DELETE FROM consents co USING clients c"
        " WHERE co.client_id = c.id AND co.school_id = $1 AND c.created_via = 'registration'",
        school_id,
    )
    return int(result.rsplit(" ", 1)[1])


async def touch_grant(db: Executor, grant_id: UUID) -> None:
    await db.execute("UPDATE grants SET last_used_at = now() WHERE id = $1", grant_id)
