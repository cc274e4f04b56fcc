"""Events as received from `connect:events` (`webhooks.events`) and their fan-out: one stored
body per event, one pending delivery per matching active subscription, a whole stream batch in
one statement; and their retention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from libs.common.db import Connection, Executor
from services.webhooks.store import ordering


@dataclass(frozen=True, slots=True)
class EventRow:
    id: str
    school_id: int
    type: str
    body: bytes
    # The connect:events entry it came from; None for what the service records itself.
    stream_id: str | None
    # When set, only this client's subscriptions hear the event (endpoint.disabled).
    audience_client_id: str | None = None
    # The resource the event is about (within its school) and its place in that resource's
    # history: a subscription gets a resource's events one at a time, in this order.
    ordering_key: str | None = None
    sequence: int | None = None


_RECORD_DELIVERIES = """
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bytea[], $5::text[],
                         $6::text[], $7::text[], $8::bigint[])
        AS i(event_id, school_id, type, body, stream_id, audience, ordering_key, sequence)
),
matched AS (
    SELECT DISTINCT ON (i.event_id, s.id) i.event_id, i.school_id, i.type, i.ordering_key,
           i.sequence, s.id AS subscription_id
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
-- Ordered ones are recorded held: `ordering.release` then lets the earliest go.
INSERT INTO webhooks.deliveries (subscription_id, school_id, event_id, event_type,
                                 next_attempt_at, ordering_key, sequence, held)
SELECT subscription_id, school_id, event_id, type, now(), ordering_key, sequence,
       ordering_key IS NOT NULL
FROM matched
ON CONFLICT ON CONSTRAINT deliveries_once DO NOTHING
RETURNING subscription_id, ordering_key
"""


async def record_deliveries(db: Executor, events: Sequence[EventRow]) -> int:
    """One pending delivery per matching active subscription, for a whole batch, in one
    statement (and one more for the order per resource); a batch recorded twice records
    nothing new. Returns how many were made."""
    if not events:
        return 0
    async with ordering.transaction(db) as conn:
        rows = await _record(conn, events)
        await ordering.release(
            conn, sorted({(r["subscription_id"], r["ordering_key"]) for r in rows
                          if r["ordering_key"] is not None})
        )  # fmt: skip
    return len(rows)


async def _record(conn: Connection, events: Sequence[EventRow]) -> list[asyncpg.Record]:
    return await conn.fetch(
        _RECORD_DELIVERIES,
        [e.id for e in events],
        [e.school_id for e in events],
        [e.type for e in events],
        [e.body for e in events],
        [e.stream_id for e in events],
        [e.audience_client_id for e in events],
        [e.ordering_key for e in events],
        [e.sequence for e in events],
    )


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
