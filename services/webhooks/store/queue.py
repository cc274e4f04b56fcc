"""The pending deliveries as a work queue shared by every sender: claim due ones with
FOR UPDATE SKIP LOCKED and a lease (fair across subscriptions, bounded per subscription, one
at a time per subscription and resource, in the resource's order), renew, release or cancel
leases, wake senders (NOTIFY), and the queue's depth.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from uuid import UUID

from libs.common.db import Executor
from services.webhooks.store import ordering

NOTIFY_CHANNEL = "webhooks_due"


@dataclass(frozen=True, slots=True)
class Claimed:
    id: UUID
    subscription_id: UUID
    school_id: int
    client_id: str
    event_id: str
    attempt_count: int
    manual: bool
    url: str
    grant_id: UUID
    active: bool
    secret_enc: bytes
    previous_secret_enc: bytes | None
    body: bytes


_CLAIM = """
WITH RECURSIVE busy AS (
    SELECT subscription_id, count(*)::int AS n
    FROM webhooks.deliveries
    WHERE locked_until IS NOT NULL AND locked_until > now()
    GROUP BY subscription_id
),
-- The subscriptions with something due, one index probe each (a skip scan), starting at a
-- random one so that, when more are due than one claim visits, none waits for ever.
due_subs (subscription_id, depth) AS (
    SELECT coalesce(
        (SELECT d.subscription_id FROM webhooks.deliveries d
         WHERE d.status = 'pending' AND NOT d.held AND d.next_attempt_at <= now()
           AND d.subscription_id >= $6
         ORDER BY d.subscription_id LIMIT 1),
        (SELECT d.subscription_id FROM webhooks.deliveries d
         WHERE d.status = 'pending' AND NOT d.held AND d.next_attempt_at <= now()
         ORDER BY d.subscription_id LIMIT 1)), 1
  UNION ALL
    SELECT (SELECT d.subscription_id FROM webhooks.deliveries d
            WHERE d.status = 'pending' AND NOT d.held AND d.next_attempt_at <= now()
              AND d.subscription_id > due_subs.subscription_id
            ORDER BY d.subscription_id LIMIT 1), due_subs.depth + 1
    FROM due_subs
    WHERE due_subs.subscription_id IS NOT NULL AND due_subs.depth < $3
),
-- Of each, the oldest due deliveries no one holds, up to its share of leases.
picked AS (
    SELECT c.id, c.next_attempt_at, c.rn + coalesce(b.n, 0) AS slot
    FROM due_subs s
    LEFT JOIN busy b ON b.subscription_id = s.subscription_id
    CROSS JOIN LATERAL (
        SELECT d.id, d.next_attempt_at,
               row_number() OVER (ORDER BY d.next_attempt_at) AS rn
        FROM webhooks.deliveries d
        WHERE d.subscription_id = s.subscription_id AND d.status = 'pending'
          AND d.next_attempt_at <= now()
          AND (d.locked_until IS NULL OR d.locked_until <= now())
          -- Not while an earlier delivery of its resource is pending (store/ordering.py).
          AND NOT d.held
        ORDER BY d.next_attempt_at
        -- A plain parameter: an expression here makes the planner guess a tenth of the
        -- table per subscription, and the guess costs a JIT compilation per claim.
        LIMIT $1
    ) c
    WHERE s.subscription_id IS NOT NULL
      -- A slow endpoint's share is smaller: its leases would only wait.
      AND c.rn + coalesce(b.n, 0)
          <= CASE WHEN s.subscription_id = ANY ($7::uuid[]) THEN $8 ELSE $1 END
),
chosen AS (
    -- Picked without locks; only what is taken gets locked (skipped when another sender
    -- holds it, re-checked when another sender has just leased it).
    -- An array, so the planner looks the few ids up by key instead of joining the table.
    SELECT d.id FROM webhooks.deliveries d
    WHERE d.id = ANY (ARRAY(SELECT picked.id FROM picked
                            -- Round-robin: every endpoint's first due delivery before any
                            -- endpoint's second.
                            ORDER BY picked.slot, picked.next_attempt_at
                            LIMIT $2))
      AND d.status = 'pending' AND (d.locked_until IS NULL OR d.locked_until <= now())
    FOR UPDATE SKIP LOCKED
)
UPDATE webhooks.deliveries d
SET locked_until = now() + $4::float8 * interval '1 second', locked_by = $5
FROM chosen, webhooks.subscriptions s, webhooks.events e
WHERE d.id = chosen.id AND s.id = d.subscription_id
  AND e.school_id = d.school_id AND e.id = d.event_id
RETURNING d.id, d.subscription_id, d.school_id, s.client_id, d.event_id, d.attempt_count,
          d.manual, s.url, s.grant_id, s.disabled_at IS NULL AS active, s.secret_enc,
          CASE WHEN s.previous_secret_expires_at > now() THEN s.previous_secret_enc END
              AS previous_secret_enc,
          e.body
"""


async def claim_due(
    db: Executor,
    *,
    per_endpoint: int,
    per_slow_endpoint: int,
    slow: Sequence[UUID],
    limit: int,
    lease_seconds: float,
    worker: str,
) -> list[Claimed]:
    """Lease up to `limit` due deliveries, never more than `per_endpoint` leased for one
    subscription at a time (`per_slow_endpoint` for those in `slow`), counting every
    process's leases."""
    rows = await db.fetch(
        _CLAIM,
        per_endpoint,
        limit,
        # Subscriptions visited per claim.
        min(limit, 256),
        lease_seconds,
        worker,
        uuid.uuid4(),
        list(slow),
        per_slow_endpoint,
    )
    return [
        Claimed(
            id=r["id"],
            subscription_id=r["subscription_id"],
            school_id=r["school_id"],
            client_id=r["client_id"],
            event_id=r["event_id"],
            attempt_count=r["attempt_count"],
            manual=r["manual"],
            url=r["url"],
            grant_id=r["grant_id"],
            active=r["active"],
            secret_enc=r["secret_enc"],
            previous_secret_enc=r["previous_secret_enc"],
            body=bytes(r["body"]),
        )
        for r in rows
    ]


async def cancel_deliveries(db: Executor, ids: Sequence[UUID]) -> None:
    """Deliveries that must not be sent (grant revoked, subscription disabled)."""
    if ids:
        async with ordering.transaction(db) as conn:
            await conn.execute(
                """
                UPDATE webhooks.deliveries
                SET status = 'cancelled', next_attempt_at = NULL, locked_until = NULL,
                    locked_by = NULL, updated_at = now()
                WHERE id = ANY ($1::uuid[]) AND status = 'pending'
                """,
                list(ids),
            )
            await ordering.release_finished(conn, ids)


async def release_leases(db: Executor, ids: Sequence[UUID], worker: str) -> None:
    """Give back deliveries `worker` leased but never sent (a sender stopping), for others to
    send; one whose lease it lost meanwhile is another's now and stays so."""
    if ids:
        await db.execute(
            """
            UPDATE webhooks.deliveries SET locked_until = NULL, locked_by = NULL
            WHERE id = ANY ($1::uuid[]) AND status = 'pending' AND locked_by = $2
            """,
            list(ids),
            worker,
        )


async def renew_leases(
    db: Executor, ids: Sequence[UUID], worker: str, lease_seconds: float
) -> None:
    """Extend the leases `worker` still holds; one it lost (it ran out and another sender
    took the delivery) stays lost."""
    await db.execute(
        """
        UPDATE webhooks.deliveries
        SET locked_until = now() + $3::float8 * interval '1 second'
        WHERE id = ANY ($1::uuid[]) AND locked_by = $2 AND status = 'pending'
        """,
        list(ids),
        worker,
        lease_seconds,
    )


async def notify_due(db: Executor) -> None:
    await db.execute(f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')")


async def queue_depth(db: Executor) -> tuple[int, int]:
    """Pending deliveries: how many are due now, and how many in all."""
    row = await db.fetchrow(
        """
        SELECT count(*) FILTER (WHERE next_attempt_at <= now()) AS due, count(*) AS pending
        FROM webhooks.deliveries WHERE status = 'pending'
        """
    )
    assert row is not None
    return int(row["due"]), int(row["pending"])
