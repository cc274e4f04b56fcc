"""Every SQL statement of the webhooks service.

The hot path is three statements per batch: the dispatcher records a whole stream batch of
deliveries in one INSERT, a sender claims due deliveries with FOR UPDATE SKIP LOCKED and a
lease, and the recorder writes a batch of outcomes (attempts, delivery states, subscription
failure streaks) in one transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from libs.common.db import Connection, Executor

NOTIFY_CHANNEL = "webhooks_due"

# Errors that the same statement with the same data will raise again: retrying is useless.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)


@dataclass(frozen=True, slots=True)
class Subscription:
    id: UUID
    school_id: int
    client_id: str
    grant_id: UUID
    subject: str | None
    url: str
    event_types: list[str]
    description: str
    disabled_at: datetime | None
    disabled_reason: str | None
    failing_since: datetime | None
    previous_secret_expires_at: datetime | None
    created_at: datetime
    updated_at: datetime

    @property
    def active(self) -> bool:
        return self.disabled_at is None


_SUBSCRIPTION_COLUMNS = """
    id, school_id, client_id, grant_id, subject, url, event_types, description, disabled_at,
    disabled_reason, failing_since,
    CASE WHEN previous_secret_expires_at > now() THEN previous_secret_expires_at END
        AS previous_secret_expires_at,
    created_at, updated_at
"""


def _subscription(row: asyncpg.Record) -> Subscription:
    return Subscription(
        id=row["id"],
        school_id=row["school_id"],
        client_id=row["client_id"],
        grant_id=row["grant_id"],
        subject=row["subject"],
        url=row["url"],
        event_types=list(row["event_types"]),
        description=row["description"],
        disabled_at=row["disabled_at"],
        disabled_reason=row["disabled_reason"],
        failing_since=row["failing_since"],
        previous_secret_expires_at=row["previous_secret_expires_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


# ---------------------------------------------------------------------------------------------
# Subscriptions


async def lock_grant(conn: Connection, grant_id: UUID) -> bool:
    """Serialise against revocations of the grant; True when it is already revoked."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1::uuid::text, 5))", grant_id
    )
    revoked = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM webhooks.revoked_grants WHERE grant_id = $1)", grant_id
    )
    return bool(revoked)


async def count_subscriptions(db: Executor, school_id: int, client_id: str) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM webhooks.subscriptions WHERE school_id = $1 AND client_id = $2",
            school_id,
            client_id,
        )
    )


async def insert_subscription(
    db: Executor,
    *,
    id: UUID,
    school_id: int,
    client_id: str,
    grant_id: UUID,
    subject: str | None,
    url: str,
    event_types: Sequence[str],
    description: str,
    secret_enc: bytes,
    kek_id: str,
) -> Subscription:
    row = await db.fetchrow(
        f"""
        INSERT INTO webhooks.subscriptions
            (id, school_id, client_id, grant_id, subject, url, event_types, description,
             secret_enc, kek_id)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
        RETURNING {_SUBSCRIPTION_COLUMNS}
        """,  # noqa: S608
        id,
        school_id,
        client_id,
        grant_id,
        subject,
        url,
        list(event_types),
        description,
        secret_enc,
        kek_id,
    )
    assert row is not None
    return _subscription(row)


async def list_subscriptions(
    db: Executor,
    school_id: int,
    client_id: str,
    *,
    after: tuple[datetime, UUID] | None,
    limit: int,
) -> list[Subscription]:
    rows = await db.fetch(
        f"""
        SELECT {_SUBSCRIPTION_COLUMNS} FROM webhooks.subscriptions
        WHERE school_id = $1 AND client_id = $2
          AND ($3::timestamptz IS NULL OR (created_at, id) > ($3, $4::uuid))
        ORDER BY created_at, id
        LIMIT $5
        """,  # noqa: S608
        school_id,
        client_id,
        after[0] if after else None,
        after[1] if after else None,
        limit,
    )
    return [_subscription(r) for r in rows]


async def get_subscription(
    db: Executor, subscription_id: UUID, school_id: int, client_id: str
) -> Subscription | None:
    row = await db.fetchrow(
        f"""
        SELECT {_SUBSCRIPTION_COLUMNS} FROM webhooks.subscriptions
        WHERE id = $1 AND school_id = $2 AND client_id = $3
        """,  # noqa: S608
        subscription_id,
        school_id,
        client_id,
    )
    return _subscription(row) if row else None


async def update_subscription(
    db: Executor,
    subscription_id: UUID,
    school_id: int,
    client_id: str,
    *,
    grant_id: UUID,
    subject: str | None,
    url: str | None,
    event_types: Sequence[str] | None,
    description: str | None,
    disabled: bool | None,
) -> Subscription | None:
    """Change what was given (None keeps a field); the caller's grant becomes the
    subscription's, since what it delivers must stay within what that grant authorizes."""
    row = await db.fetchrow(
        f"""
        UPDATE webhooks.subscriptions SET
            grant_id = $4,
            subject = $5,
            url = coalesce($6, url),
            event_types = coalesce($7, event_types),
            description = coalesce($8, description),
            -- What the school's admin switched off, only the admin switches on again.
            disabled_at = CASE WHEN $9::boolean IS NULL THEN disabled_at
                               WHEN $9 THEN coalesce(disabled_at, now())
                               WHEN disabled_reason = 'admin' THEN disabled_at END,
            disabled_reason = CASE WHEN $9::boolean IS NULL THEN disabled_reason
                                   WHEN $9 THEN coalesce(disabled_reason, 'client')
                                   WHEN disabled_reason = 'admin' THEN disabled_reason END,
            failing_since = CASE WHEN $9 IS FALSE THEN NULL ELSE failing_since END,
            disabled_announced_at = CASE WHEN $9 IS FALSE THEN NULL
                                         ELSE disabled_announced_at END,
            updated_at = now()
        WHERE id = $1 AND school_id = $2 AND client_id = $3
        RETURNING {_SUBSCRIPTION_COLUMNS}
        """,  # noqa: S608
        subscription_id,
        school_id,
        client_id,
        grant_id,
        subject,
        url,
        list(event_types) if event_types is not None else None,
        description,
        disabled,
    )
    return _subscription(row) if row else None


async def delete_subscription(
    db: Executor, subscription_id: UUID, school_id: int, client_id: str
) -> bool:
    deleted = await db.fetchval(
        """
        DELETE FROM webhooks.subscriptions WHERE id = $1 AND school_id = $2 AND client_id = $3
        RETURNING id
        """,
        subscription_id,
        school_id,
        client_id,
    )
    return deleted is not None


async def rotate_secret(
    db: Executor,
    subscription_id: UUID,
    school_id: int,
    client_id: str,
    *,
    secret_enc: bytes,
    kek_id: str,
    overlap_seconds: float,
) -> Subscription | None:
    """The current secret becomes the previous one, honoured for `overlap_seconds` more."""
    row = await db.fetchrow(
        f"""
        UPDATE webhooks.subscriptions SET
            previous_secret_enc = CASE WHEN $6 > 0 THEN secret_enc END,
            previous_secret_expires_at =
                CASE WHEN $6 > 0 THEN now() + $6::float8 * interval '1 second' END,
            secret_enc = $4,
            kek_id = $5,
            updated_at = now()
        WHERE id = $1 AND school_id = $2 AND client_id = $3
        RETURNING {_SUBSCRIPTION_COLUMNS}
        """,  # noqa: S608
        subscription_id,
        school_id,
        client_id,
        secret_enc,
        kek_id,
        overlap_seconds,
    )
    return _subscription(row) if row else None


# ---------------------------------------------------------------------------------------------
# Revocations


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


# ---------------------------------------------------------------------------------------------
# Dispatch: stream entries to deliveries


@dataclass(frozen=True, slots=True)
class EventRow:
    id: str
    school_id: int
    type: str
    body: bytes
    stream_id: str
    # When set, only this client's subscriptions hear the event (endpoint.disabled).
    audience_client_id: str | None = None


_RECORD_DELIVERIES = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bytea[], $5::text[],
                         $6::text[])
        AS i(event_id, school_id, type, body, stream_id, audience)
),
matched AS (
    SELECT DISTINCT i.event_id, i.school_id, i.type, s.id AS subscription_id
    FROM input i
    JOIN webhooks.subscriptions s
      ON s.school_id = i.school_id
     AND s.disabled_at IS NULL
     AND (i.type = ANY (s.event_types)
          OR split_part(i.type, '.', 1) || '.*' = ANY (s.event_types))
     AND (i.audience IS NULL OR s.client_id = i.audience)
    WHERE NOT EXISTS (SELECT 1 FROM webhooks.revoked_grants r WHERE r.grant_id = s.grant_id)
),
stored AS (
    INSERT INTO webhooks.events (school_id, id, type, body, stream_id)
    SELECT DISTINCT ON (i.school_id, i.event_id) i.school_id, i.event_id, i.type, i.body,
           i.stream_id
    FROM input i
    WHERE EXISTS (SELECT 1 FROM matched m
                  WHERE m.school_id = i.school_id AND m.event_id = i.event_id)
    ON CONFLICT (school_id, id) DO NOTHING
)
INSERT INTO webhooks.deliveries (subscription_id, school_id, event_id, event_type,
                                 next_attempt_at)
SELECT subscription_id, school_id, event_id, type, now() FROM matched
ON CONFLICT ON CONSTRAINT deliveries_once DO NOTHING
RETURNING id
"""


async def record_deliveries(db: Executor, events: Sequence[EventRow]) -> int:
    """One pending delivery per matching active subscription, for a whole batch, in one
    statement; a batch recorded twice records nothing new. Returns how many were made."""
    if not events:
        return 0
    rows = await db.fetch(
        _RECORD_DELIVERIES,
        [e.id for e in events],
        [e.school_id for e in events],
        [e.type for e in events],
        [e.body for e in events],
        [e.stream_id for e in events],
        [e.audience_client_id for e in events],
    )
    return len(rows)


async def notify_due(db: Executor) -> None:
    await db.execute(f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')")


# ---------------------------------------------------------------------------------------------
# Sending: claim, cancel, record outcomes


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
         WHERE d.status = 'pending' AND d.next_attempt_at <= now() AND d.subscription_id >= $6
         ORDER BY d.subscription_id LIMIT 1),
        (SELECT d.subscription_id FROM webhooks.deliveries d
         WHERE d.status = 'pending' AND d.next_attempt_at <= now()
         ORDER BY d.subscription_id LIMIT 1)), 1
  UNION ALL
    SELECT (SELECT d.subscription_id FROM webhooks.deliveries d
            WHERE d.status = 'pending' AND d.next_attempt_at <= now()
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
        await db.execute(
            """
            UPDATE webhooks.deliveries
            SET status = 'cancelled', next_attempt_at = NULL, locked_until = NULL,
                locked_by = NULL, updated_at = now()
            WHERE id = ANY ($1::uuid[]) AND status = 'pending'
            """,
            list(ids),
        )


async def release_leases(db: Executor, ids: Sequence[UUID]) -> None:
    """Give back deliveries leased but never sent (a sender stopping), for others to send."""
    if ids:
        await db.execute(
            """
            UPDATE webhooks.deliveries SET locked_until = NULL, locked_by = NULL
            WHERE id = ANY ($1::uuid[]) AND status = 'pending'
            """,
            list(ids),
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
    -- Cancelled while in flight (revoked, disabled) stays cancelled unless it got through.
    WHERE d.id = o.id AND (d.status = 'pending' OR o.outcome = 'delivered')
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
    db: Executor, outcomes: Sequence[Outcome], *, disable_after: float
) -> list[Disabled]:
    """Write a batch of attempts and their consequences in one statement; return the
    subscriptions this batch disabled (a 410, or failing for `disable_after` seconds), whose
    pending deliveries it then cancels."""
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
    failed = list(failures)
    rows = await db.fetch(
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
        # A separate statement: the one above may have just written these rows. Should the
        # process die in between, the claim cancels them (the subscription is disabled).
        await db.execute(_CANCEL_FOR_SUBSCRIPTIONS, [d.subscription_id for d in disabled])
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


# ---------------------------------------------------------------------------------------------
# The delivery log


@dataclass(frozen=True, slots=True)
class Attempt:
    attempted_at: datetime
    response_status: int | None
    latency_ms: int
    response_excerpt: str | None
    error: str | None
    outcome: str
    next_attempt_at: datetime | None


@dataclass(frozen=True, slots=True)
class Delivery:
    id: UUID
    subscription_id: UUID
    event_id: str
    event_type: str
    status: str
    attempt_count: int
    next_attempt_at: datetime | None
    last_response_status: int | None
    delivered_at: datetime | None
    created_at: datetime
    updated_at: datetime
    attempts: list[Attempt]


_DELIVERY_COLUMNS = """
    id, subscription_id, event_id, event_type, status, attempt_count, next_attempt_at,
    last_response_status, delivered_at, created_at, updated_at
"""


def _delivery(row: asyncpg.Record, attempts: list[Attempt]) -> Delivery:
    return Delivery(**{k: row[k] for k in row.keys()}, attempts=attempts)  # noqa: SIM118


async def _attempts_of(db: Executor, delivery_ids: Sequence[UUID]) -> dict[UUID, list[Attempt]]:
    rows = await db.fetch(
        """
        SELECT delivery_id, attempted_at, response_status, latency_ms, response_excerpt, error,
               outcome, next_attempt_at
        FROM webhooks.attempts WHERE delivery_id = ANY ($1::uuid[])
        ORDER BY delivery_id, id
        """,
        list(delivery_ids),
    )
    found: dict[UUID, list[Attempt]] = {}
    for r in rows:
        found.setdefault(r["delivery_id"], []).append(
            Attempt(
                attempted_at=r["attempted_at"],
                response_status=r["response_status"],
                latency_ms=r["latency_ms"],
                response_excerpt=r["response_excerpt"],
                error=r["error"],
                outcome=r["outcome"],
                next_attempt_at=r["next_attempt_at"],
            )
        )
    return found


async def list_deliveries(
    db: Executor,
    subscription_id: UUID,
    *,
    status: str | None,
    before: tuple[datetime, UUID] | None,
    limit: int,
) -> list[Delivery]:
    """Newest first, each with all its attempts."""
    rows = await db.fetch(
        f"""
        SELECT {_DELIVERY_COLUMNS} FROM webhooks.deliveries
        WHERE subscription_id = $1
          AND ($2::text IS NULL OR status = $2)
          AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
        ORDER BY created_at DESC, id DESC
        LIMIT $5
        """,  # noqa: S608
        subscription_id,
        status,
        before[0] if before else None,
        before[1] if before else None,
        limit,
    )
    attempts = await _attempts_of(db, [r["id"] for r in rows])
    return [_delivery(r, attempts.get(r["id"], [])) for r in rows]


async def get_delivery(db: Executor, subscription_id: UUID, delivery_id: UUID) -> Delivery | None:
    row = await db.fetchrow(
        f"SELECT {_DELIVERY_COLUMNS} FROM webhooks.deliveries WHERE id = $1"  # noqa: S608
        " AND subscription_id = $2",
        delivery_id,
        subscription_id,
    )
    if row is None:
        return None
    return _delivery(row, (await _attempts_of(db, [delivery_id])).get(delivery_id, []))


async def retry_delivery(
    db: Executor, subscription_id: UUID, delivery_id: UUID, *, only_status: str | None = None
) -> str | None:
    """Due now. A finished delivery (dead, cancelled, delivered) gets one manual attempt; a
    pending one just stops waiting. Returns the status it had, None when there is none (or,
    with `only_status`, when it is not in that status: checked under the row lock, so a
    delivery that changed meanwhile is left alone)."""
    return await db.fetchval(  # type: ignore[no-any-return]
        """
        WITH old AS (
            SELECT id, status FROM webhooks.deliveries
            WHERE id = $1 AND subscription_id = $2 FOR UPDATE
        )
        UPDATE webhooks.deliveries d SET
            status = 'pending',
            next_attempt_at = now(),
            manual = d.manual OR old.status <> 'pending',
            updated_at = now()
        FROM old WHERE d.id = old.id AND ($3::text IS NULL OR old.status = $3)
        RETURNING old.status
        """,
        delivery_id,
        subscription_id,
        only_status,
    )


# ---------------------------------------------------------------------------------------------
# School admin: every app's subscriptions of one school (the admin pages, through identity)


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
        subscription=_subscription(row),
        recent={k: int(row[k]) for k in ("pending", "delivered", "dead", "cancelled")},
        grant_revoked=bool(row["grant_revoked"]),
    )


_SCHOOL_SELECT = f"""
    SELECT s.*, c.*,
           EXISTS (SELECT 1 FROM webhooks.revoked_grants r WHERE r.grant_id = s.grant_id)
               AS grant_revoked
    FROM (SELECT {_SUBSCRIPTION_COLUMNS} FROM webhooks.subscriptions
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
        RETURNING {_SUBSCRIPTION_COLUMNS}
        """,  # noqa: S608
        subscription_id,
        school_id,
    )
    return _subscription(row) if row else None


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
        RETURNING {_SUBSCRIPTION_COLUMNS}
        """,  # noqa: S608
        subscription_id,
        school_id,
        list(refused_reasons),
    )
    return _subscription(row) if row else None


# ---------------------------------------------------------------------------------------------
# Housekeeping


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


async def purge_events(db: Executor, *, older_than_seconds: float, batch: int = 5000) -> int:
    """Forget events (and with them their deliveries and attempts) past the retention."""
    deleted = await db.fetch(
        """
        DELETE FROM webhooks.events e
        USING (SELECT school_id, id FROM webhooks.events
               WHERE received_at < now() - $1::float8 * interval '1 second'
               ORDER BY received_at LIMIT $2) old
        WHERE e.school_id = old.school_id AND e.id = old.id
          AND NOT EXISTS (SELECT 1 FROM webhooks.deliveries d
                          WHERE d.school_id = e.school_id AND d.event_id = e.id
                            AND d.status = 'pending')
        RETURNING 1
        """,
        older_than_seconds,
        batch,
    )
    return len(deleted)
