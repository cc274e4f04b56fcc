"""SQL of the account pages: a user's grants and consents at a school, and their own audit trail.

Everything here is keyed by the signed-in user's id, so no query can return another user's
rows whatever ids a request names.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from libs.common.db import Executor


@dataclass(frozen=True, slots=True)
class LiveGrant:
    id: UUID
    client_id: str
    client_name: str
    scopes: tuple[str, ...]
    created_at: datetime
    # Tokens issued or refreshed (grants.last_used_at) and API calls the gateway recorded.
    token_used_at: datetime | None
    api_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class RememberedConsent:
    client_id: str
    client_name: str
    scopes: tuple[str, ...]
    granted_at: datetime


@dataclass(frozen=True, slots=True)
class ActivityRow:
    id: int
    occurred_at: datetime
    action: str
    client_id: str | None
    client_name: str | None
    grant_id: UUID | None
    method: str | None
    path: str | None
    status: int | None
    scope: str | None
    detail: dict[str, Any]


async def live_grants(db: Executor, *, user_id: UUID, school_id: int) -> list[LiveGrant]:
    """The user's unrevoked grants at the school, newest first, with when each was last used.

    The API-call lookup walks audit_log's (subject, occurred_at) index backwards and stops at
    the first call of the grant, so it stays cheap for users with long histories.
    """
    rows = await db.fetch(
        "SELECT g.id, g.client_id, c.name AS client_name, g.scopes, g.created_at,"
        " g.last_used_at,"
        " (SELECT a.occurred_at FROM audit_log a WHERE a.subject = $3"
        "  AND a.grant_id = g.id AND a.action = 'api.call'"
        "  ORDER BY a.occurred_at DESC LIMIT 1) AS api_used_at"
        " FROM grants g JOIN clients c ON c.id = g.client_id"
        " WHERE g.user_id = $1 AND g.school_id = $2 AND g.revoked_at IS NULL"
        " ORDER BY g.created_at DESC",
        user_id,
        school_id,
        str(user_id),
    )
    return [
        LiveGrant(
            r["id"],
            r["client_id"],
            r["client_name"],
            tuple(r["scopes"]),
            r["created_at"],
            r["last_used_at"],
            r["api_used_at"],
        )
        for r in rows
    ]


async def remembered_consents(
    db: Executor, *, user_id: UUID, school_id: int
) -> list[RememberedConsent]:
    rows = await db.fetch(
        "SELECT co.client_id, c.name AS client_name, co.scopes, co.granted_at"
        " FROM consents co JOIN clients c ON c.id = co.client_id"
        " WHERE co.user_id = $1 AND co.school_id = $2",
        user_id,
        school_id,
    )
    return [
        RememberedConsent(r["client_id"], r["client_name"], tuple(r["scopes"]), r["granted_at"])
        for r in rows
    ]


async def live_grant_ids_of_app(
    db: Executor, *, user_id: UUID, school_id: int, client_id: str
) -> list[UUID]:
    rows = await db.fetch(
        "SELECT id FROM grants WHERE user_id = $1 AND school_id = $2 AND client_id = $3"
        " AND revoked_at IS NULL",
        user_id,
        school_id,
        client_id,
    )
    return [r["id"] for r in rows]


def _activity(r: asyncpg.Record) -> ActivityRow:
    return ActivityRow(
        r["id"],
        r["occurred_at"],
        r["action"],
        r["client_id"],
        r["client_name"],
        r["grant_id"],
        r["method"],
        r["path"],
        r["status"],
        r["scope"],
        r["detail"] or {},
    )


async def activity(
    db: Executor,
    *,
    user_id: UUID,
    school_id: int,
    before: tuple[datetime, int] | None,
    limit: int,
) -> list[ActivityRow]:
    """The user's own audit records at the school, newest first, after the keyset `before`.

    Records name the user as their subject: API calls made with the user's tokens, tokens
    issued and refreshed for them, grants and consents, sign-ins.
    """
    at, last_id = before if before else (None, None)
    rows = await db.fetch(
        "SELECT a.id, a.occurred_at, a.action, a.client_id, c.name AS client_name, a.grant_id,"
        " a.method, a.path, a.status, a.scope, a.detail"
        " FROM audit_log a LEFT JOIN clients c ON c.id = a.client_id"
        " WHERE a.subject = $1 AND a.school_id = $2"
        " AND ($3::timestamptz IS NULL OR (a.occurred_at, a.id) < ($3, $4::bigint))"
        " ORDER BY a.occurred_at DESC, a.id DESC LIMIT $5",
        str(user_id),
        school_id,
        at,
        last_id,
        limit,
    )
    return [_activity(r) for r in rows]
