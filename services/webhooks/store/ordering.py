"""Order per resource among a subscription's deliveries (`ordering_key`, `sequence`, `held`).

Every delivery of an ordered event is recorded held; `release` then makes sendable the
earliest held delivery of each (subscription, resource) that has none sendable pending. It
runs, in the same transaction, after deliveries are recorded and after deliveries leave
`pending` (delivered, dead, cancelled), under a transaction-scoped advisory lock per
(subscription, resource) so that two transactions (an outcome and a new event of the same
resource) cannot each leave the other's row held. A manual retry of a finished delivery is a
replay outside the order: it is never held and holds nothing back. `release_stalled` is the
safety net the housekeeping runs (a path that left a resource with only held deliveries).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from uuid import UUID

import asyncpg

from libs.common.db import Connection, Executor

Pair = tuple[UUID, str]


@asynccontextmanager
async def transaction(db: Executor) -> AsyncIterator[Connection]:
    """A transaction on `db`: on a connection of the pool, or on the connection given (a
    savepoint when it is in a transaction already)."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            yield conn
    else:
        async with db.transaction():
            yield db


_LOCK = """
SELECT pg_advisory_xact_lock(hashtextextended(p.subscription_id::text || '/' || p.ordering_key, 6))
FROM (SELECT DISTINCT * FROM unnest($1::uuid[], $2::text[]) AS p(subscription_id, ordering_key)
      ORDER BY 1, 2) p
"""

# Per pair one probe, in the order of the index (subscription, resource, held, sequence): the
# first pending delivery, sendable ones first. Sendable: nothing to do. Held: it is the
# earliest, and goes now. (Manual replays are outside the order and not looked at.)
_RELEASE = """
UPDATE webhooks.deliveries d SET held = false
FROM (SELECT DISTINCT * FROM unnest($1::uuid[], $2::text[])) AS p(subscription_id, ordering_key)
CROSS JOIN LATERAL (
    SELECT h.id, h.held FROM webhooks.deliveries h
    WHERE h.subscription_id = p.subscription_id AND h.ordering_key = p.ordering_key
      AND h.status = 'pending' AND (h.held OR NOT h.manual)
    ORDER BY h.held, h.sequence LIMIT 1
) first
WHERE d.id = first.id AND first.held
"""


async def release(conn: Connection, pairs: Sequence[Pair]) -> None:
    """In the caller's transaction: for each (subscription, resource), make the earliest held
    delivery sendable unless one is sendable already."""
    if not pairs:
        return
    subscriptions = [p[0] for p in pairs]
    keys = [p[1] for p in pairs]
    await conn.execute(_LOCK, subscriptions, keys)
    await conn.execute(_RELEASE, subscriptions, keys)


async def release_finished(conn: Connection, delivery_ids: Sequence[UUID]) -> None:
    """In the caller's transaction, after these deliveries may have left `pending`: release
    the next of each one's resource."""
    if not delivery_ids:
        return
    rows = await conn.fetch(
        "SELECT DISTINCT subscription_id, ordering_key FROM webhooks.deliveries"
        " WHERE id = ANY ($1::uuid[]) AND ordering_key IS NOT NULL AND status <> 'pending'",
        list(delivery_ids),
    )
    await release(conn, [(r["subscription_id"], r["ordering_key"]) for r in rows])


async def release_stalled(db: Executor, limit: int = 1000) -> int:
    """Resources whose pending deliveries are all held (none sendable): release the earliest
    of each. Nothing normally leaves one so; this is the net under that claim."""
    async with transaction(db) as conn:
        # Every resource with a held delivery is looked at; `release` leaves alone those with
        # one sendable.
        rows = await conn.fetch(
            "SELECT DISTINCT subscription_id, ordering_key FROM webhooks.deliveries"
            " WHERE status = 'pending' AND held LIMIT $1",
            limit,
        )
        pairs = [(r["subscription_id"], r["ordering_key"]) for r in rows]
        await conn.execute(_LOCK, [p[0] for p in pairs], [p[1] for p in pairs])
        released = await conn.execute(_RELEASE, [p[0] for p in pairs], [p[1] for p in pairs])
    return int(released.split()[-1])
