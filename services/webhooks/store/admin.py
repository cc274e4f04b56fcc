"""The school admin's view (the admin pages, through identity's calls to the internal API):
every app's subscriptions of one school with their recent deliveries counted, and the admin's
disable and enable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from libs.common.db import Connection, Executor
from services.webhooks.store.subscriptions import (
    SUBSCRIPTION_COLUMNS,
    Subscription,
    subscription_from_row,
)


@dataclass(frozen=True, slots=True)
class SchoolSubscription:
    subscription: Subscription
    # Deliveries made in the recent window, by status.
    recent: dict[str, int]
    grant_revoked: bool


_RECENT_COUNTS = """
    LEFT JOIN LATERAL (
        SELECT count(*) FILTER (WHERE d.status = 'pending') AS pending,
               count(*) FILTER (WHERE d.status = 'delivered') AS delivered,
               count(*) FILTER (WHERE d.status = 'dead') AS dead,
               count(*) FILTER (WHERE d.status = 'cancelled') AS cancelled
        FROM webhooks.deliveries d
        WHERE d.subscription_id = s.id
          AND d.created_at > now() - $2::float8 * interval '1 second'
    ) c ON true
"""


def _school_subscription(row: asyncpg.Record) -> SchoolSubscription:
    return SchoolSubscription(
        subscription=subscription_from_row(row),
        recent={k: int(row[k]) for k in ("pending", "delivered", "dead", "cancelled")},
        grant_revoked=bool(row["grant_revoked"]),
    )


_SCHOOL_SELECT = f"""
    SELECT s.*, c.*,
           EXISTS (SELECT 1 FROM webhooks.revoked_grants r WHERE r.grant_id = s.grant_id)
               AS grant_revoked
    FROM (SELECT {SUBSCRIPTION_COLUMNS} FROM webhooks.subscriptions
          WHERE school_id = $1) s
    {_RECENT_COUNTS}
"""  # noqa: S608


async def school_subscriptions(
    db: Executor,
    school_id: int,
    *,
    recent_seconds: float,
    before: tuple[datetime, UUID] | None,
    limit: int,
) -> list[SchoolSubscription]:
    """The school's subscriptions over all its apps, newest first, after the keyset `before`."""
    rows = await db.fetch(
        _SCHOOL_SELECT
        + """
        WHERE ($3::timestamptz IS NULL OR (s.created_at, s.id) < ($3, $4::uuid))
        ORDER BY s.created_at DESC, s.id DESC
        LIMIT $5
        """,
        school_id,
        recent_seconds,
        before[0] if before else None,
        before[1] if before else None,
        limit,
    )
    return [_school_subscription(r) for r in rows]


async def school_subscription(
    db: Executor, school_id: int, subscription_id: UUID, *, recent_seconds: float
) -> SchoolSubscription | None:
    """One subscription, only when it is this school's."""
    row = await db.fetchrow(
        _SCHOOL_SELECT + " WHERE s.id = $3", school_id, recent_seconds, subscription_id
    )
    return _school_subscription(row) if row else None


async def admin_disable(db: Executor, school_id: int, subscription_id: UUID) -> Subscription | None:
    """Off, by the school's admin; one already off keeps the reason it has (the earlier cause
    stays the one to fix). Pending deliveries are cancelled as the sender claims them."""
    row = await db.fetchrow(
        f"""
        UPDATE webhooks.subscriptions SET
            disabled_at = coalesce(disabled_at, now()),
            disabled_reason = coalesce(disabled_reason, 'admin'),
            updated_at = now()
        WHERE id = $1 AND school_id = $2
        RETURNING {SUBSCRIPTION_COLUMNS}
        """,  # noqa: S608
        subscription_id,
        school_id,
    )
    return subscription_from_row(row) if row else None


async def admin_enable(
    conn: Connection, school_id: int, subscription_id: UUID, *, refused_reasons: Sequence[str]
) -> Subscription | None:
    """On again with a clean failure streak, unless its reason is one of `refused_reasons`.
    Call within a transaction holding `lock_grant` of its grant, so a revocation cannot land
    in between."""
    row = await conn.fetchrow(
        f"""
        UPDATE webhooks.subscriptions SET
            disabled_at = NULL,
            disabled_reason = NULL,
            failing_since = NULL,
            disabled_announced_at = NULL,
            updated_at = now()
        WHERE id = $1 AND school_id = $2
          AND (disabled_reason IS NULL OR NOT disabled_reason = ANY ($3::text[]))
          AND NOT EXISTS (SELECT 1 FROM webhooks.revoked_grants r
                          WHERE r.grant_id = webhooks.subscriptions.grant_id)
        RETURNING {SUBSCRIPTION_COLUMNS}
        """,  # noqa: S608
        subscription_id,
        school_id,
        list(refused_reasons),
    )
    return subscription_from_row(row) if row else None
