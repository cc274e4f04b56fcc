"""What an attempt leaves behind, written for a batch of attempts in one statement: the attempt
row, the delivery's new state (delivered, retry, dead), the subscription's failure streak and
its disabling (a 410, or failing for WEBHOOK_DISABLE_AFTER_SECONDS); and which disablings are
still to be announced as `endpoint.disabled`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from libs.common.db import Connection, Executor
from services.webhooks.store import ordering


@dataclass(frozen=True, slots=True)
class Outcome:
    delivery_id: UUID
    subscription_id: UUID
    attempted_at: datetime
    response_status: int | None
    latency_ms: int
    excerpt: str | None
    error: str | None
    # delivered | retry | dead | gone
    outcome: str
    retry_in: float | None = None


@dataclass(frozen=True, slots=True)
class Disabled:
    subscription_id: UUID
    school_id: int
    client_id: str
    url: str
    reason: str
    disabled_at: datetime


_RECORD_OUTCOMES = """
WITH o AS (
    SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::int[], $4::int[], $5::text[],
                         $6::text[], $7::text[], $8::float8[])
        AS o(id, at, status, latency, excerpt, error, outcome, retry_in)
),
attempts AS (
    INSERT INTO webhooks.attempts (delivery_id, attempted_at, response_status, latency_ms,
                                   response_excerpt, error, outcome, next_attempt_at)
    SELECT o.id, o.at, o.status, o.latency, o.excerpt, o.error, o.outcome,
           CASE WHEN o.outcome = 'retry' THEN now() + o.retry_in * interval '1 second' END
    FROM o
    -- A subscription deleted while its delivery was in flight takes the delivery with it.
    WHERE EXISTS (SELECT 1 FROM webhooks.deliveries d WHERE d.id = o.id)
),
deliveries AS (
    UPDATE webhooks.deliveries d SET
        status = CASE o.outcome WHEN 'delivered' THEN 'delivered'
                                WHEN 'retry' THEN 'pending' ELSE 'dead' END,
        next_attempt_at = CASE WHEN o.outcome = 'retry'
                               THEN now() + o.retry_in * interval '1 second' END,
        attempt_count = d.attempt_count + 1,
        locked_until = NULL,
        locked_by = NULL,
        manual = false,
        last_response_status = o.status,
        delivered_at = CASE WHEN o.outcome = 'delivered' THEN o.at ELSE d.delivered_at END,
        updated_at = now()
    FROM o
    -- Compare-and-set on the lease: a sender whose lease lapsed (and was taken by another,
    -- whose request may be in flight) records its attempt but leaves the delivery to the
    -- holder, so it can neither clear the holder's lease nor schedule a third attempt. A
    -- success is a success whoever got it (the holder's answer then changes nothing).
    -- Cancelled while in flight (revoked, disabled) stays cancelled unless it got through.
    WHERE d.id = o.id
      AND ((d.status = 'pending' AND d.locked_by = $14) OR o.outcome = 'delivered')
),
streak_reset AS (
    UPDATE webhooks.subscriptions SET failing_since = NULL
    WHERE id = ANY ($9::uuid[]) AND failing_since IS NOT NULL
)
-- A failure starts a streak; a 410, or a streak as long as the period, disables.
UPDATE webhooks.subscriptions s SET
    failing_since = coalesce(s.failing_since, f.failed_at),
    disabled_at = CASE
        WHEN f.gone OR coalesce(s.failing_since, f.failed_at)
                       <= now() - $13::float8 * interval '1 second' THEN now() END,
    disabled_reason = CASE
        WHEN f.gone THEN 'gone'
        WHEN coalesce(s.failing_since, f.failed_at)
             <= now() - $13::float8 * interval '1 second' THEN 'failing' END,
    updated_at = now()
FROM unnest($10::uuid[], $11::timestamptz[], $12::boolean[]) AS f(id, failed_at, gone)
WHERE s.id = f.id AND s.disabled_at IS NULL
  -- Only writes when something changes: a streak starts, a 410, or a streak long enough.
  AND (s.failing_since IS NULL OR f.gone
       OR s.failing_since <= now() - $13::float8 * interval '1 second')
RETURNING s.id, s.school_id, s.client_id, s.url, s.disabled_at, s.disabled_reason
"""


_CANCEL_FOR_SUBSCRIPTIONS = """
UPDATE webhooks.deliveries
SET status = 'cancelled', next_attempt_at = NULL, locked_until = NULL, locked_by = NULL,
    updated_at = now()
WHERE subscription_id = ANY ($1::uuid[]) AND status = 'pending'
"""


async def record_outcomes(
    db: Executor, outcomes: Sequence[Outcome], *, worker: str, disable_after: float
) -> list[Disabled]:
    """Write a batch of `worker`'s attempts and their consequences in one statement; return
    the subscriptions this batch disabled (a 410, or failing for `disable_after` seconds),
    whose pending deliveries it then cancels. A delivery whose lease `worker` no longer holds
    keeps its state (only a success changes it)."""
    if not outcomes:
        return []
    # Per subscription, the batch's last word: a success resets the failure streak, else the
    # earliest failure after the last success starts it.
    last_success: dict[UUID, datetime] = {}
    for o in outcomes:
        if o.outcome == "delivered":
            prev = last_success.get(o.subscription_id)
            if prev is None or o.attempted_at > prev:
                last_success[o.subscription_id] = o.attempted_at
    failures: dict[UUID, tuple[datetime, bool]] = {}
    for o in outcomes:
        if o.outcome == "delivered":
            continue
        since = last_success.get(o.subscription_id)
        if since is not None and o.attempted_at <= since and o.outcome != "gone":
            continue
        first, gone = failures.get(o.subscription_id, (o.attempted_at, False))
        failures[o.subscription_id] = (min(first, o.attempted_at), gone or o.outcome == "gone")
    reset = [s for s in last_success if s not in failures]
    async with ordering.transaction(db) as conn:
        disabled = await _record(conn, outcomes, reset, failures, disable_after, worker)
        # The next delivery of each finished one's resource may go now.
        await ordering.release_finished(conn, [o.delivery_id for o in outcomes])
    return disabled


async def _record(
    conn: Connection,
    outcomes: Sequence[Outcome],
    reset: list[UUID],
    failures: dict[UUID, tuple[datetime, bool]],
    disable_after: float,
    worker: str,
) -> list[Disabled]:
    failed = list(failures)
    rows = await conn.fetch(
        _RECORD_OUTCOMES,
        [o.delivery_id for o in outcomes],
        [o.attempted_at for o in outcomes],
        [o.response_status for o in outcomes],
        [o.latency_ms for o in outcomes],
        [o.excerpt for o in outcomes],
        [o.error for o in outcomes],
        [o.outcome for o in outcomes],
        [o.retry_in for o in outcomes],
        reset,
        failed,
        [failures[i][0] for i in failed],
        [failures[i][1] for i in failed],
        disable_after,
        worker,
    )
    disabled = [
        Disabled(
            subscription_id=r["id"],
            school_id=r["school_id"],
            client_id=r["client_id"],
            url=r["url"],
            reason=r["disabled_reason"],
            disabled_at=r["disabled_at"],
        )
        for r in rows
        if r["disabled_at"] is not None
    ]
    if disabled:
        # A separate statement: the one above may have just written these rows.
        await conn.execute(_CANCEL_FOR_SUBSCRIPTIONS, [d.subscription_id for d in disabled])
    return disabled


async def unannounced_disabled(db: Executor, limit: int = 100) -> list[Disabled]:
    """Subscriptions disabled by delivery failures whose endpoint.disabled event is not yet
    on the stream (the process that disabled them died before appending it)."""
    rows = await db.fetch(
        """
        SELECT id, school_id, client_id, url, disabled_reason, disabled_at
        FROM webhooks.subscriptions
        WHERE disabled_reason IN ('gone', 'failing') AND disabled_announced_at IS NULL
          -- Younger ones are still being announced by the process that disabled them.
          AND disabled_at < now() - interval '10 seconds'
        ORDER BY disabled_at
        LIMIT $1
        """,
        limit,
    )
    return [
        Disabled(r["id"], r["school_id"], r["client_id"], r["url"], r["disabled_reason"],
                 r["disabled_at"])
        for r in rows
    ]  # fmt: skip


async def mark_announced(db: Executor, disabled: Sequence[Disabled]) -> None:
    if disabled:
        await db.execute(
            """
            UPDATE webhooks.subscriptions s SET disabled_announced_at = now()
            FROM unnest($1::uuid[], $2::timestamptz[]) AS a(id, disabled_at)
            WHERE s.id = a.id AND s.disabled_at = a.disabled_at
            """,
            [d.subscription_id for d in disabled],
            [d.disabled_at for d in disabled],
        )
