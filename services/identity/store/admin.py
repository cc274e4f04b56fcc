"""SQL of the school admin pages: the school's audit trail with filters, and member lookups.

Every query takes the school's id from the request's Host, never from the form, so an admin
reads and changes only their own school's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from libs.common.db import Executor


@dataclass(frozen=True, slots=True)
class AuditFilters:
    since: datetime | None = None
    until: datetime | None = None
    client_id: str | None = None
    # The subject as audit records spell it: a user id, or a client id for client_credentials.
    subject: str | None = None
    action: str | None = None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    occurred_at: datetime
    action: str
    client_id: str | None
    client_name: str | None
    subject: str | None
    user_email: str | None
    grant_id: UUID | None
    method: str | None
    path: str | None
    status: int | None
    scope: str | None
    ip: str | None
    detail: dict[str, Any]


def _entry(r: asyncpg.Record) -> AuditEntry:
    return AuditEntry(
        r["id"],
        r["occurred_at"],
        r["action"],
        r["client_id"],
        r["client_name"],
        r["subject"],
        r["user_email"],
        r["grant_id"],
        r["method"],
        r["path"],
        r["status"],
        r["scope"],
        str(r["ip"]) if r["ip"] is not None else None,
        r["detail"] or {},
    )


async def audit_entries(
    db: Executor,
    school_id: int,
    filters: AuditFilters,
    *,
    before: tuple[datetime, int] | None,
    limit: int,
) -> list[AuditEntry]:
    """The school's audit records matching `filters`, newest first, after the keyset `before`."""
    at, last_id = before if before else (None, None)
    rows = await db.fetch(
        "SELECT a.id, a.occurred_at, a.action, a.client_id, c.name AS client_name, a.subject,"
        " u.email AS user_email, a.grant_id, a.method, a.path, a.status, a.scope, a.ip,"
        " a.detail"
        " FROM audit_log a"
        " LEFT JOIN clients c ON c.id = a.client_id"
        # Subjects are user ids or client ids; only the former name a user.
        " LEFT JOIN users u ON u.id = CASE WHEN a.subject ~"
        " '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'"
        " THEN a.subject::uuid END"
        " WHERE a.school_id = $1"
        " AND ($2::timestamptz IS NULL OR a.occurred_at >= $2)"
        " AND ($3::timestamptz IS NULL OR a.occurred_at < $3)"
        " AND ($4::text IS NULL OR a.client_id = $4)"
        " AND ($5::text IS NULL OR a.subject = $5)"
        " AND ($6::text IS NULL OR a.action = $6)"
        " AND ($7::timestamptz IS NULL OR (a.occurred_at, a.id) < ($7, $8::bigint))"
        " ORDER BY a.occurred_at DESC, a.id DESC LIMIT $9",
        school_id,
        filters.since,
        filters.until,
        filters.client_id,
        filters.subject,
        filters.action,
        at,
        last_id,
        limit,
    )
    return [_entry(r) for r in rows]


async def member_by_email(db: Executor, school_id: int, email: str) -> UUID | None:
    """A member of this school by email; other schools' users stay invisible to its admins."""
    user_id: UUID | None = await db.fetchval(
        "SELECT u.id FROM users u JOIN school_memberships m ON m.user_id = u.id"
        " WHERE m.school_id = $1 AND lower(u.email) = lower($2)",
        school_id,
        email.strip(),
    )
    return user_id


async def email_of_member(db: Executor, school_id: int, user_id: UUID) -> str | None:
    email: str | None = await db.fetchval(
        "SELECT u.email FROM users u JOIN school_memberships m ON m.user_id = u.id"
        " WHERE m.school_id = $1 AND u.id = $2",
        school_id,
        user_id,
    )
    return email
