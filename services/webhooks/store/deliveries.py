"""The delivery log (`webhooks.deliveries` with their `webhooks.attempts`): a subscription's
deliveries newest first, each with every attempt, and a manual retry (of a dead letter too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

import asyncpg

from libs.common.db import Executor


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
            -- A finished one sent again is a replay, outside its resource's order.
            held = d.held AND old.status = 'pending',
            updated_at = now()
        FROM old WHERE d.id = old.id AND ($3::text IS NULL OR old.status = $3)
        RETURNING old.status
        """,
        delivery_id,
        subscription_id,
        only_status,
    )
