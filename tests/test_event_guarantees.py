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
import dataclasses
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest
import redis.asyncio as redis_asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpServer

from libs.common import db, redis_client, streams
from libs.common.config import Settings, load_settings
from services.school_api import resources
from services.school_api import store as school_store
from services.school_api.app import create_app as create_school_api
from services.school_api.outbox import OutboxRelay, RunChanged
from services.webhooks import dispatcher, signing, ssrf
from services.webhooks.app import create_app as create_webhooks
from services.webhooks.context import WebhooksContext
from services.webhooks.metrics import WebhookMetrics
from services.webhooks.store import deliveries as delivery_store
from services.webhooks.store import events as event_store
from services.webhooks.store import outcomes as outcome_store
from services.webhooks.store import queue as queue_store
from services.webhooks.store import subscriptions as subscription_store
from services.webhooks.store.events import EventRow
from tests.support import (
    ExampleResolver,
    base_url,
    database_env,
    free_port,
    kill_process,
    migrated_database,
    settings_on_own_redis,
    start_redis,
    statement_cache,
    without_handler_cancellation,
)
from tests.test_crash_recovery import receiving
from tests.test_school_api_events import call, who
from tests.test_webhooks import Api, Caller, _ok, eventually

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
async def own_database(base_env: dict[str, str]) -> AsyncIterator[str]:
    async with migrated_database(base_env, "_events") as url:
        yield url


@pytest.fixture
async def own_pool(own_database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.create_pool(
        own_database, min_size=1, max_size=8, statement_cache=statement_cache()
    )
    yield pool
    await pool.close()


def own_settings(webhooks_env: dict[str, str], database_url: str, redis_port: int) -> Settings:
    """The school API and webhooks of one test: this module's database, a redis-server of
    the test's own, a key prefix of its own."""
    return settings_on_own_redis(webhooks_env, database_url, redis_port, "ev")


async def serve(aiohttp_server: AiohttpServer, app: Any) -> str:
    server = await aiohttp_server(app, access_log=None, shutdown_timeout=1)
    return base_url(without_handler_cancellation(server))


async def settle_everything(pool: asyncpg.Pool) -> None:
    """Earlier tests' outbox rows out of the way, as if published and settled long ago (a
    relay would otherwise publish again what another Redis took and never acknowledged)."""
    await pool.execute(
        "UPDATE school_api.outbox SET published_at = coalesce(published_at, now()),"
        " settled_at = now() WHERE settled_at IS NULL"
    )


def new_school() -> int:
    return 1_000_000 + secrets.randbelow(1_000_000_000)


async def subscription(
    pool: asyncpg.Pool,
    settings: Settings,
    school_id: int,
    url: str,
    types: tuple[str, ...] = ("course.*",),
) -> uuid.UUID:
    """Straight into the store, sealed as the API seals it (other tests here start webhooks
    processes on this database, which check that they can open every secret)."""
    sid = uuid.uuid4()
    kek = settings.key_encryption_key
    made = await subscription_store.insert_subscription(
        pool,
        id=sid,
        school_id=school_id,
        client_id="client-a",
        grant_id=uuid.uuid4(),
        subject=None,
        url=url,
        event_types=list(types),
        description="",
        secret_enc=signing.seal(kek, sid, signing.new_secret()[1]),
        kek_id=signing.kek_id(kek),
    )
    return made.id


# -------------------------------------------------------------------------------------------------
# One sender at a time


async def test_a_sender_whose_lease_lapsed_cannot_undo_the_new_holders_lease(
    own_pool: asyncpg.Pool, settings: Settings
) -> None:
    """Sender A claims a delivery, stalls past its lease; sender B claims it and is sending.
    A's outcome (a failure, to be retried) is recorded as an attempt but leaves B's lease,
    and schedules nothing: only B's outcome decides what happens next."""
    school = new_school()
    sub = await subscription(own_pool, settings, school, "https://hooks.example.com/a")
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
    # A stopping, or unsure, A gives back what it thinks it holds: B keeps it.
    await queue_store.release_leases(own_pool, [by_a.id], "sender-a")
    assert (
        await own_pool.fetchval("SELECT locked_by FROM webhooks.deliveries WHERE id = $1", by_a.id)
        == "sender-b"
    )
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


# -------------------------------------------------------------------------------------------------
# Never lost


async def test_events_a_redis_lost_before_the_dispatcher_read_them_are_delivered_once(
    webhooks_env: dict[str, str],
    own_database: str,
    own_pool: asyncpg.Pool,
    aiohttp_server: AiohttpServer,
) -> None:
    """The school API publishes five events to a redis-server of the test's own; no
    dispatcher runs yet. Redis is SIGKILLed and started again empty (no persistence) on the
    same port: the entries are gone. A webhooks process then starts: every event reaches the
    receiver exactly once, and the outbox rows settle once the dispatcher has them."""
    port = free_port()
    settings = own_settings(webhooks_env, own_database, port)
    stream = settings.stream(streams.EVENTS)
    school = new_school()
    redis_proc = await start_redis(port)
    try:
        async with receiving(aiohttp_server, _ok) as receiver, aiohttp.ClientSession() as http:
            # Subscribed through a webhooks process that runs no workers (it reads nothing).
            hooks = await serve(
                aiohttp_server,
                create_webhooks(settings, workers=False, resolver=ExampleResolver()),
            )
            await Api(http, hooks, settings).subscribe(Caller(school), receiver.url)

            school_api = await serve(aiohttp_server, create_school_api(settings))
            courses, headers = f"{school_api}/api/v1/courses", who(settings, school)
            made = []
            for n in range(3):
                status, body = await call(http, "POST", courses, headers, {"title": f"C{n}"})
                assert status == 201, body
                made.append(body)
            status, _ = await call(
                http, "PATCH", f"{courses}/{made[0]['id']}", headers, {"title": "C0 again"}
            )
            assert status == 200
            status, _ = await call(http, "DELETE", f"{courses}/{made[1]['id']}", headers)
            assert status == 204

            async def all_on_the_stream() -> bool:
                rows = await school_store.outbox_events_for(own_pool, school)
                return len(rows) == 5 and all(r["published_at"] for r in rows)

            await eventually(all_on_the_stream, timeout=10)
            async with redis_asyncio.Redis(port=port) as client:
                assert await client.xlen(stream) == 5

            await kill_process(redis_proc)
            redis_proc = await start_redis(port)  # empty: the five entries are gone

            await serve(aiohttp_server, create_webhooks(settings, resolver=ExampleResolver()))
            got = await receiver.wait_for(5, timeout=20)
            rows = await school_store.outbox_events_for(own_pool, school)
            assert sorted(g.headers["webhook-id"] for g in got) == sorted(
                str(r["event_id"]) for r in rows
            )

            async def settled() -> bool:
                found = await school_store.outbox_events_for(own_pool, school)
                return all(r["settled_at"] is not None for r in found)

            await eventually(settled, timeout=10)
            # Past more relay rounds and dispatcher reads: still one delivery each.
            await asyncio.sleep(1.5)
            assert len(receiver.received) == 5
    finally:
        await kill_process(redis_proc)


# -------------------------------------------------------------------------------------------------
# In order per resource


async def test_each_subscription_gets_a_resources_events_in_commit_order(
    webhooks_env: dict[str, str],
    own_database: str,
    own_pool: asyncpg.Pool,
    aiohttp_server: AiohttpServer,
) -> None:
    """Six courses, each changed eight times by writers racing each other, then deleted; two
    relays publish in small batches, two webhooks processes (two dispatchers, two senders,
    four requests per endpoint at once) deliver, and the receiver fails the first attempt of
    about a quarter of the events (retried 0.2 s later). Per course, the events the receiver
    accepted arrive exactly in the order their changes committed."""
    settings = load_settings(
        {
            **webhooks_env,
            **database_env(webhooks_env, own_database),
            "REDIS_KEY_PREFIX": f"{webhooks_env['REDIS_KEY_PREFIX']}order{secrets.token_hex(3)}:",
        }
    )
    school = new_school()
    accepted: list[dict[str, Any]] = []
    failed_once: set[str] = set()

    async def flaky(_n: int, request: web.Request) -> web.StreamResponse:
        webhook_id = request.headers["webhook-id"]
        event = await request.json()
        await asyncio.sleep(uuid.UUID(webhook_id).int % 7 / 1000)  # 0-6 ms, as receivers vary
        if uuid.UUID(webhook_id).int % 4 == 0 and webhook_id not in failed_once:
            failed_once.add(webhook_id)
            return web.Response(status=500)
        accepted.append(event)
        return web.Response(text="ok")

    clients = [redis_client.connect(settings.redis_url) for _ in range(2)]
    relays = [
        OutboxRelay(
            own_pool,
            client,
            settings.stream(streams.EVENTS),
            dsn=settings.session_database_url,
            batch_size=3,
            poll_interval=0.05,
        )
        for client in clients
    ]
    running = []
    try:
        async with receiving(aiohttp_server, flaky) as receiver, aiohttp.ClientSession() as http:
            urls = [
                await serve(aiohttp_server, create_webhooks(settings, resolver=ExampleResolver()))
                for _ in range(2)
            ]
            await Api(http, urls[0], settings).subscribe(Caller(school), receiver.url)
            running = [asyncio.create_task(r.run()) for r in relays]

            courses = [
                await school_store.create_row(
                    own_pool, resources.COURSES, school, {"title": f"Course {n}"}
                )
                for n in range(6)
            ]

            async def change(course: dict[str, Any], n: int) -> None:
                await school_store.update_row(
                    own_pool, resources.COURSES, school, course["id"], {"title": f"v{n}"}
                )

            await asyncio.gather(*(change(c, n) for n in range(8) for c in courses))
            await asyncio.gather(
                *(school_store.delete_row(own_pool, resources.COURSES, school, c["id"])
                  for c in courses)
            )  # fmt: skip

            async def all_accepted() -> bool:
                return len({e["id"] for e in accepted}) == 6 * 10

            await eventually(all_accepted, timeout=60)
    finally:
        for relay in relays:
            relay.stop()
        await asyncio.gather(*running)
        for client in clients:
            await client.aclose()

    committed: dict[int, list[str]] = {}
    for row in await school_store.outbox_events_for(own_pool, school):
        committed.setdefault(row["data"]["id"], []).append(str(row["event_id"]))
    arrived: dict[int, list[str]] = {}
    for event in accepted:
        ids = arrived.setdefault(event["data"]["id"], [])
        if event["id"] not in ids:
            ids.append(event["id"])
    assert arrived == committed
    assert len(failed_once) > 5  # retries did happen, and held their resource's later events


async def test_a_relay_holds_back_a_resources_events_while_another_relay_publishes_older_ones(
    own_pool: asyncpg.Pool, redis: redis_asyncio.Redis, settings: Settings
) -> None:
    """Relay A has locked the oldest events (course X created, course Y created) and is
    still appending them; relay B skips the locked rows and publishes what it may: course
    Z's events, but not X's update, which must follow X's creation on the stream. Once A's
    batch is done, B publishes the rest, and on the stream every course's events are in
    commit order."""
    school = new_school()
    stream = settings.stream(f"test:order:{secrets.token_hex(4)}")
    await settle_everything(own_pool)
    x = await school_store.create_row(own_pool, resources.COURSES, school, {"title": "X"})
    y = await school_store.create_row(own_pool, resources.COURSES, school, {"title": "Y"})
    z = await school_store.create_row(own_pool, resources.COURSES, school, {"title": "Z"})
    for n in range(2):
        for course in (x, z):
            await school_store.update_row(
                own_pool, resources.COURSES, school, course["id"], {"title": f"v{n}"}
            )
    relay_b = OutboxRelay(own_pool, redis, stream, batch_size=100)
    async with own_pool.acquire() as relay_a, relay_a.transaction():
        # What relay A's batch holds while its append is on the way.
        locked = await relay_a.fetch(
            "SELECT id FROM school_api.outbox WHERE published_at IS NULL ORDER BY id LIMIT 2"
            " FOR UPDATE"
        )
        assert len(locked) == 2
        assert await relay_b.drain() == 3  # Z created, Z v0, Z v1
        assert relay_b.held_back == 2  # X v0, X v1
    assert await relay_b.drain() == 4  # A gave its rows back: X and Y created, then X's

    by_course: dict[int, list[int]] = {}
    for event in [e.data for e in await streams.read_tail(redis, stream, "0-0")]:
        by_course.setdefault(event["data"]["id"], []).append(event["sequence"])
    assert set(by_course) == {x["id"], y["id"], z["id"]}
    for sequences in by_course.values():
        assert sequences == sorted(sequences)
    await redis.delete(stream)


async def test_a_dispatcher_records_a_batch_only_after_older_entries_others_hold(
    own_pool: asyncpg.Pool, redis: redis_asyncio.Redis, settings: Settings
) -> None:
    """Dispatcher "one" has read entry 1 and not yet acknowledged it; dispatcher "two" read
    entry 2 and must wait (its deliveries would be recorded first). Once one acknowledges,
    two goes ahead. An older entry of a dispatcher gone quiet past the claim time is taken
    over and recorded first, in the same batch."""
    stream = settings.stream(f"test:dispatch:{secrets.token_hex(4)}")
    ctx = WebhooksContext(
        settings=settings,
        pool=own_pool,
        redis=redis,
        metrics=WebhookMetrics(CollectorRegistry()),
        policy=ssrf.AddressPolicy(allow_loopback=True),
    )
    group = dispatcher.GROUP
    await streams.ensure_group(redis, stream, group)
    for n in (1, 2):
        await streams.append(redis, stream, {"n": n})
    first = await streams.read_group(redis, stream, group, "one", count=1)
    second = await streams.read_group(redis, stream, group, "two", count=1)
    assert await dispatcher.in_order(ctx, stream, "two", second, claim_idle_ms=60_000) is None
    await streams.ack(redis, stream, group, [first[0].id])
    assert await dispatcher.in_order(ctx, stream, "two", second, claim_idle_ms=60_000) == second
    await streams.ack(redis, stream, group, [second[0].id])

    for n in (3, 4):
        await streams.append(redis, stream, {"n": n})
    await streams.read_group(redis, stream, group, "one", count=1)  # and "one" dies
    fourth = await streams.read_group(redis, stream, group, "two", count=1)
    await asyncio.sleep(0.05)
    got = await dispatcher.in_order(ctx, stream, "two", fourth, claim_idle_ms=20)
    assert got is not None
    assert [e.data["n"] for e in got] == [3, 4]
    await redis.delete(stream)


# -------------------------------------------------------------------------------------------------
# Metrics


async def test_the_dispatchers_lag_and_pending_entries_are_gauged(
    own_pool: asyncpg.Pool, redis: redis_asyncio.Redis, settings: Settings, unique: str
) -> None:
    """Three events appended, one read and not yet acknowledged: the group's lag is 2 (XINFO
    GROUPS `lag`) and one entry is pending."""
    own = dataclasses.replace(settings, redis_prefix=f"{settings.redis_prefix}lag{unique}:")
    registry = CollectorRegistry()
    ctx = WebhooksContext(
        settings=own,
        pool=own_pool,
        redis=redis,
        metrics=WebhookMetrics(registry),
        policy=ssrf.AddressPolicy(allow_loopback=True),
    )
    stream = own.stream(streams.EVENTS)
    await streams.ensure_group(redis, stream, dispatcher.GROUP)
    for n in range(3):
        await streams.append(redis, stream, {"n": n})
    await streams.read_group(redis, stream, dispatcher.GROUP, "one", count=1)
    await dispatcher.report_lag(ctx)
    labels = {"stream": streams.EVENTS}
    assert registry.get_sample_value("webhook_stream_lag", labels) == 2
    assert registry.get_sample_value("webhook_stream_pending", labels) == 1
    await redis.delete(stream)


async def test_a_resources_next_delivery_goes_once_the_previous_is_delivered_dead_or_cancelled(
    own_pool: asyncpg.Pool, settings: Settings
) -> None:
    """Four events of one course for one subscription: one sendable at a time. A retry keeps
    the line; dead, cancelled and delivered each let the next go; a manual retry of the dead
    one is a replay outside the line (sent beside it, holding nothing back)."""
    school = new_school()
    sub = await subscription(own_pool, settings, school, "https://hooks.example.com/o")
    rows = [
        EventRow(str(uuid.uuid4()), school, "course.updated", b"{}", f"9-{n}", None,
                 "course:1", 100 + n)
        for n in range(4)
    ]  # fmt: skip
    assert await event_store.record_deliveries(own_pool, rows) == 4
    by_event = {
        r["event_id"]: r["id"]
        for r in await own_pool.fetch(
            "SELECT id, event_id FROM webhooks.deliveries WHERE subscription_id = $1", sub
        )
    }
    first, second, third, fourth = (by_event[r.id] for r in rows)

    async def claim() -> list[uuid.UUID]:
        got = await queue_store.claim_due(
            own_pool, per_endpoint=8, per_slow_endpoint=1, slow=[], limit=10,
            lease_seconds=30, worker="w",
        )  # fmt: skip
        return [c.id for c in got]

    async def outcome(delivery: uuid.UUID, kind: str) -> None:
        await outcome_store.record_outcomes(
            own_pool,
            [outcome_store.Outcome(delivery, sub, datetime.now(UTC), 500, 1, None, None, kind,
                                   0.0 if kind == "retry" else None)],
            worker="w",
            disable_after=3600,
        )  # fmt: skip

    assert await claim() == [first]
    await outcome(first, "retry")
    assert await claim() == [first]  # the same one again, the others still wait
    await outcome(first, "dead")
    assert await claim() == [second]
    await queue_store.cancel_deliveries(own_pool, [second])
    assert await claim() == [third]
    # The dead first one sent again by hand, while the third is in flight: a replay.
    assert await delivery_store.retry_delivery(own_pool, sub, first) == "dead"
    assert await claim() == [first]
    await outcome(third, "delivered")
    assert await claim() == [fourth]


async def test_an_endpoint_disabled_announcement_needs_no_redis_to_be_kept(
    own_pool: asyncpg.Pool, settings: Settings
) -> None:
    """The service both makes and hears endpoint.disabled: it records the owner's other
    endpoints' deliveries itself, so a Redis that is away (or restarts empty before a
    dispatcher reads a stream entry) cannot lose the announcement."""
    school = new_school()
    gone = await subscription(own_pool, settings, school, "https://hooks.example.com/gone")
    ears = await subscription(
        own_pool, settings, school, "https://hooks.example.com/ears", ("endpoint.disabled",)
    )
    nowhere = redis_asyncio.Redis(port=free_port())  # nothing listens there
    ctx = WebhooksContext(
        settings=settings,
        pool=own_pool,
        redis=nowhere,
        metrics=WebhookMetrics(CollectorRegistry()),
        policy=ssrf.AddressPolicy(allow_loopback=True),
    )
    disabled = outcome_store.Disabled(
        gone, school, "client-a", "https://hooks.example.com/gone", "gone", datetime.now(UTC)
    )
    try:
        await dispatcher.announce(ctx, [disabled])
        await dispatcher.announce(ctx, [disabled])  # a crash before it was marked: again
    finally:
        await nowhere.aclose()
    rows = await own_pool.fetch(
        "SELECT event_type, status FROM webhooks.deliveries WHERE subscription_id = $1", ears
    )
    assert [tuple(r) for r in rows] == [("endpoint.disabled", "pending")]


async def test_after_a_redis_restart_nothing_is_appended_before_what_it_lost(
    own_pool: asyncpg.Pool, settings: Settings
) -> None:
    """A relay published a course's creation to a redis-server of the test's own; Redis
    restarts empty; the course is then updated. The relay's next batch is refused by the new
    Redis (another run than it expects) and appends nothing; reconciled, it publishes the
    lost creation again, then the update: the course's order holds across the loss."""
    port = free_port()
    stream = settings.stream(streams.EVENTS)
    school = new_school()
    await settle_everything(own_pool)
    proc = await start_redis(port)
    client = redis_asyncio.Redis(port=port)
    try:
        relay = OutboxRelay(own_pool, client, stream)
        course = await school_store.create_row(own_pool, resources.COURSES, school, {"title": "A"})
        assert await relay.drain() == 1
        await kill_process(proc)
        proc = await start_redis(port)
        await school_store.update_row(
            own_pool, resources.COURSES, school, course["id"], {"title": "B"}
        )
        with pytest.raises(RunChanged):
            await relay.publish_batch()
        assert await client.xlen(stream) == 0
        assert await relay.drain() == 2
        entries = await streams.read_tail(client, stream, "0-0")
        assert [(e.data["type"], e.data["data"]["title"]) for e in entries] == [
            ("course.created", "A"),
            ("course.updated", "B"),
        ]
    finally:
        await client.aclose()
        await kill_process(proc)
