"""Revoked grants (`webhooks.revoked_grants`), remembered as they are announced (or found
marked before the announcement came), so nothing of theirs is subscribed or delivered again:
revoking disables their subscriptions and cancels what they had pending. A per-grant advisory
lock orders a subscription change against a revocation of its grant.
"""

from __future__ import annotations

from collections.abc import Sequence
from uuid import UUID

import asyncpg

from libs.common.db import Connection


async def lock_grant(conn: Connection, grant_id: UUID) -> bool:
    """Serialise against revocations of the grant; True when it is already revoked."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 5))", grant_id
    )
    revoked = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM webhooks.revoked_grants WHERE grant_id = $1)", grant_id
    )
    return bool(revoked)


async def revoke_grants(db: asyncpg.Pool, grants: Sequence[tuple[UUID, str]]) -> list[UUID]:
    """Remember the grants as revoked, disable their subscriptions and cancel what they had
    pending; return the subscriptions this disabled."""
    if not grants:
        return []
    ids = sorted({g for g, _ in grants})
    reasons = dict(grants)
    async with db.acquire() as conn, conn.transaction():
        # Sorted, so two processes applying overlapping batches cannot deadlock.
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(g::text, 5))"
            " FROM unnest($1::uuid[]) AS g ORDER BY g",
            ids,
        )
        await conn.execute(
            """
            INSERT INTO webhooks.revoked_grants (grant_id, reason)
            SELECT * FROM unnest($1::uuid[], $2::text[]) ON CONFLICT (grant_id) DO NOTHING
            """,
            ids,
            [reasons[g] for g in ids],
        )
        disabled = await conn.fetch(
            """
            UPDATE webhooks.subscriptions
            SET disabled_at = now(), disabled_reason = 'grant_revoked', updated_at = now()
            WHERE grant_id = ANY ($1::uuid[]) AND disabled_at IS NULL
            RETURNING id
            """,
            ids,
        )
        await conn.execute(
            """
            UPDATE webhooks.deliveries d
            SET status = 'cancelled', next_attempt_at = NULL, locked_until = NULL,
                locked_by = NULL, updated_at = now()
            FROM webhooks.subscriptions s
            WHERE s.grant_id = ANY ($1::uuid[]) AND d.subscription_id = s.id
              AND d.status = 'pending'
            """,
            ids,
        )
    return [r["id"] for r in disabled]
